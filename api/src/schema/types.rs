//! The GraphQL object types, built from read-model rows (or, for time travel, from a folded
//! aggregate). Field names follow API.md.

use async_graphql::{ComplexObject, Context, Enum, ID, Json, Object, SimpleObject};
use serde_json::Value;
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use sqlx::types::Json as SqlJson;
use std::sync::Arc;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;
use zpanel_commands::Actor;
use zpanel_commands::Keyring;
use zpanel_domain::application::{Application as AppAggregate, ApplicationState, EnvValue, Source};

use crate::ApiState;
use crate::error::ApiResult;

/// RFC 3339, as every time in the API.
pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// A domain value from its wire name as the read models store it (`running`, `reachable`, …).
fn wire<T: serde::de::DeserializeOwned>(name: String) -> ApiResult<T> {
    serde_json::from_value(Value::String(name)).map_err(|e| anyhow::anyhow!("a stored status: {e}").into())
}

fn id(uuid: Uuid) -> ID {
    ID(uuid.to_string())
}

/// Where a page ends.
#[derive(Clone, Debug, SimpleObject)]
pub struct PageInfo {
    /// Whether more items follow.
    pub has_next_page: bool,
    /// The last item's cursor.
    pub end_cursor: Option<String>,
}

/// A page of a list that can grow (a Relay connection) and its edge type, for one node type.
macro_rules! connection {
    ($connection:ident, $edge:ident, $node:ty) => {
        #[doc = concat!("A page of ", stringify!($node), "s.")]
        #[derive(Clone, Debug, SimpleObject)]
        pub struct $connection {
            /// The items with their cursors.
            pub edges: Vec<$edge>,
            /// The items.
            pub nodes: Vec<$node>,
            /// Where this page ends.
            pub page_info: PageInfo,
            /// How many items the whole list has.
            pub total_count: i64,
        }

        #[doc = concat!("A ", stringify!($node), " and its cursor.")]
        #[derive(Clone, Debug, SimpleObject)]
        pub struct $edge {
            /// Pass as `after` to continue after this item.
            pub cursor: String,
            /// The item.
            pub node: $node,
        }

        impl $connection {
            /// A page from up to `first + 1` fetched items (the extra one only tells that
            /// more follow).
            pub(crate) fn page(mut items: Vec<(String, $node)>, first: usize, total_count: i64) -> Self {
                let has_next_page = items.len() > first;
                items.truncate(first);
                let end_cursor = items.last().map(|(c, _)| c.clone());
                Self {
                    nodes: items.iter().map(|(_, n)| n.clone()).collect(),
                    edges: items.into_iter().map(|(cursor, node)| $edge { cursor, node }).collect(),
                    page_info: PageInfo { has_next_page, end_cursor },
                    total_count,
                }
            }
        }
    };
}

connection!(ApplicationConnection, ApplicationEdge, Application);
connection!(DeploymentConnection, DeploymentEdge, Deployment);
connection!(AuditConnection, AuditEdge, AuditEntry);

/// The caller's team.
#[derive(Clone, Debug, SimpleObject)]
pub struct Team {
    /// Its id.
    pub id: ID,
    /// Its name.
    pub name: String,
    /// Its members.
    pub members: Vec<Member>,
}

/// A member of a team.
#[derive(Clone, Debug, SimpleObject)]
pub struct Member {
    /// The user's id.
    pub user_id: ID,
    /// Their role: owner, admin, member or viewer.
    pub role: String,
}

impl Team {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        let members: Value = row.try_get("members")?;
        let members = members
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(user, role)| Member {
                        user_id: ID(user.clone()),
                        role: role.as_str().unwrap_or_default().to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self { id: id(row.try_get("team_id")?), name: row.try_get("name")?, members })
    }
}

