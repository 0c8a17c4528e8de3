//! The connection: [`Store`] runs the SQL of `sql.rs` with the rows of `rows.rs` against
//! PostgreSQL, and [`check`] inspects a database for `logtally check`.
//!
//! A flush is ONE transaction: it locks the node's checkpoint (an advisory lock), checks the
//! checkpoint rows still hold the positions this process committed last
//! (`checkpoint.rs`'s compare-and-swap), upserts every rule's rows additively in chunks of
//! 20,000 and moves the checkpoint, then commits.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use crate::config::{describe, parse_database_url, Config, MetricKind, Rule, TlsMode};

use super::checkpoint::{compare_checkpoint, CheckpointEntry, CheckpointState, FlushOutcome};
use super::citus;
use super::error::is_certificate_error;
use super::migrate::{self, Migration};
use super::rows::{rule_params, UpsertRows, UPSERT_CHUNK};
use super::schema::{
    all_tables, shape_differences, ActualColumn, ActualTable, TableMismatch, TableSpec,
};
use super::sql::{
    checkpoint_delete_finished_sql, checkpoint_load_sql, checkpoint_lock_sql, checkpoint_read_sql,
    checkpoint_upsert_sql, create_sql, install_lock_sql, quote, upsert_sql, QUANTILES_SQL,
};
use super::{server_message, tls, StoreError};

/// How long a connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn connect_client(url: &str) -> Result<(Client, JoinHandle<()>), StoreError> {
    let settings = parse_database_url(url).map_err(|error| StoreError::BadUrl { error })?;
    let target = describe(&settings);
    let mut cfg = settings.pg.clone();
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    cfg.application_name("logtally");
    let failed = |error| StoreError::Connect {
        target: target.clone(),
        error,
    };
    let connect = async {
        Ok::<_, StoreError>(match settings.tls {
            TlsMode::Disable => {
                let (client, connection) = cfg.connect(NoTls).await.map_err(failed)?;
                (client, spawn_connection(connection))
            }
            _ => {
                let tls = tls::connector(&settings)?;
                match cfg.connect(tls).await {
                    Ok((client, connection)) => (client, spawn_connection(connection)),
                    // `prefer`, as libpq: a handshake that fails on the server's certificate
                    // falls back to an unencrypted connection. Citus' own self-signed
                    // certificate (made by CREATE EXTENSION citus) is X.509 v1, which rustls
                    // cannot parse at all.
                    Err(e) if settings.tls == TlsMode::Prefer && is_certificate_error(&e) => {
                        tracing::warn!(target = %target, error = %server_message(&e),
                            "sslmode=prefer: the TLS handshake failed on the server's \
                             certificate; connecting without TLS");
                        let (client, connection) = cfg.connect(NoTls).await.map_err(failed)?;
                        (client, spawn_connection(connection))
                    }
                    Err(e) => return Err(failed(e)),
                }
            }
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| StoreError::ConnectTimeout {
            target: target.clone(),
            after: CONNECT_TIMEOUT,
        })?
}

/// Runs a connection's I/O until it ends.
fn spawn_connection(
    connection: impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %server_message(&error), "PostgreSQL connection ended");
        }
    })
}

/// Reads a table's shape, `None` if there is no relation of that name.
async fn read_table(client: &Client, name: &str) -> Result<Option<ActualTable>, StoreError> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&quote(name)],
        )
        .await
        .map_err(StoreError::db("look up table"))?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let kind: i8 = row.get(1);
    let columns = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod), attnotnull \
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(StoreError::db("read table columns"))?
        .into_iter()
        .map(|r| ActualColumn {
            name: r.get(0),
            sql_type: r.get(1),
            not_null: r.get(2),
        })
        .collect();
    let primary_key = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(StoreError::db("read primary key"))?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(ActualTable {
        kind: kind as u8 as char,
        columns,
        primary_key,
    }))
}

/// How `logtally check` found a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// Present with the right shape.
    Ok,
    /// Absent: `run` will create it.
    Missing,
    /// Lacks columns its rule gained; with `auto_migrate`, `run` runs these statements.
    Migrate(Vec<String>),
}

