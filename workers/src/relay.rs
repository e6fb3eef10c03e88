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
use crate::kafka::{self, CountDeliveries, Deliveries, KafkaConfig};
use anyhow::Context as _;
use futures::TryStreamExt as _;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, Producer as _, PurgeConfig, ThreadedProducer};
use sqlx::postgres::PgConnection;
use sqlx::{ConnectOptions as _, PgPool};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use uuid::Uuid;
use zpanel_commands::postgres::BELOW_HORIZON;
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
        let mut producer: Option<ThreadedProducer<CountDeliveries>> = None;
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
                    acknowledged = acknowledged(in_flight.front()), if !in_flight.is_empty() => {
                        acknowledged?;
                        if producer.as_ref().is_some_and(|p| p.context().lost_every_broker()) {
                            // This batch may have been acknowledged by a broker that came back
                            // empty, into a topic it no longer had.
                            anyhow::bail!("the producer lost every broker");
                        }
                        let batch = in_flight.pop_front().context("no batch in flight")?;
                        acked = batch.last;
                        self.stats.relayed.fetch_add(batch.count as u64, Ordering::Relaxed);
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
                    if let Some(producer) = producer.take() {
                        // Flushing waits on the broker: on a blocking thread, not the runtime's.
                        kafka::close_off_runtime(FlushOnDrop(producer)).await;
                    }
                    // What the broker acknowledged by now moves the checkpoint; the rest is
                    // produced again by the next active relay.
                    while let Some(batch) = in_flight.pop_front() {
                        if !batch.acks.succeeded() {
                            break;
                        }
                        acked = batch.last;
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
                        kafka::close_off_runtime(PurgeOnDrop(old)).await;
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
    async fn enqueue(
        &self,
        producer: &mut Option<ThreadedProducer<CountDeliveries>>,
        batch: Batch,
    ) -> anyhow::Result<InFlight> {
        let last = batch.messages.last().context("an empty batch")?.cursor;
        if producer.as_ref().is_some_and(|p| p.context().lost_every_broker()) {
            anyhow::bail!("the producer lost every broker");
        }
        if producer.is_none() {
            self.kafka.ensure_topics().await?;
            *producer = Some(self.kafka.producer_with(CountDeliveries::default())?);
        }
        let producer = producer.as_ref().context("no producer")?;
        let count = batch.messages.len();
        let acks = Arc::new(Deliveries::new(count));
        for Message { key, envelope, headers, .. } in batch.messages {
            let record = BaseRecord::with_opaque_to(&self.kafka.topic, Arc::clone(&acks))
                .key(&batch.bytes[key])
                .payload(&batch.bytes[envelope])
                .headers(headers);
            kafka::send(producer, record).await?;
        }
        Ok(InFlight { last, count, acks })
    }
}

/// A producer that, dropped, first waits (up to 5 s) for the broker to acknowledge what it holds:
/// the relay's at shutdown.
struct FlushOnDrop(ThreadedProducer<CountDeliveries>);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let _ = self.0.flush(Duration::from_secs(5));
    }
}

/// A producer that, dropped, first purges what it holds, so none of it lands after a new producer
/// starts over: the relay's after a failure.
struct PurgeOnDrop(ThreadedProducer<CountDeliveries>);

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        self.0.purge(PurgeConfig::default().queue().inflight());
    }
}

/// What one turn of the relay's loop did.
enum Step {
    Busy,
    Stop,
}

