//! Unit and property tests of aggregation and decimals.

use super::*;
use crate::config::Metric;
use logtally_spool::{decode_frame, encode_event, Decoded, Frame};
use proptest::prelude::*;

fn d(s: &str) -> Option<Decimal> {
    Decimal::parse(s.as_bytes())
}

fn rule(table: &str, bucket_s: u64, group_by: &[&str], metrics: &[(&str, MetricKind)]) -> Rule {
    Rule {
        filter: None,
        table: table.into(),
        bucket: std::time::Duration::from_secs(bucket_s),
        group_by: group_by.iter().map(|s| s.to_string()).collect(),
        metrics: metrics
            .iter()
            .map(|(c, k)| Metric::new(c, k.clone()))
            .collect(),
    }
}

fn ad_rules() -> Vec<Rule> {
    vec![
        rule(
            "ad_1m",
            60,
            &["ad", "ev"],
            &[
                ("events", MetricKind::Count),
                ("bytes", MetricKind::Sum("bytes".into())),
                ("rt_max", MetricKind::Max("rt".into())),
                ("rt_min", MetricKind::Min("rt".into())),
            ],
        ),
        rule("all_1h", 3600, &[], &[("n", MetricKind::Count)]),
    ]
}

fn fields(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Encodes and decodes one event, then hands its record to `f`.
fn with_record<R>(time_ms: u64, values: &[Option<&[u8]>], f: impl FnOnce(&Record<'_>) -> R) -> R {
    let mut buf = Vec::new();
    encode_event(&mut buf, time_ms, values.iter().copied());
    match decode_frame(&buf) {
        Decoded::Frame {
            frame: Frame::Event(r),
            ..
        } => f(&r),
        other => panic!("{other:?}"),
    }
}

fn s(v: &str) -> Option<&[u8]> {
    Some(v.as_bytes())
}

fn dec(v: &str) -> MetricValue {
    MetricValue::Decimal(d(v))
}

#[test]
fn groups_and_accumulates() {
    let rules = ad_rules();
    let mut agg = Aggregator::new(&rules);
    let header = fields(&["ad", "ev", "bytes", "rt"]);
    let layout = agg.layout(&header);
    let t0 = 1_764_300_000_000u64; // a whole minute
    let events: Vec<(u64, [Option<&[u8]>; 4])> = vec![
        (t0, [s("7"), s("view"), s("100"), s("0.005")]),
        (t0 + 59_999, [s("7"), s("view"), s("50"), s("0.250")]),
        (t0 + 60_000, [s("7"), s("view"), s("1"), s("-")]),
        (t0 + 1, [s("7"), s("click"), None, None]),
        (t0 + 2, [s("7"), s("click"), s(""), s("")]),
    ];
    for (t, v) in &events {
        with_record(*t, v, |r| agg.add(&layout, r));
    }
    assert_eq!(agg.pending_keys(), 3 + 1);
    assert_eq!(agg.events(), 5);
    assert_eq!(agg.bad_values(), vec![vec![0, 0, 1, 1], vec![0]]);
    let out = agg.drain();
    assert_eq!(agg.pending_keys(), 0);
    let b0 = t0 as i64;
    assert_eq!(
        out[0].rows,
        vec![
            Row {
                bucket_ms: b0,
                dims: fields(&["7", "click"]),
                metrics: vec![
                    MetricValue::Count(2),
                    dec("0"),
                    MetricValue::Decimal(None),
                    MetricValue::Decimal(None)
                ],
            },
            Row {
                bucket_ms: b0,
                dims: fields(&["7", "view"]),
                metrics: vec![MetricValue::Count(2), dec("150"), dec("0.25"), dec("0.005")],
            },
            Row {
                bucket_ms: b0 + 60_000,
                dims: fields(&["7", "view"]),
                metrics: vec![
                    MetricValue::Count(1),
                    dec("1"),
                    MetricValue::Decimal(None),
                    MetricValue::Decimal(None)
                ],
            },
        ]
    );
    let hour = b0 - b0 % 3_600_000;
    assert_eq!(
        out[1],
        RuleRows {
            rule: 1,
            rows: vec![Row {
                bucket_ms: hour,
                dims: vec![],
                metrics: vec![MetricValue::Count(5)]
            }]
        }
    );
    assert!(
        agg.drain().iter().all(|r| r.rows.is_empty()),
        "drain empties"
    );
}

#[test]
fn missing_fields_and_other_orders() {
    let rules = ad_rules();
    let mut agg = Aggregator::new(&rules);
    // A segment without `ev` and `rt`, fields in another order, and a short record.
    let layout = agg.layout(&fields(&["bytes", "x", "ad"]));
    with_record(1000, &[s("5"), s("q"), s("9")], |r| agg.add(&layout, r));
    with_record(2000, &[s("6")], |r| agg.add(&layout, r));
    let out = agg.drain();
    let dims: Vec<_> = out[0]
        .rows
        .iter()
        .map(|r| (r.dims.clone(), r.metrics[1].clone()))
        .collect();
    assert_eq!(
        dims,
        vec![
            (fields(&["", ""]), dec("6")),
            (fields(&["9", ""]), dec("5"))
        ]
    );
}

#[test]
fn non_utf8_and_nul_dims() {
    let rules = vec![rule("t", 60, &["ua"], &[("n", MetricKind::Count)])];
    let mut agg = Aggregator::new(&rules);
    let header = fields(&["ua"]);
    for v in [&b"a\xffb"[..], b"a\xffb", b"a\0b", b"ab", b"caf\xc3\xa9"] {
        with_record(0, &[Some(v)], |r| agg.add_cached(1, &header, r));
    }
    let rows = agg.drain().remove(0).rows;
    let got: Vec<(String, MetricValue)> = rows
        .into_iter()
        .map(|r| (r.dims[0].clone(), r.metrics[0].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("ab".to_string(), MetricValue::Count(2)),
            ("a\u{fffd}b".to_string(), MetricValue::Count(2)),
            ("café".to_string(), MetricValue::Count(1)),
        ]
    );
}

#[test]
fn layout_cache_follows_segment_id() {
    let rules = vec![rule("t", 60, &["a"], &[("n", MetricKind::Count)])];
    let mut agg = Aggregator::new(&rules);
    let h1 = fields(&["a", "b"]);
    let h2 = fields(&["b", "a"]);
    with_record(0, &[s("x"), s("y")], |r| agg.add_cached(1, &h1, r));
    with_record(0, &[s("x"), s("y")], |r| agg.add_cached(2, &h2, r));
    let rows = agg.drain().remove(0).rows;
    let dims: Vec<&str> = rows.iter().map(|r| r.dims[0].as_str()).collect();
    assert_eq!(dims, ["x", "y"]);
}

#[test]
fn many_fields_use_the_wide_path() {
    let names: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
    let rules = vec![rule(
        "t",
        60,
        &["f39"],
        &[("s", MetricKind::Sum("f20".into()))],
    )];
    let mut agg = Aggregator::new(&rules);
    let layout = agg.layout(&names);
    let vals: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    let v: Vec<Option<&[u8]>> = vals.iter().map(|x| Some(x.as_bytes())).collect();
    with_record(0, &v, |r| agg.add(&layout, r));
    let rows = agg.drain().remove(0).rows;
    assert_eq!(rows[0].dims, ["39"]);
    assert_eq!(rows[0].metrics, vec![dec("20")]);
}

#[test]
fn merge_models_the_upsert() {
    let rules = ad_rules();
    let a = RuleRows {
        rule: 0,
        rows: vec![Row {
            bucket_ms: 0,
            dims: fields(&["1", "v"]),
            metrics: vec![
                MetricValue::Count(1),
                dec("2"),
                dec("3"),
                MetricValue::Decimal(None),
            ],
        }],
    };
    let b = RuleRows {
        rule: 0,
        rows: vec![Row {
            bucket_ms: 0,
            dims: fields(&["1", "v"]),
            metrics: vec![MetricValue::Count(2), dec("0.5"), dec("1"), dec("-1")],
        }],
    };
    let m = merge_rows(&rules, [a, b]);
    assert_eq!(
        m[0].rows[0].metrics,
        vec![MetricValue::Count(3), dec("2.5"), dec("3"), dec("-1")]
    );
}

#[test]
fn compact_drain_frees_and_chunks_like_drain() {
    let rules = ad_rules();
    let header = fields(&["ad", "ev", "bytes", "rt"]);
    let fill = |agg: &mut Aggregator| {
        for i in 0..500u64 {
            let ad = format!("{}", (i * 7919) % 97);
            let ev = ["view", "click", ""][(i % 3) as usize];
            let t = 1_764_300_000_000 + (i % 4) * 60_000;
            with_record(t, &[s(&ad), s(ev), s("3"), s("0.5")], |r| {
                agg.add_cached(1, &header, r)
            });
        }
    };
    let mut a = Aggregator::new(&rules);
    let mut b = Aggregator::new(&rules);
    fill(&mut a);
    fill(&mut b);
    let whole = a.drain();
    let compact = b.drain_compact();
    assert_eq!(b.pending_keys(), 0);
    assert!(b.rules.iter().all(|st| st.tables.is_empty()
        && st.arena.capacity() == 0
        && st.accs.capacity() == 0
        && st.keys.capacity() == 0));
    assert_eq!(compact.len(), whole.len());
    for (c, w) in compact.iter().zip(&whole) {
        assert_eq!(c.rule, w.rule);
        assert_eq!(c.len(), w.rows.len());
        let mut chunked = Vec::new();
        for start in (0..c.len()).step_by(37) {
            chunked.extend(c.rows(start..(start + 37).min(c.len())));
        }
        assert_eq!(chunked, w.rows);
    }
    assert!(whole[0].rows.len() > 300, "{}", whole[0].rows.len());
    // The emptied aggregator takes new keys.
    fill(&mut b);
    assert_eq!(b.drain(), whole);
}

// ---- properties ----

type Ev = (u64, Vec<Option<Vec<u8>>>);

fn value_strategy() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        Just(Some(Vec::new())),
        (0u8..4).prop_map(|v| Some(vec![b'a' + v])),
        (-500i64..500, 0u32..1000).prop_map(|(i, f)| Some(format!("{i}.{f:03}").into_bytes())),
        Just(Some(b"-".to_vec())),
        Just(Some(b"\xff\0".to_vec())),
        Just(Some(b"1.5, 2 : -".to_vec())),
    ]
}

