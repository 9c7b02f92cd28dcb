//! Supervised ractor actors, one per active conversation, operator and skill group.
//!
//! The state machine decides; actors do what needs time and fan-out: they wake the
//! sockets reading a stream and own the timers, armed from the absolute deadlines
//! stored in committed state. An operator's actor expires its offers; a skill group's
//! actor owns the queue's timers: it asks for a new round of offers when a conversation
//! everyone passed on may be offered again, and wakes the supervisors' floor when a
//! waiting conversation crosses the group's SLA. An actor holds nothing that is not
//! rebuilt from that state, so the supervisor restarts a crashed one without losing
//! anything.
//!
//! Architecture invariant: actors never change the shard state directly; every change
//! goes through the [`Proposer`] and comes back as an applied entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::core::Effect;
use crate::error::Error;
use crate::model::{Command, OfferId, OperatorId, SkillGroupId, Timestamp};
use crate::routing::new_round_at;
use crate::state::ConversationStatus;
use crate::shard::{new_stream, Notice, Proposer, Shard, StreamKey, Wakeups};

/// How often an entity actor checks whether it can passivate.
const PASSIVATE_CHECK: Duration = Duration::from_secs(30);
/// A closed conversation's actor checks this soon after the wake that found it closed
/// whether anyone still follows it, and stops if not: nothing is left for it to do, and
/// with only the periodic check every visitor cycling through conversations kept an
/// actor per conversation for up to a minute and a half (at 450 conversations a second
/// in the bench's soak, tens of thousands of idle actors).
const CLOSED_GRACE: Duration = Duration::from_secs(2);
/// Retry delay when an expiry was refused because this node's clock ran behind.
const EXPIRE_RETRY: Duration = Duration::from_millis(50);
/// The longest wait between two tries at expiring an offer.
const EXPIRE_RETRY_MAX: Duration = Duration::from_secs(5);
/// The least wait before trying again an expiry that could not be committed.
const EXPIRE_RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

/// The wait before the next try at expiring an offer whose entry was not due yet
/// (the proposer's clock behind the deadline): doubling from `EXPIRE_RETRY`, so a
/// clock far behind costs a few entries, not one every 50 ms.
fn expire_retry(retries: u32) -> Duration {
    EXPIRE_RETRY.saturating_mul(1u32 << retries.min(16)).min(EXPIRE_RETRY_MAX)
}
/// Pause before asking again for a new round whose proposal failed.
const ROUND_RETRY: Duration = Duration::from_secs(1);

/// The wall clock: for what is checked against the world's time (a signed identity's
/// expiry), never against entry times.
pub fn wall_ms() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
}

/// The latest entry time this process applied that read ahead of its clock, and the
/// monotonic moment it was seen.
static CLOCK_FLOOR: Mutex<Option<(u64, Instant)>> = Mutex::new(None);
/// While the clock reads ahead of the wall clock it runs this fraction slower than real
/// time (1/32: a timer of 30 s lasts 31 s), so that it meets the wall clock again: an
/// hour ahead is made up in 32 hours, a few hundred milliseconds of skew between two
/// leaders in seconds.
const CLOCK_SLEW: u64 = 32;
/// An applied entry this far ahead of the wall clock is logged (once a minute at most).
const CLOCK_AHEAD_LOGGED_MS: u64 = 1_000;
/// When an entry ahead of the wall clock was last logged, in wall milliseconds.
static CLOCK_AHEAD_LOGGED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where the clock's floor stands `passed` after it was set at `at`: on from `at` at
/// nearly the real pace.
fn floor_line(at: u64, passed: Duration) -> u64 {
    let passed = passed.as_millis() as u64;
    at.saturating_add(passed - passed / CLOCK_SLEW)
}

/// Whether an entry stamped `at` moves the floor: when it is past the floor's line.
fn moves_floor(floor: Option<(u64, Duration)>, at: u64) -> bool {
    floor.is_none_or(|(line_at, passed)| at > floor_line(line_at, passed))
}

/// The clock: the wall clock, or the floor's line where that reads later.
fn entry_clock(floor: Option<(u64, Duration)>, wall: u64) -> u64 {
    floor.map_or(wall, |(at, passed)| wall.max(floor_line(at, passed)))
}

/// The floor as the clock reads it now: its time and how long ago it was set.
fn floor_now() -> Option<(u64, Duration)> {
    CLOCK_FLOOR.lock().unwrap_or_else(|p| p.into_inner()).map(|(at, seen)| (at, seen.elapsed()))
}

