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

/// An Ed25519 key in OpenSSH form, protected by the passphrase `correct horse`, whose KDF asks
/// for `rounds` bcrypt rounds: what an attacker uploads to pin a thread (with `u32::MAX`).
///
/// # Panics
/// Only if the key cannot be generated or encoded.
#[must_use]
pub fn protected_key_with_rounds(rounds: u32) -> String {
    use base64::Engine as _;
    use ssh_key::rand_core::OsRng;
    let key = ssh_key::PrivateKey::random(&mut OsRng, ssh_key::Algorithm::Ed25519).expect("a key");
    let protected = key.encrypt(&mut OsRng, "correct horse").expect("encrypted");
    let mut bytes = protected.to_bytes().expect("encoded").to_vec();
    // openssh-key-v1: …, string "bcrypt", string kdfoptions { string salt, uint32 rounds }.
    let kdf = bytes.windows(6).position(|w| w == b"bcrypt").expect("a bcrypt key") + 6;
    let salt_len = u32::from_be_bytes(bytes[kdf + 4..kdf + 8].try_into().expect("4 bytes")) as usize;
    let at = kdf + 8 + salt_len;
    bytes[at..at + 4].copy_from_slice(&rounds.to_be_bytes());
    let body = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let lines: Vec<&str> = body.as_bytes().chunks(70).map(|c| std::str::from_utf8(c).expect("base64")).collect();
    format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n", lines.join("\n"))
}
