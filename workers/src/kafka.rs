//! The Kafka side: where the broker is, the topics, and the clients (rdkafka, bundled
//! librdkafka) the relay and the consumers use.
//!
//! A message is one recorded event: key = stream id (so one aggregate's events share a
//! partition and keep their order), value = the event's JSON envelope, headers = event type,
//! event id, team and schema version (so a consumer can route or drop without decoding).

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, FutureProducer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;
use zpanel_commands::RecordedEvent;

/// The header naming a message's event type.
pub const EVENT_TYPE_HEADER: &str = "event_type";

/// The topic events are relayed to unless configured otherwise.
pub const DEFAULT_TOPIC: &str = "zpanel.events";

/// How long a produced message may wait for the broker before its delivery fails. The relay
/// then starts again from its checkpoint, so this bounds how long an outage goes unnoticed.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the broker is and how the topics are laid out.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// The events topic.
    pub topic: String,
    /// Partitions of the events topic when Zpanel creates it.
    pub partitions: i32,
    /// Replicas of each partition when Zpanel creates a topic.
    pub replication: i32,
}

impl KafkaConfig {
    /// The default layout on `brokers`: `zpanel.events`, 6 partitions, 1 replica.
    #[must_use]
    pub fn new(brokers: &str) -> Self {
        Self { brokers: brokers.to_owned(), topic: DEFAULT_TOPIC.to_owned(), partitions: 6, replication: 1 }
    }

    /// Where messages that cannot be decoded go: `<topic>.dead-letter`.
    #[must_use]
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dead-letter", self.topic)
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("client.id", "zpanel").set("log_level", "4");
        config
    }

    /// An idempotent producer: `acks=all`, retries without duplicates or reordering within
    /// a partition.
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        self.producer_settings().create().context("creating the Kafka producer")
    }

    /// The same producer as [`KafkaConfig::producer`], telling `context` of each delivery
    /// instead of completing a future per message.
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn producer_with<C: ProducerContext + 'static>(&self, context: C) -> anyhow::Result<ThreadedProducer<C>> {
        self.producer_settings().create_with_context(context).context("creating the Kafka producer")
    }

    fn producer_settings(&self) -> ClientConfig {
        let mut config = self.client();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", MESSAGE_TIMEOUT.as_millis().to_string());
        config
    }

    /// A consumer in `group` that commits only the offsets it was given (after handling), in
    /// the background every second — not a request to the broker per message.
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn consumer(&self, group: &str) -> anyhow::Result<StreamConsumer> {
        self.client()
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("creating the Kafka consumer")
    }

    /// Creates the events topic and its dead-letter topic when they are missing (a broker may
    /// not create topics on first produce).
    ///
    /// # Errors
    /// When the broker cannot be reached or refuses.
    pub async fn ensure_topics(&self) -> anyhow::Result<()> {
        let (admin, options) = self.admin()?;
        let dead_letter = self.dead_letter_topic();
        let topics = [
            NewTopic::new(&self.topic, self.partitions, TopicReplication::Fixed(self.replication)),
            NewTopic::new(&dead_letter, 1, TopicReplication::Fixed(self.replication)),
        ];
        let results = admin.create_topics(&topics, &options).await;
        close_off_runtime(admin).await;
        for result in results.context("creating the Kafka topics")? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("the broker refused to create topic {topic}: {code}"),
            }
        }
        Ok(())
    }

    /// Deletes the events topic and its dead-letter topic, where they exist (benchmarks drop
    /// the topics of their rounds with it, so the broker does not keep every round's messages).
    ///
    /// # Errors
    /// When the broker cannot be reached or refuses.
    pub async fn delete_topics(&self) -> anyhow::Result<()> {
        let (admin, options) = self.admin()?;
        let dead_letter = self.dead_letter_topic();
        let results = admin.delete_topics(&[&self.topic, &dead_letter], &options).await;
        close_off_runtime(admin).await;
        for result in results.context("deleting the Kafka topics")? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => anyhow::bail!("the broker refused to delete topic {topic}: {code}"),
            }
        }
        Ok(())
    }

    /// An admin client, and the timeouts of its requests.
    fn admin(&self) -> anyhow::Result<(AdminClient<DefaultClientContext>, AdminOptions)> {
        let admin = self.client().create().context("creating the Kafka admin client")?;
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        Ok((admin, options))
    }
}

/// Drops a librdkafka client (or anything holding one) on a blocking thread, and waits for it.
/// Dropping one blocks the calling thread until librdkafka is done with it: a consumer of a group
/// leaves the group, waiting on its coordinator (for as long as the broker is away), a producer
/// flushes, every client joins its threads. On a runtime thread that would hold up every task
/// queued behind it there — a mutation waiting for its read models among them.
pub async fn close_off_runtime<T: Send + 'static>(client: T) {
    if tokio::task::spawn_blocking(move || drop(client)).await.is_err() {
        tracing::warn!("closing a Kafka client panicked");
    }
}

