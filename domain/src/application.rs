//! The application: a thing Zpanel builds (from git) or pulls (an image) and runs, with its
//! domains, environment variables and limits. Its configuration at a moment is a
//! [`ReleaseConfig`]; a deployment snapshots one, so a rollback re-creates exactly that release.

use crate::aggregate::{Aggregate, DomainEvent, UpcastError};
use crate::changes::{Describe, FieldValue};
use crate::ids::{ApplicationId, PrivateKeyId, ProjectId, ServerId, TeamId};
use crate::secret::SealedSecret;
use crate::values::{
    DomainName, EnvKey, EnvironmentName, GitRef, GitUrl, HealthCheck, ImageRef, Name, Port, RepoPath, ResourceLimits,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

/// Where an application's image comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Built from a git repository with a Dockerfile.
    Git {
        /// The repository.
        url: GitUrl,
        /// The branch, tag or commit to build.
        git_ref: GitRef,
        /// The Dockerfile, relative to the repository root.
        dockerfile: RepoPath,
        /// The SSH key to clone with, for private repositories.
        deploy_key: Option<PrivateKeyId>,
        /// The https credentials (`user:token`) that were written into the URL, sealed: the
        /// URL is kept without them, so nothing that shows it shows them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credentials: Option<SealedSecret>,
    },
    /// Pulled as a ready-made image.
    Image {
        /// The image reference.
        image: ImageRef,
    },
}

/// An environment variable's value: shown, or sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum EnvValue {
    /// A value that may be shown.
    Plain(String),
    /// A value sealed by the handler; the domain only compares digests.
    Secret(SealedSecret),
}

impl EnvValue {
    /// Whether both hold the same value; secrets are compared by digest, since each seal of
    /// one plaintext has a different ciphertext.
    #[must_use]
    pub fn same_value_as(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Plain(a), Self::Plain(b)) => a == b,
            (Self::Secret(a), Self::Secret(b)) => a.same_secret_as(b),
            _ => false,
        }
    }

    fn field_value(&self) -> FieldValue {
        match self {
            Self::Plain(value) => FieldValue::Plain(json!(value)),
            Self::Secret(sealed) => FieldValue::Secret { digest: sealed.digest.clone() },
        }
    }
}

/// An environment variable of an application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Its value.
    pub value: EnvValue,
    /// Whether it is also passed to the image build (as a build argument).
    pub build_time: bool,
}

/// Everything that produces a release: what a deployment snapshots, and what a rollback
/// re-creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseConfig {
    /// Where the image comes from.
    pub source: Source,
    /// The port the application listens on inside its container.
    pub port: Port,
    /// How a new container is judged healthy.
    pub health_check: HealthCheck,
    /// The domains routed to it.
    pub domains: BTreeSet<DomainName>,
    /// Its environment variables.
    pub env: BTreeMap<EnvKey, EnvVar>,
    /// Its container limits.
    pub limits: ResourceLimits,
    /// The server it runs on; `None` for the local Docker engine.
    pub server_id: Option<ServerId>,
}

/// An existing application's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationState {
    /// Its id.
    pub id: ApplicationId,
    /// The team it belongs to.
    pub team_id: TeamId,
    /// The project it belongs to.
    pub project_id: ProjectId,
    /// The project environment it belongs to.
    pub environment: EnvironmentName,
    /// Its name, unique within the project.
    pub name: Name,
    /// Where its image comes from.
    pub source: Source,
    /// The port it listens on inside its container.
    pub port: Port,
    /// How a new container is judged healthy.
    pub health_check: HealthCheck,
    /// The domains routed to it.
    pub domains: BTreeSet<DomainName>,
    /// Its environment variables.
    pub env: BTreeMap<EnvKey, EnvVar>,
    /// Its container limits.
    pub limits: ResourceLimits,
    /// The server it runs on; `None` for the local Docker engine.
    pub server_id: Option<ServerId>,
    /// The secret that signs its deploy webhooks.
    pub webhook_secret: SealedSecret,
}

impl ApplicationState {
    /// The configuration a deployment started now would release.
    #[must_use]
    pub fn release_config(&self) -> ReleaseConfig {
        ReleaseConfig {
            source: self.source.clone(),
            port: self.port,
            health_check: self.health_check.clone(),
            domains: self.domains.clone(),
            env: self.env.clone(),
            limits: self.limits,
            server_id: self.server_id,
        }
    }

    fn release_view(&self) -> ReleaseView<'_> {
        ReleaseView {
            source: &self.source,
            port: self.port,
            health_check: &self.health_check,
            domains: &self.domains,
            env: &self.env,
            limits: self.limits,
            server_id: self.server_id,
        }
    }

    fn apply(&mut self, patch: &ApplicationPatch) {
        let ApplicationPatch {
            name,
            git_url,
            git_credentials,
            git_ref,
            dockerfile,
            deploy_key,
            image,
            port,
            health_check,
            domains,
            limits,
            server_id,
        } = patch;
        set(&mut self.name, name);
        set(&mut self.port, port);
        set(&mut self.health_check, health_check);
        set(&mut self.domains, domains);
        set(&mut self.limits, limits);
        set(&mut self.server_id, server_id);
        // A field of the other kind of source cannot be set (decide rejects it); ignore it.
        match &mut self.source {
            Source::Git {
                url,
                git_ref: current_ref,
                dockerfile: current_dockerfile,
                deploy_key: current_key,
                credentials: current_credentials,
            } => {
                set(url, git_url);
                set(current_credentials, git_credentials);
                set(current_ref, git_ref);
                set(current_dockerfile, dockerfile);
                set(current_key, deploy_key);
            }
            Source::Image { image: current } => set(current, image),
        }
    }
}

fn set<T: Clone>(field: &mut T, new: &Option<T>) {
    if let Some(new) = new {
        field.clone_from(new);
    }
}

/// `new` if it differs from `current`.
fn changed<T: Clone + PartialEq>(new: &Option<T>, current: &T) -> Option<T> {
    new.as_ref().filter(|new| *new != current).cloned()
}

