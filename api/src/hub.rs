//! Shared executions of the live audit stream. Thousands of WebSocket subscribers of
//! `events` usually ask the same thing — one dashboard, many tabs; one token, many scripts —
//! and executing the subscription once per subscriber made each update cost the server a
//! follower, a filter and an execution of the selection set per socket. The hub runs one
//! execution per distinct (token, document, operation, variables) and hands every subscriber
//! of it the same response.
//!
//! What a subscriber sees stays what its own execution would show:
//! - It joins at the horizon: responses for entries it could not have seen (visible before it
//!   subscribed) are left out, as its own follower would.
//! - It is the same caller with the same request, so every response — including the
//!   `UNAUTHENTICATED` that ends the stream when the token is revoked — is the one it would
//!   have got.
//! - When it falls behind the shared responses (`ZPANEL_SUBSCRIPTION_BUFFER`, [`CAPACITY`]), or the shared execution ends
//!   without telling it why (it joined as it ended), it goes on alone: its own execution
//!   resumes after the last entry it received, the missed entries from the audit log, the
//!   first flagged as resynchronised — as its follower does after falling behind the feed.
//!
//! Only `events` is shared: `applicationUpdated` and `deploymentUpdated` check their object
//! when subscribed, and the log subscriptions replay per subscriber.

use crate::auth::Caller;
use crate::schema::ZpanelSchema;
use async_graphql::parser::types::{DocumentOperations, OperationType, Selection};
use async_graphql::{Data, Executor, Request, Response};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use zpanel_commands::Cursor;

/// Shared responses buffered for the slowest subscriber of an execution, by default.
pub const CAPACITY: usize = 1024;

/// Where a shared execution's resolver reports the entry behind the response it is producing.
#[derive(Clone, Debug, Default)]
pub struct Tap(Arc<Mutex<Cursor>>);

impl Tap {
    /// The entry at `cursor` is about to be executed.
    pub fn record(&self, cursor: Cursor) {
        if let Ok(mut at) = self.0.lock() {
            *at = cursor;
        }
    }

    fn get(&self) -> Cursor {
        self.0.lock().map(|at| *at).unwrap_or(Cursor::START)
    }
}

/// Asks a subscriber's own execution to start after this entry, with what it missed since.
#[derive(Clone, Copy, Debug)]
pub struct Resume(pub Cursor);

/// The schema, with `events` subscriptions shared.
#[derive(Clone)]
pub struct SharedExecutor {
    schema: ZpanelSchema,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for SharedExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedExecutor").finish_non_exhaustive()
    }
}

impl SharedExecutor {
    /// `schema`'s executions, sharing `events` subscriptions.
    #[must_use]
    pub fn new(schema: ZpanelSchema, capacity: usize) -> Self {
        Self { schema, hub: Arc::new(Hub { groups: Mutex::default(), capacity: capacity.max(1) }) }
    }

    /// How many shared executions run now.
    #[must_use]
    pub fn shared(&self) -> usize {
        self.hub.groups.lock().map(|groups| groups.values().filter(|g| g.strong_count() > 0).count()).unwrap_or(0)
    }
}

/// The shared executions, by what they execute.
struct Hub {
    groups: Mutex<HashMap<Key, Weak<Group>>>,
    /// Responses buffered per execution.
    capacity: usize,
}

/// What makes two subscriptions the same execution.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    token: uuid::Uuid,
    query: String,
    operation: Option<String>,
    variables: String,
}

/// One shared execution: its responses, each with the entry behind it. Dropped with its last
/// subscriber, which stops the execution.
struct Group {
    responses: broadcast::Sender<Arc<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

/// A response of a shared execution.
#[derive(Debug)]
pub struct Shared {
    /// The entry behind it.
    cursor: Cursor,
    response: Response,
    /// Its JSON, written once for every subscriber that sends it as text.
    json: std::sync::OnceLock<Arc<str>>,
}

impl Shared {
    /// The response as JSON.
    #[must_use]
    pub fn json(&self) -> Arc<str> {
        Arc::clone(self.json.get_or_init(|| to_json(&self.response)))
    }
}

/// What a subscriber receives: a response of the execution it shares, or of its own.
#[derive(Debug)]
pub enum Item {
    /// From the shared execution.
    Shared(Arc<Shared>),
    /// From its own.
    Own(Box<Response>),
}

impl Item {
    /// The response as JSON (written once per shared response).
    #[must_use]
    pub fn json(&self) -> Arc<str> {
        match self {
            Self::Shared(shared) => shared.json(),
            Self::Own(response) => to_json(response),
        }
    }

