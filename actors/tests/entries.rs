//! Commands committed together in one log entry (group commit) are applied one after
//! another, but their records are written together after the last one. A later command
//! of the entry must see what an earlier one did: here a conversation closed by the
//! first command is closed for the second, although its record on disk is still open.

use std::sync::Arc;

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
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
