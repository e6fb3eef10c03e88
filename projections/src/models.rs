//! The read models: one table per aggregate kind, one row per aggregate, with the columns that
//! queries filter and show. Secrets never appear in clear: sealed values stay in `state`
//! (ciphertext), and the configuration shown (`config`, `release`) has `null` for their values.

use crate::model::{Projected, ReadModel, StateProjection};
use crate::projection::Projection;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use zpanel_domain::api_token::ApiToken;
use zpanel_domain::application::{Application, EnvValue, EnvVar, ReleaseConfig, Source};
use zpanel_domain::deployment::Deployment;
use zpanel_domain::private_key::PrivateKey;
use zpanel_domain::project::Project;
use zpanel_domain::server::Server;
use zpanel_domain::team::Team;
use zpanel_domain::values::{DomainName, EnvKey, HealthCheck, ResourceLimits};

fn row(value: Value) -> Projected {
    match value {
        Value::Object(map) => Projected::Row(map),
        _ => Projected::Absent,
    }
}

/// Teams and their members.
#[derive(Debug)]
pub struct Teams;

impl ReadModel for Teams {
    type Aggregate = Team;
    const NAME: &'static str = "teams";
    const TABLE: &'static str = "rm_teams";
    const KEY: &'static str = "team_id";

    fn row(state: &Team) -> Projected {
        match state {
            Team::New => Projected::Absent,
            Team::Active { name, members, .. } => row(json!({ "name": name, "members": members })),
        }
    }
}

/// Projects and their environments.
#[derive(Debug)]
pub struct Projects;

impl ReadModel for Projects {
    type Aggregate = Project;
    const NAME: &'static str = "projects";
    const TABLE: &'static str = "rm_projects";
    const KEY: &'static str = "project_id";

    fn row(state: &Project) -> Projected {
        let Some(details) = state.details() else { return Projected::Absent };
        row(json!({
            "name": details.name,
            "environments": details.environments,
            "archived": matches!(state, Project::Archived(_)),
        }))
    }
}

/// The configuration as clients see it (camelCase, as in the API), secret values `null`.
fn shown_config(
    source: &Source,
    port: u16,
    health_check: &HealthCheck,
    domains: &BTreeSet<DomainName>,
    env: &BTreeMap<EnvKey, EnvVar>,
    limits: &ResourceLimits,
    server_id: Option<String>,
) -> Value {
    let source = match source {
        // Credentials only as `***` (events from before they were sealed hold them in the URL).
        Source::Git { url, git_ref, dockerfile, deploy_key, credentials } => json!({
            "kind": "git", "gitUrl": url.shown(credentials.is_some()), "gitRef": git_ref, "dockerfile": dockerfile,
            "deployKeyId": deploy_key,
        }),
        Source::Image { image } => json!({ "kind": "image", "image": image }),
    };
    let env: Vec<Value> = env
        .iter()
        .map(|(key, var)| {
            let (value, secret) = match &var.value {
                EnvValue::Plain(value) => (Value::String(value.clone()), false),
                EnvValue::Secret(_) => (Value::Null, true),
            };
            json!({ "key": key, "value": value, "secret": secret, "buildTime": var.build_time })
        })
        .collect();
    json!({
        "source": source,
        "port": port,
        "healthCheck": {
            "path": health_check.path,
            "intervalSecs": health_check.interval_secs,
            "timeoutSecs": health_check.timeout_secs,
            "retries": health_check.retries,
            "startPeriodSecs": health_check.start_period_secs,
        },
        "domains": domains,
        "env": env,
        "limits": { "memoryBytes": limits.memory_bytes, "cpuMillis": limits.cpu_millis },
        "serverId": server_id,
    })
}

fn shown_release(release: &ReleaseConfig) -> Value {
    shown_config(
        &release.source,
        release.port.get(),
        &release.health_check,
        &release.domains,
        &release.env,
        &release.limits,
        release.server_id.map(|s| s.to_string()),
    )
}

/// Applications: their current configuration, secrets masked.
#[derive(Debug)]
pub struct Applications;

impl ReadModel for Applications {
    type Aggregate = Application;
    const NAME: &'static str = "applications";
    const TABLE: &'static str = "rm_applications";
    const KEY: &'static str = "application_id";

