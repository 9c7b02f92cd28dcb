//! Where a split cluster's groups vote and lead (ADR 0006, "Placement").
//!
//! Every node of a split cluster is a member of the metadata group and of the routing
//! shard: three of them vote (fewer while the cluster has fewer nodes) and the others
//! follow the log as learners. A conversation shard is kept by its three voters only
//! (ADR 0012); the other nodes read it from them. Placement is
//! the choice of those voters and of the leaders among them: each node votes in about
//! as many groups as every other, and leads about as many.
//!
//! The groups' own memberships, committed in their logs, are the placement map: there is
//! no second copy to disagree with them, and its version is each membership's log id.
//! [`plan`] compares them with a balanced placement and names the one step that brings
//! the cluster closer (make a node a learner, change a group's voters, drop a node that
//! left, hand a leadership on); [`settle`] takes such steps through the groups' leaders
//! until none is left. The metadata group's leader does so every few seconds
//! ([`run`]), and `switchboard cluster rebalance` at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use switchboard_actors::mail::GroupId;
use switchboard_raft::members::Change;
use switchboard_raft::NodeId;

use crate::groups::{SplitNode, FIRST_C, G0};

/// Voters per group once the cluster has that many nodes.
pub(crate) const VOTERS: usize = 3;

/// One group as a node sees it: its members (voters and learners), its voters, its leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GroupView {
    pub(crate) id: GroupId,
    pub(crate) members: BTreeSet<NodeId>,
    pub(crate) voters: BTreeSet<NodeId>,
    pub(crate) leader: Option<NodeId>,
    /// A conversation shard (ADR 0012): held by its voters only, not followed by every
    /// node; its holders are recorded in the metadata group.
    pub(crate) voters_only: bool,
    /// The holders the metadata group records for it (`None`: none recorded yet, every
    /// member holds it).
    pub(crate) holders: Option<BTreeSet<NodeId>>,
}

/// One step towards the placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Node `node` follows group `group` as a learner.
    Learn { group: GroupId, node: NodeId },
    /// Group `group` votes with exactly `voters`; a voter left out stays a learner with
    /// `retain`, else it leaves the group.
    Voters { group: GroupId, voters: BTreeSet<NodeId>, retain: bool },
    /// Node `node`, no longer in the cluster and no longer voting, leaves `group`.
    Drop { group: GroupId, node: NodeId },
    /// Group `group`'s leadership moves to `to`.
    Lead { group: GroupId, to: NodeId },
    /// The metadata group records `nodes` as the holders of `group` (ADR 0012).
    Holders { group: GroupId, nodes: BTreeSet<NodeId> },
}

impl Step {
    /// The group the step changes.
    pub(crate) fn group(&self) -> GroupId {
        match self {
            Step::Learn { group, .. } | Step::Voters { group, .. } | Step::Drop { group, .. } | Step::Lead { group, .. } | Step::Holders { group, .. } => *group,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Learn { group, node } => write!(f, "node {node} follows group {group}"),
            Step::Voters { group, voters, .. } => write!(f, "group {group} votes with nodes {voters:?}"),
            Step::Drop { group, node } => write!(f, "node {node} leaves group {group}"),
            Step::Lead { group, to } => write!(f, "node {to} leads group {group}"),
            Step::Holders { group, nodes } => write!(f, "group {group} is held by nodes {nodes:?}"),
        }
    }
}

