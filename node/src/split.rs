//! A node that runs ADR 0006's split and serves it: the metadata group, the routing
//! shard and `shards` conversation shards (`groups.rs`), with the gateway reading and
//! submitting per group through [`SplitBackend`].
//!
//! `switchboard dev --shards N` starts one (a member alone), `switchboard node` one whose
//! file says `shards = N` (`cluster init --shards N`: every group on the cluster's first
//! members). An operator's desk follows one feed per group (protocol 2, ADR 0010).
//! Members join and leave through `G0` and the placement controller (`placement.rs`,
//! ADR 0006 "Placement, as built"). A folder of one group is moved into the split
//! offline by `switchboard cluster split` (`cutover.rs`); `check_layout` refuses to open
//! it as split before, and says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_actors::actors::SupervisorMsg;
use switchboard_actors::core::Reply;
use switchboard_actors::mail::GroupId;
use switchboard_actors::model::{Attachment, AttachmentId, ChannelId, Command, ConversationId, OperatorId};
use switchboard_actors::state::{Conversation, Delivery, FeedEntry, HistoryEntry};
use switchboard_gateway::reads::Read;
use switchboard_actors::placement::{self, Target};
use switchboard_actors::shard::{Shard, StreamKey, Wakeups};
use switchboard_gateway::{Backend, BoxFuture, FeedKinds, FeedSource, ShardReads};

use crate::groups::{HostedGroup, SplitNode, FIRST_C, G0, R};
use crate::server::{self, Edge, Groups, NodeOptions, RunningNode};

/// The file in a data folder that says how its groups are laid out; a folder without
/// it holds a node of one group (or nothing yet).
const LAYOUT_FILE: &str = "layout";

/// The layout line of a split data folder.
fn layout_line(shards: u64) -> String {
    format!("split shards={shards}\n")
}

/// Refuses a data folder laid out otherwise than `shards` asks (`None`: one group), so
/// a folder is never opened as something it is not.
pub(crate) fn check_layout(dir: &Path, shards: Option<u64>) -> anyhow::Result<()> {
    let path = dir.join(LAYOUT_FILE);
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let has_records = dir.join("records").exists();
    match (shards, found) {
        (None, None) => Ok(()),
        (None, Some(text)) => anyhow::bail!(
            "the data folder {} holds a split node ({}); start it with `--shards` as it was made, or use another folder",
            dir.display(),
            text.trim()
        ),
        (Some(_), None) if has_records => anyhow::bail!(
            "the data folder {} holds a node of one group: move it into the split first with `switchboard cluster split --data {} --shards N` (the node stopped), or use a new folder",
            dir.display(),
            dir.display()
        ),
        (Some(n), None) => {
            switchboard_raft::files::write_private(&path, layout_line(n).as_bytes())?;
            Ok(())
        }
        (Some(n), Some(text)) if text == layout_line(n) => Ok(()),
        (Some(n), Some(text)) => anyhow::bail!(
            "the data folder {} was made as `{}`, not with {n} conversation shards; the number of shards is fixed when a cluster is made",
            dir.display(),
            text.trim()
        ),
    }
}

use switchboard_actors::cutover::stable_hash;

/// The gateway's view of a split node: each command goes to the group that decides it
/// (`placement::target`), each read to the group that holds what it reads.
pub(crate) struct SplitBackend {
    node: Arc<SplitNode>,
    /// Where a new conversation of a visitor without an id goes next (round robin).
    next: AtomicU64,
    /// Files being copied to the other members at once.
    copying: Arc<tokio::sync::Semaphore>,
    /// Set once every group this node holds had the directory's letters (see
    /// [`SplitBackend::directory_arrived`]); it stays set.
    directory_arrived: std::sync::atomic::AtomicBool,
    /// The letters the metadata group had posted to each group, read from this node's
    /// copy of it once a read barrier showed the copy current; `None` until then.
    directory_posted: Arc<std::sync::OnceLock<BTreeMap<GroupId, u64>>>,
    /// Whether the task that takes that read barrier was started.
    directory_asked: std::sync::atomic::AtomicBool,
    /// Read barriers of the groups held here, one round per group at a time (each
    /// operator reply and login asks for one).
    barriers: server::BarrierRounds,
}

impl SplitBackend {
    fn new(node: Arc<SplitNode>) -> SplitBackend {
        SplitBackend {
            node,
            next: AtomicU64::new(0),
            copying: Arc::new(tokio::sync::Semaphore::new(4)),
            directory_arrived: Default::default(),
            directory_posted: Default::default(),
            directory_asked: Default::default(),
            barriers: Default::default(),
        }
    }

    fn group(&self, id: GroupId) -> &HostedGroup {
        // Every id this backend names is one `SplitNode::member` opened.
        &self.node.groups[&id]
    }

    fn conversation_group(&self, id: ConversationId) -> GroupId {
        self.node.group_of(id)
    }

    /// The conversation shard that decides a channel sender's messages.
    fn sender_group(&self, channel: &ChannelId, sender: &str) -> GroupId {
        FIRST_C + placement::sender_shard(channel, sender, self.node.shards)
    }

    /// The conversation shard whose holders keep a file of `owner`'s.
    fn file_group(&self, owner: &switchboard_gateway::attachments::FileOwner) -> GroupId {
        use switchboard_gateway::attachments::FileOwner;
        match owner {
            FileOwner::Conversation(c) => self.conversation_group(*c),
            FileOwner::Sender { channel, sender } => self.sender_group(channel, sender),
        }
    }

    /// The conversation shard `hash` picks.
    fn by_hash(&self, hash: u64) -> GroupId {
        FIRST_C + hash % self.node.shards.max(1)
    }

    /// Where `command` is proposed: one group, or several for a command that names
    /// conversations of several shards (split into one command per shard) or that every
    /// group applies.
    fn route(&self, command: Command) -> Result<Vec<(GroupId, Command)>, switchboard_actors::Error> {
        self.route_as(command, true)
    }

