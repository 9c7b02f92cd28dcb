//! openraft storage: a log store and a state machine wrapper per Raft group.
//!
//! Architecture invariant: a log append is reported durable to openraft only after the
//! segment it was written to has been fdatasynced (see [`crate::log`]); nothing relies
//! on a background sync. The records (a fjall keyspace, ADR 0005) reach the OS with
//! each applied entry, so a killed process loses none, and are synced to disk at each
//! snapshot point, before openraft may purge the log entries that would rebuild them.
//! Each entry's changes are written in one batch with its log id, so a restart loads
//! the records and replays only the committed entries after the last applied one
//! (`save_committed` makes that possible).
//!
//! Snapshots are files in the group's snapshot folder, written whole (temporary file,
//! fsync, rename) before the pointer to them is stored among the meta keys; the file
//! the pointer left is deleted, so an old snapshot gives its disk space back at once.
//! Building one is a snapshot point (a sync, no copy); a file of the records is dumped
//! when a replica asks for the snapshot: the first in openraft's state-machine
//! worker (applies wait for it), later ones in the background while the file before
//! answers (and, in the background, at the first point after the current file's records
//! are a day old, so deletions reach it); installing one streams the received file into the
//! state partition, chunk by chunk, under an `s/installing` mark that a restart
//! finishes. (Data folders from before kept the snapshot among the meta keys under
//! `snapshot`, or wrote the whole state as one value: both are read once and turned
//! into records. Folders kept in sled are moved by [`migrate_sled`] first.)

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::log::{LogMeta, SegmentLog};
use crate::state::{StateTree, APPLIED_KEY, INSTALLING_KEY, SNAPSHOT_MAGIC};
use crate::{Changes, Machine, NodeId, Node, Response, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(v, _)| v)
}

/// A group's meta keys (committed pointer, snapshot pointers): in its state partition
/// under `s/m/`, beside the records, not in a partition of their own. A partition that
/// is written little keeps its memtable unflushed and so pins the keyspace's journal
/// until the journal's size limit forces a flush, which stalls every write (it did,
/// every 7 s or so under load).
#[derive(Clone)]
struct Trees {
    keyspace: fjall::Keyspace,
    meta: fjall::PartitionHandle,
}

/// Prefix of the meta keys in the state partition.
const META_PREFIX: &str = "s/m/";

fn meta_key(key: &str) -> String {
    format!("{META_PREFIX}{key}")
}

/// Memtable of each partition: with the keyspace's write buffer limit, what memory the
/// record store may hold besides its block cache. 2 MiB rather than 8: a memtable and
/// the entries it holds fill and are freed as a sawtooth, and with 8 MiB its teeth were
/// a tenth of a node's RSS (the million-message soak's end over its 100,000 mark 1.10×
/// instead of 1.17×, throughput unchanged; docs/benchmarks.md, "Smaller memtables").
/// Like the segment size below, a store made before keeps what it was made with.
pub(crate) const MEMTABLE_BYTES: u32 = 2 * 1024 * 1024;

/// Segments written by a compaction: 8 MiB rather than fjall's 64 MiB, so that a
/// compaction moves a few small segments at a time instead of most of a level at once.
/// With 64 MiB the million-message soak's RSS jumped by 40-80 MiB around its 750,000th
/// message, when the first level overflowed (docs/benchmarks.md, "Smaller compactions").
/// fjall keeps a partition's options from its creation: a store made before keeps 64 MiB.
const SEGMENT_BYTES: u32 = 8 * 1024 * 1024;

/// Journal space past which fjall halts each write that fills a memtable (on the
/// appliers' threads: two such writes hold both runtime threads) until its flushes free
/// old journals. fjall counts each sealed journal at its preallocated length, 32 MiB,
/// however little it holds (also when it finds one at a restart), and seals one at
/// every memtable rotation of any partition. At 64 MiB a third sealed journal halted
/// them: in the kill drill a restarted member sealed ten while it caught up, its
/// runtime's threads slept in the halt, it stopped answering votes and heartbeats, and
/// in 4 runs of 7 the cluster lost its majority for good. At 512 MiB (fjall's default)
/// its monitor starts flushing the oldest partitions past 8 sealed journals, a rotation
/// waits 500 ms from the 15th, and the halt comes at the 17th. The files are sparse on ext4
/// and xfs (blocks for what was written) but each reports 32 MiB, and a restart replays
/// every sealed journal still on disk.
pub(crate) const JOURNAL_BYTES: u64 = 512 * 1024 * 1024;

/// The keyspace's block cache (blocks of the stored records read back, decompressed),
/// shared by every group of the node. 4 MiB rather than 16: the apply's reads fill it
/// slowly, so at 16 MiB it was 1 MiB at the million-message soak's 100,000 mark and full
/// by its 500,000th message, a growth of about 20 MiB of live heap that made the soak's
/// RSS end 1.36-1.48 times its first mark; at 4 MiB the live heap grew by 6 MiB, the RSS
/// ended 1.17-1.25 times it, and saturation was no lower (docs/benchmarks.md, "The
/// block cache at 4 MiB").
pub(crate) const BLOCK_CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Memtables of every partition together past which fjall holds writes until flushes
/// catch up (the keyspace's `max_write_buffer_size`).
pub(crate) const WRITE_BUFFER_BYTES: u64 = 24 * 1024 * 1024;

fn partition_options() -> fjall::PartitionCreateOptions {
    fjall::PartitionCreateOptions::default().max_memtable_size(MEMTABLE_BYTES).compaction_strategy(fjall::compaction::Strategy::Leveled(
        fjall::compaction::Leveled { target_size: SEGMENT_BYTES, ..Default::default() },
    ))
}

/// A group's one partition: its records, the store's own keys and its meta keys.
fn state_partition(keyspace: &fjall::Keyspace, group: u64) -> Result<fjall::PartitionHandle, fjall::Error> {
    keyspace.open_partition(&format!("g{group}-state"), partition_options())
}

