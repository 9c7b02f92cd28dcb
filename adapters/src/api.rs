//! The open Channel API's outbound half (docs/channel-api.md): each outbox entry is
//! POSTed to the adapter's `outbound_url`, signed with HMAC-SHA256 under the channel's
//! signing secret, with a delivery id the adapter deduplicates on. Because of that id a
//! resend after a lost answer is safe, and the outbox resends instead of dead-lettering.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::json;

use crate::{by_status, clip, hex, http, same_secret, Outgoing, SendOutcome};

/// The headers of an outbound delivery.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";
pub const DELIVERY_HEADER: &str = "x-switchboard-delivery";

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &str, unix_seconds: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = unix_seconds.to_string().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    format!("t={unix_seconds},v1={}", hex(ring::hmac::sign(&key, &signed).as_ref()))
}

/// The SHA-256 of a channel token, as the channel's settings keep it (hex).
pub fn token_digest(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Whether `token` is the one whose digest the channel keeps.
pub fn token_matches(digest: &str, token: &str) -> bool {
    same_secret(token_digest(token).as_bytes(), digest.to_ascii_lowercase().as_bytes())
}

/// What the channel's bot is told: a conversation it now holds (`started`), or what the
/// customer wrote in it (`message`). Docs: docs/channel-api.md, "Bots".
pub struct BotEvent<'a> {
    pub delivery_id: String,
    pub channel: &'a str,
    pub conversation: u64,
    pub seq: u64,
    pub event: &'static str,
    pub customer_id: &'a str,
    pub customer_name: &'a str,
    pub text: &'a str,
}

/// POSTs one event to the bot, signed as outbound deliveries are.
pub async fn send_to_bot(client: &http::Client, url: &str, signing_secret: &str, event: &BotEvent<'_>) -> SendOutcome {
    let body = json!({
        "delivery_id": event.delivery_id,
        "channel": event.channel,
        "conversation": event.conversation,
        "seq": event.seq,
        "event": event.event,
        "customer": {"id": event.customer_id, "name": event.customer_name},
        "text": event.text,
    })
    .to_string()
    .into_bytes();
    post_signed(client, url, signing_secret, &event.delivery_id, body).await
}

/// `segment` percent-encoded for a URL path: every byte but `A-Z a-z 0-9 - . _ ~`.
fn path_segment(segment: &str) -> String {
    segment.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// Whether a file named in a Channel API push may be fetched: on the origin (scheme,
/// host and port) of the adapter's own `outbound_url`, so a token cannot make a node
/// fetch from anywhere else (its internal network, say).
pub fn check_file_url(outbound_url: &str, url: &str) -> Result<(), crate::AdapterError> {
    let own = http::Url::parse(outbound_url)?.origin();
    match http::Url::parse(url) {
        Ok(file) if file.origin() == own => {}
        _ => return Err(crate::AdapterError::Malformed(format!("a file url must be an http(s) URL on the origin of the channel's outbound_url ({own})"))),
    }
    Ok(())
}

/// The headers of a file fetch: signed as deliveries are, with the URL in place of the
/// body (`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<url>">`).
pub fn file_fetch_headers(signing_secret: &str, url: &str) -> Vec<(&'static str, String)> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    vec![(SIGNATURE_HEADER, signature(signing_secret, now, url.as_bytes()))]
}

#[derive(Deserialize)]
struct Accepted {
    #[serde(default)]
    provider_message_id: Option<String>,
}

/// POSTs one entry to the adapter.
pub async fn send(client: &http::Client, outbound_url: &str, signing_secret: &str, message: &Outgoing) -> SendOutcome {
    let body = json!({
        "delivery_id": message.delivery_id(),
        "channel": message.channel,
        "conversation": message.conversation.0,
        "seq": message.seq,
        "recipient": message.recipient,
        "kind": message.kind,
        "author": message.author,
        "text": message.text,
        "buttons": message.buttons,
        "files": message.file_refs.iter().map(|f| json!({
            "id": f.id,
            "name": f.name,
            "content_type": f.content_type,
            "size": f.size,
            "sha256": f.sha256,
            "path": format!("/api/channel-api/{}/files/{}", path_segment(message.channel.as_str()), path_segment(&f.id)),
        })).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes();
    post_signed(client, outbound_url, signing_secret, &message.delivery_id(), body).await
}

async fn post_signed(client: &http::Client, url: &str, signing_secret: &str, delivery_id: &str, body: Vec<u8>) -> SendOutcome {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let headers = [(SIGNATURE_HEADER, signature(signing_secret, now, &body)), (DELIVERY_HEADER, delivery_id.to_owned())];
    let response = match client.post_json(url, &headers, body).await {
        Ok(r) => r,
        Err(e) => return crate::transport(e, true),
    };
    if (200..300).contains(&response.status) {
        let id = serde_json::from_slice::<Accepted>(&response.body).ok().and_then(|a| a.provider_message_id).filter(|id| !id.is_empty() && id.len() <= 200);
        return SendOutcome::Sent { provider_id: id.unwrap_or_else(|| delivery_id.to_owned()) };
    }
    let after = response.header("retry-after").and_then(|s| s.trim().parse::<u64>().ok()).map(Duration::from_secs);
    let text = String::from_utf8_lossy(&response.body);
    by_status(response.status, clip(&format!("{} {}", response.status, text.trim()), 500), after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_token_digests_are_stable() {
        // HMAC-SHA256("key", "1700000000.{}") computed independently (Python's hmac module).
        assert_eq!(signature("key", 1_700_000_000, b"{}"), "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae");
        assert_eq!(token_digest("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(token_matches("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD", "abc"));
        assert!(!token_matches(&token_digest("abc"), "abd"));
    }

    #[test]
    fn files_are_fetched_only_from_the_outbound_url_s_origin() {
        let own = "https://adapter.example/outbound";
        assert!(check_file_url(own, "https://adapter.example/media/7?x=1").is_ok());
        assert!(check_file_url(own, "https://adapter.example:443/m").is_ok());
        for other in ["http://adapter.example/media/7", "https://adapter.example:8443/m", "https://evil.example/m", "https://adapter.example.evil/m", "file:///etc/passwd", "https://169.254.169.254/", "not a url"] {
            assert!(check_file_url(own, other).is_err(), "{other}");
        }
        assert!(check_file_url("http://127.0.0.1:9000/outbound", "http://127.0.0.1:9000/f/1").is_ok());
        assert!(check_file_url("http://127.0.0.1:9000/outbound", "http://127.0.0.1:9001/f/1").is_err());
        assert_eq!(path_segment("viber gw/ü"), "viber%20gw%2F%C3%BC");
        assert_eq!(path_segment("a-b_c.d~9"), "a-b_c.d~9");
    }
}
