//! Raft RPCs over QUIC. One endpoint per node serves every group it hosts; each RPC is
//! one bidirectional stream carrying a bincode request and its response.
//!
//! Architecture invariant: the transport never interprets entries; it routes by group
//! id and limits sizes. A peer without a certificate from the cluster CA never gets a
//! stream (the TLS handshake refuses it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, ClientWriteResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tracing::{debug, warn};

use crate::tls::{Role, NODE_SERVER_NAME};
use crate::{Node, NodeId, Raft, Request, TypeConfig};

/// Largest RPC body accepted, in bytes (snapshot chunks are far smaller).
pub const MAX_RPC_BYTES: usize = 64 * 1024 * 1024;
/// The longest request a peer holding a gateway's certificate may send (it may ask only
/// `Status` and `Shards`, whose bodies are a byte or two); a longer one is dropped
/// unread.
const MAX_GATEWAY_RPC_BYTES: usize = 64;
/// How long a request's body may take to arrive, and its answer to be read by the
/// peer: a chunk of a snapshot, an append or a file of at most [`MAX_RPC_BYTES`] between
/// members of one cluster; a peer that trickles or never reads loses its stream.
const RPC_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
enum RpcRequest {
    Append { group: u64, rpc: AppendEntriesRequest<TypeConfig> },
    Snapshot { group: u64, rpc: InstallSnapshotRequest<TypeConfig> },
    Vote { group: u64, rpc: VoteRequest<NodeId> },
    /// A command a follower's proposer forwards to the leader (appended variant: the
    /// ones before keep their encoding).
    Write { group: u64, request: Request },
    /// A file the node keeps beside the groups' records (an attachment's bytes), pushed
    /// to this member before its record is committed.
    PutFile { id: String, bytes: Vec<u8> },
    /// Asks for a file this member may hold.
    GetFile { id: String },
    /// A change of the group's members, for its leader.
    Members { group: u64, change: crate::members::Change },
    /// The index a linearizable read must wait for, from the group's leader.
    ReadIndex { group: u64 },
    /// Who leads, who the members are and whether this member serves: what a gateway
    /// polls to pin sessions (and how it finds a dead member within a second).
    Status,
    /// An empty append from a leader whose group is quiet (`quiet`): the voter that
    /// accepts it stops its own election timer and waits for the next beat instead.
    AppendQuiet { group: u64, rpc: AppendEntriesRequest<TypeConfig> },
    /// A question about `group`'s applied state, for a member of it (ADR 0012): the
    /// node encodes and answers it ([`GroupReads`]), the transport passes the bytes.
    Read { group: u64, query: Vec<u8> },
    /// Follows stream `stream` of `group` on a member: the answer is not one message but
    /// a status byte and then the stream's value (8 bytes, big-endian; what the node's
    /// [`GroupReads::watch`] yields: a counter, or a log index) each time it
    /// moves, until either side ends the stream (see [`Peers::watch`]).
    Watch { group: u64, stream: Vec<u8> },
    /// The conversation shards as this member sees them (who leads each, who holds
    /// it): what a gateway polls beside `Status` to pin a visitor's socket to its
    /// conversation's shard (appended variant; a member that predates it answers
    /// `BadRequest`, and the gateway then pins by `Status` alone).
    Shards,
    /// Which of these outbox entries (conversation id, sequence number) this node's
    /// process is sending now: what the next leader asks the node an attempt was left
    /// by, before it settles the attempt `unknown` (appended variant; a node that
    /// predates it answers `BadRequest`, and the asker keeps waiting).
    Sending { keys: Vec<(u64, u64)> },
    /// An ephemeral signal (typing, a read mark, an offer's first words) for the sockets
    /// on this node of an operator or a conversation: the node whose socket sent it is
    /// not the one whose socket is to hear it (appended variant; a node that predates it
    /// answers `BadRequest`, and the signal is lost, as signals may be).
    Signal { to: SignalTo, signal: Vec<u8> },
    /// As `Sending`, answered with each entry's [`sending_state`]: also whether this
    /// process gave up the mark of an entry it never sent, so the next leader sends it
    /// instead of settling it `unknown` (appended variant; a node that predates it
    /// answers `BadRequest`, and the asker asks `Sending`).
    SendingStates { keys: Vec<(u64, u64)> },
    /// The newest routing rules this node's build decides with: what a leader asks every
    /// member of a group before it has the group adopt newer rules, so that no replica
    /// meets rules it does not know (appended variant; a node that predates it answers
    /// `BadRequest`, and the asker adopts nothing newer).
    Rules,
}

/// What a node says of an outbox entry another node's leader asks about.
pub mod sending_state {
    /// Its process is not sending it (it may have sent it before it restarted).
    pub const NOT_SENDING: u8 = 0;
    /// Its process is sending it now: the outcome will come.
    pub const SENDING: u8 = 1;
    /// Its process never sent it: the mark was given up (its commit's outcome was
    /// unknown), then written after all.
    pub const NEVER_SENT: u8 = 2;
}

/// Whose sockets a relayed signal is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalTo {
    Operator(String),
    Conversation(u64),
}

/// What delivers another node's signal to this node's sockets (the frame's JSON bytes).
pub type SignalSink = Arc<dyn Fn(SignalTo, Vec<u8>) + Send + Sync>;

/// The largest signal relayed between nodes, in bytes (a typing or read frame is well
/// under 200; an offer's first words under 1 KiB).
pub const MAX_SIGNAL_BYTES: usize = 4096;

impl RpcRequest {
    /// Whether a peer that is there answers it within a second (see `Peers`). A forwarded
    /// write counts: it is how a follower, which sends the leader nothing else, finds a
    /// dead leader's connection silent (measured: recovery after a leader kill went from
    /// 0.5 to 1.3 s at the median without it).
    fn answers_quickly(&self) -> bool {
        matches!(
            self,
            RpcRequest::Append { .. } | RpcRequest::AppendQuiet { .. } | RpcRequest::Vote { .. } | RpcRequest::ReadIndex { .. } | RpcRequest::Write { .. } | RpcRequest::Status | RpcRequest::Shards
        )
    }

    /// Whether only a node may ask it: everything but where the groups are (`Status`,
    /// `Shards`). A gateway relays its sockets and requests to members, which decide
    /// them as their own edge would (ADR 0008, ADR 0012); it takes no part in Raft,
    /// reads no group's state, proposes no command and reads or stores no file itself.
    fn is_nodes_only(&self) -> bool {
        !matches!(self, RpcRequest::Status | RpcRequest::Shards)
    }

    /// The group a Raft request (entries, a snapshot, a vote) is for, and who speaks.
    fn raft_traffic(&self) -> Option<(u64, NodeId)> {
        match self {
            RpcRequest::Append { group, rpc } | RpcRequest::AppendQuiet { group, rpc } => Some((*group, rpc.vote.leader_id().node_id)),
            RpcRequest::Snapshot { group, rpc } => Some((*group, rpc.vote.leader_id().node_id)),
            RpcRequest::Vote { group, rpc } => Some((*group, rpc.vote.leader_id().node_id)),
            _ => None,
        }
    }

    /// The node a Raft request speaks for: the candidate of a vote, the leader of entries
    /// or a snapshot, the node a `Join` asks to admit (a node asks to join only for
    /// itself; placing others goes through `Learn` and `Voters`). It must be one the
    /// peer's certificate is issued to.
    fn raft_speaker(&self) -> Option<NodeId> {
        match self {
            RpcRequest::Members { change: crate::members::Change::Join { id, .. }, .. } => Some(*id),
            _ => self.raft_traffic().map(|(_, speaker)| speaker),
        }
    }
}

#[derive(Serialize, Deserialize)]
enum RpcResponse {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    UnknownGroup(u64),
    BadRequest(String),
    Write(Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, Node>>>),
    Stored(Result<(), String>),
    File(Result<Option<Vec<u8>>, String>),
    Members(crate::members::Answer),
    /// The leader's read index; or, from a member that does not lead, who does.
    ReadIndex(Result<u64, Option<(NodeId, Node)>>),
    /// A forwarded entry whose fate the leader cannot tell (see `forwarded_write`).
    WriteUnknown(String),
    /// A forwarded entry the leader's check refused: it is in no log.
    WriteRefused(String),
    Status(MemberStatus),
    /// The answer to a `Read`, as the node encoded it.
    Read(Result<Vec<u8>, String>),
    Shards(Vec<ShardStatus>),
    /// The answer to `Sending`: for each entry asked about, whether this process sends it.
    Sending(Vec<bool>),
    /// The answer to `SendingStates`: each entry's [`sending_state`].
    SendingStates(Vec<u8>),
    /// The answer to `Rules`.
    Rules(u32),
}

