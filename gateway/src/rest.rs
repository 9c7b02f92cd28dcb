//! REST for staff on the private listener, plus the served pages and documents.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::model::*;

use crate::auth::{hash_password, verify_password, Subject, STAFF_TOKEN_TTL};
use crate::frames::{self, Audience};
use crate::operator_ws::may_read;
use crate::{Gateway, GatewayError};

const OPENAPI: &str = include_str!("../assets/openapi.json");

/// Largest JSON request body, in bytes.
pub const MAX_JSON_BODY: usize = 64 * 1024;

pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/api/cluster", get(cluster))
        .route("/api/cluster/members/{id}", axum::routing::delete(remove_member))
        .route("/api/cluster/rebalance", axum::routing::post(rebalance))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/skill-groups", get(list_groups))
        .route("/api/skill-groups/{id}", put(put_group))
        .route("/api/operators", get(list_operators))
        .route("/api/operators/{id}", put(put_operator))
        .route("/api/channels", get(list_channels))
        .route("/api/channels/{id}", put(put_channel))
        .route("/api/channels/{id}/adapter", get(crate::channels::get_adapter).put(crate::channels::put_adapter).delete(crate::channels::delete_adapter))
        .route("/api/channels/{id}/test", post(crate::channels::test_message))
        .route("/api/channels/{id}/bot", get(crate::channels::get_bot).put(crate::channels::put_bot).delete(crate::channels::delete_bot))
        .route("/api/bot/{channel}/messages", post(crate::channels::bot_message))
        .route("/api/bot/{channel}/handoff", post(crate::channels::bot_handoff))
        .route("/api/bot/{channel}/close", post(crate::channels::bot_close))
        .route("/api/channels/{id}/identity", get(crate::channels::get_identity).put(crate::channels::put_identity).delete(crate::channels::delete_identity))
        .route("/api/channel-api/{channel}/messages", post(crate::channels::api_inbound))
        .route("/api/channel-api/{channel}/statuses", post(crate::channels::api_status))
        .route("/api/channel-api/{channel}/files/{id}", get(crate::channels::api_file))
        .route("/api/deliveries", get(crate::channels::dead_letters))
        .route("/api/deliveries/{conversation}/{seq}/retry", post(crate::channels::retry))
        .route("/api/users", get(list_users))
        .route("/api/users/{login}", put(put_user))
        .route("/api/users/{login}/end-sessions", post(end_sessions))
        .route("/api/queues", get(queues))
        .route("/api/conversations/{id}", get(conversation))
        .route("/api/conversations/{id}/decisions", get(decisions))
        .route("/api/chaos/crash-actor", post(crash_actor))
        .route("/api/chaos/purge", post(purge_drill))
        .route("/api/conversations/{id}/reassign", post(reassign))
        .route("/api/conversations/{id}/notes", post(crate::desk::add_note))
        .route("/api/conversations/{id}/earlier", get(crate::desk::earlier))
        .route("/api/my/conversations", get(crate::desk::my_conversations))
        .route("/api/kpis", get(crate::desk::kpis))
        .route("/api/pause-reasons", get(crate::desk::pause_reasons).put(crate::desk::put_pause_reasons))
        .route("/api/pauses", get(crate::desk::pauses))
        .route("/api/emergencies", get(crate::desk::emergencies).put(crate::desk::put_emergency))
        .route("/api/audit", get(crate::desk::audit))
        .route("/api/access", get(crate::desk::access))
        .route("/api/routing/preview", post(crate::desk::routing_preview))
        .route("/api/routing/weights", get(crate::rules::weights).put(crate::rules::put_weights))
        .route("/api/access/rules", put(crate::desk::put_access_rule))
        .route("/api/templates", get(list_templates))
        .route("/api/templates/{id}", put(put_template).delete(delete_template))
        .route("/api/templates/{id}/favourite", put(set_favourite))
        .route("/api/attachments", post(crate::attachments::staff_upload))
        .route("/api/attachments/{id}", get(crate::attachments::staff_download))
        // JSON bodies; attachments stream their bodies under their own limit.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        // A handler that takes the raw body (the Channel and Bot APIs) gets the
        // framework's plain-text 413 over the limit: answered as `too_large` instead.
        .layer(axum::middleware::from_fn(crate::json_too_large))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let body = gw.metrics.render(&gw.backend.metrics());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The node's view of its Raft group: leader, term, members, what it applied. Served
/// unauthenticated on the private listener, like `/metrics`, for scripts and probes.
async fn cluster(State(gw): State<Arc<Gateway>>) -> Response {
    Json(gw.backend.cluster()).into_response()
}

/// Removes a node from the cluster (admin only): the group's leader commits the new
/// membership; the removed node can then be stopped for good.
async fn remove_member(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<u64>) -> Result<Response, GatewayError> {
    staff.require(Role::Admin)?;
    if let Some(why) = gw.backend.removal_refused(id) {
        return Err(GatewayError::Invalid(why));
    }
    // Recorded first (from routing rules 19), so that once it is out no certificate of
    // its brings it back: a node removed is refused by every group it asks to join. A
    // group still on older rules refuses the record, and the removal goes on as before.
    match gw.submit(Command::ForgetNode { id }).await {
        Ok(_) => {}
        Err(switchboard_actors::Error::Invalid(why)) if why.contains("from routing rules 19") => {}
        Err(e) => return Err(e.into()),
    }
    match gw.backend.remove_member(id).await {
        Ok(()) => Ok(Json(gw.backend.cluster()).into_response()),
        // No leader made it in time: the cluster may say yes later (503).
        Err(why) if why.starts_with("no leader") => Err(GatewayError::Busy("no leader could make the change; try again")),
        Err(why) => Err(GatewayError::Invalid(why)),
    }
}

/// Balances the cluster's placement now (admin only): answers the steps taken and the
/// cluster as it then is.
async fn rebalance(State(gw): State<Arc<Gateway>>, staff: Staff) -> Result<Response, GatewayError> {
    staff.require(Role::Admin)?;
    match gw.backend.rebalance().await {
        Ok(steps) => {
            let mut status = gw.backend.cluster();
            status["steps"] = serde_json::json!(steps);
            Ok(Json(status).into_response())
        }
        Err(why) if why.starts_with("no leader") => Err(GatewayError::Busy("no leader could make the change; try again")),
        Err(why) => Err(GatewayError::Invalid(why)),
    }
}

/// An authenticated staff member, from `Authorization: Bearer <token>`.
pub(crate) struct Staff {
    pub(crate) login: String,
    pub(crate) role: Role,
    pub(crate) operator: Option<OperatorId>,
}

impl Staff {
    pub(crate) fn require(&self, role: Role) -> Result<(), GatewayError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(GatewayError::Forbidden("your role does not allow this"))
        }
    }
}

/// Why a staff request is refused on a member out of touch with the directory's group.
pub(crate) const OUT_OF_TOUCH: &str = "this member cannot reach the cluster now, so it cannot tell whether your session is still valid; try again, or another member";

