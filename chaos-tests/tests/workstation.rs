//! Server features the workstation, supervisor console and widget rely on: attachments
//! with limits, templates, tags, reassignment, the client card, read marks and the
//! supervisor's live floor, with roles enforced by the server.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_chaos_tests::{next_event, request_head, set_presence, Dev, HttpConn, HttpOutcome, WAIT};
use switchboard_gateway::client::WsClient;

async fn dev() -> anyhow::Result<(tempfile::TempDir, Dev)> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    Ok((dir, dev))
}

/// Raw-body upload, as browsers send it.
async fn upload(addr: &str, path: &str, bearer: Option<&str>, content_type: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder().method("POST").uri(path).header("host", addr).header("content-type", content_type);
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender.send_request(request.body(Full::new(bytes::Bytes::from(body)))?).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

async fn assigned_to_alice(dev: &Dev, alice: &mut WsClient) -> anyhow::Result<(WsClient, u64, String)> {
    let (client, conversation, token) = dev.client("Ann").await?;
    let offer = next_event(alice, "offer").await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"]})).await?;
    next_event(alice, "assigned").await?;
    Ok((client, conversation, token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_are_limited_by_size_and_type_and_reach_the_other_side() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut client, conversation, token) = assigned_to_alice(&dev, &mut alice).await?;

    // Refused on its declared length, before a byte of the body is sent (a client
    // that goes on sending after the answer finds the connection closed).
    let mut conn = HttpConn::connect(&dev.public).await?;
    let head = request_head("POST", &format!("/attachments?token={token}&name=big.png"), &dev.public, &[("Content-Type", "image/png")], Some(5 * 1024 * 1024 + 10));
    conn.send(&head).await?;
    let HttpOutcome::Response(response) = conn.read_response(WAIT).await else { anyhow::bail!("no answer to an oversized upload") };
    assert_eq!(response.status, 413, "{:?}", response.json());
    assert_eq!(response.json()["code"], "too_large");
    let (status, body) = upload(&dev.public, &format!("/attachments?token={token}&name=x.exe"), None, "application/x-msdownload", b"MZ".to_vec()).await?;
    assert_eq!(status, 415, "{body}");
    assert_eq!(body["code"], "unsupported_type");
    let (status, _) = upload(&dev.public, "/attachments?token=forged&name=a.txt", None, "text/plain", b"hi".to_vec()).await?;
    assert_eq!(status, 401);

    let (status, file) = upload(&dev.public, &format!("/attachments?token={token}&name=../receipt.pdf"), None, "application/pdf", b"%PDF-1.4 test".to_vec()).await?;
    assert_eq!(status, 201, "{file}");
    assert_eq!(file["name"], "receipt.pdf");
    client.send(&json!({"type": "send", "key": "a1", "text": "", "attachments": [file["id"]]})).await?;
    client.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "a1").await?;
    let event = next_event(&mut alice, "conversation").await?;
    assert_eq!(event["entry"]["attachments"][0]["id"], file["id"]);

    // The operator downloads it; bob, who never held the conversation, may not.
    let alice_token = dev.login("alice").await?;
    let id = file["id"].as_str().unwrap();
    let (status, _) = dev.api("GET", &format!("/api/attachments/{id}"), Some(&alice_token), None).await?;
    assert_eq!(status, 200);
    let bob_token = dev.login("bob").await?;
    let (status, _) = dev.api("GET", &format!("/api/attachments/{id}"), Some(&bob_token), None).await?;
    assert_eq!(status, 403);
    // Another visitor's token does not open it.
    let (_, _, other_token) = dev.client("Eve").await?;
    let (status, _) = switchboard_gateway::client::http_json(&dev.public, "GET", &format!("/attachments/{id}?token={other_token}"), None, None).await?;
    assert_eq!(status, 404);

    // Operator uploads go to conversations they hold.
    let (status, reply) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name=howto.txt"), Some(&alice_token), "text/plain", b"steps".to_vec()).await?;
    assert_eq!(status, 201, "{reply}");
    let (status, _) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name=x.txt"), Some(&bob_token), "text/plain", b"x".to_vec()).await?;
    assert_eq!(status, 403);
    // An attachment from elsewhere cannot be smuggled into a message.
    client.send(&json!({"type": "send", "key": "a2", "attachments": ["00000000000000000000000000000000"]})).await?;
    assert_eq!(client.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "not_found");

    // The declared type must match the bytes: a page posing as a PNG is refused.
    let disguised = b"<html><script>alert(1)</script></html>".to_vec();
    let (status, body) = upload(&dev.public, &format!("/attachments?token={token}&name=cat.png"), None, "image/png", disguised).await?;
    assert_eq!(status, 415, "{body}");
    assert_eq!(body["code"], "unsupported_type");
    assert!(body["message"].as_str().unwrap_or_default().contains("content"), "{body}");
    let png = [b"\x89PNG\r\n\x1a\n".as_slice(), &[0u8; 16]].concat();
    let (status, body) = upload(&dev.public, &format!("/attachments?token={token}&name=cat.png"), None, "image/png", png).await?;
    assert_eq!(status, 201, "{body}");

    // A conversation's quota of files: past it, a clear refusal and no file kept.
    let stored = |dir: &std::path::Path| std::fs::read_dir(dir.join("attachments")).map(|d| d.count()).unwrap_or(0);
    let mut accepted = 3; // the PDF, the operator's note and the PNG above
    let refused = loop {
        let (status, body) = upload(&dev.public, &format!("/attachments?token={token}&name=n{accepted}.txt"), None, "text/plain", b"note".to_vec()).await?;
        if status != 201 {
            break body;
        }
        accepted += 1;
        anyhow::ensure!(accepted <= 60, "no quota after {accepted} files");
    };
    assert_eq!(accepted, switchboard_actors::core::MAX_ATTACHMENTS_PER_CONVERSATION);
    assert_eq!(refused["code"], "invalid", "{refused}");
    assert!(refused["message"].as_str().unwrap_or_default().contains("at most"), "{refused}");
    assert_eq!(stored(&dev.data_dir), accepted, "a refused upload leaves no file behind");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_scoped_by_group_and_owner() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let alice = dev.login("alice").await?;
    let bob = dev.login("bob").await?;
    let supervisor = dev.login("supervisor").await?;
    let ids = |v: &Value| -> Vec<String> { v["templates"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect() };

    let (_, list) = dev.api("GET", "/api/templates", Some(&alice), None).await?;
    let mine = ids(&list);
    assert!(mine.contains(&"greeting".to_string()) && mine.contains(&"refund".to_string()), "{list}");
    assert!(!mine.contains(&"restart".to_string()), "alice is not in tech: {list}");

    let (status, _) = dev.api("PUT", "/api/templates/promo", Some(&alice), Some(json!({"title": "Promo", "text": "Hi", "group": "general"}))).await?;
    assert_eq!(status, 403, "operators do not write shared templates");
    let (status, _) = dev.api("PUT", "/api/templates/alice-sig", Some(&alice), Some(json!({"title": "Signature", "text": "— {{operator.name}}"}))).await?;
    assert_eq!(status, 200);
    let (status, _) = dev.api("PUT", "/api/templates/alice-sig/favourite", Some(&alice), Some(json!({"favourite": true}))).await?;
    assert_eq!(status, 200);
    let (_, list) = dev.api("GET", "/api/templates", Some(&alice), None).await?;
    let sig = list["templates"].as_array().unwrap().iter().find(|t| t["id"] == "alice-sig").unwrap().clone();
    assert_eq!(sig["favourite"], true);
    let (_, list) = dev.api("GET", "/api/templates", Some(&bob), None).await?;
    assert!(!ids(&list).contains(&"alice-sig".to_string()), "personal templates stay personal");
    let (status, _) = dev.api("DELETE", "/api/templates/alice-sig", Some(&bob), None).await?;
    assert_eq!(status, 403);
    let (status, _) = dev.api("PUT", "/api/templates/promo", Some(&supervisor), Some(json!({"title": "Promo", "text": "Hi", "group": "general"}))).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_sees_the_floor_live_and_reassigns() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let alice_token = dev.login("alice").await?;
    assert!(WsClient::connect(&dev.private, &format!("/ws/supervisor?token={alice_token}"), None).await.is_err(), "operators have no floor");
    let supervisor = dev.login("supervisor").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let waiting = |v: &Value| v["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general")).map(|g| g["waiting"].as_u64().unwrap_or(0));
    let first = floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    assert_eq!(waiting(&first), Some(0));

    let (_client, conversation, _) = dev.client("Ann").await?;
    floor.wait_for(WAIT, |v| v["type"] == "floor" && waiting(v) == Some(1)).await?;

    // Reassign the queued conversation to bob: operators may not, supervisors may.
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "break").await?;
    let path = format!("/api/conversations/{conversation}/reassign");
    let (status, _) = dev.api("POST", &path, Some(&alice_token), Some(json!({"operator": "bob"}))).await?;
    assert_eq!(status, 403);
    let (status, body) = dev.api("POST", &path, Some(&supervisor), Some(json!({"operator": "bob", "comment": "VIP"}))).await?;
    assert_eq!(status, 200, "{body}");
    let assigned = next_event(&mut bob, "assigned").await?;
    assert!(assigned["history"].as_array().unwrap().iter().any(|e| e["kind"] == "transferred" && e["from"] == "supervisor"));
    let live = floor
        .wait_for(WAIT, |v| {
            v["operators"].as_array().is_some_and(|ops| ops.iter().any(|o| o["id"] == "bob" && o["load"] == 1 && o["presence"] == "break"))
        })
        .await?;
    assert_eq!(waiting(&live), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_tags_client_card_and_read_marks() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let mut first = WsClient::connect(&dev.public, "/ws/client", None).await?;
    first.send(&json!({"type": "start", "name": "Ann"})).await?;
    let started = first.wait_for(WAIT, |v| v["type"] == "started").await?;
    let earlier_id = started["conversation"].as_u64().unwrap();
    let client_token = started["token"].as_str().unwrap_or_default().to_owned();
    let visitor_token = started["visitor_token"].as_str().unwrap_or_default().to_owned();
    assert!(!visitor_token.is_empty(), "the gateway issues the visitor's identity: {started}");
    let offer = next_event(&mut alice, "offer").await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"]})).await?;
    next_event(&mut alice, "assigned").await?;
    first.send(&json!({"type": "send", "key": "k1", "text": "hello"})).await?;
    first.wait_for(WAIT, |v| v["type"] == "ack").await?;

    // Read marks travel both ways live, and are committed.
    first.send(&json!({"type": "read", "upto": 3})).await?;
    let read = alice.wait_for(WAIT, |v| v["type"] == "read").await?;
    assert_eq!(read["by"], "client");
    alice.send(&json!({"type": "read", "conversation": earlier_id, "upto": 4})).await?;
    assert_eq!(first.wait_for(WAIT, |v| v["type"] == "read").await?["by"], "operator");
    // After a reconnect each side learns where the other had read to.
    drop(first);
    let mut back = WsClient::connect(&dev.public, "/ws/client", None).await?;
    back.send(&json!({"type": "resume", "token": client_token, "last_seq": 0})).await?;
    let resumed = back.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    assert_eq!(resumed["operator_read_upto"], 4, "{resumed}");
    let (_again, hello) = dev.operator("alice").await?;
    let marks = hello["read_marks"].as_array().and_then(|m| m.iter().find(|m| m["conversation"] == earlier_id)).cloned().unwrap_or_default();
    assert_eq!(marks["client_read_upto"], 3, "{hello}");

    alice.send(&json!({"type": "close", "conversation": earlier_id, "tags": ["x".repeat(41)], "ref": "bad"})).await?;
    assert_eq!(alice.wait_for(WAIT, |v| v["type"] == "error").await?["code"], "invalid");
    alice.send(&json!({"type": "close", "conversation": earlier_id, "resolution": "solved", "tags": ["billing", "refund"], "ref": "c"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "c").await?;

    // The same visitor comes back with their signed identity: the card lists the earlier one.
    let mut second = WsClient::connect(&dev.public, "/ws/client", None).await?;
    second.send(&json!({"type": "start", "name": "Ann", "visitor_token": visitor_token})).await?;
    let started = second.wait_for(WAIT, |v| v["type"] == "started").await?;
    let now_id = started["conversation"].as_u64().unwrap();
    let offer = alice.wait_for(Duration::from_secs(10), |v| v["kind"] == "offer" && v["conversation"] == now_id).await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"]})).await?;
    alice.wait_for(WAIT, |v| v["kind"] == "assigned" && v["conversation"] == now_id).await?;
    let token = dev.login("alice").await?;
    let (status, card) = dev.api("GET", &format!("/api/conversations/{now_id}"), Some(&token), None).await?;
    assert_eq!(status, 200, "{card}");
    assert_eq!(card["earlier"][0]["conversation"], earlier_id);
    assert_eq!(card["earlier"][0]["state"], "closed");
    assert_eq!(card["earlier_complete"], true, "every conversation shard answered: {card}");
    let (status, old) = dev.api("GET", &format!("/api/conversations/{earlier_id}"), Some(&token), None).await?;
    assert_eq!(status, 200, "the operator serving this visitor reads their earlier conversations");
    assert_eq!(old["client_read_upto"], 3);
    let bob = dev.login("bob").await?;
    let (status, _) = dev.api("GET", &format!("/api/conversations/{earlier_id}"), Some(&bob), None).await?;
    assert_eq!(status, 403, "but not an operator who serves nobody of theirs");
    let closed = old["history"].as_array().unwrap().iter().find(|e| e["kind"] == "closed").unwrap().clone();
    assert_eq!(closed["tags"], json!(["billing", "refund"]));
    assert_eq!(closed["resolution"], "solved");

    // Someone claiming to be Ann, by a made-up id or a tampered token, is a new visitor:
    // they cannot make an operator see Ann's history as theirs.
    let visitor_id = card["visitor"]["attributes"]["claimed_visitor_id"].clone();
    assert!(visitor_id.is_null(), "a signed visitor carries no claimed id: {card}");
    let (body, mac) = visitor_token.rsplit_once('.').unwrap_or_default();
    // Ann's real visitor id is in her token's (signed, not secret) body.
    use base64::Engine;
    let claims: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body.trim_start_matches("v1."))?)?;
    let ann = claims["visitor"].as_str().unwrap_or_default().to_owned();
    assert!(ann.starts_with("v-"), "{claims}");
    for claim in [
        json!({"type": "start", "name": "Mallory", "visitor_id": ann}),
        json!({"type": "start", "name": "Mallory", "visitor_token": format!("{body}A.{mac}")}),
    ] {
        let mut impostor = WsClient::connect(&dev.public, "/ws/client", None).await?;
        impostor.send(&claim).await?;
        let started = impostor.wait_for(WAIT, |v| v["type"] == "started").await?;
        let id = started["conversation"].as_u64().unwrap();
        let admin = dev.login("supervisor").await?;
        let (_, card) = dev.api("GET", &format!("/api/conversations/{id}"), Some(&admin), None).await?;
        assert_eq!(card["earlier"], json!([]), "an impostor is linked to nobody: {card}");
    }
    Ok(())
}
/// A CORS request as a browser on another site would make it.
async fn preflight(addr: &str, path: &str, origin: &str) -> anyhow::Result<(u16, Option<String>)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method("OPTIONS")
        .uri(path)
        .header("host", addr)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let allow = response.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok((response.status().as_u16(), allow))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_users_and_embedding_sites_get_cors_for_files_only_when_allowed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let binary = switchboard_chaos_tests::binary()?;
    let dev = Dev::start_with(binary, &dir.path().join("data"), &["--client-origin", "https://shop.example"]).await?;
    let admin = dev.login("admin").await?;
    let (status, users) = dev.api("GET", "/api/users", Some(&admin), None).await?;
    assert_eq!(status, 200);
    let logins: Vec<&str> = users["users"].as_array().unwrap().iter().filter_map(|u| u["login"].as_str()).collect();
    assert!(logins.contains(&"alice") && logins.contains(&"admin"), "{users}");
    assert!(!users.to_string().contains("argon2"), "password hashes never leave the server");
    let supervisor = dev.login("supervisor").await?;
    let (status, _) = dev.api("GET", "/api/users", Some(&supervisor), None).await?;
    assert_eq!(status, 403);

    let (status, allow) = preflight(&dev.public, "/attachments?token=x&name=a.png", "https://shop.example").await?;
    assert_eq!(status, 204);
    assert_eq!(allow.as_deref(), Some("https://shop.example"));
    let (status, allow) = preflight(&dev.public, "/attachments?token=x&name=a.png", "https://evil.example").await?;
    assert_eq!(status, 403);
    assert_eq!(allow, None);
    Ok(())
}
