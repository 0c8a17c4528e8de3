//! The real `logtally` binary against a real PostgreSQL: exact totals while segments grow,
//! across `kill -9`s and a database outage, past corruption and torn tails; `check` and
//! `run` refusing bad configurations and mismatched tables.
//!
//! The binary is `$LOGTALLY_BIN`, else the newest of `target/{release,debug}/logtally`
//! (build it first: `cargo build --release -p logtally`; `scripts/test.sh` does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use logtally_e2e::prometheus::http_get;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};
use logtally_spool::{
    encode_event, encode_header, segment_file_name, SegmentHeader, SegmentWriter,
    SegmentWriterConfig,
};
use rand::{Rng, SeedableRng};

mod config;
mod database_faults;
mod ingest;

pub(crate) use database_faults::CommitCutter;

const FIELDS: [&str; 3] = ["ad", "ev", "bytes"];
/// 2025-11-28T00:00:00Z: event times start here.
const T0: u64 = 1_764_288_000_000;

/// `(bucket ms, ad, ev) → (events, bytes in hundredths)` as the table holds them.
fn totals(db: &Db) -> Result<Totals, tokio_postgres::Error> {
    let rows = db.query(
        "SELECT (extract(epoch FROM bucket) * 1000)::bigint, ad, ev, events, \
         (bytes * 100)::bigint FROM ad_events_1m",
    )?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), (r.get(3), r.get(4))))
        .collect())
}

type Totals = BTreeMap<(i64, String, String), (i64, i64)>;

/// Events of the test workload and the totals they must add up to.
struct Workload {
    rng: rand::rngs::StdRng,
    expected: Totals,
    written: u64,
}

impl Workload {
    fn new(seed: u64) -> Workload {
        Workload {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            expected: Totals::new(),
            written: 0,
        }
    }

    /// Appends `n` random events to `out` (encoded frames); `count` says whether they must be
    /// in the totals (false for records the test will damage).
    fn encode(&mut self, out: &mut Vec<u8>, n: usize, count: bool) {
        for _ in 0..n {
            let ad = format!("ad{}", self.rng.gen_range(0..40));
            let ev = ["view", "click", "conv"][self.rng.gen_range(0..3)].to_string();
            let hundredths: i64 = self.rng.gen_range(0..1_000_000);
            let bytes = if hundredths % 7 == 0 {
                format!("{}.{:02}", hundredths / 100, hundredths % 100)
            } else {
                // Mostly whole numbers, as nginx's $body_bytes_sent.
                format!("{}", hundredths / 100)
            };
            let value = if bytes.contains('.') {
                hundredths
            } else {
                (hundredths / 100) * 100
            };
            let time = T0 + self.rng.gen_range(0..300_000u64);
            encode_event(
                out,
                time,
                [
                    Some(ad.as_bytes()),
                    Some(ev.as_bytes()),
                    Some(bytes.as_bytes()),
                ],
            );
            if count {
                let bucket = (time / 60_000 * 60_000) as i64;
                let e = self.expected.entry((bucket, ad, ev)).or_default();
                e.0 += 1;
                e.1 += value;
                self.written += 1;
            }
        }
    }

    fn total_events(&self) -> i64 {
        self.expected.values().map(|v| v.0).sum()
    }
}

/// A live process whose pid marks a segment's writer as alive.
struct FakeWriter(Child);

