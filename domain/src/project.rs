//! The project: a named group of applications, split into environments (`production`,
//! `staging`, …). Every project starts with `production`.
//!
//! Environments are referred to by name from applications, so an environment is renamed or
//! removed only while no application lives in it (the handler counts them); otherwise the
//! applications would point at a name that no longer exists.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::changes::{Describe, FieldValue};
use crate::ids::{ProjectId, TeamId};
use crate::values::{EnvironmentName, Name};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What a project is, once created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectDetails {
    /// Its id.
    pub id: ProjectId,
    /// The team it belongs to.
    pub team_id: TeamId,
    /// Its display name, unique within the team.
    pub name: Name,
    /// Its environments, in the order they were created.
    pub environments: Vec<EnvironmentName>,
}

/// A project's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Project {
    /// Before `ProjectCreated`.
    #[default]
    New,
    /// A project that takes changes.
    Active(ProjectDetails),
    /// An archived project: kept for history, changes no more.
    Archived(ProjectDetails),
}

impl Project {
    /// The project's details, unless it does not exist.
    #[must_use]
    pub fn details(&self) -> Option<&ProjectDetails> {
        match self {
            Self::New => None,
            Self::Active(details) | Self::Archived(details) => Some(details),
        }
    }

    /// Its environments, in the order they were created (none before creation).
    #[must_use]
    pub fn environments(&self) -> &[EnvironmentName] {
        self.details().map_or(&[], |d| d.environments.as_slice())
    }

    /// Whether it has an environment of that name.
    #[must_use]
    pub fn has_environment(&self, name: &EnvironmentName) -> bool {
        self.environments().contains(name)
    }
}

/// What can be asked of a project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectCommand {
    /// Create the project, with its `production` environment.
    CreateProject {
        /// The new project's id.
        id: ProjectId,
        /// The team it belongs to.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// The names of the team's other projects (outside fact).
        names_in_use: BTreeSet<Name>,
    },
    /// Rename it.
    RenameProject {
        /// The new name.
        name: Name,
        /// The names of the team's other projects (outside fact).
        names_in_use: BTreeSet<Name>,
    },
    /// Add an environment.
    CreateEnvironment {
        /// Its name.
        name: EnvironmentName,
    },
    /// Rename an environment that holds no application.
    RenameEnvironment {
        /// The current name.
        from: EnvironmentName,
        /// The new name.
        to: EnvironmentName,
        /// How many applications live in `from` (outside fact).
        applications_in_it: usize,
    },
    /// Remove an environment that holds no application.
    RemoveEnvironment {
        /// Its name.
        name: EnvironmentName,
        /// How many applications live in it (outside fact).
        applications_in_it: usize,
    },
    /// Archive the project once it has no active applications.
    ArchiveProject {
        /// How many of its applications are not archived (outside fact).
        active_applications: usize,
    },
}

/// What happened to a project.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ProjectEvent {
    /// The project was created.
    ProjectCreated {
        /// Its id.
        project_id: ProjectId,
        /// Its team.
        team_id: TeamId,
        /// Its name.
        name: Name,
        /// The environments it starts with.
        environments: Vec<EnvironmentName>,
    },
    /// The project was renamed.
    ProjectRenamed {
        /// The new name.
        name: Name,
    },
    /// An environment was added.
    EnvironmentCreated {
        /// Its name.
        name: EnvironmentName,
    },
    /// An environment was renamed.
    EnvironmentRenamed {
        /// The old name.
        from: EnvironmentName,
        /// The new name.
        to: EnvironmentName,
    },
    /// An environment was removed.
    EnvironmentRemoved {
        /// Its name.
        name: EnvironmentName,
    },
    /// The project was archived.
    ProjectArchived {},
}

impl DomainEvent for ProjectEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ProjectCreated { .. } => "ProjectCreated",
            Self::ProjectRenamed { .. } => "ProjectRenamed",
            Self::EnvironmentCreated { .. } => "EnvironmentCreated",
            Self::EnvironmentRenamed { .. } => "EnvironmentRenamed",
            Self::EnvironmentRemoved { .. } => "EnvironmentRemoved",
            Self::ProjectArchived { .. } => "ProjectArchived",
        }
    }
}

