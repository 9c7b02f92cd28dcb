//! Changing a group's members while it runs: a node that joins (it holds a certificate
//! from the cluster CA and asks a member to admit it), a node an admin removes, the
//! voters a placement picks among the members, and leadership handed to another voter.
//!
//! Membership changes are made by the group's leader with openraft's joint consensus. A
//! joining node is first a learner, made a voter once it caught up with the log (or a
//! snapshot), so adding it never stalls commits. A request that reaches a member that
//! does not lead is answered with the leader to ask; the caller goes there.
//!
//! openraft 0.9 has no leadership transfer, so [`Change::Lead`] builds one from what it
//! has: the leader holds new entries (its [`Gate`]) and stops its heartbeats once the
//! next leader has its whole log; when the other followers' leases from its last
//! message have run out (they refuse votes until then), it asks the next leader to
//! stand ([`Change::Stand`]), which wins at once: its log is the longest. This node's
//! own writes wait meanwhile (300 to 550 ms measured), and writes other members forward
//! are refused untouched, so they send them again to the next leader: no client sees
//! an error.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use crate::network::{Gate, Peers, Router};
use crate::{Node, NodeId, Raft};

/// How long the leader waits for a joining node to catch up before it answers.
const CATCH_UP_FOR: Duration = Duration::from_secs(300);

/// A change of members, as sent to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Change {
    /// Admit node `id`, reachable at `addr`, as a voter once it has caught up.
    Join { id: NodeId, addr: String },
    /// Remove node `id` (voter or learner).
    Leave { id: NodeId },
    /// Admit node `id`, reachable at `addr`, as a learner: it follows the group's log
    /// without voting. Answered once it is a member (it catches up on its own).
    Learn { id: NodeId, addr: String },
    /// Make exactly `voters` the group's voters; a voter left out stays a learner with
    /// `retain`, else it leaves the group (learners stay either way). Each new voter must
    /// be a member already, and is waited for until it has caught up; a majority of them
    /// must hold the log now.
    Voters { voters: BTreeSet<NodeId>, retain: bool },
    /// Hand leadership to voter `to` (for its leader).
    Lead { to: NodeId },
    /// Stand for election now (for the voter leadership is handed to).
    Stand,
}

/// What the node asked answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Answer {
    Done,
    /// This node does not lead the group; the leader, when one is known.
    NotLeader(Option<(NodeId, Node)>),
    Refused(String),
}

fn answer_of(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Answer {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(to)) => Answer::NotLeader(to.leader_id.zip(to.leader_node)),
        other => Answer::Refused(other.to_string()),
    }
}

/// How the refusal to admit a node that was removed from the cluster goes on after its
/// id: ids are never used again.
pub const REMOVED_FROM_CLUSTER: &str = "was removed from this cluster and is not admitted again (ids are never used again: `switchboard cluster add-node` lays out a node with a new id)";

/// The end of a `Join`'s refusal after the node was let in as a learner: the joining
/// node then knows the group had it.
pub const STAYS_A_LEARNER: &str = "it stays a learner until asked again";

/// How long the leader waits for a learner about to vote to catch up.
const VOTER_CATCH_UP_FOR: Duration = Duration::from_secs(30);

/// Makes `change` on this node's Raft for group `group`: what a peer's request and the
/// local first try both run. `gate` holds the group's new entries on this node;
/// `peers` reaches the next leader of a [`Change::Lead`].
pub async fn apply_here(raft: &Raft, group: u64, change: Change, gate: &Gate, peers: Option<&Peers>) -> Answer {
    // A quiet group's leader beats again before its membership or leadership moves.
    gate.busy();
    match change {
        Change::Stand => stand(raft).await,
        // Run to its end even when the caller goes away (a request cut off by its
        // deadline): it turns heartbeats off and on again.
        Change::Lead { to } => match peers {
            Some(peers) => {
                let (raft, gate, peers) = (raft.clone(), gate.clone(), peers.clone());
                match tokio::spawn(async move { lead(&raft, group, to, &gate, &peers).await }).await {
                    Ok(answer) => answer,
                    Err(e) => Answer::Refused(format!("the hand-over stopped: {e}")),
                }
            }
            None => Answer::Refused("this node cannot reach its peers".into()),
        },
        other => apply(raft, other, peers).await,
    }
}

