//! The socket plumbing both WebSocket surfaces share: a reader that enforces frame
//! size and rate limits and hands text to a [`Session`], and a writer that owns the
//! outgoing half, follows a committed stream and forwards ephemeral signals.
//!
//! The writer pulls from committed state each time a stream wakes it, starting after
//! the last sequence number it sent: a lost or coalesced wake-up can delay a frame but
//! never drop or repeat one.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocket, WebSocketError};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use switchboard_actors::shard::Wakeups;
use tokio::sync::{broadcast, mpsc};

use crate::frames;
use crate::metrics::Metrics;

/// Close codes used by both surfaces (documented in `docs/protocol.md`).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const RATE_LIMITED: u16 = 4008;
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest WebSocket message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Sustained frames per second.
    pub frames_per_second: f64,
    /// Frames allowed in a burst above the sustained rate.
    pub burst: f64,
    /// Refused frames in a row after which the socket is closed with 4008.
    pub max_refused_in_row: u32,
}

impl Limits {
    pub const CLIENT: Limits = Limits { max_message_bytes: 16 * 1024, frames_per_second: 10.0, burst: 30.0, max_refused_in_row: 50 };
    pub const OPERATOR: Limits = Limits { max_message_bytes: 64 * 1024, frames_per_second: 50.0, burst: 200.0, max_refused_in_row: 200 };
}

struct RateLimiter {
    limits: Limits,
    tokens: f64,
    last: Instant,
    refused_in_row: u32,
}

impl RateLimiter {
    fn new(limits: Limits) -> Self {
        RateLimiter { limits, tokens: limits.burst, last: Instant::now(), refused_in_row: 0 }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.limits.frames_per_second;
        self.tokens = (self.tokens + refill).min(self.limits.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_row = 0;
            true
        } else {
            self.refused_in_row += 1;
            false
        }
    }
}

/// What the writer is told to do.
pub enum Out {
    Json(Value),
    /// Start following a committed stream (replacing any earlier one).
    Follow(Follow),
    /// Send a close frame and stop.
    Close(u16, String),
    /// Control frames owed to the peer (pong, close echo).
    Control(OpCode, Vec<u8>),
}

/// A committed stream to follow: woken by `wake`, read by `pull`.
pub struct Follow {
    pub wake: Wakeups,
    /// Frames committed since the last call, in order.
    pub pull: Box<dyn FnMut() -> Vec<Value> + Send>,
    /// Ephemeral signals (typing) that are forwarded as they come.
    pub signals: Option<broadcast::Receiver<Value>>,
    /// Pause after each pull, so bursts of wake-ups coalesce into one frame.
    pub min_interval: Option<Duration>,
}

/// The sending side handed to sessions.
#[derive(Clone)]
pub struct Outbox(mpsc::Sender<Out>);

impl Outbox {
    pub async fn json(&self, value: Value) {
        let _ = self.0.send(Out::Json(value)).await;
    }

    pub async fn error(&self, code: &str, message: &str, reference: Option<&Value>) {
        self.json(frames::error(code, message, reference)).await;
    }

    pub async fn follow(&self, follow: Follow) {
        let _ = self.0.send(Out::Follow(follow)).await;
    }
}

/// Which socket surface a session belongs to, for limits and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Surface {
    Client,
    Operator,
    Supervisor,
}

