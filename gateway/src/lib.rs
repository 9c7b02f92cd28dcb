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
pub mod budget;
mod channels;
pub mod client;
mod client_ws;
mod desk;
pub mod identity;
pub mod frames;
pub mod listener;
pub mod metrics;
mod operator_ws;
pub mod reads;
pub mod relay;
mod rest;
mod rules;
pub mod smtp;
pub mod standalone;
mod supervisor_ws;
pub mod wire;
pub mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
pub use reads::ShardReads;
pub use ws::Limits;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the gateway needs from the node that owns the actors: commit commands, read
/// committed state, and be woken when a stream advances.
pub trait Backend: Send + Sync + 'static {
    fn submit(&self, command: Command) -> BoxFuture<Result<Reply, switchboard_actors::Error>>;
    /// The shard that answers routing reads: operators' presence and load, offers,
    /// queues, holders, KPIs (the routing shard's replica on a split node, ADR 0006).
    fn shard(&self) -> Arc<Shard>;
    /// The shard that answers directory reads (users, sessions, skill groups, channels,
    /// templates, access rules, the audit trail): the metadata group's replica on a
    /// split node, which decides every change to them, so a write is read back at once.
    fn directory_shard(&self) -> Arc<Shard> {
        self.shard()
    }
    /// The reads of the shard holding conversation `id`'s history, read marks and
    /// attachments: its conversation shard on a split node, the one shard otherwise
    /// (ADR 0012: answered by this node's replica or asked of a member).
    fn conversation_reads(&self, _id: ConversationId) -> Arc<dyn ShardReads> {
        self.shard()
    }
    /// The shard that decides `command` (its group on a split node), whose state a
    /// command is checked against before it is written to the log; `None` for a group
    /// this node does not hold (its leader checks it).
    fn shard_for(&self, _command: &Command) -> Option<Arc<Shard>> {
        Some(self.shard())
    }
    /// The feeds an operator's desk follows under protocol 2 (ADR 0010): the routing
    /// feed `r` and, on a split node, each conversation shard's `c<k>`. A node of one
    /// group has one feed holding every item.
    fn operator_feeds(&self) -> Vec<FeedSource> {
        vec![FeedSource { name: "r".into(), shard: self.shard(), kinds: FeedKinds::All }]
    }
    /// Wake-ups of stream `key` in the group of feed `feed` (a name `operator_feeds`
    /// gave).
    fn subscribe_feed(&self, _feed: &str, key: StreamKey) -> BoxFuture<Result<Wakeups, switchboard_actors::Error>> {
        self.subscribe(key)
    }
    /// Every conversation shard, for lookups that cannot name one: a visitor's other
    /// conversations, a provider's message id, dead letters, an attachment by its id.
    fn conversation_readers(&self) -> Vec<Arc<dyn ShardReads>> {
        vec![self.shard()]
    }
    fn subscribe(&self, key: StreamKey) -> BoxFuture<Result<Wakeups, switchboard_actors::Error>>;
    /// Hands an ephemeral signal (typing, a read mark, an offer's first words) to the
    /// other nodes, whose sockets of `to` may be the ones to hear it: a visitor's socket
    /// is often on another node than their operator's. Best effort, like the signal.
    fn relay_signal(&self, _to: switchboard_raft::network::SignalTo, _signal: &Value) {}
    /// Whether this node can serve now: its group has a leader (this node or another,
    /// which it forwards writes to) and it has applied what it had in its log. A split
    /// node also waits for the directory to reach its shards, and latches that once
    /// seen: ask it through [`Gateway::ready`], which checks the configuration first.
    fn ready(&self) -> bool;
    /// This node's view of the cluster (`GET /api/cluster`, `switchboard cluster status`).
    fn cluster(&self) -> serde_json::Value;
    /// Copies a file this node stored to enough other members that it survives the loss
    /// of any minority of them, before its record is committed. A node alone has
    /// nothing to do.
    /// `owner`: whose file it is, which names the conversation shard whose holders get
    /// it (ADR 0012).
    fn replicate_file(&self, blobs: attachments::BlobStore, id: switchboard_actors::model::AttachmentId, owner: attachments::FileOwner) -> BoxFuture<Result<(), String>>;
    /// Whether this node keeps copies of `owner`'s files: it holds the conversation
    /// shard they belong to (ADR 0012). A node that does not passes an upload on to
    /// the holders and serves a download from a copy fetched for it, keeping neither,
    /// so retention, which deletes files where the shard is held, leaves none behind.
    fn keeps_files_of(&self, _owner: &attachments::FileOwner) -> bool {
        true
    }
    /// Waits until this node has applied every write acknowledged anywhere before the
    /// call (one round trip to the leader): for a read that must not miss one, such as
    /// a visitor resuming on a node that lags behind the one they came from.
    fn read_barrier(&self) -> BoxFuture<Result<(), String>>;
    /// [`Backend::read_barrier`] for the directory only (users, sessions): what a login
    /// needs. On a split node, the metadata group's.
    fn directory_barrier(&self) -> BoxFuture<Result<(), String>> {
        self.read_barrier()
    }
    /// [`Backend::read_barrier`] for routing state only (offers, holders).
    fn routing_barrier(&self) -> BoxFuture<Result<(), String>> {
        self.read_barrier()
    }
    /// Waits until this node's copy of who holds each conversation ([`Backend::shard`])
    /// is current, where the core cannot check the holder itself when it commits an
    /// operator's reply: on the split, a conversation shard decides a reply against its
    /// own copy, which learns of a reassignment or transfer by a letter. One group checks
    /// at commit: nothing to wait for.
    /// `None` where the core checks the holder at commit (one group): the gateway then
    /// checks nothing itself.
    fn holder_barrier(&self) -> Option<BoxFuture<Result<(), String>>> {
        None
    }
    /// [`Backend::read_barrier`] for conversation `id`'s entries only.
    fn conversation_barrier(&self, _id: ConversationId) -> BoxFuture<Result<(), String>> {
        self.read_barrier()
    }
    /// Removes node `id` from the cluster's group (through its leader).
    fn remove_member(&self, id: u64) -> BoxFuture<Result<(), String>>;
    /// Why removing node `id` would be refused whatever the cluster's state (the node
    /// asked is the one to remove, or the only voter), before anything is recorded.
    fn removal_refused(&self, _id: u64) -> Option<String> {
        None
    }
    /// Balances where the cluster's groups vote and lead now (`switchboard cluster
    /// rebalance`); answers the steps taken. A cluster of one group has one leader and
    /// every node votes: nothing to balance.
    fn rebalance(&self) -> BoxFuture<Result<Vec<String>, String>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Looks for a file on the other members (one this node missed while it was down).
    fn fetch_file(&self, id: String) -> BoxFuture<Option<Vec<u8>>>;
    /// Node-level metrics in Prometheus text format.
    fn metrics(&self) -> String;
    /// Chaos drill: make the actor of a stream panic so its supervisor restarts it.
    /// Resolves to whether an actor was running for the stream.
    fn crash_actor(&self, key: StreamKey) -> BoxFuture<Result<bool, switchboard_actors::Error>>;
}

