//! A messenger channel in the core (ADR 0009): an inbound message delivered three times
//! makes one message, the sender's next message joins their open conversation and one
//! after the close starts a new one; what staff write goes to the outbox, whose entries
//! move through attempts, retries, sends, receipts and dead letters the same after a
//! restart (rebuilt from the records).

use switchboard_actors::core::{inbound_key, Reply};
use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::{DeliveryStatus, HistoryItem, ShardState};
use switchboard_actors::Error;

fn run(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> Result<(Reply, Vec<Event>), Error> {
    let (reply, outcome) = records::run(state, store, &Envelope::new(Timestamp(at), command))?;
    Ok((reply, outcome.events))
}

fn ok(r: Result<(Reply, Vec<Event>), Error>) -> (Reply, Vec<Event>) {
    r.expect("accepted")
}

const T0: u64 = 1_000_000;

fn tg() -> ChannelId {
    ChannelId::new("tg")
}

/// Group `g`, operator `ann` online (capacity 2), channel `tg` with a Telegram adapter.
fn setup() -> (MemStore, ShardState) {
    setup_with(switchboard_actors::core::RULES_VERSION)
}

/// As [`setup`], under routing rules `rules`.
fn setup_with(rules: u32) -> (MemStore, ShardState) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    ok(run(&mut state, &store, T0, Command::AdoptRules { version: rules }));
    ok(run(&mut state, &store, T0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "G".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 20_000 })));
    ok(run(&mut state, &store, T0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] })));
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: tg(), kind: "telegram".into(), name: "Telegram".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, T0, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    (store, state)
}

fn connect(state: &mut ShardState, store: &MemStore) {
    let adapter = AdapterConfig::Telegram { bot_token: "123:abc".into(), secret: "s".repeat(20), api_base: "http://127.0.0.1:9".into() };
    ok(run(state, store, T0, Command::SetChannelAdapter { channel: tg(), adapter: Some(adapter) }));
}

fn inbound(sender: &str, id: &str, text: &str) -> Command {
    Command::ChannelInbound { channel: tg(), sender: sender.into(), sender_name: "Dana".into(), provider_message_id: id.into(), text: text.into() }
}

fn conversation_of(reply: &Reply) -> ConversationId {
    match reply {
        Reply::Inbound { conversation, .. } => *conversation,
        other => panic!("not an inbound reply: {other:?}"),
    }
}

fn client_texts(store: &MemStore, state: &mut ShardState, id: ConversationId) -> Vec<String> {
    let _ = state;
    records::history(store, id, 0, 1000)
        .expect("history")
        .into_iter()
        .filter_map(|e| match e.item {
            HistoryItem::ClientMessage { text, .. } => Some(text),
            _ => None,
        })
        .collect()
}

#[test]
fn a_channel_without_an_adapter_takes_no_inbound_message() {
    let (store, mut state) = setup();
    let refused = run(&mut state, &store, T0 + 1, inbound("42", "m1", "hello"));
    assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
    assert!(state.conversations.is_empty());
}

#[test]
fn a_redelivered_message_is_written_once_even_after_its_conversation_closed() {
    let (store, mut state) = setup();
    connect(&mut state, &store);
    let (reply, events) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    assert!(matches!(reply, Reply::Inbound { duplicate: false, .. }));
    assert!(events.iter().any(|e| matches!(e, Event::ConversationStarted { .. })));
    // The provider retries twice: nothing more is written.
    for at in [T0 + 20, T0 + 30] {
        let (reply, events) = ok(run(&mut state, &store, at, inbound("42", "m1", "hello")));
        assert_eq!(reply, Reply::Inbound { conversation: conv, duplicate: true });
        assert!(events.is_empty());
    }
    // The sender's next message joins the open conversation.
    let (reply, _) = ok(run(&mut state, &store, T0 + 40, inbound("42", "m2", "still there?")));
    assert_eq!(conversation_of(&reply), conv);
    // Another sender gets their own.
    let (other, _) = ok(run(&mut state, &store, T0 + 50, inbound("43", "m1", "hi")));
    assert_ne!(conversation_of(&other), conv);
    assert_eq!(client_texts(&store, &mut state, conv), vec!["hello", "still there?"]);

    // Closed: a late redelivery of m1 is still the duplicate it is; a new message
    // starts a new conversation, also after a restart.
    let offer = *state.offers.keys().next().expect("offered");
    ok(run(&mut state, &store, T0 + 60, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    ok(run(&mut state, &store, T0 + 70, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: conv, resolution: String::new(), tags: vec![] }));
    let mut state = records::load(&store).expect("reload");
    let (reply, events) = ok(run(&mut state, &store, T0 + 80, inbound("42", "m1", "hello")));
    assert_eq!(reply, Reply::Inbound { conversation: conv, duplicate: true });
    assert!(events.is_empty());
    let (reply, _) = ok(run(&mut state, &store, T0 + 90, inbound("42", "m3", "one more thing")));
    let again = conversation_of(&reply);
    assert_ne!(again, conv);
    // The index of open senders was rebuilt from the records: 43's message joins theirs.
    let (reply, _) = ok(run(&mut state, &store, T0 + 100, inbound("43", "m2", "hello?")));
    assert_eq!(conversation_of(&reply), conversation_of(&other));
    assert_eq!(inbound_key(&tg(), "42", "m1"), "tg:2:42:m1");
    assert_ne!(inbound_key(&tg(), "a:b", "c"), inbound_key(&tg(), "a", "b:c"), "a colon in the sender cannot make two messages one");
    assert!(inbound_key(&tg(), "42", &"x".repeat(300)).len() <= switchboard_actors::core::MAX_KEY_BYTES);
}

#[test]
fn the_outbox_carries_staff_messages_through_retries_sends_receipts_and_dead_letters() {
    let (store, mut state) = setup();
    connect(&mut state, &store);
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    let offer = *state.offers.keys().next().expect("offered");
    ok(run(&mut state, &store, T0 + 20, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 30, Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "k1".into(), text: "Hi Dana".into(), attachments: vec![] }));
    let Reply::Message { seq, .. } = reply else { panic!("{reply:?}") };
    let entry = (conv, seq);
    let d = state.outbox.get(&entry).expect("queued for the provider").clone();
    assert_eq!((d.status, d.recipient.as_str(), d.attempts), (DeliveryStatus::Pending, "42", 0));

    // Attempted, answered 429: pending again with its retry time; after a restart too.
    ok(run(&mut state, &store, T0 + 40, Command::DeliveriesAttempted { node: 1, items: vec![entry, entry] }));
    assert_eq!(state.outbox[&entry].status, DeliveryStatus::Attempting { node: 1 });
    let retry = DeliveryOutcome::Retry { reason: "429 Too Many Requests".into(), retry_at: Timestamp(T0 + 5_040) };
    ok(run(&mut state, &store, T0 + 50, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome: retry }] }));
    let mut state = records::load(&store).expect("reload");
    let d = &state.outbox[&entry];
    assert_eq!((d.status, d.attempts, d.next_at), (DeliveryStatus::Pending, 1, Timestamp(T0 + 5_040)));
    // A result for an entry nobody is attempting changes nothing.
    let (_, events) = ok(run(&mut state, &store, T0 + 60, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome: DeliveryOutcome::Sent { provider_id: "x".into() } }] }));
    assert!(events.is_empty());

    // Sent, then delivered and read: it leaves the hot outbox, its record keeps the status.
    ok(run(&mut state, &store, T0 + 5_100, Command::DeliveriesAttempted { node: 1, items: vec![entry] }));
    ok(run(&mut state, &store, T0 + 5_200, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome: DeliveryOutcome::Sent { provider_id: "777".into() } }] }));
    assert!(state.outbox.is_empty());
    ok(run(&mut state, &store, T0 + 5_300, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome: DeliveryOutcome::Read }] }));
    // A late "delivered" does not undo "read".
    ok(run(&mut state, &store, T0 + 5_400, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome: DeliveryOutcome::Delivered }] }));
    let d = records::delivery(&store, conv, seq).expect("read").expect("kept");
    assert_eq!((d.status, d.provider_id.as_deref(), d.attempts), (DeliveryStatus::Read, Some("777"), 2));
    assert!(records::dead_letters(&store, None, 10).expect("listed").is_empty());

    // A second message fails for good: dead-lettered, listed, retried by a supervisor.
    let (reply, _) = ok(run(&mut state, &store, T0 + 6_000, Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "k2".into(), text: "Anything else?".into(), attachments: vec![] }));
    let Reply::Message { seq: seq2, .. } = reply else { panic!("{reply:?}") };
    let refused = run(&mut state, &store, T0 + 6_050, Command::RetryDelivery { conversation: conv, seq: seq2, by: "sue".into() });
    assert!(matches!(refused, Err(Error::Invalid(_))), "only a dead letter is retried: {refused:?}");
    ok(run(&mut state, &store, T0 + 6_100, Command::DeliveriesAttempted { node: 2, items: vec![(conv, seq2)] }));
    ok(run(&mut state, &store, T0 + 6_200, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq: seq2, outcome: DeliveryOutcome::Failed { reason: "400 chat not found".into() } }] }));
    let dead = records::dead_letters(&store, None, 10).expect("listed");
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].0, dead[0].1, dead[0].2.status), (conv, seq2, DeliveryStatus::Failed));
    let mut state = records::load(&store).expect("reload");
    assert!(state.outbox.is_empty());
    ok(run(&mut state, &store, T0 + 7_000, Command::RetryDelivery { conversation: conv, seq: seq2, by: "sue".into() }));
    let d = &state.outbox[&(conv, seq2)];
    assert_eq!((d.status, d.attempts), (DeliveryStatus::Pending, 0));
    assert!(records::dead_letters(&store, None, 10).expect("listed").is_empty());
}

