//! Mail between Raft groups (ADR 0006): the bookkeeping that makes a step decided in one
//! group reach another exactly once and in order, through lost, repeated and reordered
//! deliveries and through leader changes on either side.
//!
//! Pure like the core, so both sides' machines run it inside `apply`; the forwarders
//! that carry the letters between groups are `node/src/groups.rs`'s.
//!
//! - The sender's [`Outbox`] (one per destination) is part of the sending group's
//!   replicated state: a letter is posted in the same apply that decided it, so the
//!   decision and the letter commit together. Ids are consecutive from 1.
//! - A forwarder on the sender's leader keeps no state of its own: it sends
//!   [`Outbox::unconfirmed`] in order, retrying until the destination answers, and
//!   proposes the answer back as [`Outbox::confirm`]. A new leader's forwarder starts
//!   from the same records, so nothing decided is lost in a leader change.
//! - The destination's [`Inbox`] (part of its replicated state) keeps the last id it
//!   applied from each source. A letter is applied only if it is the next one
//!   ([`Receipt::Apply`]); an older one is a repeat and a newer one waits for the gap
//!   before it to be resent. Its answer is [`Inbox::last`], the id to confirm up to.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::model::{ChannelId, Closer, ConversationId, OperatorId, SkillGroupId, Timestamp, TransferTarget, Visitor};

/// A Raft group's id, as the raft crate numbers groups.
pub type GroupId = u64;

/// One letter as it travels: its source, its id in the source's outbox for the
/// destination, and what it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Letter<P> {
    pub from: GroupId,
    pub id: u64,
    pub payload: P,
}

/// Letters one group decided to send another and the other has not yet confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbox<P> {
    /// The id the next posted letter gets; the first is 1.
    next: u64,
    /// Posted and not confirmed, oldest first, with consecutive ids.
    pending: VecDeque<(u64, P)>,
}

impl<P> Default for Outbox<P> {
    fn default() -> Self {
        Outbox { next: 1, pending: VecDeque::new() }
    }
}

impl<P> Outbox<P> {
    /// Posts a letter (inside the apply that decided it) and returns its id.
    pub fn post(&mut self, payload: P) -> u64 {
        let id = self.next;
        self.next += 1;
        self.pending.push_back((id, payload));
        id
    }

    /// The letters to (re)send, oldest first.
    pub fn unconfirmed(&self) -> impl Iterator<Item = (u64, &P)> {
        self.pending.iter().map(|(id, payload)| (*id, payload))
    }

