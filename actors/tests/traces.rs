//! Routing decisions as readable traces. Each file in `tests/traces/` holds a fixture
//! (commands, one a line) and, after a `----` line, the exact trace the core must
//! produce. `SWITCHBOARD_BLESS=1 cargo test -p switchboard-actors --test traces`
//! rewrites the expectations after a deliberate change; review the diff.

use std::fmt::Write as _;
use std::path::Path;

use switchboard_actors::core::Reply;
use switchboard_actors::model::*;
use switchboard_actors::state::ShardState;

const SEPARATOR: &str = "----";

fn words(line: &str) -> Vec<String> {
    // Splits on spaces, keeping "quoted text" together.
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(stripped) = rest.strip_prefix('"') {
            let end = stripped.find('"').expect("closing quote");
            out.push(stripped[..end].to_string());
            rest = stripped[end + 1..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = rest[end..].trim_start();
        }
    }
    out
}

fn conv(word: &str) -> ConversationId {
    ConversationId(word.trim_start_matches('c').parse().expect("conversation id like c0"))
}

fn offer(word: &str) -> OfferId {
    OfferId(word.trim_start_matches('o').parse().expect("offer id like o0"))
}

fn parse(line: &str) -> (Timestamp, Command) {
    let w = words(line);
    let at = Timestamp(w[0].trim_start_matches('@').parse().expect("@time"));
    let a = |i: usize| w.get(i).cloned().unwrap_or_default();
    let op = |i: usize| OperatorId::new(a(i));
    let command = match a(1).as_str() {
        "group" => Command::UpsertSkillGroup(SkillGroupConfig {
            id: SkillGroupId::new(a(2)),
            name: a(2),
            policy: if a(3) == "least_occupied" { Policy::LeastOccupied } else { Policy::LongestIdle },
            offer_timeout_ms: a(4).parse().expect("timeout"),
            sla_ms: 60_000,
        }),
        "operator" => Command::UpsertOperator(OperatorConfig {
            id: op(2),
            name: a(2),
            capacity: a(3).parse().expect("capacity"),
            groups: w[4..].iter().map(SkillGroupId::new).collect(),
        }),
        "channel" => Command::UpsertChannel(ChannelConfig {
            id: ChannelId::new(a(2)),
            kind: "web".into(),
            name: a(2),
            default_group: SkillGroupId::new(a(3)),
        }),
        "start" => Command::StartConversation {
            channel: ChannelId::new(a(2)),
            group: w.get(3).map(SkillGroupId::new),
            visitor: Visitor { id: None, name: "Visitor".into(), attributes: vec![] },
        },
        "presence" => Command::SetPresence {
            operator: op(2),
            presence: match a(3).as_str() {
                "online" => Presence::Online,
                "away" => Presence::Away,
                "break" => Presence::Break,
                _ => Presence::Offline,
            },
        },
        "client" => Command::PostClientMessage { conversation: conv(&a(2)), key: a(3), text: a(4), attachments: vec![] },
        "client-close" => Command::CloseByClient { conversation: conv(&a(2)) },
        "rate" => Command::Rate { conversation: conv(&a(2)), score: a(3).parse().expect("score"), comment: a(4) },
        "accept" => Command::AcceptOffer { operator: op(2), offer: offer(&a(3)) },
        "decline" => Command::DeclineOffer { operator: op(2), offer: offer(&a(3)), reason: a(4) },
        "expire" => Command::ExpireOffer { offer: offer(&a(2)) },
        "route" => Command::RouteQueue { group: SkillGroupId::new(a(2)) },
        "rules" => Command::AdoptRules { version: a(2).parse().expect("rules version") },
        "read" => Command::MarkRead {
            conversation: conv(&a(2)),
            reader: if a(3) == "client" { Reader::Client } else { Reader::Operator(op(3)) },
            upto: a(4).parse().expect("upto"),
        },
        "say" => Command::PostOperatorMessage { operator: op(2), conversation: conv(&a(3)), key: a(4), text: a(5), attachments: vec![] },
        "transfer" => Command::Transfer {
            operator: op(2),
            conversation: conv(&a(3)),
            target: if a(4) == "group" { TransferTarget::Group(SkillGroupId::new(a(5))) } else { TransferTarget::Operator(op(5)) },
            comment: a(6),
        },
        "close" => Command::CloseByOperator {
            operator: op(2),
            conversation: conv(&a(3)),
            resolution: a(4),
            tags: w.get(5).map(|t| t.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        },
        "reassign" => Command::Reassign {
            by: a(2),
            conversation: conv(&a(3)),
            target: if a(4) == "group" { TransferTarget::Group(SkillGroupId::new(a(5))) } else { TransferTarget::Operator(op(5)) },
            comment: a(6),
        },
        // `vstart web key=value …`: a visitor with attributes; `id=…` is their verified id.
        "vstart" => Command::StartConversation {
            channel: ChannelId::new(a(2)),
            group: None,
            visitor: Visitor {
                id: w[3..].iter().find_map(|kv| kv.strip_prefix("id=")).map(str::to_owned),
                name: "Visitor".into(),
                attributes: w[3..].iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            },
        },
        // `routing sales ageing=10000 wrap=5000 attr=tier:vip:50 …`
        "routing" => {
            let mut routing = GroupRouting::default();
            for setting in &w[3..] {
                match setting.split_once('=') {
                    Some(("ageing", ms)) => routing.ageing_ms = ms.parse().expect("ageing ms"),
                    Some(("wrap", ms)) => routing.wrap_up_ms = ms.parse().expect("wrap-up ms"),
                    Some(("sticky", ms)) => routing.sticky_ms = ms.parse().expect("sticky ms"),
                    Some(("remind", ms)) => routing.inactivity_remind_ms = ms.parse().expect("remind ms"),
                    Some(("inactive", ms)) => routing.inactivity_close_ms = ms.parse().expect("inactive ms"),
                    // `needs=billing:3`
                    Some(("needs", need)) => {
                        let (skill, level) = need.split_once(':').expect("skill:level");
                        routing.required_skills.push((skill.into(), level.parse().expect("level")));
                    }
                    // `skillrule=language:ru:ru:3`
                    Some(("skillrule", rule)) => {
                        let parts: Vec<&str> = rule.split(':').collect();
                        routing.skill_rules.push(SkillRule { attribute: parts[0].into(), value: parts[1].into(), skill: parts[2].into(), level: parts[3].parse().expect("level") });
                    }
                    Some(("attr", rule)) => {
                        let parts: Vec<&str> = rule.split(':').collect();
                        routing.attribute_priorities.push(AttributePriority {
                            attribute: parts[0].into(),
                            value: parts[1].into(),
                            priority: parts[2].parse().expect("priority"),
                        });
                    }
                    _ => panic!("unknown routing setting {setting:?}"),
                }
            }
            Command::SetGroupRouting { group: SkillGroupId::new(a(2)), routing }
        }
        "channel-priority" => Command::SetChannelPriority { channel: ChannelId::new(a(2)), priority: a(3).parse().expect("priority") },
        "ready" => Command::EndWrapUp { operator: op(2) },
        "sweep" => Command::SweepInactive,
        // `skills ann billing=4 ru=2`
        "skills" => Command::SetOperatorSkills {
            operator: op(2),
            skills: w[3..].iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.parse().expect("level"))).collect(),
        },
        // `channels ann email=1 only=web,email`
        "channels" => {
            let mut limits = ChannelLimits::default();
            for setting in &w[3..] {
                match setting.split_once('=') {
                    Some(("only", kinds)) => limits.only = kinds.split(',').map(str::to_owned).collect(),
                    Some((kind, n)) => limits.per_kind.push((kind.to_owned(), n.parse().expect("limit"))),
                    None => panic!("channel setting {setting:?}"),
                }
            }
            Command::SetOperatorChannels { operator: op(2), limits }
        }
        // `kchannel mail email sales`: a channel of another kind
        "kchannel" => Command::UpsertChannel(ChannelConfig { id: ChannelId::new(a(2)), kind: a(3), name: a(2), default_group: SkillGroupId::new(a(4)) }),
        "pause-reasons" => Command::SetPauseReasons { reasons: a(2).split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect() },
        "break" => Command::TakeBreak { operator: op(2), reason: a(3) },
        // `emergency channel web "text"`, `emergency group sales` (off)
        "emergency" => Command::SetEmergency {
            target: if a(2) == "channel" { NoticeTarget::Channel(ChannelId::new(a(3))) } else { NoticeTarget::Group(SkillGroupId::new(a(3))) },
            message: w.get(4).cloned(),
            by: "sup".into(),
        },
        // `steps sales 30000;max=2 90000;skills=;overflow=support`: each word one step,
        // `skills=billing/2+ru/1` (empty: none), `max=N`, `overflow=a,b`.
        "steps" => Command::SetGroupSteps {
            group: SkillGroupId::new(a(2)),
            steps: w[3..]
                .iter()
                .map(|word| {
                    let mut parts = word.split(';');
                    let mut step = RoutingStep { after_ms: parts.next().expect("after ms").parse().expect("after ms"), skills: None, max_level: 0, overflow: vec![] };
                    for part in parts {
                        match part.split_once('=') {
                            Some(("max", n)) => step.max_level = n.parse().expect("max level"),
                            Some(("overflow", groups)) => step.overflow = groups.split(',').map(SkillGroupId::new).collect(),
                            Some(("skills", list)) => {
                                step.skills = Some(
                                    list.split('+')
                                        .filter(|s| !s.is_empty())
                                        .map(|s| {
                                            let (name, level) = s.split_once('/').expect("skill/level");
                                            (name.to_owned(), level.parse().expect("level"))
                                        })
                                        .collect(),
                                )
                            }
                            _ => panic!("step setting {part:?}"),
                        }
                    }
                    step
                })
                .collect(),
        },
        // `hours sales UTC wait "text" thu=00:01-00:03 holiday=1970-01-02 holiday=1970-01-03=00:10-00:20`,
        // `transfer:support` as the action; `hours sales off` removes them.
        "hours" if a(3) == "off" => Command::SetGroupHours { group: SkillGroupId::new(a(2)), hours: None },
        "hours" => {
            let minute = |t: &str| -> u16 {
                let (h, m) = t.split_once(':').expect("HH:MM");
                h.parse::<u16>().expect("hour") * 60 + m.parse::<u16>().expect("minute")
            };
            let interval = |t: &str| -> (u16, u16) {
                let (o, c) = t.split_once('-').expect("HH:MM-HH:MM");
                (minute(o), minute(c))
            };
            let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
            let mut hours = OpeningHours {
                time_zone: a(3),
                weekly: vec![],
                holidays: vec![],
                closed_action: match a(4).as_str() {
                    "reply" => ClosedAction::Reply,
                    "wait" => ClosedAction::Wait,
                    t => ClosedAction::Transfer(SkillGroupId::new(t.strip_prefix("transfer:").expect("reply, wait or transfer:group"))),
                },
                message: a(5),
            };
            for setting in &w[6..] {
                let (name, value) = setting.split_once('=').expect("day=HH:MM-HH:MM");
                if name == "holiday" {
                    match value.split_once('=') {
                        Some((date, i)) => hours.holidays.push((date.to_owned(), vec![interval(i)])),
                        None => hours.holidays.push((value.to_owned(), vec![])),
                    }
                } else {
                    let (o, c) = interval(value);
                    hours.weekly.push((days.iter().position(|d| *d == name).expect("day") as u8, o, c));
                }
            }
            Command::SetGroupHours { group: SkillGroupId::new(a(2)), hours: Some(hours) }
        }
        // `weights email=2 voice=3`
        "weights" => Command::SetChannelWeights {
            weights: w[2..].iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.parse().expect("weight"))).collect(),
        },
        other => panic!("unknown fixture command {other:?} in {line:?}"),
    };
    (at, command)
}