#[test]
fn notices_go_out_too_and_web_conversations_have_no_outbox() {
    let (store, mut state) = setup();
    connect(&mut state, &store);
    ok(run(&mut state, &store, T0, Command::SetEmergency { target: NoticeTarget::Channel(tg()), message: Some("We are down".into()), by: "sue".into() }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    assert_eq!(state.outbox.keys().filter(|(c, _)| *c == conv).count(), 1, "the emergency notice is sent to the customer");

    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    let (reply, _) = ok(run(&mut state, &store, T0 + 20, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    let Reply::Started { conversation: web } = reply else { panic!() };
    assert!(state.outbox.keys().all(|(c, _)| *c != web));
}

#[test]
fn disconnecting_a_channel_dead_letters_what_it_had_to_send() {
    let (store, mut state) = setup();
    connect(&mut state, &store);
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    let offer = *state.offers.keys().next().expect("offered");
    ok(run(&mut state, &store, T0 + 20, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 30, Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "k1".into(), text: "Hi".into(), attachments: vec![] }));
    let Reply::Message { seq, .. } = reply else { panic!("{reply:?}") };
    // A receipt for an entry not sent yet is dropped: it does not take it out of the outbox.
    let (_, events) = ok(run(&mut state, &store, T0 + 35, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome: DeliveryOutcome::Read }] }));
    assert!(events.is_empty());
    assert_eq!(state.outbox[&(conv, seq)].status, DeliveryStatus::Pending);

    ok(run(&mut state, &store, T0 + 40, Command::SetChannelAdapter { channel: tg(), adapter: None }));
    assert!(state.outbox.is_empty());
    let dead = records::dead_letters(&store, None, 10).expect("listed");
    assert_eq!((dead.len(), dead[0].2.status), (1, DeliveryStatus::Failed));
    assert!(records::dead_letters(&store, Some((dead[0].0, dead[0].1)), 10).expect("listed").is_empty(), "none after the last");
    let refused = run(&mut state, &store, T0 + 50, Command::RetryDelivery { conversation: conv, seq, by: "sue".into() });
    assert!(matches!(refused, Err(Error::Invalid(_))), "no adapter to send it with: {refused:?}");
    connect(&mut state, &store);
    ok(run(&mut state, &store, T0 + 60, Command::RetryDelivery { conversation: conv, seq, by: "sue".into() }));
    assert_eq!(state.outbox[&(conv, seq)].status, DeliveryStatus::Pending);
}

fn bot() -> BotConfig {
    BotConfig { url: "http://127.0.0.1:9/events".into(), token_sha256: "a".repeat(64), signing_secret: "s".repeat(20) }
}

/// [`setup_with`] `rules`, channel `web` with a bot, and a conversation the bot holds.
fn with_the_bot(rules: u32) -> (MemStore, ShardState, ChannelId, ConversationId) {
    let (store, mut state) = setup_with(rules);
    let web = ChannelId::new("web");
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: web.clone(), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, T0, Command::SetChannelBot { channel: web.clone(), bot: Some(bot()) }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, Command::StartConversation { channel: web.clone(), group: None, visitor: Visitor::default() }));
    let Reply::Started { conversation } = reply else { panic!("{reply:?}") };
    (store, state, web, conversation)
}

