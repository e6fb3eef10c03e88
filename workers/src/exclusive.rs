//! One active instance of a named log reader (the relay, an embedded worker) across all
//! processes: each instance holds a session advisory lock on a connection of its own and writes
//! its checkpoint through that connection. When the connection dies, the lock goes with it, and
//! so does the instance's ability to move the checkpoint; a standby waiting on the lock takes over.

use anyhow::Context as _;
use sqlx::{PgConnection, PgPool, Row as _};
use zpanel_commands::Cursor;

/// A held lock and the checkpoint it guards.
#[derive(Debug)]
pub struct Exclusive {
    connection: PgConnection,
    name: String,
}

impl Exclusive {
    /// Waits (as long as another instance holds it) for the lock on `name`, then registers the
    /// checkpoint `name`.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn take(pool: &PgPool, name: &str) -> anyhow::Result<Self> {
        let mut connection = pool.acquire().await.context("connecting for a lock")?.detach();
        sqlx::query("select pg_advisory_lock(hashtextextended('zpanel.' || $1, 0))")
            .bind(name)
            .execute(&mut connection)
            .await
            .with_context(|| format!("waiting for the lock of {name}"))?;
        sqlx::query("insert into checkpoints (name) values ($1) on conflict (name) do nothing")
            .bind(name)
            .execute(&mut connection)
            .await
            .with_context(|| format!("registering the checkpoint {name}"))?;
        Ok(Self { connection, name: name.to_owned() })
    }

    /// The checkpoint's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lock's connection, for writes that must fail once the lock may be lost.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.connection
    }

    /// The checkpoint.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn checkpoint(&mut self) -> anyhow::Result<Cursor> {
        let row = sqlx::query("select tx_id::text::bigint as tx_id, position from checkpoints where name = $1")
            .bind(&self.name)
            .fetch_one(&mut self.connection)
            .await
            .with_context(|| format!("reading the checkpoint {}", self.name))?;
        Ok(Cursor { tx_id: row.try_get("tx_id")?, position: row.try_get("position")? })
    }

    /// Moves the checkpoint to `to`, on `executor` (the lock's connection, or a transaction
    /// begun on it).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn store<'e>(name: &str, executor: impl sqlx::PgExecutor<'e>, to: Cursor) -> anyhow::Result<()> {
        sqlx::query("update checkpoints set tx_id = $2::text::xid8, position = $3, updated_at = now() where name = $1")
            .bind(name)
            .bind(to.tx_id.to_string())
            .bind(to.position)
            .execute(executor)
            .await
            .with_context(|| format!("moving the checkpoint {name}"))?;
        Ok(())
    }

    /// Releases the lock by closing its connection.
    pub async fn release(self) {
        use sqlx::Connection as _;
        let _ = self.connection.close().await;
    }
}
