//! The replicated state of one shard and the pure `apply` that advances it.
//!
//! Architecture invariant: nothing here performs I/O, reads a clock or draws a random
//! number; applying the same events to the same state gives the same state on every
//! replica, which is what lets a routing decision be replayed from the log.
//!
//! `ShardState` is the hot part of the state: the directory, operators, pending offers
//! and open conversations (without their histories). Everything an event changes is
//! also noted in [`Dirty`], which the shard turns into record writes (`records.rs`)
//! committed with the entry; histories, operator feeds, decision records and closed
//! conversations live only in those records.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::*;

/// Operator feeds keep this many entries for resuming sockets; an older resume point
/// gets a `resume_gap` error and the client reloads its state.
pub const FEED_RETAINED: usize = 4096;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShardState {
    pub groups: BTreeMap<SkillGroupId, SkillGroup>,
    pub operators: BTreeMap<OperatorId, Operator>,
    pub conversations: BTreeMap<ConversationId, Conversation>,
    pub channels: BTreeMap<ChannelId, ChannelConfig>,
    pub users: BTreeMap<String, UserRecord>,
    /// Offers not yet answered; each reserves one unit of its operator's capacity.
    pub offers: BTreeMap<OfferId, Offer>,
    pub templates: BTreeMap<String, Template>,
    /// Attachments of the conversations the command being applied names: loaded from
    /// the records before it and dropped after it.
    #[serde(skip)]
    pub attachments: BTreeMap<AttachmentId, Attachment>,
    pub next_conversation: u64,
    pub next_offer: u64,
    /// Queue positions: a conversation keeps its ticket when an offer fails.
    pub next_ticket: u64,
    /// The routing rules in force (see `core::RULES_VERSION`); 0 and 1 are the first
    /// rules. Changing behaviour is gated on it, so a log replays as it was decided.
    #[serde(default)]
    pub rules: u32,
    /// The time of the last entry that changed the state, from rules 3 on: an entry's
    /// time never goes below it (record `k`).
    #[serde(default)]
    pub last_at: Timestamp,
    /// Per login, the session epoch staff tokens must name to be valid; advanced by a
    /// password change, a logout or an admin ending the login's sessions.
    #[serde(default)]
    pub session_epochs: BTreeMap<String, u64>,
    /// Per channel, the groups its public widget may start in besides the default.
    #[serde(default)]
    pub channel_public_groups: BTreeMap<ChannelId, Vec<SkillGroupId>>,
    /// Per channel, days its closed conversations are kept (absent: kept).
    #[serde(default)]
    pub channel_retention: BTreeMap<ChannelId, u32>,
    /// Rules 12: offers that were pending when a new leader's first entry was applied
    /// (records `%`). Their expiry does not set the operator away: the cluster, not the
    /// operator, may have kept the answer from arriving in time.
    #[serde(default)]
    pub offers_across_leaders: BTreeSet<OfferId>,
    /// For a `PurgeExpired` being applied: the conversations that expired, the keys of
    /// all their records and their attachments, read from the records before it.
    #[serde(skip)]
    pub expired: Vec<ConversationId>,
    #[serde(skip)]
    pub expired_keys: Vec<Vec<u8>>,
    #[serde(skip)]
    pub expired_attachments: Vec<AttachmentId>,
    /// Conversations a purge deleted in the log entry being applied.
    #[serde(skip)]
    pub deleted: BTreeSet<ConversationId>,
    /// Conversations the commands applied so far in the log entry being applied named
    /// or changed (`records::eviction_candidates`): from rules 16 a purge in the same
    /// entry leaves them to the next one, since what those commands wrote for them is
    /// not in the records the purge reads its keys from.
    #[serde(skip)]
    pub touched_in_entry: BTreeSet<ConversationId>,
    /// Per skill group and hour (`at / 3,600,000`), what happened there: the floor's
    /// KPIs for today sum the hours since the reader's midnight (records `K`). A group
    /// keeps its last [`KPI_HOURS_KEPT`] hours.
    #[serde(default)]
    pub kpis: BTreeMap<SkillGroupId, BTreeMap<u64, GroupKpi>>,
    /// When each open conversation was first answered (records `j`): its handle time
    /// runs from there to its close.
    #[serde(default)]
    pub answered_at: BTreeMap<ConversationId, Timestamp>,
    /// Per node, the operators it last reported with a live socket, and when (records
    /// `p`). A report older than [`SOCKET_LEASE_MS`] no longer counts.
    #[serde(default)]
    pub sockets: BTreeMap<u64, NodeSockets>,
    /// In the metadata group: per group, the nodes that hold it (`HoldersSet`, records
    /// `#`). A group without an entry is held by every node (ADR 0012).
    #[serde(default)]
    pub holders: BTreeMap<u64, BTreeSet<u64>>,
    /// Nodes removed from the cluster, refused as members from then on (`ForgetNode`,
    /// records `!`; rules 19).
    #[serde(default)]
    pub removed_nodes: BTreeSet<u64>,
    /// When each operator was last reported with a live socket (records `l`).
    #[serde(default)]
    pub last_seen: BTreeMap<OperatorId, Timestamp>,
    /// Why an operator's presence was set for them, while it stands (records `z`):
    /// `disconnected`.
    #[serde(default)]
    pub presence_reasons: BTreeMap<OperatorId, String>,
    /// Per skill group, its queue order and pacing (rules 5; records `y`).
    #[serde(default)]
    pub group_routing: BTreeMap<SkillGroupId, GroupRouting>,
    /// Per channel, the priority its conversations start at (rules 5; records `Y`).
    #[serde(default)]
    pub channel_priority: BTreeMap<ChannelId, u32>,
    /// Operators in wrap-up, until when (records `W`).
    #[serde(default)]
    pub wrap_up: BTreeMap<OperatorId, Timestamp>,
    /// The reasons operators may give for a break (record `B`).
    #[serde(default)]
    pub pause_reasons: Vec<String>,
    /// Emergency notices in force (records `E`).
    #[serde(default)]
    pub emergencies: BTreeMap<NoticeTarget, Emergency>,
    /// The number the next audit trail entry gets (records `Z`).
    #[serde(default)]
    pub audit_next: u64,
    /// Block and allow rules (records `R`).
    #[serde(default, with = "rule_map")]
    pub access_rules: BTreeMap<AccessRule, crate::access::RuleNote>,
    /// Channels' access modes (records `S`).
    #[serde(default)]
    pub channel_access: BTreeMap<ChannelId, crate::access::ChannelAccess>,
    /// Queued conversations of returning customers and the operator who served their
    /// last one, offered it first (sticky routing; records `X`).
    #[serde(default)]
    pub sticky: BTreeMap<ConversationId, OperatorId>,
    /// Per open conversation with messages, when each side wrote last and whether its
    /// silent customer was reminded (records `T`).
    #[serde(default)]
    pub activity: BTreeMap<ConversationId, Activity>,
    /// Operators' per-channel-kind limits (rules 5; records `L`).
    #[serde(default)]
    pub channel_limits: BTreeMap<OperatorId, ChannelLimits>,
    /// Operators' skills and levels (rules 5; records `J`).
    #[serde(default)]
    pub operator_skills: BTreeMap<OperatorId, BTreeMap<String, u8>>,
    /// For a `StartConversation` being applied: who served the visitor's last
    /// conversation and when it closed (read from records `V` before it).
    #[serde(skip)]
    pub returning: Option<(OperatorId, Timestamp)>,
    /// For an `AcceptOfferAt` of an offer no longer pending: its decision record (read
    /// from records `d` before it), which says whom it was made to and when.
    #[serde(skip)]
    pub answered_offer: Option<DecisionRecord>,
    /// ... and the routing step it was made at (records `O`; 0 when none is recorded).
    #[serde(skip)]
    pub answered_offer_step: u32,
    /// Who served each visitor whose conversation closed in the log entry being
    /// applied: the records `V` hold it only once the entry is written, and a later
    /// command of the same entry must see it.
    #[serde(skip)]
    pub served_in_entry: BTreeMap<String, (OperatorId, Timestamp, ConversationId)>,
    /// Per operator and hour (when a break ended), milliseconds on break per reason
    /// (records `P`); the last [`KPI_HOURS_KEPT`] hours are kept.
    #[serde(default)]
    pub pause_totals: BTreeMap<OperatorId, BTreeMap<u64, BTreeMap<String, u64>>>,
    /// Per skill group, its routing steps over waiting time (rules 6; records `G`).
    #[serde(default)]
    pub group_steps: BTreeMap<SkillGroupId, Vec<RoutingStep>>,
    /// Per skill group, its opening hours (rules 6; records `H`).
    #[serde(default)]
    pub group_hours: BTreeMap<SkillGroupId, OpeningHours>,
    /// Per channel kind, the share of capacity one conversation of it takes (rules 6;
    /// record `N`); a kind not listed weighs 1.
    #[serde(default)]
    pub channel_weights: BTreeMap<String, u32>,
    /// When each queued conversation entered its group's queue (rules 6; records `Q`):
    /// its routing step counts from here.
    #[serde(default)]
    pub queued_since: BTreeMap<ConversationId, Timestamp>,
    /// Per channel, how it reaches its provider (ADR 0009; records `C`).
    #[serde(default)]
    pub channel_adapters: BTreeMap<ChannelId, AdapterConfig>,
    /// Per channel, the bot before its operators (rules 7; records `r`).
    #[serde(default)]
    pub channel_bots: BTreeMap<ChannelId, BotConfig>,
    /// Per channel, the key its customers' identities are signed with (records `b`).
    #[serde(default)]
    pub channel_identity: BTreeMap<ChannelId, IdentityKey>,
    /// Open conversations by channel and visitor id: where the next inbound message of
    /// a channel's sender goes. Rebuilt at load from the open conversations.
    /// Letters this group posted to other groups and they have not confirmed, per
    /// destination, and the last letter applied from each source (ADR 0006; records
    /// `s` and `i`). Empty in a node that runs one group.
    #[serde(default)]
    pub mail_out: BTreeMap<u64, crate::mail::Outbox<crate::mail::Mail>>,
    #[serde(default)]
    pub mail_in: crate::mail::Inbox,
    #[serde(skip)]
    pub open_senders: BTreeMap<(ChannelId, String), ConversationId>,
    /// Outbox entries still to be sent or being sent (records `U`); final ones are
    /// records `M` only.
    #[serde(default, with = "pair_map")]
    pub outbox: BTreeMap<(ConversationId, u64), Delivery>,
    /// For a command being applied: final outbox entries it names, read from the
    /// records before it (a receipt, a retry) and dropped after the entry.
    #[serde(skip)]
    pub cold_deliveries: BTreeMap<(ConversationId, u64), Delivery>,
    /// For a `ChannelInbound` being applied: the conversation its provider message id
    /// already went to (records `I`), read before it; and the keys taken earlier in the
    /// same log entry, not written yet.
    #[serde(skip)]
    pub inbound_seen: Option<ConversationId>,
    #[serde(skip)]
    pub inbound_in_entry: BTreeMap<String, ConversationId>,
    /// For a `StartConversationOnce` being applied: the conversation its key already
    /// opened (records `+`), read before it; and the keys taken earlier in the same log
    /// entry, not written yet.
    #[serde(skip)]
    pub start_seen: Option<StartTaken>,
    #[serde(skip)]
    pub start_in_entry: BTreeMap<(ChannelId, String), StartTaken>,
    /// For a routing shard's close being applied (rules 26, `Mail::ClosedAt`): its
    /// customer's messages taken since the close was decided, oldest first (read from
    /// records `h` before it); and those earlier commands of the same log entry wrote,
    /// not written yet.
    #[serde(skip)]
    pub late_messages: Vec<HistoryEntry>,
    #[serde(skip)]
    pub client_in_entry: BTreeMap<ConversationId, Vec<HistoryEntry>>,
    /// What the events applied since the last write changed, to be written as records.
    #[serde(skip)]
    pub dirty: Dirty,
}

