//! The relay: the event log, read with the gap-safe cursor, produced to Kafka in log order.
//!
//! The log is the outbox. A command never waits for the broker; the relay follows the log
//! and moves its checkpoint (`relay:<topic>` in `checkpoints`) only after the broker has
//! acknowledged every event up to it. When the broker is away the relay retries with backoff
//! from the last event the broker acknowledged, so nothing is lost; an event may be produced
//! twice across an outage or a crash (consumers keep an inbox), but one stream's events are
//! never produced out of order: batches are enqueued in log order on an idempotent producer,
//! and after a failure every batch not yet acknowledged is produced again whole, in order, by
//! a new producer.
//!
//! At most one relay per topic is active ([`Exclusive`]): the others wait on its lock as hot
//! standbys.

use crate::backoff::Backoff;
use crate::exclusive::Exclusive;
use crate::kafka::{self, KafkaConfig};
use anyhow::Context as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _, PurgeConfig};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use uuid::Uuid;
use zpanel_commands::{AppendSignal, Cursor, RecordedEvent};

/// Events enqueued, and acknowledged, per batch.
const BATCH: usize = 4000;
/// Batches enqueued ahead of the oldest one still waiting for its acknowledgements.
const IN_FLIGHT: usize = 8;
/// Batches read ahead of the one being enqueued.
const READ_AHEAD: usize = 2;
/// How often a busy relay stores its checkpoint (an idle one stores it at once): after a crash,
/// the events acknowledged since are produced again (consumers keep an inbox).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
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
    ///
    /// Three things overlap: a reader task reads the log ahead into a short queue, this loop
    /// enqueues its batches on the producer (up to [`IN_FLIGHT`] batches not yet all
    /// acknowledged), and meanwhile it awaits the oldest batch's acknowledgements. The
    /// checkpoint follows the acknowledgements: stored at most every [`CHECKPOINT_EVERY`] while
    /// the relay is busy, and at once when it has nothing left to do or stops.
    async fn relay_holding(
        &self,
        lock: &mut Exclusive,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<()> {
        let name = self.checkpoint_name();
        let mut stored = lock.checkpoint().await?;
        // The newest event the broker acknowledged, with every event before it.
        let mut acked = stored;
        let mut last_store = Instant::now();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut reader = Reader::start(self.pool.clone(), self.signal.clone(), acked);
        let mut producer: Option<FutureProducer> = None;
        let mut backoff = Backoff::new();
        loop {
            let step = async {
                tokio::select! {
                    biased;
                    () = &mut *shutdown => Ok(Step::Stop),
                    batch = reader.batches.recv(), if in_flight.len() < IN_FLIGHT => {
                        let batch = batch.context("the log reader stopped")??;
                        in_flight.push_back(self.enqueue(&mut producer, batch).await?);
                        Ok(Step::Busy)
                    }
                    acknowledged = acknowledged(in_flight.front_mut()), if !in_flight.is_empty() => {
                        acknowledged?;
                        let batch = in_flight.pop_front().context("no batch in flight")?;
                        acked = batch.last;
                        self.stats.relayed.fetch_add(batch.deliveries.len() as u64, Ordering::Relaxed);
                        let idle = in_flight.is_empty() && reader.batches.is_empty();
                        if idle || last_store.elapsed() >= CHECKPOINT_EVERY {
                            // Written through the lock's connection: if it is gone, so may be the lock.
                            Exclusive::store(&name, lock.connection(), acked).await?;
                            stored = acked;
                            last_store = Instant::now();
                        }
                        anyhow::Ok(Step::Busy)
                    }
                }
            };
            match step.await {
                Ok(Step::Busy) => backoff.reset(),
                Ok(Step::Stop) => {
                    if let Some(producer) = &producer {
                        let _ = producer.flush(Duration::from_secs(5));
                    }
                    // What the broker acknowledged by now moves the checkpoint; the rest is
                    // produced again by the next active relay.
                    while let Some(batch) = in_flight.front_mut() {
                        if !batch.settled() {
                            break;
                        }
                        acked = batch.last;
                        in_flight.pop_front();
                    }
                    if acked != stored {
                        Exclusive::store(&name, lock.connection(), acked).await?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_ms = backoff.next().as_millis(),
                        "relaying failed; producing again after the last acknowledged event"
                    );
                    // A new producer: the old one's queued and in-flight messages are purged
                    // first, so none of them lands after the new one starts over.
                    in_flight.clear();
                    if let Some(old) = producer.take() {
                        old.purge(PurgeConfig::default().queue().inflight());
                    }
                    if backoff.wait(shutdown).await {
                        return Ok(());
                    }
                    if acked != stored {
                        Exclusive::store(&name, lock.connection(), acked).await?;
                        stored = acked;
                    }
                    reader = Reader::start(self.pool.clone(), self.signal.clone(), acked);
                }
            }
        }
    }

    /// Enqueues `batch` (not empty) on the producer in log order, starting the producer first
    /// if needed.
    async fn enqueue(&self, producer: &mut Option<FutureProducer>, batch: Vec<Message>) -> anyhow::Result<InFlight> {
        let last = batch.last().context("an empty batch")?.cursor;
        if producer.is_none() {
            self.kafka.ensure_topics().await?;
            *producer = Some(self.kafka.producer()?);
        }
        let producer = producer.as_ref().context("no producer")?;
        let mut deliveries = Vec::with_capacity(batch.len());
        for Message { stream_id, envelope, headers, .. } in batch {
            let record = FutureRecord::to(&self.kafka.topic)
                .key(stream_id.as_str())
                .payload(envelope.as_slice())
                .headers(headers);
            deliveries.push(enqueue(producer, record).await?);
        }
        Ok(InFlight { last, deliveries, acknowledged: 0 })
    }
}