    /// [`SplitBackend::route`]; `advance: false` only looks (a visitor without an id
    /// does not move the round robin on).
    fn route_as(&self, command: Command, advance: bool) -> Result<Vec<(GroupId, Command)>, switchboard_actors::Error> {
        let one = |group: GroupId, command: Command| Ok(vec![(group, command)]);
        // An operator's close goes to the routing shard once it decides with rules 11;
        // before (a rolling upgrade whose routing leader runs an older build), to the
        // conversation shard, as that build did.
        if let Command::CloseByOperator { conversation, .. } = &command {
            if self.group(R).shard.read().rules < 11 {
                return one(self.conversation_group(*conversation), command);
            }
        }
        match placement::target(&command) {
            Target::Directory => one(G0, command),
            Target::Conversation(id) => one(self.conversation_group(id), command),
            Target::NewConversation { visitor: Some(visitor) } => one(self.by_hash(stable_hash(&[visitor.as_bytes()])), command),
            Target::NewConversation { visitor: None } => {
                let turn = if advance { self.next.fetch_add(1, Relaxed) } else { self.next.load(Relaxed) };
                one(self.by_hash(turn), command)
            }
            Target::Sender { channel, sender } => one(self.sender_group(&channel, &sender), command),
            Target::Operator(_) | Target::Group(_) | Target::ConversationRouting(_) | Target::OwnRoutingShard | Target::OperatorsByRoutingShard => {
                one(R, command)
            }
            Target::OwnConversationShard => match command {
                // Channel receipts name conversations of any shard: each shard gets its own.
                Command::DeliveryResults { results } => {
                    let mut by_group: BTreeMap<GroupId, Vec<_>> = BTreeMap::new();
                    for result in results {
                        by_group.entry(self.conversation_group(result.conversation)).or_default().push(result);
                    }
                    if by_group.is_empty() {
                        return one(FIRST_C, Command::DeliveryResults { results: Vec::new() });
                    }
                    Ok(by_group.into_iter().map(|(group, results)| (group, Command::DeliveryResults { results })).collect())
                }
                other => Ok((0..self.node.shards).map(|k| (FIRST_C + k, other.clone())).collect()),
            },
            Target::Every => Ok(self.node.groups.keys().map(|id| (*id, command.clone())).collect()),
            Target::Addressee | Target::Itself => Err(switchboard_actors::Error::Invalid("letters between groups are not taken from outside".into())),
            // A removed node is recorded where nodes are admitted (the metadata group).
            Target::Metadata if matches!(command, Command::ForgetNode { .. }) => one(G0, command),
            Target::Metadata => Err(switchboard_actors::Error::Invalid("where groups are held is the placement's to record, not taken from outside".into())),
        }
    }

    fn supervisor_of(&self, key: &StreamKey) -> ractor::ActorRef<SupervisorMsg> {
        match key {
            StreamKey::Conversation(id) => self.group(self.conversation_group(*id)).supervisor.clone(),
            StreamKey::Operator(_) | StreamKey::Group(_) | StreamKey::Floor => self.group(R).supervisor.clone(),
        }
    }

    /// Wake-ups of `key` in group `group`: from this node's replica while it holds the
    /// group, from a holder's otherwise (ADR 0012).
    ///
    /// The source follows the placement: when the group moves to or away from this
    /// node, the stream switches to the other source and moves once, so that the
    /// reader pulls what it may have missed in between.
    fn subscribe_in(&self, group: GroupId, key: StreamKey) -> BoxFuture<Result<Wakeups, switchboard_actors::Error>> {
        let node = self.node.clone();
        if group == G0 || group == R {
            let supervisor = self.group(group).supervisor.clone();
            return Box::pin(async move { switchboard_actors::actors::subscribe(&supervisor, key).await });
        }
        Box::pin(async move {
            let source = {
                let (node, key) = (node.clone(), key.clone());
                move |held: bool| {
                let (node, key) = (node.clone(), key.clone());
                async move {
                    if held {
                        switchboard_actors::actors::subscribe(&node.groups[&group].supervisor, key).await
                    } else {
                        node.remote(group).subscribe(key)
                    }
                }
                }
            };
            let mut holding = node.holding(group);
            let mut held = *holding.borrow_and_update();
            let mut current = source(held).await?;
            let (moved, wakeups) = tokio::sync::watch::channel(0u64);
            tokio::spawn(async move {
                let mut n = 0u64;
                // Whether the holding flag can still change (its sender lives as long as
                // the node).
                let mut watching = true;
                loop {
                    tokio::select! {
                        changed = current.changed() => {
                            if changed.is_err() {
                                // The local stream ended (the group stopped here): look again.
                                tokio::time::sleep(crate::remote::HOLDING_CHECK).await;
                                held = !node.holds(group);
                            } else {
                                current.borrow_and_update();
                                n += 1;
                                if moved.send(n).is_err() {
                                    return;
                                }
                                continue;
                            }
                        }
                        flipped = holding.changed(), if watching => if flipped.is_err() { watching = false },
                        _ = moved.closed() => return,
                    }
                    let now = node.holds(group);
                    if now == held {
                        continue;
                    }
                    held = now;
                    match source(held).await {
                        Ok(next) => current = next,
                        Err(e) => {
                            tracing::warn!(group, error = %e, "a stream could not follow its group's move");
                            return;
                        }
                    }
                    n += 1;
                    if moved.send(n).is_err() {
                        return;
                    }
                }
            });
            Ok(wakeups)
        })
    }

    /// Waits until this node has applied what group `id`'s leader had committed when
    /// asked (one round trip); for a group it does not hold, until the holder it reads
    /// from has.
    fn barrier(&self, id: GroupId) -> BoxFuture<Result<(), String>> {
        if !self.node.holds(id) {
            let remote = self.node.remote(id);
            return Box::pin(async move { remote.barrier().await.map_err(|e| e.to_string()) });
        }
        let (raft, peers, barriers) = (self.group(id).raft.clone(), self.node.peers.clone(), self.barriers.clone());
        Box::pin(async move { barriers.wait(raft, peers, id).await })
    }

    /// The reads of conversation shard `group`, held here or not (decided at each read).
    fn reader(&self, group: GroupId) -> Arc<dyn ShardReads> {
        Arc::new(GroupReader { node: self.node.clone(), group })
    }

