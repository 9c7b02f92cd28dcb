//! One group on three in-process replicas over real QUIC with mutual TLS on loopback:
//! the leader is killed and a new leader commits; a replica that joins after the log was
//! purged is brought up to date by a snapshot sent over QUIC; a peer without a cluster
//! certificate cannot talk to the group, whichever side checks.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use switchboard_raft::network::{serve, NetworkFactory, Router};
use switchboard_raft::store::{open_group, open_keyspace};
use switchboard_raft::{config_with_snapshots, default_config, tls, Node, Raft, Request};

struct Replica {
    id: u64,
    raft: Raft,
    router: Router,
    endpoint: quinn::Endpoint,
    journal: Arc<common::Journal>,
    _db: fjall::Keyspace,
}

async fn start_replica(id: u64, certs: &std::path::Path, data: &std::path::Path) -> anyhow::Result<Replica> {
    start_replica_with(id, certs, data, default_config()?).await
}

async fn start_replica_with(id: u64, certs: &std::path::Path, data: &std::path::Path, config: Arc<openraft::Config>) -> anyhow::Result<Replica> {
    let identity = tls::ensure_member(certs, &format!("node-{id}"), &[])?;
    let endpoint = tls::endpoint(&identity, "127.0.0.1:0".parse()?)?;
    let db = open_keyspace(&data.join(format!("node-{id}")), &[])?;
    let journal = Arc::new(common::Journal::default());
    let (log, sm) = open_group(&db, 7, journal.clone(), &data.join(format!("node-{id}-snapshots")), &data.join(format!("node-{id}-log")))?;
    let raft = Raft::new(id, config, NetworkFactory::new(endpoint.clone(), 7), log, sm).await?;
    let router = Router::default();
    router.add(7, raft.clone());
    serve(endpoint.clone(), router.clone());
    Ok(Replica { id, raft, router, endpoint, journal, _db: db })
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

/// A leader that just took over may refuse writes for a moment; retry, bounded.
async fn commits_within_5s(replica: &Replica, entry: &[u8]) -> bool {
    for _ in 0..50 {
        if replica.raft.client_write(Request(entry.to_vec())).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
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
    assert!(commits_within_5s(new_leader_replica, b"after").await, "the new leader could not commit");

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

/// A server that shows `identity`'s certificate and asks the client for none, so when a
/// node dials it only the node's own check of the server can refuse the connection.
fn server_asking_no_client_certificate(identity: &tls::Identity, bind: std::net::SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_file(&identity.cert)?];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&identity.key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    let config = quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(tls)?));
    let endpoint = quinn::Endpoint::server(config, bind)?;
    // Completes every handshake it is offered and keeps the connections open.
    let serving = endpoint.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = serving.accept().await {
            if let Ok(connection) = incoming.await {
                held.push(connection);
            }
        }
    });
    Ok(endpoint)
}

/// The client side of mutual TLS: a node dialling an address where a stranger answers
/// (a spoofed or stale peer address) refuses the stranger's certificate itself. The
/// server side is `the_server_refuses_clients_without_a_cluster_certificate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_without_cluster_certificate_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let replica = start_replica(1, &certs, dir.path()).await?;
    let within_5s = |connecting: quinn::Connecting| async move {
        tokio::time::timeout(Duration::from_secs(5), connecting).await.map_err(|_| anyhow::anyhow!("timed out"))
    };

    // Control: a server with a cluster certificate is accepted by the node.
    let member = tls::ensure_member(&certs, "node-9", &[])?;
    let member_server = server_asking_no_client_certificate(&member, "127.0.0.1:0".parse()?)?;
    let accepted = within_5s(replica.endpoint.connect(member_server.local_addr()?, tls::NODE_SERVER_NAME)?).await?;
    assert!(accepted.is_ok(), "the node must connect to a server with a cluster certificate: {accepted:?}");

    // The same server with a certificate from another CA, for the same name.
    let foreign = tls::ensure_member(&dir.path().join("other-ca"), "stranger", &[])?;
    let stranger = server_asking_no_client_certificate(&foreign, "127.0.0.1:0".parse()?)?;
    let refused = within_5s(replica.endpoint.connect(stranger.local_addr()?, tls::NODE_SERVER_NAME)?).await?;
    // A transport error is one this side detected; had the stranger closed the
    // connection, it would be `ConnectionClosed`.
    assert!(
        matches!(refused, Err(quinn::ConnectionError::TransportError(_))),
        "the node itself must refuse a server from another CA: {refused:?}"
    );

    member_server.close(0u32.into(), b"");
    stranger.close(0u32.into(), b"");
    replica.raft.shutdown().await?;
    replica.endpoint.close(0u32.into(), b"");
    Ok(())
}

