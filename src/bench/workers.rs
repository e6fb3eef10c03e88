//! Benchmarks of the relay and the worker runtime: relay throughput beside a plain rdkafka
//! producer sending the same messages to the same broker, and the latency from a command's
//! commit to the start of the worker handler it triggers, in both delivery modes.

use super::{ms, percentiles};
use anyhow::Context as _;
use futures::future::BoxFuture;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::BaseRecord;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;
use zpanel_commands::sample::{self, HandlerSink, Shape};
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, Keyring, PgEventStore, RecordedEvent};
use zpanel_domain::application::{Application, ApplicationCommand, EnvValue};
use zpanel_domain::values::EnvKey;
use zpanel_workers::kafka::{CountDeliveries, Deliveries};
use zpanel_workers::{Delivery, Handler, HandlerError, KafkaConfig, Relay, Worker};

/// How many times the relay benchmark times its rounds in the order plain, counting, relay,
/// relay, counting, plain.
const PAIRS: usize = 2;

fn fresh_topic(kafka: &KafkaConfig, label: &str) -> KafkaConfig {
    KafkaConfig { topic: format!("zpanel.bench.{label}.{}", Uuid::now_v7().simple()), ..kafka.clone() }
}

/// One message as the plain producer sends it: the relay's key, value and header values,
/// encoded beforehand.
struct PlainMessage {
    key: String,
    value: Vec<u8>,
    event_type: String,
    event_id: Uuid,
    team_id: Uuid,
    schema_version: u32,
}

impl PlainMessage {
    fn headers(&self) -> rdkafka::message::OwnedHeaders {
        zpanel_workers::kafka::headers_of(&self.event_type, self.event_id, self.team_id, self.schema_version)
    }
}

/// Relays a log of `events` events, beside a plain producer sending the same messages.
///
/// The broker's state drifts over a run (an in-memory broker gets slower as it fills), so each
/// round writes to topics of its own, deleted after it; and this machine's speed drifts too, so
/// after an untimed round they are timed alternately, in the order plain, counting, relay, relay,
/// counting, plain, [`PAIRS`] times over, and the means of their rounds compared: what drift is
/// left weighs on all alike. The target compares the relay with the plain producer (rdkafka's
/// `FutureProducer`, a future per message); the counting producer sends the same messages the
/// way the relay's producer does, counting deliveries, so beside it the relay's rate shows what
/// reading the log costs alone.
pub(super) async fn relay(pool: &PgPool, kafka: &KafkaConfig, events: u64) -> anyhow::Result<()> {
    let bar = progress(events, "writing the log")?;
    let written = sample::write_log(pool, events, |n| bar.inc(n)).await?;
    bar.finish_and_clear();

    // The same messages (key, value, headers) for the plain producer, encoded beforehand.
    let store = PgEventStore::new(pool.clone(), AppendSignal::new());
    let mut messages = Vec::with_capacity(usize::try_from(written)?);
    let mut after = zpanel_commands::Cursor::START;
    loop {
        let batch = zpanel_commands::EventStore::read_all(&store, after, 10_000).await?;
        let Some(last) = batch.events.last() else { break };
        after = last.cursor();
        for event in batch.events {
            messages.push(PlainMessage {
                value: zpanel_workers::kafka::encode(&event)?,
                key: event.stream_id,
                event_type: event.event_type,
                event_id: event.event_id,
                team_id: event.team_id,
                schema_version: event.schema_version,
            });
        }
    }
    // The first round against a broker is not timed: whichever side ran first would meet a
    // broker that has never held a message.
    plain_round(kafka, &messages).await?;
    let (mut plain, mut counting, mut relay) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PAIRS {
        plain.push(plain_round(kafka, &messages).await?);
        counting.push(counting_round(kafka, &messages).await?);
        relay.push(relay_round(pool, kafka, written).await?);
        relay.push(relay_round(pool, kafka, written).await?);
        counting.push(counting_round(kafka, &messages).await?);
        plain.push(plain_round(kafka, &messages).await?);
    }
    let rates = |rounds: &[f64]| rounds.iter().map(|rate| format!("{rate:.0}")).collect::<Vec<_>>().join(" / ");
    let mean = |rounds: &[f64]| rounds.iter().sum::<f64>() / rounds.len() as f64;
    println!(
        "| relay of {written} events, rounds (after an untimed one) plain, counting, relay, relay, counting, plain ×{PAIRS} | plain producer (warmed up): {} messages/s, mean {:.0} | relay after its first batch: {} events/s, mean {:.0}; ratio **{:.2}** | target ≥ 0.80 × plain |",
        rates(&plain),
        mean(&plain),
        rates(&relay),
        mean(&relay),
        mean(&relay) / mean(&plain)
    );
    println!(
        "| the same messages from a producer counting its deliveries as the relay does (no future per message) | {} messages/s, mean {:.0} | relay / counting producer **{:.2}** | (information) |",
        rates(&counting),
        mean(&counting),
        mean(&relay) / mean(&counting)
    );
    Ok(())
}

