//! Rebuilding read models from the log.
//!
//! The projections are emptied, then one reader goes through the log in large batches and hands
//! each batch to every projection, each applying it in a transaction of its own (with its
//! checkpoint) while the reader fetches the next. The log is read and decoded once, and the
//! projections' work — decoding and folding in Zpanel, writing in PostgreSQL — spreads over all
//! cores.

use crate::{Projection, ProjectionRunner};
use anyhow::Context as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zpanel_commands::postgres::read_all_on;
use zpanel_commands::{Cursor, RecordedEvent};

/// Events read per batch while rebuilding.
pub const BATCH: i64 = 20_000;

/// Batches read ahead of the slowest projection.
const READ_AHEAD: usize = 2;

/// What a rebuild did.
#[derive(Clone, Debug, Default)]
pub struct Rebuilt {
    /// Events replayed.
    pub events: u64,
    /// Each projection's time spent applying batches (the rest it waited for the reader).
    pub busy: Vec<(&'static str, Duration)>,
}

/// Empties `projections` and replays the whole log into them; `progress` hears how far the
/// slowest projection has got after each batch.
///
/// # Errors
/// When the database fails or a projection cannot apply an event.
pub async fn rebuild(
    pool: &sqlx::PgPool,
    projections: Vec<Arc<dyn Projection>>,
    progress: impl Fn(u64) + Send + Sync,
) -> anyhow::Result<Rebuilt> {
    let all = ProjectionRunner::new(pool.clone(), projections.clone());
    all.register().await?;
    all.reset(&all.names()).await?;

    // Every lane and the reader are tasks of their own, so they run on all of the runtime's
    // threads; this task only reports progress.
    let (ticks, mut ticked) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut senders = Vec::new();
    let mut lanes = Vec::new();
    let mut counts = Vec::new();
    for projection in projections {
        let (sender, mut batches) = tokio::sync::mpsc::channel::<Batch>(READ_AHEAD);
        let name = projection.name();
        let lane = ProjectionRunner::new(pool.clone(), vec![projection]).with_memos();
        let count = Arc::new(AtomicU64::new(0));
        let (ticks, counted) = (ticks.clone(), Arc::clone(&count));
        senders.push(sender);
        counts.push(count);
        lanes.push(tokio::spawn(async move {
            let mut busy = Duration::ZERO;
            while let Some(batch) = batches.recv().await {
                let started = Instant::now();
                lane.apply(batch.after, &batch.events).await?;
                busy += started.elapsed();
                counted.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
                let _ = ticks.send(());
            }
            anyhow::Ok((name, busy))
        }));
    }
    drop(ticks);
    let reader = tokio::spawn(read(pool.clone(), senders));
    while ticked.recv().await.is_some() {
        progress(counts.iter().map(|c| c.load(Ordering::Relaxed)).min().unwrap_or(0));
    }
    let mut busy = Vec::with_capacity(lanes.len());
    for lane in lanes {
        busy.push(lane.await.context("a projection lane panicked")?.context("applying the log")?);
    }
    reader.await.context("the log reader panicked")?.context("reading the log")?;
    Ok(Rebuilt { events: counts.iter().map(|c| c.load(Ordering::Relaxed)).max().unwrap_or(0), busy })
}

/// Reads the whole log and hands every batch to every lane, until the log or a lane ends.
async fn read(pool: sqlx::PgPool, lanes: Vec<tokio::sync::mpsc::Sender<Batch>>) -> anyhow::Result<()> {
    let mut after = Cursor::START;
    loop {
        let batch = read_all_on(&pool, after, BATCH).await?;
        let Some(last) = batch.events.last().map(RecordedEvent::cursor) else {
            if batch.held_back {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            return Ok(());
        };
        let events = Arc::new(batch.events);
        for lane in &lanes {
            if lane.send(Batch { after, events: Arc::clone(&events) }).await.is_err() {
                // That lane failed; its own error says why.
                return Ok(());
            }
        }
        after = last;
    }
}

/// One batch of the log, and where it starts.
struct Batch {
    after: Cursor,
    events: Arc<Vec<RecordedEvent>>,
}
