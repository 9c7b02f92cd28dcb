//! Channels: how conversations enter and leave Switchboard through a provider (ADR 0009).
//!
//! An adapter turns a provider's webhook into a normalised [`Inbound`] message carrying
//! the provider's own message id (which makes a redelivery harmless), and sends what
//! the outbox worker hands it ([`Outgoing`]) through the provider's send endpoint,
//! saying whether a failure may heal ([`SendOutcome`]). Built in: Telegram
//! ([`telegram`]) and the open Channel API ([`api`]), whose adapters run outside
//! Switchboard in any language. The web chat is built into the gateway.

pub mod api;
pub mod email;
pub mod http;
pub mod messenger;
pub mod telegram;
pub mod viber;
pub mod vk;
pub mod whatsapp;

use std::time::Duration;

use switchboard_actors::model::{AdapterConfig, ConversationId};

use serde::{Deserialize, Serialize};
use switchboard_actors::core::MAX_TEXT_CHARS;
use switchboard_actors::model::ChannelId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdapterError {
    #[error("payload is not valid for this channel: {0}")]
    Malformed(String),
    #[error("message text is {actual} characters, the limit is {limit}")]
    TooLong { limit: usize, actual: usize },
    #[error("provider refused delivery: {0}")]
    Refused(String),
    #[error("provider unreachable: {0}")]
    Unreachable(String),
    /// The request may have reached the provider, but no answer came back.
    #[error("no answer from the provider: {0}")]
    NoAnswer(String),
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

/// A file a customer sent that the provider keeps: fetched ([`fetch_media`]) before the
/// message is committed, and shown as its labelled line when it cannot be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Media {
    /// The message's text when its file is kept (the caption, maybe empty).
    pub caption: String,
    /// The labelled line that stands for this file in a message of several parts (VK,
    /// Messenger: `[photo]`, `[file]`), taken out of the text once the file is kept, the
    /// lines of the parts not kept staying; empty where the caption is the whole text
    /// of a message whose files are all kept.
    pub line: String,
    pub name: String,
    /// The type the provider gives before the download, if it gives one.
    pub content_type: Option<String>,
    /// The size the provider gives, if it gives one.
    pub size: Option<u64>,
    pub source: MediaSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaSource {
    /// A URL in the webhook (Messenger, Viber, VK) or in a Channel API push (on the
    /// origin of the adapter's `outbound_url`, fetched signed).
    Url(String),
    /// A Telegram `file_id`, resolved with `getFile`.
    Telegram(String),
    /// A WhatsApp media id, resolved with `GET /{media id}` (its URL needs the token).
    WhatsApp(String),
}

/// Largest file fetched from a provider (the largest attachment the core keeps).
pub const MAX_MEDIA_BYTES: usize = 5 * 1024 * 1024;

/// Checks that an `https://` URL a provider's webhook gave names a host by its DNS name
/// on port 443, as the HTTP client reads it: no IP address in any spelling (`127.1`,
/// `0x7f.1` and `2130706433` are addresses to the resolver), no other port, no login,
/// not `localhost` nor a name of one label.
pub fn provider_host(url: &str) -> Result<String, AdapterError> {
    let refused = |why: &str| AdapterError::Malformed(format!("a media URL {why}"));
    if !url.starts_with("https://") {
        return Err(refused("that is not https"));
    }
    let parsed = http::Url::parse(url).map_err(|_| refused("that is not a valid URL"))?;
    if parsed.port != 443 {
        return Err(refused("naming a port other than 443"));
    }
    let host = parsed.host.trim_end_matches('.').to_ascii_lowercase();
    if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        return Err(refused("whose host is not a DNS name"));
    }
    let numeric = |label: &str| !label.is_empty() && (label.bytes().all(|b| b.is_ascii_digit()) || label.strip_prefix("0x").is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit())));
    if host.split('.').all(numeric) {
        return Err(refused("naming an IP address"));
    }
    if !host.contains('.') || host == "localhost" || host.ends_with(".localhost") {
        return Err(refused("that names no public host"));
    }
    Ok(host)
}

