//! The sidecar's configuration: TOML file → validated [`Config`]. Pure: text in, values or
//! errors out (the only I/O is [`load`] reading the file, and [`hostname`] for whoever asks).
//!
//! The types here are what the rest of the sidecar uses; each kind of value has one parser,
//! in its own file, chosen by the key's type:
//! - `duration.rs`: every duration key (`flush_interval`, `retain`, a rule's `bucket`, which
//!   adds a rule of its own); `m` is minutes;
//! - `size.rs`: every size key (`16m` = `16MiB`);
//! - `names.rs`: table and column names (SQL identifiers, reserved words, the
//!   `logtally_checkpoint` and `bucket` names logtally keeps) and field names (the spool's
//!   rule);
//! - `metric.rs`: what a rule computes (`count`, `sum(f)`, `min(f)`, `max(f)`,
//!   `distinct(f)`, `quantiles(f)`, each optionally `… where <cond>`);
//! - `condition.rs` (+ `condition/parse.rs`): the expression language of metrics and of a
//!   rule's `where`, errors with their position.
//!
//! Rules decided here: every key has a default except `[[rule]]` (at least one is
//! required); a rule's column names do not collide with each other or with `bucket`.
//!
//! Every error names the file and the key, e.g.
//! `logtally.toml: rule[1].metrics.rt_max: at 1: unknown function "avg" (expected count, …)`.

pub mod condition;
mod database_url;
mod duration;
pub mod fields;
mod limits;
mod metric;
mod names;
mod size;

pub use condition::Condition;
pub use database_url::{
    describe, describe_database_url, override_from_env, parse_database_url, ConnectSettings,
    DatabaseUrlSource, TlsMode, UrlError, DATABASE_URL_ENV,
};
pub use duration::{format_duration, parse_bucket, parse_duration};
pub use limits::{parse_limits, LimitKey, RuleLimits, ADMITTED_TABLE, DEFAULT_OVERFLOW_LABEL};
pub use metric::{parse_metric, Metric, MetricKind};
pub use names::{
    check_field_name, check_identifier, BUCKET_COLUMN, CHECKPOINT_TABLE, MAX_IDENT_LEN,
};
pub use size::{format_size, parse_size};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use logtally_spool::MAX_FIELD_NAME_LEN;
use serde::Deserialize;

/// A whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub spool_dir: PathBuf,
    pub database_url: String,
    /// Which key (or the environment) gave `database_url`.
    pub database_url_source: DatabaseUrlSource,
    /// Whose checkpoint this is: the configured `node`, else the id stored in the spool
    /// folder (`crate::spool::node::resolve` fills it in before use; empty until then).
    pub node: String,
    /// `node` was set in the file (else it comes from the spool folder).
    pub node_configured: bool,
    pub flush_interval: Duration,
    pub listen: std::net::SocketAddr,
    pub binlog: PathBuf,
    /// Keep fully committed sealed segments this long before deleting (default 0).
    pub retain: Duration,
    /// Pending aggregate keys (all rules) above which reading pauses until a flush commits.
    pub max_pending_keys: usize,
    /// Estimated bytes of pending aggregates (sketches included) above which reading pauses
    /// until a flush commits, like `max_pending_keys` (whichever is reached first).
    pub max_pending_memory: u64,
    /// Add the columns a rule gained to its existing table at start (`ALTER TABLE … ADD
    /// COLUMN`); never drops or retypes one. Default false: refuse, naming the statements.
    pub auto_migrate: bool,
    /// On SIGTERM, how long to keep reading while writers still hold segments (default 20s).
    pub shutdown_wait: Duration,
    pub rules: Vec<Rule>,
    /// Per rule (same order as `rules`): `max_keys`, `overflow_label`, `retention`
    /// (`limits.rs`). Kept beside the rules so code building a [`Rule`] stays unchanged.
    pub limits: Vec<RuleLimits>,
    /// Tables of the rules with `show_keys = false`: the status page and `/status` do not
    /// show their keys (field values can be personal data).
    pub hide_keys: Vec<String>,
    /// Rules with `distribute_by`: on a Citus coordinator their tables are distributed on
    /// that `group_by` column (`db/citus.rs`); elsewhere a warning.
    pub distribute_by: Vec<DistributeBy>,
}

