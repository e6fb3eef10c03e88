//! A server Zpanel deploys to, reached over SSH with one of the team's private keys.
//!
//! Validation is a round trip through a worker: `RequestValidation` records
//! `ServerValidationRequested`, the server worker connects and reports back with
//! `RecordValidationSucceeded` or `RecordValidationFailed`. Changing the connection settings while
//! a validation runs puts the server back to `Unknown`, so the stale result is refused
//! (`NoValidationPending`) rather than credited to the new settings.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::changes::{Describe, FieldValue};
use crate::ids::{PrivateKeyId, ServerId, TeamId};
use crate::values::{Host, Name, Port, UnixUser};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Whether Zpanel can reach a server, as far as the last validation tells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerStatus {
    /// Never validated with the current connection settings.
    #[default]
    Unknown,
    /// A validation was requested and has not reported yet.
    Validating,
    /// The last validation connected and found Docker.
    Reachable,
    /// The last validation failed.
    Unreachable,
}

impl ServerStatus {
    /// The wire name (`unknown`, `validating`, …).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Validating => "validating",
            Self::Reachable => "reachable",
            Self::Unreachable => "unreachable",
        }
    }
}

/// What a successful validation found on the server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerFacts {
    /// Operating system, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os: String,
    /// Docker Engine version, e.g. `26.1.5`.
    pub docker_version: String,
    /// Number of CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Free disk space in bytes where Docker keeps its data.
    pub disk_free_bytes: u64,
    /// Whether the kernel hands connections waiting in a closing listener's accept queue to
    /// another listener on the same port (`net.ipv4.tcp_migrate_req`). Caddy reopens its
    /// listeners on every configuration change; without it, a visitor connecting at that moment
    /// is reset. `None`: not checked (facts recorded before Zpanel looked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_queue_migrates: Option<bool>,
}

/// Why a host should set `net.ipv4.tcp_migrate_req`, and how: said where Caddy runs without it.
pub const RELOAD_RESETS: &str = "net.ipv4.tcp_migrate_req is not 1 (or the kernel, older than 5.14, lacks it): \
    Caddy reopens its listeners on every route change, and a visitor connecting at that moment is reset \
    instead of served — set it with `sysctl -w net.ipv4.tcp_migrate_req=1` and in /etc/sysctl.d/";

/// The oldest Docker Engine (major version) Zpanel supports on a server.
pub const MIN_DOCKER_MAJOR: u32 = 24;

impl ServerFacts {
    /// What its user should know: an engine older than Zpanel supports, or one whose version
    /// cannot be compared with the minimum. Derived when shown, so it follows the minimum.
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        let version = self.docker_version.trim();
        let major = version.split(['.', '-', '+']).next().and_then(|m| m.parse::<u32>().ok());
        let mut warnings = match major {
            Some(major) if major >= MIN_DOCKER_MAJOR => Vec::new(),
            Some(_) => vec![format!(
                "Docker Engine {version} is older than {MIN_DOCKER_MAJOR}.0, the oldest Zpanel supports; \
                 deployments may fail — upgrade the engine on this server"
            )],
            None => vec![format!(
                "Docker Engine reported the version \"{version}\", which cannot be compared with the minimum \
                 {MIN_DOCKER_MAJOR}.0; deployments may fail"
            )],
        };
        if self.accept_queue_migrates == Some(false) {
            warnings.push(format!("{RELOAD_RESETS} on this server"));
        }
        warnings
    }
}

/// How Zpanel reaches a server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Connection {
    /// Host name or IP address.
    pub host: Host,
    /// SSH port.
    pub port: Port,
    /// The account Zpanel logs in as.
    pub user: UnixUser,
    /// The key it logs in with.
    pub private_key_id: PrivateKeyId,
    /// A bastion to reach it through (OpenSSH's `ProxyJump`), logged in to with the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump: Option<JumpHost>,
}

/// A host Zpanel logs in to first, and reaches a server from (a bastion).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JumpHost {
    /// Host name or IP address.
    pub host: Host,
    /// SSH port.
    pub port: Port,
    /// The account Zpanel logs in as there.
    pub user: UnixUser,
}

/// What a server is, once created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerDetails {
    /// Its id.
    pub id: ServerId,
    /// The team it belongs to.
    pub team_id: TeamId,
    /// Its display name, unique within the team.
    pub name: Name,
    /// How it is reached.
    pub connection: Connection,
    /// What the last validation said.
    pub status: ServerStatus,
    /// What the last successful validation found (kept while a new one runs).
    pub facts: Option<ServerFacts>,
    /// The SSH host key seen by the last successful validation (`SHA256:…`).
    pub host_key_fingerprint: Option<String>,
    /// The jump host's SSH host key seen then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump_host_key_fingerprint: Option<String>,
    /// Why the last validation failed.
    pub last_error: Option<String>,
}

/// A server's state.
// One value per stream, folded by move: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Server {
    /// Before `ServerCreated`.
    #[default]
    New,
    /// A server.
    Active(ServerDetails),
    /// A removed server: gone, its id not to be reused.
    Removed {
        /// Its id.
        id: ServerId,
        /// The team it belonged to.
        team_id: TeamId,
    },
}

