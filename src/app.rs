//! The running parts of `zpanel serve`: the projection runner, the subscription feed and the
//! API server, and the workers (with the relay, in distributed mode), started together over one
//! pool and stopped together. `serve`, `api`, `worker` and the benchmarks run exactly these.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use zpanel_api::ApiState;
use zpanel_api::limits::RateLimiter;
use zpanel_commands::{AppendSignal, CommandHandler, Keyring, PgEventStore};
use zpanel_projections::ProjectionRunner;

/// The parts, running.
#[derive(Debug)]
pub struct App {
    /// What the API handlers share.
    pub state: ApiState,
    /// Where the API listens.
    pub address: SocketAddr,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_address: Option<SocketAddr>,
    /// The parts, the API's among them.
    pub parts: Parts,
}

/// Parts running side by side, stopped together.
#[derive(Debug)]
pub struct Parts {
    stop: watch::Sender<bool>,
    set: JoinSet<anyhow::Result<()>>,
}

impl Default for Parts {
    fn default() -> Self {
        Self::new()
    }
}

impl Parts {
    /// None yet.
    #[must_use]
    pub fn new() -> Self {
        Self { stop: watch::Sender::new(false), set: JoinSet::new() }
    }

    /// Resolves when the parts are told to stop.
    fn until_stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.stop.subscribe();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    }

    /// Runs `part` (given the stop signal) as `what`.
    pub fn spawn<F, Fut>(&mut self, what: &'static str, part: F)
    where
        F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let running = part(Box::pin(self.until_stopped()));
        self.set.spawn(async move { running.await.context(what) });
    }

    /// Runs until `shutdown` resolves or a part stops on its own (which is a failure), then
    /// stops the others and waits for them; open requests and events in hand finish first.
    ///
    /// # Errors
    /// The first part's failure.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let early = tokio::select! {
            () = shutdown => None,
            Some(ended) = self.set.join_next() => Some(ended),
        };
        let _ = self.stop.send(true);
        let mut result = match early {
            None => Ok(()),
            Some(ended) => match ended.context("a part of zpanel panicked") {
                Ok(Ok(())) => Err(anyhow::anyhow!("a part of zpanel stopped on its own")),
                Ok(Err(e)) | Err(e) => Err(e),
            },
        };
        while let Some(ended) = self.set.join_next().await {
            if let Err(e) = ended.context("a part of zpanel panicked").and_then(|r| r) {
                if result.is_ok() {
                    result = Err(e);
                } else {
                    tracing::error!(error = format!("{e:#}"), "stopping zpanel");
                }
            }
        }
        result
    }
}

/// The workers `zpanel worker --only` can choose from.
pub const WORKERS: &[&str] = &["deploy", "server"];

/// How the workers of this process run.
#[derive(Clone, Debug)]
pub struct WorkerMode {
    /// Only these workers (names from [`WORKERS`]); `None`: all.
    pub only: Option<Vec<String>>,
    /// The broker (distributed mode); `None` feeds workers from the log in this process.
    pub kafka: Option<zpanel_workers::KafkaConfig>,
    /// Whether this process runs a relay (an active one, or a standby).
    pub relay: bool,
    /// How often running deployments' leases are checked.
    pub lease_sweep: Duration,
    /// How often validated servers are checked; `None`: only when asked (`runServerCheck`).
    pub server_checks: Option<Duration>,
    pub deploy: zpanel_workers::deploy::DeployConfig,
}