    /// Whether every group this node holds applied, in its own replica, the letters
    /// the metadata group had posted to it: the channels and skill groups a visitor's
    /// start is checked against. A node is not ready before (the demo's directory, or
    /// one written while the node was down, may still be on its way to a shard).
    /// Checked until it holds once, so a directory edit later does not flip readiness;
    /// asked only through `Gateway::ready`, after the node's configuration was loaded.
    /// What was posted is read from this node's copy of the metadata group only after a
    /// read barrier (taken by a task the first call starts, tried again until it goes
    /// through) showed that copy has every entry committed before it: a copy left
    /// behind, at a start whose own barrier timed out or on a follower, would name too
    /// few letters.
    fn directory_arrived(&self) -> bool {
        if self.directory_arrived.load(Relaxed) {
            return true;
        }
        let Some(posted) = self.directory_posted.get() else {
            let runtime = tokio::runtime::Handle::try_current().ok().filter(|_| !self.directory_asked.swap(true, Relaxed));
            if let Some(runtime) = runtime {
                // Held weakly: a node stopped meanwhile ends the task.
                let (weak, target) = (Arc::downgrade(&self.node), self.directory_posted.clone());
                runtime.spawn(async move {
                    loop {
                        let Some(node) = weak.upgrade() else { return };
                        let g0 = &node.groups[&G0];
                        match switchboard_raft::network::read_barrier(&g0.raft, &node.peers, G0, Duration::from_secs(5)).await {
                            Ok(()) => {
                                let posted = g0.shard.read().mail_out.iter().map(|(to, outbox)| (*to, outbox.last_posted())).collect();
                                let _ = target.set(posted);
                                return;
                            }
                            Err(e) => {
                                tracing::info!(error = %e, "the metadata group's copy here is not known current yet; the node is not ready");
                                drop(node);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                });
            }
            return false;
        };
        let arrived = self
            .node
            .groups
            .values()
            .filter(|g| g.id != G0 && self.node.holds(g.id))
            .all(|g| g.shard.read().mail_in.last(G0) >= posted.get(&g.id).copied().unwrap_or(0));
        if arrived {
            self.directory_arrived.store(true, Relaxed);
        }
        arrived
    }

    /// Letters a group posted that its destination has not confirmed yet.
    fn letters_in_flight(shard: &Shard) -> BTreeMap<GroupId, usize> {
        shard.read().mail_out.iter().map(|(to, outbox)| (*to, outbox.unconfirmed().count())).collect()
    }
}

/// A conversation shard's reads on this node: from its own replica while it holds the
/// group, from the group's holders otherwise (ADR 0012). Decided at each read, so a
/// socket that follows a group goes on reading it when the placement moves it.
struct GroupReader {
    node: Arc<SplitNode>,
    group: GroupId,
}

impl GroupReader {
    fn target(&self) -> Arc<dyn ShardReads> {
        if self.node.holds(self.group) {
            self.node.groups[&self.group].shard.clone()
        } else {
            self.node.remote(self.group)
        }
    }
}

impl ShardReads for GroupReader {
    fn conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>> {
        let target = self.target();
        Box::pin(async move { target.conversation(id).await })
    }

    fn open_conversation(&self, id: ConversationId) -> Read<'_, Option<Conversation>> {
        let target = self.target();
        Box::pin(async move { target.open_conversation(id).await })
    }

    fn history(&self, id: ConversationId, after: u64, limit: usize) -> Read<'_, Vec<HistoryEntry>> {
        let target = self.target();
        Box::pin(async move { target.history(id, after, limit).await })
    }

    fn feed_bounds<'a>(&'a self, operator: &'a OperatorId) -> Read<'a, Option<(u64, u64)>> {
        let target = self.target();
        Box::pin(async move { target.feed_bounds(operator).await })
    }

    fn feed_since<'a>(&'a self, operator: &'a OperatorId, after: u64, limit: usize) -> Read<'a, Option<Vec<FeedEntry>>> {
        let target = self.target();
        Box::pin(async move { target.feed_since(operator, after, limit).await })
    }

    fn by_provider_id<'a>(&'a self, channel: &'a ChannelId, id: &'a str) -> Read<'a, Option<(ConversationId, u64)>> {
        let target = self.target();
        Box::pin(async move { target.by_provider_id(channel, id).await })
    }

    fn conversations_of<'a>(&'a self, visitor: &'a str, limit: usize) -> Read<'a, Vec<Conversation>> {
        let target = self.target();
        Box::pin(async move { target.conversations_of(visitor, limit).await })
    }

    fn handled_by<'a>(&'a self, operator: &'a OperatorId, before: Option<ConversationId>, limit: usize) -> Read<'a, Vec<ConversationId>> {
        let target = self.target();
        Box::pin(async move { target.handled_by(operator, before, limit).await })
    }

    fn deliveries_of(&self, id: ConversationId) -> Read<'_, Vec<(u64, Delivery)>> {
        let target = self.target();
        Box::pin(async move { target.deliveries_of(id).await })
    }

    fn dead_letters(&self, after: Option<(ConversationId, u64)>, limit: usize) -> Read<'_, Vec<(ConversationId, u64, Delivery)>> {
        let target = self.target();
        Box::pin(async move { target.dead_letters(after, limit).await })
    }

    fn attachment<'a>(&'a self, id: &'a AttachmentId) -> Read<'a, Option<Attachment>> {
        let target = self.target();
        Box::pin(async move { target.attachment(id).await })
    }

    fn attachment_room(&self, id: ConversationId, files: usize, size: u64) -> Read<'_, ()> {
        let target = self.target();
        Box::pin(async move { target.attachment_room(id, files, size).await })
    }

    fn inbound_seen<'a>(&'a self, channel: &'a ChannelId, sender: &'a str, key: &'a str) -> Read<'a, bool> {
        let target = self.target();
        Box::pin(async move { target.inbound_seen(channel, sender, key).await })
    }
}

impl Backend for SplitBackend {
    fn relay_signal(&self, to: switchboard_raft::network::SignalTo, signal: &serde_json::Value) {
        server::relay_signal(&self.node.peers, crate::placement::nodes(&self.node), self.node.node_id, to, signal);
    }

    fn submit(&self, command: Command) -> BoxFuture<Result<Reply, switchboard_actors::Error>> {
        let routed = self.route(command);
        let proposers: Result<Vec<_>, _> = routed.map(|r| r.into_iter().map(|(g, c)| (self.group(g).proposer.clone(), c)).collect());
        Box::pin(async move {
            let mut last = None;
            for (proposer, command) in proposers? {
                last = Some(proposer.submit(command).await?);
            }
            last.ok_or_else(|| switchboard_actors::Error::Invalid("the command names nothing".into()))
        })
    }

    fn shard(&self) -> Arc<Shard> {
        self.group(R).shard.clone()
    }

    fn directory_shard(&self) -> Arc<Shard> {
        self.group(G0).shard.clone()
    }

    fn conversation_reads(&self, id: ConversationId) -> Arc<dyn ShardReads> {
        self.reader(self.conversation_group(id))
    }

    fn conversation_readers(&self) -> Vec<Arc<dyn ShardReads>> {
        (0..self.node.shards).map(|k| self.reader(FIRST_C + k)).collect()
    }

    fn shard_for(&self, command: &Command) -> Option<Arc<Shard>> {
        match self.route_as(command.clone(), false) {
            // A group this node does not hold is checked by its leader alone.
            Ok(routed) => match routed.first() {
                Some((g, _)) if self.node.holds(*g) => Some(self.group(*g).shard.clone()),
                Some(_) => None,
                None => Some(self.shard()),
            },
            Err(_) => Some(self.shard()),
        }
    }

    fn operator_feeds(&self) -> Vec<FeedSource> {
        let routing = FeedSource { name: "r".into(), shard: self.group(R).shard.clone(), kinds: FeedKinds::Routing };
        let conversations = (0..self.node.shards).map(|k| FeedSource { name: format!("c{k}"), shard: self.reader(FIRST_C + k), kinds: FeedKinds::Conversation });
        std::iter::once(routing).chain(conversations).collect()
    }

