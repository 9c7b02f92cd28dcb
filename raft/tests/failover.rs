//! One group on three in-process replicas over real QUIC with mutual TLS on loopback:
//! the leader is killed and a new leader commits; a node without a cluster certificate
//! cannot talk to the group.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use switchboard_raft::network::{serve, NetworkFactory, Router};
use switchboard_raft::store::open_group;
use switchboard_raft::{default_config, tls, Node, Raft, Request};

struct Replica {
    id: u64,
    raft: Raft,
    endpoint: quinn::Endpoint,
    journal: Arc<common::Journal>,
    _db: sled::Db,
}

async fn start_replica(id: u64, certs: &std::path::Path, data: &std::path::Path) -> anyhow::Result<Replica> {
    let identity = tls::ensure_member(certs, &format!("node-{id}"), &[])?;
    let endpoint = tls::endpoint(&identity, "127.0.0.1:0".parse()?)?;
    let db = sled::open(data.join(format!("node-{id}")))?;
    let journal = Arc::new(common::Journal::default());
    let (log, sm) = open_group(&db, 7, journal.clone())?;
    let raft = Raft::new(id, default_config()?, NetworkFactory::new(endpoint.clone(), 7), log, sm).await?;
    let router = Router::default();
    router.add(7, raft.clone());
    serve(endpoint.clone(), router);
    Ok(Replica { id, raft, endpoint, journal, _db: db })
}

async fn wait_for_leader(replicas: &[&Replica], not: Option<u64>) -> anyhow::Result<u64> {
    for _ in 0..100 {
        for r in replicas {
            if let Some(leader) = r.raft.metrics().borrow().current_leader {
                if Some(leader) != not && replicas.iter().any(|x| x.id == leader) {
                    return Ok(leader);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no leader elected within 5 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_leader_commits_after_leader_is_killed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let mut replicas = Vec::new();
    for id in 1..=3 {
        replicas.push(start_replica(id, &certs, dir.path()).await?);
    }
    let members: BTreeMap<u64, Node> =
        replicas.iter().map(|r| (r.id, Node { addr: r.endpoint.local_addr().unwrap().to_string() })).collect();
    replicas[0].raft.initialize(members).await?;

    let all: Vec<&Replica> = replicas.iter().collect();
    let leader = wait_for_leader(&all, None).await?;
    let leader_replica = replicas.iter().find(|r| r.id == leader).unwrap();
    leader_replica.raft.client_write(Request(b"before".to_vec())).await?;

    // Kill the leader: its Raft stops and its endpoint drops every connection.
    leader_replica.raft.shutdown().await?;
    leader_replica.endpoint.close(0u32.into(), b"killed");

    let survivors: Vec<&Replica> = replicas.iter().filter(|r| r.id != leader).collect();
    let new_leader = wait_for_leader(&survivors, Some(leader)).await?;
    assert_ne!(new_leader, leader);
    let new_leader_replica = survivors.iter().find(|r| r.id == new_leader).unwrap();
    let mut committed = false;
    for _ in 0..50 {
        if new_leader_replica.raft.client_write(Request(b"after".to_vec())).await.is_ok() {
            committed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(committed, "the new leader could not commit");

    // Both survivors apply the same entries in the same order.
    for _ in 0..50 {
        let logs: BTreeSet<Vec<Vec<u8>>> = survivors.iter().map(|r| r.journal.entries.lock().unwrap().clone()).collect();
        if logs.len() == 1 && logs.iter().next().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in &survivors {
        assert_eq!(*r.journal.entries.lock().unwrap(), vec![b"before".to_vec(), b"after".to_vec()]);
    }
    for r in &survivors {
        r.raft.shutdown().await?;
        r.endpoint.close(0u32.into(), b"done");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_without_cluster_certificate_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let replica = start_replica(1, &dir.path().join("certs"), dir.path()).await?;
    // A stranger with its own CA: the handshake must fail both ways.
    let stranger_identity = tls::ensure_member(&dir.path().join("other-ca"), "stranger", &[])?;
    let stranger = tls::endpoint(&stranger_identity, "127.0.0.1:0".parse()?)?;
    let result = stranger.connect(replica.endpoint.local_addr()?, tls::NODE_SERVER_NAME)?.await;
    assert!(result.is_err(), "a peer from another CA must not connect");
    stranger.close(0u32.into(), b"");
    replica.raft.shutdown().await?;
    replica.endpoint.close(0u32.into(), b"");
    Ok(())
}