/// A project and its environments.
#[derive(Clone, Debug, SimpleObject)]
pub struct Project {
    /// Its id.
    pub id: ID,
    /// Its name.
    pub name: String,
    /// Its environments (`production` first).
    pub environments: Vec<Environment>,
    /// Whether it is archived.
    pub archived: bool,
    /// How many events it has.
    pub version: i64,
    /// When it was created.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
}

/// A project environment.
#[derive(Clone, Debug, SimpleObject)]
pub struct Environment {
    /// Its name.
    pub name: String,
}

impl Project {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        let environments: Vec<String> = row.try_get("environments")?;
        Ok(Self {
            id: id(row.try_get("project_id")?),
            name: row.try_get("name")?,
            environments: environments.into_iter().map(|name| Environment { name }).collect(),
            archived: row.try_get("archived")?,
            version: row.try_get("version")?,
            created_at: rfc3339(row.try_get("created_at")?),
            updated_at: rfc3339(row.try_get("updated_at")?),
        })
    }
}

/// Whether an application can still change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
pub enum ApplicationStatus {
    /// It can be configured and deployed.
    Active,
    /// Kept for history only.
    Archived,
}

/// Where an application's image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
pub enum SourceKind {
    /// Built from a git repository.
    Git,
    /// Pulled as an image.
    Image,
}

/// An application: its configuration at some version. Secret values read as `null` unless the
/// caller may see secrets.
#[derive(Clone, Debug)]
pub struct Application {
    id: Uuid,
    state: Arc<ApplicationState>,
    archived: bool,
    version: i64,
    updated_at: Option<OffsetDateTime>,
    /// Set when the caller may see secrets.
    reveal: Option<Arc<Keyring>>,
}

impl Application {
    /// The view of a folded aggregate; `None` before it was created.
    pub(crate) fn from_aggregate(
        aggregate: AppAggregate,
        version: i64,
        updated_at: Option<OffsetDateTime>,
        reveal: Option<Arc<Keyring>>,
    ) -> Option<Self> {
        let (state, archived) = match aggregate {
            AppAggregate::New => return None,
            AppAggregate::Active(state) => (state, false),
            AppAggregate::Archived(state) => (state, true),
        };
        Some(Self { id: *state.id.as_uuid(), state: Arc::from(state), archived, version, updated_at, reveal })
    }

    /// The view of an `rm_applications` row (selected with `state`, `version`, `updated_at`).
    pub(crate) fn from_row(row: &PgRow, reveal: Option<Arc<Keyring>>) -> ApiResult<Self> {
        let state: String = row.try_get("state")?;
        let aggregate: AppAggregate =
            serde_json::from_str(&state).map_err(|e| anyhow::anyhow!("decoding an application's state: {e}"))?;
        Self::from_aggregate(aggregate, row.try_get("version")?, Some(row.try_get("updated_at")?), reveal)
            .ok_or_else(|| anyhow::anyhow!("an application row without an application").into())
    }

    /// Its id.
    pub(crate) fn uuid(&self) -> Uuid {
        self.id
    }

    fn open(&self, sealed: &zpanel_domain::secret::SealedSecret) -> Option<String> {
        let keyring = self.reveal.as_ref()?;
        match keyring.open(sealed) {
            Ok(plain) => Some(plain.expose().to_owned()),
            Err(e) => {
                tracing::error!(error = %e, application = %self.id, "a sealed value does not open");
                None
            }
        }
    }
}

/// An environment variable. A secret's `value` is `null` unless the caller may see secrets.
#[derive(Clone, Debug, SimpleObject)]
pub struct EnvVar {
    /// Its name.
    pub key: String,
    /// Its value (or `null`, for a masked secret).
    pub value: Option<String>,
    /// Whether it is secret.
    pub secret: bool,
    /// Whether the build sees it too (as a build argument).
    pub build_time: bool,
}

