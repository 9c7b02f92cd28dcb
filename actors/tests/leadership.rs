//! A leadership change stops every entity actor, but the streams sockets follow outlive
//! them: what is applied afterwards still wakes those sockets (issue 9, item 9).

use std::sync::Arc;
use std::time::Duration;

mod common;
use common::commit;

use switchboard_actors::actors::{subscribe, ShardSupervisor, SupervisorArgs, SupervisorMsg};
use switchboard_actors::model::*;
use switchboard_actors::records::MemStore;
use switchboard_actors::shard::{Proposer, Shard, StreamKey};
use switchboard_actors::Error;

/// This test commits only through `commit` below; anything an actor proposes (offer
/// timers, which a follower never arms) is refused, loudly.
struct NothingProposed;

impl Proposer for NothingProposed {
    fn propose(&self, command: Command) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<switchboard_actors::core::Reply, Error>> + Send>> {
        Box::pin(async move { Err(Error::Commit(format!("this test proposes nothing, got {command:?}"))) })
    }
}

/// A shard with one conversation waiting in the queue of a group nobody serves.
fn one_waiting_conversation() -> (MemStore, Arc<Shard>, ConversationId) {
    let store = MemStore::default();
    let shard = Arc::new(Shard::new());
    shard.load(Arc::new(store.clone())).expect("load");
    commit(&shard, &store, 0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 60_000, sla_ms: 60_000 }));
    commit(&shard, &store, 0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }));
    commit(&shard, &store, 1, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    let conversation = ConversationId(0);
    (store, shard, conversation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_stream_is_woken_after_its_actor_stopped_for_a_leadership_change() {
    let (store, shard, conversation) = one_waiting_conversation();

    let ann = OperatorId::new("ann");
    commit(&shard, &store, 1, Command::UpsertOperator(OperatorConfig { id: ann.clone(), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] }));
    let supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: Arc::new(NothingProposed), leader: true }).await.expect("supervisor");
    let mut wake = subscribe(&supervisor, StreamKey::Conversation(conversation)).await.expect("subscribed");
    wake.borrow_and_update();
    // An operator's stream is followed through her actor, which runs on the leader.
    let mut ann_wake = subscribe(&supervisor, StreamKey::Operator(ann.clone())).await.expect("subscribed");
    ann_wake.borrow_and_update();

    // The node loses leadership: every actor stops.
    supervisor.cast(SupervisorMsg::Leadership(false)).expect("cast");
    for _ in 0..100 {
        if shard.active_actors() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(shard.active_actors(), 0, "the actors stopped with the leadership");
    // A wake-up an actor had not handled yet went with it: the followers of each
    // stopped actor are told to look again once.
    tokio::time::timeout(Duration::from_secs(2), ann_wake.changed()).await.expect("the leadership change woke the stopped actor's followers").expect("stream open");
    wake.borrow_and_update();

    // An entry the new leader committed arrives here and is applied: the socket that
    // follows the conversation hears of it although its actor is gone.
    commit(&shard, &store, 2, Command::PostClientMessage { conversation, key: "k1".into(), text: "still there?".into(), attachments: vec![] });
    tokio::time::timeout(Duration::from_secs(2), wake.changed()).await.expect("woken within 2 s").expect("stream open");
}

/// A conversation's actor only relays wake-ups, so following a quiet conversation costs
/// no actor (an idle session stays small); the first entry that touches it starts one,
/// which wakes the follower, and the supervisor restarts it if it crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_conversation_is_followed_without_an_actor_until_an_entry_touches_it() {
    let (store, shard, conversation) = one_waiting_conversation();
    let key = StreamKey::Conversation(conversation);

    let supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: Arc::new(NothingProposed), leader: true }).await.expect("supervisor");
    // The queue of `g` holds the conversation: its group's actor runs, and nothing else.
    let before = shard.active_actors();
    let mut wake = subscribe(&supervisor, key.clone()).await.expect("subscribed");
    wake.borrow_and_update();
    assert_eq!(shard.active_actors(), before, "following a quiet conversation starts no actor");
    assert!(!switchboard_actors::actors::crash(&supervisor, key.clone()).await.expect("asked"), "no actor to crash yet");

    commit(&shard, &store, 2, Command::PostClientMessage { conversation, key: "k1".into(), text: "hello".into(), attachments: vec![] });
    tokio::time::timeout(Duration::from_secs(2), wake.changed()).await.expect("woken within 2 s").expect("stream open");
    wake.borrow_and_update();
    let mut started = false;
    for _ in 0..100 {
        if shard.active_actors() == before + 1 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started, "an entry that touched the followed conversation started its actor");

    // The actor crashes; the supervisor restarts it and the follower still hears.
    assert!(switchboard_actors::actors::crash(&supervisor, key.clone()).await.expect("asked"), "its actor was running");
    // Told to look again (a wake-up the failed actor held is lost with it) ...
    tokio::time::timeout(Duration::from_secs(2), wake.changed()).await.expect("woken by the failure within 2 s").expect("stream open");
    wake.borrow_and_update();
    for _ in 0..100 {
        if shard.active_actors() == before + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(shard.active_actors(), before + 1, "restarted");
    // ... and woken by what is applied after the restart.
    commit(&shard, &store, 3, Command::PostClientMessage { conversation, key: "k2".into(), text: "still there?".into(), attachments: vec![] });
    tokio::time::timeout(Duration::from_secs(2), wake.changed()).await.expect("woken within 2 s").expect("stream open");
}
