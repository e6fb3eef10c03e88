//! The steps of one deployment, in order: resolve → clone → build (or pull, or re-use a past
//! release's image) → start → health check → route → clean up. Each completed step is
//! recorded on the deployment's stream; each line of output goes to its log.
//!
//! Every step can run again: a deployment taken over after its worker died starts from the
//! top, and finds its commit recorded, its image built (the build key matches), and its
//! container name free (a leftover container of the dead worker is removed first).
//!
//! Any failure, cancellation or hand-back undoes what the deployment changed — its container,
//! and the route if it was switched — so the previous release keeps serving.

use super::logs::{DeployLog, Stream};
use super::{Deployer, Ending, Stop, held_domains};
use crate::docker::{
    BuildSpec, ContainerSpec, LABEL_APPLICATION, LABEL_DEPLOYMENT, LABEL_PROJECT, LABEL_TEAM, NetworkSpec, OutputLine,
};
use crate::git::{Access, Git, KeyFile};
use crate::http::{Http, HttpError};
use crate::place::Place;
use crate::remote::Dial;
use anyhow::Context as _;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use zpanel_commands::{Actor, CommandContext, CommandError, Keyring};
use zpanel_domain::application::{EnvValue, ReleaseConfig, Source};
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentState, DeploymentStep};
use zpanel_domain::private_key::PrivateKey;
use zpanel_domain::values::{HealthCheck, ImageRef};

/// The application's environment, opened: plaintext lives only in this process, only for the
/// job, and reaches only the Docker Engine.
pub(super) struct Secrets {
    /// Every variable: name, value, whether it is a secret, whether the build gets it too.
    vars: Vec<(String, String, bool, bool)>,
}

impl Secrets {
    /// Opens the release's secret values.
    pub(super) fn open(keyring: &Keyring, release: &ReleaseConfig) -> anyhow::Result<Self> {
        let mut vars = Vec::with_capacity(release.env.len());
        for (key, var) in &release.env {
            let (value, secret) = match &var.value {
                EnvValue::Plain(value) => (value.clone(), false),
                EnvValue::Secret(sealed) => {
                    let opened = keyring.open(sealed).map_err(|e| anyhow::anyhow!("opening {key}: {e}"))?;
                    (opened.expose().to_owned(), true)
                }
            };
            vars.push((key.as_str().to_owned(), value, secret, var.build_time));
        }
        Ok(Self { vars })
    }

    /// The secret values, to redact from the log.
    pub(super) fn redactions(&self) -> Vec<String> {
        self.vars.iter().filter(|(_, _, secret, _)| *secret).map(|(_, v, _, _)| v.clone()).collect()
    }

    fn runtime_env(&self) -> Vec<String> {
        self.vars.iter().map(|(k, v, _, _)| format!("{k}={v}")).collect()
    }

    fn build_args(&self) -> HashMap<String, String> {
        self.vars.iter().filter(|(_, _, _, build)| *build).map(|(k, v, _, _)| (k.clone(), v.clone())).collect()
    }
}

/// Why the steps stopped early.
enum Interrupt {
    Failed(String),
    Stopped(Stop),
}

impl From<anyhow::Error> for Interrupt {
    fn from(e: anyhow::Error) -> Self {
        Self::Failed(format!("{e:#}"))
    }
}

type StepResult<T> = Result<T, Interrupt>;

pub(super) struct Pipeline {
    deployer: Deployer,
    state: DeploymentState,
    secrets: Secrets,
    log: DeployLog,
    stop: watch::Receiver<Stop>,
    step: Option<DeploymentStep>,
    /// The new container, once created.
    container: Option<String>,
    /// The upstream the route had before this deployment switched it.
    switched_from: Option<Option<String>>,
    /// Scratch files of this deployment (clone, build context).
    scratch: PathBuf,
    /// Where it runs, once reached.
    place: Option<Arc<Place>>,
    /// How many times the server's SSH connection had been made when the deployment began.
    connects: Option<u64>,
}