impl ReleaseConfig {
    fn view(&self) -> ReleaseView<'_> {
        ReleaseView {
            source: &self.source,
            port: self.port,
            health_check: &self.health_check,
            domains: &self.domains,
            env: &self.env,
            limits: self.limits,
            server_id: self.server_id,
        }
    }

    /// Adds this configuration's fields to `out`, each path prefixed by `prefix` (`release.`).
    pub(crate) fn describe_into(&self, prefix: &str, out: &mut BTreeMap<String, FieldValue>) {
        self.view().describe_into(prefix, out);
    }
}

/// The release-producing fields, borrowed from an application or from a release, so both are
/// described by one piece of code (and a deployment's config diffs against the application's).
struct ReleaseView<'a> {
    source: &'a Source,
    port: Port,
    health_check: &'a HealthCheck,
    domains: &'a BTreeSet<DomainName>,
    env: &'a BTreeMap<EnvKey, EnvVar>,
    limits: ResourceLimits,
    server_id: Option<ServerId>,
}

impl ReleaseView<'_> {
    fn describe_into(&self, prefix: &str, out: &mut BTreeMap<String, FieldValue>) {
        let mut put = |field: &str, value: FieldValue| {
            out.insert(format!("{prefix}{field}"), value);
        };
        let plain = FieldValue::Plain;
        match self.source {
            Source::Git { url, git_ref, dockerfile, deploy_key, credentials } => {
                // Redacted: events from before credentials were sealed hold them in the URL.
                put("gitUrl", plain(json!(url.redacted())));
                if let Some(sealed) = credentials {
                    put("gitCredentials", FieldValue::Secret { digest: sealed.digest.clone() });
                }
                put("gitRef", plain(json!(git_ref.as_str())));
                put("dockerfile", plain(json!(dockerfile.as_str())));
                put("deployKey", plain(json!(deploy_key.map(|k| k.to_string()))));
            }
            Source::Image { image } => put("image", plain(json!(image.as_str()))),
        }
        put("port", plain(json!(self.port.get())));
        let check = self.health_check;
        put("healthCheck.path", plain(json!(check.path.as_str())));
        put("healthCheck.intervalSecs", plain(json!(check.interval_secs)));
        put("healthCheck.timeoutSecs", plain(json!(check.timeout_secs)));
        put("healthCheck.retries", plain(json!(check.retries)));
        put("healthCheck.startPeriodSecs", plain(json!(check.start_period_secs)));
        let domains: Vec<&str> = self.domains.iter().map(DomainName::as_str).collect();
        put("domains", plain(json!(domains)));
        put("limits.memoryBytes", plain(json!(self.limits.memory_bytes)));
        put("limits.cpuMillis", plain(json!(self.limits.cpu_millis)));
        put("serverId", plain(json!(self.server_id.map(|s| s.to_string()))));
        // Keys cannot contain '.', so `env.KEY.buildTime` never collides with another key.
        for (key, var) in self.env {
            put(&format!("env.{key}"), var.value.field_value());
            put(&format!("env.{key}.buildTime"), plain(json!(var.build_time)));
        }
    }
}

impl Describe for ReleaseConfig {
    fn describe(&self) -> BTreeMap<String, FieldValue> {
        let mut out = BTreeMap::new();
        self.describe_into("", &mut out);
        out
    }
}

/// An application's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Application {
    /// Before `ApplicationCreated`.
    #[default]
    New,
    /// An application that can be configured and deployed.
    Active(Box<ApplicationState>),
    /// An archived application: kept for history, no longer changed or deployed.
    Archived(Box<ApplicationState>),
}

impl Application {
    /// Its configuration, archived or not; `None` before creation.
    #[must_use]
    pub fn state(&self) -> Option<&ApplicationState> {
        match self {
            Self::New => None,
            Self::Active(state) | Self::Archived(state) => Some(state),
        }
    }

    /// Whether it has been archived.
    #[must_use]
    pub fn is_archived(&self) -> bool {
        matches!(self, Self::Archived(_))
    }
}

/// A change to an application's configuration: each `Some` field is set, each `None` is kept.
/// In [`ApplicationEvent::ApplicationUpdated`], only the fields that actually changed are `Some`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationPatch {
    /// A new name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// A new repository (git applications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_url: Option<GitUrl>,
    /// New sealed https credentials for the repository, or `Some(None)` to clone without
    /// (git applications only).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option")]
    pub git_credentials: Option<Option<SealedSecret>>,
    /// A new ref to build (git applications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<GitRef>,
    /// A new Dockerfile path (git applications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<RepoPath>,
    /// A new deploy key, or `Some(None)` to clone without one (git applications only).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option")]
    pub deploy_key: Option<Option<PrivateKeyId>>,
    /// A new image (image applications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// A new container port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    /// A new health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// The new set of domains (replacing the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<BTreeSet<DomainName>>,
    /// New container limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceLimits>,
    /// A new server, or `Some(None)` for the local Docker engine.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option")]
    pub server_id: Option<Option<ServerId>>,
}

impl ApplicationPatch {
    /// Whether it changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Serde for a patch field that can be kept (absent), cleared (`null`) or set (a value): plain
/// serde reads `null` as "absent", which would turn a clear into a keep.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer, T: Serialize>(
        value: &Option<Option<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(serializer),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}

