use super::*;
use crate::config::{Metric, MetricKind};

fn text(m: &Metrics) -> String {
    String::from_utf8(m.encode().1).unwrap()
}

/// The value of the sample line that starts with `series ` (exact series text).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
}

#[test]
fn every_named_metric_is_exported_with_prefix_and_type() {
    let m = Metrics::new().unwrap();
    let (content_type, _) = m.encode();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert!(content_type.contains("version=0.0.4"), "{content_type}");
    let t = text(&m);
    for (name, kind) in [
        ("logtally_events_read_total", "counter"),
        ("logtally_decode_errors_total", "counter"),
        ("logtally_corrupt_bytes_total", "counter"),
        ("logtally_torn_tail_waits_total", "counter"),
        ("logtally_module_dropped_events_total", "counter"),
        ("logtally_flushes_total", "counter"),
        ("logtally_flush_duration_seconds", "histogram"),
        ("logtally_database_errors_total", "counter"),
        ("logtally_lag_bytes", "gauge"),
        ("logtally_lag_seconds", "gauge"),
        ("logtally_spool_bytes", "gauge"),
        ("logtally_spool_free_bytes", "gauge"),
        ("logtally_pending_keys", "gauge"),
        ("logtally_segments_open", "gauge"),
        ("logtally_segments_deleted_total", "counter"),
        ("logtally_binlog_writes_total", "counter"),
        ("logtally_database_up", "gauge"),
        ("logtally_ready", "gauge"),
        ("logtally_build_info", "gauge"),
    ] {
        assert!(
            t.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} missing:\n{t}"
        );
    }
    // Label vectors appear once a series exists (see init_rules).
    assert_eq!(
        sample(&t, "logtally_flushes_total{outcome=\"ok\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&t, "logtally_flushes_total{outcome=\"error\"}"),
        Some(0.0)
    );
    #[cfg(target_os = "linux")]
    assert!(t.contains("process_resident_memory_bytes"), "{t}");
    for line in t.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.starts_with("logtally_") || line.starts_with("process_"),
            "{line}"
        );
    }
}

#[test]
fn updates_show_in_the_exposition() {
    let m = Metrics::new().unwrap();
    m.events_read.inc_by(42);
    m.flushes(true).inc();
    m.flushes(false).inc_by(2);
    m.flush_duration.observe(0.003);
    m.lag_seconds.set(1.5);
    m.add_rows_upserted("ad_events_1m", 7);
    m.add_bad_values("ad_events_1m", "bytes", 3);
    let t = text(&m);
    assert_eq!(sample(&t, "logtally_events_read_total"), Some(42.0));
    assert_eq!(
        sample(&t, "logtally_flushes_total{outcome=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, "logtally_flushes_total{outcome=\"error\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&t, "logtally_flush_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, "logtally_flush_duration_seconds_bucket{le=\"0.0025\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&t, "logtally_flush_duration_seconds_bucket{le=\"0.005\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&t, "logtally_lag_seconds"), Some(1.5));
    assert_eq!(
        sample(&t, "logtally_rows_upserted_total{rule=\"ad_events_1m\"}"),
        Some(7.0)
    );
    assert_eq!(
        sample(
            &t,
            "logtally_bad_values_total{metric=\"bytes\",rule=\"ad_events_1m\"}"
        ),
        Some(3.0)
    );
}

#[test]
fn init_rules_creates_zero_series_for_non_count_metrics_only() {
    let m = Metrics::new().unwrap();
    m.init_rules(&[Rule {
        filter: None,
        table: "t1".into(),
        bucket: std::time::Duration::from_secs(60),
        group_by: vec!["ad".into()],
        metrics: vec![
            Metric {
                filter: None,
                column: "events".into(),
                kind: MetricKind::Count,
            },
            Metric {
                filter: None,
                column: "rt_max".into(),
                kind: MetricKind::Max("rt".into()),
            },
        ],
    }]);
    let t = text(&m);
    assert_eq!(
        sample(&t, "logtally_rows_upserted_total{rule=\"t1\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &t,
            "logtally_bad_values_total{metric=\"rt_max\",rule=\"t1\"}"
        ),
        Some(0.0)
    );
    assert!(!t.contains("metric=\"events\""), "{t}");
}

#[test]
fn sync_tail_adds_differences_once() {
    let m = Metrics::new().unwrap();
    let mut st = TailStats {
        events: 10,
        dropped_events: 4,
        corrupt_occurrences: 1,
        corrupt_bytes: 33,
        ..Default::default()
    };
    m.sync_tail(&st);
    m.sync_tail(&st);
    st.events = 25;
    st.torn_tail_waits = 2;
    st.deleted_segments = 1;
    m.sync_tail(&st);
    let t = text(&m);
    assert_eq!(sample(&t, "logtally_events_read_total"), Some(25.0));
    assert_eq!(
        sample(&t, "logtally_module_dropped_events_total"),
        Some(4.0)
    );
    assert_eq!(sample(&t, "logtally_decode_errors_total"), Some(1.0));
    assert_eq!(sample(&t, "logtally_corrupt_bytes_total"), Some(33.0));
    assert_eq!(sample(&t, "logtally_torn_tail_waits_total"), Some(2.0));
    assert_eq!(sample(&t, "logtally_segments_deleted_total"), Some(1.0));
    // A fresh tailer starts its totals at 0 again: its counts add on top.
    m.sync_tail(&TailStats {
        events: 5,
        ..Default::default()
    });
    assert_eq!(sample(&text(&m), "logtally_events_read_total"), Some(30.0));
}

#[test]
fn registries_are_independent() {
    let a = Metrics::new().unwrap();
    let b = Metrics::new().unwrap();
    a.events_read.inc();
    assert_eq!(sample(&text(&b), "logtally_events_read_total"), Some(0.0));
}
