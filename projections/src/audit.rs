//! The audit log: one row per event — who, when, which stream, which event — and, for changes
//! of configuration, each changed field's value before and after. Secrets show only that they
//! changed (their digests are compared, never their values).
//!
//! To diff the next event against, the projection continues each stream's state: from memory
//! within a rebuild, otherwise from the state it stored last (`rm_audit_state`, every
//! [`SNAPSHOT_EVERY`] events) and the log's events after it.

use crate::projection::{Memo, Projection};
use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use zpanel_commands::RecordedEvent;
use zpanel_commands::handler::evolve_recorded;
use zpanel_commands::postgres::{EVENT_COLUMNS, event_from_row};
use zpanel_domain::Aggregate;
use zpanel_domain::changes::{Change, Describe, FieldValue, diff};

/// The audit-log projection.
#[derive(Debug, Default)]
pub struct AuditProjection;

/// The audit projection's name.
pub const NAME: &str = "audit_log";

/// A stream's state is stored (`rm_audit_state`) at every version that is a multiple of this —
/// wherever batches happen to end, so a rebuild stores exactly what the live projection did. A
/// stream the projection does not hold in memory continues from its stored state and the log's
/// events after it (fewer than this many, read by the `(stream_id, stream_position)` index).
/// Most streams — a deployment's nine events, an application's first few dozen — are never
/// stored at all, which is what a rebuild gains; the log holds them anyway.
pub const SNAPSHOT_EVERY: i64 = 32;

/// An aggregate state of some kind, able to say what an event changed.
trait Audited: Send {
    fn apply(&mut self, event: &RecordedEvent) -> anyhow::Result<Vec<Change>>;
    fn to_json(&self) -> anyhow::Result<String>;
}

struct Typed<A> {
    state: A,
    described: BTreeMap<String, FieldValue>,
}

impl<A: Aggregate + Describe> Audited for Typed<A> {
    fn apply(&mut self, event: &RecordedEvent) -> anyhow::Result<Vec<Change>> {
        self.state = evolve_recorded(std::mem::take(&mut self.state), event)?;
        let after = self.state.describe();
        let changes = diff(&self.described, &after);
        self.described = after;
        Ok(changes)
    }

    fn to_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string(&self.state)?)
    }
}

/// The state continued from `stored` through `history` (the events after it, in order).
fn typed<A: Aggregate + Describe + 'static>(
    stored: Option<&str>,
    history: &[RecordedEvent],
) -> anyhow::Result<Box<dyn Audited>> {
    let mut state: A =
        stored.map(serde_json::from_str).transpose().context("decoding an audit state")?.unwrap_or_default();
    for event in history {
        state = evolve_recorded(state, event)?;
    }
    let described = state.describe();
    Ok(Box::new(Typed { state, described }))
}

/// The state of a stream of `kind`, continued from what was stored and the events after it;
/// `None` for kinds without an aggregate (their events are logged without changes).
fn load(kind: &str, stored: Option<&str>, history: &[RecordedEvent]) -> anyhow::Result<Option<Box<dyn Audited>>> {
    use zpanel_domain::{api_token, application, deployment, private_key, project, server, team};
    Ok(Some(match kind {
        team::Team::KIND => typed::<team::Team>(stored, history)?,
        project::Project::KIND => typed::<project::Project>(stored, history)?,
        application::Application::KIND => typed::<application::Application>(stored, history)?,
        deployment::Deployment::KIND => typed::<deployment::Deployment>(stored, history)?,
        server::Server::KIND => typed::<server::Server>(stored, history)?,
        private_key::PrivateKey::KIND => typed::<private_key::PrivateKey>(stored, history)?,
        api_token::ApiToken::KIND => typed::<api_token::ApiToken>(stored, history)?,
        _ => return Ok(None),
    }))
}

/// A stream as the projection holds it.
struct Stream {
    /// Its state (`None`: a kind without an aggregate).
    audited: Option<Box<dyn Audited>>,
    /// The version its state is at.
    version: i64,
}

/// The streams a batch touched, as it left them, kept in the memo for the next batch.
type States = HashMap<String, Stream>;