impl Server {
    /// The server's details, unless it does not exist (or no longer does).
    #[must_use]
    pub fn details(&self) -> Option<&ServerDetails> {
        match self {
            Self::Active(details) => Some(details),
            Self::New | Self::Removed { .. } => None,
        }
    }
}

/// The fields of a server to change; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerPatch {
    /// A new name.
    pub name: Option<Name>,
    /// A new host.
    pub host: Option<Host>,
    /// A new SSH port.
    pub port: Option<Port>,
    /// A new login account.
    pub user: Option<UnixUser>,
    /// A new login key.
    pub private_key_id: Option<PrivateKeyId>,
    /// A new jump host (`Some(None)`: none any more).
    pub jump: Option<Option<JumpHost>>,
}

/// What can be asked of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerCommand {
    /// Register a server.
    CreateServer {
        /// The new server's id.
        id: ServerId,
        /// The team it belongs to.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// Host name or IP address.
        host: Host,
        /// SSH port.
        port: Port,
        /// Login account.
        user: UnixUser,
        /// Login key.
        private_key_id: PrivateKeyId,
        /// A bastion to reach it through.
        jump: Option<JumpHost>,
        /// The names of the team's other servers (outside fact).
        names_in_use: BTreeSet<Name>,
        /// Whether `private_key_id` is a key of the team (outside fact).
        key_exists: bool,
    },
    /// Change its name or connection settings.
    UpdateServer {
        /// What to change.
        patch: ServerPatch,
        /// The names of the team's other servers (outside fact).
        names_in_use: BTreeSet<Name>,
        /// Whether `patch.private_key_id`, if given, is a key of the team (outside fact).
        key_exists: bool,
    },
    /// Ask a worker to connect and look around.
    RequestValidation,
    /// The worker connected (sent by the worker).
    RecordValidationSucceeded {
        /// What it found.
        facts: ServerFacts,
        /// The host key it saw.
        host_key_fingerprint: String,
        /// The jump host's host key it saw, if it went through one.
        jump_host_key_fingerprint: Option<String>,
    },
    /// The worker could not connect or found no Docker (sent by the worker).
    RecordValidationFailed {
        /// Why.
        error: String,
    },
    /// Ask a worker to check now whether the server can still be reached (as the periodic
    /// health check does).
    RequestCheck,
    /// A health check's result (sent by the worker): `None` when it connected and found the
    /// engine, else why not.
    RecordCheck {
        /// Why the server could not be reached.
        error: Option<String>,
    },
    /// Remove the server.
    RemoveServer {
        /// How many applications deploy to it (outside fact).
        applications_using_it: usize,
    },
}

/// What happened to a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ServerEvent {
    /// The server was registered.
    ServerCreated {
        /// Its id.
        server_id: ServerId,
        /// Its team.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// How it is reached.
        connection: Connection,
    },
    /// The server was renamed.
    ServerRenamed {
        /// The new name.
        name: Name,
    },
    /// Its connection settings changed; what was known about reaching it no longer holds.
    ServerConnectionChanged {
        /// The new settings, in full.
        connection: Connection,
    },
    /// A worker was asked to validate the server.
    ServerValidationRequested {
        /// The settings to validate.
        connection: Connection,
    },
    /// The validation connected.
    ServerValidationSucceeded {
        /// What it found.
        facts: ServerFacts,
        /// The host key it saw.
        host_key_fingerprint: String,
        /// The jump host's host key it saw, if it went through one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jump_host_key_fingerprint: Option<String>,
    },
    /// The validation failed.
    ServerValidationFailed {
        /// Why.
        error: String,
    },
    /// A health check was asked for.
    ServerCheckRequested {},
    /// A health check of a reachable server failed.
    ServerBecameUnreachable {
        /// Why.
        error: String,
    },
    /// A health check of an unreachable server connected again.
    ServerRecovered {},
    /// The server was removed.
    ServerRemoved {},
}

impl DomainEvent for ServerEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ServerCreated { .. } => "ServerCreated",
            Self::ServerRenamed { .. } => "ServerRenamed",
            Self::ServerConnectionChanged { .. } => "ServerConnectionChanged",
            Self::ServerValidationRequested { .. } => "ServerValidationRequested",
            Self::ServerValidationSucceeded { .. } => "ServerValidationSucceeded",
            Self::ServerValidationFailed { .. } => "ServerValidationFailed",
            Self::ServerCheckRequested { .. } => "ServerCheckRequested",
            Self::ServerBecameUnreachable { .. } => "ServerBecameUnreachable",
            Self::ServerRecovered { .. } => "ServerRecovered",
            Self::ServerRemoved { .. } => "ServerRemoved",
        }
    }
}

