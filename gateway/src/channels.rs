//! Messenger channels at the edge (ADR 0009, docs/channel-api.md):
//!
//! - provider webhooks on the public listener, under `/hooks/`: the provider's secret is
//!   checked before the body is read as anything, and the provider is answered only once
//!   the message is committed (5xx when it could not be, so the provider retries);
//! - the open Channel API on the private listener, under `/api/channel-api/{channel}/`,
//!   for adapters in any language, with the channel's bearer token;
//! - the admin's adapter settings (`/api/channels/{id}/adapter`: secrets never shown back
//!   in full) and the supervisors' dead-letter list (`/api/deliveries`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use switchboard_actors::core::Reply;
use switchboard_actors::model::{AdapterConfig, ChannelId, Command, ConversationId, DeliveryOutcome, DeliveryResult, IdentityKey, Role};
use switchboard_actors::state::Delivery;
use switchboard_adapters::{api, messenger, telegram, viber, vk, whatsapp};

use crate::rest::{Body, Params, Staff};

use crate::{Gateway, GatewayError};

fn adapter_of(gw: &Gateway, channel: &ChannelId) -> Option<AdapterConfig> {
    gw.backend.directory_shard().read().channel_adapters.get(channel).cloned()
}

/// `POST /hooks/telegram/{channel}`: a Telegram webhook delivery.
pub async fn telegram_hook(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = ChannelId::new(channel);
    let Some(AdapterConfig::Telegram { secret, .. }) = adapter_of(&gw, &channel) else {
        return Err(GatewayError::NotFound(format!("no Telegram channel {channel}")));
    };
    if !telegram::verify(&secret, headers.get(telegram::SECRET_HEADER).map(|v| v.as_bytes())) {
        tracing::warn!(%channel, "a Telegram webhook without the channel's secret was refused");
        return Err(GatewayError::Unauthorized("the webhook secret does not match"));
    }
    let Some((sender, sender_name, message_id, text)) = telegram::parse(&body).map_err(|e| GatewayError::BadRequest(e.to_string()))? else {
        return Ok(Json(json!({"ok": true, "ignored": "the update carries no customer message"})).into_response());
    };
    let inbound = Inbound { sender, sender_name, message_id, text, media: telegram::media(&body) };
    Ok(Json(take_message(&gw, &channel, inbound).await?).into_response())
}

#[derive(Deserialize)]
pub struct Subscribe {
    #[serde(rename = "hub.mode", default)]
    mode: String,
    #[serde(rename = "hub.verify_token", default)]
    verify_token: String,
    #[serde(rename = "hub.challenge", default)]
    challenge: String,
}

/// `GET /hooks/whatsapp/{channel}` and `GET /hooks/messenger/{channel}`: Meta's
/// subscription check; the challenge is echoed when the verify token is the channel's.
pub async fn meta_subscribe(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, Params(q): Params<Subscribe>) -> Result<Response, GatewayError> {
    let channel = ChannelId::new(channel);
    let verify_token = match adapter_of(&gw, &channel) {
        Some(AdapterConfig::WhatsApp { verify_token, .. } | AdapterConfig::Messenger { verify_token, .. }) => verify_token,
        _ => return Err(GatewayError::NotFound(format!("no WhatsApp or Messenger channel {channel}"))),
    };
    if q.mode != "subscribe" || !switchboard_adapters::same_secret(q.verify_token.as_bytes(), verify_token.as_bytes()) || q.challenge.len() > 200 {
        return Err(GatewayError::Forbidden("the verify token does not match"));
    }
    Ok(q.challenge.into_response())
}

/// `POST /hooks/whatsapp/{channel}`: a signed delivery of messages and statuses. Answered
/// 200 once everything in it is committed, 503 if something could not be (Meta
/// delivers it all again; what was committed is not written twice).
pub async fn whatsapp_hook(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = ChannelId::new(channel);
    let Some(AdapterConfig::WhatsApp { app_secret, .. }) = adapter_of(&gw, &channel) else {
        return Err(GatewayError::NotFound(format!("no WhatsApp channel {channel}")));
    };
    if !whatsapp::verify(&app_secret, headers.get(whatsapp::SIGNATURE_HEADER).map(|v| v.as_bytes()), &body) {
        tracing::warn!(%channel, "a WhatsApp webhook with a bad signature was refused");
        return Err(GatewayError::Unauthorized("the signature does not match"));
    }
    let items = whatsapp::parse(&body).map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    let mut media = whatsapp::media(&body);
    let mut taken = Vec::new();
    let mut receipts = Vec::new();
    let mut held = HeldSenders::default();
    for item in items {
        match item {
            whatsapp::Item::Message { from, name, id, text } => {
                let files = take_media_of(&mut media, &id);
                if let Some(answer) = held.take(&from, take_message(&gw, &channel, Inbound { sender: from.clone(), sender_name: name, message_id: id, text, media: files })).await? {
                    taken.push(answer);
                }
            }
            whatsapp::Item::Status { id, status, reason } => {
                let outcome = match status.as_str() {
                    "delivered" => DeliveryOutcome::Delivered,
                    "read" => DeliveryOutcome::Read,
                    "failed" => DeliveryOutcome::Failed { reason },
                    // `sent` is known from the send's own answer.
                    _ => continue,
                };
                // A receipt for a message whose send is not committed yet is held.
                take_receipt(&gw, &channel, &id, outcome, &mut receipts).await?;
            }
        }
    }
    held.answer()?;
    commit_receipts(&gw, &receipts).await?;
    Ok(proven(Json(json!({"ok": true, "messages": taken, "statuses": receipts.len()})).into_response()))
}

/// The customers of one webhook delivery (a batch) whose message the node asked to be
/// delivered again (`503`, a file not fetched for now): their later messages in the
/// batch wait for that delivery too, so that a conversation keeps its order, while
/// other customers' messages are taken at once.
#[derive(Default)]
struct HeldSenders {
    senders: std::collections::HashSet<String>,
    first: Option<GatewayError>,
}

