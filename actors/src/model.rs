//! Identifiers, configuration records and the commands and events of a shard.
//!
//! Commands are imperative requests (`AcceptOffer`); events are past-tense facts
//! (`OfferAccepted`). Both are serialized into Raft entries, so every enum here is part
//! of the storage format: add variants at the end and never reuse a removed name.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. The core never reads a clock: the proposer stamps
/// each entry and that stamp is the only "now" the core sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// An operator, as configured by an admin (`alice`).
    OperatorId
);
string_id!(
    /// A skill group: a queue plus the operators qualified for it (`billing`).
    SkillGroupId
);
string_id!(
    /// A configured channel (`web`, `telegram-main`).
    ChannelId
);

/// A conversation, numbered by the shard that owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConversationId(pub u64);

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// An offer of one conversation to one operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OfferId(pub u64);

impl fmt::Display for OfferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "o{}", self.0)
    }
}

/// How a skill group chooses among its eligible operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The operator whose last assignment (or going online) is oldest.
    LongestIdle,
    /// The operator with the lowest load relative to capacity; ties go to the longest idle.
    LeastOccupied,
}

impl Policy {
    /// Bumped whenever a selector's scoring changes, so a stored decision record says
    /// which rules produced it.
    pub const VERSION: u32 = 1;

    pub fn name(self) -> &'static str {
        match self {
            Policy::LongestIdle => "longest_idle",
            Policy::LeastOccupied => "least_occupied",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillGroupConfig {
    pub id: SkillGroupId,
    pub name: String,
    pub policy: Policy,
    /// How long an operator has to accept an offer before it passes to the next one.
    pub offer_timeout_ms: u64,
    /// Target longest wait in the queue; supervisors see who is within it.
    pub sla_ms: u64,
}

/// How a skill group orders its queue and paces its operators (rules 5), set apart from
/// [`SkillGroupConfig`] so that configuration keeps its stored format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRouting {
    /// Priority a waiting conversation gets when its visitor has an attribute with a
    /// value (the highest matching one counts), added to its channel's priority.
    pub attribute_priorities: Vec<AttributePriority>,
    /// A waiting conversation gains one priority level per `ageing_ms` waited (0: no
    /// ageing), so nothing waits for ever behind a stream of higher priorities.
    pub ageing_ms: u64,
    /// After a conversation they held closes, an operator gets no offer for this long
    /// (wrap-up); they may end it early.
    pub wrap_up_ms: u64,
    /// A returning customer (verified visitor) whose last conversation closed less than
    /// this long ago is offered first to the operator who served it, when that operator
    /// can take it (online, in the group, with room, not in wrap-up, not passed); 0: no
    /// sticky routing.
    #[serde(default)]
    pub sticky_ms: u64,
    /// When the operator wrote last and the customer has said nothing for this long, the
    /// customer is reminded with `inactivity_message` (0: never).
    #[serde(default)]
    pub inactivity_remind_ms: u64,
    /// ... and after this long the conversation is closed, by `system`, with the
    /// resolution `inactive` (0: never).
    #[serde(default)]
    pub inactivity_close_ms: u64,
    /// The reminder's text; empty: a default one.
    #[serde(default)]
    pub inactivity_message: String,
    /// Skills (name, minimum level 1-5) every conversation of the group needs.
    #[serde(default)]
    pub required_skills: Vec<(String, u8)>,
    /// Skills a conversation needs when its visitor has an attribute with a value
    /// (`language` = `ru` needs `ru` at level 3, …).
    #[serde(default)]
    pub skill_rules: Vec<SkillRule>,
}

/// A skill a conversation needs when its visitor has `attribute` = `value`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillRule {
    pub attribute: String,
    pub value: String,
    pub skill: String,
    pub level: u8,
}

/// One step of a group's routing rule (rules 6): from `after_ms` waited in the group's
/// queue on, a conversation is routed to this step's target instead of the previous
/// one's. Step 0 is implicit: the group's own requirements from arrival; configured
/// steps are numbered from 1, each wider than the last (for example level 4+, after
/// 30 s level 2+, after 90 s the overflow group too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingStep {
    /// Waited in the group's queue, in milliseconds, before this step applies (> 0,
    /// strictly increasing from step to step).
    pub after_ms: u64,
    /// The skills (name, minimum level) needed at this step, replacing the group's
    /// required skills; `None` keeps them. The group's attribute skill rules still apply.
    pub skills: Option<Vec<(String, u8)>>,
    /// Caps every level needed at this step (required skills and attribute rules) at
    /// this value, 1-5; 0: no cap.
    pub max_level: u8,
    /// Other groups whose operators may also take the conversation at this step
    /// (overflow); it keeps its place in this group's queue.
    pub overflow: Vec<SkillGroupId>,
}