fn render(event: &Event) -> String {
    match event {
        Event::SkillGroupUpserted(_)
        | Event::OperatorUpserted(_)
        | Event::ChannelUpserted(_)
        | Event::UserUpserted(_)
        | Event::SessionsEnded { .. }
        | Event::ChannelPublicGroupsSet { .. } => "config".into(),
        Event::ConversationStarted { conversation, .. } => format!("started {conversation}"),
        Event::ConversationQueued { conversation, group, ticket } => format!("queued {conversation} in {group} at #{ticket}"),
        Event::ClientMessagePosted { conversation, text, .. } => format!("client says {text:?} in {conversation}"),
        Event::OperatorMessagePosted { conversation, operator, text, .. } => format!("{operator} says {text:?} in {conversation}"),
        Event::OfferMade { offer, decision } => {
            let mut table = String::new();
            for c in &decision.candidates {
                let _ = match (&c.score, &c.excluded) {
                    (Some(score), _) => write!(table, " {}={}", c.operator, score),
                    (None, Some(why)) => write!(table, " {}:{}", c.operator, why.replace(' ', "-")),
                    (None, None) => Ok(()),
                };
            }
            format!(
                "offer {} of {} to {} until @{} [{}{}]",
                offer.id,
                offer.conversation,
                offer.operator,
                offer.deadline.0,
                decision.policy.name(),
                table
            )
        }
        Event::OfferAccepted { offer } => format!("accepted {offer}"),
        Event::OfferWithdrawn { offer, reason, .. } => format!("withdrawn {offer} ({reason:?})"),
        Event::ConversationAssigned { conversation, operator } => format!("assigned {conversation} to {operator}"),
        Event::ConversationTransferred { conversation, from, to, comment } => {
            format!("transferred {conversation} from {from} to {to:?} {comment:?}")
        }
        Event::ConversationClosed { conversation, by, tags, .. } if tags.is_empty() => format!("closed {conversation} by {by:?}"),
        Event::ConversationClosed { conversation, by, tags, .. } => format!("closed {conversation} by {by:?} tagged {}", tags.join(",")),
        Event::ConversationReassigned { conversation, by, to, .. } => format!("reassigned {conversation} by {by} to {to:?}"),
        Event::TemplateUpserted(t) => format!("template {}", t.id),
        Event::TemplateDeleted { id } => format!("template {id} deleted"),
        Event::FavouriteSet { operator, template, favourite } => format!("{operator} favourite {template} {favourite}"),
        Event::AttachmentStored(a) => format!("attachment {}", a.id.0),
        Event::ConversationRated { conversation, score, .. } => format!("rated {conversation} {score}"),
        Event::PresenceChanged { operator, presence } => format!("{operator} is {presence:?}"),
        Event::RoundRestarted { conversation } => format!("new round for {conversation}"),
        Event::ReadMarked { conversation, by, upto } => format!("{by:?} read {conversation} up to #{upto}"),
        Event::RulesAdopted { version } => format!("rules {version} from here on"),
        Event::ChannelRetentionSet { channel, days } => format!("{channel} keeps closed conversations {days} days"),
        Event::ConversationsDeleted { conversations } => format!("deleted {conversations:?}"),
        Event::PassForgotten { conversation, operator } => format!("{operator}'s pass on {conversation} forgotten"),
        Event::NoteAdded { conversation, name, .. } => format!("{name} noted on {conversation}"),
        Event::OperatorsConnected { node, operators } => format!("node {node} holds sockets of {operators:?}"),
        Event::WentAbsent { operator } => format!("{operator} away: disconnected"),
        Event::GroupRoutingSet { group, routing } => format!("{group} routing: {routing:?}"),
        Event::ChannelPrioritySet { channel, priority } => format!("{channel} priority {priority}"),
        Event::WrapUpSet { operator, until: Some(until) } => format!("{operator} wraps up until @{}", until.0),
        Event::WrapUpSet { operator, until: None } => format!("{operator} ready"),
        Event::StickySet { conversation, operator } => format!("{conversation} goes to {operator} first (served them last)"),
        Event::CustomerReminded { conversation, text } => format!("{conversation} reminded: {text}"),
        Event::OperatorChannelsSet { operator, limits } => format!("{operator} channels {limits:?}"),
        Event::OperatorSkillsSet { operator, skills } => format!("{operator} skills {skills:?}"),
        Event::PauseReasonsSet { reasons } => format!("pause reasons {reasons:?}"),
        Event::BreakTaken { operator, reason } => format!("{operator} on break: {reason}"),
        Event::EmergencySet { target, message: Some(text), by } => format!("emergency on {target:?} by {by}: {text}"),
        Event::EmergencySet { target, message: None, by } => format!("emergency off {target:?} by {by}"),
        Event::NoticeGiven { conversation, text } => format!("{conversation} told: {text}"),
        Event::AccessRuleSet { rule, note, .. } => format!("access {rule:?}: {note:?}"),
        Event::ChannelAccessSet { channel, allow_only, .. } => format!("{channel} allow_only={allow_only}"),
        Event::GroupStepsSet { group, steps } => format!("{group} steps {steps:?}"),
        Event::GroupHoursSet { group, hours: Some(h) } => format!("{group} hours in {} ({:?}): {:?} holidays {:?}", h.time_zone, h.closed_action, h.weekly, h.holidays),
        Event::GroupHoursSet { group, hours: None } => format!("{group} always open"),
        Event::ChannelWeightsSet { weights } => format!("weights {weights:?}"),
        Event::OfferStep { offer, step } => format!("{offer} made at step {step}"),
        Event::ChannelAdapterSet { channel, adapter } => format!("{channel} adapter {:?}", adapter.as_ref().map(|a| a.kind())),
        Event::InboundTaken { conversation, key } => format!("{conversation} took inbound {key}"),
        Event::StartKeyTaken { conversation, channel, key } => format!("{conversation} took start key {key} in {channel}"),
        Event::NodeForgotten { id } => format!("node {id} removed from the cluster"),
        Event::DeliveriesAttempted { node, items } => format!("node {node} sends {items:?}"),
        Event::DeliveryResults { results } => format!("delivery results {results:?}"),
        Event::DeliveryRetried { conversation, seq, by } => format!("{conversation}/{seq} sent again by {by}"),
        Event::ChannelIdentitySet { channel, key } => format!("{channel} identities {:?}", key.as_ref().map(|k| k.alg())),
        Event::ChannelBotSet { channel, bot } => format!("{channel} bot {:?}", bot.as_ref().map(|b| b.url.as_str())),
        Event::BotTook { conversation, group } => format!("bot holds {conversation} (for {group})"),
        Event::BotMessagePosted { conversation, text, buttons, .. } => format!("bot says in {conversation}: {text} {buttons:?}"),
        Event::HandedOff { conversation, group, reason, context } => format!("bot hands {conversation} to {group}: {reason} {context:?}"),
        Event::MailPosted { to, id, mail } => format!("letter {id} to group {to}: {mail:?}"),
        Event::MailReceived { from, id } => format!("letter {id} from group {from} applied"),
        Event::MailConfirmed { to, upto } => format!("group {to} confirmed letters up to {upto}"),
        Event::HoldersSet { group, nodes } => format!("group {group} is held by nodes {nodes:?}"),
        Event::ConversationAged { conversation, created_at } => format!("{conversation} started at {}", created_at.0),
    }
}