impl AuditProjection {
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[RecordedEvent],
        memo: &mut Memo,
    ) -> anyhow::Result<()> {
        let states: &mut States = memo.get();
        load_streams(tx, events, states).await?;

        // The rows go in with `COPY`: PostgreSQL inserts them in bulk, cheaper than a statement
        // over bound arrays. Text format: one line a row, tab-separated, escaped (`crate::copy::field`).
        let mut rows = String::with_capacity(events.len() * 256);
        let mut touched: Vec<&str> = Vec::with_capacity(events.len());
        // The states to store, by stream: each stream's last one reached in this batch.
        let mut snapshots: HashMap<&str, (String, i64)> = HashMap::new();
        for event in events {
            touched.push(event.stream_id.as_str());
            let stream = states.get_mut(&event.stream_id).context("a stream was not loaded")?;
            anyhow::ensure!(
                event.version == stream.version + 1,
                "stream {} is at version {}, its next event at {}",
                event.stream_id,
                stream.version,
                event.version
            );
            let changes = match &mut stream.audited {
                Some(state) => state.apply(event)?,
                None => Vec::new(),
            };
            stream.version = event.version;
            if let Some(state) = &stream.audited
                && event.version % SNAPSHOT_EVERY == 0
            {
                snapshots.insert(event.stream_id.as_str(), (state.to_json()?, event.version));
            }
            let at = event.recorded_at.format(&time::format_description::well_known::Rfc3339)?;
            write!(rows, "{}\t{}\t", event.global_position, event.team_id)?;
            crate::copy::field(&mut rows, &event.stream_id);
            write!(rows, "\t{}\t", event.version)?;
            crate::copy::field(&mut rows, &event.event_type);
            rows.push('\t');
            crate::copy::field(&mut rows, &serde_json::to_string(&event.metadata.actor)?);
            write!(rows, "\t{at}\t")?;
            crate::copy::field(&mut rows, &serde_json::to_string(&changes)?);
            rows.push('\n');
        }
        crate::copy::write(
            tx,
            "copy rm_audit_log (global_position, team_id, stream_id, version, event_type, actor, at, changes) from stdin",
            rows,
            "audit rows",
        )
        .await?;

        touched.sort_unstable();
        touched.dedup();
        // Kept for the next batch: the streams this one touched (memory stays bounded by it).
        states.retain(|stream_id, _| touched.binary_search(&stream_id.as_str()).is_ok());
        if !snapshots.is_empty() {
            let (mut ids, mut values, mut versions) = (Vec::new(), Vec::new(), Vec::new());
            for (stream_id, (state, version)) in snapshots {
                ids.push(stream_id);
                values.push(state);
                versions.push(version);
            }
            sqlx::query(
                "insert into rm_audit_state (stream_id, state, version)
                 select * from unnest($1::text[], $2::text[], $3::bigint[])
                 on conflict (stream_id) do update set state = excluded.state, version = excluded.version",
            )
            .bind(&ids)
            .bind(&values)
            .bind(&versions)
            .execute(&mut *tx)
            .await
            .context("writing audit states")?;
        }
        Ok(())
    }
}

/// Puts into `states` every stream of `events` it does not hold, as it was before its first
/// event in `events`: from its stored state and the log's events after that. A stream whose
/// first event here is its first needs neither.
async fn load_streams(tx: &mut PgConnection, events: &[RecordedEvent], states: &mut States) -> anyhow::Result<()> {
    // Each missing stream with the version before its first event here.
    let mut missing: HashMap<&str, i64> = HashMap::new();
    for event in events {
        if !states.contains_key(&event.stream_id) {
            missing.entry(event.stream_id.as_str()).or_insert(event.version - 1);
        }
    }
    let mut wanted: Vec<(&str, i64)> = Vec::new();
    for (stream_id, before) in missing {
        if before == 0 {
            let audited = load(zpanel_commands::store::stream_kind(stream_id), None, &[])?;
            states.insert(stream_id.to_owned(), Stream { audited, version: 0 });
        } else {
            wanted.push((stream_id, before));
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    wanted.sort_unstable();
    let ids: Vec<&str> = wanted.iter().map(|(id, _)| *id).collect();
    let stored: HashMap<String, (String, i64)> = sqlx::query_as::<_, (String, String, i64)>(
        "select stream_id, state, version from rm_audit_state where stream_id = any($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await
    .context("loading audit states")?
    .into_iter()
    .map(|(id, state, version)| (id, (state, version)))
    .collect();
    // A stored state past where this batch starts cannot be continued (it never is, short of
    // someone writing the table): the stream is folded from its start instead.
    let after: Vec<i64> = wanted
        .iter()
        .map(|(id, before)| stored.get(*id).map_or(0, |(_, v)| if v <= before { *v } else { 0 }))
        .collect();
    let before: Vec<i64> = wanted.iter().map(|(_, before)| *before).collect();
    let history: Vec<RecordedEvent> = sqlx::query(&format!(
        "select {EVENT_COLUMNS} from events
           join unnest($1::text[], $2::bigint[], $3::bigint[]) as w(w_stream, w_after, w_before)
             on stream_id = w_stream and stream_position > w_after and stream_position <= w_before
          order by stream_id, stream_position"
    ))
    .bind(&ids)
    .bind(&after)
    .bind(&before)
    .fetch_all(&mut *tx)
    .await
    .context("loading audited streams from the log")?
    .iter()
    .map(event_from_row)
    .collect::<anyhow::Result<_>>()?;
    let mut spans: HashMap<&str, std::ops::Range<usize>> = HashMap::new();
    for (i, event) in history.iter().enumerate() {
        spans.entry(event.stream_id.as_str()).or_insert(i..i).end = i + 1;
    }
    for ((stream_id, before), after) in wanted.iter().zip(&after) {
        let events = spans.get(stream_id).map_or(&[][..], |span| &history[span.clone()]);
        anyhow::ensure!(
            i64::try_from(events.len())? == before - after,
            "stream {stream_id}: the log holds {} of its events {}..={before}",
            events.len(),
            after + 1
        );
        let state = (*after > 0).then(|| stored.get(*stream_id).map(|(state, _)| state.as_str())).flatten();
        let audited = load(zpanel_commands::store::stream_kind(stream_id), state, events)?;
        states.insert((*stream_id).to_owned(), Stream { audited, version: *before });
    }
    Ok(())
}

impl Projection for AuditProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rm_audit_log", "rm_audit_state"]
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
