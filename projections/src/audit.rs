//! The audit log: one row per event — who, when, which stream, which event — and, for changes
//! of configuration, each changed field's value before and after. Secrets show only that they
//! changed (their digests are compared, never their values).
//!
//! The projection keeps each stream's latest state (`rm_audit_state`) to diff the next event
//! against, and its last description in memory within a batch, so each event is described once.

use crate::projection::{Memo, Projection};
use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::{PgConnection, Row as _};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use zpanel_commands::RecordedEvent;
use zpanel_commands::handler::evolve_recorded;
use zpanel_domain::Aggregate;
use zpanel_domain::changes::{Change, Describe, FieldValue, diff};

/// The audit-log projection.
#[derive(Debug, Default)]
pub struct AuditProjection;

/// The audit projection's name.
pub const NAME: &str = "audit_log";

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

fn typed<A: Aggregate + Describe + 'static>(stored: Option<&str>) -> anyhow::Result<Box<dyn Audited>> {
    let state: A = stored.map(serde_json::from_str).transpose().context("decoding an audit state")?.unwrap_or_default();
    let described = state.describe();
    Ok(Box::new(Typed { state, described }))
}

/// The state of a stream of `kind`, continued from what was stored; `None` for kinds without
/// an aggregate (their events are logged without changes).
fn load(kind: &str, stored: Option<&str>) -> anyhow::Result<Option<Box<dyn Audited>>> {
    use zpanel_domain::{api_token, application, deployment, private_key, project, server, team};
    Ok(Some(match kind {
        team::Team::KIND => typed::<team::Team>(stored)?,
        project::Project::KIND => typed::<project::Project>(stored)?,
        application::Application::KIND => typed::<application::Application>(stored)?,
        deployment::Deployment::KIND => typed::<deployment::Deployment>(stored)?,
        server::Server::KIND => typed::<server::Server>(stored)?,
        private_key::PrivateKey::KIND => typed::<private_key::PrivateKey>(stored)?,
        api_token::ApiToken::KIND => typed::<api_token::ApiToken>(stored)?,
        _ => return Ok(None),
    }))
}

/// Each stream's state as `rm_audit_state` holds it after the batch (`None`: a kind without an
/// aggregate), kept in the memo for the next batch.
type States = HashMap<String, Option<Box<dyn Audited>>>;

impl AuditProjection {
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[RecordedEvent],
        memo: &mut Memo,
    ) -> anyhow::Result<()> {
        let states: &mut States = memo.get();
        let mut streams: Vec<&str> =
            events.iter().map(|e| e.stream_id.as_str()).filter(|s| !states.contains_key(*s)).collect();
        streams.sort_unstable();
        streams.dedup();
        let stored = if streams.is_empty() {
            Vec::new()
        } else {
            sqlx::query("select stream_id, state from rm_audit_state where stream_id = any($1)")
                .bind(&streams)
                .fetch_all(&mut *tx)
                .await
                .context("loading audit states")?
        };
        let stored: HashMap<String, String> = stored
            .iter()
            .map(|r| Ok((r.try_get("stream_id")?, r.try_get("state")?)))
            .collect::<Result<_, sqlx::Error>>()?;

        // The rows go in with `COPY`: PostgreSQL inserts them in bulk, cheaper than a statement
        // over bound arrays. Text format: one line a row, tab-separated, escaped (`copy_field`).
        let mut rows = String::with_capacity(events.len() * 256);
        let mut touched: Vec<&str> = Vec::with_capacity(events.len());
        for event in events {
            touched.push(event.stream_id.as_str());
            let state = match states.entry(event.stream_id.clone()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(load(event.stream_kind(), stored.get(&event.stream_id).map(String::as_str))?)
                }
            };
            let changes = match state {
                Some(state) => state.apply(event)?,
                None => Vec::new(),
            };
            let at = event.recorded_at.format(&time::format_description::well_known::Rfc3339)?;
            write!(rows, "{}\t{}\t", event.global_position, event.team_id)?;
            copy_field(&mut rows, &event.stream_id);
            write!(rows, "\t{}\t", event.version)?;
            copy_field(&mut rows, &event.event_type);
            rows.push('\t');
            copy_field(&mut rows, &serde_json::to_string(&event.metadata.actor)?);
            write!(rows, "\t{at}\t")?;
            copy_field(&mut rows, &serde_json::to_string(&changes)?);
            rows.push('\n');
        }
        let mut copy = tx
            .copy_in_raw(
                "copy rm_audit_log (global_position, team_id, stream_id, version, event_type, actor, at, changes) from stdin",
            )
            .await
            .context("writing audit rows")?;
        copy.send(rows.into_bytes()).await.context("writing audit rows")?;
        copy.finish().await.context("writing audit rows")?;

        touched.sort_unstable();
        touched.dedup();
        let mut ids = Vec::with_capacity(touched.len());
        let mut values = Vec::with_capacity(touched.len());
        for stream_id in &touched {
            if let Some(Some(state)) = states.get(*stream_id) {
                ids.push(*stream_id);
                values.push(state.to_json()?);
            }
        }
        // Kept for the next batch: the streams this one touched (memory stays bounded by it).
        states.retain(|stream_id, _| touched.binary_search(&stream_id.as_str()).is_ok());
        sqlx::query(
            "insert into rm_audit_state (stream_id, state) select * from unnest($1::text[], $2::text[])
             on conflict (stream_id) do update set state = excluded.state",
        )
        .bind(&ids)
        .bind(&values)
        .execute(&mut *tx)
        .await
        .context("writing audit states")?;
        Ok(())
    }
}

/// Appends `value` to a `COPY` text row, escaping what the format gives a meaning to.
fn copy_field(row: &mut String, value: &str) {
    let mut rest = value;
    while let Some(at) = rest.find(['\\', '\n', '\r', '\t']) {
        row.push_str(&rest[..at]);
        row.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => "\\t",
        });
        rest = &rest[at + 1..];
    }
    row.push_str(rest);
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

#[cfg(test)]
mod tests {
    use super::copy_field;

    #[test]
    fn copy_fields_escape_what_the_text_format_gives_a_meaning_to() {
        let mut row = String::new();
        copy_field(&mut row, "{\"a\":\"x\\\"y\"}\tb\nc\rd é");
        assert_eq!(row, "{\"a\":\"x\\\\\"y\"}\\tb\\nc\\rd é");
    }
}