/// The clock entries are stamped with and every timer is measured by: the wall clock,
/// except that it never reads below the latest entry time this process applied
/// (`observe_entry_time`), from which it goes on at nearly the real pace.
///
/// An entry's time never goes back (routing rules 3). When one was stamped ahead of this
/// node's wall clock (a leader whose clock was stepped forward and then set right, or a
/// leader's clock ahead of this one's), the entries after it would all carry that one
/// moment until the wall clock caught up, and a timer armed for a deadline after it would
/// wait for the wall clock too: offers made then stayed out for as long as the clock had
/// been ahead. Read from here, time goes on from the latest entry, a thirty-second part
/// slower than real time (`CLOCK_SLEW`) until the wall clock meets it, so offers, rounds
/// and waits keep their lengths within that part. Like a hybrid logical clock, it takes
/// the latest time it sees: the process's groups all follow the fastest clock among the
/// leaders of the groups it holds. How far it reads ahead of the wall clock is on
/// `/metrics` (`switchboard_clock_ahead_ms`).
pub fn now_ms() -> Timestamp {
    Timestamp(entry_clock(floor_now(), wall_ms().0))
}

/// Tells the clock the time of an entry this process applied (or loaded, or a member
/// sent it): `now_ms` never reads below it from now on.
pub fn observe_entry_time(at: Timestamp) {
    {
        let mut floor = CLOCK_FLOOR.lock().unwrap_or_else(|p| p.into_inner());
        // Every entry past the floor's line moves it, those this node stamped itself by
        // its wall clock included: when that clock is then set back, time goes on from
        // its latest entry. An entry behind the line (stamped by a clock behind it) does
        // not hold it back.
        if moves_floor(floor.map(|(line_at, seen)| (line_at, seen.elapsed())), at.0) {
            *floor = Some((at.0, Instant::now()));
        }
    }
    let wall = wall_ms().0;
    if at.0 > wall.saturating_add(CLOCK_AHEAD_LOGGED_MS) {
        let last = CLOCK_AHEAD_LOGGED_AT.load(std::sync::atomic::Ordering::Relaxed);
        if wall.saturating_sub(last) >= 60_000 && CLOCK_AHEAD_LOGGED_AT.compare_exchange(last, wall, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed).is_ok() {
            warn!(ahead_ms = at.0 - wall, "an entry's time reads ahead of this node's clock (a leader's clock runs ahead, or this one's behind): entries and timers follow it; synchronise the nodes' clocks");
        }
    }
}

/// How far `now_ms` reads ahead of the wall clock, in milliseconds (0 when it does not).
pub fn clock_ahead_ms() -> u64 {
    let wall = wall_ms().0;
    entry_clock(floor_now(), wall) - wall
}

/// How long to wait for `now_ms` to reach `deadline`: longer than the difference while
/// the clock reads ahead of the wall clock and runs slower than real time.
pub fn wait_until(deadline: Timestamp) -> Duration {
    let wall = wall_ms().0;
    let now = entry_clock(floor_now(), wall);
    let left = deadline.0.saturating_sub(now);
    if now > wall {
        Duration::from_millis(left.saturating_add(left.div_ceil(CLOCK_SLEW - 1)).saturating_add(1))
    } else {
        Duration::from_millis(left)
    }
}

pub enum SupervisorMsg {
    Applied(Notice),
    Subscribe(StreamKey, RpcReplyPort<Wakeups>),
    /// Leadership of the shard's Raft group was gained (true) or lost (false).
    Leadership(bool),
    /// Number of active entity actors, for metrics and tests.
    CountActive(RpcReplyPort<usize>),
    /// Chaos drill: make the actor of this stream panic, to exercise supervision.
    /// Replies whether such an actor was running.
    Crash(StreamKey, RpcReplyPort<bool>),
    /// Something supervisors see changed without a committed entry (an SLA crossing).
    WakeFloor,
}

pub enum EntityMsg {
    Wake,
    Subscribe(RpcReplyPort<Wakeups>),
    ArmOffer { offer: OfferId, deadline: Timestamp },
    CancelOffer { offer: OfferId },
    /// An offer's deadline came; `retries` so far (its entry was not due yet).
    OfferDue { offer: OfferId, retries: u32 },
    /// The skill group's next queue deadline (new round or SLA crossing) is here.
    QueueDue,
    /// A `RouteQueue` proposal failed: ask again for the rounds it covered.
    RoundsFailed { asked_before: Timestamp },
    PassivateCheck,
    Crash,
}