/// What a keyed start opened (records `+` `k`): its conversation, the visitor who
/// started it and when. A copy of the start by the same visitor within
/// [`crate::core::START_KEY_WINDOW_MS`] gets that conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTaken {
    pub conversation: ConversationId,
    pub visitor: Option<String>,
    pub at: Timestamp,
}

/// Attempts an outbox entry gets before it is dead-lettered.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 20;

/// Where one outbox entry (a history entry the customer is to receive on a messenger)
/// stands. Docs: docs/channel-api.md, "Delivery statuses".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub channel: ChannelId,
    /// The customer's id at the provider (chat id, phone, address).
    pub recipient: String,
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// When a pending entry may be sent (again).
    pub next_at: Timestamp,
    /// The provider's id for the sent message.
    pub provider_id: Option<String>,
    /// Why the last attempt failed, or why it is dead-lettered.
    pub reason: String,
    pub queued_at: Timestamp,
    pub updated_at: Timestamp,
    /// For the channel's bot (what the customer wrote), not for the customer.
    pub to_bot: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    /// Handed to the provider by the outbox worker on that node; no answer committed.
    Attempting { node: u64 },
    Sent,
    Delivered,
    Read,
    /// Dead-lettered: a failure that will not heal, or too many attempts.
    Failed,
    /// Dead-lettered: an earlier leader's attempt whose outcome nobody knows.
    Unknown,
}

impl DeliveryStatus {
    pub fn name(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Attempting { .. } => "sending",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Read => "read",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Unknown => "unknown",
        }
    }

    /// Still the outbox worker's: not sent, not dead-lettered.
    pub fn open(self) -> bool {
        matches!(self, DeliveryStatus::Pending | DeliveryStatus::Attempting { .. })
    }

    pub fn dead(self) -> bool {
        matches!(self, DeliveryStatus::Failed | DeliveryStatus::Unknown)
    }
}

impl ShardState {
    /// Whether nothing was ever decided in this group: no routing rules adopted, no
    /// directory, no conversation (a new cluster's group before its first adoption;
    /// a data folder of the builds before rules were versioned has its directory).
    pub fn is_new(&self) -> bool {
        self.rules == 0
            && self.next_conversation == 0
            && self.next_offer == 0
            && self.groups.is_empty()
            && self.operators.is_empty()
            && self.users.is_empty()
            && self.channels.is_empty()
            && self.conversations.is_empty()
            && self.templates.is_empty()
            && self.holders.is_empty()
            && self.removed_nodes.is_empty()
            && self.access_rules.is_empty()
            && self.mail_out.is_empty()
            && self.mail_in.sources().next().is_none()
    }

    /// An outbox entry, hot or read for the command being applied.
    pub fn delivery(&self, key: &(ConversationId, u64)) -> Option<&Delivery> {
        self.outbox.get(key).or_else(|| self.cold_deliveries.get(key))
    }

    /// The customer's id at the provider, for a conversation a channel adapter started
    /// (its visitor id is `channel:sender`).
    pub fn recipient_of(conv: &Conversation) -> Option<&str> {
        conv.visitor.id.as_deref()?.strip_prefix(conv.channel.as_str())?.strip_prefix(':')
    }

    /// Queues what a customer on a messenger is to receive: history entry `seq` of a
    /// conversation whose channel has an adapter.
    fn enqueue_delivery(&mut self, conversation: ConversationId, seq: Option<u64>, at: Timestamp) {
        let (Some(seq), Some(conv)) = (seq, self.conversations.get(&conversation)) else { return };
        if !self.channel_adapters.contains_key(&conv.channel) {
            return;
        }
        let Some(recipient) = Self::recipient_of(conv) else { return };
        let recipient = recipient.to_owned();
        self.queue_delivery(conversation, seq, recipient, false, at);
    }

    /// Queues history entry `seq` for the bot holding the conversation (rules 7).
    fn enqueue_for_bot(&mut self, conversation: ConversationId, seq: Option<u64>, at: Timestamp) {
        let (Some(seq), Some(conv)) = (seq, self.conversations.get(&conversation)) else { return };
        if conv.status != ConversationStatus::WithBot || !self.channel_bots.contains_key(&conv.channel) {
            return;
        }
        self.queue_delivery(conversation, seq, "bot".to_owned(), true, at);
    }

    fn queue_delivery(&mut self, conversation: ConversationId, seq: u64, recipient: String, to_bot: bool, at: Timestamp) {
        let Some(conv) = self.conversations.get(&conversation) else { return };
        let delivery = Delivery {
            channel: conv.channel.clone(),
            recipient,
            to_bot,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_at: at,
            provider_id: None,
            reason: String::new(),
            queued_at: at,
            updated_at: at,
        };
        self.dirty.deliveries.insert((conversation, seq), delivery.clone());
        self.outbox.insert((conversation, seq), delivery);
    }

    /// Tells the operator holding the conversation where its outbox entry stands.
    fn tell_delivery(&mut self, key: (ConversationId, u64), at: Timestamp, touched: &mut Touched) {
        let Some(d) = self.delivery(&key).filter(|d| !d.to_bot) else { return };
        let item = FeedItem::Delivery { conversation: key.0, seq: key.1, status: d.status.name().to_owned(), reason: d.reason.clone() };
        let Some(operator) = self.conversations.get(&key.0).and_then(|c| c.assigned().cloned()) else { return };
        if let Some(op) = self.operators.get_mut(&operator) {
            op.feed.push(at, item);
            touched.operators.insert(operator);
        }
    }

    /// Changes an outbox entry and notes it for writing; a final one leaves the hot
    /// outbox.
    fn update_delivery(&mut self, key: (ConversationId, u64), change: impl FnOnce(&mut Delivery)) {
        let Some(mut delivery) = self.outbox.remove(&key).or_else(|| self.cold_deliveries.remove(&key)) else { return };
        change(&mut delivery);
        if delivery.status.open() {
            self.outbox.insert(key, delivery.clone());
        } else {
            self.cold_deliveries.insert(key, delivery.clone());
        }
        self.dirty.deliveries.insert(key, delivery);
    }
}

/// How long a node's report of its operators' sockets counts: three of its heartbeats.
/// A node that stopped reporting (it died) stops vouching for its operators after this.
pub const SOCKET_LEASE_MS: u64 = 30_000;
/// The reason an operator whose last socket went away was set away.
pub const REASON_DISCONNECTED: &str = "disconnected";

/// JSON maps need string keys: a map keyed by a tuple is a list of pairs there.
mod pair_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        map.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<K, V>, D::Error> {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// JSON maps need string keys: the rules are kept as a list of pairs there.
mod rule_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::access::RuleNote;
    use crate::model::AccessRule;

    pub fn serialize<S: Serializer>(map: &BTreeMap<AccessRule, RuleNote>, s: S) -> Result<S::Ok, S::Error> {
        map.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<AccessRule, RuleNote>, D::Error> {
        Ok(Vec::<(AccessRule, RuleNote)>::deserialize(d)?.into_iter().collect())
    }
}

/// When each side of an open conversation wrote last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub client_at: Timestamp,
    pub operator_at: Timestamp,
    /// The customer was reminded since their last message.
    pub reminded: bool,
}

/// The reminder a silent customer gets when their group sets no text of its own.
pub const DEFAULT_INACTIVITY_MESSAGE: &str = "Are you still there? This chat will close soon if we do not hear from you.";
/// Conversations one `SweepInactive` entry closes or reminds at most.
pub const SWEEP_BATCH: usize = 500;

/// What a sweep does to a conversation whose customer went silent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InactivityStep {
    Remind(String),
    Close,
}

impl ShardState {
    /// The share of an operator's capacity a conversation takes: its channel kind's
    /// weight from rules 6, else 1.
    pub fn weight_of(&self, channel: &ChannelId) -> u32 {
        if self.rules < 6 || self.channel_weights.is_empty() {
            return 1;
        }
        self.channels.get(channel).and_then(|c| self.channel_weights.get(&c.kind)).copied().unwrap_or(1)
    }

    /// What counts against an operator's capacity: their conversations and pending
    /// offers, each by its weight (rules 6; 1 each before, or with no weights set).
    pub fn load_of(&self, op: &Operator) -> u32 {
        if self.rules < 6 || self.channel_weights.is_empty() {
            return op.load();
        }
        let weight = |id: &ConversationId| self.conversations.get(id).map_or(1, |c| self.weight_of(&c.channel));
        let offered = op.offers.iter().filter_map(|o| self.offers.get(o)).map(|o| o.conversation);
        op.active.iter().copied().chain(offered).map(|id| weight(&id)).sum()
    }

    /// Whether a conversation of `channel` fits in what the operator has free.
    pub fn has_room(&self, op: &Operator, channel: &ChannelId) -> bool {
        self.load_of(op).saturating_add(self.weight_of(channel)) <= op.config.capacity
    }

    /// Whether the operator has room for a conversation of any kind (weight 1 at least).
    pub fn has_any_room(&self, op: &Operator) -> bool {
        self.load_of(op) < op.config.capacity
    }

    /// Whether the group's opening hours (rules 6) say it is closed at `at`.
    pub fn group_closed(&self, group: &SkillGroupId, at: Timestamp) -> bool {
        self.rules >= 6 && self.group_hours.get(group).is_some_and(|h| !crate::hours::is_open(h, at))
    }

    /// Why `operator` may not take a conversation of `channel` now, by their channel
    /// limits (rules 5): `channel_not_taken` (a kind they do not take) or
    /// `channel_full` (as many of that kind as they may hold, offers included).
    pub fn channel_exclusion(&self, operator: &Operator, channel: &ChannelId) -> Option<&'static str> {
        if self.rules < 5 {
            return None;
        }
        let limits = self.channel_limits.get(&operator.config.id)?;
        let kind = self.channels.get(channel).map_or("", |c| c.kind.as_str());
        if !limits.only.is_empty() && !limits.only.iter().any(|k| k == kind) {
            return Some("channel_not_taken");
        }
        let (_, max) = limits.per_kind.iter().find(|(k, _)| k == kind)?;
        let kind_of = |id: &ConversationId| self.conversations.get(id).and_then(|c| self.channels.get(&c.channel)).map(|c| c.kind.as_str());
        let offered = operator.offers.iter().filter_map(|o| self.offers.get(o)).map(|o| o.conversation);
        let held = operator.active.iter().copied().chain(offered).filter(|id| kind_of(id) == Some(kind)).count();
        (held as u32 >= *max).then_some("channel_full")
    }

    /// The assigned conversations whose customer has been silent since the operator's
    /// last message for their group's reminder or closing time, as of `now` (rules 5),
    /// at most [`SWEEP_BATCH`].
    pub fn inactive(&self, now: Timestamp) -> Vec<(ConversationId, InactivityStep)> {
        if self.rules < 5 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (id, act) in &self.activity {
            if out.len() >= SWEEP_BATCH {
                break;
            }
            let Some(conv) = self.conversations.get(id) else { continue };
            if conv.assigned().is_none() || act.operator_at <= act.client_at {
                continue;
            }
            let Some(routing) = self.group_routing.get(&conv.group) else { continue };
            let silent = now.millis_since(act.operator_at);
            // A customer is always reminded before their conversation closes, even when
            // a late sweep finds both times passed.
            let remind = routing.inactivity_remind_ms > 0;
            if remind && !act.reminded && silent >= routing.inactivity_remind_ms {
                let text = routing.inactivity_message.trim();
                out.push((*id, InactivityStep::Remind(if text.is_empty() { DEFAULT_INACTIVITY_MESSAGE.to_owned() } else { text.to_owned() })));
            } else if routing.inactivity_close_ms > 0 && silent >= routing.inactivity_close_ms && (!remind || act.reminded) {
                out.push((*id, InactivityStep::Close));
            }
        }
        out
    }
}

