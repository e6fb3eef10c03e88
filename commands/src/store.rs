//! The event store's vocabulary: what is appended, what is read back, and the trait a backend
//! implements (PostgreSQL now; KurrentDB later).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use time::OffsetDateTime;
use uuid::Uuid;
use zpanel_domain::ids::TeamId;
use zpanel_domain::values::DomainName;

/// Who caused an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// What kind of principal acted.
    pub kind: ActorKind,
    /// Its id (token id, user id, worker id), when it has one.
    pub id: Option<String>,
    /// A name for people to read.
    pub name: String,
}

/// The kinds of principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// A person, signed in.
    User,
    /// An API token.
    Token,
    /// A worker reporting a result.
    Worker,
    /// Zpanel itself (bootstrap, maintenance).
    System,
}

impl ActorKind {
    /// The wire name (`user`, `token`, `worker`, `system`).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Token => "token",
            Self::Worker => "worker",
            Self::System => "system",
        }
    }
}

impl Actor {
    /// Zpanel itself, acting for `what` (e.g. `bootstrap`).
    #[must_use]
    pub fn system(what: &str) -> Self {
        Self { kind: ActorKind::System, id: None, name: what.to_owned() }
    }

    /// An API token.
    #[must_use]
    pub fn token(id: Uuid, name: &str) -> Self {
        Self { kind: ActorKind::Token, id: Some(id.to_string()), name: name.to_owned() }
    }

    /// A worker.
    #[must_use]
    pub fn worker(worker_id: &str) -> Self {
        Self { kind: ActorKind::Worker, id: Some(worker_id.to_owned()), name: worker_id.to_owned() }
    }

    /// A git host's push webhook (`github`, `gitlab`, …): Zpanel itself, acting on a push that
    /// the host signed with the application's webhook secret. There is no token behind it, so
    /// it is a `system` actor, named after the host.
    #[must_use]
    pub fn webhook(provider: &str) -> Self {
        Self { kind: ActorKind::System, id: None, name: format!("webhook:{provider}") }
    }
}

/// Facts about an event that are not part of the domain: who, why, and where from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Who caused it.
    pub actor: Actor,
    /// The command that produced it; a command retried with the same id writes nothing twice.
    pub command_id: Uuid,
    /// The first command of the chain (a deployment and everything its worker reports back).
    pub correlation_id: Uuid,
    /// The event that caused the command, when a worker or policy reacted to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Where the command came from: `api`, `cli`, `webhook:github`, `worker:deploy`, …
    pub origin: String,
}

/// A domain event's content as JSON text, kept as text: the log is read far more often than
/// any one event's fields, and decoding goes straight from the text into the typed event.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<serde_json::value::RawValue>);

impl Payload {
    /// The JSON text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The raw JSON value, for binding as `jsonb`.
    #[must_use]
    pub fn as_raw(&self) -> &serde_json::value::RawValue {
        &self.0
    }

    /// The content as a JSON tree.
    ///
    /// # Errors
    /// Never for a payload that was read or built here (it is valid JSON by construction).
    pub fn to_value(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_str(self.0.get())
    }

    /// A payload holding `value`.
    ///
    /// # Errors
    /// When `value` cannot be serialized (a map with non-string keys).
    pub fn from_value(value: &serde_json::Value) -> serde_json::Result<Self> {
        Ok(Self(serde_json::value::to_raw_value(value)?))
    }
}

impl From<Box<serde_json::value::RawValue>> for Payload {
    fn from(raw: Box<serde_json::value::RawValue>) -> Self {
        Self(raw)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.get())
    }
}

/// An event about to be appended.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Unique; derived from the command id, so a retried command collides instead of duplicating.
    pub event_id: Uuid,
    /// E.g. `ApplicationCreated`.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// The domain event's content.
    pub payload: Payload,
    /// Who, why, where from.
    pub metadata: Metadata,
}

/// A position in the whole log: `(tx_id, global_position)`. Readers of the whole log order and
/// checkpoint by this pair (see DESIGN.md: it is what makes late commits delayed, not skipped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cursor {
    /// The id of the transaction that wrote the event.
    pub tx_id: i64,
    /// The event's global position.
    pub position: i64,
}

impl Cursor {
    /// Before the first event.
    pub const START: Self = Self { tx_id: 0, position: 0 };
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Position in the whole log (assigned at insert; unique, increasing, with gaps).
    pub global_position: i64,
    /// The writing transaction's id.
    pub tx_id: i64,
    /// `kind-uuid`.
    pub stream_id: String,
    /// 1-based position in its stream: the aggregate's version after this event.
    pub version: i64,
    /// Unique id.
    pub event_id: Uuid,
    /// E.g. `ApplicationCreated`.
    pub event_type: String,
    /// Schema version the payload was written with (upcast on decode).
    pub schema_version: u32,
    /// The team the stream belongs to.
    pub team_id: Uuid,
    /// The domain event's content.
    pub payload: Payload,
    /// Who, why, where from.
    pub metadata: Metadata,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    /// The payload as its domain event, once someone decoded it (see [`Decoded`]).
    #[serde(skip)]
    pub decoded: Decoded,
}

