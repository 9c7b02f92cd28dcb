//! The segment-file Raft log (ADR 0005): what survives a crash, what a purge gives
//! back, what a damaged file gets, and how a folder kept in sled moves.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use switchboard_raft::log::{LogMeta, SegmentLog};
use switchboard_raft::{Request, TypeConfig};

fn entry(index: u64, term: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Request(format!("command {index} {}", "x".repeat(200)).into_bytes())),
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry<TypeConfig>> {
    range.map(|i| entry(i, term)).collect()
}

fn open(dir: &Path) -> SegmentLog {
    // Segments of 4 KiB: about 16 entries each, so the tests cross many boundaries.
    SegmentLog::open_sized(dir, 4096, || Ok(LogMeta::default())).expect("open the log")
}

fn indexes(log: &SegmentLog, start: u64, end: u64) -> Vec<u64> {
    log.read(start, end).expect("read").iter().map(|e| e.log_id.index).collect()
}

#[test]
fn entries_read_back_in_order_across_segments_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    assert!(log.segment_files().len() > 4, "100 entries fill several 4 KiB segments");
    assert_eq!(indexes(&log, 0, u64::MAX), (1..=100).collect::<Vec<_>>());
    assert_eq!(indexes(&log, 40, 45), vec![40, 41, 42, 43, 44]);
    drop(log);

    let log = open(dir.path());
    let (purged, last) = log.state();
    assert_eq!(purged, None);
    assert_eq!(last.map(|l| l.index), Some(100));
    let read = log.read(1, 101).expect("read");
    assert_eq!(read, entries(1..=100, 1), "every entry as written");
}

#[test]
fn a_write_cut_short_by_a_crash_is_dropped_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=10, 1)).expect("append");
    let newest = log.segment_files().pop().expect("a segment");
    drop(log);
    // The crash came in the middle of the next record: a header and half its payload.
    let mut file = std::fs::OpenOptions::new().append(true).open(&newest).expect("open segment");
    file.write_all(&[200, 0, 0, 0, 1, 2, 3, 4]).expect("write");
    file.write_all(&[7u8; 100]).expect("write");
    drop(file);

    let log = open(dir.path());
    assert_eq!(log.state().1.map(|l| l.index), Some(10), "the torn record is not an entry");
    log.append_synced(entries(11..=12, 2)).expect("append after the cut");
    drop(log);
    let log = open(dir.path());
    assert_eq!(indexes(&log, 0, u64::MAX), (1..=12).collect::<Vec<_>>());
}

/// A power loss can keep a file's new length and not its bytes: zeros pass an empty
/// record's checksum, and are cut off as the torn tail they are.
#[test]
fn zeros_past_what_reached_the_disk_are_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=10, 1)).expect("append");
    let newest = log.segment_files().pop().expect("a segment");
    drop(log);
    let mut file = std::fs::OpenOptions::new().append(true).open(&newest).expect("open segment");
    file.write_all(&[0u8; 64]).expect("write");
    drop(file);
    let log = open(dir.path());
    assert_eq!(log.state().1.map(|l| l.index), Some(10), "the zeros are no entries");
    log.append_synced(entries(11..=12, 2)).expect("append after the cut");
    drop(log);
    let log = open(dir.path());
    assert_eq!(indexes(&log, 0, u64::MAX), (1..=12).collect::<Vec<_>>());
}

#[test]
fn a_damaged_older_segment_stops_the_open_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    let oldest = log.segment_files().remove(0);
    drop(log);
    let mut file = std::fs::OpenOptions::new().write(true).open(&oldest).expect("open segment");
    file.seek(SeekFrom::Start(40)).expect("seek");
    file.write_all(b"bit rot").expect("write");
    drop(file);

    let error = SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).err().expect("the open fails").to_string();
    assert!(error.contains("checksum"), "{error}");
    assert!(error.contains(&oldest.display().to_string()), "names the file: {error}");
    assert!(error.contains("restore this node's data folder"), "says what to do: {error}");
}

