//! The routing core: a command and the entry's time go in, committed events and the
//! timers to arm come out.
//!
//! Architecture invariant: `handle` is deterministic. It runs inside the Raft state
//! machine on every replica, so capacity (I3) and single assignment (I2) are decided in
//! exactly one serial order per shard, and replaying the log replays every decision.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::mail::{GroupId, Mail, Placed, Receipt};
use crate::model::*;
use crate::routing::{new_round_at, queue_order, select_operator};
use crate::state::{ConversationStatus, ShardState, Touched};

/// The newest routing rules this build decides with. Rules 2: a missed offer sets the
/// operator away; a conversation every free operator passed on gets a new round;
/// capacity is judged before passes; decline reasons and attachments per conversation
/// are bounded. Rules 3: an entry's time never goes below the time of the last entry
/// that changed the state (a leader whose clock is behind, or a stepped clock, cannot
/// make time recede and strand a deadline), and an offer that expires more than
/// [`STALLED_EXPIRY_MS`] late does not set its operator away. Rules 4: an operator who
/// comes back online has their passes on queued conversations forgotten, so one they
/// missed (or declined) is offered to them at once when nobody else can take it, instead
/// of waiting for its new round; and a change of an operator's name, capacity or groups
/// is told on their feed; conversation numbers start at 1. A node proposes `AdoptRules`
/// at start; earlier entries keep their rules.
/// Rules 5: a skill group's queue is offered in order of priority (its channel's, its
/// visitor's attributes', plus ageing), then arrival; an operator in wrap-up after a
/// close gets no offer until it ends.
/// Rules 6: routing steps relax a group's skill requirements and add overflow groups
/// over waiting time (the decision record names the step); opening hours pause a
/// group's offers and answer conversations arriving while it is closed; channel kinds
/// carry weights against operators' capacity.
/// Rules 7: a channel with a bot gives its new conversations to the bot, which holds
/// them out of every queue until it hands them off.
/// Rules 8: the messenger adapters (Telegram, WhatsApp, Messenger, VK).
/// Rules 9: an operator's accept counts from when it reached the gateway
/// (`AcceptOfferAt`): one that arrived before the offer's deadline assigns the
/// conversation even if the offer expired before the accept was committed, while the
/// conversation still waits unoffered in the same group and the operator has room; an
/// operator the missed offer set away is online again.
/// Rules 10: a change of what an operator may take withdraws their pending offers, which
/// routing then makes again to whoever fits: `UpsertOperator` of a known operator (its
/// capacity or groups), `SetOperatorChannels`, and `SetChannelWeights` (every operator's
/// offers). Before, an operator whose capacity was lowered could still accept every
/// offer made under the old one, and go over capacity (I3).
/// Rules 11: on the split, an operator's close is decided by the routing shard, which
/// knows who holds the conversation now, and goes to the conversation shard as a
/// `Closed` letter (before, the conversation shard decided it against its own copy of
/// the holder, which a transfer or reassignment on its way as a letter had not reached
/// yet: the previous holder could close the conversation its new holder had just been
/// given), and the routing shard counts a conversation's age from its start as the
/// `Enqueue` letter gives it. Everywhere, an operator back online has their passes
/// forgotten in the groups that overflow into theirs too.
/// Rules 12: an offer that was pending when a new leader's first entry was applied
/// (`ShardState::leader_began`) does not set its operator away when it expires, however
/// soon after its deadline the expiry is committed: a leader change may have kept the
/// operator's answer from arriving. Before, only an expiry committed more than
/// [`STALLED_EXPIRY_MS`] late spared them, and a fast failover set them away.
/// Rules 13: an operator's message with files to a Channel API customer is taken (the
/// adapter fetches each file with the channel's token); before, it was refused. And a
/// routing shard that hears of a conversation before its skill group queues it when the
/// group arrives (before, it waited in no queue until a restart rebuilt the queues).
/// Rules 14: the same for a conversation's channel: a routing shard offers no
/// conversation whose channel it has not heard of yet (before, it weighed it 1 and read
/// its kind as none, so an operator could be offered it past their capacity or channel
/// limits, or nobody was and it waited), and routes its groups again when the channel
/// arrives; and a change of a channel's kind withdraws the pending offers of its
/// conversations, as rules 10 does for weights (before, an offer made under the old
/// kind's weight could be accepted past capacity). Rules 14 also bound a conversation's
/// customer text ([`MAX_CLIENT_TEXT_BYTES`]): a web or API client's message past it is
/// refused; a messenger or email customer's own message past it (or past the entries, or
/// the room for files) closes the conversation [`FULL`] and opens a new one that prefers
/// the same operator, who gets no wrap-up for it.
/// Rules 15: a channel whose customers have no address (every kind but `web`:
/// messengers, email, the Channel API) set to take only its allow list takes only
/// customers its visitor allow rules name (before, its allow list was never checked,
/// since no address could be); and a messenger, email or Channel API customer whose
/// message opens a new conversation is routed first to whoever served them last, within
/// the group's sticky time, as a returning web visitor is (before, only web visitors
/// were). And, as rules 10 does for capacity and groups, a change of an operator's skills
/// (`SetOperatorSkills`) withdraws their pending offers, and a change of the skills a
/// group's conversations need (`SetGroupRouting`'s `required_skills` or `skill_rules`)
/// withdraws the group's (before, an offer made under the old skills could be accepted
/// by an operator they no longer fit). And a supervisor's reassignment of a queued
/// conversation to the operator it is offered to does not count that offer, which it
/// withdraws, against their room (before, it was refused when the offer filled them).
/// And an access rule may name a visitor id of up to
/// [`crate::access::MAX_VISITOR_RULE_CHARS`] characters (before, 64: shorter than a
/// messenger sender's id can be). And a retention purge entry takes no further
/// conversation once those it took hold [`crate::records::PURGE_KEYS`] records.
/// Rules 16: a retention purge leaves a conversation that an earlier command of its log
/// entry named or changed or wrote a channel delivery for (a rating, a note, a retry) to
/// the next purge, which deletes it whole (before, what that command wrote, such as the
/// rating's history entry or the retry's outbox record, was not among the records the
/// purge read its keys from, and outlived the conversation); a routing shard told of a
/// purge deletes the history an earlier letter of the entry wrote for it; and a purge
/// keeps the record of who served a visitor last when a close earlier in the entry
/// named a newer conversation of theirs. And a
/// group's KPIs count a conversation its bot handed off as entered at the handoff,
/// a customer leaving the bot as not abandoned, and only ratings of conversations an
/// operator handled (before, a handed-off conversation was answered and handled but
/// never entered, and a bot's conversations counted as abandoned and in the csat, on a
/// cluster of one group and not on a split one, whose routing shard never hears of them).
/// Rules 17: a conversation that changes hands (taken from an offer, transferred,
/// reassigned or queued again) forgets its customer's silence, which counts again from
/// its new operator's first message (before, it counted from the previous operator's
/// last one, and a conversation that had waited in a queue was reminded and closed as
/// inactive a second or two after its new operator took it). And a change of a group's
/// routing steps withdraws its pending offers, which routing makes again under the new
/// steps (before, an offer made through an overflow step, or under a step's relaxed
/// skills, stayed and could be accepted after the step that allowed it was gone).
/// Rules 18: an accept that reached the gateway before its offer's deadline and is
/// decided after the offer expired (rules 9) takes the conversation only if it has
/// waited in the queue since the offer was made and the operator still belongs to a
/// group the offer's routing step reaches, with the skills it needs there (before, the
/// operator's groups and skills were not looked at again, and an operator who took it
/// that way and transferred it back to the queue took it again when the same accept
/// was sent again).
/// And a dead letter sent again forgets the provider's id for its last attempt, so a
/// receipt for that attempt cannot settle the new one; a change of a channel's kind
/// withdraws the offers of the operators holding its conversations (I3); a supervisor
/// taking a conversation from the bot hands it off first; a conversation is not
/// reassigned to the group it already waits in.
/// Rules 21: a close never shortens the operator's wrap-up already running (before, a
/// close in a group with a shorter wrap-up, or a close taken earlier whose letter came
/// later, replaced it, and the operator got offers of the longer group early).
/// Rules 22: a conversation's staff text (operators' messages, internal notes and the
/// bot's replies) is bounded ([`MAX_STAFF_TEXT_BYTES`]): one past it is refused (before,
/// one operator or bot could fill the 10,000 entries with about 160 MB of text, which
/// every staff reader of the conversation is sent whole).
/// Rules 23: an operator's message or a bot's reply to a messenger, email or Channel API
/// customer whose channel has no adapter (disconnected) is refused; before, it was
/// acknowledged, written, and never queued for the provider nor shown as failed.
/// Disconnecting a channel settles an entry being sent at that moment as `unknown`, not
/// `failed`, so the worker's `sent` that may follow still counts (before, it was dropped
/// and a retry of the "failed" entry sent the message twice). And a worker's `failed`
/// counts only for its own attempt: a node that lost the leadership cannot turn the
/// new leader's `sent` or a receipt's `delivered` into a dead letter.
/// Rules 24: on a split cluster, a channel message that names a thread (an email reply)
/// reaches the thread's conversation shard; when that conversation is no longer open
/// there and the sender's own messages go to another conversation shard, it is refused
/// `closed` and nothing is written (the gateway sends it again without the thread, to
/// the sender's shard). Before, the thread's shard started a conversation of that
/// sender, which the sender's next message (placed by the sender) never found: a second
/// open conversation of theirs in another shard.
/// Rules 25: on a split cluster, a close that a conversation shard decided before the
/// routing shard's first answer (an accept, or a supervisor's reassignment to an
/// operator, whose letter the conversation shard drops once it has closed) counts in the
/// group's KPIs as a close before an answer (the customer's as `abandoned`), and the
/// answer counted for it (`answered`, its wait, `answered_in_sla`) is taken back. Before,
/// the routing shard counted it answered and handled (with a handle time of 0) although
/// no operator ever reached the customer; a group of one refuses the accept after the
/// close.
/// Rules 26: on a split cluster, a routing shard's close letter says when the close was
/// decided (`Mail::ClosedAt`), and the customer's messages the conversation shard took
/// from then on, while the letter was on its way, are not left unread in the closed
/// conversation: a messenger, email or Channel API customer's go on in a new conversation
/// of theirs, as their next message would (first to whoever held the closed one); a web
/// visitor, whose socket follows the closed one, is told [`LATE_NOTICE`]. Before, they
/// stayed in the closed conversation, read by nobody and answered by nobody.
/// Rules 27: on a split cluster, an operator a conversation shard hears of after the
/// routing shard's letter gave them one of its conversations holds it there from then
/// on, with an `Assigned` feed item (`state.rs`, `OperatorUpserted`). Before, they held
/// none of it on that shard: the customer's messages never reached their feed.
pub const RULES_VERSION: u32 = 27;

/// From rules 3, an offer expiry committed more than this after the deadline does not
/// set the operator away: the timer fires within milliseconds of the deadline on a
/// running leader, so a late one was the cluster's stall, not the operator's absence.
pub const STALLED_EXPIRY_MS: u64 = 2000;

/// What a web visitor is told when their messages reached the conversation after its
/// operator had closed it (rules 26): nobody read them.
pub const LATE_NOTICE: &str = "Your last message reached us after this conversation was closed, and nobody has read it. Please start a new conversation.";
/// History entries a routing shard's close letter looks back at for messages the customer
/// wrote after the close (rules 26, `records::prefetch`).
pub const MAX_LATE_ENTRIES: u64 = 100;

/// The resolution of a messenger conversation closed because it held all the history
/// or customer text one may (rules 14): the customer's next message opened a new one.
pub const FULL: &str = "full";
/// The reason of the handoff recorded when a supervisor reassigns a conversation its
/// channel's bot held (rules 18).
pub const TAKEN_FROM_BOT: &str = "a supervisor took it from the bot";
/// The resolution of a conversation answered and closed outside its group's hours.
pub const AFTER_HOURS: &str = "after_hours";
/// Routing steps a group may have, and the heaviest channel weight.
pub const MAX_STEPS: usize = 10;
/// Most nodes one `HoldersSet` names (a group has three voters; more while it moves).
pub const MAX_HOLDERS: usize = 16;
pub const MAX_WEIGHT: u32 = 100;

/// Longest message text the core accepts, in characters.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest reason an operator may give for declining an offer, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Operators one node's socket report may name.
pub const MAX_REPORTED_OPERATORS: usize = 100_000;
/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// How long a keyed start's copies get the conversation the first one opened (24 h).
pub const START_KEY_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
/// History entries one conversation may hold; past it the client starts a new one.
/// Bounds what a single visitor can make every replica store.
pub const MAX_HISTORY_ENTRIES: usize = 10_000;
/// Bytes of customer text one conversation may hold, from rules 14 (with at most
/// [`MAX_HISTORY_ENTRIES`] entries of [`MAX_TEXT_CHARS`] it could hold about 160 MB,
/// which every staff reader of it would then be sent whole); past it the customer starts
/// a new one.
pub const MAX_CLIENT_TEXT_BYTES: u64 = 1024 * 1024;
/// Bytes of staff text (operators' messages, notes, the bot's replies) one conversation
/// may hold, from rules 22; with the customer's text, a whole history sent to a staff
/// reader stays within a few MiB.
pub const MAX_STAFF_TEXT_BYTES: u64 = 4 * 1024 * 1024;
/// Attachments one message may carry.
pub const MAX_ATTACHMENTS_PER_MESSAGE: usize = 5;
/// Files one conversation may hold, and their total size: bounds what one visitor can
/// make the blob store keep.
pub const MAX_ATTACHMENTS_PER_CONVERSATION: usize = 50;
pub const MAX_ATTACHMENT_BYTES_PER_CONVERSATION: u64 = 100 * 1024 * 1024;
/// Longest retention a channel may set, in days (ten years).
pub const MAX_RETENTION_DAYS: u32 = 3650;
/// Tags a closed conversation may carry, and their length in characters.
pub const MAX_TAGS: usize = 10;
pub const MAX_TAG_CHARS: usize = 40;

/// What the proposer of a command is told once it is committed and applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Started { conversation: ConversationId },
    /// The message is history entry `seq`; `duplicate` when the key was seen before and
    /// nothing new was written.
    Message { seq: u64, duplicate: bool },
    /// A channel's inbound message is in `conversation`; `duplicate` when its provider
    /// message id was taken before and nothing new was written.
    Inbound { conversation: ConversationId, duplicate: bool },
    /// The outbox entries a `DeliveriesAttempted` marked: the proposer sends only these.
    Attempted { items: Vec<(ConversationId, u64)> },
    /// A letter's destination applied every letter from its sender up to `last`.
    Delivered { last: u64 },
}

/// The idempotency key of a channel's inbound message: the channel, the sender and the
/// provider's id for the message (some providers number messages per chat), kept within
/// [`MAX_KEY_BYTES`] (a longer one is hashed, staying unique per message).
pub fn inbound_key(channel: &ChannelId, sender: &str, provider_message_id: &str) -> String {
    // The sender's length keeps "a:b"+"c" and "a"+"b:c" apart.
    let key = format!("{}:{}:{}:{}", channel.as_str(), sender.len(), sender, provider_message_id);
    if key.len() <= MAX_KEY_BYTES {
        key
    } else {
        let hash = |bytes: &[u8], seed: u64| bytes.iter().fold(seed, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3));
        let rest = format!("{sender}\u{0}{provider_message_id}");
        format!("{}:h{:016x}{:016x}", channel.as_str(), hash(rest.as_bytes(), 0xcbf29ce484222325), hash(rest.as_bytes(), 0x84222325cbf29ce4))
    }
}

/// Longest sender id and sender name a channel's inbound message may carry.
pub const MAX_SENDER_BYTES: usize = 200;
/// Quick replies one bot message may offer, and their length in characters.
pub const MAX_BUTTONS: usize = 10;
pub const MAX_BUTTON_CHARS: usize = 64;
/// Items of context a bot's handoff may carry.
pub const MAX_CONTEXT_ITEMS: usize = 20;
/// Why the conversations a bot held were handed off when it was taken off its channel.
pub const BOT_REMOVED: &str = "the bot was taken off the channel";
/// The resolution of a conversation the bot closed without one of its own.
pub const BOT_RESOLVED: &str = "bot";
/// Letters a conversation shard holds for its routing shard before it starts no more
/// conversations (rules 20; see [`handle_as`]).
pub const MAX_UNCONFIRMED_LETTERS: usize = 4096;
/// Outbox entries one `DeliveriesAttempted` or `DeliveryResults` may name.
pub const MAX_DELIVERY_BATCH: usize = 1000;

