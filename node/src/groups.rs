//! Several Raft groups on one node, each playing one part of ADR 0006's split (a
//! routing shard, conversation shards), and the mail forwarder that carries each
//! group's letters to the others.
//!
//! `split.rs` runs it: `switchboard dev --shards N` (a member alone), and `node` whose
//! file has `shards` (what `cluster init` writes unless given `--shards 0`); plain
//! `dev`, and `node` without `shards`, run one group that plays the whole (`server.rs`). Tested on real groups
//! (openraft, the log's segment files, the fjall records) in this module's tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_actors::actors::{ShardSupervisor, SupervisorArgs, SupervisorMsg};
use switchboard_actors::core::{Part, Reply};
use switchboard_actors::mail::{GroupId, Mail};
use switchboard_actors::model::Command;
use switchboard_actors::shard::Shard;
use switchboard_raft::member_config;
use switchboard_raft::network::{Forwarder, NetworkFactory, Peers, Router};
use switchboard_raft::store::open_group;
use switchboard_raft::Raft;

use crate::server::{hold_elections_after_restart, restamp_forwarded, RaftProposer, ShardMachine};

/// One group this node hosts: its Raft, its shard (the state machine), the proposer
/// that commits commands through whichever node leads it, and its supervisor, whose
/// entity actors run the group's timers while this node leads it (offer expiries and
/// queue rounds in a routing shard; inactivity and retention in a conversation shard).
#[derive(Clone)]
pub(crate) struct HostedGroup {
    pub(crate) id: GroupId,
    pub(crate) raft: Raft,
    pub(crate) shard: Arc<Shard>,
    pub(crate) proposer: RaftProposer,
    pub(crate) supervisor: ractor::ActorRef<SupervisorMsg>,
    /// Changes of the group's leader this node saw (to another node, or to none).
    pub(crate) leader_changes: Arc<std::sync::atomic::AtomicU64>,
    /// The group's commit index as this node knows it (`LogStore::committed_index`).
    pub(crate) committed: Arc<std::sync::atomic::AtomicU64>,
    /// Tries of this group's letters to another group that failed, while this node led
    /// it (`switchboard_mail_retries_total`).
    pub(crate) mail_retries: Arc<std::sync::atomic::AtomicU64>,
    /// When the group's state machine store is gone, after its Raft is shut down.
    pub(crate) store_gone: Arc<switchboard_raft::store::StoreGone>,
}

/// How a node's groups are kept: what deletes purged files (none in benches and tests
/// without files) and how many entries a snapshot follows (`--snapshot-every`).
pub(crate) struct MemberSettings {
    pub(crate) files_gone: Option<crate::server::FilesGone>,
    pub(crate) snapshot_every: u64,
}

impl Default for MemberSettings {
    fn default() -> Self {
        MemberSettings { files_gone: None, snapshot_every: switchboard_raft::DEFAULT_SNAPSHOT_EVERY }
    }
}

/// What every group on a node shares.
pub(crate) struct Host<'a> {
    pub(crate) node_id: u64,
    pub(crate) data_dir: &'a Path,
    pub(crate) keyspace: &'a fjall::Keyspace,
    pub(crate) snapshot_every: u64,
    pub(crate) peers: &'a Peers,
    pub(crate) router: &'a Router,
    /// Deletes the files of purged attachments, set on each conversation shard before
    /// its group starts (none in the benches and tests without files).
    pub(crate) files_gone: Option<&'a crate::server::FilesGone>,
}

