//! What a rule computes per row: its metrics (`count`, `sum(f)`, `min(f)`, `max(f)`,
//! `distinct(f)`, `quantiles(f[, α%])`, each optionally `… where <cond>`), as written in the
//! file and as the aggregator and the store use them.
//!
//! The expression language itself (functions, conditions, positions in errors) is
//! `condition.rs`'s; this file turns its result into a [`Metric`] and names the SQL shape of
//! each kind.

pub use super::condition::MetricFunction as MetricKind;
use super::condition::{self, Condition, ExprError, MetricExpr};

#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Column name (validated identifier).
    pub column: String,
    pub kind: MetricKind,
    /// `<function> where <cond>`: only the events the condition matches count here.
    pub filter: Option<Condition>,
}

impl Metric {
    /// A metric over every event of its rule.
    pub fn new(column: &str, kind: MetricKind) -> Metric {
        Metric {
            column: column.to_string(),
            kind,
            filter: None,
        }
    }

    /// The form written in the configuration file (`count where ev = 'view'`).
    pub fn expression(&self) -> String {
        MetricExpr {
            function: self.kind.clone(),
            filter: self.filter.clone(),
        }
        .to_string()
    }
}

impl MetricKind {
    /// The spool field the metric reads (`None` for `count`).
    pub fn field(&self) -> Option<&str> {
        match self {
            MetricKind::Count => None,
            MetricKind::Sum(f)
            | MetricKind::Min(f)
            | MetricKind::Max(f)
            | MetricKind::Distinct(f)
            | MetricKind::Quantiles { field: f, .. } => Some(f),
        }
    }
}

impl std::fmt::Display for MetricKind {
    /// The form written in the configuration file (`count`, `sum(bytes)`, …).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        MetricExpr {
            function: self.clone(),
            filter: None,
        }
        .fmt(f)
    }
}

/// Parses a metric expression: its function and, after `where`, its condition.
pub fn parse_metric(text: &str) -> Result<(MetricKind, Option<Condition>), ExprError> {
    let e = condition::parse_metric(text)?;
    Ok((e.function, e.filter))
}
