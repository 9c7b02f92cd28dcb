//! A chat end to end against the real binary: routing, capacity, decline and timeout,
//! transfer, resume, and actor supervision.

use std::time::Duration;

use anyhow::Context;

use serde_json::{json, Value};
use switchboard_chaos_tests::{next_event, set_presence, Dev, WAIT};
use switchboard_gateway::client::WsClient;

async fn dev() -> anyhow::Result<(tempfile::TempDir, Dev)> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    Ok((dir, dev))
}

async fn set_offer_timeout(dev: &Dev, group: &str, ms: u64) -> anyhow::Result<()> {
    let admin = dev.login("admin").await?;
    let (status, body) = dev
        .api("PUT", &format!("/api/skill-groups/{group}"), Some(&admin), Some(json!({"name": group, "offer_timeout_ms": ms})))
        .await?;
    anyhow::ensure!(status == 200, "set timeout: {status} {body}");
    Ok(())
}

async fn send(ws: &WsClient, key: &str, text: &str) -> anyhow::Result<()> {
    ws.send(&json!({"type": "send", "key": key, "text": text})).await?;
    Ok(())
}

async fn accept(ws: &mut WsClient, offer: &Value) -> anyhow::Result<Value> {
    ws.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "accept"})).await?;
    next_event(ws, "assigned").await
}

