//! Time across leaders (rules 3): an entry's time never goes below the time of the last
//! entry that changed the state, so a leader whose clock is behind, or a clock stepped
//! back, cannot make time recede; entries decided under older rules replay as stamped.

use switchboard_actors::core::RULES_VERSION;
use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::{ConversationStatus, ShardState};
use switchboard_actors::Error;

fn run(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> Result<(), Error> {
    records::run(state, store, &Envelope::new(Timestamp(at), command)).map(|_| ())
}

/// A group with one operator online and a web channel, all at time 1000, under `rules`.
fn setup(rules: u32) -> (MemStore, ShardState) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    if rules > 0 {
        run(&mut state, &store, 1000, Command::AdoptRules { version: rules }).expect("rules");
    }
    let ok = |r: Result<(), Error>| r.expect("accepted");
    ok(run(&mut state, &store, 1000, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 })));
    ok(run(&mut state, &store, 1000, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] })));
    ok(run(&mut state, &store, 1000, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, 1000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    (store, state)
}

#[test]
fn under_rules_3_an_entry_stamped_earlier_is_decided_at_the_last_entry_s_time() {
    assert!(RULES_VERSION >= 3);
    let (store, mut state) = setup(3);
    // A new leader whose clock is 600 ms behind stamps the next entry 400.
    run(&mut state, &store, 400, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }).expect("started");
    let conversation = state.conversations.values().next().expect("open");
    assert_eq!(conversation.created_at, Timestamp(1000), "time did not go back to 400");
    let offer = state.offers.values().next().expect("offered");
    assert_eq!(offer.deadline, Timestamp(6000), "the offer's deadline counts from 1000, not 400");
    assert_eq!(state.last_at, Timestamp(1000));

    // The clock is kept in the records: a node that rebuilds its state goes on from it.
    let rebuilt = records::load(&store).expect("load");
    assert_eq!(rebuilt.last_at, Timestamp(1000));

    // An expiry stamped before the deadline is not due; at the deadline it is.
    let offer = offer.id;
    assert_eq!(run(&mut state, &store, 5999, Command::ExpireOffer { offer }), Err(Error::NotDue(offer)));
    run(&mut state, &store, 6000, Command::ExpireOffer { offer }).expect("expired");
    assert!(state.offers.is_empty());
    assert_eq!(state.last_at, Timestamp(6000));
}

#[test]
fn under_rules_2_entries_replay_at_the_time_they_were_stamped() {
    let (store, mut state) = setup(2);
    run(&mut state, &store, 400, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }).expect("started");
    let conversation = state.conversations.values().next().expect("open");
    assert_eq!(conversation.created_at, Timestamp(400), "decided as it was under the rules of its time");
    assert_eq!(state.last_at, Timestamp(0), "no clock is kept before rules 3");
    assert!(records::load(&store).expect("load").last_at == Timestamp(0));
}

/// An offer whose expiry is committed long after its deadline (the leader stalled, or
/// leadership moved) is withdrawn, but its operator is not set away: missing it was not
/// their doing. On time, a missed offer still sets them away (rules 2).
#[test]
fn a_late_expiry_after_a_stall_does_not_set_the_operator_away() {
    use switchboard_actors::core::STALLED_EXPIRY_MS;
    use switchboard_actors::state::ShardState as S;
    let presence = |state: &S| state.operators.get(&OperatorId::new("ann")).map(|o| o.presence);
    for (late_by, away) in [(0, true), (STALLED_EXPIRY_MS, true), (STALLED_EXPIRY_MS + 1, false), (6500, false)] {
        let (store, mut state) = setup(3);
        run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }).expect("started");
        let offer = state.offers.values().next().expect("offered").id;
        run(&mut state, &store, 6000 + late_by, Command::ExpireOffer { offer }).expect("expired");
        assert!(state.offers.get(&offer).is_none(), "late by {late_by} ms: withdrawn");
        let expected = if away { Presence::Away } else { Presence::Online };
        assert_eq!(presence(&state), Some(expected), "late by {late_by} ms");
    }
}

/// An offer to Ann made at 1000 (deadline 6000) and expired at 6500, late enough to
/// count as missed (within `STALLED_EXPIRY_MS`): she is set away.
fn missed_offer(rules: u32) -> (MemStore, ShardState, ConversationId, OfferId) {
    let (store, mut state) = setup(rules);
    run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }).expect("started");
    let offer = state.offers.values().next().expect("offered").clone();
    assert_eq!(offer.deadline, Timestamp(6000));
    run(&mut state, &store, 6500, Command::ExpireOffer { offer: offer.id }).expect("expired");
    assert_eq!(state.operators[&OperatorId::new("ann")].presence, Presence::Away, "a missed offer sets her away");
    (store, state, offer.conversation, offer.id)
}

