//! VK communities: the Callback API in, `messages.send` out (dev.vk.com).
//!
//! - Connecting a server: VK POSTs `{"type":"confirmation","group_id":…}` and expects the
//!   community's confirmation string as the plain-text answer.
//! - Every other event carries the community's `secret` in its body; VK retries an event
//!   that was not answered with the plain text `ok`. A new message is `message_new`
//!   with `object.message` (`id`, `from_id`, `peer_id`, `text`, `attachments`).
//! - Sending: `messages.send` (form fields `access_token`, `v`, `peer_id`, `message`,
//!   `random_id`). VK does not send a second message with a `random_id` it has seen from
//!   the community, so the outbox resends safely after a lost answer: the delivery's
//!   `random_id` is derived from its conversation and entry number.

use std::time::Duration;

use serde::Deserialize;

use crate::{by_status, clip, http, same_secret, AdapterError, Outgoing, SendOutcome};

/// The API version requests name.
pub const API_VERSION: &str = "5.199";
/// VK's limit for a community's messages: 20 a second.
pub const MESSAGES_PER_SECOND: u32 = 20;
/// The longest message text, in characters.
pub const MAX_TEXT: usize = 4096;
/// Error codes that mean "later": too many requests, flood control, an internal error.
const RETRY_CODES: [i64; 4] = [6, 9, 10, 29];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// VK checks the server: answer with the confirmation string if `group_id` is ours.
    Confirmation { group_id: i64 },
    /// A customer's message: sender (`from_id`), message id, readable text.
    Message { from: String, id: String, text: String },
    /// Anything else (typing, reads, joins): answered `ok` and dropped.
    Other,
}

/// A `message_new` callback's body, read once its [`Head`] was.
#[derive(Deserialize)]
struct Callback {
    #[serde(default)]
    object: Option<Object>,
}

/// A callback's head: what is read before its secret is checked. Every other field,
/// the message included, is skipped without being kept.
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    group_id: i64,
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    message: Option<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    id: i64,
    from_id: i64,
    /// Where it was written: the sender's id for a private message to the community,
    /// from [`FIRST_CHAT_PEER`] on for a chat the community's bot was added to.
    #[serde(default)]
    peer_id: i64,
    /// Its number within that conversation (a chat's messages have `id` 0).
    #[serde(default)]
    conversation_message_id: i64,
    #[serde(default)]
    text: String,
    #[serde(default)]
    attachments: Vec<Attachment>,
    #[serde(default)]
    geo: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Attachment {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    photo: Option<Photo>,
    #[serde(default)]
    doc: Option<Doc>,
}

#[derive(Deserialize)]
struct Photo {
    #[serde(default)]
    sizes: Vec<PhotoSize>,
}

#[derive(Deserialize)]
struct PhotoSize {
    url: String,
    #[serde(default)]
    width: u64,
    #[serde(default)]
    height: u64,
}

#[derive(Deserialize)]
struct Doc {
    #[serde(default)]
    title: String,
    url: String,
    #[serde(default)]
    size: Option<u64>,
}

/// The photos (their largest size) and documents a `message_new` carries, to fetch
/// from their URLs; the secret is checked by [`parse`] first.
pub fn media(body: &[u8]) -> Vec<crate::Media> {
    let Ok(Callback { object: Some(Object { message: Some(m) }), .. }) = serde_json::from_slice::<Callback>(body) else { return Vec::new() };
    m.attachments
        .into_iter()
        .filter_map(|a| match (a.kind.as_str(), a.photo, a.doc) {
            ("photo", Some(photo), _) => photo.sizes.into_iter().max_by_key(|s| s.width * s.height).map(|largest| crate::Media {
                caption: m.text.clone(),
                line: "[photo]".into(),
                name: "photo.jpg".into(),
                content_type: Some("image/jpeg".into()),
                size: None,
                source: crate::MediaSource::Url(largest.url),
            }),
            ("doc", _, Some(doc)) => Some(crate::Media { caption: m.text.clone(), line: "[file]".into(), name: doc.title, content_type: None, size: doc.size, source: crate::MediaSource::Url(doc.url) }),
            _ => None,
        })
        .collect()
}

/// VK numbers chats (several people and the community's bot) from here on; below it a
/// `peer_id` is a person writing to the community.
pub const FIRST_CHAT_PEER: i64 = 2_000_000_000;

