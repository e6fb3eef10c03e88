//! Benchmarks of deployments, with Zpanel (API, projections and the deploy worker) running in
//! this process against the local Docker Engine and a Caddy of the benchmark's own:
//!
//! - [`overhead`]: a commit deployed by Zpanel (queued → the new page served through Caddy),
//!   beside the same steps run by hand with `git`, `docker` and Caddy's admin API, alternating.
//! - [`idle_memory`]: this process's resident memory, idle, with N applications deployed.
//!
//! Everything stays on loopback: the base image is imported from the machine's busybox, the
//! idle benchmark's image names a registry on a closed loopback port (the worker's pull fails at
//! once and it uses the local copy), and every container publishes on 127.0.0.1.

use super::ms;
use crate::config::Config;
use anyhow::Context as _;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use uuid::Uuid;
use zpanel_commands::{Actor, AppendSignal, CommandContext, CommandHandler, Keyring, PgEventStore, Plaintext};
use zpanel_domain::application::{Application, ApplicationCommand, Source};
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentReason};
use zpanel_domain::ids::{ApplicationId, DeploymentId, ProjectId, TeamId};
use zpanel_domain::project::{Project, ProjectCommand};
use zpanel_domain::team::{Team, TeamCommand};
use zpanel_domain::values::{
    DomainName, EnvironmentName, GitRef, GitUrl, HealthCheck, ImageRef, Name, Port, RepoPath, ResourceLimits,
};

/// The image test applications build `FROM` (as in the end-to-end tests): busybox, imported
/// from the machine's `busybox-static`, since nothing can be pulled here.
const BASE_IMAGE: &str = "zpanel-test/busybox:latest";
/// The label on the hand-run side's containers, with the run's id.
const HAND_LABEL: &str = "zpanel.bench";
/// The repository of the hand-run side's images, tagged `<run>-<round>`.
const HAND_REPOSITORY: &str = "zpanel-bench/hand";
/// The name of Zpanel's server in Caddy (see `zpanel_workers::proxy`).
const CADDY_SERVER: &str = "zpanel";
/// How long one deployment, by either side, may take before the benchmark gives up.
const PATIENCE: Duration = Duration::from_secs(180);
/// How often the page is requested through Caddy while waiting for a release.
const POLL: Duration = Duration::from_millis(10);

fn dockerfile() -> String {
    format!(
        "FROM {BASE_IMAGE}\nCOPY index.html /www/index.html\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
    )
}

fn valid<T, E: std::fmt::Display>(value: Result<T, E>) -> anyhow::Result<T> {
    value.map_err(|e| anyhow::anyhow!("bench value: {e}"))
}

/// Runs `program` with `args` (an argument vector, no shell); returns its standard output.
async fn cli<I, S>(program: &str, args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = tokio::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {program} (is it installed?)"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An argument vector of strings and paths.
fn argv(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_owned()).collect()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?.local_addr()?.port())
}

/// A Caddy on loopback with only an admin API; Zpanel creates its server through it.
struct Caddy {
    /// `http://127.0.0.1:PORT` of its admin API.
    admin: String,
    /// `127.0.0.1:PORT`, where Zpanel's server in it listens.
    listen: String,
    child: tokio::process::Child,
    dir: PathBuf,
}