/// One conversation shard as a member sees it (answer to a gateway's `Shards` poll).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// The shard's Raft group.
    pub group: u64,
    /// The leader this member knows of, with its term; `None` when this member holds
    /// no copy of the shard (it cannot know).
    pub leader: Option<(NodeId, u64)>,
    /// The nodes that hold a copy (its voters).
    pub holders: Vec<NodeId>,
}

/// What answers a gateway's `Shards` poll on this node: the conversation shards in
/// order (conversation `id` lives in the `id % len`-th), empty on a node of one group.
pub type ShardsSource = Arc<dyn Fn() -> Vec<ShardStatus> + Send + Sync>;

/// What answers another node's `Sending` and `SendingStates` questions: for each
/// outbox entry, its [`sending_state`].
pub type SendingSource = Arc<dyn Fn(&[(u64, u64)]) -> Vec<u8> + Send + Sync>;

/// Whether a node id was removed from the cluster (the metadata group's record): such a
/// node is admitted to no group again, whatever certificate it holds.
pub type RemovedSource = Arc<dyn Fn(NodeId) -> bool + Send + Sync>;

/// The most outbox entries one `Sending` question may name.
pub const MAX_SENDING_KEYS: usize = 1000;

/// What a member says of itself and the cluster (answer to a gateway's poll).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// This member's node id.
    pub node: NodeId,
    /// The leader this member knows of.
    pub leader: Option<NodeId>,
    /// The group's members (voters and learners) with their QUIC addresses.
    pub members: Vec<(NodeId, String)>,
    /// Whether this member serves clients now (its `/readyz`).
    pub ready: bool,
}

/// The first byte of a stream that carries relayed client traffic (HTTP/1.1, and a
/// WebSocket after an upgrade) instead of one RPC. An RPC stream starts with its
/// variant's index, which is far below it.
pub const RELAY_TAG: u8 = 0xF7;

/// Serves streams a gateway relays (see [`RELAY_TAG`]); the node's edge implements it.
pub trait Relay: Send + Sync + 'static {
    /// Serves one relayed stream (the tag already read) from a peer holding `role`.
    fn serve(
        &self,
        role: Role,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> futures::future::BoxFuture<'static, ()>;
}

/// Answers other nodes' questions about the groups this node is a member of, and their
/// requests to follow a stream (ADR 0012). The node encodes questions and answers; the
/// transport routes by group and never looks inside.
pub trait GroupReads: Send + Sync + 'static {
    /// The encoded answer to `query` about `group`'s applied state.
    fn read(&self, group: u64, query: Vec<u8>) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>>;
    /// A value that changes each time stream `stream` of `group` moves (the node
    /// chooses it by the stream's format: a counter of moves, or a log index).
    fn watch(&self, group: u64, stream: Vec<u8>) -> futures::future::BoxFuture<'static, Result<tokio::sync::watch::Receiver<u64>, String>>;
}

/// The status byte that opens a `Watch` answer: followed by the stream's values, or by the reason
/// it was refused (UTF-8, to the end of the stream).
const WATCHING: u8 = 0;
const WATCH_REFUSED: u8 = 1;

/// What answers a gateway's status poll on this node.
pub type StatusSource = Arc<dyn Fn() -> MemberStatus + Send + Sync>;

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let config = bincode::config::standard().with_limit::<MAX_RPC_BYTES>();
    bincode::serde::decode_from_slice(bytes, config).map(|(v, _)| v).map_err(|e| e.to_string())
}

/// Files a node keeps beside its groups' records, by id (attachment bytes): what peers
/// push and fetch. The node checks ids; the transport passes them through.
pub trait Files: Send + Sync + 'static {
    /// Stores `bytes` durably under `id` before answering.
    fn put(&self, id: String, bytes: Vec<u8>) -> futures::future::BoxFuture<'static, Result<(), String>>;
    /// The file, or `None` when this node does not hold it.
    fn get(&self, id: String) -> futures::future::BoxFuture<'static, Result<Option<Vec<u8>>, String>>;
}

/// The groups this node hosts, by id, and its files: where incoming RPCs are delivered.
#[derive(Clone, Default)]
pub struct Router {
    groups: Arc<RwLock<HashMap<u64, Raft>>>,
    /// Per group: what a forwarded entry must pass (and may be rewritten by) before the
    /// leader appends it.
    checks: Arc<RwLock<HashMap<u64, WriteCheck>>>,
    files: Arc<RwLock<Option<Arc<dyn Files>>>>,
    status: Arc<RwLock<Option<StatusSource>>>,
    shards: Arc<RwLock<Option<ShardsSource>>>,
    sending: Arc<RwLock<Option<SendingSource>>>,
    removed: Arc<RwLock<Option<RemovedSource>>>,
    /// The newest routing rules this build decides with (0 until the node says).
    rules: Arc<std::sync::atomic::AtomicU32>,
    signals: Arc<RwLock<Option<SignalSink>>>,
    relay: Arc<RwLock<Option<Arc<dyn Relay>>>>,
    reads: Arc<RwLock<Option<Arc<dyn GroupReads>>>>,
    /// Per group: the gate new entries pass before this node appends them (held while
    /// leadership moves away, `members::Change::Lead`), whether the group is quiet
    /// here (`quiet`), and when a leader's append last arrived.
    locals: Arc<crate::quiet::Locals>,
    /// How this node reaches its peers (set once the endpoint is up): what a leadership
    /// move uses to ask the next leader to stand.
    peers: Arc<RwLock<Option<Peers>>>,
}

/// The longest a held gate keeps one of this node's entries waiting; the entry then goes
/// on to whoever leads (a hand-over takes well under it).
pub const MAX_HOLD: Duration = Duration::from_secs(3);

/// Where a group's new entries wait while its leadership is handed to another member,
/// so that no append renews the followers' leases meanwhile: this node's own proposals
/// wait (never longer than [`MAX_HOLD`]), and entries other members forward are
/// refused untouched, to be sent again to the next leader. Held by a [`GateHold`].
///
/// Passing it wakes a quiet group (`quiet`): whatever is about to be written goes out
/// with the leader's heartbeats on.
#[derive(Clone)]
pub struct Gate(Arc<crate::quiet::Local>);

/// Keeps a [`Gate`] closed until dropped.
pub struct GateHold(Gate);

impl Drop for GateHold {
    fn drop(&mut self) {
        self.0 .0.held.send_replace(false);
    }
}

impl Gate {
    /// Waits while the gate is held, [`MAX_HOLD`] at most.
    pub async fn pass(&self) {
        self.0.wake();
        if !*self.0.held.borrow() {
            return;
        }
        let mut open = self.0.held.subscribe();
        let _ = tokio::time::timeout(MAX_HOLD, open.wait_for(|held| !*held)).await;
    }

    /// Closes the gate until the returned hold is dropped; `None` while another hold
    /// has it closed.
    pub fn try_hold(&self) -> Option<GateHold> {
        let mut taken = false;
        self.0.held.send_if_modified(|held| {
            taken = !*held;
            *held = true;
            taken
        });
        taken.then(|| GateHold(self.clone()))
    }

    /// Whether the gate is held now.
    pub fn held(&self) -> bool {
        *self.0.held.borrow()
    }

    /// Wakes a quiet group on this leader and keeps it awake for a while: a membership
    /// change or a hand-over is about to be made.
    pub fn busy(&self) {
        self.0.busy();
    }
}

/// Checks a forwarded entry on the leader and returns the bytes to append: an entry the
/// group's machine cannot read is refused before it reaches the log (every replica
/// would stop on it), and the leader may restamp it.
pub type WriteCheck = Arc<dyn Fn(Vec<u8>) -> Result<Vec<u8>, String> + Send + Sync>;

impl Router {
    pub fn add(&self, group: u64, raft: Raft) {
        self.locals.get(group).set_raft(Some(raft.clone()));
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(group, raft);
    }

