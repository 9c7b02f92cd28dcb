//! A running node: its record store and Raft log, its Raft group, the shard's actors and
//! the gateway listeners.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::ActorRef;
use switchboard_actors::actors::{now_ms, ShardSupervisor, SupervisorArgs, SupervisorMsg};
use switchboard_actors::core::Reply;
use switchboard_actors::model::{Attachment, AttachmentId, Command, Envelope, OperatorId, Presence};
use switchboard_actors::shard::{Proposer, Shard, StreamKey, Wakeups};
use switchboard_gateway::listener::ConnectionLimits;
use switchboard_gateway::{Backend, BoxFuture, Budgets, Gateway, GatewayConfig, Limits, TokenKey};
use switchboard_raft::network::{serve, ForwardError, Forwarder, NetworkFactory, Peers, Router};
use switchboard_raft::store::open_group;
use switchboard_raft::{member_config, tls, Changes, Machine, Node, Raft, Records, Request};
use tokio::net::TcpListener;
use tracing::info;

/// The shard every entity lives in until the cluster issue adds more.
pub const SHARD_GROUP: u64 = 1;

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(v, _)| v).map_err(|e| e.to_string())
}

type ApplyResult = Result<Reply, switchboard_actors::Error>;

/// Plugs the domain shard into the Raft state machine.
pub(crate) struct ShardMachine {
    pub(crate) shard: Arc<Shard>,
}

/// First byte of a log entry that holds several envelopes (group commit), followed by
/// their bincode `Vec<Envelope>`. An entry of one envelope is the bincode `Envelope`
/// itself, which starts with the varint of its version: a byte below 251 (or 251 for a
/// two-byte version), never this one. The reply to a batch is a `Vec` of results.
const BATCH_TAG: u8 = 0xFE;

/// Commands committed in one entry at most.
const MAX_BATCH: usize = 256;

/// Bytes of encoded commands in one entry at most (one command alone may be larger):
/// entries stay small enough to replicate many to an RPC (`max_payload_entries`).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Commands waiting for the batcher at most; past it, proposers wait (backpressure).
const PROPOSAL_QUEUE: usize = 8192;
/// Group-commit entries handed to Raft and not yet applied, at most: the next entry
/// fills while this one is written, synced and applied. (On a member that forwards to
/// the leader, not yet answered by the leader: the slot is given back once the entry's
/// place in the log is known, and the proposal's caller then waits for this member's
/// apply on its own, at most `CATCH_UP_FOR`.) One: with more, commands that
/// queue during a commit are spread over several smaller entries, each paying its own
/// append, sync, replication and apply; measured in docs/benchmarks.md ("One entry in
/// flight"), one gives the same saturation on a node, a lower latency under load, and
/// more throughput on three nodes than four did.
const ENTRIES_IN_FLIGHT: usize = 1;

/// What a committed log entry holds.
#[derive(Debug, PartialEq)]
enum EntryBody {
    One(Envelope),
    /// Several commands committed together (group commit, ADR 0003).
    Many(Vec<Envelope>),
}

/// Decodes a committed entry, or says why this build cannot. Such an entry was written
/// by a newer build (or the data folder is damaged); applying around it would make this
/// replica's state differ from the others', so the caller stops instead.
fn decode_entry(index: u64, bytes: &[u8]) -> Result<EntryBody, String> {
    let body = match bytes.strip_prefix(&[BATCH_TAG]) {
        Some(rest) => decode::<Vec<Envelope>>(rest).map(EntryBody::Many),
        None => decode::<Envelope>(bytes).map(EntryBody::One),
    };
    let body = body.map_err(|e| format!("log entry {index} cannot be decoded by this build ({e})"))?;
    let envelopes = match &body {
        EntryBody::One(envelope) => std::slice::from_ref(envelope),
        EntryBody::Many(envelopes) => envelopes.as_slice(),
    };
    if let Some(newer) = envelopes.iter().find(|e| e.v != Envelope::VERSION) {
        return Err(format!("log entry {index} has format version {}, this build reads version {}", newer.v, Envelope::VERSION));
    }
    // Rules this build does not know: refusing the adoption while the other replicas
    // take it would leave this one deciding differently from them from here on.
    let newest = switchboard_actors::core::RULES_VERSION;
    if let Some(version) = envelopes.iter().find_map(|e| match e.command {
        Command::AdoptRules { version } if version > newest => Some(version),
        _ => None,
    }) {
        return Err(format!("log entry {index} adopts routing rules {version}, this build decides with rules up to {newest}"));
    }
    Ok(body)
}

/// On the leader, for an entry a follower forwarded: it must be one this build reads
/// (else every replica would stop on it, `stop_on_unreadable_entry`), and it takes the
/// leader's clock, so the group's time comes from one clock per leader and a member with
/// a clock running ahead cannot move deadlines forward.
pub(crate) fn restamp_forwarded(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let at = now_ms();
    match decode_entry(0, &bytes)? {
        EntryBody::One(mut envelope) => {
            envelope.at = at;
            encode(&envelope)
        }
        EntryBody::Many(mut envelopes) => {
            for envelope in &mut envelopes {
                envelope.at = at;
            }
            Ok([&[BATCH_TAG][..], &encode(&envelopes)?].concat())
        }
    }
}

/// Stops the node on a committed entry it cannot read: skipping it would serve a state
/// the other replicas do not have. The node's log is untouched; a build that reads the
/// entry starts from it.
fn stop_on_unreadable_entry(why: &str) -> ! {
    tracing::error!("{why}: it was written by a newer switchboard or the data folder is damaged; run a build that reads it. Stopping rather than skipping a committed entry.");
    eprintln!("switchboard: {why}: run the build that wrote this data folder, or a newer one");
    std::process::exit(78)
}

impl Machine for ShardMachine {
    fn apply(&self, index: u64, request: &[u8], changes: &mut Changes) -> Vec<u8> {
        let mut writes = Vec::new();
        let reply = match decode_entry(index, request) {
            Ok(EntryBody::One(envelope)) => encode(&self.shard.apply(&envelope, &mut writes)).unwrap_or_default(),
            // Applied one after another, exactly as if each were its own entry.
            Ok(EntryBody::Many(envelopes)) => {
                let results: Vec<ApplyResult> = envelopes.iter().map(|e| self.shard.apply(e, &mut writes)).collect();
                encode(&results).unwrap_or_default()
            }
            Err(why) => stop_on_unreadable_entry(&why),
        };
        self.shard.end_entry();
        put_all(changes, writes);
        reply
    }

    fn leader_began(&self, _index: u64, changes: &mut Changes) {
        let mut writes = Vec::new();
        self.shard.leader_began(&mut writes);
        put_all(changes, writes);
    }

    fn published(&self, index: u64) {
        self.shard.published_at(index);
    }

    fn replacing(&self) -> Result<(), String> {
        self.shard.replacing_records().map_err(|e| e.to_string())
    }

    fn load(&self, records: &Records) -> Result<(), String> {
        self.shard.load(Arc::new(ShardRecords(records.clone()))).map_err(|e| e.to_string())?;
        // A snapshot (or a data folder) decided under rules this build does not know: as
        // for an entry adopting them (`decode_entry`), stop rather than decide otherwise.
        let (rules, newest) = (self.shard.read().rules, switchboard_actors::core::RULES_VERSION);
        if rules > newest {
            stop_on_unreadable_entry(&format!("the group's records were decided with routing rules {rules}, this build decides with rules up to {newest}"));
        }
        Ok(())
    }

    fn import(&self, legacy: &[u8], changes: &mut Changes) -> Result<(), String> {
        put_all(changes, self.shard.import(legacy).map_err(|e| e.to_string())?);
        Ok(())
    }
}

fn put_all(changes: &mut Changes, writes: switchboard_actors::records::Writes) {
    for (key, value) in writes {
        match value {
            Some(value) => changes.put(key, value),
            None => changes.remove(key),
        }
    }
}

/// The shard's records, read from its Raft group's state tree.
struct ShardRecords(Records);

impl switchboard_actors::records::Store for ShardRecords {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        self.0.get(key).map_err(|e| e.to_string())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        self.0.scan(prefix, after, limit).map_err(|e| e.to_string())
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>, String> {
        self.0.last(prefix).map_err(|e| e.to_string())
    }

    fn newest(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        self.0.newest(prefix, limit).map_err(|e| e.to_string())
    }
}

/// How long a member that starts again waits to hear a leader before it may stand
/// (`hold_elections_after_restart`).
const ELECTION_HOLD: Duration = Duration::from_secs(3);

/// A member that starts again keeps the vote it stored but has heard no leader since:
/// openraft lets it stand once its lease and election timeout have passed since it
/// loaded that vote (400-700 ms here), and the leader reaches it only after closing its
/// connection to the dead process and dialling again, which took over a second in
/// drills. So it stands with a log that is most likely behind the leader's. It loses,
/// and the candidacy costs twice: its term makes the live leader's
/// appends bounce off it, and openraft remembers the larger log it saw and adds twice the
/// election timeout to this member's next election, the one after a real failure
/// (measured: leader kills that took 1.0-1.3 s instead of 0.5-0.7 s). So elections wait
/// until a leader's append arrives, or `ELECTION_HOLD` has passed (the whole cluster
/// started again, nobody leads), a quarter second more for each step of the member's
/// election window, so that members started together do not all stand at one tick.
pub(crate) async fn hold_elections_after_restart(raft: &Raft, router: &Router, group: u64) -> anyhow::Result<()> {
    // From the core's own state: the metrics may not be published yet this early.
    // (A member not initialized yet has no voters.)
    let voters = raft.with_raft_state(|s| s.membership_state.effective().voter_ids().count()).await?;
    if voters < 2 {
        return Ok(());
    }
    router.hold_elections(group, true);
    let stagger = Duration::from_millis(250 * switchboard_raft::election_window(raft.metrics().borrow().id, group));
    let router = router.clone();
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + ELECTION_HOLD + stagger;
        while tokio::time::Instant::now() < until && !router.heard_within(group, ELECTION_HOLD) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        router.hold_elections(group, false);
    });
    Ok(())
}

/// A command waiting to be committed, and who waits for its result.
type Proposal = (Command, tokio::sync::oneshot::Sender<ApplyResult>);

/// Commits commands through the shard's Raft group, many to an entry: commands that
/// arrive while an entry commits go together into the next one (group commit), which
/// fills while the one before is synced and applied (`ENTRIES_IN_FLIGHT`). One command
/// alone is written at once, at no extra latency.
///
/// On a node that does not lead the group, an entry is forwarded to the leader over the
/// nodes' QUIC connection and answered when it is applied here too, so what the caller
/// reads next on this node already holds it.
#[derive(Clone)]
pub(crate) struct RaftProposer {
    queue: tokio::sync::mpsc::Sender<Proposal>,
    counts: Arc<ProposalCounts>,
    holders: Arc<std::sync::OnceLock<Holders>>,
    written: crate::remote::Floor,
}

/// Where a group this node does not hold is held (ADR 0012): its holders' ids and QUIC
/// addresses, or `None` while this node holds it (its own Raft knows the leader).
pub(crate) type Holders = Arc<dyn Fn() -> Option<Vec<(u64, String)>> + Send + Sync>;

/// How a proposer reaches the group: its own Raft, and the leader when that is another node.
#[derive(Clone)]
struct Route {
    group: u64,
    raft: Raft,
    node_id: u64,
    forwarder: Forwarder,
    counts: Arc<ProposalCounts>,
    holders: Arc<std::sync::OnceLock<Holders>>,
    /// The leader a holder last named, for a group this node does not hold.
    named: Arc<std::sync::Mutex<Option<(u64, switchboard_raft::Node)>>>,
    /// The highest log index a write forwarded for a group this node does not hold got:
    /// this node's later reads of the group wait for a holder to have applied it.
    written: crate::remote::Floor,
}

/// How long a forwarded entry waits for the leader's answer before its outcome is
/// reported unknown (the leader failed or is cut off).
const FORWARD_TTL: Duration = Duration::from_secs(3);
/// How long a proposer keeps looking for a leader that accepts an entry (during an
/// election, or while the leader it knew is gone) before the command fails.
const FIND_LEADER_FOR: Duration = Duration::from_secs(10);
/// How long an entry this node leads waits to be committed before its callers are told
/// the outcome is unknown.
const COMMIT_PATIENCE: Duration = Duration::from_secs(10);
/// How often a write forwarded from a node that does not hold the group asks the other
/// holders whether another leader was elected meanwhile (see `Route::elected_instead_of`).
const DEPOSED_POLL: Duration = Duration::from_millis(200);
/// How long a forwarded entry's answer waits for this node to apply the entry too.
const CATCH_UP_FOR: Duration = Duration::from_secs(5);