#[test]
fn a_bot_holds_new_conversations_out_of_queues_and_capacity_until_it_hands_them_off() {
    let (store, mut state) = setup();
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    // Rules 6 have no bots: the setting is refused until the node adopts rules 7.
    let mut old = ShardState::default();
    let old_store = MemStore::default();
    ok(run(&mut old, &old_store, T0, Command::AdoptRules { version: 6 }));
    ok(run(&mut old, &old_store, T0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "G".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 20_000 })));
    ok(run(&mut old, &old_store, T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    assert!(run(&mut old, &old_store, T0, Command::SetChannelBot { channel: ChannelId::new("web"), bot: Some(bot()) }).is_err());

    ok(run(&mut state, &store, T0, Command::SetChannelBot { channel: ChannelId::new("web"), bot: Some(bot()) }));
    let (reply, events) = ok(run(&mut state, &store, T0 + 10, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    let Reply::Started { conversation: conv } = reply else { panic!("{reply:?}") };
    assert!(events.iter().any(|e| matches!(e, Event::BotTook { .. })) && !events.iter().any(|e| matches!(e, Event::ConversationQueued { .. } | Event::OfferMade { .. })), "{events:?}");
    assert!(state.offers.is_empty() && state.groups[&SkillGroupId::new("g")].queue.is_empty());
    // The bot is told: its started event and the customer's message are in the outbox for it.
    ok(run(&mut state, &store, T0 + 20, Command::PostClientMessage { conversation: conv, key: "c1".into(), text: "hi".into(), attachments: vec![] }));
    assert_eq!(state.outbox.values().filter(|d| d.to_bot).count(), 2);
    let web = ChannelId::new("web");
    let (reply, _) = ok(run(&mut state, &store, T0 + 30, Command::BotReply { channel: web.clone(), conversation: conv, key: "b1".into(), text: "Hello!".into(), buttons: vec!["Talk to a person".into()] }));
    assert!(matches!(reply, Reply::Message { duplicate: false, .. }));
    let (reply, events) = ok(run(&mut state, &store, T0 + 31, Command::BotReply { channel: web.clone(), conversation: conv, key: "b1".into(), text: "Hello!".into(), buttons: vec![] }));
    assert!(matches!(reply, Reply::Message { duplicate: true, .. }) && events.is_empty());
    // The wrong channel's bot cannot touch it; too many buttons are refused.
    assert!(matches!(run(&mut state, &store, T0 + 32, Command::BotReply { channel: tg(), conversation: conv, key: "b2".into(), text: "x".into(), buttons: vec![] }), Err(Error::NotFound(_))));
    assert!(matches!(run(&mut state, &store, T0 + 33, Command::BotReply { channel: web.clone(), conversation: conv, key: "b3".into(), text: "x".into(), buttons: vec!["b".into(); 11] }), Err(Error::Invalid(_))));

    ok(run(&mut state, &store, T0 + 40, Command::Handoff { channel: web.clone(), conversation: conv, group: None, reason: "asked for a person".into(), context: vec![("order".into(), "A-17".into())] }));
    let offer = state.offers.values().next().expect("offered once handed off").clone();
    assert_eq!((offer.conversation, offer.operator.as_str()), (conv, "ann"));
    let history = records::history(&store, conv, 0, 100).expect("history");
    assert!(history.iter().any(|e| matches!(&e.item, HistoryItem::Handoff { reason, context, .. } if reason == "asked for a person" && context.len() == 1)));
    // Handed off: the bot may no longer write or close.
    assert!(matches!(run(&mut state, &store, T0 + 50, Command::CloseByBot { channel: web.clone(), conversation: conv, resolution: String::new() }), Err(Error::Invalid(_))));

    // A second conversation the bot resolves itself.
    let (reply, _) = ok(run(&mut state, &store, T0 + 60, Command::StartConversation { channel: web.clone(), group: None, visitor: Visitor::default() }));
    let Reply::Started { conversation: second } = reply else { panic!() };
    ok(run(&mut state, &store, T0 + 70, Command::CloseByBot { channel: web, conversation: second, resolution: String::new() }));
    let closed = records::history(&store, second, 0, 100).expect("history");
    assert!(closed.iter().any(|e| matches!(&e.item, HistoryItem::Closed { resolution, .. } if resolution == "bot")));
}

#[test]
fn taking_a_bot_away_hands_off_what_it_held() {
    let (store, mut state) = setup();
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, T0, Command::SetChannelBot { channel: ChannelId::new("web"), bot: Some(bot()) }));
    for at in [T0 + 1, T0 + 2] {
        ok(run(&mut state, &store, at, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));
    }
    assert!(state.offers.is_empty());
    ok(run(&mut state, &store, T0 + 10, Command::SetChannelBot { channel: ChannelId::new("web"), bot: None }));
    assert_eq!(state.offers.len(), 2, "both are queued and offered to ann (capacity 2)");
    assert_eq!(state.conversations.values().filter(|c| matches!(c.status, switchboard_actors::state::ConversationStatus::WithBot)).count(), 0);
}

/// Rules 18: a supervisor who gives a bot's conversation to an operator hands it off
/// first, as the bot would (its history says so); and a conversation already waiting in
/// a group is not "reassigned" to that group again (it kept its place and its offer).
/// Under rules 17 neither held.
#[test]
fn a_supervisor_takes_a_conversation_from_the_bot_with_a_handoff_and_a_queue_keeps_its_place() {
    for rules in [17, 18] {
        let (store, mut state, web, conv) = with_the_bot(rules);
        ok(run(&mut state, &store, T0 + 20, Command::Reassign { by: "sue".into(), conversation: conv, target: TransferTarget::Operator(OperatorId::new("ann")), comment: "the bot is stuck".into() }));
        assert_eq!(state.conversations[&conv].assigned(), Some(&OperatorId::new("ann")), "rules {rules}");
        let history = records::history(&store, conv, 0, 100).expect("history");
        let handed = history.iter().any(|e| matches!(&e.item, HistoryItem::Handoff { reason, .. } if reason == switchboard_actors::core::TAKEN_FROM_BOT));
        assert_eq!(handed, rules >= 18, "rules {rules}: a handoff in the history");

        // Waiting in g with an offer to ann: reassigned to g again.
        ok(run(&mut state, &store, T0 + 30, Command::SetChannelBot { channel: web.clone(), bot: None }));
        let (reply, _) = ok(run(&mut state, &store, T0 + 40, Command::StartConversation { channel: web.clone(), group: None, visitor: Visitor::default() }));
        let Reply::Started { conversation: waiting } = reply else { panic!("{reply:?}") };
        let offer = state.offers.values().find(|o| o.conversation == waiting).expect("offered to ann").id;
        let again = run(&mut state, &store, T0 + 50, Command::Reassign { by: "sue".into(), conversation: waiting, target: TransferTarget::Group(SkillGroupId::new("g")), comment: String::new() });
        if rules >= 18 {
            assert!(matches!(&again, Err(Error::Invalid(m)) if m.contains("already waiting in group g")), "{again:?}");
            assert!(state.offers.contains_key(&offer), "rules {rules}: its offer stands");
        } else {
            again.expect("rules 17 queued it again");
            assert!(!state.offers.contains_key(&offer), "rules {rules}: its offer was withdrawn");
        }
    }
}

#[test]
fn what_a_messenger_cannot_carry_is_refused_before_it_is_written() {
    let (store, mut state) = setup();
    let adapter = AdapterConfig::Messenger { page_token: "p".into(), app_secret: "a".into(), verify_token: "v".into(), api_base: "http://127.0.0.1:9".into() };
    ok(run(&mut state, &store, T0, Command::SetChannelAdapter { channel: tg(), adapter: Some(adapter) }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    let offer = *state.offers.keys().next().expect("offered");
    ok(run(&mut state, &store, T0 + 20, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    let say = |text: String| Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: format!("k{}", text.len()), text, attachments: vec![] };
    assert_eq!(run(&mut state, &store, T0 + 30, say("x".repeat(2001))).err(), Some(Error::TooLong { limit: 2000, actual: 2001 }));
    ok(run(&mut state, &store, T0 + 31, say("x".repeat(2000))));
    ok(run(&mut state, &store, T0 + 32, Command::StoreAttachment(Attachment { id: AttachmentId("f1".into()), conversation: conv, name: "a.pdf".into(), content_type: "application/pdf".into(), size: 10, sha256: "0".repeat(64), uploaded_by: "ann".into() })));
    // Rules 8: a file is its own message, without text (the Send API takes one or the other).
    let with_file = Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "kf".into(), text: "see file".into(), attachments: vec![AttachmentId("f1".into())] };
    assert!(matches!(run(&mut state, &store, T0 + 33, with_file), Err(Error::Invalid(m)) if m.contains("carries no text")));
    let file_alone = Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "kf2".into(), text: String::new(), attachments: vec![AttachmentId("f1".into())] };
    ok(run(&mut state, &store, T0 + 34, file_alone));
    // A channel whose provider takes no files refuses them.
    let viber = AdapterConfig::Viber { auth_token: "t".into(), sender_name: "S".into(), api_base: "http://127.0.0.1:9".into() };
    ok(run(&mut state, &store, T0 + 35, Command::SetChannelAdapter { channel: tg(), adapter: Some(viber) }));
    let to_viber = Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "kf3".into(), text: String::new(), attachments: vec![AttachmentId("f1".into())] };
    assert!(matches!(run(&mut state, &store, T0 + 36, to_viber), Err(Error::Invalid(m)) if m.contains("files cannot be sent")));
}

#[test]
fn a_bots_repeated_key_is_a_duplicate_after_a_restart_too() {
    let (store, mut state) = setup();
    let web = ChannelId::new("web");
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: web.clone(), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, T0, Command::SetChannelBot { channel: web.clone(), bot: Some(bot()) }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 1, Command::StartConversation { channel: web.clone(), group: None, visitor: Visitor::default() }));
    let Reply::Started { conversation } = reply else { panic!() };
    let say = || Command::BotReply { channel: ChannelId::new("web"), conversation, key: "b1".into(), text: "Hello!".into(), buttons: vec![] };
    let (first, _) = ok(run(&mut state, &store, T0 + 2, say()));
    // Every replica decides the retry alike, also one that restarted from its records.
    let mut restarted = records::load(&store).expect("reload");
    let (again, events) = ok(run(&mut restarted, &store, T0 + 3, say()));
    let (Reply::Message { seq: a, .. }, Reply::Message { seq: b, duplicate: true }) = (first, again) else { panic!("a duplicate after the restart") };
    assert_eq!((a, events.len()), (b, 0));
}