/// Damage inside the newest segment, with whole records after it, is not a write a
/// crash cut short (that leaves zeros or the file's end): cutting it off would drop
/// entries this node acknowledged, so the open refuses and says what to do. A record
/// of the newest write with a sector never written (zeros) is still a torn tail.
#[test]
fn damage_inside_the_newest_segment_stops_the_open_and_a_sector_of_zeros_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    let newest = log.segment_files().pop().expect("a segment");
    let last = log.state().1.map(|l| l.index).expect("entries");
    drop(log);
    let pristine = std::fs::read(&newest).expect("read");
    let mut file = std::fs::OpenOptions::new().write(true).open(&newest).expect("open segment");
    file.seek(SeekFrom::Start(40)).expect("seek");
    file.write_all(b"bit rot").expect("write");
    drop(file);
    let error = SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).err().expect("the open fails").to_string();
    assert!(error.contains("checksum"), "{error}");
    assert!(error.contains(&newest.display().to_string()), "names the file: {error}");
    assert!(error.contains("restore this node's data folder"), "says what to do: {error}");

    // A length no record has (a crash only ever leaves it smaller): damage too.
    let mut long = pristine.clone();
    long[16 + 3] = 0xFF;
    std::fs::write(&newest, &long).expect("write");
    let error = SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).err().expect("the open fails").to_string();
    assert!(error.contains("past the limit"), "{error}");

    // The same record with its second sector never written: a torn tail, cut off.
    let mut torn = pristine.clone();
    torn[512..1024].fill(0);
    std::fs::write(&newest, &torn).expect("write");
    let log = open(dir.path());
    let kept = log.state().1.map(|l| l.index).expect("entries");
    assert!(kept < last, "the records from the torn one on are cut off ({kept} of {last})");
    assert_eq!(indexes(&log, 0, u64::MAX), (1..=kept).collect::<Vec<_>>());
}

/// A crash during a purge can keep some of the segments it deleted and not others: a
/// gap wholly behind the purge point is what the purge asked for, and the start drops
/// those segments; a gap past it is entries lost, and the start refuses.
#[test]
fn a_purge_cut_short_leaves_a_gap_behind_the_purge_point_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    let files = log.segment_files();
    let oldest = std::fs::read(&files[0]).expect("read");
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 40)).expect("purge");
    assert!(!files[0].exists() && !files[1].exists(), "the first two segments are wholly purged");
    drop(log);
    // The oldest segment's unlink did not survive the crash; the next one's did.
    std::fs::write(&files[0], &oldest).expect("write");
    let log = open(dir.path());
    assert_eq!(indexes(&log, 41, 101), (41..=100).collect::<Vec<_>>());
    assert!(!files[0].exists(), "dropped as the purge asked");
    drop(log);
    // Entries past the purge point missing (the segment holding 41 on): refused, even
    // with a purged segment kept before them.
    let holding = open(dir.path()).segment_files().into_iter().next().expect("the segment holding entry 41");
    std::fs::write(&files[0], &oldest).expect("write");
    std::fs::remove_file(&holding).expect("remove");
    assert!(SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).is_err(), "a gap past the purge point is refused");
}

/// A quiet group's entries are small: 8 MiB would hold weeks of them, and a purge frees
/// whole segments only. So a segment also closes at `SEGMENT_ENTRIES` entries, and a
/// purge gives back the entries behind it (customers' messages among them) within that
/// many, whatever their size.
#[test]
fn a_segment_closes_at_its_entry_count_so_a_purge_frees_small_entries_too() {
    use switchboard_raft::log::{SEGMENT_BYTES, SEGMENT_ENTRIES};
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open_sized(dir.path(), SEGMENT_BYTES, || Ok(LogMeta::default())).expect("open the log");
    let total = 3 * SEGMENT_ENTRIES as u64 + 10;
    for start in (1..=total).step_by(100) {
        log.append_synced(entries(start..=(start + 99).min(total), 1)).expect("append");
    }
    assert!(log.bytes() < SEGMENT_BYTES, "all of them fit in one segment by size");
    assert_eq!(log.segment_files().len(), 4, "a segment per {SEGMENT_ENTRIES} entries: {:?}", log.segment_files());
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 2 * SEGMENT_ENTRIES as u64 + 5)).expect("purge");
    assert_eq!(log.segment_files().len(), 2, "the two segments wholly behind the purge are gone");
    assert_eq!(indexes(&log, 0, u64::MAX).first().copied(), Some(2 * SEGMENT_ENTRIES as u64 + 6));
}

