//! The outbox worker (ADR 0009): on the shard's leader, hands committed outbox entries
//! to their channel's provider and commits what became of them.
//!
//! - An entry is marked attempted (`DeliveriesAttempted`, committed) before it is sent,
//!   so a leader that takes over knows which sends may have happened.
//! - Outcomes are committed in batches (`DeliveryResults`): sent with the provider's id,
//!   a retry time, or a dead letter.
//! - Retries back off from 1 s, doubling, to 5 min, no sooner than a provider's
//!   `retry_after`; after [`switchboard_actors::state::MAX_DELIVERY_ATTEMPTS`] attempts
//!   or [`GIVE_UP_AFTER_MS`] the entry is dead-lettered as failed.
//! - Each channel is paced by its provider's documented rate (a token bucket), and at
//!   most [`IN_FLIGHT`] sends run at once on a node.
//! - An attempt by another leader (or before this node's restart) with no outcome is
//!   resent at once where the provider deduplicates (the Channel API's delivery id);
//!   elsewhere (Telegram), once [`ORPHAN_AFTER_MS`] passed without an outcome
//!   ([`SLOW_ORPHAN_AFTER_MS`] for another node's mail or message with files, which may
//!   take up to [`FILE_SEND_TIMEOUT`]), it is dead-lettered as `unknown` rather than risk
//!   sending it twice.
//! - Before that longer wait ends, the leader asks the node that made the attempt
//!   whether its process is still sending it (`SendingStates`, every [`ASK_EVERY`]): a
//!   node that says no (it was restarted, or gave the send up) will never answer, so
//!   the attempt is settled `unknown` then. A node that cannot be reached may still be
//!   at it: the attempt waits. Another node's text send is asked about the same way
//!   from [`ORPHAN_AFTER_MS`] on, for at most [`QUICK_ASK_GRACE_MS`] more.
//! - A node that says it never sent the entry (its worker gave the mark up when its
//!   commit's outcome was unknown, and the mark was written after all) has it sent again
//!   by the leader: nothing went out for that attempt.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_actors::actors::now_ms;
use switchboard_actors::model::{AdapterConfig, ChannelId, Command, ConversationId, DeliveryOutcome, DeliveryResult, Timestamp};
use switchboard_actors::shard::{Proposer, Shard};
use switchboard_actors::state::{ConversationStatus, DeliveryStatus, HistoryItem, MAX_DELIVERY_ATTEMPTS};
use switchboard_adapters::{http, Outgoing, SendOutcome};
use switchboard_raft::network::Peers;
use switchboard_raft::Raft;

/// Sends running at once for one outbox (a node of one group has one; a split node one
/// for each conversation shard it leads).
pub const IN_FLIGHT: usize = 512;
/// Sends running at once for one outbox and one channel (and, apart, for its bot): a
/// provider that hangs holds at most this many of [`IN_FLIGHT`], so the other
/// channels keep sending.
pub const CHANNEL_IN_FLIGHT: usize = 128;
/// A provider call that has not answered within this is a failed attempt.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// An attempt with no outcome this long after it was committed is an orphan.
pub const ORPHAN_AFTER_MS: u64 = 15_000;
/// The backstop around a text send that cannot be repeated safely, all its parts
/// together: a second past the client's deadline for one call, so that a call the client
/// gives up on ends as the client says (not reached: retried) rather than `unknown`.
const TEXT_SEND_BACKSTOP: Duration = Duration::from_secs(SEND_TIMEOUT.as_secs() + 1);
/// Such a send starts this soon after its attempt was recorded or not at all: with
/// [`TEXT_SEND_BACKSTOP`], it ends within [`ORPHAN_AFTER_MS`].
const TEXT_START_WITHIN_MS: u64 = ORPHAN_AFTER_MS - TEXT_SEND_BACKSTOP.as_secs() * 1000;
/// The same for another node's attempt that may take up to [`FILE_SEND_BACKSTOP`] (a
/// message with files; any mail, whose SMTP session has [`FILE_SEND_TIMEOUT`]; either is
/// started within [`ORPHAN_AFTER_MS`] of its attempt or not at all): that node may still
/// be at it, and its outcome may still come. What is left of the second
/// [`ORPHAN_AFTER_MS`] at the end (at least 10 s) leaves that node time to commit its
/// answer.
pub const SLOW_ORPHAN_AFTER_MS: u64 = FILE_SEND_TIMEOUT.as_millis() as u64 + 2 * ORPHAN_AFTER_MS;
/// How often the leader asks a node whether it still sends the attempts it left.
pub const ASK_EVERY: Duration = Duration::from_secs(3);
/// How long the node asked has to answer.
const ASK_TTL: Duration = Duration::from_secs(2);
/// How long past [`ORPHAN_AFTER_MS`] another node's text send waits for that node's
/// answer (one ask and its answer) before it is settled `unknown` anyway (the node is
/// gone, or still says it sends it).
pub const QUICK_ASK_GRACE_MS: u64 = ASK_EVERY.as_millis() as u64 + ASK_TTL.as_millis() as u64;
/// An entry still failing this long after it was queued is dead-lettered.
pub const GIVE_UP_AFTER_MS: u64 = 24 * 3600 * 1000;
const FIRST_BACKOFF_MS: u64 = 1000;
const MAX_BACKOFF_MS: u64 = 300_000;

/// Whether an orphaned attempt may still be running on the node that made it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slow {
    No,
    Yes,
    /// If the message has files (read from its history).
    IfFiles,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct OutboxMetrics {
    pub sent: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
    pub unknown: AtomicU64,
}

pub static METRICS: OutboxMetrics = OutboxMetrics { sent: AtomicU64::new(0), retried: AtomicU64::new(0), failed: AtomicU64::new(0), unknown: AtomicU64::new(0) };

/// Messages a second a channel's provider takes from one sender.
fn rate_of(adapter: &AdapterConfig) -> f64 {
    match adapter {
        AdapterConfig::Telegram { .. } => f64::from(switchboard_adapters::telegram::MESSAGES_PER_SECOND),
        // An adapter of our own API answers as fast as it can; 429 slows us down.
        AdapterConfig::Api { .. } => 10_000.0,
        AdapterConfig::WhatsApp { .. } => f64::from(switchboard_adapters::whatsapp::MESSAGES_PER_SECOND),
        AdapterConfig::Vk { .. } => f64::from(switchboard_adapters::vk::MESSAGES_PER_SECOND),
        AdapterConfig::Messenger { .. } => f64::from(switchboard_adapters::messenger::MESSAGES_PER_SECOND),
        AdapterConfig::Viber { .. } => f64::from(switchboard_adapters::viber::MESSAGES_PER_SECOND),
        AdapterConfig::Email { .. } => f64::from(switchboard_adapters::email::MESSAGES_PER_SECOND),
    }
}

/// A channel's bot is our own API's client: paced as the Channel API is.
const BOT_RATE: f64 = 10_000.0;

/// The wait before attempt `attempts + 1`.
pub fn backoff_ms(attempts: u32) -> u64 {
    FIRST_BACKOFF_MS.saturating_mul(1u64 << attempts.saturating_sub(1).min(20)).min(MAX_BACKOFF_MS)
}

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// Until when each channel (and, apart, its bot) sends nothing: its Channel API adapter
/// (or its bot) asked for a wait (`Retry-After`), which holds for every message to it,
/// not only the one refused (the others would each be refused too and use up an
/// attempt).
type Pauses = Arc<Mutex<HashMap<(ChannelId, bool), std::time::Instant>>>;

