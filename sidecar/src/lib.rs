//! `logtally`, the sidecar: tails the spool, aggregates, commits exactly once to PostgreSQL.
//!
//! The library holds everything; `main.rs` only parses arguments and calls in. Pure cores
//! ([`config`] parsing, [`aggregate`]) are apart from the I/O shells ([`tail`], the store,
//! the daemon), so tests and benchmarks use them directly.

pub mod admin;
pub mod aggregate;
pub mod binlog;
pub mod config;
pub mod daemon;
pub mod dump;
pub mod metrics;
pub mod status;
pub mod store;
pub mod tail;