impl Route {
    fn leads(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// For a group this node does not hold, while a write forwarded to `leader` waits:
    /// asks the holders every [`DEPOSED_POLL`] who leads, and returns another holder
    /// that says it leads at a term above the last `leader` itself said it led at
    /// (`leader` was then deposed, and the write's outcome is unknown). A holder's word
    /// about another is not taken (it may be stale), nor a cut-off leader's of an older
    /// term. Pending forever while there is none.
    async fn elected_instead_of(&self, leader: u64, holders: &[(u64, String)]) -> Option<(u64, switchboard_raft::Node)> {
        if holders.iter().all(|(id, _)| *id == leader) {
            return std::future::pending().await;
        }
        let mut leader_term = 0;
        loop {
            tokio::time::sleep(DEPOSED_POLL).await;
            let seen = futures::future::join_all(holders.iter().map(|(id, addr)| async move { (*id, self.forwarder.leader_seen_by(addr, self.group, DEPOSED_POLL).await) })).await;
            let claims: Vec<(u64, u64)> = seen.into_iter().filter_map(|(id, seen)| seen.filter(|(l, _)| *l == id)).collect();
            if let Some((_, term)) = claims.iter().find(|(id, _)| *id == leader) {
                leader_term = leader_term.max(*term);
            }
            if let Some((next, _)) = claims.into_iter().filter(|(id, term)| *id != leader && *term > leader_term).max_by_key(|(_, term)| *term) {
                let addr = holders.iter().find(|(id, _)| *id == next).map(|(_, addr)| addr.clone());
                return Some((next, switchboard_raft::Node { addr: addr? }));
            }
        }
    }

    /// Commits `bytes` through whichever node leads the group, trying again while no
    /// leader could have appended it, and returns the applied entry's reply.
    ///
    /// Sending again is safe only while the entry is certainly not in any log: when no
    /// leader is known, a node refused it as not the leader, or it never left this node.
    /// Once it was sent and no answer came, it may be committed: the caller is told so
    /// and only the client, with its idempotency key, may send it again.
    ///
    /// `slot` is the proposer's slot for an entry in flight: given back as soon as the
    /// leader answered, so the next entry does not wait for this node's own apply.
    async fn commit_anywhere(&self, bytes: Vec<u8>, slot: tokio::sync::OwnedSemaphorePermit) -> Result<Vec<u8>, String> {
        let give_up = tokio::time::Instant::now() + FIND_LEADER_FOR;
        let mut pause = Duration::from_millis(20);
        let mut hint: Option<(u64, switchboard_raft::Node)> = None;
        let mut last = String::from("no leader is known");
        // A group this node does not hold: its own Raft knows nothing of the leader. The
        // leader a holder named last is asked first, then each holder in turn (one that
        // does not lead names the leader).
        let remote = self.holders.get().and_then(|h| h());
        let held = remote.is_none();
        let holder_list = remote.clone().unwrap_or_default();
        let mut holders = remote.unwrap_or_default().into_iter().cycle().take(64);
        if !held {
            hint = self.named.lock().unwrap_or_else(|p| p.into_inner()).clone();
        }
        loop {
            // The leader this node's Raft names as the round starts (see the pause below).
            let known = if held { self.raft.metrics().borrow().current_leader } else { None };
            let target = hint.take().or_else(|| {
                if !held {
                    return holders.next().map(|(id, addr)| (id, switchboard_raft::Node { addr }));
                }
                let m = self.raft.metrics().borrow().clone();
                let leader = m.current_leader?;
                let node = m.membership_config.membership().get_node(&leader)?.clone();
                Some((leader, node))
            });
            // The leader this round sends to, if any: a pause below ends early when
            // another one is elected.
            let tried = target.as_ref().map(|(leader, _)| *leader);
            match target {
                Some((leader, _)) if leader == self.node_id => {
                    // openraft answers `ForwardToLeader` both when it refuses the entry and
                    // when it truncated it after appending it (another node may still hold
                    // a copy that a later leader commits): either way the node does not
                    // send it again.
                    return match tokio::time::timeout(COMMIT_PATIENCE, self.raft.client_write(Request(bytes))).await {
                        Ok(Ok(response)) => Ok(response.data.0),
                        Ok(Err(openraft::error::RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(_)))) => {
                            Err("this node stopped leading before the entry committed; the outcome is unknown".into())
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("not committed within {} s; the outcome is unknown", COMMIT_PATIENCE.as_secs())),
                    };
                }
                Some((leader, node)) => match {
                    self.counts.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let sent = self.forwarder.write(self.group, &node.addr, Request(bytes.clone()), FORWARD_TTL);
                    // Another leader elected while the answer is awaited: the old one is
                    // gone or cut off, and its answer will not come. Saying so at once lets
                    // the client send again to the new leader without waiting out the TTL.
                    // (Only when this node itself sees `leader` leading: a leader named by
                    // another node may not be known here yet.)
                    let mut metrics = self.raft.metrics();
                    // Only a held group's own Raft sees elections: a copy given up and
                    // not forgotten yet keeps the leader of its last day.
                    let watched = held && metrics.borrow().current_leader == Some(leader);
                    let deposed = async {
                        if watched {
                            let _ = metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != leader)).await;
                            return None;
                        }
                        if held {
                            return std::future::pending().await;
                        }
                        // A group this node does not hold: its own Raft cannot see an
                        // election, so the other holders are asked who leads while the
                        // answer is awaited (a dead leader's connection is called silent
                        // only after a second).
                        self.elected_instead_of(leader, &holder_list).await
                    };
                    tokio::select! {
                        answer = sent => answer,
                        next = deposed => {
                            if let Some(next) = next {
                                *self.named.lock().unwrap_or_else(|p| p.into_inner()) = Some(next);
                            }
                            Err(ForwardError::Unknown(format!("node {leader} stopped leading before it answered")))
                        }
                    }
                } {
                    Ok(response) => {
                        if !held {
                            *self.named.lock().unwrap_or_else(|p| p.into_inner()) = Some((leader, node));
                            self.written.fetch_max(response.log_id.index, std::sync::atomic::Ordering::AcqRel);
                            return Ok(response.data.0);
                        }
                        // The entry's place in the log is fixed: the next one may go.
                        drop(slot);
                        // Read-your-writes on this node: wait until it applied the entry.
                        let index = response.log_id.index;
                        if let Err(e) = self.raft.wait(Some(CATCH_UP_FOR)).applied_index_at_least(Some(index), "forwarded entry").await {
                            tracing::warn!(index, error = %e, "a forwarded entry committed but this node has not applied it yet");
                        }
                        return Ok(response.data.0);
                    }
                    Err(ForwardError::NotCommitted { reason, leader: named }) => {
                        tracing::debug!(leader, %reason, "forwarded entry not committed; trying again");
                        last = format!("node {leader}: {reason}");
                        hint = named.filter(|(id, _)| *id != leader);
                    }
                    Err(e @ ForwardError::Refused(_)) => return Err(e.to_string()),
                    Err(e @ ForwardError::Unknown(_)) => {
                        tracing::debug!(leader, error = %e, "forwarded entry's outcome unknown");
                        self.counts.forward_unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(e.to_string());
                    }
                },
                None => {}
            }
            tracing::debug!(%last, "no leader took the entry yet");
            if tokio::time::Instant::now() >= give_up {
                return Err(format!("no leader took the command within {} s ({last})", FIND_LEADER_FOR.as_secs()));
            }
            if hint.is_none() {
                if held {
                    // This node's Raft sees the election: go on as soon as a leader other
                    // than the one just tried, and than the one known now (which may be
                    // missing from the membership's node list during a change), is
                    // named, not at the end of the pause (a pause of 320 ms or more made
                    // a client wait up to 0.4 s past an election after a leader's kill).
                    let mut metrics = self.raft.metrics();
                    let (seen, untried) = {
                        let m = metrics.borrow_and_update();
                        let seen = m.current_leader;
                        // Learnt while the entry was being sent: tried at once, no pause.
                        // (Not one known before: a round that went to a named leader
                        // instead, which refused, pauses as any other.)
                        let learnt = seen.is_some_and(|l| Some(l) != tried && Some(l) != known && m.membership_config.membership().get_node(&l).is_some());
                        (seen, learnt)
                    };
                    if untried {
                        continue;
                    }
                    let elected = switchboard_raft::network::leader_elected(&mut metrics, |l| Some(l) != tried && Some(l) != seen);
                    let _ = tokio::time::timeout(pause, elected).await;
                } else {
                    tokio::time::sleep(pause).await;
                }
                pause = (pause * 2).min(Duration::from_millis(400));
            }
        }
    }
}

/// How well group commit works: commands per log entry written.
#[derive(Default)]
struct ProposalCounts {
    commands: std::sync::atomic::AtomicU64,
    entries: std::sync::atomic::AtomicU64,
    /// Entries sent to the leader on another node, and those whose answer was lost.
    forwarded: std::sync::atomic::AtomicU64,
    forward_unknown: std::sync::atomic::AtomicU64,
}

impl RaftProposer {
    /// Commands proposed, log entries they went into, and entries forwarded to a leader
    /// on another node.
    /// Forwarded entries whose answer was lost.
    pub(crate) fn forwarded_unknown(&self) -> u64 {
        self.counts.forward_unknown.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.counts.commands.load(Relaxed), self.counts.entries.load(Relaxed), self.counts.forwarded.load(Relaxed))
    }

    /// Starts the proposer of `group`; its entries pass `gate` (held while this node
    /// hands the group's leadership on).
    pub(crate) fn start(group: u64, raft: Raft, node_id: u64, forwarder: Forwarder, gate: switchboard_raft::network::Gate) -> Self {
        let (queue, proposals) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE);
        let counts = Arc::new(ProposalCounts::default());
        let holders = Arc::new(std::sync::OnceLock::new());
        let written = crate::remote::Floor::default();
        let route = Route { group, raft, node_id, forwarder, counts: counts.clone(), holders: holders.clone(), named: Arc::default(), written: written.clone() };
        tokio::spawn(Self::batch(route, proposals, counts.clone(), gate));
        RaftProposer { queue, counts, holders, written }
    }

    /// The highest log index a write this node forwarded for the group got while it did
    /// not hold it (see [`crate::remote::Floor`]).
    pub(crate) fn written(&self) -> crate::remote::Floor {
        self.written.clone()
    }

    /// Commands for the group go to `holders` whenever it names them (this node does
    /// not hold the group), instead of to the leader this node's own Raft knows.
    pub(crate) fn route_through(&self, holders: Holders) {
        let _ = self.holders.set(holders);
    }

    pub(crate) async fn submit(&self, command: Command) -> ApplyResult {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.queue.send((command, reply)).await.map_err(|_| switchboard_actors::Error::Commit("the proposer stopped".into()))?;
        result.await.map_err(|_| switchboard_actors::Error::Commit("the proposer dropped the command".into()))?
    }

    async fn batch(route: Route, mut proposals: tokio::sync::mpsc::Receiver<Proposal>, counts: Arc<ProposalCounts>, gate: switchboard_raft::network::Gate) {
        // A command that did not fit the last entry opens the next one.
        let mut carried: Option<Proposal> = None;
        let in_flight = Arc::new(tokio::sync::Semaphore::new(ENTRIES_IN_FLIGHT));
        loop {
            let first = match carried.take() {
                Some(first) => first,
                None => match proposals.recv().await {
                    Some(first) => first,
                    None => return,
                },
            };
            // Waiting for a free slot lets more commands join this entry.
            let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
            let at = now_ms();
            let mut encoded: Vec<Vec<u8>> = Vec::new();
            let mut replies = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some((command, reply)) = next.take() {
                let envelope = Envelope::new(at, command);
                match encode(&envelope) {
                    Ok(one) if !encoded.is_empty() && bytes + one.len() > MAX_BATCH_BYTES => {
                        carried = Some((envelope.command, reply));
                        break;
                    }
                    Ok(one) => {
                        bytes += one.len();
                        encoded.push(one);
                        replies.push(reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(switchboard_actors::Error::Commit(e)));
                    }
                }
                if encoded.len() < MAX_BATCH {
                    next = proposals.try_recv().ok();
                }
            }
            if encoded.is_empty() {
                continue;
            }
            counts.entries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            counts.commands.fetch_add(encoded.len() as u64, std::sync::atomic::Ordering::Relaxed);
            // Entries are handed to Raft in order from this one task, so the log keeps
            // the order commands arrived in; up to `ENTRIES_IN_FLIGHT` of them commit
            // at once, each answered by its own task when it is applied.
            let n = encoded.len();
            let failed = move |e: String| all_failed(n, e);
            let answer = |replies: Vec<tokio::sync::oneshot::Sender<ApplyResult>>, results: Vec<ApplyResult>| {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            };
            let bytes = if n == 1 { Ok(encoded.remove(0)) } else { batch_entry(&encoded) };
            let bytes = match bytes {
                Ok(bytes) => bytes,
                Err(e) => {
                    answer(replies, failed(e));
                    continue;
                }
            };
            // While leadership is handed on, entries wait and then go to the new leader.
            gate.pass().await;
            if !route.leads() {
                // Another node leads (or nobody does yet): forward the entry there.
                let route = route.clone();
                tokio::spawn(async move {
                    let results = match route.commit_anywhere(bytes, permit).await {
                        Ok(data) => Self::results(n, &data),
                        Err(e) => failed(e),
                    };
                    answer(replies, results);
                });
                continue;
            }
            let receiver = match route.raft.client_write_ff(Request(bytes)).await {
                Ok(receiver) => receiver,
                Err(e) => {
                    answer(replies, failed(e.to_string()));
                    continue;
                }
            };
            tokio::spawn(async move {
                // A leader cut off from its majority takes entries it cannot commit: after
                // `COMMIT_PATIENCE` its callers hear so (outcome unknown) instead of
                // waiting for a heal that may not come.
                let outcome = match tokio::time::timeout(COMMIT_PATIENCE, receiver).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        answer(replies, failed(format!("not committed within {} s: this node may be cut off from its majority; the outcome is unknown", COMMIT_PATIENCE.as_secs())));
                        drop(permit);
                        return;
                    }
                };
                let results = match outcome {
                    Ok(Ok(response)) => Self::results(n, &response.data.0),
                    // Leadership moved: the entry was refused, or appended and then
                    // truncated while another node may keep a copy that a later leader
                    // commits. openraft does not say which, so it is not sent again.
                    Ok(Err(openraft::error::ClientWriteError::ForwardToLeader(_))) => {
                        failed("leadership moved before the entry committed; the outcome is unknown".into())
                    }
                    Ok(Err(e)) => failed(e.to_string()),
                    Err(_) => failed("raft stopped before the entry was applied".into()),
                };
                answer(replies, results);
                drop(permit);
            });
        }
    }

    /// One result for each of the `n` commands of an applied entry, in order.
    fn results(n: usize, data: &[u8]) -> Vec<ApplyResult> {
        let failed = |e: String| all_failed(n, e);
        if n == 1 {
            return vec![decode::<ApplyResult>(data).unwrap_or_else(|e| Err(switchboard_actors::Error::Commit(e)))];
        }
        match decode::<Vec<ApplyResult>>(data) {
            Ok(results) if results.len() == n => results,
            Ok(results) => failed(format!("a batch of {n} commands got {} results", results.len())),
            Err(e) => failed(e),
        }
    }
}