impl Caddy {
    async fn start(dir: PathBuf) -> anyhow::Result<Self> {
        tokio::fs::create_dir_all(&dir).await.context("creating Caddy's directory")?;
        let admin_port = free_port()?;
        let config = dir.join("caddy.json");
        tokio::fs::write(&config, format!(r#"{{"admin":{{"listen":"127.0.0.1:{admin_port}"}}}}"#))
            .await
            .context("writing Caddy's config")?;
        let child = tokio::process::Command::new("caddy")
            .args(["run", "--config"])
            .arg(&config)
            .env("HOME", &dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting caddy (is it installed?)")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", admin_port)).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "caddy's admin API did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            admin: format!("http://127.0.0.1:{admin_port}"),
            listen: format!("127.0.0.1:{}", free_port()?),
            child,
            dir,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
    }
}

/// Zpanel in this process: API, projections and workers over `pool`, deploying through the
/// benchmark's Caddy.
struct Zpanel {
    handler: CommandHandler<PgEventStore>,
    keyring: Arc<Keyring>,
    team_id: TeamId,
    project_id: ProjectId,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Zpanel {
    /// Starts it, letting applications be built from local repositories under `repos`.
    async fn start(
        config: &Config,
        pool: &PgPool,
        caddy: &Caddy,
        work_dir: PathBuf,
        repos: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let repos = std::fs::canonicalize(repos).context("the repositories' directory")?;
        let git_local_roots = zpanel_domain::values::GitLocalRoots::new(vec![repos]);
        let signal = AppendSignal::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let rate = zpanel_api::limits::RateLimiter::new(config.api_rate, config.api_burst);
        let keyring = Arc::new(Keyring::generate());
        let logs = crate::app::EngineLogs::new(pool.clone(), signal.clone(), &keyring, &config.deploy().places())?;
        let mut app = crate::app::start(
            pool.clone(),
            signal.clone(),
            keyring,
            listener,
            crate::app::ApiSettings {
                rate,
                subscription_buffer: config.subscription_buffer,
                limits: config.api_limits(),
                metrics: None,
                git_local_roots: git_local_roots.clone(),
                tenancy: config.tenancy()?,
            },
            Some(logs),
        )?;
        let keyring = Arc::clone(&app.state.keyring);
        let mode = crate::app::WorkerMode {
            only: None,
            kafka: None,
            relay: false,
            lease_sweep: Duration::from_secs(config.lease_sweep_seconds),
            server_checks: None,
            deploy: zpanel_workers::deploy::DeployConfig {
                caddy_admin: caddy.admin.clone(),
                proxy_listen: caddy.listen.clone(),
                work_dir,
                grace: Duration::from_secs(1),
                git_local_roots,
                // The bench builds from the imported base image, as an operator's own.
                local_images: zpanel_workers::images::LocalImages::parse(BASE_IMAGE).map_err(anyhow::Error::msg)?,
                ..config.deploy()
            },
        };
        let metrics = Arc::clone(&app.state.metrics);
        crate::app::start_workers(&mut app.parts, pool, &signal, &keyring, &mode, Some(&metrics))?;
        let handler = app.state.handler.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));

        let zpanel = Self { handler, keyring, team_id: TeamId::new(), project_id: ProjectId::new(), stop, running };
        match zpanel.create_team().await {
            Ok(()) => Ok(zpanel),
            Err(e) => {
                let _ = zpanel.stop().await;
                Err(e)
            }
        }
    }

    /// Creates the benchmark's team and its project.
    async fn create_team(&self) -> anyhow::Result<()> {
        let command = TeamCommand::CreateTeam { id: self.team_id, name: valid(Name::parse("Bench"))? };
        self.handler
            .execute::<Team>(&self.ctx(), *self.team_id.as_uuid(), &command)
            .await
            .map_err(|e| anyhow::anyhow!("creating the team: {e}"))?;
        let command = ProjectCommand::CreateProject {
            id: self.project_id,
            team_id: self.team_id,
            name: valid(Name::parse("Bench"))?,
            names_in_use: BTreeSet::new(),
        };
        self.handler
            .execute::<Project>(&self.ctx(), *self.project_id.as_uuid(), &command)
            .await
            .map_err(|e| anyhow::anyhow!("creating the project: {e}"))?;
        Ok(())
    }

    /// A context for one command (it carries the command's id).
    fn ctx(&self) -> CommandContext {
        CommandContext::new(self.team_id, Actor::system("bench"), "bench")
    }

    /// Creates an application listening on 8080, checked at `/`, routed from `domain`.
    async fn create_application(&self, name: &str, source: Source, domain: &str) -> anyhow::Result<ApplicationId> {
        let id = ApplicationId::new();
        let command = ApplicationCommand::CreateApplication {
            id,
            team_id: self.team_id,
            project_id: self.project_id,
            environment: EnvironmentName::production(),
            name: valid(Name::parse(name))?,
            source,
            port: valid(Port::try_from(8080u32))?,
            health_check: HealthCheck::default(),
            domains: BTreeSet::from([valid(DomainName::parse(domain))?]),
            limits: ResourceLimits::default(),
            server_id: None,
            webhook_secret: self.keyring.seal(&Plaintext::new(format!("whsec-{}", Uuid::now_v7()))),
            // Every name the benchmark gives is new.
            names_in_use: BTreeSet::new(),
            environment_exists: true,
        };
        self.handler
            .execute::<Application>(&self.ctx(), *id.as_uuid(), &command)
            .await
            .map_err(|e| anyhow::anyhow!("creating application {name}: {e}"))?;
        Ok(id)
    }

