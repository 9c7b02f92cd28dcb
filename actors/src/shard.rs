//! A shard as the node holds it: the replicated state behind a lock, the apply path the
//! Raft state machine calls, and the read and subscribe API the gateway uses.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, LockResult, Mutex, OnceLock, RwLock, RwLockReadGuard};

use ractor::ActorRef;
use tokio::sync::watch;

use crate::actors::SupervisorMsg;
use crate::core::{handle_as, Effect, Part, Reply};
use crate::error::Error;
use crate::model::{Attachment, AttachmentId, ChannelId, ConversationId, DecisionRecord, Envelope, OfferId, OperatorId, SkillGroupId};
use crate::records::{self, Store, Writes};
use crate::state::{Conversation, FeedEntry, HistoryEntry, ShardState, Touched};
use crate::tails::{Staged, Tails};

/// Something that can get a command committed: the Raft group of this shard.
pub trait Proposer: Send + Sync + 'static {
    fn propose(&self, command: crate::model::Command) -> Pin<Box<dyn Future<Output = Result<Reply, Error>> + Send>>;
}

/// What the state machine tells the actors after each applied entry.
#[derive(Clone, Debug, Default)]
pub struct Notice {
    pub touched: Touched,
    pub effects: Vec<Effect>,
}

/// The replicated state of one shard plus the plumbing that wakes its readers.
///
/// The hot state is in memory; histories, feeds, decision records, attachments and
/// closed conversations are records in the shard's Raft state tree, read through the
/// [`Store`] handed over by [`Shard::load`].
pub struct Shard {
    state: RwLock<ShardState>,
    store: RwLock<Option<Arc<dyn Store>>>,
    supervisor: OnceLock<ActorRef<SupervisorMsg>>,
    /// Notices produced before the supervisor started; flushed when it attaches.
    early: Mutex<Vec<Notice>>,
    /// Notices of applied commands whose records are not written yet.
    unpublished: Mutex<Vec<Notice>>,
    /// Conversations the commands of the entry being applied named or changed: the
    /// closed ones leave memory at the end of the entry (`records::evict`).
    entry_candidates: Mutex<Vec<ConversationId>>,
    /// Attachments whose records a retention purge deleted, for the blob store to
    /// delete once the records are gone.
    deleted_attachments: Mutex<Vec<AttachmentId>>,
    /// The attachments the records named before a snapshot replaced them
    /// ([`Shard::replacing_records`]), for [`Shard::load`] to find the ones it dropped.
    attachments_before: Mutex<Option<std::collections::HashSet<AttachmentId>>>,
    on_deleted_attachments: OnceLock<Box<dyn Fn(Vec<AttachmentId>) + Send + Sync>>,
    /// Entity actors running now (kept by the supervisor), for `/metrics`.
    active_actors: std::sync::atomic::AtomicUsize,
    /// Commands applied since start: a reader that saw this number saw every change
    /// made before it (the outbox worker looks again only when it moved).
    applied: std::sync::atomic::AtomicU64,
    /// Times the state was rebuilt from the records (at start, after a snapshot was
    /// installed): what the records hold may have changed without an apply.
    loads: std::sync::atomic::AtomicU64,
    /// Which part of ADR 0006's split this shard's group plays (`Whole` today).
    part: Part,
    /// Counts published entries, for whoever waits for the state to move (the mail
    /// forwarder).
    published_tx: watch::Sender<u64>,
    /// The log index of the last entry whose records were written (0 before the first
    /// since start): what a wake-up sent to another node says it may read (ADR 0012).
    published_index: std::sync::atomic::AtomicU64,
    /// The newest entries, read before the store (`crate::tails`).
    tails: RwLock<Tails>,
}

impl Default for Shard {
    fn default() -> Self {
        Self::new()
    }
}

impl Shard {
    pub fn new() -> Self {
        Self::with_part(Part::Whole)
    }

