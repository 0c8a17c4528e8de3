//! Benchmarks of the issue-12 rule (count, two conditional counts, `distinct(uid)`,
//! `quantiles(rt)`), run by hand (ignored by `cargo test`):
//!
//! ```text
//! cargo test --release -p logtally --test integration store_bench_sketches -- --ignored --nocapture --test-threads 1
//! ```
//!
//! - `flush_100k_sketch_rows`: one flush of 100,000 such rows (each key saw 5 events: an
//!   explicit hll of 5 hashes, a quantile sketch of up to 5 buckets) plus the checkpoint into a
//!   private PostgreSQL with `hll`, fsync on; medians of fresh inserts and of merges into the
//!   same keys (`hll_union`, `logtally_quantiles_add` in the upsert).
//! - `rss_per_pending_sketch_key`: the real `logtally` binary holding N such keys pending
//!   (flush interval of an hour), its resident set size against N, and the peak during the
//!   final flush.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use logtally::aggregate::Aggregator;
use logtally::config;
use logtally::db::{CheckpointEntry, Store};
use logtally_e2e::postgres::TestPostgres;
use logtally_spool::{
    decode_frame, encode_event, Decoded, Frame, SegmentWriter, SegmentWriterConfig,
};

use crate::store_bench::{median, metric, proc_status_kib, rss_kib, start_holding_sidecar};

const RULE: &str = r#"
[[rule]]
table = "ad_reach_1m"
bucket = "1m"
group_by = ["ad", "cmp"]
metrics = { events = "count", views = "count where ev = 'view'", clicks = "count where ev = 'click'", reach = "distinct(uid)", rt = "quantiles(rt)" }
"#;

const FIELDS: [&str; 4] = ["ad", "cmp", "ev", "uid"];
const EVENTS_PER_KEY: usize = 5;

/// The `j`-th event of key `i`: (ad, cmp, ev, uid, rt) as field values.
fn event(i: usize, j: usize) -> [String; 5] {
    let r = (i as u64 * 31 + j as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(17);
    [
        format!("ad{}", i / 10),
        format!("c{}", i % 10),
        ["view", "view", "click", "other"][(r % 4) as usize].to_string(),
        format!("u{}", r % 1_000_000),
        format!("0.{:03}", 1 + (r >> 20) % 999),
    ]
}

fn fields() -> Vec<String> {
    FIELDS
        .iter()
        .chain(&["rt"])
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
async fn flush_100k_sketch_rows() {
    let pg = TestPostgres::start();
    let url = pg.create_database_with_hll().await;
    let text = format!("database_url = \"{url}\"\nnode = \"bench\"\n{RULE}");
    let cfg = config::parse(Path::new("bench.toml"), &text).unwrap();
    let mut store = Store::connect(&cfg).await.unwrap();
    const ROWS: usize = 100_000;
    let header = fields();
    // The events of every key, encoded once.
    let mut frames = Vec::new();
    for i in 0..ROWS {
        for j in 0..EVENTS_PER_KEY {
            let mut buf = Vec::new();
            let e = event(i, j);
            encode_event(&mut buf, 0, e.iter().map(|v| Some(v.as_bytes())));
            frames.push(buf);
        }
    }
    let mut previous: HashMap<String, CheckpointEntry> = HashMap::new();
    let (mut inserts, mut updates) = (Vec::new(), Vec::new());
    for run in 0..8u64 {
        // Four flushes of new keys (new buckets), then four merging into the first's keys.
        let minute = if run < 4 { run } else { 0 };
        let mut agg = Aggregator::new(&cfg.rules);
        let layout = agg.layout(&header);
        for f in &frames {
            let Decoded::Frame {
                frame: Frame::Event(mut r),
                ..
            } = decode_frame(f)
            else {
                panic!("undecodable");
            };
            r.time_ms = 1_764_288_000_000 + minute * 60_000;
            agg.add(&layout, &r);
        }
        let rows = agg.drain_compact();
        let pos = vec![CheckpointEntry {
            segment: "1-1-000001.seg".into(),
            offset: (run + 1) * 1000,
            finished: false,
        }];
        let t = Instant::now();
        store.flush(&rows, &pos, &previous).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        if run < 4 {
            inserts.push(secs)
        } else {
            updates.push(secs)
        }
        previous = pos.into_iter().map(|p| (p.segment.clone(), p)).collect();
    }
    println!(
        "flush of {ROWS} rows with count, 2 conditional counts, distinct, quantiles \
         ({EVENTS_PER_KEY} events a key) + checkpoint, fsync on:"
    );
    println!(
        "  new keys:      median {:.3} s  runs {inserts:.3?}",
        median(inserts.clone())
    );
    println!(
        "  existing keys: median {:.3} s  runs {updates:.3?}",
        median(updates.clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
async fn rss_per_pending_sketch_key() {
    let pg = TestPostgres::start();
    println!("pending keys with sketches ({EVENTS_PER_KEY} events a key) → sidecar RSS:");
    let mut base_kib = None;
    for keys in [0usize, 100_000, 300_000] {
        let url = pg.create_database_with_hll().await;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let mut w = SegmentWriter::new(SegmentWriterConfig {
            dir: spool.clone(),
            fields: fields(),
            segment_size: 256 << 20,
            pid: 4_000_000,
            fsync: false,
        })
        .unwrap();
        let mut buf = Vec::new();
        for i in 0..keys.max(1) {
            for j in 0..EVENTS_PER_KEY {
                let e = event(i, j);
                encode_event(
                    &mut buf,
                    1_764_288_000_000,
                    e.iter().map(|v| Some(v.as_bytes())),
                );
            }
            if buf.len() > 1 << 20 {
                w.append(&buf, 1, 0, 0).unwrap();
                buf.clear();
            }
        }
        w.append(&buf, 1, 0, 0).unwrap();
        w.seal(0).unwrap();
        let (listen, child) = start_holding_sidecar(dir.path(), &spool, &url, RULE);
        let deadline = Instant::now() + Duration::from_secs(180);
        let want = (keys.max(1) * EVENTS_PER_KEY) as f64;
        loop {
            let read = metric(listen, "logtally_events_read_total").unwrap_or(-1.0);
            let pending = metric(listen, "logtally_pending_keys").unwrap_or(-1.0);
            if (read >= want && pending >= keys as f64) || Instant::now() > deadline {
                assert!(
                    read >= want && pending >= keys as f64,
                    "read {read} of {want} events, {pending} of {keys} keys pending"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = rss_kib(child.0.id());
        println!(
            "  {keys:>9} keys: RSS {:>7.1} MiB{}",
            rss as f64 / 1024.0,
            match base_kib {
                Some(b) if keys > 0 => format!(
                    ", {:.0} B/key over the 0-key run",
                    (rss.saturating_sub(b) * 1024) as f64 / keys as f64
                ),
                _ => String::new(),
            }
        );
        base_kib.get_or_insert(rss);
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
    }
}
