//! The client WebSocket of the web chat (public listener).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use fastwebsockets::upgrade::IncomingUpgrade;
use serde_json::{json, Value};
use switchboard_actors::core::Reply;
use switchboard_actors::model::{AttachmentId, ChannelId, Command, ConversationId, Reader, SkillGroupId, Visitor};
use switchboard_actors::shard::StreamKey;

use crate::auth::{new_visitor_id, Subject, CLIENT_TOKEN_TTL, VISITOR_TOKEN_TTL};
use crate::frames::{self, ClientIn};
use crate::ws::{self, close, Flow, Follow, Outbox, Session, Surface};
use crate::Gateway;

const MAX_NAME_CHARS: usize = 100;
/// Longest message preview sent to an operator with an offer, in characters.
const PREVIEW_CHARS: usize = 200;
const MAX_ATTRIBUTES: usize = 20;
const MAX_ATTRIBUTE_CHARS: usize = 200;

pub(crate) async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    relayed: Option<axum::Extension<ws::Relayed>>,
    upgrade: IncomingUpgrade,
) -> Response {
    if let Err(refusal) = ws::admit(&gw, &headers, Surface::Client, None) {
        return refusal;
    }
    let budgets = gw.config.budgets;
    // Held for the socket's life: one address cannot open sockets without bound.
    let address = crate::budget::client_address(peer.ip());
    let slot = match gw.usage.client_sockets.acquire(address, budgets.client_sockets_per_address, u32::MAX) {
        Ok(slot) => slot,
        Err(_) => {
            gw.metrics.rate_limited.fetch_add(1, Relaxed);
            return crate::GatewayError::Budget("too many open chat sockets from your address").into_response();
        }
    };
    let session = ClientSession { gw: gw.clone(), conversation: None, peer: address, ip: peer.ip(), _slot: slot };
    ws::accept(gw, upgrade, Surface::Client, None, relayed.is_some(), session)
}

struct ClientSession {
    gw: Arc<Gateway>,
    conversation: Option<ConversationId>,
    peer: std::net::IpAddr,
    /// The client's own address (`peer` is its budget's), for block and allow lists.
    ip: std::net::IpAddr,
    _slot: crate::budget::Slot,
}

impl ClientSession {
    /// `blocked` with what the customer is told, when a block or allow list keeps them
    /// out of `channel`: nothing is written for them.
    fn admitted(&self, channel: &ChannelId, visitor: Option<&str>) -> Result<(), Value> {
        let shard = self.gw.backend.directory_shard();
        let state = shard.read();
        switchboard_actors::access::check(&state, channel, switchboard_actors::access::Customer { ip: Some(self.ip), visitor })
            .map_err(|message| frames::error("blocked", &message, None))
    }
}

/// The free text an entry carries, which is what makes a history entry large.
fn entry_text_bytes(item: &switchboard_actors::state::HistoryItem) -> usize {
    use switchboard_actors::state::HistoryItem;
    match item {
        HistoryItem::ClientMessage { text, .. } | HistoryItem::OperatorMessage { text, .. } => text.len(),
        HistoryItem::Transferred { comment, .. } | HistoryItem::Rated { comment, .. } => comment.len(),
        HistoryItem::Closed { resolution, .. } => resolution.len(),
        HistoryItem::Note { .. } => 0,
        HistoryItem::Notice { text } => text.len(),
        HistoryItem::BotMessage { text, buttons, .. } => text.len() + buttons.iter().map(String::len).sum::<usize>(),
        HistoryItem::Handoff { reason, context, .. } => reason.len() + context.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
        HistoryItem::Started { .. } | HistoryItem::Queued { .. } | HistoryItem::Assigned { .. } | HistoryItem::WithBot => 0,
    }
}