/// Timers the driver arms or drops after applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    ArmOfferTimer { offer: OfferId, operator: OperatorId, deadline: Timestamp },
    CancelOfferTimer { offer: OfferId, operator: OperatorId },
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub effects: Vec<Effect>,
    pub touched: Touched,
}

/// Which part of ADR 0006's split a state plays. Today's node runs `Whole`: one group
/// decides everything. `Directory` (the metadata group, `G0`) decides directory
/// commands (`placement::Target::Directory`) and sends each to the routing shard and
/// every conversation shard as a letter, which they apply as their own command.
/// `Conversations` (a conversation shard, `C`) decides commands but never routes: it
/// holds no offers and no operator presence, and tells its routing shard what changed
/// by [`mail_of`]. `Routing` (a routing shard, `R`) decides and routes, and tells each
/// conversation shard who holds its conversations.
///
/// The conversation shards are `shards` groups numbered from `first`; conversation
/// `id` lives in group `first + id % shards`, and shard `k` allocates only ids with
/// `id % shards == k` (ADR 0006, "Conversation ids").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Whole,
    Directory { routing: GroupId, first: GroupId, shards: u64 },
    Conversations { routing: GroupId, shard: u64, shards: u64 },
    Routing { first: GroupId, shards: u64 },
}

impl Part {
    /// The conversation shard group of conversation `id`, seen from a routing shard.
    pub fn conversation_group(first: GroupId, shards: u64, id: ConversationId) -> GroupId {
        first + id.0 % shards.max(1)
    }
}

/// Decides, applies and routes one command. On rejection the state is untouched.
pub fn handle(state: &mut ShardState, envelope: &Envelope) -> Result<(Reply, Outcome), Error> {
    handle_as(state, envelope, Part::Whole)
}

/// [`handle`] in the part `part` of the split: a conversation shard commits what it
/// decides and routes nothing.
pub fn handle_as(state: &mut ShardState, envelope: &Envelope, part: Part) -> Result<(Reply, Outcome), Error> {
    let now = entry_time(state, envelope.at);
    let (reply, decided) = decide(state, &envelope.command, now, part)?;
    // Rules 20: a conversation shard whose routing shard has not confirmed
    // `MAX_UNCONFIRMED_LETTERS` letters (it has no leader, or cannot keep up) starts no
    // conversation: each start's letter would wait in every member's memory, and the
    // starts come from anyone. Its open conversations go on.
    if let (Part::Conversations { routing, .. }, true) = (part, state.rules >= 20) {
        let waiting = state.mail_out.get(&routing).map_or(0, |o| o.len());
        // A letter's (rules 26: a close carrying what its customer wrote after it) is not
        // refused: it carries a message taken already, and closes are as many as holders.
        let letter = matches!(envelope.command, Command::Deliver { .. });
        if waiting >= MAX_UNCONFIRMED_LETTERS && !letter && decided.iter().any(|e| matches!(e, Event::ConversationStarted { .. })) {
            // Decided here, so not an outcome to ask again at once: the sender retries
            // later, as for any `unavailable`.
            return Err(Error::Unavailable(format!(
                "{waiting} letters to the routing shard wait for it to take them: no conversation starts here until it does; try again later"
            )));
        }
    }
    advance_clock(state, now);
    let mut outcome = Outcome::default();
    for event in decided {
        commit(state, event, now, &mut outcome);
    }
    if matches!(part, Part::Whole | Part::Routing { .. }) {
        let queue = match &envelope.command {
            Command::RouteQueue { group } => Some(group),
            _ => None,
        };
        route_touched(state, queue, now, &mut outcome);
    }
    // The letters this entry decided, posted in the same apply (ADR 0006). Receiving a
    // letter makes none, so nothing echoes; except a directory command, which the
    // routing and conversation shards apply as their own (removing a bot requeues its
    // conversations; a changed operator may lose offers); and from rules 26 a routing
    // shard's close, which may carry late messages into a new conversation, whose
    // `Enqueue` goes to routing (nothing about the closed one: routing closed it).
    let received = match &envelope.command {
        Command::Deliver { mail: Mail::Directory { .. }, .. } => false,
        Command::Deliver { mail: Mail::ClosedAt { .. }, .. } => state.rules < 26,
        Command::Deliver { .. } => true,
        _ => false,
    };
    if !received && part != Part::Whole {
        let mut letters = mail_of(state, &outcome, part);
        if let Command::Deliver { mail: Mail::ClosedAt { conversation, .. }, .. } = &envelope.command {
            letters.retain(|(_, mail)| !mail.conversations().contains(conversation));
        }
        let directory = |command: &Command| crate::placement::target(command) == crate::placement::Target::Directory;
        if let (Part::Directory { routing, first, shards }, true) = (part, directory(&envelope.command)) {
            let (command, rules) = (Box::new(envelope.command.clone()), state.rules);
            letters.push((routing, Mail::Directory { rules, command: command.clone() }));
            letters.extend((0..shards).map(|k| (first + k, Mail::Directory { rules, command: command.clone() })));
        }
        for (to, mail) in letters {
            let id = state.mail_out.get(&to).map_or(0, |o| o.last_posted()) + 1;
            commit(state, Event::MailPosted { to, id, mail }, now, &mut outcome);
        }
    }
    Ok((reply, outcome))
}

fn advance_clock(state: &mut ShardState, now: Timestamp) {
    if state.rules >= 3 && now > state.last_at {
        state.last_at = now;
        state.dirty.clock = true;
    }
}

/// The events that commit what a letter from the other kind of shard tells `state`
/// (decided like a command, from the state before them). Mail is made by commands only
/// ([`mail_of`]), never by receiving mail, so nothing echoes; except, from rules 26, the
/// `Enqueue` of a conversation a routing shard's close starts to carry late messages,
/// whose receipt makes none.
///
/// A letter about a conversation the receiver has closed (or never knew, for a
/// routing shard) changes nothing: a conversation shard's close is final, and the
/// routing shard learns it by `Release`, which comes after every letter it sent before.
fn letter_events(state: &ShardState, mail: &Mail, now: Timestamp, part: Part) -> Vec<Event> {
    let status = |id: &ConversationId| state.conversations.get(id).map(|c| c.status.clone());
    let open = |id: &ConversationId| status(id).is_some_and(|s| s != ConversationStatus::Closed);
    let mut events = Vec::new();
    match mail {
        Mail::Enqueue { conversation, channel, visitor, group, sticky, created_at } => {
            match status(conversation) {
                None => {
                    events.push(Event::ConversationStarted { conversation: *conversation, channel: channel.clone(), visitor: visitor.clone() });
                    // Rules 11: it is as old as its conversation shard says (a bot may
                    // have held it, or the letter waited for this shard's leader).
                    if state.rules >= 11 && *created_at < now {
                        events.push(Event::ConversationAged { conversation: *conversation, created_at: *created_at });
                    }
                }
                // Queued or held already (cannot be: `C` enqueues a conversation once per
                // stay out of a queue), or closed here (final).
                Some(_) => {}
            }
            if !events.is_empty() {
                events.push(Event::ConversationQueued { conversation: *conversation, group: group.clone(), ticket: state.next_ticket });
                events.extend(sticky.iter().map(|operator| Event::StickySet { conversation: *conversation, operator: operator.clone() }));
            }
        }
        Mail::Release { conversation, by, resolution, tags } | Mail::ReleaseAt { conversation, by, resolution, tags, .. } => {
            if let Some(conv) = state.conversations.get(conversation).filter(|_| open(conversation)) {
                // Rules 20: counted when the conversation shard closed it, and the
                // holder's wrap-up runs from then (the letter may have waited).
                let decided_at = match mail {
                    Mail::ReleaseAt { at, .. } if state.rules >= 20 => Some((*at).min(now)),
                    _ => None,
                };
                events = withdraw_pending(state, conversation, WithdrawReason::ConversationClosed);
                events.push(Event::ConversationClosed { conversation: *conversation, by: *by, resolution: resolution.clone(), tags: tags.clone(), decided_at });
                // Rules 14: a conversation closed `full` goes on in a new one with the
                // same operator, who gets no wrap-up for it.
                if !(state.rules >= 14 && *by == Closer::System && resolution == FULL) {
                    // One already over by now is none.
                    events.extend(wrap_up_after(state, conv, decided_at.unwrap_or(now)).filter(|e| !matches!(e, Event::WrapUpSet { until: Some(until), .. } if *until <= now)));
                }
            }
        }
        Mail::Closed { conversation, by, resolution, tags } | Mail::ClosedAt { conversation, by, resolution, tags, .. } => {
            if let Some(conv) = state.conversations.get(conversation).filter(|_| open(conversation)) {
                events.push(Event::ConversationClosed { conversation: *conversation, by: *by, resolution: resolution.clone(), tags: tags.clone(), decided_at: None });
                events.extend(wrap_up_after(state, conv, now));
                // Rules 26: what the customer wrote after the close was decided.
                if matches!(mail, Mail::ClosedAt { .. }) && matches!(part, Part::Conversations { .. }) && state.rules >= 26 && !state.late_messages.is_empty() {
                    events.extend(carry_late(state, conv, now, part));
                }
            }
        }
        Mail::Rated { conversation, score, comment } | Mail::RatedAt { conversation, score, comment, .. } => {
            if state.conversations.get(conversation).is_some_and(|c| !c.rated) {
                let decided_at = match mail {
                    Mail::RatedAt { at, .. } if state.rules >= 20 => Some((*at).min(now)),
                    _ => None,
                };
                events.push(Event::ConversationRated { conversation: *conversation, score: *score, comment: comment.clone(), decided_at });
            }
        }
        Mail::Purged { conversations } => {
            // Those this shard holds records of, found before the entry (`records::prefetch`).
            let known: Vec<ConversationId> = conversations.iter().filter(|c| state.expired.contains(c)).copied().collect();
            if !known.is_empty() {
                events.push(Event::ConversationsDeleted { conversations: known });
            }
        }
        Mail::Assigned { conversation, operator } => {
            if open(conversation) {
                events.push(Event::ConversationAssigned { conversation: *conversation, operator: operator.clone() });
            }
        }
        Mail::Transferred { conversation, from, to, comment, then } => {
            if open(conversation) {
                events.push(Event::ConversationTransferred { conversation: *conversation, from: from.clone(), to: to.clone(), comment: comment.clone() });
                events.push(placed(state, *conversation, then));
            }
        }
        Mail::Reassigned { conversation, by, to, comment, then } => {
            if open(conversation) {
                events.push(Event::ConversationReassigned { conversation: *conversation, by: by.clone(), to: to.clone(), comment: comment.clone() });
                events.push(placed(state, *conversation, then));
            }
        }
        Mail::Requeued { conversation, group } => {
            if open(conversation) {
                events.push(Event::ConversationQueued { conversation: *conversation, group: group.clone(), ticket: state.next_ticket });
            }
        }
        // Decided by the metadata group already; refused here only if the two disagree
        // on the directory, which reaches every group in the same order.
        // Under the same rules and in the same order as the metadata group decided it:
        // a refusal here means the two disagree on the directory, which is a defect;
        // the letter is used up (waiting would stop every later one) and said loudly.
        Mail::Directory { command, .. } => match decide(state, command, now, part) {
            Ok((_, decided)) => events.extend(decided),
            Err(e) => tracing::error!(error = %e, "a directory command the metadata group took was refused here: this group's directory differs from the metadata group's"),
        },
    }
    events
}

/// Rules 26: the customer's messages a conversation shard took after its routing shard
/// decided the operator's close (`state.late_messages`, read by `records::prefetch`),
/// which nobody on the staff read. A messenger, email or Channel API customer's go on in
/// a new conversation of theirs, as their next message would have (`channel_inbound`),
/// offered first to whoever held the closed one; a web visitor, whose socket follows the
/// closed one and who cannot be moved to another, is told so ([`LATE_NOTICE`]). A customer
/// who may not start one (blocked since) gets neither: the close stands as before.
fn carry_late(state: &ShardState, conv: &crate::state::Conversation, now: Timestamp, part: Part) -> Vec<Event> {
    if state.channels.get(&conv.channel).is_none_or(|c| c.kind == crate::access::WEB_KIND) {
        return vec![Event::NoticeGiven { conversation: conv.id, text: LATE_NOTICE.into() }];
    }
    let Ok((carried, mut events)) = start_conversation(state, &conv.channel, None, &conv.visitor, now, part, true) else { return Vec::new() };
    // Right after it is placed, as a channel message that opens one is (`channel_inbound`).
    // Under the keys they were taken with: a provider's redelivery finds them in the
    // closed conversation (records `I`), and a file stays its conversation's.
    // Their files become the new conversation's (its staff read them there, and purging
    // the closed one leaves them: `records::collect_conversation_keys`).
    let mut messages = Vec::new();
    for entry in &state.late_messages {
        if let crate::state::HistoryItem::ClientMessage { key, text, attachments } = &entry.item {
            let attachments: Vec<Attachment> = attachments.iter().map(|a| Attachment { conversation: carried, ..a.clone() }).collect();
            messages.extend(attachments.iter().cloned().map(Event::AttachmentStored));
            messages.push(Event::ClientMessagePosted { conversation: carried, key: key.clone(), text: text.clone(), attachments });
        }
    }
    let at = events.len().min(2);
    events.splice(at..at, messages);
    let queued = events.iter().any(|e| matches!(e, Event::ConversationQueued { conversation, .. } if *conversation == carried));
    let closed = events.iter().any(|e| matches!(e, Event::ConversationClosed { conversation, .. } if *conversation == carried));
    events.extend(conv.assigned().filter(|_| queued && !closed).map(|operator| Event::StickySet { conversation: carried, operator: operator.clone() }));
    events
}

/// The event that puts a conversation where a routing shard's letter says it went.
fn placed(state: &ShardState, conversation: ConversationId, then: &Placed) -> Event {
    match then {
        Placed::Held(operator) => Event::ConversationAssigned { conversation, operator: operator.clone() },
        Placed::Queued(group) => Event::ConversationQueued { conversation, group: group.clone(), ticket: state.next_ticket },
    }
}

/// The letters the part `part` of the split sends the other part for an outcome of one
/// of its commands, in the order it decided them (see [`Mail`]). `state` is the state
/// after the outcome was committed. Nothing for `Whole`.
pub fn mail_of(state: &ShardState, outcome: &Outcome, part: Part) -> Vec<(GroupId, Mail)> {
    let addressee = |conversation: &ConversationId| match part {
        Part::Whole | Part::Directory { .. } => 0,
        Part::Conversations { routing, .. } => routing,
        Part::Routing { first, shards } => Part::conversation_group(first, shards, *conversation),
    };
    let mut mail = Vec::new();
    // A transfer's or reassignment's placement travels in its letter, not after it.
    let mut folded = BTreeSet::new();
    let placement = |from: usize, conv: &ConversationId, folded: &mut BTreeSet<usize>| {
        outcome.events.iter().enumerate().skip(from + 1).find_map(|(i, e)| match e {
            Event::ConversationAssigned { conversation, operator } if conversation == conv => Some((i, Placed::Held(operator.clone()))),
            Event::ConversationQueued { conversation, group, .. } if conversation == conv => Some((i, Placed::Queued(group.clone()))),
            _ => None,
        })
        .map(|(i, then)| {
            folded.insert(i);
            then
        })
    };
    for (i, event) in outcome.events.iter().enumerate() {
        if folded.contains(&i) {
            continue;
        }
        match (part, event) {
            (Part::Conversations { .. }, Event::ConversationQueued { conversation, group, .. }) => {
                let Some(conv) = state.conversations.get(conversation) else { continue };
                // Decided when it started, which for a bot's conversation is long before
                // it is queued.
                let sticky = state.sticky.get(conversation).cloned();
                mail.push((addressee(conversation), Mail::Enqueue {
                    conversation: *conversation,
                    channel: conv.channel.clone(),
                    visitor: conv.visitor.clone(),
                    group: group.clone(),
                    created_at: conv.created_at,
                    sticky,
                }));
            }
            // Rules 20: with the time it was decided here (this entry's), which the
            // routing shard counts it at.
            (Part::Conversations { .. }, Event::ConversationClosed { conversation, by, resolution, tags, .. }) => {
                let (conversation, by, resolution, tags) = (*conversation, *by, resolution.clone(), tags.clone());
                mail.push((addressee(&conversation), if state.rules >= 20 { Mail::ReleaseAt { conversation, by, resolution, tags, at: state.last_at } } else { Mail::Release { conversation, by, resolution, tags } }));
            }
            (Part::Conversations { .. }, Event::ConversationRated { conversation, score, comment, .. }) => {
                let (conversation, score, comment) = (*conversation, *score, comment.clone());
                mail.push((addressee(&conversation), if state.rules >= 20 { Mail::RatedAt { conversation, score, comment, at: state.last_at } } else { Mail::Rated { conversation, score, comment } }));
            }
            (Part::Conversations { .. }, Event::ConversationsDeleted { conversations }) => {
                if let Some(first) = conversations.first() {
                    mail.push((addressee(first), Mail::Purged { conversations: conversations.clone() }));
                }
            }
            // Rules 11: an operator's close, decided here; from rules 26 with when.
            (Part::Routing { .. }, Event::ConversationClosed { conversation, by, resolution, tags, .. }) if state.rules >= 11 => {
                let (conversation, by, resolution, tags) = (*conversation, *by, resolution.clone(), tags.clone());
                mail.push((addressee(&conversation), if state.rules >= 26 { Mail::ClosedAt { conversation, by, resolution, tags, at: state.last_at } } else { Mail::Closed { conversation, by, resolution, tags } }));
            }
            (Part::Routing { .. }, Event::ConversationAssigned { conversation, operator }) => {
                mail.push((addressee(conversation), Mail::Assigned { conversation: *conversation, operator: operator.clone() }));
            }
            (Part::Routing { .. }, Event::ConversationTransferred { conversation, from, to, comment }) => {
                if let Some(then) = placement(i, conversation, &mut folded) {
                    mail.push((addressee(conversation), Mail::Transferred { conversation: *conversation, from: from.clone(), to: to.clone(), comment: comment.clone(), then }));
                }
            }
            (Part::Routing { .. }, Event::ConversationReassigned { conversation, by, to, comment }) => {
                if let Some(then) = placement(i, conversation, &mut folded) {
                    mail.push((addressee(conversation), Mail::Reassigned { conversation: *conversation, by: by.clone(), to: to.clone(), comment: comment.clone(), then }));
                }
            }
            (Part::Routing { .. }, Event::ConversationQueued { conversation, group, .. }) => {
                mail.push((addressee(conversation), Mail::Requeued { conversation: *conversation, group: group.clone() }));
            }
            _ => {}
        }
    }
    mail
}