impl Host<'_> {
    /// Opens group `id` playing `part` from this node's data folder (its log under
    /// `log/g<id>`, its records in its partition of the keyspace) and serves it to peers.
    pub(crate) async fn open(&self, id: GroupId, part: Part) -> anyhow::Result<HostedGroup> {
        let shard = Arc::new(Shard::with_part(part));
        if let (Some(gone), Part::Conversations { .. }) = (self.files_gone, part) {
            crate::server::remove_files_with_their_conversations(&shard, gone);
        }
        let log_dir = self.data_dir.join("log").join(format!("g{id}"));
        let (log, sm) = open_group(self.keyspace, id, Arc::new(ShardMachine { shard: shard.clone() }), &self.data_dir.join("snapshots"), &log_dir)
            .with_context(|| format!("open group {id}"))?;
        let committed = log.committed_index();
        let store_gone = Arc::new(sm.gone());
        let config = member_config(self.snapshot_every, self.node_id, id)?;
        let network = NetworkFactory::with_peers(self.peers.clone(), id).quiet_when(self.router.quiet_mark(id));
        let raft = Raft::new(self.node_id, config, network, log, sm).await?;
        self.router.add(id, raft.clone());
        // Conversation shards, the many, go quiet when idle; the metadata group and the
        // routing shard, which every login and assignment needs, stay awake (ADR 0011).
        self.router.allow_quiet(id, matches!(part, Part::Conversations { .. }));
        // A change of voters finished by a later leader keeps the voters it leaves out as
        // learners, also in the metadata group (`drop_left_out_voters` is off): its
        // votes move between nodes that stay, and a node being removed is dropped by
        // `cluster remove-node`, asked again if it timed out.
        self.router.check_writes(id, Arc::new(restamp_forwarded));
        hold_elections_after_restart(&raft, self.router, id).await?;
        let proposer = RaftProposer::start(id, raft.clone(), self.node_id, Forwarder::new(self.peers.clone()), self.router.gate(id));
        let supervisor = ShardSupervisor::start(SupervisorArgs { shard: shard.clone(), proposer: Arc::new(proposer.clone()), leader: false }).await?;
        // The actors follow this node's leadership of the group; its changes are counted.
        let leader_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (mut metrics, node_id, watched, changes) = (raft.metrics(), self.node_id, supervisor.clone(), leader_changes.clone());
        tokio::spawn(async move {
            let mut was_leader = None;
            let mut last_leader = metrics.borrow().current_leader;
            loop {
                let leader = metrics.borrow().current_leader;
                if leader != last_leader {
                    changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    last_leader = leader;
                }
                let leads = leader == Some(node_id);
                if was_leader != Some(leads) {
                    if watched.cast(SupervisorMsg::Leadership(leads)).is_err() {
                        return;
                    }
                    was_leader = Some(leads);
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(HostedGroup { id, raft, shard, proposer, supervisor, leader_changes, committed, mail_retries: Arc::default(), store_gone })
    }
}

/// Letters sent to one destination at once before their answers are awaited: they go
/// into one or a few log entries there (group commit).
const LETTERS_AT_ONCE: usize = 64;
/// The longest wait between tries while a destination does not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Carries `source`'s letters while this node leads it: each destination's
/// unconfirmed letters, oldest first, proposed there as `Command::Deliver`, and the
/// last id the destination applied proposed back here as `Command::ConfirmMail`. It
/// keeps nothing of its own: what to send is the group's replicated `mail_out`, so a
/// new leader's forwarder carries on where the old one stopped, and a letter sent twice
/// is dropped by the destination's inbox. Each destination has its own carrier and
/// backoff, so one that is electing a leader holds up no other.
pub(crate) fn forward_mail(source: HostedGroup, destinations: BTreeMap<GroupId, RaftProposer>, node_id: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let carriers = destinations.into_iter().map(|(to, destination)| carry(source.clone(), to, destination, node_id));
        futures::future::join_all(carriers).await;
    })
}

/// The first wait after a failed try; it doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(20);

async fn carry(source: HostedGroup, to: GroupId, destination: RaftProposer, node_id: u64) {
    let mut published = source.shard.published_watch();
    let mut metrics = source.raft.metrics();
    let mut backoff = MIN_BACKOFF;
    loop {
        if metrics.borrow_and_update().current_leader != Some(node_id) {
            if metrics.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Marked seen before looking: a letter posted after the look wakes this at once.
        published.borrow_and_update();
        let letters: Vec<(u64, Mail)> = {
            let state = source.shard.read();
            state.mail_out.get(&to).map(|o| o.unconfirmed().take(LETTERS_AT_ONCE).map(|(id, m)| (id, m.clone())).collect()).unwrap_or_default()
        };
        let Some(first) = letters.first().map(|(id, _)| *id) else {
            tokio::select! {
                changed = published.changed() => if changed.is_err() { return },
                changed = metrics.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let sends = letters.into_iter().map(|(id, mail)| destination.submit(Command::Deliver { from: source.id, id, mail }));
        let mut failed = false;
        let mut last = None;
        for answer in futures::future::join_all(sends).await {
            match answer {
                Ok(Reply::Delivered { last: applied }) => last = Some(last.unwrap_or(0).max(applied)),
                Ok(other) => {
                    tracing::error!(from = source.id, to, ?other, "a letter was answered with something else");
                    failed = true;
                }
                Err(e) => {
                    tracing::debug!(from = source.id, to, error = %e, "a letter did not get through; it is sent again");
                    failed = true;
                }
            }
        }
        match last {
            Some(upto) if upto >= first => {
                if let Err(e) = source.proposer.submit(Command::ConfirmMail { to, upto }).await {
                    tracing::debug!(from = source.id, to, error = %e, "confirming letters did not go through; they are sent again");
                    failed = true;
                }
            }
            // Answered, but nothing new applied: the destination waits for something
            // (newer routing rules); try again later, not at once.
            _ => failed = true,
        }
        if failed {
            // A try of a destination that failed (no answer, or nothing new applied there).
            source.mail_retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = MIN_BACKOFF;
        }
    }
}

/// The metadata group's id, the routing shard's, and the first conversation shard's:
/// conversation shard `k` of `n` is group `FIRST_C + k`.
pub(crate) const G0: GroupId = 1;
pub(crate) const R: GroupId = 2;
pub(crate) const FIRST_C: GroupId = 3;

/// The part group `id` plays on a node that splits into the metadata group, one
/// routing shard and `shards` conversation shards.
pub(crate) fn part_of(id: GroupId, shards: u64) -> Part {
    match id {
        G0 => Part::Directory { routing: R, first: FIRST_C, shards },
        R => Part::Routing { first: FIRST_C, shards },
        _ => Part::Conversations { routing: R, shard: id - FIRST_C, shards },
    }
}

/// The newest routing rules `group` may adopt now: the metadata group and every
/// conversation shard no newer than the routing shard (every node's copy of which it
/// can read), since a group on older rules holds the metadata group's letters decided
/// under newer ones back, and a conversation shard's letters decided under newer rules
/// may be of a kind the routing shard's older members cannot read (the routing shard is
/// held by every node, so it adopts rules only once every node's build knows them); a
/// new group's, and the routing shard's, this build's.
fn rules_cap(groups: &BTreeMap<GroupId, HostedGroup>, group: &HostedGroup) -> u32 {
    if group.id != R && !group.shard.read().is_new() {
        groups[&R].shard.read().rules
    } else {
        switchboard_actors::core::RULES_VERSION
    }
}

/// Whether node `node` holds `group` by the metadata group's record in `g0` (ADR
/// 0012): the metadata group and the routing shard are held by every node; a
/// conversation shard the record does not name yet by the members of it this node's
/// replica knows (every member, in a cluster made before the record).
pub(crate) fn holds_in(g0: &Shard, group: &HostedGroup, node: u64) -> bool {
    if group.id == G0 || group.id == R {
        return true;
    }
    // Named by the record, and still a member by this node's own log: a node dropped
    // from the group whose metadata replica lags does not read its stopped copy.
    let member = || group.raft.metrics().borrow().membership_config.membership().get_node(&node).is_some();
    match g0.read().holders.get(&group.id) {
        Some(nodes) => nodes.contains(&node) && member(),
        None => member(),
    }
}

/// The holders of `group` other than `node`, with their QUIC addresses (the metadata
/// group's members'), or `None` while `node` holds it. Before the record names any,
/// every other node of the cluster is a candidate (one that does not hold it says so).
pub(crate) fn holders_from(g0: &HostedGroup, group: &HostedGroup, node: u64) -> Option<Vec<(u64, String)>> {
    if holds_in(&g0.shard, group, node) {
        return None;
    }
    let recorded = g0.shard.read().holders.get(&group.id).cloned();
    let m = g0.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let nodes: Vec<u64> = match recorded {
        Some(nodes) => nodes.into_iter().collect(),
        None => membership.nodes().map(|(id, _)| *id).filter(|id| *id != node).collect(),
    };
    Some(nodes.into_iter().filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone()))).collect())
}

/// The members a new cluster's group `id` starts with: every member for the metadata
/// group and the routing shard; for a conversation shard three of them (ADR 0012), a
/// different three for each shard, beginning with its creator.
fn first_members(id: GroupId, members: &BTreeMap<u64, String>) -> BTreeMap<u64, String> {
    if id == G0 || id == R || members.len() <= crate::placement::VOTERS {
        return members.clone();
    }
    let start = (id as usize).saturating_sub(1) % members.len();
    members.iter().cycle().skip(start).take(crate::placement::VOTERS).map(|(k, v)| (*k, v.clone())).collect()
}

/// A node hosting the metadata group, the routing shard and `shards` conversation
/// shards, every group
/// replicated on the same members, with a forwarder on each (acting while this node
/// leads the group).
pub(crate) struct SplitNode {
    pub(crate) node_id: u64,
    pub(crate) groups: BTreeMap<GroupId, HostedGroup>,
    pub(crate) shards: u64,
    pub(crate) peers: Peers,
    pub(crate) router: Router,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    keyspace: fjall::Keyspace,
    endpoint: quinn::Endpoint,
    rpc: tokio::task::JoinHandle<()>,
    /// The conversation shards this node does not hold, read from their holders.
    remotes: std::sync::Mutex<BTreeMap<GroupId, Arc<crate::remote::RemoteShard>>>,
    /// Per conversation shard, whether this node holds it: looked at every 500 ms by
    /// one task, followed by the streams that switch source when it flips.
    holding: BTreeMap<GroupId, tokio::sync::watch::Sender<bool>>,
    holding_task: tokio::task::JoinHandle<()>,
    /// Has the groups this node leads adopt newer routing rules once every member knows them.
    rules_task: tokio::task::JoinHandle<()>,
}

impl SplitNode {
    /// Opens (or creates) the groups in `dir` on a node alone; with `forward`, their
    /// letters flow.
    pub(crate) async fn start(dir: &Path, shards: u64, forward: bool) -> anyhow::Result<SplitNode> {
        let identity = switchboard_raft::tls::ensure_member(&dir.join("certs"), "node-1", &[])?;
        let endpoint = switchboard_raft::tls::endpoint(&identity, "127.0.0.1:0".parse()?)?;
        let members = BTreeMap::from([(1, endpoint.local_addr()?.to_string())]);
        let mut node = Self::member(dir, 1, endpoint, &members, shards, false, MemberSettings::default()).await?;
        if forward {
            node.forward();
        }
        Ok(node)
    }

    /// Opens (or creates) this node's replicas of the groups in `dir`, serving them on
    /// `endpoint`; `members` (node id to QUIC address, this node among them) replicate
    /// every group, and each group is created by one of them in turn (group `g` by the
    /// `(g - 1) mod n`-th), which spreads the first leaders over the members.
    ///
    /// With `join` (a node added to a running cluster, `cluster add-node`), it creates
    /// nothing: on its first start it asks the members to let it follow the metadata
    /// group, and the placement (`placement.rs`) makes it a member of every group.
    pub(crate) async fn member(dir: &Path, node_id: u64, endpoint: quinn::Endpoint, members: &BTreeMap<u64, String>, shards: u64, join: bool, settings: MemberSettings) -> anyhow::Result<SplitNode> {
        let MemberSettings { files_gone, snapshot_every } = settings;
        let ids: Vec<GroupId> = [G0, R].into_iter().chain((0..shards).map(|k| FIRST_C + k)).collect();
        let keyspace = switchboard_raft::store::open_keyspace(&dir.join("records"), &ids)?;
        let (peers, router) = (Peers::new(endpoint.clone()), Router::default());
        router.set_peers(peers.clone());
        // Other members ask it before their groups adopt newer routing rules.
        router.set_rules(switchboard_actors::core::RULES_VERSION);
        let rpc = switchboard_raft::network::serve(endpoint.clone(), router.clone());
        let host = Host { node_id, data_dir: dir, keyspace: &keyspace, snapshot_every, peers: &peers, router: &router, files_gone: files_gone.as_ref() };
        let nodes = members.iter().map(|(id, addr)| (*id, switchboard_raft::Node { addr: addr.clone() })).collect::<BTreeMap<_, _>>();
        let initialize = |raft: Raft, id: GroupId| {
            let nodes: BTreeMap<u64, switchboard_raft::Node> = first_members(id, members).into_keys().filter_map(|k| nodes.get(&k).map(|n| (k, n.clone()))).collect();
            async move {
                match raft.initialize(nodes).await {
                    // Another member's vote or entries reached this one first.
                    Ok(()) | Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
                    Err(e) => Err(anyhow::anyhow!("initialize a group: {e}")),
                }
            }
        };
        let mut groups = BTreeMap::new();
        for id in ids {
            let group = host.open(id, part_of(id, shards)).await?;
            // Each group is created by a different member, which stands first and most
            // likely leads it: leaders start spread over the members.
            let creator = members.keys().nth((id as usize).saturating_sub(1) % members.len().max(1));
            // A conversation shard the metadata group records holders of was made long
            // ago: this node's copy may be one it forgot (it gave the shard up), never to
            // be made again from the first members (ADR 0012).
            let recorded = groups.get(&G0).is_some_and(|g0: &HostedGroup| g0.shard.read().holders.contains_key(&id));
            if !join && !recorded && creator == Some(&node_id) && !group.raft.is_initialized().await? {
                initialize(group.raft.clone(), id).await?;
            }
            groups.insert(id, group);
        }
        Self::serve_reads(&router, &peers, &groups, node_id);
        // A group whose creator has not reached this member within 2 s (it starts later,
        // or is down at the cluster's first start) is started here too: the same member
        // list on every member makes that safe (openraft elects one leader).
        if join {
            Self::follow(&peers, node_id, members, &groups).await?;
        }
        let wait_for_creators = tokio::time::Instant::now() + Duration::from_secs(2);
        // Only a group this member starts in: a conversation shard starts on three.
        let recorded = groups[&G0].shard.read().holders.keys().copied().collect::<std::collections::BTreeSet<_>>();
        for group in groups.values().filter(|g| !join && !recorded.contains(&g.id) && first_members(g.id, members).contains_key(&node_id)) {
            while !group.raft.is_initialized().await? && tokio::time::Instant::now() < wait_for_creators {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !group.raft.is_initialized().await? {
                initialize(group.raft.clone(), group.id).await?;
            }
            // Whether this node holds the group is read from its Raft's metrics, which
            // show the first membership a moment after it is written: until then the
            // group would look held elsewhere, and would neither be waited for below nor
            // adopt the routing rules (the directory's letters would then wait for them
            // until the holding check below found the shard behind).
            let wait = group.raft.wait(Some(Duration::from_secs(10)));
            if let Err(e) = wait.metrics(|m| m.membership_config.membership().get_node(&node_id).is_some(), "this node in the membership").await {
                tracing::warn!(group = group.id, error = %e, "this node's membership of a group it starts in is not shown yet");
            }
        }
        // Members of a cluster start one by one: a quorum may take a while. The metadata
        // group first: whether this node holds each conversation shard is its record.
        for id in [G0, R] {
            groups[&id].raft.wait(Some(Duration::from_secs(60))).metrics(|m| m.current_leader.is_some(), "a leader").await?;
        }
        match switchboard_raft::network::read_barrier(&groups[&G0].raft, &peers, G0, Duration::from_secs(10)).await {
            Ok(()) => {
                // A conversation shard this node gave up (ADR 0012) gives its disk back:
                // its copy is forgotten, and opened again as one never held.
                let mut forgot = false;
                for id in groups.keys().copied().filter(|id| *id >= FIRST_C).collect::<Vec<_>>() {
                    if !Self::gave_up(&groups[&G0].shard, &groups[&id], node_id) {
                        continue;
                    }
                    // Decided again once the group takes no more entries: one that
                    // arrived in between may have given this node a vote.
                    let Some(old) = groups.remove(&id) else { continue };
                    router.remove(id);
                    old.supervisor.stop(None);
                    old.raft.shutdown().await?;
                    // The applies, install or snapshot build the shut-down group had under
                    // way end first: none may write its records after they are cleared,
                    // or beside the store opened anew.
                    if !old.store_gone.wait(Duration::from_secs(60)).await {
                        anyhow::bail!("group {id}: its state machine was still busy 60 s after the group was shut down; start again");
                    }
                    let mut gave_up = Self::gave_up(&groups[&G0].shard, &old, node_id);
                    if gave_up {
                        // A learner being caught up for a vote it is about to get looks
                        // the same from here: its log gives it no vote and the record
                        // does not name it yet. Only the group's leader knows; if its
                        // membership still counts this node, the copy stays (the leader
                        // would find the node's log gone under entries it acknowledged).
                        let nodes = crate::placement::nodes_of(&groups[&G0]);
                        let holders: Vec<String> = holders_from(&groups[&G0], &old, node_id).unwrap_or_default().into_iter().map(|(_, addr)| addr).collect();
                        let remote = crate::remote::RemoteShard::new(id, peers.clone(), Arc::new(move || holders.clone()), Arc::default());
                        // Asked for up to 5 s: at a start, connections and elections
                        // are still settling. Unanswered, the copy stays until the next.
                        let ask_until = tokio::time::Instant::now() + Duration::from_secs(5);
                        gave_up = loop {
                            match remote.leader_view(&nodes).await {
                                Ok((members, _, _)) => break !members.contains(&node_id),
                                Err(e) if tokio::time::Instant::now() >= ask_until => {
                                    tracing::info!(group = id, error = %e, "the group's leader did not say this node left it; its copy is kept until the next start");
                                    break false;
                                }
                                Err(e) => {
                                    tracing::debug!(group = id, error = %e, "asking the group's leader again");
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                }
                            }
                        };
                    }
                    drop(old);
                    if gave_up {
                        let log_dir = dir.join("log").join(format!("g{id}"));
                        let keyspace = keyspace.clone();
                        let snapshots = dir.join("snapshots");
                        tokio::task::spawn_blocking(move || switchboard_raft::store::forget_group(&keyspace, id, &snapshots, &log_dir)).await??;
                        tracing::info!(group = id, "forgot this node's copy of a conversation shard it no longer holds");
                    }
                    groups.insert(id, host.open(id, part_of(id, shards)).await?);
                    forgot = true;
                }
                if forgot {
                    Self::serve_reads(&router, &peers, &groups, node_id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "the metadata group's record of where groups are held may be behind"),
        }
        for group in groups.values().filter(|g| holds_in(&groups[&G0].shard, g, node_id)) {
            group.raft.wait(Some(Duration::from_secs(60))).metrics(|m| m.current_leader.is_some(), "a leader").await?;
        }
        let holding: BTreeMap<GroupId, tokio::sync::watch::Sender<bool>> =
            groups.values().filter(|g| g.id >= FIRST_C).map(|g| (g.id, tokio::sync::watch::Sender::new(holds_in(&groups[&G0].shard, g, node_id)))).collect();
        let holding_task = {
            let (groups, flags) = (groups.clone(), holding.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(crate::remote::HOLDING_CHECK);
                loop {
                    every.tick().await;
                    for (id, flag) in &flags {
                        let now = holds_in(&groups[&G0].shard, &groups[id], node_id);
                        flag.send_if_modified(|held| std::mem::replace(held, now) != now);
                    }
                }
            })
        };
        // A group still on older routing rules (a start that could not adopt them, a copy
        // made before this build, a member upgraded since; a conversation shard on older
        // rules also holds the directory's letters back): its leader adopts the newest
        // every member knows, all groups looked at together every `RULES_CHECK_EVERY`.
        let rules_task = {
            let (groups, peers) = (groups.clone(), peers.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(crate::server::RULES_CHECK_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let (peers, groups) = (&peers, &groups);
                    let behind = groups.values().filter(|group| {
                        group.shard.read().rules < switchboard_actors::core::RULES_VERSION
                            && group.raft.metrics().borrow().current_leader == Some(node_id)
                            && holds_in(&groups[&G0].shard, group, node_id)
                    });
                    let looks = behind.map(|group| {
                        async move {
                            let before = group.shard.read().rules;
                            let cap = rules_cap(groups, group);
                            let adopt = crate::server::adopt_known_rules(&group.raft, peers, node_id, || crate::server::rules_of(&group.shard), cap, |command| group.proposer.submit(command));
                            match tokio::time::timeout(Duration::from_secs(5), adopt).await {
                                Ok(Ok(_)) if group.shard.read().rules > before => tracing::info!(group = group.id, rules = group.shard.read().rules, "adopted routing rules the group was behind on"),
                                Ok(Ok(look)) => tracing::debug!(group = group.id, ?look, "looked at the group's routing rules"),
                                Ok(Err(e)) => tracing::debug!(group = group.id, error = %e, "adopting the routing rules did not go through; asked again later"),
                                Err(_) => tracing::debug!(group = group.id, "adopting the routing rules took too long; asked again later"),
                            }
                        }
                    });
                    futures::future::join_all(looks).await;
                }
            })
        };
        let node = SplitNode { node_id, groups, shards, peers, router, forwarders: Vec::new(), keyspace, endpoint, rpc, remotes: Default::default(), holding, holding_task, rules_task };
        // The newest rules every member of each group knows (this build's once every
        // member runs it; the leaders look again while a group is behind), within one
        // minute for all the groups. The metadata group last: its letters under newer
        // rules wait in a group still on older ones (`rules_cap`).
        let until = crate::server::RulesDeadlines::from_now();
        let in_order = node.groups.values().filter(|g| g.id != G0).chain(std::iter::once(&node.groups[&G0]));
        for group in in_order.filter(|g| node.holds(g.id)) {
            let (state, cap) = (|| crate::server::rules_of(&group.shard), || rules_cap(&node.groups, group));
            crate::server::adopt_rules_at_start(&group.raft, &node.peers, node_id, group.id, until, state, cap, |command| group.proposer.submit(command)).await?;
        }
        Ok(node)
    }

    /// Lets other nodes read the groups this one holds, and sends commands for a
    /// conversation shard it does not hold to the shard's holders (ADR 0012).
    fn serve_reads(router: &Router, peers: &Peers, groups: &BTreeMap<GroupId, HostedGroup>, node_id: u64) {
        let g0 = groups[&G0].shard.clone();
        let all = groups.clone();
        let holds: crate::remote::Holds = Arc::new(move |group| all.get(&group).is_some_and(|g| holds_in(&g0, g, node_id)));
        router.set_reads(Arc::new(crate::remote::MemberReads::new(groups.clone(), peers.clone(), holds)));
        for group in groups.values().filter(|g| g.id >= FIRST_C) {
            let (g0, this) = (groups[&G0].clone(), group.clone());
            group.proposer.route_through(Arc::new(move || holders_from(&g0, &this, node_id)));
        }
    }

    /// Whether this node's copy of conversation shard `group` may be one it gave up: the
    /// metadata group's record names other holders, this node does not vote in it (by
    /// the latest membership its own log holds), and it has a copy. Such a copy is not
    /// needed by any quorum: a node that acknowledged entries as a voter has the
    /// membership that made it one in its log. It is forgotten only once the group's
    /// leader also leaves this node out (see the start), since a learner being caught
    /// up looks the same here.
    fn gave_up(g0: &Shard, group: &HostedGroup, node_id: u64) -> bool {
        let recorded = g0.read().holders.get(&group.id).is_some_and(|nodes| !nodes.contains(&node_id));
        let m = group.raft.metrics().borrow().clone();
        let votes = m.membership_config.membership().voter_ids().any(|v| v == node_id);
        let has_copy = m.last_log_index.is_some() || m.last_applied.is_some();
        recorded && !votes && has_copy
    }

    /// A joining node's first start: asks the members to let it follow the metadata
    /// group, then waits until the placement made it a member of every group and it
    /// caught up with each (saying so every 10 s).
    async fn follow(peers: &Peers, node_id: u64, members: &BTreeMap<u64, String>, groups: &BTreeMap<GroupId, HostedGroup>) -> anyhow::Result<()> {
        let g0 = &groups[&G0].raft;
        if !g0.is_initialized().await? {
            let others: Vec<String> = members.iter().filter(|(id, _)| **id != node_id).map(|(_, a)| a.clone()).collect();
            let Some(own) = members.get(&node_id).cloned() else { anyhow::bail!("node {node_id} is not in its own `members`") };
            crate::server::join_cluster(peers, node_id, &others, G0, switchboard_raft::members::Change::Learn { id: node_id, addr: own }, false).await?;
        }
        let started = tokio::time::Instant::now();
        // Every node holds the metadata group and the routing shard; a conversation shard
        // only where the placement gives it a vote (ADR 0012), which it catches up with
        // later, in its own time.
        for group in groups.values() {
            loop {
                // Asked again each round: the record may name the group's holders meanwhile.
                if !holds_in(&groups[&G0].shard, group, node_id) {
                    break;
                }
                let member = group
                    .raft
                    .wait(Some(Duration::from_secs(10)))
                    .metrics(|m| m.membership_config.membership().get_node(&node_id).is_some() && m.current_leader.is_some(), "a member of the group that knows its leader")
                    .await
                    .is_ok();
                // Caught up: applied what the leader had committed when asked.
                let caught_up = member && switchboard_raft::network::read_barrier(&group.raft, peers, group.id, Duration::from_secs(10)).await.is_ok();
                if caught_up {
                    break;
                }
                if group.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
                    anyhow::bail!("group {} stopped while this node waited to join it", group.id);
                }
                if started.elapsed() >= Duration::from_secs(600) {
                    anyhow::bail!("group {} did not take this node within 10 minutes", group.id);
                }
                tracing::info!(group = group.id, member, waited_s = started.elapsed().as_secs(), "waiting for the placement to add this node to the group and for it to catch up");
            }
        }
        Ok(())
    }

    /// `members` members in this process, each with its own data folder under `root`
    /// (`n1`, `n2`…) and QUIC endpoint (mutual TLS from one cluster CA in `root/certs`),
    /// every group replicated on all of them, forwarders running.
    pub(crate) async fn cluster(root: &Path, members: u64, shards: u64) -> anyhow::Result<Vec<SplitNode>> {
        let certs = root.join("certs");
        let mut endpoints = Vec::new();
        for id in 1..=members {
            let identity = switchboard_raft::tls::ensure_member(&certs, &format!("node-{id}"), &[])?;
            endpoints.push(switchboard_raft::tls::endpoint(&identity, "127.0.0.1:0".parse()?)?);
        }
        let mut addresses = BTreeMap::new();
        for (i, endpoint) in endpoints.iter().enumerate() {
            addresses.insert(i as u64 + 1, endpoint.local_addr()?.to_string());
        }
        let starts = endpoints.into_iter().enumerate().map(|(i, endpoint)| {
            let (dir, addresses) = (root.join(format!("n{}", i + 1)), addresses.clone());
            async move { SplitNode::member(&dir, i as u64 + 1, endpoint, &addresses, shards, false, MemberSettings::default()).await }
        });
        let mut nodes = futures::future::join_all(starts).await.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        for node in &mut nodes {
            node.forward();
        }
        Ok(nodes)
    }

    /// Starts a forwarder on every group.
    pub(crate) fn forward(&mut self) {
        for (id, group) in &self.groups {
            let others = self.groups.iter().filter(|(other, _)| *other != id).map(|(other, g)| (*other, g.proposer.clone())).collect();
            self.forwarders.push(forward_mail(group.clone(), others, self.node_id));
        }
    }

    /// Stops every group and the forwarders, and closes the node's QUIC endpoint: to
    /// its peers it is gone, as a killed process is.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.shutdown().await
    }

    /// [`SplitNode::stop`] through a shared reference: what a running node's owner
    /// calls; the records are made durable last.
    pub(crate) async fn shutdown(&self) -> anyhow::Result<()> {
        for f in &self.forwarders {
            f.abort();
        }
        self.holding_task.abort();
        self.rules_task.abort();
        // Every group is stopped and the records made durable even if one group's stop
        // fails; the first failure is then told.
        let mut failed = None;
        for group in self.groups.values() {
            group.supervisor.stop(None);
            if let Err(e) = group.raft.shutdown().await {
                tracing::warn!(group = group.id, error = %e, "a group did not stop cleanly");
                failed.get_or_insert(anyhow::anyhow!("group {} did not stop cleanly: {e}", group.id));
            }
        }
        self.rpc.abort();
        self.endpoint.close(0u32.into(), b"stopped");
        let keyspace = self.keyspace.clone();
        tokio::task::spawn_blocking(move || keyspace.persist(fjall::PersistMode::SyncAll)).await??;
        failed.map_or(Ok(()), Err)
    }

    /// Whether this node leads `group` now.
    #[cfg(test)]
    pub(crate) fn leads(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|g| g.raft.metrics().borrow().current_leader == Some(self.node_id))
    }

    pub(crate) async fn submit(&self, group: GroupId, command: Command) -> Result<Reply, switchboard_actors::Error> {
        match self.groups.get(&group) {
            Some(g) => g.proposer.submit(command).await,
            None => Err(switchboard_actors::Error::NotFound(format!("group {group}"))),
        }
    }

    /// Whether this node holds group `id` now: serves its reads from its own replica
    /// (ADR 0012). It holds the metadata group and the routing shard always.
    pub(crate) fn holds(&self, id: GroupId) -> bool {
        self.groups.get(&id).is_some_and(|g| holds_in(&self.groups[&G0].shard, g, self.node_id))
    }

    /// Whether this node holds conversation shard `id`, as of the last look (every
    /// 500 ms); changes when the placement moves the shard to or away from it.
    pub(crate) fn holding(&self, id: GroupId) -> tokio::sync::watch::Receiver<bool> {
        match self.holding.get(&id) {
            Some(flag) => flag.subscribe(),
            None => tokio::sync::watch::Sender::new(true).subscribe(),
        }
    }

    /// Conversation shard `id` read from its holders (for one this node does not hold).
    pub(crate) fn remote(&self, id: GroupId) -> Arc<crate::remote::RemoteShard> {
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        remotes
            .entry(id)
            .or_insert_with(|| {
                let (g0, this, node) = (self.groups[&G0].clone(), self.groups[&id].clone(), self.node_id);
                let members: crate::remote::Members = Arc::new(move || holders_from(&g0, &this, node).unwrap_or_default().into_iter().map(|(_, addr)| addr).collect());
                Arc::new(crate::remote::RemoteShard::new(id, self.peers.clone(), members, self.groups[&id].proposer.written()))
            })
            .clone()
    }

    /// The conversation shard group of conversation `id`.
    pub(crate) fn group_of(&self, id: switchboard_actors::model::ConversationId) -> GroupId {
        Part::conversation_group(FIRST_C, self.shards, id)
    }

    /// Waits up to `within` until `check` holds on `group`'s state.
    pub(crate) async fn until(&self, group: GroupId, within: Duration, check: impl Fn(&switchboard_actors::state::ShardState) -> bool) -> bool {
        let give_up = tokio::time::Instant::now() + within;
        loop {
            if self.groups.get(&group).is_some_and(|g| check(&g.shard.read())) {
                return true;
            }
            if tokio::time::Instant::now() >= give_up {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_actors::model::*;
    use switchboard_actors::state::{ConversationStatus, ShardState};

    const SHARDS: u64 = 2;

    async fn start(dir: &Path, forward: bool) -> SplitNode {
        SplitNode::start(dir, SHARDS, forward).await.expect("the groups start")
    }

    async fn submit(node: &SplitNode, group: GroupId, command: Command) -> Reply {
        node.submit(group, command).await.expect("committed")
    }

    async fn until(node: &SplitNode, group: GroupId, what: &str, check: impl Fn(&ShardState) -> bool) {
        assert!(node.until(group, Duration::from_secs(5), check).await, "group {group}: {what} did not happen within 5 s");
    }

    fn directory() -> Vec<Command> {
        let g = SkillGroupId::new("support");
        vec![
            Command::UpsertSkillGroup(SkillGroupConfig { id: g.clone(), name: "Support".into(), policy: Policy::LongestIdle, offer_timeout_ms: 30_000, sla_ms: 60_000 }),
            Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 1, groups: vec![g.clone()] }),
            Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), name: "Web".into(), kind: "web".into(), default_group: g }),
        ]
    }

    fn visitor(id: &str) -> Visitor {
        Visitor { id: Some(id.into()), name: "Visitor".into(), attributes: vec![] }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conversation_is_queued_assigned_answered_and_released_across_four_groups() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = start(dir.path(), true).await;
        for command in directory() {
            submit(&node, G0, command).await;
        }
        // The metadata group's directory reaches routing and both conversation shards by letter.
        until(&node, R, "ann is known to routing", |s| s.operators.contains_key(&OperatorId::new("ann"))).await;
        for c in [FIRST_C, FIRST_C + 1] {
            until(&node, c, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        }
        submit(&node, R, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).await;

        // A conversation starts in the second conversation shard, which numbers it.
        let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-1") };
        let Reply::Started { conversation } = submit(&node, FIRST_C + 1, start).await else { panic!("not started") };
        assert_eq!(node.group_of(conversation), FIRST_C + 1, "{conversation} is numbered by its shard");
        // Its `Enqueue` reaches routing, which offers it to Ann.
        until(&node, R, "an offer to ann", |s| s.offers.values().any(|o| o.conversation == conversation)).await;
        let offer = node.groups[&R].shard.read().offers.values().find(|o| o.conversation == conversation).map(|o| o.id).expect("offer");

        // Before routing's `Assigned` arrives, the conversation shard refuses her reply.
        let reply = |key: &str| Command::PostOperatorMessage {
            operator: OperatorId::new("ann"),
            conversation,
            key: key.into(),
            text: "Hello, how can I help?".into(),
            attachments: vec![],
        };
        assert!(matches!(node.submit(FIRST_C + 1, reply("k0")).await, Err(switchboard_actors::Error::NotAssigned { .. })));
        submit(&node, R, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }).await;
        until(&node, FIRST_C + 1, "ann holds it", |s| s.conversations.get(&conversation).and_then(|c| c.assigned()) == Some(&OperatorId::new("ann"))).await;
        assert!(matches!(submit(&node, FIRST_C + 1, reply("k1")).await, Reply::Message { duplicate: false, .. }));
        // The message stays in its conversation shard: routing's log never sees it.
        let routing_history = node.groups[&R].shard.history(conversation, 0, 100).expect("history");
        assert!(!routing_history.is_empty() && routing_history.iter().all(|e| !matches!(e.item, switchboard_actors::state::HistoryItem::OperatorMessage { .. })));

        // The customer closes; routing frees Ann's capacity when `Release` arrives.
        submit(&node, FIRST_C + 1, Command::CloseByClient { conversation }).await;
        until(&node, R, "ann has room again", |s| s.operators[&OperatorId::new("ann")].active.is_empty() && s.offers.is_empty()).await;
        // Every letter was confirmed.
        for id in [G0, R, FIRST_C, FIRST_C + 1] {
            until(&node, id, "its letters are confirmed", |s| s.mail_out.values().all(|o| o.is_empty())).await;
        }
        node.stop().await.expect("stops");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn letters_posted_before_a_restart_are_delivered_after_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        // No forwarders: the letters stay posted.
        let node = start(dir.path(), false).await;
        for command in directory() {
            submit(&node, G0, command).await;
        }
        let start_conversation = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-2") };
        // The conversation shard has not heard of the web channel yet: refused.
        assert!(node.submit(FIRST_C, start_conversation.clone()).await.is_err());
        let pending = node.groups[&G0].shard.read().mail_out.values().map(|o| o.unconfirmed().count()).sum::<usize>();
        assert_eq!(pending, 3 * directory().len(), "each directory command is a letter to routing and to each conversation shard");
        node.stop().await.expect("stops");

        // Started again from the data folder: the letters are still there and go out.
        let node = start(dir.path(), true).await;
        until(&node, R, "ann is known to routing", |s| s.operators.contains_key(&OperatorId::new("ann"))).await;
        submit(&node, R, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).await;
        until(&node, FIRST_C, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        let Reply::Started { conversation } = submit(&node, FIRST_C, start_conversation).await else { panic!("not started") };
        until(&node, R, "an offer to ann", |s| s.offers.values().any(|o| o.conversation == conversation)).await;
        until(&node, R, "routing holds it queued", |s| matches!(s.conversations.get(&conversation).map(|c| &c.status), Some(ConversationStatus::Queued { .. }))).await;
        node.stop().await.expect("stops");
    }

    /// Three members in this process, each with its own data folder and QUIC endpoint
    /// (mutual TLS from one cluster CA).
    async fn three_members(root: &Path) -> Vec<SplitNode> {
        SplitNode::cluster(root, 3, SHARDS).await.expect("the members start")
    }

    /// A group adopts the newest routing rules every member that answers knows: a member
    /// on an older build holds newer ones back (each replica must decide with the rules
    /// in force, ADR 0002); a member that cannot be reached does not, while a majority of
    /// the voters answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_adopts_only_the_routing_rules_every_member_knows() {
        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = three_members(root.path()).await;
        let newest = switchboard_actors::core::RULES_VERSION;
        for node in &nodes {
            for (id, _) in &node.groups {
                if node.holds(*id) {
                    until(node, *id, "this build's rules", |s| s.rules == newest).await;
                }
            }
        }
        // Asked through the routing shard's leader (only a leader proposes newer rules),
        // as its own metrics say.
        let leader_of_r = |nodes: &[SplitNode]| nodes.iter().position(|n| n.groups[&R].raft.metrics().borrow().current_leader == Some(n.node_id));
        let mut lead = None;
        for _ in 0..200 {
            lead = leader_of_r(&nodes);
            if lead.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let lead = lead.expect("the routing shard elects a leader");
        let other = (lead + 1) % 3;
        let (first, raft) = (&nodes[lead], nodes[lead].groups[&R].raft.clone());
        assert_eq!(crate::server::rules_every_member_knows(&raft, &first.peers, first.node_id, false).await, Some(newest));
        // A member that says it runs an older build holds the newer rules back.
        nodes[other].router.set_rules(newest - 1);
        assert_eq!(crate::server::rules_every_member_knows(&raft, &first.peers, first.node_id, false).await, Some(newest - 1));
        // A group still on old rules adopts those, not this build's; a follower leaves it
        // to the leader.
        let proposed = std::sync::Mutex::new(Vec::new());
        let current = std::sync::atomic::AtomicU32::new(3);
        let propose = |command: Command| {
            if let Command::AdoptRules { version } = &command {
                current.store(*version, std::sync::atomic::Ordering::Relaxed);
            }
            proposed.lock().expect("lock").push(command);
            std::future::ready(Ok(Reply::Done))
        };
        let state = || (current.load(std::sync::atomic::Ordering::Relaxed), false);
        let follower = &nodes[other];
        let look = crate::server::adopt_known_rules(&follower.groups[&R].raft, &follower.peers, follower.node_id, state, newest, propose).await;
        assert_eq!(look, Ok(crate::server::RulesLook::NotLeader));
        let look = crate::server::adopt_known_rules(&raft, &first.peers, first.node_id, state, newest, propose).await;
        assert_eq!(look, Ok(crate::server::RulesLook::Held(newest - 1)));
        assert_eq!(*proposed.lock().expect("lock"), vec![Command::AdoptRules { version: newest - 1 }]);
        // A member that cannot be asked holds them back too (it may come back on an old
        // build), except in a new group (a new cluster's), where a majority of the voters
        // answering is enough.
        nodes[other].router.set_rules(newest);
        let asker_id = first.node_id;
        let gone = nodes.remove(other);
        gone.stop().await.expect("stops");
        let lead = nodes.iter().position(|n| n.node_id == asker_id).expect("the asker runs");
        let asker = &nodes[lead];
        assert_eq!(crate::server::rules_every_member_knows(&raft, &asker.peers, asker.node_id, false).await, None, "a member did not answer");
        assert_eq!(crate::server::rules_every_member_knows(&raft, &asker.peers, asker.node_id, true).await, Some(newest), "a new group: two voters of three answered");
        let third = nodes.remove(1 - lead);
        third.stop().await.expect("stops");
        assert_eq!(crate::server::rules_every_member_knows(&raft, &nodes[0].peers, nodes[0].node_id, true).await, None, "one voter of three answers: not enough to go by");
        nodes.remove(0).stop().await.expect("stops");
    }


    /// Submits through `node` (which forwards to the group's leader), again while the
    /// group elects a new one; the answer of the attempt that was committed.
    async fn submit_until_committed(node: &SplitNode, group: GroupId, command: Command) -> Result<Reply, switchboard_actors::Error> {
        let mut last = None;
        for _ in 0..100 {
            match node.submit(group, command.clone()).await {
                Err(switchboard_actors::Error::Commit(e)) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
        panic!("group {group}: not committed after 100 tries: {last:?}");
    }

    /// `Change::Lead`: the conversation shard's leadership is handed to each of the
    /// other members in turn while messages are written through a third; every write is
    /// answered (none refused, none lost) and lands once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leadership_is_handed_on_while_messages_are_written() {
        let root = tempfile::tempdir().expect("temp dir");
        let nodes = Arc::new(three_members(root.path()).await);
        for command in directory() {
            submit(&nodes[0], G0, command).await;
        }
        until(&nodes[0], FIRST_C, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-lead") };
        let Reply::Started { conversation } = submit(&nodes[0], FIRST_C, start).await else { panic!("not started") };
        // A writer on each node, for as long as the hand-overs take.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|i| {
                let (nodes, stop) = (nodes.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut keys = Vec::new();
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = format!("w{i}-{n}");
                        let message = Command::PostClientMessage { conversation, key: key.clone(), text: "hi".into(), attachments: vec![] };
                        match nodes[i].submit(FIRST_C, message).await {
                            Ok(Reply::Message { .. }) => keys.push(key),
                            other => panic!("{key} was answered {other:?} while leadership moved"),
                        }
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    keys
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let leader = |nodes: &[SplitNode]| nodes.iter().find(|n| n.leads(FIRST_C)).map(|n| n.node_id);
        for _ in 0..3 {
            let from = leader(&nodes).expect("a leader");
            let to = if from == 3 { 1 } else { from + 1 };
            let asked = &nodes[(to as usize) - 1];
            let started = std::time::Instant::now();
            switchboard_raft::members::apply_anywhere(&asked.router, &asked.peers, FIRST_C, switchboard_raft::members::Change::Lead { to }, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("leadership of group {FIRST_C} from node {from} to node {to}: {e}"));
            assert!(nodes[(to as usize) - 1].leads(FIRST_C), "node {to} leads now");
            println!("group {FIRST_C}: node {from} handed its leadership to node {to} in {:?}", started.elapsed());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut written = Vec::new();
        for w in writers {
            written.extend(w.await.expect("writer"));
        }
        assert!(written.len() > 30, "writes went on: {}", written.len());
        let history = nodes[1].groups[&FIRST_C].shard.history(conversation, 0, 100_000).expect("history");
        for key in &written {
            let copies = history.iter().filter(|e| matches!(&e.item, switchboard_actors::state::HistoryItem::ClientMessage { key: k, .. } if k == key)).count();
            assert_eq!(copies, 1, "{key} is there once");
        }
        if let Ok(nodes) = Arc::try_unwrap(nodes) {
            for node in nodes {
                node.stop().await.expect("stops");
            }
        }
    }

    /// A node removed from the cluster hands on every leadership it holds before its vote
    /// there goes, also after it has left the metadata group (whose members the placement
    /// counts as the cluster's nodes): a change that took the vote from a sitting leader
    /// would leave its group without a leader until an election, and the writes in flight
    /// there without an answer. Here node 3 leads the routing shard and a conversation
    /// shard, not the metadata group, while node 1 writes to both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_removed_hands_on_what_it_leads_before_its_votes_go() {
        use crate::placement::Step;
        let root = tempfile::tempdir().expect("temp dir");
        let nodes = Arc::new(three_members(root.path()).await);
        for command in directory() {
            submit(&nodes[0], G0, command).await;
        }
        until(&nodes[0], FIRST_C, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-leaving") };
        let Reply::Started { conversation } = submit(&nodes[0], FIRST_C, start).await else { panic!("not started") };
        let lead = |group: GroupId, to: u64| {
            let nodes = nodes.clone();
            async move {
                let asked = &nodes[(to as usize) - 1];
                switchboard_raft::members::apply_anywhere(&asked.router, &asked.peers, group, switchboard_raft::members::Change::Lead { to }, Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|e| panic!("leadership of group {group} to node {to}: {e}"));
            }
        };
        for group in [R, FIRST_C] {
            lead(group, 3).await;
        }
        if nodes[2].leads(G0) {
            lead(G0, 1).await;
        }
        assert!(nodes[2].leads(R) && nodes[2].leads(FIRST_C) && !nodes[2].leads(G0), "node 3 leads the routing shard and a conversation shard only");

        // Writes through node 1 into both groups node 3 leads, for as long as the removal takes.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (nodes, stop) = (nodes.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("leaving-{n}");
                    let message = Command::PostClientMessage { conversation, key: key.clone(), text: "still here".into(), attachments: vec![] };
                    match nodes[0].submit(FIRST_C, message).await {
                        Ok(Reply::Message { .. }) => {}
                        other => panic!("{key} was answered {other:?} while node 3 was removed"),
                    }
                    match nodes[0].submit(R, Command::RouteQueue { group: SkillGroupId::new("support") }).await {
                        Ok(_) => {}
                        other => panic!("a routing command was answered {other:?} while node 3 was removed"),
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                n
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let steps = crate::placement::remove(&nodes[0], 3, Duration::from_secs(60)).await.expect("node 3 is removed");
        println!("removing node 3: {steps:?}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.await.expect("every write was answered");
        assert!(written > 10, "writes went on: {written}");
        for group in [R, FIRST_C] {
            let first = steps.iter().find(|s| matches!(s, Step::Lead { group: g, .. } | Step::Voters { group: g, .. } if *g == group));
            assert!(matches!(first, Some(Step::Lead { to, .. }) if *to != 3), "group {group}'s leadership was handed on before node 3's vote went: {steps:?}");
        }
        for group in [G0, R, FIRST_C] {
            let m = nodes[0].groups[&group].raft.metrics().borrow().clone();
            assert!(m.membership_config.membership().get_node(&3).is_none(), "node 3 left group {group}: {:?}", m.membership_config);
        }
        if let Ok(nodes) = Arc::try_unwrap(nodes) {
            for node in nodes {
                node.stop().await.expect("stops");
            }
        }
    }

    /// Whether every group is quiet on every member: its leader beats slowly, the others
    /// wait for those beats (`switchboard_raft::quiet`).
    fn all_quiet(nodes: &[SplitNode], groups: &[GroupId]) -> bool {
        groups.iter().all(|g| {
            nodes.iter().all(|n| {
                let q = n.router.quietness(*g);
                if n.leads(*g) {
                    q.leading
                } else {
                    q.following
                }
            })
        })
    }

    async fn until_quiet(nodes: &[SplitNode], groups: &[GroupId], what: &str) {
        for _ in 0..300 {
            if all_quiet(nodes, groups) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen: Vec<_> = groups.iter().flat_map(|g| nodes.iter().map(move |n| (*g, n.node_id, n.leads(*g), n.router.quietness(*g)))).collect();
        panic!("{what}: not every group went quiet within 15 s: {seen:?}");
    }

    /// Idle conversation shards go quiet: a follower hears a beat every 500 ms instead
    /// of an append every 50 ms (the metadata group and the routing shard stay awake). A
    /// write through a follower wakes its group and is committed; the group goes quiet
    /// again; and when the member leading a quiet group stops, the survivors elect a
    /// new leader for it and take writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_groups_go_quiet_wake_for_a_write_and_elect_when_their_leader_stops() {
        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = three_members(root.path()).await;
        for command in directory() {
            submit(&nodes[0], G0, command).await;
        }
        let groups = [FIRST_C, FIRST_C + 1];
        for c in groups {
            until(&nodes[0], c, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        }
        until_quiet(&nodes, &groups, "after the directory was written").await;
        for group in [G0, R] {
            for node in &nodes {
                assert_eq!(node.router.quietness(group), Default::default(), "group {group} stays awake on node {}", node.node_id);
            }
        }

        // Beats, not heartbeats: at most a few appends in 2 s (about 40 when awake).
        let follower = nodes.iter().position(|n| !n.leads(FIRST_C)).expect("a follower");
        let before = nodes[follower].router.appends_received(FIRST_C);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let beats = nodes[follower].router.appends_received(FIRST_C) - before;
        println!("a quiet group's follower heard {beats} appends in 2 s");
        assert!((1..=8).contains(&beats), "a quiet group's follower heard {beats} appends in 2 s");

        // A write through that follower wakes the group and is committed.
        let started = std::time::Instant::now();
        let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-quiet") };
        let Reply::Started { conversation } = submit(&nodes[follower], FIRST_C, start).await else { panic!("not started") };
        println!("a write to a quiet group was answered in {:?}", started.elapsed());
        until(&nodes[0], R, "routing hears of the conversation", |s| s.conversations.contains_key(&conversation)).await;
        until_quiet(&nodes, &groups, "after a write").await;

        // The member leading the second conversation shard stops while it is quiet.
        let victim = nodes.iter().position(|n| n.leads(FIRST_C + 1)).expect("a leader of the second shard");
        let led: Vec<GroupId> = [G0, R, FIRST_C, FIRST_C + 1].into_iter().filter(|g| nodes[victim].leads(*g)).collect();
        nodes.remove(victim).stop().await.expect("stops");
        let stopped = std::time::Instant::now();
        for group in &led {
            let elected = loop {
                if let Some(n) = nodes.iter().find(|n| n.leads(*group)) {
                    break n.node_id;
                }
                assert!(stopped.elapsed() < Duration::from_secs(20), "group {group}: no new leader 20 s after its quiet leader stopped");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            println!("group {group}: node {elected} leads {:?} after its quiet leader stopped", stopped.elapsed());
        }
        let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-after") };
        let Ok(Reply::Started { conversation }) = submit_until_committed(&nodes[0], FIRST_C + 1, start).await else { panic!("not started after the stop") };
        for node in &nodes {
            until(node, R, "routing hears of the conversation started after the stop", |s| s.conversations.contains_key(&conversation)).await;
        }
        for node in nodes {
            node.stop().await.expect("stops");
        }
    }

    /// ADR 0012 step 2: a node that holds no copy of a conversation shard (here an
    /// endpoint with a node certificate and no group at all) reads it from the shard's
    /// members over QUIC: a visitor's history, an operator's feed, lookups across the
    /// shards, and wake-ups of the conversation's stream; and keeps doing so once the
    /// member it asked is stopped. A gateway's certificate may not read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_a_copy_reads_a_conversation_shard_from_its_members_through_a_member_s_stop() {
        use crate::remote::RemoteShard;
        use switchboard_actors::shard::StreamKey;
        use switchboard_gateway::ShardReads;

        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = three_members(root.path()).await;
        let first = &nodes[0];
        for command in directory() {
            submit(first, G0, command).await;
        }
        until(first, R, "ann is known to routing", |s| s.operators.contains_key(&OperatorId::new("ann"))).await;
        submit(first, R, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).await;
        for c in [FIRST_C, FIRST_C + 1] {
            until(first, c, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        }
        let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-far") };
        let Reply::Started { conversation } = submit(first, FIRST_C + 1, start).await else { panic!("not started") };
        let group = first.group_of(conversation);
        until(first, R, "an offer to ann", |s| s.offers.values().any(|o| o.conversation == conversation)).await;
        let offer = first.groups[&R].shard.read().offers.values().find(|o| o.conversation == conversation).map(|o| o.id).expect("offer");
        submit(first, R, Command::AcceptOffer { operator: OperatorId::new("ann"), offer }).await;
        until(first, group, "ann holds it", |s| s.conversations.get(&conversation).and_then(|c| c.assigned()) == Some(&OperatorId::new("ann"))).await;
        let message = |key: &str| Command::PostClientMessage { conversation, key: key.into(), text: format!("message {key}"), attachments: vec![] };
        submit(first, group, message("m1")).await;

        // The outsider: a node's certificate from the cluster CA, and no group.
        let certs = root.path().join("certs");
        let identity = switchboard_raft::tls::ensure_member(&certs, "node-4", &[]).expect("certificate");
        let endpoint = switchboard_raft::tls::endpoint(&identity, "127.0.0.1:0".parse().expect("address")).expect("endpoint");
        let peers = Peers::new(endpoint.clone());
        let addresses: Vec<String> = nodes.iter().map(|n| n.endpoint.local_addr().expect("bound").to_string()).collect();
        let members: crate::remote::Members = { let a = addresses.clone(); Arc::new(move || a.clone()) };
        let remote = RemoteShard::new(group, peers.clone(), members.clone(), Arc::default());
        let other = RemoteShard::new(FIRST_C + FIRST_C + 1 - group, peers.clone(), members.clone(), Arc::default());
        let ann = OperatorId::new("ann");

        // What a member's replica holds is what the outsider reads.
        let held = &first.groups[&group].shard;
        for node in &nodes {
            assert!(node.until(group, Duration::from_secs(5), |s| s.conversations.get(&conversation).is_some_and(|c| c.last_seq() == held.read().conversations[&conversation].last_seq())).await);
        }
        assert_eq!(remote.history(conversation, 0, 1000).await.expect("history"), held.history(conversation, 0, 1000).expect("local history"));
        assert_eq!(remote.history(conversation, 2, 1).await.expect("a page"), held.history(conversation, 2, 1).expect("local page"));
        let seen = ShardReads::conversation(&remote, conversation).await.expect("conversation").expect("found");
        let mut local = held.conversation(conversation).expect("local").expect("found");
        // Idempotency keys and the customer text's count are the member's own
        // bookkeeping: not carried.
        local.keys = Default::default();
        local.client_text_bytes = 0;
        local.staff_text_bytes = 0;
        assert_eq!(format!("{seen:?}"), format!("{local:?}"));
        assert_eq!(remote.feed_since(&ann, 0, 1000).await.expect("feed"), held.feed_since(&ann, 0, 1000).expect("local feed"));
        assert!(remote.feed_since(&ann, 0, 1000).await.expect("feed").is_some_and(|f| !f.is_empty()), "ann's feed in the shard has items");
        let bounds = remote.feed_bounds(&ann).await.expect("bounds").expect("ann has a feed there");
        assert_eq!(bounds.1, held.read().operators[&ann].feed.last_seq);
        // Lookups that span the shards: each shard's members are asked.
        let mut found = Vec::new();
        for shard in [&remote, &other] {
            found.extend(shard.conversations_of("v-far", 10).await.expect("lookup").into_iter().map(|c| c.id));
        }
        assert_eq!(found, vec![conversation], "the visitor's conversation is found in its shard only");
        assert_eq!(other.history(conversation, 0, 10).await.expect("the other shard answers"), vec![], "the other shard has no entry of it");
        assert!(ShardReads::conversation(&remote, ConversationId(u64::MAX)).await.expect("answered").is_none());

        // Wake-ups: the outsider follows the conversation's stream on a member.
        let mut wake = remote.subscribe(StreamKey::Conversation(conversation)).expect("follows");
        let woken = |wake: &mut switchboard_actors::shard::Wakeups| {
            let mut wake = wake.clone();
            async move { tokio::time::timeout(Duration::from_secs(10), wake.changed()).await.is_ok() }
        };
        assert!(woken(&mut wake).await, "the first wake-up comes once a member is followed");
        wake.mark_unchanged();
        let published_before = nodes.iter().map(|n| n.groups[&group].shard.published_index()).max().unwrap_or(0);
        assert!(remote.read_floor() <= published_before);
        submit(&nodes[1], group, message("m2")).await;
        assert!(woken(&mut wake).await, "a message written through another node wakes the outsider");
        wake.mark_unchanged();
        // The wake-up named the log index the member had written when m2 moved the
        // stream: the outsider's reads ask for at least that much, from any member.
        assert!(remote.read_floor() > published_before, "the wake-up raised the read floor past {published_before}: {}", remote.read_floor());
        let keys = |history: Vec<switchboard_actors::state::HistoryEntry>| -> Vec<String> {
            history.into_iter().filter_map(|e| match e.item { switchboard_actors::state::HistoryItem::ClientMessage { key, .. } => Some(key), _ => None }).collect()
        };
        assert_eq!(keys(remote.history(conversation, 0, 1000).await.expect("history")), vec!["m1", "m2"]);

        // The member asked (the first that answered: node 1) stops. The outsider asks
        // another, and follows the stream there.
        nodes.remove(0).stop().await.expect("stops");
        let survivor = &nodes[0];
        let acked = submit_until_committed(survivor, group, message("m3")).await;
        assert!(matches!(acked, Ok(Reply::Message { .. })), "m3 was answered {acked:?}");
        assert!(woken(&mut wake).await, "the outsider is woken through another member");
        let mut history = Vec::new();
        for _ in 0..100 {
            history = keys(remote.history(conversation, 0, 1000).await.expect("history from a survivor"));
            if history.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(history, vec!["m1", "m2", "m3"], "every acknowledged message, once, in order");
        remote.barrier().await.expect("a survivor catches up with the leader");

        // Read-your-writes: a read carries the log index this node's last write got. A
        // member that applied it answers; none answers one that no member applied.
        let applied = survivor.groups[&group].raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        let floor = crate::remote::Floor::new(std::sync::atomic::AtomicU64::new(applied));
        let bound = RemoteShard::new(group, peers.clone(), members.clone(), floor.clone());
        assert_eq!(keys(bound.history(conversation, 0, 1000).await.expect("read at the applied index")), vec!["m1", "m2", "m3"]);
        floor.store(applied + 1_000_000, std::sync::atomic::Ordering::Release);
        match bound.history(conversation, 0, 1000).await {
            Err(switchboard_actors::Error::Unreachable(why)) => assert!(why.contains("not applied"), "{why}"),
            other => panic!("a read past every member's log was answered {other:?}"),
        }

        // An outbox's question to the node that left an attempt: each entry's state,
        // `NEVER_SENT` included; `Sending` (what nodes of earlier builds ask) hears only
        // whether it is being sent.
        {
            use switchboard_raft::network::sending_state::{NEVER_SENT, NOT_SENDING, SENDING};
            survivor.router.set_sending(Arc::new(|keys: &[(u64, u64)]| keys.iter().map(|(_, seq)| [NOT_SENDING, SENDING, NEVER_SENT][(*seq % 3) as usize]).collect()));
            let addr = survivor.endpoint.local_addr().expect("bound").to_string();
            let keys = vec![(1, 0), (1, 1), (1, 2)];
            assert_eq!(peers.sending_states(&addr, keys.clone(), Duration::from_secs(2)).await.expect("answered"), vec![NOT_SENDING, SENDING, NEVER_SENT]);
            assert_eq!(peers.sending(&addr, keys, Duration::from_secs(2)).await.expect("answered"), vec![false, true, false]);
        }

        // A gateway's certificate relays sockets; it may not read a group's state.
        let gateway = switchboard_raft::tls::ensure_member_as(&certs, "gateway-1", switchboard_raft::tls::Role::Gateway, &[]).expect("certificate");
        let gateway_endpoint = switchboard_raft::tls::client_endpoint(&gateway, "127.0.0.1:0".parse().expect("address")).expect("endpoint");
        let refused = RemoteShard::new(group, Peers::new(gateway_endpoint.clone()), members.clone(), Arc::default());
        match refused.history(conversation, 0, 10).await {
            Err(switchboard_actors::Error::Unreachable(why)) => assert!(why.contains("gateway"), "refused for its role: {why}"),
            other => panic!("a gateway's read was answered {other:?}"),
        }
        assert!(refused.subscribe(StreamKey::Conversation(conversation)).is_ok_and(|w| w.has_changed().is_ok()));

        drop(wake);
        gateway_endpoint.close(0u32.into(), b"done");
        endpoint.close(0u32.into(), b"done");
        for node in nodes {
            node.stop().await.expect("stops");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killing_the_leader_of_a_conversation_shard_loses_no_message_and_no_letter() {
        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = three_members(root.path()).await;
        // Each member created one group and leads it: the leaders start spread.
        for (node, group) in nodes.iter().zip([G0, R, FIRST_C]) {
            assert!(node.leads(group), "node {} leads the group it created ({group})", node.node_id);
        }
        assert!(nodes[0].leads(FIRST_C + 1), "node 1 created the fourth group too");
        let first = &nodes[0];
        for command in directory() {
            submit(first, G0, command).await;
        }
        submit(first, G0, Command::UpsertOperator(OperatorConfig { id: OperatorId::new("bob"), name: "Bob".into(), capacity: 2, groups: vec![SkillGroupId::new("support")] })).await;
        until(first, R, "bob is known to routing", |s| s.operators.contains_key(&OperatorId::new("bob"))).await;
        for op in ["ann", "bob"] {
            submit(first, R, Command::SetPresence { operator: OperatorId::new(op), presence: Presence::Online }).await;
        }
        for c in [FIRST_C, FIRST_C + 1] {
            until(first, c, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        }
        // Three conversations over both shards, each offered and accepted.
        let mut conversations = Vec::new();
        for (i, shard) in [0u64, 1, 1].into_iter().enumerate() {
            let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor(&format!("v-{i}")) };
            let Reply::Started { conversation } = submit(&nodes[i], FIRST_C + shard, start).await else { panic!("not started") };
            until(first, R, "an offer", |s| s.offers.values().any(|o| o.conversation == conversation)).await;
            let offer = first.groups[&R].shard.read().offers.values().find(|o| o.conversation == conversation).map(|o| (o.operator.clone(), o.id)).expect("offer");
            submit(first, R, Command::AcceptOffer { operator: offer.0, offer: offer.1 }).await;
            until(first, first.group_of(conversation), "its shard hears who holds it", |s| s.conversations.get(&conversation).is_some_and(|c| c.assigned().is_some())).await;
            conversations.push(conversation);
        }

        // Kill the member that leads the second conversation shard (it may lead others).
        let victim = nodes.iter().position(|n| n.leads(FIRST_C + 1)).expect("a leader of the second shard");
        let mut acked: Vec<(ConversationId, String)> = Vec::new();
        for (n, conversation) in conversations.iter().enumerate() {
            let key = format!("before-{n}");
            let message = Command::PostClientMessage { conversation: *conversation, key: key.clone(), text: "hello".into(), attachments: vec![] };
            assert!(matches!(submit(&nodes[0], first.group_of(*conversation), message).await, Reply::Message { .. }));
            acked.push((*conversation, key));
        }
        nodes.remove(victim).stop().await.expect("stops");

        // The survivors carry on: messages on every conversation, and a close on the
        // killed leader's shard whose `Release` must still reach routing.
        let survivor = &nodes[0];
        for round in 0..3 {
            for (n, conversation) in conversations.iter().enumerate() {
                let key = format!("after-{round}-{n}");
                let message = Command::PostClientMessage { conversation: *conversation, key: key.clone(), text: "still there?".into(), attachments: vec![] };
                match submit_until_committed(survivor, survivor.group_of(*conversation), message).await {
                    Ok(Reply::Message { .. }) => acked.push((*conversation, key)),
                    other => panic!("a message on {conversation} was answered {other:?}"),
                }
            }
        }
        let closed = conversations[1];
        let holder = survivor.groups[&R].shard.read().conversations[&closed].assigned().cloned().expect("held");
        submit_until_committed(survivor, survivor.group_of(closed), Command::CloseByClient { conversation: closed }).await.expect("closed");
        let all: Vec<GroupId> = vec![G0, R, FIRST_C, FIRST_C + 1];
        for node in &nodes {
            for group in &all {
                until(node, *group, "every letter is confirmed", |s| s.mail_out.values().all(|o| o.is_empty())).await;
            }
            until(node, R, "routing frees the closed conversation's holder", |s| !s.operators[&holder].active.contains(&closed)).await;
        }

        // Every acknowledged message is in its conversation exactly once, on both survivors.
        for node in &nodes {
            for conversation in &conversations {
                let shard = &node.groups[&node.group_of(*conversation)].shard;
                let history = shard.history(*conversation, 0, 1000).expect("history");
                for (c, key) in acked.iter().filter(|(c, _)| c == conversation) {
                    let copies = history.iter().filter(|e| matches!(&e.item, switchboard_actors::state::HistoryItem::ClientMessage { key: k, .. } if k == key)).count();
                    assert_eq!(copies, 1, "node {}: message {key} of {c} is there once", node.node_id);
                }
            }
            // Routing and each conversation's shard agree on who holds it; nobody is
            // over capacity.
            let routing = node.groups[&R].shard.read();
            for conversation in &conversations {
                let c = node.groups[&node.group_of(*conversation)].shard.conversation(*conversation).expect("readable").map(|c| c.status);
                let r = routing.conversations.get(conversation).map(|c| c.status.clone()).or(Some(ConversationStatus::Closed));
                assert_eq!(c, r, "node {}: {conversation} is in the same place in both shards", node.node_id);
            }
            for op in routing.operators.values() {
                assert!(op.load() <= op.config.capacity, "{} over capacity", op.config.id);
            }
        }
        for node in nodes {
            node.stop().await.expect("stops");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offer_expires_on_the_routing_shard_s_new_leader_and_goes_to_someone_else() {
        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = three_members(root.path()).await;
        let g = SkillGroupId::new("support");
        let setup = [
            Command::UpsertSkillGroup(SkillGroupConfig { id: g.clone(), name: "Support".into(), policy: Policy::LongestIdle, offer_timeout_ms: 1000, sla_ms: 60_000 }),
            Command::UpsertOperator(OperatorConfig { id: OperatorId::new("ann"), name: "Ann".into(), capacity: 1, groups: vec![g.clone()] }),
            Command::UpsertOperator(OperatorConfig { id: OperatorId::new("bob"), name: "Bob".into(), capacity: 1, groups: vec![g.clone()] }),
            Command::UpsertChannel(ChannelConfig { id: ChannelId::new("web"), name: "Web".into(), kind: "web".into(), default_group: g }),
        ];
        for command in setup {
            submit(&nodes[0], G0, command).await;
        }
        until(&nodes[0], R, "bob is known to routing", |s| s.operators.contains_key(&OperatorId::new("bob"))).await;
        until(&nodes[0], FIRST_C, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        submit(&nodes[0], R, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).await;
        let start = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-9") };
        let Reply::Started { conversation } = submit(&nodes[0], FIRST_C, start).await else { panic!("not started") };
        until(&nodes[0], R, "an offer to ann", |s| s.offers.values().any(|o| o.conversation == conversation)).await;

        // Ann does not answer, and the routing shard's leader dies with her offer's
        // timer: its new leader's actors arm the timer again from the stored deadline.
        let victim = nodes.iter().position(|n| n.leads(R)).expect("a leader of routing");
        nodes.remove(victim).stop().await.expect("stops");
        let survivor = &nodes[0];
        submit_until_committed(survivor, R, Command::SetPresence { operator: OperatorId::new("bob"), presence: Presence::Online }).await.expect("bob online");
        let offered_to_bob = |s: &ShardState| s.offers.values().find(|o| o.conversation == conversation && o.operator == OperatorId::new("bob")).map(|o| o.id);
        assert!(survivor.until(R, Duration::from_secs(10), |s| offered_to_bob(s).is_some()).await, "ann's offer expired on the new leader and bob was offered the conversation");
        let offer = offered_to_bob(&survivor.groups[&R].shard.read()).expect("offer");
        submit_until_committed(survivor, R, Command::AcceptOffer { operator: OperatorId::new("bob"), offer }).await.expect("bob accepts");
        for node in &nodes {
            until(node, FIRST_C, "bob holds it in its conversation shard", |s| s.conversations.get(&conversation).and_then(|c| c.assigned()) == Some(&OperatorId::new("bob"))).await;
            let routing = node.groups[&R].shard.read();
            assert!(routing.operators[&OperatorId::new("ann")].active.is_empty(), "one holder (I2)");
        }
        for node in nodes {
            node.stop().await.expect("stops");
        }
    }
}
