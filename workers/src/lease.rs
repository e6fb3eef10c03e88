//! Leases on long jobs (deployments): the worker running one renews its lease while it works;
//! a lease that lapses — its worker died or lost the database — is taken over by another worker,
//! which ends the job cleanly. No deployment stays "running" forever.

use anyhow::Context as _;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;
use zpanel_commands::{Actor, CommandContext, CommandError, CommandHandler, PgEventStore};
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentError, DeploymentEvent};
use zpanel_domain::ids::TeamId;

/// How long a lease lasts unless renewed. A worker renews at a third of it, so it survives two
/// missed renewals.
pub const LEASE: Duration = Duration::from_secs(30);

/// This process's worker id: host, process id and a random suffix (a restarted process is a
/// new worker).
#[must_use]
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let suffix = Uuid::new_v4().simple().to_string();
    format!("{}-{}-{}", if host.is_empty() { "zpanel" } else { host }, std::process::id(), &suffix[..6])
}

fn until(lease: Duration) -> OffsetDateTime {
    OffsetDateTime::now_utc() + lease
}

/// Renewing one deployment's lease in the background while its job runs. Dropping it stops
/// the renewals (the lease then lapses unless the job ended the deployment).
#[derive(Debug)]
pub struct LeaseKeeper {
    renewing: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl LeaseKeeper {
    /// Starts renewing `deployment_id`'s lease, held by `worker_id`, every `lease / 3`.
    #[must_use]
    pub fn start(
        handler: CommandHandler<PgEventStore>,
        team_id: TeamId,
        deployment_id: Uuid,
        worker_id: String,
        lease: Duration,
    ) -> Self {
        let (lost_tx, lost) = watch::channel(false);
        let renewing = tokio::spawn(async move {
            let ctx = CommandContext::new(team_id, Actor::worker(&worker_id), "worker");
            let mut failures = 0u32;
            loop {
                tokio::time::sleep(lease / 3).await;
                let command = DeploymentCommand::RenewLease {
                    worker_id: worker_id.clone(),
                    lease_until: until(lease),
                    now: OffsetDateTime::now_utc(),
                };
                let ctx = ctx.clone().with_command_id(Uuid::now_v7());
                match handler.execute::<Deployment>(&ctx, deployment_id, &command).await {
                    Ok(_) => failures = 0,
                    // Taken over, finished, or cancelled and confirmed: the job must stop.
                    Err(CommandError::Rejected(_) | CommandError::NotFound) => {
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(%deployment_id, error = %e, failures, "could not renew a deployment lease");
                    }
                }
            }
        });
        Self { renewing, lost }
    }

    /// Resolves when the lease is lost (taken over, or the deployment ended): the job must
    /// stop without reporting success.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}

/// What runs a deployment's job again in this process after a takeover.
pub trait Resume: Send + Sync + std::fmt::Debug {
    /// Starts `deployment_id`'s job here; `false` when it cannot (e.g. shutting down).
    fn resume(&self, team_id: TeamId, deployment_id: Uuid) -> futures::future::BoxFuture<'_, bool>;
}

/// Takes over running deployments whose lease lapsed (or was handed back), and resumes them in
/// this process — or, where nothing can resume them, ends them cleanly.
#[derive(Clone, Debug)]
pub struct LeaseSupervisor {
    pool: PgPool,
    handler: CommandHandler<PgEventStore>,
    worker_id: Arc<str>,
    lease: Duration,
    resume: Option<Arc<dyn Resume>>,
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Deployments taken over and failed.
    pub taken_over: Vec<Uuid>,
}

impl LeaseSupervisor {
    /// A supervisor acting as `worker_id`.
    #[must_use]
    pub fn new(pool: PgPool, handler: CommandHandler<PgEventStore>, worker_id: &str) -> Self {
        Self { pool, handler, worker_id: worker_id.into(), lease: LEASE, resume: None }
    }

    /// The same supervisor, taking leases of `lease` instead of [`LEASE`].
    #[must_use]
    pub const fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The same supervisor, resuming the deployments it takes over with `resume`.
    #[must_use]
    pub fn with_resume(mut self, resume: Arc<dyn Resume>) -> Self {
        self.resume = Some(resume);
        self
    }

    /// Finds running deployments whose lease has lapsed or was handed back (in the read
    /// model), takes each over (the command re-checks the lease on the deployment's own
    /// stream, so a renewal that the read model has not shown yet wins), and resumes it; a
    /// supervisor without a way to resume fails it with the reason, and the previous release
    /// keeps serving.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn sweep(&self) -> anyhow::Result<Sweep> {
        let lapsed: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "select deployment_id, team_id from rm_deployments
              where status = 'running' and (lease_expires_at is null or lease_expires_at < now())
              order by lease_expires_at nulls first limit 100",
        )
        .fetch_all(&self.pool)
        .await
        .context("finding lapsed deployment leases")?;
        let mut sweep = Sweep::default();
        for (deployment_id, team_id) in lapsed {
            if self.take_over(TeamId::from_uuid(team_id), deployment_id).await? {
                sweep.taken_over.push(deployment_id);
            }
        }
        Ok(sweep)
    }