impl HeldSenders {
    /// Runs `take` unless `sender` is held; a `503` of it holds the sender. Other
    /// errors end the delivery, as before.
    async fn take(&mut self, sender: &str, take: impl std::future::Future<Output = Result<Value, GatewayError>>) -> Result<Option<Value>, GatewayError> {
        if self.senders.contains(sender) {
            return Ok(None);
        }
        match take.await {
            Ok(answer) => Ok(Some(answer)),
            Err(e @ GatewayError::Busy(_)) => {
                self.senders.insert(sender.to_owned());
                self.first.get_or_insert(e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The delivery's answer once every message was looked at: the first `503`, if any
    /// (the provider delivers it all again; what was taken is not written twice).
    fn answer(&mut self) -> Result<(), GatewayError> {
        self.first.take().map_or(Ok(()), Err)
    }
}

/// `POST /hooks/vk/{channel}`: a VK Callback API event. VK wants the plain text `ok`
/// once it is committed (it retries anything else), and the confirmation string when it
/// checks the server.
pub async fn vk_hook(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = ChannelId::new(channel);
    let Some(AdapterConfig::Vk { secret, confirmation, group_id, .. }) = adapter_of(&gw, &channel) else {
        return Err(GatewayError::NotFound(format!("no VK channel {channel}")));
    };
    match vk::parse(&body, &secret) {
        Ok(vk::Event::Confirmation { group_id: asked }) if asked.to_string() == group_id => Ok(confirmation.into_response()),
        Ok(vk::Event::Confirmation { .. }) => Err(GatewayError::Forbidden("that is not this channel's community")),
        // Both with the channel's secret checked (a confirmation carries none).
        Ok(vk::Event::Other) => Ok(proven("ok".into_response())),
        Ok(vk::Event::Message { from, id, text }) => {
            let inbound = Inbound { sender: from, sender_name: String::new(), message_id: id, text, media: vk::media(&body) };
            let answer = take_message(&gw, &channel, inbound).await?;
            tracing::debug!(%answer, "a VK message was taken");
            Ok(proven("ok".into_response()))
        }
        Err(switchboard_adapters::AdapterError::Refused(why)) => {
            tracing::warn!(%channel, "a VK callback was refused: {why}");
            Err(GatewayError::Unauthorized("the callback's secret does not match"))
        }
        Err(e) => Err(GatewayError::BadRequest(e.to_string())),
    }
}

/// Marks a webhook's answer as one given to a caller that proved it is the provider (its
/// signature or secret checked): what lets its address use the last of the places for
/// large deliveries (`large_hook_permit`). An answer without it (a VK confirmation,
/// which carries no secret) proves nothing.
#[derive(Clone, Copy)]
pub(crate) struct HookProven;

fn proven(mut response: Response) -> Response {
    response.extensions_mut().insert(HookProven);
    response
}

/// `POST /hooks/messenger/{channel}`: a signed page delivery of messages and delivery
/// receipts; answered as WhatsApp's are.
pub async fn messenger_hook(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = ChannelId::new(channel);
    let Some(AdapterConfig::Messenger { app_secret, .. }) = adapter_of(&gw, &channel) else {
        return Err(GatewayError::NotFound(format!("no Messenger channel {channel}")));
    };
    if !whatsapp::verify(&app_secret, headers.get(whatsapp::SIGNATURE_HEADER).map(|v| v.as_bytes()), &body) {
        tracing::warn!(%channel, "a Messenger webhook with a bad signature was refused");
        return Err(GatewayError::Unauthorized("the signature does not match"));
    }
    let mut taken = Vec::new();
    let mut receipts = Vec::new();
    let mut media = messenger::media(&body);
    let mut held = HeldSenders::default();
    for item in messenger::parse(&body).map_err(|e| GatewayError::BadRequest(e.to_string()))? {
        match item {
            messenger::Item::Message { from, id, text } => {
                let files = take_media_of(&mut media, &id);
                if let Some(answer) = held.take(&from, take_message(&gw, &channel, Inbound { sender: from.clone(), sender_name: String::new(), message_id: id, text, media: files })).await? {
                    taken.push(answer);
                }
            }
            messenger::Item::Delivered { ids } => {
                for id in ids {
                    take_receipt(&gw, &channel, &id, DeliveryOutcome::Delivered, &mut receipts).await?;
                }
            }
        }
    }
    held.answer()?;
    commit_receipts(&gw, &receipts).await?;
    Ok(proven(Json(json!({"ok": true, "messages": taken, "statuses": receipts.len()})).into_response()))
}

/// `POST /hooks/viber/{channel}`: a signed Viber callback: a customer's message, a
/// receipt, or an event that is answered and dropped.
pub async fn viber_hook(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = ChannelId::new(channel);
    let Some(AdapterConfig::Viber { auth_token, .. }) = adapter_of(&gw, &channel) else {
        return Err(GatewayError::NotFound(format!("no Viber channel {channel}")));
    };
    if !viber::verify(&auth_token, headers.get(viber::SIGNATURE_HEADER).map(|v| v.as_bytes()), &body) {
        tracing::warn!(%channel, "a Viber callback with a bad signature was refused");
        return Err(GatewayError::Unauthorized("the signature does not match"));
    }
    match viber::parse(&body).map_err(|e| GatewayError::BadRequest(e.to_string()))? {
        viber::Item::Message { from, name, id, text } => {
            let inbound = Inbound { sender: from, sender_name: name, message_id: id, text, media: viber::media(&body) };
            Ok(Json(take_message(&gw, &channel, inbound).await?).into_response())
        }
        viber::Item::Receipt { id, status, reason } => {
            let outcome = match status {
                "delivered" => DeliveryOutcome::Delivered,
                "read" => DeliveryOutcome::Read,
                _ => DeliveryOutcome::Failed { reason },
            };
            let mut receipts = Vec::new();
            take_receipt(&gw, &channel, &id, outcome, &mut receipts).await?;
            commit_receipts(&gw, &receipts).await?;
            Ok(Json(json!({"ok": true, "statuses": receipts.len()})).into_response())
        }
        viber::Item::Other => Ok(Json(json!({"ok": true})).into_response()),
    }
}

/// Receipts a node holds at most while their messages' sends are not committed; past
/// it the oldest message's are dropped.
pub const MAX_EARLY_RECEIPTS: usize = 10_000;
/// Receipts held for one message at most (delivered, read, failed: one of each is all
/// a provider sends).
const MAX_EARLY_RECEIPTS_PER_ID: usize = 4;
/// How long a receipt is held waiting for its message's send to be committed.
pub const EARLY_RECEIPT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
/// How often held receipts are matched again.
const EARLY_RECEIPT_RETRY: std::time::Duration = std::time::Duration::from_millis(500);
/// Messages looked up in one round at most (a lookup may ask every shard); the next
/// round takes the next ones.
const EARLY_RECEIPTS_PER_ROUND: usize = 512;
/// The longest provider id a held receipt keeps.
const MAX_HELD_ID_BYTES: usize = 256;

/// Provider receipts (WhatsApp's and Viber's statuses, Messenger's deliveries) for a
/// message whose send is not committed yet: the provider answered the send and
/// reported the delivery before the outbox's `sent` entry was written, so the provider
/// id finds nothing. Answering the webhook with an error would make the provider
/// deliver the whole payload again, messages included, and one that never finds its
/// message (a message sent by another system on the same number) would be retried for
/// days; so the webhook is answered, and the receipt held here for up to
/// [`EARLY_RECEIPT_PATIENCE`] and matched again every [`EARLY_RECEIPT_RETRY`]. A
/// message's receipts stay in the order they came: while some are held, a new one for
/// the same message is held behind them. Held in memory only: a node that stops loses
/// what it held (receipts are hints; the message itself is sent either way).
#[derive(Default)]
pub(crate) struct EarlyReceipts {
    held: std::sync::Mutex<Held>,
    /// Whether a task matching held receipts runs (one per node, while any are held).
    matching: std::sync::atomic::AtomicBool,
}

/// Held receipts by message, oldest message first.
#[derive(Default)]
struct Held {
    order: std::collections::VecDeque<(ChannelId, String)>,
    /// Where in `order` the next round starts (rounds take turns over every message).
    turn: usize,
    by_id: std::collections::HashMap<(ChannelId, String), Early>,
    /// Receipts held in all (the sum of `outcomes` lengths).
    count: usize,
}

struct Early {
    outcomes: Vec<DeliveryOutcome>,
    since: std::time::Instant,
}

impl EarlyReceipts {
    /// Whether receipts for this message are held (a new one goes behind them).
    fn holds(&self, channel: &ChannelId, id: &str) -> bool {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).by_id.contains_key(&(channel.clone(), id.to_owned()))
    }
}

/// A webhook's receipt: committed with the others of its delivery when its message is
/// found and none of that message's is held; otherwise held (see [`EarlyReceipts`]).
async fn take_receipt(gw: &Arc<Gateway>, channel: &ChannelId, id: &str, outcome: DeliveryOutcome, receipts: &mut Vec<DeliveryResult>) -> Result<(), GatewayError> {
    if gw.early_receipts.holds(channel, id) {
        hold_receipt(gw, channel, id, outcome);
        return Ok(());
    }
    match gw.by_provider_id(channel, id).await {
        Ok(Some((conversation, seq))) => receipts.push(DeliveryResult { conversation, seq, node: 0, outcome }),
        Ok(None) => hold_receipt(gw, channel, id, outcome),
        // A shard that cannot be asked now: the receipt waits and is matched again (as
        // one whose message is not written yet), and the delivery's messages, other
        // customers' included, are taken all the same.
        Err(e) => {
            tracing::debug!(%channel, error = %e, "a receipt's message could not be looked up now (a shard did not answer); held");
            hold_receipt(gw, channel, id, outcome);
        }
    }
    Ok(())
}

/// Holds a receipt whose provider id found no sent message (see [`EarlyReceipts`]).
fn hold_receipt(gw: &Arc<Gateway>, channel: &ChannelId, id: &str, outcome: DeliveryOutcome) {
    use std::sync::atomic::Ordering::Relaxed;
    if id.is_empty() || id.len() > MAX_HELD_ID_BYTES {
        gw.metrics.receipts_dropped.fetch_add(1, Relaxed);
        return;
    }
    {
        let mut held = gw.early_receipts.held.lock().unwrap_or_else(|p| p.into_inner());
        let key = (channel.clone(), id.to_owned());
        let full = held.by_id.get(&key).is_some_and(|e| e.outcomes.len() >= MAX_EARLY_RECEIPTS_PER_ID);
        if full {
            gw.metrics.receipts_dropped.fetch_add(1, Relaxed);
            return;
        }
        while held.count >= MAX_EARLY_RECEIPTS {
            let Some(oldest) = held.order.pop_front() else { break };
            if let Some(gone) = held.by_id.remove(&oldest) {
                held.count -= gone.outcomes.len();
                gw.metrics.receipts_dropped.fetch_add(gone.outcomes.len() as u64, Relaxed);
            }
        }
        // (Eviction may have taken this very message: it is held anew, from now.)
        let Held { order, by_id, count, .. } = &mut *held;
        by_id
            .entry(key.clone())
            .or_insert_with(|| {
                order.push_back(key);
                Early { outcomes: Vec::new(), since: std::time::Instant::now() }
            })
            .outcomes
            .push(outcome);
        *count += 1;
    }
    gw.metrics.receipts_held.fetch_add(1, Relaxed);
    if !gw.early_receipts.matching.swap(true, std::sync::atomic::Ordering::AcqRel) {
        tokio::spawn(match_held_receipts(Arc::downgrade(gw)));
    }
}

/// Clears `matching` if the matching task panics, so the next held receipt starts
/// another. (A task that ends normally cleared it itself, before its last look at the
/// held receipts: clearing it again here could let a second task start beside one a
/// new receipt started meanwhile.)
struct Matching(std::sync::Weak<Gateway>);

impl Drop for Matching {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(gw) = self.0.upgrade() {
                gw.early_receipts.matching.store(false, std::sync::atomic::Ordering::Release);
            }
        }
    }
}

/// Matches held receipts again until none is left: a message found has its receipts
/// committed in the order they came; one held past [`EARLY_RECEIPT_PATIENCE`] (not
/// found, or not committed) has them dropped. Stops with the gateway.
async fn match_held_receipts(gw: std::sync::Weak<Gateway>) {
    use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
    let _matching = Matching(gw.clone());
    loop {
        tokio::time::sleep(EARLY_RECEIPT_RETRY).await;
        let Some(gw) = gw.upgrade() else { return };
        // The round's messages, from where the last round stopped (the order stays the
        // order they came in, which eviction follows).
        let round: Vec<((ChannelId, String), usize, std::time::Instant)> = {
            let mut held = gw.early_receipts.held.lock().unwrap_or_else(|p| p.into_inner());
            let len = held.order.len();
            let n = len.min(EARLY_RECEIPTS_PER_ROUND);
            let start = if len == 0 { 0 } else { held.turn % len };
            let keys: Vec<(ChannelId, String)> = (0..n).map(|i| held.order[(start + i) % len].clone()).collect();
            held.turn = if len == 0 { 0 } else { (start + n) % len };
            keys.into_iter().filter_map(|k| held.by_id.get(&k).map(|e| (e.outcomes.len(), e.since)).map(|(n, since)| (k, n, since))).collect()
        };
        if round.is_empty() {
            gw.early_receipts.matching.store(false, Release);
            // A receipt held between the look and the store started no task: go on.
            let more = !gw.early_receipts.held.lock().unwrap_or_else(|p| p.into_inner()).by_id.is_empty();
            if more && !gw.early_receipts.matching.swap(true, AcqRel) {
                continue;
            }
            return;
        }
        // Each found message with how many of its receipts this round commits, and when
        // it was first held (a message evicted and held anew meanwhile is another).
        let mut found: Vec<((ChannelId, String), usize, (ConversationId, u64), std::time::Instant)> = Vec::new();
        // Each with when it was first held: one evicted and held anew meanwhile is
        // another, with its own patience.
        let mut expired: Vec<((ChannelId, String), std::time::Instant)> = Vec::new();
        for (key, n, since) in round {
            match gw.by_provider_id(&key.0, &key.1).await {
                Ok(Some(entry)) => found.push((key, n, entry, since)),
                // Not committed yet, or the shards could not be asked now: again next
                // round, unless it has waited long enough.
                _ if since.elapsed() >= EARLY_RECEIPT_PATIENCE => expired.push((key, since)),
                _ => {}
            }
        }
        // The found messages' receipts as they are held now, in the order they came.
        let results: Vec<DeliveryResult> = {
            let held = gw.early_receipts.held.lock().unwrap_or_else(|p| p.into_inner());
            found
                .iter()
                .flat_map(|(key, n, (conversation, seq), since)| {
                    let outcomes = held.by_id.get(key).filter(|e| e.since == *since).map(|e| e.outcomes[..(*n).min(e.outcomes.len())].to_vec()).unwrap_or_default();
                    outcomes.into_iter().map(|outcome| DeliveryResult { conversation: *conversation, seq: *seq, node: 0, outcome })
                })
                .collect()
        };
        let committed = results.is_empty() || commit_receipts(&gw, &results).await.is_ok();
        let mut held = gw.early_receipts.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = Vec::new();
        if committed {
            gw.metrics.receipts_matched_late.fetch_add(results.len() as u64, Relaxed);
            for (key, n, _, since) in found {
                if let Some(early) = held.by_id.get_mut(&key).filter(|e| e.since == since) {
                    // Those committed go; any held behind them meanwhile wait their turn.
                    let n = n.min(early.outcomes.len());
                    early.outcomes.drain(..n);
                    let empty = early.outcomes.is_empty();
                    held.count -= n;
                    if empty {
                        done.push(key);
                    }
                }
            }
        } else {
            // Tried again next round (a delivered or read receipt twice is harmless),
            // unless it has waited long enough.
            expired.extend(found.into_iter().filter(|(key, _, _, since)| held.by_id.get(key).is_some_and(|e| e.since == *since && e.since.elapsed() >= EARLY_RECEIPT_PATIENCE)).map(|(key, _, _, since)| (key, since)));
        }
        for (key, since) in expired {
            if held.by_id.get(&key).is_some_and(|e| e.since == since) {
                let Some(gone) = held.by_id.remove(&key) else { continue };
                tracing::debug!(channel = %key.0, id = %key.1, "a provider receipt found no sent message within {EARLY_RECEIPT_PATIENCE:?}; dropped");
                held.count -= gone.outcomes.len();
                gw.metrics.receipts_dropped.fetch_add(gone.outcomes.len() as u64, Relaxed);
            }
        }
        for key in done {
            held.by_id.remove(&key);
        }
        let Held { order, by_id, turn, .. } = &mut *held;
        order.retain(|k| by_id.contains_key(k));
        if *turn >= order.len() {
            *turn = 0;
        }
    }
}

async fn commit_receipts(gw: &Gateway, receipts: &[DeliveryResult]) -> Result<(), GatewayError> {
    for chunk in receipts.chunks(switchboard_actors::core::MAX_DELIVERY_BATCH) {
        gw.submit(Command::DeliveryResults { results: chunk.to_vec() }).await.map_err(|_| GatewayError::Busy("the statuses could not be committed; deliver them again"))?;
    }
    Ok(())
}

/// A customer's message from a provider's webhook, with the files it carries.
struct Inbound {
    sender: String,
    sender_name: String,
    message_id: String,
    /// The message as labelled lines (`[photo: caption]`), as it is shown when its
    /// files cannot be fetched.
    text: String,
    media: Vec<switchboard_adapters::Media>,
}

impl Inbound {
    /// The message as its text alone, with its files as labelled lines.
    fn plain(self, channel: &ChannelId) -> Command {
        Command::ChannelInbound { channel: channel.clone(), sender: self.sender, sender_name: self.sender_name, provider_message_id: self.message_id, text: self.text }
    }
}

/// The media of message `id`, taken out of a delivery's list.
fn take_media_of(media: &mut Vec<(String, switchboard_adapters::Media)>, id: &str) -> Vec<switchboard_adapters::Media> {
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(media).into_iter().partition(|(of, _)| of == id);
    *media = rest;
    mine.into_iter().map(|(_, m)| m).collect()
}

/// One client for fetching customers' files from providers.
fn media_client() -> Result<&'static switchboard_adapters::http::Client, GatewayError> {
    static CLIENT: std::sync::OnceLock<switchboard_adapters::http::Client> = std::sync::OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client);
    }
    let client = switchboard_adapters::http::Client::new(MEDIA_TIMEOUT).map_err(|e| GatewayError::Internal(e.to_string()))?;
    Ok(CLIENT.get_or_init(|| client))
}