/// A recorded event's payload decoded as its domain event, kept by the first reader that
/// decodes it: readers that share the event — a rebuild hands each batch to every projection,
/// and an event is folded both by its aggregate's read model and by the audit log — then decode
/// it once. Not part of the event's value: it compares equal, and is not serialized.
#[derive(Clone, Default)]
pub struct Decoded(std::sync::OnceLock<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Decoded").field(&self.0.get().is_some()).finish()
    }
}

impl PartialEq for Decoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl RecordedEvent {
    /// This event's place in the whole log.
    #[must_use]
    pub fn cursor(&self) -> Cursor {
        Cursor { tx_id: self.tx_id, position: self.global_position }
    }

    /// The stream's kind: the part of the stream id before the uuid.
    #[must_use]
    pub fn stream_kind(&self) -> &str {
        stream_kind(&self.stream_id)
    }

    /// The aggregate's uuid, from the stream id.
    #[must_use]
    pub fn aggregate_id(&self) -> Option<Uuid> {
        aggregate_uuid(&self.stream_id)
    }

    /// Decodes the payload as a domain event, upcasting old shapes.
    ///
    /// # Errors
    /// When the payload fits no current event.
    pub fn decode<E: zpanel_domain::DomainEvent>(&self) -> Result<E, zpanel_domain::aggregate::UpcastError> {
        E::decode_json(&self.event_type, self.schema_version, self.payload.as_str())
    }

    /// Like [`RecordedEvent::decode`], decoding only the first time (for any reader of this
    /// event or a clone of it).
    ///
    /// # Errors
    /// When the payload fits no current event.
    pub fn decode_shared<E: zpanel_domain::DomainEvent>(
        &self,
    ) -> Result<std::sync::Arc<E>, zpanel_domain::aggregate::UpcastError> {
        if let Some(held) = self.decoded.0.get()
            && let Ok(event) = std::sync::Arc::clone(held).downcast::<E>()
        {
            return Ok(event);
        }
        let event = std::sync::Arc::new(self.decode::<E>()?);
        // Lost to another reader, or held as another type: either way this one is as good.
        let _ = self.decoded.0.set(event.clone());
        Ok(event)
    }
}

/// The kind part of a `kind-uuid` stream id.
#[must_use]
pub fn stream_kind(stream_id: &str) -> &str {
    // A uuid is 36 characters; the kind is what precedes "-<uuid>".
    stream_id.len().checked_sub(37).map_or(stream_id, |end| &stream_id[..end])
}

/// The uuid part of a `kind-uuid` stream id.
#[must_use]
pub fn aggregate_uuid(stream_id: &str) -> Option<Uuid> {
    stream_id.len().checked_sub(36).and_then(|start| Uuid::parse_str(&stream_id[start..]).ok())
}

/// A stream as loaded for a command: its team and its events in order.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    /// The owning team; `None` when the stream does not exist yet.
    pub team_id: Option<Uuid>,
    /// Its events, oldest first.
    pub events: Vec<RecordedEvent>,
}

impl Stream {
    /// The version (number of events).
    #[must_use]
    pub fn version(&self) -> i64 {
        self.events.last().map_or(0, |e| e.version)
    }
}

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The stream's version was not the expected one: someone else appended first.
    #[error("the stream was changed concurrently")]
    Conflict,
    /// An event id exists already: the same command was appended before.
    #[error("the command was already applied")]
    Duplicate,
    /// A domain the stream would hold is held by another stream (or, for another team,
    /// overlaps one it holds).
    #[error("the domain {domain} is already taken")]
    DomainTaken {
        /// The domain asked for.
        domain: DomainName,
    },
    /// The store failed.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// One append: events for one stream, at an expected version.
#[derive(Clone, Debug)]
pub struct Append<'a> {
    /// `kind-uuid`.
    pub stream_id: &'a str,
    /// The stream's kind (for the `streams` table).
    pub kind: &'a str,
    /// The owning team.
    pub team_id: TeamId,
    /// The version the decision was made on; 0 means the stream must not exist yet.
    pub expected_version: i64,
    /// The events, in order. Must not be empty.
    pub events: Vec<NewEvent>,
    /// The domains the stream holds once these events are appended, when that changes
    /// ([`zpanel_domain::Aggregate::claimed_domains`]): the claims are checked and written in the
    /// append's transaction, so of two streams racing for one name exactly one gets it.
    pub domains: Option<BTreeSet<DomainName>>,
}

