//! An API token of a team: a bearer secret (`zp_…`) that carries abilities.
//!
//! The token itself never enters the domain: the handler generates it, shows it once, and puts
//! only its hex SHA-256 into the command. A token never grants what its creator lacks, and never
//! outlives it: a creator that expires makes only tokens that expire no later.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::changes::{Describe, FieldValue};
use crate::ids::{ApiTokenId, TeamId};
use crate::values::{Abilities, Name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What a token is, once created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenDetails {
    /// Its id.
    pub id: ApiTokenId,
    /// The team it acts for.
    pub team_id: TeamId,
    /// Its display name.
    pub name: Name,
    /// What it may do.
    pub abilities: Abilities,
    /// Hex SHA-256 of the token, for lookup.
    pub token_hash: String,
    /// When it stops working, if ever.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// A token's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiToken {
    /// Before `ApiTokenCreated`.
    #[default]
    New,
    /// A token that works until it expires.
    Active(ApiTokenDetails),
    /// A revoked token: kept for history, works no more.
    Revoked(ApiTokenDetails),
}

impl ApiToken {
    /// The token's details, unless it does not exist.
    #[must_use]
    pub fn details(&self) -> Option<&ApiTokenDetails> {
        match self {
            Self::New => None,
            Self::Active(details) | Self::Revoked(details) => Some(details),
        }
    }

    /// Whether the token may be used at `now`: it exists, is not revoked and has not expired.
    #[must_use]
    pub fn is_usable_at(&self, now: OffsetDateTime) -> bool {
        match self {
            Self::Active(token) => token.expires_at.is_none_or(|expiry| now < expiry),
            Self::New | Self::Revoked(_) => false,
        }
    }
}

/// What can be asked of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiTokenCommand {
    /// Create a token.
    CreateApiToken {
        /// The new token's id.
        id: ApiTokenId,
        /// The team it acts for.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// What it may do.
        abilities: Abilities,
        /// Hex SHA-256 of the token (64 lowercase hex digits); never the token itself.
        token_hash: String,
        /// When it stops working, if ever.
        expires_at: Option<OffsetDateTime>,
        /// What the user or token asking for it may do (outside fact).
        creator_abilities: Abilities,
        /// When the user's session or token asking for it stops working, if ever (outside fact).
        creator_expires_at: Option<OffsetDateTime>,
        /// The time of the request.
        now: OffsetDateTime,
    },
    /// Revoke the token.
    RevokeApiToken,
}

/// What happened to a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ApiTokenEvent {
    /// A token was created.
    ApiTokenCreated {
        /// Its id.
        token_id: ApiTokenId,
        /// Its team.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// What it may do.
        abilities: Abilities,
        /// Hex SHA-256 of the token.
        token_hash: String,
        /// When it stops working, if ever.
        #[serde(with = "time::serde::rfc3339::option")]
        expires_at: Option<OffsetDateTime>,
    },
    /// The token was revoked.
    ApiTokenRevoked {},
}

impl DomainEvent for ApiTokenEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ApiTokenCreated { .. } => "ApiTokenCreated",
            Self::ApiTokenRevoked { .. } => "ApiTokenRevoked",
        }
    }
}

/// The rule a token command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiTokenError {
    /// Creating a token that exists.
    #[error("the api token already exists")]
    ApiTokenAlreadyExists,
    /// Anything but creation on a token that does not exist.
    #[error("the api token does not exist")]
    ApiTokenNotFound,
    /// A token that may do nothing is useless.
    #[error("a token needs at least one ability")]
    NoAbilities,
    /// A token never grants what its creator lacks.
    #[error("a token cannot have abilities its creator lacks")]
    ExceedsCreator,
    /// An expiry that has already passed.
    #[error("the expiry must be in the future")]
    ExpiryInThePast,
    /// A token that would outlive its creator (one that never expires, or expires later):
    /// refused rather than shortened, so that nobody holds a token that stops working earlier
    /// than they asked without knowing it.
    #[error("a token cannot outlive its creator; give an expiry no later than {}", rfc3339(*.creator_expires_at))]
    OutlivesCreator {
        /// When the creator stops working.
        creator_expires_at: OffsetDateTime,
    },
    /// The hash is not a hex SHA-256; refused so that a token can never be stored by mistake.
    #[error("the token hash must be 64 lowercase hex digits")]
    TokenHashMalformed,
    /// Revoking a revoked token.
    #[error("the api token is already revoked")]
    AlreadyRevoked,
}