/// The rule a server command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// Creating a server that exists (or existed).
    #[error("the server already exists")]
    ServerAlreadyExists,
    /// Anything but creation on a server that does not exist or was removed.
    #[error("the server does not exist")]
    ServerNotFound,
    /// Another server of the team has that name.
    #[error("another server of the team is already named so")]
    ServerNameTaken,
    /// The private key is not one of the team's.
    #[error("the private key does not exist")]
    PrivateKeyNotFound,
    /// A validation result with no validation running (or one for older settings).
    #[error("no validation of the server is pending")]
    NoValidationPending,
    /// A health check of a server whose settings were never validated.
    #[error("the server has not been validated yet: validate it first")]
    NotValidated,
    /// Removing a server that applications deploy to.
    #[error("applications still deploy to the server")]
    ServerInUse,
}

impl crate::Rejection for ServerError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::ServerNotFound)
    }
}

impl Aggregate for Server {
    const KIND: &'static str = ServerId::KIND;
    type Command = ServerCommand;
    type Event = ServerEvent;
    type Error = ServerError;

    fn decide(&self, command: &ServerCommand) -> Result<Vec<ServerEvent>, ServerError> {
        let server = match (self, command) {
            (
                Self::New,
                ServerCommand::CreateServer {
                    id,
                    team_id,
                    name,
                    host,
                    port,
                    user,
                    private_key_id,
                    jump,
                    names_in_use,
                    key_exists,
                },
            ) => {
                if names_in_use.contains(name) {
                    return Err(ServerError::ServerNameTaken);
                }
                if !key_exists {
                    return Err(ServerError::PrivateKeyNotFound);
                }
                return Ok(vec![ServerEvent::ServerCreated {
                    server_id: *id,
                    team_id: *team_id,
                    name: name.clone(),
                    connection: Connection {
                        host: host.clone(),
                        port: *port,
                        user: user.clone(),
                        private_key_id: *private_key_id,
                        jump: jump.clone(),
                    },
                }]);
            }
            (_, ServerCommand::CreateServer { .. }) => {
                return Err(ServerError::ServerAlreadyExists);
            }
            (Self::New | Self::Removed { .. }, _) => return Err(ServerError::ServerNotFound),
            (Self::Active(server), _) => server,
        };
        match command {
            ServerCommand::CreateServer { .. } => unreachable!("handled above"),
            ServerCommand::UpdateServer { patch, names_in_use, key_exists } => {
                update(server, patch, names_in_use, *key_exists)
            }
            ServerCommand::RequestValidation if server.status == ServerStatus::Validating => Ok(vec![]),
            ServerCommand::RequestValidation => {
                Ok(vec![ServerEvent::ServerValidationRequested { connection: server.connection.clone() }])
            }
            ServerCommand::RecordValidationSucceeded { .. } | ServerCommand::RecordValidationFailed { .. }
                if server.status != ServerStatus::Validating =>
            {
                Err(ServerError::NoValidationPending)
            }
            ServerCommand::RecordValidationSucceeded { facts, host_key_fingerprint, jump_host_key_fingerprint } => {
                Ok(vec![ServerEvent::ServerValidationSucceeded {
                    facts: facts.clone(),
                    host_key_fingerprint: host_key_fingerprint.clone(),
                    jump_host_key_fingerprint: jump_host_key_fingerprint.clone(),
                }])
            }
            ServerCommand::RecordValidationFailed { error } => {
                Ok(vec![ServerEvent::ServerValidationFailed { error: error.clone() }])
            }
            ServerCommand::RequestCheck => match server.status {
                ServerStatus::Reachable | ServerStatus::Unreachable => Ok(vec![ServerEvent::ServerCheckRequested {}]),
                ServerStatus::Unknown | ServerStatus::Validating => Err(ServerError::NotValidated),
            },
            // Only changes are recorded: a reachable server that stays reachable (or an
            // unreachable one that stays so) adds nothing, and while a validation runs, or
            // before the first, the validation owns the status.
            ServerCommand::RecordCheck { error } => Ok(match (server.status, error) {
                (ServerStatus::Reachable, Some(error)) => {
                    vec![ServerEvent::ServerBecameUnreachable { error: error.clone() }]
                }
                (ServerStatus::Unreachable, None) => vec![ServerEvent::ServerRecovered {}],
                _ => vec![],
            }),
            ServerCommand::RemoveServer { applications_using_it } if *applications_using_it > 0 => {
                Err(ServerError::ServerInUse)
            }
            ServerCommand::RemoveServer { .. } => Ok(vec![ServerEvent::ServerRemoved {}]),
        }
    }