/// A producer context that counts each delivery report into the [`Deliveries`] its message
/// carries. rdkafka's `FutureProducer` makes a channel and a future for every message; a caller
/// that only needs to know when a group of messages (the relay's batch) is all acknowledged, or
/// the first refused, counts instead.
///
/// It also remembers whether the producer ever lost every broker: see
/// [`CountDeliveries::lost_every_broker`].
#[derive(Debug, Default)]
pub struct CountDeliveries {
    lost_every_broker: AtomicBool,
}

impl CountDeliveries {
    /// Whether the producer lost its connections to every broker since it started. A broker
    /// that comes back may have kept nothing (an in-memory one, a cluster restored empty), and
    /// a producer that lived through that carries on from state the broker no longer has —
    /// sequence numbers, topics it knew: the relay replaces it, and produces again what it had
    /// not had acknowledged before, after making sure of the topics.
    #[must_use]
    pub fn lost_every_broker(&self) -> bool {
        self.lost_every_broker.load(Ordering::Acquire)
    }
}

impl ClientContext for CountDeliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        // Reported on the producer's polling thread in the order of its delivery reports, so
        // every delivery after the loss is seen after the flag.
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            self.lost_every_broker.store(true, Ordering::Release);
        }
        tracing::warn!(error = %error, reason, "the Kafka producer reports an error");
    }
}

impl ProducerContext for CountDeliveries {
    type DeliveryOpaque = Arc<Deliveries>;

    fn delivery(&self, result: &DeliveryResult<'_>, deliveries: Arc<Deliveries>) {
        deliveries.settle(result.as_ref().err().map(|(e, _)| e));
    }
}

/// The delivery reports of a group of messages, counted as the producer's thread receives them.
#[derive(Debug)]
pub struct Deliveries {
    /// Messages not yet acknowledged or refused.
    pending: AtomicUsize,
    /// The first refusal.
    failed: OnceLock<KafkaError>,
    /// Signalled when the last message settles or the first is refused.
    changed: Notify,
}

impl Deliveries {
    /// The reports of `messages` messages, none received yet.
    #[must_use]
    pub fn new(messages: usize) -> Self {
        Self { pending: AtomicUsize::new(messages), failed: OnceLock::new(), changed: Notify::new() }
    }

    /// One message's report: acknowledged, or refused with `error`.
    fn settle(&self, error: Option<&KafkaError>) {
        let first_refusal = error.is_some_and(|e| self.failed.set(e.clone()).is_ok());
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 || first_refusal {
            self.changed.notify_one();
        }
    }

    /// Whether every message was acknowledged, looking without waiting.
    #[must_use]
    pub fn succeeded(&self) -> bool {
        self.failed.get().is_none() && self.pending.load(Ordering::Acquire) == 0
    }

    /// Waits until every message was acknowledged, or one refused. The state is looked at
    /// before each wait (a signal sent before the wait began is kept as a permit), so a
    /// cancelled call loses nothing.
    ///
    /// # Errors
    /// The first refusal.
    pub async fn settled(&self) -> anyhow::Result<()> {
        loop {
            if let Some(e) = self.failed.get() {
                return Err(e.clone()).context("the broker did not acknowledge an event");
            }
            if self.pending.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            self.changed.notified().await;
        }
    }
}

/// Enqueues `record` on `producer`; a full queue is drained by waiting a little.
///
/// # Errors
/// When librdkafka refuses the message for another reason.
pub async fn send(
    producer: &ThreadedProducer<CountDeliveries>,
    mut record: BaseRecord<'_, [u8], [u8], Arc<Deliveries>>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e).context("enqueueing an event for Kafka"),
        }
    }
}

/// The headers of `event`'s message.
#[must_use]
pub fn headers(event: &RecordedEvent) -> OwnedHeaders {
    headers_of(&event.event_type, event.event_id, event.team_id, event.schema_version)
}

/// The headers of an event's message, from its parts.
#[must_use]
pub fn headers_of(event_type: &str, event_id: Uuid, team_id: Uuid, schema_version: u32) -> OwnedHeaders {
    let (mut event_id_text, mut team_id_text, mut number) =
        (Uuid::encode_buffer(), Uuid::encode_buffer(), itoa::Buffer::new());
    OwnedHeaders::new_with_capacity(4)
        .insert(Header { key: EVENT_TYPE_HEADER, value: Some(event_type) })
        .insert(Header { key: "event_id", value: Some(&*event_id.hyphenated().encode_lower(&mut event_id_text)) })
        .insert(Header { key: "team_id", value: Some(&*team_id.hyphenated().encode_lower(&mut team_id_text)) })
        .insert(Header { key: "schema_version", value: Some(number.format(schema_version)) })
}

/// The value of `event`'s message: its JSON envelope.
///
/// # Errors
/// Never for a recorded event; the payload is JSON already.
pub fn encode(event: &RecordedEvent) -> anyhow::Result<Vec<u8>> {
    serde_json::to_vec(event).context("encoding an event for Kafka")
}

/// An event from a message's value.
///
/// # Errors
/// When the value is not an event envelope.
pub fn decode(value: &[u8]) -> anyhow::Result<RecordedEvent> {
    serde_json::from_slice(value).context("decoding an event envelope")
}