/// The conversations' lanes (a conversation and whether the entries are for its bot)
/// that wait for an earlier entry, while the outbox is walked in key order: a
/// conversation's entries are next to each other, so only the current one's are kept.
#[derive(Default)]
struct Lanes {
    conversation: Option<ConversationId>,
    /// For the customer, for the bot.
    held: [bool; 2],
}

impl Lanes {
    fn blocked(&self, (conversation, to_bot): (ConversationId, bool)) -> bool {
        self.conversation == Some(conversation) && self.held[usize::from(to_bot)]
    }

    fn block(&mut self, (conversation, to_bot): (ConversationId, bool)) {
        if self.conversation != Some(conversation) {
            self.conversation = Some(conversation);
            self.held = [false; 2];
        }
        self.held[usize::from(to_bot)] = true;
    }
}

/// The longest pause a provider's wait gives its channel.
const MAX_PAUSE: Duration = Duration::from_millis(MAX_BACKOFF_MS);

tokio::task_local! {
    /// The wait the provider asked for on the attempt this task makes, if it did.
    static PROVIDER_WAIT: std::cell::Cell<Option<Duration>>;
}

type Key = (ConversationId, u64);
/// The sends running: each entry's key, with its channel and whether it goes to the bot.
type InFlight = HashMap<Key, (ChannelId, bool)>;
/// An attempt of another node: the entry, the node, when its mark was committed and
/// how many attempts the entry had then (two marks may carry one time, never one count).
type Attempt = (Key, u64, Timestamp, u32);

/// Every outbox worker's sends in this process: what answers another node's `Sending`
/// question (a conversation's entries live in one group, so keys do not collide).
static SENDS: Mutex<Vec<std::sync::Weak<Mutex<InFlight>>>> = Mutex::new(Vec::new());

/// Every outbox worker's marks given up in this process (see `abandoned` in [`run`]):
/// what says `NEVER_SENT` to another node's `SendingStates` question.
static ABANDONED: Mutex<Vec<std::sync::Weak<Mutex<std::collections::HashSet<Key>>>>> = Mutex::new(Vec::new());

/// The sets of the workers still running in `registry` (those that stopped leave it).
fn live<T>(registry: &Mutex<Vec<std::sync::Weak<Mutex<T>>>>) -> Vec<Arc<Mutex<T>>> {
    let mut workers = registry.lock().unwrap_or_else(|p| p.into_inner());
    workers.retain(|w| w.strong_count() > 0);
    workers.iter().filter_map(std::sync::Weak::upgrade).collect()
}

/// For each of `keys`, its `switchboard_raft::network::sending_state` in this process:
/// `SENDING` while an outbox worker sends it (from the moment it picks the entry until
/// its outcome is committed or settled elsewhere), else `NEVER_SENT` if a worker gave
/// its mark up and has not marked it since (it sent nothing for it), else `NOT_SENDING`.
pub fn sending(keys: &[(u64, u64)]) -> Vec<u8> {
    use switchboard_raft::network::sending_state::{NEVER_SENT, NOT_SENDING, SENDING};
    let sets = live(&SENDS);
    let given_up = live(&ABANDONED);
    let keys: Vec<Key> = keys.iter().map(|(c, seq)| (ConversationId(*c), *seq)).collect();
    let mut states = vec![NOT_SENDING; keys.len()];
    for set in given_up {
        let set = set.lock().unwrap_or_else(|p| p.into_inner());
        for (i, key) in keys.iter().enumerate() {
            if set.contains(key) {
                states[i] = NEVER_SENT;
            }
        }
    }
    for set in sets {
        let set = set.lock().unwrap_or_else(|p| p.into_inner());
        for (i, key) in keys.iter().enumerate() {
            if set.contains_key(key) {
                states[i] = SENDING;
            }
        }
    }
    states
}