/// An event, once its secret is checked (a confirmation carries none).
pub fn parse(body: &[u8], secret: &str) -> Result<Event, AdapterError> {
    // The secret first, from the head alone: a body without it builds nothing.
    let head: Head = serde_json::from_slice(body).map_err(|e| AdapterError::Malformed(format!("not a VK callback: {e}")))?;
    if head.kind == "confirmation" {
        return Ok(Event::Confirmation { group_id: head.group_id });
    }
    if !head.secret.as_deref().is_some_and(|s| same_secret(s.as_bytes(), secret.as_bytes())) {
        return Err(AdapterError::Refused("the callback's secret does not match".into()));
    }
    if head.kind != "message_new" {
        return Ok(Event::Other);
    }
    let callback: Callback = serde_json::from_slice(body).map_err(|e| AdapterError::Malformed(format!("not a VK callback: {e}")))?;
    let Some(m) = callback.object.and_then(|o| o.message) else {
        return Err(AdapterError::Malformed("message_new without object.message".into()));
    };
    // A chat the community's bot is in is not a customer writing to the community: its
    // replies would go to the sender's private messages, out of the chat. Answered and
    // dropped.
    if m.peer_id >= FIRST_CHAT_PEER {
        return Ok(Event::Other);
    }
    // The message's id, which redeliveries of it share; VK gives a message without one
    // (`id` 0) its number within the conversation.
    let id = match (m.id, m.conversation_message_id) {
        (0, 0) => return Err(AdapterError::Malformed("message_new without an id or a conversation_message_id".into())),
        (0, number) => format!("{}:{number}", m.peer_id),
        (id, _) => id.to_string(),
    };
    let mut lines: Vec<String> = Vec::new();
    if !m.text.is_empty() {
        lines.push(m.text);
    }
    for a in &m.attachments {
        lines.push(match a.kind.as_str() {
            "photo" => "[photo]".to_owned(),
            "doc" => "[file]".to_owned(),
            "sticker" => "[sticker]".to_owned(),
            "audio_message" => "[voice message]".to_owned(),
            "video" => "[video]".to_owned(),
            other => format!("[{other}]"),
        });
    }
    if m.geo.is_some() {
        lines.push("[location]".to_owned());
    }
    let text = if lines.is_empty() { "[a message of a kind this channel does not show]".to_owned() } else { lines.join("\n") };
    Ok(Event::Message { from: m.from_id.to_string(), id, text: crate::message_text(&text, switchboard_actors::core::MAX_TEXT_CHARS) })
}

/// The `random_id` of an entry: the same on every attempt, spread over VK's int32 range.
pub fn random_id(message: &Outgoing) -> i32 {
    id_of(&format!("{}:{}:{}", message.channel, message.conversation.0, message.seq))
}

/// `seed` hashed (FNV-1a) into VK's int32 range: positive and non-zero, since VK reads 0
/// as "no random_id".
fn id_of(seed: &str) -> i32 {
    let h = seed.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    ((h % (i32::MAX as u64 - 1)) + 1) as i32
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    response: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<VkError>,
}

#[derive(Deserialize)]
struct VkError {
    error_code: i64,
    #[serde(default)]
    error_msg: String,
}

/// Sends one entry with `messages.send`: a text longer than [`MAX_TEXT`] (a bot's
/// reply with its lines) in parts, each under its own `random_id`, the files with the
/// last.
pub async fn send(client: &http::Client, api_base: &str, access_token: &str, message: &Outgoing) -> SendOutcome {
    let url = format!("{}/method/messages.send", api_base.trim_end_matches('/'));
    let mut text = message.text.clone();
    for (i, b) in message.buttons.iter().enumerate() {
        text.push_str(&format!("\n{}. {b}", i + 1));
    }
    // Files are uploaded first (an upload shows the customer nothing, so it may be
    // repeated), then named in the one `messages.send`, whose random_id keeps it once.
    let mut attachments = Vec::new();
    for file in &message.files {
        match upload(client, api_base, access_token, &message.recipient, file).await {
            Ok(name) => attachments.push(name),
            Err(outcome) => return outcome,
        }
    }
    let attachment = attachments.join(",");
    let parts = crate::text_parts(&text, MAX_TEXT);
    let n = parts.len();
    for (i, text) in parts.into_iter().enumerate() {
        // A repeat of any part is dropped by VK: the whole may be sent again.
        let random = part_random_id(message, i).to_string();
        let mut fields = vec![("access_token", access_token), ("v", API_VERSION), ("peer_id", message.recipient.as_str()), ("random_id", random.as_str()), ("message", text.as_str())];
        if i + 1 == n && !attachment.is_empty() {
            fields.push(("attachment", attachment.as_str()));
        }
        let sent = match client.post_form(&url, &fields).await {
            Ok(response) => answer(&response),
            Err(e) => crate::transport(e, true),
        };
        if let std::ops::ControlFlow::Break(sent) = crate::after_part(sent, i, n, true) {
            return sent;
        }
    }
    SendOutcome::Failed { reason: "the message has no text to send".into() }
}

