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
#[derive(Clone, Debug)]
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
    /// Reverse proxies whose `X-Forwarded-For` names the client: a request that comes
    /// from one of them counts against the client's budgets, not the proxy's (the
    /// connection itself still counts against the proxy's address).
    pub trusted_proxies: Vec<ProxyNet>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_address: 256,
            trusted_proxies: Vec::new(),
        }
    }
}

/// An address or a network (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1`) that a reverse proxy
/// sends from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyNet {
    net: std::net::IpAddr,
    prefix: u8,
}

impl std::str::FromStr for ProxyNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP address or network (like 10.0.0.0/8 or fd00::/8)");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let net = addr.parse::<std::net::IpAddr>().map_err(|_| bad())?.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(ProxyNet { net, prefix })
    }
}

impl std::fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl ProxyNet {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Longest `X-Forwarded-For` read, in entries from its right end.
const MAX_FORWARDED_HOPS: usize = 16;

/// The client a request is from: `peer`, or, when `peer` is a trusted proxy, the
/// right-most address of `X-Forwarded-For` (every such header, in order) that is not a
/// trusted proxy itself. An entry that is not an address (`unknown`, a name) stops
/// the walk: the last trusted hop is taken, so a client cannot claim an address by
/// writing one of its own left of the proxies' entries.
pub fn forwarded_client(peer: SocketAddr, headers: &hyper::HeaderMap, trusted: &[ProxyNet]) -> SocketAddr {
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|net| net.contains(ip));
    if trusted.is_empty() || !is_trusted(peer.ip()) {
        return peer;
    }
    let mut client = peer;
    // Split as bytes: a client's own value that is not ASCII must not hide the entries a
    // proxy appended after it (the right-most, which are the ones read).
    let entries: Vec<&[u8]> = headers.get_all("x-forwarded-for").iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).collect();
    for entry in entries.iter().rev().take(MAX_FORWARDED_HOPS) {
        let Ok(entry) = std::str::from_utf8(entry) else { break };
        let entry = entry.trim();
        let ip = entry
            .parse::<std::net::IpAddr>()
            .ok()
            .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
            .or_else(|| entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).and_then(|e| e.parse().ok()));
        let Some(ip) = ip.map(|ip: std::net::IpAddr| ip.to_canonical()) else { break };
        // The proxy's port stays: it differs per connection, which is what spreads the
        // moves of a standalone gateway's sockets.
        client = SocketAddr::new(ip, peer.port());
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// Largest request head (request line and headers) hyper buffers, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 100;

/// Serves `router` until `stop` turns true; dropping the returned task's future (or
/// aborting it) closes every connection it accepted.
pub async fn serve(listener: TcpListener, router: axum::Router, limits: ConnectionLimits, metrics: Arc<crate::metrics::Metrics>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let slots = Slots::new();
    let trusted: Arc<[ProxyNet]> = limits.trusted_proxies.clone().into();
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
        let trusted = trusted.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let client = forwarded_client(peer, request.headers(), &trusted);
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(client));
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

/// Bytes a backlogged peer must take within each write timeout: one that reads a
/// trickle (a few bytes just before each timeout) would otherwise hold a response and
/// its buffers for hours.
pub const MIN_PROGRESS_BYTES: usize = 16 * 1024;

/// A TCP stream whose writes fail with `TimedOut` once output has waited for
/// `write_timeout` while the peer took less than [`MIN_PROGRESS_BYTES`] of it, and
/// which holds its listener slot while it lives.
pub struct Guarded {
    stream: TcpStream,
    write_timeout: Duration,
    /// Armed when a write could not proceed; cleared once the peer took
    /// [`MIN_PROGRESS_BYTES`] since, or a whole write went through at once.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes written since `stalled` was armed.
    taken: usize,
    _slot: Slot,
}

impl Guarded {
    fn new(stream: TcpStream, write_timeout: Duration, slot: Slot) -> Self {
        Guarded { stream, write_timeout, stalled: None, taken: 0, _slot: slot }
    }

