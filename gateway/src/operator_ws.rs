//! The operator WebSocket (private listener): presence, offers, conversations.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fastwebsockets::upgrade::IncomingUpgrade;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::core::Reply;
use switchboard_actors::model::{AttachmentId, Command, ConversationId, OfferId, OperatorId, Reader, SkillGroupId, TransferTarget};
use switchboard_actors::shard::StreamKey;
use switchboard_actors::state::{Conversation, FeedItem, ShardState};

use crate::auth::Subject;
use crate::client_ws::parse;
use crate::frames::{self, Audience, OperatorIn};
use crate::ws::{self, Flow, Follow, Outbox, Session, Surface};
use crate::Gateway;

#[derive(Deserialize)]
pub(crate) struct ConnectParams {
    token: Option<String>,
    last_seq: Option<u64>,
    protocol: Option<String>,
    cursor: Option<String>,
}

pub(crate) async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(params): Query<ConnectParams>,
    relayed: Option<axum::Extension<ws::Relayed>>,
    upgrade: IncomingUpgrade,
) -> Response {
    // Authenticate before upgrading: a forged token never gets a socket.
    let (operator, staff) = match ws::staff_in_touch(&gw, &headers, params.token.as_deref()).await.and_then(|()| ws::admit(&gw, &headers, Surface::Operator, params.token.as_deref())) {
        Ok(Some(Subject::Staff { login, role, operator: Some(operator), epoch })) => {
            (operator.clone(), ws::StaffLogin::of(&gw, params.token.as_deref(), login, role, Some(operator), epoch))
        }
        Ok(_) => {
            gw.metrics.auth_failures.fetch_add(1, Relaxed);
            return (StatusCode::FORBIDDEN, "this login is not an operator").into_response();
        }
        Err(refusal) => return refusal,
    };
    let protocol = match params.protocol.as_deref() {
        None => 1,
        Some(text) => match text.parse::<u32>() {
            Ok(p @ 1..=2) => p,
            _ => {
                let shown: String = text.chars().take(16).collect();
                return (StatusCode::BAD_REQUEST, format!("protocol {shown} is not served; 1 and 2 are")).into_response();
            }
        },
    };
    let resume = match (params.cursor.as_deref(), params.last_seq) {
        (Some(_), Some(_)) => return (StatusCode::BAD_REQUEST, "give cursor or last_seq, not both").into_response(),
        (Some(_), _) if protocol < 2 => return (StatusCode::BAD_REQUEST, "cursor goes with protocol=2; protocol 1 resumes with last_seq").into_response(),
        (Some(text), None) => match parse_cursor(text) {
            Ok(cursor) => Resume::Cursor(cursor),
            Err(e) => return (StatusCode::BAD_REQUEST, format!("bad cursor: {e}")).into_response(),
        },
        (None, Some(_)) if protocol >= 2 => return (StatusCode::BAD_REQUEST, "protocol 2 resumes with cursor, not last_seq").into_response(),
        (None, Some(seq)) => Resume::From(seq),
        (None, None) => Resume::Fresh,
    };
    let session = OperatorSession {
        gw: gw.clone(),
        operator,
        protocol,
        resume,
        counted: false,
        relayed: relayed.is_some(),
        history_queued: Arc::new(tokio::sync::Semaphore::new(HISTORY_QUEUED_BYTES)),
    };
    ws::accept(gw, upgrade, Surface::Operator, Some(staff), relayed.is_some(), session)
}

/// Where a desk asked to resume.
enum Resume {
    /// Nowhere: the hello is the truth, events follow it.
    Fresh,
    /// `last_seq` (protocol 1): after this item of the one feed.
    From(u64),
    /// `cursor` (protocol 2): after the given item of each feed named; a feed not named
    /// from its oldest retained item.
    Cursor(std::collections::BTreeMap<String, u64>),
}

/// The most feeds a cursor may name, and its longest text.
const CURSOR_FEEDS: usize = 65;
const CURSOR_BYTES: usize = 2048;

/// Parses `r.44,c0.17` (protocol 2's `cursor`).
fn parse_cursor(text: &str) -> Result<std::collections::BTreeMap<String, u64>, String> {
    if text.len() > CURSOR_BYTES {
        return Err(format!("a cursor is at most {CURSOR_BYTES} bytes"));
    }
    let mut cursor = std::collections::BTreeMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (name, seq) = part.split_once('.').ok_or_else(|| format!("{part:?} is not <feed>.<seq>"))?;
        let valid = name == "r" || name.strip_prefix('c').is_some_and(|k| !k.is_empty() && k.len() <= 3 && k.bytes().all(|b| b.is_ascii_digit()));
        if !valid {
            return Err(format!("{name:?} is not a feed (r, c0, c1…)"));
        }
        let seq: u64 = seq.parse().map_err(|_| format!("{seq:?} is not a sequence number"))?;
        cursor.insert(name.to_owned(), seq);
        if cursor.len() > CURSOR_FEEDS {
            return Err(format!("a cursor names at most {CURSOR_FEEDS} feeds"));
        }
    }
    Ok(cursor)
}

/// Bytes of frames carrying a conversation's history (`assigned`) one pull of an
/// operator's feeds renders before it stops: the next items wait for the next pull,
/// once this page is written (at least one item a pull).
const HISTORY_BYTES_PER_PULL: usize = 256 * 1024;

/// One feed an operator socket follows, and the last item it sent from it.
struct FeedReader {
    /// The feed's name in the frames (protocol 2); `None` under protocol 1.
    name: Option<String>,
    shard: Arc<dyn crate::ShardReads>,
    kinds: crate::FeedKinds,
    last: u64,
    /// The last page stopped at a read that failed (a holder that did not answer): the
    /// writer reads again shortly, from the first item not sent.
    failed: bool,
}

