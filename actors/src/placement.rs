//! Which Raft group of ADR 0006 each command belongs to: the directory (`G0`), a
//! conversation shard (`C`) or a routing shard (`R`).
//!
//! A split node routes every command by it (`node/src/split.rs`, `route_as`); a node of
//! one group proposes everything to that group. The match is exhaustive, so a new command cannot
//! be added without saying where it will be decided. A command that a conversation
//! shard decides first and then tells a routing shard about (a close, then `Release`)
//! targets the conversation shard; the mail that follows is the machine's output, not
//! the target's.

use crate::model::{ChannelId, Command, ConversationId, OperatorId, SkillGroupId};
use crate::records::Owner;

/// Where a command is proposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `G0`: users, operators' configuration, groups, channels, templates and the rules
    /// the other groups receive as `Directory` mail.
    Directory,
    /// The conversation shard that holds this conversation.
    Conversation(ConversationId),
    /// The conversation shard a new conversation of this visitor starts in (chosen by
    /// the visitor's id, so their earlier conversations are in the same shard; any
    /// shard for a visitor without an id; for a keyed start without one, the shard its
    /// channel and key choose, so a retry finds the conversation its key opened).
    NewConversation { visitor: Option<String> },
    /// The conversation shard of a channel's sender (by channel and sender, so their
    /// open conversation is found in that one shard).
    Sender { channel: ChannelId, sender: String },
    /// The routing shard whose domain holds this operator.
    Operator(OperatorId),
    /// The routing shard whose domain holds this skill group.
    Group(SkillGroupId),
    /// The routing shard that owns this conversation's current episode.
    ConversationRouting(ConversationId),
    /// Proposed by a conversation shard's leader to its own shard (its timers, its
    /// channel delivery worker); every conversation it names is that shard's.
    OwnConversationShard,
    /// Proposed by a routing shard's leader to its own shard (its timers).
    OwnRoutingShard,
    /// A node's report of the operators connected to it: split by routing shard, each
    /// gets its own operators.
    OperatorsByRoutingShard,
    /// Every group applies it.
    Every,
    /// A letter, proposed to the group its sender addressed it to: a routing shard for
    /// a conversation shard's letter, a conversation shard for a routing shard's, either
    /// for the metadata group's.
    Addressee,
    /// Proposed by a group's leader to its own group (a confirmation of its letters).
    Itself,
    /// `G0` alone: the cluster's own bookkeeping (where groups are held), which no other
    /// group receives.
    Metadata,
}

impl Target {
    /// The kind of group this target is, as `records::owner` names the groups; `None`
    /// for every group.
    pub fn owner(&self) -> Option<Owner> {
        match self {
            Target::Directory | Target::Metadata => Some(Owner::Directory),
            Target::Conversation(_) | Target::NewConversation { .. } | Target::Sender { .. } | Target::OwnConversationShard => Some(Owner::Conversation),
            Target::Operator(_) | Target::Group(_) | Target::ConversationRouting(_) | Target::OwnRoutingShard | Target::OperatorsByRoutingShard => Some(Owner::Routing),
            Target::Every | Target::Itself | Target::Addressee => None,
        }
    }
}

/// The conversation shard (`0..shards`) that decides a channel sender's messages
/// ([`Target::Sender`]): a stable hash of channel and sender, so every node and build
/// agree (`node/src/split.rs`, `sender_group`; the core's rules 24 check).
pub fn sender_shard(channel: &ChannelId, sender: &str, shards: u64) -> u64 {
    crate::cutover::stable_hash(&[channel.as_str().as_bytes(), sender.as_bytes()]) % shards.max(1)
}

