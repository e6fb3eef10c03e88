//! Queries: the read models, scoped to the caller's team; the audit log and the event log;
//! time travel. An id of another team answers exactly like an id that does not exist.

use super::types::{
    AUDIT_COLUMNS, ApiToken, Application, ApplicationConnection, AuditConnection, AuditEntry, Change,
    DEPLOYMENT_COLUMNS, Deployment, DeploymentConnection, Event, LogLine, PrivateKey, Project, Server, ServerFacts,
    Team,
};
use super::{caller, decode_cursor, encode_cursor, load, page_size, parse_id};
use crate::error::{ApiError, ApiResult};
use async_graphql::{Context, ID, InputObject, Object, SimpleObject};
use std::sync::Arc;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zpanel_commands::postgres::{EVENT_COLUMNS, event_from_row};
use zpanel_domain::values::Ability;
use zpanel_projections::history::{AsOf, diff_versions, load_as_of};

/// The query root.
#[derive(Debug, Default)]
pub struct Query;

/// The caller: the token in use.
#[derive(Clone, Debug, SimpleObject)]
pub struct Me {
    /// The token's id.
    pub token_id: ID,
    /// The token's name.
    pub name: String,
    /// What it may do.
    pub abilities: Vec<String>,
    /// Its team.
    pub team_id: ID,
}

/// Which audit entries.
#[derive(Clone, Debug, Default, InputObject)]
pub struct AuditFilter {
    /// One aggregate's stream (`kind-uuid`).
    pub stream_id: Option<String>,
    /// An actor's name or id.
    pub actor: Option<String>,
    /// One event type, e.g. `EnvironmentVariableSet`.
    pub event_type: Option<String>,
    /// At or after this time (RFC 3339).
    pub since: Option<String>,
    /// Before this time (RFC 3339).
    pub until: Option<String>,
}

/// A filter parsed.
#[derive(Clone, Debug, Default)]
pub(crate) struct ParsedFilter {
    pub stream_id: Option<String>,
    pub actor: Option<String>,
    pub event_type: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

impl AuditFilter {
    pub(crate) fn parse(self) -> ApiResult<ParsedFilter> {
        let time = |field: &str, value: Option<String>| {
            value
                .map(|v| OffsetDateTime::parse(&v, &Rfc3339))
                .transpose()
                .map_err(|_| ApiError::invalid(field, "must be an RFC 3339 time, e.g. 2026-11-25T10:00:00Z"))
        };
        Ok(ParsedFilter {
            since: time("filter.since", self.since)?,
            until: time("filter.until", self.until)?,
            stream_id: self.stream_id,
            actor: self.actor,
            event_type: self.event_type,
        })
    }
}

impl ParsedFilter {
    /// Whether an entry passes (for entries that arrive through the feed). `at` gives the
    /// entry's time, asked for only when the filter has a time bound.
    pub(crate) fn matches(&self, entry: &AuditEntry, at: impl FnOnce() -> Option<OffsetDateTime>) -> bool {
        let passes = self.stream_id.as_ref().is_none_or(|s| *s == entry.stream_id)
            && self.event_type.as_ref().is_none_or(|t| *t == entry.event_type)
            && self.actor.as_ref().is_none_or(|a| *a == entry.actor.name || Some(a) == entry.actor.id.as_ref());
        if !passes || (self.since.is_none() && self.until.is_none()) {
            return passes;
        }
        let at = at();
        self.since.is_none_or(|s| at.is_some_and(|at| at >= s))
            && self.until.is_none_or(|u| at.is_some_and(|at| at < u))
    }
}

/// Whether the client asked for a connection's `totalCount`: counting costs a scan, so it is
/// done only then.
fn counted(ctx: &Context<'_>) -> bool {
    ctx.look_ahead().field("totalCount").exists()
}

/// The sort key in an `after` cursor.
fn after_key<T: std::str::FromStr>(after: Option<String>) -> ApiResult<Option<T>> {
    after
        .map(|c| {
            decode_cursor(&c)?.parse::<T>().map_err(|_| ApiError::invalid("after", "is not a cursor this API returned"))
        })
        .transpose()
}

#[Object]
impl Query {
    /// The token in use.
    async fn me(&self, ctx: &Context<'_>) -> ApiResult<Me> {
        let (_, caller) = caller(ctx)?;
        Ok(Me {
            token_id: ID(caller.token_id.to_string()),
            name: caller.token_name.clone(),
            abilities: caller.abilities.iter().map(|a| a.as_str().to_owned()).collect(),
            team_id: ID(caller.team_id.to_string()),
        })
    }