impl FeedReader {
    /// Renders one page of the feed's new items into `frames_out`; returns how many
    /// items it read (taken or skipped). `shown` is, per conversation assigned to the
    /// operator on a split node, how far its history went out with its `assigned`.
    ///
    /// `room` is what is left of the pull's [`HISTORY_BYTES_PER_PULL`]: once a frame
    /// with history has used it up, the page stops before the next item and reports a
    /// full page, so the writer pulls the rest after writing this.
    async fn page(&mut self, operator: &OperatorId, backend: &dyn crate::Backend, shown: &mut std::collections::HashMap<ConversationId, u64>, frames_out: &mut Vec<Value>, room: &mut usize) -> usize {
        let shard = self.shard.clone();
        let entries = match shard.feed_since(operator, self.last, ws::PAGE).await {
            Ok(Some(entries)) => entries,
            Ok(None) => {
                let mut gap = frames::error("resume_gap", "events before the oldest retained one are gone; reload state", None);
                if let Some(name) = &self.name {
                    gap["feed"] = json!(name);
                }
                frames_out.push(gap);
                let first = shard.feed_bounds(operator).await.ok().flatten().map_or(1, |(first, _)| first);
                // Told once: the next page (this one may stop early) goes on from here.
                self.last = self.last.max(first - 1);
                shard.feed_since(operator, first - 1, ws::PAGE).await.ok().flatten().unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!(operator = %operator, error = %e, "the feed cannot be read now; reading again shortly");
                self.failed = true;
                return 0;
            }
        };
        let read = entries.len();
        // A read this page needs failed: what went out so far stays sent, the rest is
        // read again from this item (nothing skipped).
        macro_rules! stop {
            ($conversation:expr, $e:expr) => {{
                tracing::warn!(conversation = $conversation.0, error = %$e, "history cannot be read now; reading again shortly");
                self.failed = true;
                return 0;
            }};
        }
        for entry in entries {
            if *room == 0 {
                return ws::PAGE;
            }
            let history = match (&entry.item, self.kinds) {
                // A routing shard's `history_upto` counts its own copy of the entries: the
                // conversation's shard is read up to what it holds now, and the entries it
                // mirrors after that come in its feed (the desk merges by entry seq).
                (FeedItem::Assigned { conversation, .. }, crate::FeedKinds::Routing) => {
                    let upto = match backend.conversation_reads(*conversation).conversation(*conversation).await {
                        Ok(found) => found.map_or(0, |c| c.last_seq()),
                        Err(e) => stop!(conversation, e),
                    };
                    // What went out is what was read: a member that has not written the
                    // newest entries yet answers short, and the conversation's shard sends
                    // the rest with its own `assigned`.
                    match history_upto(backend, *conversation, upto).await {
                        Ok((history, sent)) => {
                            shown.insert(*conversation, sent);
                            Some((history, sent))
                        }
                        Err(e) => stop!(conversation, e),
                    }
                }
                (FeedItem::Released { conversation }, crate::FeedKinds::Routing) => {
                    shown.remove(conversation);
                    None
                }
                // The conversation's shard applied the assignment after the routing feed's
                // `assigned` went out: the entries it wrote for it (a transfer's, say) went
                // to nobody's feed yet. They go out now, as an `assigned` of this feed.
                (FeedItem::Assigned { conversation, history_upto: upto }, crate::FeedKinds::Conversation) => match shown.get(conversation).copied().or_else(|| {
                    // A socket that did not send this conversation's `assigned` (it opened
                    // or resumed after that) completes it from the start if it is still
                    // the operator's: the desk merges entries by their seq.
                    let held = backend.shard().read().operators.get(operator).is_some_and(|op| op.active.contains(conversation));
                    held.then_some(0)
                }) {
                    Some(from) if from < *upto => {
                        let missing: Vec<Value> = match backend.conversation_reads(*conversation).history(*conversation, from, (*upto - from) as usize).await {
                            // Read again unless a purge took the conversation: a member
                            // behind the one whose feed named `upto` answers short too.
                            Ok(entries) if entries.last().map_or(from, |e| e.seq) < *upto && !purged(backend, *conversation).await => stop!(conversation, short(*upto)),
                            Ok(entries) => entries.iter().map(|e| frames::history_entry(e, Audience::Staff)).collect(),
                            Err(e) => stop!(conversation, e),
                        };
                        shown.insert(*conversation, *upto);
                        Some((missing, *upto))
                    }
                    _ => {
                        self.last = entry.seq;
                        continue;
                    }
                },
                (FeedItem::Assigned { conversation, history_upto: upto }, _) => match history_upto(backend, *conversation, *upto).await {
                    Ok((_, sent)) if sent < *upto && still_holds(backend, *conversation, *upto).await => stop!(conversation, short(*upto)),
                    Ok((history, _)) => Some((history, *upto)),
                    Err(e) => stop!(conversation, e),
                },
                _ => None,
            };
            self.last = entry.seq;
            if !self.kinds.takes(&entry.item) && history.is_none() {
                continue;
            }
            let upto = history.as_ref().map(|(_, upto)| *upto);
            let mut frame = frames::operator_event(&entry, history.map(|(h, _)| h));
            if let Some(upto) = upto {
                frame["history_upto"] = json!(upto);
                // A conversation's whole history may be megabytes: one such frame per
                // pull once they add up, not a page of them held at once.
                *room = room.saturating_sub(frame.to_string().len());
            }
            if let FeedItem::Offered { conversation, .. } = &entry.item {
                merge(&mut frame, offer_context(backend, *conversation).await);
            }
            if let Some(name) = &self.name {
                frame["feed"] = json!(name);
            }
            frames_out.push(frame);
        }
        read
    }
}