/// Runs the delivery worker of one group's outbox while this node leads it. `outboxes`:
/// how many outboxes the cluster's channels are split over (a split cluster's
/// conversation shards, each led by any node; one group: 1). Each paces a channel at
/// that share of its provider's rate, so together they keep to the rate.
pub async fn run(raft: Raft, proposer: Arc<dyn Proposer>, shard: Arc<Shard>, node_id: u64, gateway: Arc<switchboard_gateway::Gateway>, outboxes: u64, peers: Peers) {
    let share = 1.0 / outboxes.max(1) as f64;
    let client = match http::Client::new(SEND_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the outbox cannot send: no HTTP client");
            return;
        }
    };
    // Each send running, with the channel (and whether to its bot) it counts against.
    let in_flight: Arc<Mutex<InFlight>> = Arc::default();
    SENDS.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&in_flight));
    // Slow attempts of other nodes, each as (entry, node, time of its mark, the entry's
    // attempts then): when this
    // leader last asked that node about it, and those the node said it no longer sends.
    // An answer counts for the attempt it was asked about only, never for a later mark
    // of the same entry.
    let mut asked: HashMap<Attempt, Timestamp> = HashMap::new();
    let given_up: Arc<Mutex<std::collections::HashSet<Attempt>>> = Arc::default();
    // Entries whose mark this process gave up on (its commit's outcome was unknown and
    // it had not applied a moment later): if it applied after all, the entry reads as
    // this node's attempt, yet nothing was sent, so it is sent again, not settled
    // unknown. An entry leaves the set when this process marks it again or it leaves
    // the outbox.
    let abandoned: Arc<Mutex<std::collections::HashSet<Key>>> = Arc::default();
    ABANDONED.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&abandoned));
    // Attempts of other nodes that node says it never sent (it gave their marks up):
    // sent again, not settled `unknown`.
    let never_sent: Arc<Mutex<std::collections::HashSet<Attempt>>> = Arc::default();
    // Bumped whenever entries leave `in_flight`: they may be picked again, though no
    // command was applied (a mark that failed) or the one applied came before they left.
    let released: Arc<AtomicU64> = Arc::default();
    let (results_tx, results_rx) = tokio::sync::mpsc::unbounded_channel::<DeliveryResult>();
    tokio::spawn(commit_results(proposer.clone(), shard.clone(), node_id, results_rx, in_flight.clone(), released.clone()));
    let mut buckets: BTreeMap<(ChannelId, bool), Bucket> = BTreeMap::new();
    let pauses: Pauses = Arc::default();
    let mut with_files: HashMap<Key, bool> = HashMap::new();
    let mut idle_rounds = 0u32;
    // What the last look saw: the shard's applied count and when an entry it skipped
    // comes due. Nothing changed and nothing due: no need to look (a provider down for
    // hours leaves thousands of entries waiting for their retry time).
    let mut seen: Option<(u64, u64)> = None;
    let mut next_look: Option<Timestamp> = None;
    loop {
        // Busy: look again soon; idle: a few times a second.
        tokio::time::sleep(Duration::from_millis(if idle_rounds == 0 { 5 } else { 50 })).await;
        let leading = raft.metrics().borrow().current_leader == Some(node_id);
        if !leading {
            idle_rounds += 1;
            seen = None;
            asked.clear();
            given_up.lock().unwrap_or_else(|p| p.into_inner()).clear();
            never_sent.lock().unwrap_or_else(|p| p.into_inner()).clear();
            continue;
        }
        let now = now_ms();
        let version = (shard.applied_count(), released.load(std::sync::atomic::Ordering::Acquire));
        let flying_now = !in_flight.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        if !flying_now && seen == Some(version) && next_look.is_none_or(|at| now < at) {
            idle_rounds += 1;
            continue;
        }
        seen = Some(version);
        next_look = None;
        let mut due = |at: Timestamp| next_look = Some(next_look.map_or(at, |n: Timestamp| n.min(at)));
        let instant = std::time::Instant::now();
        let never_sent_now: std::collections::HashSet<Attempt> = never_sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut retried: std::collections::HashSet<Attempt> = std::collections::HashSet::new();
        // Other nodes' attempts of sends that take seconds, not minutes: settled once
        // their node answered, or [`QUICK_ASK_GRACE_MS`] after the orphan time.
        let mut quick: std::collections::HashSet<Attempt> = std::collections::HashSet::new();
        let paused: HashMap<(ChannelId, bool), std::time::Instant> = {
            let mut pauses = pauses.lock().unwrap_or_else(|p| p.into_inner());
            pauses.retain(|_, until| *until > instant);
            pauses.clone()
        };
        let (orphans, may_upload, mut slow_waiting, paced, paced_for) = {
            let state = shard.read();
            if state.outbox.is_empty() {
                idle_rounds += 1;
                continue;
            }
            let flying = in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let mut gave_up_marks = abandoned.lock().unwrap_or_else(|p| p.into_inner());
            gave_up_marks.retain(|k| state.outbox.contains_key(k));
            let room = IN_FLIGHT.saturating_sub(flying.len()).min(switchboard_actors::core::MAX_DELIVERY_BATCH);
            let mut orphans = Vec::new();
            let mut may_upload: Vec<Attempt> = Vec::new();
            let mut slow_waiting: Vec<Attempt> = Vec::new();
            let mut paced: Vec<Key> = Vec::new();
            let mut paced_for: Vec<(ChannelId, bool)> = Vec::new();
            // Each channel's sends running now (counted by what they were started for:
            // an entry a disconnect settled may still be on its way to the provider).
            let mut per_channel: HashMap<(ChannelId, bool), usize> = HashMap::new();
            for key in flying.values() {
                *per_channel.entry(key.clone()).or_default() += 1;
            }
            // Per conversation and recipient, one entry at a time and in order: an entry
            // waits while an earlier one of its conversation for the same recipient (the
            // customer, or the channel's bot) is being sent or waits for its retry. The
            // two are apart: a bot that does not answer holds up no message to the
            // customer (an operator's, once a supervisor took the conversation from it).
            let mut lanes = Lanes::default();
            for (key, d) in &state.outbox {
                let lane = (key.0, d.to_bot);
                if lanes.blocked(lane) {
                    continue;
                }
                if flying.contains_key(key) {
                    lanes.block(lane);
                    continue;
                }
                match d.status {
                    DeliveryStatus::Attempting { node } => {
                        lanes.block(lane);
                        // The bot's events carry a delivery id, as the Channel API's do.
                        let adapter = state.channel_adapters.get(&d.channel);
                        let safe = d.to_bot || adapter.is_some_and(AdapterConfig::resend_is_safe);
                        // Another node may still be at a slow send (an SMTP session, an
                        // upload of files) and commit its answer late. This node's own
                        // attempt that is not among its sends was made by its earlier
                        // process, whose answer went with it (or is a mark this process
                        // gave up on that committed after all, which sent nothing).
                        let slow = if node == node_id || d.to_bot {
                            Slow::No
                        } else {
                            match adapter {
                                Some(AdapterConfig::Email { .. }) => Slow::Yes,
                                Some(a) if a.carries_files(state.rules) => Slow::IfFiles,
                                _ => Slow::No,
                            }
                        };
                        let age = now.millis_since(d.updated_at);
                        // Each settlement below names the attempt's node: the core drops it
                        // if, by the time it applies, the entry is another node's attempt
                        // (this leader's view may lag its log right after an election).
                        if node == node_id && gave_up_marks.contains(key) {
                            orphans.push(DeliveryResult { conversation: key.0, seq: key.1, node, outcome: DeliveryOutcome::Retry { reason: "not sent: the mark this node gave up on applied after all".into(), retry_at: now } });
                        } else if safe {
                            orphans.push(DeliveryResult { conversation: key.0, seq: key.1, node, outcome: DeliveryOutcome::Retry { reason: "resent: the attempt's outcome was lost with its node".into(), retry_at: now } });
                        } else if age < ORPHAN_AFTER_MS {
                            due(d.updated_at.plus_ms(ORPHAN_AFTER_MS));
                        } else if never_sent_now.contains(&(*key, node, d.updated_at, d.attempts)) {
                            // Its node gave the mark up and sent nothing: send it.
                            retried.insert((*key, node, d.updated_at, d.attempts));
                            orphans.push(DeliveryResult { conversation: key.0, seq: key.1, node, outcome: DeliveryOutcome::Retry { reason: format!("not sent: node {node} gave its mark up, which applied after all"), retry_at: now } });
                        } else if age >= SLOW_ORPHAN_AFTER_MS || (slow == Slow::No && (node == node_id || age >= ORPHAN_AFTER_MS + QUICK_ASK_GRACE_MS)) {
                            orphans.push(DeliveryResult { conversation: key.0, seq: key.1, node, outcome: DeliveryOutcome::Unknown });
                        } else if slow != Slow::IfFiles {
                            // Another node's attempt: that node is asked first (it may say
                            // it never sent it, or that it still sends it).
                            if slow == Slow::No {
                                quick.insert((*key, node, d.updated_at, d.attempts));
                            }
                            slow_waiting.push((*key, node, d.updated_at, d.attempts));
                        } else {
                            // Whether it has files is read below, once the state is released.
                            may_upload.push((*key, node, d.updated_at, d.attempts));
                        }
                    }
                    DeliveryStatus::Pending if d.next_at > now => {
                        lanes.block(lane);
                        due(d.next_at);
                    }
                    DeliveryStatus::Pending if paced.len() >= room => due(now.plus_ms(5)),
                    DeliveryStatus::Pending => {
                        lanes.block(lane);
                        // Paced per channel: a channel out of tokens is skipped, so one
                        // slow provider's backlog does not hold up the others.
                        let rate = share
                            * match (d.to_bot, state.channel_adapters.get(&d.channel)) {
                                (true, _) => BOT_RATE,
                                (false, Some(adapter)) => rate_of(adapter),
                                (false, None) => continue,
                            };
                        // A channel with its share of sends running waits for one to end
                        // (which makes the next look).
                        let running = per_channel.entry((d.channel.clone(), d.to_bot)).or_default();
                        if *running >= CHANNEL_IN_FLIGHT {
                            continue;
                        }
                        if let Some(until) = paused.get(&(d.channel.clone(), d.to_bot)) {
                            // Back when the provider's wait is over.
                            due(now.plus_ms(u64::try_from(until.saturating_duration_since(instant).as_millis()).unwrap_or(u64::MAX).saturating_add(1)));
                            continue;
                        }
                        let bucket = buckets.entry((d.channel.clone(), d.to_bot)).or_insert(Bucket { tokens: rate.clamp(1.0, 50.0), at: instant });
                        bucket.tokens = (bucket.tokens + instant.duration_since(bucket.at).as_secs_f64() * rate).min(rate.max(1.0));
                        bucket.at = instant;
                        if bucket.tokens >= 1.0 {
                            bucket.tokens -= 1.0;
                            *running += 1;
                            paced.push(*key);
                            paced_for.push((d.channel.clone(), d.to_bot));
                        } else {
                            // Back when the bucket has a token again.
                            due(now.plus_ms(((1.0 - bucket.tokens) / rate * 1000.0).ceil().max(1.0) as u64));
                        }
                    }
                    _ => {}
                }
                if orphans.len() >= switchboard_actors::core::MAX_DELIVERY_BATCH {
                    break;
                }
            }
            (orphans, may_upload, slow_waiting, paced, paced_for)
        };
        let mut orphans = orphans;
        // What each such entry's history said (it does not change), kept while the entry
        // waits, so the history is read once per entry and not at every look.
        let waiting: std::collections::HashSet<Key> = may_upload.iter().map(|(k, ..)| *k).collect();
        with_files.retain(|key, _| waiting.contains(key));
        for (key, node, attempted_at, attempts) in may_upload {
            let files = match with_files.get(&key) {
                Some(files) => *files,
                // A history that cannot be read now counts as one with files (the longer
                // wait), and is read again at the next look.
                None => match carries_files(&shard, key) {
                    Some(files) => *with_files.entry(key).or_insert(files),
                    None => true,
                },
            };
            if !files && now.millis_since(attempted_at) >= ORPHAN_AFTER_MS + QUICK_ASK_GRACE_MS {
                if orphans.len() < switchboard_actors::core::MAX_DELIVERY_BATCH {
                    orphans.push(DeliveryResult { conversation: key.0, seq: key.1, node, outcome: DeliveryOutcome::Unknown });
                } else {
                    due(now);
                }
            } else {
                if !files {
                    quick.insert((key, node, attempted_at, attempts));
                }
                slow_waiting.push((key, node, attempted_at, attempts));
            }
        }
        // A slow attempt of another node waits for its answer, unless that node says its
        // process no longer sends it (then no answer will come).
        let still_waiting: std::collections::HashSet<Attempt> = slow_waiting.iter().copied().collect();
        asked.retain(|attempt, _| still_waiting.contains(attempt));
        given_up.lock().unwrap_or_else(|p| p.into_inner()).retain(|attempt| still_waiting.contains(attempt));
        never_sent.lock().unwrap_or_else(|p| p.into_inner()).retain(|attempt| still_waiting.contains(attempt) || retried.contains(attempt));
        let ask_every = ASK_EVERY.as_millis() as u64;
        let mut asks: BTreeMap<u64, Vec<Attempt>> = BTreeMap::new();
        for attempt in slow_waiting {
            let (key, node, attempted_at, _) = attempt;
            let gone = given_up.lock().unwrap_or_else(|p| p.into_inner()).contains(&attempt);
            if gone && orphans.len() < switchboard_actors::core::MAX_DELIVERY_BATCH {
                orphans.push(DeliveryResult { conversation: key.0, seq: key.1, node, outcome: DeliveryOutcome::Unknown });
                continue;
            }
            let settle_at = if quick.contains(&attempt) { attempted_at.plus_ms(ORPHAN_AFTER_MS + QUICK_ASK_GRACE_MS) } else { attempted_at.plus_ms(SLOW_ORPHAN_AFTER_MS) };
            due(settle_at.min(now.plus_ms(ask_every)));
            if asked.get(&attempt).is_none_or(|at| now.millis_since(*at) >= ask_every) {
                let attempts = asks.entry(node).or_default();
                if attempts.len() < switchboard_raft::network::MAX_SENDING_KEYS {
                    asked.insert(attempt, now);
                    attempts.push(attempt);
                }
            }
        }
        for (node, attempts) in asks {
            let addr = raft.metrics().borrow().membership_config.membership().get_node(&node).map(|n| n.addr.clone());
            let Some(addr) = addr else { continue };
            let (peers, given_up, never_sent, released, raft) = (peers.clone(), given_up.clone(), never_sent.clone(), released.clone(), raft.clone());
            // An answer counts in the term it was asked in, while this node leads it: one
            // that comes after a change of leader is about another worker's look.
            let term = raft.metrics().borrow().current_term;
            tokio::spawn(async move {
                use switchboard_raft::network::sending_state::{NEVER_SENT, NOT_SENDING};
                let question = attempts.iter().map(|((c, seq), ..)| (c.0, *seq)).collect();
                let answer = peers.sending_states(&addr, question, ASK_TTL).await;
                let still = {
                    let m = raft.metrics().borrow().clone();
                    m.current_term == term && m.current_leader == Some(node_id)
                };
                match answer {
                    Ok(_) if !still => tracing::debug!(node, "an answer about outbox attempts came after a change of leader; not used"),
                    Ok(states) => {
                        let gone: Vec<Attempt> = attempts.iter().zip(&states).filter(|(_, s)| **s == NOT_SENDING).map(|(a, _)| *a).collect();
                        let unsent: Vec<Attempt> = attempts.iter().zip(&states).filter(|(_, s)| **s == NEVER_SENT).map(|(a, _)| *a).collect();
                        let news = !gone.is_empty() || !unsent.is_empty();
                        if !gone.is_empty() {
                            tracing::info!(node, entries = gone.len(), "the node an outbox attempt was left by no longer sends it; settling it unknown");
                            given_up.lock().unwrap_or_else(|p| p.into_inner()).extend(gone);
                        }
                        if !unsent.is_empty() {
                            tracing::info!(node, entries = unsent.len(), "the node an outbox attempt was left by never sent it (it gave the mark up); sending it again");
                            never_sent.lock().unwrap_or_else(|p| p.into_inner()).extend(unsent);
                        }
                        if news {
                            // Look again now (the state did not change).
                            released.fetch_add(1, std::sync::atomic::Ordering::Release);
                        }
                    }
                    Err(e) => tracing::debug!(node, error = %e, "could not ask a node whether it still sends its outbox attempts"),
                }
            });
        }
        if !orphans.is_empty() {
            let n = orphans.len();
            if let Err(e) = proposer.propose(Command::DeliveryResults { results: orphans }).await {
                tracing::warn!(error = %e, "settling {n} orphaned outbox attempts failed; trying again");
                seen = None;
            }
        }
        if paced.is_empty() {
            idle_rounds += 1;
            continue;
        }
        idle_rounds = 0;
        // The batch is marked attempted and sent by a task of its own, so the next
        // batch is picked while this one commits (the in-flight set keeps them apart).
        let channel_of: HashMap<Key, (ChannelId, bool)> = paced.iter().copied().zip(paced_for).collect();
        in_flight.lock().unwrap_or_else(|p| p.into_inner()).extend(channel_of.iter().map(|(k, c)| (*k, c.clone())));
        let (proposer, in_flight, client, shard, results, gateway, released, abandoned, pauses) = (proposer.clone(), in_flight.clone(), client.clone(), shard.clone(), results_tx.clone(), gateway.clone(), released.clone(), abandoned.clone(), pauses.clone());
        tokio::spawn(async move {
            // Entries whose earlier mark this process gave up: that mark may still apply,
            // so an entry that reads as this node's attempt after a failed mark below may
            // be that earlier one, which another leader may have been told was never sent
            // (and sends itself). Those are not sent on a failed mark: they stay given up.
            let given_up_before: std::collections::HashSet<Key> = {
                let gave_up = abandoned.lock().unwrap_or_else(|p| p.into_inner());
                paced.iter().copied().filter(|k| gave_up.contains(k)).collect()
            };
            // Only what this entry marked is sent: an entry another node marked first
            // (a leadership change) is left to it.
            let marked = match proposer.propose(Command::DeliveriesAttempted { node: node_id, items: paced.clone() }).await {
                Ok(switchboard_actors::core::Reply::Attempted { items }) => items,
                Ok(other) => {
                    tracing::warn!(?other, "marking outbox entries attempted was answered unexpectedly");
                    Vec::new()
                }
                Err(e) => {
                    // The mark may still have committed (its outcome is unknown): what
                    // applied as ours in a moment is ours to send, lest an entry marked
                    // for this node be left unsent and later counted lost.
                    tracing::warn!(error = %e, "marking {} outbox entries attempted failed; sending those that applied as ours", paced.len());
                    tokio::time::sleep(MARK_SETTLE).await;
                    let applied: Vec<Key> = {
                        let state = shard.read();
                        paced.iter().copied().filter(|k| !given_up_before.contains(k) && state.outbox.get(k).is_some_and(|d| d.status == DeliveryStatus::Attempting { node: node_id })).collect()
                    };
                    let mut gave_up = abandoned.lock().unwrap_or_else(|p| p.into_inner());
                    for key in paced.iter().filter(|k| !applied.contains(k)) {
                        if gave_up.len() < MAX_ABANDONED_MARKS {
                            gave_up.insert(*key);
                        }
                    }
                    applied
                }
            };
            {
                let mut gave_up = abandoned.lock().unwrap_or_else(|p| p.into_inner());
                for key in &marked {
                    gave_up.remove(key);
                }
            }
            {
                let mut flying = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                for key in paced.iter().filter(|k| !marked.contains(k)) {
                    flying.remove(key);
                }
            }
            released.fetch_add(1, std::sync::atomic::Ordering::Release);
            for key in marked {
                let (client, shard, results, gateway, pauses) = (client.clone(), shard.clone(), results.clone(), gateway.clone(), pauses.clone());
                let channel = channel_of.get(&key).cloned();
                tokio::spawn(async move {
                    let (outcome, wait) = PROVIDER_WAIT
                        .scope(std::cell::Cell::new(None), async {
                            let outcome = attempt(&client, &shard, &gateway, key, node_id).await;
                            (outcome, PROVIDER_WAIT.with(std::cell::Cell::get))
                        })
                        .await;
                    // Only where the wait is the channel's own: the Channel API's (an
                    // adapter's `Retry-After` is for its whole endpoint, channel-api.md)
                    // and a bot's. A messenger's 429 is most often for one chat (flood
                    // control), while the channel is paced at its provider's overall rate:
                    // there only the refused message waits.
                    let channel = channel.filter(|(id, to_bot)| *to_bot || matches!(shard.read().channel_adapters.get(id), Some(switchboard_actors::model::AdapterConfig::Api { .. })));
                    if let (Some(wait), Some(channel)) = (wait, channel) {
                        let until = std::time::Instant::now() + wait.min(MAX_PAUSE);
                        let mut pauses = pauses.lock().unwrap_or_else(|p| p.into_inner());
                        let at = pauses.entry(channel).or_insert(until);
                        *at = (*at).max(until);
                    }
                    // Whatever this node concluded, an entry it no longer attempts is not
                    // its to fail or retry (a `Sent` still says what happened).
                    let outcome = match outcome {
                        DeliveryOutcome::Sent { .. } => outcome,
                        _ if !still_ours(&shard, key, node_id) => not_ours(),
                        _ => outcome,
                    };
                    let _ = results.send(DeliveryResult { conversation: key.0, seq: key.1, node: node_id, outcome });
                });
            }
        });
    }
}

