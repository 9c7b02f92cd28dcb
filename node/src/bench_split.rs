//! `switchboard bench --split N`: ADR 0006's split on real Raft groups in this process
//! (the metadata group, one routing shard and N conversation shards, each with its own log and records on
//! this machine's disk, letters carried by the forwarders), without sockets or a
//! gateway: how many client messages a second the conversation shards commit, and how
//! that changes with N; with `--nodes 3`, on three members in this process, each group
//! replicated on all of them and each client writing through one of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use switchboard_actors::core::Reply;
use switchboard_actors::model::*;
use switchboard_actors::state::ConversationStatus;

use crate::bench::{folder_bytes, print_latencies, BenchArgs};
use crate::groups::{SplitNode, FIRST_C, G0, R};

/// A client message's text: 200 characters, as in the other benches.
fn text() -> String {
    "x".repeat(200)
}

pub async fn run(args: BenchArgs, shards: u64) -> anyhow::Result<()> {
    if !(1..=256).contains(&shards) {
        bail!("--split takes 1 to 256 conversation shards");
    }
    if args.clients == 0 || args.operators == 0 {
        bail!("clients and operators must be positive");
    }
    let temp = tempfile::tempdir()?;
    let dir = args.data_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let members = args.nodes.max(1) as u64;
    println!("bench: the metadata group, one routing shard and {shards} conversation shard(s) on real Raft groups, {members} member(s) in this process, in {}", dir.display());
    let nodes = if members > 1 {
        SplitNode::cluster(&dir, members, shards).await.context("start the members")?
    } else {
        vec![SplitNode::start(&dir, shards, true).await.context("start the groups")?]
    };
    let nodes = Arc::new(nodes);
    let node = &nodes[0];

    // The directory is decided by the metadata group and reaches the other groups by letter.
    let group = SkillGroupId::new("support");
    let capacity = u32::try_from(args.clients.div_ceil(args.operators) + 1)?;
    let mut directory = vec![
        Command::UpsertSkillGroup(SkillGroupConfig { id: group.clone(), name: "Support".into(), policy: Policy::LeastOccupied, offer_timeout_ms: 120_000, sla_ms: 60_000 }),
        Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), name: "Web".into(), kind: "web".into(), default_group: group.clone() }),
    ];
    let operators: Vec<OperatorId> = (0..args.operators).map(|i| OperatorId::new(format!("op-{i}"))).collect();
    for op in &operators {
        directory.insert(1, Command::UpsertOperator(OperatorConfig { id: op.clone(), name: op.0.clone(), capacity, groups: vec![group.clone()] }));
    }
    for command in directory {
        node.submit(G0, command).await?;
    }
    if !node.until(R, Duration::from_secs(30), |s| operators.iter().all(|op| s.operators.contains_key(op))).await {
        bail!("the directory did not reach the routing shard within 30 s");
    }
    for op in &operators {
        node.submit(R, Command::SetPresence { operator: op.clone(), presence: Presence::Online }).await?;
    }
    for k in 0..shards {
        if !node.until(FIRST_C + k, Duration::from_secs(30), |s| s.channels.contains_key(&ChannelId::new("web"))).await {
            bail!("the directory did not reach conversation shard {k} within 30 s");
        }
    }

    // Conversations spread over the shards (and their starts over the members),
    // offered by routing and accepted.
    let began = Instant::now();
    let starts = (0..args.clients).map(|i| {
        let nodes = nodes.clone();
        async move {
            let node = &nodes[i % nodes.len()];
            let visitor = Visitor { id: Some(format!("v-{i}")), name: format!("Visitor {i}"), attributes: vec![] };
            match node.submit(FIRST_C + i as u64 % shards, Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor }).await {
                Ok(Reply::Started { conversation }) => Ok(conversation),
                Ok(other) => Err(anyhow::anyhow!("a start was answered {other:?}")),
                Err(e) => Err(anyhow::anyhow!("a start failed: {e}")),
            }
        }
    });
    let conversations: Vec<ConversationId> = futures::future::join_all(starts).await.into_iter().collect::<anyhow::Result<_>>()?;
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let (offers, held) = {
            let state = node.groups[&R].shard.read();
            let offers: Vec<(OperatorId, OfferId)> = state.offers.values().map(|o| (o.operator.clone(), o.id)).collect();
            let held = conversations.iter().filter(|c| matches!(state.conversations.get(c).map(|c| &c.status), Some(ConversationStatus::Assigned { .. }))).count();
            (offers, held)
        };
        if held == conversations.len() {
            break;
        }
        if Instant::now() > give_up {
            bail!("only {held} of {} conversations were assigned within 120 s", conversations.len());
        }
        let accepts = offers.into_iter().map(|(operator, offer)| node.submit(R, Command::AcceptOffer { operator, offer }));
        futures::future::join_all(accepts).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Each conversation shard learns its holders by letter.
    for conversation in &conversations {
        let group = node.group_of(*conversation);
        if !node.until(group, Duration::from_secs(60), |s| s.conversations.get(conversation).is_some_and(|c| c.assigned().is_some())).await {
            bail!("{conversation}'s shard did not hear of its assignment within 60 s");
        }
    }
    println!("bench: {} conversations started, queued, offered, accepted and known as held by their shards in {:.2} s", conversations.len(), began.elapsed().as_secs_f64());

    // Closed loop: every client keeps one message in flight.
    println!("bench: {} clients, each with one message in flight, for {} s…", args.clients, args.duration);
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let clients = conversations.iter().enumerate().map(|(i, conversation)| {
        let (nodes, conversation) = (nodes.clone(), *conversation);
        async move {
            // Each client writes through one member, which forwards to the shard's leader.
            let node = &nodes[i % nodes.len()];
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            let group = node.group_of(conversation);
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let sent = Instant::now();
                let message = Command::PostClientMessage { conversation, key: format!("m-{n}"), text: text(), attachments: vec![] };
                match node.submit(group, message).await {
                    Ok(Reply::Message { .. }) => latencies.push(sent.elapsed()),
                    _ => failed += 1,
                }
            }
            (latencies, failed)
        }
    });
    let results = futures::future::join_all(clients).await;
    let failed: u64 = results.iter().map(|(_, f)| f).sum();
    let mut latencies: Vec<Duration> = results.into_iter().flat_map(|(l, _)| l).collect();
    latencies.sort();
    let seconds = args.duration.max(1) as f64;
    println!(
        "bench: {} client messages committed in {} s: {:.0} msg/s over {shards} conversation shard(s); {failed} refused or failed",
        latencies.len(),
        args.duration,
        latencies.len() as f64 / seconds
    );
    print_latencies("commit", &latencies);
    let letters: u64 = node.groups.values().map(|g| g.shard.read().mail_in.sources().map(|(_, last)| last).sum::<u64>()).sum();
    println!("  letters applied across the groups: {letters}; data folder {:.1} MiB", folder_bytes(&dir) as f64 / 1048576.0);
    match Arc::try_unwrap(nodes) {
        Ok(nodes) => {
            for stopped in futures::future::join_all(nodes.into_iter().map(SplitNode::stop)).await {
                stopped?;
            }
        }
        Err(_) => bail!("the groups are still in use"),
    }
    Ok(())
}
