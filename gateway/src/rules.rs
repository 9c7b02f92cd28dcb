//! Routing rules of rules 6 as the REST API shows them: a group's routing steps and
//! opening hours (read and written with the group, `/api/skill-groups/{id}`), and the
//! channel kinds' weights (`/api/routing/weights`). The JSON forms are in
//! docs/workstation-api.md.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use switchboard_actors::model::{ClosedAction, Command, OpeningHours, Role, RoutingStep, SkillGroupId, Timestamp};

use crate::rest::{Body, Staff};
use crate::{Gateway, GatewayError};

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StepBody {
    after_ms: u64,
    #[serde(default)]
    skills: Option<BTreeMap<String, u8>>,
    #[serde(default)]
    max_level: u8,
    #[serde(default)]
    overflow: Vec<String>,
}

impl StepBody {
    pub(crate) fn into_step(self) -> RoutingStep {
        RoutingStep {
            after_ms: self.after_ms,
            skills: self.skills.map(|s| s.into_iter().collect()),
            max_level: self.max_level,
            overflow: self.overflow.into_iter().map(SkillGroupId::new).collect(),
        }
    }
}

pub(crate) fn step_json(step: &RoutingStep) -> Value {
    json!({
        "after_ms": step.after_ms,
        "skills": step.skills.as_ref().map(|s| s.iter().cloned().collect::<BTreeMap<_, _>>()),
        "max_level": step.max_level,
        "overflow": step.overflow,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IntervalBody {
    day: String,
    open: String,
    close: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HolidayBody {
    date: String,
    #[serde(default)]
    open: Option<String>,
    #[serde(default)]
    close: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ActionBody {
    Reply,
    Wait,
    Transfer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HoursBody {
    time_zone: String,
    #[serde(default)]
    weekly: Vec<IntervalBody>,
    #[serde(default)]
    holidays: Vec<HolidayBody>,
    closed_action: ActionBody,
    #[serde(default)]
    transfer_to: Option<String>,
    #[serde(default)]
    message: String,
    // The computed fields of a group read back (`open_now`, `next_change_at`) are
    // accepted and ignored, so a client may send back what it read.
    #[serde(default, rename = "open_now")]
    _open_now: Option<Value>,
    #[serde(default, rename = "next_change_at")]
    _next_change_at: Option<Value>,
}

/// `HH:MM` as minutes of the day, `24:00` included.
fn minute(text: &str) -> Result<u16, GatewayError> {
    let bad = || GatewayError::BadRequest(format!("a time is HH:MM from 00:00 to 24:00, not {text:?}"));
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

impl HoursBody {
    pub(crate) fn into_hours(self) -> Result<OpeningHours, GatewayError> {
        let mut weekly = Vec::with_capacity(self.weekly.len());
        for i in self.weekly {
            let day = DAYS
                .iter()
                .position(|d| *d == i.day)
                .ok_or_else(|| GatewayError::BadRequest(format!("a day is one of {}, not {:?}", DAYS.join(", "), i.day)))?;
            weekly.push((day as u8, minute(&i.open)?, minute(&i.close)?));
        }
        let mut holidays = Vec::with_capacity(self.holidays.len());
        for h in self.holidays {
            let hours = match (h.open, h.close) {
                (Some(open), Some(close)) => vec![(minute(&open)?, minute(&close)?)],
                (None, None) => Vec::new(),
                _ => return Err(GatewayError::BadRequest("a holiday has both open and close, or neither (closed all day)".into())),
            };
            // Several entries for one date add intervals to it.
            match holidays.iter_mut().find(|(d, _): &&mut (String, Vec<(u16, u16)>)| *d == h.date) {
                Some((_, list)) => list.extend(hours),
                None => holidays.push((h.date, hours)),
            }
        }
        let closed_action = match (self.closed_action, self.transfer_to) {
            (ActionBody::Reply, _) => ClosedAction::Reply,
            (ActionBody::Wait, _) => ClosedAction::Wait,
            (ActionBody::Transfer, Some(to)) if !to.is_empty() => ClosedAction::Transfer(SkillGroupId::new(to)),
            (ActionBody::Transfer, _) => return Err(GatewayError::BadRequest("closed_action transfer needs transfer_to".into())),
        };
        Ok(OpeningHours { time_zone: self.time_zone, weekly, holidays, closed_action, message: self.message })
    }
}

/// A field that must be told apart when absent (`None`) and `null` (`Some(None)`).
pub(crate) fn present_hours<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<HoursBody>>, D::Error> {
    Ok(Some(Option::<HoursBody>::deserialize(d)?))
}

/// A group's hours as the API shows them, with whether it is open at `now` and when
/// that changes next.
pub(crate) fn hours_json(h: &OpeningHours, now: Timestamp) -> Value {
    let (action, to) = match &h.closed_action {
        ClosedAction::Reply => ("reply", None),
        ClosedAction::Wait => ("wait", None),
        ClosedAction::Transfer(g) => ("transfer", Some(g.as_str())),
    };
    let weekly: Vec<Value> =
        h.weekly.iter().map(|(d, o, c)| json!({"day": DAYS[usize::from(*d).min(6)], "open": hhmm(*o), "close": hhmm(*c)})).collect();
    let mut holidays = Vec::new();
    for (date, list) in &h.holidays {
        if list.is_empty() {
            holidays.push(json!({"date": date}));
        }
        holidays.extend(list.iter().map(|(o, c)| json!({"date": date, "open": hhmm(*o), "close": hhmm(*c)})));
    }
    json!({
        "time_zone": h.time_zone, "weekly": weekly, "holidays": holidays,
        "closed_action": action, "transfer_to": to, "message": h.message,
        "open_now": switchboard_actors::hours::is_open(h, now),
        "next_change_at": switchboard_actors::hours::next_change(h, now).map(|t| t.0),
    })
}

/// `GET /api/routing/weights` (any staff): what one conversation of each channel kind
/// takes of an operator's capacity; kinds not listed weigh 1.
pub(crate) async fn weights(State(gw): State<Arc<Gateway>>, _staff: Staff) -> Json<Value> {
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    Json(json!({ "weights": state.channel_weights }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightsBody {
    weights: BTreeMap<String, u32>,
}

/// `PUT /api/routing/weights` (admin): replaces the weights.
pub(crate) async fn put_weights(State(gw): State<Arc<Gateway>>, crate::rest::StaffAt(staff): crate::rest::AdminStaff, Body(body): Body<WeightsBody>) -> Result<Json<Value>, GatewayError> {
    staff.require(Role::Admin)?;
    let weights: Vec<(String, u32)> = body.weights.into_iter().collect();
    switchboard_actors::core::check_weights(&weights)?;
    gw.submit(Command::SetChannelWeights { weights }).await?;
    let shard = gw.backend.directory_shard();
    let state = shard.read();
    Ok(Json(json!({ "weights": state.channel_weights })))
}
