//! Reads of a conversation shard this node does not hold, asked of a node that does
//! (ADR 0012, items 2 and 3).
//!
//! A member answers questions about its applied state ([`MemberReads`], served on the
//! node's QUIC endpoint through `switchboard_raft::network::GroupReads`) and tells a
//! peer each time a stream moves: for a watch of format [`WATCH_INDEXED`] (2), with the
//! log index whose records it had written then; for one of [`FORMAT`] (1, what builds
//! before asked), with its counter of moves. [`RemoteShard`] is the asking side: the
//! gateway's [`ShardReads`] over the network, and wake-ups that feed the same watch a
//! local subscription gives. It asks for format 2, and for 1 from a member that does
//! not understand 2.
//!
//! Format: a question is one version byte ([`FORMAT`]) and the bincode (positional) of
//! a [`Query`]; or ([`FORMAT_AT_LEAST`]) the byte 2, the log index the member must have
//! applied before it answers (`u64`, big-endian), then the bincode `Query`. Its answer
//! is the bincode of `Result<T, switchboard_actors::Error>`, where `T` is what the same
//! read of a local replica returns. New questions are added as variants at the end of
//! [`Query`]; a change of an existing one takes a new format.
//!
//! Read-your-writes: a write this node forwarded for a group it does not hold is
//! answered once the leader applied it, not every holder. The highest log index such a
//! write got (per group, [`Floor`]) goes with every later read of the group, and a
//! holder that has not applied that far waits for it (at most [`FLOOR_WAIT`]) before it
//! answers; one still behind then says so and the next holder is asked. The index the
//! last wake-up named is a floor the same way: the page a socket reads because a
//! member's stream moved comes from a member that applied what moved it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use switchboard_actors::mail::GroupId;
use switchboard_actors::model::{Attachment, AttachmentId, ChannelId, ConversationId, OperatorId};
use switchboard_actors::shard::{StreamKey, Wakeups};
use switchboard_actors::state::{Conversation, Delivery, FeedEntry, HistoryEntry};
use switchboard_actors::Error;
use switchboard_gateway::reads::Read;
use switchboard_gateway::ShardReads;
use switchboard_raft::network::{GroupReads, Peers};

use crate::groups::HostedGroup;

/// The version of the questions' encoding.
const FORMAT: u8 = 1;
/// The format of a question that carries the log index to have applied first.
const FORMAT_AT_LEAST: u8 = 2;
/// The format of a watch whose wake-ups name the log index the member had written (a
/// watch of [`FORMAT`] gets a counter of moves, which says nothing of the log).
const WATCH_INDEXED: u8 = 2;
/// How long a holder waits to have applied a question's log index before it answers
/// that it is behind.
const FLOOR_WAIT: Duration = Duration::from_millis(1000);

/// The highest log index a write this node forwarded to a group it does not hold got:
/// its later reads of the group ask holders to have applied that far.
pub(crate) type Floor = Arc<std::sync::atomic::AtomicU64>;

/// How recently a holder must have answered this node to be asked before the others.
const RECENTLY: Duration = Duration::from_secs(3);

/// Questions this node asked holders of groups it does not hold (each try counts),
/// those that went to another holder after the first did not answer, and the streams
/// it follows on holders now: on `/metrics`.
pub(crate) static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub(crate) static READ_FAILOVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub(crate) static WATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a stream followed on a holder while it lives.
struct Following;