    /// Queues a deployment of the application's current configuration, as the
    /// `deployApplication` mutation does.
    async fn deploy(&self, application: ApplicationId) -> anyhow::Result<Uuid> {
        let (application, _) = self
            .handler
            .load::<Application>(self.team_id, *application.as_uuid())
            .await
            .map_err(|e| anyhow::anyhow!("loading the application: {e}"))?;
        let id = DeploymentId::new();
        let command = DeploymentCommand::QueueDeployment {
            id,
            application,
            reason: DeploymentReason::Manual,
            image: None,
            release: None,
            now: OffsetDateTime::now_utc(),
        };
        self.handler
            .execute::<Deployment>(&self.ctx(), *id.as_uuid(), &command)
            .await
            .map_err(|e| anyhow::anyhow!("queueing the deployment: {e}"))?;
        Ok(*id.as_uuid())
    }

    /// Stops the API, projections and workers (running deployments are handed back).
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.running.await.context("zpanel panicked")?
    }
}

/// The deployment's status and failure, from the read model.
async fn status(pool: &PgPool, deployment: Uuid) -> anyhow::Result<(String, Option<String>)> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("select status, failure from rm_deployments where deployment_id = $1")
            .bind(deployment)
            .fetch_optional(pool)
            .await
            .context("reading the deployment's status")?;
    Ok(row.unwrap_or_else(|| ("queued".to_owned(), None)))
}