impl Pipeline {
    pub(super) fn new(
        deployer: Deployer,
        state: DeploymentState,
        secrets: Secrets,
        log: DeployLog,
        stop: watch::Receiver<Stop>,
    ) -> Self {
        let scratch = deployer.inner.config.work_dir.join(state.id.as_uuid().to_string());
        Self {
            deployer,
            state,
            secrets,
            log,
            stop,
            step: None,
            container: None,
            switched_from: None,
            scratch,
            place: None,
            connects: None,
        }
    }

    pub(super) fn current_step(&self) -> Option<DeploymentStep> {
        self.step
    }

    fn container_name(&self) -> String {
        super::container_name(*self.state.id.as_uuid())
    }

    fn image_repo(&self) -> String {
        format!("zpanel/{}", self.state.application_id.as_uuid())
    }

    pub(super) async fn run(&mut self) -> Ending {
        let ending = match self.steps().await {
            Ok(image) => Ending::Released { image },
            Err(Interrupt::Failed(reason)) => Ending::Failed { step: self.step, reason: self.explained(reason).await },
            Err(Interrupt::Stopped(Stop::Cancel)) => Ending::Cancelled,
            Err(Interrupt::Stopped(_)) => Ending::HandedBack,
        };
        let _ = tokio::fs::remove_dir_all(&self.scratch).await;
        self.log.flush().await;
        ending
    }

    /// A failure's reason, saying so when the server's SSH connection was lost during the
    /// deployment (the reason itself then names only the symptom, such as a body cut short).
    async fn explained(&self, reason: String) -> String {
        let Some((link, connects)) = self.place.as_ref().and_then(|p| p.link.as_ref()).zip(self.connects) else {
            return reason;
        };
        if link.connects() != connects || link.is_down().await {
            format!("{reason} (the SSH connection to {} was lost)", link.describe())
        } else {
            reason
        }
    }

