//! The relay and the worker runtime against real PostgreSQL and a real Kafka-compatible broker
//! (tansu on loopback): order per stream, broker outages, the inbox, retries and giving up,
//! dead letters, a shared consumer group, and leases taken over from a dead worker. The runtime
//! tests run in both delivery modes: from the log in-process, and through Kafka.

use futures::future::BoxFuture;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::producer::FutureRecord;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use uuid::Uuid;
use zpanel_commands::sample::{self, HandlerSink, SampleTeam, Shape};
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, Keyring, PgEventStore, RecordedEvent};
use zpanel_domain::application::{Application, ApplicationCommand, EnvValue};
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentReason};
use zpanel_domain::ids::DeploymentId;
use zpanel_domain::values::EnvKey;
use zpanel_tests::TestDatabase;
use zpanel_tests::kafka::Broker;
use zpanel_workers::lease::{LeaseKeeper, LeaseSupervisor};
use zpanel_workers::{Delivery, Handler, HandlerError, KafkaConfig, Relay, Retry, Worker};

const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole log.
async fn read_log(pool: &sqlx::PgPool) -> Vec<RecordedEvent> {
    let store = PgEventStore::new(pool.clone(), AppendSignal::new());
    let mut all = Vec::new();
    let mut after = zpanel_commands::Cursor::START;
    // Every event the test appended is committed; the gap-safe read holds committed events back
    // while any older transaction of the cluster is open (other tests' databases share it), so
    // it is read until nothing is held back.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let batch = zpanel_commands::EventStore::read_all(&store, after, 1000).await.expect("read log");
        let Some(last) = batch.events.last() else {
            if !batch.held_back {
                return all;
            }
            assert!(Instant::now() < deadline, "the log stayed held back behind an open transaction");
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        after = last.cursor();
        all.extend(batch.events);
    }
}

struct Env {
    db: TestDatabase,
    signal: AppendSignal,
    handler: CommandHandler<PgEventStore>,
    team: SampleTeam,
}

async fn env(applications: usize) -> Env {
    let db = TestDatabase::create().await.expect("database");
    let signal = AppendSignal::new();
    let handler = CommandHandler::new(PgEventStore::new(db.pool.clone(), signal.clone()));
    let shape = Shape { applications, variables: 0, updates: 0, deployments: 0 };
    let team = sample::team(&mut HandlerSink(&handler), &Keyring::generate(), shape, "Workers").await.expect("team");
    Env { db, signal, handler, team }
}

impl Env {
    fn ctx(&self) -> CommandContext {
        CommandContext::new(self.team.team_id, Actor::system("test"), "test")
    }

    /// Sets a variable on application `app`: one event on its stream.
    async fn set_variable(&self, app: usize, value: &str) {
        let command = ApplicationCommand::SetEnvironmentVariable {
            key: EnvKey::parse("N").expect("key"),
            value: EnvValue::Plain(value.to_owned()),
            build_time: false,
        };
        let id = *self.team.applications[app].as_uuid();
        self.handler.execute::<Application>(&self.ctx(), id, &command).await.expect("set variable");
    }

    /// Queues a deployment of the first application.
    async fn queue_deployment(&self) -> Uuid {
        let app = *self.team.applications[0].as_uuid();
        let (application, _) = self.handler.load::<Application>(self.team.team_id, app).await.expect("load");
        let id = DeploymentId::new();
        let command = DeploymentCommand::QueueDeployment {
            id,
            application,
            reason: DeploymentReason::Manual,
            image: None,
            release: None,
            now: OffsetDateTime::now_utc(),
        };
        self.handler.execute::<Deployment>(&self.ctx(), *id.as_uuid(), &command).await.expect("queue");
        *id.as_uuid()
    }

    async fn deployment(&self, id: Uuid) -> Deployment {
        self.handler.load::<Deployment>(self.team.team_id, id).await.expect("load deployment").0
    }

