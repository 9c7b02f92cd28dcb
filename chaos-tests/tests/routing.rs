//! Rules 5 against the real binary: a group's routing settings over REST, a VIP
//! offered before the queue ahead of them, the floor showing each waiting
//! conversation's priority, and wrap-up after a close that `ready` ends early.

use serde_json::{json, Value};
use switchboard_chaos_tests::{next_event, set_presence, Dev, WAIT};
use switchboard_gateway::client::WsClient;

async fn start(dev: &Dev, name: &str, attributes: Value) -> anyhow::Result<(WsClient, u64)> {
    let mut ws = WsClient::connect(&dev.public, "/ws/client", None).await?;
    ws.send(&json!({"type": "start", "name": name, "attributes": attributes})).await?;
    let started = ws.wait_for(WAIT, |v| v["type"] == "started").await?;
    Ok((ws, started["conversation"].as_u64().unwrap_or(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_is_offered_first_and_wrap_up_holds_the_next_offer_until_ready() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let admin = dev.login("admin").await?;
    let routing = json!({"attribute_priorities": [{"attribute": "tier", "value": "vip", "priority": 10}], "ageing_ms": 0, "wrap_up_ms": 600_000});
    let (status, group) = dev
        .api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "offer_timeout_ms": 60_000, "routing": routing})))
        .await?;
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["routing"]["wrap_up_ms"], 600_000);
    let (status, refused) = dev
        .api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "routing": {"ageing_ms": 5}})))
        .await?;
    assert_eq!(status, 409, "an ageing step under a second is refused: {refused}");
    let (_, groups) = dev.api("GET", "/api/skill-groups", Some(&admin), None).await?;
    let general = groups["skill_groups"].as_array().and_then(|g| g.iter().find(|g| g["id"] == "general").cloned()).unwrap_or_default();
    assert_eq!(general["offer_timeout_ms"], 60_000, "the refused request changed nothing: {general}");
    let (status, renamed) = dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General"}))).await?;
    assert_eq!(status, 200, "{renamed}");
    assert_eq!(
        (&renamed["name"], &renamed["offer_timeout_ms"], &renamed["routing"]["wrap_up_ms"]),
        (&json!("General"), &json!(60_000), &json!(600_000)),
        "a field left out keeps the group's value: {renamed}"
    );
    let (status, fresh) = dev.api("PUT", "/api/skill-groups/returns", Some(&admin), Some(json!({"name": "Returns"}))).await?;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!((&fresh["policy"], &fresh["offer_timeout_ms"], &fresh["sla_ms"]), (&json!("longest_idle"), &json!(30_000), &json!(60_000)), "a new group takes the defaults: {fresh}");

    let mut waiting = Vec::new();
    for name in ["Ann", "Bea", "Cy"] {
        waiting.push(start(&dev, name, json!({})).await?);
    }
    let (_vip, vip) = start(&dev, "Dana", json!({"tier": "vip"})).await?;
    let supervisor = dev.login("supervisor").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let frame = floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    let listed: Vec<(u64, u64)> = frame["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|g| g["group"] == "general"))
        .and_then(|g| g["conversations"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|c| (c["conversation"].as_u64().unwrap_or(0), c["priority"].as_u64().unwrap_or(99)))
        .collect();
    assert_eq!(listed.first(), Some(&(vip, 10)), "the floor lists the queue in offer order: {listed:?}");

    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let first = next_event(&mut alice, "offer").await?;
    assert_eq!(first["conversation"], vip, "the VIP goes first though three arrived before");
    alice.send(&json!({"type": "accept", "offer": first["offer"], "ref": "a"})).await?;
    next_event(&mut alice, "assigned").await?;
    let second = next_event(&mut alice, "offer").await?;
    assert_eq!(second["conversation"], waiting[0].1, "then by arrival");
    alice.send(&json!({"type": "accept", "offer": second["offer"], "ref": "a2"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "a2").await?;

    // She is full. Closing one starts her wrap-up: no offer while it runs, though she
    // has room again.
    alice.send(&json!({"type": "close", "conversation": vip, "resolution": "solved", "ref": "c"})).await?;
    let wrap = next_event(&mut alice, "wrap_up").await?;
    assert!(wrap["until"].as_u64().is_some(), "{wrap}");
    let early = alice.wait_for(std::time::Duration::from_millis(1500), |v| v["type"] == "event" && v["kind"] == "offer").await;
    assert!(early.is_err(), "an offer during wrap-up: {early:?}");
    let (_, hello) = dev.operator("alice").await?;
    assert!(hello["wrap_up_until"].as_u64().is_some(), "{hello}");
    // Ready: the next offer comes at once.
    alice.send(&json!({"type": "ready", "ref": "r"})).await?;
    let ended = next_event(&mut alice, "wrap_up").await?;
    assert_eq!(ended["until"], Value::Null);
    let next = next_event(&mut alice, "offer").await?;
    assert_eq!(next["conversation"], waiting[1].1, "{next}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_customer_goes_first_to_the_operator_who_served_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let admin = dev.login("admin").await?;
    let routing = json!({"sticky_ms": 3_600_000});
    let (status, body) = dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "routing": routing}))).await?;
    assert_eq!(status, 200, "{body}");
    // Bob is online first (longest idle), then alice.
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let mut dana = WsClient::connect(&dev.public, "/ws/client", None).await?;
    dana.send(&json!({"type": "start", "name": "Dana"})).await?;
    let started = dana.wait_for(WAIT, |v| v["type"] == "started").await?;
    let (first, token) = (started["conversation"].as_u64().unwrap_or(0), started["visitor_token"].as_str().unwrap_or_default().to_owned());
    let offer = bob.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == first).await?;
    bob.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a"})).await?;
    bob.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "a").await?;
    bob.send(&json!({"type": "close", "conversation": first, "ref": "c"})).await?;
    bob.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "c").await?;
    // Alice has now idled longest; Dana comes back with her visitor token: bob first.
    let mut back = WsClient::connect(&dev.public, "/ws/client", None).await?;
    back.send(&json!({"type": "start", "name": "Dana", "visitor_token": token})).await?;
    let second = back.wait_for(WAIT, |v| v["type"] == "started").await?["conversation"].as_u64().unwrap_or(0);
    let offer = bob.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == second).await?;
    assert_eq!(offer["conversation"], second);
    let elsewhere = alice.wait_for(std::time::Duration::from_millis(500), |v| v["type"] == "event" && v["kind"] == "offer").await;
    assert!(elsewhere.is_err(), "alice was not offered it: {elsewhere:?}");
    // A new customer gets the normal rule: alice, longest idle.
    let (_eve, third) = start(&dev, "Eve", json!({})).await?;
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer").await?;
    assert_eq!(offer["conversation"], third);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_customer_is_reminded_then_the_conversation_closes_as_inactive() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let admin = dev.login("admin").await?;
    let routing = json!({"inactivity_remind_ms": 1000, "inactivity_close_ms": 3000, "inactivity_message": "Still with us?"});
    let (status, body) = dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "routing": routing}))).await?;
    assert_eq!(status, 200, "{body}");
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut ann, conversation) = start(&dev, "Ann", json!({})).await?;
    let offer = next_event(&mut alice, "offer").await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "a").await?;
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "o-1", "text": "How can I help?"})).await?;
    // The leader looks once a second: the reminder after about 1 s, the close after 3.
    let long = std::time::Duration::from_secs(15);
    let reminded = ann.wait_for(long, |v| v["type"] == "event" && v["kind"] == "notice").await?;
    assert_eq!(reminded["text"], "Still with us?");
    let closed = ann.wait_for(long, |v| v["type"] == "event" && v["kind"] == "closed").await?;
    assert_eq!(closed["by"], "system");
    assert!(closed["at"].as_u64() >= reminded["at"].as_u64().map(|t| t + 1500), "closed after the reminder: {closed} {reminded}");
    let supervisor = dev.login("supervisor").await?;
    let (_, doc) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let last = doc["history"].as_array().and_then(|h| h.iter().rev().find(|e| e["kind"] == "closed").cloned()).unwrap_or_default();
    assert_eq!(last["resolution"], "inactive", "the reports tell it apart: {last}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_says_who_would_get_a_conversation_and_why_not_the_others() -> anyhow::Result<()> {
    // On a node of one group, and on a split node, where presence and queues live in
    // the routing shard and not in the metadata group.
    switchboard_chaos_tests::on_each_layout(preview_on).await
}