/// Parses a client's frame as [`parse`] does; a `send` refused as malformed carries its
/// `key` as `ref` (the protocol matches a `send`'s errors to it by its key), when the
/// key is a string and the frame names no `ref` of its own.
pub(crate) fn parse_client(text: &str) -> Result<ClientIn, Value> {
    parse::<ClientIn>(text, CLIENT_TYPES).map_err(|mut error| {
        if error.get("ref").is_none() {
            if let Ok(frame) = serde_json::from_str::<Value>(text) {
                if let (Some("send"), Some(key)) = (frame.get("type").and_then(Value::as_str), frame.get("key").filter(|k| k.is_string())) {
                    if let Some(r) = frames::error("", "", Some(key)).get("ref") {
                        error["ref"] = r.clone();
                    }
                }
            }
        }
        error
    })
}

/// Parses a frame, telling bad JSON, an unknown type and a malformed frame apart.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(text: &str, known: &[&str]) -> Result<T, Value> {
    let value: Value = serde_json::from_str(text).map_err(|e| frames::error("bad_json", &format!("not valid JSON: {e}"), None))?;
    let reference = value.get("ref").cloned();
    let kind = value.get("type").and_then(Value::as_str).map(str::to_owned);
    match kind {
        None => Err(frames::error("bad_frame", "frame has no string \"type\" field", reference.as_ref())),
        Some(kind) if !known.contains(&kind.as_str()) => {
            // Named as sent, cut to 64 characters: not escaped (an escape can be several
            // times the character it stands for).
            let named: String = kind.chars().take(64).collect();
            Err(frames::error("unknown_type", &format!("unknown frame type \"{named}\""), reference.as_ref()))
        }
        Some(_) => serde_json::from_value(value).map_err(|e| frames::error("bad_frame", &e.to_string(), reference.as_ref())),
    }
}

/// Attribute names only the server sets on a conversation's visitor.
const RESERVED_ATTRIBUTES: &[&str] = &["identity", "claimed_visitor_id"];

pub(crate) const CLIENT_TYPES: &[&str] = &["start", "resume", "send", "typing", "read", "close", "rate", "ping"];

/// A visitor's socket follows its conversation's history from `last` on.
struct HistoryPull {
    reads: std::sync::Arc<dyn crate::ShardReads>,
    conversation: ConversationId,
    last: u64,
    /// The last read failed: the writer reads again shortly.
    failed: bool,
}

/// Entries a `resume` replays for one token of the address's budget of resumes
/// (`--client-resumes-per-minute` tokens a minute): a reconnect, or a gateway moving
/// the socket, catches up on a few and costs a sliver of one.
pub const RESUME_ENTRIES_PER_TOKEN: u64 = 200;

/// Failed history reads, said in the log at most once every 10 s.
static HISTORY_FAILURES: crate::budget::LogEvery = crate::budget::LogEvery::new(std::time::Duration::from_secs(10));

impl ws::Pull for HistoryPull {
    fn pull(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Value>> + Send + '_>> {
        Box::pin(async move {
            // One page at a time, by count and by text: the writer asks again once this
            // one is written. Staff-only entries (notes) are skipped; a page of nothing
            // but those reads on, so an empty answer still means "caught up".
            self.failed = false;
            loop {
                let page = match self.reads.history(self.conversation, self.last, ws::PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        // Said once per process every 10 s at most, with how many more
                        // failed meanwhile (every socket following a shard nobody can
                        // read fails its reads together).
                        if let Some(quiet) = HISTORY_FAILURES.note() {
                            tracing::warn!(conversation = self.conversation.0, error = %e, failed_since_last_line = quiet, "history cannot be read now; reading again shortly");
                        }
                        self.failed = true;
                        return vec![];
                    }
                };
                let mut text_bytes = 0;
                let end = page
                    .iter()
                    .position(|e| {
                        text_bytes += entry_text_bytes(&e.item);
                        text_bytes > ws::PAGE_TEXT_BYTES
                    })
                    .map_or(page.len(), |over| over.max(1));
                let page = &page[..end];
                let Some(newest) = page.last() else { return vec![] };
                self.last = newest.seq;
                let frames: Vec<Value> = page.iter().filter(|e| frames::for_client(e)).map(frames::client_event).collect();
                if !frames.is_empty() {
                    return frames;
                }
            }
        })
    }

    fn retry(&self) -> bool {
        self.failed
    }
}

