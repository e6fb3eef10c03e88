//! Mutations: one per intent. Each parses its input into domain values (a bad field is
//! `INVALID_INPUT` naming it, and nothing is written), looks up the outside facts the rule
//! needs, sends the command, waits until the read models show its effect, and returns the
//! affected object. A client `commandId` makes a retry return the first result instead of
//! acting twice.

use super::types::{ApiToken, Application, CreatedApiToken, Deployment, PrivateKey, Project, Server};
use super::{caller, load, parse_id};
use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use async_graphql::{Context, ID, InputObject, MaybeUndefined, Object};
use std::collections::BTreeSet;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;
use zpanel_commands::{CommandContext, EventStore as _, Outcome, Plaintext};
use zpanel_domain::Aggregate;
use zpanel_domain::api_token::{ApiToken as TokenAggregate, ApiTokenCommand};
use zpanel_domain::application::{
    Application as AppAggregate, ApplicationCommand, ApplicationPatch, EnvValue, LifecycleAction, Source,
};
use zpanel_domain::deployment::{Deployment as DeploymentAggregate, DeploymentCommand, DeploymentReason};
use zpanel_domain::ids::{ApiTokenId, ApplicationId, DeploymentId, PrivateKeyId, ProjectId, ServerId};
use zpanel_domain::private_key::{PrivateKey as KeyAggregate, PrivateKeyCommand};
use zpanel_domain::project::{Project as ProjectAggregate, ProjectCommand};
use zpanel_domain::secret::SealedSecret;
use zpanel_domain::server::{Server as ServerAggregate, ServerCommand, ServerPatch};
use zpanel_domain::values::{
    Abilities, Ability, DomainName, EnvKey, EnvironmentName, GitRef, GitUrl, HealthCheck, HealthPath, Host, ImageRef,
    Name, Port, RepoPath, ResourceLimits, UnixUser, ValueError,
};
use zpanel_projections::history::{AsOf, load_as_of};

/// The mutation root.
#[derive(Debug, Default)]
pub struct Mutation;

/// Parses an input field, naming it in the error.
fn field<T>(name: &str, value: &str, parse: impl FnOnce(&str) -> Result<T, ValueError>) -> ApiResult<T> {
    parse(value).map_err(|e| ApiError::invalid(name, e.rule))
}

/// A repository URL that this installation lets tenants clone: a local path only under the
/// operator's roots (checked on the API's host here, and again by the worker before it clones).
fn git_url(state: &ApiState, name: &str, value: &str) -> ApiResult<GitUrl> {
    let url = field(name, value, GitUrl::parse)?;
    state
        .git_local_roots
        .admit(&url, |path| std::fs::canonicalize(path))
        .map_err(|e| ApiError::invalid(name, e.rule))?;
    Ok(url)
}

/// `url` without the credentials written into it, and them sealed (they never reach an
/// event, a read model or a log in plaintext): `Some(None)` when it has none; `None` when they
/// are `***`, as reads show them, which keeps the credentials the application has.
fn sealed_credentials(state: &ApiState, url: &GitUrl) -> (GitUrl, Option<Option<SealedSecret>>) {
    let sealed = match url.credentials() {
        Some(GitUrl::MASK) => None,
        Some(userinfo) => Some(Some(state.keyring.seal(&Plaintext::new(userinfo.to_owned())))),
        None => Some(None),
    };
    (url.without_credentials(), sealed)
}

/// Parses an optional input field.
fn optional<T>(
    name: &str,
    value: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, ValueError>,
) -> ApiResult<Option<T>> {
    value.map(|v| field(name, v, parse)).transpose()
}

/// An id in the input that must name something of the caller's team.
fn input_id(name: &str, id: &ID) -> ApiResult<Uuid> {
    Uuid::parse_str(id.as_str()).map_err(|_| ApiError::invalid(name, "must be an id this API returned"))
}

/// The id of the object a create with `command_id` made, if that command ran before: a
/// retried create must answer with its first result, so it is sent again for the same object
/// (and the handler answers from the log) instead of creating a second one.
async fn created_before<A: Aggregate>(state: &ApiState, command_id: Option<&ID>) -> ApiResult<Option<Uuid>> {
    let Some(command_id) = command_id else { return Ok(None) };
    let command_id = input_id("commandId", command_id)?;
    let Some(events) = state.handler.store().find_command(command_id).await? else { return Ok(None) };
    // Stream ids are `kind-<uuid>`.
    let target = events.first().and_then(|e| e.stream_id.strip_prefix(A::KIND)?.strip_prefix('-')?.parse().ok());
    match target {
        Some(id) => Ok(Some(id)),
        None => Err(ApiError::invalid("commandId", "was already used for another command")),
    }
}

fn port(name: &str, value: i32) -> ApiResult<Port> {
    u32::try_from(value)
        .map_err(|_| ValueError { rule: "must be a number from 1 to 65535".into() })
        .and_then(Port::try_from)
        .map_err(|e| ApiError::invalid(name, e.rule))
}

/// The command context of a request: the caller's team and token, and the client's command id.
fn context(caller: &Caller, command_id: Option<&ID>) -> ApiResult<CommandContext> {
    let ctx = CommandContext::new(caller.team_id, caller.actor(), "api");
    match command_id {
        None => Ok(ctx),
        Some(id) => Ok(ctx.with_command_id(input_id("commandId", id)?)),
    }
}

/// Sends a command and waits until the read models show its events.
async fn send<A: Aggregate>(
    state: &ApiState,
    caller: &Caller,
    command_id: Option<&ID>,
    what: &'static str,
    id: Uuid,
    command: &A::Command,
) -> ApiResult<Outcome<A>> {
    let ctx = context(caller, command_id)?;
    let outcome = execute::<A>(state, &ctx, what, id, command).await?;
    if let Some(last) = outcome.events.last() {
        state.visible(last.cursor()).await?;
    }
    Ok(outcome)
}

