//! Block and allow lists: who may start or write in a conversation of a channel. A
//! pure function of the state, so the gateway (which sees addresses) and the core
//! (which sees only verified visitor ids, and must decide the same on every replica)
//! ask the same question.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::*;
use crate::state::ShardState;

/// What a refused customer is told when their channel sets no text of its own.
pub const DEFAULT_BLOCKED_MESSAGE: &str = "This chat is not available to you. Please contact us another way.";
/// Rules one shard keeps at most.
pub const MAX_RULES: usize = 10_000;
/// Longest note on a rule, in characters.
pub const MAX_NOTE_CHARS: usize = 500;

/// Who set a rule, when, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleNote {
    pub note: String,
    pub by: String,
    pub since: Timestamp,
}

/// A channel's access mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelAccess {
    /// Only customers on the channel's (or the global) allow list may start.
    pub allow_only: bool,
    /// What a refused customer is told; empty: [`DEFAULT_BLOCKED_MESSAGE`].
    pub message: String,
}

/// Who is asking: the address (when the asker knows it) and the verified visitor id.
#[derive(Clone, Copy, Debug)]
pub struct Customer<'a> {
    pub ip: Option<IpAddr>,
    pub visitor: Option<&'a str>,
}

/// Whether `value` is an IP address or a CIDR range (`10.0.0.0/8`, `2001:db8::/32`).
pub fn parse_range(value: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match value.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (value, None),
    };
    let ip: IpAddr = addr.trim().parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max)?,
        None => max,
    };
    Some((ip, len))
}

/// Whether `ip` lies in the range `value` (an address or CIDR range).
pub fn in_range(value: &str, ip: IpAddr) -> bool {
    let Some((net, len)) = parse_range(value) else { return false };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        // An IPv4 client seen through an IPv6 socket.
        (IpAddr::V4(_), IpAddr::V6(i)) => i.to_ipv4_mapped().is_some_and(|v4| in_range(value, IpAddr::V4(v4))),
        _ => false,
    }
}

fn matches(rule: &AccessRule, customer: Customer) -> bool {
    match rule.kind {
        AccessKind::Ip => customer.ip.is_some_and(|ip| in_range(&rule.value, ip)),
        AccessKind::Visitor => customer.visitor == Some(rule.value.as_str()),
    }
}

/// `Err(what they are told)` when the customer may not use `channel`: a block rule of
/// the channel or of every channel matches them, or the channel takes only its allow
/// list and no allow rule matches. An asker that does not know the address (the core)
/// cannot tell whether an address rule matches: it refuses only on what it can see,
/// and never on an allow list it cannot check, except (from rules 15) on a channel
/// whose customers have no address at all (every kind but `web`), where only visitor
/// allow rules can let anyone in.
pub fn check(state: &ShardState, channel: &ChannelId, customer: Customer) -> Result<(), String> {
    let applies = |rule: &AccessRule| rule.channel.as_ref().is_none_or(|c| c == channel);
    let mode = state.channel_access.get(channel);
    let refused = || {
        let message = mode.map(|m| m.message.trim()).filter(|m| !m.is_empty()).unwrap_or(DEFAULT_BLOCKED_MESSAGE);
        Err(message.to_owned())
    };
    if state.access_rules.keys().any(|r| r.list == AccessList::Block && applies(r) && matches(r, customer)) {
        return refused();
    }
    let addressless = state.rules >= 15 && state.channels.get(channel).is_some_and(|c| c.kind != WEB_KIND);
    if mode.is_some_and(|m| m.allow_only) && (customer.ip.is_some() || addressless) {
        let allowed = state.access_rules.keys().any(|r| r.list == AccessList::Allow && applies(r) && matches(r, customer));
        if !allowed {
            return refused();
        }
    }
    Ok(())
}

/// `Err(what they are told)` when a message into a customer's open conversation on
/// `channel` is refused: a block rule matches them. An allow list decides only who
/// starts a conversation ([`check`]): setting one does not cut off conversations that
/// are open.
pub fn check_open(state: &ShardState, channel: &ChannelId, customer: Customer) -> Result<(), String> {
    let applies = |rule: &AccessRule| rule.channel.as_ref().is_none_or(|c| c == channel);
    if state.access_rules.keys().any(|r| r.list == AccessList::Block && applies(r) && matches(r, customer)) {
        let message = state.channel_access.get(channel).map(|m| m.message.trim()).filter(|m| !m.is_empty()).unwrap_or(DEFAULT_BLOCKED_MESSAGE);
        return Err(message.to_owned());
    }
    Ok(())
}

/// The channel kind whose customers come with an address: the web widget's sockets.
pub const WEB_KIND: &str = "web";

/// The longest visitor id a rule may name from rules 15: longer than any id the system
/// makes (`{channel}:{sender}` with a sender of up to 200 bytes, `customer:<key>:<sub>`).
/// Before, 64, which left such customers out of reach of any rule.
pub const MAX_VISITOR_RULE_CHARS: usize = 300;

/// Refuses a malformed rule, under routing rules `rules`.
pub fn validate(rule: &AccessRule, note: Option<&String>, rules: u32) -> Result<(), String> {
    let longest = if rules >= 15 { MAX_VISITOR_RULE_CHARS } else { 64 };
    match rule.kind {
        AccessKind::Ip if parse_range(&rule.value).is_none() => return Err(format!("{:?} is not an IP address or CIDR range", rule.value)),
        AccessKind::Visitor if rule.value.is_empty() || rule.value.chars().count() > longest => {
            return Err(format!("a visitor id is 1 to {longest} characters"));
        }
        _ => {}
    }
    if note.is_some_and(|n| n.chars().count() > MAX_NOTE_CHARS) {
        return Err(format!("a note is at most {MAX_NOTE_CHARS} characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visitor_rule_names_ids_as_long_as_a_messenger_sender_s_from_rules_15() {
        let rule = |value: String| AccessRule { list: AccessList::Block, channel: None, kind: AccessKind::Visitor, value };
        let long = format!("mail:{}@example.com", "a".repeat(180));
        assert!(validate(&rule(long.clone()), None, 15).is_ok(), "{} characters", long.len());
        assert!(validate(&rule(long), None, 14).is_err(), "rules 14 refused it, as a replayed log decided");
        assert!(validate(&rule("x".repeat(301)), None, 15).is_err());
        assert!(validate(&rule(String::new()), None, 15).is_err());
    }

    #[test]
    fn ranges_match_what_they_cover_and_nothing_else() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        assert!(in_range("10.1.0.0/16", ip("10.1.200.3")));
        assert!(!in_range("10.1.0.0/16", ip("10.2.0.1")));
        assert!(in_range("192.0.2.7", ip("192.0.2.7")));
        assert!(!in_range("192.0.2.7", ip("192.0.2.8")));
        assert!(in_range("0.0.0.0/0", ip("203.0.113.9")));
        assert!(in_range("2001:db8::/32", ip("2001:db8:1::5")));
        assert!(!in_range("2001:db8::/32", ip("2001:db9::1")));
        assert!(in_range("198.51.100.0/24", ip("::ffff:198.51.100.20")), "an IPv4 client on an IPv6 socket");
        assert!(!in_range("10.0.0.0/33", ip("10.0.0.1")), "a prefix longer than the address is refused");
        assert!(parse_range("not an ip").is_none());
    }
}
