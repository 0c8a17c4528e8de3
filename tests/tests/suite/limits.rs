//! `max_keys` and `retention` end to end: real nginx with the module, the real `logtally`
//! binary, a real PostgreSQL.
//!
//! - overflow: 10× `max_keys` distinct keys from one node give `max_keys` rows and one
//!   `__other__` row in the bucket, the sum of counts is every request sent, and after a
//!   `kill -9` of the sidecar mid-bucket (events read but maybe not committed) the restarted
//!   sidecar admits no new key: the admitted set came back from the database;
//! - retention: rows the test inserted before the cutoff are deleted by the sidecar, rows
//!   inside stay, and events the test wrote into a spool segment with old times are counted
//!   as expired and not written (the module stamps the time itself, so old times come from
//!   a hand-written segment), while a late event inside retention lands in its old bucket.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use logtally_e2e::edge::NGINX_BODY;
use logtally_e2e::nginx::{HttpClient, TestNginx};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};
use logtally_spool::{encode_event, SegmentWriter, SegmentWriterConfig};

const MAX_KEYS: u32 = 20;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn config(dir: &Path, spool: &Path, url: &str, listen: std::net::SocketAddr, rule: &str) -> String {
    format!(
        "spool_dir = \"{spool}\"\ndatabase_url = \"{url}\"\nnode = \"edge-1\"\n\
         flush_interval = \"300ms\"\nlisten = \"{listen}\"\nbinlog = \"{binlog}\"\n{rule}",
        spool = spool.display(),
        binlog = dir.join("binlog").display(),
    )
}

fn wait_until(
    limit: Duration,
    what: &str,
    logs: &dyn Fn() -> String,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}\n{}", logs());
}

fn scalar(db: &Db, sql: &str) -> i64 {
    db.query(sql)
        .ok()
        .and_then(|rows| {
            rows.first()
                .map(|r| r.get::<_, Option<i64>>(0).unwrap_or(0))
        })
        .unwrap_or(-1)
}

fn send(addr: std::net::SocketAddr, ads: impl IntoIterator<Item = u32>) -> i64 {
    let mut client = HttpClient::new(addr);
    let mut n = 0;
    for ad in ads {
        let target = format!("/e?ad={ad}&ev=view&n=1");
        let resp = client.get(target.as_bytes(), &[]).unwrap();
        assert_eq!(resp.status, 204, "{target}");
        n += 1;
    }
    n
}

/// Per bucket: (rows besides the overflow row, overflow events, all events).
fn buckets(db: &Db) -> Vec<(i64, i64, i64)> {
    db.query(
        "SELECT count(*) FILTER (WHERE ad <> '__other__'), \
         coalesce(sum(events) FILTER (WHERE ad = '__other__'), 0)::int8, sum(events)::int8 \
         FROM ad_capped GROUP BY bucket ORDER BY bucket",
    )
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[test]
fn overflow_keeps_max_keys_rows_per_bucket_and_the_admitted_set_survives_kill9() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let nginx = TestNginx::start(NGINX_BODY, 1);
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let rule = format!(
        "[[rule]]\ntable = \"ad_capped\"\nbucket = \"1d\"\ngroup_by = [\"ad\"]\n\
         max_keys = {MAX_KEYS}\nmetrics = {{ events = \"count\" }}\n"
    );
    let cfg = dir.path().join("logtally.toml");
    std::fs::write(
        &cfg,
        config(
            dir.path(),
            &nginx.dir().join("spool"),
            db.url(),
            listen,
            &rule,
        ),
    )
    .unwrap();
    let log = dir.path().join("logtally.log");
    let mut sidecar = TestSidecar::start(&cfg, &log, listen);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let total = |db: &Db| scalar(db, "SELECT sum(events)::int8 FROM ad_capped");

    // One worker, one client: the spool holds the requests in the order sent, so the keys
    // admitted are the first MAX_KEYS distinct ads: 0..MAX_KEYS.
    let keys = 10 * MAX_KEYS;
    let mut sent = send(nginx.addr(), 0..keys / 2);
    wait_until(
        Duration::from_secs(60),
        "the first half committed",
        &logs,
        || total(&db) == sent,
    );
    // Mid-bucket: more new keys, and kill -9 while they may be read but not committed.
    sent += send(nginx.addr(), keys / 2..keys * 3 / 4);
    sidecar.kill9_and_restart();
    sent += send(nginx.addr(), keys * 3 / 4..keys);
    sent += send(nginx.addr(), 0..keys);
    wait_until(
        Duration::from_secs(60),
        "every request committed",
        &logs,
        || total(&db) == sent,
    );

    let b = buckets(&db);
    if b.len() != 1 {
        // The requests straddled 00:00 UTC: each bucket is bounded, the total is exact.
        eprintln!("the test crossed a day boundary: checking the bound per bucket only");
        for (rows, _, _) in &b {
            assert!(*rows <= i64::from(MAX_KEYS), "{b:?}");
        }
        return;
    }
    let first_keys: Vec<String> = db
        .query("SELECT ad FROM ad_capped WHERE ad <> '__other__' ORDER BY ad::int")
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<String> = (0..MAX_KEYS).map(|k| k.to_string()).collect();
    assert_eq!(
        first_keys, want,
        "no key admitted after the restart beyond the first ones"
    );
    // Each admitted key was sent twice; everything else is the overflow row.
    let admitted_events = 2 * i64::from(MAX_KEYS);
    assert_eq!(b, vec![(i64::from(MAX_KEYS), sent - admitted_events, sent)]);

    // The restarted sidecar counted at least the overflow events sent after the restart
    // (events read again after the kill may count once more).
    let after_restart = i64::from(keys / 4) + i64::from(keys - MAX_KEYS);
    let metric_now = || {
        sidecar
            .metric("logtally_overflow_events_total")
            .unwrap_or(0.0) as i64
    };
    wait_until(
        Duration::from_secs(30),
        "the overflow counter",
        &logs,
        || metric_now() >= after_restart,
    );
    assert!(
        metric_now() <= after_restart + i64::from(keys / 4),
        "{}",
        metric_now()
    );
    let status: serde_json::Value =
        serde_json::from_str(&http_get(listen, "/status").unwrap().text()).unwrap();
    let limits = &status["limits"][0];
    assert_eq!(limits["table"], "ad_capped");
    assert_eq!(limits["max_keys"], MAX_KEYS);
    assert_eq!(limits["overflow_label"], "__other__");
    assert!(
        limits["overflow_events"].as_i64().unwrap() >= after_restart,
        "{limits}"
    );
    // The admitted keys live in the database, one row per bucket and flush.
    assert_eq!(
        scalar(
            &db,
            "SELECT sum(length(hashes) / 8)::int8 FROM logtally_admitted_keys \
             WHERE node = 'edge-1' AND tbl = 'ad_capped'"
        ),
        i64::from(MAX_KEYS)
    );
}