    pub fn remove(&self, group: u64) {
        self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&group);
        if let Some(local) = self.locals.find(group) {
            local.set_raft(None);
        }
    }

    /// What `group`'s network clients read to send its empty appends as quiet beats
    /// ([`NetworkFactory::quiet_when`]).
    pub fn quiet_mark(&self, group: u64) -> QuietMark {
        let local = self.locals.get(group);
        QuietMark { marked: local.marked.clone(), local: Arc::downgrade(&local) }
    }

    /// Lets this node make `group` quiet while it leads it and nothing is written (see
    /// `quiet`); off unless asked. Groups that every request depends on (a cluster's
    /// metadata and routing) stay awake, so that their failover stays fast.
    pub fn allow_quiet(&self, group: u64, allowed: bool) {
        self.locals.get(group).allowed.store(allowed, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes a change of `group`'s voters that this node finishes (one left half made,
    /// `quiet::JOINT_PATIENCE`) drop the voters it leaves out, instead of keeping them
    /// as learners: for a group whose members are the cluster's nodes and whose voters
    /// change only when a node leaves (a cluster's one group), where a learner kept
    /// would still count as a node of the cluster. Not for a split cluster's metadata
    /// group, whose votes also move between nodes that stay.
    pub fn drop_left_out_voters(&self, group: u64, drop: bool) {
        self.locals.get(group).drop_left_out.store(drop, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `group` is quiet on this node, and as what (see `quiet`).
    pub fn quietness(&self, group: u64) -> crate::quiet::Quietness {
        self.locals.find(group).map(|l| l.quietness()).unwrap_or_default()
    }

    /// Appends (plain, or quiet beats) this node received from `group`'s leaders.
    pub fn appends_received(&self, group: u64) -> u64 {
        self.locals.find(group).map_or(0, |l| l.appends.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Holds this member's elections in `group` (after a restart, until a leader is
    /// heard), or lets them run again: they stay off while a quiet leader's beats are
    /// awaited.
    pub fn hold_elections(&self, group: u64, hold: bool) {
        self.locals.get(group).hold_elections(hold);
    }

    /// Forwarded entries for `group` pass `check` on this node before it appends them.
    pub fn check_writes(&self, group: u64, check: WriteCheck) {
        self.checks.write().unwrap_or_else(|p| p.into_inner()).insert(group, check);
    }

    /// The gate `group`'s new entries pass on this node (the proposer's and forwarded ones).
    pub fn gate(&self, group: u64) -> Gate {
        Gate(self.locals.get(group))
    }

    /// How this node reaches its peers: needed to hand a group's leadership on. Starts
    /// the monitor that quiets idle groups (`quiet`), which ends with the router.
    pub fn set_peers(&self, peers: Peers) {
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Some(peers);
        self.locals.start(Arc::downgrade(&self.peers));
    }

    fn peers(&self) -> Option<Peers> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `group`'s leader sent this node entries or a heartbeat within `window`.
    pub fn heard_within(&self, group: u64, window: Duration) -> bool {
        self.locals.find(group).is_some_and(|l| l.heard_within(window))
    }

    /// Serves peers' file pushes and fetches from `files`.
    pub fn set_files(&self, files: Arc<dyn Files>) {
        *self.files.write().unwrap_or_else(|p| p.into_inner()) = Some(files);
    }

    /// Answers gateways' status polls from `status`.
    pub fn set_status(&self, status: StatusSource) {
        *self.status.write().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    /// Answers gateways' shard polls from `shards`.
    pub fn set_shards(&self, shards: ShardsSource) {
        *self.shards.write().unwrap_or_else(|p| p.into_inner()) = Some(shards);
    }

    /// Answers other nodes' `Rules` question: this build decides with routing rules up
    /// to `rules`.
    pub fn set_rules(&self, rules: u32) {
        self.rules.store(rules, std::sync::atomic::Ordering::Relaxed);
    }

    /// Refuses to admit the nodes `removed` names (`Join`, `Learn`, new voters), and
    /// takes no such change from a peer whose certificate names only removed nodes.
    pub fn set_removed(&self, removed: RemovedSource) {
        *self.removed.write().unwrap_or_else(|p| p.into_inner()) = Some(removed);
    }

    /// Whether every node id a peer's certificate names was removed from the cluster.
    fn removed_peer(&self, ids: &[NodeId]) -> bool {
        let Some(removed) = self.removed.read().unwrap_or_else(|p| p.into_inner()).clone() else { return false };
        !ids.is_empty() && ids.iter().all(|id| removed(*id))
    }

    /// Whether `speaker`, removed from the cluster, is no member of group `group` here:
    /// its entries, snapshots and votes for that group are refused (one append at a
    /// higher term would depose the group's leader). While its removal is under way it
    /// is still a member of the groups it leaves, and is heard in them.
    fn removed_stranger(&self, group: u64, speaker: NodeId) -> bool {
        let Some(removed) = self.removed.read().unwrap_or_else(|p| p.into_inner()).clone() else { return false };
        if !removed(speaker) {
            return false;
        }
        self.get(group).is_some_and(|raft| raft.metrics().borrow().membership_config.membership().get_node(&speaker).is_none())
    }

    /// The node a membership change would admit that was removed from the cluster: one
    /// that is not a member of the group now (a member stays one until its removal is
    /// made, which may take a while on a split cluster).
    fn admits_removed(&self, raft: &Raft, change: &crate::members::Change) -> Option<NodeId> {
        let removed = self.removed.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        let membership = raft.metrics().borrow().membership_config.membership().clone();
        let newcomer = |id: &NodeId| membership.get_node(id).is_none() && removed(*id);
        match change {
            crate::members::Change::Join { id, .. } | crate::members::Change::Learn { id, .. } => newcomer(id).then_some(*id),
            crate::members::Change::Voters { voters, .. } => voters.iter().copied().find(|id| newcomer(id)),
            _ => None,
        }
    }

    /// Answers other nodes' `Sending` questions from `sending`.
    pub fn set_sending(&self, sending: SendingSource) {
        *self.sending.write().unwrap_or_else(|p| p.into_inner()) = Some(sending);
    }

    /// The answer to `SendingStates` (`states`), or to `Sending` (what nodes of earlier
    /// builds ask: whether each entry is being sent now).
    fn sending_answer(&self, keys: &[(u64, u64)], states: bool) -> RpcResponse {
        let source = self.sending.read().unwrap_or_else(|p| p.into_inner()).clone();
        match source {
            _ if keys.len() > MAX_SENDING_KEYS => RpcResponse::BadRequest(format!("at most {MAX_SENDING_KEYS} outbox entries per question")),
            Some(source) if states => RpcResponse::SendingStates(source(keys)),
            Some(source) => RpcResponse::Sending(source(keys).into_iter().map(|s| s == sending_state::SENDING).collect()),
            // Not wired (yet): no answer rather than a guess; the asker waits.
            None => RpcResponse::BadRequest("this node does not say which outbox entries it sends".into()),
        }
    }

    /// Delivers other nodes' signals to this node's sockets through `signals`.
    pub fn set_signals(&self, signals: SignalSink) {
        *self.signals.write().unwrap_or_else(|p| p.into_inner()) = Some(signals);
    }

    /// Serves relayed client traffic with `relay`.
    pub fn set_relay(&self, relay: Arc<dyn Relay>) {
        *self.relay.write().unwrap_or_else(|p| p.into_inner()) = Some(relay);
    }

    /// Answers reads of this node's groups with `reads`.
    pub fn set_reads(&self, reads: Arc<dyn GroupReads>) {
        *self.reads.write().unwrap_or_else(|p| p.into_inner()) = Some(reads);
    }

    fn reads(&self) -> Option<Arc<dyn GroupReads>> {
        self.reads.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn relay(&self) -> Option<Arc<dyn Relay>> {
        self.relay.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn files(&self) -> Option<Arc<dyn Files>> {
        self.files.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn get(&self, group: u64) -> Option<Raft> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()
    }

    /// Group `group`'s Raft on this node, if it hosts it.
    pub fn group(&self, group: u64) -> Option<Raft> {
        self.get(group)
    }

    async fn dispatch(&self, request: RpcRequest) -> RpcResponse {
        match request {
            RpcRequest::Append { group, rpc } => match self.get(group) {
                Some(raft) => {
                    let local = self.locals.get(group);
                    local.touch();
                    let answer = raft.append_entries(rpc).await;
                    // A plain append from the leader (not from a deposed one): this
                    // member's own election timer runs again.
                    local.heard(answer_from_leader(&answer).then_some(None));
                    RpcResponse::Append(answer)
                }
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::AppendQuiet { group, rpc } => match self.get(group) {
                Some(raft) => {
                    let local = self.locals.get(group);
                    local.touch();
                    let leader = rpc.vote.leader_id().voted_for();
                    let answer = raft.append_entries(rpc).await;
                    // Accepted: this member takes that leader's beats as its timer.
                    let accepted = matches!(answer, Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)));
                    local.heard(leader.filter(|_| accepted).map(Some));
                    RpcResponse::Append(answer)
                }
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::Snapshot { group, rpc } => match self.get(group) {
                Some(raft) => RpcResponse::Snapshot(raft.install_snapshot(rpc).await),
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::Vote { group, rpc } => match self.get(group) {
                Some(raft) => {
                    let candidate_log = rpc.last_log_id;
                    let candidate_term = rpc.vote.leader_id().term;
                    let answer = raft.vote(rpc).await;
                    // A candidate whose log is behind ours cannot win; if our leader has
                    // been silent too, we stand at once instead of waiting out our own
                    // timeout, which its request just restarted (measured: a leader kill
                    // took 1.2 s instead of 0.6 s when this happened).
                    if let Ok(vote) = &answer {
                        // Silent means past our own leader lease (`election_timeout_max`):
                        // the candidate was refused for its log, not for the lease, and we
                        // would vote ourselves. Standing while a leader is still heard
                        // deposes it (measured: a restarted member's stale candidacy made
                        // another stand and the live leader step down). A member that never
                        // heard a leader since it started does not stand either.
                        let lease = Duration::from_millis(raft.config().election_timeout_max);
                        // A member waiting for a quiet leader's beats hears one every
                        // 500 ms: silent only after `quiet::SILENCE`.
                        let silent = self.locals.find(group).is_some_and(|l| l.silent_for(lease));
                        if !vote.vote_granted && vote.last_log_id > candidate_log && silent {
                            let raft = raft.clone();
                            let ours = vote.last_log_id;
                            tokio::spawn(async move {
                                debug!(group, "refused a stale candidate with the leader silent: standing for election");
                                // Standing at our term + 1 can tie with the candidate's term,
                                // and a tie goes to the higher node id: the stale candidate
                                // would refuse us and the next round would wait a whole
                                // timeout (measured: leader kills that took 1.0-1.3 s). So
                                // first take the candidate's term for ourselves (our own
                                // vote: we voted for nobody else in it), then stand above it.
                                let (me, term, follows) = {
                                    let m = raft.metrics().borrow().clone();
                                    // Only a follower of a leader that went silent: not a
                                    // leader (it hears no appends, its "silent" means
                                    // nothing), not a candidate (the self-vote would leave
                                    // its candidacy at a lower term than its vote), and not
                                    // one that just voted for another candidate (an
                                    // uncommitted vote), whose first append may be on its way.
                                    (m.id, m.current_term, m.state == openraft::ServerState::Follower && m.vote.is_committed())
                                };
                                if !follows {
                                    return;
                                }
                                if term < candidate_term {
                                    let _ = raft.vote(VoteRequest::new(openraft::Vote::new(candidate_term, me), ours)).await;
                                }
                                let _ = raft.trigger().elect().await;
                            });
                        }
                    }
                    RpcResponse::Vote(answer)
                }
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::Write { group, request } => match self.get(group) {
                Some(raft) => {
                    self.locals.get(group).wake();
                    let check = self.checks.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned();
                    let checked = match check {
                        Some(check) => check(request.0),
                        None => Ok(request.0),
                    };
                    match checked {
                        // Leadership is being handed on: refused untouched, with no
                        // leader named, so the forwarding member asks again shortly and
                        // reaches the next leader.
                        Ok(_) if self.gate(group).held() => {
                            let refused = openraft::error::ForwardToLeader { leader_id: None, leader_node: None };
                            RpcResponse::Write(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(refused))))
                        }
                        Ok(bytes) => forwarded_write(&raft, Request(bytes)).await,
                        Err(why) => RpcResponse::WriteRefused(why),
                    }
                }
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::PutFile { id, bytes } => match self.files() {
                Some(files) => RpcResponse::Stored(files.put(id, bytes).await),
                None => RpcResponse::Stored(Err("this node keeps no files".into())),
            },
            RpcRequest::Members { group, change } => match self.get(group) {
                Some(raft) => match self.admits_removed(&raft, &change) {
                    Some(id) => {
                        debug!(node = id, group, "refused to admit a node that was removed from the cluster");
                        RpcResponse::Members(crate::members::Answer::Refused(format!("node {id} {}", crate::members::REMOVED_FROM_CLUSTER)))
                    }
                    None => {
                        self.locals.get(group).busy();
                        let (gate, peers) = (self.gate(group), self.peers());
                        RpcResponse::Members(crate::members::apply_here(&raft, group, change, &gate, peers.as_ref()).await)
                    }
                },
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::ReadIndex { group } => match self.get(group) {
                // A read index makes the leader contact its voters, which would renew the
                // leases a hand-over is waiting out: asked again shortly, of the next leader.
                Some(_) if self.gate(group).held() => RpcResponse::ReadIndex(Err(None)),
                Some(raft) => RpcResponse::ReadIndex(read_index(&raft).await),
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::GetFile { id } => match self.files() {
                Some(files) => RpcResponse::File(files.get(id).await),
                None => RpcResponse::File(Ok(None)),
            },
            RpcRequest::Status => {
                let source = self
                    .status
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                RpcResponse::Status(source.map(|s| s()).unwrap_or_default())
            }
            RpcRequest::Shards => {
                let source = self.shards.read().unwrap_or_else(|p| p.into_inner()).clone();
                RpcResponse::Shards(source.map(|s| s()).unwrap_or_default())
            }
            RpcRequest::Sending { keys } => self.sending_answer(&keys, false),
            RpcRequest::SendingStates { keys } => self.sending_answer(&keys, true),
            RpcRequest::Rules => match self.rules.load(std::sync::atomic::Ordering::Relaxed) {
                0 => RpcResponse::BadRequest("this node has not said which routing rules it knows".into()),
                rules => RpcResponse::Rules(rules),
            },
            RpcRequest::Signal { to, signal } => {
                let sink = self.signals.read().unwrap_or_else(|p| p.into_inner()).clone();
                match sink {
                    _ if signal.len() > MAX_SIGNAL_BYTES => RpcResponse::BadRequest(format!("a signal is at most {MAX_SIGNAL_BYTES} bytes")),
                    Some(sink) => {
                        sink(to, signal);
                        RpcResponse::Stored(Ok(()))
                    }
                    None => RpcResponse::BadRequest("this node takes no signals".into()),
                }
            }
            RpcRequest::Read { group, query } => match (self.get(group), self.reads()) {
                (Some(_), Some(reads)) => RpcResponse::Read(reads.read(group, query).await),
                (Some(_), None) => RpcResponse::Read(Err("this node answers no reads".into())),
                (None, _) => RpcResponse::UnknownGroup(group),
            },
            // Served as a stream by `serve_stream`, never dispatched.
            RpcRequest::Watch { .. } => RpcResponse::BadRequest("a watch is a stream of its own".into()),
        }
    }
}

/// Whether an append's answer shows it came from this member's leader: anything but
/// a refusal for a stale vote (a deposed leader still sending) or an error.
fn answer_from_leader(answer: &Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>) -> bool {
    !matches!(answer, Ok(AppendEntriesResponse::HigherVote(_)) | Err(_))
}

/// How long the leader works on a forwarded entry before it answers that the outcome is
/// unknown (the forwarding member has given up after its own 3 s by then).
const FORWARDED_PATIENCE: Duration = Duration::from_secs(10);

/// Appends a forwarded entry if this node leads. `ForwardToLeader` is answered only when
/// the entry was refused untouched (this node did not lead when asked): the forwarding
/// member may send it elsewhere. openraft also answers `ForwardToLeader` for an entry it
/// appended and then truncated, which another node may still hold: that, and an entry
/// not committed in time, is answered `WriteUnknown`, never to be resent by a node.
async fn forwarded_write(raft: &Raft, request: Request) -> RpcResponse {
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        let leader_node = m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        let refused = openraft::error::ForwardToLeader { leader_id: m.current_leader, leader_node };
        return RpcResponse::Write(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(refused))));
    }
    match tokio::time::timeout(FORWARDED_PATIENCE, raft.client_write(request)).await {
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
            RpcResponse::WriteUnknown("the leader lost its leadership before the entry committed".into())
        }
        Ok(answer) => RpcResponse::Write(answer),
        Err(_) => RpcResponse::WriteUnknown(format!("not committed within {} s", FORWARDED_PATIENCE.as_secs())),
    }
}

/// On the leader: the index every entry committed so far is at or below (after it
/// confirmed with a quorum that it still leads). Elsewhere: who leads, if known.
async fn read_index(raft: &Raft) -> Result<u64, Option<(NodeId, Node)>> {
    match raft.ensure_linearizable().await {
        Ok(read) => Ok(read.map(|l| l.index).unwrap_or(0)),
        Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(to))) => Err(to.leader_id.zip(to.leader_node)),
        Err(_) => Err(None),
    }
}

/// Waits until this node's Raft names a leader `new` accepts. Never ends if that Raft
/// stopped: callers bound the wait.
pub async fn leader_elected(metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, Node>>, mut new: impl FnMut(NodeId) -> bool) {
    if metrics.wait_for(|m| m.current_leader.is_some_and(&mut new)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits until this node has applied everything committed in `group` before the call:
/// a read made afterwards on this node sees every write acknowledged before it, as a
/// read on the leader would. One round trip to the leader (none on the leader).
pub async fn read_barrier(raft: &Raft, peers: &Peers, group: u64, patience: Duration) -> Result<(), String> {
    let give_up = tokio::time::Instant::now() + patience;
    let mut answer = read_index(raft).await;
    loop {
        match answer {
            Ok(index) => {
                let left = give_up.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(1));
                return raft.wait(Some(left)).applied_index_at_least(Some(index), "read barrier").await.map(drop).map_err(|e| e.to_string());
            }
            Err(leader) => {
                if tokio::time::Instant::now() >= give_up {
                    return Err(format!("no leader answered within {} ms", patience.as_millis()));
                }
                let mut metrics = raft.metrics();
                // The leader this node knows of now: a wait below ends when another is.
                let seen = metrics.borrow_and_update().current_leader;
                answer = match leader {
                    Some((asked, node)) => {
                        // A leader killed while it is asked answers never; its connection
                        // is called silent only after `SILENT`. This node's Raft sees the
                        // election sooner: then the new leader is asked. A leader named by
                        // another node may not be known here yet, so the wait ends only on
                        // one that is neither it nor the one this node knew.
                        let elected = leader_elected(&mut metrics, |l| l != asked && Some(l) != seen);
                        let request = RpcRequest::ReadIndex { group };
                        tokio::select! {
                            reply = peers.exchange(&node.addr, &request, patience) => match reply {
                                Ok(RpcResponse::ReadIndex(answer)) => answer,
                                _ => {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    read_index(raft).await
                                }
                            },
                            _ = elected => read_index(raft).await,
                        }
                    }
                    None => {
                        // No leader to ask (none known, one not in the membership yet, or
                        // this node leads without its quorum): ask again once another is
                        // known, or after 50 ms.
                        let known = leader_elected(&mut metrics, |l| Some(l) != seen);
                        let _ = tokio::time::timeout(Duration::from_millis(50), known).await;
                        read_index(raft).await
                    }
                };
            }
        }
    }
}

/// Refused handshakes (a certificate from another CA, none at all, a scanner) are
/// logged as warnings, at most one line every 10 s with the count of the others.
#[derive(Default)]
struct RefusalLog {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
    speakers: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RefusalLog {
    fn note(&self, remote: SocketAddr, error: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, quiet) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            *quiet += 1;
            return;
        }
        warn!(%remote, error, refused_since_last_line = *quiet, "refused a peer's QUIC handshake: it holds no valid certificate from the cluster CA");
        *last = Some(std::time::Instant::now());
        *quiet = 0;
    }

    /// A Raft request from a node that spoke for another node's id (at most a line every
    /// 10 s, with how many were refused since).
    fn note_speaker(&self, remote: SocketAddr, claimed: NodeId, issued: &[NodeId]) {
        let mut state = self.speakers.lock().unwrap_or_else(|p| p.into_inner());
        let (last, quiet) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            *quiet += 1;
            return;
        }
        warn!(%remote, claimed, ?issued, refused_since_last_line = *quiet, "refused a Raft request that spoke for a node its certificate is not issued to");
        *last = Some(std::time::Instant::now());
        *quiet = 0;
    }
}

/// Accepts peers on `endpoint` until it is closed, delivering their RPCs to `router`.
pub fn serve(endpoint: quinn::Endpoint, router: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let refusals = Arc::new(RefusalLog::default());
        while let Some(incoming) = endpoint.accept().await {
            let router = router.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let connection = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        refusals.note(remote, &e.to_string());
                        return;
                    }
                };
                // Signed by the cluster CA (the handshake checked), but for what?
                let Some(role) = Role::of_peer(&connection) else {
                    refusals.note(remote, "its certificate names neither a node nor a gateway");
                    connection.close(1u32.into(), b"no role");
                    return;
                };
                let caller = Arc::new(Caller { role, node_ids: crate::tls::node_ids_of_peer(&connection), remote, refusals: refusals.clone() });
                loop {
                    let (send, recv) = match connection.accept_bi().await {
                        Ok(streams) => streams,
                        Err(_) => return,
                    };
                    let (router, caller) = (router.clone(), caller.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve_stream(router, &caller, send, recv).await {
                            debug!(error = %e, "rpc stream failed");
                        }
                    });
                }
            });
        }
    })
}

