//! Quiet groups: a group with nothing to write stops heartbeating every 50 ms.
//!
//! A node hosts many groups (ADR 0006), and openraft's leader of each sends every member
//! an empty append every heartbeat interval whether or not anything happens: measured on
//! an idle `dev --nodes 3`, 9% of a core with 4 conversation shards and 19% with 16, for
//! doing nothing. Where a contact center has quiet hours (nights, a shard whose
//! conversations all closed) that is the whole cost of the cluster.
//!
//! A leader whose group wrote nothing for [`QUIET_AFTER`], whose entries are all applied
//! and held by every member, and whose membership is not changing, *marks* the group
//! quiet: its empty appends now travel as quiet beats (`network`'s `AppendQuiet`). A
//! voter that accepts a quiet beat stops its own election timer (openraft's
//! `enable_elect`), because the beats will now come rarely: it watches for them itself and
//! stands only after [`SILENCE`] without one (staggered by its election window, so
//! that the first to stand wins). After [`SETTLE`] of quiet beats at the usual rate, the
//! leader turns openraft's heartbeat off and sends one beat every [`BEAT`] instead.
//!
//! Anything that writes wakes the group at once on the leader (the group's `Gate`, which
//! every local proposal and membership change passes, and every forwarded write): the
//! mark is cleared and the heartbeat turned back on before the entry is appended, so
//! the entry and every beat after it go out as plain appends, and a follower that
//! receives a plain append runs its own election timer again. A mark cleared in a
//! race is found by the monitor on its next tick (a new log index on a quiet leader).
//!
//! What a quiet group costs in failover: a follower whose quiet leader dies stands
//! [`SILENCE`] (plus its stagger) after the last beat instead of 400-700 ms; sooner when
//! another group on this node saw the same leader go away and a probe finds that
//! node silent. Groups with traffic are never quiet, so a leader kill under load
//! recovers as before.
//!
//! Safety does not depend on any of this: which node may stand and when only changes
//! liveness, and a vote is granted or refused by openraft's rules as before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::network::Peers;
use crate::{NodeId, Raft};

/// A leader's group with no new entry for this long may go quiet.
pub const QUIET_AFTER: Duration = Duration::from_secs(2);
/// Quiet beats at the usual rate before the leader slows down: every voter has heard
/// several by then.
pub const SETTLE: Duration = Duration::from_millis(250);
/// How often a quiet leader beats. A follower serves reads while it heard its leader
/// within 2 s (`node`'s `QUORUM_CONTACT`): four beats fit in that.
pub const BEAT: Duration = Duration::from_millis(500);
/// A quiet follower that heard no beat for this long (plus 150 ms per step of its
/// election window) runs its election timer again, which has run out by then.
pub const SILENCE: Duration = Duration::from_millis(1500);
/// How often the monitor looks at every group.
const TICK: Duration = Duration::from_millis(100);
/// How long a group's leader lets a joint membership (the first half of a change of
/// voters) stand before it makes the second half itself. openraft's
/// `change_membership` appends the second half from the caller's task the moment the
/// first commits, so a joint membership that stays is a change whose caller went away
/// (its leader crashed or stepped down between the halves, or the request was dropped):
/// no one else would finish it, and the group would need a majority of both voter sets
/// for good. Far longer than the moment between the halves of a change that runs.
pub const JOINT_PATIENCE: Duration = Duration::from_secs(10);

/// One group's state on this node: the gate its new entries pass, and whether it is
/// quiet here.
pub(crate) struct Local {
    /// Held while leadership is handed on (`members::Change::Lead`).
    pub(crate) held: tokio::sync::watch::Sender<bool>,
    /// On the leader: its empty appends go out as quiet beats. Shared with the group's
    /// network clients, which read it for every append.
    pub(crate) marked: Arc<AtomicBool>,
    /// Appends (plain or quiet) received from a leader.
    pub(crate) appends: AtomicU64,
    /// Whether this node, leading the group, may make it quiet (`Router::allow_quiet`).
    pub(crate) allowed: AtomicBool,
    /// Whether a change of voters this node finishes drops the voters it leaves out
    /// instead of keeping them as learners (`Router::drop_left_out_voters`).
    pub(crate) drop_left_out: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    raft: Option<Raft>,
    lead: Lead,
    /// The leader's last log index when the monitor last looked, and since when.
    last_index: Option<u64>,
    since: Option<Instant>,
    /// On a voter: the quiet leader whose beats it waits for with its timer off.
    following: Option<NodeId>,
    /// Elections held after a restart (`node`'s `hold_elections_after_restart`).
    held_after_restart: bool,
    /// When a member last refused a quiet beat as unknown.
    refused_at: Option<Instant>,
    /// When a leader's append last arrived.
    heard: Option<Instant>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Lead {
    /// Heartbeats as openraft sends them.
    #[default]
    Active,
    /// Marked since then; openraft's heartbeats still on.
    Settling(Instant),
    /// openraft's heartbeats off; the last beat sent then.
    Quiet(Instant),
}

/// Whether a group is quiet on this node, and as what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quietness {
    /// This node leads the group and has marked it quiet.
    pub leading: bool,
    /// This node follows a quiet leader with its election timer off.
    pub following: bool,
}

