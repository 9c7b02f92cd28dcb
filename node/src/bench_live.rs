//! `switchboard bench --routing-live N`: issue 10's routing budget through a real node,
//! measured where the operator sees it. One `switchboard dev` node; `--operators`
//! operators (default 1,000) in 50 skill groups, each online on their own operator
//! socket with capacity 3, every slot taken; `--clients` customers (default 10,000)
//! waiting on their own client sockets. Every rules 6 rule is on, as in `--routing`
//! (required skill levels, a relaxation step with an overflow group, opening hours in a
//! time zone, a channel weight). Each cycle one operator closes a conversation over
//! their socket; the time from sending the close to the next offer arriving on that
//! same socket is the freed slot turning into an offer (the close's commit, its log
//! sync, the routing pass and the socket delivery included); the operator accepts it.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::json;
use switchboard_gateway::client::{Incoming, WsClient};
use tokio::sync::{mpsc, oneshot};

use crate::bench::{login, percentile, put, BenchArgs};

const GROUPS: usize = 50;
const CAPACITY: u32 = 3;

/// Asks an operator's task to close one of their conversations and time the next offer.
type Cycle = oneshot::Sender<anyhow::Result<Duration>>;

pub async fn run(args: BenchArgs, cycles: usize) -> anyhow::Result<()> {
    let operators = if args.operators == 10 { 1000 } else { args.operators };
    let clients = if args.clients == 100 { 10_000 } else { args.clients };
    let child = crate::bench::spawn_node(&args).await?;
    let admin_password = child.logins.get("admin").cloned().ok_or_else(|| anyhow!("no admin login"))?;
    let admin = login(&child.private, "admin", &admin_password).await?;
    let started = Instant::now();
    put(&child.private, &admin, "/api/routing/weights", json!({"weights": {"email": 2}})).await?;
    let weekly: Vec<serde_json::Value> = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"].iter().map(|d| json!({"day": d, "open": "00:00", "close": "24:00"})).collect();
    let hours = json!({"time_zone": "Europe/Moscow", "closed_action": "wait", "weekly": weekly});
    for g in 0..GROUPS {
        let body = json!({
            "name": format!("Live {g}"), "offer_timeout_ms": 600_000,
            "routing": {"required_skills": {"billing": 2}, "attribute_priorities": [{"attribute": "tier", "value": "vip", "priority": 10}], "ageing_ms": 60_000},
            "hours": hours,
        });
        put(&child.private, &admin, &format!("/api/skill-groups/live{g}"), body).await?;
        put(&child.private, &admin, &format!("/api/channels/live{g}"), json!({"kind": "web", "name": format!("Live {g}"), "default_group": format!("live{g}")})).await?;
    }
    // The steps once every group they overflow into exists.
    for g in 0..GROUPS {
        let steps = json!([{"after_ms": 600_000, "max_level": 1, "overflow": [format!("live{}", (g + 1) % GROUPS)]}]);
        put(&child.private, &admin, &format!("/api/skill-groups/live{g}"), json!({"name": format!("Live {g}"), "offer_timeout_ms": 600_000, "steps": steps})).await?;
    }
    println!("set up {GROUPS} groups with rules 6 settings in {:.1} s; creating {operators} operators and their logins …", started.elapsed().as_secs_f64());
    let mut drivers: Vec<mpsc::Sender<Cycle>> = Vec::with_capacity(operators);
    let (filled_tx, mut filled_rx) = mpsc::channel::<()>(operators);
    for i in 0..operators {
        let id = format!("live-{i}");
        let password = format!("live-password-{i}");
        let group = format!("live{}", i % GROUPS);
        put(&child.private, &admin, &format!("/api/operators/{id}"), json!({"name": id, "capacity": CAPACITY, "groups": [group], "skills": {"billing": 2 + i % 4}})).await?;
        put(&child.private, &admin, &format!("/api/users/{id}"), json!({"password": password, "role": "operator", "operator": id})).await?;
        let token = login(&child.private, &id, &password).await?;
        let ws = WsClient::connect(&child.private, &format!("/ws/operator?token={token}"), None).await?;
        ws.send(&json!({"type": "presence", "status": "online"})).await?;
        let (tx, rx) = mpsc::channel::<Cycle>(4);
        drivers.push(tx);
        tokio::spawn(operator(ws, rx, filled_tx.clone()));
        if i % 100 == 99 {
            println!("  {} operators online ({:.0} s)", i + 1, started.elapsed().as_secs_f64());
        }
    }
    drop(filled_tx);
    // Customers: enough to fill every slot, then the backlog.
    let slots = operators * CAPACITY as usize;
    let mut sockets = Vec::with_capacity(clients + slots);
    for i in 0..clients + slots {
        let mut ws = WsClient::connect(&child.public, "/ws/client", None).await?;
        let attributes = if i % 10 == 0 { json!({"tier": "vip"}) } else { json!({}) };
        ws.send(&json!({"type": "start", "channel": format!("live{}", i % GROUPS), "name": "Live", "attributes": attributes})).await?;
        ws.wait_for(Duration::from_secs(30), |v| v["type"] == "started").await.context("a customer was not started")?;
        sockets.push(ws);
        if i % 2000 == 1999 {
            println!("  {} customers started ({:.0} s)", i + 1, started.elapsed().as_secs_f64());
        }
    }
    for _ in 0..operators {
        tokio::time::timeout(Duration::from_secs(120), filled_rx.recv()).await.context("operators never filled")?;
    }
    println!("set up: {operators} operators ({slots} slots, all full), {clients} waiting, in {:.0} s", started.elapsed().as_secs_f64());

    let mut latencies = Vec::with_capacity(cycles);
    let mut missing = 0;
    let run_started = Instant::now();
    for c in 0..cycles {
        // Spread over operators and groups; one cycle at a time, so each is timed alone.
        let operator = &drivers[(c * 7919) % drivers.len()];
        let (tx, rx) = oneshot::channel();
        operator.send(tx).await.map_err(|_| anyhow!("an operator's socket closed"))?;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(Ok(latency))) => latencies.push(latency),
            _ => missing += 1,
        }
    }
    let elapsed = run_started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "freed slot -> offer on the operator's socket (close sent, next offer read): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} cycles ({:.0} cycles/s one at a time); no offer within 10 s: {missing}",
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 90.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        latencies.len(),
        latencies.len() as f64 / elapsed,
    );
    drop(sockets);
    Ok(())
}

