//! The supervisor socket: a live view of the floor (queues and operators), pushed on
//! every change and coalesced to at most four frames a second.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fastwebsockets::upgrade::IncomingUpgrade;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::actors::now_ms;
use switchboard_actors::model::{ConversationId, Presence, Role};
use switchboard_actors::shard::{StreamKey, Wakeups};
use switchboard_actors::state::{ConversationStatus, ShardState};

use crate::auth::Subject;
use crate::client_ws::parse;
use crate::frames;
use crate::ws::{self, Flow, Follow, Outbox, Session, Surface};
use crate::Gateway;

const FLOOR_INTERVAL: Duration = Duration::from_millis(250);
/// Queued conversations listed per group in a floor frame, head of the queue first.
const FLOOR_LISTED: usize = 100;

#[derive(Deserialize)]
pub(crate) struct ConnectParams {
    token: Option<String>,
}

pub(crate) async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(params): Query<ConnectParams>,
    relayed: Option<axum::Extension<ws::Relayed>>,
    upgrade: IncomingUpgrade,
) -> Response {
    let staff = match ws::staff_in_touch(&gw, &headers, params.token.as_deref()).await.and_then(|()| ws::admit(&gw, &headers, Surface::Supervisor, params.token.as_deref())) {
        Ok(Some(Subject::Staff { login, role, operator, epoch })) if role >= Role::Supervisor => ws::StaffLogin::of(&gw, params.token.as_deref(), login, role, operator, epoch),
        Ok(_) => {
            gw.metrics.auth_failures.fetch_add(1, Relaxed);
            return (StatusCode::FORBIDDEN, "supervisors and admins only").into_response();
        }
        Err(refusal) => return refusal,
    };
    let session = SupervisorSession { gw: gw.clone(), merger: None };
    ws::accept(
        gw,
        upgrade,
        Surface::Supervisor,
        Some(staff),
        relayed.is_some(),
        session,
    )
}

/// The floor as supervisors see it, read from committed state.
pub(crate) fn floor(state: &ShardState, now: switchboard_actors::model::Timestamp) -> Value {
    // The online operators of each group, in one pass over the operators (not one per
    // group: a floor of hundreds of groups and thousands of operators is built under
    // the routing state's read lock, for every supervisor socket).
    let mut online_in: std::collections::HashMap<&switchboard_actors::model::SkillGroupId, Vec<&switchboard_actors::state::Operator>> = std::collections::HashMap::new();
    for op in state.operators.values().filter(|o| o.presence == Presence::Online) {
        for group in &op.config.groups {
            let listed = online_in.entry(group).or_default();
            // A group named twice in an operator's list counts them once.
            if !listed.last().is_some_and(|o| o.config.id == op.config.id) {
                listed.push(op);
            }
        }
    }
    let queues: Vec<Value> = state
        .groups
        .values()
        .map(|g| {
            let (mut waiting, mut offered, mut longest, mut within) = (0u64, 0u64, 0u64, 0u64);
            let mut listed = Vec::new();
            // Who could take a conversation of this group right now (in id order, as
            // the operators are kept).
            let online: Vec<&switchboard_actors::state::Operator> = online_in.get(&g.config.id).cloned().unwrap_or_default();
            let free: Vec<&switchboard_actors::state::Operator> = online.iter().copied().filter(|o| state.has_any_room(o)).collect();
            let closed = state.group_closed(&g.config.id, now);
            // In the order they are offered (rules 5: priority, then arrival).
            for id in &switchboard_actors::routing::queue_order(state, g, now) {
                let Some(conv) = state.conversations.get(id) else { continue };
                let state_name = match conv.status {
                    ConversationStatus::Queued { offer: Some(_), .. } => {
                        offered += 1;
                        "offered"
                    }
                    _ => {
                        waiting += 1;
                        "waiting"
                    }
                };
                let waited = now.millis_since(conv.created_at);
                if listed.len() < FLOOR_LISTED {
                    let mut item = json!({
                        "conversation": id.0, "state": state_name, "waiting_ms": waited, "visitor": conv.visitor.name,
                        "priority": switchboard_actors::routing::priority(state, g, conv, now),
                    });
                    // Rules 6: the routing step it is at, and when it reaches the next.
                    if state.rules >= 6 && state.group_steps.contains_key(&g.config.id) {
                        item["step"] = json!(switchboard_actors::routing::step_at(state, g, conv, now));
                        item["next_step_at"] = json!(switchboard_actors::routing::next_step_at(state, g, conv, now).map(|t| t.0));
                    }
                    if state_name == "waiting" {
                        // Why nobody is offered it: what a supervisor acts on.
                        let why = if closed {
                            "closed"
                        } else if online.is_empty() {
                            "nobody_online"
                        } else if free.is_empty() {
                            "everyone_full"
                        } else if free.iter().all(|o| conv.passed_by.contains(&o.config.id)) {
                            if let Some(at) = switchboard_actors::routing::new_round_at(g, conv) {
                                item["next_round_at"] = json!(at.0);
                            }
                            "everyone_passed"
                        } else {
                            "routing"
                        };
                        item["why"] = json!(why);
                    }
                    listed.push(item);
                }
                longest = longest.max(waited);
                if waited <= g.config.sla_ms {
                    within += 1;
                }
            }
            let mut queue = json!({
                "available": free.len(),
                "group": g.config.id, "name": g.config.name, "waiting": waiting, "offered": offered,
                "longest_wait_ms": longest, "sla_ms": g.config.sla_ms, "within_sla": within,
                "conversations": listed,
            });
            // Rules 6: whether the group is open, and when that changes.
            if let Some(h) = state.group_hours.get(&g.config.id).filter(|_| state.rules >= 6) {
                queue["hours"] = json!({"open": !closed, "next_change_at": switchboard_actors::hours::next_change(h, now).map(|t| t.0)});
            }
            queue
        })
        .collect();
    let operators: Vec<Value> = state
        .operators
        .values()
        .map(|o| {
            json!({
                "id": o.config.id, "name": o.config.name, "presence": frames::presence_str(o.presence),
                "presence_since": o.presence_since.0, "presence_reason": state.presence_reasons.get(&o.config.id),
                "wrap_up_until": state.wrap_up.get(&o.config.id).filter(|until| **until > now).map(|t| t.0),
                "load": state.load_of(o), "capacity": o.config.capacity,
                "groups": o.config.groups, "active": o.active.iter().map(|c| c.0).collect::<Vec<_>>(),
            })
        })
        .collect();
    // Emergency notices in force, so every supervisor sees what customers are told.
    let emergencies: Vec<Value> = state
        .emergencies
        .iter()
        .map(|(target, e)| {
            let (kind, id) = match target {
                switchboard_actors::model::NoticeTarget::Channel(c) => ("channel", c.as_str()),
                switchboard_actors::model::NoticeTarget::Group(g) => ("group", g.as_str()),
            };
            json!({kind: id, "message": e.message, "by": e.by, "since": e.since.0})
        })
        .collect();
    json!({"type": "floor", "at": now.0, "queues": queues, "operators": operators, "emergencies": emergencies})
}