impl Following {
    fn start() -> Following {
        WATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Following
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        WATCHES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long one member has to answer a question before the next is asked.
const READ_TTL: Duration = Duration::from_secs(2);

/// How long a member waits to catch up with its group's leader before it answers a
/// question asked with `Query::Barrier`.
/// Under [`READ_TTL`], so that the asker hears the member's answer (reads do not count
/// towards calling a peer silent: a barrier may take this long).
const BARRIER_PATIENCE: Duration = Duration::from_millis(1500);

/// How long a watch's follower waits before it asks the members again when none took
/// the watch.
const REFOLLOW_PAUSE: Duration = Duration::from_millis(200);

/// A question about a group's applied state: one per [`ShardReads`] method, and the
/// barrier a read that must see every acknowledged write asks first.
#[derive(Debug, Serialize, Deserialize)]
enum Query {
    Conversation(ConversationId),
    OpenConversation(ConversationId),
    History { id: ConversationId, after: u64, limit: u32 },
    FeedBounds(OperatorId),
    FeedSince { operator: OperatorId, after: u64, limit: u32 },
    ByProviderId { channel: ChannelId, id: String },
    ConversationsOf { visitor: String, limit: u32 },
    HandledBy { operator: OperatorId, before: Option<ConversationId>, limit: u32 },
    DeliveriesOf(ConversationId),
    DeadLetters { limit: u32 },
    Attachment(AttachmentId),
    AttachmentRoom { id: ConversationId, size: u64 },
    InboundSeen { channel: ChannelId, sender: String, key: String },
    /// Waits until the member applied what its leader had committed when asked.
    Barrier,
    /// The group's members, voters and leader as the member sees them (what the
    /// placement of a node that does not hold the group works from).
    View,
    /// Room for `files` more files of `size` bytes in all (after `View`, so that a
    /// member of an earlier build still reads every question it knows).
    AttachmentRoomFor { id: ConversationId, files: u32, size: u64 },
    /// Dead letters after an entry (last, as the one before: a member of an earlier
    /// build reads every question it knows).
    DeadLettersAfter { after: Option<(ConversationId, u64)>, limit: u32 },
}

/// A group's membership as a member sees it: members (voters and learners), voters,
/// and the leader it knows.
pub(crate) type View = (Vec<u64>, Vec<u64>, Option<u64>);

/// The most entries or items one question may ask for: what the largest read of a
/// local replica asks (a conversation's whole history is capped by the core).
const MAX_LIMIT: u32 = 100_000;

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let config = bincode::config::standard().with_limit::<{ switchboard_raft::network::MAX_RPC_BYTES }>();
    bincode::serde::decode_from_slice(bytes, config).map(|(v, _)| v).map_err(|e| e.to_string())
}

fn encode_query(query: &Query) -> Result<Vec<u8>, Error> {
    encode_query_at(query, 0)
}

/// `query` for a member that must have applied log index `at_least` first (0: none).
fn encode_query_at(query: &Query, at_least: u64) -> Result<Vec<u8>, Error> {
    let mut bytes = if at_least == 0 { vec![FORMAT] } else { [&[FORMAT_AT_LEAST][..], &at_least.to_be_bytes()].concat() };
    bytes.extend(encode(query).map_err(|e| Error::Invalid(format!("a read cannot be encoded: {e}")))?);
    Ok(bytes)
}

/// A question and the log index to have applied before answering it (0: none).
fn decode_query(bytes: &[u8]) -> Result<(Query, u64), String> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => Ok((decode(rest)?, 0)),
        Some((&FORMAT_AT_LEAST, rest)) if rest.len() >= 8 => {
            let (index, rest) = rest.split_at(8);
            let mut be = [0u8; 8];
            be.copy_from_slice(index);
            Ok((decode(rest)?, u64::from_be_bytes(be)))
        }
        Some((other, _)) => Err(format!("reads of format {other} are not understood here (this node reads formats {FORMAT} and {FORMAT_AT_LEAST})")),
        None => Err("an empty read".into()),
    }
}

/// Whether this node holds a group now (the metadata group's record, ADR 0012).
pub(crate) type Holds = Arc<dyn Fn(GroupId) -> bool + Send + Sync>;

/// What a member answers: the groups it holds, by id. A group it has a replica of but
/// does not hold (one it left, or never joined) is refused, so a stale copy never answers.
pub(crate) struct MemberReads {
    groups: BTreeMap<GroupId, HostedGroup>,
    peers: Peers,
    holds: Holds,
}

