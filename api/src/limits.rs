//! Abuse limits beyond depth and complexity (which the schema enforces): a cap on aliases per
//! operation, and a request budget per token.

use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, Selection, SelectionSet};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

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
}