/// Makes `change` on this node's Raft, which must lead the group. `peers` says which
/// members answered lately: without it, a member is taken as alive.
pub async fn apply(raft: &Raft, change: Change, peers: Option<&Peers>) -> Answer {
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return not_leader(raft);
    }
    let membership = m.membership_config.membership().clone();
    // Every voter of both halves while a change is half made (a joint membership).
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    // Half made: a change asked again is made, not taken as done, which finishes it
    // (openraft goes from the joint membership towards what is asked).
    let joint = membership.get_joint_config().len() > 1;
    match change {
        Change::Join { id, addr } => {
            if let Some(node) = membership.get_node(&id) {
                if node.addr != addr {
                    return Answer::Refused(format!("node id {id} is already a member at {}; a new node needs a new id", node.addr));
                }
                // Half made, a node only the older half names (one being removed) is
                // answered as before, and the change goes on; one the newer half names
                // is made a voter, which finishes the change.
                let newer = membership.get_joint_config().last().is_some_and(|c| c.contains(&id));
                if voters.contains(&id) && (!joint || !newer) {
                    return Answer::Done;
                }
            }
            // A learner first: it receives the log (or a snapshot) without counting
            // towards commits, and becomes a voter once it has caught up, within
            // `CATCH_UP_FOR` (a node that died meanwhile is not waited for forever).
            if let Err(e) = raft.add_learner(id, Node { addr }, false).await {
                return answer_of(e);
            }
            if !caught_up(raft, id, CATCH_UP_FOR, peers).await {
                return Answer::Refused(format!("node {id} did not catch up within {} s; {STAYS_A_LEARNER}", CATCH_UP_FOR.as_secs()));
            }
            // Only this node's voter status changes: a change made meanwhile by another
            // request (a second node joining, one leaving) is kept.
            match raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await {
                Ok(_) => Answer::Done,
                Err(e) => answer_of(e),
            }
        }
        Change::Learn { id, addr } => {
            if let Some(node) = membership.get_node(&id) {
                if node.addr != addr {
                    return Answer::Refused(format!("node id {id} is already a member at {}; a new node needs a new id", node.addr));
                }
            } else if let Err(e) = raft.add_learner(id, Node { addr }, false).await {
                return answer_of(e);
            }
            Answer::Done
        }
        Change::Voters { voters: wanted, retain } => {
            if wanted == voters && !joint {
                return Answer::Done;
            }
            if wanted.is_empty() {
                return Answer::Refused("a group needs at least one voter".into());
            }
            if let Some(stranger) = wanted.iter().find(|id| membership.get_node(id).is_none()) {
                return Answer::Refused(format!("node {stranger} is not a member of the group; add it as a learner first"));
            }
            for id in wanted.difference(&voters) {
                if !caught_up(raft, *id, VOTER_CATCH_UP_FOR, peers).await {
                    return Answer::Refused(format!("node {id} did not catch up within {} s", VOTER_CATCH_UP_FOR.as_secs()));
                }
            }
            // Without `retain` the voters left out leave the group: one at a time, a
            // node being removed, never a reshuffle.
            if !retain && voters.difference(&wanted).count() > 1 {
                return Answer::Refused("only one voter may leave the group in one change".into());
            }
            if let Some(why) = short_of_majority(raft, &wanted, peers).await {
                return match raft.metrics().borrow().current_leader {
                    Some(l) if l == raft.metrics().borrow().id => Answer::Refused(why),
                    // Leadership moved meanwhile: the new leader decides.
                    _ => not_leader(raft),
                };
            }
            // `retain`: a voter left out stays a learner, with the log it has; without,
            // it leaves the group in the same change.
            match raft.change_membership(ChangeMembers::ReplaceAllVoters(wanted), retain).await {
                Ok(_) => Answer::Done,
                Err(e) => answer_of(e),
            }
        }
        Change::Lead { .. } | Change::Stand => Answer::Refused("leadership moves through `apply_here`".into()),
        Change::Leave { id } => {
            if membership.get_node(&id).is_none() {
                return Answer::Done;
            }
            if voters.len() == 1 && voters.contains(&id) {
                return Answer::Refused(format!("node {id} is the group's last voter"));
            }
            if voters.contains(&id) {
                let rest: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
                if let Some(why) = short_of_majority(raft, &rest, peers).await {
                    return match raft.metrics().borrow().current_leader {
                        Some(l) if l == raft.metrics().borrow().id => Answer::Refused(why),
                        _ => not_leader(raft),
                    };
                }
            }
            // `retain: false`: the node leaves the group altogether, not kept as a learner.
            let change = if voters.contains(&id) {
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            match raft.change_membership(change, false).await {
                Ok(_) => Answer::Done,
                Err(e) => answer_of(e),
            }
        }
    }
}

