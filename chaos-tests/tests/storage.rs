//! State on disk, through the real binary: a closed conversation leaves memory but its
//! history, rating and decision records stay readable, from the records, before and
//! after a `kill -9` and restart; open conversations come back as they were.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_chaos_tests::{eventually, Dev, WAIT};
use switchboard_gateway::client::WsClient;

fn metric(metrics: &Value, name: &str) -> Option<u64> {
    metrics.as_str()?.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' '))).and_then(|v| v.trim().parse().ok())
}

async fn open_conversations(dev: &Dev) -> anyhow::Result<u64> {
    let (_, metrics) = dev.api("GET", "/metrics", None, None).await?;
    metric(&metrics, "switchboard_conversations_open").ok_or_else(|| anyhow::anyhow!("no switchboard_conversations_open in /metrics"))
}

fn texts(conversation: &Value) -> Vec<String> {
    conversation["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["text"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

async fn send(ws: &mut WsClient, key: &str, text: &str) -> anyhow::Result<()> {
    ws.send(&json!({"type": "send", "key": key, "text": text})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == key).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_conversation_is_read_from_disk_before_and_after_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data).await?;

    // One conversation that will be closed and one that stays open.
    let (mut closing, closed_id, closed_token) = dev.client("Closing").await?;
    let (mut open, open_id, _) = dev.client("Staying").await?;
    for n in 0..3 {
        send(&mut closing, &format!("c{n}"), &format!("closing message {n}")).await?;
    }
    send(&mut open, "o0", "still here").await?;
    assert_eq!(open_conversations(&dev).await?, 2);

    closing.send(&json!({"type": "close"})).await?;
    let supervisor = dev.login("supervisor").await?;
    let path = format!("/api/conversations/{closed_id}");
    let closed = eventually(WAIT, Duration::from_millis(50), || async {
        let (status, body) = dev.api("GET", &path, Some(&supervisor), None).await?;
        Ok((status == 200 && body["status"]["state"] == "closed").then_some(body))
    })
    .await?;
    // It left memory; its history is read from the records.
    assert_eq!(open_conversations(&dev).await?, 1, "only the open conversation stays in memory");
    assert_eq!(texts(&closed), ["closing message 0", "closing message 1", "closing message 2"]);
    let (status, decisions) = dev.api("GET", &format!("{path}/decisions"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{decisions}");

    // The visitor comes back to rate it: resume finds it on disk, the rating commits.
    drop(closing);
    let mut again = WsClient::connect(&dev.public, "/ws/client", None).await?;
    again.send(&json!({"type": "resume", "token": closed_token, "last_seq": 0})).await?;
    let resumed = again.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    assert_eq!(resumed["conversation"], closed_id);
    let last_seq = resumed["last_seq"].as_u64().unwrap_or(0);
    assert!(last_seq >= 5, "started, queued, three messages and the close: {resumed}");
    again.send(&json!({"type": "rate", "score": 5, "comment": "thanks"})).await?;
    eventually(WAIT, Duration::from_millis(50), || async {
        let (_, body) = dev.api("GET", &path, Some(&supervisor), None).await?;
        let rated = body["history"].as_array().is_some_and(|h| h.iter().any(|e| e["kind"] == "rated" && e["score"] == 5));
        Ok(rated.then_some(()))
    })
    .await?;
    // Rated once: a second rating is refused, decided from the record on disk.
    again.send(&json!({"type": "rate", "score": 1})).await?;
    let refused = again.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(refused["code"], "invalid", "{refused}");
    assert_eq!(open_conversations(&dev).await?, 1);
    let before_restart = dev.api("GET", &path, Some(&supervisor), None).await?.1;
    drop(again);
    drop(open);

    dev.kill9().await?;
    let dev = Dev::start(&data).await?;
    let supervisor = dev.login("supervisor").await?;
    let (status, after) = dev.api("GET", &path, Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["history"], before_restart["history"], "the closed conversation's history and rating survive the restart");
    assert_eq!(after["status"]["state"], "closed");
    assert_eq!(open_conversations(&dev).await?, 1, "the open conversation is back in memory, the closed one is not");
    let (_, open_after) = dev.api("GET", &format!("/api/conversations/{open_id}"), Some(&supervisor), None).await?;
    assert_eq!(texts(&open_after), ["still here"]);
    assert_ne!(open_after["status"]["state"], "closed");
    Ok(())
}

fn stored_files(dev: &Dev) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(dev.data_dir.join("attachments"))?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_file())).count())
}

