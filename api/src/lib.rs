//! Zpanel's public interface: the axum router with the async-graphql schema (queries over the
//! read models, mutations that send commands, subscriptions), authentication by API token,
//! webhooks, health and metrics.
//!
//! The crate is deliberately empty until the GraphQL API lands; its dependencies already point
//! the way the design allows (domain, commands, projections).
#![forbid(unsafe_code)]