    /// The response as JSON, unless it takes more than `max` bytes (a shared one is written
    /// once, whole; one of its own is written no further than `max`).
    ///
    /// # Errors
    /// When it is larger.
    pub fn json_within(&self, max: usize) -> Result<Arc<str>, crate::limits::TooLarge> {
        match self {
            Self::Shared(shared) => {
                let json = shared.json();
                if json.len() > max { Err(crate::limits::TooLarge) } else { Ok(json) }
            }
            Self::Own(response) => {
                let bytes = crate::limits::to_json_within(response, max)?;
                String::from_utf8(bytes).map(Arc::from).map_err(|_| crate::limits::TooLarge)
            }
        }
    }

    /// The response.
    #[must_use]
    pub fn response(&self) -> &Response {
        match self {
            Self::Shared(shared) => &shared.response,
            Self::Own(response) => response,
        }
    }

    fn into_response(self) -> Response {
        match self {
            Self::Shared(shared) => copy(&shared.response),
            Self::Own(response) => *response,
        }
    }
}

/// `response` as JSON.
fn to_json(response: &Response) -> Arc<str> {
    serde_json::to_string(response).map_or_else(
        |e| Arc::from(format!(r#"{{"errors":[{{"message":"the response could not be written: {e}"}}]}}"#)),
        Arc::from,
    )
}

impl Drop for Group {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Executor for SharedExecutor {
    async fn execute(&self, request: Request) -> Response {
        self.schema.execute(request).await
    }

    fn execute_stream(&self, request: Request, session_data: Option<Arc<Data>>) -> BoxStream<'static, Response> {
        self.subscribe(request, session_data).map(Item::into_response).boxed()
    }
}

impl SharedExecutor {
    /// Executes `request` for a WebSocket session with `session_data`: a subscription to
    /// `events` through the execution it shares with others, anything else on its own.
    pub fn subscribe(&self, request: Request, session_data: Option<Arc<Data>>) -> BoxStream<'static, Item> {
        let own = |stream: BoxStream<'static, Response>| stream.map(|r| Item::Own(Box::new(r))).boxed();
        let caller = session_data
            .as_deref()
            .and_then(|data| data.get(&TypeId::of::<Caller>()))
            .and_then(|caller| caller.downcast_ref::<Caller>());
        let (Some(caller), Some(data)) = (caller, session_data.clone()) else {
            return own(self.schema.execute_stream_with_session_data(request, session_data.unwrap_or_default()));
        };
        if !shareable(&request) {
            return own(self.schema.execute_stream_with_session_data(request, data));
        }
        let key = Key {
            token: caller.token_id,
            query: request.query.clone(),
            operation: request.operation_name.clone(),
            variables: serde_json::to_string(&request.variables).unwrap_or_default(),
        };
        let state = self.schema.data::<crate::ApiState>().cloned();
        let Some(state) = state else {
            return own(self.schema.execute_stream_with_session_data(request, data));
        };
        // Where this subscriber starts: its own follower would start here too.
        let start = state.feed.horizon();
        let (group, receiver) = self.hub.join(key, &self.schema, &request, &data);
        let member = Member {
            schema: self.schema.clone(),
            request: Some(request),
            data,
            last: start,
            way: Way::Shared { receiver, _group: group },
        };
        futures::stream::unfold(member, Member::next).boxed()
    }
}

impl Hub {
    /// The execution of `key`, started for this request if none runs; and a place in its
    /// responses.
    fn join(
        &self,
        key: Key,
        schema: &ZpanelSchema,
        request: &Request,
        data: &Arc<Data>,
    ) -> (Arc<Group>, broadcast::Receiver<Arc<Shared>>) {
        let mut groups = self.groups.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(group) = groups.get(&key).and_then(Weak::upgrade) {
            let receiver = group.responses.subscribe();
            return (group, receiver);
        }
        // Forget the executions nobody follows any more, now and then.
        if groups.len() >= 64 && groups.len().is_power_of_two() {
            groups.retain(|_, group| group.strong_count() > 0);
        }
        let (responses, receiver) = broadcast::channel(self.capacity);
        let tap = Tap::default();
        let shared = clone_request(request).data(tap.clone());
        let mut stream = schema.execute_stream_with_session_data(shared, Arc::clone(data));
        let sender = responses.clone();
        let task = tokio::spawn(async move {
            while let Some(response) = stream.next().await {
                // Nobody left is fine: the group is being dropped.
                let _ = sender.send(Arc::new(Shared { cursor: tap.get(), response, json: std::sync::OnceLock::new() }));
            }
        });
        let group = Arc::new(Group { responses, task });
        groups.insert(key, Arc::downgrade(&group));
        (group, receiver)
    }
}

/// One subscriber: following a shared execution, or its own.
struct Member {
    schema: ZpanelSchema,
    /// Its request, until it is needed for an execution of its own.
    request: Option<Request>,
    data: Arc<Data>,
    /// The last entry it received (or where it started).
    last: Cursor,
    way: Way,
}

enum Way {
    Shared { receiver: broadcast::Receiver<Arc<Shared>>, _group: Arc<Group> },
    Alone(BoxStream<'static, Response>),
    Ended,
}

impl Member {
    async fn next(mut self) -> Option<(Item, Self)> {
        loop {
            match &mut self.way {
                Way::Ended => return None,
                Way::Alone(stream) => {
                    let response = stream.next().await?;
                    return Some((Item::Own(Box::new(response)), self));
                }
                Way::Shared { receiver, .. } => match receiver.recv().await {
                    Ok(shared) => {
                        if !shared.response.errors.is_empty() {
                            // An error ends the shared execution, and this one with it.
                            self.way = Way::Ended;
                            return Some((Item::Shared(shared), self));
                        }
                        if shared.cursor <= self.last {
                            continue;
                        }
                        self.last = shared.cursor;
                        return Some((Item::Shared(shared), self));
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "a subscriber fell behind a shared execution; resuming alone");
                        self.alone();
                    }
                    Err(RecvError::Closed) => self.alone(),
                },
            }
        }
    }

    /// Goes on with an execution of its own, from the last entry it received.
    fn alone(&mut self) {
        let Some(request) = self.request.take() else {
            self.way = Way::Ended;
            return;
        };
        let request = request.data(Resume(self.last));
        self.way = Way::Alone(self.schema.execute_stream_with_session_data(request, Arc::clone(&self.data)));
    }
}

/// A copy of what a response sends (`Response` is not `Clone`; the rest is not sent).
fn copy(response: &Response) -> Response {
    let mut copy = Response::new(response.data.clone());
    copy.extensions.clone_from(&response.extensions);
    copy.errors.clone_from(&response.errors);
    copy
}

/// A copy of `request` without its request data (which cannot be copied; subscriptions sent
/// over the WebSocket carry none).
fn clone_request(request: &Request) -> Request {
    let mut copy = Request::new(request.query.clone()).variables(request.variables.clone());
    copy.operation_name.clone_from(&request.operation_name);
    copy.extensions.clone_from(&request.extensions);
    copy
}

/// Whether `request` is a subscription to `events` alone.
fn shareable(request: &Request) -> bool {
    let Ok(document) = async_graphql::parser::parse_query(&request.query) else {
        return false;
    };
    let operation = match (&document.operations, request.operation_name.as_deref()) {
        (DocumentOperations::Single(operation), _) => Some(operation),
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(name),
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => operations.values().next(),
        (DocumentOperations::Multiple(_), None) => None,
    };
    let Some(operation) = operation else {
        return false;
    };
    // One root field: the responses then come in the order of the entries behind them.
    let [selection] = operation.node.selection_set.node.items.as_slice() else {
        return false;
    };
    operation.node.ty == OperationType::Subscription
        && matches!(&selection.node, Selection::Field(field)
            if field.node.name.node == "events" && field.node.directives.is_empty())
}

#[cfg(test)]
mod tests {
    use super::shareable;
    use async_graphql::Request;

    #[test]
    fn only_subscriptions_to_events_alone_are_shared() {
        assert!(shareable(&Request::new("subscription { events { position } }")));
        assert!(shareable(&Request::new("subscription S($f: AuditFilter) { events(filter: $f) { position } }")));
        assert!(shareable(&Request::new("subscription { mine: events { position } }")));
        assert!(!shareable(&Request::new("subscription { a: events { position } b: events { eventType } }")));
        assert!(!shareable(&Request::new("subscription { applicationUpdated(id: \"x\") { id } }")));
        assert!(!shareable(&Request::new("subscription { events { position } applicationUpdated(id: \"x\") { id } }")));
        assert!(!shareable(&Request::new("query { events(streamId: \"x\") { position } }")));
        assert!(!shareable(&Request::new("subscription { ...F } fragment F on Subscription { events { position } }")));
        assert!(!shareable(&Request::new("subscription { events @skip(if: true) { position } }")));
        assert!(!shareable(&Request::new(
            "subscription A { events { position } } subscription B { events { eventType } }"
        )));
        assert!(!shareable(&Request::new("subscription {")));
    }
}
