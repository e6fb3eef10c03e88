//! The subcommands.

use crate::config::Config;
use crate::database::Database;
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zpanel_commands::postgres::{BELOW_HORIZON, EVENT_COLUMNS, event_from_row, read_all_on};
use zpanel_commands::{
    Actor, AppendSignal, CommandContext, CommandHandler, Cursor, Keyring, PgEventStore, RecordedEvent,
};
use zpanel_domain::api_token::{ApiToken, ApiTokenCommand};
use zpanel_domain::ids::{ApiTokenId, TeamId};
use zpanel_domain::team::{Team, TeamCommand};
use zpanel_domain::values::{Abilities, Ability, Name};
use zpanel_projections::ProjectionRunner;

/// Zpanel: a self-hosted platform-as-a-service control plane.
#[derive(Debug, clap::Parser)]
#[command(name = "zpanel", version, about)]
pub struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run Zpanel: the GraphQL API, the projections and the workers (with the Kafka relay
    /// when ZPANEL_KAFKA_BROKERS is set; fed from the log in-process otherwise).
    Serve,
    /// Run the GraphQL API and the projections, without workers.
    Api,
    /// Run the workers (and a relay, active or standing by) without the API.
    Worker {
        /// Only these workers (comma-separated). Known: deploy (deployment leases: lapsed ones
        /// are taken over). Default: all.
        #[arg(long, value_delimiter = ',', value_name = "WORKER,…")]
        only: Vec<String>,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Rebuild read models from the event log.
    Replay {
        /// Only this projection (repeatable). Default: all.
        #[arg(long = "projection", value_name = "NAME")]
        projections: Vec<String>,
    },
    /// Read the event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Create a team and print a root API token for it (shown once, on the last line).
    Bootstrap {
        /// The team's name.
        #[arg(long)]
        team: String,
    },
    /// Manage the master keys that seal secrets.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Ask a running Zpanel process whether it is up: `GET URL` (its `/healthz`), exit 0 on a
    /// `200`. For container health checks: Zpanel's image has no HTTP client of its own.
    Health {
        /// What to ask, e.g. `http://127.0.0.1:8080/healthz`.
        url: String,
    },
    /// Measure Zpanel against baselines on this machine (figures for docs/BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        command: crate::bench::BenchCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
enum EventsCommand {
    /// Print the newest events, and with --follow every event after them as it is recorded.
    Tail {
        /// Keep printing new events until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// How many of the newest events to print first.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: i64,
    },
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Put a new key in front of the key file: new seals use it, old seals still open.
    Rotate,
}

/// Runs the command line until done or `shutdown` resolves.
///
/// # Errors
/// Whatever the subcommand fails with.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command {
        Command::Serve => serve(&config, true, shutdown).await,
        Command::Api => serve(&config, false, shutdown).await,
        Command::Worker { only } => worker(&config, &only, shutdown).await,
        Command::Migrate => {
            let db = Database::open(&config, 2).await?;
            println!("migrations applied");
            db.close().await;
            Ok(())
        }
        Command::Replay { projections } => with_database(&config, 8, |db| replay(db, projections)).await,
        Command::Events { command: EventsCommand::Tail { follow, lines } } => {
            with_database(&config, 4, |db| tail(db, follow, lines, shutdown)).await
        }
        Command::Bootstrap { team } => {
            // A fresh install gets its master key here, before anything could need sealing.
            Keyring::load(config.master_key.as_deref(), &config.data_dir)?;
            with_database(&config, 4, |db| bootstrap(db, team)).await
        }
        Command::Keys { command: KeysCommand::Rotate } => {
            anyhow::ensure!(
                config.master_key.is_none(),
                "ZPANEL_MASTER_KEY is set: rotate by putting a new key in front of that list"
            );
            Keyring::load(None, &config.data_dir)?;
            let id = Keyring::rotate_file(&config.data_dir)?;
            println!("new master key {id} seals from now on; older keys still open what they sealed");
            Ok(())
        }
        Command::Health { url } => health(&url).await,
        Command::Bench { command } => crate::bench::run(&config, command).await,
    }
}

