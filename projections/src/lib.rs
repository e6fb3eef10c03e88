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
//! - [`rebuild`]: emptying projections and replaying the log into them.
#![forbid(unsafe_code)]

pub mod audit;
mod copy;
pub mod history;
mod model;
pub mod models;
pub mod projection;
pub mod rebuild;
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

/// A checksum of each read-model table (`count:md5` of its rows in a fixed order), to compare
/// the tables before and after a rebuild.
///
/// # Errors
/// When the database fails.
pub async fn checksums(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut sums = Vec::new();
    for projection in all() {
        for table in projection.tables() {
            let sum: String = sqlx::query_scalar(&format!(
                "select count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' order by t::text)), '') from {table} t"
            ))
            .fetch_one(pool)
            .await?;
            sums.push((*table, sum));
        }
    }
    Ok(sums)
}
