//! An SSH private key of a team, used to log in to its servers.
//!
//! The handler parses the key, derives the public half and its fingerprint, and seals the private
//! half before the command is built: the domain sees only ciphertext, and so does the log.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::changes::{Describe, FieldValue};
use crate::ids::{PrivateKeyId, TeamId};
use crate::secret::SealedSecret;
use crate::values::Name;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What a private key is, once added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateKeyDetails {
    /// Its id.
    pub id: PrivateKeyId,
    /// The team it belongs to.
    pub team_id: TeamId,
    /// Its display name, unique within the team.
    pub name: Name,
    /// The public half in OpenSSH one-line form (`ssh-ed25519 AAAA… comment`).
    pub public_key: String,
    /// The public key's fingerprint (`SHA256:…`).
    pub fingerprint: String,
    /// The private half, sealed.
    pub private_key: SealedSecret,
}

/// A private key's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrivateKey {
    /// Before `PrivateKeyAdded`.
    #[default]
    New,
    /// A key.
    Active(PrivateKeyDetails),
    /// A removed key: gone (its sealed half with it), its id not to be reused.
    Removed {
        /// Its id.
        id: PrivateKeyId,
        /// The team it belonged to.
        team_id: TeamId,
    },
}

impl PrivateKey {
    /// The key's details, unless it does not exist (or no longer does).
    #[must_use]
    pub fn details(&self) -> Option<&PrivateKeyDetails> {
        match self {
            Self::Active(details) => Some(details),
            Self::New | Self::Removed { .. } => None,
        }
    }
}

/// What can be asked of a private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrivateKeyCommand {
    /// Add a key.
    AddPrivateKey {
        /// The new key's id.
        id: PrivateKeyId,
        /// The team it belongs to.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// The public half, OpenSSH one-line form (derived by the handler).
        public_key: String,
        /// The public key's fingerprint, `SHA256:…` (computed by the handler).
        fingerprint: String,
        /// The private half, sealed by the handler.
        private_key: SealedSecret,
        /// The names of the team's other keys (outside fact).
        names_in_use: BTreeSet<Name>,
    },
    /// Rename it.
    RenamePrivateKey {
        /// The new name.
        name: Name,
        /// The names of the team's other keys (outside fact).
        names_in_use: BTreeSet<Name>,
    },
    /// Remove it.
    RemovePrivateKey {
        /// How many servers log in with it and applications clone with it (outside fact).
        in_use_by: usize,
    },
}

/// What happened to a private key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum PrivateKeyEvent {
    /// A key was added.
    PrivateKeyAdded {
        /// Its id.
        private_key_id: PrivateKeyId,
        /// Its team.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// The public half.
        public_key: String,
        /// The public key's fingerprint.
        fingerprint: String,
        /// The private half, sealed: ciphertext only.
        private_key: SealedSecret,
    },
    /// The key was renamed.
    PrivateKeyRenamed {
        /// The new name.
        name: Name,
    },
    /// The key was removed.
    PrivateKeyRemoved {},
}

impl DomainEvent for PrivateKeyEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::PrivateKeyAdded { .. } => "PrivateKeyAdded",
            Self::PrivateKeyRenamed { .. } => "PrivateKeyRenamed",
            Self::PrivateKeyRemoved { .. } => "PrivateKeyRemoved",
        }
    }
}

/// The rule a private-key command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrivateKeyError {
    /// Adding a key that exists (or existed).
    #[error("the private key already exists")]
    PrivateKeyAlreadyExists,
    /// Anything but adding on a key that does not exist or was removed.
    #[error("the private key does not exist")]
    PrivateKeyNotFound,
    /// Another key of the team has that name.
    #[error("another private key of the team is already named so")]
    PrivateKeyNameTaken,
    /// Removing a key that servers log in with or applications clone with.
    #[error("servers still log in with the private key, or applications clone with it")]
    PrivateKeyInUse,
}

impl crate::Rejection for PrivateKeyError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::PrivateKeyNotFound)
    }
}

impl Aggregate for PrivateKey {
    const KIND: &'static str = PrivateKeyId::KIND;
    type Command = PrivateKeyCommand;
    type Event = PrivateKeyEvent;
    type Error = PrivateKeyError;

