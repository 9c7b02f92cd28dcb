//! The one error type of this crate: why a command was refused, or why an actor failed.

use serde::{Deserialize, Serialize};

use crate::model::{ConversationId, OfferId, OperatorId};

/// Rejections travel back through the Raft response, so they are serializable and
/// carry only data, never a source error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("text is {actual} characters, the limit is {limit}")]
    TooLong { limit: usize, actual: usize },
    #[error("conversation {0} is closed")]
    Closed(ConversationId),
    #[error("conversation {conversation} is not assigned to operator {operator}")]
    NotAssigned { conversation: ConversationId, operator: OperatorId },
    #[error("offer {0} is no longer pending for this operator")]
    OfferGone(OfferId),
    #[error("offer {0} is not due yet")]
    NotDue(OfferId),
    #[error("operator {0} has no free capacity")]
    CapacityExceeded(OperatorId),
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The customer may not start or write here (a block or allow list); the text is
    /// what they are told.
    #[error("{0}")]
    Blocked(String),
    #[error("actor failure: {0}")]
    Actor(String),
    #[error("could not commit: {0}")]
    Commit(String),
    /// The shard's records could not be read or written.
    #[error("storage: {0}")]
    Storage(String),
    /// A read could not reach a member that holds the data (none answered, none
    /// leads, none applied far enough yet): nothing was decided, try again. Unlike
    /// `Unavailable`, which the core decides (a transfer to an offline operator).
    #[error("unavailable: {0}")]
    Unreachable(String),
}

impl Error {
    /// Whether the core decided to refuse the command, so it is known not to be in the
    /// state. A commit or actor failure leaves that open: the entry may still apply. A
    /// member that could not be reached decided nothing either: not a refusal.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Error::Actor(_) | Error::Commit(_) | Error::Storage(_) | Error::Unreachable(_))
    }

    /// A stable machine-readable code for error frames and REST bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::Invalid(_) => "invalid",
            Error::TooLong { .. } => "too_long",
            Error::Closed(_) => "closed",
            Error::NotAssigned { .. } => "not_assigned",
            Error::OfferGone(_) => "offer_gone",
            Error::NotDue(_) => "not_due",
            Error::CapacityExceeded(_) => "capacity_exceeded",
            Error::Unavailable(_) => "unavailable",
            Error::Blocked(_) => "blocked",
            Error::Actor(_) => "internal",
            Error::Commit(_) => "unavailable",
            Error::Storage(_) => "internal",
            Error::Unreachable(_) => "unavailable",
        }
    }
}
