//! Passwords (argon2id) and signed tokens (HMAC-SHA256).
//!
//! A token is `v1.<claims>.<mac>`, both parts base64url without padding. The gateway
//! keeps no session table: any gateway holding the cluster's token key can verify it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};
use switchboard_actors::model::{ConversationId, OperatorId, Role};

use crate::GatewayError;

/// Who a token speaks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    /// Staff: an operator, supervisor or admin, logged in with a password.
    /// `epoch` is the login's session epoch when the token was issued: ending the
    /// login's sessions advances it and voids every earlier token.
    Staff {
        login: String,
        role: Role,
        operator: Option<OperatorId>,
        #[serde(default)]
        epoch: u64,
    },
    /// A web chat visitor, bound to one conversation.
    Client { conversation: ConversationId },
    /// A returning visitor's identity, issued by the gateway: only its holder can link a
    /// new conversation to the visitor's earlier ones (the operator's client card).
    Visitor { visitor: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(flatten)]
    subject: Subject,
    /// Expiry, seconds since the Unix epoch.
    exp: u64,
}

pub const STAFF_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
pub const CLIENT_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const VISITOR_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String, GatewayError> {
    let mut raw = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(|_| GatewayError::Internal("no randomness".into()))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// `bytes` random bytes as base64url without padding.
pub fn random_b64(bytes: usize) -> Result<String, GatewayError> {
    let mut raw = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(|_| GatewayError::Internal("no randomness".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(raw))
}

/// A fresh visitor id: `v-` and 16 URL-safe random characters.
pub fn new_visitor_id() -> Result<String, GatewayError> {
    Ok(format!("v-{}", random_b64(12)?))
}

/// A fresh start key (protocol.md §2, `start`): 16 random bytes, base64url.
pub fn new_start_key() -> Result<String, GatewayError> {
    random_b64(16)
}

/// Whether `key` may key a `start`: 16 to 64 of `A-Z a-z 0-9 - _` (a client makes it
/// from at least 96 random bits; whoever presents it gets that conversation).
pub fn start_key_ok(key: &str) -> bool {
    (MIN_START_KEY..=MAX_START_KEY).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
pub const MIN_START_KEY: usize = 16;
pub const MAX_START_KEY: usize = 64;

/// The visitor a keyed start makes when the client proved no earlier one: the same for
/// every retry of that start, so the retry is placed (on a split cluster) and answered
/// (`visitor_token`) as the first one was; it tells nothing of the key.
pub fn start_key_visitor(channel: &str, key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("switchboard start key\u{0}{channel}\u{0}{key}").as_bytes());
    format!("v-{}", URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]))
}

pub struct TokenKey {
    key: hmac::Key,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenKey {
    /// `secret` must be at least 32 random bytes shared by all gateways of a cluster.
    pub fn new(secret: &[u8]) -> Result<Self, GatewayError> {
        if secret.len() < 32 {
            return Err(GatewayError::Config("token secret must be at least 32 bytes".into()));
        }
        Ok(TokenKey { key: hmac::Key::new(hmac::HMAC_SHA256, secret) })
    }

    pub fn issue(&self, subject: Subject, ttl: Duration) -> String {
        let claims = Claims { subject, exp: unix_now() + ttl.as_secs() };
        // Serializing a plain struct of strings and numbers cannot fail.
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signed = format!("v1.{body}");
        let mac = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    pub fn verify(&self, token: &str) -> Result<Subject, GatewayError> {
        self.verify_with_expiry(token).map(|(subject, _)| subject)
    }

    /// [`Self::verify`], with when the token expires (seconds since the Unix epoch): an
    /// open staff socket stops acting on it then.
    pub fn verify_with_expiry(&self, token: &str) -> Result<(Subject, u64), GatewayError> {
        let (signed, mac) = token.rsplit_once('.').ok_or(GatewayError::Unauthorized("malformed token"))?;
        let body = signed.strip_prefix("v1.").ok_or(GatewayError::Unauthorized("unknown token version"))?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| GatewayError::Unauthorized("malformed token"))?;
        hmac::verify(&self.key, signed.as_bytes(), &mac).map_err(|_| GatewayError::Unauthorized("bad token signature"))?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(GatewayError::Unauthorized("malformed token"))?;
        if claims.exp < unix_now() {
            return Err(GatewayError::Unauthorized("token expired"));
        }
        Ok((claims.subject, claims.exp))
    }
}

pub fn hash_password(password: &str) -> Result<String, GatewayError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| GatewayError::Internal(format!("hash password: {e}")))
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default().verify_password(password.as_bytes(), &hash).is_ok(),
        Err(_) => false,
    }
}