/// How a member's refusal of a request that speaks for a node the asking certificate
/// is not issued to begins.
pub const NOT_ISSUED_TO: &str = "this certificate speaks in Raft only as node";

/// Whether a line logged at most every 10 s (however often its cause recurs) is due
/// now, `last` being when it was last logged; marks it logged.
fn due_every_10s(last: &std::sync::Mutex<Option<std::time::Instant>>) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let due = last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10));
    if due {
        *last = Some(std::time::Instant::now());
    }
    due
}

/// Who is at the other end of a connection: its certificate's role and node ids.
struct Caller {
    role: Role,
    node_ids: Vec<NodeId>,
    remote: SocketAddr,
    refusals: Arc<RefusalLog>,
}

async fn serve_stream(router: Router, peer: &Caller, mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), String> {
    let role = peer.role;
    let mut first = [0u8; 1];
    tokio::time::timeout(RPC_PATIENCE, recv.read_exact(&mut first))
        .await
        .map_err(|_| "a request did not begin in time".to_string())?
        .map_err(|e| e.to_string())?;
    if first[0] == RELAY_TAG {
        return match router.relay() {
            Some(relay) => {
                relay.serve(role, send, recv).await;
                Ok(())
            }
            None => Err("relayed traffic, but this node serves no edge".into()),
        };
    }
    let mut body = Vec::with_capacity(64);
    body.push(first[0]);
    // A gateway may ask only where the groups are (`Status`, `Shards`: a few bytes), so
    // its body is refused past that before it is held; a node's within its deadline.
    let cap = if role == Role::Gateway { MAX_GATEWAY_RPC_BYTES } else { MAX_RPC_BYTES - 1 };
    let rest = tokio::time::timeout(RPC_PATIENCE, recv.read_to_end(cap)).await.map_err(|_| "a request's body did not arrive in time".to_string())?;
    body.extend(rest.map_err(|e| e.to_string())?);
    let response = match decode::<RpcRequest>(&body) {
        Ok(request) if role == Role::Gateway && request.is_nodes_only() => {
            warn!("refused a node's request (Raft, a read, a write or a file) from a peer holding a gateway certificate");
            RpcResponse::BadRequest("a gateway's certificate may only ask where the groups are and relay client work".into())
        }
        Ok(request) if request.raft_speaker().is_some_and(|id| !peer.node_ids.contains(&id)) => {
            let id = request.raft_speaker().unwrap_or_default();
            peer.refusals.note_speaker(peer.remote, id, &peer.node_ids);
            RpcResponse::BadRequest(format!("{NOT_ISSUED_TO} {:?}, not as node {id}", peer.node_ids))
        }
        Ok(request) if request.raft_traffic().is_some_and(|(group, speaker)| router.removed_stranger(group, speaker)) => {
            static LOGGED_AT: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
            if due_every_10s(&LOGGED_AT) {
                warn!(ids = ?peer.node_ids, "refused Raft traffic from a node that was removed from the cluster, for a group it is no member of");
            }
            RpcResponse::BadRequest(format!("node {:?} {}", peer.node_ids, crate::members::REMOVED_FROM_CLUSTER))
        }
        // A removed node's certificate, under whatever id it now asks: no admission, nor
        // any placement it would make (while its removal is under way it keeps serving
        // its groups, and hands its leadership on with `Stand`).
        Ok(RpcRequest::Members { change: crate::members::Change::Join { .. } | crate::members::Change::Learn { .. } | crate::members::Change::Voters { .. }, .. })
            if router.removed_peer(&peer.node_ids) =>
        {
            static LOGGED_AT: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
            if due_every_10s(&LOGGED_AT) {
                warn!(ids = ?peer.node_ids, "refused a membership change asked by a node that was removed from the cluster");
            }
            RpcResponse::Members(crate::members::Answer::Refused(format!("node {:?} {}", peer.node_ids, crate::members::REMOVED_FROM_CLUSTER)))
        }
        Ok(RpcRequest::Watch { group, stream }) => return serve_watch(&router, group, stream, send).await,
        Ok(request) => router.dispatch(request).await,
        Err(e) => RpcResponse::BadRequest(e),
    };
    let bytes = encode(&response)?;
    let answered = tokio::time::timeout(RPC_PATIENCE, async {
        send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        // Wait for the peer to read everything before the stream is dropped.
        let _ = send.stopped().await;
        Ok::<(), String>(())
    });
    answered.await.map_err(|_| "the peer did not read its answer in time".to_string())?
}

