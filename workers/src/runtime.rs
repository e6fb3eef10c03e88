//! The worker runtime: a named worker with a handler, fed events by a source (the log cursor in
//! embedded mode, a Kafka consumer group otherwise), handling each event at most once per
//! worker however often it is delivered.
//!
//! Delivery is at least once. Each worker keeps an inbox (`worker_inbox`) of the events it has
//! handled, written by the source in the same transaction as its own bookkeeping; an event
//! already in the inbox is acknowledged without handling. Handlers report results only by
//! sending commands whose ids derive from the triggering event
//! ([`zpanel_commands::CommandContext::caused_by`]), so even two deliveries racing past the
//! inbox cannot apply a result twice.
//!
//! A failing handler is retried with exponential backoff when the failure is transient, up
//! to a bounded number of attempts; then — or at once, for a permanent failure — its
//! [`Handler::give_up`] turns the failure into a domain event (e.g. `DeploymentFailed`), and
//! the event counts as handled. Nothing is dropped silently, nothing loops forever.

use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::{PgExecutor, PgPool};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use uuid::Uuid;
use zpanel_commands::RecordedEvent;

/// Why a handler did not finish.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth another attempt: the database, the broker or a remote host was away.
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// Another attempt would fail the same way: report it.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
}

/// What a worker does with the events it wants.
pub trait Handler: Send + Sync + 'static {
    /// The event types it reacts to; the others are acknowledged unseen.
    fn event_types(&self) -> &[&str];

    /// Does the work for `event`. Called again on redelivery only if an earlier call did not
    /// return `Ok`; it reports results by sending commands.
    fn handle<'a>(&'a self, event: &'a RecordedEvent) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Reports that `event` could not be handled (after the last attempt, or a permanent
    /// failure) as a domain event. An error here leaves the event unacknowledged.
    fn give_up<'a>(&'a self, event: &'a RecordedEvent, reason: &'a str) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// How often and how patiently a transient failure is retried.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The wait after the first failure; it doubles each time.
    pub first_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { attempts: 5, first_backoff: Duration::from_millis(200), max_backoff: Duration::from_secs(10) }
    }
}

/// A worker's counters (exported as metrics).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Events handled.
    pub handled: AtomicU64,
    /// Deliveries of events already in the inbox.
    pub duplicates: AtomicU64,
    /// Handler attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Events given up on (reported as failures).
    pub given_up: AtomicU64,
    /// Messages that could not be decoded and went to the dead-letter topic.
    pub dead_letters: AtomicU64,
}

/// What became of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed {
    /// Not an event this worker wants.
    Skipped,
    /// In the inbox already: delivered before and handled then.
    Duplicate,
    /// Handled now.
    Handled,
    /// Failed for good and reported through [`Handler::give_up`].
    GaveUp,
}

impl Processed {
    /// Whether the source must record the event in the inbox.
    #[must_use]
    pub const fn goes_in_inbox(self) -> bool {
        matches!(self, Self::Handled | Self::GaveUp)
    }
}

/// A named worker: the consumer group (Kafka) or checkpoint (embedded) it reads with, its
/// handler and its retry policy.
#[derive(Clone)]
pub struct Worker {
    name: Arc<str>,
    handler: Arc<dyn Handler>,
    retry: Retry,
    stats: Arc<WorkerStats>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("name", &self.name).field("retry", &self.retry).finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker named `name` (e.g. `deploy`) running `handler`.
    #[must_use]
    pub fn new(name: &str, handler: impl Handler) -> Self {
        Self { name: name.into(), handler: Arc::new(handler), retry: Retry::default(), stats: Arc::default() }
    }

    /// The same worker with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Its name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its counters.
    #[must_use]
    pub fn stats(&self) -> Arc<WorkerStats> {
        Arc::clone(&self.stats)
    }

    /// Whether it reacts to events of `event_type`.
    #[must_use]
    pub fn wants(&self, event_type: &str) -> bool {
        self.handler.event_types().contains(&event_type)
    }

    /// Handles `event` unless the inbox says it was handled: with retries, and giving up into
    /// a domain event. The caller records the event in the inbox when
    /// [`Processed::goes_in_inbox`], together with its own bookkeeping.
    ///
    /// # Errors
    /// When the inbox cannot be read or giving up fails: the event stays unacknowledged and
    /// is delivered again.
    pub async fn process(&self, pool: &PgPool, event: &RecordedEvent) -> anyhow::Result<Processed> {
        if !self.wants(&event.event_type) {
            return Ok(Processed::Skipped);
        }
        if self.in_inbox(pool, event.event_id).await? {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(Processed::Duplicate);
        }
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 1;
        let reason = loop {
            match self.handler.handle(event).await {
                Ok(()) => {
                    self.stats.handled.fetch_add(1, Ordering::Relaxed);
                    return Ok(Processed::Handled);
                }
                Err(HandlerError::Permanent(e)) => break format!("{e:#}"),
                Err(HandlerError::Transient(e)) if attempt >= self.retry.attempts => {
                    break format!("{e:#} (gave up after {attempt} attempts)");
                }
                Err(HandlerError::Transient(e)) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        worker = %self.name, event_id = %event.event_id, event_type = %event.event_type, attempt,
                        error = format!("{e:#}"), "handler failed; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
            }
        };
        tracing::error!(worker = %self.name, event_id = %event.event_id, event_type = %event.event_type, %reason, "giving up on an event");
        self.handler.give_up(event, &reason).await.context("reporting a failed event")?;
        self.stats.given_up.fetch_add(1, Ordering::Relaxed);
        Ok(Processed::GaveUp)
    }

    async fn in_inbox(&self, pool: &PgPool, event_id: Uuid) -> anyhow::Result<bool> {
        let found: Option<i32> = sqlx::query_scalar("select 1 from worker_inbox where worker = $1 and event_id = $2")
            .bind(&*self.name)
            .bind(event_id)
            .fetch_optional(pool)
            .await
            .context("reading the worker inbox")?;
        Ok(found.is_some())
    }

    /// Records `event_id` in this worker's inbox, on `executor` (the source's transaction).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn record<'e>(&self, executor: impl PgExecutor<'e>, event_id: Uuid) -> anyhow::Result<()> {
        sqlx::query("insert into worker_inbox (worker, event_id) values ($1, $2) on conflict do nothing")
            .bind(&*self.name)
            .bind(event_id)
            .execute(executor)
            .await
            .context("writing the worker inbox")?;
        Ok(())
    }
}