/// An append of one entry and a snapshot install, each as if from `leader` leading a
/// `term` (far past the group's), named `label`: what a peer that is not that leader
/// must not get taken.
fn as_leader_of_a_later_term(term: u64, leader: u64, label: &str) -> (openraft::raft::AppendEntriesRequest<switchboard_raft::TypeConfig>, openraft::raft::InstallSnapshotRequest<switchboard_raft::TypeConfig>) {
    let vote = openraft::Vote::new_committed(term, leader);
    let log_id = openraft::LogId::new(openraft::CommittedLeaderId::new(term, leader), 1_000);
    let entry = openraft::Entry::<switchboard_raft::TypeConfig> { log_id, payload: openraft::EntryPayload::Normal(Request(label.as_bytes().to_vec())) };
    let append = openraft::raft::AppendEntriesRequest { vote, prev_log_id: None, entries: vec![entry], leader_commit: None };
    let meta = openraft::SnapshotMeta { last_log_id: Some(log_id), last_membership: Default::default(), snapshot_id: label.into() };
    let install = openraft::raft::InstallSnapshotRequest { vote, meta, offset: 0, data: b"not a snapshot".to_vec(), done: true };
    (append, install)
}

fn addr(r: &Replica) -> anyhow::Result<Node> {
    Ok(Node { addr: r.endpoint.local_addr()?.to_string() })
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..100 {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what} did not happen within 5 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joining_after_the_log_was_purged_gets_a_snapshot_over_quic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let config = config_with_snapshots(10)?;
    let first = start_replica_with(1, &certs, dir.path(), config.clone()).await?;
    let second = start_replica_with(2, &certs, dir.path(), config.clone()).await?;
    first.raft.initialize(BTreeMap::from([(1, addr(&first)?), (2, addr(&second)?)])).await?;
    let leader_id = wait_for_leader(&[&first, &second], None).await?;
    let leader = if leader_id == 1 { &first } else { &second };
    for n in 0..50u32 {
        leader.raft.client_write(Request(n.to_be_bytes().to_vec())).await?;
    }
    // The leader snapshotted and purged the log the newcomer would need.
    wait_until("snapshot and purge on the leader", || {
        let m = leader.raft.metrics().borrow().clone();
        m.snapshot.is_some_and(|s| s.index >= 40) && m.purged.is_some_and(|p| p.index >= 30)
    })
    .await?;

    let third = start_replica_with(3, &certs, dir.path(), config.clone()).await?;
    leader.raft.add_learner(3, addr(&third)?, true).await?;
    wait_until("the newcomer catching up", || third.journal.entries.lock().unwrap().len() == 50).await?;
    let installed = third.raft.metrics().borrow().snapshot;
    assert!(installed.is_some_and(|s| s.index >= 40), "the newcomer started from the leader's snapshot: {installed:?}");
    let expected: Vec<Vec<u8>> = (0..50u32).map(|n| n.to_be_bytes().to_vec()).collect();
    assert_eq!(*third.journal.entries.lock().unwrap(), expected, "same entries, same order");

    // As a voter it can carry the group: the old leader dies and a new one commits.
    leader.raft.change_membership(BTreeSet::from([1, 2, 3]), false).await?;
    leader.raft.shutdown().await?;
    leader.endpoint.close(0u32.into(), b"killed");
    let survivors: Vec<&Replica> = [&first, &second, &third].into_iter().filter(|r| r.id != leader_id).collect();
    let new_leader = wait_for_leader(&survivors, Some(leader_id)).await?;
    let new_leader = survivors.iter().find(|r| r.id == new_leader).ok_or_else(|| anyhow::anyhow!("leader not among survivors"))?;
    assert!(commits_within_5s(new_leader, b"after").await, "the new leader could not commit");
    wait_until("the newcomer applying the new entry", || third.journal.entries.lock().unwrap().len() == 51).await?;
    for r in survivors {
        r.raft.shutdown().await?;
        r.endpoint.close(0u32.into(), b"done");
    }
    Ok(())
}

