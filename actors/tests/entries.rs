//! Commands committed together in one log entry (group commit) are applied one after
//! another, but their records are written together after the last one. A later command
//! of the entry must see what an earlier one did: here a conversation closed by the
//! first command is closed for the second, although its record on disk is still open.

use std::sync::Arc;

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore, Store};
use switchboard_actors::shard::Shard;
use switchboard_actors::state::{ConversationStatus, ShardState};
use switchboard_actors::Error;

fn setup() -> (MemStore, ConversationId, OperatorId) {
    let store = MemStore::default();
    let mut state = ShardState::default();
    let run = |state: &mut ShardState, at: u64, command: Command| {
        records::run(state, &store, &Envelope::new(Timestamp(at), command)).expect("accepted");
    };
    run(&mut state, 0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 }));
    run(&mut state, 0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 2, groups: vec![SkillGroupId::new("g")] }));
    run(&mut state, 0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }));
    run(&mut state, 1, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online });
    run(&mut state, 2, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    let offer = *state.offers.keys().next().expect("offered");
    run(&mut state, 3, Command::AcceptOffer { operator: OperatorId::new("ann"), offer });
    (store, ConversationId(0), OperatorId::new("ann"))
}

#[test]
fn a_command_sees_what_an_earlier_command_of_its_entry_did() {
    let (store, conversation, operator) = setup();
    let shard = Shard::new();
    shard.load(Arc::new(store.clone())).expect("load");

    // One entry: the operator closes the conversation, then the visitor writes to it.
    let mut writes = Vec::new();
    let close = Command::CloseByOperator { operator: operator.clone(), conversation, resolution: "done".into(), tags: vec![] };
    shard.apply(&Envelope::new(Timestamp(10), close), &mut writes).expect("closed");
    let late = Command::PostClientMessage { conversation, key: "late".into(), text: "one more thing".into(), attachments: vec![] };
    let refused = shard.apply(&Envelope::new(Timestamp(10), late), &mut writes);
    assert_eq!(refused, Err(Error::Closed(conversation)), "closed by the earlier command of the same entry");
    shard.end_entry();
    store.write(writes);

    // The records hold the close, and the closed conversation left memory.
    assert!(shard.read().conversations.is_empty());
    let stored = shard.conversation(conversation).expect("readable").expect("kept");
    assert_eq!(stored.status, ConversationStatus::Closed);
    let history = shard.history(conversation, 0, usize::MAX).expect("history");
    assert!(matches!(history.last().map(|e| &e.item), Some(switchboard_actors::state::HistoryItem::Closed { .. })), "{history:?}");
    assert_eq!(history.len() as u64, stored.last_seq(), "no entry overwritten");
    assert_eq!(json(&records::load(&store).expect("load")), json(&shard.read()), "the records hold the hot state");
}

fn json(state: &ShardState) -> String {
    serde_json::to_string(state).expect("serializes")
}

