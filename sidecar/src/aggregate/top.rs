//! The current bucket's top keys per rule, for the status page: read-only views of the
//! aggregator's pending keys and of drained batches, and [`TopKeys`], the small per-rule map
//! of what was already drained from the current bucket, so the values shown are everything
//! read so far (committed plus pending) and stay steady across flushes.
//!
//! The *current bucket* of a rule is the newest bucket it has seen; the ranking metric is the
//! rule's first `count` metric (a rule without one shows no keys). The drained map keeps at
//! most `2 × TRACKED` keys per rule (trimmed back to the [`TRACKED`] largest): a key that
//! falls out of it and comes back later is undercounted by what it had, so values are exact
//! for the keys that stay among the few hundred largest of their bucket — the top ten of
//! anything skewed enough to be worth a look.

use std::cmp::Reverse;

use hashbrown::HashMap;

use super::key::{decode_key, key_bytes};
use super::{Aggregator, DrainedRows, KeyRef, RuleState};
use crate::config::{MetricKind, Rule};

/// Keys per rule the drained map is trimmed back to.
pub const TRACKED: usize = 256;

/// One key of a rule's current bucket and its value so far.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopKey {
    /// One value per `group_by` column.
    pub dims: Vec<String>,
    pub value: i64,
}

/// A rule's current bucket and its largest keys, largest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleTop {
    /// Start of the current bucket (ms), `None` before the rule saw an event.
    pub bucket_ms: Option<i64>,
    pub keys: Vec<TopKey>,
}

/// What one rule drained from its current bucket.
#[derive(Debug, Clone)]
struct Tracked {
    /// Index of the ranking metric, `None`: the rule shows no keys.
    metric: Option<usize>,
    bucket: Option<i64>,
    /// Encoded key (bucket + dims) → value drained so far.
    drained: HashMap<Box<[u8]>, i64>,
}

/// The drained part of every rule's current-bucket values. See the module documentation.
#[derive(Debug, Clone)]
pub struct TopKeys {
    rules: Vec<Tracked>,
}

fn bucket_of(key: &[u8]) -> i64 {
    i64::from_le_bytes(key[..8].try_into().expect("8 bucket bytes"))
}

impl TopKeys {
    /// `shown(i)`: whether rule `i` may show its keys (a rule that may not is not tracked).
    pub fn new(rules: &[Rule], shown: impl Fn(usize) -> bool) -> TopKeys {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| Tracked {
                metric: r
                    .metrics
                    .iter()
                    .position(|m| m.kind == MetricKind::Count)
                    .filter(|_| shown(i)),
                bucket: None,
                drained: HashMap::new(),
            })
            .collect();
        TopKeys { rules }
    }

    /// Adds a drained batch's current-bucket values to the map. A batch with a newer bucket
    /// starts the map afresh; keys of older buckets (late events) are ignored.
    pub fn fold(&mut self, batch: &[DrainedRows]) {
        for d in batch {
            let Some(t) = self.rules.get_mut(d.rule) else {
                continue;
            };
            let (Some(m), Some(last)) = (t.metric, d.keys.last()) else {
                continue;
            };
            // Keys are sorted by bucket first: the newest bucket's keys are at the end.
            let newest = bucket_of(key_bytes(&d.arena, last));
            match t.bucket {
                Some(b) if b > newest => continue,
                Some(b) if b == newest => {}
                _ => {
                    t.bucket = Some(newest);
                    t.drained.clear();
                }
            }
            let n = d.accs_kind.len();
            let mut fresh: Vec<(i64, &KeyRef)> = Vec::new();
            for k in d.keys.iter().rev() {
                let key = key_bytes(&d.arena, k);
                if bucket_of(key) != newest {
                    break;
                }
                let value = d.accs[k.idx as usize * n + m] as i64;
                match t.drained.get_mut(key) {
                    Some(v) => *v += value,
                    None => fresh.push((value, k)),
                }
            }
            for (value, k) in largest(fresh, TRACKED, |c| c.0) {
                t.drained.insert(key_bytes(&d.arena, k).into(), value);
            }
            if t.drained.len() > 2 * TRACKED {
                let keep: Vec<(Box<[u8]>, i64)> =
                    largest(t.drained.drain().collect(), TRACKED, |e| e.1);
                t.drained.extend(keep);
            }
        }
    }

    /// Per rule, the `n` largest keys of the current bucket: drained plus `pending` (the
    /// aggregator that holds what was read since the last drain). Rules that show no keys
    /// get an empty [`RuleTop`].
    pub fn view(&self, pending: &Aggregator, n: usize) -> Vec<RuleTop> {
        self.rules
            .iter()
            .zip(&pending.rules)
            .map(|(t, st)| match t.metric {
                Some(m) => t.rule_view(st, m, n),
                None => RuleTop::default(),
            })
            .collect()
    }
}