/// The rule a project command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProjectError {
    /// Creating a project that exists.
    #[error("the project already exists")]
    ProjectAlreadyExists,
    /// Anything but creation on a project that does not exist.
    #[error("the project does not exist")]
    ProjectNotFound,
    /// Another project of the team has that name.
    #[error("another project of the team is already named so")]
    ProjectNameTaken,
    /// An archived project changes no more.
    #[error("the project is archived")]
    ProjectArchived,
    /// Archiving a project whose applications still run.
    #[error("the project still has active applications")]
    ProjectHasApplications,
    /// Creating (or renaming to) an environment name the project already has.
    #[error("the project already has an environment of that name")]
    EnvironmentAlreadyExists,
    /// Naming an environment the project does not have.
    #[error("the project has no environment of that name")]
    EnvironmentNotFound,
    /// Renaming or removing an environment that applications live in.
    #[error("the environment still has applications")]
    EnvironmentNotEmpty,
    /// A project keeps at least one environment, or nothing could be deployed in it.
    #[error("a project must keep at least one environment")]
    LastEnvironment,
}

impl crate::Rejection for ProjectError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::ProjectNotFound)
    }
}

impl Aggregate for Project {
    const KIND: &'static str = ProjectId::KIND;
    type Command = ProjectCommand;
    type Event = ProjectEvent;
    type Error = ProjectError;

    fn decide(&self, command: &ProjectCommand) -> Result<Vec<ProjectEvent>, ProjectError> {
        let project = match (self, command) {
            (Self::New, ProjectCommand::CreateProject { id, team_id, name, names_in_use }) => {
                if names_in_use.contains(name) {
                    return Err(ProjectError::ProjectNameTaken);
                }
                return Ok(vec![ProjectEvent::ProjectCreated {
                    project_id: *id,
                    team_id: *team_id,
                    name: name.clone(),
                    environments: vec![EnvironmentName::production()],
                }]);
            }
            (_, ProjectCommand::CreateProject { .. }) => {
                return Err(ProjectError::ProjectAlreadyExists);
            }
            (Self::New, _) => return Err(ProjectError::ProjectNotFound),
            // Archiving twice changes nothing.
            (Self::Archived(_), ProjectCommand::ArchiveProject { .. }) => return Ok(vec![]),
            (Self::Archived(_), _) => return Err(ProjectError::ProjectArchived),
            (Self::Active(project), _) => project,
        };
        let has = |name: &EnvironmentName| project.environments.contains(name);
        match command {
            ProjectCommand::CreateProject { .. } => unreachable!("handled above"),
            ProjectCommand::RenameProject { name, .. } if *name == project.name => Ok(vec![]),
            ProjectCommand::RenameProject { name, names_in_use } if names_in_use.contains(name) => {
                Err(ProjectError::ProjectNameTaken)
            }
            ProjectCommand::RenameProject { name, .. } => Ok(vec![ProjectEvent::ProjectRenamed { name: name.clone() }]),
            ProjectCommand::CreateEnvironment { name } if has(name) => Err(ProjectError::EnvironmentAlreadyExists),
            ProjectCommand::CreateEnvironment { name } => {
                Ok(vec![ProjectEvent::EnvironmentCreated { name: name.clone() }])
            }
            ProjectCommand::RenameEnvironment { from, .. } if !has(from) => Err(ProjectError::EnvironmentNotFound),
            ProjectCommand::RenameEnvironment { from, to, .. } if from == to => Ok(vec![]),
            ProjectCommand::RenameEnvironment { to, .. } if has(to) => Err(ProjectError::EnvironmentAlreadyExists),
            ProjectCommand::RenameEnvironment { applications_in_it, .. } if *applications_in_it > 0 => {
                Err(ProjectError::EnvironmentNotEmpty)
            }
            ProjectCommand::RenameEnvironment { from, to, .. } => {
                Ok(vec![ProjectEvent::EnvironmentRenamed { from: from.clone(), to: to.clone() }])
            }
            ProjectCommand::RemoveEnvironment { name, .. } if !has(name) => Err(ProjectError::EnvironmentNotFound),
            ProjectCommand::RemoveEnvironment { applications_in_it, .. } if *applications_in_it > 0 => {
                Err(ProjectError::EnvironmentNotEmpty)
            }
            ProjectCommand::RemoveEnvironment { .. } if project.environments.len() == 1 => {
                Err(ProjectError::LastEnvironment)
            }
            ProjectCommand::RemoveEnvironment { name, .. } => {
                Ok(vec![ProjectEvent::EnvironmentRemoved { name: name.clone() }])
            }
            ProjectCommand::ArchiveProject { active_applications } if *active_applications > 0 => {
                Err(ProjectError::ProjectHasApplications)
            }
            ProjectCommand::ArchiveProject { .. } => Ok(vec![ProjectEvent::ProjectArchived {}]),
        }
    }

