//! Changing a group's members while it runs: a node that joins (it holds a certificate
//! from the cluster CA and asks a member to admit it) and a node an admin removes.
//!
//! Both changes are made by the group's leader with openraft's joint consensus. A
//! joining node is first a learner, made a voter once it caught up with the log (or a
//! snapshot), so adding it never stalls commits. A request that reaches a member that
//! does not lead is answered with the leader to ask; the caller goes there.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use crate::network::Peers;
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

/// Makes `change` on this node's Raft, which must lead the group.
pub async fn apply(raft: &Raft, change: Change) -> Answer {
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        let leader = m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned().map(|n| (l, n)));
        return Answer::NotLeader(leader);
    }
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    match change {
        Change::Join { id, addr } => {
            if let Some(node) = membership.get_node(&id) {
                if node.addr != addr {
                    return Answer::Refused(format!("node id {id} is already a member at {}; a new node needs a new id", node.addr));
                }
                if voters.contains(&id) {
                    return Answer::Done;
                }
            }
            // A learner first: it receives the log (or a snapshot) without counting
            // towards commits, and becomes a voter once it has caught up, within
            // `CATCH_UP_FOR` (a node that died meanwhile is not waited for forever).
            if let Err(e) = raft.add_learner(id, Node { addr }, false).await {
                return answer_of(e);
            }
            let target = raft.metrics().borrow().last_log_index.unwrap_or(0);
            let caught_up = raft
                .wait(Some(CATCH_UP_FOR))
                .metrics(
                    |m| m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).is_some_and(|matched| matched.index >= target),
                    "joining node caught up",
                )
                .await;
            if caught_up.is_err() {
                return Answer::Refused(format!("node {id} did not catch up within {} s; it stays a learner until asked again", CATCH_UP_FOR.as_secs()));
            }
            // Only this node's voter status changes: a change made meanwhile by another
            // request (a second node joining, one leaving) is kept.
            match raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await {
                Ok(_) => Answer::Done,
                Err(e) => answer_of(e),
            }
        }
        Change::Leave { id } => {
            if membership.get_node(&id).is_none() {
                return Answer::Done;
            }
            if voters.len() == 1 && voters.contains(&id) {
                return Answer::Refused(format!("node {id} is the group's last voter"));
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

/// Makes `change` through whichever node leads group `group`, asking this node's Raft
/// first and following the leader it names; gives up after `patience`.
pub async fn apply_anywhere(raft: &Raft, peers: &Peers, group: u64, change: Change, patience: Duration) -> Result<(), String> {
    let give_up = tokio::time::Instant::now() + patience;
    let mut answer = apply(raft, change.clone()).await;
    loop {
        match answer {
            Answer::Done => return Ok(()),
            Answer::Refused(why) => return Err(why),
            Answer::NotLeader(leader) => {
                if tokio::time::Instant::now() >= give_up {
                    return Err(format!("no leader made the change within {} s", patience.as_secs()));
                }
                answer = match leader {
                    Some((_, node)) => match peers.change_members(&node.addr, group, change.clone(), patience).await {
                        Ok(answer) => answer,
                        Err(e) => {
                            tracing::debug!(addr = %node.addr, error = %e, "membership change not delivered; trying again");
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            apply(raft, change.clone()).await
                        }
                    },
                    None => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        apply(raft, change.clone()).await
                    }
                };
            }
        }
    }
}
