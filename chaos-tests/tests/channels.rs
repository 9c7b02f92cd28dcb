//! Messenger channels against the real binary and local fake providers (ADR 0009):
//! a Telegram webhook delivered three times makes one message, a forged one writes
//! nothing, the operator's reply reaches the fake Bot API through 429 and 500 answers
//! exactly once; an adapter of the open Channel API runs a conversation end to end with
//! signed outbound deliveries and receipts; a node killed in the middle of a send
//! neither loses the message nor sends it twice.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_chaos_tests::fake_provider::{Fault, FakeAdapter, FakeRelay, FakeTelegram};
use switchboard_chaos_tests::{eventually, next_event, set_presence, Cluster, Dev, WAIT};
use switchboard_gateway::client::{http_json_with, WsClient};

const BOT_TOKEN: &str = "123456:test-token";
const SECRET: &str = "webhook_secret_0123456789";

async fn dev() -> anyhow::Result<(tempfile::TempDir, Dev)> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    Ok((dir, dev))
}

fn update(update_id: u64, chat: i64, message_id: u64, text: &str) -> Value {
    json!({"update_id": update_id, "message": {"message_id": message_id, "date": 1_700_000_000, "chat": {"id": chat, "type": "private"}, "from": {"id": chat, "is_bot": false, "first_name": "Dana"}, "text": text}})
}

async fn hook(dev: &Dev, secret: Option<&str>, body: &Value) -> anyhow::Result<(u16, Value)> {
    let headers: Vec<(&str, &str)> = secret.map(|s| ("x-telegram-bot-api-secret-token", s)).into_iter().collect();
    Ok(http_json_with(&dev.public, "POST", "/hooks/telegram/tg", &headers, Some(body)).await?)
}

/// Channel `tg` (Telegram, into `general`) connected to `fake`.
async fn telegram_channel(dev: &Dev, admin: &str, fake: &FakeTelegram) -> anyhow::Result<()> {
    let (status, body) = dev.api("PUT", "/api/channels/tg", Some(admin), Some(json!({"kind": "telegram", "name": "Telegram", "default_group": "general"}))).await?;
    assert_eq!(status, 200, "{body}");
    let settings = json!({"kind": "telegram", "bot_token": BOT_TOKEN, "secret": SECRET, "api_base": fake.base_url()});
    let (status, body) = dev.api("PUT", "/api/channels/tg/adapter", Some(admin), Some(settings)).await?;
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_string().contains(BOT_TOKEN) && !body.to_string().contains(SECRET), "secrets are never shown back: {body}");
    assert_eq!(body["webhook_path"], "/hooks/telegram/tg");
    Ok(())
}

async fn accept_offer(ws: &mut WsClient) -> anyhow::Result<u64> {
    let offer = next_event(ws, "offer").await?;
    ws.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "accept"})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "accept").await?;
    offer["conversation"].as_u64().ok_or_else(|| anyhow::anyhow!("offer without a conversation: {offer}"))
}

/// Starts one of `adapters/examples/python/` with `env` and waits until it answers
/// `/healthz` on `listen`; it is killed when dropped.
async fn python_example(script: &str, env: &[(&str, String)], listen: &str) -> anyhow::Result<tokio::process::Child> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../adapters/examples/python").join(script);
    let mut command = tokio::process::Command::new("python3");
    command.arg(&path).kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command.spawn()?;
    eventually(WAIT, Duration::from_millis(100), || async {
        Ok(switchboard_gateway::client::http_json(listen, "GET", "/healthz", None, None).await.ok().filter(|(s, _)| *s == 200))
    })
    .await?;
    Ok(child)
}

async fn deliveries(dev: &Dev, token: &str, conversation: u64) -> anyhow::Result<Vec<Value>> {
    let (status, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(token), None).await?;
    anyhow::ensure!(status == 200, "{conv}");
    Ok(conv["deliveries"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telegram_conversation_goes_both_ways_once_through_redeliveries_and_provider_errors() -> anyhow::Result<()> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    // The admin's test message goes straight to the provider, outside any conversation.
    let (status, tested) = dev.api("POST", "/api/channels/tg/test", Some(&admin), Some(json!({"recipient": "4242", "text": "Switchboard test"}))).await?;
    assert_eq!((status, tested["ok"].clone()), (200, json!(true)), "{tested}");
    assert_eq!(fake.sent(), vec![(json!(4242), "Switchboard test".to_owned())]);
    fake.script(&[Fault::TooMany(1)]);
    let (_, refused) = dev.api("POST", "/api/channels/tg/test", Some(&admin), Some(json!({"recipient": "4242", "text": "again"}))).await?;
    assert!(refused["reason"].as_str().is_some_and(|r| r.starts_with("429")), "the provider's answer is shown: {refused}");

    // Forged: no secret, a wrong one. 401, and nothing is written.
    let first = update(1, 4242, 7, "hello, my card is blocked");
    assert_eq!(hook(&dev, None, &first).await?.0, 401);
    assert_eq!(hook(&dev, Some("webhook_secret_0123456780"), &first).await?.0, 401);
    // Delivered three times (Telegram retries what it did not see answered): one message.
    let (status, taken) = hook(&dev, Some(SECRET), &first).await?;
    assert_eq!((status, taken["duplicate"].clone()), (200, json!(false)), "{taken}");
    for _ in 0..2 {
        let (status, again) = hook(&dev, Some(SECRET), &first).await?;
        assert_eq!(status, 200);
        assert_eq!((again["conversation"].clone(), again["duplicate"].clone()), (taken["conversation"].clone(), json!(true)));
    }
    // An update without a customer message (an edit) is answered and dropped.
    let edit = json!({"update_id": 2, "edited_message": {"message_id": 7, "date": 1, "chat": {"id": 4242}, "text": "edited"}});
    assert_eq!(hook(&dev, Some(SECRET), &edit).await?.0, 200);

    let conversation = accept_offer(&mut alice).await?;
    assert_eq!(json!(conversation), taken["conversation"]);
    let supervisor = dev.login("supervisor").await?;
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let client_messages: Vec<&Value> = conv["history"].as_array().into_iter().flatten().filter(|e| e["kind"] == "message" && e["from"] == "client").collect();
    assert_eq!(client_messages.len(), 1, "one message for three deliveries: {conv}");
    assert_eq!(conv["channel"], "tg");
    assert_eq!(conv["visitor"]["id"], "tg:4242");
    assert_eq!(conv["visitor"]["name"], "Dana");

    // The provider answers 429 (retry after 1 s), then 500, then takes it: sent once.
    fake.script(&[Fault::TooMany(1), Fault::ServerError]);
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "r1", "text": "Hello Dana, let me check.", "ref": "r1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "r1").await?;
    let sent = eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        let d = deliveries(&dev, &supervisor, conversation).await?;
        Ok(d.first().filter(|d| d["status"] == "sent").cloned())
    })
    .await?;
    assert_eq!(sent["attempts"], 3, "{sent}");
    assert_eq!(fake.sent()[1..], [(json!(4242), "Hello Dana, let me check.".to_owned())]);
    let calls = &fake.calls()[2..];
    assert_eq!(calls.len(), 3);
    assert!(calls[1].duration_since(calls[0]) >= Duration::from_millis(950), "the retry waited the provider's retry_after");

    // A photo: its largest size is fetched with getFile and kept, the caption its text.
    let jpeg = [[0xFFu8, 0xD8, 0xFF, 0xE0].as_slice(), &[0u8; 60]].concat();
    fake.add_file("PHOTO-LARGE", &jpeg);
    let photo = json!({"update_id": 4, "message": {"message_id": 9, "date": 1_700_000_001, "chat": {"id": 4242, "type": "private"}, "from": {"id": 4242, "is_bot": false, "first_name": "Dana"}, "caption": "the card",
        "photo": [{"file_id": "PHOTO-SMALL", "file_unique_id": "s", "width": 90, "height": 90, "file_size": 10}, {"file_id": "PHOTO-LARGE", "file_unique_id": "l", "width": 800, "height": 600, "file_size": 64}]}});
    assert_eq!(hook(&dev, Some(SECRET), &photo).await?.0, 200);
    let event = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "the card").await?;
    assert_eq!((event["entry"]["attachments"][0]["name"].clone(), event["entry"]["attachments"][0]["size"].clone()), (json!("photo.jpg"), json!(64)), "{event}");
    // A document Telegram no longer has: the message is taken as its labelled line.
    let lost = json!({"update_id": 5, "message": {"message_id": 10, "date": 1_700_000_002, "chat": {"id": 4242, "type": "private"}, "document": {"file_id": "GONE", "file_unique_id": "g", "file_name": "contract.pdf", "mime_type": "application/pdf"}}});
    assert_eq!(hook(&dev, Some(SECRET), &lost).await?.0, 200);
    alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "[file contract.pdf]").await?;
    // Telegram's servers failing for now: the message is asked for again (503) twice,
    // then taken as its line; failing once, the redelivery keeps the file.
    fake.add_file("SCAN", b"%PDF-1.4 scan");
    fake.fail_file_lookups(3);
    let scan = json!({"update_id": 6, "message": {"message_id": 11, "date": 1_700_000_003, "chat": {"id": 4242, "type": "private"}, "document": {"file_id": "SCAN", "file_unique_id": "c", "file_name": "scan.pdf", "mime_type": "application/pdf"}}});
    assert_eq!(hook(&dev, Some(SECRET), &scan).await?.0, 503, "asked again");
    assert_eq!(hook(&dev, Some(SECRET), &scan).await?.0, 503, "asked again");
    assert_eq!(hook(&dev, Some(SECRET), &scan).await?.0, 200, "taken as its line");
    alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "[file scan.pdf]").await?;
    fake.fail_file_lookups(1);
    let again = json!({"update_id": 7, "message": {"message_id": 12, "date": 1_700_000_004, "chat": {"id": 4242, "type": "private"}, "document": {"file_id": "SCAN", "file_unique_id": "c", "file_name": "scan.pdf", "mime_type": "application/pdf"}}});
    assert_eq!(hook(&dev, Some(SECRET), &again).await?.0, 503, "asked again");
    assert_eq!(hook(&dev, Some(SECRET), &again).await?.0, 200);
    let kept = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["attachments"][0]["name"] == "scan.pdf").await?;
    assert_eq!(kept["entry"]["attachments"][0]["size"], 13, "{kept}");

    // The operator's files go out: one as a document with the text as its caption, two
    // as one album; a caption over Telegram's 1024 characters is refused before it is
    // written.
    let staff = dev.login("alice").await?;
    let mut ids = Vec::new();
    for (name, kind, bytes) in [("steps.pdf", "application/pdf", b"%PDF-1.4 steps".to_vec()), ("form.pdf", "application/pdf", b"%PDF-1.4 form".to_vec())] {
        let (status, file) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name={name}"), &staff, kind, bytes).await?;
        assert_eq!(status, 201, "{file}");
        ids.push(file["id"].clone());
    }
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "doc1", "text": "Here are the steps.", "attachments": [ids[0]], "ref": "doc1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "doc1").await?;
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "doc2", "text": "x".repeat(1025), "attachments": [ids[1]], "ref": "doc2"})).await?;
    let refused = alice.wait_for(WAIT, |v| v["ref"] == "doc2").await?;
    assert_eq!((refused["type"].clone(), refused["code"].clone()), (json!("error"), json!("too_long")), "{refused}");
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "doc3", "text": "Both forms.", "attachments": ids, "ref": "doc3"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "doc3").await?;
    let sent_files = eventually(Duration::from_secs(20), Duration::from_millis(100), || async { Ok(Some(fake.sent_files()).filter(|f| f.len() == 2)) }).await?;
    assert_eq!((sent_files[0].0.as_str(), sent_files[0].1.as_str(), sent_files[0].2.as_str()), ("sendDocument", "4242", "Here are the steps."));
    assert_eq!(sent_files[0].3, vec![("steps.pdf".to_owned(), b"%PDF-1.4 steps".to_vec())]);
    assert_eq!((sent_files[1].0.as_str(), sent_files[1].2.as_str(), sent_files[1].3.len()), ("sendMediaGroup", "Both forms.", 2));

    // The customer answers in the same conversation.
    let (_, next) = hook(&dev, Some(SECRET), &update(3, 4242, 8, "thanks")).await?;
    assert_eq!(next["conversation"], json!(conversation));
    let event = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "thanks").await?;
    assert_eq!(event["conversation"], json!(conversation));

    // Nothing is dead-lettered.
    let (_, dead) = dev.api("GET", "/api/deliveries", Some(&supervisor), None).await?;
    assert_eq!(dead["deliveries"], json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_of_the_channel_api_runs_a_conversation_with_signed_deliveries_and_receipts() -> anyhow::Result<()> {
    let adapter = FakeAdapter::start().await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let (status, _) = dev.api("PUT", "/api/channels/viber-gw", Some(&admin), Some(json!({"kind": "viber", "name": "Viber", "default_group": "general"}))).await?;
    assert_eq!(status, 200);
    let (status, settings) = dev.api("PUT", "/api/channels/viber-gw/adapter", Some(&admin), Some(json!({"kind": "api", "outbound_url": adapter.url()}))).await?;
    assert_eq!(status, 200, "{settings}");
    let token = settings["token"].as_str().unwrap_or_default().to_owned();
    adapter.set_secret(settings["signing_secret"].as_str().unwrap_or_default());
    let (_, shown) = dev.api("GET", "/api/channels/viber-gw/adapter", Some(&admin), None).await?;
    assert!(!shown.to_string().contains(&token), "the token is shown once: {shown}");

    let message = json!({"sender": "+15550001", "sender_name": "Eve", "message_id": "v-1", "text": "Is my parcel lost?"});
    let path = "/api/channel-api/viber-gw/messages";
    assert_eq!(dev.api("POST", path, Some("not-the-token"), Some(message.clone())).await?.0, 401);
    assert_eq!(dev.api("POST", path, None, Some(message.clone())).await?.0, 401);
    let (status, taken) = dev.api("POST", path, Some(&token), Some(message.clone())).await?;
    assert_eq!((status, taken["duplicate"].clone()), (200, json!(false)), "{taken}");
    let (_, again) = dev.api("POST", path, Some(&token), Some(message)).await?;
    assert_eq!(again["duplicate"], true);
    // A body over 64 KiB is refused in the API's error shape, as every error is.
    let huge = json!({"sender": "+15550001", "message_id": "v-huge", "text": "x".repeat(70 * 1024)});
    let (status, refused) = dev.api("POST", path, Some(&token), Some(huge)).await?;
    assert_eq!((status, refused["code"].clone()), (413, json!("too_large")), "{refused}");

    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    let conversation = accept_offer(&mut bob).await?;
    bob.send(&json!({"type": "send", "conversation": conversation, "key": "b1", "text": "It is on its way.", "ref": "b1"})).await?;
    bob.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "b1").await?;
    let received = eventually(WAIT, Duration::from_millis(50), || async { Ok(adapter.received().first().cloned()) }).await?;
    assert_eq!(received["recipient"], "+15550001");
    assert_eq!(received["text"], "It is on its way.");
    assert_eq!(received["kind"], "message");
    assert_eq!(received["conversation"], json!(conversation));
    let seq = received["seq"].as_u64().unwrap_or_default();

    // Receipts: delivered, then read. A token cannot touch another channel's entries. A
    // conversation no longer kept (never here) and an unknown entry are dropped; the
    // rest of the batch counts.
    let statuses = json!([{"conversation": 999_999, "seq": 1, "status": "read"}, {"conversation": conversation, "seq": 9_999, "status": "failed"}, {"conversation": conversation, "seq": seq, "status": "delivered"}, {"conversation": conversation, "seq": seq, "status": "read"}]);
    assert_eq!(dev.api("POST", "/api/channel-api/viber-gw/statuses", Some("nope"), Some(statuses.clone())).await?.0, 401);
    let (status, body) = dev.api("POST", "/api/channel-api/viber-gw/statuses", Some(&token), Some(statuses)).await?;
    assert_eq!(status, 204, "{body}");
    let supervisor = dev.login("supervisor").await?;
    let d = deliveries(&dev, &supervisor, conversation).await?;
    assert_eq!(d[0]["status"], "read", "{d:?}");
    assert_eq!(d[0]["provider_id"], format!("fake-{conversation}:{seq}"));
    assert_eq!(adapter.refused(), (0, 0));

    // The adapter's 429 with `Retry-After` holds for the whole channel: a reply to another
    // customer, written after it, goes out only once that wait is over (sent at once, it
    // would be refused too and use up an attempt).
    let (_, other) = dev.api("POST", path, Some(&token), Some(json!({"sender": "+15550002", "message_id": "v-2", "text": "Me too"}))).await?;
    let second = accept_offer(&mut bob).await?;
    assert_eq!(json!(second), other["conversation"]);
    let before = adapter.calls().len();
    adapter.too_many_next(2);
    bob.send(&json!({"type": "send", "conversation": conversation, "key": "b2", "text": "One moment.", "ref": "b2"})).await?;
    bob.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "b2").await?;
    let refused_at = eventually(WAIT, Duration::from_millis(10), || async { Ok(adapter.calls().get(before).copied()) }).await?;
    // Its outcome committed (the entry waits for its retry), so the pause is known.
    eventually(WAIT, Duration::from_millis(20), || async {
        let d = deliveries(&dev, &supervisor, conversation).await?;
        Ok(d.iter().any(|d| d["status"] == "pending").then_some(()))
    })
    .await?;
    bob.send(&json!({"type": "send", "conversation": second, "key": "b3", "text": "Hello.", "ref": "b3"})).await?;
    bob.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "b3").await?;
    eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        let texts: Vec<Value> = adapter.received().iter().map(|r| r["text"].clone()).collect();
        Ok((texts.contains(&json!("One moment.")) && texts.contains(&json!("Hello."))).then_some(()))
    })
    .await?;
    let later: Vec<Duration> = adapter.calls()[before + 1..].iter().map(|c| c.duration_since(refused_at)).collect();
    assert_eq!(later.len(), 2, "the refused reply and the other customer's, once each: {later:?}");
    assert!(later.iter().all(|d| *d >= Duration::from_millis(1900)), "nothing went to the channel during the 2 s it asked for: {later:?}");
    Ok(())
}

