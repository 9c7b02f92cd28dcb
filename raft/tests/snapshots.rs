//! Snapshots: a snapshot point costs no copy (the records are the state), a file is
//! dumped when a replica asks, a newer point removes the older file (disk space comes
//! back), a restart loads the records, a received snapshot replaces the records (also
//! after a crash mid-install), and a snapshot an older build kept inside sled (the
//! legacy format, the whole state as one value) is still read.

mod common;

use std::path::Path;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use switchboard_raft::store::{migrate_sled, open_group, open_keyspace, StateMachineStore};
use switchboard_raft::{Node, NodeId, Request, TypeConfig};

fn entry(index: u64) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Request(index.to_be_bytes().to_vec())) }
}

async fn apply(sm: &mut StateMachineStore, indexes: std::ops::RangeInclusive<u64>) -> anyhow::Result<()> {
    sm.apply(indexes.map(entry).collect::<Vec<_>>()).await?;
    Ok(())
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    names.sort();
    names
}

/// The current snapshot as a replica gets it: openraft's first question after opening
/// (at start) reads only the metadata, so it is asked first.
async fn as_a_replica_gets_it(sm: &mut StateMachineStore) -> anyhow::Result<openraft::storage::Snapshot<switchboard_raft::TypeConfig>> {
    let _start = sm.get_current_snapshot().await?;
    sm.get_current_snapshot().await?.ok_or_else(|| anyhow::anyhow!("no current snapshot"))
}

/// Asks as a replica does until the answer covers `index` (a newer file is written in
/// the background), at most for a few seconds.
async fn current_at(sm: &mut StateMachineStore, index: u64) -> anyhow::Result<openraft::storage::Snapshot<switchboard_raft::TypeConfig>> {
    for _ in 0..200 {
        let current = sm.get_current_snapshot().await?.ok_or_else(|| anyhow::anyhow!("no current snapshot"))?;
        if current.meta.last_log_id.map(|l| l.index) == Some(index) {
            return Ok(current);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    anyhow::bail!("no snapshot file at {index} within 4 s")
}

/// A snapshot point costs no copy of the records: the first file is made when a replica
/// asks for it; after a newer point the older file answers at once while a newer one is
/// written in the background, which then replaces it; a restart loads every applied
/// entry from the records.
#[tokio::test]
async fn a_snapshot_file_is_made_when_asked_and_a_newer_one_replaces_it_in_the_background() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let snapshots = dir.path().join("snapshots");
    let db = open_keyspace(&dir.path().join("db"), &[])?;
    let journal = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, journal.clone(), &snapshots, &dir.path().join("log"))?;

    apply(&mut sm, 1..=10).await?;
    let built = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(10));
    assert!(files(&snapshots).is_empty(), "a snapshot point writes no file");
    let asked = as_a_replica_gets_it(&mut sm).await?;
    assert_eq!(asked.meta, built.meta, "nothing applied since: the file is exactly the point built");
    let first = files(&snapshots);
    assert_eq!(first.len(), 1, "one snapshot file: {first:?}");
    apply(&mut sm, 11..=20).await?;
    let built = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(20));
    assert_eq!(files(&snapshots), first, "a newer point writes no file and keeps the older one");
    let asked = sm.get_current_snapshot().await?.expect("current");
    assert_eq!(asked.meta.last_log_id.map(|l| l.index), Some(10), "the older file answers at once");
    current_at(&mut sm, 20).await?;
    let second = files(&snapshots);
    assert_eq!(second.len(), 1, "the newer file replaced the older one, nothing partial is left: {second:?}");
    assert_ne!(first, second);

    // The records are the state: a restart loads every applied entry, not only those
    // the snapshot point covers. Asked again, a file covers all of them.
    apply(&mut sm, 21..=22).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    apply(&mut sm, 23..=24).await?;
    drop(sm);
    let restored = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, restored.clone(), &snapshots, &dir.path().join("log"))?;
    assert_eq!(restored.entries.lock().unwrap().len(), 24);
    let (applied, _) = sm.applied_state().await?;
    assert_eq!(applied.map(|l| l.index), Some(24));
    let at_start = sm.get_current_snapshot().await?.expect("a snapshot point");
    assert_eq!(at_start.meta.last_log_id.map(|l| l.index), Some(22), "at start, where the snapshot is");
    let current = current_at(&mut sm, 24).await?;
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(24), "a replica gets the records as of now");
    Ok(())
}