    /// The caller's team.
    async fn team(&self, ctx: &Context<'_>) -> ApiResult<Team> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let row = sqlx::query("select team_id, name, members from rm_teams where team_id = $1")
            .bind(caller.team_id.as_uuid())
            .fetch_optional(&state.pool)
            .await?
            .ok_or(ApiError::NotFound("team"))?;
        Team::from_row(&row)
    }

    /// The team's projects, by name.
    async fn projects(&self, ctx: &Context<'_>) -> ApiResult<Vec<Project>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        load::list(state, caller, "select * from rm_projects where team_id = $1 order by name", Project::from_row).await
    }

    /// A project.
    async fn project(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<Project>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let Ok(id) = parse_id(&id, "project") else { return Ok(None) };
        load::project(state, caller, id).await
    }

    /// Applications, oldest first, optionally of one project and environment.
    #[graphql(complexity = "super::list_cost(first, 50, child_complexity)")]
    async fn applications(
        &self,
        ctx: &Context<'_>,
        project_id: Option<ID>,
        environment: Option<String>,
        first: Option<i32>,
        after: Option<String>,
    ) -> ApiResult<ApplicationConnection> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let first = page_size(first)?;
        let project = match &project_id {
            Some(id) => match parse_id(id, "project") {
                Ok(id) => Some(id),
                Err(_) => return Ok(ApplicationConnection::page(Vec::new(), first, 0)),
            },
            None => None,
        };
        let after = after_key::<uuid::Uuid>(after)?;
        let filter =
            "team_id = $1 and ($2::uuid is null or project_id = $2) and ($3::text is null or environment = $3)";
        let total: i64 = if counted(ctx) {
            sqlx::query_scalar(&format!("select count(*) from rm_applications where {filter}"))
                .bind(caller.team_id.as_uuid())
                .bind(project)
                .bind(&environment)
                .fetch_one(&state.pool)
                .await?
        } else {
            0
        };
        let rows = sqlx::query(&format!(
            "select application_id, state, version, updated_at from rm_applications
              where {filter} and ($4::uuid is null or application_id > $4)
              order by application_id limit $5"
        ))
        .bind(caller.team_id.as_uuid())
        .bind(project)
        .bind(&environment)
        .bind(after)
        .bind(i64::try_from(first + 1).unwrap_or(101))
        .fetch_all(&state.pool)
        .await?;
        let reveal = caller.sees_secrets().then(|| Arc::clone(&state.keyring));
        let items = rows
            .iter()
            .map(|row| {
                let app = Application::from_row(row, reveal.clone())?;
                Ok((encode_cursor(&app.uuid().to_string()), app))
            })
            .collect::<ApiResult<Vec<_>>>()?;
        Ok(ApplicationConnection::page(items, first, total))
    }

    /// An application's current configuration.
    async fn application(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<Application>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let Ok(id) = parse_id(&id, "application") else { return Ok(None) };
        load::application(state, caller, id).await
    }

