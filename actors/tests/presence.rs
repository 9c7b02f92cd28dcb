//! Presence follows the person (issue 10): an online operator whose last socket has
//! been gone for the grace period is set away with the reason `disconnected`, and their
//! pending offers are withdrawn at once; a socket back within the grace period (a page
//! reload) changes nothing; a node that stops reporting (it died) stops vouching for its
//! operators after the lease; a new leader gives every desk the whole grace period.

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::{FeedItem, ShardState, REASON_DISCONNECTED, SOCKET_LEASE_MS};
use switchboard_actors::Error;

const GRACE: u64 = 30_000;

fn run(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> Result<Vec<Event>, Error> {
    let (_, outcome) = records::run(state, store, &Envelope::new(Timestamp(at), command))?;
    Ok(outcome.events)
}

fn ok(r: Result<Vec<Event>, Error>) -> Vec<Event> {
    r.expect("accepted")
}

fn ann() -> OperatorId {
    OperatorId::new("ann")
}

/// Ann, online at 1000 with a socket on node 1, and a conversation offered to her.
fn ann_at_her_desk() -> (MemStore, ShardState) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    ok(run(&mut state, &store, 1000, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION }));
    ok(run(&mut state, &store, 1000, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 120_000, sla_ms: 60_000 })));
    ok(run(&mut state, &store, 1000, Command::UpsertOperator(OperatorConfig { id: ann(), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] })));
    ok(run(&mut state, &store, 1000, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, 1000, Command::OperatorsConnected { node: 1, operators: vec![ann()] }));
    ok(run(&mut state, &store, 1000, Command::SetPresence { operator: ann(), presence: Presence::Online }));
    ok(run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    assert_eq!(state.operators[&ann()].offers.len(), 1);
    (store, state)
}

fn mark(state: &mut ShardState, store: &MemStore, at: u64) -> Vec<Event> {
    ok(run(state, store, at, Command::MarkAbsent { grace_ms: GRACE, since: Timestamp(0) }))
}

#[test]
fn the_last_socket_gone_for_the_grace_period_sets_away_and_withdraws_offers() {
    let (store, mut state) = ann_at_her_desk();
    // Her socket closes at 5000 (node 1 reports nobody).
    ok(run(&mut state, &store, 5000, Command::OperatorsConnected { node: 1, operators: vec![] }));
    assert!(mark(&mut state, &store, 5000 + GRACE - 1).is_empty(), "still within the grace period");
    let events = mark(&mut state, &store, 5000 + GRACE);
    assert!(events.iter().any(|e| matches!(e, Event::OfferWithdrawn { reason: WithdrawReason::OperatorUnavailable, .. })), "{events:?}");
    assert!(events.contains(&Event::WentAbsent { operator: ann() }));
    let op = &state.operators[&ann()];
    assert_eq!(op.presence, Presence::Away);
    assert!(op.offers.is_empty(), "the offer went back to the queue at once");
    assert_eq!(state.presence_reasons[&ann()], REASON_DISCONNECTED);
    // Her desk hears why when it comes back (the feed's `presence` event).
    let feed = records::feed(&store, &ann(), 0, 100).expect("feed");
    assert!(feed.iter().any(|e| matches!(&e.item, FeedItem::PresenceSet { presence: Presence::Away, reason } if reason == REASON_DISCONNECTED)), "{feed:?}");
    // Kept as records: a restarted replica says the same.
    let rebuilt = records::load(&store).expect("load");
    assert_eq!(rebuilt.presence_reasons[&ann()], REASON_DISCONNECTED);
    assert_eq!(rebuilt.operators[&ann()].presence, Presence::Away);
    // Going online herself clears the reason.
    ok(run(&mut state, &store, 40_000, Command::OperatorsConnected { node: 1, operators: vec![ann()] }));
    ok(run(&mut state, &store, 40_000, Command::SetPresence { operator: ann(), presence: Presence::Online }));
    assert!(!state.presence_reasons.contains_key(&ann()));
    assert!(records::load(&store).expect("load").presence_reasons.is_empty());
}

#[test]
fn a_reload_within_the_grace_period_changes_nothing() {
    let (store, mut state) = ann_at_her_desk();
    ok(run(&mut state, &store, 5000, Command::OperatorsConnected { node: 1, operators: vec![] }));
    // Back two seconds later, through another node.
    ok(run(&mut state, &store, 7000, Command::OperatorsConnected { node: 2, operators: vec![ann()] }));
    assert!(mark(&mut state, &store, 5000 + GRACE + 1).is_empty());
    assert_eq!(state.operators[&ann()].presence, Presence::Online);
}

#[test]
fn a_node_that_stops_reporting_stops_vouching_after_the_lease() {
    let (store, mut state) = ann_at_her_desk();
    // Node 1 last reported her at 1000 and then died: no closing report ever comes.
    assert!(mark(&mut state, &store, 1000 + SOCKET_LEASE_MS).is_empty(), "the lease still holds");
    // Her socket may have lived until the lease ran out: the grace period counts from there.
    assert!(mark(&mut state, &store, 1000 + SOCKET_LEASE_MS + GRACE - 1).is_empty());
    let events = mark(&mut state, &store, 1000 + SOCKET_LEASE_MS + GRACE);
    assert!(events.contains(&Event::WentAbsent { operator: ann() }), "{events:?}");
}

#[test]
fn a_new_leader_gives_every_desk_the_whole_grace_period() {
    let (store, mut state) = ann_at_her_desk();
    ok(run(&mut state, &store, 5000, Command::OperatorsConnected { node: 1, operators: vec![] }));
    // A leader that began watching at 20,000 waits until 50,000 whatever it found.
    let late = Command::MarkAbsent { grace_ms: GRACE, since: Timestamp(20_000) };
    assert!(ok(run(&mut state, &store, 49_999, late.clone())).is_empty());
    assert!(ok(run(&mut state, &store, 50_000, late)).contains(&Event::WentAbsent { operator: ann() }));
}

#[test]
fn away_or_on_break_operators_are_left_alone_and_unknown_ones_are_not_reported() {
    let (store, mut state) = ann_at_her_desk();
    ok(run(&mut state, &store, 2000, Command::SetPresence { operator: ann(), presence: Presence::Break }));
    ok(run(&mut state, &store, 5000, Command::OperatorsConnected { node: 1, operators: vec![OperatorId::new("ghost")] }));
    assert!(mark(&mut state, &store, 100_000).is_empty());
    assert_eq!(state.operators[&ann()].presence, Presence::Break);
    assert!(!state.sockets[&1].operators.contains(&OperatorId::new("ghost")));
}