impl MemberReads {
    pub(crate) fn new(groups: BTreeMap<GroupId, HostedGroup>, peers: Peers, holds: Holds) -> MemberReads {
        MemberReads { groups, peers, holds }
    }

    fn held(&self, group: GroupId) -> Option<&HostedGroup> {
        self.groups.get(&group).filter(|_| (self.holds)(group))
    }
}

/// The encoded answer to `query`, read from `group`'s replica here.
async fn answer(group: &HostedGroup, peers: &Peers, query: Query) -> Result<Vec<u8>, String> {
    fn wrap<T: Serialize>(answer: Result<T, Error>) -> Result<Vec<u8>, String> {
        encode(&answer)
    }
    let shard: &dyn ShardReads = group.shard.as_ref();
    let limit = |n: u32| n.min(MAX_LIMIT) as usize;
    match query {
        Query::Conversation(id) => wrap(shard.conversation(id).await),
        Query::OpenConversation(id) => wrap(shard.open_conversation(id).await),
        Query::History { id, after, limit: n } => wrap(shard.history(id, after, limit(n)).await),
        Query::FeedBounds(operator) => wrap(shard.feed_bounds(&operator).await),
        Query::FeedSince { operator, after, limit: n } => wrap(shard.feed_since(&operator, after, limit(n)).await),
        Query::ByProviderId { channel, id } => wrap(shard.by_provider_id(&channel, &id).await),
        Query::ConversationsOf { visitor, limit: n } => wrap(shard.conversations_of(&visitor, limit(n)).await),
        Query::HandledBy { operator, before, limit: n } => wrap(shard.handled_by(&operator, before, limit(n)).await),
        Query::DeliveriesOf(id) => wrap(shard.deliveries_of(id).await),
        Query::DeadLetters { limit: n } => wrap(shard.dead_letters(None, limit(n)).await),
        Query::DeadLettersAfter { after, limit: n } => wrap(shard.dead_letters(after, limit(n)).await),
        Query::Attachment(id) => wrap(shard.attachment(&id).await),
        Query::AttachmentRoom { id, size } => wrap(shard.attachment_room(id, 1, size).await),
        Query::AttachmentRoomFor { id, files, size } => wrap(shard.attachment_room(id, files as usize, size).await),
        Query::InboundSeen { channel, sender, key } => wrap(shard.inbound_seen(&channel, &sender, &key).await),
        Query::View => {
            let m = group.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let view: View = (membership.nodes().map(|(id, _)| *id).collect(), membership.voter_ids().collect(), m.current_leader);
            wrap(Ok(view))
        }
        Query::Barrier => {
            let caught_up = switchboard_raft::network::read_barrier(&group.raft, peers, group.id, BARRIER_PATIENCE).await;
            wrap(caught_up.map_err(|e| Error::Unreachable(format!("this member cannot catch up with group {}'s leader: {e}", group.id))))
        }
    }
}

impl GroupReads for MemberReads {
    fn read(&self, group: u64, query: Vec<u8>) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>> {
        let hosted = self.held(group).cloned();
        let peers = self.peers.clone();
        Box::pin(async move {
            let hosted = hosted.ok_or_else(|| format!("this node does not hold group {group}"))?;
            let (query, at_least) = decode_query(&query)?;
            // A barrier catches up with the leader's commit, which is past any floor.
            if at_least > 0 && !matches!(query, Query::Barrier) {
                hosted.raft.wait(Some(FLOOR_WAIT)).applied_index_at_least(Some(at_least), "a read after a write").await.map_err(|_| format!("this member has not applied group {group} up to index {at_least} yet"))?;
            }
            answer(&hosted, &peers, query).await
        })
    }