/// An emergency notice in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emergency {
    pub message: String,
    pub by: String,
    pub since: Timestamp,
}

/// One entry of the audit trail: who did what, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: Timestamp,
    pub by: String,
    /// A stable code: `emergency_on`, `emergency_off`.
    pub action: String,
    /// What it was about (`channel:web`, `group:billing`).
    pub target: String,
    pub detail: String,
}

impl ShardState {
    /// The emergency notice a new conversation of `channel` in `group` gets: the
    /// channel's, else the group's.
    pub fn emergency_for(&self, channel: &ChannelId, group: &SkillGroupId) -> Option<&Emergency> {
        self.emergencies.get(&NoticeTarget::Channel(channel.clone())).or_else(|| self.emergencies.get(&NoticeTarget::Group(group.clone())))
    }

    fn audit(&mut self, entry: AuditEntry) {
        let n = self.audit_next;
        self.audit_next += 1;
        self.dirty.audit.push((n, entry));
    }
}

/// One node's last report of the operators with a live socket on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSockets {
    pub at: Timestamp,
    pub operators: BTreeSet<OperatorId>,
}

impl ShardState {
    /// Whether some node reported a live socket of `operator` within the lease, as of `now`.
    pub fn connected(&self, operator: &OperatorId, now: Timestamp) -> bool {
        self.sockets.values().any(|n| now.millis_since(n.at) <= SOCKET_LEASE_MS && n.operators.contains(operator))
    }

    /// The online operators who have had no live socket for `grace_ms` as of `now`,
    /// counting from the latest of: their last report, the end of the lease of a report
    /// that still names them (its node stopped reporting: their socket may have lived
    /// until then), their going online, and `since`.
    pub fn absent_operators(&self, now: Timestamp, grace_ms: u64, since: Timestamp) -> Vec<OperatorId> {
        self.operators
            .values()
            .filter(|op| op.presence == Presence::Online && !self.connected(&op.config.id, now))
            .filter(|op| {
                let seen = self.last_seen.get(&op.config.id).copied().unwrap_or_default();
                let vouched = self.sockets.values().filter(|n| n.operators.contains(&op.config.id)).map(|n| n.at.plus_ms(SOCKET_LEASE_MS)).max().unwrap_or_default();
                let from = seen.max(vouched).max(op.presence_since).max(since);
                now.millis_since(from) >= grace_ms
            })
            .map(|op| op.config.id.clone())
            .collect()
    }
}

/// Hours of KPI counters a skill group keeps: today in any time zone, and the week
/// before it.
pub const KPI_HOURS_KEPT: u64 = 24 * 8;
/// One hour in milliseconds: the KPI counters' bucket.
pub const HOUR_MS: u64 = 3_600_000;

impl GroupKpi {
    pub fn add(&mut self, other: &GroupKpi) {
        self.entered += other.entered;
        self.answered += other.answered;
        self.wait_ms += other.wait_ms;
        self.answered_in_sla += other.answered_in_sla;
        self.handled += other.handled;
        self.timed += other.timed;
        self.handle_ms += other.handle_ms;
        self.abandoned += other.abandoned;
        self.rated += other.rated;
        self.rating_sum += other.rating_sum;
    }
}

impl ShardState {
    /// Each skill group's counters summed over the hours from `since_hour` on (every
    /// group, with zeros where nothing happened).
    pub fn kpis_since(&self, since_hour: u64) -> BTreeMap<SkillGroupId, GroupKpi> {
        let mut out: BTreeMap<SkillGroupId, GroupKpi> = self.groups.keys().map(|g| (g.clone(), GroupKpi::default())).collect();
        for (group, hours) in &self.kpis {
            if let Some(sum) = out.get_mut(group) {
                for kpi in hours.range(since_hour..).map(|(_, kpi)| kpi) {
                    sum.add(kpi);
                }
            }
        }
        out
    }
}

/// What happened in one skill group in one hour, counted as the entries applied, so
/// every replica counts the same. Docs: workstation-api.md, `GET /api/kpis`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupKpi {
    /// Conversations that started in the group.
    pub entered: u64,
    /// Conversations first answered (assigned) here, their total wait from the start, and
    /// how many of them within the group's SLA.
    pub answered: u64,
    pub wait_ms: u64,
    pub answered_in_sla: u64,
    /// Answered conversations closed here; `timed` of them with a known answer time,
    /// whose handle times (answer to close) add up to `handle_ms`.
    pub handled: u64,
    pub timed: u64,
    pub handle_ms: u64,
    /// Closed by the visitor before anyone answered.
    pub abandoned: u64,
    /// Ratings given and their sum (1-5 each).
    pub rated: u64,
    pub rating_sum: u64,
}

/// The records an applied command changed.
#[derive(Clone, Debug, Default)]
pub struct Dirty {
    pub conversations: BTreeSet<ConversationId>,
    pub operators: BTreeSet<OperatorId>,
    pub groups: BTreeSet<SkillGroupId>,
    pub offers: BTreeSet<OfferId>,
    /// Offers that joined or left `ShardState::offers_across_leaders`.
    pub offers_across_leaders: BTreeSet<OfferId>,
    pub channels: BTreeSet<ChannelId>,
    pub users: BTreeSet<String>,
    pub templates: BTreeSet<String>,
    /// Counters, rules, session epochs, public groups, retention.
    pub meta: bool,
    /// The expired conversations' records go (`ShardState::expired_keys`).
    pub purge: bool,
    /// `last_at` moved.
    pub clock: bool,
    /// Conversations whose history grew; operators whose feed grew.
    pub histories: BTreeSet<ConversationId>,
    pub feeds: BTreeSet<OperatorId>,
    pub decisions: Vec<DecisionRecord>,
    pub attachments: Vec<Attachment>,
    /// KPI counters changed or dropped; conversations whose answer time was set or
    /// cleared; (operator, conversation) pairs newly handled (records `w`).
    pub kpis: BTreeSet<(SkillGroupId, u64)>,
    pub answered: BTreeSet<ConversationId>,
    /// Nodes whose socket report changed; operators whose last-seen time or presence
    /// reason changed.
    pub sockets: BTreeSet<u64>,
    /// Groups whose holders changed.
    pub holders: BTreeSet<u64>,
    /// Nodes removed from the cluster.
    pub removed_nodes: BTreeSet<u64>,
    pub last_seen: BTreeSet<OperatorId>,
    pub presence_reasons: BTreeSet<OperatorId>,
    /// Routing settings of groups and channels changed; operators' wrap-up changed.
    pub group_routing: BTreeSet<SkillGroupId>,
    pub channel_priority: BTreeSet<ChannelId>,
    pub wrap_up: BTreeSet<OperatorId>,
    pub pause_reasons: bool,
    pub pause_totals: BTreeSet<(OperatorId, u64)>,
    pub emergencies: BTreeSet<NoticeTarget>,
    pub access_rules: BTreeSet<AccessRule>,
    pub channel_access: BTreeSet<ChannelId>,
    pub sticky: BTreeSet<ConversationId>,
    pub activity: BTreeSet<ConversationId>,
    pub channel_limits: BTreeSet<OperatorId>,
    pub operator_skills: BTreeSet<OperatorId>,
    pub group_steps: BTreeSet<SkillGroupId>,
    pub group_hours: BTreeSet<SkillGroupId>,
    pub channel_weights: bool,
    pub queued_since: BTreeSet<ConversationId>,
    pub channel_adapters: BTreeSet<ChannelId>,
    pub channel_identity: BTreeSet<ChannelId>,
    pub channel_bots: BTreeSet<ChannelId>,
    /// Inbound keys taken (records `I`), and outbox entries changed (records `U`, `M`, `D`).
    pub inbound: Vec<(String, ConversationId)>,
    /// Keyed starts taken: channel, key, what it opened.
    pub start_keys: Vec<(ChannelId, String, StartTaken)>,
    pub deliveries: BTreeMap<(ConversationId, u64), Delivery>,
    /// Sent entries by the provider's id for them, for receipts that name only that
    /// (records `F`): (channel, provider id, conversation, seq).
    pub provider_ids: Vec<(ChannelId, String, ConversationId, u64)>,
    /// Provider ids no longer naming an entry (it was sent again under a new one).
    pub provider_ids_gone: Vec<(ChannelId, String)>,
    /// The routing step each offer of this entry was made under (records `O`).
    pub offer_steps: Vec<(OfferId, u32)>,
    /// Per visitor, who served the conversation that just closed, when, and which one
    /// it was (records `V`).
    pub last_served: BTreeMap<String, (OperatorId, Timestamp, ConversationId)>,
    /// Audit trail entries to write, with their numbers.
    pub audit: Vec<(u64, AuditEntry)>,
    pub handled: Vec<(OperatorId, ConversationId)>,
    /// Letters posted (destination, id); letters confirmed (destination, first, last);
    /// sources whose last applied letter moved.
    pub mail_posted: Vec<(u64, u64)>,
    pub mail_dropped: Vec<(u64, u64, u64)>,
    pub mail_in: BTreeSet<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SkillGroup {
    pub config: SkillGroupConfig,
    /// Conversations waiting here, in queue order, including ones currently offered.
    pub queue: BTreeSet<(u64, ConversationId)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Operator {
    pub config: OperatorConfig,
    pub presence: Presence,
    pub presence_since: Timestamp,
    /// Start of the current idle stretch for the longest-idle selector: going online or
    /// the last assignment.
    pub idle_since: Timestamp,
    pub active: BTreeSet<ConversationId>,
    pub offers: BTreeSet<OfferId>,
    pub feed: Feed,
    /// Template ids this operator marked as favourites.
    pub favourites: BTreeSet<String>,
}

impl Operator {
    /// Active conversations plus pending offers: what counts against capacity.
    pub fn load(&self) -> u32 {
        (self.active.len() + self.offers.len()) as u32
    }

    pub fn free_capacity(&self) -> u32 {
        self.config.capacity.saturating_sub(self.load())
    }
}

/// The ordered stream an operator's sockets read: offers, assignments and the
/// conversations they hold. Sequence numbers start at 1 and never repeat. The entries
/// are records; the last `FEED_RETAINED` of them are kept.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Feed {
    pub last_seq: u64,
    /// Entries pushed by the command being applied, not yet written as records.
    #[serde(skip)]
    pub pending: Vec<FeedEntry>,
}

impl Feed {
    fn push(&mut self, at: Timestamp, item: FeedItem) {
        self.last_seq += 1;
        self.pending.push(FeedEntry { seq: self.last_seq, at, item });
    }