/// A GET on the private listener with a bearer token: status, `Content-Type`, body.
async fn get_bytes(addr: &str, path: &str, bearer: &str) -> anyhow::Result<(u16, String, Vec<u8>)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder().method("GET").uri(path).header("host", addr).header("authorization", format!("Bearer {bearer}"));
    let response = sender.send_request(request.body(Empty::<bytes::Bytes>::new())?).await?;
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, content_type, bytes.to_vec()))
}

/// Files through the Channel API (docs/channel-api.md): a customer's file named by URL
/// on the adapter's own origin is fetched signed, checked and kept with its message;
/// one that cannot be taken refuses the push with why and writes nothing; an operator's
/// file reaches the adapter as a reference it fetches with the channel's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_both_ways_through_the_channel_api() -> anyhow::Result<()> {
    let adapter = FakeAdapter::start().await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let mut tokens = Vec::new();
    for channel in ["api-files", "api-other"] {
        let (status, _) = dev.api("PUT", &format!("/api/channels/{channel}"), Some(&admin), Some(json!({"kind": "viber", "name": channel, "default_group": "general"}))).await?;
        assert_eq!(status, 200);
        let (status, settings) = dev.api("PUT", &format!("/api/channels/{channel}/adapter"), Some(&admin), Some(json!({"kind": "api", "outbound_url": adapter.url()}))).await?;
        assert_eq!(status, 200, "{settings}");
        tokens.push(settings["token"].as_str().unwrap_or_default().to_owned());
        if channel == "api-files" {
            adapter.set_secret(settings["signing_secret"].as_str().unwrap_or_default());
        }
    }
    let token = tokens[0].clone();
    let path = "/api/channel-api/api-files/messages";
    let (status, first) = dev.api("POST", path, Some(&token), Some(json!({"sender": "c1", "message_id": "m1", "text": "hello"}))).await?;
    assert_eq!(status, 200, "{first}");
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    let conversation = accept_offer(&mut bob).await?;
    assert_eq!(json!(conversation), first["conversation"]);

    // A picture with its caption: fetched once, kept with the message.
    let png = [b"\x89PNG\r\n\x1a\n".as_slice(), &[7u8; 56]].concat();
    let url = adapter.add_file("receipt.png", "image/png", &png);
    let message = json!({"sender": "c1", "message_id": "m2", "text": "my receipt", "files": [{"url": url, "name": "receipt.png"}]});
    let (status, taken) = dev.api("POST", path, Some(&token), Some(message.clone())).await?;
    assert_eq!((status, taken["conversation"].clone(), taken["duplicate"].clone()), (200, json!(conversation), json!(false)), "{taken}");
    let event = bob.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "my receipt").await?;
    let file = &event["entry"]["attachments"][0];
    assert_eq!((file["name"].clone(), file["content_type"].clone(), file["size"].clone()), (json!("receipt.png"), json!("image/png"), json!(64)), "{event}");
    let (status, again) = dev.api("POST", path, Some(&token), Some(message)).await?;
    assert_eq!((status, again["duplicate"].clone()), (200, json!(true)), "{again}");
    assert_eq!(adapter.fetches(), 1, "a message taken before is not fetched again");
    let staff = dev.login("bob").await?;
    let id = file["id"].as_str().unwrap_or_default().to_owned();
    let (status, _, bytes) = get_bytes(&dev.private, &format!("/api/attachments/{id}"), &staff).await?;
    assert_eq!((status, bytes), (200, png.clone()), "the operator opens the picture");

    // What cannot be taken is refused with why, and nothing of it is written.
    let other_origin = json!({"sender": "c1", "message_id": "m3", "text": "x", "files": [{"url": "http://127.0.0.1:9/secret", "name": "a.png"}]});
    let (status, refused) = dev.api("POST", path, Some(&token), Some(other_origin)).await?;
    assert_eq!((status, refused["code"].clone()), (400, json!("bad_request")), "{refused}");
    assert!(refused["message"].as_str().unwrap_or_default().contains("origin"), "{refused}");
    let lying = adapter.add_file("lying.png", "image/png", b"not a picture at all");
    let zip = adapter.add_file("a.zip", "application/zip", b"PK\x03\x04 an archive");
    for (n, url) in [(4, lying), (5, zip)] {
        let body = json!({"sender": "c1", "message_id": format!("m{n}"), "text": "see", "files": [{"url": url}]});
        let (status, refused) = dev.api("POST", path, Some(&token), Some(body)).await?;
        assert_eq!((status, refused["code"].clone()), (409, json!("invalid")), "{refused}");
    }
    let huge = adapter.add_file("huge.png", "image/png", &[png.as_slice(), &vec![0u8; 5 * 1024 * 1024]].concat());
    let gone = format!("http://{}/media/gone.png", adapter.addr);
    for (n, url, why) in [(9, huge, "larger than 5242880 bytes"), (10, gone, "answered 404")] {
        let body = json!({"sender": "c1", "message_id": format!("m{n}"), "text": "see", "files": [{"url": url}]});
        let (status, refused) = dev.api("POST", path, Some(&token), Some(body)).await?;
        assert_eq!((status, refused["code"].clone()), (409, json!("invalid")), "{refused}");
        assert!(refused["message"].as_str().unwrap_or_default().contains(why), "{refused}");
    }
    // The adapter's server failing for now: send it again later.
    let busy = json!({"sender": "c1", "message_id": "m6", "text": "see", "files": [{"url": format!("http://{}/media/busy-1.png", adapter.addr)}]});
    let (status, refused) = dev.api("POST", path, Some(&token), Some(busy)).await?;
    assert_eq!((status, refused["code"].clone()), (503, json!("unavailable")), "{refused}");
    // What is refused whatever the files is refused before any is fetched.
    let fetched_before = adapter.fetches();
    for body in [
        json!({"sender": "c1", "message_id": "m11", "text": "   ", "files": [{"url": url.clone()}]}),
        json!({"sender": "c1", "message_id": "m12", "files": [{"url": url.clone(), "content_type": "application/zip"}]}),
        json!({"sender": "", "message_id": "m13", "files": [{"url": url.clone()}]}),
    ] {
        let (status, refused) = dev.api("POST", path, Some(&token), Some(body)).await?;
        assert_eq!((status, refused["code"].clone()), (409, json!("invalid")), "{refused}");
    }
    assert_eq!(adapter.fetches(), fetched_before, "nothing was fetched for them");
    let six: Vec<Value> = (0..6).map(|_| json!({"url": url.clone()})).collect();
    let (status, _) = dev.api("POST", path, Some(&token), Some(json!({"sender": "c1", "message_id": "m7", "files": six}))).await?;
    assert_eq!(status, 400, "at most 5 files a message");
    let (status, _) = dev.api("POST", path, Some(&token), Some(json!({"sender": "c1", "message_id": "m8"}))).await?;
    assert_eq!(status, 400, "no text and no files");
    let supervisor = dev.login("supervisor").await?;
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let texts: Vec<&str> = conv["history"].as_array().into_iter().flatten().filter(|e| e["kind"] == "message" && e["from"] == "client").filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(texts, ["hello", "my receipt"], "{conv}");

    // The operator's file: named in the delivery, fetched with the channel's token.
    let (status, uploaded) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name=label.pdf"), &staff, "application/pdf", b"%PDF-1.4 label".to_vec()).await?;
    assert_eq!(status, 201, "{uploaded}");
    bob.send(&json!({"type": "send", "conversation": conversation, "key": "o1", "text": "Your label", "attachments": [uploaded["id"]], "ref": "o1"})).await?;
    bob.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "o1").await?;
    let received = eventually(WAIT, Duration::from_millis(50), || async { Ok(adapter.received().into_iter().find(|d| d["text"] == "Your label")) }).await?;
    let sent = &received["files"][0];
    assert_eq!((sent["name"].clone(), sent["content_type"].clone(), sent["size"].clone()), (json!("label.pdf"), json!("application/pdf"), json!(14)), "{received}");
    let file_path = sent["path"].as_str().unwrap_or_default().to_owned();
    assert_eq!(file_path, format!("/api/channel-api/api-files/files/{}", uploaded["id"].as_str().unwrap_or_default()));
    let (status, content_type, bytes) = get_bytes(&dev.private, &file_path, &token).await?;
    assert_eq!((status, content_type.as_str(), bytes.as_slice()), (200, "application/pdf", b"%PDF-1.4 label".as_slice()));
    let digest: String = ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sent["sha256"], json!(digest));
    // Only with this channel's token, and only this channel's files.
    assert_eq!(get_bytes(&dev.private, &file_path, "not-the-token").await?.0, 401);
    assert_eq!(get_bytes(&dev.private, &file_path, &tokens[1]).await?.0, 401);
    let elsewhere = file_path.replace("api-files", "api-other");
    assert_eq!(get_bytes(&dev.private, &elsewhere, &tokens[1]).await?.0, 404);
    assert_eq!(get_bytes(&dev.private, "/api/channel-api/api-files/files/0123456789abcdef", &token).await?.0, 404);
    // The customer's own file is not read back through the adapter's token.
    assert_eq!(get_bytes(&dev.private, &format!("/api/channel-api/api-files/files/{id}"), &token).await?.0, 404);
    assert_eq!(adapter.refused(), (0, 0), "every delivery and fetch was signed");
    Ok(())
}

/// The example adapter in `adapters/examples/python`, written from docs/channel-api.md,
/// carries a conversation both ways and reports the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_adapter_runs_a_conversation_end_to_end() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let listen = format!("127.0.0.1:{port}");
    let (status, _) = dev.api("PUT", "/api/channels/toy", Some(&admin), Some(json!({"kind": "toy", "name": "Toy messenger", "default_group": "general"}))).await?;
    assert_eq!(status, 200);
    let (status, settings) = dev.api("PUT", "/api/channels/toy/adapter", Some(&admin), Some(json!({"kind": "api", "outbound_url": format!("http://{listen}/outbound")}))).await?;
    assert_eq!(status, 200, "{settings}");
    let mut adapter = python_example(
        "adapter.py",
        &[
            ("SWITCHBOARD_URL", format!("http://{}", dev.private)),
            ("SWITCHBOARD_CHANNEL", "toy".into()),
            ("SWITCHBOARD_TOKEN", settings["token"].as_str().unwrap_or_default().into()),
            ("SWITCHBOARD_SECRET", settings["signing_secret"].as_str().unwrap_or_default().into()),
            ("ADAPTER_LISTEN", listen.clone()),
        ],
        &listen,
    )
    .await?;

    // The toy messenger delivers a message twice: one message in Switchboard.
    let incoming = json!({"from": "u-77", "name": "Fay", "id": "m-1", "text": "Where is my order?"});
    let (status, first) = switchboard_gateway::client::http_json(&listen, "POST", "/incoming", None, Some(&incoming)).await?;
    assert_eq!(status, 200, "{first}");
    let (_, second) = switchboard_gateway::client::http_json(&listen, "POST", "/incoming", None, Some(&incoming)).await?;
    assert_eq!(first["conversation"], second["conversation"]);

    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let conversation = accept_offer(&mut alice).await?;
    assert_eq!(json!(conversation), first["conversation"]);
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "a1", "text": "It ships today.", "ref": "a1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "a1").await?;
    let sent = eventually(WAIT, Duration::from_millis(100), || async {
        let (_, sent) = switchboard_gateway::client::http_json(&listen, "GET", "/sent", None, None).await?;
        Ok(sent.as_array().filter(|s| !s.is_empty()).cloned())
    })
    .await?;
    assert_eq!(sent, vec![json!({"to": "u-77", "text": "It ships today.", "kind": "message"})]);
    let supervisor = dev.login("supervisor").await?;
    eventually(WAIT, Duration::from_millis(100), || async {
        let d = deliveries(&dev, &supervisor, conversation).await?;
        Ok(d.first().filter(|d| d["status"] == "delivered").cloned())
    })
    .await?;
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let texts: Vec<&str> = conv["history"].as_array().into_iter().flatten().filter(|e| e["from"] == "client").filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(texts, vec!["Where is my order?"]);
    adapter.kill().await?;
    Ok(())
}

