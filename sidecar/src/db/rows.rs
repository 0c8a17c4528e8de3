//! What a flush binds: one rule's rows, sorted by key with equal keys merged, a chunk at a
//! time, as the column arrays of its upsert.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::types::ToSql;

use crate::aggregate::hll::Hll;
use crate::aggregate::{combine_kind, DrainedRows, MetricValue, Row, RuleRows};
use crate::config::{MetricKind, Rule};

use super::SqlNumeric;

/// A bucket start (ms since the epoch, maybe negative) as a `timestamptz` parameter.
pub(super) fn bucket_time(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// Adds `from` into `into` by each metric's merge rule, the one the upsert applies.
fn combine(rule: &Rule, into: &mut Row, from: &Row) {
    for ((m, a), b) in rule
        .metrics
        .iter()
        .zip(into.metrics.iter_mut())
        .zip(&from.metrics)
    {
        combine_kind(&m.kind, a, b);
    }
}

/// Rows sorted by key, with rows of equal key merged. An upsert may not touch a row twice,
/// and two raw keys can become one text key (invalid UTF-8 replaced, NUL removed). The
/// order also makes concurrent sidecars lock rows in the same order (no deadlocks).
pub(super) fn prepare_rows<'r>(rule: &Rule, rows: &'r [Row]) -> Cow<'r, [Row]> {
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
    /// The keys admitted under `max_keys` with these rows (committed with them).
    fn admitted(&self) -> Option<&crate::aggregate::admission::AdmittedDelta> {
        None
    }
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

    fn admitted(&self) -> Option<&crate::aggregate::admission::AdmittedDelta> {
        Some(&self.admitted)
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
pub(super) const UPSERT_CHUNK: usize = 20_000;

/// The column arrays of one rule's upsert, borrowing the rows' text.
pub(super) fn rule_params<'a>(
    rule: &Rule,
    rows: &'a [Row],
) -> Vec<Box<dyn ToSql + Sync + Send + 'a>> {
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
            // `hll_send`'s bytes, cast to `hll` by the upsert; an empty sketch is written too
            // (the column is `NOT NULL`: a row whose events had no value reads 0).
            MetricKind::Distinct(_) => {
                let col: Vec<Vec<u8>> = rows
                    .iter()
                    .map(|r| match r.metrics.get(i) {
                        Some(MetricValue::Distinct(h)) => h.encode(),
                        _ => Hll::new().encode(),
                    })
                    .collect();
                params.push(Box::new(col));
            }
            // The composite's text form, cast by the upsert; NULL when no event had a value.
            MetricKind::Quantiles { .. } => {
                let col: Vec<Option<String>> = rows
                    .iter()
                    .map(|r| match r.metrics.get(i) {
                        Some(MetricValue::Quantiles(q)) if !q.is_empty() => {
                            Some(q.to_sql_literal())
                        }
                        _ => None,
                    })
                    .collect();
                params.push(Box::new(col));
            }
        }
    }
    params
}
