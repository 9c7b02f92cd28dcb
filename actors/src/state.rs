//! The replicated state of one shard and the pure `apply` that advances it.
//!
//! Architecture invariant: nothing here performs I/O, reads a clock or draws a random
//! number; applying the same events to the same state gives the same state on every
//! replica, which is what lets a routing decision be replayed from the log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    pub decisions: BTreeMap<OfferId, DecisionRecord>,
    pub templates: BTreeMap<String, Template>,
    pub attachments: BTreeMap<AttachmentId, Attachment>,
    pub next_conversation: u64,
    pub next_offer: u64,
    /// Queue positions: a conversation keeps its ticket when an offer fails.
    pub next_ticket: u64,
    /// The routing rules in force (see `core::RULES_VERSION`); 0 and 1 are the first
    /// rules. Changing behaviour is gated on it, so a log replays as it was decided.
    #[serde(default)]
    pub rules: u32,
    /// Per login, the session epoch staff tokens must name to be valid; advanced by a
    /// password change, a logout or an admin ending the login's sessions.
    #[serde(default)]
    pub session_epochs: BTreeMap<String, u64>,
    /// Per channel, the groups its public widget may start in besides the default.
    #[serde(default)]
    pub channel_public_groups: BTreeMap<ChannelId, Vec<SkillGroupId>>,
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
/// conversations they hold. Sequence numbers start at 1 and never repeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Feed {
    pub last_seq: u64,
    pub entries: VecDeque<FeedEntry>,
}

impl Feed {
    fn push(&mut self, at: Timestamp, item: FeedItem) {
        self.last_seq += 1;
        self.entries.push_back(FeedEntry { seq: self.last_seq, at, item });
        while self.entries.len() > FEED_RETAINED {
            self.entries.pop_front();
        }
    }