/// Sends one attempted entry and turns the provider's answer into its outcome.
async fn attempt(client: &http::Client, shard: &Shard, gateway: &switchboard_gateway::Gateway, key: Key, node_id: u64) -> DeliveryOutcome {
    let for_bot = {
        let state = shard.read();
        match state.outbox.get(&key) {
            // Settled or marked by another node since: not ours to send.
            Some(d) if d.status != (DeliveryStatus::Attempting { node: node_id }) => return not_ours(),
            // What the customer wrote while the bot held the conversation is for the bot
            // only while it still does: once handed off (by the bot or a supervisor) or
            // closed, the operator reads it in the history, and an event the bot did not
            // take is dead-lettered instead of being tried for a day.
            Some(d) if d.to_bot => match (state.channel_bots.get(&d.channel), state.conversations.get(&key.0)) {
                (_, None) => Some(Err("the conversation is closed: not for the bot any more".to_owned())),
                (_, Some(c)) if c.status != ConversationStatus::WithBot => Some(Err("the bot no longer holds the conversation (handed off): not for it any more".to_owned())),
                (Some(bot), Some(c)) => Some(Ok((d.clone(), bot.clone(), (c.visitor.id.clone().unwrap_or_default(), c.visitor.name.clone())))),
                (None, Some(_)) => Some(Err(format!("channel {} has no bot any more", d.channel))),
            },
            _ => None,
        }
    };
    match for_bot {
        Some(Ok((d, bot, (customer_id, customer_name)))) => return to_bot(client, shard, key, &d, &bot, &customer_id, &customer_name).await,
        Some(Err(reason)) => return DeliveryOutcome::Failed { reason },
        None => {}
    }
    let (adapter, delivery, rules) = {
        let state = shard.read();
        let Some(d) = state.outbox.get(&key).cloned() else {
            return DeliveryOutcome::Failed { reason: "the outbox entry is gone".into() };
        };
        let Some(adapter) = state.channel_adapters.get(&d.channel).cloned() else {
            return DeliveryOutcome::Failed { reason: format!("channel {} has no adapter any more", d.channel) };
        };
        (adapter, d, state.rules)
    };
    let entry = match shard.history(key.0, key.1.saturating_sub(1), 1) {
        Ok(entries) => entries.into_iter().find(|e| e.seq == key.1),
        Err(e) => return retry_or_give_up(&delivery, now_ms(), format!("reading the message: {e}"), None),
    };
    // Seen in the state a moment before its apply has put it where reads find it: read
    // again shortly (an entry of a purged conversation takes its outbox entry along).
    if entry.is_none() {
        return retry_or_give_up(&delivery, now_ms(), "the message is not readable yet".into(), None);
    }
    let carries_files = adapter.carries_files(rules);
    let (kind, author, text, attachments) = match entry.map(|e| e.item) {
        Some(HistoryItem::OperatorMessage { name, text, attachments, .. }) if carries_files => ("message", name, text, attachments),
        Some(HistoryItem::OperatorMessage { name, text, attachments, .. }) => {
            let files: Vec<String> = attachments.iter().map(|a| format!("[file {}]", a.name)).collect();
            let text = [text].into_iter().chain(files).filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n");
            ("message", name, text, Vec::new())
        }
        Some(HistoryItem::Notice { text }) => ("notice", String::new(), text, Vec::new()),
        Some(HistoryItem::BotMessage { text, buttons, .. }) => {
            let thread = mail_thread(shard, &adapter, key);
            let message = Outgoing { channel: delivery.channel.clone(), conversation: key.0, seq: key.1, recipient: delivery.recipient.clone(), text, kind: "message", author: "Bot".into(), buttons, files: Vec::new(), file_refs: Vec::new(), thread, automatic: true };
            return send_text(client, &adapter, &message, &delivery).await;
        }
        _ => return DeliveryOutcome::Failed { reason: "the history entry is not a message for the customer".into() },
    };
    // The Channel API's adapter fetches the files itself: it is told which they are.
    if matches!(adapter, AdapterConfig::Api { .. }) {
        let file_refs = attachments
            .iter()
            .map(|a| switchboard_adapters::FileRef { id: a.id.0.clone(), name: a.name.clone(), content_type: a.content_type.clone(), size: a.size, sha256: a.sha256.clone() })
            .collect();
        let message = Outgoing { channel: delivery.channel.clone(), conversation: key.0, seq: key.1, recipient: delivery.recipient.clone(), text, kind, author, buttons: Vec::new(), files: Vec::new(), file_refs, thread: None, automatic: kind == "notice" };
        if !still_ours(shard, key, node_id) {
            return not_ours();
        }
        return outcome_of(switchboard_adapters::send(client, &adapter, &message).await, &delivery);
    }
    // Files are read only with a slot: at most FILE_SENDS sends hold theirs at once, at
    // most FILE_SENDS_PER_CHANNEL of them for one channel.
    let _slot = if attachments.is_empty() { None } else { file_slots().acquire(&delivery.channel.0).await };
    let slow = slow_and_unsafe(&adapter, !attachments.is_empty());
    if slow {
        if let Some(outcome) = too_late_to_start(&delivery) {
            return outcome;
        }
    }
    let mut files = Vec::new();
    for attachment in &attachments {
        match switchboard_gateway::attachments::file_bytes(gateway, attachment).await {
            Some(bytes) => files.push(switchboard_adapters::email::MailFile { name: attachment.name.clone(), content_type: attachment.content_type.clone(), bytes }),
            // Held by a member that is down: it may be back by the next attempt.
            None => return retry_or_give_up(&delivery, now_ms(), format!("file {} is on no reachable member", attachment.name), None),
        }
    }
    let thread = mail_thread(shard, &adapter, key);
    let message = Outgoing { channel: delivery.channel.clone(), conversation: key.0, seq: key.1, recipient: delivery.recipient.clone(), text, kind, author, buttons: Vec::new(), files, file_refs: Vec::new(), thread, automatic: kind == "notice" };
    // Waiting for a file slot and reading the files takes time: a leader that took over
    // meanwhile may have settled this attempt (and sent what follows it). Looked at again
    // just before the provider is called, so a deposed node does not send it late.
    if !still_ours(shard, key, node_id) {
        return not_ours();
    }
    // Reading the files may have taken long too.
    if slow {
        if let Some(outcome) = too_late_to_start(&delivery) {
            return outcome;
        }
    }
    if message.files.is_empty() {
        return send_text(client, &adapter, &message, &delivery).await;
    }
    // Each call within FILE_SEND_TIMEOUT (the client's deadline); a provider that takes
    // files in two calls (WhatsApp: the upload, then the message) within
    // FILE_SEND_BACKSTOP for both together, which another leader's wait counts on.
    match tokio::time::timeout(FILE_SEND_BACKSTOP, switchboard_adapters::send(files_client(client), &adapter, &message)).await {
        Ok(sent) => outcome_of(sent, &delivery),
        Err(_) if adapter.resend_is_safe() => retry_or_give_up(&delivery, now_ms(), format!("no answer within {} s", FILE_SEND_BACKSTOP.as_secs()), None),
        Err(_) => outcome_of(SendOutcome::Unknown { reason: format!("no answer within {} s", FILE_SEND_BACKSTOP.as_secs()) }, &delivery),
    }
}