/// How a new container is judged healthy.
#[derive(Clone, Debug, SimpleObject)]
pub struct HealthCheck {
    /// The HTTP path requested.
    pub path: String,
    /// Seconds between attempts.
    pub interval_secs: u32,
    /// Seconds one attempt may take.
    pub timeout_secs: u32,
    /// Failed attempts tolerated.
    pub retries: u32,
    /// Seconds after start during which failures don't count.
    pub start_period_secs: u32,
}

/// Container limits.
#[derive(Clone, Debug, SimpleObject)]
pub struct Limits {
    /// Memory, in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU, in thousandths of a core.
    pub cpu_millis: Option<u32>,
}

#[Object]
impl Application {
    async fn id(&self) -> ID {
        id(self.id)
    }
    async fn name(&self) -> String {
        self.state.name.to_string()
    }
    async fn project_id(&self) -> ID {
        id(*self.state.project_id.as_uuid())
    }
    async fn environment(&self) -> String {
        self.state.environment.to_string()
    }
    /// How many events it has had: version 1 is the state right after creation.
    async fn version(&self) -> i64 {
        self.version
    }
    async fn status(&self) -> ApplicationStatus {
        if self.archived { ApplicationStatus::Archived } else { ApplicationStatus::Active }
    }
    async fn source_kind(&self) -> SourceKind {
        match self.state.source {
            Source::Git { .. } => SourceKind::Git,
            Source::Image { .. } => SourceKind::Image,
        }
    }
    async fn git_url(&self) -> Option<String> {
        match &self.state.source {
            // Credentials show as `***`: sealed ones are not in the URL, and older events may
            // still hold them in it.
            Source::Git { url, credentials, .. } => Some(url.shown(credentials.is_some())),
            Source::Image { .. } => None,
        }
    }
    async fn git_ref(&self) -> Option<String> {
        match &self.state.source {
            Source::Git { git_ref, .. } => Some(git_ref.to_string()),
            Source::Image { .. } => None,
        }
    }
    async fn dockerfile(&self) -> Option<String> {
        match &self.state.source {
            Source::Git { dockerfile, .. } => Some(dockerfile.to_string()),
            Source::Image { .. } => None,
        }
    }
    async fn deploy_key_id(&self) -> Option<ID> {
        match &self.state.source {
            Source::Git { deploy_key, .. } => deploy_key.map(|k| id(*k.as_uuid())),
            Source::Image { .. } => None,
        }
    }
    async fn image(&self) -> Option<String> {
        match &self.state.source {
            Source::Image { image } => Some(image.to_string()),
            Source::Git { .. } => None,
        }
    }
    async fn port(&self) -> u16 {
        self.state.port.get()
    }
    async fn health_check_path(&self) -> String {
        self.state.health_check.path.to_string()
    }
    async fn health_check(&self) -> HealthCheck {
        let h = &self.state.health_check;
        HealthCheck {
            path: h.path.to_string(),
            interval_secs: h.interval_secs,
            timeout_secs: h.timeout_secs,
            retries: h.retries,
            start_period_secs: h.start_period_secs,
        }
    }
    async fn domains(&self) -> Vec<String> {
        self.state.domains.iter().map(ToString::to_string).collect()
    }
    async fn server_id(&self) -> Option<ID> {
        self.state.server_id.map(|s| id(*s.as_uuid()))
    }
    async fn limits(&self) -> Limits {
        Limits { memory_bytes: self.state.limits.memory_bytes, cpu_millis: self.state.limits.cpu_millis }
    }
    async fn env(&self) -> Vec<EnvVar> {
        self.state
            .env
            .iter()
            .map(|(key, var)| {
                let (value, secret) = match &var.value {
                    EnvValue::Plain(value) => (Some(value.clone()), false),
                    EnvValue::Secret(sealed) => (self.open(sealed), true),
                };
                EnvVar { key: key.to_string(), value, secret, build_time: var.build_time }
            })
            .collect()
    }
    /// The secret that signs its deploy webhooks; `null` unless the caller may see secrets.
    async fn webhook_secret(&self) -> Option<String> {
        self.open(&self.state.webhook_secret)
    }
    /// When it last changed.
    async fn updated_at(&self) -> Option<String> {
        self.updated_at.map(rfc3339)
    }
    /// The deployment serving now: its latest successful one.
    async fn current_deployment(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Deployment>> {
        let state = ctx.data::<ApiState>()?;
        let row = sqlx::query(&format!(
            "select {DEPLOYMENT_COLUMNS} from rm_deployments
              where team_id = $1 and application_id = $2 and status = 'succeeded'
              order by finished_at desc nulls last, deployment_id desc limit 1"
        ))
        .bind(self.state.team_id.as_uuid())
        .bind(self.id)
        .fetch_optional(&state.pool)
        .await
        .map_err(crate::error::ApiError::from)?;
        Ok(row.as_ref().map(Deployment::from_row).transpose()?)
    }
}

/// A deployment's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[graphql(remote = "zpanel_domain::deployment::DeploymentStatus")]
pub enum DeploymentStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker is deploying it.
    Running,
    /// It is serving.
    Succeeded,
    /// It failed; the previous release keeps serving.
    Failed,
    /// It was cancelled.
    Cancelled,
}