fn mail() -> ChannelId {
    ChannelId::new("mail")
}

fn connect_mail(state: &mut ShardState, store: &MemStore) {
    ok(run(state, store, T0, Command::UpsertChannel(ChannelConfig { id: mail(), kind: "email".into(), name: "Email".into(), default_group: SkillGroupId::new("g") })));
    let adapter = AdapterConfig::Email {
        address: "support@example.com".into(),
        display_name: "Support".into(),
        smtp_host: "127.0.0.1".into(),
        smtp_port: 2525,
        smtp_security: "none".into(),
        smtp_username: String::new(),
        smtp_password: String::new(),
        thread_secret: "t".repeat(32),
    };
    ok(run(state, store, T0, Command::SetChannelAdapter { channel: mail(), adapter: Some(adapter) }));
}

fn file(n: u8, size: u64) -> InboundFile {
    InboundFile { id: AttachmentId(format!("{n:032x}")), name: format!("f{n}.png"), content_type: "image/png".into(), size, sha256: "0".repeat(64) }
}

fn rich(sender: &str, id: &str, text: &str, files: Vec<InboundFile>, thread: Option<ConversationId>) -> Command {
    Command::ChannelInboundRich {
        channel: mail(),
        sender: sender.into(),
        sender_name: "Anna".into(),
        provider_message_id: id.into(),
        text: text.into(),
        files,
        thread,
        attributes: vec![("email.subject".into(), "Card blocked".into())],
    }
}

#[test]
fn a_mail_brings_its_files_and_an_answer_in_its_thread_finds_its_conversation_from_another_address() {
    let (store, mut state) = setup();
    connect(&mut state, &store);
    connect_mail(&mut state, &store);
    // A second channel may not take the same address.
    let mut twin = state.channel_adapters[&mail()].clone();
    if let AdapterConfig::Email { thread_secret, .. } = &mut twin {
        *thread_secret = "u".repeat(32);
    }
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("mail2"), kind: "email".into(), name: "E2".into(), default_group: SkillGroupId::new("g") })));
    let taken = run(&mut state, &store, T0, Command::SetChannelAdapter { channel: ChannelId::new("mail2"), adapter: Some(twin) });
    assert!(matches!(taken, Err(Error::Invalid(ref m)) if m.contains("another channel")), "{taken:?}");

    // Files only, no text: one message with both files, and the subject as an attribute.
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, rich("anna@example.org", "m1@x", "", vec![file(1, 100), file(2, 200)], None)));
    let conv = conversation_of(&reply);
    assert_eq!(state.conversations[&conv].visitor.attributes, vec![("email.subject".to_owned(), "Card blocked".to_owned())]);
    let history = records::history(&store, conv, 0, 100).expect("history");
    let files: Vec<String> = history
        .iter()
        .find_map(|e| match &e.item {
            HistoryItem::ClientMessage { attachments, .. } => Some(attachments.iter().map(|a| a.name.clone()).collect()),
            _ => None,
        })
        .expect("a client message");
    assert_eq!(files, vec!["f1.png", "f2.png"]);
    // Redelivered: nothing, and the same files are not stored twice.
    let (again, events) = ok(run(&mut state, &store, T0 + 20, rich("anna@example.org", "m1@x", "", vec![file(1, 100), file(2, 200)], None)));
    assert_eq!(again, Reply::Inbound { conversation: conv, duplicate: true });
    assert!(events.is_empty());
    // From another address, naming the conversation: it joins it (after a restart too).
    let mut state = records::load(&store).expect("reload");
    let (reply, _) = ok(run(&mut state, &store, T0 + 30, rich("anna.work@example.org", "m2@x", "from work", vec![file(3, 10)], Some(conv))));
    assert_eq!(conversation_of(&reply), conv);
    // Without it, that address starts its own.
    let (reply, _) = ok(run(&mut state, &store, T0 + 40, rich("anna.home@example.org", "m3@x", "from home", vec![], None)));
    assert_ne!(conversation_of(&reply), conv);
    // A thread naming a conversation of another channel is ignored.
    let (web, _) = ok(run(&mut state, &store, T0 + 50, inbound("42", "t1", "telegram")));
    let (reply, _) = ok(run(&mut state, &store, T0 + 60, rich("eve@example.org", "m4@x", "hijack", vec![], Some(conversation_of(&web)))));
    assert_ne!(conversation_of(&reply), conversation_of(&web));
    // An id already stored, an empty file, too many files: refused, nothing written.
    for files in [vec![file(1, 5)], vec![file(9, 0)], (10..16).map(|n| file(n, 1)).collect()] {
        let refused = run(&mut state, &store, T0 + 70, rich("anna@example.org", "m5@x", "x", files, None));
        assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
    }
    // Over the conversation's room (100 MiB of files).
    let big: Vec<InboundFile> = (20..25).map(|n| file(n, 25 * 1024 * 1024)).collect();
    let refused = run(&mut state, &store, T0 + 80, rich("anna@example.org", "m6@x", "big", big, None));
    assert!(matches!(refused, Err(Error::Invalid(ref m)) if m.contains("MiB")), "{refused:?}");
    assert_eq!(client_texts(&store, &mut state, conv), vec!["", "from work"]);
}

