//! Command handling: load the aggregate, fold, decide, append at the expected version.
//!
//! Two writers racing on one stream: exactly one append wins; the other re-decides on the fresh
//! state, a bounded number of times. A command carries an id; its events' ids derive from it, so
//! a retried command collides with its first run and is answered with that run's result.

use crate::store::{Actor, Append, AppendError, EventStore, Metadata, NewEvent, RecordedEvent, event_id_for};
use uuid::Uuid;
use zpanel_domain::aggregate::{Aggregate, DomainEvent};
use zpanel_domain::ids::TeamId;
use zpanel_domain::values::DomainName;

/// How many times a command is re-decided after losing a race before giving up with `Conflict`.
pub const MAX_ATTEMPTS: usize = 5;

/// Who sends a command, for whom, and why: becomes each event's metadata.
#[derive(Clone, Debug)]
pub struct CommandContext {
    /// The team the command acts in. A stream of another team is answered as not found.
    pub team_id: TeamId,
    /// Who asked.
    pub actor: Actor,
    /// The command's id: send the same id again and nothing is written twice.
    pub command_id: Uuid,
    /// The chain this command belongs to.
    pub correlation_id: Uuid,
    /// The event this command reacts to, if any.
    pub causation_id: Option<Uuid>,
    /// Where it came from (`api`, `cli`, `worker:deploy`, …).
    pub origin: String,
}

impl CommandContext {
    /// A context for a fresh command (new command id, starting its own correlation chain).
    #[must_use]
    pub fn new(team_id: TeamId, actor: Actor, origin: &str) -> Self {
        let command_id = Uuid::now_v7();
        Self { team_id, actor, command_id, correlation_id: command_id, causation_id: None, origin: origin.to_owned() }
    }

    /// The same context with a client-chosen command id (for idempotent retries).
    #[must_use]
    pub fn with_command_id(mut self, command_id: Uuid) -> Self {
        if self.correlation_id == self.command_id {
            self.correlation_id = command_id;
        }
        self.command_id = command_id;
        self
    }

    /// A context for a command sent in reaction to `event`: its id derives from the event's id
    /// (and a `purpose`, when one event causes several commands), so redelivery cannot apply it twice.
    #[must_use]
    pub fn caused_by(event: &RecordedEvent, actor: Actor, origin: &str, purpose: &str) -> Self {
        Self {
            team_id: TeamId::from_uuid(event.team_id),
            actor,
            command_id: Uuid::new_v5(&event.event_id, purpose.as_bytes()),
            correlation_id: event.metadata.correlation_id,
            causation_id: Some(event.event_id),
            origin: origin.to_owned(),
        }
    }

    fn metadata(&self) -> Metadata {
        Metadata {
            actor: self.actor.clone(),
            command_id: self.command_id,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            origin: self.origin.clone(),
        }
    }
}

/// What a command did.
#[derive(Clone, Debug)]
pub struct Outcome<A> {
    /// The aggregate's stream.
    pub stream_id: String,
    /// The state after the command (for a repeated command: after its first run).
    pub state: A,
    /// The version after the command.
    pub version: i64,
    /// The events it appended (empty when it changed nothing).
    pub events: Vec<RecordedEvent>,
    /// Whether this answers a command id seen before, without appending anything.
    pub repeated: bool,
}

/// Why a command did not apply.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E> {
    /// It broke a domain rule.
    #[error(transparent)]
    Rejected(E),
    /// The aggregate does not exist in the caller's team (or at all).
    #[error("not found")]
    NotFound,
    /// It kept losing races with other writers.
    #[error("the {kind} was changed concurrently; try again")]
    Conflict {
        /// The aggregate kind.
        kind: &'static str,
    },
    /// A domain it would claim is another application's (or, of another team, overlaps one).
    #[error("the domain {domain} is taken: it, or a name it overlaps, is routed to another application")]
    DomainTaken {
        /// The domain asked for.
        domain: DomainName,
    },
    /// The store failed, or a stored event could not be read.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Runs commands against an event store.
#[derive(Clone, Debug)]
pub struct CommandHandler<S> {
    store: S,
}

