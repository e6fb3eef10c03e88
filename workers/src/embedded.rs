//! Embedded mode: a worker fed from the log cursor in this process, without Kafka.
//!
//! The same semantics as the Kafka consumer: at-least-once delivery, the inbox, retries and
//! giving up. The worker's cursor is the checkpoint `worker:<name>`; an event it handled is
//! recorded in its inbox in the same transaction that moves the checkpoint past it. One process
//! at a time feeds a given worker ([`Exclusive`]); others stand by.

use crate::backoff::Backoff;
use crate::exclusive::Exclusive;
use crate::runtime::Worker;
use sqlx::PgPool;
use std::time::Duration;
use zpanel_commands::AppendSignal;
use zpanel_commands::postgres::read_all_on;

/// Events read per batch.
const BATCH: i64 = 500;
/// How often an idle worker looks at the log without a signal.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How soon it looks again when committed events wait behind a running transaction.
const HELD_BACK_RETRY: Duration = Duration::from_millis(5);

/// The checkpoint name of `worker` in embedded mode.
#[must_use]
pub fn checkpoint_name(worker: &Worker) -> String {
    format!("worker:{}", worker.name())
}

/// Feeds `worker` from the log until `shutdown` resolves. An event being handled when it
/// resolves is finished first.
///
/// # Errors
/// Never while `shutdown` is pending: failures are logged and retried with backoff.
pub async fn run(
    pool: PgPool,
    signal: AppendSignal,
    worker: Worker,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let name = checkpoint_name(&worker);
    let mut backoff = Backoff::new();
    loop {
        let outcome = tokio::select! {
            () = shutdown.as_mut() => return Ok(()),
            lock = Exclusive::take(&pool, &name) => lock,
        };
        let outcome = match outcome {
            Ok(mut lock) => {
                let outcome = feed(&pool, &signal, &worker, &mut lock, &mut shutdown).await;
                lock.release().await;
                outcome
            }
            Err(e) => Err(e),
        };
        let Err(e) = outcome else { return Ok(()) };
        tracing::warn!(worker = worker.name(), error = format!("{e:#}"), "the worker's feed failed; starting again");
        if backoff.wait(&mut shutdown).await {
            return Ok(());
        }
    }
}

async fn feed(
    pool: &PgPool,
    signal: &AppendSignal,
    worker: &Worker,
    lock: &mut Exclusive,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let name = lock.name().to_owned();
    let mut checkpoint = lock.checkpoint().await?;
    let mut appended = signal.subscribe();
    loop {
        appended.mark_unchanged();
        let batch = read_all_on(pool, checkpoint, BATCH).await?;
        let mut stored = checkpoint;
        for event in &batch.events {
            let processed = worker.process(pool, event).await?;
            if processed.goes_in_inbox() {
                // The inbox and the cursor move together.
                let mut tx = sqlx::Connection::begin(lock.connection()).await?;
                worker.record(&mut *tx, event.event_id).await?;
                Exclusive::store(&name, &mut *tx, event.cursor()).await?;
                tx.commit().await?;
                stored = event.cursor();
            }
            checkpoint = event.cursor();
        }
        if checkpoint != stored {
            Exclusive::store(&name, lock.connection(), checkpoint).await?;
        }
        let wait = if !batch.events.is_empty() {
            continue;
        } else if batch.held_back {
            HELD_BACK_RETRY
        } else {
            IDLE_POLL
        };
        tokio::select! {
            () = &mut *shutdown => return Ok(()),
            _ = appended.changed(), if wait == IDLE_POLL => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}
