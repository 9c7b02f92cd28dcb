//! Three `switchboard node` processes laid out by `switchboard cluster init`, one Raft
//! group replicated on all three. Clients and operators write through any node
//! (followers forward to the leader). The leader is killed with SIGKILL while messages
//! flow: sockets on the other nodes stay open and see no gap and no duplicate, sockets
//! on the dead node resume on another, every acknowledged message is in its
//! conversation exactly once, and the killed node comes back and catches up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_chaos_tests::{cli, eventually, set_presence, Cluster, WAIT};
use switchboard_gateway::client::{ClientError, Incoming, WsClient};

/// How long a client waits for the next frame while its message is unanswered: a
/// message whose outcome a failover made unknown is sent again by the node for up to
/// 10 s, and one attempt may wait 10 s for a leader.
const ACK_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Observed {
    /// (conversation, key) -> sequence number the server acknowledged.
    acked: BTreeMap<(u64, String), u64>,
}

type Shared = Arc<Mutex<Observed>>;

/// What a client's socket went through.
struct ClientRun {
    /// Sequence numbers of every event it received, in order.
    seen: Vec<u64>,
    /// The next message number to send.
    next: u64,
    /// Whether its socket closed under it.
    lost: bool,
    /// Commands answered `unavailable` and sent again with the same key.
    retried: u64,
    /// When each acknowledgement arrived.
    acks: Vec<std::time::Instant>,
}

/// Sends messages one after another until `stop`, each acknowledged before the next;
/// one answered `unavailable` (its outcome unknown during a failover) is sent again with
/// the same key, as the protocol asks.
async fn client_loop(mut ws: WsClient, conversation: u64, mut run: ClientRun, shared: Shared, stop: Arc<AtomicBool>) -> ClientRun {
    'messages: while !stop.load(Ordering::Relaxed) {
        let key = format!("c{conversation}-{}", run.next);
        let frame = json!({"type": "send", "key": key, "text": format!("client message {}", run.next)});
        if ws.send(&frame).await.is_err() {
            run.lost = true;
            break;
        }
        loop {
            match ws.next(ACK_WAIT).await {
                Ok(Incoming::Json(v)) if v["type"] == "event" => run.seen.push(v["seq"].as_u64().unwrap_or(0)),
                Ok(Incoming::Json(v)) if v["type"] == "ack" && v["key"] == key.as_str() => {
                    shared.lock().unwrap().acked.insert((conversation, key.clone()), v["seq"].as_u64().unwrap_or(0));
                    run.acks.push(std::time::Instant::now());
                    run.next += 1;
                    break;
                }
                Ok(Incoming::Json(v)) if v["type"] == "error" && v["ref"] == key.as_str() => {
                    assert_eq!(v["code"], "unavailable", "only a failover may refuse a message: {v}");
                    run.retried += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'messages;
                }
                Ok(Incoming::Json(v)) if v["type"] == "error" => panic!("client of {conversation} got {v}"),
                Ok(Incoming::Json(_)) | Ok(Incoming::Text(_)) => {}
                Ok(Incoming::Closed { .. }) | Err(ClientError::Closed) => {
                    run.lost = true;
                    break 'messages;
                }
                Err(e) => panic!("client of {conversation} waited {ACK_WAIT:?} for its ack of {key}: {e}"),
            }
        }
        // Paced under the conversation's budget (60 a minute, in a burst of 60).
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    run
}

/// Accepts every offer and answers every client message until `stop`; returns the
/// sequence numbers of its feed's events and whether its socket was lost.
async fn operator_loop(mut ws: WsClient, operator: String, shared: Shared, stop: Arc<AtomicBool>) -> (Vec<u64>, bool) {
    let mut seen = Vec::new();
    let mut replies = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match ws.next(Duration::from_millis(200)).await {
            Ok(Incoming::Json(v)) if v["type"] == "event" => {
                seen.push(v["seq"].as_u64().unwrap_or(0));
                match v["kind"].as_str() {
                    Some("offer") => {
                        let _ = ws.send(&json!({"type": "accept", "offer": v["offer"]})).await;
                    }
                    Some("conversation") if v["entry"]["from"] == "client" => {
                        replies += 1;
                        let key = format!("{operator}-{replies}");
                        let _ = ws.send(&json!({"type": "send", "conversation": v["conversation"], "key": key, "text": "operator reply"})).await;
                    }
                    _ => {}
                }
            }
            Ok(Incoming::Json(v)) if v["type"] == "ack" => {
                if let (Some(c), Some(key), Some(seq)) = (v["conversation"].as_u64(), v["key"].as_str(), v["seq"].as_u64()) {
                    shared.lock().unwrap().acked.insert((c, key.to_owned()), seq);
                }
            }
            Ok(_) | Err(ClientError::Timeout) => {}
            Err(_) => return (seen, true),
        }
    }
    (seen, false)
}

fn contiguous(seen: &[u64]) -> bool {
    seen.windows(2).all(|p| p[1] == p[0] + 1)
}