/// Opens (or creates) the record store at `dir`: one fjall keyspace for every group's
/// records and meta keys, with bounded memory (a 4 MiB block cache, 2 MiB memtables
/// and 24 MiB of them in all, journals up to [`JOURNAL_BYTES`]). Writes reach the OS at once, a background thread syncs
/// the journal every 250 ms (so a snapshot point's sync has little left to do and does
/// not stall applies), and each snapshot point syncs it too. The caller keeps the
/// keyspace for as long as any group uses it. The partitions of `groups` are made with
/// the keyspace; a group opened later gets its partition then (not crash-atomic: the
/// cluster work must create groups' partitions behind a mark of their own).
pub fn open_keyspace(dir: &Path, groups: &[u64]) -> Result<fjall::Keyspace, crate::Error> {
    // fjall does not create a keyspace or a partition atomically: a process killed
    // while it does leaves a folder it cannot open again. So the first start writes the
    // `<dir>.creating` mark, creates the keyspace and the partitions of `groups`, syncs
    // them, and only then writes the `<dir>.ready` mark and removes the first; a folder
    // with `.creating` and without `.ready` holds nothing yet and is made anew. One with
    // neither (restored from a backup without its mark) is opened as it is.
    let (ready, creating) = (dir.with_extension("ready"), dir.with_extension("creating"));
    if dir.exists() && !ready.exists() {
        if creating.exists() {
            tracing::warn!(folder = %dir.display(), "the record store's creation was interrupted; creating it again");
            std::fs::remove_dir_all(dir)?;
        } else {
            tracing::warn!(folder = %dir.display(), "the record store has no mark saying its creation finished (restored without it?); opening it as it is");
            crate::files::write_private(&ready, b"created\n")?;
        }
    }
    if !dir.exists() && !ready.exists() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        crate::files::write_private(&creating, b"creating\n")?;
    }
    let keyspace = fjall::Config::new(dir)
        .cache_size(BLOCK_CACHE_BYTES)
        .max_write_buffer_size(WRITE_BUFFER_BYTES)
        .max_journaling_size(JOURNAL_BYTES)
        .fsync_ms(Some(250))
        .open()?;
    if !ready.exists() {
        for group in groups {
            state_partition(&keyspace, *group)?;
        }
        keyspace.persist(fjall::PersistMode::SyncAll)?;
        crate::files::write_private(&ready, b"created\n")?;
    }
    match std::fs::remove_file(&creating) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(keyspace)
}