/// Slows down password guessing. Failures are counted per login *and* address, so
/// nobody can lock a user out from elsewhere, and per address across logins, so one
/// address cannot try every login. An attempt counts from the moment it is admitted,
/// before its password is checked: attempts sent at once gain nothing.
#[derive(Default)]
pub struct LoginThrottle {
    tables: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    by_login: HashMap<(String, IpAddr), Tally>,
    by_address: HashMap<IpAddr, Tally>,
}

/// Failures in the current window plus attempts still being checked.
#[derive(Clone, Copy)]
struct Tally {
    failures: u32,
    checking: u32,
    last: Instant,
}

impl Tally {
    fn new() -> Self {
        Tally { failures: 0, checking: 0, last: Instant::now() }
    }

    /// Forgets failures older than `window` (counted from the latest one).
    fn refresh(&mut self, window: Duration) {
        if self.last.elapsed() >= window {
            self.failures = 0;
        }
    }

    fn full(&self, max: u32) -> bool {
        self.failures + self.checking >= max
    }
}

/// Failed logins for one login from one address before it is locked there.
pub const MAX_LOGIN_FAILURES: u32 = 5;
/// How long a login stays locked for an address after its latest failure.
pub const LOGIN_LOCKOUT: Duration = Duration::from_secs(30);
/// Failed logins from one address, any login, before the address is locked.
pub const MAX_ADDRESS_FAILURES: u32 = 50;
/// How long an address stays locked after its latest failure.
pub const ADDRESS_LOCKOUT: Duration = Duration::from_secs(300);
/// Entries kept per table; past it, entries whose window has passed are dropped.
const MAX_TRACKED: usize = 100_000;

impl LoginThrottle {
    /// Admits one attempt for `login` from `address`, or refuses it (429) while either
    /// is locked. The attempt counts as a failure until [`Attempt::succeeded`] says
    /// otherwise, also if the request is dropped halfway.
    pub fn begin(&self, login: &str, address: IpAddr) -> Result<Attempt<'_>, GatewayError> {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let Tables { by_login, by_address } = &mut *tables;
        if by_login.len() >= MAX_TRACKED {
            by_login.retain(|_, t| t.checking > 0 || t.last.elapsed() < LOGIN_LOCKOUT);
        }
        if by_address.len() >= MAX_TRACKED {
            by_address.retain(|_, t| t.checking > 0 || t.last.elapsed() < ADDRESS_LOCKOUT);
        }
        if by_login.len() >= MAX_TRACKED || by_address.len() >= MAX_TRACKED {
            return Err(GatewayError::RateLimited);
        }
        let key = (login.to_owned(), address);
        let mut pair = by_login.get(&key).copied().unwrap_or_else(Tally::new);
        let mut from = by_address.get(&address).copied().unwrap_or_else(Tally::new);
        pair.refresh(LOGIN_LOCKOUT);
        from.refresh(ADDRESS_LOCKOUT);
        if pair.full(MAX_LOGIN_FAILURES) || from.full(MAX_ADDRESS_FAILURES) {
            return Err(GatewayError::RateLimited);
        }
        pair.checking += 1;
        from.checking += 1;
        by_login.insert(key.clone(), pair);
        by_address.insert(address, from);
        Ok(Attempt { throttle: self, key, outcome: Outcome::Failed })
    }
}

