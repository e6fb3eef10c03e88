//! Test support: one private PostgreSQL cluster per test run, a fresh database per test.
//!
//! `ZPANEL_TEST_DATABASE_URL` (a server URL whose role may create databases) wins when set;
//! otherwise the cluster lives under the system temp folder (`zpanel-test-pg`), started on
//! first use by whichever test process gets there first and left running for the others — so
//! `cargo test` needs no preinstalled server. `scripts/test` stops it at the end.

use crate::db;
use crate::embedded::{Durability, EmbeddedPostgres};
use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use std::path::PathBuf;
use std::str::FromStr as _;

/// A database of its own for one test, migrated.
#[derive(Debug)]
pub struct TestDatabase {
    /// A pool on it.
    pub pool: PgPool,
    /// Options to open more connections to it.
    pub options: PgConnectOptions,
    /// Its name.
    pub name: String,
    /// A `postgres://` URL for it, for processes started by the test (`ZPANEL_DATABASE_URL`).
    pub url: String,
}

/// The folder of the shared test cluster.
#[must_use]
pub fn cluster_root() -> PathBuf {
    std::env::var_os("ZPANEL_TEST_PG_ROOT").map_or_else(|| std::env::temp_dir().join("zpanel-test-pg"), PathBuf::from)
}

/// The server's options, and a URL template with `{db}` where the database name goes.
async fn server_options() -> anyhow::Result<(PgConnectOptions, String)> {
    if let Ok(url) = std::env::var("ZPANEL_TEST_DATABASE_URL") {
        let options = PgConnectOptions::from_str(&url).context("parsing ZPANEL_TEST_DATABASE_URL")?;
        let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
        return Ok((options, format!("{base}/{{db}}")));
    }
    let root = cluster_root();
    std::fs::create_dir_all(&root)?;
    // One starter at a time across test processes.
    let lock = std::fs::File::create(root.join("start.lock"))?;
    lock.lock()?;
    let mut cluster = EmbeddedPostgres::new(&root, Durability::Relaxed)?;
    let started = cluster.start().await;
    cluster.detach();
    drop(lock);
    started?;
    let template =
        format!("postgres://{}@localhost/{{db}}?host={}", crate::embedded::DATABASE, cluster.socket_dir().display());
    Ok((cluster.connect_options_for("postgres"), template))
}

impl TestDatabase {
    /// Creates and migrates a fresh database.
    ///
    /// # Errors
    /// When the server cannot be reached or started, or migrations fail.
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_with(16).await
    }

    /// Like [`TestDatabase::create`], with a pool of `max_connections`.
    ///
    /// # Errors
    /// When the server cannot be reached or started, or migrations fail.
    pub async fn create_with(max_connections: u32) -> anyhow::Result<Self> {
        let (server, template) = server_options().await?;
        let name = format!("test_{}", uuid::Uuid::now_v7().simple());
        let admin = db::connect(server.clone(), 1).await?;
        sqlx::query(&format!("create database {name}")).execute(&admin).await.context("creating a test database")?;
        admin.close().await;
        let options = server.database(&name);
        let pool = db::connect(options.clone(), max_connections).await?;
        db::migrate(&pool).await?;
        let url = template.replace("{db}", &name);
        Ok(Self { pool, options, name, url })
    }
}
