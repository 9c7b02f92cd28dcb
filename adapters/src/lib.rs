//! Channels: how conversations enter and leave Switchboard.
//!
//! A [`Channel`] adapter turns a provider's inbound payload into a normalised
//! [`Inbound`] message (carrying the provider's own message id, which makes redelivery
//! by the provider harmless) and sends outbound text. The web chat is built into the
//! gateway; messenger, email and open-API adapters implement this trait.
//!
//! Deliberately left out here: HTTP servers and clients. An adapter receives bytes the
//! gateway already accepted and returns what to send; the outbox worker that retries
//! outbound delivery lives with the node.

use serde::{Deserialize, Serialize};
use switchboard_actors::core::{MAX_KEY_BYTES, MAX_TEXT_CHARS};
use switchboard_actors::model::ChannelId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdapterError {
    #[error("payload is not valid for this channel: {0}")]
    Malformed(String),
    #[error("message text is {actual} characters, the limit is {limit}")]
    TooLong { limit: usize, actual: usize },
    #[error("provider refused delivery: {0}")]
    Refused(String),
}

/// A message from a customer, as every channel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inbound {
    pub channel: ChannelId,
    /// The customer's id at the provider (chat id, phone, email address).
    pub sender: String,
    pub sender_name: String,
    /// The provider's id for this message: redeliveries carry the same one.
    pub provider_message_id: String,
    pub text: String,
}

impl Inbound {
    /// The idempotency key the core deduplicates on: stable across provider retries.
    pub fn idempotency_key(&self) -> String {
        switchboard_actors::core::inbound_key(&self.channel, &self.sender, &self.provider_message_id)
    }

    /// Checks what the core would refuse, so an adapter can answer its provider early.
    pub fn validate(&self) -> Result<(), AdapterError> {
        if self.provider_message_id.is_empty() {
            return Err(AdapterError::Malformed("provider message id is empty".into()));
        }
        if self.text.trim().is_empty() {
            return Err(AdapterError::Malformed("message text is empty".into()));
        }
        let chars = self.text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(AdapterError::TooLong { limit: MAX_TEXT_CHARS, actual: chars });
        }
        Ok(())
    }
}

/// Text an operator sent, to be delivered by a channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    pub channel: ChannelId,
    pub recipient: String,
    pub text: String,
}

/// What a provider returned for a delivered message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub provider_message_id: String,
}

/// One kind of channel (telegram, whatsapp, email…).
pub trait Channel: Send + Sync + 'static {
    /// The kind name used in channel configuration.
    fn kind(&self) -> &'static str;
    /// Parses a provider's inbound webhook body.
    fn parse_inbound(&self, channel: &ChannelId, body: &[u8]) -> Result<Inbound, AdapterError>;
    /// Sends one outbound message.
    fn send(&self, message: &Outbound) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Receipt, AdapterError>> + Send + '_>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(id: &str, text: &str) -> Inbound {
        Inbound {
            channel: ChannelId::new("telegram-main"),
            sender: "42".into(),
            sender_name: "Ann".into(),
            provider_message_id: id.into(),
            text: text.into(),
        }
    }

    #[test]
    fn redelivered_message_keeps_its_key_and_long_ids_fit_the_core_limit() {
        assert_eq!(inbound("1001", "hi").idempotency_key(), inbound("1001", "hi").idempotency_key());
        assert_ne!(inbound("1001", "hi").idempotency_key(), inbound("1002", "hi").idempotency_key());
        let long = "x".repeat(500);
        let key = inbound(&long, "hi").idempotency_key();
        assert!(key.len() <= MAX_KEY_BYTES, "{key}");
        assert_ne!(key, inbound(&"y".repeat(500), "hi").idempotency_key());
    }

    #[test]
    fn validation_matches_the_core_limits() {
        assert!(inbound("1", "hello").validate().is_ok());
        assert!(matches!(inbound("", "hello").validate(), Err(AdapterError::Malformed(_))));
        assert!(matches!(inbound("1", "  ").validate(), Err(AdapterError::Malformed(_))));
        let long = "я".repeat(MAX_TEXT_CHARS + 1);
        assert_eq!(inbound("1", &long).validate(), Err(AdapterError::TooLong { limit: MAX_TEXT_CHARS, actual: MAX_TEXT_CHARS + 1 }));
    }
}