async fn preview_on(dev: Dev) -> anyhow::Result<()> {
    let admin = dev.login("admin").await?;
    let routing = json!({"attribute_priorities": [{"attribute": "tier", "value": "vip", "priority": 10}]});
    dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "routing": routing}))).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let supervisor = dev.login("supervisor").await?;
    let ask = json!({"group": "general", "attributes": {"tier": "vip"}});
    let (status, preview) = dev.api("POST", "/api/routing/preview", Some(&supervisor), Some(ask.clone())).await?;
    assert_eq!(status, 200, "{preview}");
    assert_eq!((preview["priority"].clone(), preview["chosen"].clone(), preview["ahead"].clone()), (json!(10), json!("alice"), json!(0)), "{preview}");
    let bob = preview["candidates"].as_array().and_then(|c| c.iter().find(|c| c["operator"] == "bob").cloned()).unwrap_or_default();
    assert_eq!(bob["excluded"], "offline", "{preview}");
    // Nothing was written: no conversation exists, and an operator may not ask.
    let (_, queues) = dev.api("GET", "/api/queues", Some(&supervisor), None).await?;
    assert!(queues["queues"].as_array().into_iter().flatten().all(|q| q["waiting"] == 0 && q["offered"] == 0), "{queues}");
    let alice_token = dev.login("alice").await?;
    assert_eq!(dev.api("POST", "/api/routing/preview", Some(&alice_token), Some(ask)).await?.0, 403);
    assert_eq!(dev.api("POST", "/api/routing/preview", Some(&supervisor), Some(json!({"group": "nope"}))).await?.0, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_channel_limit_holds_a_conversation_back_until_it_is_raised() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let admin = dev.login("admin").await?;
    let limit = |n: u32| json!({"name": "Alice", "capacity": 3, "groups": ["general"], "channel_limits": {"web": n}});
    let (status, body) = dev.api("PUT", "/api/operators/alice", Some(&admin), Some(limit(1))).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel_limits"]["web"], 1);
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (_a, first) = start(&dev, "Ann", json!({})).await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], first);
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "a").await?;
    // One web conversation is all she may hold, though her capacity is 3: the next waits.
    let (_b, second) = start(&dev, "Bea", json!({})).await?;
    let early = alice.wait_for(std::time::Duration::from_millis(1000), |v| v["type"] == "event" && v["kind"] == "offer").await;
    assert!(early.is_err(), "a second web conversation went to alice: {early:?}");
    let supervisor = dev.login("supervisor").await?;
    let (status, preview) = dev.api("POST", "/api/routing/preview", Some(&supervisor), Some(json!({"group": "general"}))).await?;
    assert_eq!(status, 200);
    let row = preview["candidates"].as_array().and_then(|c| c.iter().find(|c| c["operator"] == "alice").cloned()).unwrap_or_default();
    assert_eq!(row["excluded"], "channel_full", "{preview}");
    // Raised to two: the waiting one is hers at once.
    dev.api("PUT", "/api/operators/alice", Some(&admin), Some(limit(2))).await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], second);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_needing_a_skill_goes_to_the_best_match_and_never_to_someone_without_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let admin = dev.login("admin").await?;
    let routing = json!({"required_skills": {"billing": 3}, "skill_rules": [{"attribute": "language", "value": "ru", "skill": "ru", "level": 3}]});
    let (status, body) = dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "routing": routing}))).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["routing"]["required_skills"]["billing"], 3);
    for (id, name, skills) in [("alice", "Alice", json!({"billing": 3})), ("bob", "Bob", json!({"billing": 5, "ru": 4}))] {
        let (status, body) = dev.api("PUT", &format!("/api/operators/{id}"), Some(&admin), Some(json!({"name": name, "capacity": 2, "groups": ["general"], "skills": skills}))).await?;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = dev.api("PUT", "/api/operators/carol", Some(&admin), Some(json!({"name": "Carol", "capacity": 2, "groups": ["general"], "skills": {"billing": 6}}))).await?;
    assert_eq!(status, 400, "a level over 5 is refused");
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    // Only alice is online: a Russian speaker needs ru, which she lacks: it waits.
    let (_ru, russian) = start(&dev, "Ivan", json!({"language": "ru"})).await?;
    let early = alice.wait_for(std::time::Duration::from_millis(800), |v| v["type"] == "event" && v["kind"] == "offer").await;
    assert!(early.is_err(), "offered to someone without the skill: {early:?}");
    let supervisor = dev.login("supervisor").await?;
    let (_, preview) = dev.api("POST", "/api/routing/preview", Some(&supervisor), Some(json!({"group": "general", "attributes": {"language": "ru"}}))).await?;
    let row = preview["candidates"].as_array().and_then(|c| c.iter().find(|c| c["operator"] == "alice").cloned()).unwrap_or_default();
    assert_eq!(row["excluded"], "skill_missing", "{preview}");
    // Bob, who has it, comes online: it is his.
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    let offer = next_event(&mut bob, "offer").await?;
    assert_eq!(offer["conversation"], russian);
    Ok(())
}