fn accept_at(operator: &str, offer: OfferId, received_at: u64) -> Command {
    Command::AcceptOfferAt { operator: OperatorId::new(operator), offer, received_at: Timestamp(received_at) }
}

#[test]
fn under_rules_9_an_accept_that_reached_the_server_before_the_deadline_counts_after_the_offer_expired() {
    assert!(RULES_VERSION >= 9);
    let (store, mut state, conversation, offer) = missed_offer(9);
    // Her answer reached the server at 5900, 100 ms before the deadline, and was stuck
    // behind a stalled leader until 6700, after the expiry.
    run(&mut state, &store, 6700, accept_at("ann", offer, 5900)).expect("the late accept is honoured");
    let ann = &state.operators[&OperatorId::new("ann")];
    assert_eq!(state.conversations[&conversation].assigned(), Some(&OperatorId::new("ann")));
    assert!(ann.active.contains(&conversation));
    assert_eq!(ann.presence, Presence::Online, "she answered: she is at her desk");
    // The same decision after a restart from the records (the decision record is read
    // from them, not kept in memory).
    let rebuilt = records::load(&store).expect("load");
    assert_eq!(rebuilt.conversations[&conversation].assigned(), Some(&OperatorId::new("ann")));
}

#[test]
fn a_late_accept_that_reached_the_server_after_the_deadline_is_refused() {
    let (store, mut state, conversation, offer) = missed_offer(9);
    assert_eq!(run(&mut state, &store, 6700, accept_at("ann", offer, 6001)), Err(Error::OfferGone(offer)));
    // A stamp from a clock ahead of the log's is taken as the entry's own time: 6700.
    assert_eq!(run(&mut state, &store, 6700, accept_at("ann", offer, 99_999)), Err(Error::OfferGone(offer)));
    // Someone else cannot take Ann's offer by stamping early.
    assert_eq!(run(&mut state, &store, 6700, accept_at("bob", offer, 5000)), Err(Error::OfferGone(offer)));
    assert!(state.conversations[&conversation].assigned().is_none());
    assert_eq!(state.operators[&OperatorId::new("ann")].presence, Presence::Away);
}

#[test]
fn a_late_accept_does_not_take_a_conversation_offered_to_someone_else_since() {
    let (store, mut state, conversation, offer) = missed_offer(9);
    run(&mut state, &store, 6600, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("bob"), name: "Bob".into(), capacity: 1, groups: vec![SkillGroupId::new("g")] })).expect("bob");
    run(&mut state, &store, 6600, Command::SetPresence { operator: OperatorId::new("bob"), presence: Presence::Online }).expect("online");
    let to_bob = state.offers.values().find(|o| o.conversation == conversation).expect("offered to bob").id;
    assert_eq!(run(&mut state, &store, 6700, accept_at("ann", offer, 5900)), Err(Error::OfferGone(offer)));
    run(&mut state, &store, 6800, accept_at("bob", to_bob, 6800)).expect("bob takes it");
    assert_eq!(state.conversations[&conversation].assigned(), Some(&OperatorId::new("bob")), "one holder (I2)");
}