    /// A shard whose group plays `part` of ADR 0006's split.
    pub fn with_part(part: Part) -> Self {
        Shard {
            state: RwLock::new(ShardState::default()),
            store: RwLock::new(None),
            supervisor: OnceLock::new(),
            early: Mutex::new(Vec::new()),
            unpublished: Mutex::new(Vec::new()),
            entry_candidates: Mutex::new(Vec::new()),
            deleted_attachments: Mutex::new(Vec::new()),
            attachments_before: Mutex::new(None),
            on_deleted_attachments: OnceLock::new(),
            active_actors: std::sync::atomic::AtomicUsize::new(0),
            applied: std::sync::atomic::AtomicU64::new(0),
            loads: std::sync::atomic::AtomicU64::new(0),
            part,
            published_tx: watch::Sender::new(0),
            published_index: std::sync::atomic::AtomicU64::new(0),
            tails: RwLock::new(Tails::new(crate::tails::BUDGET)),
        }
    }

    /// Whether this shard's group routes its queues (one whole group, or a routing
    /// shard). A conversation shard (ADR 0006) keeps copies of the queues but makes no
    /// offers: a `RouteQueue` there decides nothing, so no queue timer is armed for it.
    pub fn routes(&self) -> bool {
        matches!(self.part, Part::Whole | Part::Routing { .. })
    }

    /// Changes each time an entry's records are written.
    pub fn published_watch(&self) -> watch::Receiver<u64> {
        self.published_tx.subscribe()
    }


    /// Commands applied since start (see the field).
    pub fn applied_count(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Entity actors (conversations, operators, skill groups) running now.
    pub fn active_actors(&self) -> usize {
        self.active_actors.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_active_actors(&self, count: usize) {
        self.active_actors.store(count, std::sync::atomic::Ordering::Relaxed);
    }

    /// A page of the shard's attachment records after the key `after` (see
    /// [`records::attachments_page`]).
    pub fn attachments_page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, crate::model::Attachment)>, Error> {
        records::attachments_page(self.store()?.as_ref(), after, limit)
    }

    fn store(&self) -> Result<Arc<dyn Store>, Error> {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::Storage("the shard's records are not loaded yet".into()))
    }

