//! Zpanel's public interface: the GraphQL API (async-graphql on axum) that every client uses.
//!
//! - [`schema`]: queries over the read models, mutations that send commands, subscriptions.
//! - [`auth`]: API tokens resolved to a team and abilities; every resolver is team-scoped.
//! - [`feed`]: the horizon every read model has reached, and the fan-out of new audit entries
//!   to subscribers.
//! - [`hub`]: one execution of the live audit stream per distinct subscription, shared by
//!   every WebSocket subscriber of it.
//! - [`session`]: the GraphQL WebSocket protocols (`graphql-transport-ws`, and the older
//!   `graphql-ws`), sending shared responses as written.
//! - `gate`: what every operation passes on either transport — the token as it stands now,
//!   its rate budget, the alias cap — and the shape of the schema's refusals.
//! - [`http`]: the routes — `/graphql` (POST, GraphiQL, WebSocket), the SDL, health, webhooks;
//!   and `/metrics`, on a router of its own for the operator's listener.
//! - [`webhooks`]: git hosts' push webhooks — signature checks, payload parsing, and the
//!   deployment a push to an application's branch queues.
//! - [`logs`]: deployments' logs, read from their table and followed live through one
//!   `LISTEN` per process; containers' logs, from a [`logs::ContainerLogs`] source.
//! - [`error`]: the one error type, with stable `extensions.code`s.
//! - [`limits`]: abuse limits — aliases, per-token rate, answer size, open subscriptions.
//! - [`tenancy`]: the control plane's reserved host names, and each team's budget of server
//!   validations.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cache;
pub mod error;
pub mod feed;
mod gate;
pub mod http;
pub mod hub;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod schema;
pub mod session;
pub mod tenancy;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;
use zpanel_commands::{CommandHandler, Cursor, Keyring, PgEventStore};

pub use http::{Routers, routers, serve};

/// How long a mutation waits for the read models to show its effect before answering.
pub const READ_YOUR_WRITES: Duration = Duration::from_secs(10);

/// What every request handler shares.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The read models and the log.
    pub pool: sqlx::PgPool,
    /// Sends commands.
    pub handler: CommandHandler<PgEventStore>,
    /// Seals and opens secrets.
    pub keyring: Arc<Keyring>,
    /// The horizon, and new audit entries for subscribers.
    pub feed: feed::Feed,
    /// Per-token request budgets.
    pub rate: Arc<limits::RateLimiter>,
    /// What one request, token or socket may cost.
    pub limits: limits::Limits,
    /// Open subscriptions per token.
    pub subscriptions: Arc<limits::Subscriptions>,
    /// Request counters and latencies.
    pub metrics: Arc<metrics::Metrics>,
    /// Shared re-checks of subscriptions' tokens.
    pub token_checks: Arc<auth::TokenChecks>,
    /// Answers of read-model queries and token lookups, while the read models stay put.
    pub cache: Arc<cache::QueryCache>,
    /// Wake-ups for the followers of deployments' logs.
    pub logs: logs::LogNotifier,
    /// Where containers' logs come from; `None` in a process that cannot reach the engines
    /// (then `containerLogs` says so).
    pub container_logs: Option<Arc<dyn logs::ContainerLogs>>,
    /// Responses of a shared `events` subscription buffered for its slowest subscriber
    /// ([`hub`]).
    pub subscription_buffer: usize,
    /// Where applications may be built from local repositories (`ZPANEL_GIT_LOCAL_ROOTS`).
    pub git_local_roots: Arc<zpanel_domain::values::GitLocalRoots>,
    /// The rules of a shared installation: reserved host names, validation budgets.
    pub tenancy: Arc<tenancy::Tenancy>,
}

impl ApiState {
    /// Waits until every read model shows the log up to `cursor`.
    ///
    /// # Errors
    /// When they don't within [`READ_YOUR_WRITES`].
    pub async fn visible(&self, cursor: Cursor) -> error::ApiResult<()> {
        self.feed.wait_for(cursor, READ_YOUR_WRITES).await.map_err(error::ApiError::from)
    }
}
