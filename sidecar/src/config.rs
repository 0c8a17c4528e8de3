//! The sidecar's configuration: TOML file → validated [`Config`].
//!
//! CONTRACT (shared by config, aggregate, store, daemon): the types below are what the rest
//! of the sidecar uses. Parsing and validation live here too.
//!
//! Rules decided here:
//! - every key has a default except `[[rule]]` (at least one is required);
//! - durations are an integer and a unit: `ms`, `s`, `m`, `h`, `d` (`"100ms"`, `"5s"`, `"1d"`);
//! - a rule's `bucket` is a whole number of seconds that divides a day evenly (`1s`…`12h`,
//!   e.g. `1m`, `5m`, `15m`, `1h`) or a whole number of days (`1d`, `7d`). Buckets are
//!   aligned on the Unix epoch, so they start on UTC day boundaries;
//! - table, group_by and metric column names are SQL identifiers `[a-z_][a-z0-9_]*` of at
//!   most 63 bytes (PostgreSQL's limit), not reserved words, and do not collide with each
//!   other or with the `bucket` column; `logtally_checkpoint` is not a rule table;
//! - metric field names are spool field names (`[A-Za-z_][A-Za-z0-9_]*`, ≤ 63 bytes).
//!
//! Every error names the file and the key, e.g.
//! `logtally.toml: rule[1].metrics.rt_max: unknown function "avg" (expected count, sum(f), min(f), max(f))`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub spool_dir: PathBuf,
    pub database_url: String,
    /// Whose checkpoint this is (default: hostname).
    pub node: String,
    pub flush_interval: Duration,
    pub listen: std::net::SocketAddr,
    pub binlog: PathBuf,
    /// Keep fully committed sealed segments this long before deleting (default 0).
    pub retain: Duration,
    /// Pending aggregate keys (all rules) above which reading pauses until a flush commits.
    pub max_pending_keys: usize,
    pub rules: Vec<Rule>,
}

/// One `[[rule]]`: a table of aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Validated SQL identifier: `[a-z_][a-z0-9_]*`, at most 63 bytes.
    pub table: String,
    /// Bucket width.
    pub bucket: Duration,
    /// Spool field names grouped by; each becomes a `text` column of the same name.
    pub group_by: Vec<String>,
    /// Metric columns, in the order written in the file.
    pub metrics: Vec<Metric>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// Column name (validated identifier).
    pub column: String,
    pub kind: MetricKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricKind {
    /// Number of events: `bigint not null`.
    Count,
    /// Sum of a field parsed as a decimal: `numeric not null`.
    Sum(String),
    /// Smallest value of a field: `numeric` (null when no event had a valid value).
    Min(String),
    /// Largest value of a field: `numeric` (null when no event had a valid value).
    Max(String),
}

impl MetricKind {
    /// The spool field a numeric metric reads (`None` for `count`).
    pub fn field(&self) -> Option<&str> {
        match self {
            MetricKind::Count => None,
            MetricKind::Sum(f) | MetricKind::Min(f) | MetricKind::Max(f) => Some(f),
        }
    }
}

impl fmt::Display for MetricKind {
    /// The form written in the configuration file (`count`, `sum(bytes)`, …).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricKind::Count => f.write_str("count"),
            MetricKind::Sum(x) => write!(f, "sum({x})"),
            MetricKind::Min(x) => write!(f, "min({x})"),
            MetricKind::Max(x) => write!(f, "max({x})"),
        }
    }
}

