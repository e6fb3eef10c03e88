//! The HTTP surface: `/graphql` (POST for queries and mutations; GET for GraphiQL in a browser
//! or a `graphql-transport-ws` WebSocket), `/graphql/schema.graphql`, `/healthz`, `/readyz`,
//! `/metrics`, and git hosts' push webhooks, `/webhooks/{provider}/{applicationId}`.

use crate::ApiState;
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::schema::{self, Suggestions, ZpanelSchema};
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, GraphiQLSource};
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType};
use async_graphql_axum::{GraphQLProtocol, GraphQLResponse, GraphQLWebSocket};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use std::time::Instant;
use zpanel_commands::Cursor;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Read and write buffer of a WebSocket (each grows while a large message passes).
pub const WS_BUFFER: usize = 4 * 1024;
/// `/readyz` fails when the read models are more than this many events behind the log.
pub const READY_LAG: i64 = 10_000;

#[derive(Clone)]
#[allow(missing_debug_implementations)]
struct Schemas {
    state: ApiState,
    /// For authenticated requests.
    open: ZpanelSchema,
    /// For anonymous ones: no field suggestions.
    closed: ZpanelSchema,
    /// For WebSocket sessions: `open`, with the live audit stream shared.
    sessions: crate::hub::SharedExecutor,
}

/// The router over `state`.
pub fn router(state: ApiState) -> Router {
    let open = schema::build(state.clone(), Suggestions::On);
    let schemas = Schemas {
        sessions: crate::hub::SharedExecutor::new(open.clone(), state.subscription_buffer),
        open,
        closed: schema::build(state.clone(), Suggestions::Off),
        state,
    };
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/schema.graphql", get(sdl))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/webhooks/{provider}/{application}", post(webhook))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(schemas)
}

/// Serves `router` on `listener` until `shutdown`; open requests finish first.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Each response and subscription message leaves at once: without TCP_NODELAY, a small
    // message written while the previous one is unacknowledged waits for that acknowledgement,
    // which the client may delay by up to 40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// The caller named by an `Authorization` header, if any and valid; a lookup made while the
/// read models stood at `version` is reused.
async fn caller_of(
    state: &ApiState,
    headers: &HeaderMap,
    version: Option<&crate::cache::Version>,
) -> Result<Option<Caller>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let Some(token) = value.to_str().ok().and_then(auth::bearer) else { return Ok(None) };
    let Some(version) = version else {
        return match auth::authenticate(&state.pool, token).await {
            Ok(caller) => Ok(Some(caller)),
            Err(ApiError::Unauthenticated) => Ok(None),
            Err(e) => Err(e),
        };
    };
    if !zpanel_commands::tokens::looks_like_token(token) {
        return Ok(None);
    }
    let hash = zpanel_commands::tokens::hash(token);
    if let Some(caller) = state.cache.caller(version, &hash) {
        return Ok(Some(caller));
    }
    let caller = auth::lookup(&state.pool, &hash).await?;
    if let Some(caller) = &caller {
        state.cache.keep_caller(version, &hash, caller);
    }
    Ok(caller)
}

fn error_response(error: ApiError) -> GraphQLResponse {
    let error: async_graphql::Error = error.into();
    async_graphql::Response::from_errors(vec![error.into_server_error(async_graphql::Pos::default())]).into()
}