/// The same commit error for each of `n` commands.
fn all_failed(n: usize, error: String) -> Vec<ApplyResult> {
    (0..n).map(|_| Err(switchboard_actors::Error::Commit(error.clone()))).collect()
}

/// A batch entry from envelopes encoded one by one: the tag, then exactly the bincode
/// of `Vec<Envelope>` (its length as a varint, then the elements).
fn batch_entry(encoded: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let length = encode(&(encoded.len() as u64))?;
    let mut entry = Vec::with_capacity(1 + length.len() + encoded.iter().map(Vec::len).sum::<usize>());
    entry.push(BATCH_TAG);
    entry.extend_from_slice(&length);
    for one in encoded {
        entry.extend_from_slice(one);
    }
    Ok(entry)
}

impl Proposer for RaftProposer {
    fn propose(&self, command: Command) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApplyResult> + Send>> {
        let proposer = self.clone();
        Box::pin(async move { proposer.submit(command).await })
    }
}

struct NodeBackend {
    node_id: u64,
    raft: Raft,
    proposer: RaftProposer,
    shard: Arc<Shard>,
    supervisor: ActorRef<SupervisorMsg>,
    /// Times this node saw the shard group's leader change (to another node, or none).
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
    /// The group's commit index as this node knows it (`LogStore::committed_index`).
    committed: Arc<std::sync::atomic::AtomicU64>,
    peers: Peers,
    /// Files being copied to the other members at once, at most `FILES_COPIED_AT_ONCE`.
    copying: Arc<tokio::sync::Semaphore>,
    /// Where peers' RPCs arrive: it knows when the leader was last heard from.
    router: Router,
    /// Read barriers, one round at a time.
    barriers: BarrierRounds,
}

/// A node's read-barrier rounds, per group: one round at a time for everyone who asked
/// before it began, so however many logins and replies arrive, a group's leader
/// confirms its lead once per round trip, and no caller is answered by a round that
/// began before it asked.
#[derive(Clone, Default)]
pub(crate) struct BarrierRounds(Arc<std::sync::Mutex<BTreeMap<u64, BarrierRound>>>);

/// Whether a group's round runs, and who waits for the next one.
type BarrierRound = (bool, Vec<tokio::sync::oneshot::Sender<Result<(), String>>>);

impl BarrierRounds {
    /// Waits for [`switchboard_raft::network::read_barrier`] of `group` (3 s patience)
    /// in the next round that begins after this call.
    pub(crate) async fn wait(&self, raft: Raft, peers: Peers, group: u64) -> Result<(), String> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let round = all.entry(group).or_default();
            round.1.push(done);
            !std::mem::replace(&mut round.0, true)
        };
        if start {
            let rounds = self.0.clone();
            tokio::spawn(async move {
                loop {
                    let waiting = {
                        let mut all = rounds.lock().unwrap_or_else(|p| p.into_inner());
                        let round = all.entry(group).or_default();
                        if round.1.is_empty() {
                            round.0 = false;
                            return;
                        }
                        std::mem::take(&mut round.1)
                    };
                    let result = switchboard_raft::network::read_barrier(&raft, &peers, group, Duration::from_secs(3)).await;
                    for waiter in waiting {
                        let _ = waiter.send(result.clone());
                    }
                }
            });
        }
        answer.await.map_err(|_| "the read barrier stopped".to_string())?
    }
}

/// Files copied to the other members at once; further uploads wait their turn.
const FILES_COPIED_AT_ONCE: usize = 4;

/// How long copying a file to the other members may take before the upload fails.
const FILE_COPY_FOR: Duration = Duration::from_secs(10);

/// Whether each group is quiet on this node (`switchboard_raft::quiet`), and the
/// appends its leaders sent here: what shows an idle cluster beating slowly.
pub(crate) fn quiet_metrics(out: &mut String, router: &Router, groups: impl IntoIterator<Item = u64> + Clone) {
    let _ = writeln!(out, "# HELP switchboard_raft_quiet Whether the group is quiet here: 1 on a leader beating every 500 ms, 2 on a member waiting for those beats with its election timer off, 0 otherwise.\n# TYPE switchboard_raft_quiet gauge");
    for group in groups.clone() {
        let q = router.quietness(group);
        let value = if q.leading { 1 } else if q.following { 2 } else { 0 };
        let _ = writeln!(out, "switchboard_raft_quiet{{group=\"{group}\"}} {value}");
    }
    let _ = writeln!(out, "# HELP switchboard_raft_appends_received_total Appends (entries, heartbeats, quiet beats) this node received from the group's leader.\n# TYPE switchboard_raft_appends_received_total counter");
    for group in groups {
        let _ = writeln!(out, "switchboard_raft_appends_received_total{{group=\"{group}\"}} {}", router.appends_received(group));
    }
}

/// A leader none of whose peers answered for this long has lost its majority: it is
/// not ready (load balancers move its clients away) until they answer again.
const QUORUM_CONTACT: Duration = Duration::from_secs(2);

/// On the leader: whether enough voters answered lately to make a majority with it.
pub(crate) fn reaches_majority(m: &openraft::RaftMetrics<u64, switchboard_raft::Node>, node_id: u64, peers: &Peers) -> bool {
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let heard = voters
        .iter()
        .filter(|id| **id != node_id)
        .filter(|id| membership.get_node(id).is_some_and(|node| peers.answered_within(&node.addr, QUORUM_CONTACT)))
        .count();
    heard + usize::from(voters.contains(&node_id)) > voters.len() / 2
}

/// Whether a member can serve `group` now: the group has a leader, which is this node
/// reaching a majority, or another node heard from lately.
pub(crate) fn serves(raft: &Raft, node_id: u64, group: u64, peers: &Peers, router: &Router) -> bool {
    let m = raft.metrics().borrow().clone();
    // A node removed from the group keeps the last leader it knew, forever.
    if m.membership_config.membership().get_node(&node_id).is_none() && m.membership_config.membership().nodes().count() > 0 {
        return false;
    }
    match m.current_leader {
        Some(leader) if leader == node_id => reaches_majority(&m, node_id, peers),
        // A follower serves only while its leader is heard from: one cut off with a
        // minority keeps naming a leader it cannot reach.
        Some(_) => router.heard_within(group, QUORUM_CONTACT),
        None => false,
    }
}

impl NodeBackend {
    fn reaches_majority(&self, m: &openraft::RaftMetrics<u64, switchboard_raft::Node>) -> bool {
        reaches_majority(m, self.node_id, &self.peers)
    }

    fn file_targets(&self) -> (Vec<(String, bool)>, usize) {
        file_targets(&self.raft, self.node_id)
    }
}

/// The group's other members (address, whether it votes), and how many copies on
/// other voters make a majority of the voters hold a file with this node's.
pub(crate) fn file_targets(raft: &Raft, node_id: u64) -> (Vec<(String, bool)>, usize) {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let others: Vec<(String, bool)> =
        membership.nodes().filter(|(id, _)| **id != node_id).map(|(id, node)| (node.addr.clone(), voters.contains(id))).collect();
    let majority = voters.len() / 2 + 1;
    let needed = majority.saturating_sub(usize::from(voters.contains(&node_id)));
    let needed = needed.min(others.iter().filter(|(_, votes)| *votes).count());
    (others, needed)
}

/// Copies a stored file to the group's other members (`targets`, from
/// [`file_targets`]) and waits for as many as a majority needs.
pub(crate) async fn replicate_file(
    targets: (Vec<(String, bool)>, usize),
    peers: Peers,
    copying: Arc<tokio::sync::Semaphore>,
    blobs: switchboard_gateway::attachments::BlobStore,
    id: AttachmentId,
) -> Result<(), String> {
    let (others, needed) = targets;
    if others.is_empty() {
        return Ok(());
    }
    // A few files in flight at once: each holds its encoded bytes (5 MiB at most)
    // until every member has answered.
    // The wait for a turn counts against the same bound as a copy: a file whose copies
    // cannot begin within it is refused (503) rather than holding its upload, webhook or
    // mail turn while others' copies crawl.
    let permit = match tokio::time::timeout(FILE_COPY_FOR, copying.acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return Err("the node is stopping".to_string()),
        Err(_) => return Err(format!("no turn to copy the file to the other members came within {} s", FILE_COPY_FOR.as_secs())),
    };
    let bytes = blobs.read_all(&id).await.map_err(|e| e.to_string())?.ok_or("the stored file vanished")?;
    let push = Peers::file_push(&id.0, bytes)?;
    // Every member gets a copy; the upload waits for as many as a majority needs.
    let (done, mut results) = tokio::sync::mpsc::channel(others.len());
    let mut sends = tokio::task::JoinSet::new();
    for (addr, votes) in others {
        let (peers, push, done) = (peers.clone(), push.clone(), done.clone());
        sends.spawn(async move {
            let result = peers.put_file(&addr, &push, FILE_COPY_FOR).await.map_err(|e| format!("{addr}: {e}"));
            // A learner gets its copy too, but only voters make the majority.
            let _ = done.send((votes, result)).await;
        });
    }
    drop(done);
    // The rest finish in the background, still holding the permit.
    tokio::spawn(async move {
        while sends.join_next().await.is_some() {}
        drop(permit);
    });
    let (mut copies, mut errors) = (0, Vec::new());
    while copies < needed {
        match results.recv().await {
            Some((true, Ok(()))) => copies += 1,
            Some((false, Ok(()))) => {}
            Some((_, Err(e))) => errors.push(e),
            None => return Err(format!("{copies} of the {needed} copies needed were made ({})", errors.join("; "))),
        }
    }
    Ok(())
}

/// Looks for file `id` on the group's other members (`others`, from [`file_targets`]).
pub(crate) async fn fetch_file(others: Vec<(String, bool)>, peers: Peers, id: String) -> Option<Vec<u8>> {
    for (addr, _) in others {
        match peers.get_file(&addr, &id, FILE_COPY_FOR).await {
            Ok(Some(bytes)) => return Some(bytes),
            Ok(None) => {}
            Err(e) => tracing::debug!(%addr, error = %e, "file fetch failed"),
        }
    }
    None
}

/// How far this node's entry clock reads ahead of its wall clock, in Prometheus text.
pub(crate) fn clock_metrics(out: &mut String) {
    let _ = writeln!(out, "# HELP switchboard_clock_ahead_ms How far the clock this node stamps entries and times offers by reads ahead of its wall clock: an entry was stamped ahead of this node's wall clock (another leader's clock ahead, or one stepped forward), and time goes on from it (0: none).\n# TYPE switchboard_clock_ahead_ms gauge");
    let _ = writeln!(out, "switchboard_clock_ahead_ms {}", switchboard_actors::actors::clock_ahead_ms());
}

/// What [`keep_files`] did, in Prometheus text.
pub(crate) fn file_metrics(out: &mut String) {
    let _ = writeln!(out, "# HELP switchboard_files_fetched_total Attachment files this node fetched from another because it holds their conversation's shard without them.\n# TYPE switchboard_files_fetched_total counter");
    let _ = writeln!(out, "switchboard_files_fetched_total {}", FILES_FETCHED.load(std::sync::atomic::Ordering::Relaxed));
    let _ = writeln!(out, "# HELP switchboard_files_unavailable Attachment files of the shards this node holds that no member could give in their last sweep.\n# TYPE switchboard_files_unavailable gauge");
    let _ = writeln!(out, "switchboard_files_unavailable {}", FILES_UNAVAILABLE.load(std::sync::atomic::Ordering::Relaxed));
    let _ = writeln!(out, "# HELP switchboard_files_strays_removed_total Attachment files this node removed because no shard it holds names them: a holder of theirs had them, or no record names them at all.\n# TYPE switchboard_files_strays_removed_total counter");
    let _ = writeln!(out, "switchboard_files_strays_removed_total {}", FILES_STRAYS_REMOVED.load(std::sync::atomic::Ordering::Relaxed));
}

/// Files the stray sweeps (`split::give_back_files`, `give_back_unnamed_files`) removed.
pub(crate) static FILES_STRAYS_REMOVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Files fetched by [`keep_files`] because this node held their shard without them.
pub(crate) static FILES_FETCHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Files of the shards this node holds that no member could give in their last sweep.
pub(crate) static FILES_UNAVAILABLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Attachment records read per page of a sweep.
const FILE_SWEEP_PAGE: usize = 256;
/// The shortest pause between two sweeps of one shard; a sweep that took long waits
/// twenty times as long before the next, up to [`FILE_SWEEP_MAX_PAUSE`].
const FILE_SWEEP_EVERY: Duration = Duration::from_secs(10);
const FILE_SWEEP_MAX_PAUSE: Duration = Duration::from_secs(600);
/// One sweep at a time in a process, whatever number of shards it holds: a sweep holds
/// at most one file (5 MiB at most) at a time.
pub(crate) static SWEEPING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Keeps this node's copy of the files of `shard`'s attachments whole while it holds the
/// shard (`sources` names where else to look, its other holders first, or `None` while
/// this node does not hold it): an upload is answered once a majority of the holders
/// have the file, and a holder that was down, or that the placement added since, has
/// the records but not the bytes. Each sweep reads the shard's attachment records page
/// by page and fetches each missing file from the first source that has it (a source
/// that fails is not asked again in that sweep), checked against its SHA-256 before it
/// is kept, and dropped again if retention deleted its record meanwhile. A sweep runs
/// when the shard's records changed since the last one (or that one left files
/// unavailable), at most every [`FILE_SWEEP_EVERY`].
pub(crate) async fn keep_files(
    shard: Arc<Shard>,
    sources: impl Fn() -> Option<Vec<String>> + Send + 'static,
    peers: Peers,
    blobs: switchboard_gateway::attachments::BlobStore,
) {
    let mut swept_at: Option<(u64, u64)> = None;
    let mut unavailable_here = 0u64;
    let mut pause = Duration::from_secs(2);
    loop {
        tokio::time::sleep(pause).await;
        pause = FILE_SWEEP_EVERY;
        let Some(mut sources) = sources() else {
            swept_at = None;
            FILES_UNAVAILABLE.fetch_sub(std::mem::take(&mut unavailable_here), std::sync::atomic::Ordering::Relaxed);
            continue;
        };
        let version = shard.records_version();
        if swept_at == Some(version) {
            continue;
        }
        let Ok(_sweeping) = SWEEPING.acquire().await else { return };
        let started = std::time::Instant::now();
        let mut after: Option<Vec<u8>> = None;
        let mut unavailable = 0u64;
        let complete = loop {
            let page = match shard.attachments_page(after.as_deref(), FILE_SWEEP_PAGE) {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the shard's attachment records; the sweep is tried again later");
                    break false;
                }
            };
            let Some((last, _)) = page.last() else { break true };
            after = Some(last.clone());
            for (_, attachment) in page {
                if blobs.has(&attachment.id).await {
                    continue;
                }
                if !fetch_missing(&shard, &attachment, &mut sources, &peers, &blobs).await {
                    unavailable += 1;
                }
            }
            tokio::task::yield_now().await;
        };
        FILES_UNAVAILABLE.fetch_sub(unavailable_here, std::sync::atomic::Ordering::Relaxed);
        FILES_UNAVAILABLE.fetch_add(unavailable, std::sync::atomic::Ordering::Relaxed);
        unavailable_here = unavailable;
        if unavailable > 0 {
            tracing::warn!(unavailable, "files of a shard this node holds are on no member that answered; looked for again in the next sweep");
        }
        swept_at = (complete && unavailable == 0).then_some(version);
        pause = (started.elapsed() * 20).clamp(FILE_SWEEP_EVERY, FILE_SWEEP_MAX_PAUSE);
    }
}