impl ClientSession {
    /// Follows `conversation` after `after_seq`, writing `first` (`started`, `resumed`)
    /// as the follow takes over: no page of a conversation the socket followed before
    /// comes after it. If the stream cannot be followed, the error; for a conversation
    /// just started (`always_first`), after `first`, which is all the visitor has of it.
    /// A resume that cannot follow says only the error: the socket follows what it did.
    async fn follow(&mut self, conversation: ConversationId, after_seq: u64, out: &Outbox, first: Value, always_first: bool) -> Result<(), Value> {
        let wake = match self.gw.backend.subscribe(StreamKey::Conversation(conversation)).await {
            Ok(wake) => wake,
            Err(e) => {
                if always_first {
                    out.json(first).await;
                }
                return Err(frames::error(e.code(), &e.to_string(), None));
            }
        };
        let pull = Box::new(HistoryPull { reads: self.gw.backend.conversation_reads(conversation), conversation, last: after_seq, failed: false });
        let signals = Some(self.gw.signals.conversation(conversation));
        self.conversation = Some(conversation);
        out.follow(Follow { wake, pull, signals, min_interval: None, paged: true, first: Some(first) }).await;
        Ok(())
    }

    /// Tells the operator a queued conversation is offered to what its visitor just wrote,
    /// so an offer made before the first message shows it (ephemeral, like typing).
    fn signal_offered(&self, conversation: ConversationId, preview: String) {
        let offered = {
            let shard = self.gw.backend.shard();
            let state = shard.read();
            match state.conversations.get(&conversation).map(|c| &c.status) {
                Some(switchboard_actors::state::ConversationStatus::Queued { offer: Some(offer), .. }) => {
                    state.offers.get(offer).map(|o| (o.operator.clone(), *offer))
                }
                _ => None,
            }
        };
        if let Some((operator, offer)) = offered {
            let signal = json!({"type": "offer_preview", "conversation": conversation.0, "offer": offer.0, "preview": preview});
            self.gw.signal_operator(&operator, signal);
        }
    }

    /// Forwards an ephemeral signal to the operator holding the conversation, if any.
    fn signal_operator(&self, conversation: ConversationId, signal: Value) {
        let operator = {
            let shard = self.gw.backend.shard();
            let state = shard.read();
            state.conversations.get(&conversation).and_then(|c| c.assigned().cloned())
        };
        if let Some(operator) = operator {
            self.gw.signal_operator(&operator, signal);
        }
    }

    /// A visitor may start only on a web channel, in its default group or one of the
    /// groups its widget offers (`public_groups`): never any queue they name.
    fn check_public_start(&self, channel: &ChannelId, group: Option<&SkillGroupId>) -> Result<(), Value> {
        let shard = self.gw.backend.directory_shard();
        let state = shard.read();
        let config = state.channels.get(channel).ok_or_else(|| frames::error("not_found", &format!("channel {channel} not found"), None))?;
        if config.kind != "web" {
            return Err(frames::error("not_allowed", &format!("channel {channel} does not take web chats"), None));
        }
        if let Some(group) = group {
            let offered = state.channel_public_groups.get(channel).is_some_and(|groups| groups.contains(group));
            if *group != config.default_group && !offered {
                return Err(frames::error("not_allowed", &format!("group {group} is not offered on channel {channel}"), None));
            }
        }
        Ok(())
    }

    /// Charges a frame that may write to the log (`send`, `close`, `rate`) to the
    /// address's budget, shared by all its sockets, and to the conversation's, shared by
    /// every socket that holds its token: neither many sockets nor many addresses
    /// multiply what can be written.
    fn charge(&self, conversation: ConversationId, reference: Option<&Value>) -> Result<(), Value> {
        let budgets = self.gw.config.budgets;
        if !self.gw.usage.messages.take(self.peer, 1.0, f64::from(budgets.client_messages_per_minute)) {
            self.gw.metrics.rate_limited.fetch_add(1, Relaxed);
            return Err(frames::error("rate_limited", "too many messages from your address; wait a minute", reference));
        }
        if !self.gw.usage.conversation_messages.take(conversation, 1.0, f64::from(budgets.conversation_messages_per_minute)) {
            self.gw.metrics.rate_limited.fetch_add(1, Relaxed);
            return Err(frames::error("rate_limited", "too many messages in this conversation; wait a minute", reference));
        }
        Ok(())
    }

