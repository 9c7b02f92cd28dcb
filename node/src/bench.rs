//! `switchboard bench`: starts a real `switchboard dev` process on a fresh data folder,
//! drives client and operator sessions over real sockets, and reports latency from a
//! client's send to the operator's socket, throughput, and idle-session memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde_json::{json, Value};
use switchboard_gateway::client::{http_json, Incoming, WsClient};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Client sessions sending messages.
    #[arg(long, default_value_t = 100)]
    pub(crate) clients: usize,
    /// Operator sessions answering them.
    #[arg(long, default_value_t = 10)]
    pub(crate) operators: usize,
    /// Total client messages per second.
    #[arg(long, default_value_t = 500)]
    pub(crate) rate: u32,
    /// Seconds of steady load.
    #[arg(long, default_value_t = 20)]
    pub(crate) duration: u64,
    /// Idle client sessions opened to measure memory per session (0 skips it).
    #[arg(long, default_value_t = 2000)]
    pub(crate) idle_sessions: usize,
    /// Data folder for the benchmarked node (default: a fresh temporary one).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Closed loop instead of a paced rate: every client keeps one message in flight,
    /// sending the next as soon as the ack of the last is back (but no faster than the
    /// client socket's sustained frame rate), for `--duration` seconds.
    #[arg(long)]
    pub(crate) saturate: bool,
    /// Soak instead: `--clients` visitors each start a conversation, write 20 messages
    /// (one in flight), close it and start again, until this many messages are acked;
    /// then the node is restarted on its data folder and timed to ready.
    #[arg(long)]
    pub(crate) soak: Option<u64>,
    /// An extra argument for the benchmarked `switchboard dev` (repeat for several),
    /// e.g. `--node-arg=--snapshot-every --node-arg=100000`.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub(crate) node_args: Vec<String>,
    /// Benchmark a local cluster of this many `switchboard node` processes instead of
    /// one `dev` node: clients and operators are spread over every node's listeners.
    #[arg(long, default_value_t = 1)]
    pub(crate) nodes: usize,
    /// With `--nodes 3` or more: kill a leader with SIGKILL this many times under a
    /// closed-loop load (restarting it each time), and report the recovery each client
    /// saw and whether every acknowledged message is in its conversation. On a split
    /// cluster each kill takes the node leading the most conversation shards.
    #[arg(long)]
    pub(crate) kill_leader: Option<u32>,
    /// With `--nodes`: put a standalone gateway in front of the nodes, as `dev --nodes`
    /// does, and connect every client and operator to it instead of to the nodes.
    #[arg(long)]
    pub(crate) gateway: bool,
    /// The routing core alone at issue 10's scale (1,000 operators in 50 groups, all
    /// full, 10,000 queued with priorities): this many freed-slot cycles, timed.
    #[arg(long)]
    pub(crate) routing: Option<usize>,
    /// The same scale through a real node and real sockets: this many freed slots, each
    /// timed from an operator's close to the next offer on their socket (`--operators`
    /// defaults to 1,000 and `--clients`, the customers waiting, to 10,000 here).
    #[arg(long)]
    pub(crate) routing_live: Option<usize>,
    /// Messenger channels (issue 11's budgets): this many seconds of Telegram webhooks
    /// at `--rate` (default here 1,000/s), each timed to the operator's socket, then as
    /// many seconds of operators' replies at `--outbound-rate`, each timed from its
    /// commit to a fake Channel API adapter.
    #[arg(long)]
    pub(crate) channels: Option<u64>,
    /// Operators' replies a second in `--channels`.
    #[arg(long, default_value_t = 2500)]
    pub(crate) outbound_rate: u32,
    /// ADR 0006's split on real Raft groups in this process, without sockets: the
    /// metadata group, one routing shard and this many conversation shards; `--clients` conversations are
    /// started, offered and accepted across them, then each keeps one message in
    /// flight for `--duration` seconds. With `--nodes N`, the groups are replicated on N
    /// members in this process.
    #[arg(long)]
    pub(crate) split: Option<u64>,
    /// The benchmarked node (or each node of `--nodes`) runs ADR 0006's split with this
    /// many conversation shards (`dev --shards`, `cluster init --shards`), through the
    /// same sockets; operators follow it with protocol 2. One node: one group unless
    /// given; `--nodes`: 4 unless given, as `cluster init`; 0 keeps one group.
    #[arg(long)]
    pub(crate) shards: Option<u64>,
}