#[test]
fn retention_deletes_old_rows_keeps_recent_ones_and_counts_expired_events() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let listen = free_addr();
    let rule = "[[rule]]\ntable = \"hits_1h\"\nbucket = \"1h\"\ngroup_by = [\"ad\"]\n\
                retention = \"2d\"\nmetrics = { events = \"count\" }\n";
    // The table exists before the sidecar starts (the shape it creates), holding rows ten
    // days old (past retention) and one day old (inside).
    db.execute(
        "CREATE TABLE hits_1h (bucket timestamptz NOT NULL, ad text NOT NULL, \
         events bigint NOT NULL, PRIMARY KEY (bucket, ad)); \
         INSERT INTO hits_1h SELECT date_trunc('hour', now()) - interval '10 days' \
         - (i % 24) * interval '1 hour', 'old' || i, 1 FROM generate_series(1, 12000) i; \
         INSERT INTO hits_1h SELECT date_trunc('hour', now()) - interval '1 day', \
         'recent' || i, 1 FROM generate_series(1, 50) i;",
    );
    // Events with times the module would never write now: 30 three days old (expired),
    // 7 from a day ago (late, inside retention), 5 from now.
    let now = now_ms() as u64;
    let mut w = SegmentWriter::new(SegmentWriterConfig {
        dir: spool.clone(),
        fields: vec!["ad".into()],
        segment_size: u64::MAX,
        pid: std::process::id(),
        fsync: false,
    })
    .unwrap();
    let mut buf = Vec::new();
    let mut n = 0;
    for (age_ms, count, ad) in [
        (3 * 86_400_000u64, 30, "expired"),
        (86_400_000, 7, "late"),
        (0, 5, "now"),
    ] {
        for _ in 0..count {
            encode_event(&mut buf, now - age_ms, [Some(ad.as_bytes())]);
            n += 1;
        }
    }
    w.append(&buf, n, 0, now).unwrap();
    w.seal(now).unwrap();

    let cfg = dir.path().join("logtally.toml");
    std::fs::write(&cfg, config(dir.path(), &spool, db.url(), listen, rule)).unwrap();
    let log = dir.path().join("logtally.log");
    let sidecar = TestSidecar::start(&cfg, &log, listen);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    wait_until(Duration::from_secs(60), "old rows deleted", &logs, || {
        scalar(&db, "SELECT count(*) FROM hits_1h WHERE ad LIKE 'old%'") == 0
    });
    wait_until(
        Duration::from_secs(60),
        "the segment's events committed",
        &logs,
        || {
            scalar(
                &db,
                "SELECT sum(events)::int8 FROM hits_1h WHERE ad IN ('late', 'now')",
            ) == 12
        },
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM hits_1h WHERE ad LIKE 'recent%'"),
        50,
        "rows inside retention stay"
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM hits_1h WHERE ad = 'expired'"),
        0,
        "expired events are not written"
    );
    // The late events added to their own bucket, a day back.
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM hits_1h WHERE ad = 'late' AND bucket < now() - interval '23 hours'"
        ),
        1
    );
    assert_eq!(sidecar.metric("logtally_expired_events_total"), Some(30.0));
    assert_eq!(
        sidecar.metric("logtally_retention_deleted_rows_total"),
        Some(12_000.0)
    );
    let status: serde_json::Value =
        serde_json::from_str(&http_get(listen, "/status").unwrap().text()).unwrap();
    let limits = &status["limits"][0];
    assert_eq!(limits["retention_seconds"], 2.0 * 86_400.0);
    assert_eq!(limits["expired_events"], 30);
    assert_eq!(limits["retention"]["deleted_rows"], 12_000);
    assert!(
        limits["retention"]["last_run_ms"].as_u64().is_some(),
        "{limits}"
    );
}