/// One rule's `distribute_by = "<group_by column>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributeBy {
    /// The rule's table.
    pub table: String,
    /// One of the rule's `group_by` columns.
    pub column: String,
}

impl Config {
    /// The column `table` is to be distributed on, if its rule says so.
    pub fn distribute_by(&self, table: &str) -> Option<&str> {
        self.distribute_by
            .iter()
            .find(|d| d.table == table)
            .map(|d| d.column.as_str())
    }
}

/// One `[[rule]]`: a table of aggregates.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Validated SQL identifier: `[a-z_][a-z0-9_]*`, at most 63 bytes.
    pub table: String,
    /// Bucket width.
    pub bucket: Duration,
    /// Spool field names grouped by; each becomes a `text` column of the same name.
    pub group_by: Vec<String>,
    /// Metric columns, in the order written in the file.
    pub metrics: Vec<Metric>,
    /// `where`: only events the condition matches are aggregated (the others are counted).
    pub filter: Option<Condition>,
}

impl Rule {
    /// A rule over every event, with no limits.
    pub fn new(table: &str, bucket: Duration, group_by: &[&str], metrics: Vec<Metric>) -> Rule {
        Rule {
            table: table.to_string(),
            bucket,
            group_by: group_by.iter().map(|s| s.to_string()).collect(),
            metrics,
            filter: None,
        }
    }

    /// Bucket width in milliseconds (always ≥ 1000).
    pub fn bucket_ms(&self) -> i64 {
        self.bucket.as_millis() as i64
    }
}

/// The spool folder default.
pub const DEFAULT_SPOOL_DIR: &str = "/var/spool/logtally";
pub const DEFAULT_DATABASE_URL: &str = "postgres://logtally@127.0.0.1/logtally";
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";
pub const DEFAULT_BINLOG: &str = "/var/lib/logtally/binlog";
pub const DEFAULT_MAX_PENDING_KEYS: usize = 1_000_000;
/// `max_pending_memory`: 1 GiB.
pub const DEFAULT_MAX_PENDING_MEMORY: u64 = 1 << 30;
/// How long SIGTERM keeps reading while writers hold segments (`shutdown_wait`).
pub const DEFAULT_SHUTDOWN_WAIT: Duration = Duration::from_secs(20);