impl Default for Local {
    fn default() -> Self {
        Local {
            held: tokio::sync::watch::channel(false).0,
            marked: Arc::new(AtomicBool::new(false)),
            appends: AtomicU64::new(0),
            allowed: AtomicBool::new(false),
            drop_left_out: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }
}

impl Local {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_raft(&self, raft: Option<Raft>) {
        let mut s = self.lock();
        s.raft = raft;
        s.lead = Lead::Active;
        s.following = None;
        s.since = None;
        self.marked.store(false, Ordering::SeqCst);
        apply_elect(&s);
    }

    /// Something is about to be written: the group is no longer quiet on this leader,
    /// and its heartbeats are on again before the entry is appended.
    pub(crate) fn wake(&self) {
        if !self.marked.swap(false, Ordering::SeqCst) {
            return;
        }
        let mut s = self.lock();
        s.since = Some(Instant::now());
        if s.lead != Lead::Active {
            s.lead = Lead::Active;
            if let Some(raft) = &s.raft {
                raft.runtime_config().heartbeat(true);
            }
        }
    }

    /// A membership change or a hand-over starts: the group wakes, and stays awake for
    /// [`QUIET_AFTER`] from now (longer than the hand-over's checks before it holds the
    /// gate, during which the monitor does not look at a held group at all).
    pub(crate) fn busy(&self) {
        self.wake();
        self.lock().since = Some(Instant::now());
    }

    /// A quiet beat that a member refused as unknown (an older build): the group
    /// stays awake for a minute before it tries again.
    pub(crate) fn refused_quiet(&self) {
        self.lock().refused_at = Some(Instant::now());
        self.wake();
    }

    /// Whether this member's leader has been silent for `lease` (the vote check's
    /// question); for a member waiting for a quiet leader's beats, which come every
    /// [`BEAT`], only after [`SILENCE`].
    pub(crate) fn silent_for(&self, lease: Duration) -> bool {
        let s = self.lock();
        let window = if s.following.is_some() { SILENCE } else { lease };
        s.heard.is_some_and(|at| at.elapsed() >= window)
    }

    /// A leader's append was handled: `Some(None)` a plain append from this member's
    /// leader (its own election timer runs again), `Some(Some(leader))` a quiet beat it
    /// accepted (it waits for the next instead), `None` one it refused (a deposed
    /// leader's), which changes nothing.
    pub(crate) fn heard(&self, from: Option<Option<NodeId>>) {
        self.appends.fetch_add(1, Ordering::Relaxed);
        let Some(quiet_from) = from else { return };
        let mut s = self.lock();
        if s.following != quiet_from {
            s.following = quiet_from;
            apply_elect(&s);
        }
    }

    /// Marks the receipt time only (before the append is handled, as the vote check
    /// reads it).
    pub(crate) fn touch(&self) {
        self.lock().heard = Some(Instant::now());
    }

    pub(crate) fn heard_within(&self, window: Duration) -> bool {
        self.lock().heard.is_some_and(|at| at.elapsed() <= window)
    }

    /// Holds this member's elections after a restart (`hold`), or lets them run again
    /// (unless a quiet leader's beats are being waited for).
    pub(crate) fn hold_elections(&self, hold: bool) {
        let mut s = self.lock();
        s.held_after_restart = hold;
        apply_elect(&s);
    }

    pub(crate) fn quietness(&self) -> Quietness {
        let s = self.lock();
        Quietness { leading: s.lead != Lead::Active, following: s.following.is_some() }
    }

    /// Stops waiting for quiet leader `leader`'s beats: this voter's timer runs again.
    fn release(&self, leader: NodeId) {
        let mut s = self.lock();
        // A beat since the probe: the leader is there after all.
        let recent = s.heard.is_some_and(|at| at.elapsed() < BEAT + 3 * TICK);
        if s.following == Some(leader) && !recent {
            s.following = None;
            apply_elect(&s);
        }
    }

