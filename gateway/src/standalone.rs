//! `switchboard gateway`: a process that holds clients' connections and relays their
//! traffic to the cluster's members over QUIC with mutual TLS (ADR 0008).
//!
//! It keeps no durable state. It learns the cluster's map (members, the leader, who is
//! ready, and on a split cluster who leads each conversation shard) by polling every
//! member, pins each request and each socket to a member (the leader when it is ready,
//! else any ready member: every member serves, ADR 0007), and relays the bytes
//! ([`crate::relay`] is the node's side). A socket then follows the member that owns
//! its stream: a visitor's socket the leader of its conversation's shard, an operator's
//! the routing leader. Once its conversation is known, and whenever the map changes,
//! a socket with nothing unanswered moves there (opened on that member and resumed
//! after the last `seq` delivered, as a re-pin does). Edge limits are
//! enforced here first: connection caps, header and write timeouts, WebSocket frame
//! size and rate; the node then makes every check of its own.
//!
//! When the member under a socket dies, the gateway re-pins the socket: it opens the
//! same socket on another member, resumes the stream after the last `seq` it delivered
//! (the client's conversation, or the operator's feed), swallows the second `resumed`
//! or `hello`, resends the client's keyed `send`s that had no answer yet (their keys
//! make a resend safe) and answers every other unanswered request `unavailable`. The
//! person's socket stays open and sees no gap and no duplicate.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::BytesMut;
use fastwebsockets::upgrade::IncomingUpgrade;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use switchboard_raft::network::Peers;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::listener::ConnectionLimits;
use crate::metrics::Metrics;
use crate::relay::{write_preamble, Listener};
use crate::wire::{self, Inbound, ServerOp};
use crate::ws::{self, close, Flow, Limits, Outbox, Session, Surface};
use crate::GatewayError;

/// How often every member's status is polled.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// A member that answers nothing for this long is taken for gone: its connection is
/// closed, which fails every stream relayed over it, and its sockets are re-pinned. A
/// running member answers a poll within milliseconds; five polls in a row unanswered
/// is a dead process, a cut link or a frozen machine.
const MEMBER_SILENT: Duration = Duration::from_millis(500);
/// How long a poll waits for its answer. A member whose status poll gets none, and
/// which answered nothing else in the last half of it, is taken for gone at once.
const POLL_TTL: Duration = Duration::from_millis(400);
/// How long a socket may look for another member before it is closed with 1012.
const REPIN_PATIENCE: Duration = Duration::from_secs(15);
/// How long a re-pinned socket waits for its `resumed` or `hello`.
const RESUME_WAIT: Duration = Duration::from_secs(5);
/// How long a socket moving to the member that owns its stream may take to be opened
/// and resumed there; past it the socket stays where it was.
const MOVE_PATIENCE: Duration = Duration::from_secs(2);
/// How long a client's `ping` may wait for its `pong` before it no longer keeps the
/// socket from moving (the member refused it, or it was lost with a member).
const PING_PATIENCE: Duration = Duration::from_secs(5);
/// How long after a change of the map sockets wait before they move: a failover
/// settles first (the new leader is busy with the sockets and writes that failed over
/// to it, and a socket works from any member meanwhile).
const MOVE_SETTLE: Duration = Duration::from_secs(2);
/// Sockets moving after a change of the map start within this spread after
/// [`MOVE_SETTLE`] (by the client's port), so that a new leader is not asked for every
/// resume at once.
const MOVE_SPREAD_MS: u64 = 1000;
/// The largest frame a member may send a gateway. A visitor's pages are 64 KiB, but an
/// operator's `history` and `assigned` event carry a whole conversation: up to 10,000
/// entries of 4,000 characters, each of which JSON may write as a 6-byte escape (about
/// 240 MiB). Members are trusted and the frame goes on whole, as a member's own
/// listener would send it; one past this closes the socket (see [`OVERSIZE`]).
const MAX_UPSTREAM_MESSAGE: usize = 256 * 1024 * 1024;
/// The largest frame a member may send a gateway on a visitor's socket: a page of
/// events is cut after 64 KiB of text ([`ws::PAGE_TEXT_BYTES`]) and holds at least one
/// entry (at most 4,000 characters, about 24 KiB as JSON escapes), so a frame past this
/// is no member's; the decoder would otherwise set aside what its header claims.
const MAX_VISITOR_UPSTREAM_MESSAGE: usize = 1024 * 1024;
/// How long a frame to a member may wait for the member to read it (as the listener's
/// write timeout bounds what a socket writes to its peer).
const UPSTREAM_WRITE_PATIENCE: Duration = Duration::from_secs(10);
/// Why a member's frame was not taken: too large. Not the member's loss, so no re-pin
/// (another member would send the same frame again).
const OVERSIZE: &str = "a frame from the member is over the gateway's limit";
/// Requests a socket's client may have unanswered at once; past it (or past
/// [`MAX_PENDING_BYTES`] of frames kept for a re-pin) new ones are refused with
/// `rate_limited` until answers come.
const MAX_PENDING: usize = 256;
/// Most pongs a re-pin answers for the pings its lost member never answered.
const MAX_REPLAYED_PONGS: u32 = 4;
/// The client's headers a socket keeps to be opened again on another member.
const REPIN_HEADERS: [&str; 6] = ["host", "origin", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version"];
/// The longest path and query (percent-decoded and encoded again as the member reads
/// it) a relayed socket may have: the gateway keeps it to open the socket again on a
/// re-pin. A token, a cursor of every feed and the other parameters take well under 1 KiB.
const MAX_KEPT_PATH: usize = 4 * 1024;
/// The most the [`REPIN_HEADERS`] of a relayed socket may hold together, names and values.
const MAX_KEPT_HEADERS: usize = 2 * 1024;
/// Longest time to wait for a member's response head to a relayed request.
const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What a standalone gateway is given.
pub struct Options {
    pub public_addr: SocketAddr,
    pub private_addr: SocketAddr,
    /// Its certificate (role gateway) and the cluster CA's.
    pub identity: switchboard_raft::tls::Identity,
    /// Members to start from (id, QUIC address); more are learnt from their status.
    pub members: Vec<(u64, String)>,
    pub client_limits: Limits,
    pub operator_limits: Limits,
    pub connections: ConnectionLimits,
    pub ping_interval: Duration,
    /// Time to relay one HTTP request, its body included.
    pub request_timeout: Duration,
}

#[derive(Clone, Debug)]
struct Member {
    addr: String,
    alive: bool,
    ready: bool,
}

/// One conversation shard in the gateway's map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Shard {
    group: u64,
    /// The member that says it leads the shard (the highest term among those that do).
    leader: Option<u64>,
    holders: Vec<u64>,
}

/// The gateway's view of the cluster, versioned: the version goes up whenever the
/// leader, the members or a conversation shard's leader change.
#[derive(Default)]
struct Map {
    members: BTreeMap<u64, Member>,
    leader: Option<u64>,
    /// A split cluster's conversation shards in order (conversation `id` lives in the
    /// `id % len`-th); empty on a cluster of one group or before any member told.
    conversations: Vec<Shard>,
    /// The term each shard's leader in `conversations` claimed its leadership at.
    shard_terms: Vec<u64>,
    version: u64,
}

/// The members and the connections to them, shared by every relayed request.
pub struct Upstreams {
    peers: Peers,
    map: Mutex<Map>,
    repins: AtomicU64,
    repins_failed: AtomicU64,
    moves: AtomicU64,
    unavailable: AtomicU64,
    /// The map's version, for sockets to notice a change.
    changes: tokio::sync::watch::Sender<u64>,
    relayed_sockets: AtomicUsize,
    /// Sockets relayed to each member now.
    per_member: Mutex<BTreeMap<u64, usize>>,
}

impl Upstreams {
    fn new(peers: Peers, members: &[(u64, String)]) -> Arc<Self> {
        let mut map = Map::default();
        for (id, addr) in members {
            map.members.insert(
                *id,
                Member {
                    addr: addr.clone(),
                    alive: false,
                    ready: false,
                },
            );
        }
        Arc::new(Upstreams {
            peers,
            map: Mutex::new(map),
            repins: AtomicU64::new(0),
            repins_failed: AtomicU64::new(0),
            moves: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
            relayed_sockets: AtomicUsize::new(0),
            per_member: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member to pin new work to: the leader if it is ready, else a ready member,
    /// else any that answers; never one of `avoid` (members that just failed).
    fn choose(&self, avoid: &[u64]) -> Option<(u64, String)> {
        let map = self.lock();
        let usable = |id: &u64, m: &Member| !avoid.contains(id) && m.alive;
        if let Some(leader) = map.leader {
            if let Some(m) = map
                .members
                .get(&leader)
                .filter(|m| usable(&leader, m) && m.ready)
            {
                return Some((leader, m.addr.clone()));
            }
        }
        let ready = map.members.iter().find(|(id, m)| usable(id, m) && m.ready);
        let any = || map.members.iter().find(|(id, m)| usable(id, m));
        // Nobody answered a poll yet (the gateway just started, or every dial is under
        // way): trying one costs at most a dial, answering 503 at once costs the request.
        let untried = || map.members.iter().find(|(id, _)| !avoid.contains(id));
        ready.or_else(any).or_else(untried).map(|(id, m)| (*id, m.addr.clone()))
    }

    /// The member that owns a socket's stream, if the map knows one that serves: a
    /// visitor's conversation's shard leader (the leader of the one group on a cluster
    /// that is not split), an operator's routing leader. `None` for a supervisor's
    /// socket and a visitor's before its conversation is known.
    fn preferred(&self, surface: Surface, conversation: Option<u64>) -> Option<(u64, String)> {
        let map = self.lock();
        let owner = match (surface, conversation) {
            (Surface::Client, Some(c)) if !map.conversations.is_empty() => {
                map.conversations[(c % map.conversations.len() as u64) as usize].leader?
            }
            (Surface::Client, Some(_)) | (Surface::Operator, _) => map.leader?,
            _ => return None,
        };
        map.members.get(&owner).filter(|m| m.alive && m.ready).map(|m| (owner, m.addr.clone()))
    }

    /// Where a socket on member `on` moves to: the member that owns its stream
    /// ([`Upstreams::preferred`]); else, when `on` no longer serves (cut off from the
    /// cluster's majority, or catching up, while it still answers polls), the leader or
    /// another member that serves. A supervisor's socket, or a visitor's before its
    /// conversation is known, would otherwise stay on a member that gets nothing new.
    /// `None`: it stays.
    fn destination(&self, surface: Surface, conversation: Option<u64>, on: u64) -> Option<(u64, String)> {
        if let Some(owner) = self.preferred(surface, conversation) {
            return Some(owner);
        }
        let map = self.lock();
        let serves = |id: &u64| *id != on && map.members.get(id).is_some_and(|m| m.alive && m.ready);
        if map.members.get(&on).is_some_and(|m| m.alive && m.ready) {
            return None;
        }
        let to = map.leader.filter(serves).or_else(|| map.members.keys().copied().find(serves))?;
        map.members.get(&to).map(|m| (to, m.addr.clone()))
    }

    /// Where a socket goes when its member failed: the member that owns its stream,
    /// else as [`Upstreams::choose`] picks.
    fn choose_for(&self, surface: Surface, conversation: Option<u64>, avoid: &[u64]) -> Option<(u64, String)> {
        match self.preferred(surface, conversation) {
            Some((id, addr)) if !avoid.contains(&id) => Some((id, addr)),
            _ => self.choose(avoid),
        }
    }

    fn ready(&self) -> bool {
        self.lock().members.values().any(|m| m.alive && m.ready)
    }

    /// Polls every member once and updates the map.
    async fn poll(&self) {
        let targets: Vec<(u64, String)> = self
            .lock()
            .members
            .iter()
            .map(|(id, m)| (*id, m.addr.clone()))
            .collect();
        let answers = futures::future::join_all(targets.iter().map(|(id, addr)| async move {
            let (status, shards) = tokio::join!(self.peers.status(addr, POLL_TTL), self.peers.shards(addr, POLL_TTL));
            // No status within the poll's time and nothing else answered lately: the
            // member is gone now, not after one more round. (An answer to the other
            // poll just before it died would otherwise restart the silence clock, and
            // its sockets would be re-pinned a round late: about 1.07 s after a kill
            // instead of 0.5-0.6 s.)
            if status.is_err() && !self.peers.answered_within(addr, POLL_TTL / 2) {
                self.peers.drop_connection(addr);
            }
            (*id, status, shards.ok())
        }))
        .await;
        let mut map = self.lock();
        let leaders = |map: &Map| map.conversations.iter().map(|s| s.leader).collect::<Vec<_>>();
        // A member that becomes ready (or stops being) changes where sockets belong too:
        // one pinned elsewhere while its stream's owner was not ready yet moves to it.
        let serving = |map: &Map| map.members.iter().filter(|(_, m)| m.alive && m.ready).map(|(id, _)| *id).collect::<Vec<_>>();
        let before = (map.leader, map.members.keys().copied().collect::<Vec<_>>(), leaders(&map), serving(&map));
        // Each conversation shard's leader: the member that says it leads, at the
        // highest term if two do (one cut off that has not heard of the next term).
        let mut shards: Vec<Shard> = Vec::new();
        let mut terms: Vec<u64> = Vec::new();
        // The newest term any member names for each shard's leader, its own or another.
        let mut named: Vec<u64> = Vec::new();
        for (id, status, reported) in &answers {
            let Some(reported) = reported.as_ref().filter(|_| status.is_ok()) else { continue };
            if reported.len() > shards.len() {
                shards.resize(reported.len(), Shard::default());
                terms.resize(reported.len(), 0);
                named.resize(reported.len(), 0);
            }
            for (i, s) in reported.iter().enumerate() {
                if let Some((_, term)) = s.leader {
                    named[i] = named[i].max(term);
                }
                if shards[i].group == 0 {
                    shards[i].group = s.group;
                }
                if shards[i].holders.is_empty() {
                    shards[i].holders = s.holders.clone();
                }
                if let Some((leader, term)) = s.leader {
                    if leader == *id && (shards[i].leader.is_none() || term > terms[i]) {
                        shards[i].group = s.group;
                        shards[i].leader = Some(leader);
                        shards[i].holders = s.holders.clone();
                        terms[i] = term;
                    }
                }
            }
        }
        // A claim at a term older than the leader this map knew, which still answers:
        // one deposed and cut off that has not heard of the next term yet, while the
        // new leader's answer is missing this round. The map keeps the newer leader,
        // unless some member names a newer one still (the known one stepped down).
        for (i, shard) in shards.iter_mut().enumerate() {
            let (Some(known), Some(&known_term)) = (map.conversations.get(i).and_then(|s| s.leader), map.shard_terms.get(i)) else { continue };
            let answered = answers.iter().any(|(id, status, _)| *id == known && status.is_ok());
            if answered && known_term > terms[i] && known_term >= named[i] && shard.group == map.conversations[i].group {
                shard.leader = Some(known);
                shard.holders = map.conversations[i].holders.clone();
                terms[i] = known_term;
            }
        }
        // No member answered the shard poll this round (slow, or busy): the shards are
        // as they were, not gone. A member of one group answers with none.
        if answers.iter().any(|(_, status, reported)| status.is_ok() && reported.is_some()) {
            map.conversations = shards;
            map.shard_terms = terms;
        }
        let mut leader_view: Option<Vec<(u64, String)>> = None;
        // Two members may both claim to lead for a moment (one cut off from the rest
        // has not heard of the next election): the claim more members name wins, then
        // the leader the map had, then the higher id.
        let leader = choose_leader(answers.iter().filter_map(|(_, answer, _)| answer.as_ref().ok()).map(|s| (s.node, s.leader, s.ready)), map.leader);
        for (id, answer, _) in answers {
            let Some(member) = map.members.get_mut(&id) else {
                continue;
            };
            match answer {
                Ok(status) => {
                    member.alive = true;
                    member.ready = status.ready;
                    if status.leader == Some(status.node) && status.ready {
                        if leader == Some(status.node) {
                            map.leader = Some(status.node);
                            leader_view = Some(status.members.clone());
                        }
                    } else if map.leader.is_none() {
                        map.leader = status.leader;
                    }
                    // Learn members added since start.
                    for (other, addr) in status.members {
                        map.members.entry(other).or_insert(Member {
                            addr,
                            alive: false,
                            ready: false,
                        });
                    }
                }
                Err(_) => {
                    member.alive = false;
                    member.ready = false;
                    if map.leader == Some(id) {
                        map.leader = None;
                    }
                }
            }
        }
        // The leader's list is the truth: a member it no longer lists was removed.
        if let Some(view) = leader_view {
            if !view.is_empty() {
                map.members
                    .retain(|id, _| view.iter().any(|(v, _)| v == id));
            }
        }
        if before != (map.leader, map.members.keys().copied().collect::<Vec<_>>(), leaders(&map), serving(&map)) {
            map.version += 1;
            tracing::info!(version = map.version, leader = ?map.leader, members = ?map.members.keys().collect::<Vec<_>>(), shard_leaders = ?leaders(&map), serving = ?serving(&map), "cluster map changed");
            self.changes.send_replace(map.version);
        }
    }

    fn render(&self, metrics: &Metrics) -> String {
        use std::fmt::Write;
        let mut extra = String::new();
        let map = self.lock();
        let gauges: [(&str, &str, &str, u64); 8] = [
            ("switchboard_gateway_map_version", "gauge", "Version of the gateway's cluster map (goes up when the leader, the members or a conversation shard's leader change).", map.version),
            ("switchboard_gateway_leader", "gauge", "The member the gateway takes for leader (0: none).", map.leader.unwrap_or(0)),
            ("switchboard_gateway_members_ready", "gauge", "Members that answer and serve.", map.members.values().filter(|m| m.alive && m.ready).count() as u64),
            ("switchboard_gateway_relayed_sockets", "gauge", "Sockets relayed to members now.", self.relayed_sockets.load(Relaxed) as u64),
            ("switchboard_gateway_repins_total", "counter", "Sockets moved to another member after theirs failed.", self.repins.load(Relaxed)),
            ("switchboard_gateway_repins_failed_total", "counter", "Sockets closed with 1012 because no member took them in time.", self.repins_failed.load(Relaxed)),
            ("switchboard_gateway_moves_total", "counter", "Sockets moved, while their member served, to the member that owns their stream (a conversation shard's or the routing leader).", self.moves.load(Relaxed)),
            ("switchboard_gateway_unavailable_total", "counter", "Requests answered 503 because no member was reachable.", self.unavailable.load(Relaxed)),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                extra,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        drop(map);
        metrics.render(&extra)
    }

    fn cluster_view(&self) -> Value {
        let sockets = self.per_member.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let map = self.lock();
        json!({
            "version": map.version,
            "leader": map.leader,
            "members": map.members.iter().map(|(id, m)| json!({
                "id": id, "addr": m.addr, "alive": m.alive, "ready": m.ready, "sockets": sockets.get(id).copied().unwrap_or(0),
            })).collect::<Vec<_>>(),
            "shards": map.conversations.iter().map(|s| json!({
                "group": s.group, "leader": s.leader, "holders": s.holders,
            })).collect::<Vec<_>>(),
        })
    }

    /// A socket moved from member `from` (none: it is new) to `to` (none: it ended).
    fn moved(&self, from: Option<u64>, to: Option<u64>) {
        let mut counts = self.per_member.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(from) = from {
            if let Some(n) = counts.get_mut(&from) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&from);
                }
            }
        }
        if let Some(to) = to {
            *counts.entry(to).or_default() += 1;
        }
    }
}

/// One listener's relay: where its requests go and under which limits.
struct Edge {
    up: Arc<Upstreams>,
    listener: Listener,
    metrics: Arc<Metrics>,
    client_limits: Limits,
    operator_limits: Limits,
    ping_interval: Duration,
    request_timeout: Duration,
}

fn unavailable(up: &Upstreams, message: &str) -> Response {
    up.unavailable.fetch_add(1, Relaxed);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"code": "unavailable", "message": message})),
    )
        .into_response()
}