/// An operator's socket follows its feeds: the routing feed and, on a split node, each
/// conversation shard's.
struct DeskPull {
    readers: Vec<FeedReader>,
    operator: OperatorId,
    backend: Arc<dyn crate::Backend>,
    /// Per conversation assigned to the operator, how far its history went out.
    shown: std::collections::HashMap<ConversationId, u64>,
}

impl ws::Pull for DeskPull {
    fn pull(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Value>> + Send + '_>> {
        Box::pin(async move {
            let DeskPull { readers, operator, backend, shown } = self;
            for reader in readers.iter_mut() {
                reader.failed = false;
            }
            let mut frames_out = Vec::new();
            // The routing feed first, and the others only once it is caught up: an
            // `assigned` reaches the desk before the entries of that conversation that a
            // conversation shard mirrors to its new holder after it.
            let (routing, others) = readers.split_at_mut(1);
            let mut room = HISTORY_BYTES_PER_PULL;
            // A full page whose items were all left out (another feed's kinds) renders
            // nothing: read on, or the writer would wait for the next wake-up.
            loop {
                let mut full = routing[0].page(operator, backend.as_ref(), shown, &mut frames_out, &mut room).await >= ws::PAGE;
                if !full {
                    for reader in others.iter_mut() {
                        full |= reader.page(operator, backend.as_ref(), shown, &mut frames_out, &mut room).await >= ws::PAGE;
                    }
                }
                if !frames_out.is_empty() || !full {
                    break;
                }
            }
            frames_out
        })
    }

    fn retry(&self) -> bool {
        self.readers.iter().any(|r| r.failed)
    }
}

/// One wake-up stream that moves whenever any of `wakes` does.
fn merge_wakeups(mut wakes: Vec<switchboard_actors::shard::Wakeups>) -> switchboard_actors::shard::Wakeups {
    if wakes.len() == 1 {
        if let Some(only) = wakes.pop() {
            return only;
        }
    }
    let (moved, merged) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let any = futures::future::select_all(wakes.iter_mut().map(|w| Box::pin(w.changed())));
            tokio::select! {
                (changed, _, _) = any => {
                    n += 1;
                    if changed.is_err() || moved.send(n).is_err() {
                        return;
                    }
                }
                _ = moved.closed() => return,
            }
        }
    });
    merged
}

struct OperatorSession {
    gw: Arc<Gateway>,
    operator: OperatorId,
    /// 1, or 2 for a desk that follows one feed per group (ADR 0010).
    protocol: u32,
    resume: Resume,
    /// Whether this socket is counted in `Gateway::operator_sockets`.
    counted: bool,
    /// Whether a standalone gateway relays this socket: then an `accept` may carry when
    /// it reached the gateway.
    relayed: bool,
    /// Bytes of `history` frames queued and not yet taken by the writer, at most
    /// [`HISTORY_QUEUED_BYTES`]: a desk that asks for histories faster than it reads
    /// them waits for its own.
    history_queued: Arc<tokio::sync::Semaphore>,
}

/// What one socket's `history` frames may hold queued.
const HISTORY_QUEUED_BYTES: usize = 8 * 1024 * 1024;

/// How far back a relayed `accept`'s `received_at` may lie: a gateway re-pins a socket
/// within its 15 s patience, so an older stamp is taken as the moment it arrived here
/// instead.
const RELAYED_STAMP_MAX_AGE_MS: u64 = 20_000;

/// When an `accept` counts from: now, or on a relayed socket the moment the gateway
/// stamped, if that lies within [`RELAYED_STAMP_MAX_AGE_MS`] (a stamp ahead of this
/// node's clock counts as now).
fn accept_received_at(relayed: bool, stamped: Option<u64>, now: u64) -> u64 {
    match stamped {
        Some(at) if relayed && now.saturating_sub(at) <= RELAYED_STAMP_MAX_AGE_MS => at.min(now),
        _ => now,
    }
}

/// History entries read at a time when a resent reply's key is looked for.
const USED_KEY_PAGE: usize = 500;

pub(crate) const OPERATOR_TYPES: &[&str] = &["presence", "accept", "decline", "send", "typing", "read", "transfer", "close", "history", "ready", "ping"];

/// The idempotency key an entry was written under, for the kinds that have one.
fn entry_key(item: &switchboard_actors::state::HistoryItem) -> Option<&str> {
    use switchboard_actors::state::HistoryItem as H;
    match item {
        H::ClientMessage { key, .. } | H::OperatorMessage { key, .. } | H::Note { key, .. } | H::BotMessage { key, .. } => Some(key),
        _ => None,
    }
}

/// Whether `operator` may read `conversation`: they hold it, held it, or are offered it
/// ([`involved`]), or it is an earlier, closed conversation of a visitor they are serving
/// now (the client card). A visitor's other open conversations, which other operators
/// may hold, are not theirs to read.
pub(crate) fn may_read(state: &ShardState, operator: &OperatorId, conv: &Conversation) -> bool {
    let serving_same_visitor = || {
        conv.status == switchboard_actors::state::ConversationStatus::Closed
            && conv.visitor.id.as_ref().is_some_and(|visitor| {
                state.operators.get(operator).is_some_and(|op| {
                    op.active.iter().filter_map(|id| state.conversations.get(id)).any(|c| c.visitor.id.as_ref() == Some(visitor))
                })
            })
    };
    involved(state, operator, conv) || serving_same_visitor()
}

/// Whether `operator` holds `conv`, held it, or is offered it: who may write to it (a
/// note), not only read it.
pub(crate) fn involved(state: &ShardState, operator: &OperatorId, conv: &Conversation) -> bool {
    let conversation = conv.id;
    conv.handled_by.contains(operator)
        || conv.assigned() == Some(operator)
        // On a split node `conv` is the conversation shard's copy, which learns of an
        // assignment by letter: the routing state (`state`) knows first.
        || state.operators.get(operator).is_some_and(|op| op.active.contains(&conversation))
        || state.offers.values().any(|o| o.conversation == conversation && &o.operator == operator)
}