/// Sends a command in `ctx` and counts its outcome, without waiting for the read models: what
/// [`send`] does for a caller, and what a webhook (which has no caller) does itself.
pub(crate) async fn execute<A: Aggregate>(
    state: &ApiState,
    ctx: &CommandContext,
    what: &'static str,
    id: Uuid,
    command: &A::Command,
) -> ApiResult<Outcome<A>> {
    let outcome = match state.handler.execute::<A>(ctx, id, command).await {
        Ok(outcome) => outcome,
        Err(e) => {
            let error = ApiError::from_command(what, e);
            state.metrics.command(A::KIND, error.code());
            return Err(error);
        }
    };
    state.metrics.command(A::KIND, "ok");
    Ok(outcome)
}

fn found<T>(what: &'static str, value: Option<T>) -> ApiResult<T> {
    value.ok_or(ApiError::NotFound(what))
}

/// The names of the caller's team's objects that `sql` selects with `$1` the team and `$2` the
/// object they use.
async fn users_of(state: &ApiState, caller: &Caller, sql: &str, id: Uuid) -> ApiResult<Vec<String>> {
    Ok(sqlx::query_scalar(sql).bind(caller.team_id.as_uuid()).bind(id).fetch_all(&state.pool).await?)
}

/// A domain rule's refusal (`CONFLICT`), completed with who is in the way (`users`, when any).
fn naming(error: ApiError, users: &str) -> ApiError {
    match error {
        ApiError::Conflict(rule) if !users.is_empty() => ApiError::Conflict(format!("{rule}: {users}")),
        other => other,
    }
}

/// An aggregate as it was just before the removal `outcome` recorded (the same for a retried
/// removal, whose read-model row is long gone).
async fn before_removal<A: Aggregate>(
    state: &ApiState,
    caller: &Caller,
    id: Uuid,
    outcome: &Outcome<A>,
) -> ApiResult<zpanel_projections::history::Snapshot<A>> {
    let at = AsOf::Version(outcome.version - 1);
    load_as_of::<A>(&state.pool, *caller.team_id.as_uuid(), id, at).await?.ok_or(ApiError::NotFound(A::KIND))
}

const APPLICATIONS_ON_SERVER: &str = "select name from rm_applications
  where team_id = $1 and not archived and config->>'serverId' = $2::text order by name";
const SERVERS_WITH_KEY: &str = "select name from rm_servers where team_id = $1 and private_key_id = $2 order by name";
const APPLICATIONS_WITH_KEY: &str = "select name from rm_applications
  where team_id = $1 and not archived and config->'source'->>'deployKeyId' = $2::text order by name";
const PROJECT_NAMES: &str = "select name from rm_projects where team_id = $1 and project_id is distinct from $2";
const APPLICATION_NAMES: &str =
    "select name from rm_applications where project_id = $1 and application_id is distinct from $2";
const KEY_NAMES: &str = "select name from rm_private_keys where team_id = $1 and private_key_id is distinct from $2";
const SERVER_NAMES: &str = "select name from rm_servers where team_id = $1 and server_id is distinct from $2";