/// The voters each group should have: a group keeps the voters it has where it can; a
/// group short of voters takes the live nodes that vote least; then voters move from
/// the node that votes most to the one that votes least until no two nodes differ by
/// more than one. Only `nodes` vote; only `live` nodes get new votes.
pub(crate) fn balanced_voters(nodes: &BTreeSet<NodeId>, live: &BTreeSet<NodeId>, groups: &[GroupView]) -> BTreeMap<GroupId, BTreeSet<NodeId>> {
    let want = VOTERS.min(nodes.len());
    let mut placed: BTreeMap<GroupId, BTreeSet<NodeId>> = groups.iter().map(|g| (g.id, g.voters.intersection(nodes).copied().collect())).collect();
    let count = |placed: &BTreeMap<GroupId, BTreeSet<NodeId>>| -> BTreeMap<NodeId, usize> {
        let mut votes: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        for voters in placed.values() {
            for v in voters {
                *votes.entry(*v).or_default() += 1;
            }
        }
        votes
    };
    let leader_of: BTreeMap<GroupId, Option<NodeId>> = groups.iter().map(|g| (g.id, g.leader)).collect();
    // Too many voters (a cluster laid out with more than three nodes): the busiest
    // non-leaders stop voting.
    for (id, voters) in placed.clone() {
        let mut voters = voters;
        while voters.len() > want {
            let votes = count(&placed);
            // Those that do not answer first: the voters left must reach a quorum.
            let Some(drop) = voters.iter().filter(|v| Some(**v) != leader_of[&id]).max_by_key(|v| (!live.contains(v), votes[v], **v)).copied() else { break };
            voters.remove(&drop);
            placed.insert(id, voters.clone());
        }
    }
    // Too few: the live nodes that vote least.
    for id in placed.keys().copied().collect::<Vec<_>>() {
        while placed[&id].len() < want {
            let votes = count(&placed);
            let Some(add) = live.iter().filter(|n| nodes.contains(n) && !placed[&id].contains(n)).min_by_key(|n| (votes[n], **n)).copied() else { break };
            placed.entry(id).or_default().insert(add);
        }
    }
    // Even out: one vote at a time from the busiest node to the idlest live one. First
    // the conversation shards' (each vote there is a copy of the shard on the node's
    // disk, ADR 0012), counting those alone; then the other groups', counting every vote.
    let voters_only: BTreeSet<GroupId> = groups.iter().filter(|g| g.voters_only).map(|g| g.id).collect();
    let count_in = |placed: &BTreeMap<GroupId, BTreeSet<NodeId>>, only: Option<&BTreeSet<GroupId>>| -> BTreeMap<NodeId, usize> {
        let mut votes: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        for (id, voters) in placed {
            if only.is_none_or(|o| o.contains(id)) {
                for v in voters {
                    *votes.entry(*v).or_default() += 1;
                }
            }
        }
        votes
    };
    for copies in [true, false] {
        for _ in 0..groups.len() * VOTERS {
            let votes = count_in(&placed, copies.then_some(&voters_only));
            let Some((&busy, &most)) = votes.iter().max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n))) else { break };
            let Some((&idle, &least)) = votes.iter().filter(|(n, _)| live.contains(n)).min_by_key(|(n, c)| (**c, **n)) else { break };
            if most <= least + 1 {
                break;
            }
            // A group where the busy node votes and the idle one does not; one it does not
            // lead first, so that no leadership has to move.
            let candidates = placed.iter().filter(|(id, v)| voters_only.contains(id) == copies && v.contains(&busy) && !v.contains(&idle)).map(|(id, _)| *id);
            let Some(group) = candidates.min_by_key(|id| (leader_of[id] == Some(busy), *id)) else { break };
            if let Some(voters) = placed.get_mut(&group) {
                voters.remove(&busy);
                voters.insert(idle);
            }
        }
    }
    placed
}

/// The next step towards the placement for a cluster of `nodes` (the metadata group's
/// members), of which `live` answer; `None` when there is none. Leaderships are evened
/// out only with `leaders`, and only once every group has a leader.
pub(crate) fn plan(nodes: &BTreeSet<NodeId>, live: &BTreeSet<NodeId>, groups: &[GroupView], leaders: bool) -> Option<Step> {
    plan_except(nodes, live, groups, leaders, &BTreeSet::new())
}

/// As [`plan`], with no step for the groups in `skip` (whose step keeps failing now):
/// the placement is still weighed over every group, so the other groups' steps are
/// the ones they would get anyway, and a group that cannot move now does not hold them
/// up.
pub(crate) fn plan_except(nodes: &BTreeSet<NodeId>, live: &BTreeSet<NodeId>, all: &[GroupView], leaders: bool, skip: &BTreeSet<GroupId>) -> Option<Step> {
    let placed = balanced_voters(nodes, live, all);
    let groups: Vec<&GroupView> = all.iter().filter(|g| !skip.contains(&g.id)).collect();
    let groups = groups.as_slice();
    // Every node of the cluster follows the metadata group and the routing shard; a
    // conversation shard only the nodes that are to vote in it follow.
    for g in groups {
        let wanted = |n: &&NodeId| !g.voters_only || placed[&g.id].contains(n);
        if let Some(node) = nodes.iter().filter(wanted).find(|n| !g.members.contains(n) && live.contains(n)) {
            return Some(Step::Learn { group: g.id, node: *node });
        }
    }
    // Voters only among members (a node becomes one as a learner first).
    for g in groups {
        let voters: BTreeSet<NodeId> = placed[&g.id].intersection(&g.members).copied().collect();
        if !voters.is_empty() && voters != g.voters {
            // A leader that stops voting hands its leadership on first, to a live voter
            // that stays: the group is never without one.
            if let Some(leader) = g.leader.filter(|l| !voters.contains(l) && live.contains(l)) {
                let stays = voters.intersection(&g.voters).find(|v| live.contains(v) && **v != leader);
                if let Some(to) = stays {
                    return Some(Step::Lead { group: g.id, to: *to });
                }
            }
            return Some(Step::Voters { group: g.id, voters, retain: true });
        }
    }
    // A conversation shard's holders are its voters: recorded once they vote, so that a
    // node reads the group locally only while it gets every entry.
    for g in groups.iter().filter(|g| g.voters_only && !g.voters.is_empty()) {
        if g.holders.as_ref() != Some(&g.voters) {
            return Some(Step::Holders { group: g.id, nodes: g.voters.clone() });
        }
    }
    // A node that left the cluster leaves the groups it no longer votes in; a node that
    // neither votes in nor holds a conversation shard leaves it (it reads the holders').
    for g in groups {
        let unwanted = |n: &&NodeId| {
            !g.voters.contains(n) && (!nodes.contains(n) || (g.voters_only && !placed[&g.id].contains(n) && g.holders.as_ref().is_some_and(|h| !h.contains(n))))
        };
        if let Some(node) = g.members.iter().find(unwanted) {
            return Some(Step::Drop { group: g.id, node: *node });
        }
    }
    if !leaders || all.iter().any(|g| g.leader.is_none()) {
        return None;
    }
    // Leaderships: from the node that leads most to a live voter that leads least.
    let mut led: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for g in all {
        if let Some(l) = g.leader {
            *led.entry(l).or_default() += 1;
        }
    }
    let mut busiest: Vec<(NodeId, usize)> = led.iter().map(|(n, c)| (*n, *c)).collect();
    busiest.sort_by_key(|(n, c)| (std::cmp::Reverse(*c), *n));
    for (busy, most) in busiest {
        for g in groups.iter().filter(|g| g.leader == Some(busy)) {
            // Only to a node of the cluster: `live` also holds a node that is leaving.
            let to = g.voters.iter().filter(|v| live.contains(v) && nodes.contains(v) && **v != busy).min_by_key(|v| (led.get(v).copied().unwrap_or(0), **v));
            if let Some(to) = to {
                if led.get(to).copied().unwrap_or(0) + 1 < most {
                    return Some(Step::Lead { group: g.id, to: *to });
                }
            }
        }
    }
    None
}

