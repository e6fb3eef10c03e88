//! Waiting between attempts: exponential backoff that gives way to shutdown.

use std::pin::Pin;
use std::time::Duration;

/// The first wait after a failure.
const FIRST: Duration = Duration::from_millis(100);
/// The longest wait: how long a recovered broker or database may go unnoticed.
const MAX: Duration = Duration::from_secs(5);

/// An exponential backoff from 100 ms up to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) const fn new() -> Self {
        Self { next: FIRST }
    }

    /// Back to the first wait, after a success.
    pub(crate) const fn reset(&mut self) {
        self.next = FIRST;
    }

    /// The next wait.
    pub(crate) const fn next(&self) -> Duration {
        self.next
    }

    /// Waits the next wait (and doubles it), unless `shutdown` resolves first: then `true`.
    pub(crate) async fn wait<S: Future<Output = ()>>(&mut self, shutdown: &mut Pin<&mut S>) -> bool {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX);
        tokio::select! {
            () = shutdown.as_mut() => true,
            () = tokio::time::sleep(wait) => false,
        }
    }
}
