//! A `graphql-transport-ws` session (the protocol of `graphql-ws`,
//! <https://github.com/enisdenjo/graphql-ws/blob/master/PROTOCOL.md>), run by Zpanel so that a
//! response shared by many subscribers ([`crate::hub`]) is written as JSON once and sent to each
//! socket as it is, framed with the subscriber's id — no copy and no serialization per socket.
//!
//! - `connection_init` carries the token (`{"authorization": "Bearer zp_…"}`) and must come
//!   within [`INIT_TIMEOUT`] (else close `4408`); a bad token closes with `4403`, a second
//!   `connection_init` with `4429`.
//! - `subscribe` before the acknowledgement closes with `4401`; an id already running closes
//!   with `4409`. Queries and mutations may be sent too: one `next`, then `complete`.
//! - Each response is a `next` (errors included, as GraphQL results carry them); a finished
//!   operation is followed by `complete`. The client's `complete` stops its operation.
//! - `ping` is answered with `pong`; an unparsable message closes with `4400`.

use crate::ApiState;
use crate::auth;
use crate::hub::{Item, SharedExecutor};
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

/// What a client sends.
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
    Complete {
        id: String,
    },
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

/// One running operation of the session.
struct Operation {
    /// Its id, as JSON.
    id: String,
    items: BoxStream<'static, Item>,
}

/// Why a session ends from the server's side.
struct Close(u16, String);

/// Runs the session on `socket` until either side ends it.
pub async fn serve(socket: WebSocket, executor: SharedExecutor, state: ApiState) {
    let (mut sink, mut incoming) = socket.split();
    let closed = run(&mut sink, &mut incoming, &executor, &state).await;
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

async fn run(
    sink: &mut Sink,
    incoming: &mut Incoming,
    executor: &SharedExecutor,
    state: &ApiState,
) -> Result<(), Close> {
    let send = |text: String| Message::Text(text.into());
    let deadline = tokio::time::sleep(INIT_TIMEOUT);
    tokio::pin!(deadline);
    let mut data: Option<Arc<async_graphql::Data>> = None;
    let mut operations: HashMap<String, Operation> = HashMap::new();
    loop {
        let waiting_for_init = data.is_none();
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
                match message {
                    ClientMessage::ConnectionInit { payload } => {
                        if data.is_some() {
                            return Err(Close(4429, "Too many initialisation requests".into()));
                        }
                        let payload = payload.unwrap_or_default();
                        let caller =
                            auth::connection_init(&state.pool, &payload).await.map_err(|e| Close(4403, e.message()))?;
                        let mut session = async_graphql::Data::default();
                        session.insert(caller);
                        data = Some(Arc::new(session));
                        sink.send(send(r#"{"type":"connection_ack"}"#.to_owned())).await.map_err(|_| gone())?;
                    }
                    ClientMessage::Subscribe { id, payload } => {
                        let Some(data) = &data else {
                            return Err(Close(4401, "Unauthorized".into()));
                        };
                        if operations.contains_key(&id) {
                            return Err(Close(4409, format!("Subscriber for {id} already exists")));
                        }
                        let items = executor.subscribe(*payload, Some(Arc::clone(data)));
                        let json = serde_json::to_string(&id).unwrap_or_default();
                        operations.insert(id, Operation { id: json, items });
                    }
                    ClientMessage::Complete { id } => {
                        operations.remove(&id);
                    }
                    ClientMessage::Ping { payload } => {
                        let pong = match payload {
                            Some(payload) => serde_json::json!({ "type": "pong", "payload": payload }).to_string(),
                            None => r#"{"type":"pong"}"#.to_owned(),
                        };
                        sink.send(send(pong)).await.map_err(|_| gone())?;
                    }
                    ClientMessage::Pong { .. } => {}
                }
            }
            (key, item) = next_item(&mut operations) => {
                let Some(operation) = operations.get(&key) else { continue };
                let frame = match item {
                    Some(item) => {
                        let payload = item.json();
                        let mut frame = String::with_capacity(operation.id.len() + payload.len() + 32);
                        frame.push_str(r#"{"id":"#);
                        frame.push_str(&operation.id);
                        frame.push_str(r#","type":"next","payload":"#);
                        frame.push_str(&payload);
                        frame.push('}');
                        frame
                    }
                    None => {
                        let frame = format!(r#"{{"id":{},"type":"complete"}}"#, operation.id);
                        operations.remove(&key);
                        frame
                    }
                };
                sink.send(send(frame)).await.map_err(|_| gone())?;
            }
        }
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
