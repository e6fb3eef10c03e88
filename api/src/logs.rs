//! Logs: a deployment's output as the deploy worker stores it, and a running application's
//! container output from whatever [`ContainerLogs`] source the process was given.
//!
//! A deployment's log is the table `deployment_logs`, read by sequence; notifications only say
//! "look now". The worker notifies [`CHANNEL`] with the deployment id after each batch it
//! writes. One listener per process ([`LogNotifier::run`]) turns each notification into a wake-up
//! of that deployment's followers, through a watch per followed deployment: a wake-up carries no
//! data, so a slow follower buffers nothing, and a lost notification only delays it until its
//! next poll ([`POLL`]). Followers read the new lines from the table themselves, in pages.

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::schema::types::{LOG_LINE_COLUMNS, LogLine};
use anyhow::Context as _;
use futures::Stream;
use futures::stream::BoxStream;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

/// The channel the deploy worker notifies, with the deployment id as payload, after it wrote
/// lines of that deployment's log.
pub const CHANNEL: &str = "zpanel_deployment_logs";
/// How often a follower reads the table when no notification woke it: what a lost
/// notification (or a listener that is down) costs at most.
pub const POLL: Duration = Duration::from_secs(1);
/// Lines a follower reads per query.
const PAGE: i64 = 500;
/// Lines a query returns when the client does not say.
const DEFAULT_LINES: i32 = 500;
/// Most lines a query returns.
const MAX_LINES: i32 = 1000;
/// How long a follower waits for a missing sequence number (a batch written before the lines
/// it sees, and not committed yet) before it gives up on those lines and goes on.
const GAP_GRACE: Duration = Duration::from_secs(5);
/// Waits between attempts to (re)connect the listener.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Container lines replayed when the client does not say.
const DEFAULT_TAIL: u32 = 100;
/// Most container lines replayed.
const MAX_TAIL: u32 = 10_000;

/// Which output of a container a line comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a container's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerLogLine {
    /// When the container wrote it.
    pub at: OffsetDateTime,
    /// Which output.
    pub stream: ContainerStream,
    /// The line, without its line break.
    pub text: String,
}

/// Where the output of applications' running containers comes from: the Docker engines the
/// workers reach, implemented outside this crate (which does not depend on the workers) and
/// handed to [`ApiState::container_logs`].
pub trait ContainerLogs: Send + Sync + std::fmt::Debug {
    /// The last `tail` lines the application's running container wrote, then each new line as it
    /// is written. The stream ends when the container stops; it is dropped when the subscriber
    /// goes away. The caller has checked that the application is the subscriber's.
    ///
    /// # Errors
    /// An `Err` item ends the subscription with an internal error (logged with its chain); a
    /// stream that has nothing to follow (no container running) should simply end.
    fn follow(&self, application_id: Uuid, tail: u32) -> BoxStream<'static, anyhow::Result<ContainerLogLine>>;
}

/// Wake-ups for the followers of deployments' logs, from one `LISTEN` per process.
#[derive(Clone, Debug)]
pub struct LogNotifier {
    inner: Arc<NotifierInner>,
}

#[derive(Debug)]
struct NotifierInner {
    pool: PgPool,
    /// A watch per deployment that someone follows; removed with its last follower.
    followed: Mutex<HashMap<Uuid, watch::Sender<()>>>,
}