    async fn steps(&mut self) -> StepResult<String> {
        let server = self.state.release.server_id;
        // Where the release this one replaces runs, when that is somewhere else: the
        // application moved (to a server, off one, or between two).
        let application_id = *self.state.application_id.as_uuid();
        let moved_from = super::current_release(&self.deployer.inner.pool, application_id)
            .await?
            .map(|before| before.server_id.map(zpanel_domain::ids::ServerId::from_uuid))
            .filter(|before| *before != server);
        let place = self.deployer.place(self.state.team_id, server).await.context("reaching the Docker Engine")?;
        if let Some(link) = &place.link {
            self.log.system(format!("deploying to {}", place.describe()));
            self.connects = Some(link.connects());
        }
        self.place = Some(Arc::clone(&place));
        let engine = place.engine.clone();
        tokio::fs::create_dir_all(&self.deployer.inner.config.work_dir).await.context("creating the work directory")?;
        let image = if let Some(image) = self.state.image.clone() {
            // A rollback: the past release's image, exactly.
            self.begin(DeploymentStep::Pull)?;
            let of = match &self.state.reason {
                zpanel_domain::deployment::DeploymentReason::Rollback { of } => format!(" of deployment {of}"),
                _ => String::new(),
            };
            self.log.system(format!("re-deploying image {image}{of}, without a rebuild"));
            // A release records the id of its image: a name could resolve to another image now.
            if !is_image_id(&image) {
                return Err(Interrupt::Failed(format!("the release's image {image} is not an image id")));
            }
            engine.image_id(&image).await?.with_context(|| {
                format!(
                    "the image {image} of that release is no longer on the Docker Engine (pruned); deploy anew instead"
                )
            })?;
            self.complete(DeploymentStep::Pull).await?;
            image
        } else {
            match self.state.release.source.clone() {
                Source::Git { url, git_ref, dockerfile, deploy_key, credentials } => {
                    self.begin(DeploymentStep::Resolve)?;
                    let key = match deploy_key {
                        Some(key_id) => Some(self.deploy_key(*key_id.as_uuid()).await?),
                        None => None,
                    };
                    let credentials = match credentials {
                        Some(sealed) => Some(
                            self.deployer
                                .inner
                                .keyring
                                .open(&sealed)
                                .map_err(|e| anyhow::anyhow!("opening the repository's credentials: {e}"))?,
                        ),
                        None => None,
                    };
                    let inner = Arc::clone(&self.deployer.inner);
                    let config = &inner.config;
                    let known_hosts = config.work_dir.join("known_hosts");
                    let access = Access {
                        key: key.as_ref(),
                        credentials: credentials.as_ref().map(|c| c.expose()),
                        known_hosts: &known_hosts,
                        local_roots: &config.git_local_roots,
                    };
                    let git = Git::new(&url, access, &config.work_dir)?;
                    let commit = match self.state.commit.clone() {
                        Some(commit) => commit,
                        None => {
                            self.log.system(format!("resolving {git_ref} in {}", git.url()));
                            let log = self.log.clone();
                            let resolving = git.resolve(&git_ref, |_, line| log.line(Stream::Stderr, &line));
                            let commit = self.interruptible(resolving).await??;
                            self.send(DeploymentCommand::RecordCommit { commit: commit.clone() }).await?;
                            commit
                        }
                    };
                    self.log.system(format!("{git_ref} is commit {commit}"));
                    self.complete(DeploymentStep::Resolve).await?;

                    self.begin(DeploymentStep::Clone)?;
                    let checkout_dir = self.scratch.join("src");
                    let _ = tokio::fs::remove_dir_all(&self.scratch).await;
                    tokio::fs::create_dir_all(&self.scratch).await.context("creating the build directory")?;
                    let log = self.log.clone();
                    let checkout =
                        git.checkout(&git_ref, &commit, &checkout_dir, |_, line| log.line(Stream::Stderr, &line));
                    self.interruptible(checkout).await??;
                    drop(git);
                    drop(key);
                    self.complete(DeploymentStep::Clone).await?;

                    self.begin(DeploymentStep::Build)?;
                    let image = self.build(&engine, url.as_str(), &commit, dockerfile.as_str(), &checkout_dir).await?;
                    self.complete(DeploymentStep::Build).await?;
                    image
                }
                Source::Image { image } => {
                    self.begin(DeploymentStep::Pull)?;
                    let id = self.acquire(&engine, &image).await?;
                    self.complete(DeploymentStep::Pull).await?;
                    id
                }
            }
        };

        self.begin(DeploymentStep::Start)?;
        let name = self.container_name();
        engine.remove(&name).await?;
        let release = self.state.release.clone();
        let port = release.port.get();
        let network = self.team_network(&engine).await?;
        let limits = self.deployer.inner.config.limits;
        let (memory_bytes, cpu_millis) = limits.container(&release.limits, |m| self.log.system(m));
        let spec = ContainerSpec {
            name: name.clone(),
            image: image.clone(),
            env: self.secrets.runtime_env(),
            labels: self.labels(),
            port,
            memory_bytes: Some(memory_bytes),
            cpu_millis: Some(cpu_millis),
            pids: Some(limits.pids),
            network: Some(network),
        };
        self.log.system(format!("starting container {name}"));
        self.container = Some(name.clone());
        engine.run(&spec).await?;
        self.complete(DeploymentStep::Start).await?;

        self.begin(DeploymentStep::HealthCheck)?;
        let health = release.health_check.clone();
        let checking = health_check(&engine, &place.dial, &name, port, &health, &self.log);
        let host_port = self.interruptible(checking).await??;
        self.complete(DeploymentStep::HealthCheck).await?;

        self.begin(DeploymentStep::Route)?;
        let application_id = *self.state.application_id.as_uuid();
        let domains = held_domains(&self.deployer.inner.pool, application_id, &release.domains).await?;
        for given_up in release.domains.iter().filter(|d| !domains.iter().any(|h| h == d.as_str())) {
            self.log.system(format!("not routing {given_up}: the application no longer holds it"));
        }
        if domains.is_empty() {
            self.log.system(format!("no domains to route; the release serves on 127.0.0.1:{host_port}"));
        } else {
            let proxy = place.proxy.clone();
            let previous = proxy.upstream(application_id).await?;
            let upstream = format!("127.0.0.1:{host_port}");
            self.switched_from = Some(previous);
            proxy.route(application_id, &domains, &upstream).await?;
            self.log.system(format!("routed {} to {upstream}", domains.join(", ")));
            verify_route(&proxy, &domains[0], health.path.as_str()).await?;
        }
        self.complete(DeploymentStep::Route).await?;

        self.begin(DeploymentStep::Cleanup)?;
        // After the route switched, nobody can cancel any more (the domain says so); a
        // cancellation asked for just before is in the stream now, whatever this process heard.
        if self.cancel_requested().await? {
            return Err(Interrupt::Stopped(Stop::Cancel));
        }
        let grace = self.deployer.inner.config.grace;
        if !grace.is_zero() && self.switched_from.as_ref().is_some_and(Option::is_some) {
            self.log.system(format!("letting the previous release finish its requests for {} s", grace.as_secs_f32()));
            tokio::time::sleep(grace).await;
        }
        self.remove_previous(&place).await;
        if let Some(before) = moved_from {
            self.leave(before).await;
        }
        self.prune_images(&engine).await;
        self.complete(DeploymentStep::Cleanup).await?;
        self.log.flush().await;
        Ok(image)
    }