/// Starts the workers in `parts`: the relay (distributed mode), every worker fed by its
/// delivery, and the lease supervisor. Handlers report through commands on `pool`; their
/// counters join `metrics`, when the process serves them.
pub fn start_workers(
    parts: &mut Parts,
    pool: &sqlx::PgPool,
    signal: &AppendSignal,
    keyring: &Arc<Keyring>,
    mode: &WorkerMode,
    metrics: Option<&zpanel_api::metrics::Metrics>,
) -> anyhow::Result<()> {
    let worker_id = zpanel_workers::lease::worker_id();
    let handler = CommandHandler::new(PgEventStore::new(pool.clone(), signal.clone()));
    let runs = |name: &str| mode.only.as_ref().is_none_or(|only| only.iter().any(|o| o == name));
    let mut workers: Vec<zpanel_workers::Worker> = Vec::new();
    let deployer = if runs("deploy") {
        let deployer = zpanel_workers::deploy::Deployer::new(
            pool.clone(),
            handler.clone(),
            Arc::clone(keyring),
            &worker_id,
            mode.deploy.clone(),
        )?;
        workers.push(zpanel_workers::Worker::new("deploy", deployer.clone()));
        Some(deployer)
    } else {
        None
    };
    if runs("server") {
        let validator = zpanel_workers::servers::ServerValidator::new(handler.clone(), Arc::clone(keyring), &worker_id);
        if let Some(every) = mode.server_checks {
            let (checker, pool) = (validator.clone(), pool.clone());
            parts.spawn("the server checks", move |until| async move {
                checker.check_periodically(pool, every, until).await
            });
        }
        workers.push(zpanel_workers::Worker::new("server", validator));
    }
    let stats: Vec<(String, Arc<zpanel_workers::WorkerStats>)> =
        workers.iter().map(|w| (w.name().to_owned(), w.stats())).collect();
    let mut relay_stats = None;
    let delivery = match &mode.kafka {
        Some(kafka) => {
            if mode.relay {
                let relay = zpanel_workers::Relay::new(pool.clone(), kafka.clone(), signal.clone());
                relay_stats = Some((kafka.topic.clone(), relay.stats()));
                parts.spawn("the relay", move |until| async move { relay.run(until).await });
            }
            zpanel_workers::Delivery::Kafka(kafka.clone())
        }
        None => zpanel_workers::Delivery::InProcess(signal.clone()),
    };
    if let Some(metrics) = metrics {
        metrics.add_source(Box::new(move |out| render_worker_metrics(out, &stats, relay_stats.as_ref())));
    }
    let pool_for_workers = pool.clone();
    parts.spawn("the workers", move |until| zpanel_workers::run(pool_for_workers, delivery, workers, until));
    if let Some(deployer) = deployer {
        let supervisor = zpanel_workers::lease::LeaseSupervisor::new(pool.clone(), handler, &worker_id)
            .with_lease(mode.deploy.lease)
            .with_resume(Arc::new(deployer.clone()));
        let every = mode.lease_sweep;
        parts.spawn("the lease supervisor", move |until| async move { supervisor.run(every, until).await });
        let syncing = deployer.clone();
        parts.spawn("the route sync", move |until| async move { syncing.sync_routes(until).await });
        // At shutdown, running deployments stop at their next step and are handed back.
        parts.spawn("the deploy jobs", move |until| async move {
            until.await;
            deployer.shutdown(DEPLOY_SHUTDOWN_PATIENCE).await;
            Ok(())
        });
    }
    Ok(())
}

/// How long a stopping process waits for its deploy jobs to hand their deployments back.
const DEPLOY_SHUTDOWN_PATIENCE: Duration = Duration::from_secs(20);

/// How the API of a process is set up.
#[derive(Debug)]
pub struct ApiSettings {
    /// Per-token request budgets.
    pub rate: RateLimiter,
    /// Responses of a shared `events` subscription buffered for its slowest subscriber.
    pub subscription_buffer: usize,
    /// What one request, token or socket may cost.
    pub limits: zpanel_api::limits::Limits,
    /// Where `/metrics` is served (`None`: nowhere); never the API's own listener.
    pub metrics: Option<tokio::net::TcpListener>,
    /// Where applications may be built from local repositories (`ZPANEL_GIT_LOCAL_ROOTS`).
    pub git_local_roots: zpanel_domain::values::GitLocalRoots,
    /// Reserved host names and validation budgets.
    pub tenancy: zpanel_api::tenancy::Tenancy,
}

/// Starts the projections, the feed, the deployment log listener and the API on `listener`.
/// Appends through the returned state raise `signal`, which wakes the projections at once.
///
/// # Errors
/// When a listener has no address.
pub fn start(
    pool: sqlx::PgPool,
    signal: AppendSignal,
    keyring: Arc<Keyring>,
    listener: tokio::net::TcpListener,
    settings: ApiSettings,
    container_logs: Option<Arc<dyn zpanel_api::logs::ContainerLogs>>,
) -> anyhow::Result<App> {
    let runner = ProjectionRunner::new(pool.clone(), zpanel_projections::all());
    let names: Vec<String> = runner.names().into_iter().map(str::to_owned).collect();
    let feed = zpanel_api::feed::Feed::new(pool.clone(), names, runner.projected());
    let logs = zpanel_api::logs::LogNotifier::new(pool.clone());
    let state = ApiState {
        handler: CommandHandler::new(PgEventStore::new(pool.clone(), signal.clone())),
        pool,
        keyring,
        feed: feed.clone(),
        rate: Arc::new(settings.rate),
        limits: settings.limits,
        subscriptions: Arc::new(zpanel_api::limits::Subscriptions::new(settings.limits.subscriptions_per_token)),
        metrics: Arc::default(),
        token_checks: Arc::default(),
        cache: Arc::default(),
        logs: logs.clone(),
        container_logs,
        subscription_buffer: settings.subscription_buffer,
        git_local_roots: Arc::new(settings.git_local_roots),
        tenancy: Arc::new(settings.tenancy),
    };
    let address = listener.local_addr()?;
    let metrics_address = settings.metrics.as_ref().map(tokio::net::TcpListener::local_addr).transpose()?;
    let mut parts = Parts::new();
    parts.spawn("the projection runner", move |until| async move { runner.run(signal, until).await });
    parts.spawn("the subscription feed", move |until| async move { feed.run(until).await });
    parts.spawn("the deployment log listener", move |until| logs.run(until));
    let routers = zpanel_api::routers(state.clone());
    parts.spawn("the API server", move |until| zpanel_api::serve(listener, routers.api, until));
    if let Some(metrics) = settings.metrics {
        parts.spawn("the metrics server", move |until| zpanel_api::serve(metrics, routers.metrics, until));
    }
    Ok(App { state, address, metrics_address, parts })
}