/// A replica joining a group whose log was purged gets a snapshot of 200,000 messages
/// (about 20 MB of records), streamed in chunks over QUIC into a file and loaded into
/// its state tree from there, then serves the same records as the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_installs_a_snapshot_of_200000_messages_over_quic_and_matches_the_leader() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let config = config_with_snapshots(100)?;
    let first = start_replica_with(1, &certs, dir.path(), config.clone()).await?;
    first.raft.initialize(BTreeMap::from([(1, addr(&first)?)])).await?;
    wait_for_leader(&[&first], None).await?;
    for _ in 0..200 {
        first.raft.client_write(Request(common::messages(1000, 100))).await?;
    }
    // Dumping 20 MB in a debug build takes a while: up to 60 s.
    for _ in 0..600 {
        let m = first.raft.metrics().borrow().clone();
        if m.snapshot.is_some_and(|s| s.index >= 190) && m.purged.is_some_and(|p| p.index >= 150) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let second = start_replica_with(2, &certs, dir.path(), config.clone()).await?;
    first.raft.add_learner(2, addr(&second)?, false).await?;
    for _ in 0..600 {
        if second.journal.entries.lock().unwrap().len() >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let installed = second.raft.metrics().borrow().snapshot;
    assert!(installed.is_some_and(|s| s.index >= 190), "the newcomer started from the leader's snapshot: {installed:?}");
    let leader_records = first.journal.all_records();
    let messages = leader_records.iter().filter(|(k, _)| k.first() == Some(&b'm')).count();
    assert!(messages >= 200_000, "the leader holds {messages} messages");
    let replica_records = second.journal.all_records();
    assert_eq!(replica_records.len(), leader_records.len(), "as many records on the replica as on the leader");
    assert!(replica_records == leader_records, "the replica's records are the leader's, byte for byte");

    // It keeps applying after the install.
    first.raft.client_write(Request(b"after".to_vec())).await?;
    wait_until("the newcomer applying the next entry", || second.journal.entries.lock().unwrap().last().map(|e| e.as_slice()) == Some(b"after")).await?;
    // The received snapshot went through a file: nothing partial is left behind.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path().join("node-2-snapshots"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    for r in [&first, &second] {
        r.raft.shutdown().await?;
        r.endpoint.close(0u32.into(), b"done");
    }
    Ok(())
}

/// A client that trusts the cluster CA, so only the server's check can refuse it.
fn client_trusting_cluster(certs: &std::path::Path, identity: Option<&tls::Identity>) -> anyhow::Result<quinn::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(certs.join("ca.pem"))?)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = vec![rustls::pki_types::CertificateDer::from_pem_file(&id.cert)?];
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&id.key)?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?)))
}