/// The `random_id` of part `i` of the entry: the entry's own for the first (a message
/// in one part is sent as it always was), a derived one for the others.
fn part_random_id(message: &Outgoing, i: usize) -> i32 {
    let first = random_id(message);
    if i == 0 {
        return first;
    }
    id_of(&format!("{first}:part:{i}"))
}

/// What `messages.send` answered for one message.
fn answer(response: &http::Response) -> SendOutcome {
    match serde_json::from_slice::<Answer>(&response.body) {
        Ok(Answer { response: Some(id), error: None }) => SendOutcome::Sent { provider_id: id.to_string() },
        Ok(Answer { error: Some(e), .. }) => {
            let reason = clip(&format!("VK error {}: {}", e.error_code, e.error_msg), 500);
            if RETRY_CODES.contains(&e.error_code) {
                SendOutcome::Retry { reason, after: (e.error_code == 9).then_some(Duration::from_secs(10)) }
            } else {
                SendOutcome::Failed { reason }
            }
        }
        // `random_id` makes a second send of the entry a no-op at VK: try again.
        _ if (200..300).contains(&response.status) => SendOutcome::Retry { reason: format!("{} with an answer that is not VK's", response.status), after: None },
        _ => by_status(response.status, format!("{} with an answer that is not VK's", response.status), None),
    }
}

/// A VK API method's `response`, or what the entry's attempt comes to.
async fn method(client: &http::Client, api_base: &str, name: &str, fields: &[(&str, &str)]) -> Result<serde_json::Value, SendOutcome> {
    let url = format!("{}/method/{name}", api_base.trim_end_matches('/'));
    let response = client.post_form(&url, fields).await.map_err(|e| crate::transport(e, true))?;
    match serde_json::from_slice::<Answer>(&response.body) {
        Ok(Answer { response: Some(value), error: None }) => Ok(value),
        Ok(Answer { error: Some(e), .. }) => {
            let reason = clip(&format!("VK error {} in {name}: {}", e.error_code, e.error_msg), 500);
            Err(if RETRY_CODES.contains(&e.error_code) { SendOutcome::Retry { reason, after: None } } else { SendOutcome::Failed { reason } })
        }
        _ => Err(by_status(response.status, format!("{} from {name} with an answer that is not VK's", response.status), None)),
    }
}

