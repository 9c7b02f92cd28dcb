//! Facebook Messenger: the Messenger Platform's webhooks in, the Send API out.
//!
//! - Subscribing and signatures are Meta's, as for WhatsApp: `GET` with `hub.mode`,
//!   `hub.verify_token` and `hub.challenge`; every delivery signed with the app secret in
//!   `X-Hub-Signature-256` ([`crate::whatsapp::verify`]).
//! - A delivery (`object: "page"`) holds `entry[].messaging[]` events: a customer's
//!   `message` (`mid`, `text`, `attachments`, a tapped `quick_reply`), `delivery`
//!   receipts naming `mids`, and the page's own messages echoed back (`is_echo`), which
//!   are dropped.
//! - Sending: `POST {api_base}/me/messages?access_token=…` with
//!   `{"recipient":{"id":PSID},"messaging_type":"RESPONSE","message":{"text":…}}`; a bot's
//!   buttons become `quick_replies` (at most 13, titles of at most 20 characters). The
//!   Send API takes no idempotency key: a lost answer is not resent (ADR 0009).

use serde::Deserialize;
use serde_json::json;

use crate::http::form_escape;
use crate::{by_status, clip, http, unconfirmed, AdapterError, Outgoing, SendOutcome};

pub const MAX_TEXT: usize = 2000;
/// A pace inside the Send API's limits for a page.
pub const MESSAGES_PER_SECOND: u32 = 40;
/// Graph API codes that mean "later": rate limits and temporary failures.
const RETRY_CODES: [i64; 5] = [1, 2, 4, 32, 613];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Message { from: String, id: String, text: String },
    Delivered { ids: Vec<String> },
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    object: String,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    messaging: Vec<Messaging>,
}

#[derive(Deserialize)]
struct Messaging {
    #[serde(default)]
    sender: Option<Party>,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    delivery: Option<Delivery>,
}

#[derive(Deserialize)]
struct Party {
    id: String,
}

#[derive(Deserialize)]
struct Message {
    mid: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    is_echo: bool,
    #[serde(default)]
    attachments: Vec<Attachment>,
}

#[derive(Deserialize)]
struct Attachment {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    payload: Option<AttachmentPayload>,
}

#[derive(Deserialize)]
struct AttachmentPayload {
    #[serde(default)]
    url: Option<String>,
}

/// The images and files each message of a delivery carries, to fetch from their URLs:
/// by message id, in order.
pub fn media(body: &[u8]) -> Vec<(String, crate::Media)> {
    let Ok(payload) = serde_json::from_slice::<Payload>(body) else { return Vec::new() };
    let mut found = Vec::new();
    for m in payload.entry.into_iter().flat_map(|e| e.messaging).filter_map(|e| e.message).filter(|m| !m.is_echo) {
        let caption = m.text.clone().unwrap_or_default();
        for a in m.attachments {
            let name = match a.kind.as_str() {
                "image" => "photo",
                "file" => "file",
                _ => continue,
            };
            if let Some(url) = a.payload.and_then(|p| p.url) {
                found.push((m.mid.clone(), crate::Media { caption: caption.clone(), line: format!("[{name}]"), name: name.into(), content_type: None, size: None, source: crate::MediaSource::Url(url) }));
            }
        }
    }
    found
}

#[derive(Deserialize)]
struct Delivery {
    #[serde(default)]
    mids: Vec<String>,
}

/// The customers' messages and the delivery receipts of a page delivery, in order.
pub fn parse(body: &[u8]) -> Result<Vec<Item>, AdapterError> {
    let payload: Payload = serde_json::from_slice(body).map_err(|e| AdapterError::Malformed(format!("not a Messenger webhook: {e}")))?;
    if payload.object != "page" {
        return Err(AdapterError::Malformed(format!("a webhook for {:?}, not a page", payload.object)));
    }
    let mut items = Vec::new();
    for event in payload.entry.into_iter().flat_map(|e| e.messaging) {
        if let (Some(sender), Some(m)) = (&event.sender, event.message) {
            if m.is_echo {
                continue;
            }
            let mut lines: Vec<String> = m.text.into_iter().filter(|t| !t.is_empty()).collect();
            for a in &m.attachments {
                lines.push(match a.kind.as_str() {
                    "image" => "[photo]".to_owned(),
                    "file" => "[file]".to_owned(),
                    "audio" => "[voice message]".to_owned(),
                    "video" => "[video]".to_owned(),
                    "location" => "[location]".to_owned(),
                    other => format!("[{other}]"),
                });
            }
            let text = if lines.is_empty() { "[a message of a kind this channel does not show]".to_owned() } else { lines.join("\n") };
            items.push(Item::Message { from: sender.id.clone(), id: m.mid, text: crate::message_text(&text, switchboard_actors::core::MAX_TEXT_CHARS) });
        } else if let Some(d) = event.delivery {
            items.push(Item::Delivered { ids: d.mids });
        }
    }
    Ok(items)
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    error: Option<GraphError>,
}

