//! Serving a router on a TCP listener with every connection bounded: how many are open
//! (per address and in all), how long a request's headers may take (and how long a
//! kept-alive connection may sit idle), how large they may be, and how long a write
//! may make no progress.
//!
//! The write bound lives in the connection's I/O itself ([`Guarded`]), below hyper and
//! below the WebSocket upgrade, so it covers a response nobody reads and a socket
//! whose peer stopped reading alike.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;

use crate::budget::{Slot, Slots};

/// Bounds on the connections of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Time to send a request's complete headers; also the idle time allowed between
    /// requests on a kept-alive connection.
    pub header_timeout: Duration,
    /// Time a write may make no progress before the connection is closed.
    pub write_timeout: Duration,
    /// Open connections on the listener.
    pub max_connections: u32,
    /// Open connections from one client address.
    pub max_connections_per_address: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_address: 256,
        }
    }
}

/// Largest request head (request line and headers) hyper buffers, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 100;

/// Serves `router` until `stop` turns true; dropping the returned task's future (or
/// aborting it) closes every connection it accepted.
pub async fn serve(listener: TcpListener, router: axum::Router, limits: ConnectionLimits, metrics: Arc<crate::metrics::Metrics>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let slots = Slots::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // The guard `wait_for` returns is not `Send`: drop it inside.
            _ = async { drop(stop.wait_for(|stopped| *stopped).await) } => return,
        };
        while connections.try_join_next().is_some() {}
        let slot = match slots.acquire(crate::budget::client_address(peer.ip()), limits.max_connections_per_address, limits.max_connections) {
            Ok(slot) => slot,
            Err(refused) => {
                metrics.connections_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%peer, ?refused, "connection refused: over the connection cap");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Guarded::new(stream, limits.write_timeout, slot));
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().call(request)
        });
        let connection = http.serve_connection(io, service).with_upgrades();
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A TCP stream whose writes fail with `TimedOut` once one has made no progress for
/// `write_timeout`, and which holds its listener slot while it lives.
pub struct Guarded {
    stream: TcpStream,
    write_timeout: Duration,
    /// Armed when a write could not proceed; cleared by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: Slot,
}

impl Guarded {
    fn new(stream: TcpStream, write_timeout: Duration, slot: Slot) -> Self {
        Guarded { stream, write_timeout, stalled: None, _slot: slot }
    }

    /// Turns a pending write into an error once it has been pending too long.
    fn bound<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.write_timeout;
                let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer does not read"))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.bound(cx, poll)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.bound(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.bound(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.bound(cx, poll)
    }
}