/// Uploads one file for a message to `peer_id`: a picture as a message photo, anything
/// else as a document. Returns what `messages.send` names it by (`photo{owner}_{id}`,
/// `doc{owner}_{id}`).
async fn upload(client: &http::Client, api_base: &str, access_token: &str, peer_id: &str, file: &crate::email::MailFile) -> Result<String, SendOutcome> {
    let photo = matches!(file.content_type.as_str(), "image/jpeg" | "image/png" | "image/gif");
    let base = [("access_token", access_token), ("v", API_VERSION), ("peer_id", peer_id)];
    let server = if photo {
        method(client, api_base, "photos.getMessagesUploadServer", &base).await?
    } else {
        method(client, api_base, "docs.getMessagesUploadServer", &[base[0], base[1], base[2], ("type", "doc")]).await?
    };
    let Some(upload_url) = server["upload_url"].as_str() else {
        return Err(SendOutcome::Failed { reason: "VK gave no upload_url".into() });
    };
    let part = http::Part { name: if photo { "photo" } else { "file" }, file: Some((&file.name, &file.content_type)), bytes: &file.bytes };
    let uploaded = client.post_multipart(upload_url, &[], &[part]).await.map_err(|e| crate::transport(e, true))?;
    let uploaded: serde_json::Value = serde_json::from_slice(&uploaded.body).map_err(|_| by_status(uploaded.status, format!("the upload answered {}", uploaded.status), None))?;
    let saved = if photo {
        let server = uploaded["server"].to_string();
        let (Some(photos), Some(hash)) = (uploaded["photo"].as_str(), uploaded["hash"].as_str()) else {
            return Err(SendOutcome::Failed { reason: clip(&format!("the photo upload failed: {uploaded}"), 300) });
        };
        method(client, api_base, "photos.saveMessagesPhoto", &[base[0], base[1], ("server", server.as_str()), ("photo", photos), ("hash", hash)]).await?
    } else {
        let Some(handle) = uploaded["file"].as_str() else {
            return Err(SendOutcome::Failed { reason: clip(&format!("the document upload failed: {uploaded}"), 300) });
        };
        method(client, api_base, "docs.save", &[base[0], base[1], ("file", handle), ("title", file.name.as_str())]).await?
    };
    let item = if photo { saved.get(0).cloned().unwrap_or_default() } else { saved["doc"].clone() };
    match (item["owner_id"].as_i64(), item["id"].as_i64()) {
        (Some(owner), Some(id)) => Ok(format!("{}{owner}_{id}", if photo { "photo" } else { "doc" })),
        _ => Err(SendOutcome::Failed { reason: "VK saved the file without its id".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_are_confirmations_checked_messages_or_ignored() {
        assert_eq!(parse(br#"{"type":"confirmation","group_id":77}"#, "s").unwrap(), Event::Confirmation { group_id: 77 });
        let new = br#"{"type":"message_new","group_id":77,"event_id":"e1","v":"5.199","secret":"s3","object":{"message":{"id":501,"date":1,"from_id":9001,"peer_id":9001,"text":"privet","attachments":[{"type":"photo"}]},"client_info":{}}}"#;
        assert_eq!(parse(new, "s3").unwrap(), Event::Message { from: "9001".into(), id: "501".into(), text: "privet\n[photo]".into() });
        assert!(matches!(parse(new, "other"), Err(AdapterError::Refused(_))));
        assert_eq!(parse(br#"{"type":"message_typing_state","group_id":77,"secret":"s3","object":{}}"#, "s3").unwrap(), Event::Other);
        assert!(parse(br#"{"type":"message_new","secret":"s3","object":{}}"#, "s3").is_err());
        // In a chat the bot was added to: not a customer's conversation, dropped (each
        // such message has id 0; taken by id, every one after the first would be lost as
        // a redelivery).
        let chat = br#"{"type":"message_new","group_id":77,"secret":"s3","object":{"message":{"id":0,"conversation_message_id":14,"date":1,"from_id":9001,"peer_id":2000000005,"text":"hi all"}}}"#;
        assert_eq!(parse(chat, "s3").unwrap(), Event::Other);
        // A private message without an id is known by its number in the conversation.
        let numbered = br#"{"type":"message_new","group_id":77,"secret":"s3","object":{"message":{"id":0,"conversation_message_id":3,"date":1,"from_id":9001,"peer_id":9001,"text":"again"}}}"#;
        assert_eq!(parse(numbered, "s3").unwrap(), Event::Message { from: "9001".into(), id: "9001:3".into(), text: "again".into() });
        let neither = br#"{"type":"message_new","group_id":77,"secret":"s3","object":{"message":{"id":0,"date":1,"from_id":9001,"peer_id":9001,"text":"?"}}}"#;
        assert!(matches!(parse(neither, "s3"), Err(AdapterError::Malformed(_))));
    }

    #[test]
    fn a_random_id_is_stable_per_entry_and_never_zero() {
        let m = |seq| Outgoing { channel: switchboard_actors::model::ChannelId::new("vk"), conversation: switchboard_actors::model::ConversationId(4), seq, recipient: "9001".into(), text: "x".into(), kind: "message", author: String::new(), buttons: vec![], files: vec![], file_refs: vec![], thread: None, automatic: false };
        assert_eq!(random_id(&m(5)), random_id(&m(5)));
        assert_ne!(random_id(&m(5)), random_id(&m(6)));
        assert!(random_id(&m(5)) > 0);
    }
}
