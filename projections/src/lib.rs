//! Zpanel's read side: projections from the event log into PostgreSQL read models, the audit
//! log, time travel, and rebuilds.
//!
//! - [`runner`]: reads the log with the gap-safe cursor and applies batches to projections,
//!   moving each projection's checkpoint in the same transaction.
//! - [`projection`]: the `Projection` trait.
//! - `model`: one-row-per-aggregate read models derived from the folded state.
//! - [`models`]: the read models (teams, projects, applications, deployments, servers,
//!   private keys, API tokens).
//! - [`audit`]: the audit log with before/after values.
//! - [`history`]: any aggregate as of a version, position or time; diffs between versions.
#![forbid(unsafe_code)]

pub mod audit;
pub mod history;
mod model;
pub mod models;
pub mod projection;
pub mod runner;

pub use projection::Projection;
pub use runner::{ProjectionRunner, Step};

use std::sync::Arc;

/// Every projection, in the order they are applied within a batch.
#[must_use]
pub fn all() -> Vec<Arc<dyn Projection>> {
    let mut projections = models::all();
    projections.push(Arc::new(audit::AuditProjection));
    projections
}
