//! What the workstation's second pass reads from the shard: internal notes (staff only,
//! written once per key, also on a closed conversation), an admin's user edit that
//! keeps the password, the conversations an operator handled (newest first, gone with
//! their conversation), and each group's KPI counters, all rebuilt the same from the
//! records.

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::{GroupKpi, HistoryItem, ShardState, HOUR_MS};
use switchboard_actors::Error;

fn run(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> Result<(switchboard_actors::core::Reply, Vec<Event>), Error> {
    let (reply, outcome) = records::run(state, store, &Envelope::new(Timestamp(at), command))?;
    Ok((reply, outcome.events))
}

fn ok(r: Result<(switchboard_actors::core::Reply, Vec<Event>), Error>) -> Vec<Event> {
    r.expect("accepted").1
}

const T0: u64 = 100 * HOUR_MS;

/// Group `g` (SLA 20 s) with operator `ann` online (capacity 3) and channel `web`.
fn floor() -> (MemStore, ShardState) {
    floor_under(switchboard_actors::core::RULES_VERSION)
}

/// [`floor`] under routing rules `rules`.
fn floor_under(rules: u32) -> (MemStore, ShardState) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    ok(run(&mut state, &store, T0, Command::AdoptRules { version: rules }));
    ok(run(&mut state, &store, T0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "G".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 20_000 })));
    ok(run(&mut state, &store, T0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 3, groups: vec![SkillGroupId::new("g")] })));
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    (store, state)
}

