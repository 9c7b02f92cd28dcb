//! The Raft log of one group as append-only segment files (ADR 0005).
//!
//! A segment is a file `<first index, 20 digits>.seg` in the group's log folder: the
//! magic `SBLOG001`, the first index (`u64`, big-endian), then one record per entry in
//! index order: the payload's length (`u32`, little-endian), its CRC-32 (`u32`,
//! little-endian), and the payload, the openraft `Entry` in bincode 2. Entries are
//! never rewritten: an append writes to the end of the newest segment (a new one is
//! started past 8 MiB or 1,024 entries), a truncation
//! cuts a segment short, a purge deletes whole segments whose entries are all purged,
//! so purged space goes back to the file system at once.
//!
//! Durability: an append writes its records and returns; a flusher thread then calls
//! `fdatasync` on the segment and only then tells openraft the entries are durable.
//! Appends that arrive while a sync runs are covered by the next one together (group
//! commit at the log). Before a new segment is started, the full one is synced and the
//! folder is synced after the new file is created, so every segment but the newest is
//! complete on disk. At open, a record cut short or failing its CRC at the end of the
//! newest segment is a write the crash interrupted, which was never acknowledged: it
//! is cut off. Anywhere else it is corruption, and the group does not open.
//!
//! The vote and the last purged log id live in the folder's `meta` file (`SBLOGM01`,
//! then bincode), replaced atomically (temporary file, fsync, rename, folder fsync).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::LogFlushed;
use openraft::{Entry, LogId, Vote};
use serde::{Deserialize, Serialize};

use crate::{NodeId, TypeConfig};

const SEGMENT_MAGIC: &[u8; 8] = b"SBLOG001";
const META_MAGIC: &[u8; 8] = b"SBLOGM01";
const HEADER_BYTES: u64 = 16;
const RECORD_HEADER: u64 = 8;
/// A segment is closed and a new one started once it holds this many bytes. Purging
/// frees space a segment at a time, so this bounds the purged bytes still on disk.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// A segment is also closed once it holds this many entries, about a snapshot
/// interval's worth: on a quiet group (a purge tick a minute) 8 MiB would take weeks to
/// fill, and the entries in it (customers' messages, names) would stay on disk that
/// long after their conversation was deleted; so they go within this many entries after
/// the log is purged past them.
pub const SEGMENT_ENTRIES: usize = 1024;
/// A record longer than this is taken for corruption (a group-commit entry is about
/// 1 MiB at most).
const MAX_RECORD_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("log segment {0}: {1} (the log is damaged: restore this node's data folder from a backup, or remove it and let the node rejoin its group)")]
    Corrupt(String, String),
    #[error("log entry {0}: {1}")]
    Decode(u64, String),
    #[error("append of entry {got} where {expected} was expected")]
    Gap { expected: u64, got: u64 },
}

impl From<LogError> for std::io::Error {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Io(context, e) => std::io::Error::new(e.kind(), format!("{context}: {e}")),
            other => std::io::Error::other(other.to_string()),
        }
    }
}

fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> LogError {
    move |e| LogError::Io(context.to_string(), e)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, std::io::Error> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(std::io::Error::other)
}

/// What the `meta` file holds.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct LogMeta {
    pub vote: Option<Vote<NodeId>>,
    pub purged: Option<LogId<NodeId>>,
}

struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where entry `first + i` starts: its record header.
    offsets: Vec<u64>,
    /// Bytes in use (the next record goes here).
    end: u64,
}

impl Segment {
    fn next(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }
    /// The last index it holds, if any.
    fn last(&self) -> Option<u64> {
        self.next().checked_sub(1).filter(|_| !self.offsets.is_empty())
    }
    fn span(&self, i: usize) -> (u64, u64) {
        let start = self.offsets[i];
        let end = self.offsets.get(i + 1).copied().unwrap_or(self.end);
        (start, end - start)
    }
}

struct Inner {
    dir: PathBuf,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    last: Option<LogId<NodeId>>,
    meta: LogMeta,
}

enum Flush {
    Sync(Arc<File>, LogFlushed<TypeConfig>),
}

