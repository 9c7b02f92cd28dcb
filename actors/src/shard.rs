//! A shard as the node holds it: the replicated state behind a lock, the apply path the
//! Raft state machine calls, and the read and subscribe API the gateway uses.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, LockResult, Mutex, OnceLock, RwLock, RwLockReadGuard};

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
    ///
    /// A panic inside the core may leave the state half changed: some events applied,
    /// the rest not. Serving that state, or applying later entries on top of it, would
    /// make this replica disagree with the others for good. So a panic stops the process
    /// (exit code 101); the node restarts from its last snapshot and log, which replay to
    /// a consistent state.
    pub fn apply(&self, envelope: &Envelope) -> Result<Reply, Error> {
        let result = {
            let mut state = stop_if_poisoned(self.state.write());
            match catch_panic(|| handle(&mut state, envelope)) {
                Ok(result) => result,
                // The write guard is still held while the process stops, so no reader
                // ever sees the half-applied state. The command is not logged: it may
                // carry a customer's message.
                Err(message) => stop(&format!("applying the entry stamped {} panicked: {message}", envelope.at.0)),
            }
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

    /// The current state. Stops the process if a write to it ever panicked (see
    /// [`Shard::apply`]) rather than serve what may be half applied.
    pub fn read(&self) -> RwLockReadGuard<'_, ShardState> {
        stop_if_poisoned(self.state.read())
    }

    /// The state as of now, and the work that encodes it: the clone is taken under the
    /// lock, the encoding runs later without it, so applies go on meanwhile.
    pub fn capture(&self) -> impl FnOnce() -> Result<Vec<u8>, Error> + Send + 'static {
        let state = self.read().clone();
        move || {
            serde_json::to_vec(&SnapshotV1 { v: 1, state }).map_err(|e| Error::Commit(format!("encode snapshot: {e}")))
        }
    }

    pub fn restore(&self, bytes: &[u8]) -> Result<(), Error> {
        let snapshot: SnapshotV1 =
            serde_json::from_slice(bytes).map_err(|e| Error::Commit(format!("decode snapshot: {e}")))?;
        if snapshot.v != 1 {
            return Err(Error::Commit(format!("unknown snapshot version {}", snapshot.v)));
        }
        *stop_if_poisoned(self.state.write()) = snapshot.state;
        Ok(())
    }

    pub fn reset(&self) {
        *stop_if_poisoned(self.state.write()) = ShardState::default();
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