#[test]
fn a_purge_deletes_whole_segments_and_purged_entries_stay_gone_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    let before = log.segment_files().len();
    let bytes_before = log.bytes();
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 60)).expect("purge");
    let after = log.segment_files();
    assert!(after.len() < before, "segments all of whose entries are purged are deleted");
    assert!(log.bytes() < bytes_before / 2, "their space is given back");
    let on_disk = std::fs::read_dir(dir.path()).expect("list").filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))).count();
    assert_eq!(on_disk, after.len(), "no file left behind");
    assert_eq!(indexes(&log, 0, u64::MAX), (61..=100).collect::<Vec<_>>());
    drop(log);

    let log = open(dir.path());
    let (purged, last) = log.state();
    assert_eq!(purged.map(|p| p.index), Some(60));
    assert_eq!(last.map(|l| l.index), Some(100));
    assert_eq!(indexes(&log, 0, u64::MAX), (61..=100).collect::<Vec<_>>());

    // A snapshot covering everything, then new entries after it.
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 150)).expect("purge past the end");
    assert!(log.segment_files().is_empty());
    assert_eq!(log.state().1.map(|l| l.index), Some(150), "the last id is the purged one");
    log.append_synced(entries(151..=153, 2)).expect("append after it");
    drop(log);
    let log = open(dir.path());
    assert_eq!(indexes(&log, 0, u64::MAX), vec![151, 152, 153]);
}

#[test]
fn a_truncation_removes_the_conflicting_suffix_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    log.truncate(37).expect("truncate");
    assert_eq!(log.state().1.map(|l| l.index), Some(36));
    // A new leader's entries replace the removed ones.
    log.append_synced(entries(37..=40, 3)).expect("append");
    drop(log);
    let log = open(dir.path());
    let read = log.read(30, 41).expect("read");
    let terms: Vec<(u64, u64)> = read.iter().map(|e| (e.log_id.index, e.log_id.leader_id.term)).collect();
    assert_eq!(terms, vec![(30, 1), (31, 1), (32, 1), (33, 1), (34, 1), (35, 1), (36, 1), (37, 3), (38, 3), (39, 3), (40, 3)]);
    assert_eq!(log.state().1.map(|l| l.index), Some(40));
}

#[test]
fn the_vote_survives_a_restart_and_a_foreign_meta_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    let vote = openraft::Vote::new_committed(4, 2);
    log.save_vote(&vote).expect("save vote");
    drop(log);
    // A replacement of `meta` cut short by a crash leaves its temporary file behind.
    let leftover = dir.path().join(".meta.4242.0.tmp");
    std::fs::write(&leftover, b"half a vote").expect("write");
    assert_eq!(open(dir.path()).meta().vote, Some(vote));
    assert!(!leftover.exists(), "the interrupted replacement is swept at open");

    std::fs::write(dir.path().join("meta"), b"{\"vote\": 1}").expect("write");
    let error = SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).err().expect("refused").to_string();
    assert!(error.contains("SBLOGM01"), "{error}");
}

/// How builds before ADR 0005 kept the applied state in the sled state tree.
#[derive(serde::Serialize)]
struct AppliedState {
    last_applied: Option<LogId<u64>>,
    membership: openraft::StoredMembership<u64, switchboard_raft::Node>,
}