#[test]
fn files_go_to_telegram_customers_from_rules_8_with_the_text_as_a_caption() {
    let store = MemStore::default();
    let mut state = ShardState::default();
    ok(run(&mut state, &store, T0, Command::AdoptRules { version: 7 }));
    ok(run(&mut state, &store, T0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "G".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 20_000 })));
    ok(run(&mut state, &store, T0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] })));
    ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: tg(), kind: "telegram".into(), name: "Telegram".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, T0, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }));
    connect(&mut state, &store);
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    let offer = *state.offers.keys().next().expect("offered");
    ok(run(&mut state, &store, T0 + 20, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    for n in 1..=2 {
        let file = Attachment { id: AttachmentId(format!("f{n}")), conversation: conv, name: format!("{n}.pdf"), content_type: "application/pdf".into(), size: 10, sha256: "0".repeat(64), uploaded_by: "ann".into() };
        ok(run(&mut state, &store, T0 + 30, Command::StoreAttachment(file)));
    }
    let send = |key: &str, text: String, files: &[&str]| Command::PostOperatorMessage {
        operator: OperatorId::new("ann"),
        conversation: conv,
        key: key.into(),
        text,
        attachments: files.iter().map(|f| AttachmentId((*f).into())).collect(),
    };
    // Rules 7: refused, as a replayed log decided it.
    assert!(matches!(run(&mut state, &store, T0 + 40, send("a", "see".into(), &["f1"])), Err(Error::Invalid(m)) if m.contains("files cannot be sent")));
    ok(run(&mut state, &store, T0 + 50, Command::AdoptRules { version: 8 }));
    // Rules 8: sent, the text a caption of at most 1024 characters.
    assert_eq!(run(&mut state, &store, T0 + 60, send("b", "x".repeat(1025), &["f1"])).err(), Some(Error::TooLong { limit: 1024, actual: 1025 }));
    ok(run(&mut state, &store, T0 + 70, send("c", "see both".into(), &["f1", "f2"])));
    assert!(state.outbox.keys().any(|(c, _)| *c == conv), "the message with its files is in the outbox");
    // WhatsApp carries one file per message.
    let whatsapp = AdapterConfig::WhatsApp { access_token: "t".into(), app_secret: "a".into(), verify_token: "v".into(), phone_number_id: "1".into(), api_base: "http://127.0.0.1:9".into() };
    ok(run(&mut state, &store, T0 + 80, Command::SetChannelAdapter { channel: tg(), adapter: Some(whatsapp) }));
    assert!(matches!(run(&mut state, &store, T0 + 90, send("d", "two".into(), &["f1", "f2"])), Err(Error::Invalid(m)) if m.contains("at most 1 file")));
    ok(run(&mut state, &store, T0 + 100, send("e", "one".into(), &["f2"])));
    // The Channel API: refused under rules 12, as a replayed log decided it; taken from
    // rules 13, several files and their text in one message.
    let api = AdapterConfig::Api { token_sha256: "0".repeat(64), outbound_url: "http://127.0.0.1:9/outbound".into(), signing_secret: "s".repeat(32) };
    ok(run(&mut state, &store, T0 + 110, Command::SetChannelAdapter { channel: tg(), adapter: Some(api) }));
    ok(run(&mut state, &store, T0 + 111, Command::AdoptRules { version: 12 }));
    assert!(matches!(run(&mut state, &store, T0 + 120, send("f", "both".into(), &["f1", "f2"])), Err(Error::Invalid(m)) if m.contains("files cannot be sent to a api customer")));
    ok(run(&mut state, &store, T0 + 130, Command::AdoptRules { version: 13 }));
    let before = state.outbox.len();
    ok(run(&mut state, &store, T0 + 140, send("g", "both".into(), &["f1", "f2"])));
    assert_eq!(state.outbox.len(), before + 1, "the message with its files is in the outbox");
}

/// A replica that gets a retention purge only within an installed snapshot (its log was
/// purged past it) deletes the files of the attachments the snapshot no longer names,
/// as an applied purge does; files the snapshot still names stay.
#[test]
fn a_snapshot_that_drops_attachments_deletes_their_files() {
    use std::sync::{Arc, Mutex};
    use switchboard_actors::shard::Shard;
    let file = |id: &str, conversation: ConversationId| Attachment { id: AttachmentId(id.into()), conversation, name: "a.pdf".into(), content_type: "application/pdf".into(), size: 10, sha256: "0".repeat(64), uploaded_by: "client".into() };
    // The records before: two files in a conversation. The snapshot's: only one of them.
    let records = |files: &[&str]| {
        let (store, mut state) = setup();
        connect(&mut state, &store);
        let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
        let conversation = conversation_of(&reply);
        for (n, id) in files.iter().enumerate() {
            ok(run(&mut state, &store, T0 + 20 + n as u64, Command::StoreAttachment(file(id, conversation))));
        }
        store
    };
    let shard = Shard::new();
    let deleted: Arc<Mutex<Vec<AttachmentId>>> = Arc::default();
    let seen = deleted.clone();
    shard.on_deleted_attachments(move |ids| seen.lock().unwrap().extend(ids));
    shard.load(Arc::new(records(&["f1", "f2"]))).expect("loaded");
    // A load at start is not an install: nothing to compare with.
    shard.load(Arc::new(records(&["f1", "f2"]))).expect("loaded again");
    assert!(deleted.lock().unwrap().is_empty());
    shard.replacing_records().expect("noted");
    shard.load(Arc::new(records(&["f2"]))).expect("installed");
    assert_eq!(*deleted.lock().unwrap(), vec![AttachmentId("f1".into())], "the file the snapshot dropped is deleted, and only it");
    assert!(shard.attachment(&AttachmentId("f2".into())).expect("read").is_some());
}

/// Rules 14: a messenger customer cannot start a new conversation themselves, so the
/// message that would take their conversation past its customer text
/// (`MAX_CLIENT_TEXT_BYTES`) closes it (resolution `full`) and opens a new one, where
/// the message is; nothing is refused and lost. The customer goes on with the operator
/// who held it: the new conversation prefers them, with no wrap-up between, though
/// another operator has waited longer.
#[test]
fn a_messenger_message_past_the_conversations_text_bound_opens_a_new_conversation() {
    let (store, mut state) = setup();
    connect(&mut state, &store);
    let bob = OperatorId::new("bob");
    ok(run(&mut state, &store, T0, Command::UpsertOperator(OperatorConfig { id: bob.clone(), name: "Bob".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] })));
    ok(run(&mut state, &store, T0, Command::SetPresence { operator: bob.clone(), presence: Presence::Online }));
    ok(run(&mut state, &store, T0, Command::SetGroupRouting { group: SkillGroupId::new("g"), routing: GroupRouting { wrap_up_ms: 60_000, ..GroupRouting::default() } }));
    let longest = "é".repeat(switchboard_actors::core::MAX_TEXT_CHARS);
    let fits = (switchboard_actors::core::MAX_CLIENT_TEXT_BYTES / longest.len() as u64) as usize;
    let first = conversation_of(&ok(run(&mut state, &store, T0 + 1, inbound("dana", "m0", &longest))).0);
    let offer = state.offers.values().find(|o| o.conversation == first).cloned().expect("offered");
    let holder = offer.operator.clone();
    ok(run(&mut state, &store, T0 + 1, Command::AcceptOffer { operator: holder.clone(), offer: offer.id }));
    for n in 1..fits {
        let (reply, _) = ok(run(&mut state, &store, T0 + 1 + n as u64, inbound("dana", &format!("m{n}"), &longest)));
        assert_eq!(conversation_of(&reply), first, "message {n} joins the open conversation");
    }
    // The channel has come to take only its allow list, which does not name dana: she
    // was talking already, so her conversation goes on, in a new one (rules 15).
    ok(run(&mut state, &store, T0 + 9_999, Command::SetChannelAccess { channel: tg(), allow_only: true, message: String::new(), by: "admin".into() }));
    let (reply, events) = ok(run(&mut state, &store, T0 + 10_000, inbound("dana", "past", &longest)));
    let second = conversation_of(&reply);
    assert!(!events.iter().any(|e| matches!(e, Event::WrapUpSet { .. })), "no wrap-up for a conversation that goes on: {events:?}");
    let offered = state.offers.values().find(|o| o.conversation == second).map(|o| o.operator.clone());
    assert_eq!(offered, Some(holder), "the new conversation is offered to whoever held the full one");
    assert_ne!(second, first, "the message past the bound opens a new conversation");
    let closed = records::history(&store, first, 0, 100_000).expect("history");
    assert!(matches!(closed.last().map(|e| &e.item), Some(HistoryItem::Closed { resolution, .. }) if resolution == switchboard_actors::core::FULL), "{:?}", closed.last());
    assert_eq!(client_texts(&store, &mut state, second, ), vec![longest.clone()], "the message is in the new one");
    // The provider's redelivery of it is the same message, and the sender's next one
    // joins the new conversation.
    let (again, _) = ok(run(&mut state, &store, T0 + 10_001, inbound("dana", "past", &longest)));
    assert_eq!(again, Reply::Inbound { conversation: second, duplicate: true });
    let (next, _) = ok(run(&mut state, &store, T0 + 10_002, inbound("dana", "next", "thanks")));
    assert_eq!(conversation_of(&next), second);
}