fn start(state: &mut ShardState, store: &MemStore, at: u64) -> ConversationId {
    let before = state.next_conversation;
    ok(run(state, store, at, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    state.conversations.keys().copied().find(|id| id.0 >= before).expect("started")
}

/// Ann goes online at `at` and accepts whatever is offered to her.
fn ann_takes_all(state: &mut ShardState, store: &MemStore, at: u64) {
    ok(run(state, store, at, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    let offers: Vec<OfferId> = state.offers.keys().copied().collect();
    for offer in offers {
        ok(run(state, store, at, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    }
}

#[test]
fn kpis_count_answers_waits_handle_times_abandons_and_ratings_per_hour() {
    let (store, mut state) = floor();
    let quick = start(&mut state, &store, T0 + 1_000);
    let slow = start(&mut state, &store, T0 + 2_000);
    let gone = start(&mut state, &store, T0 + 3_000);
    // The visitor of `gone` leaves before anyone answers: abandoned.
    ok(run(&mut state, &store, T0 + 4_000, Command::CloseByClient { conversation: gone }));
    // Ann answers both at T0 + 11 s: waits of 10 s (within the 20 s SLA) and 9 s.
    ann_takes_all(&mut state, &store, T0 + 11_000);
    assert_eq!(state.operators[&OperatorId::new("ann")].active.len(), 2);
    // `slow` was started 2 s in; answered at 11 s. Close both later; one is rated 4.
    ok(run(&mut state, &store, T0 + 71_000, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: quick, resolution: "done".into(), tags: vec![] }));
    ok(run(&mut state, &store, T0 + 131_000, Command::CloseByClient { conversation: slow }));
    ok(run(&mut state, &store, T0 + 132_000, Command::Rate { conversation: slow, score: 4, comment: String::new() }));

    let expected = GroupKpi {
        entered: 3,
        answered: 2,
        wait_ms: 10_000 + 9_000,
        answered_in_sla: 2,
        handled: 2,
        timed: 2,
        handle_ms: 60_000 + 120_000,
        abandoned: 1,
        rated: 1,
        rating_sum: 4,
    };
    let g = SkillGroupId::new("g");
    assert_eq!(state.kpis_since(T0 / HOUR_MS)[&g], expected);
    assert_eq!(state.kpis_since(T0 / HOUR_MS + 1)[&g], GroupKpi::default(), "nothing happened in the next hour");
    assert!(state.answered_at.is_empty(), "closed conversations keep no answer time");
    // Every replica rebuilds the same counters from the records.
    assert_eq!(records::load(&store).expect("load").kpis_since(0)[&g], expected);
}

#[test]
fn an_answer_after_the_sla_counts_against_it_and_old_hours_go() {
    let (store, mut state) = floor();
    start(&mut state, &store, T0);
    ann_takes_all(&mut state, &store, T0 + 25_000);
    let g = SkillGroupId::new("g");
    let kpi = &state.kpis_since(0)[&g];
    assert_eq!((kpi.answered, kpi.answered_in_sla), (1, 0), "25 s is past the 20 s SLA");
    // Eight days later a new hour starts: the first hour's counters are dropped, in
    // memory and in the records.
    let later = T0 + 8 * 24 * HOUR_MS;
    start(&mut state, &store, later);
    assert_eq!(state.kpis[&g].len(), 1, "{:?}", state.kpis[&g].keys().collect::<Vec<_>>());
    assert_eq!(records::load(&store).expect("load").kpis[&g].len(), 1);
}

#[test]
fn a_note_is_written_once_per_key_also_on_a_closed_conversation() {
    let (store, mut state) = floor();
    let id = start(&mut state, &store, T0);
    ann_takes_all(&mut state, &store, T0 + 1_000);
    ok(run(&mut state, &store, T0 + 2_000, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: id, resolution: String::new(), tags: vec![] }));
    assert!(!state.conversations.contains_key(&id), "closed: it left the hot state");
    let note = |key: &str, text: &str| Command::AddNote { conversation: id, author: "super".into(), name: "Sue".into(), key: key.into(), text: text.into() };
    let (first, events) = run(&mut state, &store, T0 + 3_000, note("n-1", "Called back, resolved by phone")).expect("noted");
    assert_eq!(events.len(), 1);
    let (again, events) = run(&mut state, &store, T0 + 4_000, note("n-1", "Called back, resolved by phone")).expect("duplicate");
    assert!(events.is_empty(), "a retry writes nothing");
    let seq = |r: &switchboard_actors::core::Reply| match r {
        switchboard_actors::core::Reply::Message { seq, duplicate } => (*seq, *duplicate),
        other => panic!("{other:?}"),
    };
    assert_eq!(seq(&again), (seq(&first).0, true));
    assert!(matches!(run(&mut state, &store, T0 + 5_000, note("n-2", "  ")), Err(Error::Invalid(_))), "an empty note is refused");
    let history = records::history(&store, id, 0, 100).expect("history");
    let notes: Vec<&HistoryItem> = history.iter().map(|e| &e.item).filter(|i| matches!(i, HistoryItem::Note { .. })).collect();
    assert_eq!(notes, vec![&HistoryItem::Note { author: "super".into(), name: "Sue".into(), key: "n-1".into(), text: "Called back, resolved by phone".into() }]);
}

#[test]
fn an_edit_without_a_password_keeps_it_and_ends_sessions_only_when_role_or_operator_change() {
    let (store, mut state) = floor();
    let user = UserRecord { login: "ann".into(), password_hash: "$argon2id$kept".into(), role: Role::Operator, operator: Some(OperatorId::new("ann")) };
    ok(run(&mut state, &store, T0, Command::UpsertUser(user)));
    // The same role and operator again: nothing to end.
    let events = ok(run(&mut state, &store, T0 + 1, Command::UpdateUser { login: "ann".into(), role: Role::Operator, operator: Some(OperatorId::new("ann")) }));
    assert!(!events.iter().any(|e| matches!(e, Event::SessionsEnded { .. })), "{events:?}");
    // A new role ends the sessions of the old one for good: undoing the change later
    // does not bring their tokens back.
    let events = ok(run(&mut state, &store, T0 + 2, Command::UpdateUser { login: "ann".into(), role: Role::Supervisor, operator: None }));
    assert!(events.iter().any(|e| matches!(e, Event::SessionsEnded { login } if login == "ann")), "{events:?}");
    let stored = &records::load(&store).expect("load").users["ann"];
    assert_eq!((stored.password_hash.as_str(), stored.role, stored.operator.clone()), ("$argon2id$kept", Role::Supervisor, None));
    assert!(matches!(run(&mut state, &store, T0 + 2, Command::UpdateUser { login: "nobody".into(), role: Role::Admin, operator: None }), Err(Error::NotFound(_))));
}

/// Rules 19: the last admin cannot be demoted (nothing could make an admin again once
/// there are users); another admin can, and so could the last under rules 18.
#[test]
fn under_rules_19_the_last_admin_is_not_demoted() {
    for rules in [18, 19] {
        let (store, mut state) = floor_under(rules);
        let admin = |login: &str| UserRecord { login: login.into(), password_hash: "$argon2id$x".into(), role: Role::Admin, operator: None };
        ok(run(&mut state, &store, T0, Command::UpsertUser(admin("root"))));
        let demote = |login: &str| Command::UpdateUser { login: login.into(), role: Role::Supervisor, operator: None };
        let alone = run(&mut state, &store, T0 + 1, demote("root"));
        let replaced = run(&mut state, &store, T0 + 1, Command::UpsertUser(UserRecord { role: Role::Operator, ..admin("root") }));
        if rules >= 19 {
            assert!(matches!(&alone, Err(Error::Invalid(m)) if m.contains("last admin")), "{alone:?}");
            assert!(matches!(&replaced, Err(Error::Invalid(_))), "{replaced:?}");
            assert_eq!(state.users["root"].role, Role::Admin);
            // With a second admin, either may step down.
            ok(run(&mut state, &store, T0 + 2, Command::UpsertUser(admin("second"))));
            ok(run(&mut state, &store, T0 + 3, demote("root")));
            assert!(run(&mut state, &store, T0 + 4, demote("second")).is_err(), "now the last one");
        } else {
            alone.expect("rules 18 took it");
        }
    }
}

/// Rules 19: a new id is a usable path segment (a channel's also no `:` or `*`, which
/// access rules and audit targets read), a group's offer timeout and SLA are bounded,
/// and an operator's own templates are bounded. Ids made before stay usable.
#[test]
fn under_rules_19_new_ids_timeouts_and_templates_are_bounded() {
    for rules in [18, 19] {
        let (store, mut state) = floor_under(rules);
        let group = |id: &str, offer_timeout_ms: u64| Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new(id), name: "X".into(), policy: Policy::LongestIdle, offer_timeout_ms, sla_ms: 20_000 });
        let channel = |id: &str| Command::UpsertChannel(ChannelConfig { id: ChannelId::new(id), kind: "web".into(), name: "x".into(), default_group: SkillGroupId::new("g") });
        let refused = |r: Result<_, Error>| matches!(r, Err(Error::Invalid(_)));
        let checked = [
            run(&mut state, &store, T0, group("a/b", 30_000)),
            run(&mut state, &store, T0, group("x", 2 * 3_600_000)),
            run(&mut state, &store, T0, channel("web:2")),
            run(&mut state, &store, T0, channel("*")),
            run(&mut state, &store, T0, channel("..")),
            run(&mut state, &store, T0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("bo b"), name: "Bob".into(), capacity: 1, groups: vec![] })),
            run(&mut state, &store, T0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new(&"o".repeat(65)), name: "O".into(), capacity: 1, groups: vec![] })),
        ];
        assert_eq!(checked.into_iter().map(refused).collect::<Vec<_>>(), vec![rules >= 19; 7], "rules {rules}");
        // What exists is edited as before (the demo's and tests' ids are all usable).
        ok(run(&mut state, &store, T0, group("g", 45_000)));
        ok(run(&mut state, &store, T0, channel("sales.eu-1")));
        let template = |n: usize| Command::UpsertTemplate(Template { id: format!("t{n}"), title: "T".into(), text: "Hello".into(), group: None, owner: Some(OperatorId::new("ann")) });
        for n in 0..200 {
            ok(run(&mut state, &store, T0, template(n)));
        }
        let past = run(&mut state, &store, T0, template(200));
        assert_eq!(refused(past), rules >= 19, "rules {rules}: the 201st of one operator");
        ok(run(&mut state, &store, T0, template(7)));
    }
}