/// A data folder written in sled (the log, the vote and the records of main before ADR
/// 0005) is moved whole: the records load, the log holds the entries after the applied
/// one, the vote is kept, and the sled folder is gone.
#[tokio::test]
async fn a_data_folder_kept_in_sled_moves_with_its_log_records_and_vote() -> anyhow::Result<()> {
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;
    let dir = tempfile::tempdir()?;
    let sled_dir = dir.path().join("sled");
    let vote = openraft::Vote::new_committed(2, 1);
    {
        let old = sled::open(&sled_dir)?;
        let log = old.open_tree("g3/log")?;
        for i in 4..=6u64 {
            log.insert(i.to_be_bytes(), bincode::serde::encode_to_vec(entry(i, 2), bincode::config::standard())?)?;
        }
        let meta = old.open_tree("g3/meta")?;
        meta.insert("vote", bincode::serde::encode_to_vec(vote, bincode::config::standard())?)?;
        meta.insert("last_purged", bincode::serde::encode_to_vec(LogId::new(CommittedLeaderId::new(1, 1), 3), bincode::config::standard())?)?;
        let state = old.open_tree("g3/state")?;
        for i in 1..=3u64 {
            let mut key = b"re".to_vec();
            key.extend_from_slice(&i.to_be_bytes());
            state.insert(key, format!("entry {i}").into_bytes())?;
        }
        let applied = AppliedState { last_applied: Some(LogId::new(CommittedLeaderId::new(1, 1), 3)), membership: Default::default() };
        state.insert("s/applied", bincode::serde::encode_to_vec(&applied, bincode::config::standard())?)?;
        old.flush()?;
    }

    let keyspace = switchboard_raft::store::open_keyspace(&dir.path().join("records"), &[])?;
    assert!(switchboard_raft::store::migrate_sled(&sled_dir, &keyspace, 3, &dir.path().join("log"))?);
    assert!(!sled_dir.exists(), "the sled folder is removed once moved");
    let journal = std::sync::Arc::new(common::Journal::default());
    let (mut log, _sm) = switchboard_raft::store::open_group(&keyspace, 3, journal.clone(), &dir.path().join("snapshots"), &dir.path().join("log"))?;
    let loaded: Vec<String> = journal.entries.lock().unwrap().iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect();
    assert_eq!(loaded, ["entry 1", "entry 2", "entry 3"]);
    let state = log.get_log_state().await?;
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(3));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(6));
    assert_eq!(log.read_vote().await?, Some(vote));
    assert_eq!(log.try_get_log_entries(4..7).await?, entries(4..=6, 2));
    // A second start finds nothing left to move.
    assert!(!switchboard_raft::store::migrate_sled(&sled_dir, &keyspace, 3, &dir.path().join("log"))?);
    Ok(())
}

/// openraft lets a follower commit entries its log took but has not synced, and the
/// committed pointer reaches the record store on its own schedule: after a power loss it
/// may point past the log's end. It is read no further than the log holds, so the group
/// starts and re-applies only entries it has.
#[tokio::test]
async fn a_committed_pointer_past_the_log_s_end_is_read_as_the_log_s_end() -> anyhow::Result<()> {
    use openraft::storage::RaftLogStorage;
    let dir = tempfile::tempdir()?;
    let log_dir = dir.path().join("log");
    let log = open(&log_dir);
    log.append_synced(entries(1..=7, 1))?;
    drop(log);
    let keyspace = switchboard_raft::store::open_keyspace(&dir.path().join("records"), &[3])?;
    let journal = std::sync::Arc::new(common::Journal::default());
    let (mut store, _sm) = switchboard_raft::store::open_group(&keyspace, 3, journal.clone(), &dir.path().join("snapshots"), &log_dir)?;
    let at = |index: u64| LogId::new(CommittedLeaderId::new(1, 1), index);
    store.save_committed(Some(at(5))).await?;
    assert_eq!(store.read_committed().await?, Some(at(5)), "within the log: as saved");
    // Entries 8 to 10 were taken, committed and never synced.
    store.save_committed(Some(at(10))).await?;
    assert_eq!(store.read_committed().await?, Some(at(7)), "past it: the log's end");
    Ok(())
}