#[derive(Deserialize)]
struct GraphError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i64,
}

/// Sends one entry with the Send API: a text longer than [`MAX_TEXT`] (a notice or a
/// bot's reply; the core refuses an operator's) in parts, the quick replies with the
/// last.
pub async fn send(client: &http::Client, api_base: &str, page_token: &str, message: &Outgoing) -> SendOutcome {
    let url = format!("{}/me/messages?access_token={}", api_base.trim_end_matches('/'), form_escape(page_token));
    let file = match message.files.as_slice() {
        [] => None,
        [file, ..] => Some(file),
    };
    let Some(file) = file else {
        let parts = crate::text_parts(&message.text, MAX_TEXT);
        let n = parts.len();
        for (i, text) in parts.into_iter().enumerate() {
            let mut body = json!({"recipient": {"id": message.recipient}, "messaging_type": "RESPONSE", "message": {"text": text}});
            if i + 1 == n && !message.buttons.is_empty() {
                let replies: Vec<serde_json::Value> = message.buttons.iter().take(13).map(|b| json!({"content_type": "text", "title": b.chars().take(20).collect::<String>(), "payload": b})).collect();
                body["message"]["quick_replies"] = json!(replies);
            }
            let outcome = answer(client.post_json(&url, &[], body.to_string().into_bytes()).await);
            if let std::ops::ControlFlow::Break(outcome) = crate::after_part(outcome, i, n, false) {
                return outcome;
            }
        }
        return SendOutcome::Failed { reason: "the message has no text to send".into() };
    };
    // A file is its own message (the Send API takes an attachment or a text, not both;
    // the core refuses a text with it): uploaded with the send, one call.
    let kind = if matches!(file.content_type.as_str(), "image/jpeg" | "image/png" | "image/gif") { "image" } else { "file" };
    let recipient = json!({"id": message.recipient}).to_string();
    let attachment = json!({"attachment": {"type": kind, "payload": {"is_reusable": false}}}).to_string();
    let parts = [
        http::Part { name: "recipient", file: None, bytes: recipient.as_bytes() },
        http::Part { name: "messaging_type", file: None, bytes: b"RESPONSE" },
        http::Part { name: "message", file: None, bytes: attachment.as_bytes() },
        http::Part { name: "filedata", file: Some((&file.name, &file.content_type)), bytes: &file.bytes },
    ];
    answer(client.post_multipart(&url, &[], &parts).await)
}

/// What the Send API's answer to one call says of the message it sent.
fn answer(sent: Result<http::Response, crate::AdapterError>) -> SendOutcome {
    let response = match sent {
        Ok(r) => r,
        Err(e) => return crate::transport(e, false),
    };
    match serde_json::from_slice::<Answer>(&response.body) {
        Ok(Answer { message_id: Some(id), error: None }) if (200..300).contains(&response.status) => SendOutcome::Sent { provider_id: id },
        Ok(Answer { error: Some(e), .. }) => {
            let reason = clip(&format!("{} (#{}) {}", response.status, e.code, e.message), 500);
            if RETRY_CODES.contains(&e.code) {
                SendOutcome::Retry { reason, after: None }
            } else {
                by_status(response.status, reason, None)
            }
        }
        _ => unconfirmed(response.status, format!("{} with an answer that is not the Send API's", response.status), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_deliveries_give_messages_and_receipts_and_drop_echoes() {
        let body = br#"{"object":"page","entry":[{"id":"PAGE","time":1,"messaging":[
            {"sender":{"id":"PSID1"},"recipient":{"id":"PAGE"},"timestamp":1,"message":{"mid":"m_1","text":"hello"}},
            {"sender":{"id":"PAGE"},"recipient":{"id":"PSID1"},"timestamp":2,"message":{"mid":"m_2","text":"echo","is_echo":true}},
            {"sender":{"id":"PSID1"},"recipient":{"id":"PAGE"},"timestamp":3,"message":{"mid":"m_3","attachments":[{"type":"image","payload":{"url":"https://x"}}]}},
            {"sender":{"id":"PSID1"},"recipient":{"id":"PAGE"},"delivery":{"mids":["m_out"],"watermark":5}}]}]}"#;
        assert_eq!(
            parse(body).unwrap(),
            vec![
                Item::Message { from: "PSID1".into(), id: "m_1".into(), text: "hello".into() },
                Item::Message { from: "PSID1".into(), id: "m_3".into(), text: "[photo]".into() },
                Item::Delivered { ids: vec!["m_out".into()] },
            ]
        );
        assert!(parse(br#"{"object":"instagram","entry":[]}"#).is_err());
    }
}