async fn health(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let response = client.get(url).send().await.with_context(|| format!("asking {url}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url} answered {status}: {}", body.trim());
    println!("{}", body.trim());
    Ok(())
}

async fn with_database<F, Fut>(config: &Config, connections: u32, f: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let db = Arc::new(Database::open(config, connections).await?);
    let result = f(Arc::clone(&db)).await;
    if let Ok(db) = Arc::try_unwrap(db) {
        db.close().await;
    }
    result
}

async fn serve(config: &Config, with_workers: bool, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    // Fail early on a bad master key rather than at the first secret.
    let keyring = Keyring::load(config.master_key.as_deref(), &config.data_dir)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listening on {} (ZPANEL_LISTEN)", config.listen))?;
    let metrics = match config.metrics_listen.trim() {
        "" => None,
        listen => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen} (ZPANEL_METRICS_LISTEN)"))?,
        ),
    };
    let db = Database::open(config, 32).await?;
    let signal = AppendSignal::new();
    let bridge = signal.bridge(db.pool.clone()).await?;
    let settings = crate::app::ApiSettings {
        rate: zpanel_api::limits::RateLimiter::new(config.api_rate, config.api_burst),
        subscription_buffer: config.subscription_buffer,
        limits: config.api_limits(),
        metrics,
        git_local_roots: config.git_local_roots(),
        tenancy: config.tenancy()?,
    };
    let keyring = Arc::new(keyring);
    let places = config.deploy().places();
    let container_logs = crate::app::EngineLogs::new(db.pool.clone(), signal.clone(), &keyring, &places)?;
    let mut app =
        crate::app::start(db.pool.clone(), signal.clone(), keyring, listener, settings, Some(container_logs))?;
    if with_workers {
        let metrics = Arc::clone(&app.state.metrics);
        let keyring = Arc::clone(&app.state.keyring);
        let mode = config.worker_mode(true);
        crate::app::start_workers(&mut app.parts, &db.pool, &signal, &keyring, &mode, Some(&metrics))?;
    }
    tracing::info!(address = %app.address, "zpanel is running");
    // Tests and scripts read where each listener is from these lines; the API's comes last.
    if let Some(metrics) = app.metrics_address {
        println!("metrics on http://{metrics}/metrics");
    }
    println!("listening on http://{}", app.address);
    let result = app.run_until(shutdown).await;
    bridge.abort();
    db.close().await;
    result
}

async fn worker(config: &Config, only: &[String], shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let mut mode = config.worker_mode(true);
    if !only.is_empty() {
        for name in only {
            anyhow::ensure!(
                crate::app::WORKERS.contains(&name.as_str()),
                "--only {name}: no such worker; known: {}",
                crate::app::WORKERS.join(", ")
            );
        }
        mode.only = Some(only.to_vec());
    }
    let keyring = Arc::new(Keyring::load(config.master_key.as_deref(), &config.data_dir)?);
    let db = Database::open(config, 16).await?;
    let signal = AppendSignal::new();
    let bridge = signal.bridge(db.pool.clone()).await?;
    let mut parts = crate::app::Parts::new();
    let metrics = Arc::new(zpanel_api::metrics::Metrics::default());
    crate::app::start_workers(&mut parts, &db.pool, &signal, &keyring, &mode, Some(&metrics))?;
    if let Some(listen) = &config.worker_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen} (ZPANEL_WORKER_LISTEN)"))?;
        println!("metrics on http://{}/metrics", listener.local_addr()?);
        let router =
            axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        let metrics = Arc::clone(&metrics);
                        async move {
                            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render(""))
                        }
                    }),
                )
                .route("/healthz", axum::routing::get(|| async { "ok" }));
        parts.spawn("the worker's metrics", move |until| zpanel_api::serve(listener, router, until));
    }
    let mode = if config.kafka().is_some() { "from Kafka" } else { "from the log" };
    tracing::info!(mode, "zpanel worker is running");
    println!("worker running, fed {mode}");
    let result = parts.run_until(shutdown).await;
    bridge.abort();
    db.close().await;
    result
}

