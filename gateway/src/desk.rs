//! What the workstation's desk and floor read beyond the live streams: internal notes,
//! the conversations an operator handled (with search), and each skill group's KPIs
//! for today. Documented in docs/workstation-api.md and `/openapi.json`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::core::Reply;
use switchboard_actors::model::{ChannelId, Command, ConversationId, NoticeTarget, OperatorId, Role, SkillGroupId};
use switchboard_actors::state::{Conversation, ConversationStatus, GroupKpi, HistoryEntry, HistoryItem, HOUR_MS, KPI_HOURS_KEPT};

use crate::rest::{conversation_id, readable, Body, Params, Staff};
use crate::{Gateway, GatewayError};

/// Conversations one page of `GET /api/my/conversations` holds at most.
pub const MINE_PAGE_MAX: usize = 50;
/// Conversations one search request looks at, newest first, before it answers with what
/// it found and a cursor to look further back.
pub const SEARCH_SCAN: usize = 200;
/// History entries of each conversation a search reads.
pub const SEARCH_ENTRIES: usize = 500;
/// Longest search text, in characters.
pub const SEARCH_MAX_CHARS: usize = 200;
/// How far back `GET /api/kpis` may start, in days (within [`KPI_HOURS_KEPT`]).
pub const KPI_DAYS_BACK: u64 = 7;
const _: () = assert!(KPI_DAYS_BACK * 24 < KPI_HOURS_KEPT);
/// Longest preview line, in characters.
const PREVIEW_CHARS: usize = 160;

#[derive(Deserialize)]
pub(crate) struct NoteBody {
    text: String,
    #[serde(default)]
    key: Option<String>,
}

/// `POST /api/conversations/{id}/notes`: staff who may read a conversation add a note
/// to it that only staff see.
pub(crate) async fn add_note(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>, request: axum::extract::Request) -> Result<Json<Value>, GatewayError> {
    let conversation = conversation_id(&id)?;
    let conv = readable(&gw, &staff, conversation).await?;
    // An operator notes only a conversation they hold, held or are offered: reading a
    // served visitor's earlier conversations (the client card) is not writing to them.
    if staff.role < switchboard_actors::model::Role::Supervisor && !staff.operator.as_ref().is_some_and(|op| crate::operator_ws::involved(&gw.backend.shard().read(), op, &conv)) {
        return Err(GatewayError::Forbidden("not your conversation"));
    }
    // Read once who may write is known (docs/workstation-api.md).
    let Body(body) = <Body<NoteBody> as axum::extract::FromRequest<Arc<Gateway>>>::from_request(request, &gw).await?;
    if body.text.trim().is_empty() {
        return Err(GatewayError::BadRequest("a note needs text".into()));
    }
    let name = {
        let shard = gw.backend.directory_shard();
        let state = shard.read();
        staff.operator.as_ref().and_then(|op| state.operators.get(op)).map_or_else(|| staff.login.clone(), |op| op.config.name.clone())
    };
    let key = match body.key {
        Some(key) => key,
        None => format!("note-{}", crate::auth::random_hex(12)?),
    };
    let reply = gw.submit_keyed(Command::AddNote { conversation, author: staff.login.clone(), name, key: key.clone(), text: body.text }).await?;
    match reply {
        Reply::Message { seq, duplicate } => Ok(Json(json!({"conversation": conversation.0, "key": key, "seq": seq, "duplicate": duplicate}))),
        other => Err(GatewayError::Internal(format!("unexpected reply to a note: {other:?}"))),
    }
}

