//! Subscriptions, fed by the [`crate::feed`]: an update reaches a subscriber only once every
//! read model shows it. Logs come from [`crate::logs`] instead: they are not events. Each
//! subscription re-checks its token (the feed's when the token's stream moves, every
//! subscription at least every [`RECHECK`]), so revoking a token closes its subscriptions.

use super::query::AuditFilter;
use super::types::{Application, AuditEntry, Deployment, LogLine};
use super::{caller, load, parse_id};
use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::feed::FeedEntry;
use crate::hub::{Resume, Tap};
use crate::logs;
use async_graphql::{Context, ID, Subscription};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::broadcast::error::RecvError;
use zpanel_commands::Cursor;
use zpanel_domain::values::Ability;

/// How often an idle subscription re-checks its token.
pub const RECHECK: Duration = Duration::from_secs(5);

/// The subscription root.
#[derive(Debug, Default)]
pub struct Subscription;

/// The team's audit entries from the moment of subscribing, in log order; after falling
/// behind, the missed ones from the audit log, the first flagged as resynchronised. Ends with
/// `UNAUTHENTICATED` once the token is revoked or expires.
/// With `resume`, the entries after that one come first (the first flagged as resynchronised):
/// a subscriber that fell behind a shared execution goes on alone from there ([`crate::hub`]).
async fn team_entries(
    state: ApiState,
    caller: Caller,
    resume: Option<Cursor>,
) -> ApiResult<impl Stream<Item = ApiResult<(FeedEntry, bool)>>> {
    // Subscribe first, then read where the read models are: every entry past that point is
    // then either in the channel or (after a lag) in the audit log.
    let receiver = state.feed.subscribe();
    let last = state.feed.read_horizon().await?.max(state.feed.horizon());
    let mut pending = std::collections::VecDeque::new();
    if let Some(after) = resume.filter(|after| *after < last) {
        let missed = state.feed.entries_between(Some(*caller.team_id.as_uuid()), after, last).await?;
        pending.extend(missed.into_iter().enumerate().map(|(i, entry)| (entry, i == 0)));
    }
    let follower = Follower {
        receiver,
        last,
        token_stream: format!("api_token-{}", caller.token_id),
        pending,
        ended: false,
        checked: tokio::time::Instant::now(),
        recheck: Box::pin(tokio::time::sleep(RECHECK)),
        state,
        caller,
    };
    Ok(futures::stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    }))
}

/// One subscriber's place in the feed.
struct Follower {
    state: ApiState,
    caller: Caller,
    receiver: tokio::sync::broadcast::Receiver<Arc<FeedEntry>>,
    last: Cursor,
    token_stream: String,
    pending: std::collections::VecDeque<(FeedEntry, bool)>,
    ended: bool,
    checked: tokio::time::Instant,
    /// When the token is next checked if nothing else made it so: one timer for the whole
    /// subscription, not one per entry.
    recheck: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Follower {
    async fn next(&mut self) -> Option<ApiResult<(FeedEntry, bool)>> {
        if self.ended {
            return None;
        }
        let team = *self.caller.team_id.as_uuid();
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            let received = tokio::select! {
                biased;
                received = self.receiver.recv() => Ok(received),
                () = self.recheck.as_mut() => Err(()),
            };
            // The token is checked again when it may have changed: its own stream moved, or
            // it was last checked a while ago.
            let (recheck, seen) = match &received {
                Ok(Ok(entry)) if entry.entry.stream_id == self.token_stream => (true, entry.cursor),
                Ok(Ok(_)) => (self.checked.elapsed() >= RECHECK, Cursor::START),
                _ => (true, Cursor::START),
            };
            if recheck {
                self.checked = tokio::time::Instant::now();
                self.recheck.as_mut().reset(self.checked + RECHECK);
                let horizon = self.state.feed.horizon();
                let checks = &self.state.token_checks;
                match checks.still_valid(&self.state.pool, &self.caller, horizon, seen, RECHECK).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.ended = true;
                        return Some(Err(ApiError::Unauthenticated));
                    }
                    Err(e) => {
                        self.ended = true;
                        return Some(Err(e));
                    }
                }
            }
            match received {
                Err(_) => {}
                Ok(Ok(entry)) => {
                    if entry.cursor > self.last {
                        self.last = entry.cursor;
                        if entry.team_id == team {
                            self.pending.push_back((FeedEntry::clone(&entry), false));
                        }
                    }
                }
                Ok(Err(RecvError::Lagged(missed))) => {
                    tracing::debug!(missed, "a subscriber fell behind; resynchronising from the audit log");
                    let until = self.state.feed.horizon();
                    match self.state.feed.entries_between(Some(team), self.last, until).await {
                        Ok(entries) => {
                            self.last = until.max(self.last);
                            let mut first = true;
                            for entry in entries {
                                self.pending.push_back((entry, std::mem::take(&mut first)));
                            }
                        }
                        Err(e) => {
                            self.ended = true;
                            return Some(Err(e.into()));
                        }
                    }
                }
                Ok(Err(RecvError::Closed)) => return None,
            }
        }
    }
}

