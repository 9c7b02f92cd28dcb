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

/// `switchboard cluster split`: a node of one group, stopped, has its folder moved into
/// the split (two conversation shards) and starts as a split node where it left off: a
/// conversation assigned with its messages, one closed and rated, one waiting in the
/// queue; the visitor resumes and writes on, the operator gets the queued one offered
/// once back online, new conversations take new numbers, and the old folder is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_of_one_group_is_split_offline_and_goes_on_where_it_stopped() -> anyhow::Result<()> {
    use switchboard_chaos_tests::{cli, next_event, set_presence};
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    // Held by alice, with a message each way.
    let (mut held, held_id, held_token) = dev.client("Held").await?;
    let offer = next_event(&mut alice, "offer").await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a1"})).await?;
    next_event(&mut alice, "assigned").await?;
    send(&mut held, "h1", "before the split").await?;
    alice.send(&json!({"type": "send", "conversation": held_id, "key": "op1", "text": "an answer before it", "ref": "s1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "s1").await?;
    // Closed and rated.
    let (mut rated, rated_id, _) = dev.client("Rated").await?;
    let offer = next_event(&mut alice, "offer").await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a2"})).await?;
    next_event(&mut alice, "assigned").await?;
    rated.send(&json!({"type": "close"})).await?;
    rated.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "closed").await?;
    rated.send(&json!({"type": "rate", "score": 5})).await?;
    let supervisor = dev.login("supervisor").await?;
    eventually(WAIT, Duration::from_millis(50), || async {
        let (_, body) = dev.api("GET", &format!("/api/conversations/{rated_id}"), Some(&supervisor), None).await?;
        Ok(body["history"].as_array().is_some_and(|h| h.iter().any(|e| e["kind"] == "rated")).then_some(()))
    })
    .await?;
    // Waiting: alice is away.
    set_presence(&mut alice, "away").await?;
    let (queued, queued_id, _) = dev.client("Queued").await?;
    let before = |id: u64| {
        let (dev, supervisor) = (&dev, supervisor.clone());
        async move { dev.api("GET", &format!("/api/conversations/{id}"), Some(&supervisor), None).await.map(|(_, body)| body) }
    };
    let (held_before, rated_before) = (before(held_id).await?, before(rated_id).await?);
    drop((held, rated, queued, alice));
    dev.terminate().await?;

    // What a run killed before its swap leaves (a new folder without its layout file)
    // is made again by the next run.
    std::fs::create_dir_all(dir.path().join("data.split-new").join("records"))?;
    std::fs::write(dir.path().join("data.split-new").join("records").join("half"), b"cut short")?;
    let report = String::from_utf8(cli(["cluster", "split", "--data", &data.display().to_string(), "--shards", "2"], &[]).await?)?;
    assert!(report.contains("group 4:"), "four groups made: {report}");
    assert!(dir.path().join("data.one-group").join("records").exists(), "the old folder is kept");
    // The folder is split now: it no longer opens as one group.
    let refused = cli(["cluster", "split", "--data", &data.display().to_string()], &[]).await.expect_err("split twice");
    assert!(refused.to_string().contains("is split already"), "{refused}");
    // A crash between the swap's two renames: no folder in place. A start refuses
    // (it would make an empty cluster there), and the command run again finishes it.
    let unfinished = dir.path().join("data.split-new");
    std::fs::rename(&data, &unfinished)?;
    let refused = Dev::start_with(switchboard_chaos_tests::binary()?, &data, &["--shards", "2"]).await.err().expect("a start on an unfinished cut-over");
    assert!(format!("{refused:#}").contains("was interrupted"), "{refused:#}");
    assert!(!data.join("records").exists() && !data.join("layout").exists(), "the refused start made no node there");
    // (What the test's launcher made there, its log, clashes with the folder's own.)
    std::fs::remove_file(data.join("node.log"))?;
    let finished = String::from_utf8(cli(["cluster", "split", "--data", &data.display().to_string(), "--shards", "2"], &[]).await?)?;
    assert!(finished.contains("finished the cut-over"), "{finished}");

    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &data, &["--shards", "2"]).await?;
    let supervisor = dev.login("supervisor").await?;
    let after = |id: u64| {
        let (dev, supervisor) = (&dev, supervisor.clone());
        async move { dev.api("GET", &format!("/api/conversations/{id}"), Some(&supervisor), None).await.map(|(_, body)| body) }
    };
    let (held_after, rated_after) = (after(held_id).await?, after(rated_id).await?);
    assert_eq!(held_after["history"], held_before["history"], "the held conversation's history is as it was");
    assert_eq!(held_after["status"], json!({"state": "assigned", "operator": "alice"}));
    assert_eq!(rated_after["history"], rated_before["history"], "the rated one's too");
    assert_eq!(rated_after["status"]["state"], "closed");
    assert_eq!(after(queued_id).await?["status"]["state"], "queued");

    // The visitor resumes and writes on; alice, back, reads it and gets the queued one.
    let mut held = WsClient::connect(&dev.public, "/ws/client", None).await?;
    held.send(&json!({"type": "resume", "token": held_token, "last_seq": 0})).await?;
    let resumed = held.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    assert_eq!(resumed["conversation"], held_id);
    // A split node's desk follows a feed per group (protocol 2, ADR 0010).
    let token = dev.login("alice").await?;
    let mut alice = WsClient::connect(&dev.private, &format!("/ws/operator?token={token}&protocol=2"), None).await?;
    alice.wait_for(WAIT, |v| v["type"] == "hello").await?;
    send(&mut held, "h2", "after the split").await?;
    alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "after the split").await?;
    set_presence(&mut alice, "online").await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], queued_id, "the queued conversation is offered once alice is back");
    // New conversations take numbers no conversation had.
    let (_new, new_id, _) = dev.client("New").await?;
    assert!(new_id > queued_id.max(held_id).max(rated_id), "a new conversation is numbered after the old ones: {new_id}");
    Ok(())
}