/// The checks every surface makes before upgrading: the browser's Origin, and for
/// staff surfaces a valid staff token. Refusals answer with a plain HTTP status.
pub(crate) fn admit(gw: &crate::Gateway, headers: &axum::http::HeaderMap, surface: Surface, token: Option<&str>) -> Result<Option<crate::Subject>, axum::response::Response> {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let origins = if surface == Surface::Client { &gw.config.client_origins } else { &gw.config.staff_origins };
    let refuse = |status: StatusCode, why: &'static str| {
        gw.metrics.auth_failures.fetch_add(1, Relaxed);
        Err((status, why).into_response())
    };
    if !crate::origin_allowed(headers, origins) {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    if surface == Surface::Client {
        return Ok(None);
    }
    match token.map(|t| gw.tokens.verify(t)) {
        Some(Ok(crate::Subject::Staff { login, role, operator })) if !gw.staff_current(&login, role, operator.as_ref()) => {
            refuse(StatusCode::UNAUTHORIZED, "this login's role changed; log in again")
        }
        Some(Ok(subject @ crate::Subject::Staff { .. })) => Ok(Some(subject)),
        Some(Ok(crate::Subject::Client { .. } | crate::Subject::Visitor { .. })) => {
            refuse(StatusCode::FORBIDDEN, "client tokens are for the public listener")
        }
        Some(Err(_)) => refuse(StatusCode::UNAUTHORIZED, "invalid or expired token"),
        None => refuse(StatusCode::UNAUTHORIZED, "token query parameter required"),
    }
}

/// Who a staff socket speaks for: checked while it is open, so a login whose role or
/// operator an admin changes loses its sockets too, not only its next requests.
pub(crate) struct StaffLogin {
    pub login: String,
    pub role: switchboard_actors::model::Role,
    pub operator: Option<switchboard_actors::model::OperatorId>,
}

/// How often an open staff socket re-checks its login.
const LOGIN_RECHECK: Duration = Duration::from_secs(2);

/// Completes the upgrade and runs `session` on the socket in its own task.
pub(crate) fn accept<S: Session>(
    gw: Arc<crate::Gateway>,
    upgrade: fastwebsockets::upgrade::IncomingUpgrade,
    surface: Surface,
    staff: Option<StaffLogin>,
    session: S,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (response, socket) = match upgrade.upgrade() {
        Ok(pair) => pair,
        Err(e) => return (axum::http::StatusCode::BAD_REQUEST, format!("websocket upgrade failed: {e}")).into_response(),
    };
    tokio::spawn(async move {
        let ws = match socket.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, ?surface, "upgrade did not complete");
                return;
            }
        };
        let metrics = gw.metrics.clone();
        let (opened, active, limits) = match surface {
            Surface::Client => (&metrics.client_sessions_opened, &metrics.client_sessions_active, gw.config.client_limits),
            Surface::Operator | Surface::Supervisor => {
                (&metrics.operator_sessions_opened, &metrics.operator_sessions_active, gw.config.operator_limits)
            }
        };
        opened.fetch_add(1, Relaxed);
        active.fetch_add(1, Relaxed);
        let guard: Option<Guard> = staff.map(|s| {
            let gw = gw.clone();
            Arc::new(move || gw.staff_current(&s.login, s.role, s.operator.as_ref())) as Guard
        });
        drive(ws, session, limits, metrics.clone(), guard).await;
        active.fetch_sub(1, Relaxed);
    });
    response.into_response()
}

/// What a session wants after handling a frame.
pub enum Flow {
    Continue,
    Close(u16, String),
}

/// One surface's handling of inbound text frames.
pub trait Session: Send + 'static {
    /// Called once before the first frame is read.
    fn on_start(&mut self, _out: &Outbox) -> impl Future<Output = Flow> + Send {
        async { Flow::Continue }
    }
    fn on_text(&mut self, text: &str, out: &Outbox) -> impl Future<Output = Flow> + Send;
    /// Called once after the socket and its writer have stopped.
    fn on_end(&mut self) {}
}

const KEEPALIVE: Duration = Duration::from_secs(30);
const OUTBOX_DEPTH: usize = 64;
const LINGER: Duration = Duration::from_secs(2);

/// Whether the socket's login still holds; `false` closes it with 4001.
pub type Guard = Arc<dyn Fn() -> bool + Send + Sync>;