/// Messages whose files a node fetches at once (provider webhooks and Channel API
/// pushes together): each holds up to 5 files of 5 MiB in memory until it is stored.
const MEDIA_FETCHES: usize = 4;
/// How long a provider's message with files waits for one of those slots.
const MEDIA_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn media_fetches() -> &'static tokio::sync::Semaphore {
    static FETCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MEDIA_FETCHES);
    &FETCHES
}

/// Time to fetch one file a customer sent, and all of one message's.
const MEDIA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const MEDIA_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// Times a node asks a provider to deliver a message again (503) because one of its
/// files could not be fetched for now (no answer in time, a connection that failed, the
/// file server's 408, 429 or 5xx); the next failure takes the message with that file as
/// its line. Counted per message on each node, for [`MEDIA_RETRY_MEMORY`].
const MEDIA_RETRIES: u8 = 2;
/// How long a node remembers a message's failed fetches, and how many messages at most
/// (past that, the oldest are forgotten: such a message is asked for again at most
/// [`MEDIA_RETRIES`] more times).
const MEDIA_RETRY_MEMORY: std::time::Duration = std::time::Duration::from_secs(3600);
const MEDIA_RETRY_MESSAGES: usize = 4096;

/// Whether a message whose file could not be fetched for now is to be delivered again,
/// counting this ask; `false` once it was asked [`MEDIA_RETRIES`] times. The message is
/// remembered by a digest of its inbound key, never the key (which names the customer:
/// a phone number, an address), and forgotten after [`MEDIA_RETRY_MEMORY`].
fn ask_again_for_media(key: &str) -> bool {
    static ASKED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<[u8; 16], (u8, std::time::Instant)>>> = std::sync::OnceLock::new();
    let mut asked = ASKED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    asked.retain(|_, (_, at)| now.duration_since(*at) < MEDIA_RETRY_MEMORY);
    if asked.len() >= MEDIA_RETRY_MESSAGES {
        while asked.len() >= MEDIA_RETRY_MESSAGES {
            let Some(oldest) = asked.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone()) else { break };
            asked.remove(&oldest);
        }
    }
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref()[..16]);
    let count = asked.entry(digest).or_insert((0, now));
    if count.0 >= MEDIA_RETRIES {
        // Kept at the limit until it ages out: a message of several files asks once.
        return false;
    }
    count.0 += 1;
    true
}

