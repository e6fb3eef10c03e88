//! Read models that hold one row per aggregate: the row is derived from the aggregate's folded
//! state, which the row also keeps (`state`), so the next batch continues the fold from it.
//!
//! A batch is applied with two statements per table, however many events it holds: one select
//! of the affected rows, one upsert of their new versions (`json_populate_recordset`).

use crate::projection::{Memo, Projection};
use anyhow::Context as _;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use sqlx::{PgConnection, Row as _};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::marker::PhantomData;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;
use zpanel_commands::RecordedEvent;
use zpanel_commands::handler::evolve_recorded;
use zpanel_domain::Aggregate;

/// How one aggregate kind maps to its table.
pub trait ReadModel: Send + Sync + 'static {
    /// The aggregate it reads.
    type Aggregate: Aggregate;
    /// The projection's name.
    const NAME: &'static str;
    /// The table.
    const TABLE: &'static str;
    /// The primary key column, holding the aggregate's uuid.
    const KEY: &'static str;

    /// The row for a state.
    fn row(state: &Self::Aggregate) -> Projected;
}

/// What a state looks like in its table.
#[derive(Clone, Debug, PartialEq)]
pub enum Projected {
    /// No row (the aggregate does not exist yet).
    Absent,
    /// A row with these columns: every column but the key, `team_id`, `state`, `version`,
    /// `created_at` and `updated_at`, which are filled in here.
    Row(Map<String, Value>),
    /// The aggregate was removed: its row goes (the audit log keeps its history).
    Gone,
}

/// The projection of a [`ReadModel`].
pub struct StateProjection<M>(PhantomData<M>);

