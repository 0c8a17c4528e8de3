//! The admission and expiry decisions, and the aggregator with limits: totals stay exact
//! and the limit holds for any split of the events into flushes and restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::aggregate::{Aggregator, MetricValue, RuleRows};
use crate::config::{Metric, MetricKind, Rule, RuleLimits};
use logtally_spool::{decode_frame, encode_event, Decoded, Frame, Record};
use proptest::prelude::*;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;

#[test]
fn admits_up_to_max_keys_then_overflows_and_remembers() {
    let mut a = Admission::new(3, HOUR);
    for h in [1, 2, 3] {
        assert_eq!(a.decide(0, h), Decision::Admit);
    }
    assert_eq!(a.decide(0, 4), Decision::Overflow);
    // Admitted keys stay admitted (a key not pending in a later batch).
    assert_eq!(a.decide(0, 2), Decision::Admit);
    // Each bucket has its own limit.
    assert_eq!(a.decide(MIN, 4), Decision::Admit);
    assert_eq!(a.admitted(0), 3);
    assert_eq!(a.admitted(MIN), 1);
}

#[test]
fn delta_carries_each_admission_once_in_bucket_order() {
    let mut a = Admission::new(10, HOUR);
    a.decide(MIN, 7);
    a.decide(0, 5);
    a.decide(0, 6);
    a.decide(0, 5);
    assert_eq!(
        a.take_delta(),
        AdmittedDelta {
            chunks: vec![(0, vec![5, 6]), (MIN, vec![7])],
            // The first admission sets the floor a horizon behind its bucket.
            drop_before: Some(MIN - HOUR)
        }
    );
    assert!(a.take_delta().is_empty());
    a.decide(0, 8);
    assert_eq!(a.take_delta().chunks, vec![(0, vec![8])]);
}

#[test]
fn state_older_than_the_horizon_is_dropped_and_those_buckets_overflow() {
    let mut a = Admission::new(2, HOUR);
    a.decide(0, 1);
    a.decide(HOUR, 1); // newest − horizon = 0: bucket 0 stays
    assert_eq!(a.buckets(), 2);
    a.take_delta();
    a.decide(HOUR + MIN, 1); // floor moves to MIN: bucket 0 goes
    assert_eq!(a.buckets(), 2);
    let d = a.take_delta();
    assert_eq!(d.drop_before, Some(MIN));
    // A late event of a dropped bucket: overflow, even for a key it had admitted.
    assert_eq!(a.decide(0, 1), Decision::Overflow);
    assert_eq!(a.decide(0, 99), Decision::Overflow);
    // Within the horizon, late events still admit.
    assert_eq!(a.decide(HOUR, 2), Decision::Admit);
}

#[test]
fn restore_gives_back_the_committed_set_and_the_floor() {
    let mut a = Admission::new(2, HOUR);
    a.restore(vec![(10 * MIN, vec![1, 2]), (11 * MIN, vec![3])]);
    assert_eq!(a.decide(10 * MIN, 1), Decision::Admit);
    assert_eq!(a.decide(10 * MIN, 9), Decision::Overflow);
    assert_eq!(a.decide(11 * MIN, 4), Decision::Admit);
    assert_eq!(a.decide(11 * MIN, 5), Decision::Overflow);
    // Older than anything loaded: its state may have been dropped, so nothing is admitted.
    assert_eq!(a.decide(9 * MIN, 1), Decision::Overflow);
    // Newer buckets are fresh.
    assert_eq!(a.decide(12 * MIN, 5), Decision::Admit);
    // Loading nothing leaves every bucket fresh.
    let mut b = Admission::new(1, HOUR);
    b.restore(Vec::new());
    assert_eq!(b.decide(0, 1), Decision::Admit);
}

#[test]
fn horizon_is_a_bucket_at_least_an_hour_at_most_retention() {
    let s = Duration::from_secs;
    assert_eq!(admission_horizon(s(60), None), s(3600));
    assert_eq!(admission_horizon(s(86_400), None), s(86_400));
    assert_eq!(admission_horizon(s(60), Some(s(600))), s(600));
    assert_eq!(
        admission_horizon(s(86_400), Some(s(90 * 86_400))),
        s(86_400)
    );
}

#[test]
fn expiry_is_bucket_start_before_now_minus_retention() {
    let r = Some(Duration::from_secs(3600));
    let cut = expire_before(10 * HOUR, r);
    assert_eq!(cut, 9 * HOUR);
    assert!(is_expired(9 * HOUR - MIN, cut));
    assert!(!is_expired(9 * HOUR, cut));
    assert!(!is_expired(i64::MIN + 1, expire_before(10 * HOUR, None)));
}

// --- the aggregator with limits ---

fn rule() -> Rule {
    Rule::new(
        "t",
        Duration::from_secs(60),
        &["k"],
        vec![Metric::new("n", MetricKind::Count)],
    )
}

fn limits(max_keys: usize, retention: Option<Duration>) -> RuleLimits {
    RuleLimits {
        max_keys: Some(max_keys),
        retention,
        ..RuleLimits::default()
    }
}

fn add(agg: &mut Aggregator, time_ms: u64, key: &str) {
    let header = vec!["k".to_string()];
    let mut buf = Vec::new();
    encode_event(&mut buf, time_ms, [Some(key.as_bytes())]);
    let Decoded::Frame {
        frame: Frame::Event(r),
        ..
    } = decode_frame(&buf)
    else {
        panic!("encoded one event")
    };
    let r: Record<'_> = r;
    agg.add_cached(1, &header, &r);
}

/// The table as the upserts would leave it: (bucket, key) → count.
type Table = BTreeMap<(i64, String), i64>;