/// The columns [`Deployment::from_row`] reads.
pub(crate) const DEPLOYMENT_COLUMNS: &str = "deployment_id, application_id, status, reason, commit, image, \
     failed_step, failure, release, version, created_at, started_at, finished_at, updated_at";

/// A deployment of an application.
#[derive(Clone, Debug, SimpleObject)]
#[graphql(complex)]
pub struct Deployment {
    /// Its id.
    pub id: ID,
    /// The application.
    pub application_id: ID,
    /// Where it is.
    pub status: DeploymentStatus,
    /// Why it was started: `manual`, `webhook` or `rollback`, with details.
    pub reason: Json<Value>,
    /// The commit deployed, once resolved.
    pub commit: Option<String>,
    /// The image deployed, once built (or the image re-deployed by a rollback).
    pub image: Option<String>,
    /// The step that failed.
    pub failed_step: Option<String>,
    /// Why it failed.
    pub failure: Option<String>,
    /// The configuration it deploys (secret values `null`).
    pub release: Json<Value>,
    /// How many events it has had.
    pub version: i64,
    /// When it was queued.
    pub created_at: String,
    /// When a worker started it.
    pub started_at: Option<String>,
    /// When it ended.
    pub finished_at: Option<String>,
    /// When it last changed.
    pub updated_at: String,
}

impl Deployment {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        let status: zpanel_domain::deployment::DeploymentStatus = wire(row.try_get("status")?)?;
        Ok(Self {
            id: id(row.try_get("deployment_id")?),
            application_id: id(row.try_get("application_id")?),
            status: status.into(),
            reason: Json(row.try_get("reason")?),
            commit: row.try_get("commit")?,
            image: row.try_get("image")?,
            failed_step: row.try_get("failed_step")?,
            failure: row.try_get("failure")?,
            release: Json(row.try_get("release")?),
            version: row.try_get("version")?,
            created_at: rfc3339(row.try_get("created_at")?),
            started_at: row.try_get::<Option<OffsetDateTime>, _>("started_at")?.map(rfc3339),
            finished_at: row.try_get::<Option<OffsetDateTime>, _>("finished_at")?.map(rfc3339),
            updated_at: rfc3339(row.try_get("updated_at")?),
        })
    }
}