/// Routes the groups an outcome touched (and `queue`, asked for by `RouteQueue`).
fn route_touched(state: &mut ShardState, queue: Option<&SkillGroupId>, now: Timestamp, outcome: &mut Outcome) {
    let mut dirty: BTreeSet<SkillGroupId> = outcome.touched.groups.clone();
    if let Some(group) = queue {
        dirty.insert(group.clone());
    }
    // Rules 6: a group whose steps overflow into a touched group may now find room
    // with that group's operators; it is routed after the touched groups, whose own
    // queues come first.
    let overflowing: Vec<SkillGroupId> = if state.rules >= 6 {
        state
            .group_steps
            .iter()
            .filter(|(g, steps)| !dirty.contains(*g) && steps.iter().any(|s| s.overflow.iter().any(|o| dirty.contains(o))))
            .map(|(g, _)| g.clone())
            .collect()
    } else {
        Vec::new()
    };
    for group in dirty.iter().chain(&overflowing) {
        route_group(state, group, now, outcome);
    }
}

/// The time an entry stamped `at` is decided at: from rules 3 on, never before the last
/// entry that changed the state.
pub fn entry_time(state: &ShardState, at: Timestamp) -> Timestamp {
    if state.rules >= 3 {
        at.max(state.last_at)
    } else {
        at
    }
}

/// Runs the decision on a read-only state without committing anything, so a proposer can
/// refuse a command that would be refused anyway before it costs a flushed log entry.
/// `Ok(Some(reply))` answers a repeated idempotency key from state; `Ok(None)` means the
/// command must be proposed. The commit decides again: state may move in between.
pub fn precheck(state: &ShardState, command: &Command, now: Timestamp) -> Result<Option<Reply>, Error> {
    match decide(state, command, now, Part::Whole) {
        Ok((reply @ Reply::Message { duplicate: true, .. }, events)) if events.is_empty() => Ok(Some(reply)),
        // A read mark that does not move forward, or closing a closed conversation,
        // changes nothing, now or later: answered without a log entry.
        Ok((Reply::Done, events)) if events.is_empty() && matches!(command, Command::MarkRead { .. } | Command::CloseByClient { .. }) => {
            Ok(Some(Reply::Done))
        }
        Ok(_) => Ok(None),
        Err(e) => Err(e),
    }
}

fn commit(state: &mut ShardState, event: Event, now: Timestamp, outcome: &mut Outcome) {
    match &event {
        Event::OfferMade { offer, .. } => outcome.effects.push(Effect::ArmOfferTimer {
            offer: offer.id,
            operator: offer.operator.clone(),
            deadline: offer.deadline,
        }),
        Event::OfferAccepted { offer } | Event::OfferWithdrawn { offer, .. } => {
            if let Some(o) = state.offers.get(offer) {
                outcome.effects.push(Effect::CancelOfferTimer { offer: *offer, operator: o.operator.clone() });
            }
        }
        _ => {}
    }
    let touched = state.apply(&event, now);
    outcome.touched.merge(touched);
    outcome.events.push(event);
}

/// Offers queued conversations of `group`, head first, while operators have room.
fn route_group(state: &mut ShardState, group_id: &SkillGroupId, now: Timestamp, outcome: &mut Outcome) {
    // Rules 6: a group outside its opening hours makes no offers; its queue waits.
    if state.group_closed(group_id, now) {
        return;
    }
    // Whose room is worth walking the queue for: the group's operators, and from rules 6
    // those of the groups its steps overflow into.
    let mut pool: Vec<SkillGroupId> = vec![group_id.clone()];
    if state.rules >= 6 {
        for overflow in state.group_steps.get(group_id).into_iter().flatten().flat_map(|s| s.overflow.iter()) {
            if !pool.contains(overflow) {
                pool.push(overflow.clone());
            }
        }
    }
    // The order is a function of the queue and the time, fixed for this call: computed
    // once, not for every offer it makes (an offer only takes its conversation out of the
    // running, which the loop skips), and only once someone is free.
    let mut order: Option<Vec<ConversationId>> = None;
    loop {
        let Some(group) = state.groups.get(group_id) else { return };
        // Nobody who could take anything: an operator in wrap-up (rules 5) has room but
        // takes nothing, so the queue is not walked for them.
        // The groups of the pool with someone free in them. Cheapest tests first: a count
        // at capacity is full whatever the weights (each is at least 1); the weighed load
        // is a sum over the operator's conversations.
        let mut free_groups: Vec<&SkillGroupId> = Vec::new();
        for op in state.operators.values() {
            let free = op.presence == Presence::Online
                && op.free_capacity() > 0
                && op.config.groups.iter().any(|g| pool.contains(g))
                && !(state.rules >= 5 && state.wrap_up.get(&op.config.id).is_some_and(|until| *until > now))
                && state.has_any_room(op);
            if free {
                for g in op.config.groups.iter().filter(|g| pool.contains(*g)) {
                    if !free_groups.contains(&g) {
                        free_groups.push(g);
                    }
                }
                // Every group of the pool has someone free: nothing more to learn.
                if free_groups.len() == pool.len() {
                    break;
                }
            }
        }
        if free_groups.is_empty() {
            return;
        }
        let stepped = state.rules >= 6 && state.group_steps.contains_key(group_id);
        let order = order.get_or_insert_with(|| queue_order(state, group, now));
        let mut made = Vec::new();
        for conv_id in order.iter() {
            let Some(conv) = state.conversations.get(conv_id) else { continue };
            if !matches!(conv.status, ConversationStatus::Queued { offer: None, .. }) {
                continue;
            }
            // Rules 14: a routing shard may hear of a conversation before its channel
            // (the letters come from different groups): it waits until the channel's
            // kind and weight are known, and its groups are routed again then.
            if state.rules >= 14 && !state.channels.contains_key(&conv.channel) {
                continue;
            }
            // Rules 6: a conversation whose step reaches no group with someone free is
            // passed over without scoring anyone (it could get no offer and no new round).
            if stepped && !crate::routing::step_groups(state, group, crate::routing::step_at(state, group, conv, now)).iter().any(|g| free_groups.contains(g)) {
                continue;
            }
            let selection = select_operator(state, group, conv, now);
            if selection.chosen.is_none() && state.rules >= 2 {
                // Everyone free has passed on it: after a pause, start over rather than
                // leave it waiting for an operator who has not seen it yet (I4).
                let someone_passed_is_free = selection.candidates.iter().any(|c| c.excluded.as_deref() == Some("passed"));
                if someone_passed_is_free && new_round_at(group, conv).is_some_and(|at| now >= at) {
                    made.push(Event::RoundRestarted { conversation: *conv_id });
                    break;
                }
            }
            if let Some(chosen) = selection.chosen {
                let id = OfferId(state.next_offer);
                let offer = Offer {
                    id,
                    conversation: *conv_id,
                    operator: chosen.clone(),
                    group: group_id.clone(),
                    made_at: now,
                    deadline: now.plus_ms(group.config.offer_timeout_ms),
                };
                let decision = DecisionRecord {
                    offer: id,
                    conversation: *conv_id,
                    group: group_id.clone(),
                    policy: group.config.policy,
                    policy_version: Policy::VERSION,
                    at: now,
                    candidates: selection.candidates,
                    chosen,
                };
                made.push(Event::OfferMade { offer, decision });
                // Rules 6: the decision record names the step whose target matched.
                if state.rules >= 6 && state.group_steps.contains_key(group_id) {
                    made.push(Event::OfferStep { offer: id, step: selection.step });
                }
                break;
            }
        }
        if made.is_empty() {
            return;
        }
        for event in made {
            commit(state, event, now, outcome);
        }
    }
}

/// A message's text as the core takes it: not only spaces, at most [`MAX_TEXT_CHARS`].
pub fn check_text(text: &str) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::Invalid("message text is empty".into()));
    }
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(Error::TooLong { limit: MAX_TEXT_CHARS, actual: chars });
    }
    Ok(())
}

/// A message needs text or at least one attachment, and its attachments must have been
/// uploaded to this conversation.
fn check_message(state: &ShardState, conversation: ConversationId, text: &str, attachments: &[AttachmentId]) -> Result<Vec<Attachment>, Error> {
    if state.conversations.get(&conversation).is_some_and(|c| c.last_seq as usize >= MAX_HISTORY_ENTRIES) {
        return Err(Error::Invalid(format!("conversation reached {MAX_HISTORY_ENTRIES} entries; start a new one")));
    }
    if attachments.len() > MAX_ATTACHMENTS_PER_MESSAGE {
        return Err(Error::Invalid(format!("at most {MAX_ATTACHMENTS_PER_MESSAGE} attachments per message")));
    }
    if attachments.is_empty() || !text.is_empty() {
        check_text(text)?;
    }
    attachments
        .iter()
        .map(|id| match state.attachments.get(id) {
            Some(a) if a.conversation == conversation => Ok(a.clone()),
            _ => Err(Error::NotFound(format!("attachment {} in this conversation", id.0))),
        })
        .collect()
}

/// Rules 14: an operator is given a conversation only once its channel's kind and weight
/// are known here (a routing shard may hear of a conversation before its channel).
fn channel_known(state: &ShardState, channel: &ChannelId) -> Result<(), Error> {
    if state.rules >= 14 && !state.channels.contains_key(channel) {
        return Err(Error::Unavailable(format!("channel {channel} has not reached routing yet; try again in a moment")));
    }
    Ok(())
}

/// Rules 14: a customer's message that would take the conversation's customer text past
/// [`MAX_CLIENT_TEXT_BYTES`] is refused; the customer starts a new conversation.
fn check_client_text(state: &ShardState, conv: &crate::state::Conversation, text: &str) -> Result<(), Error> {
    if state.rules >= 14 && conv.client_text_bytes.saturating_add(text.len() as u64) > MAX_CLIENT_TEXT_BYTES {
        return Err(Error::Invalid(format!("conversation reached its {} KiB of customer text; start a new one", MAX_CLIENT_TEXT_BYTES / 1024)));
    }
    Ok(())
}

/// Rules 22: staff text that would take the conversation's past
/// [`MAX_STAFF_TEXT_BYTES`] is refused.
fn check_staff_text(state: &ShardState, conv: &crate::state::Conversation, text: &str) -> Result<(), Error> {
    if state.rules >= 22 && conv.staff_text_bytes.saturating_add(text.len() as u64) > MAX_STAFF_TEXT_BYTES {
        return Err(Error::Invalid(format!("conversation reached its {} KiB of staff text (messages, notes and bot replies)", MAX_STAFF_TEXT_BYTES / 1024)));
    }
    Ok(())
}

/// What a messenger conversation's provider cannot carry is refused before it is
/// written, with why, rather than cut or dropped on the way: files (messengers get text
/// only for now) and text over the provider's limit.
fn check_carried(state: &ShardState, conv: &crate::state::Conversation, text: &str, attachments: &[Attachment]) -> Result<(), Error> {
    let Some(adapter) = state.channel_adapters.get(&conv.channel) else {
        // Rules 23: a customer reached only through the channel's provider cannot be
        // written to while the channel has none.
        if state.rules >= 23 && ShardState::recipient_of(conv).is_some() {
            return Err(Error::Invalid(format!("channel {} is not connected to its provider: its customers cannot be written to until an admin connects it", conv.channel)));
        }
        return Ok(());
    };
    if !attachments.is_empty() {
        if !adapter.carries_files(state.rules) {
            return Err(Error::Invalid(format!("files cannot be sent to a {} customer yet: send the text, or a link", adapter.kind())));
        }
        if let Some(max) = adapter.max_files().filter(|max| attachments.len() > *max) {
            return Err(Error::Invalid(format!("a {} message carries at most {max} file: send the others in messages of their own", adapter.kind())));
        }
        if !adapter.text_with_files() && !text.trim().is_empty() {
            return Err(Error::Invalid(format!("a {} message with a file carries no text: send the text in a message of its own", adapter.kind())));
        }
        if let Some(limit) = adapter.max_caption_chars().filter(|limit| text.chars().count() > *limit) {
            return Err(Error::TooLong { limit, actual: text.chars().count() });
        }
    }
    match adapter.max_text_chars() {
        Some(limit) if text.chars().count() > limit => Err(Error::TooLong { limit, actual: text.chars().count() }),
        _ => Ok(()),
    }
}

fn check_tags(tags: &[String]) -> Result<(), Error> {
    if tags.len() > MAX_TAGS {
        return Err(Error::Invalid(format!("at most {MAX_TAGS} tags")));
    }
    if tags.iter().any(|t| t.trim().is_empty() || t.chars().count() > MAX_TAG_CHARS) {
        return Err(Error::Invalid(format!("tags must be 1 to {MAX_TAG_CHARS} characters")));
    }
    Ok(())
}

/// Pause reasons an admin may configure, and the longest one, in characters.
pub const MAX_PAUSE_REASONS: usize = 20;
pub const MAX_PAUSE_REASON_CHARS: usize = 40;
/// The highest priority a channel or an attribute rule may give.
pub const MAX_PRIORITY: u32 = 100;
/// Attribute rules one group may have.
pub const MAX_ATTRIBUTE_PRIORITIES: usize = 50;
/// Longest wrap-up time, and the shortest ageing step, in milliseconds.
pub const MAX_WRAP_UP_MS: u64 = 3_600_000;
pub const MIN_AGEING_MS: u64 = 1_000;
/// Longest sticky time: a customer returning later than this is routed as new.
pub const MAX_STICKY_MS: u64 = 30 * 24 * 3_600_000;

/// Skills: at most 20, names of 1 to 32 bytes, levels 1 to 5.
fn check_skills<'a>(skills: impl Iterator<Item = (&'a str, u8)>) -> Result<(), Error> {
    let mut n = 0;
    for (name, level) in skills {
        n += 1;
        if n > 20 || name.is_empty() || name.len() > 32 || !(1..=5).contains(&level) {
            return Err(Error::Invalid("at most 20 skills, names of 1 to 32 bytes, levels 1 to 5".into()));
        }
    }
    Ok(())
}