    /// Puts things back as they were before this deployment: the route, then the container.
    pub(super) async fn undo(&mut self) {
        if let Some(previous) = self.switched_from.take()
            && let Some(place) = &self.place
        {
            let proxy = &place.proxy;
            let application_id = *self.state.application_id.as_uuid();
            let held = held_domains(&self.deployer.inner.pool, application_id, &self.state.release.domains).await;
            let domains = held.unwrap_or_default();
            let restored = match &previous {
                Some(upstream) => proxy.route(application_id, &domains, upstream).await,
                None => proxy.remove_route(application_id).await,
            };
            match restored {
                Ok(()) => self.log.system("the route points at the previous release again".to_owned()),
                Err(e) => self.log.system(format!("could not restore the previous route: {e:#}")),
            }
        }
        if let Some(container) = self.container.take()
            && let Some(place) = &self.place
        {
            match place.engine.remove(&container).await {
                Ok(()) => self.log.system(format!("removed container {container}")),
                Err(e) => self.log.system(format!("could not remove container {container}: {e:#}")),
            }
        }
        self.log.flush().await;
    }

    /// Enters `step`, unless the job must stop.
    fn begin(&mut self, step: DeploymentStep) -> StepResult<()> {
        let stop = *self.stop.borrow();
        if stop != Stop::No {
            return Err(Interrupt::Stopped(stop));
        }
        self.step = Some(step);
        self.log.system(format!("==> {}", step_name(step)));
        Ok(())
    }

    async fn complete(&mut self, step: DeploymentStep) -> StepResult<()> {
        self.send(DeploymentCommand::CompleteStep { step }).await
    }

    async fn send(&self, command: DeploymentCommand) -> StepResult<()> {
        let inner = &self.deployer.inner;
        let ctx = CommandContext::new(self.state.team_id, Actor::worker(&inner.worker_id), "worker:deploy");
        match inner.handler.execute::<Deployment>(&ctx, *self.state.id.as_uuid(), &command).await {
            Ok(_) => Ok(()),
            Err(CommandError::Rejected(e)) => Err(Interrupt::Failed(format!("the deployment refused a report: {e}"))),
            Err(e) => Err(Interrupt::Failed(format!("reporting progress: {e}"))),
        }
    }

    async fn cancel_requested(&self) -> StepResult<bool> {
        let (deployment, _) = self
            .deployer
            .inner
            .handler
            .load::<Deployment>(self.state.team_id, *self.state.id.as_uuid())
            .await
            .map_err(|e| Interrupt::Failed(format!("reading the deployment: {e}")))?;
        Ok(deployment.state().is_some_and(|s| s.cancel_requested))
    }

    /// Runs `work` unless the job is told to stop first; dropping `work` aborts it (a build
    /// is cancelled by the engine when its connection closes, git is killed).
    async fn interruptible<T>(&self, work: impl Future<Output = T>) -> StepResult<T> {
        let mut stop = self.stop.clone();
        tokio::select! {
            done = work => Ok(done),
            Ok(why) = stop.wait_for(|s| *s != Stop::No) => Err(Interrupt::Stopped(*why)),
        }
    }