async fn start_client(node: &switchboard_chaos_tests::Dev, name: &str) -> anyhow::Result<(WsClient, u64, String)> {
    node.client(name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_nothing_and_sockets_elsewhere_stay_open() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start_one_group(dir.path(), 3).await?;
    let leader = cluster.leader().await?;
    let others: Vec<usize> = (1..=3).filter(|id| *id != leader).collect();
    let (a, b) = (others[0], others[1]);
    println!("leader is node {leader}; sockets on nodes {a} and {b} should stay open");

    // Staff tokens are signed with the cluster's one key: a login on one node works on all.
    let token = cluster.node(a).login("supervisor").await?;
    let (status, _) = cluster.node(b).api("GET", "/api/queues", Some(&token), None).await?;
    assert_eq!(status, 200, "a token from node {a} is good on node {b}");

    let shared: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut operators = Vec::new();
    for (login, on) in [("alice", a), ("bob", b)] {
        let (mut ws, _) = cluster.node(on).operator(login).await?;
        set_presence(&mut ws, "online").await?;
        ws.clear_skipped();
        operators.push(tokio::spawn(operator_loop(ws, login.to_string(), shared.clone(), stop.clone())));
    }
    // Two clients on a node that survives, two on the leader that will be killed.
    let mut clients = Vec::new();
    for (i, on) in [b, b, leader, leader].into_iter().enumerate() {
        let (ws, conversation, token) = start_client(cluster.node(on), &format!("Client {i}")).await?;
        let run = ClientRun { seen: Vec::new(), next: 0, lost: false, retried: 0, acks: Vec::new() };
        clients.push((conversation, token, on, tokio::spawn(client_loop(ws, conversation, run, shared.clone(), stop.clone()))));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = shared.lock().unwrap().acked.len();
    assert!(before > 0, "messages flowed before the kill");
    // Entity actors run on the leader only: node b serves its sockets without any.
    let (_, metrics) = cluster.node(b).api("GET", "/metrics", None, None).await?;
    assert!(metrics.as_str().unwrap_or_default().lines().any(|l| l == "switchboard_actors_active 0"), "node {b} runs no entity actor while it follows");
    cluster.kill9(leader).await?;
    let killed_at = std::time::Instant::now();
    let new_leader = cluster.leader().await?;
    println!("node {new_leader} leads {:?} after the kill", killed_at.elapsed());
    assert_ne!(new_leader, leader);

    // Sockets of the dead node come back on another node and carry on.
    let mut resumed = Vec::new();
    for (conversation, token, on, handle) in clients {
        if on != leader {
            resumed.push((conversation, handle));
            continue;
        }
        let mut run = handle.await?;
        assert!(run.lost, "a socket on the killed node was cut");
        let last = run.seen.last().copied().unwrap_or(0);
        let mut ws = WsClient::connect(&cluster.node(a).public, "/ws/client", None).await?;
        ws.send(&json!({"type": "resume", "token": token, "last_seq": last})).await?;
        ws.wait_for(WAIT, |v| v["type"] == "resumed").await?;
        run.lost = false;
        resumed.push((conversation, tokio::spawn(client_loop(ws, conversation, run, shared.clone(), stop.clone()))));
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);

    let mut retried = 0;
    let mut runs = Vec::new();
    let mut recovery = Duration::ZERO;
    for (conversation, handle) in resumed {
        let run = handle.await?;
        assert!(!run.lost, "the socket of {conversation} stayed open after the leader died");
        if let Some(first) = run.acks.iter().find(|at| **at > killed_at) {
            recovery = recovery.max(first.duration_since(killed_at));
        }
        assert!(contiguous(&run.seen), "client of {conversation} saw every event once, in order: {:?}", run.seen);
        retried += run.retried;
        runs.push((conversation, run));
    }
    for handle in operators {
        let (seen, lost) = handle.await?;
        assert!(!lost, "operator sockets on surviving nodes stayed open");
        assert!(contiguous(&seen), "operator feed without gap or duplicate: {seen:?}");
    }
    // What an SRE's script sees: the new leader, three voters; forwarded entries counted.
    let output = cli(["cluster", "status", "--json", "--addr", &cluster.node(b).private], &[]).await?;
    let status: serde_json::Value = serde_json::from_slice(&output)?;
    assert_eq!(status["leader"].as_u64(), Some(new_leader as u64), "{status}");
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3), "{status}");
    let (_, metrics) = cluster.node(b).api("GET", "/metrics", None, None).await?;
    let forwarded = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_forwarded_entries_total{group=\"1\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(forwarded > 0, "node {b} forwarded its clients' commands while it followed");
    // The new leader's metrics: it reaches a majority, one replica is missing (killed).
    let (_, metrics) = cluster.node(new_leader).api("GET", "/metrics", None, None).await?;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(metrics.contains("switchboard_raft_reaches_majority{group=\"1\"} 1"), "{metrics}");
    assert!(metrics.contains("switchboard_raft_voters{group=\"1\"} 3"));
    assert_eq!(metrics.lines().filter(|l| l.starts_with("switchboard_raft_replica_lag{")).count(), 2, "a lag line per other member");
    // I2 and I3 held through the failover: nobody over capacity, no conversation twice.
    let supervisor = cluster.node(a).login("supervisor").await?;
    let (_, operators) = cluster.node(a).api("GET", "/api/operators", Some(&supervisor), None).await?;
    let mut held = 0;
    for operator in operators["operators"].as_array().into_iter().flatten() {
        let (active, capacity) = (operator["active"].as_u64().unwrap_or(0), operator["capacity"].as_u64().unwrap_or(0));
        assert!(active <= capacity, "{} holds {active} of {capacity}", operator["id"]);
        held += active;
    }
    for (conversation, _) in &runs {
        let (_, conv) = cluster.node(a).api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
        let operators: std::collections::BTreeSet<String> = conv["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["kind"] == "assigned")
            .filter_map(|e| e["operator"].as_str().map(str::to_owned))
            .collect();
        assert!(operators.len() <= 1, "conversation {conversation} was assigned to {operators:?}");
    }
    assert_eq!(held, runs.len() as u64, "every conversation is held by exactly one operator");
    println!("recovery seen by clients on a surviving node: {recovery:?} from the kill to their first acknowledgement");
    let observed = std::mem::take(&mut *shared.lock().unwrap());
    assert!(observed.acked.len() > before, "messages flowed after the kill too ({before} before, {} in all)", observed.acked.len());

    // Every acknowledged message is in its conversation once, at its acknowledged place,
    // on the surviving nodes and, once it caught up, on the restarted one.
    cluster.restart(leader).await?;
    let target = cluster.status(new_leader).await?["last_applied"].as_u64().unwrap_or(0);
    eventually(WAIT, Duration::from_millis(100), || async {
        let applied = cluster.status(leader).await?["last_applied"].as_u64().unwrap_or(0);
        Ok((applied >= target).then_some(()))
    })
    .await?;
    let mut histories = Vec::new();
    for id in [a, b, leader] {
        let supervisor = cluster.node(id).login("supervisor").await?;
        let mut all = Vec::new();
        for (conversation, run) in &runs {
            let (status, conv) = cluster.node(id).api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
            assert_eq!(status, 200, "{conv}");
            let history = conv["history"].as_array().cloned().unwrap_or_default();
            for (i, entry) in history.iter().enumerate() {
                assert_eq!(entry["seq"].as_u64(), Some(i as u64 + 1), "history of {conversation} on node {id} is contiguous");
            }
            for ((c, key), seq) in observed.acked.range((*conversation, String::new())..) {
                if c != conversation {
                    break;
                }
                let entry = &history[(*seq - 1) as usize];
                assert_eq!(entry["key"], key.as_str(), "acked {key} of {conversation} at seq {seq} on node {id}");
                let copies = history.iter().filter(|e| e["key"] == key.as_str()).count();
                assert_eq!(copies, 1, "{key} is in {conversation} once on node {id}");
            }
            assert!(run.next > 0, "client of {conversation} got acks");
            all.push(history.iter().map(|e| (e["seq"].clone(), e["key"].clone(), e["kind"].clone())).collect::<Vec<_>>());
        }
        histories.push(all);
    }
    // Entries written after the checks' target may still be arriving on the restarted
    // node; what both have must be the same.
    for (other, what) in [(1, "the two survivors hold"), (2, "the restarted node holds")] {
        for (x, y) in histories[0].iter().zip(&histories[other]) {
            let n = x.len().min(y.len());
            assert_eq!(x[..n], y[..n], "{what} the same history");
        }
    }
    println!("{} acknowledged messages checked on three nodes; {retried} sends retried during the failover", observed.acked.len());
    Ok(())
}

/// A PNG-looking file of `n` bytes with varied content.
fn png(n: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..n.saturating_sub(8)).map(|i| (i * 31 % 251) as u8));
    bytes
}

async fn download(node: &switchboard_chaos_tests::Dev, id: &str, token: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let auth = format!("Bearer {token}");
    let response = switchboard_chaos_tests::http_request(&node.private, None, "GET", &format!("/api/attachments/{id}"), &[("Authorization", &auth)], &[]).await?;
    Ok((response.status, response.body))
}

