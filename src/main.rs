//! The `zpanel` command: parse the configuration, run the chosen subcommand until it finishes or a
//! shutdown signal arrives.

use clap::Parser as _;

// Many short-lived allocations (rows, envelopes, JSON) on several threads: glibc's malloc spent
// close to half of the relay's CPU consolidating its free lists (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = zpanel::cli::Cli::parse();
    zpanel::telemetry::init();
    match zpanel::cli::run(cli, zpanel::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
