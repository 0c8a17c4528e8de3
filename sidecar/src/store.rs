//! PostgreSQL: the rule tables' shapes, the additive upserts and the checkpoint.
//!
//! Owns everything the sidecar says to PostgreSQL. A flush is ONE transaction: it locks the
//! node's checkpoint (an advisory lock), checks the checkpoint rows still hold the positions
//! this process committed last (a compare-and-swap: a second sidecar with the same node, or a
//! retried flush whose first COMMIT did land, is caught here instead of counting twice),
//! upserts every rule's rows additively and moves the checkpoint, then commits. Rows are
//! upserted in chunks of 20,000 inside that transaction; a drained batch stays
//! compact ([`UpsertRows`]) and only the chunk being bound exists as [`Row`]s.
//!
//! The SQL text and the shape comparison are plain functions of the configuration, so they are
//! tested without a database; [`Store`] is the thin shell that runs them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use crate::aggregate::{Decimal, DrainedRows, MetricValue, Row, RuleRows};
use crate::config::{Config, MetricKind, Rule};

/// The checkpoint table's name.
pub const CHECKPOINT_TABLE: &str = "logtally_checkpoint";

/// How long a connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A column a table must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    /// The type as PostgreSQL's `format_type` spells it.
    pub sql_type: &'static str,
    pub not_null: bool,
}

/// The shape a table must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: String,
    pub columns: Vec<ColumnSpec>,
    pub primary_key: Vec<String>,
}

/// A column as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualColumn {
    pub name: String,
    pub sql_type: String,
    pub not_null: bool,
}

/// A table as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualTable {
    /// `pg_class.relkind`: `r` a table, `p` a partitioned table, anything else is not a table.
    pub kind: char,
    pub columns: Vec<ActualColumn>,
    pub primary_key: Vec<String>,
}

/// One way an existing table differs from what the configuration needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeDifference {
    NotATable {
        relkind: char,
    },
    MissingColumn {
        column: String,
        expected: String,
    },
    ExtraColumn {
        column: String,
        found: String,
    },
    WrongType {
        column: String,
        expected: String,
        found: String,
    },
    WrongNullability {
        column: String,
        expected_not_null: bool,
    },
    WrongPrimaryKey {
        expected: Vec<String>,
        found: Vec<String>,
    },
}

impl fmt::Display for ShapeDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let null = |not_null: bool| if not_null { "NOT NULL" } else { "nullable" };
        match self {
            ShapeDifference::NotATable { relkind } => {
                write!(f, "it is not a table (pg_class.relkind '{relkind}')")
            }
            ShapeDifference::MissingColumn { column, expected } => {
                write!(f, "column {column} ({expected}) is missing")
            }
            ShapeDifference::ExtraColumn { column, found } => {
                write!(f, "column {column} ({found}) is not in the configuration")
            }
            ShapeDifference::WrongType {
                column,
                expected,
                found,
            } => {
                write!(f, "column {column} is {found}, expected {expected}")
            }
            ShapeDifference::WrongNullability {
                column,
                expected_not_null,
            } => write!(
                f,
                "column {column} is {}, expected {}",
                null(!expected_not_null),
                null(*expected_not_null)
            ),
            ShapeDifference::WrongPrimaryKey { expected, found } if found.is_empty() => {
                write!(f, "no primary key, expected ({})", expected.join(", "))
            }
            ShapeDifference::WrongPrimaryKey { expected, found } => write!(
                f,
                "primary key is ({}), expected ({})",
                found.join(", "),
                expected.join(", ")
            ),
        }
    }
}

/// A table whose shape does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMismatch {
    pub table: String,
    pub differences: Vec<ShapeDifference>,
}

impl fmt::Display for TableMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.differences.iter().map(|d| d.to_string()).collect();
        write!(f, "table {}: {}", self.table, list.join("; "))
    }
}