/// Opens a relayed HTTP connection to the member at `addr` and sends `request` on it.
async fn exchange(
    up: &Upstreams,
    addr: &str,
    listener: Listener,
    client: SocketAddr,
    request: axum::extract::Request,
) -> Result<hyper::Response<hyper::body::Incoming>, Result<axum::extract::Request, String>> {
    let (mut send, recv) = match up.peers.open_relay(addr, Duration::from_secs(1)).await {
        Ok(streams) => streams,
        Err(e) => {
            tracing::debug!(addr, error = %e, "no relayed stream to a member");
            return Err(Ok(request));
        }
    };
    if let Err(e) = write_preamble(&mut send, listener, client).await {
        return Err(Err(e.to_string()));
    }
    let io = TokioIo::new(tokio::io::join(recv, send));
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, axum::body::Body>(io)
        .await
        .map_err(|e| Err(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "relayed connection ended with an error");
        }
    });
    match tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, sender.send_request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(Err(e.to_string())),
        Err(_) => Err(Err("no response head in time".into())),
    }
}

/// Every request the gateway does not answer itself goes to a member as it came.
async fn relay_http(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
) -> Response {
    let mut request = request;
    let mut avoid: Vec<u64> = Vec::new();
    // A visitor's upload or download goes to the leader of its conversation's shard, as
    // its socket does: the file is then written first on a node that holds the shard.
    let conversation = (edge.listener == Listener::Public).then(|| attachment_conversation(request.uri())).flatten();
    // Until a stream is open nothing has been sent: another member may take it.
    for _ in 0..3 {
        let Some((id, addr)) = edge.up.choose_for(Surface::Client, conversation, &avoid) else {
            break;
        };
        let relayed = tokio::time::timeout(
            edge.request_timeout + Duration::from_secs(5),
            exchange(&edge.up, &addr, edge.listener, client, request),
        );
        match relayed.await {
            Ok(Ok(response)) => return response.map(axum::body::Body::new),
            Ok(Err(Ok(unsent))) => {
                request = unsent;
                avoid.push(id);
            }
            Ok(Err(Err(e))) => {
                tracing::debug!(member = id, error = %e, "relayed request failed");
                return unavailable(&edge.up, "the member serving this request failed; retry it");
            }
            Err(_) => {
                return unavailable(
                    &edge.up,
                    "the member serving this request did not answer in time; retry it",
                )
            }
        }
    }
    unavailable(&edge.up, "no cluster member is reachable from this gateway")
}

/// A socket to a member, spoken as a WebSocket client over a relayed stream.
struct UpstreamSocket {
    read: ReadHalf<TokioIo<Upgraded>>,
    write: WriteHalf<TokioIo<Upgraded>>,
    buf: BytesMut,
    decoder: wire::Decoder,
    mask: u32,
}

impl UpstreamSocket {
    /// `max_message`: the largest frame taken from the member.
    fn new(io: TokioIo<Upgraded>, max_message: usize) -> Self {
        let (read, write) = tokio::io::split(io);
        UpstreamSocket {
            read,
            write,
            buf: BytesMut::with_capacity(512),
            decoder: wire::Decoder::of_server(max_message),
            mask: 0x5a17_c3e1,
        }
    }

    /// The next frame from the member. Cancel-safe: a frame is taken off the buffer only
    /// when whole, and `read_buf` loses nothing when dropped.
    async fn next(&mut self) -> Result<Inbound, String> {
        loop {
            if let Some(frame) = self
                .decoder
                .decode(&mut self.buf)
                .map_err(|v| if v.code == wire::TOO_BIG { OVERSIZE.to_string() } else { v.to_string() })?
            {
                return Ok(frame);
            }
            // A little while idle (most sockets, most of the time), a chunk while a
            // frame is coming in: the same as a socket's own reader.
            ws::room_to_read(&mut self.buf);
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) => return Err("the member closed the stream".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends a frame, giving up after [`UPSTREAM_WRITE_PATIENCE`]: the socket's one task
    /// also reads the member, so a member that stopped reading while it waits for us to
    /// read would otherwise hold both ends (and the client's socket) for ever. Given up,
    /// the member counts as lost and the socket is re-pinned.
    async fn send(&mut self, op: ServerOp, payload: &[u8]) -> Result<(), String> {
        self.mask = self.mask.rotate_left(7).wrapping_add(0x9e37_79b9);
        let frame = wire::encode_masked(op, payload, self.mask.to_be_bytes());
        match tokio::time::timeout(UPSTREAM_WRITE_PATIENCE, self.write.write_all(&frame)).await {
            Ok(written) => written.map_err(|e| e.to_string()),
            Err(_) => Err(format!("the member read nothing for {} s", UPSTREAM_WRITE_PATIENCE.as_secs())),
        }
    }
}

/// A member's answer to a socket's upgrade.
enum Opened {
    Socket(UpstreamSocket),
    /// Refused (origin, token, budget): the member's status and body, for the client.
    Refused(Response),
}

/// Opens `path_and_query` as a WebSocket on the member at `addr`, with the client's headers.
async fn open_socket(
    up: &Upstreams,
    addr: &str,
    listener: Listener,
    client: SocketAddr,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<Opened, String> {
    let mut request = hyper::Request::builder().method("GET").uri(path_and_query);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request
        .body(axum::body::Body::empty())
        .map_err(|e| e.to_string())?;
    let response = exchange(up, addr, listener, client, request)
        .await
        .map_err(|e| match e {
            Ok(_) => "no stream to the member".to_string(),
            Err(e) => e,
        })?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        // Refusals are short (a JSON error or a sentence); cap what is held anyway.
        let body = http_body_util::Limited::new(body, 64 * 1024);
        // ... and how long it may take to arrive (a member that stalls mid-answer).
        let bytes = tokio::time::timeout(REFUSAL_BODY_WAIT, http_body_util::BodyExt::collect(body))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        // The body is the one read here (empty if the member's did not arrive whole):
        // its length is set anew, not the member's.
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        parts.headers.remove(axum::http::header::TRANSFER_ENCODING);
        return Ok(Opened::Refused(Response::from_parts(
            parts,
            axum::body::Body::from(bytes),
        )));
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| e.to_string())?;
    let max_message = if path_and_query.starts_with("/ws/client") { MAX_VISITOR_UPSTREAM_MESSAGE } else { MAX_UPSTREAM_MESSAGE };
    Ok(Opened::Socket(UpstreamSocket::new(TokioIo::new(upgraded), max_message)))
}

/// How long the body of a member's refusal of an upgrade may take to arrive.
const REFUSAL_BODY_WAIT: Duration = Duration::from_secs(5);

/// Relays a socket upgrade: the member decides (origin, token, budgets) before the
/// client's connection is upgraded. The whole relay, every member tried, is bounded by
/// the request deadline, as any request is: past it, `503`.
async fn relay_socket(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: IncomingUpgrade,
) -> Response {
    let deadline = edge.request_timeout;
    match tokio::time::timeout(deadline, relay_socket_within(edge.clone(), client, uri, headers, upgrade)).await {
        Ok(response) => response,
        Err(_) => unavailable(&edge.up, "no cluster member answered the upgrade within the request deadline"),
    }
}

async fn relay_socket_within(edge: Arc<Edge>, client: SocketAddr, uri: Uri, headers: HeaderMap, upgrade: IncomingUpgrade) -> Response {
    let surface = match uri.path() {
        "/ws/client" => Surface::Client,
        "/ws/operator" => Surface::Operator,
        _ => Surface::Supervisor,
    };
    // The query as the member reads it (names and values percent-decoded), so that what
    // the gateway reads of it (`last_seq`, `protocol`, `cursor`) and replaces on a re-pin
    // is what the member acts on.
    let path = match uri.query() {
        Some(query) => format!("{}?{}", uri.path(), canonical_query(query)),
        None => uri.path().to_owned(),
    };
    // Kept for the socket's life (each re-pin opens it again): bounded, so an idle
    // socket costs what docs/security.md says whatever its request held.
    if path.len() > MAX_KEPT_PATH {
        let message = format!("the socket's path and query are {} bytes as the member reads them: at most {MAX_KEPT_PATH} through a gateway", path.len());
        return (StatusCode::URI_TOO_LONG, Json(json!({"code": "too_long", "message": message}))).into_response();
    }
    let kept_headers: usize = headers.iter().filter(|(name, _)| REPIN_HEADERS.contains(&name.as_str())).map(|(n, v)| n.as_str().len() + v.len()).sum();
    if kept_headers > MAX_KEPT_HEADERS {
        let message = format!("the socket's {} headers are {kept_headers} bytes: at most {MAX_KEPT_HEADERS} through a gateway", REPIN_HEADERS.join(", "));
        return (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, Json(json!({"code": "too_long", "message": message}))).into_response();
    }
    let mut avoid: Vec<u64> = Vec::new();
    for _ in 0..3 {
        let Some((id, addr)) = edge.up.choose(&avoid) else {
            break;
        };
        match open_socket(&edge.up, &addr, edge.listener, client, &path, &headers).await {
            Ok(Opened::Refused(response)) => return response,
            Ok(Opened::Socket(upstream)) => {
                let limits = if surface == Surface::Client {
                    edge.client_limits
                } else {
                    edge.operator_limits
                };
                // What a re-pin needs of the client's request, not all of it, and copied:
                // hyper's header values are slices of the connection's 8 KiB read
                // buffer, which a clone would keep alive for the socket's life.
                let headers: HeaderMap = headers
                    .iter()
                    .filter(|(name, _)| REPIN_HEADERS.contains(&name.as_str()))
                    .filter_map(|(n, v)| axum::http::HeaderValue::from_bytes(v.as_bytes()).ok().map(|v| (n.clone(), v)))
                    .collect();
                let session = RelaySession {
                    start: Some(Pinned {
                        edge: edge.clone(),
                        surface,
                        client,
                        path,
                        headers,
                        upstream,
                        member: id,
                    }),
                    tx: None,
                };
                return ws::accept_with(
                    upgrade,
                    edge.metrics.clone(),
                    surface,
                    limits,
                    edge.ping_interval,
                    None,
                    session,
                );
            }
            Err(e) => {
                tracing::debug!(member = id, error = %e, "could not open a socket on a member");
                avoid.push(id);
            }
        }
    }
    unavailable(&edge.up, "no cluster member is reachable from this gateway")
}

/// A socket pinned to a member, before its relay starts.
struct Pinned {
    edge: Arc<Edge>,
    surface: Surface,
    client: SocketAddr,
    path: String,
    headers: HeaderMap,
    upstream: UpstreamSocket,
    member: u64,
}

/// What [`Tracker::incoming`] reads of a member's frame; every other field is skipped
/// while parsing. Each field is kept as whatever JSON it holds, as a `Value` read of the
/// whole frame would.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(rename = "type", default)]
    kind: Option<Value>,
    /// An event's kind.
    #[serde(rename = "kind", default)]
    event: Option<Value>,
    #[serde(default)]
    feed: Option<Value>,
    #[serde(default)]
    seq: Option<Value>,
    #[serde(default)]
    cursor: Option<Value>,
    /// A member's clock in an operator's `hello`.
    #[serde(default)]
    now: Option<Value>,
    #[serde(default)]
    token: Option<Value>,
    #[serde(default)]
    conversation: Option<Value>,
    #[serde(default)]
    code: Option<Value>,
    #[serde(rename = "ref", default)]
    reference: Option<Value>,
    /// On an error: the type of the frame it answers when that frame takes no `ref`.
    #[serde(rename = "for", default)]
    answers: Option<Value>,
    #[serde(default)]
    key: Option<Value>,
}

/// Bytes of frames from the member a relayed socket may hold unwritten to its client.
pub const RELAY_UNWRITTEN_BYTES: usize = 256 * 1024;

/// The routing leader among members' answers `(node, the leader it names, ready)`: of
/// those that claim it and are ready, the one most members name; on a tie the leader
/// the map had, then the highest id.
fn choose_leader(answers: impl Iterator<Item = (u64, Option<u64>, bool)>, known: Option<u64>) -> Option<u64> {
    let answers: Vec<(u64, Option<u64>, bool)> = answers.collect();
    let named = |id: u64| answers.iter().filter(|(_, leader, _)| *leader == Some(id)).count();
    answers
        .iter()
        .filter(|(node, leader, ready)| *leader == Some(*node) && *ready)
        .map(|(node, _, _)| *node)
        .max_by_key(|node| (named(*node), Some(*node) == known, *node))
}

struct RelaySession {
    start: Option<Pinned>,
    /// Each frame the client sent, with the moment it was read from the socket.
    tx: Option<mpsc::Sender<(u64, String)>>,
}

impl Session for RelaySession {
    async fn on_start(&mut self, out: &Outbox) -> Flow {
        let Some(pinned) = self.start.take() else {
            return Flow::Close(close::INTERNAL, "relay already started".into());
        };
        let (tx, rx) = mpsc::channel(16);
        self.tx = Some(tx);
        tokio::spawn(relay(pinned, rx, out.clone()));
        Flow::Continue
    }