    /// [`Guarded::bound`] for a write of `offered` bytes: a write that goes through
    /// whole means the peer keeps up; a part of it counts towards the progress a
    /// backlogged peer owes.
    fn bound_write(&mut self, cx: &mut Context<'_>, offered: usize, poll: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match poll {
            Poll::Ready(Ok(n)) if self.stalled.is_some() && n < offered => {
                self.taken += n;
                if self.taken >= MIN_PROGRESS_BYTES {
                    self.stalled = None;
                }
                Poll::Ready(Ok(n))
            }
            poll => self.bound(cx, poll),
        }
    }

    /// [`Guarded::bound`] for a flush or shutdown, whose success clears nothing.
    fn bound_other<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.bound(cx, Poll::Pending),
        }
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
                if self.stalled.is_none() {
                    self.taken = 0;
                }
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
        self.bound_write(cx, buf.len(), poll)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.bound_write(cx, bufs.iter().map(|b| b.len()).sum(), poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TCP stream's flush and shutdown say nothing of what the peer took: they
        // leave the progress owed as it is.
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.bound_other(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.bound_other(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn a_trusted_proxy_s_forwarded_for_names_the_client_and_nobody_else_s_does() {
        let trusted: Vec<ProxyNet> = ["10.0.0.0/8", "fd00::/8", "127.0.0.1"].iter().map(|s| s.parse().expect("net")).collect();
        let proxy: SocketAddr = "10.1.2.3:5000".parse().expect("addr");
        let stranger: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
        let ip = |a: SocketAddr| a.ip().to_string();
        // The right-most entry that is not a proxy of ours.
        assert_eq!(ip(forwarded_client(proxy, &headers(&["198.51.100.7"]), &trusted)), "198.51.100.7");
        assert_eq!(ip(forwarded_client(proxy, &headers(&["1.1.1.1, 198.51.100.7, 10.9.9.9"]), &trusted)), "198.51.100.7", "a claim left of the real client is not taken");
        assert_eq!(ip(forwarded_client(proxy, &headers(&["1.1.1.1", "198.51.100.7"]), &trusted)), "198.51.100.7", "several headers are one list");
        assert_eq!(ip(forwarded_client(proxy, &headers(&["[2001:db8::5]:443"]), &trusted)), "2001:db8::5");
        assert_eq!(ip(forwarded_client(proxy, &headers(&["198.51.100.7:8080"]), &trusted)), "198.51.100.7");
        // Nothing to go by: the proxy itself.
        assert_eq!(ip(forwarded_client(proxy, &headers(&[]), &trusted)), "10.1.2.3");
        assert_eq!(ip(forwarded_client(proxy, &headers(&["1.1.1.1, unknown"]), &trusted)), "10.1.2.3", "a hop that is not an address stops the walk");
        // Anyone else's header is ignored; so is every header with no proxy trusted.
        assert_eq!(forwarded_client(stranger, &headers(&["198.51.100.7"]), &trusted), stranger);
        assert_eq!(forwarded_client(proxy, &headers(&["198.51.100.7"]), &[]), proxy);
        // A client's value that is not ASCII does not hide the proxy's entry after it.
        let mut odd = hyper::HeaderMap::new();
        odd.append("x-forwarded-for", hyper::header::HeaderValue::from_bytes(b"\x80\xff, 198.51.100.7").expect("obs-text is a valid header value"));
        assert_eq!(ip(forwarded_client(proxy, &odd, &trusted)), "198.51.100.7");
        assert_eq!(forwarded_client(proxy, &headers(&["198.51.100.7"]), &trusted).port(), 5000, "the connection's port stays");
        // IPv4-mapped peers count as IPv4.
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().expect("addr");
        assert_eq!(ip(forwarded_client(mapped, &headers(&["198.51.100.7"]), &trusted)), "198.51.100.7");
    }

    #[test]
    fn proxy_networks_parse_and_match() {
        let net: ProxyNet = "192.168.0.0/16".parse().expect("net");
        assert!(net.contains("192.168.44.1".parse().expect("ip")));
        assert!(!net.contains("192.169.0.1".parse().expect("ip")));
        assert!(!net.contains("::1".parse().expect("ip")));
        let all: ProxyNet = "0.0.0.0/0".parse().expect("net");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let v6: ProxyNet = "fd00::/8".parse().expect("net");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!(!v6.contains("fe80::1".parse().expect("ip")));
        for bad in ["10.0.0.0/33", "::/129", "proxy.local", "10.0.0.0/x", ""] {
            assert!(bad.parse::<ProxyNet>().is_err(), "{bad}");
        }
    }

    /// Writes through a `Guarded` stream to a peer that reads up to `per_read` bytes
    /// `every` so long, with a write timeout of 500 ms; returns whether the writes
    /// failed `TimedOut` within 6 s.
    async fn cut_off_reading(per_read: usize, every: Duration) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("small receive buffer");
        let (client, accepted) = tokio::join!(socket.connect(addr), listener.accept());
        let (mut client, (server, _)) = (client.expect("connect"), accepted.expect("accept"));
        let server = {
            // A small send buffer, set through a socket that shares the descriptor.
            let std = server.into_std().expect("std");
            let socket = tokio::net::TcpSocket::from_std_stream(std.try_clone().expect("clone"));
            socket.set_send_buffer_size(4096).expect("small send buffer");
            drop(socket);
            TcpStream::from_std(std).expect("tokio")
        };
        let slot = Slots::new().acquire("127.0.0.1".parse().expect("ip"), 1, 1).expect("slot");
        let mut guarded = Guarded::new(server, Duration::from_millis(500), slot);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; per_read];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(every).await;
                if matches!(client.read(&mut buf).await, Ok(0) | Err(_)) {
                    return;
                }
            }
        });
        let chunk = vec![7u8; 64 * 1024];
        let outcome = tokio::time::timeout(Duration::from_secs(6), async {
            loop {
                if let Err(e) = guarded.write_all(&chunk).await {
                    return e.kind();
                }
            }
        })
        .await;
        reader.abort();
        outcome == Ok(io::ErrorKind::TimedOut)
    }

    /// A peer that reads a trickle (well under 16 KiB per write timeout) is cut off;
    /// one that keeps up is not.
    #[tokio::test]
    async fn a_peer_that_reads_a_trickle_is_cut_off_and_one_that_keeps_up_is_not() {
        assert!(cut_off_reading(4096, Duration::from_millis(200)).await, "4 KiB every 200 ms is 10 KiB per 500 ms timeout: cut off");
        assert!(!cut_off_reading(64 * 1024, Duration::from_millis(1)).await, "a peer that reads all it is sent keeps its connection");
    }
}