/// What a conversation arriving while its group is closed gets (rules 6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedAction {
    /// It is told the message and closed by `system` with the resolution `after_hours`.
    Reply,
    /// It is told the message (if any) and waits in the queue: the group makes no
    /// offers until it opens.
    Wait,
    /// It is told the message (if any) and queued in this other group instead.
    Transfer(SkillGroupId),
}

/// A group's opening hours (rules 6): a weekly schedule in a time zone, with holidays
/// that replace a date's hours. While closed the group makes no offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpeningHours {
    /// An IANA time zone name (`Europe/Moscow`), resolved with the tz database this
    /// build carries (docs/adr/0002).
    pub time_zone: String,
    /// Open intervals: day of the week (0 Monday .. 6 Sunday), opening and closing
    /// minute of the local day (closing up to 1440, after opening).
    pub weekly: Vec<(u8, u16, u16)>,
    /// Dates (`YYYY-MM-DD`, local) whose hours replace the weekly ones: no intervals
    /// means closed all day.
    pub holidays: Vec<(String, Vec<(u16, u16)>)>,
    pub closed_action: ClosedAction,
    /// What a customer is told outside hours (the widget shows it before they write).
    pub message: String,
}

/// What an emergency notice covers: every conversation of a channel, or of a group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeTarget {
    Channel(ChannelId),
    Group(SkillGroupId),
}

/// Which list a rule is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessList {
    Block,
    Allow,
}

/// What a rule matches: an IP address or CIDR range (checked by the gateway, which
/// sees addresses), or a verified visitor id (also checked by the core).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessKind {
    Ip,
    Visitor,
}