/// `text` without one line equal to each of `kept` (the last such line: the labels of
/// a message's parts follow its text).
fn without_lines(text: &str, kept: &[&str]) -> String {
    let mut lines: Vec<&str> = text.split('\n').collect();
    for line in kept.iter().filter(|l| !l.is_empty()) {
        if let Some(at) = lines.iter().rposition(|l| l == line) {
            lines.remove(at);
        }
    }
    lines.join("\n")
}

/// Commits a customer's message with the files it carries, fetched from the provider
/// and checked as uploads are (type, content, size); a file that cannot be fetched or
/// kept stays a labelled line in the text, and the message is taken all the same.
async fn take_message(gw: &Gateway, channel: &ChannelId, m: Inbound) -> Result<Value, GatewayError> {
    if m.media.is_empty() {
        return take_inbound(gw, m.plain(channel)).await;
    }
    let Some(adapter) = adapter_of(gw, channel) else {
        return Err(GatewayError::NotFound(format!("channel {channel} has no adapter")));
    };
    // A redelivery of a message its open conversation has: no need to fetch its files.
    let key = switchboard_actors::core::inbound_key(channel, &m.sender, &m.message_id);
    let seen = gw.inbound_seen_anywhere(channel, &m.sender, &key).await;
    // A blocked sender's message is refused at commit: its files are not worth fetching,
    // and copies of them on other members would stay behind.
    if seen || crate::attachments::sender_blocked(gw, channel, &m.sender) {
        return take_inbound(gw, m.plain(channel)).await;
    }
    // A slot among the messages whose files are being fetched; a provider that cannot
    // have one soon delivers the message again.
    let Ok(Ok(_fetching)) = tokio::time::timeout(MEDIA_SLOT_WAIT, media_fetches().acquire()).await else {
        return Err(GatewayError::Busy("too many messages with files are being fetched; deliver it again"));
    };
    let client = media_client()?;
    let mut files = Vec::new();
    let mut caption = String::new();
    let mut kept_lines: Vec<&str> = Vec::new();
    // Within the webhook's request deadline: files not fetched by then are asked for
    // again, and then stay lines.
    let fetch_until = tokio::time::Instant::now() + MEDIA_BUDGET;
    // A file not fetched for now: the provider is asked to deliver the message again,
    // a few times, before it is taken with that file as its line. Decided once per
    // delivery, whatever the number of files that failed.
    let mut decided: Option<bool> = None;
    let mut for_now = |why: &str| -> bool {
        *decided.get_or_insert_with(|| {
            if ask_again_for_media(&key) {
                tracing::info!(%channel, why, "a customer's file could not be fetched for now; the provider is asked to deliver its message again");
                true
            } else {
                tracing::warn!(%channel, why, "a customer's file could not be fetched after the provider delivered its message again; it is shown as a line");
                false
            }
        })
    };
    for (i, media) in m.media.iter().take(switchboard_actors::core::MAX_ATTACHMENTS_PER_MESSAGE).enumerate() {
        let Ok(fetched) = tokio::time::timeout_at(fetch_until, switchboard_adapters::fetch_media(client, &adapter, media)).await else {
            if for_now("the files took too long to fetch") {
                crate::attachments::forget_inbound_files(gw, &files).await;
                return Err(GatewayError::Busy("the message's files could not be fetched in time; deliver it again"));
            }
            break;
        };
        let (bytes, content_type) = match fetched {
            Ok(got) => got,
            Err(e @ (switchboard_adapters::AdapterError::Unreachable(_) | switchboard_adapters::AdapterError::NoAnswer(_))) => {
                if for_now(&e.to_string()) {
                    crate::attachments::forget_inbound_files(gw, &files).await;
                    return Err(GatewayError::Busy("a file of the message could not be fetched for now; deliver it again"));
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(%channel, error = %e, "a customer's file could not be fetched; its message shows it as a line");
                continue;
            }
        };
        if !crate::attachments::ALLOWED_TYPES.contains(&content_type.as_str()) || !crate::attachments::bytes_match_type(&content_type, &bytes) {
            tracing::info!(%channel, %content_type, "a customer's file of a type not kept; its message shows it as a line");
            continue;
        }
        let name = crate::attachments::safe_name(&media.name, &content_type);
        let owner = crate::attachments::FileOwner::Sender { channel: channel.clone(), sender: m.sender.clone() };
        match crate::attachments::keep_inbound_file(gw, &owner, &key, i, name, content_type, &bytes).await {
            Ok(file) => files.push(file),
            Err(e) => {
                tracing::warn!(%channel, error = %e, "a customer's file could not be stored; the provider is asked to retry");
                crate::attachments::forget_inbound_files(gw, &files).await;
                return Err(GatewayError::Busy("the message's file could not be stored; deliver it again"));
            }
        }
        caption = media.caption.chars().take(switchboard_actors::core::MAX_TEXT_CHARS).collect();
        kept_lines.push(&media.line);
    }
    if files.is_empty() {
        return take_inbound(gw, m.plain(channel)).await;
    }
    let text = if m.media.iter().all(|media| media.line.is_empty()) {
        // Everything fetched: the caption is the text; else the labelled lines say it all.
        if files.len() == m.media.len() { caption } else { m.text.clone() }
    } else {
        // A message of several parts keeps its text and the lines of what was not kept
        // (a video, a location, a file that could not be fetched).
        without_lines(&m.text, &kept_lines)
    };
    let command = Command::ChannelInboundRich {
        channel: channel.clone(),
        sender: m.sender.clone(),
        sender_name: m.sender_name.clone(),
        provider_message_id: m.message_id.clone(),
        text,
        files: files.clone(),
        thread: None,
        attributes: Vec::new(),
    };
    match commit_inbound(gw, command).await? {
        Ok(answer) => Ok(answer),
        // Refused with its files (a conversation with no room for them, say): the files
        // go, and the message is taken as its lines.
        Err(e) => {
            tracing::info!(%channel, error = %e, "a customer's message was refused with its files; taken as lines");
            crate::attachments::forget_inbound_files(gw, &files).await;
            take_inbound(gw, m.plain(channel)).await
        }
    }
}

/// Commits an inbound message and answers its provider: 200 once committed (or when a
/// retry could never succeed: a blocked sender, an empty text), 503 when the commit
/// failed, so that the provider delivers it again.
async fn take_inbound(gw: &Gateway, command: Command) -> Result<Value, GatewayError> {
    let channel = match &command {
        Command::ChannelInbound { channel, .. } | Command::ChannelInboundRich { channel, .. } => channel.clone(),
        _ => ChannelId::new(""),
    };
    match commit_inbound(gw, command).await? {
        Ok(answer) => Ok(answer),
        Err(e) => {
            tracing::info!(%channel, error = %e, "an inbound message was dropped");
            Ok(json!({"ok": true, "dropped": e.code(), "message": e.to_string()}))
        }
    }
}

/// Commits an inbound message: its answer, or why the core refused it (`Ok(Err)`: no
/// retry changes that), or `503` when the commit failed, so that it is delivered again.
async fn commit_inbound(gw: &Gateway, command: Command) -> Result<Result<Value, switchboard_actors::Error>, GatewayError> {
    let channel = match &command {
        Command::ChannelInbound { channel, .. } | Command::ChannelInboundRich { channel, .. } => Some(channel.clone()),
        _ => None,
    };
    // The provider's message id makes a second copy harmless: sent again through a
    // failover before the provider is asked to deliver it again.
    match gw.submit_keyed(command).await {
        Ok(Reply::Inbound { conversation, duplicate }) => Ok(Ok(json!({"ok": true, "conversation": conversation.0, "duplicate": duplicate}))),
        Ok(_) => Ok(Ok(json!({"ok": true}))),
        // Not decided (a commit, actor, storage or unreachable member failed): again.
        Err(e) if !e.is_refusal() => {
            tracing::warn!(error = %e, "an inbound message could not be committed; the provider is asked to retry");
            Err(GatewayError::Busy("the message could not be committed; deliver it again"))
        }
        // The directory has the channel's adapter (its signature was checked against
        // it) but the conversation shard has not received it yet (a channel just
        // connected, on a split node): not final, so the provider delivers it again.
        Err(e) if channel.as_ref().is_some_and(|c| settings_not_there_yet(gw, c, &e)) => Err(not_there_yet(channel.as_ref())),
        Err(e) => Ok(Err(e)),
    }
}

/// Whether the core refused an inbound message of `channel` only because the shard
/// that decided it has not received the channel's adapter yet, while the directory has
/// it (its signature or token was checked against it): a channel just connected, on a
/// split node, whose settings travel to the conversation shards by letter. Not final.
pub(crate) fn settings_not_there_yet(gw: &Gateway, channel: &ChannelId, e: &switchboard_actors::Error) -> bool {
    matches!(e, switchboard_actors::Error::Invalid(why) if why.starts_with(&format!("channel {channel} has no adapter:"))) && adapter_of(gw, channel).is_some()
}

/// The answer that has the provider deliver a message again, for
/// [`settings_not_there_yet`].
fn not_there_yet(channel: Option<&ChannelId>) -> GatewayError {
    tracing::info!(?channel, "an inbound message came before its channel's settings reached its conversation shard; the provider is asked to retry");
    GatewayError::Busy("the channel's settings have not reached the conversation's shard yet; deliver it again")
}

/// The Channel API's bearer token, checked against the channel's digest.
fn api_channel(gw: &Gateway, channel: &str, headers: &HeaderMap) -> Result<ChannelId, GatewayError> {
    let channel = ChannelId::new(channel);
    let token = crate::bearer_token(headers).ok_or(GatewayError::Unauthorized("send the channel token as Authorization: Bearer <token>"))?;
    match adapter_of(gw, &channel) {
        Some(AdapterConfig::Api { token_sha256, .. }) if api::token_matches(&token_sha256, token) => Ok(channel),
        _ => Err(GatewayError::Unauthorized("the channel token does not match this channel")),
    }
}

/// A JSON body, with the reason it is not one as a 400.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    serde_json::from_slice(body).map_err(|e| GatewayError::BadRequest(format!("the body is not what this call takes: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundBody {
    sender: String,
    #[serde(default)]
    sender_name: String,
    message_id: String,
    /// Required without files; with them, the caption (maybe empty).
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    files: Vec<InboundFileBody>,
}