/// Which items of its feed a desk takes from one group (ADR 0010).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedKinds {
    /// Every item: the one feed of a node of one group.
    All,
    /// Offers, assignments, releases, presence, wrap-up, configuration: a routing shard's.
    Routing,
    /// History entries and their delivery statuses: a conversation shard's.
    Conversation,
}

impl FeedKinds {
    pub fn takes(self, item: &switchboard_actors::state::FeedItem) -> bool {
        use switchboard_actors::state::FeedItem;
        let conversation = matches!(item, FeedItem::Conversation { .. } | FeedItem::Delivery { .. });
        match self {
            FeedKinds::All => true,
            FeedKinds::Routing => !conversation,
            FeedKinds::Conversation => conversation,
        }
    }
}

/// One feed of an operator's desk: its name in the protocol, the shard that keeps it,
/// and which of its items the desk takes.
#[derive(Clone)]
pub struct FeedSource {
    pub name: String,
    pub shard: Arc<dyn ShardReads>,
    pub kinds: FeedKinds,
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
    #[error("method not allowed: this path does not take that method (the Allow header lists those it takes)")]
    MethodNotAllowed,
    #[error("{0}")]
    Invalid(String),
    #[error("Content-Length is required")]
    LengthRequired,
    #[error("too many requests")]
    RateLimited,
    #[error("{0}")]
    Budget(&'static str),
    #[error("the node is busy: {0}")]
    Busy(&'static str),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("the request took longer than {0} ms")]
    Timeout(u64),
    #[error("the file is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
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
            GatewayError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            GatewayError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            GatewayError::LengthRequired => (StatusCode::LENGTH_REQUIRED, "length_required"),
            GatewayError::RateLimited | GatewayError::Budget(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            GatewayError::Busy(_) | GatewayError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            GatewayError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            GatewayError::TooLarge(_) | GatewayError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            GatewayError::UnsupportedType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_type"),
            GatewayError::Config(_) | GatewayError::Internal(_) | GatewayError::Io(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            GatewayError::Core(e) => {
                let status = match e {
                    switchboard_actors::Error::NotFound(_) => StatusCode::NOT_FOUND,
                    switchboard_actors::Error::Commit(_) | switchboard_actors::Error::Actor(_) | switchboard_actors::Error::Unreachable(_) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    // A record that cannot be read or written is the server's fault.
                    switchboard_actors::Error::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
        let mut response = (status, Json(json!({"code": code, "message": self.to_string()}))).into_response();
        if matches!(self, GatewayError::Timeout(_)) {
            // The body may be cut off part-way: the connection cannot carry another request.
            response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        response
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
    /// Serve the chaos drill endpoint (`POST /api/chaos/crash-actor`). Off on production
    /// nodes unless asked for: a panic button is not a default.
    pub chaos_drills: bool,
    /// What one client address may use (`docs/security.md`).
    pub budgets: Budgets,
    /// Time to handle one HTTP request, its body included.
    pub request_timeout: Duration,
    /// Server ping interval on every socket; a peer silent for two is dropped.
    pub ping_interval: Duration,
}

/// Per-address and per-node budgets of the public surface. Behind a proxy every
/// visitor shares its address: raise them there.
#[derive(Clone, Copy, Debug)]
pub struct Budgets {
    /// Conversations one client address may start per minute (a burst of as many).
    pub starts_per_minute: u32,
    /// Client messages one address may send per minute, across all its sockets.
    pub client_messages_per_minute: u32,
    /// Client messages one conversation may take per minute, from any address.
    pub conversation_messages_per_minute: u32,
    /// Tokens a minute for the history one address's `resume` frames replay, across all
    /// its sockets: a token per [`crate::client_ws::RESUME_ENTRIES_PER_TOKEN`] entries.
    pub client_resumes_per_minute: u32,
    /// Client sockets one address may hold open.
    pub client_sockets_per_address: u32,
    /// Attachment bytes one client address may upload per hour.
    pub upload_bytes_per_hour: u64,
    /// Uploads in progress from one client address.
    pub uploads_per_address: u32,
    /// Uploads in progress on the node.
    pub uploads: u32,
    /// Provider webhook calls whose proof (secret, signature) is wrong that one address
    /// may make per minute; past that its webhook calls get `429` unread.
    pub bad_hooks_per_minute: u32,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            starts_per_minute: 30,
            client_messages_per_minute: 120,
            conversation_messages_per_minute: 60,
            client_resumes_per_minute: 60,
            client_sockets_per_address: 32,
            upload_bytes_per_hour: 100 * 1024 * 1024,
            uploads_per_address: 4,
            uploads: 32,
            bad_hooks_per_minute: 30,
        }
    }
}

/// The per-address accounting behind [`Budgets`].
pub struct Usage {
    pub starts: budget::Buckets,
    pub messages: budget::Buckets,
    pub conversation_messages: budget::Buckets<ConversationId>,
    pub resumes: budget::Buckets,
    pub upload_bytes: budget::Buckets,
    pub client_sockets: Arc<budget::Slots>,
    pub uploads: Arc<budget::Slots>,
    /// Webhook calls with a wrong proof, per address and webhook (a provider sends
    /// every channel's calls from the same addresses: one channel with a stale secret
    /// must not cut the others off).
    pub bad_hooks: budget::Buckets<(std::net::IpAddr, String)>,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            starts: budget::Buckets::new(Duration::from_secs(60)),
            messages: budget::Buckets::new(Duration::from_secs(60)),
            conversation_messages: budget::Buckets::new(Duration::from_secs(60)),
            resumes: budget::Buckets::new(Duration::from_secs(60)),
            upload_bytes: budget::Buckets::new(Duration::from_secs(3600)),
            client_sockets: budget::Slots::new(),
            uploads: budget::Slots::new(),
            bad_hooks: budget::Buckets::new(Duration::from_secs(60)),
        }
    }
}

type PasswordJob = Box<dyn FnOnce() + Send>;

/// Threads that only hash and verify passwords, fed by a bounded queue. Threads of
/// their own, rather than tokio's blocking pool, because each argon2 call allocates
/// 19 MiB: on a fixed pair of threads the allocator reuses the same memory, where a
/// pool that grows under a flood left hundreds of MiB behind in per-thread arenas.
struct PasswordPool {
    jobs: std::sync::mpsc::SyncSender<PasswordJob>,
}

impl PasswordPool {
    fn start() -> Self {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<PasswordJob>(PASSWORD_QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..PASSWORD_WORKERS {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new().name(format!("password-{n}")).spawn(move || loop {
                // The lock is held only while taking a job, never while hashing.
                let job = match queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                // A panicking job must not take a worker with it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password thread");
            }
        }
        PasswordPool { jobs }
    }
}

/// Ephemeral signals (typing) that are not committed: lost on a reconnect by design.
#[derive(Default)]
pub struct Signals {
    conversations: Mutex<HashMap<ConversationId, broadcast::Sender<Value>>>,
    operators: Mutex<HashMap<OperatorId, broadcast::Sender<Value>>>,
    /// How many conversations' channels were left after the last sweep.
    swept: std::sync::atomic::AtomicUsize,
}

/// Conversations' signal channels kept before the first sweep of those nobody listens
/// to any more.
const SIGNALS_BEFORE_SWEEP: usize = 1024;
/// How long a keyed command whose outcome is unknown is sent again before its sender
/// is told `unavailable` (see [`Gateway::submit_keyed`]): the time the node itself looks
/// for a leader, a few elections over.
pub const KEYED_RESEND_FOR: Duration = Duration::from_secs(10);

impl Signals {
    pub fn conversation(&self, id: ConversationId) -> broadcast::Receiver<Value> {
        let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
        // A socket that moves from one conversation to another (`resume` again) leaves
        // the first one's channel behind until its writer lets go of it: sweep the
        // unheard ones whenever the table doubled since the last sweep, so it stays
        // within twice the channels listened to (amortised, one pass per doubling).
        let swept = self.swept.load(Relaxed);
        if map.len() >= SIGNALS_BEFORE_SWEEP.max(2 * swept) {
            map.retain(|_, tx| tx.receiver_count() > 0);
            self.swept.store(map.len(), Relaxed);
        }
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

/// The operators with a live operator socket on this member, counted as sockets open
/// and close: the node reports the set to the shard (`OperatorsConnected`) so that
/// presence follows the person.
pub struct OperatorSockets {
    counts: Mutex<HashMap<OperatorId, usize>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for OperatorSockets {
    fn default() -> Self {
        OperatorSockets { counts: Mutex::new(HashMap::new()), changed: tokio::sync::watch::Sender::new(0) }
    }
}

impl OperatorSockets {
    pub fn opened(&self, operator: &OperatorId) {
        let first = {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(operator.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    pub fn closed(&self, operator: &OperatorId) {
        let last = {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            match counts.get_mut(operator) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    counts.remove(operator);
                    true
                }
                None => false,
            }
        };
        if last {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// The operators with at least one live socket, in order.
    pub fn operators(&self) -> Vec<OperatorId> {
        let mut list: Vec<OperatorId> = self.counts.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        list.sort();
        list
    }

    /// Changes whenever an operator gets their first socket or loses their last.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

pub struct Gateway {
    pub backend: Arc<dyn Backend>,
    pub tokens: TokenKey,
    pub metrics: Arc<metrics::Metrics>,
    pub throttle: auth::LoginThrottle,
    pub signals: Signals,
    pub operator_sockets: OperatorSockets,
    pub blobs: attachments::BlobStore,
    pub config: GatewayConfig,
    pub usage: Usage,
    /// Password hashing is deliberately expensive (CPU and 19 MiB each): it runs on
    /// `PASSWORD_WORKERS` threads of its own with at most `PASSWORD_QUEUE` waiting; past
    /// that a login is refused at once instead of queueing without bound.
    passwords: PasswordPool,
    /// Files being fetched whole from another member for a download, at most
    /// `REMOTE_FETCHES` at once (each holds up to a file's size in memory, here and on
    /// the member that sends it; on a node that does not hold the file's shard, until
    /// the download is sent); past that a download gets 503.
    pub(crate) fetches: Arc<tokio::sync::Semaphore>,
    /// Set by the node once it has loaded its configuration (see `/readyz`).
    configured: AtomicBool,
    /// Whether [`Gateway::ready`] was ever true.
    was_ready: AtomicBool,
    /// When typing was last handed to the other nodes, per conversation and side (to
    /// the operator or to the visitor): at most once per [`TYPING_RELAY_EVERY`], so a
    /// visitor's burst of typing frames costs the cluster one relay a second.
    typing_relayed: Mutex<HashMap<(ConversationId, bool), std::time::Instant>>,
    /// The last visitor read mark relayed to each conversation's operator (see
    /// [`Gateway::visitor_read_due`]).
    reads_relayed: Mutex<HashMap<ConversationId, u64>>,
    /// Provider receipts that came before their message's send was committed, held a
    /// little and matched again (`channels::hold_receipt`).
    pub(crate) early_receipts: channels::EarlyReceipts,
    /// When a read barrier on the directory's group last confirmed this node's copy of
    /// it current ([`Gateway::staff_in_touch`]).
    directory_confirmed: Mutex<Option<std::time::Instant>>,
}

/// A staff token is checked against this node's copy of the directory without a new
/// read barrier while the last one that confirmed it current is this recent.
const DIRECTORY_FRESH: Duration = Duration::from_secs(1);
/// How long a staff request waits for a read barrier on the directory (a failover's
/// election, about 2 s for a quiet group, included) before it is refused with 503.
const DIRECTORY_PATIENCE: Duration = Duration::from_secs(3);

/// How often typing of one conversation's side is relayed to other nodes at most.
const TYPING_RELAY_EVERY: Duration = Duration::from_secs(1);
/// Conversations whose last typing relay is remembered; past it, older ones are
/// forgotten, and while still full a typing signal stays on this node.
const TYPING_RELAYS_KEPT: usize = 4096;
/// Conversations whose last relayed visitor read mark is remembered (16 bytes each).
const READ_RELAYS_KEPT: usize = 65_536;

/// Files fetched from other members at once for downloads (see `Gateway::fetches`).
pub const REMOTE_FETCHES: usize = 4;

/// Password checks or hashes running at once.
pub const PASSWORD_WORKERS: usize = 2;
/// Password checks or hashes waiting for a worker, at most.
pub const PASSWORD_QUEUE: usize = 16;

/// One answer of the conversation shards asked the same thing: found by one shard,
/// found, whatever another could not answer; not found by any, and some could not be
/// asked: not known now (that shard's error).
pub(crate) fn found_by_any<T>(answers: impl IntoIterator<Item = Result<Option<T>, switchboard_actors::Error>>) -> Result<Option<T>, switchboard_actors::Error> {
    let mut failed = None;
    for answer in answers {
        match answer {
            Ok(Some(found)) => return Ok(Some(found)),
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
    }
    failed.map_or(Ok(None), Err)
}

impl Gateway {
    pub fn new(backend: Arc<dyn Backend>, tokens: TokenKey, blobs: attachments::BlobStore, config: GatewayConfig) -> Arc<Self> {
        Arc::new(Gateway {
            backend,
            tokens,
            metrics: Arc::new(metrics::Metrics::default()),
            throttle: auth::LoginThrottle::default(),
            signals: Signals::default(),
            operator_sockets: OperatorSockets::default(),
            blobs,
            config,
            usage: Usage::default(),
            passwords: PasswordPool::start(),
            fetches: Arc::new(tokio::sync::Semaphore::new(REMOTE_FETCHES)),
            configured: AtomicBool::new(false),
            was_ready: AtomicBool::new(false),
            typing_relayed: Mutex::new(HashMap::new()),
            reads_relayed: Mutex::new(HashMap::new()),
            early_receipts: channels::EarlyReceipts::default(),
            directory_confirmed: Mutex::new(None),
        })
    }

    /// Marks the node's configuration as loaded: `/readyz` may answer 200 from now.
    /// Whether this node serves clients now (`/readyz`).
    pub fn ready(&self) -> bool {
        let ready = self.configured.load(Relaxed) && self.backend.ready();
        if ready {
            self.was_ready.store(true, Relaxed);
        }
        ready
    }

    /// Whether this node was ready once since it started (its configuration loaded, the
    /// directory reached its shards): a shard it holds losing its quorum later makes it
    /// not ready, without undoing what that established.
    pub fn was_ready(&self) -> bool {
        self.was_ready.load(Relaxed) || self.ready()
    }

    pub fn set_configured(&self) {
        self.configured.store(true, Relaxed);
    }

    /// Runs argon2 work on the password threads: past `PASSWORD_QUEUE` waiting the
    /// caller gets 429 at once.
    pub async fn password_work<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, GatewayError> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let job: PasswordJob = Box::new(move || {
            let _ = reply.send(work());
        });
        match self.passwords.jobs.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                self.metrics.rate_limited.fetch_add(1, Relaxed);
                return Err(GatewayError::RateLimited);
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(GatewayError::Internal("password workers stopped".into())),
        }
        result.await.map_err(|_| GatewayError::Internal("password work failed".into()))
    }

    /// Whether a signed staff token still speaks for its user: the login exists with the
    /// role and operator the token names, and its sessions were not ended since the
    /// token was issued. A demoted, deleted or logged-out user's older tokens stop
    /// working at once instead of at expiry.
    ///
    /// Asked only once [`Gateway::staff_in_touch`] said yes: the callers refuse staff
    /// with 503 otherwise.
    pub(crate) fn staff_current(&self, login: &str, role: switchboard_actors::model::Role, operator: Option<&OperatorId>, epoch: u64) -> bool {
        let shard = self.backend.directory_shard();
        let state = shard.read();
        state.users.get(login).is_some_and(|u| u.role == role && u.operator.as_ref() == operator)
            && state.session_epochs.get(login).copied().unwrap_or(0) == epoch
    }

    /// Whether this node's copy of the directory is current: a read barrier on its
    /// group (its leader confirms a majority, and this copy applied as far as the leader
    /// had committed) succeeded within the last [`DIRECTORY_FRESH`], or does now within
    /// [`DIRECTORY_PATIENCE`]. Staff tokens are checked against that copy (a login's
    /// sessions ended, its role changed), so a member cut off from the cluster, or one
    /// still catching up, takes none it may not know were revoked.
    pub(crate) async fn staff_in_touch(&self) -> bool {
        let fresh = |at: &Option<std::time::Instant>| at.is_some_and(|at| at.elapsed() < DIRECTORY_FRESH);
        if fresh(&self.directory_confirmed.lock().unwrap_or_else(|p| p.into_inner())) {
            return true;
        }
        let asked = std::time::Instant::now();
        match tokio::time::timeout(DIRECTORY_PATIENCE, self.backend.directory_barrier()).await {
            Ok(Ok(())) => {
                self.directory_confirmed_at(asked);
                true
            }
            _ => false,
        }
    }

    /// A read barrier on the directory asked at `asked` succeeded (a login's too).
    pub(crate) fn directory_confirmed_at(&self, asked: std::time::Instant) {
        let mut confirmed = self.directory_confirmed.lock().unwrap_or_else(|p| p.into_inner());
        *confirmed = Some(confirmed.map_or(asked, |at| at.max(asked)));
    }

    /// An ephemeral signal for an operator's sockets: those on this node hear it now,
    /// those on other nodes when the relay reaches them.
    pub(crate) fn signal_operator(&self, operator: &OperatorId, signal: Value) {
        let conversation = signal.get("conversation").and_then(Value::as_u64).map(ConversationId);
        // A visitor's `typing` reaches the operator at most once a second per
        // conversation, on this node as on the others: one not due is dropped (any
        // number of the visitor's sockets may send it, ten times a second each).
        if signal["type"] == "typing" && !conversation.is_some_and(|c| self.typing_relay_due(c, true)) {
            return;
        }
        self.backend.relay_signal(switchboard_raft::network::SignalTo::Operator(operator.as_str().to_owned()), &signal);
        self.signals.to_operator(operator, signal);
    }

    /// An ephemeral signal for a conversation's visitor sockets, here and on other nodes.
    pub(crate) fn signal_conversation(&self, conversation: ConversationId, signal: Value) {
        if signal["type"] != "typing" || self.typing_relay_due(conversation, false) {
            self.backend.relay_signal(switchboard_raft::network::SignalTo::Conversation(conversation.0), &signal);
        }
        self.signals.to_conversation(conversation, signal);
    }

    /// Whether typing of `conversation` (to its operator, or to its visitor) may be
    /// relayed to the other nodes now; if so, counts it.
    fn typing_relay_due(&self, conversation: ConversationId, to_operator: bool) -> bool {
        let now = std::time::Instant::now();
        let mut relayed = self.typing_relayed.lock().unwrap_or_else(|p| p.into_inner());
        if relayed.len() >= TYPING_RELAYS_KEPT {
            relayed.retain(|_, at| now.duration_since(*at) < TYPING_RELAY_EVERY);
        }
        match relayed.get(&(conversation, to_operator)) {
            Some(at) if now.duration_since(*at) < TYPING_RELAY_EVERY => false,
            None if relayed.len() >= TYPING_RELAYS_KEPT => false,
            _ => {
                relayed.insert((conversation, to_operator), now);
                true
            }
        }
    }

    /// Whether a visitor's read mark `upto` of `conversation` is to be relayed to its
    /// operator: only one past the last relayed from this node, whichever of the
    /// visitor's sockets sent it (switching a socket between conversations, or opening
    /// new ones, relays nothing new). At most [`READ_RELAYS_KEPT`] conversations are
    /// remembered; past that the memory starts over.
    pub(crate) fn visitor_read_due(&self, conversation: ConversationId, upto: u64) -> bool {
        let mut relayed = self.reads_relayed.lock().unwrap_or_else(|p| p.into_inner());
        if relayed.get(&conversation).is_some_and(|r| upto <= *r) {
            return false;
        }
        if relayed.len() >= READ_RELAYS_KEPT {
            relayed.clear();
        }
        relayed.insert(conversation, upto);
        true
    }

    /// A relayed read mark as the core records it: never past the newest entry. `None`
    /// when the conversation cannot be read now (its holders did not answer) or is not
    /// open: then nothing is relayed live, and the committed mark is read on resume.
    pub(crate) async fn read_mark(&self, conversation: ConversationId, upto: u64) -> Option<u64> {
        match self.backend.conversation_reads(conversation).open_conversation(conversation).await {
            Ok(Some(c)) => Some(upto.min(c.last_seq())),
            Ok(None) | Err(_) => None,
        }
    }

    /// An open conversation's newest entry and the visitor's read mark, as this node
    /// reads them (its own copy or a holder's): `Ok(None)` when it is not open (closed,
    /// or gone), `Err` when it cannot be read now.
    pub(crate) async fn client_read_seen(&self, conversation: ConversationId) -> Result<Option<(u64, u64)>, ()> {
        match self.backend.conversation_reads(conversation).open_conversation(conversation).await {
            Ok(Some(c)) => Ok(Some((c.last_seq(), c.client_read_upto))),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }

    /// The conversation and entry a provider's message id names, looked up in every
    /// conversation shard at once.
    pub(crate) async fn by_provider_id(&self, channel: &switchboard_actors::model::ChannelId, id: &str) -> Result<Option<(ConversationId, u64)>, switchboard_actors::Error> {
        let readers = self.backend.conversation_readers();
        found_by_any(futures::future::join_all(readers.iter().map(|r| r.by_provider_id(channel, id))).await)
    }

    /// A visitor's most recent conversations from every conversation shard, newest
    /// first, at most `limit`.
    pub(crate) async fn conversations_of(&self, visitor: &str, limit: usize) -> Result<Vec<switchboard_actors::state::Conversation>, switchboard_actors::Error> {
        match self.conversations_answered(visitor, limit).await {
            (_, Some(e)) => Err(e),
            (found, None) => Ok(found),
        }
    }

    /// As [`Gateway::conversations_of`], from the conversation shards that answered,
    /// with the error of one that did not (the list may then lack some).
    pub(crate) async fn conversations_answered(&self, visitor: &str, limit: usize) -> (Vec<switchboard_actors::state::Conversation>, Option<switchboard_actors::Error>) {
        let readers = self.backend.conversation_readers();
        let answers = futures::future::join_all(readers.iter().map(|r| r.conversations_of(visitor, limit))).await;
        let (mut found, mut failed) = (Vec::new(), None);
        for answer in answers {
            match answer {
                Ok(some) => found.extend(some),
                Err(e) => failed = Some(e),
            }
        }
        found.sort_by(|a, b| (b.created_at, b.id).cmp(&(a.created_at, a.id)));
        found.truncate(limit);
        (found, failed)
    }

    /// The conversations `operator` handled, newest (highest id) first, before
    /// `before`, at most `limit`, from every conversation shard.
    /// Whether a channel's inbound message (its key, `core::inbound_key`) was taken
    /// before by any conversation shard: a provider's redelivery, or a mail sent again.
    /// A read that fails counts as not taken (the commit then decides).
    pub(crate) async fn inbound_seen_anywhere(&self, channel: &switchboard_actors::model::ChannelId, sender: &str, key: &str) -> bool {
        let readers = self.backend.conversation_readers();
        let answers = futures::future::join_all(readers.iter().map(|r| r.inbound_seen(channel, sender, key))).await;
        answers.into_iter().any(|seen| seen.unwrap_or(false))
    }

    pub(crate) async fn handled_by(&self, operator: &OperatorId, before: Option<ConversationId>, limit: usize) -> Result<Vec<ConversationId>, switchboard_actors::Error> {
        let readers = self.backend.conversation_readers();
        let answers = futures::future::join_all(readers.iter().map(|r| r.handled_by(operator, before, limit))).await;
        let mut found = Vec::new();
        for answer in answers {
            found.extend(answer?);
        }
        found.sort_by(|a, b| b.cmp(a));
        found.dedup();
        found.truncate(limit);
        Ok(found)
    }

    /// Commits a command whose second copy is written once: a message or a note under
    /// its key, a channel's inbound message under its provider's id. When the node
    /// cannot say whether an attempt committed (a leader died or stalled with it: the
    /// error is `Commit`), or could not reach a member that holds the data
    /// (`Unreachable`), the same command is sent again, after 50 ms and then twice as
    /// long each time up to 1 s, for up to [`KEYED_RESEND_FOR`] from the first attempt;
    /// an attempt that committed after all is answered from its key (`duplicate`). So a
    /// failover costs the sender a wait, not an error; after that time the last error
    /// is the answer (`unavailable`).
    pub async fn submit_keyed(&self, command: Command) -> Result<Reply, switchboard_actors::Error> {
        self.resend_while_unknown(
            || self.submit(command.clone()),
            |e| matches!(e, switchboard_actors::Error::Commit(_) | switchboard_actors::Error::Unreachable(_)),
        )
        .await
    }

    /// Runs `attempt` again while its error is one that `unknown` says leaves the
    /// outcome open (a failover): after 50 ms, then twice as long each time up to 1 s,
    /// for up to [`KEYED_RESEND_FOR`] from the first attempt. Then, or on any other
    /// answer, that answer is returned. Each attempt must be safe to repeat: a keyed
    /// command, whose second copy is answered as a duplicate.
    pub(crate) async fn resend_while_unknown<T, E, Fut>(&self, mut attempt: impl FnMut() -> Fut, unknown: impl Fn(&E) -> bool) -> Result<T, E>
    where
        E: std::fmt::Display,
        Fut: Future<Output = Result<T, E>>,
    {
        let give_up = Instant::now() + KEYED_RESEND_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            match attempt().await {
                Err(e) if unknown(&e) && Instant::now() + pause < give_up => {
                    tracing::info!(error = %e, "a command's outcome is unknown (a failover?); sending it again under its key");
                    self.metrics.keyed_resent.fetch_add(1, Relaxed);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                answer => return answer,
            }
        }
    }

    /// Commits a command, counting and timing it.
    pub async fn submit(&self, command: Command) -> Result<Reply, switchboard_actors::Error> {
        let started = Instant::now();
        let command = clean_customer_text(command);
        // Refuse what the core would refuse, and answer repeated keys, before writing to
        // the log: bad input must not cost a replicated, flushed entry.
        let early = match self.backend.shard_for(&command) {
            Some(shard) => shard.precheck(&command, switchboard_actors::actors::now_ms()),
            None => Ok(None),
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

/// The token of an `Authorization` header's `Bearer` credentials: the scheme in any
/// case (RFC 9110 11.1), then one or more spaces, then the token.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Checks a browser's Origin header against an allow-list. Requests without an Origin
/// come from non-browser clients, which authenticate by other means.
pub(crate) fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    match headers.get(axum::http::header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)),
    }
}

/// Liveness: the process serves HTTP.
async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

/// Readiness: the group has a leader this node can reach (itself while it reaches a
/// majority, or another member), the node applied its log and loaded its
/// configuration, so a client that starts now finds its channel and groups.
async fn readyz(axum::extract::State(gw): axum::extract::State<Arc<Gateway>>) -> Response {
    if gw.ready() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready"}))).into_response()
    }
}

/// Bounds the time of every request, body included: a slow body is answered 408 and
/// its connection closed. WebSocket upgrades return at once, so sockets are not cut.
async fn deadline(axum::extract::State(gw): axum::extract::State<Arc<Gateway>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let limit = gw.config.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => GatewayError::Timeout(limit.as_millis() as u64).into_response(),
    }
}

/// Which listener a page is served on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Surface {
    Public,
    Private,
}

/// Content-Security-Policy of the public demo page: everything is self-hosted; the
/// widget puts its styles in a `<style>` of its own shadow root, hence inline styles.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'";
/// The workstation is never framed: no clickjacking of staff actions.
const CSP_WORKSTATION: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

async fn security_headers(surface: Surface, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::header::{HeaderValue, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS};
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    let is_page = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/html"));
    if is_page {
        match surface {
            Surface::Private => {
                headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP_WORKSTATION));
                headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            }
            Surface::Public => {
                headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
            }
        }
    }
    response
}


/// In front of the providers' webhooks: an address that keeps sending a wrong proof
/// (`401`, `403`) is refused with `429` before its body is read, for a minute's worth
/// of its budget; a body over the limit is answered in the API's error shape.
async fn hook_guard(
    axum::extract::State(gw): axum::extract::State<Arc<Gateway>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let address = hook_budget_key(peer, &percent_decoded(request.uri().path()));
    let allowed = f64::from(gw.config.budgets.bad_hooks_per_minute);
    // Only a call answered for a wrong proof spends the budget: calls with the right
    // proof are never refused, however many run at once or however long they take.
    if !gw.usage.bad_hooks.has(&address, allowed) {
        gw.metrics.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return GatewayError::Budget("too many webhook calls with a wrong secret or signature from this address; wait a minute").into_response();
    }
    let response = next.run(request).await;
    match response.status() {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            gw.usage.bad_hooks.take(address, 1.0, allowed);
        }
        StatusCode::PAYLOAD_TOO_LARGE if !is_json(&response) => {
            return GatewayError::BodyTooLarge(hook_body_limit(&address.1)).into_response();
        }
        _ => {}
    }
    response
}

/// Whose budget of wrong webhook proofs a call spends: its client address and the path
/// as the router reads it (`decoded_path`: percent-decoded, so spelling the channel
/// differently does not open a fresh budget).
fn hook_budget_key(peer: std::net::SocketAddr, decoded_path: &str) -> (std::net::IpAddr, String) {
    (budget::client_address(peer.ip()), decoded_path.chars().take(200).collect())
}

/// The largest body a Meta webhook (WhatsApp, Messenger) takes: Meta batches up to a
/// thousand updates in one signed delivery, of up to 3 MB by its documentation, and
/// resends a refused one unchanged, so a smaller limit would lose the whole batch.
pub const META_HOOK_BODY: usize = 3 * 1024 * 1024;
/// The largest body a VK callback takes: a message carries its forwarded messages (up
/// to 100, each with its attachments) and every photo's list of sizes, well past 64 KiB
/// at times, and VK sends a refused one again unchanged until it gives up on it.
pub const VK_HOOK_BODY: usize = 1024 * 1024;
/// Meta deliveries and VK callbacks larger than [`rest::MAX_JSON_BODY`] (or of no
/// stated length) a node reads at once; another gets `503` (the provider sends it
/// again): at most `LARGE_HOOKS_AT_ONCE * META_HOOK_BODY` (12 MiB) held for them.
pub const LARGE_HOOKS_AT_ONCE: usize = 4;
/// Of those, how many only an address that has made a Meta delivery with the right
/// signature in the last [`PROVEN_FOR`] may take: senders that start large deliveries
/// and never finish them (a slow body held to the request deadline) can hold the others,
/// never these.
pub const LARGE_HOOKS_FOR_PROVEN: usize = 2;
/// How long a right delivery counts for its address.
pub const PROVEN_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Addresses remembered as proven (the oldest go first): Meta sends from a few.
const PROVEN_KEPT: usize = 256;

/// The client addresses whose Meta deliveries were signed right lately.
#[derive(Default)]
struct Proven(std::collections::VecDeque<(std::net::IpAddr, std::time::Instant)>);

impl Proven {
    fn note(&mut self, address: std::net::IpAddr, now: std::time::Instant) {
        self.0.retain(|(a, _)| *a != address);
        self.0.push_back((address, now));
        while self.0.len() > PROVEN_KEPT {
            self.0.pop_front();
        }
    }

    fn knows(&mut self, address: std::net::IpAddr, now: std::time::Instant) -> bool {
        self.0.retain(|(_, at)| now.duration_since(*at) < PROVEN_FOR);
        self.0.iter().any(|(a, _)| *a == address)
    }
}

/// Whether a large Meta delivery may be read now, with `free` of the
/// [`LARGE_HOOKS_AT_ONCE`] places free, from a `proven` address or not.
fn large_hook_place(free: usize, proven: bool) -> bool {
    free > if proven { 0 } else { LARGE_HOOKS_FOR_PROVEN }
}

static PROVEN: std::sync::Mutex<Proven> = std::sync::Mutex::new(Proven(std::collections::VecDeque::new()));

fn hook_body_limit(path: &str) -> usize {
    if path.starts_with("/hooks/whatsapp/") || path.starts_with("/hooks/messenger/") {
        META_HOOK_BODY
    } else if path.starts_with("/hooks/vk/") {
        VK_HOOK_BODY
    } else {
        rest::MAX_JSON_BODY
    }
}

/// Lets a Meta delivery over [`rest::MAX_JSON_BODY`] (or of no stated length) be read
/// only while fewer than [`LARGE_HOOKS_AT_ONCE`] others are, and one client address
/// reads one at a time (held until it is answered): a permit goes only to a call for a
/// channel with that provider's adapter that carries a signature, checked with the body.
/// One declaring more than [`META_HOOK_BODY`] is refused unread.
async fn large_hook_permit(
    axum::extract::State(gw): axum::extract::State<Arc<Gateway>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    static LARGE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LARGE_HOOKS_AT_ONCE);
    static READING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let declared = request.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if request.method() != axum::http::Method::POST || declared.is_some_and(|n| n <= rest::MAX_JSON_BODY as u64) {
        // A small delivery taken (its signature checked with the body) proves its address.
        let address = hook_budget_key(peer, "").0;
        let post = request.method() == axum::http::Method::POST;
        let response = next.run(request).await;
        if post && response.status().is_success() && response.extensions().get::<channels::HookProven>().is_some() {
            PROVEN.lock().unwrap_or_else(|p| p.into_inner()).note(address, std::time::Instant::now());
        }
        return response;
    }
    // The channel, as the router reads the path: `/hooks/{provider}/{channel}`.
    let path = percent_decoded(request.uri().path());
    let limit = hook_body_limit(&path);
    if declared.is_some_and(|n| n > limit as u64) {
        return GatewayError::BodyTooLarge(limit).into_response();
    }
    let (provider, channel) = path.trim_start_matches("/hooks/").split_once('/').unwrap_or_default();
    let adapter = gw.backend.directory_shard().read().channel_adapters.get(&switchboard_actors::model::ChannelId::new(channel)).cloned();
    use switchboard_actors::model::AdapterConfig;
    let fits = matches!(
        (provider, &adapter),
        ("whatsapp", Some(AdapterConfig::WhatsApp { .. })) | ("messenger", Some(AdapterConfig::Messenger { .. })) | ("vk", Some(AdapterConfig::Vk { .. }))
    );
    if !fits {
        return GatewayError::NotFound(format!("no {provider} channel {}", channel.chars().take(200).collect::<String>())).into_response();
    }
    // Meta signs its deliveries in a header, checked with the body; VK's secret is in
    // the body itself, so a VK sender proves itself only with the body read (the last
    // places stay for the proven, as for everyone).
    if provider != "vk" && !request.headers().contains_key(switchboard_adapters::whatsapp::SIGNATURE_HEADER) {
        return GatewayError::Unauthorized("the signature does not match").into_response();
    }
    let key = hook_budget_key(peer, &path);
    let address = key.0.to_string();
    {
        let mut reading = READING.lock().unwrap_or_else(|p| p.into_inner());
        if reading.contains(&address) {
            return GatewayError::Busy("this address is sending another large webhook delivery; send it again").into_response();
        }
        let proven = PROVEN.lock().unwrap_or_else(|p| p.into_inner()).knows(key.0, std::time::Instant::now());
        // Places are taken only here, under `READING`: what is free cannot shrink meanwhile.
        if !large_hook_place(LARGE.available_permits(), proven) {
            return GatewayError::Busy("other large webhook deliveries are being read; send it again").into_response();
        }
        let Ok(permit) = LARGE.try_acquire() else {
            return GatewayError::Busy("other large webhook deliveries are being read; send it again").into_response();
        };
        permit.forget();
        reading.push(address.clone());
    }
    // Given back however the call ends (a dropped connection drops this future). One
    // that ends unanswered before its body was read to its end (too slow for the
    // request deadline, or dropped) spends the address's budget of bad webhook calls on
    // this path, as a wrong signature does: a sender that holds places without
    // finishing is cut off, a delivery whose handling takes long is not.
    struct Release {
        gw: Arc<Gateway>,
        address: String,
        key: (std::net::IpAddr, String),
        answered: bool,
        read: Arc<AtomicBool>,
    }
    impl Drop for Release {
        fn drop(&mut self) {
            READING.lock().unwrap_or_else(|p| p.into_inner()).retain(|a| *a != self.address);
            LARGE.add_permits(1);
            if !self.answered && !self.read.load(Relaxed) {
                let allowed = f64::from(self.gw.config.budgets.bad_hooks_per_minute);
                self.gw.usage.bad_hooks.take(self.key.clone(), 1.0, allowed);
            }
        }
    }
    // A body read to its end is a delivery made, however long its handling then takes.
    let read = Arc::new(AtomicBool::new(false));
    let mut release = Release { gw: gw.clone(), address, key, answered: false, read: read.clone() };
    let (parts, body) = request.into_parts();
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::new(MarkEnd { inner: body, read: read.clone() }));
    let response = next.run(request).await;
    release.answered = true;
    if response.extensions().get::<channels::HookProven>().is_some() {
        if response.status().is_success() {
            PROVEN.lock().unwrap_or_else(|p| p.into_inner()).note(release.key.0, std::time::Instant::now());
        }
    } else if response.status().is_client_error() && !matches!(response.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        // A large body read and refused without a proof (junk that did not parse): it
        // spends the address's budget of bad webhook calls, as a wrong proof does (which
        // `hook_guard` charges itself). A `503` of this node's is not the caller's doing.
        let allowed = f64::from(gw.config.budgets.bad_hooks_per_minute);
        gw.usage.bad_hooks.take(release.key.clone(), 1.0, allowed);
    }
    response
}

/// A request body that says when it was read to its end.
struct MarkEnd {
    inner: axum::body::Body,
    read: Arc<AtomicBool>,
}

impl hyper::body::Body for MarkEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn is_json(response: &Response) -> bool {
    response.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
}

/// A body over the limit, refused by the framework before a handler ran (in plain
/// text), answered in the API's error shape instead.
pub(crate) async fn json_too_large(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json(&response) {
        return GatewayError::BodyTooLarge(rest::MAX_JSON_BODY).into_response();
    }
    response
}

/// `path` with its `%XX` escapes decoded (invalid UTF-8 replaced), as the router
/// decodes a path parameter.
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The public surface: web chat page and client WebSocket.
pub fn public_router(gw: Arc<Gateway>) -> Router {
    let files = Router::new()
        .route(
            "/attachments",
            axum::routing::post(attachments::client_upload),
        )
        .route("/attachments/{id}", get(attachments::client_download))
        .route("/notice", get(desk::public_notice))
        // Set before the CORS layer, so that a preflight (`OPTIONS`, a method these
        // routes do not take) still reaches it; the router-wide one below leaves these.
        .method_not_allowed_fallback(no_such_method)
        .layer(axum::middleware::from_fn_with_state(gw.clone(), attachments::cors));
    // Providers' webhooks: small JSON bodies, never from a browser.
    let hooks = Router::new()
        .route("/hooks/telegram/{channel}", axum::routing::post(channels::telegram_hook))
        .route("/hooks/viber/{channel}", axum::routing::post(channels::viber_hook))
        .layer(axum::extract::DefaultBodyLimit::max(rest::MAX_JSON_BODY))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), hook_guard));
    // Meta's batch many updates in one signed body: up to META_HOOK_BODY, a few at once.
    let meta_hooks = Router::new()
        .route("/hooks/whatsapp/{channel}", get(channels::meta_subscribe).post(channels::whatsapp_hook))
        .route("/hooks/messenger/{channel}", get(channels::meta_subscribe).post(channels::messenger_hook))
        .layer(axum::extract::DefaultBodyLimit::max(META_HOOK_BODY))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), large_hook_permit))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), hook_guard));
    // VK's callbacks: up to VK_HOOK_BODY, over 64 KiB only in the same few places.
    let vk_hooks = Router::new()
        .route("/hooks/vk/{channel}", axum::routing::post(channels::vk_hook))
        .layer(axum::extract::DefaultBodyLimit::max(VK_HOOK_BODY))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), large_hook_permit))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), hook_guard));
    assets::public()
        .route("/ws/client", get(client_ws::upgrade))
        .merge(files)
        .merge(hooks)
        .merge(meta_hooks)
        .merge(vk_hooks)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(no_such_path)
        .method_not_allowed_fallback(no_such_method)
        .layer(axum::middleware::from_fn_with_state(gw.clone(), deadline))
        .layer(axum::middleware::from_fn(|r, n| security_headers(Surface::Public, r, n)))
        .with_state(gw)
}

