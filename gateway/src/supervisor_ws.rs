//! The supervisor socket: a live view of the floor (queues and operators), pushed on
//! every change and coalesced to at most four frames a second.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fastwebsockets::upgrade::IncomingUpgrade;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::actors::now_ms;
use switchboard_actors::model::{Presence, Role};
use switchboard_actors::shard::StreamKey;
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
    let staff = match ws::admit(&gw, &headers, Surface::Supervisor, params.token.as_deref()) {
        Ok(Some(Subject::Staff { login, role, operator, epoch })) if role >= Role::Supervisor => ws::StaffLogin { login, role, operator, epoch },
        Ok(_) => {
            gw.metrics.auth_failures.fetch_add(1, Relaxed);
            return (StatusCode::FORBIDDEN, "supervisors and admins only").into_response();
        }
        Err(refusal) => return refusal,
    };
    let session = SupervisorSession { gw: gw.clone() };
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
    let queues: Vec<Value> = state
        .groups
        .values()
        .map(|g| {
            let (mut waiting, mut offered, mut longest, mut within) = (0u64, 0u64, 0u64, 0u64);
            let mut listed = Vec::new();
            // Who could take a conversation of this group right now.
            let online: Vec<&switchboard_actors::state::Operator> =
                state.operators.values().filter(|o| o.config.groups.contains(&g.config.id) && o.presence == Presence::Online).collect();
            let free: Vec<&switchboard_actors::state::Operator> = online.iter().copied().filter(|o| o.free_capacity() > 0).collect();
            for (_, id) in &g.queue {
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
                    let mut item = json!({"conversation": id.0, "state": state_name, "waiting_ms": waited, "visitor": conv.visitor.name});
                    if state_name == "waiting" {
                        // Why nobody is offered it: what a supervisor acts on.
                        let why = if online.is_empty() {
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
            json!({
                "available": free.len(),
                "group": g.config.id, "name": g.config.name, "waiting": waiting, "offered": offered,
                "longest_wait_ms": longest, "sla_ms": g.config.sla_ms, "within_sla": within,
                "conversations": listed,
            })
        })
        .collect();
    let operators: Vec<Value> = state
        .operators
        .values()
        .map(|o| {
            json!({
                "id": o.config.id, "name": o.config.name, "presence": frames::presence_str(o.presence),
                "presence_since": o.presence_since.0, "load": o.load(), "capacity": o.config.capacity,
                "groups": o.config.groups, "active": o.active.iter().map(|c| c.0).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"type": "floor", "at": now.0, "queues": queues, "operators": operators})
}

struct SupervisorSession {
    gw: Arc<Gateway>,
}

impl Session for SupervisorSession {
    async fn on_start(&mut self, out: &Outbox) -> Flow {
        let wake = match self.gw.backend.subscribe(StreamKey::Floor).await {
            Ok(wake) => wake,
            Err(e) => {
                out.error(e.code(), &e.to_string(), None).await;
                return Flow::Close(ws::close::INTERNAL, "could not follow the floor".into());
            }
        };
        let shard = self.gw.backend.shard();
        let pull = Box::new(move || {
            let state = shard.read();
            vec![floor(&state, now_ms())]
        });
        out.follow(Follow { wake, pull, signals: None, min_interval: Some(FLOOR_INTERVAL), paged: false }).await;
        Flow::Continue
    }

    async fn on_text(&mut self, text: &str, out: &Outbox) -> Flow {
        match parse::<Value>(text, &["ping"]) {
            Ok(_) => out.json(json!({"type": "pong"})).await,
            Err(error) => out.json(error).await,
        }
        Flow::Continue
    }
}
