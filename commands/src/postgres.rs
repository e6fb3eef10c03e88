//! The event store on PostgreSQL (schema in `migrations/0001_event_store.sql`).
//!
//! An append is one statement, so one round trip: a data-modifying CTE bumps the stream's
//! version only if it is still the expected one (or creates the stream when "new" is expected),
//! and the insert of all events selects from it — no version bump, no rows inserted.

use crate::signal::AppendSignal;
use crate::store::{Append, AppendError, Cursor, Decoded, EventStore, LogBatch, Metadata, RecordedEvent, Stream};
use anyhow::Context as _;
use serde_json::value::RawValue;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use std::collections::BTreeSet;
use uuid::Uuid;
use zpanel_domain::values::DomainName;

/// The PostgreSQL event store.
#[derive(Clone, Debug)]
pub struct PgEventStore {
    pool: PgPool,
    signal: AppendSignal,
}

/// The columns of `events` that [`event_from_row`] decodes, for `select`s elsewhere.
pub const EVENT_COLUMNS: &str = "global_position, tx_id::text::bigint as tx_id, stream_id, stream_position, event_id, \
     event_type, schema_version, team_id, payload, metadata, recorded_at";

/// True for an event below the log's safe horizon: its transaction id is older than the oldest
/// transaction still running, so no event can still commit before it (ADR 0001). The horizon is
/// a sub-select, so a query takes it once (an init plan), not once per row.
pub const BELOW_HORIZON: &str = "tx_id < (select pg_snapshot_xmin(pg_current_snapshot()))";

/// An append statement: `$bump` is a CTE that touches the stream row only if the expected
/// version holds, returning it; the events are inserted only through that row.
macro_rules! append_sql {
    ($bump:expr) => {
        concat!(
            "with bump as (",
            $bump,
            ")
insert into events (stream_id, stream_position, event_id, event_type, schema_version, team_id, payload, metadata)
select bump.stream_id, $2 + e.ord, e.event_id, e.event_type, e.schema_version, $4, e.payload, e.metadata
  from bump,
       unnest($5::uuid[], $6::text[], $7::int[], $8::text[]::json[], $9::text[]::json[])
       with ordinality as e(event_id, event_type, schema_version, payload, metadata, ord)
returning global_position, tx_id::text::bigint as tx_id, stream_position, recorded_at"
        )
    };
}

/// The same for the most common append, a single event: scalar parameters instead of arrays
/// spare PostgreSQL the `unnest` and its join, a fifth of the statement's cost.
macro_rules! append_one_sql {
    ($bump:expr) => {
        concat!(
            "with bump as (",
            $bump,
            ")
insert into events (stream_id, stream_position, event_id, event_type, schema_version, team_id, payload, metadata)
select bump.stream_id, $3, $5, $6, $7, $4, $8::text::json, $9::text::json
  from bump
returning global_position, tx_id::text::bigint as tx_id, stream_position, recorded_at"
        )
    };
}

/// Bumps an existing stream's version if it is still the expected one.
macro_rules! bump_existing {
    () => {
        "update streams set version = $3 where stream_id = $1 and version = $2 and team_id = $4
     returning stream_id"
    };
}

/// Creates the stream unless it exists.
macro_rules! bump_new {
    () => {
        "insert into streams (stream_id, kind, team_id, version) values ($1, $10, $4, $3)
     on conflict (stream_id) do nothing returning stream_id"
    };
}

const APPEND_TO_EXISTING: &str = append_sql!(bump_existing!());
const APPEND_TO_NEW: &str = append_sql!(bump_new!());
const APPEND_ONE_TO_EXISTING: &str = append_one_sql!(bump_existing!());
const APPEND_ONE_TO_NEW: &str = append_one_sql!(bump_new!());

impl PgEventStore {
    /// A store over `pool`, signalling each append on `signal`.
    #[must_use]
    pub fn new(pool: PgPool, signal: AppendSignal) -> Self {
        Self { pool, signal }
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The signal raised after each append.
    #[must_use]
    pub fn signal(&self) -> &AppendSignal {
        &self.signal
    }

    /// The newest position in the log (including events not yet safe to read).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn head(&self) -> anyhow::Result<i64> {
        let head: Option<i64> = sqlx::query_scalar("select max(global_position) from events")
            .fetch_one(&self.pool)
            .await
            .context("reading the head of the log")?;
        Ok(head.unwrap_or(0))
    }
}

