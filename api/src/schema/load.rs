//! One object of the read models by id, within a team: what `project(id)` and friends answer,
//! and what mutations return once the read models show their effect.

use super::types::{ApiToken, Application, DEPLOYMENT_COLUMNS, Deployment, PrivateKey, Project, Server};
use crate::ApiState;
use crate::auth::Caller;
use crate::error::ApiResult;
use sqlx::postgres::PgRow;
use std::sync::Arc;
use uuid::Uuid;

/// The row `sql` selects with `$1` the caller's team and `$2` the id, as a `T`.
async fn one<T>(
    state: &ApiState,
    caller: &Caller,
    sql: &str,
    id: Uuid,
    from_row: impl FnOnce(&PgRow) -> ApiResult<T>,
) -> ApiResult<Option<T>> {
    let row = sqlx::query(sql).bind(caller.team_id.as_uuid()).bind(id).fetch_optional(&state.pool).await?;
    row.as_ref().map(from_row).transpose()
}

/// The rows `sql` selects with `$1` the caller's team, as `T`s.
pub(crate) async fn list<T>(
    state: &ApiState,
    caller: &Caller,
    sql: &str,
    from_row: impl Fn(&PgRow) -> ApiResult<T>,
) -> ApiResult<Vec<T>> {
    let rows = sqlx::query(sql).bind(caller.team_id.as_uuid()).fetch_all(&state.pool).await?;
    rows.iter().map(from_row).collect()
}

pub(crate) async fn project(state: &ApiState, caller: &Caller, id: Uuid) -> ApiResult<Option<Project>> {
    one(state, caller, "select * from rm_projects where team_id = $1 and project_id = $2", id, Project::from_row).await
}

pub(crate) async fn application(state: &ApiState, caller: &Caller, id: Uuid) -> ApiResult<Option<Application>> {
    let reveal = caller.sees_secrets().then(|| Arc::clone(&state.keyring));
    let sql = "select application_id, state, version, updated_at from rm_applications
                where team_id = $1 and application_id = $2";
    one(state, caller, sql, id, |row| Application::from_row(row, reveal)).await
}

pub(crate) async fn deployment(state: &ApiState, caller: &Caller, id: Uuid) -> ApiResult<Option<Deployment>> {
    let sql = format!("select {DEPLOYMENT_COLUMNS} from rm_deployments where team_id = $1 and deployment_id = $2");
    one(state, caller, &sql, id, Deployment::from_row).await
}

pub(crate) async fn server(state: &ApiState, caller: &Caller, id: Uuid) -> ApiResult<Option<Server>> {
    one(state, caller, "select * from rm_servers where team_id = $1 and server_id = $2", id, Server::from_row).await
}

pub(crate) async fn private_key(state: &ApiState, caller: &Caller, id: Uuid) -> ApiResult<Option<PrivateKey>> {
    one(
        state,
        caller,
        "select * from rm_private_keys where team_id = $1 and private_key_id = $2",
        id,
        PrivateKey::from_row,
    )
    .await
}

pub(crate) async fn api_token(state: &ApiState, caller: &Caller, id: Uuid) -> ApiResult<Option<ApiToken>> {
    one(state, caller, "select * from rm_api_tokens where team_id = $1 and token_id = $2", id, ApiToken::from_row).await
}

/// Names in use among a team's rows of `table` (other than `except`), for uniqueness rules.
/// `sql` selects names with `$1` the scope (team or project) and `$2` the row to leave out.
pub(crate) async fn names_in_use(
    state: &ApiState,
    sql: &str,
    scope: Uuid,
    except: Option<Uuid>,
) -> ApiResult<std::collections::BTreeSet<zpanel_domain::values::Name>> {
    let names: Vec<String> = sqlx::query_scalar(sql).bind(scope).bind(except).fetch_all(&state.pool).await?;
    Ok(names.iter().filter_map(|n| zpanel_domain::values::Name::parse(n).ok()).collect())
}
