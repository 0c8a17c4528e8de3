//! Faults of real deployments (issue 10, parts 7–9): real nginx with the module, the real
//! sidecar, a real PostgreSQL.
//!
//! - the lag clock sees bytes nobody committed: with the database down (and the sidecar
//!   restarted meanwhile, so its reader never even starts) `logtally_lag_seconds` climbs
//!   past the outage's length while events wait, and falls after the catch-up;
//! - (segments the test writes itself, a bad header and times the database cannot store,
//!   are in `bare_segments.rs`);
//! - a full spool disk while the sidecar reads: stored + dropped = sent, stored = the
//!   module's written counter.
//!
//! Truth: nginx's access_log and the requests the test sent, the module's own counters
//! (`logtally_status`), events the test wrote itself. The [`Stack`] is shared with the
//! fault campaign (`chaos.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logtally_e2e::nginx::{HttpClient, TestNginx};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};

use super::module::TmpfsMount;

/// nginx for the fault tests: `ad` and a `pad` header as fields, an access_log of `/e` (the
/// truth of what was served), the module's counters at `/status`.
const NGINX_BODY: &str = r#"
    logtally_spool @DIR@/spool flush=20ms fsync=off @SPOOL_OPTS@;
    logtally_field ad $arg_ad;
    logtally_field pad $http_x_pad;
    server {
        listen 127.0.0.1:@PORT@;
        location = /e { logtally on; access_log @DIR@/access.log; return 204; }
        location = /status { logtally off; logtally_status; }
    }
"#;

/// The module's counters, from `logtally_status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ModuleCounts {
    pub written: u64,
    pub dropped: u64,
    pub write_errors: u64,
}

/// What a [`Stack`] needs of its nginx: the harness's [`TestNginx`], or the campaign's
/// daemon (`chaos/nginx.rs`).
pub(crate) trait Nginx {
    fn dir(&self) -> &Path;
    fn addr(&self) -> SocketAddr;
    fn error_log(&self) -> String;
    fn stop(&mut self);
}

impl Nginx for TestNginx {
    fn dir(&self) -> &Path {
        TestNginx::dir(self)
    }
    fn addr(&self) -> SocketAddr {
        TestNginx::addr(self)
    }
    fn error_log(&self) -> String {
        TestNginx::error_log(self)
    }
    fn stop(&mut self) {
        TestNginx::stop(self)
    }
}

/// nginx (its spool maybe on a small tmpfs), a private PostgreSQL, and a sidecar
/// configuration for them (the sidecar is started by the test).
pub(crate) struct Stack<N: Nginx = TestNginx> {
    pub nginx: N,
    pub pg: TestPostgres,
    pub db: Db,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub mount: Option<TmpfsMount>,
}

impl Stack<TestNginx> {
    /// `tmpfs`: mount options of a tmpfs for the spool (`None`: a plain folder; also when
    /// mounting is not allowed here: check [`Stack::mount`]). `spool_opts` are extra
    /// `logtally_spool` options, `sidecar_extra` extra sidecar configuration lines.
    pub fn new(tmpfs: Option<&str>, spool_opts: &str, sidecar_extra: &str) -> Stack {
        Stack::with(tmpfs, spool_opts, sidecar_extra, |body, prepare| {
            TestNginx::start_with(body, 2, prepare)
        })
    }
}

