//! The shard state as records: how an applied command's changes become keyed records,
//! how the hot state is rebuilt from them at start, and how a command that names a
//! closed conversation finds it again.
//!
//! Keys (ids in big-endian `u64` where numeric, so a prefix scan is in order):
//!
//! | key | record |
//! |---|---|
//! | `m` | counters, rules version, session epochs, public groups ([`Meta`]) |
//! | `k` | the time of the last entry that changed the state (rules 3) |
//! | `g` group | skill group configuration (its queue is rebuilt from conversations) |
//! | `o` operator | operator: configuration, presence, load, feed position |
//! | `f` len:u16 operator seq | one entry of an operator's feed (the last 4096 are kept) |
//! | `c` conversation | conversation routing fields, read marks, status (no history) |
//! | `q` conversation | empty: the conversation is open (queued or assigned) |
//! | `h` conversation seq | one history entry |
//! | `x` offer | pending offer |
//! | `%` offer | empty: the offer was pending when a new leader began (rules 12) |
//! | `d` offer | the decision record of an offer |
//! | `n` channel, `u` login, `t` template | directory |
//! | `a` conversation attachment | attachment record; `A` attachment -> conversation |
//! | `v` len:u16 visitor conversation | empty: the visitor's conversations, oldest first |
//! | `e` len:u16 channel closed_at conversation | empty: closed conversations by channel and close time (retention) |
//! | `w` len:u16 operator !conversation | empty: the conversations an operator handled, newest first (the id's bits inverted) |
//! | `j` conversation | when an open conversation was first answered |
//! | `K` len:u16 group hour | the group's KPI counters for that hour ([`GroupKpi`]) |
//! | `p` node | the operators with a live socket on that node, as it last reported them |
//! | `l` operator | when the operator was last reported with a live socket |
//! | `z` operator | why the operator's presence was set for them (`disconnected`) |
//! | `y` group | the group's queue order and pacing ([`GroupRouting`]) |
//! | `Y` channel | the channel's priority |
//! | `W` operator | until when the operator is in wrap-up |
//! | `B` | the configured pause reasons |
//! | `E` kind name | an emergency notice in force (kind `c` channel, `g` group) |
//! | `Z` !n | audit trail entry number n, newest first (the number's bits inverted) |
//! | `R` rule | a block or allow rule (the key holds the rule's bincode) with its note |
//! | `S` channel | a channel's access mode (allow list only, refusal text) |
//! | `X` conversation | the operator a returning customer's queued conversation is offered first |
//! | `V` visitor | who served the visitor's last closed conversation, when it closed, and which it was (deleted with it) |
//! | `T` conversation | when each side of an open conversation wrote last ([`Activity`]) |
//! | `L` operator | the operator's per-channel-kind limits |
//! | `J` operator | the operator's skills and levels |
//! | `P` len:u16 operator hour | the operator's time on break per reason, for breaks that ended in that hour |
//! | `G` group | the group's routing steps ([`RoutingStep`], rules 6) |
//! | `H` group | the group's opening hours ([`OpeningHours`], rules 6) |
//! | `N` | the channel kinds' weights against capacity (rules 6) |
//! | `Q` conversation | when a queued conversation entered its group's queue (rules 6) |
//! | `O` offer | the routing step an offer was made under (rules 6; deleted with its decision record) |
//! | `C` channel | how the channel reaches its provider ([`AdapterConfig`], ADR 0009) |
//! | `b` channel | the key the channel's customer identities are signed with ([`IdentityKey`]) |
//! | `r` channel | the channel's bot ([`BotConfig`], rules 7) |
//! | `I` inbound key | the conversation a channel's inbound message (`channel:provider id`) went to (deleted with it) |
//! | `+` `k` len:u16 channel key | the conversation a keyed `start` in that channel opened, its visitor and when (deleted with it) |
//! | `+` `c` conversation | the channel and key of the keyed `start` that opened it |
//! | `U` conversation seq | an outbox entry still to be sent or being sent ([`Delivery`]) |
//! | `M` conversation seq | an outbox entry once sent, delivered, read or dead-lettered |
//! | `D` conversation seq | empty: the outbox entry is dead-lettered (failed or unknown) |
//! | `F` len:u16 channel provider id | the sent outbox entry (conversation, seq) the provider knows by that id (deleted with it) |
//! | `s` group:u64 id:u64 | a letter for that group not yet confirmed ([`crate::mail::Mail`], ADR 0006) |
//! | `i` `o` group:u64 | the id of the last letter posted to that group |
//! | `i` `i` group:u64 | the id of the last letter applied from that group |
//!
//! Every value starts with a format version byte ([`RECORD_VERSION`]), then the bincode
//! of the record. A reader refuses a version it does not know (docs/formats.md).

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::Error;
use crate::model::*;
use crate::state::{Activity, AuditEntry, Conversation, ConversationStatus, Delivery, Emergency, FeedEntry, FeedItem, GroupKpi, HistoryEntry, HistoryItem, NodeSockets, Operator, ShardState, SkillGroup, FEED_RETAINED};

/// The version byte every record value starts with.
pub const RECORD_VERSION: u8 = 1;

/// Where records are read from: the shard's Raft state tree.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String>;
    /// Up to `limit` records under `prefix` in key order, after the full key `after`.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String>;
    /// The record with the greatest key under `prefix`.
    fn last(&self, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>, String>;
    /// Up to `limit` records under `prefix`, greatest key first.
    fn newest(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String>;
}

/// How a feed entry is stored: a mirrored history entry by reference (its text is in
/// the conversation's history once), anything else whole.
#[derive(Serialize, Deserialize)]
enum FeedRecord {
    Entry(FeedEntry),
    Mirror { seq: u64, at: Timestamp, conversation: ConversationId, history: u64 },
}

/// Record writes of one command: a value to put, or `None` to remove the key.
pub type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Counters and small maps kept as one record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub next_conversation: u64,
    pub next_offer: u64,
    pub next_ticket: u64,
    pub rules: u32,
    pub session_epochs: BTreeMap<String, u64>,
    pub channel_public_groups: BTreeMap<ChannelId, Vec<SkillGroupId>>,
    pub channel_retention: BTreeMap<ChannelId, u32>,
}

/// Which group of ADR 0006 (with its amendments) a record will live in. Not used to
/// place records yet: one group holds them all today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// `G0`: users, channels, templates, groups' and operators' configuration.
    Directory,
    /// A conversation shard: histories, messages, attachments, channel deliveries.
    Conversation,
    /// A routing shard: offers, decisions, presence, queues' timing, KPIs.
    Routing,
    /// Every group keeps its own (its counters and clock).
    EachGroup,
    /// Split in two by ADR 0006: the operator record (configuration in `G0`, presence,
    /// load and feed position in `R`), the conversation record (messages and read
    /// marks in `C`, queue ticket and passes in `R`) and its open marker (both).
    Split,
}

/// The owner of the records whose keys start with `prefix`, or `None` for a prefix
/// this build does not write.
pub fn owner(prefix: u8) -> Option<Owner> {
    Some(match prefix {
        b'm' | b'k' | b's' | b'i' => Owner::EachGroup,
        b'o' | b'c' | b'q' => Owner::Split,
        b'n' | b'u' | b't' | b'g' | b'y' | b'Y' | b'B' | b'E' | b'Z' | b'R' | b'S' | b'G' | b'H' | b'N' | b'C' | b'b' | b'r' | b'L' | b'J' | b'#' | b'!' => {
            Owner::Directory
        }
        b'h' | b'a' | b'A' | b'v' | b'e' | b'T' | b'V' | b'I' | b'+' | b'U' | b'M' | b'D' | b'F' | b'w' => Owner::Conversation,
        b'f' | b'x' | b'%' | b'd' | b'j' | b'K' | b'p' | b'l' | b'z' | b'W' | b'X' | b'Q' | b'O' | b'P' => Owner::Routing,
        _ => return None,
    })
}

/// Conversations one `PurgeExpired` entry deletes at most: an entry's work stays
/// bounded; the retention timer's next tick deletes more while some are left.
pub const PURGE_BATCH: usize = 500;
/// From rules 15, also the records one `PurgeExpired` entry deletes: it takes no further
/// conversation once its conversations hold this many (at least one is taken, whose
/// records are bounded by its 10,000 entries). Before, 500 long conversations could
/// make one entry delete millions of records while the shard's state was locked.
pub const PURGE_KEYS: usize = 50_000;

pub mod key {
    use crate::model::*;

    pub const META: &[u8] = b"m";
    /// The time of the last entry that changed the state (rules 3).
    pub const CLOCK: &[u8] = b"k";

    fn with(tag: u8, rest: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(1 + rest.len());
        key.push(tag);
        key.extend_from_slice(rest);
        key
    }

    fn with_id(tag: u8, id: u64, rest: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(9 + rest.len());
        key.push(tag);
        key.extend_from_slice(&id.to_be_bytes());
        key.extend_from_slice(rest);
        key
    }