/// A file of a pushed message: where the node fetches it (on the origin of the
/// adapter's `outbound_url`), its name, and its type if the fetch's answer should not
/// say it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundFileBody {
    url: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    content_type: Option<String>,
}

/// Longest file URL a push may name, in bytes.
const MAX_FILE_URL_BYTES: usize = 2048;

/// `POST /api/channel-api/{channel}/messages`: an adapter pushes a customer's message.
pub async fn api_inbound(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    // The token is checked before the body is parsed.
    let channel = api_channel(&gw, &channel, &headers)?;
    let body: InboundBody = parse(&body)?;
    let command = if body.files.is_empty() {
        let text = body.text.ok_or_else(|| GatewayError::BadRequest("the body is not what this call takes: missing field `text` (required unless `files` are sent)".into()))?;
        Command::ChannelInbound { channel: channel.clone(), sender: body.sender, sender_name: body.sender_name, provider_message_id: body.message_id, text }
    } else {
        match api_inbound_files(&gw, &channel, body).await? {
            Ok(command) => command,
            // Taken before: the core answers `duplicate` without them.
            Err(plain) => plain,
        }
    };
    let files = match &command {
        Command::ChannelInboundRich { files, .. } => files.clone(),
        _ => Vec::new(),
    };
    // An adapter gets the real answer: 409 with the reason for what can never be taken.
    let submitted = match gw.submit_keyed(command).await {
        Err(e) if settings_not_there_yet(&gw, &channel, &e) => {
            crate::attachments::forget_inbound_files(&gw, &files).await;
            return Err(not_there_yet(Some(&channel)));
        }
        Err(e) => {
            // Refused: nothing names the files. Not decided: the record may still apply
            // and name them, so they stay (a copy the push sends again writes over them).
            if e.is_refusal() {
                crate::attachments::forget_inbound_files(&gw, &files).await;
            }
            return Err(e.into());
        }
        Ok(submitted) => submitted,
    };
    let (conversation, duplicate) = match submitted {
        Reply::Inbound { conversation, duplicate } => (conversation.0, duplicate),
        other => return Err(GatewayError::Internal(format!("an inbound message was answered {other:?}"))),
    };
    Ok(Json(json!({"conversation": conversation, "duplicate": duplicate})).into_response())
}

/// A pushed message with files: its files fetched from the adapter, checked as uploads
/// are (type, content, size) and kept on a majority of the members, in the command
/// that takes them (`Ok`); or, for a message taken before, the command without them
/// (`Err`: the core answers `duplicate`, and nothing is fetched). What the core would
/// refuse whatever the files (a bad sender, a blank caption, a customer a block rule
/// names) is refused before anything is fetched; one the channel's allow list leaves
/// out is refused at commit, and its files removed; a file that cannot be taken refuses
/// the whole push, with why.
async fn api_inbound_files(gw: &Gateway, channel: &ChannelId, body: InboundBody) -> Result<Result<Command, Command>, GatewayError> {
    use switchboard_actors::core::{MAX_ATTACHMENTS_PER_MESSAGE, MAX_SENDER_BYTES};
    use switchboard_actors::Error as Core;
    if body.files.len() > MAX_ATTACHMENTS_PER_MESSAGE {
        return Err(GatewayError::BadRequest(format!("at most {MAX_ATTACHMENTS_PER_MESSAGE} files per message")));
    }
    let unauthorized = || GatewayError::Unauthorized("the channel token does not match this channel");
    let adapter = adapter_of(gw, channel).ok_or_else(unauthorized)?;
    let AdapterConfig::Api { outbound_url, .. } = &adapter else { return Err(unauthorized()) };
    for (i, file) in body.files.iter().enumerate() {
        if file.url.len() > MAX_FILE_URL_BYTES || file.name.len() > 255 || file.content_type.as_ref().is_some_and(|t| t.len() > 100) {
            return Err(GatewayError::BadRequest(format!("file {}: a url of at most {MAX_FILE_URL_BYTES} bytes, a name of at most 255, a content_type of at most 100", i + 1)));
        }
        if let Err(e) = switchboard_adapters::api::check_file_url(outbound_url, &file.url) {
            let why = match e {
                switchboard_adapters::AdapterError::Malformed(why) => why,
                other => other.to_string(),
            };
            return Err(GatewayError::BadRequest(format!("file {}: {why}", i + 1)));
        }
    }
    // What the core refuses whatever the files is refused before they are fetched.
    let text = body.text.unwrap_or_default();
    if body.sender.is_empty() || body.sender.len() > MAX_SENDER_BYTES || body.sender_name.len() > MAX_SENDER_BYTES {
        return Err(Core::Invalid(format!("the sender id must be 1-{MAX_SENDER_BYTES} bytes, the name at most {MAX_SENDER_BYTES}")).into());
    }
    if body.message_id.is_empty() {
        return Err(Core::Invalid("the provider message id is empty".into()).into());
    }
    let plain = Command::ChannelInbound { channel: channel.clone(), sender: body.sender.clone(), sender_name: body.sender_name.clone(), provider_message_id: body.message_id.clone(), text: text.clone() };
    // Taken before: the core answers `duplicate` without fetching anything again.
    let key = switchboard_actors::core::inbound_key(channel, &body.sender, &body.message_id);
    if gw.inbound_seen_anywhere(channel, &body.sender, &key).await {
        return Ok(Err(plain));
    }
    // With files the caption may be empty; otherwise as the core takes a text.
    if !text.is_empty() {
        switchboard_actors::core::check_text(&crate::clean_text(&text))?;
    }
    for (i, file) in body.files.iter().enumerate() {
        if let Some(kind) = file.content_type.as_deref().map(|t| t.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()) {
            if !crate::attachments::ALLOWED_TYPES.contains(&kind.as_str()) {
                return Err(Core::Invalid(format!("file {}: files of type {kind} are not accepted", i + 1)).into());
            }
        }
    }
    // A blocked customer's files are neither fetched nor kept.
    if let Some(why) = crate::attachments::sender_refused(gw, channel, &body.sender) {
        return Err(Core::Blocked(why).into());
    }
    // At most `MEDIA_FETCHES` messages' files are in memory at once on a node.
    let Ok(_fetching) = media_fetches().try_acquire() else {
        return Err(GatewayError::Busy("too many messages with files are being fetched; send it again shortly"));
    };
    let client = media_client()?;
    let fetch_until = tokio::time::Instant::now() + MEDIA_BUDGET;
    let mut fetched = Vec::new();
    for (i, file) in body.files.iter().enumerate() {
        let media = switchboard_adapters::Media { caption: String::new(), line: String::new(), name: file.name.clone(), content_type: file.content_type.clone(), size: None, source: switchboard_adapters::MediaSource::Url(file.url.clone()) };
        let n = i + 1;
        let got = match tokio::time::timeout_at(fetch_until, switchboard_adapters::fetch_media(client, &adapter, &media)).await {
            Err(_) => return Err(Core::Unreachable(format!("the files were not fetched within {} s; send the message again", MEDIA_BUDGET.as_secs())).into()),
            Ok(Ok(got)) => got,
            // For good: sending the same file again will not help.
            Ok(Err(switchboard_adapters::AdapterError::TooLong { limit, .. })) => return Err(Core::Invalid(format!("file {n} is larger than {limit} bytes")).into()),
            Ok(Err(switchboard_adapters::AdapterError::Refused(why) | switchboard_adapters::AdapterError::Malformed(why))) => {
                return Err(Core::Invalid(format!("file {n} could not be fetched: {why}")).into());
            }
            // Maybe not next time.
            Ok(Err(e)) => return Err(Core::Unreachable(format!("file {n} could not be fetched ({e}); send the message again")).into()),
        };
        let (bytes, content_type) = got;
        if bytes.is_empty() {
            return Err(Core::Invalid(format!("file {n} is empty")).into());
        }
        if !crate::attachments::ALLOWED_TYPES.contains(&content_type.as_str()) {
            return Err(Core::Invalid(format!("file {n}: files of type {content_type} are not accepted")).into());
        }
        if !crate::attachments::bytes_match_type(&content_type, &bytes) {
            return Err(Core::Invalid(format!("file {n}: its bytes are not {content_type}")).into());
        }
        fetched.push((crate::attachments::safe_name(&file.name, &content_type), content_type, bytes));
    }
    let owner = crate::attachments::FileOwner::Sender { channel: channel.clone(), sender: body.sender.clone() };
    let mut files = Vec::new();
    for (i, (name, content_type, bytes)) in fetched.into_iter().enumerate() {
        match crate::attachments::keep_inbound_file(gw, &owner, &key, i, name, content_type, &bytes).await {
            Ok(file) => files.push(file),
            Err(e) => {
                tracing::warn!(%channel, error = %e, "a pushed message's file could not be stored");
                crate::attachments::forget_inbound_files(gw, &files).await;
                return Err(GatewayError::Busy("the message's files could not be stored; send it again"));
            }
        }
    }
    Ok(Ok(Command::ChannelInboundRich {
        channel: channel.clone(),
        sender: body.sender,
        sender_name: body.sender_name,
        provider_message_id: body.message_id,
        text,
        files,
        thread: None,
        attributes: Vec::new(),
    }))
}

