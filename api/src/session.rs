//! A GraphQL WebSocket session, run by Zpanel in either protocol clients speak:
//! `graphql-transport-ws` (the `graphql-ws` library's,
//! <https://github.com/enisdenjo/graphql-ws/blob/master/PROTOCOL.md>) and the older `graphql-ws`
//! (`subscriptions-transport-ws`'s). Zpanel runs it so that a response shared by many
//! subscribers ([`crate::hub`]) is written as JSON once and sent to each socket as it is, framed
//! with the subscriber's id — and so that every operation passes the same [`crate::gate`] as an
//! HTTP request.
//!
//! - `connection_init` carries the token (`{"authorization": "Bearer zp_…"}`) and must come
//!   within [`INIT_TIMEOUT`] (else close `4408`); a bad token closes with `4403` (the older
//!   protocol hears `connection_error` first), a second `connection_init` with `4429`.
//! - `subscribe` (`start`) before the acknowledgement closes with `4401`; an id already running
//!   closes with `4409`. Queries and mutations may be sent too: one `next` (`data`), then
//!   `complete`.
//! - Every `subscribe` checks the token again, as it stands now: one revoked or expired since
//!   `connection_init` closes the socket with `4403`, so nothing more runs on it. Then the
//!   token's rate budget and the alias cap, as over HTTP, and for a subscription the caps on
//!   open subscriptions per token and per socket: an operation refused by one of them is
//!   answered with an `error` message, and the socket stays open.
//! - Each response is a `next` (`data`) (errors included, as GraphQL results carry them); one
//!   larger than the operator allows is replaced by a `LIMIT_EXCEEDED` error. A finished
//!   operation is followed by `complete`. The client's `complete` (`stop`) stops its operation.
//!   A subscription that ends because its token stopped working closes the socket with `4403`
//!   after telling it why and completing.
//! - `ping` is answered with `pong`; an unparsable message closes with `4400`.

use crate::ApiState;
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::hub::{Item, SharedExecutor};
use crate::limits::SubscriptionGuard;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::BoxStream;
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// How long a client has to send `connection_init`.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which protocol a session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `graphql-transport-ws`.
    TransportWs,
    /// The older `graphql-ws` (`subscriptions-transport-ws`).
    Legacy,
}

impl Dialect {
    /// The dialect of the first protocol the client offers that Zpanel speaks, if any (as
    /// clients list them in order of preference).
    #[must_use]
    pub fn negotiate<'h>(offered: impl IntoIterator<Item = &'h str>) -> Option<Self> {
        offered.into_iter().flat_map(|value| value.split(',')).map(str::trim).find_map(|protocol| {
            if protocol.eq_ignore_ascii_case("graphql-transport-ws") {
                Some(Self::TransportWs)
            } else if protocol.eq_ignore_ascii_case("graphql-ws") {
                Some(Self::Legacy)
            } else {
                None
            }
        })
    }

    /// Its `Sec-WebSocket-Protocol` name.
    #[must_use]
    pub fn protocol(self) -> &'static str {
        match self {
            Self::TransportWs => "graphql-transport-ws",
            Self::Legacy => "graphql-ws",
        }
    }

    /// The type of a message carrying a response.
    fn next(self) -> &'static str {
        match self {
            Self::TransportWs => "next",
            Self::Legacy => "data",
        }
    }
}

/// What a client sends, in either dialect.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<serde_json::Value>,
    },
    Subscribe {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Start {
        id: String,
        payload: Box<async_graphql::Request>,
    },
    Complete {
        id: String,
    },
    Stop {
        id: String,
    },
    ConnectionTerminate,
    Ping {
        #[serde(default)]
        payload: Option<serde_json::Value>,
    },
    Pong {
        #[serde(default)]
        #[allow(dead_code)]
        payload: Option<serde_json::Value>,
    },
}

/// A client message as the session handles it, whichever dialect named it.
enum Intent {
    Init(serde_json::Value),
    Run(String, Box<async_graphql::Request>),
    Stop(String),
    Terminate,
    Ping(Option<serde_json::Value>),
    Pong,
}

impl Dialect {
    /// What `message` asks, if this dialect has such a message.
    fn intent(self, message: ClientMessage) -> Option<Intent> {
        use ClientMessage as M;
        Some(match (self, message) {
            (_, M::ConnectionInit { payload }) => Intent::Init(payload.unwrap_or_default()),
            (Self::TransportWs, M::Subscribe { id, payload }) | (Self::Legacy, M::Start { id, payload }) => {
                Intent::Run(id, payload)
            }
            (Self::TransportWs, M::Complete { id }) | (Self::Legacy, M::Stop { id }) => Intent::Stop(id),
            (Self::Legacy, M::ConnectionTerminate) => Intent::Terminate,
            (_, M::Ping { payload }) => Intent::Ping(payload),
            (_, M::Pong { .. }) => Intent::Pong,
            _ => return None,
        })
    }
}

