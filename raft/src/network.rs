//! Raft RPCs over QUIC. One endpoint per node serves every group it hosts; each RPC is
//! one bidirectional stream carrying a bincode request and its response.
//!
//! Architecture invariant: the transport never interprets entries; it routes by group
//! id and limits sizes. A peer without a certificate from the cluster CA never gets a
//! stream (the TLS handshake refuses it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, ClientWriteResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tracing::{debug, warn};

use crate::tls::NODE_SERVER_NAME;
use crate::{Node, NodeId, Raft, Request, TypeConfig};

/// Largest RPC body accepted, in bytes (snapshot chunks are far smaller).
pub const MAX_RPC_BYTES: usize = 64 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
enum RpcRequest {
    Append { group: u64, rpc: AppendEntriesRequest<TypeConfig> },
    Snapshot { group: u64, rpc: InstallSnapshotRequest<TypeConfig> },
    Vote { group: u64, rpc: VoteRequest<NodeId> },
    /// A command a follower's proposer forwards to the leader (appended variant: the
    /// ones before keep their encoding).
    Write { group: u64, request: Request },
}

#[derive(Serialize, Deserialize)]
enum RpcResponse {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    UnknownGroup(u64),
    BadRequest(String),
    Write(Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, Node>>>),
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let config = bincode::config::standard().with_limit::<MAX_RPC_BYTES>();
    bincode::serde::decode_from_slice(bytes, config).map(|(v, _)| v).map_err(|e| e.to_string())
}

/// The groups this node hosts, by id: where incoming RPCs are delivered.
#[derive(Clone, Default)]
pub struct Router {
    groups: Arc<RwLock<HashMap<u64, Raft>>>,
}

impl Router {
    pub fn add(&self, group: u64, raft: Raft) {
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(group, raft);
    }

    pub fn remove(&self, group: u64) {
        self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&group);
    }

    fn get(&self, group: u64) -> Option<Raft> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()
    }

    async fn dispatch(&self, request: RpcRequest) -> RpcResponse {
        match request {
            RpcRequest::Append { group, rpc } => match self.get(group) {
                Some(raft) => RpcResponse::Append(raft.append_entries(rpc).await),
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::Snapshot { group, rpc } => match self.get(group) {
                Some(raft) => RpcResponse::Snapshot(raft.install_snapshot(rpc).await),
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::Vote { group, rpc } => match self.get(group) {
                Some(raft) => RpcResponse::Vote(raft.vote(rpc).await),
                None => RpcResponse::UnknownGroup(group),
            },
            RpcRequest::Write { group, request } => match self.get(group) {
                Some(raft) => RpcResponse::Write(raft.client_write(request).await),
                None => RpcResponse::UnknownGroup(group),
            },
        }
    }
}

/// Accepts peers on `endpoint` until it is closed, delivering their RPCs to `router`.
pub fn serve(endpoint: quinn::Endpoint, router: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let router = router.clone();
            tokio::spawn(async move {
                let connection = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "peer handshake failed");
                        return;
                    }
                };
                loop {
                    let (send, recv) = match connection.accept_bi().await {
                        Ok(streams) => streams,
                        Err(_) => return,
                    };
                    let router = router.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_stream(router, send, recv).await {
                            debug!(error = %e, "rpc stream failed");
                        }
                    });
                }
            });
        }
    })
}

async fn serve_stream(router: Router, mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), String> {
    let body = recv.read_to_end(MAX_RPC_BYTES).await.map_err(|e| e.to_string())?;
    let response = match decode::<RpcRequest>(&body) {
        Ok(request) => router.dispatch(request).await,
        Err(e) => RpcResponse::BadRequest(e),
    };
    let bytes = encode(&response)?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    // Wait for the peer to read everything before the stream is dropped.
    let _ = send.stopped().await;
    Ok(())
}

/// Dials peers of one group.
#[derive(Clone)]
pub struct NetworkFactory {
    endpoint: quinn::Endpoint,
    group: u64,
}

impl NetworkFactory {
    pub fn new(endpoint: quinn::Endpoint, group: u64) -> Self {
        NetworkFactory { endpoint, group }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerClient { endpoint: self.endpoint.clone(), group: self.group, target, addr: node.addr.clone(), connection: None }
    }
}

/// A connection to one peer, re-dialled when it breaks.
pub struct PeerClient {
    endpoint: quinn::Endpoint,
    group: u64,
    target: NodeId,
    addr: String,
    connection: Option<quinn::Connection>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

enum Failure {
    Unreachable(String),
    Network(String),
}

impl<E: std::error::Error> From<Failure> for RPCError<NodeId, Node, E> {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&TransportError(e))),
            Failure::Network(e) => RPCError::Network(NetworkError::new(&TransportError(e))),
        }
    }
}