impl crate::Rejection for ApiTokenError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::ApiTokenNotFound)
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            Self::NoAbilities | Self::ExceedsCreator => Some("abilities"),
            Self::ExpiryInThePast | Self::OutlivesCreator { .. } => Some("expiresAt"),
            Self::ApiTokenAlreadyExists | Self::ApiTokenNotFound | Self::TokenHashMalformed | Self::AlreadyRevoked => {
                None
            }
        }
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

impl Aggregate for ApiToken {
    const KIND: &'static str = ApiTokenId::KIND;
    type Command = ApiTokenCommand;
    type Event = ApiTokenEvent;
    type Error = ApiTokenError;

    fn decide(&self, command: &ApiTokenCommand) -> Result<Vec<ApiTokenEvent>, ApiTokenError> {
        match (self, command) {
            (
                Self::New,
                ApiTokenCommand::CreateApiToken {
                    id,
                    team_id,
                    name,
                    abilities,
                    token_hash,
                    expires_at,
                    creator_abilities,
                    creator_expires_at,
                    now,
                },
            ) => {
                if abilities.is_empty() {
                    return Err(ApiTokenError::NoAbilities);
                }
                if !creator_abilities.covers(abilities) {
                    return Err(ApiTokenError::ExceedsCreator);
                }
                if expires_at.is_some_and(|expiry| expiry <= *now) {
                    return Err(ApiTokenError::ExpiryInThePast);
                }
                if let Some(creator_expires_at) = *creator_expires_at
                    && expires_at.is_none_or(|expiry| expiry > creator_expires_at)
                {
                    return Err(ApiTokenError::OutlivesCreator { creator_expires_at });
                }
                if !is_sha256_hex(token_hash) {
                    return Err(ApiTokenError::TokenHashMalformed);
                }
                Ok(vec![ApiTokenEvent::ApiTokenCreated {
                    token_id: *id,
                    team_id: *team_id,
                    name: name.clone(),
                    abilities: abilities.clone(),
                    token_hash: token_hash.clone(),
                    expires_at: *expires_at,
                }])
            }
            (_, ApiTokenCommand::CreateApiToken { .. }) => Err(ApiTokenError::ApiTokenAlreadyExists),
            (Self::New, ApiTokenCommand::RevokeApiToken) => Err(ApiTokenError::ApiTokenNotFound),
            (Self::Revoked(_), ApiTokenCommand::RevokeApiToken) => Err(ApiTokenError::AlreadyRevoked),
            (Self::Active(_), ApiTokenCommand::RevokeApiToken) => Ok(vec![ApiTokenEvent::ApiTokenRevoked {}]),
        }
    }

    fn evolve(self, event: &ApiTokenEvent) -> Self {
        match (self, event) {
            (
                Self::New,
                ApiTokenEvent::ApiTokenCreated { token_id, team_id, name, abilities, token_hash, expires_at },
            ) => Self::Active(ApiTokenDetails {
                id: *token_id,
                team_id: *team_id,
                name: name.clone(),
                abilities: abilities.clone(),
                token_hash: token_hash.clone(),
                expires_at: *expires_at,
            }),
            (Self::Active(token), ApiTokenEvent::ApiTokenRevoked {}) => Self::Revoked(token),
            // Events that cannot apply to this state change nothing: evolve is total.
            (state, _) => state,
        }
    }
}