/// A path no route serves: 404 with the error body every answer has.
async fn no_such_path() -> GatewayError {
    GatewayError::NotFound("no such path".into())
}

/// A path served, with a method it does not take: 405 with the error body (axum adds
/// the `Allow` header).
pub(crate) async fn no_such_method() -> GatewayError {
    GatewayError::MethodNotAllowed
}

/// The private surface: operators, supervisors, admins and monitoring.
pub fn private_router(gw: Arc<Gateway>) -> Router {
    rest::routes()
        .merge(assets::private())
        .route("/ws/operator", get(operator_ws::upgrade))
        .route("/ws/supervisor", get(supervisor_ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(no_such_path)
        .method_not_allowed_fallback(no_such_method)
        .layer(axum::middleware::from_fn_with_state(gw.clone(), deadline))
        .layer(axum::middleware::from_fn(|r, n| security_headers(Surface::Private, r, n)))
        .with_state(gw)
}


/// `text` with its control characters but tab, line feed and carriage return replaced:
/// those that are whitespace (vertical tab, form feed, next line) by a space, the rest
/// by U+FFFD. One such character is six bytes once written in JSON (`\u0001`).
pub(crate) fn clean_text(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && !matches!(c, '\t' | '\n' | '\r');
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(text.chars().map(|c| if !bad(c) { c } else if c.is_whitespace() { ' ' } else { '\u{FFFD}' }).collect())
}

/// A customer's texts (a message, a rating's comment) cleaned by [`clean_text`], so a
/// conversation's megabyte of customer text cannot reach staff as six. Made here,
/// before anything is committed; the core never sees them.
pub(crate) fn clean_customer_text(mut command: Command) -> Command {
    let clean = |text: &mut String| {
        if let std::borrow::Cow::Owned(clean) = clean_text(text) {
            *text = clean;
        }
    };
    match &mut command {
        Command::PostClientMessage { text, .. } | Command::ChannelInbound { text, .. } | Command::ChannelInboundRich { text, .. } => clean(text),
        Command::Rate { comment, .. } => clean(comment),
        _ => {}
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control characters in a customer's text become U+FFFD before anything is
    /// committed; tab, line feed and carriage return stay, and so does the rest.
    #[test]
    fn a_customer_s_control_characters_are_replaced_before_they_are_committed() {
        let command = Command::PostClientMessage { conversation: ConversationId(1), key: "k".into(), text: "a\u{1}b\u{7f}\u{85}\tc\r\nd 😀".into(), attachments: vec![] };
        match clean_customer_text(command) {
            Command::PostClientMessage { text, .. } => assert_eq!(text, "a\u{FFFD}b\u{FFFD} \tc\r\nd 😀", "NEL is whitespace: a space"),
            other => panic!("{other:?}"),
        }
        let inbound = Command::ChannelInbound { channel: switchboard_actors::model::ChannelId::new("tg"), sender: "1".into(), sender_name: String::new(), provider_message_id: "m".into(), text: "\u{0}".repeat(3) };
        assert!(matches!(clean_customer_text(inbound), Command::ChannelInbound { text, .. } if text == "\u{FFFD}".repeat(3)));
    }

    #[test]
    fn a_read_no_member_answered_is_retryable_and_a_core_refusal_is_not() {
        let unreachable = GatewayError::Core(switchboard_actors::Error::Unreachable("no member of group 3 answered".into()));
        assert_eq!(unreachable.status_and_code(), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
        let offline = GatewayError::Core(switchboard_actors::Error::Unavailable("operator op-7 is offline".into()));
        assert_eq!(offline.status_and_code(), (StatusCode::CONFLICT, "unavailable"));
    }

    /// Senders that never finish their large deliveries can hold two of the four
    /// places; the last two stay for addresses whose deliveries were signed right within
    /// a day, and an address is forgotten after that day.
    #[test]
    fn the_last_large_webhook_places_are_kept_for_proven_senders() {
        assert!(large_hook_place(4, false) && large_hook_place(3, false));
        assert!(!large_hook_place(2, false), "two unproven readers hold all they may");
        assert!(large_hook_place(2, true) && large_hook_place(1, true));
        assert!(!large_hook_place(0, true));
        let (meta, stranger): (std::net::IpAddr, std::net::IpAddr) = ("31.13.24.1".parse().expect("ip"), "203.0.113.9".parse().expect("ip"));
        let start = std::time::Instant::now();
        let mut proven = Proven::default();
        proven.note(meta, start);
        assert!(proven.knows(meta, start + std::time::Duration::from_secs(3600)));
        assert!(!proven.knows(stranger, start));
        assert!(!proven.knows(meta, start + PROVEN_FOR), "a day later it proves itself again");
        // Bounded: the oldest go first.
        for i in 0..(PROVEN_KEPT as u32 + 10) {
            proven.note(std::net::IpAddr::V4(std::net::Ipv4Addr::from(i)), start);
        }
        assert_eq!(proven.0.len(), PROVEN_KEPT);
        assert!(!proven.knows(std::net::IpAddr::V4(std::net::Ipv4Addr::from(0)), start));
    }

    #[test]
    fn a_webhook_path_is_keyed_as_the_router_reads_it() {
        assert_eq!(percent_decoded("/hooks/telegram/%74g"), "/hooks/telegram/tg");
        assert_eq!(percent_decoded("/hooks/whatsapp/s%75pport"), "/hooks/whatsapp/support");
        // Escapes that are not two hex digits stay as they are.
        assert_eq!(percent_decoded("/a%2/b%zz/%"), "/a%2/b%zz/%");
    }

    #[test]
    fn signal_channels_nobody_listens_to_are_swept() {
        let signals = Signals::default();
        let kept: Vec<_> = (0..10).map(|i| signals.conversation(ConversationId(i))).collect();
        // A socket that resumes one conversation after another drops each receiver.
        for i in 10..20_000 {
            drop(signals.conversation(ConversationId(i)));
        }
        let tracked = signals.conversations.lock().unwrap_or_else(|p| p.into_inner()).len();
        assert!(tracked <= 2 * SIGNALS_BEFORE_SWEEP, "{tracked} channels tracked for 10 listened to");
        for (i, mut rx) in kept.into_iter().enumerate() {
            signals.to_conversation(ConversationId(i as u64), json!({"typing": true}));
            assert_eq!(rx.try_recv().ok(), Some(json!({"typing": true})), "a listened channel is kept");
        }
    }
}