/// `logtally check`'s database part: reachable, and every existing table has the right
/// shape. Creates nothing.
pub async fn check(config: &Config) -> Result<Vec<(String, TableState)>, StoreError> {
    let (client, task) = connect_client(&config.database_url).await?;
    let states = inspect(&client, config, config.auto_migrate).await;
    drop(client);
    let _ = task.await;
    Ok(states?
        .into_iter()
        .map(|(spec, state)| (spec.name, state))
        .collect())
}

/// `logtally check`'s Citus part: per table how Citus holds it (empty without Citus) and
/// the warnings (`distribute_by` without Citus among them); an error for a worker's URL or
/// a table distributed on a column outside its rule's key.
pub async fn check_citus(
    config: &Config,
) -> Result<(Vec<(String, String)>, Vec<String>), StoreError> {
    let (client, task) = connect_client(&config.database_url).await?;
    let found = match citus::prepare(&client).await {
        Ok(node) => citus::report(&client, config, node.as_ref()).await,
        Err(e) => Err(e),
    };
    drop(client);
    let _ = task.await;
    found
}

/// The `table.column`s of `distinct(f)` metrics, comma-separated (empty: none).
fn hll_columns(config: &Config) -> String {
    let cols: Vec<String> = config
        .rules
        .iter()
        .flat_map(|r| {
            r.metrics
                .iter()
                .filter(|m| matches!(m.kind, MetricKind::Distinct(_)))
                .map(move |m| format!("{}.{}", r.table, m.column))
        })
        .collect();
    cols.join(", ")
}

/// Refuses a configuration with `distinct(f)` metrics when the database lacks `hll`.
async fn require_hll(client: &Client, config: &Config) -> Result<(), StoreError> {
    let columns = hll_columns(config);
    if columns.is_empty() {
        return Ok(());
    }
    let found = client
        .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'hll'", &[])
        .await
        .map_err(StoreError::db("look for the hll extension"))?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::MissingHll { columns }),
    }
}

/// Installs the `logtally_quantiles` type and functions when a rule has `quantiles(f)`: one
/// transaction under an advisory lock, so sidecars starting together do not race on the
/// catalog (`CREATE OR REPLACE FUNCTION` of two sessions at once fails).
async fn install_quantiles(client: &mut Client, config: &Config) -> Result<(), StoreError> {
    let needed = config.rules.iter().any(|r| {
        r.metrics
            .iter()
            .any(|m| matches!(m.kind, MetricKind::Quantiles { .. }))
    });
    if !needed {
        return Ok(());
    }
    let tx = client
        .transaction()
        .await
        .map_err(StoreError::db("install quantiles"))?;
    tx.batch_execute(&format!("{};\n{QUANTILES_SQL}", install_lock_sql()))
        .await
        .map_err(StoreError::db("install quantiles"))?;
    tx.commit()
        .await
        .map_err(StoreError::db("install quantiles"))
}

/// Every table's state; an error naming every difference if any existing table has the
/// wrong shape. A table that only lacks columns the rules gained is
/// [`TableState::Migrate`] when `migrate` (`auto_migrate`) allows, else the error
/// ([`StoreError::Migratable`]) names the statements that would fix it.
async fn inspect(
    client: &Client,
    config: &Config,
    migrate: bool,
) -> Result<Vec<(TableSpec, TableState)>, StoreError> {
    require_hll(client, config).await?;
    let mut states = Vec::new();
    let mut mismatches = Vec::new();
    let mut statements = Some(Vec::new());
    for spec in all_tables(config) {
        match read_table(client, &spec.name).await? {
            None => states.push((spec, TableState::Missing)),
            Some(actual) => {
                let differences = shape_differences(&spec, &actual);
                if differences.is_empty() {
                    states.push((spec, TableState::Ok));
                    continue;
                }
                match migrate::plan(&spec, &differences) {
                    Migration::Add(add) if migrate => {
                        states.push((spec, TableState::Migrate(add)));
                        continue;
                    }
                    Migration::Add(add) => {
                        if let Some(s) = statements.as_mut() {
                            s.extend(add)
                        }
                    }
                    Migration::Refused(_) => statements = None,
                }
                mismatches.push(TableMismatch {
                    table: spec.name.clone(),
                    differences,
                });
            }
        }
    }
    match statements {
        _ if mismatches.is_empty() => Ok(states),
        Some(statements) => Err(StoreError::Migratable {
            mismatches,
            statements,
        }),
        None => Err(StoreError::Shape(mismatches)),
    }
}

