//! A group's state machine on disk: the records its [`Machine`](crate::Machine) keeps in
//! the group's state tree, written one applied entry at a time, and snapshot files made
//! from them without stopping applies.
//!
//! The state partition (`g<group>-state` in the node's fjall keyspace, ADR 0005) holds
//! the machine's records under the prefix `r` and the store's own keys under `s/`: `s/applied` (the last applied log id and the
//! membership, written in the same batch as that entry's changes) and `s/installing`
//! (present only while a snapshot is being loaded into the tree).
//!
//! A snapshot is a dump of the records as of one applied entry. It is taken while
//! entries go on being applied: the capture is a read snapshot of the partition at the
//! sequence number between two applies, and the builder walks it in key order, a chunk
//! at a time. The dump is exactly the state at the captured entry; the store keeps the
//! versions the capture sees until it ends (disk, not memory).
//!
//! Snapshot file format, version 2: the 8 bytes `SBSNAP02`, then each record as a
//! big-endian `u32` key length, the key, a `u32` value length and the value, in key
//! order, then `u32::MAX` and the `u64` count of records. A file without the magic is
//! the legacy format (the whole state as one value) and goes to `Machine::import`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::Bound;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use fjall::AbstractTree;

use crate::Error;

/// First bytes of a version 2 snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"SBSNAP02";

const RECORD: u8 = b'r';
pub(crate) const APPLIED_KEY: &[u8] = b"s/applied";
pub(crate) const INSTALLING_KEY: &[u8] = b"s/installing";

/// Records per chunk when a snapshot is built or loaded.
const CHUNK: usize = 4096;

/// Longest key or value a snapshot file may hold: a damaged length is refused rather
/// than allocated.
const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;

pub(crate) fn stored(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(RECORD);
    out.extend_from_slice(key);
    out
}

/// What a memtable holds for each write besides its key and value (sequence number,
/// kind, the skip list's node), about.
const OP_OVERHEAD: usize = 64;

/// About what a write of a key and a value of these lengths adds to a memtable.
pub(crate) fn write_size(key: usize, value: usize) -> u64 {
    (key + value + OP_OVERHEAD) as u64
}

/// The length fjall gives each journal file, and counts for each sealed one.
const JOURNAL_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// What fjall's holds (fjall 2.11, `PartitionHandle::check_memtable_overflow` and
/// `check_write_buffer_size`) depend on, read just before a write. Those holds sleep
/// the writing thread, not a task: a write that fills its partition's memtable rotates
/// the journal (syncs and creates files) and then, past 90% of the journal limit,
/// sleeps 500 ms, past the limit 100 ms at a time until flushes free journals, and with
/// 32 runs in the partition's first level 10 ms at a time until compaction clears
/// them; any write sleeps up to half a millisecond from 20 runs, and 10 ms at a time
/// past the write buffer limit (100 ms once just under it). On a runtime thread, two
/// such sleeps hold both of a 2-core node's threads: it stops answering votes and
/// heartbeats (the kill drill's lost majority, docs/benchmarks.md).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pressure {
    /// Journals, the active one included (`Keyspace::journal_count`).
    pub journals: usize,
    pub journal_limit: u64,
    /// Every partition's memtables together (`Keyspace::write_buffer_size`).
    pub write_buffer: u64,
    pub write_buffer_limit: u64,
    /// The written partition's active memtable, and the size at which it rotates.
    pub memtable: u64,
    pub memtable_limit: u64,
    pub first_level_runs: usize,
}

impl Pressure {
    pub(crate) fn of(keyspace: &fjall::Keyspace, part: &fjall::PartitionHandle) -> Pressure {
        Pressure {
            journals: keyspace.journal_count(),
            journal_limit: crate::store::JOURNAL_BYTES,
            write_buffer: keyspace.write_buffer_size(),
            write_buffer_limit: crate::store::WRITE_BUFFER_BYTES,
            memtable: u64::from(part.tree.active_memtable_size()),
            // fjall keeps a partition's memtable size private: the one the store makes
            // partitions with. Partitions made before 2026-12-05 rotate at 8 MiB, so their
            // writes from 2 MiB on go off the scheduler too, which costs time, not safety.
            memtable_limit: u64::from(crate::store::MEMTABLE_BYTES),
            first_level_runs: part.tree.l0_run_count(),
        }
    }