/// Supervises all entity actors of one shard on this node.
pub struct ShardSupervisor;

pub struct SupervisorArgs {
    pub shard: Arc<Shard>,
    pub proposer: Arc<dyn Proposer>,
    pub leader: bool,
}

pub struct SupervisorState {
    shard: Arc<Shard>,
    proposer: Arc<dyn Proposer>,
    leader: bool,
    active: HashMap<StreamKey, ActorRef<EntityMsg>>,
    by_actor: HashMap<ActorId, StreamKey>,
    /// Stream wake-up senders outlive actor restarts, so readers never notice one.
    streams: HashMap<StreamKey, Arc<watch::Sender<u64>>>,
    /// How many streams were left after the last sweep of unfollowed ones (followers).
    swept_at: usize,
    restarts: u64,
}

impl ShardSupervisor {
    pub async fn start(args: SupervisorArgs) -> Result<ActorRef<SupervisorMsg>, Error> {
        let shard = args.shard.clone();
        let (actor, _handle) =
            Actor::spawn(None, ShardSupervisor, args).await.map_err(|e| Error::Actor(format!("spawn supervisor: {e}")))?;
        shard.attach(actor.clone());
        Ok(actor)
    }
}

impl SupervisorState {
    async fn activate(&mut self, key: &StreamKey, myself: &ActorRef<SupervisorMsg>) -> Option<ActorRef<EntityMsg>> {
        if let Some(actor) = self.active.get(key) {
            return Some(actor.clone());
        }
        let stream = self.streams.entry(key.clone()).or_insert_with(new_stream).clone();
        let args = EntityArgs {
            key: key.clone(),
            shard: self.shard.clone(),
            proposer: self.proposer.clone(),
            supervisor: myself.clone(),
            stream,
            arm_timers: self.leader,
        };
        match Actor::spawn_linked(None, EntityActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.by_actor.insert(actor.get_id(), key.clone());
                self.active.insert(key.clone(), actor.clone());
                self.shard.set_active_actors(self.active.len());
                Some(actor)
            }
            Err(e) => {
                warn!(?key, error = %e, "could not activate actor");
                None
            }
        }
    }

    /// An actor of `key` stopped: a wake-up sent to it and not yet handled went with it,
    /// so the stream moves once for whoever follows it.
    fn wake_followers(&self, key: &StreamKey) {
        if let Some(stream) = self.streams.get(key) {
            if stream.receiver_count() > 0 {
                stream.send_modify(|v| *v += 1);
            }
        }
    }

    /// Without actors (a follower) nothing passivates streams: once the map has doubled
    /// since the last sweep, the streams nobody follows any more are dropped, so its
    /// size follows the sockets open, at a constant cost per subscription.
    fn sweep_unfollowed(&mut self) {
        if self.streams.len() >= 2 * self.swept_at + 64 {
            let active = &self.active;
            self.streams.retain(|key, stream| stream.receiver_count() > 0 || active.contains_key(key));
            self.swept_at = self.streams.len();
        }
    }

    fn forget(&mut self, cell: &ActorCell) -> Option<StreamKey> {
        let key = self.by_actor.remove(&cell.get_id())?;
        self.active.remove(&key);
        self.shard.set_active_actors(self.active.len());
        Some(key)
    }

    /// Operators with pending offers need a live actor to expire them, and skill groups
    /// with a queue one to watch its deadlines (where the queue is routed: a
    /// conversation shard's copy of a queue has no timers).
    async fn activate_timer_owners(&mut self, myself: &ActorRef<SupervisorMsg>) {
        let routes = self.shard.routes();
        let (operators, groups): (Vec<OperatorId>, Vec<SkillGroupId>) = {
            let state = self.shard.read();
            (
                state.operators.values().filter(|o| !o.offers.is_empty()).map(|o| o.config.id.clone()).collect(),
                state.groups.values().filter(|g| routes && !g.queue.is_empty()).map(|g| g.config.id.clone()).collect(),
            )
        };
        for operator in operators {
            self.activate(&StreamKey::Operator(operator), myself).await;
        }
        for group in groups {
            self.activate(&StreamKey::Group(group), myself).await;
        }
    }

    fn wake_floor(&self) {
        if let Some(actor) = self.active.get(&StreamKey::Floor) {
            let _ = actor.cast(EntityMsg::Wake);
        } else if let Some(stream) = self.streams.get(&StreamKey::Floor) {
            // No floor actor (a follower, or between two): its readers still hear.
            stream.send_modify(|v| *v += 1);
        }
    }
}

