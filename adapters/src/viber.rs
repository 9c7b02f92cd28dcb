//! Viber: the REST Bot API's callbacks in, `send_message` out (developers.viber.com).
//!
//! - Every callback is signed: `X-Viber-Content-Signature` is the hex HMAC-SHA256 of the
//!   raw body keyed with the bot's auth token. Viber retries a callback it did not see
//!   answered with 200; `message_token` identifies a message.
//! - Events: `message` (a customer's message, with `sender.id` and `sender.name`),
//!   `delivered`, `seen` and `failed` (receipts of what the bot sent, by
//!   `message_token`), and `webhook`, `subscribed`, `conversation_started` … which are
//!   answered and dropped.
//! - Sending: `POST {api_base}/pa/send_message` with `X-Viber-Auth-Token`, JSON
//!   `{"receiver","min_api_version","sender":{"name"},"type":"text","text"}`; `status` 0
//!   is success with the new `message_token`. No idempotency key: a send whose answer
//!   was lost is not repeated (ADR 0009).

use serde::Deserialize;
use serde_json::json;

use crate::{clip, clip_bytes, hex, http, same_secret, unconfirmed, AdapterError, Outgoing, SendOutcome};

pub const SIGNATURE_HEADER: &str = "x-viber-content-signature";
pub const MAX_TEXT: usize = 7000;
/// A pace inside Viber's limits for a bot.
pub const MESSAGES_PER_SECOND: u32 = 50;
/// `status` codes that mean "later": 12 too many requests, 13 and 14 temporary failures.
const RETRY_STATUSES: [i64; 3] = [12, 13, 14];

/// Whether `header` is the auth token's signature of `body`.
pub fn verify(auth_token: &str, header: Option<&[u8]>, body: &[u8]) -> bool {
    let Some(given) = header else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, auth_token.as_bytes());
    same_secret(hex(ring::hmac::sign(&key, body).as_ref()).as_bytes(), &given.to_ascii_lowercase())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Message { from: String, name: String, id: String, text: String },
    Receipt { id: String, status: &'static str, reason: String },
    Other,
}

#[derive(Deserialize)]
struct Callback {
    event: String,
    #[serde(default)]
    message_token: Option<serde_json::Value>,
    #[serde(default)]
    sender: Option<Sender>,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    desc: Option<String>,
}

