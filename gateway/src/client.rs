//! A small WebSocket client speaking the JSON protocol: used by `switchboard bench`,
//! the end-to-end tests and anyone scripting against a gateway.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, ORIGIN, UPGRADE};
use hyper::Request;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("handshake refused: {0}")]
    Handshake(String),
    #[error("socket closed")]
    Closed,
    #[error("timed out waiting for a frame")]
    Timeout,
    #[error("write: {0}")]
    Write(String),
}

/// What the server sent.
/// The sending half of a [`WsClient`], for a writer task apart from its reader.
#[derive(Clone)]
pub struct WsSender {
    write: Arc<Mutex<Write>>,
}

impl WsSender {
    pub async fn send(&self, value: &Value) -> Result<(), ClientError> {
        let frame = Frame::text(Payload::Owned(value.to_string().into_bytes()));
        self.write.lock().await.write_frame(frame).await.map_err(|e| ClientError::Write(e.to_string()))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Json(Value),
    /// A text frame that was not JSON (the server never sends one; kept for tests).
    Text(String),
    Closed { code: u16, reason: String },
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

type Write = fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>>;

pub struct WsClient {
    write: Arc<Mutex<Write>>,
    /// Set by [`WsClient::keep_text`]: text frames come as `Incoming::Text`, unparsed.
    raw: Arc<std::sync::atomic::AtomicBool>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// Frames skipped by `wait_for`, kept in order for later reads.
    skipped: std::collections::VecDeque<Incoming>,
}

impl WsClient {
    /// Connects to `ws://addr/path_and_query`, optionally with a browser Origin.
    pub async fn connect(addr: &str, path_and_query: &str, origin: Option<&str>) -> Result<WsClient, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(|e| ClientError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut request = Request::builder()
            .method("GET")
            .uri(path_and_query)
            .header(HOST, addr)
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "upgrade")
            .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
            .header("Sec-WebSocket-Version", "13");
        if let Some(origin) = origin {
            request = request.header(ORIGIN, origin);
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| ClientError::Connect(e.to_string()))?;
        let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
            .await
            .map_err(|e| ClientError::Handshake(e.to_string()))?;
        let (read, write) = ws.split(tokio::io::split);
        let write = Arc::new(Mutex::new(write));
        let (tx, incoming) = mpsc::unbounded_channel();
        let writer = write.clone();
        let raw = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keep_text = raw.clone();
        tokio::spawn(async move {
            let mut read = FragmentCollectorRead::new(read);
            loop {
                let owed = writer.clone();
                let frame = read
                    .read_frame(&mut move |frame: Frame<'_>| {
                        let owed = owed.clone();
                        let reply = Frame::new(true, frame.opcode, None, Payload::Owned(frame.payload.to_vec()));
                        async move { owed.lock().await.write_frame(reply).await }
                    })
                    .await;
                let message = match frame {
                    Ok(frame) => match frame.opcode {
                        OpCode::Text if keep_text.load(std::sync::atomic::Ordering::Relaxed) => Incoming::Text(String::from_utf8_lossy(&frame.payload).into_owned()),
                        OpCode::Text => {
                            let text = String::from_utf8_lossy(&frame.payload).into_owned();
                            match serde_json::from_str(&text) {
                                Ok(v) => Incoming::Json(v),
                                Err(_) => Incoming::Text(text),
                            }
                        }
                        OpCode::Close => {
                            let code = if frame.payload.len() >= 2 { u16::from_be_bytes([frame.payload[0], frame.payload[1]]) } else { 1005 };
                            let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default()).into_owned();
                            let _ = tx.send(Incoming::Closed { code, reason });
                            return;
                        }
                        _ => continue,
                    },
                    Err(WebSocketError::ConnectionClosed) | Err(_) => {
                        let _ = tx.send(Incoming::Closed { code: 1006, reason: "connection lost".into() });
                        return;
                    }
                };
                if tx.send(message).is_err() {
                    return;
                }
            }
        });
        Ok(WsClient { write, raw, incoming, skipped: Default::default() })
    }

    /// From now on, text frames the server sends arrive as `Incoming::Text`, not parsed
    /// into a `Value`: for a caller that reads a few fields of many frames with a typed
    /// parse of its own (the bench's load, whose parsing would otherwise take CPU from
    /// the nodes it measures on the same machine). `wait_for` sees no JSON after this.
    pub fn keep_text(&self) {
        self.raw.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn send(&self, value: &Value) -> Result<(), ClientError> {
        self.send_text(&value.to_string()).await
    }

    /// A handle that sends on this socket while another task reads it.
    pub fn sender(&self) -> WsSender {
        WsSender { write: self.write.clone() }
    }

    pub async fn send_text(&self, text: &str) -> Result<(), ClientError> {
        let frame = Frame::text(Payload::Owned(text.as_bytes().to_vec()));
        self.write.lock().await.write_frame(frame).await.map_err(|e| ClientError::Write(e.to_string()))
    }

    pub async fn send_binary(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let frame = Frame::binary(Payload::Owned(bytes.to_vec()));
        self.write.lock().await.write_frame(frame).await.map_err(|e| ClientError::Write(e.to_string()))
    }

    pub async fn close(&self) {
        let _ = self.write.lock().await.write_frame(Frame::close(1000, b"bye")).await;
    }

    /// The next thing the server sent, or `Timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Incoming, ClientError> {
        if let Some(message) = self.skipped.pop_front() {
            return Ok(message);
        }
        self.receive(timeout).await
    }

    async fn receive(&mut self, timeout: Duration) -> Result<Incoming, ClientError> {
        match tokio::time::timeout(timeout, self.incoming.recv()).await {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// The first frame, already received or still to come, that satisfies `matches`.
    /// Frames passed over stay available, in order, to later calls; a close on the way
    /// is an error.
    pub async fn wait_for(&mut self, timeout: Duration, matches: impl Fn(&Value) -> bool) -> Result<Value, ClientError> {
        if let Some(i) = self.skipped.iter().position(|m| matches!(m, Incoming::Json(v) if matches(v))) {
            if let Some(Incoming::Json(v)) = self.skipped.remove(i) {
                return Ok(v);
            }
        }
        if self.skipped.iter().any(|m| matches!(m, Incoming::Closed { .. })) {
            return Err(ClientError::Closed);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.receive(left).await? {
                Incoming::Json(v) if matches(&v) => return Ok(v),
                Incoming::Closed { code, reason } => {
                    self.skipped.push_back(Incoming::Closed { code, reason });
                    return Err(ClientError::Closed);
                }
                other => self.skipped.push_back(other),
            }
        }
    }

    /// Forgets frames passed over by earlier `wait_for` calls.
    pub fn clear_skipped(&mut self) {
        self.skipped.clear();
    }
}

/// One HTTP/1.1 request with an optional JSON body and bearer token; returns the status
/// and the body parsed as JSON (or as a JSON string when it is not JSON).
pub async fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| ("authorization", a)).into_iter().collect();
    http_json_with(addr, method, path, &headers, body).await
}

