//! Settings, from command-line flags or `ZPANEL_*` environment variables (see API.md).

use std::path::PathBuf;

/// What every subcommand needs to reach its data.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Data directory: the private PostgreSQL cluster, the master key file, build folders.
    #[arg(long, env = "ZPANEL_DATA_DIR", default_value = "./zpanel-data", global = true)]
    pub data_dir: PathBuf,

    /// PostgreSQL to use instead of the private cluster (`postgres://…`).
    #[arg(long, env = "ZPANEL_DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// Master keys for sealing secrets: base64 32-byte keys, comma-separated, newest first.
    /// Default: the key file in the data directory (created on first start).
    #[arg(long, env = "ZPANEL_MASTER_KEY", hide_env_values = true, global = true)]
    pub master_key: Option<String>,
}
