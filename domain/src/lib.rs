//! Zpanel's domain: the aggregates and the validated value types they are made of.
//!
//! Everything here is pure — no I/O, no async, no clock. A rule that needs an outside fact (the
//! names already taken in a project, the abilities of the token that asks) gets it through the
//! command, put there by the handler that looked it up.
//!
//! - [`values`]: raw strings stop at the boundary; `GitRef`, `DomainName`, `EnvKey`, … parse them.
//! - [`ids`]: one id newtype per aggregate (UUID v7).
//! - [`aggregate`]: the `Aggregate` trait (`decide` + `evolve`) and the event vocabulary.
//! - one module per aggregate: [`team`], [`project`], [`application`], [`deployment`],
//!   [`server`], [`private_key`], [`api_token`].
//! - [`secret`]: the sealed form of a secret value, opaque to the domain.
//! - [`changes`]: field-by-field descriptions of configuration, for audit and diff.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod api_token;
pub mod application;
pub mod changes;
pub mod deployment;
pub mod ids;
pub mod private_key;
pub mod project;
pub mod secret;
pub mod server;
pub mod team;
pub mod values;

pub use aggregate::{Aggregate, DomainEvent, Rejection};
