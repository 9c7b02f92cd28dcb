//! What the edge reads from a conversation shard, as plain data (ADR 0012).
//!
//! Every read a socket, a REST handler or a channel makes of a conversation shard goes
//! through [`ShardReads`]. Its answers are owned values (the records' own types), and
//! each is a future, so an implementation may ask another node: a node that holds the
//! shard answers from its replica ([`Shard`] implements the trait), one that does not
//! asks a member over the cluster's connection.

use std::future::Future;
use std::pin::Pin;

use switchboard_actors::model::{Attachment, AttachmentId, ChannelId, ConversationId, OperatorId};
use switchboard_actors::shard::Shard;
use switchboard_actors::state::{Conversation, Delivery, FeedEntry, HistoryEntry};
use switchboard_actors::Error;

/// A read's answer, to be awaited.
pub type Read<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// The reads of one conversation shard.
pub trait ShardReads: Send + Sync + 'static {
    /// Conversation `id`, open or closed. Its `keys` and `pending` (the member's own
    /// bookkeeping) may be empty: a member asked over the network does not send them.
    fn conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>>;
    /// Conversation `id` while it is open (in the shard's hot state); `None` once closed.
    fn open_conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>>;
    /// History entries of `id` after `after`, at most `limit`, in order.
    fn history(&self, id: ConversationId, after: u64, limit: usize) -> Read<'_, Vec<HistoryEntry>>;
    /// The oldest item `operator`'s feed in this shard still keeps and its newest;
    /// `None` for an operator this shard has no feed of.
    fn feed_bounds<'a>(&'a self, operator: &'a OperatorId) -> Read<'a, Option<(u64, u64)>>;
    /// Feed items of `operator` after `after`, at most `limit`, or `None` when some of
    /// them are no longer kept.
    fn feed_since<'a>(&'a self, operator: &'a OperatorId, after: u64, limit: usize) -> Read<'a, Option<Vec<FeedEntry>>>;
    /// The conversation and entry a provider's message id names.
    fn by_provider_id<'a>(&'a self, channel: &'a ChannelId, id: &'a str) -> Read<'a, Option<(ConversationId, u64)>>;
    /// A visitor's most recent conversations, newest first.
    fn conversations_of<'a>(&'a self, visitor: &'a str, limit: usize) -> Read<'a, Vec<Conversation>>;
    /// The conversations `operator` handled, newest first, before `before`.
    fn handled_by<'a>(&'a self, operator: &'a OperatorId, before: Option<ConversationId>, limit: usize) -> Read<'a, Vec<ConversationId>>;
    /// The outbox entries of conversation `id` (to its customer), by history seq.
    fn deliveries_of(&self, id: ConversationId) -> Read<'_, Vec<(u64, Delivery)>>;
    /// Dead-lettered outbox entries after the entry `after` (conversation, seq), in
    /// that order, at most `limit`.
    fn dead_letters(&self, after: Option<(ConversationId, u64)>, limit: usize) -> Read<'_, Vec<(ConversationId, u64, Delivery)>>;
    /// An attachment's record.
    fn attachment<'a>(&'a self, id: &'a AttachmentId) -> Read<'a, Option<Attachment>>;
    /// Whether conversation `id` can take one more file of `size` bytes.
    fn attachment_room(&self, id: ConversationId, files: usize, size: u64) -> Read<'_, ()>;
    /// Whether the message whose idempotency key is `key` was taken before (a provider's
    /// redelivery): in the open conversation of `sender` on `channel`, or by its record,
    /// kept as long as its conversation.
    fn inbound_seen<'a>(&'a self, channel: &'a ChannelId, sender: &'a str, key: &'a str) -> Read<'a, bool>;
}

fn ready<'a, T: Send + 'a>(value: Result<T, Error>) -> Read<'a, T> {
    Box::pin(std::future::ready(value))
}

/// A member's own replica answers at once.
impl ShardReads for Shard {
    fn conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>> {
        ready(Shard::conversation(self, id))
    }

    fn open_conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>> {
        ready(Ok(self.read().conversations.get(&id).cloned()))
    }

    fn history(&self, id: ConversationId, after: u64, limit: usize) -> Read<'_, Vec<HistoryEntry>> {
        ready(Shard::history(self, id, after, limit))
    }

    fn feed_bounds<'a>(&'a self, operator: &'a OperatorId) -> Read<'a, Option<(u64, u64)>> {
        ready(Ok(self.read().operators.get(operator).map(|op| (op.feed.first_retained(), op.feed.last_seq))))
    }

    fn feed_since<'a>(&'a self, operator: &'a OperatorId, after: u64, limit: usize) -> Read<'a, Option<Vec<FeedEntry>>> {
        ready(Shard::feed_since(self, operator, after, limit))
    }

    fn by_provider_id<'a>(&'a self, channel: &'a ChannelId, id: &'a str) -> Read<'a, Option<(ConversationId, u64)>> {
        ready(Shard::by_provider_id(self, channel, id))
    }

    fn conversations_of<'a>(&'a self, visitor: &'a str, limit: usize) -> Read<'a, Vec<Conversation>> {
        ready(Shard::conversations_of(self, visitor, limit))
    }

    fn handled_by<'a>(&'a self, operator: &'a OperatorId, before: Option<ConversationId>, limit: usize) -> Read<'a, Vec<ConversationId>> {
        ready(Shard::handled_by(self, operator, before, limit))
    }

    fn deliveries_of(&self, id: ConversationId) -> Read<'_, Vec<(u64, Delivery)>> {
        ready(Shard::deliveries_of(self, id))
    }

    fn dead_letters(&self, after: Option<(ConversationId, u64)>, limit: usize) -> Read<'_, Vec<(ConversationId, u64, Delivery)>> {
        ready(Shard::dead_letters(self, after, limit))
    }

    fn attachment<'a>(&'a self, id: &'a AttachmentId) -> Read<'a, Option<Attachment>> {
        ready(Shard::attachment(self, id))
    }

    fn attachment_room(&self, id: ConversationId, files: usize, size: u64) -> Read<'_, ()> {
        ready(Shard::attachment_room(self, id, files, size))
    }

    fn inbound_seen<'a>(&'a self, channel: &'a ChannelId, sender: &'a str, key: &'a str) -> Read<'a, bool> {
        ready(self.inbound_taken(channel, sender, key))
    }
}