/// Rules 18: a late accept takes the conversation only if it has waited in the queue
/// since the offer was made, from an operator still in a group the offer's step reaches
/// with the skills it needs there; under rules 17 each of these took it.
#[test]
fn under_rules_18_a_late_accept_is_weighed_against_what_changed_since_the_offer() {
    assert!(RULES_VERSION >= 18);
    let ann = || OperatorId::new("ann");
    type Since = fn(&MemStore, &mut ShardState, ConversationId);
    let cases: [(&str, Since); 3] = [
        ("taken with a late accept and transferred back to the group, then the same accept sent again", |store, state, conversation| {
            let offer = *state.conversations[&conversation].decisions.last().expect("offered");
            run(state, store, 6700, accept_at("ann", offer, 5900)).expect("the late accept is honoured");
            run(state, store, 6750, Command::Transfer { operator: OperatorId::new("ann"), conversation, target: TransferTarget::Group(SkillGroupId::new("g")), comment: "not mine".into() }).expect("transferred back");
        }),
        ("taken out of the group", |store, state, _| {
            run(state, store, 6600, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 2, groups: vec![] })).expect("out of g");
        }),
        ("short of a skill the group now needs", |store, state, _| {
            let routing = GroupRouting { required_skills: vec![("fr".into(), 3)], ..GroupRouting::default() };
            run(state, store, 6600, Command::SetGroupRouting { group: SkillGroupId::new("g"), routing }).expect("needs fr");
        }),
    ];
    for (what, since) in cases {
        for rules in [17, 18] {
            let (store, mut state, conversation, offer) = missed_offer(rules);
            since(&store, &mut state, conversation);
            assert!(matches!(state.conversations[&conversation].status, ConversationStatus::Queued { offer: None, .. }), "{what}: waiting");
            let late = run(&mut state, &store, 6800, accept_at("ann", offer, 5900));
            if rules >= 18 {
                assert_eq!(late, Err(Error::OfferGone(offer)), "rules {rules}, {what}");
                assert!(matches!(state.conversations[&conversation].status, ConversationStatus::Queued { .. }), "rules {rules}, {what}: still in the queue");
                assert!(!state.operators[&ann()].active.contains(&conversation));
            } else {
                late.unwrap_or_else(|e| panic!("rules 17, {what}: {e:?}"));
                assert_eq!(state.conversations[&conversation].assigned(), Some(&ann()), "rules {rules}, {what}: as rules 17 decided");
            }
        }
    }
    // Still an operator of the group with the skills it needs: her late accept counts
    // under rules 18 as under 9 (the first test of this file).
    let (store, mut state, conversation, offer) = missed_offer(18);
    run(&mut state, &store, 6600, Command::SetOperatorSkills { operator: ann(), skills: vec![("fr".into(), 4)] }).expect("skills");
    let routing = GroupRouting { required_skills: vec![("fr".into(), 3)], ..GroupRouting::default() };
    run(&mut state, &store, 6650, Command::SetGroupRouting { group: SkillGroupId::new("g"), routing }).expect("needs fr");
    run(&mut state, &store, 6700, accept_at("ann", offer, 5900)).expect("she has what it needs");
    assert_eq!(state.conversations[&conversation].assigned(), Some(&ann()));
}

