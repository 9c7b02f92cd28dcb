//! The log store (segment files) and state machine store (fjall records) pass
//! openraft's own storage test suite.

mod common;

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use switchboard_raft::store::{open_group, open_keyspace, LogStore, StateMachineStore};
use switchboard_raft::{NodeId, TypeConfig};

struct StoreBuilderOnDisk;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for StoreBuilderOnDisk {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_keyspace(&dir.path().join("records"), &[]).expect("open the record store");
        let (log, sm) = open_group(&db, 1, Arc::new(common::Journal::default()), &dir.path().join("snapshots"), &dir.path().join("log")).expect("open group");
        // The suite purges logs with no snapshot; a purge otherwise waits for one.
        sm.purge_without_snapshots();
        Ok((dir, log, sm))
    }
}

#[test]
fn the_store_passes_openraft_suite() -> Result<(), StorageError<NodeId>> {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("openraft=info,switchboard_raft=debug").try_init();
    Suite::test_all(StoreBuilderOnDisk)?;
    Ok(())
}