    fn evolve(self, event: &ProjectEvent) -> Self {
        match (self, event) {
            (Self::New, ProjectEvent::ProjectCreated { project_id, team_id, name, environments }) => {
                Self::Active(ProjectDetails {
                    id: *project_id,
                    team_id: *team_id,
                    name: name.clone(),
                    environments: environments.clone(),
                })
            }
            (Self::Active(mut project), ProjectEvent::ProjectRenamed { name }) => {
                project.name = name.clone();
                Self::Active(project)
            }
            (Self::Active(mut project), ProjectEvent::EnvironmentCreated { name }) => {
                if !project.environments.contains(name) {
                    project.environments.push(name.clone());
                }
                Self::Active(project)
            }
            (Self::Active(mut project), ProjectEvent::EnvironmentRenamed { from, to }) => {
                for environment in &mut project.environments {
                    if environment == from {
                        *environment = to.clone();
                    }
                }
                Self::Active(project)
            }
            (Self::Active(mut project), ProjectEvent::EnvironmentRemoved { name }) => {
                project.environments.retain(|e| e != name);
                Self::Active(project)
            }
            (Self::Active(project), ProjectEvent::ProjectArchived {}) => Self::Archived(project),
            // Events that cannot apply to this state change nothing: evolve is total.
            (state, _) => state,
        }
    }
}

