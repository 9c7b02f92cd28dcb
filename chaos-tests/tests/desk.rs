//! The workstation's second pass against the real binary: internal notes that only
//! staff see, an operator's own conversations with search, today's KPIs per group, a
//! supervisor's socket that says at once when a watched conversation changes, and an
//! admin's user edit that keeps the password.

use serde_json::{json, Value};
use switchboard_chaos_tests::{next_event, set_presence, Dev, WAIT};
use switchboard_gateway::client::{http_json, WsClient};

async fn dev() -> anyhow::Result<(tempfile::TempDir, Dev)> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    Ok((dir, dev))
}

/// Ann starts a conversation on the web (as the visitor `visitor_token` proves, if
/// given): her socket, the conversation and the visitor token that links her next one.
async fn ann_starts(dev: &Dev, visitor_token: Option<&str>) -> anyhow::Result<(WsClient, u64, String)> {
    let mut ws = WsClient::connect(&dev.public, "/ws/client", None).await?;
    let mut start = json!({"type": "start", "name": "Ann"});
    if let Some(token) = visitor_token {
        start["visitor_token"] = json!(token);
    }
    ws.send(&start).await?;
    let started = ws.wait_for(WAIT, |v| v["type"] == "started").await?;
    let (conversation, token) = (started["conversation"].as_u64().unwrap_or(0), started["visitor_token"].as_str().unwrap_or_default().to_owned());
    Ok((ws, conversation, token))
}

