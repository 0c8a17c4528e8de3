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

use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_e2e::sidecar::{free_addr, logtally_bin, Db, TestSidecar};
use logtally_spool::{
    encode_event, encode_header, segment_file_name, SegmentHeader, SegmentWriter,
    SegmentWriterConfig,
};
use rand::{Rng, SeedableRng};

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

#[test]
fn a_million_events_over_four_segments_two_growing_add_up_exactly() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let mut load = Workload::new(1);
    // Two segments complete (sealed) before the sidecar starts.
    for pid in [101, 102] {
        write_segment(
            &mut writer(&site.spool, pid),
            &mut load,
            50,
            5_000,
            Duration::ZERO,
        );
    }
    let config = site.config(db.url());
    let sidecar = start_sidecar(&site, &config);
    // Two more grow while it reads, from live "writers", then seal.
    let (w1, w2) = (FakeWriter::start(), FakeWriter::start());
    let mut a = writer(&site.spool, w1.pid());
    let mut b = writer(&site.spool, w2.pid());
    let mut buf = Vec::new();
    for _ in 0..50 {
        for w in [&mut a, &mut b] {
            buf.clear();
            load.encode(&mut buf, 5_000, true);
            w.append(&buf, 5_000, 0, now_ms()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    a.seal(now_ms()).unwrap();
    b.seal(now_ms()).unwrap();
    assert_eq!(load.total_events(), 1_000_000);

    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(120));
    // Sealed and committed segments are deleted, and so are their checkpoint rows.
    wait_until(
        Duration::from_secs(20),
        "segments and checkpoint rows removed",
        &site,
        || {
            site.segments().is_empty()
                && db
                    .query("SELECT 1 FROM logtally_checkpoint")
                    .map(|r| r.is_empty())
                    .unwrap_or(false)
        },
    );
    assert_eq!(
        metric(site.listen, "logtally_events_read_total"),
        Some(1_000_000.0)
    );
    let status = sidecar.terminate();
    assert!(status.success(), "exit {status:?}\n{}", site.log_text());

    // The binlog recorded the commits, the last one with every segment finished.
    let binlog = std::fs::read_to_string(site.binlog()).unwrap();
    let last: serde_json::Value = serde_json::from_str(binlog.lines().last().unwrap()).unwrap();
    assert_eq!(last["v"], 1);
    assert_eq!(last["node"], "test-node");
    let finished_positions = binlog
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|r| r["segments"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["finished"] == true)
        .count();
    assert!(finished_positions >= 4, "{binlog}");
}

#[test]
fn twenty_kill_nines_during_ingest_count_every_event_once() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let config = site.config(db.url());
    let spool = site.spool.clone();
    // The writer runs through all the kills: three segments, one after another, growing.
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(2);
        for _ in 0..3 {
            write_segment(
                &mut writer(&spool, fake.pid()),
                &mut load,
                40,
                2_500,
                Duration::from_millis(60),
            );
        }
        load
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut kills_during_ingest = 0;
    for run in 1..=20 {
        let before = runs_that_committed(&site);
        let sidecar = start_sidecar(&site, &config);
        // While events are written, each run commits at least once before it dies, so the
        // kills land after work was committed whatever the load on the machine; then at a
        // random moment within the next flushes.
        wait_until(
            Duration::from_secs(60),
            &format!("run {run}'s first commit"),
            &site,
            || runs_that_committed(&site) > before || ingest.is_finished(),
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..450)));
        kills_during_ingest += usize::from(!ingest.is_finished());
        sidecar.kill9();
    }
    let load = ingest.join().unwrap();
    assert_eq!(load.total_events(), 300_000);
    assert!(
        kills_during_ingest > 0,
        "no kill landed while events were written"
    );
    let sidecar = start_sidecar(&site, &config);
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(120));
    // The totals may have been committed by the run before: SIGTERM once this one serves.
    wait_until(Duration::from_secs(30), "the admin server", &site, || {
        sidecar.metric("logtally_events_read_total").is_some()
    });
    let status = sidecar.terminate();
    assert!(
        status.success(),
        "SIGTERM exit {status}:\n{}",
        site.log_text()
    );
    eprintln!("{kills_during_ingest} of 20 kills landed while events were written");
}

/// How many runs of the sidecar have committed (each numbers its binlog records from 1).
fn runs_that_committed(site: &Site) -> usize {
    std::fs::read_to_string(site.binlog())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["seq"] == 1)
        .count()
}