    fn watch(&self, group: u64, stream: Vec<u8>) -> futures::future::BoxFuture<'static, Result<Wakeups, String>> {
        let held = self.held(group).map(|g| (g.supervisor.clone(), g.shard.clone()));
        let holds = self.holds.clone();
        Box::pin(async move {
            let (supervisor, shard) = held.ok_or_else(|| format!("this node does not hold group {group}"))?;
            let (key, indexed): (StreamKey, bool) = match stream.split_first() {
                Some((&FORMAT, rest)) => (decode(rest)?, false),
                Some((&WATCH_INDEXED, rest)) => (decode(rest)?, true),
                _ => return Err(format!("watches of another format are not understood here (this node reads formats {FORMAT} and {WATCH_INDEXED})")),
            };
            let local = switchboard_actors::actors::subscribe(&supervisor, key).await.map_err(|e| e.to_string())?;
            Ok(while_held(local, move || holds(group), indexed.then_some(shard)))
        })
    }
}

/// How often a stream followed for a peer, or for this node's own sockets, checks that
/// the node still holds (or still does not hold) its group.
pub(crate) const HOLDING_CHECK: Duration = Duration::from_millis(500);

/// `local`'s wake-ups for as long as `held` says this node holds the group: once it
/// does not (the placement moved the group away, and this replica stops receiving
/// entries), the stream ends, and whoever follows it follows a holder instead.
///
/// With `indexed` (a watch of [`WATCH_INDEXED`]) each wake-up carries the log index
/// whose records this replica had written when the stream moved
/// (`Shard::published_index`): the follower reads the group at that index or later
/// (from whichever member it asks), so the entry that woke it is never missed by a read
/// that went to a member still behind. Without, the local counter of moves.
fn while_held(mut local: Wakeups, held: impl Fn() -> bool + Send + 'static, indexed: Option<Arc<switchboard_actors::shard::Shard>>) -> Wakeups {
    let value = move |local: &mut Wakeups| {
        let counter = *local.borrow_and_update();
        indexed.as_ref().map_or(counter, |shard| shard.published_index())
    };
    let (moved, wakeups) = tokio::sync::watch::channel(value(&mut local));
    tokio::spawn(async move {
        let mut check = tokio::time::interval(HOLDING_CHECK);
        loop {
            tokio::select! {
                changed = local.changed() => {
                    if changed.is_err() || moved.send(value(&mut local)).is_err() {
                        return;
                    }
                }
                _ = check.tick() => if !held() { return },
                _ = moved.closed() => return,
            }
        }
    });
    wakeups
}

/// Where a group's members are: their QUIC addresses, asked each time a member fails
/// (the placement can move them).
pub(crate) type Members = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// A conversation shard this node does not hold, read from its members.
pub(crate) struct RemoteShard {
    group: GroupId,
    peers: Peers,
    members: Members,
    /// The log index every read must see applied (this node's writes, [`Floor`]).
    floor: Floor,
    /// The highest log index a followed member said its stream moved at: every read
    /// must see that applied too, so a wake-up is never answered by a member still
    /// behind the one that sent it.
    seen: Floor,
    /// The member that answered last: asked first, so that a page read after a
    /// wake-up comes from the member whose apply woke it.
    current: Arc<Mutex<Option<String>>>,
}

impl RemoteShard {
    pub(crate) fn new(group: GroupId, peers: Peers, members: Members, floor: Floor) -> RemoteShard {
        RemoteShard { group, peers, members, floor, seen: Floor::default(), current: Arc::new(Mutex::new(None)) }
    }