impl<S: EventStore> CommandHandler<S> {
    /// A handler over `store`.
    pub fn new(store: S) -> Self {
        Self { store }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Loads an aggregate as of its latest version, if the caller's team may see it.
    ///
    /// # Errors
    /// `NotFound` for a stream of another team; `Internal` when the store fails.
    pub async fn load<A: Aggregate>(
        &self,
        team_id: TeamId,
        aggregate_id: Uuid,
    ) -> Result<(A, i64), CommandError<A::Error>> {
        let stream_id = format!("{}-{aggregate_id}", A::KIND);
        let stream = self.store.read_stream(&stream_id, 0).await?;
        if stream.team_id.is_some_and(|t| t != *team_id.as_uuid()) {
            return Err(CommandError::NotFound);
        }
        let state = fold::<A>(&stream.events)?;
        Ok((state, stream.version()))
    }

    /// Decides `command` against the current state of aggregate `aggregate_id` and appends the
    /// result, retrying on conflicts.
    ///
    /// # Errors
    /// `Rejected` with the broken rule; `NotFound` when the stream belongs to another team;
    /// `Conflict` after [`MAX_ATTEMPTS`] lost races; `Internal` when the store fails.
    pub async fn execute<A: Aggregate>(
        &self,
        ctx: &CommandContext,
        aggregate_id: Uuid,
        command: &A::Command,
    ) -> Result<Outcome<A>, CommandError<A::Error>> {
        let stream_id = format!("{}-{aggregate_id}", A::KIND);
        // Optimistic creation: a command that a stream which does not exist yet would accept
        // (a create) is first appended as if the stream were new, which costs one round trip
        // instead of two. If the stream exists, that append conflicts and the command is
        // decided again on the stream's real state, like any other lost race.
        let mut guess = A::default().decide(command).is_ok_and(|events| !events.is_empty()).then(|| (A::default(), 0));
        for _ in 0..MAX_ATTEMPTS + usize::from(guess.is_some()) {
            let (state, version) = match guess.take() {
                Some(guessed) => guessed,
                None => {
                    let stream = self.store.read_stream(&stream_id, 0).await?;
                    if stream.team_id.is_some_and(|t| t != *ctx.team_id.as_uuid()) {
                        return Err(CommandError::NotFound);
                    }
                    (fold::<A>(&stream.events)?, stream.version())
                }
            };
            let decided = match state.decide(command) {
                Ok(events) => events,
                Err(rule) => {
                    // A retried command meets the state its first run made, which may now
                    // reject it (a create that already happened): answer with the first run.
                    return match self.repeated(ctx, &stream_id).await? {
                        Some(outcome) => Ok(outcome),
                        None => Err(CommandError::Rejected(rule)),
                    };
                }
            };
            if decided.is_empty() {
                if let Some(outcome) = self.repeated(ctx, &stream_id).await? {
                    return Ok(outcome);
                }
                return Ok(Outcome { stream_id, state, version, events: vec![], repeated: false });
            }
            let metadata = ctx.metadata();
            let new_events = decided
                .iter()
                .enumerate()
                .map(|(i, event)| {
                    let (event_type, payload) = event.encode_json().map_err(anyhow::Error::from)?;
                    Ok(NewEvent {
                        event_id: event_id_for(ctx.command_id, i),
                        event_type: event_type.to_owned(),
                        schema_version: A::Event::schema_version(event_type),
                        payload: payload.into(),
                        metadata: metadata.clone(),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let claimed_before = state.claimed_domains();
            let state = decided.iter().fold(state, |s, e| s.evolve(e));
            let append = Append {
                stream_id: &stream_id,
                kind: A::KIND,
                team_id: ctx.team_id,
                expected_version: version,
                events: new_events,
                domains: state.claimed_domains().filter(|after| claimed_before.as_ref() != Some(after)),
            };
            match self.store.append(append).await {
                Ok(recorded) => {
                    let version = recorded.last().map_or(version, |e| e.version);
                    return Ok(Outcome { stream_id, state, version, events: recorded, repeated: false });
                }
                Err(AppendError::Conflict) => {}
                Err(AppendError::Duplicate) => {
                    return match self.repeated(ctx, &stream_id).await? {
                        Some(outcome) => Ok(outcome),
                        // An event id collided but not with this command's first event: the
                        // store's ids are v5 of command ids, so this means a reused command id
                        // on another stream. Refuse rather than guess.
                        None => Err(CommandError::Internal(anyhow::anyhow!(
                            "command id {} was already used for another command",
                            ctx.command_id
                        ))),
                    };
                }
                Err(AppendError::DomainTaken { domain }) => return Err(CommandError::DomainTaken { domain }),
                Err(AppendError::Internal(e)) => return Err(CommandError::Internal(e)),
            }
        }
        Err(CommandError::Conflict { kind: A::KIND })
    }

    /// The outcome of this context's command if it ran before on this stream.
    async fn repeated<A: Aggregate>(
        &self,
        ctx: &CommandContext,
        stream_id: &str,
    ) -> Result<Option<Outcome<A>>, CommandError<A::Error>> {
        let Some(events) = self.store.find_command(ctx.command_id).await? else {
            return Ok(None);
        };
        if events.first().is_none_or(|e| e.stream_id != stream_id || e.team_id != *ctx.team_id.as_uuid()) {
            return Err(CommandError::Internal(anyhow::anyhow!(
                "command id {} was already used for another command",
                ctx.command_id
            )));
        }
        let version = events.last().map_or(0, |e| e.version);
        let history = self.store.read_stream(stream_id, 0).await?;
        let upto: Vec<_> = history.events.into_iter().take_while(|e| e.version <= version).collect();
        let state = fold::<A>(&upto)?;
        Ok(Some(Outcome { stream_id: stream_id.to_owned(), state, version, events, repeated: true }))
    }
}

/// Folds stored events into an aggregate's state.
///
/// # Errors
/// When an event cannot be decoded.
pub fn fold<A: Aggregate>(events: &[RecordedEvent]) -> anyhow::Result<A> {
    // Events read for one fold are folded once: nothing to share, so none is kept decoded.
    events.iter().try_fold(A::default(), |state, recorded| {
        let event: A::Event = recorded.decode().map_err(|e| undecodable(recorded, &e))?;
        Ok(state.evolve(&event))
    })
}

/// Applies one stored event to a state, decoding (and upcasting) it first — once for all
/// readers of the event ([`RecordedEvent::decode_shared`]).
///
/// # Errors
/// When the event cannot be decoded as one of `A`'s events.
pub fn evolve_recorded<A: Aggregate>(state: A, recorded: &RecordedEvent) -> anyhow::Result<A> {
    let event = recorded.decode_shared::<A::Event>().map_err(|e| undecodable(recorded, &e))?;
    Ok(state.evolve(&event))
}

/// The error of an event that decodes as none of its aggregate's events.
fn undecodable(recorded: &RecordedEvent, error: &impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("event {} at {}: {error}", recorded.event_id, recorded.stream_id)
}
