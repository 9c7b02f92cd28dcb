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

/// The index of the node's last Raft log entry, from `/metrics`.
async fn last_log(dev: &Dev) -> anyhow::Result<u64> {
    let (_, metrics) = dev.api("GET", "/metrics", None, None).await?;
    let text = metrics.as_str().unwrap_or_default().to_owned();
    text.lines()
        .find(|l| l.starts_with("switchboard_raft_last_log{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no switchboard_raft_last_log in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_documented_errors_and_nothing_is_lost() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;

    // A well-behaved client whose acknowledged message must survive everything below.
    let (mut good, conversation, _) = dev.client("Good").await?;
    good.send(&json!({"type": "send", "key": "g1", "text": "I was here first"})).await?;

    let (mut bad, _, _) = dev.client("Bad").await?;
    good.wait_for(WAIT, |v| v["type"] == "ack").await?;
    let log_before = last_log(&dev).await?;
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
    // Refused input was refused before the log: not one Raft entry was written for it.
    assert_eq!(last_log(&dev).await?, log_before, "refused frames cost no log entries");

    // A frame over the size limit closes the socket with 1009.
    let huge = "y".repeat(20 * 1024);
    bad.send(&json!({"type": "send", "key": "huge", "text": huge})).await?;
    let (code, _) = next_closed(&mut bad).await?;
    assert_eq!(code, 1009);

    // Sending before start.
    let mut fresh = WsClient::connect(&dev.public, "/ws/client", None).await?;
    fresh.send(&json!({"type": "send", "key": "k", "text": "hi"})).await?;
    let refused = fresh.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!((refused["code"].clone(), refused["ref"].clone()), (json!("no_conversation"), json!("k")), "a send's error names it by its key: {refused}");
    // A `read` takes no `ref`: its error says which frame it answers.
    fresh.send(&json!({"type": "read", "upto": 1})).await?;
    let refused = fresh.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(refused, json!({"code": "no_conversation", "for": "read", "message": "send \"start\" or \"resume\" first", "type": "error"}));

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
            Err(ClientError::Handshake(message)) => assert!(message.contains("401"), "{path}: {message}"),
            Err(other) => panic!("{path}: unexpected error {other}"),
            Ok(_) => panic!("{path}: socket opened without a valid token"),
        }
    }
    // A client token (valid signature) is not an operator token.
    let (_, _, client_token) = dev.client("Ann").await?;
    match WsClient::connect(&dev.private, &format!("/ws/operator?token={client_token}"), None).await {
        Err(ClientError::Handshake(message)) => assert!(message.contains("403"), "{message}"),
        Err(other) => panic!("client token: unexpected error {other}"),
        Ok(_) => panic!("a client token opened an operator socket"),
    }
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
    match WsClient::connect(&dev.public, "/ws/client", Some("http://evil.example")).await {
        Err(ClientError::Handshake(message)) => assert!(message.contains("403"), "{message}"),
        Err(other) => panic!("foreign origin: unexpected error {other}"),
        Ok(_) => panic!("a foreign origin opened a client socket"),
    }

    // The Bearer scheme in any case (RFC 9110); a path no route serves and a method a
    // path does not take get the error body every answer has, the latter with `Allow`.
    let supervisor = dev.login("supervisor").await?;
    let answer = raw_request(&dev.private, &format!("GET /api/me HTTP/1.1\r\nHost: x\r\nAuthorization: bearer  {supervisor}\r\nConnection: close\r\n\r\n")).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = raw_request(&dev.private, "GET /api/nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    assert!(answer.starts_with("HTTP/1.1 404") && answer.contains("\"code\":\"not_found\""), "{answer}");
    let answer = raw_request(&dev.private, "DELETE /api/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    assert!(answer.starts_with("HTTP/1.1 405") && answer.contains("\"code\":\"method_not_allowed\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nallow: post"), "{answer}");
    let answer = raw_request(&dev.public, "PUT /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    assert!(answer.starts_with("HTTP/1.1 405") && answer.contains("\"code\":\"method_not_allowed\""), "{answer}");
    Ok(())
}

