//! Time travel: any aggregate as of a stream version, a global position or a moment, and the
//! difference between two versions of its configuration. Read straight from the log, so it is
//! exact whatever the read models hold.

use anyhow::Context as _;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;
use zpanel_commands::RecordedEvent;
use zpanel_commands::handler::fold;
use zpanel_commands::postgres::event_from_row;
use zpanel_domain::Aggregate;
use zpanel_domain::changes::{Change, Describe, diff};

/// A point in an aggregate's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    /// The latest version.
    Latest,
    /// After its first N events (version 1 is the state right after creation).
    Version(i64),
    /// After every event up to this global position.
    Position(i64),
    /// After every event recorded at or before this moment.
    Time(OffsetDateTime),
}

/// An aggregate's state at a point in its history, with the version it had then.
#[derive(Clone, Debug)]
pub struct Snapshot<A> {
    /// The state.
    pub state: A,
    /// Its version (0: it did not exist yet).
    pub version: i64,
    /// When its last applied event was recorded.
    pub at: Option<OffsetDateTime>,
}

/// Loads aggregate `id` of `team` as of `as_of`. `None` when the stream does not exist in that
/// team (another team's stream answers exactly like a missing one).
///
/// # Errors
/// When the database fails or an event cannot be decoded.
pub async fn load_as_of<A: Aggregate>(
    pool: &PgPool,
    team_id: Uuid,
    id: Uuid,
    as_of: AsOf,
) -> anyhow::Result<Option<Snapshot<A>>> {
    let stream_id = format!("{}-{id}", A::KIND);
    let (clause, bound_i64, bound_time) = match as_of {
        AsOf::Latest => ("true", 0, None),
        AsOf::Version(v) => ("stream_position <= $3", v, None),
        AsOf::Position(p) => ("global_position <= $3", p, None),
        AsOf::Time(t) => ("recorded_at <= $4", 0, Some(t)),
    };
    let sql = format!(
        "select {cols} from events where stream_id = $1 and team_id = $2 and {clause} order by stream_position",
        cols = zpanel_commands::postgres::EVENT_COLUMNS
    );
    let rows = sqlx::query(&sql)
        .bind(&stream_id)
        .bind(team_id)
        .bind(bound_i64)
        .bind(bound_time)
        .fetch_all(pool)
        .await
        .with_context(|| format!("reading the history of {stream_id}"))?;
    // No events up to that point: it may not exist at all (or belong to another team), or it
    // may not have existed yet then. Only the first case is `None`; asked only when it matters.
    if rows.is_empty() {
        let exists: bool =
            sqlx::query_scalar("select exists (select 1 from streams where stream_id = $1 and team_id = $2)")
                .bind(&stream_id)
                .bind(team_id)
                .fetch_one(pool)
                .await?;
        if !exists {
            return Ok(None);
        }
    }
    let events = rows.iter().map(event_from_row).collect::<anyhow::Result<Vec<RecordedEvent>>>()?;
    let state = fold::<A>(&events)?;
    Ok(Some(Snapshot {
        version: events.last().map_or(0, |e| e.version),
        at: events.last().map(|e| e.recorded_at),
        state,
    }))
}

/// The changes of an aggregate's configuration from one version to another.
///
/// # Errors
/// When the database fails or an event cannot be decoded.
pub async fn diff_versions<A: Aggregate + Describe>(
    pool: &PgPool,
    team_id: Uuid,
    id: Uuid,
    from: i64,
    to: i64,
) -> anyhow::Result<Option<Vec<Change>>> {
    let Some(before) = load_as_of::<A>(pool, team_id, id, AsOf::Version(from)).await? else { return Ok(None) };
    let Some(after) = load_as_of::<A>(pool, team_id, id, AsOf::Version(to)).await? else { return Ok(None) };
    Ok(Some(diff(&before.state.describe(), &after.state.describe())))
}