    /// Whether a write of about `bytes` may be held: it fills the memtable (the only
    /// writes the journal and first-level halts stop), or it comes within three quarters
    /// of the journal or write buffer limit, or of 20 first-level runs (fjall counts a
    /// sealed journal at its file's length, 32 MiB when preallocated; more is counted as
    /// more journals here, which errs on the side of yes).
    pub(crate) fn may_hold(&self, bytes: u64) -> bool {
        self.memtable + bytes > self.memtable_limit
            || self.journals as u64 * JOURNAL_FILE_BYTES >= self.journal_limit / 4 * 3
            || self.write_buffer + bytes >= self.write_buffer_limit / 4 * 3
            || self.first_level_runs >= 15
    }
}

/// Record store writes made off the runtime's scheduler ([`mindful_write`]).
pub(crate) static WRITES_OFF_RUNTIME: AtomicU64 = AtomicU64::new(0);

/// Committed pointers not written because the store might have held the write.
pub(crate) static COMMITTED_SKIPPED: AtomicU64 = AtomicU64::new(0);

/// The record store's counters, in Prometheus text, for a node's `/metrics`.
pub fn store_metrics(out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP switchboard_store_writes_off_runtime_total Record store writes that fjall might hold (a memtable filled, journals or memtables near their limits), made off the runtime's threads.\n# TYPE switchboard_store_writes_off_runtime_total counter");
    let _ = writeln!(out, "switchboard_store_writes_off_runtime_total {}", WRITES_OFF_RUNTIME.load(Relaxed));
    let _ = writeln!(out, "# HELP switchboard_store_committed_skipped_total Committed pointers not written while the record store might hold writes.\n# TYPE switchboard_store_committed_skipped_total counter");
    let _ = writeln!(out, "switchboard_store_committed_skipped_total {}", COMMITTED_SKIPPED.load(Relaxed));
}

/// Runs `write`, a write of about `bytes` to `part` of `keyspace`, off the runtime's
/// scheduler when fjall may hold it ([`Pressure::may_hold`]), and where it is otherwise.
pub(crate) fn mindful_write<T>(keyspace: &fjall::Keyspace, part: &fjall::PartitionHandle, bytes: u64, write: impl FnOnce() -> T) -> T {
    if Pressure::of(keyspace, part).may_hold(bytes) {
        WRITES_OFF_RUNTIME.fetch_add(1, Relaxed);
        off_runtime(write)
    } else {
        write()
    }
}

/// Runs `work`, which may sleep the thread, so that the tokio runtime's other tasks go
/// on meanwhile: on a worker thread of a multi-thread runtime its scheduler moves to
/// another thread first (`block_in_place`); elsewhere (no runtime, a current-thread
/// runtime) it just runs.
pub(crate) fn off_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// The changes one entry makes to the records, written atomically with its log id.
#[derive(Debug, Default)]
pub struct Changes {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Changes {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    pub fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Read access to a group's records, as of the last entry whose changes were written.
#[derive(Clone)]
pub struct Records {
    part: fjall::PartitionHandle,
}

fn owned((key, value): (fjall::Slice, fjall::Slice)) -> (Vec<u8>, Vec<u8>) {
    (key[1..].to_vec(), value.to_vec())
}

impl Records {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.part.get(stored(key))?.map(|v| v.to_vec()))
    }

    /// The record with the greatest key starting with `prefix`.
    pub fn last(&self, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>, Error> {
        match self.part.prefix(stored(prefix)).next_back() {
            Some(item) => Ok(Some(owned(item?))),
            None => Ok(None),
        }
    }

    /// Up to `limit` records whose keys start with `prefix`, greatest key first.
    pub fn newest(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        let mut out = Vec::new();
        for item in self.part.prefix(stored(prefix)).rev().take(limit) {
            out.push(owned(item?));
        }
        Ok(out)
    }

    /// Up to `limit` records whose keys start with `prefix`, in key order, starting
    /// after `after` (a full key) when given.
    pub fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        let start = match after {
            Some(after) => Bound::Excluded(stored(after)),
            None => Bound::Included(stored(prefix)),
        };
        let full = stored(prefix);
        let mut out = Vec::new();
        // Bounded above by the prefix's end: an iterator past it would walk whatever
        // follows (old versions and tombstones included) before it could stop.
        for item in self.part.range::<Vec<u8>, _>((start, after_prefix(&full))) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            if !key.starts_with(&full) {
                break;
            }
            out.push(owned((key, value)));
        }
        Ok(out)
    }
}

