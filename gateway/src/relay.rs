//! The node's side of a standalone gateway: client traffic a gateway relays over QUIC.
//!
//! A relayed stream starts with a short preamble (which listener the client reached and
//! the client's address), then carries HTTP/1.1 exactly as the client sent it to the
//! gateway: one request, or one WebSocket upgrade and then the socket's frames. The node
//! serves it with the same routers as its own listeners, so every check (origins,
//! tokens, budgets per client address, body limits) is the node's, made once, against
//! its replica; the gateway holds the client's connection and nothing else.
//!
//! Preamble: `listener` (1 byte: 0 public, 1 private), `n` (1 byte), then `n` bytes of
//! the client's socket address in text (`203.0.113.7:50312`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use futures::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use switchboard_raft::tls::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_service::Service;

use crate::listener::{MAX_HEADERS, MAX_HEAD_BYTES};
use crate::ws::Relayed;

/// Which of the node's listeners a relayed request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Public = 0,
    Private = 1,
}

/// How long the gateway may take to send the preamble and the request's headers.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write to a relayed stream may wait for the gateway to read before the
/// stream is reset. A gateway closes a client's socket whose writes make no progress
/// within its write timeout (10 s by default), which ends the stream sooner; a client
/// on a slow link that takes a large frame for a long while, still reading, holds its
/// gateway's relay back that long too, so this is far longer.
const RELAYED_WRITE_PATIENCE: Duration = Duration::from_secs(120);

/// A stream that can be given up at once rather than finished.
trait Abort {
    fn abort(&mut self);
}

impl Abort for quinn::SendStream {
    fn abort(&mut self) {
        let _ = self.reset(quinn::VarInt::from_u32(0));
    }
}

/// A relayed stream's sending half whose writes fail, and which is reset, once a write
/// could not proceed for [`RELAYED_WRITE_PATIENCE`]: what a socket's writer waits for is
/// bounded here as on the member's own listener.
struct Patient<W> {
    inner: W,
    patience: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<W: Abort> Patient<W> {
    /// `poll` as it is, unless it has been pending for the patience (then an error, and
    /// the stream is reset). A write that went through shows progress (`progress`).
    fn bound<T>(&mut self, cx: &mut std::task::Context<'_>, poll: std::task::Poll<std::io::Result<T>>, progress: bool) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        match poll {
            std::task::Poll::Ready(result) => {
                if progress {
                    self.stalled = None;
                }
                std::task::Poll::Ready(result)
            }
            std::task::Poll::Pending => {
                let stalled = {
                    let patience = self.patience;
                    self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(patience)))
                };
                match stalled.as_mut().poll(cx) {
                    std::task::Poll::Ready(()) => {
                        self.inner.abort();
                        std::task::Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the gateway does not read")))
                    }
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            }
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin + Abort> tokio::io::AsyncWrite for Patient<W> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, poll, true)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.bound(cx, poll, false)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bound(cx, poll, false)
    }
}

/// Writes the preamble of a relayed stream.
pub async fn write_preamble<W: tokio::io::AsyncWrite + Unpin>(
    send: &mut W,
    listener: Listener,
    client: SocketAddr,
) -> std::io::Result<()> {
    let addr = client.to_string();
    let mut head = Vec::with_capacity(2 + addr.len());
    head.push(listener as u8);
    head.push(addr.len() as u8);
    head.extend_from_slice(addr.as_bytes());
    send.write_all(&head).await
}

async fn read_preamble<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<(Listener, SocketAddr), String> {
    let mut head = [0u8; 2];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    let listener = match head[0] {
        0 => Listener::Public,
        1 => Listener::Private,
        other => return Err(format!("unknown listener {other}")),
    };
    let mut addr = vec![0u8; usize::from(head[1])];
    recv.read_exact(&mut addr)
        .await
        .map_err(|e| e.to_string())?;
    let addr = std::str::from_utf8(&addr).map_err(|e| e.to_string())?;
    let client = addr
        .parse::<SocketAddr>()
        .map_err(|e| format!("client address {addr:?}: {e}"))?;
    Ok((listener, client))
}

/// Serves relayed streams with the node's public and private routers.
pub struct RelayServer {
    public: axum::Router,
    private: axum::Router,
}

impl RelayServer {
    pub fn new(public: axum::Router, private: axum::Router) -> Self {
        RelayServer { public, private }
    }
}

impl switchboard_raft::network::Relay for RelayServer {
    fn serve(
        &self,
        role: Role,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> futures::future::BoxFuture<'static, ()> {
        let (public, private) = (self.public.clone(), self.private.clone());
        async move {
            let _ = role;
            let (listener, client) =
                match tokio::time::timeout(HEAD_TIMEOUT, read_preamble(&mut recv)).await {
                    Ok(Ok(pair)) => pair,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "refused a relayed stream: bad preamble");
                        return;
                    }
                    Err(_) => return,
                };
            let router = if listener == Listener::Public {
                public
            } else {
                private
            };
            let io = TokioIo::new(tokio::io::join(recv, Patient { inner: send, patience: RELAYED_WRITE_PATIENCE, stalled: None }));
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request
                        .extensions_mut()
                        .insert(ConnectInfo::<SocketAddr>(client));
                    request.extensions_mut().insert(Relayed);
                    router.clone().call(request)
                });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS);
            if let Err(e) = http.serve_connection(io, service).with_upgrades().await {
                tracing::debug!(%client, error = %e, "relayed connection ended with an error");
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod patience_tests {
    use super::*;

    /// Whether the stream was reset rather than finished.
    struct Probe(tokio::io::DuplexStream, bool);

    impl Abort for Probe {
        fn abort(&mut self) {
            self.1 = true;
        }
    }

    impl tokio::io::AsyncWrite for Probe {
        fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_write_the_peer_does_not_read_fails_after_the_patience_and_progress_rearms_it() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut send = Patient { inner: Probe(near, false), patience: Duration::from_millis(100), stalled: None };
        // Writes that proceed never fail, however long it all takes.
        send.write_all(&[1u8; 1000]).await.expect("room for it");
        let mut read = [0u8; 1000];
        far.read_exact(&mut read).await.expect("read");
        tokio::time::sleep(Duration::from_millis(150)).await;
        send.write_all(&[2u8; 1000]).await.expect("progress rearms the patience");
        // Then nobody reads: the write that cannot proceed fails within its patience.
        let started = std::time::Instant::now();
        let stuck = tokio::time::timeout(Duration::from_secs(10), send.write_all(&[3u8; 4096])).await.expect("not forever");
        assert_eq!(stuck.map_err(|e| e.kind()), Err(std::io::ErrorKind::TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(send.inner.1, "the stream is reset, not finished");
        drop(far);
    }
}