pub fn check_routing(routing: &GroupRouting) -> Result<(), Error> {
    check_skills(routing.required_skills.iter().map(|(n, l)| (n.as_str(), *l)))?;
    check_skills(routing.skill_rules.iter().map(|r| (r.skill.as_str(), r.level)))?;
    if routing.skill_rules.iter().any(|r| r.attribute.is_empty() || r.attribute.len() > 64 || r.value.len() > 256) {
        return Err(Error::Invalid("a skill rule needs an attribute of 1 to 64 bytes and a value of at most 256".into()));
    }
    if routing.attribute_priorities.len() > MAX_ATTRIBUTE_PRIORITIES {
        return Err(Error::Invalid(format!("at most {MAX_ATTRIBUTE_PRIORITIES} attribute priorities")));
    }
    for rule in &routing.attribute_priorities {
        if rule.attribute.is_empty() || rule.attribute.len() > 64 || rule.value.len() > 256 {
            return Err(Error::Invalid("an attribute priority needs an attribute of 1 to 64 bytes and a value of at most 256".into()));
        }
        if rule.priority > MAX_PRIORITY {
            return Err(Error::Invalid(format!("a priority is 0 to {MAX_PRIORITY}")));
        }
    }
    if routing.ageing_ms != 0 && routing.ageing_ms < MIN_AGEING_MS {
        return Err(Error::Invalid(format!("ageing is 0 (none) or at least {MIN_AGEING_MS} ms per level")));
    }
    if routing.wrap_up_ms > MAX_WRAP_UP_MS {
        return Err(Error::Invalid(format!("wrap-up is at most {MAX_WRAP_UP_MS} ms")));
    }
    if routing.inactivity_message.chars().count() > MAX_TEXT_CHARS {
        return Err(Error::TooLong { limit: MAX_TEXT_CHARS, actual: routing.inactivity_message.chars().count() });
    }
    if routing.inactivity_close_ms > 0 && routing.inactivity_remind_ms >= routing.inactivity_close_ms {
        return Err(Error::Invalid("the inactivity reminder must come before the closing".into()));
    }
    if routing.sticky_ms > MAX_STICKY_MS {
        return Err(Error::Invalid(format!("sticky time is at most {MAX_STICKY_MS} ms (30 days)")));
    }
    Ok(())
}

/// From rules 6, an operator's channel limits hold for a conversation handed to them
/// directly (a transfer or a supervisor's reassignment), as they do for offers.
fn channel_room(state: &ShardState, to: &crate::state::Operator, channel: &ChannelId) -> Result<(), Error> {
    if state.rules < 6 {
        return Ok(());
    }
    match state.channel_exclusion(to, channel) {
        Some("channel_not_taken") => Err(Error::Invalid(format!("operator {} does not take conversations of this channel's kind", to.config.id))),
        Some(_) => Err(Error::CapacityExceeded(to.config.id.clone())),
        None => Ok(()),
    }
}

/// Settings that change routing are refused before the rules that read them are in
/// force, so a log never holds a setting its replay ignores.
fn rules_at_least(state: &ShardState, version: u32) -> Result<(), Error> {
    if state.rules < version {
        return Err(Error::Invalid(format!("this needs routing rules {version}; the cluster still decides with {}", state.rules)));
    }
    Ok(())
}

/// Steps: at most [`MAX_STEPS`], each later than the last, with valid skills, a level
/// cap of 0-5 and overflow groups that exist.
pub fn check_steps(steps: &[RoutingStep], group_exists: &dyn Fn(&SkillGroupId) -> bool) -> Result<(), Error> {
    if steps.len() > MAX_STEPS {
        return Err(Error::Invalid(format!("at most {MAX_STEPS} routing steps")));
    }
    let mut last = 0;
    for step in steps {
        if step.after_ms <= last {
            return Err(Error::Invalid("each routing step starts later than the one before it, after more than 0 ms".into()));
        }
        last = step.after_ms;
        if let Some(skills) = &step.skills {
            check_skills(skills.iter().map(|(n, l)| (n.as_str(), *l)))?;
        }
        if step.max_level > 5 {
            return Err(Error::Invalid("a step's level cap is 0 (none) to 5".into()));
        }
        if step.overflow.len() > 20 {
            return Err(Error::Invalid("at most 20 overflow groups per step".into()));
        }
        if let Some(missing) = step.overflow.iter().find(|g| !group_exists(g)) {
            return Err(Error::NotFound(format!("skill group {missing}")));
        }
    }
    Ok(())
}

/// Weights: at most 50 kinds of 1 to 32 bytes, each weighing 1 to [`MAX_WEIGHT`].
pub fn check_weights(weights: &[(String, u32)]) -> Result<(), Error> {
    if weights.len() > 50 || weights.iter().any(|(k, w)| k.is_empty() || k.len() > 32 || !(1..=MAX_WEIGHT).contains(w)) {
        return Err(Error::Invalid(format!("at most 50 channel kinds of 1 to 32 bytes, weights 1 to {MAX_WEIGHT}")));
    }
    Ok(())
}

/// An operator coming back online: from rules 4, what they passed on while away is
/// theirs to take again (anyone free who had not passed would have been offered it
/// already); then the presence change.
fn back_online(state: &ShardState, op: &crate::state::Operator) -> Vec<Event> {
    let op_id = &op.config.id;
    let mut events = Vec::new();
    if state.rules >= 4 {
        // Rules 11: and the groups whose steps overflow into one of theirs, whose
        // conversations they were offered too.
        let mut groups: Vec<&SkillGroupId> = op.config.groups.iter().collect();
        if state.rules >= 11 {
            let overflowing = state.group_steps.iter().filter(|(g, steps)| !op.config.groups.contains(g) && steps.iter().any(|s| s.overflow.iter().any(|o| op.config.groups.contains(o))));
            groups.extend(overflowing.map(|(g, _)| g));
        }
        for group in groups {
            let Some(g) = state.groups.get(group) else { continue };
            for (_, conv_id) in &g.queue {
                let waiting = state.conversations.get(conv_id).filter(|c| c.passed_by.contains(op_id));
                if waiting.is_some_and(|c| matches!(c.status, ConversationStatus::Queued { offer: None, .. })) {
                    events.push(Event::PassForgotten { conversation: *conv_id, operator: op_id.clone() });
                }
            }
        }
    }
    events.push(Event::PresenceChanged { operator: op_id.clone(), presence: Presence::Online });
    events
}

/// From rules 5, the wrap-up its group gives the operator who held a conversation
/// being closed. From rules 21 none that would end before the one already running:
/// a close never shortens a wrap-up (one of a group with a longer wrap-up, or, on a
/// split cluster, one of a close taken later whose letter came first).
fn wrap_up_after(state: &ShardState, conv: &crate::state::Conversation, now: Timestamp) -> Option<Event> {
    if state.rules < 5 {
        return None;
    }
    let operator = conv.assigned()?;
    let wrap_up = state.group_routing.get(&conv.group).map_or(0, |r| r.wrap_up_ms);
    let until = now.plus_ms(wrap_up);
    if state.rules >= 21 && state.wrap_up.get(operator).is_some_and(|running| *running >= until) {
        return None;
    }
    (wrap_up > 0).then(|| Event::WrapUpSet { operator: operator.clone(), until: Some(until) })
}

fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::Invalid(format!("idempotency key must be 1 to {MAX_KEY_BYTES} bytes")));
    }
    Ok(())
}