impl FromRequestParts<Arc<Gateway>> for Staff {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, Self::Rejection> {
        let token = crate::bearer_token(&parts.headers).ok_or_else(|| {
            gw.metrics.auth_failures.fetch_add(1, Relaxed);
            GatewayError::Unauthorized("bearer token required")
        })?;
        let verified = gw.tokens.verify(token);
        if matches!(verified, Ok(Subject::Staff { .. })) && !gw.staff_in_touch().await {
            return Err(GatewayError::Unavailable(OUT_OF_TOUCH));
        }
        match verified {
            Ok(Subject::Staff { login, role, operator, epoch }) if gw.staff_current(&login, role, operator.as_ref(), epoch) => {
                Ok(Staff { login, role, operator })
            }
            Ok(Subject::Staff { .. }) => {
                gw.metrics.auth_failures.fetch_add(1, Relaxed);
                Err(GatewayError::Unauthorized("this login's sessions ended or its role changed; log in again"))
            }
            Ok(Subject::Client { .. } | Subject::Visitor { .. }) => {
                gw.metrics.auth_failures.fetch_add(1, Relaxed);
                Err(GatewayError::Forbidden("client tokens are for the public listener"))
            }
            Err(e) => {
                gw.metrics.auth_failures.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }
}

/// Staff of at least a role (`MIN`: 1 supervisor, 2 admin), checked before the request's
/// body is read: a caller without the role gets 403 whatever body it sent, as the docs
/// say, not 400 for a body the route would have refused anyway.
pub(crate) struct StaffAt<const MIN: u8>(pub(crate) Staff);

/// A supervisor or an admin ([`StaffAt`]).
pub(crate) type SupervisorStaff = StaffAt<1>;
/// An admin ([`StaffAt`]).
pub(crate) type AdminStaff = StaffAt<2>;

impl<const MIN: u8> FromRequestParts<Arc<Gateway>> for StaffAt<MIN> {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, Self::Rejection> {
        let staff = Staff::from_request_parts(parts, gw).await?;
        staff.require(match MIN {
            2 => Role::Admin,
            1 => Role::Supervisor,
            _ => Role::Operator,
        })?;
        Ok(StaffAt(staff))
    }
}

/// A request body read whole, within its route's `DefaultBodyLimit`, into one buffer
/// that is never larger than that limit ([`switchboard_adapters::http::read_whole`]):
/// axum's `Bytes` would keep a handle of 32 bytes for every piece the sender cut the
/// body into, so 64 KiB sent as one-byte chunks would hold about 2.4 MiB. Refused as
/// axum refuses: `413` in plain text past the limit (the routes' middleware answers it
/// in the API's shape), `400` when the body breaks off.
pub(crate) struct Whole(pub(crate) bytes::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Whole {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, Self::Rejection> {
        use axum::RequestExt;
        use switchboard_adapters::http::{read_whole, WholeError};
        match read_whole(req.into_limited_body(), usize::MAX).await {
            Ok(bytes) => Ok(Whole(bytes)),
            Err(WholeError::Body(e)) if over_limit(&e) => Err((StatusCode::PAYLOAD_TOO_LARGE, "Failed to buffer the request body: length limit exceeded").into_response()),
            Err(WholeError::Body(e)) => Err((StatusCode::BAD_REQUEST, format!("Failed to buffer the request body: {e}")).into_response()),
            Err(WholeError::TooLong) => Err((StatusCode::PAYLOAD_TOO_LARGE, "Failed to buffer the request body: length limit exceeded").into_response()),
        }
    }
}

/// Whether a body's error is its length limit's.
fn over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether a request says its body is JSON as axum's `Json` takes it: `application/json`
/// or another `application/…+json` type, with any parameters.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else { return false };
    let token = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
    kind == "application" && token(subtype) && (subtype == "json" || subtype.ends_with("+json"))
}

/// JSON bodies with a clear 400 on malformed input.
pub(crate) struct Body<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<Arc<Gateway>> for Body<T> {
    type Rejection = GatewayError;

    async fn from_request(req: axum::extract::Request, gw: &Arc<Gateway>) -> Result<Self, Self::Rejection> {
        // The content type is checked before the body is read (docs/workstation-api.md);
        // then the body is read whole (see `Whole`) and parsed by axum's `Json` from that
        // one buffer, whose messages stay as they are.
        if !json_content_type(req.headers()) {
            return Err(GatewayError::BadRequest("Expected request with `Content-Type: application/json`".into()));
        }
        let (parts, body) = req.into_parts();
        let whole = match Whole::from_request(axum::extract::Request::from_parts(parts.clone(), body), gw).await {
            Ok(Whole(bytes)) => bytes,
            Err(refused) if refused.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(GatewayError::BodyTooLarge(MAX_JSON_BODY)),
            Err(_) => return Err(GatewayError::BadRequest("the request body broke off before its end".into())),
        };
        let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(whole));
        match Json::<T>::from_request(req, gw).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(GatewayError::BodyTooLarge(MAX_JSON_BODY)),
            Err(e) => Err(GatewayError::BadRequest(e.body_text())),
        }
    }
}

/// Query strings with a clear 400 in the error body on malformed input.
pub(crate) struct Params<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned> FromRequestParts<Arc<Gateway>> for Params<T> {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, gw).await {
            Ok(axum::extract::Query(v)) => Ok(Params(v)),
            Err(e) => Err(GatewayError::BadRequest(e.body_text())),
        }
    }
}

#[derive(Deserialize)]
struct LoginRequest {
    login: String,
    password: String,
}

/// The longest login name and password a login takes (longer ones are refused 400
/// before anything is read); a user is stored only within them, so it can log in.
const MAX_LOGIN_BYTES: usize = 200;
const MAX_PASSWORD_BYTES: usize = 1024;

async fn login(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Body(req): Body<LoginRequest>,
) -> Result<Json<Value>, GatewayError> {
    if req.login.len() > MAX_LOGIN_BYTES || req.password.len() > MAX_PASSWORD_BYTES {
        return Err(GatewayError::BadRequest("login or password too long".into()));
    }
    // Counted from here, before the password is checked.
    let attempt = gw.throttle.begin(&req.login, crate::budget::client_address(peer.ip()))?;
    // On every node alike: a user just created, or a password just changed, through
    // another member counts here at once. A node that cannot confirm it has the latest
    // logins (no leader of the directory answers) signs nobody in: an old password, or
    // a login deleted elsewhere, would still work on it.
    let asked = std::time::Instant::now();
    if let Err(e) = gw.backend.directory_barrier().await {
        attempt.unchecked();
        return Err(GatewayError::Core(switchboard_actors::Error::Unreachable(format!("the logins cannot be confirmed current: {e}"))));
    }
    // The token it gives is then taken at once, without another barrier.
    gw.directory_confirmed_at(asked);
    // The user and its session epoch are read together, before the password is checked:
    // a password changed (or the sessions ended) while the check runs moves the epoch
    // past the one the token then carries, so the token is refused, as any token issued
    // before the change is.
    let (user, epoch) = {
        let shard = gw.backend.directory_shard();
        let state = shard.read();
        (state.users.get(&req.login).cloned(), state.session_epochs.get(&req.login).copied().unwrap_or(0))
    };
    // Verify against a dummy hash when the login is unknown, so timing does not tell
    // (made once, in the password workers, as any hashing: never on the runtime).
    let phc = user.as_ref().map(|u| u.password_hash.clone());
    let password = req.password.clone();
    let check = move || match phc {
        Some(phc) => verify_password(&password, &phc),
        None => {
            // No whatever the password: the check is made only to take its time.
            let _ = dummy_hash().map(|phc| verify_password(&password, &phc));
            false
        }
    };
    let ok = match gw.password_work(check).await {
        Ok(ok) => ok,
        Err(e) => {
            attempt.unchecked();
            return Err(e);
        }
    };
    let user = match (ok, user) {
        (true, Some(user)) => user,
        _ => {
            drop(attempt);
            gw.metrics.auth_failures.fetch_add(1, Relaxed);
            return Err(GatewayError::Unauthorized("wrong login or password"));
        }
    };
    attempt.succeeded();
    let subject = Subject::Staff { login: user.login.clone(), role: user.role, operator: user.operator.clone(), epoch };
    let token = gw.tokens.issue(subject, STAFF_TOKEN_TTL);
    Ok(Json(json!({
        "token": token,
        "login": user.login,
        "role": user.role,
        "operator": user.operator,
        "expires_in": STAFF_TOKEN_TTL.as_secs(),
    })))
}

