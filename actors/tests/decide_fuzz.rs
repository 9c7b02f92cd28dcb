//! Random command sequences through the routing core, checking after every command what
//! the core promises whatever it is sent: it does not panic; `precheck` agrees with the
//! commit; a refused command changes nothing; a conversation has at most one holder
//! (I2); an operator's load never grows past their capacity (I3); histories, feeds,
//! queues and offers stay consistent with each other; and the same commands give the
//! same state, also across a restart half way that rebuilds the hot state from the
//! records; and after every command, the records hold exactly the hot state, and the
//! records it changed belong to the group ADR 0006 will send it to (`placement`,
//! `records::owner`) unless it is listed as still spanning groups (`SPANS_GROUPS`).
//!
//! The commands come from a small universe (three operators, two groups, two channels,
//! six conversations, ten offers, a few keys and texts at and past the limits) so they
//! collide often. Some steps are resolved against the state (answer the n-th pending
//! offer, act as the holder of the n-th assigned conversation) so that sequences reach
//! assignments, transfers and closes instead of being refused at the first offer.
//!
//! 64 cases by default, a few seconds in a debug build. The longer run:
//! `PROPTEST_CASES=20000 cargo test -p switchboard-actors --release --test decide_fuzz`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::select;
use switchboard_actors::core::{self, precheck, Part, Reply, RULES_VERSION};
use switchboard_actors::cutover::{SplitPart, Splitter};
use switchboard_actors::mail::{GroupId, Mail};
use switchboard_actors::model::*;
use switchboard_actors::placement;
use switchboard_actors::records::{self, MemStore, Owner, Store};
use switchboard_actors::state::{ConversationStatus, HistoryItem, ShardState, FEED_RETAINED};
use switchboard_actors::Error;

const OPERATORS: [&str; 3] = ["op0", "op1", "op2"];
const GROUPS: [&str; 2] = ["g0", "g1"];
const CHANNELS: [&str; 2] = ["web", "chat"];

/// One generated step: a command as drawn, or one resolved against the state.
#[derive(Clone, Debug)]
enum Step {
    Raw(Command),
    /// Answers the n-th pending offer as its operator.
    Accept(usize),
    /// Answers offer `n` (pending or not, made to whomever) as operator `m`, with an
    /// answer stamped as received at time 0, before every deadline (rules 9).
    AcceptLate(usize, usize),
    Decline(usize, String),
    /// Expires the n-th pending offer, due or not.
    Expire(usize),
    /// Acts as the operator holding the n-th assigned conversation.
    HolderSays(usize, String, String),
    HolderTransfers(usize, TransferTarget, String),
    HolderCloses(usize, String, Vec<String>),
    HolderReads(usize, u64),
}

/// Where a sequence starts: the routing rules in force and who is set up how.
#[derive(Clone, Debug)]
struct Setup {
    rules: u32,
    capacities: [u32; 3],
    groups: [Vec<usize>; 3],
    online: [bool; 3],
}

fn config() -> ProptestConfig {
    // proptest reads PROPTEST_CASES only for its own default; keep that and lower the
    // default to what a debug build runs in seconds.
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    // A failure prints its shrunk input; no regression file is written into the tree.
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn operator_id() -> impl Strategy<Value = OperatorId> {
    prop_oneof![
        9 => select(&OPERATORS[..]).prop_map(OperatorId::new),
        1 => Just(OperatorId::new("ghost")),
    ]
}

fn group_id() -> impl Strategy<Value = SkillGroupId> {
    prop_oneof![
        9 => select(&GROUPS[..]).prop_map(SkillGroupId::new),
        1 => Just(SkillGroupId::new("nowhere")),
    ]
}

fn channel_id() -> impl Strategy<Value = ChannelId> {
    prop_oneof![
        9 => select(&CHANNELS[..]).prop_map(ChannelId::new),
        1 => Just(ChannelId::new("nochannel")),
    ]
}

fn conversation() -> impl Strategy<Value = ConversationId> {
    (0..6u64).prop_map(ConversationId)
}

fn offer() -> impl Strategy<Value = OfferId> {
    (0..10u64).prop_map(OfferId)
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => select(vec!["k0", "k1", "k2", "k3"]).prop_map(str::to_owned),
        1 => Just(String::new()),
        1 => Just("k".repeat(129)),
    ]
}

/// Texts at the edges: empty, blank, short, exactly at the limit in multi-byte
/// characters, and one past it.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        1 => Just("   ".to_owned()),
        6 => select(vec!["hello", "my router is broken", "ok", "спасибо"]).prop_map(str::to_owned),
        1 => Just("é".repeat(4000)),
        1 => Just("a".repeat(4001)),
        1 => Just("r".repeat(501)),
    ]
}

fn tags() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(select(vec!["billing".to_owned(), String::new(), "x".repeat(41), "vip".to_owned()]), 0..12)
}

fn presence() -> impl Strategy<Value = Presence> {
    select(vec![Presence::Online, Presence::Away, Presence::Offline, Presence::Break])
}

fn target() -> impl Strategy<Value = TransferTarget> {
    prop_oneof![operator_id().prop_map(TransferTarget::Operator), group_id().prop_map(TransferTarget::Group)]
}

/// Mostly none: a message naming files that were never stored is refused, and
/// sequences should mostly get through.
fn attachment_ids() -> impl Strategy<Value = Vec<AttachmentId>> {
    prop_oneof![
        4 => Just(vec![]),
        1 => prop::collection::vec((0..3u8).prop_map(|i| AttachmentId(format!("a{i}"))), 0..7),
    ]
}

fn template_id() -> impl Strategy<Value = String> {
    select(vec!["t0", "t1", ""]).prop_map(str::to_owned)
}