/// An upload is answered only once a majority holds the file: the member that received
/// it can die at once and the file is still served; a member that was down when it was
/// sent fetches it from another when asked, checked against the record's SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_outlives_the_member_that_received_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), 3).await?;
    let supervisor_on_2 = cluster.node(2).login("supervisor").await?;
    let supervisor_on_3 = cluster.node(3).login("supervisor").await?;
    cluster.kill9(3).await?;
    // Every group node 3 led has a new leader before the visitor starts (a start that
    // was on its way to the dead leader is answered `unavailable`).
    eventually(WAIT, Duration::from_millis(100), || async {
        let status = cluster.status(1).await?;
        let leaders: Vec<Option<u64>> = match status["groups"].as_array() {
            Some(groups) => groups.iter().map(|g| g["leader"].as_u64()).collect(),
            None => vec![status["leader"].as_u64()],
        };
        Ok(leaders.iter().all(|l| l.is_some_and(|l| l != 3)).then_some(()))
    })
    .await?;

    let (_ws, conversation, client_token) = cluster.node(1).client("Sender").await?;
    let file = png(300_000);
    let (status, body) = switchboard_chaos_tests::client_upload(cluster.node(1), &client_token, "scan.png", "image/png", &file).await?;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    // The record is committed when the upload is answered; node 2 applies it once the
    // leader's next heartbeat tells it the commit (alone, it could not learn it later).
    // Its bytes came before the record, pushed, not fetched: node 2 is not asked for
    // the file until node 1 is gone.
    let upto = cluster.status(1).await?;
    switchboard_chaos_tests::eventually(switchboard_chaos_tests::WAIT, std::time::Duration::from_millis(20), || async {
        Ok(switchboard_chaos_tests::caught_up(&cluster.status(2).await?, &upto).then_some(()))
    })
    .await?;
    cluster.kill9(1).await?;
    // The upload was answered once node 2 had its copy too.
    assert!(std::fs::read(dir.path().join(format!("data/node-2/attachments/{id}")))? == file, "node 2 got the copy before the upload was answered");
    // Alone, node 2 cannot confirm that a staff token's session still stands (once its
    // last confirmation, at most a second old, has aged).
    eventually(Duration::from_secs(10), Duration::from_millis(200), || async {
        Ok((download(cluster.node(2), &id, &supervisor_on_2).await?.0 == 503).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("a member without a majority kept taking a staff token: {e}"))?;

    // Node 3 was down during the upload: it learns the record from the log, and fetches
    // the bytes from node 2 by itself, since it holds the conversation's shard: nobody
    // has to ask it for the file first.
    let path = dir.path().join(format!("data/node-3/attachments/{id}"));
    assert!(!path.exists(), "node 3 missed the copy");
    cluster.restart(3).await?;
    let fetched_after = Instant::now();
    // The file is in place, and counted a moment after.
    eventually(Duration::from_secs(60), Duration::from_millis(200), || async {
        let (_, metrics) = cluster.node(3).api("GET", "/metrics", None, None).await?;
        let fetched = metrics.as_str().unwrap_or_default().lines().find_map(|l| l.strip_prefix("switchboard_files_fetched_total ")).and_then(|v| v.parse::<u64>().ok());
        Ok((path.exists() && fetched == Some(1)).then_some(()))
    })
    .await?;
    println!("node 3 had the file {} ms after it started", fetched_after.elapsed().as_millis());
    // The receiver is gone; the member that got the copy serves the file.
    let (status, bytes) = download(cluster.node(2), &id, &supervisor_on_2).await?;
    assert_eq!(status, 200, "the copy on node 2 is served");
    assert!(bytes == file, "node 2 serves the very bytes uploaded");
    assert!(std::fs::read(&path)? == file, "node 3 keeps the very bytes uploaded");
    let (status, bytes) = download(cluster.node(3), &id, &supervisor_on_3).await?;
    assert_eq!(status, 200, "node 3 serves the file");
    assert!(bytes == file);
    println!("conversation {conversation}: {} bytes kept by a member that never received the upload", file.len());
    Ok(())
}

/// A member down while a retention purge is committed applies it when it comes back
/// and deletes the purged conversation's files then, like the members that were up (not
/// an hour later, when the sweep for stray files would take them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_after_a_purge_deletes_the_purged_files_as_it_catches_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), 3).await?;
    let admin = cluster.node(1).login("admin").await?;
    let (mut ws, conversation, token) = cluster.node(1).client("Leaving a file").await?;
    let (status, body) = switchboard_chaos_tests::client_upload(cluster.node(1), &token, "scan.png", "image/png", &png(50_000)).await?;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    ws.send(&json!({"type": "send", "key": "k", "text": "see attached", "attachments": [id]})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "ack").await?;
    ws.send(&json!({"type": "close"})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "closed").await?;
    drop(ws);
    let file_on = |node: usize| dir.path().join(format!("data/node-{node}/attachments/{id}"));
    // Every member holds the file (node 3 fetches it if it was not pushed its copy).
    eventually(Duration::from_secs(60), Duration::from_millis(200), || async { Ok((1..=3).all(|n| file_on(n).exists()).then_some(())) }).await?;

    // The web channel keeps its closed conversations one day.
    let (_, channels) = cluster.node(1).api("GET", "/api/channels", Some(&admin), None).await?;
    let web = channels["channels"].as_array().and_then(|c| c.iter().find(|c| c["id"] == "web")).cloned().unwrap_or_default();
    let keep = json!({"kind": web["kind"], "name": web["name"], "default_group": web["default_group"], "retention_days": 1});
    let (status, reply) = cluster.node(1).api("PUT", "/api/channels/web", Some(&admin), Some(keep)).await?;
    assert_eq!(status, 200, "{reply}");

    // Node 3 is down while the purge, two days on, is committed by the other two.
    cluster.kill9(3).await?;
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 + 2 * 86_400_000;
    // The retention setting reaches the conversation's shard as a letter, which waits
    // for a new leader if node 3 led: the drill is asked again until the files go, as
    // the retention timer would run again.
    eventually(Duration::from_secs(30), Duration::from_millis(500), || async {
        let (status, reply) = cluster.node(1).api("POST", "/api/chaos/purge", Some(&admin), Some(json!({"as_of": later}))).await?;
        if status != 200 {
            println!("purge drill: {status} {reply}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok((!file_on(1).exists() && !file_on(2).exists()).then_some(()))
    })
    .await
        .map_err(|e| anyhow::anyhow!("the members up deleted the purged file: node 1 has it {}, node 2 {}: {e}", file_on(1).exists(), file_on(2).exists()))?;
    assert!(file_on(3).exists(), "node 3 was down: its copy is still there");

    // Back, node 3 applies the purge it missed, and its copy goes with it.
    cluster.restart(3).await?;
    let back = Instant::now();
    eventually(Duration::from_secs(20), Duration::from_millis(100), || async { Ok((!file_on(3).exists()).then_some(())) })
        .await
        .map_err(|e| anyhow::anyhow!("node 3 kept the file of a conversation it purged while catching up: {e}"))?;
    println!("conversation {conversation}: node 3 deleted the purged file {} ms after it started", back.elapsed().as_millis());
    let (status, _) = cluster.node(3).api("GET", &format!("/api/conversations/{conversation}"), Some(&admin), None).await?;
    assert_eq!(status, 404, "purged on node 3 too");
    Ok(())
}

/// What [`offer_on_a_follower`] set up.
struct OfferOnFollower {
    leader: usize,
    /// The follower alice's desk is on, and the other one (the visitor's).
    a: usize,
    b: usize,
    alice: WsClient,
    offer: serde_json::Value,
    conversation: u64,
    _client: WsClient,
}

/// On a cluster of three: the general group offers for `offer_timeout_ms`; alice is
/// online with her desk on one follower, and a visitor on the other follower has just
/// been offered to her.
async fn offer_on_a_follower(cluster: &Cluster, offer_timeout_ms: u64) -> anyhow::Result<OfferOnFollower> {
    let leader = cluster.leader().await?;
    let others: Vec<usize> = (1..=3).filter(|id| *id != leader).collect();
    let (a, b) = (others[0], others[1]);
    let admin = cluster.node(a).login("admin").await?;
    let body = json!({"name": "General", "offer_timeout_ms": offer_timeout_ms});
    let (status, body) = cluster.node(a).api("PUT", "/api/skill-groups/general", Some(&admin), Some(body)).await?;
    assert_eq!(status, 200, "{body}");
    let (mut alice, _) = cluster.node(a).operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (client, conversation, _) = cluster.node(b).client("Waiting").await?;
    let offer = alice.wait_for(WAIT, |v| v["kind"] == "offer").await?;
    assert_eq!(offer["conversation"].as_u64(), Some(conversation));
    Ok(OfferOnFollower { leader, a, b, alice, offer, conversation, _client: client })
}

/// An offer made under one leader expires under the next: the new leader's actors arm
/// the timer from the deadline stored in the state, and the conversation goes on to
/// the next operator (I4 across a failover). The operator is not set away (rules 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_made_before_a_failover_expires_after_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), 3).await?;
    let OfferOnFollower { leader, b, mut alice, conversation, _client, .. } = offer_on_a_follower(&cluster, 4000).await?;
    // Bob comes online only now, so the conversation can only reach him through the
    // expiry of alice's offer.
    let (mut bob, _) = cluster.node(b).operator("bob").await?;
    set_presence(&mut bob, "online").await?;

    // The routing shard's leader, where the offer was made, is killed: read again now,
    // in case the placement moved it while the offer was being made.
    let still_leads = cluster.leader().await? == leader;
    cluster.kill9(leader).await?;
    let expired = alice.wait_for(Duration::from_secs(15), |v| v["kind"] == "offer_withdrawn").await?;
    assert_eq!(expired["reason"], "expired", "{expired}");
    assert_eq!(expired["conversation"].as_u64(), Some(conversation));
    let next = bob.wait_for(WAIT, |v| v["kind"] == "offer").await?;
    assert_eq!(next["conversation"].as_u64(), Some(conversation), "the conversation went on to bob");
    // Rules 12: the offer was pending across the change of leader, so its expiry, on
    // time as it was, did not set alice away (a missed offer otherwise does).
    if !still_leads {
        println!("the routing shard's leadership moved off node {leader} before the kill: no change of leader to check alice's presence across");
        return Ok(());
    }
    let token = cluster.node(b).login("admin").await?;
    let (status, body) = cluster.node(b).api("GET", "/api/operators", Some(&token), None).await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    let alice_now = body["operators"].as_array().and_then(|ops| ops.iter().find(|o| o["id"] == "alice").cloned()).unwrap_or_default();
    assert_eq!(alice_now["presence"], "online", "an offer missed across a leader change does not set her away: {alice_now}");
    let away = alice.wait_for(Duration::from_millis(300), |v| v["kind"] == "presence" && v["status"] != "online").await;
    assert!(away.is_err(), "no change of presence reached her desk: {away:?}");
    Ok(())
}

/// A stall of the cluster is not the operator's fault (issue 9, item 7). The moment an
/// offer reaches alice, whose desk is on the third member, the leader and the other
/// follower are frozen (SIGSTOP) and she accepts. Nothing can commit: her accept waits
/// at the frozen leader, or at her own node while it knows no leader. The follower runs
/// again only after the offer's deadline, and a new leader is elected; her node says the
/// accept's outcome is unknown and her gateway sends the same accept again, stamped with
/// when it first arrived, or her node proposes it once it knows the new leader. The new
/// leader may expire the offer first: the accept still counts, she gets the conversation,
/// and the missed deadline does not leave her away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_sent_while_the_cluster_stalls_still_takes_the_offer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    let OfferOnFollower { leader, a, b, mut alice, offer, conversation, _client } = offer_on_a_follower(&cluster, 3000).await?;

    let signal = |sig: &'static str, node: usize| cluster.node(node).signal(sig);
    signal("-STOP", leader).await?;
    signal("-STOP", b).await?;
    let frozen = std::time::Instant::now();
    let answer = async {
        alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "late"})).await?;
        let deadline = offer["deadline"].as_u64().unwrap_or(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        anyhow::ensure!(now < deadline, "the accept was sent before the deadline");
        // Past the deadline, a majority again (the old leader stays frozen).
        tokio::time::sleep(Duration::from_millis(deadline - now + 500)).await;
        signal("-CONT", b).await?;
        let answer = alice.wait_for(Duration::from_secs(30), |v| v["ref"] == "late").await?;
        anyhow::Ok(answer)
    }
    .await;
    let answered_after = frozen.elapsed();
    signal("-CONT", b).await?;
    signal("-CONT", leader).await?;
    let answer = answer?;
    println!("accept answered {} ms after the cluster froze: {answer}", answered_after.as_millis());
    assert_eq!(answer["type"], "ok", "an accept sent before the deadline counts, whatever the cluster did meanwhile: {answer}");
    let assigned = alice.wait_for(WAIT, |v| v["kind"] == "assigned").await?;
    assert_eq!(assigned["conversation"].as_u64(), Some(conversation));
    // Whichever came first on the new leader, the accept or the expiry, ends the same.
    let expired = alice.wait_for(Duration::from_millis(10), |v| v["kind"] == "offer_withdrawn").await.is_ok();
    println!("the offer {} on the new leader before the accept", if expired { "expired" } else { "had not expired" });
    let (_, metrics) = cluster.node(a).api("GET", "/metrics", None, None).await?;
    let resent = metrics.as_str().unwrap_or_default().lines().find(|l| l.starts_with("switchboard_accepts_resent_total ")).map(str::to_owned);
    // Which way it went depends on whether her node had handed the accept to the frozen
    // leader before it saw it go (then its outcome is unknown and the gateway resends it)
    // or held it while it knew no leader: both end as above.
    println!("{} ({})", resent.as_deref().unwrap_or("no resend counter"), if resent.as_deref().is_some_and(|l| !l.ends_with(" 0")) { "the accept reached the new leader by a resend" } else { "her node held the accept until it knew the new leader" });
    assert!(resent.is_some(), "the node counts its resent accepts");
    // A desk that never heard the answer may send the accept again: it is hers, so `ok`.
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "again"})).await?;
    let again = alice.wait_for(WAIT, |v| v["ref"] == "again").await?;
    assert_eq!(again["type"], "ok", "{again}");

    let token = cluster.node(b).login("admin").await?;
    let alice_now = eventually(WAIT, Duration::from_millis(100), || async {
        let (status, body) = cluster.node(b).api("GET", "/api/operators", Some(&token), None).await?;
        anyhow::ensure!(status == 200, "{status} {body}");
        let alice = body["operators"].as_array().and_then(|ops| ops.iter().find(|o| o["id"] == "alice").cloned());
        Ok(alice.filter(|o| o["active"] == 1))
    })
    .await?;
    assert_eq!(alice_now["presence"], "online", "the missed deadline did not set her away: {alice_now}");
    assert_eq!(alice_now["load"], 1, "{alice_now}");
    Ok(())
}