/// One entry of a block or allow list, for one channel or (`None`) every channel.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AccessRule {
    pub list: AccessList,
    pub channel: Option<ChannelId>,
    pub kind: AccessKind,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributePriority {
    pub attribute: String,
    pub value: String,
    pub priority: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorConfig {
    pub id: OperatorId,
    pub name: String,
    /// Maximum concurrent conversations, counting offers not yet answered.
    pub capacity: u32,
    pub groups: Vec<SkillGroupId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelConfig {
    pub id: ChannelId,
    /// The adapter kind: `web`, `telegram`, `email`, `api`…
    pub kind: String,
    pub name: String,
    /// Where conversations from this channel queue unless the client asks for a group.
    pub default_group: SkillGroupId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Operator,
    Supervisor,
    Admin,
}

/// A login. The password is stored only as an argon2 PHC string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub login: String,
    pub password_hash: String,
    pub role: Role,
    pub operator: Option<OperatorId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Away,
    Offline,
    /// A scheduled break: like away, reported separately.
    Break,
}

/// What the client told us about themselves when the conversation started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visitor {
    /// A stable id the widget keeps for this visitor, linking their conversations.
    pub id: Option<String>,
    pub name: String,
    /// Free-form identity attributes (email, phone, customer number…).
    pub attributes: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferTarget {
    Operator(OperatorId),
    Group(SkillGroupId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Closer {
    Client,
    Operator,
    /// The server, after the customer stopped answering (rules 5, inactivity).
    System,
}

/// Why an offer stopped being pending without being accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawReason {
    Declined,
    Expired,
    ConversationClosed,
    OperatorUnavailable,
    Reassigned,
}

/// An imperative request to a shard. The proposer stamps it into an [`Envelope`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    UpsertSkillGroup(SkillGroupConfig),
    UpsertOperator(OperatorConfig),
    UpsertChannel(ChannelConfig),
    UpsertUser(UserRecord),
    StartConversation {
        channel: ChannelId,
        group: Option<SkillGroupId>,
        visitor: Visitor,
    },
    PostClientMessage {
        conversation: ConversationId,
        key: String,
        text: String,
        attachments: Vec<AttachmentId>,
    },
    CloseByClient {
        conversation: ConversationId,
    },
    Rate {
        conversation: ConversationId,
        score: u8,
        comment: String,
    },
    SetPresence {
        operator: OperatorId,
        presence: Presence,
    },
    AcceptOffer {
        operator: OperatorId,
        offer: OfferId,
    },
    DeclineOffer {
        operator: OperatorId,
        offer: OfferId,
        reason: String,
    },
    /// Sent by the operator actor's timer when an offer's deadline passes.
    ExpireOffer {
        offer: OfferId,
    },
    PostOperatorMessage {
        operator: OperatorId,
        conversation: ConversationId,
        key: String,
        text: String,
        attachments: Vec<AttachmentId>,
    },
    Transfer {
        operator: OperatorId,
        conversation: ConversationId,
        target: TransferTarget,
        comment: String,
    },
    CloseByOperator {
        operator: OperatorId,
        conversation: ConversationId,
        resolution: String,
        tags: Vec<String>,
    },
    /// A supervisor moves a queued or assigned conversation.
    Reassign {
        by: String,
        conversation: ConversationId,
        target: TransferTarget,
        comment: String,
    },
    UpsertTemplate(Template),
    DeleteTemplate {
        id: String,
    },
    SetFavourite {
        operator: OperatorId,
        template: String,
        favourite: bool,
    },
    /// The file is already durable in the blob store; this records who may use it.
    StoreAttachment(Attachment),
    /// Sent by the skill group's actor when a queue timer is due: routes the group's
    /// queue at the entry's time, so conversations whose re-offer pause has passed get a
    /// new round of offers.
    RouteQueue {
        group: SkillGroupId,
    },
    /// The visitor, or the operator holding it, has read the conversation up to `upto`.
    MarkRead {
        conversation: ConversationId,
        reader: Reader,
        upto: u64,
    },
    /// Switches the shard to a newer version of the routing rules from this entry on.
    /// Entries before it replay under the rules they were decided with.
    AdoptRules {
        version: u32,
    },
    /// Ends every session of a login: its tokens issued before this entry stop working
    /// (logout, an admin's "end sessions").
    EndSessions {
        login: String,
    },
    /// The groups a channel's public widget may start conversations in, besides its
    /// default group.
    SetChannelPublicGroups {
        channel: ChannelId,
        groups: Vec<SkillGroupId>,
    },
    /// How long a channel's closed conversations are kept, in days; 0 keeps them.
    SetChannelRetention {
        channel: ChannelId,
        days: u32,
    },
    /// Deletes the closed conversations whose channel's retention has run out as of
    /// `as_of` (history, rating, decision records, attachments), a bounded number per
    /// entry. Proposed by the node's retention timer, never by a client.
    PurgeExpired {
        as_of: Timestamp,
    },
    /// Changes a user's role and linked operator and keeps their password (an admin's
    /// edit that does not re-enter it).
    UpdateUser {
        login: String,
        role: Role,
        operator: Option<OperatorId>,
    },
    /// A staff member's internal note on a conversation, open or closed: in its history
    /// for staff, never shown to the visitor. `key` makes a retry write it once.
    AddNote {
        conversation: ConversationId,
        author: String,
        name: String,
        key: String,
        text: String,
    },
    /// The operators with a live operator socket on `node`, as that node counts them:
    /// sent when the set changes and as a heartbeat every few seconds
    /// ([`crate::state::SOCKET_LEASE_MS`] bounds how long one report counts).
    OperatorsConnected {
        node: u64,
        operators: Vec<OperatorId>,
    },
    /// Sets away every online operator who has had no live socket for `grace_ms` as of
    /// this entry, counting from no earlier than `since` (when the proposing leader
    /// started watching), and withdraws their pending offers. Proposed by the leader.
    MarkAbsent {
        grace_ms: u64,
        since: Timestamp,
    },
    /// A skill group's queue order and pacing (rules 5): priorities, ageing, wrap-up.
    SetGroupRouting {
        group: SkillGroupId,
        routing: GroupRouting,
    },
    /// A channel's base priority (rules 5): its conversations start at this level.
    SetChannelPriority {
        channel: ChannelId,
        priority: u32,
    },
    /// The operator is ready before their wrap-up time ran out.
    EndWrapUp {
        operator: OperatorId,
    },
    /// The reasons operators may give for a break (lunch, training, coaching …).
    SetPauseReasons {
        reasons: Vec<String>,
    },
    /// The operator goes on a break for one of the configured reasons.
    TakeBreak {
        operator: OperatorId,
        reason: String,
    },
    /// Switches a channel or group into emergency mode with `message` (an outage notice
    /// every new customer there gets at once), or out of it with `None`. `by` is the
    /// supervisor's login; both land in the audit trail.
    SetEmergency {
        target: NoticeTarget,
        message: Option<String>,
        by: String,
    },
    /// Adds a block or allow rule with a note (`Some`), or removes it (`None`).
    SetAccessRule {
        rule: AccessRule,
        note: Option<String>,
        by: String,
    },
    /// Whether only the channel's allow list may start conversations there, and what a
    /// refused customer is told (empty: the default text).
    SetChannelAccess {
        channel: ChannelId,
        allow_only: bool,
        message: String,
        by: String,
    },
    /// Reminds the customers who stopped answering and closes the conversations whose
    /// customer has been silent too long, per their group's inactivity times, as of
    /// this entry. Proposed by the leader's timer.
    SweepInactive,
    /// Per channel kind (`web`, `email`…), how many conversations of that kind the
    /// operator may hold at once (offers included), within their overall capacity; and
    /// the kinds they take at all (empty: every kind). Rules 5.
    SetOperatorChannels {
        operator: OperatorId,
        limits: ChannelLimits,
    },
    /// An operator's skills with their levels (1-5), for skill-based routing (rules 5).
    SetOperatorSkills {
        operator: OperatorId,
        skills: Vec<(String, u8)>,
    },
    /// A group's routing steps (rules 6): relaxation and overflow over waiting time.
    SetGroupSteps {
        group: SkillGroupId,
        steps: Vec<RoutingStep>,
    },
    /// A group's opening hours (rules 6), or none (`None`: always open).
    SetGroupHours {
        group: SkillGroupId,
        hours: Option<OpeningHours>,
    },
    /// How much of an operator's capacity a conversation of each channel kind takes
    /// (rules 6); a kind not listed weighs 1.
    SetChannelWeights {
        weights: Vec<(String, u32)>,
    },
    /// Connects a channel to its provider (ADR 0009), or disconnects it (`None`): its
    /// customers' messages then come in through [`Command::ChannelInbound`] and what
    /// staff and the system tell them goes out through the channel's outbox.
    SetChannelAdapter {
        channel: ChannelId,
        adapter: Option<AdapterConfig>,
    },
    /// A customer's message as a channel's provider delivered it. `provider_message_id`
    /// makes a redelivery harmless: it is written once. The sender's open conversation
    /// on the channel gets it; without one, a new conversation starts.
    ChannelInbound {
        channel: ChannelId,
        sender: String,
        sender_name: String,
        provider_message_id: String,
        text: String,
    },
    /// The outbox worker on `node` is about to hand these entries to their provider.
    DeliveriesAttempted {
        node: u64,
        items: Vec<(ConversationId, u64)>,
    },
    /// What providers answered for outbox entries, and receipts they reported later.
    DeliveryResults {
        results: Vec<DeliveryResult>,
    },
    /// A supervisor sends a failed (dead-lettered) outbox entry again.
    RetryDelivery {
        conversation: ConversationId,
        seq: u64,
        by: String,
    },
    /// The key a channel's site or app signs its customers' identities with, or none.
    SetChannelIdentity {
        channel: ChannelId,
        key: Option<IdentityKey>,
    },
    /// Puts a bot before the channel's operators (rules 7), or takes it away (`None`):
    /// new conversations there go to the bot, which answers and hands over.
    SetChannelBot {
        channel: ChannelId,
        bot: Option<BotConfig>,
    },
    /// The channel's bot answers in a conversation it holds; `buttons` are quick
    /// replies the customer may tap.
    BotReply {
        channel: ChannelId,
        conversation: ConversationId,
        key: String,
        text: String,
        buttons: Vec<String>,
    },
    /// The bot hands the conversation to a skill group (its own group when `None`), with
    /// why and what it learned, which the operator reads.
    Handoff {
        channel: ChannelId,
        conversation: ConversationId,
        group: Option<SkillGroupId>,
        reason: String,
        context: Vec<(String, String)>,
    },
    /// The bot resolved the conversation itself.
    CloseByBot {
        channel: ChannelId,
        conversation: ConversationId,
        resolution: String,
    },
    /// A customer's message with what [`Command::ChannelInbound`] cannot carry: files
    /// already in the blob store, the conversation it answers when the channel can say so
    /// (an email whose `References` name one of our messages), and attributes for a
    /// conversation it starts (an email's subject and Message-ID).
    ChannelInboundRich {
        channel: ChannelId,
        sender: String,
        sender_name: String,
        provider_message_id: String,
        text: String,
        files: Vec<InboundFile>,
        thread: Option<ConversationId>,
        attributes: Vec<(String, String)>,
    },
    /// A letter from another group (ADR 0006), proposed to its destination by the
    /// sender's forwarder: applied if it is the next one from `from`, dropped as a repeat
    /// or as early otherwise. Answered with the last id applied from `from`.
    Deliver {
        from: u64,
        id: u64,
        mail: crate::mail::Mail,
    },
    /// The destination `to` applied every letter up to `upto`: the sender drops them.
    ConfirmMail {
        to: u64,
        upto: u64,
    },
    /// As `AcceptOffer`, with when the operator's answer reached the gateway (rules 9):
    /// an answer that arrived before the offer's deadline counts even when the offer
    /// expired meanwhile (the cluster stalled or changed leader), as long as the
    /// conversation still waits for an operator and this one has room.
    AcceptOfferAt {
        operator: OperatorId,
        offer: OfferId,
        received_at: Timestamp,
    },
    /// The nodes that hold group `group`'s state and answer its reads (its voters),
    /// committed by the placement in the metadata group (ADR 0012). A node not named
    /// reads the group from those named.
    HoldersSet {
        group: u64,
        nodes: Vec<u64>,
    },
    /// As `StartConversation`, with the key the client (or the gateway relaying it)
    /// chose for this start: a start sent again with the same key in the same channel,
    /// by the same visitor within `core::START_KEY_WINDOW_MS`, gets the conversation the
    /// first one opened, as long as that is kept, instead of a second one (a retry after
    /// an answer lost with a node).
    StartConversationOnce {
        key: String,
        channel: ChannelId,
        group: Option<SkillGroupId>,
        visitor: Visitor,
    },
    /// Node `id` was removed from the cluster (routing rules 19): from now on it is
    /// refused as a member of any group, whatever certificate it holds (records `!`).
    ForgetNode {
        id: u64,
    },
}

/// A file a customer sent through a channel, stored in the blob store before the
/// message is proposed; it becomes an [`Attachment`] of the message's conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundFile {
    pub id: AttachmentId,
    pub name: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
}

