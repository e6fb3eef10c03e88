//! The `zpanel` binary's library: configuration, wiring of the parts, and the subcommands.
//! `main.rs` only parses the command line and calls [`cli::run`]; tests call the same code.
//!
//! - [`config`]: settings from flags and `ZPANEL_*` variables.
//! - [`database`]: the PostgreSQL Zpanel uses — the configured one, or its private cluster.
//! - [`app`]: the parts `serve` runs — projections, subscription feed, API — started and
//!   stopped together.
//! - [`cli`]: the subcommands (`serve`, `migrate`, `replay`, `events tail`, `bootstrap`, `keys`, `bench`).
//! - [`bench`]: the benchmarks behind `zpanel bench`.
#![forbid(unsafe_code)]

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod database;
pub mod telemetry;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
