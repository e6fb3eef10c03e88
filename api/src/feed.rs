//! What clients may see, and when: the *horizon* is the log position every projection has
//! reached, so a mutation's answer, or a subscription's update, is only given once every read
//! model a client could query shows it.
//!
//! The feed follows the horizon and fans the new audit-log entries out to every subscriber
//! through one bounded broadcast channel: the audit log is read once per move of the horizon,
//! not once per subscriber. A subscriber that falls more than the channel's capacity behind is
//! resynchronised from the audit log and told so; memory does not grow with slow readers.

use crate::schema::types::{AUDIT_COLUMNS, AuditEntry};
use anyhow::Context as _;
use sqlx::{PgPool, Row as _};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;
use zpanel_commands::Cursor;

/// Entries buffered for subscribers; one who falls further behind is resynchronised.
const CAPACITY: usize = 4096;
/// How often the horizon is read from the checkpoints when this process's runner signals
/// nothing (another process may be running the projections).
const POLL: Duration = Duration::from_millis(250);
/// How often a mutation waiting for the read models reads the checkpoints.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// Entries read per query.
const PAGE: i64 = 1000;

/// One audit-log entry, where it is in the log, and whose it is.
#[derive(Clone, Debug)]
pub struct FeedEntry {
    /// Its place in the log.
    pub cursor: Cursor,
    /// The team it belongs to.
    pub team_id: Uuid,
    /// The entry.
    pub entry: AuditEntry,
}

/// The horizon and the feed.
#[derive(Clone, Debug)]
pub struct Feed {
    pool: PgPool,
    projections: Arc<Vec<String>>,
    local: watch::Receiver<Cursor>,
    horizon: watch::Sender<Cursor>,
    /// The checkpoints' least position as a waiting mutation last read it.
    polled: watch::Sender<Cursor>,
    entries: broadcast::Sender<Arc<FeedEntry>>,
}

impl Feed {
    /// A feed over `projections`, woken by `local` (this process's runner) and by polling.
    #[must_use]
    pub fn new(pool: PgPool, projections: Vec<String>, local: watch::Receiver<Cursor>) -> Self {
        Self {
            pool,
            projections: Arc::new(projections),
            local,
            horizon: watch::Sender::new(Cursor::START),
            polled: watch::Sender::new(Cursor::START),
            entries: broadcast::channel(CAPACITY).0,
        }
    }

    /// The horizon as last seen.
    #[must_use]
    pub fn horizon(&self) -> Cursor {
        *self.horizon.borrow()
    }

    /// How far the read models are known to have got: this process's runner, the horizon, and
    /// the checkpoints as a waiting mutation last read them. What a query of the read models
    /// answers can only change once one of them has moved — and a mutation answers only after
    /// one has moved past its events — so answers can be reused while this stays the same.
    #[must_use]
    pub fn seen(&self) -> (Cursor, Cursor, Cursor) {
        (*self.local.borrow(), *self.horizon.borrow(), *self.polled.borrow())
    }