/// `kill -9` while the provider holds a send: Telegram's sendMessage has no idempotency
/// key, so the new process does not send again; it dead-letters the message as
/// `unknown` for a supervisor, whose retry sends it. The Channel API's delivery id makes
/// a resend safe: there it is resent at once and the adapter drops the duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_send_neither_loses_nor_repeats_a_message() -> anyhow::Result<()> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let adapter = FakeAdapter::start().await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data).await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    dev.api("PUT", "/api/channels/api", Some(&admin), Some(json!({"kind": "api", "name": "API", "default_group": "general"}))).await?;
    let (_, settings) = dev.api("PUT", "/api/channels/api/adapter", Some(&admin), Some(json!({"kind": "api", "outbound_url": adapter.url()}))).await?;
    adapter.set_secret(settings["signing_secret"].as_str().unwrap_or_default());
    let token = settings["token"].as_str().unwrap_or_default().to_owned();

    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    hook(&dev, Some(SECRET), &update(1, 31, 1, "hi from telegram")).await?;
    let on_telegram = accept_offer(&mut alice).await?;
    dev.api("POST", "/api/channel-api/api/messages", Some(&token), Some(json!({"sender": "s1", "message_id": "1", "text": "hi from the api"}))).await?;
    let on_api = accept_offer(&mut alice).await?;

    fake.script(&[Fault::Hang(Duration::from_secs(60))]);
    adapter.hang_next(Duration::from_secs(60));
    for (conversation, key) in [(on_telegram, "t1"), (on_api, "p1")] {
        alice.send(&json!({"type": "send", "conversation": conversation, "key": key, "text": format!("answer {key}"), "ref": key})).await?;
        alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == key).await?;
    }
    // Both providers hold the message; the node dies before either answers.
    eventually(WAIT, Duration::from_millis(20), || async { Ok((fake.sent().len() == 1 && adapter.received().len() == 1).then_some(())) }).await?;
    dev.kill9().await?;
    let dev = Dev::start(&data).await?;
    let supervisor = dev.login("supervisor").await?;

    // The API entry is resent at once and deduplicated by the adapter.
    let sent = eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        Ok(deliveries(&dev, &supervisor, on_api).await?.into_iter().find(|d| d["status"] == "sent"))
    })
    .await?;
    assert_eq!(sent["attempts"], 2, "{sent}");
    assert_eq!(adapter.received().len(), 1);
    assert_eq!(adapter.refused().0, 1, "the adapter saw the resend and dropped it");

    // The Telegram entry waits out the orphan time, then is dead-lettered, not resent.
    let unknown = eventually(Duration::from_secs(40), Duration::from_millis(200), || async {
        Ok(deliveries(&dev, &supervisor, on_telegram).await?.into_iter().find(|d| d["status"] == "unknown"))
    })
    .await?;
    assert_eq!(fake.sent().len(), 1, "sent once, never twice");
    let (_, dead) = dev.api("GET", "/api/deliveries", Some(&supervisor), None).await?;
    assert_eq!(dead["deliveries"].as_array().map(Vec::len), Some(1), "{dead}");
    assert_eq!(dead["deliveries"][0]["conversation"], json!(on_telegram));
    // Paged: a full page names the entry the next one starts after; past it, none.
    let (_, page) = dev.api("GET", "/api/deliveries?limit=1", Some(&supervisor), None).await?;
    let next = page["next"].as_str().unwrap_or_default().to_owned();
    assert_eq!(next, format!("{on_telegram}:{}", dead["deliveries"][0]["seq"]), "{page}");
    let (_, rest) = dev.api("GET", &format!("/api/deliveries?limit=1&after={next}"), Some(&supervisor), None).await?;
    assert_eq!((rest["deliveries"].as_array().map(Vec::len), rest["next"].clone()), (Some(0), Value::Null), "{rest}");
    let (status, refused) = dev.api("GET", "/api/deliveries?after=12", Some(&supervisor), None).await?;
    assert_eq!((status, refused["code"].clone()), (400, json!("bad_request")), "{refused}");
    // A supervisor who checked with the customer sends it again.
    let seq = unknown["seq"].as_u64().unwrap_or_default();
    let (status, body) = dev.api("POST", &format!("/api/deliveries/{on_telegram}/{seq}/retry"), Some(&supervisor), None).await?;
    assert_eq!(status, 204, "{body}");
    eventually(WAIT, Duration::from_millis(100), || async {
        Ok(deliveries(&dev, &supervisor, on_telegram).await?.into_iter().find(|d| d["status"] == "sent"))
    })
    .await?;
    assert_eq!(fake.sent().len(), 2);
    let (status, _) = dev.api("POST", &format!("/api/deliveries/{on_telegram}/{seq}/retry"), Some(&supervisor), None).await?;
    assert_eq!(status, 409, "only a dead letter is sent again");
    Ok(())
}

/// A cluster of three, one group, whose leader is uploading an operator's file to a
/// fake Telegram that holds the upload for 25 s.
struct HeldUpload {
    fake: FakeTelegram,
    _dir: tempfile::TempDir,
    cluster: Cluster,
    leader: usize,
    /// A follower: alice's desk and the test's requests go through it.
    other: usize,
    alice: WsClient,
    conversation: u64,
    supervisor: String,
}

/// Starts [`HeldUpload`]: a Telegram customer's conversation taken by alice, and her
/// message with a file, acknowledged and being uploaded.
async fn upload_held_by_telegram() -> anyhow::Result<HeldUpload> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start_one_group(dir.path(), 3).await?;
    let leader = cluster.leader().await?;
    let other = (1..=3).find(|id| *id != leader).ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let dev = cluster.node(other);
    let admin = dev.login("admin").await?;
    telegram_channel(dev, &admin, &fake).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    hook(dev, Some(SECRET), &update(1, 41, 1, "send me the form")).await?;
    let conversation = accept_offer(&mut alice).await?;
    let staff = dev.login("alice").await?;
    let (status, file) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name=form.pdf"), &staff, "application/pdf", b"%PDF-1.4 form".to_vec()).await?;
    assert_eq!(status, 201, "{file}");
    let supervisor = dev.login("supervisor").await?;

    fake.script(&[Fault::Hang(Duration::from_secs(25))]);
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "f1", "text": "The form.", "attachments": [file["id"]], "ref": "f1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "f1").await?;
    eventually(WAIT, Duration::from_millis(20), || async { Ok((fake.sent_files().len() == 1).then_some(())) }).await?;
    Ok(HeldUpload { fake, _dir: dir, cluster, leader, other, alice, conversation, supervisor })
}

/// The leader is frozen while Telegram holds its upload of a file. The next leader does
/// not settle the attempt `unknown` after the 15 s it gives a text (the upload may take
/// two minutes, and its node may still answer: it waits 150 s); the frozen node, woken, gets the
/// provider's answer and commits it: the file is `sent`, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_late_answer_to_an_upload_settles_it() -> anyhow::Result<()> {
    let HeldUpload { fake, _dir, cluster, leader, other, alice: _alice, conversation, supervisor } = upload_held_by_telegram().await?;
    let dev = cluster.node(other);
    cluster.node(leader).signal("-STOP").await?;
    let frozen = std::time::Instant::now();
    // The others elect a leader, whose outbox finds the attempt with no outcome.
    eventually(Duration::from_secs(15), Duration::from_millis(200), || async {
        Ok(cluster.status(other).await?["leader"].as_u64().filter(|l| *l != leader as u64))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(frozen.elapsed())).await;
    let waiting = deliveries(dev, &supervisor, conversation).await?;
    let dead = dev.api("GET", "/api/deliveries", Some(&supervisor), None).await;
    let resumed = cluster.node(leader).signal("-CONT").await;
    assert_eq!(waiting.iter().map(|d| d["status"].clone()).collect::<Vec<_>>(), vec![json!("sending")], "20 s after the freeze: {waiting:?}");
    let (_, dead) = dead?;
    assert_eq!(dead["deliveries"], json!([]), "no dead letter while the upload may still answer");
    resumed?;
    let sent = eventually(Duration::from_secs(40), Duration::from_millis(200), || async {
        Ok(deliveries(dev, &supervisor, conversation).await?.into_iter().find(|d| d["status"] != "sending"))
    })
    .await?;
    assert_eq!((sent["status"].clone(), sent["attempts"].clone()), (json!("sent"), json!(1)), "the old leader's answer settles it: {sent}");
    assert_eq!(fake.sent_files().len(), 1, "uploaded once, never twice");
    Ok(())
}

/// The leader is killed (SIGKILL) while Telegram holds its upload of a file, and started
/// again. Its new process will never answer for that upload: the next leader asks it,
/// hears that it sends nothing, and settles the attempt `unknown` once the 15 s a text
/// gets have passed, not after the 150 s a node that may still be uploading gets. The
/// conversation's next message, which waited behind the upload, then goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_node_was_restarted_is_settled_without_the_long_wait() -> anyhow::Result<()> {
    let HeldUpload { fake, _dir, mut cluster, leader, other, mut alice, conversation, supervisor } = upload_held_by_telegram().await?;
    // Sent while the upload runs: it waits for the upload's outcome.
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "f2", "text": "Did the form arrive?", "ref": "f2"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "f2").await?;

    cluster.kill9(leader).await?;
    let killed = std::time::Instant::now();
    // The others elect a leader, whose outbox finds the attempt with no outcome; the
    // killed node then starts again as a follower.
    let next = eventually(Duration::from_secs(15), Duration::from_millis(200), || async {
        Ok(cluster.status(other).await?["leader"].as_u64().filter(|l| *l != leader as u64))
    })
    .await?;
    cluster.restart(leader).await?;
    let dev = cluster.node(other);
    let settled = eventually(Duration::from_secs(60), Duration::from_millis(200), || async {
        Ok(deliveries(dev, &supervisor, conversation).await?.into_iter().find(|d| d["status"] == "unknown"))
    })
    .await?;
    println!("the upload left by the killed leader was settled unknown {} ms after the kill: {settled}", killed.elapsed().as_millis());
    let now = cluster.status(other).await?["leader"].as_u64();
    assert_eq!(now, Some(next), "node {next} led the group all along: the settling was its, not the restarted node's");
    eventually(Duration::from_secs(20), Duration::from_millis(100), || async { Ok(fake.sent().iter().any(|(_, text)| text == "Did the form arrive?").then_some(())) }).await?;
    // Its outcome is committed a moment after the provider took it.
    eventually(WAIT, Duration::from_millis(100), || async {
        let all = deliveries(dev, &supervisor, conversation).await?;
        let statuses: Vec<Value> = all.iter().map(|d| d["status"].clone()).collect();
        Ok((statuses == [json!("unknown"), json!("sent")]).then_some(()))
    })
    .await?;
    assert_eq!(fake.sent_files().len(), 1, "the upload was not made again");
    Ok(())
}

/// The app secret the WhatsApp tests' channel `wa` checks webhooks with.
const META_APP_SECRET: &str = "meta-app-secret";

/// Channel `wa` of kind WhatsApp, its adapter sending to `fake` (access token
/// `EAAG-access`, verify token `verify-me`): the adapter settings as shown back.
async fn whatsapp_channel(dev: &Dev, admin: &str, fake: &switchboard_chaos_tests::fake_provider::FakeWhatsApp) -> anyhow::Result<Value> {
    dev.api("PUT", "/api/channels/wa", Some(admin), Some(json!({"kind": "whatsapp", "name": "WhatsApp", "default_group": "general"}))).await?;
    let settings = json!({"kind": "whatsapp", "access_token": "EAAG-access", "app_secret": META_APP_SECRET, "verify_token": "verify-me", "phone_number_id": "1098765432", "api_base": fake.api_base()});
    let (status, shown) = dev.api("PUT", "/api/channels/wa/adapter", Some(admin), Some(settings)).await?;
    anyhow::ensure!(status == 200, "the WhatsApp adapter was refused: {status} {shown}");
    Ok(shown)
}

/// `body` posted to channel `wa`'s webhook, signed with `secret` as Meta signs.
async fn whatsapp_hook(dev: &Dev, body: Value, secret: &str) -> anyhow::Result<(u16, Value)> {
    let raw = body.to_string();
    let signature = switchboard_chaos_tests::fake_provider::meta_signature(secret, raw.as_bytes());
    Ok(http_json_with(&dev.public, "POST", "/hooks/whatsapp/wa", &[("x-hub-signature-256", signature.as_str())], Some(&body)).await?)
}

