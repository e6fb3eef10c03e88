//! Distributed mode: a worker fed by a Kafka consumer group (`zpanel.<worker>`). Several
//! processes running the same worker share the topic's partitions through the group.
//!
//! Each message is handled (or found in the inbox), recorded in the inbox, and only then is its
//! offset stored for commit (the consumer commits stored offsets every second, and at shutdown);
//! a process that dies before the commit has its messages delivered again to another member, and
//! the inbox makes that harmless. A message that is not an event envelope
//! (a poison message) is produced to the dead-letter topic with the reason, counted, and
//! committed, so it cannot block its partition.

use crate::backoff::Backoff;
use crate::kafka::{self, KafkaConfig};
use crate::runtime::Worker;
use anyhow::Context as _;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The consumer group of `worker`.
#[must_use]
pub fn group(worker: &Worker) -> String {
    format!("zpanel.{}", worker.name())
}

/// Consumes for `worker` until `shutdown` resolves; the message being handled then is finished
/// and committed first, and the consumer leaves its group.
///
/// # Errors
/// Never while `shutdown` is pending: failures are logged and retried with backoff.
pub async fn run(
    pool: PgPool,
    kafka: KafkaConfig,
    worker: Worker,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    loop {
        let Err(e) = consume(&pool, &kafka, &worker, &mut shutdown).await else { return Ok(()) };
        tracing::warn!(worker = worker.name(), error = format!("{e:#}"), "the consumer failed; starting again");
        if backoff.wait(&mut shutdown).await {
            return Ok(());
        }
    }
}

async fn consume(
    pool: &PgPool,
    kafka: &KafkaConfig,
    worker: &Worker,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    kafka.ensure_topics().await?;
    let consumer = Arc::new(kafka.consumer(&group(worker))?);
    let mut dead_letters: Option<FutureProducer> = None;
    let outcome = consume_with(pool, kafka, worker, &consumer, &mut dead_letters, shutdown).await;
    // Closing a consumer of a group waits, inside librdkafka, on the group's coordinator — for as
    // long as the broker is away — and a producer flushes when dropped: neither may hold one of the
    // runtime's threads, whose other tasks (a mutation waiting for its read models) would wait too.
    kafka::close_off_runtime(consumer).await;
    kafka::close_off_runtime(dead_letters).await;
    outcome
}

async fn consume_with(
    pool: &PgPool,
    kafka: &KafkaConfig,
    worker: &Worker,
    consumer: &Arc<StreamConsumer>,
    dead_letters: &mut Option<FutureProducer>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    consumer.subscribe(&[&kafka.topic]).context("subscribing to the events topic")?;
    loop {
        let message = tokio::select! {
            () = &mut *shutdown => {
                // Every message received so far is handled: commit their offsets now (a call
                // that blocks until the broker answers, so on a thread of its own).
                let committing = Arc::clone(consumer);
                let committed = tokio::task::spawn_blocking(move || committing.commit_consumer_state(CommitMode::Sync))
                    .await
                    .context("committing offsets at shutdown")?;
                match committed {
                    Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                    Err(e) => tracing::warn!(worker = worker.name(), error = %e, "committing offsets at shutdown"),
                }
                consumer.unsubscribe();
                return Ok(());
            }
            message = consumer.recv() => message.context("receiving from Kafka")?,
        };
        if !handle(pool, kafka, worker, &message, dead_letters, shutdown).await? {
            // Stopped mid-way: uncommitted, the message is delivered again.
            consumer.unsubscribe();
            return Ok(());
        }
        // Handled: its offset may be committed (in the background, with the others').
        consumer.store_offset_from_message(&message).context("storing an offset")?;
    }
}

/// Handles one message until it is handled, given up on, or dead-lettered (`true`), or
/// `shutdown` resolves first (`false`).
async fn handle(
    pool: &PgPool,
    kafka: &KafkaConfig,
    worker: &Worker,
    message: &BorrowedMessage<'_>,
    dead_letters: &mut Option<FutureProducer>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<bool> {
    // Not this worker's event type (the relay names it in a header): acknowledged undecoded.
    let event_type = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == kafka::EVENT_TYPE_HEADER))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok());
    if event_type.is_some_and(|t| !worker.wants(t)) {
        return Ok(true);
    }
    let event = match message.payload().context("the message has no value").and_then(kafka::decode) {
        Ok(event) => event,
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::error!(worker = worker.name(), partition = message.partition(), offset = message.offset(), %reason, "poison message; dead-lettering it");
            if dead_letters.is_none() {
                *dead_letters = Some(kafka.producer()?);
            }
            dead_letter(dead_letters.as_ref().context("no producer")?, kafka, worker, message, &reason).await?;
            worker.stats().dead_letters.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
    };
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let processed = worker.process(pool, &event).await?;
            if processed.goes_in_inbox() {
                worker.record(pool, event.event_id).await?;
            }
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(true),
            Err(e) => {
                tracing::warn!(worker = worker.name(), event_id = %event.event_id, error = format!("{e:#}"), "could not process an event; retrying");
                // At shutdown the event stays uncommitted and is delivered again.
                if backoff.wait(shutdown).await {
                    return Ok(false);
                }
            }
        }
    }
}

async fn dead_letter(
    producer: &FutureProducer,
    kafka: &KafkaConfig,
    worker: &Worker,
    message: &BorrowedMessage<'_>,
    reason: &str,
) -> anyhow::Result<()> {
    let mut headers = OwnedHeaders::new_with_capacity(5);
    if let Some(original) = message.headers() {
        for header in original.iter() {
            headers = headers.insert(Header { key: header.key, value: header.value });
        }
    }
    let origin = format!("{}/{}/{}", message.topic(), message.partition(), message.offset());
    headers = headers
        .insert(Header { key: "dead_letter_reason", value: Some(reason) })
        .insert(Header { key: "dead_letter_worker", value: Some(worker.name()) })
        .insert(Header { key: "dead_letter_origin", value: Some(origin.as_str()) });
    let topic = kafka.dead_letter_topic();
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(value) = message.payload() {
        record = record.payload(value);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .context("producing to the dead-letter topic")?;
    Ok(())
}
