//! Standalone gateways (`switchboard gateway`) in front of three `switchboard node`
//! processes: clients and operators connect only to gateways, which relay to the
//! members over QUIC with mutual TLS. The member under their sockets is killed with
//! SIGKILL mid-exchange and the sockets stay open; a gateway is killed and its clients
//! resume on the other; a gateway with a certificate from another CA gets nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_chaos_tests::{cli, eventually, pinned_to_shard_leaders, set_presence, Cluster, Dev, WAIT};
use switchboard_gateway::client::{ClientError, Incoming, WsClient};

/// How long a client waits for the next frame while its message is unanswered: a
/// message whose outcome a failover made unknown is sent again by the node for up to
/// 10 s, and one attempt may wait 10 s for a leader.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// (conversation, key) -> the `seq` the server acknowledged.
type Acked = Arc<Mutex<BTreeMap<(u64, String), u64>>>;

struct ClientRun {
    conversation: u64,
    /// `seq` of every event received, in order.
    seen: Vec<u64>,
    next: u64,
    /// Whether the socket closed under the client.
    lost: bool,
    /// Sends answered `unavailable` and sent again with the same key.
    retried: u64,
    acks: Vec<Instant>,
}

/// Sends messages one after another, each acknowledged before the next, until `stop`.
async fn client_loop(
    mut ws: WsClient,
    mut run: ClientRun,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> ClientRun {
    let conversation = run.conversation;
    'messages: while !stop.load(Ordering::Relaxed) {
        let key = format!("c{conversation}-{}", run.next);
        if ws.send(&json!({"type": "send", "key": key, "text": format!("client message {}", run.next)})).await.is_err() {
            run.lost = true;
            break;
        }
        loop {
            match ws.next(ACK_WAIT).await {
                Ok(Incoming::Json(v)) if v["type"] == "event" => {
                    run.seen.push(v["seq"].as_u64().unwrap_or(0))
                }
                Ok(Incoming::Json(v)) if v["type"] == "ack" && v["key"] == key.as_str() => {
                    acked
                        .lock()
                        .unwrap()
                        .insert((conversation, key.clone()), v["seq"].as_u64().unwrap_or(0));
                    run.acks.push(Instant::now());
                    run.next += 1;
                    break;
                }
                Ok(Incoming::Json(v)) if v["type"] == "error" && v["ref"] == key.as_str() => {
                    assert_eq!(
                        v["code"], "unavailable",
                        "only a failover may refuse a message: {v}"
                    );
                    run.retried += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'messages;
                }
                Ok(Incoming::Json(v)) if v["type"] == "error" => {
                    panic!("client of {conversation} got {v}")
                }
                Ok(Incoming::Json(_)) | Ok(Incoming::Text(_)) => {}
                Ok(Incoming::Closed { .. }) | Err(ClientError::Closed) => {
                    run.lost = true;
                    break 'messages;
                }
                Err(e) => {
                    panic!("client of {conversation} waited {ACK_WAIT:?} for its ack of {key}: {e}")
                }
            }
        }
        // Paced under the conversation's budget (60 a minute, in a burst of 60).
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    run
}

/// Accepts offers and answers each client message until `stop`: the feed's `seq`s, the
/// messages it saw per conversation, and whether its socket was lost.
async fn operator_loop(
    mut ws: WsClient,
    operator: &'static str,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> (Vec<u64>, BTreeMap<u64, Vec<String>>, bool) {
    let (mut seen, mut texts) = (Vec::new(), BTreeMap::<u64, Vec<String>>::new());
    let mut replies = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match ws.next(Duration::from_millis(200)).await {
            Ok(Incoming::Json(v)) if v["type"] == "event" => {
                seen.push(v["seq"].as_u64().unwrap_or(0));
                match v["kind"].as_str() {
                    Some("offer") => {
                        let _ = ws.send(&json!({"type": "accept", "offer": v["offer"], "ref": format!("accept-{}", v["offer"])})).await;
                    }
                    Some("conversation") if v["entry"]["from"] == "client" => {
                        let conversation = v["conversation"].as_u64().unwrap_or(0);
                        texts
                            .entry(conversation)
                            .or_default()
                            .push(v["entry"]["text"].as_str().unwrap_or_default().to_owned());
                        replies += 1;
                        let key = format!("{operator}-{replies}");
                        let _ = ws.send(&json!({"type": "send", "conversation": conversation, "key": key, "text": "operator reply"})).await;
                    }
                    _ => {}
                }
            }
            Ok(Incoming::Json(v)) if v["type"] == "ack" => {
                if let (Some(c), Some(key), Some(seq)) = (
                    v["conversation"].as_u64(),
                    v["key"].as_str(),
                    v["seq"].as_u64(),
                ) {
                    acked.lock().unwrap().insert((c, key.to_owned()), seq);
                }
            }
            Ok(Incoming::Closed { .. }) | Err(ClientError::Closed) => return (seen, texts, true),
            Ok(_) | Err(_) => {}
        }
    }
    (seen, texts, false)
}