fn join_mismatches(m: &[TableMismatch]) -> String {
    m.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("connect to PostgreSQL at {target}: no answer within {}s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout { target: String },
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
    fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
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

/// A segment's committed read position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointEntry {
    /// The segment's file name (not its path).
    pub segment: String,
    /// Byte offset of the first byte not yet counted (always a frame boundary).
    pub offset: u64,
    /// No more bytes will be read from it (sealed, or its writer died).
    pub finished: bool,
}

/// What a flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// This call committed the batch.
    Committed,
    /// The checkpoint already holds exactly this batch's positions: an earlier attempt whose
    /// COMMIT outcome was unknown did land. Nothing was written again.
    AlreadyCommitted,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The shape of a rule's table.
pub fn rule_table(rule: &Rule) -> TableSpec {
    let mut columns = vec![ColumnSpec {
        name: "bucket".into(),
        sql_type: "timestamp with time zone",
        not_null: true,
    }];
    for d in &rule.group_by {
        columns.push(ColumnSpec {
            name: d.clone(),
            sql_type: "text",
            not_null: true,
        });
    }
    for m in &rule.metrics {
        let (sql_type, not_null) = match m.kind {
            MetricKind::Count => ("bigint", true),
            MetricKind::Sum(_) => ("numeric", true),
            MetricKind::Min(_) | MetricKind::Max(_) => ("numeric", false),
        };
        columns.push(ColumnSpec {
            name: m.column.clone(),
            sql_type,
            not_null,
        });
    }
    let mut primary_key = vec!["bucket".to_string()];
    primary_key.extend(rule.group_by.iter().cloned());
    TableSpec {
        name: rule.table.clone(),
        columns,
        primary_key,
    }
}

/// The shape of `logtally_checkpoint`.
pub fn checkpoint_table() -> TableSpec {
    let col = |name: &str, sql_type, not_null| ColumnSpec {
        name: name.into(),
        sql_type,
        not_null,
    };
    TableSpec {
        name: CHECKPOINT_TABLE.into(),
        columns: vec![
            col("node", "text", true),
            col("segment", "text", true),
            col("offset", "bigint", true),
            col("finished", "boolean", true),
            col("updated_at", "timestamp with time zone", true),
        ],
        primary_key: vec!["node".into(), "segment".into()],
    }
}

/// `CREATE TABLE IF NOT EXISTS` for a shape.
pub fn create_sql(spec: &TableSpec) -> String {
    let mut cols: Vec<String> = spec
        .columns
        .iter()
        .map(|c| {
            let default = if c.name == "updated_at" && spec.name == CHECKPOINT_TABLE {
                " DEFAULT now()"
            } else {
                ""
            };
            let null = if c.not_null { " NOT NULL" } else { " NULL" };
            format!("{} {}{null}{default}", quote(&c.name), c.sql_type)
        })
        .collect();
    let pk: Vec<String> = spec.primary_key.iter().map(|c| quote(c)).collect();
    cols.push(format!("PRIMARY KEY ({})", pk.join(", ")));
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quote(&spec.name),
        cols.join(", ")
    )
}

/// Everything that differs between the shape needed and the table found. The primary key
/// is compared as a set: its column order does not change what conflicts.
pub fn shape_differences(spec: &TableSpec, actual: &ActualTable) -> Vec<ShapeDifference> {
    let mut out = Vec::new();
    if actual.kind != 'r' && actual.kind != 'p' {
        out.push(ShapeDifference::NotATable {
            relkind: actual.kind,
        });
        return out;
    }
    for want in &spec.columns {
        match actual.columns.iter().find(|c| c.name == want.name) {
            None => out.push(ShapeDifference::MissingColumn {
                column: want.name.clone(),
                expected: want.sql_type.to_string(),
            }),
            Some(have) => {
                if have.sql_type != want.sql_type {
                    out.push(ShapeDifference::WrongType {
                        column: want.name.clone(),
                        expected: want.sql_type.to_string(),
                        found: have.sql_type.clone(),
                    });
                }
                if have.not_null != want.not_null {
                    out.push(ShapeDifference::WrongNullability {
                        column: want.name.clone(),
                        expected_not_null: want.not_null,
                    });
                }
            }
        }
    }
    for have in &actual.columns {
        if !spec.columns.iter().any(|c| c.name == have.name) {
            out.push(ShapeDifference::ExtraColumn {
                column: have.name.clone(),
                found: have.sql_type.clone(),
            });
        }
    }
    let mut want_pk = spec.primary_key.clone();
    let mut have_pk = actual.primary_key.clone();
    want_pk.sort();
    have_pk.sort();
    if want_pk != have_pk {
        out.push(ShapeDifference::WrongPrimaryKey {
            expected: spec.primary_key.clone(),
            found: actual.primary_key.clone(),
        });
    }
    out
}