impl Trees {
    fn open(keyspace: &fjall::Keyspace, group: u64) -> Result<Self, fjall::Error> {
        Ok(Trees { keyspace: keyspace.clone(), meta: state_partition(keyspace, group)? })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        match self.meta.get(meta_key(key)).map_err(|e| e.to_string())? {
            Some(bytes) => decode(&bytes).map(Some).map_err(|e| format!("{key}: {e}")),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let bytes = encode(value).map_err(|e| e.to_string())?;
        let size = crate::state::write_size(key.len(), bytes.len());
        crate::state::mindful_write(&self.keyspace, &self.meta, size, || self.meta.insert(meta_key(key), bytes)).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// As [`Trees::put_meta`], unless fjall may hold the write: then nothing is written
    /// and the answer is `false`.
    fn put_meta_unless_held<T: Serialize>(&self, key: &str, value: &T) -> Result<bool, String> {
        let bytes = encode(value).map_err(|e| e.to_string())?;
        if crate::state::Pressure::of(&self.keyspace, &self.meta).may_hold(crate::state::write_size(key.len(), bytes.len())) {
            return Ok(false);
        }
        self.meta.insert(meta_key(key), bytes).map_err(|e| e.to_string())?;
        Ok(true)
    }

    fn remove_meta(&self, key: &str) -> Result<(), fjall::Error> {
        crate::state::mindful_write(&self.keyspace, &self.meta, crate::state::write_size(key.len(), 0), || self.meta.remove(meta_key(key)))
    }

    /// Makes every write so far durable. Blocking.
    fn sync_now(&self) -> Result<(), fjall::Error> {
        self.keyspace.persist(fjall::PersistMode::SyncAll)
    }

    /// As [`Trees::sync_now`], off the async workers.
    async fn sync(&self) -> Result<(), String> {
        let keyspace = self.keyspace.clone();
        tokio::task::spawn_blocking(move || keyspace.persist(fjall::PersistMode::SyncAll))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// Opens (or creates) the storage of one group: its log in segment files under
/// `log_dir` (ADR 0005), its records and meta keys in `keyspace`, its snapshot files in
/// `snapshot_dir`.
pub fn open_group(
    keyspace: &fjall::Keyspace,
    group: u64,
    machine: Arc<dyn Machine>,
    snapshot_dir: &Path,
    log_dir: &Path,
) -> Result<(LogStore, StateMachineStore), crate::Error> {
    if forgetting_mark(log_dir).exists() {
        tracing::warn!(group, log = %log_dir.display(), "finishing the forgetting of this node's copy of a group that a crash interrupted");
        finish_forgetting(keyspace, group, snapshot_dir, log_dir)?;
    }
    let trees = Trees::open(keyspace, group)?;
    // A folder moved from sled has the vote and last purged id among its meta keys.
    let segments = SegmentLog::open(log_dir, || {
        let meta = |key: &str| crate::log::LogError::Corrupt(log_dir.join("meta").display().to_string(), format!("the folder moved from sled has a {key} that cannot be read"));
        Ok(LogMeta { vote: trees.get_meta("vote").map_err(|_| meta("vote"))?, purged: trees.get_meta("last_purged").map_err(|_| meta("last purged entry"))? })
    })
    .map_err(|e| crate::Error::Storage(e.to_string()))?;
    let committed: Option<Option<LogId<NodeId>>> = trees.get_meta("committed").ok().flatten();
    let committed = Arc::new(std::sync::atomic::AtomicU64::new(committed.flatten().map_or(0, |c| c.index)));
    crate::log::create_dir_durably(snapshot_dir)?;
    let snapshots = SnapshotFiles { dir: snapshot_dir.to_path_buf(), group, writing: Arc::new(Mutex::new(())) };
    let state = Arc::new(StateTree::new(keyspace.clone(), state_partition(keyspace, group)?));
    let sm = StateMachineStore::load(trees.clone(), state, machine, snapshots)?;
    let log = LogStore { trees, segments, committed, durable: sm.durable.subscribe() };
    // The log is purged only behind records made durable first, so records behind the
    // purge point mean the record store was lost or swapped: the state cannot be
    // rebuilt, and serving it would differ from the other replicas.
    let (purged, _) = log.segments.state();
    let applied = sm.inner.try_lock().ok().and_then(|inner| inner.last_applied);
    if let Some(purged) = purged.filter(|p| applied.is_none_or(|a| a.index < p.index)) {
        return Err(crate::Error::Storage(format!(
            "the records end at entry {} but the log was purged up to entry {}: the record store (records/) was lost or replaced. Restore the whole data folder from a backup, or remove it and let the node rejoin its group",
            applied.map_or(0, |a| a.index),
            purged.index
        )));
    }
    Ok((log, sm))
}

/// Moves one group of a data folder kept in sled (builds before ADR 0005) into the log
/// segments under `log_dir` and the partitions of `keyspace`, syncs them, and only then
/// deletes the sled folder. A crash before that leaves the sled folder, and the next
/// start moves it again from the beginning (what was copied is replaced, log entries
/// already in segments are skipped). Returns whether there was a sled folder.
pub fn migrate_sled(sled_dir: &Path, keyspace: &fjall::Keyspace, group: u64, log_dir: &Path) -> Result<bool, crate::Error> {
    // What a crash left of a folder already moved: removed.
    let moved = sled_dir.with_extension("moved");
    if moved.exists() {
        std::fs::remove_dir_all(&moved)?;
    }
    if !sled_dir.join("db").exists() && !sled_dir.join("conf").exists() {
        return Ok(false);
    }
    let storage = |e: &dyn std::fmt::Display| crate::Error::Storage(format!("moving {} out of sled: {e}", sled_dir.display()));
    {
        let db = sled::open(sled_dir)?;
        let meta_tree = db.open_tree(format!("g{group}/meta"))?;
        let state = state_partition(keyspace, group)?;
        crate::state::remove_range(keyspace, &state, ..)?;
        copy_tree(&db.open_tree(format!("g{group}/state"))?, "", keyspace, &state)?;
        copy_tree(&meta_tree, META_PREFIX, keyspace, &state)?;
        // A vote that cannot be read stops the move: taken for none, it would let this
        // node vote twice in one term.
        let sled_meta = |key: &str| meta_tree.get(key).map_err(|e| storage(&format!("reading {key}: {e}")));
        let legacy = LogMeta {
            vote: sled_meta("vote")?.map(|b| decode(&b)).transpose().map_err(|e| storage(&format!("the vote: {e}")))?,
            purged: sled_meta("last_purged")?.map(|b| decode(&b)).transpose().map_err(|e| storage(&format!("the last purged entry: {e}")))?,
        };
        let segments = SegmentLog::open(log_dir, || Ok(legacy)).map_err(|e| storage(&e))?;
        let mut batch = Vec::new();
        for item in db.open_tree(format!("g{group}/log"))?.iter() {
            let (_, value) = item?;
            let entry: Entry<TypeConfig> = decode(&value).map_err(|e| storage(&format!("a log entry: {e}")))?;
            batch.push(entry);
            if batch.len() == 1024 {
                segments.append_synced(std::mem::take(&mut batch)).map_err(|e| storage(&e))?;
            }
        }
        segments.append_synced(batch).map_err(|e| storage(&e))?;
        keyspace.persist(fjall::PersistMode::SyncAll)?;
    }
    // Renamed away first, durably, then removed: a sled folder back after a power loss,
    // or left half removed by a crash, would be moved again, over newer records.
    let moved = sled_dir.with_extension("moved");
    std::fs::rename(sled_dir, &moved)?;
    std::fs::File::open(sled_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))).and_then(|d| d.sync_all())?;
    std::fs::remove_dir_all(&moved)?;
    tracing::info!(folder = %sled_dir.display(), "moved the data folder from sled into log segments and the record store");
    Ok(true)
}

/// Where one group of a stopped node's data folder stands, read to move its records
/// into other groups (`switchboard cluster split`).
#[derive(Debug, Clone)]
pub struct GroupPoint {
    /// The last entry the records hold.
    pub applied: LogId<NodeId>,
    /// The membership as of `applied`.
    pub membership: StoredMembership<NodeId, Node>,
    /// The node's vote in the group.
    pub vote: Vote<NodeId>,
}

/// Reads where `group` of a stopped node stands and hands its records to `each`, in key
/// order, a chunk at a time. Refuses a group whose log holds entries its records have
/// not applied yet, or whose records a crash left mid-install: those need one start of
/// the node first, which applies them.
pub fn export_group(
    keyspace: &fjall::Keyspace,
    group: u64,
    log_dir: &Path,
    mut each: impl FnMut(Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), String>,
) -> Result<GroupPoint, crate::Error> {
    let trees = Trees::open(keyspace, group)?;
    let state = StateTree::new(keyspace.clone(), state_partition(keyspace, group)?);
    let once = "start the node as it was (with the other members of its cluster, which it needs to commit), let it catch up, stop it, and split again; or split the member that led last";
    if state.get_own(INSTALLING_KEY)?.is_some() {
        return Err(storage(format!("group {group}'s records were left mid-install by a crash: {once}")));
    }
    let applied: AppliedState = match state.get_own(APPLIED_KEY)? {
        Some(bytes) => decode(&bytes).map_err(|e| storage(format!("group {group}'s applied state cannot be read: {e}")))?,
        None => return Err(storage(format!("group {group} has applied nothing: there is nothing to split"))),
    };
    let Some(at) = applied.last_applied else {
        return Err(storage(format!("group {group} has applied nothing: there is nothing to split")));
    };
    let pointer = trees.get_meta::<SnapshotPointer>(SNAPSHOT_KEY).map_err(storage)?;
    if pointer.is_some_and(|p| p.meta.last_log_id > Some(at)) {
        return Err(storage(format!("group {group}'s records are behind its snapshot: {once}")));
    }
    if !log_dir.join("meta").exists() {
        return Err(storage(format!("{} holds no log of group {group}: {once}", log_dir.display())));
    }
    let log = SegmentLog::open(log_dir, || Err(crate::log::LogError::Corrupt(log_dir.display().to_string(), "no meta file".into())))
        .map_err(|e| storage(e.to_string()))?;
    let (_, last) = log.state();
    if last.is_some_and(|last| last.index > at.index) {
        return Err(storage(format!(
            "group {group}'s log holds entries up to {} and its records only up to {}: {once}",
            last.map_or(0, |l| l.index),
            at.index
        )));
    }
    let vote = log.meta().vote.unwrap_or_else(|| Vote::new(at.leader_id.term, at.leader_id.node_id));
    drop(log);
    let records = state.records();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = records.scan(&[], after.as_deref(), 4096)?;
        let Some((last, _)) = chunk.last() else { break };
        after = Some(last.clone());
        each(chunk).map_err(storage)?;
    }
    Ok(GroupPoint { applied: at, membership: applied.membership, vote })
}

/// Writes a new group's records into `keyspace` a chunk at a time, then
/// ([`GroupSeed::finish`]) makes them the group's state as of a log id with no log
/// behind it: what a replica holds once it installed a snapshot and purged its log.
pub struct GroupSeed {
    state: StateTree,
    trees: Trees,
    batch: Option<fjall::Batch>,
    records: u64,
}

impl GroupSeed {
    /// Starts group `group` in a keyspace that holds nothing of it yet.
    pub fn new(keyspace: &fjall::Keyspace, group: u64) -> Result<Self, crate::Error> {
        let state = StateTree::new(keyspace.clone(), state_partition(keyspace, group)?);
        if state.get_own(APPLIED_KEY)?.is_some() || !state.records().scan(&[], None, 1)?.is_empty() {
            return Err(storage(format!("group {group} holds records already: a group is seeded only in a new folder")));
        }
        Ok(GroupSeed { trees: Trees::open(keyspace, group)?, batch: Some(keyspace.batch()), state, records: 0 })
    }