/// Connects and makes one request; the result says whether the server let it through.
async fn try_request(config: quinn::ClientConfig, server: std::net::SocketAddr) -> anyhow::Result<Vec<u8>> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(config);
    let attempt = async {
        let connection = endpoint.connect(server, tls::NODE_SERVER_NAME)?.await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(b"not a raft request").await?;
        send.finish()?;
        Ok::<Vec<u8>, anyhow::Error>(recv.read_to_end(1 << 16).await?)
    };
    let result = tokio::time::timeout(Duration::from_secs(5), attempt).await;
    endpoint.close(0u32.into(), b"");
    match result {
        Ok(inner) => inner,
        Err(_) => anyhow::bail!("timed out"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_clients_without_a_cluster_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let replica = start_replica(1, &certs, dir.path()).await?;
    let server = replica.endpoint.local_addr()?;

    // Control: a cluster member gets through the handshake and is answered.
    let member = tls::ensure_member(&certs, "node-9", &[])?;
    let answered = try_request(client_trusting_cluster(&certs, Some(&member))?, server).await;
    assert!(answered.is_ok(), "a member must be able to talk to the node: {answered:?}");

    // No client certificate at all.
    let anonymous = try_request(client_trusting_cluster(&certs, None)?, server).await;
    assert!(anonymous.is_err(), "a client without a certificate was answered");
    // A certificate from another CA.
    let foreign = tls::ensure_member(&dir.path().join("other-ca"), "stranger", &[])?;
    let forged = try_request(client_trusting_cluster(&certs, Some(&foreign))?, server).await;
    assert!(forged.is_err(), "a client with a foreign certificate was answered");

    replica.raft.shutdown().await?;
    replica.endpoint.close(0u32.into(), b"");
    Ok(())
}

/// Certificates carry a role: one issued to a gateway may relay client work to members
/// (which decide it as their own edge would) and ask where the groups are; its writes,
/// votes, entries and snapshots are refused, and it cannot pass for a node to a member
/// that dials it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_certificate_proposes_nothing_and_takes_no_part_in_raft() -> anyhow::Result<()> {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let replica = start_replica(1, &certs, dir.path()).await?;
    replica.raft.initialize(BTreeMap::from([(1, addr(&replica)?)])).await?;
    wait_for_leader(&[&replica], None).await?;
    // One write applied, and the metrics showing it, before the log's end is taken.
    let first = replica.raft.client_write(Request(b"before the gateway's tries".to_vec())).await?;
    let settled = replica.raft.wait(Some(Duration::from_secs(10))).applied_index_at_least(Some(first.log_id.index), "the first write").await?;
    let (term, before) = (settled.current_term, settled.last_log_index);

    let gateway = tls::ensure_member_as(&certs, "gateway-a", tls::Role::Gateway, &[])?;
    let endpoint = tls::endpoint(&gateway, "127.0.0.1:0".parse()?)?;
    let target = replica.endpoint.local_addr()?.to_string();

    // A command is not: the gateway relays its clients' requests, which the member
    // authorises; a write of its own would pass every check the member makes.
    let forwarder = switchboard_raft::network::Forwarder::new(switchboard_raft::network::Peers::new(endpoint.clone()));
    let written = forwarder.write(7, &target, Request(b"from a gateway".to_vec()), Duration::from_secs(5)).await;
    assert!(written.is_err(), "a gateway's write was taken");
    assert_eq!(replica.raft.metrics().borrow().last_log_index, before, "nothing was appended");

    // Raft traffic is not: a vote for a far higher term changes nothing.
    let mut client = NetworkFactory::new(endpoint.clone(), 7).new_client(1, &addr(&replica)?).await;
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(term + 50, 2), None);
    let answer = client.vote(vote, RPCOption::new(Duration::from_secs(2))).await;
    assert!(answer.is_err(), "a gateway's vote request was answered: {answer:?}");
    assert_eq!(replica.raft.metrics().borrow().current_term, term, "the refused vote did not move the term");
    // Nor entries or a snapshot from a pretended leader of a later term.
    let (append, install) = as_leader_of_a_later_term(term + 50, 2, "from-a-gateway");
    let answer = client.append_entries(append, RPCOption::new(Duration::from_secs(2))).await;
    assert!(format!("{answer:?}").contains("gateway's certificate"), "a gateway's entries were refused for its certificate: {answer:?}");
    let answer = client.install_snapshot(install, RPCOption::new(Duration::from_secs(2))).await;
    assert!(format!("{answer:?}").contains("gateway's certificate"), "a gateway's snapshot was refused for its certificate: {answer:?}");
    let m = replica.raft.metrics().borrow().clone();
    assert_eq!((m.current_term, m.last_log_index, m.current_leader), (term, before, Some(1)), "no entry, snapshot or leader came of them");
    // The member still leads and commits.
    replica.raft.client_write(Request(b"after the gateway's tries".to_vec())).await?;

    // And a node dialling a gateway's endpoint does not take it for a node.
    let dialled = tokio::time::timeout(Duration::from_secs(5), replica.endpoint.connect(endpoint.local_addr()?, tls::NODE_SERVER_NAME)?).await;
    assert!(!matches!(dialled, Ok(Ok(_))), "a gateway's certificate passed for a node's: {dialled:?}");

    endpoint.close(0u32.into(), b"");
    replica.raft.shutdown().await?;
    replica.endpoint.close(0u32.into(), b"");
    Ok(())
}