/// One log entry (group commit) holding a rating and a note of a closed conversation and,
/// after them, the retention purge that deletes it: the purge reads the keys to delete
/// from the records, which do not hold what the earlier commands of the entry wrote yet.
/// From rules 16 the purge leaves such a conversation to the next purge, which deletes
/// it whole; under rules 15 (replayed as it was decided) the same entry deleted it and
/// left the rating's and the note's history entries behind.
#[test]
fn a_rating_in_the_entry_of_the_purge_goes_with_its_conversation() {
    const DAY: u64 = 24 * 60 * 60 * 1000;
    for rules in [switchboard_actors::core::RULES_VERSION, 15] {
        let store = MemStore::default();
        let shard = Shard::new();
        shard.load(Arc::new(store.clone())).expect("load");
        let entry = |commands: Vec<(u64, Command)>| {
            let mut writes = Vec::new();
            let mut replies = Vec::new();
            for (at, command) in commands {
                replies.push(shard.apply(&Envelope::new(Timestamp(at), command), &mut writes).expect("applied"));
            }
            shard.end_entry();
            store.write(writes);
            shard.published();
            replies
        };
        entry(vec![
            (0, Command::AdoptRules { version: rules }),
            (0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 })),
            (0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") })),
            (0, Command::SetChannelRetention { channel: ChannelId::new("web"), days: 1 }),
        ]);
        let started = entry(vec![(1, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() })]);
        let conversation = match started.first() {
            Some(switchboard_actors::core::Reply::Started { conversation }) => *conversation,
            other => panic!("not started: {other:?}"),
        };
        entry(vec![(2, Command::PostClientMessage { conversation, key: "k1".into(), text: "hello".into(), attachments: vec![] })]);
        entry(vec![(3, Command::CloseByClient { conversation })]);

        let later = 2 * DAY;
        let note = Command::AddNote { conversation, author: "sue".into(), name: "Sue".into(), key: "n1".into(), text: "called back".into() };
        entry(vec![
            (later, Command::Rate { conversation, score: 5, comment: "thanks".into() }),
            (later, note),
            (later, Command::PurgeExpired { as_of: Timestamp(later) }),
        ]);
        let history = store.scan(&records::key::history_prefix(conversation), None, usize::MAX).expect("scan");
        if rules >= 16 {
            // Kept whole for now, with its rating.
            let kept = shard.conversation(conversation).expect("readable").expect("kept until the next purge");
            assert!(kept.rated, "rules {rules}");
            assert_eq!(history.len() as u64, kept.last_seq(), "rules {rules}: every entry kept");
            entry(vec![(later + 1, Command::PurgeExpired { as_of: Timestamp(later + 1) })]);
            let left = store.scan(&records::key::history_prefix(conversation), None, usize::MAX).expect("scan");
            assert!(left.is_empty(), "rules {rules}: the next purge deletes every history entry, the rating's and the note's too: {} left", left.len());
        } else {
            assert!(!history.is_empty(), "rules 15 replays as decided: the entries written in the purge's entry stayed");
        }
        assert!(shard.conversation(conversation).expect("readable").is_none(), "rules {rules}: purged");
        assert!(store.get(&records::key::conversation(conversation)).expect("read").is_none(), "rules {rules}");
    }
}

/// A closed conversation out of memory, brought back by a command that needs none of its
/// idempotency keys (a read mark), then named in the same entry by a note sent again
/// under the key of one it already holds: the note is that one (`duplicate`), not a
/// second. Loaded without its keys for the read mark, the conversation kept none for
/// the rest of the entry, and the retry was written twice (routing rules 20).
#[test]
fn a_note_sent_again_in_the_entry_that_brought_its_closed_conversation_back_is_written_once() {
    let (store, conversation, operator) = setup();
    let shard = Shard::new();
    shard.load(Arc::new(store.clone())).expect("load");
    let mut writes = Vec::new();
    // Rules 20 (under older rules a replay decides as it did then).
    let adopt = Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION };
    shard.apply(&Envelope::new(Timestamp(5), adopt), &mut writes).expect("adopted");
    let note = Command::AddNote { conversation, author: "sue".into(), name: "Sue".into(), key: "note-1".into(), text: "called back".into() };
    let first = shard.apply(&Envelope::new(Timestamp(10), note.clone()), &mut writes).expect("noted");
    let close = Command::CloseByOperator { operator, conversation, resolution: "done".into(), tags: vec![] };
    shard.apply(&Envelope::new(Timestamp(11), close), &mut writes).expect("closed");
    shard.end_entry();
    store.write(std::mem::take(&mut writes));
    assert!(shard.read().conversations.is_empty(), "the closed conversation left memory");

    // One entry: a read mark, then the note again.
    shard.apply(&Envelope::new(Timestamp(20), Command::MarkRead { conversation, reader: Reader::Client, upto: 1 }), &mut writes).expect("read");
    let again = shard.apply(&Envelope::new(Timestamp(20), note), &mut writes).expect("answered");
    shard.end_entry();
    store.write(writes);
    let seq = |reply: &switchboard_actors::core::Reply| match reply {
        switchboard_actors::core::Reply::Message { seq, .. } => *seq,
        other => panic!("{other:?}"),
    };
    assert_eq!(seq(&again), seq(&first), "the note it already holds");
    assert!(matches!(again, switchboard_actors::core::Reply::Message { duplicate: true, .. }), "{again:?}");
    let notes = shard.history(conversation, 0, usize::MAX).expect("history").into_iter().filter(|e| matches!(e.item, switchboard_actors::state::HistoryItem::Note { .. })).count();
    assert_eq!(notes, 1);
}
