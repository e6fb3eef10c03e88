//! The HTTP surface: `/graphql` (POST for queries and mutations; GET for GraphiQL in a browser
//! or a GraphQL WebSocket), `/graphql/schema.graphql`, `/healthz`, `/readyz`, and git hosts'
//! push webhooks, `/webhooks/{provider}/{applicationId}`. `/metrics` is served apart, on the
//! operator's own listener ([`Routers::metrics`]): its counters describe every team's traffic.

use crate::ApiState;
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::schema::{self, Suggestions, ZpanelSchema};
use crate::session::Dialect;
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, GraphiQLSource};
use async_graphql::parser::types::{ExecutableDocument, OperationType};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
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

/// The routers of one API process.
#[allow(missing_debug_implementations)]
pub struct Routers {
    /// The API, for clients.
    pub api: Router,
    /// `/metrics`, for the operator's listener only.
    pub metrics: Router,
}

/// The routers over `state`.
pub fn routers(state: ApiState) -> Routers {
    let open = schema::build(state.clone(), Suggestions::On);
    let schemas = Schemas {
        sessions: crate::hub::SharedExecutor::new(open.clone(), state.subscription_buffer),
        open,
        closed: schema::build(state.clone(), Suggestions::Off),
        state,
    };
    let api = Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/schema.graphql", get(sdl))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/webhooks/{provider}/{application}", post(webhook))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(schemas.clone());
    let metrics =
        Router::new().route("/metrics", get(metrics)).route("/healthz", get(|| async { "ok\n" })).with_state(schemas);
    Routers { api, metrics }
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
    if !zpanel_commands::tokens::looks_like_token(token) {
        return Ok(None);
    }
    crate::gate::caller_at(state, &zpanel_commands::tokens::hash(token), version).await
}

/// The media types a GraphQL answer can be sent as.
const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";
const JSON: &str = "application/json";

/// The media type to answer in, as GraphQL over HTTP has the server negotiate it from the
/// request's `Accept`: the one the client prefers (`q`), an exact mention before a wildcard,
/// then the first listed; `application/json` when nothing tells them apart (or there is no
/// `Accept` at all: older clients send none and read only it). `None` when the client accepts
/// neither (`406`).
fn media_type(headers: &HeaderMap) -> Option<&'static str> {
    let accept: Vec<&str> = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    if accept.is_empty() {
        return Some(JSON);
    }
    // Each range: its type and subtype, its weight, where it was listed.
    let ranges: Vec<(String, String, f32, usize)> = accept
        .iter()
        .flat_map(|value| value.split(','))
        .enumerate()
        .filter_map(|(position, range)| {
            let mut parts = range.split(';');
            let (kind, subtype) = parts.next()?.trim().split_once('/')?;
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            Some((kind.trim().to_ascii_lowercase(), subtype.trim().to_ascii_lowercase(), q, position))
        })
        .collect();
    // For each type served: the weight of the most specific range that names it.
    let score = |served: &'static str| {
        let (kind, subtype) = served.split_once('/')?;
        ranges
            .iter()
            .filter_map(|(k, s, q, position)| {
                let specificity = match (k.as_str(), s.as_str()) {
                    (k, s) if k == kind && s == subtype => 2,
                    (k, "*") if k == kind => 1,
                    ("*", "*") => 0,
                    _ => return None,
                };
                Some((specificity, *q, *position))
            })
            .max_by_key(|(specificity, _, _)| *specificity)
            .filter(|(_, q, _)| *q > 0.0)
    };
    let mut best: Option<(&'static str, (u8, f32, usize))> = None;
    for served in [JSON, GRAPHQL_RESPONSE_JSON] {
        let Some(found) = score(served) else { continue };
        let better = best.is_none_or(|(_, (specificity, q, position))| {
            found.1 > q || (found.1 == q && (found.0 > specificity || (found.0 == specificity && found.2 < position)))
        });
        if better {
            best = Some((served, found));
        }
    }
    best.map(|(served, _)| served)
}