#[test]
fn a_ten_second_database_outage_loses_and_doubles_nothing() {
    let mut pg = TestPostgres::start();
    if !pg.is_private() {
        eprintln!("skipped: TEST_DATABASE_URL server cannot be stopped");
        return;
    }
    let db = Db::create(&pg);
    let site = Site::new();
    // A low key bound (the workload has 600 keys): while the database is away the reader
    // must pause and the spool hold the rest.
    let config = site.config_with(db.url(), "max_pending_keys = 100", RULE);
    let sidecar = start_sidecar(&site, &config);
    let spool = site.spool.clone();
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(3);
        for _ in 0..2 {
            write_segment(
                &mut writer(&spool, fake.pid()),
                &mut load,
                100,
                1_000,
                Duration::from_millis(100),
            );
        }
        load
    });
    std::thread::sleep(Duration::from_secs(3));
    pg.stop();
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(9),
        "a failed flush while the database is down",
        &site,
        || metric(site.listen, "logtally_flushes_total{outcome=\"error\"}").unwrap_or(0.0) > 0.0,
    );
    assert_eq!(http_get(site.listen, "/readyz").unwrap().status, 503);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    // The reader is paused at the key bound while the writer goes on: the spool buffers.
    let read_before = metric(site.listen, "logtally_events_read_total").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let read_after = metric(site.listen, "logtally_events_read_total").unwrap();
    assert_eq!(
        read_before, read_after,
        "the reader went on past max_pending_keys"
    );
    assert!(metric(site.listen, "logtally_pending_keys").unwrap() >= 100.0);
    assert!(metric(site.listen, "logtally_lag_bytes").unwrap() > 0.0);
    pg.start_again();
    let load = ingest.join().unwrap();
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(120));
    wait_until(Duration::from_secs(10), "/readyz 200 again", &site, || {
        http_get(site.listen, "/readyz")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    assert!(sidecar.terminate().success());
}

#[test]
fn connections_killed_mid_transaction_count_nothing_twice() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let config = site.config(db.url());
    let sidecar = start_sidecar(&site, &config);
    let spool = site.spool.clone();
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(5);
        write_segment(
            &mut writer(&spool, fake.pid()),
            &mut load,
            80,
            2_000,
            Duration::from_millis(50),
        );
        load
    });
    // Terminate the sidecar's backend again and again, wherever it is: mid-upsert,
    // mid-COMMIT, idle. A retried batch whose COMMIT did land must not count again.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut killed = 0usize;
    while !ingest.is_finished() {
        if let Ok(rows) = db.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'logtally' AND pid <> pg_backend_pid()",
        ) {
            killed += rows.len();
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..200)));
    }
    let load = ingest.join().unwrap();
    assert!(killed >= 10, "only {killed} backends terminated");
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(60));
    assert!(sidecar.terminate().success());
    let log = site.log_text();
    eprintln!(
        "{killed} backends terminated; {} flushes failed; {} retries found their batch committed",
        log.matches("flush failed").count(),
        log.matches("had committed").count()
    );
}