/// What can be asked of an application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplicationCommand {
    /// Create the application.
    CreateApplication {
        /// The new application's id.
        id: ApplicationId,
        /// Its team.
        team_id: TeamId,
        /// Its project.
        project_id: ProjectId,
        /// The project environment it goes into.
        environment: EnvironmentName,
        /// Its name.
        name: Name,
        /// Where its image comes from.
        source: Source,
        /// The port it listens on inside its container.
        port: Port,
        /// Its health check.
        health_check: HealthCheck,
        /// Its domains.
        domains: BTreeSet<DomainName>,
        /// Its container limits.
        limits: ResourceLimits,
        /// Its server; `None` for the local Docker engine.
        server_id: Option<ServerId>,
        /// The webhook signing secret, generated and sealed by the handler.
        webhook_secret: SealedSecret,
        /// Outside fact: the names of the project's other applications.
        names_in_use: BTreeSet<Name>,
        /// Outside fact: whether the project has `environment`.
        environment_exists: bool,
    },
    /// Change its configuration.
    UpdateApplication {
        /// The fields to change.
        patch: ApplicationPatch,
        /// Outside fact: the names of the project's other applications.
        names_in_use: BTreeSet<Name>,
    },
    /// Set (or replace) an environment variable.
    SetEnvironmentVariable {
        /// The variable.
        key: EnvKey,
        /// Its value, sealed if secret.
        value: EnvValue,
        /// Whether the build sees it too.
        build_time: bool,
    },
    /// Remove an environment variable.
    UnsetEnvironmentVariable {
        /// The variable.
        key: EnvKey,
    },
    /// Archive it: it keeps its history but can no longer change or be deployed.
    ArchiveApplication,
    /// Stop, start or restart its current release (the deploy worker acts on it).
    ControlApplication {
        /// What to do.
        action: LifecycleAction,
    },
}

/// What can be done to an application's running release without deploying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleAction {
    /// Stop its container.
    Stop,
    /// Start its stopped container.
    Start,
    /// Stop and start its container.
    Restart,
}

/// What happened to an application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ApplicationEvent {
    /// The application was created (schema version 2: `domains` replaced v1's single `domain`).
    ApplicationCreated {
        /// Its id.
        application_id: ApplicationId,
        /// Its team.
        team_id: TeamId,
        /// Its project.
        project_id: ProjectId,
        /// Its project environment.
        environment: EnvironmentName,
        /// Its name.
        name: Name,
        /// Where its image comes from.
        source: Source,
        /// Its container port.
        port: Port,
        /// Its health check.
        health_check: HealthCheck,
        /// Its domains.
        domains: BTreeSet<DomainName>,
        /// Its container limits.
        limits: ResourceLimits,
        /// Its server; `None` for the local Docker engine.
        server_id: Option<ServerId>,
        /// The sealed webhook signing secret.
        webhook_secret: SealedSecret,
    },
    /// Its configuration changed.
    ApplicationUpdated {
        /// The fields that changed, with their new values.
        patch: ApplicationPatch,
    },
    /// An environment variable was set.
    EnvironmentVariableSet {
        /// The variable.
        key: EnvKey,
        /// Its value.
        value: EnvValue,
        /// Whether the build sees it too.
        build_time: bool,
    },
    /// An environment variable was removed.
    EnvironmentVariableUnset {
        /// The variable.
        key: EnvKey,
    },
    /// The application was archived.
    ApplicationArchived,
    /// Someone asked for its current release to be stopped.
    ApplicationStopRequested,
    /// Someone asked for its current release to be started.
    ApplicationStartRequested,
    /// Someone asked for its current release to be restarted.
    ApplicationRestartRequested,
}

impl DomainEvent for ApplicationEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ApplicationCreated { .. } => "ApplicationCreated",
            Self::ApplicationUpdated { .. } => "ApplicationUpdated",
            Self::EnvironmentVariableSet { .. } => "EnvironmentVariableSet",
            Self::EnvironmentVariableUnset { .. } => "EnvironmentVariableUnset",
            Self::ApplicationArchived => "ApplicationArchived",
            Self::ApplicationStopRequested => "ApplicationStopRequested",
            Self::ApplicationStartRequested => "ApplicationStartRequested",
            Self::ApplicationRestartRequested => "ApplicationRestartRequested",
        }
    }

    fn schema_version(event_type: &str) -> u32 {
        match event_type {
            "ApplicationCreated" => 2,
            _ => 1,
        }
    }

    fn upcast(
        event_type: &str,
        version: u32,
        mut payload: serde_json::Value,
    ) -> Result<serde_json::Value, UpcastError> {
        match (event_type, version) {
            // v1, the prototype, allowed one optional domain.
            ("ApplicationCreated", 1) => {
                if let Some(fields) = payload.as_object_mut() {
                    let domains = match fields.remove("domain") {
                        None | Some(serde_json::Value::Null) => vec![],
                        Some(domain) => vec![domain],
                    };
                    fields.insert("domains".into(), serde_json::Value::Array(domains));
                }
                Ok(payload)
            }
            _ => Err(UpcastError::NoUpcaster { event_type: event_type.to_owned(), version }),
        }
    }
}

/// The rule an application command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplicationError {
    /// Creating an application that exists.
    #[error("the application already exists")]
    ApplicationAlreadyExists,
    /// Anything but creation on an application that does not exist.
    #[error("the application does not exist")]
    ApplicationNotFound,
    /// Anything on an archived application.
    #[error("the application is archived and can no longer be changed")]
    ApplicationArchived,
    /// Creating an application in an environment the project does not have.
    #[error("the project has no environment named {environment}")]
    EnvironmentNotFound {
        /// The environment asked for.
        environment: EnvironmentName,
    },
    /// Two applications of one project with one name.
    #[error("another application in the project is already named {name}")]
    NameTaken {
        /// The taken name.
        name: Name,
    },
    /// A git setting on an application that runs an image.
    #[error("{field} applies only to applications built from git, and this one runs an image")]
    NotBuiltFromGit {
        /// The field (`gitUrl`, `gitRef`, `dockerfile`, `deployKey`).
        field: &'static str,
    },
    /// An image on an application built from git.
    #[error("image applies only to applications that run an image, and this one is built from git")]
    NotRunningAnImage,
    /// Removing a variable that is not set.
    #[error("the application has no environment variable {key}")]
    EnvironmentVariableNotFound {
        /// The variable.
        key: EnvKey,
    },
}

impl crate::Rejection for ApplicationError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::ApplicationNotFound)
    }
}

impl Aggregate for Application {
    const KIND: &'static str = ApplicationId::KIND;
    type Command = ApplicationCommand;
    type Event = ApplicationEvent;
    type Error = ApplicationError;