/// A task reading the log ahead of the relay, batch after batch, into a short queue. It waits
/// for appends when it has read everything, and stops at its first error, which it queues.
///
/// It reads on a connection of its own, not one of the pool's: a `COPY` cut short (the task
/// aborted, a row it cannot parse) leaves the connection mid-copy, and sqlx would give such a
/// connection back to the pool with the copy's last replies still unread, for the next query
/// to take as its own. The task's connection is closed with it instead.
struct Reader {
    batches: mpsc::Receiver<anyhow::Result<Batch>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(pool: PgPool, signal: AppendSignal, after: Cursor) -> Self {
        let (sender, batches) = mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(async move {
            let mut appended = signal.subscribe();
            let mut after = after;
            let mut connection = match pool.connect_options().connect().await {
                Ok(connection) => connection,
                Err(e) => {
                    let _ = sender.send(Err(e).context("connecting to read the log")).await;
                    return;
                }
            };
            loop {
                appended.mark_unchanged();
                let batch = match read_messages(&mut connection, after).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        let _ = sender.send(Err(e)).await;
                        return;
                    }
                };
                if let Some(last) = batch.messages.last() {
                    after = last.cursor;
                    if sender.send(Ok(batch)).await.is_err() {
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

/// Waits until the broker acknowledged every message of `batch` (`None`: never resolves), or
/// refused one. It may be cancelled and called again.
async fn acknowledged(batch: Option<&InFlight>) -> anyhow::Result<()> {
    let Some(batch) = batch else { return std::future::pending().await };
    batch.acks.settled().await
}

/// One read of the log, as the relay produces it: each message's key and envelope lie in one
/// buffer, written once (the producer copies them when it enqueues).
struct Batch {
    bytes: Vec<u8>,
    messages: Vec<Message>,
    /// Whether it stopped before events committed behind a transaction still running.
    held_back: bool,
}

/// One event as the relay produces it. The envelope — the JSON of a [`RecordedEvent`] (a
/// test holds the two to each other) — is written from the row's fields, without decoding the
/// event's payload or metadata and encoding them again.
struct Message {
    cursor: Cursor,
    /// Its stream id, in the batch's bytes.
    key: Range<usize>,
    /// Its envelope, in the batch's bytes.
    envelope: Range<usize>,
    /// Its headers, made with the envelope.
    headers: OwnedHeaders,
}

/// The columns of [`read_messages`]' query, in order.
const COLUMNS: usize = 12;

impl Batch {
    fn new() -> Self {
        Self { bytes: Vec::new(), messages: Vec::with_capacity(BATCH), held_back: false }
    }

    /// Adds the event of a row of [`read_messages`]' query, unless the read is held back.
    fn push(&mut self, row: [&[u8]; COLUMNS]) -> anyhow::Result<()> {
        // Committed after the oldest transaction still running began: later transactions may
        // still commit events before it, so the read ends here.
        if self.held_back || row[11] != [1] {
            self.held_back = true;
            return Ok(());
        }
        let cursor = Cursor { position: int8(row[0])?, tx_id: i64::try_from(u64::from_be_bytes(fixed(row[1])?))? };
        let stream_id = text(row[2])?;
        let event_id = Uuid::from_bytes(fixed(row[4])?);
        let event_type = text(row[5])?;
        let schema_version = u32::try_from(i32::from_be_bytes(fixed(row[6])?))?;
        let team_id = Uuid::from_bytes(fixed(row[7])?);
        let key_start = self.bytes.len();
        self.bytes.extend_from_slice(stream_id.as_bytes());
        let mut envelope = JsonObject::new(&mut self.bytes);
        envelope.number("global_position", cursor.position);
        envelope.number("tx_id", cursor.tx_id);
        envelope.string("stream_id", stream_id)?;
        envelope.number("version", int8(row[3])?);
        envelope.uuid("event_id", event_id);
        envelope.string("event_type", event_type)?;
        envelope.number("schema_version", schema_version);
        envelope.uuid("team_id", team_id);
        envelope.json("payload", row[8]);
        envelope.json("metadata", row[9]);
        envelope.time("recorded_at", timestamp(row[10])?)?;
        envelope.finish();
        self.messages.push(Message {
            cursor,
            key: key_start..key_start + stream_id.len(),
            envelope: key_start + stream_id.len()..self.bytes.len(),
            headers: kafka::headers_of(event_type, event_id, team_id, schema_version),
        });
        Ok(())
    }
}

/// A JSON object written field by field, in the order given, at the end of a buffer: the
/// envelope's keys are fixed (so written unescaped), its JSON columns copied as they are.
struct JsonObject<'a> {
    bytes: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonObject<'a> {
    fn new(bytes: &'a mut Vec<u8>) -> Self {
        Self { bytes, first: true }
    }

    fn key(&mut self, key: &str) {
        self.bytes.push(if self.first { b'{' } else { b',' });
        self.first = false;
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
        Ok(serde_json::to_writer(&mut *self.bytes, value)?)
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
        value.format_into(&mut *self.bytes, &Rfc3339)?;
        self.bytes.push(b'"');
        Ok(())
    }

    fn finish(self) {
        self.bytes.push(b'}');
    }
}

/// A column of a fixed size, in PostgreSQL's binary form.
fn fixed<const N: usize>(field: &[u8]) -> anyhow::Result<[u8; N]> {
    field.try_into().with_context(|| format!("a column of the log is {} bytes, not {N}", field.len()))
}

/// A `bigint` column.
fn int8(field: &[u8]) -> anyhow::Result<i64> {
    Ok(i64::from_be_bytes(fixed(field)?))
}

/// A `text` column (UTF-8: the database's encoding).
fn text(field: &[u8]) -> anyhow::Result<&str> {
    std::str::from_utf8(field).context("a text column of the log is not UTF-8")
}

/// A `timestamptz` column: microseconds since 2000-01-01 UTC.
fn timestamp(field: &[u8]) -> anyhow::Result<OffsetDateTime> {
    const POSTGRES_EPOCH_MICROS: i128 = 946_684_800_000_000;
    let micros = i128::from(int8(field)?) + POSTGRES_EPOCH_MICROS;
    OffsetDateTime::from_unix_timestamp_nanos(micros * 1000).context("a time of the log out of range")
}

/// The rows of a binary `COPY … to stdout`, fed in chunks cut anywhere: PostgreSQL's documented
/// format is a signature and a header, then per row its field count and each field's length
/// and bytes, then a field count of -1.
#[derive(Default)]
struct CopyRows {
    /// The bytes of a row not yet complete.
    pending: Vec<u8>,
    started: bool,
    ended: bool,
}

/// The signature a binary `COPY` starts with.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyRows {
    /// Passes each row completed by `chunk` to `row`.
    fn feed(&mut self, chunk: &[u8], row: impl FnMut([&[u8]; COLUMNS]) -> anyhow::Result<()>) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            let used = self.parse(chunk, row)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(chunk);
            let used = self.parse(&pending, row)?;
            pending.drain(..used);
            self.pending = pending;
        }
        Ok(())
    }

    /// Passes the complete rows at the start of `data` to `row`; returns how many bytes they took.
    fn parse(
        &mut self,
        data: &[u8],
        mut row: impl FnMut([&[u8]; COLUMNS]) -> anyhow::Result<()>,
    ) -> anyhow::Result<usize> {
        let mut rest = data;
        if !self.started {
            let Some(signature) = take(&mut rest, COPY_SIGNATURE.len()) else { return Ok(0) };
            anyhow::ensure!(signature == COPY_SIGNATURE, "the log's copy does not start with the binary signature");
            let Some(header) = take(&mut rest, 8) else { return Ok(0) };
            let extension = usize::try_from(u32::from_be_bytes(fixed(&header[4..])?))?;
            if take(&mut rest, extension).is_none() {
                return Ok(0);
            }
            self.started = true;
        }
        let mut used = data.len() - rest.len();
        while !self.ended {
            let mut cursor = rest;
            let Some(count) = take(&mut cursor, 2) else { break };
            let count = i16::from_be_bytes(fixed(count)?);
            if count == -1 {
                self.ended = true;
                rest = cursor;
                used = data.len() - rest.len();
                break;
            }
            anyhow::ensure!(usize::try_from(count) == Ok(COLUMNS), "a row of the log's copy has {count} columns");
            let mut fields: [&[u8]; COLUMNS] = [&[]; COLUMNS];
            let mut complete = true;
            for field in &mut fields {
                let Some(length) = take(&mut cursor, 4) else {
                    complete = false;
                    break;
                };
                let length = i32::from_be_bytes(fixed(length)?);
                let length = usize::try_from(length).context("a column of the log is null")?;
                let Some(bytes) = take(&mut cursor, length) else {
                    complete = false;
                    break;
                };
                *field = bytes;
            }
            if !complete {
                break;
            }
            row(fields)?;
            rest = cursor;
            used = data.len() - rest.len();
        }
        Ok(used)
    }

    /// Checks that the copy ended whole.
    fn finish(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.ended && self.pending.is_empty(), "the log's copy ended early");
        Ok(())
    }
}