/// Feeds a peer the value of stream `stream` of `group` each time it moves, until the
/// peer stops reading, the connection ends or the stream's sender goes away.
async fn serve_watch(router: &Router, group: u64, stream: Vec<u8>, mut send: quinn::SendStream) -> Result<(), String> {
    let watched = match (router.get(group), router.reads()) {
        (Some(_), Some(reads)) => reads.watch(group, stream).await,
        (Some(_), None) => Err("this node answers no reads".into()),
        (None, _) => Err(format!("this node is not a member of group {group}")),
    };
    let mut moves = match watched {
        Ok(moves) => moves,
        Err(why) => {
            let mut refusal = vec![WATCH_REFUSED];
            refusal.extend(why.as_bytes());
            send.write_all(&refusal).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            // A peer that never reads it holds this task no longer than an answer's.
            let _ = tokio::time::timeout(RPC_PATIENCE, send.stopped()).await;
            return Ok(());
        }
    };
    let first = *moves.borrow_and_update();
    let mut opening = vec![WATCHING];
    opening.extend(first.to_be_bytes());
    send.write_all(&opening).await.map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            changed = moves.changed() => {
                if changed.is_err() {
                    // The stream ended here (its group stopped): the peer follows another member.
                    let _ = send.finish();
                    return Ok(());
                }
                let at = *moves.borrow_and_update();
                send.write_all(&at.to_be_bytes()).await.map_err(|e| e.to_string())?;
            }
            _ = send.stopped() => return Ok(()),
        }
    }
}