/// The group `command` is proposed to under ADR 0006 (with its amendments).
pub fn target(command: &Command) -> Target {
    use Command::*;
    match command {
        UpsertSkillGroup(_)
        | UpsertOperator(_)
        | UpsertChannel(_)
        | UpsertUser(_)
        | UpsertTemplate(_)
        | DeleteTemplate { .. }
        | SetFavourite { .. }
        | EndSessions { .. }
        | SetChannelPublicGroups { .. }
        | SetChannelRetention { .. }
        | UpdateUser { .. }
        | SetGroupRouting { .. }
        | SetChannelPriority { .. }
        | SetPauseReasons { .. }
        | SetEmergency { .. }
        | SetAccessRule { .. }
        | SetChannelAccess { .. }
        | SetOperatorChannels { .. }
        | SetOperatorSkills { .. }
        | SetGroupSteps { .. }
        | SetGroupHours { .. }
        | SetChannelWeights { .. }
        | SetChannelAdapter { .. }
        | SetChannelIdentity { .. }
        | SetChannelBot { .. } => Target::Directory,
        StartConversation { visitor, .. } => Target::NewConversation { visitor: visitor.id.clone() },
        StartConversationOnce { visitor, key, channel, .. } => Target::NewConversation { visitor: visitor.id.clone().or_else(|| Some(format!("start key\u{0}{channel}\u{0}{key}"))) },
        PostClientMessage { conversation, .. }
        | CloseByClient { conversation }
        | Rate { conversation, .. }
        | PostOperatorMessage { conversation, .. }
        | MarkRead { conversation, .. }
        | AddNote { conversation, .. }
        | RetryDelivery { conversation, .. }
        | BotReply { conversation, .. }
        | Handoff { conversation, .. }
        | CloseByBot { conversation, .. } => Target::Conversation(*conversation),
        StoreAttachment(attachment) => Target::Conversation(attachment.conversation),
        ChannelInbound { channel, sender, .. } => Target::Sender { channel: channel.clone(), sender: sender.clone() },
        ChannelInboundRich { thread: Some(conversation), .. } => Target::Conversation(*conversation),
        ChannelInboundRich { channel, sender, thread: None, .. } => Target::Sender { channel: channel.clone(), sender: sender.clone() },
        PurgeExpired { .. } | SweepInactive | DeliveriesAttempted { .. } | DeliveryResults { .. } => Target::OwnConversationShard,
        SetPresence { operator, .. }
        | AcceptOffer { operator, .. }
        | DeclineOffer { operator, .. }
        | Transfer { operator, .. }
        | EndWrapUp { operator }
        | TakeBreak { operator, .. }
        | AcceptOfferAt { operator, .. } => Target::Operator(operator.clone()),
        // Rules 11: an operator's close is decided where the holder is known.
        Reassign { conversation, .. } | CloseByOperator { conversation, .. } => Target::ConversationRouting(*conversation),
        RouteQueue { group } => Target::Group(group.clone()),
        ExpireOffer { .. } | MarkAbsent { .. } => Target::OwnRoutingShard,
        OperatorsConnected { .. } => Target::OperatorsByRoutingShard,
        AdoptRules { .. } => Target::Every,
        Deliver { .. } => Target::Addressee,
        ConfirmMail { .. } => Target::Itself,
        HoldersSet { .. } | ForgetNode { .. } => Target::Metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{OfferId, Visitor};

    fn op(id: &str) -> OperatorId {
        OperatorId(id.into())
    }

    #[test]
    fn messages_go_to_their_conversation_and_routing_steps_to_the_operator_or_group() {
        let c = ConversationId(42);
        let message = Command::PostClientMessage { conversation: c, key: "k".into(), text: "hi".into(), attachments: vec![] };
        assert_eq!(target(&message), Target::Conversation(c));
        let reply = Command::PostOperatorMessage { operator: op("ann"), conversation: c, key: "k".into(), text: "hello".into(), attachments: vec![] };
        assert_eq!(target(&reply), Target::Conversation(c));
        let accept = Command::AcceptOffer { operator: op("ann"), offer: OfferId(7) };
        assert_eq!(target(&accept), Target::Operator(op("ann")));
        let route = Command::RouteQueue { group: SkillGroupId("billing".into()) };
        assert_eq!(target(&route), Target::Group(SkillGroupId("billing".into())));
        let reassign = Command::Reassign { by: "sup".into(), conversation: c, target: crate::model::TransferTarget::Operator(op("bob")), comment: String::new() };
        assert_eq!(target(&reassign), Target::ConversationRouting(c));
    }

    #[test]
    fn a_customer_s_close_is_decided_by_the_conversation_shard_and_an_operator_s_by_routing() {
        let c = ConversationId(5);
        assert_eq!(target(&Command::CloseByClient { conversation: c }), Target::Conversation(c));
        let by_operator = Command::CloseByOperator { operator: op("ann"), conversation: c, resolution: String::new(), tags: vec![] };
        assert_eq!(target(&by_operator), Target::ConversationRouting(c));
    }

    #[test]
    fn a_new_conversation_goes_by_its_visitor_or_sender_and_a_threaded_message_by_its_thread() {
        let visitor = Visitor { id: Some("v-1".into()), name: "Vera".into(), attributes: vec![] };
        let start = Command::StartConversation { channel: ChannelId("web".into()), group: None, visitor };
        assert_eq!(target(&start), Target::NewConversation { visitor: Some("v-1".into()) });
        let inbound = |thread| Command::ChannelInboundRich {
            channel: ChannelId("tg".into()),
            sender: "100".into(),
            sender_name: "Tom".into(),
            provider_message_id: "m1".into(),
            text: "hi".into(),
            files: vec![],
            thread,
            attributes: vec![],
        };
        assert_eq!(target(&inbound(None)), Target::Sender { channel: ChannelId("tg".into()), sender: "100".into() });
        assert_eq!(target(&inbound(Some(ConversationId(9)))), Target::Conversation(ConversationId(9)));
    }

    #[test]
    fn configuration_goes_to_the_directory_and_rules_to_every_group() {
        assert_eq!(target(&Command::SetPauseReasons { reasons: vec!["lunch".into()] }), Target::Directory);
        assert_eq!(target(&Command::EndSessions { login: "ann".into() }), Target::Directory);
        assert_eq!(target(&Command::AdoptRules { version: 9 }), Target::Every);
        assert_eq!(target(&Command::SweepInactive), Target::OwnConversationShard);
        assert_eq!(target(&Command::ExpireOffer { offer: OfferId(1) }), Target::OwnRoutingShard);
    }
}