/// [`http_json`] with headers of the caller's choosing.
pub async fn http_json_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> Result<(u16, Value), ClientError> {
    use http_body_util::{BodyExt, Full};
    let stream = TcpStream::connect(addr).await.map_err(|e| ClientError::Connect(e.to_string()))?;
    // A small request written right after another must not wait for a delayed ack.
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    tokio::spawn(connection);
    let mut request = Request::builder().method(method).uri(path).header(HOST, addr);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let payload = match body {
        Some(v) => {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let request = request.body(Full::new(payload)).map_err(|e| ClientError::Connect(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| ClientError::Write(e.to_string()))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| ClientError::Write(e.to_string()))?.to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

/// A port `p` such that TCP `p + 10k`, `p + 10k + 1` and UDP `p + 10k + 2` are free on
/// loopback for `k < n`: the layout `switchboard cluster init` gives nodes sharing a
/// host (public, private and QUIC ports, 10 apart per node). For the bench and tests.
///
/// The ports are checked free now but bound later, by processes that start seconds
/// after: blocks are taken below the kernel's ephemeral range (where no outgoing
/// connection or `:0` bind can take them meanwhile), and never twice in one process.
pub fn free_port_block(n: usize) -> Result<u16, ClientError> {
    static HANDED_OUT: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32_768);
    let (low, span) = (10_000u32, 10 * n as u32 + 10);
    let high = ephemeral.clamp(low + span + 10, 65_000) - span;
    let bases = ((high - low) / 10).max(1);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) ^ std::process::id();
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for attempt in 0..400u32 {
        let base = (low + (seed.wrapping_add(attempt.wrapping_mul(7919)) % bases) * 10) as u16;
        let end = base.saturating_add(span as u16);
        if handed.iter().any(|(b, e)| base < *e && *b < end) {
            continue;
        }
        let free = (0..n as u16).all(|k| {
            let p = base + 10 * k;
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", p + 2)).is_ok()
        });
        if free {
            handed.push((base, end));
            return Ok(base);
        }
    }
    Err(ClientError::Connect(format!("no free block of ports for {n} nodes")))
}