/// Sends a message without files. Another leader settles its attempt `unknown` from
/// ORPHAN_AFTER_MS + QUICK_ASK_GRACE_MS on, and its view of it is all a supervisor sees:
/// a text that cannot be sent again safely is started within [`TEXT_START_WITHIN_MS`] of
/// its attempt and given [`TEXT_SEND_BACKSTOP`] in all (its parts together), so that it
/// ends within ORPHAN_AFTER_MS with time left to commit what became of it. Mail has its
/// own longer bounds ([`slow_and_unsafe`]).
async fn send_text(client: &http::Client, adapter: &AdapterConfig, message: &Outgoing, delivery: &switchboard_actors::state::Delivery) -> DeliveryOutcome {
    if adapter.resend_is_safe() || slow_and_unsafe(adapter, false) {
        return outcome_of(switchboard_adapters::send(client, adapter, message).await, delivery);
    }
    if now_ms().millis_since(delivery.updated_at) >= TEXT_START_WITHIN_MS {
        return retry_or_give_up(delivery, now_ms(), format!("not started: {} s passed since its attempt was recorded", TEXT_START_WITHIN_MS / 1000), None);
    }
    // Past the client's own deadline of SEND_TIMEOUT for each call, which tells a call
    // that never reached the provider (retried) from one that may have (`unknown`).
    match tokio::time::timeout(TEXT_SEND_BACKSTOP, switchboard_adapters::send(client, adapter, message)).await {
        Ok(sent) => outcome_of(sent, delivery),
        Err(_) => outcome_of(SendOutcome::Unknown { reason: format!("no answer within {} s", TEXT_SEND_BACKSTOP.as_secs()) }, delivery),
    }
}