/// One group's log. Clones share it: the writer and openraft's readers.
#[derive(Clone)]
pub struct SegmentLog {
    inner: Arc<Mutex<Inner>>,
    flusher: mpsc::Sender<Flush>,
    /// Held shared by a read from the moment it finds its records until it has read
    /// them, and exclusively by a truncation while it cuts files: a replication task
    /// that openraft detached (a leader stepping down) may still be reading when the
    /// new leader's entries truncate the log, and bytes of the cut (or of entries
    /// written over them) would read as a damaged record, which stops the group.
    files: Arc<std::sync::RwLock<()>>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// Creates `dir` and the folders above it that are missing, each one's entry made
/// durable in its parent (deepest last) before anything in it counts on it. When it
/// exists, its entry is synced in its parent all the same: a crash may have come
/// between its creation and that sync.
pub(crate) fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        // Its parent, and the one above (the log's folder in the data folder), as a
        // creation a crash interrupted may have left them; a folder this process may
        // not read higher up is not its own to sync.
        let mut at = dir.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
        for level in 0..2 {
            let Some(parent) = at else { break };
            match File::open(parent).and_then(|d| d.sync_all()) {
                Ok(()) => {}
                Err(e) if level == 0 => return Err(e),
                Err(_) => break,
            }
            at = parent.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }).filter(|p| *p != parent);
        }
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        at = p.parent();
    }
    std::fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        let parent = created.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir.display()))
}

impl SegmentLog {
    /// Opens the log in `dir` (created if missing). `legacy_meta` is asked for the vote
    /// and last purged id when the folder has no `meta` file yet; an error from it stops
    /// the open (a vote that cannot be read, taken for none, would let the node vote
    /// twice in one term).
    pub fn open(dir: &Path, legacy_meta: impl FnOnce() -> Result<LogMeta, LogError>) -> Result<Self, LogError> {
        Self::open_sized(dir, SEGMENT_BYTES, legacy_meta)
    }