/// A conversation's entries up to `upto`, as staff see them, and the seq of the last
/// one read (below `upto` when the member read has not written the newest ones yet).
async fn history_upto(backend: &dyn crate::Backend, conversation: ConversationId, upto: u64) -> Result<(Vec<Value>, u64), switchboard_actors::Error> {
    let entries = backend.conversation_reads(conversation).history(conversation, 0, upto as usize).await?;
    let last = entries.last().map_or(0, |e| e.seq);
    Ok((entries.iter().map(|e| frames::history_entry(e, Audience::Staff)).collect(), last))
}

/// Whether the conversation is gone (a retention purge), as far as a read can tell.
async fn purged(backend: &dyn crate::Backend, conversation: ConversationId) -> bool {
    matches!(backend.conversation_reads(conversation).conversation(conversation).await, Ok(None))
}

/// Whether a history read that ended before entry `upto` is to be read again: the
/// conversation still has that entry (it was applied, not written yet). One a retention
/// purge deleted since the `assigned` went into the feed is sent as it is now.
async fn still_holds(backend: &dyn crate::Backend, conversation: ConversationId, upto: u64) -> bool {
    match backend.conversation_reads(conversation).conversation(conversation).await {
        Ok(found) => found.is_some_and(|c| c.last_seq() >= upto),
        Err(_) => true,
    }
}

/// A history read that ended before the entry an `assigned` names: it is read again
/// shortly rather than sent incomplete.
fn short(upto: u64) -> switchboard_actors::Error {
    switchboard_actors::Error::Unreachable(format!("the history read ended before entry {upto}; it was not written yet"))
}

/// Longest first-message preview an offer carries, in characters.
const PREVIEW_CHARS: usize = 200;
/// How long an accept whose outcome is unknown is sent again (with its first arrival
/// stamp) before the operator is told it failed.
const ACCEPT_RESEND_FOR: Duration = Duration::from_secs(10);
/// How long an operator's read mark refused by the conversation's shard (which has not
/// heard of the assignment yet) is tried again, and the pause before each try.
const READ_RETRY_FOR: Duration = Duration::from_secs(2);
const READ_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What an operator needs to decide on an offer at a glance, read when the frame is
/// rendered: the conversation's channel, when its customer started waiting, and their
/// first words. Added to `offer` events and `hello` offers; `{}` for a conversation gone.
async fn offer_context(backend: &dyn crate::Backend, conversation: ConversationId) -> Value {
    let shard = backend.conversation_reads(conversation);
    let (channel, since) = match shard.open_conversation(conversation).await {
        Ok(Some(c)) => (c.channel.as_str().to_owned(), c.created_at.0),
        Ok(None) | Err(_) => return json!({}),
    };
    let preview = shard.history(conversation, 0, 8).await.ok().and_then(|entries| {
        entries.into_iter().find_map(|e| match e.item {
            switchboard_actors::state::HistoryItem::ClientMessage { text, .. } if !text.is_empty() => Some(text.chars().take(PREVIEW_CHARS).collect::<String>()),
            _ => None,
        })
    });
    json!({"channel": channel, "waiting_since": since, "preview": preview})
}

/// Adds `context`'s fields to `frame`.
fn merge(frame: &mut Value, context: Value) {
    if let (Some(frame), Value::Object(extra)) = (frame.as_object_mut(), context) {
        frame.extend(extra);
    }
}

impl OperatorSession {
    /// The operator's display name, if they hold the conversation as this node's copy of
    /// routing says.
    fn holder_name_here(&self, conversation: ConversationId) -> Option<String> {
        let shard = self.gw.backend.shard();
        let state = shard.read();
        if state.conversations.get(&conversation).and_then(|c| c.assigned()) != Some(&self.operator) {
            return None;
        }
        Some(state.operators.get(&self.operator).map(|o| o.config.name.clone()).unwrap_or_default())
    }

    /// The operator's display name, if they hold the conversation (signals need that).
    /// On a split cluster this node's copy of routing may not have applied an assignment
    /// its leader made a moment ago: a refusal is checked against routing first
    /// ([`Backend::holder_barrier`]), so an operator who has just accepted is not refused.
    async fn holder_name(&self, conversation: ConversationId) -> Result<String, Value> {
        if let Some(name) = self.holder_name_here(conversation) {
            return Ok(name);
        }
        if let Some(barrier) = self.gw.backend.holder_barrier() {
            if barrier.await.is_ok() {
                if let Some(name) = self.holder_name_here(conversation) {
                    return Ok(name);
                }
            }
        }
        Err(frames::error("not_assigned", "only in conversations you hold", None))
    }

    /// Commits the operator's read mark. On a split cluster the conversation's shard
    /// decides it, and learns of an assignment from routing's letter a moment after
    /// routing made it: refused as `not_assigned` while routing says the operator holds
    /// the conversation, the mark is tried again for up to [`READ_RETRY_FOR`].
    async fn mark_read(&self, conversation: ConversationId, upto: u64) -> Result<(), Value> {
        let command = Command::MarkRead { conversation, reader: Reader::Operator(self.operator.clone()), upto };
        let give_up = Instant::now() + READ_RETRY_FOR;
        loop {
            match self.gw.submit(command.clone()).await {
                Ok(_) => return Ok(()),
                Err(switchboard_actors::Error::NotAssigned { .. }) if Instant::now() + READ_RETRY_PAUSE < give_up && self.gw.backend.holder_barrier().is_some() => {
                    tokio::time::sleep(READ_RETRY_PAUSE).await;
                    self.holder_name(conversation).await?;
                }
                Err(e) => return Err(frames::error(e.code(), &e.to_string(), None)),
            }
        }
    }