    /// The Raft state machine's apply: deterministic, never blocks on the actors. The
    /// command's record changes are added to `writes`; its readers are woken by
    /// [`Shard::published`] once they are written.
    ///
    /// A panic inside the core may leave the state half changed: some events applied,
    /// the rest not. Serving that state, or applying later entries on top of it, would
    /// make this replica disagree with the others for good. So a panic stops the process
    /// (exit code 101); the node restarts from its records and log, which replay to a
    /// consistent state. So does a record that cannot be read: deciding without it
    /// could decide differently from the other replicas.
    pub fn apply(&self, envelope: &Envelope, writes: &mut Writes) -> Result<Reply, Error> {
        let store = match self.store() {
            Ok(store) => store,
            Err(e) => stop(&format!("applying the entry stamped {}: {e}", envelope.at.0)),
        };
        // Counted before the change is made, under the same lock a reader takes: a
        // reader that saw the new state also sees the new count, or looks again later.
        let staged: Vec<Staged>;
        let result = {
            let mut state = stop_if_poisoned(self.state.write());
            self.applied.fetch_add(1, std::sync::atomic::Ordering::Release);
            if let Err(e) = records::prefetch(&mut state, store.as_ref(), &envelope.command) {
                stop(&format!("applying the entry stamped {}: {e}", envelope.at.0));
            }
            match catch_panic(|| handle_as(&mut state, envelope, self.part)) {
                Ok(result) => {
                    crate::actors::observe_entry_time(state.last_at);
                    let candidates = records::eviction_candidates(&state, &envelope.command);
                    records::touched(&mut state, &candidates);
                    if result.is_ok() && !state.expired_attachments.is_empty() {
                        let files = std::mem::take(&mut state.expired_attachments);
                        self.deleted_attachments.lock().unwrap_or_else(|p| p.into_inner()).extend(files);
                    }
                    staged = stage(&state);
                    writes.extend(records::take_writes(&mut state));
                    records::end_command(&mut state);
                    self.entry_candidates.lock().unwrap_or_else(|p| p.into_inner()).extend(candidates);
                    result
                }
                // The write guard is still held while the process stops, so no reader
                // ever sees the half-applied state. The command is not logged: it may
                // carry a customer's message.
                Err(message) => stop(&format!("applying the entry stamped {} panicked: {message}", envelope.at.0)),
            }
        };
        // Into the cache right after the state's lock is let go (taking the cache's
        // write lock under it would hold every reader of the state behind the cache's).
        if !staged.is_empty() {
            self.tails.write().unwrap_or_else(|p| p.into_inner()).take(staged);
        }
        match result {
            Ok((reply, outcome)) => {
                self.unpublished
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Notice { touched: outcome.touched, effects: outcome.effects });
                Ok(reply)
            }
            Err(rejection) => Err(rejection),
        }
    }

    /// A new leader's first entry (openraft's blank entry) was committed: the offers
    /// pending now will not set their operators away when they expire (rules 12,
    /// `ShardState::leader_began`). Their record changes are added to `writes`.
    pub fn leader_began(&self, writes: &mut Writes) {
        let mut state = stop_if_poisoned(self.state.write());
        state.leader_began();
        writes.extend(records::take_writes(&mut state));
    }

    /// Every command of the log entry is applied (their writes are collected): closed
    /// conversations and loaded attachments leave memory. Until then a later command of
    /// the same entry finds them as the earlier ones left them, not as the records
    /// (written with the whole entry) still hold them.
    pub fn end_entry(&self) {
        let candidates = std::mem::take(&mut *self.entry_candidates.lock().unwrap_or_else(|p| p.into_inner()));
        let mut state = stop_if_poisoned(self.state.write());
        records::evict(&mut state, &candidates);
    }

    /// The records of the entry at log index `index` are written: wake their readers.
    pub fn published_at(&self, index: u64) {
        self.published_index.fetch_max(index, std::sync::atomic::Ordering::AcqRel);
        self.published();
    }

    /// The log index of the last entry whose records were written, as
    /// [`Shard::published_at`] was told (0 before the first since start).
    pub fn published_index(&self) -> u64 {
        self.published_index.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The records of the commands applied so far are written: wake their readers.
    pub fn published(&self) {
        self.published_tx.send_modify(|n| *n += 1);
        let notices = std::mem::take(&mut *self.unpublished.lock().unwrap_or_else(|p| p.into_inner()));
        for notice in notices {
            self.notify(notice);
        }
        let files = std::mem::take(&mut *self.deleted_attachments.lock().unwrap_or_else(|p| p.into_inner()));
        if !files.is_empty() {
            match self.on_deleted_attachments.get() {
                Some(delete) => delete(files),
                None => tracing::warn!(count = files.len(), "attachment files of purged conversations are left: no blob store attached"),
            }
        }
    }

    /// Who deletes the files of attachments a retention purge deleted (the node's blob
    /// store). Called after the records are written, outside the apply.
    pub fn on_deleted_attachments(&self, delete: impl Fn(Vec<AttachmentId>) + Send + Sync + 'static) {
        let _ = self.on_deleted_attachments.set(Box::new(delete));
    }

    fn notify(&self, notice: Notice) {
        match self.supervisor.get() {
            Some(supervisor) => {
                // The supervisor only stops with the node; a failed cast loses a wake-up,
                // never data, since readers pull from the state.
                let _ = supervisor.cast(SupervisorMsg::Applied(notice));
            }
            None => self.early.lock().unwrap_or_else(|p| p.into_inner()).push(notice),
        }
    }

    pub(crate) fn attach(&self, supervisor: ActorRef<SupervisorMsg>) {
        let _ = self.supervisor.set(supervisor.clone());
        let early = std::mem::take(&mut *self.early.lock().unwrap_or_else(|p| p.into_inner()));
        for notice in early {
            let _ = supervisor.cast(SupervisorMsg::Applied(notice));
        }
    }

    /// The current hot state. Stops the process if a write to it ever panicked (see
    /// [`Shard::apply`]) rather than serve what may be half applied.
    pub fn read(&self) -> RwLockReadGuard<'_, ShardState> {
        stop_if_poisoned(self.state.read())
    }

    /// Every attachment the shard's records name (its ids only).
    fn attachment_ids(&self) -> Result<std::collections::HashSet<AttachmentId>, Error> {
        let mut ids = std::collections::HashSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.attachments_page(after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { return Ok(ids) };
            after = Some(last.clone());
            ids.extend(page.into_iter().map(|(_, a)| a.id));
        }
    }

    /// A snapshot is about to replace the records: the attachments they name now are
    /// noted, so that [`Shard::load`] deletes the files of those the snapshot no longer
    /// names (a retention purge this replica received only within the snapshot), as an
    /// applied purge does.
    pub fn replacing_records(&self) -> Result<(), Error> {
        let ids = self.attachment_ids()?;
        *self.attachments_before.lock().unwrap_or_else(|p| p.into_inner()) = Some(ids);
        Ok(())
    }

    /// Whether a snapshot is replacing the records now (from [`Shard::replacing_records`]
    /// to the [`Shard::load`] after it): what they name is not known meanwhile.
    pub fn replacing(&self) -> bool {
        self.attachments_before.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Rebuilds the hot state from the records (at start and after a snapshot was
    /// installed) and keeps `store` for reading the rest.
    pub fn load(&self, store: Arc<dyn Store>) -> Result<(), Error> {
        let before = self.attachments_before.lock().unwrap_or_else(|p| p.into_inner()).take();
        let state = records::load(store.as_ref())?;
        crate::actors::observe_entry_time(state.last_at);
        let mut guard = stop_if_poisoned(self.state.write());
        *guard = state;
        // What was cached describes the state before this load.
        self.tails.write().unwrap_or_else(|p| p.into_inner()).clear();
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
        self.loads.fetch_add(1, std::sync::atomic::Ordering::Release);
        if let Some(before) = before {
            let now = self.attachment_ids()?;
            let dropped: Vec<AttachmentId> = before.into_iter().filter(|id| !now.contains(id)).collect();
            if !dropped.is_empty() {
                tracing::info!(files = dropped.len(), "the installed snapshot no longer names some attachments: their files are deleted");
                match self.on_deleted_attachments.get() {
                    Some(delete) => delete(dropped),
                    None => tracing::warn!(count = dropped.len(), "attachment files the installed snapshot dropped are left: no blob store attached"),
                }
            }
        }
        Ok(())
    }

    /// Commands applied and loads from the records since start: while neither moved,
    /// the records hold what they held.
    pub fn records_version(&self) -> (u64, u64) {
        (self.applied.load(std::sync::atomic::Ordering::Acquire), self.loads.load(std::sync::atomic::Ordering::Acquire))
    }

    /// What the core would answer without a log entry (see [`crate::core::precheck`]),
    /// judged on the hot state; `Ok(None)` when the commit must decide.
    pub fn precheck(&self, command: &crate::model::Command, now: crate::model::Timestamp) -> Result<Option<Reply>, Error> {
        let state = self.read();
        if records::needs_records(&state, command) {
            return Ok(None);
        }
        crate::core::precheck(&state, command, crate::core::entry_time(&state, now))
    }

    /// Records for a snapshot of the legacy format (the whole state as JSON).
    pub fn import(&self, legacy: &[u8]) -> Result<Writes, Error> {
        records::import_legacy(legacy)
    }

    /// A conversation, open (from memory) or closed (from its record).
    pub fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, Error> {
        if let Some(conv) = self.read().conversations.get(&id) {
            return Ok(Some(conv.clone()));
        }
        records::load_conversation(self.store()?.as_ref(), id, false)
    }

    /// Whether a channel message (its inbound key) was taken before, as the core decides
    /// a redelivery: in the sender's open conversation, or by its record, which lives as
    /// long as its conversation.
    pub fn inbound_taken(&self, channel: &crate::model::ChannelId, sender: &str, key: &str) -> Result<bool, Error> {
        {
            let state = self.read();
            let open = crate::core::inbound_target(&state, channel, sender, None);
            if open.and_then(|id| state.conversations.get(&id)).is_some_and(|c| c.keys.contains_key(key)) {
                return Ok(true);
            }
        }
        Ok(records::inbound_conversation(self.store()?.as_ref(), key)?.is_some())
    }

    /// History entries after `after`, at most `limit`, in order.
    pub fn history(&self, id: ConversationId, after: u64, limit: usize) -> Result<Vec<HistoryEntry>, Error> {
        if let Some(entries) = self.tails.read().unwrap_or_else(|p| p.into_inner()).history(id, after, limit) {
            return Ok(entries);
        }
        let mut entries = records::history(self.store()?.as_ref(), id, after, limit)?;
        // The store is written after an entry's apply has put its entries in the cache:
        // a read in between finds the store behind, and the cache holds the rest. A
        // reader that learned the conversation's last seq from the state must get every
        // entry up to it (a desk skips a later `assigned` that names no newer entry).
        if entries.len() < limit {
            let last = entries.last().map_or(after, |e| e.seq);
            if let Some(newer) = self.tails.read().unwrap_or_else(|p| p.into_inner()).history(id, last, limit - entries.len()) {
                entries.extend(newer);
            }
        }
        Ok(entries)
    }

    /// An operator's feed entries after `after` (at most `limit`), or `None` when some
    /// of them are no longer kept.
    pub fn feed_since(&self, operator: &OperatorId, after: u64, limit: usize) -> Result<Option<Vec<FeedEntry>>, Error> {
        let (first, last) = match self.read().operators.get(operator) {
            Some(op) => (op.feed.first_retained(), op.feed.last_seq),
            None => return Ok(Some(Vec::new())),
        };
        if after + 1 < first && after < last {
            return Ok(None);
        }
        // Nothing new: no read of the store (a desk following many feeds wakes for any
        // of them, and asks each).
        if after >= last {
            return Ok(Some(Vec::new()));
        }
        if let Some(entries) = self.tails.read().unwrap_or_else(|p| p.into_inner()).feed(operator, after, limit) {
            return Ok(Some(entries));
        }
        records::feed(self.store()?.as_ref(), operator, after, limit).map(Some)
    }

    /// A visitor's most recent conversations, newest first, open ones as they are now.
    pub fn conversations_of(&self, visitor: &str, limit: usize) -> Result<Vec<Conversation>, Error> {
        let stored = records::conversations_of(self.store()?.as_ref(), visitor, limit)?;
        let state = self.read();
        Ok(stored.into_iter().map(|c| state.conversations.get(&c.id).cloned().unwrap_or(c)).collect())
    }

    /// The conversations an operator handled, newest first (see [`records::handled_by`]).
    pub fn handled_by(&self, operator: &OperatorId, before: Option<ConversationId>, limit: usize) -> Result<Vec<ConversationId>, Error> {
        records::handled_by(self.store()?.as_ref(), operator, before, limit)
    }

    /// The newest audit trail entries, newest first.
    pub fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<(u64, crate::state::AuditEntry)>, Error> {
        records::audit(self.store()?.as_ref(), before, limit)
    }

    pub fn decision(&self, offer: OfferId) -> Result<Option<DecisionRecord>, Error> {
        records::decision(self.store()?.as_ref(), offer)
    }

    /// The routing step an offer was made under (rules 6, groups with steps).
    /// The outbox entries of a conversation (hot ones as they are now), by history seq.
    pub fn deliveries_of(&self, id: ConversationId) -> Result<Vec<(u64, crate::state::Delivery)>, Error> {
        let mut out = records::deliveries_of(self.store()?.as_ref(), id)?;
        let state = self.read();
        for (seq, d) in out.iter_mut() {
            if let Some(hot) = state.outbox.get(&(id, *seq)) {
                *d = hot.clone();
            }
        }
        // What the bot was told is not a delivery to the customer.
        out.retain(|(_, d)| !d.to_bot);
        Ok(out)
    }

    /// The sent outbox entry a channel's provider knows by `id` (for its receipts).
    pub fn by_provider_id(&self, channel: &ChannelId, id: &str) -> Result<Option<(ConversationId, u64)>, Error> {
        records::by_provider_id(self.store()?.as_ref(), channel, id)
    }

    /// Dead-lettered outbox entries after `after`, at most `limit`.
    pub fn dead_letters(&self, after: Option<(ConversationId, u64)>, limit: usize) -> Result<Vec<(ConversationId, u64, crate::state::Delivery)>, Error> {
        records::dead_letters(self.store()?.as_ref(), after, limit)
    }

    pub fn offer_step(&self, offer: OfferId) -> Result<Option<u32>, Error> {
        records::offer_step(self.store()?.as_ref(), offer)
    }

    pub fn attachment(&self, id: &AttachmentId) -> Result<Option<Attachment>, Error> {
        records::find_attachment(self.store()?.as_ref(), id)
    }

    /// Whether a conversation can take `files` more files of `size` bytes in all (the
    /// gateway asks before it reads an upload or stores a mail's files; the commit asks
    /// again).
    pub fn attachment_room(&self, conversation: ConversationId, files: usize, size: u64) -> Result<(), Error> {
        let mut probe = ShardState::default();
        for attachment in records::attachments_of(self.store()?.as_ref(), conversation)? {
            probe.attachments.insert(attachment.id.clone(), attachment);
        }
        match files {
            0 | 1 => crate::core::attachment_room(&probe, conversation, size),
            _ => crate::core::attachment_room_for(&probe, conversation, files, size),
        }
    }
}

/// Which stream a reader follows.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum StreamKey {
    Conversation(ConversationId),
    Operator(OperatorId),
    Group(SkillGroupId),
    /// The whole floor: any queue or operator change. Followed by supervisors.
    Floor,
}

