//! Zpanel's write side: the event store on PostgreSQL, command handling, secret sealing.
//!
//! - [`store`]: the event store's vocabulary and trait — appends with an expected version,
//!   stream reads, and whole-log reads by the gap-safe `(tx_id, position)` cursor.
//! - [`postgres`]: the PostgreSQL implementation (one round trip per append).
//! - [`handler`]: load → fold → `decide` → append, with bounded retries on conflict and
//!   idempotency by command id.
//! - [`sealing`]: AES-256-GCM sealing of secrets under rotating master keys.
//! - [`signal`]: waking log readers in this process at once and in others through `NOTIFY`.
//! - [`embedded`]: the private PostgreSQL cluster of single-machine installs.
//! - [`db`]: connections and migrations.
#![forbid(unsafe_code)]

pub mod db;
pub mod embedded;
pub mod handler;
pub mod postgres;
pub mod sample;
pub mod sealing;
pub mod signal;
pub mod ssh_keys;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokens;

pub use handler::{CommandContext, CommandError, CommandHandler, Outcome};
pub use postgres::PgEventStore;
pub use sealing::{Keyring, Plaintext};
pub use signal::AppendSignal;
pub use store::{Actor, Cursor, EventStore, RecordedEvent};