impl<M> Default for StateProjection<M> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// A row as written: the read model's columns, then the ones every table has.
#[derive(serde::Serialize)]
struct Record {
    #[serde(flatten)]
    columns: Map<String, Value>,
    team_id: Uuid,
    version: i64,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

/// New rows are written with `COPY` from this many on (a rebuild's batches); fewer go with the
/// upsert, which needs no look at the table's column types.
const COPY_FROM: usize = 64;

/// The rows a batch wrote, as the memo keeps them for the next.
type Rows<A> = HashMap<Uuid, Row<A>>;

struct Row<A> {
    state: A,
    team_id: Uuid,
    version: i64,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl<M: ReadModel> StateProjection<M> {
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[RecordedEvent],
        memo: &mut Memo,
    ) -> anyhow::Result<()> {
        let kind = <M::Aggregate as Aggregate>::KIND;
        let mine: Vec<&RecordedEvent> = events.iter().filter(|e| e.stream_kind() == kind).collect();
        if mine.is_empty() {
            return Ok(());
        }
        let rows: &mut Rows<M::Aggregate> = memo.get();
        // Rows the memo holds are exactly as stored; aggregates whose first event is in this
        // batch have none; only the others are read.
        let mut born: Vec<Uuid> = Vec::new();
        let mut ids: Vec<Uuid> = Vec::new();
        for event in &mine {
            let Some(id) = event.aggregate_id() else { continue };
            if event.version == 1 {
                born.push(id);
            } else if !rows.contains_key(&id) {
                ids.push(id);
            }
        }
        born.sort_unstable();
        ids.sort_unstable();
        ids.dedup();
        // An aggregate born here has no row, whatever else of it the batch holds.
        ids.retain(|id| born.binary_search(id).is_err());

        let existing = if ids.is_empty() {
            Vec::new()
        } else {
            sqlx::query(&format!(
                "select {key} as id, team_id, state, version, created_at from {table} where {key} = any($1)",
                key = M::KEY,
                table = M::TABLE
            ))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .with_context(|| format!("loading rows of {}", M::TABLE))?
        };
        for row in existing {
            let created_at: OffsetDateTime = row.try_get("created_at")?;
            let state: String = row.try_get("state")?;
            let state = serde_json::from_str(&state).context("decoding a stored state")?;
            rows.insert(
                row.try_get("id")?,
                Row {
                    state,
                    team_id: row.try_get("team_id")?,
                    version: row.try_get("version")?,
                    created_at,
                    updated_at: created_at,
                },
            );
        }
        let mut touched: Vec<Uuid> = Vec::with_capacity(mine.len());
        for event in mine {
            let id = event.aggregate_id().context("stream id without a uuid")?;
            touched.push(id);
            let row = rows.entry(id).or_insert_with(|| Row {
                state: <M::Aggregate>::default(),
                team_id: event.team_id,
                version: 0,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
            });
            // Decode and evolve through the same fold the command side uses.
            let state = std::mem::take(&mut row.state);
            row.state = evolve_recorded(state, event)?;
            row.version = event.version;
            row.updated_at = event.recorded_at;
        }

        touched.sort_unstable();
        touched.dedup();
        let mut records = Vec::with_capacity(touched.len());
        let mut states = Vec::with_capacity(touched.len());
        let (mut new_records, mut new_states) = (Vec::new(), Vec::new());
        let mut gone = Vec::new();
        let mut unwritten = Vec::new();
        for id in &touched {
            let Some(row) = rows.get(id) else { continue };
            let mut columns = match M::row(&row.state) {
                Projected::Row(columns) => columns,
                Projected::Gone => {
                    // One born here never had a row to delete.
                    if born.binary_search(id).is_ok() {
                        unwritten.push(*id)
                    } else {
                        gone.push(*id)
                    }
                    continue;
                }
                Projected::Absent => {
                    unwritten.push(*id);
                    continue;
                }
            };
            // The team's own table is keyed by `team_id`, which every record has anyway.
            if M::KEY != "team_id" {
                columns.insert(M::KEY.to_owned(), Value::String(id.to_string()));
            }
            let record = Record {
                columns,
                team_id: row.team_id,
                version: row.version,
                created_at: row.created_at,
                updated_at: row.updated_at,
            };
            let state = serde_json::to_string(&row.state)?;
            if born.binary_search(id).is_ok() {
                new_records.push(record);
                new_states.push(state);
            } else {
                records.push(record);
                states.push(state);
            }
        }
        // The memo holds only what the table holds, and only what this batch touched: an
        // aggregate's events mostly follow each other closely, and memory stays bounded by the
        // batch.
        for id in gone.iter().chain(&unwritten) {
            rows.remove(id);
        }
        rows.retain(|id, _| touched.binary_search(id).is_ok());
        if !gone.is_empty() {
            sqlx::query(&format!("delete from {} where {} = any($1)", M::TABLE, M::KEY))
                .bind(&gone)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("deleting rows of {}", M::TABLE))?;
        }
        if new_records.len() >= COPY_FROM {
            copy_rows::<M>(tx, &new_records, &new_states).await?;
        } else {
            records.append(&mut new_records);
            states.append(&mut new_states);
        }
        let Some(first) = records.first() else { return Ok(()) };
        let mut columns: Vec<&str> = first.columns.keys().map(String::as_str).collect();
        columns.extend(["team_id", "version", "created_at", "updated_at"]);
        let updates: Vec<String> =
            columns.iter().chain(&["state"]).filter(|k| **k != M::KEY).map(|k| format!("{k} = excluded.{k}")).collect();
        // The columns as a JSON recordset, serialized straight into the statement's buffer; the
        // states beside them as text, which PostgreSQL stores without parsing.
        let sql = format!(
            "insert into {table} ({cols}, state)
             select {row_cols}, s.state
               from json_populate_recordset(null::{table}, $1::text::json) with ordinality as r
               join unnest($2::text[]) with ordinality as s(state, n) on s.n = r.ordinality
             on conflict ({key}) do update set {updates}",
            table = M::TABLE,
            cols = columns.join(", "),
            row_cols = columns.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
            key = M::KEY,
            updates = updates.join(", ")
        );
        sqlx::query(&sql)
            .bind(serde_json::to_string(&records)?)
            .bind(&states)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("writing rows of {}", M::TABLE))?;
        Ok(())
    }
}