/// A channel's bot (docs/channel-api.md, "Bots"): where its events go, signed with
/// `signing_secret`, and the SHA-256 (hex) of the token it calls the Bot API with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotConfig {
    pub url: String,
    pub token_sha256: String,
    pub signing_secret: String,
}

/// How a channel verifies the customer identity its site or app passes (a JWT): with a
/// shared secret (`Hs256`) or the site's RSA public key (`Rs256`, PEM, SubjectPublicKeyInfo).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentityKey {
    Hs256 { secret: String },
    Rs256 { public_key_pem: String },
}

impl IdentityKey {
    pub fn alg(&self) -> &'static str {
        match self {
            IdentityKey::Hs256 { .. } => "HS256",
            IdentityKey::Rs256 { .. } => "RS256",
        }
    }
}

/// How a channel reaches its provider (ADR 0009). Secrets stay in the replicated
/// state (every node may run the outbox); the REST API never shows them in full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdapterConfig {
    /// Telegram Bot API: webhooks carry `secret` in `X-Telegram-Bot-Api-Secret-Token`;
    /// replies go to `{api_base}/bot{bot_token}/sendMessage`.
    Telegram { bot_token: String, secret: String, api_base: String },
    /// The open Channel API (docs/channel-api.md): an adapter pushes inbound messages
    /// with a bearer token whose SHA-256 is `token_sha256` (hex), and receives outbound
    /// ones at `outbound_url`, signed with HMAC-SHA256 under `signing_secret`.
    Api { token_sha256: String, outbound_url: String, signing_secret: String },
    /// WhatsApp Cloud API: webhooks signed with `app_secret` (`X-Hub-Signature-256`),
    /// verified once with `verify_token`; replies go to
    /// `{api_base}/{phone_number_id}/messages` with `access_token`.
    WhatsApp { access_token: String, app_secret: String, verify_token: String, phone_number_id: String, api_base: String },
    /// VK community (Callback API): events carry `secret`; the server is confirmed by
    /// answering `confirmation` for `group_id`; replies go through `messages.send`.
    Vk { access_token: String, secret: String, confirmation: String, group_id: String, api_base: String },
    /// Facebook Messenger (a page): webhooks signed with `app_secret`, verified with
    /// `verify_token`; replies through the Send API with `page_token`.
    Messenger { page_token: String, app_secret: String, verify_token: String, api_base: String },
    /// Viber bot: callbacks signed with `auth_token`; replies through `send_message` as
    /// `sender_name`.
    Viber { auth_token: String, sender_name: String, api_base: String },
    /// Email: mail for `address` comes in through the node's SMTP listener; replies go
    /// out through the relay at `smtp_host:smtp_port` (`smtp_security`: `tls`,
    /// `starttls` or `none`), signed in with `smtp_username`/`smtp_password` when the
    /// username is set. Our Message-IDs carry a tag made with `thread_secret`, so a reply
    /// that names one finds its conversation and a forged one does not.
    Email {
        address: String,
        display_name: String,
        smtp_host: String,
        smtp_port: u16,
        smtp_security: String,
        smtp_username: String,
        smtp_password: String,
        thread_secret: String,
    },
}