/// A connection with the tables in place and the statements prepared.
#[derive(Debug)]
pub struct Store {
    client: Client,
    task: JoinHandle<()>,
    node: String,
    rules: Vec<Rule>,
    upserts: Vec<Statement>,
    checkpoint_upsert: Statement,
    /// Some rule has `max_keys` (then `logtally_admitted_keys` exists).
    admitted_table: bool,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Store {
    /// Connects, creates missing tables, refuses tables of the wrong shape, prepares the
    /// statements.
    pub async fn connect(config: &Config) -> Result<Store, StoreError> {
        let (mut client, task) = connect_client(&config.database_url).await?;
        // Before the tables: a `quantiles` column needs its type (`inspect` checks hll).
        install_quantiles(&mut client, config).await?;
        // Check every table before creating any, so a refusal leaves the database untouched.
        let mut states = inspect(&client, config, config.auto_migrate).await?;
        let statements: Vec<String> = states
            .iter()
            .flat_map(|(_, state)| match state {
                TableState::Migrate(add) => add.clone(),
                _ => Vec::new(),
            })
            .collect();
        if !statements.is_empty() {
            migrate::apply(&mut client, &statements).await?;
            states = inspect(&client, config, false).await?;
        }
        let missing: Vec<TableSpec> = states
            .into_iter()
            .filter(|(_, state)| *state == TableState::Missing)
            .map(|(spec, _)| spec)
            .collect();
        // Citus: the tables in their distributed form, in one transaction (citus.rs).
        let citus = citus::prepare(&client).await?;
        if citus.is_some() {
            citus::create_tables(&mut client, config, &missing).await?;
        }
        for spec in missing.iter().filter(|_| citus.is_none()) {
            match client.batch_execute(&create_sql(spec)).await {
                Ok(()) => tracing::info!(table = %spec.name, "created table"),
                // Another sidecar created it at the same moment: fine, it is checked below.
                // PostgreSQL reports that race as any of these, depending on which catalog
                // row (the table's, its row type's, its index's) collided first.
                Err(e)
                    if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                        || e.code() == Some(&SqlState::DUPLICATE_TABLE)
                        || e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                Err(error) => {
                    return Err(StoreError::Db {
                        context: "create table",
                        error,
                    })
                }
            }
        }
        if !missing.is_empty() {
            inspect(&client, config, false).await?;
        }
        let (placements, warnings) = citus::report(&client, config, citus.as_ref()).await?;
        for (table, placement) in placements {
            tracing::info!(table = %table, placement = %placement, "Citus placement");
        }
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        let mut upserts = Vec::with_capacity(config.rules.len());
        for rule in &config.rules {
            upserts.push(
                client
                    .prepare(&upsert_sql(rule))
                    .await
                    .map_err(StoreError::db("prepare upsert"))?,
            );
        }
        let checkpoint_upsert = client
            .prepare(&checkpoint_upsert_sql())
            .await
            .map_err(StoreError::db("prepare checkpoint upsert"))?;
        Ok(Store {
            client,
            task,
            node: config.node.clone(),
            rules: config.rules.clone(),
            upserts,
            checkpoint_upsert,
            admitted_table: super::admitted::needs_admitted_table(config),
        })
    }

    /// Whether the connection is gone (reconnect before the next flush).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// A round trip, proving the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .simple_query("SELECT 1")
            .await
            .map_err(StoreError::db("ping"))?;
        Ok(())
    }

