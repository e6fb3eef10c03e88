//! The relay: the event log, read with the gap-safe cursor, produced to Kafka in log order.
//!
//! The log is the outbox. A command never waits for the broker; the relay follows the log
//! and moves its checkpoint (`relay:<topic>` in `checkpoints`) only after the broker has
//! acknowledged every event up to it. When the broker is away the relay retries with backoff
//! from its checkpoint, so nothing is lost; an event may be produced twice across an outage
//! (consumers keep an inbox), but one stream's events are never produced out of order: a batch
//! is enqueued in log order on an idempotent producer, and a failed batch is produced again
//! whole, by a new producer, from the checkpoint.
//!
//! At most one relay per topic is active ([`Exclusive`]): the others wait on its lock as hot
//! standbys.

use crate::backoff::Backoff;
use crate::exclusive::Exclusive;
use crate::kafka::{self, KafkaConfig};
use anyhow::Context as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use zpanel_commands::postgres::read_all_on;
use zpanel_commands::{AppendSignal, Cursor, RecordedEvent};

/// Events read and produced per batch.
const BATCH: i64 = 1000;
/// How often an idle relay looks at the log without a signal (appends by other processes
/// whose signal bridge is down).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How soon a relay looks again when committed events wait behind a running transaction.
const HELD_BACK_RETRY: Duration = Duration::from_millis(5);

/// What a relay has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events the broker acknowledged.
    pub relayed: AtomicU64,
    /// Batches that failed and were produced again.
    pub retries: AtomicU64,
    /// 1 while this relay holds the lock and relays, 0 while it stands by.
    pub active: AtomicU64,
}

/// A relay of the log to one topic.
#[derive(Clone, Debug)]
pub struct Relay {
    pool: PgPool,
    kafka: KafkaConfig,
    signal: AppendSignal,
    stats: Arc<RelayStats>,
}

impl Relay {
    /// A relay of `pool`'s log to `kafka`'s topic, woken by `signal`.
    #[must_use]
    pub fn new(pool: PgPool, kafka: KafkaConfig, signal: AppendSignal) -> Self {
        Self { pool, kafka, signal, stats: Arc::default() }
    }

    /// Its counters.
    #[must_use]
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// The name of its checkpoint.
    #[must_use]
    pub fn checkpoint_name(&self) -> String {
        format!("relay:{}", self.kafka.topic)
    }

    /// Waits for the relay lock, then relays until `shutdown` resolves. Failures of the broker
    /// or the database are retried with backoff; losing the lock's connection sends the relay
    /// back to waiting for the lock.
    ///
    /// # Errors
    /// Never while `shutdown` is pending; returns `Ok` when it resolves.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let name = self.checkpoint_name();
        let mut backoff = Backoff::new();
        loop {
            let outcome = tokio::select! {
                () = shutdown.as_mut() => return Ok(()),
                lock = Exclusive::take(&self.pool, &name) => lock,
            };
            let outcome = match outcome {
                Ok(mut lock) => {
                    self.stats.active.store(1, Ordering::Relaxed);
                    tracing::info!(topic = %self.kafka.topic, "relay active");
                    let outcome = self.relay_holding(&mut lock, &mut shutdown).await;
                    self.stats.active.store(0, Ordering::Relaxed);
                    lock.release().await;
                    outcome
                }
                Err(e) => Err(e),
            };
            let Err(e) = outcome else { return Ok(()) };
            tracing::warn!(error = format!("{e:#}"), "the relay lost its lock or its database; taking the lock again");
            if backoff.wait(&mut shutdown).await {
                return Ok(());
            }
        }
    }

    /// Relays while holding the lock on `lock`. Returns `Ok` at shutdown, an error when the
    /// lock's connection fails (the lock may be gone).
    async fn relay_holding(
        &self,
        lock: &mut Exclusive,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<()> {
        let name = self.checkpoint_name();
        let mut checkpoint = lock.checkpoint().await?;
        let mut producer: Option<FutureProducer> = None;
        let mut appended = self.signal.subscribe();
        let mut backoff = Backoff::new();
        loop {
            appended.mark_unchanged();
            let wait = match self.step(&mut producer, checkpoint).await {
                Ok(Step::Relayed(last)) => {
                    // Written through the lock's connection: if it is gone, so may be the lock.
                    Exclusive::store(&name, lock.connection(), last).await?;
                    checkpoint = last;
                    backoff.reset();
                    continue;
                }
                Ok(Step::HeldBack) => HELD_BACK_RETRY,
                Ok(Step::Idle) => IDLE_POLL,
                Err(e) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_ms = backoff.next().as_millis(),
                        "relaying failed; retrying from the checkpoint"
                    );
                    // A new producer: the old one may hold messages of the failed batch.
                    producer = None;
                    if backoff.wait(shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            tokio::select! {
                () = &mut *shutdown => {
                    if let Some(producer) = &producer {
                        let _ = producer.flush(Duration::from_secs(5));
                    }
                    return Ok(());
                }
                _ = appended.changed(), if wait == IDLE_POLL => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Reads the next batch after `checkpoint` and produces it, waiting for every
    /// acknowledgement.
    async fn step(&self, producer: &mut Option<FutureProducer>, checkpoint: Cursor) -> anyhow::Result<Step> {
        let batch = read_all_on(&self.pool, checkpoint, BATCH).await?;
        let Some(last) = batch.events.last().map(RecordedEvent::cursor) else {
            return Ok(if batch.held_back { Step::HeldBack } else { Step::Idle });
        };
        if producer.is_none() {
            self.kafka.ensure_topics().await?;
            *producer = Some(self.kafka.producer()?);
        }
        let producer = producer.as_ref().context("no producer")?;
        produce_in_order(producer, &self.kafka.topic, &batch.events).await?;
        self.stats.relayed.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        Ok(Step::Relayed(last))
    }
}

enum Step {
    Relayed(Cursor),
    HeldBack,
    Idle,
}

/// Enqueues `events` on `producer` in order, then waits until the broker acknowledged them all.
///
/// # Errors
/// The first delivery that failed.
pub async fn produce_in_order(producer: &FutureProducer, topic: &str, events: &[RecordedEvent]) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(events.len());
    for event in events {
        let value = kafka::encode(event)?;
        let mut record =
            FutureRecord::to(topic).key(event.stream_id.as_str()).payload(&value).headers(kafka::headers(event));
        // Enqueueing is synchronous and ordered; a full queue is drained by waiting a little.
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e).context("enqueueing an event for Kafka"),
            }
        }
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e).context("the broker did not acknowledge an event"),
            Err(_) => anyhow::bail!("the producer dropped a delivery"),
        }
    }
    Ok(())
}