/// A node forgets its copy of a group it left (`store::forget_group`) in steps no one
/// write covers: the log (keeping the vote), the records, the snapshot files. Killed
/// after the new log folder was written and the old one removed, but before it was
/// moved in, and with only part of the records removed, the next open finishes the
/// forgetting: no record is left under an applied point that named them all, and the
/// vote stays given.
#[tokio::test]
async fn a_forgetting_cut_short_is_finished_at_the_next_open() -> anyhow::Result<()> {
    use openraft::storage::{RaftLogStorage, RaftStateMachine};
    use openraft::{RaftSnapshotBuilder, Vote};
    let dir = tempfile::tempdir()?;
    let (log_dir, snapshots) = (dir.path().join("log"), dir.path().join("snapshots"));
    let log = open(&log_dir);
    log.append_synced(entries(1..=6, 1))?;
    drop(log);
    let keyspace = switchboard_raft::store::open_keyspace(&dir.path().join("records"), &[3])?;
    let vote = Vote::new_committed(1, 1);
    {
        let journal = std::sync::Arc::new(common::Journal::default());
        let (mut store, mut sm) = switchboard_raft::store::open_group(&keyspace, 3, journal, &snapshots, &log_dir)?;
        store.save_vote(&vote).await?;
        sm.apply(entries(1..=6, 1)).await?;
        sm.get_snapshot_builder().await.build_snapshot().await?;
        let _at_start = sm.get_current_snapshot().await?;
        assert!(sm.get_current_snapshot().await?.is_some(), "a snapshot file written");
        assert!(std::fs::read_dir(&snapshots)?.count() > 0);
    }

    // The crash: the mark made, the new log folder written and the old one removed but
    // not yet moved in, two records removed of the six.
    std::fs::write(switchboard_raft::store::forgetting_mark(&log_dir), b"forgetting")?;
    switchboard_raft::log::forget_keeping_vote(&log_dir)?;
    std::fs::rename(&log_dir, log_dir.with_extension("forgetting"))?;
    let partition = keyspace.open_partition("g3-state", Default::default())?;
    let records: Vec<_> = partition.keys().filter_map(|k| k.ok()).filter(|k| k.starts_with(b"r")).take(2).collect();
    assert_eq!(records.len(), 2, "records to remove");
    for key in records {
        partition.remove(key)?;
    }
    keyspace.persist(fjall::PersistMode::SyncAll)?;

    let journal = std::sync::Arc::new(common::Journal::default());
    let (mut store, mut sm) = switchboard_raft::store::open_group(&keyspace, 3, journal.clone(), &snapshots, &log_dir)?;
    assert!(journal.entries.lock().unwrap().is_empty(), "no record of the forgotten copy is loaded");
    assert_eq!(sm.applied_state().await?.0, None, "nothing applied");
    let state = store.get_log_state().await?;
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None), "an empty log");
    assert_eq!(store.read_vote().await?, Some(vote), "the vote stays given");
    assert_eq!(std::fs::read_dir(&snapshots)?.count(), 0, "the snapshot files are gone");
    assert!(!switchboard_raft::store::forgetting_mark(&log_dir).exists(), "the mark goes last");
    assert!(!log_dir.with_extension("forgetting").exists());
    Ok(())
}

/// A first start killed while fjall created the record store leaves a folder fjall
/// cannot open (a partition half made): with the `.creating` mark and without `.ready`
/// it holds nothing yet and is made anew; with `.ready`, it is opened as it is, and so
/// is one with neither mark (restored from a backup without it), never deleted.
#[test]
fn a_record_store_whose_creation_was_cut_short_is_made_anew() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let records = dir.path().join("records");
    std::fs::write(dir.path().join("records.creating"), b"creating\n")?;
    std::fs::create_dir_all(records.join("partitions/g1-state"))?;
    std::fs::write(records.join("version"), b"\x46\x4a\x4c\x02")?;
    std::fs::write(records.join("partitions/g1-state/.tmpUka0Rz"), b"half")?;
    let keyspace = switchboard_raft::store::open_keyspace(&records, &[1])?;
    assert!(dir.path().join("records.ready").exists(), "marked once made");
    keyspace.open_partition("g1-state", Default::default())?.insert("r-kept", "yes")?;
    keyspace.persist(fjall::PersistMode::SyncAll)?;
    drop(keyspace);
    let keyspace = switchboard_raft::store::open_keyspace(&records, &[1])?;
    assert_eq!(keyspace.open_partition("g1-state", Default::default())?.get("r-kept")?.as_deref(), Some(&b"yes"[..]), "a made store is kept");
    assert!(!dir.path().join("records.creating").exists(), "the creation's mark is gone");
    drop(keyspace);
    // Restored from a backup without its mark: opened, not made anew.
    std::fs::remove_file(dir.path().join("records.ready"))?;
    let keyspace = switchboard_raft::store::open_keyspace(&records, &[1])?;
    assert_eq!(keyspace.open_partition("g1-state", Default::default())?.get("r-kept")?.as_deref(), Some(&b"yes"[..]), "a store without its mark is kept");
    assert!(dir.path().join("records.ready").exists(), "and marked");
    Ok(())
}