impl Rule {
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
/// The checkpoint table's name; no rule may use it.
pub const CHECKPOINT_TABLE: &str = "logtally_checkpoint";
/// The bucket column every rule table has.
pub const BUCKET_COLUMN: &str = "bucket";
/// Longest SQL identifier PostgreSQL keeps without truncating.
pub const MAX_IDENT_LEN: usize = 63;

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
    #[error("invalid field name {0:?} (expected 1 to 63 bytes of [A-Za-z0-9_], not starting with a digit)")]
    BadFieldName(String),
    #[error("unknown function {0:?} (expected count, sum(f), min(f), max(f))")]
    UnknownFunction(String),
    #[error("bad metric {0:?} (expected count, sum(f), min(f), max(f))")]
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
    #[error("cannot determine the hostname; set node explicitly")]
    NoHostname,
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
    node: Option<String>,
    flush_interval: Option<String>,
    listen: Option<String>,
    binlog: Option<PathBuf>,
    retain: Option<String>,
    max_pending_keys: Option<usize>,
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
    parse_with_hostname(path, text, hostname)
}

fn parse_with_hostname(
    path: &Path,
    text: &str,
    hostname: impl FnOnce() -> Option<String>,
) -> Result<Config, ConfigError> {
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
    let database_url = raw
        .database_url
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string());
    if database_url.is_empty() {
        return Err(invalid("database_url", Problem::Empty));
    }
    let node = match raw.node {
        Some(n) if n.trim().is_empty() => return Err(invalid("node", Problem::Empty)),
        Some(n) => n,
        None => hostname().ok_or_else(|| invalid("node", Problem::NoHostname))?,
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
    for (i, r) in raw.rule.into_iter().enumerate() {
        let key = |k: &str| format!("rule[{i}].{k}");
        check_identifier(&r.table).map_err(|p| invalid(&key("table"), p))?;
        if r.table == CHECKPOINT_TABLE {
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
            let kind = parse_metric(text).map_err(|p| invalid(&k, p))?;
            metrics.push(Metric {
                column: column.clone(),
                kind,
            });
        }
        rules.push(Rule {
            table: r.table,
            bucket,
            group_by: r.group_by,
            metrics,
        });
    }

    Ok(Config {
        path: path.to_path_buf(),
        spool_dir,
        database_url,
        node,
        flush_interval,
        listen,
        binlog,
        retain,
        max_pending_keys,
        rules,
    })
}

fn column_clash(name: &str) -> Problem {
    if name == BUCKET_COLUMN {
        Problem::Reserved(name.to_string())
    } else {
        Problem::DuplicateColumn(name.to_string())
    }
}

/// Every field a rule reads that no segment declares: one error per key (`rule[i].group_by[j]`,
/// `rule[i].metrics.<column>`), in file order. `declared` is the union of the field lists of
/// the segment headers in `config.spool_dir`; with no segment there is nothing to compare
/// with, so callers skip this check rather than pass an empty list.
pub fn fields_not_in_spool(config: &Config, declared: &[String]) -> Vec<ConfigError> {
    let known = |f: &str| declared.iter().any(|d| d == f);
    let listed = declared.join(", ");
    let mut errors = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        let group_by = rule
            .group_by
            .iter()
            .enumerate()
            .map(|(j, f)| (format!("rule[{i}].group_by[{j}]"), f.as_str()));
        let metrics = rule.metrics.iter().filter_map(|m| {
            let f = m.kind.field()?;
            Some((format!("rule[{i}].metrics.{}", m.column), f))
        });
        for (key, field) in group_by.chain(metrics) {
            if !known(field) {
                errors.push(ConfigError::Invalid {
                    path: config.path.display().to_string(),
                    key,
                    problem: Problem::NotInSpool {
                        field: field.to_string(),
                        dir: config.spool_dir.display().to_string(),
                        declared: listed.clone(),
                    },
                });
            }
        }
    }
    errors
}

