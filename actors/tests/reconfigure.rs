//! Rules 10: a change of what an operator may take withdraws their pending offers, so an
//! offer made under the old capacity, groups or channel settings cannot be accepted
//! past the new ones (I3: no operator over capacity).

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::ShardState;
use switchboard_actors::Error;

fn run(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> Result<(), Error> {
    records::run(state, store, &Envelope::new(Timestamp(at), command)).map(|_| ())
}

fn ann() -> OperatorId {
    OperatorId::new("ann")
}

fn ann_config(capacity: u32) -> OperatorConfig {
    OperatorConfig { id: ann(), name: "Ann".into(), capacity, groups: vec![SkillGroupId::new("g")] }
}

/// Ann online with capacity 2, and two conversations offered to her, under `rules`.
fn two_offers(rules: u32) -> (MemStore, ShardState, Vec<OfferId>) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    let ok = |r: Result<(), Error>| r.expect("accepted");
    ok(run(&mut state, &store, 1000, Command::AdoptRules { version: rules }));
    ok(run(&mut state, &store, 1000, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 60_000 })));
    ok(run(&mut state, &store, 1000, Command::UpsertOperator(ann_config(2))));
    ok(run(&mut state, &store, 1000, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, 1000, Command::SetPresence { operator: ann(), presence: Presence::Online }));
    for _ in 0..2 {
        ok(run(&mut state, &store, 1000, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    }
    let offers: Vec<OfferId> = state.offers.keys().copied().collect();
    assert_eq!(offers.len(), 2, "both offered to ann");
    (store, state, offers)
}

fn held(state: &ShardState) -> usize {
    state.operators.get(&ann()).map_or(0, |op| op.active.len())
}

#[test]
fn lowering_an_operator_s_capacity_withdraws_the_offers_made_under_the_old_one() {
    let (store, mut state, offers) = two_offers(10);
    run(&mut state, &store, 2000, Command::UpsertOperator(ann_config(1))).expect("reconfigured");
    // Routing offers her again what fits the new capacity: one conversation.
    assert_eq!(state.offers.len(), 1, "{:?}", state.offers);
    for offer in &offers {
        assert!(!state.offers.contains_key(offer), "an offer made under capacity 2 is gone");
        assert_eq!(run(&mut state, &store, 2100, Command::AcceptOffer { offer: *offer, operator: ann() }), Err(Error::OfferGone(*offer)));
    }
    let again = *state.offers.keys().next().expect("offered again");
    run(&mut state, &store, 2200, Command::AcceptOffer { offer: again, operator: ann() }).expect("accepted");
    assert_eq!(held(&state), 1, "never over the capacity of 1");
    // Unchanged settings withdraw nothing.
    run(&mut state, &store, 2300, Command::UpsertOperator(ann_config(1))).expect("same");
    assert_eq!(held(&state), 1);
    // What the records say is what the state says.
    assert_eq!(records::load(&store).expect("load").offers, state.offers);
}

#[test]
fn under_rules_9_the_old_offers_stay_and_replay_as_they_did() {
    let (store, mut state, offers) = two_offers(9);
    run(&mut state, &store, 2000, Command::UpsertOperator(ann_config(1))).expect("reconfigured");
    assert_eq!(state.offers.keys().copied().collect::<Vec<_>>(), offers, "decided as it was under the rules of its time");
}

#[test]
fn changing_an_operator_s_channels_or_the_weights_withdraws_their_offers() {
    let (store, mut state, offers) = two_offers(10);
    let limits = ChannelLimits { per_kind: vec![("web".into(), 1)], only: vec![] };
    run(&mut state, &store, 2000, Command::SetOperatorChannels { operator: ann(), limits }).expect("set");
    assert!(offers.iter().all(|o| !state.offers.contains_key(o)), "offers made before the limit are gone");
    assert_eq!(state.offers.len(), 1, "one web conversation offered again within the limit of 1");
    let before: Vec<OfferId> = state.offers.keys().copied().collect();
    // The same limits again (an admin form saving everything) withdraw nothing.
    let limits = ChannelLimits { per_kind: vec![("web".into(), 1)], only: vec![] };
    run(&mut state, &store, 2050, Command::SetOperatorChannels { operator: ann(), limits }).expect("same");
    assert_eq!(state.offers.keys().copied().collect::<Vec<_>>(), before);
    run(&mut state, &store, 2100, Command::SetChannelWeights { weights: vec![("web".into(), 2), ("email".into(), 1)] }).expect("weights");
    assert!(before.iter().all(|o| !state.offers.contains_key(o)), "offers made under the old weights are gone");
    // The same weights saved again (a weight of 1 is not kept) and the same limits in
    // another order change nothing: nothing is withdrawn.
    let before: Vec<OfferId> = state.offers.keys().copied().collect();
    run(&mut state, &store, 2200, Command::SetChannelWeights { weights: vec![("email".into(), 1), ("web".into(), 2)] }).expect("same weights");
    let limits = ChannelLimits { per_kind: vec![("web".into(), 1)], only: vec![] };
    run(&mut state, &store, 2300, Command::SetOperatorChannels { operator: ann(), limits }).expect("same limits");
    assert_eq!(state.offers.keys().copied().collect::<Vec<_>>(), before);
}

/// Rules 15: the same for skills. Group g comes to need `billing` at level 3, which ann
/// lacks: the offers made to her before are withdrawn, and none is made again; given
/// the skill, she is offered them again. Taking her skill away withdraws them too.
/// Under rules 14 the old offers stayed, and she could accept a conversation she no
/// longer fit.
#[test]
fn a_change_of_skills_withdraws_the_offers_made_under_the_old_ones() {
    let billing = |level: u8| GroupRouting { required_skills: vec![("billing".into(), level)], ..GroupRouting::default() };
    let (store, mut state, offers) = two_offers(15);
    run(&mut state, &store, 2000, Command::SetGroupRouting { group: SkillGroupId::new("g"), routing: billing(3) }).expect("set");
    assert!(state.offers.is_empty(), "the offers made before the group needed billing are withdrawn: {:?}", state.offers);
    assert_eq!(run(&mut state, &store, 2100, Command::AcceptOffer { offer: offers[0], operator: ann() }), Err(Error::OfferGone(offers[0])));
    // Given the skill, she is offered both again.
    run(&mut state, &store, 2200, Command::SetOperatorSkills { operator: ann(), skills: vec![("billing".into(), 4)] }).expect("skilled");
    assert_eq!(state.offers.len(), 2, "with the skill she is offered both again: {:?}", state.offers);
    let again: Vec<OfferId> = state.offers.keys().copied().collect();
    run(&mut state, &store, 2300, Command::SetGroupRouting { group: SkillGroupId::new("g"), routing: billing(3) }).expect("same");
    assert_eq!(state.offers.keys().copied().collect::<Vec<_>>(), again, "unchanged needs withdraw nothing");
    // Her skill taken away: withdrawn, and not offered to her again.
    run(&mut state, &store, 2400, Command::SetOperatorSkills { operator: ann(), skills: vec![("billing".into(), 1)] }).expect("deskilled");
    assert!(state.offers.is_empty(), "{:?}", state.offers);
    assert_eq!(run(&mut state, &store, 2500, Command::AcceptOffer { offer: again[0], operator: ann() }), Err(Error::OfferGone(again[0])));
    assert_eq!(held(&state), 0);

    // Rules 14, as a log written then replays: the offers stay, and are accepted.
    let (store, mut state, offers) = two_offers(14);
    run(&mut state, &store, 2000, Command::SetGroupRouting { group: SkillGroupId::new("g"), routing: billing(3) }).expect("set");
    assert_eq!(state.offers.len(), 2);
    run(&mut state, &store, 2100, Command::AcceptOffer { offer: offers[0], operator: ann() }).expect("accepted under rules 14");
}

/// Rules 15: a supervisor may give a queued conversation to the operator it is offered
/// to, even when that offer is what fills their desk: the reassignment withdraws it, so
/// it takes no room. Under rules 14 it was refused `capacity_exceeded`.
#[test]
fn a_conversation_can_be_reassigned_to_the_operator_it_is_offered_to() {
    for rules in [15, 14] {
        let (store, mut state, offers) = two_offers(rules);
        let conversation = state.offers[&offers[0]].conversation;
        let reassign = Command::Reassign { by: "sue".into(), conversation, target: TransferTarget::Operator(ann()), comment: String::new() };
        let answer = run(&mut state, &store, 2000, reassign);
        if rules >= 15 {
            answer.expect("reassigned");
            assert!(!state.offers.contains_key(&offers[0]), "its offer is withdrawn");
            assert_eq!(held(&state), 1);
            let load = state.operators.get(&ann()).map_or(0, |op| op.load());
            assert!(load <= 2, "never over capacity: {load}");
        } else {
            assert_eq!(answer, Err(Error::CapacityExceeded(ann())), "rules {rules}");
        }
    }
}

/// Rules 18: a change of a channel's kind withdraws the offers of every operator who
/// holds one of its conversations, whose load it moves. Here a `chat` conversation Ann
/// holds becomes `voice` (weight 3): under rules 17 the offer of a second chat,
/// made under the old weight, was still accepted and she held a load of 4 on a
/// capacity of 3 (I3).
#[test]
fn a_channel_that_changes_kind_withdraws_the_offers_of_those_holding_its_conversations() {
    for rules in [17, 18] {
        let store = MemStore::default();
        let mut state = ShardState::default();
        let ok = |r: Result<(), Error>| r.expect("accepted");
        ok(run(&mut state, &store, 1000, Command::AdoptRules { version: rules }));
        ok(run(&mut state, &store, 1000, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 60_000 })));
        ok(run(&mut state, &store, 1000, Command::UpsertOperator(ann_config(3))));
        ok(run(&mut state, &store, 1000, Command::SetChannelWeights { weights: vec![("voice".into(), 3)] }));
        for channel in ["c1", "c2"] {
            ok(run(&mut state, &store, 1000, Command::UpsertChannel(ChannelConfig { id: ChannelId::new(channel), kind: "chat".into(), name: channel.into(), default_group: SkillGroupId::new("g") })));
        }
        ok(run(&mut state, &store, 1000, Command::SetPresence { operator: ann(), presence: Presence::Online }));
        ok(run(&mut state, &store, 1100, Command::StartConversation { channel: ChannelId::new("c1"), group: None, visitor: Visitor::default() }));
        let first = *state.offers.keys().next().expect("offered");
        ok(run(&mut state, &store, 1200, Command::AcceptOffer { offer: first, operator: ann() }));
        ok(run(&mut state, &store, 1300, Command::StartConversation { channel: ChannelId::new("c2"), group: None, visitor: Visitor::default() }));
        let second = *state.offers.keys().next().expect("the second offered to ann");
        // c1 becomes voice: the conversation Ann holds now weighs 3, her whole capacity.
        ok(run(&mut state, &store, 1400, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("c1"), kind: "voice".into(), name: "c1".into(), default_group: SkillGroupId::new("g") })));
        let taken = run(&mut state, &store, 1500, Command::AcceptOffer { offer: second, operator: ann() });
        let op = &state.operators[&ann()];
        if rules >= 18 {
            assert_eq!(taken, Err(Error::OfferGone(second)), "rules {rules}");
            assert!(state.offers.is_empty(), "rules {rules}: nothing fits her now");
            assert!(state.load_of(op) <= op.config.capacity, "rules {rules}: within capacity (I3)");
        } else {
            taken.expect("rules 17 took it");
            assert_eq!((state.load_of(op), op.config.capacity), (4, 3), "rules {rules}: over capacity, as rules 17 decided");
        }
    }
}
