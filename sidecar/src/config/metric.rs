//! What a rule computes per row: its metrics (`count`, `sum(f)`, `min(f)`, `max(f)`), as
//! written in the file and as the aggregator and the store use them.
//!
//! New aggregate kinds (conditional counts, distinct counts, quantiles) and the condition
//! language of `count where …` are parsed here, at load time, into typed values.

use std::fmt;

use super::names::check_field_name;
use super::Problem;

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
    check_field_name(&field)?;
    Ok(make(field))
}
