//! A deployment's log: lines numbered in order, secrets redacted before they leave the
//! process, written to `deployment_logs` in batches, each batch announced on
//! `zpanel_deployment_logs` so subscribers read it at once.
//!
//! A deployment runs a tenant's programs (git, the build, the container), and they may print
//! without end: the output a deployment keeps is capped in lines and bytes ([`LogLimits`]), and
//! the log says where it was cut. Zpanel's own lines are few (a bounded number per step) and
//! always kept, so the log still tells how the deployment ended.

use anyhow::Context as _;
use sqlx::PgPool;
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Lines written per statement.
const BATCH: usize = 500;
/// What replaces a secret's value in a line.
const REDACTED: &str = "[redacted]";
/// Secret values shorter than this are not redacted: replacing every `a` of a log would hide
/// everything and protect nothing.
const MIN_REDACTED_LEN: usize = 4;
/// The longest line kept; longer ones are cut (a minified file echoed by a build).
const MAX_LINE: usize = 16 * 1024;

/// Lines of Zpanel's own the queue holds beyond the output cap: the channel is bounded by the
/// cap plus these, so it never refuses a line the cap lets through.
const OWN_LINES: usize = 4096;

/// How much of its programs' output one deployment keeps (`ZPANEL_DEPLOY_LOG_MAX_LINES`,
/// `ZPANEL_DEPLOY_LOG_MAX_BYTES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimits {
    /// Lines of output (standard output and error) kept.
    pub max_lines: usize,
    /// Bytes of output kept (after redaction).
    pub max_bytes: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self { max_lines: 20_000, max_bytes: 5 * 1024 * 1024 }
    }
}

/// What the deployment's output has used of its limits.
#[derive(Debug, Default)]
struct Budget {
    lines: usize,
    bytes: usize,
    /// Output left out since the cap was reached.
    left_out: usize,
}

/// Which output a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Zpanel's own account of the steps.
    System,
    /// A program's standard output (git, the build, the container).
    Stdout,
    /// A program's error output.
    Stderr,
}

impl Stream {
    const fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

struct Line {
    stream: Stream,
    at: OffsetDateTime,
    text: String,
}

enum Message {
    Line(Line),
    Flush(oneshot::Sender<()>),
}

/// The log of one deployment; cheap to clone. Lines are queued without waiting, so a step
/// never slows down for the database; the writer ends when the last clone is dropped. The
/// queue is bounded, and so is what goes into it: output beyond the deployment's
/// [`LogLimits`] is counted, not kept.
#[derive(Clone)]
pub struct DeployLog {
    messages: mpsc::Sender<Message>,
    redactions: Arc<Vec<String>>,
    limits: LogLimits,
    budget: Arc<Mutex<Budget>>,
}

impl std::fmt::Debug for DeployLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployLog").finish_non_exhaustive()
    }
}

impl DeployLog {
    /// Opens the log of `deployment_id`, continuing after the lines already stored (a
    /// deployment taken over keeps one log, and its output counts against `limits` once).
    /// `redactions` are the secret values to hide.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn start(
        pool: PgPool,
        deployment_id: Uuid,
        redactions: Vec<String>,
        limits: LogLimits,
    ) -> anyhow::Result<Self> {
        let (last, lines, bytes): (i32, i64, i64) = sqlx::query_as(
            "select coalesce(max(sequence), 0), count(*) filter (where stream <> 'system'),
                    coalesce(sum(octet_length(text)) filter (where stream <> 'system'), 0)::int8
               from deployment_logs where deployment_id = $1",
        )
        .bind(deployment_id)
        .fetch_one(&pool)
        .await
        .context("reading the deployment log's length")?;
        let (messages, received) = mpsc::channel(limits.max_lines.saturating_add(OWN_LINES));
        tokio::spawn(write(pool, deployment_id, last, received));
        let mut redactions: Vec<String> = redactions.into_iter().filter(|s| s.len() >= MIN_REDACTED_LEN).collect();
        // Longest first, so a secret containing another is hidden whole.
        redactions.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let budget = Budget {
            lines: usize::try_from(lines).unwrap_or(usize::MAX),
            bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
            left_out: 0,
        };
        Ok(Self { messages, redactions: Arc::new(redactions), limits, budget: Arc::new(Mutex::new(budget)) })
    }

    /// Adds a line. Output (not Zpanel's own lines) past the deployment's limits is left out;
    /// the first line left out is replaced by a line saying so.
    pub fn line(&self, stream: Stream, text: &str) {
        let mut text = redact(text, &self.redactions);
        if text.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push_str(" […]");
        }
        let Some((stream, text)) = self.admit(stream, text) else {
            return;
        };
        // The queue holds every line the limits let through, and Zpanel's own (a bounded number
        // per step): it is never full unless the writer has stopped.
        if self.messages.try_send(Message::Line(Line { stream, at: OffsetDateTime::now_utc(), text })).is_err() {
            tracing::warn!("a deployment log line was dropped: the log's queue is full or closed");
        }
    }

    /// The line to queue for `text`: itself while the output is within its limits; the line
    /// saying the output was cut, at the first one past them; nothing after that.
    fn admit(&self, stream: Stream, text: String) -> Option<(Stream, String)> {
        if stream == Stream::System {
            return Some((stream, text));
        }
        let Ok(mut budget) = self.budget.lock() else {
            return None;
        };
        let limits = self.limits;
        let fits = budget.lines < limits.max_lines && budget.bytes.saturating_add(text.len()) <= limits.max_bytes;
        if fits && budget.left_out == 0 {
            budget.lines += 1;
            budget.bytes += text.len();
            return Some((stream, text));
        }
        budget.left_out += 1;
        (budget.left_out == 1).then(|| {
            (
                Stream::System,
                format!(
                    "the output reached this deployment's log limit ({} lines, {} bytes); the rest is left out",
                    limits.max_lines, limits.max_bytes
                ),
            )
        })
    }

    /// How many lines of output were left out past the limits.
    #[must_use]
    pub fn left_out(&self) -> usize {
        self.budget.lock().map(|b| b.left_out).unwrap_or(0)
    }

    /// Adds a line of Zpanel's own.
    pub fn system(&self, text: String) {
        self.line(Stream::System, &text);
    }

    /// Waits until every line added so far is stored (or given up on).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.messages.send(Message::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }
}