/// The answer for an entry this node no longer attempts: a `Retry`, which the core drops
/// for an entry that is not this node's attempt (a `Failed` would be taken even by an
/// entry another node has sent since, and turn it into a dead letter).
fn not_ours() -> DeliveryOutcome {
    DeliveryOutcome::Retry { reason: "the entry is being sent by another node".into(), retry_at: now_ms() }
}

/// Whether the outbox entry `key` is a message with files (sent with
/// [`FILE_SEND_TIMEOUT`]); `None` if its history cannot be read now (or does not hold
/// the entry yet).
fn carries_files(shard: &Shard, key: Key) -> Option<bool> {
    let entry = shard.history(key.0, key.1.saturating_sub(1), 1).ok()?.into_iter().find(|e| e.seq == key.1)?;
    Some(matches!(entry.item, HistoryItem::OperatorMessage { ref attachments, .. } if !attachments.is_empty()))
}

/// Whether a send to `adapter` that may have reached the provider cannot be sent again
/// and may take up to [`FILE_SEND_TIMEOUT`] (files, or mail): such a send is started
/// within [`ORPHAN_AFTER_MS`] of its attempt or not at all, so that another leader's
/// wait of [`SLOW_ORPHAN_AFTER_MS`] covers it.
fn slow_and_unsafe(adapter: &AdapterConfig, with_files: bool) -> bool {
    !adapter.resend_is_safe() && (with_files || matches!(adapter, AdapterConfig::Email { .. }))
}

/// The answer for an attempt [`slow_and_unsafe`] that could not start in time: nothing
/// was sent; it is tried again later.
fn too_late_to_start(delivery: &switchboard_actors::state::Delivery) -> Option<DeliveryOutcome> {
    (now_ms().millis_since(delivery.updated_at) >= ORPHAN_AFTER_MS).then(|| {
        retry_or_give_up(delivery, now_ms(), "not started: 15 s passed since its attempt was recorded (sends with files were queued, or the record was slow)".into(), None)
    })
}

/// Whether the entry is still this node's attempt in the state it applied.
fn still_ours(shard: &Shard, key: Key, node_id: u64) -> bool {
    shard.read().outbox.get(&key).is_some_and(|d| d.status == DeliveryStatus::Attempting { node: node_id })
}

/// Sends with files running at once on a node: each holds its files (up to 25 MiB)
/// while it runs.
const FILE_SENDS: usize = 8;
/// Time for one send with files (an upload of up to 25 MiB).
const FILE_SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// The backstop around a send with files: past the provider call's own limits of
/// [`FILE_SEND_TIMEOUT`] (SMTP's session, the HTTP client's deadline), which start only
/// once the message is composed and tell a send that never reached the provider (retried)
/// from one that may have (`unknown`). Were it as short as they are, it would fire first
/// and make every hung connection `unknown`. A send starts within [`ORPHAN_AFTER_MS`] of
/// its attempt, so it ends within 140 s, inside another leader's wait of
/// [`SLOW_ORPHAN_AFTER_MS`], with 10 s left to commit its answer.
const FILE_SEND_BACKSTOP: Duration = Duration::from_secs(125);