/// Under rules 18 a late accept is weighed at the routing step its offer was made at,
/// not at the step the conversation has reached by the time it commits (a pending
/// offer made through a step's overflow may be accepted after the next step began); and
/// an operator who held the conversation before it was queued again may take it.
#[test]
fn under_rules_18_a_late_accept_counts_at_its_offer_s_step_and_after_an_earlier_hold() {
    let ok = |r: Result<(), Error>| r.expect("accepted");
    // Group `g2` has no operators of its own: from 500 ms its queue overflows into `g`
    // (Ann's group), from 3000 ms it needs a skill Ann lacks, and no overflow.
    let (store, mut state) = setup(18);
    ok(run(&mut state, &store, 1000, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g2"), name: "g2".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 })));
    ok(run(&mut state, &store, 1000, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web2"), kind: "web".into(), name: "web2".into(), default_group: SkillGroupId::new("g2") })));
    let steps = vec![
        RoutingStep { after_ms: 500, skills: None, max_level: 0, overflow: vec![SkillGroupId::new("g")] },
        RoutingStep { after_ms: 3000, skills: Some(vec![("fr".into(), 3)]), max_level: 0, overflow: vec![] },
    ];
    ok(run(&mut state, &store, 1000, Command::SetGroupSteps { group: SkillGroupId::new("g2"), steps }));
    ok(run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web2"), group: None, visitor: Visitor::default() }));
    assert!(state.offers.is_empty(), "nobody of g2's own");
    ok(run(&mut state, &store, 1500, Command::RouteQueue { group: SkillGroupId::new("g2") }));
    let offer = state.offers.values().next().expect("offered to ann through the overflow").clone();
    assert_eq!((offer.operator.as_str(), offer.deadline), ("ann", Timestamp(6500)));
    ok(run(&mut state, &store, 6600, Command::ExpireOffer { offer: offer.id }));
    // At 6700 the conversation is at step 2, which Ann is not fit for; her answer
    // reached the server at 6400, under step 1's offer.
    ok(run(&mut state, &store, 6700, accept_at("ann", offer.id, 6400)));
    assert_eq!(state.conversations[&offer.conversation].assigned(), Some(&OperatorId::new("ann")));

    // Ann held a conversation; a supervisor put it back in the queue; it was offered to
    // her again and the offer expired under her late accept: it counts.
    let (store, mut state) = setup(18);
    ok(run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    let first = state.offers.values().next().expect("offered").id;
    ok(run(&mut state, &store, 1100, Command::AcceptOffer { operator: OperatorId::new("ann"), offer: first }));
    let conversation = *state.operators[&OperatorId::new("ann")].active.iter().next().expect("hers");
    ok(run(&mut state, &store, 1200, Command::Reassign { by: "sue".into(), conversation, target: TransferTarget::Group(SkillGroupId::new("g")), comment: String::new() }));
    let again = state.offers.values().find(|o| o.conversation == conversation).expect("offered to ann again").clone();
    ok(run(&mut state, &store, again.deadline.0 + 100, Command::ExpireOffer { offer: again.id }));
    ok(run(&mut state, &store, again.deadline.0 + 200, accept_at("ann", again.id, again.deadline.0 - 100)));
    assert_eq!(state.conversations[&conversation].assigned(), Some(&OperatorId::new("ann")));
}

#[test]
fn under_rules_8_an_accept_after_the_expiry_is_refused_whenever_it_arrived() {
    let (store, mut state, _, offer) = missed_offer(8);
    assert_eq!(run(&mut state, &store, 6700, accept_at("ann", offer, 5900)), Err(Error::OfferGone(offer)));
}

#[test]
fn a_late_accept_does_not_undo_a_decline_or_the_operator_s_own_away() {
    // Declined at 5000 (before the deadline): the decline stands.
    let (store, mut state) = setup(9);
    run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }).expect("started");
    let offer = state.offers.values().next().expect("offered").id;
    run(&mut state, &store, 5000, Command::DeclineOffer { operator: OperatorId::new("ann"), offer, reason: String::new() }).expect("declined");
    assert_eq!(run(&mut state, &store, 6700, accept_at("ann", offer, 4900)), Err(Error::OfferGone(offer)));

    // Expired, then Ann took a break and set herself away: her late accept does not
    // bring her back.
    let (store, mut state, conversation, offer) = missed_offer(9);
    run(&mut state, &store, 6600, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Break }).expect("break");
    run(&mut state, &store, 6650, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Away }).expect("away");
    assert!(state.offers.is_empty(), "nobody else to offer it to");
    assert_eq!(run(&mut state, &store, 6700, accept_at("ann", offer, 5900)), Err(Error::OfferGone(offer)));
    assert!(state.conversations[&conversation].assigned().is_none());
}

/// Rules 12: an offer pending when a new leader began (its blank entry applied) does
/// not set Ann away when it expires, even on time: the change of leader, not Ann, may
/// have kept her answer back. An offer made after the new leader began still does.
/// Under rules 11 a new leader changes nothing.
#[test]
fn under_rules_12_an_offer_pending_across_a_change_of_leader_does_not_set_the_operator_away() {
    assert!(RULES_VERSION >= 12);
    let presence = |state: &ShardState| state.operators[&OperatorId::new("ann")].presence;
    for (rules, across, away) in [(12, true, false), (12, false, true), (11, true, true)] {
        let (store, mut state) = setup(rules);
        run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }).expect("started");
        let offer = state.offers.values().next().expect("offered").id;
        if across {
            records::leader_began(&mut state, &store);
        }
        // The new leader's timer fires on time: not late enough to count as a stall.
        let mut rebuilt = records::load(&store).expect("load");
        assert_eq!(rebuilt.offers_across_leaders.contains(&offer), across && rules >= 12, "rules {rules}: kept in the records");
        run(&mut rebuilt, &store, 6000, Command::ExpireOffer { offer }).expect("expired");
        assert!(rebuilt.offers.is_empty(), "rules {rules}: withdrawn");
        let expected = if away { Presence::Away } else { Presence::Online };
        assert_eq!(presence(&rebuilt), expected, "rules {rules}, pending across a leader change: {across}");
        // The mark goes with its offer, from memory and from the records.
        assert!(rebuilt.offers_across_leaders.is_empty());
        assert!(records::load(&store).expect("load").offers_across_leaders.is_empty(), "rules {rules}: its record is deleted");
        let _ = state;
    }
    // An offer made after the new leader began is missed as before.
    let (store, mut state) = setup(12);
    records::leader_began(&mut state, &store);
    run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }).expect("started");
    let offer = state.offers.values().next().expect("offered").id;
    run(&mut state, &store, 6000, Command::ExpireOffer { offer }).expect("expired");
    assert_eq!(presence(&state), Presence::Away);
}
