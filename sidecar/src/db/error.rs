//! What goes wrong talking to PostgreSQL, and which of it waiting can fix.
//!
//! Every message carries the server's own words (`password authentication failed for user
//! "x"`, `database "y" does not exist`) or, without a server answer, the I/O cause
//! (`Connection refused`): tokio-postgres' own `Display` says only `db error`.
//!
//! [`StoreError::class`] is the classification the daemon acts on:
//! - [`ErrorClass::Transient`]: the connection broke, the server is starting or stopping,
//!   a transaction lost a race — retried quietly (a warning per attempt);
//! - [`ErrorClass::NeedsOperator`]: authentication, a missing database or role, a permission
//!   denied, a server certificate the roots do not vouch for — retrying alone cannot fix it, but an operator can without restarting logtally:
//!   retried with the same backoff, logged at error level once per distinct message;
//! - [`ErrorClass::Fatal`]: a bad `database_url`, tables of the wrong shape, a checkpoint
//!   conflict — the daemon stops.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::error::SqlState;
use tracing::{debug, error, info, warn};

use super::schema::{join_mismatches, TableMismatch};

/// What went wrong talking to PostgreSQL. Sources are quoted in the message (see
/// [`server_message`]), not chained: the chain of a `tokio_postgres::Error` repeats it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connect to PostgreSQL at {target}: {}", server_message(.error))]
    Connect {
        target: String,
        error: tokio_postgres::Error,
    },
    #[error("connect to PostgreSQL at {target}: no answer within {}s", .after.as_secs())]
    ConnectTimeout { target: String, after: Duration },
    #[error("database_url: {error}")]
    BadUrl { error: crate::config::UrlError },
    /// TLS settings that cannot be used (a root file that cannot be read).
    #[error("database_url: {0}")]
    Tls(#[from] super::TlsError),
    #[error("existing tables do not match the configuration (fix or drop them; auto_migrate only adds the columns of metrics a rule gained): {}", join_mismatches(.0))]
    Shape(Vec<TableMismatch>),
    /// Tables that only lack columns the rules gained: `statements` make them match.
    #[error(
        "existing tables lack columns the configuration adds ({}): set auto_migrate = true \
         to let logtally run, or run yourself: {}",
        join_mismatches(.mismatches), .statements.join("; ")
    )]
    Migratable {
        mismatches: Vec<TableMismatch>,
        statements: Vec<String>,
    },
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
    /// A Citus setup the sidecar cannot rely on (a worker's URL, a table distributed off
    /// its key): see `citus.rs`.
    #[error("citus: {0}")]
    Citus(String),
    #[error("{context}: {}", server_message(.error))]
    Db {
        context: &'static str,
        error: tokio_postgres::Error,
    },
}

/// How the daemon treats a [`StoreError`]. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    Transient,
    NeedsOperator,
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::NeedsOperator => "needs_operator",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// The server's message and SQLSTATE when it answered, else the error and its causes
/// (`error connecting to server: Connection refused (os error 111)`).
pub fn server_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            let _ = write!(s, "; {detail}");
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let part = c.to_string();
        if !s.contains(&part) {
            let _ = write!(s, ": {part}");
        }
        cause = c.source();
    }
    s
}