#[test]
fn an_operators_handled_list_is_newest_first_and_follows_retention() {
    let (store, mut state) = floor();
    let ids: Vec<ConversationId> = (0..3).map(|i| start(&mut state, &store, T0 + i)).collect();
    ann_takes_all(&mut state, &store, T0 + 10);
    for id in &ids {
        ok(run(&mut state, &store, T0 + 20, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: *id, resolution: String::new(), tags: vec![] }));
    }
    let ann = OperatorId::new("ann");
    let newest_first: Vec<ConversationId> = ids.iter().rev().copied().collect();
    assert_eq!(records::handled_by(&store, &ann, None, 10).expect("list"), newest_first);
    assert_eq!(records::handled_by(&store, &ann, Some(ids[2]), 1).expect("page"), vec![ids[1]]);
    // A one-day retention deletes them, and the list with them.
    ok(run(&mut state, &store, T0 + 30, Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 }));
    ok(run(&mut state, &store, T0 + 2 * 24 * HOUR_MS, Command::PurgeExpired { as_of: Timestamp(T0 + 2 * 24 * HOUR_MS) }));
    assert_eq!(records::handled_by(&store, &ann, None, 10).expect("list"), vec![]);
}

#[test]
fn break_time_is_counted_per_reason_and_kept_as_records() {
    let (store, mut state) = floor();
    ok(run(&mut state, &store, T0, Command::SetPauseReasons { reasons: vec!["lunch".into(), "training".into()] }));
    ok(run(&mut state, &store, T0, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    ok(run(&mut state, &store, T0 + 1_000, Command::TakeBreak { operator: OperatorId::new("ann"), reason: "lunch".into() }));
    ok(run(&mut state, &store, T0 + 1_801_000, Command::TakeBreak { operator: OperatorId::new("ann"), reason: "training".into() }));
    ok(run(&mut state, &store, T0 + 2_401_000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    // A plain break (no reason) counts nowhere.
    ok(run(&mut state, &store, T0 + 2_500_000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Break }));
    ok(run(&mut state, &store, T0 + 2_600_000, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    let expected: std::collections::BTreeMap<String, u64> = [("lunch".to_owned(), 1_800_000), ("training".to_owned(), 600_000)].into();
    assert_eq!(state.pauses_since(0)[&OperatorId::new("ann")], expected);
    let rebuilt = records::load(&store).expect("load");
    assert_eq!(rebuilt.pauses_since(0)[&OperatorId::new("ann")], expected);
    assert_eq!(rebuilt.pause_reasons, vec!["lunch".to_owned(), "training".to_owned()]);
    assert!(!rebuilt.presence_reasons.contains_key(&OperatorId::new("ann")), "back online: no reason stands");
}

#[test]
fn an_emergency_and_its_audit_trail_survive_a_restart() {
    let (store, mut state) = floor();
    let web = NoticeTarget::Channel(ChannelId::new("web"));
    ok(run(&mut state, &store, T0, Command::SetEmergency { target: web.clone(), message: Some("Outage".into()), by: "sue".into() }));
    let id = start(&mut state, &store, T0 + 1);
    let history = records::history(&store, id, 0, 10).expect("history");
    assert!(history.iter().any(|e| e.item == HistoryItem::Notice { text: "Outage".into() }), "{history:?}");
    let rebuilt = records::load(&store).expect("load");
    assert_eq!(rebuilt.emergencies[&web].message, "Outage");
    ok(run(&mut state, &store, T0 + 2, Command::SetEmergency { target: web.clone(), message: None, by: "sue".into() }));
    let trail = records::audit(&store, None, 10).expect("audit");
    let actions: Vec<(u64, &str)> = trail.iter().map(|(n, e)| (*n, e.action.as_str())).collect();
    assert_eq!(actions, vec![(1, "emergency_off"), (0, "emergency_on")], "newest first");
    assert_eq!(trail[1].1.by, "sue");
    // Paged: the entries below a page's last number.
    let older = records::audit(&store, Some(1), 10).expect("audit");
    assert_eq!(older.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![0]);
    assert!(records::audit(&store, Some(0), 10).expect("audit").is_empty());
    // A restarted replica numbers the next entry after the last one.
    let rebuilt = records::load(&store).expect("load");
    assert!(rebuilt.emergencies.is_empty());
    assert_eq!(rebuilt.audit_next, 2);
}

#[test]
fn a_blocked_visitor_starts_and_writes_nothing_until_unblocked() {
    let (store, mut state) = floor();
    let visitor = Visitor { id: Some("v-mallory".into()), name: "M".into(), attributes: vec![] };
    let before = state.next_conversation;
    ok(run(&mut state, &store, T0, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor.clone() }));
    let id = state.conversations.keys().copied().find(|c| c.0 >= before).expect("started");
    let rule = AccessRule { list: AccessList::Block, channel: None, kind: AccessKind::Visitor, value: "v-mallory".into() };
    ok(run(&mut state, &store, T0 + 1, Command::SetAccessRule { rule: rule.clone(), note: Some("abuse".into()), by: "sue".into() }));
    let start = || Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor.clone() };
    assert!(matches!(run(&mut state, &store, T0 + 2, start()), Err(Error::Blocked(_))));
    let say = Command::PostClientMessage { conversation: id, key: "k".into(), text: "hi".into(), attachments: vec![] };
    assert!(matches!(run(&mut state, &store, T0 + 3, say.clone()), Err(Error::Blocked(_))));
    // Someone else is not affected; an address rule the core cannot see refuses nobody.
    let ip_rule = AccessRule { list: AccessList::Block, channel: None, kind: AccessKind::Ip, value: "0.0.0.0/0".into() };
    ok(run(&mut state, &store, T0 + 4, Command::SetAccessRule { rule: ip_rule, note: Some("all".into()), by: "sue".into() }));
    ok(run(&mut state, &store, T0 + 5, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    assert_eq!(records::load(&store).expect("load").access_rules.len(), 2, "kept as records");
    ok(run(&mut state, &store, T0 + 6, Command::SetAccessRule { rule, note: None, by: "sue".into() }));
    ok(run(&mut state, &store, T0 + 7, say));
    let bad = AccessRule { list: AccessList::Block, channel: None, kind: AccessKind::Ip, value: "300.1.1.1".into() };
    assert!(matches!(run(&mut state, &store, T0 + 8, Command::SetAccessRule { rule: bad, note: Some("x".into()), by: "sue".into() }), Err(Error::Invalid(_))));
}

#[test]
fn who_served_a_visitor_last_goes_with_the_conversation_when_retention_deletes_it() {
    let (store, mut state) = floor();
    let visitor = Visitor { id: Some("v-dana".into()), name: "D".into(), attributes: vec![] };
    let before = state.next_conversation;
    ok(run(&mut state, &store, T0, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor }));
    let id = state.conversations.keys().copied().find(|c| c.0 >= before).expect("started");
    ann_takes_all(&mut state, &store, T0 + 10);
    ok(run(&mut state, &store, T0 + 20, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: id, resolution: String::new(), tags: vec![] }));
    let last_served = |store: &MemStore| {
        use switchboard_actors::records::Store;
        store.get(&records::key::last_served("v-dana")).expect("read").is_some()
    };
    assert!(last_served(&store), "kept for sticky routing");
    ok(run(&mut state, &store, T0 + 30, Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 }));
    ok(run(&mut state, &store, T0 + 2 * 24 * HOUR_MS, Command::PurgeExpired { as_of: Timestamp(T0 + 2 * 24 * HOUR_MS) }));
    assert!(!last_served(&store), "deleted with the conversation it names");
}

/// A channel's bot holds its conversations out of every queue: from rules 16 one it
/// hands off enters its group then, a customer who leaves the bot did not abandon a
/// queue, and only ratings of conversations an operator handled count. Rules 15 replay
/// as they counted.
#[test]
fn kpis_count_a_bots_conversation_from_its_handoff() {
    for rules in [switchboard_actors::core::RULES_VERSION, 15] {
        let (store, mut state) = floor_under(rules);
        let web = ChannelId::new("web");
        let bot = BotConfig { url: "http://127.0.0.1:9/events".into(), token_sha256: "a".repeat(64), signing_secret: "s".repeat(20) };
        ok(run(&mut state, &store, T0, Command::SetChannelBot { channel: web.clone(), bot: Some(bot) }));
        ok(run(&mut state, &store, T0, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
        // Handed off 40 s in, answered 5 s later, closed and rated 5.
        let handed = start(&mut state, &store, T0 + 1_000);
        ok(run(&mut state, &store, T0 + 40_000, Command::Handoff { channel: web.clone(), conversation: handed, group: None, reason: "a person, please".into(), context: vec![] }));
        let offer = *state.offers.keys().next().expect("offered once handed off");
        ok(run(&mut state, &store, T0 + 45_000, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
        ok(run(&mut state, &store, T0 + 60_000, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: handed, resolution: "done".into(), tags: vec![] }));
        ok(run(&mut state, &store, T0 + 61_000, Command::Rate { conversation: handed, score: 5, comment: String::new() }));
        // The customer leaves the bot and rates it 1; the bot resolves another itself.
        let left = start(&mut state, &store, T0 + 2_000);
        ok(run(&mut state, &store, T0 + 3_000, Command::CloseByClient { conversation: left }));
        ok(run(&mut state, &store, T0 + 4_000, Command::Rate { conversation: left, score: 1, comment: String::new() }));
        let resolved = start(&mut state, &store, T0 + 5_000);
        ok(run(&mut state, &store, T0 + 6_000, Command::CloseByBot { channel: web.clone(), conversation: resolved, resolution: String::new() }));

        let kpi = state.kpis_since(T0 / HOUR_MS)[&SkillGroupId::new("g")].clone();
        let counted = (kpi.entered, kpi.answered, kpi.handled, kpi.abandoned, kpi.rated, kpi.rating_sum);
        if rules >= 16 {
            assert_eq!(counted, (1, 1, 1, 0, 1, 5), "rules {rules}: {kpi:?}");
        } else {
            assert_eq!(counted, (0, 1, 1, 1, 2, 6), "rules 15 replays as it counted: {kpi:?}");
        }
        assert_eq!(records::load(&store).expect("load").kpis_since(0)[&SkillGroupId::new("g")], kpi, "rules {rules}: the records hold the same");
    }
}

/// Rules 18: a conversation a supervisor gives straight from the bot to an operator
/// enters its group then (under rules 17 it was answered but never entered).
#[test]
fn a_conversation_taken_from_the_bot_straight_to_an_operator_enters_its_group() {
    for rules in [18, 17] {
        let (store, mut state) = floor_under(rules);
        let web = ChannelId::new("web");
        let bot = BotConfig { url: "http://127.0.0.1:9/events".into(), token_sha256: "a".repeat(64), signing_secret: "s".repeat(20) };
        ok(run(&mut state, &store, T0, Command::SetChannelBot { channel: web.clone(), bot: Some(bot) }));
        ok(run(&mut state, &store, T0, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
        let taken = start(&mut state, &store, T0 + 1_000);
        ok(run(&mut state, &store, T0 + 5_000, Command::Reassign { by: "sue".into(), conversation: taken, target: TransferTarget::Operator(OperatorId::new("ann")), comment: String::new() }));
        let kpi = state.kpis_since(T0 / HOUR_MS)[&SkillGroupId::new("g")].clone();
        assert_eq!((kpi.entered, kpi.answered), (u64::from(rules >= 18), 1), "rules {rules}: {kpi:?}");
        assert_eq!(records::load(&store).expect("load").kpis_since(0)[&SkillGroupId::new("g")], kpi, "rules {rules}: the records hold the same");
    }
}