/// A node's certificate is issued to one node id (`node-<id>`): Raft traffic from it that
/// speaks for another node (a vote as another candidate, entries or a snapshot as another
/// leader, a request to admit another node) is refused, so a node cannot pass for a member it is not; under its own id it
/// is answered as any peer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_speaks_in_raft_only_for_its_own_node_id() -> anyhow::Result<()> {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let replica = start_replica(1, &certs, dir.path()).await?;
    replica.raft.initialize(BTreeMap::from([(1, addr(&replica)?)])).await?;
    wait_for_leader(&[&replica], None).await?;
    // One write applied, and the metrics showing it, before the log's end is taken.
    let written = replica.raft.client_write(Request(b"before node 9's tries".to_vec())).await?;
    let settled = replica.raft.wait(Some(Duration::from_secs(10))).applied_index_at_least(Some(written.log_id.index), "the first write").await?;
    let (term, before) = (settled.current_term, settled.last_log_index);

    // Node 9's certificate, from the cluster's own CA.
    let nine = tls::ensure_member(&certs, "node-9", &[])?;
    let endpoint = tls::endpoint(&nine, "127.0.0.1:0".parse()?)?;
    let mut client = NetworkFactory::new(endpoint.clone(), 7).new_client(1, &addr(&replica)?).await;
    let refused_for_its_id = |answer: &dyn std::fmt::Debug| format!("{answer:?}").contains("only as node [9], not as node 2");

    // As candidate 2, at a far higher term: refused, the term does not move.
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(term + 50, 2), None);
    let answer = client.vote(vote, RPCOption::new(Duration::from_secs(2))).await;
    assert!(refused_for_its_id(&answer), "a vote as another node was refused for the certificate: {answer:?}");
    // As leader 2, entries and a snapshot: refused.
    let (append, install) = as_leader_of_a_later_term(term + 50, 2, "as-node-2");
    let answer = client.append_entries(append, RPCOption::new(Duration::from_secs(2))).await;
    assert!(refused_for_its_id(&answer), "entries as another node were refused for the certificate: {answer:?}");
    let answer = client.install_snapshot(install, RPCOption::new(Duration::from_secs(2))).await;
    assert!(refused_for_its_id(&answer), "a snapshot as another node was refused for the certificate: {answer:?}");
    // Asking to admit node 2 (at this certificate's address or any): refused, the
    // group's members do not change.
    let peers = switchboard_raft::network::Peers::new(endpoint.clone());
    let join = switchboard_raft::members::Change::Join { id: 2, addr: "127.0.0.1:1".into() };
    let answer = peers.change_members(&addr(&replica)?.addr, 7, join, Duration::from_secs(2)).await;
    assert!(refused_for_its_id(&answer), "a join as another node was refused for the certificate: {answer:?}");
    let m = replica.raft.metrics().borrow().clone();
    assert_eq!((m.current_term, m.last_log_index, m.current_leader), (term, before, Some(1)), "no term, entry or leader came of them");
    assert_eq!(m.membership_config.membership().nodes().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1], "nobody was admitted");

    // Under its own id the same certificate is answered: a vote as candidate 9 with no
    // log is heard and not granted (node 1 leads, and its log is ahead).
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(term + 1, 9), None);
    let answer = client.vote(vote, RPCOption::new(Duration::from_secs(2))).await;
    assert!(matches!(&answer, Ok(v) if !v.vote_granted), "a vote under the certificate's own id is answered: {answer:?}");
    // The member still leads and commits.
    replica.raft.client_write(Request(b"after node 9's tries".to_vec())).await?;
    assert_eq!(replica.raft.metrics().borrow().current_leader, Some(1));

    endpoint.close(0u32.into(), b"");
    replica.raft.shutdown().await?;
    replica.endpoint.close(0u32.into(), b"");
    Ok(())
}