/// A group with ten entries applied and one snapshot file, made as a replica asks for
/// it; the file's name.
async fn a_group_with_one_snapshot_file(dir: &Path) -> anyhow::Result<(switchboard_raft::store::LogStore, StateMachineStore, std::path::PathBuf, Vec<String>)> {
    let snapshots = dir.join("snapshots");
    let db = open_keyspace(&dir.join("db"), &[])?;
    let (log, mut sm) = open_group(&db, 3, Arc::new(common::Journal::default()), &snapshots, &dir.join("log"))?;
    apply(&mut sm, 1..=10).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    as_a_replica_gets_it(&mut sm).await?;
    let first = files(&snapshots);
    assert_eq!(first.len(), 1, "{first:?}");
    Ok((log, sm, snapshots, first))
}

fn modified_at(path: &Path, at: std::time::SystemTime) -> std::io::Result<()> {
    std::fs::File::options().write(true).open(path)?.set_modified(at)
}

/// The folder's files once `name` has left it (a background rewrite replaced it), or
/// after 4 s.
async fn files_once_gone(dir: &Path, name: &str) -> Vec<String> {
    let mut now = files(dir);
    for _ in 0..200 {
        if !now.iter().any(|n| n == name) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        now = files(dir);
    }
    now
}

/// A snapshot file is a copy of every record as of its point: one older than a day is
/// written again at the next snapshot point (in the background), so what a deletion
/// took from the records since (a channel's retention) leaves the disk too, even when
/// no replica asks for a snapshot. A younger one stays, as before.
#[tokio::test]
async fn a_snapshot_file_older_than_a_day_is_written_again_at_the_next_point() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_log, mut sm, snapshots, first) = a_group_with_one_snapshot_file(dir.path()).await?;

    apply(&mut sm, 11..=12).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(files(&snapshots), first, "a file younger than a day stays until a replica needs a newer one");

    modified_at(&snapshots.join(&first[0]), std::time::SystemTime::now() - 2 * switchboard_raft::store::SNAPSHOT_FILE_MAX_AGE)?;
    apply(&mut sm, 13..=14).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    let now = files_once_gone(&snapshots, &first[0]).await;
    assert!(now.len() == 1 && now != first, "the old file was replaced: {first:?} -> {now:?}");
    let current = sm.get_current_snapshot().await?.expect("current");
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(14), "the new file holds the records as of the point");
    Ok(())
}

/// The daily rewrite of an old file does not run under a snapshot being received (its
/// install would wait for the dump), but a transfer abandoned a while ago does not stop it.
#[tokio::test]
async fn an_old_snapshot_file_waits_while_a_snapshot_arrives_and_not_for_an_abandoned_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_log, mut sm, snapshots, first) = a_group_with_one_snapshot_file(dir.path()).await?;
    modified_at(&snapshots.join(&first[0]), std::time::SystemTime::now() - 2 * switchboard_raft::store::SNAPSHOT_FILE_MAX_AGE)?;

    // A transfer from the leader is under way: its file was just written to.
    let _arriving = sm.begin_receiving_snapshot().await?;
    let with_partial = files(&snapshots);
    assert_eq!(with_partial.len(), 2, "the transfer's file beside the old one: {with_partial:?}");
    apply(&mut sm, 11..=12).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(files(&snapshots), with_partial, "no rewrite while a snapshot arrives: its install replaces the file");

    // The transfer went quiet two minutes ago: it was given up, and holds nothing off.
    let partial = with_partial.iter().find(|name| !first.contains(name)).expect("the transfer's file");
    modified_at(&snapshots.join(partial), std::time::SystemTime::now() - std::time::Duration::from_secs(120))?;
    apply(&mut sm, 13..=14).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    let now = files_once_gone(&snapshots, &first[0]).await;
    assert!(!now.contains(&first[0]) && now.len() == 2, "the old file was replaced, the abandoned transfer's left to the next: {first:?} -> {now:?}");
    let current = sm.get_current_snapshot().await?.expect("current");
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(14), "the new file holds the records as of the point");
    Ok(())
}

/// How builds before snapshot files kept the snapshot: in the group's meta tree.
#[derive(serde::Serialize)]
struct LegacySnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