    /// The monitor's look at this group: returns the Raft to send a quiet beat through.
    fn tick(&self, m: &openraft::RaftMetrics<NodeId, crate::Node>, held: bool, window: u64) -> Option<Raft> {
        let now = Instant::now();
        let mut s = self.lock();
        let raft = s.raft.clone()?;
        // Follower side: a quiet leader silent for too long, or no longer the leader.
        if let Some(leader) = s.following {
            let silence = SILENCE + Duration::from_millis(150 * window);
            let silent = s.heard.map_or(true, |at| at.elapsed() >= silence);
            if silent || m.current_leader != Some(leader) {
                s.following = None;
                apply_elect(&s);
            }
        }
        let leads = m.current_leader == Some(m.id) && m.state == openraft::ServerState::Leader;
        if !leads {
            if s.lead != Lead::Active {
                s.lead = Lead::Active;
                self.marked.store(false, Ordering::SeqCst);
                raft.runtime_config().heartbeat(true);
            }
            s.last_index = None;
            return None;
        }
        // A hand-over turns the heartbeats off and on itself.
        if held {
            return None;
        }
        if m.last_log_index != s.last_index || s.since.is_none() {
            s.last_index = m.last_log_index;
            s.since = Some(now);
            if s.lead != Lead::Active {
                self.marked.store(false, Ordering::SeqCst);
                s.lead = Lead::Active;
                raft.runtime_config().heartbeat(true);
            }
            return None;
        }
        let marked = self.marked.load(Ordering::SeqCst);
        match s.lead {
            Lead::Active => {
                let idle = s.since.is_some_and(|since| now.duration_since(since) >= QUIET_AFTER);
                let refused = s.refused_at.is_some_and(|at| now.duration_since(at) < Duration::from_secs(60));
                if idle && !refused && self.allowed.load(Ordering::Relaxed) && settled(&m) {
                    s.lead = Lead::Settling(now);
                    self.marked.store(true, Ordering::SeqCst);
                }
                None
            }
            Lead::Settling(_) | Lead::Quiet(_) if !marked => {
                // Woken in a race with the mark: heartbeats on.
                s.lead = Lead::Active;
                s.since = Some(now);
                raft.runtime_config().heartbeat(true);
                None
            }
            // A member fell behind (it was down and came back, or lost entries): plain
            // heartbeats until it holds everything again, so that the entries it is
            // sent meanwhile (plain appends, which start its own timer) are followed
            // by heartbeats at the usual rate.
            Lead::Settling(_) | Lead::Quiet(_) if !settled(&m) => {
                self.marked.store(false, Ordering::SeqCst);
                s.lead = Lead::Active;
                s.since = Some(now);
                raft.runtime_config().heartbeat(true);
                None
            }
            Lead::Settling(at) => {
                if now.duration_since(at) >= SETTLE {
                    raft.runtime_config().heartbeat(false);
                    s.lead = Lead::Quiet(now);
                }
                None
            }
            Lead::Quiet(last) => {
                if now.duration_since(last) >= BEAT {
                    s.lead = Lead::Quiet(now);
                    Some(raft)
                } else {
                    None
                }
            }
        }
    }

    fn following(&self) -> Option<NodeId> {
        self.lock().following
    }
}

fn apply_elect(s: &State) {
    if let Some(raft) = &s.raft {
        raft.runtime_config().elect(!(s.held_after_restart || s.following.is_some()));
    }
}

/// Whether a leader's group may go quiet: everything it has is applied and held by
/// every member, its membership is not changing, and it has someone to beat to.
fn settled(m: &openraft::RaftMetrics<NodeId, crate::Node>) -> bool {
    let Some(last) = m.last_log_index else { return false };
    if m.last_applied.map(|l| l.index) != Some(last) {
        return false;
    }
    if m.membership_config.membership().get_joint_config().len() != 1 {
        return false;
    }
    // openraft lists the leader among its replication targets: a group of one has
    // nobody to beat to and nothing to save.
    let mut others = m.replication.iter().flatten().filter(|(id, _)| **id != m.id).peekable();
    others.peek().is_some() && others.all(|(_, matched)| matched.map(|l| l.index) == Some(last))
}

/// Every group's [`Local`] on this node.
#[derive(Default)]
pub(crate) struct Locals {
    pub(crate) groups: RwLock<HashMap<u64, Arc<Local>>>,
    started: AtomicBool,
}

impl Locals {
    pub(crate) fn get(&self, group: u64) -> Arc<Local> {
        if let Some(local) = self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&group) {
            return local.clone();
        }
        self.groups.write().unwrap_or_else(|p| p.into_inner()).entry(group).or_default().clone()
    }

    pub(crate) fn find(&self, group: u64) -> Option<Arc<Local>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()
    }

    /// Starts the monitor once: it ends when the node's router is gone.
    pub(crate) fn start(self: &Arc<Self>, peers: Weak<RwLock<Option<Peers>>>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let locals = Arc::downgrade(self);
        tokio::spawn(monitor(locals, peers));
    }
}

