//! The entry clock (`actors::now_ms`): after an entry stamped ahead of this node's wall
//! clock (a leader whose clock was stepped forward an hour and then set right), time goes
//! on from that entry at its real pace. Before, every timer armed for a deadline after it
//! waited for the wall clock to catch up: an offer made then stayed out for the hour.
//!
//! Its own test binary: the clock is one per process, and this moves it an hour ahead.

use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{commit, Recorder};

use switchboard_actors::actors::{clock_ahead_ms, now_ms, wall_ms, ShardSupervisor, SupervisorArgs};
use switchboard_actors::model::*;
use switchboard_actors::records::MemStore;
use switchboard_actors::shard::Shard;


const HOUR: u64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_made_at_a_time_ahead_of_the_wall_clock_expires_after_its_own_timeout() {
    let store = MemStore::default();
    let shard = Arc::new(Shard::new());
    shard.load(Arc::new(store.clone())).expect("load");
    // Every entry stamped an hour ahead of this machine's wall clock, as by a leader
    // whose clock had been stepped forward.
    let ahead = wall_ms().0 + HOUR;
    commit(&shard, &store, ahead, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION });
    commit(&shard, &store, ahead, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("general"), name: "General".into(), policy: Policy::LongestIdle, offer_timeout_ms: 1_000, sla_ms: 600_000 }));
    commit(&shard, &store, ahead, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("general") }));
    commit(&shard, &store, ahead, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("carol"), name: "Carol".into(), capacity: 1, groups: vec![SkillGroupId::new("general")] }));
    commit(&shard, &store, ahead, Command::SetPresence { operator: OperatorId::new("carol"), presence: Presence::Online });
    commit(&shard, &store, ahead, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    let offer = {
        let state = shard.read();
        let (id, offer) = state.offers.iter().next().expect("carol is offered the conversation");
        assert_eq!(offer.deadline, Timestamp(ahead + 1_000), "the offer's deadline is one timeout after its entry");
        *id
    };
    // The clock reads from the entry on, not from the wall clock.
    assert!(now_ms().0 >= ahead, "the clock reads at least the entry's time: {} < {ahead}", now_ms().0);
    assert!(clock_ahead_ms() > HOUR - 60_000, "how far ahead it reads is told: {} ms", clock_ahead_ms());

    // This node leads: carol's actor arms the offer's timer, which must fire about a
    // second from now, not in an hour.
    let recorder = Arc::new(Recorder::default());
    let _supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: recorder.clone(), leader: true }).await.expect("supervisor");
    let expired = || recorder.0.lock().map(|seen| seen.iter().any(|c| matches!(c, Command::ExpireOffer { offer: o } if *o == offer))).unwrap_or(false);
    for _ in 0..250 {
        if expired() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(expired(), "the offer is expired after its timeout: {:?}", recorder.0.lock().map(|s| s.clone()));
    // Time went on from the entry at its real pace.
    assert!(now_ms().0 >= ahead + 1_000, "the clock moved on from the entry: {}", now_ms().0 - ahead);
    assert!(clock_ahead_ms() < HOUR, "and makes up what it is ahead by: {} ms", clock_ahead_ms());
}