    fn evolve(self, event: &ServerEvent) -> Self {
        match (self, event) {
            (Self::New, ServerEvent::ServerCreated { server_id, team_id, name, connection }) => {
                Self::Active(ServerDetails {
                    id: *server_id,
                    team_id: *team_id,
                    name: name.clone(),
                    connection: connection.clone(),
                    status: ServerStatus::Unknown,
                    facts: None,
                    host_key_fingerprint: None,
                    jump_host_key_fingerprint: None,
                    last_error: None,
                })
            }
            (Self::Active(mut server), ServerEvent::ServerRenamed { name }) => {
                server.name = name.clone();
                Self::Active(server)
            }
            (Self::Active(mut server), ServerEvent::ServerConnectionChanged { connection }) => {
                // Another host (or port) may be another machine: forget what was seen there.
                if server.connection.host != connection.host || server.connection.port != connection.port {
                    server.facts = None;
                    server.host_key_fingerprint = None;
                }
                // Likewise for the jump host; and a server reached another way may answer
                // with another machine on the same address.
                let jump_at = |c: &Connection| c.jump.as_ref().map(|j| (j.host.clone(), j.port));
                if jump_at(&server.connection) != jump_at(connection) {
                    server.jump_host_key_fingerprint = None;
                    server.host_key_fingerprint = None;
                    server.facts = None;
                }
                server.connection = connection.clone();
                server.status = ServerStatus::Unknown;
                server.last_error = None;
                Self::Active(server)
            }
            (Self::Active(mut server), ServerEvent::ServerValidationRequested { .. }) => {
                server.status = ServerStatus::Validating;
                Self::Active(server)
            }
            (
                Self::Active(mut server),
                ServerEvent::ServerValidationSucceeded { facts, host_key_fingerprint, jump_host_key_fingerprint },
            ) => {
                server.status = ServerStatus::Reachable;
                server.facts = Some(facts.clone());
                server.host_key_fingerprint = Some(host_key_fingerprint.clone());
                server.jump_host_key_fingerprint.clone_from(jump_host_key_fingerprint);
                server.last_error = None;
                Self::Active(server)
            }
            (Self::Active(mut server), ServerEvent::ServerValidationFailed { error }) => {
                server.status = ServerStatus::Unreachable;
                server.last_error = Some(error.clone());
                Self::Active(server)
            }
            (Self::Active(mut server), ServerEvent::ServerBecameUnreachable { error }) => {
                server.status = ServerStatus::Unreachable;
                server.last_error = Some(error.clone());
                Self::Active(server)
            }
            (Self::Active(mut server), ServerEvent::ServerRecovered {}) => {
                server.status = ServerStatus::Reachable;
                server.last_error = None;
                Self::Active(server)
            }
            (Self::Active(server), ServerEvent::ServerRemoved {}) => {
                Self::Removed { id: server.id, team_id: server.team_id }
            }
            // Events that cannot apply to this state change nothing: evolve is total.
            (state, _) => state,
        }
    }
}

fn update(
    server: &ServerDetails,
    patch: &ServerPatch,
    names_in_use: &BTreeSet<Name>,
    key_exists: bool,
) -> Result<Vec<ServerEvent>, ServerError> {
    let mut events = Vec::new();
    if let Some(name) = patch.name.as_ref().filter(|n| **n != server.name) {
        if names_in_use.contains(name) {
            return Err(ServerError::ServerNameTaken);
        }
        events.push(ServerEvent::ServerRenamed { name: name.clone() });
    }
    let current = &server.connection;
    let connection = Connection {
        host: patch.host.clone().unwrap_or_else(|| current.host.clone()),
        port: patch.port.unwrap_or(current.port),
        user: patch.user.clone().unwrap_or_else(|| current.user.clone()),
        private_key_id: patch.private_key_id.unwrap_or(current.private_key_id),
        jump: patch.jump.clone().unwrap_or_else(|| current.jump.clone()),
    };
    if connection.private_key_id != current.private_key_id && !key_exists {
        return Err(ServerError::PrivateKeyNotFound);
    }
    if connection != *current {
        events.push(ServerEvent::ServerConnectionChanged { connection });
    }
    Ok(events)
}