    fn subscribe_feed(&self, feed: &str, key: StreamKey) -> BoxFuture<Result<Wakeups, switchboard_actors::Error>> {
        let group = match feed.strip_prefix('c').and_then(|k| k.parse::<u64>().ok()) {
            Some(k) if k < self.node.shards => FIRST_C + k,
            _ => R,
        };
        self.subscribe_in(group, key)
    }

    fn subscribe(&self, key: StreamKey) -> BoxFuture<Result<Wakeups, switchboard_actors::Error>> {
        match &key {
            StreamKey::Conversation(id) => self.subscribe_in(self.conversation_group(*id), key),
            StreamKey::Operator(_) | StreamKey::Group(_) | StreamKey::Floor => self.subscribe_in(R, key),
        }
    }

    fn crash_actor(&self, key: StreamKey) -> BoxFuture<Result<bool, switchboard_actors::Error>> {
        let supervisor = self.supervisor_of(&key);
        Box::pin(async move { switchboard_actors::actors::crash(&supervisor, key).await })
    }

    fn ready(&self) -> bool {
        // The groups this node holds; the others are read from their holders.
        self.node.groups.values().filter(|g| self.node.holds(g.id)).all(|g| server::serves(&g.raft, self.node.node_id, g.id, &self.node.peers, &self.node.router))
            && self.directory_arrived()
    }