/// `GET /api/channel-api/{channel}/files/{id}`: a file of one of the channel's
/// conversations that staff sent (named in an outbound delivery); the customer's own
/// files are not served back.
pub async fn api_file(State(gw): State<Arc<Gateway>>, Path((channel, id)): Path<(String, String)>, headers: HeaderMap) -> Result<Response, GatewayError> {
    let channel = api_channel(&gw, &channel, &headers)?;
    crate::attachments::channel_download(&gw, &channel, &id).await
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum StatusName {
    Delivered,
    Read,
    Failed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    conversation: u64,
    seq: u64,
    status: StatusName,
    #[serde(default)]
    reason: String,
}

/// `POST /api/channel-api/{channel}/statuses`: receipts the adapter's provider reported.
pub async fn api_status(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = api_channel(&gw, &channel, &headers)?;
    let body: Vec<StatusBody> = parse(&body)?;
    if body.len() > switchboard_actors::core::MAX_DELIVERY_BATCH {
        return Err(GatewayError::BadRequest(format!("at most {} statuses at once", switchboard_actors::core::MAX_DELIVERY_BATCH)));
    }
    let results: Vec<DeliveryResult> = {
        let mut results = Vec::new();
        for s in body {
            let conversation = ConversationId(s.conversation);
            // Only this channel's entries: a token cannot touch another channel's outbox.
            let reads = gw.backend.conversation_reads(conversation);
            match reads.conversation(conversation).await? {
                Some(c) if c.channel == channel => {}
                Some(_) => return Err(GatewayError::NotFound(format!("conversation {} on channel {channel}", s.conversation))),
                // Gone (past its channel's retention): nothing left to mark, and the rest
                // of the batch still counts.
                None => continue,
            }
            // Only the customer's deliveries: what the channel's bot was told (which may
            // be another party's) is not the adapter's to mark, nor is an unknown entry.
            let deliveries = reads.deliveries_of(conversation).await?;
            let Some(entry) = deliveries.iter().find(|(seq, d)| *seq == s.seq && !d.to_bot).map(|(_, d)| d) else { continue };
            // A receipt that overtook the answer to its send (an adapter that reports
            // `delivered` the moment it answered) would be dropped: it is asked again.
            if matches!(s.status, StatusName::Delivered | StatusName::Read) && matches!(entry.status, switchboard_actors::state::DeliveryStatus::Attempting { .. }) {
                return Err(GatewayError::Busy("the answer to that entry's send is not committed yet; report its status again shortly"));
            }
            let outcome = match s.status {
                StatusName::Delivered => DeliveryOutcome::Delivered,
                StatusName::Read => DeliveryOutcome::Read,
                StatusName::Failed => DeliveryOutcome::Failed { reason: s.reason.chars().take(500).collect() },
            };
            results.push(DeliveryResult { conversation, seq: s.seq, node: 0, outcome });
        }
        results
    };
    if !results.is_empty() {
        gw.submit(Command::DeliveryResults { results }).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A secret shown back: its first and last two characters.
fn masked(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 8 {
        "••••".to_owned()
    } else {
        format!("{}…{}", chars[..2].iter().collect::<String>(), chars[chars.len() - 2..].iter().collect::<String>())
    }
}

pub(crate) fn adapter_json(channel: &ChannelId, adapter: &AdapterConfig) -> Value {
    match adapter {
        AdapterConfig::Telegram { bot_token, secret, api_base } => json!({
            "kind": "telegram",
            "bot_token": masked(bot_token),
            "secret": masked(secret),
            "api_base": api_base,
            "webhook_path": format!("/hooks/telegram/{channel}"),
        }),
        AdapterConfig::WhatsApp { access_token, app_secret, verify_token, phone_number_id, api_base } => json!({
            "kind": "whatsapp",
            "access_token": masked(access_token),
            "app_secret": masked(app_secret),
            "verify_token": masked(verify_token),
            "phone_number_id": phone_number_id,
            "api_base": api_base,
            "webhook_path": format!("/hooks/whatsapp/{channel}"),
        }),
        AdapterConfig::Vk { access_token, secret, confirmation, group_id, api_base } => json!({
            "kind": "vk",
            "access_token": masked(access_token),
            "secret": masked(secret),
            "confirmation": confirmation,
            "group_id": group_id,
            "api_base": api_base,
            "webhook_path": format!("/hooks/vk/{channel}"),
        }),
        AdapterConfig::Viber { auth_token, sender_name, api_base } => json!({
            "kind": "viber",
            "auth_token": masked(auth_token),
            "sender_name": sender_name,
            "api_base": api_base,
            "webhook_path": format!("/hooks/viber/{channel}"),
        }),
        AdapterConfig::Messenger { page_token, app_secret, verify_token, api_base } => json!({
            "kind": "messenger",
            "page_token": masked(page_token),
            "app_secret": masked(app_secret),
            "verify_token": masked(verify_token),
            "api_base": api_base,
            "webhook_path": format!("/hooks/messenger/{channel}"),
        }),
        AdapterConfig::Email { address, display_name, smtp_host, smtp_port, smtp_security, smtp_username, smtp_password, .. } => json!({
            "kind": "email",
            "address": address,
            "display_name": display_name,
            "smtp_host": smtp_host,
            "smtp_port": smtp_port,
            "smtp_security": smtp_security,
            "smtp_username": smtp_username,
            "smtp_password": if smtp_password.is_empty() { String::new() } else { masked(smtp_password) },
        }),
        AdapterConfig::Api { outbound_url, .. } => json!({
            "kind": "api",
            "outbound_url": outbound_url,
            "token": "••••",
            "signing_secret": "••••",
            "inbound_path": format!("/api/channel-api/{channel}/messages"),
        }),
    }
}

/// `GET /api/channels/{id}/adapter` (admin).
pub async fn get_adapter(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let channel = ChannelId::new(id);
    match adapter_of(&gw, &channel) {
        Some(adapter) => Ok(Json(adapter_json(&channel, &adapter))),
        None => Err(GatewayError::NotFound(format!("channel {channel} has no adapter"))),
    }
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdapterBody {
    Telegram {
        bot_token: String,
        secret: String,
        #[serde(default = "telegram_api")]
        api_base: String,
    },
    Api {
        outbound_url: String,
    },
    Viber {
        auth_token: String,
        sender_name: String,
        #[serde(default = "viber_api")]
        api_base: String,
    },
    Messenger {
        page_token: String,
        app_secret: String,
        verify_token: String,
        #[serde(default = "graph_api")]
        api_base: String,
    },
    Vk {
        access_token: String,
        secret: String,
        confirmation: String,
        group_id: String,
        #[serde(default = "vk_api")]
        api_base: String,
    },
    Email {
        address: String,
        #[serde(default)]
        display_name: String,
        smtp_host: String,
        #[serde(default = "submission_port")]
        smtp_port: u16,
        #[serde(default = "starttls")]
        smtp_security: String,
        #[serde(default)]
        smtp_username: String,
        #[serde(default)]
        smtp_password: String,
    },
    #[serde(rename = "whatsapp")]
    WhatsApp {
        access_token: String,
        app_secret: String,
        verify_token: String,
        phone_number_id: String,
        #[serde(default = "graph_api")]
        api_base: String,
    },
}

fn submission_port() -> u16 {
    587
}

fn starttls() -> String {
    "starttls".to_owned()
}

fn viber_api() -> String {
    "https://chatapi.viber.com".to_owned()
}

fn vk_api() -> String {
    "https://api.vk.com".to_owned()
}

fn graph_api() -> String {
    "https://graph.facebook.com/v21.0".to_owned()
}

fn telegram_api() -> String {
    "https://api.telegram.org".to_owned()
}

fn random_secret() -> Result<String, GatewayError> {
    crate::auth::random_b64(32)
}

/// `PUT /api/channels/{id}/adapter` (admin). For the Channel API a new token and
/// signing secret are made and shown in this answer only.
pub async fn put_adapter(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::AdminStaff, Path(id): Path<String>, Body(body): Body<AdapterBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let channel = ChannelId::new(id);
    let (adapter, shown) = match body {
        AdapterBody::Telegram { bot_token, secret, api_base } => (AdapterConfig::Telegram { bot_token, secret, api_base }, None),
        AdapterBody::WhatsApp { access_token, app_secret, verify_token, phone_number_id, api_base } => {
            (AdapterConfig::WhatsApp { access_token, app_secret, verify_token, phone_number_id, api_base }, None)
        }
        AdapterBody::Viber { auth_token, sender_name, api_base } => (AdapterConfig::Viber { auth_token, sender_name, api_base }, None),
        AdapterBody::Messenger { page_token, app_secret, verify_token, api_base } => (AdapterConfig::Messenger { page_token, app_secret, verify_token, api_base }, None),
        AdapterBody::Vk { access_token, secret, confirmation, group_id, api_base } => (AdapterConfig::Vk { access_token, secret, confirmation, group_id, api_base }, None),
        AdapterBody::Email { address, display_name, smtp_host, smtp_port, smtp_security, smtp_username, smtp_password } => {
            // A channel that had email keeps its thread secret: customers' answers to
            // earlier replies still find their conversations.
            let thread_secret = match adapter_of(&gw, &channel) {
                Some(AdapterConfig::Email { thread_secret, .. }) => thread_secret,
                _ => random_secret()?,
            };
            let address = address.trim().to_ascii_lowercase();
            (AdapterConfig::Email { address, display_name, smtp_host, smtp_port, smtp_security, smtp_username, smtp_password, thread_secret }, None)
        }
        AdapterBody::Api { outbound_url } => {
            let (token, signing_secret) = (random_secret()?, random_secret()?);
            let adapter = AdapterConfig::Api { token_sha256: api::token_digest(&token), outbound_url, signing_secret: signing_secret.clone() };
            (adapter, Some((token, signing_secret)))
        }
    };
    gw.submit(Command::SetChannelAdapter { channel: channel.clone(), adapter: Some(adapter.clone()) }).await?;
    let mut view = adapter_json(&channel, &adapter);
    if let Some((token, signing_secret)) = shown {
        view["token"] = json!(token);
        view["signing_secret"] = json!(signing_secret);
    }
    Ok(Json(view))
}

/// `DELETE /api/channels/{id}/adapter` (admin): the channel takes no more inbound
/// messages; its outbox stops with it.
pub async fn delete_adapter(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Response, GatewayError> {
    staff.require(Role::Admin)?;
    gw.submit(Command::SetChannelAdapter { channel: ChannelId::new(id), adapter: None }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) fn delivery_json(conversation: ConversationId, seq: u64, d: &Delivery) -> Value {
    json!({
        "conversation": conversation.0,
        "seq": seq,
        "channel": d.channel,
        "recipient": d.recipient,
        "status": d.status.name(),
        "attempts": d.attempts,
        "provider_id": d.provider_id,
        "reason": d.reason,
        "queued_at": d.queued_at.0,
        "updated_at": d.updated_at.0,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadParams {
    #[serde(default)]
    limit: Option<usize>,
    /// `<conversation>:<seq>`: the page after that entry (a page's `next`).
    #[serde(default)]
    after: Option<String>,
}

/// A dead letters page's cursor, `<conversation>:<seq>`.
fn delivery_cursor(text: &str) -> Result<(ConversationId, u64), GatewayError> {
    let bad = || GatewayError::BadRequest(format!("after {:?} is not <conversation>:<seq>, as a page's next", text.chars().take(64).collect::<String>()));
    let (conversation, seq) = text.split_once(':').ok_or_else(bad)?;
    Ok((ConversationId(conversation.parse().map_err(|_| bad())?), seq.parse().map_err(|_| bad())?))
}

/// `GET /api/deliveries` (supervisor): the dead letters.
pub async fn dead_letters(State(gw): State<Arc<Gateway>>, staff: Staff, Params(params): Params<DeadParams>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let limit = params.limit.unwrap_or(100).clamp(1, 1000);
    let after = params.after.as_deref().map(delivery_cursor).transpose()?;
    let mut dead = Vec::new();
    let readers = gw.backend.conversation_readers();
    for answer in futures::future::join_all(readers.iter().map(|r| r.dead_letters(after, limit))).await {
        dead.extend(answer?);
    }
    dead.sort_by_key(|(c, seq, _)| (*c, *seq));
    dead.truncate(limit);
    // A full page may have more after it.
    let next = (dead.len() == limit).then(|| dead.last().map(|(c, seq, _)| format!("{}:{seq}", c.0))).flatten();
    Ok(Json(json!({"deliveries": dead.iter().map(|(c, seq, d)| delivery_json(*c, *seq, d)).collect::<Vec<_>>(), "next": next})))
}

/// `POST /api/deliveries/{conversation}/{seq}/retry` (supervisor).
pub async fn retry(State(gw): State<Arc<Gateway>>, staff: Staff, Path((conversation, seq)): Path<(String, String)>) -> Result<Response, GatewayError> {
    staff.require(Role::Supervisor)?;
    let conversation = crate::rest::conversation_id(&conversation)?;
    let seq: u64 = seq.parse().map_err(|_| GatewayError::BadRequest(format!("entry number {seq:?} is not a number")))?;
    gw.submit(Command::RetryDelivery { conversation, seq, by: staff.login.clone() }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(tag = "alg", deny_unknown_fields)]
pub enum IdentityBody {
    #[serde(rename = "HS256")]
    Hs256 { secret: String },
    #[serde(rename = "RS256")]
    Rs256 { public_key: String },
}

fn identity_json(channel: &ChannelId, key: &IdentityKey) -> Value {
    match key {
        IdentityKey::Hs256 { secret } => json!({"channel": channel, "alg": "HS256", "secret": masked(secret)}),
        IdentityKey::Rs256 { public_key_pem } => json!({"channel": channel, "alg": "RS256", "public_key": public_key_pem}),
    }
}

/// `GET /api/channels/{id}/identity` (admin): how the channel verifies customers'
/// identities (the secret masked; a public key is not secret).
pub async fn get_identity(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let channel = ChannelId::new(id);
    let key = gw.backend.directory_shard().read().channel_identity.get(&channel).cloned();
    match key {
        Some(key) => Ok(Json(identity_json(&channel, &key))),
        None => Err(GatewayError::NotFound(format!("channel {channel} verifies no identities"))),
    }
}

/// `PUT /api/channels/{id}/identity` (admin).
pub async fn put_identity(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::AdminStaff, Path(id): Path<String>, Body(body): Body<IdentityBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let channel = ChannelId::new(id);
    let key = match body {
        IdentityBody::Hs256 { secret } => IdentityKey::Hs256 { secret },
        IdentityBody::Rs256 { public_key } => {
            // Parsed now, so a key that could never verify anything is refused at once.
            crate::identity::rsa_public_key(&public_key).map_err(|e| GatewayError::Core(switchboard_actors::Error::Invalid(e)))?;
            IdentityKey::Rs256 { public_key_pem: public_key }
        }
    };
    // A verified customer is `customer:<key id>:<sub>` on every channel whose key has that
    // id: a different key with another channel's key id (chosen for it, 2^32 tries) would
    // let whoever holds it sign as that channel's customers.
    let (id, material) = (crate::identity::key_id(&key), crate::identity::material(&key));
    let taken = gw.backend.directory_shard().read().channel_identity.iter().find(|(other, k)| **other != channel && crate::identity::key_id(k) == id && crate::identity::material(k) != material).map(|(other, _)| other.clone());
    if let Some(other) = taken {
        return Err(GatewayError::Core(switchboard_actors::Error::Invalid(format!("this key's id ({id}) is that of channel {other}'s different key; use another key"))));
    }
    gw.submit(Command::SetChannelIdentity { channel: channel.clone(), key: Some(key.clone()) }).await?;
    Ok(Json(identity_json(&channel, &key)))
}

/// `DELETE /api/channels/{id}/identity` (admin): identities are no longer verified.
pub async fn delete_identity(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Response, GatewayError> {
    staff.require(Role::Admin)?;
    gw.submit(Command::SetChannelIdentity { channel: ChannelId::new(id), key: None }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The bot's bearer token, checked against the channel's bot.
fn bot_channel(gw: &Gateway, channel: &str, headers: &HeaderMap) -> Result<ChannelId, GatewayError> {
    let channel = ChannelId::new(channel);
    let token = crate::bearer_token(headers).ok_or(GatewayError::Unauthorized("send the bot token as Authorization: Bearer <token>"))?;
    let digest = gw.backend.directory_shard().read().channel_bots.get(&channel).map(|b| b.token_sha256.clone());
    match digest {
        Some(digest) if api::token_matches(&digest, token) => Ok(channel),
        _ => Err(GatewayError::Unauthorized("the bot token does not match this channel's bot")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotBody {
    url: String,
}

fn bot_json(channel: &ChannelId, bot: &switchboard_actors::model::BotConfig) -> Value {
    json!({"channel": channel, "url": bot.url, "token": "••••", "signing_secret": "••••", "api_path": format!("/api/bot/{channel}/")})
}

/// `GET /api/channels/{id}/bot` (admin).
pub async fn get_bot(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let channel = ChannelId::new(id);
    let bot = gw.backend.directory_shard().read().channel_bots.get(&channel).cloned();
    match bot {
        Some(bot) => Ok(Json(bot_json(&channel, &bot))),
        None => Err(GatewayError::NotFound(format!("channel {channel} has no bot"))),
    }
}

/// `PUT /api/channels/{id}/bot` (admin): a new token and signing secret, shown once.
pub async fn put_bot(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::AdminStaff, Path(id): Path<String>, Body(body): Body<BotBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let channel = ChannelId::new(id);
    let (token, signing_secret) = (random_secret()?, random_secret()?);
    let bot = switchboard_actors::model::BotConfig { url: body.url, token_sha256: api::token_digest(&token), signing_secret: signing_secret.clone() };
    gw.submit(Command::SetChannelBot { channel: channel.clone(), bot: Some(bot.clone()) }).await?;
    let mut view = bot_json(&channel, &bot);
    view["token"] = json!(token);
    view["signing_secret"] = json!(signing_secret);
    Ok(Json(view))
}

/// `DELETE /api/channels/{id}/bot` (admin): new conversations go to the queue again, and
/// those the bot held are handed off to their groups.
pub async fn delete_bot(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Response, GatewayError> {
    staff.require(Role::Admin)?;
    gw.submit(Command::SetChannelBot { channel: ChannelId::new(id), bot: None }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotMessageBody {
    conversation: u64,
    key: String,
    text: String,
    #[serde(default)]
    buttons: Vec<String>,
}

/// `POST /api/bot/{channel}/messages`: the bot answers.
pub async fn bot_message(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Json<Value>, GatewayError> {
    let channel = bot_channel(&gw, &channel, &headers)?;
    let body: BotMessageBody = parse(&body)?;
    let command = Command::BotReply { channel, conversation: ConversationId(body.conversation), key: body.key, text: body.text, buttons: body.buttons };
    match gw.submit(command).await? {
        Reply::Message { seq, duplicate } => Ok(Json(json!({"seq": seq, "duplicate": duplicate}))),
        other => Err(GatewayError::Internal(format!("a bot message was answered {other:?}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffBody {
    conversation: u64,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    context: std::collections::BTreeMap<String, String>,
}

/// `POST /api/bot/{channel}/handoff`: the bot hands the conversation to a skill group.
pub async fn bot_handoff(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = bot_channel(&gw, &channel, &headers)?;
    let body: HandoffBody = parse(&body)?;
    let group = body.group.map(switchboard_actors::model::SkillGroupId::new);
    gw.submit(Command::Handoff { channel, conversation: ConversationId(body.conversation), group, reason: body.reason, context: body.context.into_iter().collect() }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotCloseBody {
    conversation: u64,
    #[serde(default)]
    resolution: String,
}

/// `POST /api/bot/{channel}/close`: the bot resolved the conversation itself.
pub async fn bot_close(State(gw): State<Arc<Gateway>>, Path(channel): Path<String>, headers: HeaderMap, crate::rest::Whole(body): crate::rest::Whole) -> Result<Response, GatewayError> {
    let channel = bot_channel(&gw, &channel, &headers)?;
    let body: BotCloseBody = parse(&body)?;
    gw.submit(Command::CloseByBot { channel, conversation: ConversationId(body.conversation), resolution: body.resolution }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestBody {
    recipient: String,
    text: String,
}

/// `POST /api/channels/{id}/test` (admin): sends one message through the channel's
/// adapter now, outside any conversation and the outbox, and says what the provider
/// answered: the check an admin makes after entering the credentials.
pub async fn test_message(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::AdminStaff, Path(id): Path<String>, Body(body): Body<TestBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let channel = ChannelId::new(id);
    let adapter = adapter_of(&gw, &channel).ok_or_else(|| GatewayError::NotFound(format!("channel {channel} has no adapter")))?;
    if body.recipient.is_empty() || body.recipient.len() > switchboard_actors::core::MAX_SENDER_BYTES {
        return Err(GatewayError::BadRequest(format!("recipient must be 1-{} bytes", switchboard_actors::core::MAX_SENDER_BYTES)));
    }
    let chars = body.text.chars().count();
    if body.text.trim().is_empty() || chars > switchboard_actors::core::MAX_TEXT_CHARS {
        return Err(GatewayError::BadRequest(format!("text must be 1-{} characters", switchboard_actors::core::MAX_TEXT_CHARS)));
    }
    let client = switchboard_adapters::http::Client::new(std::time::Duration::from_secs(10)).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let message = switchboard_adapters::Outgoing {
        channel: channel.clone(),
        // Each test its own delivery id (and VK random_id), so none is taken for a repeat.
        conversation: ConversationId(0),
        seq: switchboard_actors::actors::now_ms().0,
        recipient: body.recipient,
        text: body.text,
        kind: "notice",
        author: String::new(),
        buttons: Vec::new(),
        files: Vec::new(),
        file_refs: Vec::new(),
        thread: Some(switchboard_adapters::MailThread { subject: "Switchboard test message".into(), ..Default::default() }),
        automatic: true,
    };
    let answer = match switchboard_adapters::send(&client, &adapter, &message).await {
        switchboard_adapters::SendOutcome::Sent { provider_id } => json!({"ok": true, "provider_id": provider_id}),
        switchboard_adapters::SendOutcome::Retry { reason, .. } | switchboard_adapters::SendOutcome::Failed { reason } | switchboard_adapters::SendOutcome::Unknown { reason } => json!({"ok": false, "reason": reason}),
    };
    tracing::info!(%channel, by = %staff.login, ok = %answer["ok"], "an admin sent a test message");
    Ok(Json(answer))
}