pub(crate) struct Child {
    process: tokio::process::Child,
    pub(crate) public: String,
    pub(crate) private: String,
    pub(crate) logins: HashMap<String, String>,
    data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// Every simulated visitor comes from 127.0.0.1: the per-address budgets that exist to
/// stop one real address from flooding a node are lifted for the benchmarked nodes.
pub(crate) const OPEN_BUDGETS: &[&str] = &[
    "--starts-per-minute",
    "1000000",
    "--client-messages-per-minute",
    "100000000",
    "--client-sockets-per-address",
    "1000000",
    "--conversation-messages-per-minute",
    "100000000",
    "--max-connections-per-address",
    "1000000",
    "--max-connections",
    "1000000",
];

pub(crate) async fn spawn_node(args: &BenchArgs) -> anyhow::Result<Child> {
    let (dir, data_dir) = match &args.data_dir {
        Some(d) => (None, d.clone()),
        None => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().to_path_buf();
            (Some(dir), path)
        }
    };
    let exe = std::env::current_exe()?;
    let mut process = tokio::process::Command::new(exe)
        .args(["dev", "--public-addr", "127.0.0.1:0", "--private-addr", "127.0.0.1:0"])
        .args(OPEN_BUDGETS)
        .arg("--data-dir")
        .arg(&data_dir)
        .args(&args.node_args)
        .args(args.shards.filter(|n| *n > 0).map(|n| vec!["--shards".to_string(), n.to_string()]).unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("start switchboard dev")?;
    let stdout = process.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut public, mut private) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await??.ok_or_else(|| anyhow!("node exited"))?;
        if let Some(rest) = line.strip_prefix("public listener: http://") {
            public = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("private listener: http://") {
            private = rest.split_whitespace().next().map(str::to_owned);
        }
        if line == "ready" {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let logins: HashMap<String, String> = serde_json::from_slice(&std::fs::read(data_dir.join(crate::demo::LOGINS_FILE))?)?;
    Ok(Child {
        process,
        public: public.ok_or_else(|| anyhow!("no public address printed"))?,
        private: private.ok_or_else(|| anyhow!("no private address printed"))?,
        logins,
        data_dir,
        _dir: dir,
    })
}

pub(crate) async fn login(private: &str, login: &str, password: &str) -> anyhow::Result<String> {
    // 503 `unavailable` (the node cannot confirm its logins are current: an election)
    // is sent again, for up to 10 s.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_json(private, "POST", "/api/login", None, Some(&json!({"login": login, "password": password}))).await?;
        if status == 503 && body["code"] == "unavailable" && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if status != 200 {
            bail!("login {login}: {status} {body}");
        }
        return body["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no token"));
    }
}