/// Parses `"100ms"`, `"5s"`, `"1m"`, `"1h"`, `"1d"`.
pub fn parse_duration(text: &str) -> Result<Duration, Problem> {
    let bad = || Problem::BadDuration(text.to_string());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = text[..digits].parse().map_err(|_| bad())?;
    let unit_ms: u64 = match &text[digits..] {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

const DAY: Duration = Duration::from_secs(86_400);

#[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` is newer than the workspace MSRV
/// Formats a duration the way the file writes it: the largest unit that divides it
/// (`"5s"`, `"100ms"`, `"1d"`), so `parse_duration(&format_duration(d)) == Ok(d)` for
/// whole milliseconds.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A bucket: a duration of whole seconds dividing a day, or of whole days.
#[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` is newer than the workspace MSRV
pub fn parse_bucket(text: &str) -> Result<Duration, Problem> {
    let d = parse_duration(text)?;
    let bad = || Problem::BadBucket(text.to_string());
    if d.is_zero() || d.subsec_nanos() != 0 {
        return Err(bad());
    }
    let secs = d.as_secs();
    let ok = if d <= DAY {
        DAY.as_secs() % secs == 0
    } else {
        secs % DAY.as_secs() == 0
    };
    // Bucket starts are i64 ms; a bucket wider than a few thousand years is a typo.
    if !ok || secs > 366 * 86_400 * 100 {
        return Err(bad());
    }
    Ok(d)
}

/// Parses `count`, `sum(f)`, `min(f)`, `max(f)` (spaces around the parts allowed).
pub fn parse_metric(text: &str) -> Result<MetricKind, Problem> {
    let t = text.trim();
    if t == "count" || t == "count()" {
        return Ok(MetricKind::Count);
    }
    let Some(open) = t.find('(') else {
        return Err(
            if t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !t.is_empty() {
                Problem::UnknownFunction(t.to_string())
            } else {
                Problem::BadMetric(text.to_string())
            },
        );
    };
    let Some(inner) = t[open + 1..].strip_suffix(')') else {
        return Err(Problem::BadMetric(text.to_string()));
    };
    let func = t[..open].trim();
    let field = inner.trim().to_string();
    let make: fn(String) -> MetricKind = match func {
        "sum" => MetricKind::Sum,
        "min" => MetricKind::Min,
        "max" => MetricKind::Max,
        _ => return Err(Problem::UnknownFunction(func.to_string())),
    };
    if !valid_field_name(&field) {
        return Err(Problem::BadFieldName(field));
    }
    Ok(make(field))
}

/// Words PostgreSQL reserves (cannot be column or table names unquoted) plus the ones
/// logtally uses itself. The store quotes identifiers anyway; refusing these keeps the
/// tables pleasant to query by hand.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "column",
    "constraint",
    "create",
    "current_catalog",
    "current_date",
    "current_role",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "from",
    "grant",
    "group",
    "having",
    "in",
    "initially",
    "intersect",
    "into",
    "lateral",
    "leading",
    "limit",
    "localtime",
    "localtimestamp",
    "not",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "placing",
    "primary",
    "references",
    "returning",
    "select",
    "session_user",
    "some",
    "symmetric",
    "system_user",
    "table",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "when",
    "where",
    "window",
    "with",
];

/// Checks an SQL identifier used as a table or column name.
pub fn check_identifier(name: &str) -> Result<(), Problem> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_IDENT_LEN
        && !b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
    if !ok {
        return Err(Problem::BadIdentifier(name.to_string()));
    }
    if RESERVED.contains(&name) {
        return Err(Problem::Reserved(name.to_string()));
    }
    Ok(())
}

/// A spool field name (what `logtally_field` accepts).
pub fn valid_field_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= logtally_spool::MAX_FIELD_NAME_LEN
        && !b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
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
        let _ = writeln!(s, "database_url  {}", redact_url(&self.database_url));
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
        for (i, r) in self.rules.iter().enumerate() {
            let metrics: Vec<String> = r
                .metrics
                .iter()
                .map(|m| format!("{} = {}", m.column, m.kind))
                .collect();
            let _ = writeln!(
                s,
                "rule[{i}]       {} bucket {} group_by [{}] metrics {{ {} }}",
                r.table,
                format_duration(r.bucket),
                r.group_by.join(", "),
                metrics.join(", ")
            );
        }
        s
    }
}