/// What a supervisor on `node` sees: each of `conversations`' state and holder, who
/// waits in which queue, and each operator's presence and load.
async fn floor_seen(cluster: &Cluster, node: usize, conversations: &[u64]) -> anyhow::Result<Vec<Value>> {
    let supervisor = cluster.node(node).login("supervisor").await?;
    let mut seen = Vec::new();
    for id in conversations {
        let (status, conv) = cluster.node(node).api("GET", &format!("/api/conversations/{id}"), Some(&supervisor), None).await?;
        anyhow::ensure!(status == 200, "{status} {conv}");
        seen.push(json!({"conversation": id, "status": conv["status"]}));
    }
    let (_, queues) = cluster.node(node).api("GET", "/api/queues", Some(&supervisor), None).await?;
    for q in queues["queues"].as_array().into_iter().flatten() {
        let waiting: Vec<Value> = q["conversations"].as_array().into_iter().flatten().map(|c| json!([c["conversation"], c["state"]])).collect();
        seen.push(json!({"group": q["group"], "waiting": waiting}));
    }
    let (_, operators) = cluster.node(node).api("GET", "/api/operators", Some(&supervisor), None).await?;
    for o in operators["operators"].as_array().into_iter().flatten() {
        seen.push(json!({"operator": o["id"], "presence": o["presence"], "active": o["active"], "load": o["load"]}));
    }
    Ok(seen)
}