    /// The members in the order to ask them: the one that answered last first.
    /// Those that answered this node within the last few seconds go before those that
    /// did not (a holder that died is asked last, not first).
    fn order(peers: &Peers, members: &Members, current: &Mutex<Option<String>>) -> Vec<String> {
        let mut all = members();
        if let Some(first) = current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            if let Some(at) = all.iter().position(|a| *a == first) {
                let first = all.remove(at);
                all.insert(0, first);
            }
        }
        // Stable: the one that answered last stays first among those that answer.
        all.sort_by_key(|addr| !peers.answered_within(addr, RECENTLY));
        all
    }

    /// The log index a read must find applied: this node's last write to the group, or
    /// the last wake-up heard from a member, whichever is later.
    pub(crate) fn read_floor(&self) -> u64 {
        self.floor.load(std::sync::atomic::Ordering::Acquire).max(self.seen.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Asks `query` of the members in turn until one answers.
    async fn ask<T: DeserializeOwned>(&self, query: Query) -> Result<T, Error> {
        let bytes = encode_query_at(&query, self.read_floor())?;
        let mut failures = Vec::new();
        for (n, addr) in Self::order(&self.peers, &self.members, &self.current).into_iter().enumerate() {
            if n > 0 {
                READ_FAILOVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut answered = self.peers.read(&addr, self.group, bytes.clone(), READ_TTL).await;
            if answered.as_ref().is_err_and(|e| e.contains(&format!("reads of format {FORMAT_AT_LEAST} are not understood"))) {
                // A member of an older build, during a rolling upgrade: asked without the
                // index (its answer may miss this node's last write, as before).
                answered = self.peers.read(&addr, self.group, encode_query(&query)?, READ_TTL).await;
            }
            match answered {
                Ok(answer) => {
                    let answer = decode::<Result<T, Error>>(&answer).map_err(|e| Error::Unreachable(format!("{addr} answered a read of group {} in a form this node cannot read: {e}", self.group)))?;
                    // A member that cannot serve it now (a barrier on a holder cut off
                    // from its leader): the next one is asked, and only one that answers
                    // becomes the first asked next time.
                    if let Err(Error::Unreachable(e)) = &answer {
                        failures.push(format!("{addr}: {e}"));
                        continue;
                    }
                    *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr.clone());
                    return answer;
                }
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
        }
        if failures.is_empty() {
            return Err(Error::Unreachable(format!("no member of group {} is known", self.group)));
        }
        Err(Error::Unreachable(format!("no member of group {} answered ({})", self.group, failures.join("; "))))
    }

    /// The members this shard is read from, in the order they would be asked.
    pub(crate) fn member_addrs(&self) -> Vec<String> {
        Self::order(&self.peers, &self.members, &self.current)
    }

    /// Asks `query` of member `addr` alone: no other member answers in its place.
    async fn ask_member<T: DeserializeOwned>(&self, addr: &str, query: Query) -> Result<T, Error> {
        let bytes = encode_query_at(&query, self.read_floor())?;
        let answer = self.peers.read(addr, self.group, bytes, READ_TTL).await.map_err(|e| Error::Unreachable(format!("{addr}: {e}")))?;
        decode::<Result<T, Error>>(&answer).map_err(|e| Error::Unreachable(format!("{addr} answered a read of group {} in a form this node cannot read: {e}", self.group)))?
    }

    /// Waits until member `addr` applied every write acknowledged before the call.
    pub(crate) async fn barrier_at(&self, addr: &str) -> Result<(), Error> {
        self.ask_member::<()>(addr, Query::Barrier).await
    }

    /// An attachment's record as member `addr` has it (after [`Self::barrier_at`] on
    /// the same member, every record acknowledged before the barrier).
    pub(crate) async fn attachment_at(&self, addr: &str, id: &AttachmentId) -> Result<Option<Attachment>, Error> {
        self.ask_member(addr, Query::Attachment(id.clone())).await
    }

    /// Waits until the member asked next applied every write acknowledged before the
    /// call (the member runs a read barrier with its leader).
    pub(crate) async fn barrier(&self) -> Result<(), Error> {
        self.ask::<()>(Query::Barrier).await
    }

    /// The group's membership as a member sees it.
    pub(crate) async fn view(&self) -> Result<View, Error> {
        self.ask::<View>(Query::View).await
    }

    /// The group's membership as its leader sees it now: a holder names the leader,
    /// which is then asked itself, and its answer counts only if it still says it
    /// leads. `nodes` are the cluster's nodes and their addresses (the leader may not be
    /// a recorded holder yet). What a node checks before forgetting its copy: a leader
    /// whose membership leaves the node out replicates nothing to it.
    pub(crate) async fn leader_view(&self, nodes: &BTreeMap<u64, String>) -> Result<View, Error> {
        let (_, _, leader) = self.view().await?;
        let leader = leader.ok_or_else(|| Error::Unreachable(format!("group {} has no leader now", self.group)))?;
        let addr = nodes.get(&leader).ok_or_else(|| Error::Unreachable(format!("the leader of group {}, node {leader}, is not a node of the cluster here", self.group)))?;
        let answer = self.peers.read(addr, self.group, encode_query(&Query::View)?, READ_TTL).await.map_err(|e| Error::Unreachable(format!("{addr}: {e}")))?;
        let view = decode::<Result<View, Error>>(&answer).map_err(|e| Error::Unreachable(format!("{addr} answered in a form this node cannot read: {e}")))??;
        if view.2 != Some(leader) {
            return Err(Error::Unreachable(format!("node {leader} no longer leads group {}", self.group)));
        }
        Ok(view)
    }

    /// Wake-ups of stream `key` of this group, from a member: a counter that moves each
    /// time the stream does there. When the member goes away the follower follows
    /// another, and moves the counter once so that a reader pulls what was applied in
    /// between. It stops when every receiver is dropped.
    pub(crate) fn subscribe(&self, key: StreamKey) -> Result<Wakeups, Error> {
        let encoded = encode(&key).map_err(|e| Error::Invalid(format!("a stream key cannot be encoded: {e}")))?;
        let indexed_stream = [&[WATCH_INDEXED][..], &encoded].concat();
        let stream = [&[FORMAT][..], &encoded].concat();
        let (moved, wakeups) = tokio::sync::watch::channel(0u64);
        let (group, peers, members, current, seen) = (self.group, self.peers.clone(), self.members.clone(), self.current.clone(), self.seen.clone());
        let heard = move |at: u64| {
            seen.fetch_max(at, std::sync::atomic::Ordering::AcqRel);
        };
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut bump = |moved: &tokio::sync::watch::Sender<u64>| {
                n += 1;
                moved.send(n).is_ok()
            };
            loop {
                let mut followed = false;
                // A watch that ends at once (a holder about to stop holding) is not
                // followed again without a pause, so a follower never spins.
                let mut ended_at_once = false;
                for addr in Self::order(&peers, &members, &current) {
                    // A member of an earlier build knows only the watch of counters: its
                    // wake-ups then say nothing of the log (no floor is taken from them).
                    let watching = tokio::select! {
                        w = async {
                            match peers.watch(&addr, group, indexed_stream.clone(), READ_TTL).await {
                                Err(e) if e.contains("watches of another format are not understood") => {
                                    peers.watch(&addr, group, stream.clone(), READ_TTL).await.map(|(at, w)| (at, w, false))
                                }
                                other => other.map(|(at, w)| (at, w, true)),
                            }
                        } => w,
                        _ = moved.closed() => return,
                    };
                    let Ok((at, mut watching, indexed)) = watching else { continue };
                    if indexed {
                        heard(at);
                    }
                    followed = true;
                    let _following = Following::start();
                    let since = tokio::time::Instant::now();
                    // What moved while no member was followed is pulled now.
                    if !bump(&moved) {
                        return;
                    }
                    loop {
                        tokio::select! {
                            next = watching.next() => match next {
                                Some(at) => {
                                    if indexed {
                                        heard(at);
                                    }
                                    if !bump(&moved) { return }
                                }
                                None => break,
                            },
                            _ = moved.closed() => return,
                        }
                    }
                    tracing::debug!(group, member = %addr, ?key, "a followed member went away; following another");
                    ended_at_once |= since.elapsed() < REFOLLOW_PAUSE * 5;
                }
                if !followed || ended_at_once {
                    tokio::select! {
                        _ = tokio::time::sleep(REFOLLOW_PAUSE) => {}
                        _ = moved.closed() => return,
                    }
                }
            }
        });
        Ok(wakeups)
    }
}