    /// Whether this operator holds `conversation` as routing decides it now (after
    /// [`Backend::holder_barrier`]), before `command` (their reply) is committed:
    /// `unavailable` if routing cannot be asked; if they do not hold it, the answer to a
    /// key used before (its original `seq`, as the core would give it), else
    /// `not_assigned`. `Ok(None)`: commit it.
    async fn holds_now(&self, conversation: ConversationId, command: &Command, reference: &Value) -> Result<Option<Reply>, Value> {
        let Some(barrier) = self.gw.backend.holder_barrier() else { return Ok(None) };
        if let Err(e) = barrier.await {
            return Err(frames::error("unavailable", &format!("who holds the conversation cannot be checked now: {e}"), Some(reference)));
        }
        let holds = {
            let shard = self.gw.backend.shard();
            let state = shard.read();
            state.conversations.get(&conversation).and_then(|c| c.assigned()) == Some(&self.operator)
        };
        if holds {
            return Ok(None);
        }
        // A key they used while they held it is answered as the core would: its entry's
        // `seq`, `duplicate: true` (a resend after the conversation moved on or closed).
        let not_assigned = || frames::error("not_assigned", &switchboard_actors::Error::NotAssigned { conversation, operator: self.operator.clone() }.to_string(), Some(reference));
        let Command::PostOperatorMessage { key, .. } = command else { return Err(not_assigned()) };
        match self.used_key(conversation, key).await {
            Ok(Some(seq)) => Ok(Some(Reply::Message { seq, duplicate: true })),
            Ok(None) => Err(not_assigned()),
            Err(e) => Err(frames::error("unavailable", &e, Some(reference))),
        }
    }

    /// The `seq` of the entry of `conversation` written under `key`, if this operator
    /// has held the conversation (only they may learn which keys it used), read once
    /// this node's copy of the conversation has every entry acknowledged anywhere.
    async fn used_key(&self, conversation: ConversationId, key: &str) -> Result<Option<u64>, String> {
        self.gw.backend.conversation_barrier(conversation).await?;
        let reads = self.gw.backend.conversation_reads(conversation);
        let Some(conv) = reads.conversation(conversation).await.map_err(|e| e.to_string())? else { return Ok(None) };
        if !conv.handled_by.contains(&self.operator) {
            return Ok(None);
        }
        // This node's copy knows its keys while the conversation is open here; a closed
        // one, or one read from another member, is searched page by page.
        if let Some(seq) = conv.keys.get(key) {
            return Ok(Some(*seq));
        }
        let mut after = 0;
        while after < conv.last_seq() {
            let page = reads.history(conversation, after, USED_KEY_PAGE).await.map_err(|e| e.to_string())?;
            if let Some(found) = page.iter().find(|e| entry_key(&e.item) == Some(key)) {
                return Ok(Some(found.seq));
            }
            match page.last() {
                Some(last) if last.seq > after => after = last.seq,
                _ => break,
            }
        }
        Ok(None)
    }

    async fn commit(&self, command: Command, reference: Option<&Value>) -> Result<Reply, Value> {
        self.gw.submit(command).await.map_err(|e| frames::error(e.code(), &e.to_string(), reference))
    }

    /// Commits an accept. When the node cannot say whether it committed (the leader
    /// moved or stalled), the same command, with the same arrival stamp, is sent again
    /// for up to `ACCEPT_RESEND_FOR`: under rules 9 the new leader honours it as of its
    /// first arrival. An accept that finds the offer gone succeeds if the conversation it
    /// offered is now this operator's (an earlier attempt committed after all), so the
    /// desk may send an accept again after `unavailable`.
    async fn accept(&self, command: Command, offer: OfferId, reference: Option<&Value>) -> Result<(), Value> {
        let give_up = Instant::now() + ACCEPT_RESEND_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.gw.submit(command.clone()).await {
                Ok(_) => return Ok(()),
                Err(switchboard_actors::Error::OfferGone(o)) => {
                    // The leader answered from state this node may not have applied yet.
                    if self.gw.backend.routing_barrier().await.is_ok() && self.holds_offered(offer) {
                        return Ok(());
                    }
                    return Err(frames::error("offer_gone", &switchboard_actors::Error::OfferGone(o).to_string(), reference));
                }
                Err(switchboard_actors::Error::Commit(e)) if Instant::now() + pause < give_up => {
                    tracing::info!(operator = %self.operator.0, offer = offer.0, error = %e, "accept outcome unknown; sending it again");
                    self.gw.metrics.accepts_resent.fetch_add(1, Relaxed);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(frames::error(e.code(), &e.to_string(), reference)),
            }
        }
    }

    /// Whether the conversation that `offer` was made for is now held by this operator.
    fn holds_offered(&self, offer: OfferId) -> bool {
        let shard = self.gw.backend.shard();
        let Ok(Some(decision)) = shard.decision(offer) else { return false };
        let state = shard.read();
        state.conversations.get(&decision.conversation).and_then(|c| c.assigned()) == Some(&self.operator)
    }

    async fn ok(&self, out: &Outbox, reference: Option<&Value>) {
        let mut frame = json!({"type": "ok"});
        if let Some(r) = reference {
            frame["ref"] = r.clone();
        }
        out.json(frame).await;
    }