/// WhatsApp Cloud API: Meta's subscription check, signed deliveries (a bad signature
/// writes nothing, a redelivery makes one message), the reply through a rate limit and a
/// 500 exactly once, and the delivered and read statuses of Meta's later webhooks shown
/// to the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_conversation_with_signed_webhooks_and_receipts() -> anyhow::Result<()> {
    use switchboard_chaos_tests::fake_provider::FakeWhatsApp;
    const APP_SECRET: &str = META_APP_SECRET;
    let fake = FakeWhatsApp::start("EAAG-access").await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let shown = whatsapp_channel(&dev, &admin, &fake).await?;
    assert_eq!(shown["webhook_path"], "/hooks/whatsapp/wa");
    assert!(!shown.to_string().contains("EAAG-access") && !shown.to_string().contains(APP_SECRET));

    // Meta's subscription check.
    let (status, challenge) = http_json_with(&dev.public, "GET", "/hooks/whatsapp/wa?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=1158201444", &[], None).await?;
    assert_eq!((status, challenge), (200, json!(1158201444)));
    let (status, _) = http_json_with(&dev.public, "GET", "/hooks/whatsapp/wa?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1", &[], None).await?;
    assert_eq!(status, 403);

    let hook = |body: Value, secret: &'static str| whatsapp_hook(&dev, body, secret);
    let message = |id: &str, text: &str| json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1098765432"}, "contacts": [{"profile": {"name": "Ana"}, "wa_id": "4915112345"}], "messages": [{"from": "4915112345", "id": id, "timestamp": "1700000000", "type": "text", "text": {"body": text}}]}}]}]});
    assert_eq!(hook(message("wamid.IN1", "hola"), "not-the-secret").await?.0, 401);
    let (status, first) = hook(message("wamid.IN1", "hola"), APP_SECRET).await?;
    assert_eq!(status, 200, "{first}");
    let (_, again) = hook(message("wamid.IN1", "hola"), APP_SECRET).await?;
    assert_eq!(again["messages"][0]["duplicate"], true, "{again}");

    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let conversation = accept_offer(&mut alice).await?;
    assert_eq!(json!(conversation), first["messages"][0]["conversation"]);
    // A document is fetched with the token and kept as the message's file, its caption
    // the text; an image the provider no longer has stays a labelled line.
    fake.add_media("MEDIA1", "application/pdf", b"%PDF-1.4 statement");
    let files = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1098765432"}, "contacts": [{"profile": {"name": "Ana"}, "wa_id": "4915112345"}], "messages": [
        {"from": "4915112345", "id": "wamid.DOC", "timestamp": "1700000001", "type": "document", "document": {"id": "MEDIA1", "mime_type": "application/pdf", "filename": "statement.pdf", "caption": "my statement"}},
        {"from": "4915112345", "id": "wamid.IMG", "timestamp": "1700000002", "type": "image", "image": {"id": "GONE", "mime_type": "image/jpeg", "caption": "lost"}}]}}]}]});
    let (status, body) = hook(files, APP_SECRET).await?;
    assert_eq!(status, 200, "{body}");
    let doc = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "my statement").await?;
    assert_eq!(doc["entry"]["attachments"][0]["name"], "statement.pdf", "{doc}");
    assert_eq!(doc["entry"]["attachments"][0]["content_type"], "application/pdf", "{doc}");
    alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"] == "[photo: lost]").await?;
    // A file goes out uploaded, then as a document with the text as its caption; two
    // files in one message are refused (WhatsApp carries one per message).
    let staff = dev.login("alice").await?;
    let mut ids = Vec::new();
    for name in ["guide.pdf", "terms.pdf"] {
        let (status, file) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name={name}"), &staff, "application/pdf", b"%PDF-1.4 guide".to_vec()).await?;
        assert_eq!(status, 201, "{file}");
        ids.push(file["id"].clone());
    }
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "wf2", "text": "two", "attachments": ids, "ref": "wf2"})).await?;
    let refused = alice.wait_for(WAIT, |v| v["ref"] == "wf2").await?;
    assert_eq!((refused["type"].clone(), refused["code"].clone()), (json!("error"), json!("invalid")), "{refused}");
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "wf1", "text": "The guide.", "attachments": [ids[0]], "ref": "wf1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "wf1").await?;
    let sent_file = eventually(Duration::from_secs(20), Duration::from_millis(100), || async { Ok(fake.sent_files().first().cloned()) }).await?;
    assert_eq!((sent_file.0.as_str(), sent_file.1.as_str(), sent_file.2.as_str(), sent_file.3.as_str()), ("4915112345", "document", "The guide.", "guide.pdf"));
    assert_eq!(sent_file.4, b"%PDF-1.4 guide");
    fake.script(&[Fault::TooMany(0), Fault::ServerError]);
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "w1", "text": "¡Hola Ana!", "ref": "w1"})).await?;
    let ack = alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "w1").await?;
    let seq = ack["seq"].clone();
    let sent = eventually(Duration::from_secs(20), Duration::from_millis(100), || async { Ok(fake.sent().first().cloned()) }).await?;
    assert_eq!((sent.0.as_str(), sent.1.as_str()), ("4915112345", "¡Hola Ana!"));
    let supervisor = dev.login("supervisor").await?;
    eventually(WAIT, Duration::from_millis(100), || async {
        Ok(deliveries(&dev, &supervisor, conversation).await?.into_iter().find(|d| d["status"] == "sent" && d["provider_id"] == sent.2.as_str()))
    })
    .await?;

    // Meta reports the message delivered, then read; the operator sees both.
    for status_name in ["delivered", "read"] {
        let receipt = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1098765432"}, "statuses": [{"id": sent.2, "status": status_name, "timestamp": "1700000100", "recipient_id": "4915112345"}]}}]}]});
        let (status, body) = hook(receipt, APP_SECRET).await?;
        assert_eq!((status, body["statuses"].clone()), (200, json!(1)), "{body}");
        let event = alice.wait_for(WAIT, |v| v["kind"] == "delivery" && v["status"] == status_name).await?;
        assert_eq!((event["conversation"].clone(), event["entry_seq"].clone()), (json!(conversation), seq.clone()));
    }
    let all = deliveries(&dev, &supervisor, conversation).await?;
    assert_eq!(all.iter().find(|d| d["provider_id"] == sent.2.as_str()).map(|d| d["status"].clone()), Some(json!("read")), "{all:?}");
    assert_eq!(fake.sent().len(), 1, "sent once through the rate limit and the 500");

    // Meta batches: a signed delivery past the 64 KiB other webhooks take is read whole
    // (up to 3 MiB), and every message in it is taken.
    let batch: Vec<Value> = (0..200).map(|n| json!({"from": "4915112345", "id": format!("wamid.B{n}"), "timestamp": "1700000200", "type": "text", "text": {"body": format!("{n} {}", "x".repeat(400))}})).collect();
    let big = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1098765432"}, "contacts": [{"profile": {"name": "Ana"}, "wa_id": "4915112345"}], "messages": batch}}]}]});
    assert!(big.to_string().len() > 64 * 1024);
    let (status, body) = hook(big, APP_SECRET).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(200), "every message of the batch taken");
    // One declaring more is refused before its body is read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(&dev.public).await?;
    let head = format!("POST /hooks/whatsapp/wa HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nx-hub-signature-256: sha256=00\r\n\r\n", dev.public, 3 * 1024 * 1024 + 1);
    raw.write_all(head.as_bytes()).await?;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, raw.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("too_large") && answer.contains("3145728"), "{answer}");
    // A large one is read only for a WhatsApp channel and with a signature: else it is
    // answered before its body is read, and takes none of the node's few places.
    for (path, signature, status) in [("/hooks/whatsapp/nope", true, "404"), ("/hooks/whatsapp/wa", false, "401")] {
        let mut raw = tokio::net::TcpStream::connect(&dev.public).await?;
        let signed = if signature { "x-hub-signature-256: sha256=00\r\n" } else { "" };
        let head = format!("POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n{signed}\r\n", dev.public);
        raw.write_all(head.as_bytes()).await?;
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(WAIT, raw.read(&mut answer)).await??;
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {answer}");
    }
    Ok(())
}

/// Meta can report a message delivered before the outbox has written down that it was
/// sent (the send's answer and the receipt race): the receipt finds no message then. It
/// is answered 200 and held, and applied once the send is written; the operator sees
/// the message delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_receipt_that_overtakes_its_send_is_applied_once_the_send_is_written() -> anyhow::Result<()> {
    let fake = switchboard_chaos_tests::fake_provider::FakeWhatsApp::start("EAAG-access").await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    whatsapp_channel(&dev, &admin, &fake).await?;
    let hook = |body: Value| whatsapp_hook(&dev, body, META_APP_SECRET);
    let value = |inner: Value| json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": inner}]}]});
    let message = value(json!({"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1098765432"}, "contacts": [{"profile": {"name": "Ana"}, "wa_id": "4915112345"}], "messages": [{"from": "4915112345", "id": "wamid.IN1", "timestamp": "1700000000", "type": "text", "text": {"body": "hola"}}]}));
    assert_eq!(hook(message).await?.0, 200);
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let conversation = accept_offer(&mut alice).await?;

    // The fake names its first message `wamid.FAKE1`: its receipt comes first.
    let receipt = value(json!({"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1098765432"}, "statuses": [{"id": "wamid.FAKE1", "status": "delivered", "timestamp": "1700000100", "recipient_id": "4915112345"}]}));
    let (status, body) = hook(receipt).await?;
    assert_eq!((status, body["statuses"].clone()), (200, json!(0)), "answered, and no message is found yet: {body}");
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "w1", "text": "¡Hola Ana!", "ref": "w1"})).await?;
    let ack = alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "w1").await?;
    let delivered = alice.wait_for(Duration::from_secs(20), |v| v["kind"] == "delivery" && v["status"] == "delivered").await?;
    assert_eq!((delivered["conversation"].clone(), delivered["entry_seq"].clone()), (json!(conversation), ack["seq"].clone()), "{delivered}");
    assert_eq!(fake.sent().first().map(|m| m.2.clone()), Some("wamid.FAKE1".to_owned()));
    // Counted once the receipt's commit returns, which the desk's event may overtake.
    let lines = ["switchboard_receipts_held_total 1", "switchboard_receipts_matched_late_total 1", "switchboard_receipts_dropped_total 0"];
    switchboard_chaos_tests::eventually(WAIT, Duration::from_millis(50), || async {
        let (_, metrics) = dev.api("GET", "/metrics", None, None).await?;
        let metrics = metrics.as_str().unwrap_or_default().to_owned();
        Ok(lines.iter().all(|line| metrics.lines().any(|l| l == *line)).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{lines:?} in /metrics: {e}"))?;
    Ok(())
}

fn hs256_token(secret: &str, claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signed = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.to_string().as_bytes()));
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()), signed.as_bytes());
    format!("{signed}.{}", b64(tag.as_ref()))
}

/// Identified customers: a site signs its customer's id; the conversation's visitor is
/// that customer on every channel sharing the key, so staff see their earlier
/// conversations there; a forged identity is ignored and shown as unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_customer_identity_links_conversations_across_channels_and_a_forged_one_is_unverified() -> anyhow::Result<()> {
    const KEY: &str = "the-site-and-switchboard-share-this-secret";
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let (status, _) = dev.api("PUT", "/api/channels/app", Some(&admin), Some(json!({"kind": "web", "name": "Mobile app", "default_group": "general"}))).await?;
    assert_eq!(status, 200);
    for channel in ["web", "app"] {
        let (status, shown) = dev.api("PUT", &format!("/api/channels/{channel}/identity"), Some(&admin), Some(json!({"alg": "HS256", "secret": KEY}))).await?;
        assert_eq!(status, 200, "{shown}");
        assert!(!shown.to_string().contains(KEY), "the secret is not shown back: {shown}");
    }
    let (status, _) = dev.api("PUT", "/api/channels/app/identity", Some(&admin), Some(json!({"alg": "HS256", "secret": "short"}))).await?;
    assert_eq!(status, 409);
    let (status, _) = dev.api("PUT", "/api/channels/app/identity", Some(&admin), Some(json!({"alg": "RS256", "public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}))).await?;
    assert_eq!(status, 409, "a public key that is not one is refused");

    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 600;
    let start = |channel: &'static str, identity: String| {
        let public = dev.public.clone();
        async move {
            let mut ws = WsClient::connect(&public, "/ws/client", None).await?;
            ws.send(&json!({"type": "start", "channel": channel, "name": "Dana", "identity": identity})).await?;
            let started = ws.wait_for(WAIT, |v| v["type"] == "started").await?;
            anyhow::Ok((ws, started["conversation"].as_u64().unwrap_or_default()))
        }
    };
    let supervisor = dev.login("supervisor").await?;
    let view = |conversation: u64| {
        let (dev, supervisor) = (&dev, supervisor.clone());
        async move { anyhow::Ok(dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?.1) }
    };
    let (_site, on_site) = start("web", hs256_token(KEY, &json!({"sub": "cust-42", "exp": exp}))).await?;
    let (_app, in_app) = start("app", hs256_token(KEY, &json!({"sub": "cust-42", "exp": exp}))).await?;
    let conv = view(in_app).await?;
    let customer = conv["visitor"]["id"].as_str().unwrap_or_default().to_owned();
    assert!(customer.starts_with("customer:") && customer.ends_with(":cust-42") && customer.len() == "customer:".len() + 8 + ":cust-42".len(), "{conv}");
    assert_eq!(conv["visitor"]["attributes"]["identity"], "verified");
    let earlier: Vec<u64> = conv["earlier"].as_array().into_iter().flatten().filter_map(|e| e["conversation"].as_u64()).collect();
    assert_eq!(earlier, vec![on_site], "the customer's conversation on the site is listed in the app's");

    let (_forged, forged) = start("app", hs256_token("an-attacker-guessing-at-the-secret-key", &json!({"sub": "cust-42", "exp": exp}))).await?;
    let conv = view(forged).await?;
    assert_ne!(conv["visitor"]["id"], customer.as_str());
    // The attribute only the server sets cannot come from a client.
    let mut spoof = WsClient::connect(&dev.public, "/ws/client", None).await?;
    spoof.send(&json!({"type": "start", "name": "Mallory", "attributes": {"identity": "verified"}})).await?;
    let refused = spoof.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!(refused["code"], "invalid", "{refused}");
    assert!(conv["visitor"]["attributes"]["identity"].as_str().is_some_and(|s| s.starts_with("unverified")), "{conv}");
    assert_eq!(conv["earlier"], json!([]));
    let (_expired, expired) = start("web", hs256_token(KEY, &json!({"sub": "cust-42", "exp": 1_000}))).await?;
    assert_eq!(view(expired).await?["visitor"]["attributes"]["identity"], "unverified: it expired");

    // The visitor token a verified start got stands for the customer only with the
    // identity: presented alone (left on a shared device), it makes no one that customer.
    let mut verified = WsClient::connect(&dev.public, "/ws/client", None).await?;
    verified.send(&json!({"type": "start", "channel": "web", "name": "Dana", "identity": hs256_token(KEY, &json!({"sub": "cust-42", "exp": exp}))})).await?;
    let started = verified.wait_for(WAIT, |v| v["type"] == "started").await?;
    let left_behind = started["visitor_token"].as_str().unwrap_or_default().to_owned();
    let mut stranger = WsClient::connect(&dev.public, "/ws/client", None).await?;
    stranger.send(&json!({"type": "start", "channel": "web", "name": "Eve", "visitor_token": left_behind})).await?;
    let theirs = stranger.wait_for(WAIT, |v| v["type"] == "started").await?;
    let conv = view(theirs["conversation"].as_u64().unwrap_or_default()).await?;
    assert_ne!(conv["visitor"]["id"], customer.as_str(), "{conv}");
    assert_eq!(conv["earlier"], json!([]), "the customer's conversations are not shown as the stranger's");

    // Two different secrets with one key id (eight hex digits: a birthday search finds
    // a pair in about 2^16 tries): the second is refused on another channel, which
    // would otherwise share the first channel's customers.
    let key_id = |secret: &str| ring::digest::digest(&ring::digest::SHA256, format!("hs256:{secret}").as_bytes()).as_ref()[..4].to_vec();
    let mut seen = std::collections::HashMap::new();
    let (first, second) = (0u64..10_000_000)
        .map(|n| format!("a-secret-of-thirty-two-bytes-{n:010}"))
        .find_map(|secret| seen.insert(key_id(&secret), secret.clone()).map(|earlier| (earlier, secret)))
        .ok_or_else(|| anyhow::anyhow!("no two secrets with one key id in 10,000,000 tries"))?;
    let (status, body) = dev.api("PUT", "/api/channels/app/identity", Some(&admin), Some(json!({"alg": "HS256", "secret": first}))).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = dev.api("PUT", "/api/channels/web/identity", Some(&admin), Some(json!({"alg": "HS256", "secret": second}))).await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("invalid")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("channel app")), "{body}");
    let (status, body) = dev.api("PUT", "/api/channels/web/identity", Some(&admin), Some(json!({"alg": "HS256", "secret": first}))).await?;
    assert_eq!(status, 200, "the same key on two channels is what sharing customers means: {body}");
    // Nor is a channel called `customer` made: its senders' ids (`customer:<sender>`,
    // and a Channel API sender may hold `:`) would be verified customers' ids.
    let (status, body) = dev.api("PUT", "/api/channels/customer", Some(&admin), Some(json!({"kind": "api", "name": "API", "default_group": "general"}))).await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("invalid")), "{body}");
    Ok(())
}

