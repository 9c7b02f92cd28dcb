//! What malformed frames, oversized input, forged tokens and floods get, and that the
//! node keeps serving everyone else without losing anything acknowledged.

use std::time::Duration;

use serde_json::json;
use switchboard_chaos_tests::{next_event, set_presence, Dev, WAIT};
use switchboard_gateway::client::{http_json, ClientError, Incoming, WsClient};

async fn next_closed(ws: &mut WsClient) -> anyhow::Result<(u16, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next(left).await? {
            Incoming::Closed { code, reason } => return Ok((code, reason)),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_documented_errors_and_nothing_is_lost() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;

    // A well-behaved client whose acknowledged message must survive everything below.
    let (good, conversation, _) = dev.client("Good").await?;
    good.send(&json!({"type": "send", "key": "g1", "text": "I was here first"})).await?;

    let (mut bad, _, _) = dev.client("Bad").await?;
    bad.send_text("{this is not json").await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "bad_json");
    bad.send(&json!({"type": "teleport"})).await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "unknown_type");
    bad.send(&json!({"type": "send", "text": "no key"})).await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "bad_frame");
    bad.send(&json!({"no": "type"})).await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "bad_frame");
    let long = "x".repeat(4001);
    bad.send(&json!({"type": "send", "key": "long", "text": long})).await?;
    let error = bad.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(error["code"], "too_long");
    assert_eq!(error["ref"], "long");
    bad.send(&json!({"type": "send", "key": "empty", "text": "   "})).await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "invalid");
    bad.send_binary(&[0, 1, 2]).await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "unsupported");
    bad.send(&json!({"type": "rate", "score": 5})).await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "invalid", "rating an open conversation");
    bad.send(&json!({"type": "start"})).await?;
    assert_eq!(bad.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "already_started");

    // A frame over the size limit closes the socket with 1009.
    let huge = "y".repeat(20 * 1024);
    bad.send(&json!({"type": "send", "key": "huge", "text": huge})).await?;
    let (code, _) = next_closed(&mut bad).await?;
    assert_eq!(code, 1009);

    // Sending before start.
    let mut fresh = WsClient::connect(&dev.public, "/ws/client", None).await?;
    fresh.send(&json!({"type": "send", "key": "k", "text": "hi"})).await?;
    assert_eq!(fresh.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "no_conversation");

    // Everyone else is still served, and the acknowledged message is there.
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], conversation);
    alice.send(&json!({"type": "accept", "offer": offer["offer"]})).await?;
    let assigned = next_event(&mut alice, "assigned").await?;
    assert!(assigned["history"].as_array().unwrap().iter().any(|e| e["text"] == "I was here first"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_missing_tokens_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;

    // Operator socket: refused before the upgrade.
    for path in ["/ws/operator", "/ws/operator?token=v1.e30.AAAA", "/ws/operator?token=garbage"] {
        match WsClient::connect(&dev.private, path, None).await {
            Err(ClientError::Handshake(message)) => assert!(message.contains("401") || message.to_lowercase().contains("status"), "{message}"),
            Err(other) => panic!("{path}: unexpected error {other}"),
            Ok(_) => panic!("{path}: socket opened without a valid token"),
        }
    }
    // A client token (valid signature) is not an operator token.
    let (_, _, client_token) = dev.client("Ann").await?;
    assert!(WsClient::connect(&dev.private, &format!("/ws/operator?token={client_token}"), None).await.is_err());
    let (status, _) = http_json(&dev.private, "GET", "/api/me", Some(&client_token), None).await?;
    assert_eq!(status, 403);

    // A tampered client token on resume: error frame, then close 4001.
    let mut ws = WsClient::connect(&dev.public, "/ws/client", None).await?;
    let (body, mac) = client_token.rsplit_once('.').unwrap();
    let forged = format!("{body}x.{mac}");
    ws.send(&json!({"type": "resume", "token": forged, "last_seq": 0})).await?;
    assert_eq!(ws.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "unauthorized");
    assert_eq!(next_closed(&mut ws).await?.0, 4001);

    // REST: no token 401, wrong password 401, foreign origin refused on the socket.
    let (status, body) = http_json(&dev.private, "GET", "/api/operators", None, None).await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthorized");
    let (status, _) = http_json(&dev.private, "POST", "/api/login", None, Some(&json!({"login": "alice", "password": "wrong"}))).await?;
    assert_eq!(status, 401);
    let (status, body) = http_json(&dev.private, "POST", "/api/login", None, Some(&json!({"login": "alice"}))).await?;
    assert_eq!(status, 400, "{body}");
    assert!(WsClient::connect(&dev.public, "/ws/client", Some("http://evil.example")).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_by_the_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let alice = dev.login("alice").await?;
    let bob = dev.login("bob").await?;
    let admin = dev.login("admin").await?;

    let (status, _) = dev.api("PUT", "/api/skill-groups/x", Some(&alice), Some(json!({"name": "x"}))).await?;
    assert_eq!(status, 403, "operator on an admin endpoint");
    let (status, _) = dev.api("GET", "/api/queues", Some(&alice), None).await?;
    assert_eq!(status, 403, "operator on a supervisor endpoint");
    let (status, _) = dev.api("PUT", "/api/skill-groups/x", Some(&admin), Some(json!({"name": "x"}))).await?;
    assert_eq!(status, 200);

    // Alice holds a conversation; Bob may not read it.
    let (mut alice_ws, _) = dev.operator("alice").await?;
    set_presence(&mut alice_ws, "online").await?;
    let (_client, conversation, _) = dev.client("Ann").await?;
    let offer = next_event(&mut alice_ws, "offer").await?;
    alice_ws.send(&json!({"type": "accept", "offer": offer["offer"]})).await?;
    next_event(&mut alice_ws, "assigned").await?;
    let (status, _) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&alice), None).await?;
    assert_eq!(status, 200);
    let (status, _) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&bob), None).await?;
    assert_eq!(status, 403);
    let (mut bob_ws, _) = dev.operator("bob").await?;
    bob_ws.send(&json!({"type": "history", "conversation": conversation, "ref": "h"})).await?;
    assert_eq!(bob_ws.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "forbidden");

    // Monitoring and the API document are served on the private listener only.
    let (status, metrics) = dev.api("GET", "/metrics", None, None).await?;
    assert_eq!(status, 200);
    assert!(metrics.as_str().unwrap_or_default().contains("switchboard_commands_committed_total"));
    let (status, spec) = dev.api("GET", "/openapi.json", None, None).await?;
    assert_eq!(status, 200);
    assert!(spec["paths"]["/api/login"].is_object());
    let (status, _) = http_json(&dev.public, "GET", "/api/operators", Some(&admin), None).await?;
    assert_eq!(status, 404, "no administrative route on the public listener");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_over_rate_limit_is_refused_then_closed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (mut flooder, _, _) = dev.client("Flood").await?;
    for _ in 0..200 {
        if flooder.send(&json!({"type": "ping"})).await.is_err() {
            break;
        }
    }
    let limited = flooder.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(limited["code"], "rate_limited");
    assert_eq!(next_closed(&mut flooder).await?.0, 4008);

    // Others are unaffected.
    let (mut calm, _, _) = dev.client("Calm").await?;
    calm.send(&json!({"type": "ping"})).await?;
    calm.wait_for(Duration::from_secs(5), |v| v["type"] == "pong").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_start_conversations_without_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let binary = switchboard_chaos_tests::binary()?;
    let dev = Dev::start_with(binary, &dir.path().join("data"), &["--starts-per-minute", "3"]).await?;
    for _ in 0..3 {
        dev.client("Fine").await?;
    }
    let mut fourth = WsClient::connect(&dev.public, "/ws/client", None).await?;
    fourth.send(&json!({"type": "start", "name": "One too many"})).await?;
    let refused = fourth.wait_for(WAIT, |v| v["type"] == "error" || v["type"] == "started").await?;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    Ok(())
}