/// Waits until the deployment has finished; fails unless it succeeded.
async fn succeeded(pool: &PgPool, deployment: Uuid) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match status(pool, deployment).await? {
            (s, _) if s == "succeeded" => return Ok(()),
            (s, failure) if s == "failed" || s == "cancelled" => {
                anyhow::bail!("deployment {deployment} {s}: {}", failure.unwrap_or_default())
            }
            (s, _) => anyhow::ensure!(Instant::now() < deadline, "deployment {deployment} still {s}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /` through Caddy with `Host: domain`: the status and the page.
async fn page(http: &reqwest::Client, caddy: &Caddy, domain: &str) -> Option<(u16, String)> {
    let answer = http.get(format!("http://{}/", caddy.listen)).header("host", domain).send().await.ok()?;
    let status = answer.status().as_u16();
    Some((status, answer.text().await.ok()?))
}

/// Polls `domain` through Caddy until it serves `wanted`; `deployment`, when given, is checked
/// now and then so a failed release ends the wait.
async fn until_served(
    http: &reqwest::Client,
    caddy: &Caddy,
    domain: &str,
    wanted: &str,
    deployment: Option<(&PgPool, Uuid)>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        if let Some((200, body)) = page(http, caddy, domain).await
            && body == wanted
        {
            return Ok(());
        }
        if let Some((pool, id)) = deployment
            && attempt.is_multiple_of(50)
        {
            let (status, failure) = status(pool, id).await?;
            anyhow::ensure!(status != "failed" && status != "cancelled", "deployment {id} {status}: {failure:?}");
        }
        anyhow::ensure!(Instant::now() < deadline, "{domain} never served {wanted:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// A local git repository of a busybox `httpd` application.
struct Repo {
    dir: PathBuf,
}

impl Repo {
    async fn new(dir: PathBuf) -> anyhow::Result<Self> {
        tokio::fs::create_dir_all(&dir).await.context("creating the repository")?;
        let repo = Self { dir };
        repo.git(&["init", "-q", "-b", "main"]).await?;
        Ok(repo)
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// Commits the application serving `page`.
    async fn commit(&self, page: &str) -> anyhow::Result<()> {
        tokio::fs::write(self.dir.join("Dockerfile"), dockerfile()).await.context("writing the Dockerfile")?;
        tokio::fs::write(self.dir.join("index.html"), page).await.context("writing the page")?;
        self.git(&["add", "-A"]).await?;
        self.git(&["-c", "user.email=bench@zpanel.invalid", "-c", "user.name=bench", "commit", "-q", "-m", page])
            .await?;
        Ok(())
    }

    async fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = argv(&[&"-C", &self.dir]);
        all.extend(args.iter().map(OsString::from));
        cli("git", all).await
    }
}

/// Imports the base image from the machine's busybox unless the engine has it.
async fn ensure_base_image(scratch: &Path) -> anyhow::Result<()> {
    if cli("docker", ["image", "inspect", BASE_IMAGE]).await.is_ok() {
        return Ok(());
    }
    let rootfs = scratch.join("rootfs");
    for dir in ["bin", "www", "tmp", "etc"] {
        tokio::fs::create_dir_all(rootfs.join(dir)).await?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("busybox is not installed (Debian's busybox-static)")?;
    tokio::fs::copy(busybox, rootfs.join("bin/busybox")).await.context("copying busybox")?;
    for applet in
        ["sh", "httpd", "echo", "cat", "sleep", "ls", "mkdir", "touch", "env", "wget", "true", "false", "printf"]
    {
        tokio::fs::symlink("busybox", rootfs.join("bin").join(applet)).await?;
    }
    tokio::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").await?;
    let tar = scratch.join("rootfs.tar");
    cli("tar", argv(&[&"-C", &rootfs, &"-cf", &tar, &"."])).await?;
    cli("docker", argv(&[&"import", &tar, &BASE_IMAGE])).await?;
    let _ = tokio::fs::remove_dir_all(&rootfs).await;
    let _ = tokio::fs::remove_file(&tar).await;
    Ok(())
}

/// Removes the containers, then the images, that carry `label` (`key=value`).
async fn remove_labelled(label: &str) {
    let filter = format!("label={label}");
    remove_containers(&filter).await;
    remove_images(&filter).await;
}

/// Removes the containers `docker ps --filter filter` lists.
async fn remove_containers(filter: &str) {
    if let Ok(ids) = cli("docker", ["ps", "-aq", "--filter", filter]).await {
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = cli("docker", ["rm", "-f"].into_iter().chain(ids)).await;
        }
    }
}

/// Removes the images `docker images --filter filter` lists.
async fn remove_images(filter: &str) {
    if let Ok(ids) = cli("docker", ["images", "-q", "--filter", filter]).await {
        let ids: BTreeSet<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = cli("docker", ["rmi", "-f"].into_iter().chain(ids)).await;
        }
    }
}

/// Time spent per step, in order.
#[derive(Default)]
struct Laps {
    last: Option<Instant>,
    steps: Vec<(String, Duration)>,
}

impl Laps {
    fn start() -> Self {
        Self { last: Some(Instant::now()), steps: Vec::new() }
    }

    fn lap(&mut self, step: &str) {
        let now = Instant::now();
        let since = self.last.map_or(Duration::ZERO, |last| now - last);
        self.steps.push((step.to_owned(), since));
        self.last = Some(now);
    }

    fn total(&self) -> Duration {
        self.steps.iter().map(|(_, d)| *d).sum()
    }

    fn describe(&self) -> String {
        self.steps.iter().map(|(s, d)| format!("{s} {:.0}", ms(*d))).collect::<Vec<_>>().join(", ")
    }
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

/// Per step, the median over rounds (steps in the first round's order).
fn median_steps(rounds: &[Laps]) -> String {
    let Some(first) = rounds.first() else { return String::new() };
    first
        .steps
        .iter()
        .map(|(step, _)| {
            let times: Vec<Duration> =
                rounds.iter().filter_map(|r| r.steps.iter().find(|(s, _)| s == step).map(|(_, d)| *d)).collect();
            format!("{step} {:.0}", ms(median(&times)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn summary(samples: &[Duration]) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    format!(
        "median {:.2} s (min {:.2}, max {:.2})",
        median(samples).as_secs_f64(),
        min.as_secs_f64(),
        max.as_secs_f64()
    )
}

/// The steps of a Zpanel deployment from its events' times, from `queued` (when the command
/// was sent) to `served` (when Caddy served the new page): the command, the worker's pick-up,
/// each step up to the health check, then the route's switch until the page was served (the
/// worker records the route step only after checking the route itself).
async fn zpanel_laps(
    pool: &PgPool,
    deployment: Uuid,
    queued: OffsetDateTime,
    served: OffsetDateTime,
) -> anyhow::Result<Laps> {
    let rows: Vec<(String, String, OffsetDateTime)> = sqlx::query_as(
        "select event_type, payload::text, recorded_at from events where stream_id = $1 order by stream_position",
    )
    .bind(format!("deployment-{deployment}"))
    .fetch_all(pool)
    .await
    .context("reading the deployment's events")?;
    let mut laps = Laps::default();
    let mut last = queued;
    for (kind, payload, at) in rows {
        let step = match kind.as_str() {
            "DeploymentQueued" => "queue".to_owned(),
            "DeploymentStarted" => "pick-up".to_owned(),
            "DeploymentStepCompleted" => {
                let payload: serde_json::Value = serde_json::from_str(&payload)?;
                payload
                    .get("step")
                    .or_else(|| payload.pointer("/data/step"))
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("step")
                    .to_owned()
            }
            _ => continue,
        };
        if step == "route" || at > served {
            break;
        }
        laps.steps.push((step, (at - last).try_into().unwrap_or_default()));
        last = at;
    }
    laps.steps.push(("route".to_owned(), (served - last).try_into().unwrap_or_default()));
    Ok(laps)
}

/// Prints the deployment's log, each line with its time since `queued`.
async fn print_log(pool: &PgPool, deployment: Uuid, queued: OffsetDateTime) -> anyhow::Result<()> {
    let lines: Vec<(OffsetDateTime, String, String)> =
        sqlx::query_as("select at, stream, text from deployment_logs where deployment_id = $1 order by sequence")
            .bind(deployment)
            .fetch_all(pool)
            .await
            .context("reading the deployment's log")?;
    println!("the log of the last zpanel deployment, ms after it was queued:");
    for (at, stream, text) in lines {
        let since: Duration = (at - queued).try_into().unwrap_or_default();
        println!("  {:>7.0} {stream:<6} {text}", ms(since));
    }
    Ok(())
}

/// One release by hand: clone, build, run, read the port, wait for health, point Caddy's route,
/// wait for the page. Returns the laps and the new container.
async fn by_hand(
    http: &reqwest::Client,
    caddy: &Caddy,
    repo: &Repo,
    scratch: &Path,
    run: &str,
    round: usize,
    page: &str,
) -> anyhow::Result<(Laps, String)> {
    let checkout = scratch.join(format!("hand-{round}"));
    let tag = format!("{HAND_REPOSITORY}:{run}-{round}");
    let label = format!("{HAND_LABEL}={run}");
    let route_id = format!("zpanel-bench-hand-{run}");
    let domain = hand_domain(run);
    let mut laps = Laps::start();
    cli("git", argv(&[&"clone", &"-q", &"--depth", &"1", &repo.url(), &checkout])).await?;
    laps.lap("clone");
    // No `--label`: the legacy builder makes each label a step of its own (a container and a
    // commit). Zpanel's four labels are part of what it costs; a person types no label.
    cli("docker", argv(&[&"build", &"-t", &tag, &checkout])).await?;
    laps.lap("build");
    let container =
        cli("docker", ["run", "-d", "-p", "127.0.0.1::8080", "--label", &label, &tag]).await?.trim().to_owned();
    laps.lap("run");
    let published = cli("docker", ["port", &container, "8080"]).await?;
    let port: u16 = published
        .lines()
        .find_map(|l| l.trim().strip_prefix("127.0.0.1:"))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("docker port said {published:?}"))?;
    laps.lap("port");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = http.get(format!("http://127.0.0.1:{port}/")).send().await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the hand-run container never answered");
        tokio::time::sleep(POLL).await;
    }
    laps.lap("health");
    let route = json!({
        "@id": route_id,
        "match": [{ "host": [domain] }],
        "handle": [{ "handler": "reverse_proxy", "upstreams": [{ "dial": format!("127.0.0.1:{port}") }] }],
        "terminal": true,
    });
    let patched = http.patch(format!("{}/id/{route_id}", caddy.admin)).json(&route).send().await?;
    if !patched.status().is_success() {
        let added = http
            .post(format!("{}/config/apps/http/servers/{CADDY_SERVER}/routes", caddy.admin))
            .json(&route)
            .send()
            .await?;
        anyhow::ensure!(added.status().is_success(), "caddy refused the hand-run route: {}", added.text().await?);
    }
    laps.lap("route");
    until_served(http, caddy, &domain, page, None).await?;
    laps.lap("served");
    let _ = tokio::fs::remove_dir_all(&checkout).await;
    Ok((laps, container))
}

fn hand_domain(run: &str) -> String {
    format!("hand-{run}.bench.zpanel.test")
}

/// What both deploy benchmarks run on: a scratch directory, a Caddy on free loopback ports,
/// and Zpanel in this process (API, projections, the deploy worker) with a build directory.
struct Stage {
    run: String,
    scratch: PathBuf,
    caddy: Caddy,
    work_dir: PathBuf,
    zpanel: Zpanel,
}

impl Stage {
    /// Sets the stage up; whatever was made is removed again if a part fails to start.
    async fn open(config: &Config, pool: &PgPool, kind: &str) -> anyhow::Result<Self> {
        let run = Uuid::now_v7().simple().to_string()[20..].to_owned();
        let scratch = std::env::temp_dir().join(format!("zpanel-bench-{kind}-{run}"));
        tokio::fs::create_dir_all(&scratch).await.context("creating the scratch directory")?;
        let caddy = match Caddy::start(scratch.join("caddy")).await {
            Ok(caddy) => caddy,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&scratch).await;
                return Err(e);
            }
        };
        let work_dir = config.data_dir.join(format!("bench-builds-{run}"));
        match Zpanel::start(config, pool, &caddy, work_dir.clone(), &scratch).await {
            Ok(zpanel) => Ok(Self { run, scratch, caddy, work_dir, zpanel }),
            Err(e) => {
                caddy.stop().await;
                let _ = tokio::fs::remove_dir_all(&scratch).await;
                Err(e)
            }
        }
    }

    /// Stops Zpanel, runs `cleanup` (what the benchmark left in the engine), stops Caddy and
    /// removes the directories; `result` unless stopping failed.
    async fn close(self, result: anyhow::Result<()>, cleanup: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stopped = self.zpanel.stop().await;
        cleanup.await;
        self.caddy.stop().await;
        let _ = tokio::fs::remove_dir_all(&self.work_dir).await;
        let _ = tokio::fs::remove_dir_all(&self.scratch).await;
        result.and(stopped)
    }
}

/// `bench deploy`: `rounds` commits deployed by Zpanel and by hand, alternating, after a round
/// of warm-up.
pub(super) async fn overhead(config: &Config, pool: &PgPool, rounds: usize) -> anyhow::Result<()> {
    let stage = Stage::open(config, pool, "deploy").await?;
    let mut application = None;
    let result = match ensure_base_image(&stage.scratch).await {
        Ok(()) => {
            overhead_rounds(pool, &stage.zpanel, &stage.caddy, &stage.scratch, &stage.run, rounds, &mut application)
                .await
        }
        Err(e) => Err(e),
    };
    let run = stage.run.clone();
    stage
        .close(result, async move {
            if let Some(application) = application {
                remove_labelled(&format!("{}={application}", zpanel_workers::docker::LABEL_APPLICATION)).await;
                // Built images carry no labels: they are found by their repository.
                remove_images(&format!("reference=zpanel/{application}")).await;
            }
            remove_containers(&format!("label={HAND_LABEL}={run}")).await;
            remove_images(&format!("reference={HAND_REPOSITORY}:{run}-*")).await;
        })
        .await
}

async fn overhead_rounds(
    pool: &PgPool,
    zpanel: &Zpanel,
    caddy: &Caddy,
    scratch: &Path,
    run: &str,
    rounds: usize,
    application: &mut Option<ApplicationId>,
) -> anyhow::Result<()> {
    let repo = Repo::new(scratch.join("repo")).await?;
    repo.commit(&format!("first page {run}")).await?;
    let domain = format!("zpanel-{run}.bench.zpanel.test");
    let source = Source::Git {
        url: valid(GitUrl::parse(&repo.url()))?,
        git_ref: valid(GitRef::parse("main"))?,
        dockerfile: RepoPath::dockerfile(),
        deploy_key: None,
        credentials: None,
    };
    let app = zpanel.create_application("web", source, &domain).await?;
    *application = Some(app);
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build()?;

    let (mut zpanel_rounds, mut hand_rounds) = (Vec::new(), Vec::new());
    let mut hand_container: Option<String> = None;
    let mut last_zpanel = None;
    for round in 0..=rounds {
        // Round 0 warms up (the engine connection, the base image's layers in the page cache,
        // Caddy's server) and is not counted. The order alternates, so that neither side
        // always runs on a machine that the other just warmed; Zpanel goes first in round 0,
        // since its first route creates the server in Caddy that the hand-run route joins.
        for zpanel_turn in if round % 2 == 0 { [true, false] } else { [false, true] } {
            if zpanel_turn {
                let page = format!("zpanel round {round} {run}");
                repo.commit(&page).await?;
                let queued = OffsetDateTime::now_utc();
                let started = Instant::now();
                let deployment = zpanel.deploy(app).await?;
                until_served(&http, caddy, &domain, &page, Some((pool, deployment))).await?;
                let elapsed = started.elapsed();
                let laps = zpanel_laps(pool, deployment, queued, queued + elapsed).await?;
                // The old container stops and the images are pruned after the switch: not
                // timed, but finished before the next round, so it doesn't slow that one.
                succeeded(pool, deployment).await?;
                println!("round {round}, zpanel: {:.2} s ({} ms)", elapsed.as_secs_f64(), laps.describe());
                if round > 0 {
                    zpanel_rounds.push((elapsed, laps));
                    last_zpanel = Some((deployment, queued));
                }
            } else {
                let page = format!("hand round {round} {run}");
                repo.commit(&page).await?;
                let (laps, container) = by_hand(&http, caddy, &repo, scratch, run, round, &page).await?;
                if let Some(previous) = hand_container.replace(container) {
                    cli("docker", ["rm", "-f", &previous]).await?;
                }
                println!("round {round}, by hand: {:.2} s ({} ms)", laps.total().as_secs_f64(), laps.describe());
                if round > 0 {
                    hand_rounds.push(laps);
                }
            }
        }
    }
    if let Some((deployment, queued)) = last_zpanel {
        print_log(pool, deployment, queued).await?;
    }
    let zpanel_times: Vec<Duration> = zpanel_rounds.iter().map(|(d, _)| *d).collect();
    let hand_times: Vec<Duration> = hand_rounds.iter().map(Laps::total).collect();
    let zpanel_laps: Vec<Laps> = zpanel_rounds.into_iter().map(|(_, l)| l).collect();
    println!("zpanel steps, median ms: {}", median_steps(&zpanel_laps));
    println!("by hand steps, median ms: {}", median_steps(&hand_rounds));
    let ratio = median(&zpanel_times).as_secs_f64() / median(&hand_times).as_secs_f64();
    println!(
        "| deploy of a commit (git → image → container → health → Caddy route), {rounds} rounds after a warm-up | by hand (git clone, docker build/run/port, polling, Caddy admin API): {} | zpanel (queued → new page served through Caddy): {} | ratio {ratio:.2} (target ≤ 1.15) |",
        summary(&hand_times),
        summary(&zpanel_times),
    );
    Ok(())
}

/// This process's memory, from `/proc/self/status` and `/proc/self/smaps_rollup`.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss_kib: u64,
    /// Anonymous pages (the heap, stacks).
    anon_kib: u64,
    /// Of those, transparent huge pages: a 2 MiB page is resident as a whole however little
    /// of it is used.
    huge_kib: u64,
    /// Pages of mapped files (the binary's code), clean and shared with the page cache.
    file_kib: u64,
    threads: u64,
}

/// The number in a `/proc` field (`VmRSS:   1234 kB`, `Threads:   3`).
fn number_field(text: &str, name: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{name} in /proc/self"))
}

impl Memory {
    fn now() -> anyhow::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").context("reading /proc/self/smaps_rollup")?;
        Ok(Self {
            rss_kib: number_field(&status, "VmRSS:")?,
            anon_kib: number_field(&status, "RssAnon:")?,
            huge_kib: number_field(&rollup, "AnonHugePages:")?,
            file_kib: number_field(&status, "RssFile:")?,
            threads: number_field(&status, "Threads:")?,
        })
    }

    fn mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    fn parts(&self) -> String {
        format!(
            "anonymous {:.1} (in huge pages {:.1}), file {:.1}",
            self.anon_kib as f64 / 1024.0,
            self.huge_kib as f64 / 1024.0,
            self.file_kib as f64 / 1024.0
        )
    }

    fn describe(&self, pool: &PgPool) -> String {
        format!(
            "RSS {:.1} MiB ({}), {} threads, pool {} connections ({} idle)",
            self.mib(),
            self.parts(),
            self.threads,
            pool.size(),
            pool.num_idle()
        )
    }
}

/// How many deployments `bench idle-memory` runs at once.
const DEPLOYING_AT_ONCE: usize = 5;
/// How long the process idles before each measurement.
const IDLE: Duration = Duration::from_secs(10);

async fn idle(what: &str) {
    let bar = ProgressBar::new(IDLE.as_secs());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} s") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    for _ in 0..IDLE.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.inc(1);
    }
    bar.finish_and_clear();
}