#[derive(Deserialize)]
struct Sender {
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
    #[serde(default)]
    media: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

/// The picture or file a message callback carries, to fetch from its URL.
pub fn media(body: &[u8]) -> Vec<crate::Media> {
    let Ok(Callback { event, message: Some(m), .. }) = serde_json::from_slice::<Callback>(body) else { return Vec::new() };
    let (Some(url), true) = (m.media, event == "message") else { return Vec::new() };
    let (name, caption, content_type) = match m.kind.as_str() {
        // Viber sends pictures as JPEG.
        "picture" => ("photo.jpg".to_owned(), m.text.unwrap_or_default(), Some("image/jpeg".to_owned())),
        "file" => (m.file_name.unwrap_or_else(|| "file".into()), String::new(), None),
        _ => return Vec::new(),
    };
    vec![crate::Media { caption, line: String::new(), name, content_type, size: m.size, source: crate::MediaSource::Url(url) }]
}

fn token(value: Option<serde_json::Value>) -> Result<String, AdapterError> {
    match value {
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(AdapterError::Malformed("the callback has no message_token".into())),
    }
}

pub fn parse(body: &[u8]) -> Result<Item, AdapterError> {
    let c: Callback = serde_json::from_slice(body).map_err(|e| AdapterError::Malformed(format!("not a Viber callback: {e}")))?;
    match c.event.as_str() {
        "message" => {
            let (Some(sender), Some(m)) = (c.sender, c.message) else {
                return Err(AdapterError::Malformed("a message callback without sender or message".into()));
            };
            let text = match m.kind.as_str() {
                "text" => m.text.unwrap_or_default(),
                "picture" => format!("[photo{}]", m.text.map(|t| format!(": {t}")).unwrap_or_default()),
                "video" => "[video]".to_owned(),
                "file" => format!("[file {}]", m.file_name.unwrap_or_default()),
                "sticker" => "[sticker]".to_owned(),
                "location" => "[location]".to_owned(),
                "contact" => "[contact]".to_owned(),
                // A link the customer shared: Viber gives it in `media`.
                "url" => m.media.clone().or(m.text).unwrap_or_default(),
                _ => crate::UNSHOWN.to_owned(),
            };
            let text = crate::shown(text);
            Ok(Item::Message { from: sender.id, name: clip_bytes(&sender.name, switchboard_actors::core::MAX_SENDER_BYTES), id: token(c.message_token)?, text: crate::message_text(&text, switchboard_actors::core::MAX_TEXT_CHARS) })
        }
        "delivered" => Ok(Item::Receipt { id: token(c.message_token)?, status: "delivered", reason: String::new() }),
        "seen" => Ok(Item::Receipt { id: token(c.message_token)?, status: "read", reason: String::new() }),
        "failed" => Ok(Item::Receipt { id: token(c.message_token)?, status: "failed", reason: clip(&c.desc.unwrap_or_default(), 500) }),
        _ => Ok(Item::Other),
    }
}

#[derive(Deserialize)]
struct Answer {
    status: i64,
    #[serde(default)]
    status_message: String,
    #[serde(default)]
    message_token: Option<serde_json::Value>,
}

/// Sends one entry with `send_message`, as `sender_name`.
pub async fn send(client: &http::Client, api_base: &str, auth_token: &str, sender_name: &str, message: &Outgoing) -> SendOutcome {
    let url = format!("{}/pa/send_message", api_base.trim_end_matches('/'));
    let text: String = message.text.chars().take(MAX_TEXT).collect();
    let mut body = json!({"receiver": message.recipient, "min_api_version": 1, "sender": {"name": sender_name}, "type": "text", "text": text});
    if !message.buttons.is_empty() {
        let buttons: Vec<serde_json::Value> = message.buttons.iter().map(|b| json!({"ActionType": "reply", "ActionBody": b, "Text": b})).collect();
        body["keyboard"] = json!({"Type": "keyboard", "DefaultHeight": false, "Buttons": buttons});
    }
    let headers = [("x-viber-auth-token", auth_token.to_owned())];
    let response = match client.post_json(&url, &headers, body.to_string().into_bytes()).await {
        Ok(r) => r,
        Err(e) => return crate::transport(e, false),
    };
    match serde_json::from_slice::<Answer>(&response.body) {
        Ok(Answer { status: 0, message_token: Some(t), .. }) => SendOutcome::Sent { provider_id: token(Some(t)).unwrap_or_default() },
        // Taken, by its status, but with no message id: it may have been sent.
        Ok(Answer { status: 0, .. }) => unconfirmed(response.status, "Viber status 0 without a message_token".into(), None),
        Ok(a) => {
            let reason = clip(&format!("Viber status {}: {}", a.status, a.status_message), 500);
            if RETRY_STATUSES.contains(&a.status) {
                SendOutcome::Retry { reason, after: None }
            } else {
                SendOutcome::Failed { reason }
            }
        }
        Err(_) => unconfirmed(response.status, format!("{} with an answer that is not Viber's", response.status), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_give_messages_receipts_or_nothing() {
        let m = br#"{"event":"message","timestamp":1457764197627,"message_token":4912661846655238145,"sender":{"id":"01234567890A=","name":"John McClane","api_version":1},"message":{"type":"text","text":"hi"}}"#;
        assert_eq!(parse(m).unwrap(), Item::Message { from: "01234567890A=".into(), name: "John McClane".into(), id: "4912661846655238145".into(), text: "hi".into() });
        assert_eq!(parse(br#"{"event":"seen","timestamp":1,"message_token":4912661846655238145,"user_id":"x"}"#).unwrap(), Item::Receipt { id: "4912661846655238145".into(), status: "read", reason: String::new() });
        assert_eq!(parse(br#"{"event":"webhook","timestamp":1,"message_token":1}"#).unwrap(), Item::Other);
        assert!(parse(br#"{"event":"message","message_token":1}"#).is_err());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"auth");
        let sig = hex(ring::hmac::sign(&key, m).as_ref());
        assert!(verify("auth", Some(sig.as_bytes()), m));
        assert!(!verify("other", Some(sig.as_bytes()), m));
    }

    /// A shared link comes in `media`; a message whose text would be empty is a labelled
    /// line, never empty text (which the core refuses, and Viber, answered, would not
    /// send again).
    #[test]
    fn a_link_is_read_from_media_and_no_message_is_empty() {
        let text = |message: &str| match parse(format!(r#"{{"event":"message","message_token":7,"sender":{{"id":"u","name":"D"}},"message":{message}}}"#).as_bytes()).unwrap() {
            Item::Message { text, .. } => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(text(r#"{"type":"url","media":"https://example.com/order/123"}"#), "https://example.com/order/123");
        assert_eq!(text(r#"{"type":"text","text":"  "}"#), "[a message of a kind this channel does not show]");
        assert_eq!(text(r#"{"type":"url"}"#), "[a message of a kind this channel does not show]");
    }
}
