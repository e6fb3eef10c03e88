//! Settings, from command-line flags or `ZPANEL_*` environment variables (see API.md).

use std::path::PathBuf;

/// What every subcommand needs to reach its data.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Data directory: the private PostgreSQL cluster, the master key file, build folders.
    #[arg(long, env = "ZPANEL_DATA_DIR", default_value = "./zpanel-data", global = true)]
    pub data_dir: PathBuf,

    /// PostgreSQL to use instead of the private cluster (`postgres://…`).
    #[arg(long, env = "ZPANEL_DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// Master keys for sealing secrets: base64 32-byte keys, comma-separated, newest first.
    /// Default: the key file in the data directory (created on first start).
    #[arg(long, env = "ZPANEL_MASTER_KEY", hide_env_values = true, global = true)]
    pub master_key: Option<String>,

    /// Address the API listens on (`host:port`; port 0 picks a free one).
    #[arg(long, env = "ZPANEL_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: String,

    /// API requests per second each token may send (sustained).
    #[arg(long, env = "ZPANEL_API_RATE", default_value_t = 50, global = true)]
    pub api_rate: u32,

    /// API requests a token may send at once, beyond the sustained rate.
    #[arg(long, env = "ZPANEL_API_BURST", default_value_t = 200, global = true)]
    pub api_burst: u32,

    /// Largest answer the API sends (JSON bytes); a larger one is replaced by a
    /// `LIMIT_EXCEEDED` error.
    #[arg(long, env = "ZPANEL_API_MAX_RESPONSE_BYTES", default_value_t = zpanel_api::limits::RESPONSE_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=1 << 30), global = true)]
    pub api_max_response_bytes: usize,

    /// Subscriptions one API token may hold open at once (per API process).
    #[arg(long, env = "ZPANEL_SUBSCRIPTIONS_PER_TOKEN", default_value_t = zpanel_api::limits::SUBSCRIPTIONS_PER_TOKEN,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000), global = true)]
    pub subscriptions_per_token: usize,

    /// Subscriptions one WebSocket may hold open at once.
    #[arg(long, env = "ZPANEL_SUBSCRIPTIONS_PER_SOCKET", default_value_t = zpanel_api::limits::SUBSCRIPTIONS_PER_SOCKET,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000), global = true)]
    pub subscriptions_per_socket: usize,

    /// Where `serve` and `api` serve `/metrics` (`host:port`; port 0 picks a free one; empty:
    /// nowhere). Never on the API's listener: the counters describe every team's traffic, so
    /// they stay on loopback unless the operator opens them.
    #[arg(long, env = "ZPANEL_METRICS_LISTEN", default_value = "127.0.0.1:9464", global = true)]
    pub metrics_listen: String,

    /// Responses of a shared live audit stream buffered for its slowest WebSocket subscriber;
    /// one further behind catches up from the audit log on its own.
    #[arg(long, env = "ZPANEL_SUBSCRIPTION_BUFFER", default_value_t = zpanel_api::hub::CAPACITY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000), global = true)]
    pub subscription_buffer: usize,

    /// Kafka brokers (`host:port,…`): set, `serve` and `worker` relay the log to Kafka and
    /// feed workers from consumer groups; unset, workers are fed from the log in-process.
    #[arg(long, env = "ZPANEL_KAFKA_BROKERS", global = true)]
    pub kafka_brokers: Option<String>,

    /// The topic events are relayed to.
    #[arg(long, env = "ZPANEL_KAFKA_TOPIC", default_value = zpanel_workers::kafka::DEFAULT_TOPIC, global = true)]
    pub kafka_topic: String,

    /// Partitions of the events topic, when Zpanel creates it.
    #[arg(long, env = "ZPANEL_KAFKA_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=1024), global = true)]
    pub kafka_partitions: i32,

    /// How often (seconds) running deployments are checked for lapsed leases.
    #[arg(long, env = "ZPANEL_LEASE_SWEEP_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600), global = true)]
    pub lease_sweep_seconds: u64,

    /// How long (seconds) a worker's lease on a deployment lasts unless renewed (renewed every
    /// third of it); a dead worker's deployment is taken over this long after it died.
    #[arg(long, env = "ZPANEL_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600), global = true)]
    pub lease_seconds: u64,

    /// Where `zpanel worker` serves `/metrics` and `/healthz` (`host:port`); unset, it serves
    /// nothing (`serve` shows the workers' metrics on the API's `/metrics`).
    #[arg(long, env = "ZPANEL_WORKER_LISTEN", global = true)]
    pub worker_listen: Option<String>,

    /// The Docker Engine deployments run on (`unix:///path` or `tcp://host:port`).
    #[arg(long, env = "ZPANEL_DOCKER_HOST", default_value = zpanel_workers::docker::DEFAULT_HOST, global = true)]
    pub docker_host: String,

    /// The admin API of the Caddy that routes domains to applications.
    #[arg(long, env = "ZPANEL_CADDY_ADMIN", default_value = zpanel_workers::proxy::DEFAULT_ADMIN, global = true)]
    pub caddy_admin: String,

    /// Address of the HTTP server Zpanel creates in Caddy for applications.
    #[arg(long, env = "ZPANEL_PROXY_LISTEN", default_value = zpanel_workers::proxy::DEFAULT_LISTEN, global = true)]
    pub proxy_listen: String,

    /// The admin API of the Caddy on each remote server, as seen on that server (reached
    /// through its SSH connection).
    #[arg(long, env = "ZPANEL_REMOTE_CADDY_ADMIN", default_value = zpanel_workers::proxy::DEFAULT_ADMIN, global = true)]
    pub remote_caddy_admin: String,

    /// Address of the HTTP server Zpanel creates in each remote server's Caddy.
    #[arg(long, env = "ZPANEL_REMOTE_PROXY_LISTEN", default_value = zpanel_workers::proxy::DEFAULT_LISTEN, global = true)]
    pub remote_proxy_listen: String,

    /// How long a deployment may take in all (seconds) before it fails.
    #[arg(long, env = "ZPANEL_DEPLOY_TIMEOUT_SECONDS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(10..=86_400), global = true)]
    pub deploy_timeout_seconds: u64,

    /// How long (seconds) the previous release keeps finishing its requests after the switch.
    #[arg(long, env = "ZPANEL_DEPLOY_GRACE_SECONDS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=600), global = true)]
    pub deploy_grace_seconds: u64,

    /// Images kept per application for rollbacks.
    #[arg(long, env = "ZPANEL_DEPLOY_KEEP_IMAGES", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100), global = true)]
    pub deploy_keep_images: u64,

    /// A new deployment cancels the application's deployments still waiting (instead of
    /// queueing behind them).
    #[arg(long, env = "ZPANEL_DEPLOY_SUPERSEDE", default_value_t = false, global = true)]
    pub deploy_supersede: bool,

    /// How often (seconds) routes are checked against the running releases and repaired.
    #[arg(long, env = "ZPANEL_ROUTE_SYNC_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400), global = true)]
    pub route_sync_seconds: u64,

    /// How often (seconds) validated servers are checked over SSH; a change of reachability is
    /// recorded (`ServerBecameUnreachable`, `ServerRecovered`). 0 turns the checks off
    /// (`runServerCheck` still works).
    #[arg(long, env = "ZPANEL_SERVER_CHECK_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400), global = true)]
    pub server_check_seconds: u64,

    /// Directories (comma-separated) under which applications may be built from local
    /// repositories (`/path` or `file:///path` as `gitUrl`); unset, none may. Any path the
    /// worker's user can read would otherwise be a tenant's to clone.
    #[arg(long, env = "ZPANEL_GIT_LOCAL_ROOTS", value_parser = local_roots, global = true)]
    pub git_local_roots: Option<LocalRoots>,

    /// The host names the control plane (API, dashboard) is reached at, comma-separated: no
    /// application may claim one, nor a wildcard covering one. IP addresses are left out
    /// (applications' domains are names). Unset: none reserved.
    #[arg(long, env = "ZPANEL_PUBLIC_HOST", value_delimiter = ',', global = true)]
    pub public_host: Vec<String>,

    /// Image builds a worker runs at once.
    #[arg(long, env = "ZPANEL_DEPLOY_BUILDS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64), global = true)]
    pub deploy_builds: u64,

    /// Lines of its programs' output a deployment's log keeps; the rest is left out, and the
    /// log says so.
    #[arg(long, env = "ZPANEL_DEPLOY_LOG_MAX_LINES", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(10..=10_000_000), global = true)]
    pub deploy_log_max_lines: u64,

    /// Bytes of its programs' output a deployment's log keeps.
    #[arg(long, env = "ZPANEL_DEPLOY_LOG_MAX_BYTES", default_value_t = 5 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 34), global = true)]
    pub deploy_log_max_bytes: u64,

    /// Images tenants may use from the Docker Engine's store without a pull, put there by the
    /// operator: comma-separated references, or prefixes ending in `*` (`registry.internal/base/*`).
    /// They are never pulled for a tenant. Unset: every image is pulled by its full reference.
    #[arg(long, env = "ZPANEL_LOCAL_IMAGES", default_value = "", value_parser = parse_local_images, global = true)]
    pub local_images: zpanel_workers::images::LocalImages,

    /// Memory (bytes) of a container whose application sets none.
    #[arg(long, env = "ZPANEL_CONTAINER_MEMORY_BYTES", default_value_t = 512 << 20, value_parser = clap::value_parser!(u64).range(6 << 20..), global = true)]
    pub container_memory_bytes: u64,

    /// The most memory (bytes) an application may set for its container.
    #[arg(long, env = "ZPANEL_CONTAINER_MAX_MEMORY_BYTES", default_value_t = 4 << 30, value_parser = clap::value_parser!(u64).range(6 << 20..), global = true)]
    pub container_max_memory_bytes: u64,

    /// CPU (thousandths of a CPU) of a container whose application sets none.
    #[arg(long, env = "ZPANEL_CONTAINER_CPU_MILLIS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_024_000), global = true)]
    pub container_cpu_millis: u32,

    /// The most CPU (thousandths of a CPU) an application may set.
    #[arg(long, env = "ZPANEL_CONTAINER_MAX_CPU_MILLIS", default_value_t = 4000, value_parser = clap::value_parser!(u32).range(1..=1_024_000), global = true)]
    pub container_max_cpu_millis: u32,

    /// Processes (and threads) a container may run at once.
    #[arg(long, env = "ZPANEL_CONTAINER_PIDS", default_value_t = 1024, value_parser = clap::value_parser!(i64).range(16..=4_194_304), global = true)]
    pub container_pids: i64,

    /// Memory (bytes) of each step of an image build; at most 2 GiB (the Engine API client
    /// carries it as a 32-bit number).
    #[arg(long, env = "ZPANEL_BUILD_MEMORY_BYTES", default_value_t = 2047 << 20, value_parser = clap::value_parser!(u64).range(6 << 20..=2_147_483_647), global = true)]
    pub build_memory_bytes: u64,

    /// CPU (thousandths of a CPU) of each step of an image build.
    #[arg(long, env = "ZPANEL_BUILD_CPU_MILLIS", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_024_000), global = true)]
    pub build_cpu_millis: u32,

    /// How long (seconds) an image build may take before the deployment fails.
    #[arg(long, env = "ZPANEL_BUILD_TIMEOUT_SECONDS", default_value_t = 1200, value_parser = clap::value_parser!(u64).range(10..=86_400), global = true)]
    pub build_timeout_seconds: u64,
}

