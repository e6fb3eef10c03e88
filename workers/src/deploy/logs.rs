//! A deployment's log: lines numbered in order, secrets redacted before they leave the
//! process, written to `deployment_logs` in batches, each batch announced on
//! `zpanel_deployment_logs` so subscribers read it at once.

use anyhow::Context as _;
use sqlx::PgPool;
use std::sync::Arc;
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
/// never slows down for the database; the writer ends when the last clone is dropped.
#[derive(Clone)]
pub struct DeployLog {
    messages: mpsc::UnboundedSender<Message>,
    redactions: Arc<Vec<String>>,
}

impl std::fmt::Debug for DeployLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployLog").finish_non_exhaustive()
    }
}

impl DeployLog {
    /// Opens the log of `deployment_id`, continuing after the lines already stored (a
    /// deployment taken over keeps one log). `redactions` are the secret values to hide.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn start(pool: PgPool, deployment_id: Uuid, redactions: Vec<String>) -> anyhow::Result<Self> {
        let last: i32 =
            sqlx::query_scalar("select coalesce(max(sequence), 0) from deployment_logs where deployment_id = $1")
                .bind(deployment_id)
                .fetch_one(&pool)
                .await
                .context("reading the deployment log's length")?;
        let (messages, received) = mpsc::unbounded_channel();
        tokio::spawn(write(pool, deployment_id, last, received));
        let mut redactions: Vec<String> = redactions.into_iter().filter(|s| s.len() >= MIN_REDACTED_LEN).collect();
        // Longest first, so a secret containing another is hidden whole.
        redactions.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(Self { messages, redactions: Arc::new(redactions) })
    }

    /// Adds a line.
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
        let _ = self.messages.send(Message::Line(Line { stream, at: OffsetDateTime::now_utc(), text }));
    }

    /// Adds a line of Zpanel's own.
    pub fn system(&self, text: String) {
        self.line(Stream::System, &text);
    }

    /// Waits until every line added so far is stored (or given up on).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.messages.send(Message::Flush(done)).is_ok() {
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

async fn write(pool: PgPool, deployment_id: Uuid, mut last: i32, mut received: mpsc::UnboundedReceiver<Message>) {
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
}