impl Tracked {
    fn rule_view(&self, st: &RuleState, m: usize, n: usize) -> RuleTop {
        let table = st
            .tables
            .iter()
            .max_by_key(|(b, _)| *b)
            .filter(|(b, _)| self.bucket.is_none_or(|d| *b >= d));
        let bucket = table.map(|(b, _)| *b).or(self.bucket);
        let mut sums: HashMap<&[u8], i64> = HashMap::new();
        if self.bucket == bucket {
            sums.extend(self.drained.iter().map(|(k, v)| (&k[..], *v)));
        }
        let mut untracked: Vec<(i64, &[u8])> = Vec::new();
        if let Some((_, table)) = table {
            let width = st.accs_kind.len();
            for k in table.iter() {
                let key = key_bytes(&st.arena, k);
                let value = st.accs[k.idx as usize * width + m] as i64;
                match sums.get_mut(key) {
                    Some(v) => *v += value,
                    None => untracked.push((value, key)),
                }
            }
        }
        // A key only pending has its pending value as total: its top `n` are the only ones
        // that can make the overall top `n`.
        let candidates = largest(untracked, n, |c| c.0)
            .into_iter()
            .chain(sums.into_iter().map(|(k, v)| (v, k)))
            .map(|(value, key)| TopKey {
                dims: decode_key(key).1,
                value,
            })
            .collect();
        let mut keys = largest(candidates, n, |k| k.value);
        keys.sort_by(|a, b| b.value.cmp(&a.value).then_with(|| a.dims.cmp(&b.dims)));
        RuleTop {
            bucket_ms: bucket,
            keys,
        }
    }
}

/// The `n` items with the largest `value` (any order; ties cut arbitrarily).
fn largest<T>(mut items: Vec<T>, n: usize, value: impl Fn(&T) -> i64) -> Vec<T> {
    if items.len() > n && n > 0 {
        items.select_nth_unstable_by_key(n - 1, |x| Reverse(value(x)));
    }
    items.truncate(n);
    items
}

