//! Snapshots are files: a new one replaces the old file (disk space comes back), a
//! restart loads the records, and a snapshot an older build kept inside sled (the
//! legacy format, the whole state as one value) is still read, then moved to a file.

mod common;

use std::path::Path;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use switchboard_raft::store::{open_group, StateMachineStore};
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

#[tokio::test]
async fn a_new_snapshot_replaces_the_old_file_and_a_restart_restores_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let snapshots = dir.path().join("snapshots");
    let db = sled::open(dir.path().join("db"))?;
    let journal = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, journal.clone(), &snapshots)?;

    apply(&mut sm, 1..=10).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    let first = files(&snapshots);
    assert_eq!(first.len(), 1, "one snapshot file: {first:?}");
    apply(&mut sm, 11..=20).await?;
    let built = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(20));
    let second = files(&snapshots);
    assert_eq!(second.len(), 1, "the replaced file is gone, nothing partial is left: {second:?}");
    assert_ne!(first, second);

    // The records are the state: a restart loads every applied entry, not only those
    // the snapshot holds, and the snapshot stays as it was.
    apply(&mut sm, 21..=22).await?;
    drop(sm);
    let restored = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, restored.clone(), &snapshots)?;
    assert_eq!(restored.entries.lock().unwrap().len(), 22);
    let (applied, _) = sm.applied_state().await?;
    assert_eq!(applied.map(|l| l.index), Some(22));
    let current = sm.get_current_snapshot().await?.expect("a current snapshot");
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(20));
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
    let db = sled::open(dir.path().join("db"))?;
    let entries: Vec<Vec<u8>> = (1..=5u64).map(|i| i.to_be_bytes().to_vec()).collect();
    let legacy = LegacySnapshot {
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
            last_membership: StoredMembership::default(),
            snapshot_id: "1-5-1".into(),
        },
        data: serde_json::to_vec(&entries)?,
    };
    let meta_tree = db.open_tree("g3/meta")?;
    meta_tree.insert("snapshot", bincode::serde::encode_to_vec(&legacy, bincode::config::standard())?)?;

    let journal = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, journal.clone(), &snapshots)?;
    assert_eq!(*journal.entries.lock().unwrap(), entries, "the old snapshot was restored");
    let current = sm.get_current_snapshot().await?.expect("the old snapshot is current");
    assert_eq!(current.meta.snapshot_id, "1-5-1");

    apply(&mut sm, 6..=7).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(files(&snapshots).len(), 1);
    assert!(meta_tree.get("snapshot")?.is_none(), "the copy inside sled is dropped");
    Ok(())
}

/// What a crash can leave in the snapshot folder: a file written but not yet pointed at
/// (a crash before the pointer moved), one replaced but not yet deleted, and a partial
/// one. The next start keeps the snapshot the pointer names and removes the rest.
#[tokio::test]
async fn a_restart_after_a_crash_mid_snapshot_keeps_the_named_one_and_sweeps_the_rest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let snapshots = dir.path().join("snapshots");
    let db = sled::open(dir.path().join("db"))?;
    let journal = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, journal, &snapshots)?;
    apply(&mut sm, 1..=4).await?;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    let named = files(&snapshots);
    drop(sm);

    let leftovers = ["g3-00000000000000000009-1.snapshot", "g3-00000000000000000002-1.snapshot", "g3-00000000000000000011-2.snapshot.partial"];
    for name in leftovers {
        std::fs::write(snapshots.join(name), b"left by a crash")?;
    }
    // Another group's files in the same folder are not ours to remove.
    std::fs::write(snapshots.join("g4-00000000000000000001-1.snapshot"), b"group 4")?;

    let restored = Arc::new(common::Journal::default());
    let (_log, mut sm) = open_group(&db, 3, restored.clone(), &snapshots)?;
    assert_eq!(restored.entries.lock().unwrap().len(), 4, "restored from the snapshot the pointer names");
    let mut expected = named.clone();
    expected.push("g4-00000000000000000001-1.snapshot".into());
    expected.sort();
    assert_eq!(files(&snapshots), expected);
    assert_eq!(sm.get_current_snapshot().await?.expect("current").meta.last_log_id.map(|l| l.index), Some(4));
    Ok(())
}
