//! The `zpanel` command: parse the configuration, run the chosen subcommand until it finishes or a
//! shutdown signal arrives.

use clap::Parser as _;

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
