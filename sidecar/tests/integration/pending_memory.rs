//! The run loop in-process against a real PostgreSQL: `max_pending_memory` pauses the
//! reader. The test holds the node's flush lock (the advisory lock every flush takes), so
//! nothing commits; keys with `quantiles` sketches fill the pending state until its
//! estimated bytes reach the bound, well before `max_pending_keys`; the reader stops there
//! with events left in the spool, having passed the bound by less than a quarter (a batch
//! drained for a flush that waits on the lock counts in it). Released, everything lands
//! exactly (truth: the counts the test wrote).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use logtally::config;
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_spool::{encode_event, SegmentWriter, SegmentWriterConfig};
use tokio_postgres::NoTls;

const EVENTS: u64 = 1_000_000;
const KEYS: u64 = 5_000;
const LIMIT: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_bound_pauses_the_reader_before_the_key_bound() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let text = format!(
        "spool_dir = \"{}\"\ndatabase_url = \"{url}\"\nnode = \"mem\"\nflush_interval = \"100ms\"\n\
         binlog = \"{}\"\nmax_pending_memory = \"1MiB\"\nmax_pending_keys = 10000000\n\
         [[rule]]\ntable = \"mem_1m\"\nbucket = \"1m\"\ngroup_by = [\"k\"]\n\
         metrics = {{ n = \"count\", rt = \"quantiles(rt)\" }}\n",
        spool.display(),
        dir.path().join("binlog").display()
    );
    let cfg = config::parse(Path::new("t.toml"), &text).unwrap();

    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut w = SegmentWriter::new(SegmentWriterConfig {
        dir: spool.clone(),
        fields: vec!["k".into(), "rt".into()],
        segment_size: 1 << 20,
        pid: 4_000_001, // no such process: sealed segments only
        fsync: false,
    })
    .unwrap();
    let mut buf = Vec::new();
    for i in 0..EVENTS {
        let k = format!("k{}", i % KEYS);
        // Spread over six decades: each key's sketch holds many buckets.
        let rt = format!("{}.{:03}", (i * 7919) % 100_000, i % 1000);
        encode_event(
            &mut buf,
            1_764_288_000_000,
            [Some(k.as_bytes()), Some(rt.as_bytes())],
        );
        *expected.entry(k).or_default() += 1;
        if i % 500 == 499 {
            w.append(&buf, 500, 0, 0).unwrap();
            buf.clear();
        }
    }
    w.seal(0).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(logtally::run::run(cfg, Some(listener), async move {
        let _ = stop_rx.await;
    }));
    let status = || async move {
        let text =
            tokio::task::spawn_blocking(move || http_get(admin, "/status").map(|r| r.text()))
                .await
                .unwrap()
                .unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default()
    };
    let metric = |name: &'static str| async move {
        let text =
            tokio::task::spawn_blocking(move || http_get(admin, "/metrics").map(|r| r.text()))
                .await
                .unwrap()
                .unwrap_or_default();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(-1.0)
    };

    // Once the reader runs (the checkpoint is read under the same lock), hold the node's
    // flush lock: from then on no flush can commit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric("logtally_events_read_total ").await <= 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reader never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (holder, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    holder
        .execute(
            "SELECT pg_advisory_lock(hashtextextended('logtally_checkpoint:' || $1, 0))",
            &[&"mem"],
        )
        .await
        .unwrap();

    // The reader reaches the memory bound and stops there.
    // (`/status` is refreshed by the run loop, which waits on the held lock: the gauges are
    // the reader's own.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if metric("logtally_pending_bytes ").await >= LIMIT as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached the bound"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A flush waiting on the lock may have taken one batch: it counts in the bound, and the
    // reader stops once the two together reach it. Wait until it has stopped.
    loop {
        let before = metric("logtally_events_read_total ").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if metric("logtally_events_read_total ").await == before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reader never paused"
        );
    }
    let paused = status().await;
    assert_eq!(
        paused["max_pending_bytes"].as_u64(),
        Some(LIMIT),
        "{paused:#}"
    );
    assert_eq!(paused["max_pending_keys"].as_u64(), Some(10_000_000));
    let keys = metric("logtally_pending_keys ").await;
    assert!((0.0..10_000_000.0).contains(&keys), "{keys}");
    // Paused: several status refreshes later it has read no further, with events left.
    let read = metric("logtally_events_read_total ").await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let bytes = metric("logtally_pending_bytes ").await;
        assert!(bytes >= LIMIT as f64, "{bytes}");
    }
    let read_later = metric("logtally_events_read_total ").await;
    let held = metric("logtally_pending_bytes ").await;
    assert!(
        held <= LIMIT as f64 * 1.25,
        "{held} bytes held for a bound of {LIMIT}: overshot by more than a quarter"
    );
    assert_eq!(
        read, read_later,
        "the reader went on past max_pending_memory"
    );
    assert!(
        read > 0.0 && read < EVENTS as f64,
        "read {read} of {EVENTS}"
    );
    eprintln!(
        "paused at {read} of {EVENTS} events, {keys} keys, {} pending bytes (bound {LIMIT})",
        metric("logtally_pending_bytes ").await
    );

    // Released: everything lands, exactly.
    holder
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended('logtally_checkpoint:' || $1, 0))",
            &[&"mem"],
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let got = loop {
        let got: BTreeMap<String, i64> = holder
            .query("SELECT k, n FROM mem_1m", &[])
            .await
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            .unwrap_or_default();
        if got == expected || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "counts differ after the release");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
