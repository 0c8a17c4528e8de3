//! Segments the test writes itself, read by the real sidecar binary into a real PostgreSQL
//! (no nginx): what the sidecar does with input nginx would not normally write.
//!
//! - a segment the reader cannot read (bad header) raises the lag while the rest commits;
//! - event times the database cannot store (past year 9999, "negative" as a signed time)
//!   are counted and skipped;
//!
//! Truth: the events the test wrote.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};
use logtally_spool::{encode_event, encode_header, segment_file_name, SegmentHeader};

use super::faults::{sidecar_metric, wait_for};

/// A spool folder and a sidecar on it, without nginx (segments written by the test).
fn bare_site(db: &Db) -> (tempfile::TempDir, PathBuf, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let listen = free_addr();
    let config = dir.path().join("logtally.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\ndatabase_url = \"{}\"\nnode = \"bare\"\nflush_interval = \"200ms\"\n\
             listen = \"{listen}\"\nbinlog = \"{}\"\n\n[[rule]]\ntable = \"hits\"\nbucket = \"1h\"\n\
             group_by = [\"ad\"]\nmetrics = {{ events = \"count\" }}\n",
            spool.display(),
            db.url(),
            dir.path().join("binlog").display()
        ),
    )
    .unwrap();
    (dir, config, listen)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A finished (dead writer: no lock held) segment holding one event per time, `ad` = "a".
fn write_segment(spool: &Path, seq: u64, times: &[u64]) -> PathBuf {
    let header = SegmentHeader {
        writer_pid: 1,
        created_ms: now_ms(),
        fields: vec!["ad".to_string()],
    };
    let mut bytes = Vec::new();
    encode_header(&header, &mut bytes).unwrap();
    for &t in times {
        encode_event(&mut bytes, t, [Some(&b"a"[..])]);
    }
    let path = spool.join(segment_file_name(header.created_ms, 1, seq));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn stored_bare(db: &Db) -> i64 {
    db.query("SELECT coalesce(sum(events), 0)::bigint FROM hits")
        .ok()
        .and_then(|rows| rows.first().map(|r| r.get(0)))
        .unwrap_or(-1)
}

#[test]
fn an_unreadable_segment_raises_the_lag_until_it_is_gone() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let (dir, config, listen) = bare_site(&db);
    let spool = dir.path().join("spool");
    let log = dir.path().join("logtally.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let sidecar = TestSidecar::start(&config, &log, listen);
    write_segment(&spool, 1, &[now_ms(); 100]);
    // A segment whose header is damaged: the reader leaves it for an operator, unread.
    let bad = spool.join(segment_file_name(now_ms(), 1, 2));
    std::fs::write(&bad, b"LTSPOOL\0 this is not a header at all").unwrap();
    wait_for(
        Duration::from_secs(30),
        "the good segment stored",
        logs,
        || stored_bare(&db) == 100,
    );
    wait_for(Duration::from_secs(30), "the lag to pass 5 s", logs, || {
        sidecar_metric(listen, "logtally_lag_seconds").unwrap_or(0.0) >= 5.0
    });
    std::fs::remove_file(&bad).unwrap();
    wait_for(Duration::from_secs(10), "the lag to fall", logs, || {
        sidecar_metric(listen, "logtally_lag_seconds").is_some_and(|l| l < 2.0)
    });
    assert_eq!(stored_bare(&db), 100);
    assert!(sidecar.terminate().success());
}

#[test]
fn event_times_the_database_cannot_store_are_counted_and_skipped() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let (dir, config, listen) = bare_site(&db);
    let spool = dir.path().join("spool");
    let log = dir.path().join("logtally.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let now = now_ms();
    // Year 10000 (one past PostgreSQL's timestamptz), far future, and times that are
    // negative read as signed 64-bit numbers; 50 good events around them.
    let bad = [
        253_402_300_800_000,
        1 << 62,
        1 << 63,
        u64::MAX,
        u64::MAX - 1,
    ];
    let mut times = vec![now; 50];
    for (i, t) in bad.iter().enumerate() {
        times.insert(i * 10, *t);
    }
    write_segment(&spool, 1, &times);
    let sidecar = TestSidecar::start(&config, &log, listen);
    wait_for(
        Duration::from_secs(30),
        "the bad times counted",
        logs,
        || sidecar_metric(listen, "logtally_bad_time_events_total") == Some(bad.len() as f64),
    );
    wait_for(
        Duration::from_secs(30),
        "the good events stored",
        logs,
        || stored_bare(&db) == 50,
    );
    assert_eq!(
        sidecar_metric(listen, "logtally_events_read_total"),
        Some(55.0)
    );
    // Nothing in a bucket of a bad time.
    let buckets = db
        .query("SELECT count(DISTINCT bucket)::bigint FROM hits")
        .unwrap()[0]
        .get::<_, i64>(0);
    assert_eq!(buckets, 1);
    assert!(sidecar.terminate().success(), "{}", logs());
}
