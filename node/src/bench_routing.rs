//! `switchboard bench --routing`: the routing core alone, at the scale of issue 10's
//! budget: 1,000 online operators in 50 skill groups, every one of them full, and
//! 10,000 queued conversations with priorities (a VIP attribute rule and ageing), with
//! the rules of rules 6 switched on: every operator has a skill level the groups
//! require (the best match ranks first), each group has a relaxation step with an
//! overflow group and round-the-clock opening hours in a time zone (checked on every
//! routing pass), and channel weights are set (loads are weighed). Each
//! cycle frees one slot (an operator closes a conversation), which must turn into an
//! offer, and the operator accepts it. It measures what the core spends deciding (the
//! close and the offer it makes, then the accept), on the same code path a node applies
//! entries with (`records::run`: decide, apply, routing, record writes), against an
//! in-memory store: the node's log sync and socket delivery are measured by the other
//! bench modes.

use std::time::Instant;

use switchboard_actors::core::Reply;
use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::ShardState;

const GROUPS: usize = 50;
const OPERATORS_PER_GROUP: usize = 20;
const CAPACITY: u32 = 3;
const QUEUED: usize = 10_000;

fn run_one(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> anyhow::Result<(Reply, Vec<Event>)> {
    let (reply, outcome) = records::run(state, store, &Envelope::new(Timestamp(at), command)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((reply, outcome.events))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn run(cycles: usize) -> anyhow::Result<()> {
    let store = MemStore::default();
    let mut state = ShardState::default();
    let mut at = 1_000_000u64;
    run_one(&mut state, &store, at, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION })?;
    let routing = GroupRouting {
        attribute_priorities: vec![AttributePriority { attribute: "tier".into(), value: "vip".into(), priority: 10 }],
        ageing_ms: 60_000,
        ..GroupRouting::default()
    };
    let routing = GroupRouting { required_skills: vec![("billing".into(), 2)], ..routing };
    for g in 0..GROUPS {
        let group = SkillGroupId::new(format!("g{g}"));
        let config = SkillGroupConfig { id: group.clone(), name: group.0.clone(), policy: Policy::LongestIdle, offer_timeout_ms: 600_000, sla_ms: 60_000 };
        run_one(&mut state, &store, at, Command::UpsertSkillGroup(config))?;
        run_one(&mut state, &store, at, Command::SetGroupRouting { group: group.clone(), routing: routing.clone() })?;
        run_one(&mut state, &store, at, Command::UpsertChannel(ChannelConfig { id: ChannelId::new(format!("c{g}")), kind: "web".into(), name: "c".into(), default_group: group }))?;
    }
    // Rules 6 on every group: a step after ten minutes that relaxes the level and
    // overflows into the next group, and opening hours of every day, all day, in Moscow.
    let hours = OpeningHours {
        time_zone: "Europe/Moscow".into(),
        weekly: (0..7).map(|d| (d, 0, 1440)).collect(),
        holidays: vec![],
        closed_action: ClosedAction::Wait,
        message: String::new(),
    };
    for g in 0..GROUPS {
        let group = SkillGroupId::new(format!("g{g}"));
        let step = RoutingStep { after_ms: 600_000, skills: None, max_level: 1, overflow: vec![SkillGroupId::new(format!("g{}", (g + 1) % GROUPS))] };
        run_one(&mut state, &store, at, Command::SetGroupSteps { group: group.clone(), steps: vec![step] })?;
        run_one(&mut state, &store, at, Command::SetGroupHours { group, hours: Some(hours.clone()) })?;
    }
    run_one(&mut state, &store, at, Command::SetChannelWeights { weights: vec![("email".into(), 2)] })?;
    for o in 0..GROUPS * OPERATORS_PER_GROUP {
        let groups = vec![SkillGroupId::new(format!("g{}", o % GROUPS))];
        run_one(&mut state, &store, at, Command::UpsertOperator(OperatorConfig { id: OperatorId::new(format!("op{o}")), name: format!("Op {o}"), capacity: CAPACITY, groups }))?;
        let level = 2 + (o % 4) as u8;
        run_one(&mut state, &store, at, Command::SetOperatorSkills { operator: OperatorId::new(format!("op{o}")), skills: vec![("billing".into(), level)] })?;
        run_one(&mut state, &store, at, Command::SetPresence { operator: OperatorId::new(format!("op{o}")), presence: Presence::Online })?;
    }
    let started = Instant::now();
    // Fill every operator: each start is offered at once and accepted.
    let slots = GROUPS * OPERATORS_PER_GROUP * CAPACITY as usize;
    let mut held: Vec<(OperatorId, ConversationId)> = Vec::with_capacity(slots);
    let start = |state: &mut ShardState, at: u64, i: usize| -> anyhow::Result<Vec<Event>> {
        let attributes = if i % 10 == 0 { vec![("tier".to_owned(), "vip".to_owned())] } else { vec![] };
        let visitor = Visitor { id: None, name: format!("v{i}"), attributes };
        Ok(run_one(state, &store, at, Command::StartConversation { channel: ChannelId::new(format!("c{}", i % GROUPS)), group: None, visitor })?.1)
    };
    let mut i = 0;
    while held.len() < slots {
        at += 1;
        for event in start(&mut state, at, i)? {
            if let Event::OfferMade { offer, .. } = event {
                let (operator, conversation) = (offer.operator.clone(), offer.conversation);
                run_one(&mut state, &store, at, Command::AcceptOffer { operator: operator.clone(), offer: offer.id })?;
                held.push((operator, conversation));
            }
        }
        i += 1;
    }
    for _ in 0..QUEUED {
        at += 1;
        start(&mut state, at, i)?;
        i += 1;
    }
    let queued: usize = state.groups.values().map(|g| g.queue.len()).sum();
    println!("set up {} operators ({slots} slots, all full) and {queued} queued conversations in {:.1} s", GROUPS * OPERATORS_PER_GROUP, started.elapsed().as_secs_f64());

    // Each cycle: a customer arrives, the oldest held conversation closes, its operator is
    // offered the head of their group's queue (the close decides the offer) and accepts it.
    let mut to_offer = Vec::with_capacity(cycles);
    let mut to_accept = Vec::with_capacity(cycles);
    let mut missing = 0;
    let run_started = Instant::now();
    for c in 0..cycles {
        at += 5;
        // One arrival per departure keeps 10,000 waiting (not timed).
        start(&mut state, at, i)?;
        i += 1;
        let slot = c % held.len();
        let (operator, conversation) = held[slot].clone();
        let t0 = Instant::now();
        let (_, events) = run_one(&mut state, &store, at, Command::CloseByOperator { operator: operator.clone(), conversation, resolution: String::new(), tags: vec![] })
            .map_err(|e| anyhow::anyhow!("cycle {c} slot {slot}: {e}; status {:?}", state.conversations.get(&conversation).map(|c| c.status.clone())))?;
        to_offer.push(t0.elapsed().as_secs_f64() * 1000.0);
        let Some(offer) = events.iter().find_map(|e| if let Event::OfferMade { offer, .. } = e { Some(offer.clone()) } else { None }) else {
            missing += 1;
            continue;
        };
        let t1 = Instant::now();
        run_one(&mut state, &store, at, Command::AcceptOffer { operator: offer.operator.clone(), offer: offer.id })?;
        to_accept.push(t1.elapsed().as_secs_f64() * 1000.0);
        held[slot] = (offer.operator, offer.conversation);
    }
    let elapsed = run_started.elapsed().as_secs_f64();
    to_offer.sort_by(f64::total_cmp);
    to_accept.sort_by(f64::total_cmp);
    println!(
        "freed slot -> offer decided (close + routing + records): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} cycles",
        percentile(&to_offer, 0.5),
        percentile(&to_offer, 0.99),
        to_offer.last().copied().unwrap_or(0.0),
        to_offer.len()
    );
    println!("accept: p50 {:.3} ms, p99 {:.3} ms", percentile(&to_accept, 0.5), percentile(&to_accept, 0.99));
    println!(
        "assignments: {:.0} per second (one close, one offer and one accept each, one core on one thread); cycles without an offer: {missing}",
        to_accept.len() as f64 / elapsed
    );
    Ok(())
}
