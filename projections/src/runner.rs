//! The projection runner: reads the whole log from each projection's checkpoint, applies events
//! to the projection's tables and moves the checkpoint in the same transaction — so a read model
//! is always exactly the fold of a prefix of the log.
//!
//! One pass over the log feeds every projection of the runner; each skips what it has seen.
//! A projection is applied by one instance at a time: each batch holds a transaction-scoped
//! advisory lock per projection, and an instance that cannot get it leaves that projection to
//! the one that has it. Taking the lock needs no transaction id, so it does not hold back the
//! `(tx_id, position)` horizon of other readers while the batch is read.

use crate::projection::{Memo, Projection};
use anyhow::Context as _;
use sqlx::{PgPool, Row as _};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use zpanel_commands::postgres::read_all_on;
use zpanel_commands::{AppendSignal, Cursor};

/// How long to wait before re-reading when committed events wait behind an open transaction.
const HELD_BACK_RETRY: Duration = Duration::from_millis(2);
/// Polling interval when nothing signals: covers appends by processes without the notify bridge.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Memos kept by projection name, each with the cursor its batch committed at.
type KeptMemos = HashMap<&'static str, (Cursor, Memo)>;

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Events read from the log in this step.
    pub read: usize,
    /// Whether events wait behind an open transaction.
    pub held_back: bool,
}

/// Runs a set of projections.
#[derive(Clone)]
pub struct ProjectionRunner {
    pool: PgPool,
    projections: Vec<Arc<dyn Projection>>,
    batch_size: i64,
    projected: watch::Sender<Cursor>,
    /// Memos kept between batches, by projection, with the cursor their batch committed at;
    /// `None` when batches start with empty memos.
    memos: Option<Arc<std::sync::Mutex<KeptMemos>>>,
}

