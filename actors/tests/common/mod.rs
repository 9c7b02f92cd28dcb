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