    async fn on_text(&mut self, text: &str, _out: &Outbox) -> Flow {
        match &self.tx {
            // Stamped as it is read: the relay may be busy re-pinning when it comes.
            Some(tx) if tx.send((switchboard_actors::actors::now_ms().0, text.to_owned())).await.is_ok() => Flow::Continue,
            _ => Flow::Close(close::INTERNAL, "relay ended".into()),
        }
    }

    fn on_reader_end(&mut self) {
        // The relay holds the outbox's other sender: it must let go for the writer to end.
        self.tx = None;
    }

    fn on_end(&mut self) {
        self.tx = None;
    }
}

/// Counts a relayed socket while it lives.
struct Counted(Arc<Upstreams>, u64);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.relayed_sockets.fetch_sub(1, Relaxed);
        self.0.moved(Some(self.1), None);
    }
}

/// Carries one socket's frames both ways until either side ends it, re-pinning it when
/// its member fails.
async fn relay(pinned: Pinned, mut rx: mpsc::Receiver<(u64, String)>, out: Outbox) {
    let Pinned {
        edge,
        surface,
        client,
        path,
        headers,
        mut upstream,
        mut member,
    } = pinned;
    edge.up.relayed_sockets.fetch_add(1, Relaxed);
    edge.up.moved(None, Some(member));
    let mut counted = Counted(edge.up.clone(), member);
    let mut track = Tracker::new(surface, &path);
    // What the member sent that the client's socket has not taken yet: past it the
    // member's stream is not read (and QUIC's window holds the member back).
    let unwritten = Arc::new(tokio::sync::Semaphore::new(RELAY_UNWRITTEN_BYTES));
    // The socket moves to the member that owns its stream once that is known (its
    // conversation started or resumed) and after each change of the map, at a moment
    // when nothing it sent is unanswered.
    let mut changes = edge.up.changes.subscribe();
    let mut watching = true;
    let mut moving = Moving::default();
    // A frame sent again after a re-pin that could not be written: the member is taken
    // for lost at once (a later ping's pong must not settle what it never got).
    let mut resend_failed = false;
    loop {
        let lost = loop {
            if std::mem::take(&mut resend_failed) {
                break "a request sent again after a re-pin could not be written".to_owned();
            }
            tokio::select! {
                changed = changes.changed(), if watching => match changed {
                    Ok(()) => {
                        // A failed move keeps its backoff while the map still names the
                        // same member (the map may change often for other sockets).
                        let target = edge.up.destination(surface, track.conversation, member).map(|(id, _)| id);
                        if moving.failed == 0 || target != moving.failed_to {
                            moving.failed = 0;
                            moving.at = Some(tokio::time::Instant::now() + MOVE_SETTLE + Duration::from_millis(u64::from(client.port()) % MOVE_SPREAD_MS));
                        }
                    }
                    // The gateway is stopping; nothing moves any more.
                    Err(_) => watching = false,
                },
                _ = tokio::time::sleep_until(moving.at.unwrap_or_else(tokio::time::Instant::now)), if moving.at.is_some() && !moving.off && track.quiet() => {
                    moving.at = None;
                    let Some((to, addr)) = edge.up.destination(surface, track.conversation, member).filter(|(to, _)| *to != member) else { continue };
                    match Box::pin(shift(&edge, &mut track, &addr, client, &path, &headers)).await {
                        Ok(socket) => {
                            let mut old = std::mem::replace(&mut upstream, socket);
                            let _ = tokio::time::timeout(Duration::from_millis(100), old.send(ServerOp::Close, &wire::close_payload(close::NORMAL, ""))).await;
                            tracing::debug!(from = member, to, %client, ?surface, "moved a socket to the member that owns its stream");
                            edge.up.moves.fetch_add(1, Relaxed);
                            edge.up.moved(Some(member), Some(to));
                            member = to;
                            counted.1 = to;
                            moving.failed = 0;
                        }
                        Err((e, for_good)) => {
                            moving.failed += 1;
                            moving.failed_to = Some(to);
                            // The login refused there: the socket stays until a re-pin,
                            // which closes it with 4001 if the member under it refuses too.
                            moving.off = for_good;
                            let wait = Duration::from_secs(u64::from(moving.failed.min(5)) * 2);
                            tracing::debug!(from = member, to, error = %e, ?wait, for_good, "could not move a socket; it stays");
                            moving.at = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                }
                text = rx.recv() => match text {
                    None => {
                        let _ = upstream.send(ServerOp::Close, &wire::close_payload(close::NORMAL, "")).await;
                        return;
                    }
                    Some((read_at, text)) => match track.outgoing_at(&text, read_at) {
                        Ok(instead) => {
                            if let Err(e) = upstream.send(ServerOp::Text, instead.as_deref().unwrap_or(&text).as_bytes()).await {
                                break e;
                            }
                        }
                        Err(refusal) => out.json(refusal).await,
                    },
                },
                frame = upstream.next() => match frame {
                    Ok(Inbound::Text(text)) => {
                        let known = track.conversation;
                        if track.incoming(&text) {
                            out.text_within(text, &unwritten, RELAY_UNWRITTEN_BYTES).await;
                        }
                        if track.conversation != known {
                            moving.at = Some(tokio::time::Instant::now());
                        }
                    }
                    Ok(Inbound::Ping(payload)) => {
                        if let Err(e) = upstream.send(ServerOp::Pong, &payload).await {
                            break e;
                        }
                    }
                    // The member is going away (shutting down, or it found us silent):
                    // carry on elsewhere.
                    Ok(Inbound::Close(Some(close::GOING_AWAY), reason)) => break format!("the member closed the socket: {reason}"),
                    Ok(Inbound::Close(code, reason)) => {
                        out.close(code.unwrap_or(close::NORMAL), &reason).await;
                        return;
                    }
                    Ok(Inbound::Binary(_) | Inbound::Pong) => {}
                    Err(e) if e == OVERSIZE => {
                        tracing::warn!(member, %client, ?surface, "a member sent a frame over the gateway's limit: closing the socket");
                        out.close(close::INTERNAL, "a frame from the cluster was too large").await;
                        return;
                    }
                    Err(e) => break e,
                },
            }
        };
        if out.is_closed() {
            return;
        }
        tracing::info!(member, %client, error = %lost, ?surface, "lost the member under a socket: re-pinning");
        edge.up.repins.fetch_add(1, Relaxed);
        // Boxed: a socket's task is as large as its largest await, and most sockets
        // never re-pin.
        moving = Moving::default();
        match Box::pin(repin(&edge, &mut track, member, client, &path, &headers)).await {
            Ok((socket, id, replay)) => {
                upstream = socket;
                edge.up.moved(Some(member), Some(id));
                member = id;
                counted.1 = id;
                // A resend that fails makes the next re-pin at once (it sends the request
                // again there); every answer is delivered.
                let mut sending = true;
                for action in replay {
                    match action {
                        Replay::Resend(text) => {
                            if sending && upstream.send(ServerOp::Text, text.as_bytes()).await.is_err() {
                                sending = false;
                                resend_failed = true;
                            }
                        }
                        Replay::Answer(frame) => out.json(frame).await,
                        Replay::Close(code, reason) => {
                            out.close(code, &reason).await;
                            return;
                        }
                    }
                }
            }
            Err(refusal) => {
                edge.up.repins_failed.fetch_add(1, Relaxed);
                match refusal {
                    Some((code, reason)) => out.close(code, &reason).await,
                    None => {
                        out.close(
                            close::SERVICE_RESTART,
                            "no member took the socket over; reconnect and resume",
                        )
                        .await
                    }
                }
                return;
            }
        }
    }
}

/// What a re-pinned socket does once it is open again.
enum Replay {
    /// A client frame sent again (a keyed `send`: the key makes it safe).
    Resend(String),
    /// The socket closes with this code and reason, after the frames before it: the
    /// client's own resume was refused with a close (a token that is not valid).
    Close(u16, String),
    /// A frame for the client (the `unavailable` answer to a request whose outcome is
    /// unknown).
    Answer(Value),
}

/// Opens the socket on another member and resumes its stream. `Err(Some(..))`: a member
/// refused the socket (its token expired, say): close with that; `Err(None)`: nobody
/// took it within the patience.
async fn repin(
    edge: &Edge,
    track: &mut Tracker,
    dead: u64,
    client: SocketAddr,
    path: &str,
    headers: &HeaderMap,
) -> Result<(UpstreamSocket, u64, Vec<Replay>), Option<(u16, String)>> {
    let give_up = Instant::now() + REPIN_PATIENCE;
    // Every member that failed this re-pin is passed over while another may take the
    // socket; once each has failed, all but the dead one are tried again.
    let mut avoid: Vec<u64> = vec![dead];
    while Instant::now() < give_up {
        let choice = match edge.up.choose_for(track.surface, track.conversation, &avoid) {
            None if avoid.len() > 1 => {
                avoid.truncate(1);
                edge.up.choose_for(track.surface, track.conversation, &avoid)
            }
            choice => choice,
        };
        if let Some((id, addr)) = choice {
            let target = track.reconnect_path(path);
            // Each attempt within what is left of the patience: a member that is there but
            // stuck must not hold the socket past it.
            let left = give_up.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            let opened = match tokio::time::timeout(left, open_socket(&edge.up, &addr, edge.listener, client, &target, headers)).await {
                Ok(opened) => opened,
                Err(_) => Err("the member did not answer in time".to_string()),
            };
            match opened {
                Ok(Opened::Socket(mut socket)) => match tokio::time::timeout(left, track.resume(&mut socket)).await.unwrap_or_else(|_| Err("no answer to the resume in time".into())) {
                    Ok(()) => return Ok((socket, id, track.replay())),
                    Err(e) => {
                        tracing::debug!(member = id, error = %e, "resume on the new member failed; trying again");
                        avoid.push(id);
                    }
                },
                Ok(Opened::Refused(response))
                    if matches!(
                        response.status(),
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                    ) =>
                {
                    return Err(Some((
                        close::UNAUTHORIZED,
                        "the login is no longer valid; log in again".into(),
                    )));
                }
                Ok(Opened::Refused(response)) => {
                    tracing::debug!(member = id, status = %response.status(), "a member refused a re-pinned socket");
                    avoid.push(id);
                }
                Err(e) => {
                    tracing::debug!(member = id, error = %e, "could not re-pin on a member");
                    avoid.push(id);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(None)
}

/// When a socket next tries to move to the member that owns its stream, and how its
/// last tries went.
#[derive(Default)]
struct Moving {
    at: Option<tokio::time::Instant>,
    /// Moves that failed in a row: the next try waits longer, up to 10 s.
    failed: u32,
    /// Where the last failed move went.
    failed_to: Option<u64>,
    /// A member refused the login: no more moves until the next re-pin.
    off: bool,
}

/// Opens the socket on the member at `addr` and resumes its stream there, for a move
/// while its member still serves (nothing of it is unanswered). The error says why, and
/// whether the member refused the login (trying again would not help).
async fn shift(edge: &Edge, track: &mut Tracker, addr: &str, client: SocketAddr, path: &str, headers: &HeaderMap) -> Result<UpstreamSocket, (String, bool)> {
    let target = track.reconnect_path(path);
    let mut socket = match tokio::time::timeout(MOVE_PATIENCE, open_socket(&edge.up, addr, edge.listener, client, &target, headers)).await {
        Ok(Ok(Opened::Socket(socket))) => socket,
        Ok(Ok(Opened::Refused(response))) => {
            let for_good = matches!(response.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
            return Err((format!("the member refused it with {}", response.status()), for_good));
        }
        Ok(Err(e)) => return Err((e, false)),
        Err(_) => return Err(("the member did not answer in time".into(), false)),
    };
    match tokio::time::timeout(MOVE_PATIENCE, track.resume(&mut socket)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err((e, false)),
        Err(_) => return Err(("no answer to the resume in time".into(), false)),
    }
    // A ping whose pong never came (it was refused, or lost with a member) no longer
    // holds the socket back.
    track.forget_pings();
    Ok(socket)
}

/// A request the client sent that has had no answer yet.
struct Pending {
    kind: String,
    /// The request's own `ref` (operator frames), if it had one.
    reference: Option<Value>,
    /// Its idempotency key (`send`), if it had one.
    key: Option<String>,
    /// The frame, kept only for what a re-pin sends again (keyed `send`s and `start`s,
    /// `close`s, stamped `accept`s).
    text: String,
    /// What this entry holds, counted against [`MAX_PENDING_BYTES`]: the frame kept,
    /// its type, key and references, and a resume's token.
    cost: usize,
    /// Where it came among the socket's kept requests (client: see `Tracker::ping_marks`).
    order: u64,
}

impl Pending {
    /// Whether the member's answer to it carries no name: it has no `ref` one can echo
    /// (an error echoes one of at most `MAX_ECHOED_REF_BYTES` as JSON), and is no `send`
    /// with a key one can (its errors name it by the key).
    fn nameless(&self) -> bool {
        let echoed = |v: &Value| serde_json::to_string(v).is_ok_and(|t| t.len() <= crate::frames::MAX_ECHOED_REF_BYTES);
        let named_by_ref = self.reference.as_ref().is_some_and(echoed);
        // An operator's `send` is named by its `ref` when it has one, however long.
        let named_by_key = self.kind == "send" && self.reference.is_none() && self.key.as_ref().is_some_and(|k| echoed(&Value::String(k.clone())));
        !named_by_ref && !named_by_key
    }
}

/// Pings a client socket's tracker remembers the place of at most (see
/// `Tracker::ping_marks`).
const MAX_PING_MARKS: usize = 64;

/// The longest frame type a pending request keeps as it is; a longer one (no request
/// has one) is kept as `other`.
const MAX_KIND: usize = 32;

/// Bytes of frames a socket's unanswered requests may hold for a re-pin; past it (or
/// past [`MAX_PENDING`] requests) new requests are refused until answers come.
const MAX_PENDING_BYTES: usize = 256 * 1024;

/// What a gateway must know of a socket's protocol to move it between members: where
/// its stream is, and which requests are unanswered.
struct Tracker {
    surface: Surface,
    /// Client: the conversation's token (from `started`, or a `resume` the member accepted).
    token: Option<String>,
    /// Client: the conversation that token names (read, not verified: it only says
    /// where the socket goes; the member checks the token).
    conversation: Option<u64>,
    /// Client: `ping`s sent with no `pong` yet, and since when one has been waiting: a
    /// socket moves only when none waits, or the oldest has waited past
    /// [`PING_PATIENCE`] (its pong will not come: refused, or lost with a member).
    pings: u32,
    ping_since: Option<Instant>,
    /// Client: for each `ping` waiting for its `pong`, how many requests had been kept
    /// before it ([`Pending::order`]). The member answers a socket's frames in order,
    /// so a `pong` says every request before its `ping` was handled: a `close` of a
    /// conversation already closed, which gets no answer at all, is settled then.
    ping_marks: VecDeque<u64>,
    /// Whether marks were dropped (more than [`MAX_PING_MARKS`] pings waited): then no
    /// pong settles anything until every ping was answered.
    ping_marks_lost: bool,
    /// Requests kept so far (the next one's [`Pending::order`]).
    kept: u64,
    /// Whether the member has opened the socket's stream: an operator's `hello`, a
    /// visitor's `started` or `resumed`. A socket moves only then.
    established: bool,
    /// The last `seq` delivered on the stream (client: conversation; operator: feed).
    last_seq: Option<u64>,
    /// Operator: the `last_seq` the socket was opened with, until the first `hello`.
    requested: Option<u64>,
    /// Operator under protocol 2 (one feed per group): the last `seq` delivered of each
    /// feed, and before the first `hello` the `cursor` the socket was opened with.
    feeds: Option<Box<Feeds>>,
    /// Client: the `resume`s the client sent that are not answered yet (each one's token
    /// and `last_seq`), oldest first: answers come in the order they were asked.
    resume_asked: VecDeque<Option<(String, u64)>>,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Client: the conversation's `closed` event went by on this socket. A `close` then
    /// gets no answer at all (closing again is a no-op), so it is not kept waiting for one.
    closed: bool,
    /// Supervisor: the last `watch` it sent (at most one frame's worth of text), sent
    /// again on the member a re-pin moves the socket to, which knows of no watch.
    watch: Option<String>,
    /// The client's own resume, sent again after a re-pin, was refused with a close:
    /// the socket closes so once the answers before it are delivered.
    close_after_replay: Option<(u16, String)>,
    /// Supervisor: a `watch` of a conversation sent and not yet taken (no `watched`
    /// frame for it yet): the conversation and the frame.
    watch_asked: Option<(u64, String)>,
}

/// A protocol 2 operator socket's positions (docs/protocol.md §3.6).
#[derive(Default)]
struct Feeds {
    /// The `cursor` the socket was opened with, until the first `hello`.
    requested: Option<BTreeMap<String, u64>>,
    /// The last `seq` delivered of each feed; empty before the first `hello`.
    delivered: BTreeMap<String, u64>,
}

/// `query` decoded as a form (as axum's `Query` decodes it) and encoded again in one
/// way: `last_seq=%34%30` becomes `last_seq=40`, `last%5Fseq` becomes `last_seq`.
fn canonical_query(query: &str) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        out.append_pair(&name, &value);
    }
    out.finish()
}

/// Parses a `cursor` query value (`r.44,c0.17`); the member checks it again.
fn parse_feeds(text: &str) -> BTreeMap<String, u64> {
    // Commas may come percent-encoded; nothing else in a cursor needs encoding.
    let text = text.replace("%2C", ",").replace("%2c", ",");
    text.split(',').filter_map(|p| p.split_once('.')).filter_map(|(feed, seq)| Some((feed.to_owned(), seq.parse().ok()?))).collect()
}

impl Tracker {
    fn new(surface: Surface, path: &str) -> Self {
        let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let param = |name: &str| query.split('&').find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('=')));
        let requested = param("last_seq").and_then(|v| v.parse::<u64>().ok());
        let feeds = (surface == Surface::Operator && param("protocol").and_then(|v| v.parse::<u32>().ok()) == Some(2))
            .then(|| Box::new(Feeds { requested: param("cursor").map(parse_feeds), delivered: BTreeMap::new() }));
        Tracker { surface, token: None, conversation: None, pings: 0, ping_since: None, ping_marks: VecDeque::new(), ping_marks_lost: false, kept: 0, established: false, last_seq: None, requested, feeds, resume_asked: VecDeque::new(), pending: VecDeque::new(), pending_bytes: 0, closed: false, watch: None, close_after_replay: None, watch_asked: None }
    }

    /// Whether the stream is open and nothing the client sent waits for an answer: the
    /// socket may move.
    fn quiet(&self) -> bool {
        let ping_waits = self.pings > 0 && self.ping_since.is_some_and(|since| since.elapsed() < PING_PATIENCE);
        self.established && self.pending.is_empty() && !ping_waits && self.resume_asked.is_empty()
    }

    /// Forgets the pings waiting for a pong: none will come (see `shift`, `replay`).
    fn forget_pings(&mut self) {
        self.pings = 0;
        self.ping_since = None;
        self.ping_marks.clear();
        self.ping_marks_lost = false;
    }

    /// Sets the client's token and the conversation it names.
    fn set_token(&mut self, token: String) {
        self.conversation = token_conversation(&token);
        self.token = Some(token);
    }

    /// A frame the client sent, on its way to the member: `Ok(Some(text))` when the
    /// member is to get `text` instead (an operator's `accept`, stamped with when it
    /// reached this gateway). `Err` with an error frame for the client when too many
    /// requests are unanswered: the frame is not relayed.
    #[cfg(test)]
    fn outgoing(&mut self, text: &str) -> Result<Option<String>, Value> {
        self.outgoing_at(text, switchboard_actors::actors::now_ms().0)
    }

    /// [`Tracker::outgoing`] for a frame read from the client's socket at `read_at`
    /// (the entry clock's ms): an `accept` counts from then, however long the relay
    /// was busy (a re-pin, a slow member) before it took the frame.
    fn outgoing_at(&mut self, text: &str, read_at: u64) -> Result<Option<String>, Value> {
        if self.surface == Surface::Supervisor {
            if let Ok(frame) = serde_json::from_str::<Value>(text) {
                if frame.get("type").and_then(Value::as_str) == Some("watch") {
                    match frame.get("conversation").and_then(Value::as_u64) {
                        // A conversation to watch: kept once its `watched` frame says the
                        // member took it (a refused one leaves the watch before in place).
                        Some(id) => self.watch_asked = Some((id, text.to_owned())),
                        // Watching none: no answer comes, and none refuses it.
                        None => {
                            self.watch = Some(text.to_owned());
                            self.watch_asked = None;
                        }
                    }
                }
            }
            return Ok(None);
        }
        // A client's frame the member would refuse to read is refused here with the
        // member's very answer, and neither relayed nor kept: such answers name no
        // request the tracker could settle.
        if self.surface == Surface::Client {
            crate::client_ws::parse_client(text)?;
        }
        let Ok(mut frame) = serde_json::from_str::<Value>(text) else { return Ok(None) };
        let kind = frame.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
        if kind == "ping" {
            if self.pings == 0 {
                self.ping_since = Some(Instant::now());
            }
            self.pings = self.pings.saturating_add(1);
            if self.surface == Surface::Client {
                if self.ping_marks.len() >= MAX_PING_MARKS {
                    self.ping_marks.clear();
                    self.ping_marks_lost = true;
                }
                if !self.ping_marks_lost {
                    self.ping_marks.push_back(self.kept);
                }
            }
        }
        // No answer comes to these, or none worth sending again: nothing to keep.
        if matches!(kind.as_str(), "typing" | "read" | "ping") {
            return Ok(None);
        }
        // An operator's answer to an offer counts from when it reached this gateway
        // (routing rules 9): the member is told, and it is sent again with the same
        // moment after a re-pin, since accepting twice is answered `ok` (protocol.md §2).
        let mut stamped = (self.surface == Surface::Operator && kind == "accept").then(|| {
            frame["received_at"] = json!(read_at);
            frame.to_string()
        });
        // A visitor's `start` goes with a key (the client's own, or one made here), so
        // it is sent again after a re-pin like a keyed `send`: the member answers the
        // copy with the conversation the first one opened, if it did (protocol.md §1).
        let start = self.surface == Surface::Client && kind == "start";
        // (`"key": null` is no key: the member reads it as none.)
        let mut start_keyed = start && frame.get("key").is_some_and(|k| !k.is_null());
        if start && !start_keyed {
            if let Ok(key) = crate::auth::new_start_key() {
                frame["key"] = json!(key);
                stamped = Some(frame.to_string());
                start_keyed = true;
            }
        }
        // Written again, a frame may grow past what a member takes from a gateway (its
        // numbers written out in full): refused here rather than closed there, named as
        // a member names its answers (an operator's `ref`, else the frame's type).
        if stamped.as_ref().is_some_and(|s| s.len() > text.len() + crate::ws::RELAYED_STAMP_BYTES) {
            let reference = frame.get("ref").filter(|r| !r.is_null() && self.surface != Surface::Client);
            let error = crate::frames::error("bad_frame", "this frame grows too large when relayed: write its numbers as integers or plain decimals", reference);
            return Err(crate::frames::answering(error, Some(kind.as_str())));
        }
        let text = stamped.as_deref().unwrap_or(text);
        // A start's key names no answer (`ack`s and errors name a `send`'s).
        let key = if start { None } else { frame.get("key").and_then(Value::as_str).map(str::to_owned) };
        // A client's `ack` and errors name the key; an operator's name the `ref`.
        // A `null` ref is no name: the answer's `"ref": null` reads as none too.
        let reference = if self.surface == Surface::Client { None } else { frame.get("ref").filter(|r| !r.is_null()).cloned() };
        if self.surface == Surface::Client && kind == "close" && self.closed {
            return Ok(None);
        }
        // A client's `close` is sent again after a re-pin (closing twice is a no-op); an
        // operator's is answered `unavailable` like any other request (protocol.md §1):
        // sent again after it committed, it would be refused `not_assigned`.
        let keep = (kind == "send" && key.is_some()) || (kind == "close" && self.surface == Surface::Client) || start_keyed || stamped.is_some();
        let held = if keep { text.len() } else { 0 };
        let kind = if kind.len() <= MAX_KIND { kind } else { "other".to_owned() };
        let value_len = |v: &Option<Value>| v.as_ref().map_or(0, |v| v.to_string().len());
        let token_len = if self.surface == Surface::Client && kind == "resume" { frame.get("token").and_then(Value::as_str).map_or(0, str::len) } else { 0 };
        let cost = held + kind.len() + key.as_ref().map_or(0, String::len) + value_len(&reference) + token_len;
        if self.pending.len() >= MAX_PENDING || self.pending_bytes + cost > MAX_PENDING_BYTES {
            let reference = reference.clone().or_else(|| key.clone().map(Value::String));
            let error = crate::frames::error("rate_limited", "too many requests without an answer yet; this one was not sent", reference.as_ref());
            return Err(crate::frames::answering(error, Some(kind.as_str())));
        }
        if self.surface == Surface::Client && kind == "resume" {
            if let Some(token) = frame.get("token").and_then(Value::as_str) {
                self.resume_asked.push_back(Some((token.to_owned(), frame.get("last_seq").and_then(Value::as_u64).unwrap_or(0))));
            } else {
                // Answered too (an error), in its turn: kept so the queue stays in step.
                self.resume_asked.push_back(None);
            }
        }
        self.pending_bytes += cost;
        let order = self.kept;
        self.kept += 1;
        self.pending.push_back(Pending { kind, reference, key, text: if keep { text.to_owned() } else { String::new() }, cost, order });
        Ok(stamped)
    }

    /// A frame from the member; `false` when the client must not see it.
    fn incoming(&mut self, text: &str) -> bool {
        if self.surface == Surface::Supervisor {
            // Only while a watch waits for the member's word is a frame looked into.
            if let Some((id, _)) = &self.watch_asked {
                let head = serde_json::from_str::<Head>(text).ok();
                let kind = head.as_ref().and_then(|f| f.kind.as_ref()).and_then(Value::as_str);
                if kind == Some("watched") && head.as_ref().and_then(|f| f.conversation.as_ref()).and_then(Value::as_u64) == Some(*id) {
                    self.watch = self.watch_asked.take().map(|(_, text)| text);
                } else if kind == Some("error") {
                    // Refused (the supervisor sends nothing else that is answered with an
                    // error): the watch before stays in force, and is what a re-pin asks.
                    self.watch_asked = None;
                }
            }
            return true;
        }
        // Only the fields read here are built; the rest of a frame (a page of entries, a
        // conversation's history) is skipped as it is parsed.
        let Ok(frame) = serde_json::from_str::<Head>(text) else { return true };
        let kind = frame.kind.as_ref().and_then(Value::as_str).unwrap_or_default();
        // The member's entry clock, which this gateway stamps operators' answers by
        // (routing rules 9): read from it, not from this machine's wall clock alone, an
        // answer is weighed against the offer's deadline on the member's time.
        if let (Surface::Operator, "hello", Some(now)) = (self.surface, kind, frame.now.as_ref().and_then(Value::as_u64)) {
            switchboard_actors::actors::observe_entry_time(switchboard_actors::model::Timestamp(now));
        }
        match kind {
            "event" if self.feeds.is_some() => {
                let feed = frame.feed.as_ref().and_then(Value::as_str).unwrap_or("r");
                if let (Some(feeds), Some(seq)) = (self.feeds.as_mut(), frame.seq.as_ref().and_then(Value::as_u64)) {
                    match feeds.delivered.get_mut(feed) {
                        // Already delivered (cannot happen after a correct resume).
                        Some(last) if seq <= *last => return false,
                        Some(last) => *last = seq,
                        None => {
                            feeds.delivered.insert(feed.to_owned(), seq);
                        }
                    }
                }
            }
            "hello" if self.feeds.is_some() => {
                self.established = true;
                // Each feed continues after the point asked for (not past its newest), a
                // feed not asked for from its start, or after the hello without a cursor.
                if let (Some(feeds), Some(newest)) = (self.feeds.as_mut(), frame.cursor.as_ref().and_then(Value::as_object)) {
                    let requested = feeds.requested.take();
                    feeds.delivered = newest
                        .iter()
                        .filter_map(|(feed, seq)| Some((feed.clone(), seq.as_u64()?)))
                        .map(|(feed, newest)| {
                            let at = match &requested {
                                Some(asked) => asked.get(&feed).copied().unwrap_or(0).min(newest),
                                None => newest,
                            };
                            (feed, at)
                        })
                        .collect();
                }
            }
            "event" => {
                if let Some(seq) = frame.seq.as_ref().and_then(Value::as_u64) {
                    if self.last_seq.is_some_and(|last| seq <= last) {
                        // Already delivered (cannot happen after a correct resume; kept
                        // as the guarantee of no duplicate).
                        return false;
                    }
                    self.last_seq = Some(seq);
                }
                if self.surface == Surface::Client {
                    match frame.event.as_ref().and_then(Value::as_str) {
                        Some("closed") => {
                            self.closed = true;
                            // Every close sent before a switch to another conversation is
                            // answered by it: a second close of the same one changes
                            // nothing and the member answers it with nothing.
                            let switch = self.pending.iter().find(|p| matches!(p.kind.as_str(), "resume" | "start")).map(|p| p.order);
                            while self.settle(|p| p.kind == "close" && switch.is_none_or(|at| p.order < at)).is_some() {}
                        }
                        Some("rated") => {
                            self.settle(|p| p.kind == "rate");
                        }
                        _ => {}
                    }
                }
            }
            "hello" => {
                self.established = true;
                // Events after the point the socket asked for follow the hello (§3.2).
                let newest = frame.seq.as_ref().and_then(Value::as_u64);
                self.last_seq = match (self.requested.take(), newest) {
                    (Some(asked), Some(newest)) => Some(asked.min(newest)),
                    (_, newest) => newest,
                };
            }
            "pong" => {
                self.pings = self.pings.saturating_sub(1);
                if self.pings == 0 {
                    self.ping_since = None;
                }
                if self.ping_marks_lost {
                    self.ping_marks_lost = self.pings > 0;
                } else if let Some(before) = self.ping_marks.pop_front() {
                    // Every `close` sent before that ping was handled: settled now, since
                    // one that changed nothing (the conversation was closed already) has
                    // no answer, and one that closed it needs no resend.
                    while self.settle(|p| p.kind == "close" && p.order < before).is_some() {}
                }
            }
            "started" => {
                self.established = true;
                self.closed = false;
                self.token = frame.token.as_ref().and_then(Value::as_str).map(str::to_owned);
                self.conversation = frame.conversation.as_ref().and_then(Value::as_u64);
                self.last_seq = Some(0);
                self.settle_moved_to("start");
            }
            "resumed" => {
                self.established = true;
                self.closed = false;
                if let Some(Some((token, last_seq))) = self.resume_asked.pop_front() {
                    self.set_token(token);
                    self.last_seq = Some(last_seq);
                }
                self.settle_moved_to("resume");
            }
            "ack" | "ok" | "history" | "error" => {
                let code = frame.code.as_ref().and_then(Value::as_str).unwrap_or_default();
                if kind == "error" && matches!(code, "resume_gap" | "unauthorized") {
                    return true;
                }
                // The answer to a `typing` or `read`, which nothing here waits for, to the
                // opening of an operator's socket, or to a frame that is not JSON (never
                // kept here).
                if kind == "error" && (matches!(frame.answers.as_ref().and_then(Value::as_str), Some("typing" | "read" | "hello")) || code == "bad_json") {
                    return true;
                }
                let settled = match frame.reference.as_ref().or(frame.key.as_ref()).cloned() {
                    // Named by its `ref`, or by its key when it had no `ref`.
                    Some(named) => self.settle(|p| p.reference.as_ref() == Some(&named) || (p.reference.is_none() && p.key.is_some() && p.key.as_deref() == named.as_str())),
                    // Requests are answered in the order they were sent: an answer
                    // without a name is the oldest unnamed request's.
                    // From a member that says which frame an unnamed error answers
                    // (`for`), the oldest unnamed request of that kind: a `close` that
                    // changed nothing gets no answer and must not take another's.
                    // A request whose `ref` (or a `send`'s key) is too long for an error
                    // to echo is answered without a name too.
                    None => match frame.answers.as_ref().and_then(Value::as_str) {
                        Some(answers) => self.settle(|p| p.nameless() && p.kind == answers),
                        None => self.settle(Pending::nameless),
                    },
                };
                if kind == "error" && settled.as_deref() == Some("resume") {
                    // A refused resume (or one to ask again) leaves the stream where it was.
                    self.resume_asked.pop_front();
                }
            }
            _ => {}
        }
        true
    }

    /// Drops the oldest pending request `matches` picks, and says what kind it was.
    /// The socket now follows the conversation the oldest pending `kind` (`start` or
    /// `resume`) asked for: that request is settled, and with it every `close` and
    /// `rate` sent before it. The member handled those first, and one whose answer is
    /// not on its way never gets one; sent again after a re-pin, it would close or
    /// rate the conversation the socket follows now.
    fn settle_moved_to(&mut self, kind: &str) {
        let at = self.pending.iter().find(|p| p.kind == kind).map(|p| p.order);
        self.settle(|p| p.kind == kind);
        if let Some(at) = at {
            while self.settle(|p| matches!(p.kind.as_str(), "close" | "rate") && p.order < at).is_some() {}
        }
    }

    fn settle(&mut self, matches: impl Fn(&Pending) -> bool) -> Option<String> {
        let mut settled = None;
        if let Some(i) = self.pending.iter().position(matches) {
            if let Some(done) = self.pending.remove(i) {
                self.pending_bytes = self.pending_bytes.saturating_sub(done.cost);
                settled = Some(done.kind);
            }
        }
        // Most of a socket's life nothing is pending: hold no room for it then.
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
        settled
    }

    /// The path to open on another member: the operator's feed resumes after the last
    /// `seq` delivered.
    fn reconnect_path(&self, path: &str) -> String {
        if let Some(feeds) = self.feeds.as_ref().filter(|f| !f.delivered.is_empty()) {
            let (base, query) = path.split_once('?').unwrap_or((path, ""));
            let mut params: Vec<String> = query.split('&').filter(|p| !p.is_empty() && !p.starts_with("cursor=") && !p.starts_with("last_seq=")).map(str::to_owned).collect();
            let cursor: Vec<String> = feeds.delivered.iter().map(|(feed, seq)| format!("{feed}.{seq}")).collect();
            params.push(format!("cursor={}", cursor.join(",")));
            return format!("{base}?{}", params.join("&"));
        }
        match (self.surface, self.last_seq) {
            (Surface::Operator, Some(seq)) => {
                let (base, query) = path.split_once('?').unwrap_or((path, ""));
                let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty() && !p.starts_with("last_seq=")).collect();
                let last = format!("last_seq={seq}");
                params.push(&last);
                format!("{base}?{}", params.join("&"))
            }
            _ => path.to_owned(),
        }
    }

    /// Brings a freshly opened socket to where the old one was: the client's
    /// conversation resumed after the last `seq` (its `resumed` swallowed unless the
    /// client itself is waiting for one), the operator's `hello` swallowed unless the
    /// desk never got one (the member before went away before its `hello`).
    async fn resume(&mut self, socket: &mut UpstreamSocket) -> Result<(), String> {
        let unheard = !self.established;
        let expect = match self.surface {
            Surface::Supervisor => return Ok(()),
            Surface::Operator => "hello",
            Surface::Client => {
                // The client's own resume, if it is waiting for one; else where it was.
                let (token, last_seq) = match (self.resume_asked.iter().rev().flatten().next(), &self.token) {
                    (Some((token, last_seq)), _) => (token.clone(), *last_seq),
                    (None, Some(token)) => (token.clone(), self.last_seq.unwrap_or(0)),
                    (None, None) => return Ok(()),
                };
                let frame = json!({"type": "resume", "token": token, "last_seq": last_seq});
                socket.send(ServerOp::Text, frame.to_string().as_bytes()).await?;
                "resumed"
            }
        };
        let wait = async {
            loop {
                match socket.next().await? {
                    Inbound::Text(text) => {
                        let frame: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                        let kind = frame.get("type").and_then(Value::as_str).unwrap_or_default();
                        if kind == expect {
                            return Ok(frame);
                        }
                        if kind == "error" {
                            return Err(format!("{RESUME_REFUSED}{text}"));
                        }
                    }
                    Inbound::Ping(payload) => socket.send(ServerOp::Pong, &payload).await?,
                    Inbound::Close(Some(close::UNAUTHORIZED), _) if expect == "resumed" => {
                        return Err(format!("{RESUME_REFUSED}{}", crate::frames::error("unauthorized", "token is not a valid client token", None)));
                    }
                    Inbound::Close(code, reason) => return Err(format!("closed {code:?} {reason}")),
                    _ => {}
                }
            }
        };
        let answered = tokio::time::timeout(RESUME_WAIT, wait).await.map_err(|_| "no answer to the resume".to_string())?;
        let frame = match answered {
            Ok(frame) => frame,
            // The client's own resume refused for what it asked (a token no longer
            // valid, a conversation gone, a `last_seq` ahead of it), not for the member:
            // any member would refuse it. The client gets that answer, as it would have
            // from the member before, and the socket follows what it followed before.
            Err(refusal) if self.surface == Surface::Client && self.resume_asked.iter().flatten().next().is_some() => {
                let Some(error) = refusal.strip_prefix(RESUME_REFUSED).and_then(|text| serde_json::from_str::<Value>(text).ok()) else { return Err(refusal) };
                let code = error.get("code").and_then(Value::as_str).unwrap_or_default();
                if matches!(code, "unavailable" | "internal" | "") {
                    return Err(refusal);
                }
                let asked = std::mem::take(&mut self.resume_asked);
                if code == "unauthorized" {
                    // The member closes the socket after that answer (protocol.md): so
                    // does this one, once the answer is delivered.
                    self.close_after_replay = Some((close::UNAUTHORIZED, "unauthorized".into()));
                } else if let Err(e) = Box::pin(self.resume(socket)).await {
                    // Where it was before (nothing, if it followed no conversation yet);
                    // if that fails too, the next member is asked the client's resume
                    // again, which is still waiting for its answer.
                    self.resume_asked = asked;
                    return Err(e);
                }
                let text = error.to_string();
                self.pending.push_front(Pending { kind: "__resumed".into(), reference: None, key: None, cost: text.len(), text, order: 0 });
                return Ok(());
            }
            // The gateway's own resume of what the socket followed, refused for good: the
            // conversation is gone (retention), or the client's token no longer valid.
            // Every member would refuse it: the client gets the answer it would have got
            // resuming itself, and the socket follows nothing (closed with 4001 after an
            // `unauthorized`, as a member closes it).
            Err(refusal) if self.surface == Surface::Client => {
                let Some(error) = refusal.strip_prefix(RESUME_REFUSED).and_then(|text| serde_json::from_str::<Value>(text).ok()) else { return Err(refusal) };
                let code = error.get("code").and_then(Value::as_str).unwrap_or_default();
                if !matches!(code, "not_found" | "unauthorized") {
                    return Err(refusal);
                }
                if code == "unauthorized" {
                    self.close_after_replay = Some((close::UNAUTHORIZED, "unauthorized".into()));
                }
                self.token = None;
                self.conversation = None;
                self.last_seq = None;
                let text = error.to_string();
                self.pending.push_front(Pending { kind: "__resumed".into(), reference: None, key: None, cost: text.len(), text, order: 0 });
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match self.surface {
            Surface::Client => {
                if let Some((token, last_seq)) = self.resume_asked.iter().rev().flatten().next().cloned() {
                    // The client asked for this `resumed` itself (its latest resume, the
                    // one the new member answered): hand it over.
                    self.resume_asked.clear();
                    self.closed = false;
                    self.set_token(token);
                    self.last_seq = Some(last_seq);
                    self.established = true;
                    let text = frame.to_string();
                    self.pending.push_front(Pending { kind: "__resumed".into(), reference: None, key: None, cost: text.len(), text, order: 0 });
                }
            }
            Surface::Operator if unheard => {
                // The desk is still waiting for its first `hello`: this one is it (taken
                // as if it came on the first socket, which sets where the feed stands).
                let text = frame.to_string();
                if self.incoming(&text) {
                    self.pending.push_front(Pending { kind: "__resumed".into(), reference: None, key: None, cost: text.len(), text, order: 0 });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// What to do about the requests the lost member never answered. Its pings are
    /// answered here, after everything else (the socket is alive, only its member
    /// changed): a client that waits for its pong to know the socket lives would
    /// otherwise drop it, which is what a re-pin is there to spare it.
    fn replay(&mut self) -> Vec<Replay> {
        let pongs = self.pings.min(MAX_REPLAYED_PONGS);
        self.forget_pings();
        let mut actions = Vec::new();
        if let Some(watch) = &self.watch {
            // The new member starts with the floor alone: the inspector's watch again.
            actions.push(Replay::Resend(watch.clone()));
        }
        if let Some((_, asked)) = &self.watch_asked {
            // A watch the member before never answered: asked again, after the one in
            // force, which it replaces if the new member takes it.
            actions.push(Replay::Resend(asked.clone()));
        }
        let mut keep = VecDeque::new();
        // A resume the client sent after some of its requests may have moved the socket
        // to another conversation (the new member resumed the latest one asked): those
        // earlier requests were for the conversation it left, and sent again now they
        // would land in the one it moved to. They are answered `unavailable` instead.
        let moved_at = self.pending.iter().filter(|p| p.kind == "resume").map(|p| p.order).max();
        for pending in std::mem::take(&mut self.pending) {
            let before_a_resume = moved_at.is_some_and(|at| pending.order < at) && pending.kind != "__resumed";
            match pending.kind.as_str() {
                "__resumed" => {
                    if let Ok(frame) = serde_json::from_str::<Value>(&pending.text) {
                        actions.push(Replay::Answer(frame));
                    }
                }
                // The key makes a resend safe (a `send`'s, a `start`'s); closing twice is
                // a no-op; accepting an offer already yours is `ok`.
                "send" | "start" | "close" | "accept" if !pending.text.is_empty() && !before_a_resume => {
                    actions.push(Replay::Resend(pending.text.clone()));
                    keep.push_back(pending);
                }
                // Resumed above already.
                "resume" => {}
                _ => {
                    let reference = pending.reference.clone().or_else(|| pending.key.clone().map(Value::String));
                    let error = crate::frames::error(
                        "unavailable",
                        "the node serving this socket stopped before answering; the request may or may not have taken effect",
                        reference.as_ref(),
                    );
                    actions.push(Replay::Answer(crate::frames::answering(error, Some(pending.kind.as_str()))))
                }
            }
        }
        self.pending_bytes = keep.iter().map(|p| p.cost).sum();
        self.pending = keep;
        // Every resume was settled above (the latest resumed on the new member): none
        // waits any more.
        self.resume_asked.clear();
        actions.extend((0..pongs).map(|_| Replay::Answer(json!({"type": "pong"}))));
        if let Some((code, reason)) = self.close_after_replay.take() {
            // Nothing goes to a member that closes the socket.
            actions.retain(|a| !matches!(a, Replay::Resend(_)));
            actions.push(Replay::Close(code, reason));
        }
        actions
    }
}

/// How [`Tracker::resume`]'s wait reports an `error` frame answering the resume (the
/// frame follows).
const RESUME_REFUSED: &str = "the member answered the resume with ";

/// The conversation of a visitor's attachment request (`/attachments…?token=<client
/// token>`), read from its token without checking it (the member does).
fn attachment_conversation(uri: &Uri) -> Option<u64> {
    if !uri.path().starts_with("/attachments") {
        return None;
    }
    let token = uri.query()?.split('&').find_map(|p| p.strip_prefix("token="))?;
    token_conversation(token)
}

/// The conversation a client token names, read without checking its signature (the
/// member checks it): `v1.<claims>.<mac>` with claims `{"kind":"client","conversation":N,…}`.
fn token_conversation(token: &str) -> Option<u64> {
    use base64::Engine;
    let claims = token.strip_prefix("v1.")?.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    (claims.get("kind")? == "client").then(|| claims.get("conversation")?.as_u64()).flatten()
}

/// The gateway's own routes: health, readiness, metrics and its view of the cluster;
/// everything else is relayed.
fn router(edge: Arc<Edge>, sockets: &[&str]) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(|State(edge): State<Arc<Edge>>| async move {
                if edge.up.ready() {
                    (StatusCode::OK, Json(json!({"status": "ready"})))
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"status": "not_ready"})),
                    )
                }
            }),
        );
    if edge.listener == Listener::Private {
        router = router
            .route(
                "/metrics",
                get(|State(edge): State<Arc<Edge>>| async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        edge.up.render(&edge.metrics),
                    )
                }),
            )
            .route(
                "/api/gateway",
                get(|State(edge): State<Arc<Edge>>| async move { Json(edge.up.cluster_view()) }),
            );
    }
    for path in sockets {
        router = router.route(path, get(relay_socket));
    }
    // The gateway's own answers (health, metrics, its 503s) carry the headers a
    // member's do; a member's answers carry them already and keep them.
    let surface = if edge.listener == Listener::Private { crate::Surface::Private } else { crate::Surface::Public };
    router.fallback(relay_http).method_not_allowed_fallback(crate::no_such_method).with_state(edge).layer(axum::middleware::from_fn(move |r, n| crate::security_headers(surface, r, n)))
}