/// `bench idle-memory`: this process's resident memory idle, before any application and with
/// `apps` image applications deployed.
pub(super) async fn idle_memory(config: &Config, pool: &PgPool, apps: usize) -> anyhow::Result<()> {
    let harness = Memory::now()?;
    println!("before zpanel starts (the bench's own pool open): {}", harness.describe(pool));
    let stage = Stage::open(config, pool, "memory").await?;
    // A registry on a closed loopback port: the worker's pull fails at once, and it deploys
    // the engine's local copy.
    let image = format!("127.0.0.1:9/zpanel-bench/web:{}", stage.run);
    let result = idle_memory_phases(pool, &stage.zpanel, &stage.caddy, &stage.scratch, &image, apps).await;
    let team = stage.zpanel.team_id;
    stage
        .close(result, async {
            // Every container and image Zpanel made for the team's applications.
            remove_labelled(&format!("{}={}", zpanel_workers::docker::LABEL_TEAM, team.as_uuid())).await;
            let _ = cli("docker", ["rmi", "-f", &image]).await;
        })
        .await
}

async fn idle_memory_phases(
    pool: &PgPool,
    zpanel: &Zpanel,
    caddy: &Caddy,
    scratch: &Path,
    image: &str,
    apps: usize,
) -> anyhow::Result<()> {
    idle("idling after start-up").await;
    let baseline = Memory::now()?;
    println!("started, idle, no application: {}", baseline.describe(pool));

    ensure_base_image(scratch).await?;
    let context = scratch.join("image");
    tokio::fs::create_dir_all(&context).await?;
    tokio::fs::write(context.join("Dockerfile"), dockerfile()).await?;
    tokio::fs::write(context.join("index.html"), "hello from an idle application").await?;
    cli("docker", argv(&[&"build", &"-q", &"-t", &image, &context])).await?;

    let bar = ProgressBar::new(apps as u64);
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}")?.progress_chars("=> "));
    bar.set_message("creating applications");
    let mut created = Vec::with_capacity(apps);
    for i in 0..apps {
        let source = Source::Image { image: valid(ImageRef::parse(image))? };
        let id =
            zpanel.create_application(&format!("app-{i}"), source, &format!("app-{i}.idle.bench.zpanel.test")).await?;
        created.push(id);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let with_apps = Memory::now()?;
    println!("{apps} applications created, none deployed: {}", with_apps.describe(pool));

    let bar = ProgressBar::new(apps as u64);
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}")?.progress_chars("=> "));
    bar.set_message(format!("deploying, {DEPLOYING_AT_ONCE} at a time"));
    let started = Instant::now();
    // A deployment that fails is queued once more (and reported): the figure is about memory.
    let mut deployments = futures::stream::iter(created.iter().copied())
        .map(|app| async move {
            let first = zpanel.deploy(app).await?;
            match succeeded(pool, first).await {
                Ok(()) => anyhow::Ok(None),
                Err(e) => {
                    let again = zpanel.deploy(app).await?;
                    succeeded(pool, again).await?;
                    Ok(Some(e))
                }
            }
        })
        .buffer_unordered(DEPLOYING_AT_ONCE);
    let mut retried = 0;
    while let Some(done) = deployments.next().await {
        if let Some(failure) = done? {
            retried += 1;
            bar.suspend(|| println!("failed at the first try, succeeded when queued again: {failure:#}"));
        }
        bar.inc(1);
    }
    drop(deployments);
    bar.finish_and_clear();
    if retried > 0 {
        println!("{retried} of {apps} deployments failed at the first try");
    }
    println!("{apps} deployments succeeded in {:.1} s", started.elapsed().as_secs_f64());
    let deployed = Memory::now()?;
    println!("just after the deployments: {}", deployed.describe(pool));

    // Every application serves through Caddy.
    {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build()?;
        for i in 0..apps {
            let domain = format!("app-{i}.idle.bench.zpanel.test");
            let answer = page(&http, caddy, &domain).await;
            anyhow::ensure!(matches!(answer, Some((200, _))), "{domain} answered {answer:?}");
        }
    }

    idle(&format!("idling with {apps} applications")).await;
    let after = Memory::now()?;
    println!("idle with {apps} applications deployed: {}", after.describe(pool));
    let per_app = (after.rss_kib.saturating_sub(baseline.rss_kib)) as f64 / apps.max(1) as f64;
    println!(
        "| idle RSS of the zpanel process (API, projections, deploy worker), {apps} applications deployed | started, idle, no application: {:.1} MiB ({}) | {:.1} MiB ({}; {:+.1} MiB, {per_app:.0} KiB per application) | target ≤ 40 MiB |",
        baseline.mib(),
        baseline.parts(),
        after.mib(),
        after.parts(),
        after.mib() - baseline.mib(),
    );
    Ok(())
}