impl<N: Nginx> Stack<N> {
    /// As [`Stack::new`], nginx started by `start(http body, prepare the prefix)`.
    pub fn with(
        tmpfs: Option<&str>,
        spool_opts: &str,
        sidecar_extra: &str,
        start: impl FnOnce(&str, &mut dyn FnMut(&Path)) -> N,
    ) -> Stack<N> {
        let pg = TestPostgres::start();
        let db = Db::create(&pg);
        let mut mount = None;
        let body = NGINX_BODY.replace("@SPOOL_OPTS@", spool_opts);
        let nginx = start(&body, &mut |prefix: &Path| {
            if let Some(options) = tmpfs {
                mount = TmpfsMount::at(&prefix.join("spool"), options);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr();
        let config = dir.path().join("logtally.toml");
        std::fs::write(
            &config,
            format!(
                r#"spool_dir = "{spool}"
database_url = "{url}"
node = "faults"
flush_interval = "300ms"
listen = "{listen}"
binlog = "{binlog}"
{sidecar_extra}

[[rule]]
table = "hits"
bucket = "1h"
group_by = ["ad"]
metrics = {{ events = "count" }}
"#,
                spool = nginx.dir().join("spool").display(),
                url = db.url(),
                binlog = dir.path().join("binlog").display(),
            ),
        )
        .unwrap();
        Stack {
            nginx,
            pg,
            db,
            dir,
            config,
            listen,
            mount,
        }
    }

    pub fn spool(&self) -> PathBuf {
        self.nginx.dir().join("spool")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("logtally.log")
    }

    pub fn start_sidecar(&self) -> TestSidecar {
        TestSidecar::start(&self.config, &self.log(), self.listen)
    }

    /// Events the table holds (-1 while the database does not answer).
    pub fn stored(&self) -> i64 {
        self.db
            .query("SELECT coalesce(sum(events), 0)::bigint FROM hits")
            .ok()
            .and_then(|rows| rows.first().map(|r| r.get(0)))
            .unwrap_or(-1)
    }

    /// Requests nginx's access_log holds for `/e` (what nginx served).
    pub fn served(&self) -> u64 {
        std::fs::read_to_string(self.nginx.dir().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("GET /e?"))
            .count() as u64
    }

    /// The module's counters (the nginx generation now serving).
    pub fn module(&self) -> ModuleCounts {
        let r = HttpClient::one_shot(self.nginx.addr())
            .get(b"/status", &[])
            .expect("nginx /status");
        let text = String::from_utf8(r.body).unwrap();
        let value = |name: &str| -> u64 {
            text.lines()
                .find(|l| l.split(' ').next() == Some(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} not in status:\n{text}"))
        };
        ModuleCounts {
            written: value("logtally_module_events_total"),
            dropped: value("logtally_module_dropped_total"),
            write_errors: value("logtally_module_write_errors_total"),
        }
    }

    /// A sidecar metric (the first series of that name), `None` while it does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        sidecar_metric(self.listen, name)
    }

    pub fn logs(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- logtally log (last lines) ---\n{}\n--- nginx error log ---\n{}",
            tail.join("\n"),
            self.nginx.error_log()
        )
    }
}

impl<N: Nginx> Drop for Stack<N> {
    fn drop(&mut self) {
        // nginx first, then the mount it writes into.
        self.nginx.stop();
        self.mount.take();
    }
}

pub(crate) fn sidecar_metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let body = http_get(addr, "/metrics").ok()?.text();
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `cond` every 100 ms until it holds; panics after `limit` with `what` and `logs()`.
pub(crate) fn wait_for(
    limit: Duration,
    what: &str,
    logs: impl Fn() -> String,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A steady stream of `/e` requests (one new connection each, so a request is either
/// answered or never served), counted when answered 204; `pause()` holds it.
pub(crate) struct Traffic {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    /// `every`: the pause between requests; `pad`: bytes of the `X-Pad` header.
    pub fn start(addr: SocketAddr, every: Duration, pad: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, p, i, n) = (stop.clone(), paused.clone(), idle.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let pad = vec![b'p'; pad];
            let mut k = 0u64;
            while !s.load(Ordering::SeqCst) {
                if p.load(Ordering::SeqCst) {
                    i.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                i.store(false, Ordering::SeqCst);
                let target = format!("/e?ad={}", k % 7);
                let headers: &[(&str, &[u8])] = &[("X-Pad", &pad)];
                if let Ok(r) = HttpClient::one_shot(addr).get(target.as_bytes(), headers) {
                    assert_eq!(r.status, 204, "{target}");
                    n.fetch_add(1, Ordering::SeqCst);
                    k += 1;
                }
                std::thread::sleep(every);
            }
        });
        Traffic {
            stop,
            paused,
            idle,
            sent,
            thread: Some(thread),
        }
    }

    /// Requests answered so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Holds the stream and waits until no request is in flight.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        while !self.idle.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Stops the stream; returns the requests answered.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.sent()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The outage is this long: the lag must climb past it.
const OUTAGE: Duration = Duration::from_secs(8);

#[test]
fn lag_climbs_past_a_database_outage_even_without_a_reader_and_falls_after_catch_up() {
    let mut stack = Stack::new(None, "", "");
    if !stack.pg.is_private() {
        eprintln!("SKIPPED: the TEST_DATABASE_URL server cannot be stopped");
        return;
    }
    let mut sidecar = stack.start_sidecar();
    let traffic = Traffic::start(stack.nginx.addr(), Duration::from_millis(20), 0);
    wait_for(
        Duration::from_secs(30),
        "events stored",
        || stack.logs(),
        || stack.stored() > 20,
    );
    // Healthy: the lag stays within a flush interval and a scan.
    let mut healthy_max = 0.0f64;
    for _ in 0..20 {
        healthy_max = healthy_max.max(stack.metric("logtally_lag_seconds").unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(healthy_max < 3.0, "lag {healthy_max} s while healthy");

    stack.pg.stop();
    let down = Instant::now();
    // Restarted while the database is down: the new process waits for it before its reader
    // starts, so only the lag clock can see the spool grow.
    sidecar.kill9_and_restart();
    wait_for(
        OUTAGE * 4,
        "the lag to climb past the outage",
        || stack.logs(),
        || stack.metric("logtally_lag_seconds").unwrap_or(0.0) >= OUTAGE.as_secs_f64(),
    );
    let lag_down = stack.metric("logtally_lag_seconds").unwrap();
    let module = stack.module();
    let spool_bytes = stack.metric("logtally_spool_bytes").unwrap();
    let free = stack.metric("logtally_spool_free_bytes").unwrap();
    assert!(
        spool_bytes > 0.0 && free > 0.0,
        "spool {spool_bytes} B, free {free} B"
    );
    let outage = down.elapsed();
    stack.pg.start_again();
    let up = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "the lag to fall",
        || stack.logs(),
        || {
            stack
                .metric("logtally_lag_seconds")
                .is_some_and(|l| l < 3.0)
        },
    );
    let fell_in = up.elapsed();
    let sent = traffic.stop();
    wait_for(
        Duration::from_secs(60),
        "every request stored",
        || stack.logs(),
        || stack.stored() == sent as i64,
    );
    wait_for(
        Duration::from_secs(10),
        "the access_log to hold every request",
        || stack.logs(),
        || stack.served() == sent,
    );
    eprintln!(
        "lag: healthy max {healthy_max:.2} s; database down {:.1} s → lag {lag_down:.1} s \
         ({} events written, spool {spool_bytes} B on disk, {free} B free); \
         back under 3 s {:.1} s after the database returned; {sent} sent = stored",
        outage.as_secs_f64(),
        module.written,
        fell_in.as_secs_f64()
    );
    assert!(sidecar.terminate().success());
}

#[test]
fn a_full_spool_disk_while_the_sidecar_reads_adds_up() {
    const TOTAL: u64 = 4000;
    let stack = Stack::new(Some("size=1m"), "segment_size=128k", "");
    if stack.mount.is_none() {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): no full disk to test");
        return;
    }
    let sidecar = stack.start_sidecar();
    // 1 KiB per event: a 1 MiB disk holds ~1000 while the sidecar deletes what it committed.
    let pad = vec![b'p'; 1000];
    let addr = stack.nginx.addr();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let pad = pad.clone();
            std::thread::spawn(move || {
                let mut client = HttpClient::new(addr);
                for id in (t..TOTAL).step_by(4) {
                    let r = client.get(format!("/e?ad={}", id % 7).as_bytes(), &[("X-Pad", &pad)]);
                    assert_eq!(r.expect("nginx answers").status, 204, "id {id}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // nginx logs a request after its answer went out: wait for the last lines.
    wait_for(
        Duration::from_secs(10),
        "the access_log to hold every request",
        || stack.logs(),
        || stack.served() == TOTAL,
    );
    wait_for(
        Duration::from_secs(30),
        "every event written or dropped",
        || stack.logs(),
        || {
            let m = stack.module();
            m.written + m.dropped == TOTAL
        },
    );
    let m = stack.module();
    assert!(
        m.write_errors > 0 && m.dropped > 0,
        "the disk never filled: {m:?}"
    );
    wait_for(
        Duration::from_secs(60),
        "stored = written",
        || stack.logs(),
        || stack.stored() == m.written as i64,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        stack.stored() as u64 + m.dropped,
        TOTAL,
        "stored + dropped = sent"
    );
    eprintln!(
        "full disk: sent {TOTAL}, written {} (stored {}), dropped {}, write errors {}",
        m.written,
        stack.stored(),
        m.dropped,
        m.write_errors
    );
    assert!(sidecar.terminate().success());
}

/// The example configuration's fields (nginx-conf/module-example.conf) for the outage
/// arithmetic in docs/reference.md: bytes one event takes in a real segment.
const EXAMPLE_FIELDS: &str = r#"
    logtally_spool @DIR@/spool flush=20ms;
    logtally_field ad     $arg_ad;
    logtally_field ev     $arg_ev;
    logtally_field status $status;
    logtally_field bytes  $body_bytes_sent;
    logtally_field rt     $request_time;
    logtally_field ua     $http_user_agent;
    server {
        listen 127.0.0.1:@PORT@;
        location = /e { logtally on; return 204; }
    }
"#;

#[test]
fn bytes_per_event_of_the_example_fields() {
    const N: usize = 2000;
    let mut n = TestNginx::start(EXAMPLE_FIELDS, 1);
    let mut client = HttpClient::new(n.addr());
    let ua = b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36";
    for i in 0..N {
        let target = format!("/e?ad=ad{}&ev={}", i % 500, ["view", "click"][i % 2]);
        let r = client
            .get(target.as_bytes(), &[("User-Agent", ua)])
            .unwrap();
        assert_eq!(r.status, 204);
    }
    n.quit(); // seals the segment
    let segs = logtally_e2e::nginx::read_spool(&n.dir().join("spool"));
    let events: usize = segs.iter().map(|s| s.events.len()).sum();
    assert_eq!(events, N);
    let bytes: usize = segs.iter().map(|s| s.file_len - s.header_len).sum();
    let per_event = bytes as f64 / N as f64;
    eprintln!(
        "spool: {per_event:.1} bytes per event (6 fields, a {}-byte user agent; {bytes} bytes for {N} events)",
        ua.len()
    );
    assert!(per_event > ua.len() as f64, "{per_event}");
}