/// Fetches `attachment`'s file for this node from the first of `sources` that has it;
/// a source that fails is dropped from `sources`. Whether the file is here now (or
/// its record is gone, so nothing is missing).
async fn fetch_missing(
    shard: &Shard,
    attachment: &Attachment,
    sources: &mut Vec<String>,
    peers: &Peers,
    blobs: &switchboard_gateway::attachments::BlobStore,
) -> bool {
    let mut i = 0;
    while i < sources.len() {
        let addr = sources[i].clone();
        match peers.get_file(&addr, &attachment.id.0, FILE_COPY_FOR).await {
            Ok(Some(bytes)) => {
                if switchboard_gateway::attachments::sha256_hex(&bytes) != attachment.sha256 {
                    tracing::warn!(attachment = %attachment.id.0, %addr, "a member sent a file that does not match its record; not kept");
                    i += 1;
                    continue;
                }
                if let Err(e) = blobs.put_bytes(&attachment.id, &bytes).await {
                    tracing::warn!(attachment = %attachment.id.0, error = %e, "could not store a fetched file");
                    return false;
                }
                // Retention may have deleted the record (and this node's file, which was
                // not there yet) while the file was on its way: then it goes again.
                if matches!(shard.attachment(&attachment.id), Ok(None)) {
                    blobs.remove(&attachment.id).await;
                    return true;
                }
                FILES_FETCHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return true;
            }
            Ok(None) => i += 1,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "file fetch failed; that member is not asked again in this sweep");
                sources.remove(i);
            }
        }
    }
    false
}

/// Stray files looked at per sweep at most: the rest, in id order, in the next sweeps.
pub(crate) const STRAYS_PER_SWEEP: usize = 10_000;
/// The youngest a file may be and still be taken for a stray, whatever the setting. An
/// upload's record commits within about 25 s of its copies (10 s to copy, resends for
/// 10 s more), but a channel message or a mail stores up to 5 files one after the
/// other, each waiting for a copy slot and up to 10 s for its copies, before its one
/// record commits; a file written again starts its clock over.
pub(crate) const STRAY_MIN_AGE: Duration = Duration::from_secs(900);
/// Patience of each read barrier and file fetch of a stray sweep.
pub(crate) const STRAY_PATIENCE: Duration = Duration::from_secs(10);
/// How long one stray sweep may run; the next goes on from where it stopped.
pub(crate) const STRAY_SWEEP_FOR: Duration = Duration::from_secs(300);

/// Whether `shard`'s records surely do not name file `id`: they could be read, and no
/// snapshot is replacing them.
pub(crate) fn unnamed(shard: &Shard, id: &AttachmentId) -> bool {
    !shard.replacing() && matches!(shard.attachment(id), Ok(None))
}

/// The next page of a stray sweep: up to [`STRAYS_PER_SWEEP`] ids of files written at
/// least `after` ago, greater than `from`, in id order, that `named` does not claim
/// (a shard held here names it, or could not say). Blocking: call it off the runtime.
pub(crate) fn stray_page(
    blobs: &switchboard_gateway::attachments::BlobStore,
    after: Duration,
    from: Option<&AttachmentId>,
    named: impl Fn(&AttachmentId) -> bool,
) -> std::io::Result<Vec<AttachmentId>> {
    let mut next = std::collections::BinaryHeap::new();
    for id in blobs.settled_ids(after)? {
        if from.is_some_and(|from| id.0 <= from.0) || named(&id) {
            continue;
        }
        next.push(id.0);
        if next.len() > STRAYS_PER_SWEEP {
            // The greatest goes: the page is the smallest ids after `from`.
            next.pop();
        }
    }
    Ok(next.into_sorted_vec().into_iter().map(AttachmentId).collect())
}

/// The next page of a stray sweep ([`stray_page`], listed off the runtime) and whether
/// it reaches the end of the folder; `None` when there is nothing to look at (the
/// cursor starts over) or the folder could not be listed (looked at again later).
pub(crate) async fn next_strays(
    blobs: &switchboard_gateway::attachments::BlobStore,
    after: Duration,
    cursor: &mut Option<AttachmentId>,
    named: impl Fn(&AttachmentId) -> bool + Send + 'static,
) -> Option<(Vec<AttachmentId>, bool)> {
    let (blobs, from) = (blobs.clone(), cursor.clone());
    match tokio::task::spawn_blocking(move || stray_page(&blobs, after, from.as_ref(), named)).await {
        Ok(Ok(strays)) if strays.is_empty() => {
            *cursor = None;
            None
        }
        // A short page is the end of the folder: the next sweep starts over.
        Ok(Ok(strays)) => {
            let complete = strays.len() < STRAYS_PER_SWEEP;
            Some((strays, complete))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not list the attachment files; the stray sweep is tried again later");
            None
        }
        Err(_) => None,
    }
}

/// On a node of one group, which every member holds whole: gives back the disk of files
/// no record names (an upload or a channel message whose record was never committed).
/// Every `every` it looks, in id order from where it stopped, at up to 10,000 files
/// written at least `after` ago (15 minutes at the least) that the group does not
/// name; once this node caught up with the leader (a read barrier), each one still not
/// named is removed, its age checked again under the lock a write of its id takes.
pub(crate) async fn give_back_unnamed_files(
    shard: Arc<Shard>,
    raft: Raft,
    peers: Peers,
    blobs: switchboard_gateway::attachments::BlobStore,
    after: Duration,
    every: Duration,
) {
    let after = after.max(STRAY_MIN_AGE);
    let mut cursor: Option<AttachmentId> = None;
    loop {
        tokio::time::sleep(every.max(Duration::from_secs(1))).await;
        let listed = {
            let shard = shard.clone();
            next_strays(&blobs, after, &mut cursor, move |id| !unnamed(&shard, id)).await
        };
        let Some((strays, complete)) = listed else { continue };
        let barrier_at = tokio::time::Instant::now();
        if let Err(e) = switchboard_raft::network::read_barrier(&raft, &peers, SHARD_GROUP, STRAY_PATIENCE).await {
            tracing::info!(error = %e, "this node did not catch up with its leader; stray files are looked at later");
            continue;
        }
        let started = tokio::time::Instant::now();
        let (mut removed, mut last, mut stopped) = (0u64, None, false);
        for id in strays {
            if started.elapsed() >= STRAY_SWEEP_FOR {
                stopped = true;
                break;
            }
            if unnamed(&shard, &id) && blobs.remove_if_settled(&id, after + barrier_at.elapsed()).await {
                removed += 1;
            }
            last = Some(id);
            tokio::task::yield_now().await;
        }
        cursor = if complete && !stopped { None } else { last.or(cursor) };
        if removed > 0 {
            FILES_STRAYS_REMOVED.fetch_add(removed, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(removed, "removed attachment files no record names");
        }
    }
}

/// Deletes the files of attachments whose records a retention purge deleted.
pub(crate) type FilesGone = Arc<dyn Fn(Vec<switchboard_actors::model::AttachmentId>) + Send + Sync>;

/// What deletes a purged attachment's file from `blobs`, in the background.
pub(crate) fn files_gone(blobs: switchboard_gateway::attachments::BlobStore) -> FilesGone {
    Arc::new(move |ids| {
        let blobs = blobs.clone();
        tokio::spawn(async move {
            for id in ids {
                blobs.remove(&id).await;
            }
        });
    })
}

/// Attachment files follow their conversation out when retention deletes it from
/// `shard`. Set before the shard's group starts: the purges a member applies while it
/// catches up at start delete their files too (else they wait for the stray sweep).
pub(crate) fn remove_files_with_their_conversations(shard: &Shard, gone: &FilesGone) {
    let gone = gone.clone();
    shard.on_deleted_attachments(move |ids| gone(ids));
}

/// How long a signal relayed to another node may take: a typing mark later than that
/// says nothing any more.
const SIGNAL_PATIENCE: Duration = Duration::from_secs(1);

/// Hands an ephemeral signal to every node of `nodes` but `me`, best effort: the sockets
/// it is for may be on any of them (a visitor's on their conversation shard's leader,
/// their operator's on the routing shard's).
pub(crate) fn relay_signal(peers: &Peers, nodes: impl IntoIterator<Item = (u64, String)>, me: u64, to: switchboard_raft::network::SignalTo, signal: &serde_json::Value) {
    let Ok(bytes) = serde_json::to_vec(signal) else { return };
    if bytes.len() > switchboard_raft::network::MAX_SIGNAL_BYTES {
        return;
    }
    for (id, addr) in nodes {
        if id == me {
            continue;
        }
        // Relays in flight are bounded: past the bound a signal is dropped, as signals
        // may be.
        let Ok(slot) = SIGNALS_IN_FLIGHT.clone().try_acquire_owned() else {
            tracing::debug!(%addr, "a signal was dropped: too many relays in flight");
            continue;
        };
        let (peers, to, bytes) = (peers.clone(), to.clone(), bytes.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(SIGNAL_PATIENCE, peers.signal(&addr, to, bytes, SIGNAL_PATIENCE)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "a signal did not reach a node"),
                Err(_) => tracing::debug!(%addr, "a signal did not reach a node in time"),
            }
        });
    }
}

/// Signals being relayed to other nodes at once, at most [`MAX_SIGNALS_IN_FLIGHT`].
static SIGNALS_IN_FLIGHT: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> = std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(MAX_SIGNALS_IN_FLIGHT)));

/// The most signal relays a process has in flight (each a task and a QUIC stream).
const MAX_SIGNALS_IN_FLIGHT: usize = 256;

/// On the leader, every [`RULES_CHECK_EVERY`] while the group decides with older routing
/// rules than this build's: adopts the newest every member knows (a member upgraded
/// since the start, or one that did not answer then).
async fn adopt_rules_later(raft: Raft, peers: Peers, backend: Arc<NodeBackend>, shard: Arc<Shard>, node_id: u64) {
    let mut every = tokio::time::interval(RULES_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if shard.read().rules >= switchboard_actors::core::RULES_VERSION {
            continue;
        }
        if raft.metrics().borrow().current_leader != Some(node_id) {
            continue;
        }
        match adopt_known_rules(&raft, &peers, node_id, || rules_of(&shard), switchboard_actors::core::RULES_VERSION, |command| backend.submit(command)).await {
            Ok(look) => tracing::debug!(?look, "looked at the group's routing rules"),
            Err(e) => tracing::debug!(error = %e, "adopting the routing rules did not go through; asked again later"),
        }
    }
}

/// What this member tells gateways polling it: the leader and members of `raft`'s
/// group (the routing shard's on a split node) and whether the gateway serves; and
/// what it tells other nodes of the outbox entries it sends.
pub(crate) fn report_status(router: &Router, raft: Raft, node_id: u64, gateway: Arc<Gateway>) {
    // Which outbox entries this process sends: what the next leader of a group asks
    // before it settles an attempt this node left (`outbox`).
    router.set_sending(Arc::new(crate::outbox::sending));
    // Nodes removed from the cluster (the directory's record, rules 19) are admitted to
    // no group again, whatever certificate they hold.
    let directory = gateway.clone();
    router.set_removed(Arc::new(move |id| directory.backend.directory_shard().read().removed_nodes.contains(&id)));
    // Other nodes' signals, for this node's sockets (never relayed on again).
    let sockets = gateway.clone();
    router.set_signals(Arc::new(move |to, bytes| {
        let Ok(signal) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return };
        match to {
            switchboard_raft::network::SignalTo::Operator(operator) => sockets.signals.to_operator(&OperatorId::new(operator), signal),
            switchboard_raft::network::SignalTo::Conversation(id) => sockets.signals.to_conversation(switchboard_actors::model::ConversationId(id), signal),
        }
    }));
    router.set_status(Arc::new(move || {
        let m = raft.metrics().borrow().clone();
        switchboard_raft::network::MemberStatus {
            node: node_id,
            leader: m.current_leader,
            members: m.membership_config.membership().nodes().map(|(id, node)| (*id, node.addr.clone())).collect(),
            ready: gateway.ready(),
        }
    }));
}

/// The attachment files of this node, served to peers: what they push before
/// committing a record, and what a member that missed a file fetches.
struct NodeFiles(switchboard_gateway::attachments::BlobStore);