/// The first `n` bytes of `data`, which then starts after them; `None` when it is shorter.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = data.split_at_checked(n)?;
    *data = tail;
    Some(head)
}

/// Like [`zpanel_commands::postgres::read_all_on`], the log after `after` in gap-safe order, at
/// most [`BATCH`] events, as messages. It is read as a binary `COPY`, whose rows the relay parses
/// as they arrive while PostgreSQL still sends the rest: without sqlx's row stream and its
/// per-column decoding, the relay's side of the read costs about a quarter less than a
/// `select`'s (PostgreSQL's about a tenth more; see ADR 0007). `payload` and `metadata` are selected as
/// `json`, whose binary form is its text: a `::text` cast made the server convert both for every
/// row (a fifth of its time per event).
async fn read_messages(connection: &mut PgConnection, after: Cursor) -> anyhow::Result<Batch> {
    // `COPY` takes no parameters: the cursor, two integers of the relay's own, is written in.
    let statement = format!(
        "copy (select global_position, tx_id, stream_id, stream_position, event_id, event_type,
                      schema_version, team_id, payload, metadata, recorded_at, {BELOW_HORIZON}
                 from events
                where (tx_id, global_position) > ('{}'::xid8, {})
                order by events.tx_id, events.global_position
                limit {BATCH})
           to stdout (format binary)",
        after.tx_id, after.position
    );
    let mut chunks = connection.copy_out_raw(&statement).await.context("reading the log")?;
    let mut batch = Batch::new();
    let mut rows = CopyRows::default();
    while let Some(chunk) = chunks.try_next().await.context("reading the log")? {
        rows.feed(&chunk, |row| batch.push(row))?;
    }
    rows.finish()?;
    Ok(batch)
}

