//! The running parts of `zpanel serve`: the projection runner, the subscription feed and the
//! API server, started together over one pool and stopped together. `serve` and the API
//! benchmarks run exactly this.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinSet;
use zpanel_api::ApiState;
use zpanel_api::limits::RateLimiter;
use zpanel_commands::{AppendSignal, CommandHandler, Keyring, PgEventStore};
use zpanel_projections::ProjectionRunner;

/// The parts, running.
#[derive(Debug)]
pub struct App {
    /// What the API handlers share.
    pub state: ApiState,
    /// Where the API listens.
    pub address: SocketAddr,
    stop: watch::Sender<bool>,
    parts: JoinSet<anyhow::Result<()>>,
}

/// Starts the projections, the feed and the API on `listener`. Appends through the returned
/// state raise `signal`, which wakes the projections at once.
///
/// # Errors
/// When the listener has no address.
pub fn start(
    pool: sqlx::PgPool,
    signal: AppendSignal,
    keyring: Keyring,
    listener: tokio::net::TcpListener,
    rate: RateLimiter,
) -> anyhow::Result<App> {
    let runner = ProjectionRunner::new(pool.clone(), zpanel_projections::all());
    let names: Vec<String> = runner.names().into_iter().map(str::to_owned).collect();
    let feed = zpanel_api::feed::Feed::new(pool.clone(), names, runner.projected());
    let state = ApiState {
        handler: CommandHandler::new(PgEventStore::new(pool.clone(), signal.clone())),
        pool,
        keyring: Arc::new(keyring),
        feed: feed.clone(),
        rate: Arc::new(rate),
        metrics: Arc::default(),
        token_checks: Arc::default(),
    };
    let address = listener.local_addr()?;
    // One stop signal, seen by every part.
    let (stop, stopped) = watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let mut parts = JoinSet::new();
    let until = until_stopped();
    parts.spawn(async move { runner.run(signal, until).await.context("the projection runner") });
    let until = until_stopped();
    parts.spawn(async move { feed.run(until).await.context("the subscription feed") });
    let (router, until) = (zpanel_api::router(state.clone()), until_stopped());
    parts.spawn(async move { zpanel_api::serve(listener, router, until).await.context("the API server") });
    Ok(App { state, address, stop, parts })
}

impl App {
    /// Runs until `shutdown` resolves or a part stops on its own (which is a failure), then
    /// stops the others and waits for them; open requests finish first.
    ///
    /// # Errors
    /// The first part's failure.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let early = tokio::select! {
            () = shutdown => None,
            Some(ended) = self.parts.join_next() => Some(ended),
        };
        let _ = self.stop.send(true);
        let mut result = match early {
            None => Ok(()),
            Some(ended) => match ended.context("a part of zpanel panicked") {
                Ok(Ok(())) => Err(anyhow::anyhow!("a part of zpanel stopped on its own")),
                Ok(Err(e)) | Err(e) => Err(e),
            },
        };
        while let Some(ended) = self.parts.join_next().await {
            if let Err(e) = ended.context("a part of zpanel panicked").and_then(|r| r) {
                if result.is_ok() {
                    result = Err(e);
                } else {
                    tracing::error!(error = format!("{e:#}"), "stopping zpanel");
                }
            }
        }
        result
    }
}