fn events_strategy() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (0u64..400_000, prop::collection::vec(value_strategy(), 0..5)),
        0..60,
    )
}

fn prop_rules() -> Vec<Rule> {
    vec![
        rule(
            "r0",
            60,
            &["a", "b"],
            &[
                ("n", MetricKind::Count),
                ("s", MetricKind::Sum("c".into())),
                ("lo", MetricKind::Min("c".into())),
                ("hi", MetricKind::Max("d".into())),
            ],
        ),
        rule("r1", 3600, &["d"], &[("s", MetricKind::Sum("a".into()))]),
        {
            let mut r = rule(
                "r2",
                60,
                &["a"],
                &[
                    ("n", MetricKind::Count),
                    ("m", MetricKind::Count),
                    ("s", MetricKind::Sum("c".into())),
                    ("u", MetricKind::Distinct("b".into())),
                    (
                        "q",
                        MetricKind::Quantiles {
                            field: "c".into(),
                            alpha: 0.02,
                        },
                    ),
                ],
            );
            r.filter = Some(cond("b != 'b' or d > 0"));
            r.metrics[1].filter = Some(cond("c < 1 and not a in ('c')"));
            r.metrics[2].filter = Some(cond("d >= -100"));
            r
        },
    ]
}

fn cond(text: &str) -> crate::config::Condition {
    crate::config::condition::parse_condition(text).unwrap()
}