/// What a provider's answer other than 200 to a file's lookup or download (`what`)
/// means: 408, 429 and 5xx may heal and are asked again later (`Unreachable`); any other
/// will not change by asking again (`Refused`; redirects are not followed).
pub(crate) fn media_status(status: u16, what: &str) -> AdapterError {
    match status {
        408 | 429 | 500..=599 => AdapterError::Unreachable(format!("the server answered {status} for {what}")),
        _ => AdapterError::Refused(format!("the server answered {status} for {what}")),
    }
}

/// Downloads a customer's file from the channel's provider: its bytes and its type
/// (the provider's, else the download's `Content-Type`). A URL in a webhook must be
/// `https://` unless the channel's own API base is `http://` (a local test provider).
pub async fn fetch_media(client: &http::Client, adapter: &AdapterConfig, media: &Media) -> Result<(Vec<u8>, String), AdapterError> {
    if media.size.is_some_and(|n| n > MAX_MEDIA_BYTES as u64) {
        return Err(AdapterError::TooLong { limit: MAX_MEDIA_BYTES, actual: media.size.unwrap_or_default() as usize });
    }
    let (url, headers, content_type) = match (&media.source, adapter) {
        (MediaSource::Telegram(file_id), AdapterConfig::Telegram { bot_token, api_base, .. }) => {
            let (path, size) = telegram::file_path(client, api_base, bot_token, file_id).await?;
            if size.is_some_and(|n| n > MAX_MEDIA_BYTES as u64) {
                return Err(AdapterError::TooLong { limit: MAX_MEDIA_BYTES, actual: size.unwrap_or_default() as usize });
            }
            (format!("{}/file/bot{bot_token}/{path}", api_base.trim_end_matches('/')), Vec::new(), media.content_type.clone())
        }
        (MediaSource::WhatsApp(id), AdapterConfig::WhatsApp { access_token, api_base, .. }) => {
            let (url, mime) = whatsapp::media_url(client, api_base, access_token, id).await?;
            (url, vec![("authorization", format!("Bearer {access_token}"))], mime.or_else(|| media.content_type.clone()))
        }
        (MediaSource::Url(url), AdapterConfig::Api { outbound_url, signing_secret, .. }) => {
            api::check_file_url(outbound_url, url)?;
            (url.clone(), api::file_fetch_headers(signing_secret, url), media.content_type.clone())
        }
        (MediaSource::Url(url), AdapterConfig::Messenger { api_base, .. } | AdapterConfig::Viber { api_base, .. } | AdapterConfig::Vk { api_base, .. }) => {
            if !(url.starts_with("https://") || (api_base.starts_with("http://") && url.starts_with("http://"))) {
                return Err(AdapterError::Malformed("a media URL that is not https".into()));
            }
            // The provider's file servers have names and listen on 443: a URL naming
            // an address, a port or a login would have the node reach into whatever
            // network it sits in (a local test provider, on http, excepted).
            if url.starts_with("https://") {
                provider_host(url)?;
            }
            (url.clone(), Vec::new(), media.content_type.clone())
        }
        _ => return Err(AdapterError::Malformed("the file is not from this channel's provider".into())),
    };
    let response = client.get(&url, &headers, MAX_MEDIA_BYTES).await?;
    if response.status != 200 {
        return Err(media_status(response.status, "the file"));
    }
    let content_type = content_type
        .or_else(|| response.header("content-type").map(str::to_owned))
        .map(|t| t.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .unwrap_or_else(|| "application/octet-stream".into());
    Ok((response.body.to_vec(), content_type))
}

/// One outbox entry handed to an adapter: history entry `seq` of `conversation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub channel: ChannelId,
    pub conversation: ConversationId,
    pub seq: u64,
    /// The customer's id at the provider.
    pub recipient: String,
    pub text: String,
    /// `message` (an operator wrote it) or `notice` (an automatic answer).
    pub kind: &'static str,
    /// The operator's display name, for `message` (`Bot` for the channel's bot).
    pub author: String,
    /// Quick replies the customer may tap (a bot's message), where the channel has them.
    pub buttons: Vec<String>,
    /// The message's files, read from the blob store, for channels that carry files.
    pub files: Vec<email::MailFile>,
    /// The message's files as the Channel API names them (the adapter fetches each
    /// itself), instead of their bytes in `files`.
    pub file_refs: Vec<FileRef>,
    /// For email: the thread the reply continues.
    pub thread: Option<MailThread>,
    /// Written by no person (a notice, a bot's message): mail says so (RFC 3834).
    pub automatic: bool,
}

