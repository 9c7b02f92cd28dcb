//! A shard as the node holds it: the replicated state behind a lock, the apply path the
//! Raft state machine calls, and the read and subscribe API the gateway uses.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::actors::SupervisorMsg;
use crate::core::{handle, Effect, Reply};
use crate::error::Error;
use crate::model::{ConversationId, Envelope, OperatorId, SkillGroupId};
use crate::state::{ShardState, Touched};

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

/// A versioned snapshot of the whole shard, as stored in Raft snapshots.
#[derive(Serialize, Deserialize)]
struct SnapshotV1 {
    v: u16,
    state: ShardState,
}

/// The replicated state of one shard plus the plumbing that wakes its readers.
pub struct Shard {
    state: RwLock<ShardState>,
    supervisor: OnceLock<ActorRef<SupervisorMsg>>,
    /// Notices produced before the supervisor started; flushed when it attaches.
    early: Mutex<Vec<Notice>>,
}

impl Default for Shard {
    fn default() -> Self {
        Self::new()
    }
}

impl Shard {
    pub fn new() -> Self {
        Shard { state: RwLock::new(ShardState::default()), supervisor: OnceLock::new(), early: Mutex::new(Vec::new()) }
    }

    /// The Raft state machine's apply: deterministic, never blocks on the actors.
    pub fn apply(&self, envelope: &Envelope) -> Result<Reply, Error> {
        let result = {
            let mut state = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            handle(&mut state, envelope)
        };
        match result {
            Ok((reply, outcome)) => {
                self.notify(Notice { touched: outcome.touched, effects: outcome.effects });
                Ok(reply)
            }
            Err(rejection) => Err(rejection),
        }
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

    pub fn read(&self) -> RwLockReadGuard<'_, ShardState> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn snapshot(&self) -> Result<Vec<u8>, Error> {
        let state = self.read();
        let snapshot = SnapshotV1 { v: 1, state: state.clone() };
        drop(state);
        serde_json::to_vec(&snapshot).map_err(|e| Error::Commit(format!("encode snapshot: {e}")))
    }

    pub fn restore(&self, bytes: &[u8]) -> Result<(), Error> {
        let snapshot: SnapshotV1 =
            serde_json::from_slice(bytes).map_err(|e| Error::Commit(format!("decode snapshot: {e}")))?;
        if snapshot.v != 1 {
            return Err(Error::Commit(format!("unknown snapshot version {}", snapshot.v)));
        }
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = snapshot.state;
        Ok(())
    }

    pub fn reset(&self) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = ShardState::default();
    }
}

/// Which stream a reader follows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
