//! Passwords (argon2id) and signed tokens (HMAC-SHA256).
//!
//! A token is `v1.<claims>.<mac>`, both parts base64url without padding. The gateway
//! keeps no session table: any gateway holding the cluster's token key can verify it.

use std::collections::HashMap;
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
    Staff { login: String, role: Role, operator: Option<OperatorId> },
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

/// A fresh visitor id: `v-` and 16 URL-safe random characters.
pub fn new_visitor_id() -> Result<String, GatewayError> {
    let mut bytes = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| GatewayError::Internal("no randomness for a visitor id".into()))?;
    Ok(format!("v-{}", URL_SAFE_NO_PAD.encode(bytes)))
}

pub struct TokenKey {
    key: hmac::Key,
}

fn unix_now() -> u64 {
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
        Ok(claims.subject)
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

/// Slows down password guessing: after `MAX_FAILURES` failed logins a login is locked
/// for `LOCKOUT`.
#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

const MAX_FAILURES: u32 = 5;
const LOCKOUT: Duration = Duration::from_secs(30);

impl LoginThrottle {
    pub fn check(&self, login: &str) -> Result<(), GatewayError> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(login) {
            Some((n, since)) if *n >= MAX_FAILURES && since.elapsed() < LOCKOUT => Err(GatewayError::RateLimited),
            _ => Ok(()),
        }
    }

    pub fn record(&self, login: &str, ok: bool) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            failures.remove(login);
            return;
        }
        let entry = failures.entry(login.to_string()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= LOCKOUT {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        entry.1 = Instant::now();
        if failures.len() > 100_000 {
            failures.retain(|_, (_, since)| since.elapsed() < LOCKOUT);
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
    fn passwords_hash_and_verify() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2"));
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong", &phc));
    }
}