fn decide(state: &ShardState, command: &Command, now: Timestamp, part: Part) -> Result<(Reply, Vec<Event>), Error> {
    let conversation = |id: &ConversationId| state.conversations.get(id).ok_or(Error::NotFound(format!("conversation {id}")));
    let operator = |id: &OperatorId| state.operators.get(id).ok_or(Error::NotFound(format!("operator {id}")));
    let held_by = |conv_id: &ConversationId, op_id: &OperatorId| -> Result<(), Error> {
        let conv = conversation(conv_id)?;
        if conv.assigned() != Some(op_id) {
            return Err(Error::NotAssigned { conversation: *conv_id, operator: op_id.clone() });
        }
        Ok(())
    };
    match command {
        Command::Deliver { from, id, mail } => match state.mail_in.expects(*from, *id) {
            // A directory command decided under newer rules than this group has adopted
            // yet waits: the group adopts them at its start, or its leader does when it
            // finds the group behind (node `groups`, the holding check).
            Receipt::Apply if matches!(mail, Mail::Directory { rules, .. } if *rules > state.rules) => {
                Ok((Reply::Delivered { last: state.mail_in.last(*from) }, vec![]))
            }
            Receipt::Apply => {
                let mut events = vec![Event::MailReceived { from: *from, id: *id }];
                events.extend(letter_events(state, mail, now, part));
                Ok((Reply::Delivered { last: *id }, events))
            }
            // A repeat, or one that overtook a letter before it: the answer tells the
            // sender where to resend from.
            Receipt::Repeat | Receipt::Early { .. } => Ok((Reply::Delivered { last: state.mail_in.last(*from) }, vec![])),
        },
        Command::ConfirmMail { to, upto } => {
            let Some(outbox) = state.mail_out.get(to) else { return Err(Error::NotFound(format!("letters to group {to}"))) };
            if *upto > outbox.last_posted() {
                return Err(Error::Invalid(format!("group {to} confirms letters up to {upto}, but the last posted is {}", outbox.last_posted())));
            }
            let drops = outbox.unconfirmed().next().is_some_and(|(first, _)| first <= *upto);
            Ok((Reply::Done, if drops { vec![Event::MailConfirmed { to: *to, upto: *upto }] } else { vec![] }))
        }
        Command::UpsertSkillGroup(config) => {
            if config.id.0.is_empty() {
                return Err(Error::Invalid("skill group id is empty".into()));
            }
            if config.offer_timeout_ms < 1000 {
                return Err(Error::Invalid("offer timeout must be at least 1000 ms".into()));
            }
            if deciding_directory(state, part) {
                if !state.groups.contains_key(&config.id) {
                    check_new_id("skill group", &config.id.0, "")?;
                }
                // Bounded when set: a group made before keeps a value past them until it
                // is changed (its routing, steps and hours are saved with it).
                let old = state.groups.get(&config.id).map(|g| (g.config.offer_timeout_ms, g.config.sla_ms));
                let timeout_set = old.is_none_or(|(t, _)| t != config.offer_timeout_ms);
                let sla_set = old.is_none_or(|(_, s)| s != config.sla_ms);
                if (timeout_set && config.offer_timeout_ms > MAX_OFFER_TIMEOUT_MS) || (sla_set && config.sla_ms > MAX_SLA_MS) {
                    return Err(Error::Invalid(format!("offer timeout must be at most {MAX_OFFER_TIMEOUT_MS} ms and the SLA at most {MAX_SLA_MS} ms")));
                }
            }
            Ok((Reply::Done, vec![Event::SkillGroupUpserted(config.clone())]))
        }
        Command::UpsertOperator(config) => {
            if config.id.0.is_empty() {
                return Err(Error::Invalid("operator id is empty".into()));
            }
            if deciding_directory(state, part) && !state.operators.contains_key(&config.id) {
                check_new_id("operator", &config.id.0, "")?;
            }
            for g in &config.groups {
                if !state.groups.contains_key(g) {
                    return Err(Error::NotFound(format!("skill group {g}")));
                }
            }
            let mut events = Vec::new();
            if let Some(op) = state.operators.get(&config.id).filter(|op| state.rules >= 10 && (op.config.capacity != config.capacity || op.config.groups != config.groups)) {
                events.extend(withdraw_offers_of(op, "operator reconfigured"));
            }
            events.push(Event::OperatorUpserted(config.clone()));
            Ok((Reply::Done, events))
        }
        Command::UpsertChannel(config) => {
            if deciding_directory(state, part) && !state.channels.contains_key(&config.id) {
                // `:` and `*` mean something in access rules and audit targets.
                check_new_id("channel", &config.id.0, ":*")?;
            }
            if !state.groups.contains_key(&config.default_group) {
                return Err(Error::NotFound(format!("skill group {}", config.default_group)));
            }
            let mut events = Vec::new();
            // Rules 14: offers made under the channel's old kind (its weight, operators'
            // limits by kind) are made again under the new one.
            // A channel new here has offers only if they were made before rules 14, under
            // no kind at all: they are made again too.
            if state.rules >= 14 && state.channels.get(&config.id).is_none_or(|old| old.kind != config.kind) {
                // Rules 18: also every offer to an operator who holds a conversation of
                // the channel, whose load and limits by kind the change moves (before, an
                // operator whose held conversation now weighed more could take an offer
                // made under the old weight and go past their capacity).
                let holds_one = |op: &OperatorId| state.rules >= 18 && state.operators.get(op).is_some_and(|o| o.active.iter().any(|c| state.conversations.get(c).is_some_and(|c| c.channel == config.id)));
                for offer in state.offers.values().filter(|o| state.conversations.get(&o.conversation).is_some_and(|c| c.channel == config.id) || holds_one(&o.operator)) {
                    events.push(Event::OfferWithdrawn { offer: offer.id, reason: WithdrawReason::OperatorUnavailable, detail: "channel kind changed".into() });
                }
            }
            events.push(Event::ChannelUpserted(config.clone()));
            Ok((Reply::Done, events))
        }
        Command::UpsertUser(user) => {
            if let Some(op) = &user.operator {
                operator(op)?;
            }
            keeps_an_admin(state, part, &user.login, user.role)?;
            let mut events = vec![Event::UserUpserted(user.clone())];
            // A new password ends the sessions opened with the old one. This touches
            // only token epochs, never routing, so older logs replay to the same routing.
            if state.users.get(&user.login).is_some_and(|old| old.password_hash != user.password_hash) {
                events.push(Event::SessionsEnded { login: user.login.clone() });
            }
            Ok((Reply::Done, events))
        }
        Command::UpdateUser { login, role, operator: linked } => {
            let Some(user) = state.users.get(login) else { return Err(Error::NotFound(format!("user {login}"))) };
            if let Some(op) = linked {
                operator(op)?;
            }
            keeps_an_admin(state, part, login, *role)?;
            let updated = UserRecord { login: login.clone(), password_hash: user.password_hash.clone(), role: *role, operator: linked.clone() };
            let mut events = vec![Event::UserUpserted(updated)];
            // A change of role or operator ends the sessions opened before it, so a token
            // does not come back to life when the change is undone (a demotion, then a
            // promotion). Like a new password's, this touches only token epochs, never
            // routing, so older logs replay to the same routing.
            if user.role != *role || user.operator != *linked {
                events.push(Event::SessionsEnded { login: login.clone() });
            }
            Ok((Reply::Done, events))
        }
        Command::AddNote { conversation: conv_id, author, name, key, text } => {
            check_key(key)?;
            let conv = conversation(conv_id)?;
            if let Some(seq) = conv.keys.get(key) {
                return Ok((Reply::Message { seq: *seq, duplicate: true }, vec![]));
            }
            if text.trim().is_empty() {
                return Err(Error::Invalid("a note needs text".into()));
            }
            check_message(state, *conv_id, text, &[])?;
            check_staff_text(state, conv, text)?;
            Ok((
                Reply::Message { seq: conv.last_seq() + 1, duplicate: false },
                vec![Event::NoteAdded { conversation: *conv_id, author: author.clone(), name: name.clone(), key: key.clone(), text: text.clone() }],
            ))
        }
        Command::OperatorsConnected { node, operators } => {
            if operators.len() > MAX_REPORTED_OPERATORS {
                return Err(Error::Invalid(format!("a node reports at most {MAX_REPORTED_OPERATORS} operators")));
            }
            let known: Vec<OperatorId> = operators.iter().filter(|op| state.operators.contains_key(*op)).cloned().collect();
            Ok((Reply::Done, vec![Event::OperatorsConnected { node: *node, operators: known }]))
        }
        Command::MarkAbsent { grace_ms, since } => {
            let mut events = Vec::new();
            for op_id in state.absent_operators(now, *grace_ms, *since) {
                let Some(op) = state.operators.get(&op_id) else { continue };
                for offer in &op.offers {
                    events.push(Event::OfferWithdrawn {
                        offer: *offer,
                        reason: WithdrawReason::OperatorUnavailable,
                        detail: "operator disconnected".into(),
                    });
                }
                events.push(Event::WentAbsent { operator: op_id });
            }
            Ok((Reply::Done, events))
        }
        Command::EndSessions { login } => {
            if !state.users.contains_key(login) {
                return Err(Error::NotFound(format!("user {login}")));
            }
            Ok((Reply::Done, vec![Event::SessionsEnded { login: login.clone() }]))
        }
        Command::SetChannelRetention { channel, days } => {
            if !state.channels.contains_key(channel) {
                return Err(Error::NotFound(format!("channel {channel}")));
            }
            if *days > MAX_RETENTION_DAYS {
                return Err(Error::Invalid(format!("retention is at most {MAX_RETENTION_DAYS} days (0 keeps conversations)")));
            }
            Ok((Reply::Done, vec![Event::ChannelRetentionSet { channel: channel.clone(), days: *days }]))
        }
        Command::PurgeExpired { .. } => {
            // What expired was read from the records before this entry (records.rs),
            // the same on every replica.
            if state.expired.is_empty() {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::ConversationsDeleted { conversations: state.expired.clone() }]))
        }
        Command::SetChannelPublicGroups { channel, groups } => {
            if !state.channels.contains_key(channel) {
                return Err(Error::NotFound(format!("channel {channel}")));
            }
            if let Some(missing) = groups.iter().find(|g| !state.groups.contains_key(*g)) {
                return Err(Error::NotFound(format!("skill group {missing}")));
            }
            if groups.len() > 50 {
                return Err(Error::Invalid("a channel offers at most 50 groups".into()));
            }
            let mut groups = groups.clone();
            groups.sort();
            groups.dedup();
            Ok((Reply::Done, vec![Event::ChannelPublicGroupsSet { channel: channel.clone(), groups }]))
        }
        Command::StartConversation { channel, group, visitor } => {
            let (conv, events) = start_conversation(state, channel, group.as_ref(), visitor, now, part, false)?;
            Ok((Reply::Started { conversation: conv }, events))
        }
        Command::StartConversationOnce { key, channel, group, visitor } => {
            check_key(key)?;
            // The same start again (its answer was lost): the conversation it opened. A
            // key another visitor used, or one older than the window, starts anew (and
            // names the new conversation from then on): a key is never a way into
            // someone else's conversation, nor a credential that outlives its retries.
            if let Some(taken) = &state.start_seen {
                if taken.visitor == visitor.id && now.millis_since(taken.at) <= START_KEY_WINDOW_MS {
                    return Ok((Reply::Started { conversation: taken.conversation }, vec![]));
                }
            }
            let (conv, mut events) = start_conversation(state, channel, group.as_ref(), visitor, now, part, false)?;
            events.push(Event::StartKeyTaken { conversation: conv, channel: channel.clone(), key: key.clone() });
            Ok((Reply::Started { conversation: conv }, events))
        }
        Command::ChannelInbound { channel, sender, sender_name, provider_message_id, text } => {
            channel_inbound(state, now, part, Inbound { channel, sender, sender_name, provider_message_id, text, files: &[], thread: None, attributes: &[] })
        }
        Command::ChannelInboundRich { channel, sender, sender_name, provider_message_id, text, files, thread, attributes } => {
            channel_inbound(state, now, part, Inbound { channel, sender, sender_name, provider_message_id, text, files, thread: *thread, attributes })
        }
        Command::SetChannelAdapter { channel, adapter } => {
            if !state.channels.contains_key(channel) {
                return Err(Error::NotFound(format!("channel {channel}")));
            }
            if let Some(adapter) = adapter {
                check_adapter(adapter)?;
            }
            // Mail for an address goes to one channel.
            if let Some(AdapterConfig::Email { address, .. }) = adapter {
                if state.channel_adapters.iter().any(|(c, a)| c != channel && matches!(a, AdapterConfig::Email { address: other, .. } if other == address)) {
                    return Err(Error::Invalid(format!("{address} is the address of another channel")));
                }
            }
            if state.channel_adapters.get(channel) == adapter.as_ref() {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::ChannelAdapterSet { channel: channel.clone(), adapter: adapter.clone() }]))
        }
        Command::SetChannelBot { channel, bot } => {
            rules_at_least(state, 7)?;
            if !state.channels.contains_key(channel) {
                return Err(Error::NotFound(format!("channel {channel}")));
            }
            if let Some(bot) = bot {
                check_adapter(&AdapterConfig::Api { token_sha256: bot.token_sha256.clone(), outbound_url: bot.url.clone(), signing_secret: bot.signing_secret.clone() })?;
            }
            if state.channel_bots.get(channel) == bot.as_ref() {
                return Ok((Reply::Done, vec![]));
            }
            let mut events = vec![Event::ChannelBotSet { channel: channel.clone(), bot: bot.clone() }];
            // Taken away: what the bot held goes to its groups' queues, as a handoff.
            if bot.is_none() {
                let mut ticket = state.next_ticket;
                for conv in state.conversations.values().filter(|c| &c.channel == channel && c.status == ConversationStatus::WithBot) {
                    events.push(Event::HandedOff { conversation: conv.id, group: conv.group.clone(), reason: BOT_REMOVED.into(), context: vec![] });
                    events.push(Event::ConversationQueued { conversation: conv.id, group: conv.group.clone(), ticket });
                    ticket += 1;
                }
            }
            Ok((Reply::Done, events))
        }
        Command::BotReply { channel, conversation: conv_id, key, text, buttons } => {
            check_key(key)?;
            let conv = with_bot(state, channel, conv_id)?;
            if let Some(seq) = conv.keys.get(key) {
                return Ok((Reply::Message { seq: *seq, duplicate: true }, vec![]));
            }
            check_text(text)?;
            if buttons.len() > MAX_BUTTONS || buttons.iter().any(|b| b.trim().is_empty() || b.chars().count() > MAX_BUTTON_CHARS) {
                return Err(Error::Invalid(format!("at most {MAX_BUTTONS} buttons of 1-{MAX_BUTTON_CHARS} characters")));
            }
            check_message(state, *conv_id, text, &[])?;
            check_carried(state, conv, text, &[])?;
            check_staff_text(state, conv, text)?;
            Ok((
                Reply::Message { seq: conv.last_seq() + 1, duplicate: false },
                vec![Event::BotMessagePosted { conversation: *conv_id, key: key.clone(), text: text.clone(), buttons: buttons.clone() }],
            ))
        }
        Command::Handoff { channel, conversation: conv_id, group, reason, context } => {
            let conv = with_bot(state, channel, conv_id)?;
            let group = group.clone().unwrap_or_else(|| conv.group.clone());
            if !state.groups.contains_key(&group) {
                return Err(Error::NotFound(format!("skill group {group}")));
            }
            if reason.chars().count() > MAX_REASON_CHARS {
                return Err(Error::TooLong { limit: MAX_REASON_CHARS, actual: reason.chars().count() });
            }
            if context.len() > MAX_CONTEXT_ITEMS || context.iter().any(|(k, v)| k.is_empty() || k.chars().count() > 64 || v.chars().count() > MAX_REASON_CHARS) {
                return Err(Error::Invalid(format!("at most {MAX_CONTEXT_ITEMS} context items, names of 1-64 characters, values of at most {MAX_REASON_CHARS}")));
            }
            Ok((
                Reply::Done,
                vec![
                    Event::HandedOff { conversation: *conv_id, group: group.clone(), reason: reason.clone(), context: context.clone() },
                    Event::ConversationQueued { conversation: *conv_id, group, ticket: state.next_ticket },
                ],
            ))
        }
        Command::CloseByBot { channel, conversation: conv_id, resolution } => {
            with_bot(state, channel, conv_id)?;
            if resolution.chars().count() > MAX_TAG_CHARS {
                return Err(Error::TooLong { limit: MAX_TAG_CHARS, actual: resolution.chars().count() });
            }
            let resolution = if resolution.is_empty() { BOT_RESOLVED.to_owned() } else { resolution.clone() };
            Ok((Reply::Done, vec![Event::ConversationClosed { conversation: *conv_id, by: Closer::System, resolution, tags: vec![], decided_at: None }]))
        }
        Command::SetChannelIdentity { channel, key } => {
            if !state.channels.contains_key(channel) {
                return Err(Error::NotFound(format!("channel {channel}")));
            }
            match key {
                Some(IdentityKey::Hs256 { secret }) if secret.len() < 32 || secret.len() > 512 => {
                    return Err(Error::Invalid("an HS256 secret must be 32-512 bytes".into()));
                }
                Some(IdentityKey::Rs256 { public_key_pem }) if !public_key_pem.contains("-----BEGIN PUBLIC KEY-----") || public_key_pem.len() > 4096 => {
                    return Err(Error::Invalid("an RS256 key must be a PEM public key (-----BEGIN PUBLIC KEY-----) of at most 4096 bytes".into()));
                }
                _ => {}
            }
            if state.channel_identity.get(channel) == key.as_ref() {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::ChannelIdentitySet { channel: channel.clone(), key: key.clone() }]))
        }
        Command::DeliveriesAttempted { node, items } => {
            if items.len() > MAX_DELIVERY_BATCH {
                return Err(Error::Invalid(format!("at most {MAX_DELIVERY_BATCH} outbox entries per batch")));
            }
            let mut seen = BTreeSet::new();
            let due: Vec<(ConversationId, u64)> = items
                .iter()
                .filter(|k| seen.insert(**k) && state.outbox.get(k).is_some_and(|d| d.status == crate::state::DeliveryStatus::Pending))
                .copied()
                .collect();
            if due.is_empty() {
                return Ok((Reply::Attempted { items: vec![] }, vec![]));
            }
            Ok((Reply::Attempted { items: due.clone() }, vec![Event::DeliveriesAttempted { node: *node, items: due }]))
        }
        Command::DeliveryResults { results } => {
            if results.len() > MAX_DELIVERY_BATCH {
                return Err(Error::Invalid(format!("at most {MAX_DELIVERY_BATCH} outbox entries per batch")));
            }
            // A reason or provider id past the limit is cut (at a character boundary), not
            // a reason to lose the batch's other outcomes.
            let clip = |text: &str| -> String {
                let mut end = text.len().min(MAX_REASON_CHARS * 4);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text[..end].to_owned()
            };
            let results: Vec<DeliveryResult> = results
                .iter()
                .map(|r| {
                    let outcome = match &r.outcome {
                        DeliveryOutcome::Retry { reason, retry_at } => DeliveryOutcome::Retry { reason: clip(reason), retry_at: *retry_at },
                        DeliveryOutcome::Failed { reason } => DeliveryOutcome::Failed { reason: clip(reason) },
                        DeliveryOutcome::Sent { provider_id } => DeliveryOutcome::Sent { provider_id: clip(provider_id) },
                        other => other.clone(),
                    };
                    DeliveryResult { conversation: r.conversation, seq: r.seq, node: r.node, outcome }
                })
                .collect();
            let results = &results;
            // Results for entries that are gone (purged) or already final in a way the
            // result cannot change are dropped; receipts apply to sent entries.
            let known: Vec<DeliveryResult> = results
                .iter()
                .filter(|r| {
                    let Some(d) = state.delivery(&(r.conversation, r.seq)) else { return false };
                    use crate::state::DeliveryStatus as S;
                    // A worker's answer counts only for its own attempt: a node that lost
                    // the leadership may answer late for an entry another node now sends.
                    if r.node != 0 && matches!(d.status, S::Attempting { node } if node != r.node) {
                        return false;
                    }
                    match r.outcome {
                        // Receipts are for what was sent: one racing ahead of its send's
                        // answer, or naming an unsent entry, is dropped.
                        DeliveryOutcome::Delivered | DeliveryOutcome::Read => matches!(d.status, S::Sent | S::Delivered | S::Read),
                        // Rules 23: a worker's failure counts only for its own attempt.
                        DeliveryOutcome::Failed { .. } if state.rules >= 23 && r.node != 0 => d.status == S::Attempting { node: r.node },
                        // A provider may report a failure after it accepted the message.
                        DeliveryOutcome::Failed { .. } => matches!(d.status, S::Attempting { .. } | S::Sent | S::Delivered),
                        // A late answer to an attempt settled as unknown says what happened.
                        DeliveryOutcome::Sent { .. } => matches!(d.status, S::Attempting { .. } | S::Unknown),
                        _ => matches!(d.status, S::Attempting { .. }),
                    }
                })
                .cloned()
                .collect();
            if known.is_empty() {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::DeliveryResults { results: known }]))
        }
        Command::RetryDelivery { conversation: conv_id, seq, by } => {
            let d = state.delivery(&(*conv_id, *seq)).ok_or(Error::NotFound(format!("outbox entry {conv_id}/{seq}")))?;
            if !d.status.dead() {
                return Err(Error::Invalid(format!("outbox entry {conv_id}/{seq} is {}, not failed: only a dead letter is sent again", d.status.name())));
            }
            // Rules 19: an event for the bot is sent again only while the bot holds the
            // conversation (the outbox dead-letters it at its next try once it does not).
            if state.rules >= 19 && d.to_bot && state.conversations.get(conv_id).is_none_or(|c| c.status != ConversationStatus::WithBot) {
                return Err(Error::Invalid(format!("outbox entry {conv_id}/{seq} was for the bot, which no longer holds conversation {conv_id}: it is not sent again")));
            }
            let connected = if d.to_bot { state.channel_bots.contains_key(&d.channel) } else { state.channel_adapters.contains_key(&d.channel) };
            if !connected {
                return Err(Error::Invalid(format!("channel {} has no {}: connect it before sending again", d.channel, if d.to_bot { "bot" } else { "adapter" })));
            }
            Ok((Reply::Done, vec![Event::DeliveryRetried { conversation: *conv_id, seq: *seq, by: by.clone() }]))
        }
        Command::PostClientMessage { conversation: conv_id, key, text, attachments } => {
            check_key(key)?;
            let conv = conversation(conv_id)?;
            if let Some(seq) = conv.keys.get(key) {
                return Ok((Reply::Message { seq: *seq, duplicate: true }, vec![]));
            }
            if conv.status == ConversationStatus::Closed {
                return Err(Error::Closed(*conv_id));
            }
            crate::access::check_open(state, &conv.channel, crate::access::Customer { ip: None, visitor: conv.visitor.id.as_deref() }).map_err(Error::Blocked)?;
            let attachments = check_message(state, *conv_id, text, attachments)?;
            check_client_text(state, conv, text)?;
            let seq = conv.last_seq() + 1;
            Ok((
                Reply::Message { seq, duplicate: false },
                vec![Event::ClientMessagePosted { conversation: *conv_id, key: key.clone(), text: text.clone(), attachments }],
            ))
        }
        Command::CloseByClient { conversation: conv_id } => {
            let conv = conversation(conv_id)?;
            if conv.status == ConversationStatus::Closed {
                return Ok((Reply::Done, vec![]));
            }
            let mut events = withdraw_pending(state, conv_id, WithdrawReason::ConversationClosed);
            events.push(Event::ConversationClosed { conversation: *conv_id, by: Closer::Client, resolution: String::new(), tags: vec![], decided_at: None });
            events.extend(wrap_up_after(state, conv, now));
            Ok((Reply::Done, events))
        }
        Command::Rate { conversation: conv_id, score, comment } => {
            let conv = conversation(conv_id)?;
            if conv.status != ConversationStatus::Closed {
                return Err(Error::Invalid("a conversation can be rated once it is closed".into()));
            }
            if !(1..=5).contains(score) {
                return Err(Error::Invalid("score must be 1 to 5".into()));
            }
            if comment.chars().count() > MAX_TEXT_CHARS {
                return Err(Error::TooLong { limit: MAX_TEXT_CHARS, actual: comment.chars().count() });
            }
            if conv.rated {
                return Err(Error::Invalid("conversation already rated".into()));
            }
            Ok((Reply::Done, vec![Event::ConversationRated { conversation: *conv_id, score: *score, comment: comment.clone(), decided_at: None }]))
        }
        Command::SetPresence { operator: op_id, presence } => {
            let op = operator(op_id)?;
            if op.presence == *presence {
                return Ok((Reply::Done, vec![]));
            }
            let mut events = Vec::new();
            if *presence != Presence::Online {
                for offer in &op.offers {
                    events.push(Event::OfferWithdrawn {
                        offer: *offer,
                        reason: WithdrawReason::OperatorUnavailable,
                        detail: format!("operator went {presence:?}").to_lowercase(),
                    });
                }
            }
            if *presence == Presence::Online {
                events.extend(back_online(state, op));
            } else {
                events.push(Event::PresenceChanged { operator: op_id.clone(), presence: *presence });
            }
            Ok((Reply::Done, events))
        }
        Command::AcceptOffer { operator: op_id, offer } => {
            let pending = state.offers.get(offer).ok_or(Error::OfferGone(*offer))?;
            if &pending.operator != op_id {
                return Err(Error::OfferGone(*offer));
            }
            Ok((
                Reply::Done,
                vec![
                    Event::OfferAccepted { offer: *offer },
                    Event::ConversationAssigned { conversation: pending.conversation, operator: op_id.clone() },
                ],
            ))
        }
        Command::AcceptOfferAt { operator: op_id, offer, received_at } => {
            if let Some(pending) = state.offers.get(offer) {
                if &pending.operator != op_id {
                    return Err(Error::OfferGone(*offer));
                }
                return Ok((
                    Reply::Done,
                    vec![
                        Event::OfferAccepted { offer: *offer },
                        Event::ConversationAssigned { conversation: pending.conversation, operator: op_id.clone() },
                    ],
                ));
            }
            // Rules 9: the offer is gone; an answer that reached the gateway before its
            // deadline still counts if the offer expired (not if it was declined,
            // withdrawn or moved on) and nothing happened to the conversation since. The
            // deadline is the decision's time plus the group's offer timeout (as the
            // group has it now), and a stamp later than this entry's time is taken as
            // this entry's time.
            let gone = Error::OfferGone(*offer);
            let decision = state.answered_offer.as_ref().filter(|d| state.rules >= 9 && d.offer == *offer && &d.chosen == op_id).ok_or(gone.clone())?;
            let group = state.groups.get(&decision.group).ok_or(gone.clone())?;
            let deadline = decision.at.plus_ms(group.config.offer_timeout_ms);
            if (*received_at).min(now) > deadline {
                return Err(gone);
            }
            let conv = state.conversations.get(&decision.conversation).ok_or(gone.clone())?;
            // Still waiting in the same group, unoffered, and this offer the last one made
            // for it; the operator's pass on it is the latest and came at or after the
            // deadline: an expiry (a decline comes before the deadline; an assignment, a
            // transfer or a reassignment clears or moves on from it).
            let expired_last = conv.decisions.last() == Some(offer)
                && conv.group == decision.group
                && conv.passed_by.contains(op_id)
                && conv.last_pass.is_some_and(|at| at >= deadline);
            if !matches!(conv.status, ConversationStatus::Queued { offer: None, .. }) || !expired_last {
                return Err(gone);
            }
            let op = operator(op_id)?;
            // At the desk, or set away by this very expiry (in its entry); not away by
            // their own choice or for a lost socket, not on a break, not offline.
            let away_by_expiry = op.presence == Presence::Away && conv.last_pass == Some(op.presence_since) && !state.presence_reasons.contains_key(op_id);
            if !(op.presence == Presence::Online || away_by_expiry) {
                return Err(gone);
            }
            // Rules 18: the conversation has waited in the queue since the offer was made
            // (before, an operator whose late accept was honoured and who then
            // transferred the conversation back to the group took it again when the same
            // accept came once more, a socket's resend, undoing the transfer), and the
            // operator still belongs to a group the offer's routing step reaches, with
            // the skills it needs there (an admin may have changed either since).
            if state.rules >= 18 {
                let back_since = state.queued_since.get(&conv.id).is_some_and(|since| *since > decision.at);
                if back_since || crate::routing::unfit(state, group, conv, op, state.answered_offer_step).is_some() {
                    return Err(gone);
                }
            }
            if !state.has_room(op, &conv.channel) {
                return Err(Error::CapacityExceeded(op_id.clone()));
            }
            channel_room(state, op, &conv.channel)?;
            let mut events = Vec::new();
            if op.presence != Presence::Online {
                events.extend(back_online(state, op));
            }
            events.push(Event::ConversationAssigned { conversation: conv.id, operator: op_id.clone() });
            Ok((Reply::Done, events))
        }
        Command::DeclineOffer { operator: op_id, offer, reason } => {
            let pending = state.offers.get(offer).ok_or(Error::OfferGone(*offer))?;
            if &pending.operator != op_id {
                return Err(Error::OfferGone(*offer));
            }
            if state.rules >= 2 && reason.chars().count() > MAX_REASON_CHARS {
                return Err(Error::TooLong { limit: MAX_REASON_CHARS, actual: reason.chars().count() });
            }
            Ok((Reply::Done, vec![Event::OfferWithdrawn { offer: *offer, reason: WithdrawReason::Declined, detail: reason.clone() }]))
        }
        Command::ExpireOffer { offer } => {
            let Some(pending) = state.offers.get(offer) else {
                // Answered before the timer fired: nothing to do, and not an error.
                return Ok((Reply::Done, vec![]));
            };
            if now < pending.deadline {
                return Err(Error::NotDue(*offer));
            }
            let mut events = vec![Event::OfferWithdrawn { offer: *offer, reason: WithdrawReason::Expired, detail: String::new() }];
            // An expiry committed long after the deadline means the cluster did not run
            // the timer (a stalled node, a leader change), not that nobody is at the desk:
            // from rules 3 the offer goes, the operator stays as they were.
            let stalled = state.rules >= 3 && now.0.saturating_sub(pending.deadline.0) > STALLED_EXPIRY_MS;
            // Rules 12: so does any offer that was pending across a change of leader.
            let stalled = stalled || (state.rules >= 12 && state.offers_across_leaders.contains(offer));
            // A missed offer means nobody is at the desk: set the operator away, as a
            // phone system does after ring-no-answer, so the queue stops waiting on them.
            if let Some(op) = state.operators.get(&pending.operator).filter(|op| state.rules >= 2 && !stalled && op.presence == Presence::Online) {
                for other in op.offers.iter().filter(|o| *o != offer) {
                    events.push(Event::OfferWithdrawn {
                        offer: *other,
                        reason: WithdrawReason::OperatorUnavailable,
                        detail: "operator missed an offer".into(),
                    });
                }
                events.push(Event::PresenceChanged { operator: op.config.id.clone(), presence: Presence::Away });
            }
            Ok((Reply::Done, events))
        }
        Command::MarkRead { conversation: conv_id, reader, upto } => {
            let conv = conversation(conv_id)?;
            let (by, current) = match reader {
                Reader::Client => (Closer::Client, conv.client_read_upto),
                Reader::Operator(op_id) => {
                    held_by(conv_id, op_id)?;
                    (Closer::Operator, conv.operator_read_upto)
                }
            };
            // Nobody reads past the end: clamp, so a bad client cannot mark the future.
            let upto = (*upto).min(conv.last_seq());
            if upto <= current {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::ReadMarked { conversation: *conv_id, by, upto }]))
        }
        Command::HoldersSet { group, nodes } => {
            if !matches!(part, Part::Whole | Part::Directory { .. }) {
                return Err(Error::Invalid("where groups are held is the metadata group's to record".into()));
            }
            if nodes.is_empty() || nodes.len() > MAX_HOLDERS {
                return Err(Error::Invalid(format!("a group is held by 1 to {MAX_HOLDERS} nodes, not {}", nodes.len())));
            }
            let nodes: BTreeSet<u64> = nodes.iter().copied().collect();
            if state.holders.get(group) == Some(&nodes) {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::HoldersSet { group: *group, nodes: nodes.into_iter().collect() }]))
        }
        Command::ForgetNode { id } => {
            if !matches!(part, Part::Whole | Part::Directory { .. }) {
                return Err(Error::Invalid("removed nodes are the metadata group's to record".into()));
            }
            if state.rules < 19 {
                return Err(Error::Invalid("a removed node is recorded from routing rules 19 on".into()));
            }
            if state.removed_nodes.contains(id) {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::NodeForgotten { id: *id }]))
        }
        Command::AdoptRules { version } => {
            if *version > RULES_VERSION {
                return Err(Error::Invalid(format!("this build decides with rules up to {RULES_VERSION}, not {version}")));
            }
            if *version <= state.rules {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::RulesAdopted { version: *version }]))
        }
        Command::RouteQueue { group } => {
            if !state.groups.contains_key(group) {
                return Err(Error::NotFound(format!("skill group {group}")));
            }
            Ok((Reply::Done, vec![]))
        }
        Command::PostOperatorMessage { operator: op_id, conversation: conv_id, key, text, attachments } => {
            check_key(key)?;
            let conv = conversation(conv_id)?;
            // Whether a key was used is part of the conversation, so only an operator
            // who may read it (holds it or held it; protocol §3.3) learns it; anyone
            // else is refused as a new message would be, with `not_assigned`. A refusal
            // and a duplicate both write nothing, so no log replays differently and no
            // rules version is needed (ADR 0002). A retry by the holder after a transfer
            // or close is still acknowledged as the duplicate it is.
            if !conv.handled_by.contains(op_id) {
                return Err(Error::NotAssigned { conversation: *conv_id, operator: op_id.clone() });
            }
            if let Some(seq) = conv.keys.get(key) {
                return Ok((Reply::Message { seq: *seq, duplicate: true }, vec![]));
            }
            held_by(conv_id, op_id)?;
            let attachments = check_message(state, *conv_id, text, attachments)?;
            check_carried(state, conv, text, &attachments)?;
            check_staff_text(state, conv, text)?;
            Ok((
                Reply::Message { seq: conv.last_seq() + 1, duplicate: false },
                vec![Event::OperatorMessagePosted {
                    conversation: *conv_id,
                    operator: op_id.clone(),
                    key: key.clone(),
                    text: text.clone(),
                    attachments,
                }],
            ))
        }
        Command::Transfer { operator: op_id, conversation: conv_id, target, comment } => {
            held_by(conv_id, op_id)?;
            if comment.chars().count() > MAX_TEXT_CHARS {
                return Err(Error::TooLong { limit: MAX_TEXT_CHARS, actual: comment.chars().count() });
            }
            let transferred = Event::ConversationTransferred {
                conversation: *conv_id,
                from: op_id.clone(),
                to: target.clone(),
                comment: comment.clone(),
            };
            match target {
                TransferTarget::Operator(to) => {
                    let to_op = operator(to)?;
                    if to == op_id {
                        return Err(Error::Invalid("cannot transfer to yourself".into()));
                    }
                    if to_op.presence == Presence::Offline {
                        return Err(Error::Unavailable(format!("operator {to} is offline")));
                    }
                    channel_known(state, &conversation(conv_id)?.channel)?;
                    if !state.has_room(to_op, &conversation(conv_id)?.channel) {
                        return Err(Error::CapacityExceeded(to.clone()));
                    }
                    channel_room(state, to_op, &conversation(conv_id)?.channel)?;
                    Ok((
                        Reply::Done,
                        vec![transferred, Event::ConversationAssigned { conversation: *conv_id, operator: to.clone() }],
                    ))
                }
                TransferTarget::Group(group) => {
                    if !state.groups.contains_key(group) {
                        return Err(Error::NotFound(format!("skill group {group}")));
                    }
                    Ok((
                        Reply::Done,
                        vec![
                            transferred,
                            Event::ConversationQueued { conversation: *conv_id, group: group.clone(), ticket: state.next_ticket },
                        ],
                    ))
                }
            }
        }
        Command::CloseByOperator { operator: op_id, conversation: conv_id, resolution, tags } => {
            match part {
                // Rules 11: the routing shard decides it (`placement::target`); one that
                // reaches a conversation shard came from a build before them.
                // Both answered `unavailable` (nothing written): sent again, it goes where
                // the node's copy of the routing shard's rules says, as they settle.
                Part::Conversations { .. } if state.rules >= 11 => {
                    return Err(Error::Unreachable("an operator's close is decided by the conversation's routing shard from routing rules 11 on: send it again".into()));
                }
                Part::Routing { .. } if state.rules < 11 => {
                    return Err(Error::Unreachable("the routing shard does not decide an operator's close before routing rules 11: send it again".into()));
                }
                _ => {}
            }
            held_by(conv_id, op_id)?;
            if resolution.chars().count() > MAX_TEXT_CHARS {
                return Err(Error::TooLong { limit: MAX_TEXT_CHARS, actual: resolution.chars().count() });
            }
            check_tags(tags)?;
            Ok((
                Reply::Done,
                [Event::ConversationClosed { conversation: *conv_id, by: Closer::Operator, resolution: resolution.clone(), tags: tags.clone(), decided_at: None }]
                    .into_iter()
                    .chain(wrap_up_after(state, conversation(conv_id)?, now))
                    .collect(),
            ))
        }
        Command::SetGroupRouting { group, routing } => {
            if !state.groups.contains_key(group) {
                return Err(Error::NotFound(format!("skill group {group}")));
            }
            check_routing(routing)?;
            let mut events = Vec::new();
            // Rules 15: a change of the skills the group's conversations need withdraws
            // the group's pending offers, which routing makes again under them.
            let needs = |r: &GroupRouting| {
                let mut required = r.required_skills.clone();
                required.sort();
                let mut rules: Vec<(String, String, String, u8)> = r.skill_rules.iter().map(|x| (x.attribute.clone(), x.value.clone(), x.skill.clone(), x.level)).collect();
                rules.sort();
                (required, rules)
            };
            let before = state.group_routing.get(group).cloned().unwrap_or_default();
            if state.rules >= 15 && needs(&before) != needs(routing) {
                events.extend(state.offers.values().filter(|o| o.group == *group).map(|o| Event::OfferWithdrawn { offer: o.id, reason: WithdrawReason::OperatorUnavailable, detail: "group's skills changed".into() }));
            }
            events.push(Event::GroupRoutingSet { group: group.clone(), routing: routing.clone() });
            Ok((Reply::Done, events))
        }
        Command::SetGroupSteps { group, steps } => {
            rules_at_least(state, 6)?;
            if !state.groups.contains_key(group) {
                return Err(Error::NotFound(format!("skill group {group}")));
            }
            check_steps(steps, &|g| state.groups.contains_key(g))?;
            let mut events = Vec::new();
            // Rules 17: changed steps withdraw the group's pending offers (one made through
            // an overflow step, or under a step's relaxed skills, may no longer be
            // allowed), which routing makes again under the new steps, as rules 15 does
            // for a change of the group's skills.
            if state.rules >= 17 && state.group_steps.get(group).map_or(&[][..], Vec::as_slice) != steps.as_slice() {
                events.extend(state.offers.values().filter(|o| o.group == *group).map(|o| Event::OfferWithdrawn { offer: o.id, reason: WithdrawReason::OperatorUnavailable, detail: "group's steps changed".into() }));
            }
            events.push(Event::GroupStepsSet { group: group.clone(), steps: steps.clone() });
            Ok((Reply::Done, events))
        }
        Command::SetGroupHours { group, hours } => {
            rules_at_least(state, 6)?;
            if !state.groups.contains_key(group) {
                return Err(Error::NotFound(format!("skill group {group}")));
            }
            if let Some(h) = hours {
                crate::hours::check(h, group, &|g| state.groups.contains_key(g))?;
            }
            Ok((Reply::Done, vec![Event::GroupHoursSet { group: group.clone(), hours: hours.clone() }]))
        }
        Command::SetChannelWeights { weights } => {
            rules_at_least(state, 6)?;
            check_weights(weights)?;
            let mut events = Vec::new();
            // Compared as applied: a weight of 1 is not kept, a kind named twice keeps its last.
            let applied: std::collections::BTreeMap<&String, &u32> = weights.iter().map(|(kind, w)| (kind, w)).collect();
            let unchanged = applied.into_iter().filter(|(_, w)| **w != 1).eq(state.channel_weights.iter());
            if state.rules >= 10 && !unchanged {
                for op in state.operators.values() {
                    events.extend(withdraw_offers_of(op, "channel weights changed"));
                }
            }
            events.push(Event::ChannelWeightsSet { weights: weights.clone() });
            Ok((Reply::Done, events))
        }
        Command::SetChannelPriority { channel, priority } => {
            if !state.channels.contains_key(channel) {
                return Err(Error::NotFound(format!("channel {channel}")));
            }
            if *priority > MAX_PRIORITY {
                return Err(Error::Invalid(format!("a priority is 0 to {MAX_PRIORITY}")));
            }
            Ok((Reply::Done, vec![Event::ChannelPrioritySet { channel: channel.clone(), priority: *priority }]))
        }
        Command::SetPauseReasons { reasons } => {
            if reasons.len() > MAX_PAUSE_REASONS {
                return Err(Error::Invalid(format!("at most {MAX_PAUSE_REASONS} pause reasons")));
            }
            let mut seen = BTreeSet::new();
            for reason in reasons {
                let n = reason.chars().count();
                if reason.trim().is_empty() || n > MAX_PAUSE_REASON_CHARS || !seen.insert(reason.as_str()) {
                    return Err(Error::Invalid(format!("pause reasons are distinct, not blank, at most {MAX_PAUSE_REASON_CHARS} characters")));
                }
            }
            Ok((Reply::Done, vec![Event::PauseReasonsSet { reasons: reasons.clone() }]))
        }
        Command::TakeBreak { operator: op_id, reason } => {
            let op = operator(op_id)?;
            if !state.pause_reasons.contains(reason) {
                return Err(Error::Invalid(format!("{reason:?} is not a configured pause reason")));
            }
            if op.presence == Presence::Break && state.presence_reasons.get(op_id) == Some(reason) {
                return Ok((Reply::Done, vec![]));
            }
            let mut events: Vec<Event> = op
                .offers
                .iter()
                .map(|offer| Event::OfferWithdrawn { offer: *offer, reason: WithdrawReason::OperatorUnavailable, detail: "operator went break".into() })
                .collect();
            events.push(Event::BreakTaken { operator: op_id.clone(), reason: reason.clone() });
            Ok((Reply::Done, events))
        }
        Command::SetOperatorSkills { operator: op_id, skills } => {
            operator(op_id)?;
            check_skills(skills.iter().map(|(name, level)| (name.as_str(), *level)))?;
            let mut events = Vec::new();
            // Rules 15: as rules 10 does for capacity and groups, a change of skills
            // withdraws the operator's pending offers, which routing makes again to
            // whoever the new skills fit (before, an offer made under the old skills
            // could be accepted by an operator they no longer fit).
            let applied: std::collections::BTreeMap<&str, u8> = skills.iter().map(|(name, level)| (name.as_str(), *level)).collect();
            let before: std::collections::BTreeMap<&str, u8> = state.operator_skills.get(op_id).map(|s| s.iter().map(|(name, level)| (name.as_str(), *level)).collect()).unwrap_or_default();
            if state.rules >= 15 && applied != before {
                events.extend(withdraw_offers_of(operator(op_id)?, "operator's skills changed"));
            }
            events.push(Event::OperatorSkillsSet { operator: op_id.clone(), skills: skills.clone() });
            Ok((Reply::Done, events))
        }
        Command::SetOperatorChannels { operator: op_id, limits } => {
            operator(op_id)?;
            if limits.per_kind.len() > 20 || limits.only.len() > 20 || limits.per_kind.iter().map(|(k, _)| k).chain(&limits.only).any(|k| k.is_empty() || k.len() > 32) {
                return Err(Error::Invalid("at most 20 channel kinds of 1 to 32 bytes each".into()));
            }
            let mut events = Vec::new();
            let sorted = |l: &ChannelLimits| {
                let mut per_kind = l.per_kind.clone();
                per_kind.sort();
                let mut only = l.only.clone();
                only.sort();
                (per_kind, only)
            };
            if state.rules >= 10 && sorted(&state.channel_limits.get(op_id).cloned().unwrap_or_default()) != sorted(limits) {
                events.extend(withdraw_offers_of(operator(op_id)?, "operator's channels changed"));
            }
            events.push(Event::OperatorChannelsSet { operator: op_id.clone(), limits: limits.clone() });
            Ok((Reply::Done, events))
        }
        Command::SweepInactive => {
            let mut events = Vec::new();
            // Rules 21: the wrap-ups this sweep sets count as running for its later closes
            // (all are decided against the state before it).
            let mut set: std::collections::BTreeMap<OperatorId, Timestamp> = std::collections::BTreeMap::new();
            for (id, step) in state.inactive(now) {
                let Some(conv) = state.conversations.get(&id) else { continue };
                match step {
                    crate::state::InactivityStep::Remind(text) => events.push(Event::CustomerReminded { conversation: id, text }),
                    crate::state::InactivityStep::Close => {
                        events.push(Event::ConversationClosed { conversation: id, by: Closer::System, resolution: "inactive".into(), tags: vec![], decided_at: None });
                        if let Some(wrap_up) = wrap_up_after(state, conv, now) {
                            if let Event::WrapUpSet { operator, until: Some(until) } = &wrap_up {
                                if state.rules >= 21 && set.get(operator).is_some_and(|running| running >= until) {
                                    continue;
                                }
                                set.insert(operator.clone(), *until);
                            }
                            events.push(wrap_up);
                        }
                    }
                }
            }
            Ok((Reply::Done, events))
        }
        Command::SetAccessRule { rule, note, by } => {
            if let Some(c) = &rule.channel {
                if !state.channels.contains_key(c) {
                    return Err(Error::NotFound(format!("channel {c}")));
                }
            }
            crate::access::validate(rule, note.as_ref(), state.rules).map_err(Error::Invalid)?;
            match note {
                Some(_) if !state.access_rules.contains_key(rule) && state.access_rules.len() >= crate::access::MAX_RULES => {
                    Err(Error::Invalid(format!("at most {} access rules", crate::access::MAX_RULES)))
                }
                None if !state.access_rules.contains_key(rule) => Ok((Reply::Done, vec![])),
                _ => Ok((Reply::Done, vec![Event::AccessRuleSet { rule: rule.clone(), note: note.clone(), by: by.clone() }])),
            }
        }
        Command::SetChannelAccess { channel, allow_only, message, by } => {
            if !state.channels.contains_key(channel) {
                return Err(Error::NotFound(format!("channel {channel}")));
            }
            if message.chars().count() > MAX_TEXT_CHARS {
                return Err(Error::TooLong { limit: MAX_TEXT_CHARS, actual: message.chars().count() });
            }
            let current = state.channel_access.get(channel).cloned().unwrap_or_default();
            if current.allow_only == *allow_only && current.message == *message {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::ChannelAccessSet { channel: channel.clone(), allow_only: *allow_only, message: message.clone(), by: by.clone() }]))
        }
        Command::SetEmergency { target, message, by } => {
            match target {
                NoticeTarget::Channel(c) if !state.channels.contains_key(c) => return Err(Error::NotFound(format!("channel {c}"))),
                NoticeTarget::Group(g) if !state.groups.contains_key(g) => return Err(Error::NotFound(format!("skill group {g}"))),
                _ => {}
            }
            if let Some(text) = message {
                if text.trim().is_empty() {
                    return Err(Error::Invalid("an emergency notice needs text".into()));
                }
                check_text(text)?;
            }
            if message.is_none() && !state.emergencies.contains_key(target) {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::EmergencySet { target: target.clone(), message: message.clone(), by: by.clone() }]))
        }
        Command::EndWrapUp { operator: op_id } => {
            operator(op_id)?;
            if !state.wrap_up.get(op_id).is_some_and(|until| *until > now) {
                return Ok((Reply::Done, vec![]));
            }
            Ok((Reply::Done, vec![Event::WrapUpSet { operator: op_id.clone(), until: None }]))
        }
        Command::Reassign { by, conversation: conv_id, target, comment } => {
            let conv = conversation(conv_id)?;
            if comment.chars().count() > MAX_TEXT_CHARS {
                return Err(Error::TooLong { limit: MAX_TEXT_CHARS, actual: comment.chars().count() });
            }
            let follow_up = match target {
                TransferTarget::Operator(to) => {
                    let to_op = operator(to)?;
                    match &conv.status {
                        ConversationStatus::Closed => return Err(Error::Closed(*conv_id)),
                        ConversationStatus::Assigned { operator } if operator == to => {
                            return Err(Error::Invalid(format!("conversation already held by {to}")));
                        }
                        _ => {}
                    }
                    if to_op.presence == Presence::Offline {
                        return Err(Error::Unavailable(format!("operator {to} is offline")));
                    }
                    channel_known(state, &conversation(conv_id)?.channel)?;
                    // Rules 15: the target's pending offer of this very conversation,
                    // which this withdraws, takes no room of theirs (before, a
                    // supervisor could not give a conversation to the operator it was
                    // offered to when that offer filled their desk).
                    let without_its_offer;
                    let to_op = match &conv.status {
                        ConversationStatus::Queued { offer: Some(offer), .. } if state.rules >= 15 && to_op.offers.contains(offer) => {
                            let mut probe = to_op.clone();
                            probe.offers.remove(offer);
                            without_its_offer = probe;
                            &without_its_offer
                        }
                        _ => to_op,
                    };
                    if !state.has_room(to_op, &conversation(conv_id)?.channel) {
                        return Err(Error::CapacityExceeded(to.clone()));
                    }
                    channel_room(state, to_op, &conversation(conv_id)?.channel)?;
                    Event::ConversationAssigned { conversation: *conv_id, operator: to.clone() }
                }
                TransferTarget::Group(group) => {
                    if conv.status == ConversationStatus::Closed {
                        return Err(Error::Closed(*conv_id));
                    }
                    if !state.groups.contains_key(group) {
                        return Err(Error::NotFound(format!("skill group {group}")));
                    }
                    // Rules 18: one waiting in that very group stays where it is (before,
                    // it went to the back of the queue, its routing steps started over and
                    // its pending offer was withdrawn).
                    if state.rules >= 18 && matches!(conv.status, ConversationStatus::Queued { .. }) && &conv.group == group {
                        return Err(Error::Invalid(format!("conversation {conv_id} is already waiting in group {group}")));
                    }
                    Event::ConversationQueued { conversation: *conv_id, group: group.clone(), ticket: state.next_ticket }
                }
            };
            let mut events = withdraw_pending(state, conv_id, WithdrawReason::Reassigned);
            // Rules 18: taken from the channel's bot, the conversation is handed off as
            // the bot would hand it off (its history says so, and the group counts it as
            // entered: queued, or assigned straight from the bot), before it goes where
            // the supervisor said. On a split cluster the routing shard, which decides a
            // reassignment, never heard of a bot's conversation: the gateway has its
            // conversation shard hand it off first (`rest::take_from_bot_on_a_split_cluster`).
            if state.rules >= 18 && conv.status == ConversationStatus::WithBot {
                events.push(Event::HandedOff { conversation: *conv_id, group: conv.group.clone(), reason: TAKEN_FROM_BOT.into(), context: vec![("by".into(), by.clone())] });
            }
            events.push(Event::ConversationReassigned { conversation: *conv_id, by: by.clone(), to: target.clone(), comment: comment.clone() });
            events.push(follow_up);
            Ok((Reply::Done, events))
        }
        Command::UpsertTemplate(template) => {
            if template.id.is_empty() || template.id.len() > 64 {
                return Err(Error::Invalid("template id must be 1 to 64 bytes".into()));
            }
            if template.title.trim().is_empty() || template.title.chars().count() > 100 {
                return Err(Error::Invalid("template title must be 1 to 100 characters".into()));
            }
            check_text(&template.text)?;
            match (&template.group, &template.owner) {
                (Some(group), None) => {
                    if !state.groups.contains_key(group) {
                        return Err(Error::NotFound(format!("skill group {group}")));
                    }
                }
                (None, Some(owner)) => {
                    operator(owner)?;
                }
                _ => return Err(Error::Invalid("a template is either shared with a group or personal".into())),
            }
            if let Some(existing) = state.templates.get(&template.id) {
                if existing.owner != template.owner || existing.group.is_some() != template.group.is_some() {
                    return Err(Error::Invalid("template id is taken by another template".into()));
                }
            } else if deciding_directory(state, part) {
                check_new_id("template", &template.id, "")?;
                // Bounded: each is kept in memory on every replica.
                let full = match &template.owner {
                    Some(owner) => state.templates.values().filter(|t| t.owner.as_ref() == Some(owner)).count() >= MAX_PERSONAL_TEMPLATES,
                    None => state.templates.values().filter(|t| t.owner.is_none()).count() >= MAX_SHARED_TEMPLATES,
                };
                if full {
                    return Err(Error::Invalid(format!("at most {MAX_PERSONAL_TEMPLATES} personal templates an operator and {MAX_SHARED_TEMPLATES} shared ones: delete one first")));
                }
            }
            Ok((Reply::Done, vec![Event::TemplateUpserted(template.clone())]))
        }
        Command::DeleteTemplate { id } => {
            if !state.templates.contains_key(id) {
                return Err(Error::NotFound(format!("template {id}")));
            }
            Ok((Reply::Done, vec![Event::TemplateDeleted { id: id.clone() }]))
        }
        Command::SetFavourite { operator: op_id, template, favourite } => {
            operator(op_id)?;
            if !state.templates.contains_key(template) {
                return Err(Error::NotFound(format!("template {template}")));
            }
            Ok((Reply::Done, vec![Event::FavouriteSet { operator: op_id.clone(), template: template.clone(), favourite: *favourite }]))
        }
        Command::StoreAttachment(attachment) => {
            conversation(&attachment.conversation)?;
            if state.attachments.contains_key(&attachment.id) {
                return Err(Error::Invalid(format!("attachment {} exists", attachment.id.0)));
            }
            if attachment.size == 0 {
                return Err(Error::Invalid("attachment is empty".into()));
            }
            if state.rules >= 2 {
                attachment_room(state, attachment.conversation, attachment.size)?;
            }
            Ok((Reply::Done, vec![Event::AttachmentStored(attachment.clone())]))
        }
    }
}

