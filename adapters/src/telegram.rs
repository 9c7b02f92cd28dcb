//! Telegram Bot API: webhooks in, `sendMessage` out (https://core.telegram.org/bots/api).
//!
//! - A webhook set with `secret_token` carries it in the `X-Telegram-Bot-Api-Secret-Token`
//!   header of every delivery; a delivery without it, or with another, is forged.
//! - Telegram retries a webhook it did not see answered with 2xx; `message_id` is unique
//!   per chat, so the inbound key (channel, chat id, message id) makes a retry harmless.
//! - `sendMessage` has no idempotency key: an attempt whose answer was lost cannot be
//!   repeated without risking a duplicate, so the outbox dead-letters it as `unknown`
//!   instead of resending (ADR 0009).
//! - Bots get no delivery or read receipts: a sent message stays `sent`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::{clip, clip_bytes, http, same_secret, unconfirmed, AdapterError, Outgoing, SendOutcome};

/// The header Telegram puts the webhook's secret in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// The longest text `sendMessage` takes, in characters.
pub const MAX_TEXT: usize = 4096;
/// The longest caption of a photo, a document or an album, in characters.
pub const MAX_CAPTION: usize = 1024;
/// Telegram's documented pace for a bot: about 30 messages a second overall.
pub const MESSAGES_PER_SECOND: u32 = 30;

/// Whether a webhook delivery carries the channel's secret.
pub fn verify(expected: &str, header: Option<&[u8]>) -> bool {
    header.is_some_and(|got| same_secret(got, expected.as_bytes()))
}

#[derive(Deserialize)]
struct Update {
    #[allow(dead_code)]
    update_id: i64,
    #[serde(default)]
    message: Option<Message>,
}