impl Describe for Project {
    fn describe(&self) -> BTreeMap<String, FieldValue> {
        let (project, status) = match self {
            Self::New => return BTreeMap::new(),
            Self::Active(project) => (project, "active"),
            Self::Archived(project) => (project, "archived"),
        };
        let environments = project.environments.iter().map(|e| serde_json::Value::String(e.to_string())).collect();
        BTreeMap::from([
            ("name".to_owned(), FieldValue::Plain(project.name.as_str().into())),
            ("environments".to_owned(), FieldValue::Plain(serde_json::Value::Array(environments))),
            ("status".to_owned(), FieldValue::Plain(status.into())),
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

    fn env(s: &str) -> EnvironmentName {
        EnvironmentName::parse(s).expect("valid environment name")
    }

    /// Given these events, when this command, then these events or this error.
    fn given(events: &[ProjectEvent]) -> Project {
        Project::fold(events)
    }

    fn created() -> Vec<ProjectEvent> {
        vec![ProjectEvent::ProjectCreated {
            project_id: ProjectId::new(),
            team_id: TeamId::new(),
            name: name("Shop"),
            environments: vec![EnvironmentName::production()],
        }]
    }

    fn with_staging() -> Vec<ProjectEvent> {
        let mut history = created();
        history.push(ProjectEvent::EnvironmentCreated { name: env("staging") });
        history
    }

    fn archived() -> Vec<ProjectEvent> {
        let mut history = created();
        history.push(ProjectEvent::ProjectArchived {});
        history
    }

    #[test]
    fn a_project_starts_with_a_production_environment() {
        let (id, team_id) = (ProjectId::new(), TeamId::new());
        let events = given(&[]).decide(&ProjectCommand::CreateProject {
            id,
            team_id,
            name: name("Shop"),
            names_in_use: BTreeSet::new(),
        });
        let expected = vec![ProjectEvent::ProjectCreated {
            project_id: id,
            team_id,
            name: name("Shop"),
            environments: vec![env("production")],
        }];
        assert_eq!(events, Ok(expected.clone()));
        let project = given(&expected);
        assert!(project.has_environment(&env("production")));
        assert_eq!(project.environments(), [env("production")]);
    }

    #[test]
    fn a_project_is_created_once() {
        assert_eq!(
            given(&created()).decide(&ProjectCommand::CreateProject {
                id: ProjectId::new(),
                team_id: TeamId::new(),
                name: name("Other"),
                names_in_use: BTreeSet::new(),
            }),
            Err(ProjectError::ProjectAlreadyExists)
        );
    }

    #[test]
    fn creating_with_a_taken_name_is_rejected() {
        assert_eq!(
            given(&[]).decide(&ProjectCommand::CreateProject {
                id: ProjectId::new(),
                team_id: TeamId::new(),
                name: name("Shop"),
                names_in_use: BTreeSet::from([name("Shop")]),
            }),
            Err(ProjectError::ProjectNameTaken)
        );
    }

    #[test]
    fn a_missing_project_rejects_everything_but_creation() {
        for command in [
            ProjectCommand::RenameProject { name: name("x"), names_in_use: BTreeSet::new() },
            ProjectCommand::CreateEnvironment { name: env("dev") },
            ProjectCommand::ArchiveProject { active_applications: 0 },
        ] {
            assert_eq!(given(&[]).decide(&command), Err(ProjectError::ProjectNotFound));
        }
    }

    #[test]
    fn renaming_to_a_taken_name_is_rejected() {
        assert_eq!(
            given(&created()).decide(&ProjectCommand::RenameProject {
                name: name("Blog"),
                names_in_use: BTreeSet::from([name("Blog")]),
            }),
            Err(ProjectError::ProjectNameTaken)
        );
    }

    #[test]
    fn renaming_records_the_new_name_and_the_same_name_records_nothing() {
        let project = given(&created());
        assert_eq!(
            project.decide(&ProjectCommand::RenameProject {
                name: name("Store"),
                names_in_use: BTreeSet::from([name("Blog")]),
            }),
            Ok(vec![ProjectEvent::ProjectRenamed { name: name("Store") }])
        );
        assert_eq!(
            project.decide(&ProjectCommand::RenameProject { name: name("Shop"), names_in_use: BTreeSet::new() }),
            Ok(vec![])
        );
    }

    #[test]
    fn an_environment_name_is_used_once_per_project() {
        let project = given(&with_staging());
        assert_eq!(
            project.decide(&ProjectCommand::CreateEnvironment { name: env("staging") }),
            Err(ProjectError::EnvironmentAlreadyExists)
        );
        assert_eq!(
            project.decide(&ProjectCommand::CreateEnvironment { name: env("dev") }),
            Ok(vec![ProjectEvent::EnvironmentCreated { name: env("dev") }])
        );
        assert_eq!(
            project.decide(&ProjectCommand::RenameEnvironment {
                from: env("staging"),
                to: env("production"),
                applications_in_it: 0,
            }),
            Err(ProjectError::EnvironmentAlreadyExists)
        );
    }

    #[test]
    fn an_empty_environment_can_be_renamed_in_place() {
        let mut history = with_staging();
        let project = given(&history);
        let renamed = project.decide(&ProjectCommand::RenameEnvironment {
            from: env("production"),
            to: env("live"),
            applications_in_it: 0,
        });
        assert_eq!(renamed, Ok(vec![ProjectEvent::EnvironmentRenamed { from: env("production"), to: env("live") }]));
        history.extend(renamed.unwrap_or_default());
        assert_eq!(given(&history).environments(), [env("live"), env("staging")]);
    }

    #[test]
    fn an_environment_with_applications_is_neither_renamed_nor_removed() {
        let project = given(&with_staging());
        assert_eq!(
            project.decide(&ProjectCommand::RenameEnvironment {
                from: env("staging"),
                to: env("qa"),
                applications_in_it: 2,
            }),
            Err(ProjectError::EnvironmentNotEmpty)
        );
        assert_eq!(
            project.decide(&ProjectCommand::RemoveEnvironment { name: env("staging"), applications_in_it: 1 }),
            Err(ProjectError::EnvironmentNotEmpty)
        );
    }

    #[test]
    fn renaming_an_environment_to_its_own_name_records_nothing() {
        assert_eq!(
            given(&with_staging()).decide(&ProjectCommand::RenameEnvironment {
                from: env("staging"),
                to: env("staging"),
                applications_in_it: 3,
            }),
            Ok(vec![])
        );
    }

    #[test]
    fn a_missing_environment_cannot_be_renamed_or_removed() {
        let project = given(&created());
        assert_eq!(
            project.decide(&ProjectCommand::RenameEnvironment {
                from: env("staging"),
                to: env("qa"),
                applications_in_it: 0,
            }),
            Err(ProjectError::EnvironmentNotFound)
        );
        assert_eq!(
            project.decide(&ProjectCommand::RemoveEnvironment { name: env("staging"), applications_in_it: 0 }),
            Err(ProjectError::EnvironmentNotFound)
        );
    }

    #[test]
    fn the_last_environment_cannot_be_removed() {
        assert_eq!(
            given(&created())
                .decide(&ProjectCommand::RemoveEnvironment { name: env("production"), applications_in_it: 0 }),
            Err(ProjectError::LastEnvironment)
        );
    }

    #[test]
    fn an_empty_environment_is_removed() {
        let mut history = with_staging();
        let removed = given(&history)
            .decide(&ProjectCommand::RemoveEnvironment { name: env("production"), applications_in_it: 0 });
        assert_eq!(removed, Ok(vec![ProjectEvent::EnvironmentRemoved { name: env("production") }]));
        history.extend(removed.unwrap_or_default());
        let project = given(&history);
        assert!(!project.has_environment(&env("production")));
        assert_eq!(project.environments(), [env("staging")]);
    }

    #[test]
    fn a_project_with_active_applications_is_not_archived() {
        assert_eq!(
            given(&created()).decide(&ProjectCommand::ArchiveProject { active_applications: 1 }),
            Err(ProjectError::ProjectHasApplications)
        );
        assert_eq!(
            given(&created()).decide(&ProjectCommand::ArchiveProject { active_applications: 0 }),
            Ok(vec![ProjectEvent::ProjectArchived {}])
        );
    }

    #[test]
    fn an_archived_project_rejects_changes() {
        let project = given(&archived());
        for command in [
            ProjectCommand::RenameProject { name: name("x"), names_in_use: BTreeSet::new() },
            ProjectCommand::CreateEnvironment { name: env("dev") },
            ProjectCommand::RenameEnvironment { from: env("production"), to: env("live"), applications_in_it: 0 },
            ProjectCommand::RemoveEnvironment { name: env("production"), applications_in_it: 0 },
        ] {
            assert_eq!(project.decide(&command), Err(ProjectError::ProjectArchived));
        }
    }

    #[test]
    fn archiving_twice_records_nothing() {
        assert_eq!(given(&archived()).decide(&ProjectCommand::ArchiveProject { active_applications: 0 }), Ok(vec![]));
    }

    #[test]
    fn a_project_describes_its_name_environments_and_status() {
        assert!(given(&[]).describe().is_empty());
        let described = given(&with_staging()).describe();
        assert_eq!(described["name"], FieldValue::Plain(json!("Shop")));
        assert_eq!(described["environments"], FieldValue::Plain(json!(["production", "staging"])));
        assert_eq!(described["status"], FieldValue::Plain(json!("active")));
        assert_eq!(given(&archived()).describe()["status"], FieldValue::Plain(json!("archived")));
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let mut events = created();
        events.extend([
            ProjectEvent::ProjectRenamed { name: name("x") },
            ProjectEvent::EnvironmentCreated { name: env("dev") },
            ProjectEvent::EnvironmentRenamed { from: env("dev"), to: env("qa") },
            ProjectEvent::EnvironmentRemoved { name: env("qa") },
            ProjectEvent::ProjectArchived {},
        ]);
        for event in events {
            let (kind, payload) = event.encode().expect("encodes");
            assert_eq!(kind, event.event_type());
            assert_eq!(ProjectEvent::decode(kind, 1, payload).expect("decodes"), event);
            let (kind, text) = event.encode_json().expect("encodes");
            assert_eq!(ProjectEvent::decode_json(kind, 1, text.get()).expect("decodes"), event);
        }
    }
}