#[tokio::test]
async fn a_snapshot_kept_in_sled_by_an_older_build_is_restored_then_moved_to_a_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let snapshots = dir.path().join("snapshots");
    let entries: Vec<Vec<u8>> = (1..=5u64).map(|i| i.to_be_bytes().to_vec()).collect();
    let legacy = LegacySnapshot {
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
            last_membership: StoredMembership::default(),
            snapshot_id: "1-5-1".into(),
        },
        data: serde_json::to_vec(&entries)?,
    };
    {
        let old = sled::open(dir.path().join("sled"))?;
        old.open_tree("g3/meta")?.insert("snapshot", bincode::serde::encode_to_vec(&legacy, bincode::config::standard())?)?;
        old.flush()?;
    }

    let db = open_keyspace(&dir.path().join("records"), &[])?;
    assert!(migrate_sled(&dir.path().join("sled"), &db, 3, &dir.path().join("log"))?, "the sled folder is moved");
    assert!(!dir.path().join("sled").exists(), "and removed once moved");
    let journal = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, journal.clone(), &snapshots, &dir.path().join("log"))?;
    assert_eq!(*journal.entries.lock().unwrap(), entries, "the old snapshot was restored");
    let current = sm.get_current_snapshot().await?.expect("the old snapshot is current");
    assert_eq!(current.meta.snapshot_id, "1-5-1");

    let legacy_file = files(&snapshots);
    assert_eq!(legacy_file.len(), 1, "the old snapshot moved to a file");
    let meta = db.open_partition("g3-state", Default::default())?;
    assert!(meta.get("s/m/snapshot")?.is_none(), "the copy among the meta keys is dropped");

    apply(&mut sm, 6..=7).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    current_at(&mut sm, 7).await?;
    let now = files(&snapshots);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, legacy_file, "a file of the records replaced the old snapshot's");
    Ok(())
}

/// What a crash can leave in the snapshot folder: a file written but not yet pointed at
/// (a crash before the pointer moved), one replaced but not yet deleted, and a partial
/// one. The next start keeps the snapshot the pointer names and removes the rest.
#[tokio::test]
async fn a_restart_after_a_crash_mid_snapshot_keeps_the_named_one_and_sweeps_the_rest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let snapshots = dir.path().join("snapshots");
    let db = open_keyspace(&dir.path().join("db"), &[])?;
    let journal = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, journal, &snapshots, &dir.path().join("log"))?;
    apply(&mut sm, 1..=4).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    as_a_replica_gets_it(&mut sm).await?;
    let named = files(&snapshots);
    assert_eq!(named.len(), 1);
    drop(sm);

    let leftovers = ["g3-00000000000000000009-1.snapshot", "g3-00000000000000000002-1.snapshot", "g3-00000000000000000011-2.snapshot.partial"];
    for name in leftovers {
        std::fs::write(snapshots.join(name), b"left by a crash")?;
    }
    // Another group's files in the same folder are not ours to remove.
    std::fs::write(snapshots.join("g4-00000000000000000001-1.snapshot"), b"group 4")?;

    let restored = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, restored.clone(), &snapshots, &dir.path().join("log"))?;
    assert_eq!(restored.entries.lock().unwrap().len(), 4, "restored from the snapshot the pointer names");
    let mut expected = named.clone();
    expected.push("g4-00000000000000000001-1.snapshot".into());
    expected.sort();
    assert_eq!(files(&snapshots), expected);
    assert_eq!(sm.get_current_snapshot().await?.expect("current").meta.last_log_id.map(|l| l.index), Some(4));
    Ok(())
}

fn snapshot_files(dir: &Path) -> Vec<String> {
    files(dir).into_iter().filter(|n| n.ends_with(".snapshot")).collect()
}

/// A leader's group (in `dir`, group 3) with entries 1 to 30 applied and a snapshot
/// built: its journal, the snapshot's metadata, and its bytes as a replica receives them.
async fn leader_snapshot(dir: &Path) -> anyhow::Result<(Arc<common::Journal>, SnapshotMeta<NodeId, Node>, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let db = open_keyspace(&dir.join("leader"), &[])?;
    let journal = Arc::new(common::Journal::default());
    let (_log, mut leader) = open_group(&db, 3, journal.clone(), &dir.join("leader-snapshots"), &dir.join("leader-log"))?;
    apply(&mut leader, 1..=30).await?;
    leader.get_snapshot_builder().await.build_snapshot().await?;
    let built = as_a_replica_gets_it(&mut leader).await?;
    let mut bytes = Vec::new();
    let mut file = built.snapshot;
    file.read_to_end(&mut bytes).await?;
    Ok((journal, built.meta, bytes))
}

