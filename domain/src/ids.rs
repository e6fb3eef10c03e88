//! One id newtype per aggregate. Ids are UUID v7: time-ordered, so they index well.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// The stream-kind prefix of this id's aggregate (`application`, `team`, …).
            pub const KIND: &'static str = $prefix;

            /// A fresh, time-ordered id.
            #[must_use]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID.
            #[must_use]
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID inside.
            #[must_use]
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// The id of this aggregate's event stream: `kind-uuid`.
            #[must_use]
            pub fn stream_id(&self) -> String {
                format!("{}-{}", $prefix, self.0)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }
    };
}

id_type!(/// A team: the tenant.
    TeamId, "team");
id_type!(/// A user (a member of teams).
    UserId, "user");
id_type!(/// A project, which groups applications into environments.
    ProjectId, "project");
id_type!(/// An application: a thing Zpanel builds and runs.
    ApplicationId, "application");
id_type!(/// One deployment of an application.
    DeploymentId, "deployment");
id_type!(/// A server Zpanel deploys to.
    ServerId, "server");
id_type!(/// An SSH private key (sealed) with its public half.
    PrivateKeyId, "private_key");
id_type!(/// An API token.
    ApiTokenId, "api_token");