fn upsert(table: &mut Table, drained: Vec<RuleRows>) {
    for rr in drained {
        for row in rr.rows {
            let MetricValue::Count(c) = row.metrics[0] else {
                panic!("count")
            };
            *table
                .entry((row.bucket_ms, row.dims[0].clone()))
                .or_default() += c;
        }
    }
}

#[test]
fn overflow_row_gets_the_rest_and_counters_count_them() {
    let mut agg = Aggregator::with_limits(&[rule()], &[limits(2, None)]);
    for k in ["a", "b", "c", "d", "a", "c"] {
        add(&mut agg, 0, k);
    }
    let mut t = Table::new();
    upsert(&mut t, agg.drain());
    let want: Table = [
        ((0, "a".to_string()), 2),
        ((0, "b".to_string()), 1),
        ((0, "__other__".to_string()), 3),
    ]
    .into();
    assert_eq!(t, want);
    assert_eq!(agg.rule_counters()[0].overflow_events, 3);
}

#[test]
fn a_request_sending_the_label_is_the_overflow_row_and_not_a_key() {
    let mut agg = Aggregator::with_limits(&[rule()], &[limits(1, None)]);
    add(&mut agg, 0, "__other__");
    add(&mut agg, 0, "a");
    add(&mut agg, 0, "b");
    let mut t = Table::new();
    upsert(&mut t, agg.drain());
    assert_eq!(t.get(&(0, "a".into())), Some(&1));
    assert_eq!(t.get(&(0, "__other__".into())), Some(&2));
    assert_eq!(agg.rule_counters()[0].overflow_events, 1);
}

#[test]
fn expired_events_are_counted_and_not_written() {
    let mut agg =
        Aggregator::with_limits(&[rule()], &[limits(100, Some(Duration::from_secs(3600)))]);
    agg.set_now(10 * HOUR);
    add(&mut agg, (9 * HOUR - MIN) as u64, "old");
    add(&mut agg, (9 * HOUR) as u64, "kept");
    let mut t = Table::new();
    upsert(&mut t, agg.drain());
    assert_eq!(t.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(), ["kept"]);
    assert_eq!(agg.rule_counters()[0].expired_events, 1);
}

#[test]
fn no_limits_is_todays_behaviour() {
    let mut plain = Aggregator::new(&[rule()]);
    let mut limited = Aggregator::with_limits(&[rule()], &[RuleLimits::default()]);
    limited.set_now(i64::MAX);
    for i in 0..50u64 {
        add(&mut plain, i * 7_000, &format!("k{}", i % 13));
        add(&mut limited, i * 7_000, &format!("k{}", i % 13));
    }
    assert_eq!(plain.drain(), limited.drain());
}

proptest! {
    /// Any split of the events into flushes, with restarts (a new aggregator restored from
    /// the committed admissions) at any flush: the table's total is every event, and no
    /// bucket holds more than `max_keys` keys besides the overflow row.
    #[test]
    fn totals_exact_and_limit_held_across_flushes_and_restarts(
        events in proptest::collection::vec((0u64..4, 0u8..30), 1..300),
        max_keys in 1usize..8,
        cuts in proptest::collection::vec((0usize..300, any::<bool>()), 0..8),
    ) {
        let rules = [rule()];
        let lim = [limits(max_keys, None)];
        let mut committed: Vec<(i64, Vec<u64>)> = Vec::new();
        let mut agg = Aggregator::with_limits(&rules, &lim);
        let mut table = Table::new();
        let flush = |agg: &mut Aggregator, table: &mut Table, committed: &mut Vec<_>| {
            let drained = agg.drain_compact();
            for d in &drained {
                committed.extend(d.admitted.chunks.iter().cloned());
            }
            upsert(table, drained.into_iter().map(|d| d.into_rule_rows()).collect());
        };
        for (i, &(minute, key)) in events.iter().enumerate() {
            for &(at, restart) in &cuts {
                if at == i {
                    flush(&mut agg, &mut table, &mut committed);
                    if restart {
                        agg = Aggregator::with_limits(&rules, &lim);
                        agg.restore_admitted(0, committed.clone());
                    }
                }
            }
            add(&mut agg, minute * 60_000, &format!("k{key}"));
        }
        flush(&mut agg, &mut table, &mut committed);
        let total: i64 = table.values().sum();
        prop_assert_eq!(total, events.len() as i64);
        let mut per_bucket: BTreeMap<i64, usize> = BTreeMap::new();
        for (b, k) in table.keys() {
            if k != "__other__" {
                *per_bucket.entry(*b).or_default() += 1;
            }
        }
        for (b, n) in per_bucket {
            prop_assert!(n <= max_keys, "bucket {} holds {} keys > {}", b, n, max_keys);
        }
    }

    /// Without restarts, the split into flushes changes nothing: the same table as one pass.
    #[test]
    fn any_split_into_flushes_gives_one_pass_table(
        events in proptest::collection::vec((0u64..3, 0u8..20), 1..200),
        max_keys in 1usize..6,
        cuts in proptest::collection::btree_set(0usize..200, 0..6),
    ) {
        let rules = [rule()];
        let lim = [limits(max_keys, None)];
        let mut one = Aggregator::with_limits(&rules, &lim);
        let mut split = Aggregator::with_limits(&rules, &lim);
        let (mut t1, mut t2) = (Table::new(), Table::new());
        for (i, &(minute, key)) in events.iter().enumerate() {
            if cuts.contains(&i) {
                upsert(&mut t2, split.drain());
            }
            add(&mut one, minute * 60_000, &format!("k{key}"));
            add(&mut split, minute * 60_000, &format!("k{key}"));
        }
        upsert(&mut t1, one.drain());
        upsert(&mut t2, split.drain());
        prop_assert_eq!(t1, t2);
    }
}
