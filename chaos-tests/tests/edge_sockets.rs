//! The WebSocket edge under abuse (docs/security.md, "WebSockets"): fragmented and
//! malformed frames, pings, clients that never read, per-address budgets and the
//! groups a visitor may pick. Each test checks the bound, then that the node still
//! serves everyone else and kept what it acknowledged.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use switchboard_chaos_tests::{
    binary, client_upload, eventually, opcode, serves_a_new_client, serves_an_operator, Dev, Ending, RawEvent, RawFrame, RawWs, MIB, WAIT,
};
use switchboard_gateway::client::{ClientError, Incoming, WsClient};

async fn dev_with(dir: &tempfile::TempDir, flags: &[&str]) -> anyhow::Result<Dev> {
    Dev::start_with(binary()?, &dir.path().join("data"), flags).await
}

/// Sends one text message in 4 KiB fragments (fin=0 throughout) until the server
/// closes or 1 MiB went out, looking for the server's answer for 20 ms after each
/// fragment. Returns how it ended (`None`: never) and the bytes sent before that.
async fn fragment_until_closed(ws: &mut RawWs) -> anyhow::Result<(Option<Ending>, u64)> {
    let piece = vec![b'x'; 4096];
    let mut sent = 0u64;
    while sent < MIB {
        let frame = if sent == 0 { RawFrame::new(opcode::TEXT, piece.clone()) } else { RawFrame::continuation(piece.clone()) };
        if ws.send(&frame.fin(false)).await.is_err() {
            // The server stopped taking bytes: its close is already on the way.
            return Ok((Some(ws.wait_close(WAIT).await?), sent));
        }
        sent += piece.len() as u64;
        match ws.read_frame(Duration::from_millis(20)).await? {
            RawEvent::Frame(frame) if frame.opcode == opcode::CLOSE => return Ok((Some(Ending::CloseFrame(frame.close_code())), sent)),
            RawEvent::Closed => return Ok((Some(Ending::Dropped), sent)),
            RawEvent::Frame(_) | RawEvent::TimedOut => {}
        }
    }
    Ok((None, sent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_count_against_the_message_size_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let alice = dev.login("alice").await?;
    let before = dev.rss_bytes()?;

    // Client socket: 16 KiB for a whole message, however it is cut.
    let mut client = RawWs::connect(&dev.public, "/ws/client").await?;
    let (ending, sent) = fragment_until_closed(&mut client).await?;
    assert_eq!(ending, Some(Ending::CloseFrame(Some(1009))), "client socket, after {sent} bytes in fragments");
    assert!(sent < MIB, "the client socket took {sent} bytes of one message before closing");

    // Operator socket: 64 KiB.
    let mut operator = RawWs::connect(&dev.private, &format!("/ws/operator?token={alice}")).await?;
    let (ending, sent) = fragment_until_closed(&mut operator).await?;
    assert_eq!(ending, Some(Ending::CloseFrame(Some(1009))), "operator socket, after {sent} bytes in fragments");
    assert!(sent < MIB, "the operator socket took {sent} bytes of one message before closing");

    let grown = dev.rss_bytes()?.saturating_sub(before);
    assert!(grown < 20 * MIB, "RSS grew by {} MiB", grown / MIB);
    serves_a_new_client(&dev).await?;
    serves_an_operator(&dev, "alice").await?;
    Ok(())
}

/// Messages of 2000 quotes (2000 bytes of customer text, 896,000 in all: within the 1
/// MiB a conversation may hold, and 4 KB of JSON each, since every one is written `\"`;
/// control characters, six bytes each, are made U+FFFD before they are stored) make a
/// conversation whose history is about 1.8 MB. Replayed four times, half a second
/// apart, to one socket that does not read (7.2 MB), it is more than loopback TCP
/// buffers hold for it (about 4 MB here: the server's send buffer grows to `tcp_wmem`
/// max), and the server's writes stall.
const HISTORY_MESSAGES: usize = 448;
const PER_SOCKET: usize = 28;
const LOADERS: usize = 4;

/// Fills a conversation through many client sockets resuming it (each socket's rate
/// bucket holds 30 frames: one resume and 28 sends). Returns the acknowledged keys.
async fn build_history(dev: &Dev, token: &str) -> anyhow::Result<BTreeSet<String>> {
    let newest = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for loader in 0..LOADERS {
        let (public, token, newest) = (dev.public.clone(), token.to_owned(), newest.clone());
        tasks.spawn(async move {
            let mut acked = BTreeSet::new();
            let text = "\"".repeat(2000);
            for round in 0..HISTORY_MESSAGES / (LOADERS * PER_SOCKET) {
                let mut ws = WsClient::connect(&public, "/ws/client", None).await?;
                ws.send(&json!({"type": "resume", "token": token, "last_seq": newest.load(Ordering::SeqCst)})).await?;
                let resumed = ws.wait_for(WAIT, |v| v["type"] == "resumed" || v["type"] == "error").await?;
                anyhow::ensure!(resumed["type"] == "resumed", "{resumed}");
                for n in 0..PER_SOCKET {
                    ws.send(&json!({"type": "send", "key": format!("h{loader}-{round}-{n}"), "text": text})).await?;
                }
                for _ in 0..PER_SOCKET {
                    let reply = ws.wait_for(WAIT, |v| v["type"] == "ack" || v["type"] == "error").await?;
                    anyhow::ensure!(reply["type"] == "ack", "building the history: {reply}");
                    newest.fetch_max(reply["seq"].as_u64().unwrap_or(0), Ordering::SeqCst);
                    acked.insert(reply["key"].as_str().unwrap_or_default().to_owned());
                }
                ws.close().await;
            }
            Ok::<_, anyhow::Error>(acked)
        });
    }
    let mut all = BTreeSet::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_or_never_answer_pings_are_disconnected() -> anyhow::Result<()> {
    // --- Clients that never read what they asked for.
    let dir = tempfile::tempdir()?;
    let dev = dev_with(
        &dir,
        &[
            "--write-timeout-ms", "2000",
            "--client-messages-per-minute", "100000",
            "--conversation-messages-per-minute", "100000",
            "--client-sockets-per-address", "200",
            // 40 whole replays of a long history from one address: past the default
            // budget of replays, which is not what this test is about.
            "--client-resumes-per-minute", "100000",
            "--snapshot-every", "100000",
        ],
    )
    .await?;
    let (first, conversation, token) = dev.client("Long story").await?;
    first.close().await;
    let acked = build_history(&dev, &token).await?;
    assert_eq!(acked.len(), HISTORY_MESSAGES);

    let baseline = dev.rss_bytes()?;
    let started = Instant::now();
    let mut readers = Vec::new();
    for _ in 0..40 {
        // A small receive buffer: what the server sends stays in the server.
        let mut ws = RawWs::connect_with(&dev.public, "/ws/client", Some(4096)).await?;
        ws.send(&RawFrame::json(&json!({"type": "resume", "token": token, "last_seq": 0}))).await?;
        readers.push(ws);
    }
    // Each replay is written whole before the next is asked for, so they add up.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for ws in &mut readers {
            ws.send(&RawFrame::json(&json!({"type": "resume", "token": token, "last_seq": 0}))).await?;
        }
    }
    // Never read. A connection the server has closed answers a write with a reset, so
    // the next write fails: poll with a small ping every 250 ms.
    let poll = async {
        let mut closed_at: Vec<Option<Duration>> = vec![None; readers.len()];
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while started.elapsed() < Duration::from_secs(15) && closed_at.iter().any(Option::is_none) {
            tick.tick().await;
            for (ws, closed) in readers.iter_mut().zip(closed_at.iter_mut()).filter(|(_, c)| c.is_none()) {
                let probe = tokio::time::timeout(Duration::from_millis(200), ws.send(&RawFrame::ping(b"?".to_vec()))).await;
                if matches!(probe, Ok(Err(_))) {
                    *closed = Some(started.elapsed());
                }
            }
        }
        closed_at
    };
    let (closed_at, peak) = dev.peak_rss_during(poll).await?;
    let grown = peak.saturating_sub(baseline);
    assert!(grown < 60 * MIB, "40 sockets resuming a 1.8 MB history four times and reading nothing grew RSS by {} MiB", grown / MIB);
    let open = closed_at.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "{open} of 40 non-reading sockets still open after 15 s: {closed_at:?}");
    drop(readers);

    // Nothing acknowledged was lost, and visitors are served.
    let supervisor = dev.login("supervisor").await?;
    let (status, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    assert_eq!(status, 200);
    let keys: BTreeSet<String> = conv["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["key"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    assert_eq!(keys, acked, "the history holds exactly the acknowledged messages");
    serves_a_new_client(&dev).await?;
    drop(dev);

    // --- A peer that never answers pings.
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--ping-interval-ms", "500"]).await?;
    let mut polite = WsClient::connect(&dev.public, "/ws/client", None).await?; // answers pings (fastwebsockets auto-pong)
    let mut silent = RawWs::connect(&dev.public, "/ws/client").await?;
    let started = Instant::now();
    let ending = silent.wait_close(Duration::from_secs(5)).await.context("a peer that never answers pings")?;
    assert!(
        matches!(ending, Ending::CloseFrame(Some(1001)) | Ending::Dropped),
        "a silent peer must be closed with 1001 (or dropped), got {ending:?} after {:?}",
        started.elapsed()
    );
    assert!(silent.reader.skipped.get(&opcode::PING).copied().unwrap_or(0) >= 1, "the server pinged the silent peer");
    // The client that answers stays open over the same time and beyond.
    match polite.next(Duration::from_millis(1500)).await {
        Ok(Incoming::Closed { code, reason }) => panic!("a client that answers pings was closed: {code} {reason}"),
        Ok(_) | Err(ClientError::Timeout) => {}
        Err(e) => panic!("a client that answers pings lost its socket: {e}"),
    }
    polite.send(&json!({"type": "ping"})).await?;
    polite.wait_for(WAIT, |v| v["type"] == "pong").await?;
    polite.send(&json!({"type": "start", "name": "Polite"})).await?;
    polite.wait_for(WAIT, |v| v["type"] == "started").await?;
    serves_a_new_client(&dev).await?;
    Ok(())
}

/// Waits for the replies (ack or error) to `keys` on one client socket.
async fn replies(ws: &mut WsClient, keys: &[String]) -> anyhow::Result<HashMap<String, Value>> {
    let mut got = HashMap::new();
    while got.len() < keys.len() {
        let reply = ws.wait_for(WAIT, |v| v["type"] == "ack" || v["type"] == "error").await?;
        let key = if reply["type"] == "ack" { reply["key"].clone() } else { reply["ref"].clone() };
        let key = key.as_str().map(str::to_owned).with_context(|| format!("a reply without its key: {reply}"))?;
        anyhow::ensure!(keys.contains(&key), "a reply for an unknown key: {reply}");
        anyhow::ensure!(got.insert(key, reply.clone()).is_none(), "two replies for one key: {reply}");
    }
    Ok(got)
}

/// A conversation's token on many sockets (from as many addresses) does not multiply
/// what the conversation takes: it has a message budget of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conversation_has_a_message_budget_across_its_sockets() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--client-messages-per-minute", "1000", "--conversation-messages-per-minute", "6"]).await?;
    let (mut first, conversation, token) = dev.client("Ann").await?;
    let mut second = WsClient::connect(&dev.public, "/ws/client", None).await?;
    second.send(&json!({"type": "resume", "token": token, "last_seq": 0})).await?;
    second.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    let keys: Vec<Vec<String>> = (0..2).map(|s| (0..5).map(|n| format!("c{s}-{n}")).collect()).collect();
    let mut accepted = BTreeSet::new();
    for (ws, keys) in [&mut first, &mut second].into_iter().zip(&keys) {
        for key in keys {
            ws.send(&json!({"type": "send", "key": key, "text": "hello"})).await?;
        }
        for (key, reply) in replies(ws, keys).await? {
            if reply["type"] == "ack" {
                accepted.insert(key);
            } else {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                assert_eq!(reply["ref"], key.as_str(), "{reply}");
            }
        }
    }
    assert_eq!(accepted.len(), 6, "the conversation took {accepted:?}; its budget is 6 a minute and starts full");
    let supervisor = dev.login("supervisor").await?;
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let written: BTreeSet<String> =
        conv["history"].as_array().map(|h| h.iter().filter_map(|e| e["key"].as_str().map(str::to_owned)).collect()).unwrap_or_default();
    assert_eq!(written, accepted, "exactly the acknowledged messages were written");
    // Another conversation from the same address is not affected.
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_has_budgets_for_messages_sockets_and_upload_bytes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(
        &dir,
        &["--client-messages-per-minute", "20", "--client-sockets-per-address", "5", "--upload-bytes-per-hour", "1048576"],
    )
    .await?;

    // Messages: 20 a minute for the address, across its three sockets.
    let mut sockets = Vec::new();
    for name in ["Ann", "Ben", "Cy"] {
        sockets.push(dev.client(name).await?);
    }
    let keys: Vec<Vec<String>> = (0..3).map(|s| (0..10).map(|n| format!("s{s}-{n}")).collect()).collect();
    for ((ws, _, _), keys) in sockets.iter().zip(&keys) {
        for key in keys {
            ws.send(&json!({"type": "send", "key": key, "text": "hello"})).await?;
        }
    }
    let mut acked: Vec<BTreeSet<String>> = Vec::new();
    for ((ws, _, _), keys) in sockets.iter_mut().zip(&keys) {
        let mut mine = BTreeSet::new();
        for (key, reply) in replies(ws, keys).await? {
            if reply["type"] == "ack" {
                mine.insert(key);
            } else {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                assert_eq!(reply["ref"], key.as_str(), "{reply}");
            }
        }
        acked.push(mine);
    }
    let total: usize = acked.iter().map(BTreeSet::len).sum();
    assert!(total <= 20, "{total} of 30 messages from one address were accepted; the budget is 20 a minute");
    assert!(total >= 10, "only {total} messages accepted: the budget starts full");

    // Sockets: five per address, the sixth refused before the upgrade.
    let mut more = Vec::new();
    for _ in 0..2 {
        more.push(WsClient::connect(&dev.public, "/ws/client", None).await?);
    }
    match WsClient::connect(&dev.public, "/ws/client", None).await {
        Err(ClientError::Handshake(message)) => assert!(message.contains("429"), "{message}"),
        Err(other) => panic!("sixth socket: unexpected error {other}"),
        Ok(_) => panic!("a sixth client socket from one address was opened"),
    }
    // A socket closed frees its place.
    let spare = more.pop().context("a spare socket")?;
    spare.close().await;
    drop(spare);
    let again = eventually(Duration::from_secs(5), Duration::from_millis(100), || async {
        Ok(WsClient::connect(&dev.public, "/ws/client", None).await.ok())
    })
    .await?;
    drop(again);

    // Upload bytes: 1 MiB an hour.
    let token = &sockets[0].2;
    let file = vec![b'a'; 400 * 1024];
    for n in 0..2 {
        let (status, body) = client_upload(&dev, token, &format!("part{n}.txt"), "text/plain", &file).await?;
        assert_eq!(status, 201, "upload {n}: {body}");
    }
    let (status, body) = client_upload(&dev, token, "part2.txt", "text/plain", &file).await?;
    assert_eq!(status, 429, "the third 400 KiB upload passes 1 MiB an hour: {body}");
    assert_eq!(body["code"], "rate_limited", "{body}");

    // The refused messages were never written; the accepted ones all were.
    let supervisor = dev.login("supervisor").await?;
    for ((_, conversation, _), mine) in sockets.iter().zip(&acked) {
        let (status, conv) = dev.api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
        assert_eq!(status, 200, "{conv}");
        let keys: BTreeSet<String> = conv["history"]
            .as_array()
            .map(|h| h.iter().filter_map(|e| e["key"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        assert_eq!(&keys, mine);
    }
    // Staff are not bound by the visitors' budgets.
    serves_an_operator(&dev, "alice").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_the_socket_with_1002() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let (mut good, _, _) = dev.client("Good").await?;
    good.send(&json!({"type": "send", "key": "before", "text": "before the abuse"})).await?;
    good.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "before").await?;

    let ping = r#"{"type":"ping"}"#;
    let cases: Vec<(&str, Vec<RawFrame>)> = vec![
        ("a continuation frame with no message started", vec![RawFrame::continuation(b"{}".to_vec())]),
        ("a fragmented ping", vec![RawFrame::ping(b"p".to_vec()).fin(false)]),
        ("a ping with 126 bytes of payload", vec![RawFrame::ping(vec![b'p'; 126])]),
        ("reserved opcode 0x3", vec![RawFrame::new(0x3, b"x".to_vec())]),
        ("RSV1 set on a text frame", vec![RawFrame::text(ping).rsv(0b100)]),
        ("an unmasked text frame", vec![RawFrame::text(ping).unmasked()]),
        ("a new text frame inside a fragmented message", vec![RawFrame::text("{").fin(false), RawFrame::text(ping)]),
        ("a close frame with a 1-byte payload", vec![RawFrame::new(opcode::CLOSE, vec![3u8])]),
    ];
    for (what, frames) in cases {
        let mut ws = RawWs::connect(&dev.public, "/ws/client").await?;
        for frame in &frames {
            ws.send(frame).await.with_context(|| format!("{what}: write"))?;
        }
        let ending = ws.wait_close(WAIT).await.with_context(|| what.to_owned())?;
        assert_eq!(ending, Ending::CloseFrame(Some(1002)), "{what}");
    }

    // The well-behaved client never noticed.
    good.send(&json!({"type": "send", "key": "after", "text": "after the abuse"})).await?;
    good.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "after").await?;
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_count_against_the_rate_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let ws = RawWs::connect(&dev.public, "/ws/client").await?;
    let (mut reader, mut writer) = ws.split();
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let batch: Vec<u8> = (0..50).flat_map(|_| RawFrame::ping(b"hi".to_vec()).encode()).collect();
            let started = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(5) {
                match tokio::time::timeout(Duration::from_secs(1), writer.send_bytes(&batch)).await {
                    Ok(Ok(())) => sent += 50,
                    Ok(Err(_)) | Err(_) => break,
                }
                tokio::task::yield_now().await;
            }
            sent
        })
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(7);
    let mut pongs = 0u64;
    let ending = loop {
        match reader.read_frame(deadline.saturating_duration_since(Instant::now())).await? {
            RawEvent::Frame(frame) if frame.opcode == opcode::PONG => pongs += 1,
            RawEvent::Frame(frame) if frame.opcode == opcode::CLOSE => break Some(Ending::CloseFrame(frame.close_code())),
            RawEvent::Frame(_) => {}
            RawEvent::Closed => break Some(Ending::Dropped),
            RawEvent::TimedOut => break None,
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let sent = flooding.await?;
    assert_eq!(ending, Some(Ending::CloseFrame(Some(4008))), "after {sent} pings and {pongs} pongs in {elapsed:.1} s");
    let allowed = 30.0 + 10.0 * elapsed + 10.0;
    assert!((pongs as f64) <= allowed, "{pongs} pongs in {elapsed:.1} s (bucket of 30, 10 a second)");
    serves_a_new_client(&dev).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_close_handshake_closes_the_connection_at_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;

    // The client starts the handshake.
    let mut ws = RawWs::connect(&dev.public, "/ws/client").await?;
    ws.send(&RawFrame::close(1000, "bye")).await?;
    assert_eq!(ws.wait_close(WAIT).await?, Ending::CloseFrame(Some(1000)), "the close is echoed");
    let echoed = Instant::now();
    assert!(ws.closed_within(Duration::from_secs(1)).await, "TCP still open {:?} after the close handshake", echoed.elapsed());

    // The server starts it (a forged resume token gets 4001); the client answers.
    let mut ws = RawWs::connect(&dev.public, "/ws/client").await?;
    ws.send(&RawFrame::json(&json!({"type": "resume", "token": "v1.forged.token", "last_seq": 0}))).await?;
    assert_eq!(ws.wait_close(WAIT).await?, Ending::CloseFrame(Some(4001)));
    ws.send(&RawFrame::close(4001, "")).await?;
    let answered = Instant::now();
    assert!(ws.closed_within(Duration::from_secs(1)).await, "TCP still open {:?} after the close handshake", answered.elapsed());

    serves_a_new_client(&dev).await?;
    Ok(())
}

/// Starts on a fresh client socket; returns the `started` or `error` frame.
async fn try_start(dev: &Dev, start: Value) -> anyhow::Result<Value> {
    let mut ws = WsClient::connect(&dev.public, "/ws/client", None).await?;
    ws.send(&start).await?;
    Ok(ws.wait_for(WAIT, |v| v["type"] == "started" || v["type"] == "error").await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_can_only_start_in_the_web_channels_public_groups() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(&dir.path().join("data")).await?;
    let admin = dev.login("admin").await?;

    // The demo's web channel routes to `general`; `billing` is not public.
    let reply = try_start(&dev, json!({"type": "start", "name": "Vip", "group": "billing"})).await?;
    assert_eq!(reply["type"], "error", "a visitor picked the billing queue: {reply}");
    assert_eq!(reply["code"], "not_allowed", "{reply}");

    // Another channel that exists is not the visitor's to pick either.
    let phone = json!({"kind": "phone", "name": "Phone", "default_group": "tech"});
    let (status, body) = dev.api("PUT", "/api/channels/phone", Some(&admin), Some(phone)).await?;
    assert_eq!(status, 200, "{body}");
    let reply = try_start(&dev, json!({"type": "start", "name": "Caller", "channel": "phone"})).await?;
    assert_eq!(reply["type"], "error", "a visitor started on the phone channel: {reply}");
    assert_eq!(reply["code"], "not_allowed", "{reply}");
    let reply = try_start(&dev, json!({"type": "start", "name": "Nobody", "channel": "no-such-channel"})).await?;
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(reply["code"] == "not_found" || reply["code"] == "not_allowed", "{reply}");

    // The default still works, and an admin can make billing public.
    let reply = try_start(&dev, json!({"type": "start", "name": "Plain"})).await?;
    assert_eq!(reply["type"], "started", "{reply}");
    let web = json!({"kind": "web", "name": "Web chat", "default_group": "general", "public_groups": ["billing"]});
    let (status, body) = dev.api("PUT", "/api/channels/web", Some(&admin), Some(web)).await?;
    assert_eq!(status, 200, "{body}");
    let reply = try_start(&dev, json!({"type": "start", "name": "Vip", "group": "billing"})).await?;
    assert_eq!(reply["type"], "started", "billing is public now: {reply}");
    let supervisor = dev.login("supervisor").await?;
    let (_, conv) = dev.api("GET", &format!("/api/conversations/{}", reply["conversation"]), Some(&supervisor), None).await?;
    assert_eq!(conv["group"], "billing", "{conv}");

    serves_a_new_client(&dev).await?;
    Ok(())
}

/// A visitor's `read` that moves nothing is free, and one marking past the newest entry
/// is charged as a `send` is: sent over and over it would append an entry each time on
/// a node that forwards it (`docs/protocol.md`, "`read` ... is charged").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_marks_past_the_newest_entry_are_charged_and_others_are_free() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--client-messages-per-minute", "1000", "--conversation-messages-per-minute", "4"]).await?;
    let (mut ws, _, _) = dev.client("Reader").await?;
    ws.send(&json!({"type": "send", "key": "k1", "text": "hello"})).await?;
    let ack = ws.wait_for(WAIT, |v| v["type"] == "ack" || v["type"] == "error").await?;
    let seq = ack["seq"].as_u64().ok_or_else(|| anyhow::anyhow!("not acked: {ack}"))?;
    // Marks at or below the recorded one, many more than the budget: none refused.
    ws.send(&json!({"type": "read", "upto": seq})).await?;
    for _ in 0..10 {
        ws.send(&json!({"type": "read", "upto": 0})).await?;
        ws.send(&json!({"type": "read", "upto": seq})).await?;
    }
    // Past the newest entry: three left of the budget of 4, then refused.
    for _ in 0..4 {
        ws.send(&json!({"type": "read", "upto": 1_000_000_000u64})).await?;
    }
    let refused = ws.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!((refused["code"].clone(), refused["for"].clone()), (json!("rate_limited"), json!("read")), "{refused}");
    // Exactly one refusal: the 21 free marks spent nothing.
    ws.send(&json!({"type": "ping"})).await?;
    let next = ws.wait_for(WAIT, |v| v["type"] == "error" || v["type"] == "pong").await?;
    assert_eq!(next["type"], "pong", "a second refusal: {next}");
    Ok(())
}

/// A `resume` naming a `last_seq` ahead of the conversation makes the node catch up with
/// the cluster before it answers `invalid`: that catch-up costs a token of the
/// address's resume budget first, so sent over and over it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_from_ahead_of_the_conversation_spend_the_resume_budget() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--client-resumes-per-minute", "2"]).await?;
    let (_, _, token) = dev.client("Ahead").await?;
    let mut other = switchboard_gateway::client::WsClient::connect(&dev.public, "/ws/client", None).await?;
    let mut codes = Vec::new();
    for _ in 0..3 {
        other.send(&json!({"type": "resume", "token": token, "last_seq": 1_000_000_000u64})).await?;
        let answer = other.wait_for(WAIT, |v| v["type"] == "error" || v["type"] == "resumed").await?;
        codes.push(answer["code"].clone());
    }
    assert_eq!(codes, [json!("invalid"), json!("invalid"), json!("rate_limited")]);
    Ok(())
}

/// A `read` on a conversation that is closed is charged as a `send` is: the core reads
/// the conversation back from disk to decide it, in a log entry each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_marks_on_a_closed_conversation_are_charged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dev_with(&dir, &["--client-messages-per-minute", "1000", "--conversation-messages-per-minute", "3"]).await?;
    let (mut ws, _, _) = dev.client("Closer").await?;
    ws.send(&json!({"type": "close"})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "closed").await?;
    // The close took one of 3: two reads are taken, the third refused.
    for _ in 0..3 {
        ws.send(&json!({"type": "read", "upto": 0})).await?;
    }
    let refused = ws.wait_for(WAIT, |v| v["type"] == "error").await?;
    assert_eq!((refused["code"].clone(), refused["for"].clone()), (json!("rate_limited"), json!("read")), "{refused}");
    Ok(())
}