#[derive(Deserialize)]
struct Message {
    message_id: i64,
    chat: Chat,
    #[serde(default)]
    from: Option<User>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    photo: Option<serde_json::Value>,
    #[serde(default)]
    document: Option<Document>,
    #[serde(default)]
    sticker: Option<Sticker>,
    #[serde(default)]
    location: Option<Location>,
    #[serde(default)]
    contact: Option<Contact>,
    #[serde(default)]
    voice: Option<serde_json::Value>,
    #[serde(default)]
    audio: Option<serde_json::Value>,
    #[serde(default)]
    video: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Chat {
    id: i64,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    first_name: String,
    #[serde(default)]
    last_name: Option<String>,
    #[serde(default)]
    username: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    file_name: Option<String>,
}

#[derive(Deserialize)]
struct Sticker {
    #[serde(default)]
    emoji: Option<String>,
}

#[derive(Deserialize)]
struct Location {
    latitude: f64,
    longitude: f64,
}

#[derive(Deserialize)]
struct Contact {
    phone_number: String,
    #[serde(default)]
    first_name: String,
}

/// A customer's message from an update, or `None` for an update that carries none
/// (an edit, a button press, a channel post): those are answered 200 and dropped.
/// What is not text becomes a labelled line the operator can read.
pub fn parse(body: &[u8]) -> Result<Option<(String, String, String, String)>, AdapterError> {
    let update: Update = serde_json::from_slice(body).map_err(|e| AdapterError::Malformed(format!("not a Telegram update: {e}")))?;
    let Some(m) = update.message else { return Ok(None) };
    let caption = m.caption.clone().map(|c| format!(": {c}")).unwrap_or_default();
    let text = if let Some(text) = m.text {
        text
    } else if m.photo.is_some() {
        format!("[photo{caption}]")
    } else if let Some(d) = m.document {
        format!("[file {}{caption}]", d.file_name.unwrap_or_default())
    } else if let Some(s) = m.sticker {
        format!("[sticker {}]", s.emoji.unwrap_or_default())
    } else if let Some(l) = m.location {
        format!("[location {:.6}, {:.6}]", l.latitude, l.longitude)
    } else if let Some(c) = m.contact {
        format!("[contact {} {}]", c.first_name, c.phone_number)
    } else if m.voice.is_some() {
        format!("[voice message{caption}]")
    } else if m.audio.is_some() {
        format!("[audio{caption}]")
    } else if m.video.is_some() {
        format!("[video{caption}]")
    } else {
        // What the customer typed with it is kept.
        format!("{}{caption}]", crate::UNSHOWN.trim_end_matches(']'))
    };
    let text = crate::shown(text);
    let name = match m.from {
        Some(u) => {
            let full = [Some(u.first_name), u.last_name].into_iter().flatten().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
            if full.is_empty() { u.username.unwrap_or_default() } else { full }
        }
        None => String::new(),
    };
    Ok(Some((m.chat.id.to_string(), clip_bytes(&name, switchboard_actors::core::MAX_SENDER_BYTES), m.message_id.to_string(), crate::message_text(&text, switchboard_actors::core::MAX_TEXT_CHARS))))
}

#[derive(Deserialize)]
struct MediaUpdate {
    #[serde(default)]
    message: Option<MediaMessage>,
}

#[derive(Deserialize)]
struct MediaMessage {
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    photo: Vec<FileRef>,
    #[serde(default)]
    document: Option<FileRef>,
}

#[derive(Deserialize)]
struct FileRef {
    file_id: String,
    #[serde(default)]
    file_size: Option<u64>,
    #[serde(default)]
    file_name: Option<String>,
    #[serde(default)]
    mime_type: Option<String>,
}

/// The photo (its largest size) or document an update's message carries, to fetch.
pub fn media(body: &[u8]) -> Vec<crate::Media> {
    let Ok(MediaUpdate { message: Some(m) }) = serde_json::from_slice::<MediaUpdate>(body) else { return Vec::new() };
    let caption = m.caption.unwrap_or_default();
    let (file, name, content_type) = if let Some(photo) = m.photo.into_iter().last() {
        // Telegram sends photos as JPEG.
        (photo, "photo.jpg".to_owned(), Some("image/jpeg".to_owned()))
    } else if let Some(doc) = m.document {
        let name = doc.file_name.clone().unwrap_or_else(|| "file".into());
        let content_type = doc.mime_type.clone();
        (doc, name, content_type)
    } else {
        return Vec::new();
    };
    vec![crate::Media { caption, line: String::new(), name, content_type, size: file.file_size, source: crate::MediaSource::Telegram(file.file_id) }]
}

#[derive(Deserialize)]
struct FileAnswer {
    ok: bool,
    #[serde(default)]
    result: Option<FileResult>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
struct FileResult {
    #[serde(default)]
    file_path: Option<String>,
    #[serde(default)]
    file_size: Option<u64>,
}

/// `getFile`: where a file can be downloaded (`{api_base}/file/bot<token>/<path>`).
pub async fn file_path(client: &http::Client, api_base: &str, bot_token: &str, file_id: &str) -> Result<(String, Option<u64>), AdapterError> {
    let url = format!("{}/bot{bot_token}/getFile", api_base.trim_end_matches('/'));
    let response = client.post_json(&url, &[], json!({"file_id": file_id}).to_string().into_bytes()).await?;
    if matches!(response.status, 408 | 429 | 500..=599) {
        return Err(crate::media_status(response.status, "getFile"));
    }
    let answer: FileAnswer = serde_json::from_slice(&response.body).map_err(|_| AdapterError::Refused(format!("getFile answered {}", response.status)))?;
    match (answer.ok, answer.result) {
        (true, Some(FileResult { file_path: Some(path), file_size })) if !path.contains("..") => Ok((path, file_size)),
        _ => Err(AdapterError::Refused(format!("getFile: {}", clip(&answer.description.unwrap_or_default(), 200)))),
    }
}

#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    error_code: Option<u16>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Deserialize)]
struct Parameters {
    #[serde(default)]
    retry_after: Option<u64>,
}

/// Sends one entry with `sendMessage`.
pub async fn send(client: &http::Client, api_base: &str, bot_token: &str, message: &Outgoing) -> SendOutcome {
    let url = format!("{}/bot{}/sendMessage", api_base.trim_end_matches('/'), bot_token);
    // A numeric chat id is sent as a number, as the API documents it.
    let chat_id = match message.recipient.parse::<i64>() {
        Ok(id) => json!(id),
        Err(_) => json!(message.recipient),
    };
    let text: String = message.text.chars().take(MAX_TEXT).collect();
    let mut body = json!({"chat_id": chat_id, "text": text});
    // A bot's quick replies become a one-time reply keyboard: a tap sends its text.
    if !message.buttons.is_empty() {
        let rows: Vec<Vec<serde_json::Value>> = message.buttons.iter().map(|b| vec![json!({"text": b})]).collect();
        body["reply_markup"] = json!({"keyboard": rows, "one_time_keyboard": true, "resize_keyboard": true});
    }
    if !message.files.is_empty() {
        return send_files(client, api_base, bot_token, &chat_id.to_string(), message).await;
    }
    let body = body.to_string().into_bytes();
    let response = match client.post_json(&url, &[], body).await {
        Ok(r) => r,
        Err(e) => return crate::transport(e, false),
    };
    outcome(&response)
}

/// A message with files: one call, so that it is sent whole or not at all. One file
/// goes with `sendPhoto` (JPEG, PNG) or `sendDocument`; several as one album with
/// `sendMediaGroup` (all photos, or else all documents). The text is the caption.
async fn send_files(client: &http::Client, api_base: &str, bot_token: &str, chat_id: &str, message: &Outgoing) -> SendOutcome {
    let caption: String = message.text.chars().take(MAX_CAPTION).collect();
    let photos = message.files.iter().all(|f| matches!(f.content_type.as_str(), "image/jpeg" | "image/png"));
    let mut parts = vec![http::Part { name: "chat_id", file: None, bytes: chat_id.as_bytes() }];
    let method;
    let media;
    let names: Vec<String> = (0..message.files.len()).map(|i| format!("file{i}")).collect();
    if let [file] = message.files.as_slice() {
        let field = if photos { "photo" } else { "document" };
        method = if photos { "sendPhoto" } else { "sendDocument" };
        if !caption.is_empty() {
            parts.push(http::Part { name: "caption", file: None, bytes: caption.as_bytes() });
        }
        parts.push(http::Part { name: field, file: Some((&file.name, &file.content_type)), bytes: &file.bytes });
    } else {
        method = "sendMediaGroup";
        let kind = if photos { "photo" } else { "document" };
        let items: Vec<serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, name)| if i == 0 && !caption.is_empty() { json!({"type": kind, "media": format!("attach://{name}"), "caption": caption}) } else { json!({"type": kind, "media": format!("attach://{name}")}) })
            .collect();
        media = serde_json::Value::Array(items).to_string();
        parts.push(http::Part { name: "media", file: None, bytes: media.as_bytes() });
        for (file, name) in message.files.iter().zip(&names) {
            parts.push(http::Part { name, file: Some((&file.name, &file.content_type)), bytes: &file.bytes });
        }
    }
    let url = format!("{}/bot{}/{method}", api_base.trim_end_matches('/'), bot_token);
    match client.post_multipart(&url, &[], &parts).await {
        Ok(response) => outcome(&response),
        Err(e) => crate::transport(e, false),
    }
}

