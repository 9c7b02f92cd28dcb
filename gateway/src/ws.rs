//! The socket plumbing both WebSocket surfaces share: a reader that enforces frame
//! size and rate limits and hands text to a [`Session`], and a writer that owns the
//! outgoing half, follows a committed stream and forwards ephemeral signals.
//!
//! The writer pulls from committed state each time a stream wakes it, starting after
//! the last sequence number it sent: a lost or coalesced wake-up can delay a frame but
//! never drop or repeat one. It pulls a page at a time and only once the previous page
//! is written, so a peer that stops reading costs one page, not the history.
//!
//! What a socket may cost is bounded on both sides: inbound, [`crate::wire`] holds at
//! most one message's bytes and every frame (control frames too) costs a rate-limit
//! token; outbound, the queue to the writer is bounded, a write that makes no progress
//! is cut by the listener's write timeout, and a peer silent for two ping intervals is
//! closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use switchboard_actors::shard::Wakeups;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

use crate::frames;
use crate::metrics::Metrics;
use crate::wire::{self, Inbound};

/// Close codes used by both surfaces (documented in `docs/protocol.md`).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    /// What the peer's frames did wrong: 1002, 1007, 1009, decided by the decoder.
    pub use crate::wire::{INVALID_PAYLOAD, PROTOCOL_ERROR, TOO_BIG};
    pub const INTERNAL: u16 = 1011;
    /// A standalone gateway found no member to carry the socket on: reconnect and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const RATE_LIMITED: u16 = 4008;
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest WebSocket message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Sustained inbound frames per second (data and control frames alike).
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
    /// A text frame already rendered (what a gateway relays as it came).
    Text(String),
    /// A text frame whose bytes hold room in a budget until the writer takes it
    /// ([`Outbox::text_within`]).
    Counted(String, tokio::sync::OwnedSemaphorePermit),
    /// Start following a committed stream (replacing any earlier one). Boxed: every
    /// slot of a socket's outbox is as large as its largest variant.
    Follow(Box<Follow>),
    /// Send a close frame and stop.
    Close(u16, String),
    /// Answer the peer's close frame (with its code, if it gave one) and stop.
    CloseEcho(Option<u16>),
    /// Answer a ping.
    Pong(Vec<u8>),
}

/// A committed stream to follow: woken by `wake`, read by `pull`.
pub struct Follow {
    pub wake: Wakeups,
    /// Frames committed since the last call, in order.
    pub pull: Box<dyn Pull>,
    /// Ephemeral signals (typing) that are forwarded as they come.
    pub signals: Option<broadcast::Receiver<Value>>,
    /// Pause after each pull, so bursts of wake-ups coalesce into one frame.
    pub min_interval: Option<Duration>,
    /// Whether `pull` returns a page of what is new (empty once caught up), so the
    /// writer pulls again after each non-empty page; `false` for a pull that renders a
    /// whole view every time.
    pub paged: bool,
    /// A frame written as the follow takes over, before any page of it and after every
    /// page of the stream it replaces (a `started` or `resumed` on a socket that
    /// followed another conversation).
    pub first: Option<Value>,
}

/// What a socket's writer awaits each time its stream wakes it: the frames committed
/// since the last call, in order. A page may be read from another node (ADR 0012), so
/// the read is a future; a closure that renders at once is a `Pull` too.
pub trait Pull: Send {
    fn pull(&mut self) -> Pin<Box<dyn Future<Output = Vec<Value>> + Send + '_>>;
    /// Whether the last pull stopped at a read that failed (a holder on another node
    /// did not answer): the writer pulls again after [`PULL_RETRY`] without a wake-up.
    fn retry(&self) -> bool {
        false
    }
    /// When what the last pull returned changes by itself, with no entry applied (a
    /// waiting conversation crossing its group's SLA): the writer pulls again then.
    fn changes_at(&self) -> Option<tokio::time::Instant> {
        None
    }
}