/// `response` as an HTTP answer in `media_type`, unless it is larger than `max` bytes (then an
/// error saying so); and whether it is a success.
fn respond(response: &async_graphql::Response, media_type: &'static str, max: usize) -> (Response, bool) {
    let (body, ok) = match crate::limits::to_json_within(response, max) {
        Ok(body) => (body, response.errors.is_empty()),
        Err(_) => (crate::gate::errors_json(crate::gate::too_large(max)).as_bytes().to_vec(), false),
    };
    let mut answer = ([(header::CONTENT_TYPE, media_type)], body).into_response();
    let headers = answer.headers_mut();
    if ok && let Some(value) = response.cache_control.value().and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(header::CACHE_CONTROL, value);
    }
    for (name, value) in &response.http_headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_str().as_bytes()), HeaderValue::from_bytes(value.as_bytes()))
        {
            headers.append(name, value);
        }
    }
    (answer, ok)
}

fn error_response(error: ApiError, media_type: &'static str) -> Response {
    respond(&crate::gate::error_response(error), media_type, usize::MAX).0
}

/// A query or mutation. The body is read through axum's `Bytes`, so [`MAX_BODY`] applies
/// (`413` beyond it); one operation per request — a batch (a JSON array) is refused.
async fn graphql_post(State(schemas): State<Schemas>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let state = &schemas.state;
    let Some(media_type) = media_type(&headers) else {
        let accepted = format!("accept {JSON} or {GRAPHQL_RESPONSE_JSON}\n");
        return (StatusCode::NOT_ACCEPTABLE, accepted).into_response();
    };
    // Where the read models stand now; without it (the database failing) nothing is reused.
    let version = state.cache.version(&state.pool).await.ok();
    let caller = match caller_of(state, &headers, version.as_ref()).await {
        Ok(caller) => caller,
        Err(e) => return error_response(e, media_type),
    };
    if let Some(caller) = &caller
        && let Err(e) = crate::gate::spend(state, caller)
    {
        state.metrics.request("other", "rate_limited", started.elapsed());
        return error_response(e, media_type);
    }
    // The same request by the same token while the read models stand still: the answer kept
    // then (only queries of the read models that passed every check are kept).
    if let (Some(caller), Some(version)) = (&caller, &version)
        && let Some(answer) = state.cache.answer(version, caller.token_id, &body)
    {
        state.metrics.request("query", "ok", started.elapsed());
        return ([(header::CONTENT_TYPE, media_type)], answer.body).into_response();
    }
    let mut request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let rule = if body.first() == Some(&b'[') {
                "batched operations are not accepted; send one operation per request".to_owned()
            } else {
                format!("is not a GraphQL request: {e}")
            };
            return error_response(ApiError::invalid("body", rule), media_type);
        }
    };
    // Parsed once, here: the gate, the metrics label and the cache read the document, and the
    // schema executes the same parsed document.
    let operation_name = request.operation_name.clone();
    let (kind, checked, cacheable) = match request.parsed_query() {
        Ok(document) => (
            operation_kind(document, operation_name.as_deref()),
            crate::gate::check_document(document),
            crate::cache::cacheable(document, operation_name.as_deref()),
        ),
        // The schema reports the syntax error.
        Err(_) => ("other", Ok(()), false),
    };
    if let Err(e) = checked {
        return error_response(e, media_type);
    }
    let reuse = match (&caller, version) {
        (Some(caller), Some(version)) if cacheable => Some((caller.token_id, version)),
        _ => None,
    };
    let schema = if caller.is_some() { &schemas.open } else { &schemas.closed };
    if let Some(caller) = caller {
        request = request.data(caller);
    }
    let mut response = schema.execute(request).await;
    crate::gate::explain(&mut response);
    let (answer, ok) = respond(&response, media_type, state.limits.response_bytes);
    state.metrics.request(kind, if ok { "ok" } else { "error" }, started.elapsed());
    match reuse {
        Some((token, version)) if ok => keep(state, &version, token, body, answer).await,
        _ => answer,
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
    if parts.status == StatusCode::OK && parts.headers.len() == 1 && parts.headers.contains_key(header::CONTENT_TYPE) {
        state.cache.keep_answer(version, token, request, bytes.clone());
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// `query`, `mutation`, `subscription` or `other` (an unknown operation name), for metrics.
fn operation_kind(document: &ExecutableDocument, name: Option<&str>) -> &'static str {
    match crate::limits::operation(document, name).map(|op| op.node.ty) {
        Some(OperationType::Query) => "query",
        Some(OperationType::Mutation) => "mutation",
        Some(OperationType::Subscription) => "subscription",
        None => "other",
    }
}

/// GraphiQL for a browser; a GraphQL WebSocket session for a WebSocket upgrade, in the
/// protocol the client offers first (`graphql-transport-ws`, or the older `graphql-ws`). The
/// client sends its token in `connection_init`: `{"authorization": "Bearer zp_…"}`.
async fn graphql_get(State(schemas): State<Schemas>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !upgrade {
        return Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish())
            .into_response();
    }
    let offered = parts.headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok());
    let Some(dialect) = Dialect::negotiate(offered) else {
        let supported = format!("offer one of the protocols {}\n", ALL_WEBSOCKET_PROTOCOLS.join(", "));
        return (StatusCode::BAD_REQUEST, supported).into_response();
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &schemas).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let state = schemas.state.clone();
    let executor = schemas.sessions.clone();
    // Small buffers: a subscriber mostly waits. The defaults (128 KiB to read, as much to
    // write) would make each open subscription cost a quarter of a megabyte.
    upgrade
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_message_size(MAX_BODY)
        .protocols([dialect.protocol()])
        .on_upgrade(move |socket| crate::session::serve(socket, dialect, executor, state))
        .into_response()
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

