//! Rules 14 bound the customer text one conversation holds (`MAX_CLIENT_TEXT_BYTES`):
//! every staff reader of a conversation is sent its whole history, which without the
//! bound one anonymous visitor could make about 160 MB (10,000 entries of 4,000
//! characters). Past it the visitor is told to start a new conversation; the count
//! survives a restart; conversations decided under rules 13 keep taking text. Rules 22
//! bound the staff text the same way (`MAX_STAFF_TEXT_BYTES`: operators' messages,
//! notes, the bot's replies).

use switchboard_actors::core::{MAX_CLIENT_TEXT_BYTES, MAX_STAFF_TEXT_BYTES, MAX_TEXT_CHARS};
use switchboard_actors::model::*;
use switchboard_actors::records::{self, MemStore};
use switchboard_actors::state::ShardState;
use switchboard_actors::Error;

fn started(rules: u32) -> (ShardState, MemStore, ConversationId) {
    let store = MemStore::default();
    let mut state = ShardState { rules, ..ShardState::default() };
    let commands = [
        Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new("g"), name: "g".into(), policy: Policy::LongestIdle, offer_timeout_ms: 5000, sla_ms: 60_000 }),
        Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), kind: "web".into(), name: "web".into(), default_group: SkillGroupId::new("g") }),
        Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() },
    ];
    for command in commands {
        records::run(&mut state, &store, &Envelope::new(Timestamp(1), command)).expect("accepted");
    }
    let conversation = *state.conversations.keys().next().expect("started");
    (state, store, conversation)
}

fn post(state: &mut ShardState, store: &MemStore, conversation: ConversationId, n: usize, text: &str) -> Result<(), Error> {
    let command = Command::PostClientMessage { conversation, key: format!("k{n}"), text: text.into(), attachments: vec![] };
    records::run(state, store, &Envelope::new(Timestamp(2 + n as u64), command)).map(|_| ())
}

#[test]
fn a_conversation_takes_customer_text_up_to_its_bound_then_asks_for_a_new_one() {
    let longest = "é".repeat(MAX_TEXT_CHARS); // 8,000 bytes
    let fits = (MAX_CLIENT_TEXT_BYTES / longest.len() as u64) as usize;
    let (mut state, store, conversation) = started(14);
    for n in 0..fits {
        post(&mut state, &store, conversation, n, &longest).expect("within the bound");
    }
    let refused = post(&mut state, &store, conversation, fits, &longest);
    assert!(matches!(&refused, Err(Error::Invalid(why)) if why.contains("customer text") && why.contains("start a new one")), "{refused:?}");
    // What is left still fits, a byte at a time.
    let left = MAX_CLIENT_TEXT_BYTES - fits as u64 * longest.len() as u64;
    post(&mut state, &store, conversation, fits + 1, &"x".repeat(left as usize)).expect("the last bytes fit");
    assert!(post(&mut state, &store, conversation, fits + 2, "x").is_err(), "not one byte more");
    // A restart rebuilds the count from the history.
    let mut reloaded = records::load(&store).expect("the records load");
    assert_eq!(reloaded.conversations[&conversation].client_text_bytes, MAX_CLIENT_TEXT_BYTES);
    assert!(post(&mut reloaded, &store, conversation, fits + 3, "x").is_err(), "refused after a restart too");
    // A repeated key is still answered as the message it was.
    let again = Command::PostClientMessage { conversation, key: "k0".into(), text: longest.clone(), attachments: vec![] };
    assert!(records::run(&mut reloaded, &store, &Envelope::new(Timestamp(100_000), again)).is_ok(), "a resend of a taken message is its ack");
}

#[test]
fn under_rules_13_a_conversation_kept_taking_customer_text() {
    let longest = "é".repeat(MAX_TEXT_CHARS);
    let fits = (MAX_CLIENT_TEXT_BYTES / longest.len() as u64) as usize;
    let (mut state, store, conversation) = started(13);
    for n in 0..=fits + 1 {
        post(&mut state, &store, conversation, n, &longest).expect("rules 13 had no bound but the entries'");
    }
}

fn note(state: &mut ShardState, store: &MemStore, conversation: ConversationId, n: usize, text: &str) -> Result<(), Error> {
    let command = Command::AddNote { conversation, author: "sue".into(), name: "Sue".into(), key: format!("n{n}"), text: text.into() };
    records::run(state, store, &Envelope::new(Timestamp(2 + n as u64), command)).map(|_| ())
}

#[test]
fn from_rules_22_a_conversation_takes_staff_text_up_to_its_bound() {
    let longest = "é".repeat(MAX_TEXT_CHARS); // 8,000 bytes
    let fits = (MAX_STAFF_TEXT_BYTES / longest.len() as u64) as usize;
    let (mut state, store, conversation) = started(22);
    for n in 0..fits {
        note(&mut state, &store, conversation, n, &longest).expect("within the bound");
    }
    let refused = note(&mut state, &store, conversation, fits, &longest);
    assert!(matches!(&refused, Err(Error::Invalid(why)) if why.contains("staff text")), "{refused:?}");
    let left = MAX_STAFF_TEXT_BYTES - fits as u64 * longest.len() as u64;
    note(&mut state, &store, conversation, fits + 1, &"x".repeat(left as usize)).expect("the last bytes fit");
    assert!(note(&mut state, &store, conversation, fits + 2, "x").is_err(), "not one byte more");
    // The customer's own room is apart: they can still write.
    post(&mut state, &store, conversation, 0, "still here").expect("the customer's text is counted apart");
    // A restart rebuilds the count from the history.
    let mut reloaded = records::load(&store).expect("the records load");
    assert_eq!(reloaded.conversations[&conversation].staff_text_bytes, MAX_STAFF_TEXT_BYTES);
    assert!(note(&mut reloaded, &store, conversation, fits + 3, "x").is_err(), "refused after a restart too");

    // Under rules 21 the same notes were all taken.
    let (mut state, store, conversation) = started(21);
    for n in 0..=fits + 1 {
        note(&mut state, &store, conversation, n, &longest).expect("rules 21 took it");
    }
}