/// The events that start a conversation of `visitor` on `channel` in `group` (the
/// channel's default group when `None`), with its number. One that `continues` a
/// conversation of theirs (which a full close just ended) is refused only by block
/// rules: an allow list decides who starts talking, and they already were.
fn start_conversation(state: &ShardState, channel: &ChannelId, group: Option<&SkillGroupId>, visitor: &Visitor, now: Timestamp, part: Part, continues: bool) -> Result<(ConversationId, Vec<Event>), Error> {
    let channel_config = state.channels.get(channel).ok_or(Error::NotFound(format!("channel {channel}")))?;
    let customer = crate::access::Customer { ip: None, visitor: visitor.id.as_deref() };
    if continues {
        crate::access::check_open(state, channel, customer).map_err(Error::Blocked)?;
    } else {
        crate::access::check(state, channel, customer).map_err(Error::Blocked)?;
    }
    let group = group.cloned().unwrap_or_else(|| channel_config.default_group.clone());
    if !state.groups.contains_key(&group) {
        return Err(Error::NotFound(format!("skill group {group}")));
    }
    // From rules 4 the first conversation is number 1, as people count.
    let next = if state.rules >= 4 { state.next_conversation.max(1) } else { state.next_conversation };
    // Conversation shard `shard` of `shards` numbers only its own (ADR 0006).
    let conv = ConversationId(match part {
        Part::Conversations { shard, shards, .. } if shards > 1 => next + (shard + shards - next % shards) % shards,
        _ => next,
    });
    // An emergency notice in force for the channel or the group is its first answer.
    let notice = state.emergency_for(channel, &group).map(|e| Event::NoticeGiven { conversation: conv, text: e.message.clone() });
    // Rules 6: outside the group's opening hours, its configured answer.
    let mut after_hours = Vec::new();
    let mut group = group;
    if state.group_closed(&group, now) {
        if let Some(hours) = state.group_hours.get(&group) {
            if !hours.message.trim().is_empty() {
                after_hours.push(Event::NoticeGiven { conversation: conv, text: hours.message.clone() });
            }
            match &hours.closed_action {
                ClosedAction::Reply => after_hours.push(Event::ConversationClosed {
                    conversation: conv,
                    by: Closer::System,
                    resolution: AFTER_HOURS.into(),
                    tags: vec![],
                    decided_at: None,
                }),
                ClosedAction::Transfer(to) if state.groups.contains_key(to) => group = to.clone(),
                ClosedAction::Transfer(_) | ClosedAction::Wait => {}
            }
        }
    }
    // Rules 5: a returning customer goes first to whoever served them last, if
    // they came back within the group's sticky time.
    let sticky_ms = state.group_routing.get(&group).map_or(0, |r| r.sticky_ms);
    let sticky = match &state.returning {
        Some((operator, closed_at))
            if state.rules >= 5
                && sticky_ms > 0
                && now.millis_since(*closed_at) <= sticky_ms
                && state.operators.get(operator).is_some_and(|op| op.config.groups.contains(&group)) =>
        {
            Some(Event::StickySet { conversation: conv, operator: operator.clone() })
        }
        _ => None,
    };
    // Rules 7: a channel's bot takes its new conversations, at any hour; the group's
    // hours apply when the bot hands one off.
    let (placed, after_hours) = if state.rules >= 7 && state.channel_bots.contains_key(channel) {
        (Event::BotTook { conversation: conv, group }, Vec::new())
    } else {
        (Event::ConversationQueued { conversation: conv, group, ticket: state.next_ticket }, after_hours)
    };
    Ok((
        conv,
        [Event::ConversationStarted { conversation: conv, channel: channel.clone(), visitor: visitor.clone() }, placed]
            .into_iter()
            .chain(sticky)
            .chain(notice)
            .chain(after_hours)
            .collect(),
    ))
}