#[ComplexObject]
impl Deployment {
    /// Its log: the lines after sequence `after` (default: from the first), at most `first`
    /// (default 500, up to 1000). The subscription `deploymentLogs` follows them live.
    #[graphql(complexity = "super::list_cost(first, 500, child_complexity)")]
    async fn logs(&self, ctx: &Context<'_>, after: Option<i32>, first: Option<i32>) -> ApiResult<Vec<LogLine>> {
        let (state, caller) = super::caller(ctx)?;
        caller.require(zpanel_domain::values::Ability::Read)?;
        let (after, first) = (crate::logs::after_sequence(after)?, crate::logs::page_of_lines(first)?);
        // Loaded within the caller's team, so its log is the caller's to read.
        let deployment =
            Uuid::parse_str(self.id.as_str()).map_err(|e| anyhow::anyhow!("a deployment id is not a uuid: {e}"))?;
        crate::logs::read_lines(&state.pool, deployment, after, first).await
    }
}

/// Which output a log line comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
pub enum LogStream {
    /// Zpanel's own account of what it does (steps, commands, outcomes).
    System,
    /// A process's standard output.
    Stdout,
    /// A process's standard error.
    Stderr,
}

impl LogStream {
    /// From its stored name (`system`, `stdout`, `stderr`).
    fn parse(stored: &str) -> ApiResult<Self> {
        match stored {
            "system" => Ok(Self::System),
            "stdout" => Ok(Self::Stdout),
            "stderr" => Ok(Self::Stderr),
            other => Err(anyhow::anyhow!("a stored log line has the unknown stream {other:?}").into()),
        }
    }
}

impl From<crate::logs::ContainerStream> for LogStream {
    fn from(stream: crate::logs::ContainerStream) -> Self {
        match stream {
            crate::logs::ContainerStream::Stdout => Self::Stdout,
            crate::logs::ContainerStream::Stderr => Self::Stderr,
        }
    }
}

/// One line of a log.
#[derive(Clone, Debug, PartialEq, Eq, SimpleObject)]
pub struct LogLine {
    /// Its place in the log: 1, 2, 3, … without gaps (for a container's log, counted from the
    /// subscription's first line).
    pub sequence: i32,
    /// When it was written.
    pub at: String,
    /// Which output it comes from.
    pub stream: LogStream,
    /// The line, without its line break.
    pub text: String,
}

/// The columns [`LogLine::from_row`] reads (of `deployment_logs`).
pub(crate) const LOG_LINE_COLUMNS: &str = "sequence, stream, at, text";

impl LogLine {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        Ok(Self {
            sequence: row.try_get("sequence")?,
            at: rfc3339(row.try_get("at")?),
            stream: LogStream::parse(row.try_get("stream")?)?,
            text: row.try_get("text")?,
        })
    }

    /// A container's line, numbered `sequence` by the subscription.
    pub(crate) fn from_container(sequence: i32, line: crate::logs::ContainerLogLine) -> Self {
        Self { sequence, at: rfc3339(line.at), stream: line.stream.into(), text: line.text }
    }
}

/// A server's reachability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[graphql(remote = "zpanel_domain::server::ServerStatus")]
pub enum ServerStatus {
    /// Not validated yet.
    Unknown,
    /// A validation is under way.
    Validating,
    /// The last check reached it.
    Reachable,
    /// The last check did not reach it.
    Unreachable,
}

/// What validation found out about a server.
#[derive(Clone, Debug, SimpleObject)]
pub struct ServerFacts {
    /// Operating system name and version.
    pub os: String,
    /// Docker Engine version.
    pub docker_version: String,
    /// CPU count.
    pub cpus: u32,
    /// Memory, in bytes.
    pub memory_bytes: u64,
    /// Free disk, in bytes.
    pub disk_free_bytes: u64,
    /// What to know about these facts, e.g. a Docker Engine older than Zpanel supports (24).
    pub warnings: Vec<String>,
}

impl From<zpanel_domain::server::ServerFacts> for ServerFacts {
    fn from(f: zpanel_domain::server::ServerFacts) -> Self {
        Self {
            warnings: f.warnings(),
            os: f.os,
            docker_version: f.docker_version,
            cpus: f.cpus,
            memory_bytes: f.memory_bytes,
            disk_free_bytes: f.disk_free_bytes,
        }
    }
}