    async fn handle(&mut self, frame: OperatorIn, out: &Outbox) -> Result<(), Value> {
        let me = self.operator.clone();
        match frame {
            OperatorIn::Presence { status, reason, reference } => {
                let command = match (status, reason) {
                    (_, None) => Command::SetPresence { operator: me, presence: status },
                    (switchboard_actors::model::Presence::Break, Some(reason)) => Command::TakeBreak { operator: me, reason },
                    (_, Some(_)) => return Err(frames::error("bad_frame", "a reason goes only with the status break", reference.as_ref())),
                };
                self.commit(command, reference.as_ref()).await?;
                self.ok(out, reference.as_ref()).await;
            }
            OperatorIn::Ready { reference } => {
                self.commit(Command::EndWrapUp { operator: me }, reference.as_ref()).await?;
                self.ok(out, reference.as_ref()).await;
            }
            OperatorIn::Accept { offer, reference, received_at } => {
                // Rules 9: the answer counts from when it reached this server (or the
                // gateway relaying it), so a stall between there and the log (a frozen or
                // changing leader, a re-pin) cannot make it late.
                let now = switchboard_actors::actors::now_ms().0;
                let received_at = accept_received_at(self.relayed, received_at.as_ref().and_then(Value::as_u64), now);
                let command = if self.gw.backend.shard().read().rules >= 9 {
                    Command::AcceptOfferAt { operator: me, offer: OfferId(offer), received_at: switchboard_actors::model::Timestamp(received_at) }
                } else {
                    Command::AcceptOffer { operator: me, offer: OfferId(offer) }
                };
                self.accept(command, OfferId(offer), reference.as_ref()).await?;
                self.ok(out, reference.as_ref()).await;
            }
            OperatorIn::Decline { offer, reason, reference } => {
                self.commit(Command::DeclineOffer { operator: me, offer: OfferId(offer), reason }, reference.as_ref()).await?;
                self.ok(out, reference.as_ref()).await;
            }
            OperatorIn::Send { conversation, key, text, attachments, reference } => {
                let reference = reference.unwrap_or_else(|| json!(key.clone()));
                let attachments = attachments.into_iter().map(AttachmentId).collect();
                let command =
                    Command::PostOperatorMessage { operator: me, conversation: ConversationId(conversation), key: key.clone(), text, attachments };
                // Only while routing says this operator holds it: a conversation shard's
                // copy of the holder may not have heard of a reassignment yet. When the
                // commit's outcome is unknown (a failover), or routing cannot be asked,
                // both are done again, routing first, as `Gateway::submit_keyed` does:
                // its key makes a second copy a duplicate, and routing asked again keeps
                // a resend from writing after the conversation moved on.
                let conversation_id = ConversationId(conversation);
                // A reply right after an accept or a transfer may reach the conversation's
                // shard before routing's letter saying who holds it: refused there as
                // `not_assigned` while routing says this operator holds it, it is tried
                // again for up to `READ_RETRY_FOR`, as a read mark is.
                let attempt = || async {
                    let unknown = |frame| Refused { frame, unknown: true };
                    let give_up = Instant::now() + READ_RETRY_FOR;
                    loop {
                        let submitted = match self.holds_now(conversation_id, &command, &reference).await {
                            Ok(Some(reply)) => return Ok(reply),
                            // Routing could not be asked: `holds_now` says `unavailable`.
                            Err(frame) => return Err(Refused { unknown: frame["code"] == "unavailable", frame }),
                            Ok(None) => self.gw.submit(command.clone()).await,
                        };
                        match submitted {
                            Ok(reply) => return Ok(reply),
                            // Routing says they hold it (asked again before each try).
                            Err(switchboard_actors::Error::NotAssigned { .. }) if self.gw.backend.holder_barrier().is_some() && Instant::now() + READ_RETRY_PAUSE < give_up => {
                                tokio::time::sleep(READ_RETRY_PAUSE).await;
                            }
                            Err(e) => {
                                let frame = frames::error(e.code(), &e.to_string(), Some(&reference));
                                return Err(match e {
                                    switchboard_actors::Error::Commit(_) | switchboard_actors::Error::Unreachable(_) => unknown(frame),
                                    _ => Refused { frame, unknown: false },
                                });
                            }
                        }
                    }
                };
                let reply = self.gw.resend_while_unknown(attempt, |refused: &Refused| refused.unknown).await.map_err(|refused| refused.frame)?;
                if let Reply::Message { seq, duplicate } = reply {
                    out.json(json!({"type": "ack", "ref": reference, "key": key, "conversation": conversation, "seq": seq, "duplicate": duplicate}))
                        .await;
                }
            }
            OperatorIn::Typing { conversation } => {
                let conversation = ConversationId(conversation);
                let name = self.holder_name(conversation).await?;
                self.gw.signal_conversation(conversation, json!({"type": "typing", "from": "operator", "name": name}));
            }
            OperatorIn::Read { conversation, upto } => {
                let conversation = ConversationId(conversation);
                self.holder_name(conversation).await?;
                self.mark_read(conversation, upto).await?;
                if let Some(upto) = self.gw.read_mark(conversation, upto).await {
                    let signal = json!({"type": "read", "conversation": conversation.0, "by": "operator", "upto": upto});
                    self.gw.signal_conversation(conversation, signal);
                }
            }
            OperatorIn::Transfer { conversation, to_operator, to_group, comment, reference } => {
                let target = match (to_operator, to_group) {
                    (Some(op), None) => TransferTarget::Operator(OperatorId::new(op)),
                    (None, Some(group)) => TransferTarget::Group(SkillGroupId::new(group)),
                    _ => return Err(frames::error("bad_frame", "give exactly one of to_operator and to_group", reference.as_ref())),
                };
                let command = Command::Transfer { operator: me, conversation: ConversationId(conversation), target, comment };
                self.commit(command, reference.as_ref()).await?;
                self.ok(out, reference.as_ref()).await;
            }
            OperatorIn::Close { conversation, resolution, tags, reference } => {
                let command = Command::CloseByOperator { operator: me, conversation: ConversationId(conversation), resolution, tags };
                self.commit(command, reference.as_ref()).await?;
                self.ok(out, reference.as_ref()).await;
            }
            OperatorIn::History { conversation, reference } => {
                let conversation = ConversationId(conversation);
                // Built in one of the process's few build slots (held only while
                // built), then queued within the socket's own budget.
                let slot = crate::rest::history_build_slot().await.map_err(|e| frames::error("unavailable", &e.to_string(), reference.as_ref()))?;
                let frame = {
                    let shard = self.gw.backend.conversation_reads(conversation);
                    let conv = shard.conversation(conversation).await.map_err(|e| frames::error(e.code(), &e.to_string(), reference.as_ref()))?;
                    let allowed = conv.as_ref().is_some_and(|conv| may_read(&self.gw.backend.shard().read(), &me, conv));
                    let Some(conv) = conv.filter(|_| allowed) else {
                        return Err(frames::error("forbidden", "not your conversation", reference.as_ref()));
                    };
                    let upto = conv.last_seq();
                    let marks = (conv.client_read_upto, conv.operator_read_upto);
                    let mut frame = json!({
                        "type": "history", "conversation": conversation.0, "entries": history_upto(self.gw.backend.as_ref(), conversation, upto).await.map_err(|e| frames::error(e.code(), &e.to_string(), reference.as_ref()))?.0,
                        "client_read_upto": marks.0, "operator_read_upto": marks.1,
                    });
                    if let Some(r) = &reference {
                        frame["ref"] = r.clone();
                    }
                    frame
                };
                let text = frame.to_string();
                drop(frame);
                drop(slot);
                out.text_within(text, &self.history_queued, HISTORY_QUEUED_BYTES).await;
            }
            OperatorIn::Ping => out.json(json!({"type": "pong"})).await,
        }
        Ok(())
    }
}

