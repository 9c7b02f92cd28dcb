//! `switchboard bench --channels SECONDS`: issue 11's budgets through a real node.
//!
//! One `switchboard dev` node with a Telegram channel and a Channel API channel, both
//! pointed at providers faked inside this process (the Bot API is not called in the
//! inbound phase; the Channel API adapter answers every delivery at once). 200 operators
//! (capacity 5) hold 1,000 conversations: 500 started by Telegram webhooks, 500 through
//! the Channel API.
//!
//! - **Inbound**: Telegram webhooks at `--rate` messages a second (default 1,000) for
//!   SECONDS, open loop, over keep-alive connections; each is timed from the webhook's
//!   request to the message arriving on its operator's socket.
//! - **Outbound**: operators write replies in the Channel API conversations at
//!   `--outbound-rate` a second (default 2,500) for SECONDS; each is timed from its
//!   commit (the operator's ack) to the fake adapter receiving it, and the run ends when
//!   every delivery's `sent` status is committed back (the outbox is empty).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use switchboard_gateway::client::{http_json, Incoming, WsClient};
use tokio::sync::mpsc;

use crate::bench::{login, percentile, put, BenchArgs};

const OPERATORS: usize = 200;
const CAPACITY: u32 = 5;
const SENDERS: usize = 500;
const SECRET: &str = "bench_webhook_secret_0123";

#[derive(Default)]
struct Times {
    /// Inbound message n: when its webhook was sent, when the operator saw it.
    hook_sent: HashMap<u64, Instant>,
    hook_answered: Vec<Duration>,
    hook_seen: HashMap<u64, Instant>,
    /// Outbound reply n: when it was committed (acked), when the adapter got it.
    acked: HashMap<u64, Instant>,
    received: HashMap<u64, Instant>,
}

type Shared = Arc<Mutex<Times>>;

fn number(text: &str, prefix: char) -> Option<u64> {
    text.strip_prefix(prefix)?.parse().ok()
}