/// The client for sends with files: a longer deadline than a text's.
fn files_client(fallback: &http::Client) -> &http::Client {
    static CLIENT: std::sync::OnceLock<Option<http::Client>> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| http::Client::new(FILE_SEND_TIMEOUT).ok()).as_ref().unwrap_or(fallback)
}

/// Of the [`FILE_SENDS`] slots, how many one channel may hold at once: a provider that
/// stops answering uploads holds at most these, and the other channels' files still go
/// out within their 15 s to start ([`too_late_to_start`]).
const FILE_SENDS_PER_CHANNEL: usize = 2;

/// The node's slots for sends with files.
fn file_slots() -> &'static FileSlots {
    static SLOTS: std::sync::OnceLock<FileSlots> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| FileSlots::new(FILE_SENDS, FILE_SENDS_PER_CHANNEL))
}

/// Slots shared by every channel, each channel holding at most its share of them. A
/// send waits for its channel's share first, so the sends a slow channel queues take
/// none of the shared slots while they wait.
struct FileSlots {
    shared: Arc<tokio::sync::Semaphore>,
    share: usize,
    /// Each channel with a send holding or waiting for a slot; a channel leaves with its
    /// last send, so the map holds at most one entry per send in flight.
    channels: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// A slot held: both permits, and the channel's entry to let go of.
struct FileSlot<'a> {
    slots: &'a FileSlots,
    channel: String,
    held: Option<(tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit)>,
    /// The channel's semaphore, held from before the wait so the entry stays while in use.
    own: Option<Arc<tokio::sync::Semaphore>>,
}

impl FileSlots {
    fn new(total: usize, share: usize) -> FileSlots {
        FileSlots { shared: Arc::new(tokio::sync::Semaphore::new(total)), share: share.clamp(1, total.max(1)), channels: Mutex::new(HashMap::new()) }
    }

    /// Waits for one of `channel`'s share, then for one of the shared slots.
    async fn acquire(&self, channel: &str) -> Option<FileSlot<'_>> {
        let own = {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            channels.entry(channel.to_owned()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.share))).clone()
        };
        // Made before the wait, so a send dropped while waiting still lets go of the entry.
        let mut slot = FileSlot { slots: self, channel: channel.to_owned(), held: None, own: Some(own.clone()) };
        let mine = own.acquire_owned().await.ok()?;
        let shared = self.shared.clone().acquire_owned().await.ok()?;
        slot.held = Some((mine, shared));
        Some(slot)
    }

    /// How many channels have a send holding or waiting for a slot.
    #[cfg(test)]
    fn channels(&self) -> usize {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for FileSlot<'_> {
    fn drop(&mut self) {
        self.held = None;
        self.own = None;
        let mut channels = self.slots.channels.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map's own handle left: no other send of the channel holds or waits.
        if channels.get(&self.channel).is_some_and(|s| Arc::strong_count(s) == 1) {
            channels.remove(&self.channel);
        }
    }
}

/// For an email conversation: its subject and the customer's Message-IDs its reply
/// answers (the attributes its first mail set, and the latest mail before the reply).
fn mail_thread(shard: &Shard, adapter: &AdapterConfig, key: Key) -> Option<switchboard_adapters::MailThread> {
    if !matches!(adapter, AdapterConfig::Email { .. }) {
        return None;
    }
    let (channel, sender, attributes) = {
        let state = shard.read();
        let conv = state.conversations.get(&key.0)?;
        let visitor = conv.visitor.id.clone().unwrap_or_default();
        let sender = visitor.strip_prefix(&format!("{}:", conv.channel)).unwrap_or_default().to_owned();
        (conv.channel.clone(), sender, conv.visitor.attributes.clone())
    };
    let attribute = |name: &str| attributes.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let root = attribute(switchboard_adapters::email::ATTR_MESSAGE_ID);
    // The customer's latest mail before this reply: its key names its Message-ID.
    let prefix = format!("{}:{}:{}:", channel.as_str(), sender.len(), sender);
    let latest = shard
        .history(key.0, key.1.saturating_sub(50), 50)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.seq < key.1)
        .filter_map(|e| match e.item {
            HistoryItem::ClientMessage { key, .. } => key.strip_prefix(&prefix).map(str::to_owned),
            _ => None,
        })
        .filter(|id| !id.starts_with("sha256:"))
        .next_back();
    let in_reply_to = latest.clone().or_else(|| root.clone());
    let references: Vec<String> = root.into_iter().chain(latest).collect();
    Some(switchboard_adapters::MailThread { subject: attribute(switchboard_adapters::email::ATTR_SUBJECT).unwrap_or_default(), in_reply_to, references })
}

fn outcome_of(sent: SendOutcome, delivery: &switchboard_actors::state::Delivery) -> DeliveryOutcome {
    match sent {
        SendOutcome::Sent { provider_id } => DeliveryOutcome::Sent { provider_id },
        SendOutcome::Failed { reason } => DeliveryOutcome::Failed { reason },
        // Dead-lettered as unknown, with why: a person decides whether to send it again.
        SendOutcome::Unknown { reason } => {
            tracing::warn!(%reason, "a provider may have taken a message without answering; it is not sent again");
            DeliveryOutcome::Unknown
        }
        SendOutcome::Retry { reason, after } => {
            // The provider's wait pauses the whole channel (see `Pauses`).
            if let Some(wait) = after {
                let _ = PROVIDER_WAIT.try_with(|w| w.set(Some(wait)));
            }
            retry_or_give_up(delivery, now_ms(), reason, after)
        }
    }
}

/// Tells the channel's bot what happened in a conversation it holds.
async fn to_bot(client: &http::Client, shard: &Shard, key: Key, delivery: &switchboard_actors::state::Delivery, bot: &switchboard_actors::model::BotConfig, customer_id: &str, customer_name: &str) -> DeliveryOutcome {
    let entry = match shard.history(key.0, key.1.saturating_sub(1), 1) {
        Ok(entries) => entries.into_iter().find(|e| e.seq == key.1),
        Err(e) => return retry_or_give_up(delivery, now_ms(), format!("reading the entry: {e}"), None),
    };
    if entry.is_none() {
        return retry_or_give_up(delivery, now_ms(), "the entry is not readable yet".into(), None);
    }
    let (event, text) = match entry.map(|e| e.item) {
        Some(HistoryItem::WithBot) => ("started", String::new()),
        Some(HistoryItem::ClientMessage { text, attachments, .. }) => {
            let files: Vec<String> = attachments.iter().map(|a| format!("[file {}]", a.name)).collect();
            ("message", [text].into_iter().chain(files).filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n"))
        }
        _ => return DeliveryOutcome::Failed { reason: "the history entry is not an event for the bot".into() },
    };
    let event = switchboard_adapters::api::BotEvent {
        delivery_id: format!("{}:{}", key.0 .0, key.1),
        channel: delivery.channel.as_str(),
        conversation: key.0 .0,
        seq: key.1,
        event,
        customer_id,
        customer_name,
        text: &text,
    };
    outcome_of(switchboard_adapters::api::send_to_bot(client, &bot.url, &bot.signing_secret, &event).await, delivery)
}

/// A failure that may heal: retried after the backoff (or the provider's wait), unless
/// the entry ran out of attempts or time.
pub fn retry_or_give_up(delivery: &switchboard_actors::state::Delivery, now: Timestamp, reason: String, after: Option<Duration>) -> DeliveryOutcome {
    // `attempts` counts the attempt that just failed.
    let give_up_at = delivery.queued_at.plus_ms(GIVE_UP_AFTER_MS);
    let wait = backoff_ms(delivery.attempts).max(after.map_or(0, |a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)));
    // A provider's wait past the give-up time is as good as a refusal.
    if delivery.attempts >= MAX_DELIVERY_ATTEMPTS || now.plus_ms(wait) >= give_up_at {
        let reason: String = reason.chars().take(400).collect();
        return DeliveryOutcome::Failed { reason: format!("gave up after {} attempts: {reason}", delivery.attempts) };
    }
    DeliveryOutcome::Retry { reason, retry_at: now.plus_ms(wait) }
}