impl Session for OperatorSession {
    async fn on_start(&mut self, out: &Outbox) -> Flow {
        // Protocol 1 follows the one feed of the routing state; protocol 2 every feed the
        // backend names (ADR 0010), each event saying which.
        let feeds = if self.protocol >= 2 {
            self.gw.backend.operator_feeds()
        } else {
            vec![crate::FeedSource { name: "r".into(), shard: self.gw.backend.shard(), kinds: crate::FeedKinds::All }]
        };
        let mut wakes = Vec::with_capacity(feeds.len());
        for feed in &feeds {
            let wake = if self.protocol >= 2 {
                self.gw.backend.subscribe_feed(&feed.name, StreamKey::Operator(self.operator.clone())).await
            } else {
                self.gw.backend.subscribe(StreamKey::Operator(self.operator.clone())).await
            };
            match wake {
                Ok(wake) => wakes.push(wake),
                Err(e) => {
                    out.error(e.code(), &e.to_string(), None).await;
                    return Flow::Close(ws::close::INTERNAL, "could not follow operator stream".into());
                }
            }
        }
        let wake = merge_wakeups(wakes);
        // A desk that saw more of a feed than this node applied (it comes from a node
        // or gateway that went away, and this one lags a little): this node catches up
        // first, or the events between would reach the desk twice.
        let mut ahead = false;
        for (i, feed) in feeds.iter().enumerate().filter(|_| !matches!(self.resume, Resume::Fresh)) {
            // As the hello counts them below: the routing feed by the operator's record.
            let last = if i == 0 {
                self.gw.backend.shard().read().operators.get(&self.operator).map_or(0, |op| op.feed.last_seq)
            } else {
                match feed.shard.feed_bounds(&self.operator).await {
                    Ok(bounds) => bounds.map_or(0, |(_, last)| last),
                    Err(_) => continue,
                }
            };
            ahead |= match &self.resume {
                Resume::Fresh => false,
                Resume::From(seq) => *seq > last,
                Resume::Cursor(at) => at.get(&feed.name).is_some_and(|seq| *seq > last),
            };
        }
        if ahead {
            if let Err(e) = self.gw.backend.read_barrier().await {
                tracing::debug!(operator = %self.operator, error = %e, "a desk resumes past this node's feed and it could not catch up; the feed starts where it is");
            }
        }
        // The first feed is the routing shard's, whose state the hello is read from.
        let shard = self.gw.backend.shard();
        let backend = self.gw.backend.clone();
        // The hello frame and the resume point come from one read of the state, so the
        // stream continues exactly where the snapshot ends.
        let snapshot = {
            let state = shard.read();
            state.operators.get(&self.operator).map(|op| {
            let offers: Vec<Value> = op
                .offers
                .iter()
                .filter_map(|id| state.offers.get(id))
                .map(|o| {
                    let visitor = state.conversations.get(&o.conversation).map(|c| c.visitor.name.clone()).unwrap_or_default();
                    json!({
                        "offer": o.id.0, "conversation": o.conversation.0, "group": o.group.as_str(),
                        "deadline": o.deadline.0, "made_at": o.made_at.0, "visitor": visitor,
                    })
                })
                .collect();
            let hello = json!({
                "type": "hello",
                "protocol": if self.protocol >= 2 { 2 } else { frames::PROTOCOL_VERSION },
                "operator": op.config.id.as_str(),
                "name": op.config.name,
                "presence": frames::presence_str(op.presence),
                "presence_since": op.presence_since.0,
                // Why the presence was set for them (`disconnected`), if it was.
                "presence_reason": state.presence_reasons.get(&op.config.id),
                // The reasons a break may be taken for (`presence` with `reason`).
                "pause_reasons": state.pause_reasons,
                // No offer until then (wrap-up after a close); null when not wrapping up.
                "wrap_up_until": state.wrap_up.get(&op.config.id).filter(|until| until.0 > switchboard_actors::actors::now_ms().0).map(|t| t.0),
                "capacity": op.config.capacity,
                "groups": op.config.groups.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
                "active": op.active.iter().map(|c| c.0).collect::<Vec<_>>(),
                "offers": offers,
                "seq": op.feed.last_seq,
                // The server's clock when the snapshot was taken: what a desk needs to
                // count an offer's remaining time down right whatever its own clock says.
                "now": switchboard_actors::actors::now_ms().0,
            });
            (hello, op.feed.last_seq)
            })
        };
        let Some((mut hello, routing_last)) = snapshot else {
            out.json(frames::answering(frames::error("not_found", "operator not configured", None), Some("hello"))).await;
            return Flow::Close(ws::close::UNAUTHORIZED, "unknown operator".into());
        };
        // Where each feed starts: after the desk's resume point (not past the feed's
        // newest item), or after its newest item for a desk that starts afresh.
        let mut readers = Vec::with_capacity(feeds.len());
        let mut cursor = serde_json::Map::new();
        for (i, feed) in feeds.into_iter().enumerate() {
            let bounds = match feed.shard.feed_bounds(&self.operator).await {
                Ok(bounds) => bounds,
                Err(e) => {
                    out.json(frames::answering(frames::error(e.code(), &format!("feed {} cannot be read: {e}", feed.name), None), Some("hello"))).await;
                    return Flow::Close(ws::close::GOING_AWAY, "feed unavailable".into());
                }
            };
            let (last, first) = (if i == 0 { routing_last } else { bounds.map_or(0, |(_, last)| last) }, bounds.map_or(1, |(first, _)| first));
            // A resume point ahead of the feed cannot be honoured: start from now.
            let start = match &self.resume {
                Resume::Fresh => last,
                Resume::From(seq) => (*seq).min(last),
                // A feed the cursor does not name: from its oldest retained item.
                Resume::Cursor(at) => at.get(&feed.name).map_or(first.saturating_sub(1).min(last), |seq| (*seq).min(last)),
            };
            cursor.insert(feed.name.clone(), json!(last));
            readers.push(FeedReader { name: (self.protocol >= 2).then(|| feed.name.clone()), shard: feed.shard, kinds: feed.kinds, last: start, failed: false });
        }
        if self.protocol >= 2 {
            hello["cursor"] = Value::Object(cursor);
            if let Some(object) = hello.as_object_mut() {
                object.remove("seq");
            }
        }
        // Read outside the snapshot's lock, from each conversation's shard: history may
        // come from disk. Where each side has read to, so marks survive the reconnect.
        let active: Vec<u64> = hello["active"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
        let mut marks = Vec::with_capacity(active.len());
        for id in active {
            if let Ok(Some(c)) = backend.conversation_reads(ConversationId(id)).open_conversation(ConversationId(id)).await {
                marks.push(json!({"conversation": c.id.0, "client_read_upto": c.client_read_upto, "operator_read_upto": c.operator_read_upto}));
            }
        }
        hello["read_marks"] = Value::Array(marks);
        if let Some(offers) = hello.get_mut("offers").and_then(Value::as_array_mut) {
            for offer in offers {
                if let Some(id) = offer.get("conversation").and_then(Value::as_u64) {
                    merge(offer, offer_context(backend.as_ref(), ConversationId(id)).await);
                }
            }
        }
        out.json(hello).await;
        // From here the person is at the desk: counted until the socket ends.
        self.gw.operator_sockets.opened(&self.operator);
        self.counted = true;
        let operator = self.operator.clone();
        let pull = Box::new(DeskPull { readers, operator, backend, shown: std::collections::HashMap::new() });
        let signals = Some(self.gw.signals.operator(&self.operator));
        out.follow(Follow { wake, pull, signals, min_interval: None, paged: true, first: None }).await;
        Flow::Continue
    }

    async fn on_text(&mut self, text: &str, out: &Outbox) -> Flow {
        let result = match parse::<OperatorIn>(text, OPERATOR_TYPES) {
            Ok(frame) => {
                let kind = frame.kind();
                self.handle(frame, out).await.map_err(|e| frames::answering(e, Some(kind)))
            }
            // A malformed frame of a known type: its error names the type when it has no
            // `ref`, so a gateway relaying the socket settles the request it answers and
            // no other.
            Err(error) => {
                let kind = serde_json::from_str::<Value>(text).ok().and_then(|v| v.get("type").and_then(Value::as_str).filter(|k| OPERATOR_TYPES.contains(k)).map(str::to_owned));
                Err(frames::answering(error, kind.as_deref()))
            }
        };
        if let Err(error) = result {
            self.gw.metrics.error_frames.fetch_add(1, Relaxed);
            out.json(error).await;
        }
        Flow::Continue
    }

    fn on_end(&mut self) {
        self.gw.signals.release_operator(&self.operator);
        if std::mem::take(&mut self.counted) {
            self.gw.operator_sockets.closed(&self.operator);
        }
    }
}

/// An operator's message refused by one attempt: the error frame, and whether its
/// outcome is unknown (a failover), which makes it worth sending again.
struct Refused {
    frame: Value,
    unknown: bool,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.frame["message"].as_str().unwrap_or("refused"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_accept_counts_from_the_gateway_s_stamp_and_no_other() {
        let now = 1_000_000;
        assert_eq!(accept_received_at(true, Some(now - 4_000), now), now - 4_000, "stamped by the gateway 4 s ago");
        assert_eq!(accept_received_at(false, Some(now - 4_000), now), now, "a desk's own stamp is ignored");
        assert_eq!(accept_received_at(true, None, now), now);
        assert_eq!(accept_received_at(true, Some(now - RELAYED_STAMP_MAX_AGE_MS - 1), now), now, "too old to be a re-pin's");
        assert_eq!(accept_received_at(true, Some(now + 500), now), now, "a gateway clock ahead counts as now");
    }
}