/// Every member stopped (SIGTERM) and started again: the cluster comes back as it was,
/// with its conversations, its queue, its assignments and its operators' load and
/// presence, and a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_stopped_and_started_comes_back_as_it_was() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), 3).await?;
    // Alice takes one conversation, then steps away; a second one waits in the queue.
    let (mut alice, _) = cluster.node(1).operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (served_ws, served, _) = cluster.node(3).client("Served").await?;
    let offer = alice.wait_for(WAIT, |v| v["kind"] == "offer" && v["conversation"] == served).await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "take"})).await?;
    let taken = alice.wait_for(WAIT, |v| v["ref"] == "take").await?;
    assert_eq!(taken["type"], "ok", "{taken}");
    set_presence(&mut alice, "away").await?;
    alice.close().await;
    drop(served_ws);
    let (queued_ws, queued, _) = cluster.node(1).client("Queued").await?;
    drop(queued_ws);
    let (mut ws, conversation, token) = cluster.node(2).client("Before").await?;
    let mut acked = Vec::new();
    for n in 0..5 {
        let key = format!("k{n}");
        ws.send(&json!({"type": "send", "key": key, "text": format!("before the stop {n}")})).await?;
        let ack = ws.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == key.as_str()).await?;
        acked.push(ack["seq"].as_u64().unwrap_or(0));
    }
    ws.close().await;
    // What a supervisor sees before the stop.
    cluster.settled(Duration::from_secs(20)).await?;
    let before = floor_seen(&cluster, 1, &[served, queued, conversation]).await?;
    let shown = |id: u64| before.iter().find(|v| v["conversation"] == id).map(|v| v["status"].clone()).unwrap_or_default();
    assert_eq!((shown(served)["state"].clone(), shown(served)["operator"].clone()), (json!("assigned"), json!("alice")), "{before:?}");
    assert_eq!(shown(queued)["state"], "queued", "{before:?}");
    for id in 1..=3 {
        cluster.stop(id).await?;
    }
    for id in 1..=3 {
        cluster.launch_again(id)?;
    }
    cluster.wait_started().await?;
    let leader = cluster.leader().await?;
    println!("node {leader} leads after the restart");
    // A node that had not heard of the last commit before the stop applies it once its
    // shard elects a leader again.
    cluster.settled(Duration::from_secs(20)).await?;
    for id in 1..=3 {
        assert_eq!(floor_seen(&cluster, id, &[served, queued, conversation]).await?, before, "node {id} shows the floor as it was before the stop");
    }
    for id in 1..=3 {
        let supervisor = cluster.node(id).login("supervisor").await?;
        let (status, conv) = cluster.node(id).api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
        assert_eq!(status, 200, "{conv}");
        let history = conv["history"].as_array().cloned().unwrap_or_default();
        for (n, seq) in acked.iter().enumerate() {
            assert_eq!(history.get((*seq - 1) as usize).map(|e| &e["key"]), Some(&json!(format!("k{n}"))), "node {id} kept message {n}");
        }
    }
    // The visitor resumes on any member and writes on.
    let mut ws = WsClient::connect(&cluster.node(3).public, "/ws/client", None).await?;
    ws.send(&json!({"type": "resume", "token": token, "last_seq": acked[4]})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    ws.send(&json!({"type": "send", "key": "after", "text": "after the restart"})).await?;
    let ack = ws.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "after").await?;
    assert!(ack["seq"].as_u64() > Some(acked[4]), "{ack}");
    ws.close().await;
    Ok(())
}

/// `cluster add-node` lays out a fourth node; started, it asks to join, catches up as a
/// learner and becomes a voter. `cluster remove-node` takes a node out: afterwards the
/// group commits with two of its three remaining voters, the removed one dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_running_cluster_and_another_leaves_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start_one_group(dir.path(), 3).await?;
    let (mut ws, conversation, token) = cluster.node(1).client("Early").await?;
    for n in 0..3 {
        let key = format!("early{n}");
        ws.send(&json!({"type": "send", "key": key, "text": "written before node 4 existed"})).await?;
        ws.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == key.as_str()).await?;
    }
    ws.close().await;

    // Every member holds every file of the one group: a file no record names (an upload
    // whose record never committed, written long ago) gives its disk back, an attachment
    // of as long ago stays (the drills look for strays every 5 s; a file is taken once
    // it is an hour old, so the test dates both back). Ids are looked at in order: when
    // the greatest is gone, the attachment's was looked at.
    let (status, body) = switchboard_chaos_tests::client_upload(cluster.node(1), &token, "scan.png", "image/png", &png(10_000)).await?;
    assert_eq!(status, 201, "{body}");
    let named = dir.path().join(format!("data/node-1/attachments/{}", body["id"].as_str().unwrap_or_default()));
    let unnamed = dir.path().join("data/node-1/attachments/ffffffffffffffffffffffffffffffff");
    std::fs::write(&unnamed, b"an upload whose record never committed")?;
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for path in [&named, &unnamed] {
        std::fs::File::options().append(true).open(path)?.set_modified(long_ago)?;
    }
    eventually(Duration::from_secs(60), Duration::from_millis(200), || async { Ok((!unnamed.exists()).then_some(())) })
        .await
        .map_err(|e| anyhow::anyhow!("node 1 keeps a file no record names: {e}"))?;
    assert!(named.exists(), "an attachment's file stays, however old");
    let written = std::fs::metadata(&named)?.modified()?;
    assert_eq!(written, long_ago, "never removed and fetched back");
    let (_, metrics) = cluster.node(1).api("GET", "/metrics", None, None).await?;
    let removed = metrics.as_str().unwrap_or_default().lines().find_map(|l| l.strip_prefix("switchboard_files_strays_removed_total ")).and_then(|v| v.parse::<u64>().ok());
    assert_eq!(removed, Some(1), "node 1 removed the one stray only");

    let added = cluster.add_node().await?;
    assert_eq!(added, 4);
    let voters = |status: &serde_json::Value| -> Vec<u64> {
        let mut ids: Vec<u64> = status["members"].as_array().into_iter().flatten().filter(|m| m["voter"] == true).filter_map(|m| m["id"].as_u64()).collect();
        ids.sort();
        ids
    };
    eventually(WAIT, Duration::from_millis(100), || async { Ok((voters(&cluster.status(1).await?) == [1, 2, 3, 4]).then_some(())) }).await?;
    // The newcomer holds what was written before it existed.
    let supervisor = cluster.node(4).login("supervisor").await?;
    let (status, conv) = cluster.node(4).api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    assert_eq!(status, 200, "{conv}");
    let keys: Vec<&str> = conv["history"].as_array().into_iter().flatten().filter_map(|e| e["key"].as_str()).collect();
    assert!(["early0", "early1", "early2"].iter().all(|k| keys.contains(k)), "node 4 has the early messages: {keys:?}");

    // Node 2 leaves, as an admin asks through node 4.
    cli(["cluster", "remove-node", "--addr", &cluster.node(4).private, "--id", "2"], &[("SWITCHBOARD_PASSWORD", &cluster.logins["admin"])]).await?;
    eventually(WAIT, Duration::from_millis(100), || async { Ok((voters(&cluster.status(4).await?) == [1, 3, 4]).then_some(())) }).await?;
    cluster.kill9(2).await?;
    // Two of the three voters left are enough, whichever of them dies next.
    let leader = cluster.leader().await?;
    let victim = [1, 3, 4].into_iter().find(|id| *id != leader && *id != 4).unwrap_or(1);
    cluster.kill9(victim).await?;
    let mut ws = WsClient::connect(&cluster.node(4).public, "/ws/client", None).await?;
    ws.send(&json!({"type": "resume", "token": token, "last_seq": 0})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "resumed").await?;
    ws.send(&json!({"type": "send", "key": "late", "text": "with nodes 2 and another gone"})).await?;
    let ack = ws.wait_for(Duration::from_secs(20), |v| v["type"] == "ack" && v["key"] == "late").await?;
    assert!(ack["seq"].as_u64().unwrap_or(0) > 3, "{ack}");
    ws.close().await;
    // Removing the group's last voters is refused with the reason.
    let admin = cluster.node(4).login("admin").await?;
    let (status, body) = cluster.node(4).api("DELETE", "/api/cluster/members/9", Some(&admin), None).await?;
    assert_eq!(status, 200, "removing a node that is not a member is a no-op: {body}");
    let operator = cluster.node(4).login("alice").await?;
    let (status, _) = cluster.node(4).api("DELETE", "/api/cluster/members/1", Some(&operator), None).await?;
    assert_eq!(status, 403, "only an admin changes the cluster");
    Ok(())
}