    async fn log(&self) -> Vec<RecordedEvent> {
        read_log(&self.db.pool).await
    }

    fn kafka(&self, broker: &Broker) -> KafkaConfig {
        // A topic of this test's own, so tests sharing nothing may share nothing.
        KafkaConfig { topic: format!("t{}", Uuid::now_v7().simple()), ..KafkaConfig::new(&broker.address()) }
    }
}

/// A background task stopped by dropping or by [`Running::stop`] (graceful), or killed by
/// [`Running::kill`] (abrupt: nothing is cleaned up, as when a process dies).
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(BoxFuture<'static, ()>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Self { stop: Some(stop), task }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("no panic").expect("stopped cleanly");
    }

    fn kill(self) {
        self.task.abort();
    }
}

fn relay(env: &Env, kafka: &KafkaConfig) -> Running {
    let relay = Relay::new(env.db.pool.clone(), kafka.clone(), env.signal.clone());
    Running::spawn(move |until| async move { relay.run(until).await })
}

fn run_workers(env: &Env, delivery: &Delivery, workers: Vec<Worker>) -> Running {
    let (pool, delivery) = (env.db.pool.clone(), delivery.clone());
    Running::spawn(move |until| zpanel_workers::run(pool, delivery, workers, until))
}

/// Reads the topic from the start in a group of its own, collecting events by id.
struct Reader {
    consumer: StreamConsumer,
    seen: Vec<RecordedEvent>,
}

impl Reader {
    fn new(kafka: &KafkaConfig, topic: &str) -> Self {
        let consumer = kafka.consumer(&format!("reader-{}", Uuid::now_v7().simple())).expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        Self { consumer, seen: Vec::new() }
    }

    /// Reads until every id in `expected` was seen at least once.
    async fn until_seen(&mut self, expected: &HashSet<Uuid>) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ids: HashSet<Uuid> = self.seen.iter().map(|e| e.event_id).collect();
            if expected.is_subset(&ids) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out: {} of {} events relayed",
                expected.intersection(&ids).count(),
                expected.len()
            );
            if let Ok(message) = tokio::time::timeout(left.min(Duration::from_secs(1)), self.consumer.recv()).await {
                // A restarted broker has no topic until the relay creates it again.
                let Ok(message) = message else { continue };
                let event =
                    zpanel_workers::kafka::decode(message.payload().expect("value")).expect("an event envelope");
                assert_eq!(message.key(), Some(event.stream_id.as_bytes()), "keyed by stream id");
                let header = |name: &str| {
                    message
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == name))
                        .and_then(|h| h.value)
                        .map(<[u8]>::to_vec)
                };
                assert_eq!(header("event_type"), Some(event.event_type.clone().into_bytes()));
                assert_eq!(header("event_id"), Some(event.event_id.to_string().into_bytes()));
                assert_eq!(header("team_id"), Some(event.team_id.to_string().into_bytes()));
                assert_eq!(header("schema_version"), Some(event.schema_version.to_string().into_bytes()));
                self.seen.push(event);
            }
        }
    }
}

