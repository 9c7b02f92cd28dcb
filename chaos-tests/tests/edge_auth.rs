//! Logins, tokens and keys (docs/security.md, "Logins and tokens", "Keys on disk"):
//! lockouts that hold under concurrency and are keyed by login and address, a bounded
//! hashing queue, revocation of tokens and sockets, idempotency keys that tell
//! outsiders nothing, and private, whole key files.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use switchboard_chaos_tests::{
    binary, next_close, next_event, request_head, serves_a_new_client, serves_an_operator, set_presence, Dev, HttpConn, HttpOutcome, MIB,
    WAIT,
};
use switchboard_gateway::client::{ClientError, WsClient};

/// Sends every `(login, password)` at once (each on its own connection, released
/// together by a barrier) from `source`; returns each reply's status, in order.
async fn concurrent_logins(dev: &Dev, source: Option<IpAddr>, attempts: Vec<(String, String)>) -> anyhow::Result<Vec<u16>> {
    let barrier = Arc::new(tokio::sync::Barrier::new(attempts.len()));
    let mut tasks = tokio::task::JoinSet::new();
    for (n, (login, password)) in attempts.into_iter().enumerate() {
        let (private, barrier) = (dev.private.clone(), barrier.clone());
        tasks.spawn(async move {
            let connected = HttpConn::connect_from(&private, source).await;
            // Everyone reaches the barrier, connected or not, so nobody waits forever.
            tokio::time::timeout(WAIT, barrier.wait()).await.context("the others never arrived")?;
            let mut conn = connected.context("connect")?;
            let body = json!({"login": login, "password": password}).to_string();
            let headers = [("Content-Type", "application/json"), ("Connection", "close")];
            let mut request = request_head("POST", "/api/login", &private, &headers, Some(body.len()));
            request.extend_from_slice(body.as_bytes());
            conn.send(&request).await?;
            match conn.read_response(Duration::from_secs(60)).await {
                HttpOutcome::Response(response) => Ok::<_, anyhow::Error>((n, response.status)),
                other => anyhow::bail!("login {n}: {other:?}"),
            }
        });
    }
    let mut statuses = vec![0u16; tasks.len()];
    while let Some(done) = tasks.join_next().await {
        let (n, status) = done??;
        statuses[n] = status;
    }
    Ok(statuses)
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_passwords_check_at_most_five() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let right = dev.password("alice")?;
    let attempts: Vec<(String, String)> =
        (0..30).map(|n| ("alice".to_owned(), if n == 17 { right.clone() } else { format!("wrong-password-{n}") })).collect();
    let statuses = concurrent_logins(&dev, None, attempts).await?;
    let (failed, refused, succeeded) = (count(&statuses, 401), count(&statuses, 429), count(&statuses, 200));
    assert_eq!(failed + refused + succeeded, 30, "only 401, 429 and 200 are expected: {statuses:?}");
    assert!(failed <= 5, "{failed} wrong passwords were checked at once (at most 5): {statuses:?}");
    assert!(failed + succeeded <= 5, "{} passwords were checked in all (at most 5): {statuses:?}", failed + succeeded);

    // Unless the right password was among the five checked (a success clears the
    // login's failures), the login is now locked for this address, even with the right
    // password.
    if succeeded == 0 {
        let (status, body) = dev.login_from(None, "alice", &right).await?;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["code"], "rate_limited", "{body}");
    }
    // Others log in from the same address.
    let bob = dev.login("bob").await?;
    let (status, _) = dev.api("GET", "/api/me", Some(&bob), None).await?;
    assert_eq!(status, 200);
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_logout_and_end_sessions_revoke_tokens_and_sockets() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let admin = dev.login("admin").await?;
    let (mut client, conversation, _) = dev.client("Ann").await?;
    client.send(&json!({"type": "send", "key": "kept", "text": "before all this"})).await?;
    client.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "kept").await?;

    let refused_before_upgrade = |result: Result<WsClient, ClientError>, who: &str| match result {
        Err(ClientError::Handshake(message)) => assert!(message.contains("401"), "{who}: {message}"),
        Err(other) => panic!("{who}: unexpected error {other}"),
        Ok(_) => panic!("{who}: a revoked token opened an operator socket"),
    };

    // A password change ends the login's earlier tokens and sockets.
    let alice = dev.login("alice").await?;
    let mut alice_ws = WsClient::connect(&dev.private, &format!("/ws/operator?token={alice}"), None).await?;
    alice_ws.wait_for(WAIT, |v| v["type"] == "hello").await?;
    let change = json!({"password": "a-brand-new-password", "role": "operator", "operator": "alice"});
    let (status, body) = dev.api("PUT", "/api/users/alice", Some(&admin), Some(change)).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = dev.api("GET", "/api/me", Some(&alice), None).await?;
    assert_eq!(status, 401, "the token from before the password change: {body}");
    assert_eq!(next_close(&mut alice_ws, Duration::from_secs(5)).await?, 4001);
    refused_before_upgrade(WsClient::connect(&dev.private, &format!("/ws/operator?token={alice}"), None).await, "alice");
    let (status, body) = dev.login_from(None, "alice", "a-brand-new-password").await?;
    assert_eq!(status, 200, "{body}");
    let alice = body["token"].as_str().context("a token")?.to_owned();
    let (status, _) = dev.api("GET", "/api/me", Some(&alice), None).await?;
    assert_eq!(status, 200);

    // Logging out ends the token and its sockets.
    let bob = dev.login("bob").await?;
    let mut bob_ws = WsClient::connect(&dev.private, &format!("/ws/operator?token={bob}"), None).await?;
    bob_ws.wait_for(WAIT, |v| v["type"] == "hello").await?;
    let (status, body) = dev.api("POST", "/api/logout", Some(&bob), None).await?;
    assert_eq!(status, 204, "{body}");
    let (status, _) = dev.api("GET", "/api/me", Some(&bob), None).await?;
    assert_eq!(status, 401, "bob's token after logout");
    assert_eq!(next_close(&mut bob_ws, Duration::from_secs(5)).await?, 4001);
    refused_before_upgrade(WsClient::connect(&dev.private, &format!("/ws/operator?token={bob}"), None).await, "bob");

    // Only an admin ends someone's sessions.
    let carol = dev.login("carol").await?;
    let mut carol_ws = WsClient::connect(&dev.private, &format!("/ws/operator?token={carol}"), None).await?;
    carol_ws.wait_for(WAIT, |v| v["type"] == "hello").await?;
    let supervisor = dev.login("supervisor").await?;
    for (who, token) in [("supervisor", &supervisor), ("alice", &alice)] {
        let (status, body) = dev.api("POST", "/api/users/carol/end-sessions", Some(token), None).await?;
        assert_eq!(status, 403, "{who} ended carol's sessions: {body}");
    }
    let (status, _) = dev.api("GET", "/api/me", Some(&carol), None).await?;
    assert_eq!(status, 200, "carol is untouched by refused attempts");
    let (status, body) = dev.api("POST", "/api/users/carol/end-sessions", Some(&admin), None).await?;
    assert_eq!(status, 204, "{body}");
    assert_eq!(next_close(&mut carol_ws, Duration::from_secs(5)).await?, 4001);
    let (status, _) = dev.api("GET", "/api/me", Some(&carol), None).await?;
    assert_eq!(status, 401, "carol's token after end-sessions");

    // Everyone can log in again, and the visitor's message is still there.
    serves_an_operator(&dev, "carol").await?;
    serves_an_operator(&dev, "bob").await?;
    let (status, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{conv}");
    let kept = conv["history"].as_array().map(|h| h.iter().filter(|e| e["key"] == "kept").count()).unwrap_or(0);
    assert_eq!(kept, 1, "{conv}");
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_not_confirmed_to_operators_outside_the_conversation() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (mut client, conversation, _) = dev.client("Ann").await?;
    client.send(&json!({"type": "send", "key": "secret-key-1", "text": "hi"})).await?;
    let ack = client.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "secret-key-1").await?;
    assert_eq!(ack["duplicate"], false);

    // Bob stays offline: nobody holds the conversation, least of all him.
    let (mut bob, _) = dev.operator("bob").await?;
    for (key, reference) in [("secret-key-1", "probe-used"), ("never-used-key", "probe-unused")] {
        let guess = json!({"type": "send", "conversation": conversation, "key": key, "text": "guess", "ref": reference});
        bob.send(&guess).await?;
        let reply = bob.wait_for(WAIT, |v| v["ref"] == reference).await?;
        assert_eq!(reply["type"], "error", "an outsider's send with key {key} must not be acknowledged: {reply}");
        assert_eq!(reply["code"], "not_assigned", "{reply}");
    }

    // The visitor's own retry is still recognised.
    client.send(&json!({"type": "send", "key": "secret-key-1", "text": "hi"})).await?;
    let retry = client.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "secret-key-1").await?;
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["seq"], ack["seq"], "{retry}");

    // The operator who takes it sees the message once and nothing from bob.
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], conversation);
    alice.send(&json!({"type": "accept", "offer": offer["offer"]})).await?;
    let assigned = next_event(&mut alice, "assigned").await?;
    let history = assigned["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.iter().filter(|e| e["key"] == "secret-key-1").count(), 1, "{assigned}");
    assert!(!history.iter().any(|e| e["text"] == "guess"), "{assigned}");
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_is_refused_without_exhausting_memory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // 400 connections at once from one address: above the default 256 per address.
    let dev = Dev::start_with(binary()?, &dir.path().join("data"), &["--max-connections-per-address", "1000"]).await?;
    let flooder: IpAddr = "127.0.0.2".parse()?;
    let attempts: Vec<(String, String)> = (0..400).map(|n| (format!("nobody-{n}"), format!("guess-{n}"))).collect();
    let baseline = dev.rss_bytes()?;
    let (statuses, peak) = dev.peak_rss_during(concurrent_logins(&dev, Some(flooder), attempts)).await?;
    let statuses = statuses?;
    let (failed, refused) = (count(&statuses, 401), count(&statuses, 429));
    assert_eq!(failed + refused, 400, "bogus logins get 401 or 429: {statuses:?}");
    assert!(refused >= 300, "only {refused} of 400 concurrent logins were refused with 429 ({failed} checked)");
    let grown = peak.saturating_sub(baseline);
    assert!(grown < 150 * MIB, "a login flood grew RSS by {} MiB", grown / MIB);

    // A real login, from the ordinary address, goes through.
    let alice = dev.login("alice").await?;
    let (status, _) = dev.api("GET", "/api/me", Some(&alice), None).await?;
    assert_eq!(status, 200);
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lockout_applies_to_one_login_from_one_address() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let right = dev.password("admin")?;
    for n in 0..5 {
        let (status, body) = dev.login_from(None, "admin", &format!("wrong-password-{n}")).await?;
        assert_eq!(status, 401, "attempt {n}: {body}");
    }
    let (status, body) = dev.login_from(None, "admin", &right).await?;
    assert_eq!(status, 429, "admin from 127.0.0.1 after 5 failures: {body}");
    assert_eq!(body["code"], "rate_limited", "{body}");

    // The real admin, elsewhere, is not locked out by someone else's failures.
    let elsewhere: IpAddr = "127.0.0.2".parse()?;
    let (status, body) = dev.login_from(Some(elsewhere), "admin", &right).await?;
    assert_eq!(status, 200, "admin from 127.0.0.2: {body}");
    let token = body["token"].as_str().context("a token")?;
    let (status, _) = dev.api("GET", "/api/users", Some(token), None).await?;
    assert_eq!(status, 200);
    // Other logins from the first address are not locked either.
    serves_an_operator(&dev, "alice").await?;
    serves_a_new_client(&dev).await?;
    Ok(())
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path).with_context(|| format!("{}", path.display()))?.permissions().mode() & 0o777)
}