    /// Entries after `after_seq`, or `None` when some of them are no longer retained.
    pub fn since(&self, after_seq: u64) -> Option<Vec<FeedEntry>> {
        let first = self.entries.front().map(|e| e.seq).unwrap_or(self.last_seq + 1);
        if after_seq + 1 < first && after_seq < self.last_seq {
            return None;
        }
        Some(self.entries.iter().filter(|e| e.seq > after_seq).cloned().collect())
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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Conversation {
    pub id: ConversationId,
    pub channel: ChannelId,
    pub visitor: Visitor,
    pub group: SkillGroupId,
    pub status: ConversationStatus,
    pub created_at: Timestamp,
    /// Everything that happened, in the one order every reader sees (I5).
    pub history: Vec<HistoryEntry>,
    /// Idempotency keys already used by the client and operators, with the sequence
    /// number of the message each produced.
    pub keys: BTreeMap<String, u64>,
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
    pub fn last_seq(&self) -> u64 {
        self.history.last().map(|e| e.seq).unwrap_or(0)
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
    /// Applies one committed event. Events were validated when they were decided, so a
    /// reference to something missing is skipped rather than trusted.
    pub fn apply(&mut self, event: &Event, at: Timestamp) -> Touched {
        let mut touched = Touched::default();
        match event {
            Event::SkillGroupUpserted(config) => {
                touched.groups.insert(config.id.clone());
                self.groups
                    .entry(config.id.clone())
                    .and_modify(|g| g.config = config.clone())
                    .or_insert_with(|| SkillGroup { config: config.clone(), queue: BTreeSet::new() });
            }
            Event::OperatorUpserted(config) => {
                touched.operators.insert(config.id.clone());
                touched.groups.extend(config.groups.iter().cloned());
                self.operators
                    .entry(config.id.clone())
                    .and_modify(|o| o.config = config.clone())
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
            }
            Event::ChannelUpserted(config) => {
                self.channels.insert(config.id.clone(), config.clone());
            }
            Event::UserUpserted(user) => {
                self.users.insert(user.login.clone(), user.clone());
            }
            Event::ConversationStarted { conversation, channel, visitor } => {
                self.next_conversation = self.next_conversation.max(conversation.0 + 1);
                let group = self
                    .channels
                    .get(channel)
                    .map(|c| c.default_group.clone())
                    .unwrap_or_else(|| SkillGroupId::new(""));
                self.conversations.insert(
                    *conversation,
                    Conversation {
                        id: *conversation,
                        channel: channel.clone(),
                        visitor: visitor.clone(),
                        group,
                        status: ConversationStatus::Closed,
                        created_at: at,
                        history: Vec::new(),
                        keys: BTreeMap::new(),
                        passed_by: BTreeSet::new(),
                        last_pass: None,
                        client_read_upto: 0,
                        operator_read_upto: 0,
                        decisions: Vec::new(),
                        handled_by: BTreeSet::new(),
                    },
                );
                self.record(*conversation, at, HistoryItem::Started { channel: channel.clone(), visitor: visitor.clone() }, &mut touched);
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
                self.record(*conversation, at, HistoryItem::Queued { group: group.clone() }, &mut touched);
            }
            Event::ClientMessagePosted { conversation, key, text, attachments } => {
                let item = HistoryItem::ClientMessage { key: key.clone(), text: text.clone(), attachments: attachments.clone() };
                let seq = self.record(*conversation, at, item, &mut touched);
                if let (Some(conv), Some(seq)) = (self.conversations.get_mut(conversation), seq) {
                    conv.keys.insert(key.clone(), seq);
                }
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
                let seq = self.record(*conversation, at, item, &mut touched);
                if let (Some(conv), Some(seq)) = (self.conversations.get_mut(conversation), seq) {
                    conv.keys.insert(key.clone(), seq);
                }
            }
            Event::OfferMade { offer, decision } => {
                self.next_offer = self.next_offer.max(offer.id.0 + 1);
                self.offers.insert(offer.id, offer.clone());
                self.decisions.insert(offer.id, decision.clone());
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
                if let Some(offer) = self.offers.remove(offer) {
                    if let Some(op) = self.operators.get_mut(&offer.operator) {
                        op.offers.remove(&offer.id);
                    }
                    touched.operators.insert(offer.operator);
                }
            }
            Event::OfferWithdrawn { offer, reason, .. } => {
                if let Some(offer) = self.offers.remove(offer) {
                    if let Some(op) = self.operators.get_mut(&offer.operator) {
                        op.offers.remove(&offer.id);
                        op.feed.push(at, FeedItem::OfferWithdrawn { offer: offer.id, conversation: offer.conversation, reason: *reason });
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
                self.record_unmirrored(*conversation, at, item, &mut touched);
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
                self.record(*conversation, at, item, &mut touched);
                if let (TransferTarget::Group(_), Some(conv)) = (to, self.conversations.get_mut(conversation)) {
                    // The group queue should not hand it straight back to its sender.
                    conv.passed_by.insert(from.clone());
                    conv.last_pass = Some(at);
                }
                self.release(*conversation, from, at, &mut touched);
            }
            Event::ConversationClosed { conversation, by, resolution, tags } => {
                let item = HistoryItem::Closed { by: *by, resolution: resolution.clone(), tags: tags.clone() };
                self.record(*conversation, at, item, &mut touched);
                let previous = self
                    .conversations
                    .get_mut(conversation)
                    .map(|conv| std::mem::replace(&mut conv.status, ConversationStatus::Closed));
                match previous {
                    Some(ConversationStatus::Assigned { operator }) => self.release(*conversation, &operator, at, &mut touched),
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
            Event::ConversationRated { conversation, score, comment } => {
                self.record(*conversation, at, HistoryItem::Rated { score: *score, comment: comment.clone() }, &mut touched);
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
            }
            Event::ConversationReassigned { conversation, by, to, comment } => {
                let item = HistoryItem::Transferred { from: OperatorId::new(by.clone()), to: to.clone(), comment: comment.clone() };
                self.record(*conversation, at, item, &mut touched);
                let status = self.conversations.get(conversation).map(|c| (c.status.clone(), c.group.clone()));
                match status {
                    Some((ConversationStatus::Assigned { operator }, _)) => self.release(*conversation, &operator, at, &mut touched),
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
                self.rules = self.rules.max(*version);
            }
            Event::SessionsEnded { login } => {
                *self.session_epochs.entry(login.clone()).or_insert(0) += 1;
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
        }
        touched
    }

    fn operator_name(&self, operator: &OperatorId) -> String {
        self.operators.get(operator).map(|o| o.config.name.clone()).unwrap_or_else(|| operator.0.clone())
    }

    /// Appends to a conversation's history and mirrors the entry into the feed of the
    /// operator holding it. Returns the new entry's sequence number.
    fn record(&mut self, conversation: ConversationId, at: Timestamp, item: HistoryItem, touched: &mut Touched) -> Option<u64> {
        let seq = self.record_unmirrored(conversation, at, item, touched)?;
        let conv = self.conversations.get(&conversation)?;
        let entry = conv.history.last()?.clone();
        if let Some(operator) = conv.assigned().cloned() {
            if let Some(op) = self.operators.get_mut(&operator) {
                op.feed.push(at, FeedItem::Conversation { conversation, entry });
                touched.operators.insert(operator);
            }
        }
        Some(seq)
    }

    /// Appends to a conversation's history only.
    fn record_unmirrored(&mut self, conversation: ConversationId, at: Timestamp, item: HistoryItem, touched: &mut Touched) -> Option<u64> {
        let conv = self.conversations.get_mut(&conversation)?;
        let seq = conv.last_seq() + 1;
        conv.history.push(HistoryEntry { seq, at, item });
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