/// One HTTP/1.1 request written as it is; the whole answer, read until the server closes.
async fn raw_request(addr: &str, request: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_users_old_token_stops_working() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let supervisor = dev.login("supervisor").await?;
    let (status, _) = dev.api("GET", "/api/queues", Some(&supervisor), None).await?;
    assert_eq!(status, 200);
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    floor.wait_for(WAIT, |v| v["type"] == "floor").await?;

    let admin = dev.login("admin").await?;
    let body = json!({"password": "a-new-long-password", "role": "operator", "operator": "carol"});
    let (status, reply) = dev.api("PUT", "/api/users/supervisor", Some(&admin), Some(body)).await?;
    assert_eq!(status, 200, "{reply}");

    // The socket opened before the change is closed, not left watching the floor.
    let refused = floor.wait_for(Duration::from_secs(5), |v| v["type"] == "error").await?;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    assert_eq!(next_closed(&mut floor).await?.0, 4001);

    // The token is still correctly signed and unexpired, but no longer matches the user.
    let (status, reply) = dev.api("GET", "/api/queues", Some(&supervisor), None).await?;
    assert_eq!(status, 401, "{reply}");
    match WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await {
        Err(ClientError::Handshake(message)) => assert!(message.contains("401"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a demoted supervisor opened the floor socket"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_stays_dead_when_a_demotion_is_undone() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let supervisor = dev.login("supervisor").await?;
    assert_eq!(dev.api("GET", "/api/queues", Some(&supervisor), None).await?.0, 200);
    let admin = dev.login("admin").await?;
    // Role changes without a new password: demoted, then promoted back.
    for role in ["operator", "supervisor"] {
        let body = if role == "operator" { json!({"role": role, "operator": "carol"}) } else { json!({"role": role}) };
        let (status, reply) = dev.api("PUT", "/api/users/supervisor", Some(&admin), Some(body)).await?;
        assert_eq!(status, 200, "{reply}");
    }
    // The token from before the demotion names the role the login has again, but its
    // sessions ended with the demotion.
    let (status, reply) = dev.api("GET", "/api/queues", Some(&supervisor), None).await?;
    assert_eq!(status, 401, "a token survived a demotion: {reply}");
    let fresh = dev.login("supervisor").await?;
    assert_eq!(dev.api("GET", "/api/queues", Some(&fresh), None).await?.0, 200);

    // A password or a login name that `/api/login` would refuse is refused here too, and
    // nothing is stored: the login could never sign in.
    let (status, reply) = dev.api("PUT", "/api/users/dora", Some(&admin), Some(json!({"password": "p".repeat(1025), "role": "supervisor"}))).await?;
    assert_eq!((status, reply["code"].clone()), (400, json!("bad_request")), "{reply}");
    let long = "l".repeat(201);
    let (status, reply) = dev.api("PUT", &format!("/api/users/{long}"), Some(&admin), Some(json!({"password": "a-long-enough-password", "role": "supervisor"}))).await?;
    assert_eq!((status, reply["code"].clone()), (400, json!("bad_request")), "{reply}");
    let (_, users) = dev.api("GET", "/api/users", Some(&admin), None).await?;
    assert!(!users.to_string().contains("\"dora\"") && !users.to_string().contains(&long), "nothing stored: {users}");
    // At the bounds: stored, and it signs in.
    let (status, reply) = dev.api("PUT", "/api/users/dora", Some(&admin), Some(json!({"password": "p".repeat(1024), "role": "supervisor"}))).await?;
    assert_eq!(status, 200, "{reply}");
    let (status, _) = switchboard_gateway::client::http_json(&dev.private, "POST", "/api/login", None, Some(&json!({"login": "dora", "password": "p".repeat(1024)}))).await?;
    assert_eq!(status, 200, "a password of 1024 bytes signs in");

    // A caller without the route's role gets 403 whatever body it sent: the role is
    // checked before the body is read.
    let (status, reply) = dev.api("PUT", "/api/users/erin", Some(&fresh), Some(json!({}))).await?;
    assert_eq!((status, reply["code"].clone()), (403, json!("forbidden")), "a supervisor's malformed body to an admin route: {reply}");
    let alice = dev.login("alice").await?;
    let (status, reply) = dev.api("PUT", "/api/access/rules", Some(&alice), Some(json!({"list": 7}))).await?;
    assert_eq!((status, reply["code"].clone()), (403, json!("forbidden")), "an operator's malformed body to a supervisor route: {reply}");
    let (status, reply) = dev.api("PUT", "/api/users/erin", Some(&admin), Some(json!({}))).await?;
    assert_eq!((status, reply["code"].clone()), (400, json!("bad_request")), "the admin's malformed body is still 400: {reply}");
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
    // A calm client already connected before the flood, and an operator serving it.
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut calm, calm_conversation, _) = dev.client("Calm").await?;
    let offer = next_event(&mut alice, "offer").await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"]})).await?;
    next_event(&mut alice, "assigned").await?;

    // The flood is of real messages, so the refused ones would have cost log entries.
    let (mut flooder, flood_conversation, _) = dev.client("Flood").await?;
    for n in 0..300 {
        if flooder.send(&json!({"type": "send", "key": format!("f{n}"), "text": "spam"})).await.is_err() {
            break;
        }
    }
    let mut acked = Vec::new();
    let mut limited = 0;
    let close_code = loop {
        match flooder.next(WAIT).await? {
            Incoming::Json(v) if v["type"] == "ack" => acked.push(v["key"].as_str().unwrap_or_default().to_owned()),
            Incoming::Json(v) if v["type"] == "error" => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
            Incoming::Closed { code, .. } => break code,
            _ => {}
        }
    };
    assert_eq!(close_code, 4008);
    assert!(limited > 0 && !acked.is_empty(), "some sends pass the burst, the rest are refused ({} acked)", acked.len());
    assert!(acked.len() <= 40, "the burst allowance bounds what a flood writes: {} acked", acked.len());

    // Meanwhile the calm conversation goes on both ways.
    calm.send(&json!({"type": "send", "key": "c1", "text": "still here?"})).await?;
    calm.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "c1").await?;
    alice.wait_for(WAIT, |v| v["kind"] == "conversation" && v["entry"]["text"] == "still here?").await?;
    alice.send(&json!({"type": "send", "conversation": calm_conversation, "key": "r1", "text": "yes"})).await?;
    calm.wait_for(WAIT, |v| v["type"] == "event" && v["text"] == "yes").await?;

    // Every acknowledged flood message is in the history, in order; nothing refused is.
    let supervisor = dev.login("supervisor").await?;
    let (status, conv) = dev.api("GET", &format!("/api/conversations/{flood_conversation}"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{conv}");
    let keys: Vec<String> = conv["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["key"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    assert_eq!(keys, acked);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_operator_frames_get_documented_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    alice.send_text("[1, 2").await?;
    assert_eq!(alice.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "bad_json");
    alice.send(&json!({"type": "self_destruct"})).await?;
    assert_eq!(alice.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "unknown_type");
    alice.send(&json!({"type": "presence", "status": "asleep", "ref": "p"})).await?;
    assert_eq!(alice.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "bad_frame");
    alice.send(&json!({"type": "accept", "offer": 424242, "ref": "a"})).await?;
    let gone = alice.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(gone["ref"], "a");
    assert_eq!(gone["code"], "offer_gone", "{gone}");
    alice.send(&json!({"type": "send", "conversation": 424242, "key": "k", "text": "hello", "ref": "s"})).await?;
    assert_eq!(alice.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "not_found");
    // Over the operator surface's 64 KiB limit: closed with 1009.
    alice.send(&json!({"type": "send", "conversation": 1, "key": "big", "text": "z".repeat(70 * 1024)})).await?;
    assert_eq!(next_closed(&mut alice).await?.0, 1009);
    // The operator can come straight back.
    let (mut again, hello) = dev.operator("alice").await?;
    assert_eq!(hello["type"], "hello");
    again.send(&json!({"type": "ping"})).await?;
    again.wait_for(WAIT, |v| v["type"] == "pong").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_token_is_refused_on_every_admin_and_supervisor_endpoint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let alice = dev.login("alice").await?;
    let calls: Vec<(&str, &str, Option<serde_json::Value>)> = vec![
        ("PUT", "/api/skill-groups/x", Some(json!({"name": "x"}))),
        ("PUT", "/api/operators/mallory", Some(json!({"name": "Mallory", "capacity": 99, "groups": ["general"]}))),
        ("PUT", "/api/operators/alice", Some(json!({"name": "Alice", "capacity": 99, "groups": ["general"]}))),
        ("PUT", "/api/channels/x", Some(json!({"kind": "web", "name": "x", "default_group": "general"}))),
        ("PUT", "/api/users/alice", Some(json!({"password": "a-long-password", "role": "admin", "operator": "alice"}))),
        ("GET", "/api/users", None),
        ("GET", "/api/queues", None),
        ("POST", "/api/chaos/crash-actor", Some(json!({"stream": "operator", "id": "bob"}))),
    ];
    for (method, path, body) in calls {
        let (status, reply) = dev.api(method, path, Some(&alice), body).await?;
        assert_eq!(status, 403, "{method} {path}: {reply}");
        assert_eq!(reply["code"], "forbidden", "{method} {path}: {reply}");
    }
    // Nothing changed: alice is still an operator with her capacity.
    let admin = dev.login("admin").await?;
    let (_, users) = dev.api("GET", "/api/users", Some(&admin), None).await?;
    let alice_user = users["users"].as_array().and_then(|u| u.iter().find(|u| u["login"] == "alice")).cloned().unwrap_or_default();
    assert_eq!(alice_user["role"], "operator", "{users}");
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

/// Each `resume` replays a conversation's history from the point it names, and is
/// charged to its address by what it replays (a token per 200 entries): a whole long
/// history replayed again and again runs out of budget, while catching up on a few
/// entries costs a sliver; past the budget the socket keeps what it followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_replay_history_without_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let binary = switchboard_chaos_tests::binary()?;
    let flags = ["--client-resumes-per-minute", "2", "--client-messages-per-minute", "1000", "--conversation-messages-per-minute", "1000"];
    let dev = Dev::start_with(binary, &dir.path().join("data"), &flags).await?;
    let (first, conversation, token) = dev.client("Replayer").await?;
    // A history of about 220 entries (replaying it whole costs 1.1 of the budget of 2),
    // written by ten sockets of the visitor at once (each socket's frames are paced).
    let mut writers = vec![first];
    for _ in 0..9 {
        let mut socket = WsClient::connect(&dev.public, "/ws/client", None).await?;
        socket.send(&json!({"type": "resume", "token": token, "last_seq": 0})).await?;
        socket.wait_for(WAIT, |v| v["type"] == "resumed").await?;
        writers.push(socket);
    }
    let mut newest = 0;
    for round in 0..22 {
        for (w, socket) in writers.iter_mut().enumerate() {
            socket.send(&json!({"type": "send", "key": format!("m{round}-{w}"), "text": "a message to replay"})).await?;
        }
        for socket in writers.iter_mut() {
            let ack = socket.wait_for(WAIT, |v| v["type"] == "ack" || v["type"] == "error").await?;
            newest = newest.max(ack["seq"].as_u64().ok_or_else(|| anyhow::anyhow!("not acked: {ack}"))?);
        }
    }
    assert!(newest >= 220, "{newest}");
    let mut other = WsClient::connect(&dev.public, "/ws/client", None).await?;
    let resume = |last_seq: u64| json!({"type": "resume", "token": token, "last_seq": last_seq});
    other.send(&resume(0)).await?;
    let resumed = other.wait_for(WAIT, |v| v["type"] == "resumed" || v["type"] == "error").await?;
    assert_eq!((resumed["type"].clone(), resumed["conversation"].clone()), (json!("resumed"), json!(conversation)), "{resumed}");
    // Again and again: refused within a few (the budget refills by 2 a minute).
    let mut refused = None;
    for _ in 0..4 {
        other.send(&resume(0)).await?;
        let answer = other.wait_for(WAIT, |v| v["type"] == "resumed" || (v["type"] == "error" && v["code"] == "rate_limited")).await?;
        if answer["type"] == "error" {
            refused = Some(answer);
            break;
        }
    }
    let refused = refused.ok_or_else(|| anyhow::anyhow!("five whole replays in a row were all taken"))?;
    assert!(refused["message"].as_str().is_some_and(|m| m.contains("replays")), "{refused}");
    // Catching up on the last entry costs a sliver of what is left.
    other.send(&resume(newest)).await?;
    let caught_up = other.wait_for(WAIT, |v| v["type"] == "resumed" || (v["type"] == "error" && v["code"] == "rate_limited")).await?;
    assert_eq!(caught_up["type"], "resumed", "{caught_up}");
    // The socket follows its conversation: the visitor's next message is taken.
    other.send(&json!({"type": "send", "key": "last", "text": "still here"})).await?;
    let ack = other.wait_for(WAIT, |v| v["type"] == "ack" || v["type"] == "error").await?;
    assert_eq!(ack["type"], "ack", "{ack}");
    Ok(())
}

/// A staff socket opened with a token that then expires acts on nothing more: it gets
/// `unauthorized` and is closed with 4001 within the 2 s of its login checks, as REST
/// refuses the token from then on. The token is signed with the node's own key and
/// lasts 3 s (the server's last 12 hours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_staff_socket_closes_when_its_token_expires() -> anyhow::Result<()> {
    use switchboard_actors::model::Role;
    use switchboard_gateway::auth::{Subject, TokenKey};
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let key = TokenKey::new(&std::fs::read(dir.path().join("data").join("token.key"))?)?;
    let short = key.issue(Subject::Staff { login: "supervisor".into(), role: Role::Supervisor, operator: None, epoch: 0 }, Duration::from_secs(3));
    let (status, reply) = dev.api("GET", "/api/queues", Some(&short), None).await?;
    assert_eq!(status, 200, "the short token is taken while it lasts: {reply}");
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={short}"), None).await?;
    floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    let refused = floor.wait_for(Duration::from_secs(10), |v| v["type"] == "error").await?;
    assert_eq!((refused["code"].as_str(), refused["message"].as_str()), (Some("unauthorized"), Some("this socket's token expired; log in again")), "{refused}");
    assert_eq!(next_closed(&mut floor).await?, (4001, "token expired".to_string()));
    let (status, reply) = dev.api("GET", "/api/queues", Some(&short), None).await?;
    assert_eq!(status, 401, "{reply}");
    Ok(())
}