/// Why a configuration is not usable. The `Display` form names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax errors, unknown keys and wrong types (toml's message names the line).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {problem}")]
    Invalid {
        path: String,
        key: String,
        problem: Problem,
    },
    /// A key naming a file (`database_url_file`) whose file cannot be read.
    #[error("{path}: {key}: cannot read {file}: {source}")]
    ReadKeyFile {
        path: String,
        key: &'static str,
        file: String,
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The key the error is about, when it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// What is wrong with one key's value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Problem {
    #[error("bad duration {0:?} (expected an integer and a unit: ms, s, m, h, d, e.g. \"5s\")")]
    BadDuration(String),
    #[error(
        "bad size {0:?} (expected an integer and an optional unit: k, m, g or KiB, MiB, GiB, \
         e.g. \"16m\" or \"16MiB\")"
    )]
    BadSize(String),
    #[error("must be greater than zero")]
    Zero,
    #[error(
        "bad bucket {0:?} (expected whole seconds dividing a day, e.g. \"1m\", \"5m\", \"1h\", \
         or whole days, e.g. \"1d\")"
    )]
    BadBucket(String),
    #[error("bad address {0:?} (expected host:port, e.g. \"127.0.0.1:9187\")")]
    BadAddress(String),
    #[error(
        "invalid name {0:?} (expected 1 to {MAX_IDENT_LEN} bytes of [a-z0-9_], not starting \
         with a digit)"
    )]
    BadIdentifier(String),
    #[error("{0:?} is reserved")]
    Reserved(String),
    #[error(
        "invalid field name {0:?} (expected 1 to {MAX_FIELD_NAME_LEN} bytes of [A-Za-z0-9_], \
         not starting with a digit)"
    )]
    BadFieldName(String),
    /// A metric expression or condition that does not parse: where and why.
    #[error("{0}")]
    Expr(condition::ExprError),
    #[error(
        "bad metric {0} (expected a string such as \"count\", \"sum(f)\" or \"count where ev = 'view'\")"
    )]
    BadMetric(String),
    #[error("column {0:?} is used twice in this rule")]
    DuplicateColumn(String),
    #[error("table {0:?} is already used by rule[{1}]")]
    DuplicateTable(String, usize),
    #[error("at least one [[rule]] is required")]
    NoRules,
    #[error("at least one metric is required")]
    NoMetrics,
    #[error("must not be empty")]
    Empty,
    #[error("bad overflow label {0:?} (expected 1 to 256 bytes without NUL)")]
    BadOverflowLabel(String),
    #[error("retention {0:?} is shorter than the rule's bucket ({1})")]
    RetentionBelowBucket(String, String),
    #[error(
        "{0:?} is not one of this rule's group_by columns ({1}): a table is distributed on a \
         column of its key"
    )]
    NotInGroupBy(String, String),
    #[error("database_url and database_url_file are both set (keep one)")]
    BothDatabaseUrls,
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    /// Found by `logtally check` against the segment headers, not by [`parse`]: the file
    /// alone cannot know nginx's `logtally_field` names.
    #[error("field {field:?} is not in the spool (segments in {dir} declare: {declared})")]
    NotInSpool {
        field: String,
        dir: String,
        /// The declared names, comma-separated, as the message shows them.
        declared: String,
    },
}

/// The file as written; every key optional so defaults apply.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    spool_dir: Option<PathBuf>,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    node: Option<String>,
    flush_interval: Option<String>,
    listen: Option<String>,
    binlog: Option<PathBuf>,
    retain: Option<String>,
    max_pending_keys: Option<usize>,
    max_pending_memory: Option<String>,
    auto_migrate: Option<bool>,
    shutdown_wait: Option<String>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    table: String,
    bucket: String,
    #[serde(default)]
    group_by: Vec<String>,
    /// Column → function, in file order (toml's `preserve_order`).
    metrics: toml::Table,
    /// Whether the status page may show this rule's top keys.
    #[serde(default = "show_keys_default")]
    show_keys: bool,
    #[serde(rename = "where")]
    filter: Option<String>,
    max_keys: Option<i64>,
    overflow_label: Option<String>,
    retention: Option<String>,
    /// Citus: the `group_by` column to distribute the table on.
    distribute_by: Option<String>,
}

