use super::*;
use crate::config::{Metric, MetricKind};

const T0: u64 = 1_764_300_000_000;

fn status() -> Status {
    Status::new("edge-1", Duration::from_secs(5), &[], T0)
}

fn ok_flush(at_ms: u64) -> FlushStatus {
    FlushStatus {
        at_ms,
        duration_seconds: 0.01,
        rows: 3,
        outcome: FlushOutcome::Ok,
        error: None,
    }
}

#[test]
fn not_ready_until_the_database_is_up_even_in_grace() {
    let mut s = status();
    assert_eq!(readiness(&s, T0 + 1), Err(NotReady::DatabaseDown(None)));
    s.record_database(T0 + 2, Ok(()));
    assert_eq!(readiness(&s, T0 + 2), Ok(()));
}

#[test]
fn grace_of_three_intervals_after_start() {
    let mut s = status();
    s.record_database(T0, Ok(()));
    assert_eq!(readiness(&s, T0 + 15_000), Ok(()));
    assert!(matches!(
        readiness(&s, T0 + 15_001),
        Err(NotReady::FlushStale { .. })
    ));
}

#[test]
fn a_committed_flush_keeps_ready_for_three_intervals() {
    let mut s = status();
    s.record_flush(ok_flush(T0 + 20_000));
    assert!(s.database.up, "a commit proves the database up");
    assert_eq!(readiness(&s, T0 + 35_000), Ok(()));
    let err = readiness(&s, T0 + 36_000).unwrap_err();
    assert_eq!(
        err,
        NotReady::FlushStale {
            since_seconds: 16.0,
            limit_seconds: 15.0
        }
    );
    assert_eq!(
        err.to_string(),
        "no successful flush for 16.0s (limit 15.0s)"
    );
}

#[test]
fn failed_flush_marks_the_database_down_with_its_error() {
    let mut s = status();
    s.record_flush(ok_flush(T0 + 1_000));
    s.record_flush(FlushStatus {
        at_ms: T0 + 6_000,
        duration_seconds: 0.5,
        rows: 0,
        outcome: FlushOutcome::Error,
        error: Some("connection refused".into()),
    });
    let err = readiness(&s, T0 + 6_001).unwrap_err();
    assert_eq!(err.to_string(), "database unreachable: connection refused");
    assert_eq!(s.last_ok_flush_ms, Some(T0 + 1_000));
    // Back up: ready again at once, because the last commit is still recent.
    s.record_database(T0 + 7_000, Ok(()));
    assert_eq!(readiness(&s, T0 + 7_000), Ok(()));
    assert_eq!(s.database.last_error.as_deref(), Some("connection refused"));
}

#[test]
fn clock_going_backwards_is_not_staleness() {
    let mut s = status();
    s.record_flush(ok_flush(T0 + 10_000));
    assert_eq!(readiness(&s, T0), Ok(()));
}

#[test]
fn lag_totals_and_json_shape() {
    let rule = Rule {
        filter: None,
        table: "ad_events_1m".into(),
        bucket: Duration::from_secs(60),
        group_by: vec!["ad".into(), "ev".into()],
        metrics: vec![
            Metric {
                filter: None,
                column: "events".into(),
                kind: MetricKind::Count,
            },
            Metric {
                filter: None,
                column: "bytes".into(),
                kind: MetricKind::Sum("bytes".into()),
            },
        ],
    };
    let mut s = Status::new("edge-1", Duration::from_millis(500), &[rule], T0);
    s.segments.insert(
        "a.seg".into(),
        SegmentStatus {
            read_offset: 90,
            committed_offset: 50,
            size_bytes: 100,
            lag_bytes: 50,
            lag_seconds: 2.0,
            ..Default::default()
        },
    );
    s.segments.insert(
        "b.seg".into(),
        SegmentStatus {
            size_bytes: 30,
            lag_bytes: 30,
            lag_seconds: 0.5,
            ..Default::default()
        },
    );
    s.recompute_lag();
    assert_eq!((s.lag_bytes, s.lag_seconds), (80, 2.0));
    s.record_flush(ok_flush(T0 + 1));
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["node"], "edge-1");
    assert_eq!(v["flush_interval_seconds"], 0.5);
    assert_eq!(v["segments"]["a.seg"]["committed_offset"], 50);
    assert_eq!(v["segments"]["a.seg"]["read_offset"], 90);
    assert_eq!(v["last_flush"]["outcome"], "ok");
    assert_eq!(v["last_flush"]["rows"], 3);
    assert_eq!(v["database"]["up"], true);
    assert_eq!(v["rules"][0]["table"], "ad_events_1m");
    assert_eq!(v["rules"][0]["bucket_seconds"], 60.0);
    assert_eq!(v["rules"][0]["group_by"], serde_json::json!(["ad", "ev"]));
    assert_eq!(
        v["rules"][0]["metrics"],
        serde_json::json!([
            {"column": "events", "aggregate": "count"},
            {"column": "bytes", "aggregate": "sum(bytes)"}
        ])
    );
}