/// Whether the TLS handshake failed on the server's certificate (rustls' verdict, carried
/// in the I/O error tokio-rustls returns).
pub(super) fn is_certificate_error(e: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let rustls_error = c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(rustls_error, Some(rustls::Error::InvalidCertificate(_))) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// SQLSTATEs an operator fixes: authentication (class 28: bad password, unknown role,
/// no pg_hba entry), a missing database, a permission denied.
fn needs_operator(code: &SqlState) -> bool {
    code.code().starts_with("28")
        || *code == SqlState::INVALID_CATALOG_NAME
        || *code == SqlState::INSUFFICIENT_PRIVILEGE
}

/// SQLSTATEs that waiting fixes: 08 connection exception; 53 insufficient resources;
/// 57 operator intervention (admin/crash shutdown, cannot connect now); 40 serialization
/// failure, deadlock; a lock not available.
fn transient(code: &SqlState) -> bool {
    matches!(&code.code()[..2], "08" | "53" | "57" | "40") || *code == SqlState::LOCK_NOT_AVAILABLE
}

/// Citus reports a worker it lost in the middle of a transaction as an internal error
/// (`XX000 failure on connection marked as essential`, `connection to the remote node … failed`)
/// rather than as a connection exception: the transaction rolled back and the worker comes
/// back, so it is worth retrying like any lost connection.
fn lost_citus_worker(error: &tokio_postgres::Error, code: &SqlState) -> bool {
    *code == SqlState::INTERNAL_ERROR
        && error
            .as_db_error()
            .is_some_and(|d| d.message().contains("connection"))
}

impl StoreError {
    pub(super) fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |error| StoreError::Db { context, error }
    }

    /// See [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        let (error, other) = match self {
            StoreError::ConnectTimeout { .. } | StoreError::Timeout(_) => {
                return ErrorClass::Transient
            }
            StoreError::BadUrl { .. }
            | StoreError::Tls(_)
            | StoreError::Shape(_)
            | StoreError::Migratable { .. }
            | StoreError::MissingHll { .. }
            | StoreError::Citus(_)
            | StoreError::CheckpointConflict { .. } => return ErrorClass::Fatal,
            // A certificate the roots do not vouch for: the operator's to fix.
            StoreError::Connect { error, .. } if is_certificate_error(error) => {
                return ErrorClass::NeedsOperator
            }
            // A refused connection with a code we do not know: still worth retrying.
            StoreError::Connect { error, .. } => (error, ErrorClass::Transient),
            StoreError::Db { error, .. } => (error, ErrorClass::Fatal),
        };
        match error.code() {
            // No SQLSTATE: an I/O, TLS or protocol error, i.e. the connection is gone.
            None => ErrorClass::Transient,
            Some(code) if lost_citus_worker(error, code) => ErrorClass::Transient,
            Some(code) if needs_operator(code) => ErrorClass::NeedsOperator,
            Some(code) if transient(code) => ErrorClass::Transient,
            Some(_) => other,
        }
    }

    /// Whether waiting and trying again (on a new connection) may succeed by itself.
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// Whether the daemon retries (transient or fixable by an operator while it runs).
    pub fn is_retried(&self) -> bool {
        self.class() != ErrorClass::Fatal
    }
}

/// Logs database failures the way an operator wants them: a transient failure as a
/// warning per attempt; one that needs the operator at error level once per distinct
/// message (not every backoff step); a recovery once.
#[derive(Debug, Default)]
pub struct FailureLog {
    /// The message of the last error-level report, until the database answers again.
    reported: Option<String>,
}

impl FailureLog {
    /// Reports a failure of `what` (e.g. "flush failed; the batch is kept and retried").
    pub fn failed(&mut self, err: &StoreError, what: &str) {
        let class = err.class().as_str();
        match err.class() {
            ErrorClass::Transient => warn!(error = %err, class, "{what}"),
            ErrorClass::NeedsOperator => {
                let message = err.to_string();
                if self.reported.as_deref() == Some(message.as_str()) {
                    debug!(error = %err, class, "{what}");
                } else {
                    error!(
                        error = %err,
                        class,
                        "{what}: retrying cannot fix this; fix the database or database_url \
                         (logtally keeps retrying, the spool keeps every event)"
                    );
                    self.reported = Some(message);
                }
            }
            ErrorClass::Fatal => error!(error = %err, class, "{what}"),
        }
    }

    /// The database answered: the next failure is reported afresh.
    pub fn recovered(&mut self) {
        if self.reported.take().is_some() {
            info!("database reachable again");
        }
    }
}
