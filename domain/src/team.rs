//! The team: the tenant. Every other stream belongs to exactly one team.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::{TeamId, UserId};
use crate::values::Name;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A member's role in a team.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including the team itself.
    Owner,
    /// Everything but deleting the team or removing owners.
    Admin,
    /// Configure and deploy.
    Member,
    /// Read only.
    Viewer,
}

/// A team's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Team {
    /// Before `TeamCreated`.
    #[default]
    New,
    /// A team.
    Active {
        /// Its id.
        id: TeamId,
        /// Its display name.
        name: Name,
        /// Its members and their roles.
        members: BTreeMap<UserId, Role>,
    },
}

/// What can be asked of a team.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TeamCommand {
    /// Create the team.
    CreateTeam {
        /// The new team's id.
        id: TeamId,
        /// Its name.
        name: Name,
    },
    /// Rename it.
    RenameTeam {
        /// The new name.
        name: Name,
    },
    /// Add a user with a role.
    AddMember {
        /// The user.
        user_id: UserId,
        /// The role.
        role: Role,
    },
    /// Change a member's role.
    ChangeMemberRole {
        /// The member.
        user_id: UserId,
        /// The new role.
        role: Role,
    },
    /// Remove a member.
    RemoveMember {
        /// The member.
        user_id: UserId,
    },
}

/// What happened to a team.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum TeamEvent {
    /// The team was created.
    TeamCreated {
        /// Its id.
        team_id: TeamId,
        /// Its name.
        name: Name,
    },
    /// The team was renamed.
    TeamRenamed {
        /// The new name.
        name: Name,
    },
    /// A user joined the team.
    MemberAdded {
        /// The user.
        user_id: UserId,
        /// The role.
        role: Role,
    },
    /// A member's role changed.
    MemberRoleChanged {
        /// The member.
        user_id: UserId,
        /// The new role.
        role: Role,
    },
    /// A member left the team.
    MemberRemoved {
        /// The member.
        user_id: UserId,
    },
}

impl DomainEvent for TeamEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::TeamCreated { .. } => "TeamCreated",
            Self::TeamRenamed { .. } => "TeamRenamed",
            Self::MemberAdded { .. } => "MemberAdded",
            Self::MemberRoleChanged { .. } => "MemberRoleChanged",
            Self::MemberRemoved { .. } => "MemberRemoved",
        }
    }
}

/// The rule a team command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TeamError {
    /// Creating a team that exists.
    #[error("the team already exists")]
    TeamAlreadyExists,
    /// Anything but creation on a team that does not exist.
    #[error("the team does not exist")]
    TeamNotFound,
    /// Adding a user twice.
    #[error("the user is already a member")]
    AlreadyAMember,
    /// Changing or removing a non-member.
    #[error("the user is not a member")]
    NotAMember,
    /// Demoting or removing the last owner would leave a team nobody can administer.
    #[error("a team must keep at least one owner")]
    LastOwner,
}

impl crate::Rejection for TeamError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::TeamNotFound)
    }
}

impl Aggregate for Team {
    const KIND: &'static str = TeamId::KIND;
    type Command = TeamCommand;
    type Event = TeamEvent;
    type Error = TeamError;

    fn decide(&self, command: &TeamCommand) -> Result<Vec<TeamEvent>, TeamError> {
        let (members, name) = match (self, command) {
            (Self::New, TeamCommand::CreateTeam { id, name }) => {
                return Ok(vec![TeamEvent::TeamCreated { team_id: *id, name: name.clone() }]);
            }
            (Self::Active { .. }, TeamCommand::CreateTeam { .. }) => {
                return Err(TeamError::TeamAlreadyExists);
            }
            (Self::New, _) => return Err(TeamError::TeamNotFound),
            (Self::Active { members, name, .. }, _) => (members, name),
        };
        let owners = members.values().filter(|r| **r == Role::Owner).count();
        let would_lose_last_owner = |user_id: &UserId| members.get(user_id) == Some(&Role::Owner) && owners == 1;
        match command {
            TeamCommand::CreateTeam { .. } => unreachable!("handled above"),
            TeamCommand::RenameTeam { name: new } if new == name => Ok(vec![]),
            TeamCommand::RenameTeam { name } => Ok(vec![TeamEvent::TeamRenamed { name: name.clone() }]),
            TeamCommand::AddMember { user_id, .. } if members.contains_key(user_id) => Err(TeamError::AlreadyAMember),
            TeamCommand::AddMember { user_id, role } => {
                Ok(vec![TeamEvent::MemberAdded { user_id: *user_id, role: *role }])
            }
            TeamCommand::ChangeMemberRole { user_id, role } => match members.get(user_id) {
                None => Err(TeamError::NotAMember),
                Some(current) if current == role => Ok(vec![]),
                Some(_) if would_lose_last_owner(user_id) => Err(TeamError::LastOwner),
                Some(_) => Ok(vec![TeamEvent::MemberRoleChanged { user_id: *user_id, role: *role }]),
            },
            TeamCommand::RemoveMember { user_id } if !members.contains_key(user_id) => Err(TeamError::NotAMember),
            TeamCommand::RemoveMember { user_id } if would_lose_last_owner(user_id) => Err(TeamError::LastOwner),
            TeamCommand::RemoveMember { user_id } => Ok(vec![TeamEvent::MemberRemoved { user_id: *user_id }]),
        }
    }