    async fn take_over(&self, team_id: TeamId, deployment_id: Uuid) -> anyhow::Result<bool> {
        let ctx = CommandContext::new(team_id, Actor::worker(&self.worker_id), "worker");
        let command = DeploymentCommand::TakeOverDeployment {
            worker_id: self.worker_id.to_string(),
            lease_until: until(self.lease),
            now: OffsetDateTime::now_utc(),
        };
        let taken = match self.handler.execute::<Deployment>(&ctx, deployment_id, &command).await {
            Ok(outcome) => outcome,
            // Renewed after all, finished meanwhile, or taken by another supervisor.
            Err(CommandError::Rejected(
                DeploymentError::LeaseStillHeld { .. }
                | DeploymentError::DeploymentFinished
                | DeploymentError::DeploymentNotStarted,
            )) => return Ok(false),
            Err(e) => return Err(anyhow::anyhow!("taking over deployment {deployment_id}: {e}")),
        };
        if let Some(resume) = &self.resume
            && resume.resume(team_id, deployment_id).await
        {
            tracing::warn!(%deployment_id, worker_id = %self.worker_id, "took over a deployment and resumed it");
            return Ok(true);
        }
        let step = taken.state.state().and_then(|d| d.last_step);
        let previous = taken
            .events
            .iter()
            .find_map(|e| match e.decode::<DeploymentEvent>() {
                Ok(DeploymentEvent::DeploymentTakenOver { previous_worker_id, .. }) => Some(previous_worker_id),
                _ => None,
            })
            .unwrap_or_default();
        let reason = format!(
            "worker {previous} stopped renewing its lease; worker {} took the deployment over and stopped it",
            self.worker_id
        );
        tracing::warn!(%deployment_id, %reason, "taking over a deployment");
        let fail = DeploymentCommand::FailDeployment { step, reason, now: OffsetDateTime::now_utc() };
        let ctx = ctx
            .with_command_id(Uuid::new_v5(&deployment_id, format!("fail-after-takeover-{}", taken.version).as_bytes()));
        match self.handler.execute::<Deployment>(&ctx, deployment_id, &fail).await {
            Ok(_) | Err(CommandError::Rejected(DeploymentError::DeploymentFinished)) => Ok(true),
            Err(e) => Err(anyhow::anyhow!("failing deployment {deployment_id} after taking it over: {e}")),
        }
    }

    /// Sweeps every `every` until `shutdown` resolves.
    ///
    /// # Errors
    /// Never while `shutdown` is pending: failed sweeps are logged.
    pub async fn run(&self, every: Duration, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = format!("{e:#}"), "lease sweep failed");
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