    /// The destination answered that it applied every letter up to `upto`: they are
    /// dropped. Returns how many were. An answer can arrive late, after a newer one,
    /// so one below what was confirmed already drops nothing; one above the last id
    /// posted cannot come from a destination that applies only posted letters and is
    /// refused, dropping nothing.
    pub fn confirm(&mut self, upto: u64) -> Result<usize, MailError> {
        if upto >= self.next {
            return Err(MailError::ConfirmedUnposted { upto, last_posted: self.next - 1 });
        }
        let mut dropped = 0;
        while self.pending.front().is_some_and(|(id, _)| *id <= upto) {
            self.pending.pop_front();
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Rebuilds an outbox from its records: the last id posted and the letters not
    /// confirmed, oldest first.
    pub fn restore(last_posted: u64, pending: impl IntoIterator<Item = (u64, P)>) -> Outbox<P> {
        Outbox { next: last_posted + 1, pending: pending.into_iter().collect() }
    }

    /// The unconfirmed letter `id`, found by its place (ids are consecutive).
    pub fn get(&self, id: u64) -> Option<&P> {
        let first = self.pending.front()?.0;
        let (at, payload) = self.pending.get(usize::try_from(id.checked_sub(first)?).ok()?)?;
        (*at == id).then_some(payload)
    }

    /// The id of the last letter posted (0 before the first).
    pub fn last_posted(&self) -> u64 {
        self.next - 1
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Letters posted and not confirmed.
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

/// What a destination does with an arriving letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipt {
    /// The next one from its source: apply it (the inbox already counts it applied, in
    /// the same apply).
    Apply,
    /// Applied before: drop it.
    Repeat,
    /// Letters before it have not arrived: drop it; the source resends from `expected`.
    Early { expected: u64 },
}

/// The last letter id a group applied from each source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inbox {
    last: BTreeMap<GroupId, u64>,
}

impl Inbox {
    /// Decides on a letter from `from` with id `id`; an `Apply` counts it as applied.
    pub fn receive(&mut self, from: GroupId, id: u64) -> Receipt {
        let last = self.last.entry(from).or_insert(0);
        if id <= *last {
            Receipt::Repeat
        } else if id == *last + 1 {
            *last = id;
            Receipt::Apply
        } else {
            Receipt::Early { expected: *last + 1 }
        }
    }

    /// What [`Inbox::receive`] would decide, without counting anything.
    pub fn expects(&self, from: GroupId, id: u64) -> Receipt {
        let last = self.last(from);
        if id <= last {
            Receipt::Repeat
        } else if id == last + 1 {
            Receipt::Apply
        } else {
            Receipt::Early { expected: last + 1 }
        }
    }

    /// Every source with the last id applied from it.
    pub fn sources(&self) -> impl Iterator<Item = (GroupId, u64)> + '_ {
        self.last.iter().map(|(g, id)| (*g, *id))
    }

    /// Rebuilds an inbox from its records.
    pub fn restore(last: impl IntoIterator<Item = (GroupId, u64)>) -> Inbox {
        Inbox { last: last.into_iter().collect() }
    }

    /// The answer to `from`'s forwarder: every letter up to this id is applied.
    pub fn last(&self, from: GroupId) -> u64 {
        self.last.get(&from).copied().unwrap_or(0)
    }
}

/// What a conversation shard (`C`) and a routing shard (`R`) tell each other: each
/// letter mirrors one event the sender decided, for the receiver to commit in its own
/// log (`core::receive`). Messages, typing, reads and history never travel: only the
/// steps that change who may hold a conversation, and what the other side counts.
///
/// Part of the storage format once wired (letters are records of the sender until
/// confirmed): append variants, never reorder or remove them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Mail {
    /// `C` to `R`: the conversation waits for an operator of `group` (started, handed off
    /// by a bot, or requeued by a directory change). `R` learns the conversation from it
    /// the first time, allocates its own queue ticket and routes. `sticky` is the
    /// returning customer's last operator when `C` found them eligible (rules 5).
    Enqueue { conversation: ConversationId, channel: ChannelId, visitor: Visitor, group: SkillGroupId, created_at: Timestamp, sticky: Option<OperatorId> },
    /// `C` to `R`: closed. `R` withdraws its offer, frees the holder's capacity (I3:
    /// until this arrives the capacity stays taken, never the other way round) and
    /// decides the holder's wrap-up.
    Release { conversation: ConversationId, by: Closer, resolution: String, tags: Vec<String> },
    /// `C` to `R`: the customer rated it (the rating KPIs are counted where routing is).
    Rated { conversation: ConversationId, score: u8, comment: String },
    /// `C` to `R`: deleted by retention; `R` deletes its decision records.
    Purged { conversations: Vec<ConversationId> },
    /// `R` to `C`: an operator holds it now. `C` accepts that operator's replies from
    /// then on (I2); until it applies this, a reply is refused as not assigned.
    Assigned { conversation: ConversationId, operator: OperatorId },
    /// `R` to `C`: its holder passed it on, and where it went (one letter, so `C` never
    /// holds a conversation released by its holder and not yet placed).
    Transferred { conversation: ConversationId, from: OperatorId, to: TransferTarget, comment: String, then: Placed },
    /// `R` to `C`: a supervisor moved it, and where it went.
    Reassigned { conversation: ConversationId, by: String, to: TransferTarget, comment: String, then: Placed },
    /// `R` to `C`: back in `group`'s queue.
    Requeued { conversation: ConversationId, group: SkillGroupId },
    /// `G0` to the routing shard and every `C`: a directory command the metadata group
    /// took under routing rules `rules`, for each to apply as its own. A group that has
    /// not adopted those rules yet leaves the letter (and every later one from `G0`)
    /// waiting until it has: it would refuse what those rules allow.
    Directory { rules: u32, command: Box<crate::model::Command> },
    /// `R` to `C` (rules 11): the holder closed it, decided where the holder is known.
    /// `C` closes it unless it closed already (a customer's close crossing it), and
    /// sends no `Release` back: `R` freed the capacity when it decided.
    Closed { conversation: ConversationId, by: Closer, resolution: String, tags: Vec<String> },
    /// `C` to `R` (rules 20): `Release`, with when `C` closed it. `R` counts the close
    /// (handle time, the hour) and starts the holder's wrap-up then, not when the
    /// letter arrives (it may wait out a routing shard without a leader).
    ReleaseAt { conversation: ConversationId, by: Closer, resolution: String, tags: Vec<String>, at: Timestamp },
    /// `C` to `R` (rules 20): `Rated`, with when `C` took the rating.
    RatedAt { conversation: ConversationId, score: u8, comment: String, at: Timestamp },
    /// `R` to `C` (rules 26): `Closed`, with when `R` decided it. What the customer wrote
    /// into the conversation from then on, which `C` took while the letter was on its
    /// way and nobody read, `C` carries into a new conversation of theirs (`core::carry_late`).
    ClosedAt { conversation: ConversationId, by: Closer, resolution: String, tags: Vec<String>, at: Timestamp },
}