/// Alice, the only operator online, declines Ann's conversation, which then waits for a
/// new round. Returns alice's socket, Ann's, the conversation and the declined offer.
async fn declined_by_the_only_operator(dev: &Dev, offer_timeout_ms: u64) -> anyhow::Result<(WsClient, WsClient, u64, Value)> {
    set_offer_timeout(dev, "general", offer_timeout_ms).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (client, conversation, _) = dev.client("Ann").await?;
    let offer = next_event(&mut alice, "offer").await?;
    alice.send(&json!({"type": "decline", "offer": offer["offer"], "reason": "one moment", "ref": "d"})).await?;
    next_event(&mut alice, "offer_withdrawn").await?;
    Ok((alice, client, conversation, offer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_message_reaches_operator_and_reply_reaches_client() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, hello) = dev.operator("alice").await?;
    assert_eq!(hello["presence"], "offline");
    set_presence(&mut alice, "online").await?;

    let (mut client, conversation, _) = dev.client("Ann").await?;
    send(&client, "k1", "Hello, my invoice is wrong").await?;
    let ack = client.wait_for(WAIT, |v| v["type"] == "ack").await?;
    assert_eq!(ack["key"], "k1");
    assert_eq!(ack["duplicate"], false);

    // Queued in the channel's default group (general), offered to the only online operator.
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], conversation);
    assert_eq!(offer["group"], "general");
    let assigned = accept(&mut alice, &offer).await?;
    let texts: Vec<&str> = assigned["history"].as_array().unwrap().iter().filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(texts, vec!["Hello, my invoice is wrong"], "the operator sees the history on accept");

    alice.send(&json!({"type": "send", "conversation": conversation, "key": "r1", "text": "Let me check that for you"})).await?;
    let reply = client.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "message" && v["from"] == "operator").await?;
    assert_eq!(reply["text"], "Let me check that for you");
    assert_eq!(reply["name"], "Alice");

    // The decision record explains the choice.
    let supervisor = dev.login("supervisor").await?;
    let (status, decisions) = dev.api("GET", &format!("/api/conversations/{conversation}/decisions"), Some(&supervisor), None).await?;
    assert_eq!(status, 200);
    let record = &decisions["decisions"][0];
    assert_eq!(record["chosen"], "alice");
    assert_eq!(record["policy"], "longest_idle");
    let bob = record["candidates"].as_array().unwrap().iter().find(|c| c["operator"] == "bob").unwrap();
    assert_eq!(bob["excluded"], "offline");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_never_exceeds_capacity_and_third_waits_for_a_free_slot() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, hello) = dev.operator("alice").await?;
    assert_eq!(hello["capacity"], 2);
    set_presence(&mut alice, "online").await?;

    let mut conversations = Vec::new();
    for name in ["One", "Two", "Three"] {
        let (ws, id, _) = dev.client(name).await?;
        conversations.push((ws, id));
    }
    let first = next_event(&mut alice, "offer").await?;
    let second = next_event(&mut alice, "offer").await?;
    accept(&mut alice, &first).await?;
    accept(&mut alice, &second).await?;
    assert_eq!(first["conversation"], conversations[0].1);
    assert_eq!(second["conversation"], conversations[1].1);

    // The third waits: alice is full, and the queue shows it.
    let supervisor = dev.login("supervisor").await?;
    let (_, queues) = dev.api("GET", "/api/queues", Some(&supervisor), None).await?;
    let general = queues["queues"].as_array().unwrap().iter().find(|q| q["group"] == "general").unwrap().clone();
    assert_eq!(general["waiting"], 1, "{queues}");
    let (_, ops) = dev.api("GET", "/api/operators", Some(&supervisor), None).await?;
    let alice_row = ops["operators"].as_array().unwrap().iter().find(|o| o["id"] == "alice").unwrap().clone();
    assert_eq!(alice_row["load"], 2);
    assert!(
        alice.wait_for(Duration::from_millis(500), |v| v["kind"] == "offer").await.is_err(),
        "no third offer while at capacity"
    );

    // A slot frees: the third is offered at once.
    alice.send(&json!({"type": "close", "conversation": conversations[0].1, "resolution": "done", "ref": "c"})).await?;
    let third = next_event(&mut alice, "offer").await?;
    assert_eq!(third["conversation"], conversations[2].1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_and_timeout_pass_to_next_operator_and_queue_keeps_position() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    // Long enough that no new round starts while the test looks at the queue.
    set_offer_timeout(&dev, "general", 3000).await?;
    // Two conversations wait while nobody is online.
    let (_c1, first, _) = dev.client("First").await?;
    let (_c2, second, _) = dev.client("Second").await?;

    // Logged in now: a login's password hash takes time the offers' timeout must not.
    let supervisor = dev.login("supervisor").await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    // Original position: the first conversation is offered first.
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], first);
    let offer2 = next_event(&mut alice, "offer").await?;
    assert_eq!(offer2["conversation"], second);

    // Decline the first: nobody else is online, so it stays queued, not re-offered.
    alice.send(&json!({"type": "decline", "offer": offer["offer"], "reason": "busy", "ref": "d"})).await?;
    let withdrawn = next_event(&mut alice, "offer_withdrawn").await?;
    assert_eq!(withdrawn["reason"], "declined");
    assert!(
        alice.wait_for(Duration::from_millis(500), |v| v["kind"] == "offer" && v["conversation"] == first).await.is_err(),
        "a declined conversation is not handed straight back"
    );
    let (_, queues) = dev.api("GET", "/api/queues", Some(&supervisor), None).await?;
    let general = queues["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general")).cloned().unwrap_or_default();
    assert_eq!(general["waiting"], 1, "the declined one waits: {general}");

    // Let the second time out: a missed offer also sets the operator away.
    let expired = alice.wait_for(Duration::from_secs(8), |v| v["kind"] == "offer_withdrawn" && v["reason"] == "expired").await?;
    assert_eq!(expired["conversation"], second);
    alice.wait_for(WAIT, |v| v["kind"] == "presence" && v["status"] == "away").await.context("alice set away")?;

    // Bob comes online: both go to him, the first (older) one first.
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    let to_bob = next_event(&mut bob, "offer").await?;
    assert_eq!(to_bob["conversation"], first);
    let to_bob2 = next_event(&mut bob, "offer").await?;
    assert_eq!(to_bob2["conversation"], second);
    accept(&mut bob, &to_bob).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_and_timeout_hand_over_at_once_to_an_online_operator() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    // Offers last 2 s: long enough that a loaded debug run still answers within one,
    // short enough to watch one run out.
    set_offer_timeout(&dev, "general", 2000).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;

    // Longest idle: alice went online first, so she is offered first.
    let (_client, conversation, _) = dev.client("Ann").await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], conversation);
    alice.send(&json!({"type": "decline", "offer": offer["offer"], "reason": "not my topic", "ref": "d"})).await?;
    let to_bob = next_event(&mut bob, "offer").await?;
    assert_eq!(to_bob["conversation"], conversation, "the decline hands it to bob at once");

    // Bob lets it run out: back to alice, who passed on it less than a round ago, only
    // after the pause; bob is set away.
    let expired = bob.wait_for(Duration::from_secs(5), |v| v["kind"] == "offer_withdrawn").await?;
    assert_eq!(expired["reason"], "expired");
    bob.wait_for(WAIT, |v| v["kind"] == "presence" && v["status"] == "away").await.context("bob set away")?;
    let again = alice.wait_for(Duration::from_secs(5), |v| v["kind"] == "offer").await?;
    assert_eq!(again["conversation"], conversation, "a new round reaches the operator who passed");
    accept(&mut alice, &again).await?;

    // The decision record says why: bob was away when the new round started.
    let supervisor = dev.login("supervisor").await?;
    let (_, decisions) = dev.api("GET", &format!("/api/conversations/{conversation}/decisions"), Some(&supervisor), None).await?;
    let last = decisions["decisions"].as_array().and_then(|d| d.last()).cloned().unwrap_or_default();
    assert_eq!(last["chosen"], "alice");
    let bob_row = last["candidates"].as_array().and_then(|c| c.iter().find(|c| c["operator"] == "bob")).cloned().unwrap_or_default();
    assert_eq!(bob_row["excluded"], "away", "{last}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_its_only_operator_declined_is_offered_again_after_a_pause() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _client, conversation, offer) = declined_by_the_only_operator(&dev, 2000).await?;
    // Nobody else can take it: the skill group's actor starts a new round one offer
    // timeout later, with no other change to the queue.
    let again = alice.wait_for(Duration::from_secs(5), |v| v["kind"] == "offer").await?;
    assert_eq!(again["conversation"], conversation);
    assert_ne!(again["offer"], offer["offer"]);
    accept(&mut alice, &again).await?;
    Ok(())
}