/// Tells the peer why, then closes with 4001.
async fn refuse_changed_login(outbox: &Outbox) {
    outbox.error("unauthorized", "this login's role changed; log in again", None).await;
    let _ = outbox.0.send(Out::Close(close::UNAUTHORIZED, "login changed".into())).await;
}

/// Closes the socket once its guard fails, checking every `LOGIN_RECHECK`.
fn watch_guard(guard: Guard, outbox: Outbox) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LOGIN_RECHECK).await;
            if outbox.0.is_closed() {
                return;
            }
            if !guard() {
                refuse_changed_login(&outbox).await;
                return;
            }
        }
    })
}

/// Runs a socket until either side closes it.
pub async fn drive<S: Session>(mut ws: WebSocket<TokioIo<Upgraded>>, mut session: S, limits: Limits, metrics: Arc<Metrics>, guard: Option<Guard>) {
    ws.set_max_message_size(limits.max_message_bytes);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    let (read, write) = ws.split(tokio::io::split);
    let mut read = FragmentCollectorRead::new(read);
    let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
    let writer = tokio::spawn(write_loop(write, rx, metrics.clone()));
    let outbox = Outbox(tx);
    let watcher = guard.clone().map(|g| watch_guard(g, outbox.clone()));
    let mut limiter = RateLimiter::new(limits);
    if let Flow::Close(code, reason) = session.on_start(&outbox).await {
        let _ = outbox.0.send(Out::Close(code, reason)).await;
        drop(outbox);
        let _ = writer.await;
        return;
    }
    loop {
        let control = outbox.0.clone();
        let frame = read
            .read_frame(&mut move |frame: Frame<'_>| {
                let control = control.clone();
                let owed = Out::Control(frame.opcode, frame.payload.to_vec());
                async move { control.send(owed).await.map_err(|_| WebSocketError::ConnectionClosed) }
            })
            .await;
        let frame = match frame {
            Ok(frame) => frame,
            Err(WebSocketError::FrameTooLarge) => {
                metrics.error_frames.fetch_add(1, Relaxed);
                let _ = outbox.0.send(Out::Close(close::TOO_BIG, "message too big".into())).await;
                break;
            }
            Err(WebSocketError::InvalidUTF8) => {
                let _ = outbox.0.send(Out::Close(1007, "invalid utf-8".into())).await;
                break;
            }
            Err(_) => break,
        };
        match frame.opcode {
            OpCode::Text => {
                metrics.frames_received.fetch_add(1, Relaxed);
                if frame.payload.len() > limits.max_message_bytes {
                    let _ = outbox.0.send(Out::Close(close::TOO_BIG, "message too big".into())).await;
                    break;
                }
                if !limiter.allow() {
                    metrics.rate_limited.fetch_add(1, Relaxed);
                    if limiter.refused_in_row >= limits.max_refused_in_row {
                        let _ = outbox.0.send(Out::Close(close::RATE_LIMITED, "rate limit exceeded".into())).await;
                        break;
                    }
                    metrics.error_frames.fetch_add(1, Relaxed);
                    outbox.error("rate_limited", "too many frames; this one was not processed", None).await;
                    continue;
                }
                // A frame that arrives after the login changed is not acted on.
                if guard.as_ref().is_some_and(|g| !g()) {
                    refuse_changed_login(&outbox).await;
                    break;
                }
                let text = match std::str::from_utf8(&frame.payload) {
                    Ok(text) => text,
                    Err(_) => {
                        let _ = outbox.0.send(Out::Close(1007, "invalid utf-8".into())).await;
                        break;
                    }
                };
                match session.on_text(text, &outbox).await {
                    Flow::Continue => {}
                    Flow::Close(code, reason) => {
                        let _ = outbox.0.send(Out::Close(code, reason)).await;
                        break;
                    }
                }
            }
            OpCode::Binary => {
                metrics.error_frames.fetch_add(1, Relaxed);
                outbox.error("unsupported", "binary frames are not part of the protocol; send JSON text", None).await;
            }
            OpCode::Close => break,
            _ => {}
        }
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    drop(outbox);
    let _ = writer.await;
    // Linger briefly, discarding what the peer still sends, so our close frame is read
    // before the socket goes away (closing with unread input would reset the connection
    // and could destroy the close frame in flight).
    let drain = async {
        loop {
            match read.read_frame(&mut |_frame: Frame<'_>| async { Ok::<(), WebSocketError>(()) }).await {
                Ok(frame) if frame.opcode != OpCode::Close => continue,
                Ok(_) | Err(WebSocketError::UnexpectedEOF) | Err(WebSocketError::ConnectionClosed) => break,
                // Unparseable input (the rest of an oversized frame): we cannot skip it,
                // so give the peer the linger time to read our close frame first.
                Err(_) => std::future::pending::<()>().await,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
    session.on_end();
}

async fn wait_wake(wake: &mut Option<Wakeups>) -> bool {
    match wake {
        Some(w) => w.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn wait_signal(signals: &mut Option<broadcast::Receiver<Value>>) -> Option<Value> {
    match signals.as_mut() {
        Some(rx) => loop {
            match rx.recv().await {
                Ok(v) => return Some(v),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        },
        None => std::future::pending().await,
    }
}

type Writer = fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<TokioIo<Upgraded>>>;

async fn send_json(write: &mut Writer, value: &Value, metrics: &Metrics) -> bool {
    let bytes = value.to_string().into_bytes();
    metrics.frames_sent.fetch_add(1, Relaxed);
    write.write_frame(Frame::text(Payload::Owned(bytes))).await.is_ok()
}

async fn write_loop(mut write: Writer, mut rx: mpsc::Receiver<Out>, metrics: Arc<Metrics>) {
    let mut wake: Option<Wakeups> = None;
    let mut pull: Option<Box<dyn FnMut() -> Vec<Value> + Send>> = None;
    let mut signals: Option<broadcast::Receiver<Value>> = None;
    let mut min_interval: Option<Duration> = None;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    loop {
        tokio::select! {
            biased;
            out = rx.recv() => match out {
                Some(Out::Json(value)) => {
                    if !send_json(&mut write, &value, &metrics).await { return; }
                }
                Some(Out::Follow(mut f)) => {
                    f.wake.mark_changed();
                    wake = Some(f.wake);
                    pull = Some(f.pull);
                    signals = f.signals;
                    min_interval = f.min_interval;
                }
                Some(Out::Close(code, reason)) => {
                    let _ = write.write_frame(Frame::close(code, reason.as_bytes())).await;
                    return;
                }
                Some(Out::Control(opcode, payload)) => {
                    let frame = Frame::new(true, opcode, None, Payload::Owned(payload));
                    let closing = opcode == OpCode::Close;
                    if write.write_frame(frame).await.is_err() || closing { return; }
                }
                None => {
                    let _ = write.write_frame(Frame::close(close::NORMAL, b"")).await;
                    return;
                }
            },
            alive = wait_wake(&mut wake) => {
                if !alive {
                    // The stream's sender went away (node shutting down): say so and stop.
                    let _ = write.write_frame(Frame::close(close::GOING_AWAY, b"stream ended")).await;
                    return;
                }
                if let Some(pull) = pull.as_mut() {
                    for frame in pull() {
                        if !send_json(&mut write, &frame, &metrics).await { return; }
                    }
                }
                if let Some(pause) = min_interval {
                    tokio::time::sleep(pause).await;
                }
            }
            signal = wait_signal(&mut signals) => {
                match signal {
                    Some(value) => { if !send_json(&mut write, &value, &metrics).await { return; } }
                    None => signals = None,
                }
            }
            _ = keepalive.tick() => {
                if write.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Owned(Vec::new()))).await.is_err() {
                    return;
                }
            }
        }
    }
}