impl<M: ReadModel> Projection for StateProjection<M> {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        std::slice::from_ref(&M::TABLE)
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [RecordedEvent],
        memo: &'a mut Memo,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.apply_batch(tx, events, memo))
    }
}

/// How a column's value is written in `COPY`'s text format.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// `json`/`jsonb`: the value's JSON text.
    Json,
    /// A PostgreSQL array: an array literal of the JSON array's strings.
    Array,
    /// Anything else: a string as it is, other values as their JSON text.
    Scalar,
}

/// Inserts rows of aggregates that have none yet with `COPY … FROM STDIN`: PostgreSQL parses
/// each column's text with its type's input function, once, instead of parsing a JSON
/// recordset, then the documents in it again, and joining the states to it.
async fn copy_rows<M: ReadModel>(tx: &mut PgConnection, records: &[Record], states: &[String]) -> anyhow::Result<()> {
    let Some(first) = records.first() else { return Ok(()) };
    let kinds: HashMap<String, ColumnKind> = sqlx::query_as::<_, (String, String, bool)>(
        "select a.attname::text, t.typname::text, t.typcategory = 'A'
           from pg_attribute a join pg_type t on t.oid = a.atttypid
          where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped",
    )
    .bind(M::TABLE)
    .fetch_all(&mut *tx)
    .await
    .with_context(|| format!("reading the columns of {}", M::TABLE))?
    .into_iter()
    .map(|(name, ty, array)| {
        let kind = if array {
            ColumnKind::Array
        } else if ty == "json" || ty == "jsonb" {
            ColumnKind::Json
        } else {
            ColumnKind::Scalar
        };
        (name, kind)
    })
    .collect();
    let columns: Vec<(&str, ColumnKind)> =
        first.columns.keys().map(|c| (c.as_str(), kinds.get(c).copied().unwrap_or(ColumnKind::Scalar))).collect();
    let mut text = String::with_capacity(records.len() * 512 + states.iter().map(String::len).sum::<usize>());
    for (record, state) in records.iter().zip(states) {
        for (column, kind) in &columns {
            copy_value(&mut text, record.columns.get(*column).unwrap_or(&Value::Null), *kind)?;
            text.push('\t');
        }
        write!(text, "{}\t{}\t", record.team_id, record.version)?;
        text.push_str(&record.created_at.format(&Rfc3339)?);
        text.push('\t');
        text.push_str(&record.updated_at.format(&Rfc3339)?);
        text.push('\t');
        crate::copy::field(&mut text, state);
        text.push('\n');
    }
    let names: Vec<&str> = columns.iter().map(|(c, _)| *c).collect();
    let statement =
        format!("copy {} ({}, team_id, version, created_at, updated_at, state) from stdin", M::TABLE, names.join(", "));
    crate::copy::write(tx, &statement, text, &format!("rows of {}", M::TABLE)).await?;
    Ok(())
}

/// Appends `value` as a `COPY` text field of a column of `kind`.
fn copy_value(text: &mut String, value: &Value, kind: ColumnKind) -> anyhow::Result<()> {
    match (value, kind) {
        (Value::Null, _) => text.push_str("\\N"),
        (Value::Array(items), ColumnKind::Array) => {
            let mut literal = String::from("{");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    literal.push(',');
                }
                let item = match item {
                    Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
                    other => std::borrow::Cow::Owned(other.to_string()),
                };
                literal.push('"');
                for c in item.chars() {
                    if c == '"' || c == '\\' {
                        literal.push('\\');
                    }
                    literal.push(c);
                }
                literal.push('"');
            }
            literal.push('}');
            crate::copy::field(text, &literal);
        }
        (Value::String(s), ColumnKind::Scalar) => crate::copy::field(text, s),
        (other, _) => crate::copy::field(text, &serde_json::to_string(other)?),
    }
    Ok(())
}