/// A file of an outgoing message that the adapter fetches itself (the Channel API):
/// `GET /api/channel-api/{channel}/files/{id}` with the channel's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    pub id: String,
    pub name: String,
    pub content_type: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// Where an email reply belongs: the customer's subject and the ids it answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailThread {
    pub subject: String,
    /// The customer's latest Message-ID.
    pub in_reply_to: Option<String>,
    /// The thread's first Message-ID, then the one answered.
    pub references: Vec<String>,
}

impl Outgoing {
    /// The id a provider or an adapter deduplicates this entry on.
    pub fn delivery_id(&self) -> String {
        format!("{}:{}", self.conversation.0, self.seq)
    }
}

/// What became of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted, under the provider's id for the message.
    Sent { provider_id: String },
    /// May heal (rate limit, 5xx, network): try again, no sooner than `after` when the
    /// provider said so.
    Retry { reason: String, after: Option<Duration> },
    /// Will not heal (the provider refused the message itself).
    Failed { reason: String },
    /// The request may have reached a provider that cannot tell a repeat from a new
    /// message, and no answer came: sending again could deliver it twice.
    Unknown { reason: String },
}

/// What a transport error means for a provider: nothing reached it (try again), or it
/// may have (try again only where the provider deduplicates).
pub(crate) fn transport(error: AdapterError, resend_is_safe: bool) -> SendOutcome {
    match error {
        AdapterError::NoAnswer(reason) if !resend_is_safe => SendOutcome::Unknown { reason },
        e => SendOutcome::Retry { reason: e.to_string(), after: None },
    }
}

/// Hands one entry to its channel's provider.
pub async fn send(client: &http::Client, adapter: &AdapterConfig, message: &Outgoing) -> SendOutcome {
    match adapter {
        AdapterConfig::Telegram { bot_token, api_base, .. } => telegram::send(client, api_base, bot_token, message).await,
        AdapterConfig::Api { outbound_url, signing_secret, .. } => api::send(client, outbound_url, signing_secret, message).await,
        AdapterConfig::WhatsApp { access_token, phone_number_id, api_base, .. } => whatsapp::send(client, api_base, phone_number_id, access_token, message).await,
        AdapterConfig::Vk { access_token, api_base, .. } => vk::send(client, api_base, access_token, message).await,
        AdapterConfig::Messenger { page_token, api_base, .. } => messenger::send(client, api_base, page_token, message).await,
        AdapterConfig::Viber { auth_token, sender_name, api_base } => viber::send(client, api_base, auth_token, sender_name, message).await,
        AdapterConfig::Email { address, display_name, smtp_host, smtp_port, smtp_security, smtp_username, smtp_password, thread_secret } => {
            let relay = email::Relay { host: smtp_host, port: *smtp_port, security: smtp_security, username: smtp_username, password: smtp_password };
            email::send(client, &relay, address, display_name, thread_secret, message).await
        }
    }
}

/// How an HTTP answer without a usable body is read: 429 and 5xx may heal, other 4xx
/// will not.
pub(crate) fn by_status(status: u16, reason: String, after: Option<Duration>) -> SendOutcome {
    if status == 429 || status >= 500 || status == 408 {
        SendOutcome::Retry { reason, after }
    } else {
        SendOutcome::Failed { reason }
    }
}