/// `createProject`.
#[derive(Debug, InputObject)]
pub struct CreateProjectInput {
    /// Unique within the team.
    pub name: String,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `renameProject`.
#[derive(Debug, InputObject)]
pub struct RenameProjectInput {
    /// The project.
    pub id: ID,
    /// The new name.
    pub name: String,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `archiveProject`, `archiveApplication`, `revokeApiToken`, …
#[derive(Debug, InputObject)]
pub struct IdInput {
    /// The object.
    pub id: ID,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `validateServer`, `runServerCheck`.
#[derive(Debug, InputObject)]
pub struct ValidateServerInput {
    /// The server.
    pub server_id: ID,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `createEnvironment`.
#[derive(Debug, InputObject)]
pub struct CreateEnvironmentInput {
    /// The project.
    pub project_id: ID,
    /// The environment's name, e.g. `staging`.
    pub name: String,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `createApplication`: a git source (`gitUrl`, `gitRef`, `dockerfile`) or an `image`.
#[derive(Debug, InputObject)]
pub struct CreateApplicationInput {
    /// The project.
    pub project_id: ID,
    /// The project environment (default `production`).
    pub environment: Option<String>,
    /// Unique within the project.
    pub name: String,
    /// Repository: https, `git@host:path`, or a local path.
    pub git_url: Option<String>,
    /// Branch, tag or commit (default `main`).
    pub git_ref: Option<String>,
    /// Dockerfile path in the repository (default `Dockerfile`).
    pub dockerfile: Option<String>,
    /// SSH key to clone with.
    pub deploy_key_id: Option<ID>,
    /// An image to pull instead of building.
    pub image: Option<String>,
    /// The port it listens on in its container (default 80).
    pub port: Option<i32>,
    /// Health check path (default `/`).
    pub health_check_path: Option<String>,
    /// Domains routed to it.
    pub domains: Option<Vec<String>>,
    /// Memory limit, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit, thousandths of a core.
    pub cpu_millis: Option<u32>,
    /// Target server (default: the local Docker Engine).
    pub server_id: Option<ID>,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `updateApplication`: each field given is changed, each left out is kept; give at least one.
/// Every field of the application's configuration can be changed here except its environment
/// variables (`setEnvironmentVariable`) and its project and environment (fixed at creation).
///
/// Fields that choose what runs and where — `gitUrl`, `gitRef`, `dockerfile`, `deployKeyId`,
/// `clearDeployKey`, `image`, `serverId`, `clearServer` — also need `read:sensitive` (or
/// `root`): the next deployment hands the application's secrets to the code and the server
/// they name, so choosing them is reading the secrets.
#[derive(Debug, InputObject)]
pub struct UpdateApplicationInput {
    /// The application.
    pub id: ID,
    /// A new name, unique within the project.
    pub name: Option<String>,
    /// A new repository (git applications). Needs `read:sensitive`.
    pub git_url: Option<String>,
    /// A new branch, tag or commit to build (git applications). Needs `read:sensitive`.
    pub git_ref: Option<String>,
    /// A new Dockerfile path (git applications). Needs `read:sensitive`.
    pub dockerfile: Option<String>,
    /// A new SSH key of the team to clone with (git applications); `clearDeployKey` to clone
    /// without one. Needs `read:sensitive`.
    pub deploy_key_id: Option<ID>,
    /// Clone without a deploy key (git applications). Needs `read:sensitive`.
    pub clear_deploy_key: Option<bool>,
    /// A new image (image applications). Needs `read:sensitive`.
    pub image: Option<String>,
    /// A new port the application listens on in its container.
    pub port: Option<i32>,
    /// A new health check path (shorthand for `healthCheck { path }`).
    pub health_check_path: Option<String>,
    /// New health check settings; each field left out is kept.
    pub health_check: Option<HealthCheckInput>,
    /// The new set of domains (replacing the old one). Each is unique across the
    /// installation: `CONFLICT` when another application holds it, or (of another team) a
    /// name it overlaps.
    pub domains: Option<Vec<String>>,
    /// A new memory limit in bytes (at least 6 MiB); `null` for none.
    pub memory_bytes: MaybeUndefined<u64>,
    /// A new CPU limit in thousandths of a CPU; `null` for none.
    pub cpu_millis: MaybeUndefined<u32>,
    /// A new server of the team; `clearServer` to use the local engine. Needs
    /// `read:sensitive`.
    pub server_id: Option<ID>,
    /// Use the local Docker Engine. Needs `read:sensitive`.
    pub clear_server: Option<bool>,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// How a new container is judged healthy; each field left out is kept.
#[derive(Debug, InputObject)]
pub struct HealthCheckInput {
    /// HTTP path requested through the container's published port.
    pub path: Option<String>,
    /// Seconds between attempts (1–300).
    pub interval_secs: Option<u32>,
    /// Seconds one attempt may take (1–300, at most the interval).
    pub timeout_secs: Option<u32>,
    /// Failed attempts tolerated after the start period (1–100).
    pub retries: Option<u32>,
    /// Seconds after start during which failures don't count (0–3600).
    pub start_period_secs: Option<u32>,
}

impl HealthCheckInput {
    /// `current` with this input's fields, checked; `healthCheckPath` (the shorthand) is
    /// `path_shorthand`.
    fn apply(input: Option<&Self>, path_shorthand: Option<&str>, current: &HealthCheck) -> ApiResult<HealthCheck> {
        let path = match (input.and_then(|i| i.path.as_deref()), path_shorthand) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid("healthCheckPath", "give either healthCheckPath or healthCheck.path"));
            }
            (Some(path), None) => field("healthCheck.path", path, HealthPath::parse)?,
            (None, Some(path)) => field("healthCheckPath", path, HealthPath::parse)?,
            (None, None) => current.path.clone(),
        };
        let pick = |given: Option<u32>, kept: u32| given.unwrap_or(kept);
        HealthCheck::new(
            path,
            pick(input.and_then(|i| i.interval_secs), current.interval_secs),
            pick(input.and_then(|i| i.timeout_secs), current.timeout_secs),
            pick(input.and_then(|i| i.retries), current.retries),
            pick(input.and_then(|i| i.start_period_secs), current.start_period_secs),
        )
        .map_err(|e| ApiError::invalid("healthCheck", e.rule))
    }
}

/// `setEnvironmentVariable`.
#[derive(Debug, InputObject)]
pub struct SetEnvironmentVariableInput {
    /// The application.
    pub application_id: ID,
    /// Its name.
    pub key: String,
    /// Its value.
    pub value: String,
    /// Seal it, and show it only to tokens with `read:sensitive`.
    pub secret: Option<bool>,
    /// Pass it to the image build too.
    pub build_time: Option<bool>,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `unsetEnvironmentVariable`.
#[derive(Debug, InputObject)]
pub struct UnsetEnvironmentVariableInput {
    /// The application.
    pub application_id: ID,
    /// Its name.
    pub key: String,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `deployApplication`.
#[derive(Debug, InputObject)]
pub struct DeployApplicationInput {
    /// The application.
    pub application_id: ID,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `cancelDeployment`.
#[derive(Debug, InputObject)]
pub struct CancelDeploymentInput {
    /// The deployment.
    pub deployment_id: ID,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `rollbackApplication`: re-deploy an earlier deployment's image and configuration.
#[derive(Debug, InputObject)]
pub struct RollbackApplicationInput {
    /// The application.
    pub application_id: ID,
    /// The deployment whose release to re-create.
    pub deployment_id: ID,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `addPrivateKey`: import an OpenSSH or PEM key, or leave `privateKey` out to generate Ed25519.
#[derive(Debug, InputObject)]
pub struct AddPrivateKeyInput {
    /// Unique within the team.
    pub name: String,
    /// The private key (OpenSSH or PEM). Sealed at once; never shown again.
    pub private_key: Option<String>,
    /// The passphrase protecting `privateKey`, if one does: used once to open it (the key is
    /// then sealed under Zpanel's master key) and kept nowhere.
    pub passphrase: Option<String>,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `createServer`.
#[derive(Debug, InputObject)]
pub struct CreateServerInput {
    /// Unique within the team.
    pub name: String,
    /// Host name or IP address.
    pub host: String,
    /// SSH port (default 22).
    pub port: Option<i32>,
    /// Login account (default `root`).
    pub user: Option<String>,
    /// Login key.
    pub private_key_id: ID,
    /// A bastion to reach it through, logged in to with the same key.
    pub jump_host: Option<JumpHostInput>,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// `updateServer`: each field given is changed.
#[derive(Debug, InputObject)]
pub struct UpdateServerInput {
    /// The server.
    pub id: ID,
    /// A new name.
    pub name: Option<String>,
    /// A new host name or IP address.
    pub host: Option<String>,
    /// A new SSH port.
    pub port: Option<i32>,
    /// A new login account.
    pub user: Option<String>,
    /// A new login key.
    pub private_key_id: Option<ID>,
    /// A new jump host; `clearJumpHost` to connect directly.
    pub jump_host: Option<JumpHostInput>,
    /// Connect directly, without a jump host.
    pub clear_jump_host: Option<bool>,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// A jump host (bastion) of `createServer` and `updateServer`.
#[derive(Debug, InputObject)]
pub struct JumpHostInput {
    /// Host name or IP address.
    pub host: String,
    /// SSH port (default 22).
    pub port: Option<i32>,
    /// Login account there (default `root`).
    pub user: Option<String>,
}

impl JumpHostInput {
    /// The jump host, each field checked and named (`jumpHost.host`, …) when refused.
    fn parse(&self) -> ApiResult<zpanel_domain::server::JumpHost> {
        Ok(zpanel_domain::server::JumpHost {
            host: field("jumpHost.host", &self.host, Host::parse)?,
            port: port("jumpHost.port", self.port.unwrap_or(22))?,
            user: field("jumpHost.user", self.user.as_deref().unwrap_or("root"), UnixUser::parse)?,
        })
    }
}

/// `createApiToken`.
#[derive(Debug, InputObject)]
pub struct CreateApiTokenInput {
    /// What it is for.
    pub name: String,
    /// `read`, `read:sensitive`, `write`, `deploy`, `root`: never more than the caller's.
    pub abilities: Vec<String>,
    /// When it stops working (RFC 3339); never, if left out.
    pub expires_at: Option<String>,
    /// For idempotent retries.
    pub command_id: Option<ID>,
}

/// Domains an application may claim: valid names, no wildcard at a public suffix, none of the
/// control plane's `reserved` hosts. (Whether another application holds one is decided when
/// the claim is written: `CONFLICT`.)
fn domains(name: &str, values: &[String], reserved: &[DomainName]) -> ApiResult<BTreeSet<DomainName>> {
    values
        .iter()
        .map(|d| field(name, d, |d| DomainName::parse(d).and_then(|d| d.check_claimable(reserved).map(|()| d))))
        .collect()
}

/// A nullable input field over `current`: left out keeps it, `null` clears it.
fn maybe<T: Copy>(given: &MaybeUndefined<T>, current: Option<T>) -> Option<T> {
    match given {
        MaybeUndefined::Undefined => current,
        MaybeUndefined::Null => None,
        MaybeUndefined::Value(value) => Some(*value),
    }
}

/// A server of the caller's team, or `INVALID_INPUT` naming `name`.
async fn team_server(state: &ApiState, caller: &Caller, name: &str, id: &ID) -> ApiResult<ServerId> {
    let id = input_id(name, id)?;
    if load::server(state, caller, id).await?.is_none() {
        return Err(ApiError::invalid(name, "is not a server of this team"));
    }
    Ok(ServerId::from_uuid(id))
}

/// A key of the caller's team, or `INVALID_INPUT` naming `name`.
async fn team_key(state: &ApiState, caller: &Caller, name: &str, id: &ID) -> ApiResult<PrivateKeyId> {
    let id = input_id(name, id)?;
    if load::private_key(state, caller, id).await?.is_none() {
        return Err(ApiError::invalid(name, "is not a private key of this team"));
    }
    Ok(PrivateKeyId::from_uuid(id))
}

/// Takes one validation from the caller's team's budget, or `RATE_LIMITED`.
fn take_validation(state: &ApiState, caller: &Caller) -> ApiResult<()> {
    state.tenancy.validation(*caller.team_id.as_uuid()).map_err(|wait| ApiError::RateLimited {
        retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
    })
}

/// The application's project, from its read model.
async fn project_of(state: &ApiState, caller: &Caller, application: Uuid) -> ApiResult<Uuid> {
    sqlx::query_scalar("select project_id from rm_applications where team_id = $1 and application_id = $2")
        .bind(caller.team_id.as_uuid())
        .bind(application)
        .fetch_optional(&state.pool)
        .await?
        .ok_or(ApiError::NotFound("application"))
}

async fn reload_application(state: &ApiState, caller: &Caller, id: Uuid) -> ApiResult<Application> {
    found("application", load::application(state, caller, id).await?)
}

#[Object]
impl Mutation {
    /// Creates a project with a `production` environment.
    async fn create_project(&self, ctx: &Context<'_>, input: CreateProjectInput) -> ApiResult<Project> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let name = field("name", &input.name, Name::parse)?;
        let id = created_before::<ProjectAggregate>(state, input.command_id.as_ref())
            .await?
            .map_or_else(ProjectId::new, ProjectId::from_uuid);
        let team = *caller.team_id.as_uuid();
        let command = ProjectCommand::CreateProject {
            id,
            team_id: caller.team_id,
            name,
            names_in_use: load::names_in_use(state, PROJECT_NAMES, team, None).await?,
        };
        let outcome =
            send::<ProjectAggregate>(state, caller, input.command_id.as_ref(), "project", *id.as_uuid(), &command)
                .await?;
        found("project", load::project(state, caller, outcome_id(&outcome)?).await?)
    }