/// The additive upsert of one rule: one array parameter per column, unnested into rows.
pub fn upsert_sql(rule: &Rule) -> String {
    let spec = rule_table(rule);
    let names: Vec<String> = spec.columns.iter().map(|c| quote(&c.name)).collect();
    let mut arrays = vec!["$1::timestamptz[]".to_string()];
    let mut n = 1;
    for _ in &rule.group_by {
        n += 1;
        arrays.push(format!("${n}::text[]"));
    }
    let mut updates = Vec::new();
    for m in &rule.metrics {
        n += 1;
        let c = quote(&m.column);
        let (array, update) = match m.kind {
            MetricKind::Count => (
                format!("${n}::int8[]"),
                format!("{c} = cur.{c} + excluded.{c}"),
            ),
            // Decimals travel as text: exact, and PostgreSQL parses them into numeric.
            MetricKind::Sum(_) => (
                format!("${n}::numeric[]"),
                format!("{c} = cur.{c} + excluded.{c}"),
            ),
            MetricKind::Min(_) => (
                format!("${n}::numeric[]"),
                format!("{c} = least(cur.{c}, excluded.{c})"),
            ),
            MetricKind::Max(_) => (
                format!("${n}::numeric[]"),
                format!("{c} = greatest(cur.{c}, excluded.{c})"),
            ),
        };
        arrays.push(array);
        updates.push(update);
    }
    let key: Vec<String> = spec.primary_key.iter().map(|c| quote(c)).collect();
    let action = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    format!(
        "INSERT INTO {table} AS cur ({cols}) SELECT * FROM unnest({arrays}) \
         ON CONFLICT ({key}) {action}",
        table = quote(&rule.table),
        cols = names.join(", "),
        arrays = arrays.join(", "),
        key = key.join(", "),
    )
}

const CHECKPOINT_UPSERT: &str = "INSERT INTO logtally_checkpoint \
     (node, segment, \"offset\", finished, updated_at) \
     SELECT $1, s, o, f, now() FROM unnest($2::text[], $3::int8[], $4::bool[]) AS u(s, o, f) \
     ON CONFLICT (node, segment) DO UPDATE SET \"offset\" = excluded.\"offset\", \
     finished = excluded.finished, updated_at = excluded.updated_at";

const CHECKPOINT_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('logtally_checkpoint:' || $1, 0))";

const CHECKPOINT_READ: &str = "SELECT segment, \"offset\", finished FROM logtally_checkpoint \
     WHERE node = $1 AND segment = ANY($2::text[])";