    fn require_conversation(&self) -> Result<ConversationId, Value> {
        self.conversation.ok_or_else(|| frames::error("no_conversation", "send \"start\" or \"resume\" first", None))
    }

    async fn handle(&mut self, frame: ClientIn, out: &Outbox) -> Result<Flow, Value> {
        match frame {
            ClientIn::Start { channel, group, name, attributes, visitor_id, visitor_token, identity, key } => {
                if self.conversation.is_some() {
                    return Err(frames::error("already_started", "this socket already follows a conversation", None));
                }
                if key.as_deref().is_some_and(|k| !crate::auth::start_key_ok(k)) {
                    return Err(frames::error(
                        "invalid",
                        &format!("key must be {} to {} letters, digits, '-' or '_'", crate::auth::MIN_START_KEY, crate::auth::MAX_START_KEY),
                        None,
                    ));
                }
                let per_minute = f64::from(self.gw.config.budgets.starts_per_minute);
                if !self.gw.usage.starts.take(self.peer, 1.0, per_minute) {
                    self.gw.metrics.rate_limited.fetch_add(1, Relaxed);
                    return Err(frames::error("rate_limited", "too many conversations started from your address; try again later", None));
                }
                let name = name.unwrap_or_default();
                if name.chars().count() > MAX_NAME_CHARS {
                    return Err(frames::error("too_long", &format!("name is limited to {MAX_NAME_CHARS} characters"), None));
                }
                if attributes.len() + usize::from(visitor_id.is_some()) > MAX_ATTRIBUTES
                    || attributes.iter().any(|(k, v)| k.chars().count() > MAX_ATTRIBUTE_CHARS || v.chars().count() > MAX_ATTRIBUTE_CHARS)
                {
                    return Err(frames::error("too_long", "too many or too long attributes", None));
                }
                if visitor_id.as_ref().is_some_and(|v| v.is_empty() || v.chars().count() > 64) {
                    return Err(frames::error("invalid", "visitor_id must be 1 to 64 characters", None));
                }
                // Names the server sets itself cannot come from the client: a client's
                // "identity": "verified" would show staff a verification that never was.
                if let Some(name) = attributes.keys().find(|k| RESERVED_ATTRIBUTES.contains(&k.as_str())) {
                    return Err(frames::error("invalid", &format!("the attribute {name:?} is set by the server"), None));
                }
                let mut attributes: Vec<(String, String)> = attributes.into_iter().collect();
                if let Some(claimed) = visitor_id {
                    // Anyone can type any id: it is shown, never used to link conversations.
                    attributes.push(("claimed_visitor_id".into(), claimed));
                }
                // A returning visitor proves who they are with the token we signed; a
                // missing, forged or expired one just makes a new visitor.
                let channel = ChannelId::new(channel.unwrap_or_else(|| self.gw.config.web_channel.clone()));
                let mut visitor = match (visitor_token.as_deref().map(|t| self.gw.tokens.verify(t)), key.as_deref()) {
                    // A verified customer is proved by the site's identity alone: the
                    // visitor token a start with one got (left on a shared device) makes
                    // no one that customer.
                    (Some(Ok(Subject::Visitor { visitor })), _) if !visitor.starts_with("customer:") => visitor,
                    // A keyed start's new visitor is the same on every retry of it.
                    (_, Some(key)) => crate::auth::start_key_visitor(channel.as_str(), key),
                    _ => new_visitor_id().map_err(|e| frames::error("internal", &e.to_string(), None))?,
                };
                // An identity the site signed with the channel's key makes the visitor that
                // customer; any other is ignored and shown to staff as unverified.
                if let Some(token) = identity {
                    let key = self.gw.backend.directory_shard().read().channel_identity.get(&channel).cloned();
                    let now = switchboard_actors::actors::wall_ms().0 / 1000;
                    let checked = match key {
                        Some(key) => crate::identity::verify(&token, &key, now),
                        None => Err("the channel verifies no identities".to_owned()),
                    };
                    match checked {
                        Ok(customer) => {
                            visitor = customer;
                            attributes.push(("identity".into(), "verified".into()));
                        }
                        Err(why) => attributes.push(("identity".into(), format!("unverified: {}", why.chars().take(200).collect::<String>()))),
                    }
                }
                let group = group.map(SkillGroupId::new);
                self.check_public_start(&channel, group.as_ref())?;
                self.admitted(&channel, Some(&visitor))?;
                let visitor_record = Visitor { id: Some(visitor.clone()), name, attributes };
                let submitted = match key {
                    // Sent again with its key, it gets the conversation it opened: safe
                    // to send again through a failover, as a keyed `send` is.
                    Some(key) => self.gw.submit_keyed(Command::StartConversationOnce { key, channel, group, visitor: visitor_record }).await,
                    None => self.gw.submit(Command::StartConversation { channel, group, visitor: visitor_record }).await,
                };
                let conversation = match submitted {
                    Ok(Reply::Started { conversation }) => conversation,
                    Ok(_) => return Err(frames::error("internal", "unexpected reply", None)),
                    Err(e) => return Err(frames::error(e.code(), &e.to_string(), None)),
                };
                let token = self.gw.tokens.issue(Subject::Client { conversation }, CLIENT_TOKEN_TTL);
                let visitor_token = self.gw.tokens.issue(Subject::Visitor { visitor }, VISITOR_TOKEN_TTL);
                let started = json!({
                    "type": "started", "protocol": frames::PROTOCOL_VERSION, "conversation": conversation.0,
                    "token": token, "visitor_token": visitor_token,
                });
                self.follow(conversation, 0, out, started, true).await?;
            }
            ClientIn::Resume { token, last_seq } => {
                let conversation = match self.gw.tokens.verify(&token) {
                    Ok(Subject::Client { conversation }) => conversation,
                    Ok(_) | Err(_) => {
                        self.gw.metrics.auth_failures.fetch_add(1, Relaxed);
                        out.error("unauthorized", "token is not a valid client token", None).await;
                        return Ok(Flow::Close(close::UNAUTHORIZED, "unauthorized".into()));
                    }
                };
                let reads = self.gw.backend.conversation_reads(conversation);
                let read = || async {
                    match reads.conversation(conversation).await {
                        Ok(Some(c)) => Ok(Some((c.last_seq(), c.operator_read_upto))),
                        Ok(None) => Ok(None),
                        Err(e) => Err(frames::error(e.code(), &e.to_string(), None)),
                    }
                };
                let mut found = read().await?;
                let mut caught_up = false;
                // A visitor who saw more than this node has applied (they come from a
                // node that died, and this one lags a little), or whose conversation
                // this node has not applied yet: catch up before answering. Without a
                // leader to catch up with, the answer is "try again", not a verdict.
                if found.is_none_or(|(last, _)| last_seq > last) {
                    // The catch-up asks the leader: only while the budget below has a
                    // token, and one that then finds nothing to resume pays it, so a
                    // `last_seq` far ahead, sent again and again, cannot make each frame
                    // cost a round to the cluster (a resume the catch-up serves pays only
                    // for what it replays, below).
                    let capacity = f64::from(self.gw.config.budgets.client_resumes_per_minute);
                    if !self.gw.usage.resumes.has(&self.peer, capacity) {
                        self.gw.metrics.rate_limited.fetch_add(1, Relaxed);
                        return Err(frames::error("rate_limited", "too many resumes from your address that this node must catch up for; resume again later (the budget refills within a minute)", None));
                    }
                    caught_up = true;
                    if let Err(e) = self.gw.backend.conversation_barrier(conversation).await {
                        return Err(frames::error("unavailable", &format!("this node cannot catch up with the cluster right now ({e}); resume again"), None));
                    }
                    found = read().await?;
                }
                // A catch-up that found nothing to resume pays its token.
                let pay = |gw: &Gateway| {
                    if caught_up {
                        gw.usage.resumes.take(self.peer, 1.0, f64::from(gw.config.budgets.client_resumes_per_minute));
                    }
                };
                let Some((last, operator_read_upto)) = found else {
                    pay(&self.gw);
                    return Err(frames::error("not_found", "conversation not found", None));
                };
                if last_seq > last {
                    pay(&self.gw);
                    return Err(frames::error("invalid", &format!("last_seq {last_seq} is ahead of the conversation ({last})"), None));
                }
                // A resume is charged to the address's budget, shared by its sockets, by
                // what it replays: a token per 200 entries (a reconnect catching up on a
                // few costs a sliver; the longest history, 10,000 entries, 50 tokens, at
                // most the whole budget). Only a resume about to replay is charged (not
                // one answered `unavailable` above).
                let capacity = f64::from(self.gw.config.budgets.client_resumes_per_minute);
                let cost = (last.saturating_sub(last_seq).max(1) as f64 / RESUME_ENTRIES_PER_TOKEN as f64).min(capacity.max(1.0));
                if !self.gw.usage.resumes.take(self.peer, cost, capacity) {
                    self.gw.metrics.rate_limited.fetch_add(1, Relaxed);
                    return Err(frames::error("rate_limited", "too many long history replays from your address; resume again later (the budget refills within a minute)", None));
                }
                let resumed = json!({
                    "type": "resumed", "protocol": frames::PROTOCOL_VERSION, "conversation": conversation.0, "last_seq": last,
                    "operator_read_upto": operator_read_upto,
                });
                self.follow(conversation, last_seq, out, resumed, false).await?;
            }
            ClientIn::Send { key, text, attachments } => {
                // Every error for a `send` names it by its key, this one too: a gateway
                // matches answers to the requests it keeps by it.
                let reference = json!(key.clone());
                let conversation = self.conversation.ok_or_else(|| frames::error("no_conversation", "send \"start\" or \"resume\" first", Some(&reference)))?;
                self.charge(conversation, Some(&reference))?;
                let attachments = attachments.into_iter().map(AttachmentId).collect();
                let preview: String = crate::clean_text(&text).chars().take(PREVIEW_CHARS).collect();
                // The ack and the message's own frame go out in one write.
                let _answer = out.answer_coming();
                match self.gw.submit_keyed(Command::PostClientMessage { conversation, key: key.clone(), text, attachments }).await {
                    Ok(Reply::Message { seq, duplicate }) => {
                        out.json(json!({"type": "ack", "key": key, "seq": seq, "duplicate": duplicate})).await;
                        if !duplicate && !preview.is_empty() {
                            self.signal_offered(conversation, preview);
                        }
                    }
                    Ok(_) => return Err(frames::error("internal", "unexpected reply", Some(&reference))),
                    Err(e) => return Err(frames::error(e.code(), &e.to_string(), Some(&reference))),
                }
            }
            ClientIn::Typing => {
                let conversation = self.require_conversation()?;
                self.signal_operator(conversation, json!({"type": "typing", "conversation": conversation.0, "from": "client"}));
            }
            ClientIn::Read { upto } => {
                // A mark at or below the visitor's recorded one is answered here without
                // a log entry (read from the conversation's shard, on a node that holds
                // none from a holder: there the command would be forwarded and appended
                // before the core found it changes nothing; a copy's mark is never ahead
                // of the leader's). One past the newest entry the copy has is charged as a
                // `send` is (a visitor reading what arrived a moment ago rarely is; one
                // marking the future over and over would append an entry each time);
                // the rest move the mark, bounded by the entries written. A mark on a
                // conversation that is not open (closed, or gone) is charged too: the
                // core reads it back from disk to decide, in a log entry.
                let conversation = self.require_conversation()?;
                let (charged, submitted) = match self.gw.client_read_seen(conversation).await {
                    Ok(Some((last, mark))) => (upto > last, upto > mark),
                    Ok(None) => (true, true),
                    // Not readable now: the core decides, as before the edge answered.
                    Err(()) => (false, true),
                };
                if charged {
                    self.charge(conversation, None)?;
                }
                // Committed, so the operator sees it after a reconnect too; then relayed live.
                if submitted {
                    self.gw
                        .submit(Command::MarkRead { conversation, reader: Reader::Client, upto })
                        .await
                        .map_err(|e| frames::error(e.code(), &e.to_string(), None))?;
                }
                let upto = self.gw.read_mark(conversation, upto).await;
                if let Some(upto) = upto.filter(|upto| self.gw.visitor_read_due(conversation, *upto)) {
                    self.signal_operator(conversation, json!({"type": "read", "conversation": conversation.0, "by": "client", "upto": upto}));
                }
            }
            ClientIn::Close => {
                let conversation = self.require_conversation()?;
                self.charge(conversation, None)?;
                self.gw.submit(Command::CloseByClient { conversation }).await.map_err(|e| frames::error(e.code(), &e.to_string(), None))?;
            }
            ClientIn::Rate { score, comment } => {
                let conversation = self.require_conversation()?;
                self.charge(conversation, None)?;
                self.gw
                    .submit(Command::Rate { conversation, score, comment })
                    .await
                    .map_err(|e| frames::error(e.code(), &e.to_string(), None))?;
            }
            ClientIn::Ping => out.json(json!({"type": "pong"})).await,
        }
        Ok(Flow::Continue)
    }
}