/// Every stream's events arrive in stream order (counting each event at its first arrival).
fn assert_ordered_per_stream(seen: &[RecordedEvent]) {
    let mut first = HashSet::new();
    let mut last_version: HashMap<&str, i64> = HashMap::new();
    for event in seen {
        if !first.insert(event.event_id) {
            continue;
        }
        let last = last_version.entry(&event.stream_id).or_insert(0);
        assert_eq!(
            event.version,
            *last + 1,
            "stream {} out of order: {} after {}",
            event.stream_id,
            event.version,
            last
        );
        *last = event.version;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_keeps_each_streams_order_under_concurrent_appends() {
    let env = Arc::new(env(8).await);
    let broker = Broker::start();
    let kafka = env.kafka(&broker);
    let running = relay(&env, &kafka);
    // Eight writers, one per application stream, appending side by side while the relay runs.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let env = Arc::clone(&env);
            tokio::spawn(async move {
                for i in 0..25 {
                    env.set_variable(w, &format!("{w}-{i}")).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let log = env.log().await;
    let mut reader = Reader::new(&kafka, &kafka.topic);
    reader.until_seen(&log.iter().map(|e| e.event_id).collect()).await;
    assert_ordered_per_stream(&reader.seen);
    // Without failures nothing is produced twice.
    let unique: HashSet<Uuid> = reader.seen.iter().map(|e| e.event_id).collect();
    assert_eq!(unique.len(), reader.seen.len(), "duplicates without a failure");
    assert_eq!(reader.seen.len(), log.len());
    // The envelope the relay writes from the row is the recorded event, field for field.
    let by_id: HashMap<Uuid, &RecordedEvent> = log.iter().map(|e| (e.event_id, e)).collect();
    for seen in &reader.seen {
        assert_eq!(Some(&seen), by_id.get(&seen.event_id), "the relayed envelope differs from the log");
    }
    running.stop().await;
    let checkpoint: i64 = sqlx::query_scalar("select position from checkpoints where name = $1")
        .bind(format!("relay:{}", kafka.topic))
        .fetch_one(&env.db.pool)
        .await
        .expect("checkpoint");
    assert_eq!(Some(checkpoint), log.iter().map(|e| e.global_position).max(), "the checkpoint is at the last event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_loses_and_reorders_nothing() {
    let env = env(4).await;
    let mut broker = Broker::start();
    let kafka = env.kafka(&broker);
    let running = relay(&env, &kafka);
    // Consumers in the same process, as `zpanel serve` runs them: they fail, close and start
    // again through the outage, and create the topics as soon as the broker is back.
    let consumers = run_workers(
        &env,
        &Delivery::Kafka(kafka.clone()),
        vec![
            Worker::new("outage-a", Counting::new(&env, &["EnvironmentVariableSet"], 0)),
            Worker::new("outage-b", Counting::new(&env, &["DeploymentQueued"], 0)),
        ],
    );
    for i in 0..20 {
        env.set_variable(i % 4, &format!("before {i}")).await;
    }
    let before: HashSet<Uuid> = env.log().await.iter().map(|e| e.event_id).collect();
    let mut reader = Reader::new(&kafka, &kafka.topic);
    reader.until_seen(&before).await;

    // No outside reader lives across the restart: librdkafka 2.12 crashes (a null topic name in
    // its metadata cache) when a consumer asks the restarted in-memory broker for a topic it forgot.
    let before_outage = std::mem::take(&mut reader.seen);
    drop(reader);
    broker.stop();
    // Commands keep succeeding while the broker is away: the log is the outbox.
    for i in 0..20 {
        env.set_variable(i % 4, &format!("during {i}")).await;
    }
    let during: HashSet<Uuid> = env.log().await.iter().map(|e| e.event_id).filter(|id| !before.contains(id)).collect();
    broker.resume();
    // The restarted broker kept nothing (in-memory storage): a new reader of the new topic finds
    // every event appended during the outage, with nothing appended after it to push them along.
    let mut after = Reader::new(&kafka, &kafka.topic);
    after.until_seen(&during).await;
    for i in 0..20 {
        env.set_variable(i % 4, &format!("after {i}")).await;
    }
    let since: HashSet<Uuid> = env.log().await.iter().map(|e| e.event_id).filter(|id| !before.contains(id)).collect();
    after.until_seen(&since).await;
    assert_ordered_per_stream(&[before_outage, after.seen.clone()].concat());
    running.stop().await;
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_takes_over_when_the_active_one_stops() {
    let env = env(2).await;
    let broker = Broker::start();
    let kafka = env.kafka(&broker);
    let first = Relay::new(env.db.pool.clone(), kafka.clone(), env.signal.clone());
    let second = Relay::new(env.db.pool.clone(), kafka.clone(), env.signal.clone());
    let (first_stats, second_stats) = (first.stats(), second.stats());
    let first = Running::spawn(move |until| async move { first.run(until).await });
    let active = |s: &Arc<zpanel_workers::relay::RelayStats>| s.active.load(std::sync::atomic::Ordering::Relaxed) == 1;
    eventually("the first relay to be active", || async { active(&first_stats).then_some(()) }).await;
    let second = Running::spawn(move |until| async move { second.run(until).await });
    env.set_variable(0, "one").await;
    let mut reader = Reader::new(&kafka, &kafka.topic);
    reader.until_seen(&env.log().await.iter().map(|e| e.event_id).collect()).await;
    assert!(!active(&second_stats), "two relays active at once");

    first.stop().await;
    eventually("the standby to take over", || async { active(&second_stats).then_some(()) }).await;
    env.set_variable(1, "two").await;
    reader.until_seen(&env.log().await.iter().map(|e| e.event_id).collect()).await;
    assert_ordered_per_stream(&reader.seen);
    second.stop().await;
}

/// A handler that counts its calls per event, failing the first `fail_first` calls of each
/// event transiently; giving up fails the deployment the event belongs to, if any.
#[derive(Clone)]
struct Counting {
    types: &'static [&'static str],
    calls: Arc<Mutex<HashMap<Uuid, u32>>>,
    fail_first: u32,
    handler: CommandHandler<PgEventStore>,
}

impl Counting {
    fn new(env: &Env, types: &'static [&'static str], fail_first: u32) -> Self {
        Self { types, calls: Arc::default(), fail_first, handler: env.handler.clone() }
    }

    fn calls(&self, event_id: Uuid) -> u32 {
        self.calls.lock().expect("lock").get(&event_id).copied().unwrap_or(0)
    }

    fn handled(&self) -> usize {
        self.calls.lock().expect("lock").len()
    }
}

impl Handler for Counting {
    fn event_types(&self) -> &[&str] {
        self.types
    }

    fn handle<'a>(&'a self, event: &'a RecordedEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let call = {
                let mut calls = self.calls.lock().expect("lock");
                let call = calls.entry(event.event_id).or_insert(0);
                *call += 1;
                *call
            };
            if call <= self.fail_first {
                return Err(HandlerError::Transient(anyhow::anyhow!("the engine is away (attempt {call})")));
            }
            Ok(())
        })
    }

    fn give_up<'a>(&'a self, event: &'a RecordedEvent, reason: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let Some(id) = event.aggregate_id().filter(|_| event.stream_kind() == "deployment") else { return Ok(()) };
            let ctx = CommandContext::caused_by(event, Actor::worker("test"), "worker", "give up");
            let command = DeploymentCommand::FailDeployment {
                step: None,
                reason: reason.to_owned(),
                now: OffsetDateTime::now_utc(),
            };
            self.handler.execute::<Deployment>(&ctx, id, &command).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
        })
    }
}