    /// The oldest sequence number still kept.
    pub fn first_retained(&self) -> u64 {
        self.last_seq.saturating_sub(FEED_RETAINED as u64 - 1).max(1)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub seq: u64,
    pub at: Timestamp,
    pub item: FeedItem,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FeedItem {
    Offered {
        offer: OfferId,
        conversation: ConversationId,
        group: SkillGroupId,
        deadline: Timestamp,
        visitor: String,
    },
    OfferWithdrawn {
        offer: OfferId,
        conversation: ConversationId,
        reason: WithdrawReason,
    },
    /// The conversation is now this operator's; its history up to `history_upto` is
    /// read from the conversation, later entries arrive as `Conversation` items.
    Assigned {
        conversation: ConversationId,
        history_upto: u64,
    },
    Conversation {
        conversation: ConversationId,
        entry: HistoryEntry,
    },
    Released {
        conversation: ConversationId,
    },
    PresenceChanged {
        presence: Presence,
    },
    /// An admin changed the operator's name, capacity or groups (rules 4): the desk
    /// shows the new ones at once.
    Configured {
        name: String,
        capacity: u32,
        groups: Vec<SkillGroupId>,
    },
    /// The operator's presence was set for them, with why (`disconnected`).
    PresenceSet {
        presence: Presence,
        reason: String,
    },
    /// Wrap-up after a close: no offer until `until`; `None`: it ended.
    WrapUp {
        until: Option<Timestamp>,
    },
    /// What became of a message to a messenger customer (ADR 0009): history entry `seq`
    /// is now `status` ([`DeliveryStatus::name`]), with the reason of a failure.
    Delivery {
        conversation: ConversationId,
        seq: u64,
        status: String,
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Conversation {
    pub id: ConversationId,
    pub channel: ChannelId,
    pub visitor: Visitor,
    pub group: SkillGroupId,
    pub status: ConversationStatus,
    pub created_at: Timestamp,
    /// The sequence number of the newest history entry. The history itself (everything
    /// that happened, in the one order every reader sees, I5) is records.
    #[serde(default)]
    pub last_seq: u64,
    /// Whether the visitor rated it.
    #[serde(default)]
    pub rated: bool,
    /// History entries recorded by the command being applied, not yet written.
    #[serde(skip)]
    pub pending: Vec<HistoryEntry>,
    /// Idempotency keys already used by the client and operators, with the sequence
    /// number of the message each produced. Held in memory while the conversation is
    /// open; on disk they are the keys of the messages in its history. Shared, so that
    /// a read that copies the conversation (each visitor's `read` mark, upload, resume)
    /// does not copy up to 10,000 keys under the shard's lock; an apply that adds one
    /// copies them only while such a copy is still held.
    #[serde(skip)]
    pub keys: std::sync::Arc<BTreeMap<String, u64>>,
    /// Bytes of the customer's message text in its history (rules 14 bound them,
    /// [`crate::core::MAX_CLIENT_TEXT_BYTES`]). Held in memory with the keys and rebuilt
    /// from the history with them.
    #[serde(skip)]
    pub client_text_bytes: u64,
    /// Bytes of staff text in its history (operators' messages, notes, the bot's
    /// replies): rules 22 bound them ([`crate::core::MAX_STAFF_TEXT_BYTES`]). Held and
    /// rebuilt as the customer's are.
    #[serde(skip)]
    pub staff_text_bytes: u64,
    /// Operators who declined or let an offer of this conversation expire during the
    /// current stay in the queue.
    pub passed_by: BTreeSet<OperatorId>,
    /// When the latest of those passes happened: a new round of offers may start one
    /// offer timeout after it, once nobody who has not passed can take it.
    #[serde(default)]
    pub last_pass: Option<Timestamp>,
    /// How far the visitor has read (a history `seq`), so ✓✓ survives reconnects.
    #[serde(default)]
    pub client_read_upto: u64,
    /// How far the operators holding it have read.
    #[serde(default)]
    pub operator_read_upto: u64,
    pub decisions: Vec<OfferId>,
    /// Every operator that ever held it: they may still read its history.
    pub handled_by: BTreeSet<OperatorId>,
}

impl Conversation {
    /// A conversation with no history yet.
    pub fn new(id: ConversationId, channel: ChannelId, visitor: Visitor, group: SkillGroupId, status: ConversationStatus, created_at: Timestamp) -> Self {
        Conversation {
            id,
            channel,
            visitor,
            group,
            status,
            created_at,
            last_seq: 0,
            rated: false,
            pending: Vec::new(),
            keys: Default::default(),
            client_text_bytes: 0,
            staff_text_bytes: 0,
            passed_by: BTreeSet::new(),
            last_pass: None,
            client_read_upto: 0,
            operator_read_upto: 0,
            decisions: Vec::new(),
            handled_by: BTreeSet::new(),
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn assigned(&self) -> Option<&OperatorId> {
        match &self.status {
            ConversationStatus::Assigned { operator } => Some(operator),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationStatus {
    Queued { ticket: u64, offer: Option<OfferId> },
    Assigned { operator: OperatorId },
    Closed,
    /// Held by the channel's bot (rules 7) until it hands the conversation off.
    WithBot,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub seq: u64,
    pub at: Timestamp,
    pub item: HistoryItem,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HistoryItem {
    Started { channel: ChannelId, visitor: Visitor },
    Queued { group: SkillGroupId },
    ClientMessage { key: String, text: String, attachments: Vec<Attachment> },
    OperatorMessage { operator: OperatorId, name: String, key: String, text: String, attachments: Vec<Attachment> },
    Assigned { operator: OperatorId, name: String },
    Transferred { from: OperatorId, to: TransferTarget, comment: String },
    Closed { by: Closer, resolution: String, tags: Vec<String> },
    Rated { score: u8, comment: String },
    /// An internal note: staff read it, the visitor never does. `author` is a login.
    Note { author: String, name: String, key: String, text: String },
    /// An emergency notice in force when the conversation started: everyone reads it.
    Notice { text: String },
    /// The channel's bot took the conversation (rules 7).
    WithBot,
    /// The bot's answer, with quick replies.
    BotMessage { key: String, text: String, buttons: Vec<String> },
    /// The bot handed the conversation to a group, with why and what it learned.
    Handoff { group: SkillGroupId, reason: String, context: Vec<(String, String)> },
}

/// The streams an applied event advanced, so the driver wakes exactly their readers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub conversations: BTreeSet<ConversationId>,
    pub operators: BTreeSet<OperatorId>,
    pub groups: BTreeSet<SkillGroupId>,
}

impl Touched {
    pub fn merge(&mut self, other: Touched) {
        self.conversations.extend(other.conversations);
        self.operators.extend(other.operators);
        self.groups.extend(other.groups);
    }
}

impl ShardState {
    /// Rules 12: a new leader's first entry was applied. Every offer pending now was
    /// pending across the change of leader, which may have held its operator's answer
    /// back, so its expiry will not set the operator away.
    pub fn leader_began(&mut self) {
        if self.rules < 12 {
            return;
        }
        for id in self.offers.keys() {
            if self.offers_across_leaders.insert(*id) {
                self.dirty.offers_across_leaders.insert(*id);
            }
        }
    }

    fn forget_across_leaders(&mut self, offer: OfferId) {
        if self.offers_across_leaders.remove(&offer) {
            self.dirty.offers_across_leaders.insert(offer);
        }
    }

    /// Applies one committed event. Events were validated when they were decided, so a
    /// reference to something missing is skipped rather than trusted.
    pub fn apply(&mut self, event: &Event, at: Timestamp) -> Touched {
        self.mark(event);
        self.tally(event, at);
        let mut touched = Touched::default();
        self.apply_event(event, at, &mut touched);
        // A touched stream may only have grown (a message, a mirrored feed entry): its
        // new entries are written; its record only if `mark` noted a change.
        self.dirty.feeds.extend(touched.operators.iter().cloned());
        self.dirty.histories.extend(touched.conversations.iter().cloned());
        touched
    }

    /// Notes the records an event changes. Called before the event is applied, so it
    /// sees who holds a conversation the event releases.
    fn mark(&mut self, event: &Event) {
        let dirty = &mut self.dirty;
        let holder = |conversation: &ConversationId| self.conversations.get(conversation).and_then(|c| c.assigned().cloned());
        match event {
            Event::ConversationTransferred { conversation, from, .. } => {
                dirty.conversations.insert(*conversation);
                dirty.operators.insert(from.clone());
                dirty.operators.extend(holder(conversation));
            }
            Event::ConversationClosed { conversation, .. } | Event::ConversationReassigned { conversation, .. } => {
                dirty.conversations.insert(*conversation);
                dirty.operators.extend(holder(conversation));
            }
            Event::SkillGroupUpserted(config) => {
                dirty.groups.insert(config.id.clone());
            }
            Event::OperatorUpserted(config) => {
                dirty.operators.insert(config.id.clone());
            }
            Event::ChannelUpserted(config) => {
                dirty.channels.insert(config.id.clone());
            }
            Event::UserUpserted(user) => {
                dirty.users.insert(user.login.clone());
            }
            Event::ConversationStarted { conversation, .. } | Event::ConversationQueued { conversation, .. } => {
                dirty.meta = true;
                dirty.conversations.insert(*conversation);
            }
            Event::ConversationAged { conversation, .. } => {
                dirty.conversations.insert(*conversation);
            }
            // A message changes the conversation's history and keys, written from
            // `pending` and `Dirty::keys`; its record is unchanged.
            Event::ClientMessagePosted { .. } | Event::OperatorMessagePosted { .. } | Event::NoteAdded { .. } => {}
            Event::ConversationRated { conversation, .. }
            | Event::ReadMarked { conversation, .. }
            | Event::RoundRestarted { conversation }
            | Event::PassForgotten { conversation, .. } => {
                dirty.conversations.insert(*conversation);
            }
            Event::ConversationAssigned { conversation, operator } => {
                dirty.conversations.insert(*conversation);
                dirty.operators.insert(operator.clone());
            }
            Event::OfferMade { offer, decision } => {
                dirty.meta = true;
                dirty.offers.insert(offer.id);
                dirty.conversations.insert(offer.conversation);
                dirty.operators.insert(offer.operator.clone());
                dirty.decisions.push(decision.clone());
            }
            Event::OfferAccepted { offer } | Event::OfferWithdrawn { offer, .. } => {
                dirty.offers.insert(*offer);
                if let Some(made) = self.offers.get(offer) {
                    dirty.conversations.insert(made.conversation);
                    dirty.operators.insert(made.operator.clone());
                }
            }
            // Socket reports are written from `Dirty::sockets` and `Dirty::last_seen`,
            // routing settings from their own dirty sets.
            Event::OperatorsConnected { .. }
            | Event::GroupRoutingSet { .. }
            | Event::ChannelPrioritySet { .. }
            | Event::PauseReasonsSet { .. }
            | Event::EmergencySet { .. }
            | Event::NoticeGiven { .. }
            | Event::AccessRuleSet { .. }
            | Event::ChannelAccessSet { .. }
            | Event::StickySet { .. }
            | Event::CustomerReminded { .. }
            | Event::OperatorChannelsSet { .. }
            | Event::OperatorSkillsSet { .. }
            | Event::GroupStepsSet { .. }
            | Event::GroupHoursSet { .. }
            | Event::ChannelWeightsSet { .. }
            | Event::OfferStep { .. }
            | Event::ChannelAdapterSet { .. }
            | Event::InboundTaken { .. }
            | Event::StartKeyTaken { .. }
            | Event::DeliveriesAttempted { .. }
            | Event::DeliveryResults { .. }
            | Event::DeliveryRetried { .. }
            | Event::ChannelIdentitySet { .. }
            | Event::ChannelBotSet { .. }
            | Event::BotMessagePosted { .. }
            | Event::HandedOff { .. }
            | Event::MailPosted { .. }
            | Event::MailReceived { .. }
            | Event::MailConfirmed { .. } => {}
            Event::BotTook { conversation, .. } => {
                dirty.conversations.insert(*conversation);
            }
            Event::BreakTaken { operator, .. } => {
                dirty.operators.insert(operator.clone());
            }
            Event::WrapUpSet { operator, .. } => {
                dirty.operators.insert(operator.clone());
            }
            Event::PresenceChanged { operator, .. } | Event::FavouriteSet { operator, .. } | Event::WentAbsent { operator } => {
                dirty.operators.insert(operator.clone());
            }
            Event::TemplateUpserted(template) => {
                dirty.templates.insert(template.id.clone());
            }
            Event::TemplateDeleted { id } => {
                dirty.templates.insert(id.clone());
                dirty.operators.extend(self.operators.values().filter(|o| o.favourites.contains(id)).map(|o| o.config.id.clone()));
            }
            Event::AttachmentStored(attachment) => dirty.attachments.push(attachment.clone()),
            Event::RulesAdopted { .. } | Event::SessionsEnded { .. } | Event::ChannelPublicGroupsSet { .. } | Event::ChannelRetentionSet { .. } => {
                dirty.meta = true
            }
            Event::ConversationsDeleted { .. } => dirty.purge = true,
            Event::HoldersSet { group, .. } => {
                dirty.holders.insert(*group);
            }
            Event::NodeForgotten { id } => {
                dirty.removed_nodes.insert(*id);
            }
        }
    }

    fn apply_event(&mut self, event: &Event, at: Timestamp, touched: &mut Touched) {
        match event {
            Event::SkillGroupUpserted(config) => {
                touched.groups.insert(config.id.clone());
                let new = !self.groups.contains_key(&config.id);
                self.groups
                    .entry(config.id.clone())
                    .and_modify(|g| g.config = config.clone())
                    .or_insert_with(|| SkillGroup { config: config.clone(), queue: BTreeSet::new() });
                // Rules 13: a routing shard may take a conversation's `Enqueue` before the
                // directory's letter that makes its group (the two come from different
                // groups, in no order): the group's queue starts with the conversations
                // already waiting for it, as a load from the records builds it.
                if new && self.rules >= 13 {
                    let waiting: Vec<(u64, ConversationId)> = self
                        .conversations
                        .iter()
                        .filter(|(_, c)| c.group == config.id)
                        .filter_map(|(id, c)| match c.status {
                            ConversationStatus::Queued { ticket, .. } => Some((ticket, *id)),
                            _ => None,
                        })
                        .collect();
                    if let Some(g) = self.groups.get_mut(&config.id) {
                        g.queue.extend(waiting);
                    }
                }
            }
            Event::OperatorUpserted(config) => {
                touched.operators.insert(config.id.clone());
                touched.groups.extend(config.groups.iter().cloned());
                let tell = self.rules >= 4;
                // Rules 27: on a conversation shard, the routing shard's letter that an
                // operator holds a conversation can come before the metadata group's
                // letter that the operator exists (two links, no order between them).
                // The conversation is then assigned to an operator this shard does not
                // know, and one it hears of later holds what it was given meanwhile,
                // with an `Assigned` item each (its history so far, messages written
                // in between too). Before, such an operator held none of it here: no
                // feed item for the customer's messages, no release at the close.
                let held_before_known: Vec<(ConversationId, u64)> = if self.rules >= 27 && !self.operators.contains_key(&config.id) {
                    self.conversations.iter().filter(|(_, c)| c.assigned() == Some(&config.id)).map(|(id, c)| (*id, c.last_seq())).collect()
                } else {
                    Vec::new()
                };
                self.operators
                    .entry(config.id.clone())
                    .and_modify(|o| {
                        if tell && o.config != *config {
                            let item = FeedItem::Configured { name: config.name.clone(), capacity: config.capacity, groups: config.groups.clone() };
                            o.feed.push(at, item);
                        }
                        o.config = config.clone();
                    })
                    .or_insert_with(|| Operator {
                        config: config.clone(),
                        presence: Presence::Offline,
                        presence_since: at,
                        idle_since: at,
                        active: BTreeSet::new(),
                        offers: BTreeSet::new(),
                        feed: Feed::default(),
                        favourites: BTreeSet::new(),
                    });
                if let Some(op) = self.operators.get_mut(&config.id) {
                    for (conversation, history_upto) in held_before_known {
                        op.active.insert(conversation);
                        op.feed.push(at, FeedItem::Assigned { conversation, history_upto });
                    }
                }
            }
            Event::ChannelUpserted(config) => {
                let before = self.channels.insert(config.id.clone(), config.clone());
                // Rules 14: the groups with conversations of a channel that is new here
                // (a routing shard held them until it heard of it) or of another kind now
                // are routed again.
                if self.rules >= 14 && before.is_none_or(|b| b.kind != config.kind) {
                    for group in self.groups.values() {
                        if group.queue.iter().any(|(_, id)| self.conversations.get(id).is_some_and(|c| c.channel == config.id)) {
                            touched.groups.insert(group.config.id.clone());
                        }
                    }
                    // Rules 18: and the groups of every operator who holds one of its
                    // conversations, whose room the change may have given back.
                    if self.rules >= 18 {
                        for op in self.operators.values() {
                            if op.active.iter().any(|c| self.conversations.get(c).is_some_and(|c| c.channel == config.id)) {
                                touched.groups.extend(op.config.groups.iter().cloned());
                            }
                        }
                    }
                }
            }
            Event::UserUpserted(user) => {
                self.users.insert(user.login.clone(), user.clone());
            }
            Event::ConversationAged { conversation, created_at } => {
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    conv.created_at = conv.created_at.min(*created_at);
                }
            }
            Event::ConversationStarted { conversation, channel, visitor } => {
                self.next_conversation = self.next_conversation.max(conversation.0 + 1);
                let group = self
                    .channels
                    .get(channel)
                    .map(|c| c.default_group.clone())
                    .unwrap_or_else(|| SkillGroupId::new(""));
                // Closed until the `ConversationQueued` that follows it in the same entry.
                let conv = Conversation::new(*conversation, channel.clone(), visitor.clone(), group, ConversationStatus::Closed, at);
                self.conversations.insert(*conversation, conv);
                if let Some(id) = &visitor.id {
                    self.open_senders.insert((channel.clone(), id.clone()), *conversation);
                }
                self.record(*conversation, at, HistoryItem::Started { channel: channel.clone(), visitor: visitor.clone() }, touched);
            }
            Event::ConversationQueued { conversation, group, ticket } => {
                self.next_ticket = self.next_ticket.max(ticket + 1);
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    conv.group = group.clone();
                    conv.status = ConversationStatus::Queued { ticket: *ticket, offer: None };
                }
                if let Some(g) = self.groups.get_mut(group) {
                    g.queue.insert((*ticket, *conversation));
                }
                touched.groups.insert(group.clone());
                if self.rules >= 6 {
                    self.queued_since.insert(*conversation, at);
                    self.dirty.queued_since.insert(*conversation);
                }
                self.record(*conversation, at, HistoryItem::Queued { group: group.clone() }, touched);
            }
            Event::NoteAdded { conversation, author, name, key, text } => {
                let item = HistoryItem::Note { author: author.clone(), name: name.clone(), key: key.clone(), text: text.clone() };
                let seq = self.record(*conversation, at, item, touched);
                if let (Some(conv), Some(seq)) = (self.conversations.get_mut(conversation), seq) {
                    std::sync::Arc::make_mut(&mut conv.keys).insert(key.clone(), seq);
                    conv.staff_text_bytes += text.len() as u64;
                }
            }
            Event::ClientMessagePosted { conversation, key, text, attachments } => {
                let item = HistoryItem::ClientMessage { key: key.clone(), text: text.clone(), attachments: attachments.clone() };
                let seq = self.record(*conversation, at, item, touched);
                if let (Some(conv), Some(seq)) = (self.conversations.get_mut(conversation), seq) {
                    std::sync::Arc::make_mut(&mut conv.keys).insert(key.clone(), seq);
                    conv.client_text_bytes += text.len() as u64;
                }
                self.enqueue_for_bot(*conversation, seq, at);
            }
            Event::OperatorMessagePosted { conversation, operator, key, text, attachments } => {
                let name = self.operator_name(operator);
                let item = HistoryItem::OperatorMessage {
                    operator: operator.clone(),
                    name,
                    key: key.clone(),
                    text: text.clone(),
                    attachments: attachments.clone(),
                };
                let seq = self.record(*conversation, at, item, touched);
                if let (Some(conv), Some(seq)) = (self.conversations.get_mut(conversation), seq) {
                    std::sync::Arc::make_mut(&mut conv.keys).insert(key.clone(), seq);
                    conv.staff_text_bytes += text.len() as u64;
                }
                self.enqueue_delivery(*conversation, seq, at);
            }
            // Its decision record is noted by `mark` and written as a record, never held
            // in memory.
            Event::OfferMade { offer, .. } => {
                self.next_offer = self.next_offer.max(offer.id.0 + 1);
                self.offers.insert(offer.id, offer.clone());
                let visitor = match self.conversations.get_mut(&offer.conversation) {
                    Some(conv) => {
                        if let ConversationStatus::Queued { offer: pending, .. } = &mut conv.status {
                            *pending = Some(offer.id);
                        }
                        conv.decisions.push(offer.id);
                        conv.visitor.name.clone()
                    }
                    None => String::new(),
                };
                if let Some(op) = self.operators.get_mut(&offer.operator) {
                    op.offers.insert(offer.id);
                    op.feed.push(
                        at,
                        FeedItem::Offered {
                            offer: offer.id,
                            conversation: offer.conversation,
                            group: offer.group.clone(),
                            deadline: offer.deadline,
                            visitor,
                        },
                    );
                }
                touched.operators.insert(offer.operator.clone());
                touched.groups.insert(offer.group.clone());
            }
            Event::OfferAccepted { offer } => {
                self.forget_across_leaders(*offer);
                if let Some(offer) = self.offers.remove(offer) {
                    if let Some(op) = self.operators.get_mut(&offer.operator) {
                        op.offers.remove(&offer.id);
                    }
                    touched.operators.insert(offer.operator);
                }
            }
            Event::OfferWithdrawn { offer, reason, .. } => {
                self.forget_across_leaders(*offer);
                if let Some(offer) = self.offers.remove(offer) {
                    if let Some(op) = self.operators.get_mut(&offer.operator) {
                        op.offers.remove(&offer.id);
                        op.feed.push(at, FeedItem::OfferWithdrawn { offer: offer.id, conversation: offer.conversation, reason: *reason });
                        // Rules 6: the operator has room again in each of their groups,
                        // not only in the one the offer came from (overflow).
                        if self.rules >= 6 {
                            touched.groups.extend(op.config.groups.iter().cloned());
                        }
                    }
                    if let Some(conv) = self.conversations.get_mut(&offer.conversation) {
                        if let ConversationStatus::Queued { offer: pending, .. } = &mut conv.status {
                            if *pending == Some(offer.id) {
                                *pending = None;
                            }
                        }
                        if matches!(reason, WithdrawReason::Declined | WithdrawReason::Expired) {
                            conv.passed_by.insert(offer.operator.clone());
                            conv.last_pass = Some(at);
                        }
                    }
                    touched.operators.insert(offer.operator);
                    touched.groups.insert(offer.group);
                }
            }
            Event::ConversationAssigned { conversation, operator } => {
                // Recorded before the status changes: the new holder reads it as part of
                // the history in its `Assigned` item, not twice.
                let name = self.operator_name(operator);
                let item = HistoryItem::Assigned { operator: operator.clone(), name };
                self.record_unmirrored(*conversation, at, item, touched);
                let mut group = None;
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    if let ConversationStatus::Queued { ticket, .. } = conv.status {
                        group = Some((conv.group.clone(), ticket));
                    }
                    conv.status = ConversationStatus::Assigned { operator: operator.clone() };
                    conv.passed_by.clear();
                    conv.last_pass = None;
                    conv.handled_by.insert(operator.clone());
                }
                if let Some((group, ticket)) = group {
                    if let Some(g) = self.groups.get_mut(&group) {
                        g.queue.remove(&(ticket, *conversation));
                    }
                    touched.groups.insert(group);
                }
                let history_upto = self.conversations.get(conversation).map(|c| c.last_seq()).unwrap_or(0);
                if let Some(op) = self.operators.get_mut(operator) {
                    op.active.insert(*conversation);
                    op.idle_since = at;
                    op.feed.push(at, FeedItem::Assigned { conversation: *conversation, history_upto });
                }
                touched.operators.insert(operator.clone());
            }
            Event::ConversationTransferred { conversation, from, to, comment } => {
                let item = HistoryItem::Transferred { from: from.clone(), to: to.clone(), comment: comment.clone() };
                self.record(*conversation, at, item, touched);
                if let (TransferTarget::Group(_), Some(conv)) = (to, self.conversations.get_mut(conversation)) {
                    // The group queue should not hand it straight back to its sender.
                    conv.passed_by.insert(from.clone());
                    conv.last_pass = Some(at);
                }
                self.release(*conversation, from, at, touched);
            }
            Event::ConversationClosed { conversation, by, resolution, tags, .. } => {
                let item = HistoryItem::Closed { by: *by, resolution: resolution.clone(), tags: tags.clone() };
                self.record(*conversation, at, item, touched);
                if let Some(conv) = self.conversations.get(conversation) {
                    if let Some(id) = &conv.visitor.id {
                        let sender = (conv.channel.clone(), id.clone());
                        if self.open_senders.get(&sender) == Some(conversation) {
                            self.open_senders.remove(&sender);
                        }
                    }
                }
                let previous = self
                    .conversations
                    .get_mut(conversation)
                    .map(|conv| std::mem::replace(&mut conv.status, ConversationStatus::Closed));
                match previous {
                    Some(ConversationStatus::Assigned { operator }) => self.release(*conversation, &operator, at, touched),
                    Some(ConversationStatus::Queued { ticket, .. }) => {
                        let group = self.conversations.get(conversation).map(|c| c.group.clone());
                        if let Some(g) = group.as_ref().and_then(|g| self.groups.get_mut(g)) {
                            g.queue.remove(&(ticket, *conversation));
                            touched.groups.insert(g.config.id.clone());
                        }
                    }
                    _ => {}
                }
            }
            Event::ConversationRated { conversation, score, comment, .. } => {
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    conv.rated = true;
                }
                self.record(*conversation, at, HistoryItem::Rated { score: *score, comment: comment.clone() }, touched);
            }
            Event::PresenceChanged { operator, presence } => {
                if let Some(op) = self.operators.get_mut(operator) {
                    if op.presence != Presence::Online && *presence == Presence::Online {
                        op.idle_since = at;
                    }
                    op.presence = *presence;
                    op.presence_since = at;
                    op.feed.push(at, FeedItem::PresenceChanged { presence: *presence });
                    touched.operators.insert(operator.clone());
                    touched.groups.extend(op.config.groups.iter().cloned());
                }
                // Their own choice: no reason stands any more.
                if self.presence_reasons.remove(operator).is_some() {
                    self.dirty.presence_reasons.insert(operator.clone());
                }
            }
            Event::WentAbsent { operator } => {
                if let Some(op) = self.operators.get_mut(operator) {
                    op.presence = Presence::Away;
                    op.presence_since = at;
                    op.feed.push(at, FeedItem::PresenceSet { presence: Presence::Away, reason: REASON_DISCONNECTED.to_owned() });
                    touched.operators.insert(operator.clone());
                    touched.groups.extend(op.config.groups.iter().cloned());
                    self.presence_reasons.insert(operator.clone(), REASON_DISCONNECTED.to_owned());
                    self.dirty.presence_reasons.insert(operator.clone());
                }
            }
            Event::EmergencySet { target, message, by } => {
                let name = match target {
                    NoticeTarget::Channel(c) => format!("channel:{c}"),
                    NoticeTarget::Group(g) => format!("group:{g}"),
                };
                match message {
                    Some(text) => {
                        self.emergencies.insert(target.clone(), Emergency { message: text.clone(), by: by.clone(), since: at });
                        self.audit(AuditEntry { at, by: by.clone(), action: "emergency_on".into(), target: name, detail: text.clone() });
                    }
                    None => {
                        self.emergencies.remove(target);
                        self.audit(AuditEntry { at, by: by.clone(), action: "emergency_off".into(), target: name, detail: String::new() });
                    }
                }
                self.dirty.emergencies.insert(target.clone());
                // The floor shows what is in force.
                touched.groups.extend(self.groups.keys().cloned());
            }
            Event::AccessRuleSet { rule, note, by } => {
                let target = format!(
                    "{}:{}:{}",
                    if rule.list == AccessList::Block { "block" } else { "allow" },
                    rule.channel.as_ref().map_or("*", |c| c.as_str()),
                    rule.value
                );
                match note {
                    Some(text) => {
                        self.access_rules.insert(rule.clone(), crate::access::RuleNote { note: text.clone(), by: by.clone(), since: at });
                        self.audit(AuditEntry { at, by: by.clone(), action: "access_rule_added".into(), target, detail: text.clone() });
                    }
                    None => {
                        self.access_rules.remove(rule);
                        self.audit(AuditEntry { at, by: by.clone(), action: "access_rule_removed".into(), target, detail: String::new() });
                    }
                }
                self.dirty.access_rules.insert(rule.clone());
            }
            Event::ChannelAccessSet { channel, allow_only, message, by } => {
                self.channel_access.insert(channel.clone(), crate::access::ChannelAccess { allow_only: *allow_only, message: message.clone() });
                self.dirty.channel_access.insert(channel.clone());
                let detail = format!("allow_only={allow_only}");
                self.audit(AuditEntry { at, by: by.clone(), action: "channel_access".into(), target: format!("channel:{channel}"), detail });
            }
            Event::NoticeGiven { conversation, text } => {
                let seq = self.record(*conversation, at, HistoryItem::Notice { text: text.clone() }, touched);
                self.enqueue_delivery(*conversation, seq, at);
            }
            Event::OperatorSkillsSet { operator, skills } => {
                if skills.is_empty() {
                    self.operator_skills.remove(operator);
                } else {
                    self.operator_skills.insert(operator.clone(), skills.iter().cloned().collect());
                }
                self.dirty.operator_skills.insert(operator.clone());
                if let Some(op) = self.operators.get(operator) {
                    touched.groups.extend(op.config.groups.iter().cloned());
                }
            }
            Event::OperatorChannelsSet { operator, limits } => {
                if limits.per_kind.is_empty() && limits.only.is_empty() {
                    self.channel_limits.remove(operator);
                } else {
                    self.channel_limits.insert(operator.clone(), limits.clone());
                }
                self.dirty.channel_limits.insert(operator.clone());
                if let Some(op) = self.operators.get(operator) {
                    touched.groups.extend(op.config.groups.iter().cloned());
                }
            }
            Event::CustomerReminded { conversation, text } => {
                let seq = self.record(*conversation, at, HistoryItem::Notice { text: text.clone() }, touched);
                self.enqueue_delivery(*conversation, seq, at);
            }
            Event::StickySet { conversation, operator } => {
                self.sticky.insert(*conversation, operator.clone());
                self.dirty.sticky.insert(*conversation);
            }
            Event::PauseReasonsSet { reasons } => {
                self.pause_reasons = reasons.clone();
                self.dirty.pause_reasons = true;
            }
            Event::BreakTaken { operator, reason } => {
                if let Some(op) = self.operators.get_mut(operator) {
                    op.presence = Presence::Break;
                    op.presence_since = at;
                    op.feed.push(at, FeedItem::PresenceSet { presence: Presence::Break, reason: reason.clone() });
                    touched.operators.insert(operator.clone());
                    touched.groups.extend(op.config.groups.iter().cloned());
                    self.presence_reasons.insert(operator.clone(), reason.clone());
                    self.dirty.presence_reasons.insert(operator.clone());
                }
            }
            Event::GroupRoutingSet { group, routing } => {
                self.group_routing.insert(group.clone(), routing.clone());
                self.dirty.group_routing.insert(group.clone());
                touched.groups.insert(group.clone());
            }
            Event::GroupStepsSet { group, steps } => {
                if steps.is_empty() {
                    self.group_steps.remove(group);
                } else {
                    self.group_steps.insert(group.clone(), steps.clone());
                }
                self.dirty.group_steps.insert(group.clone());
                touched.groups.insert(group.clone());
            }
            Event::GroupHoursSet { group, hours } => {
                match hours {
                    Some(h) => self.group_hours.insert(group.clone(), h.clone()),
                    None => self.group_hours.remove(group),
                };
                self.dirty.group_hours.insert(group.clone());
                touched.groups.insert(group.clone());
            }
            Event::ChannelWeightsSet { weights } => {
                self.channel_weights = weights.iter().filter(|(_, w)| *w != 1).cloned().collect();
                self.dirty.channel_weights = true;
                touched.groups.extend(self.groups.keys().cloned());
            }
            Event::OfferStep { offer, step } => {
                self.dirty.offer_steps.push((*offer, *step));
            }
            Event::ChannelPrioritySet { channel, priority } => {
                if *priority == 0 {
                    self.channel_priority.remove(channel);
                } else {
                    self.channel_priority.insert(channel.clone(), *priority);
                }
                self.dirty.channel_priority.insert(channel.clone());
                // Every group's order may change: it is read when routing.
                touched.groups.extend(self.groups.keys().cloned());
            }
            Event::WrapUpSet { operator, until } => {
                match until {
                    Some(at) => self.wrap_up.insert(operator.clone(), *at),
                    None => self.wrap_up.remove(operator),
                };
                self.dirty.wrap_up.insert(operator.clone());
                if let Some(op) = self.operators.get_mut(operator) {
                    op.feed.push(at, FeedItem::WrapUp { until: *until });
                    touched.operators.insert(operator.clone());
                    touched.groups.extend(op.config.groups.iter().cloned());
                }
            }
            Event::OperatorsConnected { node, operators } => {
                let now: BTreeSet<OperatorId> = operators.iter().cloned().collect();
                // Everyone this report or the node's last one names was connected until
                // now: one whose socket closed since is last seen at this report.
                let before = self.sockets.get(node).map(|n| n.operators.clone()).unwrap_or_default();
                for operator in now.union(&before) {
                    self.last_seen.insert(operator.clone(), at);
                    self.dirty.last_seen.insert(operator.clone());
                }
                self.sockets.insert(*node, NodeSockets { at, operators: now });
                self.dirty.sockets.insert(*node);
            }
            Event::ConversationReassigned { conversation, by, to, comment } => {
                let item = HistoryItem::Transferred { from: OperatorId::new(by.clone()), to: to.clone(), comment: comment.clone() };
                self.record(*conversation, at, item, touched);
                let status = self.conversations.get(conversation).map(|c| (c.status.clone(), c.group.clone()));
                match status {
                    Some((ConversationStatus::Assigned { operator }, _)) => self.release(*conversation, &operator, at, touched),
                    Some((ConversationStatus::Queued { ticket, .. }, group)) => {
                        // Leaves its queue now; the next event assigns or re-queues it.
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.queue.remove(&(ticket, *conversation));
                        }
                        touched.groups.insert(group);
                    }
                    _ => {}
                }
            }
            Event::TemplateUpserted(template) => {
                self.templates.insert(template.id.clone(), template.clone());
            }
            Event::TemplateDeleted { id } => {
                self.templates.remove(id);
                for op in self.operators.values_mut() {
                    op.favourites.remove(id);
                }
            }
            Event::FavouriteSet { operator, template, favourite } => {
                if let Some(op) = self.operators.get_mut(operator) {
                    if *favourite {
                        op.favourites.insert(template.clone());
                    } else {
                        op.favourites.remove(template);
                    }
                }
            }
            Event::AttachmentStored(attachment) => {
                self.attachments.insert(attachment.id.clone(), attachment.clone());
            }
            Event::RulesAdopted { version } => {
                let before = self.rules;
                self.rules = self.rules.max(*version);
                // Rules 13 queue a conversation that arrived before its group when the
                // group does; one left out of its queue that way earlier joins it now,
                // as a load from the records puts it there, so a replica that restarts
                // and one that did not decide alike from here on.
                if before < 13 && self.rules >= 13 {
                    let waiting: Vec<(SkillGroupId, u64, ConversationId)> = self
                        .conversations
                        .iter()
                        .filter_map(|(id, c)| match c.status {
                            ConversationStatus::Queued { ticket, .. } => Some((c.group.clone(), ticket, *id)),
                            _ => None,
                        })
                        .collect();
                    // Every such group is routed, whether this replica's queue lacked the
                    // conversation (it did not restart) or had it (it did): all replicas
                    // route the same groups here.
                    for (group, ticket, id) in waiting {
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.queue.insert((ticket, id));
                            touched.groups.insert(group);
                        }
                    }
                }
                // Rules 14 route a group again when a channel of its queued conversations
                // arrives; one that arrived earlier left them waiting: every group with a
                // queue is routed once now.
                if before < 14 && self.rules >= 14 {
                    touched.groups.extend(self.groups.values().filter(|g| !g.queue.is_empty()).map(|g| g.config.id.clone()));
                }
            }
            Event::HoldersSet { group, nodes } => {
                self.holders.insert(*group, nodes.iter().copied().collect());
            }
            Event::NodeForgotten { id } => {
                self.removed_nodes.insert(*id);
            }
            Event::SessionsEnded { login } => {
                *self.session_epochs.entry(login.clone()).or_insert(0) += 1;
            }
            Event::ChannelRetentionSet { channel, days } => {
                if *days == 0 {
                    self.channel_retention.remove(channel);
                } else {
                    self.channel_retention.insert(channel.clone(), *days);
                }
            }
            Event::MailPosted { to, id, mail } => {
                let posted = self.mail_out.entry(*to).or_default().post(mail.clone());
                debug_assert_eq!(posted, *id, "a letter's id is decided as the next one");
                self.dirty.mail_posted.push((*to, posted));
            }
            Event::MailReceived { from, id } => {
                self.mail_in.receive(*from, *id);
                self.dirty.mail_in.insert(*from);
            }
            Event::MailConfirmed { to, upto } => {
                if let Some(outbox) = self.mail_out.get_mut(to) {
                    let first = outbox.unconfirmed().next().map(|(id, _)| id);
                    if let (Some(first), Ok(dropped)) = (first, outbox.confirm(*upto)) {
                        if dropped > 0 {
                            self.dirty.mail_dropped.push((*to, first, first + dropped as u64 - 1));
                        }
                    }
                }
            }
            Event::ConversationsDeleted { conversations } => {
                for id in conversations {
                    self.conversations.remove(id);
                    self.deleted.insert(*id);
                    let keys: Vec<(ConversationId, u64)> = self.outbox.range((*id, 0)..=(*id, u64::MAX)).chain(self.cold_deliveries.range((*id, 0)..=(*id, u64::MAX))).map(|(k, _)| *k).collect();
                    for k in keys {
                        self.outbox.remove(&k);
                        self.cold_deliveries.remove(&k);
                    }
                }
            }
            Event::ChannelAdapterSet { channel, adapter } => {
                match adapter {
                    Some(a) => self.channel_adapters.insert(channel.clone(), a.clone()),
                    None => self.channel_adapters.remove(channel),
                };
                self.dirty.channel_adapters.insert(channel.clone());
                // Disconnected: what it still had to send is dead-lettered, for a
                // supervisor to send again once it is connected.
                if adapter.is_none() {
                    let stranded: Vec<(ConversationId, u64)> = self.outbox.iter().filter(|(_, d)| &d.channel == channel && !d.to_bot).map(|(k, _)| *k).collect();
                    let rules = self.rules;
                    for key in stranded {
                        self.update_delivery(key, |d| {
                            // Rules 23: one being sent may have reached the customer; the
                            // worker's answer may still say so.
                            if rules >= 23 && matches!(d.status, DeliveryStatus::Attempting { .. }) {
                                d.status = DeliveryStatus::Unknown;
                                d.reason = "the channel was disconnected while it was being sent: it may have reached the customer".into();
                            } else {
                                d.status = DeliveryStatus::Failed;
                                d.reason = "the channel was disconnected from its provider".into();
                            }
                            d.updated_at = at;
                        });
                        self.tell_delivery(key, at, touched);
                    }
                }
            }
            Event::ChannelBotSet { channel, bot } => {
                match bot {
                    Some(b) => self.channel_bots.insert(channel.clone(), b.clone()),
                    None => self.channel_bots.remove(channel),
                };
                self.dirty.channel_bots.insert(channel.clone());
            }
            Event::BotTook { conversation, group } => {
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    conv.group = group.clone();
                    conv.status = ConversationStatus::WithBot;
                }
                let seq = self.record(*conversation, at, HistoryItem::WithBot, touched);
                self.enqueue_for_bot(*conversation, seq, at);
            }
            Event::BotMessagePosted { conversation, key, text, buttons } => {
                let item = HistoryItem::BotMessage { key: key.clone(), text: text.clone(), buttons: buttons.clone() };
                let seq = self.record(*conversation, at, item, touched);
                if let (Some(conv), Some(seq)) = (self.conversations.get_mut(conversation), seq) {
                    std::sync::Arc::make_mut(&mut conv.keys).insert(key.clone(), seq);
                    conv.staff_text_bytes += text.len() as u64;
                }
                self.enqueue_delivery(*conversation, seq, at);
            }
            Event::HandedOff { conversation, group, reason, context } => {
                let item = HistoryItem::Handoff { group: group.clone(), reason: reason.clone(), context: context.clone() };
                self.record(*conversation, at, item, touched);
            }
            Event::ChannelIdentitySet { channel, key } => {
                match key {
                    Some(k) => self.channel_identity.insert(channel.clone(), k.clone()),
                    None => self.channel_identity.remove(channel),
                };
                self.dirty.channel_identity.insert(channel.clone());
            }
            Event::InboundTaken { conversation, key } => {
                self.inbound_in_entry.insert(key.clone(), *conversation);
                self.dirty.inbound.push((key.clone(), *conversation));
            }
            Event::StartKeyTaken { conversation, channel, key } => {
                let visitor = self.conversations.get(conversation).and_then(|c| c.visitor.id.clone());
                let taken = StartTaken { conversation: *conversation, visitor, at };
                self.start_in_entry.insert((channel.clone(), key.clone()), taken.clone());
                self.dirty.start_keys.push((channel.clone(), key.clone(), taken));
            }
            Event::DeliveriesAttempted { node, items } => {
                // Not told on the feed: "sending" lasts milliseconds; its outcome is told.
                for key in items {
                    self.update_delivery(*key, |d| {
                        d.status = DeliveryStatus::Attempting { node: *node };
                        d.attempts += 1;
                        d.updated_at = at;
                    });
                }
            }
            Event::DeliveryResults { results } => {
                for r in results {
                    // Rules 18: an empty id (a provider's answer without one) names no
                    // entry (every empty id of a channel would share one index key).
                    let indexed = |id: &String| self.rules < 18 || !id.is_empty();
                    if let DeliveryOutcome::Sent { provider_id } = &r.outcome {
                        if let Some(d) = self.delivery(&(r.conversation, r.seq)).filter(|_| indexed(provider_id)) {
                            let (channel, old) = (d.channel.clone(), d.provider_id.clone());
                            if let Some(old) = old.filter(|old| old != provider_id && indexed(old)) {
                                self.dirty.provider_ids_gone.push((channel.clone(), old));
                            }
                            self.dirty.provider_ids.push((channel, provider_id.clone(), r.conversation, r.seq));
                        }
                    }
                    self.update_delivery((r.conversation, r.seq), |d| {
                        d.updated_at = at;
                        match &r.outcome {
                            DeliveryOutcome::Sent { provider_id } => {
                                if d.status.open() || d.status == DeliveryStatus::Unknown {
                                    d.status = DeliveryStatus::Sent;
                                }
                                d.provider_id = Some(provider_id.clone());
                                d.reason.clear();
                            }
                            DeliveryOutcome::Retry { reason, retry_at } => {
                                d.status = DeliveryStatus::Pending;
                                d.next_at = *retry_at;
                                d.reason = reason.clone();
                            }
                            DeliveryOutcome::Failed { reason } => {
                                d.status = DeliveryStatus::Failed;
                                d.reason = reason.clone();
                            }
                            DeliveryOutcome::Unknown => {
                                d.status = DeliveryStatus::Unknown;
                                d.reason = "the provider's answer never came (its node stopped, or no answer in time); not sent again".into();
                            }
                            DeliveryOutcome::Delivered => {
                                if d.status != DeliveryStatus::Read {
                                    d.status = DeliveryStatus::Delivered;
                                }
                            }
                            DeliveryOutcome::Read => d.status = DeliveryStatus::Read,
                        }
                    });
                    self.tell_delivery((r.conversation, r.seq), at, touched);
                }
            }
            Event::DeliveryRetried { conversation, seq, .. } => {
                // Rules 18: the id the provider gave the last attempt no longer names
                // this entry, so a receipt for that attempt (a "failed" the provider
                // sends late, or again) cannot settle the new one.
                let forget = self.rules >= 18;
                if forget {
                    if let Some((channel, Some(old))) = self.delivery(&(*conversation, *seq)).map(|d| (d.channel.clone(), d.provider_id.clone())) {
                        if !old.is_empty() {
                            self.dirty.provider_ids_gone.push((channel, old));
                        }
                    }
                }
                self.update_delivery((*conversation, *seq), |d| {
                    if forget {
                        d.provider_id = None;
                    }
                    d.status = DeliveryStatus::Pending;
                    d.attempts = 0;
                    d.queued_at = at;
                    d.next_at = at;
                    d.reason.clear();
                    d.updated_at = at;
                });
                self.tell_delivery((*conversation, *seq), at, touched);
            }
            Event::ChannelPublicGroupsSet { channel, groups } => {
                if groups.is_empty() {
                    self.channel_public_groups.remove(channel);
                } else {
                    self.channel_public_groups.insert(channel.clone(), groups.clone());
                }
            }
            Event::ReadMarked { conversation, by, upto } => {
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    let mark = match by {
                        Closer::Client => &mut conv.client_read_upto,
                        Closer::Operator => &mut conv.operator_read_upto,
                        // Nobody reads for the system.
                        Closer::System => return,
                    };
                    *mark = (*mark).max(*upto);
                }
            }
            Event::RoundRestarted { conversation } => {
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    conv.passed_by.clear();
                    conv.last_pass = None;
                    touched.groups.insert(conv.group.clone());
                }
            }
            Event::PassForgotten { conversation, operator } => {
                if let Some(conv) = self.conversations.get_mut(conversation) {
                    conv.passed_by.remove(operator);
                    touched.groups.insert(conv.group.clone());
                }
            }
        }
    }

