//! A drained batch in the aggregator's compact form, turned into [`Row`]s a chunk at a time.

use super::hll::Hll;
use super::key::{decode_key, key_bytes};
use super::quantiles::Quantiles;
use super::{Acc, Decimal, KeyRef, MetricValue, Row, RuleRows};

/// One rule's drained aggregates, kept in the aggregator's compact encoding (about a third of
/// the memory of the same [`Row`]s). Rows come out sorted by `(bucket_ms, dims)` and distinct.
#[derive(Debug, Clone)]
pub struct DrainedRows {
    /// Index into `Config::rules`.
    pub rule: usize,
    pub(super) accs_kind: Vec<Acc>,
    /// Keys in `(bucket, dims)` order; `idx` points into `accs`.
    pub(super) keys: Vec<KeyRef>,
    pub(super) arena: Vec<u8>,
    pub(super) accs: Vec<i128>,
    /// The sketches the accumulators of `distinct` and `quantiles` metrics point at.
    pub(super) hlls: Vec<Hll>,
    pub(super) quants: Vec<Quantiles>,
    /// The keys admitted (`max_keys`) since the previous drain: committed with these rows.
    pub admitted: super::admission::AdmittedDelta,
}

impl DrainedRows {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The rows at positions `range` (in sorted order), materialised.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Vec<Row> {
        let n = self.accs_kind.len();
        self.keys[range]
            .iter()
            .map(|k| {
                let (bucket_ms, dims) = decode_key(key_bytes(&self.arena, k));
                let i = k.idx as usize;
                let metrics = self
                    .accs_kind
                    .iter()
                    .zip(&self.accs[i * n..(i + 1) * n])
                    .map(|(&a, &v)| self.value(a, v))
                    .collect();
                Row {
                    bucket_ms,
                    dims,
                    metrics,
                }
            })
            .collect()
    }

    /// All rows, materialised.
    pub fn into_rule_rows(self) -> RuleRows {
        RuleRows {
            rule: self.rule,
            rows: self.rows(0..self.len()),
        }
    }
}

impl DrainedRows {
    fn value(&self, acc: Acc, v: i128) -> MetricValue {
        match acc {
            Acc::Distinct => MetricValue::Distinct(self.hlls[v as usize].clone()),
            Acc::Quantiles(_) => MetricValue::Quantiles(self.quants[v as usize].clone()),
            _ => value(acc, v),
        }
    }
}

fn value(acc: Acc, v: i128) -> MetricValue {
    match acc {
        Acc::Distinct | Acc::Quantiles(_) => unreachable!("sketches are read by DrainedRows"),
        Acc::Count => MetricValue::Count(v as i64),
        Acc::Sum => MetricValue::Decimal(Some(Decimal(v))),
        Acc::Min | Acc::Max if v == acc.initial() => MetricValue::Decimal(None),
        Acc::Min | Acc::Max => MetricValue::Decimal(Some(Decimal(v))),
    }
}