async fn read(dev: &Dev, token: String, id: u64) -> anyhow::Result<Value> {
    dev.api("GET", &format!("/api/conversations/{id}"), Some(&token), None).await.map(|(_, body)| body)
}

/// The cut-over of a cluster of three nodes of one group: every node stopped, node 1's
/// folder split, node 1 started on it alone, nodes 2 and 3 started with empty folders
/// and `join = true`. They are admitted, receive the split groups as snapshots, and
/// serve the conversations written before the cut-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_one_group_is_split_through_one_node_and_the_others_join_it() -> anyhow::Result<()> {
    use switchboard_chaos_tests::{cli, Cluster};
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start_one_group(dir.path(), 3).await?;
    let one = cluster.node(1);
    let (mut waiting, waiting_id, _) = one.client("Waiting").await?;
    for n in 0..3 {
        send(&mut waiting, &format!("w{n}"), &format!("written before the split {n}")).await?;
    }
    let (mut gone, gone_id, _) = one.client("Gone").await?;
    send(&mut gone, "g0", "and then I left").await?;
    gone.send(&json!({"type": "close"})).await?;
    gone.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "closed").await?;
    drop((waiting, gone));
    cluster.settled(Duration::from_secs(30)).await?;
    let supervisor = one.login("supervisor").await?;
    let (waiting_before, gone_before) = (read(one, supervisor.clone(), waiting_id).await?, read(one, supervisor, gone_id).await?);
    assert_eq!(texts(&waiting_before).len(), 3);
    for id in [3, 2, 1] {
        cluster.stop(id).await?;
    }

    let folder = |id: usize| cluster.dir.join(format!("data/node-{id}"));
    cli(["cluster", "split", "--data", &folder(1).display().to_string(), "--node-id", "1", "--shards", "2"], &[]).await?;
    for id in 1..=3 {
        let file = cluster.dir.join(format!("node-{id}.toml"));
        let text = std::fs::read_to_string(&file)?;
        let join = if id == 1 { "join = false" } else { "join = true" };
        std::fs::write(&file, text.replace("join = false", &format!("{join}\nshards = 2")))?;
        if id > 1 {
            std::fs::remove_dir_all(folder(id))?;
        }
    }
    cluster.restart(1).await?;
    cluster.restart(2).await?;
    cluster.restart(3).await?;
    // Every node comes to vote in every group (placement), then holds the same state.
    let voters_everywhere = |status: &Value| {
        status["groups"].as_array().is_some_and(|groups| {
            groups.len() == 4 && groups.iter().all(|g| g["voters"].as_array().is_some_and(|v| v.len() == 3))
        })
    };
    eventually(Duration::from_secs(60), Duration::from_millis(200), || async { Ok(voters_everywhere(&cluster.status(1).await?).then_some(())) })
        .await
        .map_err(|e| anyhow::anyhow!("nodes 2 and 3 vote in every group: {e}"))?;
    cluster.settled(Duration::from_secs(30)).await?;
    for id in 1..=3 {
        let node = cluster.node(id);
        let supervisor = node.login("supervisor").await?;
        let waiting_after = read(node, supervisor.clone(), waiting_id).await?;
        assert_eq!(waiting_after["history"], waiting_before["history"], "node {id} holds the waiting conversation as it was");
        assert_eq!(waiting_after["status"]["state"], "queued", "node {id}");
        let gone_after = read(node, supervisor, gone_id).await?;
        assert_eq!(gone_after["history"], gone_before["history"], "node {id} holds the closed one");
    }
    // The split cluster takes new conversations.
    let (_new, new_id, _) = cluster.node(2).client("New").await?;
    assert!(new_id > waiting_id.max(gone_id));
    Ok(())
}