#[derive(Deserialize)]
pub(crate) struct MineQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /api/my/conversations`: the conversations the caller's operator handled,
/// newest first, each with a preview line; with `q`, only those whose number, customer
/// name or attributes, or messages and notes contain it.
pub(crate) async fn my_conversations(State(gw): State<Arc<Gateway>>, staff: Staff, Params(query): Params<MineQuery>) -> Result<Json<Value>, GatewayError> {
    let Some(operator) = staff.operator.clone() else {
        return Err(GatewayError::BadRequest("this login is linked to no operator: it has no conversations of its own".into()));
    };
    let limit = query.limit.unwrap_or(20).clamp(1, MINE_PAGE_MAX);
    let needle = query.q.trim().to_lowercase();
    if needle.chars().count() > SEARCH_MAX_CHARS {
        return Err(GatewayError::BadRequest(format!("search text is at most {SEARCH_MAX_CHARS} characters")));
    }
    let budget = if needle.is_empty() { limit } else { SEARCH_SCAN };
    let mut cursor = query.before.map(ConversationId);
    let (mut found, mut scanned, mut exhausted) = (Vec::new(), 0usize, false);
    'scan: while found.len() < limit && scanned < budget {
        let ids = gw.handled_by(&operator, cursor, (budget - scanned).min(64)).await?;
        if ids.is_empty() {
            exhausted = true;
            break;
        }
        for id in ids {
            cursor = Some(id);
            scanned += 1;
            let shard = gw.backend.conversation_reads(id);
            let Some(conv) = shard.conversation(id).await? else { continue };
            // The match first: a conversation that does not match costs no preview read.
            if !needle.is_empty() && !matches(shard.as_ref(), &conv, &needle).await? {
                if scanned >= budget {
                    break 'scan;
                }
                continue;
            }
            let recent = recent_entries(shard.as_ref(), &conv).await?;
            found.push(summary(&conv, &recent, &operator));
            if found.len() >= limit || scanned >= budget {
                break 'scan;
            }
        }
    }
    // Whether older ones remain: a page that ended exactly at the oldest says so on the
    // next request (an empty page without a cursor).
    let next = if exhausted { None } else { cursor.map(|c| c.0) };
    Ok(Json(json!({"conversations": found, "scanned": scanned, "next_before": next})))
}

/// Earlier conversations of a customer one search looks at.
pub const EARLIER_SEARCH: usize = 50;

#[derive(Deserialize)]
pub(crate) struct EarlierQuery {
    #[serde(default)]
    q: String,
}

/// `GET /api/conversations/{id}/earlier`: the same customer's other conversations
/// (newest first, at most 50), each with a preview line; with `q`, those whose number,
/// messages or notes contain it. Whoever may read the conversation may ask.
pub(crate) async fn earlier(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>, Params(query): Params<EarlierQuery>) -> Result<Json<Value>, GatewayError> {
    let id = conversation_id(&id)?;
    let conv = readable(&gw, &staff, id).await?;
    let needle = query.q.trim().to_lowercase();
    if needle.chars().count() > SEARCH_MAX_CHARS {
        return Err(GatewayError::BadRequest(format!("search text is at most {SEARCH_MAX_CHARS} characters")));
    }
    let Some(visitor) = conv.visitor.id.as_ref() else { return Ok(Json(json!({"conversations": []}))) };
    let me = staff.operator.clone().unwrap_or_else(|| switchboard_actors::model::OperatorId::new(""));
    let mut found = Vec::new();
    for other in gw.conversations_of(visitor, EARLIER_SEARCH + 1).await? {
        // Each row (its preview, and whether the search text is in it) is shown only to
        // someone who may open that conversation: an operator who once held this one
        // sees the visitor's others only while serving them (`may_read`).
        if other.id == id || crate::rest::check_read(&staff, &gw.backend.shard().read(), &other).is_err() {
            continue;
        }
        let shard = gw.backend.conversation_reads(other.id);
        if !needle.is_empty() && !matches(shard.as_ref(), &other, &needle).await? {
            continue;
        }
        let recent = recent_entries(shard.as_ref(), &other).await?;
        found.push(summary(&other, &recent, &me));
        if found.len() == EARLIER_SEARCH {
            break;
        }
    }
    Ok(Json(json!({"conversations": found})))
}

fn state_name(conv: &Conversation) -> &'static str {
    match conv.status {
        ConversationStatus::Queued { .. } => "queued",
        ConversationStatus::Assigned { .. } => "assigned",
        ConversationStatus::Closed => "closed",
        ConversationStatus::WithBot => "with_bot",
    }
}

fn preview_text(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    line.chars().take(PREVIEW_CHARS).collect()
}

/// Entries a desk row is read from: the last 12, or, for a closed conversation whose
/// close is not among them (notes and a rating came after it), up to
/// [`ROW_LOOKBACK`] more, so that its row still says when it closed and what was said
/// last.
async fn recent_entries(shard: &dyn crate::ShardReads, conv: &Conversation) -> Result<Vec<HistoryEntry>, GatewayError> {
    let last = conv.last_seq();
    let recent = shard.history(conv.id, last.saturating_sub(12), 12).await?;
    let closed_seen = recent.iter().any(|e| matches!(e.item, HistoryItem::Closed { .. }));
    if conv.status != ConversationStatus::Closed || closed_seen || last <= 12 {
        return Ok(recent);
    }
    // The entries before the last 12: seqs `from + 1 ..= last - 12`.
    let from = last.saturating_sub(12 + ROW_LOOKBACK as u64);
    let mut earlier = shard.history(conv.id, from, (last - 12 - from) as usize).await?;
    earlier.extend(recent);
    Ok(earlier)
}

/// Entries a closed conversation's row looks back past its last 12 for its close.
pub const ROW_LOOKBACK: usize = 200;

/// One row of the desk's conversation lists.
fn summary(conv: &Conversation, recent: &[HistoryEntry], me: &switchboard_actors::model::OperatorId) -> Value {
    let preview = recent.iter().rev().find_map(|e| match &e.item {
        HistoryItem::ClientMessage { text, attachments, .. } => Some(json!({"from": "client", "text": preview_text(text), "attachments": attachments.len(), "at": e.at.0})),
        HistoryItem::OperatorMessage { name, text, attachments, .. } => {
            Some(json!({"from": "operator", "name": name, "text": preview_text(text), "attachments": attachments.len(), "at": e.at.0}))
        }
        HistoryItem::BotMessage { text, .. } => Some(json!({"from": "bot", "text": preview_text(text), "attachments": 0, "at": e.at.0})),
        _ => None,
    });
    let closed_at = recent.iter().rev().find_map(|e| matches!(e.item, HistoryItem::Closed { .. }).then_some(e.at.0));
    json!({
        "conversation": conv.id.0, "state": state_name(conv), "channel": conv.channel.as_str(), "group": conv.group.as_str(),
        "visitor": conv.visitor.name, "created_at": conv.created_at.0, "closed_at": closed_at,
        "last_at": recent.last().map(|e| e.at.0), "last_seq": conv.last_seq(), "rated": conv.rated,
        "mine": conv.assigned() == Some(me), "preview": preview,
    })
}

/// Whether a conversation's number, customer or text contains `needle` (lower case).
async fn matches(shard: &dyn crate::ShardReads, conv: &Conversation, needle: &str) -> Result<bool, GatewayError> {
    let number = needle.trim_start_matches('#');
    if !number.is_empty() && number.chars().all(|c| c.is_ascii_digit()) && conv.id.0.to_string() == number {
        return Ok(true);
    }
    let has = |text: &str| text.to_lowercase().contains(needle);
    if has(&conv.visitor.name) || conv.visitor.attributes.iter().any(|(k, v)| has(k) || has(v)) {
        return Ok(true);
    }
    Ok(shard.history(conv.id, 0, SEARCH_ENTRIES).await?.iter().any(|e| match &e.item {
        HistoryItem::ClientMessage { text, attachments, .. } | HistoryItem::OperatorMessage { text, attachments, .. } => {
            has(text) || attachments.iter().any(|a| has(&a.name))
        }
        HistoryItem::Note { text, .. } => has(text),
        _ => false,
    }))
}

#[derive(Deserialize)]
pub(crate) struct KpiQuery {
    #[serde(default)]
    since: Option<u64>,
}

/// `GET /api/kpis`: each skill group's figures from `since` (default: midnight UTC
/// today; rounded down to the hour; at most 7 days back) until now.
pub(crate) async fn kpis(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::SupervisorStaff, Params(query): Params<KpiQuery>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let now = switchboard_actors::actors::now_ms().0;
    let hour = window_start(query.since, now)?;
    let shard = gw.backend.shard();
    let state = shard.read();
    let groups: Vec<Value> = state
        .kpis_since(hour)
        .iter()
        .map(|(group, kpi)| {
            let name = state.groups.get(group).map_or(group.as_str(), |g| g.config.name.as_str());
            kpi_json(group.as_str(), name, kpi)
        })
        .collect();
    Ok(Json(json!({"since": hour * HOUR_MS, "at": now, "groups": groups})))
}

/// How far ahead of the server's clock a `since` is taken as now: a browser whose
/// clock runs a little fast asks for its local midnight a moment before the server's.
const SINCE_AHEAD_TAKEN: u64 = 5 * 60 * 1000;

/// The first hour of a `since` window (`GET /api/kpis`, `/api/pauses`): default
/// midnight UTC today; up to [`SINCE_AHEAD_TAKEN`] in the future taken as now, further
/// refused; at most [`KPI_DAYS_BACK`] days back, which the hourly counters (kept for
/// [`KPI_HOURS_KEPT`]) always hold whole.
fn window_start(since: Option<u64>, now: u64) -> Result<u64, GatewayError> {
    let since = since.unwrap_or(now - now % (24 * HOUR_MS));
    if since > now.saturating_add(SINCE_AHEAD_TAKEN) {
        return Err(GatewayError::BadRequest("since is more than 5 minutes in the future".into()));
    }
    let since = since.min(now);
    let oldest = (now / HOUR_MS).saturating_sub(KPI_DAYS_BACK * 24) * HOUR_MS;
    if since < oldest {
        return Err(GatewayError::BadRequest(format!("since is at most 7 days back (the oldest accepted now is {oldest})")));
    }
    Ok(since / HOUR_MS)
}

fn ratio(part: u64, whole: u64) -> Option<u64> {
    (whole > 0).then(|| (part + whole / 2) / whole)
}

fn kpi_json(group: &str, name: &str, k: &GroupKpi) -> Value {
    let offered_to_sla = k.answered + k.abandoned;
    json!({
        "group": group, "name": name,
        "entered": k.entered, "answered": k.answered, "answered_in_sla": k.answered_in_sla, "abandoned": k.abandoned,
        "handled": k.handled, "rated": k.rated,
        "avg_wait_ms": ratio(k.wait_ms, k.answered),
        "service_level": ratio(100 * k.answered_in_sla, offered_to_sla),
        "avg_handle_ms": ratio(k.handle_ms, k.timed),
        "csat": (k.rated > 0).then(|| (k.rating_sum as f64 * 10.0 / k.rated as f64).round() / 10.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kpis_round_and_say_null_where_nothing_was_measured() {
        let k = GroupKpi { answered: 3, wait_ms: 10_000, answered_in_sla: 2, abandoned: 1, handled: 2, timed: 2, handle_ms: 90_001, rated: 3, rating_sum: 13, ..Default::default() };
        let v = kpi_json("g", "G", &k);
        assert_eq!(v["avg_wait_ms"], 3333);
        assert_eq!(v["service_level"], 50, "2 within the SLA of 3 answered and 1 abandoned");
        assert_eq!(v["avg_handle_ms"], 45_001);
        assert_eq!(v["csat"], 4.3);
        let empty = kpi_json("g", "G", &GroupKpi::default());
        for field in ["avg_wait_ms", "service_level", "avg_handle_ms", "csat"] {
            assert!(empty[field].is_null(), "{field}: {empty}");
        }
    }

    #[test]
    fn a_since_a_little_ahead_is_now_and_further_ahead_is_refused() {
        let now = 1_800_000_000_000 + 10 * HOUR_MS + 123;
        assert_eq!(window_start(Some(now + 60_000), now).ok(), Some(now / HOUR_MS), "a browser a minute fast at midnight");
        assert!(window_start(Some(now + 6 * 60_000), now).is_err());
        assert_eq!(window_start(Some(now - HOUR_MS), now).ok(), Some(now / HOUR_MS - 1));
        assert!(window_start(Some(now - 8 * 24 * HOUR_MS), now).is_err());
    }

    #[test]
    fn a_preview_is_one_line_and_bounded() {
        assert_eq!(preview_text("  Hello\n\nthere  friend "), "Hello there friend");
        assert_eq!(preview_text(&"é".repeat(500)).chars().count(), PREVIEW_CHARS);
    }
}

/// `GET /api/pause-reasons` (any staff): the reasons a break may be taken for.
pub(crate) async fn pause_reasons(State(gw): State<Arc<Gateway>>, _staff: Staff) -> Json<Value> {
    let shard = gw.backend.directory_shard();
    let reasons = shard.read().pause_reasons.clone();
    Json(json!({ "reasons": reasons }))
}

#[derive(Deserialize)]
pub(crate) struct PauseReasonsBody {
    reasons: Vec<String>,
}

/// `PUT /api/pause-reasons` (admin): replaces the list.
pub(crate) async fn put_pause_reasons(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::AdminStaff, Body(body): Body<PauseReasonsBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    gw.submit(Command::SetPauseReasons { reasons: body.reasons.clone() }).await?;
    Ok(Json(json!({ "reasons": body.reasons })))
}

/// `GET /api/pauses?since=` (supervisor): each operator's time on break per reason
/// since `since` (rounded down to the hour; default midnight UTC; at most 7 days back),
/// a break still running counted up to now.
pub(crate) async fn pauses(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::SupervisorStaff, Params(query): Params<KpiQuery>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let now = switchboard_actors::actors::now_ms();
    let hour = window_start(query.since, now.0)?;
    let shard = gw.backend.shard();
    let state = shard.read();
    let mut totals = state.pauses_since(hour);
    let operators: Vec<Value> = state
        .operators
        .values()
        .map(|op| {
            let id = &op.config.id;
            let mut reasons = totals.remove(id).unwrap_or_default();
            let current = match (op.presence, state.presence_reasons.get(id)) {
                (switchboard_actors::model::Presence::Break, Some(reason)) => {
                    // The running break, from the window's start at the earliest.
                    let from = op.presence_since.0.max(hour * HOUR_MS);
                    *reasons.entry(reason.clone()).or_default() += now.0.saturating_sub(from);
                    json!({"reason": reason, "since": op.presence_since.0})
                }
                _ => Value::Null,
            };
            json!({"operator": id.as_str(), "name": op.config.name, "reasons": reasons, "current": current})
        })
        .collect();
    Ok(Json(json!({"since": hour * HOUR_MS, "at": now.0, "operators": operators})))
}

#[derive(Deserialize)]
pub(crate) struct NoticeQuery {
    #[serde(default)]
    channel: Option<String>,
}

/// `GET /notice?channel=` (public listener, no token): the emergency notice in force for
/// new conversations of the channel (default: the web channel) in its default group, so
/// the widget shows it before the customer writes. `{"notice":null}` when none.
pub(crate) async fn public_notice(State(gw): State<Arc<Gateway>>, Params(query): Params<NoticeQuery>) -> Result<Json<Value>, GatewayError> {
    let channel = ChannelId::new(query.channel.unwrap_or_else(|| gw.config.web_channel.clone()));
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    let config = state.channels.get(&channel).ok_or_else(|| GatewayError::NotFound(format!("channel {channel}")))?;
    let notice = state.emergency_for(&channel, &config.default_group);
    // Rules 6: outside the default group's opening hours, what a new customer is told.
    let now = switchboard_actors::actors::now_ms();
    let closed = match state.group_hours.get(&config.default_group) {
        Some(h) if state.group_closed(&config.default_group, now) => json!({
            "message": h.message,
            "opens_at": switchboard_actors::hours::next_change(h, now).map(|t| t.0),
            "action": match h.closed_action {
                switchboard_actors::model::ClosedAction::Reply => "reply",
                switchboard_actors::model::ClosedAction::Wait => "wait",
                switchboard_actors::model::ClosedAction::Transfer(_) => "transfer",
            },
        }),
        _ => Value::Null,
    };
    Ok(Json(json!({"notice": notice.map(|e| &e.message), "since": notice.map(|e| e.since.0), "closed": closed})))
}

fn target_json(target: &NoticeTarget) -> Value {
    match target {
        NoticeTarget::Channel(c) => json!({"channel": c.as_str()}),
        NoticeTarget::Group(g) => json!({"group": g.as_str()}),
    }
}

/// `GET /api/emergencies` (any staff): the notices in force.
pub(crate) async fn emergencies(State(gw): State<Arc<Gateway>>, _staff: Staff) -> Json<Value> {
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    let list: Vec<Value> = state
        .emergencies
        .iter()
        .map(|(target, e)| {
            let mut v = target_json(target);
            v["message"] = json!(e.message);
            v["by"] = json!(e.by);
            v["since"] = json!(e.since.0);
            v
        })
        .collect();
    Json(json!({ "emergencies": list }))
}

/// A field that must be given, possibly as `null`: absent is `None`, `null` is
/// `Some(None)`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(Option::<String>::deserialize(d)?))
}

#[derive(Deserialize)]
pub(crate) struct EmergencyBody {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    group: Option<String>,
    /// The notice; `null` switches the emergency off; required.
    #[serde(default, deserialize_with = "present")]
    message: Option<Option<String>>,
}

/// `PUT /api/emergencies` (supervisor): switches a channel or group into emergency mode
/// with a message, or out of it with `"message": null`.
pub(crate) async fn put_emergency(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::SupervisorStaff, Body(body): Body<EmergencyBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let Some(message) = body.message else {
        return Err(GatewayError::BadRequest("message is required: the notice, or null to switch it off".into()));
    };
    let target = match (body.channel, body.group) {
        (Some(c), None) => NoticeTarget::Channel(ChannelId::new(c)),
        (None, Some(g)) => NoticeTarget::Group(SkillGroupId::new(g)),
        _ => return Err(GatewayError::BadRequest("give exactly one of channel and group".into())),
    };
    gw.submit(Command::SetEmergency { target: target.clone(), message: message.clone(), by: staff.login.clone() }).await?;
    let mut v = target_json(&target);
    v["message"] = json!(message);
    Ok(Json(v))
}

#[derive(Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    limit: Option<usize>,
    /// Entries numbered below it (a page's last `n`).
    #[serde(default)]
    before: Option<u64>,
}

/// `GET /api/audit?limit=` (admin): the newest audit trail entries, newest first.
pub(crate) async fn audit(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::AdminStaff, Params(query): Params<AuditQuery>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let entries: Vec<Value> = gw
        .backend
        .directory_shard()
        .audit(query.before, limit)?
        .into_iter()
        .map(|(n, e)| json!({"n": n, "at": e.at.0, "by": e.by, "action": e.action, "target": e.target, "detail": e.detail}))
        .collect();
    Ok(Json(json!({ "entries": entries })))
}

/// `GET /api/access` (supervisor): block and allow rules and channels' access modes.
pub(crate) async fn access(State(gw): State<Arc<Gateway>>, staff: Staff) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    let rules: Vec<Value> = state
        .access_rules
        .iter()
        .map(|(r, n)| json!({"list": r.list, "channel": r.channel, "kind": r.kind, "value": r.value, "note": n.note, "by": n.by, "since": n.since.0}))
        .collect();
    let channels: Vec<Value> = state
        .channel_access
        .iter()
        .map(|(c, m)| json!({"channel": c.as_str(), "allow_only": m.allow_only, "message": m.message}))
        .collect();
    Ok(Json(json!({"rules": rules, "channels": channels, "default_message": switchboard_actors::access::DEFAULT_BLOCKED_MESSAGE})))
}

#[derive(Deserialize)]
pub(crate) struct AccessRuleBody {
    list: switchboard_actors::model::AccessList,
    #[serde(default)]
    channel: Option<String>,
    kind: switchboard_actors::model::AccessKind,
    value: String,
    /// Why; `null` removes the rule; required.
    #[serde(default, deserialize_with = "present")]
    note: Option<Option<String>>,
}

/// `PUT /api/access/rules` (supervisor): adds a block or allow rule with a note, or
/// removes it with `"note": null`.
pub(crate) async fn put_access_rule(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::SupervisorStaff, Body(body): Body<AccessRuleBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let Some(note) = body.note else {
        return Err(GatewayError::BadRequest("note is required: a text (possibly empty) adds the rule, null removes it".into()));
    };
    let rule = switchboard_actors::model::AccessRule { list: body.list, channel: body.channel.map(ChannelId::new), kind: body.kind, value: body.value.trim().to_owned() };
    gw.submit(Command::SetAccessRule { rule: rule.clone(), note: note.clone(), by: staff.login.clone() }).await?;
    Ok(Json(json!({"list": rule.list, "channel": rule.channel, "kind": rule.kind, "value": rule.value, "note": note})))
}

#[derive(Deserialize)]
pub(crate) struct PreviewBody {
    group: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    attributes: std::collections::BTreeMap<String, String>,
}

/// `POST /api/routing/preview` (supervisor): what would happen to a conversation
/// arriving now in `group` (on `channel`, from a visitor with `attributes`): its
/// priority, and for every operator of the group whether they could take it and why
/// not, in the order the selector would try them. Nothing is written.
pub(crate) async fn routing_preview(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::SupervisorStaff, Body(body): Body<PreviewBody>) -> Result<Json<Value>, GatewayError> {
    use switchboard_actors::model::{Timestamp, Visitor};
    use switchboard_actors::state::Conversation;
    staff.require(Role::Supervisor)?;
    if body.attributes.len() > 20 {
        return Err(GatewayError::BadRequest("at most 20 attributes".into()));
    }
    // Presence, load, queues and wrap-up are the routing shard's (it has the directory's
    // groups, channels and rules by letter); the metadata group has none of them.
    let shard = gw.backend.shard();
    let state = shard.read();
    let group_id = SkillGroupId::new(body.group);
    let group = state.groups.get(&group_id).ok_or_else(|| GatewayError::NotFound(format!("skill group {group_id}")))?;
    let channel = match body.channel {
        Some(c) => ChannelId::new(c),
        None => state.channels.values().find(|c| c.default_group == group_id).map_or_else(|| ChannelId::new(gw.config.web_channel.clone()), |c| c.id.clone()),
    };
    let now = switchboard_actors::actors::now_ms();
    let visitor = Visitor { id: None, name: "preview".into(), attributes: body.attributes.into_iter().collect() };
    let queued = switchboard_actors::state::ConversationStatus::Queued { ticket: u64::MAX, offer: None };
    let sample = Conversation::new(ConversationId(u64::MAX), channel.clone(), visitor, group_id.clone(), queued, Timestamp(now.0));
    let priority = switchboard_actors::routing::priority(&state, group, &sample, now);
    let ahead = switchboard_actors::routing::queue_order(&state, group, now)
        .iter()
        .filter_map(|id| state.conversations.get(id))
        .filter(|c| switchboard_actors::routing::priority(&state, group, c, now) >= priority)
        .count();
    let selection = switchboard_actors::routing::select_operator(&state, group, &sample, now);
    let listed = |selection: &switchboard_actors::routing::Selection| -> Vec<Value> {
        selection
            .candidates
            .iter()
            .map(|c| {
                let name = state.operators.get(&OperatorId::new(c.operator.as_str())).map_or(c.operator.as_str(), |o| o.config.name.as_str());
                json!({"operator": c.operator.as_str(), "name": name, "load": c.load, "capacity": c.capacity, "score": c.score, "excluded": c.excluded})
            })
            .collect()
    };
    // Rules 6: every routing step, as the sample would meet it once it has waited there.
    let step_afters: Vec<u64> = std::iter::once(0).chain(state.group_steps.get(&group_id).into_iter().flatten().map(|s| s.after_ms)).collect();
    let steps: Vec<Value> = step_afters
        .iter()
        .enumerate()
        .map(|(i, after)| {
            let at_step = switchboard_actors::routing::select_at_step(&state, group, &sample, now, i as u32);
            json!({"step": i, "after_ms": after, "chosen": at_step.chosen.as_ref().map(|o| o.as_str()), "candidates": listed(&at_step)})
        })
        .collect();
    Ok(Json(json!({
        "group": group_id.as_str(), "channel": channel.as_str(), "priority": priority, "ahead": ahead,
        "chosen": selection.chosen.as_ref().map(|o| o.as_str()),
        "candidates": listed(&selection),
        "step": selection.step, "steps": steps,
        "open": !state.group_closed(&group_id, now),
    })))
}