/// A bot that does not answer holds up no message to the customer: its events wait for
/// their retries apart from what the customer is to receive, so once a supervisor takes
/// the conversation from the bot, the operator's reply reaches the messenger at once
/// (before, it waited behind the bot's events, retried for up to 24 hours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_that_does_not_answer_holds_up_no_message_to_the_customer() -> anyhow::Result<()> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    // Nobody listens where the bot is said to be.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (status, bot) = dev.api("PUT", "/api/channels/tg/bot", Some(&admin), Some(json!({"url": format!("http://127.0.0.1:{port}/events")}))).await?;
    assert_eq!(status, 200, "{bot}");
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (status, taken) = hook(&dev, Some(SECRET), &update(1, 4242, 7, "hello, anyone there?")).await?;
    assert_eq!(status, 200, "{taken}");
    let conversation = taken["conversation"].as_u64().ok_or_else(|| anyhow::anyhow!("no conversation: {taken}"))?;
    let supervisor = dev.login("supervisor").await?;
    // The bot's events are tried and wait for their retries (what the bot was told is
    // not listed among the conversation's deliveries; the node counts its attempts).
    let attempts = |outcome: &'static str| {
        let dev = &dev;
        async move {
            let (_, metrics) = dev.api("GET", "/metrics", None, None).await?;
            let text = metrics.as_str().unwrap_or_default().to_owned();
            let line = format!("switchboard_outbox_attempts_total{{outcome=\"{outcome}\"}}");
            anyhow::Ok(text.lines().find(|l| l.starts_with(&line)).and_then(|l| l.rsplit(' ').next()).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0))
        }
    };
    let retries = || attempts("retry");
    eventually(WAIT, Duration::from_millis(100), || async { Ok(Some(retries().await?).filter(|n| *n >= 2)) }).await?;
    assert_eq!(deliveries(&dev, &supervisor, conversation).await?, Vec::<Value>::new(), "nothing for the customer yet");

    // A supervisor gives the conversation to Alice, who answers.
    let (status, body) = dev.api("POST", &format!("/api/conversations/{conversation}/reassign"), Some(&supervisor), Some(json!({"operator": "alice", "comment": "the bot is down"}))).await?;
    assert_eq!(status, 200, "{body}");
    alice.wait_for(WAIT, |v| v["kind"] == "assigned" && v["conversation"] == conversation).await?;
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "r1", "text": "Hello Dana, I am here.", "ref": "r1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "r1").await?;
    eventually(WAIT, Duration::from_millis(100), || async { Ok(fake.sent().into_iter().find(|(_, text)| text == "Hello Dana, I am here.")) }).await?;
    // The provider's answer is committed a moment after it took the message.
    eventually(WAIT, Duration::from_millis(100), || async {
        let d = deliveries(&dev, &supervisor, conversation).await?;
        Ok(d.into_iter().find(|d| d["recipient"] == "4242" && d["status"] == "sent"))
    })
    .await?;
    // The bot's two events (its start and the customer's message) are not for it any
    // more: at their next try each is dead-lettered, not tried again for a day.
    let failed_before = attempts("failed").await?;
    // (Their backoff doubles from a second: the next try may be half a minute away.)
    eventually(Duration::from_secs(90), Duration::from_millis(200), || async { Ok(Some(attempts("failed").await?).filter(|n| *n >= failed_before + 2)) }).await?;
    let retried = retries().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(retries().await?, retried, "nothing is retried after the bot's events were given up");
    Ok(())
}

/// A bot before the operators (rules 7): the reference echo bot in
/// `adapters/examples/python` greets a web chat customer with a quick reply, echoes,
/// and hands off when asked for a person; no operator is offered the conversation or
/// charged for it until then, and the operator who takes it reads the bot's reason and
/// context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_answers_first_then_hands_off_with_its_context() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let (status, bot) = dev.api("PUT", "/api/channels/web/bot", Some(&admin), Some(json!({"url": format!("http://{listen}/events")}))).await?;
    assert_eq!(status, 200, "{bot}");
    let mut process = python_example(
        "echo_bot.py",
        &[
            ("SWITCHBOARD_URL", format!("http://{}", dev.private)),
            ("SWITCHBOARD_CHANNEL", "web".into()),
            ("BOT_TOKEN", bot["token"].as_str().unwrap_or_default().into()),
            ("BOT_SECRET", bot["signing_secret"].as_str().unwrap_or_default().into()),
            ("BOT_LISTEN", listen.clone()),
        ],
        &listen,
    )
    .await?;
    // A wrong token gets nothing done.
    let (status, _) = dev.api("POST", "/api/bot/web/messages", Some("forged"), Some(json!({"conversation": 1, "key": "x", "text": "hi"}))).await?;
    assert_eq!(status, 401);

    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut client, conversation, _) = dev.client("Gus").await?;
    let greeting = client.wait_for(WAIT, |v| v["type"] == "event" && v["from"] == "bot").await?;
    assert!(greeting["text"].as_str().is_some_and(|t| t.starts_with("Hello Gus")), "{greeting}");
    assert_eq!(greeting["buttons"], json!(["Talk to a person"]));
    client.send(&json!({"type": "send", "key": "c1", "text": "where is my order"})).await?;
    let echo = client.wait_for(WAIT, |v| v["type"] == "event" && v["from"] == "bot" && v["text"] == "You said: where is my order").await?;
    assert_eq!(echo["buttons"], json!(["Talk to a person"]));
    // While the bot holds it: no offer, and nobody's capacity is used.
    assert!(alice.wait_for(Duration::from_millis(500), |v| v["kind"] == "offer").await.is_err(), "no operator is offered a conversation the bot holds");
    let supervisor = dev.login("supervisor").await?;
    let (_, operators) = dev.api("GET", "/api/operators", Some(&supervisor), None).await?;
    let alice_row = operators["operators"].as_array().and_then(|o| o.iter().find(|o| o["id"] == "alice").cloned()).unwrap_or_default();
    assert_eq!(alice_row["active"], 0, "{alice_row}");
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    assert_eq!(conv["status"]["state"], "with_bot", "{conv}");

    // The customer taps the quick reply: the bot hands off; Alice is offered it and reads why.
    client.send(&json!({"type": "send", "key": "c2", "text": "Talk to a person"})).await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], conversation);
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "accept"})).await?;
    let assigned = alice.wait_for(WAIT, |v| v["kind"] == "assigned").await?;
    let handoff = assigned["history"].as_array().and_then(|h| h.iter().find(|e| e["kind"] == "handoff").cloned()).unwrap_or_default();
    assert_eq!(handoff["reason"], "the customer asked for a person", "{assigned}");
    assert_eq!(handoff["context"], json!({"asked_with": "Talk to a person", "messages": "2"}));
    assert_eq!(handoff["group"], "general");
    let bot_lines = assigned["history"].as_array().into_iter().flatten().filter(|e| e["from"] == "bot").count();
    assert_eq!(bot_lines, 2, "the operator sees the bot's answers too");
    // The bot may not write in a conversation it no longer holds.
    let (status, refused) = dev.api("POST", "/api/bot/web/messages", bot["token"].as_str(), Some(json!({"conversation": conversation, "key": "late", "text": "still me"}))).await?;
    assert_eq!(status, 409, "{refused}");
    process.kill().await?;
    Ok(())
}

/// VK: the Callback API's confirmation, the secret in each event, one message for a
/// retried event; and `messages.send`'s `random_id`, which makes a resend after
/// `kill -9` safe: the send is repeated and the customer still gets one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vk_conversation_is_confirmed_deduplicated_and_resent_safely_after_a_kill() -> anyhow::Result<()> {
    use switchboard_chaos_tests::fake_provider::FakeVk;
    let fake = FakeVk::start("vk1.a.token").await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data).await?;
    let admin = dev.login("admin").await?;
    dev.api("PUT", "/api/channels/vk", Some(&admin), Some(json!({"kind": "vk", "name": "VK", "default_group": "general"}))).await?;
    let settings = json!({"kind": "vk", "access_token": "vk1.a.token", "secret": "callback-secret", "confirmation": "a1b2c3d4", "group_id": "77", "api_base": fake.api_base()});
    let (status, shown) = dev.api("PUT", "/api/channels/vk/adapter", Some(&admin), Some(settings)).await?;
    assert_eq!(status, 200, "{shown}");
    let hook = |body: Value| {
        let public = dev.public.clone();
        async move { anyhow::Ok(http_json_with(&public, "POST", "/hooks/vk/vk", &[], Some(&body)).await?) }
    };
    assert_eq!(hook(json!({"type": "confirmation", "group_id": 77})).await?, (200, json!("a1b2c3d4")));
    assert_eq!(hook(json!({"type": "confirmation", "group_id": 78})).await?.0, 403);
    let message = |secret: &str| json!({"type": "message_new", "group_id": 77, "event_id": "ev1", "v": "5.199", "secret": secret, "object": {"message": {"id": 501, "date": 1, "from_id": 9001, "peer_id": 9001, "text": "privet"}, "client_info": {}}});
    assert_eq!(hook(message("wrong")).await?.0, 401);
    for _ in 0..3 {
        assert_eq!(hook(message("callback-secret")).await?, (200, json!("ok")));
    }
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let conversation = accept_offer(&mut alice).await?;
    let supervisor = dev.login("supervisor").await?;
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    assert_eq!(conv["history"].as_array().into_iter().flatten().filter(|e| e["from"] == "client").count(), 1, "{conv}");
    // A photo: its largest size is fetched from VK's storage and kept.
    let jpeg = [[0xFFu8, 0xD8, 0xFF, 0xE1].as_slice(), &[2u8; 50]].concat();
    let (small, large) = (fake.add_file("s.jpg", "image/jpeg", &jpeg[..20]), fake.add_file("x.jpg", "image/jpeg", &jpeg));
    // With it a video and a location, which are not fetched: their lines stay.
    let photo = json!({"type": "message_new", "group_id": 77, "event_id": "ev2", "v": "5.199", "secret": "callback-secret", "object": {"message": {"id": 502, "date": 2, "from_id": 9001, "peer_id": 9001, "text": "vot",
        "attachments": [{"type": "photo", "photo": {"id": 1, "sizes": [{"type": "s", "url": small, "width": 75, "height": 50}, {"type": "x", "url": large, "width": 604, "height": 402}]}}, {"type": "video"}],
        "geo": {"type": "point", "coordinates": {"latitude": 55.75, "longitude": 37.61}}}, "client_info": {}}});
    assert_eq!(hook(photo).await?, (200, json!("ok")));
    let event = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["seq"].as_u64() > Some(2) && !v["entry"]["attachments"].as_array().is_none_or(Vec::is_empty)).await?;
    assert_eq!(event["entry"]["text"], "vot\n[video]\n[location]", "{event}");
    assert_eq!((event["entry"]["attachments"][0]["name"].clone(), event["entry"]["attachments"][0]["size"].clone()), (json!("photo.jpg"), json!(54)), "{event}");

    // A message forwarding many others is a callback past 64 KiB: taken (up to 1 MiB).
    let forwarded: Vec<Value> = (0..400).map(|i| json!({"date": 1, "from_id": 9001, "text": format!("{i}: {}", "earlier words ".repeat(30))})).collect();
    let long = json!({"type": "message_new", "group_id": 77, "event_id": "ev3", "v": "5.199", "secret": "callback-secret", "object": {"message": {"id": 503, "date": 3, "from_id": 9001, "peer_id": 9001, "text": "see what I was sent", "fwd_messages": forwarded}, "client_info": {}}});
    assert!(long.to_string().len() > 150 * 1024, "past the 64 KiB of other webhooks");
    assert_eq!(hook(long).await?, (200, json!("ok")));
    alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["text"].as_str().is_some_and(|t| t.starts_with("see what I was sent"))).await?;

    // VK takes the message but the node dies before the answer comes.
    fake.hang_next(Duration::from_secs(60));
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "v1", "text": "Здравствуйте!", "ref": "v1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "v1").await?;
    eventually(WAIT, Duration::from_millis(20), || async { Ok((fake.calls() == 1).then_some(())) }).await?;
    dev.kill9().await?;
    let dev = Dev::start(&data).await?;
    let supervisor = dev.login("supervisor").await?;
    let sent = eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        Ok(deliveries(&dev, &supervisor, conversation).await?.into_iter().find(|d| d["status"] == "sent"))
    })
    .await?;
    assert_eq!(sent["attempts"], 2, "sent again after the kill: {sent}");
    assert_eq!(fake.calls(), 2);
    assert_eq!(fake.sent(), vec![("9001".to_owned(), "Здравствуйте!".to_owned())], "VK delivered it once: the random_id was the same");

    // Routing rules 8: the operator's picture and document are uploaded (a message photo
    // and a document) and go with the text in one messages.send.
    let (mut alice, _) = dev.operator("alice").await?;
    let staff = dev.login("alice").await?;
    let mut ids = Vec::new();
    for (name, kind, bytes) in [("card.jpg", "image/jpeg", jpeg.clone()), ("terms.pdf", "application/pdf", b"%PDF-1.4 terms".to_vec())] {
        let (status, file) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name={name}"), &staff, kind, bytes).await?;
        assert_eq!(status, 201, "{file}");
        ids.push(file["id"].clone());
    }
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "v2", "text": "Вот условия", "attachments": ids, "ref": "v2"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "v2").await?;
    let sent_files = eventually(Duration::from_secs(20), Duration::from_millis(100), || async { Ok(fake.sent_files().first().cloned()) }).await?;
    assert_eq!((sent_files.0.as_str(), sent_files.1.as_str()), ("9001", "Вот условия"));
    assert_eq!(sent_files.2, vec![("card.jpg".to_owned(), jpeg.clone()), ("terms.pdf".to_owned(), b"%PDF-1.4 terms".to_vec())]);
    Ok(())
}