    /// As [`SegmentLog::open`], starting a new segment past `segment_bytes` (tests use
    /// small segments to cross their boundaries).
    pub fn open_sized(dir: &Path, segment_bytes: u64, legacy_meta: impl FnOnce() -> Result<LogMeta, LogError>) -> Result<Self, LogError> {
        create_dir_durably(dir).map_err(io(dir.display()))?;
        let meta_path = dir.join("meta");
        let meta = match std::fs::read(&meta_path) {
            Ok(bytes) => read_meta(&meta_path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let meta = legacy_meta()?;
                write_meta(dir, &meta)?;
                meta
            }
            Err(e) => return Err(LogError::Io(meta_path.display().to_string(), e)),
        };
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io(dir.display()))? {
            let item = item.map_err(io(dir.display()))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if let Some(first) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
                names.push((first, item.path()));
            } else if name.starts_with(".meta.") && name.ends_with(".tmp") {
                // A `meta` replacement a crash interrupted: the old file still holds.
                std::fs::remove_file(item.path()).map_err(io(item.path().display()))?;
            }
        }
        names.sort();
        let count = names.len();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        for (i, (first, path)) in names.into_iter().enumerate() {
            let newest = i + 1 == count;
            match load_segment(first, &path, newest)? {
                Some(segment) => {
                    // Segments wholly behind the purge point whose unlinks a crash kept
                    // only in part: they go, as the purge asked, before any gap counts.
                    // (A gap past the purge point is lost entries, and refused below.)
                    if segments.back().is_some_and(|prev| prev.next() != segment.first)
                        && meta.purged.is_some_and(|p| segment.first <= p.index + 1 && segments.back().is_some_and(|prev| prev.next() <= p.index + 1))
                    {
                        for old in segments.drain(..) {
                            std::fs::remove_file(&old.path).map_err(io(old.path.display()))?;
                        }
                    }
                    if let Some(prev) = segments.back() {
                        if prev.next() != segment.first {
                            return Err(LogError::Corrupt(
                                path.display().to_string(),
                                format!("starts at {} but the one before ends before {}", segment.first, prev.next()),
                            ));
                        }
                    }
                    segments.push_back(segment);
                }
                None => {
                    std::fs::remove_file(&path).map_err(io(path.display()))?;
                }
            }
        }
        let mut inner = Inner { dir: dir.to_path_buf(), segment_bytes: segment_bytes.max(HEADER_BYTES + 1), segments, last: None, meta };
        inner.drop_purged()?;
        inner.last = match inner.segments.back().and_then(|s| s.last()) {
            Some(index) => Some(inner.read_entry(index)?.log_id),
            None => None,
        };
        let (flusher, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || flush_loop(rx))
            .map_err(io("start the log flusher"))?;
        Ok(SegmentLog { inner: Arc::new(Mutex::new(inner)), flusher, files: Arc::new(std::sync::RwLock::new(())) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the in-memory index as it was before
        // the failed call's file operations; the files are checked again at open.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn meta(&self) -> LogMeta {
        self.lock().meta.clone()
    }

    /// The last purged id and the last entry's id (the purged one when none is left).
    pub fn state(&self) -> (Option<LogId<NodeId>>, Option<LogId<NodeId>>) {
        let inner = self.lock();
        let purged = inner.meta.purged;
        let last = match (inner.last, purged) {
            (Some(last), Some(purged)) if last.index < purged.index => Some(purged),
            (None, purged) => purged,
            (last, _) => last,
        };
        (purged, last)
    }

    pub fn save_vote(&self, vote: &Vote<NodeId>) -> Result<(), LogError> {
        let mut inner = self.lock();
        let mut meta = inner.meta.clone();
        meta.vote = Some(*vote);
        write_meta(&inner.dir, &meta)?;
        inner.meta = meta;
        Ok(())
    }

    /// Entries with indexes in `start..end` that the log holds, in order.
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<Entry<TypeConfig>>, LogError> {
        self.read_pausing(start, end, || ())
    }

    /// [`SegmentLog::read`], calling `pause` between finding the records and reading
    /// them (for tests of what may run meanwhile).
    #[doc(hidden)]
    pub fn read_pausing(&self, start: u64, end: u64, pause: impl FnOnce()) -> Result<Vec<Entry<TypeConfig>>, LogError> {
        // Where the records are, found under the lock; read after it is released.
        let mut spans: Vec<(u64, Arc<File>, String, u64, u64, usize)> = Vec::new();
        let _reading;
        {
            let inner = self.lock();
            // Taken before the lock is released, so no truncation runs between finding
            // the records and reading them.
            _reading = self.files.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            let start = start.max(inner.meta.purged.map_or(0, |p| p.index + 1));
            for segment in &inner.segments {
                let from = start.max(segment.first);
                let to = end.min(segment.next());
                if from >= to {
                    continue;
                }
                let i = (from - segment.first) as usize;
                let j = (to - segment.first) as usize;
                let offset = segment.offsets[i];
                let stop = segment.offsets.get(j).copied().unwrap_or(segment.end);
                spans.push((from, segment.file.clone(), segment.path.display().to_string(), offset, stop - offset, j - i));
            }
        }
        pause();
        let mut out = Vec::new();
        for (first, file, name, offset, len, count) in spans {
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, offset).map_err(io(&name))?;
            let mut pos = 0usize;
            for k in 0..count {
                let index = first + k as u64;
                let (payload, next) = record_at(&bytes, pos).map_err(|why| LogError::Corrupt(name.clone(), format!("entry {index}: {why}")))?;
                out.push(decode_entry(index, payload)?);
                pos = next;
            }
        }
        Ok(out)
    }

    /// Writes `entries` and has the flusher report them durable through `callback`.
    pub fn append(&self, entries: impl IntoIterator<Item = Entry<TypeConfig>>, callback: LogFlushed<TypeConfig>) -> Result<(), LogError> {
        let mut inner = self.lock();
        inner.write_entries(entries)?;
        match inner.segments.back() {
            Some(segment) => {
                let file = segment.file.clone();
                drop(inner);
                if let Err(mpsc::SendError(Flush::Sync(_, callback))) = self.flusher.send(Flush::Sync(file, callback)) {
                    callback.log_io_completed(Err(std::io::Error::other("the log flusher stopped")));
                }
            }
            None => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    /// Removes entries from `index` on, durably.
    pub fn truncate(&self, index: u64) -> Result<(), LogError> {
        let mut inner = self.lock();
        if index >= inner.next_index() {
            return Ok(());
        }
        // Reads in progress end first (they hold no lock on `inner` meanwhile).
        let _cutting = self.files.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Newest first, each removal durable before the next: a file system may keep
        // unlinks out of order over a power loss, and a newer segment kept past an
        // older one removed would be a gap the next start refuses. Likewise before the
        // cut.
        let dir = inner.dir.clone();
        while inner.segments.back().is_some_and(|s| s.first >= index) {
            if let Some(segment) = inner.segments.pop_back() {
                std::fs::remove_file(&segment.path).map_err(io(segment.path.display()))?;
                sync_dir(&dir)?;
            }
        }
        if let Some(segment) = inner.segments.back_mut() {
            if index < segment.next() {
                let keep = (index - segment.first) as usize;
                let cut = segment.offsets[keep];
                segment.file.set_len(cut).map_err(io(segment.path.display()))?;
                segment.file.sync_data().map_err(io(segment.path.display()))?;
                segment.offsets.truncate(keep);
                segment.end = cut;
            }
        }
        let dir = inner.dir.clone();
        sync_dir(&dir)?;
        inner.last = match index.checked_sub(1) {
            Some(prev) if inner.meta.purged.is_none_or(|p| p.index < prev) && inner.holds(prev) => Some(inner.read_entry(prev)?.log_id),
            _ => None,
        };
        Ok(())
    }

    /// Records `log_id` as purged (durably, first), then deletes the segments whose
    /// entries are all purged.
    pub fn purge(&self, log_id: LogId<NodeId>) -> Result<(), LogError> {
        let mut inner = self.lock();
        let mut meta = inner.meta.clone();
        if meta.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        meta.purged = Some(log_id);
        write_meta(&inner.dir, &meta)?;
        inner.meta = meta;
        inner.drop_purged()
    }

    /// Writes `entries` that are not in the log yet and syncs them before returning
    /// (used to move a log kept in sled into segments).
    pub fn append_synced(&self, entries: Vec<Entry<TypeConfig>>) -> Result<(), LogError> {
        let mut inner = self.lock();
        let next = inner.next_index();
        inner.write_entries(entries.into_iter().filter(|e| e.log_id.index >= next))?;
        if let Some(segment) = inner.segments.back() {
            segment.file.sync_data().map_err(io(segment.path.display()))?;
        }
        Ok(())
    }

    /// Bytes the segments hold on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().segments.iter().map(|s| s.end).sum()
    }

    /// The segment files, oldest first.
    pub fn segment_files(&self) -> Vec<PathBuf> {
        self.lock().segments.iter().map(|s| s.path.clone()).collect()
    }
}

