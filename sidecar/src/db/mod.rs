//! PostgreSQL: everything the sidecar says to the database.
//!
//! - `schema.rs`: the shapes tables must have and how a found table differs (pure);
//! - `sql.rs`: the SQL text, every identifier quoted, every value bound (pure);
//! - `numeric.rs`: exact decimals in `numeric`'s binary wire form (pure);
//! - `rows.rs`: a flush's rows, sorted, merged and bound a chunk at a time (pure);
//! - `checkpoint.rs`: checkpoint entries and the flush's compare-and-swap (pure);
//! - `error.rs`: [`StoreError`] and which errors are transient;
//! - `tls.rs`: the rustls connector for `sslmode` (require, verify-ca, verify-full);
//! - `store.rs`: the connection ([`Store`]) and `logtally check`'s inspection ([`check`]).
//!
//! Exactly once rests on one rule: a flush moves the checkpoint in the same transaction as
//! the aggregates, and only from the positions this process committed last.

mod checkpoint;
mod error;
mod migrate;
mod numeric;
mod rows;
mod schema;
mod sql;
mod store;
#[cfg(test)]
mod tests;
mod tls;

#[cfg(test)]
pub(crate) use checkpoint::{compare_checkpoint, CheckpointState};
pub use checkpoint::{CheckpointEntry, FlushOutcome};
pub use error::{server_message, ErrorClass, FailureLog, StoreError};
pub use numeric::SqlNumeric;
pub use rows::UpsertRows;
pub use schema::{checkpoint_table, rule_table, ShapeDifference, TableMismatch};
pub use sql::{create_sql, QUANTILES_SQL};
pub use store::{check, Store, TableState};
pub use tls::TlsError;
