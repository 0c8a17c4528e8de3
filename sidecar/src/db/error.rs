//! What goes wrong talking to PostgreSQL, and which of it waiting can fix.
//!
//! [`StoreError::is_transient`] is the one classification the daemon acts on: transient
//! errors are retried on a new connection with backoff, the others stop it. Finer
//! classes (authentication, a missing database or role, permissions) belong here.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::schema::{join_mismatches, TableMismatch};

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("connect to PostgreSQL at {target}: no answer within {}s", .after.as_secs())]
    ConnectTimeout { target: String, after: Duration },
    #[error("database_url: {source}")]
    BadUrl {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("existing tables do not match the configuration (fix or drop them): {}", join_mismatches(.0))]
    Shape(Vec<TableMismatch>),
    #[error(
        "checkpoint of node {node}, segment {segment}: expected {expected:?}, database has \
         {found:?}; another sidecar may be running with the same node name"
    )]
    CheckpointConflict {
        node: String,
        segment: String,
        expected: Option<(u64, bool)>,
        found: Option<(u64, bool)>,
    },
    #[error(
        "{columns}: distinct(f) needs PostgreSQL's hll extension, which this database lacks: \
         install the package postgresql-15-hll (the server's major version) and run \
         CREATE EXTENSION hll; in this database"
    )]
    MissingHll {
        /// The `table.column`s that need it, comma-separated.
        columns: String,
    },
    #[error("flush did not finish within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("{context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl StoreError {
    pub(super) fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Db { context, source }
    }

    /// Whether waiting and trying again (on a new connection) may succeed: the connection
    /// broke, the server is starting or stopping, or the transaction lost a race. A table
    /// shape or a checkpoint conflict never heals by itself.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            StoreError::Connect { .. }
            | StoreError::ConnectTimeout { .. }
            | StoreError::Timeout(_) => return true,
            StoreError::BadUrl { .. }
            | StoreError::Shape(_)
            | StoreError::MissingHll { .. }
            | StoreError::CheckpointConflict { .. } => return false,
            StoreError::Db { source, .. } => source,
        };
        let Some(code) = source.code() else {
            // No SQLSTATE: an I/O or protocol error, i.e. the connection is gone.
            return true;
        };
        let class = &code.code()[..2];
        // 08: connection exception; 53: insufficient resources; 57: operator intervention
        // (admin/crash shutdown, cannot connect now); 40: serialization failure, deadlock.
        matches!(class, "08" | "53" | "57" | "40") || *code == SqlState::LOCK_NOT_AVAILABLE
    }
}