fn run(fixture: &str) -> String {
    // Fixtures run under the newest rules, unless they adopt rules themselves.
    let pinned = fixture.lines().any(|l| l.split_whitespace().nth(1) == Some("rules"));
    let mut state = ShardState { rules: if pinned { 0 } else { switchboard_actors::core::RULES_VERSION }, ..ShardState::default() };
    let store = switchboard_actors::records::MemStore::default();
    let mut trace = String::new();
    for line in fixture.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `@100 x100 start web`: the command a hundred times; the first and last are traced.
        let (times, command_line) = match line.split_once(' ').and_then(|(at, rest)| rest.strip_prefix('x').and_then(|r| r.split_once(' ')).map(|(n, c)| (at, n, c))) {
            Some((at, n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => (n.parse::<usize>().expect("repeat count"), format!("{at} {rest}")),
            _ => (1, line.to_owned()),
        };
        let _ = writeln!(trace, "> {line}");
        for i in 0..times {
            let (at, command) = parse(&command_line);
            let shown = i == 0 || i + 1 == times;
            if times > 2 && i + 1 == times {
                let _ = writeln!(trace, "  … {} more like it, then:", times - 2);
            }
            match switchboard_actors::records::run(&mut state, &store, &Envelope::new(at, command)) {
                Ok((reply, outcome)) if shown => {
                    for event in &outcome.events {
                        let rendered = render(event);
                        if rendered != "config" {
                            let _ = writeln!(trace, "  {rendered}");
                        }
                    }
                    if let Reply::Message { duplicate: true, seq } = reply {
                        let _ = writeln!(trace, "  duplicate of #{seq}");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = writeln!(trace, "  refused: {e}");
                }
            }
        }
    }
    // Invariants I2 and I3 after every fixture.
    for op in state.operators.values() {
        assert!(state.load_of(op) <= op.config.capacity, "{} over capacity", op.config.id);
    }
    let mut holders = std::collections::BTreeMap::new();
    for op in state.operators.values() {
        for c in &op.active {
            assert!(holders.insert(*c, op.config.id.clone()).is_none(), "{c} assigned twice");
        }
    }
    trace
}

#[test]
fn routing_traces() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/traces");
    let bless = std::env::var_os("SWITCHBOARD_BLESS").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("traces dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no trace fixtures found");
    let mut failures = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read fixture");
        let (fixture, expected) = text.split_once(&format!("\n{SEPARATOR}\n")).unwrap_or((&text, ""));
        let actual = run(fixture);
        if bless {
            std::fs::write(&path, format!("{}\n{SEPARATOR}\n{actual}", fixture.trim_end())).expect("write fixture");
        } else if actual != expected {
            failures.push(format!("{}:\n--- expected\n{expected}\n--- actual\n{actual}", path.display()));
        }
    }
    assert!(failures.is_empty(), "trace mismatch (SWITCHBOARD_BLESS=1 to update):\n{}", failures.join("\n"));
}
