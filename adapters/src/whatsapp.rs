//! WhatsApp Cloud API (Meta's Graph API for WhatsApp Business).
//!
//! - Subscribing a webhook: Meta calls `GET` with `hub.mode=subscribe`,
//!   `hub.verify_token` and `hub.challenge`; the answer is the challenge when the token
//!   is the channel's.
//! - Every delivery is signed: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw
//!   body keyed with the app secret>`. Meta retries a delivery it did not see answered
//!   with 200; a message's `wamid` is unique, so a retry is harmless.
//! - A delivery carries customers' `messages` and the `statuses` (sent, delivered,
//!   read, failed) of what the business sent, by `wamid`.
//! - Sending: `POST {api_base}/{phone_number_id}/messages`, bearer access token, JSON
//!   `{"messaging_product":"whatsapp","to":…,"type":"text","text":{"body":…}}`; the
//!   answer names the new message's `wamid`. There is no idempotency key: a send whose
//!   answer was lost is not repeated (ADR 0009).

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::{by_status, clip, hex, http, same_secret, unconfirmed, AdapterError, Outgoing, SendOutcome};

pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// The longest text body WhatsApp takes, in characters.
pub const MAX_TEXT: usize = 4096;
/// The longest caption of an image or a document, in characters.
pub const MAX_CAPTION: usize = 1024;
/// A pace well inside Cloud API's default throughput (80 messages a second a number).
pub const MESSAGES_PER_SECOND: u32 = 60;
/// Graph API error codes that mean "slow down", not "never".
const RATE_LIMITED: [i64; 6] = [4, 80007, 130429, 131048, 131056, 133016];

/// Whether `header` is the app secret's signature of `body`.
pub fn verify(app_secret: &str, header: Option<&[u8]>, body: &[u8]) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix(b"sha256=")) else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app_secret.as_bytes());
    let expected = hex(ring::hmac::sign(&key, body).as_ref());
    same_secret(expected.as_bytes(), &given.to_ascii_lowercase())
}

/// What one webhook delivery holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A customer's message: sender (`wa_id`), their profile name, `wamid`, readable text.
    Message { from: String, name: String, id: String, text: String },
    /// What became of a message the business sent.
    Status { id: String, status: String, reason: String },
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Vec<Change>,
}

#[derive(Deserialize)]
struct Change {
    #[serde(default)]
    field: String,
    #[serde(default)]
    value: Value,
}

#[derive(Deserialize, Default)]
struct Value {
    #[serde(default)]
    contacts: Vec<Contact>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    statuses: Vec<Status>,
}

#[derive(Deserialize)]
struct Contact {
    #[serde(default)]
    wa_id: String,
    #[serde(default)]
    profile: Option<Profile>,
}