impl Actor for ShardSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: SupervisorArgs) -> Result<Self::State, ActorProcessingErr> {
        let mut state = SupervisorState {
            shard: args.shard,
            proposer: args.proposer,
            leader: args.leader,
            active: HashMap::new(),
            by_actor: HashMap::new(),
            streams: HashMap::new(),
            swept_at: 0,
            restarts: 0,
        };
        if state.leader {
            state.activate_timer_owners(&myself).await;
        }
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Applied(notice) => {
                for effect in notice.effects {
                    if !state.leader {
                        break;
                    }
                    match effect {
                        Effect::ArmOfferTimer { offer, operator, deadline } => {
                            if let Some(actor) = state.activate(&StreamKey::Operator(operator), &myself).await {
                                let _ = actor.cast(EntityMsg::ArmOffer { offer, deadline });
                            }
                        }
                        Effect::CancelOfferTimer { offer, operator } => {
                            if let Some(actor) = state.active.get(&StreamKey::Operator(operator)) {
                                let _ = actor.cast(EntityMsg::CancelOffer { offer });
                            }
                        }
                    }
                }
                let floor_changed = !notice.touched.groups.is_empty() || !notice.touched.operators.is_empty();
                if floor_changed {
                    state.wake_floor();
                }
                if state.leader && state.shard.routes() {
                    // A queue that gained a conversation needs its group actor's timers.
                    let queued: Vec<SkillGroupId> = {
                        let shard = state.shard.read();
                        notice
                            .touched
                            .groups
                            .iter()
                            .filter(|g| shard.groups.get(*g).is_some_and(|g| !g.queue.is_empty()))
                            .cloned()
                            .collect()
                    };
                    for group in queued {
                        state.activate(&StreamKey::Group(group), &myself).await;
                    }
                }
                let keys = notice
                    .touched
                    .conversations
                    .into_iter()
                    .map(StreamKey::Conversation)
                    .chain(notice.touched.operators.into_iter().map(StreamKey::Operator))
                    .chain(notice.touched.groups.into_iter().map(StreamKey::Group));
                for key in keys {
                    if state.leader && matches!(key, StreamKey::Conversation(_)) && !state.active.contains_key(&key) {
                        // A followed conversation's actor starts with its activity, not
                        // with its follower: an idle session costs no actor.
                        if state.streams.get(&key).is_some_and(|stream| stream.receiver_count() > 0) {
                            state.activate(&key, &myself).await;
                        }
                    }
                    if let Some(actor) = state.active.get(&key) {
                        let _ = actor.cast(EntityMsg::Wake);
                    } else if let Some(stream) = state.streams.get(&key) {
                        // Followed while no actor runs (a leadership change stopped it):
                        // the stream outlives its actor, and its readers still hear.
                        stream.send_modify(|v| *v += 1);
                    }
                }
            }
            SupervisorMsg::Subscribe(key, reply) => {
                // A conversation's actor only relays wake-ups: its follower gets the
                // supervisor's stream, and the actor starts when an entry touches it.
                // (Even while its actor runs: one that is stopping for being idle would
                // drop the reply.)
                let relay_only = matches!(key, StreamKey::Conversation(_));
                if state.leader && !relay_only {
                    if let Some(actor) = state.activate(&key, &myself).await {
                        let _ = actor.cast(EntityMsg::Subscribe(reply));
                    }
                } else {
                    // Entity actors run on the leader only (they own timers and propose);
                    // a follower's sockets, and a quiet conversation's, follow the
                    // supervisor's streams, which applied entries wake directly.
                    state.sweep_unfollowed();
                    let stream = state.streams.entry(key).or_insert_with(new_stream);
                    let _ = reply.send(stream.subscribe());
                }
            }
            SupervisorMsg::Leadership(leader) => {
                if leader == state.leader {
                    return Ok(());
                }
                state.leader = leader;
                // Timers belong to the leader only: drop every actor and let readers and
                // timers re-activate them under the new role.
                let stopped: Vec<StreamKey> = state
                    .active
                    .drain()
                    .map(|(key, actor)| {
                        actor.stop(Some("leadership changed".into()));
                        key
                    })
                    .collect();
                state.by_actor.clear();
                state.shard.set_active_actors(0);
                // Streams somebody follows stay (their sockets keep listening); the rest
                // would otherwise stay in the map for good.
                state.streams.retain(|_, stream| stream.receiver_count() > 0);
                // A wake-up still in a stopped actor's mailbox went with it (ractor takes
                // the stop first): each stopped actor's stream moves once, so its readers
                // look again (a look that finds nothing new costs one read). Streams
                // without an actor were woken by the supervisor itself.
                for key in &stopped {
                    state.wake_followers(key);
                }
                if leader {
                    state.activate_timer_owners(&myself).await;
                }
            }
            SupervisorMsg::CountActive(reply) => {
                let _ = reply.send(state.active.len());
            }
            SupervisorMsg::Crash(key, reply) => {
                let running = state.active.get(&key).is_some_and(|actor| actor.cast(EntityMsg::Crash).is_ok());
                let _ = reply.send(running);
            }
            SupervisorMsg::WakeFloor => state.wake_floor(),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(key) = state.forget(&cell) {
                    state.wake_followers(&key);
                    state.restarts += 1;
                    warn!(?key, %error, restarts = state.restarts, "actor failed; restarting from committed state");
                    state.activate(&key, &myself).await;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(key) = state.forget(&cell) {
                    debug!(?key, ?reason, "actor passivated");
                    state.wake_followers(&key);
                    // Nobody reads the stream any more: forget it too, or every
                    // conversation ever followed would stay in this map.
                    if state.streams.get(&key).is_some_and(|s| s.receiver_count() == 0) {
                        state.streams.remove(&key);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// One conversation, operator or skill group.
pub struct EntityActor;

pub struct EntityArgs {
    key: StreamKey,
    shard: Arc<Shard>,
    proposer: Arc<dyn Proposer>,
    supervisor: ActorRef<SupervisorMsg>,
    stream: Arc<watch::Sender<u64>>,
    arm_timers: bool,
}

type Timer = ractor::concurrency::JoinHandle<Result<(), ractor::MessagingErr<EntityMsg>>>;

pub struct EntityState {
    key: StreamKey,
    shard: Arc<Shard>,
    proposer: Arc<dyn Proposer>,
    supervisor: ActorRef<SupervisorMsg>,
    stream: Arc<watch::Sender<u64>>,
    arm_timers: bool,
    timers: BTreeMap<OfferId, Timer>,
    /// A skill group's one queue timer, at its next deadline.
    queue_timer: Option<(Timestamp, Timer)>,
    /// New-round deadlines up to here were already asked for; if no operator could take
    /// the conversation then, the next change to the group routes it instead.
    rounds_asked_upto: Timestamp,
    idle_checks: u32,
    /// A check after [`CLOSED_GRACE`] is on its way (this conversation was found closed).
    closing_check: bool,
    /// The task that sends this actor its periodic passivation checks. It holds the
    /// actor's cell (its mailboxes) until it ends, so it is ended with the actor: it would
    /// otherwise sleep on for up to [`PASSIVATE_CHECK`] after the stop, and a
    /// visitor cycling through conversations left that many seconds of dead actors'
    /// mailboxes in memory (about 50 MiB at 480 conversations a second in the bench's
    /// soak).
    passivate: Option<ractor::concurrency::JoinHandle<()>>,
    /// The pending check after [`CLOSED_GRACE`] (ended with the actor too).
    closing: Option<Timer>,
}

impl EntityState {
    /// Whether this actor stands for a conversation that is closed (closed ones are not
    /// in the hot state).
    fn closed_conversation(&self) -> bool {
        match &self.key {
            StreamKey::Conversation(id) => {
                self.shard.read().conversations.get(id).is_none_or(|c| matches!(c.status, ConversationStatus::Closed))
            }
            _ => false,
        }
    }

    /// Asks for an early passivation check once the conversation is closed.
    fn check_when_closed(&mut self, myself: &ActorRef<EntityMsg>) {
        if !self.closing_check && self.closed_conversation() {
            self.closing_check = true;
            self.closing = Some(myself.send_after(CLOSED_GRACE, || EntityMsg::PassivateCheck));
        }
    }

    fn arm(&mut self, myself: &ActorRef<EntityMsg>, offer: OfferId, deadline: Timestamp) {
        if !self.arm_timers {
            return;
        }
        let delay = wait_until(deadline);
        if let Some(old) = self.timers.insert(offer, myself.send_after(delay, move || EntityMsg::OfferDue { offer, retries: 0 })) {
            old.abort();
        }
    }

    /// The group's earliest deadlines: the next new round not yet asked for (of a
    /// conversation everyone passed on, with no offer out), and the next SLA crossing
    /// of a queued conversation after `now`.
    fn queue_deadlines(&self, group: &SkillGroupId, now: Timestamp) -> (Option<Timestamp>, Option<Timestamp>) {
        let shard = self.shard.read();
        let Some(g) = shard.groups.get(group) else { return (None, None) };
        let (mut round, mut sla) = (None, None);
        let earliest = |next: &mut Option<Timestamp>, at: Timestamp| *next = Some(next.map_or(at, |n: Timestamp| n.min(at)));
        let mut waiting = false;
        for (_, id) in &g.queue {
            let Some(conv) = shard.conversations.get(id) else { continue };
            let ConversationStatus::Queued { offer, .. } = conv.status else { continue };
            waiting |= offer.is_none();
            if let Some(at) = new_round_at(g, conv).filter(|at| offer.is_none() && *at > self.rounds_asked_upto) {
                earliest(&mut round, at);
            }
            let crossing = conv.created_at.plus_ms(g.config.sla_ms);
            if crossing > now {
                earliest(&mut sla, crossing);
            }
        }
        // Rules 6: while the group is closed, its opening is the next round (its steps and
        // wrap-ups could make no offer before it). While it is open, a waiting
        // conversation's next routing step not yet asked for, and the opening itself when
        // it has not been routed since (a boundary passed while no timer ran, on a new
        // leader or after a failed proposal, is due at once).
        let closed = shard.group_closed(group, now);
        if closed {
            // New rounds too: a closed group makes no offers, so they wait for the opening.
            round = None;
        }
        if waiting && closed {
            if let Some(hours) = shard.group_hours.get(group) {
                // A schedule that does not open within the look-ahead is looked at again
                // in an hour.
                earliest(&mut round, crate::hours::next_change(hours, now).unwrap_or(now.plus_ms(3_600_000)));
            }
        }
        if waiting && !closed {
            // Closed at some moment since the last round asked for: at it, or it changed
            // (closed, then opened again) after it.
            let asked = self.rounds_asked_upto;
            let closed_since = |hours: &crate::model::OpeningHours| {
                asked.0 == 0 || shard.group_closed(group, asked) || crate::hours::next_change(hours, asked).is_some_and(|t| t <= now)
            };
            if shard.rules >= 6 && shard.group_hours.get(group).is_some_and(closed_since) {
                earliest(&mut round, now);
            }
            if let Some(steps) = shard.group_steps.get(group).filter(|_| shard.rules >= 6) {
                for (_, id) in &g.queue {
                    let Some(conv) = shard.conversations.get(id) else { continue };
                    if !matches!(conv.status, ConversationStatus::Queued { offer: None, .. }) {
                        continue;
                    }
                    let since = shard.queued_since.get(id).copied().unwrap_or(conv.created_at);
                    if let Some(at) = steps.iter().map(|s| since.plus_ms(s.after_ms)).find(|at| *at > self.rounds_asked_upto) {
                        earliest(&mut round, at);
                    }
                }
            }
            // An operator who may take the group's conversations (its own, or its
            // overflow groups' from rules 6) whose wrap-up ends while one waits: route
            // then, as for a new round.
            let overflow: Vec<&SkillGroupId> = shard.group_steps.get(group).into_iter().flatten().flat_map(|s| s.overflow.iter()).collect();
            for (operator, until) in &shard.wrap_up {
                let member = |op: &crate::state::Operator| op.config.groups.contains(group) || op.config.groups.iter().any(|g| overflow.contains(&g));
                if *until > self.rounds_asked_upto && shard.operators.get(operator).is_some_and(member) {
                    earliest(&mut round, *until);
                }
            }
        }
        (round, sla)
    }

    fn arm_queue(&mut self, myself: &ActorRef<EntityMsg>) {
        let StreamKey::Group(group) = &self.key else { return };
        // A conversation shard routes nothing: its `RouteQueue` would be an entry that
        // decides nothing, fsynced on every voter (and its SLA wake-ups reach no floor).
        if !self.arm_timers || !self.shard.routes() {
            return;
        }
        let now = now_ms();
        let (round, sla) = self.queue_deadlines(group, now);
        let Some(deadline) = round.into_iter().chain(sla).min() else {
            if let Some((_, timer)) = self.queue_timer.take() {
                timer.abort();
            }
            return;
        };
        if self.queue_timer.as_ref().is_some_and(|(armed, _)| *armed == deadline) {
            return;
        }
        // One millisecond late rather than early: the entry's stamp must reach the deadline.
        let delay = wait_until(deadline) + Duration::from_millis(1);
        if let Some((_, old)) = self.queue_timer.replace((deadline, myself.send_after(delay, || EntityMsg::QueueDue))) {
            old.abort();
        }
    }

    fn queue_due(&mut self, myself: &ActorRef<EntityMsg>) {
        self.queue_timer = None;
        let StreamKey::Group(group) = &self.key else { return };
        let now = now_ms();
        if self.queue_deadlines(group, now).0.is_some_and(|round| round <= now) {
            let asked_before = self.rounds_asked_upto;
            self.rounds_asked_upto = now;
            let proposer = self.proposer.clone();
            let group = group.clone();
            let actor = myself.clone();
            tokio::spawn(async move {
                if let Err(e) = proposer.propose(Command::RouteQueue { group: group.clone() }).await {
                    warn!(%group, error = %e, "could not route the queue; retrying");
                    actor.send_after(ROUND_RETRY, move || EntityMsg::RoundsFailed { asked_before });
                }
            });
        }
        // Waiting times are read when a floor snapshot is rendered: a crossing shows at once.
        let _ = self.supervisor.cast(SupervisorMsg::WakeFloor);
        self.stream.send_modify(|v| *v += 1);
        self.arm_queue(myself);
    }
}

impl Actor for EntityActor {
    type Msg = EntityMsg;
    type State = EntityState;
    type Arguments = EntityArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: EntityArgs) -> Result<Self::State, ActorProcessingErr> {
        let mut state = EntityState {
            key: args.key,
            shard: args.shard,
            proposer: args.proposer,
            supervisor: args.supervisor,
            stream: args.stream,
            arm_timers: args.arm_timers,
            timers: BTreeMap::new(),
            queue_timer: None,
            rounds_asked_upto: Timestamp(0),
            idle_checks: 0,
            closing_check: false,
            passivate: None,
            closing: None,
        };
        // Re-arm from the deadlines in committed state: this is what makes a restart or
        // a move to a new leader keep every offer timeout.
        if let StreamKey::Operator(operator) = &state.key {
            let pending: Vec<(OfferId, Timestamp)> = {
                let shard = state.shard.read();
                shard.offers.values().filter(|o| &o.operator == operator).map(|o| (o.id, o.deadline)).collect()
            };
            for (offer, deadline) in pending {
                state.arm(&myself, offer, deadline);
            }
        }
        state.arm_queue(&myself);
        // Something may have been applied while no actor was awake.
        state.stream.send_modify(|v| *v += 1);
        state.passivate = Some(myself.send_interval(PASSIVATE_CHECK, || EntityMsg::PassivateCheck));
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            EntityMsg::Wake => {
                state.idle_checks = 0;
                state.stream.send_modify(|v| *v += 1);
                state.arm_queue(&myself);
                state.check_when_closed(&myself);
            }
            EntityMsg::QueueDue => state.queue_due(&myself),
            EntityMsg::RoundsFailed { asked_before } => {
                state.rounds_asked_upto = state.rounds_asked_upto.min(asked_before);
                state.arm_queue(&myself);
            }
            EntityMsg::Subscribe(reply) => {
                state.idle_checks = 0;
                let _ = reply.send(state.stream.subscribe());
            }
            EntityMsg::ArmOffer { offer, deadline } => state.arm(&myself, offer, deadline),
            EntityMsg::CancelOffer { offer } => {
                if let Some(timer) = state.timers.remove(&offer) {
                    timer.abort();
                }
            }
            EntityMsg::OfferDue { offer, retries } => {
                state.timers.remove(&offer);
                let proposer = state.proposer.clone();
                let actor = myself.clone();
                // Commit off the actor's mailbox so a slow commit never delays wake-ups.
                tokio::spawn(async move {
                    match proposer.propose(Command::ExpireOffer { offer }).await {
                        Ok(_) => {}
                        Err(Error::NotDue(_)) => {
                            actor.send_after(expire_retry(retries), move || EntityMsg::OfferDue { offer, retries: retries.saturating_add(1) });
                        }
                        // Not committed now (an outcome unknown, the store holding writes,
                        // a holder out of reach): the offer would stay pending, its
                        // operator's slot taken and its conversation waiting on them,
                        // until the next leader re-armed it. Tried again, with the same
                        // backoff; an expiry already committed answers `Done` then. The
                        // retries end with this actor (leadership lost, the shard moved).
                        Err(e @ (Error::Commit(_) | Error::Storage(_) | Error::Unreachable(_) | Error::Unavailable(_) | Error::Actor(_))) => {
                            warn!(%offer, error = %e, "could not expire offer; trying again");
                            actor.send_after(expire_retry(retries).max(EXPIRE_RETRY_AFTER_FAILURE), move || EntityMsg::OfferDue { offer, retries: retries.saturating_add(1) });
                        }
                        Err(e) => warn!(%offer, error = %e, "could not expire offer"),
                    }
                });
            }
            EntityMsg::PassivateCheck => {
                state.closing_check = false;
                let closed = state.closed_conversation();
                // A conversation's actor arms no timers: it only relays wake-ups, and the
                // supervisor's stream reaches the sockets that follow it without it. So
                // one that went quiet stops even while followed (an idle session then
                // costs no actor); the next entry that touches it starts it again.
                let relay_only = matches!(state.key, StreamKey::Conversation(_));
                if (relay_only || state.stream.receiver_count() == 0) && state.timers.is_empty() && state.queue_timer.is_none() {
                    state.idle_checks += 1;
                    // A closed conversation has nothing to wait for: it goes at once.
                    if state.idle_checks >= 2 || closed {
                        myself.stop(Some("idle".into()));
                    }
                } else {
                    state.idle_checks = 0;
                    // Its visitor is still there (to rate, say): look again soon.
                    state.check_when_closed(&myself);
                }
            }
            EntityMsg::Crash => panic!("chaos drill: actor {:?} crashed on request", state.key),
        }
        Ok(())
    }
}

/// An actor's timers end with it, however it ends (stopped, or failed: ractor runs no
/// `post_stop` after a panic, but always drops the state).
impl Drop for EntityState {
    fn drop(&mut self) {
        for (_, timer) in std::mem::take(&mut self.timers) {
            timer.abort();
        }
        if let Some((_, timer)) = self.queue_timer.take() {
            timer.abort();
        }
        if let Some(check) = self.passivate.take() {
            check.abort();
        }
        if let Some(check) = self.closing.take() {
            check.abort();
        }
    }
}

/// Chaos drill: makes the actor of `key` panic; `false` if none was running.
pub async fn crash(supervisor: &ActorRef<SupervisorMsg>, key: StreamKey) -> Result<bool, Error> {
    ractor::call!(supervisor, SupervisorMsg::Crash, key).map_err(|e| Error::Actor(format!("crash drill: {e}")))
}

/// Subscribes to a stream through the supervisor, activating its actor if needed.
pub async fn subscribe(supervisor: &ActorRef<SupervisorMsg>, key: StreamKey) -> Result<Wakeups, Error> {
    ractor::call!(supervisor, SupervisorMsg::Subscribe, key).map_err(|e| Error::Actor(format!("subscribe: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_clock_goes_on_from_an_entry_ahead_and_meets_the_wall_clock_again() {
        let wall = 1_800_000_000_000;
        let passed = Duration::from_millis(3_200);
        // Set 3.2 s ago a second ahead: it went on 3.1 s of those, 0.1 s made up.
        assert_eq!(entry_clock(Some((wall - 3_200 + 1_000, passed)), wall), wall + 900);
        // Set 3.2 s ago 0.1 s ahead: made up, the wall clock again.
        assert_eq!(entry_clock(Some((wall - 3_200 + 100, passed)), wall), wall);
        // Behind the wall clock it is the wall clock.
        assert_eq!(entry_clock(Some((wall - 10_000, passed)), wall), wall);
        assert_eq!(entry_clock(None, wall), wall);
        assert_eq!(floor_line(u64::MAX - 5, passed), u64::MAX);
    }

    #[test]
    fn a_leader_s_own_entries_move_the_floor_so_a_clock_set_back_goes_on_from_them() {
        let t = 1_800_000_000_000;
        // Its own entry at t, then one 64 ms later by the same wall clock (which may be
        // an hour ahead): the second moves the floor, though the clock read it already
        // (the floor's line runs 2 ms behind by then).
        assert!(moves_floor(None, t));
        assert!(moves_floor(Some((t, Duration::from_millis(64))), t + 64));
        // An entry stamped by a clock behind the floor's line does not hold it back.
        assert!(!moves_floor(Some((t, Duration::from_millis(3_200))), t + 1_000));
        // The wall clock set back an hour 2 s after the last entry: the clock reads on
        // from that entry, not an hour back.
        assert_eq!(entry_clock(Some((t + 5, Duration::from_millis(2_000))), t + 2_005 - 3_600_000), t + 5 + 2_000 - 62);
    }
}
