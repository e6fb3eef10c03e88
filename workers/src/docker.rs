//! The Docker Engine, through its HTTP API (bollard): images built, tagged, pulled and pruned;
//! containers created, started, inspected, followed and removed. Never the `docker` CLI, so no
//! user value is ever parsed by a shell.
//!
//! What Zpanel creates carries labels (team, project, application, deployment), so it can
//! always find its own containers and images again, whoever created them.

use crate::remote::Dial;
use anyhow::Context as _;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, NetworkCreateRequest, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, CreateImageOptions, InspectNetworkOptions, ListContainersOptions,
    ListImagesOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions, StopContainerOptions, TagImageOptions,
};
use futures::{Stream, StreamExt as _};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use zpanel_domain::values::ImageRef;

/// Label: the team a container or image belongs to.
pub const LABEL_TEAM: &str = "zpanel.team";
/// Label: the project.
pub const LABEL_PROJECT: &str = "zpanel.project";
/// Label: the application.
pub const LABEL_APPLICATION: &str = "zpanel.application";
/// Label: the deployment that created it.
pub const LABEL_DEPLOYMENT: &str = "zpanel.deployment";

/// Where the engine is: `unix:///var/run/docker.sock` (the default) or `tcp://host:port`.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// A request may take this long: builds and pulls stream for minutes.
const REQUEST_TIMEOUT_SECS: u64 = 3600;

/// The longest line of build output held while waiting for its end; a longer one is handed
/// out in pieces (a program that prints without newlines must not fill the worker's memory).
const MAX_PARTIAL_LINE: usize = 64 * 1024;

/// A Docker Engine.
#[derive(Clone, Debug)]
pub struct Engine {
    docker: Docker,
}

/// One line of output of a build, a pull or a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLine {
    /// Standard error (or an engine error), rather than standard output.
    pub is_error: bool,
    /// The line, without its newline.
    pub text: String,
}

/// A container as the engine reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Its id.
    pub id: String,
    /// Its name, without the leading `/`.
    pub name: String,
    /// Whether it runs.
    pub running: bool,
    /// Its exit code, once it stopped (or while its restart policy waits to start it again);
    /// `None` while a life of it runs.
    pub exit_code: Option<i64>,
    /// The host port (on 127.0.0.1) published for the application's port.
    pub host_port: Option<u16>,
    /// The image id it runs.
    pub image: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
}

/// What a new container runs.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// Its name.
    pub name: String,
    /// The image (id or reference).
    pub image: String,
    /// `KEY=value` pairs (secrets opened: this is only ever sent to the engine).
    pub env: Vec<String>,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// The port the application listens on inside the container; published on 127.0.0.1 at a
    /// port the engine chooses.
    pub port: u16,
    /// Memory limit in bytes (swap included: the container gets no swap beyond it).
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU.
    pub cpu_millis: Option<u32>,
    /// How many processes (and threads) it may run at once.
    pub pids: Option<i64>,
    /// The network it joins (its team's); `None`: the engine's default bridge.
    pub network: Option<String>,
}

/// What a build may use: its `RUN` steps run in containers like any other.
#[derive(Clone, Debug, Default)]
pub struct BuildSpec {
    /// Memory limit in bytes of each step's container (swap included).
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU.
    pub cpu_millis: Option<u32>,
    /// The network its steps join (the team's); `None`: the engine's default bridge.
    pub network: Option<String>,
}

/// A network Zpanel keeps for a team: a bridge of its own, so its containers share no
/// network with other teams'.
#[derive(Clone, Debug)]
pub struct NetworkSpec {
    /// Its name (`zpanel-team-<team>`).
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
}