fn aggregate(rules: &[Rule], events: &[Ev]) -> Vec<RuleRows> {
    let mut agg = Aggregator::new(rules);
    let header = fields(&["a", "b", "c", "d"]);
    for (t, vals) in events {
        let v: Vec<Option<&[u8]>> = vals.iter().map(|x| x.as_deref()).collect();
        with_record(*t, &v, |r| agg.add_cached(7, &header, r));
    }
    agg.drain()
}

/// Drops rules without rows so outputs of drain and merge compare equal.
fn non_empty(rows: Vec<RuleRows>) -> Vec<RuleRows> {
    rows.into_iter().filter(|r| !r.rows.is_empty()).collect()
}

proptest! {
    #[test]
    fn sum_of_parts_equals_whole(events in events_strategy(), cut in 0usize..60) {
        let rules = prop_rules();
        let cut = cut.min(events.len());
        let whole = aggregate(&rules, &events);
        let parts = merge_rows(
            &rules,
            aggregate(&rules, &events[..cut]).into_iter().chain(aggregate(&rules, &events[cut..])),
        );
        prop_assert_eq!(non_empty(whole.clone()), non_empty(parts));
        // The total count is the number of events.
        let total: i64 = whole[0].rows.iter().map(|r| match r.metrics[0] {
            MetricValue::Count(n) => n,
            _ => 0,
        }).sum();
        prop_assert_eq!(total, events.len() as i64);
    }

    #[test]
    fn merge_is_commutative(a in events_strategy(), b in events_strategy()) {
        let rules = prop_rules();
        let ra = aggregate(&rules, &a);
        let rb = aggregate(&rules, &b);
        let ab = merge_rows(&rules, ra.clone().into_iter().chain(rb.clone()));
        let ba = merge_rows(&rules, rb.into_iter().chain(ra));
        prop_assert_eq!(ab, ba);
    }
}

