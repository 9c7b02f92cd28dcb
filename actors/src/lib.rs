//! Switchboard's domain: the pure routing core and the actors that drive it.
//!
//! - [`model`]: ids, configuration, commands and events (the storage format).
//! - [`state`]: the replicated shard state and its pure `apply`.
//! - [`routing`]: operator selection policies, one stage at a time.
//! - [`core`]: command in, events and timers out; runs inside the Raft state machine.
//! - [`shard`]: the state behind a lock, with the apply path and the readers' API.
//! - [`actors`]: supervised ractor actors per conversation, operator and skill group.
//! - [`mail`]: exactly-once, in-order letters between Raft groups (ADR 0006; not wired yet).
//! - [`placement`]: which group of ADR 0006 each command goes to (not used for routing yet).
//!
//! Deliberately left out: networking, storage and clocks in the core. Time enters only
//! as the timestamp a proposer writes into each log entry.

pub mod access;
pub mod actors;
pub mod core;
pub mod cutover;
pub mod error;
pub mod hours;
pub mod mail;
pub mod model;
pub mod placement;
pub mod records;
pub mod routing;
pub mod shard;
pub mod state;
mod tails;

pub use error::Error;
