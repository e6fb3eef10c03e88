//! Abuse limits beyond depth and complexity (which the schema enforces): a cap on aliases per
//! operation, a request budget per token, a cap on the size of an answer, and caps on the
//! subscriptions a token and a socket hold open. HTTP and WebSocket apply the same ones
//! ([`crate::gate`]).

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationDefinition, OperationType, Selection, SelectionSet,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Largest answer sent, by default: a query within the cost limit stays far below it.
pub const RESPONSE_BYTES: usize = 16 << 20;
/// Subscriptions one token may hold open in one process, by default.
pub const SUBSCRIPTIONS_PER_TOKEN: usize = 1000;
/// Subscriptions one WebSocket may hold open, by default.
pub const SUBSCRIPTIONS_PER_SOCKET: usize = 100;

/// What the operator allows one request, token or socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest answer (JSON bytes) sent; a larger one is replaced by an error.
    pub response_bytes: usize,
    /// Subscriptions one token may hold open in this process.
    pub subscriptions_per_token: usize,
    /// Subscriptions one WebSocket may hold open.
    pub subscriptions_per_socket: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            response_bytes: RESPONSE_BYTES,
            subscriptions_per_token: SUBSCRIPTIONS_PER_TOKEN,
            subscriptions_per_socket: SUBSCRIPTIONS_PER_SOCKET,
        }
    }
}

/// The operation `name` of `document` (the only one when unnamed), if there is one.
#[must_use]
pub fn operation<'d>(
    document: &'d ExecutableDocument,
    name: Option<&str>,
) -> Option<&'d async_graphql::Positioned<OperationDefinition>> {
    match (&document.operations, name) {
        (DocumentOperations::Single(op), _) => Some(op),
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name),
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => ops.values().next(),
        (DocumentOperations::Multiple(_), None) => None,
    }
}

/// Whether the operation `name` of `document` is a subscription.
#[must_use]
pub fn is_subscription(document: &ExecutableDocument, name: Option<&str>) -> bool {
    operation(document, name).is_some_and(|op| op.node.ty == OperationType::Subscription)
}

/// Writes `value` as JSON, unless it takes more than `max` bytes.
///
/// # Errors
/// `TooLarge` past `max` bytes (nothing more is written than that), or when `value` cannot be
/// written as JSON.
pub fn to_json_within<T: serde::Serialize>(value: &T, max: usize) -> Result<Vec<u8>, TooLarge> {
    let mut out = Bounded { bytes: Vec::new(), max };
    serde_json::to_writer(&mut out, value).map_err(|_| TooLarge)?;
    Ok(out.bytes)
}

/// An answer larger than allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge;

/// A buffer that refuses to grow past `max`.
struct Bounded {
    bytes: Vec<u8>,
    max: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.max {
            return Err(std::io::Error::other("the answer is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Open subscriptions per token, in this process.
#[derive(Debug)]
pub struct Subscriptions {
    per_token: usize,
    open: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Subscriptions {
    /// At most `per_token` open subscriptions per token.
    #[must_use]
    pub fn new(per_token: usize) -> Self {
        Self { per_token, open: Arc::default() }
    }

    /// A place for one more subscription of `token`, held until the guard is dropped; `None`
    /// when the token holds its limit already.
    #[must_use]
    pub fn open(&self, token: Uuid) -> Option<SubscriptionGuard> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(token).or_insert(0);
        if *count >= self.per_token {
            return None;
        }
        *count += 1;
        Some(SubscriptionGuard { token, open: Arc::clone(&self.open) })
    }

    /// How many subscriptions `token` holds open.
    #[must_use]
    pub fn of(&self, token: Uuid) -> usize {
        self.open.lock().map(|open| open.get(&token).copied().unwrap_or(0)).unwrap_or(0)
    }
}

/// One open subscription, counted until dropped.
#[derive(Debug)]
pub struct SubscriptionGuard {
    token: Uuid,
    open: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.token) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.token);
            }
        }
    }
}

/// Most aliased fields accepted in one document: aliases let one request repeat an expensive
/// field many times under different names.
pub const MAX_ALIASES: usize = 30;

/// Counts the aliased fields of a document (operations and fragments).
#[must_use]
pub fn aliases(document: &ExecutableDocument) -> usize {
    fn count(set: &SelectionSet) -> usize {
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(f) => usize::from(f.node.alias.is_some()) + count(&f.node.selection_set.node),
                Selection::InlineFragment(f) => count(&f.node.selection_set.node),
                Selection::FragmentSpread(_) => 0,
            })
            .sum()
    }
    let operations: usize = match &document.operations {
        DocumentOperations::Single(op) => count(&op.node.selection_set.node),
        DocumentOperations::Multiple(ops) => ops.values().map(|op| count(&op.node.selection_set.node)).sum(),
    };
    operations + document.fragments.values().map(|f| count(&f.node.selection_set.node)).sum::<usize>()
}

/// A token bucket per API token: `burst` requests at once, refilled at `per_second`.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<Uuid, (f64, Instant)>>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` requests per token, with bursts of `burst`.
    #[must_use]
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second: f64::from(per_second.max(1)), burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// A limiter allowing one request per `every` per key, with bursts of `burst`: for budgets
    /// slower than one a second (a team's server validations).
    #[must_use]
    pub fn one_every(every: Duration, burst: u32) -> Self {
        let per_second = 1.0 / every.as_secs_f64().max(f64::EPSILON);
        Self { per_second, burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// Takes one request from `token`'s budget; `Err(wait)` when it is spent.
    ///
    /// # Errors
    /// How long until the next request would be accepted.
    pub fn take(&self, token: Uuid) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > 100_000 {
            // Forget full buckets rather than grow without bound.
            let burst = self.burst;
            let per_second = self.per_second;
            buckets.retain(|_, (level, at)| *level + at.elapsed().as_secs_f64() * per_second < burst);
        }
        let (level, at) = buckets.entry(token).or_insert((self.burst, now));
        *level = (*level + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *level) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_gets_its_burst_then_waits() {
        let limiter = RateLimiter::new(1, 3);
        let token = Uuid::now_v7();
        for _ in 0..3 {
            assert!(limiter.take(token).is_ok());
        }
        let wait = limiter.take(token).expect_err("the burst is spent");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limiter.take(Uuid::now_v7()).is_ok(), "another token has its own budget");
    }

    #[test]
    fn aliases_are_counted_in_operations_and_fragments() {
        let doc = async_graphql::parser::parse_query(
            "query { a: team { id } b: team { x: id } ...F } fragment F on Query { c: projects { id } }",
        )
        .expect("parses");
        assert_eq!(aliases(&doc), 4);
    }

    #[test]
    fn a_token_holds_at_most_its_subscriptions_and_gets_them_back_when_they_end() {
        let subscriptions = Subscriptions::new(2);
        let token = Uuid::now_v7();
        let first = subscriptions.open(token).expect("a first");
        let _second = subscriptions.open(token).expect("a second");
        assert!(subscriptions.open(token).is_none(), "a third is over the limit");
        assert!(subscriptions.open(Uuid::now_v7()).is_some(), "another token has its own");
        drop(first);
        assert!(subscriptions.open(token).is_some(), "an ended one makes room");
    }

    #[test]
    fn an_answer_is_written_only_within_its_limit() {
        let value = serde_json::json!({ "text": "x".repeat(100) });
        assert!(to_json_within(&value, 1000).is_ok());
        assert_eq!(to_json_within(&value, 50), Err(TooLarge));
    }
}