    fn decide(&self, command: &PrivateKeyCommand) -> Result<Vec<PrivateKeyEvent>, PrivateKeyError> {
        let key = match (self, command) {
            (
                Self::New,
                PrivateKeyCommand::AddPrivateKey {
                    id,
                    team_id,
                    name,
                    public_key,
                    fingerprint,
                    private_key,
                    names_in_use,
                },
            ) => {
                if names_in_use.contains(name) {
                    return Err(PrivateKeyError::PrivateKeyNameTaken);
                }
                return Ok(vec![PrivateKeyEvent::PrivateKeyAdded {
                    private_key_id: *id,
                    team_id: *team_id,
                    name: name.clone(),
                    public_key: public_key.clone(),
                    fingerprint: fingerprint.clone(),
                    private_key: private_key.clone(),
                }]);
            }
            (_, PrivateKeyCommand::AddPrivateKey { .. }) => {
                return Err(PrivateKeyError::PrivateKeyAlreadyExists);
            }
            (Self::New | Self::Removed { .. }, _) => {
                return Err(PrivateKeyError::PrivateKeyNotFound);
            }
            (Self::Active(key), _) => key,
        };
        match command {
            PrivateKeyCommand::AddPrivateKey { .. } => unreachable!("handled above"),
            PrivateKeyCommand::RenamePrivateKey { name, .. } if *name == key.name => Ok(vec![]),
            PrivateKeyCommand::RenamePrivateKey { name, names_in_use } if names_in_use.contains(name) => {
                Err(PrivateKeyError::PrivateKeyNameTaken)
            }
            PrivateKeyCommand::RenamePrivateKey { name, .. } => {
                Ok(vec![PrivateKeyEvent::PrivateKeyRenamed { name: name.clone() }])
            }
            PrivateKeyCommand::RemovePrivateKey { in_use_by } if *in_use_by > 0 => {
                Err(PrivateKeyError::PrivateKeyInUse)
            }
            PrivateKeyCommand::RemovePrivateKey { .. } => Ok(vec![PrivateKeyEvent::PrivateKeyRemoved {}]),
        }
    }

    fn evolve(self, event: &PrivateKeyEvent) -> Self {
        match (self, event) {
            (
                Self::New,
                PrivateKeyEvent::PrivateKeyAdded {
                    private_key_id,
                    team_id,
                    name,
                    public_key,
                    fingerprint,
                    private_key,
                },
            ) => Self::Active(PrivateKeyDetails {
                id: *private_key_id,
                team_id: *team_id,
                name: name.clone(),
                public_key: public_key.clone(),
                fingerprint: fingerprint.clone(),
                private_key: private_key.clone(),
            }),
            (Self::Active(mut key), PrivateKeyEvent::PrivateKeyRenamed { name }) => {
                key.name = name.clone();
                Self::Active(key)
            }
            (Self::Active(key), PrivateKeyEvent::PrivateKeyRemoved {}) => {
                Self::Removed { id: key.id, team_id: key.team_id }
            }
            // Events that cannot apply to this state change nothing: evolve is total.
            (state, _) => state,
        }
    }
}