async fn replay(db: Arc<Database>, names: Vec<String>) -> anyhow::Result<()> {
    let all = zpanel_projections::all();
    let known: Vec<&str> = all.iter().map(|p| p.name()).collect();
    for name in &names {
        anyhow::ensure!(
            known.contains(&name.as_str()),
            "--projection {name}: no such projection; known: {}",
            known.join(", ")
        );
    }
    let selected: Vec<_> =
        all.into_iter().filter(|p| names.is_empty() || names.iter().any(|n| n == p.name())).collect();
    let chosen: Vec<&str> = selected.iter().map(|p| p.name()).collect();
    let total: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&db.pool).await?;
    let bar = ProgressBar::new(u64::try_from(total).unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template("{spinner} replaying [{bar:40}] {pos}/{len} events, {per_sec}, eta {eta}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let rebuilt = zpanel_projections::rebuild::rebuild(&db.pool, selected.clone(), |n| bar.set_position(n)).await?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let (indexes, indexing) = rebuilt.indexes;
    println!(
        "replayed {} events into {} in {secs:.2}s ({:.0} events/s; {indexes} indexes created again in {:.2}s)",
        rebuilt.events,
        chosen.join(", "),
        rebuilt.events as f64 / secs.max(f64::EPSILON),
        indexing.as_secs_f64()
    );
    Ok(())
}

fn print_event(event: &RecordedEvent) {
    let at = event.recorded_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    println!(
        "{:>8} {at} {} v{} {} by {} {}",
        event.global_position,
        event.stream_id,
        event.version,
        event.event_type,
        event.metadata.actor.name,
        event.payload.as_str()
    );
}

async fn tail(db: Arc<Database>, follow: bool, lines: i64, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // The newest events below the safe horizon: the cursor after them misses nothing later.
    // One more than asked is read, so that `-n 0` still learns where the log ends.
    let rows = sqlx::query(&format!(
        "select {EVENT_COLUMNS} from events where {BELOW_HORIZON}
          order by events.tx_id desc, events.global_position desc limit $1"
    ))
    .bind(lines.max(0) + 1)
    .fetch_all(&db.pool)
    .await?;
    let mut newest: Vec<RecordedEvent> = rows.iter().map(event_from_row).collect::<anyhow::Result<_>>()?;
    newest.reverse();
    let cursor = newest.last().map_or(Cursor::START, RecordedEvent::cursor);
    let skip = newest.len().saturating_sub(usize::try_from(lines.max(0))?);
    newest.iter().skip(skip).for_each(print_event);
    if !follow {
        return Ok(());
    }
    eprintln!("-- following new events (Ctrl-C to stop)");
    let mut cursor = cursor;
    let signal = AppendSignal::new();
    let bridge = signal.bridge(db.pool.clone()).await?;
    let mut appended = signal.subscribe();
    tokio::pin!(shutdown);
    loop {
        appended.mark_unchanged();
        let batch = read_all_on(&db.pool, cursor, 500).await?;
        for event in &batch.events {
            print_event(event);
            cursor = event.cursor();
        }
        if !batch.events.is_empty() {
            continue;
        }
        let wait = if batch.held_back { Duration::from_millis(5) } else { Duration::from_millis(500) };
        tokio::select! {
            () = &mut shutdown => break,
            _ = appended.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    bridge.abort();
    Ok(())
}

async fn bootstrap(db: Arc<Database>, team: String) -> anyhow::Result<()> {
    let name = Name::parse(&team).map_err(|e| anyhow::anyhow!("--team: {e}"))?;
    let store = PgEventStore::new(db.pool.clone(), AppendSignal::new());
    let handler = CommandHandler::new(store);
    let team_id = TeamId::new();
    let actor = Actor::system("bootstrap");
    let ctx = CommandContext::new(team_id, actor.clone(), "cli");
    handler
        .execute::<Team>(&ctx, *team_id.as_uuid(), &TeamCommand::CreateTeam { id: team_id, name })
        .await
        .map_err(|e| anyhow::anyhow!("creating the team: {e}"))?;
    let generated = zpanel_commands::tokens::generate();
    let token_id = ApiTokenId::new();
    let root = Abilities::new([Ability::Root]);
    let command = ApiTokenCommand::CreateApiToken {
        id: token_id,
        team_id,
        name: Name::parse("bootstrap root token").map_err(|e| anyhow::anyhow!("{e}"))?,
        abilities: root.clone(),
        token_hash: generated.hash.clone(),
        expires_at: None,
        creator_abilities: root,
        creator_expires_at: None,
        now: time::OffsetDateTime::now_utc(),
    };
    let ctx = CommandContext::new(team_id, actor, "cli");
    let outcome = handler
        .execute::<ApiToken>(&ctx, *token_id.as_uuid(), &command)
        .await
        .map_err(|e| anyhow::anyhow!("creating the root token: {e}"))?;
    // The token works once the read models show it: project here, so it works the moment it is
    // printed, whether or not a server is running (projecting is safe from several processes).
    let last = outcome.events.last().map(RecordedEvent::cursor).context("the token command recorded nothing")?;
    let runner = ProjectionRunner::new(db.pool.clone(), zpanel_projections::all());
    runner.register().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        runner.catch_up().await?;
        let behind = runner.checkpoints().await?.iter().any(|(_, at)| *at < last);
        if !behind {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the read models did not catch up with the new token in 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("team {team_id} created; its root API token (shown once, store it now):");
    println!("{}", generated.token.expose());
    Ok(())
}