/// Every command of the model, with ids mostly from the universe and sometimes not.
/// Each family is boxed: unboxed, the nested unions made value trees so large that
/// shrinking a failure overflowed a debug build's test thread stack.
fn command() -> impl Strategy<Value = Command> {
    let directory = prop_oneof![
        (prop_oneof![4 => group_id(), 1 => Just(SkillGroupId::new(""))], select(vec![0u64, 999, 1000, 5000]), any::<bool>()).prop_map(
            |(id, offer_timeout_ms, longest_idle)| Command::UpsertSkillGroup(SkillGroupConfig {
                name: id.0.clone(),
                id,
                policy: if longest_idle { Policy::LongestIdle } else { Policy::LeastOccupied },
                offer_timeout_ms,
                sla_ms: 60_000,
            })
        ),
        (operator_id(), 0..4u32, prop::collection::vec(group_id(), 0..3)).prop_map(|(id, capacity, groups)| {
            Command::UpsertOperator(OperatorConfig { name: id.0.clone(), id, capacity, groups })
        }),
        (channel_id(), group_id()).prop_map(|(id, default_group)| Command::UpsertChannel(ChannelConfig {
            name: id.0.clone(),
            kind: "web".into(),
            id,
            default_group
        })),
        (select(vec!["u0", "u1"]), select(vec![Role::Operator, Role::Supervisor, Role::Admin]), prop::option::of(operator_id())).prop_map(
            |(login, role, operator)| Command::UpsertUser(UserRecord { login: login.into(), password_hash: "$argon2id$x".into(), role, operator })
        ),
        (template_id(), select(vec!["Greeting", "", " "]), text(), prop::option::of(group_id()), prop::option::of(operator_id())).prop_map(
            |(id, title, text, group, owner)| Command::UpsertTemplate(Template { id, title: title.into(), text, group, owner })
        ),
        template_id().prop_map(|id| Command::DeleteTemplate { id }),
        (operator_id(), template_id(), any::<bool>()).prop_map(|(operator, template, favourite)| Command::SetFavourite { operator, template, favourite }),
        (0..4u32).prop_map(|version| Command::AdoptRules { version }),
        select(vec!["u0", "u1", "nobody"]).prop_map(|login| Command::EndSessions { login: login.into() }),
        (channel_id(), prop::collection::vec(group_id(), 0..4)).prop_map(|(channel, groups)| Command::SetChannelPublicGroups { channel, groups }),
    ]
    .boxed();
    let client = prop_oneof![
        3 => (channel_id(), prop::option::of(group_id()), any::<bool>(), prop::option::of(select(vec!["v-0", "v-1"])))
            .prop_map(|(channel, group, vip, id)| Command::StartConversation {
                channel,
                group,
                visitor: Visitor {
                    id: id.map(str::to_owned),
                    name: "Visitor".into(),
                    attributes: if vip { vec![("tier".into(), "vip".into())] } else { vec![] },
                },
            }),
        // A keyed start, sent again with a key already used or with a fresh one.
        1 => (channel_id(), select(vec!["k-0", "k-1"]), prop::option::of(select(vec!["v-0", "v-1"])))
            .prop_map(|(channel, key, id)| Command::StartConversationOnce {
                key: key.into(),
                channel,
                group: None,
                visitor: Visitor { id: id.map(str::to_owned), name: "Visitor".into(), attributes: vec![] },
            }),
        // Channels, bots and the outbox (issue 11).
        1 => (channel_id(), select(vec!["s0", "s1", ""]), select(vec!["m0", "m1", "m2"]), text()).prop_map(|(channel, sender, id, text)| Command::ChannelInbound {
            channel,
            sender: sender.into(),
            sender_name: "Customer".into(),
            provider_message_id: id.into(),
            text,
        }),
        1 => (channel_id(), select(vec!["s0", "s2"]), select(vec!["m0", "m3"]), text(), 0..3u8, prop::option::of(conversation())).prop_map(|(channel, sender, id, text, files, thread)| Command::ChannelInboundRich {
            channel,
            sender: sender.into(),
            sender_name: "Customer".into(),
            provider_message_id: id.into(),
            text,
            // Ids per message and place: a redelivery carries the same ones.
            files: (0..files).map(|n| InboundFile { id: AttachmentId(format!("{:030x}{n:02x}", id.len() * 7 + sender.len())), name: format!("f{n}.png"), content_type: "image/png".into(), size: 1024 * u64::from(n), sha256: "0".repeat(64) }).collect(),
            thread,
            attributes: vec![("email.subject".into(), "Hello".into())],
        }),
        1 => (channel_id(), conversation(), key(), text(), 0..12usize).prop_map(|(channel, conversation, key, text, buttons)| Command::BotReply {
            channel,
            conversation,
            key,
            text,
            buttons: vec!["Talk to a person".into(); buttons],
        }),
        1 => (channel_id(), conversation(), prop::option::of(group_id()), text()).prop_map(|(channel, conversation, group, reason)| Command::Handoff {
            channel,
            conversation,
            group,
            reason,
            context: vec![("k".into(), "v".into())],
        }),
        1 => (channel_id(), conversation()).prop_map(|(channel, conversation)| Command::CloseByBot { channel, conversation, resolution: String::new() }),
        1 => (conversation(), 0..12u64).prop_map(|(conversation, seq)| Command::DeliveriesAttempted { node: 1, items: vec![(conversation, seq)] }),
        1 => (conversation(), 0..12u64, 0..4u8).prop_map(|(conversation, seq, o)| Command::DeliveryResults {
            results: vec![DeliveryResult {
                conversation,
                seq,
                node: 0,
                outcome: match o {
                    0 => DeliveryOutcome::Sent { provider_id: "p".into() },
                    1 => DeliveryOutcome::Failed { reason: "no".into() },
                    2 => DeliveryOutcome::Read,
                    _ => DeliveryOutcome::Unknown,
                },
            }],
        }),
        3 => (conversation(), key(), text(), attachment_ids()).prop_map(|(conversation, key, text, attachments)| Command::PostClientMessage {
            conversation,
            key,
            text,
            attachments
        }),
        1 => conversation().prop_map(|conversation| Command::CloseByClient { conversation }),
        1 => (conversation(), 0..7u8, text()).prop_map(|(conversation, score, comment)| Command::Rate { conversation, score, comment }),
        1 => ((0..3u8), conversation(), select(vec![0u64, 1, 1024, 100 * 1024 * 1024])).prop_map(|(i, conversation, size)| {
            Command::StoreAttachment(Attachment {
                id: AttachmentId(format!("a{i}")),
                conversation,
                name: "f.png".into(),
                content_type: "image/png".into(),
                size,
                sha256: "00".into(),
                uploaded_by: "client".into(),
            })
        }),
        1 => (conversation(), prop_oneof![Just(Reader::Client), operator_id().prop_map(Reader::Operator)], 0..30u64)
            .prop_map(|(conversation, reader, upto)| Command::MarkRead { conversation, reader, upto }),
    ]
    .boxed();
    let operator = prop_oneof![
        (operator_id(), presence()).prop_map(|(operator, presence)| Command::SetPresence { operator, presence }),
        (operator_id(), offer()).prop_map(|(operator, offer)| Command::AcceptOffer { operator, offer }),
        (operator_id(), offer(), text()).prop_map(|(operator, offer, reason)| Command::DeclineOffer { operator, offer, reason }),
        offer().prop_map(|offer| Command::ExpireOffer { offer }),
        (operator_id(), conversation(), key(), text(), attachment_ids()).prop_map(|(operator, conversation, key, text, attachments)| {
            Command::PostOperatorMessage { operator, conversation, key, text, attachments }
        }),
        (operator_id(), conversation(), target(), text()).prop_map(|(operator, conversation, target, comment)| Command::Transfer {
            operator,
            conversation,
            target,
            comment
        }),
        (operator_id(), conversation(), text(), tags()).prop_map(|(operator, conversation, resolution, tags)| Command::CloseByOperator {
            operator,
            conversation,
            resolution,
            tags
        }),
        (conversation(), target(), text()).prop_map(|(conversation, target, comment)| Command::Reassign {
            by: "sup".into(),
            conversation,
            target,
            comment
        }),
        group_id().prop_map(|group| Command::RouteQueue { group }),
        (channel_id(), select(vec![0u32, 1, 4000])).prop_map(|(channel, days)| Command::SetChannelRetention { channel, days }),
        select(vec![0u64, 1_000_000, 100_000_000_000]).prop_map(|at| Command::PurgeExpired { as_of: Timestamp(at) }),
    ]
    .boxed();
    // Rules 5: priorities, ageing and wrap-up edited while conversations flow.
    let routing = prop_oneof![
        (
            group_id(),
            select(vec![0u64, 500, 1_000, 10_000]),
            select(vec![0u64, 1_000, 30_000, 4_000_000]),
            select(vec![0u32, 5, 101]),
            select(vec![0u64, 3_600_000, 100 * 24 * 3_600_000])
        )
            .prop_map(|(group, ageing_ms, wrap_up_ms, priority, sticky_ms)| Command::SetGroupRouting {
                group,
                routing: GroupRouting {
                    attribute_priorities: vec![AttributePriority { attribute: "tier".into(), value: "vip".into(), priority }],
                    ageing_ms,
                    wrap_up_ms,
                    sticky_ms,
                    inactivity_remind_ms: wrap_up_ms / 2,
                    inactivity_close_ms: wrap_up_ms,
                    inactivity_message: String::new(),
                    required_skills: if priority == 5 { vec![("billing".into(), 3)] } else { vec![] },
                    skill_rules: vec![],
                },
            }),
        Just(Command::SweepInactive),
        (operator_id(), select(vec![0u8, 1, 3, 5, 6])).prop_map(|(operator, level)| Command::SetOperatorSkills {
            operator,
            skills: if level == 0 { vec![] } else { vec![("billing".into(), level)] },
        }),
        (operator_id(), select(vec![0u32, 1, 2]), any::<bool>()).prop_map(|(operator, max, only_web)| Command::SetOperatorChannels {
            operator,
            limits: ChannelLimits { per_kind: vec![("web".into(), max)], only: if only_web { vec!["web".into()] } else { vec![] } },
        }),
        (channel_id(), select(vec![0u32, 3, 101])).prop_map(|(channel, priority)| Command::SetChannelPriority { channel, priority }),
        operator_id().prop_map(|operator| Command::EndWrapUp { operator }),
        // Rules 6: steps, opening hours and channel weights edited while conversations flow.
        (group_id(), select(vec![0u64, 300, 5_000]), select(vec![0u8, 1, 6]), any::<bool>()).prop_map(|(group, after_ms, max_level, overflow)| {
            Command::SetGroupSteps {
                group,
                steps: if after_ms == 0 {
                    vec![]
                } else {
                    vec![
                        RoutingStep { after_ms, skills: None, max_level, overflow: vec![] },
                        RoutingStep { after_ms: after_ms * 2, skills: Some(vec![]), max_level: 0, overflow: if overflow { vec![SkillGroupId::new("g1")] } else { vec![] } },
                    ]
                },
            }
        }),
        (group_id(), select(vec![0u16, 1, 600]), select(vec![0u8, 1, 2])).prop_map(|(group, open, action)| Command::SetGroupHours {
            group,
            hours: (open != 0).then(|| OpeningHours {
                time_zone: "UTC".into(),
                // The fuzz clock runs in the first hours of 1970-01-01, a Thursday.
                weekly: vec![(3, open, open + 1)],
                holidays: vec![],
                closed_action: match action {
                    0 => ClosedAction::Wait,
                    1 => ClosedAction::Reply,
                    _ => ClosedAction::Transfer(SkillGroupId::new("g1")),
                },
                message: "closed".into(),
            }),
        }),
        select(vec![0u32, 1, 2, 3]).prop_map(|w| Command::SetChannelWeights { weights: if w == 0 { vec![] } else { vec![("web".into(), w)] } }),
        (channel_id(), any::<bool>()).prop_map(|(channel, on)| Command::SetChannelBot {
            channel,
            bot: on.then(|| BotConfig { url: "http://127.0.0.1:9/bot".into(), token_sha256: "a".repeat(64), signing_secret: "s".repeat(20) }),
        }),
        (channel_id(), any::<bool>()).prop_map(|(channel, on)| Command::SetChannelAdapter {
            channel,
            adapter: on.then(|| AdapterConfig::Api { token_sha256: "a".repeat(64), outbound_url: "http://127.0.0.1:9/out".into(), signing_secret: "s".repeat(20) }),
        }),
    ]
    .boxed();
    prop_oneof![1 => directory, 3 => client, 4 => operator, 1 => routing]
}

fn step() -> impl Strategy<Value = Step> {
    let n = 0..8usize;
    prop_oneof![
        6 => command().prop_map(Step::Raw),
        4 => n.clone().prop_map(Step::Accept),
        2 => (n.clone(), 0..3usize).prop_map(|(n, m)| Step::AcceptLate(n, m)),
        1 => (n.clone(), text()).prop_map(|(n, reason)| Step::Decline(n, reason)),
        1 => n.clone().prop_map(Step::Expire),
        2 => (n.clone(), key(), text()).prop_map(|(n, key, text)| Step::HolderSays(n, key, text)),
        1 => (n.clone(), target(), text()).prop_map(|(n, target, comment)| Step::HolderTransfers(n, target, comment)),
        1 => (n.clone(), text(), tags()).prop_map(|(n, resolution, tags)| Step::HolderCloses(n, resolution, tags)),
        1 => (n, 0..30u64).prop_map(|(n, upto)| Step::HolderReads(n, upto)),
    ]
}

/// Milliseconds between entries: mostly close together, sometimes past an offer timeout.
fn pause() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..50u64, 3 => 0..2_000u64, 2 => 0..40_000u64]
}

fn setup() -> impl Strategy<Value = Setup> {
    // Mostly operators who can take conversations, so sequences get past the first offer.
    let groups = prop::collection::vec(0..2usize, 1..3);
    let capacity = prop_oneof![1 => Just(0u32), 4 => 1..4u32];
    let online = prop::bool::weighted(0.75);
    (
        select(vec![0, 1, RULES_VERSION]),
        prop::array::uniform3(capacity),
        (groups.clone(), groups.clone(), groups),
        prop::array::uniform3(online),
    )
        .prop_map(|(rules, capacities, (g0, g1, g2), online)| Setup { rules, capacities, groups: [g0, g1, g2], online })
}

/// The configuration every sequence starts from, so most commands meet something.
fn prelude(setup: &Setup) -> Vec<Command> {
    let mut commands = vec![
        Command::UpsertSkillGroup(SkillGroupConfig {
            id: SkillGroupId::new("g0"),
            name: "g0".into(),
            policy: Policy::LongestIdle,
            offer_timeout_ms: 1000,
            sla_ms: 60_000,
        }),
        Command::UpsertSkillGroup(SkillGroupConfig {
            id: SkillGroupId::new("g1"),
            name: "g1".into(),
            policy: Policy::LeastOccupied,
            offer_timeout_ms: 5000,
            sla_ms: 60_000,
        }),
    ];
    for (i, id) in OPERATORS.iter().enumerate() {
        commands.push(Command::UpsertOperator(OperatorConfig {
            id: OperatorId::new(*id),
            name: id.to_string(),
            capacity: setup.capacities[i],
            groups: setup.groups[i].iter().map(|g| SkillGroupId::new(GROUPS[*g])).collect(),
        }));
    }
    for (id, group) in CHANNELS.iter().zip(GROUPS) {
        commands.push(Command::UpsertChannel(ChannelConfig {
            id: ChannelId::new(*id),
            kind: "web".into(),
            name: id.to_string(),
            default_group: SkillGroupId::new(group),
        }));
    }
    for (i, id) in OPERATORS.iter().enumerate() {
        if setup.online[i] {
            commands.push(Command::SetPresence { operator: OperatorId::new(*id), presence: Presence::Online });
        }
    }
    for channel in CHANNELS {
        commands.push(Command::StartConversation { channel: ChannelId::new(channel), group: None, visitor: Visitor::default() });
    }
    commands
}