    fn row(state: &Application) -> Projected {
        let Some(app) = state.state() else { return Projected::Absent };
        row(json!({
            "project_id": app.project_id,
            "environment": app.environment,
            "name": app.name,
            "config": shown_release(&app.release_config()),
            "archived": state.is_archived(),
        }))
    }
}

/// Deployments: status, commit, image, failure, lease, and the release they deploy.
#[derive(Debug)]
pub struct Deployments;

impl ReadModel for Deployments {
    type Aggregate = Deployment;
    const NAME: &'static str = "deployments";
    const TABLE: &'static str = "rm_deployments";
    const KEY: &'static str = "deployment_id";

    fn row(state: &Deployment) -> Projected {
        let (Some(d), Some(status)) = (state.state(), state.status()) else { return Projected::Absent };
        row(json!({
            "application_id": d.application_id,
            "status": status.as_str(),
            "reason": d.reason,
            "commit": d.commit,
            "image": d.image,
            "failed_step": d.failure.as_ref().and_then(|f| f.step),
            "failure": d.failure.as_ref().map(|f| &f.reason),
            "worker_id": d.lease.as_ref().map(|l| &l.worker_id),
            "lease_expires_at": d.lease.as_ref().map(|l| rfc3339(l.expires_at)),
            "release": shown_release(&d.release),
            "started_at": d.started_at.map(rfc3339),
            "finished_at": d.finished_at.map(rfc3339),
        }))
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Servers: connection settings, status, facts.
#[derive(Debug)]
pub struct Servers;

impl ReadModel for Servers {
    type Aggregate = Server;
    const NAME: &'static str = "servers";
    const TABLE: &'static str = "rm_servers";
    const KEY: &'static str = "server_id";

    fn row(state: &Server) -> Projected {
        match state {
            Server::New => Projected::Absent,
            Server::Removed { .. } => Projected::Gone,
            Server::Active(s) => row(json!({
                "name": s.name,
                "host": s.connection.host,
                "port": s.connection.port,
                "username": s.connection.user,
                "private_key_id": s.connection.private_key_id,
                "status": s.status.as_str(),
                "last_error": s.last_error,
                "host_key_fingerprint": s.host_key_fingerprint,
                "facts": s.facts,
            })),
        }
    }
}

/// Private keys: the public half only.
#[derive(Debug)]
pub struct PrivateKeys;

impl ReadModel for PrivateKeys {
    type Aggregate = PrivateKey;
    const NAME: &'static str = "private_keys";
    const TABLE: &'static str = "rm_private_keys";
    const KEY: &'static str = "private_key_id";

    fn row(state: &PrivateKey) -> Projected {
        match state {
            PrivateKey::New => Projected::Absent,
            PrivateKey::Removed { .. } => Projected::Gone,
            PrivateKey::Active(k) => {
                row(json!({ "name": k.name, "public_key": k.public_key, "fingerprint": k.fingerprint }))
            }
        }
    }
}

/// API tokens: name, abilities, expiry, revocation, and the hash tokens are looked up by.
#[derive(Debug)]
pub struct ApiTokens;

impl ReadModel for ApiTokens {
    type Aggregate = ApiToken;
    const NAME: &'static str = "api_tokens";
    const TABLE: &'static str = "rm_api_tokens";
    const KEY: &'static str = "token_id";

    fn row(state: &ApiToken) -> Projected {
        let Some(t) = state.details() else { return Projected::Absent };
        row(json!({
            "name": t.name,
            "abilities": t.abilities.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
            "token_hash": t.token_hash,
            "expires_at": t.expires_at.map(rfc3339),
            "revoked": matches!(state, ApiToken::Revoked(_)),
        }))
    }
}

/// Every read-model projection.
#[must_use]
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(StateProjection::<Teams>::default()),
        Arc::new(StateProjection::<Projects>::default()),
        Arc::new(StateProjection::<Applications>::default()),
        Arc::new(StateProjection::<Deployments>::default()),
        Arc::new(StateProjection::<Servers>::default()),
        Arc::new(StateProjection::<PrivateKeys>::default()),
        Arc::new(StateProjection::<ApiTokens>::default()),
    ]
}
