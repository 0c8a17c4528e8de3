//! The pure model of the store's additive upsert: how rows of several flushes (or several
//! sidecars) combine into what the database holds.

use std::cmp::Ordering;

use super::{Decimal, MetricValue, Row, RuleRows};
use crate::config::{MetricKind, Rule};

/// Combines rows the way the store's additive upsert does (count and sum add, min/max keep
/// the extreme): the pure model of what the database holds after several flushes. `parts`
/// may hold several `RuleRows` for the same rule. Output as [`Aggregator::drain`](super::Aggregator::drain)'s: one
/// entry per rule index seen, sorted by rule, rows sorted by `(bucket_ms, dims)`.
pub fn merge_rows(rules: &[Rule], parts: impl IntoIterator<Item = RuleRows>) -> Vec<RuleRows> {
    use std::collections::btree_map::{BTreeMap, Entry};
    type Rows = BTreeMap<(i64, Vec<String>), Vec<MetricValue>>;
    let mut by_rule: BTreeMap<usize, Rows> = BTreeMap::new();
    for part in parts {
        let kinds = &rules[part.rule].metrics;
        let rows = by_rule.entry(part.rule).or_default();
        for row in part.rows {
            match rows.entry((row.bucket_ms, row.dims)) {
                Entry::Vacant(e) => {
                    e.insert(row.metrics);
                }
                Entry::Occupied(mut e) => {
                    for ((a, b), m) in e.get_mut().iter_mut().zip(&row.metrics).zip(kinds) {
                        combine_kind(&m.kind, a, b);
                    }
                }
            }
        }
    }
    by_rule
        .into_iter()
        .map(|(rule, rows)| RuleRows {
            rule,
            rows: rows
                .into_iter()
                .map(|((bucket_ms, dims), metrics)| Row {
                    bucket_ms,
                    dims,
                    metrics,
                })
                .collect(),
        })
        .collect()
}

/// Adds `b` into `a`, two values of a metric of `kind`, as the store's upsert does (counts
/// and sums add, min/max keep the extreme, sketches merge: `hll_union`,
/// `logtally_quantiles_add`).
pub fn combine_kind(kind: &MetricKind, a: &mut MetricValue, b: &MetricValue) {
    use MetricValue::{Count, Decimal as D};
    match (kind, a, b) {
        (MetricKind::Count, Count(x), Count(y)) => *x += y,
        (MetricKind::Sum(_), D(x), D(y)) => {
            *x = Some(Decimal(x.unwrap_or_default().0 + y.unwrap_or_default().0))
        }
        (MetricKind::Min(_), D(x), D(y)) => *x = pick(*x, *y, Ordering::Less),
        (MetricKind::Max(_), D(x), D(y)) => *x = pick(*x, *y, Ordering::Greater),
        (MetricKind::Distinct(_), MetricValue::Distinct(x), MetricValue::Distinct(y)) => x.merge(y),
        (MetricKind::Quantiles { .. }, MetricValue::Quantiles(x), MetricValue::Quantiles(y)) => {
            // One rule's sketches share its accuracy; a mismatch cannot reach here.
            let _ = x.merge(y);
        }
        _ => {}
    }
}

fn pick(x: Option<Decimal>, y: Option<Decimal>, want: Ordering) -> Option<Decimal> {
    match (x, y) {
        (Some(a), Some(b)) => Some(if b.cmp(&a) == want { b } else { a }),
        (a, None) => a,
        (None, b) => b,
    }
}
