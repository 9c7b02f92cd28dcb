//! Identified customers: a site or app passes its customer's identity as a JWT signed
//! with its own key (HS256 with a shared secret, or RS256 with its RSA key, whose public
//! half the channel keeps). A verified identity becomes the conversation's visitor id
//! (`customer:<key id>:<sub>`), which links the customer's conversations across the channels
//! that share the key; anything else is ignored and shown to staff as unverified.
//! Docs: protocol.md (`start.identity`), workstation-api.md (`/api/channels/{id}/identity`).

use base64::Engine as _;
use serde::Deserialize;
use switchboard_actors::model::IdentityKey;

/// Longest identity token read.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Longest customer id (`sub`), in characters.
pub const MAX_SUBJECT_CHARS: usize = 64;
/// Clock difference tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 60;
/// The longest an identity may be valid from now: a token is a login, not a
/// standing credential.
pub const MAX_LIFETIME_SECS: u64 = 24 * 3600;

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    #[serde(default)]
    nbf: Option<f64>,
}

fn b64(part: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).map_err(|_| "it is not base64url".to_owned())
}

/// The visitor id a token proves (`customer:<key>:<sub>`, where `<key>` names the key
/// that verified it, so only channels sharing that key share the customer), or why it
/// proves nothing.
pub fn verify(token: &str, key: &IdentityKey, now_secs: u64) -> Result<String, String> {
    verify_subject(token, key, now_secs).map(|sub| format!("customer:{}:{sub}", key_id(key)))
}

/// A short, stable name of a key: the first 8 hex digits of its SHA-256. Short enough
/// that a key can be made to share another's on purpose (2^32 tries), so no channel is
/// given a key whose id another channel's different key has (`channels::put_identity`).
pub fn key_id(key: &IdentityKey) -> String {
    switchboard_adapters::hex(&ring::digest::digest(&ring::digest::SHA256, material(key).as_bytes()).as_ref()[..4])
}

/// What names a key: two keys with the same material verify the same tokens.
pub fn material(key: &IdentityKey) -> String {
    match key {
        IdentityKey::Hs256 { secret } => format!("hs256:{secret}"),
        IdentityKey::Rs256 { public_key_pem } => format!("rs256:{}", public_key_pem.split_whitespace().collect::<String>()),
    }
}

fn verify_subject(token: &str, key: &IdentityKey, now_secs: u64) -> Result<String, String> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!("the token is longer than {MAX_TOKEN_BYTES} bytes"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("it is not a signed JWT (three parts)".into());
    };
    let head: Header = serde_json::from_slice(&b64(header)?).map_err(|_| "its header is not JSON with alg".to_owned())?;
    if head.alg != key.alg() {
        return Err(format!("it is signed with {}, the channel takes {}", head.alg.chars().take(16).collect::<String>(), key.alg()));
    }
    let signed = &token[..header.len() + 1 + payload.len()];
    let signature = b64(signature)?;
    let good = match key {
        IdentityKey::Hs256 { secret } => {
            ring::hmac::verify(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()), signed.as_bytes(), &signature).is_ok()
        }
        IdentityKey::Rs256 { public_key_pem } => {
            let rsa = rsa_public_key(public_key_pem)?;
            ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, rsa).verify(signed.as_bytes(), &signature).is_ok()
        }
    };
    if !good {
        return Err("the signature does not match the channel's key".into());
    }
    let claims: Claims = serde_json::from_slice(&b64(payload)?).map_err(|_| "its claims are not JSON".to_owned())?;
    let Some(exp) = claims.exp else { return Err("it has no exp".into()) };
    if exp + (LEEWAY_SECS as f64) < now_secs as f64 {
        return Err("it expired".into());
    }
    if exp > (now_secs + MAX_LIFETIME_SECS + LEEWAY_SECS) as f64 {
        return Err("its exp is more than 24 hours away".into());
    }
    if claims.nbf.is_some_and(|nbf| nbf > (now_secs + LEEWAY_SECS) as f64) {
        return Err("it is not valid yet (nbf)".into());
    }
    match claims.sub {
        Some(sub) if !sub.is_empty() && sub.chars().count() <= MAX_SUBJECT_CHARS && !sub.chars().any(char::is_control) => Ok(sub),
        _ => Err(format!("its sub must be 1-{MAX_SUBJECT_CHARS} characters")),
    }
}

/// The RSA public key (PKCS#1 `RSAPublicKey`, as ring takes it) inside a PEM
/// `PUBLIC KEY` (SubjectPublicKeyInfo).
pub fn rsa_public_key(pem: &str) -> Result<Vec<u8>, String> {
    let bad = || "the key is not a PEM RSA public key".to_owned();
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "-----BEGIN PUBLIC KEY-----")
        .skip(1)
        .take_while(|l| *l != "-----END PUBLIC KEY-----")
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).map_err(|_| bad())?;
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm SEQUENCE {…}, subjectPublicKey BIT STRING }
    let (tag, spki, _) = tlv(&der).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (tag, algorithm, rest) = tlv(spki).ok_or_else(bad)?;
    // rsaEncryption, OID 1.2.840.113549.1.1.1
    const RSA_OID: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    if tag != 0x30 || !algorithm.starts_with(RSA_OID) {
        return Err("the key is not an RSA key".into());
    }
    let (tag, bits, _) = tlv(rest).ok_or_else(bad)?;
    let key = match bits.split_first() {
        Some((0, key)) if tag == 0x03 => key,
        _ => return Err(bad()),
    };
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    let (_, fields, _) = tlv(key).ok_or_else(bad)?;
    let (_, modulus, _) = tlv(fields).ok_or_else(bad)?;
    let modulus = modulus.iter().position(|b| *b != 0).map_or(&[][..], |i| &modulus[i..]);
    let bits = (modulus.len() * 8).saturating_sub(modulus.first().map_or(0, |b| b.leading_zeros() as usize));
    if !(2048..=8192).contains(&bits) {
        return Err(format!("the RSA key has {bits} bits; 2048 to 8192 are taken"));
    }
    Ok(key.to_vec())
}