/// An admin's change of an operator's capacity or groups reaches their open desk at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_reaches_the_operator_desk_at_once() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, hello) = dev.operator("alice").await?;
    assert_eq!(hello["capacity"], 2);
    let admin = dev.login("admin").await?;
    let (status, body) = dev
        .api("PUT", "/api/operators/alice", Some(&admin), Some(json!({"name": "Alice", "capacity": 3, "groups": ["general"]})))
        .await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    let changed = next_event(&mut alice, "configured").await?;
    assert_eq!(changed["capacity"], 3);
    assert_eq!(changed["groups"], json!(["general"]));
    // The same again changes nothing and tells nothing.
    let (status, _) = dev
        .api("PUT", "/api/operators/alice", Some(&admin), Some(json!({"name": "Alice", "capacity": 3, "groups": ["general"]})))
        .await?;
    assert_eq!(status, 200);
    assert!(alice.wait_for(Duration::from_millis(800), |v| v["kind"] == "configured").await.is_err(), "no event for no change");
    Ok(())
}

/// The floor says, per group, how many operators could take a conversation now, and for
/// a waiting conversation why it is not offered: nobody online, everyone full, or
/// everyone free passed on it (with when the next round starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_says_why_a_conversation_waits() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    set_offer_timeout(&dev, "general", 60_000).await?;
    let supervisor = dev.login("supervisor").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let general = |v: &Value| v["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general")).cloned().unwrap_or_default();
    let why = |v: &Value, conversation: u64| {
        general(v)["conversations"].as_array().and_then(|c| c.iter().find(|c| c["conversation"] == conversation)).map(|c| (c["why"].clone(), c["next_round_at"].clone()))
    };

    // Nobody of the group is online.
    let (_ann, first, _) = dev.client("Ann").await?;
    let seen = floor.wait_for(WAIT, |v| v["type"] == "floor" && why(v, first).is_some_and(|(w, _)| w == "nobody_online")).await?;
    assert_eq!(general(&seen)["available"], 0);

    // Alice comes online and passes on it: she is free but passed; the next round is due
    // one offer timeout after her pass.
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let offer = next_event(&mut alice, "offer").await?;
    alice.send(&json!({"type": "decline", "offer": offer["offer"], "ref": "d"})).await?;
    let seen = floor.wait_for(WAIT, |v| v["type"] == "floor" && why(v, first).is_some_and(|(w, _)| w == "everyone_passed")).await?;
    assert_eq!(general(&seen)["available"], 1, "alice could take a conversation now");
    let (_, next_round) = why(&seen, first).unwrap_or_default();
    let at = seen["at"].as_u64().unwrap_or(0);
    assert!(next_round.as_u64().is_some_and(|n| n > at && n <= at + 60_000), "next round {next_round} after {at}");

    // Two more visitors fill her capacity (2): everyone online is full.
    for name in ["Bea", "Cy"] {
        let (_c, _, _) = dev.client(name).await?;
        let offer = next_event(&mut alice, "offer").await?;
        accept(&mut alice, &offer).await?;
    }
    let seen = floor.wait_for(WAIT, |v| v["type"] == "floor" && why(v, first).is_some_and(|(w, _)| w == "everyone_full")).await?;
    assert_eq!(general(&seen)["available"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisors_see_a_wait_cross_the_sla_as_it_happens() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let (status, body) = dev
        .api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General", "offer_timeout_ms": 30000, "sla_ms": 1500})))
        .await?;
    anyhow::ensure!(status == 200, "set sla: {status} {body}");
    let supervisor = dev.login("supervisor").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let (_client, _conversation, _) = dev.client("Ann").await?;
    let general = |v: &Value| v["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general")).cloned();
    let within = floor.wait_for(WAIT, |v| v["type"] == "floor" && general(v).is_some_and(|g| g["waiting"] == 1)).await?;
    assert_eq!(general(&within).unwrap_or_default()["within_sla"], 1);
    // Nothing else happens; the group's actor wakes the floor when the wait crosses 1.5 s.
    let crossed = floor
        .wait_for(Duration::from_secs(4), |v| v["type"] == "floor" && general(v).is_some_and(|g| g["waiting"] == 1 && g["within_sla"] == 0))
        .await?;
    assert!(general(&crossed).unwrap_or_default()["longest_wait_ms"].as_u64().unwrap_or(0) >= 1500);
    // The same on /metrics, for alerting.
    let (_, metrics) = dev.api("GET", "/metrics", None, None).await?;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(metrics.contains("switchboard_queue_over_sla{skill_group=\"general\"} 1"), "{metrics}");
    assert!(metrics.contains("switchboard_queue_waiting{skill_group=\"general\"} 1"), "{metrics}");
    assert!(metrics.contains(&format!("switchboard_routing_rules{{group=\"1\"}} {}", switchboard_actors::core::RULES_VERSION)), "{metrics}");
    // Per group: apply lag and leader changes (one node: its leadership never moved).
    assert!(metrics.contains("switchboard_raft_leader_changes_total{group=\"1\"} 0"), "{metrics}");
    assert!(metrics.contains("\nswitchboard_store_writes_off_runtime_total ") && metrics.contains("\nswitchboard_store_committed_skipped_total "), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("switchboard_raft_apply_lag{group=\"1\"} ")), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_operator_carries_history_and_comment() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (client, conversation, _) = dev.client("Ann").await?;
    send(&client, "k1", "I need a technician").await?;
    let offer = next_event(&mut alice, "offer").await?;
    accept(&mut alice, &offer).await?;

    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    alice
        .send(&json!({"type": "transfer", "conversation": conversation, "to_operator": "bob", "comment": "router issue", "ref": "t"}))
        .await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "t").await?;
    next_event(&mut alice, "released").await?;
    let assigned = next_event(&mut bob, "assigned").await?;
    assert_eq!(assigned["conversation"], conversation);
    let history = assigned["history"].as_array().unwrap();
    assert!(history.iter().any(|e| e["text"] == "I need a technician"));
    assert!(history.iter().any(|e| e["kind"] == "transferred" && e["comment"] == "router issue"));

    // Alice no longer holds it.
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "x", "text": "still me?"})).await?;
    let error = alice.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(error["code"], "not_assigned");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_resume_from_last_sequence_without_gap_or_duplicate() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut client, conversation, token) = dev.client("Ann").await?;
    let offer = next_event(&mut alice, "offer").await?;
    accept(&mut alice, &offer).await?;
    send(&client, "k1", "first").await?;
    let first = client.wait_for(WAIT, |v| v["type"] == "event" && v["text"] == "first").await?;
    let last_seen = first["seq"].as_u64().unwrap();
    client.close().await;
    drop(client);

    // While the client is away, the operator writes twice.
    for (key, text) in [("r1", "reply one"), ("r2", "reply two")] {
        alice.send(&json!({"type": "send", "conversation": conversation, "key": key, "text": text})).await?;
        alice.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == key).await?;
    }
    let mut client = WsClient::connect(&dev.public, "/ws/client", None).await?;
    client.send(&json!({"type": "resume", "token": token, "last_seq": last_seen})).await?;
    let resumed = client.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    assert_eq!(resumed["conversation"], conversation);
    let mut seqs = Vec::new();
    let mut texts = Vec::new();
    while seqs.len() < 2 {
        let event = client.wait_for(WAIT, |v| v["type"] == "event").await?;
        seqs.push(event["seq"].as_u64().unwrap());
        texts.push(event["text"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(seqs, vec![last_seen + 1, last_seen + 2], "no gap, no duplicate");
    assert_eq!(texts, vec!["reply one", "reply two"]);
    assert!(client.wait_for(Duration::from_millis(300), |v| v["type"] == "event").await.is_err(), "nothing replayed twice");

    // The operator resumes too: everything after its last seen number, once.
    let hello_seq = {
        let (_, hello) = dev.operator("alice").await?;
        hello["seq"].as_u64().unwrap()
    };
    send(&client, "k2", "are you there?").await?;
    let (mut again, _) = dev.operator_resume("alice", hello_seq).await?;
    let event = next_event(&mut again, "conversation").await?;
    assert_eq!(event["seq"].as_u64().unwrap(), hello_seq + 1);
    assert_eq!(event["entry"]["text"], "are you there?");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_operator_actor_restarts_and_keeps_its_offer_timer() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    set_offer_timeout(&dev, "general", 1500).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (_client, conversation, _) = dev.client("Ann").await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], conversation);

    // Chaos drill: the operator actor that owns the offer timer panics.
    let admin = dev.login("admin").await?;
    let (status, _) = dev.api("POST", "/api/chaos/crash-actor", Some(&admin), Some(json!({"stream": "operator", "id": "alice"}))).await?;
    assert_eq!(status, 202);

    // The restarted actor re-armed the timer from committed state; the socket kept going.
    let expired = alice.wait_for(Duration::from_secs(6), |v| v["kind"] == "offer_withdrawn").await?;
    assert_eq!(expired["reason"], "expired");
    let log = std::fs::read_to_string(dev.data_dir.join("node.log"))?;
    assert!(log.contains("restarting from committed state"), "the supervisor logged the restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_group_actor_restarts_and_still_starts_the_new_round() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _client, conversation, _offer) = declined_by_the_only_operator(&dev, 1500).await?;

    // The group's actor holds the timer of the coming new round; it panics.
    let admin = dev.login("admin").await?;
    let (status, body) = dev.api("POST", "/api/chaos/crash-actor", Some(&admin), Some(json!({"stream": "group", "id": "general"}))).await?;
    assert_eq!(status, 202, "the queue's actor is running: {body}");
    // Restarted from committed state, it re-arms the deadline and the round happens.
    let again = alice.wait_for(Duration::from_secs(6), |v| v["kind"] == "offer").await?;
    assert_eq!(again["conversation"], conversation);
    let log = std::fs::read_to_string(dev.data_dir.join("node.log"))?;
    assert!(log.contains("restarting from committed state") && log.contains("Group"), "the supervisor restarted the group actor");

    // A stream nobody needs has no actor to crash: a clear 404, not a silent success.
    let (status, body) = dev.api("POST", "/api/chaos/crash-actor", Some(&admin), Some(json!({"stream": "group", "id": "tech"}))).await?;
    assert_eq!(status, 404, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_conversation_actor_restarts_and_the_client_misses_nothing() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut client, conversation, _) = dev.client("Ann").await?;
    let offer = next_event(&mut alice, "offer").await?;
    accept(&mut alice, &offer).await?;

    let admin = dev.login("admin").await?;
    let (status, body) =
        dev.api("POST", "/api/chaos/crash-actor", Some(&admin), Some(json!({"stream": "conversation", "id": conversation.to_string()}))).await?;
    assert_eq!(status, 202, "{body}");
    // The client's socket keeps following: replies after the crash arrive once, in order.
    for (key, text) in [("r1", "first after the crash"), ("r2", "second after the crash")] {
        alice.send(&json!({"type": "send", "conversation": conversation, "key": key, "text": text})).await?;
        alice.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == key).await?;
    }
    let mut texts = Vec::new();
    while texts.len() < 2 {
        let event = client.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "message" && v["from"] == "operator").await?;
        texts.push(event["text"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(texts, vec!["first after the crash", "second after the crash"]);
    send(&client, "k1", "and the other way").await?;
    alice.wait_for(WAIT, |v| v["kind"] == "conversation" && v["entry"]["text"] == "and the other way").await?;
    let log = std::fs::read_to_string(dev.data_dir.join("node.log"))?;
    assert!(log.contains("restarting from committed state") && log.contains("Conversation"), "the supervisor restarted it");
    Ok(())
}

/// A visitor's `start` sent again with its key (its answer was lost with a node, the
/// widget asks again) gets the conversation the first one opened, on one group and on a
/// split cluster alike; another key opens another; a key too short to be random is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_sent_again_with_its_key_opens_one_conversation() -> anyhow::Result<()> {
    switchboard_chaos_tests::on_each_layout(start_again_on).await
}

async fn start_again_on(dev: Dev) -> anyhow::Result<()> {
    let started = |key: &'static str| {
        let public = dev.public.clone();
        async move {
            let mut ws = WsClient::connect(&public, "/ws/client", None).await?;
            ws.send(&json!({"type": "start", "name": "Dana", "key": key})).await?;
            let answer = ws.wait_for(switchboard_chaos_tests::WAIT, |v| v["type"] == "started" || v["type"] == "error").await?;
            anyhow::Ok((ws, answer))
        }
    };
    let supervisor = dev.login("supervisor").await?;
    // The conversations in the queue of `general`, once they are exactly `expected` (on
    // a split cluster the routing shard learns of a start a moment later).
    let queued_are = |expected: Vec<Value>| {
        let (dev, supervisor) = (&dev, &supervisor);
        switchboard_chaos_tests::eventually(switchboard_chaos_tests::WAIT, Duration::from_millis(50), move || {
            let expected = expected.clone();
            async move {
                let (_, queues) = dev.api("GET", "/api/queues", Some(supervisor), None).await?;
                let general = queues["queues"].as_array().and_then(|q| q.iter().find(|q| q["group"] == "general").cloned()).unwrap_or_default();
                let mut listed: Vec<Value> = general["conversations"].as_array().into_iter().flatten().map(|c| c["conversation"].clone()).collect();
                listed.sort_by_key(|c| c.as_u64());
                anyhow::Ok((listed == expected).then_some(()))
            }
        })
    };
    let (_first_ws, first) = started("Qm9va2VkLWZpcnN0LXN0YXJ0").await?;
    assert_eq!(first["type"], "started", "{first}");
    let (mut again_ws, again) = started("Qm9va2VkLWZpcnN0LXN0YXJ0").await?;
    assert_eq!(again["type"], "started", "{again}");
    assert_eq!(again["conversation"], first["conversation"], "the same key, the same conversation");
    // The copy follows the conversation from its start, as the first socket does.
    let opened = again_ws.wait_for(switchboard_chaos_tests::WAIT, |v| v["type"] == "event" && v["seq"] == 1).await?;
    assert_eq!(opened["kind"], "started", "{opened}");
    queued_are(vec![first["conversation"].clone()]).await.context("one conversation waits, not two")?;

    let (_other_ws, other) = started("YW5vdGhlci1zdGFydC1rZXk").await?;
    assert_eq!(other["type"], "started", "{other}");
    assert_ne!(other["conversation"], first["conversation"]);
    let mut both = vec![first["conversation"].clone(), other["conversation"].clone()];
    both.sort_by_key(|c| c.as_u64());
    queued_are(both.clone()).await.context("another key, another conversation")?;

    let (_short_ws, short) = started("short").await?;
    assert_eq!((short["type"].as_str(), short["code"].as_str()), (Some("error"), Some("invalid")), "{short}");
    queued_are(both).await.context("a refused start opens nothing")?;
    Ok(())
}