/// Looks at every group every [`TICK`]: a leader's group goes quiet or beats, a quiet
/// follower whose leader went silent stands again. When a group's leader on this node
/// changes away from node `x`, every group waiting for quiet beats from `x` asks `x`
/// for its status, and stops waiting if it does not answer.
async fn monitor(locals: Weak<Locals>, peers: Weak<RwLock<Option<Peers>>>) {
    let mut leaders: BTreeMap<u64, Option<NodeId>> = BTreeMap::new();
    let mut probed: HashMap<NodeId, Instant> = HashMap::new();
    // Per group this node leads with a joint membership: that membership's log id and
    // since when it has been seen (or last finished from here).
    let mut joints: BTreeMap<u64, (Option<openraft::LogId<NodeId>>, Instant)> = BTreeMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        let Some(locals) = locals.upgrade() else { return };
        let groups: Vec<(u64, Arc<Local>)> = locals.groups.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(g, l)| (*g, l.clone())).collect();
        drop(locals);
        let mut gone: HashSet<NodeId> = HashSet::new();
        let mut addresses: HashMap<NodeId, String> = HashMap::new();
        for (group, local) in &groups {
            let held = *local.held.borrow();
            let raft = local.lock().raft.clone();
            let Some(raft) = raft else { continue };
            let m = raft.metrics().borrow().clone();
            let window = crate::election_window(m.id, *group);
            if let Some(beat) = local.tick(&m, held, window) {
                let _ = beat.trigger().heartbeat().await;
            }
            for (id, node) in m.membership_config.membership().nodes() {
                addresses.insert(*id, node.addr.clone());
            }
            finish_joint(&mut joints, *group, &raft, &m, !local.drop_left_out.load(Ordering::Relaxed));
            let before = leaders.insert(*group, m.current_leader);
            if let Some(Some(x)) = before {
                if m.current_leader != Some(x) && x != m.id {
                    gone.insert(x);
                }
            }
        }
        for x in gone {
            let waiting: Vec<(u64, Arc<Local>)> = groups.iter().filter(|(_, l)| l.following() == Some(x)).cloned().collect();
            if waiting.is_empty() || probed.get(&x).is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            probed.insert(x, Instant::now());
            let (Some(addr), Some(peers)) = (addresses.get(&x).cloned(), peers.upgrade().and_then(|p| p.read().unwrap_or_else(|p| p.into_inner()).clone())) else { continue };
            tokio::spawn(async move {
                if peers.status(&addr, Duration::from_millis(300)).await.is_ok() {
                    return;
                }
                tracing::debug!(node = x, groups = waiting.len(), "a quiet leader does not answer: its followers stand");
                for (group, local) in waiting {
                    let raft = local.lock().raft.clone();
                    let window = raft.map(|r| crate::election_window(r.metrics().borrow().id, group)).unwrap_or(0);
                    let local = local.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100 * window)).await;
                        local.release(x);
                    });
                }
            });
        }
    }
}

/// Makes the second half of a change of voters that was left half made: once this node
/// has led `group` with the same joint membership for [`JOINT_PATIENCE`], it changes the
/// voters to that membership's newer half, which is where the change was going (openraft
/// goes from a joint membership to its last half). The voters it leaves out stay as
/// learners with `retain` (the placement drops those that are to go), else leave.
fn finish_joint(joints: &mut BTreeMap<u64, (Option<openraft::LogId<NodeId>>, Instant)>, group: u64, raft: &Raft, m: &openraft::RaftMetrics<NodeId, crate::Node>, retain: bool) {
    let configs = m.membership_config.membership().get_joint_config();
    let (Some(target), true) = (configs.last(), configs.len() > 1 && m.current_leader == Some(m.id)) else {
        joints.remove(&group);
        return;
    };
    let at = *m.membership_config.log_id();
    match joints.get(&group) {
        Some((seen, since)) if *seen == at && since.elapsed() < JOINT_PATIENCE => {}
        Some((seen, _)) if *seen == at => {
            joints.insert(group, (at, Instant::now()));
            let (raft, target) = (raft.clone(), target.clone());
            tracing::warn!(group, voters = ?target, "a change of voters was left half made (a joint membership): finishing it");
            tokio::spawn(async move {
                if let Err(e) = raft.change_membership(openraft::ChangeMembers::ReplaceAllVoters(target), retain).await {
                    tracing::warn!(group, error = %e, "could not finish a change of voters left half made; trying again later");
                }
            });
        }
        _ => {
            joints.insert(group, (at, Instant::now()));
        }
    }
}
