//! The database Zpanel runs on: `ZPANEL_DATABASE_URL` when set, else a private cluster under the
//! data directory, started here and stopped when Zpanel stops.

use crate::config::Config;
use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr as _;
use zpanel_commands::db;
use zpanel_commands::embedded::{Durability, EmbeddedPostgres};

/// An open, migrated database.
#[derive(Debug)]
pub struct Database {
    /// The pool.
    pub pool: PgPool,
    /// How to open more connections (listeners, benchmarks).
    pub options: PgConnectOptions,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Opens the configured database (starting the private cluster if needed) and migrates it.
    ///
    /// # Errors
    /// When the database cannot be reached or started, or a migration fails.
    pub async fn open(config: &Config, max_connections: u32) -> anyhow::Result<Self> {
        let (options, embedded) = match &config.database_url {
            Some(url) => {
                (PgConnectOptions::from_str(url).context("ZPANEL_DATABASE_URL is not a valid PostgreSQL URL")?, None)
            }
            None => {
                let mut cluster = EmbeddedPostgres::new(&config.data_dir, Durability::Full)?;
                cluster.start().await.context("starting the private PostgreSQL cluster")?;
                (cluster.connect_options(), Some(cluster))
            }
        };
        let pool = db::connect(options.clone(), max_connections).await?;
        db::migrate(&pool).await?;
        Ok(Self { pool, options, embedded })
    }

    /// Closes the pool and stops the private cluster if this process started it.
    pub async fn close(mut self) {
        self.pool.close().await;
        if let Some(cluster) = self.embedded.as_mut() {
            cluster.stop().await;
        }
    }
}