impl Describe for PrivateKey {
    fn describe(&self) -> BTreeMap<String, FieldValue> {
        let Self::Active(key) = self else {
            return BTreeMap::new();
        };
        BTreeMap::from([
            ("name".to_owned(), FieldValue::Plain(key.name.as_str().into())),
            ("publicKey".to_owned(), FieldValue::Plain(key.public_key.as_str().into())),
            ("fingerprint".to_owned(), FieldValue::Plain(key.fingerprint.as_str().into())),
            ("privateKey".to_owned(), FieldValue::Secret { digest: key.private_key.digest.clone() }),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn name(s: &str) -> Name {
        Name::parse(s).expect("valid name")
    }

    /// Given these events, when this command, then these events or this error.
    fn given(events: &[PrivateKeyEvent]) -> PrivateKey {
        PrivateKey::fold(events)
    }

    fn sealed() -> SealedSecret {
        SealedSecret {
            key_id: "k1".into(),
            nonce: "bm9uY2U=".into(),
            ciphertext: "Y2lwaGVydGV4dA==".into(),
            digest: "ZGlnZXN0".into(),
        }
    }

    fn add(names_in_use: BTreeSet<Name>) -> PrivateKeyCommand {
        PrivateKeyCommand::AddPrivateKey {
            id: PrivateKeyId::new(),
            team_id: TeamId::new(),
            name: name("deploy key"),
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF deploy@zpanel".into(),
            fingerprint: "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s".into(),
            private_key: sealed(),
            names_in_use,
        }
    }

    fn added() -> Vec<PrivateKeyEvent> {
        given(&[]).decide(&add(BTreeSet::new())).expect("a key is added")
    }

    #[test]
    fn a_key_is_added_once_with_its_sealed_half() {
        let history = added();
        assert!(matches!(
            history.as_slice(),
            [PrivateKeyEvent::PrivateKeyAdded { private_key, .. }] if *private_key == sealed()
        ));
        assert_eq!(given(&history).decide(&add(BTreeSet::new())), Err(PrivateKeyError::PrivateKeyAlreadyExists));
    }

    #[test]
    fn adding_with_a_taken_name_is_rejected() {
        assert_eq!(
            given(&[]).decide(&add(BTreeSet::from([name("deploy key")]))),
            Err(PrivateKeyError::PrivateKeyNameTaken)
        );
    }

    #[test]
    fn a_missing_key_rejects_everything_but_adding() {
        assert_eq!(
            given(&[]).decide(&PrivateKeyCommand::RemovePrivateKey { in_use_by: 0 }),
            Err(PrivateKeyError::PrivateKeyNotFound)
        );
    }

    #[test]
    fn renaming_to_a_taken_name_is_rejected() {
        assert_eq!(
            given(&added()).decide(&PrivateKeyCommand::RenamePrivateKey {
                name: name("ci key"),
                names_in_use: BTreeSet::from([name("ci key")]),
            }),
            Err(PrivateKeyError::PrivateKeyNameTaken)
        );
    }

    #[test]
    fn renaming_records_the_new_name_and_the_same_name_records_nothing() {
        let key = given(&added());
        assert_eq!(
            key.decide(&PrivateKeyCommand::RenamePrivateKey { name: name("old key"), names_in_use: BTreeSet::new() }),
            Ok(vec![PrivateKeyEvent::PrivateKeyRenamed { name: name("old key") }])
        );
        assert_eq!(
            key.decide(&PrivateKeyCommand::RenamePrivateKey {
                name: name("deploy key"),
                names_in_use: BTreeSet::new(),
            }),
            Ok(vec![])
        );
    }

    #[test]
    fn a_key_servers_log_in_with_is_not_removed() {
        assert_eq!(
            given(&added()).decide(&PrivateKeyCommand::RemovePrivateKey { in_use_by: 1 }),
            Err(PrivateKeyError::PrivateKeyInUse)
        );
    }

    #[test]
    fn a_removed_key_is_gone_with_its_sealed_half() {
        let mut history = added();
        let removed = given(&history).decide(&PrivateKeyCommand::RemovePrivateKey { in_use_by: 0 });
        assert_eq!(removed, Ok(vec![PrivateKeyEvent::PrivateKeyRemoved {}]));
        history.extend(removed.unwrap_or_default());
        let key = given(&history);
        assert!(key.details().is_none());
        assert!(!serde_json::to_string(&key).expect("serializes").contains("Y2lwaGVydGV4dA=="));
        assert_eq!(
            key.decide(&PrivateKeyCommand::RemovePrivateKey { in_use_by: 0 }),
            Err(PrivateKeyError::PrivateKeyNotFound)
        );
    }

    #[test]
    fn the_private_half_is_described_only_by_its_digest() {
        assert!(given(&[]).describe().is_empty());
        let described = given(&added()).describe();
        assert_eq!(described["privateKey"], FieldValue::Secret { digest: "ZGlnZXN0".into() });
        assert_eq!(
            described["fingerprint"],
            FieldValue::Plain(json!("SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"))
        );
        let shown = serde_json::to_string(&described).expect("serializes");
        assert!(!shown.contains("Y2lwaGVydGV4dA=="), "{shown}");
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let mut events = added();
        events.extend([PrivateKeyEvent::PrivateKeyRenamed { name: name("x") }, PrivateKeyEvent::PrivateKeyRemoved {}]);
        for event in events {
            let (kind, payload) = event.encode().expect("encodes");
            assert_eq!(kind, event.event_type());
            assert_eq!(PrivateKeyEvent::decode(kind, 1, payload).expect("decodes"), event);
            let (kind, text) = event.encode_json().expect("encodes");
            assert_eq!(PrivateKeyEvent::decode_json(kind, 1, text.get()).expect("decodes"), event);
        }
    }
}
