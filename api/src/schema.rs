//! The GraphQL schema: [`query`] reads the read models, [`mutation`] sends commands and answers
//! once the read models show their effect, [`subscription`] follows the feed.

pub(crate) mod load;
pub mod mutation;
pub mod query;
pub mod subscription;
pub mod types;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use async_graphql::{Context, Schema};

/// The schema type.
pub type ZpanelSchema = Schema<query::Query, mutation::Mutation, subscription::Subscription>;

/// Deepest selection accepted.
pub const MAX_DEPTH: usize = 12;
/// Most costly operation accepted: each field costs one, and a paged list costs its `first` (or
/// its default page) times its selection ([`list_cost`]). One deployment's log of 1000 lines
/// with every field costs about 5000; the logs of 100 deployments cost a hundred times that.
pub const MAX_COMPLEXITY: usize = 20_000;

/// The cost of a paged list field: itself, and `first` (or `default`) items of its selection.
/// Counted before execution, so a request that would build a huge answer never runs.
pub(crate) fn list_cost(first: Option<i32>, default: usize, child_complexity: usize) -> usize {
    let items = first.map_or(default, |n| usize::try_from(n).unwrap_or(0));
    items.saturating_mul(child_complexity).saturating_add(1)
}

/// Whether unknown names get "did you mean …?" hints: only for authenticated requests, so the
/// schema is not guessed field by field by strangers (introspection itself stays open: this is
/// self-hosted software whose schema is public).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suggestions {
    /// Hints on.
    On,
    /// Hints off.
    Off,
}

/// Builds the schema over `state`.
#[must_use]
pub fn build(state: ApiState, suggestions: Suggestions) -> ZpanelSchema {
    let builder = Schema::build(query::Query, mutation::Mutation, subscription::Subscription)
        .data(state)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY);
    let builder = if suggestions == Suggestions::Off { builder.disable_suggestions() } else { builder };
    builder.finish()
}

/// The schema's SDL, as served at `/graphql/schema.graphql` and checked into the repository.
#[must_use]
pub fn sdl() -> String {
    Schema::build(query::Query, mutation::Mutation, subscription::Subscription).finish().sdl()
}

/// The shared state and the authenticated caller of a request.
///
/// # Errors
/// `UNAUTHENTICATED` without a valid token.
pub(crate) fn caller<'c>(ctx: &'c Context<'_>) -> ApiResult<(&'c ApiState, &'c Caller)> {
    let state = ctx.data::<ApiState>().map_err(|_| anyhow::anyhow!("the schema has no state"))?;
    let caller = ctx.data_opt::<Caller>().ok_or(ApiError::Unauthenticated)?;
    Ok((state, caller))
}

/// Parses an id argument; a malformed id is simply not found (ids are opaque).
pub(crate) fn parse_id(id: &async_graphql::ID, what: &'static str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::parse_str(id.as_str()).map_err(|_| ApiError::NotFound(what))
}

/// Page size: `first`, default 50, at most 100.
pub(crate) fn page_size(first: Option<i32>) -> ApiResult<usize> {
    match first {
        None => Ok(50),
        Some(n) if (0..=100).contains(&n) => Ok(usize::try_from(n).unwrap_or(0)),
        Some(_) => Err(ApiError::invalid("first", "must be between 0 and 100")),
    }
}

/// A cursor: the opaque form of a sort key.
pub(crate) fn encode_cursor(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

/// The sort key in a cursor.
pub(crate) fn decode_cursor(cursor: &str) -> ApiResult<String> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::invalid("after", "is not a cursor this API returned"))
}
