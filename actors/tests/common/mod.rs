//! What the actor tests share.

use switchboard_actors::model::{Command, Envelope, Timestamp};
use switchboard_actors::records::MemStore;
use switchboard_actors::shard::Shard;

/// Applies one entry of one command as the state machine does: apply, write the
/// records, end the entry, publish (which notifies the supervisor).
pub fn commit(shard: &Shard, store: &MemStore, at: u64, command: Command) {
    let mut writes = Vec::new();
    shard.apply(&Envelope::new(Timestamp(at), command), &mut writes).expect("accepted");
    store.write(writes);
    shard.end_entry();
    shard.published();
}

/// Records what the actors propose and answers as a commit would, without applying.
#[derive(Default)]
#[allow(dead_code)]
pub struct Recorder(pub std::sync::Mutex<Vec<Command>>);

impl switchboard_actors::shard::Proposer for Recorder {
    fn propose(&self, command: Command) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<switchboard_actors::core::Reply, switchboard_actors::Error>> + Send>> {
        if let Ok(mut seen) = self.0.lock() {
            seen.push(command);
        }
        Box::pin(async move { Ok(switchboard_actors::core::Reply::Done) })
    }
}