/// Both delivery modes for one test: in-process from the log, and through Kafka (with a relay).
struct Mode {
    delivery: Delivery,
    _relay: Option<Running>,
    _broker: Option<Broker>,
}

async fn modes(env: &Env) -> Vec<(&'static str, Mode)> {
    let broker = Broker::start();
    let kafka = env.kafka(&broker);
    let relay = relay(env, &kafka);
    vec![
        ("in-process", Mode { delivery: Delivery::InProcess(env.signal.clone()), _relay: None, _broker: None }),
        ("kafka", Mode { delivery: Delivery::Kafka(kafka), _relay: Some(relay), _broker: Some(broker) }),
    ]
}

async fn inbox(env: &Env, worker: &str) -> i64 {
    sqlx::query_scalar("select count(*) from worker_inbox where worker = $1")
        .bind(worker)
        .fetch_one(&env.db.pool)
        .await
        .expect("inbox")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_delivered_twice_is_handled_once_in_both_modes() {
    for mode_index in 0..2 {
        let env = env(2).await;
        let (label, mode) = modes(&env).await.swap_remove(mode_index);
        let counting = Counting::new(&env, &["EnvironmentVariableSet"], 0);
        let name = format!("counting-{label}");
        let worker = Worker::new(&name, counting.clone());
        let running = run_workers(&env, &mode.delivery, vec![worker.clone()]);
        env.set_variable(0, "a").await;
        env.set_variable(1, "b").await;
        let log = env.log().await;
        let wanted: Vec<&RecordedEvent> = log.iter().filter(|e| e.event_type == "EnvironmentVariableSet").collect();
        eventually(&format!("{label}: both events handled"), || async {
            (inbox(&env, &name).await == 2).then_some(())
        })
        .await;

        // Delivered again: through Kafka as a duplicate message, in-process by a rewound cursor.
        match &mode.delivery {
            Delivery::Kafka(kafka) => {
                let producer =
                    kafka.producer_with(zpanel_workers::kafka::CountDeliveries::default()).expect("producer");
                zpanel_workers::relay::produce_in_order(&producer, &kafka.topic, &[wanted[0].clone()])
                    .await
                    .expect("produce a duplicate");
                // Then something new, so the duplicate is known to be behind us once it is handled.
                env.set_variable(0, "c").await;
                eventually("the next event handled", || async { (inbox(&env, &name).await == 3).then_some(()) }).await;
            }
            Delivery::InProcess(_) => {
                running.stop().await;
                sqlx::query("update checkpoints set tx_id = '0', position = 0 where name = $1")
                    .bind(format!("worker:{name}"))
                    .execute(&env.db.pool)
                    .await
                    .expect("rewind");
                let again = run_workers(&env, &mode.delivery, vec![worker.clone()]);
                env.set_variable(0, "c").await;
                eventually("the next event handled", || async { (inbox(&env, &name).await == 3).then_some(()) }).await;
                again.stop().await;
                assert_eq!(counting.calls(wanted[0].event_id), 1, "{label}: a redelivered event was handled again");
                continue;
            }
        }
        assert_eq!(counting.calls(wanted[0].event_id), 1, "{label}: a redelivered event was handled again");
        assert!(
            worker.stats().duplicates.load(std::sync::atomic::Ordering::Relaxed) >= 1,
            "{label}: duplicate counted"
        );
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_are_retried_then_given_up_as_a_domain_event_in_both_modes() {
    for mode_index in 0..2 {
        let env = env(1).await;
        let (label, mode) = modes(&env).await.swap_remove(mode_index);
        // Fails twice, then succeeds: handled on the third attempt.
        let flaky = Counting::new(&env, &["DeploymentQueued"], 2);
        let retry =
            Retry { attempts: 3, first_backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(50) };
        let recovering = Worker::new(&format!("flaky-{label}"), flaky.clone()).with_retry(retry);
        // Never succeeds: given up after three attempts, as a failed deployment.
        let broken = Counting::new(&env, &["DeploymentQueued"], u32::MAX);
        let failing = Worker::new(&format!("broken-{label}"), broken.clone()).with_retry(retry);
        let running = run_workers(&env, &mode.delivery, vec![recovering, failing.clone()]);

        let deployment = env.queue_deployment().await;
        let failed = eventually(&format!("{label}: the deployment failed"), || async {
            let state = env.deployment(deployment).await;
            state.state().and_then(|d| d.failure.clone())
        })
        .await;
        assert!(failed.reason.contains("the engine is away (attempt 3)"), "{label}: {}", failed.reason);
        assert!(failed.reason.contains("gave up after 3 attempts"), "{label}: {}", failed.reason);
        let queued = env.log().await.into_iter().find(|e| e.event_type == "DeploymentQueued").expect("queued");
        assert_eq!(broken.calls(queued.event_id), 3, "{label}: bounded attempts");
        eventually(&format!("{label}: the flaky worker succeeded"), || async {
            (inbox(&env, &format!("flaky-{label}")).await == 1).then_some(())
        })
        .await;
        assert_eq!(flaky.calls(queued.event_id), 3, "{label}: succeeded on the third attempt");
        assert_eq!(failing.stats().given_up.load(std::sync::atomic::Ordering::Relaxed), 1);
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_in_one_group_share_the_topic_and_handle_each_event_once() {
    let env = env(12).await;
    let broker = Broker::start();
    let kafka = KafkaConfig { partitions: 6, ..env.kafka(&broker) };
    let _relay = relay(&env, &kafka);
    let counting = Counting::new(&env, &["EnvironmentVariableSet"], 0);
    let (one, two) = (Worker::new("shared", counting.clone()), Worker::new("shared", counting.clone()));
    let (one_stats, two_stats) = (one.stats(), two.stats());
    let delivery = Delivery::Kafka(kafka.clone());
    let first = run_workers(&env, &delivery, vec![one]);
    let second = run_workers(&env, &delivery, vec![two]);
    let handled = |s: &Arc<zpanel_workers::WorkerStats>| s.handled.load(std::sync::atomic::Ordering::Relaxed);
    // Keep appending across the applications until both members have handled some.
    let mut sent = 0;
    let deadline = Instant::now() + DEADLINE;
    while handled(&one_stats) == 0 || handled(&two_stats) == 0 {
        assert!(Instant::now() < deadline, "one member never got a partition");
        env.set_variable(sent % 12, &sent.to_string()).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("every event handled", || async { (counting.handled() == sent).then_some(()) }).await;
    let calls = counting.calls.lock().expect("lock").clone();
    assert!(calls.values().all(|c| *c == 1), "an event was handled twice: {calls:?}");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_goes_to_the_dead_letter_topic() {
    let env = env(1).await;
    let broker = Broker::start();
    let kafka = env.kafka(&broker);
    kafka.ensure_topics().await.expect("topics");
    let counting = Counting::new(&env, &["EnvironmentVariableSet"], 0);
    let worker = Worker::new("poisoned", counting.clone());
    let running = run_workers(&env, &Delivery::Kafka(kafka.clone()), vec![worker.clone()]);
    let producer = kafka.producer().expect("producer");
    producer
        .send(FutureRecord::to(&kafka.topic).key("garbage").payload("{not an event"), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce poison");
    let dead = Reader::new(&kafka, &kafka.dead_letter_topic());
    let message = tokio::time::timeout(DEADLINE, dead.consumer.recv()).await.expect("a dead letter").expect("receive");
    assert_eq!(message.payload(), Some(&b"{not an event"[..]));
    let reason = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "dead_letter_reason").and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("a reason header");
    assert!(reason.contains("decoding an event envelope"), "{reason}");
    assert_eq!(worker.stats().dead_letters.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The partition is not blocked: a real event behind the poison is handled.
    let _relay = relay(&env, &kafka);
    env.set_variable(0, "after the poison").await;
    eventually("the event after the poison handled", || async { (counting.handled() == 1).then_some(()) }).await;
    running.stop().await;
}

/// Takes each queued deployment with a short lease and works on it "forever", renewing.
#[derive(Clone)]
struct LongJob {
    handler: CommandHandler<PgEventStore>,
    worker_id: String,
    lease: Duration,
    keepers: Arc<Mutex<Vec<LeaseKeeper>>>,
}

impl Handler for LongJob {
    fn event_types(&self) -> &[&str] {
        &["DeploymentQueued"]
    }

    fn handle<'a>(&'a self, event: &'a RecordedEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let id = event.aggregate_id().expect("deployment id");
            let ctx = CommandContext::caused_by(event, Actor::worker(&self.worker_id), "worker", "start");
            let now = OffsetDateTime::now_utc();
            let start = DeploymentCommand::StartDeployment {
                worker_id: self.worker_id.clone(),
                lease_until: now + self.lease,
                now,
            };
            self.handler
                .execute::<Deployment>(&ctx, id, &start)
                .await
                .map_err(|e| HandlerError::Permanent(anyhow::anyhow!("{e}")))?;
            let team = zpanel_domain::ids::TeamId::from_uuid(event.team_id);
            let keeper = LeaseKeeper::start(self.handler.clone(), team, id, self.worker_id.clone(), self.lease);
            // The job goes on in the background, holding the lease, as a deploy does.
            self.keepers.lock().expect("lock").push(keeper);
            Ok(())
        })
    }

    fn give_up<'a>(&'a self, _: &'a RecordedEvent, _: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_workers_lease_is_taken_over_and_the_deployment_ends_in_both_modes() {
    for mode_index in 0..2 {
        let env = env(1).await;
        let (label, mode) = modes(&env).await.swap_remove(mode_index);
        // The supervisor finds running deployments in the read model.
        let runner = zpanel_projections::ProjectionRunner::new(env.db.pool.clone(), zpanel_projections::all());
        let signal = env.signal.clone();
        let projections = Running::spawn(move |until| async move { runner.run(signal, until).await });
        let job = LongJob {
            handler: env.handler.clone(),
            worker_id: format!("doomed-{label}"),
            lease: Duration::from_millis(900),
            keepers: Arc::default(),
        };
        let doomed = run_workers(&env, &mode.delivery, vec![Worker::new(&format!("deploy-{label}"), job.clone())]);
        // Another worker's supervisor sweeps all along; it must leave a renewed lease alone.
        let supervisor = LeaseSupervisor::new(env.db.pool.clone(), env.handler.clone(), &format!("rescuer-{label}"));
        let sweeping =
            Running::spawn(move |until| async move { supervisor.run(Duration::from_millis(100), until).await });

        let deployment = env.queue_deployment().await;
        eventually(&format!("{label}: three renewals"), || async {
            let renewals = env.log().await.iter().filter(|e| e.event_type == "DeploymentLeaseRenewed").count();
            (renewals >= 3).then_some(())
        })
        .await;
        let state = env.deployment(deployment).await;
        assert_eq!(
            state.status(),
            Some(zpanel_domain::deployment::DeploymentStatus::Running),
            "{label}: taken while renewed"
        );

        // The worker dies: its tasks end without a word, its lease is no longer renewed.
        doomed.kill();
        job.keepers.lock().expect("lock").clear();
        let failure = eventually(&format!("{label}: the lapsed lease taken over"), || async {
            env.deployment(deployment).await.state().and_then(|d| d.failure.clone())
        })
        .await;
        assert!(
            failure.reason.contains(&format!("worker doomed-{label} stopped renewing its lease")),
            "{}",
            failure.reason
        );
        let log = env.log().await;
        let taken = log.iter().find(|e| e.event_type == "DeploymentTakenOver").expect("a takeover event");
        assert_eq!(taken.metadata.actor.id.as_deref(), Some(format!("rescuer-{label}").as_str()));
        // A job still running for the dead worker learns at its next renewal that it lost the lease.
        let team = env.team.team_id;
        let mut late = LeaseKeeper::start(
            env.handler.clone(),
            team,
            deployment,
            format!("doomed-{label}"),
            Duration::from_millis(300),
        );
        tokio::time::timeout(DEADLINE, late.lost()).await.expect("the keeper tells its job the lease is lost");
        sweeping.stop().await;
        projections.stop().await;
    }
}

/// Sends SIGTERM to `child` and waits for a clean exit.
fn terminate(child: &mut std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_relays_to_kafka_and_a_worker_process_takes_over_when_it_stops() {
    use std::process::Stdio;
    let broker = Broker::start();
    let db = TestDatabase::create().await.expect("database");
    let data = zpanel_tests::TempDir::new();
    let kafka = KafkaConfig { topic: format!("e2e{}", Uuid::now_v7().simple()), ..KafkaConfig::new(&broker.address()) };
    let zpanel = |args: &[&str]| {
        let mut command = zpanel_tests::zpanel(&db, &data.0);
        command.args(args).env("ZPANEL_KAFKA_BROKERS", broker.address()).env("ZPANEL_KAFKA_TOPIC", &kafka.topic);
        command
    };
    let log = || async { read_log(&db.pool).await.iter().map(|e| e.event_id).collect::<HashSet<Uuid>>() };
    let bootstrap = |team: &str| {
        let out = zpanel(&["bootstrap", "--team", team]).output().expect("bootstrap");
        assert!(out.status.success(), "bootstrap: {}", String::from_utf8_lossy(&out.stderr));
    };

    bootstrap("One");
    let mut serve = zpanel(&["serve"]).stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("serve");
    let mut reader = Reader::new(&kafka, &kafka.topic);
    reader.until_seen(&log().await).await;

    // A worker process: its relay stands by while serve's is active.
    let mut worker = zpanel(&["worker"]).stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("worker");
    terminate(&mut serve);
    bootstrap("Two");
    reader.until_seen(&log().await).await;
    assert_ordered_per_stream(&reader.seen);
    terminate(&mut worker);
}

/// `zpanel serve` on Kafka (its workers consuming in-process), with a root token of a team.
async fn serve_on_kafka(broker: &Broker) -> (zpanel_tests::api::App, String, KafkaConfig) {
    let kafka = KafkaConfig { topic: format!("e2e{}", Uuid::now_v7().simple()), ..KafkaConfig::new(&broker.address()) };
    let app = zpanel_tests::api::App::start_with(&[
        ("ZPANEL_KAFKA_BROKERS", &kafka.brokers),
        ("ZPANEL_KAFKA_TOPIC", &kafka.topic),
    ])
    .await;
    let token = app.bootstrap("Outage");
    (app, token, kafka)
}

/// Creates a project through the API.
async fn create_project(app: &zpanel_tests::api::App, token: &str, name: &str) {
    app.graphql(
        Some(token),
        "mutation($name: String!) { createProject(input: { name: $name }) { id } }",
        serde_json::json!({ "name": name }),
    )
    .await
    .ok();
}

/// The events the relay of `app` reports acknowledged.
async fn relayed(app: &zpanel_tests::api::App) -> u64 {
    let (status, metrics) = app.metrics().await;
    assert_eq!(status, 200, "GET /metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("zpanel_relay_events_total{").and_then(|l| l.split_once("} ")))
        .and_then(|(_, n)| n.trim().parse().ok())
        .expect("zpanel_relay_events_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_on_kafka_relays_every_event_appended_while_the_broker_was_away() {
    let mut broker = Broker::start();
    let (app, token, kafka) = serve_on_kafka(&broker).await;
    create_project(&app, &token, "before").await;
    let before: HashSet<Uuid> = read_log(&app.db.pool).await.iter().map(|e| e.event_id).collect();
    eventually("the relay to catch up", || async { (relayed(&app).await >= before.len() as u64).then_some(()) }).await;

    broker.stop();
    // As a user would: a second later, mutations one after another.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..20 {
        create_project(&app, &token, &format!("during {i}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = read_log(&app.db.pool).await;
    let during: HashSet<Uuid> = all.iter().map(|e| e.event_id).filter(|id| !before.contains(id)).collect();
    broker.resume();
    eventually("the relay to report every event acknowledged", || async {
        (relayed(&app).await >= all.len() as u64).then_some(())
    })
    .await;
    // A reader from outside, in a group of its own, finds every event appended during the outage.
    let mut reader = Reader::new(&kafka, &kafka.topic);
    reader.until_seen(&during).await;
}