/// Entries a process remembers it gave up marking, at most (past it, such an entry is
/// settled unknown once its attempt is old, as before).
const MAX_ABANDONED_MARKS: usize = 10_000;

/// How long after a mark whose commit failed the outbox looks at what applied.
const MARK_SETTLE: Duration = Duration::from_secs(1);
/// The longest pause between tries to commit a batch of outcomes.
const RESULTS_MAX_PAUSE: Duration = Duration::from_secs(5);

/// Commits outcomes in batches as they come, then lets their entries be picked again.
/// A batch is tried until it commits or none of its entries is still this node's
/// attempt (another leader settled them): an outcome given up while its entry still
/// waits for it would leave a sent message counted lost, or an unsent one never sent.
async fn commit_results(
    proposer: Arc<dyn Proposer>,
    shard: Arc<Shard>,
    node_id: u64,
    mut results: tokio::sync::mpsc::UnboundedReceiver<DeliveryResult>,
    in_flight: Arc<Mutex<InFlight>>,
    released: Arc<AtomicU64>,
) {
    while let Some(first) = results.recv().await {
        let mut batch = vec![first];
        while batch.len() < switchboard_actors::core::MAX_DELIVERY_BATCH {
            match results.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        for r in &batch {
            let counter = match r.outcome {
                DeliveryOutcome::Sent { .. } => &METRICS.sent,
                DeliveryOutcome::Retry { .. } => &METRICS.retried,
                DeliveryOutcome::Failed { .. } => &METRICS.failed,
                _ => &METRICS.unknown,
            };
            counter.fetch_add(1, Relaxed);
        }
        let keys: Vec<Key> = batch.iter().map(|r| (r.conversation, r.seq)).collect();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match proposer.propose(Command::DeliveryResults { results: batch.clone() }).await {
                Ok(_) => break,
                Err(e) => {
                    let ours = {
                        let state = shard.read();
                        keys.iter().any(|k| state.outbox.get(k).is_some_and(|d| d.status == DeliveryStatus::Attempting { node: node_id }))
                    };
                    // A send that reached its provider says so even after its entry was
                    // settled unknown meanwhile (the core takes `Sent` then): otherwise a
                    // message the customer got stays a dead letter, without its receipts.
                    let ours = ours
                        || batch.iter().any(|r| {
                            matches!(r.outcome, DeliveryOutcome::Sent { .. })
                                && shard.deliveries_of(r.conversation).is_ok_and(|found| found.iter().any(|(seq, d)| *seq == r.seq && d.status == DeliveryStatus::Unknown))
                        });
                    if !ours {
                        tracing::info!(error = %e, "{} delivery outcomes not committed; their entries were settled elsewhere", keys.len());
                        break;
                    }
                    if attempt % 10 == 5 {
                        tracing::warn!(error = %e, attempt, "committing {} delivery outcomes failed; trying again", keys.len());
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt)).min(RESULTS_MAX_PAUSE)).await;
                }
            }
        }
        {
            let mut flying = in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for key in keys {
                flying.remove(&key);
            }
        }
        released.fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_says_which_entries_it_sends_and_which_it_never_sent() {
        use switchboard_raft::network::sending_state::{NEVER_SENT, NOT_SENDING, SENDING};
        // Keys no other test uses: the registries are the process's.
        let (sending_key, given_up_key, both_key, other) = ((ConversationId(9_000_001), 1), (ConversationId(9_000_002), 3), (ConversationId(9_000_003), 2), (ConversationId(9_000_004), 1));
        let flying: Arc<Mutex<InFlight>> = Arc::default();
        flying.lock().expect("lock").insert(sending_key, (ChannelId::new("tg"), false));
        flying.lock().expect("lock").insert(both_key, (ChannelId::new("tg"), false));
        let abandoned: Arc<Mutex<std::collections::HashSet<Key>>> = Arc::default();
        abandoned.lock().expect("lock").extend([given_up_key, both_key]);
        SENDS.lock().expect("lock").push(Arc::downgrade(&flying));
        ABANDONED.lock().expect("lock").push(Arc::downgrade(&abandoned));
        let ask = |keys: &[Key]| sending(&keys.iter().map(|(c, s)| (c.0, *s)).collect::<Vec<_>>());
        assert_eq!(ask(&[sending_key, given_up_key, other]), vec![SENDING, NEVER_SENT, NOT_SENDING]);
        // Marked again and being sent: sending wins over a mark given up earlier.
        assert_eq!(ask(&[both_key]), vec![SENDING]);
        // A worker that stopped says nothing any more.
        drop((flying, abandoned));
        assert_eq!(ask(&[sending_key, given_up_key]), vec![NOT_SENDING, NOT_SENDING]);
    }

    #[tokio::test]
    async fn a_channel_whose_files_hang_holds_only_its_share_of_the_file_slots() {
        let slots = FileSlots::new(8, 2);
        let within = |d| tokio::time::timeout(Duration::from_millis(200), d);
        // A provider that stops answering: its first two sends hold their slots...
        let hung = [within(slots.acquire("slow")).await.ok().flatten().expect("a slot"), within(slots.acquire("slow")).await.ok().flatten().expect("a slot")];
        // ...and its third waits for one of them, taking none of the shared slots meanwhile.
        assert!(within(slots.acquire("slow")).await.is_err(), "a channel holds at most its share");
        let mut waiting = Box::pin(slots.acquire("slow"));
        assert!(futures_poll_once(&mut waiting).await.is_none());
        // Another channel's six sends all start at once.
        let mut others = Vec::new();
        for channel in ["tg", "tg", "wa", "wa", "mail", "mail"] {
            others.push(within(slots.acquire(channel)).await.ok().flatten().expect("another channel's send starts at once"));
        }
        // Every shared slot is now held: a fourth channel waits, and starts once one ends.
        assert!(within(slots.acquire("vk")).await.is_err(), "at most 8 at once on the node");
        others.pop();
        assert!(within(slots.acquire("vk")).await.ok().flatten().is_some());
        // The slow channel's waiting send starts when one of its hung sends ends.
        drop(hung);
        assert!(tokio::time::timeout(Duration::from_millis(200), &mut waiting).await.ok().flatten().is_some());
        drop(waiting);
        drop(others);
        assert_eq!(slots.channels(), 0, "a channel with nothing in flight leaves no entry");
    }

    /// Polls `f` once: `Some` with its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }))
        .await
    }

    #[test]
    fn backoff_doubles_from_a_second_to_five_minutes() {
        assert_eq!([1, 2, 3, 4].map(backoff_ms), [1000, 2000, 4000, 8000]);
        assert_eq!(backoff_ms(10), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(60), MAX_BACKOFF_MS);
    }
}