    /// New entries, from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FeedEntry>> {
        self.entries.subscribe()
    }

    /// How many subscribers listen.
    #[must_use]
    pub fn subscribers(&self) -> usize {
        self.entries.receiver_count()
    }

    /// The horizon according to the checkpoints: the least position over all projections.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn read_horizon(&self) -> anyhow::Result<Cursor> {
        let rows = sqlx::query("select tx_id::text::bigint as tx_id, position from checkpoints where name = any($1)")
            .bind(self.projections.as_slice())
            .fetch_all(&self.pool)
            .await
            .context("reading projection checkpoints")?;
        if rows.len() < self.projections.len() {
            return Ok(Cursor::START);
        }
        rows.iter()
            .map(|r| Ok(Cursor { tx_id: r.try_get("tx_id")?, position: r.try_get("position")? }))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map(|cursors| cursors.into_iter().min().unwrap_or(Cursor::START))
            .map_err(Into::into)
    }

    /// Waits until the horizon reaches `cursor`, or `timeout` passes.
    ///
    /// # Errors
    /// When it does not get there in time, or the database fails.
    pub async fn wait_for(&self, cursor: Cursor, timeout: Duration) -> anyhow::Result<()> {
        let (mut horizon, mut local) = (self.horizon.subscribe(), self.local.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + WAIT_POLL, WAIT_POLL);
        loop {
            if *horizon.borrow_and_update() >= cursor || *local.borrow_and_update() >= cursor {
                return Ok(());
            }
            tokio::select! {
                _ = horizon.changed() => {}
                _ = local.changed() => {}
                // Another process may be projecting: then only the checkpoints tell.
                _ = poll.tick() => {
                    let read = self.read_horizon().await?;
                    self.polled.send_if_modified(|polled| {
                        let moved = read > *polled;
                        if moved {
                            *polled = read;
                        }
                        moved
                    });
                    if read >= cursor {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    anyhow::bail!("the read models did not reach {cursor:?} within {timeout:?}");
                }
            }
        }
    }

    /// Follows the horizon until `shutdown`, broadcasting each new audit entry.
    ///
    /// # Errors
    /// Never on its own: failures are logged and retried.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut local = self.local.clone();
        let mut last = self.read_horizon().await.unwrap_or(Cursor::START);
        self.horizon.send_replace(last);
        loop {
            // This process's runner says how far it got; only when it is quiet are the
            // checkpoints read (another process may be projecting).
            let horizon = tokio::select! {
                () = &mut shutdown => return Ok(()),
                _ = local.changed() => *local.borrow_and_update(),
                () = tokio::time::sleep(POLL) => match self.read_horizon().await {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "reading the horizon failed");
                        continue;
                    }
                },
            };
            if horizon <= last {
                continue;
            }
            match self.entries_between(None, last, horizon).await {
                Ok(entries) => {
                    for entry in entries {
                        // No receiver is fine: nobody listens.
                        let _ = self.entries.send(Arc::new(entry));
                    }
                    last = horizon;
                    self.horizon.send_replace(horizon);
                }
                Err(e) => tracing::warn!(error = format!("{e:#}"), "reading the audit log for subscribers failed"),
            }
        }
    }

    /// The audit entries after `after` up to `until` (of one team, or all), in log order.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn entries_between(
        &self,
        team: Option<Uuid>,
        after: Cursor,
        until: Cursor,
    ) -> anyhow::Result<Vec<FeedEntry>> {
        let mut out = Vec::new();
        let mut from = after;
        loop {
            let sql = format!(
                "select e.tx_id::text::bigint as tx_id, a.team_id, {AUDIT_COLUMNS}
                   from events e join rm_audit_log a on a.global_position = e.global_position
                  where (e.tx_id, e.global_position) > ($1::text::xid8, $2)
                    and (e.tx_id, e.global_position) <= ($3::text::xid8, $4)
                    and ($5::uuid is null or a.team_id = $5)
                  order by e.tx_id, e.global_position
                  limit {PAGE}"
            );
            let rows = sqlx::query(&sql)
                .bind(from.tx_id.to_string())
                .bind(from.position)
                .bind(until.tx_id.to_string())
                .bind(until.position)
                .bind(team)
                .fetch_all(&self.pool)
                .await
                .context("reading audit entries")?;
            let n = rows.len();
            for row in &rows {
                let cursor = Cursor { tx_id: row.try_get("tx_id")?, position: row.try_get("global_position")? };
                let entry = AuditEntry::from_row(row).map_err(crate::error::ApiError::into_anyhow)?;
                out.push(FeedEntry { cursor, team_id: row.try_get("team_id")?, entry });
                from = cursor;
            }
            if n < usize::try_from(PAGE)? {
                return Ok(out);
            }
        }
    }
}