    /// This node's checkpoint: the truth about what has been counted.
    ///
    /// Read under the node's flush lock: a predecessor killed while its COMMIT was on the
    /// way leaves a backend that still finishes that transaction, and the position it
    /// commits must be the one read here (else the first flush meets a conflict).
    pub async fn load_checkpoint(&mut self) -> Result<Vec<CheckpointEntry>, StoreError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(StoreError::db("load checkpoint"))?;
        tx.execute(&checkpoint_lock_sql(), &[&self.node])
            .await
            .map_err(StoreError::db("lock checkpoint"))?;
        let rows = tx
            .query(&checkpoint_load_sql(), &[&self.node])
            .await
            .map_err(StoreError::db("load checkpoint"))?;
        // Nothing was written: end it with ROLLBACK (which also lets the lock go).
        tx.rollback()
            .await
            .map_err(StoreError::db("load checkpoint"))?;
        Ok(rows
            .into_iter()
            .map(|r| CheckpointEntry {
                segment: r.get(0),
                offset: r.get::<_, i64>(1) as u64,
                finished: r.get(2),
            })
            .collect())
    }

    /// The keys this node admitted under `max_keys`, per rule (index into the rules) as
    /// `(bucket ms, hashes)`; rows of tables no rule has are left alone.
    pub async fn load_admitted(&self) -> Result<Vec<(usize, i64, Vec<u64>)>, StoreError> {
        if !self.admitted_table {
            return Ok(Vec::new());
        }
        let rows = super::admitted::load(&self.client, &self.node).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(table, bucket, hashes)| {
                let i = self.rules.iter().position(|r| r.table == table)?;
                Some((i, bucket, hashes))
            })
            .collect())
    }

    /// Commits one flush: every rule's rows and the new `positions`, in one transaction.
    ///
    /// `previous` is what this process believes the checkpoint holds (the last commit, or the
    /// checkpoint loaded at start). Inside the transaction the checkpoint rows of `positions`
    /// must equal it; if they equal `positions` instead, an earlier attempt landed and
    /// nothing is written ([`FlushOutcome::AlreadyCommitted`]); anything else is a
    /// [`StoreError::CheckpointConflict`].
    pub async fn flush(
        &mut self,
        rules: &[impl UpsertRows],
        positions: &[CheckpointEntry],
        previous: &HashMap<String, CheckpointEntry>,
    ) -> Result<FlushOutcome, StoreError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(StoreError::db("begin"))?;
        if !positions.is_empty() {
            tx.execute(&checkpoint_lock_sql(), &[&self.node])
                .await
                .map_err(StoreError::db("lock checkpoint"))?;
            let names: Vec<&str> = positions.iter().map(|p| p.segment.as_str()).collect();
            let found: HashMap<String, (u64, bool)> = tx
                .query(&checkpoint_read_sql(), &[&self.node, &names])
                .await
                .map_err(StoreError::db("read checkpoint"))?
                .into_iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        (r.get::<_, i64>(1) as u64, r.get::<_, bool>(2)),
                    )
                })
                .collect();
            match compare_checkpoint(&self.node, positions, previous, &found)? {
                CheckpointState::AsExpected => {}
                CheckpointState::AlreadyThere => {
                    tx.rollback().await.map_err(StoreError::db("rollback"))?;
                    return Ok(FlushOutcome::AlreadyCommitted);
                }
            }
        }
        for rule_rows in rules {
            if let (Some(delta), Some(rule)) =
                (rule_rows.admitted(), self.rules.get(rule_rows.rule()))
            {
                super::admitted::write(&tx, &self.node, &rule.table, delta).await?;
            }
            if rule_rows.row_count() == 0 {
                continue;
            }
            let Some(rule) = self.rules.get(rule_rows.rule()) else {
                continue;
            };
            for chunk in rule_rows.sorted_chunks(rule, UPSERT_CHUNK) {
                let params = rule_params(rule, &chunk);
                tx.execute_raw(
                    &self.upserts[rule_rows.rule()],
                    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)),
                )
                .await
                .map_err(StoreError::db("upsert aggregates"))?;
            }
        }
        if !positions.is_empty() {
            let names: Vec<&str> = positions.iter().map(|p| p.segment.as_str()).collect();
            let offsets: Vec<i64> = positions.iter().map(|p| p.offset as i64).collect();
            let finished: Vec<bool> = positions.iter().map(|p| p.finished).collect();
            tx.execute(
                &self.checkpoint_upsert,
                &[&self.node, &names, &offsets, &finished],
            )
            .await
            .map_err(StoreError::db("upsert checkpoint"))?;
        }
        tx.commit().await.map_err(StoreError::db("commit"))?;
        Ok(FlushOutcome::Committed)
    }

    /// Deletes checkpoint rows of finished segments whose files are gone (a gone file can
    /// never be read again, so its position no longer matters). Returns rows deleted.
    pub async fn delete_finished(&self, segments: &[String]) -> Result<u64, StoreError> {
        if segments.is_empty() {
            return Ok(0);
        }
        self.client
            .execute(&checkpoint_delete_finished_sql(), &[&self.node, &segments])
            .await
            .map_err(StoreError::db("delete finished checkpoints"))
    }
}
