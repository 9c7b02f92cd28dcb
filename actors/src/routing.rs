//! Operator selection as small named stages: eligibility -> capacity -> selector.
//!
//! Architecture invariant: a pure function of the state it is given and the time passed
//! in. It decides nothing about offers already made and never mutates state; the core
//! turns its answer into an `OfferMade` event.

use crate::model::*;
use crate::state::{Conversation, Operator, ShardState, SkillGroup};

/// The outcome of selecting for one conversation: the chosen operator (if any) and the
/// full candidate table that explains the choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub chosen: Option<OperatorId>,
    pub candidates: Vec<Candidate>,
    /// The routing step whose target was applied (rules 6; 0 without steps).
    pub step: u32,
}

/// Scores every operator of the group for `conversation` under the group's policy.
/// Scores of a better skill match outrank any tie-breaker score.
const SKILL_WEIGHT: i64 = 10_000_000_000_000_000;

/// The routing step a queued conversation is at as of `now` (rules 6): how many of its
/// group's steps it has waited into since it entered the queue; 0 before the first or
/// when the group has none.
pub fn step_at(state: &ShardState, group: &SkillGroup, conversation: &Conversation, now: Timestamp) -> u32 {
    let Some(steps) = steps_of(state, group) else { return 0 };
    let waited = now.millis_since(queued_since(state, conversation));
    steps.iter().take_while(|s| s.after_ms <= waited).count() as u32
}

/// When a queued conversation reaches its next routing step, if it has one to reach.
pub fn next_step_at(state: &ShardState, group: &SkillGroup, conversation: &Conversation, now: Timestamp) -> Option<Timestamp> {
    let steps = steps_of(state, group)?;
    let next = steps.get(step_at(state, group, conversation, now) as usize)?;
    Some(queued_since(state, conversation).plus_ms(next.after_ms))
}

fn steps_of<'a>(state: &'a ShardState, group: &SkillGroup) -> Option<&'a Vec<RoutingStep>> {
    if state.rules < 6 {
        return None;
    }
    state.group_steps.get(&group.config.id)
}

fn queued_since(state: &ShardState, conversation: &Conversation) -> Timestamp {
    state.queued_since.get(&conversation.id).copied().unwrap_or(conversation.created_at)
}

/// The groups whose operators may take a conversation of `group` at `step`: the group
/// itself, then its overflow groups there (rules 6).
pub fn step_groups<'a>(state: &'a ShardState, group: &'a SkillGroup, step: u32) -> Vec<&'a SkillGroupId> {
    let mut groups = vec![&group.config.id];
    if let Some(s) = steps_of(state, group).and_then(|steps| steps.get((step as usize).checked_sub(1)?)) {
        groups.extend(s.overflow.iter().filter(|g| **g != group.config.id));
    }
    groups
}

/// The skills (name, minimum level) a conversation of `group` needs (rules 5): the
/// group's, plus those of the group's skill rules its visitor matches; the highest
/// level wins where several name one skill. From rules 6 a routing step past 0 may
/// replace the group's own skills and cap every level.
pub fn requirements_at(state: &ShardState, group: &SkillGroup, conversation: &Conversation, step: u32) -> Vec<(String, u8)> {
    if state.rules < 5 {
        return Vec::new();
    }
    let step = steps_of(state, group).and_then(|steps| steps.get((step as usize).checked_sub(1)?));
    let routing = state.group_routing.get(&group.config.id);
    let base: Vec<(String, u8)> = match (step.and_then(|s| s.skills.as_ref()), routing) {
        (Some(skills), _) => skills.clone(),
        (None, Some(r)) => r.required_skills.clone(),
        (None, None) => Vec::new(),
    };
    let mut needs: std::collections::BTreeMap<String, u8> = std::collections::BTreeMap::new();
    let rules = routing
        .into_iter()
        .flat_map(|r| r.skill_rules.iter())
        .filter(|r| conversation.visitor.attributes.iter().any(|(k, v)| *k == r.attribute && *v == r.value))
        .map(|r| (r.skill.clone(), r.level));
    for (skill, level) in base.into_iter().chain(rules) {
        let at = needs.entry(skill).or_insert(0);
        *at = (*at).max(level);
    }
    let cap = step.map_or(0, |s| s.max_level);
    needs.into_iter().map(|(skill, level)| (skill, if cap > 0 { level.min(cap) } else { level })).collect()
}