/// Rules 15: a messenger channel that takes only its allow list takes only the senders
/// its visitor allow rules name. Its customers have no address, so under rules 14 the
/// allow list was never checked and anyone could write in.
#[test]
fn a_messenger_channel_that_takes_only_its_allow_list_refuses_everyone_else() {
    let allow_only = |state: &mut ShardState, store: &MemStore| {
        let allowed = AccessRule { list: AccessList::Allow, channel: Some(tg()), kind: AccessKind::Visitor, value: "tg:42".into() };
        ok(run(state, store, T0 + 1, Command::SetAccessRule { rule: allowed, note: Some("our customer".into()), by: "admin".into() }));
        ok(run(state, store, T0 + 2, Command::SetChannelAccess { channel: tg(), allow_only: true, message: "Members only.".into(), by: "admin".into() }));
    };
    let (store, mut state) = setup();
    connect(&mut state, &store);
    // Sender 44 is in a conversation when the channel is set to take only its list.
    let (reply, _) = ok(run(&mut state, &store, T0 + 1, inbound("44", "m1", "before the list")));
    let open = conversation_of(&reply);
    allow_only(&mut state, &store);
    let (reply, _) = ok(run(&mut state, &store, T0 + 3, inbound("44", "m2", "still talking")));
    assert_eq!(conversation_of(&reply), open, "an allow list decides who starts; an open conversation goes on");
    let offer = state.offers.iter().find(|(_, o)| o.conversation == open).map(|(id, _)| *id).expect("offered");
    ok(run(&mut state, &store, T0 + 4, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    ok(run(&mut state, &store, T0 + 5, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: open, resolution: String::new(), tags: vec![] }));
    assert!(matches!(run(&mut state, &store, T0 + 6, inbound("44", "m3", "again")), Err(Error::Blocked(_))), "closed, they may not start another");
    let refused = run(&mut state, &store, T0 + 10, inbound("43", "m1", "let me in"));
    assert!(matches!(&refused, Err(Error::Blocked(m)) if m == "Members only."), "{refused:?}");
    assert!(!state.conversations.values().any(|c| c.visitor.id.as_deref() == Some("tg:43")), "nothing was written");
    let (reply, _) = ok(run(&mut state, &store, T0 + 20, inbound("42", "m1", "hello")));
    assert!(state.conversations.contains_key(&conversation_of(&reply)), "the sender on the allow list is taken");
    // A web channel's allow list is still the edge's to check (it knows the address):
    // a start the core sees without one is not refused for it.
    ok(run(&mut state, &store, T0 + 30, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "Web".into(), default_group: SkillGroupId::new("g") })));
    ok(run(&mut state, &store, T0 + 31, Command::SetChannelAccess { channel: ChannelId::new("web"), allow_only: true, message: String::new(), by: "admin".into() }));
    ok(run(&mut state, &store, T0 + 32, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }));

    // Under rules 14, as a log written then replays: the allow list was not checked.
    let (store, mut state) = setup_with(14);
    connect(&mut state, &store);
    allow_only(&mut state, &store);
    ok(run(&mut state, &store, T0 + 10, inbound("43", "m1", "let me in")));
}

/// Rules 15: a messenger customer whose last conversation closed within the group's
/// sticky time is offered first to the operator who served them, as a returning web
/// visitor is; under rules 14 they were routed as new.
#[test]
fn a_returning_messenger_customer_goes_first_to_whoever_served_them_last() {
    for rules in [15, 14] {
        let (store, mut state) = setup_with(rules);
        connect(&mut state, &store);
        ok(run(&mut state, &store, T0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("bob"), name: "Bob".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] })));
        ok(run(&mut state, &store, T0, Command::SetPresence { operator: OperatorId::new("bob"), presence: Presence::Online }));
        ok(run(&mut state, &store, T0, Command::SetGroupRouting { group: SkillGroupId::new("g"), routing: GroupRouting { sticky_ms: 86_400_000, ..GroupRouting::default() } }));
        let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
        let first = conversation_of(&reply);
        // Whoever it was offered to takes it and closes it.
        let (offer, served) = state.offers.iter().find(|(_, o)| o.conversation == first).map(|(id, o)| (*id, o.operator.clone())).expect("offered");
        ok(run(&mut state, &store, T0 + 20, Command::AcceptOffer { operator: served.clone(), offer }));
        ok(run(&mut state, &store, T0 + 30, Command::CloseByOperator { operator: served.clone(), conversation: first, resolution: String::new(), tags: vec![] }));
        // Ten minutes later, after a restart, the customer writes again.
        let mut state = records::load(&store).expect("reload");
        let (reply, _) = ok(run(&mut state, &store, T0 + 600_000, inbound("42", "m2", "it happened again")));
        let second = conversation_of(&reply);
        assert_ne!(second, first);
        let sticky = state.sticky.get(&second).cloned();
        if rules >= 15 {
            assert_eq!(sticky, Some(served.clone()), "rules {rules}: the new conversation prefers {served}");
            let offered_to = state.offers.values().find(|o| o.conversation == second).map(|o| o.operator.clone());
            assert_eq!(offered_to, Some(served.clone()), "rules {rules}: offered to {served} first");
        } else {
            assert_eq!(sticky, None, "rules {rules}: routed as new");
        }
    }
}

/// Under `rules`, customer "42" on Telegram writes, Ann takes the conversation and
/// replies: her reply's outbox entry (conversation, seq), not attempted yet.
fn anns_reply_queued(rules: u32) -> (MemStore, ShardState, ConversationId, u64) {
    let (store, mut state) = setup_with(rules);
    connect(&mut state, &store);
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    let offer = *state.offers.keys().next().expect("offered");
    ok(run(&mut state, &store, T0 + 20, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 30, Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "k1".into(), text: "Hi Dana".into(), attachments: vec![] }));
    let Reply::Message { seq, .. } = reply else { panic!("{reply:?}") };
    (store, state, conv, seq)
}