/// Turns a step into the command it stands for in this state. Falls back to a command
/// on made-up ids when there is nothing to resolve against, which the core refuses.
fn resolve(state: &ShardState, step: &Step) -> Command {
    let pending = |n: usize| state.offers.values().nth(n % state.offers.len().max(1)).cloned();
    let held = |n: usize| {
        let assigned: Vec<(ConversationId, OperatorId)> =
            state.conversations.values().filter_map(|c| c.assigned().map(|op| (c.id, op.clone()))).collect();
        (!assigned.is_empty()).then(|| assigned[n % assigned.len()].clone())
    };
    let nobody = || (ConversationId(0), OperatorId::new("op0"));
    match step {
        Step::Raw(command) => command.clone(),
        Step::Accept(n) => match pending(*n) {
            Some(o) => Command::AcceptOffer { operator: o.operator, offer: o.id },
            None => Command::AcceptOffer { operator: OperatorId::new("op0"), offer: OfferId(*n as u64) },
        },
        Step::Decline(n, reason) => match pending(*n) {
            Some(o) => Command::DeclineOffer { operator: o.operator, offer: o.id, reason: reason.clone() },
            None => Command::DeclineOffer { operator: OperatorId::new("op0"), offer: OfferId(*n as u64), reason: reason.clone() },
        },
        Step::Expire(n) => Command::ExpireOffer { offer: pending(*n).map(|o| o.id).unwrap_or(OfferId(*n as u64)) },
        Step::AcceptLate(n, m) => Command::AcceptOfferAt {
            operator: OperatorId::new(OPERATORS[m % OPERATORS.len()]),
            offer: OfferId((*n as u64) % state.next_offer.max(1)),
            received_at: Timestamp(0),
        },
        Step::HolderSays(n, key, text) => {
            let (conversation, operator) = held(*n).unwrap_or_else(nobody);
            Command::PostOperatorMessage { operator, conversation, key: key.clone(), text: text.clone(), attachments: vec![] }
        }
        Step::HolderTransfers(n, target, comment) => {
            let (conversation, operator) = held(*n).unwrap_or_else(nobody);
            Command::Transfer { operator, conversation, target: target.clone(), comment: comment.clone() }
        }
        Step::HolderCloses(n, resolution, tags) => {
            let (conversation, operator) = held(*n).unwrap_or_else(nobody);
            Command::CloseByOperator { operator, conversation, resolution: resolution.clone(), tags: tags.clone() }
        }
        Step::HolderReads(n, upto) => {
            let (conversation, operator) = held(*n).unwrap_or_else(nobody);
            Command::MarkRead { conversation, reader: Reader::Operator(operator), upto: *upto }
        }
    }
}

/// Per operator and channel kind, the conversations held and offered.
fn kind_counts(state: &ShardState) -> BTreeMap<(OperatorId, String), u32> {
    let mut counts = BTreeMap::new();
    for op in state.operators.values() {
        let offered = op.offers.iter().filter_map(|o| state.offers.get(o)).map(|o| o.conversation);
        for id in op.active.iter().copied().chain(offered) {
            let kind = state.conversations.get(&id).and_then(|c| state.channels.get(&c.channel)).map_or(String::new(), |c| c.kind.clone());
            *counts.entry((op.config.id.clone(), kind)).or_insert(0) += 1;
        }
    }
    counts
}

fn json(state: &ShardState) -> String {
    serde_json::to_string(state).expect("a shard state serializes")
}

/// Applies one entry the way a node does (precheck on the proposer, then the commit)
/// and checks what must hold whatever the command was.
fn apply_checked(state: &mut ShardState, store: &MemStore, entry: &Envelope) -> Result<Reply, Error> {
    let before = json(state);
    let loads_before: BTreeMap<OperatorId, u32> = state.operators.iter().map(|(id, op)| (id.clone(), op.load())).collect();
    let weighted_before: BTreeMap<OperatorId, u32> = state.operators.iter().map(|(id, op)| (id.clone(), state.load_of(op))).collect();
    let kinds_before = kind_counts(state);
    // The node answers early only from the hot state; otherwise the commit decides.
    let early = !records::needs_records(state, &entry.command);
    let answered = precheck(state, &entry.command, entry.at);
    let records_before = all_records(store);
    let committed = records::run(state, store, entry);
    check_placement(&entry.command, &records_before, &all_records(store));
    if let Ok((_, outcome)) = &committed {
        if outcome.events.iter().any(|e| matches!(e, Event::ConversationsDeleted { .. })) {
            PURGED.with(|p| p.set(true));
        }
    }
    match (&answered, &committed) {
        _ if !early => {}
        (Err(refused), Err(error)) => assert_eq!(refused, error, "precheck and commit refuse alike"),
        (Err(refused), Ok(_)) => panic!("precheck refused ({refused}) what the commit took"),
        (Ok(Some(reply)), Ok((committed, outcome))) => {
            assert_eq!(reply, committed, "precheck answers as the commit would");
            assert!(outcome.events.is_empty(), "a command precheck answers from state writes nothing: {:?}", outcome.events);
        }
        (Ok(_), Err(error)) => panic!("precheck let through what the commit refused: {error}"),
        (Ok(None), Ok(_)) => {}
    }
    match &committed {
        Err(_) => assert_eq!(json(state), before, "a refused command leaves the state untouched"),
        Ok((Reply::Message { seq, .. }, _)) => {
            let (conversation, key) = match &entry.command {
                Command::PostClientMessage { conversation, key, .. } | Command::PostOperatorMessage { conversation, key, .. } => {
                    (*conversation, key)
                }
                other => panic!("a message reply to {other:?}"),
            };
            let conv = records::load_conversation(store, conversation, true).expect("readable").expect("stored");
            assert_eq!(conv.keys.get(key), Some(seq), "the reply names the entry the key produced");
            let history = records::history(store, conversation, 0, usize::MAX).expect("history");
            let at = &history[*seq as usize - 1].item;
            assert!(
                matches!(at, HistoryItem::ClientMessage { key: k, .. } | HistoryItem::OperatorMessage { key: k, .. } if k == key),
                "entry #{seq} is the message with key {key:?}: {at:?}"
            );
        }
        Ok(_) => {}
    }
    check_invariants(state, store, &loads_before);
    // Rules 6 and 5: the weighted load and each channel kind's count only grow within the
    // operator's capacity and limits (lowering those, or raising a weight, may leave
    // someone above them; then nothing more is added).
    let reweighed = matches!(entry.command, Command::SetChannelWeights { .. });
    for (id, op) in state.operators.iter().filter(|_| !reweighed) {
        let (before, after) = (weighted_before.get(id).copied().unwrap_or(0), state.load_of(op));
        assert!(after <= op.config.capacity.max(before), "{id}: weighted load {after} grew past capacity {} (was {before})", op.config.capacity);
    }
    for ((op, kind), n) in kind_counts(state).into_iter().filter(|_| state.rules >= 5) {
        let limit = state.channel_limits.get(&op).and_then(|l| l.per_kind.iter().find(|(k, _)| *k == kind).map(|(_, m)| *m));
        let before = kinds_before.get(&(op.clone(), kind.clone())).copied().unwrap_or(0);
        if let Some(limit) = limit {
            assert!(n <= limit.max(before), "{op}: {n} conversations of kind {kind} grew past its limit {limit} (was {before})");
        }
    }
    // Within one round: the groups this entry routed are left with nothing more to offer
    // at its time; routing them again makes no offer and starts no round.
    if let Ok((_, outcome)) = &committed {
        let mut again = state.clone();
        let at = switchboard_actors::core::entry_time(state, entry.at);
        let mut routed = outcome.touched.groups.clone();
        if let Command::RouteQueue { group } = &entry.command {
            routed.insert(group.clone());
        }
        for group in routed.into_iter().filter(|g| state.groups.contains_key(g)) {
            let reroute = Envelope::new(at, Command::RouteQueue { group: group.clone() });
            if let Ok((_, more)) = switchboard_actors::core::handle(&mut again, &reroute) {
                let offered: Vec<&Event> = more.events.iter().filter(|e| matches!(e, Event::OfferMade { .. } | Event::RoundRestarted { .. })).collect();
                assert!(offered.is_empty(), "{group} was routed by {:?} but could still offer at once: {offered:?}", entry.command);
            }
        }
    }
    committed.map(|(reply, _)| reply)
}

fn all_records(store: &MemStore) -> BTreeMap<Vec<u8>, Vec<u8>> {
    store.scan(&[], None, usize::MAX).expect("a memory store scans").into_iter().collect()
}

/// Commands whose records today span groups that ADR 0006 separates, and so still
/// need splitting into a decision and mail (the order of work in its "Amendments"):
/// the list shrinks as they are; a command not listed must stay in its group.
const SPANS_GROUPS: &[&str] = &[
    // A conversation shard's decision that routing acts on (queueing, a returning
    // customer's operator, wrap-up and KPIs on a close, a purge's decision records):
    // to become `Enqueue`, `Release`, `Rated` and `Purged` mail.
    "StartConversation",
    "StartConversationOnce",
    "ChannelInbound",
    "ChannelInboundRich",
    "Handoff",
    "CloseByClient",
    "CloseByOperator",
    "CloseByBot",
    "SweepInactive",
    "Rate",
    "PurgeExpired",
    // Entries mirrored into the holder's feed, a routing record: the feed split.
    "PostClientMessage",
    "PostOperatorMessage",
    "AddNote",
    "DeliveryResults",
    "RetryDelivery",
    // Routing decisions that write the conversation's history: to become `Assigned`
    // and `Requeued` mail.
    "AcceptOffer",
    "AcceptOfferAt",
    "Transfer",
    "Reassign",
    // Directory changes with effects in routing shards (feeds, queues routed again)
    // or conversation shards (requeued bot conversations, dead-lettered deliveries):
    // to become `Directory` mail applied as a command.
    "UpsertOperator",
    "UpsertSkillGroup",
    "SetGroupRouting",
    "SetChannelPriority",
    "SetGroupSteps",
    "SetGroupHours",
    "SetChannelWeights",
    "SetOperatorSkills",
    "SetOperatorChannels",
    "SetChannelBot",
    "SetChannelAdapter",
];

/// Every record a command changed belongs to the group `placement::target` sends it
/// to (records every group keeps, and those ADR 0006 splits, aside), unless the
/// command is listed in `SPANS_GROUPS`; every prefix written has an owner.
fn check_placement(command: &Command, before: &BTreeMap<Vec<u8>, Vec<u8>>, after: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let changed = before.iter().filter(|(k, v)| after.get(*k) != Some(*v)).map(|(k, _)| k).chain(after.keys().filter(|k| !before.contains_key(*k)));
    let mut owners = std::collections::BTreeSet::new();
    for key in changed {
        let prefix = key.first().copied().unwrap_or_default();
        match records::owner(prefix) {
            Some(Owner::EachGroup | Owner::Split) => {}
            Some(owner) => {
                owners.insert(owner);
            }
            None => panic!("record prefix {:?} has no owner in records::owner (ADR 0006)", prefix as char),
        }
    }
    let Some(expected) = placement::target(command).owner() else { return };
    let foreign: Vec<Owner> = owners.into_iter().filter(|o| *o != expected).collect();
    if !foreign.is_empty() {
        let kind = format!("{command:?}");
        let kind = kind.split(|c: char| !c.is_alphanumeric()).next().unwrap_or_default().to_string();
        assert!(SPANS_GROUPS.contains(&kind.as_str()), "{kind} goes to {expected:?} but writes records of {foreign:?}: split it (ADR 0006) or list it in SPANS_GROUPS");
    }
}

