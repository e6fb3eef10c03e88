//! Prometheus metrics, in the text exposition format: requests and their latencies, command
//! outcomes, subscribers; projection lag is read from the checkpoints when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Latency buckets, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Renders more metrics into the exposition (e.g. the workers' counters, owned elsewhere).
pub type Source = Box<dyn Fn(&mut String) + Send + Sync>;

/// The process's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    commands: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    webhooks: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    sources: Mutex<Vec<Source>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    /// Records a GraphQL request: its kind (`query`, `mutation`, …), outcome (`ok`, `error`)
    /// and duration.
    pub fn request(&self, kind: &'static str, outcome: &'static str, took: Duration) {
        let mut requests = lock(&self.requests);
        let h = requests.entry((kind, outcome)).or_default();
        let secs = took.as_secs_f64();
        for (bucket, count) in BUCKETS.iter().zip(h.counts.iter_mut()) {
            if secs <= *bucket {
                *count += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Records a command's outcome for an aggregate kind.
    pub fn command(&self, kind: &'static str, outcome: &'static str) {
        *lock(&self.commands).entry((kind, outcome)).or_default() += 1;
    }

    /// Records a git webhook delivery: its provider (`github`, …) and outcome (`queued`,
    /// `repeated`, `ignored`, `unauthorized`, …).
    pub fn webhook(&self, provider: &'static str, outcome: &'static str) {
        *lock(&self.webhooks).entry((provider, outcome)).or_default() += 1;
    }

    /// Adds a source of more metrics, rendered at every scrape.
    pub fn add_source(&self, source: Source) {
        lock(&self.sources).push(source);
    }

    /// The text exposition, with `extra` lines (gauges read at scrape time) appended.
    #[must_use]
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::new();
        out.push_str("# HELP zpanel_graphql_requests_seconds GraphQL requests by kind and outcome.\n");
        out.push_str("# TYPE zpanel_graphql_requests_seconds histogram\n");
        for ((kind, outcome), h) in lock(&self.requests).iter() {
            let labels = format!("kind=\"{kind}\",outcome=\"{outcome}\"");
            for (bucket, count) in BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(out, "zpanel_graphql_requests_seconds_bucket{{{labels},le=\"{bucket}\"}} {count}");
            }
            let _ = writeln!(out, "zpanel_graphql_requests_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "zpanel_graphql_requests_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "zpanel_graphql_requests_seconds_count{{{labels}}} {}", h.count);
        }
        out.push_str("# HELP zpanel_commands_total Commands sent, by aggregate kind and outcome.\n");
        out.push_str("# TYPE zpanel_commands_total counter\n");
        for ((kind, outcome), n) in lock(&self.commands).iter() {
            let _ = writeln!(out, "zpanel_commands_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}");
        }
        out.push_str("# HELP zpanel_webhook_deliveries_total Git webhook deliveries, by provider and outcome.\n");
        out.push_str("# TYPE zpanel_webhook_deliveries_total counter\n");
        for ((provider, outcome), n) in lock(&self.webhooks).iter() {
            let _ =
                writeln!(out, "zpanel_webhook_deliveries_total{{provider=\"{provider}\",outcome=\"{outcome}\"}} {n}");
        }
        out.push_str(extra);
        for source in lock(&self.sources).iter() {
            source(&mut out);
        }
        out
    }
}