/// A server reached over SSH.
#[derive(Clone, Debug, SimpleObject)]
pub struct Server {
    /// Its id.
    pub id: ID,
    /// Its name.
    pub name: String,
    /// Host name or IP address.
    pub host: String,
    /// SSH port.
    pub port: i32,
    /// Login account.
    pub user: String,
    /// Login key.
    pub private_key_id: ID,
    /// Reachability.
    pub status: ServerStatus,
    /// Why the last check failed.
    pub last_error: Option<String>,
    /// The host key, as first seen.
    pub host_key_fingerprint: Option<String>,
    /// What validation found.
    pub facts: Option<ServerFacts>,
    /// The bastion it is reached through, if any (logged in to with the same key).
    pub jump_host: Option<JumpHost>,
    /// The jump host's host key, as first seen.
    pub jump_host_key_fingerprint: Option<String>,
    /// How many events it has had.
    pub version: i64,
}

/// A bastion a server is reached through (OpenSSH's `ProxyJump`).
#[derive(Clone, Debug, SimpleObject)]
pub struct JumpHost {
    /// Host name or IP address.
    pub host: String,
    /// SSH port.
    pub port: i32,
    /// Login account there.
    pub user: String,
}

impl Server {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        let folded: zpanel_domain::server::Server = serde_json::from_str(&row.try_get::<String, _>("state")?)
            .map_err(|e| anyhow::anyhow!("decoding a server's state: {e}"))?;
        let details = folded.details().ok_or_else(|| anyhow::anyhow!("a server row of a removed server"))?;
        Ok(Self::from_details(details, row.try_get("version")?))
    }

    /// The server as its folded state at `version` describes it.
    pub(crate) fn from_details(details: &zpanel_domain::server::ServerDetails, version: i64) -> Self {
        let connection = &details.connection;
        Self {
            id: id(*details.id.as_uuid()),
            name: details.name.as_str().to_owned(),
            host: connection.host.as_str().to_owned(),
            port: i32::from(connection.port.get()),
            user: connection.user.as_str().to_owned(),
            private_key_id: id(*connection.private_key_id.as_uuid()),
            status: details.status.into(),
            last_error: details.last_error.clone(),
            host_key_fingerprint: details.host_key_fingerprint.clone(),
            facts: details.facts.clone().map(ServerFacts::from),
            jump_host: connection.jump.as_ref().map(|jump| JumpHost {
                host: jump.host.as_str().to_owned(),
                port: i32::from(jump.port.get()),
                user: jump.user.as_str().to_owned(),
            }),
            jump_host_key_fingerprint: details.jump_host_key_fingerprint.clone(),
            version,
        }
    }
}

/// An SSH key pair; only the public half is ever shown.
#[derive(Clone, Debug, SimpleObject)]
pub struct PrivateKey {
    /// Its id.
    pub id: ID,
    /// Its name.
    pub name: String,
    /// The public half, OpenSSH one-line form: install it in `authorized_keys`.
    pub public_key: String,
    /// `SHA256:…`.
    pub fingerprint: String,
    /// When it was added.
    pub created_at: String,
}

impl PrivateKey {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        Ok(Self {
            id: id(row.try_get("private_key_id")?),
            name: row.try_get("name")?,
            public_key: row.try_get("public_key")?,
            fingerprint: row.try_get("fingerprint")?,
            created_at: rfc3339(row.try_get("created_at")?),
        })
    }

    /// The key as its folded state describes it, added at `created_at`.
    pub(crate) fn from_details(
        details: &zpanel_domain::private_key::PrivateKeyDetails,
        created_at: OffsetDateTime,
    ) -> Self {
        Self {
            id: id(*details.id.as_uuid()),
            name: details.name.as_str().to_owned(),
            public_key: details.public_key.clone(),
            fingerprint: details.fingerprint.clone(),
            created_at: rfc3339(created_at),
        }
    }
}