impl Session for ClientSession {
    async fn on_text(&mut self, text: &str, out: &Outbox) -> Flow {
        let result = match parse_client(text) {
            Ok(frame) => {
                // An error that names no key says which frame it answers, so whoever
                // tracks requests (a standalone gateway) settles the right one.
                let unnamed = Some(match &frame {
                    ClientIn::Start { .. } => "start",
                    ClientIn::Resume { .. } => "resume",
                    ClientIn::Send { .. } => "send",
                    ClientIn::Typing => "typing",
                    ClientIn::Read { .. } => "read",
                    ClientIn::Close => "close",
                    ClientIn::Rate { .. } => "rate",
                    ClientIn::Ping => "ping",
                });
                self.handle(frame, out).await.map_err(|e| frames::answering(e, unnamed))
            }
            Err(error) => Err(error),
        };
        match result {
            Ok(flow) => flow,
            Err(error) => {
                self.gw.metrics.error_frames.fetch_add(1, Relaxed);
                out.json(error).await;
                Flow::Continue
            }
        }
    }

    fn on_end(&mut self) {
        if let Some(conversation) = self.conversation {
            self.gw.signals.release_conversation(conversation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{ClientIn, OperatorIn};
    use proptest::prelude::*;

    /// Codes a malformed inbound frame may get: what `docs/protocol.md` §5 documents.
    const PARSE_ERRORS: &[&str] = &["bad_json", "bad_frame", "unknown_type"];

    /// An error frame never comes back much larger than a bound, whatever the frame it
    /// answers: a 16 KiB frame of characters whose escapes are six times their size, or
    /// a huge `ref`, is answered in under 1 KiB (a client that never reads holds its
    /// socket's queue of 64 frames to that).
    #[test]
    fn an_error_frame_echoes_a_bounded_part_of_what_it_answers() {
        let wide = "\u{85}".repeat(8_000);
        // Four bytes each, and not escaped when quoted: 300 of them were 1,200 bytes.
        let emoji = "\u{1F600}".repeat(4_000);
        let control = "\u{1}".repeat(16_000);
        let cases = [
            json!({"type": wide.clone()}).to_string(),
            json!({"type": emoji.clone()}).to_string(),
            json!({"type": control.clone()}).to_string(),
            json!({"type": "rate", "score": emoji.clone(), "ref": "r".repeat(250)}).to_string(),
            json!({"type": "rate", "score": control.clone(), "ref": "r".repeat(250)}).to_string(),
            json!({"type": "send", "key": 5, "ref": wide.clone()}).to_string(),
            json!({"type": "rate", "score": wide.clone(), "ref": [wide.clone()]}).to_string(),
            json!({"type": "resume", "token": 7, "last_seq": wide.clone()}).to_string(),
        ];
        for frame in cases {
            assert!(frame.len() >= 16_000, "{}", frame.len());
            let error = parse::<ClientIn>(&frame, CLIENT_TYPES).err().expect("refused");
            let size = error.to_string().len();
            assert!(size < 1024, "a {}-byte frame was answered with {size} bytes: {}", frame.len(), error.to_string().chars().take(200).collect::<String>());
        }
        // A malformed `send` answers with its key as `ref`, as every error for a `send`.
        let error = parse_client(r#"{"type":"send","key":"k-7","text":"see","attachments":[1]}"#).err().expect("refused");
        assert_eq!((error["code"].as_str(), error["ref"].as_str()), (Some("bad_frame"), Some("k-7")), "{error}");
        let long = "k".repeat(crate::frames::MAX_ECHOED_REF_BYTES);
        let error = parse_client(&json!({"type": "send", "key": long, "text": 5}).to_string()).err().expect("refused");
        assert!(error.get("ref").is_none(), "a key too long to echo is not: {error}");
        // A short `ref` is still echoed, as the protocol says.
        let error = parse::<ClientIn>(r#"{"type":"nope","ref":"r-1"}"#, CLIENT_TYPES).err().expect("refused");
        assert_eq!((error["code"].as_str(), error["ref"].as_str()), (Some("unknown_type"), Some("r-1")));
    }

    /// JSON objects shaped like frames: a known or unknown type, and fields of any kind
    /// under the names the frames use.
    fn frame_like() -> impl Strategy<Value = String> {
        let types = prop_oneof![
            proptest::sample::select(CLIENT_TYPES.to_vec()).prop_map(str::to_owned),
            proptest::sample::select(crate::operator_ws::OPERATOR_TYPES.to_vec()).prop_map(str::to_owned),
            "[a-z]{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,20}".prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,10}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let names = proptest::sample::select(vec![
            "channel", "group", "name", "attributes", "visitor_id", "visitor_token", "identity", "token", "last_seq", "key", "text",
            "attachments", "upto", "score", "comment", "ref", "status", "offer", "reason", "conversation", "target",
            "resolution", "tags", "before",
        ]);
        (types, proptest::collection::btree_map(names, value, 0..6)).prop_map(|(kind, fields)| {
            let mut object: serde_json::Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            object.insert("type".into(), Value::from(kind));
            Value::Object(object).to_string()
        })
    }

    fn check<T: serde::de::DeserializeOwned>(text: &str, known: &[&str]) -> Result<(), TestCaseError> {
        if let Err(error) = parse::<T>(text, known) {
            prop_assert_eq!(&error["type"], "error");
            let code = error["code"].as_str().unwrap_or_default();
            prop_assert!(PARSE_ERRORS.contains(&code), "undocumented code {code}");
        }
        Ok(())
    }

    proptest! {
        /// Whatever text arrives, the client, operator and supervisor parsers answer with
        /// a frame or a documented error, never a panic.
        #[test]
        fn any_text_parses_or_gets_a_documented_error(text in ".{0,200}") {
            check::<ClientIn>(&text, CLIENT_TYPES)?;
            check::<OperatorIn>(&text, crate::operator_ws::OPERATOR_TYPES)?;
            check::<Value>(&text, &["ping"])?;
        }

        #[test]
        fn frame_shaped_json_parses_or_gets_a_documented_error(text in frame_like()) {
            check::<ClientIn>(&text, CLIENT_TYPES)?;
            check::<OperatorIn>(&text, crate::operator_ws::OPERATOR_TYPES)?;
            check::<Value>(&text, &["ping"])?;
        }
    }
}