fn show_keys_default() -> bool {
    true
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` is only used in messages and kept in
/// [`Config::path`].
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut config = parse_text(path, text)?;
    override_from_env(&mut config, std::env::var(DATABASE_URL_ENV).ok());
    Ok(config)
}

fn parse_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let shown = path.display().to_string();
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: shown.clone(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    let invalid = |key: &str, problem: Problem| ConfigError::Invalid {
        path: shown.clone(),
        key: key.to_string(),
        problem,
    };

    let flush_interval = match raw.flush_interval {
        Some(s) => parse_duration(&s).map_err(|p| invalid("flush_interval", p))?,
        None => DEFAULT_FLUSH_INTERVAL,
    };
    if flush_interval.is_zero() {
        return Err(invalid("flush_interval", Problem::Zero));
    }
    let retain = match raw.retain {
        Some(s) => parse_duration(&s).map_err(|p| invalid("retain", p))?,
        None => Duration::ZERO,
    };
    let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen: SocketAddr = listen_text
        .parse()
        .map_err(|_| invalid("listen", Problem::BadAddress(listen_text.clone())))?;
    let max_pending_keys = raw.max_pending_keys.unwrap_or(DEFAULT_MAX_PENDING_KEYS);
    if max_pending_keys == 0 {
        return Err(invalid("max_pending_keys", Problem::Zero));
    }
    let max_pending_memory = match raw.max_pending_memory {
        Some(s) => parse_size(&s).map_err(|p| invalid("max_pending_memory", p))?,
        None => DEFAULT_MAX_PENDING_MEMORY,
    };
    if max_pending_memory == 0 {
        return Err(invalid("max_pending_memory", Problem::Zero));
    }
    let (database_url, database_url_source) =
        database_url::from_keys(&shown, raw.database_url, raw.database_url_file)?;
    let shutdown_wait = match raw.shutdown_wait {
        Some(s) => parse_duration(&s).map_err(|p| invalid("shutdown_wait", p))?,
        None => DEFAULT_SHUTDOWN_WAIT,
    };
    // Unset: the spool folder's stored id, read at start (never the hostname once stored).
    let (node, node_configured) = match raw.node {
        Some(n) if n.trim().is_empty() => return Err(invalid("node", Problem::Empty)),
        Some(n) => (n, true),
        None => (String::new(), false),
    };
    let spool_dir = raw.spool_dir.unwrap_or_else(|| DEFAULT_SPOOL_DIR.into());
    if spool_dir.as_os_str().is_empty() {
        return Err(invalid("spool_dir", Problem::Empty));
    }
    let binlog = raw.binlog.unwrap_or_else(|| DEFAULT_BINLOG.into());
    if binlog.as_os_str().is_empty() {
        return Err(invalid("binlog", Problem::Empty));
    }

    if raw.rule.is_empty() {
        return Err(invalid("rule", Problem::NoRules));
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.rule.len());
    let mut hide_keys = Vec::new();
    let mut limits = Vec::with_capacity(raw.rule.len());
    let mut distribute_by = Vec::new();
    for (i, r) in raw.rule.into_iter().enumerate() {
        let key = |k: &str| format!("rule[{i}].{k}");
        check_identifier(&r.table).map_err(|p| invalid(&key("table"), p))?;
        if r.table == CHECKPOINT_TABLE || r.table == ADMITTED_TABLE {
            return Err(invalid(&key("table"), Problem::Reserved(r.table)));
        }
        if let Some(j) = rules.iter().position(|o| o.table == r.table) {
            return Err(invalid(&key("table"), Problem::DuplicateTable(r.table, j)));
        }
        let bucket = parse_bucket(&r.bucket).map_err(|p| invalid(&key("bucket"), p))?;

        let mut columns: Vec<&str> = vec![BUCKET_COLUMN];
        for (j, dim) in r.group_by.iter().enumerate() {
            let k = key(&format!("group_by[{j}]"));
            check_identifier(dim).map_err(|p| invalid(&k, p))?;
            if columns.contains(&dim.as_str()) {
                return Err(invalid(&k, column_clash(dim)));
            }
            columns.push(dim);
        }
        if r.metrics.is_empty() {
            return Err(invalid(&key("metrics"), Problem::NoMetrics));
        }
        let mut metrics = Vec::with_capacity(r.metrics.len());
        for (column, value) in &r.metrics {
            let k = key(&format!("metrics.{column}"));
            check_identifier(column).map_err(|p| invalid(&k, p))?;
            if columns.contains(&column.as_str()) {
                return Err(invalid(&k, column_clash(column)));
            }
            columns.push(column);
            let text = match value {
                toml::Value::String(s) => s.as_str(),
                other => return Err(invalid(&k, Problem::BadMetric(other.to_string()))),
            };
            let (kind, filter) = parse_metric(text).map_err(|e| invalid(&k, Problem::Expr(e)))?;
            metrics.push(Metric {
                column: column.clone(),
                kind,
                filter,
            });
        }
        if !r.show_keys {
            hide_keys.push(r.table.clone());
        }
        if let Some(column) = r.distribute_by {
            if !r.group_by.contains(&column) {
                let list = r.group_by.join(", ");
                return Err(invalid(
                    &key("distribute_by"),
                    Problem::NotInGroupBy(column, list),
                ));
            }
            distribute_by.push(DistributeBy {
                table: r.table.clone(),
                column,
            });
        }
        let filter = match &r.filter {
            Some(text) => Some(
                condition::parse_condition(text)
                    .map_err(|e| invalid(&key("where"), Problem::Expr(e)))?,
            ),
            None => None,
        };
        limits.push(
            parse_limits(r.max_keys, r.overflow_label, r.retention.as_deref(), bucket)
                .map_err(|(k, p)| invalid(&key(k.name()), p))?,
        );
        rules.push(Rule {
            table: r.table,
            bucket,
            group_by: r.group_by,
            metrics,
            filter,
        });
    }

    Ok(Config {
        path: path.to_path_buf(),
        spool_dir,
        database_url,
        database_url_source,
        node,
        node_configured,
        flush_interval,
        listen,
        binlog,
        retain,
        max_pending_keys,
        max_pending_memory,
        auto_migrate: raw.auto_migrate.unwrap_or(false),
        shutdown_wait,
        rules,
        limits,
        hide_keys,
        distribute_by,
    })
}

fn column_clash(name: &str) -> Problem {
    if name == BUCKET_COLUMN {
        Problem::Reserved(name.to_string())
    } else {
        Problem::DuplicateColumn(name.to_string())
    }
}

/// The machine's hostname: the kernel's, else `/etc/hostname`, else the `hostname` command.
pub fn hostname() -> Option<String> {
    let from_file = |p: &str| std::fs::read_to_string(p).ok();
    let from_cmd = || {
        let out = std::process::Command::new("hostname").output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    [
        from_file("/proc/sys/kernel/hostname"),
        from_file("/etc/hostname"),
    ]
    .into_iter()
    .flatten()
    .chain(std::iter::once_with(from_cmd).flatten())
    .map(|s| s.trim().to_string())
    .find(|s| !s.is_empty())
}

impl Config {
    /// A short human summary (for `logtally check`).
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "config        {}", self.path.display());
        let _ = writeln!(s, "spool_dir     {}", self.spool_dir.display());
        let _ = writeln!(
            s,
            "database_url  {} (from {})",
            redact_url(&self.database_url),
            self.database_url_source
        );
        let _ = writeln!(s, "node          {}", self.node);
        let _ = writeln!(
            s,
            "flush         every {}",
            format_duration(self.flush_interval)
        );
        let _ = writeln!(s, "listen        {}", self.listen);
        let _ = writeln!(s, "binlog        {}", self.binlog.display());
        let _ = writeln!(s, "retain        {}", format_duration(self.retain));
        let _ = writeln!(s, "max keys      {}", self.max_pending_keys);
        let _ = writeln!(s, "max memory    {}", format_size(self.max_pending_memory));
        let _ = writeln!(s, "auto migrate  {}", self.auto_migrate);
        let _ = writeln!(s, "shutdown wait {}", format_duration(self.shutdown_wait));
        for (i, r) in self.rules.iter().enumerate() {
            let metrics: Vec<String> = r
                .metrics
                .iter()
                .map(|m| format!("{} = {}", m.column, m.expression()))
                .collect();
            let filter = r
                .filter
                .as_ref()
                .map(|c| format!(" where {c}"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "rule[{i}]       {} bucket {} group_by [{}]{filter} metrics {{ {} }}",
                r.table,
                format_duration(r.bucket),
                r.group_by.join(", "),
                metrics.join(", ")
            );
            if let Some(l) = self.limits.get(i) {
                let _ = writeln!(s, "              {}", l.summary());
            }
        }
        s
    }
}

/// A connection URL for messages: see [`describe_database_url`] (never the password).
pub fn redact_url(url: &str) -> String {
    describe_database_url(url)
}

#[cfg(test)]
mod tests;