impl Inner {
    fn next_index(&self) -> u64 {
        let after_last = self.last.map_or(0, |l| l.index + 1);
        let after_purged = self.meta.purged.map_or(0, |p| p.index + 1);
        after_last.max(after_purged)
    }

    fn holds(&self, index: u64) -> bool {
        self.segments.iter().any(|s| s.first <= index && index < s.next())
    }

    fn read_entry(&self, index: u64) -> Result<Entry<TypeConfig>, LogError> {
        let Some(segment) = self.segments.iter().find(|s| s.first <= index && index < s.next()) else {
            return Err(LogError::Decode(index, "not in the log".into()));
        };
        let (offset, len) = segment.span((index - segment.first) as usize);
        let mut bytes = vec![0u8; len as usize];
        segment.file.read_exact_at(&mut bytes, offset).map_err(io(segment.path.display()))?;
        let (payload, _) = record_at(&bytes, 0).map_err(|why| LogError::Corrupt(segment.path.display().to_string(), format!("entry {index}: {why}")))?;
        decode_entry(index, payload)
    }

    /// Deletes the oldest segments while every entry they hold is purged.
    fn drop_purged(&mut self) -> Result<(), LogError> {
        let Some(purged) = self.meta.purged else { return Ok(()) };
        let mut removed = false;
        while let Some(segment) = self.segments.front() {
            if segment.last().is_some_and(|last| last > purged.index) {
                break;
            }
            if let Some(segment) = self.segments.pop_front() {
                std::fs::remove_file(&segment.path).map_err(io(segment.path.display()))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        if self.segments.is_empty() {
            self.last = None;
        }
        Ok(())
    }

    /// Writes `entries` after the last one, starting segments as needed; not synced.
    fn write_entries(&mut self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) -> Result<(), LogError> {
        let mut buf: Vec<u8> = Vec::new();
        let mut offsets: Vec<u64> = Vec::new();
        let mut written: Option<LogId<NodeId>> = None;
        let mut expected = self.next_index();
        for entry in entries {
            // An empty log starts where it is told (the first entry a group writes
            // after a snapshot covered everything it had; openraft's suite also writes
            // below the purge point, which reads then skip).
            let empty = offsets.is_empty() && self.segments.iter().all(|s| s.offsets.is_empty());
            if empty {
                expected = entry.log_id.index;
            }
            if entry.log_id.index != expected {
                self.write_pending(&mut buf, &mut offsets, &mut written)?;
                return Err(LogError::Gap { expected, got: entry.log_id.index });
            }
            let payload = encode(&entry).map_err(io(format!("encode entry {expected}")))?;
            // A new segment between entries once the newest is full, or when this entry
            // does not follow it (a purge jumped past its end).
            let needs_segment = match self.segments.back() {
                None => true,
                Some(s) => {
                    s.next() + offsets.len() as u64 != expected
                        || s.end + buf.len() as u64 >= self.segment_bytes
                        || s.offsets.len() + offsets.len() >= SEGMENT_ENTRIES
                }
            };
            if needs_segment {
                self.write_pending(&mut buf, &mut offsets, &mut written)?;
                self.start_segment(expected)?;
            }
            let base = self.segments.back().map_or(HEADER_BYTES, |s| s.end);
            offsets.push(base + buf.len() as u64);
            push_record(&mut buf, &payload);
            expected += 1;
            written = Some(entry.log_id);
        }
        self.write_pending(&mut buf, &mut offsets, &mut written)
    }

    /// Writes the bytes gathered for the newest segment.
    fn write_pending(&mut self, buf: &mut Vec<u8>, offsets: &mut Vec<u64>, written: &mut Option<LogId<NodeId>>) -> Result<(), LogError> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some(segment) = self.segments.back_mut() else {
            return Err(LogError::Corrupt(self.dir.display().to_string(), "no segment to write to".into()));
        };
        segment.file.write_all_at(buf, segment.end).map_err(io(segment.path.display()))?;
        segment.end += buf.len() as u64;
        segment.offsets.append(offsets);
        buf.clear();
        if let Some(last) = written.take() {
            self.last = Some(last);
        }
        Ok(())
    }

    /// Closes the newest segment (synced whole) and starts one at `first`.
    fn start_segment(&mut self, first: u64) -> Result<(), LogError> {
        if let Some(segment) = self.segments.back() {
            segment.file.sync_data().map_err(io(segment.path.display()))?;
            if segment.offsets.is_empty() {
                if let Some(segment) = self.segments.pop_back() {
                    std::fs::remove_file(&segment.path).map_err(io(segment.path.display()))?;
                }
            }
        }
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io(path.display()))?;
        let mut header = Vec::with_capacity(HEADER_BYTES as usize);
        header.extend_from_slice(SEGMENT_MAGIC);
        header.extend_from_slice(&first.to_be_bytes());
        file.write_all_at(&header, 0).map_err(io(path.display()))?;
        sync_dir(&self.dir)?;
        self.segments.push_back(Segment { first, path, file: Arc::new(file), offsets: Vec::new(), end: HEADER_BYTES });
        Ok(())
    }
}