    fn cluster(&self) -> serde_json::Value {
        let groups: Vec<serde_json::Value> = self
            .node
            .groups
            .values()
            .map(|g| {
                let m = g.raft.metrics().borrow().clone();
                let part = match g.id {
                    G0 => "directory".to_string(),
                    R => "routing".to_string(),
                    id => format!("conversations {}", id - FIRST_C),
                };
                let membership = m.membership_config.membership();
                let voters: Vec<u64> = membership.voter_ids().collect();
                let learners: Vec<u64> = membership.learner_ids().collect();
                let held = self.node.holds(g.id);
                if !held {
                    // Not held here (ADR 0012): this node's replica, if it ever had one, is
                    // no one's view. Its holders are the metadata group's record.
                    let holders: Vec<u64> = self.node.groups[&G0].shard.read().holders.get(&g.id).map(|h| h.iter().copied().collect()).unwrap_or_default();
                    return serde_json::json!({"group": g.id, "part": part, "held": false, "holders": holders, "last_applied": m.last_applied.map(|l| l.index)});
                }
                serde_json::json!({
                    "group": g.id,
                    "part": part,
                    "held": true,
                    "role": format!("{:?}", m.state).to_lowercase(),
                    "leader": m.current_leader,
                    "term": m.current_term,
                    "last_log": m.last_log_index,
                    "commit_index": g.committed.load(Relaxed).max(m.last_applied.map_or(0, |l| l.index)),
                    "last_applied": m.last_applied.map(|l| l.index),
                    "voters": voters,
                    "learners": learners,
                    // On the group's leader: how far each member's log is known to match.
                    "matched": m.replication.as_ref().map(|r| r.iter().map(|(id, l)| (id.to_string(), serde_json::json!(l.map(|l| l.index)))).collect::<serde_json::Map<_, _>>()),
                    "membership_log": m.membership_config.log_id().map(|l| l.index),
                    "reaches_majority": (m.current_leader == Some(self.node.node_id)).then(|| server::reaches_majority(&m, self.node.node_id, &self.node.peers)),
                    "leader_changes": g.leader_changes.load(Relaxed),
                    "letters_in_flight": Self::letters_in_flight(&g.shard).values().sum::<usize>(),
                    "mail_retries": g.mail_retries.load(Relaxed),
                    "quiet": match self.node.router.quietness(g.id) {
                        q if q.leading => "leading",
                        q if q.following => "following",
                        _ => "awake",
                    },
                })
            })
            .collect();
        // The cluster's nodes are the metadata group's members.
        let routing = self.group(R).raft.metrics().borrow().clone();
        let directory = self.group(G0).raft.metrics().borrow().clone();
        let members: Vec<serde_json::Value> = directory
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| serde_json::json!({"id": id, "raft_addr": node.addr, "voter": directory.membership_config.membership().voter_ids().any(|v| v == *id)}))
            .collect();
        // On the groups this node leads: whether each reaches a majority (null: it leads none).
        let led: Vec<bool> = groups.iter().filter_map(|g| g["reaches_majority"].as_bool()).collect();
        serde_json::json!({
            "node": self.node.node_id,
            "split": {"shards": self.node.shards},
            // The routing shard's, as a cluster of one group reports its group's.
            "leader": routing.current_leader,
            "term": routing.current_term,
            "role": format!("{:?}", routing.state).to_lowercase(),
            "reaches_majority": (!led.is_empty()).then(|| led.iter().all(|r| *r)),
            "members": members,
            "groups": groups,
        })
    }

    fn keeps_files_of(&self, owner: &switchboard_gateway::attachments::FileOwner) -> bool {
        self.node.holds(self.file_group(owner))
    }

    fn replicate_file(&self, blobs: switchboard_gateway::attachments::BlobStore, id: AttachmentId, owner: switchboard_gateway::attachments::FileOwner) -> BoxFuture<Result<(), String>> {
        // A conversation's files go where its shard is held (ADR 0012): to its other
        // members from a holder, to its holders from another node. A channel message's
        // go to the shard its channel and sender hash to, which decides it. Were the
        // holders not known, every node (the routing shard's members) gets it.
        let group = Some(self.file_group(&owner));
        let remote = group.and_then(|g| crate::groups::holders_from(&self.node.groups[&G0], self.group(g), self.node.node_id)).filter(|h| !h.is_empty());
        let targets = match (group, remote) {
            (_, Some(holders)) => {
                let needed = holders.len() / 2 + 1;
                (holders.into_iter().map(|(_, addr)| (addr, true)).collect(), needed)
            }
            (Some(g), None) if self.node.holds(g) => server::file_targets(&self.group(g).raft, self.node.node_id),
            _ => server::file_targets(&self.group(R).raft, self.node.node_id),
        };
        Box::pin(server::replicate_file(targets, self.node.peers.clone(), self.copying.clone(), blobs, id))
    }

    fn read_barrier(&self) -> BoxFuture<Result<(), String>> {
        let barriers: Vec<_> = self.node.groups.keys().map(|id| self.barrier(*id)).collect();
        Box::pin(async move {
            for result in futures::future::join_all(barriers).await {
                result?;
            }
            Ok(())
        })
    }

    fn directory_barrier(&self) -> BoxFuture<Result<(), String>> {
        self.barrier(G0)
    }

    fn routing_barrier(&self) -> BoxFuture<Result<(), String>> {
        self.barrier(R)
    }

    fn holder_barrier(&self) -> Option<BoxFuture<Result<(), String>>> {
        Some(self.barrier(R))
    }

    fn conversation_barrier(&self, id: ConversationId) -> BoxFuture<Result<(), String>> {
        self.barrier(self.conversation_group(id))
    }

    fn removal_refused(&self, id: u64) -> Option<String> {
        (id == self.node.node_id).then(|| format!("node {id} cannot remove itself: ask another node"))
    }

    fn remove_member(&self, id: u64) -> BoxFuture<Result<(), String>> {
        let node = self.node.clone();
        // Within the request's deadline (30 s by default); what is left the placement
        // finishes, and asking again carries on. In a task of its own, so that a request
        // cut off (its deadline, a client that went away) never leaves a step half
        // taken: a voter change whose caller went away between its two halves would be
        // finished by the next leader keeping the node as a learner.
        let removal = tokio::spawn(async move { crate::placement::remove(&node, id, Duration::from_secs(25)).await.map(|_| ()) });
        Box::pin(async move { removal.await.map_err(|e| format!("the removal stopped: {e}"))? })
    }

    fn rebalance(&self) -> BoxFuture<Result<Vec<String>, String>> {
        let node = self.node.clone();
        // In a task of its own, as a removal.
        let settling = tokio::spawn(async move {
            let steps = crate::placement::settle(&node, true, Duration::from_secs(25), false).await?;
            Ok(steps.iter().map(|s| s.to_string()).collect())
        });
        Box::pin(async move { settling.await.map_err(|e| format!("the rebalance stopped: {e}"))? })
    }

    fn fetch_file(&self, id: String) -> BoxFuture<Option<Vec<u8>>> {
        let (others, _) = server::file_targets(&self.group(R).raft, self.node.node_id);
        Box::pin(server::fetch_file(others, self.node.peers.clone(), id))
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let node_id = self.node.node_id;
        let gauges: [(&str, &str, &str); 10] = [
            ("switchboard_raft_is_leader", "gauge", "Whether this node leads the group."),
            ("switchboard_raft_leader", "gauge", "The node that leads the group, as this node knows it (0: none known)."),
            ("switchboard_raft_term", "gauge", "Current Raft term of the group."),
            ("switchboard_raft_last_log", "gauge", "Index of the group's last log entry."),
            ("switchboard_raft_commit_index", "gauge", "Index of the group's last entry this node knows committed."),
            ("switchboard_raft_last_applied", "gauge", "Index of the group's last applied entry."),
            ("switchboard_raft_apply_lag", "gauge", "Entries this node knows committed but has not applied yet."),
            ("switchboard_raft_leader_changes_total", "counter", "Changes of the group's leader seen by this node."),
            ("switchboard_routing_rules", "gauge", "Routing rules version in force in the group."),
            ("switchboard_mail_retries_total", "counter", "Tries of the group's letters to another group that failed, made from this node while it led the group; each is sent again."),
        ];
        for (i, (name, kind, help)) in gauges.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for g in self.node.groups.values() {
                let m = g.raft.metrics().borrow().clone();
                let (last_log, applied) = (m.last_log_index.unwrap_or(0), m.last_applied.map_or(0, |l| l.index));
                // A snapshot installed here moves the applied index past the last
                // committed pointer openraft saved: it was committed too.
                let committed = g.committed.load(Relaxed).max(applied);
                let value = match i {
                    0 => u64::from(m.current_leader == Some(node_id)),
                    1 => m.current_leader.unwrap_or(0),
                    2 => m.current_term,
                    3 => last_log,
                    4 => committed,
                    5 => applied,
                    6 => committed.saturating_sub(applied),
                    7 => g.leader_changes.load(Relaxed),
                    8 => u64::from(g.shard.read().rules),
                    _ => g.mail_retries.load(Relaxed),
                };
                let _ = writeln!(out, "{name}{{group=\"{}\"}} {value}", g.id);
            }
        }
        switchboard_raft::state::store_metrics(&mut out);
        server::file_metrics(&mut out);
        server::clock_metrics(&mut out);
        let _ = writeln!(out, "# HELP switchboard_mail_in_flight Letters a group posted to another that the destination has not confirmed yet.\n# TYPE switchboard_mail_in_flight gauge");
        for g in self.node.groups.values() {
            for (to, n) in Self::letters_in_flight(&g.shard) {
                let _ = writeln!(out, "switchboard_mail_in_flight{{from=\"{}\",to=\"{to}\"}} {n}", g.id);
            }
        }
        let _ = writeln!(out, "# HELP switchboard_remote_reads_total Questions this node asked the holders of conversation shards it does not hold (ADR 0012), each try counted.\n# TYPE switchboard_remote_reads_total counter");
        let _ = writeln!(out, "switchboard_remote_reads_total {}", crate::remote::READS.load(Relaxed));
        let _ = writeln!(out, "# HELP switchboard_remote_read_failovers_total Of those, tries of another holder after the one asked first did not answer.\n# TYPE switchboard_remote_read_failovers_total counter");
        let _ = writeln!(out, "switchboard_remote_read_failovers_total {}", crate::remote::READ_FAILOVERS.load(Relaxed));
        let _ = writeln!(out, "# HELP switchboard_remote_watches Streams of conversation shards this node does not hold that it follows on a holder now.\n# TYPE switchboard_remote_watches gauge");
        let _ = writeln!(out, "switchboard_remote_watches {}", crate::remote::WATCHES.load(Relaxed));
        let _ = writeln!(out, "# HELP switchboard_holds_group Whether this node holds the group (ADR 0012): 0 for a conversation shard it reads from its holders.\n# TYPE switchboard_holds_group gauge");
        for g in self.node.groups.values() {
            let _ = writeln!(out, "switchboard_holds_group{{group=\"{}\"}} {}", g.id, u8::from(self.node.holds(g.id)));
        }
        let _ = writeln!(out, "# HELP switchboard_placement_steps_total Placement steps (a learner added, voters changed, a node dropped, a leadership handed on) this node took.\n# TYPE switchboard_placement_steps_total counter");
        let _ = writeln!(out, "switchboard_placement_steps_total {}", crate::placement::STEPS.load(Relaxed));
        let _ = writeln!(out, "# HELP switchboard_placement_steps_failed_total Placement steps this node tried that failed (tried again later).\n# TYPE switchboard_placement_steps_failed_total counter");
        let _ = writeln!(out, "switchboard_placement_steps_failed_total {}", crate::placement::STEPS_FAILED.load(Relaxed));
        let _ = writeln!(out, "# HELP switchboard_raft_voters Voting members of the group, as this node knows them.\n# TYPE switchboard_raft_voters gauge");
        for g in self.node.groups.values() {
            let voters = g.raft.metrics().borrow().membership_config.membership().voter_ids().count();
            let _ = writeln!(out, "switchboard_raft_voters{{group=\"{}\"}} {voters}", g.id);
        }
        let _ = writeln!(out, "# HELP switchboard_raft_reaches_majority On the group's leader: whether a majority of voters answered it within 2 s (0: cut off).\n# TYPE switchboard_raft_reaches_majority gauge");
        for g in self.node.groups.values() {
            let m = g.raft.metrics().borrow().clone();
            if m.current_leader == Some(node_id) {
                let _ = writeln!(out, "switchboard_raft_reaches_majority{{group=\"{}\"}} {}", g.id, u8::from(server::reaches_majority(&m, node_id, &self.node.peers)));
            }
        }
        let _ = writeln!(out, "# HELP switchboard_raft_is_voter Whether this node votes in the group (it follows the others as a learner).\n# TYPE switchboard_raft_is_voter gauge");
        for g in self.node.groups.values() {
            let votes = g.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == node_id);
            let _ = writeln!(out, "switchboard_raft_is_voter{{group=\"{}\"}} {}", g.id, u64::from(votes));
        }
        let _ = writeln!(out, "# HELP switchboard_proposed_commands_total Commands proposed to the group.\n# TYPE switchboard_proposed_commands_total counter");
        for g in self.node.groups.values() {
            let _ = writeln!(out, "switchboard_proposed_commands_total{{group=\"{}\"}} {}", g.id, g.proposer.counts().0);
        }
        let _ = writeln!(out, "# HELP switchboard_proposed_entries_total Log entries those commands were written in (group commit puts several in one).\n# TYPE switchboard_proposed_entries_total counter");
        for g in self.node.groups.values() {
            let _ = writeln!(out, "switchboard_proposed_entries_total{{group=\"{}\"}} {}", g.id, g.proposer.counts().1);
        }
        let _ = writeln!(out, "# HELP switchboard_forwarded_entries_total Entries this node sent to the group's leader on another node (attempts).\n# TYPE switchboard_forwarded_entries_total counter");
        for g in self.node.groups.values() {
            let _ = writeln!(out, "switchboard_forwarded_entries_total{{group=\"{}\"}} {}", g.id, g.proposer.counts().2);
        }
        let _ = writeln!(out, "# HELP switchboard_forwarded_unknown_total Forwarded entries whose answer was lost (the leader failed): their commands were answered unavailable.\n# TYPE switchboard_forwarded_unknown_total counter");
        for g in self.node.groups.values() {
            let _ = writeln!(out, "switchboard_forwarded_unknown_total{{group=\"{}\"}} {}", g.id, g.proposer.forwarded_unknown());
        }
        server::quiet_metrics(&mut out, &self.node.router, self.node.groups.keys().copied().collect::<Vec<_>>());
        let pending: usize = (0..self.node.shards).map(|k| self.group(FIRST_C + k).shard.read().outbox.len()).sum();
        server::outbox_metrics(&mut out, pending);
        server::routing_metrics(&mut out, &self.group(R).shard);
        out
    }
}