/// Facebook Messenger: Meta's subscription check and signature, one message for a
/// redelivery, the page's echo of its own message dropped, the reply through the Send
/// API, and its delivery receipt by `mid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messenger_conversation_with_signed_webhooks_and_delivery_receipts() -> anyhow::Result<()> {
    use switchboard_chaos_tests::fake_provider::{meta_signature, FakeMessenger};
    const APP_SECRET: &str = "page-app-secret";
    let fake = FakeMessenger::start("EAAB-page").await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    dev.api("PUT", "/api/channels/fb", Some(&admin), Some(json!({"kind": "messenger", "name": "Facebook", "default_group": "general"}))).await?;
    let settings = json!({"kind": "messenger", "page_token": "EAAB-page", "app_secret": APP_SECRET, "verify_token": "verify-fb", "api_base": fake.api_base()});
    let (status, shown) = dev.api("PUT", "/api/channels/fb/adapter", Some(&admin), Some(settings)).await?;
    assert_eq!((status, shown["webhook_path"].clone()), (200, json!("/hooks/messenger/fb")), "{shown}");
    let (status, challenge) = http_json_with(&dev.public, "GET", "/hooks/messenger/fb?hub.mode=subscribe&hub.verify_token=verify-fb&hub.challenge=42", &[], None).await?;
    assert_eq!((status, challenge), (200, json!(42)));

    let hook = |body: Value, secret: &'static str| {
        let public = dev.public.clone();
        async move {
            let raw = body.to_string();
            let signature = meta_signature(secret, raw.as_bytes());
            anyhow::Ok(http_json_with(&public, "POST", "/hooks/messenger/fb", &[("x-hub-signature-256", signature.as_str())], Some(&body)).await?)
        }
    };
    let page = |events: Value| json!({"object": "page", "entry": [{"id": "PAGE", "time": 1, "messaging": events}]});
    let hello = page(json!([{"sender": {"id": "PSID9"}, "recipient": {"id": "PAGE"}, "timestamp": 1, "message": {"mid": "m_in1", "text": "hello page"}}]));
    assert_eq!(hook(hello.clone(), "wrong").await?.0, 401);
    let (status, first) = hook(hello.clone(), APP_SECRET).await?;
    assert_eq!(status, 200, "{first}");
    let (_, again) = hook(hello, APP_SECRET).await?;
    assert_eq!(again["messages"][0]["duplicate"], true);
    let echo = page(json!([{"sender": {"id": "PAGE"}, "recipient": {"id": "PSID9"}, "timestamp": 2, "message": {"mid": "m_echo", "text": "from the page", "is_echo": true}}]));
    assert_eq!(hook(echo, APP_SECRET).await?.1["messages"], json!([]), "the page's own echo is not a customer message");

    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let conversation = accept_offer(&mut alice).await?;
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "f1", "text": "Hi, how can I help?", "ref": "f1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "f1").await?;
    let sent = eventually(WAIT, Duration::from_millis(100), || async { Ok(fake.sent().first().cloned()) }).await?;
    assert_eq!((sent.0.as_str(), sent.1.as_str()), ("PSID9", "Hi, how can I help?"));
    let supervisor = dev.login("supervisor").await?;
    eventually(WAIT, Duration::from_millis(100), || async { Ok(deliveries(&dev, &supervisor, conversation).await?.into_iter().find(|d| d["status"] == "sent")) }).await?;
    let receipt = page(json!([{"sender": {"id": "PSID9"}, "recipient": {"id": "PAGE"}, "delivery": {"mids": [sent.2], "watermark": 3}}]));
    let (status, body) = hook(receipt, APP_SECRET).await?;
    assert_eq!((status, body["statuses"].clone()), (200, json!(1)), "{body}");
    alice.wait_for(WAIT, |v| v["kind"] == "delivery" && v["status"] == "delivered").await?;
    // A picture the customer sends comes from the URL in the webhook and is kept.
    let png = [b"\x89PNG\r\n\x1a\n".as_slice(), &[1u8; 40]].concat();
    let url = fake.add_file("card", "image/png", &png);
    let picture = page(json!([{"sender": {"id": "PSID9"}, "recipient": {"id": "PAGE"}, "timestamp": 4, "message": {"mid": "m_pic", "attachments": [{"type": "image", "payload": {"url": url}}]}}]));
    assert_eq!(hook(picture, APP_SECRET).await?.0, 200);
    let event = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["from"] == "client" && v["entry"]["attachments"][0]["name"] == "photo.png").await?;
    assert_eq!((event["entry"]["text"].clone(), event["entry"]["attachments"][0]["content_type"].clone()), (json!(""), json!("image/png")), "{event}");
    let staff = dev.login("alice").await?;
    let id = event["entry"]["attachments"][0]["id"].as_str().unwrap_or_default().to_owned();
    let (status, _) = http_json_with(&dev.private, "GET", &format!("/api/attachments/{id}"), &[("authorization", format!("Bearer {staff}").as_str())], None).await?;
    assert_eq!(status, 200, "the operator opens the picture");
    // The operator's file goes out as an attachment of its own; with text it is refused.
    let (status, file) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name=menu.pdf"), &staff, "application/pdf", b"%PDF-1.4 menu".to_vec()).await?;
    assert_eq!(status, 201, "{file}");
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "mf1", "text": "the menu", "attachments": [file["id"]], "ref": "mf1"})).await?;
    let refused = alice.wait_for(WAIT, |v| v["ref"] == "mf1").await?;
    assert_eq!((refused["type"].clone(), refused["code"].clone()), (json!("error"), json!("invalid")), "{refused}");
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "mf2", "text": "", "attachments": [file["id"]], "ref": "mf2"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "mf2").await?;
    let sent_file = eventually(Duration::from_secs(20), Duration::from_millis(100), || async { Ok(fake.sent_files().first().cloned()) }).await?;
    assert_eq!((sent_file.0.as_str(), sent_file.1.as_str(), sent_file.2.as_str(), sent_file.3.as_slice()), ("PSID9", "file", "menu.pdf", b"%PDF-1.4 menu".as_slice()));

    // An emergency notice longer than the Send API's 2000 characters reaches a new
    // customer whole, as two messages cut between its lines.
    let notice = format!("{}\n{}", "Card payments are down. ".repeat(60).trim_end(), "We are fixing it; thank you for waiting. ".repeat(40).trim_end());
    assert!(notice.chars().count() > 2000 && notice.chars().count() <= 4000);
    let (status, body) = dev.api("PUT", "/api/emergencies", Some(&supervisor), Some(json!({"channel": "fb", "message": notice}))).await?;
    assert!(status < 300, "{status} {body}");
    let other = page(json!([{"sender": {"id": "PSID10"}, "recipient": {"id": "PAGE"}, "timestamp": 5, "message": {"mid": "m_in2", "text": "can I pay?"}}]));
    assert_eq!(hook(other, APP_SECRET).await?.0, 200);
    let parts = eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        let parts: Vec<String> = fake.sent().into_iter().filter(|(to, _, _)| to == "PSID10").map(|(_, text, _)| text).collect();
        Ok(Some(parts).filter(|p| p.len() == 2))
    })
    .await?;
    assert_eq!(parts.join("\n"), notice, "the notice whole, cut at its line break");
    let (_, dead) = dev.api("GET", "/api/deliveries", Some(&supervisor), None).await?;
    assert_eq!(dead["deliveries"], json!([]), "nothing dead-lettered");
    Ok(())
}

/// Viber: signed callbacks (a bad signature writes nothing), one message for a retried
/// callback, the reply through send_message, and its delivered and seen receipts by
/// message_token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viber_conversation_with_signed_callbacks_and_receipts() -> anyhow::Result<()> {
    use switchboard_chaos_tests::fake_provider::{viber_signature, FakeViber};
    const AUTH: &str = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9";
    let fake = FakeViber::start(AUTH).await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    dev.api("PUT", "/api/channels/viber", Some(&admin), Some(json!({"kind": "viber", "name": "Viber", "default_group": "general"}))).await?;
    let settings = json!({"kind": "viber", "auth_token": AUTH, "sender_name": "Acme Support", "api_base": fake.api_base()});
    let (status, shown) = dev.api("PUT", "/api/channels/viber/adapter", Some(&admin), Some(settings)).await?;
    assert_eq!((status, shown["webhook_path"].clone()), (200, json!("/hooks/viber/viber")), "{shown}");
    let hook = |body: Value, key: &'static str| {
        let public = dev.public.clone();
        async move {
            let raw = body.to_string();
            let signature = viber_signature(key, raw.as_bytes());
            anyhow::Ok(http_json_with(&public, "POST", "/hooks/viber/viber", &[("x-viber-content-signature", signature.as_str())], Some(&body)).await?)
        }
    };
    // Viber checks the webhook with a `webhook` event when it is set.
    assert_eq!(hook(json!({"event": "webhook", "timestamp": 1, "message_token": 1}), AUTH).await?.0, 200);
    let message = json!({"event": "message", "timestamp": 1457764197627u64, "message_token": 4912661846655238145u64, "sender": {"id": "01234567890A=", "name": "John McClane", "api_version": 1}, "message": {"type": "text", "text": "Yippee-ki-yay"}});
    assert_eq!(hook(message.clone(), "not-the-auth-token").await?.0, 401);
    let (_, first) = hook(message.clone(), AUTH).await?;
    let (_, again) = hook(message, AUTH).await?;
    assert_eq!((first["duplicate"].clone(), again["duplicate"].clone()), (json!(false), json!(true)), "{first} {again}");

    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let conversation = accept_offer(&mut alice).await?;
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "v1", "text": "Welcome to the party, pal", "ref": "v1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "v1").await?;
    let sent = eventually(WAIT, Duration::from_millis(100), || async { Ok(fake.sent().first().cloned()) }).await?;
    assert_eq!((sent.0.as_str(), sent.1.as_str()), ("01234567890A=", "Welcome to the party, pal"));
    let supervisor = dev.login("supervisor").await?;
    eventually(WAIT, Duration::from_millis(100), || async { Ok(deliveries(&dev, &supervisor, conversation).await?.into_iter().find(|d| d["status"] == "sent")) }).await?;
    for (event, status_name) in [("delivered", "delivered"), ("seen", "read")] {
        let (status, body) = hook(json!({"event": event, "timestamp": 2, "message_token": sent.2, "user_id": "01234567890A="}), AUTH).await?;
        assert_eq!((status, body["statuses"].clone()), (200, json!(1)), "{body}");
        alice.wait_for(WAIT, |v| v["kind"] == "delivery" && v["status"] == status_name).await?;
    }
    Ok(())
}

/// A provider that takes a message and never answers: Telegram cannot tell a repeat from
/// a new message, so after the 10 s the outbox waits the message is `unknown` (a dead
/// letter for a person), not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_that_is_never_answered_is_not_repeated_on_a_provider_without_idempotency() -> anyhow::Result<()> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    hook(&dev, Some(SECRET), &update(1, 77, 1, "hello")).await?;
    let conversation = accept_offer(&mut alice).await?;
    fake.script(&[Fault::Hang(Duration::from_secs(30))]);
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "h1", "text": "are you there?", "ref": "h1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "h1").await?;
    let supervisor = dev.login("supervisor").await?;
    let unknown = eventually(Duration::from_secs(25), Duration::from_millis(200), || async {
        Ok(deliveries(&dev, &supervisor, conversation).await?.into_iter().find(|d| d["status"] == "unknown"))
    })
    .await?;
    assert_eq!(unknown["attempts"], 1, "{unknown}");
    // An absence, so a wait: a retry would have come after the first backoff (1 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.calls().len(), 1, "the provider was called once");
    let (_, dead) = dev.api("GET", "/api/deliveries", Some(&supervisor), None).await?;
    assert_eq!(dead["deliveries"].as_array().map(Vec::len), Some(1));
    Ok(())
}

/// Sends `raw` to the node's SMTP listener as `from` to `to`, as a mail server would.
async fn mail_to(dev: &Dev, from: &str, to: &str, raw: &str) -> anyhow::Result<switchboard_adapters::SendOutcome> {
    let smtp = dev.smtp.clone().ok_or_else(|| anyhow::anyhow!("no SMTP listener printed"))?;
    let (host, port) = smtp.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("{smtp}"))?;
    let client = switchboard_adapters::http::Client::new(Duration::from_secs(10))?;
    let relay = switchboard_adapters::email::Relay { host, port: port.parse()?, security: "none", username: "", password: "" };
    Ok(switchboard_adapters::email::deliver(&client.tls(), Duration::from_secs(10), &relay, from, to, raw.replace('\n', "\r\n").as_bytes()).await)
}

async fn upload(addr: &str, path: &str, bearer: &str, content_type: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder().method("POST").uri(path).header("host", addr).header("content-type", content_type).header("authorization", format!("Bearer {bearer}"));
    let response = sender.send_request(request.body(Full::new(bytes::Bytes::from(body)))?).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_conversation_keeps_its_thread_and_files_both_ways_through_a_deferring_relay() -> anyhow::Result<()> {
    let relay = FakeRelay::start(Some(("switchboard", "relay-password"))).await?;
    let dir = tempfile::tempdir()?;
    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir.path().join("data"), &["--smtp-addr", "127.0.0.1:0"]).await?;
    let admin = dev.login("admin").await?;
    let (status, body) = dev.api("PUT", "/api/channels/mail", Some(&admin), Some(json!({"kind": "email", "name": "Email", "default_group": "general"}))).await?;
    assert_eq!(status, 200, "{body}");
    let settings = json!({
        "kind": "email", "address": "Support@Example.com", "display_name": "Example Support",
        "smtp_host": "127.0.0.1", "smtp_port": relay.addr.port(), "smtp_security": "none",
        "smtp_username": "switchboard", "smtp_password": "relay-password",
    });
    let (status, body) = dev.api("PUT", "/api/channels/mail/adapter", Some(&admin), Some(settings)).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["address"], "support@example.com");
    assert!(!body.to_string().contains("relay-password"), "the relay password is never shown back: {body}");
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;

    // Mail for an address no channel has is refused at RCPT: the listener relays nothing.
    let refused = mail_to(&dev, "anna@example.org", "nobody@example.com", "Subject: x\n\nhello\n").await?;
    assert!(matches!(&refused, switchboard_adapters::SendOutcome::Failed { reason } if reason.contains("550")), "{refused:?}");

    // A mail with a picture and a program; the sending server delivers it three times.
    let png = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b"\x89PNG\r\n\x1a\n".as_slice(), &[7u8; 32]].concat());
    let first = format!(
        "From: Anna Petrova <anna@example.org>\nTo: support@example.com\nSubject: Card blocked\nMessage-ID: <m1@example.org>\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain; charset=utf-8\n\nMy card is blocked.\n.A line that starts with a dot.\n--b1\nContent-Type: image/png\nContent-Disposition: attachment; filename=\"card.png\"\nContent-Transfer-Encoding: base64\n\n{png}\n--b1\nContent-Type: application/x-msdownload\nContent-Disposition: attachment; filename=\"fix.exe\"\nContent-Transfer-Encoding: base64\n\nTVqQAAMAAAAEAAAA\n--b1--\n"
    );
    for _ in 0..3 {
        let taken = mail_to(&dev, "anna@example.org", "support@example.com", &first).await?;
        assert!(matches!(taken, switchboard_adapters::SendOutcome::Sent { .. }), "{taken:?}");
    }
    let conversation = accept_offer(&mut alice).await?;
    let supervisor = dev.login("supervisor").await?;
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let messages: Vec<&Value> = conv["history"].as_array().into_iter().flatten().filter(|e| e["kind"] == "message" && e["from"] == "client").collect();
    assert_eq!(messages.len(), 1, "one message for three deliveries: {conv}");
    let text = messages[0]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("My card is blocked.\n.A line that starts with a dot."), "{text}");
    assert!(text.contains("[file not kept: fix.exe (application/x-msdownload), this type is not taken]"), "{text}");
    assert_eq!(messages[0]["attachments"].as_array().map(Vec::len), Some(1), "{conv}");
    assert_eq!(messages[0]["attachments"][0]["name"], "card.png");
    assert_eq!(conv["visitor"]["id"], "mail:anna@example.org");
    assert_eq!(conv["visitor"]["name"], "Anna Petrova");
    let attributes = conv["visitor"]["attributes"].to_string();
    assert!(attributes.contains("Card blocked") && attributes.contains("m1@example.org"), "{attributes}");

    // The operator answers with a file; the relay defers once, then takes it.
    relay.script(&["451 4.3.0 Try again later"]);
    let alice_token = dev.login("alice").await?;
    let (status, file) = upload(&dev.private, &format!("/api/attachments?conversation={conversation}&name=unblock.pdf"), &alice_token, "application/pdf", b"%PDF-1.4 how to unblock".to_vec()).await?;
    assert_eq!(status, 201, "{file}");
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "r1", "text": "Hello Anna, the steps are attached.", "attachments": [file["id"]], "ref": "r1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "r1").await?;
    let sent = eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
        let d = deliveries(&dev, &supervisor, conversation).await?;
        Ok(d.first().filter(|d| d["status"] == "sent").cloned())
    })
    .await?;
    assert_eq!(sent["attempts"], 2, "{sent}");
    assert_eq!(relay.attempts(), 2);
    let mails = relay.mails();
    assert_eq!(mails.len(), 1, "taken once");
    let (from, to, raw) = &mails[0];
    assert_eq!((from.as_str(), to.as_str()), ("support@example.com", "anna@example.org"));
    let reply = switchboard_adapters::email::parse(raw)?;
    assert_eq!(reply.subject, "Re: Card blocked");
    assert_eq!(reply.references, vec!["m1@example.org", "m1@example.org"], "In-Reply-To and References name the customer's mail");
    assert_eq!(reply.text, "Hello Anna, the steps are attached.");
    assert_eq!(reply.files.len(), 1);
    assert_eq!((reply.files[0].name.as_str(), reply.files[0].bytes.as_slice()), ("unblock.pdf", b"%PDF-1.4 how to unblock".as_slice()));
    assert_eq!(sent["provider_id"], json!(reply.message_id));
    let ours = reply.message_id.clone();
    assert!(ours.starts_with(&format!("sb.{conversation}.")) && ours.ends_with("@example.com"), "{ours}");

    // Anna answers from her work address, in the thread: the same conversation, and the
    // message says which address wrote it (staff read it as the visitor's otherwise).
    let answer = format!("From: Anna <anna.work@example.org>\nSubject: Re: Card blocked\nMessage-ID: <m2@example.org>\nIn-Reply-To: <{ours}>\nReferences: <m1@example.org> <{ours}>\n\nIt worked, thank you!\n\nOn Thu, Example Support wrote:\n> Hello Anna, the steps are attached.\n");
    assert!(matches!(mail_to(&dev, "anna.work@example.org", "support@example.com", &answer).await?, switchboard_adapters::SendOutcome::Sent { .. }));
    let event = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "conversation" && v["entry"]["from"] == "client" && v["entry"]["text"] == "[from Anna <anna.work@example.org>]\nIt worked, thank you!").await?;
    assert_eq!(event["conversation"], json!(conversation), "the quoted mail is dropped and the thread finds the conversation");

    // A forged reference (a made-up tag) finds nothing: a new conversation.
    let forged = format!("From: <mallory@example.net>\nSubject: Re: Card blocked\nMessage-ID: <m3@example.net>\nIn-Reply-To: <sb.{conversation}.2.00000000000000000000@example.com>\n\nlet me in\n");
    assert!(matches!(mail_to(&dev, "mallory@example.net", "support@example.com", &forged).await?, switchboard_adapters::SendOutcome::Sent { .. }));
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    assert!(!conv.to_string().contains("let me in"), "{conv}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_keeps_forging_webhooks_is_cut_off_before_its_bodies_are_read() -> anyhow::Result<()> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let dir = tempfile::tempdir()?;
    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir.path().join("data"), &["--bad-hooks-per-minute", "5"]).await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    // A body over the webhook limit is refused in the API's error shape.
    let huge = json!({"update_id": 1, "padding": "x".repeat(70 * 1024)});
    let (status, body) = hook(&dev, Some(SECRET), &huge).await?;
    assert_eq!((status, body["code"].clone()), (413, json!("too_large")), "{body}");
    // Five wrong secrets are answered 401; then the address is refused unread, the
    // right secret included, and nothing is written.
    for n in 0..5 {
        let (status, _) = hook(&dev, Some("webhook_secret_0123456780"), &update(n, 4242, n, "forged")).await?;
        assert_eq!(status, 401);
    }
    let (status, body) = hook(&dev, Some(SECRET), &update(9, 4242, 9, "real")).await?;
    assert_eq!((status, body["code"].clone()), (429, json!("rate_limited")), "{body}");
    // The same channel spelt with a percent escape is the same budget, not a fresh one.
    let headers = [("x-telegram-bot-api-secret-token", "webhook_secret_0123456780")];
    let (status, body) = http_json_with(&dev.public, "POST", "/hooks/telegram/%74g", &headers, Some(&update(10, 4242, 10, "forged"))).await?;
    assert_eq!((status, body["code"].clone()), (429, json!("rate_limited")), "an escaped path shares the budget: {body}");
    let supervisor = dev.login("supervisor").await?;
    for id in 1..=5 {
        let (_, conversation) = dev.api("GET", &format!("/api/conversations/{id}"), Some(&supervisor), None).await?;
        assert_ne!(conversation["visitor"]["id"], "tg:4242", "{conversation}");
    }
    Ok(())
}

