//! A free operator never watches a customer wait (rules 4): an operator who missed a
//! conversation's offer, and so was set away, is offered it again the moment they come
//! back online when nobody else can take it. Under rules 3 it waited for its new round.

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::{ConversationStatus, ShardState};
use switchboard_actors::Error;

fn run(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> Result<Vec<Event>, Error> {
    let (_, outcome) = records::run(state, store, &Envelope::new(Timestamp(at), command))?;
    Ok(outcome.events)
}

/// Group `g` (offers time out after 5 s) with operators `ann` and `bob`, `ann` online,
/// and a visitor's conversation offered to her at time 1000.
fn missed_by_ann(rules: u32) -> (MemStore, ShardState, ConversationId) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    let ok = |r: Result<Vec<Event>, Error>| r.expect("accepted");
    ok(run(&mut state, &store, 1000, Command::AdoptRules { version: rules }));
    ok(run(&mut state, &store, 1000, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 })));
    for id in ["ann", "bob"] {
        ok(run(&mut state, &store, 1000, Command::UpsertOperator(OperatorConfig { id: OperatorId::new(id), name: id.into(), capacity: 2, groups: vec![SkillGroupId::new("g")] })));
    }
    ok(run(&mut state, &store, 1000, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, 1000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    ok(run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    let offer = state.offers.values().next().expect("offered to ann").id;
    let conversation = state.offers[&offer].conversation;
    // Nobody answers: at the deadline the offer expires and ann is set away.
    ok(run(&mut state, &store, 6000, Command::ExpireOffer { offer }));
    assert_eq!(state.operators[&OperatorId::new("ann")].presence, Presence::Away);
    assert!(state.offers.is_empty(), "nobody else can take it: it waits");
    (store, state, conversation)
}

fn offered_to(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(|e| if let Event::OfferMade { offer, .. } = e { Some(offer.operator.as_str().to_owned()) } else { None }).collect()
}

#[test]
fn under_rules_4_the_operator_who_missed_it_gets_it_again_on_coming_back() {
    let (store, mut state, conversation) = missed_by_ann(4);
    let events = run(&mut state, &store, 9000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).expect("online");
    assert!(events.contains(&Event::PassForgotten { conversation, operator: OperatorId::new("ann") }), "{events:?}");
    assert_eq!(offered_to(&events), vec!["ann"], "offered at once, not at the new round (11 s)");
    assert!(matches!(state.conversations[&conversation].status, ConversationStatus::Queued { offer: Some(_), .. }));
    // The decision is kept: the state rebuilt from the records says the same.
    let rebuilt = records::load(&store).expect("load");
    assert!(rebuilt.conversations[&conversation].passed_by.is_empty());
}

#[test]
fn someone_who_never_passed_still_comes_first() {
    let (store, mut state, conversation) = missed_by_ann(4);
    // Bob comes online first: he has not passed, so it is his.
    let events = run(&mut state, &store, 7000, Command::SetPresence { operator: OperatorId::new("bob"), presence: Presence::Online }).expect("bob online");
    assert_eq!(offered_to(&events), vec!["bob"]);
    // Ann coming back while Bob's offer is out changes nothing for this conversation.
    let events = run(&mut state, &store, 8000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).expect("ann online");
    assert!(!events.iter().any(|e| matches!(e, Event::PassForgotten { .. })), "{events:?}");
    assert!(offered_to(&events).is_empty());
    assert!(state.conversations[&conversation].passed_by.contains(&OperatorId::new("ann")));
}

#[test]
fn under_rules_3_it_waited_for_its_new_round() {
    let (store, mut state, _) = missed_by_ann(3);
    let events = run(&mut state, &store, 9000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).expect("online");
    assert!(offered_to(&events).is_empty(), "entries decided under rules 3 replay as they were");
    assert!(!events.iter().any(|e| matches!(e, Event::PassForgotten { .. })));
}

/// A `general` conversation that overflowed to `billing` (ann's only group) at its step
/// was offered to ann, who missed it and was set away.
fn overflow_missed_by_ann(rules: u32) -> (MemStore, ShardState, ConversationId) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    let ok = |r: Result<Vec<Event>, Error>| r.expect("accepted");
    ok(run(&mut state, &store, 1000, Command::AdoptRules { version: rules }));
    for id in ["general", "billing"] {
        ok(run(&mut state, &store, 1000, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new(id), name: id.into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 600_000 })));
    }
    ok(run(&mut state, &store, 1000, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("billing")] })));
    ok(run(&mut state, &store, 1000, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("general") })));
    let step = RoutingStep { after_ms: 1_000, skills: None, max_level: 0, overflow: vec![SkillGroupId::new("billing")] };
    ok(run(&mut state, &store, 1000, Command::SetGroupSteps { group: SkillGroupId::new("general"), steps: vec![step] }));
    ok(run(&mut state, &store, 1000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    ok(run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    assert!(state.offers.is_empty(), "at step 0 only general's operators may take it");
    ok(run(&mut state, &store, 2000, Command::RouteQueue { group: SkillGroupId::new("general") }));
    let offer = state.offers.values().next().expect("offered to ann at the step").clone();
    assert_eq!(offer.operator.as_str(), "ann");
    ok(run(&mut state, &store, 7000, Command::ExpireOffer { offer: offer.id }));
    assert_eq!(state.operators[&OperatorId::new("ann")].presence, Presence::Away);
    (store, state, offer.conversation)
}

#[test]
fn from_rules_11_an_operator_back_online_is_offered_again_what_overflowed_to_them() {
    let (store, mut state, conversation) = overflow_missed_by_ann(11);
    let events = run(&mut state, &store, 9000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).expect("online");
    assert!(events.contains(&Event::PassForgotten { conversation, operator: OperatorId::new("ann") }), "{events:?}");
    assert_eq!(offered_to(&events), vec!["ann"], "offered at once, not at the new round");

    let (store, mut state, _) = overflow_missed_by_ann(10);
    let events = run(&mut state, &store, 9000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).expect("online");
    assert!(offered_to(&events).is_empty(), "entries decided under rules 10 replay as they were: {events:?}");
}
