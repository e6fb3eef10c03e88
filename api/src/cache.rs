//! Answers of read-model queries, reused while the read models stay as they were.
//!
//! Every read model moves only together with its projection's checkpoint, in the same
//! transaction. So an answer computed while the checkpoints read `V` is still the answer while
//! they read `V`: the cache keeps answers (and token lookups) tagged with `V`, and each request
//! reads the checkpoints afresh — one small query shared by all requests that arrive while it
//! runs (a read that *started* after a request arrived serves it, so nothing committed before a
//! request is missed, whichever process committed it). See ADR 0014.
//!
//! Only queries whose every field comes from the read models are kept (see [`cacheable`]), per
//! token (so per team and abilities), for at most [`MAX_AGE`], within [`MAX_BYTES`].

use crate::auth::Caller;
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType, Selection, SelectionSet};
use axum::body::Bytes;
use sqlx::{PgPool, Row as _};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Longest an answer is reused, even with unmoved read models (a safety net).
pub const MAX_AGE: Duration = Duration::from_secs(5);
/// Bytes of answers kept at most; the oldest go first.
pub const MAX_BYTES: usize = 16 << 20;
/// Largest answer kept.
const MAX_ANSWER: usize = 1 << 20;
/// Token lookups kept at most.
const MAX_TOKENS: usize = 10_000;

/// Root fields answered from the read models only.
const READ_MODEL_FIELDS: &[&str] = &[
    "__typename",
    "me",
    "team",
    "projects",
    "project",
    "applications",
    "application",
    "deployments",
    "deployment",
    "servers",
    "server",
    "serverFacts",
    "privateKeys",
    "apiTokens",
    "auditLog",
];

/// Fields, at any depth, that read something other than the read models (deployment logs, the
/// engines, the log itself).
const OTHER_SOURCES: &[&str] =
    &["logs", "containerLogs", "deploymentLogs", "events", "applicationAt", "applicationDiff", "releaseDiff"];

/// Whether the operation `name` of `document` is a query answered from the read models alone.
#[must_use]
pub fn cacheable(document: &ExecutableDocument, name: Option<&str>) -> bool {
    let operation = match (&document.operations, name) {
        (DocumentOperations::Single(op), _) => op,
        (DocumentOperations::Multiple(ops), Some(name)) => match ops.get(name) {
            Some(op) => op,
            None => return false,
        },
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => match ops.values().next() {
            Some(op) => op,
            None => return false,
        },
        (DocumentOperations::Multiple(_), None) => return false,
    };
    if operation.node.ty != OperationType::Query {
        return false;
    }
    let roots_read_models = operation.node.selection_set.node.items.iter().all(|item| match &item.node {
        Selection::Field(field) => READ_MODEL_FIELDS.contains(&field.node.name.node.as_str()),
        Selection::FragmentSpread(_) | Selection::InlineFragment(_) => false,
    });
    roots_read_models
        && only_read_models(&operation.node.selection_set.node)
        && document.fragments.values().all(|f| only_read_models(&f.node.selection_set.node))
}

fn only_read_models(set: &SelectionSet) -> bool {
    set.items.iter().all(|item| match &item.node {
        Selection::Field(field) => {
            !OTHER_SOURCES.contains(&field.node.name.node.as_str()) && only_read_models(&field.node.selection_set.node)
        }
        Selection::InlineFragment(fragment) => only_read_models(&fragment.node.selection_set.node),
        Selection::FragmentSpread(_) => true,
    })
}

/// Where every projection's checkpoint stood when read, and which read that was (reads are
/// numbered in the order they started, so a later one never shows older checkpoints).
#[derive(Clone, Debug, Default)]
pub struct Version {
    read: u64,
    checkpoints: std::sync::Arc<Vec<(i64, i64)>>,
}

/// A kept answer: its body, the same in either media type it is sent as (each request's
/// `Accept` chooses its own).
#[derive(Clone, Debug)]
pub struct Answer {
    made: Instant,
    /// The response body.
    pub body: Bytes,
}

#[derive(Debug, Default)]
struct Kept {
    version: Version,
    tokens: HashMap<String, Caller>,
    answers: HashMap<(Uuid, Bytes), Answer>,
    order: VecDeque<(Uuid, Bytes)>,
    bytes: usize,
}