/// Starts a node that splits into the metadata group, one routing shard and `shards`
/// conversation shards, alone or as one of the cluster's first members (each group on
/// every member), and serves it as `server::start` serves a node of one group.
pub(crate) async fn start(options: NodeOptions, shards: u64) -> anyhow::Result<RunningNode> {
    anyhow::ensure!(
        (1..=64).contains(&shards),
        "a split node has 1 to 64 conversation shards (`--shards`, or `shards` in its file), not {shards}; a node of one group is made with `--shards 0` on the command line, or by leaving `shards` out of its file"
    );
    if !options.members.is_empty() && !options.members.iter().any(|(id, _)| *id == options.node_id) {
        anyhow::bail!("node {} is not among the cluster's members", options.node_id);
    }
    crate::cutover::refuse_unfinished(&options.data_dir)?;
    std::fs::create_dir_all(&options.data_dir).with_context(|| format!("create {}", options.data_dir.display()))?;
    let lock_path = options.data_dir.join("switchboard.lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).with_context(|| format!("open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!("another switchboard is using the data folder {}", options.data_dir.display());
    }
    // Again under the lock: a cut-over may have swapped the folder since the first look.
    crate::cutover::refuse_unfinished(&options.data_dir)?;
    let fresh = !options.data_dir.join(LAYOUT_FILE).exists() && !options.data_dir.join("records").exists();
    check_layout(&options.data_dir, Some(shards))?;
    let sockets = server::bind_edge(&options).await?;
    let name = format!("node-{}", options.node_id);
    let identity = match &options.certs_dir {
        Some(dir) => switchboard_raft::tls::existing_member(dir, &name)?,
        None => switchboard_raft::tls::ensure_member(&options.data_dir.join("certs"), &name, &[])?,
    };
    let endpoint = switchboard_raft::tls::endpoint(&identity, options.raft_addr).context("bind raft endpoint")?;
    // A new member checks the cluster's layout before it takes part; refused, its
    // folder is left as it found it.
    if options.join && fresh {
        if let Err(e) = server::refuse_another_layout(&switchboard_raft::network::Peers::new(endpoint.clone()), &options, Some(shards)).await {
            let _ = std::fs::remove_file(options.data_dir.join(LAYOUT_FILE));
            return Err(e);
        }
    }
    // A member alone, or the cluster's first members (the same list in every member's
    // file): every group is replicated on all of them.
    let members: BTreeMap<u64, String> = if options.members.is_empty() {
        BTreeMap::from([(options.node_id, endpoint.local_addr()?.to_string())])
    } else {
        options.members.iter().cloned().collect()
    };
    // Files of purged conversations go as their purges are applied, from the first
    // (those a member applies while it catches up at start included).
    let blobs = switchboard_gateway::attachments::BlobStore::open(options.data_dir.join("attachments"))?;
    let gone = server::files_gone(blobs.clone());
    let settings = crate::groups::MemberSettings { files_gone: Some(gone), snapshot_every: options.snapshot_every };
    let mut node = SplitNode::member(&options.data_dir, options.node_id, endpoint, &members, shards, options.join, settings).await?;
    node.forward();
    let node = Arc::new(node);
    // Whichever node leads the metadata group keeps the placement balanced.
    let placement = tokio::spawn(crate::placement::run(node.clone()));
    let backend = Arc::new(SplitBackend::new(node.clone()));
    let edge = server::open_edge(&options, sockets, backend, &node.router, blobs).await?;
    let gateway = edge.gateway.clone();
    server::report_status(&node.router, node.groups[&R].raft.clone(), node.node_id, gateway.clone());
    report_shards(&node);
    let Edge { public_addr, private_addr, smtp_addr, mut listeners, shutdown, .. } = edge;
    let node_id = options.node_id;
    // The routing shard's timers: operators without a socket for the grace period.
    let routing = &node.groups[&R];
    listeners.push(tokio::spawn(server::absence_timer(routing.raft.clone(), routing.proposer.clone(), routing.shard.clone(), node_id, options.presence_grace)));
    listeners.push(tokio::spawn(server::report_operator_sockets(gateway.clone(), node_id)));
    // Each conversation shard's: retention, inactivity, the channel delivery worker.
    for k in 0..shards {
        let c = &node.groups[&(FIRST_C + k)];
        listeners.push(tokio::spawn(server::retention_timer(c.raft.clone(), c.proposer.clone(), node_id, options.retention_every)));
        listeners.push(tokio::spawn(server::inactivity_timer(c.raft.clone(), c.proposer.clone(), c.shard.clone(), node_id)));
        listeners.push(tokio::spawn(crate::outbox::run(c.raft.clone(), Arc::new(c.proposer.clone()), c.shard.clone(), node_id, gateway.clone(), shards, node.peers.clone())));
        // While this node holds the shard: its files, from its other holders first,
        // then from any node.
        let (weak, id) = (Arc::downgrade(&node), c.id);
        let sources = move || {
            let node = weak.upgrade()?;
            if !node.holds(id) {
                return None;
            }
            let mut addrs: Vec<String> = server::file_targets(&node.groups[&id].raft, node.node_id).0.into_iter().map(|(addr, _)| addr).collect();
            for (addr, _) in server::file_targets(&node.groups[&R].raft, node.node_id).0 {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            Some(addrs)
        };
        listeners.push(tokio::spawn(server::keep_files(c.shard.clone(), sources, node.peers.clone(), gateway.blobs.clone())));
    }
    // Files kept of shards this node does not hold give their disk back.
    listeners.push(tokio::spawn(give_back_files(Arc::downgrade(&node), gateway.blobs.clone(), options.stray_files_after, options.stray_sweep_every)));
    listeners.push(placement);
    tracing::info!(%public_addr, %private_addr, shards, "split node started");
    Ok(RunningNode { groups: Groups::Split(node), gateway, public_addr, private_addr, smtp_addr, _lock: lock, listeners, shutdown })
}

use crate::server::{STRAY_MIN_AGE, STRAY_PATIENCE, STRAY_SWEEP_FOR};

/// What the stray sweep found out about one conversation shard this sweep.
enum ShardLook {
    /// Held here, and caught up with its leader: its own replica answers.
    Here(Arc<Shard>),
    /// Held elsewhere: the holder at this address caught up, and it alone is asked.
    There(Arc<crate::remote::RemoteShard>, String),
    /// Could not be brought up to date: a file it might name is kept.
    Unknown,
}

/// Gives back the disk of attachment files this node keeps without holding their
/// shard: those of a conversation shard it gave up (ADR 0012), a channel message's
/// files on the node whose webhook received them, and those of an upload whose record
/// was never committed. Every `every` it looks, in id order from where the last sweep
/// stopped, at up to 10,000 files last written at least `after` ago (15 minutes at the
/// least) that no shard held here names. First the metadata group and
/// every conversation shard catch up with their leaders (a read barrier here, or on
/// one holder, which alone is then asked). A file a shard's record names is removed
/// once every recorded holder of that shard sent its bytes and they match the record's
/// SHA-256; a file no record names is removed at once; while a shard cannot be asked,
/// every file it might name is kept. Each file is looked at under the process's one
/// file-sweep permit, so a sweep of held shards' files is never kept waiting long.
pub(crate) async fn give_back_files(node: std::sync::Weak<SplitNode>, blobs: switchboard_gateway::attachments::BlobStore, after: Duration, every: Duration) {
    let after = after.max(STRAY_MIN_AGE);
    let pause = every.max(Duration::from_secs(1));
    // The greatest id the last sweep looked at; `None`: start from the smallest.
    let mut cursor: Option<AttachmentId> = None;
    loop {
        tokio::time::sleep(pause).await;
        let Some(node) = node.upgrade() else { return };
        let shards: Vec<GroupId> = (0..node.shards).map(|k| FIRST_C + k).collect();
        // The next files in id order that no shard held here names.
        let held: Vec<Arc<Shard>> = shards.iter().filter(|g| node.holds(**g)).map(|g| node.groups[g].shard.clone()).collect();
        let Some((strays, complete)) = server::next_strays(&blobs, after, &mut cursor, move |id| !held.iter().all(|s| server::unnamed(s, id))).await else { continue };
        // Who holds what, as of now. A file is taken only if it was already settled when
        // the barriers began: a record of a file written since may be newer than them.
        let barriers_at = tokio::time::Instant::now();
        if let Err(e) = switchboard_raft::network::read_barrier(&node.groups[&G0].raft, &node.peers, G0, STRAY_PATIENCE).await {
            tracing::info!(error = %e, "the metadata group did not catch up; stray files are looked at later");
            continue;
        }
        let mut looks = Vec::new();
        for g in &shards {
            looks.push((*g, look_at(&node, *g).await));
        }
        let started = tokio::time::Instant::now();
        let mut removed = 0u64;
        let mut stopped = false;
        let mut last = None;
        for id in strays {
            if started.elapsed() >= STRAY_SWEEP_FOR {
                stopped = true;
                break;
            }
            let Ok(sweeping) = server::SWEEPING.acquire().await else { return };
            if give_back(&node, &looks, &blobs, &id, after + barriers_at.elapsed()).await {
                removed += 1;
            }
            drop(sweeping);
            last = Some(id);
        }
        // Files kept because a shard could not be asked are looked at again once the
        // sweeps have gone round the folder.
        cursor = if complete && !stopped { None } else { last.or(cursor) };
        if removed > 0 {
            server::FILES_STRAYS_REMOVED.fetch_add(removed, Relaxed);
            tracing::info!(removed, "removed attachment files of shards this node does not hold");
        }
    }
}

/// Brings conversation shard `g` up to date for a stray sweep.
async fn look_at(node: &SplitNode, g: GroupId) -> ShardLook {
    let Some(group) = node.groups.get(&g) else { return ShardLook::Unknown };
    if node.holds(g) {
        return match switchboard_raft::network::read_barrier(&group.raft, &node.peers, g, STRAY_PATIENCE).await {
            Ok(()) => ShardLook::Here(group.shard.clone()),
            Err(e) => {
                tracing::info!(group = g, error = %e, "a shard held here did not catch up; the files it may name are kept");
                ShardLook::Unknown
            }
        };
    }
    let remote = node.remote(g);
    for addr in remote.member_addrs() {
        match remote.barrier_at(&addr).await {
            Ok(()) => return ShardLook::There(remote, addr),
            Err(e) => tracing::debug!(group = g, %addr, error = %e, "a holder did not catch up; asking the next"),
        }
    }
    tracing::info!(group = g, "no holder of a shard caught up; the files it may name are kept");
    ShardLook::Unknown
}

/// Whether `id`'s file, which no shard this node holds named when listed, was removed:
/// every holder of its shard has it, or no shard names it.
async fn give_back(node: &SplitNode, looks: &[(GroupId, ShardLook)], blobs: &switchboard_gateway::attachments::BlobStore, id: &AttachmentId, after: Duration) -> bool {
    if !blobs.settled(id, after).await {
        return false;
    }
    let mut owner = None;
    for (g, look) in looks {
        let record = match look {
            // A snapshot replacing its records meanwhile: nothing is known of them.
            ShardLook::Here(shard) if shard.replacing() => return false,
            ShardLook::Here(shard) => shard.attachment(id),
            ShardLook::There(remote, addr) => remote.attachment_at(addr, id).await,
            ShardLook::Unknown => return false,
        };
        match record {
            // Named by a shard held here after all (its record arrived since): kept.
            Ok(Some(_)) if matches!(look, ShardLook::Here(_)) => return false,
            Ok(Some(attachment)) => {
                owner = Some((*g, attachment));
                break;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(group = g, attachment = %id.0, error = %e, "a shard did not say whether it names a file; kept");
                return false;
            }
        }
    }
    if let Some((g, attachment)) = &owner {
        // Removed only once every holder of its shard showed the very bytes: each one
        // the metadata group records, none of them this node, each with an address.
        let Some(recorded) = node.groups[&G0].shard.read().holders.get(g).cloned() else { return false };
        let Some(holders) = node.groups.get(g).and_then(|group| crate::groups::holders_from(&node.groups[&G0], group, node.node_id)) else { return false };
        if recorded.is_empty() || recorded.contains(&node.node_id) || recorded.iter().any(|n| !holders.iter().any(|(h, _)| h == n)) {
            return false;
        }
        for (_, addr) in holders {
            let shown = match node.peers.get_file(&addr, &id.0, STRAY_PATIENCE).await {
                Ok(Some(bytes)) => {
                    let sha256 = tokio::task::spawn_blocking(move || switchboard_gateway::attachments::sha256_hex(&bytes)).await;
                    sha256.is_ok_and(|sha256| sha256 == attachment.sha256)
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::debug!(%addr, attachment = %id.0, error = %e, "a holder did not give a file; this node's copy is kept");
                    false
                }
            };
            if !shown {
                return false;
            }
        }
        // The placement may have given the shard back to this node meanwhile.
        if node.holds(*g) {
            return false;
        }
    }
    // Written again meanwhile (a redelivery): its record may be on its way.
    blobs.remove_if_settled(id, after).await
}

/// Answers gateways' shard polls: each conversation shard's leader as this node knows
/// it (only for a shard it holds: a node without a copy cannot know), and its holders.
fn report_shards(node: &Arc<SplitNode>) {
    // Weak: the router the answer is set on belongs to the node.
    let weak = Arc::downgrade(node);
    node.router.set_shards(Arc::new(move || {
        let Some(node) = weak.upgrade() else { return Vec::new() };
        let recorded = node.groups[&G0].shard.read().holders.clone();
        (0..node.shards)
            .filter_map(|k| node.groups.get(&(FIRST_C + k)))
            .map(|g| {
                let m = g.raft.metrics().borrow().clone();
                let holders = match recorded.get(&g.id) {
                    Some(nodes) => nodes.iter().copied().collect(),
                    None => m.membership_config.membership().voter_ids().collect(),
                };
                let leader = if node.holds(g.id) { m.current_leader.map(|l| (l, m.current_term)) } else { None };
                switchboard_raft::network::ShardStatus { group: g.id, leader, holders }
            })
            .collect()
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visitor_always_hashes_to_the_same_shard() {
        assert_eq!(stable_hash(&[b"v-1"]), stable_hash(&[b"v-1"]));
        assert_ne!(stable_hash(&[b"v-1"]), stable_hash(&[b"v-2"]));
        // Channel and sender are kept apart: ("ab", "c") is not ("a", "bc").
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
    }

    /// A channel message's files are copied to the holders of the shard that decides
    /// the message (its conversation is not known before), and a conversation's to its.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_goes_to_the_shard_that_decides_its_message() -> anyhow::Result<()> {
        use switchboard_gateway::attachments::FileOwner;
        let dir = tempfile::tempdir()?;
        let mut nodes = SplitNode::cluster(dir.path(), 1, 4).await?;
        let node = Arc::new(nodes.remove(0));
        let backend = SplitBackend::new(node.clone());
        let mut groups = std::collections::BTreeSet::new();
        for n in 0..40 {
            let (channel, sender) = (ChannelId(format!("tg-{}", n % 3)), format!("customer-{n}"));
            let command = Command::ChannelInbound { channel: channel.clone(), sender: sender.clone(), sender_name: String::new(), provider_message_id: format!("m-{n}"), text: "hi".into() };
            let decided_by = backend.route(command)?;
            assert_eq!(decided_by.len(), 1);
            let owner = FileOwner::Sender { channel, sender };
            assert_eq!(backend.file_group(&owner), decided_by[0].0, "sender {n}");
            groups.insert(decided_by[0].0);
        }
        assert!(groups.len() > 1, "senders spread over the shards: {groups:?}");
        for c in [0, 1, 2, 3, 9] {
            assert_eq!(backend.file_group(&FileOwner::Conversation(ConversationId(c))), node.group_of(ConversationId(c)));
        }
        drop(backend);
        if let Ok(node) = Arc::try_unwrap(node) {
            node.stop().await?;
        }
        Ok(())
    }

    #[test]
    fn a_data_folder_is_opened_only_as_what_it_was_made() {
        let dir = tempfile::tempdir().expect("temp dir");
        check_layout(dir.path(), None).expect("an empty folder may hold one group");
        check_layout(dir.path(), Some(4)).expect("an empty folder may be split");
        check_layout(dir.path(), Some(4)).expect("and opened again the same way");
        let other = check_layout(dir.path(), Some(2)).expect_err("another number of shards");
        assert!(other.to_string().contains("not with 2 conversation shards"), "{other}");
        let whole = check_layout(dir.path(), None).expect_err("a split folder as one group");
        assert!(whole.to_string().contains("holds a split node"), "{whole}");

        let single = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(single.path().join("records")).expect("records");
        let refused = check_layout(single.path(), Some(2)).expect_err("a folder of one group as a split");
        assert!(refused.to_string().contains("holds a node of one group") && refused.to_string().contains("switchboard cluster split"), "{refused}");
    }
}