/// The first key after every key that starts with `prefix`.
fn after_prefix(prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

/// A snapshot build under way: the records as of its capture, and how far it got.
struct Capture {
    snapshot: fjall::Snapshot,
    /// The last stored key the builder has emitted; `None` before the first chunk.
    cursor: Option<Vec<u8>>,
}

/// The writer of a group's state partition.
pub(crate) struct StateTree {
    pub(crate) keyspace: fjall::Keyspace,
    pub(crate) part: fjall::PartitionHandle,
    capture: Mutex<Option<Capture>>,
}

impl StateTree {
    pub(crate) fn new(keyspace: fjall::Keyspace, part: fjall::PartitionHandle) -> Self {
        StateTree { keyspace, part, capture: Mutex::new(None) }
    }

    pub(crate) fn records(&self) -> Records {
        Records { part: self.part.clone() }
    }

    fn capture(&self) -> std::sync::MutexGuard<'_, Option<Capture>> {
        self.capture.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one entry's changes and the new applied state in one atomic batch (in the
    /// OS's buffers when this returns, so a killed process loses nothing; synced to disk
    /// at snapshot points).
    ///
    /// fjall may put the writing thread to sleep (see [`Pressure::may_hold`]); when it is near
    /// one of those points the batch is committed off the runtime's scheduler
    /// ([`mindful_write`]), so the node's other tasks (votes, heartbeats, sockets) go on.
    pub(crate) fn write(&self, changes: Changes, applied: &[u8]) -> Result<(), fjall::Error> {
        let mut batch = self.keyspace.batch();
        let mut bytes = write_size(APPLIED_KEY.len(), applied.len());
        for (key, value) in changes.ops {
            bytes += write_size(key.len() + 1, value.as_ref().map_or(0, Vec::len));
            match value {
                Some(value) => batch.insert(&self.part, stored(&key), value),
                None => batch.remove(&self.part, stored(&key)),
            }
        }
        batch.insert(&self.part, APPLIED_KEY, applied);
        mindful_write(&self.keyspace, &self.part, bytes, || batch.commit())
    }

    /// One store key's value, outside the records (`s/applied`, `s/installing`).
    pub(crate) fn get_own(&self, key: &[u8]) -> Result<Option<Vec<u8>>, fjall::Error> {
        Ok(self.part.get(key)?.map(|v| v.to_vec()))
    }

    /// Writes and removes store keys in one batch.
    pub(crate) fn set_own(&self, puts: &[(&[u8], &[u8])], removes: &[&[u8]]) -> Result<(), fjall::Error> {
        let mut batch = self.keyspace.batch();
        let mut bytes = 0;
        for (key, value) in puts {
            batch.insert(&self.part, *key, *value);
            bytes += write_size(key.len(), value.len());
        }
        for key in removes {
            batch.remove(&self.part, *key);
            bytes += write_size(key.len(), 0);
        }
        mindful_write(&self.keyspace, &self.part, bytes, || batch.commit())
    }

    /// Freezes the records as they are now for a snapshot build. The caller makes sure
    /// no entry is being applied meanwhile.
    pub(crate) fn begin_capture(&self) {
        let snapshot = self.part.snapshot_at(self.keyspace.instant());
        *self.capture() = Some(Capture { snapshot, cursor: None });
    }

    pub(crate) fn end_capture(&self) {
        *self.capture() = None;
    }

    /// The next records of the capture, in key order (keys without the `r` prefix).
    /// Empty once every record was emitted.
    fn next_chunk(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, fjall::Error> {
        let mut guard = self.capture();
        let Some(capture) = guard.as_mut() else { return Ok(Vec::new()) };
        let lower = match &capture.cursor {
            Some(cursor) => Bound::Excluded(cursor.clone()),
            None => Bound::Included(vec![RECORD]),
        };
        let mut chunk = Vec::new();
        let mut last = None;
        for item in capture.snapshot.range::<Vec<u8>, _>((lower, Bound::Excluded(vec![RECORD + 1]))).take(CHUNK) {
            let (key, value) = item?;
            last = Some(key.to_vec());
            chunk.push(owned((key, value)));
        }
        if last.is_some() {
            capture.cursor = last;
        }
        Ok(chunk)
    }

    /// Writes the capture to `out` in the snapshot file format; returns the record count.
    pub(crate) fn dump(&self, out: impl Write) -> std::io::Result<u64> {
        let mut out = BufWriter::with_capacity(1 << 20, out);
        out.write_all(SNAPSHOT_MAGIC)?;
        let mut count = 0u64;
        loop {
            let chunk = self.next_chunk().map_err(std::io::Error::other)?;
            if chunk.is_empty() {
                break;
            }
            for (key, value) in chunk {
                write_part(&mut out, &key)?;
                write_part(&mut out, &value)?;
                count += 1;
            }
        }
        out.write_all(&u32::MAX.to_be_bytes())?;
        out.write_all(&count.to_be_bytes())?;
        out.flush()?;
        Ok(count)
    }

    /// Replaces every record by those of a version 2 snapshot read from `input`. The
    /// caller has marked the tree as installing; the records are partial until it is
    /// done. Returns the number of records loaded.
    ///
    /// Only what differs is written: the snapshot's records come in key order, and
    /// they are walked beside the records already here, so a record with the same value
    /// is left alone, a changed or new one is written and one the snapshot does not hold
    /// is removed. A replica that was a few seconds behind (restarted, or cut off
    /// briefly) writes a few records rather than its whole state twice (every record's
    /// removal, then its copy), which filled the store's journal and held its writes for
    /// seconds in the kill drill (docs/benchmarks.md, "Members that come back").
    pub(crate) fn load_dump(&self, input: impl Read) -> std::io::Result<u64> {
        let mut input = BufReader::with_capacity(1 << 20, input);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != SNAPSHOT_MAGIC {
            return Err(invalid("not a version 2 snapshot"));
        }
        // The records as they were before the load, beside the snapshot's.
        let before = self.part.snapshot();
        let mut records = before.range::<Vec<u8>, _>(vec![RECORD]..vec![RECORD + 1]);
        let mut here = records.next().transpose().map_err(std::io::Error::other)?;
        let mut count = 0u64;
        let mut batch = self.keyspace.batch();
        let mut previous: Option<Vec<u8>> = None;
        loop {
            let Some(key) = read_part(&mut input)? else { break };
            let value = read_part(&mut input)?.ok_or_else(|| invalid("a record without a value"))?;
            if previous.as_ref().is_some_and(|p| *p >= key) {
                return Err(invalid("the snapshot's records are not in key order"));
            }
            let stored_key = stored(&key);
            previous = Some(key);
            let mut same = false;
            // Records here before this one are not in the snapshot: removed.
            while let Some((old_key, old_value)) = &here {
                let order = old_key[..].cmp(&stored_key[..]);
                if order == std::cmp::Ordering::Greater {
                    break;
                }
                if order == std::cmp::Ordering::Less {
                    batch.remove(&self.part, old_key.to_vec());
                    self.commit_when_full(&mut batch)?;
                } else {
                    same = old_value[..] == value[..];
                }
                here = records.next().transpose().map_err(std::io::Error::other)?;
                if order == std::cmp::Ordering::Equal {
                    break;
                }
            }
            if !same {
                batch.insert(&self.part, stored_key, value);
            }
            count += 1;
            self.commit_when_full(&mut batch)?;
        }
        let mut expected = [0u8; 8];
        input.read_exact(&mut expected).map_err(|_| invalid("the snapshot ends early"))?;
        if u64::from_be_bytes(expected) != count {
            return Err(invalid("the snapshot's record count does not match"));
        }
        // What is left here comes after the snapshot's last record: not in it.
        while let Some((old_key, _)) = here {
            batch.remove(&self.part, old_key.to_vec());
            self.commit_when_full(&mut batch)?;
            here = records.next().transpose().map_err(std::io::Error::other)?;
        }
        batch.commit().map_err(std::io::Error::other)?;
        Ok(count)
    }

    /// Commits `batch` and starts a new one once it holds a chunk of changes.
    fn commit_when_full(&self, batch: &mut fjall::Batch) -> std::io::Result<()> {
        if batch.len() >= CHUNK {
            std::mem::replace(batch, self.keyspace.batch()).commit().map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Replaces every record by `changes` (an imported legacy snapshot).
    pub(crate) fn load_changes(&self, changes: Changes) -> Result<(), fjall::Error> {
        self.clear()?;
        for part in changes.ops.chunks(CHUNK) {
            let mut batch = self.keyspace.batch();
            for (key, value) in part {
                if let Some(value) = value {
                    batch.insert(&self.part, stored(key), value.as_slice());
                }
            }
            batch.commit()?;
        }
        Ok(())
    }

    /// Removes every record (not the store's own keys), a chunk at a time, in one pass.
    fn clear(&self) -> Result<(), fjall::Error> {
        remove_range(&self.keyspace, &self.part, vec![RECORD]..vec![RECORD + 1])
    }
}

/// Removes every key of `part` in `range`, a chunk at a time, in one pass.
pub(crate) fn remove_range(keyspace: &fjall::Keyspace, part: &fjall::PartitionHandle, range: impl std::ops::RangeBounds<Vec<u8>>) -> Result<(), fjall::Error> {
    let mut batch = keyspace.batch();
    for item in part.range::<Vec<u8>, _>(range) {
        let (key, _) = item?;
        batch.remove(part, key);
        if batch.len() == CHUNK {
            std::mem::replace(&mut batch, keyspace.batch()).commit()?;
        }
    }
    batch.commit()
}

/// Reads a snapshot through and checks it is whole: a version 2 file with every record
/// and its trailer (`Ok(Some(count))`), or not a version 2 file at all (`Ok(None)`: the
/// legacy format, checked when it is imported).
pub(crate) fn verify_dump(input: impl Read) -> std::io::Result<Option<u64>> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let mut magic = [0u8; 8];
    if input.read_exact(&mut magic).is_err() || &magic != SNAPSHOT_MAGIC {
        return Ok(None);
    }
    let mut count = 0u64;
    let mut previous: Option<Vec<u8>> = None;
    while let Some(key) = read_part(&mut input)? {
        read_part(&mut input)?.ok_or_else(|| invalid("a record without a value"))?;
        if previous.as_ref().is_some_and(|p| *p >= key) {
            return Err(invalid("the snapshot's records are not in key order"));
        }
        previous = Some(key);
        count += 1;
    }
    let mut expected = [0u8; 8];
    input.read_exact(&mut expected).map_err(|_| invalid("the snapshot ends early"))?;
    if u64::from_be_bytes(expected) != count {
        return Err(invalid("the snapshot's record count does not match"));
    }
    Ok(Some(count))
}

fn invalid(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned())
}

fn write_part(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).ok().filter(|l| *l <= MAX_RECORD_BYTES).ok_or_else(|| invalid("a record is too large"))?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(bytes)
}

/// A key or value, or `None` at the end marker.
fn read_part(input: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).map_err(|_| invalid("the snapshot ends early"))?;
    let len = u32::from_be_bytes(len);
    if len == u32::MAX {
        return Ok(None);
    }
    if len > MAX_RECORD_BYTES {
        return Err(invalid("a record length is out of range"));
    }
    let mut bytes = vec![0u8; len as usize];
    input.read_exact(&mut bytes).map_err(|_| invalid("the snapshot ends early"))?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_tree() -> (tempfile::TempDir, StateTree) {
        let dir = tempfile::tempdir().expect("temp dir");
        let keyspace = fjall::Config::new(dir.path()).open().expect("keyspace");
        let part = keyspace.open_partition("state", Default::default()).expect("partition");
        (dir, StateTree::new(keyspace, part))
    }

    #[test]
    fn a_write_that_fjall_may_hold_is_told_apart() {
        use crate::store::{JOURNAL_BYTES, WRITE_BUFFER_BYTES};
        let quiet = Pressure {
            journals: 1,
            journal_limit: JOURNAL_BYTES,
            write_buffer: 0,
            write_buffer_limit: WRITE_BUFFER_BYTES,
            memtable: 0,
            memtable_limit: 2 << 20,
            first_level_runs: 0,
        };
        assert!(!quiet.may_hold(1000));
        // A store at work: a few sealed journals, memtables filling.
        let busy = Pressure { journals: 8, write_buffer: WRITE_BUFFER_BYTES / 2, memtable: 1 << 20, first_level_runs: 4, ..quiet };
        assert!(!busy.may_hold(1000));
        // A write that fills its memtable rotates the journal, and only such writes meet
        // the journal and first-level halts.
        assert!(Pressure { memtable: (2 << 20) - 500, ..quiet }.may_hold(1000));
        // fjall sleeps a rotating write past 90% of the journal limit (the 15th sealed
        // journal of 32 MiB) and halts it past the limit (the 17th): both covered, with
        // room for a burst of rotations before them.
        for journals in [12, 15, 17, 30] {
            assert!(Pressure { journals, ..quiet }.may_hold(1000), "{journals} journals");
        }
        // Memtables close under the write buffer limit or over it, this write included.
        assert!(Pressure { write_buffer: WRITE_BUFFER_BYTES * 9 / 10, ..quiet }.may_hold(1000));
        assert!(Pressure { write_buffer: WRITE_BUFFER_BYTES / 2, ..quiet }.may_hold(WRITE_BUFFER_BYTES / 2));
        // First-level runs: delays from 20, a halt from 32.
        for first_level_runs in [15, 20, 32] {
            assert!(Pressure { first_level_runs, ..quiet }.may_hold(1000), "{first_level_runs} runs");
        }
    }

    #[test]
    fn a_store_reports_its_pressure_and_writes_through_it() {
        let (_dir, tree) = open_tree();
        let before = Pressure::of(&tree.keyspace, &tree.part);
        assert!(!before.may_hold(1000), "{before:?}");
        put(&tree, &[("a", Some("one")), ("b", Some("two"))]);
        let after = Pressure::of(&tree.keyspace, &tree.part);
        assert!(after.memtable > before.memtable && after.write_buffer > before.write_buffer, "{before:?} then {after:?}");
        // A write as large as the memtable is one that may be held; inside a
        // multi-thread runtime it is made off the scheduler, and lands all the same.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().expect("runtime");
        let big = "x".repeat(after.memtable_limit as usize);
        let off_before = WRITES_OFF_RUNTIME.load(Relaxed);
        runtime.block_on(async {
            tokio::spawn(async move {
                put(&tree, &[("c", Some(big.as_str()))]);
                let records = tree.records();
                assert_eq!(records.get(b"c").expect("read").map(|v| v.len()), Some(after.memtable_limit as usize));
                assert_eq!(records.get(b"a").expect("read"), Some(b"one".to_vec()));
            })
            .await
            .expect("write task");
        });
        assert!(WRITES_OFF_RUNTIME.load(Relaxed) > off_before, "the large write was not counted as made off the runtime");
        let mut text = String::new();
        store_metrics(&mut text);
        assert!(text.contains("# TYPE switchboard_store_writes_off_runtime_total counter\nswitchboard_store_writes_off_runtime_total "), "{text}");
    }

    #[test]
    fn a_write_held_off_the_runtime_leaves_its_other_tasks_running() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::time::Duration;
        // One worker thread: a write that slept on it would hold every other task.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().expect("runtime");
        let ticks = runtime.block_on(async {
            let ticks = Arc::new(AtomicUsize::new(0));
            let counted = ticks.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            });
            // What fjall's halt does to the writing thread, for 300 ms.
            let held = tokio::spawn(async { off_runtime(|| std::thread::sleep(Duration::from_millis(300))) });
            held.await.expect("held write");
            ticker.abort();
            ticks.load(Ordering::Relaxed)
        });
        // The ticker wakes every 5 ms: about 60 times in 300 ms when it can run, none at
        // all when the only worker sleeps.
        assert!(ticks >= 5, "the runtime's other task ran only {ticks} times while a write was held");
        // Without a multi-thread runtime the work just runs.
        assert_eq!(off_runtime(|| 7), 7);
        let single = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        assert_eq!(single.block_on(async { off_runtime(|| 8) }), 8);
    }

    fn put(tree: &StateTree, pairs: &[(&str, Option<&str>)]) {
        let mut changes = Changes::default();
        for (k, v) in pairs {
            match v {
                Some(v) => changes.put(k.as_bytes().to_vec(), v.as_bytes().to_vec()),
                None => changes.remove(k.as_bytes().to_vec()),
            }
        }
        tree.write(changes, b"applied").expect("write");
    }

    fn all(records: &Records) -> Vec<(String, String)> {
        records
            .scan(b"", None, usize::MAX)
            .expect("scan")
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    /// Changes made while a build is under way, ahead of and behind its cursor, do not
    /// reach the dump: it is the state at the capture, and loading it gives that state.
    #[test]
    fn a_dump_is_the_state_at_its_capture_whatever_is_applied_meanwhile() {
        let (_dir, tree) = open_tree();
        let keys: Vec<String> = (0..10_000).map(|i| format!("k{i:05}")).collect();
        for part in keys.chunks(500) {
            let pairs: Vec<(&str, Option<&str>)> = part.iter().map(|k| (k.as_str(), Some("v0"))).collect();
            put(&tree, &pairs);
        }
        let expected = all(&tree.records());
        tree.begin_capture();
        let mut out = Vec::new();
        out.extend_from_slice(SNAPSHOT_MAGIC);
        let mut count = 0u64;
        let mut round = 0;
        loop {
            let chunk = tree.next_chunk().expect("chunk");
            // Between chunks: overwrite, remove and add keys everywhere.
            round += 1;
            let early = format!("k{:05}", round);
            let late = format!("k{:05}", 9_999 - round);
            let new = format!("k{:05}x", 5_000 + round);
            put(&tree, &[(&early, Some("changed")), (&late, None), (&new, Some("added")), ("a-first", Some("added"))]);
            if chunk.is_empty() {
                break;
            }
            for (k, v) in chunk {
                write_part(&mut out, &k).unwrap();
                write_part(&mut out, &v).unwrap();
                count += 1;
            }
        }
        tree.end_capture();
        out.extend_from_slice(&u32::MAX.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        assert_eq!(count, 10_000);

        let (_dir2, other) = open_tree();
        put(&other, &[("stale", Some("gone after load"))]);
        assert_eq!(other.load_dump(&out[..]).expect("load"), 10_000);
        assert_eq!(all(&other.records()), expected);
    }

    /// A whole chunk of keys added after the capture has nothing to emit; the dump goes
    /// on past it instead of ending there.
    #[test]
    fn keys_added_during_a_build_do_not_end_the_dump_early() {
        let (_dir, tree) = open_tree();
        let old: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        put(&tree, &old.iter().map(|k| (k.as_str(), Some("old"))).collect::<Vec<_>>());
        tree.begin_capture();
        let added: Vec<String> = (0..2 * CHUNK).map(|i| format!("j{i:05}")).collect();
        for part in added.chunks(500) {
            put(&tree, &part.iter().map(|k| (k.as_str(), Some("new"))).collect::<Vec<_>>());
        }
        let mut out = Vec::new();
        assert_eq!(tree.dump(&mut out).expect("dump"), 10);
        tree.end_capture();
    }

    /// A load over records that mostly match the snapshot leaves the same ones alone
    /// and ends with exactly the snapshot's records: changed values, records only
    /// here (before, between and after the snapshot's) and records only in it.
    #[test]
    fn a_load_over_close_records_ends_with_exactly_the_snapshot() {
        let (_dir, tree) = open_tree();
        let keys: Vec<String> = (0..3 * CHUNK).map(|i| format!("k{i:05}")).collect();
        put(&tree, &keys.iter().map(|k| (k.as_str(), Some("v"))).collect::<Vec<_>>());
        tree.begin_capture();
        let mut out = Vec::new();
        tree.dump(&mut out).expect("dump");
        tree.end_capture();
        let expected = all(&tree.records());
        // Loaded over the very records it was made of, it writes nothing.
        let buffered = tree.keyspace.write_buffer_size();
        assert_eq!(tree.load_dump(&out[..]).expect("load"), keys.len() as u64);
        assert_eq!(tree.keyspace.write_buffer_size(), buffered, "a load over the same records wrote some");
        assert_eq!(all(&tree.records()), expected);

        let (_dir2, other) = open_tree();
        let mut near: Vec<(String, Option<&str>)> = keys.iter().map(|k| (k.clone(), Some("v"))).collect();
        near[7].1 = Some("changed");
        near[CHUNK + 1].1 = None;
        near.push(("a-only-here".into(), Some("x")));
        near.push(("k00010-only-here".into(), Some("x")));
        near.push(("z-only-here".into(), Some("x")));
        put(&other, &near.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>());
        let buffered = other.keyspace.write_buffer_size();
        assert_eq!(other.load_dump(&out[..]).expect("load"), keys.len() as u64);
        // Two records written, three removed: a few hundred bytes, not the whole state.
        let written = other.keyspace.write_buffer_size() - buffered;
        assert!(written < 1024, "{written} bytes written for five records");
        assert_eq!(all(&other.records()), expected);

        // Into an empty tree, and into one whose records all come after the snapshot's.
        let (_dir3, empty) = open_tree();
        assert_eq!(empty.load_dump(&out[..]).expect("load"), keys.len() as u64);
        assert_eq!(all(&empty.records()), expected);
        let (_dir4, after) = open_tree();
        put(&after, &[("zz1", Some("x")), ("zz2", Some("y"))]);
        after.load_dump(&out[..]).expect("load");
        assert_eq!(all(&after.records()), expected);
    }

    #[test]
    fn a_dump_out_of_key_order_is_refused() {
        let mut out = Vec::new();
        out.extend_from_slice(SNAPSHOT_MAGIC);
        for key in ["b", "a"] {
            write_part(&mut out, key.as_bytes()).unwrap();
            write_part(&mut out, b"v").unwrap();
        }
        out.extend_from_slice(&u32::MAX.to_be_bytes());
        out.extend_from_slice(&2u64.to_be_bytes());
        let (_dir, tree) = open_tree();
        let refused = tree.load_dump(&out[..]).expect_err("out of order");
        assert!(refused.to_string().contains("key order"), "{refused}");
        // Refused when it arrives, before it replaces the snapshot the member has.
        let refused = verify_dump(&out[..]).expect_err("out of order");
        assert!(refused.to_string().contains("key order"), "{refused}");
    }

    #[test]
    fn a_cut_or_damaged_dump_is_refused() {
        let (_dir, tree) = open_tree();
        put(&tree, &[("a", Some("1")), ("b", Some("2"))]);
        tree.begin_capture();
        let mut out = Vec::new();
        tree.dump(&mut out).expect("dump");
        tree.end_capture();
        let (_dir2, other) = open_tree();
        assert!(other.load_dump(&out[..out.len() - 3]).is_err());
        let mut wrong = out.clone();
        wrong[0] = b'X';
        assert!(other.load_dump(&wrong[..]).is_err());
        assert_eq!(other.load_dump(&out[..]).expect("whole"), 2);
    }

    #[test]
    fn scan_keeps_to_its_prefix_and_resumes_after_a_key() {
        let (_dir, tree) = open_tree();
        put(&tree, &[("h1", Some("a")), ("h2", Some("b")), ("h3", Some("c")), ("i1", Some("d"))]);
        let records = tree.records();
        let keys = |v: Vec<(Vec<u8>, Vec<u8>)>| v.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect::<Vec<_>>();
        assert_eq!(keys(records.scan(b"h", None, 10).unwrap()), ["h1", "h2", "h3"]);
        assert_eq!(keys(records.scan(b"h", Some(b"h1"), 1).unwrap()), ["h2"]);
        assert_eq!(records.get(b"i1").unwrap(), Some(b"d".to_vec()));
        // Newest first, only as many as asked, within the prefix.
        assert_eq!(keys(records.newest(b"h", 2).unwrap()), ["h3", "h2"]);
        assert_eq!(keys(records.newest(b"h", 10).unwrap()), ["h3", "h2", "h1"]);
        assert!(records.newest(b"g", 10).unwrap().is_empty());
    }
}