/// A hash of a password nobody knows, made once: unknown logins are checked against it
/// so that a wrong login takes as long as a wrong password.
fn dummy_hash() -> Result<String, GatewayError> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(hash) = DUMMY.get() {
        return Ok(hash.clone());
    }
    let hash = hash_password(&format!("{:?}", std::time::SystemTime::now()))?;
    Ok(DUMMY.get_or_init(|| hash).clone())
}

/// `POST /api/logout`: ends every session of the caller's login (204); its tokens stop
/// working and its sockets close with 4001.
async fn logout(State(gw): State<Arc<Gateway>>, staff: Staff) -> Result<StatusCode, GatewayError> {
    gw.submit(Command::EndSessions { login: staff.login }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/users/{login}/end-sessions` (admin): the same for another login.
async fn end_sessions(State(gw): State<Arc<Gateway>>, staff: Staff, Path(login): Path<String>) -> Result<StatusCode, GatewayError> {
    staff.require(Role::Admin)?;
    gw.submit(Command::EndSessions { login }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(staff: Staff) -> Json<Value> {
    Json(json!({"login": staff.login, "role": staff.role, "operator": staff.operator}))
}

async fn list_groups(State(gw): State<Arc<Gateway>>, _staff: Staff) -> Json<Value> {
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    let groups: Vec<Value> = state.groups.values().map(|g| group_view(&state, &g.config)).collect();
    Json(json!({ "skill_groups": groups }))
}

/// A group's configuration with its routing settings (rules 5).
fn group_view(state: &switchboard_actors::state::ShardState, config: &SkillGroupConfig) -> Value {
    let mut view = json!(config);
    view["routing"] = routing_json(&state.group_routing.get(&config.id).cloned().unwrap_or_default());
    view["steps"] = json!(state.group_steps.get(&config.id).map(|steps| steps.iter().map(crate::rules::step_json).collect::<Vec<_>>()).unwrap_or_default());
    view["hours"] = state.group_hours.get(&config.id).map_or(Value::Null, |h| crate::rules::hours_json(h, switchboard_actors::actors::now_ms()));
    view
}

fn routing_json(r: &GroupRouting) -> Value {
    json!({
        "attribute_priorities": r.attribute_priorities, "ageing_ms": r.ageing_ms, "wrap_up_ms": r.wrap_up_ms, "sticky_ms": r.sticky_ms,
        "inactivity_remind_ms": r.inactivity_remind_ms, "inactivity_close_ms": r.inactivity_close_ms, "inactivity_message": r.inactivity_message,
        "required_skills": r.required_skills.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(), "skill_rules": r.skill_rules,
    })
}

#[derive(Deserialize)]
struct RoutingBody {
    #[serde(default)]
    attribute_priorities: Vec<AttributePriority>,
    #[serde(default)]
    ageing_ms: u64,
    #[serde(default)]
    wrap_up_ms: u64,
    #[serde(default)]
    sticky_ms: u64,
    #[serde(default)]
    inactivity_remind_ms: u64,
    #[serde(default)]
    inactivity_close_ms: u64,
    #[serde(default)]
    inactivity_message: String,
    #[serde(default)]
    required_skills: std::collections::BTreeMap<String, u8>,
    #[serde(default)]
    skill_rules: Vec<SkillRule>,
}

#[derive(Deserialize)]
struct GroupBody {
    /// Queue order and pacing; absent leaves them as they are.
    #[serde(default)]
    routing: Option<RoutingBody>,
    /// Routing steps (rules 6); absent leaves them, `[]` clears them.
    #[serde(default)]
    steps: Option<Vec<crate::rules::StepBody>>,
    /// Opening hours (rules 6); absent leaves them, `null` removes them.
    #[serde(default, deserialize_with = "crate::rules::present_hours")]
    hours: Option<Option<crate::rules::HoursBody>>,
    name: String,
    /// Absent: the group's as it is, or `longest_idle` for a new group.
    #[serde(default)]
    policy: Option<Policy>,
    /// Absent: the group's as it is, or 30,000 for a new group.
    #[serde(default)]
    offer_timeout_ms: Option<u64>,
    /// Absent: the group's as it is, or 60,000 for a new group.
    #[serde(default)]
    sla_ms: Option<u64>,
}

fn default_sla() -> u64 {
    60_000
}

fn default_policy() -> Policy {
    Policy::LongestIdle
}

fn default_offer_timeout() -> u64 {
    30_000
}

async fn put_group(
    State(gw): State<Arc<Gateway>>,
    StaffAt(staff): AdminStaff,
    Path(id): Path<String>,
    Body(body): Body<GroupBody>,
) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    // Checked before anything is written: a refused routing leaves the group as it was.
    let routing = body.routing.map(|r| GroupRouting {
        attribute_priorities: r.attribute_priorities,
        ageing_ms: r.ageing_ms,
        wrap_up_ms: r.wrap_up_ms,
        sticky_ms: r.sticky_ms,
        inactivity_remind_ms: r.inactivity_remind_ms,
        inactivity_close_ms: r.inactivity_close_ms,
        inactivity_message: r.inactivity_message,
        required_skills: r.required_skills.into_iter().collect(),
        skill_rules: r.skill_rules,
    });
    if let Some(r) = &routing {
        switchboard_actors::core::check_routing(r)?;
    }
    let group_id = SkillGroupId::new(id.clone());
    let steps = body.steps.map(|steps| steps.into_iter().map(crate::rules::StepBody::into_step).collect::<Vec<_>>());
    let hours = match body.hours {
        Some(Some(h)) => Some(Some(h.into_hours()?)),
        Some(None) => Some(None),
        None => None,
    };
    // What is left out keeps the group's value as the cluster has it, not as this node
    // last applied it: a PUT made a moment ago through another node counts.
    gw.backend.directory_barrier().await.map_err(|e| GatewayError::Core(switchboard_actors::Error::Unreachable(e)))?;
    let (steps, hours, before) = {
        let shard = gw.backend.directory_shard();
        let state = shard.read();
        let before = state.groups.get(&group_id).map(|g| g.config.clone());
        // What is as it was is not written again (the admin form sends everything).
        let steps = steps.filter(|s| state.group_steps.get(&group_id).map_or(!s.is_empty(), |now| now != s));
        let hours = hours.filter(|h| h.as_ref() != state.group_hours.get(&group_id));
        if (steps.is_some() || hours.is_some()) && state.rules < 6 {
            return Err(switchboard_actors::Error::Invalid(format!("steps and hours need routing rules 6; the cluster still decides with {}", state.rules)).into());
        }
        // The group itself may be new: it exists by the time these are applied.
        let exists = |g: &SkillGroupId| *g == group_id || state.groups.contains_key(g);
        if let Some(steps) = &steps {
            switchboard_actors::core::check_steps(steps, &exists)?;
        }
        if let Some(Some(h)) = &hours {
            switchboard_actors::hours::check(h, &group_id, &|g| state.groups.contains_key(g))?;
        }
        (steps, hours, before)
    };
    // A field left out keeps the group's value (as `routing`, `steps` and `hours` do);
    // a new group takes the defaults.
    let config = SkillGroupConfig {
        id: SkillGroupId::new(id),
        name: body.name,
        policy: body.policy.or_else(|| before.as_ref().map(|b| b.policy)).unwrap_or_else(default_policy),
        offer_timeout_ms: body.offer_timeout_ms.or_else(|| before.as_ref().map(|b| b.offer_timeout_ms)).unwrap_or_else(default_offer_timeout),
        sla_ms: body.sla_ms.or_else(|| before.as_ref().map(|b| b.sla_ms)).unwrap_or_else(default_sla),
    };
    gw.submit(Command::UpsertSkillGroup(config.clone())).await?;
    if let Some(routing) = routing {
        gw.submit(Command::SetGroupRouting { group: config.id.clone(), routing }).await?;
    }
    if let Some(steps) = steps {
        gw.submit(Command::SetGroupSteps { group: config.id.clone(), steps }).await?;
    }
    if let Some(hours) = hours {
        gw.submit(Command::SetGroupHours { group: config.id.clone(), hours }).await?;
    }
    let shard = gw.backend.directory_shard();
    let view = group_view(&shard.read(), &config);
    Ok(Json(view))
}

async fn list_operators(State(gw): State<Arc<Gateway>>, _staff: Staff) -> Json<Value> {
    let shard = gw.backend.shard();
    let state = shard.read();
    let operators: Vec<Value> = state
        .operators
        .values()
        .map(|o| {
            json!({
                "id": o.config.id, "name": o.config.name, "capacity": o.config.capacity, "groups": o.config.groups,
                "presence": frames::presence_str(o.presence), "presence_since": o.presence_since.0,
                "presence_reason": state.presence_reasons.get(&o.config.id),
                "load": state.load_of(o), "active": o.active.len(), "offers": o.offers.len(),
                "channel_limits": state.channel_limits.get(&o.config.id).map(|l| l.per_kind.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()).unwrap_or_default(),
                "channels": state.channel_limits.get(&o.config.id).map(|l| l.only.clone()).unwrap_or_default(),
                "skills": state.operator_skills.get(&o.config.id).cloned().unwrap_or_default(),
            })
        })
        .collect();
    Json(json!({ "operators": operators }))
}

#[derive(Deserialize)]
struct OperatorBody {
    name: String,
    capacity: u32,
    groups: Vec<String>,
    /// Per channel kind, at most this many at once (rules 5); absent leaves them.
    #[serde(default)]
    channel_limits: Option<std::collections::BTreeMap<String, u32>>,
    /// The channel kinds the operator takes (empty: all); absent leaves them.
    #[serde(default)]
    channels: Option<Vec<String>>,
    /// Skills and levels (1-5); absent leaves them.
    #[serde(default)]
    skills: Option<std::collections::BTreeMap<String, u8>>,
}

async fn put_operator(
    State(gw): State<Arc<Gateway>>,
    StaffAt(staff): AdminStaff,
    Path(id): Path<String>,
    Body(body): Body<OperatorBody>,
) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    if body.capacity == 0 || body.capacity > 100 {
        return Err(GatewayError::BadRequest("capacity must be 1 to 100".into()));
    }
    // A file's record names who uploaded it: `client` is the customer. (One made before
    // this check may still be edited.)
    if id == "client" && !gw.backend.directory_shard().read().operators.contains_key(&OperatorId::new("client")) {
        return Err(GatewayError::BadRequest("an operator cannot be called \"client\": it names the customer in attachment records".into()));
    }
    let config = OperatorConfig {
        id: OperatorId::new(id),
        name: body.name,
        capacity: body.capacity,
        groups: body.groups.into_iter().map(SkillGroupId::new).collect(),
    };
    let limits = if body.channel_limits.is_some() || body.channels.is_some() {
        let current = gw.backend.directory_shard().read().channel_limits.get(&config.id).cloned().unwrap_or_default();
        let limits = ChannelLimits {
            per_kind: body.channel_limits.map_or(current.per_kind, |m| m.into_iter().collect()),
            only: body.channels.unwrap_or(current.only),
        };
        if limits.per_kind.len() > 20 || limits.only.len() > 20 || limits.per_kind.iter().map(|(k, _)| k).chain(&limits.only).any(|k| k.is_empty() || k.len() > 32) {
            return Err(GatewayError::BadRequest("at most 20 channel kinds of 1 to 32 bytes each".into()));
        }
        Some(limits)
    } else {
        None
    };
    if let Some(skills) = &body.skills {
        if skills.len() > 20 || skills.iter().any(|(k, l)| k.is_empty() || k.len() > 32 || !(1..=5).contains(l)) {
            return Err(GatewayError::BadRequest("at most 20 skills, names of 1 to 32 bytes, levels 1 to 5".into()));
        }
    }
    gw.submit(Command::UpsertOperator(config.clone())).await?;
    if let Some(limits) = limits {
        gw.submit(Command::SetOperatorChannels { operator: config.id.clone(), limits }).await?;
    }
    if let Some(skills) = body.skills {
        gw.submit(Command::SetOperatorSkills { operator: config.id.clone(), skills: skills.into_iter().collect() }).await?;
    }
    let mut view = json!(config);
    let limits = gw.backend.directory_shard().read().channel_limits.get(&config.id).cloned().unwrap_or_default();
    view["channel_limits"] = json!(limits.per_kind.iter().cloned().collect::<std::collections::BTreeMap<_, _>>());
    view["channels"] = json!(limits.only);
    view["skills"] = json!(gw.backend.directory_shard().read().operator_skills.get(&config.id).cloned().unwrap_or_default());
    Ok(Json(view))
}

/// A channel as REST shows it: its configuration and the groups its widget offers.
fn channel_view(state: &switchboard_actors::state::ShardState, config: &ChannelConfig) -> Value {
    let mut view = json!(config);
    view["public_groups"] = json!(state.channel_public_groups.get(&config.id).cloned().unwrap_or_default());
    view["retention_days"] = json!(state.channel_retention.get(&config.id).copied().unwrap_or(0));
    view["priority"] = json!(state.channel_priority.get(&config.id).copied().unwrap_or(0));
    let access = state.channel_access.get(&config.id).cloned().unwrap_or_default();
    view["allow_only"] = json!(access.allow_only);
    view["blocked_message"] = json!(access.message);
    view["adapter"] = json!(state.channel_adapters.get(&config.id).map(|a| a.kind()));
    view
}

fn channel_json(gw: &Gateway, config: &ChannelConfig) -> Value {
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    channel_view(&state, config)
}

async fn list_channels(State(gw): State<Arc<Gateway>>, _staff: Staff) -> Json<Value> {
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    let channels: Vec<Value> = state.channels.values().map(|c| channel_view(&state, c)).collect();
    Json(json!({ "channels": channels }))
}

#[derive(Deserialize)]
struct ChannelBody {
    kind: String,
    name: String,
    default_group: String,
    /// Groups the channel's public widget may start in besides the default; absent
    /// leaves them as they are.
    #[serde(default)]
    public_groups: Option<Vec<String>>,
    /// Days closed conversations are kept, then deleted (0: kept); absent leaves it.
    #[serde(default)]
    retention_days: Option<u32>,
    /// The priority the channel's conversations start at (0-100); absent leaves it.
    #[serde(default)]
    priority: Option<u32>,
    /// Only the allow list may start here; absent leaves it.
    #[serde(default)]
    allow_only: Option<bool>,
    /// What a refused customer is told (empty: the default); absent leaves it.
    #[serde(default)]
    blocked_message: Option<String>,
}

/// The channel id no new channel may take: the first part of verified customers'
/// visitor ids (`crate::identity`).
const RESERVED_CHANNEL_ID: &str = "customer";

async fn put_channel(
    State(gw): State<Arc<Gateway>>,
    StaffAt(staff): AdminStaff,
    Path(id): Path<String>,
    Body(body): Body<ChannelBody>,
) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    // Checked before anything is written, so a refused field changes nothing.
    if body.priority.is_some_and(|p| p > switchboard_actors::core::MAX_PRIORITY) {
        return Err(GatewayError::Core(switchboard_actors::Error::Invalid(format!("a priority is 0 to {}", switchboard_actors::core::MAX_PRIORITY))));
    }
    if let Some(m) = &body.blocked_message {
        if m.chars().count() > switchboard_actors::core::MAX_TEXT_CHARS {
            return Err(GatewayError::Core(switchboard_actors::Error::TooLong { limit: switchboard_actors::core::MAX_TEXT_CHARS, actual: m.chars().count() }));
        }
    }
    // Verified web customers are the visitors `customer:<key id>:<sub>`; a channel's
    // senders are `<channel>:<sender>`, so a new channel named `customer` would let its
    // senders (a Channel API sender may hold `:`) pass for them. One made before stays.
    if id == RESERVED_CHANNEL_ID && !gw.backend.directory_shard().read().channels.contains_key(&ChannelId::new(id.as_str())) {
        return Err(GatewayError::Core(switchboard_actors::Error::Invalid(format!("the channel id {RESERVED_CHANNEL_ID} is reserved: verified customers' visitor ids begin with it"))));
    }
    let config = ChannelConfig { id: ChannelId::new(id), kind: body.kind, name: body.name, default_group: SkillGroupId::new(body.default_group) };
    gw.submit(Command::UpsertChannel(config.clone())).await?;
    if let Some(groups) = body.public_groups {
        let groups = groups.into_iter().map(SkillGroupId::new).collect();
        gw.submit(Command::SetChannelPublicGroups { channel: config.id.clone(), groups }).await?;
    }
    if let Some(days) = body.retention_days {
        gw.submit(Command::SetChannelRetention { channel: config.id.clone(), days }).await?;
    }
    if let Some(priority) = body.priority {
        gw.submit(Command::SetChannelPriority { channel: config.id.clone(), priority }).await?;
    }
    if body.allow_only.is_some() || body.blocked_message.is_some() {
        let current = gw.backend.directory_shard().read().channel_access.get(&config.id).cloned().unwrap_or_default();
        gw.submit(Command::SetChannelAccess {
            channel: config.id.clone(),
            allow_only: body.allow_only.unwrap_or(current.allow_only),
            message: body.blocked_message.unwrap_or(current.message),
            by: staff.login.clone(),
        })
        .await?;
    }
    Ok(Json(channel_json(&gw, &config)))
}

#[derive(Deserialize)]
struct UserBody {
    #[serde(default)]
    password: Option<String>,
    role: Role,
    #[serde(default)]
    operator: Option<String>,
}

async fn put_user(
    State(gw): State<Arc<Gateway>>,
    StaffAt(staff): AdminStaff,
    Path(login): Path<String>,
    Body(body): Body<UserBody>,
) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    if login.len() > MAX_LOGIN_BYTES {
        return Err(GatewayError::BadRequest(format!("a login is at most {MAX_LOGIN_BYTES} bytes, or it could never log in")));
    }
    let operator = body.operator.filter(|op| !op.is_empty()).map(OperatorId::new);
    // Without a password: an edit of an existing user that keeps theirs.
    let Some(password) = body.password.filter(|p| !p.is_empty()) else {
        if !gw.backend.directory_shard().read().users.contains_key(&login) {
            return Err(GatewayError::BadRequest(format!("user {login} does not exist: a new user needs a password")));
        }
        gw.submit(Command::UpdateUser { login: login.clone(), role: body.role, operator }).await?;
        return Ok(Json(json!({"login": login, "role": body.role})));
    };
    if password.chars().count() < 10 {
        return Err(GatewayError::BadRequest("password must be at least 10 characters".into()));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(GatewayError::BadRequest(format!("a password is at most {MAX_PASSWORD_BYTES} bytes, or it could never log in")));
    }
    let password_hash = gw.password_work(move || hash_password(&password)).await??;
    let user = UserRecord { login: login.clone(), password_hash, role: body.role, operator };
    gw.submit(Command::UpsertUser(user)).await?;
    Ok(Json(json!({"login": login, "role": body.role})))
}

async fn queues(State(gw): State<Arc<Gateway>>, staff: Staff) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let shard = gw.backend.shard();
    let state = shard.read();
    let floor = crate::supervisor_ws::floor(&state, switchboard_actors::actors::now_ms());
    Ok(Json(json!({ "queues": floor["queues"] })))
}

async fn list_users(State(gw): State<Arc<Gateway>>, staff: Staff) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    let users: Vec<Value> = state.users.values().map(|u| json!({"login": u.login, "role": u.role, "operator": u.operator})).collect();
    Ok(Json(json!({ "users": users })))
}

/// The conversation `staff` asks for, open or closed, if they may read it.
pub(crate) async fn readable(gw: &Gateway, staff: &Staff, id: ConversationId) -> Result<switchboard_actors::state::Conversation, GatewayError> {
    let conv = gw.backend.conversation_reads(id).conversation(id).await?.ok_or_else(|| GatewayError::NotFound(format!("conversation {}", id.0)))?;
    // Offers and the operator's other conversations are the routing shard's to say.
    check_read(staff, &gw.backend.shard().read(), &conv)?;
    Ok(conv)
}

pub(crate) fn check_read(staff: &Staff, state: &switchboard_actors::state::ShardState, conv: &switchboard_actors::state::Conversation) -> Result<(), GatewayError> {
    if staff.role >= Role::Supervisor {
        return Ok(());
    }
    match &staff.operator {
        Some(op) if may_read(state, op, conv) => Ok(()),
        _ => Err(GatewayError::Forbidden("not your conversation")),
    }
}

pub(crate) fn conversation_id(raw: &str) -> Result<ConversationId, GatewayError> {
    raw.parse().map(ConversationId).map_err(|_| GatewayError::BadRequest(format!("conversation id {raw:?} is not a number")))
}

/// Whole histories a process builds at once for operators' `history` frames (each up to
/// a few MiB: routing rules 14 and 22 bound a conversation's text), held only while
/// built; the frame then waits in its socket's own budget.
pub(crate) const HISTORY_BUILDS: usize = 8;
static HISTORY_BUILD_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HISTORY_BUILDS);
/// Whole histories a process sends at once over REST (`GET /api/conversations/{id}`),
/// each slot held until the body is handed to the connection, and how many of them one
/// login may hold: a login reading slowly cannot take them all.
pub(crate) const REST_HISTORIES: usize = 8;
pub(crate) const REST_HISTORIES_PER_LOGIN: usize = 2;
static REST_HISTORY_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(REST_HISTORIES);
static REST_HISTORIES_OF: std::sync::Mutex<Vec<(String, usize)>> = std::sync::Mutex::new(Vec::new());
/// How long a whole-history read waits for a slot before it is answered `unavailable`.
const WHOLE_HISTORY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A slot to build an operator's `history` frame.
pub(crate) async fn history_build_slot() -> Result<tokio::sync::SemaphorePermit<'static>, GatewayError> {
    match tokio::time::timeout(WHOLE_HISTORY_WAIT, HISTORY_BUILD_SLOTS.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(GatewayError::Busy("other whole conversation histories are being built; try again in a moment")),
    }
}

/// One login's hold on a REST history slot, given back when dropped.
struct LoginHold(String);

impl Drop for LoginHold {
    fn drop(&mut self) {
        let mut held = REST_HISTORIES_OF.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|(login, _)| *login == self.0) {
            held[i].1 -= 1;
            if held[i].1 == 0 {
                held.swap_remove(i);
            }
        }
    }
}

/// A slot to build and send a conversation's whole history over REST for `login`.
async fn rest_history_slot(login: &str) -> Result<(LoginHold, tokio::sync::SemaphorePermit<'static>), GatewayError> {
    let hold = {
        let mut held = REST_HISTORIES_OF.lock().unwrap_or_else(|p| p.into_inner());
        match held.iter().position(|(l, _)| l == login) {
            Some(i) if held[i].1 >= REST_HISTORIES_PER_LOGIN => {
                return Err(GatewayError::Busy("this login is being sent other whole conversation histories; read those first"));
            }
            Some(i) => held[i].1 += 1,
            None => held.push((login.to_owned(), 1)),
        }
        LoginHold(login.to_owned())
    };
    match tokio::time::timeout(WHOLE_HISTORY_WAIT, REST_HISTORY_SLOTS.acquire()).await {
        Ok(Ok(permit)) => Ok((hold, permit)),
        _ => Err(GatewayError::Busy("other whole conversation histories are being sent; try again in a moment")),
    }
}

/// A response body that keeps its whole-history slot until the body has been handed to
/// the connection, in 64 KiB pieces: a reader that reads slowly keeps the slot, not a
/// second copy in another one.
struct HeldBody {
    bytes: bytes::Bytes,
    _slot: (LoginHold, tokio::sync::SemaphorePermit<'static>),
}

impl hyper::body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.bytes.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.bytes.len().min(64 * 1024);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.bytes.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.bytes.len() as u64)
    }
}

async fn conversation(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Response, GatewayError> {
    let id = conversation_id(&id)?;
    let conv = readable(&gw, &staff, id).await?;
    let slot = rest_history_slot(&staff.login).await?;
    let shard = gw.backend.conversation_reads(id);
    let history = shard.history(id, 0, conv.last_seq() as usize).await?;
    let deliveries = shard.deliveries_of(id).await?;
    let (earlier, earlier_complete) = earlier(&gw, &staff, &conv).await;
    // Whether it is offered is the routing shard's to say.
    let routed = gw.backend.shard().read().conversations.get(&id).map(|c| c.status.clone());
    let status = match routed.as_ref().unwrap_or(&conv.status) {
        switchboard_actors::state::ConversationStatus::Queued { offer: Some(_), .. } => json!({"state": "offered"}),
        switchboard_actors::state::ConversationStatus::Queued { .. } => json!({"state": "queued"}),
        switchboard_actors::state::ConversationStatus::Assigned { operator } => json!({"state": "assigned", "operator": operator}),
        switchboard_actors::state::ConversationStatus::Closed => json!({"state": "closed"}),
        switchboard_actors::state::ConversationStatus::WithBot => json!({"state": "with_bot"}),
    };
    let body = json!({
        "conversation": id.0,
        "channel": conv.channel,
        "group": conv.group,
        "visitor": {"id": conv.visitor.id, "name": conv.visitor.name, "attributes": conv.visitor.attributes.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()},
        "status": status,
        "created_at": conv.created_at.0,
        "last_seq": conv.last_seq(),
        "client_read_upto": conv.client_read_upto,
        "operator_read_upto": conv.operator_read_upto,
        "history": history.iter().map(|e| frames::history_entry(e, Audience::Staff)).collect::<Vec<_>>(),
        "earlier": earlier,
        "earlier_complete": earlier_complete,
        "deliveries": deliveries.iter().map(|(seq, d)| crate::channels::delivery_json(id, *seq, d)).collect::<Vec<_>>(),
    });
    drop(history);
    let bytes = bytes::Bytes::from(serde_json::to_vec(&body).map_err(|e| GatewayError::Internal(e.to_string()))?);
    drop(body);
    let mut response = Response::new(axum::body::Body::new(HeldBody { bytes, _slot: slot }));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Ok(response)
}

async fn decisions(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Json<Value>, GatewayError> {
    let id = conversation_id(&id)?;
    let conv = readable(&gw, &staff, id).await?;
    // Offers and their decision records are the routing shard's.
    let shard = gw.backend.shard();
    let decided = shard.conversation(id)?.map_or(conv.decisions, |c| c.decisions);
    // The newest ones: a conversation offered again and again has one per offer, and
    // the inspector reads them again at every change.
    let mut records: Vec<Value> = Vec::new();
    for offer in &decided[decided.len().saturating_sub(DECISIONS_SHOWN)..] {
        if let Some(decision) = shard.decision(*offer)? {
            let mut record = json!(decision);
            if let Some(step) = shard.offer_step(*offer)? {
                record["step"] = json!(step);
            }
            records.push(record);
        }
    }
    Ok(Json(json!({"conversation": id.0, "decisions": records, "total": decided.len()})))
}

/// Decision records `GET /api/conversations/{id}/decisions` answers with at most: the
/// newest ones.
pub const DECISIONS_SHOWN: usize = 100;

#[derive(Deserialize)]
struct CrashBody {
    stream: String,
    id: String,
}

/// Chaos drill for SRE teams: an actor panics and its supervisor must restart it from
/// committed state without anyone noticing.
async fn crash_actor(State(gw): State<Arc<Gateway>>, StaffAt(staff): AdminStaff, Body(body): Body<CrashBody>) -> Result<Response, GatewayError> {
    staff.require(Role::Admin)?;
    if !gw.config.chaos_drills {
        return Err(GatewayError::NotFound("chaos drills are off on this node (start it with --enable-chaos-drills)".into()));
    }
    let label = format!("{} {}", body.stream, body.id);
    let key = match body.stream.as_str() {
        "operator" => switchboard_actors::shard::StreamKey::Operator(OperatorId::new(body.id)),
        "group" => switchboard_actors::shard::StreamKey::Group(SkillGroupId::new(body.id)),
        "conversation" => {
            let id = body.id.parse().map_err(|_| GatewayError::BadRequest("conversation id must be a number".into()))?;
            switchboard_actors::shard::StreamKey::Conversation(ConversationId(id))
        }
        _ => return Err(GatewayError::BadRequest("stream must be operator, group or conversation".into())),
    };
    if !gw.backend.crash_actor(key).await? {
        return Err(GatewayError::NotFound(format!("no running actor for {label}")));
    }
    Ok((axum::http::StatusCode::ACCEPTED, Json(json!({"status": "crash requested"}))).into_response())
}

#[derive(Deserialize)]
struct PurgeBody {
    /// Purge as if it were this time (ms since the epoch), to see retention work
    /// without waiting days; now when absent.
    #[serde(default)]
    as_of: Option<u64>,
}

/// Chaos drill: runs the retention purge now (or as of a later time), as the leader's
/// timer does.
async fn purge_drill(State(gw): State<Arc<Gateway>>, StaffAt(staff): AdminStaff, Body(body): Body<PurgeBody>) -> Result<Response, GatewayError> {
    staff.require(Role::Admin)?;
    if !gw.config.chaos_drills {
        return Err(GatewayError::NotFound("chaos drills are off on this node (start it with --enable-chaos-drills)".into()));
    }
    let as_of = body.as_of.map(switchboard_actors::model::Timestamp).unwrap_or_else(switchboard_actors::actors::now_ms);
    gw.submit(Command::PurgeExpired { as_of }).await?;
    Ok(Json(json!({"status": "purged", "as_of": as_of.0})).into_response())
}

/// The client card: the visitor's other conversations, most recent first, at most 20; for an operator,
/// only those they may open themselves (as `GET /api/conversations/{id}/earlier`). With
/// whether every conversation shard answered: one out of reach leaves its conversations
/// out of the card, not the conversation out of the answer.
async fn earlier(gw: &Gateway, staff: &Staff, conv: &switchboard_actors::state::Conversation) -> (Vec<Value>, bool) {
    let Some(visitor) = conv.visitor.id.as_ref() else { return (vec![], true) };
    let (found, failed) = gw.conversations_answered(visitor, 21).await;
    if let Some(e) = &failed {
        tracing::info!(conversation = conv.id.0, error = %e, "the client card lacks the conversations of a shard that did not answer");
    }
    let shard = gw.backend.shard();
    let state = shard.read();
    let cards = found
        .iter()
        .filter(|c| c.id != conv.id)
        .filter(|c| check_read(staff, &state, c).is_ok())
        .take(20)
        .map(|c| {
            let state = match c.status {
                switchboard_actors::state::ConversationStatus::Queued { .. } => "queued",
                switchboard_actors::state::ConversationStatus::Assigned { .. } => "assigned",
                switchboard_actors::state::ConversationStatus::Closed => "closed",
                switchboard_actors::state::ConversationStatus::WithBot => "with_bot",
            };
            json!({"conversation": c.id.0, "created_at": c.created_at.0, "state": state})
        })
        .collect();
    (cards, failed.is_none())
}

#[derive(Deserialize)]
struct ReassignBody {
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    comment: String,
}

async fn reassign(
    State(gw): State<Arc<Gateway>>,
    StaffAt(staff): SupervisorStaff,
    Path(id): Path<String>,
    Body(body): Body<ReassignBody>,
) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Supervisor)?;
    let conversation = conversation_id(&id)?;
    let target = match (body.operator, body.group) {
        (Some(op), None) => TransferTarget::Operator(OperatorId::new(op)),
        (None, Some(group)) => TransferTarget::Group(SkillGroupId::new(group)),
        _ => return Err(GatewayError::BadRequest("give exactly one of operator and group".into())),
    };
    // Into a group, the hand-off into it is the whole reassignment (sent on, it would be
    // refused as already waiting there).
    if take_from_bot_on_a_split_cluster(&gw, &staff, conversation, &target, &body.comment).await? {
        return Ok(Json(json!({"conversation": conversation.0, "status": "reassigned"})));
    }
    gw.submit(Command::Reassign { by: staff.login.clone(), conversation, target, comment: body.comment }).await?;
    Ok(Json(json!({"conversation": conversation.0, "status": "reassigned"})))
}

/// How long a reassignment waits for the routing shard to learn of a conversation just
/// taken from the bot.
const HANDED_OFF_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// On a split cluster the routing shard, which decides a reassignment, never heard of a
/// conversation the bot holds: its conversation shard hands it off first (as the bot
/// would, with the reason `a supervisor took it from the bot`) into its own group, and
/// the reassignment waits until the routing shard has it queued. A cluster of one group
/// decides both in the reassignment (rules 18). Whether the hand-off was the whole
/// reassignment (into a group: the comment goes with it).
async fn take_from_bot_on_a_split_cluster(gw: &Gateway, staff: &Staff, conversation: ConversationId, target: &TransferTarget, comment: &str) -> Result<bool, GatewayError> {
    if gw.backend.shard().read().conversations.contains_key(&conversation) {
        return Ok(false);
    }
    let conv = readable(gw, staff, conversation).await?;
    if conv.status != switchboard_actors::state::ConversationStatus::WithBot {
        return Ok(false);
    }
    let mut context = vec![("by".to_owned(), staff.login.clone())];
    // Into a group, the hand-off into that group is the whole reassignment (the group
    // counts it as entered, as a cluster of one group does); to an operator, it is
    // handed off into its own group first.
    let into = match target {
        TransferTarget::Group(group) => {
            if !gw.backend.shard().read().groups.contains_key(group) {
                return Err(GatewayError::NotFound(format!("skill group {group}")));
            }
            if !comment.is_empty() {
                let limit = switchboard_actors::core::MAX_REASON_CHARS;
                if comment.chars().count() > limit {
                    return Err(switchboard_actors::Error::TooLong { limit, actual: comment.chars().count() }.into());
                }
                context.push(("comment".to_owned(), comment.to_owned()));
            }
            group.clone()
        }
        TransferTarget::Operator(operator) => {
            // Refused before the hand-off when it would be refused after it.
            let routing = gw.backend.shard();
            let state = routing.read();
            let op = state.operators.get(operator).ok_or_else(|| GatewayError::NotFound(format!("operator {operator}")))?;
            if op.presence == switchboard_actors::model::Presence::Offline {
                return Err(switchboard_actors::Error::Unavailable(format!("operator {operator} is offline")).into());
            }
            if !state.has_room(op, &conv.channel) {
                return Err(switchboard_actors::Error::CapacityExceeded(operator.clone()).into());
            }
            conv.group.clone()
        }
    };
    let into_a_group = matches!(target, TransferTarget::Group(_));
    let handoff = Command::Handoff {
        channel: conv.channel.clone(),
        conversation,
        group: Some(into),
        reason: switchboard_actors::core::TAKEN_FROM_BOT.into(),
        context,
    };
    let handed_here = match gw.submit(handoff).await {
        Ok(_) => true,
        // Handed off meanwhile (by the bot, or by a reassignment sent twice): the
        // routing shard has it, or soon will.
        Err(switchboard_actors::Error::Invalid(_)) => {
            let now = gw.backend.conversation_reads(conversation).conversation(conversation).await?;
            if now.is_none_or(|c| c.status == switchboard_actors::state::ConversationStatus::Closed) {
                return Err(switchboard_actors::Error::Closed(conversation).into());
            }
            false
        }
        Err(e) => return Err(e.into()),
    };
    if handed_here && into_a_group {
        return Ok(true);
    }
    // The reassignment that follows is decided by the routing shard, which must know the
    // conversation first (its letter from the conversation shard).
    let until = tokio::time::Instant::now() + HANDED_OFF_WAIT;
    let mut polls = 0u32;
    while !gw.backend.shard().read().conversations.contains_key(&conversation) {
        if tokio::time::Instant::now() >= until {
            return Err(GatewayError::Unavailable("the conversation was taken from the bot but has not reached its queue yet: ask again"));
        }
        polls += 1;
        // Closed meanwhile (the customer left, or routing had it and it was closed
        // there between two looks): it never shows.
        if polls % 25 == 0 {
            let now = gw.backend.conversation_reads(conversation).conversation(conversation).await?;
            if now.is_none_or(|c| c.status == switchboard_actors::state::ConversationStatus::Closed) {
                return Err(switchboard_actors::Error::Closed(conversation).into());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(false)
}

fn template_json(t: &Template, favourites: Option<&std::collections::BTreeSet<String>>) -> Value {
    json!({
        "id": t.id, "title": t.title, "text": t.text, "group": t.group, "owner": t.owner,
        "favourite": favourites.is_some_and(|f| f.contains(&t.id)),
    })
}

async fn list_templates(State(gw): State<Arc<Gateway>>, staff: Staff) -> Json<Value> {
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    let me = staff.operator.as_ref().and_then(|id| state.operators.get(id));
    let templates: Vec<Value> = state
        .templates
        .values()
        .filter(|t| match (&t.group, &t.owner, me) {
            (Some(_), _, _) if staff.role >= Role::Supervisor => true,
            (Some(group), _, Some(op)) => op.config.groups.contains(group),
            (None, Some(owner), Some(op)) => owner == &op.config.id,
            _ => false,
        })
        .map(|t| template_json(t, me.map(|op| &op.favourites)))
        .collect();
    Json(json!({ "templates": templates }))
}

#[derive(Deserialize)]
struct TemplateBody {
    title: String,
    text: String,
    #[serde(default)]
    group: Option<String>,
}

/// Who may change a template: shared ones by supervisors and admins, personal ones by
/// their owner.
fn may_edit(staff: &Staff, template: &Template) -> bool {
    match (&template.group, &template.owner) {
        (Some(_), _) => staff.role >= Role::Supervisor,
        (None, Some(owner)) => staff.operator.as_ref() == Some(owner),
        _ => false,
    }
}

async fn put_template(
    State(gw): State<Arc<Gateway>>,
    staff: Staff,
    Path(id): Path<String>,
    Body(body): Body<TemplateBody>,
) -> Result<Json<Value>, GatewayError> {
    let template = Template {
        id,
        title: body.title,
        text: body.text,
        owner: if body.group.is_some() { None } else { staff.operator.clone() },
        group: body.group.map(SkillGroupId::new),
    };
    if template.group.is_none() && template.owner.is_none() {
        return Err(GatewayError::BadRequest("a personal template needs an operator login; give a group for a shared one".into()));
    }
    let existing = {
        let shard = gw.backend.directory_shard();
        let state = shard.read();
        state.templates.get(&template.id).cloned()
    };
    if !may_edit(&staff, &template) || existing.as_ref().is_some_and(|t| !may_edit(&staff, t)) {
        return Err(GatewayError::Forbidden("you may not change this template"));
    }
    gw.submit(Command::UpsertTemplate(template.clone())).await?;
    Ok(Json(template_json(&template, None)))
}

async fn delete_template(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>) -> Result<Json<Value>, GatewayError> {
    let existing = {
        let shard = gw.backend.directory_shard();
        let state = shard.read();
        state.templates.get(&id).cloned()
    };
    let template = existing.ok_or_else(|| GatewayError::NotFound(format!("template {id}")))?;
    if !may_edit(&staff, &template) {
        return Err(GatewayError::Forbidden("you may not delete this template"));
    }
    gw.submit(Command::DeleteTemplate { id: id.clone() }).await?;
    Ok(Json(json!({"id": id, "status": "deleted"})))
}

#[derive(Deserialize)]
struct FavouriteBody {
    favourite: bool,
}

async fn set_favourite(State(gw): State<Arc<Gateway>>, staff: Staff, Path(id): Path<String>, request: axum::extract::Request) -> Result<Json<Value>, GatewayError> {
    // Who may is checked before the body is read (docs/workstation-api.md).
    let operator = staff.operator.clone().ok_or(GatewayError::Forbidden("favourites belong to operators"))?;
    let Body(body) = <Body<FavouriteBody> as axum::extract::FromRequest<Arc<Gateway>>>::from_request(request, &gw).await?;
    gw.submit(Command::SetFavourite { operator, template: id.clone(), favourite: body.favourite }).await?;
    Ok(Json(json!({"id": id, "favourite": body.favourite})))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One login holds at most 2 of the REST history slots at once, another login is
    /// not held back by it, and a slot given back is free again.
    #[tokio::test]
    async fn one_login_holds_at_most_two_rest_history_slots() {
        let first = rest_history_slot("slow-reader").await.expect("first");
        let second = rest_history_slot("slow-reader").await.expect("second");
        assert!(matches!(rest_history_slot("slow-reader").await, Err(GatewayError::Busy(_))), "a third for the same login");
        let other = rest_history_slot("another").await.expect("another login's");
        drop(first);
        let again = rest_history_slot("slow-reader").await.expect("a slot given back is free again");
        drop((second, other, again));
        assert!(REST_HISTORIES_OF.lock().unwrap_or_else(|p| p.into_inner()).is_empty(), "every hold given back");
    }
}