    /// The id of `image` for this deployment ([`crate::images`]): one of the operator's local
    /// images, found by its name; or pulled by its full reference, by the digest the pull
    /// reported. Zpanel's own images and image ids are refused; a failed pull never falls
    /// back to whatever the engine stores under that name.
    async fn acquire(&self, engine: &crate::docker::Engine, image: &ImageRef) -> StepResult<String> {
        if let Some(why) = crate::images::refusal(image) {
            return Err(Interrupt::Failed(format!("{image} cannot be used: {why}")));
        }
        if self.deployer.inner.config.local_images.allows(image) {
            // The operator's images are never pulled for a tenant: a pull could replace them
            // for every application that uses them.
            let id = engine.image_id_by_name(image).await?.with_context(|| {
                format!("{image} is one of the operator's local images (ZPANEL_LOCAL_IMAGES) but the Docker Engine does not have it")
            })?;
            self.log.system(format!(
                "{image} is one of the operator's local images (ZPANEL_LOCAL_IMAGES): using the copy the Docker Engine has, {id}"
            ));
            return Ok(id);
        }
        self.log.system(format!("pulling {image}"));
        let log = self.log.clone();
        let pulled = engine.pull(image, |line| log.line(Stream::Stdout, &line.text));
        let id = self.interruptible(pulled).await??;
        self.log.system(format!("pulled {image}: image {id}"));
        Ok(id)
    }

    /// The team's own network at the place, made when missing: its containers and builds
    /// share no network with other teams'.
    async fn team_network(&self, engine: &crate::docker::Engine) -> StepResult<String> {
        let team = self.state.team_id.as_uuid().to_string();
        let spec =
            NetworkSpec { name: format!("zpanel-team-{team}"), labels: HashMap::from([(LABEL_TEAM.to_owned(), team)]) };
        engine.ensure_network(&spec).await?;
        Ok(spec.name)
    }