/// A change of voters is two entries: a joint membership (old and new voters) and then
/// the new voters alone, which openraft appends from the task that asked for the change.
/// A leader that dies between the two leaves the group on the joint membership, where it
/// needs a majority of both voter sets, with no one to finish the change. Here node 1,
/// played by this test over node 1's own certificate, replicates a log whose last entry
/// is the first half of a change from {1, 2, 3} to {2, 3}, commits it and goes away;
/// nodes 2 and 3 elect a leader, which finishes the change itself after
/// `quiet::JOINT_PATIENCE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_voters_left_half_made_is_finished_by_the_next_leader() -> anyhow::Result<()> {
    half_made_change_finished(false).await
}

/// The same in a group whose members are the cluster's nodes and whose voters change
/// only when a node leaves (a cluster's one group), set to drop the voters a finished
/// change leaves out: node 1 leaves the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_made_change_of_a_clusters_one_group_drops_the_voter_it_leaves_out() -> anyhow::Result<()> {
    half_made_change_finished(true).await
}

async fn half_made_change_finished(drop_left_out: bool) -> anyhow::Result<()> {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let two = start_replica(2, &certs, dir.path()).await?;
    let three = start_replica(3, &certs, dir.path()).await?;
    // The joint membership is looked after by the routers' monitor, which runs once a
    // router knows its peers (as on every node).
    for replica in [&two, &three] {
        replica.router.drop_left_out_voters(7, drop_left_out);
        replica.router.set_peers(switchboard_raft::network::Peers::new(replica.endpoint.clone()));
    }
    let one = tls::ensure_member(&certs, "node-1", &[])?;
    let endpoint = tls::endpoint(&one, "127.0.0.1:0".parse()?)?;
    let nodes: BTreeMap<u64, Node> = BTreeMap::from([(1, Node { addr: endpoint.local_addr()?.to_string() }), (2, addr(&two)?), (3, addr(&three)?)]);
    let all = BTreeSet::from([1, 2, 3]);
    let after = BTreeSet::from([2, 3]);
    let uniform = openraft::Membership::new(vec![all.clone()], nodes.clone());
    let joint = openraft::Membership::new(vec![all.clone(), after.clone()], nodes.clone());
    let vote = openraft::Vote::new_committed(1, 1);
    let at = |term: u64, leader: u64, index: u64| openraft::LogId::new(openraft::CommittedLeaderId::new(term, leader), index);
    let entries = vec![
        openraft::Entry::<switchboard_raft::TypeConfig> { log_id: at(0, 0, 0), payload: openraft::EntryPayload::Membership(uniform) },
        openraft::Entry { log_id: at(1, 1, 1), payload: openraft::EntryPayload::Blank },
        openraft::Entry { log_id: at(1, 1, 2), payload: openraft::EntryPayload::Membership(joint) },
    ];
    for replica in [&two, &three] {
        let mut client = NetworkFactory::new(endpoint.clone(), 7).new_client(replica.id, &addr(replica)?).await;
        let append = openraft::raft::AppendEntriesRequest { vote, prev_log_id: None, entries: entries.clone(), leader_commit: Some(at(1, 1, 2)) };
        let answer = client.append_entries(append, RPCOption::new(Duration::from_secs(5))).await;
        assert!(matches!(answer, Ok(openraft::raft::AppendEntriesResponse::Success)), "node {} took node 1's entries: {answer:?}", replica.id);
    }
    // (A follower's metrics follow its log a moment after it answered.)
    for replica in [&two, &three] {
        let joint = vec![all.clone(), after.clone()];
        let held = replica.raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.membership_config.membership().get_joint_config() == &joint, "the half-made change").await;
        assert!(held.is_ok(), "node {} holds the half-made change: {:?}", replica.id, replica.raft.metrics().borrow().membership_config);
    }
    // Node 1 is gone (nothing answers on its address any more).
    endpoint.close(0u32.into(), b"");

    let finished = async {
        loop {
            for replica in [&two, &three] {
                let m = replica.raft.metrics().borrow().clone();
                if m.current_leader == Some(replica.id) && m.membership_config.membership().get_joint_config() == &vec![after.clone()] {
                    return m;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let m = tokio::time::timeout(Duration::from_secs(40), finished).await.map_err(|_| anyhow::anyhow!("the change of voters was not finished within 40 s: {:?}", two.raft.metrics().borrow().membership_config))?;
    // Node 1, left out, stays a learner (the placement drops a node that left), or,
    // in a cluster's one group, leaves it.
    let learners: Vec<u64> = m.membership_config.membership().learner_ids().collect();
    if drop_left_out {
        assert!(learners.is_empty() && m.membership_config.membership().get_node(&1).is_none(), "{:?}", m.membership_config);
    } else {
        assert_eq!(learners, vec![1], "{:?}", m.membership_config);
    }
    // The group commits on its two voters alone.
    let leader = if m.id == 2 { &two } else { &three };
    assert!(commits_within_5s(leader, b"after the change was finished").await, "the group commits with voters 2 and 3");

    for replica in [two, three] {
        replica.raft.shutdown().await?;
        replica.endpoint.close(0u32.into(), b"");
    }
    Ok(())
}

/// A member killed and started again on its address answers its peers' packets on their
/// old connections with a stateless reset they can verify (its reset key comes from its
/// private key, not from the process): a peer's connection ends as `Reset` at its next
/// packet, so the peer dials the new process instead of writing into the dead one until
/// the idle timeout (`TimedOut`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_again_resets_its_peers_old_connections() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let dialler = tls::endpoint(&tls::ensure_member(&certs, "node-1", &[])?, "127.0.0.1:0".parse()?)?;
    let identity = tls::ensure_member(&certs, "node-2", &[])?;

    // The first process of node 2: this test binary again, running the ignored test below.
    let mut first = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--ignored", "--exact", "member_process_for_the_reset_test", "--nocapture", "--test-threads", "1"])
        .env(PEER_CERTS, &certs)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = first.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let address: std::net::SocketAddr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            // (libtest prints the test's name on the same line first.)
            if let Some((_, address)) = line.split_once("listening on ") {
                return Ok(address.trim().parse()?);
            }
        }
        anyhow::bail!("the member process ended before it listened")
    })
    .await
    .map_err(|_| anyhow::anyhow!("the member process did not listen within 30 s"))??;
    let connection = dialler.connect(address, tls::NODE_SERVER_NAME)?.await?;

    // kill -9: the process says nothing to its peers. Node 2 starts again on its address.
    first.start_kill()?;
    first.wait().await?;
    let _second = tls::endpoint(&identity, address)?;

    // The peer's next packet reaches the new process, which resets the old connection.
    let (mut send, _recv) = connection.open_bi().await?;
    let _ = send.write_all(b"to the old process").await;
    let ended = tokio::time::timeout(Duration::from_secs(30), connection.closed())
        .await
        .map_err(|_| anyhow::anyhow!("the old connection was still open 30 s after the restart"))?;
    assert!(matches!(ended, quinn::ConnectionError::Reset), "the old connection should end with a verified reset, not {ended:?}");
    Ok(())
}

const PEER_CERTS: &str = "SWITCHBOARD_TEST_RESET_PEER_CERTS";

/// The first process of node 2 in the test above, which runs it with `--ignored`: it
/// serves with node 2's identity and holds every connection until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_member_started_again_resets_its_peers_old_connections"]
async fn member_process_for_the_reset_test() -> anyhow::Result<()> {
    // Run with `--ignored` but not by that test: nothing to serve.
    let Ok(certs) = std::env::var(PEER_CERTS) else { return Ok(()) };
    let certs = std::path::PathBuf::from(certs);
    let endpoint = tls::endpoint(&tls::ensure_member(&certs, "node-2", &[])?, "127.0.0.1:0".parse()?)?;
    println!("listening on {}", endpoint.local_addr()?);
    let mut held = Vec::new();
    while let Some(incoming) = endpoint.accept().await {
        held.push(incoming.await?);
    }
    Ok(())
}