/// Within how long a member must have answered this node (on any group: one
/// connection per peer) to count as alive for a membership change.
const ALIVE_WITHIN: Duration = Duration::from_secs(2);

/// Whether member `id` answered this node lately (`peers`; `true` without them). In an
/// idle group a member that died after the last entry still shows that entry as
/// replicated to it: the log alone does not tell it is gone.
fn alive(m: &openraft::RaftMetrics<NodeId, Node>, id: NodeId, peers: Option<&Peers>) -> bool {
    id == m.id || peers.is_none_or(|peers| m.membership_config.membership().get_node(&id).is_some_and(|node| peers.answered_within(&node.addr, ALIVE_WITHIN)))
}

/// Whether member `id` holds, within `patience`, every entry this leader had when asked,
/// and answers this node.
async fn caught_up(raft: &Raft, id: NodeId, patience: Duration, peers: Option<&Peers>) -> bool {
    let target = raft.metrics().borrow().last_log_index.unwrap_or(0);
    raft.wait(Some(patience))
        .metrics(
            |m| m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).is_some_and(|matched| matched.index >= target) && alive(m, id, peers),
            "member caught up",
        )
        .await
        .is_ok()
}

/// Who leads, as this node knows it: the answer to a request it cannot make.
fn not_leader(raft: &Raft) -> Answer {
    let m = raft.metrics().borrow().clone();
    Answer::NotLeader(m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned().map(|n| (l, n))))
}

/// Why `voters` could not commit now, if a majority of them does not hold this
/// leader's log and answer this node (within 2 s): a change to them would stall the
/// group until the others came back. `None` when they can.
async fn short_of_majority(raft: &Raft, voters: &BTreeSet<NodeId>, peers: Option<&Peers>) -> Option<String> {
    let me = raft.metrics().borrow().id;
    let target = raft.metrics().borrow().last_log_index.unwrap_or(0);
    let needed = voters.len() / 2 + 1;
    let holding = |m: &openraft::RaftMetrics<NodeId, Node>| {
        voters
            .iter()
            .filter(|v| **v == me || (m.replication.as_ref().and_then(|r| r.get(*v).cloned().flatten()).is_some_and(|l| l.index >= target) && alive(m, **v, peers)))
            .count()
    };
    let enough = raft.wait(Some(Duration::from_secs(2))).metrics(|m| holding(m) >= needed, "a majority of the voters holds the log").await;
    match enough {
        Ok(_) => None,
        Err(_) => Some(format!("fewer than {needed} of the voters {voters:?} hold the group's log and answer now; the change would stall the group until the others came back")),
    }
}

/// The lease a follower in `group` grants its leader: it refuses votes for this long
/// after the leader's last message (its `election_timeout_max`, `member_config`).
fn lease_of(node: NodeId, group: u64) -> Duration {
    Duration::from_millis(250 + 50 * crate::election_window(node, group))
}