    /// Reads the Dockerfile at `dockerfile` in `checkout` and makes every image it builds from
    /// one this deployment may use ([`Self::acquire`]): the engine's builder would otherwise
    /// resolve those names against every image it stores. Images whose `ONBUILD` instructions
    /// read other images are refused too, since they run in this build.
    async fn check_build_images(
        &self,
        engine: &crate::docker::Engine,
        checkout: &Path,
        dockerfile: &str,
        args: &HashMap<String, String>,
    ) -> StepResult<()> {
        let text = read_in(checkout, dockerfile).await?;
        let uses = crate::dockerfile::images(&text, args)
            .map_err(|e| Interrupt::Failed(format!("{dockerfile} cannot be built: {e}")))?;
        for used in uses {
            let image = ImageRef::parse(&used.reference).map_err(|e| {
                Interrupt::Failed(format!("{dockerfile} line {}: {} {}", used.line, used.reference, e.rule))
            })?;
            if let Some(why) = crate::images::refusal(&image) {
                return Err(Interrupt::Failed(format!(
                    "{dockerfile} line {}: {image} cannot be built from: {why}",
                    used.line
                )));
            }
            let id = self.acquire(engine, &image).await?;
            let on_build = engine.on_build(&id).await?;
            let triggers =
                crate::dockerfile::images(&format!("FROM scratch\n{}", on_build.join("\n")), &HashMap::new());
            if !matches!(triggers.as_deref(), Ok([])) {
                return Err(Interrupt::Failed(format!(
                    "{dockerfile} line {}: {image} cannot be built from: its ONBUILD instructions read other images",
                    used.line
                )));
            }
        }
        Ok(())
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_TEAM.to_owned(), self.state.team_id.as_uuid().to_string()),
            (LABEL_PROJECT.to_owned(), self.state.project_id.as_uuid().to_string()),
            (LABEL_APPLICATION.to_owned(), self.state.application_id.as_uuid().to_string()),
            (LABEL_DEPLOYMENT.to_owned(), self.state.id.as_uuid().to_string()),
        ])
    }

    async fn deploy_key(&self, key_id: uuid::Uuid) -> anyhow::Result<KeyFile> {
        let inner = &self.deployer.inner;
        let (key, _) = inner
            .handler
            .load::<PrivateKey>(self.state.team_id, key_id)
            .await
            .map_err(|e| anyhow::anyhow!("loading the deploy key: {e}"))?;
        let details = key.details().context("the application's deploy key was removed")?;
        let opened =
            inner.keyring.open(&details.private_key).map_err(|e| anyhow::anyhow!("opening the deploy key: {e}"))?;
        KeyFile::write(&inner.config.work_dir.join("keys"), opened.expose())
    }

    async fn build(
        &mut self,
        engine: &crate::docker::Engine,
        url: &str,
        commit: &str,
        dockerfile: &str,
        checkout: &Path,
    ) -> StepResult<String> {
        let args = self.secrets.build_args();
        let key = build_key(url, commit, dockerfile, &args);
        let repo = self.image_repo();
        let tag = self.state.id.as_uuid().to_string();
        // An earlier build of the same sources and arguments is tagged with their key.
        let built = format!("build-{key}");
        if let Some(id) = engine.image_id(&format!("{repo}:{built}")).await? {
            self.log.system(format!("commit {commit} was built with this configuration before: re-using image {id}"));
            engine.tag(&id, &repo, &tag).await?;
            return Ok(id);
        }
        let context = self.scratch.join("context.tar");
        let source = checkout.to_owned();
        let target = context.clone();
        tokio::task::spawn_blocking(move || tar_context(&source, &target))
            .await
            .context("packing the build context")??;
        self.check_build_images(engine, checkout, dockerfile, &args).await?;
        let inner = self.deployer.inner.clone();
        let waiting = inner.builds.acquire();
        let _permit = self.interruptible(waiting).await?.context("the build queue closed")?;
        let reference = format!("{repo}:{tag}");
        self.log.system(format!("building {reference} from {dockerfile}"));
        let log = self.log.clone();
        let output =
            move |line: OutputLine| log.line(if line.is_error { Stream::Stderr } else { Stream::Stdout }, &line.text);
        let limits = inner.config.limits;
        let spec = BuildSpec {
            memory_bytes: Some(limits.build_memory_bytes),
            cpu_millis: Some(limits.build_cpu_millis),
            network: Some(self.team_network(engine).await?),
        };
        let building = tokio::time::timeout(
            limits.build_timeout,
            engine.build(&context, dockerfile, &reference, args, &spec, output),
        );
        let image = match self.interruptible(building).await? {
            Ok(built) => built?,
            Err(_) => {
                return Err(Interrupt::Failed(format!(
                    "the build took longer than its limit of {} s",
                    limits.build_timeout.as_secs()
                )));
            }
        };
        engine.tag(&image, &repo, &built).await?;
        self.log.system(format!("built image {image}"));
        Ok(image)
    }

    /// Takes the previous release off the place it ran on before the application moved
    /// (`server`, or this machine when `None`): its route in that place's proxy, then its
    /// containers. The new release serves by then, so what cannot be removed is logged and left.
    async fn leave(&self, server: Option<zpanel_domain::ids::ServerId>) {
        let place = match self.deployer.place(self.state.team_id, server).await {
            Ok(place) => place,
            Err(e) => {
                self.log.system(format!("could not reach where the previous release runs, to remove it: {e:#}"));
                return;
            }
        };
        let there = place.describe();
        self.log.system(format!("the application moved: removing the previous release from {there}"));
        if let Err(e) = place.proxy.remove_route(*self.state.application_id.as_uuid()).await {
            self.log.system(format!("could not remove the route on {there}: {e:#}"));
        }
        self.remove_previous(&place).await;
    }

    /// Stops and removes the application's other containers (earlier releases) at `place`.
    async fn remove_previous(&self, place: &Place) {
        place
            .remove_containers(*self.state.application_id.as_uuid(), &self.container_name(), |m| self.log.system(m))
            .await;
    }

    /// Keeps the newest images of the application (for rollbacks) and removes the rest.
    async fn prune_images(&self, engine: &crate::docker::Engine) {
        let keep = self.deployer.inner.config.keep_images;
        let Ok(images) = engine.images_of(&self.image_repo()).await else {
            return;
        };
        // An image a container still runs (a rolled-back release's) stays.
        let application = self.state.application_id.as_uuid().to_string();
        let in_use: std::collections::HashSet<String> = engine
            .containers_labelled(LABEL_APPLICATION, &application)
            .await
            .map(|containers| containers.into_iter().map(|c| c.image).collect())
            .unwrap_or_default();
        for (id, _) in images.into_iter().skip(keep.max(1)).filter(|(id, _)| !in_use.contains(id)) {
            if let Ok(true) = engine.remove_image(&id).await {
                self.log.system(format!("removed old image {id}"));
            }
        }
    }
}