impl PeerClient {
    async fn connection(&mut self) -> Result<quinn::Connection, Failure> {
        if let Some(c) = &self.connection {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let addr: SocketAddr = self.addr.parse().map_err(|e| Failure::Unreachable(format!("bad address {}: {e}", self.addr)))?;
        let connecting = self
            .endpoint
            .connect(addr, NODE_SERVER_NAME)
            .map_err(|e| Failure::Unreachable(format!("connect {addr}: {e}")))?;
        let connection = connecting.await.map_err(|e| Failure::Unreachable(format!("connect {addr}: {e}")))?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    async fn call(&mut self, request: RpcRequest, ttl: Duration) -> Result<RpcResponse, Failure> {
        let bytes = encode(&request).map_err(Failure::Network)?;
        let connection = self.connection().await?;
        let exchange = async {
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| Failure::Network(e.to_string()))?;
            send.write_all(&bytes).await.map_err(|e| Failure::Network(e.to_string()))?;
            send.finish().map_err(|e| Failure::Network(e.to_string()))?;
            let body = recv.read_to_end(MAX_RPC_BYTES).await.map_err(|e| Failure::Network(e.to_string()))?;
            decode::<RpcResponse>(&body).map_err(Failure::Network)
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(failure)) => {
                self.connection = None;
                Err(failure)
            }
            Err(_) => Err(Failure::Network(format!("rpc to node {} timed out after {ttl:?}", self.target))),
        }
    }
}

fn unexpected(response: RpcResponse) -> Failure {
    match response {
        RpcResponse::UnknownGroup(g) => Failure::Unreachable(format!("peer does not host group {g}")),
        RpcResponse::BadRequest(e) => Failure::Network(format!("peer refused request: {e}")),
        _ => Failure::Network("mismatched response kind".into()),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(RpcRequest::Append { group: self.group, rpc }, option.hard_ttl()).await? {
            RpcResponse::Append(result) => result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))),
            other => Err(unexpected(other).into()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        match self.call(RpcRequest::Snapshot { group: self.group, rpc }, option.hard_ttl()).await? {
            RpcResponse::Snapshot(result) => {
                result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(RpcRequest::Vote { group: self.group, rpc }, option.hard_ttl()).await? {
            RpcResponse::Vote(result) => result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))),
            other => {
                warn!(target = self.target, "vote got an unexpected response");
                Err(unexpected(other).into())
            }
        }
    }
}

/// Why a forwarded write has no answer, and whether it may be sent again.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The command did not reach a leader that could append it: sending it again (to
    /// the leader named, when one is) cannot commit it twice.
    #[error("not committed: {reason}")]
    NotCommitted { reason: String, leader: Option<(NodeId, Node)> },
    /// The command was sent and the answer was lost (the leader failed or the link
    /// broke): it may or may not be committed. Only the client can retry it, with its
    /// idempotency key.
    #[error("the leader did not answer; the command may or may not be committed: {0}")]
    Unknown(String),
}

/// Sends commands to a group's leader on another node: a follower's proposer uses it so
/// that any node accepts writes. One QUIC connection per peer, re-dialled when it breaks;
/// one stream per command.
#[derive(Clone)]
pub struct Forwarder {
    endpoint: quinn::Endpoint,
    connections: Arc<tokio::sync::Mutex<HashMap<String, quinn::Connection>>>,
}

impl Forwarder {
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Forwarder { endpoint, connections: Arc::default() }
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, String> {
        let mut connections = self.connections.lock().await;
        if let Some(c) = connections.get(addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let socket: SocketAddr = addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?;
        let connecting = self.endpoint.connect(socket, NODE_SERVER_NAME).map_err(|e| format!("connect {addr}: {e}"))?;
        let connection = tokio::time::timeout(Duration::from_secs(2), connecting)
            .await
            .map_err(|_| format!("connect {addr}: timed out"))?
            .map_err(|e| format!("connect {addr}: {e}"))?;
        connections.insert(addr.to_string(), connection.clone());
        Ok(connection)
    }

    /// Proposes `request` to `group` on the node at `addr`, expected to lead it; waits at
    /// most `ttl` for the answer.
    pub async fn write(&self, group: u64, addr: &str, request: Request, ttl: Duration) -> Result<ClientWriteResponse<TypeConfig>, ForwardError> {
        let not_committed = |reason: String| ForwardError::NotCommitted { reason, leader: None };
        let bytes = encode(&RpcRequest::Write { group, request }).map_err(not_committed)?;
        let connection = self.connection(addr).await.map_err(not_committed)?;
        // Until the stream is open nothing was sent; after the first byte, a failure
        // leaves the outcome unknown.
        let (mut send, mut recv) = tokio::time::timeout(ttl, connection.open_bi())
            .await
            .map_err(|_| not_committed(format!("no stream to {addr} within {ttl:?}")))?
            .map_err(|e| not_committed(e.to_string()))?;
        let exchange = async {
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let body = recv.read_to_end(MAX_RPC_BYTES).await.map_err(|e| e.to_string())?;
            decode::<RpcResponse>(&body)
        };
        let response = match tokio::time::timeout(ttl, exchange).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                self.connections.lock().await.remove(addr);
                return Err(ForwardError::Unknown(e));
            }
            Err(_) => return Err(ForwardError::Unknown(format!("no answer from {addr} within {ttl:?}"))),
        };
        match response {
            RpcResponse::Write(Ok(answer)) => Ok(answer),
            RpcResponse::Write(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to)))) => Err(ForwardError::NotCommitted {
                reason: format!("{addr} no longer leads group {group}"),
                leader: to.leader_id.zip(to.leader_node),
            }),
            RpcResponse::Write(Err(e)) => Err(ForwardError::Unknown(e.to_string())),
            RpcResponse::UnknownGroup(g) => Err(not_committed(format!("{addr} does not host group {g}"))),
            RpcResponse::BadRequest(e) => Err(not_committed(format!("{addr} refused the command: {e}"))),
            _ => Err(ForwardError::Unknown("mismatched response kind".into())),
        }
    }
}