    /// Renames a project.
    async fn rename_project(&self, ctx: &Context<'_>, input: RenameProjectInput) -> ApiResult<Project> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.id, "project")?;
        let name = field("name", &input.name, Name::parse)?;
        let team = *caller.team_id.as_uuid();
        let command = ProjectCommand::RenameProject {
            name,
            names_in_use: load::names_in_use(state, PROJECT_NAMES, team, Some(id)).await?,
        };
        send::<ProjectAggregate>(state, caller, input.command_id.as_ref(), "project", id, &command).await?;
        found("project", load::project(state, caller, id).await?)
    }

    /// Archives a project that has no active applications.
    async fn archive_project(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<Project> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.id, "project")?;
        let active: i64 =
            sqlx::query_scalar("select count(*) from rm_applications where project_id = $1 and not archived")
                .bind(id)
                .fetch_one(&state.pool)
                .await?;
        let command =
            ProjectCommand::ArchiveProject { active_applications: usize::try_from(active).unwrap_or(usize::MAX) };
        send::<ProjectAggregate>(state, caller, input.command_id.as_ref(), "project", id, &command).await?;
        found("project", load::project(state, caller, id).await?)
    }

    /// Adds an environment to a project.
    async fn create_environment(&self, ctx: &Context<'_>, input: CreateEnvironmentInput) -> ApiResult<Project> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.project_id, "project")?;
        let name = field("name", &input.name, EnvironmentName::parse)?;
        send::<ProjectAggregate>(
            state,
            caller,
            input.command_id.as_ref(),
            "project",
            id,
            &ProjectCommand::CreateEnvironment { name },
        )
        .await?;
        found("project", load::project(state, caller, id).await?)
    }

