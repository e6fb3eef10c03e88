//! Realistic sample histories for benchmarks and tests: a team with members, a key, a server, a
//! project, an API token, applications with plain and secret variables and configuration
//! changes, and deployments through their whole lifecycle. Every event is decided by the domain
//! from a command, as in production; only where the events go differs ([`Sink`]).

use crate::handler::{CommandContext, CommandHandler};
use crate::store::{Actor, EventStore, Metadata, NewEvent, event_id_for};
use crate::{Keyring, Plaintext};
use anyhow::Context as _;
use sqlx::PgPool;
use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;
use zpanel_domain::aggregate::{Aggregate, DomainEvent};
use zpanel_domain::api_token::{ApiToken, ApiTokenCommand};
use zpanel_domain::application::{Application, ApplicationCommand, ApplicationPatch, EnvValue, Source};
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentReason, DeploymentStep};
use zpanel_domain::ids::{ApiTokenId, ApplicationId, DeploymentId, PrivateKeyId, ProjectId, ServerId, TeamId, UserId};
use zpanel_domain::private_key::{PrivateKey, PrivateKeyCommand};
use zpanel_domain::project::{Project, ProjectCommand};
use zpanel_domain::server::{Server, ServerCommand, ServerFacts};
use zpanel_domain::team::{Role, Team, TeamCommand};
use zpanel_domain::values::{
    Abilities, Ability, DomainName, EnvKey, EnvironmentName, GitRef, GitUrl, HealthCheck, Host, Name, Port, RepoPath,
    ResourceLimits, UnixUser,
};

/// Where sample commands go.
pub trait Sink: Send {
    /// Runs `command` against aggregate `id` of `team`; returns the state after it.
    fn execute<A: Aggregate + 'static>(
        &mut self,
        team: TeamId,
        id: Uuid,
        command: &A::Command,
    ) -> impl Future<Output = anyhow::Result<A>> + Send;
}

/// Sends sample commands through a real command handler.
#[derive(Debug)]
pub struct HandlerSink<'a, S>(pub &'a CommandHandler<S>);

impl<S: EventStore> Sink for HandlerSink<'_, S> {
    async fn execute<A: Aggregate + 'static>(
        &mut self,
        team: TeamId,
        id: Uuid,
        command: &A::Command,
    ) -> anyhow::Result<A> {
        let ctx = CommandContext::new(team, Actor::system("sample"), "sample");
        let outcome = self.0.execute::<A>(&ctx, id, command).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(outcome.state)
    }
}

/// An event decided in memory, to be written in bulk.
#[derive(Debug)]
pub struct PendingEvent {
    /// `kind-uuid`.
    pub stream_id: String,
    /// Its version.
    pub version: i64,
    /// The owning team.
    pub team_id: Uuid,
    /// The event itself.
    pub event: NewEvent,
}

/// Decides sample commands in memory and collects their events, for bulk writing.
#[derive(Default)]
pub struct MemorySink {
    states: HashMap<String, (Box<dyn Any + Send>, i64)>,
    /// Streams created, with kind and team, in order.
    pub streams: Vec<(String, &'static str, Uuid)>,
    /// Events decided, in order.
    pub events: Vec<PendingEvent>,
}

impl std::fmt::Debug for MemorySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySink").field("events", &self.events.len()).finish_non_exhaustive()
    }
}

impl Sink for MemorySink {
    async fn execute<A: Aggregate + 'static>(
        &mut self,
        team: TeamId,
        id: Uuid,
        command: &A::Command,
    ) -> anyhow::Result<A> {
        let stream_id = format!("{}-{id}", A::KIND);
        let (state, version) = match self.states.remove(&stream_id) {
            Some((state, version)) => {
                (*state.downcast::<A>().map_err(|_| anyhow::anyhow!("stream kind mismatch"))?, version)
            }
            None => {
                self.streams.push((stream_id.clone(), A::KIND, *team.as_uuid()));
                (A::default(), 0)
            }
        };
        let events = state.decide(command).map_err(|e| anyhow::anyhow!("{e}"))?;
        let command_id = Uuid::now_v7();
        let metadata = Metadata {
            actor: Actor::system("sample"),
            command_id,
            correlation_id: command_id,
            causation_id: None,
            origin: "sample".into(),
        };
        let mut state = state;
        let mut version = version;
        for (i, event) in events.iter().enumerate() {
            let (event_type, payload) = event.encode_json()?;
            version += 1;
            self.events.push(PendingEvent {
                stream_id: stream_id.clone(),
                version,
                team_id: *team.as_uuid(),
                event: NewEvent {
                    event_id: event_id_for(command_id, i),
                    event_type: event_type.to_owned(),
                    schema_version: A::Event::schema_version(event_type),
                    payload: payload.into(),
                    metadata: metadata.clone(),
                },
            });
            state = state.evolve(event);
        }
        self.states.insert(stream_id, (Box::new(state.clone()), version));
        Ok(state)
    }
}