/// A TCP proxy in front of PostgreSQL that, while `drops` is positive, passes a client's
/// `COMMIT` on to the server, lets the server finish it, then cuts the connection before the
/// reply gets back: the client cannot know whether its transaction committed.
pub(crate) struct CommitCutter {
    pub(crate) addr: SocketAddr,
    pub(crate) drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CommitCutter {
    pub(crate) fn start(upstream: SocketAddr, drops: usize) -> CommitCutter {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let drops = Arc::new(AtomicUsize::new(drops));
        let cut = Arc::new(AtomicUsize::new(0));
        let (d, c) = (drops.clone(), cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let (d, c) = (d.clone(), c.clone());
                std::thread::spawn(move || Self::relay(client, server, d, c));
            }
        });
        CommitCutter { addr, drops, cut }
    }

    fn relay(
        mut client: std::net::TcpStream,
        mut server: std::net::TcpStream,
        drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let (mut s2, mut c2) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
        // Frontend messages: untyped (length-prefixed) until the startup message, then a
        // type byte and a length that counts itself.
        let mut started = false;
        loop {
            let mut msg = Vec::new();
            if started {
                let mut head = [0u8; 5];
                if client.read_exact(&mut head).is_err() {
                    break;
                }
                let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
                msg.extend_from_slice(&head);
                msg.resize(1 + len, 0);
                if client.read_exact(&mut msg[5..]).is_err() {
                    break;
                }
            } else {
                let mut head = [0u8; 8];
                if client.read_exact(&mut head).is_err() {
                    break;
                }
                let len = u32::from_be_bytes(head[0..4].try_into().unwrap()) as usize;
                let code = u32::from_be_bytes(head[4..8].try_into().unwrap());
                msg.extend_from_slice(&head);
                msg.resize(len, 0);
                if client.read_exact(&mut msg[8..]).is_err() {
                    break;
                }
                started = code == 196_608; // protocol 3.0; SSL/GSS requests stay untyped
            }
            let is_commit = started && msg[0] == b'Q' && msg[5..].starts_with(b"COMMIT\0");
            let cut_now = is_commit
                && drops
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if cut_now {
                // Cut the client off first so the server's reply can never reach it, then
                // hand the server the COMMIT and give it time to finish.
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.write_all(&msg);
                std::thread::sleep(Duration::from_millis(300));
                cut.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if server.write_all(&msg).is_err() {
                break;
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Both);
    }
}

#[test]
fn a_commit_whose_reply_is_lost_is_found_committed_not_repeated() {
    let pg = TestPostgres::start();
    let Some(port) = pg.port() else {
        eprintln!("skipped: needs the private server's port");
        return;
    };
    let db = Db::create(&pg);
    let site = Site::new();
    let cutter = CommitCutter::start(SocketAddr::from(([127, 0, 0, 1], port)), 3);
    let url = db
        .url()
        .replace(&format!("127.0.0.1:{port}"), &cutter.addr.to_string());
    assert_ne!(url, db.url());
    let config = site.config(&url);
    let sidecar = start_sidecar(&site, &config);
    let spool = site.spool.clone();
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(6);
        write_segment(
            &mut writer(&spool, fake.pid()),
            &mut load,
            40,
            1_000,
            Duration::from_millis(100),
        );
        load
    });
    let load = ingest.join().unwrap();
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(60));
    // The last cut's batch can be in the table before the proxy counts the cut and before
    // the sidecar's retry finds it committed: wait for both, then check nothing more came.
    wait_until(
        Duration::from_secs(30),
        "the planned cuts and their retries",
        &site,
        || {
            cutter.cut.load(std::sync::atomic::Ordering::SeqCst) == 3
                && site.log_text().matches("had committed").count() == 3
        },
    );
    assert_eq!(cutter.drops.load(std::sync::atomic::Ordering::SeqCst), 0);
    let log = site.log_text();
    let found = log.matches("had committed").count();
    assert_eq!(found, 3, "retries that found their batch committed:\n{log}");
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(5));
    assert!(sidecar.terminate().success());
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

#[test]
fn corrupt_records_and_torn_tails_are_counted_and_skipped_the_rest_exact() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let mut load = Workload::new(4);
    let dead = dead_pid();
    // A dead writer's segment: two corrupt records in the middle, a torn tail at the end.
    hand_segment(
        &site.spool,
        dead,
        1,
        &mut load,
        1_000,
        &[300, 301, 700],
        true,
    );
    // A live writer's segment with a torn tail: waited for, not an error (yet).
    let live = FakeWriter::start();
    let live_segment = hand_segment(&site.spool, live.pid(), 2, &mut load, 500, &[], true);
    // A live writer holds its segment's lock (the module's flock): that is what keeps it.
    let live_lock = std::fs::File::open(&live_segment).unwrap();
    live_lock.lock().unwrap();
    let config = site.config(db.url());
    let sidecar = start_sidecar(&site, &config);
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(60));
    // Two corrupt runs (300-301 adjacent, 700) and, once the dead writer's segment is
    // abandoned (its lock is free), its torn tail.
    wait_until(Duration::from_secs(40), "3 decode errors", &site, || {
        metric(site.listen, "logtally_decode_errors_total") == Some(3.0)
    });
    assert!(metric(site.listen, "logtally_torn_tail_waits_total").unwrap_or(0.0) >= 2.0);
    assert_eq!(
        metric(site.listen, "logtally_events_read_total"),
        Some((1_000 - 3 + 500) as f64)
    );
    assert!(sidecar.terminate().success());
    assert_eq!(
        totals(&db).unwrap(),
        load.expected,
        "nothing changed at shutdown"
    );
    drop(live_lock);
}