/// How long a writer waits before it pulls again after a failed read; twice as long
/// after each further one in a row, up to [`PULL_RETRY_MAX`].
pub const PULL_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between pulls that keep failing (a shard nobody can read for
/// minutes costs each socket following it one read every 4 s).
pub const PULL_RETRY_MAX: Duration = Duration::from_secs(4);

/// The wait before the next pull after `failed` failed pulls in a row (1 or more).
pub fn pull_retry_after(failed: u32) -> Duration {
    PULL_RETRY.saturating_mul(1u32 << failed.saturating_sub(1).min(8)).min(PULL_RETRY_MAX)
}

impl<F: FnMut() -> Vec<Value> + Send> Pull for F {
    fn pull(&mut self) -> Pin<Box<dyn Future<Output = Vec<Value>> + Send + '_>> {
        Box::pin(std::future::ready(self()))
    }
}

/// The sending side handed to sessions.
#[derive(Clone)]
pub struct Outbox(mpsc::Sender<Out>, Arc<AtomicBool>);

/// While a session waits for the answer to a command it submitted (see
/// [`Outbox::answer_coming`]), a wake-up of its stream holds its page for up to this
/// long, so that the answer and the page go out in one write. When the stream is read
/// on this node, the apply that wakes it comes just before the answer (a member answers
/// a forwarded command only once it applied it too), so both usually meet within a
/// fraction of a millisecond; when the answer comes first (a stream read from another
/// node) nothing is held, and what holds longer goes out alone.
const ANSWER_HOLD: Duration = Duration::from_millis(5);

/// Held by a session while the answer to its command is on its way; dropped once the
/// answer is queued, or when the command failed (its error frame is queued just after).
/// A session holds one at a time: it handles its frames one by one.
pub struct AnswerComing(Arc<AtomicBool>);

impl Drop for AnswerComing {
    fn drop(&mut self) {
        self.0.store(false, Relaxed);
    }
}

impl Outbox {
    pub async fn json(&self, value: Value) {
        let _ = self.0.send(Out::Json(value)).await;
    }

    /// Says that the session submitted a command whose answer it will queue before it
    /// drops the guard: the stream's page that the command's apply wakes waits for that
    /// answer (at most [`ANSWER_HOLD`]) and goes out in the same write. One syscall and
    /// one TCP segment instead of two for the ack of a message and the message itself.
    pub fn answer_coming(&self) -> AnswerComing {
        self.1.store(true, Relaxed);
        AnswerComing(self.1.clone())
    }

    pub async fn error(&self, code: &str, message: &str, reference: Option<&Value>) {
        self.json(frames::error(code, message, reference)).await;
    }

    pub async fn text(&self, text: String) {
        let _ = self.0.send(Out::Text(text)).await;
    }

    /// Queues a text frame whose bytes hold room in `budget` (a semaphore of bytes)
    /// until the writer has taken it: waits while the frames queued before hold it all.
    /// A frame larger than the whole budget takes all of it.
    pub async fn text_within(&self, text: String, budget: &Arc<tokio::sync::Semaphore>, total: usize) {
        let bytes = text.len().clamp(1, total.max(1)).min(u32::MAX as usize) as u32;
        let Ok(permit) = budget.clone().acquire_many_owned(bytes).await else { return };
        let _ = self.0.send(Out::Counted(text, permit)).await;
    }

    /// Closes the socket with `code` once what is queued before has been written.
    pub async fn close(&self, code: u16, reason: &str) {
        let _ = self.0.send(Out::Close(code, reason.to_owned())).await;
    }

    /// Whether the socket's writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    pub async fn follow(&self, follow: Follow) {
        let _ = self.0.send(Out::Follow(Box::new(follow))).await;
    }
}

/// Which socket surface a session belongs to, for limits and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    Client,
    Operator,
    Supervisor,
}