fn check_invariants(state: &ShardState, store: &MemStore, loads_before: &BTreeMap<OperatorId, u32>) {
    // The records hold the hot state exactly: a restart here would change nothing.
    let rebuilt = records::load(store).expect("the records load");
    assert_eq!(json(&rebuilt), json(state), "the hot state rebuilt from the records");
    for (id, conv) in &state.conversations {
        assert_eq!(rebuilt.conversations[id].keys, conv.keys, "{id}: idempotency keys in the records");
    }

    // I2: one holder at most, and holders and statuses agree both ways.
    let mut holder: BTreeMap<ConversationId, &OperatorId> = BTreeMap::new();
    for (id, op) in &state.operators {
        for c in &op.active {
            assert!(holder.insert(*c, id).is_none(), "{c} is held by two operators");
        }
    }
    for conv in state.conversations.values() {
        assert_eq!(conv.assigned(), holder.get(&conv.id).copied(), "{}: status and holder disagree", conv.id);
        if let Some(op) = conv.assigned() {
            assert!(conv.handled_by.contains(op), "{}: its holder is not among those who handled it", conv.id);
        }
    }

    // I3: an offer or assignment is only ever added to an operator with free capacity.
    // Lowering a capacity can leave an operator above it; then their load only falls.
    for (id, op) in &state.operators {
        let before = loads_before.get(id).copied().unwrap_or(0);
        assert!(
            op.load() <= op.config.capacity.max(before),
            "{id}: load {} grew past capacity {} (was {before})",
            op.load(),
            op.config.capacity
        );
    }

    // Offers: each pending one is reserved on its operator and is its conversation's.
    for (id, offer) in &state.offers {
        let reserved = state.operators.get(&offer.operator).is_some_and(|op| op.offers.contains(id));
        assert!(reserved, "{id} is not reserved on {}", offer.operator);
        let status = &state.conversations[&offer.conversation].status;
        assert!(
            matches!(status, ConversationStatus::Queued { offer: Some(o), .. } if o == id),
            "{id} is pending but {} is {status:?}",
            offer.conversation
        );
    }
    for op in state.operators.values() {
        for id in &op.offers {
            assert!(state.offers.contains_key(id), "{} reserves {id}, which is not pending", op.config.id);
        }
    }
    for conv in state.conversations.values() {
        if let ConversationStatus::Queued { ticket, offer } = &conv.status {
            // A routing shard may hear of a conversation before its group (rules 13): it
            // waits for the group, and joins its queue when the group arrives.
            let queued = match state.groups.get(&conv.group) {
                Some(g) => g.queue.contains(&(*ticket, conv.id)),
                None => state.rules >= 13 && offer.is_none(),
            };
            assert!(queued, "{} is queued but not in {}", conv.id, conv.group);
            if let Some(o) = offer {
                assert!(state.offers.contains_key(o), "{} waits on {o}, which is not pending", conv.id);
            }
        }
    }
    for (id, group) in &state.groups {
        for (ticket, c) in &group.queue {
            let conv = &state.conversations[c];
            assert!(
                conv.group == *id && matches!(conv.status, ConversationStatus::Queued { ticket: t, .. } if t == *ticket),
                "{id} queues {c} at #{ticket}, which is {:?} in {}",
                conv.status,
                conv.group
            );
        }
    }

    // Sequence numbers start at 1 and have neither gaps nor repeats.
    for conv in state.conversations.values() {
        let history = records::history(store, conv.id, 0, usize::MAX).expect("history");
        let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
        let expected: Vec<u64> = (1..=conv.last_seq).collect();
        assert_eq!(seqs, expected, "{}: history sequence numbers", conv.id);
    }
    for op in state.operators.values() {
        let feed = records::feed(store, &op.config.id, 0, usize::MAX).expect("feed");
        let seqs: Vec<u64> = feed.iter().map(|e| e.seq).collect();
        let first = op.feed.last_seq.saturating_sub(FEED_RETAINED as u64 - 1).max(1);
        let expected: Vec<u64> = (first..=op.feed.last_seq).collect();
        if PURGED.with(|p| p.get()) {
            // A mirrored message of a deleted conversation is gone from the feed with
            // it; what is left is still in order, without repeats.
            assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs.iter().all(|s| expected.contains(s)), "{}: feed sequence numbers {seqs:?}", op.config.id);
        } else {
            assert_eq!(seqs, expected, "{}: feed sequence numbers", op.config.id);
        }
    }
}

thread_local! {
    /// Whether the current case deleted a conversation (retention).
    static PURGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn initial(setup: &Setup) -> (ShardState, MemStore) {
    let mut state = ShardState { rules: setup.rules, ..ShardState::default() };
    state.dirty.meta = true;
    let store = MemStore::default();
    store.write(records::take_writes(&mut state));
    (state, store)
}

/// Replays `entries` without the checks; `restart_at` rebuilds the hot state from the
/// records (what a node does at start) before that entry.
fn replay(setup: &Setup, entries: &[Envelope], restart_at: Option<usize>) -> (ShardState, Vec<Result<Reply, Error>>) {
    let (mut state, store) = initial(setup);
    let mut results = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if restart_at == Some(i) {
            state = records::load(&store).expect("the records load");
        }
        results.push(records::run(&mut state, &store, entry).map(|(reply, _)| reply));
    }
    (state, results)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_core_keeps_its_invariants_whatever_it_is_sent(
        setup in setup(),
        steps in prop::collection::vec((pause(), step()), 0..40),
        snapshot_at in any::<prop::sample::Index>(),
    ) {
        PURGED.with(|p| p.set(false));
        let (mut state, store) = initial(&setup);
        let mut entries = Vec::new();
        let mut results = Vec::new();
        let mut now = 1000;
        for command in prelude(&setup) {
            let entry = Envelope::new(Timestamp(now), command);
            results.push(apply_checked(&mut state, &store, &entry));
            entries.push(entry);
        }
        for (pause, step) in &steps {
            now += pause;
            let entry = Envelope::new(Timestamp(now), resolve(&state, step));
            results.push(apply_checked(&mut state, &store, &entry));
            entries.push(entry);
        }

        let (again, results_again) = replay(&setup, &entries, None);
        prop_assert_eq!(json(&again), json(&state), "the same entries give the same state");
        prop_assert_eq!(&results_again, &results, "and the same replies");
        let (restored, results_restored) = replay(&setup, &entries, Some(snapshot_at.index(entries.len() + 1)));
        prop_assert_eq!(json(&restored), json(&state), "a restart half way changes nothing");
        prop_assert_eq!(&results_restored, &results);
    }
}

// ---------------------------------------------------------------------------------
// ADR 0006's split in one process: the same commands through the metadata group
// (`G0`, `core::Part::Directory`), one routing shard (`R`, `Part::Routing`) and two
// conversation shards (`C`, `Part::Conversations`), each with its own state and
// records. Every letter between them is posted in the apply that decided it and
// proposed to its destination as `Command::Deliver`, late, out of order, twice, or
// lost and resent, with its answer confirmed by `Command::ConfirmMail` or lost; both
// sides' leaders change now and then (the hot state rebuilt from the records).

const G0_GROUP: GroupId = 1;
const R_GROUP: GroupId = 2;
/// Conversation shards are groups `FIRST_C .. FIRST_C + SHARDS`.
const FIRST_C: GroupId = 3;
const SHARDS: u64 = 2;
const G0_PART: Part = Part::Directory { routing: R_GROUP, first: FIRST_C, shards: SHARDS };
const R_PART: Part = Part::Routing { first: FIRST_C, shards: SHARDS };

fn c_part(shard: u64) -> Part {
    Part::Conversations { routing: R_GROUP, shard, shards: SHARDS }
}

/// What the network does between two steps: the `pick`-th letter in flight on one of
/// the links (`link`: between the routing shard and each conversation shard both
/// ways, and from the metadata group to each) is proposed to its destination, and the
/// answer may reach the sender (`answered`); with `restart`, every group changes
/// leader first.
#[derive(Clone, Debug)]
struct Post {
    link: usize,
    pick: usize,
    answered: bool,
    restart: bool,
}

fn posts() -> impl Strategy<Value = Vec<Post>> {
    let post = (0..LINKS, 0..3usize, prop::bool::weighted(0.8), prop::bool::weighted(0.05));
    prop::collection::vec(post.prop_map(|(link, pick, answered, restart)| Post { link, pick, answered, restart }), 0..5)
}

struct Group {
    id: GroupId,
    part: Part,
    state: ShardState,
    store: MemStore,
}

/// Links between the groups: `C_k` to `R`, `R` to `C_k`, `G0` to `R`, `G0` to `C_k`.
const LINKS: usize = 3 * SHARDS as usize + 1;

struct Split {
    g0: Group,
    r: Group,
    cs: Vec<Group>,
    /// Conversations started without a visitor id, to spread them over the shards.
    anonymous: u64,
    /// Letters applied, for the failure message.
    applied: Vec<(GroupId, Mail)>,
}

/// Runs one entry on one group the way a node does, checking its invariants.
fn run_checked(group: &mut Group, entry: &Envelope) -> Result<(Reply, core::Outcome), Error> {
    let loads: BTreeMap<OperatorId, u32> = group.state.operators.iter().map(|(id, op)| (id.clone(), op.load())).collect();
    let result = records::run_as(&mut group.state, &group.store, entry, group.part);
    if let Ok((_, outcome)) = &result {
        if outcome.events.iter().any(|e| matches!(e, Event::ConversationsDeleted { .. })) {
            PURGED.with(|p| p.set(true));
        }
    }
    // A conversation shard decides no capacity (I3 is the routing shard's): its
    // operators' loads mirror the routing shard's letters, which may arrive after a
    // capacity was lowered there.
    let loads = if group.id == R_GROUP { loads } else { group.state.operators.iter().map(|(id, op)| (id.clone(), op.load())).collect() };
    if group.id == G0_GROUP {
        assert!(group.state.conversations.is_empty() && group.state.offers.is_empty(), "the metadata group holds no conversation");
    }
    check_invariants(&group.state, &group.store, &loads);
    if let Part::Conversations { shard, shards, .. } = group.part {
        for id in group.state.conversations.keys() {
            assert_eq!(id.0 % shards, shard, "{id} was numbered by conversation shard {shard}");
        }
    }
    result
}

fn spread(text: &str) -> u64 {
    text.bytes().map(u64::from).sum::<u64>() % SHARDS
}

impl Split {
    fn new(setup: &Setup) -> Split {
        let group = |id: GroupId, part: Part| {
            let (state, store) = initial(setup);
            Group { id, part, state, store }
        };
        Split {
            g0: group(G0_GROUP, G0_PART),
            r: group(R_GROUP, R_PART),
            cs: (0..SHARDS).map(|k| group(FIRST_C + k, c_part(k))).collect(),
            anonymous: 0,
            applied: Vec::new(),
        }
    }

    /// The conversation shards a command goes to, by `placement::target`.
    fn shards_for(&mut self, command: &Command) -> Vec<usize> {
        let by_id = |id: &ConversationId| vec![(id.0 % SHARDS) as usize];
        match placement::target(command) {
            placement::Target::Conversation(id) => by_id(&id),
            placement::Target::NewConversation { visitor: Some(visitor) } => vec![spread(&visitor) as usize],
            placement::Target::NewConversation { visitor: None } => {
                self.anonymous += 1;
                vec![(self.anonymous % SHARDS) as usize]
            }
            placement::Target::Sender { channel, sender } => vec![spread(&format!("{channel}:{sender}")) as usize],
            placement::Target::OwnConversationShard => match command {
                Command::DeliveriesAttempted { items, .. } => items.first().map(|(c, _)| by_id(c)).unwrap_or_default(),
                Command::DeliveryResults { results } => results.first().map(|r| by_id(&r.conversation)).unwrap_or_default(),
                // Each shard's own timers (retention, inactivity).
                _ => (0..SHARDS as usize).collect(),
            },
            placement::Target::Every => (0..SHARDS as usize).collect(),
            _ => Vec::new(),
        }
    }

