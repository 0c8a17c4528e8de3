//! The pending-memory estimate ([`Aggregator::pending_bytes`]) counts sketches: its running
//! sketch total equals the heap bytes of the sketches a drain hands over (recomputed here
//! from scratch), grows with distinct values, and starts again at zero after a drain.

use super::*;
use crate::config::Metric;
use logtally_spool::{decode_frame, encode_event, Decoded, Frame};

fn add(agg: &mut Aggregator, layout: &Layout, time_ms: u64, values: &[&str]) {
    let mut buf = Vec::new();
    encode_event(&mut buf, time_ms, values.iter().map(|v| Some(v.as_bytes())));
    match decode_frame(&buf) {
        Decoded::Frame {
            frame: Frame::Event(r),
            ..
        } => agg.add(layout, &r),
        other => panic!("{other:?}"),
    }
}

fn sketch_bytes(agg: &Aggregator) -> usize {
    agg.rules.iter().map(|r| r.sketch_bytes).sum()
}

#[test]
fn sketch_growth_is_tracked_exactly_and_reset_by_a_drain() {
    let rule = Rule::new(
        "t",
        std::time::Duration::from_secs(60),
        &["ad"],
        vec![
            Metric::new("n", MetricKind::Count),
            Metric::new("reach", MetricKind::Distinct("uid".into())),
            Metric::new(
                "rt",
                MetricKind::Quantiles {
                    field: "rt".into(),
                    alpha: 0.01,
                },
            ),
        ],
    );
    let mut agg = Aggregator::new(&[rule]);
    let layout = agg.layout(&["ad".into(), "uid".into(), "rt".into()]);
    let empty = agg.pending_bytes();
    let mut last = empty;
    // Two keys; one gets 5,000 distinct users and spread-out times (its sketches grow).
    for i in 0..5_000u64 {
        let rt = format!("{}.{:03}", i % 97, i % 1000);
        add(&mut agg, &layout, 0, &["big", &format!("u{i}"), &rt]);
        add(&mut agg, &layout, 0, &["small", "u0", "0.001"]);
        if i % 500 == 0 {
            let now = agg.pending_bytes();
            assert!(now >= last, "the estimate shrank: {last} → {now}");
            last = now;
        }
    }
    // The total follows the inserts as they are applied (a batch at a time).
    agg.rules.iter_mut().for_each(RuleState::apply_sketch_ops);
    let tracked = sketch_bytes(&agg);
    // 5,000 distinct hashes: the big key's hll holds its registers (the extension's 2^11).
    assert!(tracked >= 2048, "{tracked}");
    assert!(agg.pending_bytes() >= empty + tracked as u64);
    let drained = agg.drain_compact();
    let recomputed: usize = drained
        .iter()
        .map(|d| {
            d.hlls.iter().map(Hll::heap_bytes).sum::<usize>()
                + d.quants.iter().map(Quantiles::heap_bytes).sum::<usize>()
        })
        .sum();
    assert_eq!(tracked, recomputed);
    assert_eq!(sketch_bytes(&agg), 0);
    assert!(
        agg.pending_bytes() < last,
        "a drain frees the pending state"
    );
}