impl FakeWriter {
    fn start() -> FakeWriter {
        FakeWriter(
            Command::new("sleep")
                .arg("3600")
                .spawn()
                .expect("spawn sleep"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for FakeWriter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn writer(dir: &Path, pid: u32) -> SegmentWriter {
    SegmentWriter::new(SegmentWriterConfig {
        dir: dir.to_path_buf(),
        fields: FIELDS.iter().map(|s| s.to_string()).collect(),
        segment_size: u64::MAX,
        pid,
        fsync: false,
    })
    .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Writes `batches` batches of `per_batch` events into `w`, `pause` apart, then seals.
fn write_segment(
    w: &mut SegmentWriter,
    load: &mut Workload,
    batches: usize,
    per_batch: usize,
    pause: Duration,
) {
    let mut buf = Vec::new();
    for _ in 0..batches {
        buf.clear();
        load.encode(&mut buf, per_batch, true);
        w.append(&buf, per_batch as u64, 0, now_ms()).unwrap();
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    w.seal(now_ms()).unwrap();
}

/// A test's folder: spool, config, binlog, logs.
struct Site {
    dir: tempfile::TempDir,
    spool: PathBuf,
    listen: SocketAddr,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        Site {
            dir,
            spool,
            listen: free_addr(),
        }
    }

    fn config_with(&self, url: &str, extra: &str, rule: &str) -> PathBuf {
        let path = self.dir.path().join("logtally.toml");
        let text = format!(
            "spool_dir = \"{}\"\ndatabase_url = \"{url}\"\nnode = \"test-node\"\n\
             flush_interval = \"200ms\"\nlisten = \"{}\"\nbinlog = \"{}\"\n{extra}\n{rule}",
            self.spool.display(),
            self.listen,
            self.dir.path().join("state/binlog").display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn config(&self, url: &str) -> PathBuf {
        self.config_with(url, "", RULE)
    }

    fn binlog(&self) -> PathBuf {
        self.dir.path().join("state/binlog")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("sidecar.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn segments(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        v.sort();
        v
    }
}

const RULE: &str = r#"
[[rule]]
table = "ad_events_1m"
bucket = "1m"
group_by = ["ad", "ev"]
metrics = { events = "count", bytes = "sum(bytes)", bytes_max = "max(bytes)" }
"#;

/// Starts `logtally run` on `config`, its output appended to the site's log.
fn start_sidecar(site: &Site, config: &Path) -> TestSidecar {
    TestSidecar::start(config, &site.log(), site.listen)
}

/// Polls the table until it holds exactly `expected` (or the deadline passes); on failure
/// shows how far off it is and the sidecar's log.
fn wait_for_totals(db: &Db, expected: &Totals, site: &Site, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = Totals::new();
    while Instant::now() < deadline {
        if let Ok(t) = totals(db) {
            if &t == expected {
                return;
            }
            // Past the expected count can never come back down: fail at once.
            let got: i64 = t.values().map(|v| v.0).sum();
            let want: i64 = expected.values().map(|v| v.0).sum();
            assert!(
                got <= want,
                "counted {got} events, only {want} written:\n{}",
                diff(expected, &t)
            );
            last = t;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = site.log_text();
    let tail: String = log
        .lines()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    panic!(
        "totals never matched:\n{}\n--- sidecar log (last lines) ---\n{tail}",
        diff(expected, &last)
    );
}

fn diff(expected: &Totals, got: &Totals) -> String {
    let want: i64 = expected.values().map(|v| v.0).sum();
    let have: i64 = got.values().map(|v| v.0).sum();
    let mut out = format!("events: expected {want}, table has {have}\n");
    let mut shown = 0;
    for (k, v) in expected {
        if got.get(k) != Some(v) && shown < 5 {
            out += &format!("  {k:?}: expected {v:?}, got {:?}\n", got.get(k));
            shown += 1;
        }
    }
    for (k, v) in got {
        if !expected.contains_key(k) && shown < 10 {
            out += &format!("  {k:?}: unexpected {v:?}\n");
            shown += 1;
        }
    }
    out
}

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let body = http_get(addr, "/metrics").ok()?.text();
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_until(limit: Duration, what: &str, site: &Site, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out waiting for {what}\n--- sidecar log ---\n{}",
        site.log_text()
    );
}

/// A segment file written by hand, so a test can damage chosen records.
fn hand_segment(
    dir: &Path,
    pid: u32,
    seq: u64,
    load: &mut Workload,
    records: usize,
    corrupt: &[usize],
    torn: bool,
) -> PathBuf {
    let header = SegmentHeader {
        writer_pid: pid,
        created_ms: now_ms(),
        fields: FIELDS.iter().map(|s| s.to_string()).collect(),
    };
    let mut bytes = Vec::new();
    encode_header(&header, &mut bytes).unwrap();
    for i in 0..records {
        let damaged = corrupt.contains(&i);
        load.encode(&mut bytes, 1, !damaged);
        if damaged {
            // Flip the record's last payload byte: its CRC no longer matches.
            let last = bytes.len() - 1;
            bytes[last] ^= 0x55;
        }
    }
    if torn {
        // Half a record, as a writer killed mid-write leaves it.
        let mut one = Vec::new();
        load.encode(&mut one, 1, false);
        bytes.extend_from_slice(&one[..one.len() / 2]);
    }
    let path = dir.join(segment_file_name(header.created_ms, pid, seq));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}
