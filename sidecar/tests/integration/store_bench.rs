//! Benchmarks, run by hand (ignored by `cargo test`):
//!
//! ```text
//! cargo test --release -p logtally --test integration store_bench -- --ignored --nocapture --test-threads 1
//! ```
//!
//! - `flush_100k_rows`: one flush (one transaction: 100,000 aggregate rows of one rule plus
//!   the checkpoint) into a private PostgreSQL with fsync on; the median of several runs,
//!   first as fresh inserts, then as additive updates of the same keys. Target ≤ 1 s.
//! - `rss_per_pending_key`: the real `logtally` binary holding N pending keys (flush
//!   interval of an hour, so nothing leaves memory), its resident set size against N.
//!   Target ≤ 50 MiB + 200 B per pending key, the peak during the final flush included (the
//!   drained batch stays in the aggregator's compact form; rows exist a chunk at a time).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use logtally::aggregate::{Decimal, MetricValue, Row, RuleRows};
use logtally::config;
use logtally::db::{CheckpointEntry, Store};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_spool::{encode_event, SegmentWriter, SegmentWriterConfig};

const RULE: &str = r#"
[[rule]]
table = "ad_events_1m"
bucket = "1m"
group_by = ["ad", "ev", "cmp"]
metrics = { events = "count", bytes = "sum(bytes)", rt_max = "max(rt)" }
"#;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
async fn flush_100k_rows() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let text = format!("database_url = \"{url}\"\nnode = \"bench\"\n{RULE}");
    let cfg = config::parse(Path::new("bench.toml"), &text).unwrap();
    let mut store = Store::connect(&cfg).await.unwrap();
    const ROWS: usize = 100_000;
    let batch = |run: i64| -> Vec<RuleRows> {
        let rows = (0..ROWS)
            .map(|i| Row {
                bucket_ms: 1_764_288_000_000 + run * 60_000 + (i as i64 % 5) * 60_000_000,
                dims: vec![
                    format!("ad{}", i / 50),
                    format!("ev{}", i % 5),
                    format!("c{}", (i / 5) % 10),
                ],
                metrics: vec![
                    MetricValue::Count(3),
                    MetricValue::Decimal(Some(Decimal(1_234_500_000_000 + i as i128))),
                    MetricValue::Decimal(Some(Decimal(250_000_000))),
                ],
            })
            .collect();
        vec![RuleRows { rule: 0, rows }]
    };
    let mut previous: HashMap<String, CheckpointEntry> = HashMap::new();
    let mut inserts = Vec::new();
    let mut updates = Vec::new();
    for run in 0..10u64 {
        // Five flushes of new keys, then five adding to the keys of the first.
        let rules = batch(if run < 5 { run as i64 } else { 0 });
        let pos: Vec<CheckpointEntry> = ["1-1-000001.seg", "1-2-000001.seg"]
            .iter()
            .map(|s| CheckpointEntry {
                segment: s.to_string(),
                offset: (run + 1) * 1000,
                finished: false,
            })
            .collect();
        let t = Instant::now();
        store.flush(&rules, &pos, &previous).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        if run < 5 {
            inserts.push(secs)
        } else {
            updates.push(secs)
        }
        previous = pos.into_iter().map(|p| (p.segment.clone(), p)).collect();
    }
    println!("flush of {ROWS} rows + checkpoint, fsync on:");
    println!(
        "  new keys:      median {:.3} s  runs {inserts:.3?}",
        median(inserts.clone())
    );
    println!(
        "  existing keys: median {:.3} s  runs {updates:.3?}",
        median(updates.clone())
    );
}

pub(crate) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

pub(crate) fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let body = http_get(addr, "/metrics").ok()?.text();
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
async fn rss_per_pending_key() {
    let pg = TestPostgres::start();
    println!("pending keys → sidecar RSS (target 50 MiB + 200 B/key):");
    let mut base_kib = None;
    for keys in [0usize, 100_000, 500_000, 1_000_000] {
        let url = pg.create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let mut w = SegmentWriter::new(SegmentWriterConfig {
            dir: spool.clone(),
            fields: vec![
                "ad".into(),
                "ev".into(),
                "cmp".into(),
                "bytes".into(),
                "rt".into(),
            ],
            segment_size: 64 << 20,
            pid: 4_000_000,
            fsync: false,
        })
        .unwrap();
        let mut buf = Vec::new();
        for i in 0..keys.max(1) {
            let (ad, ev, cmp) = (
                format!("ad{}", i / 50),
                format!("ev{}", i % 5),
                format!("c{}", (i / 5) % 10),
            );
            encode_event(
                &mut buf,
                1_764_288_000_000,
                [
                    Some(ad.as_bytes()),
                    Some(ev.as_bytes()),
                    Some(cmp.as_bytes()),
                    Some(&b"1234"[..]),
                    Some(&b"0.25"[..]),
                ],
            );
            if buf.len() > 1 << 20 {
                w.append(&buf, 1, 0, 0).unwrap();
                buf.clear();
            }
        }
        w.append(&buf, 1, 0, 0).unwrap();
        w.seal(0).unwrap();
        let (listen, child) = start_holding_sidecar(dir.path(), &spool, &url, RULE);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pending = metric(listen, "logtally_pending_keys").unwrap_or(-1.0);
            if pending >= keys as f64 || Instant::now() > deadline {
                assert!(
                    pending >= keys as f64,
                    "pending keys {pending} never reached {keys}"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = rss_kib(child.0.id());
        let budget_kib = 50 * 1024 + (keys as u64 * 200) / 1024;
        println!(
            "  {keys:>9} keys: RSS {:>7.1} MiB (budget {:>6.1} MiB){}",
            rss as f64 / 1024.0,
            budget_kib as f64 / 1024.0,
            match base_kib {
                Some(b) if keys > 0 => format!(
                    ", {:.0} B/key over the 0-key run",
                    (rss.saturating_sub(b) * 1024) as f64 / keys as f64
                ),
                _ => String::new(),
            }
        );
        base_kib.get_or_insert(rss);
        // SIGTERM makes the final flush: drained rows and query parameters exist next to
        // the aggregator for a moment. The peak (VmHWM) read just before the exit shows it.
        let mut child = child;
        let pid = child.0.id();
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        let mut peak = 0;
        while child.0.try_wait().unwrap().is_none() {
            if let Some(hwm) = proc_status_kib(pid, "VmHWM:") {
                peak = hwm;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "  {:>9}       peak during the final flush: {:>7.1} MiB",
            "",
            peak as f64 / 1024.0
        );
        drop(child);
    }
}

pub(crate) struct KillOnDrop(pub(crate) std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary on `spool` with a flush interval of an hour (what it reads stays
/// pending), its admin server on a free port. Killed on drop, a failed assertion too.
pub(crate) fn start_holding_sidecar(
    dir: &std::path::Path,
    spool: &std::path::Path,
    url: &str,
    rule: &str,
) -> (std::net::SocketAddr, KillOnDrop) {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg_path = dir.join("logtally.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "spool_dir = \"{}\"\ndatabase_url = \"{url}\"\nnode = \"rss\"\nflush_interval = \"1h\"\n\
             listen = \"{listen}\"\nbinlog = \"{}\"\nmax_pending_keys = 10000000\n{rule}",
            spool.display(),
            dir.join("binlog").display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_logtally"))
        .args(["run", "-c"])
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (listen, KillOnDrop(child))
}
