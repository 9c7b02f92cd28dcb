//! Switchboard's edge: two listeners, WebSocket sessions, REST, auth and metrics.
//!
//! - *Public* ([`public_router`]): the web chat page and the client WebSocket. Nothing
//!   administrative is reachable from it.
//! - *Private* ([`private_router`]): the operator WebSocket, REST for staff, health,
//!   metrics and the OpenAPI document.
//!
//! Architecture invariant: the gateway keeps no durable state. Every change is a
//! command committed by the [`Backend`]; every frame a socket receives is rendered from
//! committed state with its stream's sequence number, so a client can reconnect to any
//! gateway and resume.

mod assets;
pub mod attachments;
pub mod auth;
pub mod client;
mod client_ws;
pub mod frames;
pub mod metrics;
mod operator_ws;
mod rest;
mod supervisor_ws;
pub mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use switchboard_actors::core::Reply;
use switchboard_actors::model::{Command, ConversationId, OperatorId};
use switchboard_actors::shard::{Shard, StreamKey, Wakeups};
use tokio::sync::broadcast;

pub use auth::{Subject, TokenKey};
pub use ws::Limits;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the gateway needs from the node that owns the actors: commit commands, read
/// committed state, and be woken when a stream advances.
pub trait Backend: Send + Sync + 'static {
    fn submit(&self, command: Command) -> BoxFuture<Result<Reply, switchboard_actors::Error>>;
    fn shard(&self) -> Arc<Shard>;
    fn subscribe(&self, key: StreamKey) -> BoxFuture<Result<Wakeups, switchboard_actors::Error>>;
    /// Whether this node can serve writes now (it leads its groups).
    fn ready(&self) -> bool;
    /// Node-level metrics in Prometheus text format.
    fn metrics(&self) -> String;
    /// Chaos drill: make the actor of a stream panic so its supervisor restarts it.
    /// Resolves to whether an actor was running for the stream.
    fn crash_actor(&self, key: StreamKey) -> BoxFuture<Result<bool, switchboard_actors::Error>>;
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("too many requests")]
    RateLimited,
    #[error("the file is larger than {0} bytes")]
    TooLarge(usize),
    #[error("files of type {0} are not accepted")]
    UnsupportedType(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error(transparent)]
    Core(#[from] switchboard_actors::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl GatewayError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            GatewayError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            GatewayError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            GatewayError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            GatewayError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            GatewayError::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            GatewayError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            GatewayError::UnsupportedType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_type"),
            GatewayError::Config(_) | GatewayError::Internal(_) | GatewayError::Io(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            GatewayError::Core(e) => {
                let status = match e {
                    switchboard_actors::Error::NotFound(_) => StatusCode::NOT_FOUND,
                    switchboard_actors::Error::Commit(_) | switchboard_actors::Error::Actor(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::CONFLICT,
                };
                (status, e.code())
            }
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        (status, Json(json!({"code": code, "message": self.to_string()}))).into_response()
    }
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Origins allowed to open the client WebSocket (`*` allows any).
    pub client_origins: Vec<String>,
    /// Origins allowed to open the operator WebSocket from a browser.
    pub staff_origins: Vec<String>,
    pub client_limits: Limits,
    pub operator_limits: Limits,
    /// The channel web chat conversations start on.
    pub web_channel: String,
    /// Conversations one client address may start per minute (a burst of as many is
    /// allowed). Behind a proxy every visitor shares its address: raise it there.
    pub starts_per_minute: u32,
    /// Serve the chaos drill endpoint (`POST /api/chaos/crash-actor`). Off on production
    /// nodes unless asked for: a panic button is not a default.
    pub chaos_drills: bool,
}

/// Token buckets per client address, for conversation starts.
#[derive(Default)]
pub struct StartLimiter {
    buckets: Mutex<HashMap<std::net::IpAddr, (f64, Instant)>>,
}

/// Addresses tracked at most; beyond it, full buckets are forgotten first.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

impl StartLimiter {
    pub fn allow(&self, ip: std::net::IpAddr, per_minute: u32) -> bool {
        let capacity = per_minute.max(1) as f64;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED_ADDRESSES && !buckets.contains_key(&ip) {
            buckets.retain(|_, (tokens, since)| *tokens + since.elapsed().as_secs_f64() * capacity / 60.0 < capacity);
            if buckets.len() >= MAX_TRACKED_ADDRESSES {
                return false;
            }
        }
        let (tokens, since) = buckets.entry(ip).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*since).as_secs_f64() * capacity / 60.0).min(capacity);
        *since = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Ephemeral signals (typing) that are not committed: lost on a reconnect by design.
#[derive(Default)]
pub struct Signals {
    conversations: Mutex<HashMap<ConversationId, broadcast::Sender<Value>>>,
    operators: Mutex<HashMap<OperatorId, broadcast::Sender<Value>>>,
}

impl Signals {
    pub fn conversation(&self, id: ConversationId) -> broadcast::Receiver<Value> {
        let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id).or_insert_with(|| broadcast::channel(8).0).subscribe()
    }

    pub fn operator(&self, id: &OperatorId) -> broadcast::Receiver<Value> {
        let mut map = self.operators.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.clone()).or_insert_with(|| broadcast::channel(32).0).subscribe()
    }

    pub fn to_conversation(&self, id: ConversationId, signal: Value) {
        if let Some(tx) = self.conversations.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            let _ = tx.send(signal);
        }
    }

    pub fn to_operator(&self, id: &OperatorId, signal: Value) {
        if let Some(tx) = self.operators.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            let _ = tx.send(signal);
        }
    }

    /// Drops a conversation's channel once nobody listens to it.
    pub fn release_conversation(&self, id: ConversationId) {
        let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&id);
        }
    }

    /// Drops an operator's channel once nobody listens to it.
    pub fn release_operator(&self, id: &OperatorId) {
        let mut map = self.operators.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(id);
        }
    }
}