/// One admitted login attempt; settles its count when dropped.
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    key: (String, IpAddr),
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Failed,
    Succeeded,
    /// The password was never checked (the node was too busy): not a failure.
    Unchecked,
}

impl Attempt<'_> {
    pub fn succeeded(mut self) {
        self.outcome = Outcome::Succeeded;
    }

    pub fn unchecked(mut self) {
        self.outcome = Outcome::Unchecked;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut tables = self.throttle.tables.lock().unwrap_or_else(|p| p.into_inner());
        let Tables { by_login, by_address } = &mut *tables;
        let now = Instant::now();
        for (tally, clear_on_success) in [(by_login.get_mut(&self.key), true), (by_address.get_mut(&self.key.1), false)] {
            let Some(tally) = tally else { continue };
            tally.checking = tally.checking.saturating_sub(1);
            match self.outcome {
                Outcome::Succeeded if clear_on_success => tally.failures = 0,
                Outcome::Succeeded | Outcome::Unchecked => {}
                Outcome::Failed => {
                    tally.failures += 1;
                    tally.last = now;
                }
            }
        }
        // An entry that holds no failure and no attempt in flight says nothing: drop it,
        // so attempts that were never checked do not fill the table.
        if by_login.get(&self.key).is_some_and(|t| t.checking == 0 && (t.failures == 0 || self.outcome == Outcome::Succeeded)) {
            by_login.remove(&self.key);
        }
        if by_address.get(&self.key.1).is_some_and(|t| t.checking == 0 && t.failures == 0) {
            by_address.remove(&self.key.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_rejects_tampering() {
        let key = TokenKey::new(&[7u8; 32]).unwrap();
        let subject = Subject::Client { conversation: ConversationId(42) };
        let token = key.issue(subject.clone(), CLIENT_TOKEN_TTL);
        assert_eq!(key.verify(&token).unwrap(), subject);

        let other = TokenKey::new(&[8u8; 32]).unwrap();
        assert!(other.verify(&token).is_err(), "token from another key must fail");

        // Swap in claims for another conversation, keep the old signature.
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"kind":"client","conversation":1,"exp":99999999999}"#);
        let mac = token.rsplit_once('.').unwrap().1;
        assert!(key.verify(&format!("v1.{forged_claims}.{mac}")).is_err());
        assert!(key.verify("garbage").is_err());
    }

    #[test]
    fn attempts_count_before_their_password_is_checked_and_per_address() {
        let throttle = LoginThrottle::default();
        let here: IpAddr = "10.0.0.1".parse().unwrap();
        let elsewhere: IpAddr = "10.0.0.2".parse().unwrap();
        // Five attempts in flight at once: the sixth is refused before any finished.
        let in_flight: Vec<_> = (0..MAX_LOGIN_FAILURES).map(|_| throttle.begin("admin", here).unwrap()).collect();
        assert!(throttle.begin("admin", here).is_err());
        drop(in_flight);
        assert!(throttle.begin("admin", here).is_err(), "five failures lock the login here");
        throttle.begin("admin", elsewhere).unwrap().succeeded();
        assert!(throttle.begin("admin", elsewhere).is_ok(), "but not from another address");
        // Attempts whose password was never checked do not count.
        let throttle = LoginThrottle::default();
        for _ in 0..MAX_LOGIN_FAILURES * 2 {
            throttle.begin("alice", here).unwrap().unchecked();
        }
        assert!(throttle.begin("alice", here).is_ok());
    }

    #[test]
    fn one_address_is_locked_after_failing_on_many_logins() {
        let throttle = LoginThrottle::default();
        let here: IpAddr = "10.0.0.1".parse().unwrap();
        for n in 0..MAX_ADDRESS_FAILURES {
            drop(throttle.begin(&format!("user{n}"), here).unwrap());
        }
        assert!(throttle.begin("someone-else", here).is_err());
        assert!(throttle.begin("someone-else", "10.0.0.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn passwords_hash_and_verify() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2"));
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong", &phc));
    }
}
