//! The shard answers a woken reader's history and feed reads from its cache of newest
//! entries (`src/tails.rs`). Whatever the cache answers must be exactly what the record
//! store holds: checked here after every committed command, for every resume point a
//! reader could have, through messages, an assignment, a close and a retention purge.

mod common;

use std::sync::Arc;

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::shard::Shard;
use switchboard_actors::state::HOUR_MS;

const T0: u64 = 1_700_000_000_000;

/// Every read a socket could make of `conversation` and `operator`, through the shard
/// (cache first) and from the store alone, must agree.
fn agree(shard: &Shard, store: &MemStore, conversation: ConversationId, operator: &OperatorId) {
    let last = shard.conversation(conversation).expect("readable").map_or(0, |c| c.last_seq());
    for after in 0..=last + 1 {
        for limit in [1, 3, 64] {
            let cached = shard.history(conversation, after, limit).expect("history");
            let stored = records::history(store, conversation, after, limit).expect("stored history");
            assert_eq!(cached, stored, "history of {} after {after}, limit {limit}", conversation.0);
        }
    }
    let (first, last) = {
        let state = shard.read();
        let feed = &state.operators[operator].feed;
        (feed.first_retained(), feed.last_seq)
    };
    for after in first.saturating_sub(1)..=last {
        for limit in [1, 2, 64] {
            let cached = shard.feed_since(operator, after, limit).expect("feed").expect("retained");
            let stored = records::feed(store, operator, after, limit).expect("stored feed");
            assert_eq!(cached, stored, "feed of {} after {after}, limit {limit}", operator.0);
        }
    }
}

#[test]
fn cached_history_and_feed_reads_are_what_the_store_holds() {
    let store = MemStore::default();
    let shard = Shard::new();
    shard.load(Arc::new(store.clone())).expect("load");
    let ann = OperatorId::new("ann");
    let commit = |at: u64, command: Command| common::commit(&shard, &store, at, command);
    commit(T0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 }));
    commit(T0, Command::UpsertOperator(OperatorConfig { id: ann.clone(), name: "Ann".into(), capacity: 3, groups: vec![SkillGroupId::new("g")] }));
    commit(T0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }));
    commit(T0, Command::SetPresence { operator: ann.clone(), presence: Presence::Online });

    let mut conversations = Vec::new();
    for i in 0..2u64 {
        commit(T0 + 1 + i, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
        let id = ConversationId(i);
        conversations.push(id);
        agree(&shard, &store, id, &ann);
        let offer = *shard.read().offers.keys().next().expect("offered");
        commit(T0 + 2 + i, Command::AcceptOffer { operator: ann.clone(), offer });
        agree(&shard, &store, id, &ann);
    }
    // Messages both ways, interleaved over the two conversations: more than a cached run
    // holds, so readers far behind are answered by the store and the rest by the cache.
    for n in 0..20u64 {
        let id = conversations[(n % 2) as usize];
        let command = if n % 3 == 0 {
            Command::PostOperatorMessage { operator: ann.clone(), conversation: id, key: format!("o{n}"), text: format!("answer {n}"), attachments: vec![] }
        } else {
            Command::PostClientMessage { conversation: id, key: format!("c{n}"), text: format!("question {n}"), attachments: vec![] }
        };
        commit(T0 + 10 + n, command);
        for id in &conversations {
            agree(&shard, &store, *id, &ann);
        }
    }
    // The cache moves with the hot state: an applied message is read back before its
    // entry's records are written (the store does not have it yet).
    let id = conversations[0];
    let last = shard.conversation(id).expect("readable").expect("open").last_seq();
    let mut writes = Vec::new();
    let message = Command::PostClientMessage { conversation: id, key: "early".into(), text: "before the write".into(), attachments: vec![] };
    shard.apply(&Envelope::new(Timestamp(T0 + 35), message), &mut writes).expect("accepted");
    assert!(records::history(&store, id, last, 10).expect("stored").is_empty(), "not written yet");
    let early = shard.history(id, last, 10).expect("history");
    assert_eq!(early.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![last + 1], "read from the cache");
    // A read from the start reaches back past what the cache holds: the store answers
    // it, and the cache adds the entry the store does not have yet.
    let whole = shard.history(id, 0, 64).expect("history");
    assert!(shard.read().conversations[&id].last_seq() > 8, "longer than a cached run");
    assert_eq!(whole.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=last + 1).collect::<Vec<_>>(), "every entry up to the state's last seq");
    store.write(writes);
    shard.end_entry();
    shard.published();
    agree(&shard, &store, id, &ann);
    // Closed: the conversations leave memory, their history stays readable.
    for id in &conversations {
        commit(T0 + 40, Command::CloseByOperator { operator: ann.clone(), conversation: *id, resolution: "done".into(), tags: vec![] });
        agree(&shard, &store, *id, &ann);
    }
    assert!(shard.read().conversations.is_empty());
    // A retention purge deletes them: no read may still find them in the cache.
    commit(T0 + 50, Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 });
    let later = T0 + 2 * 24 * HOUR_MS;
    commit(later, Command::PurgeExpired { as_of: Timestamp(later) });
    for id in &conversations {
        assert!(shard.conversation(*id).expect("readable").is_none(), "purged");
        assert_eq!(shard.history(*id, 0, 64).expect("history"), vec![], "nothing of {} is served after the purge", id.0);
        agree(&shard, &store, *id, &ann);
    }
}