pub(crate) async fn put(private: &str, token: &str, path: &str, body: Value) -> anyhow::Result<()> {
    let (status, reply) = http_json(private, "PUT", path, Some(token), Some(&body)).await?;
    if status != 200 {
        bail!("PUT {path}: {status} {reply}");
    }
    Ok(())
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Paced runs at or under this rate also time the disk's sync alone (`sync_floor`).
const SYNC_FLOOR_MAX_RATE: u32 = 100;
/// About one small log entry (a client message of the bench with its envelope).
const SYNC_FLOOR_RECORD: usize = 256;

/// `samples` appends of `SYNC_FLOOR_RECORD` bytes to a scratch file in `dir`, each
/// followed by `fdatasync` and then a pause of `every`, as the log's flusher does for a
/// lone entry; returns the syncs' durations, sorted. The file is removed after.
fn sync_floor(dir: &std::path::Path, samples: usize, every: Duration) -> anyhow::Result<Vec<Duration>> {
    use std::io::Write;
    let path = dir.join("bench-sync-floor");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path).context("open the sync-floor scratch file")?;
    let record = [b'x'; SYNC_FLOOR_RECORD];
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        file.write_all(&record)?;
        let started = Instant::now();
        file.sync_data()?;
        times.push(started.elapsed());
        std::thread::sleep(every);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    times.sort();
    Ok(times)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub(crate) type Pending = Arc<Mutex<HashMap<String, Instant>>>;

/// The few fields the bench's load reads of a server frame, parsed without building a
/// `Value` (the load runs on the machine it measures: its parsing is CPU the nodes do
/// not get). Other fields are skipped.
#[derive(serde::Deserialize)]
pub(crate) struct Head<'a> {
    #[serde(rename = "type", borrow, default)]
    pub ty: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    pub key: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub code: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pub offer: Option<Value>,
    /// An error's `ref`: a message's key or an offer's id.
    #[serde(rename = "ref", default)]
    pub reference: Option<Value>,
    #[serde(borrow, default)]
    pub entry: Option<EntryHead<'a>>,
}

#[derive(serde::Deserialize)]
pub(crate) struct EntryHead<'a> {
    #[serde(borrow, default)]
    pub from: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub key: Option<std::borrow::Cow<'a, str>>,
}

/// A frame's text, whether it came unparsed (after `WsClient::keep_text`) or, received
/// before that, as a `Value`. None for a close.
pub(crate) fn frame_text(incoming: Incoming) -> Option<std::borrow::Cow<'static, str>> {
    match incoming {
        Incoming::Text(t) => Some(t.into()),
        Incoming::Json(v) => Some(v.to_string().into()),
        Incoming::Closed { .. } => None,
    }
}