/// How every group looks from this node: its local replica's view of the membership
/// and the leader for a group it holds; a holder's for one it does not (ADR 0012). A
/// group none of whose holders answers is left out: no step is planned for it now.
pub(crate) async fn views(node: &SplitNode) -> Vec<GroupView> {
    let recorded = node.groups[&G0].shard.read().holders.clone();
    let mut views = Vec::with_capacity(node.groups.len());
    for g in node.groups.values() {
        let (voters_only, holders) = (g.id >= FIRST_C, recorded.get(&g.id).cloned());
        if node.holds(g.id) {
            let m = g.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            views.push(GroupView { id: g.id, members: membership.nodes().map(|(id, _)| *id).collect(), voters: membership.voter_ids().collect(), leader: m.current_leader, voters_only, holders });
            continue;
        }
        match node.remote(g.id).view().await {
            Ok((members, voters, leader)) => {
                views.push(GroupView { id: g.id, members: members.into_iter().collect(), voters: voters.into_iter().collect(), leader, voters_only, holders });
            }
            Err(e) => tracing::warn!(group = g.id, error = %e, "no holder of the group told its membership; no placement step for it now"),
        }
    }
    views
}

/// The cluster's nodes (the metadata group's members) and their QUIC addresses.
pub(crate) fn nodes(node: &SplitNode) -> BTreeMap<NodeId, String> {
    nodes_of(&node.groups[&G0])
}

/// Of the `live` nodes, those the placement may give a copy, a vote or a leadership: not
/// one recorded as removed from the cluster (routing rules 19), whose removal may still be
/// under way (its groups refuse to admit it anywhere new); `leaving`, the node a removal
/// takes out, still counts while it answers, so it hands its leaderships on.
fn placeable(node: &SplitNode, mut live: BTreeSet<NodeId>, leaving: Option<NodeId>) -> BTreeSet<NodeId> {
    let removed = node.groups[&G0].shard.read().removed_nodes.clone();
    live.retain(|n| Some(*n) == leaving || !removed.contains(n));
    live
}

/// The nodes the metadata group `g0` counts as members, with their QUIC addresses.
pub(crate) fn nodes_of(g0: &crate::groups::HostedGroup) -> BTreeMap<NodeId, String> {
    let m = g0.raft.metrics().borrow().clone();
    m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
}

/// The nodes that answered this node within the last few seconds, itself included;
/// others are asked now (half a second each, at once). Besides `nodes` (the metadata
/// group's members), every node the groups this node holds still name is asked: one
/// leaving the cluster, which left the metadata group first, still leads groups while
/// it answers, and counts as live so that a step hands its leadership on before its
/// vote goes, rather than take the vote from a sitting leader (the group would be
/// without one until an election).
async fn live(node: &SplitNode, nodes: &BTreeMap<NodeId, String>) -> BTreeSet<NodeId> {
    let mut nodes = nodes.clone();
    for g in node.groups.values().filter(|g| node.holds(g.id)) {
        let m = g.raft.metrics().borrow().clone();
        for (id, n) in m.membership_config.membership().nodes() {
            nodes.entry(*id).or_insert_with(|| n.addr.clone());
        }
    }
    let asks = nodes.iter().map(|(id, addr)| async move {
        if *id == node.node_id || node.peers.answered_within(addr, Duration::from_secs(3)) {
            return Some(*id);
        }
        node.peers.status(addr, Duration::from_millis(500)).await.ok().map(|_| *id)
    });
    futures::future::join_all(asks).await.into_iter().flatten().collect()
}