impl MemorySink {
    /// Forgets the states of the streams decided so far (their events stay to be flushed):
    /// sample teams never touch each other's streams, so a long run needs only the current team's.
    pub fn forget_states(&mut self) {
        self.states.clear();
    }

    /// Writes the collected streams and events in one transaction and forgets them (states are
    /// kept, so later commands continue the same streams).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn flush(&mut self, pool: &PgPool) -> anyhow::Result<u64> {
        if self.events.is_empty() {
            return Ok(0);
        }
        let mut versions: HashMap<&str, i64> = HashMap::new();
        for e in &self.events {
            versions.insert(e.stream_id.as_str(), e.version);
        }
        let mut tx = pool.begin().await?;
        let (ids, kinds, teams): (Vec<&str>, Vec<&str>, Vec<Uuid>) = {
            let mut ids = Vec::new();
            let mut kinds = Vec::new();
            let mut teams = Vec::new();
            for (id, kind, team) in &self.streams {
                ids.push(id.as_str());
                kinds.push(*kind);
                teams.push(*team);
            }
            (ids, kinds, teams)
        };
        sqlx::query(
            "insert into streams (stream_id, kind, team_id, version) select *, 0 from unnest($1::text[], $2::text[], $3::uuid[])",
        )
        .bind(&ids)
        .bind(&kinds)
        .bind(&teams)
        .execute(&mut *tx)
        .await
        .context("writing sample streams")?;
        let touched: Vec<&str> = versions.keys().copied().collect();
        let touched_versions: Vec<i64> = touched.iter().map(|s| versions[s]).collect();
        sqlx::query(
            "update streams s set version = v.version from unnest($1::text[], $2::bigint[]) as v(stream_id, version)
              where s.stream_id = v.stream_id",
        )
        .bind(&touched)
        .bind(&touched_versions)
        .execute(&mut *tx)
        .await?;
        let n = self.events.len();
        let mut columns = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for e in self.events.drain(..) {
            columns.0.push(e.stream_id);
            columns.1.push(e.version);
            columns.2.push(e.event.event_id);
            columns.3.push(e.event.event_type);
            columns.4.push(i32::try_from(e.event.schema_version)?);
            columns.5.push(e.team_id);
            columns.6.push(e.event.payload.as_str().to_owned());
            columns.7.push(serde_json::to_string(&e.event.metadata)?);
        }
        sqlx::query(
            "insert into events (stream_id, stream_position, event_id, event_type, schema_version, team_id, payload, metadata)
             select * from unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::int[], $6::uuid[], $7::text[]::json[], $8::text[]::json[])",
        )
        .bind(&columns.0)
        .bind(&columns.1)
        .bind(&columns.2)
        .bind(&columns.3)
        .bind(&columns.4)
        .bind(&columns.5)
        .bind(&columns.6)
        .bind(&columns.7)
        .execute(&mut *tx)
        .await
        .context("writing sample events")?;
        tx.commit().await?;
        self.streams.clear();
        Ok(n as u64)
    }
}

/// How big a sample team is.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Applications in its project.
    pub applications: usize,
    /// Environment variables set per application (every fourth one secret).
    pub variables: usize,
    /// Configuration updates per application.
    pub updates: usize,
    /// Deployments per application, each queued, started, stepped through and finished.
    pub deployments: usize,
}

impl Shape {
    /// About 590 events: 5 applications × (20 variables, 5 updates, 10 deployments).
    pub const TYPICAL: Self = Self { applications: 5, variables: 20, updates: 5, deployments: 10 };

    /// How many events one team of this shape records.
    #[must_use]
    pub const fn events(&self) -> usize {
        // team 3, key 1, server 3, project 2, token 1; per app: create, variables, updates,
        // deployments × (queued, started, commit, 5 steps, finished).
        10 + self.applications * (1 + self.variables + self.updates + self.deployments * 9)
    }
}

fn valid<T, E: std::fmt::Display>(value: Result<T, E>) -> anyhow::Result<T> {
    value.map_err(|e| anyhow::anyhow!("sample value: {e}"))
}

/// What [`team`] created.
#[derive(Clone, Debug)]
pub struct SampleTeam {
    /// The team.
    pub team_id: TeamId,
    /// Its project.
    pub project_id: ProjectId,
    /// Its applications.
    pub applications: Vec<ApplicationId>,
    /// Every deployment, oldest first.
    pub deployments: Vec<DeploymentId>,
    /// The plaintext of the secret variables it set (to check they are never stored).
    pub secrets: Vec<String>,
}