/// What one turn of the relay's loop did.
enum Step {
    Busy,
    Stop,
}

/// A task reading the log ahead of the relay, batch after batch, into a short queue. It waits
/// for appends when it has read everything, and stops at its first error, which it queues.
struct Reader {
    batches: mpsc::Receiver<anyhow::Result<Vec<Message>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(pool: PgPool, signal: AppendSignal, after: Cursor) -> Self {
        let (sender, batches) = mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(async move {
            let mut appended = signal.subscribe();
            let mut after = after;
            loop {
                appended.mark_unchanged();
                let batch = match read_messages(&pool, after).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        let _ = sender.send(Err(e)).await;
                        return;
                    }
                };
                if let Some(last) = batch.messages.last() {
                    after = last.cursor;
                    if sender.send(Ok(batch.messages)).await.is_err() {
                        return;
                    }
                } else if batch.held_back {
                    // Committed events wait behind a running transaction: look again soon.
                    tokio::time::sleep(HELD_BACK_RETRY).await;
                } else {
                    tokio::select! {
                        _ = appended.changed() => {}
                        () = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
            }
        });
        Self { batches, task }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the broker acknowledged every message of `batch` (`None`: never resolves). It
/// may be cancelled and called again: each acknowledgement is counted as it arrives.
async fn acknowledged(batch: Option<&mut InFlight>) -> anyhow::Result<()> {
    let Some(batch) = batch else { return std::future::pending().await };
    while let Some(delivery) = batch.deliveries.get_mut(batch.acknowledged) {
        match delivery.await {
            Ok(Ok(_)) => batch.acknowledged += 1,
            Ok(Err((e, _))) => return Err(e).context("the broker did not acknowledge an event"),
            Err(_) => anyhow::bail!("the producer dropped a delivery"),
        }
    }
    Ok(())
}

/// One event as the relay produces it. The envelope — the JSON of a [`RecordedEvent`] (a
/// test holds the two to each other) — is written from the row's text, without decoding the
/// event's payload or metadata and encoding them again.
struct Message {
    cursor: Cursor,
    stream_id: String,
    envelope: Vec<u8>,
    /// Its headers, made with the envelope.
    headers: OwnedHeaders,
}

impl Message {
    /// From a row of [`read_messages`]' query, whose columns it reads by position. The types
    /// are that query's, so they are not checked again for every row; the JSON columns are
    /// copied as the server sent them (valid UTF-8 in a UTF-8 database).
    fn from_row(row: &PgRow) -> anyhow::Result<Self> {
        let cursor = Cursor { position: row.try_get_unchecked(0)?, tx_id: xid8(row, 1)? };
        let stream_id: &str = row.try_get_unchecked(2)?;
        let version: i64 = row.try_get_unchecked(3)?;
        let event_id: Uuid = row.try_get_unchecked(4)?;
        let event_type: &str = row.try_get_unchecked(5)?;
        let schema_version = u32::try_from(row.try_get_unchecked::<i32, _>(6)?)?;
        let team_id: Uuid = row.try_get_unchecked(7)?;
        let payload = raw(row, 8)?;
        let metadata = raw(row, 9)?;
        let recorded_at: OffsetDateTime = row.try_get_unchecked(10)?;
        // The envelope's fixed part (keys, numbers, ids, the time) is under 320 bytes.
        let mut envelope =
            JsonObject::with_capacity(payload.len() + metadata.len() + stream_id.len() + event_type.len() + 320);
        envelope.number("global_position", cursor.position);
        envelope.number("tx_id", cursor.tx_id);
        envelope.string("stream_id", stream_id)?;
        envelope.number("version", version);
        envelope.uuid("event_id", event_id);
        envelope.string("event_type", event_type)?;
        envelope.number("schema_version", schema_version);
        envelope.uuid("team_id", team_id);
        envelope.json("payload", payload);
        envelope.json("metadata", metadata);
        envelope.time("recorded_at", recorded_at)?;
        let envelope = envelope.finish();
        let headers = kafka::headers_of(event_type, event_id, team_id, schema_version);
        Ok(Self { cursor, stream_id: stream_id.to_owned(), envelope, headers })
    }
}

/// A JSON object written field by field, in the order given: the envelope's keys are fixed
/// (so written unescaped), its JSON columns copied as they are.
struct JsonObject {
    bytes: Vec<u8>,
}

impl JsonObject {
    fn with_capacity(capacity: usize) -> Self {
        Self { bytes: Vec::with_capacity(capacity) }
    }

    fn key(&mut self, key: &str) {
        self.bytes.push(if self.bytes.is_empty() { b'{' } else { b',' });
        self.bytes.push(b'"');
        self.bytes.extend_from_slice(key.as_bytes());
        self.bytes.extend_from_slice(b"\":");
    }

    fn number(&mut self, key: &str, value: impl itoa::Integer) {
        self.key(key);
        self.bytes.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn string(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        self.key(key);
        Ok(serde_json::to_writer(&mut self.bytes, value)?)
    }

    fn uuid(&mut self, key: &str, value: Uuid) {
        self.key(key);
        self.bytes.push(b'"');
        self.bytes.extend_from_slice(value.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
        self.bytes.push(b'"');
    }

    /// A value that is JSON already.
    fn json(&mut self, key: &str, value: &[u8]) {
        self.key(key);
        self.bytes.extend_from_slice(value);
    }

    /// A time as RFC 3339, as a [`RecordedEvent`]'s `recorded_at` is serialised.
    fn time(&mut self, key: &str, value: OffsetDateTime) -> anyhow::Result<()> {
        self.key(key);
        self.bytes.push(b'"');
        value.format_into(&mut self.bytes, &Rfc3339)?;
        self.bytes.push(b'"');
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes.push(b'}');
        self.bytes
    }
}

/// An `xid8` column (its binary form: 8 bytes, big-endian), as the cursor keeps it. Read from
/// the row's bytes, not through `::text::bigint`, which costs the server two conversions a row.
fn xid8(row: &PgRow, index: usize) -> anyhow::Result<i64> {
    let bytes: [u8; 8] =
        raw(row, index)?.try_into().with_context(|| format!("column {index} of the log is not an xid8"))?;
    i64::try_from(u64::from_be_bytes(bytes)).context("a transaction id beyond i64")
}

/// A column's bytes as the server sent them (binary format; for `json`, its text).
fn raw(row: &PgRow, index: usize) -> anyhow::Result<&[u8]> {
    row.try_get_raw(index)?.as_bytes().map_err(|e| anyhow::anyhow!("reading column {index} of the log: {e}"))
}

/// One read of the log.
struct MessageBatch {
    messages: Vec<Message>,
    /// Whether it stopped before events committed behind a transaction still running.
    held_back: bool,
}

/// Like [`zpanel_commands::postgres::read_all_on`], the log after `after` in gap-safe order, at
/// most [`BATCH`] events, as messages. The rows are decoded as they arrive, while PostgreSQL
/// still sends the rest; the snapshot's horizon is taken once per query (an init plan), not
/// once per row.
async fn read_messages(pool: &PgPool, after: Cursor) -> anyhow::Result<MessageBatch> {
    let mut rows = sqlx::query(
        "select global_position, tx_id, stream_id, stream_position, event_id, event_type,
                schema_version, team_id, payload::text, metadata::text, recorded_at,
                tx_id < (select pg_snapshot_xmin(pg_current_snapshot()))
           from events
          where (tx_id, global_position) > ($1::text::xid8, $2)
          order by events.tx_id, events.global_position
          limit $3",
    )
    .bind(after.tx_id.to_string())
    .bind(after.position)
    .bind(BATCH as i64)
    .fetch(pool);
    let mut batch = MessageBatch { messages: Vec::with_capacity(BATCH), held_back: false };
    while let Some(row) = futures::TryStreamExt::try_next(&mut rows).await.context("reading the log")? {
        // Committed after the oldest transaction still running began: later transactions
        // may still commit events before it, so the read ends here.
        if !row.try_get_unchecked::<bool, _>(11)? {
            batch.held_back = true;
            break;
        }
        batch.messages.push(Message::from_row(&row)?);
    }
    Ok(batch)
}

/// A batch on its way to the broker.
struct InFlight {
    last: Cursor,
    deliveries: Vec<DeliveryFuture>,
    /// How many of `deliveries`, from the first, the broker acknowledged.
    acknowledged: usize,
}

impl InFlight {
    /// Whether every message was acknowledged, looking without waiting.
    fn settled(&mut self) -> bool {
        let waker = futures::task::noop_waker();
        let mut context = std::task::Context::from_waker(&waker);
        while let Some(delivery) = self.deliveries.get_mut(self.acknowledged) {
            match std::pin::Pin::new(delivery).poll(&mut context) {
                std::task::Poll::Ready(Ok(Ok(_))) => self.acknowledged += 1,
                _ => return false,
            }
        }
        true
    }
}

/// Enqueues one record; a full queue is drained by waiting a little.
async fn enqueue(producer: &FutureProducer, mut record: FutureRecord<'_, str, [u8]>) -> anyhow::Result<DeliveryFuture> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e).context("enqueueing an event for Kafka"),
        }
    }
}

/// Enqueues `events` on `producer` in order (encoded as [`kafka::encode`] does), then waits
/// until the broker acknowledged them all.
///
/// # Errors
/// The first delivery that failed.
pub async fn produce_in_order(producer: &FutureProducer, topic: &str, events: &[RecordedEvent]) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(events.len());
    for event in events {
        let value = kafka::encode(event)?;
        let record = FutureRecord::to(topic)
            .key(event.stream_id.as_str())
            .payload(value.as_slice())
            .headers(kafka::headers(event));
        deliveries.push(enqueue(producer, record).await?);
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