impl switchboard_raft::network::Files for NodeFiles {
    fn put(&self, id: String, bytes: Vec<u8>) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let blobs = self.0.clone();
        Box::pin(async move { blobs.put_bytes(&AttachmentId(id), &bytes).await.map_err(|e| e.to_string()) })
    }

    fn get(&self, id: String) -> futures::future::BoxFuture<'static, Result<Option<Vec<u8>>, String>> {
        let blobs = self.0.clone();
        Box::pin(async move { blobs.read_all(&AttachmentId(id)).await.map_err(|e| e.to_string()) })
    }
}

impl Backend for NodeBackend {
    fn relay_signal(&self, to: switchboard_raft::network::SignalTo, signal: &serde_json::Value) {
        let m = self.raft.metrics().borrow().clone();
        let nodes: Vec<(u64, String)> = m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        relay_signal(&self.peers, nodes, self.node_id, to, signal);
    }

    fn submit(&self, command: Command) -> BoxFuture<ApplyResult> {
        let proposer = self.proposer.clone();
        Box::pin(async move { proposer.submit(command).await })
    }

    fn shard(&self) -> Arc<Shard> {
        self.shard.clone()
    }

    fn subscribe(&self, key: StreamKey) -> BoxFuture<Result<Wakeups, switchboard_actors::Error>> {
        let supervisor = self.supervisor.clone();
        Box::pin(async move { switchboard_actors::actors::subscribe(&supervisor, key).await })
    }

    fn crash_actor(&self, key: StreamKey) -> BoxFuture<Result<bool, switchboard_actors::Error>> {
        let supervisor = self.supervisor.clone();
        Box::pin(async move { switchboard_actors::actors::crash(&supervisor, key).await })
    }

    fn ready(&self) -> bool {
        serves(&self.raft, self.node_id, SHARD_GROUP, &self.peers, &self.router)
    }

    fn replicate_file(&self, blobs: switchboard_gateway::attachments::BlobStore, id: AttachmentId, _owner: switchboard_gateway::attachments::FileOwner) -> BoxFuture<Result<(), String>> {
        Box::pin(replicate_file(self.file_targets(), self.peers.clone(), self.copying.clone(), blobs, id))
    }

    fn read_barrier(&self) -> BoxFuture<Result<(), String>> {
        let (raft, peers, barriers) = (self.raft.clone(), self.peers.clone(), self.barriers.clone());
        Box::pin(async move { barriers.wait(raft, peers, SHARD_GROUP).await })
    }

    fn removal_refused(&self, id: u64) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        (voters == [id]).then(|| format!("node {id} is the group's last voter"))
    }

    fn remove_member(&self, id: u64) -> BoxFuture<Result<(), String>> {
        let (router, peers) = (self.router.clone(), self.peers.clone());
        Box::pin(async move {
            let change = switchboard_raft::members::Change::Leave { id };
            switchboard_raft::members::apply_anywhere(&router, &peers, SHARD_GROUP, change, Duration::from_secs(30)).await
        })
    }

    fn fetch_file(&self, id: String) -> BoxFuture<Option<Vec<u8>>> {
        Box::pin(fetch_file(self.file_targets().0, self.peers.clone(), id))
    }

    fn cluster(&self) -> serde_json::Value {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let matched = m.replication.as_ref();
        let members: Vec<serde_json::Value> = membership
            .nodes()
            .map(|(id, node)| {
                let mut member = serde_json::json!({ "id": id, "raft_addr": node.addr, "voter": voters.contains(id) });
                if let Some(matched) = matched {
                    member["matched"] = serde_json::json!(matched.get(id).and_then(|l| l.map(|l| l.index)));
                }
                member
            })
            .collect();
        serde_json::json!({
            "node": self.node_id,
            "group": SHARD_GROUP,
            "role": format!("{:?}", m.state).to_lowercase(),
            "leader": m.current_leader,
            "term": m.current_term,
            "last_log": m.last_log_index,
            "commit_index": self.committed.load(std::sync::atomic::Ordering::Relaxed).max(m.last_applied.map_or(0, |l| l.index)),
            "last_applied": m.last_applied.map(|l| l.index),
            "members": members,
            "leader_changes": self.leader_changes.load(std::sync::atomic::Ordering::Relaxed),
            "reaches_majority": (m.current_leader == Some(self.node_id)).then(|| self.reaches_majority(&m)),
        })
    }

    fn metrics(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        let mut out = String::new();
        let leader = u8::from(m.current_leader == Some(self.node_id));
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let last_log = m.last_log_index.unwrap_or(0);
        let _ = writeln!(out, "# HELP switchboard_raft_is_leader Whether this node leads the shard group.\n# TYPE switchboard_raft_is_leader gauge");
        let _ = writeln!(out, "switchboard_raft_is_leader{{group=\"{SHARD_GROUP}\"}} {leader}");
        let _ = writeln!(out, "# HELP switchboard_raft_term Current Raft term.\n# TYPE switchboard_raft_term gauge");
        let _ = writeln!(out, "switchboard_raft_term{{group=\"{SHARD_GROUP}\"}} {}", m.current_term);
        let _ = writeln!(out, "# HELP switchboard_raft_last_applied Index of the last applied entry.\n# TYPE switchboard_raft_last_applied gauge");
        let _ = writeln!(out, "switchboard_raft_last_applied{{group=\"{SHARD_GROUP}\"}} {applied}");
        let snapshot = m.snapshot.map(|l| l.index).unwrap_or(0);
        let _ = writeln!(out, "# HELP switchboard_raft_snapshot_index Last entry included in the newest snapshot.\n# TYPE switchboard_raft_snapshot_index gauge");
        let _ = writeln!(out, "switchboard_raft_snapshot_index{{group=\"{SHARD_GROUP}\"}} {snapshot}");
        outbox_metrics(&mut out, self.shard.read().outbox.len());
        let membership = m.membership_config.membership();
        let _ = writeln!(out, "# HELP switchboard_raft_voters Voting members of the group, as this node knows them.\n# TYPE switchboard_raft_voters gauge");
        let _ = writeln!(out, "switchboard_raft_voters{{group=\"{SHARD_GROUP}\"}} {}", membership.voter_ids().count());
        if m.current_leader == Some(self.node_id) {
            let _ = writeln!(out, "# HELP switchboard_raft_reaches_majority On the leader: whether a majority of voters answered it within 2 s (0: cut off, not ready).\n# TYPE switchboard_raft_reaches_majority gauge");
            let _ = writeln!(out, "switchboard_raft_reaches_majority{{group=\"{SHARD_GROUP}\"}} {}", u8::from(self.reaches_majority(&m)));
            if let Some(replication) = &m.replication {
                let _ = writeln!(out, "# HELP switchboard_raft_replica_lag On the leader: entries in its log a member has not acknowledged yet.\n# TYPE switchboard_raft_replica_lag gauge");
                for (member, matched) in replication.iter() {
                    if *member != self.node_id {
                        let lag = last_log.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
                        let _ = writeln!(out, "switchboard_raft_replica_lag{{group=\"{SHARD_GROUP}\",member=\"{member}\"}} {lag}");
                    }
                }
            }
        }
        let _ = writeln!(out, "# HELP switchboard_raft_last_log Index of the last log entry.\n# TYPE switchboard_raft_last_log gauge");
        let _ = writeln!(out, "switchboard_raft_last_log{{group=\"{SHARD_GROUP}\"}} {last_log}");
        // A snapshot installed here moves the applied index past the last committed
        // pointer openraft saved: it was committed too.
        let committed = self.committed.load(std::sync::atomic::Ordering::Relaxed).max(applied);
        let _ = writeln!(out, "# HELP switchboard_raft_leader The node that leads the group, as this node knows it (0: none known).\n# TYPE switchboard_raft_leader gauge");
        let _ = writeln!(out, "switchboard_raft_leader{{group=\"{SHARD_GROUP}\"}} {}", m.current_leader.unwrap_or(0));
        let _ = writeln!(out, "# HELP switchboard_raft_commit_index Index of the group's last entry this node knows committed.\n# TYPE switchboard_raft_commit_index gauge");
        let _ = writeln!(out, "switchboard_raft_commit_index{{group=\"{SHARD_GROUP}\"}} {committed}");
        let _ = writeln!(out, "# HELP switchboard_raft_apply_lag Entries this node knows committed but has not applied yet.\n# TYPE switchboard_raft_apply_lag gauge");
        let _ = writeln!(out, "switchboard_raft_apply_lag{{group=\"{SHARD_GROUP}\"}} {}", committed.saturating_sub(applied));
        let _ = writeln!(out, "# HELP switchboard_raft_leader_changes_total Changes of the group's leader seen by this node.\n# TYPE switchboard_raft_leader_changes_total counter");
        let _ = writeln!(out, "switchboard_raft_leader_changes_total{{group=\"{SHARD_GROUP}\"}} {}", self.leader_changes.load(std::sync::atomic::Ordering::Relaxed));
        switchboard_raft::state::store_metrics(&mut out);
        file_metrics(&mut out);
        clock_metrics(&mut out);
        let (commands, entries) = (self.proposer.counts.commands.load(std::sync::atomic::Ordering::Relaxed), self.proposer.counts.entries.load(std::sync::atomic::Ordering::Relaxed));
        let _ = writeln!(out, "# HELP switchboard_proposed_commands_total Commands proposed to the shard group.\n# TYPE switchboard_proposed_commands_total counter");
        let _ = writeln!(out, "switchboard_proposed_commands_total{{group=\"{SHARD_GROUP}\"}} {commands}");
        let _ = writeln!(out, "# HELP switchboard_proposed_entries_total Log entries those commands were written in (group commit puts several in one).\n# TYPE switchboard_proposed_entries_total counter");
        let _ = writeln!(out, "switchboard_proposed_entries_total{{group=\"{SHARD_GROUP}\"}} {entries}");
        let counts = &self.proposer.counts;
        let _ = writeln!(out, "# HELP switchboard_forwarded_entries_total Entries this node sent to the group's leader on another node (attempts).\n# TYPE switchboard_forwarded_entries_total counter");
        let _ = writeln!(out, "switchboard_forwarded_entries_total{{group=\"{SHARD_GROUP}\"}} {}", counts.forwarded.load(std::sync::atomic::Ordering::Relaxed));
        let _ = writeln!(out, "# HELP switchboard_forwarded_unknown_total Forwarded entries whose answer was lost (the leader failed): their commands were answered unavailable.\n# TYPE switchboard_forwarded_unknown_total counter");
        let _ = writeln!(out, "switchboard_forwarded_unknown_total{{group=\"{SHARD_GROUP}\"}} {}", counts.forward_unknown.load(std::sync::atomic::Ordering::Relaxed));
        quiet_metrics(&mut out, &self.router, [SHARD_GROUP]);
        routing_metrics(&mut out, &self.shard);
        let state = self.shard.read();
        let _ = writeln!(out, "# HELP switchboard_routing_rules Routing rules version in force in the shard.\n# TYPE switchboard_routing_rules gauge");
        let _ = writeln!(out, "switchboard_routing_rules{{group=\"{SHARD_GROUP}\"}} {}", state.rules);
        out
    }
}

/// The outbox's figures: entries not sent yet (`pending`) and this process's provider
/// calls by outcome.
pub(crate) fn outbox_metrics(out: &mut String, pending: usize) {
    let outbox = &crate::outbox::METRICS;
    let _ = writeln!(out, "# HELP switchboard_outbox_entries Outbox entries not sent yet (pending or being sent).\n# TYPE switchboard_outbox_entries gauge");
    let _ = writeln!(out, "switchboard_outbox_entries {pending}");
    let _ = writeln!(out, "# HELP switchboard_outbox_attempts_total Outcomes of this node's provider calls, by outcome.\n# TYPE switchboard_outbox_attempts_total counter");
    for (outcome, counter) in [("sent", &outbox.sent), ("retry", &outbox.retried), ("failed", &outbox.failed), ("unknown", &outbox.unknown)] {
        let _ = writeln!(out, "switchboard_outbox_attempts_total{{outcome=\"{outcome}\"}} {}", counter.load(std::sync::atomic::Ordering::Relaxed));
    }
}