fn limit32(limit: usize) -> u32 {
    u32::try_from(limit).unwrap_or(u32::MAX).min(MAX_LIMIT)
}

impl ShardReads for RemoteShard {
    fn conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>> {
        Box::pin(self.ask(Query::Conversation(id)))
    }

    fn open_conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>> {
        Box::pin(self.ask(Query::OpenConversation(id)))
    }

    fn history(&self, id: ConversationId, after: u64, limit: usize) -> Read<'_, Vec<HistoryEntry>> {
        Box::pin(self.ask(Query::History { id, after, limit: limit32(limit) }))
    }

    fn feed_bounds<'a>(&'a self, operator: &'a OperatorId) -> Read<'a, Option<(u64, u64)>> {
        Box::pin(self.ask(Query::FeedBounds(operator.clone())))
    }

    fn feed_since<'a>(&'a self, operator: &'a OperatorId, after: u64, limit: usize) -> Read<'a, Option<Vec<FeedEntry>>> {
        Box::pin(self.ask(Query::FeedSince { operator: operator.clone(), after, limit: limit32(limit) }))
    }

    fn by_provider_id<'a>(&'a self, channel: &'a ChannelId, id: &'a str) -> Read<'a, Option<(ConversationId, u64)>> {
        Box::pin(self.ask(Query::ByProviderId { channel: channel.clone(), id: id.to_owned() }))
    }

    fn conversations_of<'a>(&'a self, visitor: &'a str, limit: usize) -> Read<'a, Vec<Conversation>> {
        Box::pin(self.ask(Query::ConversationsOf { visitor: visitor.to_owned(), limit: limit32(limit) }))
    }

    fn handled_by<'a>(&'a self, operator: &'a OperatorId, before: Option<ConversationId>, limit: usize) -> Read<'a, Vec<ConversationId>> {
        Box::pin(self.ask(Query::HandledBy { operator: operator.clone(), before, limit: limit32(limit) }))
    }

    fn deliveries_of(&self, id: ConversationId) -> Read<'_, Vec<(u64, Delivery)>> {
        Box::pin(self.ask(Query::DeliveriesOf(id)))
    }

    fn dead_letters(&self, after: Option<(ConversationId, u64)>, limit: usize) -> Read<'_, Vec<(ConversationId, u64, Delivery)>> {
        // The question of earlier builds when it is the same one.
        let query = match after {
            None => Query::DeadLetters { limit: limit32(limit) },
            Some(_) => Query::DeadLettersAfter { after, limit: limit32(limit) },
        };
        Box::pin(self.ask(query))
    }

    fn attachment<'a>(&'a self, id: &'a AttachmentId) -> Read<'a, Option<Attachment>> {
        Box::pin(self.ask(Query::Attachment(id.clone())))
    }

    fn attachment_room(&self, id: ConversationId, files: usize, size: u64) -> Read<'_, ()> {
        let query = match files {
            1 => Query::AttachmentRoom { id, size },
            _ => Query::AttachmentRoomFor { id, files: files.min(u32::MAX as usize) as u32, size },
        };
        Box::pin(self.ask(query))
    }

    fn inbound_seen<'a>(&'a self, channel: &'a ChannelId, sender: &'a str, key: &'a str) -> Read<'a, bool> {
        Box::pin(self.ask(Query::InboundSeen { channel: channel.clone(), sender: sender.to_owned(), key: key.to_owned() }))
    }
}