pub fn select_operator(state: &ShardState, group: &SkillGroup, conversation: &Conversation, now: Timestamp) -> Selection {
    select_at_step(state, group, conversation, now, step_at(state, group, conversation, now))
}

/// Selection as it would be at routing `step`: the step's skills, and the operators of
/// the group and of the step's overflow groups.
pub fn select_at_step(state: &ShardState, group: &SkillGroup, conversation: &Conversation, now: Timestamp, step: u32) -> Selection {
    let needs = requirements_at(state, group, conversation, step);
    let groups = step_groups(state, group, step);
    let weight = state.weight_of(&conversation.channel);
    let mut candidates: Vec<Candidate> = state
        .operators
        .values()
        .filter(|op| groups.iter().any(|g| op.config.groups.contains(g)))
        .map(|op| {
            let wrapping_up = state.rules >= 5 && state.wrap_up.get(&op.config.id).is_some_and(|until| *until > now);
            let load = state.load_of(op);
            let full = load.saturating_add(weight) > op.config.capacity;
            let skills = state.operator_skills.get(&op.config.id);
            let missing = needs.iter().any(|(skill, min)| skills.and_then(|s| s.get(skill)).is_none_or(|level| level < min));
            // Channel limits and skills come after the overall capacity, before passes.
            let excluded = match exclusion(op, conversation, state.rules, wrapping_up, full) {
                None | Some("passed") => state
                    .channel_exclusion(op, &conversation.channel)
                    .or(missing.then_some("skill_missing"))
                    .or(exclusion(op, conversation, state.rules, wrapping_up, full)),
                other => other,
            };
            let score = match excluded {
                // The best match first (the sum of their levels in the skills it needs),
                // then the group's tie-breaker.
                None if !needs.is_empty() => {
                    let matched: i64 = needs.iter().map(|(skill, _)| i64::from(skills.and_then(|s| s.get(skill)).copied().unwrap_or(0))).sum();
                    Some(matched * SKILL_WEIGHT + score(state, group.config.policy, op, now).min(SKILL_WEIGHT - 1))
                }
                None => Some(score(state, group.config.policy, op, now)),
                Some(_) => None,
            };
            Candidate {
                operator: op.config.id.clone(),
                load,
                capacity: op.config.capacity,
                excluded: excluded.map(str::to_owned),
                score,
            }
        })
        .collect();
    // Best first; equal scores fall back to the id so every replica picks the same one.
    candidates.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.operator.cmp(&b.operator)));
    // Rules 5: a returning customer's last operator, when they can take it, comes first.
    let sticky = state.sticky.get(&conversation.id).filter(|op| candidates.iter().any(|c| &c.operator == *op && c.score.is_some()));
    let chosen = sticky.cloned().or_else(|| candidates.iter().find(|c| c.score.is_some()).map(|c| c.operator.clone()));
    Selection { chosen, candidates, step }
}

/// Why `op` could not take `conversation` of `group` under routing `step` for a reason
/// an admin may have changed since an offer was made at that step (rules 18): not an
/// operator of the groups the step reaches (`not_in_group`), or short of a skill it
/// needs there (`skill_missing`). Presence, passes, wrap-up and room are not looked at:
/// an accept of a pending offer is not held to them either, and a late accept weighs
/// presence and room on its own.
pub fn unfit(state: &ShardState, group: &SkillGroup, conversation: &Conversation, op: &Operator, step: u32) -> Option<&'static str> {
    if !step_groups(state, group, step).iter().any(|g| op.config.groups.contains(g)) {
        return Some("not_in_group");
    }
    let skills = state.operator_skills.get(&op.config.id);
    let needs = requirements_at(state, group, conversation, step);
    if needs.iter().any(|(skill, min)| skills.and_then(|s| s.get(skill)).is_none_or(|level| level < min)) {
        return Some("skill_missing");
    }
    None
}