#[test]
fn sync_segments_joins_read_and_committed_positions() {
    let mut s = status();
    let seg = |name: &str, offset, finished, size| tail::SegmentStatus {
        name: name.into(),
        position: Position { offset, finished },
        size,
        bad_header: false,
    };
    let read = [
        seg("1-1-000001.seg", 500, true, 500),
        seg("1-1-000002.seg", 300, false, 320),
    ];
    let committed: HashMap<String, Position> = [(
        "1-1-000001.seg".to_string(),
        Position {
            offset: 500,
            finished: true,
        },
    )]
    .into();
    let oldest: HashMap<String, u64> = [("1-1-000002.seg".to_string(), T0 - 2_500)].into();
    s.sync_segments(&read, &committed, &oldest, T0);
    let a = &s.segments["1-1-000001.seg"];
    assert_eq!(
        (a.read_offset, a.committed_offset, a.lag_bytes, a.sealed),
        (500, 500, 0, true)
    );
    let b = &s.segments["1-1-000002.seg"];
    assert_eq!(
        (b.read_offset, b.committed_offset, b.lag_bytes),
        (300, 0, 320)
    );
    assert_eq!(b.lag_seconds, 2.5);
    assert_eq!((s.lag_bytes, s.lag_seconds), (320, 2.5));
    // A deleted segment disappears from the view.
    s.sync_segments(&read[1..], &committed, &HashMap::new(), T0);
    assert_eq!(s.segments.len(), 1);
    assert_eq!(s.lag_seconds, 0.0);
}

#[test]
fn events_rate_is_per_second_and_bounded() {
    let mut s = status();
    s.sample_events(T0, 100, 0);
    assert!(s.events_per_second.is_empty(), "one sample is no rate yet");
    s.sample_events(T0 + 1_000, 150, 2);
    s.sample_events(T0 + 3_000, 250, 2);
    assert_eq!(s.events_per_second, [50.0, 50.0]);
    assert_eq!((s.events_read, s.decode_errors), (250, 2));
    for i in 0..RATE_SAMPLES as u64 {
        s.sample_events(T0 + 4_000 + i * 1_000, 250 + i * 7, 2);
    }
    assert_eq!(s.events_per_second.len(), RATE_SAMPLES);
    assert_eq!(s.events_per_second.back(), Some(&7.0));
}

#[test]
fn recent_flushes_keep_the_last_ten() {
    let mut s = status();
    for i in 0..15 {
        s.record_flush(ok_flush(T0 + i));
    }
    assert_eq!(s.recent_flushes.len(), RECENT_FLUSHES);
    assert_eq!(s.recent_flushes.front().unwrap().at_ms, T0 + 5);
    assert_eq!(s.recent_flushes.back(), s.last_flush.as_ref());
}

#[test]
fn top_keys_follow_the_config_and_opted_out_rules_stay_empty() {
    let text = r#"node = "n"
[[rule]]
table = "by_ua"
bucket = "1m"
group_by = ["ua"]
metrics = { bytes = "sum(n)", hits = "count" }
[[rule]]
table = "by_user"
bucket = "1m"
group_by = ["uid"]
metrics = { hits = "count" }
show_keys = false
"#;
    let config = crate::config::parse(std::path::Path::new("t.toml"), text).unwrap();
    assert_eq!(config.hide_keys, ["by_user"]);
    let mut s = Status::from_config(&config, T0);
    let key = |k: &str, v| TopKey {
        dims: vec![k.into()],
        value: v,
    };
    let top = RuleTop {
        bucket_ms: Some(T0 as i64),
        keys: (0..12).map(|i| key(&format!("k{i}"), 20 - i)).collect(),
    };
    s.set_top_keys(&[top.clone(), top]);
    let v = serde_json::to_value(&s).unwrap();
    let by_ua = &v["top_keys"][0];
    assert_eq!(by_ua["column"], "hits");
    assert_eq!(by_ua["shown"], true);
    assert_eq!(by_ua["keys"].as_array().unwrap().len(), TOP_KEYS_SHOWN);
    assert_eq!(
        by_ua["keys"][0],
        serde_json::json!({"dims": ["k0"], "value": 20})
    );
    let by_user = &v["top_keys"][1];
    assert_eq!(by_user["shown"], false);
    assert_eq!(by_user["keys"], serde_json::json!([]));
    assert_eq!(by_user["bucket_ms"], serde_json::Value::Null);
    assert!(v.get("events_sampled").is_none());
}

#[test]
fn shared_status_updates_are_visible_to_readers() {
    let shared = SharedStatus::new(status());
    let reader = shared.clone();
    shared.update(|s| s.record_database(T0, Ok(())));
    assert!(reader.snapshot().database.up);
    assert_eq!(reader.readiness(T0 + 1), Ok(()));
}