/// Alice, online, takes a new conversation of `name`, who writes `text` first.
/// Returns alice's socket, the client's, the conversation and the client's token.
async fn alice_serves(dev: &Dev, name: &str, text: &str) -> anyhow::Result<(WsClient, WsClient, u64, String)> {
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut client, conversation, token) = dev.client(name).await?;
    client.send(&json!({"type": "send", "key": "c-1", "text": text})).await?;
    // Acknowledged before anything else happens to the conversation: a message still on
    // its way when a test closes it would be refused as sent too late.
    client.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "c-1").await?;
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == conversation).await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "accept"})).await?;
    next_event(&mut alice, "assigned").await?;
    Ok((alice, client, conversation, token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_note_reaches_staff_and_never_the_customer() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, mut client, conversation, client_token) = alice_serves(&dev, "Ann", "My card was charged twice").await?;
    let token = dev.login("alice").await?;
    let note = json!({"text": "Checked the ledger: one charge is a hold", "key": "note-1"});
    let (status, first) = dev.api("POST", &format!("/api/conversations/{conversation}/notes"), Some(&token), Some(note.clone())).await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["duplicate"], false);
    // The holder sees it in their feed as a conversation entry.
    let seen = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["kind"] == "note").await?;
    assert_eq!(seen["entry"]["text"], "Checked the ledger: one charge is a hold");
    assert_eq!(seen["entry"]["name"], "Alice");
    // A retry with the key writes nothing new.
    let (_, again) = dev.api("POST", &format!("/api/conversations/{conversation}/notes"), Some(&token), Some(note)).await?;
    assert_eq!((again["seq"].clone(), again["duplicate"].clone()), (first["seq"].clone(), json!(true)));

    // The customer's stream skips it: the next message arrives, the note never does,
    // live or replayed from the start.
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "o-1", "text": "It is a hold; it drops off in 3 days."})).await?;
    let reply = client.wait_for(WAIT, |v| v["type"] == "event" && (v["kind"] == "note" || v["from"] == "operator")).await?;
    assert_eq!(reply["kind"], "message", "{reply}");
    assert!(reply["seq"].as_u64() > first["seq"].as_u64());
    let mut replay = WsClient::connect(&dev.public, "/ws/client", None).await?;
    let mut saw = Vec::new();
    replay.send(&json!({"type": "resume", "token": client_token, "last_seq": 0})).await?;
    loop {
        let v = replay.wait_for(WAIT, |v| v["type"] == "event").await?;
        saw.push(v["kind"].as_str().unwrap_or("").to_owned());
        if v["from"] == "operator" {
            break;
        }
    }
    assert!(!saw.iter().any(|k| k == "note"), "{saw:?}");

    // Staff reading the conversation see it; an operator who never had it may not add one.
    let supervisor = dev.login("supervisor").await?;
    let (_, doc) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let notes: Vec<&Value> = doc["history"].as_array().into_iter().flatten().filter(|e| e["kind"] == "note").collect();
    assert_eq!(notes.len(), 1, "{doc}");
    assert_eq!(notes[0]["author"], "alice");
    let bob = dev.login("bob").await?;
    let (status, body) = dev.api("POST", &format!("/api/conversations/{conversation}/notes"), Some(&bob), Some(json!({"text": "peek"}))).await?;
    assert_eq!(status, 403, "{body}");
    let (status, body) = dev.api("POST", &format!("/api/conversations/{conversation}/notes"), Some(&token), Some(json!({"text": "   "}))).await?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_their_conversations_newest_first_and_by_text() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _ann, first, _) = alice_serves(&dev, "Ann", "The router blinks orange").await?;
    alice.send(&json!({"type": "close", "conversation": first, "resolution": "solved", "ref": "close"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "close").await?;
    let (_cy, second, _) = dev.client("Cy").await?;
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == second).await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "a2"})).await?;
    next_event(&mut alice, "assigned").await?;

    let token = dev.login("alice").await?;
    let (status, mine) = dev.api("GET", "/api/my/conversations", Some(&token), None).await?;
    assert_eq!(status, 200, "{mine}");
    let list = mine["conversations"].as_array().cloned().unwrap_or_default();
    let ids: Vec<u64> = list.iter().filter_map(|c| c["conversation"].as_u64()).collect();
    assert_eq!(ids, vec![second, first], "newest first");
    assert_eq!(list[1]["state"], "closed");
    assert_eq!(list[1]["preview"]["text"], "The router blinks orange");
    assert_eq!(list[0]["mine"], true);

    let (_, found) = dev.api("GET", "/api/my/conversations?q=ROUTER", Some(&token), None).await?;
    let ids: Vec<u64> = found["conversations"].as_array().into_iter().flatten().filter_map(|c| c["conversation"].as_u64()).collect();
    assert_eq!(ids, vec![first], "{found}");
    let (_, by_name) = dev.api("GET", "/api/my/conversations?q=cy", Some(&token), None).await?;
    assert_eq!(by_name["conversations"][0]["conversation"], second);
    let (_, none) = dev.api("GET", "/api/my/conversations?q=nowhere-to-be-found", Some(&token), None).await?;
    assert_eq!(none["conversations"], json!([]));
    assert_eq!(none["next_before"], Value::Null, "everything was searched");

    // Bob never handled them: his list is empty and he still may not read them.
    let bob = dev.login("bob").await?;
    assert_eq!(dev.api("GET", "/api/my/conversations", Some(&bob), None).await?.1["conversations"], json!([]));
    let supervisor = dev.login("supervisor").await?;
    let (status, body) = dev.api("GET", "/api/my/conversations", Some(&supervisor), None).await?;
    assert_eq!(status, 400, "a login without an operator has no list: {body}");
    let (status, _) = dev.api("GET", &format!("/api/my/conversations?q={}", "x".repeat(201)), Some(&token), None).await?;
    assert_eq!(status, 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todays_kpis_count_what_the_floor_did() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, mut ann, conversation, _) = alice_serves(&dev, "Ann", "Hello").await?;
    alice.send(&json!({"type": "close", "conversation": conversation, "resolution": "solved", "ref": "close"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "close").await?;
    next_event(&mut ann, "closed").await?;
    ann.send(&json!({"type": "rate", "score": 5, "comment": "quick"})).await?;
    next_event(&mut ann, "rated").await?;
    // Bea leaves before anyone answers... but alice is online with room: set her away.
    set_presence(&mut alice, "away").await?;
    let (bea, _, _) = dev.client("Bea").await?;
    bea.send(&json!({"type": "close"})).await?;

    let supervisor = dev.login("supervisor").await?;
    let general = |v: &Value| v["groups"].as_array().and_then(|g| g.iter().find(|g| g["group"] == "general")).cloned().unwrap_or_default();
    // An hour back rather than the default (midnight UTC), so a run across midnight
    // counts the same.
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 - 3_600_000;
    let kpis = switchboard_chaos_tests::eventually(WAIT, std::time::Duration::from_millis(100), || async {
        let (status, body) = dev.api("GET", &format!("/api/kpis?since={since}"), Some(&supervisor), None).await?;
        anyhow::ensure!(status == 200, "{body}");
        Ok((general(&body)["abandoned"] == 1).then_some(body))
    })
    .await?;
    let g = general(&kpis);
    assert_eq!((g["entered"].clone(), g["answered"].clone(), g["handled"].clone(), g["rated"].clone()), (json!(2), json!(1), json!(1), json!(1)), "{kpis}");
    assert_eq!(g["csat"], 5.0);
    assert_eq!(g["service_level"], 50, "one answered within the SLA, one abandoned: {g}");
    assert!(g["avg_handle_ms"].as_u64().is_some() && g["avg_wait_ms"].as_u64().is_some(), "{g}");
    assert_eq!(g["name"], "General questions", "the group's display name");

    let alice_token = dev.login("alice").await?;
    assert_eq!(dev.api("GET", "/api/kpis", Some(&alice_token), None).await?.0, 403);
    // Without the role, 403 whatever the query: the role is checked before it is read.
    for path in ["/api/kpis?since=x", "/api/pauses?since=x", "/api/audit?limit=x"] {
        assert_eq!(dev.api("GET", path, Some(&alice_token), None).await?.0, 403, "{path}");
    }
    let (status, body) = dev.api("GET", "/api/kpis?since=1", Some(&supervisor), None).await?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_conversation_is_announced_as_it_changes() -> anyhow::Result<()> {
    // On a node of one group, and on a split node, where the conversation's entries are
    // in its conversation shard and the routing shard holds none of its messages.
    switchboard_chaos_tests::on_each_layout(watched_on).await
}

async fn watched_on(dev: Dev) -> anyhow::Result<()> {
    let (_ann_ws, conversation, _) = dev.client("Ann").await?;
    let supervisor = dev.login("supervisor").await?;
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    floor.send(&json!({"type": "watch", "conversation": 999_999})).await?;
    let refused = floor.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(refused["code"], "not_found", "{refused}");
    floor.send(&json!({"type": "watch", "conversation": conversation})).await?;
    let first = floor.wait_for(WAIT, |v| v["type"] == "watched").await?;
    assert_eq!(first["conversation"], conversation);
    let before = first["last_seq"].as_u64().unwrap_or(0);
    _ann_ws.send(&json!({"type": "send", "key": "c-1", "text": "Anyone there?"})).await?;
    let next = floor.wait_for(WAIT, |v| v["type"] == "watched").await?;
    assert_eq!(next["last_seq"].as_u64(), Some(before + 1), "{next}");
    // Floor frames keep coming while a conversation is watched; `watch` with no
    // conversation stops it.
    floor.send(&json!({"type": "watch", "conversation": null})).await?;
    floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_edits_a_user_without_retyping_the_password() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let (status, body) = dev.api("PUT", "/api/users/dora", Some(&admin), Some(json!({"role": "supervisor"}))).await?;
    assert_eq!(status, 400, "a new user needs a password: {body}");
    let (status, body) = dev.api("PUT", "/api/users/alice", Some(&admin), Some(json!({"role": "supervisor", "operator": "alice"}))).await?;
    assert_eq!(status, 200, "{body}");
    let password = dev.logins.get("alice").cloned().unwrap_or_default();
    let (status, login) = http_json(&dev.private, "POST", "/api/login", None, Some(&json!({"login": "alice", "password": password}))).await?;
    assert_eq!(status, 200, "the old password still works: {login}");
    assert_eq!(login["role"], "supervisor");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_earlier_conversations_are_searched_from_the_current_one() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut first, old, visitor_token) = ann_starts(&dev, None).await?;
    first.send(&json!({"type": "send", "key": "c-1", "text": "Invoice 4410 is wrong"})).await?;
    first.wait_for(WAIT, |v| v["type"] == "ack").await?;
    first.send(&json!({"type": "close"})).await?;
    first.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "closed").await?;

    let (_second, now, _) = ann_starts(&dev, Some(&visitor_token)).await?;
    let supervisor = dev.login("supervisor").await?;
    let ids = |v: &Value| v["conversations"].as_array().into_iter().flatten().filter_map(|c| c["conversation"].as_u64()).collect::<Vec<_>>();
    let (status, all) = dev.api("GET", &format!("/api/conversations/{now}/earlier"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{all}");
    assert_eq!(ids(&all), vec![old]);
    assert_eq!(all["conversations"][0]["preview"]["text"], "Invoice 4410 is wrong");
    assert_eq!(ids(&dev.api("GET", &format!("/api/conversations/{now}/earlier?q=invoice%204410"), Some(&supervisor), None).await?.1), vec![old]);
    assert_eq!(ids(&dev.api("GET", &format!("/api/conversations/{now}/earlier?q=refund"), Some(&supervisor), None).await?.1), Vec::<u64>::new());
    // An operator who never had either may not look.
    let bob = dev.login("bob").await?;
    assert_eq!(dev.api("GET", &format!("/api/conversations/{now}/earlier"), Some(&bob), None).await?.0, 403);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_a_customer_s_other_conversations_only_while_serving_them() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (first, old, visitor_token) = ann_starts(&dev, None).await?;
    first.send(&json!({"type": "send", "key": "c-1", "text": "Where is my parcel?"})).await?;
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == old).await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "accept"})).await?;
    next_event(&mut alice, "assigned").await?;
    alice.send(&json!({"type": "close", "conversation": old, "resolution": "solved", "ref": "close"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "close").await?;
    set_presence(&mut alice, "offline").await?;

    // The same customer comes back; someone else will serve them.
    let (mut second, now, _) = ann_starts(&dev, Some(&visitor_token)).await?;
    second.send(&json!({"type": "send", "key": "c-2", "text": "My new card PIN is 4721"})).await?;
    second.wait_for(WAIT, |v| v["type"] == "ack").await?;

    let ids = |v: &Value| v["conversations"].as_array().into_iter().flatten().filter_map(|c| c["conversation"].as_u64()).collect::<Vec<_>>();
    // Alice handled the first conversation, so she may open it, but not the new one:
    // neither its preview nor whether a text is in it.
    let token = dev.login("alice").await?;
    let (status, rows) = dev.api("GET", &format!("/api/conversations/{old}/earlier"), Some(&token), None).await?;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(ids(&rows), Vec::<u64>::new(), "a conversation alice may not open was listed: {rows}");
    let (_, found) = dev.api("GET", &format!("/api/conversations/{old}/earlier?q=PIN%204721"), Some(&token), None).await?;
    assert_eq!(ids(&found), Vec::<u64>::new(), "{found}");
    assert_eq!(dev.api("GET", &format!("/api/conversations/{now}"), Some(&token), None).await?.0, 403);
    // Nor is it on the old conversation's card.
    let card_ids = |v: &Value| v["earlier"].as_array().into_iter().flatten().filter_map(|c| c["conversation"].as_u64()).collect::<Vec<_>>();
    let (status, card) = dev.api("GET", &format!("/api/conversations/{old}"), Some(&token), None).await?;
    assert_eq!(status, 200, "{card}");
    assert_eq!(card_ids(&card), Vec::<u64>::new(), "the card listed a conversation alice may not open: {card}");
    // A supervisor sees both.
    let supervisor = dev.login("supervisor").await?;
    assert_eq!(ids(&dev.api("GET", &format!("/api/conversations/{old}/earlier"), Some(&supervisor), None).await?.1), vec![now]);
    assert_eq!(card_ids(&dev.api("GET", &format!("/api/conversations/{old}"), Some(&supervisor), None).await?.1), vec![now]);
    Ok(())
}

/// The client card lets an operator serving a customer read that customer's earlier,
/// closed conversations, not the customer's other open one that a colleague holds, and
/// not write notes into what they may only read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_a_customer_opens_their_closed_conversations_only_to_read() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    async fn take(ws: &mut WsClient, conversation: u64) -> anyhow::Result<()> {
        let offer = ws.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == conversation).await?;
        let reference = format!("accept-{conversation}");
        ws.send(&json!({"type": "accept", "offer": offer["offer"], "ref": reference})).await?;
        ws.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == reference.as_str()).await?;
        Ok(())
    }
    // Bob serves the customer and closes; then takes the customer's second conversation
    // and keeps it open.
    let (first, closed, visitor_token) = ann_starts(&dev, None).await?;
    first.send(&json!({"type": "send", "key": "a-1", "text": "first time"})).await?;
    take(&mut bob, closed).await?;
    bob.send(&json!({"type": "close", "conversation": closed, "resolution": "solved", "ref": "close"})).await?;
    bob.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "close").await?;
    let (second, open, _) = ann_starts(&dev, Some(&visitor_token)).await?;
    second.send(&json!({"type": "send", "key": "b-1", "text": "my card PIN is 4721"})).await?;
    take(&mut bob, open).await?;
    set_presence(&mut bob, "away").await?;
    // Alice serves the customer's third.
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (third, served, _) = ann_starts(&dev, Some(&visitor_token)).await?;
    third.send(&json!({"type": "send", "key": "c-1", "text": "hello again"})).await?;
    take(&mut alice, served).await?;

    let token = dev.login("alice").await?;
    assert_eq!(dev.api("GET", &format!("/api/conversations/{closed}"), Some(&token), None).await?.0, 200, "the customer's closed conversation: hers to read");
    let (status, body) = dev.api("GET", &format!("/api/conversations/{open}"), Some(&token), None).await?;
    assert_eq!(status, 403, "the customer's open conversation bob holds is not: {body}");
    let note = json!({"text": "seen it"});
    let (status, body) = dev.api("POST", &format!("/api/conversations/{closed}/notes"), Some(&token), Some(note.clone())).await?;
    assert_eq!(status, 403, "what she may only read she does not write to: {body}");
    let (status, body) = dev.api("POST", &format!("/api/conversations/{served}/notes"), Some(&token), Some(note)).await?;
    assert_eq!(status, 200, "her own conversation takes her note: {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaks_carry_a_configured_reason_that_the_floor_and_the_report_show() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let (status, body) = dev.api("PUT", "/api/pause-reasons", Some(&admin), Some(json!({"reasons": ["lunch", "training"]}))).await?;
    assert_eq!(status, 200, "{body}");
    let (status, _) = dev.api("PUT", "/api/pause-reasons", Some(&admin), Some(json!({"reasons": ["", "x"]}))).await?;
    assert_eq!(status, 409, "a blank reason is refused");

    let (mut alice, hello) = dev.operator("alice").await?;
    assert_eq!(hello["pause_reasons"], json!(["lunch", "training"]));
    alice.send(&json!({"type": "presence", "status": "break", "reason": "smoking", "ref": "p1"})).await?;
    assert_eq!(alice.wait_for(WAIT, |v| v["type"] == "error" && v["ref"] == "p1").await?["code"], "invalid");
    alice.send(&json!({"type": "presence", "status": "online", "reason": "lunch", "ref": "p2"})).await?;
    assert_eq!(alice.wait_for(WAIT, |v| v["type"] == "error" && v["ref"] == "p2").await?["code"], "bad_frame");
    alice.send(&json!({"type": "presence", "status": "break", "reason": "lunch", "ref": "p3"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "p3").await?;
    let event = next_event(&mut alice, "presence").await?;
    assert_eq!((event["status"].clone(), event["reason"].clone()), (json!("break"), json!("lunch")));

    let supervisor = dev.login("supervisor").await?;
    let (_, operators) = dev.api("GET", "/api/operators", Some(&supervisor), None).await?;
    let row = operators["operators"].as_array().and_then(|o| o.iter().find(|o| o["id"] == "alice").cloned()).unwrap_or_default();
    assert_eq!((row["presence"].clone(), row["presence_reason"].clone()), (json!("break"), json!("lunch")));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 - 3_600_000;
    let (status, report) = dev.api("GET", &format!("/api/pauses?since={since}"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{report}");
    let mine = report["operators"].as_array().and_then(|o| o.iter().find(|o| o["operator"] == "alice").cloned()).unwrap_or_default();
    assert_eq!(mine["current"]["reason"], "lunch");
    assert!(mine["reasons"]["lunch"].as_u64().is_some_and(|ms| ms >= 300), "{mine}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_notice_reaches_new_customers_at_once_and_is_audited() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let notice = |dev: &Dev| {
        let addr = dev.public.clone();
        async move { anyhow::Ok(http_json(&addr, "GET", "/notice?channel=web", None, None).await?) }
    };
    assert_eq!(notice(&dev).await?.1["notice"], Value::Null);
    let supervisor = dev.login("supervisor").await?;
    let on = json!({"channel": "web", "message": "Card payments are down since 10:00; we are fixing it."});
    let (status, body) = dev.api("PUT", "/api/emergencies", Some(&supervisor), Some(on)).await?;
    assert_eq!(status, 200, "{body}");
    // Before writing anything, the widget can show it; a new conversation gets it first.
    assert_eq!(notice(&dev).await?.1["notice"], "Card payments are down since 10:00; we are fixing it.");
    let (mut client, _, _) = dev.client("Ann").await?;
    let told = next_event(&mut client, "notice").await?;
    assert_eq!(told["text"], "Card payments are down since 10:00; we are fixing it.");
    // The floor shows what is in force; an operator may not switch it.
    let mut floor = WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let frame = floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    assert_eq!(frame["emergencies"][0]["channel"], "web");
    let alice = dev.login("alice").await?;
    assert_eq!(dev.api("PUT", "/api/emergencies", Some(&alice), Some(json!({"channel": "web", "message": null}))).await?.0, 403);
    // Off in one action; both are in the audit trail.
    let (status, _) = dev.api("PUT", "/api/emergencies", Some(&supervisor), Some(json!({"channel": "web", "message": null}))).await?;
    assert_eq!(status, 200);
    assert_eq!(notice(&dev).await?.1["notice"], Value::Null);
    let admin = dev.login("admin").await?;
    let (_, trail) = dev.api("GET", "/api/audit", Some(&admin), None).await?;
    let actions: Vec<&str> = trail["entries"].as_array().into_iter().flatten().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, vec!["emergency_off", "emergency_on"], "{trail}");
    assert_eq!(trail["entries"][1]["by"], "supervisor");
    assert_eq!(dev.api("GET", "/api/audit", Some(&supervisor), None).await?.0, 403);
    let (status, _) = dev.api("PUT", "/api/emergencies", Some(&supervisor), Some(json!({"channel": "web", "group": "general", "message": "x"}))).await?;
    assert_eq!(status, 400);
    let (status, _) = dev.api("PUT", "/api/emergencies", Some(&supervisor), Some(json!({"channel": "web"}))).await?;
    assert_eq!(status, 400, "a missing message is not taken for \"switch it off\"");
    let (status, _) = dev.api("PUT", "/api/access/rules", Some(&supervisor), Some(json!({"list": "block", "kind": "visitor", "value": "v-x"}))).await?;
    assert_eq!(status, 400, "a missing note is not taken for \"remove it\"");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_customer_starts_nothing_and_an_allow_list_keeps_others_out() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let supervisor = dev.login("supervisor").await?;
    // A customer writes; the supervisor blocks them by their verified visitor id.
    let mut first = WsClient::connect(&dev.public, "/ws/client", None).await?;
    first.send(&json!({"type": "start", "name": "Mallory"})).await?;
    let started = first.wait_for(WAIT, |v| v["type"] == "started").await?;
    let conversation = started["conversation"].as_u64().unwrap_or(0);
    let visitor_token = started["visitor_token"].as_str().unwrap_or_default().to_owned();
    let (_, doc) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let visitor = doc["visitor"]["id"].as_str().unwrap_or_default().to_owned();
    assert!(visitor.starts_with("v-"), "{doc}");
    let block = json!({"list": "block", "kind": "visitor", "value": visitor, "note": "abusive"});
    let (status, body) = dev.api("PUT", "/api/access/rules", Some(&supervisor), Some(block)).await?;
    assert_eq!(status, 200, "{body}");
    // Their open conversation takes nothing more, and a new one is refused, with the text.
    first.send(&json!({"type": "send", "key": "m-1", "text": "still here"})).await?;
    let refused = first.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(refused["code"], "blocked", "{refused}");
    let mut again = WsClient::connect(&dev.public, "/ws/client", None).await?;
    again.send(&json!({"type": "start", "name": "Mallory", "visitor_token": visitor_token})).await?;
    let refused = again.wait_for(WAIT, |v| v["type"] == "error" || v["type"] == "started").await?;
    assert_eq!(refused["code"], "blocked", "{refused}");
    assert!(refused["message"].as_str().is_some_and(|m| m.contains("not available")), "{refused}");

    // Address rules are checked by the gateway; a malformed range never gets that far.
    let (status, body) = dev.api("PUT", "/api/access/rules", Some(&supervisor), Some(json!({"list": "block", "kind": "ip", "value": "10.0.0.0/33", "note": "x"}))).await?;
    assert_eq!(status, 409, "a malformed range is refused: {body}");
    let admin = dev.login("admin").await?;
    // Allow-only with an allow list that does not hold 127.0.0.1: everyone here is out,
    // told the channel's text; allowing 127.0.0.0/8 lets them in.
    let (status, body) = dev
        .api("PUT", "/api/channels/web", Some(&admin), Some(json!({"kind": "web", "name": "Web chat", "default_group": "general", "allow_only": true, "blocked_message": "Staff only today."})))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["allow_only"], true);
    let mut outsider = WsClient::connect(&dev.public, "/ws/client", None).await?;
    outsider.send(&json!({"type": "start", "name": "Ann"})).await?;
    let refused = outsider.wait_for(WAIT, |v| v["type"] == "error" || v["type"] == "started").await?;
    assert_eq!((refused["code"].clone(), refused["message"].clone()), (json!("blocked"), json!("Staff only today.")));
    let allow = json!({"list": "allow", "channel": "web", "kind": "ip", "value": "127.0.0.0/8", "note": "office"});
    assert_eq!(dev.api("PUT", "/api/access/rules", Some(&supervisor), Some(allow)).await?.0, 200);
    outsider.send(&json!({"type": "start", "name": "Ann"})).await?;
    outsider.wait_for(WAIT, |v| v["type"] == "started").await?;

    let (_, listed) = dev.api("GET", "/api/access", Some(&supervisor), None).await?;
    assert_eq!(listed["rules"].as_array().map(Vec::len), Some(2), "{listed}");
    let alice = dev.login("alice").await?;
    assert_eq!(dev.api("GET", "/api/access", Some(&alice), None).await?.0, 403);
    let (_, trail) = dev.api("GET", "/api/audit", Some(&admin), None).await?;
    let actions: Vec<&str> = trail["entries"].as_array().into_iter().flatten().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, vec!["access_rule_added", "channel_access", "access_rule_added"], "{trail}");
    Ok(())
}