/// Eligibility and capacity stages: why this operator cannot take the conversation, as a
/// stable code (`offline`, `away`, `on_break`, `at_capacity`, `wrap_up`, `passed`).
/// Capacity comes before passes, so `passed` always names an operator who could take it
/// in a new round.
fn exclusion(op: &Operator, conversation: &Conversation, rules: u32, wrapping_up: bool, full: bool) -> Option<&'static str> {
    if op.presence != Presence::Online {
        return Some(match op.presence {
            Presence::Away => "away",
            Presence::Break => "on_break",
            _ => "offline",
        });
    }
    let passed = conversation.passed_by.contains(&op.config.id);
    // The first rules reported a pass before capacity; decision records replay as made.
    match (full, passed) {
        (true, true) if rules < 2 => Some("passed"),
        (true, _) => Some("at_capacity"),
        (false, _) if wrapping_up => Some("wrap_up"),
        (false, true) => Some("passed"),
        (false, false) => None,
    }
}

/// Highest priority a conversation can reach (ageing included).
pub const PRIORITY_CAP: u32 = 1000;

/// A queued conversation's priority as of `now` (rules 5): its channel's, plus the
/// highest of its group's attribute rules its visitor matches, plus one level per
/// `ageing_ms` waited since it started. Higher is offered first.
pub fn priority(state: &ShardState, group: &SkillGroup, conversation: &Conversation, now: Timestamp) -> u32 {
    priority_in(state, state.group_routing.get(&group.config.id), conversation, now)
}

/// [`priority`] with the group's routing settings already looked up.
fn priority_in(state: &ShardState, routing: Option<&GroupRouting>, conversation: &Conversation, now: Timestamp) -> u32 {
    let channel = if state.channel_priority.is_empty() { 0 } else { state.channel_priority.get(&conversation.channel).copied().unwrap_or(0) };
    let Some(routing) = routing else { return channel.min(PRIORITY_CAP) };
    let attribute = routing
        .attribute_priorities
        .iter()
        .filter(|rule| conversation.visitor.attributes.iter().any(|(k, v)| *k == rule.attribute && *v == rule.value))
        .map(|rule| rule.priority)
        .max()
        .unwrap_or(0);
    let aged = match routing.ageing_ms {
        0 => 0,
        step => (now.millis_since(conversation.created_at) / step).min(PRIORITY_CAP as u64) as u32,
    };
    channel.saturating_add(attribute).saturating_add(aged).min(PRIORITY_CAP)
}

/// The group's queued conversations in the order they are offered: before rules 5 (or
/// when nothing in the group has a priority) by arrival (ticket); from rules 5 by
/// priority, highest first, then arrival.
pub fn queue_order(state: &ShardState, group: &SkillGroup, now: Timestamp) -> Vec<ConversationId> {
    let arrival = || group.queue.iter().map(|(_, id)| *id).collect();
    if state.rules < 5 || (state.channel_priority.is_empty() && !state.group_routing.contains_key(&group.config.id)) {
        return arrival();
    }
    let routing = state.group_routing.get(&group.config.id);
    let mut ranked: Vec<(u32, u64, ConversationId)> = group
        .queue
        .iter()
        .map(|(ticket, id)| (state.conversations.get(id).map_or(0, |c| priority_in(state, routing, c, now)), *ticket, *id))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().map(|(_, _, id)| id).collect()
}

/// When a conversation every available operator has passed on may start a new round of
/// offers: one offer timeout after the latest pass. `None` when it has no passes.
pub fn new_round_at(group: &SkillGroup, conversation: &Conversation) -> Option<Timestamp> {
    if conversation.passed_by.is_empty() {
        return None;
    }
    // Passes recorded before their time was kept count from the conversation's start,
    // so they are due at once rather than never.
    Some(conversation.last_pass.unwrap_or(conversation.created_at).plus_ms(group.config.offer_timeout_ms))
}

