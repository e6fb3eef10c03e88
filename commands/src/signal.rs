//! Waking readers of the log promptly. An append raises the signal in-process at once; the
//! bridge carries it between processes with PostgreSQL `LISTEN/NOTIFY`. The notification is sent
//! by the bridge, coalesced, outside the append's transaction: a `NOTIFY` inside it would take
//! PostgreSQL's global notify lock at every commit and serialize all appends.

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::sync::Arc;
use tokio::sync::watch;

/// The channel the bridge uses.
pub const NOTIFY_CHANNEL: &str = "zpanel_events";

/// A counter that moves whenever new events may be readable.
#[derive(Clone, Debug)]
pub struct AppendSignal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    // Moves for every append made by this process: the bridge forwards these to other processes.
    local: watch::Sender<u64>,
    // Moves for every append anywhere: readers wait on this.
    any: watch::Sender<u64>,
}

impl Default for AppendSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl AppendSignal {
    /// A new signal.
    #[must_use]
    pub fn new() -> Self {
        Self { inner: Arc::new(Inner { local: watch::Sender::new(0), any: watch::Sender::new(0) }) }
    }

    /// Tells readers that this process appended.
    pub fn raise(&self) {
        self.inner.local.send_modify(|n| *n = n.wrapping_add(1));
        self.raise_remote();
    }

    /// Tells readers that another process appended.
    pub fn raise_remote(&self) {
        self.inner.any.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver whose `changed()` resolves after the next append anywhere.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.any.subscribe()
    }

    /// Forwards this process's appends to other processes and theirs to this one, until the
    /// returned task is aborted.
    ///
    /// # Errors
    /// When the listener cannot connect.
    pub async fn bridge(&self, pool: PgPool) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut listener = PgListener::connect_with(&pool).await.context("connecting the notify listener")?;
        listener.listen(NOTIFY_CHANNEL).await.context("listening for appends")?;
        let signal = self.clone();
        let mut local = self.inner.local.subscribe();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = local.changed() => {
                        if changed.is_err() { return; }
                        local.mark_unchanged();
                        // Coalesced: however many appends happened since, one notification.
                        if let Err(e) = sqlx::query("select pg_notify($1, '')").bind(NOTIFY_CHANNEL).execute(&pool).await {
                            tracing::warn!(error = %e, "could not notify other processes of an append");
                        }
                    }
                    notification = listener.try_recv() => match notification {
                        Ok(Some(_)) => signal.raise_remote(),
                        // The connection dropped and was re-established: appends may have been missed.
                        Ok(None) => signal.raise_remote(),
                        Err(e) => {
                            tracing::warn!(error = %e, "the notify listener failed; readers fall back to polling");
                            return;
                        }
                    }
                }
            }
        }))
    }
}