/// One DER element: its tag, its content and what follows it.
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64u(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn hs256(secret: &str, header: &str, claims: &str) -> String {
        let signed = format!("{}.{}", b64u(header.as_bytes()), b64u(claims.as_bytes()));
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()), signed.as_bytes());
        format!("{signed}.{}", b64u(tag.as_ref()))
    }

    const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

    #[test]
    fn hs256_identities_are_checked_for_signature_algorithm_expiry_and_subject() {
        let key = IdentityKey::Hs256 { secret: SECRET.into() };
        let now = 1_800_000_000;
        let good = hs256(SECRET, r#"{"alg":"HS256","typ":"JWT"}"#, r#"{"sub":"cust-42","exp":1800000600}"#);
        assert_eq!(verify_subject(&good, &key, now), Ok("cust-42".into()));
        assert_eq!(verify(&good, &key, now), Ok(format!("customer:{}:cust-42", key_id(&key))));
        let other = IdentityKey::Hs256 { secret: "another-secret-of-at-least-32-bytes!!".into() };
        assert_ne!(key_id(&key), key_id(&other), "another key's customer 42 is another customer");
        let forever = hs256(SECRET, r#"{"alg":"HS256"}"#, r#"{"sub":"cust-42","exp":1900000000}"#);
        assert!(verify(&forever, &key, now).unwrap_err().contains("24 hours"));
        let forged = hs256("another-secret-of-at-least-32-bytes!!", r#"{"alg":"HS256"}"#, r#"{"sub":"cust-42","exp":1800000600}"#);
        assert!(verify(&forged, &key, now).unwrap_err().contains("signature"));
        let none = format!("{}.{}.", b64u(br#"{"alg":"none"}"#), b64u(br#"{"sub":"cust-42","exp":1800000600}"#));
        assert!(verify(&none, &key, now).unwrap_err().contains("none"));
        let expired = hs256(SECRET, r#"{"alg":"HS256"}"#, r#"{"sub":"cust-42","exp":1799990000}"#);
        assert_eq!(verify(&expired, &key, now), Err("it expired".into()));
        let no_exp = hs256(SECRET, r#"{"alg":"HS256"}"#, r#"{"sub":"cust-42"}"#);
        assert_eq!(verify(&no_exp, &key, now), Err("it has no exp".into()));
        let no_sub = hs256(SECRET, r#"{"alg":"HS256"}"#, r#"{"exp":1800000600}"#);
        assert!(verify(&no_sub, &key, now).is_err());
        // The payload changed after signing.
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = b64u(br#"{"sub":"admin","exp":1800000600}"#);
        assert!(verify(&parts.join("."), &key, now).is_err());
        assert!(verify("not a jwt", &key, now).is_err());
        assert!(verify(&"a.".repeat(3000), &key, now).is_err());
    }

    #[test]
    fn rs256_identities_verify_against_the_sites_public_key() {
        // A 2048-bit test key made with `openssl genpkey -algorithm RSA`; the test signs
        // with its private half and the channel keeps the public half.
        let private = include_str!("../tests/fixtures/identity-rsa-private.pk8.b64");
        let public = include_str!("../tests/fixtures/identity-rsa-public.pem");
        let der = base64::engine::general_purpose::STANDARD.decode(private.trim()).expect("fixture");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("an RSA key");
        let signed = format!("{}.{}", b64u(br#"{"alg":"RS256","typ":"JWT"}"#), b64u(br#"{"sub":"cust-7","exp":1800000600}"#));
        let mut signature = vec![0; pair.public().modulus_len()];
        pair.sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), signed.as_bytes(), &mut signature).expect("signed");
        let token = format!("{signed}.{}", b64u(&signature));
        let key = IdentityKey::Rs256 { public_key_pem: public.into() };
        assert_eq!(verify_subject(&token, &key, 1_800_000_000), Ok("cust-7".into()));
        // An HS256 token "signed" with the public key as a secret is refused (alg confusion).
        let confused = hs256(public, r#"{"alg":"HS256"}"#, r#"{"sub":"cust-7","exp":1800000600}"#);
        assert!(verify(&confused, &key, 1_800_000_000).unwrap_err().contains("RS256"));
        assert!(rsa_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err());
        // A 1024-bit key (openssl genpkey, rsa_keygen_bits:1024) is too weak to take.
        let small = "-----BEGIN PUBLIC KEY-----\nMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDIt+FtuL7yIRiPL/3DTGnabRK3\nKRsl0ACx10aNjpMz9vOvx5wpQrKRIyLn0hc56g5oi/IuOfZko6jnvUKKSVx8MC1v\np7U6qeRP6HjnNa732gdtg5bYwxjYv4CdGAHtlwke7JLXLydOnJATOeeULScQDfal\n/6gFRkB2/S2X00tjmQIDAQAB\n-----END PUBLIC KEY-----\n";
        assert_eq!(rsa_public_key(small), Err("the RSA key has 1024 bits; 2048 to 8192 are taken".into()));
    }
}