/// With one voter dead, taking another voter out would leave a group whose majority
/// needs the dead one: refused with the reason, and the group goes on committing. The
/// group is idle when it is asked (the dead voter still shows every entry as its own),
/// so the log alone does not tell; that the voter no longer answers does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_whose_majority_needs_a_dead_voter_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start_one_group(dir.path(), 3).await?;
    let leader = cluster.leader().await?;
    let (dead, removed) = match leader {
        1 => (3, 2),
        2 => (3, 1),
        _ => (2, 1),
    };
    let (mut ws, _, _) = cluster.node(leader).client("Idle").await?;
    ws.send(&json!({"type": "send", "key": "before", "text": "before the node died"})).await?;
    ws.wait_for(WAIT, |v| v["type"] == "ack" && v["key"] == "before").await?;
    cluster.kill9(dead).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let admin = cluster.node(leader).login("admin").await?;
    let (status, body) = cluster.node(leader).api("DELETE", &format!("/api/cluster/members/{removed}"), Some(&admin), None).await?;
    assert_ne!(status, 200, "node {removed} removed while node {dead} is dead: {body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("answer now"), "{status} {body}");
    // Nothing was changed: the two live voters of three still commit.
    ws.send(&json!({"type": "send", "key": "after", "text": "after the refused removal"})).await?;
    ws.wait_for(Duration::from_secs(20), |v| v["type"] == "ack" && v["key"] == "after").await?;
    ws.close().await;
    Ok(())
}

/// A node whose certificate comes from another CA cannot join: the members refuse its
/// handshake and say so in their logs, and it never becomes a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_certificate_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    let binary = switchboard_chaos_tests::binary()?;
    cli(["cluster".as_ref(), "add-node".as_ref(), "--dir".as_ref(), dir.path().as_os_str()], &[]).await?;
    // The same layout, but a certificate issued by a CA of its own.
    let foreign = dir.path().join("foreign-certs");
    cli(["certs".as_ref(), "--name".as_ref(), "node-4".as_ref(), "--dir".as_ref(), foreign.as_os_str()], &[]).await?;
    let config = dir.path().join("node-4.toml");
    let text = std::fs::read_to_string(&config)?.replace("certs_dir = \"certs\"", &format!("certs_dir = {:?}", foreign.display().to_string()));
    std::fs::write(&config, text)?;
    let intruder = switchboard_chaos_tests::Dev::launch(binary, "node", &dir.path().join("data/node-4"), "127.0.0.1:0", "127.0.0.1:0", &["--config", config.to_str().unwrap_or_default()])?;

    let log_of = |id: usize| std::fs::read_to_string(dir.path().join(format!("data/node-{id}/node.log"))).unwrap_or_default();
    eventually(Duration::from_secs(20), Duration::from_millis(200), || async {
        let refused = (1..=3).any(|id| log_of(id).contains("refused a peer's QUIC handshake"));
        let told = log_of(4).contains("asking to join the cluster");
        Ok((refused && told).then_some(()))
    })
    .await?;
    let status = cluster.status(1).await?;
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3), "the intruder is no member: {status}");
    assert!(intruder.pid().is_some(), "it is still trying, not admitted");
    intruder.kill().await?;
    Ok(())
}

/// A node removed from the cluster is admitted to no group again, whatever certificate
/// it holds (routing rules 19): `cluster add-node` lays out node 4, an admin removes id
/// 4 before it ever starts (a machine retired with its files, or a layout given up), and
/// node 4, started with its certificate from the cluster's CA, is refused by name and
/// stops, never a member. Before, any node holding a certificate for an id was let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_not_admitted_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    cli(["cluster".as_ref(), "add-node".as_ref(), "--dir".as_ref(), dir.path().as_os_str()], &[]).await?;
    let admin = cluster.node(2).login("admin").await?;
    let (status, body) = cluster.node(2).api("DELETE", "/api/cluster/members/4", Some(&admin), None).await?;
    assert_eq!(status, 200, "removing an id that never joined: {body}");
    let config = dir.path().join("node-4.toml");
    let config = config.to_str().unwrap_or_default();
    let starting = switchboard_chaos_tests::Dev::launch(switchboard_chaos_tests::binary()?, "node", &dir.path().join("data/node-4"), "127.0.0.1:0", "127.0.0.1:0", &["--config", config])?;
    let log = dir.path().join("data/node-4/node.log");
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = tokio::time::timeout(Duration::from_secs(60), starting.ready()).await;
    assert!(!matches!(ready, Ok(Ok(_))), "node 4 was let in");
    assert!(said().contains("was removed from this cluster"), "node 4 says why it stopped: {}", said());
    let status = cluster.status(1).await?;
    assert!(status["members"].as_array().is_some_and(|m| m.iter().all(|m| m["id"] != 4)), "node 4 is no member: {status}");
    Ok(())
}