pub struct Gateway {
    pub backend: Arc<dyn Backend>,
    pub tokens: TokenKey,
    pub metrics: Arc<metrics::Metrics>,
    pub throttle: auth::LoginThrottle,
    pub signals: Signals,
    pub blobs: attachments::BlobStore,
    pub config: GatewayConfig,
    pub starts: StartLimiter,
    /// Password hashing is deliberately expensive (CPU and 19 MiB each): at most this
    /// many run at once, so a login flood queues instead of exhausting memory.
    password_work: tokio::sync::Semaphore,
}

impl Gateway {
    pub fn new(backend: Arc<dyn Backend>, tokens: TokenKey, blobs: attachments::BlobStore, config: GatewayConfig) -> Arc<Self> {
        Arc::new(Gateway {
            backend,
            tokens,
            metrics: Arc::new(metrics::Metrics::default()),
            throttle: auth::LoginThrottle::default(),
            signals: Signals::default(),
            blobs,
            config,
            starts: StartLimiter::default(),
            password_work: tokio::sync::Semaphore::new(2),
        })
    }

    /// Runs argon2 work on the blocking pool, a bounded number at a time.
    pub async fn password_work<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, GatewayError> {
        let _permit = self.password_work.acquire().await.map_err(|e| GatewayError::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(work).await.map_err(|e| GatewayError::Internal(e.to_string()))
    }

    /// Whether a signed staff token still speaks for its user: the login exists with the
    /// role and operator the token names. A demoted or deleted user's older tokens stop
    /// working at once instead of at expiry.
    pub(crate) fn staff_current(&self, login: &str, role: switchboard_actors::model::Role, operator: Option<&OperatorId>) -> bool {
        let shard = self.backend.shard();
        let state = shard.read();
        state.users.get(login).is_some_and(|u| u.role == role && u.operator.as_ref() == operator)
    }

    /// A relayed read mark as the core records it: never past the newest entry.
    pub(crate) fn read_mark(&self, conversation: ConversationId, upto: u64) -> u64 {
        let shard = self.backend.shard();
        let state = shard.read();
        state.conversations.get(&conversation).map_or(0, |c| upto.min(c.last_seq()))
    }

    /// Commits a command, counting and timing it.
    pub async fn submit(&self, command: Command) -> Result<Reply, switchboard_actors::Error> {
        let started = Instant::now();
        // Refuse what the core would refuse, and answer repeated keys, before writing to
        // the log: bad input must not cost a replicated, flushed entry.
        let early = {
            let shard = self.backend.shard();
            let state = shard.read();
            switchboard_actors::core::precheck(&state, &command, switchboard_actors::actors::now_ms())
        };
        let result = match early {
            Ok(None) => self.backend.submit(command).await,
            Ok(Some(reply)) => Ok(reply),
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => {
                self.metrics.commands_committed.fetch_add(1, Relaxed);
                self.metrics.commit_latency.observe(started.elapsed());
            }
            Err(_) => {
                self.metrics.commands_rejected.fetch_add(1, Relaxed);
            }
        }
        result
    }
}

/// Checks a browser's Origin header against an allow-list. Requests without an Origin
/// come from non-browser clients, which authenticate by other means.
pub(crate) fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    match headers.get(axum::http::header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)),
    }
}

async fn healthz(axum::extract::State(gw): axum::extract::State<Arc<Gateway>>) -> Response {
    if gw.backend.ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready"}))).into_response()
    }
}

/// The public surface: web chat page and client WebSocket.
pub fn public_router(gw: Arc<Gateway>) -> Router {
    let files = Router::new()
        .route(
            "/attachments",
            axum::routing::post(attachments::client_upload)
                .layer(axum::extract::DefaultBodyLimit::max(attachments::MAX_ATTACHMENT_BYTES + 1)),
        )
        .route("/attachments/{id}", get(attachments::client_download))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), attachments::cors));
    assets::public()
        .route("/ws/client", get(client_ws::upgrade))
        .merge(files)
        .route("/healthz", get(healthz))
        .with_state(gw)
}

/// The private surface: operators, supervisors, admins and monitoring.
pub fn private_router(gw: Arc<Gateway>) -> Router {
    rest::routes()
        .merge(assets::private())
        .route("/ws/operator", get(operator_ws::upgrade))
        .route("/ws/supervisor", get(supervisor_ws::upgrade))
        .route("/healthz", get(healthz))
        .with_state(gw)
}
