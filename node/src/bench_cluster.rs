//! `switchboard bench --nodes N`: the same load against a local cluster of `switchboard
//! node` processes laid out by `cluster init`, with clients and operators spread over
//! every node (or, with `--gateway`, through a standalone gateway in front of them);
//! `--kill-leader K` kills the leader K times under load and reports the recovery each
//! client saw and whether every acknowledged message is kept.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use switchboard_gateway::client::{free_port_block, http_json, Incoming, WsClient};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::bench::{self, BenchArgs, Pending};
use crate::cluster::{self, NodeConfig};

/// The benchmarked cluster: its layout and its node processes (by id - 1).
struct Nodes {
    _dir: tempfile::TempDir,
    configs: Vec<NodeConfig>,
    paths: Vec<PathBuf>,
    children: Vec<Option<tokio::process::Child>>,
    extra: Vec<String>,
    /// The standalone gateway, with `--gateway`: its file, listeners and process.
    gateway: Option<(cluster::GatewayFileConfig, tokio::process::Child)>,
}

impl Nodes {
    async fn start(args: &BenchArgs) -> anyhow::Result<Nodes> {
        let dir = tempfile::tempdir()?;
        let layout = dir.path().join("cluster");
        let base = free_port_block(args.nodes + 1)?;
        let paths = cluster::init(&cluster::InitPlan {
            dir: layout,
            nodes: args.nodes as u64,
            hosts: vec!["127.0.0.1".into()],
            public_port: base,
            private_port: base + 1,
            raft_port: base + 2,
            port_step: 10,
            gateways: u64::from(args.gateway),
            gateway_public_port: base + 10 * args.nodes as u16,
            gateway_private_port: base + 10 * args.nodes as u16 + 1,
            shards: crate::cluster_shards(args.shards),
        })?;
        let (paths, gateway_paths) = paths.split_at(args.nodes);
        let paths = paths.to_vec();
        let configs = paths.iter().map(|p| NodeConfig::read(p)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut nodes = Nodes { _dir: dir, configs, paths, children: Vec::new(), extra: args.node_args.clone(), gateway: None };
        let mut waiting = Vec::new();
        for i in 0..args.nodes {
            let (child, ready) = nodes.spawn(i)?;
            nodes.children.push(Some(child));
            waiting.push(ready);
        }
        for ready in waiting {
            ready.await.context("a node did not start")??;
        }
        if let Some(path) = gateway_paths.first() {
            let config = cluster::GatewayFileConfig::read(path)?;
            let mut command = tokio::process::Command::new(std::env::current_exe()?);
            command.arg("gateway").arg("--config").arg(path).args(bench::OPEN_BUDGETS);
            let (child, ready) = wait_ready(command, "gateway")?;
            ready.await.context("the gateway did not start")??;
            nodes.gateway = Some((config, child));
        }
        Ok(nodes)
    }

    /// Starts node `i` (from 0); the returned task ends when it printed `ready`.
    fn spawn(&self, i: usize) -> anyhow::Result<(tokio::process::Child, tokio::task::JoinHandle<anyhow::Result<()>>)> {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command.arg("node").arg("--config").arg(&self.paths[i]).args(bench::OPEN_BUDGETS).args(&self.extra);
        if i == 0 {
            command.arg("--demo");
        }
        wait_ready(command, &format!("node {}", i + 1))
    }

    /// Where clients connect: the gateway, or every node.
    fn publics(&self) -> Vec<String> {
        match &self.gateway {
            Some((g, _)) => vec![g.public_addr.to_string()],
            None => self.configs.iter().map(|c| c.public_addr.to_string()).collect(),
        }
    }

    /// Where operators connect: the gateway, or every node.
    fn entry_privates(&self) -> Vec<String> {
        match &self.gateway {
            Some((g, _)) => vec![g.private_addr.to_string()],
            None => self.privates(),
        }
    }

    fn privates(&self) -> Vec<String> {
        self.configs.iter().map(|c| c.private_addr.to_string()).collect()
    }

    /// The leader every running node names, once they agree (waits up to 30 s).
    async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut named = Vec::new();
            for (i, config) in self.configs.iter().enumerate() {
                if self.children[i].is_some() {
                    named.push(cluster::status(&config.private_addr.to_string()).await.ok().and_then(|s| s["leader"].as_u64()));
                }
            }
            if let Some(Some(leader)) = named.first() {
                if named.iter().all(|l| *l == Some(*leader)) && self.children.get(*leader as usize - 1).is_some_and(Option::is_some) {
                    return Ok(*leader as usize - 1);
                }
            }
            if Instant::now() >= deadline {
                bail!("the nodes did not agree on a running leader within 30 s: {named:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `i` has applied as far as the leader had when asked.
    async fn caught_up(&self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // A leader busy with the drill's traffic may miss one status call: ask again.
        let target = loop {
            let leader = self.leader().await?;
            match cluster::status(&self.configs[leader].private_addr.to_string()).await {
                Ok(status) => break status["last_applied"].as_u64().unwrap_or(0),
                Err(e) if Instant::now() >= deadline => return Err(e.context("the leader's status")),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        while Instant::now() < deadline {
            let applied = cluster::status(&self.configs[i].private_addr.to_string()).await.ok().and_then(|s| s["last_applied"].as_u64()).unwrap_or(0);
            if applied >= target {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("node {} did not catch up within 60 s", i + 1)
    }
}


/// Spawns `command` and returns it with a task that ends once it printed `ready`.
fn wait_ready(mut command: tokio::process::Command, name: &str) -> anyhow::Result<(tokio::process::Child, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    // The nodes log errors only; `SWITCHBOARD_BENCH_NODE_LOG` (a `RUST_LOG` filter)
    // shows more, elections say, when a drill needs explaining. Each line is printed
    // with the name of the process that logged it.
    let filter = std::env::var("SWITCHBOARD_BENCH_NODE_LOG").unwrap_or_else(|_| "error".into());
    let mut child = command.env("RUST_LOG", filter).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let label = name.to_owned();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => eprintln!("[{label}] {}", String::from_utf8_lossy(&line).trim_end()),
            }
        }
    });
    let ready = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let wait = async {
            while let Some(line) = lines.next_line().await? {
                if line == "ready" {
                    return anyhow::Ok(());
                }
            }
            bail!("it exited before it was ready")
        };
        tokio::time::timeout(Duration::from_secs(120), wait).await.map_err(|_| anyhow!("not ready within 120 s"))??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(())
    });
    Ok((child, ready))
}

/// Each group's leader, from the nodes that hold a copy of it (a split cluster);
/// `None` for a cluster of one group.
async fn group_leaders(nodes: &Nodes) -> Option<BTreeMap<u64, Option<u64>>> {
    let mut leaders: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    for config in &nodes.configs {
        let Ok(status) = cluster::status(&config.private_addr.to_string()).await else { continue };
        for g in status["groups"].as_array()? {
            let (Some(group), leader) = (g["group"].as_u64(), g["leader"].as_u64()) else { continue };
            let known = leaders.entry(group).or_default();
            if g["held"] != false && known.is_none() {
                *known = leader;
            }
        }
    }
    Some(leaders)
}

/// The node a kill drill kills next: on a split cluster the running node that leads
/// the most conversation shards (so that every kill moves the leaders of live
/// conversations, whichever node the placement left them on), with those shards;
/// on a cluster of one group, its leader.
async fn victim(nodes: &Nodes) -> anyhow::Result<(usize, Vec<u64>)> {
    if let Some(leaders) = group_leaders(nodes).await {
        let mut led: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (group, leader) in leaders.iter().filter(|(group, _)| **group >= crate::groups::FIRST_C) {
            if let Some(leader) = leader {
                led.entry(*leader).or_default().push(*group);
            }
        }
        let running = |node: &u64| nodes.children.get(*node as usize - 1).is_some_and(Option::is_some);
        if let Some((node, groups)) = led.into_iter().filter(|(node, _)| running(node)).max_by_key(|(_, groups)| groups.len()) {
            return Ok((node as usize - 1, groups));
        }
    }
    Ok((nodes.leader().await?, Vec::new()))
}

/// Waits (at most 30 s) until each of `groups` has a leader other than `killed`
/// (1-based) in the view of the running nodes.
async fn until_led_elsewhere(nodes: &Nodes, groups: &[u64], killed: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(leaders) = group_leaders(nodes).await {
            if groups.iter().all(|g| leaders.get(g).copied().flatten().is_some_and(|l| l != killed)) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("conversation shards {groups:?} had no new leader within 30 s of node {killed}'s kill");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// On a split cluster, waits until the placement has evened out the groups'
/// leaderships (a new cluster's first member leads every group until then), at most
/// 60 s, so that the run measures the cluster as it will serve; prints who leads what.
async fn until_leaders_even(nodes: &Nodes) {
    let started = Instant::now();
    loop {
        let Some(leaders) = group_leaders(nodes).await else { return };
        let mut leads: BTreeMap<u64, Vec<u64>> = nodes.configs.iter().map(|c| (c.id, Vec::new())).collect();
        for (group, leader) in &leaders {
            if let Some(list) = leader.and_then(|l| leads.get_mut(&l)) {
                list.push(*group);
            }
        }
        let all = !leaders.is_empty() && leaders.values().all(Option::is_some);
        let (most, least) = (leads.values().map(Vec::len).max().unwrap_or(0), leads.values().map(Vec::len).min().unwrap_or(0));
        if all && most - least <= 1 {
            let shown: Vec<String> = leads.iter().map(|(node, groups)| format!("node {node} leads {groups:?}")).collect();
            println!("bench: leaderships even after {:.1} s: {}", started.elapsed().as_secs_f64(), shown.join(", "));
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            println!("bench: leaderships still uneven after 60 s ({leads:?}); measuring anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.soak.is_some() {
        bail!("--soak runs on one node; drop --nodes");
    }
    if args.gateway && args.nodes < 2 {
        bail!("--gateway goes in front of a cluster: add --nodes 3");
    }
    if args.kill_leader.is_some() && args.nodes < 3 {
        bail!("--kill-leader needs --nodes 3 or more (a majority must survive the kill)");
    }
    println!("bench: starting a cluster of {} switchboard node processes…", args.nodes);
    let mut nodes = Nodes::start(&args).await?;
    let logins: BTreeMap<String, String> = serde_json::from_slice(&std::fs::read(nodes.configs[0].data_dir.join(crate::demo::LOGINS_FILE))?)?;
    let admin_password = logins.get("admin").cloned().ok_or_else(|| anyhow!("no admin login"))?;
    let privates = nodes.privates();
    let admin = bench::login(&privates[0], "admin", &admin_password).await?;
    let pending: Pending = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let operator_tasks = bench::operators(&args, &nodes.entry_privates(), &admin, &pending, &latencies).await?;
    match &nodes.gateway {
        Some((g, _)) => println!("bench: {} operators online through {}; starting {} clients through it", args.operators, g.name, args.clients),
        None => println!("bench: {} operators online over {} nodes; starting {} clients", args.operators, args.nodes, args.clients),
    }
    until_leaders_even(&nodes).await;
    let clients = bench::start_clients(&nodes.publics(), args.clients).await?;
    let leader = nodes.leader().await?;
    println!("bench: node {} leads", leader + 1);
    let pid = nodes.children[leader].as_ref().and_then(|c| c.id()).unwrap_or(0);
    let result = match args.kill_leader {
        Some(kills) => kill_drill(&args, &mut nodes, clients, kills, &admin).await,
        None => {
            let clients = clients.into_iter().map(|(ws, _)| ws).collect();
            let outcome = bench::saturate(&args, clients, &pending, &latencies, pid, &nodes.configs[leader].data_dir).await;
            bench::print_commit_time(&privates[leader]).await;
            outcome
        }
    };
    if let Err(e) = &result {
        // The run's own error says what went wrong; the idle sessions would hide it.
        eprintln!("bench: {e:#}");
    } else if args.idle_sessions > 0 {
        idle_sessions(&args, &nodes).await?;
    }
    // Spurious elections under load would show here; and what each node spent: its CPU
    // time since it started, its data folder, and the conversation shards it holds (a
    // split cluster keeps each on three nodes, ADR 0012).
    for (i, config) in nodes.configs.iter().enumerate() {
        let pid = nodes.children[i].as_ref().and_then(|c| c.id()).unwrap_or(0);
        let cpu = cpu_seconds(pid).map_or_else(|| "?".into(), |s| format!("{s:.1}"));
        let mib = |path: &std::path::Path| bench::folder_bytes(path) as f64 / (1024.0 * 1024.0);
        let folder = mib(&config.data_dir);
        let (log, records) = (mib(&config.data_dir.join("log")), mib(&config.data_dir.join("records")));
        if let Ok(status) = cluster::status(&config.private_addr.to_string()).await {
            let held: Vec<u64> = status["groups"].as_array().into_iter().flatten().filter(|g| g["held"] == true && g["group"].as_u64().is_some_and(|id| id >= 3)).filter_map(|g| g["group"].as_u64()).collect();
            let leads: Vec<u64> = status["groups"].as_array().into_iter().flatten().filter(|g| g["held"] != false && g["leader"].as_u64() == Some(config.id)).filter_map(|g| g["group"].as_u64()).collect();
            let held = if status["groups"].is_array() { format!(", holds conversation shards {held:?}, leads groups {leads:?}") } else { String::new() };
            // A node of one group counts its group's changes; a split node each group's.
            let changes = status["leader_changes"].as_u64().or_else(|| {
                status["groups"].as_array().map(|groups| groups.iter().filter_map(|g| g["leader_changes"].as_u64()).sum())
            });
            println!(
                "  node {}: {}, leader changes seen {}, CPU {cpu} s, data folder {folder:.1} MiB (log {log:.1}, records {records:.1}){held}",
                config.id,
                status["role"].as_str().unwrap_or("?"),
                changes.map_or_else(|| "?".into(), |n| n.to_string())
            );
        }
    }
    for task in operator_tasks {
        task.abort();
    }
    if let Some((_, child)) = nodes.gateway.as_mut() {
        let _ = child.kill().await;
    }
    for child in nodes.children.iter_mut().flatten() {
        let _ = child.kill().await;
    }
    result
}

/// Opens `--idle-sessions` client sessions (each starts a conversation in a group no
/// operator serves and follows it) through the first entry point and reports what they
/// cost: the gateway's RSS growth per session with `--gateway`, and every node's.
async fn idle_sessions(args: &BenchArgs, nodes: &Nodes) -> anyhow::Result<()> {
    let mut pids: Vec<(String, u32)> = Vec::new();
    if let Some((g, child)) = &nodes.gateway {
        pids.push((g.name.clone(), child.id().unwrap_or(0)));
    }
    for (i, child) in nodes.children.iter().enumerate() {
        if let Some(child) = child {
            pids.push((format!("node {}", i + 1), child.id().unwrap_or(0)));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<u64> = pids.iter().map(|(_, pid)| bench::rss_kib(*pid).unwrap_or(0)).collect();
    let public = nodes.publics()[0].clone();
    let mut idle = Vec::with_capacity(args.idle_sessions);
    for _ in 0..args.idle_sessions {
        let mut ws = WsClient::connect(&public, "/ws/client", None).await?;
        ws.send(&json!({"type": "start", "channel": "idle", "name": "Idle"})).await?;
        ws.wait_for(Duration::from_secs(10), |v| v["type"] == "started").await?;
        idle.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("\nidle client sessions through {public} (started conversation, following its stream)");
    for ((name, pid), before) in pids.iter().zip(before) {
        let after = bench::rss_kib(*pid).unwrap_or(0);
        let per = (after.saturating_sub(before) as f64) / args.idle_sessions as f64;
        println!("  {name}: RSS {before} KiB -> {after} KiB, {per:.1} KiB per session");
    }
    drop(idle);
    Ok(())
}

/// One client of the drill: a conversation it resumes on another node when its socket
/// is cut, sending one message at a time and resending an unanswered one with its key.
struct DrillClient {
    conversation: u64,
    token: String,
    /// When each acknowledgement arrived, and the key it acknowledged.
    acks: Vec<(Instant, String)>,
    /// Sends answered `unavailable` (outcome unknown during a failover) and sent again.
    retried: u64,
    reconnects: u64,
}

async fn drill_client(mut ws: WsClient, mut me: DrillClient, publics: Vec<String>, home: usize, stop: Arc<std::sync::atomic::AtomicBool>) -> DrillClient {
    let min_gap = Duration::from_secs_f64(1.0 / f64::from(bench::CLIENT_SUSTAINED_FRAMES_PER_S));
    let mut last_seq = 0u64;
    let mut n = 0u64;
    let mut node = home;
    'messages: while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("d{}-{n}", me.conversation);
        let sent = Instant::now();
        if ws.send(&json!({"type": "send", "key": key, "text": "drill message"})).await.is_ok() {
            loop {
                match ws.next(Duration::from_secs(30)).await {
                    Ok(Incoming::Json(v)) if v["type"] == "event" => last_seq = v["seq"].as_u64().unwrap_or(last_seq).max(last_seq),
                    Ok(Incoming::Json(v)) if v["type"] == "ack" && v["key"] == key.as_str() => {
                        me.acks.push((Instant::now(), key.clone()));
                        n += 1;
                        let next = sent + min_gap;
                        if next > Instant::now() {
                            tokio::time::sleep_until(next.into()).await;
                        }
                        continue 'messages;
                    }
                    Ok(Incoming::Json(v)) if v["type"] == "error" && v["ref"] == key.as_str() => {
                        me.retried += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue 'messages;
                    }
                    Ok(Incoming::Json(_)) | Ok(Incoming::Text(_)) => {}
                    Ok(Incoming::Closed { .. }) | Err(_) => break,
                }
            }
        }
        // The socket was cut (its node died): resume on the next node, as the widget does.
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break 'messages;
            }
            node = (node + 1) % publics.len();
            me.reconnects += 1;
            let Ok(mut fresh) = WsClient::connect(&publics[node], "/ws/client", None).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            if fresh.send(&json!({"type": "resume", "token": me.token, "last_seq": last_seq})).await.is_ok()
                && fresh.wait_for(Duration::from_secs(5), |v| v["type"] == "resumed").await.is_ok()
            {
                ws = fresh;
                break;
            }
        }
    }
    ws.close().await;
    me
}

async fn kill_drill(args: &BenchArgs, nodes: &mut Nodes, clients: Vec<(WsClient, serde_json::Value)>, kills: u32, admin: &str) -> anyhow::Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publics = nodes.publics();
    let mut tasks = Vec::new();
    for (i, (ws, started)) in clients.into_iter().enumerate() {
        let me = DrillClient {
            conversation: started["conversation"].as_u64().unwrap_or(0),
            token: started["token"].as_str().unwrap_or_default().to_owned(),
            acks: Vec::new(),
            retried: 0,
            reconnects: 0,
        };
        tasks.push(tokio::spawn(drill_client(ws, me, publics.clone(), i % publics.len(), stop.clone())));
    }
    println!("bench: {} clients, one message in flight each; killing a leader {kills} times…", args.clients);
    let started = Instant::now();
    let mut killed_at = Vec::new();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (leader, shards) = victim(nodes).await?;
        if let Some(child) = nodes.children[leader].as_mut() {
            child.start_kill()?;
            killed_at.push(Instant::now());
            let _ = child.wait().await;
        }
        nodes.children[leader] = None;
        let new_leader = nodes.leader().await?;
        let agreed = killed_at[k as usize].elapsed().as_secs_f64() * 1e3;
        if shards.is_empty() {
            println!("  kill {}: node {} killed, node {} leads {agreed:.0} ms later", k + 1, leader + 1, new_leader + 1);
        } else {
            until_led_elsewhere(nodes, &shards, leader as u64 + 1).await?;
            println!(
                "  kill {}: node {} killed, leading conversation shards {shards:?}: new leaders {:.0} ms later (the routing shard's: node {} after {agreed:.0} ms)",
                k + 1,
                leader + 1,
                killed_at[k as usize].elapsed().as_secs_f64() * 1e3,
                new_leader + 1
            );
        }
        // Back before the next kill, and caught up: a majority must survive every kill.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (child, ready) = nodes.spawn(leader)?;
        nodes.children[leader] = Some(child);
        ready.await.context("restart after a kill")??;
        nodes.caught_up(leader).await.with_context(|| format!("node {} catching up after kill {}", leader + 1, k + 1))?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await?);
    }
    let elapsed = started.elapsed();

    // Recovery seen by each client for each kill: from the kill to its first ack after.
    let mut recoveries = Vec::new();
    let mut per_kill = Vec::new();
    let mut shown = Vec::new();
    for (k, at) in killed_at.iter().enumerate() {
        let (mut worst, mut over_half) = (Duration::ZERO, 0);
        for run in &runs {
            if let Some((ack, _)) = run.acks.iter().find(|(ack, _)| ack >= at) {
                let wait = ack.duration_since(*at);
                recoveries.push(wait);
                worst = worst.max(wait);
                over_half += usize::from(wait >= Duration::from_millis(500));
            }
        }
        per_kill.push(worst);
        shown.push(format!("{}: {:.0} ms ({over_half})", k + 1, worst.as_secs_f64() * 1e3));
    }
    recoveries.sort();
    per_kill.sort();
    // Every acknowledged message is in its conversation, once.
    let private = nodes.privates()[nodes.leader().await?].clone();
    let (mut lost, mut doubled, mut checked) = (0, 0, 0);
    for run in &runs {
        let (status, conv) = http_json(&private, "GET", &format!("/api/conversations/{}", run.conversation), Some(admin), None).await?;
        if status != 200 {
            bail!("conversation {}: {status} {conv}", run.conversation);
        }
        let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
        for entry in conv["history"].as_array().into_iter().flatten() {
            if let Some(key) = entry["key"].as_str() {
                *copies.entry(key).or_default() += 1;
            }
        }
        for (_, key) in &run.acks {
            checked += 1;
            match copies.get(key.as_str()) {
                None => lost += 1,
                Some(1) => {}
                Some(_) => doubled += 1,
            }
        }
    }
    let acked: usize = runs.iter().map(|r| r.acks.len()).sum();
    println!("\nleader killed {kills} times in {:.1} s, {} clients", elapsed.as_secs_f64(), args.clients);
    println!("  acked {acked} ({:.0} msg/s through the kills); resent after `unavailable` {}; reconnects {}", acked as f64 / elapsed.as_secs_f64(), runs.iter().map(|r| r.retried).sum::<u64>(), runs.iter().map(|r| r.reconnects).sum::<u64>());
    bench::print_latencies("recovery seen by a client (kill -> its first ack after)", &recoveries);
    bench::print_latencies("worst client per kill", &per_kill);
    println!("  worst client of each kill (clients that waited 500 ms or more): {}", shown.join(", "));
    println!("  {checked} acknowledged messages checked: {lost} lost, {doubled} written twice");
    Ok(())
}

/// User and system CPU time of process `pid` so far, in seconds (Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // Clock ticks per second: 100 on Linux for every architecture we build for.
    Some(ticks / 100.0)
}