// ---- conditions, numeric lists, sketches, bad times ----

fn conditional_rule() -> Rule {
    let mut r = rule(
        "ad_daily",
        86_400,
        &["ad"],
        &[
            ("views", MetricKind::Count),
            ("clicks", MetricKind::Count),
            ("bytes", MetricKind::Sum("bytes".into())),
            ("up_max", MetricKind::Max("up".into())),
            ("up_min", MetricKind::Min("up".into())),
            ("up_sum", MetricKind::Sum("up".into())),
            ("reach", MetricKind::Distinct("uid".into())),
            (
                "rt",
                MetricKind::Quantiles {
                    field: "up".into(),
                    alpha: 0.01,
                },
            ),
        ],
    );
    r.filter = Some(cond("status < 400"));
    r.metrics[0].filter = Some(cond("ev = 'view'"));
    r.metrics[1].filter = Some(cond("ev = 'click'"));
    r.metrics[2].filter = Some(cond("ev in ('view', 'click')"));
    r
}

#[test]
fn conditions_numeric_lists_and_sketches() {
    let rules = vec![conditional_rule()];
    let mut agg = Aggregator::new(&rules);
    let header = fields(&["ad", "ev", "status", "bytes", "up", "uid"]);
    let t0 = 1_764_288_000_000u64; // a UTC midnight
    let events: Vec<[Option<&[u8]>; 6]> = vec![
        [s("7"), s("view"), s("200"), s("10"), s("0.1, 0.2"), s("u1")],
        [
            s("7"),
            s("view"),
            s("304"),
            s("5"),
            s("0.5 : 0.25"),
            s("u2"),
        ],
        [s("7"), s("click"), s("200"), s("1"), s("-, 0.3"), s("u1")],
        [s("7"), s("other"), s("200"), s("100"), s(""), s("u3")],
        // Outside the rule's `where`: not aggregated.
        [s("7"), s("view"), s("500"), s("1000"), s("9"), s("u9")],
        // Not a number: the comparison is unknown, the event outside, and counted.
        [s("7"), s("view"), s("oops"), s("1000"), s("9"), s("u9")],
        // A bad list.
        [s("7"), s("view"), s("200"), s("x"), s("0.1,0.2"), None],
    ];
    for v in &events {
        with_record(t0, v, |r| agg.add_cached(1, &header, r));
    }
    let rows = agg.drain();
    let row = &rows[0].rows[0];
    assert_eq!(rows[0].rows.len(), 1);
    assert_eq!(row.metrics[0], MetricValue::Count(3));
    assert_eq!(row.metrics[1], MetricValue::Count(1));
    assert_eq!(row.metrics[2], dec("16"));
    // Lists: max reads the largest number, min the smallest, sum the sum; `-` skipped.
    assert_eq!(row.metrics[3], dec("0.5"));
    assert_eq!(row.metrics[4], dec("0.1"));
    assert_eq!(row.metrics[5], dec("1.35"));
    let mut reach = hll::Hll::new();
    for u in ["u1", "u2", "u3"] {
        reach.insert(u.as_bytes());
    }
    assert_eq!(row.metrics[6], MetricValue::Distinct(reach));
    let MetricValue::Quantiles(q) = &row.metrics[7] else {
        panic!("{:?}", row.metrics[7]);
    };
    assert_eq!(q.count(), 3);
    let c = &agg.rule_counters()[0];
    assert_eq!((c.outside, c.bad_conditions, c.overflows), (2, 1, 0));
    // `bytes = x` and `up = 0.1,0.2` (a list needs ", ") are bad values.
    assert_eq!(agg.bad_values()[0], vec![0, 0, 1, 1, 1, 1, 0, 1]);
}