    /// An application's deployments, newest first.
    #[graphql(complexity = "super::list_cost(first, 50, child_complexity)")]
    async fn deployments(
        &self,
        ctx: &Context<'_>,
        application_id: ID,
        first: Option<i32>,
        after: Option<String>,
    ) -> ApiResult<DeploymentConnection> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let first = page_size(first)?;
        let application = parse_id(&application_id, "application")?;
        let exists: bool = sqlx::query_scalar(
            "select exists (select 1 from rm_applications where team_id = $1 and application_id = $2)",
        )
        .bind(caller.team_id.as_uuid())
        .bind(application)
        .fetch_one(&state.pool)
        .await?;
        if !exists {
            return Err(ApiError::NotFound("application"));
        }
        let after = after_key::<uuid::Uuid>(after)?;
        let total: i64 = if counted(ctx) {
            sqlx::query_scalar("select count(*) from rm_deployments where team_id = $1 and application_id = $2")
                .bind(caller.team_id.as_uuid())
                .bind(application)
                .fetch_one(&state.pool)
                .await?
        } else {
            0
        };
        let rows = sqlx::query(&format!(
            "select {DEPLOYMENT_COLUMNS} from rm_deployments
              where team_id = $1 and application_id = $2 and ($3::uuid is null or deployment_id < $3)
              order by deployment_id desc limit $4"
        ))
        .bind(caller.team_id.as_uuid())
        .bind(application)
        .bind(after)
        .bind(i64::try_from(first + 1).unwrap_or(101))
        .fetch_all(&state.pool)
        .await?;
        let items = rows
            .iter()
            .map(|row| {
                let d = Deployment::from_row(row)?;
                Ok((encode_cursor(d.id.as_str()), d))
            })
            .collect::<ApiResult<Vec<_>>>()?;
        Ok(DeploymentConnection::page(items, first, total))
    }

    /// A deployment.
    async fn deployment(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<Deployment>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let Ok(id) = parse_id(&id, "deployment") else { return Ok(None) };
        load::deployment(state, caller, id).await
    }

    /// A deployment's log: the lines after sequence `after` (default: from the first), at most
    /// `first` (default 500, up to 1000). The subscription `deploymentLogs` follows them live.
    #[graphql(complexity = "super::list_cost(first, 500, child_complexity)")]
    async fn deployment_logs(
        &self,
        ctx: &Context<'_>,
        deployment_id: ID,
        after: Option<i32>,
        first: Option<i32>,
    ) -> ApiResult<Vec<LogLine>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let (after, first) = (crate::logs::after_sequence(after)?, crate::logs::page_of_lines(first)?);
        let deployment = parse_id(&deployment_id, "deployment")?;
        crate::logs::team_deployment(state, caller, deployment).await?;
        crate::logs::read_lines(&state.pool, deployment, after, first).await
    }

    /// The team's servers, by name.
    async fn servers(&self, ctx: &Context<'_>) -> ApiResult<Vec<Server>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        load::list(state, caller, "select * from rm_servers where team_id = $1 order by name", Server::from_row).await
    }

    /// A server.
    async fn server(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<Server>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let Ok(id) = parse_id(&id, "server") else { return Ok(None) };
        load::server(state, caller, id).await
    }

    /// What the last successful validation of a server found (`null` before one), with
    /// warnings such as a Docker Engine older than Zpanel supports. `NOT_FOUND` for a server
    /// the team does not have.
    async fn server_facts(&self, ctx: &Context<'_>, server_id: ID) -> ApiResult<Option<ServerFacts>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let id = parse_id(&server_id, "server")?;
        let server = load::server(state, caller, id).await?.ok_or(ApiError::NotFound("server"))?;
        Ok(server.facts)
    }

    /// The team's SSH keys (public halves), by name.
    async fn private_keys(&self, ctx: &Context<'_>) -> ApiResult<Vec<PrivateKey>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        load::list(
            state,
            caller,
            "select * from rm_private_keys where team_id = $1 order by name",
            PrivateKey::from_row,
        )
        .await
    }

    /// The team's API tokens (never their secrets). Needs `root`.
    async fn api_tokens(&self, ctx: &Context<'_>) -> ApiResult<Vec<ApiToken>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Root)?;
        let sql = "select * from rm_api_tokens where team_id = $1 order by created_at, token_id";
        load::list(state, caller, sql, ApiToken::from_row).await
    }

    /// The audit log, newest first: who changed what, with before and after values.
    #[graphql(complexity = "super::list_cost(first, 50, child_complexity)")]
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        filter: Option<AuditFilter>,
        first: Option<i32>,
        after: Option<String>,
    ) -> ApiResult<AuditConnection> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let first = page_size(first)?;
        let f = filter.unwrap_or_default().parse()?;
        let after = after_key::<i64>(after)?;
        let conditions = "a.team_id = $1 and ($2::text is null or a.stream_id = $2)
             and ($3::text is null or a.actor->>'name' = $3 or a.actor->>'id' = $3)
             and ($4::text is null or a.event_type = $4)
             and ($5::timestamptz is null or a.at >= $5) and ($6::timestamptz is null or a.at < $6)";
        let total: i64 = if counted(ctx) {
            sqlx::query_scalar(&format!("select count(*) from rm_audit_log a where {conditions}"))
                .bind(caller.team_id.as_uuid())
                .bind(&f.stream_id)
                .bind(&f.actor)
                .bind(&f.event_type)
                .bind(f.since)
                .bind(f.until)
                .fetch_one(&state.pool)
                .await?
        } else {
            0
        };
        let rows = sqlx::query(&format!(
            "select {AUDIT_COLUMNS} from rm_audit_log a
              where {conditions} and ($7::bigint is null or a.global_position < $7)
              order by a.global_position desc limit $8"
        ))
        .bind(caller.team_id.as_uuid())
        .bind(&f.stream_id)
        .bind(&f.actor)
        .bind(&f.event_type)
        .bind(f.since)
        .bind(f.until)
        .bind(after)
        .bind(i64::try_from(first + 1).unwrap_or(101))
        .fetch_all(&state.pool)
        .await?;
        let items = rows
            .iter()
            .map(|row| {
                let entry = AuditEntry::from_row(row)?;
                Ok((encode_cursor(&entry.position.to_string()), entry))
            })
            .collect::<ApiResult<Vec<_>>>()?;
        Ok(AuditConnection::page(items, first, total))
    }

    /// A stream's events as recorded, from a version on (at most `first`, default 100, up to
    /// 1000). Sealed values read as `"[secret]"`.
    #[graphql(complexity = "super::list_cost(first, 100, child_complexity)")]
    async fn events(
        &self,
        ctx: &Context<'_>,
        stream_id: ID,
        from_version: Option<i64>,
        first: Option<i32>,
    ) -> ApiResult<Vec<Event>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let limit = match first {
            None => 100,
            Some(n) if (0..=1000).contains(&n) => i64::from(n),
            Some(_) => return Err(ApiError::invalid("first", "must be between 0 and 1000")),
        };
        let rows = sqlx::query(&format!(
            "select {EVENT_COLUMNS} from events
              where stream_id = $1 and team_id = $2 and stream_position >= $3
              order by stream_position limit $4"
        ))
        .bind(stream_id.as_str())
        .bind(caller.team_id.as_uuid())
        .bind(from_version.unwrap_or(1))
        .bind(limit)
        .fetch_all(&state.pool)
        .await?;
        if rows.is_empty() {
            let exists: bool =
                sqlx::query_scalar("select exists (select 1 from streams where stream_id = $1 and team_id = $2)")
                    .bind(stream_id.as_str())
                    .bind(caller.team_id.as_uuid())
                    .fetch_one(&state.pool)
                    .await?;
            if !exists {
                return Err(ApiError::NotFound("stream"));
            }
        }
        rows.iter().map(|row| Event::from_recorded(&event_from_row(row)?)).collect()
    }

    /// An application as it was: after its first `version` events, or at a time (RFC 3339).
    /// `null` when it did not exist yet then.
    async fn application_at(
        &self,
        ctx: &Context<'_>,
        id: ID,
        version: Option<i64>,
        at: Option<String>,
    ) -> ApiResult<Option<Application>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let as_of = match (version, at) {
            (Some(_), Some(_)) => return Err(ApiError::invalid("at", "give either version or at, not both")),
            (Some(v), None) if v >= 0 => AsOf::Version(v),
            (Some(_), None) => return Err(ApiError::invalid("version", "must be 0 or more")),
            (None, Some(at)) => AsOf::Time(
                OffsetDateTime::parse(&at, &Rfc3339)
                    .map_err(|_| ApiError::invalid("at", "must be an RFC 3339 time, e.g. 2026-11-25T10:00:00Z"))?,
            ),
            (None, None) => AsOf::Latest,
        };
        let id = parse_id(&id, "application")?;
        let snapshot =
            load_as_of::<zpanel_domain::application::Application>(&state.pool, *caller.team_id.as_uuid(), id, as_of)
                .await?
                .ok_or(ApiError::NotFound("application"))?;
        let reveal = caller.sees_secrets().then(|| Arc::clone(&state.keyring));
        Ok(Application::from_aggregate(snapshot.state, snapshot.version, snapshot.at, reveal))
    }

    /// What changed in an application's configuration between two versions.
    async fn application_diff(
        &self,
        ctx: &Context<'_>,
        id: ID,
        from_version: i64,
        to_version: i64,
    ) -> ApiResult<Vec<Change>> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        if from_version < 0 {
            return Err(ApiError::invalid("fromVersion", "must be 0 or more"));
        }
        if to_version < 0 {
            return Err(ApiError::invalid("toVersion", "must be 0 or more"));
        }
        let id = parse_id(&id, "application")?;
        let changes = diff_versions::<zpanel_domain::application::Application>(
            &state.pool,
            *caller.team_id.as_uuid(),
            id,
            from_version,
            to_version,
        )
        .await?
        .ok_or(ApiError::NotFound("application"))?;
        Ok(changes.into_iter().map(Change::from).collect())
    }

    /// What changed from one release of an application to another: the commits, the images,
    /// and every configuration field before and after (secrets shown only as changed).
    async fn release_diff(
        &self,
        ctx: &Context<'_>,
        from_deployment_id: ID,
        to_deployment_id: ID,
    ) -> ApiResult<ReleaseDiff> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let from_id = parse_id(&from_deployment_id, "fromDeploymentId")?;
        let to_id = parse_id(&to_deployment_id, "toDeploymentId")?;
        let load = |id: uuid::Uuid| {
            let pool = state.pool.clone();
            let team = *caller.team_id.as_uuid();
            async move {
                let text: Option<String> =
                    sqlx::query_scalar("select state from rm_deployments where team_id = $1 and deployment_id = $2")
                        .bind(team)
                        .bind(id)
                        .fetch_optional(&pool)
                        .await?;
                let Some(text) = text else {
                    return Ok::<_, ApiError>(None);
                };
                let deployment: zpanel_domain::deployment::Deployment =
                    serde_json::from_str(&text).map_err(|e| ApiError::from(anyhow::Error::from(e)))?;
                Ok(deployment.state().cloned())
            }
        };
        let from = load(from_id).await?.ok_or(ApiError::NotFound("deployment"))?;
        let to = load(to_id).await?.ok_or(ApiError::NotFound("deployment"))?;
        if from.application_id != to.application_id {
            return Err(ApiError::invalid("toDeploymentId", "must be a deployment of the same application"));
        }
        use zpanel_domain::changes::Describe as _;
        let changes = zpanel_domain::changes::diff(&from.release.describe(), &to.release.describe());
        let commit_range = match (&from.commit, &to.commit) {
            (Some(a), Some(b)) if a != b => Some(format!("{a}..{b}")),
            _ => None,
        };
        Ok(ReleaseDiff {
            from_deployment_id,
            to_deployment_id,
            from_commit: from.commit,
            to_commit: to.commit,
            commit_range,
            from_image: from.image,
            to_image: to.image,
            changes: changes.into_iter().map(Change::from).collect(),
        })
    }
}

/// What changed between two releases of an application.
#[derive(Clone, Debug, SimpleObject)]
pub struct ReleaseDiff {
    /// The earlier release's deployment.
    pub from_deployment_id: ID,
    /// The later release's deployment.
    pub to_deployment_id: ID,
    /// The commit the earlier release was built from (none for an image).
    pub from_commit: Option<String>,
    /// The commit the later release was built from.
    pub to_commit: Option<String>,
    /// `from..to`, for `git log`, when both are commits and differ.
    pub commit_range: Option<String>,
    /// The earlier release's image id.
    pub from_image: Option<String>,
    /// The later release's image id.
    pub to_image: Option<String>,
    /// Every configuration field that differs, before and after.
    pub changes: Vec<Change>,
}
