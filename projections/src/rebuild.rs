//! Rebuilding read models from the log.
//!
//! The projections are emptied and replayed in two groups that run side by side — the audit log
//! alone, and the per-aggregate read models together — each with its own pass over the log and
//! its own checkpoints. One pass alternates between decoding and folding in Zpanel and writing in
//! PostgreSQL, so it keeps about one core busy; two keep both of a small machine's cores busy.

use crate::{Projection, ProjectionRunner};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Events read per batch while rebuilding.
pub const BATCH: i64 = 5_000;

/// Empties `projections` and replays the whole log into them; `progress` hears how far the
/// slowest group has got after each batch. Returns the number of events replayed.
///
/// # Errors
/// When the database fails or a projection cannot apply an event.
pub async fn rebuild(
    pool: &sqlx::PgPool,
    projections: Vec<Arc<dyn Projection>>,
    progress: impl Fn(u64) + Send + Sync,
) -> anyhow::Result<u64> {
    let all = ProjectionRunner::new(pool.clone(), projections.clone());
    all.register().await?;
    all.reset(&all.names()).await?;

    let (audit, models): (Vec<_>, Vec<_>) = projections.into_iter().partition(|p| p.name() == crate::audit::NAME);
    let groups: Vec<ProjectionRunner> = [audit, models]
        .into_iter()
        .filter(|group| !group.is_empty())
        .map(|group| ProjectionRunner::new(pool.clone(), group).with_batch_size(BATCH))
        .collect();
    let counts: Vec<AtomicU64> = groups.iter().map(|_| AtomicU64::new(0)).collect();
    let report = || progress(counts.iter().map(|c| c.load(Ordering::Relaxed)).min().unwrap_or(0));
    let passes = groups.iter().zip(&counts).map(|(runner, count)| {
        runner.catch_up_with(|total| {
            count.store(total, Ordering::Relaxed);
            report();
        })
    });
    futures::future::try_join_all(passes).await?;
    Ok(counts.iter().map(|c| c.load(Ordering::Relaxed)).max().unwrap_or(0))
}