#[derive(Deserialize)]
struct Profile {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct Message {
    from: String,
    id: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: Option<Body>,
    #[serde(default)]
    image: Option<Media>,
    #[serde(default)]
    document: Option<Media>,
    #[serde(default)]
    video: Option<Media>,
    #[serde(default)]
    location: Option<Location>,
    #[serde(default)]
    button: Option<Button>,
    #[serde(default)]
    interactive: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Body {
    body: String,
}

#[derive(Deserialize)]
struct Media {
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    mime_type: Option<String>,
}

/// The image or document each message of a delivery carries, to fetch: by message id.
pub fn media(body: &[u8]) -> Vec<(String, crate::Media)> {
    let Ok(payload) = serde_json::from_slice::<Payload>(body) else { return Vec::new() };
    let mut found = Vec::new();
    for change in payload.entry.into_iter().flat_map(|e| e.changes) {
        for m in change.value.messages {
            let (file, name) = match m.kind.as_str() {
                "image" => (m.image, "photo".to_owned()),
                "document" => {
                    let name = m.document.as_ref().and_then(|d| d.filename.clone()).unwrap_or_else(|| "file".into());
                    (m.document, name)
                }
                _ => continue,
            };
            if let Some(Media { caption, id: Some(media_id), mime_type, .. }) = file {
                found.push((m.id, crate::Media { caption: caption.unwrap_or_default(), line: String::new(), name, content_type: mime_type, size: None, source: crate::MediaSource::WhatsApp(media_id) }));
            }
        }
    }
    found
}

/// What a media lookup's answer other than 200 means: the Graph API says "slow down"
/// (its rate-limit codes) often with a 400, which may heal like a 408, 429 or 5xx.
fn lookup_error(status: u16, body: &[u8]) -> AdapterError {
    #[derive(Deserialize)]
    struct Failed {
        error: GraphError,
    }
    match serde_json::from_slice::<Failed>(body) {
        Ok(Failed { error }) if RATE_LIMITED.contains(&error.code) => {
            AdapterError::Unreachable(format!("the media lookup answered {status} (#{}): {}", error.code, clip(&error.message, 200)))
        }
        _ => crate::media_status(status, "the media lookup"),
    }
}

#[derive(Deserialize)]
struct MediaInfo {
    url: String,
    #[serde(default)]
    mime_type: Option<String>,
    #[serde(default)]
    file_size: Option<u64>,
}

/// `GET /{media id}`: the media's download URL (fetched with the same token) and type.
pub async fn media_url(client: &http::Client, api_base: &str, access_token: &str, media_id: &str) -> Result<(String, Option<String>), AdapterError> {
    if media_id.is_empty() || !media_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') {
        return Err(AdapterError::Malformed("not a media id".into()));
    }
    let url = format!("{}/{media_id}", api_base.trim_end_matches('/'));
    let response = client.get(&url, &[("authorization", format!("Bearer {access_token}"))], http::MAX_RESPONSE_BYTES).await?;
    if response.status != 200 {
        return Err(lookup_error(response.status, &response.body));
    }
    let info: MediaInfo = serde_json::from_slice(&response.body).map_err(|e| AdapterError::Malformed(format!("the media lookup: {e}")))?;
    if info.file_size.is_some_and(|n| n > crate::MAX_MEDIA_BYTES as u64) {
        return Err(AdapterError::TooLong { limit: crate::MAX_MEDIA_BYTES, actual: info.file_size.unwrap_or_default() as usize });
    }
    Ok((info.url, info.mime_type))
}

#[derive(Deserialize)]
struct Location {
    latitude: f64,
    longitude: f64,
}

#[derive(Deserialize)]
struct Button {
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct Status {
    id: String,
    status: String,
    #[serde(default)]
    errors: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    title: String,
}

/// The messages and statuses of a delivery, in order. Changes other than `messages`
/// (templates, account updates) are left out.
pub fn parse(body: &[u8]) -> Result<Vec<Item>, AdapterError> {
    let payload: Payload = serde_json::from_slice(body).map_err(|e| AdapterError::Malformed(format!("not a WhatsApp webhook: {e}")))?;
    let mut items = Vec::new();
    for change in payload.entry.into_iter().flat_map(|e| e.changes) {
        if change.field != "messages" {
            continue;
        }
        let value = change.value;
        for m in value.messages {
            let name = value.contacts.iter().find(|c| c.wa_id == m.from).and_then(|c| c.profile.as_ref()).map(|p| p.name.clone()).unwrap_or_default();
            let caption = |media: &Option<Media>| media.as_ref().and_then(|m| m.caption.clone()).map(|c| format!(": {c}")).unwrap_or_default();
            let text = match m.kind.as_str() {
                "text" => m.text.as_ref().map(|t| t.body.clone()).unwrap_or_default(),
                "image" => format!("[photo{}]", caption(&m.image)),
                "document" => format!("[file {}{}]", m.document.as_ref().and_then(|d| d.filename.clone()).unwrap_or_default(), caption(&m.document)),
                "video" => format!("[video{}]", caption(&m.video)),
                "audio" => "[voice message]".to_owned(),
                "sticker" => "[sticker]".to_owned(),
                "location" => m.location.as_ref().map(|l| format!("[location {:.6}, {:.6}]", l.latitude, l.longitude)).unwrap_or_default(),
                "contacts" => "[contact]".to_owned(),
                "button" => m.button.as_ref().map(|b| b.text.clone()).unwrap_or_default(),
                "interactive" => {
                    let reply = m.interactive.as_ref();
                    let title = reply.and_then(|i| i.get("button_reply").or_else(|| i.get("list_reply"))).and_then(|r| r.get("title")).and_then(|t| t.as_str());
                    // A Flow's answers (`nfm_reply`): what the customer filled in, as sent.
                    let form = reply.and_then(|i| i.get("nfm_reply")).map(|f| {
                        let answers = f.get("response_json").and_then(|j| j.as_str()).or_else(|| f.get("body").and_then(|b| b.as_str())).unwrap_or_default();
                        format!("[form reply] {answers}")
                    });
                    title.map(str::to_owned).or(form).unwrap_or_default()
                }
                _ => crate::UNSHOWN.to_owned(),
            };
            let text = crate::shown(text);
            items.push(Item::Message { from: m.from, name: crate::clip_bytes(&name, switchboard_actors::core::MAX_SENDER_BYTES), id: m.id, text: crate::message_text(&text, switchboard_actors::core::MAX_TEXT_CHARS) });
        }
        for s in value.statuses {
            let reason = s.errors.first().map(|e| clip(&format!("{} {}", e.code, e.title), 500)).unwrap_or_default();
            items.push(Item::Status { id: s.id, status: s.status, reason });
        }
    }
    Ok(items)
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    messages: Vec<Sent>,
    #[serde(default)]
    error: Option<GraphError>,
}

#[derive(Deserialize)]
struct Sent {
    id: String,
}

#[derive(Deserialize)]
struct GraphError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i64,
}

/// Sends one entry as a text message (in parts when longer than [`MAX_TEXT`]: a bot's
/// reply with its quick replies as lines), or as a file with the text its caption.
pub async fn send(client: &http::Client, api_base: &str, phone_number_id: &str, access_token: &str, message: &Outgoing) -> SendOutcome {
    let url = format!("{}/{}/messages", api_base.trim_end_matches('/'), phone_number_id);
    // Quick replies are offered as numbered lines: interactive buttons take at most 3
    // titles of 20 characters, which a bot's replies need not fit.
    let mut text = message.text.clone();
    for (i, b) in message.buttons.iter().enumerate() {
        text.push_str(&format!("\n{}. {b}", i + 1));
    }
    let headers = [("authorization", format!("Bearer {access_token}"))];
    let body = match message.files.as_slice() {
        // Longer than WhatsApp takes (a bot's reply with its lines): in parts.
        [] => {
            let parts = crate::text_parts(&text, MAX_TEXT);
            let n = parts.len();
            for (i, text) in parts.into_iter().enumerate() {
                let body = json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": message.recipient, "type": "text", "text": {"preview_url": false, "body": text}});
                let sent = match client.post_json(&url, &headers, body.to_string().into_bytes()).await {
                    Ok(r) => outcome(&r),
                    Err(e) => crate::transport(e, false),
                };
                if let std::ops::ControlFlow::Break(sent) = crate::after_part(sent, i, n, false) {
                    return sent;
                }
            }
            return SendOutcome::Failed { reason: "the message has no text to send".into() };
        }
        // One file (the core takes no more for WhatsApp), uploaded first: an upload
        // shows the customer nothing, so it may be repeated; the text is its caption.
        [file, ..] => {
            let media_id = match upload(client, api_base, phone_number_id, &headers, file).await {
                Ok(id) => id,
                Err(outcome) => return outcome,
            };
            let caption: String = message.text.chars().take(MAX_CAPTION).collect();
            if matches!(file.content_type.as_str(), "image/jpeg" | "image/png") {
                json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": message.recipient, "type": "image", "image": {"id": media_id, "caption": caption}})
            } else {
                json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": message.recipient, "type": "document", "document": {"id": media_id, "caption": caption, "filename": file.name}})
            }
        }
    };
    let response = match client.post_json(&url, &headers, body.to_string().into_bytes()).await {
        Ok(r) => r,
        Err(e) => return crate::transport(e, false),
    };
    outcome(&response)
}

#[derive(Deserialize)]
struct Uploaded {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    error: Option<GraphError>,
}

/// `POST /{phone number id}/media`: the file's media id, or what to do with the entry.
async fn upload(client: &http::Client, api_base: &str, phone_number_id: &str, headers: &[(&str, String); 1], file: &crate::email::MailFile) -> Result<String, SendOutcome> {
    let url = format!("{}/{}/media", api_base.trim_end_matches('/'), phone_number_id);
    let parts = [
        http::Part { name: "messaging_product", file: None, bytes: b"whatsapp" },
        http::Part { name: "type", file: None, bytes: file.content_type.as_bytes() },
        http::Part { name: "file", file: Some((&file.name, &file.content_type)), bytes: &file.bytes },
    ];
    let response = client.post_multipart(&url, headers, &parts).await.map_err(|e| crate::transport(e, true))?;
    match serde_json::from_slice::<Uploaded>(&response.body) {
        Ok(Uploaded { id: Some(id), .. }) if (200..300).contains(&response.status) => Ok(id),
        Ok(Uploaded { error: Some(e), .. }) => {
            let reason = clip(&format!("uploading the file: {} (#{}) {}", response.status, e.code, e.message), 500);
            Err(if RATE_LIMITED.contains(&e.code) { SendOutcome::Retry { reason, after: None } } else { by_status(response.status, reason, None) })
        }
        _ => Err(by_status(response.status, format!("uploading the file: {} with an answer that is not the Graph API's", response.status), None)),
    }
}

/// What the Graph API's answer to a send means.
fn outcome(response: &http::Response) -> SendOutcome {
    let after = response.header("retry-after").and_then(|s| s.trim().parse::<u64>().ok()).map(Duration::from_secs);
    match serde_json::from_slice::<Answer>(&response.body) {
        Ok(Answer { messages, error: None }) if (200..300).contains(&response.status) && !messages.is_empty() => {
            SendOutcome::Sent { provider_id: messages.into_iter().next().map(|m| m.id).unwrap_or_default() }
        }
        Ok(Answer { error: Some(e), .. }) => {
            let reason = clip(&format!("{} (#{}) {}", response.status, e.code, e.message), 500);
            if RATE_LIMITED.contains(&e.code) {
                SendOutcome::Retry { reason, after }
            } else {
                by_status(response.status, reason, after)
            }
        }
        _ => unconfirmed(response.status, format!("{} with an answer that is not the Graph API's", response.status), after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_media_lookup_told_to_slow_down_is_asked_again_later() {
        let limited = br#"{"error":{"message":"(#4) Application request limit reached","type":"OAuthException","code":4}}"#;
        assert!(matches!(lookup_error(400, limited), AdapterError::Unreachable(_)));
        let gone = br#"{"error":{"message":"Unsupported get request","type":"GraphMethodException","code":100}}"#;
        assert!(matches!(lookup_error(400, gone), AdapterError::Refused(_)));
        assert!(matches!(lookup_error(503, b"busy"), AdapterError::Unreachable(_)));
        assert!(matches!(lookup_error(404, b"not json"), AdapterError::Refused(_)));
    }

    #[test]
    fn signatures_are_checked_against_the_raw_body() {
        let body = br#"{"object":"whatsapp_business_account"}"#;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"app-secret");
        let header = format!("sha256={}", hex(ring::hmac::sign(&key, body).as_ref()));
        assert!(verify("app-secret", Some(header.as_bytes()), body));
        assert!(verify("app-secret", Some(header.to_uppercase().replace("SHA256=", "sha256=").as_bytes()), body));
        assert!(!verify("other", Some(header.as_bytes()), body));
        assert!(!verify("app-secret", Some(header.as_bytes()), b"{}"));
        assert!(!verify("app-secret", None, body));
    }

    #[test]
    fn deliveries_give_messages_and_statuses() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messaging_product":"whatsapp","metadata":{"phone_number_id":"555"},
            "contacts":[{"profile":{"name":"Ana"},"wa_id":"4915112345"}],
            "messages":[{"from":"4915112345","id":"wamid.A","timestamp":"1","type":"text","text":{"body":"hola"}},
                        {"from":"4915112345","id":"wamid.B","timestamp":"2","type":"image","image":{"id":"m","caption":"receipt"}}],
            "statuses":[{"id":"wamid.OUT","status":"failed","timestamp":"3","recipient_id":"4915112345","errors":[{"code":131026,"title":"Message undeliverable"}]}]}}]}]}"#;
        assert_eq!(
            parse(body).unwrap(),
            vec![
                Item::Message { from: "4915112345".into(), name: "Ana".into(), id: "wamid.A".into(), text: "hola".into() },
                Item::Message { from: "4915112345".into(), name: "Ana".into(), id: "wamid.B".into(), text: "[photo: receipt]".into() },
                Item::Status { id: "wamid.OUT".into(), status: "failed".into(), reason: "131026 Message undeliverable".into() },
            ]
        );
        assert!(parse(b"not json").is_err());
        assert_eq!(parse(br#"{"entry":[{"changes":[{"field":"account_update","value":{}}]}]}"#).unwrap(), vec![]);
    }

    /// A Flow's answers are shown as sent, and a reply the parser cannot read is a
    /// labelled line, never empty text (which the core refuses, and Meta, answered, would
    /// not send again).
    #[test]
    fn no_customer_message_becomes_empty_text() {
        let text = |message: &str| {
            let body = format!(r#"{{"entry":[{{"changes":[{{"field":"messages","value":{{"messages":[{message}]}}}}]}}]}}"#);
            match parse(body.as_bytes()).unwrap().pop() {
                Some(Item::Message { text, .. }) => text,
                other => panic!("{other:?}"),
            }
        };
        let flow = r#"{"from":"49","id":"w1","type":"interactive","interactive":{"type":"nfm_reply","nfm_reply":{"name":"flow","body":"Sent","response_json":"{\"order\":\"A-17\"}"}}}"#;
        assert_eq!(text(flow), r#"[form reply] {"order":"A-17"}"#);
        let button = r#"{"from":"49","id":"w2","type":"interactive","interactive":{"type":"button_reply","button_reply":{"id":"b","title":"Talk to a person"}}}"#;
        assert_eq!(text(button), "Talk to a person");
        for unread in [r#"{"from":"49","id":"w3","type":"interactive","interactive":{"type":"call_permission_reply"}}"#, r#"{"from":"49","id":"w4","type":"text"}"#, r#"{"from":"49","id":"w5","type":"button"}"#] {
            assert_eq!(text(unread), "[a message of a kind this channel does not show]", "{unread}");
        }
    }
}