/// A query or mutation. The body is read through axum's `Bytes`, so [`MAX_BODY`] applies
/// (`413` beyond it); one operation per request — a batch (a JSON array) is refused.
async fn graphql_post(State(schemas): State<Schemas>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let state = &schemas.state;
    // Where the read models stand now; without it (the database failing) nothing is reused.
    let version = state.cache.version(&state.pool).await.ok();
    let caller = match caller_of(state, &headers, version.as_ref()).await {
        Ok(caller) => caller,
        Err(e) => return error_response(e).into_response(),
    };
    if let Some(caller) = &caller
        && let Err(wait) = state.rate.take(caller.token_id)
    {
        state.metrics.request("other", "rate_limited", started.elapsed());
        let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        return error_response(ApiError::RateLimited { retry_after_ms }).into_response();
    }
    // The same request by the same token while the read models stand still: the answer kept
    // then (only queries of the read models that passed every check are kept).
    if let (Some(caller), Some(version)) = (&caller, &version)
        && let Some(answer) = state.cache.answer(version, caller.token_id, &body)
    {
        state.metrics.request("query", "ok", started.elapsed());
        return ([(header::CONTENT_TYPE, answer.content_type)], answer.body).into_response();
    }
    let mut request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let rule = if body.first() == Some(&b'[') {
                "batched operations are not accepted; send one operation per request".to_owned()
            } else {
                format!("is not a GraphQL request: {e}")
            };
            return error_response(ApiError::invalid("body", rule)).into_response();
        }
    };
    // Parsed once, here: the alias count, the metrics label and the cache read the document,
    // and the schema executes the same parsed document.
    let operation_name = request.operation_name.clone();
    let (kind, aliases, cacheable) = match request.parsed_query() {
        Ok(document) => (
            operation_kind(document, operation_name.as_deref()),
            crate::limits::aliases(document),
            crate::cache::cacheable(document, operation_name.as_deref()),
        ),
        // The schema reports the syntax error.
        Err(_) => ("other", 0, false),
    };
    if aliases > crate::limits::MAX_ALIASES {
        let rule = format!("uses {aliases} aliases; at most {} are allowed", crate::limits::MAX_ALIASES);
        return error_response(ApiError::invalid("query", rule)).into_response();
    }
    let reuse = match (&caller, version) {
        (Some(caller), Some(version)) if cacheable => Some((caller.token_id, version)),
        _ => None,
    };
    let schema = if caller.is_some() { &schemas.open } else { &schemas.closed };
    if let Some(caller) = caller {
        request = request.data(caller);
    }
    let response = schema.execute(request).await;
    let ok = response.errors.is_empty();
    state.metrics.request(kind, if ok { "ok" } else { "error" }, started.elapsed());
    let response = GraphQLResponse::from(response).into_response();
    match reuse {
        Some((token, version)) if ok => keep(state, &version, token, body, response).await,
        _ => response,
    }
}

/// Keeps a successful answer for reuse (see [`crate::cache`]) and sends it.
async fn keep(
    state: &ApiState,
    version: &crate::cache::Version,
    token: uuid::Uuid,
    request: Bytes,
    response: Response,
) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    // An answer with headers of its own (cache control, …) is sent but not kept.
    if parts.status == StatusCode::OK
        && parts.headers.len() == 1
        && let Some(content_type) = parts.headers.get(header::CONTENT_TYPE)
    {
        state.cache.keep_answer(version, token, request, content_type.clone(), bytes.clone());
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// `query`, `mutation`, `subscription` or `other` (an unknown operation name), for metrics.
fn operation_kind(document: &ExecutableDocument, name: Option<&str>) -> &'static str {
    let operation = match (&document.operations, name) {
        (DocumentOperations::Single(op), _) => Some(op),
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name),
        (DocumentOperations::Multiple(ops), None) => ops.values().next(),
    };
    match operation.map(|op| op.node.ty) {
        Some(OperationType::Query) => "query",
        Some(OperationType::Mutation) => "mutation",
        Some(OperationType::Subscription) => "subscription",
        None => "other",
    }
}

/// GraphiQL for a browser; a `graphql-transport-ws` session for a WebSocket upgrade. The
/// WebSocket client sends its token in `connection_init`: `{"authorization": "Bearer zp_…"}`.
async fn graphql_get(State(schemas): State<Schemas>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !upgrade {
        return Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish())
            .into_response();
    }
    let transport_ws = negotiates_graphql_transport_ws(&parts.headers);
    let protocol = match GraphQLProtocol::from_request_parts(&mut parts, &schemas).await {
        Ok(protocol) => protocol,
        Err(rejection) => return rejection.into_response(),
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &schemas).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let state = schemas.state.clone();
    let schema = schemas.sessions.clone();
    // Small buffers: a subscriber mostly waits. The defaults (128 KiB to read, as much to
    // write) would make each open subscription cost a quarter of a megabyte.
    upgrade
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_message_size(MAX_BODY)
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| async move {
            if transport_ws {
                return crate::session::serve(socket, schema, state).await;
            }
            // The older `subscriptions-transport-ws` protocol (`graphql-ws`).
            GraphQLWebSocket::new(socket, schema, protocol)
                .on_connection_init(move |payload| async move {
                    let caller = auth::connection_init(&state.pool, &payload).await?;
                    let mut data = async_graphql::Data::default();
                    data.insert(caller);
                    Ok(data)
                })
                .serve()
                .await;
        })
        .into_response()
}

