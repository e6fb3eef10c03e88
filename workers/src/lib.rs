//! Zpanel's workers: the Kafka relay and consumers (or in-process delivery from the log cursor
//! in embedded mode), and the workers that touch the world — Docker, SSH, git, the proxy.
//! They report back only by sending commands.
//!
//! The crate is deliberately empty until the worker runtime lands; it may depend on domain and
//! commands only.
#![forbid(unsafe_code)]