    /// Creates an application in a project environment.
    async fn create_application(&self, ctx: &Context<'_>, input: CreateApplicationInput) -> ApiResult<Application> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let project = input_id("projectId", &input.project_id)?;
        let Some(project_view) = load::project(state, caller, project).await? else {
            return Err(ApiError::NotFound("project"));
        };
        let environment =
            field("environment", input.environment.as_deref().unwrap_or("production"), EnvironmentName::parse)?;
        let name = field("name", &input.name, Name::parse)?;
        let source = match (&input.git_url, &input.image) {
            (Some(_), Some(_)) => return Err(ApiError::invalid("image", "give either gitUrl or image, not both")),
            (None, None) => return Err(ApiError::invalid("gitUrl", "give either gitUrl or image")),
            (Some(url), None) => {
                let (url, credentials) = sealed_credentials(state, &git_url(state, "gitUrl", url)?);
                let credentials = credentials.ok_or_else(|| {
                    ApiError::invalid("gitUrl", "'***' stands for credentials already stored; give the credentials")
                })?;
                Source::Git {
                    url,
                    credentials,
                    git_ref: field("gitRef", input.git_ref.as_deref().unwrap_or("main"), GitRef::parse)?,
                    dockerfile: field(
                        "dockerfile",
                        input.dockerfile.as_deref().unwrap_or("Dockerfile"),
                        RepoPath::parse,
                    )?,
                    deploy_key: match &input.deploy_key_id {
                        Some(id) => Some(team_key(state, caller, "deployKeyId", id).await?),
                        None => None,
                    },
                }
            }
            (None, Some(image)) => Source::Image { image: field("image", image, ImageRef::parse_runnable)? },
        };
        let health_check = HealthCheck {
            path: field("healthCheckPath", input.health_check_path.as_deref().unwrap_or("/"), HealthPath::parse)?,
            ..HealthCheck::default()
        };
        let limits = ResourceLimits::new(input.memory_bytes, input.cpu_millis).map_err(|e| {
            ApiError::invalid(if input.memory_bytes.is_some() { "memoryBytes" } else { "cpuMillis" }, e.rule)
        })?;
        let server_id = match &input.server_id {
            Some(id) => Some(team_server(state, caller, "serverId", id).await?),
            None => None,
        };
        let id = created_before::<AppAggregate>(state, input.command_id.as_ref())
            .await?
            .map_or_else(ApplicationId::new, ApplicationId::from_uuid);
        let command = ApplicationCommand::CreateApplication {
            id,
            team_id: caller.team_id,
            project_id: ProjectId::from_uuid(project),
            environment_exists: project_view.environments.iter().any(|e| e.name == environment.to_string()),
            environment,
            name,
            source,
            port: port("port", input.port.unwrap_or(80))?,
            health_check,
            domains: domains("domains", input.domains.as_deref().unwrap_or_default(), state.tenancy.reserved())?,
            limits,
            server_id,
            webhook_secret: state.keyring.seal(&Plaintext::new(random_secret())),
            names_in_use: load::names_in_use(state, APPLICATION_NAMES, project, None).await?,
        };
        let outcome =
            send::<AppAggregate>(state, caller, input.command_id.as_ref(), "application", *id.as_uuid(), &command)
                .await?;
        reload_application(state, caller, outcome_id(&outcome)?).await
    }

