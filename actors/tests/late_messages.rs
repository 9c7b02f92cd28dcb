//! Rules 26, on a split cluster: an operator's close is decided by the routing shard
//! (rules 11) and reaches the conversation shard by letter. What the customer wrote in
//! between (the conversation shard still had the conversation open and took it) was left
//! in the closed conversation, read by nobody. From rules 26 a messenger customer's late
//! message is carried into a new conversation of theirs, which routing offers; a web
//! visitor is told nobody read it. Rules 27, the same split: an operator the
//! conversation shard hears of after the letter that gave them one of its
//! conversations holds it there.

use switchboard_actors::core::{Part, Reply, LATE_NOTICE};
use switchboard_actors::mail::{GroupId, Mail};
use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::{ConversationStatus, FeedItem, HistoryItem, ShardState};
use switchboard_actors::Error;

const R: GroupId = 2;
const C: GroupId = 3;
const T0: u64 = 1_000_000;

struct Group {
    id: GroupId,
    part: Part,
    state: ShardState,
    store: MemStore,
}

fn run(group: &mut Group, at: u64, command: Command) -> Result<(Reply, Vec<Event>), Error> {
    records::run_as(&mut group.state, &group.store, &Envelope::new(Timestamp(at), command), group.part).map(|(reply, outcome)| (reply, outcome.events))
}

fn ok(group: &mut Group, at: u64, command: Command) -> (Reply, Vec<Event>) {
    run(group, at, command).expect("accepted")
}

/// Every letter `from` holds for `to` arrives in order and is confirmed.
fn ferry(from: &mut Group, to: &mut Group, at: u64) {
    let letters: Vec<(u64, Mail)> = from.state.mail_out.get(&to.id).map(|o| o.unconfirmed().map(|(id, m)| (id, m.clone())).collect()).unwrap_or_default();
    for (id, mail) in letters {
        let (reply, _) = ok(to, at, Command::Deliver { from: from.id, id, mail });
        assert_eq!(reply, Reply::Delivered { last: id });
        ok(from, at, Command::ConfirmMail { to: to.id, upto: id });
    }
}

fn ann() -> OperatorId {
    OperatorId::new("ann")
}

fn tg() -> ChannelId {
    ChannelId::new("tg")
}

fn web() -> ChannelId {
    ChannelId::new("web")
}

/// The routing shard and one conversation shard under `rules`, each told the directory
/// (group `g`, ann with room for 2, a web channel and a Telegram one with its adapter);
/// ann is online.
fn split(rules: u32) -> (Group, Group) {
    let group = |id, part| Group { id, part, state: ShardState::default(), store: MemStore::default() };
    let (mut r, mut c) = (group(R, Part::Routing { first: C, shards: 1 }), group(C, Part::Conversations { routing: R, shard: 0, shards: 1 }));
    let adapter = AdapterConfig::Telegram { bot_token: "123:abc".into(), secret: "s".repeat(20), api_base: "http://127.0.0.1:9".into() };
    for g in [&mut r, &mut c] {
        for command in [
            Command::AdoptRules { version: rules },
            Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "G".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 20_000 }),
            Command::UpsertOperator(OperatorConfig { id: ann(), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] }),
            Command::UpsertChannel(ChannelConfig { id: tg(), kind: "telegram".into(), name: "Telegram".into(), default_group: SkillGroupId::new("g") }),
            Command::UpsertChannel(ChannelConfig { id: web(), kind: "web".into(), name: "Web".into(), default_group: SkillGroupId::new("g") }),
            Command::SetChannelAdapter { channel: tg(), adapter: Some(adapter.clone()) },
        ] {
            ok(g, T0, command);
        }
    }
    ok(&mut r, T0, Command::SetPresence { operator: ann(), presence: Presence::Online });
    (r, c)
}

/// The conversation shard's conversation `conv` reaches routing, is offered to ann, who
/// takes it, and the conversation shard learns she holds it.
fn ann_takes(r: &mut Group, c: &mut Group, conv: ConversationId, at: u64) {
    ferry(c, r, at);
    let offer = r.state.offers.values().find(|o| o.conversation == conv).map(|o| o.id).expect("offered");
    ok(r, at, Command::AcceptOffer { operator: ann(), offer });
    ferry(r, c, at);
    assert_eq!(c.state.conversations[&conv].status, ConversationStatus::Assigned { operator: ann() });
}