pub async fn run(args: BenchArgs, seconds: u64, outbound_rate: u32) -> anyhow::Result<()> {
    let rate = if args.rate == 500 { 1000 } else { args.rate };
    if rate == 0 || outbound_rate == 0 || seconds == 0 {
        bail!("rates and seconds must be positive");
    }
    let times: Shared = Arc::default();
    let adapter = fake_adapter(times.clone()).await?;
    let child = crate::bench::spawn_node(&args).await?;
    let admin_password = child.logins.get("admin").cloned().ok_or_else(|| anyhow!("no admin login"))?;
    let admin = login(&child.private, "admin", &admin_password).await?;
    let started = Instant::now();
    put(&child.private, &admin, "/api/skill-groups/msg", json!({"name": "Messengers", "offer_timeout_ms": 600_000})).await?;
    put(&child.private, &admin, "/api/channels/tg", json!({"kind": "telegram", "name": "Telegram", "default_group": "msg"})).await?;
    put(&child.private, &admin, "/api/channels/tg/adapter", json!({"kind": "telegram", "bot_token": "1:bench", "secret": SECRET, "api_base": "http://127.0.0.1:9"})).await?;
    put(&child.private, &admin, "/api/channels/api", json!({"kind": "api", "name": "API", "default_group": "msg"})).await?;
    let (status, settings) = http_json(&child.private, "PUT", "/api/channels/api/adapter", Some(&admin), Some(&json!({"kind": "api", "outbound_url": format!("http://{adapter}/outbound")}))).await?;
    if status != 200 {
        bail!("setting the Channel API adapter: {status} {settings}");
    }
    let token = settings["token"].as_str().unwrap_or_default().to_owned();

    let assigned = Arc::new(AtomicUsize::new(0));
    let holders: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut operators = Vec::with_capacity(OPERATORS);
    for i in 0..OPERATORS {
        let id = format!("msg-{i}");
        let password = format!("msg-password-{i}");
        put(&child.private, &admin, &format!("/api/operators/{id}"), json!({"name": id, "capacity": CAPACITY, "groups": ["msg"]})).await?;
        put(&child.private, &admin, &format!("/api/users/{id}"), json!({"password": password, "role": "operator", "operator": id})).await?;
        let token = login(&child.private, &id, &password).await?;
        let ws = WsClient::connect(&child.private, &format!("/ws/operator?token={token}"), None).await?;
        ws.send(&json!({"type": "presence", "status": "online"})).await?;
        let (tx, rx) = mpsc::unbounded_channel::<u64>();
        operators.push(tx);
        tokio::spawn(operator(i, ws, rx, times.clone(), assigned.clone(), holders.clone()));
    }
    println!("set up {OPERATORS} operators in {:.0} s; starting {} conversations …", started.elapsed().as_secs_f64(), 2 * SENDERS);

    let client = switchboard_adapters::http::Client::new(Duration::from_secs(30))?;
    let hook = format!("http://{}/hooks/telegram/tg", child.public);
    for i in 0..SENDERS {
        let (status, body) = webhook(&client, &hook, i, 0, "hello").await?;
        if status != 200 {
            bail!("the first webhook of sender {i}: {status} {body}");
        }
        let push = json!({"sender": format!("api-{i}"), "sender_name": "Bench", "message_id": "0", "text": "hello"});
        let (status, body) = http_json(&child.private, "POST", "/api/channel-api/api/messages", Some(&token), Some(&push)).await?;
        if status != 200 {
            bail!("the first Channel API message of sender {i}: {status} {body}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while assigned.load(Relaxed) < 2 * SENDERS {
        if Instant::now() > deadline {
            bail!("only {} of {} conversations were assigned", assigned.load(Relaxed), 2 * SENDERS);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("set up: {} conversations assigned in {:.0} s", 2 * SENDERS, started.elapsed().as_secs_f64());

    // Inbound, open loop.
    let total = rate as u64 * seconds;
    let phase = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for n in 1..=total {
        let due = phase + Duration::from_secs_f64(n as f64 / f64::from(rate));
        tokio::time::sleep_until(due.into()).await;
        let (client, hook, times) = (client.clone(), hook.clone(), times.clone());
        sends.spawn(async move {
            let sent = Instant::now();
            times.lock().unwrap_or_else(|p| p.into_inner()).hook_sent.insert(n, sent);
            let answered = webhook(&client, &hook, (n % SENDERS as u64) as usize, n, &format!("b{n}")).await;
            let took = sent.elapsed();
            match answered {
                Ok((200, _)) => times.lock().unwrap_or_else(|p| p.into_inner()).hook_answered.push(took),
                Ok((status, body)) => eprintln!("webhook {n}: {status} {body}"),
                Err(e) => eprintln!("webhook {n}: {e}"),
            }
        });
    }
    while sends.join_next().await.is_some() {}
    let sending = phase.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let t = times.lock().unwrap_or_else(|p| p.into_inner());
        let mut latencies: Vec<Duration> = t.hook_seen.iter().filter_map(|(n, seen)| t.hook_sent.get(n).map(|sent| seen.duration_since(*sent))).collect();
        latencies.sort();
        let mut answered = t.hook_answered.clone();
        answered.sort();
        println!(
            "inbound: {total} Telegram webhooks at {:.0}/s; webhook -> operator's socket p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} seen, {} missing); webhook answered (committed) p50 {:.2} ms, p99 {:.2} ms",
            total as f64 / sending,
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 90.0)),
            ms(percentile(&latencies, 99.0)),
            ms(latencies.last().copied().unwrap_or_default()),
            latencies.len(),
            total as usize - latencies.len(),
            ms(percentile(&answered, 50.0)),
            ms(percentile(&answered, 99.0)),
        );
    }

    // Outbound, open loop over the operators.
    let total = outbound_rate as u64 * seconds;
    let holders = holders.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let phase = Instant::now();
    for n in 1..=total {
        let due = phase + Duration::from_secs_f64(n as f64 / f64::from(outbound_rate));
        tokio::time::sleep_until(due.into()).await;
        operators[holders[(n as usize) % holders.len()]].send(n).map_err(|_| anyhow!("an operator's socket closed"))?;
    }
    let writing = phase.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (acked, received) = {
            let t = times.lock().unwrap_or_else(|p| p.into_inner());
            (t.acked.len(), t.received.len())
        };
        if (acked as u64 >= total && received >= acked) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every `sent` committed back: the outbox is empty.
    let drained = loop {
        let (_, metrics) = http_json(&child.private, "GET", "/metrics", None, None).await?;
        let empty = metrics.as_str().and_then(|m| m.lines().find(|l| l.starts_with("switchboard_outbox_entries "))).is_some_and(|l| l.ends_with(" 0"));
        if empty || Instant::now() > deadline {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (_, metrics) = http_json(&child.private, "GET", "/metrics", None, None).await?;
    let attempts: Vec<&str> = metrics.as_str().map(|m| m.lines().filter(|l| l.starts_with("switchboard_outbox_attempts_total{")).collect()).unwrap_or_default();
    println!("outbox: {}", attempts.join(", "));
    let t = times.lock().unwrap_or_else(|p| p.into_inner());
    let mut latencies: Vec<Duration> = t.received.iter().filter_map(|(n, got)| t.acked.get(n).map(|acked| got.saturating_duration_since(*acked))).collect();
    latencies.sort();
    let first_ack = t.acked.values().min().copied().context("nothing was acked")?;
    let last_received = t.received.values().max().copied().context("nothing was received")?;
    let span = last_received.duration_since(first_ack).as_secs_f64();
    println!(
        "outbound: {} replies committed at {:.0}/s; the fake adapter received {} in {:.2} s from the first commit = {:.0}/s; commit -> provider p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; every status committed back {:.0} ms after the last delivery",
        t.acked.len(),
        t.acked.len() as f64 / writing,
        t.received.len(),
        span,
        t.received.len() as f64 / span,
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 90.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default()),
        drained.duration_since(last_received).as_secs_f64() * 1e3,
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn webhook(client: &switchboard_adapters::http::Client, url: &str, sender: usize, message: u64, text: &str) -> anyhow::Result<(u16, String)> {
    let update = json!({"update_id": message, "message": {"message_id": message, "date": 0, "chat": {"id": 1_000_000 + sender, "type": "private"}, "from": {"id": 1, "first_name": "Bench"}, "text": text}});
    let response = client
        .post_json(url, &[("x-telegram-bot-api-secret-token", SECRET.to_owned())], update.to_string().into_bytes())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok((response.status, String::from_utf8_lossy(&response.body).into_owned()))
}

/// An adapter of the Channel API that takes every delivery at once.
async fn fake_adapter(times: Shared) -> anyhow::Result<std::net::SocketAddr> {
    use axum::extract::State;
    let app = axum::Router::new()
        .route(
            "/outbound",
            axum::routing::post(|State(times): State<Shared>, body: axum::body::Bytes| async move {
                let got = Instant::now();
                let value: Value = serde_json::from_slice(&body).unwrap_or_default();
                if let Some(n) = value["text"].as_str().and_then(|t| number(t, 'o')) {
                    times.lock().unwrap_or_else(|p| p.into_inner()).received.entry(n).or_insert(got);
                }
                axum::Json(json!({"provider_message_id": value["delivery_id"]}))
            }),
        )
        .with_state(times);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// One operator: accepts every offer, notes the Channel API conversations it holds,
/// timestamps inbound bench messages as they arrive, and writes a reply when told.
async fn operator(index: usize, mut ws: WsClient, mut replies: mpsc::UnboundedReceiver<u64>, times: Shared, assigned: Arc<AtomicUsize>, holders: Arc<Mutex<Vec<usize>>>) {
    let mut api_conversations: Vec<u64> = Vec::new();
    let mut next = 0usize;
    let mut waiting: Vec<u64> = Vec::new();
    loop {
        tokio::select! {
            reply = replies.recv() => {
                let Some(n) = reply else { return };
                waiting.push(n);
            }
            frame = ws.next(Duration::from_secs(3600)) => match frame {
                Ok(Incoming::Json(v)) if v["type"] == "event" && v["kind"] == "offer" => {
                    let _ = ws.send(&json!({"type": "accept", "offer": v["offer"]})).await;
                }
                Ok(Incoming::Json(v)) if v["type"] == "event" && v["kind"] == "assigned" => {
                    let channel = v["history"].as_array().and_then(|h| h.iter().find(|e| e["kind"] == "started")).map(|e| e["channel"].clone());
                    if let (Some(c), Some(json_channel)) = (v["conversation"].as_u64(), channel) {
                        if json_channel == "api" {
                            if api_conversations.is_empty() {
                                holders.lock().unwrap_or_else(|p| p.into_inner()).push(index);
                            }
                            api_conversations.push(c);
                        }
                    }
                    assigned.fetch_add(1, Relaxed);
                }
                Ok(Incoming::Json(v)) if v["type"] == "event" && v["kind"] == "conversation" => {
                    if let Some(n) = v["entry"]["text"].as_str().and_then(|t| number(t, 'b')) {
                        times.lock().unwrap_or_else(|p| p.into_inner()).hook_seen.entry(n).or_insert_with(Instant::now);
                    }
                }
                Ok(Incoming::Json(v)) if v["type"] == "ack" => {
                    if let Some(n) = v["ref"].as_str().and_then(|t| number(t, 'o')) {
                        times.lock().unwrap_or_else(|p| p.into_inner()).acked.insert(n, Instant::now());
                    }
                }
                Ok(Incoming::Closed { .. }) | Err(_) => return,
                _ => {}
            }
        }
        // The dispatcher only picks operators holding a Channel API conversation.
        for n in waiting.drain(..) {
            if api_conversations.is_empty() {
                continue;
            }
            let conversation = api_conversations[next % api_conversations.len()];
            next += 1;
            let key = format!("o{n}");
            let _ = ws.send(&json!({"type": "send", "conversation": conversation, "key": key, "text": key, "ref": key})).await;
        }
    }
}