struct SupervisorSession {
    gw: Arc<Gateway>,
    /// Merges the floor's and a watched conversation's wakeups while one is watched.
    merger: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Deserialize)]
struct Watch {
    conversation: Option<u64>,
}

/// Wakes `tx` whenever the floor or the watched conversation changes. Ends with the
/// floor's stream (the node is shutting down) or when the socket stops following; a
/// conversation stream that ends leaves the floor's.
async fn merge(mut floor: Wakeups, mut conversation: Wakeups, tx: watch::Sender<u64>, moved: Arc<std::sync::atomic::AtomicBool>) {
    let mut conversation_open = true;
    loop {
        tokio::select! {
            changed = floor.changed() => if changed.is_err() { return },
            changed = conversation.changed(), if conversation_open => {
                if changed.is_err() {
                    conversation_open = false;
                    continue;
                }
                moved.store(true, Relaxed);
            }
            _ = tx.closed() => return,
        }
        tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl SupervisorSession {
    /// Follows the floor and, if `watched`, one conversation: a `watched` frame each time
    /// its history grows, so an open inspector re-reads it at once.
    async fn follow(&mut self, watched: Option<ConversationId>, out: &Outbox) -> Result<(), Value> {
        let subscribe = |key| {
            let gw = self.gw.clone();
            async move { gw.backend.subscribe(key).await.map_err(|e| frames::error(e.code(), &e.to_string(), None)) }
        };
        let floor_wake = subscribe(StreamKey::Floor).await?;
        let shard = self.gw.backend.shard();
        // The watched conversation is read where its entries are: on a split node its
        // own conversation shard (the routing shard's copy holds only the entries of
        // routing, and none of a conversation a bot still holds).
        let watched = watched.map(|id| (id, self.gw.backend.conversation_reads(id)));
        let moved = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (wake, merger) = match &watched {
            None => (floor_wake, None),
            Some((id, reads)) => {
                let id = *id;
                if reads.conversation(id).await.map_err(|e| frames::error(e.code(), &e.to_string(), None))?.is_none() {
                    return Err(frames::error("not_found", &format!("conversation {}", id.0), None));
                }
                let conversation_wake = subscribe(StreamKey::Conversation(id)).await?;
                let (tx, rx) = watch::channel(0u64);
                (rx, Some(tokio::spawn(merge(floor_wake, conversation_wake, tx, moved.clone()))))
            }
        };
        let old = std::mem::replace(&mut self.merger, merger);
        let pull = Box::new(FloorPull { shard, watched, moved, reported: None, failed: false, crossing: None });
        out.follow(Follow { wake, pull, signals: None, min_interval: Some(FLOOR_INTERVAL), paged: false, first: None }).await;
        // Only once the writer has the new wake-ups: ending the old merger first would
        // end the stream the writer still waits on, and with it the socket.
        if let Some(old) = old {
            old.abort();
        }
        Ok(())
    }
}

/// How long a floor frame waits for the watched conversation's read.
const WATCHED_READ_PATIENCE: Duration = Duration::from_millis(300);

/// A supervisor socket's view: the floor (routing state) and, if one is watched, a
/// `watched` frame each time that conversation's last seq (read on its own shard) moves.
struct FloorPull {
    shard: Arc<switchboard_actors::shard::Shard>,
    watched: Option<(ConversationId, Arc<dyn crate::ShardReads>)>,
    /// Set when the watched conversation's stream moved: only then (or after a failed
    /// read) is it read again, not at every wake-up of the floor.
    moved: Arc<std::sync::atomic::AtomicBool>,
    reported: Option<u64>,
    /// The last read of the watched conversation failed (its holder did not answer).
    failed: bool,
    /// When the next waiting conversation crosses its group's SLA, as of the last pull.
    crossing: Option<tokio::time::Instant>,
}

/// In how long the first conversation waiting within its group's SLA crosses it: the
/// floor's `within_sla` changes then with no entry applied. Every replica's floor
/// pulls again at that moment (the group's actor, which wakes the leader's floor, runs
/// on the leader only).
pub(crate) fn next_sla_crossing(state: &ShardState, now: switchboard_actors::model::Timestamp) -> Option<u64> {
    state
        .groups
        .values()
        .flat_map(|g| {
            g.queue.iter().filter_map(move |(_, id)| {
                let waited = now.millis_since(state.conversations.get(id)?.created_at);
                (waited <= g.config.sla_ms).then(|| g.config.sla_ms - waited + 1)
            })
        })
        .min()
}

impl ws::Pull for FloorPull {
    fn pull(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Value>> + Send + '_>> {
        Box::pin(async move {
            let (floor_frame, crossing) = {
                let state = self.shard.read();
                let now = now_ms();
                (floor(&state, now), next_sla_crossing(&state, now))
            };
            self.crossing = crossing.map(|ms| tokio::time::Instant::now() + std::time::Duration::from_millis(ms));
            let mut frames = vec![floor_frame];
            let again = std::mem::take(&mut self.failed);
            let moved = self.moved.swap(false, Relaxed);
            if let Some((id, reads)) = self.watched.as_ref().filter(|_| moved || again) {
                // A holder that does not answer soon holds up no floor frame: the
                // conversation is read again shortly.
                let read = tokio::time::timeout(WATCHED_READ_PATIENCE, reads.conversation(*id)).await.unwrap_or_else(|_| Err(switchboard_actors::Error::Unreachable("no holder answered in time".into())));
                match read {
                    Ok(Some(conv)) if self.reported != Some(conv.last_seq()) => {
                        self.reported = Some(conv.last_seq());
                        frames.push(json!({"type": "watched", "conversation": id.0, "last_seq": conv.last_seq()}));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(conversation = id.0, error = %e, "a watched conversation cannot be read now; reading again shortly");
                        self.failed = true;
                    }
                }
            }
            frames
        })
    }

    fn retry(&self) -> bool {
        self.failed
    }

    fn changes_at(&self) -> Option<tokio::time::Instant> {
        self.crossing
    }
}

impl Session for SupervisorSession {
    async fn on_start(&mut self, out: &Outbox) -> Flow {
        if let Err(error) = self.follow(None, out).await {
            out.json(error).await;
            return Flow::Close(ws::close::INTERNAL, "could not follow the floor".into());
        }
        Flow::Continue
    }

    async fn on_text(&mut self, text: &str, out: &Outbox) -> Flow {
        let value = match parse::<Value>(text, &["ping", "watch"]) {
            Ok(value) => value,
            Err(error) => {
                out.json(error).await;
                return Flow::Continue;
            }
        };
        if value["type"] == "ping" {
            out.json(json!({"type": "pong"})).await;
            return Flow::Continue;
        }
        let watch: Watch = match serde_json::from_value(value) {
            Ok(watch) => watch,
            Err(e) => {
                out.json(frames::error("bad_frame", &format!("watch: {e}"), None)).await;
                return Flow::Continue;
            }
        };
        if let Err(error) = self.follow(watch.conversation.map(ConversationId), out).await {
            out.json(error).await;
        }
        Flow::Continue
    }

    fn on_end(&mut self) {
        if let Some(merger) = self.merger.take() {
            merger.abort();
        }
    }
}