/// Sends `messages` from one plain producer to a fresh topic; returns its rate in messages/s.
async fn plain_round<'a>(kafka: &KafkaConfig, messages: &'a [PlainMessage]) -> anyhow::Result<f64> {
    let plain = fresh_topic(kafka, "plain");
    plain.ensure_topics().await?;
    let producer = plain.producer()?;
    let topic = plain.topic.as_str();
    let record = |m: &'a PlainMessage| {
        rdkafka::producer::FutureRecord::to(topic).key(m.key.as_str()).payload(m.value.as_slice()).headers(m.headers())
    };
    // Warmed up: connected, its producer id given, the topic's metadata known — as the relay
    // is once its first batch is acknowledged, from when its rate is timed.
    if let Some(first) = messages.first() {
        producer.send(record(first), Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    }
    let bar = progress(messages.len() as u64, "plain producer")?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(messages.len());
    for message in messages {
        let mut record = record(message);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e).context("the plain producer refused a message"),
            }
        }
    }
    bar.set_position(messages.len() as u64);
    bar.set_message("plain producer: awaiting acknowledgements");
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(producer);
    round_ended("plain producer", &plain, &bar, messages.len(), secs).await
}

/// Sends `messages` to a fresh topic from a producer that counts its deliveries, as the relay's
/// does, instead of taking a future per message; returns its rate in messages/s.
async fn counting_round(kafka: &KafkaConfig, messages: &[PlainMessage]) -> anyhow::Result<f64> {
    let plain = fresh_topic(kafka, "counting");
    plain.ensure_topics().await?;
    let producer = plain.producer_with(CountDeliveries::default())?;
    let send = async |message: &PlainMessage, deliveries: &Arc<Deliveries>| {
        let record = BaseRecord::with_opaque_to(&plain.topic, Arc::clone(deliveries))
            .key(message.key.as_bytes())
            .payload(message.value.as_slice())
            .headers(message.headers());
        zpanel_workers::kafka::send(&producer, record).await
    };
    // Warmed up, as the plain producer is.
    if let Some(first) = messages.first() {
        let warm_up = Arc::new(Deliveries::new(1));
        send(first, &warm_up).await?;
        warm_up.settled().await?;
    }
    let bar = progress(messages.len() as u64, "counting producer")?;
    let started = Instant::now();
    let deliveries = Arc::new(Deliveries::new(messages.len()));
    for message in messages {
        send(message, &deliveries).await?;
    }
    bar.set_position(messages.len() as u64);
    bar.set_message("counting producer: awaiting acknowledgements");
    deliveries.settled().await?;
    let secs = started.elapsed().as_secs_f64();
    drop(producer);
    round_ended("counting producer", &plain, &bar, messages.len(), secs).await
}

/// A producer's round is over after `secs`: its topics deleted, its rate in messages/s.
async fn round_ended(
    name: &str,
    topics: &KafkaConfig,
    bar: &ProgressBar,
    sent: usize,
    secs: f64,
) -> anyhow::Result<f64> {
    bar.finish_and_clear();
    topics.delete_topics().await?;
    println!("{name}: {sent} messages in {secs:.2}s");
    Ok(sent as f64 / secs)
}