    pub fn group(id: &SkillGroupId) -> Vec<u8> {
        with(b'g', id.0.as_bytes())
    }
    pub fn letter(to: u64, id: u64) -> Vec<u8> {
        with_id(b's', to, &id.to_be_bytes())
    }
    pub fn letters_prefix(to: u64) -> Vec<u8> {
        with_id(b's', to, &[])
    }
    pub fn last_posted(to: u64) -> Vec<u8> {
        with(b'i', &[&b"o"[..], &to.to_be_bytes()].concat())
    }
    pub fn last_applied(from: u64) -> Vec<u8> {
        with(b'i', &[&b"i"[..], &from.to_be_bytes()].concat())
    }
    pub fn operator(id: &OperatorId) -> Vec<u8> {
        with(b'o', id.0.as_bytes())
    }
    /// `tag`, the name's length as a big-endian `u16`, the name: a prefix that a
    /// number appended after it cannot make ambiguous.
    fn with_name(tag: u8, name: &str) -> Vec<u8> {
        let name = name.as_bytes();
        let mut key = vec![tag];
        key.extend_from_slice(&(name.len().min(u16::MAX as usize) as u16).to_be_bytes());
        key.extend_from_slice(name);
        key
    }
    pub fn feed_prefix(id: &OperatorId) -> Vec<u8> {
        with_name(b'f', &id.0)
    }
    pub fn feed(id: &OperatorId, seq: u64) -> Vec<u8> {
        let mut key = feed_prefix(id);
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }
    pub fn conversation(id: ConversationId) -> Vec<u8> {
        with_id(b'c', id.0, &[])
    }
    pub fn open(id: ConversationId) -> Vec<u8> {
        with_id(b'q', id.0, &[])
    }
    pub fn history_prefix(id: ConversationId) -> Vec<u8> {
        with_id(b'h', id.0, &[])
    }
    pub fn history(id: ConversationId, seq: u64) -> Vec<u8> {
        with_id(b'h', id.0, &seq.to_be_bytes())
    }
    pub fn offer(id: OfferId) -> Vec<u8> {
        with_id(b'x', id.0, &[])
    }
    /// An offer pending across a change of leader (rules 12): the key alone.
    pub fn offer_across_leaders(id: OfferId) -> Vec<u8> {
        with_id(b'%', id.0, &[])
    }
    pub fn decision(id: OfferId) -> Vec<u8> {
        with_id(b'd', id.0, &[])
    }
    pub fn channel(id: &ChannelId) -> Vec<u8> {
        with(b'n', id.0.as_bytes())
    }
    pub fn user(login: &str) -> Vec<u8> {
        with(b'u', login.as_bytes())
    }
    pub fn template(id: &str) -> Vec<u8> {
        with(b't', id.as_bytes())
    }
    pub fn attachments_prefix(conversation: ConversationId) -> Vec<u8> {
        with_id(b'a', conversation.0, &[])
    }
    pub fn attachment(conversation: ConversationId, id: &AttachmentId) -> Vec<u8> {
        with_id(b'a', conversation.0, id.0.as_bytes())
    }
    pub fn visitor_prefix(visitor: &str) -> Vec<u8> {
        with_name(b'v', visitor)
    }
    pub fn visitor(visitor: &str, conversation: ConversationId) -> Vec<u8> {
        let mut key = visitor_prefix(visitor);
        key.extend_from_slice(&conversation.0.to_be_bytes());
        key
    }
    pub fn closed_prefix(channel: &ChannelId) -> Vec<u8> {
        with_name(b'e', &channel.0)
    }
    pub fn closed(channel: &ChannelId, at: Timestamp, conversation: ConversationId) -> Vec<u8> {
        let mut key = closed_prefix(channel);
        key.extend_from_slice(&at.0.to_be_bytes());
        key.extend_from_slice(&conversation.0.to_be_bytes());
        key
    }
    pub fn handled_prefix(operator: &OperatorId) -> Vec<u8> {
        with_name(b'w', &operator.0)
    }
    /// Newest first in key order: the conversation id's bits are inverted.
    pub fn handled(operator: &OperatorId, conversation: ConversationId) -> Vec<u8> {
        let mut key = handled_prefix(operator);
        key.extend_from_slice(&(!conversation.0).to_be_bytes());
        key
    }
    pub fn answered(conversation: ConversationId) -> Vec<u8> {
        with_id(b'j', conversation.0, &[])
    }
    pub fn kpi(group: &SkillGroupId, hour: u64) -> Vec<u8> {
        let mut key = with_name(b'K', &group.0);
        key.extend_from_slice(&hour.to_be_bytes());
        key
    }
    pub fn node_sockets(node: u64) -> Vec<u8> {
        with_id(b'p', node, &[])
    }
    pub fn holders(group: u64) -> Vec<u8> {
        with_id(b'#', group, &[])
    }
    pub fn removed_node(node: u64) -> Vec<u8> {
        with_id(b'!', node, &[])
    }
    pub fn last_seen(operator: &OperatorId) -> Vec<u8> {
        with(b'l', operator.0.as_bytes())
    }
    pub fn presence_reason(operator: &OperatorId) -> Vec<u8> {
        with(b'z', operator.0.as_bytes())
    }
    pub fn group_routing(group: &SkillGroupId) -> Vec<u8> {
        with(b'y', group.0.as_bytes())
    }
    pub fn group_steps(group: &SkillGroupId) -> Vec<u8> {
        with(b'G', group.0.as_bytes())
    }
    pub fn group_hours(group: &SkillGroupId) -> Vec<u8> {
        with(b'H', group.0.as_bytes())
    }
    pub const CHANNEL_WEIGHTS: &[u8] = b"N";
    pub fn queued_since(conversation: ConversationId) -> Vec<u8> {
        with_id(b'Q', conversation.0, &[])
    }
    pub fn offer_step(offer: OfferId) -> Vec<u8> {
        with_id(b'O', offer.0, &[])
    }
    pub fn channel_priority(channel: &ChannelId) -> Vec<u8> {
        with(b'Y', channel.0.as_bytes())
    }
    pub fn wrap_up(operator: &OperatorId) -> Vec<u8> {
        with(b'W', operator.0.as_bytes())
    }
    pub const PAUSE_REASONS: &[u8] = b"B";
    pub fn emergency(target: &NoticeTarget) -> Vec<u8> {
        match target {
            NoticeTarget::Channel(c) => with(b'E', &[b"c", c.0.as_bytes()].concat()),
            NoticeTarget::Group(g) => with(b'E', &[b"g", g.0.as_bytes()].concat()),
        }
    }
    pub fn access_rule(rule: &AccessRule) -> Vec<u8> {
        with(b'R', &super::encode(rule))
    }
    pub fn channel_access(channel: &ChannelId) -> Vec<u8> {
        with(b'S', channel.0.as_bytes())
    }
    pub fn sticky(conversation: ConversationId) -> Vec<u8> {
        with_id(b'X', conversation.0, &[])
    }
    pub fn operator_skills(operator: &OperatorId) -> Vec<u8> {
        with(b'J', operator.0.as_bytes())
    }
    pub fn channel_limits(operator: &OperatorId) -> Vec<u8> {
        with(b'L', operator.0.as_bytes())
    }
    pub fn activity(conversation: ConversationId) -> Vec<u8> {
        with_id(b'T', conversation.0, &[])
    }
    pub fn last_served(visitor: &str) -> Vec<u8> {
        with(b'V', visitor.as_bytes())
    }
    pub fn audit(n: u64) -> Vec<u8> {
        with_id(b'Z', !n, &[])
    }
    pub fn pause_totals(operator: &OperatorId, hour: u64) -> Vec<u8> {
        let mut key = with_name(b'P', &operator.0);
        key.extend_from_slice(&hour.to_be_bytes());
        key
    }
    pub fn attachment_index(id: &AttachmentId) -> Vec<u8> {
        with(b'A', id.0.as_bytes())
    }
    pub fn channel_adapter(channel: &ChannelId) -> Vec<u8> {
        with(b'C', channel.0.as_bytes())
    }
    pub fn channel_bot(channel: &ChannelId) -> Vec<u8> {
        with(b'r', channel.0.as_bytes())
    }
    pub fn channel_identity(channel: &ChannelId) -> Vec<u8> {
        with(b'b', channel.0.as_bytes())
    }
    pub fn inbound(key: &str) -> Vec<u8> {
        with(b'I', key.as_bytes())
    }
    /// A keyed start's key in its channel (`+` `k`).
    pub fn start_key(channel: &ChannelId, key: &str) -> Vec<u8> {
        let mut out = with_name(b'+', &channel.0);
        out.insert(1, b'k');
        out.extend_from_slice(key.as_bytes());
        out
    }
    /// Which keyed start opened the conversation (`+` `c`).
    pub fn started_by_key(conversation: ConversationId) -> Vec<u8> {
        with(b'+', &[&b"c"[..], &conversation.0.to_be_bytes()].concat())
    }
    pub fn provider_id(channel: &ChannelId, id: &str) -> Vec<u8> {
        let mut key = with_name(b'F', &channel.0);
        key.extend_from_slice(id.as_bytes());
        key
    }
    /// `tag` `U` (open), `M` (final) or `D` (dead letter), then the conversation and seq.
    pub fn delivery(tag: u8, conversation: ConversationId, seq: u64) -> Vec<u8> {
        with_id(tag, conversation.0, &seq.to_be_bytes())
    }
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    // Encoding into a Vec cannot fail for these plain types; an empty body would be
    // refused on read rather than taken for a value.
    if let Ok(body) = bincode::serde::encode_to_vec(value, bincode::config::standard()) {
        out.extend_from_slice(&body);
    }
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map(|(v, _)| v)
            .map_err(|e| Error::Storage(format!("a stored record cannot be decoded: {e}"))),
        Some((version, _)) => Err(Error::Storage(format!(
            "a stored record has format version {version}, this build reads version {RECORD_VERSION}: run the build that wrote this data folder, or a newer one"
        ))),
        None => Err(Error::Storage("a stored record is empty".into())),
    }
}

