//! Aggregation: a pure function of records and rules (no I/O, no clock).
//!
//! CONTRACT (shared by aggregate, store, daemon): [`Decimal`], [`RuleRows`], [`Row`] are what a
//! flush hands to the store. The aggregator itself is implemented here.

/// An exact decimal: the value times 10⁹, so up to 9 fractional digits are kept exactly.
/// Parsed from field values like `"42"`, `"-3"`, `"0.005"`, `"1e3"` is NOT accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(pub i128);

/// A flushed aggregate row of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Bucket start, ms since the Unix epoch (event time floored to the rule's bucket).
    pub bucket_ms: i64,
    /// One value per `group_by` column: the field's bytes as UTF-8 (invalid sequences replaced
    /// by U+FFFD, NUL bytes removed); a missing field is the empty string.
    pub dims: Vec<String>,
    /// One value per metric column, in rule order: `Count` → `MetricValue::Count`, the others
    /// `MetricValue::Decimal` (`None` for min/max with no valid value; sum is never `None`).
    pub metrics: Vec<MetricValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricValue {
    Count(i64),
    Decimal(Option<Decimal>),
}

/// Everything one rule accumulated since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRows {
    /// Index into `Config::rules`.
    pub rule: usize,
    pub rows: Vec<Row>,
}