impl Engine {
    /// Connects to the engine at `host` (`unix://…`, `tcp://…`, `http://…`) and agrees on an
    /// API version it speaks.
    ///
    /// # Errors
    /// When the address is not understood or the engine does not answer.
    pub async fn connect(host: &str) -> anyhow::Result<Self> {
        let docker = if let Some(path) = host.strip_prefix("unix://") {
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        } else if host.starts_with("tcp://") || host.starts_with("http://") {
            Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        } else {
            anyhow::bail!("the Docker host {host:?} must start with unix://, tcp:// or http://")
        }
        .with_context(|| format!("connecting to the Docker Engine at {host}"))?;
        let docker = docker.negotiate_version().await.with_context(|| format!("the Docker Engine at {host}"))?;
        Ok(Self { docker })
    }

    /// The engine reached with `dial` (which must go to its socket: [`Dial::to_socket`]), such
    /// as a server's, through its pooled SSH connection; agrees on an API version. The
    /// connections behind the engine's requests are kept for 30 s between them.
    ///
    /// # Errors
    /// When the engine does not answer.
    pub async fn over(dial: Dial) -> anyhow::Result<Self> {
        let place = dial.describe();
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(dial);
        let transport = move |request: bollard::BollardRequest| {
            let client = client.clone();
            async move { client.request(request).await.map_err(bollard::errors::Error::from) }
        };
        let docker = Docker::connect_with_custom_transport(
            transport,
            Some("http://docker.engine"),
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .with_context(|| format!("connecting to the Docker Engine on {place}"))?;
        let docker =
            docker.negotiate_version().await.with_context(|| format!("reaching the Docker Engine on {place}"))?;
        Ok(Self { docker })
    }

    /// Asks the engine whether it is there (`GET /_ping`, the cheapest call it answers).
    ///
    /// # Errors
    /// When the engine does not answer.
    pub async fn ping(&self) -> anyhow::Result<()> {
        self.docker.ping().await.context("pinging the Docker Engine")?;
        Ok(())
    }

    /// The engine's version (`24.0.7`).
    ///
    /// # Errors
    /// When the engine does not answer.
    pub async fn version(&self) -> anyhow::Result<String> {
        let version = self.docker.version().await.context("asking the Docker Engine for its version")?;
        Ok(version.version.unwrap_or_default())
    }

    /// Builds the image of the tar archive `context` (a file) with `dockerfile`, tagged `tag`,
    /// passing `build_args`, within `spec`'s limits; each line of output goes to `output`.
    /// Returns the image id.
    ///
    /// Images get no labels: the legacy builder turns each label into a step of its own (a
    /// container created and committed, ~120 ms each). Zpanel finds its images by their
    /// repository (`zpanel/<application>`) and tags instead.
    ///
    /// Dropping the future mid-build closes the connection, and the engine cancels the build.
    ///
    /// # Errors
    /// When the engine fails or the build fails (with the build's own error message).
    pub async fn build(
        &self,
        context: &Path,
        dockerfile: &str,
        tag: &str,
        build_args: HashMap<String, String>,
        spec: &BuildSpec,
        mut output: impl FnMut(OutputLine),
    ) -> anyhow::Result<String> {
        let file = tokio::fs::File::open(context).await.context("opening the build context")?;
        let body = bollard::body_try_stream(file_chunks(file));
        // The client carries the build's memory as a 32-bit number: at most 2 GiB.
        let memory = spec.memory_bytes.map(|m| i32::try_from(m).unwrap_or(i32::MAX));
        let options = BuildImageOptions {
            dockerfile: dockerfile.to_owned(),
            t: Some(tag.to_owned()),
            rm: true,
            forcerm: true,
            // The classic builder's cache is the engine's, shared by every team: a step is
            // reused when its parent and instruction match, whoever built it. A tenant could
            // build `FROM base` + `RUN <your install step>` with a payload of its own and have
            // another team's build pick up that layer. So no build reads the cache.
            nocache: true,
            buildargs: Some(build_args),
            memory,
            memswap: memory,
            cpuperiod: spec.cpu_millis.map(|_| CPU_PERIOD_MICROS),
            cpuquota: spec
                .cpu_millis
                .map(|m| i32::try_from(i64::from(m) * i64::from(CPU_PERIOD_MICROS) / 1000).unwrap_or(i32::MAX)),
            networkmode: spec.network.clone(),
            ..Default::default()
        };
        let mut stream = self.docker.build_image(options, None, Some(body));
        let mut image_id = None;
        let mut partial = String::new();
        while let Some(info) = stream.next().await {
            let info = info.map_err(engine_error).context("building the image")?;
            if let Some(text) = info.stream {
                split_lines(&mut partial, &text, |line| output(OutputLine { is_error: false, text: line }));
            }
            if let Some(error) = info.error_detail.and_then(|d| d.message) {
                flush(&mut partial, |line| output(OutputLine { is_error: false, text: line }));
                output(OutputLine { is_error: true, text: error.clone() });
                anyhow::bail!("the build failed: {error}");
            }
            if let Some(id) = info.aux.and_then(|aux| aux.id) {
                image_id = Some(id);
            }
        }
        flush(&mut partial, |line| output(OutputLine { is_error: false, text: line }));
        match image_id {
            Some(id) => Ok(id),
            // Older engines only say "Successfully built"; the tag names the result.
            None => self.image_id(tag).await?.context("the build finished without an image"),
        }
    }

    /// Pulls `image`, each line of progress going to `output`; returns the id of the image the
    /// pull brought: the one its repository holds at the digest the registry reported, never
    /// what the name alone resolves to (which may be another image the engine stores).
    ///
    /// # Errors
    /// When the registry cannot be reached or refuses (with its message), or the pull did not
    /// report what it brought.
    pub async fn pull(&self, image: &ImageRef, mut output: impl FnMut(OutputLine)) -> anyhow::Result<String> {
        let options = CreateImageOptions { from_image: Some(image.as_str().to_owned()), ..Default::default() };
        let mut stream = self.docker.create_image(Some(options), None, None);
        let mut digest = image.digest().map(str::to_owned);
        while let Some(info) = stream.next().await {
            let info = info.map_err(engine_error).with_context(|| format!("pulling {image}"))?;
            if let Some(error) = info.error_detail.and_then(|d| d.message) {
                anyhow::bail!("pulling {image}: {error}");
            }
            if let Some(status) = info.status {
                if let Some(reported) = status.strip_prefix("Digest: ") {
                    digest = Some(reported.trim().to_owned());
                }
                let text = match info.id {
                    Some(id) => format!("{id}: {status}"),
                    None => status,
                };
                output(OutputLine { is_error: false, text });
            }
        }
        let digest = digest.with_context(|| format!("pulling {image}: the registry reported no digest"))?;
        let pinned = format!("{}@{digest}", image.repository());
        self.image_id(&pinned).await?.with_context(|| format!("{pinned} is missing after the pull"))
    }

    /// The id of the image the engine stores under `image`'s name (repository and tag, or
    /// digest) — looked up by that name alone, never as an id or an id's prefix.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn image_id_by_name(&self, image: &ImageRef) -> anyhow::Result<Option<String>> {
        let name = crate::images::local_name(image);
        let found = match self.docker.inspect_image(&name).await {
            Ok(found) => found,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(engine_error(e)).with_context(|| format!("inspecting image {name}")),
        };
        let named = found.repo_tags.iter().flatten().chain(found.repo_digests.iter().flatten()).any(|n| *n == name);
        Ok(found.id.filter(|_| named))
    }