/// Decodes a row selected with [`EVENT_COLUMNS`].
///
/// # Errors
/// When a column is missing or the metadata does not decode.
pub fn event_from_row(row: &PgRow) -> anyhow::Result<RecordedEvent> {
    let schema_version: i32 = row.try_get("schema_version")?;
    Ok(RecordedEvent {
        global_position: row.try_get("global_position")?,
        tx_id: row.try_get("tx_id")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("stream_position")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        schema_version: u32::try_from(schema_version).context("negative schema version")?,
        team_id: row.try_get("team_id")?,
        payload: row.try_get::<Json<Box<RawValue>>, _>("payload")?.0.into(),
        metadata: row.try_get::<Json<Metadata>, _>("metadata").context("decoding event metadata")?.0,
        recorded_at: row.try_get("recorded_at")?,
        decoded: Decoded::default(),
    })
}

fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.constraint() == Some(constraint))
}

/// Makes `domains` the claims of the appending stream, in `tx`, or says which one is taken.
///
/// Each scope of the names asked for is locked first (in one order, so two appends never wait
/// on each other): every name that could collide with one of them is in one of those scopes,
/// so the check below sees every claim committed before, and no claim can be committed
/// beside it until this transaction ends.
async fn claim_domains(
    tx: &mut sqlx::PgConnection,
    append: &Append<'_>,
    domains: &BTreeSet<DomainName>,
) -> Result<(), AppendError> {
    let scopes: BTreeSet<&str> = domains.iter().map(DomainName::scope).collect();
    let scopes: Vec<&str> = scopes.into_iter().collect();
    sqlx::query(
        "select pg_advisory_xact_lock(k)
           from (select hashtextextended('zpanel.domain:' || s, 0) as k from unnest($1::text[]) s order by 1) locks",
    )
    .bind(&scopes)
    .fetch_all(&mut *tx)
    .await
    .context("locking domain scopes")?;
    let held: Vec<(String, Uuid)> =
        sqlx::query_as("select domain, team_id from domain_claims where scope = any($1) and stream_id <> $2")
            .bind(&scopes)
            .bind(append.stream_id)
            .fetch_all(&mut *tx)
            .await
            .context("reading domain claims")?;
    let team = *append.team_id.as_uuid();
    for domain in domains {
        let taken = held.iter().any(|(other, other_team)| {
            DomainName::parse(other).is_ok_and(|other| {
                // One name is one stream's; a wildcard and a host under it may be two
                // applications' of one team (the host's route is tried first), never two teams'.
                domain.overlaps(&other) && (domain.is_wildcard() == other.is_wildcard() || *other_team != team)
            })
        });
        if taken {
            return Err(AppendError::DomainTaken { domain: domain.clone() });
        }
    }
    sqlx::query("delete from domain_claims where stream_id = $1")
        .bind(append.stream_id)
        .execute(&mut *tx)
        .await
        .context("releasing domain claims")?;
    let names: Vec<&str> = domains.iter().map(DomainName::as_str).collect();
    let name_scopes: Vec<&str> = domains.iter().map(DomainName::scope).collect();
    sqlx::query(
        "insert into domain_claims (domain, scope, stream_id, team_id)
         select d, s, $3, $4 from unnest($1::text[], $2::text[]) as c(d, s)",
    )
    .bind(&names)
    .bind(&name_scopes)
    .bind(append.stream_id)
    .bind(team)
    .execute(&mut *tx)
    .await
    .context("claiming domains")?;
    Ok(())
}