fn parse_local_images(list: &str) -> Result<zpanel_workers::images::LocalImages, String> {
    zpanel_workers::images::LocalImages::parse(list)
}

/// `ZPANEL_GIT_LOCAL_ROOTS`, each directory with its symbolic links resolved.
#[derive(Clone, Debug, Default)]
pub struct LocalRoots(Vec<PathBuf>);

fn local_roots(raw: &str) -> Result<LocalRoots, String> {
    let mut roots = Vec::new();
    for root in raw.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let canonical = std::fs::canonicalize(root).map_err(|e| format!("{root}: {e}"))?;
        if !canonical.is_dir() {
            return Err(format!("{root} is not a directory"));
        }
        roots.push(canonical);
    }
    Ok(LocalRoots(roots))
}

impl Config {
    /// What one API request, token or socket may cost.
    #[must_use]
    pub fn api_limits(&self) -> zpanel_api::limits::Limits {
        zpanel_api::limits::Limits {
            response_bytes: self.api_max_response_bytes,
            subscriptions_per_token: self.subscriptions_per_token,
            subscriptions_per_socket: self.subscriptions_per_socket,
        }
    }

    /// Where local repositories may be cloned from.
    #[must_use]
    pub fn git_local_roots(&self) -> zpanel_domain::values::GitLocalRoots {
        zpanel_domain::values::GitLocalRoots::new(self.git_local_roots.clone().unwrap_or_default().0)
    }