    fn operator_name(&self, operator: &OperatorId) -> String {
        self.operators.get(operator).map(|o| o.config.name.clone()).unwrap_or_else(|| operator.0.clone())
    }

    /// Appends to a conversation's history and mirrors the entry into the feed of the
    /// operator holding it. Returns the new entry's sequence number.
    fn record(&mut self, conversation: ConversationId, at: Timestamp, item: HistoryItem, touched: &mut Touched) -> Option<u64> {
        let seq = self.record_unmirrored(conversation, at, item, touched)?;
        let conv = self.conversations.get(&conversation)?;
        let entry = conv.pending.last()?.clone();
        if let Some(operator) = conv.assigned().cloned() {
            if let Some(op) = self.operators.get_mut(&operator) {
                op.feed.push(at, FeedItem::Conversation { conversation, entry });
                touched.operators.insert(operator);
            }
        }
        Some(seq)
    }

    /// Counts an event into its group's KPI counters for the hour of `at`. Called
    /// before the event is applied, so it sees the conversation as it was.
    fn tally(&mut self, event: &Event, at: Timestamp) {
        // A close or rating a conversation shard decided before this entry (rules 20)
        // counts when it was decided.
        let at = match event {
            Event::ConversationClosed { decided_at: Some(decided), .. } | Event::ConversationRated { decided_at: Some(decided), .. } => (*decided).min(at),
            _ => at,
        };
        let hour = at.0 / HOUR_MS;
        // A break with a reason ends with any change of presence: count its time.
        if let Event::PresenceChanged { operator, .. } | Event::WentAbsent { operator } | Event::BreakTaken { operator, .. } = event {
            self.end_break(operator, at);
        }
        // Sticky routing: a conversation leaving the queue drops its preference; one
        // closing while held remembers who served its (verified) visitor.
        if let Event::ConversationAssigned { conversation, .. } | Event::ConversationClosed { conversation, .. } = event {
            if self.sticky.remove(conversation).is_some() {
                self.dirty.sticky.insert(*conversation);
            }
            if self.queued_since.remove(conversation).is_some() {
                self.dirty.queued_since.insert(*conversation);
            }
        }
        match event {
            Event::ClientMessagePosted { conversation, .. } => {
                let act = self.activity.entry(*conversation).or_default();
                act.client_at = at;
                act.reminded = false;
                self.dirty.activity.insert(*conversation);
            }
            Event::OperatorMessagePosted { conversation, .. } => {
                self.activity.entry(*conversation).or_default().operator_at = at;
                self.dirty.activity.insert(*conversation);
            }
            Event::CustomerReminded { conversation, .. } => {
                if let Some(act) = self.activity.get_mut(conversation) {
                    act.reminded = true;
                    self.dirty.activity.insert(*conversation);
                }
            }
            Event::ConversationClosed { conversation, .. } => {
                if self.activity.remove(conversation).is_some() {
                    self.dirty.activity.insert(*conversation);
                }
            }
            // Rules 17: a new holder (or none, queued again) starts the silence anew.
            Event::ConversationAssigned { conversation, .. }
            | Event::ConversationTransferred { conversation, .. }
            | Event::ConversationReassigned { conversation, .. }
            | Event::ConversationQueued { conversation, .. }
                if self.rules >= 17 =>
            {
                if self.activity.remove(conversation).is_some() {
                    self.dirty.activity.insert(*conversation);
                }
            }
            _ => {}
        }
        if let Event::ConversationClosed { conversation, .. } = event {
            if let Some(conv) = self.conversations.get(conversation) {
                if let (Some(visitor), Some(holder)) = (conv.visitor.id.clone(), conv.assigned().cloned()) {
                    self.dirty.last_served.insert(visitor.clone(), (holder.clone(), at, *conversation));
                    self.served_in_entry.insert(visitor, (holder, at, *conversation));
                }
            }
        }
        match event {
            Event::ConversationQueued { conversation, group, .. } => {
                // The first queueing, right after the start (its history holds only
                // `started`); a transfer or requeue is not a new arrival. Rules 16: or
                // its bot's handoff (its history holds the bot's part too).
                let rules = self.rules;
                if self.conversations.get(conversation).is_some_and(|c| c.last_seq == 1 || (rules >= 16 && c.status == ConversationStatus::WithBot)) {
                    self.kpi(group, hour).entered += 1;
                }
            }
            Event::ConversationAssigned { conversation, operator } => {
                let Some(conv) = self.conversations.get(conversation) else { return };
                if !conv.handled_by.contains(operator) {
                    self.dirty.handled.push((operator.clone(), *conversation));
                }
                // Rules 18: taken from the bot by a supervisor straight to an operator
                // (never queued): it enters its group here, as a bot's handoff does.
                if self.rules >= 18 && conv.status == ConversationStatus::WithBot {
                    let group = conv.group.clone();
                    self.kpi(&group, hour).entered += 1;
                }
                let Some(conv) = self.conversations.get(conversation) else { return };
                if !conv.handled_by.is_empty() || self.answered_at.contains_key(conversation) {
                    return;
                }
                let (group, wait) = (conv.group.clone(), at.millis_since(conv.created_at));
                let within = self.groups.get(&group).is_some_and(|g| wait <= g.config.sla_ms);
                self.answered_at.insert(*conversation, at);
                self.dirty.answered.insert(*conversation);
                let kpi = self.kpi(&group, hour);
                kpi.answered += 1;
                kpi.wait_ms += wait;
                kpi.answered_in_sla += u64::from(within);
            }
            Event::ConversationClosed { conversation, by, decided_at, .. } => {
                let Some(conv) = self.conversations.get(conversation) else { return };
                if conv.status == ConversationStatus::Closed {
                    return;
                }
                let (group, answered, created_at) = (conv.group.clone(), !conv.handled_by.is_empty(), conv.created_at);
                // Rules 16: a customer leaving the bot never waited in a queue.
                let with_bot = self.rules >= 16 && conv.status == ConversationStatus::WithBot;
                let since = self.answered_at.remove(conversation);
                if since.is_some() {
                    self.dirty.answered.insert(*conversation);
                }
                // Rules 25: a close its conversation shard decided before this routing
                // shard's first answer (`at`, the time its letter carries, is before the
                // answer's) crossed the `Assigned` letter, which the conversation shard
                // then dropped: no operator ever reached the customer. The answer is
                // taken back and the close counts as one before an answer, as a group of
                // one counts it (it refuses the accept that comes after the close). A
                // close after the `Assigned` letter applied is never before the answer:
                // that letter's entry is stamped by a node that applied the answer.
                // Only while the conversation is still with the operator whose answer that
                // was: after a transfer the answer was counted in a group it may have left,
                // and is left as it was.
                let first_holder = matches!(conv.status, ConversationStatus::Assigned { .. }) && conv.handled_by.len() == 1;
                if let Some(since) = since.filter(|since| self.rules >= 25 && first_holder && decided_at.is_some() && at < *since) {
                    self.answer_taken_back(&group, since, created_at);
                    if *by == Closer::Client && !with_bot {
                        self.kpi(&group, hour).abandoned += 1;
                    }
                    return;
                }
                let kpi = self.kpi(&group, hour);
                match since {
                    Some(since) => {
                        kpi.handled += 1;
                        kpi.timed += 1;
                        kpi.handle_ms += at.millis_since(since);
                    }
                    // Answered before its answer time was kept (an older build).
                    None if answered => kpi.handled += 1,
                    None if *by == Closer::Client && !with_bot => kpi.abandoned += 1,
                    None => {}
                }
            }
            Event::ConversationRated { conversation, score, .. } => {
                // Rules 16: the group's satisfaction is with its operators: a rating of
                // a conversation none of them handled (the bot's alone, or left before
                // an answer) is not counted.
                let rules = self.rules;
                let Some(group) = self.conversations.get(conversation).filter(|c| rules < 16 || !c.handled_by.is_empty()).map(|c| c.group.clone()) else { return };
                let kpi = self.kpi(&group, hour);
                kpi.rated += 1;
                kpi.rating_sum += u64::from(*score);
            }
            _ => {}
        }
    }