fn close_by_ann(conv: ConversationId) -> Command {
    Command::CloseByOperator { operator: ann(), conversation: conv, resolution: "solved".into(), tags: vec![] }
}

fn inbound(id: &str, text: &str) -> Command {
    Command::ChannelInbound { channel: tg(), sender: "42".into(), sender_name: "Dana".into(), provider_message_id: id.into(), text: text.into() }
}

fn conversation_of(reply: &Reply) -> ConversationId {
    match reply {
        Reply::Inbound { conversation, .. } | Reply::Started { conversation } => *conversation,
        other => panic!("no conversation in {other:?}"),
    }
}

fn history(group: &Group, conv: ConversationId) -> Vec<HistoryItem> {
    records::history(&group.store, conv, 0, 1000).expect("history").into_iter().map(|e| e.item).collect()
}

fn client_texts(group: &Group, conv: ConversationId) -> Vec<String> {
    history(group, conv)
        .into_iter()
        .filter_map(|item| match item {
            HistoryItem::ClientMessage { text, .. } => Some(text),
            _ => None,
        })
        .collect()
}

#[test]
fn from_rules_26_a_messenger_customer_s_message_after_the_close_goes_on_in_a_new_conversation() {
    for rules in [25, 26] {
        let (mut r, mut c) = split(rules);
        let (reply, _) = ok(&mut c, T0 + 10, inbound("m1", "my card is blocked"));
        let conv = conversation_of(&reply);
        ann_takes(&mut r, &mut c, conv, T0 + 20);

        // Ann closes it on the routing shard; the letter has not reached the
        // conversation shard when Dana writes again, into what it still has open.
        ok(&mut r, T0 + 50, close_by_ann(conv));
        let letter = r.state.mail_out[&C].unconfirmed().last().map(|(_, m)| m.clone());
        if rules >= 26 {
            assert!(matches!(letter, Some(Mail::ClosedAt { conversation, at: Timestamp(at), .. }) if conversation == conv && at == T0 + 50), "{letter:?}");
        } else {
            assert!(matches!(letter, Some(Mail::Closed { conversation, .. }) if conversation == conv), "{letter:?}");
        }
        // With a photo of the card.
        let photo = InboundFile { id: AttachmentId("tg-photo-1".into()), name: "card.jpg".into(), content_type: "image/jpeg".into(), size: 64, sha256: "ab".repeat(32) };
        let late = Command::ChannelInboundRich { channel: tg(), sender: "42".into(), sender_name: "Dana".into(), provider_message_id: "m2".into(), text: "it is still blocked!".into(), files: vec![photo.clone()], thread: None, attributes: vec![] };
        let (reply, _) = ok(&mut c, T0 + 60, late);
        assert_eq!(conversation_of(&reply), conv, "taken into the conversation the shard has open");
        ferry(&mut r, &mut c, T0 + 70);

        assert_eq!(c.state.conversations.get(&conv).map(|x| x.status.clone()).unwrap_or(ConversationStatus::Closed), ConversationStatus::Closed);
        assert_eq!(client_texts(&c, conv), vec!["my card is blocked", "it is still blocked!"], "the closed conversation keeps what it took");
        let open_for_dana = c.state.open_senders.get(&(tg(), "tg:42".to_string())).copied();
        if rules < 26 {
            // Read by nobody: no conversation of Dana's is open, none is queued or offered.
            assert_eq!(open_for_dana, None, "rules 25 left the message in the closed conversation");
            assert!(c.state.mail_out.get(&R).is_none_or(|o| o.is_empty()), "nothing for routing");
            assert!(r.state.offers.is_empty() && r.state.groups[&SkillGroupId::new("g")].queue.is_empty());
            continue;
        }
        let again = open_for_dana.expect("a new conversation of Dana's");
        assert_ne!(again, conv);
        assert_eq!(client_texts(&c, again), vec!["it is still blocked!"], "only what came after the close is carried");
        // The photo is the new conversation's: its staff read it there, and purging the
        // closed conversation leaves it.
        let carried = history(&c, again).into_iter().find_map(|item| match item {
            HistoryItem::ClientMessage { attachments, .. } => attachments.first().cloned(),
            _ => None,
        });
        assert_eq!(carried.map(|a| (a.id, a.conversation)), Some((photo.id.clone(), again)));
        assert_eq!(records::find_attachment(&c.store, &photo.id).expect("read").map(|a| a.conversation), Some(again));
        ok(&mut c, T0 + 75, Command::SetChannelRetention { channel: tg(), days: 1 });
        ok(&mut c, T0 + 76, Command::PurgeExpired { as_of: Timestamp(T0 + 3 * 86_400_000) });
        assert!(records::history(&c.store, conv, 0, 10).expect("history").is_empty(), "the closed conversation is purged");
        assert_eq!(records::find_attachment(&c.store, &photo.id).expect("read").map(|a| a.conversation), Some(again), "its photo stays with the new one");
        assert!(matches!(c.state.conversations[&again].status, ConversationStatus::Queued { .. }));
        // Routing hears of it, and offers it to whoever held the closed one first.
        ferry(&mut c, &mut r, T0 + 80);
        let offered = r.state.offers.values().find(|o| o.conversation == again).map(|o| o.operator.clone());
        assert_eq!(offered, Some(ann()), "offered, to ann");
        // A provider's redelivery of the carried message is the duplicate it is; Dana's
        // next message joins the new conversation.
        let (reply, events) = ok(&mut c, T0 + 90, inbound("m2", "it is still blocked!"));
        assert!(matches!(reply, Reply::Inbound { duplicate: true, .. }) && events.is_empty(), "{reply:?} {events:?}");
        let (reply, _) = ok(&mut c, T0 + 100, inbound("m3", "hello?"));
        assert_eq!(conversation_of(&reply), again);
        // The same after a restart of either group.
        for g in [&mut r, &mut c] {
            g.state = records::load(&g.store).expect("the records load");
        }
        assert!(r.state.offers.values().any(|o| o.conversation == again));
        assert_eq!(c.state.open_senders.get(&(tg(), "tg:42".to_string())), Some(&again));
    }
}