/// Ready: the database answers and the read models are close to the head of the log. What
/// failed is logged, not shown: the database's own words can name hosts, users and schemas.
async fn ready(State(schemas): State<Schemas>) -> Response {
    let state = &schemas.state;
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "/readyz: the database does not answer");
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
    };
    let horizon = match state.feed.read_horizon().await {
        Ok(h) => h,
        Err(e) => return unavailable(&format!("{e:#}")),
    };
    match behind(state, horizon).await {
        Ok(n) if n > READY_LAG => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("read models are {n}+ events behind the log\n")).into_response()
        }
        Ok(n) => (StatusCode::OK, format!("ready; read models {n} events behind\n")).into_response(),
        Err(e) => unavailable(&e),
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

#[cfg(test)]
mod tests {
    use super::{GRAPHQL_RESPONSE_JSON, JSON, media_type};
    use axum::http::{HeaderMap, HeaderValue, header};

    fn negotiated(accept: Option<&str>) -> Option<&'static str> {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept {
            headers.insert(header::ACCEPT, HeaderValue::from_str(accept).expect("a header"));
        }
        media_type(&headers)
    }

    #[test]
    fn the_answer_comes_in_the_media_type_the_client_accepts() {
        assert_eq!(negotiated(None), Some(JSON), "older clients send no Accept");
        assert_eq!(negotiated(Some("application/json")), Some(JSON));
        assert_eq!(negotiated(Some("application/graphql-response+json")), Some(GRAPHQL_RESPONSE_JSON));
        assert_eq!(
            negotiated(Some("application/graphql-response+json, application/json")),
            Some(GRAPHQL_RESPONSE_JSON)
        );
        assert_eq!(negotiated(Some("application/json, application/graphql-response+json")), Some(JSON));
        assert_eq!(
            negotiated(Some("application/json;q=0.9, application/graphql-response+json")),
            Some(GRAPHQL_RESPONSE_JSON)
        );
        assert_eq!(negotiated(Some("application/graphql-response+json;q=0, */*")), Some(JSON));
        assert_eq!(negotiated(Some("*/*")), Some(JSON));
        assert_eq!(negotiated(Some("application/*")), Some(JSON));
        assert_eq!(negotiated(Some("text/html, */*;q=0.1")), Some(JSON));
        assert_eq!(negotiated(Some("application/graphql-response+json, */*;q=0.5")), Some(GRAPHQL_RESPONSE_JSON));
        assert_eq!(negotiated(Some("Application/JSON; charset=utf-8")), Some(JSON));
        assert_eq!(negotiated(Some("text/html")), None);
        assert_eq!(negotiated(Some("application/json;q=0")), None);
    }
}
