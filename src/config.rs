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

    /// Address the API listens on (`host:port`; port 0 picks a free one).
    #[arg(long, env = "ZPANEL_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: String,

    /// API requests per second each token may send (sustained).
    #[arg(long, env = "ZPANEL_API_RATE", default_value_t = 50, global = true)]
    pub api_rate: u32,

    /// API requests a token may send at once, beyond the sustained rate.
    #[arg(long, env = "ZPANEL_API_BURST", default_value_t = 200, global = true)]
    pub api_burst: u32,
}
