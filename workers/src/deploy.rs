//! The deploy worker: git → image → container → health check → proxy route, one deployment
//! at a time per application, every step an event and every line of output a log line.
//!
//! - The worker reacts to deployment events. `DeploymentQueued` puts the deployment in the
//!   application's queue (`deploy_queue`); a finished deployment leaves it. Whenever the head
//!   of an application's queue is not running, the worker that notices starts it
//!   (`StartDeployment`, which takes the lease) — the queue rows are locked while it does, so
//!   two workers never start two deployments of one application.
//! - The job runs as a task of this process, beside the event stream: a deployment takes
//!   minutes, the worker keeps handling events meanwhile. The job renews its lease; stops at
//!   the next step boundary when cancelled, or when this process shuts down (then it hands
//!   the deployment back, and another worker resumes it); and fails when its overall time is
//!   up. A job whose worker died is taken over by the lease supervisor, which resumes it here.
//! - [`pipeline`] holds the steps; [`logs`] the deployment log.

mod logs;
mod pipeline;

pub use logs::{DeployLog, LogLimits};

use crate::lease::LeaseKeeper;
use crate::place::{Place, PlaceConfig, Places};
use crate::runtime::{Handler, HandlerError};
use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, watch};
use uuid::Uuid;
use zpanel_commands::{Actor, CommandContext, CommandError, CommandHandler, Keyring, PgEventStore, RecordedEvent};
use zpanel_domain::application::ApplicationEvent;
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentError, DeploymentEvent, DeploymentStep};
use zpanel_domain::ids::{ServerId, TeamId};
use zpanel_domain::values::DomainName;

/// How the deploy worker works.
#[derive(Clone, Debug)]
pub struct DeployConfig {
    /// The Docker Engine (`ZPANEL_DOCKER_HOST`).
    pub docker_host: String,
    /// Caddy's admin API (`ZPANEL_CADDY_ADMIN`).
    pub caddy_admin: String,
    /// The address of Zpanel's server in Caddy (`ZPANEL_PROXY_LISTEN`).
    pub proxy_listen: String,
    /// Caddy's admin API on remote servers, as seen there (`ZPANEL_REMOTE_CADDY_ADMIN`).
    pub remote_caddy_admin: String,
    /// The address of Zpanel's server in remote servers' Caddy (`ZPANEL_REMOTE_PROXY_LISTEN`).
    pub remote_proxy_listen: String,
    /// Where build directories go (under the data directory).
    pub work_dir: PathBuf,
    /// Images kept per application for rollbacks (besides the running one).
    pub keep_images: usize,
    /// How long the previous container keeps serving requests in flight after the switch.
    pub grace: Duration,
    /// How long a deployment may take in all.
    pub timeout: Duration,
    /// A new deployment cancels the application's deployments still waiting in its queue.
    pub supersede: bool,
    /// Builds run at once by this worker.
    pub concurrent_builds: usize,
    /// How long a job's lease lasts unless renewed ([`crate::lease::LEASE`] by default).
    pub lease: Duration,
    /// How often routes are checked against the running releases (and repaired).
    pub route_sync: Duration,
    /// Where local repositories may be cloned from (`ZPANEL_GIT_LOCAL_ROOTS`).
    pub git_local_roots: zpanel_domain::values::GitLocalRoots,
    /// What containers and builds may use of the machine.
    pub limits: EngineLimits,
    /// Images tenants may use from the engine's store without a pull (`ZPANEL_LOCAL_IMAGES`).
    pub local_images: crate::images::LocalImages,
    /// How much output a deployment's log keeps.
    pub log_limits: LogLimits,
}

/// What containers and builds may use of the machine they share with other teams' (the
/// `ZPANEL_CONTAINER_*` and `ZPANEL_BUILD_*` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineLimits {
    /// Memory of a container whose application sets none, in bytes.
    pub memory_bytes: u64,
    /// The most memory an application may set.
    pub max_memory_bytes: u64,
    /// CPU of a container whose application sets none, in thousandths of a CPU.
    pub cpu_millis: u32,
    /// The most CPU an application may set.
    pub max_cpu_millis: u32,
    /// Processes (and threads) a container may run at once.
    pub pids: i64,
    /// Memory of each step of a build, in bytes.
    pub build_memory_bytes: u64,
    /// CPU of each step of a build, in thousandths of a CPU.
    pub build_cpu_millis: u32,
    /// How long a build may take.
    pub build_timeout: Duration,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 * 1024 * 1024,
            max_memory_bytes: 4 * 1024 * 1024 * 1024,
            cpu_millis: 1000,
            max_cpu_millis: 4000,
            pids: 1024,
            build_memory_bytes: 2047 * 1024 * 1024,
            build_cpu_millis: 2000,
            build_timeout: Duration::from_secs(1200),
        }
    }
}