fn contiguous(seen: &[u64]) -> bool {
    seen.windows(2).all(|p| p[1] == p[0] + 1)
}

/// A gateway metric's value, 0 if absent.
async fn metric(gateway: &Dev, name: &str) -> anyhow::Result<u64> {
    let (_, body) = gateway.api("GET", "/metrics", None, None).await?;
    Ok(body
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Three nodes and two gateways under steady chat traffic (visitors on one gateway,
/// operators on the other): the leader of the conversation shard that holds a live
/// conversation, with that conversation's visitor socket on it, is killed with SIGKILL
/// mid-exchange. Every socket stays open; nothing acknowledged is lost or doubled; no
/// conversation has two operators and nobody goes over capacity. Prints the recovery
/// time a client of an affected conversation saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_through_a_gateway_stay_open_when_their_member_is_killed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), 3).await?;
    let gateway = cluster.start_gateway(0).await?;
    let staff_gateway = cluster.start_gateway(1).await?;
    // Gateways pin new sockets to the leader: the member about to be killed. On a busy
    // machine the leadership can move while the cluster starts, so the leader is read
    // again until the members and both gateways name the same one.
    let leader = eventually(Duration::from_secs(30), Duration::from_millis(100), || async {
        let leader = cluster.leader().await?;
        for g in [&gateway, &staff_gateway] {
            let (_, view) = g.api("GET", "/api/gateway", None, None).await?;
            if view["leader"].as_u64() != Some(leader as u64) {
                return Ok(None);
            }
        }
        Ok(Some(leader))
    })
    .await?;

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut operators = Vec::new();
    for login in ["alice", "bob"] {
        let (mut ws, _) = staff_gateway.operator(login).await?;
        set_presence(&mut ws, "online").await?;
        ws.clear_skipped();
        operators.push(tokio::spawn(operator_loop(
            ws,
            login,
            acked.clone(),
            stop.clone(),
        )));
    }
    let mut clients = Vec::new();
    let mut conversations = Vec::new();
    for i in 0..3 {
        let (ws, conversation, _) = gateway.client(&format!("Client {i}")).await?;
        conversations.push(conversation);
        let run = ClientRun {
            conversation,
            seen: Vec::new(),
            next: 0,
            lost: false,
            retried: 0,
            acks: Vec::new(),
        };
        clients.push(tokio::spawn(client_loop(
            ws,
            run,
            acked.clone(),
            stop.clone(),
        )));
    }
    // Each visitor's socket moves to the leader of its conversation's shard (ADR 0008,
    // item 6) while the chat goes on.
    let placed = eventually(Duration::from_secs(30), Duration::from_millis(200), || async {
        let (_, view) = gateway.api("GET", "/api/gateway", None, None).await?;
        Ok(pinned_to_shard_leaders(&view, &conversations).map(|placed| (placed, view)))
    })
    .await;
    let (placed, _) = placed?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !acked.lock().unwrap().is_empty(),
        "messages flowed before the kill"
    );
    // The map as it is now, just before the kill, with every socket on its shard's leader.
    let clients_view = eventually(Duration::from_secs(10), Duration::from_millis(100), || async {
        let (_, view) = gateway.api("GET", "/api/gateway", None, None).await?;
        Ok(pinned_to_shard_leaders(&view, &conversations).map(|_| view))
    })
    .await?;
    // The victim leads the shard of a live conversation, mid-exchange: the first
    // visitor's. What each gateway relays to it must move.
    let shards = clients_view["shards"].as_array().cloned().unwrap_or_default();
    let leader_of = |c: u64| shards[(c % shards.len() as u64) as usize]["leader"].as_u64().unwrap_or(0);
    let victim = leader_of(conversations[0]);
    let affected: BTreeSet<u64> = conversations.iter().copied().filter(|c| leader_of(*c) == victim).collect();
    let on = |view: &serde_json::Value, id: u64| {
        view["members"].as_array().and_then(|m| m.iter().find(|m| m["id"] == id)).and_then(|m| m["sockets"].as_u64()).unwrap_or(0)
    };
    let (_, staff_view) = staff_gateway.api("GET", "/api/gateway", None, None).await?;
    let (client_sockets, staff_sockets) = (on(&clients_view, victim), on(&staff_view, victim));
    println!(
        "visitors' sockets per member {placed:?}; node {victim} leads the shard of conversations {affected:?} and holds {client_sockets} visitor and {staff_sockets} operator sockets (metadata group's leader: node {leader})"
    );
    assert!(client_sockets >= 1 && !affected.is_empty());
    cluster.kill9(victim as usize).await?;
    let killed_at = Instant::now();
    println!("killed node {victim}");
    tokio::time::sleep(Duration::from_millis(4000)).await;
    stop.store(true, Ordering::Relaxed);

    let mut runs = Vec::new();
    let (mut recovery, mut recovery_any) = (Duration::ZERO, Duration::ZERO);
    for handle in clients {
        let run = handle.await?;
        assert!(
            !run.lost,
            "the client socket of {} stayed open through the kill",
            run.conversation
        );
        assert!(
            contiguous(&run.seen),
            "client of {} saw every event once, in order: {:?}",
            run.conversation,
            run.seen
        );
        let first = run.acks.iter().find(|at| **at > killed_at).ok_or_else(|| {
            anyhow::anyhow!(
                "client of {} wrote nothing after the kill",
                run.conversation
            )
        })?;
        recovery_any = recovery_any.max(first.duration_since(killed_at));
        if affected.contains(&run.conversation) {
            recovery = recovery.max(first.duration_since(killed_at));
        }
        runs.push(run);
    }
    let mut operator_texts: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for handle in operators {
        let (seen, texts, lost) = handle.await?;
        assert!(!lost, "operator sockets stayed open through the kill");
        assert!(
            contiguous(&seen),
            "operator feed without gap or duplicate: {seen:?}"
        );
        for (conversation, mut t) in texts {
            operator_texts
                .entry(conversation)
                .or_default()
                .append(&mut t);
        }
    }
    println!(
        "recovery seen by a client of a conversation on the killed leader's shard (from the kill to its first acknowledged message), through the gateway: {recovery:?} (any client: {recovery_any:?}); sends answered unavailable and resent: {}",
        runs.iter().map(|r| r.retried).sum::<u64>()
    );
    assert!(metric(&gateway, "switchboard_gateway_repins_total").await? >= client_sockets, "every visitor socket on the dead member moved");
    assert!(metric(&staff_gateway, "switchboard_gateway_repins_total").await? >= staff_sockets, "every operator socket on the dead member moved");
    for g in [&gateway, &staff_gateway] {
        assert_eq!(metric(g, "switchboard_gateway_repins_failed_total").await?, 0);
    }

    // Every acknowledged message is in its conversation exactly once, where it was
    // acknowledged, and each operator saw each client message once. The gateway reads
    // on one member, which serves from its own replica: read once every member applied
    // what the others did.
    cluster.settled(Duration::from_secs(20)).await?;
    let supervisor = gateway.login("supervisor").await?;
    let acked = acked.lock().unwrap().clone();
    let mut held = BTreeSet::new();
    for run in &runs {
        let (status, conv) = gateway
            .api(
                "GET",
                &format!("/api/conversations/{}", run.conversation),
                Some(&supervisor),
                None,
            )
            .await?;
        assert_eq!(status, 200, "{conv}");
        let history = conv["history"].as_array().cloned().unwrap_or_default();
        for ((c, key), seq) in acked.iter().filter(|((c, _), _)| *c == run.conversation) {
            let found: Vec<u64> = history
                .iter()
                .filter(|e| e["key"] == key.as_str())
                .filter_map(|e| e["seq"].as_u64())
                .collect();
            if found.is_empty() {
                // Client entries carry no key for staff: match on the text.
                let n = key.rsplit('-').next().unwrap_or_default();
                let text = format!("client message {n}");
                let count = history
                    .iter()
                    .filter(|e| e["text"] == text.as_str())
                    .count();
                assert_eq!(count, 1, "{c}/{key} is in its conversation once");
            } else {
                assert_eq!(
                    found,
                    vec![*seq],
                    "{c}/{key} is in its conversation once, at its acknowledged seq"
                );
            }
        }
        let assigned: BTreeSet<String> = history
            .iter()
            .filter(|e| e["kind"] == "assigned")
            .filter_map(|e| e["operator"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            assigned.len(),
            1,
            "conversation {} had one operator: {assigned:?}",
            run.conversation
        );
        held.extend(assigned);
        let texts = operator_texts
            .get(&run.conversation)
            .cloned()
            .unwrap_or_default();
        let distinct: BTreeSet<&String> = texts.iter().collect();
        assert_eq!(
            distinct.len(),
            texts.len(),
            "the operator saw each message of {} once: {texts:?}",
            run.conversation
        );
    }
    let (_, operators) = gateway
        .api("GET", "/api/operators", Some(&supervisor), None)
        .await?;
    for operator in operators["operators"].as_array().into_iter().flatten() {
        let (active, capacity) = (
            operator["active"].as_u64().unwrap_or(0),
            operator["capacity"].as_u64().unwrap_or(0),
        );
        assert!(
            active <= capacity,
            "{} holds {active} of {capacity}",
            operator["id"]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_gateway_dies_its_clients_resume_on_another() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    let mut a = cluster.start_gateway(0).await?;
    let b = cluster.start_gateway(1).await?;
    let (mut alice, _) = b.operator("alice").await?;
    set_presence(&mut alice, "online").await?;

    let (mut ws, conversation, token) = a.client("Dana").await?;
    let offer = alice
        .wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer")
        .await?;
    alice
        .send(&json!({"type": "accept", "offer": offer["offer"], "ref": "accept"}))
        .await?;
    alice
        .wait_for(WAIT, |v| v["type"] == "ok" && v["ref"] == "accept")
        .await?;
    let mut seen = Vec::new();
    for n in 0..3 {
        ws.send(&json!({"type": "send", "key": format!("k{n}"), "text": format!("before {n}")}))
            .await?;
        loop {
            let v = ws
                .wait_for(WAIT, |v| v["type"] == "event" || v["type"] == "ack")
                .await?;
            if v["type"] == "event" {
                seen.push(v["seq"].as_u64().unwrap_or(0));
            } else if v["key"] == format!("k{n}").as_str() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Events still on their way are read before the gateway goes.
    while let Ok(Incoming::Json(v)) = ws.next(Duration::from_millis(500)).await {
        if v["type"] == "event" {
            seen.push(v["seq"].as_u64().unwrap_or(0));
        }
    }
    a.kill9().await?;
    assert!(
        matches!(ws.next(WAIT).await, Ok(Incoming::Closed { .. }) | Err(_)),
        "the dead gateway's socket closed"
    );

    // The client reconnects to the other gateway and resumes after what it saw.
    let last = seen.last().copied().unwrap_or(0);
    let mut ws = WsClient::connect(&b.public, "/ws/client", None).await?;
    ws.send(&json!({"type": "resume", "token": token, "last_seq": last}))
        .await?;
    ws.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    alice.send(&json!({"type": "send", "conversation": conversation, "key": "a-after", "text": "still here"})).await?;
    ws.send(&json!({"type": "send", "key": "k-after", "text": "after the gateway died"}))
        .await?;
    let deadline = Instant::now() + WAIT;
    let mut texts = Vec::new();
    while Instant::now() < deadline
        && !(texts.iter().any(|t| t == "still here")
            && texts.iter().any(|t| t == "after the gateway died"))
    {
        if let Ok(Incoming::Json(v)) = ws.next(Duration::from_millis(500)).await {
            if v["type"] == "event" {
                seen.push(v["seq"].as_u64().unwrap_or(0));
                texts.push(v["text"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    assert!(
        texts.iter().any(|t| t == "still here")
            && texts.iter().any(|t| t == "after the gateway died"),
        "both sides' messages arrive after the resume: {texts:?}"
    );
    assert!(
        contiguous(&seen),
        "no gap and no duplicate across gateways: {seen:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_certificate_from_another_ca_gets_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    // A second layout has a CA of its own; its gateway's file is pointed at our members.
    let foreign = dir.path().join("foreign");
    let ports = switchboard_chaos_tests::free_port_block(2)?;
    cli(
        [
            "cluster",
            "init",
            "--nodes",
            "1",
            "--dir",
            foreign.to_str().unwrap_or_default(),
            "--public-port",
            &ports.to_string(),
            "--private-port",
            &(ports + 1).to_string(),
            "--raft-port",
            &(ports + 2).to_string(),
            "--gateway-public-port",
            &(ports + 10).to_string(),
            "--gateway-private-port",
            &(ports + 11).to_string(),
        ],
        &[],
    )
    .await?;
    let ours = std::fs::read_to_string(dir.path().join("gateway-a.toml"))?;
    let members = &ours[ours
        .find("[[members]]")
        .ok_or_else(|| anyhow::anyhow!("no members in gateway-a.toml"))?..];
    let theirs = std::fs::read_to_string(foreign.join("gateway-a.toml"))?;
    let head = &theirs[..theirs
        .find("[[members]]")
        .ok_or_else(|| anyhow::anyhow!("no members in the foreign file"))?];
    std::fs::write(foreign.join("gateway-a.toml"), format!("{head}{members}"))?;
    let gateway = switchboard_chaos_tests::start_gateway(
        &foreign.join("gateway-a.toml"),
        &foreign.join("data/gateway-a"),
    )
    .await?;
    // Before it said ready the gateway polled every member for its first map (5 s at
    // most) and no member answered it.
    let (status, _) = gateway.api("GET", "/readyz", None, None).await?;
    assert_eq!(status, 503, "no member answers a gateway from another CA");
    // The gateway's own answers carry the headers a member's do.
    for (addr, path) in [(&gateway.private, "/readyz"), (&gateway.public, "/healthz"), (&gateway.private, "/api/cluster")] {
        let own = switchboard_chaos_tests::http_request(addr, None, "GET", path, &[], b"").await?;
        assert_eq!(own.header("x-content-type-options"), Some("nosniff"), "GET {path} ({})", own.status);
    }
    let (status, body) = gateway.api("GET", "/api/cluster", None, None).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    let log = std::fs::read_to_string(dir.path().join("data/node-1/node.log"))?;
    assert!(
        log.contains("refused a peer's QUIC handshake"),
        "the member logged the refusal"
    );
    let _ = cluster;
    Ok(())
}

/// A visitor's own `resume` that the member under its socket never answered (the member
/// froze, then died) is resumed by the gateway on another member. When that member
/// refuses it for what it asks, the visitor gets that answer, as it would have from the
/// first member, not silence and a close asking it to resume again: a `last_seq` ahead
/// of the conversation gets `invalid` and the socket follows what it followed before; a
/// token that is not one gets `unauthorized` and the close 4001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_refused_after_a_re_pin_gets_the_members_answer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), 3).await?;
    let gateway = cluster.start_gateway(0).await?;
    // What the gateway keeps of a socket's request to open it again is bounded: a query
    // past 4 KiB as the member reads it (each %FF becomes a 9-byte replacement
    // character: 1,500 bytes sent, 4,500 kept) is refused before any member is asked.
    let upgrade = [("upgrade", "websocket"), ("connection", "upgrade"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="), ("sec-websocket-version", "13")];
    let long = switchboard_chaos_tests::http_request(&gateway.public, None, "GET", &format!("/ws/client?pad={}", "%FF".repeat(500)), &upgrade, b"").await?;
    assert_eq!(long.status, 414, "{}", String::from_utf8_lossy(&long.body));
    let pad = "x".repeat(3000);
    let origin = [upgrade.as_slice(), &[("origin", pad.as_str())]].concat();
    let long = switchboard_chaos_tests::http_request(&gateway.public, None, "GET", "/ws/client", &origin, b"").await?;
    assert_eq!(long.status, 431, "{}", String::from_utf8_lossy(&long.body));
    let (mut ws, conversation, token) = gateway.client("Gus").await?;
    ws.send(&json!({"type": "send", "key": "before", "text": "before the freeze"})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "before").await?;
    // Freezes the member under the visitor's socket (once on its conversation shard's
    // leader), sends `resume` into it, and kills it.
    async fn resume_into_a_dying_member(cluster: &mut Cluster, gateway: &Dev, ws: &mut WsClient, conversation: u64, resume: serde_json::Value) -> anyhow::Result<usize> {
        let placed = eventually(Duration::from_secs(30), Duration::from_millis(200), || async {
            let (_, view) = gateway.api("GET", "/api/gateway", None, None).await?;
            Ok(pinned_to_shard_leaders(&view, &[conversation]))
        })
        .await?;
        let member = *placed.keys().next().expect("one member holds the socket") as usize;
        cluster.node(member).signal("-STOP").await?;
        ws.send(&resume).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.kill9(member).await?;
        Ok(member)
    }

    // A `last_seq` far ahead of the conversation: `invalid`, and the socket stays on it.
    let killed = resume_into_a_dying_member(&mut cluster, &gateway, &mut ws, conversation, json!({"type": "resume", "token": token, "last_seq": 1_000_000})).await?;
    let refused = ws.wait_for(Duration::from_secs(20), |v| v["type"] == "error" || v["type"] == "resumed").await?;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("invalid")), "the refusal of the resume is delivered: {refused}");
    let mut acked = false;
    for attempt in 0..20 {
        ws.send(&json!({"type": "send", "key": "after", "text": "after the re-pin"})).await?;
        let answer = ws.wait_for(ACK_WAIT, |v| (v["type"] == "ack" || v["type"] == "error") && (v["key"] == "after" || v["ref"] == "after")).await?;
        if answer["type"] == "ack" {
            acked = true;
            break;
        }
        assert_eq!(answer["code"], "unavailable", "attempt {attempt}: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(acked, "the socket follows its conversation after the refused resume: a message is acknowledged");
    cluster.restart(killed).await?;

    // A token that is not one: `unauthorized`, then the close 4001.
    resume_into_a_dying_member(&mut cluster, &gateway, &mut ws, conversation, json!({"type": "resume", "token": "v1.not-a-token.at-all", "last_seq": 0})).await?;
    let refused = ws.wait_for(Duration::from_secs(20), |v| v["type"] == "error" || v["type"] == "resumed").await?;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("unauthorized")), "{refused}");
    let mut closed = None;
    for _ in 0..100 {
        match ws.next(Duration::from_secs(10)).await? {
            Incoming::Closed { code, .. } => {
                closed = Some(code);
                break;
            }
            Incoming::Json(_) | Incoming::Text(_) => {}
        }
    }
    assert_eq!(closed, Some(4001), "closed as the member closes a socket that resumed with a forged token");
    Ok(())
}