    /// Proposes a command where `placement` sends it: directory commands to the
    /// metadata group, which passes them on by letter; the letters an outcome makes are
    /// posted in the same apply.
    fn submit(&mut self, entry: &Envelope) {
        // An operator's close goes where the node sends it (`SplitBackend::route_as`): to
        // the routing shard once it decides with rules 11, before that to the
        // conversation shard (logs written before rules 11 replay that way).
        if let Command::CloseByOperator { conversation, .. } = &entry.command {
            if self.r.state.rules < 11 {
                let _ = run_checked(&mut self.cs[(conversation.0 % SHARDS) as usize], entry);
                return;
            }
        }
        let owner = placement::target(&entry.command).owner();
        if matches!(owner, Some(Owner::Directory) | None) {
            let _ = run_checked(&mut self.g0, entry);
        }
        if matches!(owner, Some(Owner::Routing) | None) {
            let _ = run_checked(&mut self.r, entry);
        }
        for k in self.shards_for(&entry.command) {
            let _ = run_checked(&mut self.cs[k], entry);
        }
    }

    /// One letter arrives (a repeat or an early one is answered without being applied),
    /// and its answer may.
    fn deliver(&mut self, post: &Post, at: Timestamp) {
        if post.restart {
            for group in [&mut self.g0, &mut self.r].into_iter().chain(self.cs.iter_mut()) {
                group.state = records::load(&group.store).expect("the records load");
            }
        }
        let shards = SHARDS as usize;
        let (source, dest) = match post.link {
            l if l < shards => (&mut self.cs[l], &mut self.r),
            l if l < 2 * shards => (&mut self.r, &mut self.cs[l - shards]),
            l if l == 2 * shards => (&mut self.g0, &mut self.r),
            l => (&mut self.g0, &mut self.cs[(l - 2 * shards - 1) % shards]),
        };
        let (from, to) = (source.id, dest.id);
        let letters: Vec<(u64, Mail)> = source.state.mail_out.get(&to).map(|o| o.unconfirmed().map(|(id, m)| (id, m.clone())).collect()).unwrap_or_default();
        let Some((id, mail)) = letters.get(post.pick.min(letters.len().saturating_sub(1))).cloned() else { return };
        let before = dest.state.mail_in.last(from);
        let deliver = Envelope::new(at, Command::Deliver { from, id, mail: mail.clone() });
        let last = match run_checked(dest, &deliver) {
            Ok((Reply::Delivered { last }, _)) => last,
            other => panic!("a letter is always answered with what was applied: {other:?}"),
        };
        assert_eq!(last, if id == before + 1 { id } else { before }, "only the next letter is applied");
        if id == before + 1 {
            self.applied.push((to, mail));
        }
        if post.answered {
            let confirm = Envelope::new(at, Command::ConfirmMail { to, upto: last });
            if last > 0 {
                run_checked(source, &confirm).expect("an answer names posted letters only");
            }
            assert!(source.state.mail_out.get(&to).is_some_and(|o| o.unconfirmed().all(|(i, _)| i > last)), "a confirmation drops what it covers");
        }
    }

    /// Runs `steps` from `now` on, each with the letters it lets through, then lets
    /// every letter arrive and checks that the groups agree.
    fn run(&mut self, steps: &[(u64, Step, Vec<Post>)], mut now: u64) {
        for (pause, step, posts) in steps {
            now += pause;
            // Resolved against what routing knows (offers, holders); a conversation
            // shard that has not heard of an assignment yet refuses the holder's reply.
            let command = resolve(&self.r.state, step);
            self.submit(&Envelope::new(Timestamp(now), command));
            for post in posts {
                self.deliver(post, Timestamp(now));
            }
        }
        self.drain(Timestamp(now));
        check_agreement(self);
    }

    /// Every letter in flight arrives, in order, until no group has any.
    fn drain(&mut self, at: Timestamp) {
        for _ in 0..10_000 {
            let pending = [&self.g0, &self.r].into_iter().chain(&self.cs).any(|g| g.state.mail_out.values().any(|o| !o.is_empty()));
            if !pending {
                return;
            }
            for link in 0..LINKS {
                self.deliver(&Post { link, pick: 0, answered: true, restart: false }, at);
            }
        }
        panic!("mail did not settle");
    }
}

/// A conversation as one group sees it, from its hot state or its records.
fn seen_by(group: &Group, id: ConversationId) -> Option<(ConversationStatus, SkillGroupId)> {
    match group.state.conversations.get(&id) {
        Some(conv) => Some((conv.status.clone(), conv.group.clone())),
        None => records::load_conversation(&group.store, id, false).expect("readable").map(|c| (c.status, c.group)),
    }
}

/// Once no letter is in flight, the routing shard and each conversation's shard agree
/// on its place: held by the same operator, queued in the same group, or closed (or
/// never seen by routing: a bot's conversation, or one closed before it was queued);
/// and the routing shard and each conversation shard hold the directory the metadata
/// group decided.
fn check_agreement(split: &Split) {
    for n in 0..64 {
        let id = ConversationId(n);
        let c = seen_by(&split.cs[(n % SHARDS) as usize], id);
        let r = seen_by(&split.r, id);
        let agree = match (&c, &r) {
            (None, None) => true,
            (Some((ConversationStatus::Closed | ConversationStatus::WithBot, _)), None) => true,
            (Some((ConversationStatus::Closed, _)), Some((ConversationStatus::Closed, _))) => true,
            (Some((ConversationStatus::Assigned { operator: a }, _)), Some((ConversationStatus::Assigned { operator: b }, _))) => a == b,
            (Some((ConversationStatus::Queued { .. }, a)), Some((ConversationStatus::Queued { .. }, b))) => a == b,
            _ => false,
        };
        assert!(agree, "{id}: its conversation shard has it {c:?}, the routing shard {r:?}; letters applied: {:#?}", split.applied);
    }
    let configs = |s: &ShardState| {
        let operators: Vec<&OperatorConfig> = s.operators.values().map(|o| &o.config).collect();
        serde_json::to_string(&(&s.channels, &s.users, &s.templates, s.groups.values().map(|g| &g.config).collect::<Vec<_>>(), operators)).expect("serializes")
    };
    for group in std::iter::once(&split.r).chain(&split.cs) {
        assert_eq!(configs(&group.state), configs(&split.g0.state), "group {} holds the directory the metadata group decided", group.id);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn split_into_conversation_and_routing_shards_the_core_keeps_its_invariants_and_all_agree_when_quiet(
        setup in setup(),
        steps in prop::collection::vec((pause(), step(), posts()), 0..40),
    ) {
        PURGED.with(|p| p.set(false));
        let mut split = Split::new(&setup);
        let now = 1000;
        for command in prelude(&setup) {
            split.submit(&Envelope::new(Timestamp(now), command));
            // The directory reaches the conversation shards before the sequence starts.
            split.drain(Timestamp(now));
        }
        split.run(&steps, now);
    }
}

/// Rules 11: an operator's close is decided where the holder is known. A supervisor
/// moves a conversation from ann to bob; ann closes it before the letter saying so has
/// reached its conversation shard. Her close is refused, and bob keeps the conversation.
#[test]
fn the_previous_holder_cannot_close_a_conversation_moved_away_from_them() {
    let setup = Setup { rules: RULES_VERSION, capacities: [3, 3, 3], groups: [vec![0, 1], vec![0, 1], vec![0, 1]], online: [true; 3] };
    let mut split = Split::new(&setup);
    let mut now = 1000;
    for command in prelude(&setup) {
        split.submit(&Envelope::new(Timestamp(now), command));
        split.drain(Timestamp(now));
    }
    now += 10;
    let offer = split.r.state.offers.values().next().cloned().expect("routing offered a started conversation");
    let (x, ann) = (offer.conversation, offer.operator.clone());
    split.submit(&Envelope::new(Timestamp(now), Command::AcceptOffer { operator: ann.clone(), offer: offer.id }));
    split.drain(Timestamp(now));
    let shard = (x.0 % SHARDS) as usize;
    assert_eq!(seen_by(&split.cs[shard], x).map(|(s, _)| s), Some(ConversationStatus::Assigned { operator: ann.clone() }));

    now += 10;
    let bob = OPERATORS.iter().map(|id| OperatorId::new(*id)).find(|op| *op != ann).expect("another operator");
    let reassign = Command::Reassign { by: "sup".into(), conversation: x, target: TransferTarget::Operator(bob.clone()), comment: String::new() };
    assert_eq!(placement::target(&reassign), placement::Target::ConversationRouting(x));
    run_checked(&mut split.r, &Envelope::new(Timestamp(now), reassign)).expect("the supervisor moves it to bob");
    // The `Reassigned` letter is still on its way: the conversation shard says ann.
    assert_eq!(seen_by(&split.cs[shard], x).map(|(s, _)| s), Some(ConversationStatus::Assigned { operator: ann.clone() }));

    now += 10;
    let close = Command::CloseByOperator { operator: ann.clone(), conversation: x, resolution: "done".into(), tags: vec![] };
    assert_eq!(placement::target(&close), placement::Target::ConversationRouting(x), "decided by routing");
    let refused = run_checked(&mut split.r, &Envelope::new(Timestamp(now), close.clone()));
    assert!(matches!(refused, Err(Error::NotAssigned { .. })), "routing knows bob holds it: {refused:?}");
    // A build from before rules 11 sent it to the conversation shard, which refuses it now.
    let stale = run_checked(&mut split.cs[shard], &Envelope::new(Timestamp(now), close));
    assert!(matches!(stale, Err(Error::Unreachable(_))), "{stale:?}");

    split.drain(Timestamp(now));
    for (who, group) in [("routing", &split.r), ("conversation shard", &split.cs[shard])] {
        assert_eq!(seen_by(group, x).map(|(s, _)| s), Some(ConversationStatus::Assigned { operator: bob.clone() }), "the {who} has bob holding it");
    }
    check_agreement(&split);

    // Bob's close is decided by routing, reaches the conversation shard by letter, and
    // frees his capacity there and then.
    now += 10;
    let load = |split: &Split| split.r.state.operators.get(&bob).map(|op| op.load());
    let before = load(&split);
    let close = Command::CloseByOperator { operator: bob.clone(), conversation: x, resolution: "solved".into(), tags: vec![] };
    run_checked(&mut split.r, &Envelope::new(Timestamp(now), close)).expect("bob closes it");
    assert_eq!(load(&split), before.map(|l| l - 1), "his capacity is free at once");
    assert_ne!(seen_by(&split.cs[shard], x).map(|(s, _)| s), Some(ConversationStatus::Closed), "the letter has not arrived");
    split.drain(Timestamp(now));
    assert_eq!(seen_by(&split.cs[shard], x).map(|(s, _)| s), Some(ConversationStatus::Closed));
    let history = records::history(&split.cs[shard].store, x, 0, 100).expect("history");
    let closed: Vec<_> = history.iter().filter(|e| matches!(e.item, HistoryItem::Closed { .. })).collect();
    assert_eq!(closed.len(), 1, "one close in the history: {history:?}");
    check_agreement(&split);
}

/// Rules 13: the routing shard may take a conversation shard's `Enqueue` before the
/// metadata group's letter that makes the conversation's skill group (they come over two
/// links, in no order). The conversation waits in the group's queue once the group
/// arrives, and it is offered; the hot state is what a restart rebuilds from the records.
#[test]
fn a_conversation_enqueued_before_its_group_reaches_routing_is_queued_when_the_group_does() {
    let setup = Setup { rules: RULES_VERSION, capacities: [3, 3, 3], groups: [vec![0, 1], vec![0, 1], vec![0, 1]], online: [true; 3] };
    let mut split = Split::new(&setup);
    let now = Timestamp(1000);
    for command in prelude(&setup) {
        split.submit(&Envelope::new(now, command));
        split.drain(now);
    }
    let late = SkillGroupId::new("late");
    split.submit(&Envelope::new(now, Command::UpsertSkillGroup(SkillGroupConfig { id: late.clone(), name: "Late".into(), policy: Policy::LongestIdle, offer_timeout_ms: 1000, sla_ms: 60_000 })));
    split.submit(&Envelope::new(now, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("late-web"), kind: "web".into(), name: "late".into(), default_group: late.clone() })));
    let operator = OperatorConfig { id: OperatorId::new(OPERATORS[0]), name: OPERATORS[0].into(), capacity: 3, groups: vec![SkillGroupId::new(GROUPS[0]), late.clone()] };
    split.submit(&Envelope::new(now, Command::UpsertOperator(operator)));
    // The metadata group's letters reach both conversation shards, not routing.
    let shards = SHARDS as usize;
    for _ in 0..10 {
        for k in 0..shards {
            split.deliver(&Post { link: 2 * shards + 1 + k, pick: 0, answered: true, restart: false }, now);
        }
    }
    for k in 0..shards {
        assert!(split.cs[k].state.groups.contains_key(&late), "conversation shard {k} has the new group");
    }
    let visitor = Visitor { id: Some("v-late".into()), name: "V".into(), attributes: vec![] };
    split.submit(&Envelope::new(now, Command::StartConversation { channel: ChannelId::new("late-web"), group: None, visitor }));
    // Its `Enqueue` reaches routing first.
    for _ in 0..4 {
        for k in 0..shards {
            split.deliver(&Post { link: k, pick: 0, answered: true, restart: false }, now);
        }
    }
    let x = split.r.state.conversations.iter().find(|(_, c)| c.group == late).map(|(id, _)| *id).expect("routing knows the conversation");
    assert!(!split.r.state.groups.contains_key(&late), "routing has not heard of the group yet");
    split.drain(now);
    let queued = split.r.state.groups.get(&late).is_some_and(|g| g.queue.iter().any(|(_, id)| *id == x));
    let offered = split.r.state.offers.values().any(|o| o.conversation == x);
    assert!(queued, "the conversation waits in its group's queue");
    assert!(offered, "and is offered to the group's operator");
    let reloaded = records::load(&split.r.store).expect("the records load");
    assert_eq!(reloaded.groups.get(&late).map(|g| g.queue.clone()), split.r.state.groups.get(&late).map(|g| g.queue.clone()), "a restart rebuilds the same queue");
    check_agreement(&split);
}

