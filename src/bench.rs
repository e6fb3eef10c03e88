//! `zpanel bench`: Zpanel's hot paths measured beside a baseline on the same server, in the same
//! run. Each benchmark works in a database of its own (created and dropped here) on the
//! configured server or the private cluster, so real data is never touched.

mod api;
mod deploy;
mod ssh;
mod workers;

use crate::config::Config;
use crate::database::Database;
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zpanel_commands::sample::{self, HandlerSink, Shape};
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, Cursor, Keyring, PgEventStore};
use zpanel_domain::application::{Application, ApplicationCommand, EnvValue};
use zpanel_domain::ids::TeamId;
use zpanel_domain::team::{Team, TeamCommand};
use zpanel_domain::values::EnvKey;
use zpanel_domain::values::Name;
use zpanel_projections::ProjectionRunner;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Append throughput of single-event commands on distinct streams, beside raw
    /// single-row inserts with a commit each.
    Append {
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Rebuild of every projection from a log of N events, beside one `select` of the same rows.
    Replay {
        /// Events in the log.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Rebuild only these projections (comma-separated names); all by default.
        #[arg(long, value_delimiter = ',')]
        projections: Vec<String>,
    },
    /// GraphQL `applications(first: 50)` throughput over HTTP, beside a trivial axum handler.
    Api {
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Many concurrent `events` subscriptions: memory per subscriber and delivery latency.
    Subscriptions {
        /// Subscriptions.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Mutations whose delivery is timed.
        #[arg(long, default_value_t = 10)]
        events: usize,
    },
    /// (Internal) the subscribing side of `bench subscriptions`.
    #[command(hide = true)]
    SubscribeClients {
        /// The API's URL.
        #[arg(long)]
        url: String,
        /// Subscriptions to open.
        #[arg(long)]
        count: usize,
        /// Deliveries to report.
        #[arg(long)]
        events: usize,
    },
    /// The relay's throughput to Kafka (ZPANEL_KAFKA_BROKERS), beside a plain producer sending
    /// the same messages to the same broker.
    Relay {
        /// Events in the log. Shorter runs time mostly the producers' start (a plain producer's
        /// first 100,000 messages go into librdkafka's queue at once), not their steady state.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// Command commit → worker handler start at a steady rate: in-process, and through Kafka
    /// when ZPANEL_KAFKA_BROKERS is set.
    Workers {
        /// Commands per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds to run each mode.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// A commit deployed by Zpanel (queued → the new page served through Caddy), beside the
    /// same steps by hand with git, docker and Caddy's admin API, alternating.
    Deploy {
        /// Counted rounds (after one of warm-up), each a deployment by either side.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Resident memory of this process (API, projections, deploy worker) idle, before any
    /// application and with N image applications deployed.
    IdleMemory {
        /// Applications to deploy.
        #[arg(long, default_value_t = 50)]
        apps: usize,
    },
    /// A Docker API call (`version`) through a server's pooled SSH connection, beside the local
    /// socket, one SSH round trip and a fresh `ssh host docker version` (starts its own sshd).
    Ssh {
        /// Timed calls per way.
        #[arg(long, default_value_t = 2000)]
        calls: usize,
        /// Timed runs of the `ssh` process.
        #[arg(long, default_value_t = 20)]
        fresh: usize,
    },
    /// Projection lag (command committed → read model shows it) at a steady command rate,
    /// beside the commit latency of the commands themselves.
    Lag {
        /// Commands per second.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Seconds to run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

/// Runs one benchmark.
///
/// # Errors
/// When the database fails.
pub async fn run(config: &Config, command: BenchCommand) -> anyhow::Result<()> {
    if let BenchCommand::SubscribeClients { url, count, events } = &command {
        return api::subscribe_clients(url, *count, *events).await;
    }
    if let BenchCommand::Ssh { calls, fresh } = &command {
        return ssh::latency(&config.docker_host, *calls, *fresh).await;
    }
    let server = Database::open(config, 2).await?;
    let name = format!("zpanel_bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("create database {name}"))
        .execute(&server.pool)
        .await
        .context("creating the bench database")?;
    let pool = zpanel_commands::db::connect(server.options.clone().database(&name), 40).await?;
    zpanel_commands::db::migrate(&pool).await?;
    let result = match command {
        BenchCommand::Append { clients, seconds } => append(&pool, clients, Duration::from_secs(seconds)).await,
        BenchCommand::Replay { events, projections } => replay(&pool, events, &projections).await,
        BenchCommand::Lag { rate, seconds } => lag(&pool, rate, Duration::from_secs(seconds)).await,
        BenchCommand::Api { clients, seconds } => api::queries(&pool, clients, Duration::from_secs(seconds)).await,
        BenchCommand::Subscriptions { count, events } => api::subscriptions(&pool, count, events).await,
        BenchCommand::Relay { events } => match config.kafka() {
            Some(kafka) => workers::relay(&pool, &kafka, events).await,
            None => Err(anyhow::anyhow!(
                "bench relay needs a broker: set ZPANEL_KAFKA_BROKERS (e.g. start `tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/`)"
            )),
        },
        BenchCommand::Workers { rate, seconds } => {
            workers::latency(&pool, config.kafka().as_ref(), rate, Duration::from_secs(seconds)).await
        }
        BenchCommand::Deploy { rounds } => deploy::overhead(config, &pool, rounds).await,
        BenchCommand::IdleMemory { apps } => deploy::idle_memory(config, &pool, apps).await,
        BenchCommand::SubscribeClients { .. } | BenchCommand::Ssh { .. } => Ok(()),
    };
    pool.close().await;
    let _ = sqlx::query(&format!("drop database {name}")).execute(&server.pool).await;
    server.close().await;
    result
}

/// Runs `op` from `clients` tasks for `duration`; returns completed operations per second.
async fn throughput<F, Fut>(clients: usize, duration: Duration, op: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (op, done, stop) = (Arc::clone(&op), Arc::clone(&done), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    op().await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

async fn append(pool: &PgPool, clients: usize, duration: Duration) -> anyhow::Result<()> {
    sqlx::query("create table bench_raw (id bigint generated always as identity primary key, payload jsonb not null)")
        .execute(pool)
        .await?;
    let handler = CommandHandler::new(PgEventStore::new(pool.clone(), AppendSignal::new()));
    let name = Name::parse("Bench team").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut raw_rates = Vec::new();
    let mut zpanel_rates = Vec::new();
    // Round 0 warms both up (connections, caches, the first extensions of tables and indexes)
    // and is not counted. Then alternate the two, so drift of the machine favours neither.
    for round in 0..4 {
        let raw_pool = pool.clone();
        let raw = throughput(clients, duration / 2, move || {
            let pool = raw_pool.clone();
            async move {
                sqlx::query("insert into bench_raw (payload) values ($1)")
                    .bind(serde_json::json!({ "name": "Bench team" }))
                    .execute(&pool)
                    .await?;
                Ok(())
            }
        })
        .await?;
        let handler = handler.clone();
        let name = name.clone();
        let zpanel = throughput(clients, duration / 2, move || {
            let handler = handler.clone();
            let name = name.clone();
            async move {
                let id = TeamId::new();
                let ctx = CommandContext::new(id, Actor::system("bench"), "bench");
                handler
                    .execute::<Team>(&ctx, *id.as_uuid(), &TeamCommand::CreateTeam { id, name })
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(())
            }
        })
        .await?;
        if round == 0 {
            println!("warm-up: raw insert+commit {raw:.0}/s, zpanel command {zpanel:.0}/s");
            continue;
        }
        println!("round {round}: raw insert+commit {raw:.0}/s, zpanel command {zpanel:.0}/s");
        raw_rates.push(raw);
        zpanel_rates.push(zpanel);
    }
    let raw = raw_rates.iter().sum::<f64>() / raw_rates.len() as f64;
    let zpanel = zpanel_rates.iter().sum::<f64>() / zpanel_rates.len() as f64;
    println!(
        "| append, {clients} clients | raw insert+commit {raw:.0}/s | zpanel {zpanel:.0}/s | ratio {:.2} (target ≥ 0.60) |",
        zpanel / raw
    );
    Ok(())
}

async fn replay(pool: &PgPool, events: u64, only: &[String]) -> anyhow::Result<()> {
    let bar = ProgressBar::new(events);
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec}")?.progress_chars("=> "));
    bar.set_message("writing the log");
    let written = sample::write_log(pool, events, |n| bar.inc(n)).await?;
    bar.finish_and_clear();
    sqlx::query("vacuum analyze events").execute(pool).await?;

    let projections: Vec<_> = zpanel_projections::all()
        .into_iter()
        .filter(|p| only.is_empty() || only.iter().any(|n| n == p.name()))
        .collect();
    anyhow::ensure!(!projections.is_empty(), "no projection named {}", only.join(", "));
    // Three rounds, each the baseline then the rebuild: this machine's figures drift by ±15 %
    // from one run to the next, so the median of three says more than one.
    let (mut raw_rates, mut rates) = (Vec::new(), Vec::new());
    for round in 1..=3 {
        // Baseline: read the same rows, all columns, with one select.
        let started = Instant::now();
        let sql = format!(
            "select {} from events order by events.tx_id, events.global_position",
            zpanel_commands::postgres::EVENT_COLUMNS
        );
        let mut rows = sqlx::query(&sql).fetch(pool);
        let mut read = 0u64;
        while let Some(row) = futures::TryStreamExt::try_next(&mut rows).await? {
            std::hint::black_box(&row);
            read += 1;
        }
        drop(rows);
        let raw = read as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let rebuilt = zpanel_projections::rebuild::rebuild(pool, projections.clone(), |_| {}).await?;
        let secs = started.elapsed().as_secs_f64();
        anyhow::ensure!(rebuilt.events == written, "replayed {} of {written} events", rebuilt.events);
        let rate = rebuilt.events as f64 / secs;
        let busy: Vec<String> =
            rebuilt.busy.iter().map(|(name, busy)| format!("{name} {:.1}s", busy.as_secs_f64())).collect();
        println!(
            "round {round}: raw select {raw:.0} rows/s, rebuild {rate:.0} events/s ({secs:.1}s; busy: {}; {} indexes in {:.1}s)",
            busy.join(", "),
            rebuilt.indexes.0,
            rebuilt.indexes.1.as_secs_f64()
        );
        raw_rates.push(raw);
        rates.push(rate);
    }
    raw_rates.sort_by(f64::total_cmp);
    rates.sort_by(f64::total_cmp);
    println!(
        "| replay of {written} events, all projections (median of 3) | raw select {:.0} rows/s | zpanel {:.0} events/s | target ≥ 30000 events/s |",
        raw_rates[1], rates[1]
    );
    Ok(())
}

/// How long the lag load runs before it is measured.
const WARM_UP: Duration = Duration::from_secs(5);

async fn lag(pool: &PgPool, rate: u64, duration: Duration) -> anyhow::Result<()> {
    let signal = AppendSignal::new();
    let handler = CommandHandler::new(PgEventStore::new(pool.clone(), signal.clone()));
    let runner = ProjectionRunner::new(pool.clone(), zpanel_projections::all());
    runner.register().await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let runner = runner.clone();
        let signal = signal.clone();
        tokio::spawn(async move {
            runner
                .run(signal, async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    let total = rate * (WARM_UP + duration).as_secs();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(usize::try_from(total)?);
    // A team with 500 applications; the load sets variables on them (each application sees a
    // command a second, as a busy installation might) and creates teams.
    let keyring = Keyring::generate();
    let shape = Shape { applications: 500, variables: 0, updates: 0, deployments: 0 };
    let team = sample::team(&mut HandlerSink(&handler), &keyring, shape, "Lag").await?;
    runner.catch_up().await?;
    for i in 0..total {
        ticker.tick().await;
        let handler = handler.clone();
        let mut projected = runner.projected();
        // A stride through the applications, so consecutive commands hit different streams.
        let app = team.applications[usize::try_from(i * 7)? % team.applications.len()];
        let team_id = team.team_id;
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let cursor = lag_command(&handler, team_id, app, i).await?;
            let committed = Instant::now();
            projected.wait_for(|c| *c >= cursor).await?;
            anyhow::Ok((committed - sent, committed.elapsed()))
        }));
    }
    // The first seconds warm up (connections open, statements are prepared, caches fill) and
    // are not counted: the target is about the steady state.
    let warm_up = usize::try_from(rate * WARM_UP.as_secs())?;
    let mut commits = Vec::with_capacity(tasks.len());
    let mut lags = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.into_iter().enumerate() {
        let (commit, lag) = task.await??;
        if i >= warm_up {
            commits.push(commit);
            lags.push(lag);
        }
    }
    let _ = stop_tx.send(());
    running.await??;
    let (c50, c99) = percentiles(&mut commits);
    let (l50, l99) = percentiles(&mut lags);
    println!(
        "| projection lag at {rate} commands/s, {} commands after {}s of warm-up | command commit p50 {:.1} ms, p99 {:.1} ms | lag p50 {:.1} ms, p99 {:.1} ms | target p99 ≤ 50 ms |",
        commits.len(),
        WARM_UP.as_secs(),
        ms(c50),
        ms(c99),
        ms(l50),
        ms(l99)
    );
    Ok(())
}

/// One command of the lag load: mostly variable changes on existing applications, every fifth
/// a new team. Returns the log position of its last event.
async fn lag_command(
    handler: &CommandHandler<PgEventStore>,
    team: TeamId,
    app: zpanel_domain::ids::ApplicationId,
    i: u64,
) -> anyhow::Result<Cursor> {
    let outcome_events = if i.is_multiple_of(5) {
        let id = TeamId::new();
        let ctx = CommandContext::new(id, Actor::system("bench"), "bench");
        let name = Name::parse(&format!("Lag team {i}")).map_err(|e| anyhow::anyhow!("{e}"))?;
        handler
            .execute::<Team>(&ctx, *id.as_uuid(), &TeamCommand::CreateTeam { id, name })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .events
    } else {
        let ctx = CommandContext::new(team, Actor::system("bench"), "bench");
        let command = ApplicationCommand::SetEnvironmentVariable {
            key: EnvKey::parse(&format!("LAG_{i}")).map_err(|e| anyhow::anyhow!("{e}"))?,
            value: EnvValue::Plain(i.to_string()),
            build_time: false,
        };
        handler.execute::<Application>(&ctx, *app.as_uuid(), &command).await.map_err(|e| anyhow::anyhow!("{e}"))?.events
    };
    outcome_events.last().map(|e| e.cursor()).context("the command recorded no event")
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples.get(((samples.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    (at(0.50), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