impl EngineLimits {
    /// The memory (bytes) and CPU (thousandths) a container of an application with `own`
    /// limits gets: its own within the operator's caps, the operator's defaults where it sets
    /// none. `note` hears of each limit lowered to its cap.
    pub fn container(&self, own: &zpanel_domain::values::ResourceLimits, note: impl Fn(String)) -> (u64, u32) {
        let memory = own.memory_bytes.unwrap_or(self.memory_bytes);
        let cpu = own.cpu_millis.unwrap_or(self.cpu_millis);
        if memory > self.max_memory_bytes {
            note(format!("memory {memory} bytes is over the operator's cap; using {} bytes", self.max_memory_bytes));
        }
        if cpu > self.max_cpu_millis {
            note(format!("cpu {cpu} millis is over the operator's cap; using {} millis", self.max_cpu_millis));
        }
        (memory.min(self.max_memory_bytes), cpu.min(self.max_cpu_millis))
    }
}

impl DeployConfig {
    /// Where the engine and the proxy are, on this machine and on servers.
    #[must_use]
    pub fn places(&self) -> PlaceConfig {
        PlaceConfig {
            docker_host: self.docker_host.clone(),
            caddy_admin: self.caddy_admin.clone(),
            proxy_listen: self.proxy_listen.clone(),
            remote_caddy_admin: self.remote_caddy_admin.clone(),
            remote_proxy_listen: self.remote_proxy_listen.clone(),
        }
    }
}

/// What a job ended with.
#[derive(Debug)]
enum Ending {
    /// Serving: report success with the image.
    Released { image: String },
    /// A step failed; cleaned up, the previous release serves.
    Failed { step: Option<DeploymentStep>, reason: String },
    /// Stopped on request; cleaned up.
    Cancelled,
    /// This process is shutting down; cleaned up, the deployment is handed back.
    HandedBack,
    /// Another worker holds the deployment now: touch nothing.
    LeaseLost,
}

/// Why a running job should stop at its next step boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Keep going.
    No,
    /// The user cancelled.
    Cancel,
    /// The process is shutting down.
    Shutdown,
}

struct Inner {
    pool: PgPool,
    handler: CommandHandler<PgEventStore>,
    keyring: Arc<Keyring>,
    worker_id: String,
    config: DeployConfig,
    places: Places,
    /// Earlier places of moved applications found clean, by current release: the route sync
    /// does not visit them again.
    left: Mutex<std::collections::HashSet<(Uuid, Option<ServerId>)>>,
    builds: Semaphore,
    jobs: Mutex<HashMap<Uuid, watch::Sender<Stop>>>,
    tasks: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    shutting_down: watch::Sender<bool>,
}

/// The deploy worker's handler and job runner; cheap to clone.
#[derive(Clone)]
pub struct Deployer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer").field("worker_id", &self.inner.worker_id).finish_non_exhaustive()
    }
}

const EVENT_TYPES: &[&str] = &[
    "DeploymentQueued",
    "DeploymentCancellationRequested",
    "DeploymentSucceeded",
    "DeploymentFailed",
    "DeploymentCancelled",
    "ApplicationStopRequested",
    "ApplicationStartRequested",
    "ApplicationRestartRequested",
    "ApplicationUpdated",
    "ApplicationArchived",
];