fn store_err(e: String) -> Error {
    Error::Storage(e)
}

fn get<T: DeserializeOwned>(store: &dyn Store, key: &[u8]) -> Result<Option<T>, Error> {
    store.get(key).map_err(store_err)?.map(|bytes| decode(&bytes)).transpose()
}

/// Every record under `prefix`, read a page at a time.
fn scan_all(store: &dyn Store, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        let page = store.scan(prefix, out.last().map(|(k, _)| k.as_slice()), 1024).map_err(store_err)?;
        let done = page.len() < 1024;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

fn all<T: DeserializeOwned>(store: &dyn Store, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>, Error> {
    scan_all(store, prefix)?.into_iter().map(|(k, v)| Ok((k, decode(&v)?))).collect()
}

/// Turns what the applied events noted in `state.dirty` into record writes, and drops
/// the pending history and feed entries from memory.
pub fn take_writes(state: &mut ShardState) -> Writes {
    let dirty = std::mem::take(&mut state.dirty);
    let mut writes: Writes = Vec::new();
    let mut put = |key: Vec<u8>, value: Vec<u8>| writes.push((key, Some(value)));
    if dirty.clock {
        put(key::CLOCK.to_vec(), encode(&state.last_at));
    }
    if dirty.meta {
        put(
            key::META.to_vec(),
            encode(&Meta {
                next_conversation: state.next_conversation,
                next_offer: state.next_offer,
                next_ticket: state.next_ticket,
                rules: state.rules,
                session_epochs: state.session_epochs.clone(),
                channel_public_groups: state.channel_public_groups.clone(),
                channel_retention: state.channel_retention.clone(),
            }),
        );
    }
    let mut removes: Vec<Vec<u8>> = Vec::new();
    // Letters (ADR 0006): each posted one until confirmed, and the counters per peer.
    let mut last_posted = BTreeMap::new();
    for (to, id) in &dirty.mail_posted {
        if let Some(mail) = state.mail_out.get(to).and_then(|o| o.get(*id)) {
            put(key::letter(*to, *id), encode(mail));
        }
        last_posted.insert(*to, *id);
    }
    for (to, id) in last_posted {
        put(key::last_posted(to), encode(&id));
    }
    for (to, first, last) in &dirty.mail_dropped {
        removes.extend((*first..=*last).map(|id| key::letter(*to, id)));
    }
    for from in &dirty.mail_in {
        put(key::last_applied(*from), encode(&state.mail_in.last(*from)));
    }
    for id in &dirty.groups {
        match state.groups.get(id) {
            Some(group) => put(key::group(id), encode(&group.config)),
            None => removes.push(key::group(id)),
        }
    }
    for id in dirty.feeds.union(&dirty.operators) {
        let Some(op) = state.operators.get_mut(id) else { continue };
        for entry in std::mem::take(&mut op.feed.pending) {
            if entry.seq > FEED_RETAINED as u64 {
                removes.push(key::feed(id, entry.seq - FEED_RETAINED as u64));
            }
            let record = match entry.item {
                FeedItem::Conversation { conversation, entry: mirrored } => {
                    FeedRecord::Mirror { seq: entry.seq, at: entry.at, conversation, history: mirrored.seq }
                }
                item => FeedRecord::Entry(FeedEntry { seq: entry.seq, at: entry.at, item }),
            };
            put(key::feed(id, entry.seq), encode(&record));
        }
        if dirty.operators.contains(id) {
            put(key::operator(id), encode(&*op));
        }
    }
    for id in dirty.histories.union(&dirty.conversations) {
        let Some(conv) = state.conversations.get_mut(id) else { continue };
        let mut started = false;
        for entry in std::mem::take(&mut conv.pending) {
            if entry.seq == 1 {
                started = true;
                if let Some(visitor) = conv.visitor.id.as_ref() {
                    put(key::visitor(visitor, *id), Vec::new());
                }
            }
            if matches!(entry.item, HistoryItem::Closed { .. }) {
                put(key::closed(&conv.channel, entry.at, *id), Vec::new());
            }
            // Rules 26: a routing shard's close later in the entry reads it (`prefetch`).
            if state.rules >= 26 && matches!(entry.item, HistoryItem::ClientMessage { .. }) {
                state.client_in_entry.entry(*id).or_default().push(entry.clone());
            }
            put(key::history(*id, entry.seq), encode(&entry));
        }
        if dirty.conversations.contains(id) || started {
            put(key::conversation(*id), encode(&*conv));
        }
        if conv.status == ConversationStatus::Closed {
            if dirty.conversations.contains(id) {
                removes.push(key::open(*id));
            }
        } else if started {
            put(key::open(*id), Vec::new());
        }
    }
    for id in &dirty.offers {
        match state.offers.get(id) {
            Some(offer) => put(key::offer(*id), encode(offer)),
            None => removes.push(key::offer(*id)),
        }
    }
    for id in &dirty.offers_across_leaders {
        if state.offers_across_leaders.contains(id) {
            put(key::offer_across_leaders(*id), Vec::new());
        } else {
            removes.push(key::offer_across_leaders(*id));
        }
    }
    for decision in &dirty.decisions {
        put(key::decision(decision.offer), encode(decision));
    }
    for id in &dirty.channels {
        match state.channels.get(id) {
            Some(channel) => put(key::channel(id), encode(channel)),
            None => removes.push(key::channel(id)),
        }
    }
    for login in &dirty.users {
        match state.users.get(login) {
            Some(user) => put(key::user(login), encode(user)),
            None => removes.push(key::user(login)),
        }
    }
    for id in &dirty.templates {
        match state.templates.get(id) {
            Some(template) => put(key::template(id), encode(template)),
            None => removes.push(key::template(id)),
        }
    }
    for attachment in &dirty.attachments {
        put(key::attachment(attachment.conversation, &attachment.id), encode(attachment));
        put(key::attachment_index(&attachment.id), attachment.conversation.0.to_be_bytes().to_vec());
    }
    for (operator, conversation) in &dirty.handled {
        put(key::handled(operator, *conversation), Vec::new());
    }
    for id in &dirty.answered {
        match state.answered_at.get(id) {
            Some(at) => put(key::answered(*id), encode(at)),
            None => removes.push(key::answered(*id)),
        }
    }
    for (group, hour) in &dirty.kpis {
        match state.kpis.get(group).and_then(|hours| hours.get(hour)) {
            Some(kpi) => put(key::kpi(group, *hour), encode(&(group, *hour, kpi))),
            None => removes.push(key::kpi(group, *hour)),
        }
    }
    for node in &dirty.sockets {
        if let Some(report) = state.sockets.get(node) {
            put(key::node_sockets(*node), encode(report));
        }
    }
    for node in &dirty.removed_nodes {
        put(key::removed_node(*node), encode(&()));
    }
    for group in &dirty.holders {
        if let Some(nodes) = state.holders.get(group) {
            put(key::holders(*group), encode(nodes));
        }
    }
    for operator in &dirty.last_seen {
        if let Some(at) = state.last_seen.get(operator) {
            put(key::last_seen(operator), encode(&(operator, *at)));
        }
    }
    for operator in &dirty.presence_reasons {
        match state.presence_reasons.get(operator) {
            Some(reason) => put(key::presence_reason(operator), encode(&(operator, reason))),
            None => removes.push(key::presence_reason(operator)),
        }
    }
    for group in &dirty.group_routing {
        match state.group_routing.get(group) {
            Some(routing) => put(key::group_routing(group), encode(&(group, routing))),
            None => removes.push(key::group_routing(group)),
        }
    }
    for group in &dirty.group_steps {
        match state.group_steps.get(group) {
            Some(steps) => put(key::group_steps(group), encode(&(group, steps))),
            None => removes.push(key::group_steps(group)),
        }
    }
    for group in &dirty.group_hours {
        match state.group_hours.get(group) {
            Some(hours) => put(key::group_hours(group), encode(&(group, hours))),
            None => removes.push(key::group_hours(group)),
        }
    }
    if dirty.channel_weights {
        put(key::CHANNEL_WEIGHTS.to_vec(), encode(&state.channel_weights));
    }
    for id in &dirty.queued_since {
        match state.queued_since.get(id) {
            Some(at) => put(key::queued_since(*id), encode(at)),
            None => removes.push(key::queued_since(*id)),
        }
    }
    for (offer, step) in &dirty.offer_steps {
        put(key::offer_step(*offer), encode(step));
    }
    for channel in &dirty.channel_priority {
        match state.channel_priority.get(channel) {
            Some(priority) => put(key::channel_priority(channel), encode(&(channel, *priority))),
            None => removes.push(key::channel_priority(channel)),
        }
    }
    for operator in &dirty.wrap_up {
        match state.wrap_up.get(operator) {
            Some(until) => put(key::wrap_up(operator), encode(&(operator, *until))),
            None => removes.push(key::wrap_up(operator)),
        }
    }
    for target in &dirty.emergencies {
        match state.emergencies.get(target) {
            Some(e) => put(key::emergency(target), encode(&(target, e))),
            None => removes.push(key::emergency(target)),
        }
    }
    for (n, entry) in &dirty.audit {
        put(key::audit(*n), encode(entry));
    }
    for id in &dirty.sticky {
        match state.sticky.get(id) {
            Some(operator) => put(key::sticky(*id), encode(operator)),
            None => removes.push(key::sticky(*id)),
        }
    }
    for operator in &dirty.operator_skills {
        match state.operator_skills.get(operator) {
            Some(skills) => put(key::operator_skills(operator), encode(&(operator, skills))),
            None => removes.push(key::operator_skills(operator)),
        }
    }
    for operator in &dirty.channel_limits {
        match state.channel_limits.get(operator) {
            Some(limits) => put(key::channel_limits(operator), encode(&(operator, limits))),
            None => removes.push(key::channel_limits(operator)),
        }
    }
    for id in &dirty.activity {
        match state.activity.get(id) {
            Some(act) => put(key::activity(*id), encode(act)),
            None => removes.push(key::activity(*id)),
        }
    }
    for (visitor, served) in &dirty.last_served {
        put(key::last_served(visitor), encode(served));
    }
    for rule in &dirty.access_rules {
        match state.access_rules.get(rule) {
            Some(note) => put(key::access_rule(rule), encode(&(rule, note))),
            None => removes.push(key::access_rule(rule)),
        }
    }
    for channel in &dirty.channel_access {
        if let Some(mode) = state.channel_access.get(channel) {
            put(key::channel_access(channel), encode(&(channel, mode)));
        }
    }
    if dirty.pause_reasons {
        put(key::PAUSE_REASONS.to_vec(), encode(&state.pause_reasons));
    }
    for (operator, hour) in &dirty.pause_totals {
        match state.pause_totals.get(operator).and_then(|hours| hours.get(hour)) {
            Some(reasons) => put(key::pause_totals(operator, *hour), encode(&(operator, *hour, reasons))),
            None => removes.push(key::pause_totals(operator, *hour)),
        }
    }
    for channel in &dirty.channel_adapters {
        match state.channel_adapters.get(channel) {
            Some(adapter) => put(key::channel_adapter(channel), encode(&(channel, adapter))),
            None => removes.push(key::channel_adapter(channel)),
        }
    }
    for channel in &dirty.channel_bots {
        match state.channel_bots.get(channel) {
            Some(b) => put(key::channel_bot(channel), encode(&(channel, b))),
            None => removes.push(key::channel_bot(channel)),
        }
    }
    for channel in &dirty.channel_identity {
        match state.channel_identity.get(channel) {
            Some(k) => put(key::channel_identity(channel), encode(&(channel, k))),
            None => removes.push(key::channel_identity(channel)),
        }
    }
    for (inbound, conversation) in &dirty.inbound {
        put(key::inbound(inbound), encode(conversation));
    }
    for (channel, start_key, taken) in &dirty.start_keys {
        put(key::start_key(channel, start_key), encode(taken));
        put(key::started_by_key(taken.conversation), encode(&(channel, start_key)));
    }
    // A conversation a purge deletes in this entry keeps none of what earlier commands
    // of the entry wrote for its outbox.
    let purged = |c: &ConversationId| dirty.purge && (state.expired.contains(c) || state.deleted.contains(c));
    for (channel, id) in &dirty.provider_ids_gone {
        removes.push(key::provider_id(channel, id));
    }
    for (channel, id, conversation, seq) in &dirty.provider_ids {
        if !purged(conversation) {
            put(key::provider_id(channel, id), encode(&(conversation, seq)));
        }
    }
    for ((conversation, seq), delivery) in &dirty.deliveries {
        if purged(conversation) {
            continue;
        }
        let (open, dead) = (delivery.status.open(), delivery.status.dead());
        let (here, gone) = if open { (b'U', b'M') } else { (b'M', b'U') };
        put(key::delivery(here, *conversation, *seq), encode(delivery));
        removes.push(key::delivery(gone, *conversation, *seq));
        if dead {
            put(key::delivery(b'D', *conversation, *seq), encode(&()));
        } else {
            removes.push(key::delivery(b'D', *conversation, *seq));
        }
    }
    if dirty.purge {
        removes.append(&mut state.expired_keys);
    }
    writes.extend(removes.into_iter().map(|k| (k, None)));
    writes
}

/// Clears what one command's purge loaded (its writes are taken).
pub fn end_command(state: &mut ShardState) {
    state.returning = None;
    state.answered_offer = None;
    state.answered_offer_step = 0;
    state.inbound_seen = None;
    state.start_seen = None;
    state.late_messages.clear();
    state.expired.clear();
    state.expired_keys.clear();
    state.expired_attachments.clear();
}

/// Drops what only the commands just applied needed: the closed conversations among
/// `candidates` (those they named or changed) and the attachments loaded for them.
/// Their records stay.
///
/// Called once the records of those commands are written, not after each command: the
/// commands of one log entry (group commit) are written together after the last of
/// them, so a later command of the entry must find what an earlier one changed in
/// memory, not in the records, which still hold the state before the entry.
pub fn evict(state: &mut ShardState, candidates: &[ConversationId]) {
    for id in candidates {
        if state.conversations.get(id).is_some_and(|c| c.status == ConversationStatus::Closed) {
            state.conversations.remove(id);
        }
    }
    state.attachments.clear();
    state.deleted.clear();
    state.touched_in_entry.clear();
    state.served_in_entry.clear();
    state.inbound_in_entry.clear();
    state.start_in_entry.clear();
    state.client_in_entry.clear();
    state.cold_deliveries.clear();
}

/// Notes the conversations a command of the entry being applied wrote for (read before
/// `take_writes`): those it named or changed, and those whose channel deliveries it
/// changed (a retry, a receipt, a channel's dead letters), which a purge later in the
/// entry leaves to the next one (rules 16).
pub fn touched(state: &mut ShardState, candidates: &[ConversationId]) {
    let deliveries: Vec<ConversationId> = state.dirty.deliveries.keys().map(|(conversation, _)| *conversation).collect();
    state.touched_in_entry.extend(candidates.iter().copied().chain(deliveries));
}

/// The conversations a command may leave closed in memory: those it names, plus those
/// its events changed (`state.dirty`, read before `take_writes`).
pub fn eviction_candidates(state: &ShardState, command: &Command) -> Vec<ConversationId> {
    let mut ids = named_conversations(command);
    ids.extend(state.dirty.conversations.iter().copied());
    ids
}

/// The sequence number of the last record under `prefix` whose key ends in a `u64`.
fn last_seq(store: &dyn Store, prefix: &[u8]) -> Result<u64, Error> {
    Ok(store
        .last(prefix)
        .map_err(store_err)?
        .and_then(|(k, _)| k.len().checked_sub(8).and_then(|at| <[u8; 8]>::try_from(&k[at..]).ok()))
        .map_or(0, u64::from_be_bytes))
}

/// The conversation a channel message (its inbound key, `core::inbound_key`) went to,
/// while that conversation is kept: what the core deduplicates a redelivery on.
pub fn inbound_conversation(store: &dyn Store, inbound_key: &str) -> Result<Option<ConversationId>, Error> {
    get(store, &key::inbound(inbound_key))
}

/// Loads a conversation from the records. Its record is not rewritten for every
/// message: the newest history entry gives `last_seq`. With `keys`, its idempotency keys
/// too, which are those of the messages in its history.
pub fn load_conversation(store: &dyn Store, id: ConversationId, keys: bool) -> Result<Option<Conversation>, Error> {
    let Some(mut conv) = get::<Conversation>(store, &key::conversation(id))? else { return Ok(None) };
    conv.last_seq = conv.last_seq.max(last_seq(store, &key::history_prefix(id))?);
    if keys {
        let taken = std::sync::Arc::make_mut(&mut conv.keys);
        for (_, entry) in all::<HistoryEntry>(store, &key::history_prefix(id))? {
            match entry.item {
                HistoryItem::ClientMessage { key, text, .. } => {
                    taken.insert(key, entry.seq);
                    conv.client_text_bytes += text.len() as u64;
                }
                HistoryItem::OperatorMessage { key, text, .. } | HistoryItem::Note { key, text, .. } | HistoryItem::BotMessage { key, text, .. } => {
                    taken.insert(key, entry.seq);
                    conv.staff_text_bytes += text.len() as u64;
                }
                _ => {}
            }
        }
    }
    Ok(Some(conv))
}

/// The conversations a command names (other than through an offer).
fn named_conversations(command: &Command) -> Vec<ConversationId> {
    match command {
        Command::PostClientMessage { conversation, .. }
        | Command::CloseByClient { conversation }
        | Command::Rate { conversation, .. }
        | Command::PostOperatorMessage { conversation, .. }
        | Command::Transfer { conversation, .. }
        | Command::CloseByOperator { conversation, .. }
        | Command::Reassign { conversation, .. }
        | Command::MarkRead { conversation, .. }
        | Command::AddNote { conversation, .. }
        | Command::BotReply { conversation, .. }
        | Command::Handoff { conversation, .. }
        | Command::CloseByBot { conversation, .. } => vec![*conversation],
        Command::StoreAttachment(attachment) => vec![attachment.conversation],
        Command::Deliver { mail, .. } => mail.conversations(),
        _ => vec![],
    }
}

/// Whether deciding `command` may need records the hot state does not hold (a closed
/// conversation, attachments). Such a command is not answered early by
/// [`crate::core::precheck`]: the commit, which loads them, decides.
pub fn needs_records(state: &ShardState, command: &Command) -> bool {
    let cold = named_conversations(command).iter().any(|id| !state.conversations.contains_key(id));
    let files = match command {
        Command::PostClientMessage { attachments, .. } | Command::PostOperatorMessage { attachments, .. } => !attachments.is_empty(),
        Command::StoreAttachment(_) | Command::PurgeExpired { .. } | Command::ChannelInbound { .. } | Command::ChannelInboundRich { .. } | Command::StartConversationOnce { .. } => true,
        Command::RetryDelivery { conversation, seq, .. } => !state.outbox.contains_key(&(*conversation, *seq)),
        Command::AcceptOfferAt { offer, .. } => !state.offers.contains_key(offer),
        Command::DeliveryResults { results } => results.iter().any(|r| !state.outbox.contains_key(&(r.conversation, r.seq))),
        _ => false,
    };
    cold || files
}

/// Brings into memory what `command` may read and the hot state does not hold: a
/// closed conversation it names and the attachments of that conversation.
pub fn prefetch(state: &mut ShardState, store: &dyn Store, command: &Command) -> Result<(), Error> {
    for id in named_conversations(command) {
        // Deleted by a purge earlier in this entry: its records go with the entry.
        if state.deleted.contains(&id) {
            continue;
        }
        if !state.conversations.contains_key(&id) {
            // Rules 20: with its keys whatever the command: it stays in memory for the
            // rest of the entry, where a later command (a retried note or message) must
            // find them (loaded without them, a retry was written twice or refused).
            let keyed = matches!(command, Command::PostClientMessage { .. } | Command::PostOperatorMessage { .. } | Command::AddNote { .. });
            if let Some(conv) = load_conversation(store, id, keyed || state.rules >= 20)? {
                state.conversations.insert(id, conv);
            }
        }
        // A message looks up only the attachments it lists (`core::check_message`): one
        // without any needs no scan of its conversation's attachment records.
        let files = match command {
            Command::PostClientMessage { attachments, .. } | Command::PostOperatorMessage { attachments, .. } => !attachments.is_empty(),
            Command::StoreAttachment(_) => true,
            _ => false,
        };
        if files {
            for (_, attachment) in all::<Attachment>(store, &key::attachments_prefix(id))? {
                state.attachments.insert(attachment.id.clone(), attachment);
            }
        }
    }
    if let Command::PurgeExpired { as_of } = command {
        find_expired(state, store, *as_of)?;
    }
    if let Command::AcceptOfferAt { offer, .. } = command {
        // An offer is made and expires in different entries (its deadline lies between),
        // so its decision record is written by the time it is answered late.
        if !state.offers.contains_key(offer) {
            state.answered_offer = get::<DecisionRecord>(store, &key::decision(*offer))?;
            state.answered_offer_step = get::<u32>(store, &key::offer_step(*offer))?.unwrap_or(0);
        }
    }
    // A routing shard deletes what it holds of the conversations a conversation shard
    // purged (a repeated letter is dropped by `core` without deleting anything).
    if let Command::Deliver { from, id, mail: crate::mail::Mail::Purged { conversations } } = command {
        if state.mail_in.expects(*from, *id) == crate::mail::Receipt::Apply {
            for conversation in conversations {
                if get::<Conversation>(store, &key::conversation(*conversation))?.is_some() {
                    collect_conversation_keys(state, store, *conversation)?;
                    // Rules 16: history an earlier command of this entry wrote for it (a
                    // rating's letter) is not in the records yet: its keys go too.
                    if state.rules >= 16 && state.touched_in_entry.contains(conversation) {
                        let stored = last_seq(store, &key::history_prefix(*conversation))?;
                        let now = state.conversations.get(conversation).map_or(stored, |c| c.last_seq());
                        state.expired_keys.extend((stored + 1..=now).map(|seq| key::history(*conversation, seq)));
                    }
                    state.expired.push(*conversation);
                }
            }
        }
    }
    // Rules 26: a routing shard's close, with when it was decided: the customer's
    // messages its conversation took since, which nobody read (`core::carry_late`). Entry
    // times only grow, so the walk back through the history stops at the first before it.
    if let Command::Deliver { from, id, mail: crate::mail::Mail::ClosedAt { conversation, at, .. } } = command {
        if state.rules >= 26 && state.mail_in.expects(*from, *id) == crate::mail::Receipt::Apply {
            let mut late = Vec::new();
            let mut seq = last_seq(store, &key::history_prefix(*conversation))?;
            let oldest = seq.saturating_sub(crate::core::MAX_LATE_ENTRIES);
            while seq > oldest {
                let Some(entry) = get::<HistoryEntry>(store, &key::history(*conversation, seq))? else { break };
                if entry.at < *at {
                    break;
                }
                late.push(entry);
                seq -= 1;
            }
            late.reverse();
            late.extend(state.client_in_entry.get(conversation).into_iter().flatten().filter(|e| e.at >= *at).cloned());
            late.retain(|e| matches!(e.item, HistoryItem::ClientMessage { .. }));
            state.late_messages = late;
        }
    }
    if let Command::StartConversationOnce { key, channel, .. } = command {
        let taken = start_taken(state, store, channel, key)?;
        // A purge earlier in this entry deleted it: the records still hold it.
        state.start_seen = taken.filter(|t| !state.deleted.contains(&t.conversation));
    }
    if let Command::StartConversation { visitor: Visitor { id: Some(visitor), .. }, .. } | Command::StartConversationOnce { visitor: Visitor { id: Some(visitor), .. }, .. } = command {
        // A close earlier in this entry is not in the records yet.
        let served = match state.served_in_entry.get(visitor) {
            Some(served) => Some(served.clone()),
            None => get::<(OperatorId, Timestamp, ConversationId)>(store, &key::last_served(visitor))?,
        };
        state.returning = served.map(|(operator, at, _)| (operator, at));
    }
    if let Command::ChannelInbound { channel, sender, .. } | Command::ChannelInboundRich { channel, sender, .. } = command {
        // Rules 15: a messenger, email or Channel API customer whose message opens a new
        // conversation (none of theirs is open) is a returning customer too.
        let thread = match command {
            Command::ChannelInboundRich { thread, .. } => *thread,
            _ => None,
        };
        if state.rules >= 15 && crate::core::inbound_target(state, channel, sender, thread).is_none() {
            let visitor = format!("{channel}:{sender}");
            let served = match state.served_in_entry.get(&visitor) {
                Some(served) => Some(served.clone()),
                None => get::<(OperatorId, Timestamp, ConversationId)>(store, &key::last_served(&visitor))?,
            };
            state.returning = served.map(|(operator, at, _)| (operator, at));
        }
    }
    if let Command::ChannelInboundRich { channel, sender, files, thread, .. } = command {
        // The files a message adds count against its conversation's room.
        if !files.is_empty() {
            if let Some(target) = crate::core::inbound_target(state, channel, sender, *thread) {
                for (_, attachment) in all::<Attachment>(store, &key::attachments_prefix(target))? {
                    state.attachments.insert(attachment.id.clone(), attachment);
                }
            }
        }
    }
    if let Command::ChannelInbound { channel, sender, provider_message_id, .. } | Command::ChannelInboundRich { channel, sender, provider_message_id, .. } = command {
        let key = crate::core::inbound_key(channel, sender, provider_message_id);
        state.inbound_seen = match state.inbound_in_entry.get(&key) {
            Some(conversation) => Some(*conversation),
            None => get::<ConversationId>(store, &key::inbound(&key))?,
        };
    }
    let named: Vec<(ConversationId, u64)> = match command {
        Command::RetryDelivery { conversation, seq, .. } => vec![(*conversation, *seq)],
        Command::DeliveryResults { results } => results.iter().map(|r| (r.conversation, r.seq)).collect(),
        _ => Vec::new(),
    };
    for k in named {
        if state.outbox.contains_key(&k) || state.cold_deliveries.contains_key(&k) || state.deleted.contains(&k.0) {
            continue;
        }
        // Changed earlier in this entry: the records still hold the state before it.
        let found = match state.dirty.deliveries.get(&k) {
            Some(d) => Some(d.clone()),
            None => get::<Delivery>(store, &key::delivery(b'M', k.0, k.1))?,
        };
        if let Some(d) = found {
            state.cold_deliveries.insert(k, d);
        }
    }
    if let Command::StoreAttachment(attachment) = command {
        if let Some(found) = find_attachment(store, &attachment.id)? {
            state.attachments.insert(found.id.clone(), found);
        }
    }
    Ok(())
}

/// The closed conversations past their channel's retention as of `as_of` (at most
/// [`PURGE_BATCH`]), with the keys of every record they hold and their attachments.
fn find_expired(state: &mut ShardState, store: &dyn Store, as_of: Timestamp) -> Result<(), Error> {
    let retention: Vec<(ChannelId, u32)> = state.channel_retention.iter().map(|(c, d)| (c.clone(), *d)).collect();
    for (channel, days) in retention {
        let cutoff = as_of.0.saturating_sub(u64::from(days) * 86_400_000);
        let prefix = key::closed_prefix(&channel);
        let room = PURGE_BATCH.saturating_sub(state.expired.len());
        if room == 0 {
            break;
        }
        for (k, _) in store.scan(&prefix, None, room).map_err(store_err)? {
            let tail = &k[prefix.len()..];
            let (Ok(at), Ok(id)) = (<[u8; 8]>::try_from(&tail[..8.min(tail.len())]), <[u8; 8]>::try_from(&tail[8.min(tail.len())..])) else {
                continue;
            };
            if u64::from_be_bytes(at) >= cutoff {
                break;
            }
            let id = ConversationId(u64::from_be_bytes(id));
            // Rules 16: one an earlier command of this entry named (a rating, a note)
            // waits for the next purge: the records hold nothing of what it wrote yet,
            // so its new records would outlive the purge.
            if state.rules >= 16 && state.touched_in_entry.contains(&id) {
                continue;
            }
            if state.rules >= 15 && !state.expired.is_empty() && state.expired_keys.len() >= PURGE_KEYS {
                return Ok(());
            }
            state.expired_keys.push(k.clone());
            collect_conversation_keys(state, store, id)?;
            state.expired.push(id);
        }
    }
    Ok(())
}

/// What a keyed start in `channel` with `start_key` opened: taken earlier in this log
/// entry (the records do not say so yet), else records `+` `k`. A record of the first
/// builds with keyed starts holds the conversation alone: read as taken by no visitor
/// at time 0, which no copy matches.
fn start_taken(state: &ShardState, store: &dyn Store, channel: &ChannelId, start_key: &str) -> Result<Option<crate::state::StartTaken>, Error> {
    if let Some(taken) = state.start_in_entry.get(&(channel.clone(), start_key.to_owned())) {
        return Ok(Some(taken.clone()));
    }
    let Some(bytes) = store.get(&key::start_key(channel, start_key)).map_err(store_err)? else { return Ok(None) };
    match decode::<crate::state::StartTaken>(&bytes) {
        Ok(taken) => Ok(Some(taken)),
        Err(e) => match decode::<ConversationId>(&bytes) {
            Ok(conversation) if bytes.len() <= 11 => Ok(Some(crate::state::StartTaken { conversation, visitor: None, at: Timestamp(0) })),
            _ => Err(e),
        },
    }
}

fn collect_conversation_keys(state: &mut ShardState, store: &dyn Store, id: ConversationId) -> Result<(), Error> {
    if let Some(conv) = get::<Conversation>(store, &key::conversation(id))? {
        state.expired_keys.extend(conv.decisions.iter().map(|offer| key::decision(*offer)));
        state.expired_keys.extend(conv.decisions.iter().map(|offer| key::offer_step(*offer)));
        if let Some(visitor) = conv.visitor.id.as_ref() {
            state.expired_keys.push(key::visitor(visitor, id));
        }
        state.expired_keys.extend(conv.handled_by.iter().map(|op| key::handled(op, id)));
        // Who served the visitor last goes with that conversation (sticky routing forgets).
        if let Some(visitor) = conv.visitor.id.as_ref() {
            // Rules 16: a close earlier in this entry named who served the visitor since;
            // the records do not say so yet.
            let served = match state.served_in_entry.get(visitor).filter(|_| state.rules >= 16) {
                Some((_, _, c)) => Some(*c),
                None => get::<(OperatorId, Timestamp, ConversationId)>(store, &key::last_served(visitor))?.map(|(_, _, c)| c),
            };
            if served == Some(id) {
                state.expired_keys.push(key::last_served(visitor));
            }
        }
    }
    state.expired_keys.push(key::conversation(id));
    state.expired_keys.push(key::open(id));
    // A keyed start's key goes with the conversation it opened (unless a later start
    // took the key since).
    if let Some((channel, start_key)) = get::<(ChannelId, String)>(store, &key::started_by_key(id))? {
        if start_taken(state, store, &channel, &start_key)?.is_some_and(|t| t.conversation == id) {
            state.expired_keys.push(key::start_key(&channel, &start_key));
        }
        state.expired_keys.push(key::started_by_key(id));
    }
    let channel = get::<Conversation>(store, &key::conversation(id))?.map(|c| c.channel);
    for prefix in [key::history_prefix(id), key::attachments_prefix(id)] {
        for (k, v) in scan_all(store, &prefix)? {
            if k.first() == Some(&b'a') {
                let attachment: Attachment = decode(&v)?;
                // Rules 26: a file carried into a new conversation (`core::carry_late`)
                // is that one's now, and goes with it.
                let moved = state.rules >= 26
                    && match state.attachments.get(&attachment.id) {
                        Some(now) => now.conversation != id,
                        None => store.get(&key::attachment_index(&attachment.id)).map_err(store_err)?.is_some_and(|to| to != id.0.to_be_bytes()),
                    };
                if !moved {
                    state.expired_keys.push(key::attachment_index(&attachment.id));
                    state.expired_attachments.push(attachment.id);
                }
            }
            // A channel's inbound message remembers its provider id as long as it is kept.
            if k.first() == Some(&b'h') {
                if let (Some(channel), Ok(entry)) = (channel.as_ref(), decode::<HistoryEntry>(&v)) {
                    if let HistoryItem::ClientMessage { key: message_key, .. } = &entry.item {
                        if message_key.strip_prefix(channel.as_str()).is_some_and(|rest| rest.starts_with(':')) {
                            state.expired_keys.push(key::inbound(message_key));
                        }
                    }
                    // Rules 11: its place in the closed index goes too. A conversation
                    // shard found it there; a routing shard, which writes the index as
                    // well and never reads it, kept it for ever before.
                    if state.rules >= 11 && matches!(entry.item, HistoryItem::Closed { .. }) {
                        state.expired_keys.push(key::closed(channel, entry.at, id));
                    }
                }
            }
            state.expired_keys.push(k);
        }
    }
    for tag in [b'U', b'M', b'D'] {
        for (k, v) in scan_all(store, &with_conversation(tag, id))? {
            if tag == b'M' {
                if let Ok(Delivery { channel, provider_id: Some(pid), .. }) = decode::<Delivery>(&v) {
                    state.expired_keys.push(key::provider_id(&channel, &pid));
                }
            }
            state.expired_keys.push(k);
        }
    }
    Ok(())
}

pub fn find_attachment(store: &dyn Store, id: &AttachmentId) -> Result<Option<Attachment>, Error> {
    let Some(conv) = store.get(&key::attachment_index(id)).map_err(store_err)? else { return Ok(None) };
    let conv = <[u8; 8]>::try_from(conv.as_slice()).map_err(|_| Error::Storage("a damaged attachment index".into()))?;
    get(store, &key::attachment(ConversationId(u64::from_be_bytes(conv)), id))
}

/// Every conversation's attachment records in key order, from the key after `after` (a
/// key this returned before), at most `limit`: the files a holder of the shard keeps.
pub fn attachments_page(store: &dyn Store, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Attachment)>, Error> {
    let page = store.scan(b"a", after, limit).map_err(store_err)?;
    page.into_iter().map(|(k, v)| Ok((k, decode(&v)?))).collect()
}

pub fn attachments_of(store: &dyn Store, conversation: ConversationId) -> Result<Vec<Attachment>, Error> {
    Ok(all::<Attachment>(store, &key::attachments_prefix(conversation))?.into_iter().map(|(_, a)| a).collect())
}

/// History entries of a conversation after `after`, at most `limit`.
pub fn history(store: &dyn Store, conversation: ConversationId, after: u64, limit: usize) -> Result<Vec<HistoryEntry>, Error> {
    let prefix = key::history_prefix(conversation);
    let start = key::history(conversation, after);
    let page = store.scan(&prefix, Some(&start), limit).map_err(store_err)?;
    page.iter().map(|(_, v)| decode(v)).collect()
}

/// Feed entries of an operator after `after`, at most `limit`. An entry about a
/// conversation that was deleted (retention) is left out: a mirrored history entry, and
/// an offer (with the visitor's name), a withdrawal, an assignment, a release or a
/// delivery's outcome (with its failure's reason, which may name the customer's
/// address) that the feed keeps whole until 4,096 newer entries push it out.
pub fn feed(store: &dyn Store, operator: &OperatorId, after: u64, limit: usize) -> Result<Vec<FeedEntry>, Error> {
    let prefix = key::feed_prefix(operator);
    let mut cursor = key::feed(operator, after);
    let mut out = Vec::new();
    let mut kept: std::collections::HashMap<ConversationId, bool> = std::collections::HashMap::new();
    let mut still_kept = |conversation: ConversationId| -> Result<bool, Error> {
        if let Some(known) = kept.get(&conversation) {
            return Ok(*known);
        }
        let known = store.get(&key::conversation(conversation)).map_err(store_err)?.is_some();
        kept.insert(conversation, known);
        Ok(known)
    };
    // Pages until `limit` entries are found: skipped mirrors must not end a page empty
    // while entries follow (a reader would wait there for good).
    loop {
        let page = store.scan(&prefix, Some(&cursor), limit.saturating_sub(out.len()).max(1)).map_err(store_err)?;
        let Some((last, _)) = page.last() else { return Ok(out) };
        cursor = last.clone();
        for (_, value) in page {
            match decode::<FeedRecord>(&value)? {
                FeedRecord::Entry(entry) => {
                    let about = match &entry.item {
                        FeedItem::Offered { conversation, .. }
                        | FeedItem::OfferWithdrawn { conversation, .. }
                        | FeedItem::Assigned { conversation, .. }
                        | FeedItem::Conversation { conversation, .. }
                        | FeedItem::Released { conversation }
                        | FeedItem::Delivery { conversation, .. } => Some(*conversation),
                        FeedItem::PresenceChanged { .. } | FeedItem::Configured { .. } | FeedItem::PresenceSet { .. } | FeedItem::WrapUp { .. } => None,
                    };
                    if about.map_or(Ok(true), &mut still_kept)? {
                        out.push(entry);
                    }
                }
                FeedRecord::Mirror { seq, at, conversation, history } => {
                    if let Some(entry) = get::<HistoryEntry>(store, &key::history(conversation, history))? {
                        out.push(FeedEntry { seq, at, item: FeedItem::Conversation { conversation, entry } });
                    }
                }
            }
        }
        if out.len() >= limit {
            return Ok(out);
        }
    }
}

/// The conversations `operator` handled, newest first: up to `limit` ids after
/// `before` (exclusive; `None` starts at the newest).
pub fn handled_by(store: &dyn Store, operator: &OperatorId, before: Option<ConversationId>, limit: usize) -> Result<Vec<ConversationId>, Error> {
    let prefix = key::handled_prefix(operator);
    let after = before.map(|id| key::handled(operator, id));
    Ok(store
        .scan(&prefix, after.as_deref(), limit)
        .map_err(store_err)?
        .into_iter()
        .filter_map(|(k, _)| <[u8; 8]>::try_from(&k[prefix.len()..]).ok())
        .map(|id| ConversationId(!u64::from_be_bytes(id)))
        .collect())
}

/// The newest audit trail entries, newest first, at most `limit`, with their numbers;
/// with `before`, those numbered below it.
pub fn audit(store: &dyn Store, before: Option<u64>, limit: usize) -> Result<Vec<(u64, AuditEntry)>, Error> {
    // Keys hold the complement of the number: the next key after entry `n` is `n - 1`.
    let after = before.map(key::audit);
    store
        .scan(b"Z", after.as_deref(), limit)
        .map_err(store_err)?
        .into_iter()
        .map(|(k, v)| {
            let n = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged audit key".into()))?;
            Ok((!u64::from_be_bytes(n), decode(&v)?))
        })
        .collect()
}

/// A visitor's most recent conversations, newest first, at most `limit`.
pub fn conversations_of(store: &dyn Store, visitor: &str, limit: usize) -> Result<Vec<Conversation>, Error> {
    let prefix = key::visitor_prefix(visitor);
    // Newest first, read no further than asked: a visitor may have thousands.
    let ids: Vec<ConversationId> = store
        .newest(&prefix, limit)
        .map_err(store_err)?
        .into_iter()
        .filter_map(|(k, _)| <[u8; 8]>::try_from(&k[prefix.len()..]).ok())
        .map(|id| ConversationId(u64::from_be_bytes(id)))
        .collect();
    let mut out = Vec::new();
    for id in ids {
        if let Some(conv) = get::<Conversation>(store, &key::conversation(id))? {
            out.push(conv);
        }
    }
    Ok(out)
}

pub fn decision(store: &dyn Store, offer: OfferId) -> Result<Option<DecisionRecord>, Error> {
    get(store, &key::decision(offer))
}

fn delivery_key(k: &[u8]) -> Option<(ConversationId, u64)> {
    let id = <[u8; 8]>::try_from(k.get(1..9)?).ok()?;
    let seq = <[u8; 8]>::try_from(k.get(9..17)?).ok()?;
    Some((ConversationId(u64::from_be_bytes(id)), u64::from_be_bytes(seq)))
}

/// An outbox entry as the records hold it: still to be sent (`U`) or final (`M`).
pub fn delivery(store: &dyn Store, conversation: ConversationId, seq: u64) -> Result<Option<Delivery>, Error> {
    match get(store, &key::delivery(b'U', conversation, seq))? {
        Some(d) => Ok(Some(d)),
        None => get(store, &key::delivery(b'M', conversation, seq)),
    }
}

/// The outbox entries of a conversation, by history seq.
pub fn deliveries_of(store: &dyn Store, conversation: ConversationId) -> Result<Vec<(u64, Delivery)>, Error> {
    let mut out = Vec::new();
    for tag in [b'U', b'M'] {
        for (k, d) in all::<Delivery>(store, &with_conversation(tag, conversation))? {
            if let Some((_, seq)) = delivery_key(&k) {
                out.push((seq, d));
            }
        }
    }
    out.sort_by_key(|(seq, _)| *seq);
    Ok(out)
}

/// The sent outbox entry a channel's provider knows by `id`.
pub fn by_provider_id(store: &dyn Store, channel: &ChannelId, id: &str) -> Result<Option<(ConversationId, u64)>, Error> {
    get(store, &key::provider_id(channel, id))
}

/// Dead-lettered outbox entries, oldest conversation first (then by seq), after the
/// entry `after` when given, at most `limit`.
pub fn dead_letters(store: &dyn Store, after: Option<(ConversationId, u64)>, limit: usize) -> Result<Vec<(ConversationId, u64, Delivery)>, Error> {
    let mut out = Vec::new();
    let after = after.map(|(conversation, seq)| key::delivery(b'D', conversation, seq));
    for (k, _) in store.scan(b"D", after.as_deref(), limit).map_err(store_err)? {
        let Some((conversation, seq)) = delivery_key(&k) else { continue };
        if let Some(d) = get::<Delivery>(store, &key::delivery(b'M', conversation, seq))? {
            out.push((conversation, seq, d));
        }
    }
    Ok(out)
}

/// The routing step an offer was made under, when its group had steps (rules 6).
pub fn offer_step(store: &dyn Store, offer: OfferId) -> Result<Option<u32>, Error> {
    get(store, &key::offer_step(offer))
}

/// The hot state, rebuilt from the records.
pub fn load(store: &dyn Store) -> Result<ShardState, Error> {
    let mut state = ShardState::default();
    if let Some(meta) = get::<Meta>(store, key::META)? {
        state.next_conversation = meta.next_conversation;
        state.next_offer = meta.next_offer;
        state.next_ticket = meta.next_ticket;
        state.rules = meta.rules;
        state.session_epochs = meta.session_epochs;
        state.channel_public_groups = meta.channel_public_groups;
        state.channel_retention = meta.channel_retention;
    }
    if let Some(at) = get::<Timestamp>(store, key::CLOCK)? {
        state.last_at = at;
    }
    let mut applied = Vec::new();
    for (k, v) in scan_all(store, b"i")? {
        let (Some(&kind), Ok(group)) = (k.get(1), <[u8; 8]>::try_from(&k[2.min(k.len())..])) else { continue };
        let (group, last) = (u64::from_be_bytes(group), decode::<u64>(&v)?);
        match kind {
            b'o' => {
                let mut pending = Vec::new();
                for (k, v) in scan_all(store, &key::letters_prefix(group))? {
                    let id = <[u8; 8]>::try_from(&k[9.min(k.len())..]).map_err(|_| Error::Storage("a damaged letter key".into()))?;
                    pending.push((u64::from_be_bytes(id), decode::<crate::mail::Mail>(&v)?));
                }
                state.mail_out.insert(group, crate::mail::Outbox::restore(last, pending));
            }
            _ => applied.push((group, last)),
        }
    }
    state.mail_in = crate::mail::Inbox::restore(applied);
    for (_, config) in all::<SkillGroupConfig>(store, b"g")? {
        state.groups.insert(config.id.clone(), SkillGroup { config, queue: Default::default() });
    }
    for (_, mut op) in all::<Operator>(store, b"o")? {
        // Not rewritten for every feed entry: the newest entry gives the position.
        op.feed.last_seq = op.feed.last_seq.max(last_seq(store, &key::feed_prefix(&op.config.id))?);
        state.operators.insert(op.config.id.clone(), op);
    }
    for (_, channel) in all::<ChannelConfig>(store, b"n")? {
        state.channels.insert(channel.id.clone(), channel);
    }
    for (_, user) in all::<UserRecord>(store, b"u")? {
        state.users.insert(user.login.clone(), user);
    }
    for (_, template) in all::<Template>(store, b"t")? {
        state.templates.insert(template.id.clone(), template);
    }
    for (_, offer) in all::<Offer>(store, b"x")? {
        state.offers.insert(offer.id, offer);
    }
    for (k, _) in scan_all(store, b"%")? {
        let id = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged key of an offer pending across leaders".into()))?;
        state.offers_across_leaders.insert(OfferId(u64::from_be_bytes(id)));
    }
    for (k, at) in all::<Timestamp>(store, b"j")? {
        let id = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged answer-time key".into()))?;
        state.answered_at.insert(ConversationId(u64::from_be_bytes(id)), at);
    }
    for (k, report) in all::<NodeSockets>(store, b"p")? {
        let node = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged socket-report key".into()))?;
        state.sockets.insert(u64::from_be_bytes(node), report);
    }
    for (k, nodes) in all::<std::collections::BTreeSet<u64>>(store, b"#")? {
        let group = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged holders key".into()))?;
        state.holders.insert(u64::from_be_bytes(group), nodes);
    }
    for (k, ()) in all::<()>(store, b"!")? {
        let node = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged removed-node key".into()))?;
        state.removed_nodes.insert(u64::from_be_bytes(node));
    }
    for (_, (operator, at)) in all::<(OperatorId, Timestamp)>(store, b"l")? {
        state.last_seen.insert(operator, at);
    }
    for (_, (operator, reason)) in all::<(OperatorId, String)>(store, b"z")? {
        state.presence_reasons.insert(operator, reason);
    }
    for (_, (operator, skills)) in all::<(OperatorId, BTreeMap<String, u8>)>(store, b"J")? {
        state.operator_skills.insert(operator, skills);
    }
    for (_, (operator, limits)) in all::<(OperatorId, ChannelLimits)>(store, b"L")? {
        state.channel_limits.insert(operator, limits);
    }
    for (k, act) in all::<Activity>(store, b"T")? {
        let id = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged activity key".into()))?;
        state.activity.insert(ConversationId(u64::from_be_bytes(id)), act);
    }
    for (k, operator) in all::<OperatorId>(store, b"X")? {
        let id = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged sticky key".into()))?;
        state.sticky.insert(ConversationId(u64::from_be_bytes(id)), operator);
    }
    for (_, (rule, note)) in all::<(AccessRule, crate::access::RuleNote)>(store, b"R")? {
        state.access_rules.insert(rule, note);
    }
    for (_, (channel, mode)) in all::<(ChannelId, crate::access::ChannelAccess)>(store, b"S")? {
        state.channel_access.insert(channel, mode);
    }
    for (_, (target, emergency)) in all::<(NoticeTarget, Emergency)>(store, b"E")? {
        state.emergencies.insert(target, emergency);
    }
    // The newest audit entry is the first key under `Z` (numbers inverted).
    if let Some((k, _)) = store.scan(b"Z", None, 1).map_err(store_err)?.into_iter().next() {
        let n = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged audit key".into()))?;
        state.audit_next = !u64::from_be_bytes(n) + 1;
    }
    if let Some(reasons) = get::<Vec<String>>(store, key::PAUSE_REASONS)? {
        state.pause_reasons = reasons;
    }
    for (_, (operator, hour, reasons)) in all::<(OperatorId, u64, BTreeMap<String, u64>)>(store, b"P")? {
        state.pause_totals.entry(operator).or_default().insert(hour, reasons);
    }
    for (_, (group, routing)) in all::<(SkillGroupId, GroupRouting)>(store, b"y")? {
        state.group_routing.insert(group, routing);
    }
    for (_, (group, steps)) in all::<(SkillGroupId, Vec<RoutingStep>)>(store, b"G")? {
        state.group_steps.insert(group, steps);
    }
    for (_, (group, hours)) in all::<(SkillGroupId, OpeningHours)>(store, b"H")? {
        state.group_hours.insert(group, hours);
    }
    if let Some(weights) = get::<BTreeMap<String, u32>>(store, key::CHANNEL_WEIGHTS)? {
        state.channel_weights = weights;
    }
    for (k, at) in all::<Timestamp>(store, b"Q")? {
        let id = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged queue-time key".into()))?;
        state.queued_since.insert(ConversationId(u64::from_be_bytes(id)), at);
    }
    for (_, (channel, priority)) in all::<(ChannelId, u32)>(store, b"Y")? {
        state.channel_priority.insert(channel, priority);
    }
    for (_, (operator, until)) in all::<(OperatorId, Timestamp)>(store, b"W")? {
        state.wrap_up.insert(operator, until);
    }
    for (_, (group, hour, kpi)) in all::<(SkillGroupId, u64, GroupKpi)>(store, b"K")? {
        state.kpis.entry(group).or_default().insert(hour, kpi);
    }
    let open = store.scan(b"q", None, usize::MAX).map_err(store_err)?;
    for (k, _) in open {
        let id = <[u8; 8]>::try_from(&k[1..]).map_err(|_| Error::Storage("a damaged open-conversation key".into()))?;
        let id = ConversationId(u64::from_be_bytes(id));
        let Some(conv) = load_conversation(store, id, true)? else { continue };
        if let ConversationStatus::Queued { ticket, .. } = conv.status {
            if let Some(group) = state.groups.get_mut(&conv.group) {
                group.queue.insert((ticket, id));
            }
        }
        if let Some(visitor) = &conv.visitor.id {
            state.open_senders.insert((conv.channel.clone(), visitor.clone()), id);
        }
        state.conversations.insert(id, conv);
    }
    for (_, (channel, adapter)) in all::<(ChannelId, AdapterConfig)>(store, b"C")? {
        state.channel_adapters.insert(channel, adapter);
    }
    for (_, (channel, b)) in all::<(ChannelId, BotConfig)>(store, b"r")? {
        state.channel_bots.insert(channel, b);
    }
    for (_, (channel, k)) in all::<(ChannelId, IdentityKey)>(store, b"b")? {
        state.channel_identity.insert(channel, k);
    }
    for (k, delivery) in all::<Delivery>(store, b"U")? {
        let entry = delivery_key(&k).ok_or_else(|| Error::Storage("a damaged outbox key".into()))?;
        state.outbox.insert(entry, delivery);
    }
    Ok(state)
}

fn with_conversation(tag: u8, id: ConversationId) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// The snapshot format of builds that kept the whole state in memory (JSON).
#[derive(Deserialize)]
struct LegacySnapshot {
    v: u16,
    state: serde_json::Value,
}

/// Turns a legacy snapshot (the whole shard state as one JSON value) into records.
pub fn import_legacy(bytes: &[u8]) -> Result<Writes, Error> {
    let legacy: LegacySnapshot =
        serde_json::from_slice(bytes).map_err(|e| Error::Storage(format!("the legacy snapshot cannot be read: {e}")))?;
    if legacy.v != 1 {
        return Err(Error::Storage(format!("unknown legacy snapshot version {}", legacy.v)));
    }
    let raw = legacy.state;
    let bad = |what: &str, e: serde_json::Error| Error::Storage(format!("the legacy snapshot's {what} cannot be read: {e}"));
    let mut state: ShardState = serde_json::from_value(raw.clone()).map_err(|e| bad("state", e))?;
    let field = |name: &str| raw.get(name).cloned().unwrap_or(serde_json::Value::Null);

    #[derive(Deserialize)]
    struct LegacyConversation {
        id: ConversationId,
        #[serde(default)]
        history: Vec<HistoryEntry>,
        #[serde(default)]
        keys: BTreeMap<String, u64>,
    }
    let conversations: BTreeMap<String, LegacyConversation> =
        serde_json::from_value(field("conversations")).map_err(|e| bad("conversations", e))?;
    for legacy_conv in conversations.into_values() {
        let Some(conv) = state.conversations.get_mut(&legacy_conv.id) else { continue };
        conv.last_seq = legacy_conv.history.last().map_or(0, |e| e.seq);
        conv.rated = legacy_conv.history.iter().any(|e| matches!(e.item, HistoryItem::Rated { .. }));
        conv.pending = legacy_conv.history;
        conv.keys = std::sync::Arc::new(legacy_conv.keys);
    }

    #[derive(Deserialize)]
    struct LegacyOperator {
        config: LegacyOperatorConfig,
        #[serde(default)]
        feed: LegacyFeed,
    }
    #[derive(Deserialize)]
    struct LegacyOperatorConfig {
        id: OperatorId,
    }
    #[derive(Default, Deserialize)]
    struct LegacyFeed {
        #[serde(default)]
        entries: Vec<FeedEntry>,
    }
    let operators: BTreeMap<String, LegacyOperator> = serde_json::from_value(field("operators")).map_err(|e| bad("operators", e))?;
    for legacy_op in operators.into_values() {
        if let Some(op) = state.operators.get_mut(&legacy_op.config.id) {
            op.feed.pending = legacy_op.feed.entries;
        }
    }
    let decisions: BTreeMap<String, DecisionRecord> =
        serde_json::from_value(field("decisions")).unwrap_or_default();
    let attachments: BTreeMap<String, Attachment> = serde_json::from_value(field("attachments")).unwrap_or_default();

    let dirty = &mut state.dirty;
    dirty.meta = true;
    dirty.groups = state.groups.keys().cloned().collect();
    dirty.operators = state.operators.keys().cloned().collect();
    dirty.conversations = state.conversations.keys().cloned().collect();
    dirty.offers = state.offers.keys().cloned().collect();
    dirty.channels = state.channels.keys().cloned().collect();
    dirty.users = state.users.keys().cloned().collect();
    dirty.templates = state.templates.keys().cloned().collect();
    dirty.decisions = decisions.into_values().collect();
    dirty.attachments = attachments.into_values().collect();
    // The index of what each operator handled (their desk's list of past conversations).
    dirty.handled = state.conversations.values().flat_map(|c| c.handled_by.iter().map(move |op| (op.clone(), c.id))).collect();
    Ok(take_writes(&mut state)
        .into_iter()
        // An import writes into an empty tree: the removes `take_writes` adds for old
        // feed entries and closed conversations have nothing to remove.
        .filter(|(_, v)| v.is_some())
        .collect())
}

/// Records kept in memory, in key order: where the pure core's tests and tools keep
/// records; the node keeps them in the shard's Raft state tree.
#[derive(Clone, Default)]
pub struct MemStore {
    map: std::sync::Arc<std::sync::RwLock<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemStore {
    pub fn write(&self, writes: Writes) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for (key, value) in writes {
            match value {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(self.map.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned())
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>, String> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .range::<Vec<u8>, _>(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn newest(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .range::<Vec<u8>, _>(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        use std::ops::Bound;
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let start = match after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(map
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// Applies one command as the node's shard does: loads what it needs from `store`,
/// decides and applies it, writes its records and drops what is not hot.
pub fn run(state: &mut ShardState, store: &MemStore, envelope: &Envelope) -> Result<(crate::core::Reply, crate::core::Outcome), Error> {
    run_as(state, store, envelope, crate::core::Part::Whole)
}

/// A new leader's first entry (openraft's blank entry) applied to `state`, its writes
/// made to `store`: what [`crate::shard::Shard::leader_began`] does, for tests.
pub fn leader_began(state: &mut ShardState, store: &MemStore) {
    state.leader_began();
    store.write(take_writes(state));
}

/// [`run`] in the part `role` of ADR 0006's split (`core::handle_as`).
pub fn run_as(state: &mut ShardState, store: &MemStore, envelope: &Envelope, part: crate::core::Part) -> Result<(crate::core::Reply, crate::core::Outcome), Error> {
    prefetch(state, store, &envelope.command)?;
    let result = crate::core::handle_as(state, envelope, part);
    let candidates = eviction_candidates(state, &envelope.command);
    touched(state, &candidates);
    store.write(take_writes(state));
    end_command(state);
    evict(state, &candidates);
    result
}
