//! The sled log store and state machine pass openraft's own storage test suite.

mod common;

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use switchboard_raft::store::{open_group, LogStore, StateMachineStore};
use switchboard_raft::{NodeId, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path().join("db")).expect("open sled");
        let (log, sm) = open_group(&db, 1, Arc::new(common::Journal::default()), &dir.path().join("snapshots"), &dir.path().join("log")).expect("open group");
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() -> Result<(), StorageError<NodeId>> {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("openraft=info,switchboard_raft=debug").try_init();
    Suite::test_all(SledBuilder)?;
    Ok(())
}