/// A routing shard on rules 12 that heard of a conversation before its group left it out
/// of the group's queue (a restarted replica, rebuilding the queues from the records, has
/// it there): adopting rules 13 puts it back, so replicas decide alike from then on.
#[test]
fn adopting_rules_13_puts_back_a_conversation_an_earlier_build_left_out_of_its_queue() {
    let late = SkillGroupId::new("late");
    let x = ConversationId(FIRST_C + 5);
    // The same log on two replicas, one of which restarts (its queues rebuilt from the
    // records) before the adoption.
    let replica = |restart: bool| {
        let (mut state, store) = initial(&Setup { rules: 12, capacities: [1, 1, 1], groups: [vec![0], vec![0], vec![0]], online: [false; 3] });
        let at = Timestamp(1000);
        let run = |state: &mut ShardState, command: Command| records::run_as(state, &store, &Envelope::new(at, command), R_PART).expect("applied");
        let enqueue = Mail::Enqueue { conversation: x, channel: ChannelId::new("web"), visitor: Visitor::default(), group: late.clone(), created_at: at, sticky: None };
        run(&mut state, Command::Deliver { from: FIRST_C, id: 1, mail: enqueue });
        let group = Command::UpsertSkillGroup(SkillGroupConfig { id: late.clone(), name: "Late".into(), policy: Policy::LongestIdle, offer_timeout_ms: 1000, sla_ms: 60_000 });
        run(&mut state, Command::Deliver { from: G0_GROUP, id: 1, mail: Mail::Directory { rules: 12, command: Box::new(group) } });
        let kim = Command::UpsertOperator(OperatorConfig { id: OperatorId::new("kim"), name: "Kim".into(), capacity: 1, groups: vec![late.clone()] });
        run(&mut state, Command::Deliver { from: G0_GROUP, id: 2, mail: Mail::Directory { rules: 12, command: Box::new(kim) } });
        run(&mut state, Command::SetPresence { operator: OperatorId::new("kim"), presence: Presence::Online });
        let queued = |state: &ShardState| state.groups.get(&late).is_some_and(|g| g.queue.iter().any(|(_, c)| *c == x));
        assert!(!queued(&state) && state.offers.is_empty(), "rules 12 left it out of the queue: nobody was offered it");
        assert!(queued(&records::load(&store).expect("loads")), "a restarted replica has it there");
        if restart {
            state = records::load(&store).expect("loads");
        }
        run(&mut state, Command::AdoptRules { version: 13 });
        assert!(queued(&state) || state.offers.values().any(|o| o.conversation == x), "adopting rules 13 puts it back");
        let offers: Vec<(OfferId, ConversationId, OperatorId)> = state.offers.values().map(|o| (o.id, o.conversation, o.operator.clone())).collect();
        (offers, state.next_offer, state.groups[&late].queue.clone())
    };
    let (stayed, restarted) = (replica(false), replica(true));
    assert_eq!(stayed.0, vec![(OfferId(0), x, OperatorId::new("kim"))], "the group is routed: kim is offered it");
    assert_eq!(stayed, restarted, "a replica that restarted and one that did not decide alike");
}

/// The directory of the rules-14 tests: skill group `late`, operator `lee` of `capacity`
/// in it, and a voice conversation weighing 3.
fn late_directory(capacity: u32) -> Vec<Command> {
    let late = SkillGroupId::new("late");
    vec![
        Command::UpsertSkillGroup(SkillGroupConfig { id: late.clone(), name: "Late".into(), policy: Policy::LongestIdle, offer_timeout_ms: 1000, sla_ms: 60_000 }),
        Command::UpsertOperator(OperatorConfig { id: OperatorId::new("lee"), name: "Lee".into(), capacity, groups: vec![late] }),
        Command::SetChannelWeights { weights: vec![("voice".into(), 3)] },
    ]
}

/// Rules 14: a routing shard may hear of a conversation before its channel (the
/// conversation shard's `Enqueue` and the metadata group's letter come over two links).
/// It offers the conversation only once it knows the channel's kind, so the channel's
/// weight counts against capacity (before, it weighed 1 and lee was offered a voice call
/// on top of a full desk), and routes the group again when the channel arrives. A
/// channel whose kind changes has its pending offers made again under the new weight.
#[test]
fn a_conversation_whose_channel_routing_has_not_heard_of_waits_for_it() {
    let decide = |rules: u32| {
        let (mut state, store) = initial(&Setup { rules, capacities: [1, 1, 1], groups: [vec![0], vec![0], vec![0]], online: [false; 3] });
        let at = Timestamp(1000);
        let run = |state: &mut ShardState, command: Command| {
            records::run_as(state, &store, &Envelope::new(at, command), R_PART).expect("applied");
        };
        let (late, lee) = (SkillGroupId::new("late"), OperatorId::new("lee"));
        let mut directory = late_directory(3);
        directory.insert(1, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("chat"), kind: "web".into(), name: "chat".into(), default_group: late.clone() }));
        let mut from_g0 = 0;
        for command in directory {
            from_g0 += 1;
            run(&mut state, Command::Deliver { from: G0_GROUP, id: from_g0, mail: Mail::Directory { rules, command: Box::new(command) } });
        }
        run(&mut state, Command::SetPresence { operator: lee.clone(), presence: Presence::Online });
        let enqueue = |id: u64, channel: &str| Mail::Enqueue { conversation: ConversationId(id), channel: ChannelId::new(channel), visitor: Visitor::default(), group: late.clone(), created_at: at, sticky: None };
        // A chat lee is offered (load 1 of 3), then a call on a channel routing has not
        // heard of yet.
        let (chat, call) = (FIRST_C + 5, FIRST_C + 5 + SHARDS);
        run(&mut state, Command::Deliver { from: FIRST_C, id: 1, mail: enqueue(chat, "chat") });
        run(&mut state, Command::Deliver { from: FIRST_C, id: 2, mail: enqueue(call, "phone") });
        let offered = |state: &ShardState, id: u64| state.offers.values().any(|o| o.conversation == ConversationId(id));
        let call_offered_early = offered(&state, call);
        // Nor may a supervisor hand it to lee meanwhile.
        let reassign = Command::Reassign { by: "sue".into(), conversation: ConversationId(call), target: TransferTarget::Operator(lee.clone()), comment: String::new() };
        let reassigned = records::run_as(&mut state, &store, &Envelope::new(at, reassign), R_PART).is_ok();
        assert!(rules < 14 || !reassigned, "a conversation whose channel routing does not know was reassigned");
        // The channel arrives: a voice call weighs 3, lee has 2 left.
        from_g0 += 1;
        let phone = ChannelConfig { id: ChannelId::new("phone"), kind: "voice".into(), name: "phone".into(), default_group: late.clone() };
        run(&mut state, Command::Deliver { from: G0_GROUP, id: from_g0, mail: Mail::Directory { rules, command: Box::new(Command::UpsertChannel(phone.clone())) } });
        let within = state.operators.get(&lee).is_some_and(|op| state.load_of(op) <= op.config.capacity);
        let call_offered_then = offered(&state, call);
        // The chat's offer is declined: lee's room (3) is the call's weight, and the
        // group is routed again.
        let chat_offer = state.offers.values().find(|o| o.conversation == ConversationId(chat)).map(|o| o.id);
        if let Some(offer) = chat_offer {
            run(&mut state, Command::DeclineOffer { offer, operator: lee.clone(), reason: "busy".into() });
        }
        let call_offered_at_room = offered(&state, call);
        // The phone channel becomes a web one: its pending offer is withdrawn and made
        // again under weight 1.
        let offer_before = state.offers.values().find(|o| o.conversation == ConversationId(call)).map(|o| o.id);
        from_g0 += 1;
        let web = ChannelConfig { kind: "web".into(), ..phone };
        run(&mut state, Command::Deliver { from: G0_GROUP, id: from_g0, mail: Mail::Directory { rules, command: Box::new(Command::UpsertChannel(web)) } });
        let offer_after = state.offers.values().find(|o| o.conversation == ConversationId(call)).map(|o| o.id);
        (call_offered_early, within, call_offered_then, call_offered_at_room, offer_before.is_some() && offer_after.is_some() && offer_before != offer_after)
    };
    let (early, within, then, at_room, made_again) = decide(RULES_VERSION);
    assert!(!early, "the call waits until routing knows its channel");
    assert!(within, "lee is within capacity once the channel's weight is known");
    assert!(!then, "a call weighing 3 is not offered on top of a chat to a desk of 3");
    assert!(at_room, "once lee has room for it, the call is offered");
    assert!(made_again, "a change of the channel's kind makes its pending offer again");
    let (early, within, ..) = decide(13);
    assert!(early && !within, "rules 13 offered the call weighed as 1 and lee went over capacity once the channel arrived");
}