    /// The API's tenancy rules, with the control plane's host names reserved.
    ///
    /// # Errors
    /// When `ZPANEL_PUBLIC_HOST` holds something that is neither a host name nor an IP address.
    pub fn tenancy(&self) -> anyhow::Result<zpanel_api::tenancy::Tenancy> {
        let mut reserved = Vec::new();
        for host in self.public_host.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
            if host.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let name = zpanel_domain::values::DomainName::parse(host)
                .map_err(|e| anyhow::anyhow!("ZPANEL_PUBLIC_HOST: {host:?} {}", e.rule))?;
            reserved.push(name);
        }
        Ok(zpanel_api::tenancy::Tenancy::new(reserved))
    }

    /// The broker settings, when Kafka is configured.
    #[must_use]
    pub fn kafka(&self) -> Option<zpanel_workers::KafkaConfig> {
        self.kafka_brokers.as_deref().filter(|b| !b.trim().is_empty()).map(|brokers| zpanel_workers::KafkaConfig {
            topic: self.kafka_topic.clone(),
            partitions: self.kafka_partitions,
            ..zpanel_workers::KafkaConfig::new(brokers)
        })
    }

    /// How this process runs workers, relaying when `relay`.
    #[must_use]
    pub fn worker_mode(&self, relay: bool) -> crate::app::WorkerMode {
        crate::app::WorkerMode {
            only: None,
            kafka: self.kafka(),
            relay,
            lease_sweep: std::time::Duration::from_secs(self.lease_sweep_seconds),
            server_checks: (self.server_check_seconds > 0)
                .then(|| std::time::Duration::from_secs(self.server_check_seconds)),
            deploy: self.deploy(),
        }
    }

    /// How the deploy worker works.
    #[must_use]
    pub fn deploy(&self) -> zpanel_workers::deploy::DeployConfig {
        use std::time::Duration;
        zpanel_workers::deploy::DeployConfig {
            docker_host: self.docker_host.clone(),
            caddy_admin: self.caddy_admin.clone(),
            proxy_listen: self.proxy_listen.clone(),
            remote_caddy_admin: self.remote_caddy_admin.clone(),
            remote_proxy_listen: self.remote_proxy_listen.clone(),
            work_dir: self.data_dir.join("builds"),
            keep_images: usize::try_from(self.deploy_keep_images).unwrap_or(5),
            grace: Duration::from_secs(self.deploy_grace_seconds),
            timeout: Duration::from_secs(self.deploy_timeout_seconds),
            supersede: self.deploy_supersede,
            concurrent_builds: usize::try_from(self.deploy_builds).unwrap_or(2),
            lease: Duration::from_secs(self.lease_seconds),
            route_sync: Duration::from_secs(self.route_sync_seconds),
            git_local_roots: self.git_local_roots(),
            limits: zpanel_workers::deploy::EngineLimits {
                // A default above the cap is the cap.
                memory_bytes: self.container_memory_bytes.min(self.container_max_memory_bytes),
                max_memory_bytes: self.container_max_memory_bytes,
                cpu_millis: self.container_cpu_millis.min(self.container_max_cpu_millis),
                max_cpu_millis: self.container_max_cpu_millis,
                pids: self.container_pids,
                build_memory_bytes: self.build_memory_bytes,
                build_cpu_millis: self.build_cpu_millis,
                build_timeout: Duration::from_secs(self.build_timeout_seconds),
            },
            local_images: self.local_images.clone(),
            log_limits: zpanel_workers::deploy::LogLimits {
                max_lines: usize::try_from(self.deploy_log_max_lines).unwrap_or(usize::MAX),
                max_bytes: usize::try_from(self.deploy_log_max_bytes).unwrap_or(usize::MAX),
            },
        }
    }
}
