//! The audit log: one row per event — who, when, which stream, which event — and, for changes
//! of configuration, each changed field's value before and after. Secrets show only that they
//! changed (their digests are compared, never their values).
//!
//! The projection keeps each stream's latest state (`rm_audit_state`) to diff the next event
//! against, and its last description in memory within a batch, so each event is described once.

use crate::projection::Projection;
use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::types::Json;
use sqlx::{PgConnection, Row as _};
use std::collections::{BTreeMap, HashMap};
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

impl AuditProjection {
    async fn apply_batch(&self, tx: &mut PgConnection, events: &[RecordedEvent]) -> anyhow::Result<()> {
        let mut streams: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let stored = sqlx::query("select stream_id, state from rm_audit_state where stream_id = any($1)")
            .bind(&streams)
            .fetch_all(&mut *tx)
            .await
            .context("loading audit states")?;
        let stored: HashMap<String, String> = stored
            .iter()
            .map(|r| Ok((r.try_get("stream_id")?, r.try_get("state")?)))
            .collect::<Result<_, sqlx::Error>>()?;

        let mut states: HashMap<&str, Option<Box<dyn Audited>>> = HashMap::with_capacity(streams.len());
        // Column arrays, bound as typed arrays: cheaper for PostgreSQL than a JSON recordset,
        // which would print and re-parse every `changes` document.
        let n = events.len();
        let (mut positions, mut teams, mut stream_ids, mut versions) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut types, mut actors, mut times, mut all_changes) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for event in events {
            let state = match states.entry(event.stream_id.as_str()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(load(event.stream_kind(), stored.get(&event.stream_id).map(String::as_str))?)
                }
            };
            let changes = match state {
                Some(state) => state.apply(event)?,
                None => Vec::new(),
            };
            positions.push(event.global_position);
            teams.push(event.team_id);
            stream_ids.push(event.stream_id.as_str());
            versions.push(event.version);
            types.push(event.event_type.as_str());
            actors.push(Json(&event.metadata.actor));
            times.push(event.recorded_at);
            all_changes.push(Json(changes));
        }
        sqlx::query(
            "insert into rm_audit_log (global_position, team_id, stream_id, version, event_type, actor, at, changes)
             select * from unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::jsonb[],
                                  $7::timestamptz[], $8::jsonb[])",
        )
        .bind(&positions)
        .bind(&teams)
        .bind(&stream_ids)
        .bind(&versions)
        .bind(&types)
        .bind(&actors)
        .bind(&times)
        .bind(&all_changes)
        .execute(&mut *tx)
        .await
        .context("writing audit rows")?;

        let mut ids = Vec::with_capacity(states.len());
        let mut values = Vec::with_capacity(states.len());
        for (stream_id, state) in states {
            if let Some(state) = state {
                ids.push(stream_id);
                values.push(state.to_json()?);
            }
        }
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

impl Projection for AuditProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rm_audit_log", "rm_audit_state"]
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, events: &'a [RecordedEvent]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.apply_batch(tx, events))
    }
}