impl EventStore for PgEventStore {
    async fn append(&self, append: Append<'_>) -> Result<Vec<RecordedEvent>, AppendError> {
        let n = append.events.len();
        if n == 0 {
            return Err(AppendError::Internal(anyhow::anyhow!("an append needs at least one event")));
        }
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        for event in &append.events {
            ids.push(event.event_id);
            types.push(event.event_type.clone());
            versions.push(i32::try_from(event.schema_version).map_err(anyhow::Error::from)?);
            // JSON text, stored as given (the columns are `json`: validated, never re-rendered).
            payloads.push(event.payload.as_str());
            metadata.push(serde_json::to_string(&event.metadata).map_err(anyhow::Error::from)?);
        }
        let new_version = append.expected_version + i64::try_from(n).map_err(anyhow::Error::from)?;
        let new = append.expected_version == 0;
        let team = *append.team_id.as_uuid();
        let query = sqlx::query(match (n, new) {
            (1, true) => APPEND_ONE_TO_NEW,
            (1, false) => APPEND_ONE_TO_EXISTING,
            (_, true) => APPEND_TO_NEW,
            (_, false) => APPEND_TO_EXISTING,
        })
        .bind(append.stream_id)
        .bind(append.expected_version)
        .bind(new_version)
        .bind(team);
        let query = if n == 1 {
            query.bind(ids[0]).bind(&types[0]).bind(versions[0]).bind(payloads[0]).bind(&metadata[0])
        } else {
            query.bind(&ids).bind(&types).bind(&versions).bind(&payloads).bind(&metadata)
        };
        let query = query.bind(append.kind);
        let rows = match &append.domains {
            None => query.fetch_all(&self.pool).await,
            Some(domains) => {
                let mut tx = self.pool.begin().await.context("starting an append that claims domains")?;
                claim_domains(&mut tx, &append, domains).await?;
                let rows = query.fetch_all(&mut *tx).await;
                // Nothing appended (a lost race, a duplicate): the claims roll back with it.
                if rows.as_ref().is_ok_and(|rows| !rows.is_empty()) {
                    tx.commit().await.context("committing an append that claims domains")?;
                }
                rows
            }
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) if is_unique_violation(&e, "events_event_id_key") => {
                return Err(AppendError::Duplicate);
            }
            Err(e) => {
                return Err(AppendError::Internal(anyhow::Error::new(e).context("appending events")));
            }
        };
        if rows.is_empty() {
            return Err(AppendError::Conflict);
        }
        self.signal.raise();
        rows.iter()
            .zip(append.events)
            .map(|(row, event)| {
                let schema_version = event.schema_version;
                Ok(RecordedEvent {
                    global_position: row.try_get("global_position").map_err(anyhow::Error::from)?,
                    tx_id: row.try_get("tx_id").map_err(anyhow::Error::from)?,
                    stream_id: append.stream_id.to_owned(),
                    version: row.try_get("stream_position").map_err(anyhow::Error::from)?,
                    event_id: event.event_id,
                    event_type: event.event_type,
                    schema_version,
                    team_id: team,
                    payload: event.payload,
                    metadata: event.metadata,
                    recorded_at: row.try_get("recorded_at").map_err(anyhow::Error::from)?,
                    decoded: Decoded::default(),
                })
            })
            .collect()
    }

    async fn read_stream(&self, stream_id: &str, after_version: i64) -> anyhow::Result<Stream> {
        let sql = format!(
            "select {EVENT_COLUMNS} from events where stream_id = $1 and stream_position > $2 order by stream_position"
        );
        let rows = sqlx::query(&sql)
            .bind(stream_id)
            .bind(after_version)
            .fetch_all(&self.pool)
            .await
            .with_context(|| format!("reading stream {stream_id}"))?;
        let events = rows.iter().map(event_from_row).collect::<anyhow::Result<Vec<_>>>()?;
        let team_id = match events.first() {
            Some(e) => Some(e.team_id),
            None if after_version > 0 => sqlx::query_scalar("select team_id from streams where stream_id = $1")
                .bind(stream_id)
                .fetch_optional(&self.pool)
                .await
                .context("reading a stream's team")?,
            None => None,
        };
        Ok(Stream { team_id, events })
    }

    async fn read_all(&self, after: Cursor, limit: i64) -> anyhow::Result<LogBatch> {
        read_all_on(&self.pool, after, limit).await
    }

    async fn find_command(&self, command_id: Uuid) -> anyhow::Result<Option<Vec<RecordedEvent>>> {
        // The first event of a command has a known id; its siblings follow it in the same stream.
        let first = crate::store::event_id_for(command_id, 0);
        let sql = format!(
            "select {EVENT_COLUMNS} from events
              where stream_id = (select stream_id from events where event_id = $1)
                and stream_position >= (select stream_position from events where event_id = $1)
                and metadata->>'command_id' = $2
              order by stream_position"
        );
        let rows = sqlx::query(&sql)
            .bind(first)
            .bind(command_id.to_string())
            .fetch_all(&self.pool)
            .await
            .context("looking up a command's events")?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(rows.iter().map(event_from_row).collect::<anyhow::Result<Vec<_>>>()?))
    }
}

/// Reads the whole log after `after` on any executor (a pool, or a projection's transaction).
///
/// Only events whose transaction id is below the oldest transaction still running are returned:
/// every transaction that may still commit has an id at or above that horizon, so nothing can
/// later appear behind the cursor. Committed events past the horizon are reported as held back.
///
/// # Errors
/// When the database fails.
pub async fn read_all_on<'e, E>(executor: E, after: Cursor, limit: i64) -> anyhow::Result<LogBatch>
where
    E: sqlx::PgExecutor<'e>,
{
    let sql = format!(
        "select {EVENT_COLUMNS}, {BELOW_HORIZON} as safe
           from events
          where (tx_id, global_position) > ($1::text::xid8, $2)
          -- Qualified: a bare `tx_id` would name the selected `tx_id::text::bigint`, which no
          -- index serves, and every read would sort the rest of the log.
          order by events.tx_id, events.global_position
          limit $3"
    );
    let rows = sqlx::query(&sql)
        .bind(after.tx_id.to_string())
        .bind(after.position)
        .bind(limit)
        .fetch_all(executor)
        .await
        .context("reading the log")?;
    let mut batch = LogBatch::default();
    for row in &rows {
        let safe: bool = row.try_get("safe")?;
        if !safe {
            batch.held_back = true;
            break;
        }
        batch.events.push(event_from_row(row)?);
    }
    Ok(batch)
}