/// Hides a password in a connection URL (`postgres://user:secret@host` → `user:***@host`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // A key=value connection string.
        return url
            .split(' ')
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let Some((auth, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = r#"
[[rule]]
table    = "ad_events_1m"
bucket   = "1m"
group_by = ["ad", "ev", "cmp"]
metrics  = { events = "count", bytes = "sum(bytes)", rt_max = "max(rt)", rt_min = "min(rt)" }
"#;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse_with_hostname(Path::new("logtally.toml"), text, || Some("edge-9".into()))
    }

    fn err(text: &str) -> String {
        p(text).expect_err("should fail").to_string()
    }

    #[test]
    fn defaults_apply() {
        let c = p(RULE).unwrap();
        assert_eq!(c.spool_dir, PathBuf::from("/var/spool/logtally"));
        assert_eq!(c.database_url, "postgres://logtally@127.0.0.1/logtally");
        assert_eq!(c.node, "edge-9");
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.listen, "127.0.0.1:9187".parse().unwrap());
        assert_eq!(c.binlog, PathBuf::from("/var/lib/logtally/binlog"));
        assert_eq!(c.retain, Duration::ZERO);
        assert_eq!(c.max_pending_keys, 1_000_000);
        assert_eq!(c.path, PathBuf::from("logtally.toml"));
    }

    #[test]
    fn full_file() {
        let text = format!(
            r#"
spool_dir = "/tmp/spool"
database_url = "postgres://u:pw@db/x"
node = "edge-1"
flush_interval = "100ms"
listen = "0.0.0.0:9000"
binlog = "/tmp/binlog"
retain = "1h"
max_pending_keys = 10
{RULE}
[[rule]]
table = "daily"
bucket = "1d"
metrics = {{ n = "count" }}
"#
        );
        let c = p(&text).unwrap();
        assert_eq!(c.flush_interval, Duration::from_millis(100));
        assert_eq!(c.retain, Duration::from_secs(3600));
        assert_eq!(c.node, "edge-1");
        assert_eq!(c.rules.len(), 2);
        let r = &c.rules[0];
        assert_eq!(r.table, "ad_events_1m");
        assert_eq!(r.bucket_ms(), 60_000);
        assert_eq!(r.group_by, ["ad", "ev", "cmp"]);
        let cols: Vec<&str> = r.metrics.iter().map(|m| m.column.as_str()).collect();
        assert_eq!(
            cols,
            ["events", "bytes", "rt_max", "rt_min"],
            "file order kept"
        );
        assert_eq!(r.metrics[0].kind, MetricKind::Count);
        assert_eq!(r.metrics[1].kind, MetricKind::Sum("bytes".into()));
        assert_eq!(r.metrics[2].kind, MetricKind::Max("rt".into()));
        assert_eq!(r.metrics[3].kind, MetricKind::Min("rt".into()));
        assert_eq!(c.rules[1].group_by, Vec::<String>::new());
        assert_eq!(c.rules[1].bucket, DAY);
        assert!(c.summary().contains("u:***@db"), "{}", c.summary());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
        for text in [
            "0s", "100ms", "1500ms", "5s", "90s", "1m", "1h", "36h", "1d", "7d",
        ] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "-5s",
            "5.5s",
            "5parsecs",
            "1w",
            "99999999999999999999d",
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(Problem::BadDuration(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_duration_names_key() {
        let e = err(&format!("flush_interval = \"5 parsecs\"\n{RULE}"));
        assert_eq!(e, "logtally.toml: flush_interval: bad duration \"5 parsecs\" (expected an integer and a unit: ms, s, m, h, d, e.g. \"5s\")");
        let e = err(&format!("retain = \"soon\"\n{RULE}"));
        assert!(
            e.starts_with("logtally.toml: retain: bad duration \"soon\""),
            "{e}"
        );
        let e = err(&format!("flush_interval = \"0s\"\n{RULE}"));
        assert_eq!(
            e,
            "logtally.toml: flush_interval: must be greater than zero"
        );
    }

    #[test]
    fn buckets() {
        for ok in [
            "1s", "30s", "1m", "5m", "15m", "1h", "12h", "1d", "7d", "86400s",
        ] {
            assert!(parse_bucket(ok).is_ok(), "{ok}");
        }
        for bad in ["0s", "7s", "100ms", "7m", "25h", "36h", "1500ms"] {
            assert_eq!(
                parse_bucket(bad),
                Err(Problem::BadBucket(bad.into())),
                "{bad}"
            );
        }
        let e = err(&RULE.replace("\"1m\"", "\"7m\""));
        assert!(
            e.starts_with("logtally.toml: rule[0].bucket: bad bucket \"7m\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_function() {
        let e = err(&RULE.replace("max(rt)", "avg(rt)"));
        assert_eq!(
            e,
            "logtally.toml: rule[0].metrics.rt_max: unknown function \"avg\" (expected count, sum(f), min(f), max(f))"
        );
        let e = err(&RULE.replace("\"count\"", "\"total\""));
        assert!(
            e.contains("rule[0].metrics.events: unknown function \"total\""),
            "{e}"
        );
        let e = err(&RULE.replace("sum(bytes)", "sum(bytes"));
        assert!(
            e.contains("rule[0].metrics.bytes: bad metric \"sum(bytes\""),
            "{e}"
        );
        let e = err(&RULE.replace("sum(bytes)", "sum(by-tes)"));
        assert!(
            e.contains("rule[0].metrics.bytes: invalid field name \"by-tes\""),
            "{e}"
        );
        let e = err(&RULE.replace("\"count\"", "3"));
        assert!(
            e.contains("rule[0].metrics.events: bad metric \"3\""),
            "{e}"
        );
    }

    #[test]
    fn metric_forms() {
        assert_eq!(
            parse_metric(" sum( bytes ) "),
            Ok(MetricKind::Sum("bytes".into()))
        );
        assert_eq!(parse_metric("count"), Ok(MetricKind::Count));
        assert_eq!(
            parse_metric("min(Rt_1)"),
            Ok(MetricKind::Min("Rt_1".into()))
        );
        assert_eq!(
            parse_metric("max()"),
            Err(Problem::BadFieldName(String::new()))
        );
    }

    #[test]
    fn identifiers() {
        let e = err(&RULE.replace("ad_events_1m", "Ad-Events"));
        assert!(
            e.starts_with("logtally.toml: rule[0].table: invalid name \"Ad-Events\""),
            "{e}"
        );
        let e = err(&RULE.replace("ad_events_1m", &"x".repeat(64)));
        assert!(e.contains("rule[0].table: invalid name"), "{e}");
        assert!(p(&RULE.replace("ad_events_1m", &"x".repeat(63))).is_ok());
        let e = err(&RULE.replace("ad_events_1m", "logtally_checkpoint"));
        assert_eq!(
            e,
            "logtally.toml: rule[0].table: \"logtally_checkpoint\" is reserved"
        );
        let e = err(&RULE.replace("\"cmp\"", "\"bucket\""));
        assert_eq!(
            e,
            "logtally.toml: rule[0].group_by[2]: \"bucket\" is reserved"
        );
        let e = err(&RULE.replace("\"cmp\"", "\"1cmp\""));
        assert!(
            e.contains("rule[0].group_by[2]: invalid name \"1cmp\""),
            "{e}"
        );
        let e = err(&RULE.replace("\"cmp\"", "\"select\""));
        assert!(
            e.contains("rule[0].group_by[2]: \"select\" is reserved"),
            "{e}"
        );
        let e = err(&RULE.replace("events =", "bucket ="));
        assert!(
            e.contains("rule[0].metrics.bucket: \"bucket\" is reserved"),
            "{e}"
        );
    }

    #[test]
    fn collisions() {
        let e = err(&RULE.replace("\"cmp\"", "\"ad\""));
        assert_eq!(
            e,
            "logtally.toml: rule[0].group_by[2]: column \"ad\" is used twice in this rule"
        );
        let e = err(&RULE.replace("events =", "ev ="));
        assert!(
            e.contains("rule[0].metrics.ev: column \"ev\" is used twice"),
            "{e}"
        );
        let e = err(&format!("{RULE}{RULE}"));
        assert_eq!(
            e,
            "logtally.toml: rule[1].table: table \"ad_events_1m\" is already used by rule[0]"
        );
    }

    #[test]
    fn structure_errors() {
        assert_eq!(
            err(""),
            "logtally.toml: rule: at least one [[rule]] is required"
        );
        let e = err(&format!("spool = \"/x\"\n{RULE}"));
        assert!(
            e.starts_with("logtally.toml: ") && e.contains("unknown field `spool`"),
            "{e}"
        );
        let e = err(&format!("{RULE}colour = \"red\"\n"));
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err("[[rule]]\ntable = \"t\"\nbucket = \"1m\"\n");
        assert!(e.contains("missing field `metrics`"), "{e}");
        let e = err("[[rule]]\ntable = \"t\"\nbucket = \"1m\"\nmetrics = {}\n");
        assert_eq!(
            e,
            "logtally.toml: rule[0].metrics: at least one metric is required"
        );
        let e = err(&format!("max_pending_keys = \"many\"\n{RULE}"));
        assert!(e.contains("max_pending_keys"), "{e}");
        let e = err(&format!("listen = \"localhost\"\n{RULE}"));
        assert!(
            e.starts_with("logtally.toml: listen: bad address \"localhost\""),
            "{e}"
        );
        let e = err(&format!("node = \"\"\n{RULE}"));
        assert_eq!(e, "logtally.toml: node: must not be empty");
        let e = err(&format!("database_url = \"\"\n{RULE}"));
        assert_eq!(e, "logtally.toml: database_url: must not be empty");
        let e = err("flush_interval = [\n");
        assert!(
            e.starts_with("logtally.toml: ") && e.contains("line 1"),
            "{e}"
        );
    }

    #[test]
    fn no_hostname() {
        let e = parse_with_hostname(Path::new("l.toml"), RULE, || None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "l.toml: node: cannot determine the hostname; set node explicitly"
        );
        assert!(hostname().is_some());
    }

    #[test]
    fn load_missing_file() {
        let e = load(Path::new("/nonexistent/logtally.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/logtally.toml: cannot read:"),
            "{e}"
        );
    }

    #[test]
    fn fields_checked_against_the_spool() {
        let c = p(&RULE.replace("max(rt)", "max(rtt)")).unwrap();
        let declared: Vec<String> = ["ad", "ev", "bytes", "rt"].map(String::from).into();
        let errors: Vec<String> = fields_not_in_spool(&c, &declared)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            errors,
            [
                "logtally.toml: rule[0].group_by[2]: field \"cmp\" is not in the spool \
                 (segments in /var/spool/logtally declare: ad, ev, bytes, rt)",
                "logtally.toml: rule[0].metrics.rt_max: field \"rtt\" is not in the spool \
                 (segments in /var/spool/logtally declare: ad, ev, bytes, rt)",
            ]
        );
        let e = &fields_not_in_spool(&c, &declared)[1];
        assert_eq!(e.key(), Some("rule[0].metrics.rt_max"));

        // All declared (in any order, with extras): nothing to report. `count` reads no field.
        let c = p(RULE).unwrap();
        let declared: Vec<String> = ["ua", "rt", "cmp", "bytes", "ev", "ad"]
            .map(String::from)
            .into();
        assert!(fields_not_in_spool(&c, &declared).is_empty());
        // Names are compared exactly: spool field names are case-sensitive.
        let declared: Vec<String> = ["AD", "ev", "cmp", "bytes", "rt"].map(String::from).into();
        let errors = fields_not_in_spool(&c, &declared);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key(), Some("rule[0].group_by[0]"));
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_url("postgres://a:b@h/d"), "postgres://a:***@h/d");
        assert_eq!(redact_url("postgres://a@h/d"), "postgres://a@h/d");
        assert_eq!(
            redact_url("host=x password=y user=u"),
            "host=x password=*** user=u"
        );
    }
}