/// For a staff surface, before [`admit`]: a node whose copy of the directory is not
/// known current ([`crate::Gateway::staff_in_touch`]) answers 503 rather than check a
/// token against it.
pub(crate) async fn staff_in_touch(gw: &crate::Gateway, headers: &axum::http::HeaderMap, token: Option<&str>) -> Result<(), axum::response::Response> {
    use axum::response::IntoResponse;
    // A browser's Origin is refused by `admit` at once, never after a barrier.
    let staff = crate::origin_allowed(headers, &gw.config.staff_origins) && token.is_some_and(|t| matches!(gw.tokens.verify(t), Ok(crate::Subject::Staff { .. })));
    if staff && !gw.staff_in_touch().await {
        return Err((axum::http::StatusCode::SERVICE_UNAVAILABLE, crate::rest::OUT_OF_TOUCH).into_response());
    }
    Ok(())
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
        Some(Ok(crate::Subject::Staff { login, role, operator, epoch })) if !gw.staff_current(&login, role, operator.as_ref(), epoch) => {
            refuse(StatusCode::UNAUTHORIZED, "this login's sessions ended or its role changed; log in again")
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
    pub epoch: u64,
    /// When the token the socket was opened with expires (Unix seconds): the socket
    /// acts on nothing after it, as REST takes nothing with it.
    pub expires: u64,
}

impl StaffLogin {
    /// The login a verified staff token names, with the token's expiry.
    pub(crate) fn of(gw: &crate::Gateway, token: Option<&str>, login: String, role: switchboard_actors::model::Role, operator: Option<switchboard_actors::model::OperatorId>, epoch: u64) -> StaffLogin {
        let expires = token.and_then(|t| gw.tokens.verify_with_expiry(t).ok()).map_or(0, |(_, exp)| exp);
        StaffLogin { login, role, operator, epoch, expires }
    }
}

/// How often an open staff socket re-checks its login.
const LOGIN_RECHECK: Duration = Duration::from_secs(2);

/// Marks a request a gateway relayed to this node (set by [`crate::relay`]): the
/// gateway has already held the socket to its limits, so the node allows twice the rate
/// (jitter on the way must not make it refuse what the gateway let through).
#[derive(Clone, Copy, Debug)]
pub struct Relayed;

/// The least burst of frames a relayed socket is allowed: more than a gateway keeps for
/// a re-pin (256 requests) with the resume and pings it sends with them.
const RELAYED_MIN_BURST: f64 = 300.0;
/// Room over the client's message size for what a gateway stamps on a relayed frame (a
/// start's key, an accept's arrival time).
pub(crate) const RELAYED_STAMP_BYTES: usize = 256;

/// Completes the upgrade and runs `session` on the socket in its own task.
pub(crate) fn accept<S: Session>(
    gw: Arc<crate::Gateway>,
    upgrade: fastwebsockets::upgrade::IncomingUpgrade,
    surface: Surface,
    staff: Option<StaffLogin>,
    relayed: bool,
    session: S,
) -> axum::response::Response {
    let mut limits = match surface {
        Surface::Client => gw.config.client_limits,
        Surface::Operator | Surface::Supervisor => gw.config.operator_limits,
    };
    // A gateway enforces the client's own limits before it relays; the member's give it
    // room for jitter, for the frames it sends again at once after a re-pin (every
    // request it keeps, a resume and the pings it replays), and for the key or time it
    // stamps on a frame.
    if relayed {
        limits.frames_per_second *= 2.0;
        limits.burst = (limits.burst * 2.0).max(RELAYED_MIN_BURST);
        limits.max_message_bytes += RELAYED_STAMP_BYTES;
    }
    let guard: Option<Guard> = staff.map(|s| {
        let gw = gw.clone();
        Arc::new(move || {
            if crate::auth::unix_now() > s.expires {
                Some(Ended::TokenExpired)
            } else if !gw.staff_current(&s.login, s.role, s.operator.as_ref(), s.epoch) {
                Some(Ended::LoginChanged)
            } else {
                None
            }
        }) as Guard
    });
    accept_with(
        upgrade,
        gw.metrics.clone(),
        surface,
        limits,
        gw.config.ping_interval,
        guard,
        session,
    )
}

/// Completes the upgrade and runs `session` under `limits` in its own task (what a
/// standalone gateway uses too, with no node behind it in the process).
pub(crate) fn accept_with<S: Session>(
    upgrade: fastwebsockets::upgrade::IncomingUpgrade,
    metrics: Arc<Metrics>,
    surface: Surface,
    limits: Limits,
    ping_interval: Duration,
    guard: Option<Guard>,
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
        let (opened, active) = match surface {
            Surface::Client => (&metrics.client_sessions_opened, &metrics.client_sessions_active),
            Surface::Operator | Surface::Supervisor => (&metrics.operator_sessions_opened, &metrics.operator_sessions_active),
        };
        opened.fetch_add(1, Relaxed);
        active.fetch_add(1, Relaxed);
        drive(ws.into_inner(), session, limits, ping_interval, metrics.clone(), guard).await;
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
    /// Called once when the socket's reader has stopped, before waiting for the writer:
    /// a session that hands the outbox to a task of its own lets that task go here.
    fn on_reader_end(&mut self) {}
    /// Called once after the socket and its writer have stopped.
    fn on_end(&mut self) {}
}

/// Frames queued for one socket's writer; past it the session waits for the socket.
const OUTBOX_DEPTH: usize = 64;
/// Events rendered per pull: the next page is rendered once this one is written.
pub(crate) const PAGE: usize = 64;
/// Message text rendered per pull of a conversation's history, about (a page holds at
/// least one entry).
pub(crate) const PAGE_TEXT_BYTES: usize = 64 * 1024;
/// How long the server waits for the peer's close frame after closing on its own.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes read from the socket at a time while a message is coming in.
const READ_CHUNK: usize = 8 * 1024;
/// Room for the next read while no partial frame is buffered: most frames are small,
/// and an idle socket (most of them) holds this much, not `READ_CHUNK`.
const IDLE_READ: usize = 512;

/// Makes room for the next read: a little while idle (giving back what a large message
/// left behind), a chunk while a frame is incomplete.
pub(crate) fn room_to_read(buf: &mut BytesMut) {
    if buf.is_empty() {
        if buf.capacity() > IDLE_READ {
            *buf = BytesMut::with_capacity(IDLE_READ);
        } else {
            buf.reserve(IDLE_READ);
        }
    } else {
        buf.reserve(READ_CHUNK);
    }
}

/// Whether the socket's login still holds; `false` closes it with 4001.
pub type Guard = Arc<dyn Fn() -> Option<Ended> + Send + Sync>;

/// Why a staff socket may act no more.
#[derive(Clone, Copy, Debug)]
pub enum Ended {
    /// Its login's sessions ended, or its role or operator changed.
    LoginChanged,
    /// The token it was opened with expired.
    TokenExpired,
}

/// Tells the peer why, then closes with 4001.
async fn refuse_changed_login(outbox: &Outbox, ended: Ended) {
    let (message, reason) = match ended {
        Ended::LoginChanged => ("this login's sessions ended or its role changed; log in again", "login changed"),
        Ended::TokenExpired => ("this socket's token expired; log in again", "token expired"),
    };
    outbox.error("unauthorized", message, None).await;
    let _ = outbox.0.send(Out::Close(close::UNAUTHORIZED, reason.into())).await;
}

/// Closes the socket once its guard fails, checking every `LOGIN_RECHECK`.
fn watch_guard(guard: Guard, outbox: Outbox) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LOGIN_RECHECK).await;
            if outbox.0.is_closed() {
                return;
            }
            if let Some(ended) = guard() {
                refuse_changed_login(&outbox, ended).await;
                return;
            }
        }
    })
}