/// Rules 19: the longest offer timeout and SLA a skill group takes (an hour, a week).
pub const MAX_OFFER_TIMEOUT_MS: u64 = 3_600_000;
pub const MAX_SLA_MS: u64 = 7 * 24 * 3_600_000;
/// Rules 19: templates an operator may keep for themselves, and shared ones in all.
pub const MAX_PERSONAL_TEMPLATES: usize = 200;
pub const MAX_SHARED_TEMPLATES: usize = 2000;
/// Rules 19: the longest id of a new skill group, operator, channel or template.
pub const MAX_ID_BYTES: usize = 64;

/// Whether this entry is decided where the directory is (and under rules 19).
fn deciding_directory(state: &ShardState, part: Part) -> bool {
    state.rules >= 19 && matches!(part, Part::Whole | Part::Directory { .. })
}

/// Rules 19: a new id is 1 to [`MAX_ID_BYTES`] bytes with no whitespace or control
/// character and none of `/ ? # % \` (it is a path segment of the REST API and a
/// webhook's address), nor any of `also`. Ids made before stay as they are.
fn check_new_id(what: &str, id: &str, also: &str) -> Result<(), Error> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || "/?#%\\".contains(c) || also.contains(c);
    if id.is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(bad) || id == "." || id == ".." {
        let listed: Vec<String> = "/?#%\\".chars().chain(also.chars()).map(String::from).collect();
        return Err(Error::Invalid(format!("a {what} id is 1 to {MAX_ID_BYTES} bytes without spaces, control characters or any of {}", listed.join(" "))));
    }
    Ok(())
}

