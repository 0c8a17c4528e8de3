//! PostgreSQL: everything the sidecar says to the database.
//!
//! - `schema.rs`: the shapes tables must have and how a found table differs (pure);
//! - `sql.rs`: the SQL text, every identifier quoted, every value bound (pure);
//! - `numeric.rs`: exact decimals in `numeric`'s binary wire form (pure);
//! - `rows.rs`: a flush's rows, sorted, merged and bound a chunk at a time (pure);
//! - `admitted.rs`: `logtally_admitted_keys`, the keys each node admitted (`max_keys`);
//! - `retention.rs`: `retention`'s batched deletes under a try-lock;
//! - `checkpoint.rs`: checkpoint entries and the flush's compare-and-swap (pure);
//! - `error.rs`: [`StoreError`] and which errors are transient;
//! - `citus.rs`: Citus' `distribute_by`: distributed rule tables, the coordinator-local
//!   checkpoint, what `check` reports (SQL text and verdicts pure, plus the connection steps);
//! - `tls.rs`: the rustls connector for `sslmode` (require, verify-ca, verify-full);
//! - `store.rs`: the connection ([`Store`]) and `logtally check`'s inspection ([`check`]).
//!
//! Exactly once rests on one rule: a flush moves the checkpoint in the same transaction as
//! the aggregates, and only from the positions this process committed last.

mod admitted;
mod checkpoint;
mod citus;
mod error;
mod migrate;
mod numeric;
mod retention;
mod rows;
mod schema;
mod sql;
mod store;
#[cfg(test)]
mod tests;
mod tls;

pub use admitted::{admitted_table, needs_admitted_table};
#[cfg(test)]
pub(crate) use checkpoint::{compare_checkpoint, CheckpointState};
pub use checkpoint::{CheckpointEntry, FlushOutcome};
pub use citus::{Placement, Verdict};
pub use error::{server_message, ErrorClass, FailureLog, StoreError};
pub use numeric::SqlNumeric;
pub use retention::{delete_batch_sql, RetentionPass, RetentionStore, RETENTION_BATCH};
pub use rows::UpsertRows;
pub use schema::{checkpoint_table, rule_table, ShapeDifference, TableMismatch};
pub use sql::{create_sql, QUANTILES_SQL};
pub use store::{check, check_citus, Store, TableState};
pub use tls::TlsError;