impl AdapterConfig {
    /// The adapter's kind as the API names it.
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterConfig::Telegram { .. } => "telegram",
            AdapterConfig::Api { .. } => "api",
            AdapterConfig::WhatsApp { .. } => "whatsapp",
            AdapterConfig::Vk { .. } => "vk",
            AdapterConfig::Messenger { .. } => "messenger",
            AdapterConfig::Viber { .. } => "viber",
            AdapterConfig::Email { .. } => "email",
        }
    }

    /// The longest text the provider takes in one message, in characters, when it is
    /// below what the core takes anyway.
    pub fn max_text_chars(&self) -> Option<usize> {
        match self {
            AdapterConfig::Messenger { .. } => Some(2000),
            _ => None,
        }
    }

    /// Whether staff's files go out to the channel's customers under `rules`: email
    /// always; Telegram, WhatsApp, Messenger and VK from rules 8, the Channel API from
    /// rules 13 (before, such a message was refused, and a replayed log must decide as
    /// it did); Viber not yet.
    pub fn carries_files(&self, rules: u32) -> bool {
        match self {
            AdapterConfig::Email { .. } => true,
            AdapterConfig::Telegram { .. } | AdapterConfig::WhatsApp { .. } | AdapterConfig::Messenger { .. } | AdapterConfig::Vk { .. } => rules >= 8,
            AdapterConfig::Api { .. } => rules >= 13,
            AdapterConfig::Viber { .. } => false,
        }
    }

    /// Whether a message with files may have text (Messenger's Send API takes an
    /// attachment or a text, not both).
    pub fn text_with_files(&self) -> bool {
        !matches!(self, AdapterConfig::Messenger { .. })
    }

    /// Files one message may carry, when the provider sends fewer than the core takes
    /// as one message (WhatsApp: one file per message).
    pub fn max_files(&self) -> Option<usize> {
        match self {
            AdapterConfig::WhatsApp { .. } | AdapterConfig::Messenger { .. } => Some(1),
            _ => None,
        }
    }

    /// The longest text that goes with files, as their caption, in characters.
    pub fn max_caption_chars(&self) -> Option<usize> {
        match self {
            AdapterConfig::Telegram { .. } | AdapterConfig::WhatsApp { .. } => Some(1024),
            _ => None,
        }
    }

    /// Whether sending an entry again after an attempt whose outcome is unknown can
    /// deliver it twice. The Channel API passes a delivery id the adapter deduplicates
    /// on; Telegram's sendMessage has no idempotency key.
    pub fn resend_is_safe(&self) -> bool {
        // VK drops a message whose random_id it has seen (derived from the entry).
        matches!(self, AdapterConfig::Api { .. } | AdapterConfig::Vk { .. })
    }
}