/// Bytes under a folder, walked recursively.
pub(crate) fn folder_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => folder_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub(crate) fn print_latencies(label: &str, sorted: &[Duration]) {
    println!(
        "  {label} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(sorted, 50.0).as_secs_f64() * 1e3,
        percentile(sorted, 90.0).as_secs_f64() * 1e3,
        percentile(sorted, 99.0).as_secs_f64() * 1e3,
        sorted.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}

/// Messages a soak visitor writes before closing and starting anew.
const SOAK_CONVERSATION_MESSAGES: u64 = 20;

/// The soak: visitors cycle through conversations until `total` messages are acked,
/// printing every tenth of the way throughput, RSS and the data folder's size.
async fn soak(args: &BenchArgs, child: &Child, total: u64, pid: u32) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let acked = Arc::new(AtomicU64::new(0));
    let text = "x".repeat(200);
    let min_gap = Duration::from_secs_f64(1.0 / f64::from(CLIENT_SUSTAINED_FRAMES_PER_S));
    println!("bench: soak, {} visitors, {SOAK_CONVERSATION_MESSAGES} messages of 200 characters a conversation, {total} messages", args.clients);
    let mut visitors = Vec::new();
    for v in 0..args.clients {
        let (public, acked, text) = (child.public.clone(), acked.clone(), text.clone());
        visitors.push(tokio::spawn(async move {
            let mut round = 0u64;
            while acked.load(Relaxed) < total {
                let Ok(mut ws) = WsClient::connect(&public, "/ws/client", None).await else { return };
                if ws.send(&json!({"type": "start", "channel": "bench", "name": "Soak"})).await.is_err()
                    || ws.wait_for(Duration::from_secs(30), |f| f["type"] == "started").await.is_err()
                {
                    return;
                }
                for n in 0..SOAK_CONVERSATION_MESSAGES {
                    let sent = Instant::now();
                    let key = format!("s{v}-{round}-{n}");
                    if ws.send(&json!({"type": "send", "key": key, "text": text})).await.is_err() {
                        return;
                    }
                    if ws.wait_for(Duration::from_secs(30), |f| f["type"] == "ack" && f["key"] == key.as_str()).await.is_err() {
                        return;
                    }
                    ws.clear_skipped();
                    acked.fetch_add(1, Relaxed);
                    if let Some(wait) = (sent + min_gap).checked_duration_since(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let _ = ws.send(&json!({"type": "close"})).await;
                ws.close().await;
                round += 1;
            }
        }));
    }
    let started = Instant::now();
    let (mut last_count, mut last_at) = (0u64, Instant::now());
    let step = (total / 10).max(1);
    let mut next_report = step;
    while acked.load(Relaxed) < total && visitors.iter().any(|v| !v.is_finished()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let count = acked.load(Relaxed);
        if count >= next_report {
            let rate = (count - last_count) as f64 / last_at.elapsed().as_secs_f64();
            println!(
                "  {count:>9} messages: {rate:>6.0} msg/s, node RSS {} KiB, data folder {:.1} MiB",
                rss_kib(pid).unwrap_or(0),
                folder_bytes(&child.data_dir) as f64 / (1024.0 * 1024.0)
            );
            (last_count, last_at) = (count, Instant::now());
            next_report = count - count % step + step;
        }
    }
    let count = acked.load(Relaxed);
    println!("\nsoak: {count} messages in {:.1} s, {:.0} msg/s", started.elapsed().as_secs_f64(), count as f64 / started.elapsed().as_secs_f64());
    println!(
        "  node RSS {} KiB, data folder {:.1} MiB for {:.1} MiB of message text",
        rss_kib(pid).unwrap_or(0),
        folder_bytes(&child.data_dir) as f64 / (1024.0 * 1024.0),
        (count * 200) as f64 / (1024.0 * 1024.0)
    );
    for visitor in visitors {
        visitor.abort();
    }
    Ok(())
}

/// Starts a node on the soaked data folder again and times it to ready.
async fn restart_time(args: &BenchArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let again = BenchArgs { data_dir: Some(data_dir.to_path_buf()), ..args.clone() };
    let started = Instant::now();
    let mut child = spawn_node(&again).await?;
    println!("  restart on the same data folder: ready in {:.2} s", started.elapsed().as_secs_f64());
    let _ = child.process.kill().await;
    Ok(())
}

/// The node's own mean time from receiving a command to its commit and apply, from
/// `/metrics`: what the node spends, apart from the sockets on either side.
/// The node's running entity actors, from its metrics.
async fn active_actors(private: &str) -> Option<u64> {
    let (_, metrics) = http_json(private, "GET", "/metrics", None, None).await.ok()?;
    metrics.as_str()?.lines().find_map(|l| l.strip_prefix("switchboard_actors_active ")?.trim().parse().ok())
}

pub(crate) async fn print_commit_time(private: &str) {
    let Ok((_, metrics)) = http_json(private, "GET", "/metrics", None, None).await else { return };
    let text = metrics.as_str().unwrap_or_default();
    let value = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok());
    if let (Some(sum), Some(count)) = (value("switchboard_commit_seconds_sum "), value("switchboard_commit_seconds_count ")) {
        if count > 0.0 {
            println!("  node: {count:.0} commands committed, mean {:.2} ms from receipt to commit and apply", sum / count * 1e3);
        }
    }
}

/// The closed loop: each client sends, waits for its ack, and sends again, no faster
/// than its socket's sustained rate. Prints a progress line per second, then
/// throughput, latencies, RSS and the data folder's size.
pub(crate) async fn saturate(
    args: &BenchArgs,
    clients: Vec<WsClient>,
    pending: &Pending,
    latencies: &Arc<Mutex<Vec<Duration>>>,
    pid: u32,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let min_gap = Duration::from_secs_f64(1.0 / f64::from(CLIENT_SUSTAINED_FRAMES_PER_S));
    let duration = Duration::from_secs(args.duration);
    let started = Instant::now();
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ack_latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    println!("bench: closed loop, {} clients, one message in flight each, for {} s…", clients.len(), args.duration);
    let mut tasks = Vec::with_capacity(clients.len());
    for (c, mut ws) in clients.into_iter().enumerate() {
        let (pending, acked, ack_latencies) = (pending.clone(), acked.clone(), ack_latencies.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            ws.keep_text();
            ws.clear_skipped();
            while started.elapsed() < duration {
                let key = format!("c{c}-{n}");
                n += 1;
                let sent = Instant::now();
                pending.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), sent);
                // The key is letters, digits and a dash: nothing to escape.
                if ws.send_text(&format!(r#"{{"type":"send","key":"{key}","text":"benchmark message"}}"#)).await.is_err() {
                    return;
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                let acked_now = loop {
                    let Ok(incoming) = ws.next(deadline.saturating_duration_since(Instant::now())).await else { break false };
                    let Some(text) = frame_text(incoming) else { break false };
                    if let Ok(head) = serde_json::from_str::<Head>(&text) {
                        if head.ty == "ack" && head.key.as_deref() == Some(key.as_str()) {
                            break true;
                        }
                    }
                };
                if !acked_now {
                    return;
                }
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ack_latencies.lock().unwrap_or_else(|p| p.into_inner()).push(sent.elapsed());
                let next = sent + min_gap;
                if next > Instant::now() {
                    tokio::time::sleep_until(next.into()).await;
                }
            }
        }));
    }
    let mut last = 0u64;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = acked.load(std::sync::atomic::Ordering::Relaxed);
        println!("  {:>4.0} s: {:>6} acks/s, node RSS {} KiB", started.elapsed().as_secs_f64(), now - last, rss_kib(pid).unwrap_or(0));
        last = now;
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(35), task).await;
    }
    let elapsed = started.elapsed();
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_deadline && !pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = acked.load(std::sync::atomic::Ordering::Relaxed);
    let mut acks = ack_latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    acks.sort();
    let mut delivered = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    delivered.sort();
    let undelivered = pending.lock().unwrap_or_else(|p| p.into_inner()).len();
    println!("\nclosed loop, {} clients", args.clients);
    println!("  acked {total} in {:.1} s: {:.0} msg/s durably committed", elapsed.as_secs_f64(), total as f64 / elapsed.as_secs_f64());
    print_latencies("client send -> ack", &acks);
    println!("  delivered {} to operator sockets, undelivered {undelivered}", delivered.len());
    print_latencies("client send -> operator socket", &delivered);
    println!("  node RSS {} KiB, data folder {:.1} MiB", rss_kib(pid).unwrap_or(0), folder_bytes(data_dir) as f64 / (1024.0 * 1024.0));
    Ok(())
}