/// Takes `step` through the leader of its group, waiting up to `patience`.
pub(crate) async fn take(node: &SplitNode, step: &Step, addresses: &BTreeMap<NodeId, String>, patience: Duration) -> Result<(), String> {
    let (group, change) = match step {
        Step::Holders { group, nodes } => {
            let command = switchboard_actors::model::Command::HoldersSet { group: *group, nodes: nodes.iter().copied().collect() };
            let committed = tokio::time::timeout(patience, node.groups[&G0].proposer.submit(command)).await;
            return match committed {
                // The nodes apply the record a moment after it commits: a holder it
                // leaves out is dropped from the group only after that.
                Ok(Ok(_)) => {
                    tokio::time::sleep(HOLDERS_SETTLE).await;
                    Ok(())
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("the holders of group {group} were not recorded within {} s", patience.as_secs())),
            };
        }
        Step::Learn { group, node: id } => {
            let Some(addr) = addresses.get(id) else { return Err(format!("node {id} has no address")) };
            (*group, Change::Learn { id: *id, addr: addr.clone() })
        }
        Step::Voters { group, voters, retain } => (*group, Change::Voters { voters: voters.clone(), retain: *retain }),
        Step::Drop { group, node: id } => (*group, Change::Leave { id: *id }),
        Step::Lead { group, to } => (*group, Change::Lead { to: *to }),
    };
    if node.holds(group) {
        return switchboard_raft::members::apply_anywhere(&node.router, &node.peers, group, change, patience).await;
    }
    // A group this node does not hold: through its holders, each of which names the
    // leader if it does not lead.
    let holders: Vec<String> = crate::groups::holders_from(&node.groups[&G0], &node.groups[&group], node.node_id).unwrap_or_default().into_iter().map(|(_, a)| a).collect();
    let give_up = tokio::time::Instant::now() + patience;
    let mut last = format!("no holder of group {group} is known");
    let mut asked: Vec<String> = holders.clone();
    while let Some(addr) = asked.pop() {
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match node.peers.change_members(&addr, group, change.clone(), left).await {
            Ok(switchboard_raft::members::Answer::Done) => return Ok(()),
            Ok(switchboard_raft::members::Answer::Refused(why)) => return Err(why),
            Ok(switchboard_raft::members::Answer::NotLeader(Some((_, leader)))) if leader.addr != addr => {
                last = format!("{addr} does not lead group {group}");
                asked.push(leader.addr);
            }
            Ok(switchboard_raft::members::Answer::NotLeader(_)) => {
                last = format!("{addr} knows no leader of group {group}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
        if asked.len() > 16 {
            break;
        }
    }
    Err(last)
}

/// How long the placement waits after recording a group's holders before its next step,
/// so that every node applied the record before a holder it left out leaves the group.
const HOLDERS_SETTLE: Duration = Duration::from_secs(1);

/// Steps taken since this process started, and steps that failed: on `/metrics`.
pub(crate) static STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub(crate) static STEPS_FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Takes steps until [`plan`] has none left (`Ok` with the steps taken) or `within`
/// has passed. With `leaders`, leaderships are evened out too.
///
/// With `while_leading`, it stops as soon as this node no longer leads the metadata
/// group (the controller of the new leader goes on). A leadership hand-over that fails
/// is not tried again in the same call: each try holds the group's writes a moment.
pub(crate) async fn settle(node: &SplitNode, leaders: bool, within: Duration, while_leading: bool) -> Result<Vec<Step>, String> {
    let give_up = tokio::time::Instant::now() + within;
    let mut taken = Vec::new();
    let mut last_error = None;
    let mut leaders = leaders;
    // Steps that failed in this call. A group whose step fails twice gets no more steps
    // in it, and the other groups' steps go on; the call then ends with the error (the
    // controller tries again later). So a step that cannot be taken now (a node that
    // cannot catch up, a leader that refuses) holds up neither the group's writes nor
    // any other group's placement for long.
    let mut failed: Vec<Step> = Vec::new();
    let mut stuck: BTreeSet<GroupId> = BTreeSet::new();
    loop {
        if while_leading && node.groups[&G0].raft.metrics().borrow().current_leader != Some(node.node_id) {
            return Ok(taken);
        }
        let addresses = nodes(node);
        let live = placeable(node, live(node, &addresses).await, None);
        let ids: BTreeSet<NodeId> = addresses.keys().copied().collect();
        let views = views(node).await;
        // A group no holder told about: no step until every group is seen, since a
        // plan on some groups only may undo itself once the others answer.
        if views.len() < node.groups.len() {
            return Err(last_error.unwrap_or_else(|| "not every group's membership is known now".into()));
        }
        let Some(step) = plan_except(&ids, &live, &views, leaders, &stuck) else {
            return match last_error {
                Some(e) if !stuck.is_empty() => Err(e),
                _ => Ok(taken),
            };
        };
        if failed.iter().filter(|f| **f == step).count() >= 2 {
            stuck.insert(step.group());
            if tokio::time::Instant::now() >= give_up {
                return Err(last_error.unwrap_or_else(|| format!("{step} failed twice")));
            }
            continue;
        }
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(last_error.unwrap_or_else(|| format!("the placement did not settle within {} s", within.as_secs())));
        }
        tracing::info!(?step, "placement step");
        match take(node, &step, &addresses, left.min(Duration::from_secs(60))).await {
            Ok(()) => {
                STEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                taken.push(step);
                // The change is committed on the group's leader; give this node a moment
                // to apply it (a step asked again is answered at once: it is done).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                STEPS_FAILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(?step, error = %e, "placement step failed");
                if matches!(step, Step::Lead { .. }) {
                    leaders = false;
                }
                failed.push(step.clone());
                last_error = Some(format!("{step:?}: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// How often the metadata group's leader looks at the placement.
const EVERY: Duration = Duration::from_secs(2);
/// How long every group must have kept its leader before leaderships are evened out:
/// a failover settles first, and a node that comes back gets its share back after it.
const LEADERS_STABLE_FOR: Duration = Duration::from_secs(10);

/// While this node leads the metadata group: keeps the placement balanced (every few
/// seconds, one [`settle`] at a time).
pub(crate) async fn run(node: Arc<SplitNode>) {
    let mut leaders_seen: Vec<Option<NodeId>> = Vec::new();
    let mut stable_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(EVERY).await;
        let m = node.groups[&G0].raft.metrics().borrow().clone();
        if m.current_leader != Some(node.node_id) {
            continue;
        }
        let now: Vec<Option<NodeId>> = views(&node).await.iter().map(|g| g.leader).collect();
        if now != leaders_seen {
            leaders_seen = now;
            stable_since = tokio::time::Instant::now();
        }
        let leaders = stable_since.elapsed() >= LEADERS_STABLE_FOR;
        match settle(&node, leaders, Duration::from_secs(120), true).await {
            Ok(steps) if !steps.is_empty() => tracing::info!(steps = steps.len(), "placement settled"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "placement not settled; trying again in 30 s");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

/// Removes node `id` from a split cluster: its vote in the metadata group moves to
/// another node and it leaves that group, which takes it out of the placement (on
/// every node's view, the controller's included); then its votes elsewhere move to
/// other nodes (each new voter catches up first; a group it leads is handed on first,
/// while it answers) and it leaves every group.
/// Answers the steps it took.
pub(crate) async fn remove(node: &SplitNode, id: NodeId, within: Duration) -> Result<Vec<Step>, String> {
    if id == node.node_id {
        // It would not hear its own removal (the leader stops sending to it), and so
        // never see it done.
        return Err(format!("node {id} cannot remove itself: ask another node"));
    }
    let give_up = tokio::time::Instant::now() + within;
    let seen = views(node).await;
    if seen.len() == node.groups.len() && seen.iter().all(|g| !g.members.contains(&id)) {
        return Ok(Vec::new());
    }
    let mut taken = Vec::new();
    // The last step that failed and why, while no step succeeded since: said when time
    // runs out.
    let mut last_refusal: Option<(String, String)> = None;
    // Steps that failed, and the groups whose step failed twice: those wait while the
    // other groups' steps are taken, then are tried again.
    let mut failed: Vec<Step> = Vec::new();
    let mut stuck: BTreeSet<GroupId> = BTreeSet::new();
    loop {
        let addresses = nodes(node);
        let remaining: BTreeSet<NodeId> = addresses.keys().copied().filter(|n| *n != id).collect();
        if remaining.is_empty() {
            return Err(format!("node {id} is the cluster's last node"));
        }
        // The node leaving counts as live while it answers, also once it has left the
        // metadata group (`live` asks every node the groups name).
        let live = placeable(node, live(node, &addresses).await, Some(id));
        let views = views(node).await;
        if views.len() < node.groups.len() {
            if tokio::time::Instant::now() >= give_up {
                return Err(format!("node {id}: not every group's membership is known now"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let Some(g0) = views.iter().find(|g| g.id == G0) else { return Err("no metadata group here".into()) };
        let step = if g0.voters.contains(&id) {
            // Its vote alone moves, to one node the placement would give it to: every
            // other voter stays (a voter left out here would leave the cluster too).
            let placed = balanced_voters(&remaining, &live, &views);
            let mut voters: BTreeSet<NodeId> = g0.voters.iter().copied().filter(|v| *v != id).collect();
            let replacement = placed.get(&G0).into_iter().flatten().chain(remaining.iter()).find(|n| !g0.voters.contains(n) && g0.members.contains(n) && live.contains(n));
            if let Some(n) = replacement {
                voters.insert(*n);
            }
            if voters.is_empty() {
                return Err("no other node can vote in the metadata group".into());
            }
            // Leading the metadata group, it hands the leadership on first.
            match voters.iter().find(|v| g0.voters.contains(v) && live.contains(v)) {
                Some(to) if g0.leader == Some(id) && live.contains(&id) => Some(Step::Lead { group: G0, to: *to }),
                // It leaves the metadata group in the same change: no view of the
                // placement counts it from then on.
                _ => Some(Step::Voters { group: G0, voters, retain: false }),
            }
        } else if g0.members.contains(&id) {
            Some(Step::Drop { group: G0, node: id })
        } else {
            let next = plan_except(&remaining, &live, &views, false, &stuck).or_else(|| {
                views.iter().find(|g| g.members.contains(&id) && !stuck.contains(&g.id)).map(|g| Step::Drop { group: g.id, node: id })
            });
            match next {
                Some(step) if failed.iter().filter(|f| **f == step).count() >= 2 && step.group() != G0 && tokio::time::Instant::now() < give_up => {
                    stuck.insert(step.group());
                    continue;
                }
                Some(step) => Some(step),
                // Only groups whose step kept failing are left: they are tried again.
                None if !stuck.is_empty() => {
                    stuck.clear();
                    failed.clear();
                    plan(&remaining, &live, &views, false).or_else(|| views.iter().find(|g| g.members.contains(&id)).map(|g| Step::Drop { group: g.id, node: id }))
                }
                // A member nowhere: done (or never was).
                None => None,
            }
        };
        let Some(step) = step else { return Ok(taken) };
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(match &last_refusal {
                Some((failed, why)) => format!("node {id} is still a member after {} s; the last step tried ({failed}) was refused: {why}", within.as_secs()),
                None => format!("node {id} is still a member after {} s", within.as_secs()),
            });
        }
        tracing::info!(?step, node = id, "removing a node");
        match take(node, &step, &addresses, left).await {
            Ok(()) => {
                taken.push(step);
                last_refusal = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if e.starts_with("no leader") => return Err(e),
            Err(e) => {
                tracing::warn!(?step, error = %e, "a step of removing a node failed");
                failed.push(step.clone());
                last_refusal = Some((step.to_string(), e));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn group(id: GroupId, members: &[NodeId], voters: &[NodeId], leader: NodeId) -> GroupView {
        GroupView { id, members: set(members), voters: set(voters), leader: Some(leader), voters_only: false, holders: None }
    }

    /// Applies steps the way the groups would until the plan has none; returns them.
    fn converge(nodes: &[NodeId], live: &[NodeId], groups: &mut [GroupView]) -> Vec<Step> {
        let mut steps = Vec::new();
        while let Some(step) = plan(&set(nodes), &set(live), groups, true) {
            assert!(steps.len() < 100, "no end to the steps: {steps:?}");
            match &step {
                Step::Learn { group, node } => {
                    groups.iter_mut().find(|g| g.id == *group).map(|g| g.members.insert(*node));
                }
                Step::Voters { group, voters, .. } => {
                    let g = groups.iter_mut().find(|g| g.id == *group).expect("group");
                    assert!(voters.is_subset(&g.members), "{step:?}: voters must be members first");
                    g.voters = voters.clone();
                    if g.leader.is_some_and(|l| !voters.contains(&l)) {
                        g.leader = voters.iter().next().copied();
                    }
                }
                Step::Drop { group, node } => {
                    groups.iter_mut().find(|g| g.id == *group).map(|g| g.members.remove(node));
                }
                Step::Lead { group, to } => {
                    groups.iter_mut().find(|g| g.id == *group).map(|g| g.leader = Some(*to));
                }
                Step::Holders { group, nodes } => {
                    groups.iter_mut().find(|g| g.id == *group).map(|g| g.holders = Some(nodes.clone()));
                }
            }
            steps.push(step);
        }
        steps
    }

    fn count(groups: &[GroupView], pick: impl Fn(&GroupView) -> Vec<NodeId>) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for g in groups {
            for n in pick(g) {
                *counts.entry(n).or_insert(0) += 1;
            }
        }
        counts
    }

    #[test]
    fn three_nodes_that_vote_everywhere_need_no_step_but_leaders_spread() {
        let all = [1, 2, 3];
        let mut groups: Vec<GroupView> = (1..=6).map(|id| group(id, &all, &all, 1)).collect();
        let steps = converge(&all, &all, &mut groups);
        assert!(steps.iter().all(|s| matches!(s, Step::Lead { .. })), "{steps:?}");
        let led = count(&groups, |g| g.leader.into_iter().collect());
        assert_eq!(led.values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{led:?}");
    }

    #[test]
    fn a_fourth_node_follows_every_group_and_takes_its_share_of_votes_and_leads() {
        let mut groups: Vec<GroupView> = (1..=6).map(|id| group(id, &[1, 2, 3], &[1, 2, 3], 1 + id % 3)).collect();
        let steps = converge(&[1, 2, 3, 4], &[1, 2, 3, 4], &mut groups);
        assert!(groups.iter().all(|g| g.members == set(&[1, 2, 3, 4]) && g.voters.len() == 3), "{groups:?}");
        let votes = count(&groups, |g| g.voters.iter().copied().collect());
        assert!(votes.values().all(|c| (4..=5).contains(c)), "18 votes over 4 nodes: {votes:?}");
        let led = count(&groups, |g| g.leader.into_iter().collect());
        assert!(led.get(&4).copied().unwrap_or(0) >= 1 && led.values().all(|c| *c <= 2), "{led:?}");
        // A node is made a learner before it votes anywhere.
        let first_vote = steps.iter().position(|s| matches!(s, Step::Voters { .. })).expect("votes move");
        assert!(steps[..first_vote].iter().all(|s| matches!(s, Step::Learn { node: 4, .. })), "{steps:?}");
    }

    /// A group whose step keeps failing (here group 1: node 4 cannot follow it now) is
    /// left out, and the other groups still get every step they would have got: the
    /// same learners, voters and leaders as without it, not a placement skewed by it.
    #[test]
    fn a_group_whose_step_keeps_failing_holds_up_no_other_group() {
        let mut groups: Vec<GroupView> = (1..=6).map(|id| group(id, &[1, 2, 3], &[1, 2, 3], 1 + id % 3)).collect();
        let (nodes, live) = (set(&[1, 2, 3, 4]), set(&[1, 2, 3, 4]));
        assert_eq!(plan(&nodes, &live, &groups, true), Some(Step::Learn { group: 1, node: 4 }), "group 1 first");
        let skip: BTreeSet<GroupId> = [1].into_iter().collect();
        let mut steps = Vec::new();
        while let Some(step) = plan_except(&nodes, &live, &groups, true, &skip) {
            assert!(steps.len() < 100, "no end to the steps: {steps:?}");
            assert_ne!(step.group(), 1, "no step for the group left out");
            let g = groups.iter_mut().find(|g| g.id == step.group()).expect("group");
            match &step {
                Step::Learn { node, .. } => {
                    g.members.insert(*node);
                }
                Step::Voters { voters, .. } => g.voters = voters.clone(),
                Step::Drop { node, .. } => {
                    g.members.remove(node);
                }
                Step::Lead { to, .. } => g.leader = Some(*to),
                Step::Holders { nodes, .. } => g.holders = Some(nodes.clone()),
            }
            steps.push(step);
        }
        assert!(groups[1..].iter().all(|g| g.members.contains(&4)), "every other group took node 4 in: {groups:?}");
        assert!(groups[1..].iter().any(|g| g.voters.contains(&4)), "and gave it votes: {steps:?}");
        assert_eq!(groups[0].members, set(&[1, 2, 3]), "group 1 is as it was");
        // Once group 1 can move again, the plan picks it up where it stopped.
        assert_eq!(plan(&nodes, &live, &groups, true), Some(Step::Learn { group: 1, node: 4 }));
    }

    #[test]
    fn a_dead_node_gets_no_new_votes_and_a_removed_one_is_dropped_once_it_votes_nowhere() {
        // Node 4 is down: it keeps the votes it has, gets none, leads nothing new.
        let mut groups: Vec<GroupView> = (1..=4).map(|id| group(id, &[1, 2, 3, 4], &[1, 2, 3], 1)).collect();
        let steps = converge(&[1, 2, 3, 4], &[1, 2, 3], &mut groups);
        assert!(groups.iter().all(|g| !g.voters.contains(&4) && g.leader != Some(4)), "{steps:?}");
        // Node 3 has left the cluster (not in the metadata group): its votes go to 4, then it is dropped.
        let mut groups: Vec<GroupView> = (1..=4).map(|id| group(id, &[1, 2, 3, 4], &[1, 2, 3], 3)).collect();
        converge(&[1, 2, 4], &[1, 2, 3, 4], &mut groups);
        assert!(groups.iter().all(|g| g.voters == set(&[1, 2, 4]) && g.members == set(&[1, 2, 4]) && g.leader != Some(3)), "{groups:?}");
    }

    #[test]
    fn a_cluster_laid_out_with_five_voters_is_trimmed_to_three_without_moving_leaders() {
        let all = [1, 2, 3, 4, 5];
        let mut groups: Vec<GroupView> = (1..=5).map(|id| group(id, &all, &all, id)).collect();
        let steps = converge(&all, &all, &mut groups);
        assert!(groups.iter().all(|g| g.voters.len() == 3 && g.leader == Some(g.id)), "{groups:?}");
        assert!(!steps.iter().any(|s| matches!(s, Step::Lead { .. })), "{steps:?}");
        let votes = count(&groups, |g| g.voters.iter().copied().collect());
        assert!(votes.values().all(|c| *c == 3), "{votes:?}");
    }

    #[test]
    fn trimmed_voters_keep_a_live_majority_when_two_of_five_are_down() {
        let all = [1, 2, 3, 4, 5];
        let mut groups: Vec<GroupView> = (1..=6).map(|id| group(id, &all, &all, 1 + id % 3)).collect();
        converge(&all, &[1, 2, 3], &mut groups);
        for g in &groups {
            let live = g.voters.iter().filter(|v| **v <= 3).count();
            assert!(g.voters.len() == 3 && live >= 2, "group {} votes with {:?}: no live majority", g.id, g.voters);
        }
    }

    /// ADR 0012: a conversation shard is held by its three voters only. A fourth node
    /// follows the metadata group and the routing shard, and takes copies of only the
    /// conversation shards it is given votes in; the node whose vote it took leaves the
    /// group once the record no longer names it.
    #[test]
    fn conversation_shards_move_to_a_fourth_node_instead_of_being_copied_to_it() {
        let three = [1, 2, 3];
        let mut groups: Vec<GroupView> = (0..6).map(|id| group(id, &three, &three, 1 + id % 3)).collect();
        for g in groups.iter_mut().filter(|g| g.id >= 2) {
            g.voters_only = true;
        }
        // Three nodes: each conversation shard's holders are recorded, nothing else moves.
        let steps = converge(&three, &three, &mut groups);
        assert!(steps.iter().all(|s| matches!(s, Step::Holders { .. } | Step::Lead { .. })), "{steps:?}");
        assert!(groups.iter().filter(|g| g.voters_only).all(|g| g.holders.as_ref() == Some(&set(&three))), "{groups:?}");

        let four = [1, 2, 3, 4];
        let steps = converge(&four, &four, &mut groups);
        for g in &groups {
            if g.voters_only {
                assert_eq!(g.members, g.voters, "group {}: only its voters hold a copy", g.id);
                assert_eq!(g.holders.as_ref(), Some(&g.voters), "group {}: its record names its voters", g.id);
                assert_eq!(g.voters.len(), 3);
            } else {
                assert_eq!(g.members, set(&four), "group {}: every node follows it", g.id);
            }
        }
        let copies = count(&groups.iter().filter(|g| g.voters_only).cloned().collect::<Vec<_>>(), |g| g.members.iter().copied().collect());
        assert!(copies.get(&4).copied().unwrap_or(0) >= 2, "node 4 took copies of some conversation shards: {copies:?}");
        assert!(copies.values().all(|c| *c == 3), "12 copies over 4 nodes: {copies:?}");
        let votes = count(&groups, |g| g.voters.iter().copied().collect());
        assert!(votes.values().max().zip(votes.values().min()).is_some_and(|(most, least)| most - least <= 1), "18 votes over 4 nodes: {votes:?}");
        // Each node that leaves a conversation shard leaves it only after the record
        // stopped naming it, and a node is recorded only once it votes.
        for (i, step) in steps.iter().enumerate() {
            if let Step::Drop { group, node } = step {
                let recorded = steps[..i].iter().rev().find_map(|s| match s {
                    Step::Holders { group: g, nodes } if g == group => Some(nodes.clone()),
                    _ => None,
                });
                assert!(recorded.is_some_and(|nodes| !nodes.contains(node)), "node {node} left group {group} before the record dropped it: {steps:?}");
            }
        }
    }

    /// `cluster init` of six nodes: each conversation shard starts on three of them; the
    /// placement records the holders and evens the copies out, two per node, and the
    /// votes of the metadata group and the routing shard, one per node.
    #[test]
    fn six_nodes_keep_two_copies_of_conversation_shards_each() {
        let six = [1, 2, 3, 4, 5, 6];
        let mut groups = vec![group(0, &six, &six, 1), group(1, &six, &six, 2)];
        for id in 2..6 {
            let start = (id - 1) as usize % 6;
            let first: Vec<NodeId> = six.iter().cycle().skip(start).take(3).copied().collect();
            let mut g = group(id, &first, &first, first[0]);
            g.voters_only = true;
            groups.push(g);
        }
        converge(&six, &six, &mut groups);
        let conversation: Vec<GroupView> = groups.iter().filter(|g| g.voters_only).cloned().collect();
        let copies = count(&conversation, |g| g.members.iter().copied().collect());
        assert!(six.iter().all(|n| copies.get(n) == Some(&2)), "12 copies over 6 nodes: {copies:?}");
        assert!(conversation.iter().all(|g| g.members == g.voters && g.holders.as_ref() == Some(&g.voters)), "{conversation:?}");
        let votes = count(&groups, |g| g.voters.iter().copied().collect());
        assert!(six.iter().all(|n| votes.get(n) == Some(&3)), "18 votes over 6 nodes: {votes:?}");
    }

    #[test]
    fn a_cluster_of_one_or_two_votes_with_what_it_has() {
        let mut groups: Vec<GroupView> = (1..=3).map(|id| group(id, &[1], &[1], 1)).collect();
        assert!(converge(&[1], &[1], &mut groups).is_empty());
        let steps = converge(&[1, 2], &[1, 2], &mut groups);
        assert!(groups.iter().all(|g| g.voters == set(&[1, 2])), "{steps:?}");
    }
}