/// A routing shard on rules 13 offered a conversation whose channel it had not heard of
/// (weighed 1); after it adopts rules 14 the channel's arrival withdraws that offer, and
/// the conversation is offered again under the channel's weight.
#[test]
fn an_offer_made_under_rules_13_before_its_channel_is_made_again_when_the_channel_arrives() {
    let (mut state, store) = initial(&Setup { rules: 13, capacities: [1, 1, 1], groups: [vec![0], vec![0], vec![0]], online: [false; 3] });
    let at = Timestamp(1000);
    let run = |state: &mut ShardState, command: Command| {
        records::run_as(state, &store, &Envelope::new(at, command), R_PART).expect("applied");
    };
    let (late, lee) = (SkillGroupId::new("late"), OperatorId::new("lee"));
    let directory = late_directory(2);
    for (id, command) in directory.into_iter().enumerate() {
        run(&mut state, Command::Deliver { from: G0_GROUP, id: id as u64 + 1, mail: Mail::Directory { rules: 13, command: Box::new(command) } });
    }
    run(&mut state, Command::SetPresence { operator: lee.clone(), presence: Presence::Online });
    let call = ConversationId(FIRST_C + 5);
    let enqueue = Mail::Enqueue { conversation: call, channel: ChannelId::new("phone"), visitor: Visitor::default(), group: late.clone(), created_at: at, sticky: None };
    run(&mut state, Command::Deliver { from: FIRST_C, id: 1, mail: enqueue });
    assert!(state.offers.values().any(|o| o.conversation == call), "rules 13 offered it weighed as 1");
    run(&mut state, Command::AdoptRules { version: 14 });
    let phone = ChannelConfig { id: ChannelId::new("phone"), kind: "voice".into(), name: "phone".into(), default_group: late.clone() };
    run(&mut state, Command::Deliver { from: G0_GROUP, id: 4, mail: Mail::Directory { rules: 14, command: Box::new(Command::UpsertChannel(phone)) } });
    assert!(!state.offers.values().any(|o| o.conversation == call), "the offer lee could not hold under the call's weight is withdrawn");
    let lee_now = &state.operators[&lee];
    assert!(state.load_of(lee_now) <= lee_now.config.capacity, "lee is within capacity");
}

/// Rules 11: a conversation's routing shard counts its age from when it started, not
/// from when the letter announcing it arrived (a bot held it, or the letter waited for
/// the routing shard's leader): its SLA and its answer time are the customer's wait.
#[test]
fn routing_counts_a_conversation_s_age_from_its_start() {
    let setup = Setup { rules: RULES_VERSION, capacities: [1, 1, 1], groups: [vec![0], vec![0], vec![0]], online: [false; 3] };
    let mut split = Split::new(&setup);
    for command in prelude(&setup) {
        split.submit(&Envelope::new(Timestamp(1000), command));
        split.drain(Timestamp(1000));
    }
    let started = 2000;
    split.submit(&Envelope::new(Timestamp(started), Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor { id: Some("late".into()), name: "Late".into(), attributes: vec![] } }));
    // The routing shard hears of it a minute later.
    split.drain(Timestamp(started + 60_000));
    let (id, conv) = split.r.state.conversations.iter().max_by_key(|(id, _)| **id).map(|(id, c)| (*id, c.clone())).expect("routing knows it");
    assert_eq!(conv.created_at, Timestamp(started), "{id} is as old as its start");
    let stored = records::load_conversation(&split.r.store, id, false).expect("readable").expect("stored");
    assert_eq!(stored.created_at, Timestamp(started), "and its record says so");
}

/// Rules 11: a conversation deleted by its channel's retention leaves nothing behind in
/// its routing shard, its place in the closed index included.
#[test]
fn retention_leaves_nothing_of_a_conversation_in_its_routing_shard() {
    let setup = Setup { rules: RULES_VERSION, capacities: [3, 3, 3], groups: [vec![0, 1], vec![0, 1], vec![0, 1]], online: [true; 3] };
    let mut split = Split::new(&setup);
    let now = 1000;
    for command in prelude(&setup) {
        split.submit(&Envelope::new(Timestamp(now), command));
        split.drain(Timestamp(now));
    }
    split.submit(&Envelope::new(Timestamp(now), Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 }));
    split.drain(Timestamp(now));
    let offers: Vec<Offer> = split.r.state.offers.values().cloned().collect();
    for offer in &offers {
        split.submit(&Envelope::new(Timestamp(now + 10), Command::AcceptOffer { operator: offer.operator.clone(), offer: offer.id }));
        split.drain(Timestamp(now + 10));
        let close = Command::CloseByOperator { operator: offer.operator.clone(), conversation: offer.conversation, resolution: String::new(), tags: vec![] };
        split.submit(&Envelope::new(Timestamp(now + 20), close));
        split.drain(Timestamp(now + 20));
    }
    let closed_index = |store: &MemStore| store.scan(b"e", None, 100).expect("scan").len();
    assert!(closed_index(&split.r.store) > 0, "the routing shard indexes its closed conversations too");
    let later = Timestamp(now + 3 * 86_400_000);
    split.submit(&Envelope::new(later, Command::PurgeExpired { as_of: later }));
    split.drain(later);
    let web: Vec<ConversationId> = offers.iter().map(|o| o.conversation).filter(|c| split.cs[(c.0 % SHARDS) as usize].store.get(&records::key::conversation(*c)).expect("read").is_none()).collect();
    assert!(!web.is_empty(), "the web channel's conversations were purged");
    for c in &web {
        assert!(split.r.store.get(&records::key::conversation(*c)).expect("read").is_none(), "{c} left the routing shard");
    }
    let left: Vec<Vec<u8>> = split.r.store.scan(b"e", None, 100).expect("scan").into_iter().map(|(k, _)| k).filter(|k| web.iter().any(|c| k.ends_with(&c.0.to_be_bytes()))).collect();
    assert!(left.is_empty(), "the closed index of the routing shard kept {left:?}");
    // An operator's feed no longer shows anything of them: not the offer with the
    // visitor's name (kept by the routing shard), not the assignment or the release.
    let named = |item: &switchboard_actors::state::FeedItem| {
        use switchboard_actors::state::FeedItem::*;
        match item {
            Offered { conversation, .. } | OfferWithdrawn { conversation, .. } | Assigned { conversation, .. } | Conversation { conversation, .. } | Released { conversation } | Delivery { conversation, .. } => {
                web.contains(conversation)
            }
            _ => false,
        }
    };
    for offer in &offers {
        for store in std::iter::once(&split.r.store).chain(split.cs.iter().map(|c| &c.store)) {
            let feed = records::feed(store, &offer.operator, 0, usize::MAX).expect("feed");
            let shown: Vec<_> = feed.iter().filter(|e| named(&e.item)).collect();
            assert!(shown.is_empty(), "{}'s feed still shows purged conversations: {shown:?}", offer.operator);
        }
    }
}

/// Rules 20: a customer's close and rating reach the routing shard with when the
/// conversation shard took them, and count then: the handle time and the hour of the
/// KPIs, and the holder's wrap-up, which a letter that waited two hours (a routing
/// shard without a leader) finds over. Under rules 19 they counted when the letter came.
#[test]
fn a_close_and_a_rating_count_when_the_conversation_shard_took_them() {
    const HOUR: u64 = 3_600_000;
    for rules in [19, RULES_VERSION] {
        let setup = Setup { rules, capacities: [1, 1, 1], groups: [vec![0], vec![0], vec![0]], online: [true, false, false] };
        let mut split = Split::new(&setup);
        let now = 10 * HOUR;
        for command in prelude(&setup) {
            split.submit(&Envelope::new(Timestamp(now), command));
            split.drain(Timestamp(now));
        }
        let group = SkillGroupId::new("g0");
        let routing = GroupRouting { wrap_up_ms: 60_000, ..GroupRouting::default() };
        split.submit(&Envelope::new(Timestamp(now), Command::SetGroupRouting { group: group.clone(), routing }));
        split.drain(Timestamp(now));
        let offer = split.r.state.offers.values().find(|o| split.r.state.conversations.get(&o.conversation).is_some_and(|c| c.group == group)).cloned().expect("an offer in g0");
        split.submit(&Envelope::new(Timestamp(now + 1000), Command::AcceptOffer { operator: offer.operator.clone(), offer: offer.id }));
        split.drain(Timestamp(now + 1000));
        let conversation = offer.conversation;
        // Closed and rated by the customer at 10:00:05; the routing shard hears of it
        // at 12:00:00.
        let closed = now + 5000;
        split.submit(&Envelope::new(Timestamp(closed), Command::CloseByClient { conversation }));
        split.submit(&Envelope::new(Timestamp(closed + 10), Command::Rate { conversation, score: 4, comment: String::new() }));
        let heard = now + 2 * HOUR;
        split.drain(Timestamp(heard));
        let kpi = |hour: u64| split.r.state.kpis.get(&group).and_then(|h| h.get(&hour)).cloned().unwrap_or_default();
        let (took, came) = (kpi(closed / HOUR), kpi(heard / HOUR));
        let wrap_up = split.r.state.wrap_up.get(&offer.operator).copied();
        if rules < 20 {
            assert_eq!((came.handled, came.rated, came.handle_ms), (1, 1, heard - (now + 1000)), "rules 19: when the letters came");
            assert_eq!(wrap_up, Some(Timestamp(heard + 60_000)));
            continue;
        }
        assert_eq!((took.handled, took.rated, took.rating_sum, took.handle_ms), (1, 1, 4, 4000), "the hour and handle time of the close");
        assert_eq!((came.handled, came.rated), (0, 0));
        assert!(wrap_up.is_none_or(|until| until <= Timestamp(heard)), "the wrap-up was over before the letter came: {wrap_up:?}");
    }
}