#[test]
fn from_rules_26_a_web_visitor_is_told_their_message_after_the_close_was_not_read() {
    for rules in [25, 26] {
        let (mut r, mut c) = split(rules);
        let visitor = Visitor { id: Some("v1".into()), name: "Vera".into(), attributes: vec![] };
        let (reply, _) = ok(&mut c, T0 + 10, Command::StartConversation { channel: web(), group: None, visitor });
        let conv = conversation_of(&reply);
        let send = |key: &str, text: &str| Command::PostClientMessage { conversation: conv, key: key.into(), text: text.into(), attachments: vec![] };
        ok(&mut c, T0 + 15, send("k1", "hi"));
        ann_takes(&mut r, &mut c, conv, T0 + 20);

        ok(&mut r, T0 + 50, close_by_ann(conv));
        let (reply, _) = ok(&mut c, T0 + 60, send("k2", "one more question"));
        assert!(matches!(reply, Reply::Message { duplicate: false, .. }), "acknowledged: {reply:?}");
        ferry(&mut r, &mut c, T0 + 70);

        let items = history(&c, conv);
        let closed_at = items.iter().position(|i| matches!(i, HistoryItem::Closed { .. })).expect("closed");
        let after: Vec<&HistoryItem> = items[closed_at + 1..].iter().collect();
        if rules < 26 {
            assert!(after.is_empty(), "rules 25 said nothing: {after:?}");
        } else {
            assert!(matches!(after.as_slice(), [HistoryItem::Notice { text }] if text == LATE_NOTICE), "{after:?}");
        }
        // Nothing else is started (the visitor's socket follows this conversation), and
        // the conversation takes nothing more.
        assert_eq!(c.state.conversations.values().filter(|x| x.status != ConversationStatus::Closed).count(), 0);
        assert!(c.state.mail_out.get(&R).is_none_or(|o| o.is_empty()), "nothing for routing");
        let refused = run(&mut c, T0 + 80, send("k3", "hello?"));
        assert!(matches!(refused, Err(Error::Closed(x)) if x == conv), "{refused:?}");
    }
}