/// Behind a reverse proxy the node trusts (`--trusted-proxy`), each caller's budget is
/// the address the proxy names in `X-Forwarded-For`: a forger cut off there does not cut
/// off the provider, whose calls come through the same proxy; a node that does not trust
/// the proxy takes the header for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_a_forger_is_cut_off_and_the_provider_is_not() -> anyhow::Result<()> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let dir = tempfile::tempdir()?;
    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir.path().join("data"), &["--bad-hooks-per-minute", "3", "--trusted-proxy", "127.0.0.0/8"]).await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    let call = |from: &'static str, secret: &'static str, n: u64, text: &'static str| {
        let dev = &dev;
        async move {
            let headers = [("x-telegram-bot-api-secret-token", secret), ("x-forwarded-for", from)];
            http_json_with(&dev.public, "POST", "/hooks/telegram/tg", &headers, Some(&update(n, 4242, n, text))).await
        }
    };
    for n in 0..3 {
        assert_eq!(call("198.51.100.66", "webhook_secret_0123456780", n, "forged").await?.0, 401);
    }
    let (status, body) = call("198.51.100.66", SECRET, 5, "from the forger's address").await?;
    assert_eq!((status, body["code"].clone()), (429, json!("rate_limited")), "{body}");
    // A client cannot pick its own address: the proxy appends the real one on the right.
    let (status, _) = call("203.0.113.1, 198.51.100.66", "webhook_secret_0123456780", 6, "forged").await?;
    assert_eq!(status, 429);
    // The provider, through the same proxy, is not limited.
    let (status, body) = call("149.154.167.220", SECRET, 7, "real").await?;
    assert_eq!((status, body["ok"].clone()), (200, json!(true)), "{body}");

    // Without the proxy trusted, the header means nothing: everyone is the proxy.
    drop(dev);
    let dir2 = tempfile::tempdir()?;
    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir2.path().join("data"), &["--bad-hooks-per-minute", "3"]).await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    for n in 0..3 {
        let headers = [("x-telegram-bot-api-secret-token", "webhook_secret_0123456780"), ("x-forwarded-for", "198.51.100.66")];
        assert_eq!(http_json_with(&dev.public, "POST", "/hooks/telegram/tg", &headers, Some(&update(n, 4242, n, "forged"))).await?.0, 401);
    }
    let headers = [("x-telegram-bot-api-secret-token", SECRET), ("x-forwarded-for", "149.154.167.220")];
    let (status, _) = http_json_with(&dev.public, "POST", "/hooks/telegram/tg", &headers, Some(&update(7, 4242, 7, "real"))).await?;
    assert_eq!(status, 429, "an untrusted X-Forwarded-For is not taken");
    Ok(())
}

/// A raw SMTP conversation with the node: each line sent, each answer read whole.
struct Smtp {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    async fn connect(addr: &str) -> anyhow::Result<(Smtp, String)> {
        use tokio::io::AsyncBufReadExt;
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (read, write) = stream.into_split();
        let mut smtp = Smtp { lines: tokio::io::BufReader::new(read).lines(), write };
        let greeting = smtp.answer().await?;
        Ok((smtp, greeting))
    }

