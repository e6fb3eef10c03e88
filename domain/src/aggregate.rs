//! The vocabulary every aggregate speaks: commands are decided into events, events evolve state.

use crate::values::DomainName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::fmt::Debug;

/// An event of one aggregate kind. Implemented for each aggregate's event enum, which is
/// serialized adjacently tagged (`{"type": "ApplicationCreated", "data": {…}}`): the tag becomes
/// the stored `event_type`, the content the stored `payload`.
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync + 'static {
    /// The event's name as stored, e.g. `ApplicationCreated`.
    fn event_type(&self) -> &'static str;

    /// The schema version this code writes for `event_type`. Bump it when a payload's shape
    /// changes, and teach [`DomainEvent::upcast`] to lift the old shape.
    fn schema_version(_event_type: &str) -> u32 {
        1
    }

    /// Lifts a payload stored at an older `schema_version` to the current shape. Old events are
    /// upcast on read, never rewritten.
    ///
    /// # Errors
    /// When the stored payload has no known path to the current shape.
    fn upcast(_event_type: &str, _version: u32, payload: serde_json::Value) -> Result<serde_json::Value, UpcastError> {
        Ok(payload)
    }

    /// Splits the event into its stored `(event_type, payload)`.
    ///
    /// # Errors
    /// Only when serde cannot serialize the event, which is a bug.
    fn encode(&self) -> Result<(&'static str, serde_json::Value), serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        let payload = value.get_mut("data").map(serde_json::Value::take).unwrap_or(serde_json::Value::Null);
        Ok((self.event_type(), payload))
    }

    /// Rebuilds an event from its stored form, upcasting older schema versions first.
    ///
    /// # Errors
    /// When the payload does not fit the event type (or the type is unknown).
    fn decode(event_type: &str, version: u32, payload: serde_json::Value) -> Result<Self, UpcastError> {
        let current = Self::schema_version(event_type);
        if version > current {
            return Err(UpcastError::FromTheFuture { event_type: event_type.to_owned(), version });
        }
        let payload = if version < current { Self::upcast(event_type, version, payload)? } else { payload };
        let mut tagged = serde_json::Map::new();
        tagged.insert("type".into(), serde_json::Value::String(event_type.to_owned()));
        if !payload.is_null() {
            tagged.insert("data".into(), payload);
        }
        serde_json::from_value(serde_json::Value::Object(tagged))
            .map_err(|source| UpcastError::Shape { event_type: event_type.to_owned(), source })
    }

    /// Like [`DomainEvent::encode`], with the payload as JSON text — what the store writes.
    ///
    /// # Errors
    /// Only when serde cannot serialize the event, which is a bug.
    fn encode_json(&self) -> Result<(&'static str, Box<serde_json::value::RawValue>), serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Tagged<'a> {
            #[serde(borrow)]
            data: Option<&'a serde_json::value::RawValue>,
        }
        let whole = serde_json::to_string(self)?;
        let tagged: Tagged<'_> = serde_json::from_str(&whole)?;
        let payload = match tagged.data {
            Some(data) => data.to_owned(),
            None => serde_json::value::RawValue::from_string("null".to_owned())?,
        };
        Ok((self.event_type(), payload))
    }

    /// Like [`DomainEvent::decode`], from the payload's JSON text. Current versions are parsed
    /// straight into the event, without an intermediate JSON tree: this is the hot path of every
    /// read of the log.
    ///
    /// # Errors
    /// When the payload does not fit the event type (or the type is unknown).
    fn decode_json(event_type: &str, version: u32, payload: &str) -> Result<Self, UpcastError> {
        let shape = |source| UpcastError::Shape { event_type: event_type.to_owned(), source };
        if version != Self::schema_version(event_type) {
            return Self::decode(event_type, version, serde_json::from_str(payload).map_err(shape)?);
        }
        // The tag first, so serde reads the content directly into its variant.
        let tag = serde_json::to_string(event_type).map_err(shape)?;
        let payload = payload.trim();
        let tagged = if payload == "null" {
            format!("{{\"type\":{tag}}}")
        } else {
            format!("{{\"type\":{tag},\"data\":{payload}}}")
        };
        serde_json::from_str(&tagged).map_err(shape)
    }
}

/// A stored event that cannot be read as any current event.
#[derive(Debug, thiserror::Error)]
pub enum UpcastError {
    /// The payload does not match the event type's shape.
    #[error("event {event_type} does not match its schema: {source}")]
    Shape {
        /// The stored event type.
        event_type: String,
        /// What serde found.
        #[source]
        source: serde_json::Error,
    },
    /// Written by newer code than this.
    #[error("event {event_type} has schema version {version}, newer than this build knows")]
    FromTheFuture {
        /// The stored event type.
        event_type: String,
        /// The stored schema version.
        version: u32,
    },
    /// An older version with no upcaster.
    #[error("event {event_type} at schema version {version} cannot be upcast")]
    NoUpcaster {
        /// The stored event type.
        event_type: String,
        /// The stored schema version.
        version: u32,
    },
}

/// A rule a command broke.
pub trait Rejection: std::error::Error + Send + Sync + 'static {
    /// Whether the rule is that the aggregate does not exist (never did, or was removed):
    /// clients are told it is not found, exactly as for another team's id.
    fn is_not_found(&self) -> bool;

    /// The command field whose value broke the rule, as clients name it (`expiresAt`), when
    /// the rule is about one value the client chose: clients are then told it is invalid
    /// input naming that field, rather than a conflict with the current state.
    fn field(&self) -> Option<&'static str> {
        None
    }
}

/// An aggregate: a consistency boundary whose state is the fold of its events.
///
/// `decide` holds every rule and never changes state; `evolve` holds no rule and never fails.
/// `Default` is the state before the first event.
pub trait Aggregate: Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync {
    /// The stream kind, e.g. `application`: streams are named `kind-uuid`.
    const KIND: &'static str;
    /// What can be asked of it.
    type Command: Debug + Send + Sync;
    /// What happened to it.
    type Event: DomainEvent;
    /// Which rule a command broke.
    type Error: Rejection;

    /// Decides what a command does to this state: the events to record, or the broken rule.
    ///
    /// # Errors
    /// The rule that the command breaks.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event. Total: every event applies to every state.
    #[must_use]
    fn evolve(self, event: &Self::Event) -> Self;

    /// The domain names this state holds across the whole installation; `None` for kinds that
    /// hold none. No two streams hold one name (nor, of two teams, overlapping names: see
    /// [`DomainName::overlaps`]): a rule over many streams, which the store keeps by writing
    /// each change of this set in the transaction of the append that makes it (ADR 0018).
    fn claimed_domains(&self) -> Option<BTreeSet<DomainName>> {
        None
    }

    /// The state after the given events.
    #[must_use]
    fn fold<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        events.into_iter().fold(Self::default(), Self::evolve)
    }
}