/// An API token (never its secret).
#[derive(Clone, Debug, SimpleObject)]
pub struct ApiToken {
    /// Its id.
    pub id: ID,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub abilities: Vec<String>,
    /// When it stops working.
    pub expires_at: Option<String>,
    /// Whether it was revoked.
    pub revoked: bool,
    /// When it was created.
    pub created_at: String,
}

impl ApiToken {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        Ok(Self {
            id: id(row.try_get("token_id")?),
            name: row.try_get("name")?,
            abilities: row.try_get("abilities")?,
            expires_at: row.try_get::<Option<OffsetDateTime>, _>("expires_at")?.map(rfc3339),
            revoked: row.try_get("revoked")?,
            created_at: rfc3339(row.try_get("created_at")?),
        })
    }
}

/// A new token: the secret is shown here, once.
#[derive(Clone, Debug, SimpleObject)]
pub struct CreatedApiToken {
    /// The token (`zp_…`). Store it now; it cannot be shown again.
    pub token: String,
    /// The token's record.
    pub api_token: ApiToken,
}

/// Who caused an event.
#[derive(Clone, Debug, SimpleObject)]
pub struct ActorView {
    /// `user`, `token`, `worker` or `system`.
    pub kind: String,
    /// Its id, when it has one.
    pub id: Option<String>,
    /// A name for people.
    pub name: String,
}

impl From<&Actor> for ActorView {
    fn from(actor: &Actor) -> Self {
        Self { kind: actor.kind.as_str().to_owned(), id: actor.id.clone(), name: actor.name.clone() }
    }
}

/// One changed field: before and after. Secrets read as `"[secret]"`, only to show they changed.
#[derive(Clone, Debug, SimpleObject)]
pub struct Change {
    /// Dotted path, e.g. `gitRef` or `env.DATABASE_URL`.
    pub field: String,
    /// The value before (`null`: absent).
    pub before: Option<Json<Value>>,
    /// The value after (`null`: removed).
    pub after: Option<Json<Value>>,
    /// Whether the field holds a secret.
    pub secret: bool,
}

impl From<zpanel_domain::changes::Change> for Change {
    fn from(c: zpanel_domain::changes::Change) -> Self {
        Self { field: c.field, before: c.before.map(Json), after: c.after.map(Json), secret: c.secret }
    }
}

/// An entry of the audit log: who did what, when, to which stream, with before/after values.
#[derive(Clone, Debug, SimpleObject)]
#[graphql(complex)]
pub struct AuditEntry {
    /// The event's position in the whole log.
    pub position: i64,
    /// The stream's version after the event.
    pub version: i64,
    /// When.
    pub at: String,
    /// Who.
    pub actor: ActorView,
    /// What happened, e.g. `EnvironmentVariableSet`.
    pub event_type: String,
    /// Which aggregate: `kind-uuid`.
    pub stream_id: String,
    /// Each changed field, before and after.
    pub changes: Vec<Change>,
    /// Set on the first entry a subscriber receives after it fell behind and was resynchronised
    /// from the audit log (nothing was lost).
    pub resynchronised: bool,
}

#[ComplexObject]
impl AuditEntry {
    /// The aggregate's kind: `application`, `deployment`, …
    async fn stream_kind(&self) -> &str {
        zpanel_commands::store::stream_kind(&self.stream_id)
    }
}

/// The columns [`AuditEntry::from_row`] reads (of `rm_audit_log`).
pub(crate) const AUDIT_COLUMNS: &str =
    "a.global_position, a.version, a.at, a.actor, a.event_type, a.stream_id, a.changes";

