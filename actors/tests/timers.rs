//! The skill group's queue timer (rules 6): a routing step whose time passed while no
//! timer ran (a new leader, a restarted actor) is routed as soon as the group's actor
//! starts, not when something else happens to touch the group.

use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{commit, Recorder};

use switchboard_actors::actors::{now_ms, ShardSupervisor, SupervisorArgs};
use switchboard_actors::core::Part;
use switchboard_actors::model::*;
use switchboard_actors::records::MemStore;
use switchboard_actors::shard::Shard;


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_passed_while_no_timer_ran_is_routed_when_the_group_actor_starts() {
    let store = MemStore::default();
    let shard = Arc::new(Shard::new());
    shard.load(Arc::new(store.clone())).expect("load");
    // Five seconds ago: general's step 1 (after one second) overflows to billing, where
    // carol is free; at step 0 nobody could take it.
    let then = now_ms().0 - 5_000;
    commit(&shard, &store, then, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION });
    for id in ["general", "billing"] {
        commit(&shard, &store, then, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new(id), name: id.into(), policy: Policy::LongestIdle, offer_timeout_ms: 60_000, sla_ms: 600_000 }));
    }
    commit(&shard, &store, then, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("general") }));
    commit(&shard, &store, then, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("carol"), name: "Carol".into(), capacity: 2, groups: vec![SkillGroupId::new("billing")] }));
    let step = RoutingStep { after_ms: 1_000, skills: None, max_level: 0, overflow: vec![SkillGroupId::new("billing")] };
    commit(&shard, &store, then, Command::SetGroupSteps { group: SkillGroupId::new("general"), steps: vec![step] });
    commit(&shard, &store, then, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    commit(&shard, &store, then, Command::SetPresence { operator: OperatorId::new("carol"), presence: Presence::Online });
    assert!(shard.read().offers.is_empty(), "at step 0 nobody could take it");

    // This node becomes leader now, four seconds after the step: its group actor starts
    // and asks for the routing at once.
    let recorder = Arc::new(Recorder::default());
    let _supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: recorder.clone(), leader: true }).await.expect("supervisor");
    let asked = || recorder.0.lock().map(|seen| seen.iter().any(|c| matches!(c, Command::RouteQueue { group } if group.as_str() == "general"))).unwrap_or(false);
    for _ in 0..100 {
        if asked() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(asked(), "the group actor routes the queue whose step passed: {:?}", recorder.0.lock().map(|s| s.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_shard_s_copy_of_a_queue_proposes_no_route_queue() {
    // A conversation shard (ADR 0006) holds a copy of the queue its conversations wait
    // in, but routing lives in the routing shard: a `RouteQueue` here decides nothing.
    let store = MemStore::default();
    let shard = Arc::new(Shard::with_part(Part::Conversations { routing: 1, shard: 0, shards: 1 }));
    shard.load(Arc::new(store.clone())).expect("load");
    let then = now_ms().0 - 5_000;
    commit(&shard, &store, then, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION });
    for id in ["general", "billing"] {
        commit(&shard, &store, then, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new(id), name: id.into(), policy: Policy::LongestIdle, offer_timeout_ms: 60_000, sla_ms: 600_000 }));
    }
    commit(&shard, &store, then, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("general") }));
    let step = RoutingStep { after_ms: 1_000, skills: None, max_level: 0, overflow: vec![SkillGroupId::new("billing")] };
    commit(&shard, &store, then, Command::SetGroupSteps { group: SkillGroupId::new("general"), steps: vec![step] });
    commit(&shard, &store, then, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    assert_eq!(shard.read().groups.get(&SkillGroupId::new("general")).map(|g| g.queue.len()), Some(1), "it waits in the shard's copy of the queue");

    // This node leads the conversation shard; the step passed four seconds ago (a
    // routing shard's group actor would ask for the round at once, as above).
    let recorder = Arc::new(Recorder::default());
    let _supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: recorder.clone(), leader: true }).await.expect("supervisor");
    // And a conversation queued while it leads.
    commit(&shard, &store, now_ms().0, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let routed = recorder.0.lock().map(|seen| seen.iter().filter(|c| matches!(c, Command::RouteQueue { .. })).count()).unwrap_or(0);
    assert_eq!(routed, 0, "a conversation shard proposes no RouteQueue: {:?}", recorder.0.lock().map(|s| s.clone()));
}
