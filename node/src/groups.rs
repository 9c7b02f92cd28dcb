//! Several Raft groups on one node, each playing one part of ADR 0006's split (a
//! routing shard, conversation shards), and the mail forwarder that carries each
//! group's letters to the others.
//!
//! Not used by `switchboard node` or `dev` yet: they run one group that plays the whole
//! (`server.rs`). What is here is the node side of the split, tested on real groups
//! (openraft, the log's segment files, the fjall records) in this module's tests; the
//! gateway reading and submitting per group comes next (ADR 0006, "Built so far").

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_actors::core::{Part, Reply};
use switchboard_actors::mail::{GroupId, Mail};
use switchboard_actors::model::Command;
use switchboard_actors::shard::Shard;
use switchboard_raft::member_config;
use switchboard_raft::network::{Forwarder, NetworkFactory, Peers, Router};
use switchboard_raft::store::open_group;
use switchboard_raft::Raft;

use crate::server::{hold_elections_after_restart, restamp_forwarded, RaftProposer, ShardMachine};

/// One group this node hosts: its Raft, its shard (the state machine) and the proposer
/// that commits commands through whichever node leads it.
#[derive(Clone)]
pub(crate) struct HostedGroup {
    pub(crate) id: GroupId,
    pub(crate) raft: Raft,
    pub(crate) shard: Arc<Shard>,
    pub(crate) proposer: RaftProposer,
}

/// What every group on a node shares.
pub(crate) struct Host<'a> {
    pub(crate) node_id: u64,
    pub(crate) data_dir: &'a Path,
    pub(crate) keyspace: &'a fjall::Keyspace,
    pub(crate) snapshot_every: u64,
    pub(crate) peers: &'a Peers,
    pub(crate) router: &'a Router,
}

impl Host<'_> {
    /// Opens group `id` playing `part` from this node's data folder (its log under
    /// `log/g<id>`, its records in its partition of the keyspace) and serves it to peers.
    pub(crate) async fn open(&self, id: GroupId, part: Part) -> anyhow::Result<HostedGroup> {
        let shard = Arc::new(Shard::with_part(part));
        let log_dir = self.data_dir.join("log").join(format!("g{id}"));
        let (log, sm) = open_group(self.keyspace, id, Arc::new(ShardMachine { shard: shard.clone() }), &self.data_dir.join("snapshots"), &log_dir)
            .with_context(|| format!("open group {id}"))?;
        let config = member_config(self.snapshot_every, self.node_id, id)?;
        let raft = Raft::new(self.node_id, config, NetworkFactory::with_peers(self.peers.clone(), id), log, sm).await?;
        self.router.add(id, raft.clone());
        self.router.check_writes(id, Arc::new(restamp_forwarded));
        hold_elections_after_restart(&raft, self.router, id).await?;
        let proposer = RaftProposer::start(id, raft.clone(), self.node_id, Forwarder::new(self.peers.clone()));
        Ok(HostedGroup { id, raft, shard, proposer })
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
/// is dropped by the destination's inbox.
pub(crate) fn forward_mail(source: HostedGroup, destinations: BTreeMap<GroupId, RaftProposer>, node_id: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut published = source.shard.published_watch();
        let mut metrics = source.raft.metrics();
        let mut backoff = Duration::from_millis(20);
        loop {
            let leads = metrics.borrow().current_leader == Some(node_id);
            if !leads {
                if metrics.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let pending: Vec<(GroupId, Vec<(u64, Mail)>)> = {
                let state = source.shard.read();
                state
                    .mail_out
                    .iter()
                    .filter(|(_, outbox)| !outbox.is_empty())
                    .map(|(to, outbox)| (*to, outbox.unconfirmed().take(LETTERS_AT_ONCE).map(|(id, m)| (id, m.clone())).collect()))
                    .collect()
            };
            if pending.is_empty() {
                // Looked after the last change was marked seen: a letter posted since
                // wakes this at once.
                published.borrow_and_update();
                let still_empty = source.shard.read().mail_out.values().all(|o| o.is_empty());
                if still_empty {
                    tokio::select! {
                        changed = published.changed() => if changed.is_err() { return },
                        _ = metrics.changed() => {}
                    }
                }
                continue;
            }
            let mut failed = false;
            for (to, letters) in pending {
                let Some(destination) = destinations.get(&to) else {
                    tracing::error!(from = source.id, to, "letters for a group this node does not know; they wait");
                    failed = true;
                    continue;
                };
                let first = letters.first().map_or(0, |(id, _)| *id);
                let sends = letters.into_iter().map(|(id, mail)| destination.submit(Command::Deliver { from: source.id, id, mail }));
                let answers = futures::future::join_all(sends).await;
                let mut last = None;
                for answer in answers {
                    match answer {
                        Ok(Reply::Delivered { last: applied }) => last = Some(last.unwrap_or(0).max(applied)),
                        Ok(other) => tracing::error!(from = source.id, to, ?other, "a letter was answered with something else"),
                        Err(e) => {
                            tracing::debug!(from = source.id, to, error = %e, "a letter did not get through; it is sent again");
                            failed = true;
                        }
                    }
                }
                if let Some(upto) = last.filter(|upto| *upto >= first) {
                    if let Err(e) = source.proposer.submit(Command::ConfirmMail { to, upto }).await {
                        tracing::debug!(from = source.id, to, error = %e, "confirming letters did not go through; they are sent again");
                        failed = true;
                    }
                }
            }
            if failed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            } else {
                backoff = Duration::from_millis(20);
            }
        }
    })
}