fn check(config: &Path) -> (bool, String) {
    let out = Command::new(logtally_bin())
        .args(["check", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_names_what_is_wrong_with_a_configuration() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let (ok, out) = check(&site.config(db.url()));
    assert!(ok, "a good configuration must pass: {out}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key",
            site_config_text(&site, db.url(), "colour = \"red\"", RULE),
            "colour",
        ),
        (
            "bad duration",
            site_config_text(&site, db.url(), "retain = \"5 parsecs\"", RULE),
            "retain",
        ),
        (
            "metric function on an unknown field",
            site_config_text(
                &site,
                db.url(),
                "",
                &RULE.replace("max(bytes)", "max(by tes)"),
            ),
            "rule[0].metrics.bytes_max",
        ),
        (
            "table name with a quote",
            site_config_text(
                &site,
                db.url(),
                "",
                &RULE.replace("ad_events_1m", "ad\\\"x"),
            ),
            "rule[0].table",
        ),
        (
            "table name with a semicolon",
            site_config_text(
                &site,
                db.url(),
                "",
                &RULE.replace("ad_events_1m", "t; drop table x"),
            ),
            "rule[0].table",
        ),
    ];
    for (what, text, needle) in cases {
        let path = site.dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (ok, out) = check(&path);
        assert!(!ok, "{what}: check passed:\n{out}");
        assert!(
            out.contains(needle),
            "{what}: {needle:?} not named in:\n{out}"
        );
        assert!(
            out.contains("bad.toml"),
            "{what}: file not named in:\n{out}"
        );
    }

    // Field names the spool does not declare. An empty spool cannot tell: a note, not a
    // failure; once a segment declares [ad, ev, bytes], a rule on `rtt` or `cmp` fails.
    let unknown_metric = site_config_text(
        &site,
        db.url(),
        "",
        &RULE.replace("bytes_max = \"max(bytes)\"", "x = \"max(rtt)\""),
    );
    let unknown_group = site_config_text(&site, db.url(), "", &RULE.replace("\"ev\"]", "\"cmp\"]"));
    let path = site.dir.path().join("fields.toml");
    std::fs::write(&path, &unknown_metric).unwrap();
    let (ok, out) = check(&path);
    assert!(ok, "no segments yet: must not fail:\n{out}");
    assert!(
        out.contains("no segment with a readable header in") && out.contains("not checked"),
        "no note that field names were not checked:\n{out}"
    );
    let mut load = Workload::new(9);
    hand_segment(&site.spool, dead_pid(), 1, &mut load, 3, &[], false);
    let declared = "declare: ad, ev, bytes)";
    for (what, text, key, field) in [
        (
            "max of an unknown field",
            &unknown_metric,
            "rule[0].metrics.x",
            "\"rtt\"",
        ),
        (
            "group_by an unknown field",
            &unknown_group,
            "rule[0].group_by[1]",
            "\"cmp\"",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let (ok, out) = check(&path);
        assert!(!ok, "{what}: check passed:\n{out}");
        let line = out
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("{what}: {key} not named in:\n{out}"));
        assert!(
            line.contains("fields.toml") && line.contains(field) && line.contains(declared),
            "{what}: file, field or declared fields not named in:\n{out}"
        );
        assert!(!out.contains("configuration OK"), "{what}:\n{out}");
    }
    let (ok, out) = check(&site.config(db.url()));
    assert!(ok, "the good configuration against the same spool:\n{out}");
    assert!(out.contains("found in 1 segment(s)"), "{out}");

    let port = free_addr().port();
    let unreachable = format!("postgres://nobody@127.0.0.1:{port}/nowhere?connect_timeout=3");
    let path = site.dir.path().join("unreachable.toml");
    std::fs::write(&path, site_config_text(&site, &unreachable, "", RULE)).unwrap();
    let (ok, out) = check(&path);
    assert!(!ok, "unreachable database: check passed:\n{out}");
    assert!(
        out.contains(&format!("127.0.0.1:{port}")),
        "address not named in:\n{out}"
    );
}

fn site_config_text(site: &Site, url: &str, extra: &str, rule: &str) -> String {
    let p = site.config_with(url, extra, rule);
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn refuses_to_start_on_a_table_of_the_wrong_shape() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    db.execute(
        "CREATE TABLE ad_events_1m (bucket timestamptz NOT NULL, ad text NOT NULL, \
         ev text NOT NULL, events integer NOT NULL, bytes numeric NOT NULL, \
         bytes_max numeric, PRIMARY KEY (bucket, ad, ev))",
    );
    let site = Site::new();
    let config = site.config(db.url());
    let (ok, out) = check(&config);
    assert!(
        !ok && out.contains("column events is integer, expected bigint"),
        "{out}"
    );
    let mut sidecar = start_sidecar(&site, &config);
    let status = sidecar
        .wait(Duration::from_secs(30))
        .expect("logtally run kept running on a bad table");
    assert!(!status.success());
    let log = site.log_text();
    assert!(
        log.contains("column events is integer, expected bigint"),
        "{log}"
    );
    // And it wrote nothing.
    assert!(db.query("SELECT 1 FROM ad_events_1m").unwrap().is_empty());
}