/// A gateway whose listeners are bound and serving.
pub struct Running {
    pub public_addr: SocketAddr,
    pub private_addr: SocketAddr,
    /// Ends once `stop` turned true and both listeners stopped.
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds the listeners and serves them until `stop` turns true.
pub async fn start(
    options: Options,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Running, GatewayError> {
    let bind: SocketAddr = if options.members.iter().any(|(_, a)| a.starts_with('[')) {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .map_err(|e| GatewayError::Config(format!("{e}")))?;
    let endpoint = switchboard_raft::tls::client_endpoint(&options.identity, bind).map_err(|e| GatewayError::Config(e.to_string()))?;
    let up = Upstreams::new(Peers::with_silence(endpoint, MEMBER_SILENT), &options.members);
    let metrics = Arc::new(Metrics::default());
    let edge = |listener| {
        Arc::new(Edge {
            up: up.clone(),
            listener,
            metrics: metrics.clone(),
            client_limits: options.client_limits,
            operator_limits: options.operator_limits,
            ping_interval: options.ping_interval,
            request_timeout: options.request_timeout,
        })
    };
    let public = router(edge(Listener::Public), &["/ws/client"]);
    let private = router(edge(Listener::Private), &["/ws/operator", "/ws/supervisor"]);
    let public_listener = tokio::net::TcpListener::bind(options.public_addr).await?;
    let private_listener = tokio::net::TcpListener::bind(options.private_addr).await?;
    let (public_addr, private_addr) = (
        public_listener.local_addr()?,
        private_listener.local_addr()?,
    );
    // The first map before the first request: a gateway that starts with its members up
    // serves at once. The first poll may only start the dials; a few more follow.
    let first_map = tokio::time::Instant::now() + Duration::from_secs(5);
    up.poll().await;
    while !up.ready() && tokio::time::Instant::now() < first_map {
        tokio::time::sleep(POLL_EVERY).await;
        up.poll().await;
    }
    let poller = {
        let up = up.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(POLL_EVERY) => {}
                    _ = async { drop(stop.wait_for(|s| *s).await) } => return,
                }
                up.poll().await;
            }
        })
    };
    tracing::info!(%public_addr, %private_addr, members = options.members.len(), "gateway listening");
    let a = tokio::spawn(crate::listener::serve(
        public_listener,
        public,
        options.connections.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let b = tokio::spawn(crate::listener::serve(
        private_listener,
        private,
        options.connections,
        metrics,
        stop,
    ));
    let task = tokio::spawn(async move {
        let _ = tokio::join!(a, b);
        poller.abort();
    });
    Ok(Running {
        public_addr,
        private_addr,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_socket_opened_with_last_seq_gets_the_replayed_events() {
        let mut t = Tracker::new(Surface::Operator, "/ws/operator?token=T&last_seq=40");
        assert!(t.incoming(r#"{"type":"hello","seq":44}"#));
        for seq in 41..=45 {
            assert!(t.incoming(&format!(r#"{{"type":"event","kind":"presence","seq":{seq}}}"#)), "event {seq} is delivered");
        }
        assert!(!t.incoming(r#"{"type":"event","kind":"presence","seq":45}"#), "a repeat is not");
        assert_eq!(t.reconnect_path("/ws/operator?token=T&last_seq=40"), "/ws/operator?token=T&last_seq=45");
    }

    #[test]
    fn a_protocol_2_operator_socket_resumes_every_feed_where_it_was() {
        let mut t = Tracker::new(Surface::Operator, "/ws/operator?token=T&protocol=2&cursor=r.40,c0.7");
        // The member replays r after 40 (its newest is 44), c0 from 3 (7 is ahead of
        // its newest), c1 from its start (not asked for).
        assert!(t.incoming(r#"{"type":"hello","protocol":2,"cursor":{"c0":3,"c1":2,"r":44}}"#));
        assert_eq!(t.reconnect_path("/ws/operator?token=T&protocol=2&cursor=r.40,c0.7"), "/ws/operator?token=T&protocol=2&cursor=c0.3,c1.0,r.40");
        for (feed, seq) in [("r", 41), ("c1", 1), ("r", 42), ("c0", 4)] {
            assert!(t.incoming(&format!(r#"{{"type":"event","kind":"presence","feed":"{feed}","seq":{seq}}}"#)), "{feed} {seq} is delivered");
        }
        assert!(!t.incoming(r#"{"type":"event","kind":"presence","feed":"r","seq":41}"#), "a repeat in its feed is not");
        assert!(t.incoming(r#"{"type":"event","kind":"presence","feed":"c1","seq":2}"#), "the same seq in another feed is");
        assert_eq!(t.reconnect_path("/ws/operator?token=T&protocol=2&cursor=r.40,c0.7"), "/ws/operator?token=T&protocol=2&cursor=c0.4,c1.2,r.42");
    }

    #[test]
    fn an_operator_s_accept_is_stamped_here_and_sent_again_with_its_stamp_after_a_re_pin() {
        let mut desk = Tracker::new(Surface::Operator, "/ws/operator?token=T");
        // The member's clock reads 5 s ahead of this machine's: answers are stamped on
        // the member's time, against which the offer's deadline was set.
        let member_now = switchboard_actors::actors::wall_ms().0 + 5_000;
        desk.incoming(&format!(r#"{{"type":"hello","seq":4,"now":{member_now}}}"#));
        let before = switchboard_actors::actors::now_ms().0;
        assert!(before >= member_now, "the gateway's clock reads the member's");
        let sent = desk.outgoing(r#"{"type":"accept","offer":9,"ref":"a"}"#).expect("relayed").expect("stamped");
        let stamped: Value = serde_json::from_str(&sent).expect("json");
        let at = stamped["received_at"].as_u64().expect("a stamp");
        assert!(at >= before && stamped["offer"] == 9 && stamped["ref"] == "a", "{stamped}");
        // Other frames go as they came.
        assert_eq!(desk.outgoing(r#"{"type":"decline","offer":8,"ref":"d"}"#).expect("relayed"), None);
        // The member under the socket dies before answering: the accept goes again, with
        // the moment it first arrived; the decline is answered `unavailable`.
        let replay = desk.replay();
        let resent: Vec<&String> = replay.iter().filter_map(|r| match r { Replay::Resend(text) => Some(text), _ => None }).collect();
        assert_eq!(resent, vec![&sent], "the accept is sent again as stamped");
        let answered: Vec<&Value> = replay.iter().filter_map(|r| match r { Replay::Answer(frame) => Some(frame), _ => None }).collect();
        assert!(answered.len() == 1 && answered[0]["code"] == "unavailable" && answered[0]["ref"] == "d", "{answered:?}");
        // An accept read while the relay was busy (re-pinning) counts from when it was
        // read, not from when the relay took it.
        let late = desk.outgoing_at(r#"{"type":"accept","offer":10,"ref":"b"}"#, before - 4_000).expect("relayed").expect("stamped");
        let late: Value = serde_json::from_str(&late).expect("json");
        assert_eq!(late["received_at"].as_u64(), Some(before - 4_000), "{late}");
        // A visitor's frames are never stamped (an `accept` is not one of theirs).
        let mut client = Tracker::new(Surface::Client, "/ws/client");
        let refused = client.outgoing(r#"{"type":"accept","offer":9}"#).expect_err("not a client frame");
        assert_eq!(refused["code"], "unknown_type");
    }

    #[test]
    fn a_client_socket_knows_its_conversation_and_moves_only_when_nothing_waits() {
        let key = crate::auth::TokenKey::new(&[7u8; 32]).expect("key");
        let token = key.issue(crate::auth::Subject::Client { conversation: switchboard_actors::model::ConversationId(4242) }, Duration::from_secs(60));
        assert_eq!(token_conversation(&token), Some(4242));
        let visitor = key.issue(crate::auth::Subject::Visitor { visitor: "v-1".into() }, Duration::from_secs(60));
        assert_eq!(token_conversation(&visitor), None, "only a client token names a conversation");
        assert_eq!(token_conversation("v1.!!!.x"), None);

        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(!t.quiet(), "not before its stream is open");
        assert!(t.outgoing(&format!(r#"{{"type":"resume","token":"{token}","last_seq":0}}"#)).is_ok());
        assert!(!t.quiet(), "a resume waits for its answer");
        t.incoming(r#"{"type":"resumed","protocol":1}"#);
        assert_eq!(t.conversation, Some(4242), "read from the resumed token");
        assert!(t.quiet());
        assert!(t.outgoing(r#"{"type":"ping"}"#).is_ok());
        assert!(!t.quiet(), "a pong would be lost by a move");
        t.incoming(r#"{"type":"pong"}"#);
        assert!(t.outgoing(r#"{"type":"send","key":"k","text":"hi"}"#).is_ok());
        assert!(!t.quiet());
        t.incoming(r#"{"type":"ack","key":"k","seq":1,"duplicate":false}"#);
        assert!(t.quiet());
        // A ping never answered (refused, or lost with a member) holds the socket back
        // only for a while, and not past a re-pin.
        assert!(t.outgoing(r#"{"type":"ping"}"#).is_ok());
        assert!(!t.quiet());
        t.ping_since = Instant::now().checked_sub(PING_PATIENCE + Duration::from_secs(1));
        assert!(t.quiet(), "a pong that did not come in time no longer holds it");
        assert!(t.outgoing(r#"{"type":"ping"}"#).is_ok());
        t.ping_since = Some(Instant::now());
        let actions = t.replay();
        assert!(t.quiet(), "a re-pin forgets the pings it did not send again");
        let pongs = actions.iter().filter(|a| matches!(a, Replay::Answer(f) if f["type"] == "pong")).count();
        assert_eq!(pongs, 2, "and answers them itself (both unanswered pings): the socket lives");

        let mut desk = Tracker::new(Surface::Operator, "/ws/operator?token=T");
        assert!(!desk.quiet(), "an operator socket before its hello");
        desk.incoming(r#"{"type":"hello","seq":4}"#);
        assert!(desk.quiet());

        let upload: Uri = format!("/attachments?name=scan.png&token={token}").parse().expect("uri");
        assert_eq!(attachment_conversation(&upload), Some(4242), "an upload goes where its conversation is");
        let download: Uri = format!("/attachments/abc?token={token}").parse().expect("uri");
        assert_eq!(attachment_conversation(&download), Some(4242));
        let elsewhere: Uri = format!("/api/conversations?token={token}").parse().expect("uri");
        assert_eq!(attachment_conversation(&elsewhere), None);

        let mut started = Tracker::new(Surface::Client, "/ws/client");
        started.outgoing(r#"{"type":"start"}"#).expect("sent");
        started.incoming(r#"{"type":"started","token":"t","conversation":77}"#);
        assert_eq!((started.conversation, started.quiet()), (Some(77), true));
    }

    #[tokio::test]
    async fn a_socket_prefers_its_conversation_shard_s_leader_then_the_routing_leader() {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("endpoint");
        let up = Upstreams::new(Peers::new(endpoint), &[(1, "a".into()), (2, "b".into()), (3, "c".into())]);
        {
            let mut map = up.lock();
            for m in map.members.values_mut() {
                (m.alive, m.ready) = (true, true);
            }
            map.leader = Some(1);
            map.conversations = vec![
                Shard { group: 2, leader: Some(2), holders: vec![1, 2, 3] },
                Shard { group: 3, leader: Some(3), holders: vec![1, 2, 3] },
                Shard { group: 4, leader: None, holders: vec![1, 2, 3] },
            ];
        }
        let at = |surface, conversation| up.preferred(surface, conversation).map(|(id, _)| id);
        assert_eq!(at(Surface::Client, Some(9)), Some(2), "9 % 3 = 0: the first shard");
        assert_eq!(at(Surface::Client, Some(10)), Some(3));
        assert_eq!(at(Surface::Client, Some(11)), None, "a shard without a known leader: stay");
        assert_eq!(at(Surface::Client, None), None, "before its conversation is known");
        assert_eq!(at(Surface::Operator, None), Some(1), "the routing leader");
        assert_eq!(at(Surface::Supervisor, None), None);
        up.lock().members.get_mut(&3).expect("member").ready = false;
        assert_eq!(at(Surface::Client, Some(10)), None, "a leader that does not serve is not moved to");
        assert_eq!(up.choose_for(Surface::Client, Some(9), &[2]).map(|(id, _)| id), Some(1), "a failed member is avoided even when it leads");
        assert_eq!(up.choose_for(Surface::Client, Some(9), &[2, 1]).map(|(id, _)| id), Some(3), "and every member that failed");
        up.lock().conversations.clear();
        assert_eq!(at(Surface::Client, Some(9)), Some(1), "one group: the leader");

        // A socket whose owner the map does not name moves only off a member that no
        // longer serves (it answers polls, but is cut off or catching up).
        let to = |surface, conversation, on| up.destination(surface, conversation, on).map(|(id, _)| id);
        assert_eq!(to(Surface::Supervisor, None, 2), None, "a supervisor on a member that serves stays");
        assert_eq!(to(Surface::Supervisor, None, 3), Some(1), "one on a member that does not serve goes to the leader");
        assert_eq!(to(Surface::Client, None, 3), Some(1), "as does a visitor's before its conversation is known");
        assert_eq!(to(Surface::Operator, None, 2), Some(1), "an operator's goes to the routing leader wherever it is");
        up.lock().members.get_mut(&1).expect("member").ready = false;
        assert_eq!(to(Surface::Supervisor, None, 3), Some(2), "the leader does not serve either: another member that does");
        assert_eq!(to(Surface::Supervisor, None, 1), Some(2));
        up.lock().members.get_mut(&2).expect("member").alive = false;
        assert_eq!(to(Surface::Supervisor, None, 3), None, "no member serves: it stays");
    }

    /// An error without a name settles only a request it can answer: not one whose
    /// `ref` it would echo, nor for an unparsable frame (never kept) or a `typing`; one
    /// whose `ref`, or `send` key, is too long to echo is settled by its unnamed error.
    #[test]
    fn an_unnamed_error_settles_only_the_request_it_answers() {
        let mut op = Tracker::new(Surface::Operator, "/ws/operator?token=T");
        op.incoming(r#"{"type":"hello","seq":3}"#);
        assert!(op.outgoing(r#"{"type":"accept","offer":5}"#).is_ok());
        op.incoming(r#"{"type":"error","code":"bad_json","message":"not valid JSON"}"#);
        op.incoming(r#"{"type":"error","code":"bad_frame","for":"typing","message":"missing field"}"#);
        assert_eq!(op.pending.len(), 1, "the accept still waits for its answer");
        op.incoming(r#"{"type":"error","code":"offer_gone","for":"accept","message":"gone"}"#);
        assert!(op.pending.is_empty());

        let long = "r".repeat(300);
        assert!(op.outgoing(&json!({"type": "close", "conversation": 1, "ref": long}).to_string()).is_ok());
        assert!(op.outgoing(r#"{"type":"close","conversation":2,"ref":"c2"}"#).is_ok());
        op.incoming(r#"{"type":"error","code":"not_assigned","for":"close","message":"no"}"#);
        assert_eq!(op.pending.iter().map(|p| p.reference.clone()).collect::<Vec<_>>(), [Some(json!("c2"))], "the long-ref close was the one answered");
        // An operator's `send` is named by its `ref`, not its key, even one too long.
        assert!(op.outgoing(&json!({"type": "send", "conversation": 1, "key": "k1", "text": "hi", "ref": "s".repeat(300)}).to_string()).is_ok());
        op.incoming(r#"{"type":"error","code":"not_assigned","for":"send","message":"no"}"#);
        assert_eq!(op.pending.len(), 1, "the long-ref send was settled by its unnamed error");

        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"start"}"#).is_ok());
        t.incoming(r#"{"type":"started","token":"tok","conversation":1}"#);
        let quoted = "\"".repeat(128);
        assert!(t.outgoing(&json!({"type": "send", "key": quoted, "text": "hi"}).to_string()).is_ok());
        t.incoming(r#"{"type":"error","code":"rate_limited","for":"send","message":"too many"}"#);
        assert!(t.pending.is_empty(), "a send whose key is too long to echo is settled by its error");
    }

    /// What the gateway reads of a socket's query, and replaces on a re-pin, is what the
    /// member reads: names and values decoded as a form.
    #[test]
    fn a_socket_query_is_read_as_the_member_decodes_it() {
        assert_eq!(canonical_query("token=a.b-c_d&last_seq=%34%30"), "token=a.b-c_d&last_seq=40");
        assert_eq!(canonical_query("last%5Fseq=40&protocol=%32"), "last_seq=40&protocol=2");
        let path = format!("/ws/operator?{}", canonical_query("token=T&last%5Fseq=%34%30"));
        let mut t = Tracker::new(Surface::Operator, &path);
        t.incoming(r#"{"type":"hello","seq":44}"#);
        assert_eq!(t.last_seq, Some(40), "events 41-44 follow the hello and are not taken for duplicates");
        assert_eq!(t.reconnect_path(&path).matches("last_seq=").count(), 1, "{}", t.reconnect_path(&path));
    }

    #[test]
    fn a_close_of_a_closed_conversation_waits_for_nothing_and_an_operator_close_is_not_sent_twice() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"start"}"#).is_ok());
        t.incoming(r#"{"type":"started","token":"tok","conversation":1}"#);
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        t.incoming(r#"{"type":"event","kind":"closed","seq":4}"#);
        assert!(t.pending.is_empty(), "settled by its closed event");
        // Closing again is a no-op the member answers with nothing: nothing waits for it.
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert!(t.pending.is_empty() && t.quiet(), "a socket that closed twice can still move");

        // Two closes sent before the conversation's closed event: it answers both.
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"start"}"#).is_ok());
        t.incoming(r#"{"type":"started","token":"tok","conversation":1}"#);
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        t.incoming(r#"{"type":"event","kind":"closed","seq":4}"#);
        assert!(t.pending.is_empty() && t.quiet(), "a close clicked twice waits for nothing once the conversation closed");

        let mut op = Tracker::new(Surface::Operator, "/ws/operator?token=T");
        op.incoming(r#"{"type":"hello","seq":3}"#);
        assert!(op.outgoing(r#"{"type":"close","conversation":1,"ref":"c1"}"#).is_ok());
        match op.replay().as_slice() {
            [Replay::Answer(frame)] => assert_eq!((frame["code"].as_str(), frame["ref"].as_str()), (Some("unavailable"), Some("c1"))),
            other => panic!("expected one unavailable answer, got {} actions", other.len()),
        }
    }

    /// Two members claim to lead (one cut off that has not heard of the election): the
    /// one the other members name wins, whichever answered last or has the higher id.
    #[test]
    fn of_two_leaders_claimed_the_one_the_members_name_is_taken() {
        // Node 3 was cut off and still claims; 1 and 2 know that 1 leads now.
        let answers = [(1, Some(1), true), (2, Some(1), true), (3, Some(3), true)];
        assert_eq!(choose_leader(answers.into_iter(), Some(3)), Some(1));
        // A tie (only the two claimants answered): the leader the map had stays.
        let answers = [(1, Some(1), true), (3, Some(3), true)];
        assert_eq!(choose_leader(answers.into_iter(), Some(1)), Some(1));
        assert_eq!(choose_leader(answers.into_iter(), Some(3)), Some(3));
        // A claimant not ready is not taken; no claim, no leader.
        assert_eq!(choose_leader([(1, Some(1), false), (2, Some(1), true)].into_iter(), None), None);
    }

    /// A frame that re-serialising would enlarge past what a member takes from a gateway
    /// is refused here, not relayed to be closed there with 1009.
    #[test]
    fn a_frame_that_would_grow_past_the_member_s_limit_when_stamped_is_refused() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        let numbers = vec!["1e15"; 1000].join(",");
        let refused = t.outgoing(&format!(r#"{{"type":"start","x":[{numbers}]}}"#)).expect_err("refused");
        assert_eq!(refused["code"], "bad_frame", "{refused}");
        assert!(t.pending.is_empty(), "nothing waits for it");
        assert!(t.outgoing(r#"{"type":"start","name":"Dana"}"#).expect("sent").is_some(), "an ordinary start is keyed");
    }

    /// A `close` that the member handled before a `resume` to another conversation,
    /// whose `closed` event never reached the socket (the member followed the new
    /// conversation first): the `resumed` settles it, so a re-pin does not send it
    /// again into the conversation the socket follows now.
    #[test]
    fn a_close_before_a_resume_is_settled_by_the_resumed_and_never_closes_the_new_conversation() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"start"}"#).is_ok());
        t.incoming(r#"{"type":"started","token":"token-a","conversation":1}"#);
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"rate","score":5}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"resume","token":"token-b","last_seq":0}"#).is_ok());
        t.incoming(r#"{"type":"resumed","conversation":2}"#);
        assert!(t.pending.is_empty(), "the close and the rate were handled before the resume");
        let resent: Vec<String> = t.replay().into_iter().filter_map(|a| match a { Replay::Resend(text) => Some(text), _ => None }).collect();
        assert!(!resent.iter().any(|text| text.contains("close") || text.contains("rate")), "nothing is sent again into conversation 2: {resent:?}");
    }

    /// An error that names the frame it answers (`for`) settles that frame, not an
    /// older unanswered `close`: a refused resume leaves the stream where it was, and
    /// the next one's `resumed` takes its own token and position.
    #[test]
    fn an_error_naming_its_frame_settles_that_frame_and_keeps_resumes_in_step() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"start"}"#).is_ok());
        t.incoming(r#"{"type":"started","token":"token-a","conversation":1}"#);
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"resume","token":"token-b","last_seq":9}"#).is_ok());
        t.incoming(r#"{"type":"error","code":"not_found","for":"resume","message":"conversation not found"}"#);
        assert_eq!(t.pending.iter().map(|p| p.kind.as_str()).collect::<Vec<_>>(), ["close"], "the resume was refused; the close still waits");
        assert!(t.outgoing(r#"{"type":"resume","token":"token-c","last_seq":2}"#).is_ok());
        t.incoming(r#"{"type":"resumed","conversation":3}"#);
        assert_eq!((t.token.as_deref(), t.last_seq), (Some("token-c"), Some(2)), "the resume answered is the one that moved the socket");
        assert!(t.pending.is_empty());
    }

    /// A `send` and a `close` made before a resume that moves the socket to another
    /// conversation, all unanswered when the member goes: the new member resumes the
    /// conversation asked last, so the two are not sent again there (they were for the
    /// first one); they are answered `unavailable`, which the client may resend after
    /// resuming the first conversation. A send after the resume is sent again.
    #[test]
    fn requests_made_before_a_resume_to_another_conversation_are_not_sent_again_into_it() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        t.set_token("token-a".into());
        t.established = true;
        assert!(t.outgoing(r#"{"type":"send","key":"k1","text":"for A"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"resume","token":"token-b","last_seq":3}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"send","key":"k2","text":"for B"}"#).is_ok());
        let actions = t.replay();
        let resent: Vec<&str> = actions.iter().filter_map(|a| match a { Replay::Resend(text) => Some(text.as_str()), _ => None }).collect();
        assert_eq!(resent, [r#"{"type":"send","key":"k2","text":"for B"}"#], "only the send made after the resume goes again");
        let unavailable: Vec<Value> = actions.iter().filter_map(|a| match a { Replay::Answer(f) if f["code"] == "unavailable" => Some(f["ref"].clone()), _ => None }).collect();
        assert_eq!(unavailable, [json!("k1"), Value::Null], "the send and the close before it are answered unavailable");
        assert_eq!(t.pending.len(), 1, "only k2 waits for its answer");

        // Without a resume in between, a send and a close are sent again as before.
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        t.set_token("token-a".into());
        t.established = true;
        assert!(t.outgoing(r#"{"type":"send","key":"k1","text":"for A"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert_eq!(t.replay().iter().filter(|a| matches!(a, Replay::Resend(_))).count(), 2);
    }

    #[test]
    fn a_start_goes_with_a_key_and_is_sent_again_with_it_after_a_re_pin() {
        // No key of the client's: the gateway makes one, and the member gets the frame with it.
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        let sent = t.outgoing(r#"{"type":"start","name":"Dana"}"#).expect("sent").expect("the frame is stamped");
        let frame: Value = serde_json::from_str(&sent).expect("json");
        let key = frame["key"].as_str().expect("a key").to_owned();
        assert!(crate::auth::start_key_ok(&key), "{key}");
        assert_eq!(frame["name"], "Dana");
        // Its member went away before `started`: the same frame, key and all, goes again.
        match t.replay().as_slice() {
            [Replay::Resend(again)] => assert_eq!(again, &sent),
            other => panic!("expected the start sent again, got {} actions", other.len()),
        }
        t.incoming(r#"{"type":"started","token":"tok","conversation":1}"#);
        assert!(t.pending.is_empty() && t.quiet());

        // The client's own key is kept as it is, and a second start gets another key.
        let mut own = Tracker::new(Surface::Client, "/ws/client");
        assert_eq!(own.outgoing(r#"{"type":"start","key":"widget-key-0123456789"}"#).expect("sent"), None, "relayed unchanged");
        match own.replay().as_slice() {
            [Replay::Resend(again)] => assert_eq!(again, r#"{"type":"start","key":"widget-key-0123456789"}"#),
            other => panic!("expected the start sent again, got {} actions", other.len()),
        }
        let mut other = Tracker::new(Surface::Client, "/ws/client");
        let second = other.outgoing(r#"{"type":"start","name":"Dana"}"#).expect("sent").expect("stamped");
        assert_ne!(second, sent, "each start its own key");
        // A refusal settles it: nothing is sent again.
        other.incoming(r#"{"type":"error","code":"not_allowed","message":"no"}"#);
        assert!(other.replay().is_empty());
        // `"key": null` is no key (the member reads it so): it gets one here.
        let mut null = Tracker::new(Surface::Client, "/ws/client");
        let stamped = null.outgoing(r#"{"type":"start","key":null}"#).expect("sent").expect("stamped");
        let frame: Value = serde_json::from_str(&stamped).expect("json");
        assert!(frame["key"].as_str().is_some_and(crate::auth::start_key_ok), "{stamped}");
    }

    #[test]
    fn two_resumes_in_a_row_each_take_their_own_answer() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"resume","token":"first","last_seq":2}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"resume","token":"second","last_seq":7}"#).is_ok());
        t.incoming(r#"{"type":"resumed","conversation":1,"last_seq":5}"#);
        assert_eq!((t.token.as_deref(), t.last_seq), (Some("first"), Some(2)));
        assert!(t.incoming(r#"{"type":"event","kind":"message","seq":3}"#), "the first conversation's page passes");
        t.incoming(r#"{"type":"resumed","conversation":2,"last_seq":9}"#);
        assert_eq!((t.token.as_deref(), t.last_seq), (Some("second"), Some(7)));
        // Not swallowed as a duplicate of the first conversation's seq 3.
        assert!(t.incoming(r#"{"type":"event","kind":"message","seq":8}"#));
        assert!(t.resume_asked.is_empty() && t.pending.is_empty());
    }

    #[test]
    fn a_malformed_resume_keeps_the_resumes_in_step() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        // Refused here as the member would (no token): neither relayed nor kept.
        let refused = t.outgoing(r#"{"type":"resume","last_seq":1}"#).expect_err("malformed");
        assert_eq!(refused["code"], "bad_frame");
        assert!(t.outgoing(r#"{"type":"resume","token":"good","last_seq":6}"#).is_ok());
        t.incoming(r#"{"type":"resumed","conversation":2,"last_seq":9}"#);
        assert_eq!((t.token.as_deref(), t.last_seq), (Some("good"), Some(6)), "the valid resume took its own answer");
        assert!(t.incoming(r#"{"type":"event","kind":"message","seq":7}"#));
        assert!(t.resume_asked.is_empty() && t.pending.is_empty());
    }

    #[test]
    fn a_client_resume_answered_unavailable_is_not_kept_as_asked() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"resume","token":"tok","last_seq":4}"#).is_ok());
        t.incoming(r#"{"type":"error","code":"unavailable","message":"resume again"}"#);
        assert!(t.resume_asked.is_empty(), "a later re-pin must not resume a conversation nobody follows");
    }

    #[test]
    fn a_refused_client_resume_leaves_the_socket_where_it_was() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        assert!(t.outgoing(r#"{"type":"start"}"#).is_ok());
        t.incoming(r#"{"type":"started","token":"old","conversation":1}"#);
        t.incoming(r#"{"type":"event","kind":"message","seq":3}"#);
        assert!(t.outgoing(r#"{"type":"resume","token":"new","last_seq":99}"#).is_ok());
        t.incoming(r#"{"type":"error","code":"invalid","message":"ahead"}"#);
        assert_eq!((t.token.as_deref(), t.last_seq), (Some("old"), Some(3)));
        assert!(t.pending.is_empty(), "the resume was answered");
    }

    #[test]
    fn unanswered_requests_are_bounded_and_settled_by_their_answers() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        // A close refused without a `ref` is settled, not kept for a resend.
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        t.incoming(r#"{"type":"error","code":"no_conversation","message":"start first"}"#);
        assert!(t.pending.is_empty());
        // Keyed sends are kept (to resend) until their ack names the key.
        for n in 0..MAX_PENDING {
            assert!(t.outgoing(&format!(r#"{{"type":"send","key":"k{n}","text":"hi"}}"#)).is_ok());
        }
        let refused = t.outgoing(r#"{"type":"send","key":"one-too-many","text":"hi"}"#).expect_err("over the cap");
        assert_eq!((refused["code"].as_str(), refused["ref"].as_str()), (Some("rate_limited"), Some("one-too-many")));
        t.incoming(r#"{"type":"ack","key":"k7","seq":9,"duplicate":false}"#);
        assert_eq!(t.pending.len(), MAX_PENDING - 1);
        let replay = t.replay();
        assert_eq!(replay.iter().filter(|r| matches!(r, Replay::Resend(_))).count(), MAX_PENDING - 1);
        // Big frames count by bytes too.
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        let text = "x".repeat(16 * 1024);
        let mut taken = 0;
        while t.outgoing(&format!(r#"{{"type":"send","key":"b{taken}","text":"{text}"}}"#)).is_ok() {
            taken += 1;
        }
        assert!(taken < 20 && t.pending_bytes <= MAX_PENDING_BYTES, "{taken} frames, {} bytes", t.pending_bytes);
    }

    #[test]
    fn a_client_s_unreadable_frames_are_refused_here_and_kept_requests_count_every_byte() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        // What the member would refuse to read gets the member's own answer here, and
        // is neither relayed nor kept.
        let junk = "x".repeat(16 * 1024);
        for (frame, code) in [
            (format!(r#"{{"type":"{junk}","ref":1}}"#), "unknown_type"),
            (r#"{"type":"send","text":5,"ref":2}"#.to_owned(), "bad_frame"),
            (r#"{"type":"read","upto":"x","ref":3}"#.to_owned(), "bad_frame"),
            ("not json".to_owned(), "bad_json"),
        ] {
            let refused = t.outgoing(&frame).expect_err("refused at the gateway");
            assert_eq!(refused["code"], code, "{refused}");
        }
        assert!(t.pending.is_empty() && t.pending_bytes == 0);
        // Resumes with long tokens count their tokens: refused long before 256 of them.
        let token = "t".repeat(16 * 1024);
        let mut taken = 0;
        while t.outgoing(&format!(r#"{{"type":"resume","token":"{token}","last_seq":0}}"#)).is_ok() {
            taken += 1;
        }
        assert!(taken < 20 && t.pending_bytes <= MAX_PENDING_BYTES, "{taken} resumes, {} bytes", t.pending_bytes);
        // Each is settled by its answer, in turn, and gives its bytes back.
        for _ in 0..taken {
            t.incoming(r#"{"type":"error","code":"invalid","message":"that token names no conversation here"}"#);
        }
        assert!(t.pending.is_empty() && t.pending_bytes == 0, "{} left, {} bytes", t.pending.len(), t.pending_bytes);
    }

    #[test]
    fn member_frames_are_read_by_their_head_and_a_null_ref_is_no_name() {
        let mut desk = Tracker::new(Surface::Operator, "/ws/operator?token=T");
        assert!(desk.outgoing(r#"{"type":"decline","offer":8,"ref":null}"#).is_ok());
        assert_eq!(desk.pending.len(), 1);
        // A large frame's body is skipped; its head still counts.
        let big = format!(r#"{{"type":"history","conversation":3,"entries":[{}],"ref":null}}"#, vec![r#"{"text":"hello"}"#; 10_000].join(","));
        assert!(desk.incoming(&big));
        assert!(desk.pending.is_empty(), "answered by the frame whose ref is null");
        assert!(desk.incoming(r#"{"type":"event","seq":5,"kind":"message"}"#));
        assert!(!desk.incoming(r#"{"type":"event","seq":5,"kind":"message"}"#), "a repeated seq is dropped");
    }

    #[test]
    fn a_close_that_changes_nothing_is_settled_by_the_pong_of_a_later_ping() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        t.incoming(r#"{"type":"resumed","conversation":4,"last_seq":9}"#);
        // The conversation was closed before the resume: closing it again gets no answer.
        assert!(t.outgoing(r#"{"type":"ping"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"ping"}"#).is_ok());
        // The first pong answers a ping sent before the close: the close still waits.
        t.incoming(r#"{"type":"pong"}"#);
        assert_eq!(t.pending.len(), 1);
        // The second answers one sent after it: the close was handled.
        t.incoming(r#"{"type":"pong"}"#);
        assert!(t.pending.is_empty() && t.pending_bytes == 0, "settled by the later pong");
        assert!(t.quiet(), "and the socket may move");
        // A close answered by its `closed` event as before; a later pong settles nothing more.
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        t.incoming(r#"{"type":"event","kind":"closed","seq":10}"#);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn an_error_answering_a_read_does_not_settle_a_close_sent_after_it() {
        let mut t = Tracker::new(Surface::Client, "/ws/client");
        t.incoming(r#"{"type":"resumed","conversation":4,"last_seq":9}"#);
        assert!(t.outgoing(r#"{"type":"read","upto":99}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"close"}"#).is_ok());
        assert_eq!(t.pending.len(), 1, "the close waits; the read is not kept");
        // The read's error comes first (the member answers in order): the close still waits.
        t.incoming(r#"{"code":"invalid","for":"read","message":"no","type":"error"}"#);
        assert_eq!(t.pending.len(), 1, "an error for the read is not the close's answer");
        // An error without `for` is the oldest unnamed request's: the close's.
        t.incoming(r#"{"code":"not_found","message":"no","type":"error"}"#);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn a_supervisor_s_watch_is_sent_again_after_a_re_pin() {
        let mut t = Tracker::new(Surface::Supervisor, "/ws/supervisor");
        assert!(t.replay().is_empty(), "nothing to send again before a watch");
        t.outgoing(r#"{"type":"watch","conversation":7}"#).expect("relayed");
        t.incoming(r#"{"type":"watched","conversation":7,"last_seq":3}"#);
        t.outgoing(r#"{"type":"watch","conversation":9}"#).expect("relayed");
        t.incoming(r#"{"type":"watched","conversation":9,"last_seq":1}"#);
        let resent = |t: &mut Tracker| -> Vec<String> { t.replay().into_iter().filter_map(|r| match r { Replay::Resend(text) => Some(text), _ => None }).collect() };
        assert_eq!(resent(&mut t), [r#"{"type":"watch","conversation":9}"#], "the last watch taken");
        // A watch the member refuses (no such conversation) leaves the one before in force.
        t.outgoing(r#"{"type":"watch","conversation":404}"#).expect("relayed");
        t.incoming(r#"{"type":"error","code":"not_found","message":"conversation 404"}"#);
        t.incoming(r#"{"type":"floor","queues":[]}"#);
        t.incoming(r#"{"type":"watched","conversation":9,"last_seq":2}"#);
        assert_eq!(resent(&mut t), [r#"{"type":"watch","conversation":9}"#], "the watch in force, not the refused one");
        // One with no answer yet (the member died first) is asked again after it.
        t.outgoing(r#"{"type":"watch","conversation":12}"#).expect("relayed");
        assert_eq!(resent(&mut t), [r#"{"type":"watch","conversation":9}"#, r#"{"type":"watch","conversation":12}"#]);
        // Watching none takes effect at once.
        t.outgoing(r#"{"type":"watch"}"#).expect("relayed");
        assert_eq!(resent(&mut t), [r#"{"type":"watch"}"#]);
    }

    #[test]
    fn an_operator_send_without_ref_is_settled_by_its_ack() {
        let mut t = Tracker::new(Surface::Operator, "/ws/operator?token=T");
        assert!(t.outgoing(r#"{"type":"send","conversation":1,"key":"a-1","text":"hi"}"#).is_ok());
        assert!(t.outgoing(r#"{"type":"accept","offer":5,"ref":7}"#).is_ok());
        t.incoming(r#"{"type":"ok","ref":7}"#);
        assert_eq!(t.pending.len(), 1, "a numeric ref settles only its own request");
        t.incoming(r#"{"type":"ack","conversation":1,"key":"a-1","ref":"a-1","seq":5}"#);
        assert!(t.pending.is_empty());
    }
}