/// The outcome of the call that sends the message itself, when its answer does not say
/// it was sent: a success status whose body is unreadable or lacks the message's id may
/// well have been delivered, so it is `Unknown` (neither refused nor sent again on a
/// provider without idempotency); any other status as [`by_status`].
pub(crate) fn unconfirmed(status: u16, reason: String, after: Option<Duration>) -> SendOutcome {
    if (200..300).contains(&status) {
        return SendOutcome::Unknown { reason };
    }
    by_status(status, reason, after)
}

/// Constant-time equality of two secrets (their lengths are not secret).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lowercase hex of bytes (public: the gateway names keys with it).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// At most `max` bytes of `text`, cut at a character boundary.
pub(crate) fn clip_bytes(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The line a customer's message of a kind the channel does not show becomes.
pub(crate) const UNSHOWN: &str = "[a message of a kind this channel does not show]";

/// `text`, or [`UNSHOWN`] when it is blank: a customer's message is never taken as
/// empty text, which the core refuses (the provider, answered, would not send it again).
pub(crate) fn shown(text: String) -> String {
    if text.trim().is_empty() {
        UNSHOWN.to_owned()
    } else {
        text
    }
}

/// A customer's message text as the core takes it: at most `max` characters; a longer
/// one keeps its start and ends saying it was cut and how long it was, so that the
/// operator knows to ask for the rest.
pub fn message_text(text: &str, max: usize) -> String {
    let total = text.chars().count();
    if total <= max {
        return text.to_owned();
    }
    let note = format!("…\n[the message was cut here: it had {total} characters]");
    let keep = max.saturating_sub(note.chars().count());
    let mut cut: String = text.chars().take(keep).collect();
    cut.push_str(&note);
    cut
}

/// `text` in parts of at most `max` characters each, for a provider that takes no
/// longer message (a notice or a bot's reply with its quick replies as lines can be
/// longer than Messenger's 2,000 or WhatsApp's and VK's 4,096): a part ends at its last
/// line break, else its last space, in its second half, else at `max` exactly. One part
/// when it fits; blank parts are left out.
pub(crate) fn text_parts(text: &str, max: usize) -> Vec<String> {
    let max = max.max(1);
    let chars: Vec<char> = text.chars().collect();
    let mut parts = Vec::new();
    let mut start = 0;
    while chars.len() - start > max {
        let window = &chars[start..start + max];
        let at = |found: Option<usize>| found.filter(|i| *i >= max / 2).map(|i| i + 1);
        let cut = at(window.iter().rposition(|c| *c == '\n')).or_else(|| at(window.iter().rposition(|c| c.is_whitespace()))).unwrap_or(max);
        parts.push(window[..cut].iter().collect::<String>().trim_end().to_owned());
        start += cut;
    }
    parts.push(chars[start..].iter().collect());
    parts.retain(|p| !p.trim().is_empty());
    if parts.is_empty() {
        parts.push(text.to_owned());
    }
    parts
}

/// What a message sent in `n` parts comes to once part `i` (from 0) answered
/// `outcome`, every part before it sent: `Continue` to send the next. A part that is not
/// sent after others were is `unknown` (sending again would show the customer those
/// twice), unless the provider drops what it already has (`resend_is_safe`).
pub(crate) fn after_part(outcome: SendOutcome, i: usize, n: usize, resend_is_safe: bool) -> std::ops::ControlFlow<SendOutcome> {
    use std::ops::ControlFlow::{Break, Continue};
    match outcome {
        SendOutcome::Sent { .. } if i + 1 < n => Continue(()),
        outcome @ SendOutcome::Sent { .. } => Break(outcome),
        outcome if i == 0 || resend_is_safe => Break(outcome),
        SendOutcome::Retry { reason, .. } | SendOutcome::Failed { reason } | SendOutcome::Unknown { reason } => {
            Break(SendOutcome::Unknown { reason: clip(&format!("part {} of {n} was not sent ({reason}) after the parts before it were", i + 1), 500) })
        }
    }
}

/// Text cut to at most `max` characters, for reasons kept in the log.
pub(crate) fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_longer_than_the_provider_takes_goes_in_parts_cut_between_lines_or_words() {
        assert_eq!(text_parts("short", 10), vec!["short"]);
        // Cut at the last line break in the second half of each part.
        assert_eq!(text_parts("Hello there\n1. Yes\n2. No", 14), vec!["Hello there", "1. Yes\n2. No"]);
        // Else at the last space; else at the limit exactly. Nothing is lost but the
        // spaces a part ends with.
        assert_eq!(text_parts("aaaa bbbb cccc", 7), vec!["aaaa", "bbbb", "cccc"]);
        assert_eq!(text_parts("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        // Counted in characters, not bytes.
        let long = "ж".repeat(4500);
        let parts = text_parts(&long, 2000);
        assert_eq!(parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(), vec![2000, 2000, 500]);
        assert_eq!(parts.concat(), long);
        let words = vec!["word"; 900].join(" ");
        assert!(text_parts(&words, 2000).iter().all(|p| p.chars().count() <= 2000 && p.starts_with("word") && p.ends_with("word")));
        assert_eq!(text_parts(&words, 2000).join(" "), words);
    }

    #[test]
    fn a_part_not_sent_after_others_were_is_unknown_unless_the_provider_drops_repeats() {
        use std::ops::ControlFlow::{Break, Continue};
        let sent = || SendOutcome::Sent { provider_id: "m1".into() };
        let refused = || SendOutcome::Failed { reason: "400 too long".into() };
        assert_eq!(after_part(sent(), 0, 2, false), Continue(()));
        assert_eq!(after_part(sent(), 1, 2, false), Break(sent()));
        // The first part refused: nothing was shown, so it is as it came.
        assert_eq!(after_part(refused(), 0, 2, false), Break(refused()));
        let Break(SendOutcome::Unknown { reason }) = after_part(refused(), 1, 2, false) else { panic!("unknown expected") };
        assert_eq!(reason, "part 2 of 2 was not sent (400 too long) after the parts before it were");
        // VK drops a part it has by its random_id: retrying the whole is safe.
        let retry = SendOutcome::Retry { reason: "500".into(), after: None };
        assert_eq!(after_part(retry.clone(), 1, 3, true), Break(retry));
    }

    #[test]
    fn a_long_message_says_where_it_was_cut() {
        assert_eq!(message_text("short", 4000), "short");
        let long = "я".repeat(7000);
        let cut = message_text(&long, 4000);
        assert_eq!(cut.chars().count(), 4000);
        assert!(cut.starts_with("яяя") && cut.ends_with("[the message was cut here: it had 7000 characters]"), "{}", &cut[cut.len() - 80..]);
    }

    #[test]
    fn a_media_url_must_name_a_public_host_on_the_default_port() {
        for good in ["https://sun9-1.userapi.com/impg/x.jpg?size=604", "https://scontent.xx.fbcdn.net:443/v/t1/x.png", "https://dl-media.viber.com/1/share/2/x"] {
            assert!(provider_host(good).is_ok(), "{good}");
        }
        for bad in [
            "https://10.0.0.5/admin",
            "https://[::1]/x",
            "https://intranet.example.com:8443/x",
            "https://user@files.example.com/x",
            "https://localhost/x",
            "https://metadata/x",
            "https://127.0.0.1:443/x",
            "http://files.example.com/x",
            "https://127.1/x",
            "https://0x7f.0x1/x",
            "https://2130706433/x",
            "https://0300.0250.0.1/x",
            "https://cdn.example.com?:8443/x",
            "https://cdn.example.com%2f@10.0.0.1/x",
        ] {
            assert!(provider_host(bad).is_err(), "{bad}");
        }
    }

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
        assert!(key.len() <= switchboard_actors::core::MAX_KEY_BYTES, "{key}");
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