    fn decide(&self, command: &ApplicationCommand) -> Result<Vec<ApplicationEvent>, ApplicationError> {
        let state = match (self, command) {
            (Self::New, ApplicationCommand::CreateApplication { .. }) => return create(command),
            (_, ApplicationCommand::CreateApplication { .. }) => {
                return Err(ApplicationError::ApplicationAlreadyExists);
            }
            (Self::New, _) => return Err(ApplicationError::ApplicationNotFound),
            (Self::Archived(_), _) => return Err(ApplicationError::ApplicationArchived),
            (Self::Active(state), _) => state,
        };
        match command {
            ApplicationCommand::CreateApplication { .. } => unreachable!("handled above"),
            ApplicationCommand::UpdateApplication { patch, names_in_use } => {
                let patch = changes_of(state, patch, names_in_use)?;
                if patch.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![ApplicationEvent::ApplicationUpdated { patch }])
            }
            ApplicationCommand::SetEnvironmentVariable { key, value, build_time } => match state.env.get(key) {
                Some(var) if var.value.same_value_as(value) && var.build_time == *build_time => Ok(vec![]),
                _ => Ok(vec![ApplicationEvent::EnvironmentVariableSet {
                    key: key.clone(),
                    value: value.clone(),
                    build_time: *build_time,
                }]),
            },
            ApplicationCommand::UnsetEnvironmentVariable { key } => {
                if !state.env.contains_key(key) {
                    return Err(ApplicationError::EnvironmentVariableNotFound { key: key.clone() });
                }
                Ok(vec![ApplicationEvent::EnvironmentVariableUnset { key: key.clone() }])
            }
            ApplicationCommand::ArchiveApplication => Ok(vec![ApplicationEvent::ApplicationArchived]),
            ApplicationCommand::ControlApplication { action } => Ok(vec![match action {
                LifecycleAction::Stop => ApplicationEvent::ApplicationStopRequested,
                LifecycleAction::Start => ApplicationEvent::ApplicationStartRequested,
                LifecycleAction::Restart => ApplicationEvent::ApplicationRestartRequested,
            }]),
        }
    }

    fn evolve(self, event: &ApplicationEvent) -> Self {
        match (self, event) {
            (
                Self::New,
                ApplicationEvent::ApplicationCreated {
                    application_id,
                    team_id,
                    project_id,
                    environment,
                    name,
                    source,
                    port,
                    health_check,
                    domains,
                    limits,
                    server_id,
                    webhook_secret,
                },
            ) => Self::Active(Box::new(ApplicationState {
                id: *application_id,
                team_id: *team_id,
                project_id: *project_id,
                environment: environment.clone(),
                name: name.clone(),
                source: source.clone(),
                port: *port,
                health_check: health_check.clone(),
                domains: domains.clone(),
                env: BTreeMap::new(),
                limits: *limits,
                server_id: *server_id,
                webhook_secret: webhook_secret.clone(),
            })),
            (Self::Active(mut state), ApplicationEvent::ApplicationUpdated { patch }) => {
                state.apply(patch);
                Self::Active(state)
            }
            (Self::Active(mut state), ApplicationEvent::EnvironmentVariableSet { key, value, build_time }) => {
                state.env.insert(key.clone(), EnvVar { value: value.clone(), build_time: *build_time });
                Self::Active(state)
            }
            (Self::Active(mut state), ApplicationEvent::EnvironmentVariableUnset { key }) => {
                state.env.remove(key);
                Self::Active(state)
            }
            (Self::Active(state), ApplicationEvent::ApplicationArchived) => Self::Archived(state),
            // Events that cannot apply to this state change nothing: evolve is total.
            (state, _) => state,
        }
    }

    /// An active application's domains; an archived one has released them.
    fn claimed_domains(&self) -> Option<BTreeSet<DomainName>> {
        Some(match self {
            Self::Active(state) => state.domains.clone(),
            Self::New | Self::Archived(_) => BTreeSet::new(),
        })
    }
}

fn create(command: &ApplicationCommand) -> Result<Vec<ApplicationEvent>, ApplicationError> {
    let ApplicationCommand::CreateApplication {
        id,
        team_id,
        project_id,
        environment,
        name,
        source,
        port,
        health_check,
        domains,
        limits,
        server_id,
        webhook_secret,
        names_in_use,
        environment_exists,
    } = command
    else {
        unreachable!("only called with CreateApplication")
    };
    if !environment_exists {
        return Err(ApplicationError::EnvironmentNotFound { environment: environment.clone() });
    }
    if names_in_use.contains(name) {
        return Err(ApplicationError::NameTaken { name: name.clone() });
    }
    Ok(vec![ApplicationEvent::ApplicationCreated {
        application_id: *id,
        team_id: *team_id,
        project_id: *project_id,
        environment: environment.clone(),
        name: name.clone(),
        source: source.clone(),
        port: *port,
        health_check: health_check.clone(),
        domains: domains.clone(),
        limits: *limits,
        server_id: *server_id,
        webhook_secret: webhook_secret.clone(),
    }])
}

/// The part of `patch` that changes `state`, or the rule it breaks.
fn changes_of(
    state: &ApplicationState,
    patch: &ApplicationPatch,
    names_in_use: &BTreeSet<Name>,
) -> Result<ApplicationPatch, ApplicationError> {
    let name = changed(&patch.name, &state.name);
    if let Some(name) = &name
        && names_in_use.contains(name)
    {
        return Err(ApplicationError::NameTaken { name: name.clone() });
    }
    let mut changes = ApplicationPatch {
        name,
        port: changed(&patch.port, &state.port),
        health_check: changed(&patch.health_check, &state.health_check),
        domains: changed(&patch.domains, &state.domains),
        limits: changed(&patch.limits, &state.limits),
        server_id: changed(&patch.server_id, &state.server_id),
        ..ApplicationPatch::default()
    };
    match &state.source {
        Source::Git { url, git_ref, dockerfile, deploy_key, credentials } => {
            if patch.image.is_some() {
                return Err(ApplicationError::NotRunningAnImage);
            }
            changes.git_url = changed(&patch.git_url, url);
            // Compared by digest: each seal of the same credentials differs.
            changes.git_credentials = patch.git_credentials.clone().filter(|new| match (new, credentials) {
                (Some(new), Some(current)) => !new.same_secret_as(current),
                (None, None) => false,
                _ => true,
            });
            // Credentials are the origin's: a repository elsewhere does not get them unless
            // they are given again (else whoever may change the URL could send them anywhere).
            if let (Some(new), Some(_), None) = (&changes.git_url, credentials, &patch.git_credentials)
                && new.origin() != url.origin()
            {
                changes.git_credentials = Some(None);
            }
            changes.git_ref = changed(&patch.git_ref, git_ref);
            changes.dockerfile = changed(&patch.dockerfile, dockerfile);
            changes.deploy_key = changed(&patch.deploy_key, deploy_key);
        }
        Source::Image { image } => {
            let git_field = [
                ("gitUrl", patch.git_url.is_some() || patch.git_credentials.is_some()),
                ("gitRef", patch.git_ref.is_some()),
                ("dockerfile", patch.dockerfile.is_some()),
                ("deployKey", patch.deploy_key.is_some()),
            ]
            .into_iter()
            .find_map(|(field, given)| given.then_some(field));
            if let Some(field) = git_field {
                return Err(ApplicationError::NotBuiltFromGit { field });
            }
            changes.image = changed(&patch.image, image);
        }
    }
    Ok(changes)
}