/// `items`, ended with `UNAUTHENTICATED` once the token is revoked or expires: it is re-checked
/// before the first delivery, then at least every [`RECHECK`], while items come and while none
/// do. The first error ends the stream too.
fn until_revoked<T: Send + 'static>(
    state: ApiState,
    caller: Caller,
    items: impl Stream<Item = ApiResult<T>> + Send + 'static,
) -> impl Stream<Item = ApiResult<T>> + Send + 'static {
    let guarded = Guarded { items: Box::pin(items), state, caller, checked: None };
    futures::stream::unfold(Some(guarded), |open| async move {
        let mut g = open?;
        loop {
            let due = g.checked.map_or(Duration::ZERO, |at| RECHECK.saturating_sub(at.elapsed()));
            // Cancel-safe: a stream keeps its place when a `next` is dropped.
            let next = tokio::time::timeout(due.max(Duration::from_millis(1)), g.items.next()).await;
            if g.checked.is_none_or(|at| at.elapsed() >= RECHECK) {
                g.checked = Some(tokio::time::Instant::now());
                let (state, horizon) = (&g.state, g.state.feed.horizon());
                match state.token_checks.still_valid(&state.pool, &g.caller, horizon, Cursor::START, RECHECK).await {
                    Ok(true) => {}
                    Ok(false) => return Some((Err(ApiError::Unauthenticated), None)),
                    Err(e) => return Some((Err(e), None)),
                }
            }
            match next {
                Ok(Some(Ok(item))) => return Some((Ok(item), Some(g))),
                Ok(Some(Err(e))) => return Some((Err(e), None)),
                Ok(None) => return None,
                Err(_idle) => {}
            }
        }
    })
}

/// A subscription's items and what re-checking its token takes.
struct Guarded<T> {
    items: BoxStream<'static, ApiResult<T>>,
    state: ApiState,
    caller: Caller,
    /// When the token was last checked.
    checked: Option<tokio::time::Instant>,
}

fn entry_time(entry: &AuditEntry) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&entry.at, &Rfc3339).ok()
}