    /// Rules 25: takes back the first answer of a conversation, counted at `since` in
    /// `group`'s hour then with its wait from `created_at` (and whether that was within
    /// the group's SLA), when that hour is still kept.
    fn answer_taken_back(&mut self, group: &SkillGroupId, since: Timestamp, created_at: Timestamp) {
        let hour = since.0 / HOUR_MS;
        let wait = since.millis_since(created_at);
        let within = self.groups.get(group).is_some_and(|g| wait <= g.config.sla_ms);
        let Some(kpi) = self.kpis.get_mut(group).and_then(|hours| hours.get_mut(&hour)) else { return };
        kpi.answered = kpi.answered.saturating_sub(1);
        kpi.wait_ms = kpi.wait_ms.saturating_sub(wait);
        kpi.answered_in_sla = kpi.answered_in_sla.saturating_sub(u64::from(within));
        self.dirty.kpis.insert((group.clone(), hour));
    }

    /// Adds the time of `operator`'s current break, if it has a reason, to that
    /// reason's total for the hour it ends in.
    fn end_break(&mut self, operator: &OperatorId, at: Timestamp) {
        let Some(op) = self.operators.get(operator) else { return };
        if op.presence != Presence::Break {
            return;
        }
        let Some(reason) = self.presence_reasons.get(operator).cloned() else { return };
        let spent = at.millis_since(op.presence_since);
        let hour = at.0 / HOUR_MS;
        let hours = self.pause_totals.entry(operator.clone()).or_default();
        if !hours.contains_key(&hour) {
            let kept = hours.split_off(&hour.saturating_sub(KPI_HOURS_KEPT - 1));
            for old in std::mem::replace(hours, kept).into_keys() {
                self.dirty.pause_totals.insert((operator.clone(), old));
            }
        }
        *hours.entry(hour).or_default().entry(reason).or_default() += spent;
        self.dirty.pause_totals.insert((operator.clone(), hour));
    }