/// The routing shard's group id, and the first conversation shard's: conversation
/// shard `k` of `n` is group `FIRST_C + k`.
pub(crate) const R: GroupId = 1;
pub(crate) const FIRST_C: GroupId = 2;

/// The part group `id` plays on a node that splits into one routing shard and
/// `shards` conversation shards.
pub(crate) fn part_of(id: GroupId, shards: u64) -> Part {
    if id == R {
        Part::Routing { first: FIRST_C, shards }
    } else {
        Part::Conversations { routing: R, shard: id - FIRST_C, shards }
    }
}

/// One node alone hosting the routing shard and `shards` conversation shards (every
/// group a one-member Raft group on it), with a forwarder on each.
pub(crate) struct SplitNode {
    pub(crate) groups: BTreeMap<GroupId, HostedGroup>,
    pub(crate) shards: u64,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    _keyspace: fjall::Keyspace,
    _rpc: tokio::task::JoinHandle<()>,
}

impl SplitNode {
    /// Opens (or creates) the groups in `dir`; with `forward`, their letters flow.
    pub(crate) async fn start(dir: &Path, shards: u64, forward: bool) -> anyhow::Result<SplitNode> {
        let identity = switchboard_raft::tls::ensure_member(&dir.join("certs"), "node-1", &[])?;
        let endpoint = switchboard_raft::tls::endpoint(&identity, "127.0.0.1:0".parse()?)?;
        let addr = endpoint.local_addr()?.to_string();
        let ids: Vec<GroupId> = std::iter::once(R).chain((0..shards).map(|k| FIRST_C + k)).collect();
        let keyspace = switchboard_raft::store::open_keyspace(&dir.join("records"), &ids)?;
        let (peers, router) = (Peers::new(endpoint.clone()), Router::default());
        let rpc = switchboard_raft::network::serve(endpoint, router.clone());
        let host = Host { node_id: 1, data_dir: dir, keyspace: &keyspace, snapshot_every: switchboard_raft::DEFAULT_SNAPSHOT_EVERY, peers: &peers, router: &router };
        let mut groups = BTreeMap::new();
        for id in ids {
            let group = host.open(id, part_of(id, shards)).await?;
            if !group.raft.is_initialized().await? {
                group.raft.initialize(BTreeMap::from([(1, switchboard_raft::Node { addr: addr.clone() })])).await?;
            }
            group.raft.wait(Some(Duration::from_secs(10))).current_leader(1, "leads").await?;
            groups.insert(id, group);
        }
        let mut node = SplitNode { groups, shards, forwarders: Vec::new(), _keyspace: keyspace, _rpc: rpc };
        for group in node.groups.values() {
            while group.shard.read().rules < switchboard_actors::core::RULES_VERSION {
                group.proposer.submit(Command::AdoptRules { version: switchboard_actors::core::RULES_VERSION }).await?;
            }
        }
        if forward {
            node.forward();
        }
        Ok(node)
    }

    /// Starts a forwarder on every group.
    pub(crate) fn forward(&mut self) {
        for (id, group) in &self.groups {
            let others = self.groups.iter().filter(|(other, _)| *other != id).map(|(other, g)| (*other, g.proposer.clone())).collect();
            self.forwarders.push(forward_mail(group.clone(), others, 1));
        }
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        for f in &self.forwarders {
            f.abort();
        }
        for group in self.groups.values() {
            group.raft.shutdown().await?;
        }
        self._rpc.abort();
        Ok(())
    }

    pub(crate) async fn submit(&self, group: GroupId, command: Command) -> Result<Reply, switchboard_actors::Error> {
        match self.groups.get(&group) {
            Some(g) => g.proposer.submit(command).await,
            None => Err(switchboard_actors::Error::NotFound(format!("group {group}"))),
        }
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
    async fn a_conversation_is_queued_assigned_answered_and_released_across_three_groups() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = start(dir.path(), true).await;
        for command in directory() {
            submit(&node, R, command).await;
        }
        submit(&node, R, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).await;
        // The directory reaches both conversation shards by letter.
        for c in [FIRST_C, FIRST_C + 1] {
            until(&node, c, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        }

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
        for id in [R, FIRST_C, FIRST_C + 1] {
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
            submit(&node, R, command).await;
        }
        submit(&node, R, Command::SetPresence { operator: OperatorId::new("ann"), presence: Presence::Online }).await;
        let start_conversation = Command::StartConversation { channel: ChannelId::new("web"), group: None, visitor: visitor("v-2") };
        // The conversation shard has not heard of the web channel yet: refused.
        assert!(node.submit(FIRST_C, start_conversation.clone()).await.is_err());
        let pending = node.groups[&R].shard.read().mail_out.values().map(|o| o.unconfirmed().count()).sum::<usize>();
        assert_eq!(pending, 2 * directory().len(), "each directory command is a letter to each conversation shard");
        node.stop().await.expect("stops");

        // Started again from the data folder: the letters are still there and go out.
        let node = start(dir.path(), true).await;
        until(&node, FIRST_C, "the web channel arrives", |s| s.channels.contains_key(&ChannelId::new("web"))).await;
        let Reply::Started { conversation } = submit(&node, FIRST_C, start_conversation).await else { panic!("not started") };
        until(&node, R, "an offer to ann", |s| s.offers.values().any(|o| o.conversation == conversation)).await;
        until(&node, R, "routing holds it queued", |s| matches!(s.conversations.get(&conversation).map(|c| &c.status), Some(ConversationStatus::Queued { .. }))).await;
        node.stop().await.expect("stops");
    }
}