/// How a socket's read loop ended.
enum End {
    /// The peer's close frame was echoed: the handshake is complete.
    Handshake,
    /// We sent a close frame; `readable` says whether what follows can still be parsed.
    Closed { readable: bool },
    /// The connection is gone (EOF, reset, or the writer failed).
    Gone,
}

/// Runs a socket until either side closes it.
pub async fn drive<S: Session>(io: TokioIo<Upgraded>, mut session: S, limits: Limits, ping_interval: Duration, metrics: Arc<Metrics>, guard: Option<Guard>) {
    let (mut read, write) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
    let answer_coming = Arc::new(AtomicBool::new(false));
    let mut writer = tokio::spawn(write_loop(write, rx, answer_coming.clone(), metrics.clone(), ping_interval));
    let mut writer_done = false;
    let outbox = Outbox(tx, answer_coming);
    let watcher = guard.clone().map(|g| watch_guard(g, outbox.clone()));
    let mut limiter = RateLimiter::new(limits);
    let mut decoder = wire::Decoder::new(limits.max_message_bytes);
    let mut buf = BytesMut::with_capacity(IDLE_READ);
    // A peer that answers no ping for two intervals is gone, whatever TCP thinks.
    let silence = ping_interval * 2;
    let mut last_heard = tokio::time::Instant::now();
    let close_with = |code: u16, reason: &str| Out::Close(code, reason.to_owned());
    let end = if let Flow::Close(code, reason) = session.on_start(&outbox).await {
        let _ = outbox.0.send(Out::Close(code, reason)).await;
        End::Closed { readable: true }
    } else {
        loop {
            let event = match decoder.decode(&mut buf) {
                Ok(Some(event)) => event,
                Ok(None) => {
                    room_to_read(&mut buf);
                    tokio::select! {
                        read = read.read_buf(&mut buf) => match read {
                            Ok(0) | Err(_) => break End::Gone,
                            Ok(_) => continue,
                        },
                        _ = &mut writer => {
                            writer_done = true;
                            break End::Gone;
                        }
                        _ = tokio::time::sleep_until(last_heard + silence) => {
                            let _ = outbox.0.send(close_with(close::GOING_AWAY, "ping timeout")).await;
                            break End::Closed { readable: true };
                        }
                    }
                }
                Err(violation) => {
                    metrics.error_frames.fetch_add(1, Relaxed);
                    let _ = outbox.0.send(close_with(violation.code, violation.reason)).await;
                    break End::Closed { readable: false };
                }
            };
            last_heard = tokio::time::Instant::now();
            // Every frame, control frames included, costs a token.
            if !matches!(event, Inbound::Close(..)) && !limiter.allow() {
                metrics.rate_limited.fetch_add(1, Relaxed);
                if limiter.refused_in_row >= limits.max_refused_in_row {
                    let _ = outbox.0.send(close_with(close::RATE_LIMITED, "rate limit exceeded")).await;
                    break End::Closed { readable: true };
                }
                if matches!(event, Inbound::Text(_) | Inbound::Binary(_)) {
                    metrics.error_frames.fetch_add(1, Relaxed);
                    outbox.error("rate_limited", "too many frames; this one was not processed", None).await;
                }
                continue;
            }
            match event {
                Inbound::Text(text) => {
                    metrics.frames_received.fetch_add(1, Relaxed);
                    // A frame that arrives after the login changed is not acted on.
                    if let Some(ended) = guard.as_ref().and_then(|g| g()) {
                        refuse_changed_login(&outbox, ended).await;
                        break End::Closed { readable: true };
                    }
                    if let Flow::Close(code, reason) = session.on_text(&text, &outbox).await {
                        let _ = outbox.0.send(Out::Close(code, reason)).await;
                        break End::Closed { readable: true };
                    }
                }
                Inbound::Binary(_) => {
                    metrics.error_frames.fetch_add(1, Relaxed);
                    outbox.error("unsupported", "binary frames are not part of the protocol; send JSON text", None).await;
                }
                Inbound::Ping(payload) => {
                    let _ = outbox.0.send(Out::Pong(payload)).await;
                }
                Inbound::Pong => {}
                Inbound::Close(code, _) => {
                    let _ = outbox.0.send(Out::CloseEcho(code)).await;
                    break End::Handshake;
                }
            }
        }
    };
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    session.on_reader_end();
    drop(outbox);
    if !writer_done {
        let _ = writer.await;
    }
    if let End::Closed { readable } = end {
        // Wait briefly for the peer's close frame, discarding what it still sends, so
        // ours is read before the socket goes away (closing with unread input resets
        // the connection and can destroy the close frame in flight). Input that cannot
        // be parsed any more (the rest of an oversized frame) is only discarded.
        let drain = async {
            loop {
                if readable {
                    match decoder.decode(&mut buf) {
                        Ok(Some(Inbound::Close(..))) => return,
                        Ok(Some(_)) => continue,
                        Ok(None) => {}
                        Err(_) => return,
                    }
                } else {
                    buf.clear();
                }
                buf.reserve(READ_CHUNK);
                if !matches!(read.read_buf(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
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

type Writer = tokio::io::WriteHalf<TokioIo<Upgraded>>;

/// Writes one frame. A write that makes no progress is ended by the connection's
/// write timeout (the listener's guard), so this never waits forever.
async fn send_frame(write: &mut Writer, bytes: &[u8]) -> bool {
    write.write_all(bytes).await.is_ok()
}

async fn send_json(write: &mut Writer, value: &Value, metrics: &Metrics) -> bool {
    let mut frames = Vec::new();
    push_json(&mut frames, value, metrics);
    send_frame(write, &frames).await
}

/// How many bytes of frames already queued for a socket go out in one write. Frames
/// written together cost one system call and, on a loaded node, one TCP segment
/// instead of one each; the socket's own outbox bounds what can wait there.
const BATCH_BYTES: usize = 64 * 1024;

/// Appends `value` as one text frame to the frames about to be written.
fn push_json(frames: &mut Vec<u8>, value: &Value, metrics: &Metrics) {
    metrics.frames_sent.fetch_add(1, Relaxed);
    wire::encode_json_into(frames, value);
}

/// Encodes an item that is only written (a JSON or text frame, a pong) into `frames`;
/// any other item (a follow, a close) is handed back.
fn push_plain(frames: &mut Vec<u8>, out: Out, metrics: &Metrics) -> Result<(), Out> {
    match out {
        Out::Json(value) => push_json(frames, &value, metrics),
        Out::Text(text) => {
            metrics.frames_sent.fetch_add(1, Relaxed);
            wire::encode_into(frames, wire::ServerOp::Text, text.as_bytes());
        }
        // Its room goes back once it is in the batch being written.
        Out::Counted(text, _room) => {
            metrics.frames_sent.fetch_add(1, Relaxed);
            wire::encode_into(frames, wire::ServerOp::Text, text.as_bytes());
        }
        Out::Pong(payload) => wire::encode_into(frames, wire::ServerOp::Pong, &payload),
        other => return Err(other),
    }
    Ok(())
}

/// Sends a close frame and ends our side of the TCP connection at once.
async fn send_close(write: &mut Writer, frame: Vec<u8>) {
    if send_frame(write, &frame).await {
        let _ = write.shutdown().await;
    }
}

async fn write_loop(mut write: Writer, mut rx: mpsc::Receiver<Out>, answer_coming: Arc<AtomicBool>, metrics: Arc<Metrics>, ping_interval: Duration) {
    let mut wake: Option<Wakeups> = None;
    let mut pull: Option<Box<dyn Pull>> = None;
    let mut signals: Option<broadcast::Receiver<Value>> = None;
    let mut min_interval: Option<Duration> = None;
    let mut paged = false;
    // When to pull again after a pull whose read failed.
    let mut retry_at: Option<tokio::time::Instant> = None;
    // Failed pulls in a row (reset by one that reads).
    let mut failed_pulls: u32 = 0;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    // What a wake-up took from the queue and could not write with its page (a follow or
    // a close): handled before anything else is read from the queue.
    let mut stash: Option<Out> = None;
    // Whether the next wake-up is the writer's own (a new follow, the next page, a
    // retry): such a wake-up never holds for an answer.
    let mut own_wake = false;
    loop {
        tokio::select! {
            biased;
            out = async { match stash.take() { Some(out) => Some(out), None => rx.recv().await } } => {
                let Some(out) = out else {
                    send_close(&mut write, wire::encode_close(close::NORMAL, "")).await;
                    return;
                };
                // This one and whatever else is already queued, up to `BATCH_BYTES`,
                // in order and in one write.
                let mut frames = Vec::new();
                let mut next = Some(out);
                while let Some(out) = next.take() {
                    match push_plain(&mut frames, out, &metrics) {
                        Ok(()) => {}
                        // Written by `push_plain`.
                        Err(Out::Json(_) | Out::Text(_) | Out::Counted(..) | Out::Pong(_)) => {}
                        Err(Out::Follow(f)) => {
                            let mut f = *f;
                            if let Some(first) = f.first.take() {
                                push_json(&mut frames, &first, &metrics);
                            }
                            f.wake.mark_changed();
                            own_wake = true;
                            wake = Some(f.wake);
                            pull = Some(f.pull);
                            signals = f.signals;
                            min_interval = f.min_interval;
                            paged = f.paged;
                        }
                        Err(Out::Close(code, reason)) => {
                            frames.extend_from_slice(&wire::encode_close(code, &reason));
                            send_close(&mut write, frames).await;
                            return;
                        }
                        Err(Out::CloseEcho(code)) => {
                            match code {
                                Some(code) => frames.extend_from_slice(&wire::encode_close(code, "")),
                                None => wire::encode_into(&mut frames, wire::ServerOp::Close, &[]),
                            }
                            send_close(&mut write, frames).await;
                            return;
                        }
                    }
                    if frames.len() < BATCH_BYTES {
                        next = rx.try_recv().ok();
                    }
                }
                if !frames.is_empty() && !send_frame(&mut write, &frames).await { return; }
            }
            alive = wait_wake(&mut wake) => {
                if !alive {
                    // The stream's sender went away (node shutting down): say so and stop.
                    send_close(&mut write, wire::encode_close(close::GOING_AWAY, "stream ended")).await;
                    return;
                }
                if let (Some(pull), Some(wake)) = (pull.as_mut(), wake.as_mut()) {
                    let frames = pull.pull().await;
                    if pull.retry() {
                        failed_pulls = failed_pulls.saturating_add(1);
                        retry_at = Some(tokio::time::Instant::now() + pull_retry_after(failed_pulls));
                    } else {
                        failed_pulls = 0;
                    }
                    if let Some(at) = pull.changes_at() {
                        retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                    }
                    // More may be waiting: pull again once this page is written, so a
                    // socket that does not read holds one page, not the history.
                    let own = std::mem::take(&mut own_wake);
                    if paged && !frames.is_empty() {
                        wake.mark_changed();
                        own_wake = true;
                    }
                    // A page goes out in one write.
                    let mut page = Vec::new();
                    for frame in &frames {
                        push_json(&mut page, frame, &metrics);
                    }
                    // The answer to the session's command follows the apply that woke
                    // us: wait a moment for it (the page is ready meanwhile), and write
                    // it with the page.
                    if answer_coming.load(Relaxed) && !own && !page.is_empty() {
                        if let Ok(Some(out)) = tokio::time::timeout(ANSWER_HOLD, rx.recv()).await {
                            stash = Some(out);
                        }
                    }
                    // Frames queued before the page go first, in order, in the same
                    // write; a follow or a close stays for the queue's turn.
                    let mut bytes = Vec::new();
                    while bytes.len() < BATCH_BYTES {
                        let Some(out) = stash.take().or_else(|| rx.try_recv().ok()) else { break };
                        if let Err(other) = push_plain(&mut bytes, out, &metrics) {
                            stash = Some(other);
                            break;
                        }
                    }
                    bytes.extend_from_slice(&page);
                    if !bytes.is_empty() && !send_frame(&mut write, &bytes).await { return; }
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
            _ = async { if let Some(at) = retry_at { tokio::time::sleep_until(at).await } }, if retry_at.is_some() => {
                retry_at = None;
                if let Some(wake) = wake.as_mut() {
                    wake.mark_changed();
                    own_wake = true;
                }
            }
            _ = keepalive.tick() => {
                if !send_frame(&mut write, &wire::encode(wire::ServerOp::Ping, &[])).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_queued_within_a_budget_wait_until_the_writer_takes_the_earlier_ones() {
        let (tx, mut rx) = mpsc::channel(OUTBOX_DEPTH);
        let out = Outbox(tx, Arc::default());
        let budget = Arc::new(tokio::sync::Semaphore::new(10));
        out.text_within("123456".into(), &budget, 10).await;
        // A second frame of 6 bytes does not fit beside the first: it waits...
        let second = tokio::time::timeout(Duration::from_millis(50), out.text_within("abcdef".into(), &budget, 10)).await;
        assert!(second.is_err(), "the budget holds the second frame back");
        // ...until the writer took the first.
        let first = rx.recv().await;
        assert!(matches!(&first, Some(Out::Counted(text, _)) if text == "123456"));
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), out.text_within("abcdef".into(), &budget, 10)).await.expect("room again");
        // A frame larger than the whole budget takes all of it, and is not refused.
        drop(rx.recv().await);
        tokio::time::timeout(Duration::from_secs(5), out.text_within("x".repeat(100), &budget, 10)).await.expect("a large frame goes alone");
        assert_eq!(budget.available_permits(), 0);
        drop(rx.recv().await);
        assert_eq!(budget.available_permits(), 10);
    }
}

#[cfg(test)]
mod pull_retries {
    use std::time::Duration;

    #[test]
    fn reads_that_keep_failing_are_tried_less_and_less_often() {
        let waits: Vec<Duration> = (1..=7).map(super::pull_retry_after).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![250, 500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(super::pull_retry_after(u32::MAX), super::PULL_RETRY_MAX);
    }
}