/// A wake-up counter: readers wait for it to change, then pull from the state.
pub type Wakeups = watch::Receiver<u64>;

pub(crate) fn new_stream() -> Arc<watch::Sender<u64>> {
    Arc::new(watch::Sender::new(0))
}

/// Ends the process after a failure that leaves the shard state untrustworthy. Exit
/// code 101 is what an uncaught panic gives, so supervisors (systemd, Kubernetes)
/// restart the node as they would after any crash.
fn stop(why: &str) -> ! {
    tracing::error!("{why}; stopping so the node restarts from its log");
    std::process::exit(101)
}

/// The guard of a lock whose holder never panicked. A poisoned lock means a write to
/// the state was cut short by a panic, so nothing may read or build on it.
fn stop_if_poisoned<G>(locked: LockResult<G>) -> G {
    match locked {
        Ok(guard) => guard,
        Err(_) => stop("the shard state lock is poisoned: an earlier write panicked"),
    }
}

/// Runs `f`, turning a panic into its message. The state `f` touches is thrown away by
/// the caller on a panic, which is what makes asserting unwind safety sound here.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_with_its_message() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        assert_eq!(catch_panic(|| -> u32 { panic!("static message") }), Err("static message".to_owned()));
        let id = 42;
        assert_eq!(catch_panic(|| -> u32 { panic!("formatted {id}") }), Err("formatted 42".to_owned()));
    }
}

/// What the command being applied adds to histories and feeds, for the cache of
/// newest entries (its records are written with the entry); a purge clears the cache.
fn stage(state: &ShardState) -> Vec<Staged> {
    let dirty = &state.dirty;
    let mut staged = Vec::new();
    if dirty.purge || !state.deleted.is_empty() {
        staged.push(Staged::Clear);
    }
    for id in dirty.histories.union(&dirty.conversations) {
        if let Some(conv) = state.conversations.get(id) {
            staged.extend(conv.pending.iter().map(|entry| Staged::History(*id, entry.clone())));
        }
    }
    for id in dirty.feeds.union(&dirty.operators) {
        if let Some(op) = state.operators.get(id) {
            staged.extend(op.feed.pending.iter().map(|entry| Staged::Feed(id.clone(), entry.clone())));
        }
    }
    staged
}