    /// Adds one record.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), crate::Error> {
        let batch = self.batch.get_or_insert_with(|| self.state.keyspace.batch());
        batch.insert(&self.state.part, crate::state::stored(key), value);
        self.records += 1;
        if batch.len() >= 4096 {
            if let Some(full) = self.batch.take() {
                full.commit()?;
            }
        }
        Ok(())
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Makes the records the group's state as of `at`, with `membership`, and starts
    /// its log in `log_dir` (which must not exist) as purged up to `at`, with `vote`.
    /// Everything is synced before this returns.
    pub fn finish(
        mut self,
        at: LogId<NodeId>,
        membership: StoredMembership<NodeId, Node>,
        vote: Vote<NodeId>,
        log_dir: &Path,
    ) -> Result<(), crate::Error> {
        if let Some(batch) = self.batch.take() {
            batch.commit()?;
        }
        if log_dir.exists() {
            return Err(storage(format!("{} exists already: a group is seeded only in a new folder", log_dir.display())));
        }
        let applied = encode(&AppliedState { last_applied: Some(at), membership: membership.clone() }).map_err(storage)?;
        self.state.set_own(&[(APPLIED_KEY, &applied)], &[])?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let point = SnapshotMeta { last_log_id: Some(at), last_membership: membership, snapshot_id: format!("{}-{}-seeded-{stamp}", at.leader_id, at.index) };
        self.trees.put_meta(SNAPSHOT_AT_KEY, &point).map_err(storage)?;
        self.trees.put_meta("committed", &Some(at)).map_err(storage)?;
        self.trees.sync_now()?;
        let log = SegmentLog::open(log_dir, || Ok(LogMeta { vote: Some(vote), purged: Some(at) })).map_err(|e| storage(e.to_string()))?;
        drop(log);
        Ok(())
    }
}

/// Forgets this node's copy of `group` but its vote: its log segments, every key of
/// its partition (records, applied point, committed pointer) and its snapshot files.
/// The group must not be open. Afterwards it opens with no entry: it is sent a snapshot
/// if it joins the group again. Only for a replica whose loss the group does not
/// notice: one that does not vote in it (ADR 0012).
///
/// None of it is one atomic write, so a mark ([`forgetting_mark`]) is made durable
/// first and removed last: a crash in between leaves the mark, and [`open_group`]
/// finishes the forgetting before it opens anything. Without it, the next start could
/// open records half removed under an applied point that still names them all.
pub fn forget_group(keyspace: &fjall::Keyspace, group: u64, snapshot_dir: &Path, log_dir: &Path) -> Result<(), crate::Error> {
    let mark = forgetting_mark(log_dir);
    crate::files::write_private(&mark, b"forgetting this node's copy of the group\n")?;
    finish_forgetting(keyspace, group, snapshot_dir, log_dir)
}

/// The file whose presence says that this node's copy of the group whose log is in
/// `log_dir` is being forgotten ([`forget_group`]): `<log_dir>.forget`.
pub fn forgetting_mark(log_dir: &Path) -> PathBuf {
    log_dir.with_extension("forget")
}

/// The steps of [`forget_group`] after its mark, each of which can be run again after
/// a crash; the mark goes last.
fn finish_forgetting(keyspace: &fjall::Keyspace, group: u64, snapshot_dir: &Path, log_dir: &Path) -> Result<(), crate::Error> {
    crate::log::forget_keeping_vote(log_dir).map_err(|e| crate::Error::Storage(e.to_string()))?;
    let partition = state_partition(keyspace, group)?;
    let mut batch = keyspace.batch();
    for key in partition.keys() {
        batch.remove(&partition, key?);
        if batch.len() == 4096 {
            std::mem::replace(&mut batch, keyspace.batch()).commit()?;
        }
    }
    batch.commit()?;
    keyspace.persist(fjall::PersistMode::SyncAll)?;
    let prefix = format!("g{group}-");
    match std::fs::read_dir(snapshot_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let mark = forgetting_mark(log_dir);
    match std::fs::remove_file(&mark) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(parent) = mark.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent).and_then(|d| d.sync_all())?;
    }
    Ok(())
}

/// Copies every key of `from` into `to`, behind `prefix`, in batches.
fn copy_tree(from: &sled::Tree, prefix: &str, keyspace: &fjall::Keyspace, to: &fjall::PartitionHandle) -> Result<(), crate::Error> {
    let mut batch = keyspace.batch();
    for item in from.iter() {
        let (key, value) = item?;
        let mut stored = prefix.as_bytes().to_vec();
        stored.extend_from_slice(&key);
        batch.insert(to, stored, value.to_vec());
        if batch.len() == 4096 {
            std::mem::replace(&mut batch, keyspace.batch()).commit()?;
        }
    }
    batch.commit()?;
    Ok(())
}

/// The Raft log of one group: segment files ([`SegmentLog`]); the committed pointer
/// among the meta keys.
#[derive(Clone)]
pub struct LogStore {
    trees: Trees,
    segments: SegmentLog,
    /// The index of the newest entry this node knows committed (0: none yet), for
    /// metrics and status: set whenever openraft saves the committed pointer, whether or
    /// not the store took the write.
    committed: Arc<std::sync::atomic::AtomicU64>,
    /// How far the records are durable, as the state machine says ([`Durable`]): a
    /// purge waits for it.
    durable: tokio::sync::watch::Receiver<Durable>,
}

/// A purge waiting for the records ([`Durable`]) warns after each of these.
const PURGE_ROUND: std::time::Duration = std::time::Duration::from_secs(10);

/// How far a group's records are durable on this node, told by its state machine to its
/// log. openraft purges the log behind a snapshot it has handed the state machine to
/// install without waiting for the install (0.9: `PurgeLog` has no condition); a crash
/// between that purge and the install's end would leave records behind a purged log,
/// which cannot open again. So a purge waits until the records reach its point: they do
/// once a built snapshot's sync or an installed snapshot's pointer is durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    /// Log index up to which the records (or the snapshot file named to rebuild them)
    /// are durable.
    pub index: u64,
    /// An install failed: the purge it was to be followed by fails too (openraft stops
    /// the group on the install's error anyway).
    pub failed: bool,
}

