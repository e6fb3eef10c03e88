//! What a projection is: a name, the tables it owns, and how it applies a batch of events.

use futures::future::BoxFuture;
use sqlx::PgConnection;
use zpanel_commands::RecordedEvent;

/// A read model built from the log.
pub trait Projection: Send + Sync {
    /// Its name, which is also its checkpoint's name.
    fn name(&self) -> &'static str;

    /// The tables it owns: emptied when it is rebuilt.
    fn tables(&self) -> &'static [&'static str];

    /// Applies events (in log order, all unseen by this projection) inside the batch's
    /// transaction. Must be deterministic: a rebuild must produce the same rows.
    fn apply<'a>(&'a self, tx: &'a mut PgConnection, events: &'a [RecordedEvent]) -> BoxFuture<'a, anyhow::Result<()>>;
}