impl LogNotifier {
    /// A notifier whose listener ([`LogNotifier::run`]) connects like `pool` does.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { inner: Arc::new(NotifierInner { pool, followed: Mutex::default() }) }
    }

    /// How many deployments are followed now.
    #[must_use]
    pub fn followed(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<()>>> {
        // The map stays consistent whatever panicked while holding it.
        self.inner.followed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A watch on `deployment`, woken by every notification for it from now on.
    pub(crate) fn watch(&self, deployment: Uuid) -> LogWatch {
        let receiver = self.lock().entry(deployment).or_insert_with(|| watch::Sender::new(())).subscribe();
        LogWatch { notifier: self.clone(), deployment, receiver: Some(receiver) }
    }

    fn wake(&self, deployment: Uuid) {
        if let Some(sender) = self.lock().get(&deployment) {
            sender.send_replace(());
        }
    }

    fn wake_all(&self) {
        for sender in self.lock().values() {
            sender.send_replace(());
        }
    }

    /// Listens on [`CHANNEL`] until `until` resolves, on a connection of its own (not one of the
    /// pool's, which requests need), reconnecting after failures. Whenever notifications may
    /// have been missed (connecting, reconnecting) every follower is woken to read.
    ///
    /// # Errors
    /// None: failures are logged and retried; followers poll meanwhile.
    pub async fn run(self, until: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(until);
        let options = PgPool::connect_options(&self.inner.pool).as_ref().clone();
        let pool =
            PgPoolOptions::new().max_connections(1).idle_timeout(None).max_lifetime(None).connect_lazy_with(options);
        let mut retry = RETRY_MIN;
        loop {
            let failed = tokio::select! {
                () = &mut until => break,
                Err(e) = self.listen(&pool, &mut retry) => e,
            };
            tracing::warn!(
                error = format!("{failed:#}"),
                retry_in_ms = retry.as_millis(),
                "the deployment log listener failed; followers poll until it is back"
            );
            self.wake_all();
            tokio::select! {
                () = &mut until => break,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
        pool.close().await;
        Ok(())
    }

    /// Connects, listens and forwards notifications; returns only when that fails.
    async fn listen(&self, pool: &PgPool, retry: &mut Duration) -> anyhow::Result<std::convert::Infallible> {
        let mut listener = PgListener::connect_with(pool).await.context("connecting the deployment log listener")?;
        listener.listen(CHANNEL).await.context("listening for deployment log notifications")?;
        *retry = RETRY_MIN;
        // Lines written while nobody listened are found by reading.
        self.wake_all();
        loop {
            match listener.try_recv().await.context("receiving deployment log notifications")? {
                Some(notification) => match Uuid::parse_str(notification.payload()) {
                    Ok(deployment) => self.wake(deployment),
                    Err(_) => tracing::debug!(
                        payload = notification.payload(),
                        "a deployment log notification that names no deployment"
                    ),
                },
                // The connection dropped and was re-established: notifications may be lost.
                None => self.wake_all(),
            }
        }
    }
}

/// One follower's wake-ups for one deployment.
#[derive(Debug)]
pub(crate) struct LogWatch {
    notifier: LogNotifier,
    deployment: Uuid,
    // Always `Some` until dropped; taken in `drop` so the count of receivers is right.
    receiver: Option<watch::Receiver<()>>,
}

impl LogWatch {
    /// Resolves at the first notification since the last call (or since the watch was made),
    /// or after `timeout`.
    async fn woken(&mut self, timeout: Duration) {
        let Some(receiver) = self.receiver.as_mut() else { return };
        if let Ok(Err(_)) = tokio::time::timeout(timeout, receiver.changed()).await {
            // The sender lives as long as any receiver, so this does not happen; if it did, the
            // follower would still poll rather than spin.
            tokio::time::sleep(timeout).await;
        }
    }
}

impl Drop for LogWatch {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut followed = self.notifier.lock();
        if followed.get(&self.deployment).is_some_and(|sender| sender.receiver_count() == 0) {
            followed.remove(&self.deployment);
        }
    }
}

/// `after` of a log query or subscription: a sequence number, 0 (the default) for the start.
///
/// # Errors
/// `INVALID_INPUT` when negative.
pub(crate) fn after_sequence(after: Option<i32>) -> ApiResult<i32> {
    match after {
        None => Ok(0),
        Some(n) if n >= 0 => Ok(n),
        Some(_) => Err(ApiError::invalid("after", "must be 0 or more")),
    }
}

/// `first` of a log query: default 500, at most 1000.
///
/// # Errors
/// `INVALID_INPUT` outside 0 to 1000.
pub(crate) fn page_of_lines(first: Option<i32>) -> ApiResult<i64> {
    match first {
        None => Ok(i64::from(DEFAULT_LINES)),
        Some(n) if (0..=MAX_LINES).contains(&n) => Ok(i64::from(n)),
        Some(_) => Err(ApiError::invalid("first", format!("must be between 0 and {MAX_LINES}"))),
    }
}

/// `tail` of `containerLogs`: default 100, at most 10,000.
///
/// # Errors
/// `INVALID_INPUT` outside 0 to 10,000.
pub(crate) fn tail(tail: Option<i32>) -> ApiResult<u32> {
    match tail.map(u32::try_from) {
        None => Ok(DEFAULT_TAIL),
        Some(Ok(n)) if n <= MAX_TAIL => Ok(n),
        Some(_) => Err(ApiError::invalid("tail", format!("must be between 0 and {MAX_TAIL}"))),
    }
}

/// Checks that `deployment` is one of `caller`'s team's (the log itself names no team).
///
/// # Errors
/// `NOT_FOUND` when it is not.
pub(crate) async fn team_deployment(state: &ApiState, caller: &Caller, deployment: Uuid) -> ApiResult<()> {
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from rm_deployments where team_id = $1 and deployment_id = $2)")
            .bind(caller.team_id.as_uuid())
            .bind(deployment)
            .fetch_one(&state.pool)
            .await?;
    if exists { Ok(()) } else { Err(ApiError::NotFound("deployment")) }
}

/// Whether a stored deployment status says it is over (no more lines will be written).
fn is_finished(status: &str) -> bool {
    use zpanel_domain::deployment::DeploymentStatus;
    serde_json::from_value::<DeploymentStatus>(serde_json::Value::String(status.to_owned()))
        .is_ok_and(DeploymentStatus::is_finished)
}

/// Checks that `application` is one of `caller`'s team's.
///
/// # Errors
/// `NOT_FOUND` when it is not.
pub(crate) async fn team_application(state: &ApiState, caller: &Caller, application: Uuid) -> ApiResult<()> {
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from rm_applications where team_id = $1 and application_id = $2)")
            .bind(caller.team_id.as_uuid())
            .bind(application)
            .fetch_one(&state.pool)
            .await?;
    if exists { Ok(()) } else { Err(ApiError::NotFound("application")) }
}