/// One outcome for one outbox entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryResult {
    pub conversation: ConversationId,
    pub seq: u64,
    /// The node whose attempt this answers (its outbox worker), or 0 for a receipt,
    /// a status an adapter reported, or a new leader settling an orphaned attempt.
    pub node: u64,
    pub outcome: DeliveryOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryOutcome {
    /// The provider accepted it, under its own id for the message.
    Sent { provider_id: String },
    /// A failure that may heal (rate limit, 5xx, network): try again at `retry_at`.
    Retry { reason: String, retry_at: Timestamp },
    /// A failure that will not heal, or too many attempts: dead-lettered.
    Failed { reason: String },
    /// An attempt by an earlier leader whose outcome nobody knows, on a provider where
    /// sending again could deliver it twice: dead-lettered for a person to decide.
    Unknown,
    /// Receipts the provider reported.
    Delivered,
    Read,
}

/// An operator's per-channel-kind limits (rules 5).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelLimits {
    /// At most this many conversations of a kind at once; a kind absent here is bounded
    /// by the overall capacity only.
    pub per_kind: Vec<(String, u32)>,
    /// The kinds the operator takes; empty: every kind.
    pub only: Vec<String>,
}

/// Who read a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reader {
    Client,
    Operator(OperatorId),
}

/// A stored file, by id. The bytes live in the node's blob store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttachmentId(pub String);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: AttachmentId,
    pub conversation: ConversationId,
    pub name: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    /// `client` or the operator id that uploaded it.
    pub uploaded_by: String,
}

/// A reply template: shared within a skill group, or personal to an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub id: String,
    pub title: String,
    pub text: String,
    pub group: Option<SkillGroupId>,
    pub owner: Option<OperatorId>,
}

/// What is written to the Raft log: a command and the proposer's clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Storage format version of this entry.
    pub v: u16,
    pub at: Timestamp,
    pub command: Command,
}

impl Envelope {
    pub const VERSION: u16 = 1;