    /// Each operator's time on break per reason from `since_hour` on.
    pub fn pauses_since(&self, since_hour: u64) -> BTreeMap<OperatorId, BTreeMap<String, u64>> {
        let mut out: BTreeMap<OperatorId, BTreeMap<String, u64>> = BTreeMap::new();
        for (operator, hours) in &self.pause_totals {
            for reasons in hours.range(since_hour..).map(|(_, r)| r) {
                for (reason, ms) in reasons {
                    *out.entry(operator.clone()).or_default().entry(reason.clone()).or_default() += ms;
                }
            }
        }
        out
    }

    /// The counters of `group` for `hour`, made on first use; a group's hours older
    /// than [`KPI_HOURS_KEPT`] go when a new one starts.
    fn kpi(&mut self, group: &SkillGroupId, hour: u64) -> &mut GroupKpi {
        let hours = self.kpis.entry(group.clone()).or_default();
        if !hours.contains_key(&hour) {
            let oldest_kept = hour.saturating_sub(KPI_HOURS_KEPT - 1);
            let kept = hours.split_off(&oldest_kept);
            for old in std::mem::replace(hours, kept).into_keys() {
                self.dirty.kpis.insert((group.clone(), old));
            }
        }
        self.dirty.kpis.insert((group.clone(), hour));
        hours.entry(hour).or_default()
    }

    /// Appends to a conversation's history only.
    fn record_unmirrored(&mut self, conversation: ConversationId, at: Timestamp, item: HistoryItem, touched: &mut Touched) -> Option<u64> {
        let conv = self.conversations.get_mut(&conversation)?;
        let seq = conv.last_seq + 1;
        conv.last_seq = seq;
        conv.pending.push(HistoryEntry { seq, at, item });
        touched.conversations.insert(conversation);
        Some(seq)
    }

    fn release(&mut self, conversation: ConversationId, operator: &OperatorId, at: Timestamp, touched: &mut Touched) {
        if let Some(op) = self.operators.get_mut(operator) {
            if op.active.remove(&conversation) {
                op.feed.push(at, FeedItem::Released { conversation });
            }
            touched.operators.insert(operator.clone());
            touched.groups.extend(op.config.groups.iter().cloned());
        }
    }
}
