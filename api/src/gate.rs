//! The one gate every GraphQL operation passes, whichever transport brings it — a `POST
//! /graphql`, or a `subscribe` on a WebSocket ([`crate::session`]): the token as it stands now
//! (revoked, expired: [`crate::auth::lookup`] decides, and whatever else comes to decide whether a
//! token works belongs there), its rate budget, the alias cap. The schema then enforces depth
//! and cost, and an answer leaves only within the operator's size cap.

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use async_graphql::parser::types::ExecutableDocument;
use async_graphql::{Response, ServerError};
use std::sync::Arc;

/// The caller whose token hashes to `hash`, as the token stands now: `None` when it no longer
/// works. A lookup made while the read models stood where they stand now is reused, as a
/// query's answer is ([`crate::cache`]); any change to the token moves them.
///
/// # Errors
/// When the database fails.
pub(crate) async fn current_caller(state: &ApiState, hash: &str) -> ApiResult<Option<Caller>> {
    let version = state.cache.version(&state.pool).await.ok();
    caller_at(state, hash, version.as_ref()).await
}

/// [`current_caller`], with the read models read at `version` (`None`: not reused).
///
/// # Errors
/// When the database fails.
pub(crate) async fn caller_at(
    state: &ApiState,
    hash: &str,
    version: Option<&crate::cache::Version>,
) -> ApiResult<Option<Caller>> {
    let Some(version) = version else { return crate::auth::lookup(&state.pool, hash).await };
    if let Some(caller) = state.cache.caller(version, hash) {
        return Ok(Some(caller));
    }
    let caller = crate::auth::lookup(&state.pool, hash).await?;
    if let Some(caller) = &caller {
        state.cache.keep_caller(version, hash, caller);
    }
    Ok(caller)
}

/// Takes one operation from the caller's budget.
///
/// # Errors
/// `RATE_LIMITED`, saying when to retry, once it is spent.
pub(crate) fn spend(state: &ApiState, caller: &Caller) -> ApiResult<()> {
    state
        .rate
        .take(caller.token_id)
        .map_err(|wait| ApiError::RateLimited { retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX) })
}

/// What a document must hold to before it is executed, beyond what the schema checks.
///
/// # Errors
/// `INVALID_INPUT` naming `query` with too many aliases.
pub(crate) fn check_document(document: &ExecutableDocument) -> ApiResult<()> {
    let aliases = crate::limits::aliases(document);
    if aliases > crate::limits::MAX_ALIASES {
        let rule = format!("uses {aliases} aliases; at most {} are allowed", crate::limits::MAX_ALIASES);
        return Err(ApiError::invalid("query", rule));
    }
    Ok(())
}

/// Why an answer was not sent.
pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::LimitExceeded(format!(
        "the answer would be larger than {limit} bytes, the most allowed; ask for fewer items (`first`) or fewer fields"
    ))
}

/// `error` as a GraphQL error (without a location: it is about the whole request).
pub(crate) fn server_error(error: ApiError) -> ServerError {
    let mut error = async_graphql::Error::from(error).into_server_error(async_graphql::Pos::default());
    error.locations.clear();
    error
}

/// A response carrying `error` alone.
pub(crate) fn error_response(error: ApiError) -> Response {
    Response::from_errors(vec![server_error(error)])
}

/// [`error_response`] as JSON.
pub(crate) fn errors_json(error: ApiError) -> Arc<str> {
    let json = serde_json::to_string(&error_response(error));
    Arc::from(json.unwrap_or_else(|_| r#"{"errors":[{"message":"internal error"}]}"#.to_owned()))
}

/// Whether `response` ends its operation because the token stopped working.
pub(crate) fn says_unauthenticated(response: &Response) -> bool {
    response.errors.iter().any(|e| {
        e.extensions.as_ref().and_then(|x| x.get("code")).is_some_and(
            |code| matches!(code, async_graphql::Value::String(code) if code == ApiError::Unauthenticated.code()),
        )
    })
}

/// The schema's own words for a document over its cost or depth limit.
const TOO_COMPLEX: &str = "Query is too complex.";
const TOO_DEEP: &str = "Query is nested too deep.";

/// Gives the schema's refusals of a document over its limits the API's shape: `INVALID_INPUT`
/// naming `query`, with the rule that was broken.
pub(crate) fn explain(response: &mut Response) {
    for error in &mut response.errors {
        let rule = match error.message.as_str() {
            TOO_COMPLEX => format!(
                "costs more than {}, the most allowed: each field costs 1, and a list costs its `first` \
                 (or its default page) times its selection; ask for fewer items or fewer fields",
                crate::schema::MAX_COMPLEXITY
            ),
            TOO_DEEP => format!("is nested too deep: at most {} levels", crate::schema::MAX_DEPTH),
            _ => continue,
        };
        let explained = server_error(ApiError::invalid("query", rule));
        error.message = explained.message;
        error.extensions = explained.extensions;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schemas_refusals_name_the_query_and_the_rule() {
        let mut response = Response::from_errors(vec![
            ServerError::new(TOO_COMPLEX, None),
            ServerError::new(TOO_DEEP, None),
            ServerError::new("something else", None),
        ]);
        explain(&mut response);
        let json = serde_json::to_value(&response).expect("json");
        assert_eq!(json["errors"][0]["extensions"]["code"], "INVALID_INPUT");
        assert_eq!(json["errors"][0]["extensions"]["field"], "query");
        assert!(json["errors"][0]["message"].as_str().is_some_and(|m| m.starts_with("query: costs more than")));
        assert!(json["errors"][1]["message"].as_str().is_some_and(|m| m.contains("nested too deep")));
        assert_eq!(json["errors"][2]["message"], "something else");
    }

    #[test]
    fn an_unauthenticated_end_is_recognised() {
        assert!(says_unauthenticated(&error_response(ApiError::Unauthenticated)));
        assert!(!says_unauthenticated(&error_response(ApiError::NotFound("application"))));
        assert!(!says_unauthenticated(&Response::new(async_graphql::Value::Null)));
    }
}