/// What the Bot API's answer to a send means; an album's id is its first message's.
fn outcome(response: &http::Response) -> SendOutcome {
    match serde_json::from_slice::<Answer>(&response.body) {
        Ok(Answer { ok: true, result: Some(sent), .. }) => match sent.get("message_id").or_else(|| sent.get(0).and_then(|m| m.get("message_id"))) {
            Some(id) => SendOutcome::Sent { provider_id: id.to_string() },
            None => SendOutcome::Unknown { reason: "the Bot API took the message without its id".into() },
        },
        Ok(answer) => {
            let code = answer.error_code.unwrap_or(response.status);
            let reason = clip(&format!("{code} {}", answer.description.unwrap_or_default()), 500);
            let after = answer.parameters.and_then(|p| p.retry_after).map(Duration::from_secs);
            unconfirmed(code, reason, after)
        }
        Err(_) => unconfirmed(response.status, format!("{} with an answer that is not the Bot API's", response.status), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_give_the_chat_the_sender_and_a_readable_text() {
        let text = br#"{"update_id":1,"message":{"message_id":7,"date":1,"chat":{"id":42,"type":"private"},"from":{"id":42,"is_bot":false,"first_name":"Dana","last_name":"K"},"text":"hello"}}"#;
        assert_eq!(parse(text).unwrap(), Some(("42".into(), "Dana K".into(), "7".into(), "hello".into())));
        let photo = br#"{"update_id":2,"message":{"message_id":8,"date":1,"chat":{"id":-5,"type":"group"},"photo":[{"file_id":"a","width":1,"height":1}],"caption":"receipt"}}"#;
        assert_eq!(parse(photo).unwrap().unwrap().3, "[photo: receipt]");
        let location = br#"{"update_id":3,"message":{"message_id":9,"date":1,"chat":{"id":1},"location":{"latitude":55.75,"longitude":37.62}}}"#;
        assert_eq!(parse(location).unwrap().unwrap().3, "[location 55.750000, 37.620000]");
        let edit = br#"{"update_id":4,"edited_message":{"message_id":7,"date":1,"chat":{"id":42},"text":"hello!"}}"#;
        assert_eq!(parse(edit).unwrap(), None);
        let long_name = format!(r#"{{"update_id":6,"message":{{"message_id":1,"chat":{{"id":1}},"from":{{"first_name":"{}"}},"text":"x"}}}}"#, "Я".repeat(150));
        let name = parse(long_name.as_bytes()).unwrap().unwrap().1;
        assert!(name.len() <= switchboard_actors::core::MAX_SENDER_BYTES && name.starts_with('Я'), "a long name is cut to what the core takes");
        assert!(parse(b"{not json").is_err());
        assert!(parse(br#"{"update_id":5,"message":{"chat":{"id":1}}}"#).is_err(), "a message without its id");
    }

    /// What the customer typed with a voice message, an audio file or a message of a
    /// kind not shown is kept, not dropped.
    #[test]
    fn a_caption_is_kept_whatever_it_came_with() {
        let with = |field: &str| format!(r#"{{"update_id":1,"message":{{"message_id":7,"chat":{{"id":42}},{field},"caption":"my order is 123"}}}}"#);
        let text = |body: String| parse(body.as_bytes()).unwrap().unwrap().3;
        assert_eq!(text(with(r#""voice":{"file_id":"v","duration":3}"#)), "[voice message: my order is 123]");
        assert_eq!(text(with(r#""audio":{"file_id":"a","duration":3}"#)), "[audio: my order is 123]");
        assert_eq!(text(with(r#""dice":{"emoji":"🎲","value":3}"#)), "[a message of a kind this channel does not show: my order is 123]");
        assert_eq!(text(r#"{"update_id":1,"message":{"message_id":7,"chat":{"id":42},"voice":{"file_id":"v"}}}"#.to_owned()), "[voice message]");
        assert_eq!(text(r#"{"update_id":1,"message":{"message_id":7,"chat":{"id":42},"dice":{"value":3}}}"#.to_owned()), "[a message of a kind this channel does not show]");
    }

    #[test]
    fn a_success_the_answer_does_not_confirm_is_unknown_not_refused() {
        let answer = |status: u16, body: &str| outcome(&http::Response { status, headers: Vec::new(), body: body.as_bytes().to_vec().into() });
        assert!(matches!(answer(200, r#"{"ok":true,"result":{"message_id":77}}"#), SendOutcome::Sent { provider_id } if provider_id == "77"));
        // Taken, but nothing says which message it became: maybe delivered.
        assert!(matches!(answer(200, r#"{"ok":true}"#), SendOutcome::Unknown { .. }));
        assert!(matches!(answer(200, "<html>proxy</html>"), SendOutcome::Unknown { .. }));
        // Refusals and failures keep their meaning.
        assert!(matches!(answer(400, r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#), SendOutcome::Failed { .. }));
        assert!(matches!(answer(502, "<html>bad gateway</html>"), SendOutcome::Retry { .. }));
    }

    #[test]
    fn the_secret_must_match_exactly() {
        assert!(verify("s3cret-token-0123", Some(b"s3cret-token-0123")));
        assert!(!verify("s3cret-token-0123", Some(b"s3cret-token-0124")));
        assert!(!verify("s3cret-token-0123", Some(b"s3cret")));
        assert!(!verify("s3cret-token-0123", None));
    }
}
