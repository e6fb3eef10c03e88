//! A deployment: one attempt to release an application. It snapshots the application's
//! [`ReleaseConfig`] when queued, so what it releases never changes under it, and a rollback is a
//! new deployment of an old release and its image.
//!
//! A deploy worker takes a lease on a queued deployment, renews it while it works, and reports
//! each step. A worker that dies leaves a lease that expires; another worker takes the deployment
//! over. Nothing is stuck: the state always says who may act and until when.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::application::{Application, ReleaseConfig, Source};
use crate::changes::{Describe, FieldValue};
use crate::ids::{ApplicationId, DeploymentId, ProjectId, TeamId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Why a deployment was asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeploymentReason {
    /// Someone asked for it.
    Manual,
    /// A push to the repository.
    Webhook {
        /// The commit the push announced, if it said.
        commit: Option<String>,
    },
    /// A rollback to the release of an earlier deployment.
    Rollback {
        /// The deployment whose release is re-created.
        of: DeploymentId,
    },
}

/// A step of a deployment, in the order a worker takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStep {
    /// Resolve the git ref to a commit.
    Resolve,
    /// Clone the repository at that commit.
    Clone,
    /// Build the image.
    Build,
    /// Pull the image.
    Pull,
    /// Start the new container.
    Start,
    /// Wait for it to be healthy.
    HealthCheck,
    /// Switch the proxy route to it.
    Route,
    /// Stop the old container.
    Cleanup,
}

/// Where a deployment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker holds it.
    Running,
    /// Released.
    Succeeded,
    /// Stopped at a failure; the previous release keeps serving.
    Failed,
    /// Stopped on request; the previous release keeps serving.
    Cancelled,
}

impl DeploymentStatus {
    /// Whether it is over: succeeded, failed or cancelled. A finished deployment never changes.
    #[must_use]
    pub const fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The wire name (`running`).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A worker's claim on a running deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker that holds it.
    pub worker_id: String,
    /// When it lapses unless renewed; after that, another worker may take over.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Why a deployment failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The step that failed; `None` when it failed outside a step (e.g. before it started).
    pub step: Option<DeploymentStep>,
    /// What went wrong, for people.
    pub reason: String,
}

/// A deployment that exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentState {
    /// Its id.
    pub id: DeploymentId,
    /// The team it belongs to.
    pub team_id: TeamId,
    /// The application's project.
    pub project_id: ProjectId,
    /// The application it releases.
    pub application_id: ApplicationId,
    /// The configuration it releases.
    pub release: ReleaseConfig,
    /// Why it was asked for.
    pub reason: DeploymentReason,
    /// The image it released (set on success), or, for a rollback, the image it re-deploys.
    pub image: Option<String>,
    /// The commit it builds, once resolved (40 lowercase hex).
    pub commit: Option<String>,
    /// The worker holding it, while running.
    pub lease: Option<Lease>,
    /// Whether someone asked to cancel it while it was running.
    pub cancel_requested: bool,
    /// When it was queued.
    #[serde(with = "time::serde::rfc3339")]
    pub queued_at: OffsetDateTime,
    /// When a worker first started it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// When it finished.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// The last step a worker completed.
    pub last_step: Option<DeploymentStep>,
    /// Why it failed, if it did.
    pub failure: Option<Failure>,
}

/// A deployment's state: one variant per status, each holding the same [`DeploymentState`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Deployment {
    /// Before `DeploymentQueued`.
    #[default]
    New,
    /// Waiting for a worker.
    Queued(Box<DeploymentState>),
    /// A worker holds it.
    Running(Box<DeploymentState>),
    /// Released.
    Succeeded(Box<DeploymentState>),
    /// Failed.
    Failed(Box<DeploymentState>),
    /// Cancelled.
    Cancelled(Box<DeploymentState>),
}

impl Deployment {
    /// Its status; `None` before it is queued.
    #[must_use]
    pub fn status(&self) -> Option<DeploymentStatus> {
        self.parts().map(|(status, _)| status)
    }

    /// Its state; `None` before it is queued.
    #[must_use]
    pub fn state(&self) -> Option<&DeploymentState> {
        self.parts().map(|(_, state)| state)
    }

    fn parts(&self) -> Option<(DeploymentStatus, &DeploymentState)> {
        match self {
            Self::New => None,
            Self::Queued(s) => Some((DeploymentStatus::Queued, s)),
            Self::Running(s) => Some((DeploymentStatus::Running, s)),
            Self::Succeeded(s) => Some((DeploymentStatus::Succeeded, s)),
            Self::Failed(s) => Some((DeploymentStatus::Failed, s)),
            Self::Cancelled(s) => Some((DeploymentStatus::Cancelled, s)),
        }
    }

    fn into_parts(self) -> Option<(DeploymentStatus, Box<DeploymentState>)> {
        match self {
            Self::New => None,
            Self::Queued(s) => Some((DeploymentStatus::Queued, s)),
            Self::Running(s) => Some((DeploymentStatus::Running, s)),
            Self::Succeeded(s) => Some((DeploymentStatus::Succeeded, s)),
            Self::Failed(s) => Some((DeploymentStatus::Failed, s)),
            Self::Cancelled(s) => Some((DeploymentStatus::Cancelled, s)),
        }
    }

    fn from_parts(status: DeploymentStatus, state: Box<DeploymentState>) -> Self {
        match status {
            DeploymentStatus::Queued => Self::Queued(state),
            DeploymentStatus::Running => Self::Running(state),
            DeploymentStatus::Succeeded => Self::Succeeded(state),
            DeploymentStatus::Failed => Self::Failed(state),
            DeploymentStatus::Cancelled => Self::Cancelled(state),
        }
    }
}

