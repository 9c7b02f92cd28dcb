//! Rules 6 against the real binary: a routing step that widens a group to an overflow
//! group after a wait (the decision record names the step, the floor shows it, the
//! preview lists every step), opening hours that answer a customer arriving while the
//! group is closed (and the widget's `/notice` says so first), and channel weights
//! against capacity.

use serde_json::{json, Value};
use switchboard_chaos_tests::{next_event, set_presence, Dev, WAIT};
use switchboard_gateway::client::{http_json, WsClient};

async fn dev() -> anyhow::Result<(tempfile::TempDir, Dev)> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    Ok((dir, dev))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_conversation_overflows_to_another_group_at_its_step() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    // General needs a skill nobody has; after 2 s it needs none and billing's operators
    // may take it too. Carol (billing only) is the one online.
    let body = json!({
        "name": "General questions",
        "routing": {"required_skills": {"french": 3}},
        "steps": [{"after_ms": 2000, "skills": {}, "max_level": 0, "overflow": ["billing"]}],
    });
    let (status, group) = dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(body)).await?;
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["steps"], json!([{"after_ms": 2000, "skills": {}, "max_level": 0, "overflow": ["billing"]}]));
    // Refused, and nothing changed: steps out of order, an overflow group that does not exist.
    let bad = json!({"name": "General questions", "steps": [{"after_ms": 2000}, {"after_ms": 1000}]});
    assert_eq!(dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(bad)).await?.0, 409);
    let bad = json!({"name": "General questions", "steps": [{"after_ms": 2000, "overflow": ["nowhere"]}]});
    assert_eq!(dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(bad)).await?.0, 404);
    let (_, groups) = dev.api("GET", "/api/skill-groups", Some(&admin), None).await?;
    let general = groups["skill_groups"].as_array().and_then(|g| g.iter().find(|g| g["id"] == "general").cloned()).unwrap_or_default();
    assert_eq!(general["steps"][0]["overflow"], json!(["billing"]), "{general}");

    // The preview shows both steps: nobody at step 0, carol at step 1.
    let (mut carol, _) = dev.operator("carol").await?;
    set_presence(&mut carol, "online").await?;
    let supervisor = dev.login("supervisor").await?;
    let (status, preview) = dev.api("POST", "/api/routing/preview", Some(&supervisor), Some(json!({"group": "general"}))).await?;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["step"], 0);
    assert_eq!(preview["steps"][0]["chosen"], Value::Null, "{preview}");
    assert_eq!(preview["steps"][1]["after_ms"], 2000);
    assert_eq!(preview["steps"][1]["chosen"], "carol", "{preview}");

    let (_client, conversation, _) = dev.client("Ann").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let frame = floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    let listed = frame["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|g| g["group"] == "general"))
        .and_then(|g| g["conversations"].as_array().and_then(|c| c.first().cloned()))
        .unwrap_or_default();
    assert_eq!(listed["conversation"], conversation, "{frame}");
    assert!(listed["step"].is_u64(), "the floor shows the step: {listed}");
    if listed["step"] == 0 {
        assert!(listed["next_step_at"].is_u64(), "and when the next one comes: {listed}");
    }

    // The group's queue timer moves it to step 1 on time: carol is offered it.
    let offer = carol.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == conversation).await?;
    carol.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a"})).await?;
    carol.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "a").await?;
    let (status, decisions) = dev.api("GET", &format!("/api/conversations/{conversation}/decisions"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{decisions}");
    assert_eq!(decisions["decisions"][0]["chosen"], "carol");
    assert_eq!(decisions["decisions"][0]["step"], 1, "the decision record names the step: {decisions}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_opening_hours_a_customer_is_answered_and_the_widget_knows_first() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let notice = |dev: &Dev| {
        let addr = dev.public.clone();
        async move { anyhow::Ok(http_json(&addr, "GET", "/notice?channel=web", None, None).await?.1) }
    };
    assert_eq!(notice(&dev).await?["closed"], Value::Null);
    // A schedule with no open hours in the coming year but one holiday: closed now.
    let hours = json!({
        "time_zone": "Europe/Moscow", "weekly": [], "holidays": [{"date": "1999-01-01", "open": "09:00", "close": "18:00"}],
        "closed_action": "reply", "message": "We answer from 9:00 to 18:00 on weekdays.",
    });
    let (status, group) = dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "hours": hours}))).await?;
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["hours"]["open_now"], false, "{group}");
    assert_eq!(group["hours"]["closed_action"], "reply");
    assert_eq!(group["hours"]["holidays"][0], json!({"date": "1999-01-01", "open": "09:00", "close": "18:00"}));
    let told = notice(&dev).await?;
    assert_eq!(told["closed"]["message"], "We answer from 9:00 to 18:00 on weekdays.", "{told}");
    assert_eq!(told["closed"]["action"], "reply");

    // A customer who writes anyway is told and the conversation closes (after_hours).
    let (mut client, conversation, _) = dev.client("Ann").await?;
    let said = next_event(&mut client, "notice").await?;
    assert_eq!(said["text"], "We answer from 9:00 to 18:00 on weekdays.");
    let closed = next_event(&mut client, "closed").await?;
    assert_eq!(closed["by"], "system", "{closed}");
    let supervisor = dev.login("supervisor").await?;
    let (_, detail) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    assert!(detail.to_string().contains("after_hours"), "the resolution tells reports apart: {detail}");

    // Bad schedules are refused and change nothing.
    let bad_zone = json!({"name": "General questions", "hours": {"time_zone": "Mars/Olympus", "closed_action": "wait"}});
    assert_eq!(dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(bad_zone)).await?.0, 409);
    let bad_time = json!({"name": "General questions", "hours": {"time_zone": "UTC", "weekly": [{"day": "mon", "open": "25:00", "close": "26:00"}], "closed_action": "wait"}});
    assert_eq!(dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(bad_time)).await?.0, 400);
    assert_eq!(notice(&dev).await?["closed"]["action"], "reply");

    // Wait instead: the conversation queues, nobody is offered it while closed.
    let wait = json!({"name": "General questions", "hours": {"time_zone": "UTC", "weekly": [], "closed_action": "wait", "message": ""}});
    assert_eq!(dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(wait)).await?.0, 200);
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (_bea, waiting, _) = dev.client("Bea").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let frame = floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    let general = frame["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general").cloned()).unwrap_or_default();
    assert_eq!(general["hours"]["open"], false, "{general}");
    assert_eq!(general["conversations"][0]["conversation"], waiting);
    assert_eq!(general["conversations"][0]["why"], "closed", "{general}");
    // Always open again (hours null): it is offered at once.
    assert_eq!(dev.api("PUT", "/api/skill-groups/general", Some(&admin), Some(json!({"name": "General questions", "hours": null}))).await?.0, 200);
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == waiting).await?;
    assert_eq!(offer["conversation"], waiting);
    assert_eq!(notice(&dev).await?["closed"], Value::Null);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_channel_kind_takes_more_of_an_operators_capacity() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let (status, weights) = dev.api("PUT", "/api/routing/weights", Some(&admin), Some(json!({"weights": {"web": 2}}))).await?;
    assert_eq!(status, 200, "{weights}");
    assert_eq!(weights, json!({"weights": {"web": 2}}));
    assert_eq!(dev.api("PUT", "/api/routing/weights", Some(&admin), Some(json!({"weights": {"web": 0}}))).await?.0, 409);
    let supervisor = dev.login("supervisor").await?;
    assert_eq!(dev.api("PUT", "/api/routing/weights", Some(&supervisor), Some(json!({"weights": {}}))).await?.0, 403);
    assert_eq!(dev.api("GET", "/api/routing/weights", Some(&supervisor), None).await?.1, json!({"weights": {"web": 2}}));
    // Alice (capacity 2) takes one web chat: it fills her.
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (_ann, first, _) = dev.client("Ann").await?;
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == first).await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "a").await?;
    let (_, operators) = dev.api("GET", "/api/operators", Some(&supervisor), None).await?;
    let load = operators["operators"].as_array().and_then(|o| o.iter().find(|o| o["id"] == "alice").cloned()).unwrap_or_default();
    assert_eq!(load["load"], 2, "one web chat weighs 2: {load}");
    // A second customer waits for room: the floor says everyone is full.
    let (_bea, second, _) = dev.client("Bea").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let frame = floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    let general = frame["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general").cloned()).unwrap_or_default();
    assert_eq!(general["conversations"][0]["conversation"], second, "{general}");
    assert_eq!(general["conversations"][0]["why"], "everyone_full", "{general}");
    // Weight 1 again: she has room for it.
    assert_eq!(dev.api("PUT", "/api/routing/weights", Some(&admin), Some(json!({"weights": {}}))).await?.0, 200);
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == second).await?;
    assert_eq!(offer["conversation"], second);
    Ok(())
}