/// Relays the whole log to a fresh topic; returns its rate in events/s after its first
/// acknowledged batch.
async fn relay_round(pool: &PgPool, kafka: &KafkaConfig, written: u64) -> anyhow::Result<f64> {
    let relayed_to = fresh_topic(kafka, "relay");
    relayed_to.ensure_topics().await?;
    let relay = Relay::new(pool.clone(), relayed_to.clone(), AppendSignal::new());
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let running = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let bar = progress(written, "relaying")?;
    // The relay's rate is timed from its first acknowledged batch: before that it takes its
    // lock, reads its checkpoint, makes sure of its topics and starts its producer.
    let mut first = None;
    while stats.relayed.load(Ordering::Relaxed) < written {
        let relayed = stats.relayed.load(Ordering::Relaxed);
        if relayed > 0 && first.is_none() {
            first = Some((started.elapsed().as_secs_f64(), relayed));
        }
        bar.set_position(relayed);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let (start_up, first_batch) = first.unwrap_or((0.0, 0));
    bar.finish_and_clear();
    let _ = stop.send(());
    running.await??;
    relayed_to.delete_topics().await?;
    println!(
        "relay: {written} events in {secs:.2}s, first batch acknowledged {start_up:.2}s after start ({:.0} events/s start-up included)",
        written as f64 / secs
    );
    Ok((written - first_batch) as f64 / (secs - start_up))
}

/// A progress bar of `len` steps, named `message`.
fn progress(len: u64, message: &'static str) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec}")?.progress_chars("=> "));
    bar.set_message(message);
    Ok(bar)
}

/// Records when each wanted event's handler started.
#[derive(Clone, Default)]
struct Stopwatch {
    started: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

impl Handler for Stopwatch {
    fn event_types(&self) -> &[&str] {
        &["EnvironmentVariableSet"]
    }

    fn handle<'a>(&'a self, event: &'a RecordedEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        let now = Instant::now();
        if let Ok(mut started) = self.started.lock() {
            started.entry(event.event_id).or_insert(now);
        }
        Box::pin(async { Ok(()) })
    }

    fn give_up<'a>(&'a self, _: &'a RecordedEvent, _: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Commit → handler start at `rate` commands/s for `duration`, in-process and (with a broker)
/// through Kafka.
pub(super) async fn latency(
    pool: &PgPool,
    kafka: Option<&KafkaConfig>,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<()> {
    let signal = AppendSignal::new();
    let handler = CommandHandler::new(PgEventStore::new(pool.clone(), signal.clone()));
    let shape = Shape { applications: 100, variables: 0, updates: 0, deployments: 0 };
    let team = sample::team(&mut HandlerSink(&handler), &Keyring::generate(), shape, "Latency").await?;
    let mut modes = vec![("in-process", Delivery::InProcess(signal.clone()), None)];
    if let Some(kafka) = kafka {
        let kafka = fresh_topic(kafka, "latency");
        kafka.ensure_topics().await?;
        modes.push(("kafka", Delivery::Kafka(kafka.clone()), Some(kafka)));
    }
    for (label, delivery, relay_to) in modes {
        let stopwatch = Stopwatch::default();
        let worker = Worker::new(&format!("bench-latency-{label}"), stopwatch.clone());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        if let Some(kafka) = &relay_to {
            // The topic starts with this mode's load, not with the log the mode before it wrote.
            sqlx::query(
                "insert into checkpoints (name, tx_id, position)
                 select $1, tx_id, global_position from events order by tx_id desc, global_position desc limit 1",
            )
            .bind(Relay::new(pool.clone(), kafka.clone(), signal.clone()).checkpoint_name())
            .execute(pool)
            .await?;
        }
        let relay = relay_to.map(|kafka| {
            let relay = Relay::new(pool.clone(), kafka, signal.clone());
            let until = until();
            tokio::spawn(async move { relay.run(until).await })
        });
        let workers = tokio::spawn(zpanel_workers::run(pool.clone(), delivery, vec![worker], until()));
        // Warm up: the consumer joins its group, connections open.
        let warm = set_variable(&handler, &team, 0, "warm-up").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stopwatch.started.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.contains_key(&warm.0) {
            anyhow::ensure!(Instant::now() < deadline, "{label}: the worker did not start within 60 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        // The first seconds of load warm up (the consumer group settles, connections open) and
        // are not counted, as in `bench lag`.
        let warm_up = rate * super::WARM_UP.as_secs();
        let total = warm_up + rate * duration.as_secs();
        let mut tasks = Vec::with_capacity(usize::try_from(total)?);
        for i in 0..total {
            ticker.tick().await;
            let (handler, team) = (handler.clone(), team.clone());
            tasks.push(tokio::spawn(async move { set_variable(&handler, &team, i as usize, &i.to_string()).await }));
        }
        let mut committed = Vec::with_capacity(tasks.len());
        for (i, task) in tasks.into_iter().enumerate() {
            let done = task.await??;
            if i as u64 >= warm_up {
                committed.push(done);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut latencies = Vec::with_capacity(committed.len());
        for (event_id, at) in &committed {
            let started = loop {
                let found = stopwatch.started.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.get(event_id).copied();
                if let Some(found) = found {
                    break found;
                }
                anyhow::ensure!(Instant::now() < deadline, "{label}: an event was not handled within 60 s");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            latencies.push(started.saturating_duration_since(*at));
        }
        let _ = stop.send(true);
        workers.await??;
        if let Some(relay) = relay {
            relay.await??;
        }
        let (p50, p99) = percentiles(&mut latencies);
        println!(
            "| commit → handler start, {label}, {} commands at {rate}/s after {}s of warm-up | p50 {:.1} ms, p99 {:.1} ms | target p99 ≤ 100 ms in-process |",
            latencies.len(),
            super::WARM_UP.as_secs(),
            ms(p50),
            ms(p99)
        );
    }
    Ok(())
}

/// Sets a variable on the `i`-th application (round robin); returns the event's id and when
/// the command returned (just after its commit).
async fn set_variable(
    handler: &CommandHandler<PgEventStore>,
    team: &sample::SampleTeam,
    i: usize,
    value: &str,
) -> anyhow::Result<(Uuid, Instant)> {
    let app = team.applications[i % team.applications.len()];
    let ctx = CommandContext::new(team.team_id, Actor::system("bench"), "bench");
    let command = ApplicationCommand::SetEnvironmentVariable {
        key: EnvKey::parse("LATENCY").map_err(|e| anyhow::anyhow!("{e}"))?,
        value: EnvValue::Plain(value.to_owned()),
        build_time: false,
    };
    let outcome =
        handler.execute::<Application>(&ctx, *app.as_uuid(), &command).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let at = Instant::now();
    let event = outcome.events.last().context("the command recorded no event")?;
    Ok((event.event_id, at))
}