/// Up to `limit` lines of `deployment`'s log after sequence `after`, in order.
///
/// # Errors
/// When the database fails.
pub(crate) async fn read_lines(pool: &PgPool, deployment: Uuid, after: i32, limit: i64) -> ApiResult<Vec<LogLine>> {
    let rows = sqlx::query(&format!(
        "select {LOG_LINE_COLUMNS} from deployment_logs
          where deployment_id = $1 and sequence > $2 order by sequence limit $3"
    ))
    .bind(deployment)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(LogLine::from_row).collect()
}

/// `deployment`'s log after sequence `after`: the stored lines, then each new one as it is
/// written, in sequence order; the stream ends once the deployment has finished and every line
/// was delivered. The caller has checked that the deployment is the subscriber's.
pub(crate) fn follow_deployment(
    state: &ApiState,
    deployment: Uuid,
    after: i32,
) -> impl Stream<Item = ApiResult<LogLine>> + Send + 'static {
    // Watch first, then read: a line written after the watch exists wakes it.
    let follower = Follower {
        watch: state.logs.watch(deployment),
        pool: state.pool.clone(),
        deployment,
        last: after,
        pending: VecDeque::new(),
        finished: false,
        gap_since: None,
        ended: false,
    };
    futures::stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    })
}

/// One subscriber's place in a deployment's log.
struct Follower {
    watch: LogWatch,
    pool: PgPool,
    deployment: Uuid,
    /// The last sequence delivered (or skipped).
    last: i32,
    pending: VecDeque<LogLine>,
    /// Whether the deployment was seen finished (before the last read of lines).
    finished: bool,
    /// Since when the next sequence is missing while later ones are there.
    gap_since: Option<Instant>,
    ended: bool,
}

/// What a read found.
enum Read {
    /// Lines to deliver.
    Lines,
    /// Nothing yet.
    Wait,
    /// Nothing, ever again.
    End,
}

impl Follower {
    async fn next(&mut self) -> Option<ApiResult<LogLine>> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(Ok(line));
            }
            if self.ended {
                return None;
            }
            match self.read().await {
                Ok(Read::Lines) => {}
                Ok(Read::Wait) => self.watch.woken(POLL).await,
                Ok(Read::End) => self.ended = true,
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
        }
    }

    async fn read(&mut self) -> ApiResult<Read> {
        // The status before the lines: the worker writes its last line before it reports the
        // deployment finished, so once that shows, the read that follows sees every line.
        if !self.finished {
            let status: Option<String> =
                sqlx::query_scalar("select status from rm_deployments where deployment_id = $1")
                    .bind(self.deployment)
                    .fetch_optional(&self.pool)
                    .await?;
            self.finished = is_finished(&status.ok_or(ApiError::NotFound("deployment"))?);
        }
        let lines = read_lines(&self.pool, self.deployment, self.last, PAGE).await?;
        let Some(first) = lines.first() else {
            return Ok(if self.finished { Read::End } else { Read::Wait });
        };
        if first.sequence != self.last.saturating_add(1) {
            // A batch before these lines is not committed yet; wait for it, within reason. Once
            // the deployment is over, it never will be.
            let since = *self.gap_since.get_or_insert_with(Instant::now);
            if !self.finished && since.elapsed() < GAP_GRACE {
                return Ok(Read::Wait);
            }
            tracing::warn!(
                deployment = %self.deployment,
                missing_from = self.last.saturating_add(1),
                missing_to = first.sequence - 1,
                "lines of a deployment's log never appeared; skipping them"
            );
            self.last = first.sequence - 1;
        }
        self.gap_since = None;
        for line in lines {
            if line.sequence != self.last.saturating_add(1) {
                break;
            }
            self.last = line.sequence;
            self.pending.push_back(line);
        }
        Ok(Read::Lines)
    }
}

/// The lines of a container's log as [`LogLine`]s numbered from 1; the first error ends it.
pub(crate) fn container_lines(
    lines: BoxStream<'static, anyhow::Result<ContainerLogLine>>,
) -> impl Stream<Item = ApiResult<LogLine>> + Send + 'static {
    futures::stream::unfold((lines, 0_i32, false), |(mut lines, sequence, ended)| async move {
        if ended {
            return None;
        }
        match futures::StreamExt::next(&mut lines).await? {
            Ok(line) => {
                let sequence = sequence.saturating_add(1);
                Some((Ok(LogLine::from_container(sequence, line)), (lines, sequence, false)))
            }
            Err(e) => Some((Err(e.context("following a container's log").into()), (lines, sequence, true))),
        }
    })
}