/// The client surface's sustained text frames per second (docs/protocol.md §7).
pub(crate) const CLIENT_SUSTAINED_FRAMES_PER_S: u32 = 10;

/// The bench's skill groups and channels, and `--operators` operators online (their
/// sockets spread over `privates`), each accepting every offer and timing the client
/// messages it receives against `pending`.
pub(crate) async fn operators(
    args: &BenchArgs,
    privates: &[String],
    admin: &str,
    pending: &Pending,
    latencies: &Arc<Mutex<Vec<Duration>>>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let private = &privates[0];
    // A dedicated group sized so every client gets an operator at once.
    let capacity = args.clients.div_ceil(args.operators) as u32 + 1;
    put(private, admin, "/api/skill-groups/bench", json!({"name": "Bench", "policy": "least_occupied", "offer_timeout_ms": 30000})).await?;
    put(private, admin, "/api/skill-groups/idle", json!({"name": "Idle", "offer_timeout_ms": 30000})).await?;
    put(private, admin, "/api/channels/bench", json!({"kind": "web", "name": "Bench", "default_group": "bench"})).await?;
    put(private, admin, "/api/channels/idle", json!({"kind": "web", "name": "Idle", "default_group": "idle"})).await?;
    let mut operator_tasks = Vec::new();
    for i in 0..args.operators {
        let id = format!("bench-{i}");
        let password = format!("bench-password-{i}");
        put(private, admin, &format!("/api/operators/{id}"), json!({"name": id, "capacity": capacity, "groups": ["bench"]})).await?;
        put(private, admin, &format!("/api/users/{id}"), json!({"password": password, "role": "operator", "operator": id})).await?;
        let on = &privates[i % privates.len()];
        // A follower may not have applied the user just committed through node 1.
        let mut token = login(on, &id, &password).await;
        for _ in 0..40 {
            if token.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            token = login(on, &id, &password).await;
        }
        let token = token?;
        // Protocol 2: on a split node (`--node-arg=--shards`) the messages come in the
        // conversation shards' feeds; on a node of one group it is the one feed.
        let mut ws = WsClient::connect(on, &format!("/ws/operator?token={token}&protocol=2"), None).await?;
        ws.send(&json!({"type": "presence", "status": "online"})).await?;
        ws.keep_text();
        let pending = pending.clone();
        let latencies = latencies.clone();
        operator_tasks.push(tokio::spawn(async move {
            loop {
                let Ok(incoming) = ws.next(Duration::from_secs(3600)).await else { return };
                let Some(text) = frame_text(incoming) else { return };
                let Ok(head) = serde_json::from_str::<Head>(&text) else { continue };
                match (head.ty.as_ref(), head.kind.as_deref()) {
                    // An accept the cluster could not confirm (`unavailable`, after the
                    // server's own 10 s of resending) is sent again, as the protocol
                    // allows: its `ref` is the offer.
                    ("error", _) if head.code.as_deref() == Some("unavailable") => {
                        if let Some(offer) = head.reference.as_ref().and_then(Value::as_u64) {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let _ = ws.send(&json!({"type": "accept", "offer": offer, "ref": offer})).await;
                        }
                    }
                    ("event", Some("offer")) => {
                        if let Some(offer) = head.offer.as_ref().and_then(Value::as_u64) {
                            let _ = ws.send(&json!({"type": "accept", "offer": offer, "ref": offer})).await;
                        }
                    }
                    ("event", Some("conversation")) => {
                        let now = Instant::now();
                        if let Some(EntryHead { from: Some(from), key: Some(key) }) = &head.entry {
                            if from == "client" {
                                if let Some(sent) = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(key.as_ref()) {
                                    latencies.lock().unwrap_or_else(|p| p.into_inner()).push(now - sent);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }));
    }
    Ok(operator_tasks)
}

/// `n` clients, their sockets spread over `publics`, each with a started conversation
/// on the bench channel that an operator was assigned to.
pub(crate) async fn start_clients(publics: &[String], n: usize) -> anyhow::Result<Vec<(WsClient, Value)>> {
    let mut clients = Vec::new();
    for i in 0..n {
        let mut ws = WsClient::connect(&publics[i % publics.len()], "/ws/client", None).await?;
        ws.send(&json!({"type": "start", "channel": "bench", "name": "Bench client"})).await?;
        let started = ws.wait_for(Duration::from_secs(10), |v| v["type"] == "started").await?;
        clients.push((ws, started));
    }
    for (ws, started) in clients.iter_mut() {
        let conversation = started["conversation"].clone();
        ws.wait_for(Duration::from_secs(30), |v| v["type"] == "event" && v["kind"] == "assigned")
            .await
            .with_context(|| format!("conversation {conversation}: no operator was assigned within 30 s"))?;
        ws.clear_skipped();
    }
    Ok(clients)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(cycles) = args.routing {
        return tokio::task::spawn_blocking(move || crate::bench_routing::run(cycles.max(1))).await?;
    }
    if let Some(cycles) = args.routing_live {
        return crate::bench_live::run(args, cycles.max(1)).await;
    }
    if let Some(shards) = args.split {
        return crate::bench_split::run(args, shards).await;
    }
    if let Some(seconds) = args.channels {
        let outbound = args.outbound_rate;
        return crate::bench_channels::run(args, seconds, outbound).await;
    }
    if args.nodes > 1 {
        return crate::bench_cluster::run(args).await;
    }
    if args.kill_leader.is_some() {
        bail!("--kill-leader needs a cluster: add --nodes 3");
    }
    if args.clients == 0 || args.operators == 0 || args.rate == 0 {
        bail!("clients, operators and rate must be positive");
    }
    // Each client socket is held to the public surface's sustained frame rate; beyond it
    // the bench would measure the rate limiter, not delivery.
    let per_client = f64::from(args.rate) / args.clients as f64;
    if !args.saturate && per_client > f64::from(CLIENT_SUSTAINED_FRAMES_PER_S) {
        bail!(
            "{per_client:.1} messages/s per client is over the client socket's limit of {CLIENT_SUSTAINED_FRAMES_PER_S}/s: \
             use at least {} clients for {} msg/s",
            args.rate.div_ceil(CLIENT_SUSTAINED_FRAMES_PER_S),
            args.rate
        );
    }
    println!("bench: starting a switchboard dev node…");
    let mut child = spawn_node(&args).await?;
    let pid = child.process.id().ok_or_else(|| anyhow!("no pid"))?;
    let admin_password = child.logins.get("admin").cloned().ok_or_else(|| anyhow!("no admin login"))?;
    let admin = login(&child.private, "admin", &admin_password).await?;

    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let operator_tasks = operators(&args, &[child.private.clone()], &admin, &pending, &latencies).await?;

    if let Some(total) = args.soak {
        soak(&args, &child, total, pid).await?;
        for task in operator_tasks {
            task.abort();
        }
        let _ = child.process.kill().await;
        let _ = child.process.wait().await;
        restart_time(&args, &child.data_dir).await?;
        return Ok(());
    }
    println!("bench: {} operators online; starting {} clients", args.operators, args.clients);
    let clients: Vec<WsClient> = start_clients(&[child.public.clone()], args.clients).await?.into_iter().map(|(ws, _)| ws).collect();
    if args.saturate {
        saturate(&args, clients, &pending, &latencies, pid, &child.data_dir).await?;
        print_commit_time(&child.private).await;
        for task in operator_tasks {
            task.abort();
        }
        let _ = child.process.kill().await;
        return Ok(());
    }
    // Each client's frames are read by its own task: acks time the durable commit.
    let acks_pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let ack_latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let mut senders = Vec::with_capacity(clients.len());
    let mut reader_tasks = Vec::with_capacity(clients.len());
    for mut ws in clients {
        senders.push(ws.sender());
        let acks_pending = acks_pending.clone();
        let ack_latencies = ack_latencies.clone();
        reader_tasks.push(tokio::spawn(async move {
            loop {
                match ws.next(Duration::from_secs(3600)).await {
                    Ok(Incoming::Json(v)) if v["type"] == "ack" => {
                        let now = Instant::now();
                        if let Some(key) = v["key"].as_str() {
                            if let Some(sent) = acks_pending.lock().unwrap_or_else(|p| p.into_inner()).remove(key) {
                                ack_latencies.lock().unwrap_or_else(|p| p.into_inner()).push(now - sent);
                            }
                        }
                    }
                    Ok(Incoming::Closed { .. }) | Err(_) => return,
                    _ => {}
                }
            }
        }));
    }

    println!("bench: {} msg/s for {} s…", args.rate, args.duration);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = Instant::now();
    let total = args.rate as u64 * args.duration;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut send_errors = 0u64;
    // A line a second: what reached the operators in that second and its slowest
    // messages, so a stall shows when it happened, not only in the run's p99.
    let progress = {
        let latencies = latencies.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
            loop {
                tick.tick().await;
                let mut second: Vec<Duration> = {
                    let all = latencies.lock().unwrap_or_else(|p| p.into_inner());
                    let new = all[seen.min(all.len())..].to_vec();
                    seen = all.len();
                    new
                };
                second.sort();
                println!(
                    "  {:>4.0} s: {:>6} delivered, p99 {:>7.2} ms, max {:>7.2} ms, node RSS {} KiB",
                    started.elapsed().as_secs_f64(),
                    second.len(),
                    percentile(&second, 99.0).as_secs_f64() * 1e3,
                    second.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                    rss_kib(pid).unwrap_or(0)
                );
            }
        })
    };
    for n in 0..total {
        ticker.tick().await;
        let client = &senders[(n as usize) % senders.len()];
        let key = format!("m{n}");
        let now = Instant::now();
        pending.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), now);
        acks_pending.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), now);
        let frame = json!({"type": "send", "key": key, "text": "benchmark message"});
        if client.send(&frame).await.is_err() {
            send_errors += 1;
        }
    }
    let sending = started.elapsed();
    progress.abort();
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    let settled = || pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty() && acks_pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
    while Instant::now() < drain_deadline && !settled() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lat.sort();
    let lost = pending.lock().unwrap_or_else(|p| p.into_inner()).len();
    println!("\nclient message -> committed -> operator socket");
    println!("  sent {total} in {:.1} s ({:.0} msg/s offered), delivered {}, undelivered {lost}, send errors {send_errors}", sending.as_secs_f64(), total as f64 / sending.as_secs_f64(), lat.len());
    print_latencies("latency", &lat);
    println!("  throughput {:.0} msg/s delivered", lat.len() as f64 / sending.as_secs_f64());
    let mut acks = ack_latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    acks.sort();
    let unacked = acks_pending.lock().unwrap_or_else(|p| p.into_inner()).len();
    println!("\nclient message -> durably committed -> client ack");
    print_latencies(&format!("acked {}, unacked {unacked}; latency", acks.len()), &acks);

    if args.rate <= SYNC_FLOOR_MAX_RATE {
        // At light load the ack waits mostly for the disk: time the disk alone, at the
        // same pace, in the same folder, for the floor under the figures above.
        let samples = total.min(100) as usize;
        let dir = child.data_dir.clone();
        let floor = tokio::task::spawn_blocking(move || sync_floor(&dir, samples, interval)).await??;
        println!("\nthe data folder's disk alone: append {SYNC_FLOOR_RECORD} bytes + fdatasync, one every {:.0} ms", interval.as_secs_f64() * 1e3);
        print_latencies(&format!("{} syncs; latency", floor.len()), &floor);
    }

    if args.idle_sessions > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid).unwrap_or(0);
        let mut idle = Vec::with_capacity(args.idle_sessions);
        // In two halves: the first also fills memory the allocator kept free from the
        // load before, so the second half's growth is what one more session costs.
        let half = args.idle_sessions / 2;
        let mut mid = before;
        for i in 0..args.idle_sessions {
            if i == half {
                tokio::time::sleep(Duration::from_secs(2)).await;
                mid = rss_kib(pid).unwrap_or(0);
            }
            let mut ws = WsClient::connect(&child.public, "/ws/client", None).await?;
            ws.send(&json!({"type": "start", "channel": "idle", "name": "Idle"})).await?;
            ws.wait_for(Duration::from_secs(10), |v| v["type"] == "started").await?;
            idle.push(ws);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid).unwrap_or(0);
        let per = (after.saturating_sub(before) as f64) / args.idle_sessions as f64;
        let second = args.idle_sessions - half;
        let marginal = (after.saturating_sub(mid) as f64) / second.max(1) as f64;
        println!("\nidle client sessions (started conversation, following its stream)");
        println!(
            "  {} sessions: node RSS {} KiB -> {} KiB after {} -> {} KiB, {:.1} KiB per session overall, {:.1} KiB per session for the last {} (includes the conversation's state); actors running: {}",
            args.idle_sessions,
            before,
            mid,
            half,
            after,
            per,
            marginal,
            second,
            active_actors(&child.private).await.unwrap_or(0)
        );
        // Settled: a quiet conversation's actor stops after two idle checks (30 s apart)
        // even while its socket follows it; the socket stays open.
        tokio::time::sleep(Duration::from_secs(70)).await;
        let settled = rss_kib(pid).unwrap_or(0);
        let per = (settled.saturating_sub(before) as f64) / args.idle_sessions as f64;
        println!("  after 70 s idle: node RSS {settled} KiB, {per:.1} KiB per session; actors running: {}", active_actors(&child.private).await.unwrap_or(0));
        drop(idle);
    }
    for task in operator_tasks.into_iter().chain(reader_tasks) {
        task.abort();
    }
    let _ = child.process.kill().await;
    Ok(())
}