    /// The `ONBUILD` instructions image `id` hands to builds `FROM` it.
    ///
    /// # Errors
    /// When the engine fails or has no such image.
    pub async fn on_build(&self, id: &str) -> anyhow::Result<Vec<String>> {
        let image = self
            .docker
            .inspect_image(id)
            .await
            .map_err(engine_error)
            .with_context(|| format!("inspecting image {id}"))?;
        Ok(image.config.and_then(|c| c.on_build).unwrap_or_default())
    }

    /// Makes sure network `spec.name` exists (a bridge with `spec`'s labels).
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn ensure_network(&self, spec: &NetworkSpec) -> anyhow::Result<()> {
        match self.docker.inspect_network(&spec.name, None::<InspectNetworkOptions>).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(e)).with_context(|| format!("inspecting network {}", spec.name)),
        }
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(spec.labels.clone()),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            // Made by another deployment of the team meanwhile.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(engine_error(e)).with_context(|| format!("creating network {}", spec.name)),
        }
    }

    /// The id of image `reference`, if the engine has it.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn image_id(&self, reference: &str) -> anyhow::Result<Option<String>> {
        match self.docker.inspect_image(reference).await {
            Ok(image) => Ok(image.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine_error(e)).with_context(|| format!("inspecting image {reference}")),
        }
    }

    /// Images of repository `repo` (any tag), newest first: their ids and tags.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn images_of(&self, repo: &str) -> anyhow::Result<Vec<(String, Vec<String>)>> {
        let filters = HashMap::from([("reference".to_owned(), vec![repo.to_owned()])]);
        let options = ListImagesOptions { filters: Some(filters), ..Default::default() };
        let mut images =
            self.docker.list_images(Some(options)).await.map_err(engine_error).context("listing images")?;
        images.sort_by_key(|i| std::cmp::Reverse(i.created));
        Ok(images.into_iter().map(|i| (i.id, i.repo_tags)).collect())
    }

    /// Tags image `id` as `repo:tag`.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn tag(&self, id: &str, repo: &str, tag: &str) -> anyhow::Result<()> {
        let options = TagImageOptions { repo: Some(repo.to_owned()), tag: Some(tag.to_owned()) };
        self.docker.tag_image(id, Some(options)).await.map_err(engine_error).with_context(|| format!("tagging {id}"))
    }

    /// Removes image `id` (with its tags), unless a container still uses it.
    ///
    /// # Errors
    /// When the engine fails for another reason than the image being in use or gone.
    pub async fn remove_image(&self, id: &str) -> anyhow::Result<bool> {
        let options = RemoveImageOptions { force: true, noprune: false, ..Default::default() };
        match self.docker.remove_image(id, Some(options), None).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(false),
            Err(e) => Err(engine_error(e)).with_context(|| format!("removing image {id}")),
        }
    }

    /// Creates and starts a container; returns its id.
    ///
    /// # Errors
    /// When the engine refuses (e.g. the name is taken, the image is missing).
    pub async fn run(&self, spec: &ContainerSpec) -> anyhow::Result<String> {
        let port = format!("{}/tcp", spec.port);
        let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
        let memory = spec.memory_bytes.and_then(|m| i64::try_from(m).ok());
        let host_config = HostConfig {
            port_bindings: Some(HashMap::from([(port.clone(), Some(vec![binding]))])),
            memory,
            // Swap counts within the limit: a container over its memory cannot spill to disk.
            memory_swap: memory,
            nano_cpus: spec.cpu_millis.map(|m| i64::from(m) * 1_000_000),
            pids_limit: spec.pids,
            // Nothing inside gains privileges through setuid binaries or file capabilities.
            security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
            network_mode: spec.network.clone(),
            // A small init as PID 1 forwards signals and reaps zombies, so a stop is prompt
            // even for programs that ignore SIGTERM as PID 1 (busybox httpd, many shells).
            init: Some(true),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            exposed_ports: Some(vec![port]),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(engine_error)
            .with_context(|| format!("creating container {}", spec.name))?;
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(engine_error)
            .with_context(|| format!("starting container {}", spec.name))?;
        Ok(created.id)
    }

    /// A container by id or name, if it exists.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn inspect(&self, container: &str, port: u16) -> anyhow::Result<Option<ContainerInfo>> {
        let info = match self.docker.inspect_container(container, None).await {
            Ok(info) => info,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(engine_error(e)).with_context(|| format!("inspecting container {container}")),
        };
        let state = info.state.unwrap_or_default();
        // A container that crashed is restarted by its policy: between two lives it reports
        // itself restarting (and, for a moment, running without ports).
        let crashed = state.restarting.unwrap_or(false) || info.restart_count.unwrap_or(0) > 0;
        let running = state.running.unwrap_or(false) && !crashed;
        let host_port = info
            .network_settings
            .and_then(|n| n.ports)
            .and_then(|mut ports| ports.remove(&format!("{port}/tcp")))
            .flatten()
            .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port?.parse().ok()));
        let config = info.config.unwrap_or_default();
        Ok(Some(ContainerInfo {
            id: info.id.unwrap_or_default(),
            name: info.name.unwrap_or_default().trim_start_matches('/').to_owned(),
            running,
            // The engine keeps the exit code only until the next life starts; a crashed
            // container alive again has none to tell.
            exit_code: if state.running.unwrap_or(false) && !state.restarting.unwrap_or(false) {
                None
            } else {
                state.exit_code
            },
            host_port,
            image: info.image.unwrap_or_default(),
            labels: config.labels.unwrap_or_default(),
        }))
    }

    /// Containers (running or not) carrying `label=value`, newest first.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn containers_labelled(&self, label: &str, value: &str) -> anyhow::Result<Vec<ContainerInfo>> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{label}={value}")])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let mut found =
            self.docker.list_containers(Some(options)).await.map_err(engine_error).context("listing containers")?;
        found.sort_by_key(|c| std::cmp::Reverse(c.created));
        Ok(found
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .unwrap_or_default()
                    .first()
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                running: c.state.is_some_and(|s| s.to_string() == "running"),
                exit_code: None,
                host_port: c.ports.unwrap_or_default().iter().find_map(|p| p.public_port),
                image: c.image_id.unwrap_or_default(),
                labels: c.labels.unwrap_or_default(),
            })
            .collect())
    }

    /// Stops a container, giving it `grace` to exit after SIGTERM.
    ///
    /// # Errors
    /// When the engine fails for another reason than the container being gone.
    pub async fn stop(&self, container: &str, grace: Duration) -> anyhow::Result<()> {
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        match self.docker.stop_container(container, Some(StopContainerOptions { t: Some(t), signal: None })).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) || is_not_modified(&e) => Ok(()),
            Err(e) => Err(engine_error(e)).with_context(|| format!("stopping container {container}")),
        }
    }

    /// Starts a stopped container.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn start(&self, container: &str) -> anyhow::Result<()> {
        match self.docker.start_container(container, None).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_modified(&e) => Ok(()),
            Err(e) => Err(engine_error(e)).with_context(|| format!("starting container {container}")),
        }
    }

    /// Removes a container, stopping it first if it runs; a missing one is fine.
    ///
    /// # Errors
    /// When the engine fails for another reason.
    pub async fn remove(&self, container: &str) -> anyhow::Result<()> {
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(engine_error(e)).with_context(|| format!("removing container {container}")),
        }
    }

    /// The last `tail` lines a container wrote.
    ///
    /// # Errors
    /// When the engine fails.
    pub async fn last_lines(&self, container: &str, tail: u32) -> anyhow::Result<Vec<OutputLine>> {
        let mut lines = Vec::new();
        let mut stream = std::pin::pin!(self.logs(container, tail, false));
        while let Some(line) = stream.next().await {
            lines.push(line?);
        }
        Ok(lines)
    }

    /// A container's output: the last `tail` lines, then (with `follow`) what it writes next.
    pub fn logs(
        &self,
        container: &str,
        tail: u32,
        follow: bool,
    ) -> impl Stream<Item = anyhow::Result<OutputLine>> + Send + 'static {
        let options = LogsOptions { follow, stdout: true, stderr: true, tail: tail.to_string(), ..Default::default() };
        self.docker.logs(container, Some(options)).flat_map(|chunk| {
            let lines: Vec<anyhow::Result<OutputLine>> = match chunk {
                Ok(output) => {
                    use bollard::container::LogOutput;
                    let (is_error, bytes) = match output {
                        LogOutput::StdErr { message } => (true, message),
                        LogOutput::StdOut { message }
                        | LogOutput::Console { message }
                        | LogOutput::StdIn { message } => (false, message),
                    };
                    String::from_utf8_lossy(&bytes)
                        .lines()
                        .map(|text| Ok(OutputLine { is_error, text: text.to_owned() }))
                        .collect()
                }
                Err(e) => vec![Err(engine_error(e).context("reading container logs"))],
            };
            futures::stream::iter(lines)
        })
    }
}