fn bucket_time(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn combine(rule: &Rule, into: &mut Row, from: &Row) {
    for ((m, a), b) in rule
        .metrics
        .iter()
        .zip(into.metrics.iter_mut())
        .zip(&from.metrics)
    {
        *a = match (*a, *b) {
            (MetricValue::Count(x), MetricValue::Count(y)) => MetricValue::Count(x + y),
            (MetricValue::Decimal(x), MetricValue::Decimal(y)) => {
                MetricValue::Decimal(match (x, y, &m.kind) {
                    (Some(x), Some(y), MetricKind::Sum(_)) => Some(Decimal(x.0 + y.0)),
                    (Some(x), Some(y), MetricKind::Min(_)) => Some(x.min(y)),
                    (Some(x), Some(y), _) => Some(x.max(y)),
                    (x, y, _) => x.or(y),
                })
            }
            (a, _) => a,
        };
    }
}

/// Rows sorted by key, with rows of equal key merged. An upsert may not touch a row twice,
/// and two raw keys can become one text key (invalid UTF-8 replaced, NUL removed). The
/// order also makes concurrent sidecars lock rows in the same order (no deadlocks).
fn prepare_rows<'r>(rule: &Rule, rows: &'r [Row]) -> Cow<'r, [Row]> {
    let key = |r: &'r Row| (r.bucket_ms, &r.dims);
    // The aggregator drains rows sorted and distinct: then there is nothing to copy.
    if rows.windows(2).all(|w| key(&w[0]) < key(&w[1])) {
        return Cow::Borrowed(rows);
    }
    let mut refs: Vec<&Row> = rows.iter().collect();
    refs.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
    let mut out: Vec<Row> = Vec::with_capacity(refs.len());
    for r in refs {
        match out.last_mut() {
            Some(last) if last.bucket_ms == r.bucket_ms && last.dims == r.dims => {
                combine(rule, last, r)
            }
            _ => out.push(r.clone()),
        }
    }
    Cow::Owned(out)
}

/// One rule's rows for a flush: the aggregator's compact [`DrainedRows`] (the daemon), or
/// plain [`RuleRows`] (tests, tools). Either way the store upserts them a chunk at a time.
pub trait UpsertRows: Sync {
    /// Index into `Config::rules`.
    fn rule(&self) -> usize;
    /// Rows held (before equal keys are merged).
    fn row_count(&self) -> usize;
    /// The rows sorted by key with equal keys merged, at most `chunk` at a time. Only one
    /// chunk need exist as [`Row`]s at once.
    fn sorted_chunks<'a>(
        &'a self,
        rule: &'a Rule,
        chunk: usize,
    ) -> Box<dyn Iterator<Item = Cow<'a, [Row]>> + Send + 'a>;
}

impl UpsertRows for RuleRows {
    fn rule(&self) -> usize {
        self.rule
    }

    fn row_count(&self) -> usize {
        self.rows.len()
    }

    fn sorted_chunks<'a>(
        &'a self,
        rule: &'a Rule,
        chunk: usize,
    ) -> Box<dyn Iterator<Item = Cow<'a, [Row]>> + Send + 'a> {
        match prepare_rows(rule, &self.rows) {
            Cow::Borrowed(rows) => Box::new(rows.chunks(chunk).map(Cow::Borrowed)),
            Cow::Owned(rows) => {
                let chunks: Vec<Vec<Row>> = rows.chunks(chunk).map(<[Row]>::to_vec).collect();
                Box::new(chunks.into_iter().map(Cow::Owned))
            }
        }
    }
}

impl UpsertRows for DrainedRows {
    fn rule(&self) -> usize {
        self.rule
    }

    fn row_count(&self) -> usize {
        self.len()
    }

    /// Already sorted and distinct: each chunk is built from the compact form on demand.
    fn sorted_chunks<'a>(
        &'a self,
        _rule: &'a Rule,
        chunk: usize,
    ) -> Box<dyn Iterator<Item = Cow<'a, [Row]>> + Send + 'a> {
        let len = self.len();
        Box::new(
            (0..len)
                .step_by(chunk.max(1))
                .map(move |start| Cow::Owned(self.rows(start..(start + chunk).min(len)))),
        )
    }
}

/// Rows per upsert statement. A flush of many rows runs several statements in its one
/// transaction, so the encoded parameters never hold more than this many rows at once.
const UPSERT_CHUNK: usize = 20_000;

/// A [`Decimal`] bound as a PostgreSQL `numeric` in the binary format: exact, and no text
/// to allocate per value.
#[derive(Debug, Clone, Copy)]
pub struct SqlNumeric(pub Decimal);