/// What can be asked of a deployment.
// Queueing carries the application and its release; a command lives for one decision, so
// boxing them would only burden every caller.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeploymentCommand {
    /// Queue a deployment of an application.
    QueueDeployment {
        /// The new deployment's id.
        id: DeploymentId,
        /// Outside fact: the application as it is now, loaded from its stream.
        application: Application,
        /// Why.
        reason: DeploymentReason,
        /// The image to re-deploy (a rollback), instead of building or pulling.
        image: Option<String>,
        /// The release to re-create (a rollback); otherwise the application's current one.
        release: Option<ReleaseConfig>,
        /// The time now.
        now: OffsetDateTime,
    },
    /// A worker takes a queued deployment.
    StartDeployment {
        /// The worker.
        worker_id: String,
        /// Until when it holds the deployment unless it renews.
        lease_until: OffsetDateTime,
        /// The time now.
        now: OffsetDateTime,
    },
    /// The holding worker extends its lease.
    RenewLease {
        /// The worker.
        worker_id: String,
        /// The new end of the lease.
        lease_until: OffsetDateTime,
        /// The time now.
        now: OffsetDateTime,
    },
    /// The holding worker hands the deployment back (it is shutting down): the lease ends now,
    /// and another worker may take the deployment over at once.
    ReleaseLease {
        /// The worker.
        worker_id: String,
    },
    /// A worker takes over a running deployment whose lease has lapsed.
    TakeOverDeployment {
        /// The new worker.
        worker_id: String,
        /// Until when it holds the deployment unless it renews.
        lease_until: OffsetDateTime,
        /// The time now.
        now: OffsetDateTime,
    },
    /// Record the commit the git ref resolved to.
    RecordCommit {
        /// 40 lowercase hex digits.
        commit: String,
    },
    /// Record a completed step.
    CompleteStep {
        /// The step.
        step: DeploymentStep,
    },
    /// The new release serves.
    SucceedDeployment {
        /// The image id it runs.
        image: String,
        /// The time now.
        now: OffsetDateTime,
    },
    /// Give up.
    FailDeployment {
        /// The step that failed, if any.
        step: Option<DeploymentStep>,
        /// What went wrong.
        reason: String,
        /// The time now.
        now: OffsetDateTime,
    },
    /// Cancel: at once when queued; a running one is asked to stop.
    CancelDeployment {
        /// The time now.
        now: OffsetDateTime,
    },
    /// The worker stopped a running deployment whose cancellation was requested.
    ConfirmCancellation {
        /// The time now.
        now: OffsetDateTime,
    },
}

/// What happened to a deployment.
// `DeploymentQueued` carries the whole release, as projections and workers need it; events are
// decoded one at a time, so the size of the others does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum DeploymentEvent {
    /// A deployment was queued.
    DeploymentQueued {
        /// Its id.
        deployment_id: DeploymentId,
        /// The team.
        team_id: TeamId,
        /// The application's project.
        project_id: ProjectId,
        /// The application.
        application_id: ApplicationId,
        /// The configuration it releases.
        release: ReleaseConfig,
        /// Why.
        reason: DeploymentReason,
        /// The image it re-deploys, for a rollback.
        image: Option<String>,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        queued_at: OffsetDateTime,
    },
    /// A worker took it.
    DeploymentStarted {
        /// The worker.
        worker_id: String,
        /// Until when the worker holds it.
        #[serde(with = "time::serde::rfc3339")]
        lease_expires_at: OffsetDateTime,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        started_at: OffsetDateTime,
    },
    /// The holding worker extended its lease.
    DeploymentLeaseRenewed {
        /// The new end of the lease.
        #[serde(with = "time::serde::rfc3339")]
        lease_expires_at: OffsetDateTime,
    },
    /// The holding worker handed the deployment back; any worker may take it over.
    DeploymentLeaseReleased {
        /// The worker that held it.
        worker_id: String,
    },
    /// Another worker took over after the lease lapsed.
    DeploymentTakenOver {
        /// The new worker.
        worker_id: String,
        /// The worker whose lease lapsed.
        previous_worker_id: String,
        /// Until when the new worker holds it.
        #[serde(with = "time::serde::rfc3339")]
        lease_expires_at: OffsetDateTime,
    },
    /// The git ref resolved to a commit.
    DeploymentCommitResolved {
        /// 40 lowercase hex digits.
        commit: String,
    },
    /// A step completed.
    DeploymentStepCompleted {
        /// The step.
        step: DeploymentStep,
    },
    /// The new release serves.
    DeploymentSucceeded {
        /// The image id it runs.
        image: String,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        finished_at: OffsetDateTime,
    },
    /// It failed; the previous release keeps serving.
    DeploymentFailed {
        /// The step that failed, if any.
        step: Option<DeploymentStep>,
        /// What went wrong.
        reason: String,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        finished_at: OffsetDateTime,
    },
    /// Someone asked to cancel it while it ran; the worker stops at the next step.
    DeploymentCancellationRequested,
    /// It was cancelled; the previous release keeps serving.
    DeploymentCancelled {
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        finished_at: OffsetDateTime,
    },
}

impl DomainEvent for DeploymentEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::DeploymentQueued { .. } => "DeploymentQueued",
            Self::DeploymentStarted { .. } => "DeploymentStarted",
            Self::DeploymentLeaseRenewed { .. } => "DeploymentLeaseRenewed",
            Self::DeploymentLeaseReleased { .. } => "DeploymentLeaseReleased",
            Self::DeploymentTakenOver { .. } => "DeploymentTakenOver",
            Self::DeploymentCommitResolved { .. } => "DeploymentCommitResolved",
            Self::DeploymentStepCompleted { .. } => "DeploymentStepCompleted",
            Self::DeploymentSucceeded { .. } => "DeploymentSucceeded",
            Self::DeploymentFailed { .. } => "DeploymentFailed",
            Self::DeploymentCancellationRequested => "DeploymentCancellationRequested",
            Self::DeploymentCancelled { .. } => "DeploymentCancelled",
        }
    }
}

/// The rule a deployment command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeploymentError {
    /// Queueing a deployment that exists.
    #[error("the deployment already exists")]
    DeploymentAlreadyExists,
    /// Anything but queueing on a deployment that does not exist.
    #[error("the deployment does not exist")]
    DeploymentNotFound,
    /// Deploying an application that does not exist.
    #[error("the application does not exist")]
    ApplicationNotFound,
    /// Deploying an archived application.
    #[error("an archived application can't be deployed")]
    ApplicationArchived,
    /// A rollback re-deploys a known image, so it needs one.
    #[error("a rollback needs the image of the release it rolls back to")]
    RollbackWithoutImage,
    /// Starting a deployment a worker already holds.
    #[error("the deployment has already started")]
    DeploymentAlreadyStarted,
    /// Worker reports on a deployment no worker has started.
    #[error("the deployment has not started")]
    DeploymentNotStarted,
    /// Anything on a deployment that succeeded, failed or was cancelled.
    #[error("the deployment has finished")]
    DeploymentFinished,
    /// Succeeding after a cancellation.
    #[error("a cancelled deployment can't succeed")]
    DeploymentCancelled,
    /// Succeeding while a cancellation is requested: the worker must stop and confirm it.
    #[error("the deployment's cancellation was requested, so it can't succeed")]
    CancellationRequested,
    /// Cancelling once the proxy routes to the new release: it is as good as released.
    #[error("the deployment already switched its route to the new release; it can't be cancelled any more")]
    PastPointOfNoReturn,
    /// Confirming a cancellation nobody asked for.
    #[error("no cancellation of the deployment was requested")]
    CancellationNotRequested,
    /// Renewing a lease another worker holds.
    #[error("the deployment's lease is held by another worker")]
    NotTheLeaseHolder,
    /// Taking over before the lease lapsed.
    #[error("the deployment's lease is held until {until}")]
    LeaseStillHeld {
        /// When the lease lapses.
        until: OffsetDateTime,
    },
    /// A lease that ends before it begins.
    #[error("a lease must end after now")]
    LeaseEndsInThePast,
    /// A commit id that is not 40 lowercase hex digits.
    #[error("a commit must be 40 lowercase hexadecimal digits")]
    InvalidCommit,
    /// Resolving a second, different commit: a deployment builds exactly one.
    #[error("the deployment already builds commit {commit}")]
    CommitAlreadyResolved {
        /// The commit recorded first.
        commit: String,
    },
    /// Recording a commit for a release that runs an image.
    #[error("the deployment releases an image, so it has no commit")]
    NotBuiltFromGit,
    /// Succeeding without naming the image.
    #[error("a successful deployment must name its image")]
    MissingImage,
}