/// A replication task openraft detached (its leader stepped down) may still read while
/// the new leader's entries truncate the log and are written over the cut: the read
/// gets the entries as they were when it found them, never a damaged record (which
/// would stop the group). The truncation here is asked for right between the read
/// finding its records and reading them, and waits for the read.
#[test]
fn a_read_beside_a_truncation_sees_whole_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    let (asked, cut) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel::<()>());
    let cutter = {
        let log = log.clone();
        let (asked, cut) = (asked.1, cut.0);
        std::thread::spawn(move || {
            asked.recv().expect("asked to cut");
            log.truncate(50).expect("truncate");
            let over: Vec<_> = (50..=100).map(|i| Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 1), i),
                payload: EntryPayload::Normal(Request(format!("the new leader's {i}").into_bytes())),
            }).collect();
            log.append_synced(over).expect("append over the cut");
            let _ = cut.send(());
        })
    };
    let read = log.read_pausing(40, 101, || {
        asked.0.send(()).expect("ask for the cut");
        // The cut waits for this read; without that it would be done well within this.
        let _ = cut.1.recv_timeout(std::time::Duration::from_millis(500));
    });
    let read = read.expect("a read beside a truncation failed");
    assert_eq!(read.iter().map(|e| (e.log_id.index, e.log_id.leader_id.term)).collect::<Vec<_>>(), (40..=100).map(|i| (i, 1)).collect::<Vec<_>>());
    cutter.join().expect("the cutter panicked");
    assert_eq!(log.read(50, 51).expect("read")[0].log_id.leader_id.term, 2, "the cut and the new entries went ahead after the read");
}

/// The newest segment's first sector never reached the disk (a power loss after its
/// header and first entries were written together, before any sync covered them): it
/// held no acknowledged entry, so it is dropped and the log ends with the segment
/// before it. A zeroed header before a whole first record is damage, and so is a
/// zeroed header on an older segment.
#[test]
fn a_newest_segment_whose_header_never_reached_the_disk_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append_synced(entries(1..=100, 1)).expect("append");
    let files = log.segment_files();
    assert!(files.len() >= 3, "several segments: {files:?}");
    drop(log);
    let zero = |path: &std::path::Path, bytes: usize| {
        let mut file = std::fs::OpenOptions::new().write(true).open(path).expect("open segment");
        file.write_all(&vec![0u8; bytes]).expect("write");
    };
    let zero_header = |path: &std::path::Path| zero(path, 16);
    let older = &files[files.len() - 2];
    let pristine = std::fs::read(older).expect("read");
    zero_header(older);
    assert!(SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).is_err(), "an older segment's header is damage");
    std::fs::write(older, &pristine).expect("restore");

    let newest = files.last().expect("a segment");
    let first_of_newest: u64 = newest.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).expect("named by its first index");
    let pristine = std::fs::read(newest).expect("read");
    zero_header(newest);
    assert!(SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).is_err(), "a zeroed header before a whole first record is damage");
    std::fs::write(newest, &pristine).expect("restore");
    zero(newest, 512);
    let log = SegmentLog::open_sized(dir.path(), 4096, || Ok(LogMeta::default())).expect("the open goes on");
    assert_eq!(log.state().1.map(|l| l.index), Some(first_of_newest - 1), "the log ends where the segment before it ends");
    assert!(!newest.exists(), "the headerless segment is gone");
}