/// Regular files under `dir` (not in the stores, `records/` and `log/`, which replace
/// their own files atomically while the node runs) whose names look temporary.
fn leftovers(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = entry.file_type()?;
            if kind.is_dir() && name != "records" && name != "log" {
                pending.push(entry.path());
                continue;
            }
            let lower = name.to_ascii_lowercase();
            let temporary = lower.contains("tmp") || lower.contains("temp") || lower.contains("partial") || lower.starts_with('.') || lower.ends_with('~');
            if kind.is_file() && temporary {
                found.push(entry.path().display().to_string());
            }
        }
    }
    Ok(found)
}

/// A key file, if present, is whole and private.
fn whole_and_private_if_present(path: &Path, whole: impl Fn(&[u8]) -> bool) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let bytes = std::fs::read(path)?;
    anyhow::ensure!(whole(&bytes), "{} is not whole: {} bytes", path.display(), bytes.len());
    anyhow::ensure!(mode(path)? == 0o600, "{} has mode {:o}", path.display(), mode(path)?);
    Ok(())
}

fn whole_pem(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.starts_with("-----BEGIN") && text.trim_end().ends_with("-----") && text.matches("-----END").count() == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_files_are_private_and_whole() -> anyhow::Result<()> {
    // `dev`: the token key, the cluster CA key and the node's key.
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let data = dev.data_dir.clone();
    let certs = data.join("certs");
    let token_key = data.join("token.key");
    assert_eq!(std::fs::metadata(&token_key)?.len(), 32, "token.key holds 32 bytes");
    assert_eq!(mode(&token_key)?, 0o600, "token.key");
    for key in ["ca.key", "node-1.key"] {
        assert_eq!(mode(&certs.join(key))?, 0o600, "certs/{key}");
        assert!(whole_pem(&std::fs::read(certs.join(key))?), "certs/{key} is a whole PEM");
    }
    assert_eq!(leftovers(&data)?, Vec::<String>::new(), "temporary files in the data folder");
    assert_eq!(leftovers(&certs)?, Vec::<String>::new(), "temporary files in certs/");
    serves_a_new_client(&dev).await?;
    drop(dev);

    // `node`: also the first admin's password file.
    let dir = tempfile::tempdir()?;
    let node = Dev::start_node(&dir.path().join("data")).await?;
    assert_eq!(mode(&node.data_dir.join("admin-password"))?, 0o600, "admin-password");
    assert_eq!(mode(&node.data_dir.join("token.key"))?, 0o600, "token.key");
    assert_eq!(leftovers(&node.data_dir)?, Vec::<String>::new(), "temporary files in the data folder");
    assert_eq!(leftovers(&node.data_dir.join("certs"))?, Vec::<String>::new(), "temporary files in certs/");
    node.login("admin").await?;
    drop(node);

    // A first start killed at any moment leaves each key file absent or whole, and the
    // next start completes.
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    for delay_ms in [0u64, 5, 10, 15, 20, 30, 50, 100, 400] {
        let starting = Dev::launch(binary()?, "dev", &data, "127.0.0.1:0", "127.0.0.1:0", &[])?;
        // The moment of the crash is the variable under test, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        starting.kill().await?;
        whole_and_private_if_present(&data.join("token.key"), |b| b.len() == 32).with_context(|| format!("killed after {delay_ms} ms"))?;
        for key in ["ca.key", "node-1.key"] {
            whole_and_private_if_present(&data.join("certs").join(key), whole_pem).with_context(|| format!("killed after {delay_ms} ms"))?;
        }
    }
    let dev = Dev::start(&data).await.context("a start after the crashed first starts")?;
    assert_eq!(std::fs::metadata(data.join("token.key"))?.len(), 32);
    dev.login("admin").await?;
    serves_a_new_client(&dev).await?;
    Ok(())
}