    /// Changes an application's configuration: the fields given (see `UpdateApplicationInput`
    /// for which ones, and which of them need `read:sensitive`). Takes effect at the next
    /// deployment, except domains given up, which stop being routed to it at once.
    async fn update_application(&self, ctx: &Context<'_>, input: UpdateApplicationInput) -> ApiResult<Application> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.id, "application")?;
        let project = project_of(state, caller, id).await?;
        let chooses_what_runs_where = input.git_url.is_some()
            || input.git_ref.is_some()
            || input.dockerfile.is_some()
            || input.deploy_key_id.is_some()
            || input.clear_deploy_key.is_some()
            || input.image.is_some()
            || input.server_id.is_some()
            || input.clear_server.is_some();
        if chooses_what_runs_where {
            caller.require(Ability::ReadSensitive)?;
        }
        let server_id = match (&input.server_id, input.clear_server.unwrap_or(false)) {
            (Some(_), true) => return Err(ApiError::invalid("clearServer", "give either serverId or clearServer")),
            (Some(sid), false) => Some(Some(team_server(state, caller, "serverId", sid).await?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let deploy_key = match (&input.deploy_key_id, input.clear_deploy_key.unwrap_or(false)) {
            (Some(_), true) => {
                return Err(ApiError::invalid("clearDeployKey", "give either deployKeyId or clearDeployKey"));
            }
            (Some(key), false) => Some(Some(team_key(state, caller, "deployKeyId", key).await?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let given_url = match input.git_url.as_deref() {
            Some(url) => Some(sealed_credentials(state, &git_url(state, "gitUrl", url)?)),
            None => None,
        };
        let changes_health = input.health_check_path.is_some() || input.health_check.is_some();
        let changes_limits = !input.memory_bytes.is_undefined() || !input.cpu_millis.is_undefined();
        let (health_check, limits) = if changes_health || changes_limits {
            let (current, _) = state
                .handler
                .load::<AppAggregate>(caller.team_id, id)
                .await
                .map_err(|e| ApiError::from_command("application", e))?;
            let current = current.state().ok_or(ApiError::NotFound("application"))?;
            let health_check = changes_health
                .then(|| {
                    HealthCheckInput::apply(
                        input.health_check.as_ref(),
                        input.health_check_path.as_deref(),
                        &current.health_check,
                    )
                })
                .transpose()?;
            let limits = changes_limits
                .then(|| {
                    let memory = maybe(&input.memory_bytes, current.limits.memory_bytes);
                    let cpu = maybe(&input.cpu_millis, current.limits.cpu_millis);
                    ResourceLimits::new(memory, None).map_err(|e| ApiError::invalid("memoryBytes", e.rule))?;
                    ResourceLimits::new(memory, cpu).map_err(|e| ApiError::invalid("cpuMillis", e.rule))
                })
                .transpose()?;
            (health_check, limits)
        } else {
            (None, None)
        };
        let reserved = state.tenancy.reserved();
        let patch = ApplicationPatch {
            name: optional("name", input.name.as_deref(), Name::parse)?,
            git_url: given_url.as_ref().map(|(url, _)| url.clone()),
            git_credentials: given_url.and_then(|(_, credentials)| credentials),
            git_ref: optional("gitRef", input.git_ref.as_deref(), GitRef::parse)?,
            dockerfile: optional("dockerfile", input.dockerfile.as_deref(), RepoPath::parse)?,
            deploy_key,
            image: optional("image", input.image.as_deref(), ImageRef::parse_runnable)?,
            port: input.port.map(|p| port("port", p)).transpose()?,
            health_check,
            domains: input.domains.as_deref().map(|d| domains("domains", d, reserved)).transpose()?,
            limits,
            server_id,
        };
        if patch.is_empty() {
            return Err(ApiError::invalid("input", "give at least one field to change"));
        }
        let command = ApplicationCommand::UpdateApplication {
            patch,
            names_in_use: load::names_in_use(state, APPLICATION_NAMES, project, Some(id)).await?,
        };
        send::<AppAggregate>(state, caller, input.command_id.as_ref(), "application", id, &command).await?;
        reload_application(state, caller, id).await
    }

    /// Archives an application: it keeps its history but can no longer change or be deployed.
    async fn archive_application(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<Application> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.id, "application")?;
        send::<AppAggregate>(
            state,
            caller,
            input.command_id.as_ref(),
            "application",
            id,
            &ApplicationCommand::ArchiveApplication,
        )
        .await?;
        reload_application(state, caller, id).await
    }

    /// Stops the application's running release (its container); the route stays, and answers
    /// 502 until it is started again or redeployed.
    async fn stop_application(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<Application> {
        control(ctx, input, LifecycleAction::Stop).await
    }

    /// Starts the application's stopped release again.
    async fn start_application(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<Application> {
        control(ctx, input, LifecycleAction::Start).await
    }

    /// Restarts the application's running release (same image, same configuration).
    async fn restart_application(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<Application> {
        control(ctx, input, LifecycleAction::Restart).await
    }

    /// Sets (or replaces) an environment variable; a secret is sealed before it is stored.
    async fn set_environment_variable(
        &self,
        ctx: &Context<'_>,
        input: SetEnvironmentVariableInput,
    ) -> ApiResult<Application> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.application_id, "application")?;
        let key = field("key", &input.key, EnvKey::parse)?;
        if input.value.contains('\0') {
            return Err(ApiError::invalid("value", "must not contain NUL characters"));
        }
        let value = if input.secret.unwrap_or(false) {
            EnvValue::Secret(state.keyring.seal(&Plaintext::new(input.value)))
        } else {
            EnvValue::Plain(input.value)
        };
        let command =
            ApplicationCommand::SetEnvironmentVariable { key, value, build_time: input.build_time.unwrap_or(false) };
        send::<AppAggregate>(state, caller, input.command_id.as_ref(), "application", id, &command).await?;
        reload_application(state, caller, id).await
    }

    /// Removes an environment variable.
    async fn unset_environment_variable(
        &self,
        ctx: &Context<'_>,
        input: UnsetEnvironmentVariableInput,
    ) -> ApiResult<Application> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.application_id, "application")?;
        let key = field("key", &input.key, EnvKey::parse)?;
        send::<AppAggregate>(
            state,
            caller,
            input.command_id.as_ref(),
            "application",
            id,
            &ApplicationCommand::UnsetEnvironmentVariable { key },
        )
        .await?;
        reload_application(state, caller, id).await
    }

    /// Queues a deployment of the application's current configuration.
    async fn deploy_application(&self, ctx: &Context<'_>, input: DeployApplicationInput) -> ApiResult<Deployment> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Deploy)?;
        let app = parse_id(&input.application_id, "application")?;
        queue(state, caller, input.command_id.as_ref(), app, DeploymentReason::Manual, None).await
    }

    /// Re-deploys an earlier deployment's image and configuration, without a rebuild.
    async fn rollback_application(&self, ctx: &Context<'_>, input: RollbackApplicationInput) -> ApiResult<Deployment> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Deploy)?;
        let app = parse_id(&input.application_id, "application")?;
        let of = input_id("deploymentId", &input.deployment_id)?;
        let (past, _) = state
            .handler
            .load::<DeploymentAggregate>(caller.team_id, of)
            .await
            .map_err(|e| ApiError::from_command("deployment", e))?;
        let Some(past) = past.state() else { return Err(ApiError::NotFound("deployment")) };
        if *past.application_id.as_uuid() != app {
            return Err(ApiError::invalid("deploymentId", "is not a deployment of this application"));
        }
        let Some(image) = past.image.clone() else {
            return Err(ApiError::invalid("deploymentId", "has no image to re-deploy (it never built one)"));
        };
        let release = past.release.clone();
        let reason = DeploymentReason::Rollback { of: DeploymentId::from_uuid(of) };
        queue(state, caller, input.command_id.as_ref(), app, reason, Some((image, release))).await
    }

    /// Cancels a queued or running deployment (a running one stops at its next step).
    async fn cancel_deployment(&self, ctx: &Context<'_>, input: CancelDeploymentInput) -> ApiResult<Deployment> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Deploy)?;
        let id = parse_id(&input.deployment_id, "deployment")?;
        let command = DeploymentCommand::CancelDeployment { now: OffsetDateTime::now_utc() };
        send::<DeploymentAggregate>(state, caller, input.command_id.as_ref(), "deployment", id, &command).await?;
        found("deployment", load::deployment(state, caller, id).await?)
    }

    /// Adds an SSH key: imported (OpenSSH or PEM), or generated (Ed25519) when `privateKey` is
    /// left out. The private half is sealed at once.
    async fn add_private_key(&self, ctx: &Context<'_>, input: AddPrivateKeyInput) -> ApiResult<PrivateKey> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let name = field("name", &input.name, Name::parse)?;
        let passphrase = input.passphrase.map(Plaintext::new);
        let material = match input.private_key {
            Some(pem) => zpanel_commands::ssh_keys::open(Plaintext::new(pem), passphrase).await,
            None => zpanel_commands::ssh_keys::generate_ed25519(),
        }
        .map_err(|e| ApiError::invalid(e.field(), e))?;
        let id = created_before::<KeyAggregate>(state, input.command_id.as_ref())
            .await?
            .map_or_else(PrivateKeyId::new, PrivateKeyId::from_uuid);
        let team = *caller.team_id.as_uuid();
        let command = PrivateKeyCommand::AddPrivateKey {
            id,
            team_id: caller.team_id,
            name,
            public_key: material.public_key,
            fingerprint: material.fingerprint,
            private_key: state.keyring.seal(&material.private_key),
            names_in_use: load::names_in_use(state, KEY_NAMES, team, None).await?,
        };
        let outcome =
            send::<KeyAggregate>(state, caller, input.command_id.as_ref(), "private key", *id.as_uuid(), &command)
                .await?;
        found("private key", load::private_key(state, caller, outcome_id(&outcome)?).await?)
    }

    /// Removes an SSH key that no server logs in with and no application clones with; its
    /// sealed private half is gone with it. Answers with the key as it was just before.
    async fn remove_private_key(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<PrivateKey> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.id, "private key")?;
        let servers = users_of(state, caller, SERVERS_WITH_KEY, id).await?;
        let applications = users_of(state, caller, APPLICATIONS_WITH_KEY, id).await?;
        let mut users = Vec::new();
        if !servers.is_empty() {
            users.push(format!("servers {} log in with it", servers.join(", ")));
        }
        if !applications.is_empty() {
            users.push(format!("applications {} clone with it", applications.join(", ")));
        }
        let command = PrivateKeyCommand::RemovePrivateKey { in_use_by: servers.len() + applications.len() };
        let outcome = send::<KeyAggregate>(state, caller, input.command_id.as_ref(), "private key", id, &command)
            .await
            .map_err(|e| naming(e, &users.join("; ")))?;
        let before = before_removal(state, caller, id, &outcome).await?;
        let added = load_as_of::<KeyAggregate>(&state.pool, *caller.team_id.as_uuid(), id, AsOf::Version(1)).await?;
        let details = before.state.details().ok_or(ApiError::NotFound("private key"))?;
        let created_at = added.and_then(|a| a.at).ok_or(ApiError::NotFound("private key"))?;
        Ok(PrivateKey::from_details(details, created_at))
    }

    /// Registers a server reached over SSH.
    async fn create_server(&self, ctx: &Context<'_>, input: CreateServerInput) -> ApiResult<Server> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let name = field("name", &input.name, Name::parse)?;
        let host = field("host", &input.host, Host::parse)?;
        let user = field("user", input.user.as_deref().unwrap_or("root"), UnixUser::parse)?;
        let jump = input.jump_host.as_ref().map(JumpHostInput::parse).transpose()?;
        let key = team_key(state, caller, "privateKeyId", &input.private_key_id).await?;
        let id = created_before::<ServerAggregate>(state, input.command_id.as_ref())
            .await?
            .map_or_else(ServerId::new, ServerId::from_uuid);
        let team = *caller.team_id.as_uuid();
        let command = ServerCommand::CreateServer {
            id,
            team_id: caller.team_id,
            name,
            host,
            port: port("port", input.port.unwrap_or(22))?,
            user,
            private_key_id: key,
            jump,
            names_in_use: load::names_in_use(state, SERVER_NAMES, team, None).await?,
            key_exists: true,
        };
        let outcome =
            send::<ServerAggregate>(state, caller, input.command_id.as_ref(), "server", *id.as_uuid(), &command)
                .await?;
        found("server", load::server(state, caller, outcome_id(&outcome)?).await?)
    }

    /// Changes a server's name or how it is reached. A new host, port or jump host forgets the
    /// host keys and facts recorded for the old one: validate the server again before deploying
    /// to it. Changing how it is reached also needs `read:sensitive`: the applications on it
    /// get their secrets wherever it points.
    async fn update_server(&self, ctx: &Context<'_>, input: UpdateServerInput) -> ApiResult<Server> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.id, "server")?;
        let repoints = input.host.is_some()
            || input.port.is_some()
            || input.user.is_some()
            || input.private_key_id.is_some()
            || input.jump_host.is_some()
            || input.clear_jump_host.is_some();
        if repoints {
            caller.require(Ability::ReadSensitive)?;
        }
        let jump = match (&input.jump_host, input.clear_jump_host.unwrap_or(false)) {
            (Some(_), true) => return Err(ApiError::invalid("clearJumpHost", "give either jumpHost or clearJumpHost")),
            (Some(jump), false) => Some(Some(jump.parse()?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let (name, host) = (
            optional("name", input.name.as_deref(), Name::parse)?,
            optional("host", input.host.as_deref(), Host::parse)?,
        );
        let port = input.port.map(|p| port("port", p)).transpose()?;
        let user = optional("user", input.user.as_deref(), UnixUser::parse)?;
        let private_key_id = match &input.private_key_id {
            Some(key) => Some(team_key(state, caller, "privateKeyId", key).await?),
            None => None,
        };
        let patch = ServerPatch { name, host, port, user, private_key_id, jump };
        if patch == ServerPatch::default() {
            return Err(ApiError::invalid("input", "give at least one field to change"));
        }
        let command = ServerCommand::UpdateServer {
            patch,
            names_in_use: load::names_in_use(state, SERVER_NAMES, *caller.team_id.as_uuid(), Some(id)).await?,
            key_exists: true,
        };
        send::<ServerAggregate>(state, caller, input.command_id.as_ref(), "server", id, &command).await?;
        found("server", load::server(state, caller, id).await?)
    }

    /// Removes a server that no application deploys to. Answers with the server as it was
    /// just before; its history stays in the audit log.
    async fn remove_server(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<Server> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.id, "server")?;
        let users = users_of(state, caller, APPLICATIONS_ON_SERVER, id).await?;
        let command = ServerCommand::RemoveServer { applications_using_it: users.len() };
        let named = if users.is_empty() {
            String::new()
        } else {
            format!("{}; move them to another server or archive them first", users.join(", "))
        };
        let outcome = send::<ServerAggregate>(state, caller, input.command_id.as_ref(), "server", id, &command)
            .await
            .map_err(|e| naming(e, &named))?;
        let before = before_removal(state, caller, id, &outcome).await?;
        let details = before.state.details().ok_or(ApiError::NotFound("server"))?;
        Ok(Server::from_details(details, before.version))
    }

    /// Asks for a server to be connected to and checked. A team has a budget of validations
    /// and checks (`RATE_LIMITED` when it is spent). Until the server has once been validated
    /// (its host key is known), a failure says only that Zpanel could not log in there, not
    /// why: the details would tell anyone what listens at any address the workers reach.
    async fn validate_server(&self, ctx: &Context<'_>, input: ValidateServerInput) -> ApiResult<Server> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.server_id, "server")?;
        take_validation(state, caller)?;
        send::<ServerAggregate>(
            state,
            caller,
            input.command_id.as_ref(),
            "server",
            id,
            &ServerCommand::RequestValidation,
        )
        .await?;
        found("server", load::server(state, caller, id).await?)
    }

    /// Asks for a validated server to be checked now, as the periodic health check does; a
    /// change of reachability shows in its `status` (`ServerBecameUnreachable`,
    /// `ServerRecovered` in the audit log). `CONFLICT` before the server's first validation.
    async fn run_server_check(&self, ctx: &Context<'_>, input: ValidateServerInput) -> ApiResult<Server> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Write)?;
        let id = parse_id(&input.server_id, "server")?;
        take_validation(state, caller)?;
        send::<ServerAggregate>(state, caller, input.command_id.as_ref(), "server", id, &ServerCommand::RequestCheck)
            .await?;
        found("server", load::server(state, caller, id).await?)
    }

    /// Creates an API token; its secret is in the answer, once. Needs `root`, never grants more
    /// than the caller has, and never outlives it: a caller that expires must give an
    /// `expiresAt` no later than its own.
    async fn create_api_token(&self, ctx: &Context<'_>, input: CreateApiTokenInput) -> ApiResult<CreatedApiToken> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Root)?;
        let name = field("name", &input.name, Name::parse)?;
        let abilities =
            input.abilities.iter().map(|a| field("abilities", a, Ability::parse)).collect::<ApiResult<Vec<_>>>()?;
        if abilities.is_empty() {
            return Err(ApiError::invalid("abilities", "give at least one ability"));
        }
        let expires_at = input
            .expires_at
            .as_deref()
            .map(|at| OffsetDateTime::parse(at, &Rfc3339))
            .transpose()
            .map_err(|_| ApiError::invalid("expiresAt", "must be an RFC 3339 time, e.g. 2027-01-01T00:00:00Z"))?;
        let generated = zpanel_commands::tokens::generate();
        let id = ApiTokenId::new();
        let command = ApiTokenCommand::CreateApiToken {
            id,
            team_id: caller.team_id,
            name,
            abilities: Abilities::new(abilities),
            token_hash: generated.hash.clone(),
            expires_at,
            creator_abilities: caller.abilities.clone(),
            creator_expires_at: caller.expires_at,
            now: OffsetDateTime::now_utc(),
        };
        let outcome =
            send::<TokenAggregate>(state, caller, input.command_id.as_ref(), "api token", *id.as_uuid(), &command)
                .await?;
        if outcome.repeated {
            // The secret of a token created by an earlier request was shown to that request only.
            return Err(ApiError::Conflict("this commandId already created a token; its secret was shown then".into()));
        }
        let api_token = found("api token", load::api_token(state, caller, *id.as_uuid()).await?)?;
        Ok(CreatedApiToken { token: generated.token.expose().to_owned(), api_token })
    }

    /// Revokes an API token; it stops working at once, on open subscriptions too.
    async fn revoke_api_token(&self, ctx: &Context<'_>, input: IdInput) -> ApiResult<ApiToken> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Root)?;
        let id = parse_id(&input.id, "api token")?;
        send::<TokenAggregate>(
            state,
            caller,
            input.command_id.as_ref(),
            "api token",
            id,
            &ApiTokenCommand::RevokeApiToken,
        )
        .await?;
        found("api token", load::api_token(state, caller, id).await?)
    }
}

/// The aggregate id of an outcome (for creates retried with a command id: the first one's).
pub(crate) fn outcome_id<A>(outcome: &Outcome<A>) -> ApiResult<Uuid> {
    zpanel_commands::store::aggregate_uuid(&outcome.stream_id)
        .ok_or_else(|| anyhow::anyhow!("stream id {} without a uuid", outcome.stream_id).into())
}

/// Queues a deployment of `app`: its current configuration, or a past `(image, release)`.
/// Asks the deploy worker to stop, start or restart an application's current release.
async fn control(ctx: &Context<'_>, input: IdInput, action: LifecycleAction) -> ApiResult<Application> {
    let (state, caller) = caller(ctx)?;
    caller.require(Ability::Deploy)?;
    let id = parse_id(&input.id, "application")?;
    let command = ApplicationCommand::ControlApplication { action };
    send::<AppAggregate>(state, caller, input.command_id.as_ref(), "application", id, &command).await?;
    reload_application(state, caller, id).await
}

async fn queue(
    state: &ApiState,
    caller: &Caller,
    command_id: Option<&ID>,
    app: Uuid,
    reason: DeploymentReason,
    past: Option<(String, zpanel_domain::application::ReleaseConfig)>,
) -> ApiResult<Deployment> {
    let (application, _) = state
        .handler
        .load::<AppAggregate>(caller.team_id, app)
        .await
        .map_err(|e| ApiError::from_command("application", e))?;
    if application.state().is_none() {
        return Err(ApiError::NotFound("application"));
    }
    let (image, release) = match past {
        Some((image, release)) => (Some(image), Some(release)),
        None => (None, None),
    };
    let id = created_before::<DeploymentAggregate>(state, command_id)
        .await?
        .map_or_else(DeploymentId::new, DeploymentId::from_uuid);
    let command =
        DeploymentCommand::QueueDeployment { id, application, reason, image, release, now: OffsetDateTime::now_utc() };
    let outcome = send::<DeploymentAggregate>(state, caller, command_id, "deployment", *id.as_uuid(), &command).await?;
    found("deployment", load::deployment(state, caller, outcome_id(&outcome)?).await?)
}

/// 32 random bytes, hex: a webhook signing secret.
fn random_secret() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
