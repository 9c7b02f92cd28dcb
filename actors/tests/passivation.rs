//! An entity actor that passivates leaves nothing running behind it: a visitor cycling
//! through conversations must not leave each one's actor (its mailboxes and timer
//! tasks) in memory after it stopped (issue 8: the soak's memory).

use std::sync::Arc;
use std::time::Duration;

mod common;
use common::commit;

use switchboard_actors::actors::{subscribe, ShardSupervisor, SupervisorArgs};
use switchboard_actors::model::*;
use switchboard_actors::records::MemStore;
use switchboard_actors::shard::{Proposer, Shard, StreamKey};
use switchboard_actors::Error;

/// Nothing the actors propose is taken (this test commits through `commit` alone).
struct NothingTaken;

impl Proposer for NothingTaken {
    fn propose(&self, _command: Command) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<switchboard_actors::core::Reply, Error>> + Send>> {
        Box::pin(async { Err(Error::Unreachable("this test takes no proposals".into())) })
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

/// Waits (bounded) until `done` holds; returns whether it did.
async fn until(mut done: impl FnMut() -> bool, within: Duration) -> bool {
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_conversations_actors_leave_no_task_behind() {
    const CONVERSATIONS: u64 = 100;
    let store = MemStore::default();
    let shard = Arc::new(Shard::new());
    shard.load(Arc::new(store.clone())).expect("load");
    commit(&shard, &store, 0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 60_000, sla_ms: 60_000 }));
    commit(&shard, &store, 0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }));
    let supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: Arc::new(NothingTaken), leader: true }).await.expect("supervisor");

    // One conversation stays queued all along: its group's actor runs before the baseline
    // is taken and after the others are gone.
    commit(&shard, &store, 1, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    assert!(until(|| shard.active_actors() == 1, Duration::from_secs(5)).await, "the group's actor started");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = alive_tasks();
    let actors_before = shard.active_actors();

    // A hundred visitors each write in a conversation of their own (its actor starts with
    // the message, since a socket follows it), then close it and go.
    let mut followers = Vec::new();
    for n in 1..=CONVERSATIONS {
        commit(&shard, &store, 2, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
        let id = ConversationId(n);
        followers.push(subscribe(&supervisor, StreamKey::Conversation(id)).await.expect("followed"));
        commit(&shard, &store, 3, Command::PostClientMessage { conversation: id, key: format!("k{n}"), text: "hello".into(), attachments: vec![] });
    }
    let started = until(|| shard.active_actors() >= actors_before + CONVERSATIONS as usize, Duration::from_secs(10)).await;
    assert!(started, "every written-to conversation has its actor: {} running", shard.active_actors());
    assert!(alive_tasks() >= baseline + CONVERSATIONS as usize, "each actor runs as a task");
    for n in 1..=CONVERSATIONS {
        commit(&shard, &store, 4, Command::CloseByClient { conversation: ConversationId(n) });
    }
    drop(followers);

    // A closed conversation's actor stops about 2 s later (its grace)...
    let stopped = until(|| shard.active_actors() == actors_before, Duration::from_secs(15)).await;
    assert!(stopped, "the closed conversations' actors stopped: {} running, {actors_before} before", shard.active_actors());
    // ...and the tasks that sent it its passivation checks end with it: none sleeps on
    // holding the dead actor's mailboxes (the periodic one would for 30 s).
    let gone = until(|| alive_tasks() <= baseline + 10, Duration::from_secs(5)).await;
    assert!(gone, "{} tasks alive against {baseline} before the hundred actors", alive_tasks());
}