/// A batch on its way to the broker.
struct InFlight {
    last: Cursor,
    /// Its messages.
    count: usize,
    acks: Arc<Deliveries>,
}

/// Enqueues `events` on `producer` in order (encoded as [`kafka::encode`] does), then waits
/// until the broker acknowledged them all.
///
/// # Errors
/// The first message refused.
pub async fn produce_in_order(
    producer: &ThreadedProducer<CountDeliveries>,
    topic: &str,
    events: &[RecordedEvent],
) -> anyhow::Result<()> {
    let deliveries = Arc::new(Deliveries::new(events.len()));
    for event in events {
        let value = kafka::encode(event)?;
        let record = BaseRecord::with_opaque_to(topic, Arc::clone(&deliveries))
            .key(event.stream_id.as_bytes())
            .payload(value.as_slice())
            .headers(kafka::headers(event));
        kafka::send(producer, record).await?;
    }
    deliveries.settled().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary `COPY` of `rows`, as PostgreSQL writes it.
    fn copy_of(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut bytes = COPY_SIGNATURE.to_vec();
        bytes.extend_from_slice(&0_u32.to_be_bytes()); // flags
        bytes.extend_from_slice(&3_u32.to_be_bytes()); // a header extension of three bytes
        bytes.extend_from_slice(b"ext");
        for row in rows {
            bytes.extend_from_slice(&i16::try_from(row.len()).expect("a field count").to_be_bytes());
            for field in row {
                match field {
                    Some(field) => {
                        bytes.extend_from_slice(&i32::try_from(field.len()).expect("a field length").to_be_bytes());
                        bytes.extend_from_slice(field);
                    }
                    None => bytes.extend_from_slice(&(-1_i32).to_be_bytes()),
                }
            }
        }
        bytes.extend_from_slice(&(-1_i16).to_be_bytes());
        bytes
    }

    /// Rows of twelve fields of different lengths, the empty one among them.
    fn sample_rows() -> Vec<Vec<Option<Vec<u8>>>> {
        (0..3_u8)
            .map(|row| (0..12_u8).map(|field| Some(vec![row * 16 + field; usize::from(field * row)])).collect())
            .collect()
    }

    /// The rows read from `chunks`, fed one after another.
    fn read(chunks: &[&[u8]]) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
        let mut rows = CopyRows::default();
        let mut read = Vec::new();
        for chunk in chunks {
            rows.feed(chunk, |row| {
                read.push(row.iter().map(|field| field.to_vec()).collect());
                Ok(())
            })?;
        }
        rows.finish()?;
        Ok(read)
    }

    #[test]
    fn copy_rows_are_read_whole_wherever_the_chunks_are_cut() {
        let rows = sample_rows();
        let wanted: Vec<Vec<Vec<u8>>> =
            rows.iter().map(|row| row.iter().map(|field| field.clone().expect("no nulls")).collect()).collect();
        let copy = copy_of(&rows);
        assert_eq!(read(&[&copy]).expect("the rows"), wanted);
        for cut in 0..=copy.len() {
            let (head, tail) = copy.split_at(cut);
            assert_eq!(read(&[head, tail]).expect("the rows"), wanted, "cut at byte {cut}");
        }
        let bytes: Vec<&[u8]> = copy.chunks(1).collect();
        assert_eq!(read(&bytes).expect("the rows"), wanted, "byte by byte");
    }

    #[test]
    fn a_copy_cut_short_a_null_or_another_format_is_an_error() {
        let copy = copy_of(&sample_rows());
        let error = read(&[&copy[..copy.len() - 1]]).expect_err("an error");
        assert!(error.to_string().contains("ended early"), "{error}");

        let mut rows = sample_rows();
        rows[1][4] = None;
        let error = read(&[&copy_of(&rows)]).expect_err("an error");
        assert!(error.to_string().contains("is null"), "{error}");

        rows[1].pop();
        let error = read(&[&copy_of(&rows)]).expect_err("an error");
        assert!(error.to_string().contains("has 11 columns"), "{error}");

        let error = read(&[b"COPY 1\nsomething else"]).expect_err("an error");
        assert!(error.to_string().contains("binary signature"), "{error}");
    }
}