/// Selector stage. Scores are integers so that replicas never disagree on rounding.
fn score(state: &ShardState, policy: Policy, op: &Operator, now: Timestamp) -> i64 {
    let idle_ms = now.millis_since(op.idle_since).min(i64::MAX as u64 / 4) as i64;
    match policy {
        Policy::LongestIdle => idle_ms,
        Policy::LeastOccupied => {
            // Free share in per-mille dominates; idle time breaks ties within it.
            let capacity = op.config.capacity.max(1) as i64;
            let free = op.config.capacity.saturating_sub(state.load_of(op));
            let free_permille = (free as i64 * 1000) / capacity;
            free_permille * 1_000_000_000_000 + idle_ms.min(999_999_999_999)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Feed;
    use std::collections::BTreeSet;

    fn operator(id: &str, capacity: u32, active: u64, idle_since: u64, presence: Presence) -> Operator {
        Operator {
            config: OperatorConfig { id: OperatorId::new(id), name: id.into(), capacity, groups: vec![SkillGroupId::new("g")] },
            presence,
            presence_since: Timestamp(0),
            idle_since: Timestamp(idle_since),
            active: (0..active).map(ConversationId).collect(),
            offers: BTreeSet::new(),
            feed: Feed::default(),
            favourites: BTreeSet::new(),
        }
    }

    fn setup(policy: Policy, ops: Vec<Operator>) -> (ShardState, SkillGroup, Conversation) {
        let mut state = ShardState { rules: crate::core::RULES_VERSION, ..ShardState::default() };
        for op in ops {
            state.operators.insert(op.config.id.clone(), op);
        }
        let group = SkillGroup {
            config: SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy, offer_timeout_ms: 1000, sla_ms: 60_000 },
            queue: BTreeSet::new(),
        };
        let queued = crate::state::ConversationStatus::Queued { ticket: 0, offer: None };
        let conv = Conversation::new(ConversationId(100), ChannelId::new("web"), Visitor::default(), SkillGroupId::new("g"), queued, Timestamp(0));
        (state, group, conv)
    }

    #[test]
    fn longest_idle_prefers_the_oldest_idle_stretch() {
        let (state, group, conv) = setup(
            Policy::LongestIdle,
            vec![operator("a", 2, 0, 500, Presence::Online), operator("b", 2, 1, 100, Presence::Online)],
        );
        let sel = select_operator(&state, &group, &conv, Timestamp(1000));
        assert_eq!(sel.chosen, Some(OperatorId::new("b")));
    }

    #[test]
    fn least_occupied_prefers_free_share_over_idle_time() {
        let (state, group, conv) = setup(
            Policy::LeastOccupied,
            vec![operator("a", 2, 0, 900, Presence::Online), operator("b", 2, 1, 100, Presence::Online)],
        );
        let sel = select_operator(&state, &group, &conv, Timestamp(1000));
        assert_eq!(sel.chosen, Some(OperatorId::new("a")));
    }

    #[test]
    fn away_full_and_passed_operators_are_excluded_with_reasons() {
        let (state, group, mut conv) = setup(
            Policy::LongestIdle,
            vec![
                operator("away", 2, 0, 0, Presence::Away),
                operator("full", 1, 1, 0, Presence::Online),
                operator("passed", 2, 0, 0, Presence::Online),
            ],
        );
        conv.passed_by.insert(OperatorId::new("passed"));
        let sel = select_operator(&state, &group, &conv, Timestamp(1000));
        assert_eq!(sel.chosen, None);
        let reasons: Vec<_> = sel.candidates.iter().map(|c| c.excluded.clone().unwrap_or_default()).collect();
        assert_eq!(reasons, vec!["away", "at_capacity", "passed"]);
    }

    #[test]
    fn a_full_operator_who_passed_is_reported_at_capacity() {
        let (state, group, mut conv) = setup(Policy::LongestIdle, vec![operator("full", 1, 1, 0, Presence::Online)]);
        conv.passed_by.insert(OperatorId::new("full"));
        conv.last_pass = Some(Timestamp(400));
        let sel = select_operator(&state, &group, &conv, Timestamp(1000));
        assert_eq!(sel.candidates[0].excluded.as_deref(), Some("at_capacity"));
        assert_eq!(new_round_at(&group, &conv), Some(Timestamp(1400)));
    }
}