/// Where a transfer or reassignment put a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placed {
    Held(OperatorId),
    Queued(SkillGroupId),
}

impl Mail {
    /// The conversations the letter is about.
    pub fn conversations(&self) -> Vec<ConversationId> {
        match self {
            Mail::Enqueue { conversation, .. }
            | Mail::Release { conversation, .. }
            | Mail::Rated { conversation, .. }
            | Mail::ReleaseAt { conversation, .. }
            | Mail::RatedAt { conversation, .. }
            | Mail::Assigned { conversation, .. }
            | Mail::Transferred { conversation, .. }
            | Mail::Reassigned { conversation, .. }
            | Mail::Requeued { conversation, .. }
            | Mail::Closed { conversation, .. }
            | Mail::ClosedAt { conversation, .. } => vec![*conversation],
            Mail::Purged { conversations } => conversations.clone(),
            Mail::Directory { .. } => Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MailError {
    #[error("a confirmation up to letter {upto} names letters never posted (the last posted is {last_posted})")]
    ConfirmedUnposted { upto: u64, last_posted: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_is_applied_once_and_in_order() {
        let mut inbox = Inbox::default();
        assert_eq!(inbox.receive(7, 2), Receipt::Early { expected: 1 });
        assert_eq!(inbox.receive(7, 1), Receipt::Apply);
        assert_eq!(inbox.receive(7, 1), Receipt::Repeat);
        assert_eq!(inbox.receive(7, 2), Receipt::Apply);
        // Sources count separately.
        assert_eq!(inbox.receive(8, 1), Receipt::Apply);
        assert_eq!((inbox.last(7), inbox.last(8), inbox.last(9)), (2, 1, 0));
    }

    #[test]
    fn a_confirmation_drops_what_it_covers_and_a_late_one_nothing() {
        let mut outbox = Outbox::default();
        for payload in ["a", "b", "c"] {
            outbox.post(payload);
        }
        assert_eq!(outbox.confirm(2), Ok(2));
        assert_eq!(outbox.confirm(1), Ok(0));
        assert_eq!(outbox.unconfirmed().collect::<Vec<_>>(), vec![(3, &"c")]);
        assert_eq!((outbox.get(2), outbox.get(3), outbox.get(4)), (None, Some(&"c"), None));
        assert_eq!(outbox.confirm(4), Err(MailError::ConfirmedUnposted { upto: 4, last_posted: 3 }));
        assert_eq!(outbox.unconfirmed().count(), 1);
        assert_eq!(outbox.post("d"), 4);
    }
}
