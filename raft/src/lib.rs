//! Replication for Switchboard: one openraft group per shard, its log in segment files
//! and its records in a fjall keyspace (ADR 0005), talking
//! to its peers over QUIC with mutual TLS.
//!
//! - [`store`]: `RaftLogStorage` and `RaftStateMachine` (passes openraft's suite), and the
//!   one-time move of a data folder kept in sled.
//! - [`log`]: the Raft log as append-only segment files, synced by a flusher thread.
//! - [`state`]: a group's records (its state machine on disk), and snapshot files of them.
//! - [`network`]: the QUIC transport: one endpoint per node, one stream per RPC.
//! - [`members`]: a node joining a running group, and a node removed from it.
//! - [`quiet`]: a group with nothing to write beats every 500 ms instead of every 50.
//! - [`tls`]: the cluster CA and node certificates; rustls with the ring provider only.
//! - [`files`]: durable, owner-only writes of keys and other secrets.
//!
//! Architecture invariant: this crate knows nothing of conversations or operators. An
//! entry is opaque bytes applied by a [`Machine`] the node plugs in, so the storage and
//! transport are tested alone and the domain can change its format without touching them.

pub mod files;
pub mod log;
pub mod members;
pub mod network;
pub mod quiet;
pub mod state;
pub mod store;
pub mod tls;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;

/// An application command, already serialized by the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request(pub Vec<u8>);

/// What the [`Machine`] returned for a command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Vec<u8>);

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The application state a group replicates, kept as records in the group's state tree.
///
/// `apply` must be deterministic: every replica calls it with the same entries in the
/// same order, and it must put every change it makes into `changes`. The store writes
/// those changes together with the entry's log id in one atomic batch before the
/// next entry is applied, so after a crash the records and the applied index agree.
/// What the machine keeps in memory is a cache of its records, rebuilt by `load`.
pub trait Machine: Send + Sync + 'static {
    fn apply(&self, index: u64, request: &[u8], changes: &mut Changes) -> Vec<u8>;
    /// The entry at `index` is the one a new leader appends when it is elected (Raft's
    /// blank entry): every replica applies it at the same place in the log.
    fn leader_began(&self, _index: u64, _changes: &mut Changes) {}
    /// An installed snapshot is about to replace the records (they are still readable);
    /// [`Machine::load`] follows once it has.
    fn replacing(&self) -> Result<(), String> {
        Ok(())
    }
    /// The changes of the entry at `index`, just applied, are written: readers may see
    /// them now.
    fn published(&self, _index: u64) {}
    /// Rebuilds the in-memory state from the records: at start, and after a snapshot
    /// was installed. `records` stays valid for reads for the life of the group.
    fn load(&self, records: &Records) -> Result<(), String>;
    /// Turns a snapshot written by a build that kept the whole state in one value (the
    /// legacy format) into records.
    fn import(&self, legacy: &[u8], changes: &mut Changes) -> Result<(), String>;
}

pub use state::{Changes, Records};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Storage(String),
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("record store: {0}")]
    Records(#[from] fjall::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("raft: {0}")]
    Raft(String),
}

/// Bytes of a snapshot sent in one RPC.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

/// Entries between snapshot points unless configured otherwise. A point costs a flush,
/// not a copy of the state (ADR 0004), so the log behind it is purged often.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 1000;

/// Raft settings tuned for a LAN cluster: elections settle well under a second.
pub fn default_config() -> Result<std::sync::Arc<openraft::Config>, Error> {
    config_with_snapshots(DEFAULT_SNAPSHOT_EVERY)
}

/// As [`default_config`], with a snapshot every `every` entries (and a fifth of that
/// kept in the log behind it for lagging followers).
pub fn config_with_snapshots(every: u64) -> Result<std::sync::Arc<openraft::Config>, Error> {
    let every = every.max(10);
    staggered_config(every, every / 5, 0, 0)
}

/// Entries a member keeps in its log behind its snapshot point, as a multiple of the
/// snapshot interval: a replica that was away for a few seconds (restarted, or cut off
/// briefly) catches up from the log instead of being sent the whole state. With a fifth
/// of the interval (200 entries by default) a member restarted in the kill drill was
/// sent a snapshot of every shard after each kill, and loading them held the record
/// store's writes for seconds (docs/benchmarks.md, "Members that come back"). Five
/// intervals: 5,000 entries by default, at least 5 s of a group's entries at the rate
/// one disk syncs them.
pub const LOG_KEPT_INTERVALS: u64 = 5;

/// Which of the three staggered election windows (0, 1, 2) `node` has in `group`.
pub fn election_window(node: u64, group: u64) -> u64 {
    (node + group) % 3
}

/// Election timing staggered by member: `election_window` picks one of three
/// windows that do not overlap.
///
/// openraft 0.9: a follower that knows a leader starts an election only after the
/// leader's lease (its own `election_timeout_max`) plus its election timeout (drawn
/// once, at start, from `[min, max)`) have passed without a heartbeat, and refuses votes
/// during the lease. With one window for every member, two survivors whose draws fell
/// close together split their votes, again and again (measured: one leader kill in
/// five took 1.1 to 1.9 s instead of 0.6 s). Staggered, the survivors' elections start
/// 400-500, 500-600 and 600-700 ms after the last heartbeat: the first one wins.
/// Heartbeats every 50 ms: one would have to be 8 intervals late to start an election
/// spuriously. Offsetting by group spreads the groups' first choices over the nodes.
pub fn member_config(every: u64, node: u64, group: u64) -> Result<std::sync::Arc<openraft::Config>, Error> {
    let every = every.max(10);
    staggered_config(every, every.saturating_mul(LOG_KEPT_INTERVALS), node, group)
}

fn staggered_config(every: u64, kept: u64, node: u64, group: u64) -> Result<std::sync::Arc<openraft::Config>, Error> {
    let window = election_window(node, group);
    let config = openraft::Config {
        cluster_name: "switchboard".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150 + 50 * window,
        election_timeout_max: 250 + 50 * window,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(every),
        // A group-commit entry is at most about 1 MiB (node's `MAX_BATCH_BYTES`): 32 of
        // them stay well inside one RPC (`network::MAX_RPC_BYTES`).
        max_payload_entries: 32,
        max_in_snapshot_log_to_keep: kept,
        // A snapshot travels in chunks of 1 MiB, each written to the receiver's file as
        // it arrives; a chunk may take a few seconds on a loaded link or a slow disk.
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        install_snapshot_timeout: 5000,
        purge_batch_size: 1,
        ..Default::default()
    };
    config.validate().map(std::sync::Arc::new).map_err(|e| Error::Raft(e.to_string()))
}