    pub fn new(at: Timestamp, command: Command) -> Self {
        Envelope { v: Self::VERSION, at, command }
    }
}

/// A pending offer: the operator's capacity is reserved until it is answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub id: OfferId,
    pub conversation: ConversationId,
    pub operator: OperatorId,
    pub group: SkillGroupId,
    pub made_at: Timestamp,
    pub deadline: Timestamp,
}

/// One operator as the selector saw it when it made a decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub operator: OperatorId,
    pub load: u32,
    pub capacity: u32,
    /// Why the operator could not be chosen, as a stable code (`offline`, `away`,
    /// `on_break`, `passed`, `at_capacity`); `None` for an eligible one.
    pub excluded: Option<String>,
    /// Higher is better; only eligible candidates are scored.
    pub score: Option<i64>,
}

/// "Why did she get this chat?": everything the selector saw and concluded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub offer: OfferId,
    pub conversation: ConversationId,
    pub group: SkillGroupId,
    pub policy: Policy,
    pub policy_version: u32,
    pub at: Timestamp,
    pub candidates: Vec<Candidate>,
    pub chosen: OperatorId,
}

/// A committed fact. The state changes only by applying these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    SkillGroupUpserted(SkillGroupConfig),
    OperatorUpserted(OperatorConfig),
    ChannelUpserted(ChannelConfig),
    UserUpserted(UserRecord),
    ConversationStarted {
        conversation: ConversationId,
        channel: ChannelId,
        visitor: Visitor,
    },
    ConversationQueued {
        conversation: ConversationId,
        group: SkillGroupId,
        ticket: u64,
    },
    ClientMessagePosted {
        conversation: ConversationId,
        key: String,
        text: String,
        attachments: Vec<Attachment>,
    },
    OperatorMessagePosted {
        conversation: ConversationId,
        operator: OperatorId,
        key: String,
        text: String,
        attachments: Vec<Attachment>,
    },
    OfferMade {
        offer: Offer,
        decision: DecisionRecord,
    },
    OfferAccepted {
        offer: OfferId,
    },
    OfferWithdrawn {
        offer: OfferId,
        reason: WithdrawReason,
        detail: String,
    },
    ConversationAssigned {
        conversation: ConversationId,
        operator: OperatorId,
    },
    ConversationTransferred {
        conversation: ConversationId,
        from: OperatorId,
        to: TransferTarget,
        comment: String,
    },
    ConversationClosed {
        conversation: ConversationId,
        by: Closer,
        resolution: String,
        tags: Vec<String>,
        /// When the conversation shard closed it, if that was before this entry (a
        /// routing shard applying its letter, rules 20): counted then, and a holder's
        /// wrap-up runs from then.
        #[serde(default)]
        decided_at: Option<Timestamp>,
    },
    ConversationRated {
        conversation: ConversationId,
        score: u8,
        comment: String,
        /// When the conversation shard took the rating, as for a close.
        #[serde(default)]
        decided_at: Option<Timestamp>,
    },
    PresenceChanged {
        operator: OperatorId,
        presence: Presence,
    },
    ConversationReassigned {
        conversation: ConversationId,
        by: String,
        to: TransferTarget,
        comment: String,
    },
    TemplateUpserted(Template),
    TemplateDeleted {
        id: String,
    },
    FavouriteSet {
        operator: OperatorId,
        template: String,
        favourite: bool,
    },
    AttachmentStored(Attachment),
    /// Every operator able to take the conversation had passed on it and the re-offer
    /// pause ran out: the passes are forgotten and a new round of offers starts.
    RoundRestarted {
        conversation: ConversationId,
    },
    /// A read mark moved forward; marks never move back.
    ReadMarked {
        conversation: ConversationId,
        by: Closer,
        upto: u64,
    },
    RulesAdopted {
        version: u32,
    },
    /// A login's session epoch moved on: tokens naming an older one are void.
    SessionsEnded {
        login: String,
    },
    ChannelPublicGroupsSet {
        channel: ChannelId,
        groups: Vec<SkillGroupId>,
    },
    ChannelRetentionSet {
        channel: ChannelId,
        days: u32,
    },
    /// Closed conversations past their retention, deleted with everything they held.
    ConversationsDeleted {
        conversations: Vec<ConversationId>,
    },
    /// The operator came back online (rules 4): their pass on this queued conversation no
    /// longer counts, so it is offered to them at once if nobody else can take it.
    PassForgotten {
        conversation: ConversationId,
        operator: OperatorId,
    },
    NoteAdded {
        conversation: ConversationId,
        author: String,
        name: String,
        key: String,
        text: String,
    },
    OperatorsConnected {
        node: u64,
        operators: Vec<OperatorId>,
    },
    /// The operator's last socket has been gone for the grace period: away, with that
    /// reason, until they set a presence themselves.
    WentAbsent {
        operator: OperatorId,
    },
    GroupRoutingSet {
        group: SkillGroupId,
        routing: GroupRouting,
    },
    ChannelPrioritySet {
        channel: ChannelId,
        priority: u32,
    },
    /// The operator gets no offer until `until` (wrap-up after a close); `None` ends it.
    WrapUpSet {
        operator: OperatorId,
        until: Option<Timestamp>,
    },
    /// A returning customer's new conversation is offered first to `operator`, who
    /// served their last one (rules 5, sticky routing).
    StickySet {
        conversation: ConversationId,
        operator: OperatorId,
    },
    /// The customer, silent since the operator's last message, was reminded.
    CustomerReminded {
        conversation: ConversationId,
        text: String,
    },
    OperatorChannelsSet {
        operator: OperatorId,
        limits: ChannelLimits,
    },
    OperatorSkillsSet {
        operator: OperatorId,
        skills: Vec<(String, u8)>,
    },
    PauseReasonsSet {
        reasons: Vec<String>,
    },
    /// On a break, with its reason; counted per reason when it ends.
    BreakTaken {
        operator: OperatorId,
        reason: String,
    },
    EmergencySet {
        target: NoticeTarget,
        message: Option<String>,
        by: String,
    },
    /// A new conversation was told the emergency notice in force for it.
    NoticeGiven {
        conversation: ConversationId,
        text: String,
    },
    AccessRuleSet {
        rule: AccessRule,
        note: Option<String>,
        by: String,
    },
    ChannelAccessSet {
        channel: ChannelId,
        allow_only: bool,
        message: String,
        by: String,
    },
    GroupStepsSet {
        group: SkillGroupId,
        steps: Vec<RoutingStep>,
    },
    GroupHoursSet {
        group: SkillGroupId,
        hours: Option<OpeningHours>,
    },
    ChannelWeightsSet {
        weights: Vec<(String, u32)>,
    },
    /// The routing step whose target an offer was made under (rules 6, groups with
    /// steps): part of the offer's decision record.
    OfferStep {
        offer: OfferId,
        step: u32,
    },
    ChannelAdapterSet {
        channel: ChannelId,
        adapter: Option<AdapterConfig>,
    },
    /// A channel's inbound message with this key (`channel:provider id`) is in the
    /// conversation: a redelivery finds it (records `I`).
    InboundTaken {
        conversation: ConversationId,
        key: String,
    },
    DeliveriesAttempted {
        node: u64,
        items: Vec<(ConversationId, u64)>,
    },
    DeliveryResults {
        results: Vec<DeliveryResult>,
    },
    DeliveryRetried {
        conversation: ConversationId,
        seq: u64,
        by: String,
    },
    ChannelIdentitySet {
        channel: ChannelId,
        key: Option<IdentityKey>,
    },
    ChannelBotSet {
        channel: ChannelId,
        bot: Option<BotConfig>,
    },
    /// The channel's bot holds the new conversation (rules 7): it is in no queue and on
    /// no operator's capacity until it is handed off.
    BotTook {
        conversation: ConversationId,
        group: SkillGroupId,
    },
    BotMessagePosted {
        conversation: ConversationId,
        key: String,
        text: String,
        buttons: Vec<String>,
    },
    HandedOff {
        conversation: ConversationId,
        group: SkillGroupId,
        reason: String,
        context: Vec<(String, String)>,
    },
    /// A letter for group `to`, decided in this entry (ADR 0006).
    MailPosted {
        to: u64,
        id: u64,
        mail: crate::mail::Mail,
    },
    /// The letter `id` from `from` was applied (its events follow in the same entry).
    MailReceived {
        from: u64,
        id: u64,
    },
    /// `to` confirmed every letter up to `upto`.
    MailConfirmed {
        to: u64,
        upto: u64,
    },
    HoldersSet {
        group: u64,
        nodes: Vec<u64>,
    },
    /// A routing shard learnt a conversation that started before it heard of it
    /// (rules 11): its age counts from `created_at` (SLA, ageing, answer times).
    ConversationAged {
        conversation: ConversationId,
        created_at: Timestamp,
    },
    /// A keyed start opened this conversation: the same key in the same channel, from
    /// the same visitor within `core::START_KEY_WINDOW_MS`, finds it (records `+`;
    /// deleted with the conversation).
    StartKeyTaken {
        conversation: ConversationId,
        channel: ChannelId,
        key: String,
    },
    NodeForgotten {
        id: u64,
    },
}