/// One stream followed on a member (see [`Peers::watch`]).
///
/// Dropping it stops the stream, which the member sees (its `stopped`).
pub struct Watching {
    recv: quinn::RecvStream,
}

impl Watching {
    /// The stream's value the next time it moves, or `None` once the member, the
    /// connection or the stream is gone.
    pub async fn next(&mut self) -> Option<u64> {
        let mut at = [0u8; 8];
        self.recv.read_exact(&mut at).await.ok()?;
        Some(u64::from_be_bytes(at))
    }
}

/// Connections to the other nodes, one per address, shared by every group's Raft
/// clients and the forwarder.
///
/// A dial runs in a task of its own, so a caller that gives up (openraft drops an RPC
/// at its timeout) does not cancel it; callers that come while it runs wait for it a
/// little ([`DIAL_JOIN`]) and are then told that the peer is unreachable (openraft then
/// backs off instead of retrying every heartbeat). A connection on which nothing has answered for `SILENT` (1 s) is closed: a
/// peer that died without closing it (kill -9, a cut cable) is found within seconds,
/// not after QUIC's idle timeout, and its callers back off too.
#[derive(Clone)]
pub struct Peers {
    endpoint: quinn::Endpoint,
    peers: Arc<std::sync::Mutex<HashMap<String, Peer>>>,
    /// Silence after which a connection is closed (`SILENT` unless set).
    silent: Duration,
}

#[derive(Default)]
struct Peer {
    connection: Option<quinn::Connection>,
    /// Resolves when the dial in flight ends (whatever its outcome).
    dialing: Option<tokio::sync::watch::Receiver<bool>>,
    /// Since when a request has been waiting with no answer to any since.
    unanswered_since: Option<tokio::time::Instant>,
    /// When the peer last answered anything.
    last_answer: Option<tokio::time::Instant>,
}

/// Entry bytes sent in one AppendEntries at most (one larger entry goes alone): about
/// 2 ms on loopback and 17 ms on a 1 Gbit/s link, well inside the 50 ms openraft allows.
const APPEND_BYTES: usize = 2 * 1024 * 1024;

/// Nothing answered on a connection for this long: it is closed and dialled anew.
const SILENT: Duration = Duration::from_secs(1);
/// A dial that takes longer than this fails (QUIC would wait for its idle timeout), and
/// the next request dials anew. A handshake on a LAN takes milliseconds; one begun
/// while the peer was down gets through at a resend of its first packet (`tls`'s
/// `INITIAL_RTT`), so it is given up soon and a fresh one tried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// A request that finds a dial under way waits this long for it (at most half its own
/// time to live): a vote sent while a dial to a peer that has just come back is
/// finishing goes out on it, instead of failing the election round.
const DIAL_JOIN: Duration = Duration::from_millis(100);

/// An encoded file push ([`Peers::file_push`]), shared by the pushes to every member.
#[derive(Clone)]
pub struct FilePush(Arc<Vec<u8>>);

/// Why no request could be sent to a peer: nothing of it left this node.
#[derive(Debug)]
pub struct Unsent(pub String);

impl Peers {
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Peers { endpoint, peers: Arc::default(), silent: SILENT }
    }

    /// Connections closed after `silent` without an answer instead of `SILENT`: for a
    /// caller that asks often (a gateway polls every member's status every 100 ms) and
    /// wants a dead peer's streams to fail sooner.
    pub fn with_silence(endpoint: quinn::Endpoint, silent: Duration) -> Self {
        Peers { endpoint, peers: Arc::default(), silent }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live connection to `addr`, dialling when there is none; waits for a dial at
    /// most `wait` (for one already in flight, at most half of it or [`DIAL_JOIN`]).
    async fn connection(&self, addr: &str, wait: Duration) -> Result<quinn::Connection, Unsent> {
        let (mut done, joined) = {
            let mut peers = self.lock();
            let peer = peers.entry(addr.to_string()).or_default();
            if let Some(c) = &peer.connection {
                let silent = peer.unanswered_since.is_some_and(|since| since.elapsed() >= self.silent);
                if c.close_reason().is_none() && !silent {
                    return Ok(c.clone());
                }
                if silent {
                    debug!(addr, "peer silent for {:?}: closing its connection", self.silent);
                    c.close(0u32.into(), b"silent");
                }
                peer.connection = None;
                peer.unanswered_since = None;
            }
            if let Some(dialing) = &peer.dialing {
                (dialing.clone(), true)
            } else {
                let socket: SocketAddr = addr.parse().map_err(|e| Unsent(format!("bad address {addr}: {e}")))?;
                let connecting = self.endpoint.connect(socket, NODE_SERVER_NAME).map_err(|e| Unsent(format!("connect {addr}: {e}")))?;
                let (tx, rx) = tokio::sync::watch::channel(false);
                peer.dialing = Some(rx.clone());
                let peers = self.clone();
                let key = addr.to_string();
                tokio::spawn(async move {
                    let outcome = tokio::time::timeout(DIAL_TIMEOUT, connecting).await;
                    {
                        let mut map = peers.lock();
                        let peer = map.entry(key.clone()).or_default();
                        peer.dialing = None;
                        match outcome {
                            Ok(Ok(connection)) => peer.connection = Some(connection),
                            Ok(Err(e)) => debug!(addr = %key, error = %e, "dial failed"),
                            Err(_) => debug!(addr = %key, "dial timed out"),
                        }
                    }
                    let _ = tx.send(true);
                });
                (rx, false)
            }
        };
        // Half the caller's time at most, so that it hears "unreachable" before its own
        // deadline (openraft backs off on that, not on a timeout).
        let wait = if joined { (wait / 2).min(DIAL_JOIN) } else { wait };
        let _ = tokio::time::timeout(wait, done.wait_for(|done| *done)).await;
        let peers = self.lock();
        match peers.get(addr).and_then(|p| p.connection.clone()) {
            Some(c) => Ok(c),
            None if joined => Err(Unsent(format!("{addr} is not reachable yet (dialling)"))),
            None => Err(Unsent(format!("{addr} is not reachable"))),
        }
    }

    /// A request is about to be sent to `addr`.
    fn asking(&self, addr: &str) {
        if let Some(peer) = self.lock().get_mut(addr) {
            peer.unanswered_since.get_or_insert_with(tokio::time::Instant::now);
        }
    }

    /// `addr` answered.
    fn answered(&self, addr: &str) {
        if let Some(peer) = self.lock().get_mut(addr) {
            peer.unanswered_since = None;
            peer.last_answer = Some(tokio::time::Instant::now());
        }
    }

    /// Whether the node at `addr` answered a request within the last `window`: what a
    /// leader uses to tell whether it still reaches a majority (heartbeats go out every
    /// 50 ms, so a peer that is there answers many times a second).
    pub fn answered_within(&self, addr: &str, window: Duration) -> bool {
        self.lock().get(addr).and_then(|p| p.last_answer).is_some_and(|at| at.elapsed() <= window)
    }

    /// Sends one request on its own stream and reads the response, within `ttl`.
    /// `Err(Ok(_))`: nothing was sent. `Err(Err(_))`: it was sent and no answer came.
    async fn exchange(&self, addr: &str, request: &RpcRequest, ttl: Duration) -> Result<RpcResponse, Result<Unsent, String>> {
        let bytes = encode(request).map_err(|e| Ok(Unsent(e)))?;
        self.exchange_encoded(addr, &bytes, ttl, request.answers_quickly()).await
    }

    /// `quick`: the request is answered within milliseconds by a peer that is there, so
    /// waiting on it counts towards calling the peer silent; a snapshot chunk, a file or
    /// a membership change may take seconds and does not.
    async fn exchange_encoded(&self, addr: &str, bytes: &[u8], ttl: Duration, quick: bool) -> Result<RpcResponse, Result<Unsent, String>> {
        let connection = self.connection(addr, ttl.min(Duration::from_secs(1))).await.map_err(Ok)?;
        let (mut send, mut recv) = match tokio::time::timeout(ttl, connection.open_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => return Err(Ok(Unsent(e.to_string()))),
            Err(_) => return Err(Ok(Unsent(format!("no stream to {addr} within {ttl:?}")))),
        };
        if quick {
            self.asking(addr);
        }
        let exchange = async {
            send.write_all(bytes).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let body = recv.read_to_end(MAX_RPC_BYTES).await.map_err(|e| e.to_string())?;
            decode::<RpcResponse>(&body)
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(Ok(response)) => {
                self.answered(addr);
                Ok(response)
            }
            Ok(Err(e)) => Err(Err(e)),
            Err(_) => Err(Err(format!("no answer from {addr} within {ttl:?}"))),
        }
    }
}