impl Deployer {
    /// A deploy worker acting as `worker_id`.
    ///
    /// # Errors
    /// When the proxy client cannot be built.
    pub fn new(
        pool: PgPool,
        handler: CommandHandler<PgEventStore>,
        keyring: Arc<Keyring>,
        worker_id: &str,
        config: DeployConfig,
    ) -> anyhow::Result<Self> {
        let places = Places::new(handler.clone(), Arc::clone(&keyring), &config.places())?;
        crate::proxy::warn_unless_migrating();
        let builds = Semaphore::new(config.concurrent_builds.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                handler,
                keyring,
                worker_id: worker_id.to_owned(),
                config,
                places,
                left: Mutex::default(),
                builds,
                jobs: Mutex::default(),
                tasks: tokio::sync::Mutex::default(),
                shutting_down: watch::Sender::new(false),
            }),
        })
    }

    /// Where `team`'s applications on `server` run (`None`: this machine).
    async fn place(&self, team: TeamId, server: Option<ServerId>) -> anyhow::Result<Arc<Place>> {
        self.inner.places.get(team, server).await
    }

    /// Deployments this process is running now.
    #[must_use]
    pub fn running(&self) -> Vec<Uuid> {
        self.inner.jobs.lock().map(|jobs| jobs.keys().copied().collect()).unwrap_or_default()
    }

    /// Stops taking deployments; running jobs stop at their next step boundary, clean up and
    /// hand their deployments back. Waits for them up to `patience`; a job still running then
    /// is abandoned, and its lease lapses.
    pub async fn shutdown(&self, patience: Duration) {
        let _ = self.inner.shutting_down.send(true);
        if let Ok(jobs) = self.inner.jobs.lock() {
            for stop in jobs.values() {
                stop.send_if_modified(|s| {
                    let changed = *s != Stop::Shutdown;
                    *s = Stop::Shutdown;
                    changed
                });
            }
        }
        let mut tasks = self.inner.tasks.lock().await;
        let drained = tokio::time::timeout(patience, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("deploy jobs still running at shutdown were abandoned; their leases will lapse");
            tasks.abort_all();
        }
    }

    /// Makes each application's route point at its current release's container, every
    /// `route_sync`, until `shutdown`: Caddy forgets API-made routes when it restarts, and a
    /// container restarted by the engine publishes a new port.
    ///
    /// # Errors
    /// Never while `shutdown` is pending: failed rounds are logged.
    pub async fn sync_routes(&self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            match self.sync_routes_once().await {
                Ok(0) => {}
                Ok(repaired) => tracing::warn!(repaired, "repaired routes that did not match the running releases"),
                Err(e) => tracing::debug!(error = format!("{e:#}"), "route sync skipped"),
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(self.inner.config.route_sync) => {}
            }
        }
    }

    /// One round of [`Self::sync_routes`]; returns how many routes it repaired.
    ///
    /// # Errors
    /// When the database, the engine or Caddy cannot be reached.
    pub async fn sync_routes_once(&self) -> anyhow::Result<usize> {
        self.sync_routes_of(None).await
    }

    /// [`Self::sync_routes_once`] for one application (`Some`), or for all.
    async fn sync_routes_of(&self, only: Option<Uuid>) -> anyhow::Result<usize> {
        // The latest release of each application not being deployed right now (a deployment
        // switches the route itself, before its release becomes the latest).
        // With it, the places its earlier releases ran (`null` for this machine): an
        // application that moved is taken off them, should the deployment that moved it not
        // have reached them.
        let releases: Vec<CurrentWithPlaces> = sqlx::query_as(
            "select distinct on (d.application_id) d.team_id, d.application_id, d.deployment_id, d.state,
                    array(select distinct (o.release->>'serverId')::uuid from rm_deployments o
                           where o.application_id = d.application_id and o.status = 'succeeded') as places
               from rm_deployments d
              where d.status = 'succeeded'
                and ($1::uuid is null or d.application_id = $1)
                and not exists (select 1 from deploy_queue q where q.application_id = d.application_id and q.started)
              order by d.application_id, d.finished_at desc",
        )
        .bind(only)
        .fetch_all(&self.inner.pool)
        .await
        .context("reading the current releases")?;
        let mut repaired = 0;
        let current: std::collections::HashSet<Uuid> = releases.iter().map(|r| r.2).collect();
        if let Ok(mut left) = self.inner.left.lock() {
            left.retain(|(deployment_id, _)| current.contains(deployment_id));
        }
        for (team_id, application_id, deployment_id, state, places) in releases {
            let deployment: Deployment = serde_json::from_str(&state).context("reading a release")?;
            let Some(release) = deployment.state().map(|s| &s.release) else {
                continue;
            };
            let team = TeamId::from_uuid(team_id);
            for before in places.into_iter().map(|p| p.map(ServerId::from_uuid)).filter(|p| *p != release.server_id) {
                repaired += self.leave_place(team, before, application_id, deployment_id).await;
            }
            if release.domains.is_empty() {
                continue;
            }
            let domains = held_domains(&self.inner.pool, application_id, &release.domains).await?;
            // A server that cannot be reached now is repaired in a later round; the others are
            // not held up by it.
            let place = match self.place(team, release.server_id).await {
                Ok(place) => place,
                Err(e) => {
                    tracing::debug!(%application_id, error = format!("{e:#}"), "route sync skipped an application");
                    continue;
                }
            };
            if domains.is_empty() {
                // Every domain was given up (changed, or the application archived): another
                // application may hold them now, so nothing stays routed here.
                if place.proxy.upstream(application_id).await?.is_some() {
                    place.proxy.remove_route(application_id).await?;
                    repaired += 1;
                }
                continue;
            }
            // A release whose container is gone (replaced, removed) is not routed to.
            let Some(info) = place.engine.inspect(&container_name(deployment_id), release.port.get()).await? else {
                continue;
            };
            let Some(host_port) = info.host_port.filter(|_| info.running) else {
                continue;
            };
            let upstream = format!("127.0.0.1:{host_port}");
            let wanted: (String, BTreeSet<String>) = (upstream.clone(), domains.iter().cloned().collect());
            if place.proxy.routed(application_id).await?.as_ref() == Some(&wanted) {
                continue;
            }
            place.proxy.route(application_id, &domains, &upstream).await?;
            repaired += 1;
        }
        Ok(repaired)
    }

    /// Takes `application_id` off a place it no longer runs on (`server`, or this machine): its
    /// route there, and its containers other than the current release's (which a test's
    /// server may share an engine with). Returns 1 when it found something to remove. A place
    /// found clean is remembered for the current release and not visited again; one that
    /// cannot be reached is tried next round.
    async fn leave_place(
        &self,
        team: TeamId,
        server: Option<ServerId>,
        application_id: Uuid,
        deployment_id: Uuid,
    ) -> usize {
        let key = (deployment_id, server);
        if self.inner.left.lock().is_ok_and(|left| left.contains(&key)) {
            return 0;
        }
        let Ok(place) = self.place(team, server).await else { return 0 };
        // A deployment waiting or running may be taking the application back there: its
        // container and route are then not stale. (Queued before it creates either, it shows.)
        let deploying =
            sqlx::query_scalar::<_, bool>("select exists (select 1 from deploy_queue where application_id = $1)")
                .bind(application_id)
                .fetch_one(&self.inner.pool)
                .await;
        if !matches!(deploying, Ok(false)) {
            return 0;
        }
        let there = place.describe();
        let route = match place.proxy.upstream(application_id).await {
            Ok(None) => Ok(false),
            Ok(Some(_)) => place.proxy.remove_route(application_id).await.map(|()| true),
            Err(e) => Err(e),
        };
        if let Err(e) = &route {
            tracing::debug!(%application_id, %there, error = format!("{e:#}"), "could not remove a stale route");
        }
        let said = std::sync::atomic::AtomicUsize::new(0);
        let removed = place
            .remove_containers(application_id, &container_name(deployment_id), |message| {
                said.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%application_id, %there, "{message}");
            })
            .await;
        if matches!(route, Ok(false))
            && said.into_inner() == 0
            && let Ok(mut left) = self.inner.left.lock()
        {
            left.insert(key);
        }
        usize::from(matches!(route, Ok(true)) || removed > 0)
    }

    fn ctx(&self, team_id: TeamId) -> CommandContext {
        CommandContext::new(team_id, Actor::worker(&self.inner.worker_id), "worker:deploy")
    }

    /// Starts the head of `application_id`'s queue unless one of its deployments runs.
    async fn advance(&self, application_id: Uuid) -> anyhow::Result<()> {
        if *self.inner.shutting_down.borrow() {
            return Ok(());
        }
        loop {
            let mut tx = self.inner.pool.begin().await.context("starting a queue transaction")?;
            let queue: Vec<(Uuid, Uuid, bool)> = sqlx::query_as(
                "select deployment_id, team_id, started from deploy_queue
                  where application_id = $1 order by position for update",
            )
            .bind(application_id)
            .fetch_all(&mut *tx)
            .await
            .context("reading the deploy queue")?;
            let Some(&(deployment_id, team_id, _)) = queue.first() else {
                return Ok(());
            };
            if queue.iter().any(|(_, _, started)| *started) {
                return Ok(());
            }
            let team_id = TeamId::from_uuid(team_id);
            let now = OffsetDateTime::now_utc();
            let start = DeploymentCommand::StartDeployment {
                worker_id: self.inner.worker_id.clone(),
                lease_until: now + self.inner.config.lease,
                now,
            };
            let purpose = format!("start:{}", self.inner.worker_id);
            let ctx = self.ctx(team_id).with_command_id(Uuid::new_v5(&deployment_id, purpose.as_bytes()));
            let started = match self.inner.handler.execute::<Deployment>(&ctx, deployment_id, &start).await {
                // This worker holds the lease (a repeated start answers with the first run's).
                Ok(outcome) => Some(outcome.state),
                // Started by another worker (or an earlier life of this one): its lease says who
                // runs it, and the lease supervisor resumes it if nobody does.
                Err(CommandError::Rejected(DeploymentError::DeploymentAlreadyStarted)) => None,
                Err(CommandError::Rejected(DeploymentError::DeploymentFinished) | CommandError::NotFound) => {
                    sqlx::query("delete from deploy_queue where deployment_id = $1")
                        .bind(deployment_id)
                        .execute(&mut *tx)
                        .await
                        .context("dropping a finished deployment from the queue")?;
                    tx.commit().await.context("committing the deploy queue")?;
                    continue;
                }
                Err(e) => return Err(anyhow::anyhow!("starting deployment {deployment_id}: {e}")),
            };
            sqlx::query("update deploy_queue set started = true where deployment_id = $1")
                .bind(deployment_id)
                .execute(&mut *tx)
                .await
                .context("marking a deployment started")?;
            tx.commit().await.context("committing the deploy queue")?;
            let ours = started.is_some_and(|d| {
                d.state().and_then(|s| s.lease.as_ref()).is_some_and(|l| l.worker_id == self.inner.worker_id)
            });
            if ours {
                self.spawn_job(team_id, deployment_id).await;
            }
            return Ok(());
        }
    }

    /// Runs `deployment_id`'s job in this process unless it runs here already. Returns whether
    /// a job was started.
    pub async fn spawn_job(&self, team_id: TeamId, deployment_id: Uuid) -> bool {
        if *self.inner.shutting_down.borrow() {
            return false;
        }
        let stop = {
            let Ok(mut jobs) = self.inner.jobs.lock() else {
                return false;
            };
            if jobs.contains_key(&deployment_id) {
                return false;
            }
            let (stop, stopped) = watch::channel(Stop::No);
            jobs.insert(deployment_id, stop);
            stopped
        };
        let this = self.clone();
        let mut tasks = self.inner.tasks.lock().await;
        // Reap finished jobs, so the set holds only running ones.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            if let Err(e) = this.run_job(team_id, deployment_id, stop).await {
                tracing::error!(%deployment_id, error = format!("{e:#}"), "a deploy job failed to report");
            }
            if let Ok(mut jobs) = this.inner.jobs.lock() {
                jobs.remove(&deployment_id);
            }
        });
        true
    }

    async fn run_job(&self, team_id: TeamId, deployment_id: Uuid, stop: watch::Receiver<Stop>) -> anyhow::Result<()> {
        let (deployment, _) = self
            .inner
            .handler
            .load::<Deployment>(team_id, deployment_id)
            .await
            .map_err(|e| anyhow::anyhow!("loading deployment {deployment_id}: {e}"))?;
        let Some(state) = deployment.state().cloned() else {
            anyhow::bail!("deployment {deployment_id} does not exist");
        };
        if !matches!(deployment, Deployment::Running(_)) {
            return Ok(());
        }
        let mut keeper = LeaseKeeper::start(
            self.inner.handler.clone(),
            team_id,
            deployment_id,
            self.inner.worker_id.clone(),
            self.inner.config.lease,
        );
        let started_at = state.started_at.unwrap_or(state.queued_at);
        let deadline = started_at + self.inner.config.timeout;
        let remaining = (deadline - OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO);
        let secrets = pipeline::Secrets::open(&self.inner.keyring, &state.release)?;
        let log = DeployLog::start(
            self.inner.pool.clone(),
            deployment_id,
            secrets.redactions(),
            self.inner.config.log_limits,
        )
        .await?;
        let cancel_watch = self.watch_cancellation(team_id, deployment_id);
        let mut pipeline = pipeline::Pipeline::new(self.clone(), state, secrets, log.clone(), stop);
        let ending = tokio::select! {
            ending = pipeline.run() => ending,
            () = keeper.lost() => Ending::LeaseLost,
            () = tokio::time::sleep(remaining) => {
                let step = pipeline.current_step();
                log.system(format!(
                    "the deployment took longer than its limit of {} s; stopping it",
                    self.inner.config.timeout.as_secs()
                ));
                Ending::Failed {
                    step,
                    reason: format!("timed out after {} s", self.inner.config.timeout.as_secs()),
                }
            }
        };
        cancel_watch.abort();
        let left_out = log.left_out();
        if left_out > 0 {
            log.system(format!("{left_out} lines of output were left out of this log"));
        }
        if !matches!(ending, Ending::Released { .. } | Ending::LeaseLost) {
            pipeline.undo().await;
        }
        let result = self.report(team_id, deployment_id, ending, &mut pipeline, &log).await;
        drop(keeper);
        log.flush().await;
        result
    }

    /// Polls the deployment for a cancellation requested through another process (this one's
    /// own requests arrive as events at once).
    fn watch_cancellation(&self, team_id: TeamId, deployment_id: Uuid) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let requested = this
                    .inner
                    .handler
                    .load::<Deployment>(team_id, deployment_id)
                    .await
                    .ok()
                    .is_some_and(|(d, _)| d.state().is_some_and(|s| s.cancel_requested));
                if requested {
                    this.stop(deployment_id, Stop::Cancel);
                    return;
                }
            }
        })
    }

    fn stop(&self, deployment_id: Uuid, why: Stop) {
        if let Ok(jobs) = self.inner.jobs.lock()
            && let Some(stop) = jobs.get(&deployment_id)
        {
            stop.send_if_modified(|s| {
                let changed = *s == Stop::No;
                if changed {
                    *s = why;
                }
                changed
            });
        }
    }

    async fn report(
        &self,
        team_id: TeamId,
        deployment_id: Uuid,
        ending: Ending,
        pipeline: &mut pipeline::Pipeline,
        log: &DeployLog,
    ) -> anyhow::Result<()> {
        let ctx = self.ctx(team_id);
        let now = OffsetDateTime::now_utc();
        // The last line goes in before the status changes: a log subscriber that sees the
        // deployment finished has every line (ADR 0010).
        let command = match ending {
            Ending::LeaseLost => {
                log.system("another worker took this deployment over; this worker stops".to_owned());
                return Ok(());
            }
            Ending::Released { image } => {
                log.system(format!("released image {image}"));
                log.flush().await;
                let succeed = DeploymentCommand::SucceedDeployment { image, now };
                match self.inner.handler.execute::<Deployment>(&ctx, deployment_id, &succeed).await {
                    Ok(_) => return Ok(()),
                    // Cancelled just before the route switched: put the previous release back.
                    Err(CommandError::Rejected(DeploymentError::CancellationRequested)) => {
                        pipeline.undo().await;
                        log.system("cancelled; the previous release keeps serving".to_owned());
                        DeploymentCommand::ConfirmCancellation { now }
                    }
                    Err(e) => return Err(anyhow::anyhow!("reporting success: {e}")),
                }
            }
            Ending::Failed { step, reason } => {
                log.system(format!("failed: {reason}"));
                DeploymentCommand::FailDeployment { step, reason, now }
            }
            Ending::Cancelled => {
                log.system("cancelled; the previous release keeps serving".to_owned());
                DeploymentCommand::ConfirmCancellation { now }
            }
            Ending::HandedBack => {
                log.system("this worker is shutting down; handing the deployment back".to_owned());
                DeploymentCommand::ReleaseLease { worker_id: self.inner.worker_id.clone() }
            }
        };
        log.flush().await;
        match self.inner.handler.execute::<Deployment>(&ctx, deployment_id, &command).await {
            Ok(_) | Err(CommandError::Rejected(DeploymentError::DeploymentFinished)) => Ok(()),
            // The user cancelled while it was failing: the failure is the better answer, but
            // the cancellation must be confirmed.
            Err(CommandError::Rejected(DeploymentError::CancellationRequested)) => {
                let confirm = DeploymentCommand::ConfirmCancellation { now };
                self.inner
                    .handler
                    .execute::<Deployment>(&ctx, deployment_id, &confirm)
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("confirming the cancellation: {e}"))
            }
            Err(e) => Err(anyhow::anyhow!("reporting the deployment's end: {e}")),
        }
    }

    /// Stops, starts or restarts the container of the application's current release: its
    /// latest successful deployment's.
    async fn control(&self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let application_id: Uuid = event
            .stream_id
            .strip_prefix("application-")
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("{} is not an application stream", event.stream_id))
            .map_err(HandlerError::Permanent)?;
        let current = current_release(&self.inner.pool, application_id).await.map_err(HandlerError::Transient)?;
        let Some(current) = current else {
            return Err(HandlerError::Permanent(anyhow::anyhow!("the application has no release to control")));
        };
        let team = TeamId::from_uuid(current.team_id);
        let place =
            self.place(team, current.server_id.map(ServerId::from_uuid)).await.map_err(HandlerError::Transient)?;
        let engine = &place.engine;
        let container = current.container();
        let grace = Duration::from_secs(10);
        let done = match event.event_type.as_str() {
            "ApplicationStopRequested" => engine.stop(&container, grace).await,
            "ApplicationStartRequested" => engine.start(&container).await,
            _ => match engine.stop(&container, grace).await {
                Ok(()) => engine.start(&container).await,
                Err(e) => Err(e),
            },
        };
        done.map_err(HandlerError::Transient)?;
        // A started container publishes a new port: the route follows it.
        if event.event_type != "ApplicationStopRequested" {
            let info = engine.inspect(&container, current.port).await.map_err(HandlerError::Transient)?;
            if let Some(host_port) = info.and_then(|i| i.host_port) {
                let upstream = format!("127.0.0.1:{host_port}");
                place.proxy.repoint(application_id, &upstream).await.map_err(HandlerError::Transient)?;
            }
        }
        tracing::info!(%application_id, %container, action = %event.event_type, "controlled an application's release");
        Ok(())
    }

    /// Takes domains an application gave up (by an update, or by being archived) off its
    /// routes at once, rather than at the next route sync: they are free for any team to
    /// claim from that moment.
    async fn follow_domains(&self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let changes_domains = match event.decode::<ApplicationEvent>().map_err(|e| HandlerError::Permanent(e.into()))? {
            ApplicationEvent::ApplicationUpdated { patch } => patch.domains.is_some(),
            _ => true,
        };
        if !changes_domains {
            return Ok(());
        }
        let application_id = zpanel_commands::store::aggregate_uuid(&event.stream_id)
            .with_context(|| format!("{} is not an application stream", event.stream_id))
            .map_err(HandlerError::Permanent)?;
        self.sync_routes_of(Some(application_id)).await.map_err(HandlerError::Transient)?;
        Ok(())
    }

    async fn handle_event(&self, event: &RecordedEvent) -> anyhow::Result<()> {
        let deployment_id = deployment_id_of(event)?;
        match event.event_type.as_str() {
            "DeploymentQueued" => {
                let DeploymentEvent::DeploymentQueued { application_id, team_id, .. } =
                    event.decode::<DeploymentEvent>()?
                else {
                    anyhow::bail!("a DeploymentQueued event of another shape")
                };
                let application_id = *application_id.as_uuid();
                sqlx::query(
                    "insert into deploy_queue (deployment_id, application_id, team_id) values ($1, $2, $3)
                     on conflict (deployment_id) do nothing",
                )
                .bind(deployment_id)
                .bind(application_id)
                .bind(team_id.as_uuid())
                .execute(&self.inner.pool)
                .await
                .context("queueing a deployment")?;
                if self.inner.config.supersede {
                    self.supersede(event, application_id, deployment_id).await?;
                }
                self.advance(application_id).await
            }
            "DeploymentCancellationRequested" => {
                self.stop(deployment_id, Stop::Cancel);
                Ok(())
            }
            _ => {
                let application: Option<Uuid> =
                    sqlx::query_scalar("delete from deploy_queue where deployment_id = $1 returning application_id")
                        .bind(deployment_id)
                        .fetch_optional(&self.inner.pool)
                        .await
                        .context("taking a finished deployment off the queue")?;
                match application {
                    Some(application_id) => self.advance(application_id).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Cancels the application's deployments queued before `newest` that have not started.
    async fn supersede(&self, event: &RecordedEvent, application_id: Uuid, newest: Uuid) -> anyhow::Result<()> {
        let waiting: Vec<Uuid> = sqlx::query_scalar(
            "select deployment_id from deploy_queue
              where application_id = $1 and not started and deployment_id <> $2
                and position < (select position from deploy_queue where deployment_id = $2)",
        )
        .bind(application_id)
        .bind(newest)
        .fetch_all(&self.inner.pool)
        .await
        .context("finding superseded deployments")?;
        for older in waiting {
            let ctx = CommandContext::caused_by(
                event,
                Actor::worker(&self.inner.worker_id),
                "worker:deploy",
                &format!("supersede:{older}"),
            );
            let cancel = DeploymentCommand::CancelDeployment { now: OffsetDateTime::now_utc() };
            match self.inner.handler.execute::<Deployment>(&ctx, older, &cancel).await {
                Ok(_) | Err(CommandError::Rejected(DeploymentError::DeploymentFinished)) => {}
                Err(e) => return Err(anyhow::anyhow!("superseding deployment {older}: {e}")),
            }
        }
        Ok(())
    }
}

/// The domains of a release that its application still holds (ADR 0018), in order: a release
/// made before the application gave a domain up (queued then, or rolled back to) must not
/// route it, since another application may hold it now.
///
/// # Errors
/// When the database fails.
pub(crate) async fn held_domains(
    pool: &PgPool,
    application_id: Uuid,
    domains: &BTreeSet<DomainName>,
) -> anyhow::Result<Vec<String>> {
    let held: Vec<String> = sqlx::query_scalar("select domain from domain_claims where stream_id = $1")
        .bind(format!("application-{application_id}"))
        .fetch_all(pool)
        .await
        .context("reading the application's domain claims")?;
    Ok(domains.iter().map(|d| d.as_str().to_owned()).filter(|d| held.contains(d)).collect())
}

/// An application's current release: its latest successful deployment, the container that
/// runs it (`zpanel-<deployment>`), and the port the application listens on inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentRelease {
    /// The deployment.
    pub deployment_id: Uuid,
    /// The application's port in the container.
    pub port: u16,
    /// The team it belongs to.
    pub team_id: Uuid,
    /// The server it runs on; `None` on this machine.
    pub server_id: Option<Uuid>,
}

impl CurrentRelease {
    /// The container's name.
    #[must_use]
    pub fn container(&self) -> String {
        container_name(self.deployment_id)
    }
}

/// The name of deployment `deployment_id`'s container.
pub(crate) fn container_name(deployment_id: Uuid) -> String {
    format!("zpanel-{deployment_id}")
}

/// A current release for the route sync: team, application, deployment, its folded state, and
/// the servers (`None`: this machine) its application's releases ran on.
type CurrentWithPlaces = (Uuid, Uuid, Uuid, String, Vec<Option<Uuid>>);

/// The current release of `application_id`, if it has one.
///
/// # Errors
/// When the database fails.
pub async fn current_release(pool: &PgPool, application_id: Uuid) -> anyhow::Result<Option<CurrentRelease>> {
    let current: Option<(Uuid, Uuid, i32, Option<Uuid>)> = sqlx::query_as(
        "select deployment_id, team_id, (release->>'port')::int, (release->>'serverId')::uuid from rm_deployments
          where application_id = $1 and status = 'succeeded' order by finished_at desc limit 1",
    )
    .bind(application_id)
    .fetch_optional(pool)
    .await
    .context("finding the current release")?;
    Ok(current.map(|(deployment_id, team_id, port, server_id)| CurrentRelease {
        deployment_id,
        team_id,
        port: u16::try_from(port).unwrap_or(0),
        server_id,
    }))
}

fn deployment_id_of(event: &RecordedEvent) -> anyhow::Result<Uuid> {
    event
        .stream_id
        .strip_prefix("deployment-")
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("{} is not a deployment stream", event.stream_id))
}

impl Handler for Deployer {
    fn event_types(&self) -> &[&str] {
        EVENT_TYPES
    }

    fn handle<'a>(&'a self, event: &'a RecordedEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if matches!(event.event_type.as_str(), "ApplicationUpdated" | "ApplicationArchived") {
                return self.follow_domains(event).await;
            }
            if event.event_type.starts_with("Application") {
                return self.control(event).await;
            }
            self.handle_event(event).await.map_err(HandlerError::Transient)
        })
    }

    fn give_up<'a>(&'a self, event: &'a RecordedEvent, reason: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if event.event_type != "DeploymentQueued" {
                tracing::error!(event_id = %event.event_id, reason, "the deploy worker gave up on an event");
                return Ok(());
            }
            let deployment_id = deployment_id_of(event)?;
            let ctx =
                CommandContext::caused_by(event, Actor::worker(&self.inner.worker_id), "worker:deploy", "give-up");
            let fail = DeploymentCommand::FailDeployment {
                step: None,
                reason: format!("the deploy worker could not take it: {reason}"),
                now: OffsetDateTime::now_utc(),
            };
            match self.inner.handler.execute::<Deployment>(&ctx, deployment_id, &fail).await {
                Ok(_) | Err(CommandError::Rejected(DeploymentError::DeploymentFinished)) => Ok(()),
                Err(e) => Err(anyhow::anyhow!("failing deployment {deployment_id}: {e}")),
            }
        })
    }
}

impl crate::lease::Resume for Deployer {
    fn resume(&self, team_id: TeamId, deployment_id: Uuid) -> BoxFuture<'_, bool> {
        Box::pin(self.spawn_job(team_id, deployment_id))
    }
}