/// The message before the close is not carried, however many there are, and a close
/// nothing followed carries nothing.
#[test]
fn under_rules_26_a_close_nothing_followed_starts_nothing() {
    let (mut r, mut c) = split(26);
    let (reply, _) = ok(&mut c, T0 + 10, inbound("m1", "my card is blocked"));
    let conv = conversation_of(&reply);
    ann_takes(&mut r, &mut c, conv, T0 + 20);
    ok(&mut c, T0 + 30, inbound("m2", "thanks, bye"));
    ok(&mut r, T0 + 50, close_by_ann(conv));
    ferry(&mut r, &mut c, T0 + 70);
    assert_eq!(c.state.open_senders.get(&(tg(), "tg:42".to_string())), None);
    assert!(c.state.conversations.values().all(|x| x.status == ConversationStatus::Closed));
    assert!(c.state.mail_out.get(&R).is_none_or(|o| o.is_empty()), "no letter back: routing closed it");
    assert_eq!(history(&c, conv).last(), Some(&HistoryItem::Closed { by: Closer::Operator, resolution: "solved".into(), tags: vec![] }));
}

/// Rules 27: the routing shard hears of a new operator (the metadata group's letter)
/// before the conversation shard does, and gives them a conversation of it; the
/// conversation shard takes the assignment, then a message of the customer's, and only
/// then the operator. From rules 27 the operator holds it there, with an `Assigned`
/// item whose history holds that message; before, they held nothing on that shard.
#[test]
fn from_rules_27_an_operator_the_conversation_shard_hears_of_late_holds_what_they_were_given() {
    for rules in [26, 27] {
        let (mut r, mut c) = split(rules);
        let kim = OperatorId::new("kim");
        let config = OperatorConfig { id: kim.clone(), name: "Kim".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] };
        ok(&mut r, T0, Command::UpsertOperator(config.clone()));
        ok(&mut r, T0, Command::SetPresence { operator: ann(), presence: Presence::Away });
        ok(&mut r, T0 + 1, Command::SetPresence { operator: kim.clone(), presence: Presence::Online });
        let (reply, _) = ok(&mut c, T0 + 10, inbound("m1", "my card is blocked"));
        let conv = conversation_of(&reply);
        ferry(&mut c, &mut r, T0 + 20);
        let offer = r.state.offers.values().find(|o| o.conversation == conv && o.operator == kim).map(|o| o.id).expect("offered to kim");
        ok(&mut r, T0 + 30, Command::AcceptOffer { operator: kim.clone(), offer });
        ferry(&mut r, &mut c, T0 + 40);
        assert_eq!(c.state.conversations[&conv].status, ConversationStatus::Assigned { operator: kim.clone() });
        assert!(!c.state.operators.contains_key(&kim), "the conversation shard has not heard of kim yet");
        let (reply, _) = ok(&mut c, T0 + 50, inbound("m2", "hello?"));
        assert_eq!(conversation_of(&reply), conv);
        let newest = c.state.conversations[&conv].last_seq();

        ok(&mut c, T0 + 60, Command::UpsertOperator(config));
        let holds = |c: &ShardState| c.operators.get(&kim).is_some_and(|op| op.active.contains(&conv));
        let assigned: Vec<u64> = records::feed(&c.store, &kim, 0, 100)
            .expect("feed")
            .into_iter()
            .filter_map(|e| match e.item {
                FeedItem::Assigned { conversation, history_upto } if conversation == conv => Some(history_upto),
                _ => None,
            })
            .collect();
        let reloaded = records::load(&c.store).expect("the shard's records load");
        if rules >= 27 {
            assert!(holds(&c.state), "kim holds the conversation on the conversation shard");
            assert_eq!(assigned, vec![newest], "one Assigned item, its history taking in the message written meanwhile");
            assert!(holds(&reloaded), "and still after a restart");
            // The close releases it from kim's feed there.
            ok(&mut c, T0 + 70, Command::CloseByClient { conversation: conv });
            assert!(!holds(&c.state));
            let released = records::feed(&c.store, &kim, 0, 100).expect("feed").into_iter().any(|e| matches!(e.item, FeedItem::Released { conversation, .. } if conversation == conv));
            assert!(released, "kim's feed says the conversation left them");
        } else {
            assert!(!holds(&c.state) && assigned.is_empty() && !holds(&reloaded), "before rules 27 kim held nothing there");
        }
    }
}