/// Rules 25: a customer's close on the conversation shard and an operator's accept on
/// the routing shard cross (each decided before the other's letter came): the
/// conversation shard drops the late `Assigned` (it is closed), so no operator ever
/// reached the customer. Under rules 24 the routing shard still counted the conversation
/// answered (with its wait, within the SLA) and handled, with a handle time of 0, and
/// not abandoned; from rules 25 it takes the answer back and counts it abandoned, as a
/// group of one does (it refuses the accept after the close). A close after the
/// `Assigned` letter reached the conversation shard is answered and handled under both.
#[test]
fn under_rules_25_a_customer_s_close_crossing_an_accept_is_abandoned_not_answered() {
    const HOUR: u64 = 3_600_000;
    let now = 10 * HOUR;
    let g0 = SkillGroupId::new("g0");
    let setup = |rules: u32| Setup { rules, capacities: [1, 1, 1], groups: [vec![0], vec![0], vec![0]], online: [true, false, false] };
    // (answered, wait_ms, answered_in_sla, handled, timed, handle_ms, abandoned)
    let counted = |k: &switchboard_actors::state::GroupKpi| (k.answered, k.wait_ms, k.answered_in_sla, k.handled, k.timed, k.handle_ms, k.abandoned);
    // A group of one: the customer leaves at +1 s, the operator's accept at +2 s finds
    // the offer gone.
    let (mut state, store) = initial(&setup(24));
    for command in prelude(&setup(24)) {
        let _ = records::run(&mut state, &store, &Envelope::new(Timestamp(now), command));
    }
    let offer = state.offers.values().find(|o| state.conversations.get(&o.conversation).is_some_and(|c| c.group == g0)).cloned().expect("an offer in g0");
    records::run(&mut state, &store, &Envelope::new(Timestamp(now + 1000), Command::CloseByClient { conversation: offer.conversation })).expect("closed");
    let accepted = records::run(&mut state, &store, &Envelope::new(Timestamp(now + 2000), Command::AcceptOffer { operator: offer.operator.clone(), offer: offer.id }));
    assert!(matches!(accepted, Err(Error::OfferGone(_))), "{accepted:?}");
    assert_eq!(counted(&state.kpis_since(0)[&g0]), (0, 0, 0, 0, 0, 0, 1), "a group of one counts it abandoned");
    for rules in [24, RULES_VERSION] {
        for crossing in [true, false] {
            let mut split = Split::new(&setup(rules));
            for command in prelude(&setup(rules)) {
                split.submit(&Envelope::new(Timestamp(now), command));
                split.drain(Timestamp(now));
            }
            let offer = split.r.state.offers.values().find(|o| split.r.state.conversations.get(&o.conversation).is_some_and(|c| c.group == g0)).cloned().expect("an offer in g0");
            let conversation = offer.conversation;
            let accept = Envelope::new(Timestamp(now + 2000), Command::AcceptOffer { operator: offer.operator.clone(), offer: offer.id });
            if crossing {
                // The customer leaves at +1 s; the operator accepts at +2 s, before the
                // close's letter reaches routing (and the `Assigned` letter the
                // conversation shard).
                split.submit(&Envelope::new(Timestamp(now + 1000), Command::CloseByClient { conversation }));
                split.submit(&accept);
                assert!(matches!(split.r.state.conversations[&conversation].status, ConversationStatus::Assigned { .. }), "routing assigned it");
            } else {
                // Accepted at +2 s, which the conversation shard hears of; closed at +3 s.
                split.submit(&accept);
                split.drain(Timestamp(now + 2000));
                split.submit(&Envelope::new(Timestamp(now + 3000), Command::CloseByClient { conversation }));
            }
            split.drain(Timestamp(now + 4000));
            check_agreement(&split);
            assert!(!split.r.state.answered_at.contains_key(&conversation), "rules {rules}: no answer time is kept for a closed conversation");
            let kpi = split.r.state.kpis_since(0)[&g0].clone();
            assert_eq!(records::load(&split.r.store).expect("load").kpis_since(0)[&g0], kpi, "rules {rules}: the records hold the same");
            let expected = match (crossing, rules) {
                // Answered after a 2 s wait (within the SLA), handled 1 s later.
                (false, _) => (1, 2000, 1, 1, 1, 1000, 0),
                (true, 24) => (1, 2000, 1, 1, 1, 0, 0),
                (true, _) => (0, 0, 0, 0, 0, 0, 1),
            };
            assert_eq!(counted(&kpi), expected, "rules {rules}, crossing {crossing}");
        }
    }
}

/// Rules 20: a conversation shard whose routing shard takes no letters (no leader, a
/// partition) starts no conversation once `MAX_UNCONFIRMED_LETTERS` wait, so what
/// anonymous starts make every member hold is bounded; its open conversations go on,
/// and starts resume once the routing shard confirms. Under rules 19 the letters grew
/// without a bound.
#[test]
fn a_conversation_shard_starts_no_conversation_while_its_routing_shard_takes_no_letters() {
    for rules in [19, RULES_VERSION] {
        let setup = Setup { rules, capacities: [1, 1, 1], groups: [vec![0], vec![0], vec![0]], online: [false; 3] };
        let mut split = Split::new(&setup);
        for command in prelude(&setup) {
            split.submit(&Envelope::new(Timestamp(1000), command));
            split.drain(Timestamp(1000));
        }
        let c = &mut split.cs[0];
        let start = |n: u64| Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor { id: Some(format!("v{n}")), name: String::new(), attributes: vec![] } };
        let waiting = |c: &Group| c.state.mail_out.get(&R_GROUP).map_or(0, |o| o.len());
        let mut n = 0;
        let mut open = None;
        while waiting(c) < core::MAX_UNCONFIRMED_LETTERS {
            n += 1;
            match records::run_as(&mut c.state, &c.store, &Envelope::new(Timestamp(2000 + n), start(n)), c.part) {
                Ok((Reply::Started { conversation, .. }, _)) => open = Some(conversation),
                other => panic!("start {n} under rules {rules}: {other:?}"),
            }
        }
        let open = open.expect("started");
        let refused = records::run_as(&mut c.state, &c.store, &Envelope::new(Timestamp(9000), start(0)), c.part);
        if rules < 20 {
            assert!(matches!(refused, Ok((Reply::Started { .. }, _))), "rules 19 starts it: {refused:?}");
            continue;
        }
        assert!(matches!(&refused, Err(Error::Unavailable(why)) if why.contains("no conversation starts here")), "{refused:?}");
        assert_eq!(waiting(c), core::MAX_UNCONFIRMED_LETTERS, "the refused start posted nothing");
        let message = Command::PostClientMessage { conversation: open, key: "k1".into(), text: "still here".into(), attachments: vec![] };
        let posted = records::run_as(&mut c.state, &c.store, &Envelope::new(Timestamp(9001), message), c.part);
        assert!(posted.is_ok(), "an open conversation goes on: {posted:?}");
        // The routing shard takes them: starts resume.
        let last = c.state.mail_out.get(&R_GROUP).map_or(0, |o| o.last_posted());
        records::run_as(&mut c.state, &c.store, &Envelope::new(Timestamp(9002), Command::ConfirmMail { to: R_GROUP, upto: last }), c.part).expect("confirmed");
        let again = records::run_as(&mut c.state, &c.store, &Envelope::new(Timestamp(9003), start(0)), c.part);
        assert!(matches!(again, Ok((Reply::Started { .. }, _))), "{again:?}");
        // And after a restart the same.
        c.state = records::load(&c.store).expect("the records load");
        assert_eq!(waiting(c), 1);
    }
}

// ---------------------------------------------------------------------------------
// `switchboard cluster split`: a group of one, split offline (`cutover::Splitter`),
// goes on as ADR 0006's split.

/// The history of conversation `id` in `store`, in order.
fn history_of(store: &MemStore, id: ConversationId) -> Vec<(Vec<u8>, Vec<u8>)> {
    store.scan(&records::key::history_prefix(id), None, usize::MAX).expect("a memory store scans")
}

proptest! {
    #![proptest_config(config())]

    /// Whatever a node of one group went through, its records split into the metadata
    /// group, the routing shard and the conversation shards load in each, keep the
    /// core's invariants there, agree with each other, hold every conversation's whole
    /// history in its shard and every operator's load in routing; and the split goes on
    /// taking commands as if it had always been split. A cut-over is refused only for a
    /// channel sender's open conversation outside the shard the sender's next message
    /// goes to.
    #[test]
    fn a_group_of_one_split_offline_keeps_its_conversations_and_goes_on_as_a_split(
        setup in setup(),
        before in prop::collection::vec((pause(), step()), 0..40),
        after in prop::collection::vec((pause(), step(), posts()), 0..20),
    ) {
        PURGED.with(|p| p.set(false));
        let setup = Setup { rules: RULES_VERSION, ..setup };
        let (mut whole, store) = initial(&setup);
        let mut now = 1000;
        for command in prelude(&setup) {
            let _ = apply_checked(&mut whole, &store, &Envelope::new(Timestamp(now), command));
        }
        for (pause, step) in &before {
            now += pause;
            let command = resolve(&whole, step);
            let _ = apply_checked(&mut whole, &store, &Envelope::new(Timestamp(now), command));
        }

        let mut splitter = Splitter::new(SHARDS);
        let stores: BTreeMap<SplitPart, MemStore> =
            std::iter::once(SplitPart::Directory).chain(std::iter::once(SplitPart::Routing)).chain((0..SHARDS).map(SplitPart::Conversations)).map(|p| (p, MemStore::default())).collect();
        for (key, value) in all_records(&store) {
            match splitter.route(&key, &value) {
                Ok(out) => {
                    for (part, key, value) in out {
                        stores[&part].write(vec![(key, Some(value))]);
                    }
                }
                Err(refused) => {
                    // Only a sender's open conversation in the wrong shard refuses it.
                    let misplaced = whole.conversations.values().any(|c| {
                        c.status != ConversationStatus::Closed
                            && c.visitor.id.as_deref().and_then(|v| v.strip_prefix(&format!("{}:", c.channel))).is_some_and(|sender| {
                                switchboard_actors::cutover::stable_hash(&[c.channel.as_str().as_bytes(), sender.as_bytes()]) % SHARDS != c.id.0 % SHARDS
                            })
                    });
                    prop_assert!(misplaced, "refused without a misplaced sender conversation: {refused}");
                    return Ok(());
                }
            }
        }
        let group = |id: GroupId, part: Part, which: SplitPart| {
            let store = stores[&which].clone();
            Group { id, part, state: records::load(&store).expect("a split group's records load"), store }
        };
        let mut split = Split {
            g0: group(G0_GROUP, G0_PART, SplitPart::Directory),
            r: group(R_GROUP, R_PART, SplitPart::Routing),
            cs: (0..SHARDS).map(|k| group(FIRST_C + k, c_part(k), SplitPart::Conversations(k))).collect(),
            anonymous: 0,
            applied: Vec::new(),
        };
        for group in std::iter::once(&split.g0).chain(std::iter::once(&split.r)).chain(&split.cs) {
            let loads = group.state.operators.iter().map(|(id, op)| (id.clone(), op.load())).collect();
            check_invariants(&group.state, &group.store, &loads);
        }
        prop_assert!(split.g0.state.conversations.is_empty() && split.g0.state.offers.is_empty(), "the metadata group holds no conversation");
        for (k, shard) in split.cs.iter().enumerate() {
            for (id, op) in &shard.state.operators {
                for c in &op.active {
                    let held = shard.state.conversations.get(c).and_then(|conv| conv.assigned().cloned());
                    prop_assert_eq!(held.as_ref(), Some(id), "{} in shard {}: an operator holds only that shard's conversations, assigned to them", c, k);
                }
                prop_assert!(op.offers.is_empty(), "a conversation shard holds no offers");
            }
        }
        let loads = |s: &ShardState| s.operators.iter().map(|(id, op)| (id.clone(), (op.load(), op.presence))).collect::<BTreeMap<_, _>>();
        prop_assert_eq!(loads(&split.r.state), loads(&whole), "routing holds every operator's load and presence");
        prop_assert_eq!(&split.r.state.queued_since, &whole.queued_since, "routing knows since when each conversation waits");
        prop_assert_eq!(&split.r.state.sticky, &whole.sticky, "and whom a returning customer's conversation goes to first");
        for id in all_records(&store).keys().filter(|k| k.first() == Some(&b'c')).filter_map(|k| k.get(1..9)).map(|b| ConversationId(u64::from_be_bytes(b.try_into().unwrap_or_default()))) {
            let shard = &split.cs[(id.0 % SHARDS) as usize];
            prop_assert_eq!(history_of(&shard.store, id), history_of(&store, id), "{}: its whole history is in its shard", id);
            prop_assert_eq!(seen_by(shard, id).map(|(s, _)| s.clone()).is_some(), true);
        }
        check_agreement(&split);
        split.run(&after, now);
    }
}