impl SqlNumeric {
    /// The binary `numeric` wire form: ndigits, weight, sign, dscale (all i16), then base
    /// 10,000 digits, most significant first. PostgreSQL strips redundant zero digits. The
    /// display scale is the fewest fractional digits that show the value exactly (`42`,
    /// `0.005`), as [`Decimal`]'s `Display` writes it.
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` is newer than the workspace MSRV
    pub fn encode(self, out: &mut BytesMut) {
        const SCALE: u128 = 1_000_000_000;
        let abs = self.0 .0.unsigned_abs();
        let mut dscale: i16 = 9;
        let mut f = abs % SCALE;
        if f == 0 {
            dscale = 0;
        } else {
            while f % 10 == 0 {
                f /= 10;
                dscale -= 1;
            }
        }
        let (mut int, frac) = (abs / SCALE, (abs % SCALE) * 1000); // 12 fractional digits
        let mut int_groups = Vec::new();
        while int > 0 {
            int_groups.push((int % 10_000) as i16);
            int /= 10_000;
        }
        int_groups.reverse();
        let frac_groups = [
            (frac / 100_000_000) as i16,
            ((frac / 10_000) % 10_000) as i16,
            (frac % 10_000) as i16,
        ];
        let ndigits = (int_groups.len() + frac_groups.len()) as i16;
        let weight = int_groups.len() as i16 - 1;
        let sign: u16 = if self.0 .0 < 0 { 0x4000 } else { 0 };
        out.put_i16(ndigits);
        out.put_i16(weight);
        out.put_u16(sign);
        out.put_i16(dscale);
        for d in int_groups.iter().chain(frac_groups.iter()) {
            out.put_i16(*d);
        }
    }
}

impl ToSql for SqlNumeric {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.encode(out);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

/// The column arrays of one rule's upsert, borrowing the rows' text.
fn rule_params<'a>(rule: &Rule, rows: &'a [Row]) -> Vec<Box<dyn ToSql + Sync + Send + 'a>> {
    let mut params: Vec<Box<dyn ToSql + Sync + Send + 'a>> = Vec::new();
    params.push(Box::new(
        rows.iter()
            .map(|r| bucket_time(r.bucket_ms))
            .collect::<Vec<_>>(),
    ));
    for i in 0..rule.group_by.len() {
        let col: Vec<&'a str> = rows
            .iter()
            .map(|r| r.dims.get(i).map_or("", String::as_str))
            .collect();
        params.push(Box::new(col));
    }
    for (i, m) in rule.metrics.iter().enumerate() {
        let decimal = |r: &Row| match r.metrics.get(i) {
            Some(MetricValue::Decimal(d)) => *d,
            _ => None,
        };
        match m.kind {
            MetricKind::Count => {
                let col: Vec<i64> = rows
                    .iter()
                    .map(|r| match r.metrics.get(i) {
                        Some(MetricValue::Count(c)) => *c,
                        _ => 0,
                    })
                    .collect();
                params.push(Box::new(col));
            }
            MetricKind::Sum(_) => {
                let col: Vec<SqlNumeric> = rows
                    .iter()
                    .map(|r| SqlNumeric(decimal(r).unwrap_or_default()))
                    .collect();
                params.push(Box::new(col));
            }
            MetricKind::Min(_) | MetricKind::Max(_) => {
                let col: Vec<Option<SqlNumeric>> =
                    rows.iter().map(|r| decimal(r).map(SqlNumeric)).collect();
                params.push(Box::new(col));
            }
        }
    }
    params
}

/// `host:port/dbname` of a URL, for messages (never the password).
pub fn describe_target(url: &str) -> String {
    let Ok(cfg) = url.parse::<tokio_postgres::Config>() else {
        return "<unparsable database_url>".into();
    };
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        cfg.get_dbname().unwrap_or("(default db)")
    )
}

async fn connect_client(url: &str) -> Result<(Client, JoinHandle<()>), StoreError> {
    let target = describe_target(url);
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|source| StoreError::BadUrl { source })?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    cfg.application_name("logtally");
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, cfg.connect(NoTls))
        .await
        .map_err(|_| StoreError::ConnectTimeout {
            target: target.clone(),
        })?
        .map_err(|source| StoreError::Connect { target, source })?;
    let task = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection ended");
        }
    });
    Ok((client, task))
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

fn all_tables(config: &Config) -> Vec<TableSpec> {
    let mut specs: Vec<TableSpec> = config.rules.iter().map(rule_table).collect();
    specs.push(checkpoint_table());
    specs
}

/// How `logtally check` found a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// Present with the right shape.
    Ok,
    /// Absent: `run` will create it.
    Missing,
}

/// `logtally check`'s database part: reachable, and every existing table has the right
/// shape. Creates nothing.
pub async fn check(config: &Config) -> Result<Vec<(String, TableState)>, StoreError> {
    let (client, task) = connect_client(&config.database_url).await?;
    let states = inspect(&client, config).await;
    drop(client);
    let _ = task.await;
    Ok(states?
        .into_iter()
        .map(|(spec, state)| (spec.name, state))
        .collect())
}

/// Every table's state; an error naming every difference if any existing table has the
/// wrong shape.
async fn inspect(
    client: &Client,
    config: &Config,
) -> Result<Vec<(TableSpec, TableState)>, StoreError> {
    let mut states = Vec::new();
    let mut mismatches = Vec::new();
    for spec in all_tables(config) {
        match read_table(client, &spec.name).await? {
            None => states.push((spec, TableState::Missing)),
            Some(actual) => {
                let differences = shape_differences(&spec, &actual);
                if differences.is_empty() {
                    states.push((spec, TableState::Ok));
                } else {
                    mismatches.push(TableMismatch {
                        table: spec.name.clone(),
                        differences,
                    });
                }
            }
        }
    }
    if mismatches.is_empty() {
        Ok(states)
    } else {
        Err(StoreError::Shape(mismatches))
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
        let (client, task) = connect_client(&config.database_url).await?;
        // Check every table before creating any, so a refusal leaves the database untouched.
        let missing: Vec<TableSpec> = inspect(&client, config)
            .await?
            .into_iter()
            .filter(|(_, state)| *state == TableState::Missing)
            .map(|(spec, _)| spec)
            .collect();
        for spec in &missing {
            match client.batch_execute(&create_sql(spec)).await {
                Ok(()) => tracing::info!(table = %spec.name, "created table"),
                // Another sidecar created it at the same moment: fine, it is checked below.
                // PostgreSQL reports that race as any of these, depending on which catalog
                // row (the table's, its row type's, its index's) collided first.
                Err(e)
                    if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                        || e.code() == Some(&SqlState::DUPLICATE_TABLE)
                        || e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                Err(source) => {
                    return Err(StoreError::Db {
                        context: "create table",
                        source,
                    })
                }
            }
        }
        if !missing.is_empty() {
            inspect(&client, config).await?;
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
            .prepare(CHECKPOINT_UPSERT)
            .await
            .map_err(StoreError::db("prepare checkpoint upsert"))?;
        Ok(Store {
            client,
            task,
            node: config.node.clone(),
            rules: config.rules.clone(),
            upserts,
            checkpoint_upsert,
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
    pub async fn load_checkpoint(&self) -> Result<Vec<CheckpointEntry>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT segment, \"offset\", finished FROM logtally_checkpoint WHERE node = $1 \
                 ORDER BY segment",
                &[&self.node],
            )
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
            tx.execute(CHECKPOINT_LOCK, &[&self.node])
                .await
                .map_err(StoreError::db("lock checkpoint"))?;
            let names: Vec<&str> = positions.iter().map(|p| p.segment.as_str()).collect();
            let found: HashMap<String, (u64, bool)> = tx
                .query(CHECKPOINT_READ, &[&self.node, &names])
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
            .execute(
                "DELETE FROM logtally_checkpoint WHERE node = $1 AND segment = ANY($2::text[]) \
                 AND finished",
                &[&self.node, &segments],
            )
            .await
            .map_err(StoreError::db("delete finished checkpoints"))
    }
}

enum CheckpointState {
    AsExpected,
    AlreadyThere,
}

/// The compare in the flush's compare-and-swap.
fn compare_checkpoint(
    node: &str,
    positions: &[CheckpointEntry],
    previous: &HashMap<String, CheckpointEntry>,
    found: &HashMap<String, (u64, bool)>,
) -> Result<CheckpointState, StoreError> {
    let as_expected = positions.iter().all(|p| {
        let expected = previous.get(&p.segment).map(|e| (e.offset, e.finished));
        found.get(&p.segment).copied() == expected
    });
    if as_expected {
        return Ok(CheckpointState::AsExpected);
    }
    let already = positions
        .iter()
        .all(|p| found.get(&p.segment) == Some(&(p.offset, p.finished)));
    if already {
        return Ok(CheckpointState::AlreadyThere);
    }
    let bad = positions
        .iter()
        .find(|p| {
            let expected = previous.get(&p.segment).map(|e| (e.offset, e.finished));
            found.get(&p.segment).copied() != expected
        })
        .expect("some position differs");
    Err(StoreError::CheckpointConflict {
        node: node.to_string(),
        segment: bad.segment.clone(),
        expected: previous.get(&bad.segment).map(|e| (e.offset, e.finished)),
        found: found.get(&bad.segment).copied(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Metric;

    fn rule() -> Rule {
        Rule {
            table: "ad_events_1m".into(),
            bucket: Duration::from_secs(60),
            group_by: vec!["ad".into(), "ev".into()],
            metrics: vec![
                Metric {
                    column: "events".into(),
                    kind: MetricKind::Count,
                },
                Metric {
                    column: "bytes".into(),
                    kind: MetricKind::Sum("bytes".into()),
                },
                Metric {
                    column: "rt_min".into(),
                    kind: MetricKind::Min("rt".into()),
                },
                Metric {
                    column: "rt_max".into(),
                    kind: MetricKind::Max("rt".into()),
                },
            ],
        }
    }

    fn actual_of(spec: &TableSpec) -> ActualTable {
        ActualTable {
            kind: 'r',
            columns: spec
                .columns
                .iter()
                .map(|c| ActualColumn {
                    name: c.name.clone(),
                    sql_type: c.sql_type.into(),
                    not_null: c.not_null,
                })
                .collect(),
            primary_key: spec.primary_key.clone(),
        }
    }

    #[test]
    fn create_sql_quotes_and_types_every_column() {
        let sql = create_sql(&rule_table(&rule()));
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS \"ad_events_1m\" (\"bucket\" timestamp with time zone \
             NOT NULL, \"ad\" text NOT NULL, \"ev\" text NOT NULL, \"events\" bigint NOT NULL, \
             \"bytes\" numeric NOT NULL, \"rt_min\" numeric NULL, \"rt_max\" numeric NULL, \
             PRIMARY KEY (\"bucket\", \"ad\", \"ev\"))"
        );
        assert!(create_sql(&checkpoint_table())
            .contains("\"updated_at\" timestamp with time zone NOT NULL DEFAULT now()"));
    }

    #[test]
    fn upsert_is_additive_and_binds_every_value() {
        let sql = upsert_sql(&rule());
        assert_eq!(
            sql,
            "INSERT INTO \"ad_events_1m\" AS cur (\"bucket\", \"ad\", \"ev\", \"events\", \
             \"bytes\", \"rt_min\", \"rt_max\") SELECT * FROM unnest($1::timestamptz[], \
             $2::text[], $3::text[], $4::int8[], $5::numeric[], $6::numeric[], \
             $7::numeric[]) ON CONFLICT (\"bucket\", \"ad\", \"ev\") DO UPDATE SET \
             \"events\" = cur.\"events\" + excluded.\"events\", \"bytes\" = cur.\"bytes\" + \
             excluded.\"bytes\", \"rt_min\" = least(cur.\"rt_min\", excluded.\"rt_min\"), \
             \"rt_max\" = greatest(cur.\"rt_max\", excluded.\"rt_max\")"
        );
    }

    #[test]
    fn matching_shape_has_no_differences() {
        let spec = rule_table(&rule());
        let mut actual = actual_of(&spec);
        actual.primary_key.reverse();
        assert_eq!(shape_differences(&spec, &actual), vec![]);
    }

    #[test]
    fn every_difference_is_named() {
        let spec = rule_table(&rule());
        let mut actual = actual_of(&spec);
        actual.columns.retain(|c| c.name != "ev");
        actual.columns.push(ActualColumn {
            name: "extra".into(),
            sql_type: "integer".into(),
            not_null: false,
        });
        actual.columns[3].sql_type = "numeric(10,2)".into(); // bytes
        actual.columns[2].not_null = false; // events
        actual.primary_key = vec!["bucket".into()];
        let diffs = shape_differences(&spec, &actual);
        let text: Vec<String> = diffs.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            text,
            vec![
                "column ev (text) is missing",
                "column events is nullable, expected NOT NULL",
                "column bytes is numeric(10,2), expected numeric",
                "column extra (integer) is not in the configuration",
                "primary key is (bucket), expected (bucket, ad, ev)",
            ]
        );
        let view = ActualTable {
            kind: 'v',
            ..actual
        };
        assert_eq!(
            shape_differences(&spec, &view),
            vec![ShapeDifference::NotATable { relkind: 'v' }]
        );
    }

    #[test]
    fn equal_keys_are_merged_and_rows_sorted() {
        let r = rule();
        let row = |b: i64, ad: &str, c: i64, s: i128, mn: Option<i128>, mx: Option<i128>| Row {
            bucket_ms: b,
            dims: vec![ad.into(), "v".into()],
            metrics: vec![
                MetricValue::Count(c),
                MetricValue::Decimal(Some(Decimal(s))),
                MetricValue::Decimal(mn.map(Decimal)),
                MetricValue::Decimal(mx.map(Decimal)),
            ],
        };
        let rows = vec![
            row(60_000, "b", 1, 10, Some(5), Some(5)),
            row(0, "a", 2, 20, None, None),
            row(60_000, "b", 3, 30, Some(1), Some(2)),
        ];
        let out = prepare_rows(&r, &rows).into_owned();
        // Sorted, distinct rows (what the aggregator drains) are used as they are.
        assert!(matches!(prepare_rows(&r, &out), Cow::Borrowed(_)));
        assert_eq!(
            out,
            vec![
                row(0, "a", 2, 20, None, None),
                row(60_000, "b", 4, 40, Some(1), Some(5))
            ]
        );
    }

    fn entry(s: &str, offset: u64, finished: bool) -> CheckpointEntry {
        CheckpointEntry {
            segment: s.into(),
            offset,
            finished,
        }
    }

    #[test]
    fn checkpoint_compare_tells_expected_landed_and_conflict() {
        let previous: HashMap<String, CheckpointEntry> =
            [("a".to_string(), entry("a", 100, false))]
                .into_iter()
                .collect();
        let positions = vec![entry("a", 200, false), entry("b", 50, true)];
        let found: HashMap<String, (u64, bool)> = [("a".to_string(), (100, false))].into();
        assert!(matches!(
            compare_checkpoint("n", &positions, &previous, &found),
            Ok(CheckpointState::AsExpected)
        ));
        let found: HashMap<String, (u64, bool)> = [
            ("a".to_string(), (200, false)),
            ("b".to_string(), (50, true)),
        ]
        .into();
        assert!(matches!(
            compare_checkpoint("n", &positions, &previous, &found),
            Ok(CheckpointState::AlreadyThere)
        ));
        let found: HashMap<String, (u64, bool)> = [("a".to_string(), (150, false))].into();
        match compare_checkpoint("n", &positions, &previous, &found) {
            Err(StoreError::CheckpointConflict {
                segment,
                expected,
                found,
                ..
            }) => {
                assert_eq!(
                    (segment.as_str(), expected, found),
                    ("a", Some((100, false)), Some((150, false)))
                );
            }
            _ => panic!("expected a conflict"),
        }
    }
}