/// A sum that would pass `i128` leaves the value out and counts it, and goes on adding the
/// values that fit. (Reaching it takes ~10¹¹ values of the largest size a field may hold,
/// 10¹⁸, so the test starts the accumulator near the limit.)
#[test]
fn a_sum_that_would_overflow_leaves_the_value_out_and_counts_it() {
    let rules = vec![rule(
        "t",
        60,
        &[],
        &[("n", MetricKind::Count), ("s", MetricKind::Sum("v".into()))],
    )];
    let mut agg = Aggregator::new(&rules);
    let header = fields(&["v"]);
    with_record(1000, &[s("1")], |r| agg.add_cached(1, &header, r));
    let near = i128::MAX - 3 * Decimal::ONE;
    agg.rules[0].accs[1] = near;
    // 999999999999999999 (the largest integer part) would overflow; 2 still fits, then 1.5
    // would not.
    for v in ["999999999999999999", "2", "1.5"] {
        with_record(1000, &[s(v)], |r| agg.add_cached(1, &header, r));
    }
    assert_eq!(agg.rule_counters()[0].overflows, 2);
    let rows = agg.drain();
    assert_eq!(rows[0].rows[0].metrics[0], MetricValue::Count(4));
    assert_eq!(
        rows[0].rows[0].metrics[1],
        MetricValue::Decimal(Some(Decimal(near + 2 * Decimal::ONE)))
    );
}

/// Times after year 9999 are skipped and counted; the last millisecond of 9999 is kept.
#[test]
fn unstorable_times_are_counted_and_skipped() {
    let rules = vec![rule("t", 60, &[], &[("n", MetricKind::Count)])];
    let mut agg = Aggregator::new(&rules);
    let header = fields(&["v"]);
    for t in [1000, MAX_EVENT_TIME_MS + 1, u64::MAX, MAX_EVENT_TIME_MS] {
        with_record(t, &[s("1")], |r| agg.add_cached(1, &header, r));
    }
    assert_eq!(agg.bad_times(), 2);
    assert_eq!(agg.events(), 4);
    let rows = agg.drain();
    assert_eq!(rows[0].rows.len(), 2);
    assert_eq!(rows[0].rows[1].bucket_ms, MAX_EVENT_TIME_MS as i64 - 59_999);
}