impl Describe for Application {
    fn describe(&self) -> BTreeMap<String, FieldValue> {
        let mut out = BTreeMap::new();
        let Some(state) = self.state() else {
            return out;
        };
        out.insert("name".into(), FieldValue::Plain(json!(state.name.as_str())));
        out.insert("environment".into(), FieldValue::Plain(json!(state.environment.as_str())));
        // The digest only: enough to show that the secret was rotated.
        out.insert("webhookSecret".into(), FieldValue::Secret { digest: state.webhook_secret.digest.clone() });
        out.insert("archived".into(), FieldValue::Plain(json!(self.is_archived())));
        state.release_view().describe_into("", &mut out);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::changes::diff;

    pub(crate) fn name(s: &str) -> Name {
        Name::parse(s).expect("valid name")
    }

    fn domain(s: &str) -> DomainName {
        DomainName::parse(s).expect("valid domain")
    }

    fn key(s: &str) -> EnvKey {
        EnvKey::parse(s).expect("valid key")
    }

    pub(crate) fn sealed(digest: &str) -> SealedSecret {
        SealedSecret {
            key_id: "k1".into(),
            nonce: format!("nonce-of-{digest}"),
            ciphertext: format!("ciphertext-of-{digest}"),
            digest: digest.into(),
        }
    }

    pub(crate) fn git_source() -> Source {
        Source::Git {
            url: GitUrl::parse("https://example.com/acme/web.git").expect("valid url"),
            git_ref: GitRef::parse("main").expect("valid ref"),
            credentials: None,
            dockerfile: RepoPath::dockerfile(),
            deploy_key: None,
        }
    }

    fn image_source() -> Source {
        Source::Image { image: ImageRef::parse("nginx:1.27").expect("valid image") }
    }

    fn create_command(source: Source) -> ApplicationCommand {
        ApplicationCommand::CreateApplication {
            id: ApplicationId::new(),
            team_id: TeamId::new(),
            project_id: ProjectId::new(),
            environment: EnvironmentName::production(),
            name: name("web"),
            source,
            port: Port::parse("8080").expect("valid port"),
            health_check: HealthCheck::default(),
            domains: BTreeSet::from([domain("web.example.com")]),
            limits: ResourceLimits::default(),
            server_id: None,
            webhook_secret: sealed("webhook"),
            names_in_use: BTreeSet::from([name("api")]),
            environment_exists: true,
        }
    }

    /// The history of an application created from `source`.
    fn created(source: Source) -> Vec<ApplicationEvent> {
        Application::New.decide(&create_command(source)).expect("creates")
    }

    /// Given these events…
    fn given(events: &[ApplicationEvent]) -> Application {
        Application::fold(events)
    }

    /// An active git application, as the deployment tests need one.
    pub(crate) fn active_application() -> Application {
        given(&created(git_source()))
    }

    fn update(patch: ApplicationPatch) -> ApplicationCommand {
        ApplicationCommand::UpdateApplication { patch, names_in_use: BTreeSet::from([name("api")]) }
    }

    fn set_plain(k: &str, v: &str) -> ApplicationCommand {
        ApplicationCommand::SetEnvironmentVariable { key: key(k), value: EnvValue::Plain(v.into()), build_time: false }
    }

    fn archived() -> Vec<ApplicationEvent> {
        let mut history = created(git_source());
        history.push(ApplicationEvent::ApplicationArchived);
        history
    }

    #[test]
    fn an_application_is_created_with_its_configuration() {
        let app = active_application();
        let state = app.state().expect("exists");
        assert_eq!(state.name, name("web"));
        assert_eq!(state.domains, BTreeSet::from([domain("web.example.com")]));
        assert!(state.env.is_empty());
        assert!(!app.is_archived());
    }

    #[test]
    fn an_application_is_created_once() {
        assert_eq!(
            active_application().decide(&create_command(git_source())),
            Err(ApplicationError::ApplicationAlreadyExists)
        );
        assert_eq!(
            given(&archived()).decide(&create_command(git_source())),
            Err(ApplicationError::ApplicationAlreadyExists)
        );
    }

    #[test]
    fn creating_with_a_taken_name_in_the_same_project_is_rejected() {
        let mut command = create_command(git_source());
        if let ApplicationCommand::CreateApplication { name: n, .. } = &mut command {
            *n = name("api");
        }
        assert_eq!(given(&[]).decide(&command), Err(ApplicationError::NameTaken { name: name("api") }));
    }

    #[test]
    fn an_application_cannot_be_created_in_an_unknown_environment() {
        let mut command = create_command(git_source());
        if let ApplicationCommand::CreateApplication { environment_exists, .. } = &mut command {
            *environment_exists = false;
        }
        assert_eq!(
            given(&[]).decide(&command),
            Err(ApplicationError::EnvironmentNotFound { environment: EnvironmentName::production() })
        );
    }

    #[test]
    fn a_missing_application_rejects_everything_but_creation() {
        for command in [
            update(ApplicationPatch::default()),
            set_plain("A", "1"),
            ApplicationCommand::UnsetEnvironmentVariable { key: key("A") },
            ApplicationCommand::ArchiveApplication,
        ] {
            assert_eq!(given(&[]).decide(&command), Err(ApplicationError::ApplicationNotFound));
        }
    }

    #[test]
    fn an_archived_application_rejects_every_change() {
        for command in [
            update(ApplicationPatch {
                port: Some(Port::parse("9000").expect("valid port")),
                ..ApplicationPatch::default()
            }),
            set_plain("A", "1"),
            ApplicationCommand::UnsetEnvironmentVariable { key: key("A") },
            ApplicationCommand::ArchiveApplication,
        ] {
            assert_eq!(given(&archived()).decide(&command), Err(ApplicationError::ApplicationArchived));
        }
    }

    #[test]
    fn renaming_to_a_taken_name_in_the_same_project_is_rejected() {
        assert_eq!(
            active_application()
                .decide(&update(ApplicationPatch { name: Some(name("api")), ..ApplicationPatch::default() })),
            Err(ApplicationError::NameTaken { name: name("api") })
        );
    }

    #[test]
    fn sealed_git_credentials_change_only_when_their_digest_does_and_show_only_it() {
        let with = |digest: &str| ApplicationPatch {
            git_credentials: Some(Some(sealed(digest))),
            ..ApplicationPatch::default()
        };
        let mut history = created(git_source());
        let set = given(&history).decide(&update(with("d1"))).expect("set");
        assert_eq!(set.len(), 1);
        history.extend(set);
        // The same credentials sealed again (another nonce, another ciphertext): no change.
        let resealed = SealedSecret { nonce: "another".into(), ciphertext: "other".into(), ..sealed("d1") };
        let again = ApplicationPatch { git_credentials: Some(Some(resealed)), ..ApplicationPatch::default() };
        assert_eq!(given(&history).decide(&update(again)), Ok(vec![]));
        let described = given(&history).describe();
        assert_eq!(described.get("gitCredentials"), Some(&FieldValue::Secret { digest: "d1".into() }));
        let cleared = ApplicationPatch { git_credentials: Some(None), ..ApplicationPatch::default() };
        history.extend(given(&history).decide(&update(cleared)).expect("cleared"));
        assert_eq!(given(&history).describe().get("gitCredentials"), None);
    }

    #[test]
    fn moving_the_repository_to_another_origin_drops_its_credentials_unless_given_again() {
        let url = |s: &str| Some(GitUrl::parse(s).expect("valid url"));
        let mut history = created(git_source());
        let set = ApplicationPatch { git_credentials: Some(Some(sealed("d1"))), ..ApplicationPatch::default() };
        history.extend(given(&history).decide(&update(set)).expect("set"));
        let same_origin =
            ApplicationPatch { git_url: url("https://example.com/acme/api.git"), ..ApplicationPatch::default() };
        let kept = given(&history).decide(&update(same_origin)).expect("moved");
        assert!(
            matches!(&kept[..], [ApplicationEvent::ApplicationUpdated { patch }] if patch.git_credentials.is_none())
        );
        let elsewhere =
            ApplicationPatch { git_url: url("https://attacker.example/x.git"), ..ApplicationPatch::default() };
        let dropped = given(&history).decide(&update(elsewhere)).expect("moved");
        assert!(
            matches!(&dropped[..], [ApplicationEvent::ApplicationUpdated { patch }] if patch.git_credentials == Some(None)),
            "{dropped:?}"
        );
        let given_again = ApplicationPatch {
            git_url: url("https://other.example/x.git"),
            git_credentials: Some(Some(sealed("d2"))),
            ..ApplicationPatch::default()
        };
        let moved = given(&history).decide(&update(given_again)).expect("moved");
        assert!(matches!(&moved[..], [ApplicationEvent::ApplicationUpdated { patch }]
            if patch.git_credentials == Some(Some(sealed("d2")))));
    }

    #[test]
    fn a_url_recorded_with_credentials_before_they_were_sealed_is_described_without_them() {
        let source = Source::Git {
            url: GitUrl::parse("https://bot:s3cr3t@example.com/acme/web.git").expect("valid url"),
            git_ref: GitRef::parse("main").expect("valid ref"),
            dockerfile: RepoPath::dockerfile(),
            deploy_key: None,
            credentials: None,
        };
        let described = given(&created(source)).describe();
        assert_eq!(described.get("gitUrl"), Some(&FieldValue::Plain(json!("https://***@example.com/acme/web.git"))));
        assert!(!format!("{described:?}").contains("s3cr3t"));
    }

    #[test]
    fn git_credentials_on_an_image_application_are_rejected() {
        let image = Source::Image { image: ImageRef::parse("nginx").expect("valid image") };
        let patch = ApplicationPatch { git_credentials: Some(None), ..ApplicationPatch::default() };
        assert_eq!(
            given(&created(image)).decide(&update(patch)),
            Err(ApplicationError::NotBuiltFromGit { field: "gitUrl" })
        );
    }

    #[test]
    fn an_update_records_only_the_fields_that_changed() {
        let port = Port::parse("9000").expect("valid port");
        let events = active_application().decide(&update(ApplicationPatch {
            name: Some(name("web")),
            port: Some(port),
            health_check: Some(HealthCheck::default()),
            git_ref: Some(GitRef::parse("release").expect("valid ref")),
            ..ApplicationPatch::default()
        }));
        assert_eq!(
            events,
            Ok(vec![ApplicationEvent::ApplicationUpdated {
                patch: ApplicationPatch {
                    port: Some(port),
                    git_ref: Some(GitRef::parse("release").expect("valid ref")),
                    ..ApplicationPatch::default()
                }
            }])
        );
    }

    #[test]
    fn an_update_that_changes_nothing_records_nothing() {
        assert_eq!(
            active_application().decide(&update(ApplicationPatch {
                name: Some(name("web")),
                server_id: Some(None),
                deploy_key: Some(None),
                ..ApplicationPatch::default()
            })),
            Ok(vec![])
        );
        assert_eq!(active_application().decide(&update(ApplicationPatch::default())), Ok(vec![]));
    }

    #[test]
    fn git_settings_on_an_image_application_are_rejected() {
        let app = given(&created(image_source()));
        assert_eq!(
            app.decide(&update(ApplicationPatch {
                git_ref: Some(GitRef::parse("main").expect("valid ref")),
                ..ApplicationPatch::default()
            })),
            Err(ApplicationError::NotBuiltFromGit { field: "gitRef" })
        );
        assert_eq!(
            app.decide(&update(ApplicationPatch {
                dockerfile: Some(RepoPath::dockerfile()),
                ..ApplicationPatch::default()
            })),
            Err(ApplicationError::NotBuiltFromGit { field: "dockerfile" })
        );
    }

    #[test]
    fn an_image_on_a_git_application_is_rejected() {
        assert_eq!(
            active_application().decide(&update(ApplicationPatch {
                image: Some(ImageRef::parse("nginx").expect("valid image")),
                ..ApplicationPatch::default()
            })),
            Err(ApplicationError::NotRunningAnImage)
        );
    }

    #[test]
    fn an_update_is_applied_to_the_state() {
        let mut history = created(image_source());
        let server = ServerId::new();
        let image = ImageRef::parse("nginx:1.28").expect("valid image");
        let patch = ApplicationPatch {
            image: Some(image.clone()),
            server_id: Some(Some(server)),
            domains: Some(BTreeSet::new()),
            ..ApplicationPatch::default()
        };
        history.extend(given(&history).decide(&update(patch)).expect("updates"));
        let app = given(&history);
        let state = app.state().expect("exists");
        assert_eq!(state.source, Source::Image { image });
        assert_eq!(state.server_id, Some(server));
        assert!(state.domains.is_empty());

        // Back to the local engine: a clear is not a keep.
        let clear = ApplicationPatch { server_id: Some(None), ..ApplicationPatch::default() };
        let events = app.decide(&update(clear.clone()));
        assert_eq!(events, Ok(vec![ApplicationEvent::ApplicationUpdated { patch: clear }]));
    }

    #[test]
    fn setting_a_variable_to_its_current_value_records_nothing() {
        let mut history = created(git_source());
        let secret = |digest: &str| ApplicationCommand::SetEnvironmentVariable {
            key: key("TOKEN"),
            value: EnvValue::Secret(sealed(digest)),
            build_time: false,
        };
        history.extend(given(&history).decide(&secret("d1")).expect("sets"));
        // The same secret sealed again has another nonce and ciphertext, but the same digest.
        let mut resealed = sealed("d1");
        resealed.nonce = "another".into();
        resealed.ciphertext = "another".into();
        let app = given(&history);
        assert_eq!(
            app.decide(&ApplicationCommand::SetEnvironmentVariable {
                key: key("TOKEN"),
                value: EnvValue::Secret(resealed),
                build_time: false,
            }),
            Ok(vec![])
        );
        assert_eq!(app.decide(&secret("d2")).map(|e| e.len()), Ok(1));
        // Changing only the build-time flag is a change.
        assert_eq!(
            app.decide(&ApplicationCommand::SetEnvironmentVariable {
                key: key("TOKEN"),
                value: EnvValue::Secret(sealed("d1")),
                build_time: true,
            })
            .map(|e| e.len()),
            Ok(1)
        );
    }

    #[test]
    fn a_plain_value_and_a_secret_are_never_the_same() {
        let mut history = created(git_source());
        history.push(ApplicationEvent::EnvironmentVariableSet {
            key: key("A"),
            value: EnvValue::Plain("d1".into()),
            build_time: false,
        });
        let events = given(&history).decide(&ApplicationCommand::SetEnvironmentVariable {
            key: key("A"),
            value: EnvValue::Secret(sealed("d1")),
            build_time: false,
        });
        assert_eq!(events.map(|e| e.len()), Ok(1));
    }

    #[test]
    fn unsetting_an_unknown_variable_is_rejected() {
        assert_eq!(
            active_application().decide(&ApplicationCommand::UnsetEnvironmentVariable { key: key("NOPE") }),
            Err(ApplicationError::EnvironmentVariableNotFound { key: key("NOPE") })
        );
        let mut history = created(git_source());
        history.extend(given(&history).decide(&set_plain("A", "1")).expect("sets"));
        let unset = ApplicationCommand::UnsetEnvironmentVariable { key: key("A") };
        history.extend(given(&history).decide(&unset).expect("unsets"));
        assert!(given(&history).state().is_some_and(|state| state.env.is_empty()));
    }

    #[test]
    fn an_application_is_archived() {
        let stop = ApplicationCommand::ControlApplication { action: LifecycleAction::Stop };
        assert_eq!(active_application().decide(&stop), Ok(vec![ApplicationEvent::ApplicationStopRequested]));
        assert_eq!(given(&archived()).decide(&stop), Err(ApplicationError::ApplicationArchived));
        let app = active_application();
        let restarted = app.clone().evolve(&ApplicationEvent::ApplicationRestartRequested);
        assert_eq!(restarted, app, "a lifecycle request changes no configuration");
        let events = active_application().decide(&ApplicationCommand::ArchiveApplication);
        assert_eq!(events, Ok(vec![ApplicationEvent::ApplicationArchived]));
        assert!(given(&archived()).is_archived());
    }

    #[test]
    fn an_application_holds_its_domains_until_it_is_archived() {
        assert_eq!(Application::New.claimed_domains(), Some(BTreeSet::new()));
        let app = active_application();
        assert_eq!(app.claimed_domains(), Some(BTreeSet::from([domain("web.example.com")])));
        let moved = ApplicationPatch { domains: Some(BTreeSet::from([domain("*.example.org")])), ..Default::default() };
        let updated = app.clone().evolve(&ApplicationEvent::ApplicationUpdated { patch: moved });
        assert_eq!(updated.claimed_domains(), Some(BTreeSet::from([domain("*.example.org")])));
        assert_eq!(given(&archived()).claimed_domains(), Some(BTreeSet::new()), "archiving releases them");
    }

    #[test]
    fn the_release_config_is_what_a_deployment_would_release() {
        let mut history = created(git_source());
        history.push(ApplicationEvent::EnvironmentVariableSet {
            key: key("A"),
            value: EnvValue::Plain("1".into()),
            build_time: true,
        });
        let app = given(&history);
        let state = app.state().expect("exists");
        let release = state.release_config();
        assert_eq!(release.source, state.source);
        assert_eq!(release.env, state.env);
        // Described alike, so a release diffs against the application field by field.
        let described = app.describe();
        for (field, value) in release.describe() {
            assert_eq!(described.get(&field), Some(&value), "{field}");
        }
    }

    #[test]
    fn an_application_is_described_by_public_field_paths() {
        let mut history = created(git_source());
        history.push(ApplicationEvent::EnvironmentVariableSet {
            key: key("TOKEN"),
            value: EnvValue::Secret(sealed("d1")),
            build_time: false,
        });
        history.push(ApplicationEvent::EnvironmentVariableSet {
            key: key("MODE"),
            value: EnvValue::Plain("prod".into()),
            build_time: true,
        });
        let described = given(&history).describe();
        let plain = |v: serde_json::Value| Some(FieldValue::Plain(v));
        assert_eq!(described.get("name").cloned(), plain(json!("web")));
        assert_eq!(described.get("gitRef").cloned(), plain(json!("main")));
        assert_eq!(described.get("deployKey").cloned(), plain(json!(null)));
        assert_eq!(described.get("port").cloned(), plain(json!(8080)));
        assert_eq!(described.get("healthCheck.intervalSecs").cloned(), plain(json!(2)));
        assert_eq!(described.get("domains").cloned(), plain(json!(["web.example.com"])));
        assert_eq!(described.get("env.MODE").cloned(), plain(json!("prod")));
        assert_eq!(described.get("env.MODE.buildTime").cloned(), plain(json!(true)));
        assert_eq!(described.get("env.TOKEN").cloned(), Some(FieldValue::Secret { digest: "d1".into() }));
        assert_eq!(described.get("archived").cloned(), plain(json!(false)));
        assert!(!described.contains_key("image"));
        let text = serde_json::to_string(&described).expect("serializes");
        assert!(!text.contains("ciphertext-of"), "{text}");
        assert!(Application::New.describe().is_empty());
    }

    #[test]
    fn archiving_and_rotating_a_secret_show_in_the_diff() {
        let mut history = created(git_source());
        history.push(ApplicationEvent::EnvironmentVariableSet {
            key: key("TOKEN"),
            value: EnvValue::Secret(sealed("d1")),
            build_time: false,
        });
        let before = given(&history).describe();
        history.push(ApplicationEvent::EnvironmentVariableSet {
            key: key("TOKEN"),
            value: EnvValue::Secret(sealed("d2")),
            build_time: false,
        });
        history.push(ApplicationEvent::ApplicationArchived);
        let changes = diff(&before, &given(&history).describe());
        let fields: Vec<_> = changes.iter().map(|c| (c.field.as_str(), c.secret)).collect();
        assert_eq!(fields, vec![("archived", false), ("env.TOKEN", true)]);
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let mut events = created(git_source());
        events.push(ApplicationEvent::ApplicationUpdated {
            patch: ApplicationPatch {
                server_id: Some(None),
                deploy_key: Some(Some(PrivateKeyId::new())),
                port: Some(Port::parse("81").expect("valid port")),
                ..ApplicationPatch::default()
            },
        });
        events.push(ApplicationEvent::EnvironmentVariableSet {
            key: key("TOKEN"),
            value: EnvValue::Secret(sealed("d1")),
            build_time: true,
        });
        events.push(ApplicationEvent::EnvironmentVariableUnset { key: key("TOKEN") });
        events.push(ApplicationEvent::ApplicationArchived);
        for event in events {
            let (kind, payload) = event.encode().expect("encodes");
            let version = ApplicationEvent::schema_version(kind);
            assert_eq!(ApplicationEvent::decode(kind, version, payload).expect("decodes"), event);
            let (kind, text) = event.encode_json().expect("encodes");
            assert_eq!(ApplicationEvent::decode_json(kind, version, text.get()).expect("decodes"), event);
        }
    }

    #[test]
    fn a_version_1_application_created_is_upcast_to_a_set_of_domains() {
        let created = created(image_source()).remove(0);
        let (kind, mut payload) = created.encode().expect("encodes");
        assert_eq!(ApplicationEvent::schema_version(kind), 2);
        let fields = payload.as_object_mut().expect("an object");
        fields.remove("domains");
        fields.insert("domain".into(), json!("web.example.com"));
        assert_eq!(ApplicationEvent::decode("ApplicationCreated", 1, payload.clone()).expect("upcasts"), created);
        // The text path upcasts the same way.
        let text = serde_json::to_string(&payload).expect("text");
        assert_eq!(ApplicationEvent::decode_json("ApplicationCreated", 1, &text).expect("upcasts"), created);

        payload["domain"] = json!(null);
        let ApplicationEvent::ApplicationCreated { domains, .. } =
            ApplicationEvent::decode("ApplicationCreated", 1, payload).expect("upcasts")
        else {
            panic!("decoded to another event");
        };
        assert!(domains.is_empty());
    }

    #[test]
    fn an_unknown_or_future_schema_version_is_refused() {
        let (kind, payload) = created(git_source()).remove(0).encode().expect("encodes");
        assert!(matches!(ApplicationEvent::decode(kind, 3, payload.clone()), Err(UpcastError::FromTheFuture { .. })));
        assert!(matches!(ApplicationEvent::decode(kind, 0, payload), Err(UpcastError::NoUpcaster { .. })));
    }

    #[test]
    fn a_patch_keeps_absent_fields_and_clears_null_ones() {
        let patch: ApplicationPatch = serde_json::from_value(json!({ "server_id": null })).expect("decodes");
        assert_eq!(patch.server_id, Some(None));
        assert_eq!(patch.deploy_key, None);
        assert_eq!(serde_json::to_value(&patch).expect("encodes"), json!({ "server_id": null }));
    }
}