impl Aggregator {
    /// Approximate heap bytes the pending aggregates hold (arena, accumulators, key index,
    /// hash tables and the `distinct`/`quantiles` sketches), all rules. Cheap: capacities
    /// and a running sketch total, no scan of the keys.
    pub fn pending_bytes(&self) -> u64 {
        let per_rule = |st: &RuleState| {
            let tables: usize = st
                .tables
                .iter()
                .map(|(_, t)| t.capacity() * (size_of::<KeyRef>() + 1))
                .sum();
            st.arena.capacity()
                + st.accs.capacity() * size_of::<i128>()
                + st.keys.capacity() * size_of::<KeyRef>()
                + tables
                + st.table_index.capacity() * 2 * size_of::<i64>()
                + st.hlls.capacity() * size_of::<super::Hll>()
                + st.quants.capacity() * size_of::<super::Quantiles>()
                + st.sketch_bytes
        };
        self.rules.iter().map(per_rule).sum::<usize>() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Metric;
    use logtally_spool::{decode_frame, encode_event, Decoded, Frame};

    const T0: u64 = 1_764_300_000_000; // a whole minute

    fn rules() -> Vec<Rule> {
        let metric = |column: &str, kind| Metric {
            column: column.into(),
            kind,
            filter: None,
        };
        vec![
            Rule {
                table: "by_ua".into(),
                bucket: std::time::Duration::from_secs(60),
                group_by: vec!["ua".into()],
                metrics: vec![
                    metric("bytes", MetricKind::Sum("n".into())),
                    metric("hits", MetricKind::Count),
                ],
                filter: None,
            },
            Rule {
                table: "no_count".into(),
                bucket: std::time::Duration::from_secs(60),
                group_by: vec!["ua".into()],
                metrics: vec![metric("bytes", MetricKind::Sum("n".into()))],
                filter: None,
            },
        ]
    }

    fn add(agg: &mut Aggregator, time_ms: u64, ua: &str, times: usize) {
        let layout = agg.layout(&["ua".to_string(), "n".to_string()]);
        let mut buf = Vec::new();
        encode_event(&mut buf, time_ms, [Some(ua.as_bytes()), Some(&b"5"[..])]);
        let Decoded::Frame {
            frame: Frame::Event(r),
            ..
        } = decode_frame(&buf)
        else {
            panic!("not an event");
        };
        for _ in 0..times {
            agg.add(&layout, &r);
        }
    }

    fn shown(top: &RuleTop) -> Vec<(String, i64)> {
        top.keys
            .iter()
            .map(|k| (k.dims.join("|"), k.value))
            .collect()
    }

    fn pairs(p: &[(&str, i64)]) -> Vec<(String, i64)> {
        p.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn values_are_drained_plus_pending_and_steady_across_a_drain() {
        let rules = rules();
        let mut agg = Aggregator::new(&rules);
        let mut top = TopKeys::new(&rules, |_| true);
        add(&mut agg, T0, "a", 5);
        add(&mut agg, T0 + 1, "b", 3);
        add(&mut agg, T0 + 2, "<img src=x>", 4);
        let before = top.view(&agg, 10);
        assert_eq!(before[0].bucket_ms, Some(T0 as i64));
        assert_eq!(
            shown(&before[0]),
            pairs(&[("a", 5), ("<img src=x>", 4), ("b", 3)])
        );
        assert_eq!(before[1], RuleTop::default(), "no count metric: no keys");

        top.fold(&agg.drain_compact());
        assert_eq!(top.view(&agg, 10), before, "no flicker after a drain");
        add(&mut agg, T0 + 3, "b", 3);
        add(&mut agg, T0 + 4, "c", 1);
        assert_eq!(shown(&top.view(&agg, 2)[0]), pairs(&[("b", 6), ("a", 5)]));
        top.fold(&agg.drain_compact());
        assert_eq!(
            shown(&top.view(&agg, 10)[0]),
            pairs(&[("b", 6), ("a", 5), ("<img src=x>", 4), ("c", 1)])
        );
    }

    #[test]
    fn a_new_bucket_replaces_the_old_one_and_late_events_are_ignored() {
        let rules = rules();
        let mut agg = Aggregator::new(&rules);
        let mut top = TopKeys::new(&rules, |_| true);
        add(&mut agg, T0, "a", 5);
        top.fold(&agg.drain_compact());
        // Pending in the next minute: the view moves there before any drain.
        add(&mut agg, T0 + 60_000, "b", 2);
        add(&mut agg, T0 + 10, "a", 7);
        let v = top.view(&agg, 10);
        assert_eq!(v[0].bucket_ms, Some(T0 as i64 + 60_000));
        assert_eq!(shown(&v[0]), pairs(&[("b", 2)]));
        top.fold(&agg.drain_compact());
        assert_eq!(top.view(&agg, 10), v);
        // Only late events pending: the newer drained bucket stays the one shown.
        add(&mut agg, T0 + 20, "a", 1);
        assert_eq!(top.view(&agg, 10), v);
        top.fold(&agg.drain_compact());
        assert_eq!(top.view(&agg, 10), v);
    }

    #[test]
    fn hidden_rules_show_nothing_and_the_map_stays_bounded() {
        let rules = rules();
        let mut agg = Aggregator::new(&rules);
        let top = TopKeys::new(&rules, |i| i != 0);
        add(&mut agg, T0, "a", 1);
        assert_eq!(top.view(&agg, 10)[0], RuleTop::default());

        let mut top = TopKeys::new(&rules, |_| true);
        for round in 0..4 {
            for i in 0..TRACKED {
                add(&mut agg, T0, &format!("k{round}-{i}"), 1);
            }
            add(&mut agg, T0, "big", 10);
            top.fold(&agg.drain_compact());
            assert!(top.rules[0].drained.len() <= 2 * TRACKED);
        }
        assert_eq!(shown(&top.view(&agg, 1)[0]), pairs(&[("big", 40)]));
        assert_eq!(agg.pending_bytes(), 0, "a drain releases the memory");
        add(&mut agg, T0, "a", 1);
        assert!(agg.pending_bytes() > 0);
    }
}