/// Records one team's history of the given shape into `sink`.
///
/// # Errors
/// When a command is rejected (a bug in the sample) or the sink fails.
#[allow(clippy::too_many_lines)]
pub async fn team<S: Sink>(sink: &mut S, keyring: &Keyring, shape: Shape, label: &str) -> anyhow::Result<SampleTeam> {
    let team_id = TeamId::new();
    let mut now = OffsetDateTime::UNIX_EPOCH + Duration::days(20_000);
    let t = *team_id.as_uuid();
    sink.execute::<Team>(team_id, t, &TeamCommand::CreateTeam { id: team_id, name: valid(Name::parse(label))? })
        .await?;
    for role in [Role::Owner, Role::Member] {
        sink.execute::<Team>(team_id, t, &TeamCommand::AddMember { user_id: UserId::new(), role }).await?;
    }

    let key_id = PrivateKeyId::new();
    let material = crate::ssh_keys::generate_ed25519()?;
    sink.execute::<PrivateKey>(
        team_id,
        *key_id.as_uuid(),
        &PrivateKeyCommand::AddPrivateKey {
            id: key_id,
            team_id,
            name: valid(Name::parse("deploy key"))?,
            public_key: material.public_key,
            fingerprint: material.fingerprint,
            private_key: keyring.seal(&material.private_key),
            names_in_use: BTreeSet::new(),
        },
    )
    .await?;

    let server_id = ServerId::new();
    let s = *server_id.as_uuid();
    sink.execute::<Server>(
        team_id,
        s,
        &ServerCommand::CreateServer {
            id: server_id,
            team_id,
            name: valid(Name::parse("edge-1"))?,
            host: valid(Host::parse("10.0.0.7"))?,
            port: valid(Port::try_from(22u32))?,
            user: valid(UnixUser::parse("deploy"))?,
            private_key_id: key_id,
            jump: None,
            names_in_use: BTreeSet::new(),
            key_exists: true,
        },
    )
    .await?;
    sink.execute::<Server>(team_id, s, &ServerCommand::RequestValidation).await?;
    let facts = ServerFacts {
        os: "Debian GNU/Linux 12".into(),
        docker_version: "28.2.2".into(),
        cpus: 4,
        memory_bytes: 8 << 30,
        disk_free_bytes: 100 << 30,
        accept_queue_migrates: Some(true),
    };
    sink.execute::<Server>(
        team_id,
        s,
        &ServerCommand::RecordValidationSucceeded {
            facts,
            host_key_fingerprint: "SHA256:sample".into(),
            jump_host_key_fingerprint: None,
        },
    )
    .await?;

    let project_id = ProjectId::new();
    let p = *project_id.as_uuid();
    sink.execute::<Project>(
        team_id,
        p,
        &ProjectCommand::CreateProject {
            id: project_id,
            team_id,
            name: valid(Name::parse("Shop"))?,
            names_in_use: BTreeSet::new(),
        },
    )
    .await?;
    sink.execute::<Project>(
        team_id,
        p,
        &ProjectCommand::CreateEnvironment { name: valid(EnvironmentName::parse("staging"))? },
    )
    .await?;

    let token = crate::tokens::generate();
    let token_id = ApiTokenId::new();
    let all = Abilities::new(Ability::ALL);
    sink.execute::<ApiToken>(
        team_id,
        *token_id.as_uuid(),
        &ApiTokenCommand::CreateApiToken {
            id: token_id,
            team_id,
            name: valid(Name::parse("ci"))?,
            abilities: Abilities::new([Ability::Read, Ability::Deploy]),
            token_hash: token.hash,
            expires_at: None,
            creator_abilities: all,
            creator_expires_at: None,
            now,
        },
    )
    .await?;

    let mut sample =
        SampleTeam { team_id, project_id, applications: Vec::new(), deployments: Vec::new(), secrets: Vec::new() };
    let mut names = BTreeSet::new();
    let zone = format!("t{}.shop.example.com", team_id.as_uuid().simple());
    for a in 0..shape.applications {
        let app_id = ApplicationId::new();
        let id = *app_id.as_uuid();
        let name = valid(Name::parse(&format!("app-{a}")))?;
        let mut app: Application = sink
            .execute::<Application>(
                team_id,
                id,
                &ApplicationCommand::CreateApplication {
                    id: app_id,
                    team_id,
                    project_id,
                    environment: EnvironmentName::production(),
                    name: name.clone(),
                    source: Source::Git {
                        url: valid(GitUrl::parse("git@git.example.com:acme/shop.git"))?,
                        git_ref: valid(GitRef::parse("main"))?,
                        dockerfile: RepoPath::dockerfile(),
                        deploy_key: Some(key_id),
                        credentials: None,
                    },
                    port: valid(Port::try_from(8080u32))?,
                    health_check: HealthCheck::default(),
                    // Domains are unique across the installation: each sample team has its own zone.
                    domains: BTreeSet::from([valid(DomainName::parse(&format!("app-{a}.{zone}")))?]),
                    limits: valid(ResourceLimits::new(Some(256 << 20), Some(500)))?,
                    server_id: Some(server_id),
                    webhook_secret: keyring.seal(&Plaintext::new(format!("whsec-{}", Uuid::now_v7()))),
                    names_in_use: names.clone(),
                    environment_exists: true,
                },
            )
            .await?;
        names.insert(name);
        for v in 0..shape.variables {
            let value = if v % 4 == 3 {
                let secret = format!("s3cret-{}", Uuid::now_v7().simple());
                sample.secrets.push(secret.clone());
                EnvValue::Secret(keyring.seal(&Plaintext::new(secret)))
            } else {
                EnvValue::Plain(format!("value-{v}"))
            };
            app = sink
                .execute::<Application>(
                    team_id,
                    id,
                    &ApplicationCommand::SetEnvironmentVariable {
                        key: valid(EnvKey::parse(&format!("VAR_{v}")))?,
                        value,
                        build_time: v % 5 == 0,
                    },
                )
                .await?;
        }
        for u in 0..shape.updates {
            let patch = match u % 3 {
                0 => ApplicationPatch {
                    git_ref: Some(valid(GitRef::parse(&format!("release-{u}")))?),
                    ..ApplicationPatch::default()
                },
                1 => ApplicationPatch {
                    port: Some(valid(Port::try_from(8000 + u as u32))?),
                    ..ApplicationPatch::default()
                },
                _ => ApplicationPatch {
                    domains: Some(BTreeSet::from([valid(DomainName::parse(&format!("v{u}.app-{a}.{zone}")))?])),
                    ..ApplicationPatch::default()
                },
            };
            app = sink
                .execute::<Application>(
                    team_id,
                    id,
                    &ApplicationCommand::UpdateApplication { patch, names_in_use: BTreeSet::new() },
                )
                .await?;
        }
        for d in 0..shape.deployments {
            let deployment_id = DeploymentId::new();
            let dep = *deployment_id.as_uuid();
            now += Duration::minutes(7);
            sink.execute::<Deployment>(
                team_id,
                dep,
                &DeploymentCommand::QueueDeployment {
                    id: deployment_id,
                    application: app.clone(),
                    reason: DeploymentReason::Manual,
                    image: None,
                    release: None,
                    now,
                },
            )
            .await?;
            let lease_until = now + Duration::seconds(30);
            sink.execute::<Deployment>(
                team_id,
                dep,
                &DeploymentCommand::StartDeployment { worker_id: "worker-1".into(), lease_until, now },
            )
            .await?;
            sink.execute::<Deployment>(
                team_id,
                dep,
                &DeploymentCommand::RecordCommit { commit: format!("{:040x}", d + 1) },
            )
            .await?;
            for step in [
                DeploymentStep::Clone,
                DeploymentStep::Build,
                DeploymentStep::Start,
                DeploymentStep::HealthCheck,
                DeploymentStep::Route,
            ] {
                sink.execute::<Deployment>(team_id, dep, &DeploymentCommand::CompleteStep { step }).await?;
            }
            let finished = now + Duration::seconds(40);
            let last = if d % 5 == 4 {
                DeploymentCommand::FailDeployment {
                    step: Some(DeploymentStep::Cleanup),
                    reason: "the old container did not stop in time".into(),
                    now: finished,
                }
            } else {
                DeploymentCommand::SucceedDeployment { image: format!("sha256:{:064x}", d + 1), now: finished }
            };
            sink.execute::<Deployment>(team_id, dep, &last).await?;
            sample.deployments.push(deployment_id);
        }
        sample.applications.push(app_id);
    }
    Ok(sample)
}

/// Writes about `events` events of sample teams to the log, in transactions of a few thousand
/// events; `progress` hears how many were written after each.
///
/// # Errors
/// When the database fails.
pub async fn write_log(pool: &PgPool, events: u64, mut progress: impl FnMut(u64)) -> anyhow::Result<u64> {
    let keyring = Keyring::generate();
    let mut sink = MemorySink::default();
    let mut written = 0u64;
    let mut n = 0;
    while written + (sink.events.len() as u64) < events {
        team(&mut sink, &keyring, Shape::TYPICAL, &format!("Team {n}")).await?;
        sink.forget_states();
        n += 1;
        if sink.events.len() >= 5_000 {
            let flushed = sink.flush(pool).await?;
            written += flushed;
            progress(flushed);
        }
    }
    let flushed = sink.flush(pool).await?;
    progress(flushed);
    Ok(written + flushed)
}