/// A message the provider took (its id "777") and later reported failed is sent again
/// by a supervisor. From rules 18 the old id no longer names the entry: a late or
/// repeated "failed" for it finds nothing, and cannot dead-letter the new attempt.
/// Under rules 17 it still named it.
#[test]
fn a_retried_dead_letter_forgets_the_provider_id_of_its_last_attempt() {
    for rules in [17, 18] {
        let (store, mut state, conv, seq) = anns_reply_queued(rules);
        let result = |outcome| Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome }] };
        ok(run(&mut state, &store, T0 + 40, Command::DeliveriesAttempted { node: 1, items: vec![(conv, seq)] }));
        ok(run(&mut state, &store, T0 + 50, result(DeliveryOutcome::Sent { provider_id: "777".into() })));
        ok(run(&mut state, &store, T0 + 60, result(DeliveryOutcome::Failed { reason: "131026 undeliverable".into() })));
        assert_eq!(records::by_provider_id(&store, &tg(), "777").expect("read"), Some((conv, seq)));
        // A dead letter is read from its record when it is retried.
        let mut state = records::load(&store).expect("reload");
        ok(run(&mut state, &store, T0 + 70, Command::RetryDelivery { conversation: conv, seq, by: "sue".into() }));
        ok(run(&mut state, &store, T0 + 80, Command::DeliveriesAttempted { node: 1, items: vec![(conv, seq)] }));
        let named = records::by_provider_id(&store, &tg(), "777").expect("read");
        let d = records::delivery(&store, conv, seq).expect("read").expect("kept");
        if rules >= 18 {
            assert_eq!(named, None, "rules {rules}: the old id names nothing");
            assert_eq!((d.status, d.provider_id), (DeliveryStatus::Attempting { node: 1 }, None));
            assert_eq!(records::load(&store).expect("reload").outbox[&(conv, seq)].provider_id, None, "rules {rules}: after a restart too");
        } else {
            assert_eq!(named, Some((conv, seq)), "rules {rules}: a stale receipt for 777 still reaches the new attempt");
            assert_eq!(d.provider_id.as_deref(), Some("777"));
        }
        // The new attempt's own id names it.
        ok(run(&mut state, &store, T0 + 90, result(DeliveryOutcome::Sent { provider_id: "778".into() })));
        assert_eq!(records::by_provider_id(&store, &tg(), "778").expect("read"), Some((conv, seq)));
        assert_eq!(records::by_provider_id(&store, &tg(), "777").expect("read"), None, "rules {rules}: gone once the new id came");
    }
}

/// A provider's answer without an id (WhatsApp and Viber may give one) puts nothing in
/// the index of provider ids from rules 18: under rules 17 every empty id of a channel
/// shared one key, which named whichever entry was sent last.
#[test]
fn an_empty_provider_id_names_no_entry() {
    for rules in [17, 18] {
        let (store, mut state, conv, seq) = anns_reply_queued(rules);
        ok(run(&mut state, &store, T0 + 40, Command::DeliveriesAttempted { node: 1, items: vec![(conv, seq)] }));
        ok(run(&mut state, &store, T0 + 50, Command::DeliveryResults { results: vec![DeliveryResult { node: 0, conversation: conv, seq, outcome: DeliveryOutcome::Sent { provider_id: String::new() } }] }));
        let named = records::by_provider_id(&store, &tg(), "").expect("read");
        assert_eq!(named, if rules >= 18 { None } else { Some((conv, seq)) }, "rules {rules}");
        assert_eq!(records::delivery(&store, conv, seq).expect("read").expect("kept").status, DeliveryStatus::Sent, "rules {rules}: sent all the same");
    }
}

/// A supervisor's retry of a dead letter committed in the same log entry as the purge of
/// its (closed, expired) conversation: the retry's outbox record is not in the records
/// the purge reads its keys from, and would outlive the conversation and be sent after
/// a restart. From rules 16 the purge leaves the conversation to the next one, which
/// deletes it with every outbox record.
#[test]
fn a_retry_in_the_entry_of_the_purge_waits_for_the_next_purge() {
    use std::sync::Arc;
    use switchboard_actors::records::Store;
    let (store, mut state) = setup();
    connect(&mut state, &store);
    let (reply, _) = ok(run(&mut state, &store, T0 + 10, inbound("42", "m1", "hello")));
    let conv = conversation_of(&reply);
    let offer = *state.offers.keys().next().expect("offered");
    ok(run(&mut state, &store, T0 + 20, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }));
    let (reply, _) = ok(run(&mut state, &store, T0 + 30, Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: "k1".into(), text: "Hi".into(), attachments: vec![] }));
    let Reply::Message { seq, .. } = reply else { panic!("{reply:?}") };
    ok(run(&mut state, &store, T0 + 40, Command::SetChannelAdapter { channel: tg(), adapter: None }));
    connect(&mut state, &store);
    ok(run(&mut state, &store, T0 + 50, Command::CloseByOperator { operator: OperatorId::new("ann"), conversation: conv, resolution: "done".into(), tags: vec![] }));
    ok(run(&mut state, &store, T0 + 60, Command::SetChannelRetention { channel: tg(), days: 1 }));
    assert_eq!(records::dead_letters(&store, None, 10).expect("listed").len(), 1);

    // The node's shard, from these records: one entry with the retry, then the purge.
    let shard = switchboard_actors::shard::Shard::new();
    shard.load(Arc::new(store.clone())).expect("load");
    let entry = |commands: Vec<Command>, at: u64| {
        let mut writes = Vec::new();
        for command in commands {
            let _ = shard.apply(&Envelope::new(Timestamp(at), command), &mut writes);
        }
        shard.end_entry();
        store.write(writes);
        shard.published();
    };
    let later = T0 + 2 * 24 * 3_600_000;
    entry(vec![Command::RetryDelivery { conversation: conv, seq, by: "sue".into() }, Command::PurgeExpired { as_of: Timestamp(later) }], later);
    assert!(shard.conversation(conv).expect("readable").is_some(), "kept until the next purge");
    entry(vec![Command::PurgeExpired { as_of: Timestamp(later + 1) }], later + 1);
    assert!(shard.conversation(conv).expect("readable").is_none(), "purged");
    for tag in [b'U', b'M', b'D'] {
        let left = store.scan(&records::key::delivery(tag, conv, 0)[..9], None, 10).expect("scan");
        assert!(left.is_empty(), "an outbox record ({}) outlived its conversation: {left:?}", tag as char);
    }
    // Nothing of it comes back at a restart.
    assert!(records::load(&store).expect("load").outbox.keys().all(|(c, _)| *c != conv));
}