impl LogStore {
    /// The group's commit index as this node knows it, kept up to date by openraft.
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.committed.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.segments.read(start, end).map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

fn io_err(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let (last_purged_log_id, last_log_id) = self.segments.state();
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.segments.save_vote(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.segments.meta().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.committed.store(committed.map_or(0, |c| c.index), std::sync::atomic::Ordering::Relaxed);
        // Not flushed here: a lost committed pointer only means re-applying from the
        // snapshot up to a smaller index, which the next leader contact completes. For
        // the same reason it is skipped while the store may hold writes: openraft's core
        // makes this call, and a held core answers no votes and no appends.
        if !self.trees.put_meta_unless_held("committed", &committed).map_err(|e| StorageIOError::write(&io_err(e)))? {
            crate::state::COMMITTED_SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("the record store may hold writes; the committed pointer waits for the next commit");
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let committed: Option<Option<LogId<NodeId>>> =
            self.trees.get_meta("committed").map_err(|e| StorageIOError::read(&io_err(e)))?;
        // openraft lets a follower commit entries its log has taken but not yet synced,
        // and the pointer reaches the record store on its own schedule: after a power
        // loss it may point past the log's end, and openraft would then re-apply entries
        // that are not there and refuse to start. Entries up to the log's end are a
        // prefix of those committed (a committed entry is never truncated), so the
        // pointer is read no further than the log holds.
        let committed = committed.flatten();
        let (_, last) = self.segments.state();
        Ok(match (committed, last) {
            (Some(c), last) if last.is_none_or(|l| l.index < c.index) => {
                tracing::warn!(committed = c.index, log_end = ?last.map(|l| l.index), "the committed pointer was past the log's end; read as the log's end");
                last
            }
            (committed, _) => committed,
        })
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Reported durable by the log's flusher after fdatasync: this is what every
        // client ack rests on.
        self.segments.append(entries, callback).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.segments.truncate(log_id.index).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut waited = 0u64;
        let mark = loop {
            let waited_for = tokio::time::timeout(PURGE_ROUND, self.durable.wait_for(|d| d.index >= log_id.index || d.failed)).await.map(|r| r.map(|d| *d));
            match waited_for {
                Ok(Ok(reached)) => break Ok(reached),
                Ok(Err(_)) => break Err("the group's state machine stopped"),
                // An install may take long (a large snapshot checked, copied and
                // loaded): it ends, or fails, and either ends this wait.
                Err(_) => {
                    waited += PURGE_ROUND.as_secs();
                    let durable = self.durable.borrow().index;
                    tracing::warn!(purge_to = log_id.index, durable_to = durable, waited_s = waited, "the log's purge waits for a snapshot's install to be kept");
                }
            }
        };
        let why = match mark {
            Ok(mark) if mark.index >= log_id.index => None,
            Ok(mark) => Some(format!("the records are durable only up to entry {} and a snapshot's install failed", mark.index)),
            Err(stopped) => Some(stopped.to_string()),
        };
        if let Some(why) = why {
            let why = format!("not purging the log up to entry {}: {why}", log_id.index);
            return Err(StorageIOError::write_logs(&io_err(&why)).into());
        }
        self.segments.purge(log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

/// A snapshot kept among the meta keys, as data folders from before snapshot files hold
/// it (moved from sled with them).
#[derive(Clone, Serialize, Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The meta record of the current snapshot: what it covers and its file.
#[derive(Clone, Serialize, Deserialize)]
struct SnapshotPointer {
    meta: SnapshotMeta<NodeId, Node>,
    file: String,
}

/// What the state tree's records reflect: written with every applied entry's changes.
#[derive(Clone, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

const LEGACY_SNAPSHOT_KEY: &str = "snapshot";
const SNAPSHOT_KEY: &str = "snapshot_file";
/// The newest snapshot point (ADR 0004): the records as of this log id are durable,
/// so the log before it may be purged. A file of it is made only when a replica needs
/// one.
const SNAPSHOT_AT_KEY: &str = "snapshot_at";

/// The folder a group's snapshot files live in.
#[derive(Clone)]
struct SnapshotFiles {
    dir: PathBuf,
    group: u64,
    /// Serializes pointer updates (a build and an install may overlap).
    writing: Arc<Mutex<()>>,
}

impl SnapshotFiles {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A new snapshot file's name: the group, the last index it holds, and when it was made.
    fn new_name(&self, meta: &SnapshotMeta<NodeId, Node>) -> String {
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("g{}-{index:020}-{stamp}.snapshot", self.group)
    }

    /// Writes a new snapshot file with `fill` (temporary name, fsync, rename) and
    /// returns its name. Blocking.
    fn write_with(&self, meta: &SnapshotMeta<NodeId, Node>, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<String> {
        let name = self.new_name(meta);
        let partial = self.dir.join(format!("{name}.partial"));
        let written = (|| {
            let mut out = std::fs::File::create(&partial)?;
            fill(&mut out)?;
            out.sync_all()?;
            std::fs::rename(&partial, self.dir.join(&name))?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Ok(name)
    }

    /// Makes the received snapshot file at `path` (open as `file`) the snapshot of
    /// `meta`: synced, renamed to its name, the folder synced. Returns the name.
    fn adopt(&self, meta: &SnapshotMeta<NodeId, Node>, file: &std::fs::File, path: &Path) -> std::io::Result<String> {
        let name = self.new_name(meta);
        file.sync_all()?;
        std::fs::rename(path, self.dir.join(&name))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(name)
    }

    /// A file to receive a snapshot into, chunk by chunk; swept at start if left.
    fn receiving_path(&self) -> PathBuf {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        self.dir.join(format!("g{}-receiving-{stamp}.snapshot.partial", self.group))
    }

    /// Removes what a crash can leave: partial files, and snapshots of this group the
    /// pointer does not name (written but not yet pointed at, or replaced but not yet
    /// deleted).
    fn sweep(&self, current: Option<String>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let prefix = format!("g{}-", self.group);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with(&prefix) && (name.ends_with(".snapshot") || name.ends_with(".snapshot.partial"));
            if ours && current.as_deref() != Some(name.as_str()) {
                self.remove(&name);
            }
        }
    }

    fn remove(&self, file: &str) {
        if let Err(e) = std::fs::remove_file(self.dir.join(file)) {
            tracing::warn!(file, error = %e, "could not remove a replaced snapshot");
        }
    }
}

struct SmInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshot_seq: u64,
}

/// Applies committed entries to the application's [`Machine`], writes their changes to
/// the state tree, and keeps its snapshots.
#[derive(Clone)]
pub struct StateMachineStore {
    trees: Trees,
    state: Arc<StateTree>,
    machine: Arc<dyn Machine>,
    inner: Arc<Mutex<SmInner>>,
    snapshots: SnapshotFiles,
    /// Held through a build; an install waits for it (the build reads the tree the
    /// install replaces).
    building: Arc<Mutex<()>>,
    /// The file the snapshot being received is written to.
    receiving: Arc<std::sync::Mutex<Option<PathBuf>>>,
    /// Whether openraft asked for the current snapshot since this store was opened: its
    /// first question, at start, reads only the snapshot's metadata.
    asked: Arc<std::sync::atomic::AtomicBool>,
    /// A dump for replicas is being written in the background.
    refreshing: Arc<std::sync::atomic::AtomicBool>,
    /// How far the records are durable, for the log's purges.
    durable: Arc<tokio::sync::watch::Sender<Durable>>,
}

fn storage(e: impl std::fmt::Display) -> crate::Error {
    crate::Error::Storage(e.to_string())
}

/// Replaces the records by those of the snapshot file at `path`, under the installing
/// mark, then records `meta` as applied. Blocking.
fn install_records(trees: &Trees, state: &StateTree, machine: &dyn Machine, path: &Path, meta: &SnapshotMeta<NodeId, Node>) -> Result<(), String> {
    let named = |e: &dyn std::fmt::Display| format!("installing snapshot {}: {e}", path.display());
    let name = path.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
    state.set_own(&[(INSTALLING_KEY, &name)], &[]).map_err(|e| named(&e))?;
    trees.sync_now().map_err(|e| named(&e))?;
    let mut magic = [0u8; 8];
    let is_v2 = {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| named(&e))?;
        file.read_exact(&mut magic).is_ok() && &magic == SNAPSHOT_MAGIC
    };
    if is_v2 {
        let file = std::fs::File::open(path).map_err(|e| named(&e))?;
        state.load_dump(file).map_err(|e| named(&e))?;
    } else {
        // The legacy format holds the whole state as one value, so it is read whole.
        let bytes = std::fs::read(path).map_err(|e| named(&e))?;
        let mut changes = Changes::default();
        machine.import(&bytes, &mut changes).map_err(|e| named(&e))?;
        state.load_changes(changes).map_err(|e| named(&e))?;
    }
    let applied = encode(&AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() }).map_err(|e| named(&e))?;
    state.set_own(&[(APPLIED_KEY, &applied)], &[INSTALLING_KEY]).map_err(|e| named(&e))?;
    trees.sync_now().map_err(|e| named(&e))?;
    Ok(())
}

/// Says when every copy of a group's state machine store is gone: once its Raft was
/// shut down, openraft's state-machine worker still drains the applies and the install
/// queued before, and a snapshot build may still run; nothing may clear or reopen the
/// group's records before they end.
pub struct StoreGone(std::sync::Weak<Mutex<SmInner>>);

impl StoreGone {
    /// Waits until no copy of the store is left, up to `within`; whether none is.
    pub async fn wait(&self, within: std::time::Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while self.0.strong_count() > 0 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }
}

impl StateMachineStore {
    /// What says when this store and every copy of it are gone (see [`StoreGone`]).
    pub fn gone(&self) -> StoreGone {
        StoreGone(Arc::downgrade(&self.inner))
    }
}

impl StateMachineStore {
    fn load(trees: Trees, state: Arc<StateTree>, machine: Arc<dyn Machine>, snapshots: SnapshotFiles) -> Result<Self, crate::Error> {
        // A snapshot an older build kept inside sled moves to a file first.
        if let Some(legacy) = trees.get_meta::<LegacySnapshot>(LEGACY_SNAPSHOT_KEY).map_err(storage)? {
            let file = snapshots.write_with(&legacy.meta, |out| std::io::Write::write_all(out, &legacy.data))?;
            trees.put_meta(SNAPSHOT_KEY, &SnapshotPointer { meta: legacy.meta.clone(), file }).map_err(storage)?;
            trees.remove_meta(LEGACY_SNAPSHOT_KEY)?;
            trees.sync_now()?;
        }
        let pointer = trees.get_meta::<SnapshotPointer>(SNAPSHOT_KEY).map_err(storage)?;
        snapshots.sweep(pointer.as_ref().map(|p| p.file.clone()));
        let mut applied: Option<AppliedState> = match state.get_own(APPLIED_KEY)? {
            Some(bytes) => Some(decode(&bytes).map_err(|e| storage(format!("the applied state cannot be read: {e}")))?),
            None => None,
        };
        let installing = state.get_own(INSTALLING_KEY)?.is_some();
        if let Some(pointer) = &pointer {
            // Interrupted while installing, or behind the snapshot (a crash between
            // keeping a received snapshot and loading it), or a folder from before
            // records: the records come from the snapshot.
            let behind = applied.as_ref().is_none_or(|a| a.last_applied < pointer.meta.last_log_id);
            if installing || behind {
                let path = snapshots.path(&pointer.file);
                crate::state::off_runtime(|| install_records(&trees, &state, machine.as_ref(), &path, &pointer.meta)).map_err(storage)?;
                applied = Some(AppliedState { last_applied: pointer.meta.last_log_id, membership: pointer.meta.last_membership.clone() });
            }
        } else if installing {
            return Err(storage("the state tree is marked as installing a snapshot the store does not name; restore this data folder from a replica"));
        }
        machine.load(&state.records()).map_err(storage)?;
        // What was applied before this start was applied by a process that may have
        // been killed after fjall took its batches but before their sync; the machine
        // did not stop, so the files hold them, and a purge only ever goes behind a
        // snapshot point whose sync came first anyway.
        let durable = Durable { index: applied.as_ref().and_then(|a| a.last_applied).map_or(0, |l| l.index), failed: false };
        let inner = match applied {
            Some(a) => SmInner { last_applied: a.last_applied, membership: a.membership, snapshot_seq: 0 },
            None => SmInner { last_applied: None, membership: StoredMembership::default(), snapshot_seq: 0 },
        };
        Ok(StateMachineStore {
            trees,
            state,
            machine,
            inner: Arc::new(Mutex::new(inner)),
            snapshots,
            building: Arc::new(Mutex::new(())),
            receiving: Arc::new(std::sync::Mutex::new(None)),
            asked: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            refreshing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            durable: Arc::new(tokio::sync::watch::channel(durable).0),
        })
    }

    /// Lets the log purge anywhere, as a store tested on its own (openraft's suite
    /// purges logs with no snapshot behind them) needs.
    #[doc(hidden)]
    pub fn purge_without_snapshots(&self) {
        self.durable_to(u64::MAX);
    }

    /// Tells the log the records are durable up to `index`.
    fn durable_to(&self, index: u64) {
        self.durable.send_modify(|d| d.index = d.index.max(index));
    }

    /// Makes `file` the current snapshot: the pointer moves to it and the old file
    /// goes. A snapshot older than the current one is not installed over it (its file
    /// is removed); returns whether it was kept.
    async fn keep(&self, meta: &SnapshotMeta<NodeId, Node>, file: String) -> Result<bool, StorageError<NodeId>> {
        let write_err = |e: &dyn std::fmt::Display| StorageIOError::write_snapshot(Some(meta.signature()), &io_err(e));
        let _writing = self.snapshots.writing.lock().await;
        let old: Option<SnapshotPointer> = self.trees.get_meta(SNAPSHOT_KEY).map_err(|e| write_err(&e))?;
        if old.as_ref().is_some_and(|old| old.meta.last_log_id > meta.last_log_id) {
            self.snapshots.remove(&file);
            return Ok(false);
        }
        self.trees.put_meta(SNAPSHOT_KEY, &SnapshotPointer { meta: meta.clone(), file }).map_err(|e| write_err(&e))?;
        // Also makes the records the snapshot was taken from durable, before openraft
        // purges the log entries behind it.
        self.trees.sync().await.map_err(|e| write_err(&e))?;
        if let Some(old) = old {
            self.snapshots.remove(&old.file);
        }
        Ok(true)
    }

    async fn open_current(&self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let _writing = self.snapshots.writing.lock().await;
        let read_err = |e: &dyn std::fmt::Display| StorageIOError::read_snapshot(None, &io_err(e));
        let Some(pointer) = self.trees.get_meta::<SnapshotPointer>(SNAPSHOT_KEY).map_err(|e| read_err(&e))? else {
            return Ok(None);
        };
        let path = self.snapshots.path(&pointer.file);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| read_err(&format!("snapshot file {} named by the store cannot be read: {e}", path.display())))?;
        Ok(Some(Snapshot { meta: pointer.meta, snapshot: Box::new(file) }))
    }
}

fn snapshot_meta(inner: &mut SmInner) -> SnapshotMeta<NodeId, Node> {
    inner.snapshot_seq += 1;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let snapshot_id = match inner.last_applied {
        Some(last) => format!("{}-{}-{}-{stamp}", last.leader_id, last.index, inner.snapshot_seq),
        None => format!("--{}-{stamp}", inner.snapshot_seq),
    };
    SnapshotMeta { last_log_id: inner.last_applied, last_membership: inner.membership.clone(), snapshot_id }
}

/// A snapshot whose data is not read: what openraft's first question at start gets.
async fn metadata_only(meta: SnapshotMeta<NodeId, Node>) -> StorageResult<Option<Snapshot<TypeConfig>>> {
    let empty = tokio::fs::File::open("/dev/null").await.map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
    Ok(Some(Snapshot { meta, snapshot: Box::new(empty) }))
}

impl StateMachineStore {
    /// Writes a file of the records as of the last applied entry: captured between two
    /// applies, then dumped from that read snapshot (see `state.rs`); called from
    /// openraft's state-machine worker, applies wait for it, so this is only for the
    /// first file (later ones are written in the background). `reuse` names it when it
    /// covers exactly that entry.
    async fn materialize(&self, reuse: Option<SnapshotMeta<NodeId, Node>>) -> StorageResult<()> {
        let _building = self.building.lock().await;
        let meta = {
            let mut inner = self.inner.lock().await;
            self.state.begin_capture();
            match reuse {
                Some(meta) if meta.last_log_id == inner.last_applied => meta,
                _ => snapshot_meta(&mut inner),
            }
        };
        let written = self.dump_capture(&meta).await.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.keep(&meta, written).await?;
        Ok(())
    }

    /// Writes the capture begun by the caller to a new snapshot file named for `meta`,
    /// on a blocking thread, and ends the capture; returns the file's name.
    async fn dump_capture(&self, meta: &SnapshotMeta<NodeId, Node>) -> std::io::Result<String> {
        let (state, snapshots, for_file) = (self.state.clone(), self.snapshots.clone(), meta.clone());
        tokio::task::spawn_blocking(move || {
            let written = snapshots.write_with(&for_file, |out| state.dump(out).map(|_| ()));
            state.end_capture();
            written
        })
        .await
        .map_err(io_err)?
    }
}

impl StateMachineStore {
    /// Starts a dump of the records as of now unless one is under way (or a build or an
    /// install holds the store), and keeps it as the current file when it is done. The
    /// capture is taken here, between two applies; the dump reads it on a blocking
    /// thread while applies go on.
    async fn refresh_in_background(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.refreshing.swap(true, SeqCst) {
            return;
        }
        let Ok(building) = self.building.clone().try_lock_owned() else {
            self.refreshing.store(false, SeqCst);
            return;
        };
        let meta = {
            let mut inner = self.inner.lock().await;
            self.state.begin_capture();
            snapshot_meta(&mut inner)
        };
        let this = self.clone();
        tokio::spawn(async move {
            let written = this.dump_capture(&meta).await;
            drop(building);
            match written {
                Ok(file) => {
                    if let Err(e) = this.keep(&meta, file).await {
                        tracing::warn!(error = %e, "could not keep a snapshot file written for replicas");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not write a snapshot file for replicas"),
            }
            this.refreshing.store(false, SeqCst);
        });
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    /// The records are the state machine and are on disk: a snapshot point needs no
    /// copy of them. Building one makes the records as of the last applied entry durable
    /// and records that point, so openraft may purge the log behind it; a file is made
    /// when a replica asks for the snapshot (`get_current_snapshot`), and replaces the
    /// file before it, or here, in the background, when the current file's records are
    /// older than [`SNAPSHOT_FILE_MAX_AGE`].
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let _building = self.building.lock().await;
        let meta = snapshot_meta(&mut *self.inner.lock().await);
        let write_err = |e: &dyn std::fmt::Display| StorageIOError::write_snapshot(Some(meta.signature()), &io_err(e));
        // Every entry up to `meta` was written to the tree before its id was recorded.
        self.trees.put_meta(SNAPSHOT_AT_KEY, &meta).map_err(|e| write_err(&e))?;
        self.trees.sync().await.map_err(|e| write_err(&e))?;
        self.durable_to(meta.last_log_id.map_or(0, |l| l.index));
        // The file of an older point stays until a newer file replaces it: it answers a
        // replica at once while the newer one is written. But not for ever: it is a copy
        // of every record as of its point, which deletions since (a channel's retention)
        // did not reach. One older than [`SNAPSHOT_FILE_MAX_AGE`] is replaced now, in the
        // background, by a file of the records as they are.
        let empty = tokio::fs::File::open("/dev/null").await.map_err(|e| write_err(&e))?;
        drop(_building);
        if self.file_older_than(SNAPSHOT_FILE_MAX_AGE) && !self.receiving_now() {
            self.refresh_in_background().await;
        }
        Ok(Snapshot { meta, snapshot: Box::new(empty) })
    }
}

/// How long a snapshot transfer may go without a chunk and still count as arriving
/// ([`StateMachineStore::receiving_now`]): openraft's own timeout for a chunk is far
/// shorter, so a transfer this quiet was given up.
const RECEIVING_QUIET: std::time::Duration = std::time::Duration::from_secs(60);

/// Age past which a snapshot file is written again at the next snapshot point, so what
/// a deletion removed from the records (a conversation past its channel's retention)
/// leaves the node's disk within this time, not whenever a replica next needs a file.
pub const SNAPSHOT_FILE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl StateMachineStore {
    /// Whether the current snapshot file (received or written here) holds records more
    /// than `age` old: by when they were captured (the stamp that ends the snapshot's id,
    /// made where the dump was taken, so a received file counts from its leader's
    /// capture, not its arrival) or by the file's modification time, whichever is older;
    /// `false` when there is none.
    fn file_older_than(&self, age: std::time::Duration) -> bool {
        let Ok(Some(pointer)) = self.trees.get_meta::<SnapshotPointer>(SNAPSHOT_KEY) else { return false };
        let captured = pointer.meta.snapshot_id.rsplit('-').next().and_then(|ms| ms.parse::<u64>().ok()).map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
        let modified = std::fs::metadata(self.snapshots.path(&pointer.file)).and_then(|m| m.modified()).ok();
        captured.into_iter().chain(modified).any(|at| at.elapsed().is_ok_and(|elapsed| elapsed > age))
    }

    /// Whether a snapshot is arriving from the group's leader: its file was written to
    /// within [`RECEIVING_QUIET`]. The install that follows would wait for a dump of the
    /// whole state under way (and openraft's applies behind it), and replaces the file
    /// anyway; so the age-driven rewrite waits for a snapshot point after it. A transfer
    /// abandoned for longer does not hold the rewrite off.
    fn receiving_now(&self) -> bool {
        let Some(path) = self.receiving.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return false };
        std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|at| at.elapsed().is_ok_and(|quiet| quiet < RECEIVING_QUIET))
    }

    /// Checks a received snapshot, makes it the current one and replaces the records by
    /// it ([`RaftStateMachine::install_snapshot`]).
    async fn install(&mut self, meta: &SnapshotMeta<NodeId, Node>, snapshot: Box<tokio::fs::File>) -> StorageResult<()> {
        let write_err = |e: &dyn std::fmt::Display| StorageIOError::write_snapshot(Some(meta.signature()), &io_err(e));
        let _building = self.building.lock().await;
        let mut inner = self.inner.lock().await;
        let mut received = snapshot.into_std().await;
        let (snapshots, for_file) = (self.snapshots.clone(), meta.clone());
        let receiving = self.receiving.lock().unwrap_or_else(|p| p.into_inner()).take();
        let file = tokio::task::spawn_blocking(move || {
            use std::io::Seek;
            // A cut or damaged transfer is refused before it replaces anything.
            received.seek(std::io::SeekFrom::Start(0))?;
            crate::state::verify_dump(&mut received)?;
            // The received file itself becomes the snapshot (synced and renamed), not a
            // copy of it: openraft's core waits on this install before its purge, so it
            // stays short however large the state. Only if it is the file given.
            let same = |path: &Path| -> std::io::Result<bool> {
                use std::os::unix::fs::MetadataExt;
                let (given, named) = (received.metadata()?, std::fs::metadata(path)?);
                Ok(given.dev() == named.dev() && given.ino() == named.ino())
            };
            match receiving {
                Some(path) if same(&path).unwrap_or(false) => snapshots.adopt(&for_file, &received, &path),
                other => {
                    if let Some(path) = other {
                        let _ = std::fs::remove_file(path);
                    }
                    received.seek(std::io::SeekFrom::Start(0))?;
                    snapshots.write_with(&for_file, |out| std::io::copy(&mut received, out).map(|_| ()))
                }
            }
        })
        .await
        .map_err(|e| write_err(&e))?
        .map_err(|e| write_err(&e))?;
        let path = self.snapshots.path(&file);
        if !self.keep(meta, file).await? {
            // A newer snapshot is kept already, its records durable: the purge behind
            // this one may go.
            self.durable_to(meta.last_log_id.map_or(0, |l| l.index));
            return Ok(());
        }
        // The pointer to the file is durable: a restart from here installs it.
        self.durable_to(meta.last_log_id.map_or(0, |l| l.index));
        let (trees, state, machine, for_install) = (self.trees.clone(), self.state.clone(), self.machine.clone(), meta.clone());
        tokio::task::spawn_blocking(move || {
            machine.replacing()?;
            install_records(&trees, &state, machine.as_ref(), &path, &for_install)
        })
            .await
            .map_err(|e| write_err(&e))?
            .map_err(|e| write_err(&e))?;
        self.machine.load(&self.state.records()).map_err(|e| write_err(&e))?;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let mut responses = Vec::new();
        for entry in entries {
            let mut changes = Changes::default();
            let mut membership = None;
            let response = match entry.payload {
                EntryPayload::Blank => {
                    self.machine.leader_began(entry.log_id.index, &mut changes);
                    Vec::new()
                }
                EntryPayload::Normal(request) => self.machine.apply(entry.log_id.index, &request.0, &mut changes),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    Vec::new()
                }
            };
            // The applied point and membership move only once their write succeeded: a
            // snapshot built after a failed write must not claim what the records lack.
            let membership = membership.unwrap_or_else(|| inner.membership.clone());
            let applied = encode(&AppliedState { last_applied: Some(entry.log_id), membership: membership.clone() })
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
            self.state.write(changes, &applied).map_err(|e| StorageIOError::write_state_machine(&e))?;
            inner.last_applied = Some(entry.log_id);
            inner.membership = membership;
            self.machine.published(entry.log_id.index);
            responses.push(Response(response));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let path = self.snapshots.receiving_path();
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let previous = self.receiving.lock().unwrap_or_else(|p| p.into_inner()).replace(path);
        if let Some(previous) = previous {
            // A transfer that was abandoned for this one.
            let _ = std::fs::remove_file(previous);
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, Node>, snapshot: Box<tokio::fs::File>) -> StorageResult<()> {
        let installed = self.install(meta, snapshot).await;
        if installed.is_err() {
            // The purge openraft queued behind this install must not go ahead.
            self.durable.send_modify(|d| d.failed = true);
        }
        installed
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let first = !self.asked.swap(true, std::sync::atomic::Ordering::SeqCst);
        let read_err = |e: &dyn std::fmt::Display| StorageIOError::read_snapshot(None, &io_err(e));
        let point: Option<SnapshotMeta<NodeId, Node>> = self.trees.get_meta(SNAPSHOT_AT_KEY).map_err(|e| read_err(&e))?;
        let file: Option<SnapshotPointer> = self.trees.get_meta(SNAPSHOT_KEY).map_err(|e| read_err(&e))?;
        match (point, file) {
            (Some(point), file) if file.as_ref().is_none_or(|f| f.meta.last_log_id < point.last_log_id) => {
                if first {
                    // At start openraft reads only where the snapshot is; dumping the
                    // records for that would make every restart as slow as the state
                    // is large.
                    return metadata_only(point).await;
                }
                if file.is_some() {
                    // A replica needs it and an older file exists: that one answers at
                    // once (openraft asks from the worker that applies entries, so a
                    // dump here would stop applies for as long as it takes), and a file
                    // of the records as of now is written in the background for the
                    // next question. A replica the older file leaves behind the log
                    // asks again and gets the newer one.
                    self.refresh_in_background().await;
                } else {
                    // The first file: written now (or exactly as of the point, when
                    // nothing was applied since).
                    self.materialize(Some(point)).await?;
                }
                self.open_current().await
            }
            _ => self.open_current().await,
        }
    }
}