    fn evolve(self, event: &TeamEvent) -> Self {
        match (self, event) {
            (Self::New, TeamEvent::TeamCreated { team_id, name }) => {
                Self::Active { id: *team_id, name: name.clone(), members: BTreeMap::new() }
            }
            (Self::Active { id, members, .. }, TeamEvent::TeamRenamed { name }) => {
                Self::Active { id, name: name.clone(), members }
            }
            (Self::Active { id, name, mut members }, TeamEvent::MemberAdded { user_id, role })
            | (Self::Active { id, name, mut members }, TeamEvent::MemberRoleChanged { user_id, role }) => {
                members.insert(*user_id, *role);
                Self::Active { id, name, members }
            }
            (Self::Active { id, name, mut members }, TeamEvent::MemberRemoved { user_id }) => {
                members.remove(user_id);
                Self::Active { id, name, members }
            }
            // Events that cannot apply to this state change nothing: evolve is total.
            (state, _) => state,
        }
    }
}

impl crate::changes::Describe for Team {
    fn describe(&self) -> BTreeMap<String, crate::changes::FieldValue> {
        use crate::changes::FieldValue;
        let Self::Active { name, members, .. } = self else {
            return BTreeMap::new();
        };
        let role = |role: &Role| match role {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        };
        let mut fields = BTreeMap::from([("name".to_owned(), FieldValue::Plain(name.as_str().into()))]);
        for (user_id, member_role) in members {
            fields.insert(format!("members.{user_id}"), FieldValue::Plain(role(member_role).into()));
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::parse(s).expect("valid name")
    }

    /// Given these events, when this command, then these events or this error.
    fn given(events: &[TeamEvent]) -> Team {
        Team::fold(events)
    }

    fn created() -> (TeamId, Vec<TeamEvent>) {
        let id = TeamId::new();
        (id, vec![TeamEvent::TeamCreated { team_id: id, name: name("Acme") }])
    }

    #[test]
    fn a_team_is_created_once() {
        let id = TeamId::new();
        let events = given(&[]).decide(&TeamCommand::CreateTeam { id, name: name("Acme") });
        assert_eq!(events, Ok(vec![TeamEvent::TeamCreated { team_id: id, name: name("Acme") }]));
        let (_, history) = created();
        assert_eq!(
            given(&history).decide(&TeamCommand::CreateTeam { id, name: name("Other") }),
            Err(TeamError::TeamAlreadyExists)
        );
    }

    #[test]
    fn a_missing_team_rejects_everything_but_creation() {
        assert_eq!(given(&[]).decide(&TeamCommand::RenameTeam { name: name("x") }), Err(TeamError::TeamNotFound));
    }

    #[test]
    fn renaming_to_the_same_name_records_nothing() {
        let (_, history) = created();
        assert_eq!(given(&history).decide(&TeamCommand::RenameTeam { name: name("Acme") }), Ok(vec![]));
    }

    #[test]
    fn the_last_owner_cannot_leave_or_be_demoted() {
        let (_, mut history) = created();
        let owner = UserId::new();
        history.push(TeamEvent::MemberAdded { user_id: owner, role: Role::Owner });
        let team = given(&history);
        assert_eq!(team.decide(&TeamCommand::RemoveMember { user_id: owner }), Err(TeamError::LastOwner));
        assert_eq!(
            team.decide(&TeamCommand::ChangeMemberRole { user_id: owner, role: Role::Admin }),
            Err(TeamError::LastOwner)
        );
        let second = UserId::new();
        history.push(TeamEvent::MemberAdded { user_id: second, role: Role::Owner });
        assert_eq!(
            given(&history).decide(&TeamCommand::RemoveMember { user_id: owner }),
            Ok(vec![TeamEvent::MemberRemoved { user_id: owner }])
        );
    }

    #[test]
    fn a_member_is_added_once_and_removed_only_if_present() {
        let (_, mut history) = created();
        let user = UserId::new();
        history.push(TeamEvent::MemberAdded { user_id: user, role: Role::Member });
        let team = given(&history);
        assert_eq!(
            team.decide(&TeamCommand::AddMember { user_id: user, role: Role::Viewer }),
            Err(TeamError::AlreadyAMember)
        );
        assert_eq!(team.decide(&TeamCommand::RemoveMember { user_id: UserId::new() }), Err(TeamError::NotAMember));
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let event = TeamEvent::MemberAdded { user_id: UserId::new(), role: Role::Admin };
        let (kind, payload) = event.encode().expect("encodes");
        assert_eq!(kind, "MemberAdded");
        assert_eq!(TeamEvent::decode(kind, 1, payload).expect("decodes"), event);
        let (kind, text) = event.encode_json().expect("encodes");
        assert_eq!(TeamEvent::decode_json(kind, 1, text.get()).expect("decodes"), event);
    }

    #[test]
    fn a_team_describes_its_name_and_each_members_role() {
        use crate::changes::{Describe, FieldValue, diff};
        assert!(given(&[]).describe().is_empty());
        let (_, mut history) = created();
        let user = UserId::new();
        history.push(TeamEvent::MemberAdded { user_id: user, role: Role::Member });
        let before = given(&history).describe();
        assert_eq!(before.get("name"), Some(&FieldValue::Plain(serde_json::json!("Acme"))));
        history.push(TeamEvent::MemberRoleChanged { user_id: user, role: Role::Admin });
        let changes = diff(&before, &given(&history).describe());
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].field, format!("members.{user}"));
        assert_eq!(changes[0].before, Some(serde_json::json!("member")));
        assert_eq!(changes[0].after, Some(serde_json::json!("admin")));
    }
}