    /// The next answer, its lines joined; empty when the node closed the connection.
    async fn answer(&mut self) -> anyhow::Result<String> {
        let mut all = String::new();
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line()).await??;
            let Some(line) = line else { return Ok(all) };
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(all);
            }
            all.push('\n');
        }
    }

    async fn say(&mut self, bytes: &[u8]) -> anyhow::Result<String> {
        use tokio::io::AsyncWriteExt;
        self.write.write_all(bytes).await?;
        self.answer().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smtp_listener_bounds_what_an_anonymous_peer_sends() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir.path().join("data"), &["--smtp-addr", "127.0.0.1:0"]).await?;
    let smtp = dev.smtp.clone().ok_or_else(|| anyhow::anyhow!("no SMTP listener printed"))?;
    let admin = dev.login("admin").await?;
    dev.api("PUT", "/api/channels/mail", Some(&admin), Some(json!({"kind": "email", "name": "Email", "default_group": "general"}))).await?;
    let settings = json!({"kind": "email", "address": "support@example.com", "smtp_host": "127.0.0.1", "smtp_port": 9, "smtp_security": "none"});
    assert_eq!(dev.api("PUT", "/api/channels/mail/adapter", Some(&admin), Some(settings)).await?.0, 200);
    let rss_before = dev.rss_bytes()?;

    let (mut peer, greeting) = Smtp::connect(&smtp).await?;
    assert!(greeting.starts_with("220"), "{greeting}");
    // Out of order, and a line past 512 bytes: refused, the session goes on.
    assert!(peer.say(b"MAIL FROM:<a@example.org>\r\n").await?.starts_with("503"));
    assert!(peer.say(format!("EHLO {}\r\n", "x".repeat(600)).as_bytes()).await?.starts_with("500 5.5.2"));
    let features = peer.say(b"EHLO client.example.org\r\n").await?;
    assert!(features.contains("SIZE 10485760") && !features.contains("STARTTLS"), "{features}");
    // It relays nothing, and a declared size over the limit is refused before the mail.
    assert!(peer.say(b"MAIL FROM:<a@example.org> SIZE=20000000\r\n").await?.starts_with("552"));
    assert!(peer.say(b"MAIL FROM:<a@example.org>\r\n").await?.starts_with("250"));
    assert!(peer.say(b"RCPT TO:<someone@elsewhere.example>\r\n").await?.starts_with("550 5.1.1"));
    assert!(peer.say(b"RCPT TO:<support@example.com>\r\n").await?.starts_with("250"));
    // A mail past 10 MiB is read to its end and dropped; the session stays in step.
    assert!(peer.say(b"DATA\r\n").await?.starts_with("354"));
    let line = format!("{}\r\n", "y".repeat(998));
    let mut big = Vec::new();
    while big.len() < 11 * 1024 * 1024 {
        big.extend_from_slice(line.as_bytes());
    }
    big.extend_from_slice(b".\r\n");
    assert!(peer.say(&big).await?.starts_with("552 5.3.4"));
    assert!(peer.say(b"NOOP\r\n").await?.starts_with("250"));
    // A `.` line ended by a bare LF does not end a mail (a mail server in front would
    // pass it as content): what follows it is not taken as commands and a second mail
    // with another From; the mail, with its bare LFs, is refused whole at its real end.
    assert!(peer.say(b"MAIL FROM:<a@example.org>\r\n").await?.starts_with("250"));
    assert!(peer.say(b"RCPT TO:<support@example.com>\r\n").await?.starts_with("250"));
    assert!(peer.say(b"DATA\r\n").await?.starts_with("354"));
    let smuggling = b"From: a@example.org\r\nTo: support@example.com\r\n\r\nfirst\r\n\n.\r\nMAIL FROM:<v@example.org>\r\nRCPT TO:<support@example.com>\r\nDATA\r\nFrom: victim@example.org\r\n\r\nsmuggled\r\n.\r\n";
    let refused = peer.say(smuggling).await?;
    assert!(refused.starts_with("554 5.6.0 A line of the mail ended in a bare LF"), "{refused}");
    assert!(peer.say(b"NOOP\r\n").await?.starts_with("250"), "one answer for the one mail, none for commands inside it");
    // A sender that ends its mail with a bare LF too is refused at that end, and its
    // session closed: what it sends next cannot be read safely.
    {
        let (mut lf, greeting) = Smtp::connect(&smtp).await?;
        assert!(greeting.starts_with("220"), "{greeting}");
        assert!(lf.say(b"HELO client.example.org\r\n").await?.starts_with("250"));
        assert!(lf.say(b"MAIL FROM:<a@example.org>\r\n").await?.starts_with("250"));
        assert!(lf.say(b"RCPT TO:<support@example.com>\r\n").await?.starts_with("250"));
        assert!(lf.say(b"DATA\r\n").await?.starts_with("354"));
        let refused = lf.say(b"From: a@example.org\nTo: support@example.com\n\nhello\n.\nMAIL FROM:<v@example.org>\n").await?;
        assert!(refused.starts_with("554 5.6.0 The mail ended in a bare LF"), "{refused}");
        assert_eq!(lf.answer().await?, "", "and the session is closed");
    }
    // A forwarded message base64-encoded inside the mail (RFC 2046 forbids it; the
    // parser reads it all the same) whose header holds 160,000 encoded words: its
    // contents pass the counts made on the raw mail, and the parse would take minutes
    // (before the look for encoded forwarded messages, the kernel stopped the process
    // reading it after 5 s of CPU, and mails queued behind that turn). Refused at once,
    // before the parse; the session goes on.
    use base64::Engine as _;
    let inner = format!("From: b@example.org\r\nSubject: x\r\nContent-Type: a/b; x= {}\r\n\r\nbody", "=?ab?q? ".repeat(160_000));
    let encoded = base64::engine::general_purpose::STANDARD.encode(inner.as_bytes());
    let lines: Vec<&str> = encoded.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    let nested = format!("From: a@example.org\r\nTo: support@example.com\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n.\r\n", lines.join("\r\n"));
    assert!(peer.say(b"MAIL FROM:<a@example.org>\r\n").await?.starts_with("250"));
    assert!(peer.say(b"RCPT TO:<support@example.com>\r\n").await?.starts_with("250"));
    assert!(peer.say(b"DATA\r\n").await?.starts_with("354"));
    let sent = std::time::Instant::now();
    let refused = peer.say(nested.as_bytes()).await?;
    assert!(refused.starts_with("550 5.6.0 ") && refused.contains("a message forwarded inside the mail is encoded (base64)"), "{refused}");
    println!("a mail the parser would take minutes over was refused after {:?}", sent.elapsed());
    assert!(sent.elapsed() < Duration::from_secs(4), "refused before the parse, not by the reader's CPU limit: {:?}", sent.elapsed());
    assert!(peer.say(b"NOOP\r\n").await?.starts_with("250"));
    // Bad commands past ten close the connection.
    let mut last = String::new();
    for _ in 0..12 {
        last = peer.say(b"WHAT\r\n").await?;
        if last.starts_with("421") || last.is_empty() {
            break;
        }
    }
    assert!(last.starts_with("421 4.7.0"), "{last}");

    // Eight connections from one address at once; the ninth is turned away. The one
    // closed above gives its place back as its task ends, a moment after its 421: a
    // connection refused in that moment is tried again (for at most 5 s).
    drop(peer);
    let mut held = Vec::new();
    let settle = std::time::Instant::now() + Duration::from_secs(5);
    while held.len() < 8 {
        let (peer, greeting) = Smtp::connect(&smtp).await?;
        if greeting.starts_with("220") {
            held.push(peer);
            continue;
        }
        assert!(greeting.starts_with("421 4.7.0") && std::time::Instant::now() < settle, "{greeting}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, refused) = Smtp::connect(&smtp).await?;
    assert!(refused.starts_with("421 4.7.0"), "{refused}");
    // Two of them start mails and send nothing more: the third waits for one of them,
    // not for (or with) the listener's other turns, and gets its turn when one ends.
    for peer in held.iter_mut().take(3) {
        assert!(peer.say(b"EHLO client.example.org\r\n").await?.starts_with("250"));
        assert!(peer.say(b"MAIL FROM:<a@example.org>\r\n").await?.starts_with("250"));
        assert!(peer.say(b"RCPT TO:<support@example.com>\r\n").await?.starts_with("250"));
    }
    for peer in held.iter_mut().take(2) {
        assert!(peer.say(b"DATA\r\n").await?.starts_with("354"));
    }
    use tokio::io::AsyncWriteExt as _;
    held[2].write.write_all(b"DATA\r\n").await?;
    assert!(tokio::time::timeout(Duration::from_millis(800), held[2].answer()).await.is_err(), "the third waits while its address holds two turns");
    drop(held.remove(0));
    let data = tokio::time::timeout(WAIT, held[1].answer()).await??;
    assert!(data.starts_with("354"), "{data}");
    drop(held);
    // What it read is given back: the node holds no mail of it.
    let grown = dev.rss_bytes()?.saturating_sub(rss_before);
    assert!(grown < 64 * 1024 * 1024, "the node grew by {grown} bytes");
    // Nothing was written: no conversation on the channel.
    let supervisor = dev.login("supervisor").await?;
    let (_, first) = dev.api("GET", "/api/conversations/1", Some(&supervisor), None).await?;
    assert_ne!(first["channel"], "mail", "{first}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_customer_s_photo_is_neither_fetched_nor_stored() -> anyhow::Result<()> {
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let dev = Dev::start(&data).await?;
    let admin = dev.login("admin").await?;
    telegram_channel(&dev, &admin, &fake).await?;
    let supervisor = dev.login("supervisor").await?;
    let (status, body) = dev.api("PUT", "/api/access/rules", Some(&supervisor), Some(json!({"list": "block", "kind": "visitor", "value": "tg:5151", "note": "abuse"}))).await?;
    assert_eq!(status, 200, "{body}");
    let jpeg = [[0xFFu8, 0xD8, 0xFF, 0xE0].as_slice(), &[0u8; 60]].concat();
    fake.add_file("BLOCKED-PHOTO", &jpeg);
    let photo = json!({"update_id": 1, "message": {"message_id": 1, "date": 1_700_000_001, "chat": {"id": 5151, "type": "private"}, "from": {"id": 5151, "is_bot": false, "first_name": "Mallory"}, "caption": "again",
        "photo": [{"file_id": "BLOCKED-PHOTO", "file_unique_id": "b", "width": 800, "height": 600, "file_size": 64}]}});
    // Refused for good (Telegram must not deliver it again), and nothing kept for it:
    // no file in the data folder, where copies on other members would also have gone.
    let (status, body) = hook(&dev, Some(SECRET), &photo).await?;
    assert_eq!(status, 200, "{body}");
    assert!(fake.file_lookups().is_empty(), "a blocked customer's file was fetched: {:?}", fake.file_lookups());
    let files: Vec<_> = std::fs::read_dir(data.join("attachments"))?.flatten().map(|e| e.file_name()).collect();
    assert!(files.is_empty(), "a blocked customer's file was stored: {files:?}");
    // Someone not blocked sends the same: their photo is kept.
    let allowed = json!({"update_id": 2, "message": {"message_id": 2, "date": 1_700_000_002, "chat": {"id": 6161, "type": "private"}, "from": {"id": 6161, "is_bot": false, "first_name": "Dana"}, "caption": "the card",
        "photo": [{"file_id": "BLOCKED-PHOTO", "file_unique_id": "b", "width": 800, "height": 600, "file_size": 64}]}});
    assert_eq!(hook(&dev, Some(SECRET), &allowed).await?.0, 200);
    assert_eq!(fake.file_lookups(), ["BLOCKED-PHOTO"]);
    let files: Vec<_> = std::fs::read_dir(data.join("attachments"))?.flatten().map(|e| e.file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    Ok(())
}

/// A listener that takes connections and never answers; it counts those open at once
/// (the most before the sender closed any) and those the sender closed.
struct Unanswering {
    addr: String,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Unanswering {
    async fn start() -> anyhow::Result<Unanswering> {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (open, most, closed) = (std::sync::Arc::default(), std::sync::Arc::default(), std::sync::Arc::default());
        let counters = (std::sync::Arc::clone(&open), std::sync::Arc::clone(&most), std::sync::Arc::clone(&closed));
        let task = tokio::spawn(async move {
            let (open, most, closed): (std::sync::Arc<std::sync::atomic::AtomicUsize>, std::sync::Arc<std::sync::atomic::AtomicUsize>, std::sync::Arc<std::sync::atomic::AtomicUsize>) = counters;
            while let Ok((mut socket, _)) = listener.accept().await {
                let now = open.fetch_add(1, SeqCst) + 1;
                if closed.load(SeqCst) == 0 {
                    most.fetch_max(now, SeqCst);
                }
                let (open, closed) = (open.clone(), closed.clone());
                tokio::spawn(async move {
                    // Reads the request and whatever follows until the sender hangs up.
                    let mut sink = [0u8; 4096];
                    while matches!(tokio::io::AsyncReadExt::read(&mut socket, &mut sink).await, Ok(n) if n > 0) {}
                    open.fetch_sub(1, SeqCst);
                    closed.fetch_add(1, SeqCst);
                });
            }
        });
        Ok(Unanswering { addr, open, most, closed, task })
    }
}

/// A channel whose bot never answers holds at most 128 of an outbox's sends
/// (docs/channel-api.md), however many of its events wait, and another channel's
/// messages go out meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_provider_holds_a_bounded_share_of_the_sends() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let hung = Unanswering::start().await?;
    let adapter = FakeAdapter::start().await?;
    let fake = FakeTelegram::start(BOT_TOKEN).await?;
    let (_dir, dev) = dev().await?;
    let admin = dev.login("admin").await?;
    let (status, body) = dev.api("PUT", "/api/channels/api-gw", Some(&admin), Some(json!({"kind": "viber", "name": "Gateway", "default_group": "general"}))).await?;
    assert_eq!(status, 200, "{body}");
    let (status, settings) = dev.api("PUT", "/api/channels/api-gw/adapter", Some(&admin), Some(json!({"kind": "api", "outbound_url": adapter.url()}))).await?;
    assert_eq!(status, 200, "{settings}");
    let token = settings["token"].as_str().unwrap_or_default().to_owned();
    let (status, bot) = dev.api("PUT", "/api/channels/api-gw/bot", Some(&admin), Some(json!({"url": format!("http://{}/events", hung.addr)}))).await?;
    assert_eq!(status, 200, "{bot}");
    telegram_channel(&dev, &admin, &fake).await?;

    // 160 customers write on the channel whose bot hangs, 16 at a time: each message is
    // an event for it (and no send of it gives up before 10 s).
    let customers: Vec<u32> = (0..160).collect();
    for batch in customers.chunks(16) {
        let posts = batch.iter().map(|n| {
            let message = json!({"sender": format!("+1555{n:04}"), "message_id": format!("m-{n}"), "text": "hello?"});
            dev.api("POST", "/api/channel-api/api-gw/messages", Some(&token), Some(message))
        });
        for answer in futures::future::join_all(posts).await {
            let (status, body) = answer?;
            assert_eq!(status, 200, "{body}");
        }
    }
    eventually(Duration::from_secs(8), Duration::from_millis(50), || async { Ok((hung.most.load(SeqCst) >= 128).then_some(())) })
        .await
        .map_err(|e| anyhow::anyhow!("the bot's sends reached the cap: {} at most: {e}", hung.most.load(SeqCst)))?;

    // Meanwhile a Telegram customer is answered (another channel's sends go on).
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    hook(&dev, Some(SECRET), &update(1, 77, 1, "are you open?")).await?;
    let conversation = accept_offer(&mut alice).await?;
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "t1", "text": "We are.", "ref": "t1"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "ack" && v["ref"] == "t1").await?;
    eventually(WAIT, Duration::from_millis(50), || async { Ok(fake.sent().iter().any(|(_, text)| text == "We are.").then_some(())) }).await?;
    println!("the Telegram reply went out with {} of the bot's sends hanging, {} given up", hung.open.load(SeqCst), hung.closed.load(SeqCst));
    let most = hung.most.load(SeqCst);
    hung.task.abort();
    // 129 at most: a send that gave up (after 10 s, on a slow machine) may hand its
    // slot on before its connection's end is counted here.
    assert!((128..=129).contains(&most), "the hanging bot held its channel's share of sends at once, no more: {most}");
    Ok(())
}

/// A supervisor takes conversations from a bot that does not answer, on a node of one
/// group and on a split node (where the routing shard, which decides a reassignment,
/// never heard of a bot's conversation: before, `404`): one to an operator, who holds
/// it, one into a group, where it waits; both are handed off first, as the bot would,
/// with the reason saying who took them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_takes_conversations_from_a_silent_bot_on_either_layout() -> anyhow::Result<()> {
    for layout in switchboard_chaos_tests::LAYOUTS {
        let dir = tempfile::tempdir()?;
        let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir.path().join("data"), layout).await?;
        let admin = dev.login("admin").await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let (status, bot) = dev.api("PUT", "/api/channels/web/bot", Some(&admin), Some(json!({"url": format!("http://127.0.0.1:{port}/events")}))).await?;
        assert_eq!(status, 200, "{layout:?}: {bot}");
        let token = dev.login("alice").await?;
        let mut alice = WsClient::connect(&dev.private, &format!("/ws/operator?token={token}&protocol=2"), None).await?;
        alice.wait_for(WAIT, |v| v["type"] == "hello").await?;
        set_presence(&mut alice, "online").await?;
        let supervisor = dev.login("supervisor").await?;
        let state = |conversation: u64| {
            let (dev, supervisor) = (&dev, &supervisor);
            async move {
                let (status, view) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(supervisor), None).await?;
                anyhow::ensure!(status == 200, "{view}");
                anyhow::Ok(view)
            }
        };

        // To Alice: she holds it, and its history says who took it from the bot.
        let (_c1, first, _) = dev.client("Gus").await?;
        assert_eq!(state(first).await?["status"]["state"], "with_bot", "{layout:?}");
        let (status, body) = dev.api("POST", &format!("/api/conversations/{first}/reassign"), Some(&supervisor), Some(json!({"operator": "alice", "comment": "the bot is down"}))).await?;
        assert_eq!(status, 200, "{layout:?}: {body}");
        let view = eventually(WAIT, Duration::from_millis(50), || async { Ok(Some(state(first).await?).filter(|v| v["status"]["state"] == "assigned")) }).await?;
        assert_eq!(view["status"]["operator"], "alice", "{layout:?}: {view}");
        let handoff = view["history"].as_array().and_then(|h| h.iter().find(|e| e["kind"] == "handoff").cloned()).unwrap_or_default();
        assert_eq!(handoff["reason"], "a supervisor took it from the bot", "{layout:?}: {view}");

        // Into its own group (general) and into another (billing): each waits there (or
        // is offered to Alice, who has room), no longer the bot's, with the comment.
        for (name, group) in [("Hal", "general"), ("Ivy", "billing")] {
            let (_c, conversation, _) = dev.client(name).await?;
            let (status, body) = dev.api("POST", &format!("/api/conversations/{conversation}/reassign"), Some(&supervisor), Some(json!({"group": group, "comment": "the bot is silent"}))).await?;
            assert_eq!(status, 200, "{layout:?} {group}: {body}");
            let view = eventually(WAIT, Duration::from_millis(50), || async { Ok(Some(state(conversation).await?).filter(|v| v["status"]["state"] == "queued" || v["status"]["state"] == "offered")) }).await?;
            assert_eq!(view["group"], group, "{layout:?}: {view}");
            let history = view["history"].as_array().cloned().unwrap_or_default();
            assert!(history.iter().any(|e| e["kind"] == "handoff" && e["reason"] == "a supervisor took it from the bot"), "{layout:?}: {view}");
            assert!(history.iter().any(|e| e["comment"] == "the bot is silent" || e["context"]["comment"] == "the bot is silent"), "{layout:?}: {view}");
            // Asked again, it is already waiting there (routing rules 18).
            let (status, body) = dev.api("POST", &format!("/api/conversations/{conversation}/reassign"), Some(&supervisor), Some(json!({"group": group}))).await?;
            assert_eq!((status, body["code"].clone()), (409, json!("invalid")), "{layout:?} {group}: {body}");
        }
        drop(_c1);
    }
    Ok(())
}

/// A machine's mail that answers no open conversation (an out-of-office, a bounce with
/// its null sender, a list's mail) starts none: a conversation's automatic answers
/// would go back to it and its next answer start another, all night. It is taken (the
/// sending server is not asked to retry) and counted; a person's mail still starts one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_mail_starts_no_conversation_so_automatic_answers_cannot_loop() -> anyhow::Result<()> {
    let relay = FakeRelay::start(None).await?;
    let dir = tempfile::tempdir()?;
    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir.path().join("data"), &["--smtp-addr", "127.0.0.1:0"]).await?;
    let admin = dev.login("admin").await?;
    let (status, body) = dev.api("PUT", "/api/channels/mail", Some(&admin), Some(json!({"kind": "email", "name": "Email", "default_group": "general"}))).await?;
    assert_eq!(status, 200, "{body}");
    let settings = json!({"kind": "email", "address": "support@example.com", "smtp_host": "127.0.0.1", "smtp_port": relay.addr.port(), "smtp_security": "none"});
    let (status, body) = dev.api("PUT", "/api/channels/mail/adapter", Some(&admin), Some(settings)).await?;
    assert_eq!(status, 200, "{body}");
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let dropped = || async {
        let (_, metrics) = dev.api("GET", "/metrics", None, None).await?;
        let text = metrics.as_str().unwrap_or_default().to_owned();
        anyhow::Ok(text.lines().find_map(|l| l.strip_prefix("switchboard_mail_automatic_dropped_total ")).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0))
    };
    let out_of_office = "From: Boris <boris@example.org>\nTo: support@example.com\nSubject: Automatic reply: Your request\nMessage-ID: <ooo1@example.org>\nAuto-Submitted: auto-replied\n\nI am away until Monday.\n";
    let taken = mail_to(&dev, "boris@example.org", "support@example.com", out_of_office).await?;
    assert!(matches!(taken, switchboard_adapters::SendOutcome::Sent { .. }), "{taken:?}");
    let bounce = "From: Mail Delivery System <mailer-daemon@example.org>\nTo: support@example.com\nSubject: Undelivered Mail Returned to Sender\nMessage-ID: <b1@example.org>\n\nThis is the mail system: the address does not exist.\n";
    let taken = mail_to(&dev, "", "support@example.com", bounce).await?;
    assert!(matches!(taken, switchboard_adapters::SendOutcome::Sent { .. }), "{taken:?}");
    assert_eq!(dropped().await?, 2, "both are counted as dropped");
    assert!(alice.wait_for(Duration::from_millis(800), |v| v["kind"] == "offer").await.is_err(), "neither started a conversation");
    // A person's mail from the same address does.
    let person = "From: Boris <boris@example.org>\nTo: support@example.com\nSubject: Back now\nMessage-ID: <p1@example.org>\n\nI am back, can you help?\n";
    let taken = mail_to(&dev, "boris@example.org", "support@example.com", person).await?;
    assert!(matches!(taken, switchboard_adapters::SendOutcome::Sent { .. }), "{taken:?}");
    alice.wait_for(WAIT, |v| v["kind"] == "offer").await?;
    assert_eq!(dropped().await?, 2);
    Ok(())
}
