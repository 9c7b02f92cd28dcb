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

/// Refuses the first offer expiry it is asked to commit as a commit whose outcome is
/// unknown (a leader change under it), and records every expiry asked for.
#[derive(Default)]
struct FirstExpiryLost(std::sync::Mutex<Vec<OfferId>>);

impl switchboard_actors::shard::Proposer for FirstExpiryLost {
    fn propose(&self, command: Command) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<switchboard_actors::core::Reply, switchboard_actors::Error>> + Send>> {
        let first = match (&command, self.0.lock()) {
            (Command::ExpireOffer { offer }, Ok(mut asked)) => {
                asked.push(*offer);
                asked.len() == 1
            }
            _ => false,
        };
        Box::pin(async move {
            if first {
                return Err(switchboard_actors::Error::Commit("not committed within 3 s; the outcome is unknown".into()));
            }
            Ok(switchboard_actors::core::Reply::Done)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_expiry_that_could_not_be_committed_is_tried_again() {
    // Left pending, the offer would hold its operator's slot and its conversation
    // would wait on them until another leader re-armed the timer.
    let store = MemStore::default();
    let shard = Arc::new(Shard::new());
    shard.load(Arc::new(store.clone())).expect("load");
    let proposer = Arc::new(FirstExpiryLost::default());
    let _supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: proposer.clone(), leader: true }).await.expect("supervisor");
    let now = now_ms().0;
    commit(&shard, &store, now, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION });
    commit(&shard, &store, now, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 1_000, sla_ms: 600_000 }));
    commit(&shard, &store, now, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }));
    commit(&shard, &store, now, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 1, groups: vec![SkillGroupId::new("g")] }));
    commit(&shard, &store, now, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online });
    commit(&shard, &store, now, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    let offer = shard.read().offers.values().next().map(|o| o.id).expect("offered to ann");
    let asked = || proposer.0.lock().map(|a| a.iter().filter(|o| **o == offer).count()).unwrap_or(0);
    for _ in 0..250 {
        if asked() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(asked() >= 2, "the expiry is asked for again after the first was lost (asked {} times)", asked());
}