impl Describe for Server {
    fn describe(&self) -> BTreeMap<String, FieldValue> {
        let Self::Active(server) = self else {
            return BTreeMap::new();
        };
        let plain = |value: serde_json::Value| FieldValue::Plain(value);
        let mut fields = BTreeMap::from([
            ("name".to_owned(), plain(server.name.as_str().into())),
            ("host".to_owned(), plain(server.connection.host.as_str().into())),
            ("port".to_owned(), plain(server.connection.port.get().into())),
            ("user".to_owned(), plain(server.connection.user.as_str().into())),
            ("privateKeyId".to_owned(), plain(server.connection.private_key_id.to_string().into())),
            ("status".to_owned(), plain(server.status.as_str().into())),
        ]);
        if let Some(facts) = &server.facts {
            fields.extend([
                ("facts.os".to_owned(), plain(facts.os.as_str().into())),
                ("facts.dockerVersion".to_owned(), plain(facts.docker_version.as_str().into())),
                ("facts.cpus".to_owned(), plain(facts.cpus.into())),
                ("facts.memoryBytes".to_owned(), plain(facts.memory_bytes.into())),
                ("facts.diskFreeBytes".to_owned(), plain(facts.disk_free_bytes.into())),
            ]);
        }
        if let Some(fingerprint) = &server.host_key_fingerprint {
            fields.insert("hostKeyFingerprint".to_owned(), plain(fingerprint.as_str().into()));
        }
        if let Some(jump) = &server.connection.jump {
            let at = if jump.host.as_str().contains(':') {
                format!("{}@[{}]:{}", jump.user.as_str(), jump.host.as_str(), jump.port.get())
            } else {
                format!("{}@{}:{}", jump.user.as_str(), jump.host.as_str(), jump.port.get())
            };
            fields.insert("jumpHost".to_owned(), plain(at.into()));
        }
        if let Some(fingerprint) = &server.jump_host_key_fingerprint {
            fields.insert("jumpHostKeyFingerprint".to_owned(), plain(fingerprint.as_str().into()));
        }
        if let Some(error) = &server.last_error {
            fields.insert("lastError".to_owned(), plain(error.as_str().into()));
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn name(s: &str) -> Name {
        Name::parse(s).expect("valid name")
    }

    fn host(s: &str) -> Host {
        Host::parse(s).expect("valid host")
    }

    fn port(n: u32) -> Port {
        Port::try_from(n).expect("valid port")
    }

    /// Given these events, when this command, then these events or this error.
    fn given(events: &[ServerEvent]) -> Server {
        Server::fold(events)
    }

    fn connection() -> Connection {
        Connection {
            host: host("10.0.0.5"),
            port: port(22),
            user: UnixUser::parse("deploy").expect("valid user"),
            private_key_id: PrivateKeyId::from_uuid(uuid::Uuid::from_u128(1)),
            jump: None,
        }
    }

    fn facts() -> ServerFacts {
        ServerFacts {
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            docker_version: "26.1.5".into(),
            cpus: 4,
            memory_bytes: 8 << 30,
            disk_free_bytes: 100 << 30,
            accept_queue_migrates: Some(true),
        }
    }

    fn created() -> Vec<ServerEvent> {
        vec![ServerEvent::ServerCreated {
            server_id: ServerId::new(),
            team_id: TeamId::new(),
            name: name("web-1"),
            connection: connection(),
        }]
    }

    fn validating() -> Vec<ServerEvent> {
        let mut history = created();
        history.push(ServerEvent::ServerValidationRequested { connection: connection() });
        history
    }

    fn create(names_in_use: BTreeSet<Name>, key_exists: bool) -> ServerCommand {
        let c = connection();
        ServerCommand::CreateServer {
            id: ServerId::new(),
            team_id: TeamId::new(),
            name: name("web-1"),
            host: c.host,
            port: c.port,
            user: c.user,
            private_key_id: c.private_key_id,
            jump: None,
            names_in_use,
            key_exists,
        }
    }

    fn update(patch: ServerPatch) -> ServerCommand {
        ServerCommand::UpdateServer { patch, names_in_use: BTreeSet::from([name("db-1")]), key_exists: true }
    }

    fn status(server: &Server) -> Option<ServerStatus> {
        server.details().map(|s| s.status)
    }

    #[test]
    fn a_server_is_created_once_with_an_unknown_status() {
        let created = given(&[]).decide(&create(BTreeSet::new(), true));
        let Ok(events) = created else {
            panic!("creation failed: {created:?}");
        };
        assert!(matches!(
            events.as_slice(),
            [ServerEvent::ServerCreated { name: n, .. }] if *n == name("web-1")
        ));
        let server = given(&events);
        assert_eq!(status(&server), Some(ServerStatus::Unknown));
        assert_eq!(server.decide(&create(BTreeSet::new(), true)), Err(ServerError::ServerAlreadyExists));
    }

    #[test]
    fn creating_with_a_taken_name_is_rejected() {
        assert_eq!(
            given(&[]).decide(&create(BTreeSet::from([name("web-1")]), true)),
            Err(ServerError::ServerNameTaken)
        );
    }

    #[test]
    fn a_server_needs_an_existing_key() {
        assert_eq!(given(&[]).decide(&create(BTreeSet::new(), false)), Err(ServerError::PrivateKeyNotFound));
        assert_eq!(
            given(&created()).decide(&ServerCommand::UpdateServer {
                patch: ServerPatch { private_key_id: Some(PrivateKeyId::new()), ..ServerPatch::default() },
                names_in_use: BTreeSet::new(),
                key_exists: false,
            }),
            Err(ServerError::PrivateKeyNotFound)
        );
    }

    #[test]
    fn a_missing_server_rejects_everything_but_creation() {
        for command in [
            ServerCommand::RequestValidation,
            update(ServerPatch::default()),
            ServerCommand::RemoveServer { applications_using_it: 0 },
        ] {
            assert_eq!(given(&[]).decide(&command), Err(ServerError::ServerNotFound));
        }
    }

    #[test]
    fn renaming_to_a_taken_name_is_rejected() {
        assert_eq!(
            given(&created()).decide(&update(ServerPatch { name: Some(name("db-1")), ..ServerPatch::default() })),
            Err(ServerError::ServerNameTaken)
        );
    }

    #[test]
    fn an_update_that_changes_nothing_records_nothing() {
        let c = connection();
        let server = given(&created());
        let same_key = server.details().map(|s| s.connection.private_key_id);
        assert_eq!(
            server.decide(&update(ServerPatch {
                name: Some(name("web-1")),
                host: Some(c.host),
                port: Some(c.port),
                user: Some(c.user),
                private_key_id: same_key,
                jump: Some(None),
            })),
            Ok(vec![])
        );
        assert_eq!(server.decide(&update(ServerPatch::default())), Ok(vec![]));
    }

    #[test]
    fn renaming_keeps_the_status() {
        let mut history = validating();
        let renamed =
            given(&history).decide(&update(ServerPatch { name: Some(name("web-2")), ..ServerPatch::default() }));
        assert_eq!(renamed, Ok(vec![ServerEvent::ServerRenamed { name: name("web-2") }]));
        history.extend(renamed.unwrap_or_default());
        assert_eq!(status(&given(&history)), Some(ServerStatus::Validating));
    }

    #[test]
    fn changing_the_connection_resets_the_status_and_refuses_the_stale_result() {
        let mut history = validating();
        history.push(ServerEvent::ServerValidationSucceeded {
            facts: facts(),
            host_key_fingerprint: "SHA256:old".into(),
            jump_host_key_fingerprint: None,
        });
        history.push(ServerEvent::ServerValidationRequested { connection: connection() });
        let changed =
            given(&history).decide(&update(ServerPatch { host: Some(host("10.0.0.6")), ..ServerPatch::default() }));
        let Ok(events) = changed else {
            panic!("update failed: {changed:?}");
        };
        assert!(matches!(
            events.as_slice(),
            [ServerEvent::ServerConnectionChanged { connection }] if connection.host == host("10.0.0.6")
        ));
        history.extend(events);
        let server = given(&history);
        let details = server.details().expect("exists");
        assert_eq!(details.status, ServerStatus::Unknown);
        assert_eq!(details.host_key_fingerprint, None);
        assert_eq!(details.facts, None);
        assert_eq!(
            server.decide(&ServerCommand::RecordValidationSucceeded {
                facts: facts(),
                host_key_fingerprint: "SHA256:old".into(),
                jump_host_key_fingerprint: None,
            }),
            Err(ServerError::NoValidationPending)
        );
    }

    #[test]
    fn a_validation_is_requested_once_until_it_reports() {
        let history = created();
        let requested = given(&history).decide(&ServerCommand::RequestValidation);
        assert_eq!(requested, Ok(vec![ServerEvent::ServerValidationRequested { connection: connection_of(&history) }]));
        let server = given(&validating());
        assert_eq!(status(&server), Some(ServerStatus::Validating));
        assert_eq!(server.decide(&ServerCommand::RequestValidation), Ok(vec![]));
    }

    fn connection_of(history: &[ServerEvent]) -> Connection {
        given(history).details().map(|s| s.connection.clone()).expect("exists")
    }

    #[test]
    fn a_successful_validation_makes_the_server_reachable() {
        let mut history = validating();
        let recorded = given(&history).decide(&ServerCommand::RecordValidationSucceeded {
            facts: facts(),
            host_key_fingerprint: "SHA256:abc".into(),
            jump_host_key_fingerprint: None,
        });
        assert_eq!(
            recorded,
            Ok(vec![ServerEvent::ServerValidationSucceeded {
                facts: facts(),
                host_key_fingerprint: "SHA256:abc".into(),
                jump_host_key_fingerprint: None
            }])
        );
        history.extend(recorded.unwrap_or_default());
        let server = given(&history);
        let details = server.details().expect("exists");
        assert_eq!(details.status, ServerStatus::Reachable);
        assert_eq!(details.facts, Some(facts()));
        assert_eq!(details.host_key_fingerprint.as_deref(), Some("SHA256:abc"));
    }

    #[test]
    fn a_failed_validation_makes_the_server_unreachable() {
        let mut history = validating();
        let recorded =
            given(&history).decide(&ServerCommand::RecordValidationFailed { error: "connection refused".into() });
        history.extend(recorded.clone().unwrap_or_default());
        assert_eq!(recorded, Ok(vec![ServerEvent::ServerValidationFailed { error: "connection refused".into() }]));
        let server = given(&history);
        assert_eq!(status(&server), Some(ServerStatus::Unreachable));
        assert_eq!(server.details().and_then(|s| s.last_error.as_deref()), Some("connection refused"));
    }

    #[test]
    fn a_result_without_a_pending_validation_is_refused() {
        let server = given(&created());
        assert_eq!(
            server.decide(&ServerCommand::RecordValidationFailed { error: "late".into() }),
            Err(ServerError::NoValidationPending)
        );
        assert_eq!(
            server.decide(&ServerCommand::RecordValidationSucceeded {
                facts: facts(),
                host_key_fingerprint: "SHA256:abc".into(),
                jump_host_key_fingerprint: None,
            }),
            Err(ServerError::NoValidationPending)
        );
    }

    #[test]
    fn a_server_in_use_is_not_removed() {
        assert_eq!(
            given(&created()).decide(&ServerCommand::RemoveServer { applications_using_it: 2 }),
            Err(ServerError::ServerInUse)
        );
    }

    #[test]
    fn a_removed_server_is_gone_and_its_id_is_not_reused() {
        let mut history = created();
        let removed = given(&history).decide(&ServerCommand::RemoveServer { applications_using_it: 0 });
        assert_eq!(removed, Ok(vec![ServerEvent::ServerRemoved {}]));
        history.extend(removed.unwrap_or_default());
        let server = given(&history);
        assert!(server.describe().is_empty());
        assert_eq!(server.decide(&ServerCommand::RequestValidation), Err(ServerError::ServerNotFound));
        assert_eq!(server.decide(&create(BTreeSet::new(), true)), Err(ServerError::ServerAlreadyExists));
    }

    #[test]
    fn a_server_describes_its_settings_and_what_validation_found() {
        assert!(given(&[]).describe().is_empty());
        let mut history = validating();
        history.push(ServerEvent::ServerValidationSucceeded {
            facts: facts(),
            host_key_fingerprint: "SHA256:abc".into(),
            jump_host_key_fingerprint: None,
        });
        let described = given(&history).describe();
        assert_eq!(described["host"], FieldValue::Plain(json!("10.0.0.5")));
        assert_eq!(described["port"], FieldValue::Plain(json!(22)));
        assert_eq!(described["user"], FieldValue::Plain(json!("deploy")));
        assert_eq!(described["status"], FieldValue::Plain(json!("reachable")));
        assert_eq!(described["facts.cpus"], FieldValue::Plain(json!(4)));
        assert_eq!(described["hostKeyFingerprint"], FieldValue::Plain(json!("SHA256:abc")));
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let mut events = validating();
        events.extend([
            ServerEvent::ServerRenamed { name: name("x") },
            ServerEvent::ServerConnectionChanged { connection: connection() },
            ServerEvent::ServerValidationSucceeded {
                facts: facts(),
                host_key_fingerprint: "SHA256:abc".into(),
                jump_host_key_fingerprint: None,
            },
            ServerEvent::ServerValidationFailed { error: "timeout".into() },
            ServerEvent::ServerRemoved {},
        ]);
        for event in events {
            let (kind, payload) = event.encode().expect("encodes");
            assert_eq!(kind, event.event_type());
            assert_eq!(ServerEvent::decode(kind, 1, payload).expect("decodes"), event);
            let (kind, text) = event.encode_json().expect("encodes");
            assert_eq!(ServerEvent::decode_json(kind, 1, text.get()).expect("decodes"), event);
        }
    }
}

#[cfg(test)]
mod jump_host_tests {
    use super::*;

    fn bastion(port: &str) -> JumpHost {
        JumpHost {
            host: Host::parse("bastion.example.com").expect("a host"),
            port: Port::parse(port).expect("a port"),
            user: UnixUser::parse("hop").expect("a user"),
        }
    }

    fn validated() -> Server {
        let connection = Connection {
            host: Host::parse("10.0.0.7").expect("a host"),
            port: Port::parse("22").expect("a port"),
            user: UnixUser::parse("root").expect("a user"),
            private_key_id: PrivateKeyId::new(),
            jump: Some(bastion("22")),
        };
        Server::fold(&[
            ServerEvent::ServerCreated {
                server_id: ServerId::new(),
                team_id: TeamId::new(),
                name: Name::parse("inner").expect("a name"),
                connection: connection.clone(),
            },
            ServerEvent::ServerValidationRequested { connection },
            ServerEvent::ServerValidationSucceeded {
                facts: ServerFacts {
                    os: "Debian".into(),
                    docker_version: "26.1.0".into(),
                    cpus: 2,
                    memory_bytes: 1,
                    disk_free_bytes: 1,
                    accept_queue_migrates: Some(true),
                },
                host_key_fingerprint: "SHA256:inner".into(),
                jump_host_key_fingerprint: Some("SHA256:bastion".into()),
            },
        ])
    }

    fn change(server: &Server, patch: ServerPatch) -> Server {
        let command = ServerCommand::UpdateServer { patch, names_in_use: BTreeSet::new(), key_exists: true };
        let events = server.decide(&command).expect("accepted");
        events.iter().fold(server.clone(), |s, e| s.clone().evolve(e))
    }

    #[test]
    fn a_validation_through_a_jump_host_records_both_host_keys() {
        let server = validated();
        let details = server.details().expect("a server");
        assert_eq!(details.host_key_fingerprint.as_deref(), Some("SHA256:inner"));
        assert_eq!(details.jump_host_key_fingerprint.as_deref(), Some("SHA256:bastion"));
        assert_eq!(details.connection.jump, Some(bastion("22")));
    }

    #[test]
    fn another_jump_host_forgets_both_host_keys_and_another_user_there_forgets_neither() {
        let server = validated();
        let moved = change(&server, ServerPatch { jump: Some(Some(bastion("2222"))), ..ServerPatch::default() });
        let details = moved.details().expect("a server");
        assert_eq!(
            (details.host_key_fingerprint.as_deref(), details.jump_host_key_fingerprint.as_deref()),
            (None, None)
        );
        assert_eq!(details.status, ServerStatus::Unknown);

        let direct = change(&server, ServerPatch { jump: Some(None), ..ServerPatch::default() });
        assert_eq!(direct.details().and_then(|d| d.host_key_fingerprint.clone()), None);

        let other_user = JumpHost { user: UnixUser::parse("ops").expect("a user"), ..bastion("22") };
        let renamed = change(&server, ServerPatch { jump: Some(Some(other_user)), ..ServerPatch::default() });
        let details = renamed.details().expect("a server");
        assert_eq!(details.host_key_fingerprint.as_deref(), Some("SHA256:inner"));
        assert_eq!(details.jump_host_key_fingerprint.as_deref(), Some("SHA256:bastion"));
    }

    #[test]
    fn events_without_a_jump_host_still_decode() {
        let old =
            r#"{"host":"10.0.0.7","port":22,"user":"root","private_key_id":"00000000-0000-0000-0000-000000000001"}"#;
        let connection: Connection = serde_json::from_str(old).expect("decodes");
        assert_eq!(connection.jump, None);
    }
}

#[cfg(test)]
mod health_check_tests {
    use super::*;

    fn server(status: ServerStatus) -> Server {
        let Server::Active(mut details) = Server::New.evolve(&ServerEvent::ServerCreated {
            server_id: ServerId::new(),
            team_id: TeamId::new(),
            name: Name::parse("edge").expect("a name"),
            connection: Connection {
                host: Host::parse("127.0.0.1").expect("a host"),
                port: Port::parse("22").expect("a port"),
                user: UnixUser::parse("root").expect("a user"),
                private_key_id: PrivateKeyId::new(),
                jump: None,
            },
        }) else {
            unreachable!("created")
        };
        details.status = status;
        Server::Active(details)
    }

    #[test]
    fn a_check_records_only_changes_of_reachability() {
        let down = ServerCommand::RecordCheck { error: Some("connection refused".into()) };
        let up = ServerCommand::RecordCheck { error: None };
        let reachable = server(ServerStatus::Reachable);
        let events = reachable.decide(&down).expect("decided");
        assert_eq!(events, vec![ServerEvent::ServerBecameUnreachable { error: "connection refused".into() }]);
        let unreachable = events.iter().fold(reachable.clone(), |s, e| s.evolve(e));
        assert_eq!(unreachable.details().map(|d| d.status), Some(ServerStatus::Unreachable));
        assert_eq!(unreachable.decide(&down), Ok(vec![]));
        let events = unreachable.decide(&up).expect("decided");
        assert_eq!(events, vec![ServerEvent::ServerRecovered {}]);
        let recovered = events.iter().fold(unreachable, |s, e| s.evolve(e));
        assert_eq!(
            recovered.details().map(|d| (d.status, d.last_error.clone())),
            Some((ServerStatus::Reachable, None))
        );
        assert_eq!(reachable.decide(&up), Ok(vec![]));
        // A validation owns the status while it runs, and before the first one.
        assert_eq!(server(ServerStatus::Validating).decide(&down), Ok(vec![]));
        assert_eq!(server(ServerStatus::Unknown).decide(&up), Ok(vec![]));
    }

    #[test]
    fn a_check_is_asked_for_only_once_the_server_was_validated() {
        assert_eq!(
            server(ServerStatus::Reachable).decide(&ServerCommand::RequestCheck),
            Ok(vec![ServerEvent::ServerCheckRequested {}])
        );
        assert_eq!(
            server(ServerStatus::Unreachable).decide(&ServerCommand::RequestCheck),
            Ok(vec![ServerEvent::ServerCheckRequested {}])
        );
        assert_eq!(server(ServerStatus::Unknown).decide(&ServerCommand::RequestCheck), Err(ServerError::NotValidated));
    }
}

#[cfg(test)]
mod docker_version_tests {
    use super::ServerFacts;

    fn facts(version: &str) -> ServerFacts {
        ServerFacts {
            os: "Debian".into(),
            docker_version: version.into(),
            cpus: 2,
            memory_bytes: 1,
            disk_free_bytes: 1,
            accept_queue_migrates: Some(true),
        }
    }

    #[test]
    fn a_kernel_that_resets_connections_on_a_proxy_reload_is_warned_about() {
        let resets = ServerFacts { accept_queue_migrates: Some(false), ..facts("26.1.5") }.warnings();
        assert_eq!(resets.len(), 1, "{resets:?}");
        assert!(resets[0].contains("net.ipv4.tcp_migrate_req"), "{resets:?}");
        // Facts recorded before Zpanel looked say nothing about it.
        assert!(ServerFacts { accept_queue_migrates: None, ..facts("26.1.5") }.warnings().is_empty());
        let old: ServerFacts = serde_json::from_value(serde_json::json!({
            "os": "Debian", "docker_version": "26.1.5", "cpus": 2, "memory_bytes": 1, "disk_free_bytes": 1
        }))
        .expect("facts recorded before");
        assert_eq!(old.accept_queue_migrates, None);
    }

    #[test]
    fn an_engine_older_than_24_or_of_unknown_version_is_warned_about() {
        assert!(facts("24.0.7").warnings().is_empty());
        assert!(facts("26.1.5+dfsg1").warnings().is_empty());
        let old = facts("20.10.24").warnings();
        assert_eq!(old.len(), 1);
        assert!(old[0].contains("20.10.24") && old[0].contains("24.0"), "{old:?}");
        assert_eq!(facts("dev").warnings().len(), 1);
        assert_eq!(facts("").warnings().len(), 1);
    }
}