/// A snapshot received from a leader replaces whatever the replica held: its records,
/// its applied index, its current snapshot. The received file is not left behind.
#[tokio::test]
async fn an_installed_snapshot_replaces_the_records_and_becomes_current() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir()?;
    let (leader_journal, meta, bytes) = leader_snapshot(dir.path()).await?;

    let replica_snapshots = dir.path().join("replica-snapshots");
    let replica_db = open_keyspace(&dir.path().join("replica"), &[])?;
    let journal = Arc::new(common::Journal::default());
    let (_log, mut replica) = open_group(&replica_db, 3, journal.clone(), &replica_snapshots, &dir.path().join("replica-log"))?;
    apply(&mut replica, 1..=3).await?;
    let mut receiving = replica.begin_receiving_snapshot().await?;
    // Written in chunks, as openraft does with each chunk of the transfer.
    for chunk in bytes.chunks(7) {
        receiving.write_all(chunk).await?;
    }
    receiving.flush().await?;
    replica.install_snapshot(&meta, receiving).await?;

    assert_eq!(*journal.entries.lock().unwrap(), *leader_journal.entries.lock().unwrap());
    assert_eq!(journal.all_records(), leader_journal.all_records());
    let (applied, _) = replica.applied_state().await?;
    assert_eq!(applied.map(|l| l.index), Some(30));
    assert_eq!(replica.get_current_snapshot().await?.expect("current").meta.snapshot_id, meta.snapshot_id);
    let left = files(&replica_snapshots);
    assert_eq!(left.len(), 1, "only the kept snapshot, nothing received or partial: {left:?}");
    Ok(())
}

/// The meta record that names the current snapshot, as the store writes it.
#[derive(serde::Serialize)]
struct SnapshotPointer {
    meta: SnapshotMeta<NodeId, Node>,
    file: String,
}

/// A crash while a received snapshot is loaded into the state tree leaves the tree
/// half replaced under the installing mark. The next start loads the snapshot again
/// from its file: nothing of the half-loaded or the older state survives.
#[tokio::test]
async fn a_restart_after_a_crash_mid_install_finishes_loading_the_snapshot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let leader_db = open_keyspace(&dir.path().join("leader"), &[])?;
    let leader_snapshots = dir.path().join("leader-snapshots");
    let leader_journal = Arc::new(common::Journal::default());
    let (_log, mut leader) = open_group(&leader_db, 3, leader_journal.clone(), &leader_snapshots, &dir.path().join("leader-log"))?;
    apply(&mut leader, 1..=30).await?;
    leader.get_snapshot_builder().await.build_snapshot().await?;
    let built = as_a_replica_gets_it(&mut leader).await?;
    let name = snapshot_files(&leader_snapshots).pop().expect("a snapshot file");

    let replica_snapshots = dir.path().join("replica-snapshots");
    let replica_path = dir.path().join("replica");
    {
        let db = open_keyspace(&replica_path, &[])?;
        let (_log, mut replica) = open_group(&db, 3, Arc::new(common::Journal::default()), &replica_snapshots, &dir.path().join("replica-log"))?;
        apply(&mut replica, 1..=3).await?;
        drop(replica);
        // What the install had done when the process died: the file kept and named,
        // the mark set, the old records half cleared and some new ones loaded.
        std::fs::copy(leader_snapshots.join(&name), replica_snapshots.join(&name))?;
        let pointer = SnapshotPointer { meta: built.meta.clone(), file: name.clone() };
        db.open_partition("g3-state", Default::default())?.insert("s/m/snapshot_file", bincode::serde::encode_to_vec(&pointer, bincode::config::standard())?)?;
        let state = db.open_partition("g3-state", Default::default())?;
        state.insert("s/installing", name.as_bytes())?;
        state.insert(b"re\0\0\0\0\0\0\0\x02", &b"half"[..])?;
        state.insert(b"rhalf-loaded", &b"junk"[..])?;
        db.persist(fjall::PersistMode::SyncAll)?;
    }
    let db = open_keyspace(&replica_path, &[])?;
    let journal = Arc::new(common::Journal::default());
    let (_log, mut replica) = open_group(&db, 3, journal.clone(), &replica_snapshots, &dir.path().join("replica-log"))?;
    assert_eq!(*journal.entries.lock().unwrap(), *leader_journal.entries.lock().unwrap(), "exactly the snapshot's entries");
    assert_eq!(journal.all_records(), leader_journal.all_records());
    assert!(db.open_partition("g3-state", Default::default())?.get("rhalf-loaded")?.is_none());
    assert!(db.open_partition("g3-state", Default::default())?.get("s/installing")?.is_none(), "the mark is cleared once loaded");
    let (applied, _) = replica.applied_state().await?;
    assert_eq!(applied.map(|l| l.index), Some(30));
    Ok(())
}

