//! openraft storage on sled: a log store and a state machine wrapper per Raft group.
//!
//! Architecture invariant: a log append is reported durable to openraft only after
//! `flush_async` has returned; sled's own 500 ms background sync is never relied upon.
//! The state machine lives in memory and is rebuilt on start from the last snapshot
//! plus the committed log, which `save_committed` makes possible.
//!
//! Snapshots are files in the group's snapshot folder, written whole (temporary file,
//! fsync, rename) before the pointer to them is stored in sled; the file the pointer
//! left is deleted, so an old snapshot gives its disk space back at once. Building one
//! captures the state between two applies and encodes and writes it while applies go
//! on. (Data folders from before kept the snapshot inside sled under `snapshot`; it is
//! read once and dropped when the first file is written.)

use std::fmt::Debug;
use std::io::Cursor;
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

use crate::{Machine, NodeId, Node, Response, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(v, _)| v)
}

/// The sled trees one group uses, named by group id so groups share one database.
#[derive(Clone)]
struct Trees {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl Trees {
    fn open(db: &sled::Db, group: u64) -> Result<Self, sled::Error> {
        Ok(Trees {
            db: db.clone(),
            log: db.open_tree(format!("g{group}/log"))?,
            meta: db.open_tree(format!("g{group}/meta"))?,
        })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        match self.meta.get(key).map_err(|e| e.to_string())? {
            Some(bytes) => decode(&bytes).map(Some).map_err(|e| format!("{key}: {e}")),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let bytes = encode(value).map_err(|e| e.to_string())?;
        self.meta.insert(key, bytes).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Opens (or creates) the storage of one group.
pub fn open_group(
    db: &sled::Db,
    group: u64,
    machine: Arc<dyn Machine>,
    snapshot_dir: &Path,
) -> Result<(LogStore, StateMachineStore), crate::Error> {
    let trees = Trees::open(db, group)?;
    let log = LogStore { trees: trees.clone() };
    std::fs::create_dir_all(snapshot_dir)?;
    let snapshots = SnapshotFiles { dir: snapshot_dir.to_path_buf(), group, writing: Arc::new(Mutex::new(())) };
    let sm = StateMachineStore::load(trees, machine, snapshots)?;
    Ok((log, sm))
}

/// The Raft log of one group: entries keyed by big-endian index, plus vote, committed
/// and last-purged pointers in the meta tree.
#[derive(Clone)]
pub struct LogStore {
    trees: Trees,
}

impl LogStore {
    fn read_range<RB: RangeBounds<u64>>(&self, range: RB) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(*i),
            Bound::Excluded(0) => return Ok(vec![]),
            Bound::Excluded(i) => Some(i - 1),
            Bound::Unbounded => None,
        };
        let iter = match end {
            Some(end) if end < start => return Ok(vec![]),
            Some(end) => self.trees.log.range(start.to_be_bytes()..=end.to_be_bytes()),
            None => self.trees.log.range(start.to_be_bytes()..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let entry: Entry<TypeConfig> = decode(&value).map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl LogStore {
    /// Deletes the entries whose big-endian index keys fall in `range`, in one batch.
    fn remove_entries<R: RangeBounds<[u8; 8]>>(&self, range: R) -> StorageResult<()> {
        let keys: Vec<_> =
            self.trees.log.range(range).keys().collect::<Result<_, _>>().map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.trees.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_range(range)
    }
}

fn io_err(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> =
            self.trees.get_meta("last_purged").map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
        let last = match self.trees.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, value)) => {
                let entry: Entry<TypeConfig> = decode(&value).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.trees.put_meta("vote", vote).map_err(|e| StorageIOError::write_vote(&io_err(e)))?;
        self.trees.db.flush_async().await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.trees.get_meta("vote").map_err(|e| StorageIOError::read_vote(&io_err(e)))?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not flushed here: a lost committed pointer only means re-applying from the
        // snapshot up to a smaller index, which the next leader contact completes.
        self.trees.put_meta("committed", &committed).map_err(|e| StorageIOError::write(&io_err(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let committed: Option<Option<LogId<NodeId>>> =
            self.trees.get_meta("committed").map_err(|e| StorageIOError::read(&io_err(e)))?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
        }
        self.trees.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        // Durable before we say so: this is the acknowledgement every client ack rests on.
        let flushed = self.trees.db.flush_async().await.map(|_| ()).map_err(io_err);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.remove_entries(log_id.index.to_be_bytes()..)?;
        self.trees.db.flush_async().await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the pointer first so a crash mid-purge never leaves a hole unexplained.
        self.trees.put_meta("last_purged", &log_id).map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        self.trees.db.flush_async().await.map_err(|e| StorageIOError::write_logs(&e))?;
        self.remove_entries(..=log_id.index.to_be_bytes())
    }
}

/// A snapshot kept inside sled, as data folders from before snapshot files hold it.
#[derive(Clone, Serialize, Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The sled record of the current snapshot: what it covers and its file.
#[derive(Clone, Serialize, Deserialize)]
struct SnapshotPointer {
    meta: SnapshotMeta<NodeId, Node>,
    file: String,
}

const LEGACY_SNAPSHOT_KEY: &str = "snapshot";
const SNAPSHOT_KEY: &str = "snapshot_file";

/// The folder a group's snapshot files live in.
#[derive(Clone)]
struct SnapshotFiles {
    dir: PathBuf,
    group: u64,
    /// Serializes pointer updates (a build and an install may overlap).
    writing: Arc<Mutex<()>>,
}

impl SnapshotFiles {
    fn read(&self, file: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(file))
    }

    /// Writes `data` whole under a new name and returns the name.
    async fn write(&self, meta: &SnapshotMeta<NodeId, Node>, data: Arc<Vec<u8>>) -> std::io::Result<String> {
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let file = format!("g{}-{index:020}-{stamp}.snapshot", self.group);
        let (dir, name) = (self.dir.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let partial = dir.join(format!("{name}.partial"));
            let mut out = std::fs::File::create(&partial)?;
            out.write_all(&data)?;
            out.sync_all()?;
            std::fs::rename(&partial, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(file)
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

/// Applies committed entries to the application's [`Machine`] and keeps its snapshots.
#[derive(Clone)]
pub struct StateMachineStore {
    trees: Trees,
    machine: Arc<dyn Machine>,
    inner: Arc<Mutex<SmInner>>,
    snapshots: SnapshotFiles,
}

impl StateMachineStore {
    fn load(trees: Trees, machine: Arc<dyn Machine>, snapshots: SnapshotFiles) -> Result<Self, crate::Error> {
        let mut inner = SmInner { last_applied: None, membership: StoredMembership::default(), snapshot_seq: 0 };
        machine.reset();
        if let Some((meta, data)) = current(&trees, &snapshots).map_err(crate::Error::Storage)? {
            machine.restore(&data).map_err(crate::Error::Storage)?;
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
        }
        snapshots.sweep(trees.get_meta::<SnapshotPointer>(SNAPSHOT_KEY).map_err(crate::Error::Storage)?.map(|p| p.file));
        Ok(StateMachineStore { trees, machine, inner: Arc::new(Mutex::new(inner)), snapshots })
    }

    /// Makes `data` the current snapshot: its file first, then the pointer, then the
    /// old file goes. A snapshot older than the current one is not installed over it.
    async fn keep(&self, meta: &SnapshotMeta<NodeId, Node>, data: Arc<Vec<u8>>) -> Result<(), StorageError<NodeId>> {
        let write_err = |e: &dyn std::fmt::Display| StorageIOError::write_snapshot(Some(meta.signature()), &io_err(e));
        let _writing = self.snapshots.writing.lock().await;
        let old: Option<SnapshotPointer> = self.trees.get_meta(SNAPSHOT_KEY).map_err(|e| write_err(&e))?;
        if old.as_ref().is_some_and(|old| old.meta.last_log_id > meta.last_log_id) {
            return Ok(());
        }
        let file = self.snapshots.write(meta, data).await.map_err(|e| write_err(&e))?;
        self.trees.put_meta(SNAPSHOT_KEY, &SnapshotPointer { meta: meta.clone(), file }).map_err(|e| write_err(&e))?;
        self.trees.meta.remove(LEGACY_SNAPSHOT_KEY).map_err(|e| write_err(&e))?;
        self.trees.db.flush_async().await.map_err(|e| write_err(&e))?;
        if let Some(old) = old {
            self.snapshots.remove(&old.file);
        }
        Ok(())
    }
}

/// The current snapshot, from its file or (older data folders) from sled.
fn current(trees: &Trees, snapshots: &SnapshotFiles) -> Result<Option<(SnapshotMeta<NodeId, Node>, Vec<u8>)>, String> {
    if let Some(pointer) = trees.get_meta::<SnapshotPointer>(SNAPSHOT_KEY)? {
        let data = snapshots.read(&pointer.file).map_err(|e| {
            format!("snapshot file {} named by the store cannot be read: {e}", snapshots.dir.join(&pointer.file).display())
        })?;
        return Ok(Some((pointer.meta, data)));
    }
    Ok(trees.get_meta::<LegacySnapshot>(LEGACY_SNAPSHOT_KEY)?.map(|legacy| (legacy.meta, legacy.data)))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // Captured between two applies, so the state and `last_applied` agree; the
        // encoding and the write happen after the lock is released.
        let (encode, meta) = {
            let mut inner = self.inner.lock().await;
            let encode = self.machine.capture();
            inner.snapshot_seq += 1;
            let snapshot_id = match inner.last_applied {
                Some(last) => format!("{}-{}-{}", last.leader_id, last.index, inner.snapshot_seq),
                None => format!("--{}", inner.snapshot_seq),
            };
            (encode, SnapshotMeta { last_log_id: inner.last_applied, last_membership: inner.membership.clone(), snapshot_id })
        };
        let data = tokio::task::spawn_blocking(encode)
            .await
            .map_err(|e| StorageIOError::read_state_machine(&io_err(e)))?
            .map_err(|e| StorageIOError::read_state_machine(&io_err(e)))?;
        // Shared with the file writer rather than copied: a snapshot is the whole state.
        let data = Arc::new(data);
        self.keep(&meta, data.clone()).await?;
        let data = Arc::try_unwrap(data).unwrap_or_else(|shared| shared.as_ref().clone());
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
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
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response(Vec::new())),
                EntryPayload::Normal(request) => {
                    responses.push(Response(self.machine.apply(entry.log_id.index, &request.0)));
                }
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                    responses.push(Response(Vec::new()));
                }
            }
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, Node>, snapshot: Box<Cursor<Vec<u8>>>) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let mut inner = self.inner.lock().await;
        self.machine.restore(&data).map_err(|e| StorageIOError::write_state_machine(&io_err(e)))?;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        self.keep(meta, Arc::new(data)).await
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        // Not while `keep` moves the pointer and deletes the file it named.
        let _writing = self.snapshots.writing.lock().await;
        let current = current(&self.trees, &self.snapshots).map_err(|e| StorageIOError::read_snapshot(None, &io_err(e)))?;
        Ok(current.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