impl Kept {
    /// What was kept at `version`: everything when the checkpoints are the same; nothing, from
    /// now on, when `version` is a later read that shows them moved; `None` when `version` is an
    /// earlier read than the one kept (its answers may already be out of date).
    fn at(&mut self, version: &Version) -> Option<&mut Self> {
        if self.version.checkpoints == version.checkpoints {
            self.version.read = self.version.read.max(version.read);
        } else if version.read > self.version.read {
            *self = Self { version: version.clone(), ..Self::default() };
        } else {
            return None;
        }
        Some(self)
    }
}

/// The cache of one API process.
#[derive(Debug, Default)]
pub struct QueryCache {
    kept: Mutex<Kept>,
    /// Checkpoint reads started so far; the last finished one, with its number.
    reads_started: AtomicU64,
    last_read: tokio::sync::Mutex<Version>,
}

impl QueryCache {
    /// The checkpoints as read by a query that started after this call did.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn version(&self, pool: &PgPool) -> anyhow::Result<Version> {
        let arrived = self.reads_started.load(Ordering::SeqCst);
        let mut last = self.last_read.lock().await;
        if last.read > arrived {
            return Ok(last.clone());
        }
        let read = self.reads_started.fetch_add(1, Ordering::SeqCst) + 1;
        let rows = sqlx::query("select tx_id::text::bigint as tx_id, position from checkpoints order by name")
            .fetch_all(pool)
            .await?;
        let checkpoints = rows
            .iter()
            .map(|r| Ok((r.try_get("tx_id")?, r.try_get("position")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        *last = Version { read, checkpoints: std::sync::Arc::new(checkpoints) };
        Ok(last.clone())
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The caller a token hash resolved to at `version`, if it was looked up then and has not
    /// expired since.
    #[must_use]
    pub fn caller(&self, version: &Version, hash: &str) -> Option<Caller> {
        let mut kept = self.kept();
        let caller = kept.at(version)?.tokens.get(hash)?;
        let expired = caller.expires_at.is_some_and(|at| at <= time::OffsetDateTime::now_utc());
        (!expired).then(|| caller.clone())
    }

    /// Keeps a token lookup made at `version`.
    pub fn keep_caller(&self, version: &Version, hash: &str, caller: &Caller) {
        let mut kept = self.kept();
        let Some(kept) = kept.at(version) else { return };
        if kept.tokens.len() < MAX_TOKENS {
            kept.tokens.insert(hash.to_owned(), caller.clone());
        }
    }

    /// The answer `token` got to `request` at `version`, if kept.
    #[must_use]
    pub fn answer(&self, version: &Version, token: Uuid, request: &Bytes) -> Option<Answer> {
        let mut kept = self.kept();
        let answer = kept.at(version)?.answers.get(&(token, request.clone()))?;
        (answer.made.elapsed() < MAX_AGE).then(|| answer.clone())
    }

    /// Keeps the answer `token` got to `request` at `version`.
    pub fn keep_answer(&self, version: &Version, token: Uuid, request: Bytes, body: Bytes) {
        if body.len() > MAX_ANSWER {
            return;
        }
        let mut kept = self.kept();
        let Some(kept) = kept.at(version) else { return };
        let size = body.len() + request.len();
        while kept.bytes + size > MAX_BYTES {
            let Some(oldest) = kept.order.pop_front() else { break };
            if let Some(gone) = kept.answers.remove(&oldest) {
                kept.bytes -= gone.body.len() + oldest.1.len();
            }
        }
        let key = (token, request);
        let answer = Answer { made: Instant::now(), body };
        if let Some(replaced) = kept.answers.insert(key.clone(), answer) {
            kept.bytes -= replaced.body.len() + key.1.len();
        } else {
            kept.order.push_back(key);
        }
        kept.bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::cacheable;

    fn check(query: &str) -> bool {
        let document = async_graphql::parser::parse_query(query).expect("a query");
        cacheable(&document, None)
    }

    #[test]
    fn only_queries_of_the_read_models_are_kept() {
        assert!(check("{ applications(first: 50) { totalCount nodes { id name env { key value } } } }"));
        assert!(check("query Q { project(id: \"x\") { ...P } } fragment P on Project { id name }"));
        assert!(!check("mutation { archiveProject(id: \"x\") { id } }"));
        assert!(!check("subscription { events { eventType } }"));
        assert!(!check("{ deployment(id: \"x\") { id logs { line } } }"));
        assert!(!check("{ deployment(id: \"x\") { ...L } } fragment L on Deployment { logs { line } }"));
        assert!(!check("{ events(streamId: \"x\") { eventType } }"));
        assert!(!check("{ containerLogs(applicationId: \"x\") }"));
        assert!(!check("{ ... on Query { applications { totalCount } } }"));
    }
}