/// Whether the first protocol the client offers that Zpanel speaks is `graphql-transport-ws`
/// (else it is the older `graphql-ws`), as async-graphql picks it.
fn negotiates_graphql_transport_ws(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .find(|protocol| {
            protocol.eq_ignore_ascii_case("graphql-transport-ws") || protocol.eq_ignore_ascii_case("graphql-ws")
        })
        .is_some_and(|protocol| protocol.eq_ignore_ascii_case("graphql-transport-ws"))
}

/// A git host's push webhook (see [`crate::webhooks`]). The body is read through `Bytes`, so
/// [`MAX_BODY`] applies (`413` beyond it).
async fn webhook(
    State(schemas): State<Schemas>,
    Path((provider, application)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    crate::webhooks::receive(&schemas.state, &provider, &application, &headers, &body).await
}

async fn sdl() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], schema::sdl())
}

/// Ready: the database answers and the read models are close to the head of the log.
async fn ready(State(schemas): State<Schemas>) -> Response {
    let state = &schemas.state;
    let horizon = match state.feed.read_horizon().await {
        Ok(h) => h,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e:#}\n")).into_response(),
    };
    match behind(state, horizon).await {
        Ok(n) if n > READY_LAG => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("read models are {n}+ events behind the log\n")).into_response()
        }
        Ok(n) => (StatusCode::OK, format!("ready; read models {n} events behind\n")).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e:#}\n")).into_response(),
    }
}

/// How many events follow `cursor` in the log (counting at most one past [`READY_LAG`]).
async fn behind(state: &ApiState, cursor: Cursor) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "select count(*) from (select 1 from events where (tx_id, global_position) > ($1::text::xid8, $2) limit $3) t",
    )
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .bind(READY_LAG + 1)
    .fetch_one(&state.pool)
    .await
}

async fn metrics(State(schemas): State<Schemas>) -> Response {
    let state = &schemas.state;
    let mut extra = String::new();
    extra.push_str(
        "# HELP zpanel_projection_lag_seconds Age of the oldest event a projection has not applied (0: caught up).\n",
    );
    extra.push_str("# TYPE zpanel_projection_lag_seconds gauge\n");
    let mut readers = String::from(
        "# HELP zpanel_relay_lag_seconds Age of the oldest event the relay has not had acknowledged (0: caught up).\n\
         # TYPE zpanel_relay_lag_seconds gauge\n\
         # HELP zpanel_worker_lag_seconds Age of the oldest event an in-process worker has not handled (0: caught up).\n\
         # TYPE zpanel_worker_lag_seconds gauge\n",
    );
    let lags = sqlx::query_as::<_, (String, f64)>(
        "select c.name, coalesce(extract(epoch from now() - (
                select e.recorded_at from events e
                 where (e.tx_id, e.global_position) > (c.tx_id, c.position)
                 order by e.tx_id, e.global_position limit 1))::float8, 0)
           from checkpoints c order by c.name",
    )
    .fetch_all(&state.pool)
    .await;
    match lags {
        Ok(lags) => {
            for (name, lag) in lags {
                if let Some(topic) = name.strip_prefix("relay:") {
                    readers.push_str(&format!("zpanel_relay_lag_seconds{{topic=\"{topic}\"}} {lag}\n"));
                } else if let Some(worker) = name.strip_prefix("worker:") {
                    readers.push_str(&format!("zpanel_worker_lag_seconds{{worker=\"{worker}\"}} {lag}\n"));
                } else {
                    extra.push_str(&format!("zpanel_projection_lag_seconds{{projection=\"{name}\"}} {lag}\n"));
                }
            }
            extra.push_str(&readers);
        }
        Err(e) => tracing::warn!(error = %e, "reading projection lag for /metrics"),
    }
    extra.push_str("# HELP zpanel_subscribers Open subscriptions.\n# TYPE zpanel_subscribers gauge\n");
    extra.push_str(&format!("zpanel_subscribers {}\n", state.feed.subscribers()));
    extra.push_str(
        "# HELP zpanel_shared_subscription_executions Executions of `events` subscriptions shared by their subscribers.\n\
         # TYPE zpanel_shared_subscription_executions gauge\n",
    );
    extra.push_str(&format!("zpanel_shared_subscription_executions {}\n", schemas.sessions.shared()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&extra)).into_response()
}