impl crate::Rejection for DeploymentError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::DeploymentNotFound)
    }
}

fn is_commit(commit: &str) -> bool {
    commit.len() == 40 && commit.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

fn require_running(status: DeploymentStatus) -> Result<(), DeploymentError> {
    match status {
        DeploymentStatus::Running => Ok(()),
        DeploymentStatus::Queued => Err(DeploymentError::DeploymentNotStarted),
        _ => Err(DeploymentError::DeploymentFinished),
    }
}

fn require_future(lease_until: OffsetDateTime, now: OffsetDateTime) -> Result<(), DeploymentError> {
    if lease_until <= now {
        return Err(DeploymentError::LeaseEndsInThePast);
    }
    Ok(())
}

impl Aggregate for Deployment {
    const KIND: &'static str = DeploymentId::KIND;
    type Command = DeploymentCommand;
    type Event = DeploymentEvent;
    type Error = DeploymentError;

    fn decide(&self, command: &DeploymentCommand) -> Result<Vec<DeploymentEvent>, DeploymentError> {
        use DeploymentCommand as C;
        use DeploymentEvent as E;
        use DeploymentStatus as S;
        if let C::QueueDeployment { .. } = command {
            return match self {
                Self::New => queue(command),
                _ => Err(DeploymentError::DeploymentAlreadyExists),
            };
        }
        let Some((status, state)) = self.parts() else {
            return Err(DeploymentError::DeploymentNotFound);
        };
        match command {
            C::QueueDeployment { .. } => unreachable!("handled above"),
            C::StartDeployment { worker_id, lease_until, now } => {
                match status {
                    S::Queued => {}
                    S::Running => return Err(DeploymentError::DeploymentAlreadyStarted),
                    _ => return Err(DeploymentError::DeploymentFinished),
                }
                require_future(*lease_until, *now)?;
                Ok(vec![E::DeploymentStarted {
                    worker_id: worker_id.clone(),
                    lease_expires_at: *lease_until,
                    started_at: *now,
                }])
            }
            C::RenewLease { worker_id, lease_until, now } => {
                require_running(status)?;
                if state.lease.as_ref().is_none_or(|l| l.worker_id != *worker_id) {
                    return Err(DeploymentError::NotTheLeaseHolder);
                }
                require_future(*lease_until, *now)?;
                Ok(vec![E::DeploymentLeaseRenewed { lease_expires_at: *lease_until }])
            }
            C::ReleaseLease { worker_id } => {
                require_running(status)?;
                if state.lease.as_ref().is_none_or(|l| l.worker_id != *worker_id) {
                    return Err(DeploymentError::NotTheLeaseHolder);
                }
                Ok(vec![E::DeploymentLeaseReleased { worker_id: worker_id.clone() }])
            }
            C::TakeOverDeployment { worker_id, lease_until, now } => {
                require_running(status)?;
                if let Some(lease) = &state.lease
                    && lease.expires_at > *now
                {
                    return Err(DeploymentError::LeaseStillHeld { until: lease.expires_at });
                }
                require_future(*lease_until, *now)?;
                Ok(vec![E::DeploymentTakenOver {
                    worker_id: worker_id.clone(),
                    previous_worker_id: state.lease.as_ref().map_or_else(String::new, |l| l.worker_id.clone()),
                    lease_expires_at: *lease_until,
                }])
            }
            C::RecordCommit { commit } => {
                require_running(status)?;
                if !matches!(state.release.source, Source::Git { .. }) {
                    return Err(DeploymentError::NotBuiltFromGit);
                }
                if !is_commit(commit) {
                    return Err(DeploymentError::InvalidCommit);
                }
                match &state.commit {
                    Some(recorded) if recorded == commit => Ok(vec![]),
                    Some(recorded) => Err(DeploymentError::CommitAlreadyResolved { commit: recorded.clone() }),
                    None => Ok(vec![E::DeploymentCommitResolved { commit: commit.clone() }]),
                }
            }
            C::CompleteStep { step } => {
                require_running(status)?;
                // A retried report of the step just recorded records nothing.
                if state.last_step == Some(*step) {
                    return Ok(vec![]);
                }
                Ok(vec![E::DeploymentStepCompleted { step: *step }])
            }
            C::SucceedDeployment { image, now } => {
                if status == S::Cancelled {
                    return Err(DeploymentError::DeploymentCancelled);
                }
                require_running(status)?;
                // The user asked to stop: the worker undoes its work and confirms instead.
                if state.cancel_requested {
                    return Err(DeploymentError::CancellationRequested);
                }
                if image.trim().is_empty() {
                    return Err(DeploymentError::MissingImage);
                }
                Ok(vec![E::DeploymentSucceeded { image: image.clone(), finished_at: *now }])
            }
            C::FailDeployment { step, reason, now } => {
                if status.is_finished() {
                    return Err(DeploymentError::DeploymentFinished);
                }
                Ok(vec![E::DeploymentFailed { step: *step, reason: reason.clone(), finished_at: *now }])
            }
            C::CancelDeployment { now } => match status {
                S::Queued => Ok(vec![E::DeploymentCancelled { finished_at: *now }]),
                S::Running if state.cancel_requested => Ok(vec![]),
                S::Running if state.last_step >= Some(DeploymentStep::Route) => {
                    Err(DeploymentError::PastPointOfNoReturn)
                }
                S::Running => Ok(vec![E::DeploymentCancellationRequested]),
                _ => Err(DeploymentError::DeploymentFinished),
            },
            C::ConfirmCancellation { now } => match status {
                S::Running if state.cancel_requested => Ok(vec![E::DeploymentCancelled { finished_at: *now }]),
                S::Queued | S::Running => Err(DeploymentError::CancellationNotRequested),
                _ => Err(DeploymentError::DeploymentFinished),
            },
        }
    }

    fn evolve(self, event: &DeploymentEvent) -> Self {
        use DeploymentEvent as E;
        use DeploymentStatus as S;
        let Some((status, mut state)) = self.into_parts() else {
            return match event {
                E::DeploymentQueued {
                    deployment_id,
                    team_id,
                    project_id,
                    application_id,
                    release,
                    reason,
                    image,
                    queued_at,
                } => Self::Queued(Box::new(DeploymentState {
                    id: *deployment_id,
                    team_id: *team_id,
                    project_id: *project_id,
                    application_id: *application_id,
                    release: release.clone(),
                    reason: reason.clone(),
                    image: image.clone(),
                    commit: None,
                    lease: None,
                    cancel_requested: false,
                    queued_at: *queued_at,
                    started_at: None,
                    finished_at: None,
                    last_step: None,
                    failure: None,
                })),
                // Evolve is total: nothing but queueing applies to a deployment that isn't.
                _ => Self::New,
            };
        };
        let status = match (status, event) {
            (S::Queued, E::DeploymentStarted { worker_id, lease_expires_at, started_at }) => {
                state.lease = Some(Lease { worker_id: worker_id.clone(), expires_at: *lease_expires_at });
                state.started_at = Some(*started_at);
                S::Running
            }
            (S::Running, E::DeploymentLeaseRenewed { lease_expires_at }) => {
                if let Some(lease) = &mut state.lease {
                    lease.expires_at = *lease_expires_at;
                }
                S::Running
            }
            (S::Running, E::DeploymentLeaseReleased { .. }) => {
                state.lease = None;
                S::Running
            }
            (S::Running, E::DeploymentTakenOver { worker_id, lease_expires_at, .. }) => {
                state.lease = Some(Lease { worker_id: worker_id.clone(), expires_at: *lease_expires_at });
                S::Running
            }
            (S::Running, E::DeploymentCommitResolved { commit }) => {
                state.commit = Some(commit.clone());
                S::Running
            }
            (S::Running, E::DeploymentStepCompleted { step }) => {
                state.last_step = Some(*step);
                S::Running
            }
            (S::Running, E::DeploymentCancellationRequested) => {
                state.cancel_requested = true;
                S::Running
            }
            (S::Running, E::DeploymentSucceeded { image, finished_at }) => {
                state.image = Some(image.clone());
                state.finished_at = Some(*finished_at);
                state.lease = None;
                S::Succeeded
            }
            (S::Queued | S::Running, E::DeploymentFailed { step, reason, finished_at }) => {
                state.failure = Some(Failure { step: *step, reason: reason.clone() });
                state.finished_at = Some(*finished_at);
                state.lease = None;
                S::Failed
            }
            (S::Queued | S::Running, E::DeploymentCancelled { finished_at }) => {
                state.finished_at = Some(*finished_at);
                state.lease = None;
                S::Cancelled
            }
            // Events that cannot apply to this state change nothing: evolve is total, and a
            // finished deployment never changes.
            (status, _) => status,
        };
        Self::from_parts(status, state)
    }
}

fn queue(command: &DeploymentCommand) -> Result<Vec<DeploymentEvent>, DeploymentError> {
    let DeploymentCommand::QueueDeployment { id, application, reason, image, release, now } = command else {
        unreachable!("only called with QueueDeployment")
    };
    let app = match application {
        Application::New => return Err(DeploymentError::ApplicationNotFound),
        Application::Archived(_) => return Err(DeploymentError::ApplicationArchived),
        Application::Active(app) => app,
    };
    if matches!(reason, DeploymentReason::Rollback { .. }) && image.is_none() {
        return Err(DeploymentError::RollbackWithoutImage);
    }
    Ok(vec![DeploymentEvent::DeploymentQueued {
        deployment_id: *id,
        team_id: app.team_id,
        project_id: app.project_id,
        application_id: app.id,
        release: release.clone().unwrap_or_else(|| app.release_config()),
        reason: reason.clone(),
        image: image.clone(),
        queued_at: *now,
    }])
}

impl Describe for Deployment {
    fn describe(&self) -> BTreeMap<String, FieldValue> {
        let mut out = BTreeMap::new();
        let Some((status, state)) = self.parts() else {
            return out;
        };
        let mut put = |field: &str, value: serde_json::Value| {
            out.insert(field.to_owned(), FieldValue::Plain(value));
        };
        put("status", json!(status.as_str()));
        put("commit", json!(state.commit));
        put("image", json!(state.image));
        put("reason", json!(state.reason));
        // The release is not repeated here: it is a snapshot of the application's configuration,
        // whose every change the application's own history already describes, and it never
        // changes during a deployment. Compare releases with `ReleaseConfig`'s own description.
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::application::tests::{active_application, sealed};
    use crate::application::{ApplicationEvent, EnvValue};
    use crate::values::{EnvKey, ImageRef};
    use proptest::prelude::*;
    use time::Duration;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2025-01-01 12:00 UTC);
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn secs(n: i64) -> OffsetDateTime {
        T0 + Duration::seconds(n)
    }

    fn queue_command(application: Application) -> DeploymentCommand {
        DeploymentCommand::QueueDeployment {
            id: DeploymentId::new(),
            application,
            reason: DeploymentReason::Manual,
            image: None,
            release: None,
            now: T0,
        }
    }

    fn queued() -> Vec<DeploymentEvent> {
        Deployment::New.decide(&queue_command(active_application())).expect("queues")
    }

    fn start(worker: &str, lease_until: i64, now: i64) -> DeploymentCommand {
        DeploymentCommand::StartDeployment { worker_id: worker.into(), lease_until: secs(lease_until), now: secs(now) }
    }

    /// Queued, then started by `w1` with a lease until T0+60s.
    fn running() -> Vec<DeploymentEvent> {
        let mut history = queued();
        history.push(DeploymentEvent::DeploymentStarted {
            worker_id: "w1".into(),
            lease_expires_at: secs(60),
            started_at: secs(1),
        });
        history
    }

    fn with(mut history: Vec<DeploymentEvent>, event: DeploymentEvent) -> Vec<DeploymentEvent> {
        history.push(event);
        history
    }

    fn succeeded() -> Vec<DeploymentEvent> {
        with(running(), DeploymentEvent::DeploymentSucceeded { image: "sha256:abc".into(), finished_at: secs(30) })
    }

    fn failed() -> Vec<DeploymentEvent> {
        with(
            running(),
            DeploymentEvent::DeploymentFailed {
                step: Some(DeploymentStep::Build),
                reason: "exit 1".into(),
                finished_at: secs(30),
            },
        )
    }

    fn cancelled() -> Vec<DeploymentEvent> {
        with(queued(), DeploymentEvent::DeploymentCancelled { finished_at: secs(5) })
    }

    fn finished() -> [Vec<DeploymentEvent>; 3] {
        [succeeded(), failed(), cancelled()]
    }

    /// Given these events…
    fn given(events: &[DeploymentEvent]) -> Deployment {
        Deployment::fold(events)
    }

    #[test]
    fn a_deployment_snapshots_the_applications_release() {
        let app = active_application();
        let events = Deployment::New.decide(&queue_command(app.clone())).expect("queues");
        let deployment = given(&events);
        let state = deployment.state().expect("exists");
        let app_state = app.state().expect("exists");
        assert_eq!(deployment.status(), Some(DeploymentStatus::Queued));
        assert_eq!(state.release, app_state.release_config());
        assert_eq!(state.application_id, app_state.id);
        assert_eq!(state.team_id, app_state.team_id);
        assert_eq!(state.queued_at, T0);
    }

    #[test]
    fn a_deployment_is_queued_once() {
        assert_eq!(
            given(&queued()).decide(&queue_command(active_application())),
            Err(DeploymentError::DeploymentAlreadyExists)
        );
    }

    #[test]
    fn a_missing_application_cannot_be_deployed() {
        assert_eq!(Deployment::New.decide(&queue_command(Application::New)), Err(DeploymentError::ApplicationNotFound));
    }

    #[test]
    fn an_archived_application_cannot_be_deployed() {
        let archived = active_application().evolve(&ApplicationEvent::ApplicationArchived);
        assert_eq!(Deployment::New.decide(&queue_command(archived)), Err(DeploymentError::ApplicationArchived));
    }

    #[test]
    fn a_rollback_redeploys_the_old_release_and_image() {
        let app = active_application();
        let mut old_release = app.state().expect("exists").release_config();
        old_release.env.insert(
            EnvKey::parse("OLD").expect("valid key"),
            crate::application::EnvVar { value: EnvValue::Secret(sealed("old")), build_time: false },
        );
        let of = DeploymentId::new();
        let command = DeploymentCommand::QueueDeployment {
            id: DeploymentId::new(),
            application: app.clone(),
            reason: DeploymentReason::Rollback { of },
            image: Some("sha256:old".into()),
            release: Some(old_release.clone()),
            now: T0,
        };
        let deployment = given(&Deployment::New.decide(&command).expect("queues"));
        let state = deployment.state().expect("exists");
        assert_eq!(state.release, old_release);
        assert_eq!(state.image.as_deref(), Some("sha256:old"));
        assert_eq!(state.reason, DeploymentReason::Rollback { of });
    }

    #[test]
    fn a_rollback_without_an_image_is_rejected() {
        let command = DeploymentCommand::QueueDeployment {
            id: DeploymentId::new(),
            application: active_application(),
            reason: DeploymentReason::Rollback { of: DeploymentId::new() },
            image: None,
            release: None,
            now: T0,
        };
        assert_eq!(Deployment::New.decide(&command), Err(DeploymentError::RollbackWithoutImage));
    }

    #[test]
    fn a_missing_deployment_rejects_everything_but_queueing() {
        assert_eq!(Deployment::New.decide(&start("w1", 60, 0)), Err(DeploymentError::DeploymentNotFound));
    }

    #[test]
    fn a_worker_starts_a_queued_deployment_with_a_lease() {
        let events = given(&queued()).decide(&start("w1", 60, 1));
        assert_eq!(
            events,
            Ok(vec![DeploymentEvent::DeploymentStarted {
                worker_id: "w1".into(),
                lease_expires_at: secs(60),
                started_at: secs(1),
            }])
        );
        let deployment = given(&running());
        assert_eq!(deployment.status(), Some(DeploymentStatus::Running));
        let state = deployment.state().expect("exists");
        assert_eq!(state.lease, Some(Lease { worker_id: "w1".into(), expires_at: secs(60) }));
        assert_eq!(state.started_at, Some(secs(1)));
    }

    #[test]
    fn a_deployment_cannot_start_twice() {
        assert_eq!(given(&running()).decide(&start("w2", 60, 2)), Err(DeploymentError::DeploymentAlreadyStarted));
    }

    #[test]
    fn a_finished_deployment_cannot_start() {
        for history in finished() {
            assert_eq!(given(&history).decide(&start("w1", 60, 2)), Err(DeploymentError::DeploymentFinished));
        }
    }

    #[test]
    fn a_lease_must_end_after_now() {
        assert_eq!(given(&queued()).decide(&start("w1", 10, 10)), Err(DeploymentError::LeaseEndsInThePast));
        assert_eq!(
            given(&running()).decide(&DeploymentCommand::RenewLease {
                worker_id: "w1".into(),
                lease_until: secs(5),
                now: secs(10),
            }),
            Err(DeploymentError::LeaseEndsInThePast)
        );
    }

    #[test]
    fn the_holder_renews_its_lease() {
        let renew = DeploymentCommand::RenewLease { worker_id: "w1".into(), lease_until: secs(120), now: secs(50) };
        let history = running();
        let events = given(&history).decide(&renew).expect("renews");
        assert_eq!(events, vec![DeploymentEvent::DeploymentLeaseRenewed { lease_expires_at: secs(120) }]);
        let mut history = history;
        history.extend(events);
        let lease = given(&history).state().and_then(|s| s.lease.clone());
        assert_eq!(lease.map(|l| l.expires_at), Some(secs(120)));
    }

    #[test]
    fn only_the_holder_can_renew_a_lease() {
        assert_eq!(
            given(&running()).decide(&DeploymentCommand::RenewLease {
                worker_id: "w2".into(),
                lease_until: secs(120),
                now: secs(50),
            }),
            Err(DeploymentError::NotTheLeaseHolder)
        );
    }

    #[test]
    fn a_lease_is_renewed_only_while_running() {
        let renew = DeploymentCommand::RenewLease { worker_id: "w1".into(), lease_until: secs(120), now: secs(50) };
        assert_eq!(given(&queued()).decide(&renew), Err(DeploymentError::DeploymentNotStarted));
        for history in finished() {
            assert_eq!(given(&history).decide(&renew), Err(DeploymentError::DeploymentFinished));
        }
    }

    #[test]
    fn an_expired_lease_can_be_taken_over() {
        let take_over =
            DeploymentCommand::TakeOverDeployment { worker_id: "w2".into(), lease_until: secs(180), now: secs(60) };
        let mut history = running();
        let events = given(&history).decide(&take_over).expect("takes over");
        assert_eq!(
            events,
            vec![DeploymentEvent::DeploymentTakenOver {
                worker_id: "w2".into(),
                previous_worker_id: "w1".into(),
                lease_expires_at: secs(180),
            }]
        );
        history.extend(events);
        let deployment = given(&history);
        assert_eq!(
            deployment.state().and_then(|s| s.lease.clone()),
            Some(Lease { worker_id: "w2".into(), expires_at: secs(180) })
        );
        // The old worker, back from the dead, no longer holds it.
        assert_eq!(
            deployment.decide(&DeploymentCommand::RenewLease {
                worker_id: "w1".into(),
                lease_until: secs(200),
                now: secs(61),
            }),
            Err(DeploymentError::NotTheLeaseHolder)
        );
    }

    #[test]
    fn a_held_lease_cannot_be_taken_over() {
        assert_eq!(
            given(&running()).decide(&DeploymentCommand::TakeOverDeployment {
                worker_id: "w2".into(),
                lease_until: secs(180),
                now: secs(59),
            }),
            Err(DeploymentError::LeaseStillHeld { until: secs(60) })
        );
    }

    #[test]
    fn only_a_running_deployment_can_be_taken_over() {
        let take_over =
            DeploymentCommand::TakeOverDeployment { worker_id: "w2".into(), lease_until: secs(180), now: secs(100) };
        assert_eq!(given(&queued()).decide(&take_over), Err(DeploymentError::DeploymentNotStarted));
        for history in finished() {
            assert_eq!(given(&history).decide(&take_over), Err(DeploymentError::DeploymentFinished));
        }
    }

    #[test]
    fn a_resolved_commit_is_recorded_once() {
        let record = DeploymentCommand::RecordCommit { commit: COMMIT.into() };
        let events = given(&running()).decide(&record).expect("records");
        assert_eq!(events, vec![DeploymentEvent::DeploymentCommitResolved { commit: COMMIT.into() }]);
        let history = with(running(), events[0].clone());
        let deployment = given(&history);
        assert_eq!(deployment.state().and_then(|s| s.commit.as_deref()), Some(COMMIT));
        assert_eq!(deployment.decide(&record), Ok(vec![]));
        assert_eq!(
            deployment.decide(&DeploymentCommand::RecordCommit { commit: "f".repeat(40) }),
            Err(DeploymentError::CommitAlreadyResolved { commit: COMMIT.into() })
        );
    }

    #[test]
    fn a_commit_is_40_lowercase_hex_digits() {
        for bad in [
            "abc",
            "0123456789ABCDEF0123456789ABCDEF01234567",
            "g123456789abcdef0123456789abcdef01234567",
            "-123456789abcdef0123456789abcdef01234567",
        ] {
            assert_eq!(
                given(&running()).decide(&DeploymentCommand::RecordCommit { commit: bad.into() }),
                Err(DeploymentError::InvalidCommit),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_image_release_has_no_commit() {
        let mut release = active_application().state().expect("exists").release_config();
        release.source = Source::Image { image: ImageRef::parse("nginx").expect("valid image") };
        let mut history = running();
        if let DeploymentEvent::DeploymentQueued { release: r, .. } = &mut history[0] {
            *r = release;
        }
        assert_eq!(
            given(&history).decide(&DeploymentCommand::RecordCommit { commit: COMMIT.into() }),
            Err(DeploymentError::NotBuiltFromGit)
        );
    }

    #[test]
    fn completed_steps_are_recorded_while_running() {
        let complete = DeploymentCommand::CompleteStep { step: DeploymentStep::Clone };
        let events = given(&running()).decide(&complete).expect("records");
        let history = with(running(), events[0].clone());
        assert_eq!(given(&history).state().and_then(|s| s.last_step), Some(DeploymentStep::Clone));
        assert_eq!(given(&history).decide(&complete), Ok(vec![]));
        assert_eq!(given(&queued()).decide(&complete), Err(DeploymentError::DeploymentNotStarted));
        assert_eq!(given(&succeeded()).decide(&complete), Err(DeploymentError::DeploymentFinished));
    }

    #[test]
    fn a_running_deployment_succeeds_with_its_image() {
        let events = given(&running())
            .decide(&DeploymentCommand::SucceedDeployment { image: "sha256:abc".into(), now: secs(30) });
        assert_eq!(
            events,
            Ok(vec![DeploymentEvent::DeploymentSucceeded { image: "sha256:abc".into(), finished_at: secs(30) }])
        );
        let deployment = given(&succeeded());
        assert_eq!(deployment.status(), Some(DeploymentStatus::Succeeded));
        let state = deployment.state().expect("exists");
        assert_eq!(state.image.as_deref(), Some("sha256:abc"));
        assert_eq!(state.finished_at, Some(secs(30)));
        assert_eq!(state.lease, None);
    }

    #[test]
    fn a_success_must_name_its_image() {
        assert_eq!(
            given(&running()).decide(&DeploymentCommand::SucceedDeployment { image: " ".into(), now: secs(30) }),
            Err(DeploymentError::MissingImage)
        );
    }

    #[test]
    fn only_a_running_deployment_can_succeed() {
        let succeed = DeploymentCommand::SucceedDeployment { image: "sha256:abc".into(), now: secs(30) };
        assert_eq!(given(&queued()).decide(&succeed), Err(DeploymentError::DeploymentNotStarted));
        for history in [succeeded(), failed()] {
            assert_eq!(given(&history).decide(&succeed), Err(DeploymentError::DeploymentFinished));
        }
    }

    #[test]
    fn a_cancelled_deployment_cannot_succeed() {
        assert_eq!(
            given(&cancelled())
                .decide(&DeploymentCommand::SucceedDeployment { image: "sha256:abc".into(), now: secs(30) }),
            Err(DeploymentError::DeploymentCancelled)
        );
    }

    #[test]
    fn a_deployment_whose_cancellation_was_requested_cannot_succeed() {
        let history = with(running(), DeploymentEvent::DeploymentCancellationRequested);
        assert_eq!(
            given(&history).decide(&DeploymentCommand::SucceedDeployment { image: "sha256:abc".into(), now: secs(30) }),
            Err(DeploymentError::CancellationRequested)
        );
    }

    #[test]
    fn a_queued_or_running_deployment_can_fail() {
        let fail = DeploymentCommand::FailDeployment {
            step: Some(DeploymentStep::Build),
            reason: "exit 1".into(),
            now: secs(30),
        };
        for history in [queued(), running()] {
            let events = given(&history).decide(&fail).expect("fails");
            let deployment = given(&with(history, events[0].clone()));
            assert_eq!(deployment.status(), Some(DeploymentStatus::Failed));
            assert_eq!(
                deployment.state().and_then(|s| s.failure.clone()),
                Some(Failure { step: Some(DeploymentStep::Build), reason: "exit 1".into() })
            );
        }
    }

    #[test]
    fn a_finished_deployment_cannot_fail() {
        let fail = DeploymentCommand::FailDeployment { step: None, reason: "late".into(), now: secs(30) };
        for history in finished() {
            assert_eq!(given(&history).decide(&fail), Err(DeploymentError::DeploymentFinished));
        }
    }

    #[test]
    fn a_queued_deployment_is_cancelled_at_once() {
        let events = given(&queued()).decide(&DeploymentCommand::CancelDeployment { now: secs(5) });
        assert_eq!(events, Ok(vec![DeploymentEvent::DeploymentCancelled { finished_at: secs(5) }]));
        assert_eq!(given(&cancelled()).status(), Some(DeploymentStatus::Cancelled));
    }

    #[test]
    fn a_running_deployment_is_cancelled_when_the_worker_confirms() {
        let cancel = DeploymentCommand::CancelDeployment { now: secs(5) };
        let mut history = running();
        let events = given(&history).decide(&cancel).expect("requests");
        assert_eq!(events, vec![DeploymentEvent::DeploymentCancellationRequested]);
        history.extend(events);
        let deployment = given(&history);
        assert_eq!(deployment.status(), Some(DeploymentStatus::Running));
        assert!(deployment.state().is_some_and(|s| s.cancel_requested));
        // Asking again records nothing.
        assert_eq!(deployment.decide(&cancel), Ok(vec![]));

        let events = deployment.decide(&DeploymentCommand::ConfirmCancellation { now: secs(8) }).expect("confirms");
        history.extend(events);
        let deployment = given(&history);
        assert_eq!(deployment.status(), Some(DeploymentStatus::Cancelled));
        assert_eq!(deployment.state().and_then(|s| s.finished_at), Some(secs(8)));
    }

    #[test]
    fn a_cancellation_nobody_asked_for_cannot_be_confirmed() {
        let confirm = DeploymentCommand::ConfirmCancellation { now: secs(8) };
        for history in [queued(), running()] {
            assert_eq!(given(&history).decide(&confirm), Err(DeploymentError::CancellationNotRequested));
        }
        for history in finished() {
            assert_eq!(given(&history).decide(&confirm), Err(DeploymentError::DeploymentFinished));
        }
    }

    #[test]
    fn a_worker_hands_back_its_lease_and_another_takes_over_at_once() {
        let release = |w: &str| DeploymentCommand::ReleaseLease { worker_id: w.into() };
        assert_eq!(given(&running()).decide(&release("w2")), Err(DeploymentError::NotTheLeaseHolder));
        assert_eq!(given(&queued()).decide(&release("w1")), Err(DeploymentError::DeploymentNotStarted));
        let released = given(&running()).decide(&release("w1")).expect("the holder may release");
        assert_eq!(released, vec![DeploymentEvent::DeploymentLeaseReleased { worker_id: "w1".into() }]);
        let history = with(running(), released[0].clone());
        let deployment = given(&history);
        assert_eq!(deployment.status(), Some(DeploymentStatus::Running));
        assert_eq!(deployment.state().and_then(|s| s.lease.clone()), None);
        // Long before the old lease would have lapsed.
        let take =
            DeploymentCommand::TakeOverDeployment { worker_id: "w2".into(), lease_until: secs(12), now: secs(2) };
        let taken = deployment.decide(&take).expect("a released lease is free at once");
        assert!(matches!(
            taken.as_slice(),
            [DeploymentEvent::DeploymentTakenOver { previous_worker_id, .. }] if previous_worker_id.is_empty()
        ));
    }

    #[test]
    fn a_deployment_that_switched_its_route_cannot_be_cancelled() {
        let cancel = DeploymentCommand::CancelDeployment { now: secs(9) };
        let health = with(running(), DeploymentEvent::DeploymentStepCompleted { step: DeploymentStep::HealthCheck });
        assert_eq!(given(&health).decide(&cancel), Ok(vec![DeploymentEvent::DeploymentCancellationRequested]));
        let routed = with(health, DeploymentEvent::DeploymentStepCompleted { step: DeploymentStep::Route });
        assert_eq!(given(&routed).decide(&cancel), Err(DeploymentError::PastPointOfNoReturn));
    }

    #[test]
    fn a_finished_deployment_cannot_be_cancelled() {
        for history in finished() {
            assert_eq!(
                given(&history).decide(&DeploymentCommand::CancelDeployment { now: secs(50) }),
                Err(DeploymentError::DeploymentFinished)
            );
        }
    }

    #[test]
    fn a_deployment_is_described_by_its_progress_not_its_release() {
        let history = with(running(), DeploymentEvent::DeploymentCommitResolved { commit: COMMIT.into() });
        let described = given(&history).describe();
        let plain = |v: serde_json::Value| Some(FieldValue::Plain(v));
        assert_eq!(described.get("status").cloned(), plain(json!("running")));
        assert_eq!(described.get("commit").cloned(), plain(json!(COMMIT)));
        assert_eq!(described.get("image").cloned(), plain(json!(null)));
        assert_eq!(described.get("reason").cloned(), plain(json!({ "kind": "manual" })));
        // The release is described on its own (and by the application's history), not repeated
        // in every deployment event's audit entry.
        assert!(described.keys().all(|field| !field.starts_with("release")), "{described:?}");
        assert!(!given(&history).state().expect("exists").release.describe().is_empty());
        assert!(Deployment::New.describe().is_empty());
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let mut events = running();
        events.extend([
            DeploymentEvent::DeploymentLeaseRenewed { lease_expires_at: secs(90) },
            DeploymentEvent::DeploymentLeaseReleased { worker_id: "w1".into() },
            DeploymentEvent::DeploymentTakenOver {
                worker_id: "w2".into(),
                previous_worker_id: "w1".into(),
                lease_expires_at: secs(200),
            },
            DeploymentEvent::DeploymentCommitResolved { commit: COMMIT.into() },
            DeploymentEvent::DeploymentStepCompleted { step: DeploymentStep::HealthCheck },
            DeploymentEvent::DeploymentCancellationRequested,
            DeploymentEvent::DeploymentSucceeded { image: "sha256:abc".into(), finished_at: secs(300) },
            DeploymentEvent::DeploymentFailed { step: None, reason: "lease lapsed".into(), finished_at: secs(300) },
            DeploymentEvent::DeploymentCancelled { finished_at: secs(300) },
        ]);
        for event in events {
            let (kind, payload) = event.encode().expect("encodes");
            assert_eq!(DeploymentEvent::decode(kind, 1, payload).expect("decodes"), event);
            let (kind, text) = event.encode_json().expect("encodes");
            assert_eq!(DeploymentEvent::decode_json(kind, 1, text.get()).expect("decodes"), event);
        }
        let (_, payload) =
            DeploymentEvent::DeploymentStepCompleted { step: DeploymentStep::HealthCheck }.encode().expect("encodes");
        assert_eq!(payload, json!({ "step": "health_check" }));
    }

    #[test]
    fn a_deployment_state_round_trips_through_json() {
        let deployment = given(&succeeded());
        let json = serde_json::to_value(&deployment).expect("encodes");
        assert_eq!(serde_json::from_value::<Deployment>(json).expect("decodes"), deployment);
    }

    // Random command sequences: a small world of two workers and a clock that mostly moves on.

    fn arb_step() -> impl Strategy<Value = DeploymentStep> {
        prop_oneof![
            Just(DeploymentStep::Resolve),
            Just(DeploymentStep::Clone),
            Just(DeploymentStep::Build),
            Just(DeploymentStep::Pull),
            Just(DeploymentStep::Start),
            Just(DeploymentStep::HealthCheck),
            Just(DeploymentStep::Route),
            Just(DeploymentStep::Cleanup),
        ]
    }

    fn arb_worker() -> impl Strategy<Value = String> {
        prop_oneof![Just("w1".to_owned()), Just("w2".to_owned())]
    }

    /// A command, with times relative to the clock at the moment it is sent.
    #[derive(Clone, Debug)]
    enum Step {
        Start(String, i64),
        Renew(String, i64),
        TakeOver(String, i64),
        Commit(bool),
        Complete(DeploymentStep),
        Succeed,
        Fail(Option<DeploymentStep>),
        Cancel,
        Confirm,
        Queue,
    }

    fn arb_command_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (arb_worker(), -10..120_i64).prop_map(|(w, l)| Step::Start(w, l)),
            (arb_worker(), -10..120_i64).prop_map(|(w, l)| Step::Renew(w, l)),
            (arb_worker(), -10..120_i64).prop_map(|(w, l)| Step::TakeOver(w, l)),
            any::<bool>().prop_map(Step::Commit),
            arb_step().prop_map(Step::Complete),
            Just(Step::Succeed),
            proptest::option::of(arb_step()).prop_map(Step::Fail),
            Just(Step::Cancel),
            Just(Step::Confirm),
            Just(Step::Queue),
        ]
    }

    fn to_command(step: &Step, now: OffsetDateTime) -> DeploymentCommand {
        let later = |n: i64| now + Duration::seconds(n);
        match step {
            Step::Start(w, l) => {
                DeploymentCommand::StartDeployment { worker_id: w.clone(), lease_until: later(*l), now }
            }
            Step::Renew(w, l) => DeploymentCommand::RenewLease { worker_id: w.clone(), lease_until: later(*l), now },
            Step::TakeOver(w, l) => {
                DeploymentCommand::TakeOverDeployment { worker_id: w.clone(), lease_until: later(*l), now }
            }
            Step::Commit(valid) => {
                DeploymentCommand::RecordCommit { commit: if *valid { COMMIT.into() } else { "HEAD".into() } }
            }
            Step::Complete(s) => DeploymentCommand::CompleteStep { step: *s },
            Step::Succeed => DeploymentCommand::SucceedDeployment { image: "sha256:abc".into(), now },
            Step::Fail(s) => DeploymentCommand::FailDeployment { step: *s, reason: "boom".into(), now },
            Step::Cancel => DeploymentCommand::CancelDeployment { now },
            Step::Confirm => DeploymentCommand::ConfirmCancellation { now },
            Step::Queue => queue_command(active_application()),
        }
    }

    fn arb_event() -> impl Strategy<Value = DeploymentEvent> {
        let queued = queued().remove(0);
        prop_oneof![
            Just(queued),
            (arb_worker(), 0..100_i64).prop_map(|(w, t)| DeploymentEvent::DeploymentStarted {
                worker_id: w,
                lease_expires_at: secs(t),
                started_at: secs(t),
            }),
            (0..100_i64).prop_map(|t| DeploymentEvent::DeploymentLeaseRenewed { lease_expires_at: secs(t) }),
            arb_worker().prop_map(|worker_id| DeploymentEvent::DeploymentLeaseReleased { worker_id }),
            (arb_worker(), 0..100_i64).prop_map(|(w, t)| DeploymentEvent::DeploymentTakenOver {
                worker_id: w,
                previous_worker_id: "w1".into(),
                lease_expires_at: secs(t),
            }),
            Just(DeploymentEvent::DeploymentCommitResolved { commit: COMMIT.into() }),
            arb_step().prop_map(|step| DeploymentEvent::DeploymentStepCompleted { step }),
            Just(DeploymentEvent::DeploymentSucceeded { image: "sha256:abc".into(), finished_at: T0 }),
            Just(DeploymentEvent::DeploymentFailed { step: None, reason: "boom".into(), finished_at: T0 }),
            Just(DeploymentEvent::DeploymentCancellationRequested),
            Just(DeploymentEvent::DeploymentCancelled { finished_at: T0 }),
        ]
    }

    proptest! {
        #[test]
        fn random_commands_keep_the_deployment_invariants(
            steps in proptest::collection::vec((arb_command_step(), 0..40_i64), 0..40)
        ) {
            let start = queued();
            let mut deployment = given(&start);
            let mut now = T0;
            let mut history: Vec<DeploymentEvent> = Vec::new();
            for (step, tick) in &steps {
                now += Duration::seconds(*tick);
                let before = deployment.status();
                let Ok(events) = deployment.decide(&to_command(step, now)) else {
                    continue;
                };
                for event in &events {
                    deployment = deployment.evolve(event);
                }
                history.extend(events);
                let after = deployment.status();
                if before.is_some_and(DeploymentStatus::is_finished) {
                    prop_assert_eq!(before, after, "a finished deployment changed");
                }
                if after == Some(DeploymentStatus::Running) {
                    prop_assert!(deployment.state().is_some_and(|s| s.lease.is_some()));
                }
            }
            if let Some(cancelled) = history
                .iter()
                .position(|e| matches!(e, DeploymentEvent::DeploymentCancelled { .. }))
            {
                prop_assert!(
                    !history[cancelled..]
                        .iter()
                        .any(|e| matches!(e, DeploymentEvent::DeploymentSucceeded { .. })),
                    "succeeded after cancelled"
                );
            }
            // What decide produced folds to the same state as the state kept along the way.
            let mut all = start;
            all.extend(history);
            prop_assert_eq!(given(&all), deployment);
        }

        #[test]
        fn evolve_never_panics_and_finished_deployments_stay_finished(
            events in proptest::collection::vec(arb_event(), 0..30)
        ) {
            let mut deployment = Deployment::New;
            for event in &events {
                let before = deployment.status();
                deployment = deployment.evolve(event);
                if before.is_some_and(DeploymentStatus::is_finished) {
                    prop_assert_eq!(before, deployment.status());
                }
                if before == Some(DeploymentStatus::Cancelled) {
                    prop_assert_ne!(deployment.status(), Some(DeploymentStatus::Succeeded));
                }
            }
        }
    }
}