impl std::fmt::Debug for ProjectionRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projections", &self.projections.iter().map(|p| p.name()).collect::<Vec<_>>())
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl ProjectionRunner {
    /// A runner for `projections` over `pool`.
    #[must_use]
    pub fn new(pool: PgPool, projections: Vec<Arc<dyn Projection>>) -> Self {
        Self { pool, projections, batch_size: 256, projected: watch::Sender::new(Cursor::START), memos: None }
    }

    /// Keeps each projection's memo from one batch to the next (see [`Memo`]): for rebuilds,
    /// whose large batches of one projection follow each other.
    #[must_use]
    pub fn with_memos(mut self) -> Self {
        self.memos = Some(Arc::default());
        self
    }

    /// Reads the log in batches of `size` events.
    #[must_use]
    pub fn with_batch_size(mut self, size: i64) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// The names of the projections.
    #[must_use]
    pub fn names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }

    /// A receiver of the cursor up to which this runner has committed its projections.
    /// Subscriptions wait on it so that a client sees an update only once it can query it.
    #[must_use]
    pub fn projected(&self) -> watch::Receiver<Cursor> {
        self.projected.subscribe()
    }

    /// Makes sure every projection has a checkpoint row, and creates again the indexes an
    /// interrupted rebuild had dropped (see [`crate::rebuild`]).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn register(&self) -> anyhow::Result<()> {
        let names: Vec<String> = self.names().into_iter().map(str::to_owned).collect();
        sqlx::query("insert into checkpoints (name) select unnest($1::text[]) on conflict (name) do nothing")
            .bind(&names)
            .execute(&self.pool)
            .await
            .context("registering projection checkpoints")?;
        let restored = crate::rebuild::restore_interrupted(&self.pool).await.context("restoring deferred indexes")?;
        if restored > 0 {
            tracing::warn!(restored, "created the read-model indexes an interrupted rebuild had dropped");
        }
        Ok(())
    }

    /// Applies at most one batch of the log to every projection this instance may hold now.
    ///
    /// # Errors
    /// When the database fails or a projection cannot apply an event; nothing is committed then.
    pub async fn step(&self) -> anyhow::Result<Step> {
        let names: Vec<String> = self.names().into_iter().map(str::to_owned).collect();
        let mut tx = self.begin_batch().await?;
        let held = sqlx::query(
            "select name, tx_id::text::bigint as tx_id, position from checkpoints
              where name = any($1) and pg_try_advisory_xact_lock(hashtextextended('zpanel.projection.' || name, 0))",
        )
        .bind(&names)
        .fetch_all(&mut *tx)
        .await
        .context("locking projections")?;
        let checkpoints = checkpoint_map(&held)?;
        let Some(from) = checkpoints.values().min().copied() else {
            return Ok(Step::default());
        };
        let batch = read_all_on(&mut *tx, from, self.batch_size).await?;
        let Some(last) = batch.events.last().map(|e| e.cursor()) else {
            tx.commit().await?;
            return Ok(Step { read: 0, held_back: batch.held_back });
        };
        let memos = self.apply_locked(&mut tx, &checkpoints, &batch.events).await?;
        tx.commit().await.context("committing a projection batch")?;
        // Only a batch that held every projection moves what this runner says it projected:
        // another instance may be applying the rest, which are then not at `last` yet.
        let complete = checkpoints.len() == names.len();
        self.committed(last, complete, memos);
        Ok(Step { read: batch.events.len(), held_back: batch.held_back })
    }

    /// Applies `events` — the log's events that follow `after`, read by the caller — to every
    /// projection of this runner, waiting for any other instance's batch to finish first. This
    /// is how one reader feeds several runners (see [`crate::rebuild`]).
    ///
    /// # Errors
    /// When the database fails, a projection cannot apply an event, or a projection's
    /// checkpoint is behind `after` (the events between would be skipped: someone reset it).
    pub async fn apply(&self, after: Cursor, events: &[zpanel_commands::RecordedEvent]) -> anyhow::Result<()> {
        let Some(last) = events.last().map(|e| e.cursor()) else { return Ok(()) };
        let names: Vec<String> = self.names().into_iter().map(str::to_owned).collect();
        let mut tx = self.begin_batch().await?;
        // In name order, as every waiting locker does, so two never wait on each other.
        sqlx::query(
            "select pg_advisory_xact_lock(hashtextextended('zpanel.projection.' || name, 0))
               from (select unnest($1::text[]) as name order by 1) names",
        )
        .bind(&names)
        .execute(&mut *tx)
        .await
        .context("locking projections")?;
        let rows =
            sqlx::query("select name, tx_id::text::bigint as tx_id, position from checkpoints where name = any($1)")
                .bind(&names)
                .fetch_all(&mut *tx)
                .await
                .context("reading checkpoints")?;
        let checkpoints = checkpoint_map(&rows)?;
        if let Some((name, behind)) = checkpoints.iter().find(|(_, c)| **c < after) {
            anyhow::bail!(
                "projection {name} is at {behind:?}, behind the events given (after {after:?}); was it reset?"
            );
        }
        let memos = self.apply_locked(&mut tx, &checkpoints, events).await?;
        tx.commit().await.context("committing a projection batch")?;
        self.committed(last, true, memos);
        Ok(())
    }

    /// Applies to each projection in `checkpoints` the events it has not seen, and moves the
    /// checkpoints to the last event, in `tx`. Returns the projections' memos, to keep once the
    /// transaction has committed.
    async fn apply_locked(
        &self,
        tx: &mut sqlx::PgConnection,
        checkpoints: &HashMap<String, Cursor>,
        events: &[zpanel_commands::RecordedEvent],
    ) -> anyhow::Result<Vec<(&'static str, Memo)>> {
        let Some(last) = events.last().map(|e| e.cursor()) else { return Ok(Vec::new()) };
        let mut memos = Vec::new();
        for projection in &self.projections {
            let Some(checkpoint) = checkpoints.get(projection.name()) else { continue };
            let mut memo = self.memo(projection.name(), *checkpoint);
            let start = events.partition_point(|e| e.cursor() <= *checkpoint);
            let unseen = &events[start..];
            if !unseen.is_empty() {
                projection
                    .apply(&mut *tx, unseen, &mut memo)
                    .await
                    .with_context(|| format!("projection {} applying events up to {last:?}", projection.name()))?;
            }
            memos.push((projection.name(), memo));
        }
        let held_names: Vec<&String> = checkpoints.keys().collect();
        sqlx::query(
            "update checkpoints set tx_id = $2::text::xid8, position = $3, updated_at = now()
              where name = any($1) and (tx_id, position) < ($2::text::xid8, $3)",
        )
        .bind(&held_names)
        .bind(last.tx_id.to_string())
        .bind(last.position)
        .execute(&mut *tx)
        .await
        .context("moving projection checkpoints")?;
        Ok(memos)
    }

    /// The memo `name` kept, if its batch committed at `checkpoint` — which shows that no other
    /// instance has applied the projection since; an empty one otherwise.
    fn memo(&self, name: &'static str, checkpoint: Cursor) -> Memo {
        let Some(memos) = &self.memos else { return Memo::default() };
        let mut memos = memos.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match memos.remove(name) {
            Some((at, memo)) if at == checkpoint => memo,
            _ => Memo::default(),
        }
    }

    /// Records a committed batch that took its projections to `last`: the memos describe them,
    /// and when `complete`, every projection of this runner reached it.
    fn committed(&self, last: Cursor, complete: bool, memos: Vec<(&'static str, Memo)>) {
        if let Some(kept) = &self.memos {
            let mut kept = kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (name, memo) in memos {
                kept.insert(name, (last, memo));
            }
        }
        if complete {
            self.mark_projected(last);
        }
    }

    /// A batch's transaction. It commits without waiting for its WAL to reach disk: a read
    /// model is derived data, and a batch lost in a crash is lost with its checkpoint, so it is
    /// simply applied again. The events themselves are always committed durably.
    async fn begin_batch(&self) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await.context("beginning a projection batch")?;
        sqlx::query("set local synchronous_commit = off").execute(&mut *tx).await?;
        Ok(tx)
    }

    fn mark_projected(&self, last: Cursor) {
        self.projected.send_if_modified(|c| {
            let moved = last > *c;
            if moved {
                *c = last;
            }
            moved
        });
    }

    /// Steps until the log is exhausted; returns how many events were read.
    ///
    /// # Errors
    /// As [`ProjectionRunner::step`].
    pub async fn catch_up(&self) -> anyhow::Result<u64> {
        self.catch_up_with(|_| {}).await
    }

    /// Like [`ProjectionRunner::catch_up`], telling `progress` the running total after each batch.
    ///
    /// # Errors
    /// As [`ProjectionRunner::step`].
    pub async fn catch_up_with(&self, progress: impl Fn(u64)) -> anyhow::Result<u64> {
        let mut total = 0u64;
        loop {
            let step = self.step().await?;
            total += step.read as u64;
            if step.read > 0 {
                progress(total);
            }
            if step.read == 0 {
                if step.held_back {
                    tokio::time::sleep(HELD_BACK_RETRY).await;
                    continue;
                }
                return Ok(total);
            }
        }
    }

    /// Runs until `shutdown` resolves, waking on every append signalled by `signal`.
    ///
    /// # Errors
    /// When registering fails. Failures of single batches are logged and retried with backoff.
    pub async fn run(&self, signal: AppendSignal, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.register().await?;
        let mut appended = signal.subscribe();
        let mut backoff = Duration::from_millis(100);
        tokio::pin!(shutdown);
        loop {
            appended.mark_unchanged();
            let wait = match self.step().await {
                Ok(step) if step.read > 0 => Duration::ZERO,
                Ok(step) if step.held_back => HELD_BACK_RETRY,
                Ok(_) => IDLE_POLL,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "projection batch failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    backoff
                }
            };
            if wait.is_zero() {
                backoff = Duration::from_millis(100);
                continue;
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                _ = appended.changed(), if wait == IDLE_POLL => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Empties the named projections' tables and resets their checkpoints, in one transaction
    /// that waits for any instance applying them to finish its batch. Replaying is then
    /// [`ProjectionRunner::catch_up`].
    ///
    /// # Errors
    /// When a name is unknown or the database fails.
    pub async fn reset(&self, names: &[&str]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        // Locked in name order, like `apply`, so the two never wait on each other.
        let mut names = names.to_vec();
        names.sort_unstable();
        for name in &names {
            let projection = self
                .projections
                .iter()
                .find(|p| p.name() == *name)
                .with_context(|| format!("no projection named {name}; known: {}", self.names().join(", ")))?;
            sqlx::query("select pg_advisory_xact_lock(hashtextextended('zpanel.projection.' || $1, 0))")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            for table in projection.tables() {
                sqlx::query(&format!("truncate {table}")).execute(&mut *tx).await?;
            }
            sqlx::query("update checkpoints set tx_id = '0', position = 0, updated_at = now() where name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await.context("resetting projections")?;
        Ok(())
    }

    /// The checkpoint of every projection of this runner.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn checkpoints(&self) -> anyhow::Result<Vec<(String, Cursor)>> {
        let names: Vec<String> = self.names().into_iter().map(str::to_owned).collect();
        let rows = sqlx::query(
            "select name, tx_id::text::bigint as tx_id, position from checkpoints where name = any($1) order by name",
        )
        .bind(&names)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((row.try_get("name")?, Cursor { tx_id: row.try_get("tx_id")?, position: row.try_get("position")? }))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

fn checkpoint_map(rows: &[sqlx::postgres::PgRow]) -> Result<HashMap<String, Cursor>, sqlx::Error> {
    rows.iter()
        .map(|row| {
            Ok((row.try_get("name")?, Cursor { tx_id: row.try_get("tx_id")?, position: row.try_get("position")? }))
        })
        .collect()
}