/// Routing state's figures (queues, SLA, operators by presence, offers), from `shard`:
/// the one group of a node, or a split node's routing shard.
pub(crate) fn routing_metrics(out: &mut String, shard: &Shard) {
    let state = shard.read();
    let queued: usize = state.groups.values().map(|g| g.queue.len()).sum();
    let _ = writeln!(out, "# HELP switchboard_conversations_queued Conversations waiting in skill group queues.\n# TYPE switchboard_conversations_queued gauge");
    let _ = writeln!(out, "switchboard_conversations_queued {queued}");
    let _ = writeln!(out, "# HELP switchboard_conversations_open Open conversations (queued or assigned): the ones held in memory; closed ones are read from disk.\n# TYPE switchboard_conversations_open gauge");
    let _ = writeln!(out, "switchboard_conversations_open {}", state.conversations.len());
    let _ = writeln!(out, "# HELP switchboard_actors_active Entity actors running (conversations, operators, skill groups followed or with timers); idle ones stop.\n# TYPE switchboard_actors_active gauge");
    let _ = writeln!(out, "switchboard_actors_active {}", shard.active_actors());
    // Per queue, as supervisors see it: what an SLA alert rule needs.
    let now = now_ms();
    let _ = writeln!(out, "# HELP switchboard_queue_waiting Conversations queued in a skill group (waiting or offered).\n# TYPE switchboard_queue_waiting gauge");
    for g in state.groups.values() {
        let _ = writeln!(out, "switchboard_queue_waiting{{skill_group=\"{}\"}} {}", label(g.config.id.as_str()), g.queue.len());
    }
    let _ = writeln!(out, "# HELP switchboard_queue_longest_wait_seconds Age of the oldest queued conversation of a skill group.\n# TYPE switchboard_queue_longest_wait_seconds gauge");
    let _ = writeln!(out, "# HELP switchboard_queue_over_sla Queued conversations of a skill group waiting longer than its SLA.\n# TYPE switchboard_queue_over_sla gauge");
    for g in state.groups.values() {
        let waits = g.queue.iter().filter_map(|(_, id)| state.conversations.get(id)).map(|c| now.millis_since(c.created_at));
        let (longest, over) = waits.fold((0u64, 0u64), |(l, o), w| (l.max(w), o + u64::from(w > g.config.sla_ms)));
        let id = label(g.config.id.as_str());
        let _ = writeln!(out, "switchboard_queue_longest_wait_seconds{{skill_group=\"{id}\"}} {:.3}", longest as f64 / 1000.0);
        let _ = writeln!(out, "switchboard_queue_over_sla{{skill_group=\"{id}\"}} {over}");
    }
    let _ = writeln!(out, "# HELP switchboard_operators Configured operators by presence.\n# TYPE switchboard_operators gauge");
    for (presence, name) in [(Presence::Online, "online"), (Presence::Away, "away"), (Presence::Break, "break"), (Presence::Offline, "offline")] {
        let n = state.operators.values().filter(|o| o.presence == presence).count();
        let _ = writeln!(out, "switchboard_operators{{presence=\"{name}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP switchboard_offers_pending Offers made and not yet answered.\n# TYPE switchboard_offers_pending gauge");
    let _ = writeln!(out, "switchboard_offers_pending {}", state.offers.len());
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub raft_addr: SocketAddr,
    pub public_addr: SocketAddr,
    pub private_addr: SocketAddr,
    /// SMTP listener for email channels' inbound mail (none: no email comes in).
    pub smtp_addr: Option<SocketAddr>,
    pub client_origins: Vec<String>,
    pub staff_origins: Vec<String>,
    /// Raft entries between snapshots.
    pub snapshot_every: u64,
    /// Between retention purges on the leader.
    pub retention_every: Duration,
    /// How long an attachment file stays before a split node may take it for a stray
    /// (`split::give_back_files`): longer than any upload takes to commit its record.
    pub stray_files_after: Duration,
    /// Between two stray sweeps.
    pub stray_sweep_every: Duration,
    /// How long an online operator may be without a live socket before the leader sets
    /// them away (`MarkAbsent`).
    pub presence_grace: Duration,
    /// What one client address may use.
    pub budgets: Budgets,
    /// Bounds on every connection of both listeners.
    pub connections: ConnectionLimits,
    /// Time to handle one HTTP request, its body included.
    pub request_timeout: Duration,
    /// Server ping interval on every WebSocket.
    pub ping_interval: Duration,
    /// Whether the admin-only chaos drill endpoint is served.
    pub chaos_drills: bool,
    /// The group's first members (id, Raft address), for a node of a cluster made with
    /// `switchboard cluster init`: every one of them starts the group with this same
    /// list (openraft allows that; one leader is elected). Empty: the node starts a
    /// group of its own, with itself only.
    pub members: Vec<(u64, String)>,
    /// Where the cluster CA and this node's certificate are (`node-<id>.pem`). `None`:
    /// a single node keeps them in `<data_dir>/certs`, made on first start.
    pub certs_dir: Option<PathBuf>,
    /// The key that signs tokens, shared by every node of a cluster. `None`:
    /// `<data_dir>/token.key`, made on first start.
    pub token_key: Option<PathBuf>,
    /// A node added to a running cluster: on its first start it asks the `members` to
    /// admit it instead of starting the group with them.
    pub join: bool,
}

pub struct RunningNode {
    pub(crate) groups: Groups,
    pub gateway: Arc<Gateway>,
    pub public_addr: SocketAddr,
    pub private_addr: SocketAddr,
    pub smtp_addr: Option<SocketAddr>,
    /// Held while the node runs: one process per data folder.
    pub(crate) _lock: std::fs::File,
    pub(crate) listeners: Vec<tokio::task::JoinHandle<()>>,
    pub(crate) shutdown: tokio::sync::watch::Sender<bool>,
}

/// Reads the cluster token key, creating it on first start (a single node's own key
/// only: a cluster's nodes must share the one `cluster init` made).
fn token_key(path: &Path, create: bool) -> anyhow::Result<TokenKey> {
    let secret = match std::fs::read(path) {
        Ok(secret) => secret,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
            anyhow::bail!("{} is missing: every node of a cluster needs the token key `switchboard cluster init` made", path.display())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).map_err(|_| anyhow::anyhow!("no randomness"))?;
            // Private from the first byte and whole or absent after a crash.
            switchboard_raft::files::write_private(path, &secret)?;
            secret.to_vec()
        }
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    // A short key (an empty file left by a crash, a truncated copy) is refused rather
    // than replaced: a new key would silently end every session of the cluster, and a
    // short one would make tokens easier to forge.
    TokenKey::new(&secret).with_context(|| {
        format!(
            "{} holds {} bytes, a token key needs at least 32; restore it, or delete it to have a new one made (which ends every staff session)",
            path.display(),
            secret.len()
        )
    })
}

/// How long a member is given to say which routing rules it knows.
const RULES_ASK_TTL: Duration = Duration::from_secs(2);
/// How often a group's leader looks whether the group can adopt this build's rules.
pub(crate) const RULES_CHECK_EVERY: Duration = Duration::from_secs(10);

/// The newest routing rules every member of `raft`'s group (voters and learners) knows:
/// this build's for this node, what each other member answers (`Peers::rules`) for the
/// rest. A group adopts rules only once every replica applying its log can decide with
/// them, so that none refuses the adoption while the others take it (ADR 0002): `None`
/// while a member does not say (it is down, or starting), and a member that answers but
/// predates the question runs a build without these rules, so it holds them back. A new
/// group (`new`: nothing decided in it yet, `ShardState::is_new`: a new cluster's, whose
/// members one build made) needs a majority of its voters only.
pub(crate) async fn rules_every_member_knows(raft: &Raft, peers: &Peers, node_id: u64, new: bool) -> Option<u32> {
    let (members, voters): (Vec<(u64, String)>, Vec<u64>) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        (membership.nodes().map(|(id, node)| (*id, node.addr.clone())).collect(), membership.voter_ids().collect())
    };
    let others = members.into_iter().filter(|(id, _)| *id != node_id);
    let answers = futures::future::join_all(others.map(|(id, addr)| async move { (id, peers.rules(&addr, RULES_ASK_TTL).await) })).await;
    let mut known = switchboard_actors::core::RULES_VERSION;
    let mut voters_heard = usize::from(voters.contains(&node_id));
    for (id, answer) in answers {
        match answer {
            Ok(Some(rules)) => {
                known = known.min(rules);
                voters_heard += usize::from(voters.contains(&id));
            }
            // It answered, with a build from before the question.
            Ok(None) => {
                tracing::debug!(member = id, "a member runs a build that does not say which routing rules it knows");
                return Some(0);
            }
            Err(e) if new => tracing::debug!(member = id, error = %e, "a member of a new group did not say which routing rules it knows"),
            Err(e) => {
                tracing::debug!(member = id, error = %e, "a member did not say which routing rules it knows");
                return None;
            }
        }
    }
    (voters_heard * 2 > voters.len()).then_some(known)
}

/// A group's routing rules and whether it is new (`ShardState::is_new`).
pub(crate) fn rules_of(shard: &Shard) -> (u32, bool) {
    let state = shard.read();
    (state.rules, state.is_new())
}

/// What a look at a group's routing rules found ([`adopt_known_rules`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RulesLook {
    /// The group decides with this build's rules.
    Current,
    /// It adopted newer rules, or a member does not know newer ones yet: it decides with
    /// these.
    Held(u32),
    /// A member did not say which rules it knows: asked again later.
    Unknown,
    /// This node does not lead the group: its leader looks (it knows the members as
    /// they are now; a follower's view of them may lag).
    NotLeader,
}