fn step_name(step: DeploymentStep) -> &'static str {
    match step {
        DeploymentStep::Resolve => "resolving the commit",
        DeploymentStep::Clone => "cloning",
        DeploymentStep::Build => "building the image",
        DeploymentStep::Pull => "getting the image",
        DeploymentStep::Start => "starting the container",
        DeploymentStep::HealthCheck => "checking health",
        DeploymentStep::Route => "switching the route",
        DeploymentStep::Cleanup => "cleaning up",
    }
}

/// Whether `image` is a full image id (`sha256:` and 64 hex digits), which names one image
/// and only that one.
fn is_image_id(image: &str) -> bool {
    image.strip_prefix("sha256:").is_some_and(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The text of file `path` of the checkout `dir`, refused when it leads out of the checkout
/// (a symbolic link to a file of the worker's host).
async fn read_in(dir: &Path, path: &str) -> StepResult<String> {
    let root = tokio::fs::canonicalize(dir).await.context("reading the checkout")?;
    let file =
        tokio::fs::canonicalize(dir.join(path)).await.with_context(|| format!("{path} is not in the repository"))?;
    if !file.starts_with(&root) {
        return Err(Interrupt::Failed(format!("{path} leads out of the repository")));
    }
    let text = tokio::fs::read(&file).await.with_context(|| format!("reading {path}"))?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// What an image is built from; an image with the same key is the same build.
fn build_key(url: &str, commit: &str, dockerfile: &str, args: &HashMap<String, String>) -> String {
    let mut hash = Sha256::new();
    for part in [url, commit, dockerfile] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let sorted: BTreeMap<&String, &String> = args.iter().collect();
    for (k, v) in sorted {
        hash.update(k.as_bytes());
        hash.update([0]);
        // Values enter only as their own hashes: the key is a label anyone can read.
        hash.update(Sha256::digest(v.as_bytes()));
    }
    hex::encode(hash.finalize())
}

/// Packs `dir` (without `.git`) into the tar file `target`; symbolic links stay links.
fn tar_context(dir: &Path, target: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(target).context("creating the build context")?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&current)
            .with_context(|| format!("reading {}", current.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            let relative = path.strip_prefix(dir).context("a path outside the context")?;
            if current == dir && entry.file_name() == ".git" {
                continue;
            }
            let kind = entry.file_type()?;
            tar.append_path_with_name(&path, relative).with_context(|| format!("packing {}", relative.display()))?;
            if kind.is_dir() {
                pending.push(path);
            }
        }
    }
    tar.into_inner().context("finishing the build context")?.into_inner().context("writing the build context")?;
    Ok(())
}

/// Waits until the container answers its health check through its published port; returns
/// that port. Failures in the start period don't count; the first second polls quickly, so a
/// quick application is released quickly.
async fn health_check(
    engine: &crate::docker::Engine,
    dial: &Dial,
    container: &str,
    port: u16,
    check: &HealthCheck,
    log: &DeployLog,
) -> anyhow::Result<u16> {
    let http = Http::new(dial.clone(), Duration::from_secs(u64::from(check.timeout_secs)));
    let interval = Duration::from_secs(u64::from(check.interval_secs));
    let start_period = Duration::from_secs(u64::from(check.start_period_secs));
    let started = Instant::now();
    let mut failures = 0u32;
    let mut next_counted = interval.min(Duration::from_secs(1));
    log.line(Stream::System, &format!("checking GET {} every {} s", check.path, check.interval_secs));
    loop {
        let info = engine.inspect(container, port).await?.context("the new container disappeared")?;
        if !info.running {
            // A crashed container its policy already started again tells no exit code; it
            // does between lives, while the policy waits (longer each time).
            let mut exit_code = info.exit_code;
            let asked = Instant::now();
            while exit_code.is_none() && asked.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                exit_code = engine.inspect(container, port).await?.and_then(|i| i.exit_code);
            }
            // The engine may not have written a crashed container's output yet.
            let mut last = Vec::new();
            for _ in 0..20 {
                last = engine.last_lines(container, 20).await.unwrap_or_default();
                if !last.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for line in &last {
                log.line(if line.is_error { Stream::Stderr } else { Stream::Stdout }, &line.text);
            }
            let tail: Vec<&str> = last.iter().rev().take(5).rev().map(|l| l.text.as_str()).collect();
            anyhow::bail!(
                "the container exited with code {} before it was healthy; its last lines: {}",
                exit_code.map_or_else(|| "unknown".to_owned(), |code| code.to_string()),
                if tail.is_empty() { "(none)".to_owned() } else { tail.join(" / ") }
            );
        }
        let (host_port, attempt) = match info.host_port {
            Some(port) => (port, http.get(&format!("http://127.0.0.1:{port}{}", check.path)).await.map_err(Some)),
            None => (0, Err(None)),
        };
        let problem = match attempt {
            Ok(answer) if answer.status.is_success() || answer.status.is_redirection() => {
                log.line(
                    Stream::System,
                    &format!(
                        "healthy after {:.1} s: {} answered {}",
                        started.elapsed().as_secs_f32(),
                        check.path,
                        answer.status
                    ),
                );
                return Ok(host_port);
            }
            Ok(answer) => format!("{} answered {}", check.path, answer.status),
            Err(None) => "the container publishes no port yet".to_owned(),
            Err(Some(HttpError::Timeout(_))) => {
                format!("{} did not answer within {} s", check.path, check.timeout_secs)
            }
            Err(Some(HttpError::Failed(e))) => format!("{} could not be reached: {e}", check.path),
        };
        let elapsed = started.elapsed();
        if elapsed >= next_counted {
            next_counted = elapsed + interval;
            if elapsed >= start_period {
                failures += 1;
                log.line(Stream::System, &format!("health check failed ({failures}/{}): {problem}", check.retries));
                if failures >= check.retries {
                    anyhow::bail!("the health check failed {failures} times; last: {problem}");
                }
            }
        }
        let quick = Duration::from_millis(50);
        tokio::time::sleep(if elapsed < Duration::from_secs(1) {
            quick
        } else {
            next_counted.saturating_sub(elapsed).max(quick)
        })
        .await;
    }
}

/// Requests the application through the proxy until it answers (Caddy applies a config
/// change within milliseconds, but not within none).
async fn verify_route(proxy: &crate::proxy::Proxy, domain: &str, path: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match proxy.probe(domain, path).await {
            Ok(status) if (200..400).contains(&status) => return Ok(()),
            Ok(status) => last = format!("answered {status}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{domain}{path} through the proxy at {}: {last}", proxy.listen())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_key_changes_with_what_the_image_is_built_from() {
        let args = HashMap::from([("A".to_owned(), "1".to_owned())]);
        let base = build_key("/repo", "c1", "Dockerfile", &args);
        assert_eq!(base, build_key("/repo", "c1", "Dockerfile", &args.clone()));
        assert_ne!(base, build_key("/repo", "c2", "Dockerfile", &args));
        assert_ne!(base, build_key("/repo", "c1", "other/Dockerfile", &args));
        assert_ne!(base, build_key("/repo", "c1", "Dockerfile", &HashMap::from([("A".to_owned(), "2".to_owned())])));
        assert!(!base.contains('1') || base.len() == 64);
    }

    #[test]
    fn the_build_context_leaves_out_git_and_keeps_links() {
        let dir = std::env::temp_dir().join(format!("zpanel-ctx-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join(".git")).expect("dir");
        std::fs::create_dir_all(dir.join("www")).expect("dir");
        std::fs::write(dir.join(".git/HEAD"), "ref").expect("file");
        std::fs::write(dir.join("Dockerfile"), "FROM x").expect("file");
        std::fs::write(dir.join("www/index.html"), "hi").expect("file");
        std::os::unix::fs::symlink("/etc/passwd", dir.join("www/link")).expect("link");
        let target = dir.with_extension("tar");
        tar_context(&dir, &target).expect("packs");
        let mut archive = tar::Archive::new(std::fs::File::open(&target).expect("tar"));
        let mut names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let kind = if e.header().entry_type().is_symlink() { "@" } else { "" };
                format!("{}{kind}", e.path().expect("path").display())
            })
            .collect();
        names.sort();
        assert_eq!(names, ["Dockerfile", "www", "www/index.html", "www/link@"]);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&target);
    }
}
