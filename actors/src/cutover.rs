//! The records of a node of one group, sorted into ADR 0006's split: which records the
//! metadata group, the routing shard and each conversation shard hold, and how those
//! that differ per group are written for each (`switchboard cluster split`).
//!
//! Records arrive in key order (a scan of the old group). A conversation lives in
//! conversation shard `id % shards`, as a split node numbers them. What each group gets:
//!
//! - the directory (groups, channels, logins, templates, rules, …): every group, as a
//!   directory command is applied by each; a removed node (`!`): the metadata group;
//! - a conversation, its history and everything keyed by it: its shard; the routing
//!   shard also holds every conversation not with a bot (the history too while it is
//!   queued or assigned), its open marker, first answer and queue time;
//! - offers, decisions, presence, socket reports, wrap-up, KPIs, breaks: the routing
//!   shard;
//! - an operator: the routing shard whole; the metadata group its configuration; each
//!   conversation shard its configuration and the conversations of that shard it holds;
//! - the counters: the routing shard's offers and tickets, the conversation shards'
//!   numbers (each numbers from where the old group stopped);
//! - operators' feeds start empty in every group (a desk's resume point past a feed's
//!   end is taken as its end, and the desk's `hello` brings it up to date);
//! - keyed starts and letters are dropped (a start retried across the cut-over opens
//!   a new conversation; there are no letters in a group of one).
//!
//! A conversation a channel sender has open must already be in the shard that sender's
//! next message goes to (a hash of channel and sender), or that message would open a
//! second conversation: [`Splitter::route`] refuses the cut-over then.

use std::collections::BTreeSet;

use crate::error::Error;
use crate::model::{ConversationId, OperatorId, Timestamp};
use crate::records::{decode, encode, Meta};
use crate::state::{Conversation, ConversationStatus, Feed, Operator};

/// Which group of the split a record goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SplitPart {
    /// The metadata group `G0`.
    Directory,
    /// The routing shard `R`.
    Routing,
    /// Conversation shard `k`.
    Conversations(u64),
}

/// A stable 64-bit hash (FNV-1a, each part followed by `0xff`): the same visitor or
/// channel sender goes to the same conversation shard on every node and every build.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xff)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The lowest routing rules a cut-over takes: from 11 an operator's close is decided by
/// the routing shard, which knows who holds the conversation.
pub const MIN_RULES: u32 = 11;

/// Sorts one group's records, in key order, into the split's groups.
pub struct Splitter {
    shards: u64,
    /// Conversations the routing shard tracks as queued or assigned: their history,
    /// open marker, first answer and queue time go there too.
    routed: BTreeSet<ConversationId>,
    /// Conversations a bot holds, which the routing shard does not know.
    with_bot: BTreeSet<ConversationId>,
    /// Records of conversations whose key sorts before the conversation's own (`Q`
    /// queue time, `X` returning customer's operator), held until it says whether the
    /// routing shard tracks them: only open conversations have them.
    held: std::collections::BTreeMap<ConversationId, Vec<(Vec<u8>, Vec<u8>)>>,
}

type Out = Vec<(SplitPart, Vec<u8>, Vec<u8>)>;

fn id_at(key: &[u8], at: usize) -> Result<ConversationId, Error> {
    key.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| ConversationId(u64::from_be_bytes(b)))
        .ok_or_else(|| Error::Storage(format!("record key {:?} is shorter than the conversation id it holds", String::from_utf8_lossy(key))))
}

fn last_id(key: &[u8]) -> Result<ConversationId, Error> {
    id_at(key, key.len().saturating_sub(8)).and_then(|id| if key.len() >= 9 { Ok(id) } else { Err(Error::Storage("record key too short".into())) })
}

impl Splitter {
    pub fn new(shards: u64) -> Self {
        Splitter { shards: shards.max(1), routed: BTreeSet::new(), with_bot: BTreeSet::new(), held: Default::default() }
    }

    fn shard(&self, id: ConversationId) -> SplitPart {
        SplitPart::Conversations(id.0 % self.shards)
    }

