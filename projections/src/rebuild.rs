//! Rebuilding read models from the log.
//!
//! The projections are emptied, then one reader goes through the log in large batches and hands
//! each batch to every projection, each applying it in a transaction of its own (with its
//! checkpoint) while the reader fetches the next. The log is read and decoded once, and the
//! projections' work — decoding and folding in Zpanel, writing in PostgreSQL — spreads over all
//! cores.
//!
//! The emptied tables' secondary indexes (those no constraint needs) are dropped for the replay
//! and created again from the loaded rows at its end — one sort each instead of a random insert
//! per row and index. Their definitions wait in `rebuild_deferred_indexes`, so an interrupted
//! rebuild's indexes come back at the next start ([`restore_interrupted`]).

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

/// Held (for a session) by the rebuild that deferred indexes, until it has restored them.
const REBUILD_LOCK: &str = "select hashtextextended('zpanel.rebuild.indexes', 0)";

/// What a rebuild did.
#[derive(Clone, Debug, Default)]
pub struct Rebuilt {
    /// Events replayed.
    pub events: u64,
    /// Each projection's time spent applying batches (the rest it waited for the reader).
    pub busy: Vec<(&'static str, Duration)>,
    /// The indexes created again after the replay, and how long that took.
    pub indexes: (usize, Duration),
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
    // Its own connection, closed at the end (not returned to the pool with the lock held).
    let mut lock = pool.acquire().await?.detach();
    sqlx::query(&format!("select pg_advisory_lock(({REBUILD_LOCK}))")).execute(&mut lock).await?;
    all.reset(&all.names()).await?;
    let tables: Vec<&str> = projections.iter().flat_map(|p| p.tables().iter().copied()).collect();
    defer_indexes(&mut lock, &tables).await?;
    let replayed = replay(pool, projections, progress).await;
    // Whatever happened, the indexes come back.
    let started = Instant::now();
    let restored = async {
        let mut tx = sqlx::Connection::begin(&mut lock).await?;
        let restored = restore_indexes(&mut tx).await?;
        tx.commit().await.context("creating the deferred indexes")?;
        anyhow::Ok(restored)
    }
    .await;
    let _ = sqlx::Connection::close(lock).await;
    let mut rebuilt = replayed?;
    rebuilt.indexes = (restored?, started.elapsed());
    Ok(rebuilt)
}

/// Creates the indexes an interrupted rebuild deferred, unless a rebuild is running now.
///
/// # Errors
/// When the database fails.
pub async fn restore_interrupted(pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let free: bool =
        sqlx::query_scalar(&format!("select pg_try_advisory_xact_lock(({REBUILD_LOCK}))")).fetch_one(&mut *tx).await?;
    if !free {
        return Ok(0);
    }
    let restored = restore_indexes(&mut tx).await?;
    tx.commit().await.context("creating the deferred indexes")?;
    Ok(restored)
}

/// Drops the indexes of `tables` that no constraint needs, keeping their definitions in
/// `rebuild_deferred_indexes` (in the same transaction).
async fn defer_indexes(conn: &mut sqlx::PgConnection, tables: &[&str]) -> anyhow::Result<()> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    let deferred: Vec<(String, String)> = sqlx::query_as(
        "insert into rebuild_deferred_indexes (index_name, table_name, definition)
         select i.indexname, i.tablename, i.indexdef from pg_indexes i
          where i.schemaname = current_schema() and i.tablename = any($1)
            and not exists (select 1 from pg_constraint c
                             where c.conindid = format('%I.%I', i.schemaname, i.indexname)::regclass)
         on conflict (index_name) do nothing
         returning index_name, table_name",
    )
    .bind(tables)
    .fetch_all(&mut *tx)
    .await
    .context("recording the indexes to defer")?;
    for (index, _) in &deferred {
        sqlx::query(&format!("drop index if exists {}", quote(index))).execute(&mut *tx).await?;
    }
    tx.commit().await.context("dropping the indexes to defer")?;
    Ok(())
}

/// Creates every deferred index that does not exist, and forgets them all (in the caller's
/// transaction, so both or neither happen).
async fn restore_indexes(tx: &mut sqlx::PgConnection) -> anyhow::Result<usize> {
    let deferred: Vec<(String, String)> =
        sqlx::query_as("delete from rebuild_deferred_indexes returning index_name, definition")
            .fetch_all(&mut *tx)
            .await?;
    for (index, definition) in &deferred {
        let exists: bool = sqlx::query_scalar("select to_regclass(format('%I', $1::text)) is not null")
            .bind(index)
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            sqlx::query(definition).execute(&mut *tx).await.with_context(|| format!("creating index {index}"))?;
        }
    }
    Ok(deferred.len())
}

/// `name` as an SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Replays the whole log into the emptied `projections`.
async fn replay(
    pool: &sqlx::PgPool,
    projections: Vec<Arc<dyn Projection>>,
    progress: impl Fn(u64) + Send + Sync,
) -> anyhow::Result<Rebuilt> {
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
    Ok(Rebuilt {
        events: counts.iter().map(|c| c.load(Ordering::Relaxed)).max().unwrap_or(0),
        busy,
        indexes: (0, Duration::ZERO),
    })
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