/// One operator: accepts every offer, keeps the conversations they hold, and on a cycle
/// closes the oldest and times the next offer on this socket.
async fn operator(mut ws: WsClient, mut cycles: mpsc::Receiver<Cycle>, filled: mpsc::Sender<()>) {
    let mut held: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let mut told_full = false;
    let mut waiting: Option<(Instant, Cycle)> = None;
    loop {
        tokio::select! {
            cycle = cycles.recv(), if waiting.is_none() => {
                let Some(cycle) = cycle else { return };
                let Some(conversation) = held.pop_front() else {
                    let _ = cycle.send(Err(anyhow!("this operator holds nothing")));
                    continue;
                };
                let sent = Instant::now();
                if ws.send(&json!({"type": "close", "conversation": conversation, "resolution": "done"})).await.is_err() {
                    let _ = cycle.send(Err(anyhow!("socket closed")));
                    return;
                }
                waiting = Some((sent, cycle));
            }
            frame = ws.next(Duration::from_secs(3600)) => match frame {
                Ok(Incoming::Json(v)) if v["type"] == "event" && v["kind"] == "offer" => {
                    if let Some((sent, cycle)) = waiting.take() {
                        let _ = cycle.send(Ok(sent.elapsed()));
                    }
                    let _ = ws.send(&json!({"type": "accept", "offer": v["offer"]})).await;
                }
                Ok(Incoming::Json(v)) if v["type"] == "event" && v["kind"] == "assigned" => {
                    if let Some(c) = v["conversation"].as_u64() {
                        held.push_back(c);
                    }
                    if held.len() == CAPACITY as usize && !told_full {
                        told_full = true;
                        let _ = filled.send(()).await;
                    }
                }
                Ok(Incoming::Closed { .. }) | Err(_) => return,
                _ => {}
            }
        }
    }
}