/// An append-only store of event streams.
pub trait EventStore: Send + Sync {
    /// Appends events if the stream is still at the expected version; returns them as recorded.
    ///
    /// # Errors
    /// [`AppendError::Conflict`] when the version moved, [`AppendError::Duplicate`] when an event
    /// id exists, [`AppendError::Internal`] when the store fails.
    fn append(&self, append: Append<'_>) -> impl Future<Output = Result<Vec<RecordedEvent>, AppendError>> + Send;

    /// Reads one stream's events after `after_version`, oldest first.
    ///
    /// # Errors
    /// When the store fails.
    fn read_stream(&self, stream_id: &str, after_version: i64) -> impl Future<Output = anyhow::Result<Stream>> + Send;

    /// Reads up to `limit` events of the whole log after `after`, in log order, never skipping
    /// an event whose transaction commits late. `held_back` tells that committed events exist
    /// past what was returned, waiting on an older transaction: read again shortly.
    ///
    /// # Errors
    /// When the store fails.
    fn read_all(&self, after: Cursor, limit: i64) -> impl Future<Output = anyhow::Result<LogBatch>> + Send;

    /// Finds the events a command appended, if it was appended: `(stream, events)`.
    ///
    /// # Errors
    /// When the store fails.
    fn find_command(&self, command_id: Uuid)
    -> impl Future<Output = anyhow::Result<Option<Vec<RecordedEvent>>>> + Send;
}

/// A slice of the whole log.
#[derive(Clone, Debug, Default)]
pub struct LogBatch {
    /// Events in log order.
    pub events: Vec<RecordedEvent>,
    /// Whether committed events wait behind an older running transaction.
    pub held_back: bool,
}

/// The id of the `index`-th event of a command: stable, so a retried command produces the same
/// ids and the store rejects it as a duplicate instead of appending it twice.
#[must_use]
pub fn event_id_for(command_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&command_id, &(index as u64).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_split_into_kind_and_uuid() {
        let id = Uuid::now_v7();
        let stream = format!("private_key-{id}");
        assert_eq!(stream_kind(&stream), "private_key");
        assert_eq!(aggregate_uuid(&stream), Some(id));
        assert_eq!(aggregate_uuid("short"), None);
    }

    #[test]
    fn event_ids_are_stable_per_command_and_index() {
        let command = Uuid::now_v7();
        assert_eq!(event_id_for(command, 0), event_id_for(command, 0));
        assert_ne!(event_id_for(command, 0), event_id_for(command, 1));
        assert_ne!(event_id_for(command, 0), event_id_for(Uuid::now_v7(), 0));
    }

    #[test]
    fn a_webhook_is_a_system_actor_named_after_its_host() {
        let actor = Actor::webhook("github");
        assert_eq!(actor.kind, ActorKind::System);
        assert_eq!(actor.id, None);
        assert_eq!(actor.name, "webhook:github");
    }

    #[test]
    fn an_actor_kind_names_itself_as_it_is_stored() {
        for kind in [ActorKind::User, ActorKind::Token, ActorKind::Worker, ActorKind::System] {
            assert_eq!(serde_json::to_value(kind).expect("serializes"), kind.as_str());
        }
    }

    #[test]
    fn an_event_is_decoded_once_for_every_reader_of_it_and_its_clones() {
        use zpanel_domain::team::TeamEvent;
        let team = zpanel_domain::ids::TeamId::new();
        let payload = serde_json::json!({ "team_id": team, "name": "Acme" });
        let event = RecordedEvent {
            global_position: 1,
            tx_id: 1,
            stream_id: format!("team-{}", team.as_uuid()),
            version: 1,
            event_id: Uuid::now_v7(),
            event_type: "TeamCreated".into(),
            schema_version: 1,
            team_id: *team.as_uuid(),
            payload: Payload::from_value(&payload).expect("a payload"),
            metadata: Metadata {
                actor: Actor::system("test"),
                command_id: Uuid::now_v7(),
                correlation_id: Uuid::now_v7(),
                causation_id: None,
                origin: "test".into(),
            },
            recorded_at: OffsetDateTime::UNIX_EPOCH,
            decoded: Decoded::default(),
        };
        let clone = event.clone();
        let first = event.decode_shared::<TeamEvent>().expect("decodes");
        assert!(matches!(&*first, TeamEvent::TeamCreated { name, .. } if name.as_str() == "Acme"));
        assert!(std::sync::Arc::ptr_eq(&first, &event.decode_shared::<TeamEvent>().expect("decodes")));
        // A clone made before the decode has its own; one made after shares it.
        assert!(!std::sync::Arc::ptr_eq(&first, &clone.decode_shared::<TeamEvent>().expect("decodes")));
        assert!(std::sync::Arc::ptr_eq(&first, &event.clone().decode_shared::<TeamEvent>().expect("decodes")));
        // What it holds is not part of the event's value.
        assert_eq!(event, RecordedEvent { decoded: Decoded::default(), ..event.clone() });
        assert_eq!(serde_json::to_value(&event).expect("serializes").get("decoded"), None);
    }
}