/// On the leader of `group`: hands leadership to voter `to` (see the module's notes).
async fn lead(raft: &Raft, group: u64, to: NodeId, gate: &Gate, peers: &Peers) -> Answer {
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return not_leader(raft);
    }
    if to == m.id {
        return Answer::Done;
    }
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let Some(addr) = membership.get_node(&to).map(|n| n.addr.clone()).filter(|_| voters.contains(&to)) else {
        return Answer::Refused(format!("node {to} is not a voter of group {group}"));
    };
    // A next leader that does not answer now would leave the group without one.
    if let Err(e) = peers.status(&addr, Duration::from_millis(500)).await {
        return Answer::Refused(format!("node {to} does not answer: {e}"));
    }
    // A next leader that lags would make the hold long: it must hold what this leader
    // has now before writes are held at all.
    if !caught_up(raft, to, Duration::from_secs(1), Some(peers)).await {
        return Answer::Refused(format!("node {to} lags behind this leader's log"));
    }
    let Some(held) = gate.try_hold() else {
        return Answer::Refused(format!("a hand-over of group {group} is under way"));
    };
    // Every entry taken before the hold is committed and answered here (an entry the
    // next leader committed for us would be answered "unknown"), and the next leader
    // holds them all.
    let settled = raft
        .wait(Some(Duration::from_secs(1)))
        .metrics(|m| m.last_applied.map(|l| l.index) >= m.last_log_index, "every entry taken applied")
        .await
        .is_ok();
    if !settled || !caught_up(raft, to, Duration::from_secs(1), Some(peers)).await {
        return Answer::Refused(format!("node {to} did not catch up within 1 s"));
    }
    raft.runtime_config().heartbeat(false);
    // Heartbeats come back however this ends.
    let heartbeats = Heartbeats(raft.clone());
    // The other followers vote for the next leader once their lease has run out; they
    // stand themselves later still (lease plus their election timeout).
    let lease = voters.iter().filter(|v| **v != m.id && **v != to).map(|v| lease_of(*v, group)).max().unwrap_or_default();
    tokio::time::sleep(lease + Duration::from_millis(30)).await;
    let stood = peers.change_members(&addr, group, Change::Stand, Duration::from_secs(2)).await;
    let moved = raft
        .wait(Some(Duration::from_millis(1500)))
        .metrics(|m| m.current_leader.is_some_and(|l| l != m.id), "another leader heard")
        .await
        .is_ok();
    drop(heartbeats);
    drop(held);
    let leader = raft.metrics().borrow().current_leader;
    match (moved, leader) {
        (true, Some(l)) if l == to => Answer::Done,
        (true, Some(l)) => Answer::Refused(format!("leadership went to node {l}, not {to}")),
        (true, None) => Answer::Refused(format!("leadership left this node; node {to} has not been heard as leader yet")),
        (false, _) => Answer::Refused(format!("node {to} was not elected ({})", match stood {
            Ok(answer) => format!("{answer:?}"),
            Err(e) => e,
        })),
    }
}

/// Turns the leader's heartbeats back on when dropped.
struct Heartbeats(Raft);

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.runtime_config().heartbeat(true);
    }
}

/// On the voter leadership is handed to: stands for election and waits a second to win.
async fn stand(raft: &Raft) -> Answer {
    let me = raft.metrics().borrow().id;
    if raft.metrics().borrow().current_leader == Some(me) {
        return Answer::Done;
    }
    if let Err(e) = raft.trigger().elect().await {
        return Answer::Refused(e.to_string());
    }
    match raft.wait(Some(Duration::from_secs(1))).metrics(|m| m.current_leader == Some(m.id), "elected").await {
        Ok(_) => Answer::Done,
        Err(_) => Answer::Refused("not elected within 1 s".into()),
    }
}

/// The pause before a change is sent to the leader a node named, so that two nodes that
/// name each other during an election are not asked in a tight loop.
pub const FOLLOW_PAUSE: Duration = Duration::from_millis(50);

/// Makes `change` through whichever node leads group `group`, asking this node's Raft
/// first (as hosted by `router`) and following the leader it names; gives up after
/// `patience`.
pub async fn apply_anywhere(router: &Router, peers: &Peers, group: u64, change: Change, patience: Duration) -> Result<(), String> {
    let Some(raft) = router.group(group) else { return Err(format!("this node hosts no group {group}")) };
    let gate = router.gate(group);
    let raft = &raft;
    let apply = |change: Change| {
        let gate = gate.clone();
        async move { apply_here(raft, group, change, &gate, Some(peers)).await }
    };
    let give_up = tokio::time::Instant::now() + patience;
    let mut answer = apply(change.clone()).await;
    loop {
        match answer {
            Answer::Done => return Ok(()),
            Answer::Refused(why) => return Err(why),
            Answer::NotLeader(leader) => {
                if tokio::time::Instant::now() >= give_up {
                    return Err(format!("no leader made the change within {} s", patience.as_secs()));
                }
                answer = match leader {
                    // A moment first: two nodes that each name the other (stale metrics
                    // during an election) are not bounced between without a pause.
                    Some((_, node)) => match async {
                        tokio::time::sleep(FOLLOW_PAUSE).await;
                        peers.change_members(&node.addr, group, change.clone(), patience).await
                    }
                    .await
                    {
                        Ok(answer) => answer,
                        Err(e) => {
                            tracing::debug!(addr = %node.addr, error = %e, "membership change not delivered; trying again");
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            apply(change.clone()).await
                        }
                    },
                    None => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        apply(change.clone()).await
                    }
                };
            }
        }
    }
}