#[Subscription]
impl Subscription {
    /// The team's audit log, live: every change as it becomes visible, in order.
    async fn events(
        &self,
        ctx: &Context<'_>,
        filter: Option<AuditFilter>,
    ) -> Result<impl Stream<Item = ApiResult<AuditEntry>>, ApiError> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let filter = filter.unwrap_or_default().parse()?;
        let resume = ctx.data_opt::<Resume>().map(|resume| resume.0);
        let tap = ctx.data_opt::<Tap>().cloned();
        let entries = team_entries(state.clone(), caller.clone(), resume).await?;
        Ok(futures::StreamExt::filter_map(entries, move |item| {
            let (filter, tap) = (filter.clone(), tap.clone());
            async move {
                match item {
                    Ok((feed, resynced)) => filter.matches(&feed.entry, || entry_time(&feed.entry)).then(|| {
                        if let Some(tap) = tap {
                            tap.record(feed.cursor);
                        }
                        let mut entry = feed.entry;
                        entry.resynchronised = resynced;
                        Ok(entry)
                    }),
                    Err(e) => Some(Err(e)),
                }
            }
        }))
    }

    /// An application, each time it changes.
    async fn application_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<impl Stream<Item = ApiResult<Application>>, ApiError> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let id = parse_id(&id, "application")?;
        if load::application(state, caller, id).await?.is_none() {
            return Err(ApiError::NotFound("application"));
        }
        let stream_id = format!("application-{id}");
        let (state, caller) = (state.clone(), Arc::new(caller.clone()));
        let entries = team_entries(state.clone(), Caller::clone(&caller), None).await?;
        Ok(futures::StreamExt::filter_map(entries, move |item| {
            let (state, caller, stream_id) = (state.clone(), Arc::clone(&caller), stream_id.clone());
            async move {
                match item {
                    Ok((feed, _)) if feed.entry.stream_id == stream_id => {
                        load::application(&state, &caller, id).await.transpose()
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                }
            }
        }))
    }

    /// An application's deployments, each time one is queued or changes.
    async fn deployment_updated(
        &self,
        ctx: &Context<'_>,
        application_id: ID,
    ) -> Result<impl Stream<Item = ApiResult<Deployment>>, ApiError> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let application = parse_id(&application_id, "application")?;
        if load::application(state, caller, application).await?.is_none() {
            return Err(ApiError::NotFound("application"));
        }
        let (state, caller) = (state.clone(), Arc::new(caller.clone()));
        let entries = team_entries(state.clone(), Caller::clone(&caller), None).await?;
        Ok(futures::StreamExt::filter_map(entries, move |item| {
            let (state, caller) = (state.clone(), Arc::clone(&caller));
            async move {
                match item {
                    Ok((feed, _)) => {
                        let id = feed.entry.stream_id.strip_prefix("deployment-")?.parse().ok()?;
                        match load::deployment(&state, &caller, id).await {
                            Ok(Some(d)) if d.application_id.as_str() == application.to_string() => Some(Ok(d)),
                            Ok(_) => None,
                            Err(e) => Some(Err(e)),
                        }
                    }
                    Err(e) => Some(Err(e)),
                }
            }
        }))
    }

    /// A deployment's log: the stored lines after sequence `after` (default: from the first),
    /// then each new line as the deployment writes it, in order. Completes once the deployment
    /// has finished and every line was sent.
    async fn deployment_logs(
        &self,
        ctx: &Context<'_>,
        deployment_id: ID,
        after: Option<i32>,
    ) -> Result<impl Stream<Item = ApiResult<LogLine>>, ApiError> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let after = logs::after_sequence(after)?;
        let deployment = parse_id(&deployment_id, "deployment")?;
        logs::team_deployment(state, caller, deployment).await?;
        let lines = logs::follow_deployment(state, deployment, after);
        Ok(until_revoked(state.clone(), caller.clone(), lines))
    }

    /// An application's running container's output: its last `tail` lines (default 100, up to
    /// 10000), then each new one. Lines are numbered from 1 within the subscription. Completes
    /// when the container stops.
    async fn container_logs(
        &self,
        ctx: &Context<'_>,
        application_id: ID,
        tail: Option<i32>,
    ) -> Result<impl Stream<Item = ApiResult<LogLine>>, ApiError> {
        let (state, caller) = caller(ctx)?;
        caller.require(Ability::Read)?;
        let tail = logs::tail(tail)?;
        let application = parse_id(&application_id, "application")?;
        logs::team_application(state, caller, application).await?;
        let source = state
            .container_logs
            .as_ref()
            .ok_or_else(|| ApiError::Conflict("container logs are not available in this process".into()))?;
        let lines = logs::container_lines(source.follow(application, tail));
        Ok(until_revoked(state.clone(), caller.clone(), lines))
    }
}