/// A login is checked against every write acknowledged before it, on whichever node it
/// arrives: a follower is frozen (SIGSTOP) while a user is created and another's
/// password changed through the other follower; the moment it runs again (SIGCONT), far
/// behind, a login there already sees both. (Freezing the leader instead would test a
/// failover, which other tests do: a write in flight then answers `unavailable`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_a_lagging_node_sees_what_another_node_wrote() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    let leader = cluster.leader().await?;
    let mut followers = (1..=3).filter(|id| *id != leader);
    let (lagging, writer) = (followers.next().unwrap_or(3), followers.next().unwrap_or(1));
    let admin = cluster.node(writer).login("admin").await?;
    let put = |login: &'static str, password: &'static str| {
        let node = cluster.node(writer);
        let admin = admin.clone();
        async move {
            // A leader change under the writes answers `unavailable` (outcome unknown):
            // the protocol's answer is to send it again, which an upsert allows.
            let body = json!({"password": password, "role": "supervisor"});
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (status, answer) = node.api("PUT", &format!("/api/users/{login}"), Some(&admin), Some(body.clone())).await?;
                if status == 200 {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(status == 503 && answer["code"] == "unavailable" && tokio::time::Instant::now() < deadline, "{status} {answer}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let login = |login: &'static str, password: &'static str| {
        let addr = cluster.node(lagging).private.clone();
        async move {
            let (status, _) = switchboard_gateway::client::http_json(&addr, "POST", "/api/login", None, Some(&json!({"login": login, "password": password}))).await?;
            anyhow::Ok(status)
        }
    };
    put("veteran", "old-password-1").await?;
    eventually(WAIT, Duration::from_millis(50), || async { Ok((login("veteran", "old-password-1").await? == 200).then_some(())) }).await?;

    let signal = |sig: &'static str| cluster.node(lagging).signal(sig);
    signal("-STOP").await?;
    let frozen = async {
        put("newcomer", "new-password-1").await?;
        put("veteran", "new-password-2").await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        anyhow::Ok(())
    }
    .await;
    signal("-CONT").await?;
    frozen?;
    assert_eq!(login("newcomer", "new-password-1").await?, 200, "the user created while the follower was frozen logs in there at once");
    assert_eq!(login("veteran", "old-password-1").await?, 401, "the old password is refused there at once");
    assert_eq!(login("veteran", "new-password-2").await?, 200);
    Ok(())
}

/// Certificates are rotated without downtime, the CA included, by three rolling
/// restarts (deploy/README.md): trust the new CA beside the old, present certificates
/// from the new CA, stop trusting the old. A visitor writes all along; nothing is lost,
/// and at the end a certificate from the old CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_the_ca_rotate_without_downtime() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), 3).await?;
    let certs = dir.path().join("certs");
    let fresh = dir.path().join("certs-new");
    let names = ["certs", "--name", "node-1", "--name", "node-2", "--name", "node-3", "--dir"];
    cli(names.iter().map(std::ffi::OsStr::new).chain([fresh.as_os_str()]), &[]).await?;
    let old_ca = std::fs::read_to_string(certs.join("ca.pem"))?;
    let new_ca = std::fs::read_to_string(fresh.join("ca.pem"))?;

    let (mut ws, conversation, token) = cluster.node(1).client("Through the rotation").await?;
    let mut on = 1;
    let mut acked = Vec::new();
    let mut n = 0;
    let steps: [(&str, Box<dyn Fn() -> anyhow::Result<()>>); 3] = [
        ("trust both CAs", Box::new(|| Ok(std::fs::write(certs.join("ca.pem"), format!("{old_ca}{new_ca}"))?))),
        (
            "present certificates from the new CA",
            Box::new(|| {
                for i in 1..=3 {
                    for ext in ["pem", "key"] {
                        std::fs::copy(fresh.join(format!("node-{i}.{ext}")), certs.join(format!("node-{i}.{ext}")))?;
                    }
                }
                Ok(())
            }),
        ),
        ("trust only the new CA", Box::new(|| Ok(std::fs::write(certs.join("ca.pem"), &new_ca)?))),
    ];
    for (what, change) in steps {
        change()?;
        for id in 1..=3 {
            // The visitor's node restarts too: it resumes on another, as the widget does.
            if id == on {
                ws.close().await;
                on = if on == 3 { 1 } else { on + 1 };
                ws = WsClient::connect(&cluster.node(on).public, "/ws/client", None).await?;
                ws.send(&json!({"type": "resume", "token": token, "last_seq": 0})).await?;
                ws.wait_for(WAIT, |v| v["type"] == "resumed").await?;
            }
            cluster.stop(id).await?;
            cluster.restart(id).await?;
            // A write goes through with the restarted node back in the group.
            let key = format!("r{n}");
            n += 1;
            loop {
                ws.send(&json!({"type": "send", "key": key, "text": what})).await?;
                let answer = ws.wait_for(Duration::from_secs(20), |v| (v["type"] == "ack" && v["key"] == key.as_str()) || (v["type"] == "error" && v["ref"] == key.as_str())).await?;
                if answer["type"] == "ack" {
                    acked.push((key.clone(), answer["seq"].as_u64().unwrap_or(0)));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let leader = cluster.leader().await?;
            let target = cluster.status(leader).await?;
            eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
                Ok(switchboard_chaos_tests::caught_up(&cluster.status(id).await?, &target).then_some(()))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{what}: node {id} did not catch up after its restart: {e}"))?;
        }
    }
    ws.close().await;
    // A member serves reads from its own replica, which may lag by a few entries
    // (ARCHITECTURE.md): node 2 is read once it applied the last acknowledged message.
    cluster.settled(Duration::from_secs(20)).await?;
    let supervisor = cluster.node(2).login("supervisor").await?;
    let (_, conv) = cluster.node(2).api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let history = conv["history"].as_array().cloned().unwrap_or_default();
    assert!(acked.iter().all(|(_, seq)| (1..=history.len() as u64).contains(seq)), "every acknowledged message is in node 2's history: {acked:?}, {} entries", history.len());
    for (key, seq) in &acked {
        assert_eq!(history[(*seq - 1) as usize]["key"], key.as_str(), "{key} kept through the rotation");
    }
    assert_eq!(acked.len(), 9);

    // A node still holding a certificate from the old CA is refused now.
    cli(["cluster".as_ref(), "add-node".as_ref(), "--dir".as_ref(), dir.path().as_os_str()], &[]).await?;
    let log_of = |id: usize| std::fs::read_to_string(dir.path().join(format!("data/node-{id}/node.log"))).unwrap_or_default();
    let before = (1..=3).map(|id| log_of(id).matches("refused a peer's QUIC handshake").count()).sum::<usize>();
    // add-node issued node-4 from certs/ca.key, the old CA's key.
    let config = dir.path().join("node-4.toml");
    let old = switchboard_chaos_tests::Dev::launch(switchboard_chaos_tests::binary()?, "node", &dir.path().join("data/node-4"), "127.0.0.1:0", "127.0.0.1:0", &["--config", config.to_str().unwrap_or_default()])?;
    eventually(Duration::from_secs(20), Duration::from_millis(200), || async {
        let after = (1..=3).map(|id| log_of(id).matches("refused a peer's QUIC handshake").count()).sum::<usize>();
        Ok((after > before).then_some(()))
    })
    .await?;
    assert_eq!(cluster.status(1).await?["members"].as_array().map(Vec::len), Some(3));
    old.kill().await?;
    Ok(())
}

/// A fourth node joins while a visitor writes, and leaves again while they write: the
/// visitor sees no error and no pause worth a retry, and every message is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_leaves_under_traffic_without_a_client_noticing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start_one_group(dir.path(), 3).await?;
    let (ws, conversation, _) = cluster.node(1).client("Writing through it all").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let shared: Shared = Arc::default();
    let run = ClientRun { seen: Vec::new(), next: 0, lost: false, retried: 0, acks: Vec::new() };
    let writer = tokio::spawn(client_loop(ws, conversation, run, shared.clone(), stop.clone()));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let added = cluster.add_node().await?;
    let voters = |status: &serde_json::Value| status["members"].as_array().into_iter().flatten().filter(|m| m["voter"] == true).count();
    eventually(WAIT, Duration::from_millis(100), || async { Ok((voters(&cluster.status(1).await?) == 4).then_some(())) }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cli(["cluster", "remove-node", "--addr", &cluster.node(2).private, "--id", &added.to_string()], &[("SWITCHBOARD_PASSWORD", &cluster.logins["admin"])]).await?;
    eventually(WAIT, Duration::from_millis(100), || async { Ok((voters(&cluster.status(1).await?) == 3).then_some(())) }).await?;
    cluster.kill9(added).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let run = writer.await?;
    assert!(!run.lost, "the visitor's socket stayed open");
    assert_eq!(run.retried, 0, "no command was refused while the membership changed");
    assert!(contiguous(&run.seen), "no gap, no duplicate: {:?}", run.seen);
    let gaps = run.acks.windows(2).map(|w| w[1].duration_since(w[0])).max().unwrap_or_default();
    println!("{} messages acknowledged while node {added} joined and left; longest gap between acks {gaps:?}", run.acks.len());
    let supervisor = cluster.node(3).login("supervisor").await?;
    let (_, conv) = cluster.node(3).api("GET", &format!("/api/conversations/{conversation}"), Some(&supervisor), None).await?;
    let history = conv["history"].as_array().cloned().unwrap_or_default();
    let observed = std::mem::take(&mut *shared.lock().unwrap());
    for ((_, key), seq) in &observed.acked {
        assert_eq!(history[(*seq - 1) as usize]["key"], key.as_str(), "{key} kept");
    }
    Ok(())
}

/// `switchboard dev --nodes 3`: three node processes behind a gateway on the listeners
/// `dev` was given, the demo loaded once, a node that dies started again by `dev`, and
/// none left behind when `dev` stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_three_nodes_runs_a_local_cluster_and_restarts_a_node_that_dies() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let base = switchboard_chaos_tests::free_port_block(4)?;
    let (public, private) = (format!("127.0.0.1:{base}"), format!("127.0.0.1:{}", base + 1));
    let mut dev = switchboard_chaos_tests::Dev::launch(switchboard_chaos_tests::binary()?, "dev", &data, &public, &private, &["--nodes", "3"])?.ready().await?;
    assert_eq!(dev.public, public, "the gateway takes the listeners dev was given");
    let node = |i: u16| format!("127.0.0.1:{}", base + 1 + 10 * i);
    let (_, view) = dev.api("GET", "/api/gateway", None, None).await?;
    assert_eq!(view["members"].as_array().map(Vec::len), Some(3), "the gateway knows the three nodes: {view}");
    let status = |addr: String| async move {
        let (code, body) = switchboard_gateway::client::http_json(&addr, "GET", "/api/cluster", None, None).await?;
        anyhow::ensure!(code == 200, "{body}");
        anyhow::Ok(body)
    };
    let first = status(node(1)).await?;
    assert_eq!(first["members"].as_array().map(Vec::len), Some(3), "{first}");
    // The demo works through the gateway and through any node: a visitor through the
    // gateway, alice on node 3.
    let token = dev.login("alice").await?;
    let mut alice = WsClient::connect(&node(3), &format!("/ws/operator?token={token}"), None).await?;
    alice.wait_for(WAIT, |v| v["type"] == "hello").await?;
    set_presence(&mut alice, "online").await?;
    let (_client, conversation, _) = dev.client("Visitor").await?;
    let offer = alice.wait_for(WAIT, |v| v["kind"] == "offer").await?;
    assert_eq!(offer["conversation"].as_u64(), Some(conversation));
    alice.close().await;

    // Node 2 dies; dev starts it again and it rejoins.
    let pattern = dir.path().join("data/cluster/node-2.toml").display().to_string();
    let pid = String::from_utf8(tokio::process::Command::new("pgrep").args(["-f", &pattern]).output().await?.stdout)?;
    let pid = pid.split_whitespace().next().ok_or_else(|| anyhow::anyhow!("node 2's process not found"))?.to_owned();
    assert!(tokio::process::Command::new("kill").args(["-KILL", &pid]).status().await?.success());
    eventually(Duration::from_secs(30), Duration::from_millis(200), || async {
        let back = String::from_utf8(tokio::process::Command::new("pgrep").args(["-f", &pattern]).output().await?.stdout)?;
        let restarted = back.split_whitespace().any(|p| p != pid);
        Ok((restarted && status(node(2)).await.is_ok_and(|s| s["leader"].as_u64().is_some())).then_some(()))
    })
    .await?;

    dev.terminate().await?;
    let left = tokio::process::Command::new("pgrep").args(["-f", &dir.path().display().to_string()]).output().await?;
    assert!(left.stdout.is_empty(), "processes left behind: {}", String::from_utf8_lossy(&left.stdout));
    Ok(())
}

/// A supervisor watching the floor through a follower sees it change as conversations
/// arrive through another node (followers run no floor actor; applied entries wake it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_updates_on_a_follower() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    let leader = cluster.leader().await?;
    let others: Vec<usize> = (1..=3).filter(|id| *id != leader).collect();
    let supervisor = cluster.node(others[0]).login("supervisor").await?;
    let mut floor = WsClient::connect(&cluster.node(others[0]).private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    let (_client, _, _) = cluster.node(others[1]).client("Waiting").await?;
    let general = |v: &serde_json::Value| v["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general")).cloned();
    floor.wait_for(WAIT, |v| v["type"] == "floor" && general(v).is_some_and(|g| g["waiting"] == 1)).await?;
    floor.close().await;
    Ok(())
}

/// Typing and read marks are not committed: they go from one socket to another as they
/// happen. A visitor on one node and their operator on another still see each other
/// type and read: the node that hears a signal hands it to the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_read_marks_reach_a_socket_on_another_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3).await?;
    let (mut alice, _) = cluster.node(1).operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (mut visitor, conversation, _) = cluster.node(2).client("Ann").await?;
    visitor.send(&json!({"type": "send", "key": "c-1", "text": "Is anyone there?"})).await?;
    visitor.wait_for(ACK_WAIT, |v| v["type"] == "ack" && v["key"] == "c-1").await?;
    let offer = alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == conversation).await?;
    alice.send(&json!({"type": "accept", "offer": offer["offer"], "ref": "accept"})).await?;
    alice.wait_for(WAIT, |v| v["type"] == "event" && v["kind"] == "assigned" && v["conversation"] == conversation).await?;

    // The visitor types (node 2): alice hears it (node 1). Typing is sent again until
    // the holder is known where the visitor's socket is (routing's state on node 2).
    let mut heard = false;
    for _ in 0..50 {
        visitor.send(&json!({"type": "typing"})).await?;
        if alice.wait_for(Duration::from_millis(300), |v| v["type"] == "typing" && v["from"] == "client" && v["conversation"] == conversation).await.is_ok() {
            heard = true;
            break;
        }
    }
    assert!(heard, "alice on node 1 never saw the visitor on node 2 type");

    // Alice types and reads (node 1): the visitor sees both (node 2).
    let mut seen = false;
    for _ in 0..50 {
        alice.send(&json!({"type": "typing", "conversation": conversation})).await?;
        if visitor.wait_for(Duration::from_millis(300), |v| v["type"] == "typing" && v["from"] == "operator").await.is_ok() {
            seen = true;
            break;
        }
    }
    assert!(seen, "the visitor on node 2 never saw alice on node 1 type");
    alice.send(&json!({"type": "read", "conversation": conversation, "upto": 1})).await?;
    let read = visitor.wait_for(WAIT, |v| v["type"] == "read" && v["by"] == "operator").await?;
    assert_eq!(read["conversation"].as_u64(), Some(conversation), "{read}");
    Ok(())
}

