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
            let io = TokioIo::new(tokio::io::join(recv, send));
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