/// Replaces every secret value in `text`.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), REDACTED);
        }
    }
    text
}

async fn write(pool: PgPool, deployment_id: Uuid, mut last: i32, mut received: mpsc::Receiver<Message>) {
    let mut messages = Vec::with_capacity(BATCH);
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushed = Vec::new();
    while received.recv_many(&mut messages, BATCH).await > 0 {
        for message in messages.drain(..) {
            match message {
                Message::Line(line) => batch.push(line),
                Message::Flush(done) => flushed.push(done),
            }
        }
        let mut attempts = 0;
        while !batch.is_empty() {
            match insert(&pool, deployment_id, last, &batch).await {
                Ok(()) => break,
                Err(e) if attempts < 5 => {
                    attempts += 1;
                    tracing::warn!(%deployment_id, error = format!("{e:#}"), "writing deployment log lines; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200 << attempts)).await;
                }
                Err(e) => {
                    tracing::error!(%deployment_id, error = format!("{e:#}"), lines = batch.len(), "deployment log lines lost");
                    break;
                }
            }
        }
        last += i32::try_from(batch.len()).unwrap_or(i32::MAX);
        batch.clear();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn insert(pool: &PgPool, deployment_id: Uuid, last: i32, batch: &[Line]) -> anyhow::Result<()> {
    let mut sequences = Vec::with_capacity(batch.len());
    let mut streams = Vec::with_capacity(batch.len());
    let mut ats = Vec::with_capacity(batch.len());
    let mut texts = Vec::with_capacity(batch.len());
    for (n, line) in (1..).zip(batch) {
        sequences.push(last + n);
        streams.push(line.stream.as_str());
        ats.push(line.at);
        texts.push(line.text.as_str());
    }
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into deployment_logs (deployment_id, sequence, stream, at, text)
         select $1, * from unnest($2::int4[], $3::text[], $4::timestamptz[], $5::text[])
         on conflict (deployment_id, sequence) do nothing",
    )
    .bind(deployment_id)
    .bind(&sequences)
    .bind(&streams)
    .bind(&ats)
    .bind(&texts)
    .execute(&mut *tx)
    .await
    .context("inserting deployment log lines")?;
    sqlx::query("select pg_notify('zpanel_deployment_logs', $1)")
        .bind(deployment_id.to_string())
        .execute(&mut *tx)
        .await
        .context("announcing deployment log lines")?;
    tx.commit().await.context("committing deployment log lines")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_longest_first() {
        let secrets = vec!["hunter2-extended".to_owned(), "hunter2".to_owned()];
        assert_eq!(redact("pw=hunter2-extended and hunter2", &secrets), "pw=[redacted] and [redacted]");
        assert_eq!(redact("nothing here", &secrets), "nothing here");
    }

    fn log_with(limits: LogLimits) -> (DeployLog, mpsc::Receiver<Message>) {
        let (messages, received) = mpsc::channel(limits.max_lines + OWN_LINES);
        let log =
            DeployLog { messages, redactions: Arc::new(vec!["hunter2".to_owned()]), limits, budget: Arc::default() };
        (log, received)
    }

    fn texts(received: &mut mpsc::Receiver<Message>) -> Vec<(Stream, String)> {
        let mut out = Vec::new();
        while let Ok(message) = received.try_recv() {
            if let Message::Line(line) = message {
                out.push((line.stream, line.text));
            }
        }
        out
    }

    #[test]
    fn output_past_the_line_limit_is_left_out_and_the_log_says_so_once() {
        let (log, mut received) = log_with(LogLimits { max_lines: 3, max_bytes: 1 << 20 });
        for n in 1..=10 {
            log.line(Stream::Stdout, &format!("line {n}"));
        }
        log.system("released".to_owned());
        let lines = texts(&mut received);
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[2], (Stream::Stdout, "line 3".to_owned()));
        assert_eq!(lines[3].0, Stream::System);
        assert!(lines[3].1.contains("log limit (3 lines"), "{lines:?}");
        assert_eq!(lines[4], (Stream::System, "released".to_owned()), "Zpanel's own lines are kept");
        assert_eq!(log.left_out(), 7);
    }

    #[test]
    fn output_past_the_byte_limit_is_left_out_counting_redacted_bytes() {
        let (log, mut received) = log_with(LogLimits { max_lines: 100, max_bytes: 20 });
        log.line(Stream::Stderr, "pw=hunter2");
        log.line(Stream::Stdout, "0123456789");
        log.line(Stream::Stdout, "short");
        let lines = texts(&mut received);
        assert_eq!(lines[0], (Stream::Stderr, "pw=[redacted]".to_owned()));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].1.contains("20 bytes"), "{lines:?}");
    }
}