impl AuditEntry {
    pub(crate) fn from_row(row: &PgRow) -> ApiResult<Self> {
        let SqlJson(actor) = row.try_get::<SqlJson<Actor>, _>("actor")?;
        let SqlJson(changes) = row.try_get::<SqlJson<Vec<zpanel_domain::changes::Change>>, _>("changes")?;
        Ok(Self {
            position: row.try_get("global_position")?,
            version: row.try_get("version")?,
            at: rfc3339(row.try_get("at")?),
            actor: ActorView::from(&actor),
            event_type: row.try_get("event_type")?,
            stream_id: row.try_get("stream_id")?,
            changes: changes.into_iter().map(Change::from).collect(),
            resynchronised: false,
        })
    }
}

/// A stored event, as recorded (sealed values and hashes of secrets replaced by `"[secret]"`).
#[derive(Clone, Debug, SimpleObject)]
pub struct Event {
    /// Its position in the whole log.
    pub position: i64,
    /// The stream's version after it.
    pub version: i64,
    /// Its type, e.g. `ApplicationCreated`.
    pub event_type: String,
    /// Its schema version.
    pub schema_version: u32,
    /// When it was recorded.
    pub at: String,
    /// Who caused it.
    pub actor: ActorView,
    /// Its content.
    pub payload: Json<Value>,
    /// The command that caused it.
    pub command_id: ID,
    /// The request it belongs to.
    pub correlation_id: ID,
    /// The event that caused it, if any.
    pub causation_id: Option<ID>,
}

impl Event {
    pub(crate) fn from_recorded(event: &zpanel_commands::RecordedEvent) -> ApiResult<Self> {
        let mut payload = event.payload.to_value().map_err(|e| anyhow::anyhow!("decoding a payload: {e}"))?;
        mask_secrets(&mut payload);
        Ok(Self {
            position: event.global_position,
            version: event.version,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            at: rfc3339(event.recorded_at),
            actor: ActorView::from(&event.metadata.actor),
            payload: Json(payload),
            command_id: id(event.metadata.command_id),
            correlation_id: id(event.metadata.correlation_id),
            causation_id: event.metadata.causation_id.map(id),
        })
    }
}

/// Replaces every sealed secret (`{key_id, nonce, ciphertext, digest}`) and every hash of a
/// secret (`token_hash`, any `…_hash`) by `"[secret]"`. The ciphertext is safe, but clients have
/// no use for it, and none of it should travel; a token's hash is what it is looked up by, and a
/// `read` token has no business holding another token's.
fn mask_secrets(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("ciphertext") && map.contains_key("nonce") {
                *value = Value::String(zpanel_domain::changes::SECRET_PLACEHOLDER.to_owned());
                return;
            }
            for (key, field) in map.iter_mut() {
                if key == "hash" || key.ends_with("_hash") || key.ends_with("Hash") {
                    *field = Value::String(zpanel_domain::changes::SECRET_PLACEHOLDER.to_owned());
                } else {
                    mask_secrets(field);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        // A repository URL recorded with its credentials, before they were sealed apart.
        Value::String(text) => {
            if let Ok(url) = zpanel_domain::values::GitUrl::parse(text)
                && url.credentials().is_some()
            {
                *text = url.redacted();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::mask_secrets;
    use serde_json::json;

    #[test]
    fn sealed_values_and_hashes_of_secrets_never_leave_in_an_event() {
        let mut payload = json!({
            "type": "ApiTokenCreated",
            "data": { "name": "ci", "token_hash": "9f86d081884c7d65", "abilities": ["read"] },
            "webhook_secret": { "key_id": "k", "nonce": "n", "ciphertext": "c", "digest": "d" },
            "env": [{ "key": "A", "value": { "key_id": "k", "nonce": "n", "ciphertext": "c", "digest": "d" } }],
        });
        mask_secrets(&mut payload);
        assert_eq!(
            payload,
            json!({
                "type": "ApiTokenCreated",
                "data": { "name": "ci", "token_hash": "[secret]", "abilities": ["read"] },
                "webhook_secret": "[secret]",
                "env": [{ "key": "A", "value": "[secret]" }],
            })
        );
    }
}