/// Rules 19: a change that would leave no login an admin (the last one demoted) is
/// refused, where users are decided (a cluster could not be administered again: nothing
/// makes an admin once there are users). Before, it was taken.
fn keeps_an_admin(state: &ShardState, part: Part, login: &str, role: Role) -> Result<(), Error> {
    if state.rules < 19 || role == Role::Admin || !matches!(part, Part::Whole | Part::Directory { .. }) {
        return Ok(());
    }
    let was_admin = state.users.get(login).is_some_and(|u| u.role == Role::Admin);
    let others = state.users.values().any(|u| u.login != login && u.role == Role::Admin);
    if was_admin && !others {
        return Err(Error::Invalid(format!("{login} is the last admin: make another login an admin first")));
    }
    Ok(())
}

/// A conversation the bot of `channel` holds now.
fn with_bot<'a>(state: &'a ShardState, channel: &ChannelId, conv_id: &ConversationId) -> Result<&'a crate::state::Conversation, Error> {
    let conv = state.conversations.get(conv_id).filter(|c| &c.channel == channel).ok_or(Error::NotFound(format!("conversation {conv_id} on channel {channel}")))?;
    if conv.status != ConversationStatus::WithBot {
        return Err(Error::Invalid(format!("conversation {conv_id} is not with the bot any more")));
    }
    Ok(conv)
}

/// What a channel adapter's settings must hold.
/// An address mail can be sent to and from: `local@domain`, printable ASCII without
/// spaces, angle brackets or quotes, at most 254 characters.
pub fn is_email_address(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else { return false };
    address.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && local.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"' | b'@' | b'(' | b')' | b',' | b';' | b':' | b'\\' | b'[' | b']'))
}

fn check_adapter(adapter: &AdapterConfig) -> Result<(), Error> {
    let url = |name: &str, url: &str| {
        let ok = (url.starts_with("https://") || url.starts_with("http://")) && url.len() <= 500 && !url.chars().any(char::is_whitespace);
        if ok { Ok(()) } else { Err(Error::Invalid(format!("{name} must be an http:// or https:// URL of at most 500 characters"))) }
    };
    let secret = |name: &str, value: &str, min: usize| {
        if value.len() < min || value.len() > 256 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            Err(Error::Invalid(format!("{name} must be {min}-256 printable characters")))
        } else {
            Ok(())
        }
    };
    match adapter {
        AdapterConfig::Telegram { bot_token, secret: webhook_secret, api_base } => {
            secret("bot_token", bot_token, 1)?;
            // Telegram allows 1-256 characters A-Z, a-z, 0-9, _ and - in a webhook secret.
            if webhook_secret.len() < 16 || webhook_secret.len() > 256 || !webhook_secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(Error::Invalid("the webhook secret must be 16-256 characters of A-Z, a-z, 0-9, _ and -".into()));
            }
            url("api_base", api_base)
        }
        AdapterConfig::WhatsApp { access_token, app_secret, verify_token, phone_number_id, api_base } => {
            secret("access_token", access_token, 1)?;
            secret("app_secret", app_secret, 1)?;
            secret("verify_token", verify_token, 1)?;
            if phone_number_id.is_empty() || phone_number_id.len() > 32 || !phone_number_id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::Invalid("phone_number_id must be 1-32 digits".into()));
            }
            url("api_base", api_base)
        }
        AdapterConfig::Viber { auth_token, sender_name, api_base } => {
            secret("auth_token", auth_token, 1)?;
            if sender_name.trim().is_empty() || sender_name.chars().count() > 28 {
                return Err(Error::Invalid("sender_name must be 1-28 characters (Viber's limit)".into()));
            }
            url("api_base", api_base)
        }
        AdapterConfig::Messenger { page_token, app_secret, verify_token, api_base } => {
            secret("page_token", page_token, 1)?;
            secret("app_secret", app_secret, 1)?;
            secret("verify_token", verify_token, 1)?;
            url("api_base", api_base)
        }
        AdapterConfig::Vk { access_token, secret: callback_secret, confirmation, group_id, api_base } => {
            secret("access_token", access_token, 1)?;
            secret("secret", callback_secret, 1)?;
            if confirmation.is_empty() || confirmation.len() > 64 || !confirmation.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(Error::Invalid("confirmation must be 1-64 letters and digits".into()));
            }
            if group_id.is_empty() || group_id.len() > 20 || !group_id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::Invalid("group_id must be 1-20 digits".into()));
            }
            url("api_base", api_base)
        }
        AdapterConfig::Email { address, display_name, smtp_host, smtp_port, smtp_security, smtp_username, smtp_password, thread_secret } => {
            if !is_email_address(address) {
                return Err(Error::Invalid("address must be an email address (local@domain, ASCII, at most 254 characters)".into()));
            }
            if display_name.chars().count() > 64 || display_name.chars().any(char::is_control) {
                return Err(Error::Invalid("display_name must be at most 64 characters, none of them control characters".into()));
            }
            if smtp_host.is_empty() || smtp_host.len() > 253 || !smtp_host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':') {
                return Err(Error::Invalid("smtp_host must be a host name or an IP address".into()));
            }
            if *smtp_port == 0 {
                return Err(Error::Invalid("smtp_port must be 1-65535".into()));
            }
            if !matches!(smtp_security.as_str(), "tls" | "starttls" | "none") {
                return Err(Error::Invalid("smtp_security must be tls, starttls or none".into()));
            }
            if !smtp_username.is_empty() {
                secret("smtp_username", smtp_username, 1)?;
                secret("smtp_password", smtp_password, 1)?;
            }
            secret("thread_secret", thread_secret, 16)
        }
        AdapterConfig::Api { token_sha256, outbound_url, signing_secret } => {
            if token_sha256.len() != 64 || !token_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::Invalid("token_sha256 must be 64 hex digits".into()));
            }
            secret("signing_secret", signing_secret, 16)?;
            url("outbound_url", outbound_url)
        }
    }
}


/// A customer's message as a channel delivered it ([`Command::ChannelInbound`] and
/// [`Command::ChannelInboundRich`]).
struct Inbound<'a> {
    channel: &'a ChannelId,
    sender: &'a str,
    sender_name: &'a str,
    provider_message_id: &'a str,
    text: &'a str,
    files: &'a [InboundFile],
    thread: Option<ConversationId>,
    attributes: &'a [(String, String)],
}

/// The conversation a channel message goes to, if one is open: the one it answers
/// (`thread`) when that is open on the same channel, else its sender's.
pub fn inbound_target(state: &ShardState, channel: &ChannelId, sender: &str, thread: Option<ConversationId>) -> Option<ConversationId> {
    let answered = thread.filter(|id| thread_open(state, channel, *id));
    answered.or_else(|| state.open_senders.get(&(channel.clone(), format!("{channel}:{sender}"))).copied())
}

/// Whether the conversation a channel message answers is open on its channel here.
fn thread_open(state: &ShardState, channel: &ChannelId, thread: ConversationId) -> bool {
    state.conversations.get(&thread).is_some_and(|c| &c.channel == channel && c.status != ConversationStatus::Closed)
}

fn channel_inbound(state: &ShardState, now: Timestamp, part: Part, m: Inbound<'_>) -> Result<(Reply, Vec<Event>), Error> {
    let channel = m.channel;
    if !state.channel_adapters.contains_key(channel) {
        return Err(Error::Invalid(format!("channel {channel} has no adapter: connect it before it takes messages")));
    }
    if m.sender.is_empty() || m.sender.len() > MAX_SENDER_BYTES || m.sender_name.len() > MAX_SENDER_BYTES {
        return Err(Error::Invalid(format!("the sender id must be 1-{MAX_SENDER_BYTES} bytes, the name at most {MAX_SENDER_BYTES}")));
    }
    if m.provider_message_id.is_empty() {
        return Err(Error::Invalid("the provider message id is empty".into()));
    }
    if m.files.len() > MAX_ATTACHMENTS_PER_MESSAGE {
        return Err(Error::Invalid(format!("at most {MAX_ATTACHMENTS_PER_MESSAGE} attachments per message")));
    }
    let key = inbound_key(channel, m.sender, m.provider_message_id);
    if let Some(conversation) = state.inbound_seen {
        return Ok((Reply::Inbound { conversation, duplicate: true }, vec![]));
    }
    // Rules 24: a message sent here by its thread (the gateway read it open) whose
    // thread closed since is its sender's own, and a sender whose messages go to another
    // conversation shard is not this shard's to place: a conversation started here would
    // be one their next message never finds. Refused, nothing written; the gateway
    // sends it again without the thread.
    if let (Some(thread), Part::Conversations { shard, shards, .. }) = (m.thread, part) {
        if state.rules >= 24 && shards > 1 && !thread_open(state, channel, thread) && crate::placement::sender_shard(channel, m.sender, shards) != shard {
            return Err(Error::Closed(thread));
        }
    }
    if m.files.is_empty() || !m.text.is_empty() {
        check_text(m.text)?;
    }
    let mut total = 0u64;
    for (i, file) in m.files.iter().enumerate() {
        if file.size == 0 || state.attachments.contains_key(&file.id) || m.files[..i].iter().any(|f| f.id == file.id) {
            return Err(Error::Invalid(format!("attachment {} is empty or exists", file.id.0)));
        }
        total = total.saturating_add(file.size);
    }
    let visitor_id = format!("{channel}:{}", m.sender);
    let files = |conversation: ConversationId| -> Vec<Attachment> {
        m.files
            .iter()
            .map(|f| Attachment {
                id: f.id.clone(),
                conversation,
                name: f.name.clone(),
                content_type: f.content_type.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                uploaded_by: "client".into(),
            })
            .collect()
    };
    let stored = |conversation: ConversationId| -> Vec<Event> { files(conversation).into_iter().map(Event::AttachmentStored).collect() };
    // Events that close a full conversation before the message opens a new one, and who
    // held it.
    let mut closing = Vec::new();
    let mut holder: Option<OperatorId> = None;
    if let Some(conv_id) = inbound_target(state, channel, m.sender, m.thread) {
        let conv = state.conversations.get(&conv_id).ok_or(Error::NotFound(format!("conversation {conv_id}")))?;
        if conv.keys.contains_key(&key) {
            return Ok((Reply::Inbound { conversation: conv_id, duplicate: true }, vec![]));
        }
        // Into an open conversation: its block rules only (an allow list decides who
        // starts one, rules 15).
        crate::access::check_open(state, channel, crate::access::Customer { ip: None, visitor: Some(&visitor_id) }).map_err(Error::Blocked)?;
        // Rules 14: a messenger customer cannot start a new conversation themselves, so
        // one that holds all the history or customer text it may is closed and the
        // message opens a new one (before, the message was refused and lost).
        // Only the conversation's own customer fills it so: another sender in an email
        // thread (a colleague in copy) is refused as before, not made to close it.
        let own = conv.visitor.id.as_deref() == Some(visitor_id.as_str());
        // Files that would fit a new conversation but not this one's room.
        let fits_new = m.files.len() <= MAX_ATTACHMENTS_PER_CONVERSATION && total <= MAX_ATTACHMENT_BYTES_PER_CONVERSATION;
        let no_room = !m.files.is_empty() && fits_new && attachment_room_for(state, conv_id, m.files.len(), total).is_err();
        let full = state.rules >= 14 && own && (conv.last_seq() as usize >= MAX_HISTORY_ENTRIES || no_room || check_client_text(state, conv, m.text).is_err());
        if full {
            // The customer goes on with whoever held it: no wrap-up for them, and the new
            // conversation, once queued, prefers them (sticky), as the same customer's.
            closing = withdraw_pending(state, &conv_id, WithdrawReason::ConversationClosed);
            closing.push(Event::ConversationClosed { conversation: conv_id, by: Closer::System, resolution: FULL.into(), tags: vec![], decided_at: None });
            holder = conv.assigned().cloned();
        } else {
            check_message(state, conv_id, if m.files.is_empty() { m.text } else { "-" }, &[])?;
            check_client_text(state, conv, m.text)?;
            if !m.files.is_empty() {
                attachment_room_for(state, conv_id, m.files.len(), total)?;
            }
            let mut events = stored(conv_id);
            events.push(Event::ClientMessagePosted { conversation: conv_id, key: key.clone(), text: m.text.to_owned(), attachments: files(conv_id) });
            events.push(Event::InboundTaken { conversation: conv_id, key });
            return Ok((Reply::Inbound { conversation: conv_id, duplicate: false }, events));
        }
    }
    if m.files.len() > MAX_ATTACHMENTS_PER_CONVERSATION || total > MAX_ATTACHMENT_BYTES_PER_CONVERSATION {
        return Err(Error::Invalid("the files are more than a conversation holds".into()));
    }
    if m.attributes.len() > 20 || m.attributes.iter().any(|(k, v)| k.is_empty() || k.len() > 64 || v.chars().count() > 512) {
        return Err(Error::Invalid("at most 20 attributes, names of 1-64 bytes, values of at most 512 characters".into()));
    }
    let visitor = Visitor { id: Some(visitor_id), name: m.sender_name.to_owned(), attributes: m.attributes.to_vec() };
    let (conv_id, mut events) = start_conversation(state, channel, None, &visitor, now, part, !closing.is_empty())?;
    // Right after it is placed (queued or with the bot), before any notice and an
    // after-hours close: the customer's message is part of the open conversation.
    let at = events.len().min(2);
    let mut message = stored(conv_id);
    message.push(Event::ClientMessagePosted { conversation: conv_id, key: key.clone(), text: m.text.to_owned(), attachments: files(conv_id) });
    message.push(Event::InboundTaken { conversation: conv_id, key });
    events.splice(at..at, message);
    // The sticky only for a new conversation that waits in a queue: not one a bot took,
    // nor one closed at once (after hours), which would keep the entry for ever.
    let queued = events.iter().any(|e| matches!(e, Event::ConversationQueued { conversation, .. } if *conversation == conv_id));
    let closed = events.iter().any(|e| matches!(e, Event::ConversationClosed { conversation, .. } if *conversation == conv_id));
    closing.extend(events);
    closing.extend(holder.filter(|_| queued && !closed).map(|operator| Event::StickySet { conversation: conv_id, operator }));
    Ok((Reply::Inbound { conversation: conv_id, duplicate: false }, closing))
}

/// Whether a conversation can take `count` more files of `bytes` in all.
pub fn attachment_room_for(state: &ShardState, conversation: ConversationId, count: usize, bytes: u64) -> Result<(), Error> {
    let (have, have_bytes) = state
        .attachments
        .values()
        .filter(|a| a.conversation == conversation)
        .fold((0usize, 0u64), |(n, total), a| (n + 1, total.saturating_add(a.size)));
    if have + count > MAX_ATTACHMENTS_PER_CONVERSATION || have_bytes.saturating_add(bytes) > MAX_ATTACHMENT_BYTES_PER_CONVERSATION {
        return Err(Error::Invalid(format!(
            "a conversation holds at most {MAX_ATTACHMENTS_PER_CONVERSATION} files and {} MiB",
            MAX_ATTACHMENT_BYTES_PER_CONVERSATION / (1024 * 1024)
        )));
    }
    Ok(())
}

/// Whether a conversation can take one more file of `size` bytes. The gateway asks
/// before it writes the bytes; the commit asks again.
pub fn attachment_room(state: &ShardState, conversation: ConversationId, size: u64) -> Result<(), Error> {
    let (count, bytes) = state
        .attachments
        .values()
        .filter(|a| a.conversation == conversation)
        .fold((0usize, 0u64), |(n, total), a| (n + 1, total.saturating_add(a.size)));
    if count >= MAX_ATTACHMENTS_PER_CONVERSATION {
        return Err(Error::Invalid(format!("a conversation holds at most {MAX_ATTACHMENTS_PER_CONVERSATION} files")));
    }
    if bytes.saturating_add(size) > MAX_ATTACHMENT_BYTES_PER_CONVERSATION {
        return Err(Error::Invalid(format!(
            "a conversation holds at most {} MiB of files",
            MAX_ATTACHMENT_BYTES_PER_CONVERSATION / (1024 * 1024)
        )));
    }
    Ok(())
}

/// Withdraws every offer pending for `op` (rules 10: what they may take changed); routing
/// makes them again to whoever fits now. No pass is recorded: the operator did not miss
/// or decline them.
fn withdraw_offers_of(op: &crate::state::Operator, why: &str) -> Vec<Event> {
    op.offers.iter().map(|offer| Event::OfferWithdrawn { offer: *offer, reason: WithdrawReason::OperatorUnavailable, detail: why.to_owned() }).collect()
}

fn withdraw_pending(state: &ShardState, conv_id: &ConversationId, reason: WithdrawReason) -> Vec<Event> {
    match state.conversations.get(conv_id).map(|c| &c.status) {
        Some(ConversationStatus::Queued { offer: Some(offer), .. }) => {
            vec![Event::OfferWithdrawn { offer: *offer, reason, detail: String::new() }]
        }
        _ => vec![],
    }
}