/// Rules 19: an event for the bot, dead-lettered once the bot no longer held its
/// conversation, is not sent again by a supervisor (it would fail again at once); under
/// rules 18 it was. And a node removed from the cluster is recorded, across a restart
/// (records `!`); before rules 19 the command is refused, so no older member meets it.
#[test]
fn under_rules_19_a_bot_s_dead_event_is_not_sent_again_and_a_removed_node_is_recorded() {
    for rules in [18, 19] {
        let (store, mut state, web, conv) = with_the_bot(rules);
        let key = *state.outbox.iter().find(|(_, d)| d.to_bot).map(|(k, _)| k).expect("the bot's started event");
        ok(run(&mut state, &store, T0 + 20, Command::Handoff { channel: web.clone(), conversation: conv, group: None, reason: "a person, please".into(), context: vec![] }));
        ok(run(&mut state, &store, T0 + 30, Command::DeliveriesAttempted { node: 1, items: vec![key] }));
        let failed = DeliveryResult { conversation: key.0, seq: key.1, node: 1, outcome: DeliveryOutcome::Failed { reason: "the bot no longer holds the conversation".into() } };
        ok(run(&mut state, &store, T0 + 40, Command::DeliveryResults { results: vec![failed] }));
        let again = run(&mut state, &store, T0 + 50, Command::RetryDelivery { conversation: key.0, seq: key.1, by: "sue".into() });
        if rules >= 19 {
            assert!(matches!(&again, Err(Error::Invalid(m)) if m.contains("no longer holds")), "{again:?}");
        } else {
            again.expect("rules 18 sent it again");
        }

        let forgotten = run(&mut state, &store, T0 + 60, Command::ForgetNode { id: 4 });
        if rules >= 19 {
            forgotten.expect("recorded");
            assert!(state.removed_nodes.contains(&4));
            assert!(records::load(&store).expect("loads").removed_nodes.contains(&4), "kept across a restart");
            let (_, events) = ok(run(&mut state, &store, T0 + 70, Command::ForgetNode { id: 4 }));
            assert!(events.is_empty(), "recorded once");
        } else {
            assert!(matches!(forgotten, Err(Error::Invalid(_))), "{forgotten:?}");
            assert!(state.removed_nodes.is_empty());
        }
    }
}

/// Rules 23: a channel without its adapter takes no message for its customers (before,
/// one was acknowledged and never sent nor shown as failed); an entry being sent when
/// the channel is disconnected becomes `unknown`, and the worker's `sent` still counts;
/// a worker's late `failed` does not undo another node's `sent`.
#[test]
fn from_rules_23_a_disconnected_channel_loses_no_message_and_a_sent_one_stays_sent() {
    for rules in [22, 23] {
        let (store, mut state, conv, seq) = anns_reply_queued(rules);
        let post = |key: &str| Command::PostOperatorMessage { operator: OperatorId::new("ann"), conversation: conv, key: key.into(), text: "Hi".into(), attachments: vec![] };
        // Being sent by node 1 when the channel is disconnected.
        ok(run(&mut state, &store, T0 + 40, Command::DeliveriesAttempted { node: 1, items: vec![(conv, seq)] }));
        ok(run(&mut state, &store, T0 + 50, Command::SetChannelAdapter { channel: tg(), adapter: None }));
        let sent = DeliveryResult { node: 1, conversation: conv, seq, outcome: DeliveryOutcome::Sent { provider_id: "777".into() } };
        ok(run(&mut state, &store, T0 + 60, Command::DeliveryResults { results: vec![sent] }));
        let d = records::delivery(&store, conv, seq).expect("read").expect("kept");
        let written = run(&mut state, &store, T0 + 70, post("k2"));
        if rules == 22 {
            assert_eq!(d.status, DeliveryStatus::Failed, "rules 22 dropped the sent that followed");
            assert!(written.is_ok(), "rules 22 took a message it would never send");
            continue;
        }
        assert_eq!(d.status, DeliveryStatus::Sent, "the worker's sent counts");
        assert!(matches!(&written, Err(Error::Invalid(why)) if why.contains("not connected")), "{written:?}");
        // Node 2 sends the next one after a leader change; node 1's late failure is dropped.
        connect(&mut state, &store);
        let (reply, _) = ok(run(&mut state, &store, T0 + 80, post("k3")));
        let Reply::Message { seq: seq3, .. } = reply else { panic!("{reply:?}") };
        ok(run(&mut state, &store, T0 + 90, Command::DeliveriesAttempted { node: 2, items: vec![(conv, seq3)] }));
        ok(run(&mut state, &store, T0 + 100, Command::DeliveryResults { results: vec![DeliveryResult { node: 2, conversation: conv, seq: seq3, outcome: DeliveryOutcome::Sent { provider_id: "778".into() } }] }));
        let (_, events) = ok(run(&mut state, &store, T0 + 110, Command::DeliveryResults { results: vec![DeliveryResult { node: 1, conversation: conv, seq: seq3, outcome: DeliveryOutcome::Failed { reason: "timed out".into() } }] }));
        assert!(events.is_empty(), "a deposed worker's failure changes nothing: {events:?}");
        assert_eq!(records::delivery(&store, conv, seq3).expect("read").expect("kept").status, DeliveryStatus::Sent);
    }
}

/// Rules 24: on a split cluster a mail in the thread of a conversation that closed after
/// the gateway read it open still reaches the thread's conversation shard; from a sender
/// whose mail goes to another shard (a colleague in copy) it is refused `closed` and
/// nothing is written, and the gateway takes it again without the thread, in the
/// sender's shard. Under rules 23 the thread's shard started a conversation of that
/// sender, one their next mail (placed by the sender) never finds.
#[test]
fn from_rules_24_a_mail_in_a_thread_closed_meanwhile_starts_nothing_outside_its_senders_shard() {
    let part = switchboard_actors::core::Part::Conversations { routing: 2, shard: 0, shards: 2 };
    let shard_of = |sender: &str| switchboard_actors::placement::sender_shard(&mail(), sender, 2);
    let here = (0u32..).map(|n| format!("anna{n}@example.org")).find(|s| shard_of(s) == 0).expect("a sender of shard 0");
    let elsewhere = (0u32..).map(|n| format!("bob{n}@example.org")).find(|s| shard_of(s) == 1).expect("a sender of shard 1");
    let visitor = format!("mail:{elsewhere}");
    for rules in [23, 24] {
        let (store, mut state) = setup_with(rules);
        connect_mail(&mut state, &store);
        let run_here = |state: &mut ShardState, at: u64, command: Command| {
            records::run_as(state, &store, &Envelope::new(Timestamp(at), command), part).map(|(reply, outcome)| (reply, outcome.events))
        };
        let (reply, _) = ok(run_here(&mut state, T0 + 10, rich(&here, "m1@x", "my card is blocked", vec![], None)));
        let conv = conversation_of(&reply);
        assert_eq!(conv.0 % 2, 0, "numbered by shard 0");
        // Closed after the gateway read it open; the colleague answers in its thread.
        ok(run_here(&mut state, T0 + 20, Command::CloseByClient { conversation: conv }));
        let answered = run_here(&mut state, T0 + 30, rich(&elsewhere, "m2@x", "any news?", vec![], Some(conv)));
        let stray = state.conversations.values().find(|c| c.visitor.id.as_deref() == Some(visitor.as_str())).map(|c| c.id);
        if rules == 23 {
            let started = conversation_of(&answered.expect("rules 23 took it").0);
            assert_eq!(stray, Some(started), "rules 23 started the colleague's conversation in shard 0, where their mail never goes");
            continue;
        }
        assert!(matches!(answered, Err(Error::Closed(c)) if c == conv), "{answered:?}");
        assert_eq!(stray, None, "nothing started");
        assert!(!state.open_senders.contains_key(&(mail(), visitor.clone())));
        // The customer's own mail in the closed thread is this shard's: a new conversation, as before.
        let (reply, events) = ok(run_here(&mut state, T0 + 40, rich(&here, "m3@x", "still blocked", vec![], Some(conv))));
        assert_ne!(conversation_of(&reply), conv);
        assert!(events.iter().any(|e| matches!(e, Event::ConversationStarted { .. })), "{events:?}");
    }
}
