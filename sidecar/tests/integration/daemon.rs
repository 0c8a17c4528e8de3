//! The run loop in-process against a real PostgreSQL: a spool in, exact aggregates out, a
//! clean shutdown, segments and checkpoint rows cleaned up, the binlog written.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use logtally::binlog;
use logtally::config;
use logtally_e2e::postgres::TestPostgres;
use logtally_spool::{encode_event, SegmentWriter, SegmentWriterConfig};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_to_table_exactly_then_clean_shutdown() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let binlog_path = dir.path().join("state/binlog");
    let text = format!(
        r#"
spool_dir = "{}"
database_url = "{url}"
node = "n1"
flush_interval = "100ms"
binlog = "{}"
[[rule]]
table = "hits"
bucket = "1m"
group_by = ["ad"]
metrics = {{ n = "count", rt = "sum(rt)", rt_min = "min(rt)" }}
"#,
        spool.display(),
        binlog_path.display()
    );
    let cfg = config::parse(Path::new("t.toml"), &text).unwrap();

    // Expected: per (minute, ad) the count and the rt sum in thousandths.
    let mut expected: BTreeMap<(i64, String), (i64, i64)> = BTreeMap::new();
    let mut w = SegmentWriter::new(SegmentWriterConfig {
        dir: spool.clone(),
        fields: vec!["ad".into(), "rt".into()],
        segment_size: 200_000,
        pid: 4_000_000, // no such process: only sealed segments are written
        fsync: false,
    })
    .unwrap();
    let mut buf = Vec::new();
    for i in 0..20_000u64 {
        let ad = format!("a{}", i % 13);
        let rt = format!("0.{:03}", i % 1000);
        let t = 1_764_288_000_000 + i * 17;
        encode_event(&mut buf, t, [Some(ad.as_bytes()), Some(rt.as_bytes())]);
        let e = expected
            .entry(((t / 60_000 * 60_000) as i64, ad))
            .or_default();
        e.0 += 1;
        e.1 += (i % 1000) as i64;
        if i % 500 == 499 {
            w.append(&buf, 500, 0, 0).unwrap();
            buf.clear();
        }
    }
    w.seal(0).unwrap();
    let segments = std::fs::read_dir(&spool).unwrap().count();
    assert!(
        segments > 1,
        "the test wants several segments, got {segments}"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(logtally::run::run(cfg, Some(listener), async move {
        let _ = stop_rx.await;
    }));

    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let got = loop {
        let rows = client
            .query(
                "SELECT (extract(epoch FROM bucket) * 1000)::bigint, ad, n, (rt * 1000)::bigint \
                 FROM hits",
                &[],
            )
            .await;
        let got: BTreeMap<(i64, String), (i64, i64)> = rows
            .map(|rows| {
                rows.into_iter()
                    .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
                    .collect()
            })
            .unwrap_or_default();
        let spool_empty = no_segments(&spool);
        if (got == expected && spool_empty) || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got, expected);
    assert!(no_segments(&spool), "committed sealed segments are deleted");
    // The configured node, stored once in the spool folder.
    let stored = logtally::spool::node::stored(&spool).unwrap();
    assert_eq!(stored.as_deref(), Some("n1"));

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let cp = client
        .query("SELECT segment FROM logtally_checkpoint", &[])
        .await
        .unwrap();
    assert!(
        cp.is_empty(),
        "checkpoint rows of deleted segments are deleted"
    );
    let records = binlog::read(&binlog_path, true).unwrap();
    assert!(!records.is_empty());
    assert!(records.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let finished: usize = records
        .iter()
        .flat_map(|r| &r.segments)
        .filter(|s| s.finished)
        .count();
    assert!(
        finished >= segments,
        "every segment was committed finished: {records:?}"
    );
}

/// No segment file left in `dir` (the node id file stays).
fn no_segments(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().all(|e| {
        let name = e.unwrap().file_name();
        !logtally_spool::is_segment_file_name(&name.to_string_lossy())
    })
}