impl Peers {
    /// A file push encoded once, to send to several members without a copy each.
    pub fn file_push(id: &str, bytes: Vec<u8>) -> Result<FilePush, String> {
        encode(&RpcRequest::PutFile { id: id.to_string(), bytes }).map(|encoded| FilePush(Arc::new(encoded)))
    }

    /// Pushes a file to the node at `addr`, which stores it durably before answering.
    pub async fn put_file(&self, addr: &str, push: &FilePush, ttl: Duration) -> Result<(), String> {
        match self.exchange_encoded(addr, &push.0, ttl, false).await {
            Ok(RpcResponse::Stored(result)) => result,
            Ok(_) => Err(format!("{addr} answered a file push with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// Asks the node at `addr` to make a change of `group`'s members.
    pub async fn change_members(&self, addr: &str, group: u64, change: crate::members::Change, ttl: Duration) -> Result<crate::members::Answer, String> {
        match self.exchange(addr, &RpcRequest::Members { group, change }, ttl).await {
            Ok(RpcResponse::Members(answer)) => Ok(answer),
            Ok(RpcResponse::UnknownGroup(g)) => Err(format!("{addr} does not host group {g} (yet)")),
            // This node's certificate is not issued to the node it asked to admit: an
            // answer, not a failure to reach the member (any other `BadRequest`, say from
            // a build that cannot decode the request, stays an error, as before).
            Ok(RpcResponse::BadRequest(why)) if why.starts_with(NOT_ISSUED_TO) => Ok(crate::members::Answer::Refused(format!("{addr} refused the request: {why}"))),
            Ok(_) => Err(format!("{addr} answered a membership change with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// The member at `addr`'s view of itself and the cluster, within `ttl`.
    pub async fn status(&self, addr: &str, ttl: Duration) -> Result<MemberStatus, String> {
        match self.exchange(addr, &RpcRequest::Status, ttl).await {
            Ok(RpcResponse::Status(status)) => Ok(status),
            Ok(_) => Err(format!("{addr} answered a status poll with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// The conversation shards as the member at `addr` sees them, within `ttl`.
    pub async fn shards(&self, addr: &str, ttl: Duration) -> Result<Vec<ShardStatus>, String> {
        match self.exchange(addr, &RpcRequest::Shards, ttl).await {
            Ok(RpcResponse::Shards(shards)) => Ok(shards),
            Ok(_) => Err(format!("{addr} answered a shard poll with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// Which of `keys` (outbox entries: conversation id, sequence number) the node at
    /// `addr` is sending now, within `ttl`.
    pub async fn sending(&self, addr: &str, keys: Vec<(u64, u64)>, ttl: Duration) -> Result<Vec<bool>, String> {
        let n = keys.len();
        match self.exchange(addr, &RpcRequest::Sending { keys }, ttl).await {
            Ok(RpcResponse::Sending(flags)) if flags.len() == n => Ok(flags),
            Ok(RpcResponse::BadRequest(why)) => Err(format!("{addr} refused the question: {why}")),
            Ok(_) => Err(format!("{addr} answered which entries it sends with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// Each of `keys`'s [`sending_state`] on the node at `addr`; a node that predates
    /// `SendingStates` is asked `Sending` (and never says `NEVER_SENT`).
    pub async fn sending_states(&self, addr: &str, keys: Vec<(u64, u64)>, ttl: Duration) -> Result<Vec<u8>, String> {
        let n = keys.len();
        match self.exchange(addr, &RpcRequest::SendingStates { keys: keys.clone() }, ttl).await {
            Ok(RpcResponse::SendingStates(states)) if states.len() == n => Ok(states),
            Ok(RpcResponse::BadRequest(_)) => {
                let flags = self.sending(addr, keys, ttl).await?;
                Ok(flags.into_iter().map(|f| if f { sending_state::SENDING } else { sending_state::NOT_SENDING }).collect())
            }
            Ok(_) => Err(format!("{addr} answered which entries it sends with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// The newest routing rules the node at `addr` decides with: `Ok(None)` when it
    /// answered without saying (a build that predates the question), `Err` when it did
    /// not answer within `ttl`.
    pub async fn rules(&self, addr: &str, ttl: Duration) -> Result<Option<u32>, String> {
        match self.exchange(addr, &RpcRequest::Rules, ttl).await {
            Ok(RpcResponse::Rules(rules)) => Ok(Some(rules)),
            Ok(RpcResponse::BadRequest(why)) => {
                tracing::debug!(%addr, %why, "a node did not say which routing rules it knows");
                Ok(None)
            }
            Ok(_) => Err(format!("{addr} answered which routing rules it knows with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// Hands the node at `addr` a signal for its sockets of `to`, within `ttl`.
    pub async fn signal(&self, addr: &str, to: SignalTo, signal: Vec<u8>, ttl: Duration) -> Result<(), String> {
        match self.exchange(addr, &RpcRequest::Signal { to, signal }, ttl).await {
            Ok(RpcResponse::Stored(result)) => result,
            Ok(RpcResponse::BadRequest(why)) => Err(format!("{addr} refused the signal: {why}")),
            Ok(_) => Err(format!("{addr} answered a signal with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// A stream to the member at `addr` that carries relayed client traffic, its tag
    /// already written. Fails at once when there is no live connection within `wait`.
    pub async fn open_relay(
        &self,
        addr: &str,
        wait: Duration,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        let connection = self.connection(addr, wait).await.map_err(|e| e.0)?;
        let (mut send, recv) = match tokio::time::timeout(wait, connection.open_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no stream to {addr} within {wait:?}")),
        };
        send.write_all(&[RELAY_TAG])
            .await
            .map_err(|e| e.to_string())?;
        Ok((send, recv))
    }

    /// Closes the connection to `addr` now (its relayed streams fail at once).
    pub fn drop_connection(&self, addr: &str) {
        if let Some(peer) = self.lock().get_mut(addr) {
            if let Some(c) = peer.connection.take() {
                c.close(0u32.into(), b"silent");
            }
            peer.unanswered_since = None;
        }
    }

    /// Asks the member at `addr` question `query` (encoded by the node) about `group`'s
    /// applied state, within `ttl`.
    pub async fn read(&self, addr: &str, group: u64, query: Vec<u8>, ttl: Duration) -> Result<Vec<u8>, String> {
        match self.exchange(addr, &RpcRequest::Read { group, query }, ttl).await {
            Ok(RpcResponse::Read(answer)) => answer,
            Ok(RpcResponse::UnknownGroup(g)) => Err(format!("{addr} is not a member of group {g}")),
            Ok(RpcResponse::BadRequest(why)) => Err(format!("{addr} refused the read: {why}")),
            Ok(_) => Err(format!("{addr} answered a read with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }

    /// Follows stream `stream` (encoded by the node) of `group` on the member at
    /// `addr`: the stream's value now, and a [`Watching`] that yields it each time
    /// it moves. Fails when the member does not answer within `ttl` or refuses.
    pub async fn watch(&self, addr: &str, group: u64, stream: Vec<u8>, ttl: Duration) -> Result<(u64, Watching), String> {
        let bytes = encode(&RpcRequest::Watch { group, stream })?;
        let connection = self.connection(addr, ttl.min(Duration::from_secs(1))).await.map_err(|e| e.0)?;
        let opened = async {
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await.map_err(|e| e.to_string())?;
            if status[0] != WATCHING {
                let why = recv.read_to_end(4096).await.map_err(|e| e.to_string())?;
                return Err(format!("{addr} refused the watch: {}", String::from_utf8_lossy(&why)));
            }
            let mut at = [0u8; 8];
            recv.read_exact(&mut at).await.map_err(|e| e.to_string())?;
            Ok((u64::from_be_bytes(at), Watching { recv }))
        };
        match tokio::time::timeout(ttl, opened).await {
            Ok(Ok(watching)) => {
                self.answered(addr);
                Ok(watching)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer to a watch from {addr} within {ttl:?}")),
        }
    }

    /// The file `id` if the node at `addr` holds it.
    pub async fn get_file(&self, addr: &str, id: &str, ttl: Duration) -> Result<Option<Vec<u8>>, String> {
        match self.exchange(addr, &RpcRequest::GetFile { id: id.to_string() }, ttl).await {
            Ok(RpcResponse::File(result)) => result,
            Ok(_) => Err(format!("{addr} answered a file fetch with something else")),
            Err(Ok(Unsent(e))) | Err(Err(e)) => Err(e),
        }
    }
}

/// Dials peers of one group.
#[derive(Clone)]
pub struct NetworkFactory {
    peers: Peers,
    group: u64,
    quiet: QuietMark,
}

/// Whether a group's leader on this node has marked it quiet: its empty appends then go
/// out as quiet beats (see `quiet`). From [`Router::quiet_mark`].
///
/// The group's Raft owns its network clients, which hold this: the group's state on the
/// node (which holds the Raft) is only referred to weakly, so that nothing keeps a
/// stopped Raft alive.
#[derive(Clone, Default)]
pub struct QuietMark {
    marked: Arc<std::sync::atomic::AtomicBool>,
    local: std::sync::Weak<crate::quiet::Local>,
}

impl QuietMark {
    fn marked(&self) -> bool {
        self.marked.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn refused(&self) {
        if let Some(local) = self.local.upgrade() {
            local.refused_quiet();
        }
    }
}

impl NetworkFactory {
    /// A factory with connections of its own.
    pub fn new(endpoint: quinn::Endpoint, group: u64) -> Self {
        Self::with_peers(Peers::new(endpoint), group)
    }

    /// A factory sharing `peers`' connections with the node's other groups.
    pub fn with_peers(peers: Peers, group: u64) -> Self {
        NetworkFactory { peers, group, quiet: QuietMark::default() }
    }

    /// Empty appends go out as quiet beats while `mark` is set (the group's
    /// [`Router::quiet_mark`] on this node).
    pub fn quiet_when(mut self, mark: QuietMark) -> Self {
        self.quiet = mark;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerClient { peers: self.peers.clone(), group: self.group, target, addr: node.addr.clone(), quiet: self.quiet.clone() }
    }
}

/// One group's RPCs to one peer, over the node's shared connection to it.
pub struct PeerClient {
    peers: Peers,
    group: u64,
    target: NodeId,
    addr: String,
    quiet: QuietMark,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

enum Failure {
    Unreachable(String),
    Network(String),
}

impl<E: std::error::Error> From<Failure> for RPCError<NodeId, Node, E> {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&TransportError(e))),
            Failure::Network(e) => RPCError::Network(NetworkError::new(&TransportError(e))),
        }
    }
}

impl PeerClient {
    async fn call(&mut self, request: RpcRequest, ttl: Duration) -> Result<RpcResponse, Failure> {
        match self.peers.exchange(&self.addr, &request, ttl).await {
            Ok(response) => Ok(response),
            Err(Ok(Unsent(e))) => Err(Failure::Unreachable(e)),
            Err(Err(e)) => Err(Failure::Network(format!("node {}: {e}", self.target))),
        }
    }
}

fn unexpected(response: RpcResponse) -> Failure {
    match response {
        RpcResponse::UnknownGroup(g) => Failure::Unreachable(format!("peer does not host group {g}")),
        RpcResponse::BadRequest(e) => Failure::Network(format!("peer refused request: {e}")),
        _ => Failure::Network("mismatched response kind".into()),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    /// After an unreachable peer: 100 ms, 200 ms, then every 250 ms: a node that is down
    /// costs a few log lines a second rather than one per heartbeat, and one that comes
    /// back hears from the leader before its own election window (400 ms at the
    /// earliest, `member_config`) opens, so it does not stand for election and unseat a
    /// healthy leader.
    fn backoff(&self) -> openraft::network::Backoff {
        let steps = [100, 200].into_iter().chain(std::iter::repeat(250)).map(Duration::from_millis);
        openraft::network::Backoff::new(steps)
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        // openraft gives every AppendEntries one heartbeat interval (50 ms) to complete,
        // and resends the same range after a timeout; a follower catching up on large
        // group-commit entries would never get them. Over `APPEND_BYTES` the request is
        // refused here with a hint of how many entries fit, and openraft sends fewer.
        let mut bytes = 0usize;
        let mut fit = 0u64;
        for entry in &rpc.entries {
            bytes += match &entry.payload {
                openraft::EntryPayload::Normal(request) => request.0.len(),
                _ => 256,
            };
            if bytes > APPEND_BYTES && fit > 0 {
                return Err(RPCError::PayloadTooLarge(openraft::error::PayloadTooLarge::new_entries_hint(fit)));
            }
            fit += 1;
        }
        // An empty append is cheap to keep for a second try.
        let (request, plain) = if rpc.entries.is_empty() && self.quiet.marked() {
            (RpcRequest::AppendQuiet { group: self.group, rpc: rpc.clone() }, Some(rpc))
        } else {
            (RpcRequest::Append { group: self.group, rpc }, None)
        };
        let response = match (self.call(request, option.hard_ttl()).await?, plain) {
            // A member of an older build cannot read a quiet beat: the group stays
            // awake for a while, and this one goes out as a plain heartbeat.
            (RpcResponse::BadRequest(_), Some(rpc)) => {
                self.quiet.refused();
                self.call(RpcRequest::Append { group: self.group, rpc }, option.hard_ttl()).await?
            }
            (other, _) => other,
        };
        match response {
            RpcResponse::Append(result) => result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        match self.call(RpcRequest::Snapshot { group: self.group, rpc }, option.hard_ttl()).await? {
            RpcResponse::Snapshot(result) => {
                result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(RpcRequest::Vote { group: self.group, rpc }, option.hard_ttl()).await? {
            RpcResponse::Vote(result) => result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))),
            other => {
                warn!(target = self.target, "vote got an unexpected response");
                Err(unexpected(other).into())
            }
        }
    }
}

/// Why a forwarded write has no answer, and whether it may be sent again.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The command did not reach a leader that could append it: sending it again (to
    /// the leader named, when one is) cannot commit it twice.
    #[error("not committed: {reason}")]
    NotCommitted { reason: String, leader: Option<(NodeId, Node)> },
    /// The command was sent and the answer was lost (the leader failed or the link
    /// broke): it may or may not be committed. Only the client can retry it, with its
    /// idempotency key.
    #[error("the leader did not answer; the command may or may not be committed: {0}")]
    Unknown(String),
    /// The leader refused the entry as unreadable (a different build?): it is in no log,
    /// and sending it again would be refused again.
    #[error("the leader refused the entry: {0}")]
    Refused(String),
}

/// Sends commands to a group's leader on another node: a follower's proposer uses it so
/// that any node accepts writes. One stream per command over the node's shared
/// connection to the leader ([`Peers`]).
#[derive(Clone)]
pub struct Forwarder {
    peers: Peers,
}

impl Forwarder {
    pub fn new(peers: Peers) -> Self {
        Forwarder { peers }
    }

    /// The leader of conversation shard `group` (and its term) that the node at `addr`
    /// knows, when it holds a copy and answers within `ttl`.
    pub async fn leader_seen_by(&self, addr: &str, group: u64, ttl: Duration) -> Option<(NodeId, u64)> {
        let shards = self.peers.shards(addr, ttl).await.ok()?;
        shards.into_iter().find(|s| s.group == group)?.leader
    }

    /// Proposes `request` to `group` on the node at `addr`, expected to lead it; waits at
    /// most `ttl` for the answer.
    pub async fn write(&self, group: u64, addr: &str, request: Request, ttl: Duration) -> Result<ClientWriteResponse<TypeConfig>, ForwardError> {
        let not_committed = |reason: String| ForwardError::NotCommitted { reason, leader: None };
        let response = match self.peers.exchange(addr, &RpcRequest::Write { group, request }, ttl).await {
            Ok(response) => response,
            Err(Ok(Unsent(reason))) => return Err(not_committed(reason)),
            Err(Err(e)) => return Err(ForwardError::Unknown(e)),
        };
        match response {
            RpcResponse::Write(Ok(answer)) => Ok(answer),
            RpcResponse::Write(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to)))) => Err(ForwardError::NotCommitted {
                reason: format!("{addr} no longer leads group {group}"),
                leader: to.leader_id.zip(to.leader_node),
            }),
            RpcResponse::Write(Err(e)) => Err(ForwardError::Unknown(e.to_string())),
            RpcResponse::WriteUnknown(why) => Err(ForwardError::Unknown(why)),
            RpcResponse::WriteRefused(why) => Err(ForwardError::Refused(why)),
            RpcResponse::UnknownGroup(g) => Err(not_committed(format!("{addr} does not host group {g}"))),
            RpcResponse::BadRequest(e) => Err(not_committed(format!("{addr} refused the command: {e}"))),
            _ => Err(ForwardError::Unknown("mismatched response kind".into())),
        }
    }
}