/// Has the group adopt the newest routing rules every member knows, when they are newer
/// than those it decides with (`state` gives its rules and whether it is new, `cap` the
/// most it may adopt now, `submit` proposes the `AdoptRules`). Only its leader looks,
/// except in a new group, whose members start together.
pub(crate) async fn adopt_known_rules<F, Fut>(raft: &Raft, peers: &Peers, node_id: u64, state: impl Fn() -> (u32, bool), cap: u32, submit: F) -> Result<RulesLook, switchboard_actors::Error>
where
    F: Fn(Command) -> Fut,
    Fut: std::future::Future<Output = Result<Reply, switchboard_actors::Error>>,
{
    let (current, new) = state();
    if current >= switchboard_actors::core::RULES_VERSION {
        return Ok(RulesLook::Current);
    }
    if !new && raft.metrics().borrow().current_leader != Some(node_id) {
        return Ok(RulesLook::NotLeader);
    }
    let Some(known) = rules_every_member_knows(raft, peers, node_id, new).await else { return Ok(RulesLook::Unknown) };
    let target = known.min(cap);
    if target > current {
        submit(Command::AdoptRules { version: target }).await?;
        // A command forwarded to the leader is answered before this node's copy applies
        // it: what is reported is what this copy decides with.
        for _ in 0..40 {
            if state().0 >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (current, _) = state();
    Ok(if current >= switchboard_actors::core::RULES_VERSION { RulesLook::Current } else { RulesLook::Held(current) })
}

/// How long a node's start waits for its groups' rules ([`adopt_rules_at_start`]):
/// every group it starts shares them.
#[derive(Clone, Copy)]
pub(crate) struct RulesDeadlines {
    /// For commits that did not go through, and a new group's members to answer.
    adopt_until: tokio::time::Instant,
    /// For a group to have a leader.
    leader_until: tokio::time::Instant,
}

impl RulesDeadlines {
    pub(crate) fn from_now() -> Self {
        let now = tokio::time::Instant::now();
        RulesDeadlines { adopt_until: now + Duration::from_secs(60), leader_until: now + Duration::from_secs(10) }
    }
}

/// A group's rules at a node's start: adopted here when this node leads it (or it is new)
/// and every member knows newer ones ([`adopt_known_rules`]). Idempotent: an outcome
/// lost to a leader change at start (members start together and may elect twice) is
/// asked again for up to a minute, as is a new group's member that has not said which
/// rules it knows (it may be starting too); a group with no leader yet is looked at
/// again for up to 10 s (this node may become it). Otherwise the group's leader looks
/// again every [`RULES_CHECK_EVERY`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn adopt_rules_at_start<F, Fut>(
    raft: &Raft,
    peers: &Peers,
    node_id: u64,
    group: u64,
    until: RulesDeadlines,
    state: impl Fn() -> (u32, bool),
    cap: impl Fn() -> u32,
    submit: F,
) -> anyhow::Result<()>
where
    F: Fn(Command) -> Fut,
    Fut: std::future::Future<Output = Result<Reply, switchboard_actors::Error>>,
{
    let newest = switchboard_actors::core::RULES_VERSION;
    let RulesDeadlines { adopt_until, leader_until } = until;
    loop {
        match adopt_known_rules(raft, peers, node_id, &state, cap(), &submit).await {
            Ok(RulesLook::Current) => return Ok(()),
            Ok(RulesLook::Held(rules)) => {
                info!(group, rules, newest, "a member runs a build without the newest routing rules: the group decides with the newest every member knows until each has them");
                return Ok(());
            }
            Ok(RulesLook::NotLeader) if raft.metrics().borrow().current_leader.is_none() && tokio::time::Instant::now() < leader_until => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(RulesLook::NotLeader) => return Ok(()),
            Ok(RulesLook::Unknown) if state().1 && tokio::time::Instant::now() < adopt_until => tokio::time::sleep(Duration::from_millis(300)).await,
            Ok(RulesLook::Unknown) => {
                tracing::warn!(group, "a member has not said which routing rules it knows; the newest are adopted once every member says it has them");
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() < adopt_until => {
                info!(group, error = %e, "adopting the routing rules did not go through; asking again");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => anyhow::bail!("group {group}: adopt routing rules {newest}: {e}"),
        }
    }
}

pub async fn start(options: NodeOptions) -> anyhow::Result<RunningNode> {
    crate::cutover::refuse_unfinished(&options.data_dir)?;
    std::fs::create_dir_all(&options.data_dir).with_context(|| format!("create {}", options.data_dir.display()))?;
    let name = format!("node-{}", options.node_id);
    let identity = match &options.certs_dir {
        Some(dir) => tls::existing_member(dir, &name)?,
        None => tls::ensure_member(&options.data_dir.join("certs"), &name, &[])?,
    };
    if !options.members.is_empty() && !options.members.iter().any(|(id, _)| *id == options.node_id) {
        anyhow::bail!("node {} is not among the cluster's members ({:?})", options.node_id, options.members.iter().map(|(id, _)| id).collect::<Vec<_>>());
    }
    let endpoint = tls::endpoint(&identity, options.raft_addr).context("bind raft endpoint")?;
    let raft_addr = endpoint.local_addr()?;

std::fs::create_dir_all(&options.data_dir)?;
    let lock_path = options.data_dir.join("switchboard.lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).with_context(|| format!("open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!("another switchboard is using the data folder {}", options.data_dir.display());
    }
    // Again under the lock: a cut-over may have swapped the folder since the first look.
    crate::cutover::refuse_unfinished(&options.data_dir)?;
    crate::split::check_layout(&options.data_dir, None)?;
    // A new member checks the cluster's layout before anything is written here.
    if options.join && !options.data_dir.join("records").exists() {
        refuse_another_layout(&Peers::new(endpoint.clone()), &options, None).await?;
    }
    let sockets = bind_edge(&options).await?;
    let db = switchboard_raft::store::open_keyspace(&options.data_dir.join("records"), &[SHARD_GROUP]).context("open the record store")?;
    let log_dir = options.data_dir.join("log").join(format!("g{SHARD_GROUP}"));
    switchboard_raft::store::migrate_sled(&options.data_dir.join("sled"), &db, SHARD_GROUP, &log_dir).context("move the data folder out of sled")?;
    let shard = Arc::new(Shard::new());
    let blobs = switchboard_gateway::attachments::BlobStore::open(options.data_dir.join("attachments"))?;
    remove_files_with_their_conversations(&shard, &files_gone(blobs.clone()));
    let (log, sm) = open_group(&db, SHARD_GROUP, Arc::new(ShardMachine { shard: shard.clone() }), &options.data_dir.join("snapshots"), &log_dir)?;
    let peers = Peers::new(endpoint.clone());
    let router = Router::default();
    // Other members ask it before their group adopts newer routing rules.
    router.set_rules(switchboard_actors::core::RULES_VERSION);
    let network = NetworkFactory::with_peers(peers.clone(), SHARD_GROUP).quiet_when(router.quiet_mark(SHARD_GROUP));
    let committed = log.committed_index();
    let raft = Raft::new(options.node_id, member_config(options.snapshot_every, options.node_id, SHARD_GROUP)?, network, log, sm).await?;
    router.set_peers(peers.clone());
    router.add(SHARD_GROUP, raft.clone());
    // The one group's members are the cluster's nodes, and its voters change only when
    // a node leaves: a change finished by a later leader drops the node it leaves out
    // (see `drop_left_out_voters`).
    router.drop_left_out_voters(SHARD_GROUP, true);
    router.check_writes(SHARD_GROUP, Arc::new(restamp_forwarded));
    let rpc_server = serve(endpoint.clone(), router.clone());
    hold_elections_after_restart(&raft, &router, SHARD_GROUP).await?;

    let proposer = RaftProposer::start(SHARD_GROUP, raft.clone(), options.node_id, Forwarder::new(peers.clone()), router.gate(SHARD_GROUP));
    let supervisor = ShardSupervisor::start(SupervisorArgs {
        shard: shard.clone(),
        proposer: Arc::new(proposer.clone()),
        leader: false,
    })
    .await?;

    // The first member starts the group; the others give it a moment to reach them
    // (fewer split votes), then start it themselves in case it is not coming: the same
    // member list on every node makes that safe.
    let first = options.members.iter().map(|(id, _)| *id).min();
    if options.join {
        // Not yet a member, or let in as a learner and never made a voter (a start cut
        // short while it caught up, or a refusal then): it asks again at each start.
        let learner_only = {
            let m = raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            membership.get_joint_config().len() == 1 && membership.get_node(&options.node_id).is_some() && !membership.voter_ids().any(|v| v == options.node_id)
        };
        if !raft.is_initialized().await? || learner_only {
            // The address the members were told to dial (a node bound to 0.0.0.0 is not
            // reachable at its local address).
            let own = options.members.iter().find(|(id, _)| *id == options.node_id).map(|(_, a)| a.clone()).unwrap_or_else(|| raft_addr.to_string());
            let others: Vec<String> = options.members.iter().filter(|(id, _)| *id != options.node_id).map(|(_, addr)| addr.clone()).collect();
            let change = switchboard_raft::members::Change::Join { id: options.node_id, addr: own };
            join_cluster(&peers, options.node_id, &others, SHARD_GROUP, change, learner_only).await?;
        }
    } else if first.is_some_and(|first| first != options.node_id) {
        for _ in 0..20 {
            if raft.is_initialized().await? {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if !options.join && !raft.is_initialized().await? {
        let members: BTreeMap<u64, Node> = if options.members.is_empty() {
            BTreeMap::from([(options.node_id, Node { addr: raft_addr.to_string() })])
        } else {
            options.members.iter().map(|(id, addr)| (*id, Node { addr: addr.clone() })).collect()
        };
        match raft.initialize(members).await {
            Ok(()) => {}
            // Another member's vote or entries reached this one first: it is part of
            // the group already.
            Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(e).context("initialize raft group"),
        }
    }
    wait_until_served(&raft, options.members.len() > 1).await?;

    // Timers and activation follow leadership; every change of leader is counted.
    let leader_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let leadership = {
        let mut metrics = raft.metrics();
        let supervisor = supervisor.clone();
        let node_id = options.node_id;
        let leader_changes = leader_changes.clone();
        tokio::spawn(async move {
            let mut was_leader = None;
            let mut last_leader = metrics.borrow().current_leader;
            loop {
                let (is_leader, leader) = {
                    let m = metrics.borrow();
                    (m.current_leader == Some(node_id), m.current_leader)
                };
                if leader != last_leader {
                    leader_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    last_leader = leader;
                }
                if was_leader != Some(is_leader) {
                    let _ = supervisor.cast(SupervisorMsg::Leadership(is_leader));
                    was_leader = Some(is_leader);
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    let backend = Arc::new(NodeBackend { node_id: options.node_id, raft: raft.clone(), proposer: proposer.clone(), shard: shard.clone(), supervisor, leader_changes, committed, peers: peers.clone(), copying: Arc::new(tokio::sync::Semaphore::new(FILES_COPIED_AT_ONCE)), router: router.clone(), barriers: BarrierRounds::default() });
    // The log before this replays under the rules it was decided with; from here on
    // the newest rules every member knows decide (this build's once every member runs
    // it; the leader looks again every `RULES_CHECK_EVERY` until then). Adopting is
    // idempotent: an outcome lost to a leader change at start (members start together and
    // may elect twice) is simply asked again, for up to a minute, as is a member that has
    // not said which rules it knows (it may be starting too).
    adopt_rules_at_start(&raft, &peers, options.node_id, SHARD_GROUP, RulesDeadlines::from_now(), || rules_of(&shard), || switchboard_actors::core::RULES_VERSION, |command| backend.submit(command)).await?;
    let backend_for_rules = backend.clone();
    let edge = open_edge(&options, sockets, backend, &router, blobs).await?;
    let gateway = edge.gateway.clone();
    report_status(&router, raft.clone(), options.node_id, gateway.clone());
    let Edge { public_addr, private_addr, smtp_addr, mut listeners, shutdown, .. } = edge;
    listeners.extend([
        rpc_server,
        leadership,
        tokio::spawn(adopt_rules_later(raft.clone(), peers.clone(), backend_for_rules, shard.clone(), options.node_id)),
        tokio::spawn(retention_timer(raft.clone(), proposer.clone(), options.node_id, options.retention_every)),
        tokio::spawn(report_operator_sockets(gateway.clone(), options.node_id)),
        tokio::spawn(absence_timer(raft.clone(), proposer.clone(), shard.clone(), options.node_id, options.presence_grace)),
        tokio::spawn(inactivity_timer(raft.clone(), proposer.clone(), shard.clone(), options.node_id)),
        tokio::spawn(crate::outbox::run(raft.clone(), Arc::new(proposer.clone()), shard.clone(), options.node_id, gateway.clone(), 1, peers.clone())),
    ]);
    // Every member holds the one group: its files are looked for on the others.
    let (members_of, node_id) = (raft.clone(), options.node_id);
    let others = move || Some(file_targets(&members_of, node_id).0.into_iter().map(|(addr, _)| addr).collect());
    listeners.push(tokio::spawn(keep_files(shard.clone(), others, peers.clone(), gateway.blobs.clone())));
    // Files whose record never committed give their disk back.
    listeners.push(tokio::spawn(give_back_unnamed_files(shard.clone(), raft.clone(), peers.clone(), gateway.blobs.clone(), options.stray_files_after, options.stray_sweep_every)));
    info!(%public_addr, %private_addr, %raft_addr, ?smtp_addr, "node started");
    Ok(RunningNode { groups: Groups::One { raft, endpoint, db }, gateway, public_addr, private_addr, smtp_addr, _lock: lock, listeners, shutdown })
}

/// What a node serves to the outside: the gateway over this node's groups, its HTTP
/// listeners (public and private), and SMTP when asked for.
pub(crate) struct Edge {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) public_addr: SocketAddr,
    pub(crate) private_addr: SocketAddr,
    pub(crate) smtp_addr: Option<SocketAddr>,
    pub(crate) listeners: Vec<tokio::task::JoinHandle<()>>,
    pub(crate) shutdown: tokio::sync::watch::Sender<bool>,
}

/// The edge's listeners and token key, taken before the node joins or starts any group:
/// a port in use or a key that cannot be read stops the node before it is a member
/// (afterwards, the cluster would keep a voter that never serves).
pub(crate) struct EdgeSockets {
    public: TcpListener,
    private: TcpListener,
    smtp: Option<TcpListener>,
    key: TokenKey,
}

pub(crate) async fn bind_edge(options: &NodeOptions) -> anyhow::Result<EdgeSockets> {
    let public = TcpListener::bind(options.public_addr).await.with_context(|| format!("bind public {}", options.public_addr))?;
    let private = TcpListener::bind(options.private_addr).await.with_context(|| format!("bind private {}", options.private_addr))?;
    let smtp = match options.smtp_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("bind SMTP {addr}"))?),
        None => None,
    };
    let key = match &options.token_key {
        Some(path) => token_key(path, false)?,
        None => token_key(&options.data_dir.join("token.key"), true)?,
    };
    Ok(EdgeSockets { public, private, smtp, key })
}

/// Serves a gateway over `backend` on the listeners `bind_edge` took; peers' relayed
/// traffic (standalone gateways) and file copies arrive through `router`.
pub(crate) async fn open_edge(options: &NodeOptions, sockets: EdgeSockets, backend: Arc<dyn Backend>, router: &Router, blobs: switchboard_gateway::attachments::BlobStore) -> anyhow::Result<Edge> {
    let EdgeSockets { public, private, smtp, key } = sockets;
    let public_addr = public.local_addr()?;
    let private_addr = private.local_addr()?;
    let mut client_origins = options.client_origins.clone();
    client_origins.push(format!("http://{public_addr}"));
    let mut staff_origins = options.staff_origins.clone();
    staff_origins.push(format!("http://{private_addr}"));
    let config = GatewayConfig {
        client_origins,
        staff_origins,
        client_limits: Limits::CLIENT,
        operator_limits: Limits::OPERATOR,
        web_channel: "web".into(),
        chaos_drills: options.chaos_drills,
        budgets: options.budgets,
        request_timeout: options.request_timeout,
        ping_interval: options.ping_interval,
    };
    router.set_files(Arc::new(NodeFiles(blobs.clone())));
    let gateway = Gateway::new(backend, key, blobs, config);
    // Gateways relay clients' traffic here over QUIC and poll this member's status.
    router.set_relay(Arc::new(switchboard_gateway::relay::RelayServer::new(
        switchboard_gateway::public_router(gateway.clone()),
        switchboard_gateway::private_router(gateway.clone()),
    )));
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let smtp_addr = match &smtp {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let mut listeners = vec![
        serve_http(public, switchboard_gateway::public_router(gateway.clone()), &gateway, options.connections.clone(), shutdown_rx.clone()),
        serve_http(private, switchboard_gateway::private_router(gateway.clone()), &gateway, options.connections.clone(), shutdown_rx.clone()),
    ];
    if let Some(smtp) = smtp {
        listeners.push(tokio::spawn(switchboard_gateway::smtp::serve(smtp, gateway.clone(), switchboard_gateway::smtp::SmtpLimits::default(), shutdown_rx)));
    }
    Ok(Edge { gateway, public_addr, private_addr, smtp_addr, listeners, shutdown })
}

/// On the leader, proposes `PurgeExpired` as of now every `every`: each deletes up to
/// `records::PURGE_BATCH` expired conversations.
pub(crate) async fn retention_timer(raft: Raft, proposer: RaftProposer, node_id: u64, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if raft.metrics().borrow().current_leader != Some(node_id) {
            continue;
        }
        if let Err(e) = proposer.submit(Command::PurgeExpired { as_of: now_ms() }).await {
            tracing::warn!(error = %e, "retention purge failed; retrying at the next tick");
        }
    }
}

/// Between two reports of this node's operator sockets when nothing changes: a
/// heartbeat well inside `state::SOCKET_LEASE_MS`.
const SOCKETS_HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a change waits for more before it is reported: a page reload (a socket
/// closed, another opened) makes one report, or none.
const SOCKETS_SETTLE: Duration = Duration::from_millis(250);

/// Reports which operators have a live socket on this node (`OperatorsConnected`) when
/// the set changes and every `SOCKETS_HEARTBEAT`, through the gateway (a follower
/// forwards it to the leader).
pub(crate) async fn report_operator_sockets(gateway: Arc<Gateway>, node_id: u64) {
    let mut changed = gateway.operator_sockets.watch();
    let mut last: Option<Vec<OperatorId>> = None;
    let mut heartbeat = tokio::time::interval(SOCKETS_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let beat = tokio::select! {
            _ = heartbeat.tick() => true,
            moved = changed.changed() => {
                if moved.is_err() {
                    return;
                }
                tokio::time::sleep(SOCKETS_SETTLE).await;
                changed.borrow_and_update();
                false
            }
        };
        let operators = gateway.operator_sockets.operators();
        // Nothing to say: no change, and no socket to vouch for on a heartbeat.
        if last.as_ref() == Some(&operators) && (!beat || operators.is_empty()) {
            continue;
        }
        // Once the node has served: a shard of a split node without a quorum makes it
        // not ready, but its operators' sockets are still open, and the routing shard
        // (which may well have its quorum) would set them away without this report.
        if !gateway.was_ready() {
            last = None;
            continue;
        }
        match gateway.submit(Command::OperatorsConnected { node: node_id, operators: operators.clone() }).await {
            Ok(_) => last = Some(operators),
            Err(e) => {
                last = None;
                tracing::debug!(error = %e, "reporting operator sockets failed; retrying at the next heartbeat");
            }
        }
    }
}

/// On the leader, once a second, proposes `MarkAbsent` when an online operator has been
/// without a live socket for `grace` (counted from no earlier than this node began to
/// lead, so a new leader gives every desk the whole grace period to reconnect).
pub(crate) async fn absence_timer(raft: Raft, proposer: RaftProposer, shard: Arc<Shard>, node_id: u64, grace: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let grace_ms = grace.as_millis() as u64;
    let mut leading_since: Option<switchboard_actors::model::Timestamp> = None;
    loop {
        tick.tick().await;
        if raft.metrics().borrow().current_leader != Some(node_id) {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(now_ms);
        if shard.read().absent_operators(now_ms(), grace_ms, since).is_empty() {
            continue;
        }
        if let Err(e) = proposer.submit(Command::MarkAbsent { grace_ms, since }).await {
            tracing::warn!(error = %e, "setting absent operators away failed; retrying in a second");
        }
    }
}

/// On the leader, once a second, proposes `SweepInactive` when a silent customer is due
/// a reminder or a closing (their group's inactivity times, rules 5).
pub(crate) async fn inactivity_timer(raft: Raft, proposer: RaftProposer, shard: Arc<Shard>, node_id: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The metrics' borrow ends with this statement: it is a lock, never held while
        // the shard's is taken.
        let leading = raft.metrics().borrow().current_leader == Some(node_id);
        if !leading || shard.read().inactive(now_ms()).is_empty() {
            continue;
        }
        if let Err(e) = proposer.submit(Command::SweepInactive).await {
            tracing::warn!(error = %e, "the inactivity sweep failed; retrying at the next tick");
        }
    }
}

fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    gateway: &Gateway,
    limits: ConnectionLimits,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(switchboard_gateway::listener::serve(listener, router, limits, gateway.metrics.clone(), stop))
}

/// Asks the `others` (QUIC addresses of running members), in turn, to make `change` in
/// `group` (admit this node), until one of them, or the leader it names, has.
/// Asks the members at `others` to admit this node to `group` until one does. `member`:
/// this node was let in before (a learner never made a voter): then, and once a refusal
/// said it stays a learner, a member whose view of the group no longer names it means
/// it was removed meanwhile, and it stops instead of coming back (ids are never reused).
/// Refuses to join a cluster laid out otherwise than this node (`shards`: its number of
/// conversation shards, `None` for a node of one group), as the first member to answer
/// says: a node of one group would become a voter of a split cluster's metadata group
/// and apply its log as a state it is not, and a split node of another count would place
/// conversations where the others do not. A member that answers no shards may be a
/// split node still starting: for a split joiner, only a count that differs refuses.
pub(crate) async fn refuse_another_layout(peers: &Peers, options: &NodeOptions, shards: Option<u64>) -> anyhow::Result<()> {
    for (_, addr) in options.members.iter().filter(|(id, _)| *id != options.node_id) {
        let Ok(theirs) = peers.shards(addr, Duration::from_secs(2)).await else { continue };
        let theirs = theirs.len() as u64;
        match shards {
            None if theirs > 0 => anyhow::bail!(
                "the cluster at {addr} is split into {theirs} conversation shards (ADR 0006): add `shards = {theirs}` to this node's file, then start it again"
            ),
            Some(mine) if theirs > 0 && theirs != mine => anyhow::bail!(
                "the cluster at {addr} is split into {theirs} conversation shards, this node's file says `shards = {mine}`: set `shards = {theirs}`, then start it again"
            ),
            _ => return Ok(()),
        }
    }
    Ok(())
}

pub(crate) async fn join_cluster(peers: &Peers, node_id: u64, others: &[String], group: u64, change: switchboard_raft::members::Change, member: bool) -> anyhow::Result<()> {
    use switchboard_raft::members::Answer;
    if others.is_empty() {
        anyhow::bail!("`join = true` needs the running members in `members`");
    }
    let started = std::time::Instant::now();
    let mut next = 0;
    let mut target = others[0].clone();
    let mut member = member;
    loop {
        if member {
            // Removed meanwhile? Only when the leader and another member both no longer
            // name this node: a member that lags may still name it, and a leader cut off
            // from the others (deposed, not knowing it yet) may never have.
            let names_me = |s: &switchboard_raft::network::MemberStatus| s.members.iter().any(|(id, _)| *id == node_id);
            let asked = peers.status(&target, Duration::from_secs(2)).await.ok();
            let leader_addr = asked.as_ref().and_then(|s| s.leader.and_then(|l| s.members.iter().find(|(id, _)| *id == l).map(|(_, a)| a.clone())));
            let other = match &leader_addr {
                Some(addr) if *addr != target => asked.clone(),
                _ => match others.iter().find(|a| **a != target) {
                    Some(addr) => peers.status(addr, Duration::from_secs(2)).await.ok(),
                    None => None,
                },
            };
            let leader = match &leader_addr {
                Some(addr) if *addr != target => peers.status(addr, Duration::from_secs(2)).await.ok(),
                _ => asked.clone(),
            };
            if let (Some(leader), Some(other)) = (leader.filter(|s| s.leader == Some(s.node)), other.filter(|s| s.node != node_id)) {
                if leader.node != other.node && !names_me(&leader) && !names_me(&other) {
                    anyhow::bail!(
                        "node {node_id} is no longer a member of the cluster (neither its leader, node {}, nor node {} names it: it was removed, or its admission was never committed), and does not join it again on its own; `switchboard cluster add-node` lays out a node to add, with a new id",
                        leader.node,
                        other.node
                    );
                }
            }
        }
        // Admission waits for this node to catch up with the group's log: minutes for a
        // large group, so the answer may take that long.
        match peers.change_members(&target, group, change.clone(), Duration::from_secs(600)).await {
            Ok(Answer::Done) => {
                info!(node = node_id, "admitted to the cluster");
                return Ok(());
            }
            // Another node's address under this id will not change by asking again.
            Ok(Answer::Refused(why)) if why.contains("is already a member at") => anyhow::bail!("the cluster refused to admit node {node_id}: {why}"),
            // Nor will a removed node be admitted again.
            Ok(Answer::Refused(why)) if why.contains(switchboard_raft::members::REMOVED_FROM_CLUSTER) => anyhow::bail!("the cluster refused to admit node {node_id}: {why}"),
            // Nor will this node's certificate name another node by asking again.
            Ok(Answer::Refused(why)) if why.contains(switchboard_raft::network::NOT_ISSUED_TO) => {
                anyhow::bail!("the cluster refused to admit node {node_id}: {why}; give the node the certificate made for its id (`node-{node_id}`)")
            }
            // Not caught up in time, another change under way: asked again, of the next
            // member (one whose own Raft refuses everything is not asked forever).
            Ok(Answer::Refused(why)) => {
                info!(node = node_id, %why, "the cluster did not admit this node yet; asking again");
                member |= why.ends_with(switchboard_raft::members::STAYS_A_LEARNER);
                next = (next + 1) % others.len();
                target = others[next].clone();
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Ok(Answer::NotLeader(Some((_, leader)))) => {
                target = leader.addr;
                tokio::time::sleep(switchboard_raft::members::FOLLOW_PAUSE).await;
                continue;
            }
            Ok(Answer::NotLeader(None)) => {}
            Err(e) => info!(member = %target, error = %e, waited_s = started.elapsed().as_secs(), "asking to join the cluster"),
        }
        next = (next + 1) % others.len();
        target = others[next].clone();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the group has a leader (this node or another) and this node applied what
/// its log held at start, so reads here see at least what it had before. A member of a
/// cluster waits as long as it takes a quorum to come up, saying so every 10 s.
async fn wait_until_served(raft: &Raft, clustered: bool) -> anyhow::Result<()> {
    let mut metrics = raft.metrics();
    let started = std::time::Instant::now();
    loop {
        let wait = metrics.wait_for(|m| m.current_leader.is_some() && m.last_applied.map(|l| l.index) >= m.last_log_index);
        let waited = tokio::time::timeout(Duration::from_secs(10), wait).await.map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => anyhow::bail!("raft stopped before the group had a leader"),
            Err(_) if clustered => {
                info!(waited_s = started.elapsed().as_secs(), "waiting for a quorum of the cluster's members to elect a leader");
            }
            // A lone node that leads but is still applying what its log held goes on
            // (a long backlog takes its time), saying how far it is.
            Err(_) if metrics.borrow().current_leader.is_some() => {
                let m = metrics.borrow().clone();
                info!(applied = m.last_applied.map_or(0, |l| l.index), of = m.last_log_index.unwrap_or(0), "applying the log before serving");
            }
            Err(_) if started.elapsed() >= Duration::from_secs(30) => anyhow::bail!("this node did not become leader within 30 s"),
            Err(_) => {}
        }
    }
}

/// The Raft groups a running node hosts.
pub(crate) enum Groups {
    /// One group that plays the whole (ADR 0007).
    One { raft: Raft, endpoint: quinn::Endpoint, db: fjall::Keyspace },
    /// The split of ADR 0006: the metadata group, the routing shard, conversation shards.
    Split(Arc<crate::groups::SplitNode>),
}

impl RunningNode {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        // WebSockets are upgraded connections graceful shutdown does not wait for.
        for handle in &self.listeners {
            handle.abort();
        }
        match self.groups {
            Groups::One { raft, endpoint, db } => {
                let _ = raft.shutdown().await;
                endpoint.close(0u32.into(), b"shutdown");
                let _ = tokio::task::spawn_blocking(move || db.persist(fjall::PersistMode::SyncAll)).await;
            }
            Groups::Split(node) => {
                if let Err(e) = node.shutdown().await {
                    tracing::warn!(error = %e, "the groups did not stop cleanly");
                }
            }
        }
    }

    /// Commits a command to the group that decides it (used by the demo loader and the
    /// first start's admin).
    pub async fn submit(&self, command: Command) -> ApplyResult {
        self.gateway.backend.submit(command).await
    }

    /// The shard the directory (users, groups, channels) is read from.
    pub fn directory(&self) -> Arc<Shard> {
        self.gateway.backend.directory_shard()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_actors::model::{ChannelId, Timestamp, Visitor};

    fn start() -> Command {
        Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: Visitor::default() }
    }

    /// An entry that adopts rules this build does not know is not applied (the node
    /// stops on it) nor forwarded to a leader: refusing it while the other replicas take
    /// it would leave this one deciding differently from them.
    #[test]
    fn rules_newer_than_the_build_s_are_an_entry_it_cannot_read() {
        let newest = switchboard_actors::core::RULES_VERSION;
        let known = encode(&Envelope::new(Timestamp(5), Command::AdoptRules { version: newest })).unwrap();
        assert!(decode_entry(3, &known).is_ok());
        let newer = vec![Envelope::new(Timestamp(5), start()), Envelope::new(Timestamp(5), Command::AdoptRules { version: newest + 1 })];
        let batch = [&[BATCH_TAG][..], &encode(&newer).unwrap()].concat();
        let refused = decode_entry(4, &batch).expect_err("not readable");
        assert!(refused.contains(&format!("adopts routing rules {}", newest + 1)), "{refused}");
        assert!(restamp_forwarded(batch).is_err(), "a leader does not append it either");
    }

    #[test]
    fn entries_of_one_command_and_of_several_decode() {
        let one = Envelope::new(Timestamp(5), start());
        let bytes = encode(&one).unwrap();
        assert_ne!(bytes[0], BATCH_TAG, "a single entry can never look like a batch");
        assert_eq!(decode_entry(1, &bytes), Ok(EntryBody::One(one.clone())));
        let many = vec![one.clone(), Envelope::new(Timestamp(5), Command::AdoptRules { version: 1 })];
        let batch = [&[BATCH_TAG][..], &encode(&many).unwrap()].concat();
        assert_eq!(decode_entry(2, &batch), Ok(EntryBody::Many(many.clone())));
        // The proposer frames envelopes encoded one by one into the very same bytes.
        let one_by_one: Vec<Vec<u8>> = many.iter().map(|e| encode(e).unwrap()).collect();
        assert_eq!(batch_entry(&one_by_one).unwrap(), batch);
        let long: Vec<Envelope> = (0..300).map(|_| one.clone()).collect();
        let framed = batch_entry(&long.iter().map(|e| encode(e).unwrap()).collect::<Vec<_>>()).unwrap();
        assert_eq!(framed, [&[BATCH_TAG][..], &encode(&long).unwrap()].concat(), "also past a one-byte length");
    }

    #[test]
    fn a_forwarded_entry_takes_the_leaders_clock_and_an_unreadable_one_is_refused() {
        let far_ahead = Timestamp(u64::MAX / 2);
        let one = encode(&Envelope::new(far_ahead, start())).unwrap();
        let restamped = restamp_forwarded(one).unwrap();
        let Ok(EntryBody::One(envelope)) = decode_entry(1, &restamped) else { panic!("not one envelope") };
        assert!(envelope.at < far_ahead, "the follower's clock is replaced by the leader's");
        assert_eq!(envelope.command, start());
        let many = vec![Envelope::new(far_ahead, start()), Envelope::new(far_ahead, Command::AdoptRules { version: 1 })];
        let batch = [&[BATCH_TAG][..], &encode(&many).unwrap()].concat();
        let Ok(EntryBody::Many(restamped)) = decode_entry(2, &restamp_forwarded(batch).unwrap()) else { panic!("not a batch") };
        assert_eq!(restamped.len(), 2);
        assert!(restamped.iter().all(|e| e.at < far_ahead && e.at == restamped[0].at));
        assert!(restamp_forwarded(vec![0xFF, 0x00, 0x13]).unwrap_err().contains("cannot be decoded"));
    }

    #[test]
    fn an_entry_this_build_cannot_read_is_named_not_skipped() {
        let garbage = decode_entry(7, &[0xFF, 0x00, 0x13]).unwrap_err();
        assert!(garbage.starts_with("log entry 7 cannot be decoded by this build"), "{garbage}");
        let newer = Envelope { v: Envelope::VERSION + 1, at: Timestamp(1), command: start() };
        let why = decode_entry(8, &encode(&newer).unwrap()).unwrap_err();
        assert_eq!(why, format!("log entry 8 has format version {}, this build reads version {}", Envelope::VERSION + 1, Envelope::VERSION));
        let in_batch = [&[BATCH_TAG][..], &encode(&vec![Envelope::new(Timestamp(1), start()), newer]).unwrap()].concat();
        assert!(decode_entry(9, &in_batch).unwrap_err().contains("format version"));
    }
}