/// The records and the log live in two folders: if the records are lost while the log
/// was purged behind them, the state cannot be rebuilt, and the group refuses to open
/// with what to do rather than serve a partial state.
#[tokio::test]
async fn records_lost_behind_a_purged_log_stop_the_open_with_what_to_do() -> anyhow::Result<()> {
    use openraft::storage::RaftLogStorage;
    let dir = tempfile::tempdir()?;
    let snapshots = dir.path().join("snapshots");
    {
        let db = open_keyspace(&dir.path().join("records"), &[3])?;
        let (mut log, mut sm) = open_group(&db, 3, Arc::new(common::Journal::default()), &snapshots, &dir.path().join("log"))?;
        apply(&mut sm, 1..=10).await?;
        sm.get_snapshot_builder().await.build_snapshot().await?;
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 8)).await?;
    }
    // Reopened as it is, everything is there.
    {
        let db = open_keyspace(&dir.path().join("records"), &[3])?;
        let journal = Arc::new(common::Journal::default());
        let _group = open_group(&db, 3, journal.clone(), &snapshots, &dir.path().join("log"))?;
        assert_eq!(journal.entries.lock().unwrap().len(), 10);
    }
    std::fs::remove_dir_all(dir.path().join("records"))?;
    let db = open_keyspace(&dir.path().join("records"), &[3])?;
    let error = match open_group(&db, 3, Arc::new(common::Journal::default()), &snapshots, &dir.path().join("log")) {
        Ok(_) => anyhow::bail!("opened a group whose records are gone"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("purged up to entry 8") && error.contains("Restore the whole data folder"), "{error}");
    Ok(())
}

/// openraft purges a follower's log behind a snapshot it has handed the state machine
/// to install without waiting for the install. A purge that went first, then a crash
/// before the install was kept, would leave records behind a purged log: the group
/// could never open again. The purge waits until the snapshot is kept (its pointer
/// durable); a crash meanwhile reopens as before; an install that fails fails the purge.
#[tokio::test]
async fn a_purge_behind_a_snapshot_being_installed_waits_for_the_install() -> anyhow::Result<()> {
    use openraft::storage::RaftLogStorage;
    let dir = tempfile::tempdir()?;
    let (_, meta, bytes) = leader_snapshot(dir.path()).await?;
    let at = meta.last_log_id.expect("a snapshot point");

    let replica_path = dir.path().join("replica");
    let (replica_snapshots, replica_log) = (dir.path().join("replica-snapshots"), dir.path().join("replica-log"));
    {
        let db = open_keyspace(&replica_path, &[])?;
        let (mut log, mut replica) = open_group(&db, 3, Arc::new(common::Journal::default()), &replica_snapshots, &replica_log)?;
        apply(&mut replica, 1..=3).await?;
        // The purge comes before the install has begun: polled once, it does not go ahead.
        let purge = log.purge(at);
        tokio::pin!(purge);
        let went_ahead = tokio::select! { biased; done = &mut purge => Some(done), _ = std::future::ready(()) => None };
        assert!(went_ahead.is_none(), "the log was purged behind a snapshot not installed yet: {went_ahead:?}");
        db.persist(fjall::PersistMode::SyncAll)?;
        // The process dies here.
    }
    let db = open_keyspace(&replica_path, &[])?;
    let journal = Arc::new(common::Journal::default());
    let (mut log, mut replica) = open_group(&db, 3, journal.clone(), &replica_snapshots, &replica_log)?;
    assert_eq!(journal.entries.lock().unwrap().len(), 3, "reopened as it was");

    // Now the install runs beside the purge: the purge ends once the snapshot is kept.
    let mut receiving = replica.begin_receiving_snapshot().await?;
    tokio::io::AsyncWriteExt::write_all(&mut receiving, &bytes).await?;
    let (purged, installed) = tokio::join!(log.purge(at), replica.install_snapshot(&meta, receiving));
    installed?;
    purged?;
    assert_eq!(replica.applied_state().await?.0, Some(at));

    // An install that fails (a damaged transfer) fails the purge queued behind it.
    let (mut log, mut replica) = {
        drop((log, replica));
        let other = dir.path().join("other");
        let db = open_keyspace(&other, &[])?;
        open_group(&db, 3, Arc::new(common::Journal::default()), &other.join("snapshots"), &other.join("log"))?
    };
    apply(&mut replica, 1..=3).await?;
    let mut receiving = replica.begin_receiving_snapshot().await?;
    tokio::io::AsyncWriteExt::write_all(&mut receiving, &bytes[..bytes.len() - 5]).await?;
    let (purged, installed) = tokio::join!(log.purge(at), replica.install_snapshot(&meta, receiving));
    assert!(installed.is_err(), "a cut transfer was installed");
    let error = purged.expect_err("purged behind a failed install").to_string();
    assert!(error.contains("not purging the log up to entry 30") && error.contains("install failed"), "{error}");
    Ok(())
}