/// One running operation of the session.
struct Operation {
    /// Its id, as JSON.
    id: String,
    items: BoxStream<'static, Item>,
    /// Its place among the token's open subscriptions (`None`: not a subscription).
    subscription: Option<SubscriptionGuard>,
}

/// Why a session ends from the server's side.
struct Close(u16, String);

/// Closes the session of a token that no longer works.
fn forbidden() -> Close {
    Close(4403, "Forbidden: the token is revoked or expired".into())
}

/// Runs the session on `socket`, speaking `dialect`, until either side ends it.
pub async fn serve(socket: WebSocket, dialect: Dialect, executor: SharedExecutor, state: ApiState) {
    let (mut sink, mut incoming) = socket.split();
    let mut session = Session { dialect, executor, state, caller: None, operations: HashMap::new() };
    let closed = session.run(&mut sink, &mut incoming).await;
    if let Err(Close(code, mut reason)) = closed {
        // A close frame's reason has room for 123 bytes.
        while reason.len() > 123 {
            reason.pop();
        }
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = sink.send(Message::Close(Some(frame))).await;
    }
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;
type Incoming = futures::stream::SplitStream<WebSocket>;

struct Session {
    dialect: Dialect,
    executor: SharedExecutor,
    state: ApiState,
    /// The caller, once `connection_init` named a token that works.
    caller: Option<Caller>,
    operations: HashMap<String, Operation>,
}

fn send(text: String) -> Message {
    Message::Text(text.into())
}

impl Session {
    async fn run(&mut self, sink: &mut Sink, incoming: &mut Incoming) -> Result<(), Close> {
        let deadline = tokio::time::sleep(INIT_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            let waiting_for_init = self.caller.is_none();
            tokio::select! {
                () = &mut deadline, if waiting_for_init => {
                    return Err(Close(4408, "Connection initialisation timeout".into()));
                }
                message = incoming.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text.as_str().to_owned(),
                        Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_)) | Err(_)) | None => return Ok(()),
                    };
                    let message: ClientMessage =
                        serde_json::from_str(&text).map_err(|e| Close(4400, format!("Invalid message: {e}")))?;
                    let intent = self
                        .dialect
                        .intent(message)
                        .ok_or_else(|| Close(4400, format!("Invalid message for {}", self.dialect.protocol())))?;
                    if !self.handle(intent, sink).await? {
                        return Ok(());
                    }
                }
                (key, item) = next_item(&mut self.operations) => self.deliver(key, item, sink).await?,
            }
        }
    }

    /// Acts on a client's message; `false` when the client ends the session.
    async fn handle(&mut self, intent: Intent, sink: &mut Sink) -> Result<bool, Close> {
        match intent {
            Intent::Init(payload) => {
                if self.caller.is_some() {
                    return Err(Close(4429, "Too many initialisation requests".into()));
                }
                match auth::connection_init(&self.state.pool, &payload).await {
                    Ok(caller) => self.caller = Some(caller),
                    Err(e) => {
                        if self.dialect == Dialect::Legacy {
                            let refusal = serde_json::json!({ "type": "connection_error", "payload": { "message": e.message() } });
                            let _ = sink.send(send(refusal.to_string())).await;
                        }
                        return Err(Close(4403, e.message()));
                    }
                }
                sink.send(send(r#"{"type":"connection_ack"}"#.to_owned())).await.map_err(|_| gone())?;
            }
            Intent::Run(id, request) => {
                if self.caller.is_none() {
                    return Err(Close(4401, "Unauthorized".into()));
                }
                if self.operations.contains_key(&id) {
                    return Err(Close(4409, format!("Subscriber for {id} already exists")));
                }
                if let Err(refusal) = self.start(id.clone(), *request).await? {
                    let frame = self.error_frame(&id, refusal);
                    sink.send(send(frame)).await.map_err(|_| gone())?;
                }
            }
            Intent::Stop(id) => {
                // The older protocol confirms a stop; the newer one has nothing to say.
                if self.operations.remove(&id).is_some() && self.dialect == Dialect::Legacy {
                    let id = serde_json::to_string(&id).unwrap_or_default();
                    sink.send(send(format!(r#"{{"id":{id},"type":"complete"}}"#))).await.map_err(|_| gone())?;
                }
            }
            Intent::Terminate => return Ok(false),
            Intent::Ping(payload) => {
                let pong = match payload {
                    Some(payload) => serde_json::json!({ "type": "pong", "payload": payload }).to_string(),
                    None => r#"{"type":"pong"}"#.to_owned(),
                };
                sink.send(send(pong)).await.map_err(|_| gone())?;
            }
            Intent::Pong => {}
        }
        Ok(true)
    }

    /// Starts operation `id` once the gate lets it through; `Ok(Err(why))` when a limit
    /// refuses it, `Err` when the token no longer works (the session ends).
    async fn start(&mut self, id: String, mut request: async_graphql::Request) -> Result<Result<(), ApiError>, Close> {
        let Some(caller) = &self.caller else { return Err(Close(4401, "Unauthorized".into())) };
        let state = &self.state;
        // The token as it stands now, not as it stood at `connection_init`.
        let caller = match crate::gate::current_caller(state, caller.token_hash()).await {
            Ok(Some(caller)) => caller,
            Ok(None) => return Err(forbidden()),
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = crate::gate::spend(state, &caller) {
            return Ok(Err(e));
        }
        let operation_name = request.operation_name.clone();
        let subscription = match request.parsed_query() {
            Ok(document) => {
                if let Err(e) = crate::gate::check_document(document) {
                    return Ok(Err(e));
                }
                crate::limits::is_subscription(document, operation_name.as_deref())
            }
            // The schema reports the syntax error.
            Err(_) => false,
        };
        let guard = if subscription {
            let per_socket = state.limits.subscriptions_per_socket;
            let open = self.operations.values().filter(|op| op.subscription.is_some()).count();
            if open >= per_socket {
                let rule = format!("this socket holds {per_socket} open subscriptions, the most allowed");
                return Ok(Err(ApiError::LimitExceeded(rule)));
            }
            let Some(guard) = state.subscriptions.open(caller.token_id) else {
                let rule = format!(
                    "this token holds {} open subscriptions, the most allowed",
                    state.limits.subscriptions_per_token
                );
                return Ok(Err(ApiError::LimitExceeded(rule)));
            };
            Some(guard)
        } else {
            None
        };
        let mut data = async_graphql::Data::default();
        data.insert(caller.clone());
        self.caller = Some(caller);
        let items = self.executor.subscribe(request, Some(Arc::new(data)));
        let json = serde_json::to_string(&id).unwrap_or_default();
        self.operations.insert(id, Operation { id: json, items, subscription: guard });
        Ok(Ok(()))
    }

    /// Sends an item of operation `key` (`None`: it finished).
    async fn deliver(&mut self, key: String, item: Option<Item>, sink: &mut Sink) -> Result<(), Close> {
        let Some(operation) = self.operations.get(&key) else { return Ok(()) };
        let (frame, revoked) = match item {
            Some(mut item) => {
                if let Item::Own(response) = &mut item {
                    crate::gate::explain(response);
                }
                let revoked = crate::gate::says_unauthenticated(item.response());
                let payload = item.json_within(self.state.limits.response_bytes).unwrap_or_else(|_| {
                    let error = crate::gate::too_large(self.state.limits.response_bytes);
                    crate::gate::errors_json(error)
                });
                let kind = self.dialect.next();
                let mut frame = String::with_capacity(operation.id.len() + payload.len() + 32);
                frame.push_str(r#"{"id":"#);
                frame.push_str(&operation.id);
                frame.push_str(r#","type":""#);
                frame.push_str(kind);
                frame.push_str(r#"","payload":"#);
                frame.push_str(&payload);
                frame.push('}');
                (frame, revoked)
            }
            None => {
                let frame = format!(r#"{{"id":{},"type":"complete"}}"#, operation.id);
                self.operations.remove(&key);
                (frame, false)
            }
        };
        sink.send(send(frame)).await.map_err(|_| gone())?;
        if revoked {
            // A subscription ended because the token stopped working: it completes as any
            // ended operation does, then so does the session.
            if let Some(operation) = self.operations.remove(&key) {
                let complete = format!(r#"{{"id":{},"type":"complete"}}"#, operation.id);
                sink.send(send(complete)).await.map_err(|_| gone())?;
            }
            return Err(forbidden());
        }
        Ok(())
    }

    /// The `error` message refusing operation `id`: the GraphQL errors (`graphql-transport-ws`)
    /// or the error (the older protocol).
    fn error_frame(&self, id: &str, error: ApiError) -> String {
        let error = crate::gate::server_error(error);
        let payload = match self.dialect {
            Dialect::TransportWs => serde_json::json!([error]),
            Dialect::Legacy => serde_json::json!(error),
        };
        serde_json::json!({ "id": id, "type": "error", "payload": payload }).to_string()
    }
}

/// The client went away while being written to: nothing left to close.
fn gone() -> Close {
    Close(1000, String::new())
}

/// The next item of any running operation (`None`: it finished), with its key. Pending while
/// none runs.
async fn next_item(operations: &mut HashMap<String, Operation>) -> (String, Option<Item>) {
    futures::future::poll_fn(|cx| {
        for (key, operation) in operations.iter_mut() {
            if let Poll::Ready(item) = operation.items.poll_next_unpin(cx) {
                return Poll::Ready((key.clone(), item));
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::Dialect;

    #[test]
    fn the_first_protocol_offered_that_zpanel_speaks_is_spoken() {
        assert_eq!(Dialect::negotiate(["graphql-transport-ws"]), Some(Dialect::TransportWs));
        assert_eq!(Dialect::negotiate(["graphql-ws, graphql-transport-ws"]), Some(Dialect::Legacy));
        assert_eq!(Dialect::negotiate(["chat", "Graphql-Transport-WS"]), Some(Dialect::TransportWs));
        assert_eq!(Dialect::negotiate(["chat"]), None);
        assert_eq!(Dialect::negotiate([]), None);
    }
}