/// A supervisor whose socket is on a member that does not lead sees a waiting
/// conversation cross its group's SLA as it happens, like one on the leader (whose
/// group actor wakes the floor): every replica's floor wakes itself at the next
/// crossing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_s_floor_shows_a_wait_crossing_the_sla() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = switchboard_chaos_tests::Cluster::start_one_group(dir.path(), 3).await?;
    let leader = cluster.leader().await?;
    let follower = if leader == 1 { 2 } else { 1 };
    let on_leader = cluster.node(leader);
    let admin = on_leader.login("admin").await?;
    let (status, body) = on_leader
        .api("PUT", "/api/skill-groups/general", Some(&admin), Some(serde_json::json!({"name": "General", "sla_ms": 1500})))
        .await?;
    anyhow::ensure!(status == 200, "set sla: {status} {body}");
    cluster.settled(Duration::from_secs(10)).await?;
    let node = cluster.node(follower);
    let supervisor = node.login("supervisor").await?;
    let mut floor = switchboard_gateway::client::WsClient::connect(&node.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let (_client, _conversation, _) = node.client("Ann").await?;
    let general = |v: &serde_json::Value| v["queues"].as_array().and_then(|q| q.iter().find(|g| g["group"] == "general")).cloned();
    let within = floor.wait_for(switchboard_chaos_tests::WAIT, |v| v["type"] == "floor" && general(v).is_some_and(|g| g["waiting"] == 1)).await?;
    assert_eq!(general(&within).unwrap_or_default()["within_sla"], 1);
    floor
        .wait_for(Duration::from_secs(5), |v| v["type"] == "floor" && general(v).is_some_and(|g| g["waiting"] == 1 && g["within_sla"] == 0))
        .await
        .map_err(|e| anyhow::anyhow!("node {follower} (leader {leader}) never showed the wait crossing 1.5 s: {e}"))?;
    Ok(())
}
