//! A keyed `start` (protocol.md §2, `key`): sent again by the same visitor within 24
//! hours (its answer was lost), it gets the conversation the first one opened, never a
//! second one; in another channel, with another key, by another visitor or later, it is
//! a new start; the key goes with its conversation when retention deletes it.

use switchboard_actors::core::Reply;
use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore, Store};
use switchboard_actors::state::{ShardState, HOUR_MS};
use switchboard_actors::Error;

const T0: u64 = 100 * HOUR_MS;

fn run(state: &mut ShardState, store: &MemStore, at: u64, command: Command) -> Result<(Reply, Vec<Event>), Error> {
    let (reply, outcome) = records::run(state, store, &Envelope::new(Timestamp(at), command))?;
    Ok((reply, outcome.events))
}

fn ok(r: Result<(Reply, Vec<Event>), Error>) -> (Reply, Vec<Event>) {
    r.expect("accepted")
}

/// Group `g` with channels `web` and `shop`, both answered by `g`.
fn floor() -> (MemStore, ShardState) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    ok(run(&mut state, &store, T0, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION }));
    ok(run(&mut state, &store, T0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "G".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 20_000 })));
    for channel in ["web", "shop"] {
        ok(run(&mut state, &store, T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new(channel), kind: "web".into(), name: channel.into(), default_group: SkillGroupId::new("g") })));
    }
    (store, state)
}

fn start_once(key: &str, channel: &str, visitor: &str) -> Command {
    Command::StartConversationOnce {
        key: key.into(),
        channel: ChannelId::new(channel),
        group: None,
        visitor: Visitor { id: Some(visitor.into()), name: "Dana".into(), attributes: vec![] },
    }
}

fn started(r: (Reply, Vec<Event>)) -> (ConversationId, Vec<Event>) {
    match r {
        (Reply::Started { conversation }, events) => (conversation, events),
        (other, _) => panic!("not started: {other:?}"),
    }
}

fn queued(state: &ShardState) -> usize {
    state.groups[&SkillGroupId::new("g")].queue.len()
}

#[test]
fn a_start_sent_again_with_its_key_gets_the_same_conversation() {
    let (store, mut state) = floor();
    let (first, events) = started(ok(run(&mut state, &store, T0 + 1, start_once("k-3f9a1c2e7b5d4a60", "web", "v-1"))));
    assert!(events.iter().any(|e| matches!(e, Event::ConversationStarted { .. })));
    assert_eq!(queued(&state), 1);

    // The same start again (the answer was lost with a node): nothing new is written.
    let (again, events) = started(ok(run(&mut state, &store, T0 + 2, start_once("k-3f9a1c2e7b5d4a60", "web", "v-1"))));
    assert_eq!(again, first);
    assert!(events.is_empty(), "a repeated start writes nothing: {events:?}");
    assert_eq!(queued(&state), 1, "one conversation waits, not two");

    // Another key, or the same key in another channel, is another start.
    let (other, _) = started(ok(run(&mut state, &store, T0 + 3, start_once("k-000000000000000000", "web", "v-1"))));
    let (elsewhere, _) = started(ok(run(&mut state, &store, T0 + 4, start_once("k-3f9a1c2e7b5d4a60", "shop", "v-1"))));
    assert!(other != first && elsewhere != first && other != elsewhere);
    assert_eq!(queued(&state), 3);

    // A node started again reads the key from the records.
    let mut reloaded = records::load(&store).expect("loaded");
    let (after_restart, events) = started(ok(run(&mut reloaded, &store, T0 + 5, start_once("k-3f9a1c2e7b5d4a60", "web", "v-1"))));
    assert_eq!(after_restart, first);
    assert!(events.is_empty());
}

#[test]
fn a_key_opens_nothing_of_another_visitor_s_nor_after_its_window() {
    let (store, mut state) = floor();
    let (first, _) = started(ok(run(&mut state, &store, T0 + 1, start_once("k-weak-0000000000", "web", "v-1"))));
    // Another visitor with the same key (a client that made a poor one): their own
    // conversation, never the first visitor's.
    let (theirs, events) = started(ok(run(&mut state, &store, T0 + 2, start_once("k-weak-0000000000", "web", "v-2"))));
    assert!(theirs != first && !events.is_empty());
    // The key names the newest start now; the first visitor's copy starts anew too.
    let (again, _) = started(ok(run(&mut state, &store, T0 + 3, start_once("k-weak-0000000000", "web", "v-2"))));
    assert_eq!(again, theirs);

    // Past the window a copy is a new start.
    let window = switchboard_actors::core::START_KEY_WINDOW_MS;
    let (kept, _) = started(ok(run(&mut state, &store, T0 + 10, start_once("k-window-000000000", "web", "v-3"))));
    let (within, events) = started(ok(run(&mut state, &store, T0 + 10 + window, start_once("k-window-000000000", "web", "v-3"))));
    assert_eq!((within, events.len()), (kept, 0), "a copy a whole window later still finds it");
    let (late, events) = started(ok(run(&mut state, &store, T0 + 11 + window, start_once("k-window-000000000", "web", "v-3"))));
    assert!(late != kept && !events.is_empty(), "past the window the key is forgotten");
}