fn push_record(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// The payload of the record at `pos` and where the next record starts.
fn record_at(bytes: &[u8], pos: usize) -> Result<(&[u8], usize), String> {
    let header = bytes.get(pos..pos + RECORD_HEADER as usize).ok_or("record header cut short")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len as u64 > MAX_RECORD_BYTES {
        return Err(format!("record length {len} is past the limit"));
    }
    // No entry encodes to nothing; and zeros pass as an empty record (the checksum of
    // nothing is 0): a file whose new length reached the disk before its bytes did.
    if len == 0 {
        return Err("an empty record (zeros where a write did not reach the disk)".into());
    }
    let start = pos + RECORD_HEADER as usize;
    let payload = bytes.get(start..start + len).ok_or("record cut short")?;
    if crc32fast::hash(payload) != crc {
        return Err("record fails its checksum".into());
    }
    Ok((payload, start + len))
}

/// The unit a disk writes whole: a write cut short by a power loss leaves some of these
/// written and the others as they were, which past a file's old end is zeros.
const SECTOR: usize = 512;

/// Whether the record at `pos`, which did not read, looks like a write a crash cut short
/// rather than damage to a record that reached the disk: it runs past the file's end, or
/// part of it that lies in one sector is all zeros (a sector never written past the old
/// end of the file). A record whose every sector holds something, with the file going
/// on past it, was written whole and then damaged: cutting it off as a torn tail would
/// drop entries this node had acknowledged, so the open refuses instead. (A damaged
/// length that points past the file's end, within the record size limit, cannot be told
/// from a file cut short, and is cut off as one.)
fn torn_at(bytes: &[u8], pos: usize) -> bool {
    let Some(header) = bytes.get(pos..pos + RECORD_HEADER as usize) else { return true };
    // A sector never written reads as zeros from `pos` (at or past the old end of the
    // file) to the sector's end: each sector the record touches is looked at that far,
    // so a record's last byte or two that happen to be zeros do not pass for one.
    let zeros_in = |sector_start: usize| {
        let (from, to) = (sector_start.max(pos), (sector_start + SECTOR).min(bytes.len()));
        from < to && bytes[from..to].iter().all(|b| *b == 0)
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    // A crash only leaves zeros, which make a length smaller, never larger: a length
    // past any record's is damage, unless the header itself is where the zeros start.
    if len as u64 > MAX_RECORD_BYTES {
        let header_end = pos + RECORD_HEADER as usize;
        return (pos / SECTOR * SECTOR..header_end).step_by(SECTOR).any(zeros_in);
    }
    let end = pos.saturating_add(RECORD_HEADER as usize).saturating_add(len);
    if end > bytes.len() {
        return true;
    }
    (pos / SECTOR * SECTOR..end).step_by(SECTOR).any(zeros_in)
}

fn decode_entry(index: u64, payload: &[u8]) -> Result<Entry<TypeConfig>, LogError> {
    let (entry, _): (Entry<TypeConfig>, usize) =
        bincode::serde::decode_from_slice(payload, bincode::config::standard()).map_err(|e| LogError::Decode(index, e.to_string()))?;
    if entry.log_id.index != index {
        return Err(LogError::Decode(index, format!("holds entry {}", entry.log_id.index)));
    }
    Ok(entry)
}

/// Reads a segment's record index. The newest segment's torn tail is cut off; `None`
/// means the file holds no entry (a segment started just before a crash).
fn load_segment(first: u64, path: &Path, newest: bool) -> Result<Option<Segment>, LogError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(io(&name))?;
    if bytes.len() < HEADER_BYTES as usize {
        return if newest { Ok(None) } else { Err(LogError::Corrupt(name, "shorter than its header".into())) };
    }
    // A segment started just before a crash whose header never reached the disk: its
    // header and first entries were written together, and every sync that covered an
    // entry covered the header too, so it holds no acknowledged entry (what a torn
    // write left of the entries after the header is not read).
    // Its first record shares the header's page and was written with it: it is torn
    // too. A zeroed header before a whole first record is damage, refused below.
    let header = HEADER_BYTES as usize;
    if newest && bytes[..header].iter().all(|b| *b == 0) && (bytes.len() == header || (record_at(&bytes, header).is_err() && torn_at(&bytes, header))) {
        if bytes.iter().any(|b| *b != 0) {
            tracing::warn!(segment = %name, "dropping the newest log segment, whose first page a crash left unwritten (it held no acknowledged entry)");
        }
        return Ok(None);
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return Err(LogError::Corrupt(name, "not a Switchboard log segment (magic SBLOG001 expected)".into()));
    }
    if bytes[8..16] != first.to_be_bytes() {
        return Err(LogError::Corrupt(name, "its header names another first index".into()));
    }
    let mut offsets = Vec::new();
    let mut pos = HEADER_BYTES as usize;
    while pos < bytes.len() {
        match record_at(&bytes, pos) {
            Ok((_, next)) => {
                offsets.push(pos as u64);
                pos = next;
            }
            Err(why) if newest && torn_at(&bytes, pos) => {
                tracing::warn!(segment = %name, offset = pos, %why, "cutting off a log write the crash interrupted (never acknowledged)");
                break;
            }
            Err(why) if newest => {
                return Err(LogError::Corrupt(name, format!("at byte {pos}: {why}, and not as a write cut short by a crash leaves it (no part of it is zeros and the file goes on past it)")))
            }
            Err(why) => return Err(LogError::Corrupt(name, format!("at byte {pos}: {why}"))),
        }
    }
    if offsets.is_empty() {
        return if newest { Ok(None) } else { Err(LogError::Corrupt(name, "holds no entry".into())) };
    }
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(io(&name))?;
    if (pos as u64) < bytes.len() as u64 {
        file.set_len(pos as u64).map_err(io(&name))?;
        file.sync_data().map_err(io(&name))?;
    }
    Ok(Some(Segment { first, path: path.to_path_buf(), file: Arc::new(file), offsets, end: pos as u64 }))
}

fn read_meta(path: &Path, bytes: &[u8]) -> Result<LogMeta, LogError> {
    let name = path.display().to_string();
    if bytes.len() < 8 || &bytes[..8] != META_MAGIC {
        return Err(LogError::Corrupt(name, "not a Switchboard log meta file (magic SBLOGM01 expected)".into()));
    }
    bincode::serde::decode_from_slice(&bytes[8..], bincode::config::standard())
        .map(|(meta, _)| meta)
        .map_err(|e| LogError::Corrupt(name, e.to_string()))
}

/// Empties the log in `dir` (not open) but for its vote: every segment goes, and the
/// meta keeps the vote with nothing purged. What a node that forgets its copy of a group
/// uses (`store::forget_group`): a vote it gave stays given, so it cannot vote twice in
/// one term. The new folder is written beside the old one (`<dir>.forgetting`), made
/// durable, and moved in its place. Run again after a crash or an error at any point, it
/// ends the same, and the vote is on disk throughout: while the old folder's meta is
/// whole the new folder is made again from it; once it is not, the new folder, whole
/// before the old one was touched, is the one that holds the vote and is moved in as it
/// is.
pub fn forget_keeping_vote(dir: &Path) -> Result<(), LogError> {
    let fresh = dir.with_extension("forgetting");
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let sync_parent = || File::open(&parent).and_then(|d| d.sync_all()).map_err(io(parent.display()));
    let remove = |folder: &Path| match std::fs::remove_dir_all(folder) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::Io(folder.display().to_string(), e)),
    };
    let meta_in = |folder: &Path| -> Result<Option<LogMeta>, LogError> {
        let meta_path = folder.join("meta");
        match std::fs::read(&meta_path) {
            Ok(bytes) => Ok(Some(read_meta(&meta_path, &bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LogError::Io(meta_path.display().to_string(), e)),
        }
    };
    let fresh_holds_vote = match meta_in(dir)? {
        Some(old) => {
            remove(&fresh)?;
            std::fs::create_dir_all(&fresh).map_err(io(fresh.display()))?;
            write_meta(&fresh, &LogMeta { vote: old.vote, purged: None })?;
            sync_parent()?;
            true
        }
        None => meta_in(&fresh)?.is_some(),
    };
    if !fresh_holds_vote {
        // Neither holds a meta: a log never opened, so no vote to keep.
        remove(&fresh)?;
        std::fs::create_dir_all(&fresh).map_err(io(fresh.display()))?;
        write_meta(&fresh, &LogMeta { vote: None, purged: None })?;
        sync_parent()?;
    }
    remove(dir)?;
    std::fs::rename(&fresh, dir).map_err(io(dir.display()))?;
    sync_parent()
}

fn write_meta(dir: &Path, meta: &LogMeta) -> Result<(), LogError> {
    let path = dir.join("meta");
    let mut bytes = META_MAGIC.to_vec();
    bytes.extend(encode(meta).map_err(io(path.display()))?);
    crate::files::write_private(&path, &bytes).map_err(io(path.display()))
}

/// Syncs the files appends wrote to and reports those appends durable, many at once.
fn flush_loop(rx: mpsc::Receiver<Flush>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut files: Vec<Arc<File>> = Vec::new();
        for Flush::Sync(file, _) in &batch {
            if !files.iter().any(|f| Arc::ptr_eq(f, file)) {
                files.push(file.clone());
            }
        }
        let mut failed: Option<String> = None;
        for file in &files {
            if let Err(e) = file.sync_data() {
                failed = Some(e.to_string());
                break;
            }
        }
        for Flush::Sync(_, callback) in batch {
            let result = match &failed {
                None => Ok(()),
                Some(e) => Err(std::io::Error::other(format!("log sync: {e}"))),
            };
            callback.log_io_completed(result);
        }
    }
}

#[cfg(test)]
mod folders {
    #[test]
    fn missing_folders_are_made_each_one_in_its_parent_and_an_existing_one_is_left() {
        let dir = tempfile::tempdir().expect("dir");
        let deep = dir.path().join("data").join("log").join("g3");
        super::create_dir_durably(&deep).expect("made");
        assert!(deep.is_dir());
        std::fs::write(deep.join("meta"), b"kept").expect("write");
        super::create_dir_durably(&deep).expect("again");
        assert_eq!(std::fs::read(deep.join("meta")).expect("read"), b"kept");
    }
}