/// The engine's own message, not bollard's wrapping of it.
fn engine_error(e: bollard::errors::Error) -> anyhow::Error {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            anyhow::anyhow!("the Docker Engine answered {status_code}: {message}")
        }
        bollard::errors::Error::DockerStreamError { error } => anyhow::anyhow!("the Docker Engine: {error}"),
        other => anyhow::Error::new(other),
    }
}

fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    status_of(e) == Some(404)
}

fn is_conflict(e: &bollard::errors::Error) -> bool {
    status_of(e) == Some(409)
}

fn is_not_modified(e: &bollard::errors::Error) -> bool {
    status_of(e) == Some(304)
}

/// The CFS period builds' CPU quota is counted in (the kernel's default).
const CPU_PERIOD_MICROS: i32 = 100_000;

/// Appends `text` to `partial` and hands out each complete line; a line longer than
/// [`MAX_PARTIAL_LINE`] is handed out in pieces of that size.
fn split_lines(partial: &mut String, text: &str, mut line: impl FnMut(String)) {
    partial.push_str(text);
    loop {
        if let Some(end) = partial.find('\n') {
            let rest = partial.split_off(end + 1);
            let mut complete = std::mem::replace(partial, rest);
            complete.truncate(complete.trim_end_matches(['\n', '\r']).len());
            line(complete);
        } else if partial.len() > MAX_PARTIAL_LINE {
            let mut end = MAX_PARTIAL_LINE;
            while !partial.is_char_boundary(end) {
                end -= 1;
            }
            let rest = partial.split_off(end);
            line(std::mem::replace(partial, rest));
        } else {
            return;
        }
    }
}