/// The running release's output, straight from the Docker Engine where it runs (this machine's,
/// or a server's through its pooled SSH connection), for `containerLogs`.
#[derive(Debug)]
pub struct EngineLogs {
    pool: sqlx::PgPool,
    places: Arc<zpanel_workers::place::Places>,
}

impl EngineLogs {
    /// Logs of releases wherever `config` says they run; engines are connected on first use,
    /// servers reached with keys `keyring` opens.
    ///
    /// # Errors
    /// When a proxy address in `config` is malformed.
    pub fn new(
        pool: sqlx::PgPool,
        signal: AppendSignal,
        keyring: &Arc<Keyring>,
        config: &zpanel_workers::place::PlaceConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let handler = CommandHandler::new(PgEventStore::new(pool.clone(), signal));
        let places = zpanel_workers::place::Places::new(handler, Arc::clone(keyring), config)?;
        Ok(Arc::new(Self { pool, places: Arc::new(places) }))
    }

    async fn lines(
        pool: sqlx::PgPool,
        places: Arc<zpanel_workers::place::Places>,
        application_id: uuid::Uuid,
        tail: u32,
    ) -> anyhow::Result<futures::stream::BoxStream<'static, anyhow::Result<zpanel_api::logs::ContainerLogLine>>> {
        use futures::StreamExt as _;
        let Some(current) = zpanel_workers::deploy::current_release(&pool, application_id).await? else {
            return Ok(futures::stream::empty().boxed());
        };
        let team = zpanel_domain::ids::TeamId::from_uuid(current.team_id);
        let place = places.get(team, current.server_id.map(zpanel_domain::ids::ServerId::from_uuid)).await?;
        let lines = place.engine.logs(&current.container(), tail, true).map(|line| {
            line.map(|l| zpanel_api::logs::ContainerLogLine {
                at: time::OffsetDateTime::now_utc(),
                stream: if l.is_error {
                    zpanel_api::logs::ContainerStream::Stderr
                } else {
                    zpanel_api::logs::ContainerStream::Stdout
                },
                text: l.text,
            })
        });
        Ok(lines.boxed())
    }
}

impl zpanel_api::logs::ContainerLogs for EngineLogs {
    fn follow(
        &self,
        application_id: uuid::Uuid,
        tail: u32,
    ) -> futures::stream::BoxStream<'static, anyhow::Result<zpanel_api::logs::ContainerLogLine>> {
        use futures::{StreamExt as _, TryFutureExt as _};
        Self::lines(self.pool.clone(), Arc::clone(&self.places), application_id, tail).try_flatten_stream().boxed()
    }
}

fn render_worker_metrics(
    out: &mut String,
    workers: &[(String, Arc<zpanel_workers::WorkerStats>)],
    relay: Option<&(String, Arc<zpanel_workers::relay::RelayStats>)>,
) {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    out.push_str("# HELP zpanel_worker_events_total Events a worker processed, by outcome.\n");
    out.push_str("# TYPE zpanel_worker_events_total counter\n");
    for (name, s) in workers {
        for (outcome, n) in [
            ("handled", &s.handled),
            ("duplicate", &s.duplicates),
            ("retried", &s.retries),
            ("given_up", &s.given_up),
            ("dead_lettered", &s.dead_letters),
        ] {
            let _ = writeln!(
                out,
                "zpanel_worker_events_total{{worker=\"{name}\",outcome=\"{outcome}\"}} {}",
                n.load(Relaxed)
            );
        }
    }
    if let Some((topic, s)) = relay {
        out.push_str("# HELP zpanel_relay_events_total Events the broker acknowledged from this process's relay.\n");
        out.push_str("# TYPE zpanel_relay_events_total counter\n");
        let _ = writeln!(out, "zpanel_relay_events_total{{topic=\"{topic}\"}} {}", s.relayed.load(Relaxed));
        out.push_str("# HELP zpanel_relay_retries_total Batches the relay produced again after a failure.\n");
        out.push_str("# TYPE zpanel_relay_retries_total counter\n");
        let _ = writeln!(out, "zpanel_relay_retries_total{{topic=\"{topic}\"}} {}", s.retries.load(Relaxed));
        out.push_str(
            "# HELP zpanel_relay_active 1 while this process's relay is the active one, 0 while it stands by.\n",
        );
        out.push_str("# TYPE zpanel_relay_active gauge\n");
        let _ = writeln!(out, "zpanel_relay_active{{topic=\"{topic}\"}} {}", s.active.load(Relaxed));
    }
}

impl App {
    /// Runs until `shutdown` resolves or a part stops on its own; see [`Parts::run_until`].
    ///
    /// # Errors
    /// The first part's failure.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.parts.run_until(shutdown).await
    }
}