#[test]
fn a_key_is_refused_when_empty_or_too_long() {
    let (store, mut state) = floor();
    for key in [String::new(), "k".repeat(switchboard_actors::core::MAX_KEY_BYTES + 1)] {
        let refused = run(&mut state, &store, T0 + 1, start_once(&key, "web", "v-1"));
        assert!(matches!(refused, Err(Error::Invalid(_))), "{} bytes: {refused:?}", key.len());
    }
    assert_eq!(queued(&state), 0);
}

#[test]
fn the_key_is_deleted_with_its_conversation() {
    let (store, mut state) = floor();
    let (first, _) = started(ok(run(&mut state, &store, T0 + 1, start_once("k-retained", "web", "v-1"))));
    ok(run(&mut state, &store, T0 + 2, Command::CloseByClient { conversation: first }));
    ok(run(&mut state, &store, T0 + 3, Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 }));
    // Still kept: a late retry of the closed conversation's start finds it.
    let (again, events) = started(ok(run(&mut state, &store, T0 + 4, start_once("k-retained", "web", "v-1"))));
    assert_eq!((again, events.len()), (first, 0));

    let later = T0 + 2 * 24 * HOUR_MS;
    ok(run(&mut state, &store, later, Command::PurgeExpired { as_of: Timestamp(later) }));
    assert!(store.get(&records::key::start_key(&ChannelId::new("web"), "k-retained")).expect("read").is_none(), "the key went with its conversation");
    assert!(store.get(&records::key::started_by_key(first)).expect("read").is_none());
    let (fresh, events) = started(ok(run(&mut state, &store, later + 1, start_once("k-retained", "web", "v-1"))));
    assert!(fresh != first && !events.is_empty(), "after the purge the key starts anew");
}

#[test]
fn a_purge_leaves_a_key_a_later_start_took() {
    let (store, mut state) = floor();
    let (old, _) = started(ok(run(&mut state, &store, T0 + 1, start_once("k-reused-00000000", "web", "v-1"))));
    ok(run(&mut state, &store, T0 + 2, Command::CloseByClient { conversation: old }));
    ok(run(&mut state, &store, T0 + 3, Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 }));
    // Another visitor's start takes the key; it stays open while the old one is purged.
    let later = T0 + 2 * 24 * HOUR_MS;
    let (newer, _) = started(ok(run(&mut state, &store, later - 1_000, start_once("k-reused-00000000", "web", "v-2"))));
    ok(run(&mut state, &store, later, Command::PurgeExpired { as_of: Timestamp(later) }));
    assert!(store.get(&records::key::started_by_key(old)).expect("read").is_none());
    let (again, events) = started(ok(run(&mut state, &store, later + 1, start_once("k-reused-00000000", "web", "v-2"))));
    assert_eq!((again, events.len()), (newer, 0), "the newer start's key outlives the purge of the older");
}

/// One log entry (group commit) holding a start that takes a key over and a purge of the
/// conversation the key named before: the records the purge reads still name the old
/// conversation, and the key must stay with the new one.
#[test]
fn a_purge_in_the_same_entry_as_the_start_that_took_the_key_leaves_the_key() {
    use std::sync::Arc;
    use switchboard_actors::shard::Shard;
    let store = MemStore::default();
    let shard = Shard::new();
    shard.load(Arc::new(store.clone())).expect("load");
    let entry = |commands: Vec<(u64, Command)>| {
        let mut writes = Vec::new();
        let mut replies = Vec::new();
        for (at, command) in commands {
            replies.push(shard.apply(&Envelope::new(Timestamp(at), command), &mut writes).expect("applied"));
        }
        store.write(writes);
        shard.end_entry();
        shard.published();
        replies
    };
    entry(vec![
        (T0, Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION }),
        (T0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "G".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 20_000 })),
        (T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })),
        (T0, Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 }),
    ]);
    let conversation = |reply: &Reply| match reply {
        Reply::Started { conversation } => *conversation,
        other => panic!("not started: {other:?}"),
    };
    let old = conversation(&entry(vec![(T0 + 1, start_once("k-same-entry-0000", "web", "v-1"))])[0]);
    entry(vec![(T0 + 2, Command::CloseByClient { conversation: old })]);
    let later = T0 + 2 * 24 * HOUR_MS;
    let replies = entry(vec![(later, start_once("k-same-entry-0000", "web", "v-2")), (later, Command::PurgeExpired { as_of: Timestamp(later) })]);
    let newer = conversation(&replies[0]);
    assert_ne!(newer, old);
    let replies = entry(vec![(later + 1, start_once("k-same-entry-0000", "web", "v-2"))]);
    assert_eq!(conversation(&replies[0]), newer, "the key still names the newer conversation");
}

/// A key record of the first builds with keyed starts (the conversation alone) is read,
/// and taken by no visitor: a copy starts anew instead of stopping the node.
#[test]
fn a_key_record_holding_the_conversation_alone_is_read() {
    let (store, mut state) = floor();
    store.write(vec![(records::key::start_key(&ChannelId::new("web"), "k-first-build-000"), Some(records::encode(&ConversationId(7))))]);
    let (fresh, events) = started(ok(run(&mut state, &store, T0 + 1, start_once("k-first-build-000", "web", "v-1"))));
    assert!(fresh != ConversationId(7) && !events.is_empty());
}
