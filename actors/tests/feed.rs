//! What an operator's feed carries: every history entry of a held conversation exactly
//! once, either inside the `Assigned` item or as a later `Conversation` item.

use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::{FeedItem, HistoryItem, ShardState};

thread_local! {
    static STORE: MemStore = MemStore::default();
}

fn store() -> MemStore {
    STORE.with(|s| s.clone())
}

fn run(state: &mut ShardState, at: u64, command: Command) {
    records::run(state, &store(), &Envelope::new(Timestamp(at), command)).expect("command accepted");
}

#[test]
fn assignment_history_reaches_the_operator_exactly_once() {
    let mut s = ShardState::default();
    run(&mut s, 0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 }));
    for op in ["ann", "bob"] {
        run(&mut s, 0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new(op), name: op.into(), capacity: 1, groups: vec![SkillGroupId::new("g")] }));
        run(&mut s, 1, Command::SetPresence { operator: OperatorId::new(op), presence: Presence::Online });
    }
    run(&mut s, 0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }));
    run(&mut s, 10, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    let conv = ConversationId(0);
    run(&mut s, 11, Command::PostClientMessage { conversation: conv, key: "k1".into(), text: "hello".into(), attachments: vec![] });
    let offer = *s.offers.keys().next().expect("offered");
    let holder = s.offers[&offer].operator.clone();
    run(&mut s, 12, Command::AcceptOffer { operator: holder.clone(), offer });
    run(&mut s, 13, Command::PostClientMessage { conversation: conv, key: "k2".into(), text: "still there?".into(), attachments: vec![] });
    let other = if holder.as_str() == "ann" { OperatorId::new("bob") } else { OperatorId::new("ann") };
    run(&mut s, 14, Command::Transfer { operator: holder.clone(), conversation: conv, target: TransferTarget::Operator(other.clone()), comment: "yours".into() });
    run(&mut s, 15, Command::PostClientMessage { conversation: conv, key: "k3".into(), text: "hi again".into(), attachments: vec![] });

    let history = records::history(&store(), conv, 0, usize::MAX).expect("history");
    // The first holder's feed ends with the transfer, the last entry written while they
    // held it; the new holder's runs to the end of the history.
    let transferred_at = history
        .iter()
        .find(|e| matches!(e.item, HistoryItem::Transferred { .. }))
        .map(|e| e.seq)
        .expect("the transfer is in the history");
    let history_len = history.len() as u64;
    for (operator, expect_released, last) in [(&holder, true, transferred_at), (&other, false, history_len)] {
        let mut seen: Vec<u64> = Vec::new();
        let feed = records::feed(&store(), operator, 0, usize::MAX).expect("feed");
        for entry in &feed {
            match &entry.item {
                FeedItem::Assigned { history_upto, .. } => seen.extend(1..=*history_upto),
                FeedItem::Conversation { entry, .. } => seen.push(entry.seq),
                _ => {}
            }
        }
        // Exactly once, in order, with nothing missing: a duplicate anywhere, a gap or a
        // reordering all make the sequence differ from 1..=last.
        let expected: Vec<u64> = (1..=last).collect();
        assert_eq!(seen, expected, "{operator}: the feed must carry history entries 1..={last} each once, in order");
        let released = feed.iter().any(|e| matches!(e.item, FeedItem::Released { .. }));
        assert_eq!(released, expect_released);
    }
}

#[test]
fn a_conversation_holds_a_bounded_history() {
    use switchboard_actors::core::MAX_HISTORY_ENTRIES;
    let mut s = ShardState::default();
    run(&mut s, 0, Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 }));
    run(&mut s, 0, Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }));
    run(&mut s, 1, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() });
    let conv = ConversationId(0);
    let mut n = 0;
    while (s.conversations[&conv].last_seq as usize) < MAX_HISTORY_ENTRIES {
        run(&mut s, 2, Command::PostClientMessage { conversation: conv, key: format!("k{n}"), text: "spam".into(), attachments: vec![] });
        n += 1;
    }
    let refused = records::run(&mut s, &store(), &Envelope::new(Timestamp(3), Command::PostClientMessage { conversation: conv, key: "last".into(), text: "one more".into(), attachments: vec![] }));
    assert!(matches!(refused, Err(switchboard_actors::Error::Invalid(_))), "{refused:?}");
    assert_eq!(records::history(&store(), conv, 0, usize::MAX).expect("history").len(), MAX_HISTORY_ENTRIES);
}