    /// Every part.
    fn all(&self) -> impl Iterator<Item = SplitPart> + '_ {
        [SplitPart::Directory, SplitPart::Routing].into_iter().chain((0..self.shards).map(SplitPart::Conversations))
    }

    /// A record keyed by conversation `id`: its shard, and the routing shard while it
    /// tracks it.
    fn conversation_keyed(&self, id: ConversationId, key: &[u8], value: &[u8]) -> Out {
        let mut out = vec![(self.shard(id), key.to_vec(), value.to_vec())];
        if self.routed.contains(&id) {
            out.push((SplitPart::Routing, key.to_vec(), value.to_vec()));
        }
        out
    }

    /// Where one record goes, with its value for each group.
    pub fn route(&mut self, key: &[u8], value: &[u8]) -> Result<Out, Error> {
        let Some(&prefix) = key.first() else { return Ok(Vec::new()) };
        let same = |parts: &mut dyn Iterator<Item = SplitPart>| -> Out { parts.map(|p| (p, key.to_vec(), value.to_vec())).collect() };
        Ok(match prefix {
            b'm' => {
                let meta: Meta = decode(value)?;
                if meta.rules < MIN_RULES {
                    return Err(Error::Invalid(format!(
                        "the folder decides with routing rules {}; a split needs {MIN_RULES} or newer: start the node with this build once (it adopts the newest rules), stop it, and split again",
                        meta.rules
                    )));
                }
                let directory = Meta { next_conversation: 0, next_offer: 0, next_ticket: 0, ..meta.clone() };
                let conversations = Meta { next_offer: 0, ..meta.clone() };
                let mut out = vec![(SplitPart::Directory, key.to_vec(), encode(&directory)), (SplitPart::Routing, key.to_vec(), encode(&meta))];
                out.extend((0..self.shards).map(|k| (SplitPart::Conversations(k), key.to_vec(), encode(&conversations))));
                out
            }
            // The clock and the directory: every group.
            b'k' | b'g' | b'n' | b'u' | b't' | b'y' | b'Y' | b'B' | b'E' | b'Z' | b'R' | b'S' | b'G' | b'H' | b'N' | b'C' | b'b' | b'r' | b'L' | b'J' => {
                same(&mut self.all())
            }
            b'!' => same(&mut std::iter::once(SplitPart::Directory)),
            b'o' => {
                let op: Operator = decode(value)?;
                let bare = |active: BTreeSet<ConversationId>| Operator {
                    presence: crate::model::Presence::Offline,
                    active,
                    offers: BTreeSet::new(),
                    feed: Feed::default(),
                    ..op.clone()
                };
                let mut out = vec![
                    (SplitPart::Directory, key.to_vec(), encode(&bare(BTreeSet::new()))),
                    (SplitPart::Routing, key.to_vec(), encode(&Operator { feed: Feed::default(), ..op.clone() })),
                ];
                for k in 0..self.shards {
                    let active = op.active.iter().copied().filter(|c| c.0 % self.shards == k).collect();
                    out.push((SplitPart::Conversations(k), key.to_vec(), encode(&bare(active))));
                }
                out
            }
            // Feeds start anew; keyed starts and letters do not carry over.
            b'f' | b's' | b'i' | b'#' => Vec::new(),
            b'+' if key.get(1) == Some(&b'k') => Vec::new(),
            b'+' => vec![(self.shard(id_at(key, 2)?), key.to_vec(), value.to_vec())],
            b'c' => {
                let conv: Conversation = decode(value)?;
                let id = conv.id;
                let mut out = Vec::new();
                match &conv.status {
                    ConversationStatus::WithBot => {
                        self.with_bot.insert(id);
                    }
                    ConversationStatus::Queued { .. } | ConversationStatus::Assigned { .. } => {
                        self.check_sender(&conv)?;
                        self.routed.insert(id);
                        out.push((SplitPart::Routing, key.to_vec(), value.to_vec()));
                        for (key, value) in self.held.remove(&id).unwrap_or_default() {
                            out.push((SplitPart::Routing, key, value));
                        }
                    }
                    ConversationStatus::Closed => out.push((SplitPart::Routing, key.to_vec(), value.to_vec())),
                }
                if conv.status == ConversationStatus::WithBot {
                    self.check_sender(&conv)?;
                }
                self.held.remove(&id);
                // A conversation shard never hears of offers.
                let status = match conv.status.clone() {
                    ConversationStatus::Queued { ticket, .. } => ConversationStatus::Queued { ticket, offer: None },
                    other => other,
                };
                out.push((self.shard(id), key.to_vec(), encode(&Conversation { status, ..conv })));
                out
            }
            b'q' | b'h' | b'j' => self.conversation_keyed(id_at(key, 1)?, key, value),
            b'Q' | b'X' => {
                let id = id_at(key, 1)?;
                self.held.entry(id).or_default().push((key.to_vec(), value.to_vec()));
                vec![(self.shard(id), key.to_vec(), value.to_vec())]
            }
            b'a' | b'T' | b'U' | b'M' | b'D' => vec![(self.shard(id_at(key, 1)?), key.to_vec(), value.to_vec())],
            b'v' | b'e' => vec![(self.shard(last_id(key)?), key.to_vec(), value.to_vec())],
            b'w' => vec![(self.shard(ConversationId(!last_id(key)?.0)), key.to_vec(), value.to_vec())],
            b'A' => {
                let id = value.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes).ok_or_else(|| Error::Storage("an attachment's conversation record is short".into()))?;
                vec![(self.shard(ConversationId(id)), key.to_vec(), value.to_vec())]
            }
            b'V' => {
                let (_, _, id): (OperatorId, Timestamp, ConversationId) = decode(value)?;
                vec![(self.shard(id), key.to_vec(), value.to_vec())]
            }
            b'I' => vec![(self.shard(decode::<ConversationId>(value)?), key.to_vec(), value.to_vec())],
            b'F' => {
                let (id, _): (ConversationId, u64) = decode(value)?;
                vec![(self.shard(id), key.to_vec(), value.to_vec())]
            }
            b'x' | b'%' | b'd' | b'O' | b'K' | b'p' | b'l' | b'z' | b'P' | b'W' => same(&mut std::iter::once(SplitPart::Routing)),
            other => {
                return Err(Error::Storage(format!("records with the prefix {:?} are unknown to this build's cut-over: split with the build that wrote them", other as char)));
            }
        })
    }

    /// Refuses a channel sender's open conversation outside the shard the sender's next
    /// message goes to.
    fn check_sender(&self, conv: &Conversation) -> Result<(), Error> {
        let Some(sender) = conv.visitor.id.as_deref().and_then(|v| v.strip_prefix(&format!("{}:", conv.channel))) else { return Ok(()) };
        let hashed = stable_hash(&[conv.channel.0.as_bytes(), sender.as_bytes()]) % self.shards;
        if hashed != conv.id.0 % self.shards {
            return Err(Error::Invalid(format!(
                "conversation {} of a {} sender is open and its next message would go to conversation shard {hashed}, not its own ({}): close the open conversations of messenger, email and API senders first (or split with --shards 1)",
                conv.id,
                conv.channel,
                conv.id.0 % self.shards
            )));
        }
        Ok(())
    }
}