/// A channel's retention deletes its closed conversations once they are older than it:
/// history, rating, decision records, the attachment record and the file. It runs as a
/// committed command, so it is the same on every replica and survives a restart; open
/// conversations and younger ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_conversations_with_their_files() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data).await?;
    let admin = dev.login("admin").await?;
    let supervisor = dev.login("supervisor").await?;

    let (mut expiring, expiring_id, token) = dev.client("Expiring").await?;
    let (status, upload) = switchboard_chaos_tests::client_upload(&dev, &token, "note.txt", "text/plain", b"a note").await?;
    assert_eq!(status, 201, "{upload}");
    let attachment = upload["id"].as_str().unwrap_or_default().to_owned();
    expiring.send(&json!({"type": "send", "key": "k", "text": "see attached", "attachments": [attachment]})).await?;
    expiring.wait_for(WAIT, |v| v["type"] == "ack").await?;
    expiring.send(&json!({"type": "close"})).await?;
    let (mut staying, staying_id, _) = dev.client("Staying").await?;
    send(&mut staying, "s", "open and kept").await?;
    let path = format!("/api/conversations/{expiring_id}");
    eventually(WAIT, Duration::from_millis(50), || async {
        let (_, body) = dev.api("GET", &path, Some(&supervisor), None).await?;
        Ok((body["status"]["state"] == "closed").then_some(()))
    })
    .await?;
    assert_eq!(stored_files(&dev)?, 1);

    // Keep the web channel's closed conversations one day.
    let (_, channels) = dev.api("GET", "/api/channels", Some(&admin), None).await?;
    let web = channels["channels"].as_array().and_then(|c| c.iter().find(|c| c["id"] == "web")).cloned().unwrap_or_default();
    let body = json!({"kind": web["kind"], "name": web["name"], "default_group": web["default_group"], "retention_days": 1});
    let (status, reply) = dev.api("PUT", "/api/channels/web", Some(&admin), Some(body)).await?;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["retention_days"], 1);

    // Not yet a day old: the purge keeps it.
    let (status, reply) = dev.api("POST", "/api/chaos/purge", Some(&admin), Some(json!({}))).await?;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(dev.api("GET", &path, Some(&supervisor), None).await?.0, 200);

    // Two days on, it is gone with its file; the open conversation stays.
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 + 2 * 86_400_000;
    let (status, reply) = dev.api("POST", "/api/chaos/purge", Some(&admin), Some(json!({"as_of": later}))).await?;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(dev.api("GET", &path, Some(&supervisor), None).await?.0, 404);
    assert_eq!(dev.api("GET", &format!("/api/attachments/{attachment}"), Some(&supervisor), None).await?.0, 404);
    eventually(WAIT, Duration::from_millis(50), || async { Ok((stored_files(&dev)? == 0).then_some(())) }).await?;
    let (status, open) = dev.api("GET", &format!("/api/conversations/{staying_id}"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{open}");
    assert_eq!(texts(&open), ["open and kept"]);
    // The visitor's token no longer finds it.
    let mut again = WsClient::connect(&dev.public, "/ws/client", None).await?;
    again.send(&json!({"type": "resume", "token": token, "last_seq": 0})).await?;
    let refused = again.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(refused["code"], "not_found", "{refused}");
    drop((expiring, staying, again));

    // Deleted for good: a restart does not bring it back; the setting stays.
    dev.kill9().await?;
    let dev = Dev::start(&data).await?;
    let supervisor = dev.login("supervisor").await?;
    assert_eq!(dev.api("GET", &path, Some(&supervisor), None).await?.0, 404);
    let admin = dev.login("admin").await?;
    let (_, channels) = dev.api("GET", "/api/channels", Some(&admin), None).await?;
    let web = channels["channels"].as_array().and_then(|c| c.iter().find(|c| c["id"] == "web")).cloned().unwrap_or_default();
    assert_eq!(web["retention_days"], 1, "{web}");
    Ok(())
}

async fn active_actors(dev: &Dev) -> anyhow::Result<u64> {
    let (_, metrics) = dev.api("GET", "/metrics", None, None).await?;
    metric(&metrics, "switchboard_actors_active").ok_or_else(|| anyhow::anyhow!("no switchboard_actors_active in /metrics"))
}

/// Visitors who close their conversation and leave take its actor with them within a
/// few seconds (not the minute of the periodic idle check): memory does not grow with
/// the rate conversations come and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_conversation_s_actor_stops_soon_after_its_visitor_leaves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let mut visitors = Vec::new();
    for n in 0..20 {
        let (mut ws, _, _) = dev.client(&format!("Visitor {n}")).await?;
        send(&mut ws, &format!("v{n}"), "hello").await?;
        visitors.push(ws);
    }
    let followed = active_actors(&dev).await?;
    assert!(followed >= 20, "one actor per followed conversation: {followed}");
    for ws in &mut visitors {
        ws.send(&json!({"type": "close"})).await?;
        ws.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "closed").await?;
    }
    for ws in visitors {
        ws.close().await;
    }
    let settled = eventually(WAIT, Duration::from_millis(100), || async {
        let now = active_actors(&dev).await?;
        Ok((now + 20 <= followed).then_some(now))
    })
    .await?;
    assert!(settled + 20 <= followed, "{followed} actors while followed, {settled} after the visitors left");
    assert_eq!(open_conversations(&dev).await?, 0);
    Ok(())
}
