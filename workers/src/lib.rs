//! Zpanel's workers: the Kafka relay and consumers (or in-process delivery from the log cursor
//! in embedded mode), and the workers that touch the world — Docker, SSH, git, the proxy.
//! They report back only by sending commands.
//!
//! - [`relay`]: the log → Kafka, gap-safe, in order per stream, one active relay.
//! - [`runtime`]: a named [`Worker`] with a [`Handler`]: inbox, retries, giving up.
//! - [`embedded`] and [`consumer`]: the two ways a worker is fed — the log cursor in this
//!   process, or a Kafka consumer group.
//! - [`lease`]: leases on long jobs, and the supervisor that takes over lapsed ones.
//! - [`deploy`]: the deploy worker — its queue, its jobs and their pipeline — over
//!   [`docker`] (the Docker Engine API), [`git`] (argument vectors only) and [`proxy`]
//!   (Caddy's admin API); [`images`] says which images a deployment may use on an engine
//!   other teams share, and builds are held to it by reading their Dockerfiles first.
//! - [`servers`]: the server worker — validates servers over [`ssh`] (russh: host keys trusted
//!   on first use, fixed commands on exec channels, the Docker socket through a forwarded stream).
//! - [`remote`]: one pooled SSH connection per server, and [`remote::Dial`], which carries
//!   [`http`] (Caddy, health checks) and the Docker Engine API to a server over it, so a
//!   deployment runs the same pipeline on this machine and on a server.
#![forbid(unsafe_code)]

mod backoff;
pub mod consumer;
pub mod deploy;
pub mod docker;
mod dockerfile;
pub mod embedded;
pub mod exclusive;
pub mod git;
pub mod http;
pub mod images;
pub mod kafka;
pub mod lease;
pub mod place;
pub mod proxy;
pub mod relay;
pub mod remote;
pub mod runtime;
pub mod servers;
pub mod ssh;

pub use kafka::KafkaConfig;
pub use relay::Relay;
pub use runtime::{Handler, HandlerError, Processed, Retry, Worker, WorkerStats};

/// How workers are fed.
#[derive(Clone, Debug)]
pub enum Delivery {
    /// From the log cursor, in this process (embedded mode).
    InProcess(zpanel_commands::AppendSignal),
    /// Through Kafka consumer groups (distributed mode).
    Kafka(KafkaConfig),
}

/// How long the inbox remembers a handled event: longer than any redelivery (Kafka keeps
/// messages 7 days by default; in-process, only a rewound cursor redelivers).
pub const INBOX_RETENTION_DAYS: i32 = 14;

/// Forgets inbox entries older than [`INBOX_RETENTION_DAYS`]; returns how many.
///
/// # Errors
/// When the database fails.
pub async fn prune_inbox(pool: &sqlx::PgPool) -> anyhow::Result<u64> {
    let done = sqlx::query("delete from worker_inbox where handled_at < now() - make_interval(days => $1)")
        .bind(INBOX_RETENTION_DAYS)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Runs `workers`, each fed by `delivery`, until `shutdown` resolves; each finishes the event
/// in hand first. The inbox is pruned hourly.
///
/// # Errors
/// When a worker's task panics.
pub async fn run(
    pool: sqlx::PgPool,
    delivery: Delivery,
    workers: Vec<Worker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in workers {
        let mut stopped = stopped.clone();
        let until = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let pool = pool.clone();
        match &delivery {
            Delivery::InProcess(signal) => tasks.spawn(embedded::run(pool, signal.clone(), worker, until)),
            Delivery::Kafka(kafka) => tasks.spawn(consumer::run(pool, kafka.clone(), worker, until)),
        };
    }
    let pruning = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                hourly.tick().await;
                if let Err(e) = prune_inbox(&pool).await {
                    tracing::warn!(error = format!("{e:#}"), "pruning the worker inbox failed");
                }
            }
        })
    };
    shutdown.await;
    pruning.abort();
    let _ = stop.send(true);
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}