// The hash stays out: it is what a token is looked up by, and history has no use for it.
impl Describe for ApiToken {
    fn describe(&self) -> BTreeMap<String, FieldValue> {
        let (token, status) = match self {
            Self::New => return BTreeMap::new(),
            Self::Active(token) => (token, "active"),
            Self::Revoked(token) => (token, "revoked"),
        };
        let abilities = token.abilities.iter().map(|a| serde_json::Value::String(a.as_str().to_owned())).collect();
        let expires_at = token
            .expires_at
            .and_then(|expiry| expiry.format(&Rfc3339).ok())
            .map_or(serde_json::Value::Null, serde_json::Value::String);
        BTreeMap::from([
            ("name".to_owned(), FieldValue::Plain(token.name.as_str().into())),
            ("abilities".to_owned(), FieldValue::Plain(serde_json::Value::Array(abilities))),
            ("expiresAt".to_owned(), FieldValue::Plain(expires_at)),
            ("status".to_owned(), FieldValue::Plain(status.into())),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::Ability;
    use serde_json::json;
    use time::Duration;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2025-03-01 12:00 UTC);
    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn abilities(list: &[Ability]) -> Abilities {
        Abilities::new(list.iter().copied())
    }

    /// Given these events, when this command, then these events or this error.
    fn given(events: &[ApiTokenEvent]) -> ApiToken {
        ApiToken::fold(events)
    }

    fn create(granted: &[Ability], creator: &[Ability], expires_at: Option<OffsetDateTime>) -> ApiTokenCommand {
        ApiTokenCommand::CreateApiToken {
            id: ApiTokenId::new(),
            team_id: TeamId::new(),
            name: Name::parse("ci").expect("valid name"),
            abilities: abilities(granted),
            token_hash: HASH.into(),
            expires_at,
            creator_abilities: abilities(creator),
            creator_expires_at: None,
            now: NOW,
        }
    }

    /// `create`, asked by a creator that expires at `creator_expires_at`.
    fn create_by_expiring(expires_at: Option<OffsetDateTime>, creator_expires_at: OffsetDateTime) -> ApiTokenCommand {
        let mut command = create(&[Ability::Read], &[Ability::Root], expires_at);
        if let ApiTokenCommand::CreateApiToken { creator_expires_at: creator, .. } = &mut command {
            *creator = Some(creator_expires_at);
        }
        command
    }

    fn created(expires_at: Option<OffsetDateTime>) -> Vec<ApiTokenEvent> {
        given(&[]).decide(&create(&[Ability::Deploy], &[Ability::Root], expires_at)).expect("a token is created")
    }

    fn revoked() -> Vec<ApiTokenEvent> {
        let mut history = created(None);
        history.push(ApiTokenEvent::ApiTokenRevoked {});
        history
    }

    #[test]
    fn a_token_is_created_once_with_its_hash() {
        let id = ApiTokenId::new();
        let team_id = TeamId::new();
        let expiry = NOW + Duration::days(30);
        let command = ApiTokenCommand::CreateApiToken {
            id,
            team_id,
            name: Name::parse("ci").expect("valid name"),
            abilities: abilities(&[Ability::Read, Ability::Deploy]),
            token_hash: HASH.into(),
            expires_at: Some(expiry),
            creator_abilities: abilities(&[Ability::Read, Ability::Deploy, Ability::Write]),
            creator_expires_at: None,
            now: NOW,
        };
        assert_eq!(
            given(&[]).decide(&command),
            Ok(vec![ApiTokenEvent::ApiTokenCreated {
                token_id: id,
                team_id,
                name: Name::parse("ci").expect("valid name"),
                abilities: abilities(&[Ability::Read, Ability::Deploy]),
                token_hash: HASH.into(),
                expires_at: Some(expiry),
            }])
        );
        assert_eq!(given(&created(None)).decide(&command), Err(ApiTokenError::ApiTokenAlreadyExists));
    }

    #[test]
    fn a_token_needs_at_least_one_ability() {
        assert_eq!(given(&[]).decide(&create(&[], &[Ability::Root], None)), Err(ApiTokenError::NoAbilities));
    }

    #[test]
    fn a_token_never_grants_what_its_creator_lacks() {
        assert_eq!(
            given(&[]).decide(&create(&[Ability::Read, Ability::Deploy], &[Ability::Read], None)),
            Err(ApiTokenError::ExceedsCreator)
        );
        assert_eq!(
            given(&[]).decide(&create(&[Ability::Root], &[Ability::Write], None)),
            Err(ApiTokenError::ExceedsCreator)
        );
    }

    #[test]
    fn a_root_creator_may_grant_anything() {
        assert!(given(&[]).decide(&create(&Ability::ALL, &[Ability::Root], None)).is_ok());
    }

    #[test]
    fn an_expiry_must_be_in_the_future() {
        for expiry in [NOW, NOW - Duration::seconds(1)] {
            assert_eq!(
                given(&[]).decide(&create(&[Ability::Read], &[Ability::Read], Some(expiry))),
                Err(ApiTokenError::ExpiryInThePast)
            );
        }
    }

    #[test]
    fn a_token_never_outlives_a_creator_that_expires() {
        let creator_expires_at = NOW + Duration::days(1);
        for expires_at in [None, Some(creator_expires_at + Duration::seconds(1)), Some(NOW + Duration::days(365))] {
            assert_eq!(
                given(&[]).decide(&create_by_expiring(expires_at, creator_expires_at)),
                Err(ApiTokenError::OutlivesCreator { creator_expires_at }),
                "{expires_at:?}"
            );
        }
        for expires_at in [creator_expires_at, NOW + Duration::hours(1)] {
            assert!(given(&[]).decide(&create_by_expiring(Some(expires_at), creator_expires_at)).is_ok());
        }
        let refusal = ApiTokenError::OutlivesCreator { creator_expires_at };
        assert!(refusal.to_string().ends_with("2025-03-02T12:00:00Z"), "{refusal}");
        assert_eq!(crate::Rejection::field(&refusal), Some("expiresAt"));
    }

    #[test]
    fn a_plaintext_token_is_refused_in_place_of_its_hash() {
        for bad in ["zp_0123456789abcdef", "", &HASH.to_uppercase(), &HASH[1..]] {
            let mut command = create(&[Ability::Read], &[Ability::Read], None);
            if let ApiTokenCommand::CreateApiToken { token_hash, .. } = &mut command {
                *token_hash = bad.to_owned();
            }
            assert_eq!(given(&[]).decide(&command), Err(ApiTokenError::TokenHashMalformed), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_token_cannot_be_revoked() {
        assert_eq!(given(&[]).decide(&ApiTokenCommand::RevokeApiToken), Err(ApiTokenError::ApiTokenNotFound));
    }

    #[test]
    fn a_token_is_revoked_once() {
        assert_eq!(
            given(&created(None)).decide(&ApiTokenCommand::RevokeApiToken),
            Ok(vec![ApiTokenEvent::ApiTokenRevoked {}])
        );
        assert_eq!(given(&revoked()).decide(&ApiTokenCommand::RevokeApiToken), Err(ApiTokenError::AlreadyRevoked));
    }

    #[test]
    fn a_token_is_usable_until_it_expires_or_is_revoked() {
        let expiry = NOW + Duration::hours(1);
        let token = given(&created(Some(expiry)));
        assert!(token.is_usable_at(NOW));
        assert!(!token.is_usable_at(expiry));
        assert!(given(&created(None)).is_usable_at(NOW + Duration::days(3650)));
        assert!(!given(&revoked()).is_usable_at(NOW));
        assert!(!given(&[]).is_usable_at(NOW));
    }

    #[test]
    fn a_token_is_described_without_its_hash() {
        assert!(given(&[]).describe().is_empty());
        let described = given(&created(Some(datetime!(2025-04-01 00:00 UTC)))).describe();
        assert_eq!(described["abilities"], FieldValue::Plain(json!(["deploy"])));
        assert_eq!(described["expiresAt"], FieldValue::Plain(json!("2025-04-01T00:00:00Z")));
        assert_eq!(described["status"], FieldValue::Plain(json!("active")));
        let shown = serde_json::to_string(&described).expect("serializes");
        assert!(!shown.contains(HASH), "{shown}");
        assert_eq!(given(&revoked()).describe()["status"], FieldValue::Plain(json!("revoked")));
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let mut events = created(Some(NOW + Duration::days(1)));
        events.extend(created(None));
        events.push(ApiTokenEvent::ApiTokenRevoked {});
        for event in events {
            let (kind, payload) = event.encode().expect("encodes");
            assert_eq!(kind, event.event_type());
            assert_eq!(ApiTokenEvent::decode(kind, 1, payload).expect("decodes"), event);
            let (kind, text) = event.encode_json().expect("encodes");
            assert_eq!(ApiTokenEvent::decode_json(kind, 1, text.get()).expect("decodes"), event);
        }
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let state = given(&created(Some(NOW + Duration::days(1))));
        let json = serde_json::to_value(&state).expect("serializes");
        assert_eq!(serde_json::from_value::<ApiToken>(json).expect("deserializes"), state);
    }
}
