//! What a projection is: a name, the tables it owns, and how it applies a batch of events.

use futures::future::BoxFuture;
use sqlx::PgConnection;
use std::any::Any;
use zpanel_commands::RecordedEvent;

/// A read model built from the log.
pub trait Projection: Send + Sync {
    /// Its name, which is also its checkpoint's name.
    fn name(&self) -> &'static str;

    /// The tables it owns: emptied when it is rebuilt.
    fn tables(&self) -> &'static [&'static str];

    /// Applies events (in log order, all unseen by this projection) inside the batch's
    /// transaction. Must be deterministic: a rebuild must produce the same rows.
    ///
    /// `memo` is what this projection kept from its previous batch, when the runner knows that
    /// batch committed and nothing else has written the projection since; otherwise it is empty.
    /// What it holds must describe the tables exactly as this batch leaves them.
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [RecordedEvent],
        memo: &'a mut Memo,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// What a projection remembers between batches — typically the folded states it just wrote, so
/// the next batch need not read and decode them again. Rebuilds keep it; the live runner, whose
/// batches are small and which should stay small in memory, starts every batch empty.
#[derive(Default)]
pub struct Memo(Option<Box<dyn Any + Send>>);

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Memo").field(&self.0.is_some()).finish()
    }
}

impl Memo {
    /// The memo as a `T`, a default one when it is empty or holds something else.
    pub fn get<T: Default + Send + 'static>(&mut self) -> &mut T {
        let held = self.0.get_or_insert_with(|| Box::new(T::default()));
        if !held.is::<T>() {
            *held = Box::new(T::default());
        }
        held.downcast_mut::<T>().unwrap_or_else(|| unreachable!("the memo was just made a T"))
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}
