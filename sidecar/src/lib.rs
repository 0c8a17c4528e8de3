//! `logtally`, the sidecar: tails the spool, aggregates, commits exactly once to PostgreSQL.
//!
//! The library holds everything; `main.rs` only parses arguments and `cli.rs` calls in.
//! Folders say what is pure and what does I/O:
//! - [`config`]: the TOML file into validated values (pure);
//! - [`aggregate`]: records into rows (pure: no I/O, no clock);
//! - [`spool`]: reading the spool folder (the tailer, writer liveness, `logtally dump`);
//! - [`db`]: PostgreSQL (table shapes, SQL, the checkpoint; the connection);
//! - [`run`]: the daemon (the reader thread, the exactly-once commit engine, the loop);
//! - [`http`]: the admin server, metrics and status;
//! - [`binlog`]: the local record of every commit.

pub mod aggregate;
pub mod binlog;
pub mod config;
pub mod db;
pub mod http;
pub mod run;
pub mod spool;

/// The wall clock in ms since the Unix epoch, for timestamps (status, binlog, lag). The
/// pure modules never call it: they take `now` as an argument.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