fn flush(partial: &mut String, mut line: impl FnMut(String)) {
    if !partial.is_empty() {
        line(std::mem::take(partial));
    }
}

/// A file as a stream of 64 KiB chunks: a build context is sent without holding it in memory.
fn file_chunks(file: tokio::fs::File) -> impl Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures::stream::try_unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 64 * 1024];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((bytes::Bytes::from(buf), file)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_output_is_split_into_lines_across_chunks() {
        let mut partial = String::new();
        let mut lines = Vec::new();
        split_lines(&mut partial, "Step 1/3 : FROM x\nStep 2", |l| lines.push(l));
        split_lines(&mut partial, "/3 : RUN y\r\n", |l| lines.push(l));
        split_lines(&mut partial, "no newline", |l| lines.push(l));
        flush(&mut partial, |l| lines.push(l));
        assert_eq!(lines, ["Step 1/3 : FROM x", "Step 2/3 : RUN y", "no newline"]);
    }

    #[test]
    fn output_without_newlines_is_handed_out_in_bounded_pieces() {
        let mut partial = String::new();
        let mut lines = Vec::new();
        for _ in 0..3 {
            split_lines(&mut partial, &"x".repeat(MAX_PARTIAL_LINE), |l| lines.push(l.len()));
        }
        assert!(partial.len() <= MAX_PARTIAL_LINE);
        assert_eq!(lines, [MAX_PARTIAL_LINE, MAX_PARTIAL_LINE]);
    }
}
