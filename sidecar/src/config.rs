//! The sidecar's configuration: TOML file → validated [`Config`].
//!
//! CONTRACT (shared by config, aggregate, store, daemon): the types below are what the rest
//! of the sidecar uses. Parsing and validation live here too.

use std::path::PathBuf;
use std::time::Duration;

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
