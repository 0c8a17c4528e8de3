//! The nginx module in a real nginx (2 workers, loopback): every request becomes exactly one
//! spool record (checked against a stock access_log), field values are what access_log
//! writes for the same request even when something read them earlier (`add_header`,
//! subrequests, upstream failover), internal redirects record the final location, bad
//! configurations fail `nginx -t` naming the directive, reloads and a killed worker lose
//! nothing they should not, odd values are recorded faithfully or cut by the documented
//! rule, a full queue (in records or bytes) or a spool that cannot take writes costs events
//! (counted, marked) but never a request, a frozen disk stalls neither requests nor reloads
//! and holds a worker to its byte queue, the spool folder has the documented owner and
//! mode, and `logtally_status` is valid Prometheus text with the right numbers (and never
//! an event itself).
//!
//! Needs the module built first (`scripts/nginx-build.sh module`, or `vendored` with
//! `LOGTALLY_NGINX_ROUTE=vendored`); see `logtally_e2e::nginx`. Runs as root for the tmpfs,
//! loop-mount and fsfreeze cases; elsewhere those fall back or are skipped (said on stderr).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use logtally_e2e::nginx::{
    read_spool, send_signal, test_config, HttpClient, SegmentContents, TestNginx,
};

/// Values one request id sends; absent (`None`) and empty (`Some("")`) both occur.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    id: u64,
    ad: Option<String>,
    ev: Option<String>,
    tag: Option<String>,
    status: u16,
}

impl Sent {
    fn for_id(id: u64) -> Sent {
        let ad = match id % 7 {
            0 => None,
            _ => Some(format!("{}", id * 31 % 1000)),
        };
        let ev = match id % 4 {
            0 => Some("view".to_string()),
            1 => Some("click".to_string()),
            2 => Some(String::new()),
            _ => None,
        };
        let tag = match id % 5 {
            0 => None,
            1 => Some(String::new()),
            n => Some(format!("t{n}x{}", id % 13)),
        };
        let status = if id % 10 == 9 { 404 } else { 204 };
        Sent {
            id,
            ad,
            ev,
            tag,
            status,
        }
    }

    fn target(&self) -> String {
        let path = if self.status == 404 { "/missing" } else { "/e" };
        let mut t = format!("{path}?id={}", self.id);
        if let Some(ad) = &self.ad {
            t.push_str(&format!("&ad={ad}"));
        }
        if let Some(ev) = &self.ev {
            t.push_str(&format!("&ev={ev}"));
        }
        t
    }

    fn send(&self, client: &mut HttpClient) -> std::io::Result<u16> {
        let headers: Vec<(&str, &[u8])> =
            self.tag.iter().map(|t| ("X-Tag", t.as_bytes())).collect();
        Ok(client.get(self.target().as_bytes(), &headers)?.status)
    }

    /// The record's values, in the configuration's field order.
    fn expected(&self) -> Vec<Option<Vec<u8>>> {
        let b = |s: &Option<String>| s.as_ref().map(|s| s.as_bytes().to_vec());
        let pair = format!(
            "{}/{}",
            self.ad.as_deref().unwrap_or(""),
            self.ev.as_deref().unwrap_or("")
        );
        vec![
            Some(self.id.to_string().into_bytes()),
            b(&self.ad),
            b(&self.ev),
            Some(self.status.to_string().into_bytes()),
            b(&self.tag),
            Some(pair.into_bytes()),
        ]
    }
}

const FIELDS_CONF: &str = r#"
    logtally_spool @DIR@/spool flush=20ms segment_size=64k;
    log_format lt '$arg_id\t$arg_ad\t$arg_ev\t$status\t$http_x_tag\t$msec';
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field id $arg_id;
        logtally_field ad $arg_ad;
        logtally_field ev $arg_ev;
        logtally_field st $status;
        logtally_field tag $http_x_tag;
        logtally_field pair "$arg_ad/$arg_ev";
        access_log @DIR@/access.log lt;
        location / { return 204; }
        location /missing { return 404; }
    }
"#;

fn all_events(segs: &[SegmentContents]) -> Vec<(&SegmentContents, &logtally_e2e::nginx::Event)> {
    segs.iter()
        .flat_map(|s| s.events.iter().map(move |e| (s, e)))
        .collect()
}

fn id_of(seg: &SegmentContents, e: &logtally_e2e::nginx::Event) -> u64 {
    let v = seg.value(e, "id").expect("every record has an id");
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

/// Every segment of a cleanly stopped nginx: sealed, nothing corrupt or torn, seal counts
/// match the frames.
fn assert_clean(segs: &[SegmentContents]) {
    for s in segs {
        assert_eq!(s.corrupt_bytes, 0, "{}", s.path.display());
        assert_eq!(s.torn_bytes, 0, "{}", s.path.display());
        let seal = s
            .seal
            .unwrap_or_else(|| panic!("{} not sealed", s.path.display()));
        assert_eq!(
            seal,
            (s.events.len() as u64, s.dropped),
            "{}",
            s.path.display()
        );
    }
}

#[test]
fn twenty_thousand_requests_match_what_was_sent_and_the_access_log() {
    const TOTAL: u64 = 20_000;
    const THREADS: u64 = 8;
    let mut n = TestNginx::start(FIELDS_CONF, 2);
    let addr = n.addr();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut client = HttpClient::new(addr);
                for id in (t..TOTAL).step_by(THREADS as usize) {
                    let sent = Sent::for_id(id);
                    let status = sent.send(&mut client).expect("request");
                    assert_eq!(status, sent.status, "id {id}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    n.quit();

    let segs = read_spool(&n.dir().join("spool"));
    assert!(!segs.is_empty());
    assert_clean(&segs);
    let fields = ["id", "ad", "ev", "st", "tag", "pair"];
    for s in &segs {
        assert_eq!(s.fields, fields);
        assert_eq!(s.dropped, 0);
    }
    let events = all_events(&segs);
    assert_eq!(events.len() as u64, TOTAL);
    let writers: HashSet<u32> = segs.iter().map(|s| s.writer_pid).collect();
    assert_eq!(writers.len(), 2, "both workers wrote");
    // ~1.2 MB of records in 64 KiB segments: each worker rolled, and only after the batch
    // that took a segment to 64 KiB (a worker's last segment is sealed at exit instead).
    for pid in &writers {
        let mine: Vec<_> = segs.iter().filter(|s| s.writer_pid == *pid).collect();
        assert!(mine.len() >= 2, "worker {pid} never rolled");
        for s in &mine[..mine.len() - 1] {
            assert!(s.file_len >= 64 * 1024, "{} rolled early", s.path.display());
        }
    }

    let mut by_id = HashMap::new();
    for (seg, e) in &events {
        let id = id_of(seg, e);
        assert_eq!(e.values, Sent::for_id(id).expected(), "id {id}");
        assert!(by_id.insert(id, (*seg, *e)).is_none(), "id {id} twice");
    }
    assert_eq!(by_id.len() as u64, TOTAL);

    // The stock access log, written for the same requests, line by line.
    let log = std::fs::read_to_string(n.dir().join("access.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len() as u64, TOTAL);
    let shown = |v: Option<&[u8]>| v.map_or("-".to_string(), |v| String::from_utf8_lossy(v).into());
    for line in lines {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 6, "{line:?}");
        let id: u64 = cols[0].parse().unwrap();
        let (seg, e) = by_id[&id];
        for (i, name) in ["id", "ad", "ev", "st", "tag"].iter().enumerate() {
            assert_eq!(shown(seg.value(e, name)), cols[i], "id {id} field {name}");
        }
        // Record time is the request start; $msec is when the line was logged.
        let logged_ms = (cols[5].parse::<f64>().unwrap() * 1000.0).round() as u64;
        assert!(
            e.time_ms <= logged_ms && logged_ms - e.time_ms < 5_000,
            "id {id} time"
        );
    }
}

const GOOD: &str = r#"
    logtally_spool @DIR@/spool;
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field a $arg_a;
        location / { return 204; }
    }
"#;

fn assert_rejected(body: &str, prepare: impl FnOnce(&Path), wanted: &[&str]) {
    let out = test_config(body, prepare);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted:\n{body}\n{stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "{w:?} not in:\n{stderr}");
    }
    assert!(stderr.contains("nginx.conf:"), "no file:line in:\n{stderr}");
}

#[test]
fn bad_configurations_fail_nginx_t_naming_the_directive() {
    let ok = test_config(GOOD, |_| {});
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let field = |line: &str| GOOD.replace("logtally_field a $arg_a;", line);
    let spool = |line: &str| GOOD.replace("logtally_spool @DIR@/spool;", line);
    assert_rejected(
        &field("logtally_field a $arg_a; logtally_field b \"x$no_such_thing\";"),
        |_| {},
        &["logtally_field", "no_such_thing"],
    );
    assert_rejected(
        &field("logtally_field b $nope;"),
        |_| {},
        &["logtally_field", "nope"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/spool segment_size=lots;"),
        |_| {},
        &["\"logtally_spool\" directive", "segment_size", "lots"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/spool flush=soon;"),
        |_| {},
        &["\"logtally_spool\" directive", "flush", "soon"],
    );
    for queue in ["0", "lots", "64x", "2g", "512b"] {
        assert_rejected(
            &spool(&format!("logtally_spool @DIR@/spool queue={queue};")),
            |_| {},
            &[
                "\"logtally_spool\" directive",
                &format!("invalid queue \"{queue}\""),
            ],
        );
    }
    assert_rejected(
        &spool("logtally_spool @DIR@/spool fsync=never;"),
        |_| {},
        &["\"logtally_spool\" directive", "fsync"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/afile/spool;"),
        |d| std::fs::write(d.join("afile"), b"x").unwrap(),
        &["\"logtally_spool\" directive", "not a folder"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/no/such/parent;"),
        |_| {},
        &["\"logtally_spool\" directive", "cannot be created"],
    );
    if let Some(ro) = TmpfsMount::new("ro,size=1m") {
        assert_rejected(
            &spool(&format!("logtally_spool {}/spool;", ro.path.display())),
            |_| {},
            &["\"logtally_spool\" directive", "Read-only"],
        );
    } else {
        eprintln!("cannot mount tmpfs here: read-only spool case skipped");
    }
    assert_rejected(
        &field("logtally_field a;"),
        |_| {},
        &["invalid number of arguments in \"logtally_field\" directive"],
    );
    assert_rejected(
        &field("logtally_field 9a $arg_a;"),
        |_| {},
        &["logtally_field", "9a"],
    );
    assert_rejected(
        &field("logtally_field a $arg_a; logtally_field a $arg_b;"),
        |_| {},
        &["logtally_field", "twice"],
    );
    assert_rejected(
        &spool(""),
        |_| {},
        &["\"logtally\" directive", "logtally_spool"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/spool; logtally_spool @DIR@/spool;"),
        |_| {},
        &["\"logtally_spool\" directive is duplicate"],
    );
}

/// A tmpfs mounted for a test, unmounted (lazily, so a crashed test cannot wedge it) on drop.
pub(crate) struct TmpfsMount {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TmpfsMount {
    /// Mounts a tmpfs with `options` on a new temporary folder; `None` where mounting is
    /// not allowed (not root, no CAP_SYS_ADMIN).
    pub(crate) fn new(options: &str) -> Option<TmpfsMount> {
        let dir = tempfile::Builder::new()
            .prefix("logtally-mnt-")
            .tempdir()
            .ok()?;
        let path = dir.path().to_path_buf();
        Self::at(&path, options).map(|mut m| {
            m._dir = Some(dir);
            m
        })
    }

    pub(crate) fn at(path: &Path, options: &str) -> Option<TmpfsMount> {
        std::fs::create_dir_all(path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| TmpfsMount {
            path: path.to_path_buf(),
            _dir: None,
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

const PID_CONF: &str = r#"
    logtally_spool @DIR@/spool flush=20ms;
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field id $arg_id;
        logtally_field pid $pid;
        location / { return 200 "$pid"; }
    }
"#;

/// Clients sending unique ids until told to stop. Each id is either answered (with the
/// serving worker's pid) or failed before an answer (it may or may not have been logged).
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<HashMap<u64, i32>>>,
    uncertain: Arc<Mutex<HashSet<u64>>>,
    count: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(n: &TestNginx, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(HashMap::new()));
        let uncertain = Arc::new(Mutex::new(HashSet::new()));
        let count = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let addr = n.addr();
        let threads = (0..clients)
            .map(|_| {
                let (stop, answered, uncertain, count, next) = (
                    stop.clone(),
                    answered.clone(),
                    uncertain.clone(),
                    count.clone(),
                    next.clone(),
                );
                std::thread::spawn(move || {
                    // A connection per request: a reload or a killed worker then leaves a
                    // request either answered or not sent, never ambiguous on keep-alive.
                    let mut client = HttpClient::one_shot(addr);
                    while !stop.load(Ordering::Relaxed) {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        match client.get(format!("/e?id={id}").as_bytes(), &[]) {
                            Ok(r) if r.status == 200 => {
                                let pid = String::from_utf8_lossy(&r.body).parse().unwrap();
                                answered.lock().unwrap().insert(id, pid);
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                uncertain.lock().unwrap().insert(id);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            answered,
            uncertain,
            count,
            threads,
        }
    }

    fn wait_for_more(&self, n: &TestNginx, more: u64) {
        let target = self.count.load(Ordering::Relaxed) + more;
        n.wait_until(Duration::from_secs(30), "requests", || {
            self.count.load(Ordering::Relaxed) >= target
        });
    }

    fn finish(self) -> (HashMap<u64, i32>, HashSet<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let a = std::mem::take(&mut *self.answered.lock().unwrap());
        let u = std::mem::take(&mut *self.uncertain.lock().unwrap());
        (a, u)
    }
}

/// Ids in the spool with how often each occurs, and the pid each record names.
fn logged_ids(segs: &[SegmentContents]) -> HashMap<u64, (usize, u32)> {
    let mut seen: HashMap<u64, (usize, u32)> = HashMap::new();
    for (seg, e) in all_events(segs) {
        let pid: u32 = std::str::from_utf8(seg.value(e, "pid").unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(pid, seg.writer_pid, "a record in another worker's segment");
        seen.entry(id_of(seg, e)).or_insert((0, pid)).0 += 1;
    }
    seen
}

#[test]
fn ten_reloads_under_load_lose_and_double_nothing() {
    let mut n = TestNginx::start(PID_CONF, 2);
    let load = Load::start(&n, 4);
    load.wait_for_more(&n, 300);
    let mut retired = HashSet::new();
    for i in 0..10 {
        let old = n.worker_pids();
        retired.extend(old.iter().copied());
        // Alternate the flush interval so each reload really is a new configuration.
        n.write_config(&PID_CONF.replace(
            "flush=20ms",
            if i % 2 == 0 {
                "flush=30ms"
            } else {
                "flush=20ms"
            },
        ));
        n.reload();
        n.wait_until(Duration::from_secs(20), "new workers", || {
            let now = n.worker_pids();
            now.len() == 2 && now.iter().all(|p| !old.contains(p))
        });
        load.wait_for_more(&n, 200);
    }
    let (answered, uncertain) = load.finish();
    n.wait_until(Duration::from_secs(20), "old workers to exit", || {
        n.children().iter().all(|(pid, _)| !retired.contains(pid))
    });
    let log = n.error_log();
    n.quit();
    assert!(!log.contains("exited on signal"), "{log}");
    assert!(
        uncertain.len() < 10,
        "{} requests failed during reloads",
        uncertain.len()
    );

    let segs = read_spool(&n.dir().join("spool"));
    assert_clean(&segs);
    let writers: HashSet<u32> = segs.iter().map(|s| s.writer_pid).collect();
    assert!(
        writers.len() >= 12,
        "only {} worker generations wrote",
        writers.len()
    );
    let seen = logged_ids(&segs);
    for (id, pid) in &answered {
        let (times, logged_pid) = seen.get(id).copied().unwrap_or((0, 0));
        assert_eq!(times, 1, "answered id {id} logged {times} times");
        assert_eq!(logged_pid, *pid as u32, "id {id}");
    }
    for (id, (times, _)) in &seen {
        assert!(
            answered.contains_key(id) || uncertain.contains(id),
            "id {id} never sent"
        );
        assert_eq!(*times, 1, "id {id} doubled");
    }
}

#[test]
fn a_killed_worker_leaves_every_other_record_intact() {
    let mut n = TestNginx::start(PID_CONF, 2);
    let load = Load::start(&n, 4);
    load.wait_for_more(&n, 1000);
    // The worker that served the most so far (the kernel may favour one), once it has
    // written a segment.
    let victim = {
        let answered = load.answered.lock().unwrap();
        let mut served: HashMap<i32, usize> = HashMap::new();
        for pid in answered.values() {
            *served.entry(*pid).or_default() += 1;
        }
        served
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(pid, _)| pid)
            .unwrap()
    };
    assert!(n.worker_pids().contains(&victim));
    let marker = format!("-{victim}-");
    n.wait_until(Duration::from_secs(10), "the victim's segment", || {
        std::fs::read_dir(n.dir().join("spool"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(&marker))
    });
    assert!(send_signal(victim, libc::SIGKILL), "kill -9 {victim}");
    n.wait_until(Duration::from_secs(20), "a replacement worker", || {
        let now = n.worker_pids();
        now.len() == 2 && !now.contains(&victim)
    });
    load.wait_for_more(&n, 1000);
    let (answered, uncertain) = load.finish();
    n.quit();
    assert!(n.error_log().contains("exited on signal 9"));

    let segs = read_spool(&n.dir().join("spool"));
    let (dead, alive): (Vec<_>, Vec<_>) = segs
        .iter()
        .cloned()
        .partition(|s| s.writer_pid == victim as u32);
    assert!(!dead.is_empty(), "the killed worker had written");
    assert_clean(&alive);
    for s in &dead {
        // Its tail may be torn; everything before it must decode.
        assert_eq!(s.corrupt_bytes, 0, "{}", s.path.display());
        assert!(s.seal.is_none(), "a killed worker cannot seal");
    }
    let seen = logged_ids(&segs);
    for (id, pid) in &answered {
        let times = seen.get(id).map_or(0, |s| s.0);
        if *pid == victim {
            assert!(times <= 1, "id {id} logged {times} times");
        } else {
            assert_eq!(times, 1, "id {id} (worker {pid}) logged {times} times");
        }
    }
    for (id, (times, _)) in &seen {
        assert!(
            answered.contains_key(id) || uncertain.contains(id),
            "id {id} never sent"
        );
        assert_eq!(*times, 1, "id {id} doubled");
    }
}

const ODD_CONF: &str = r#"
    large_client_header_buffers 4 128k;
    logtally_spool @DIR@/spool flush=20ms;
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field q $arg_q;
        logtally_field big $http_x_big;
        logtally_field raw $http_x_raw;
        logtally_field b $arg_b;
        logtally_field e $arg_e;
        logtally_field he $http_x_empty;
        logtally_field none $arg_none;
        location / { return 204; }
        location /status { logtally off; logtally_status; }
    }
"#;

/// Reads one counter from `logtally_status`.
fn status_value(text: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("{name} not in status:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn status(addr: std::net::SocketAddr) -> String {
    let r = HttpClient::new(addr).get(b"/status", &[]).unwrap();
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}

#[test]
fn huge_non_utf8_and_empty_values_are_recorded_or_cut_by_the_rule() {
    let mut n = TestNginx::start(ODD_CONF, 2);
    let workers = n.worker_pids();
    let mut client = HttpClient::new(n.addr());

    let q = "a".repeat(64 * 1024);
    let big = vec![b'b'; 8 * 1024];
    let raw: &[u8] = b"\xff\xfe\x80x\xc3";
    let mut target = format!("/e?q={q}&e=&b=").into_bytes();
    target.extend_from_slice(b"\xff\xfe%zz");
    let r = client
        .get(
            &target,
            &[("X-Big", &big), ("X-Raw", raw), ("X-Empty", b"")],
        )
        .unwrap();
    assert_eq!(r.status, 204);
    // Exactly at the limit: kept whole.
    let q2 = "c".repeat(4096);
    let big2 = vec![b'd'; 4095];
    let r = client
        .get(format!("/e?q={q2}").as_bytes(), &[("X-Big", &big2)])
        .unwrap();
    assert_eq!(r.status, 204);
    // nginx is unharmed: the same workers answer ordinary requests.
    assert_eq!(client.get(b"/e?q=fine", &[]).unwrap().status, 204);
    assert_eq!(n.worker_pids(), workers);

    n.wait_until(Duration::from_secs(10), "3 events", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == 3
    });
    let text = status(n.addr());
    assert_eq!(
        status_value(&text, "logtally_module_truncated_values_total"),
        2
    );
    n.quit();
    assert!(!n.error_log().contains("exited on signal"));

    let segs = read_spool(&n.dir().join("spool"));
    assert_clean(&segs);
    let events = all_events(&segs);
    assert_eq!(events.len(), 3);
    // Find each request's record by the first byte of its `q`.
    let find = |first: u8| {
        events
            .iter()
            .find(|(s, e)| s.value(e, "q").and_then(|q| q.first()) == Some(&first))
            .copied()
            .unwrap_or_else(|| panic!("no record with q starting {:?}", first as char))
    };
    // Long values are compared with assert! to keep failure output readable.
    let (s, e) = find(b'a');
    assert!(
        s.value(e, "q") == Some(&q.as_bytes()[..4096]),
        "q cut to 4096 bytes"
    );
    assert!(
        s.value(e, "big") == Some(&big[..4096]),
        "8 KiB header cut to 4096 bytes"
    );
    assert_eq!(s.value(e, "raw"), Some(raw));
    assert_eq!(s.value(e, "b"), Some(&b"\xff\xfe%zz"[..]));
    assert_eq!(s.value(e, "e"), Some(&b""[..]));
    assert_eq!(s.value(e, "he"), Some(&b""[..]));
    assert_eq!(s.value(e, "none"), None);
    let (s, e) = find(b'c');
    assert!(
        s.value(e, "q") == Some(q2.as_bytes()),
        "4096 bytes kept whole"
    );
    assert!(
        s.value(e, "big") == Some(&big2[..]),
        "4095 bytes kept whole"
    );
    assert_eq!(s.value(e, "raw"), None);
    let (s, e) = find(b'f');
    assert_eq!(s.value(e, "q"), Some(&b"fine"[..]));
}

const PAD_CONF: &str = r#"
    logtally_spool @DIR@/spool flush=20ms fsync=off;
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field id $arg_id;
        logtally_field pad $http_x_pad;
        location / { return 204; }
        location /status { logtally off; logtally_status; }
    }
"#;

#[test]
fn a_spool_that_cannot_take_writes_never_hurts_nginx() {
    const TOTAL: u64 = 3000;
    // A 1 MiB tmpfs fills after ~1000 of these records; without mount rights, a spool
    // folder the workers may not write into does the same from the first record.
    let mut mount = None;
    let mut n = TestNginx::start_with(PAD_CONF, 2, |dir| {
        mount = TmpfsMount::at(&dir.join("spool"), "size=1m");
    });
    let full_disk = mount.is_some();
    if !full_disk {
        eprintln!("cannot mount tmpfs here: using a read-only spool folder instead");
        let spool = n.dir().join("spool");
        std::fs::set_permissions(&spool, std::os::unix::fs::PermissionsExt::from_mode(0o500))
            .unwrap();
    }
    let pad = vec![b'p'; 1000];
    let addr = n.addr();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let pad = pad.clone();
            std::thread::spawn(move || {
                let mut client = HttpClient::new(addr);
                for id in (t..TOTAL).step_by(4) {
                    let r = client.get(format!("/e?id={id}").as_bytes(), &[("X-Pad", &pad)]);
                    assert_eq!(r.expect("nginx answers").status, 204, "id {id}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    n.wait_until(
        Duration::from_secs(20),
        "every event written or dropped",
        || {
            let text = status(addr);
            status_value(&text, "logtally_module_events_total")
                + status_value(&text, "logtally_module_dropped_total")
                == TOTAL
        },
    );
    let text = status(addr);
    let dropped = status_value(&text, "logtally_module_dropped_total");
    let written = status_value(&text, "logtally_module_events_total");
    assert!(dropped > 0, "{text}");
    assert!(
        status_value(&text, "logtally_module_write_errors_total") > 0,
        "{text}"
    );
    if full_disk {
        assert!(written > 0, "the first MiB was written: {text}");
    }
    assert!(n.error_log().contains("logtally: writing to spool"));
    assert!(!n.error_log().contains("exited on signal"));

    // What did reach the spool is intact, and its drop markers count what did not (up to
    // drops whose marker could not be written either).
    let segs = read_spool(&n.dir().join("spool"));
    let events: usize = segs.iter().map(|s| s.events.len()).sum();
    assert_eq!(events as u64, written);
    for s in &segs {
        assert_eq!(s.corrupt_bytes, 0);
    }
    // nginx first, then the mount, then the prefix folder it sits in.
    n.stop();
    drop(mount);
    drop(n);
}

#[test]
fn status_is_valid_prometheus_text_with_the_counts_sent() {
    const TOTAL: u64 = 300;
    let n = TestNginx::start(ODD_CONF, 2);
    let mut client = HttpClient::new(n.addr());
    let long = "z".repeat(5000);
    for i in 0..TOTAL {
        let target = if i % 100 == 0 {
            format!("/e?q={long}")
        } else {
            format!("/e?q={i}")
        };
        assert_eq!(client.get(target.as_bytes(), &[]).unwrap().status, 204);
    }
    n.wait_until(Duration::from_secs(10), "all events written", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == TOTAL
    });
    let r = HttpClient::new(n.addr()).get(b"/status", &[]).unwrap();
    let text = String::from_utf8(r.body).unwrap();
    let check = logtally_e2e::prometheus::promtool(&["check", "metrics"], Some(text.as_bytes()));
    assert!(
        check.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for name in [
        "events_total",
        "dropped_total",
        "bytes_total",
        "segments_total",
        "truncated_values_total",
    ] {
        let full = format!("logtally_module_{name}");
        assert!(text.contains(&format!("# HELP {full} ")), "{text}");
        assert!(text.contains(&format!("# TYPE {full} counter")), "{text}");
    }
    assert_eq!(status_value(&text, "logtally_module_dropped_total"), 0);
    assert_eq!(
        status_value(&text, "logtally_module_truncated_values_total"),
        3
    );
    assert_eq!(status_value(&text, "logtally_module_segments_total"), 0);
    // Every byte after the headers of the (still open) segments was counted.
    let segs = read_spool(&n.dir().join("spool"));
    let on_disk: usize = segs.iter().map(|s| s.file_len - s.header_len).sum();
    assert_eq!(
        status_value(&text, "logtally_module_bytes_total"),
        on_disk as u64
    );
    assert_eq!(
        segs.iter().map(|s| s.events.len()).sum::<usize>() as u64,
        TOTAL
    );
}

#[test]
fn levels_inherit_switch_off_and_leave_undeclared_fields_absent() {
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms;
        logtally on;
        logtally_field a $arg_a;
        logtally_field b $arg_b;
        server {
            listen 127.0.0.1:@PORT@;
            location /inherit { return 204; }
            location /off { logtally off; return 204; }
            location /own { logtally_field c $arg_c; return 204; }
            location /status { logtally off; logtally_status; }
        }
    "#;
    let mut n = TestNginx::start(conf, 2);
    let mut client = HttpClient::new(n.addr());
    for t in ["/inherit?a=1&b=2&c=3", "/off?a=9", "/own?a=1&b=2&c=3"] {
        assert_eq!(client.get(t.as_bytes(), &[]).unwrap().status, 204);
    }
    n.wait_until(Duration::from_secs(10), "2 events", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == 2
    });
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    let mut values: Vec<Vec<Option<Vec<u8>>>> = all_events(&segs)
        .into_iter()
        .map(|(_, e)| e.values.clone())
        .collect();
    values.sort();
    for s in &segs {
        assert_eq!(s.fields, ["a", "b", "c"]);
    }
    let v = |s: &str| Some(s.as_bytes().to_vec());
    assert_eq!(
        values,
        vec![vec![None, None, v("3")], vec![v("1"), v("2"), None]]
    );
}

#[test]
fn a_full_queue_drops_counts_and_marks_the_spool() {
    // A bound in records, and one in bytes (about 30 of these events).
    for queue in ["8", "1k"] {
        a_full_queue_drops_counts_and_marks(queue);
    }
}

fn a_full_queue_drops_counts_and_marks(queue: &str) {
    const TOTAL: u64 = 400;
    let conf = r#"
        logtally_spool @DIR@/spool flush=1s queue=@QUEUE@;
        server {
            listen 127.0.0.1:@PORT@;
            logtally on;
            logtally_field id $arg_id;
            location / { return 204; }
            location /status { logtally off; logtally_status; }
        }
    "#
    .replace("@QUEUE@", queue);
    let mut n = TestNginx::start(&conf, 2);
    let mut client = HttpClient::new(n.addr());
    // Far faster than one writer wake (1 s) can take 8 records per worker.
    for id in 0..TOTAL {
        assert_eq!(
            client
                .get(format!("/e?id={id}").as_bytes(), &[])
                .unwrap()
                .status,
            204
        );
    }
    let (written, dropped) = written_and_dropped(&n, TOTAL);
    assert!(
        dropped > 0 && written >= 8,
        "queue={queue}: {written} written, {dropped} dropped"
    );
    spool_agrees_with_counters(&mut n, written, dropped);
}

/// Waits until the module's counters account for all `total` events sent, and returns
/// them: (written, dropped).
fn written_and_dropped(n: &TestNginx, total: u64) -> (u64, u64) {
    let counts = || {
        let text = status(n.addr());
        (
            status_value(&text, "logtally_module_events_total"),
            status_value(&text, "logtally_module_dropped_total"),
        )
    };
    n.wait_until(
        Duration::from_secs(20),
        "every event written or dropped",
        || {
            let (written, dropped) = counts();
            written + dropped == total
        },
    );
    counts()
}

/// Stops nginx, then checks the spool against the counters: clean segments, `written`
/// events with distinct ids, drop markers summing to `dropped`. Returns the ids.
fn spool_agrees_with_counters(n: &mut TestNginx, written: u64, dropped: u64) -> HashSet<u64> {
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    assert_clean(&segs);
    let ids: HashSet<u64> = all_events(&segs)
        .into_iter()
        .map(|(s, e)| id_of(s, e))
        .collect();
    let events: usize = segs.iter().map(|s| s.events.len()).sum();
    assert_eq!(events as u64, written, "events in the spool vs counted");
    assert_eq!(ids.len(), events, "no id twice");
    let markers: u64 = segs.iter().map(|s| s.dropped).sum();
    assert_eq!(markers, dropped, "drop markers carry every dropped event");
    ids
}

/// An ext4 image, loop-mounted for a test, that `fsfreeze` can stall like a hung disk:
/// writes to it block (uninterruptibly) until it is thawed. Thawed and unmounted on drop.
struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
}

impl LoopFs {
    /// `None` where loop mounts are not allowed.
    fn new(mount: &Path) -> Option<LoopFs> {
        let image = mount.with_extension("img");
        std::fs::File::create(&image).ok()?.set_len(64 << 20).ok()?;
        std::fs::create_dir_all(mount).ok()?;
        let run = |cmd: &mut Command| cmd.status().is_ok_and(|s| s.success());
        let ok = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))
            && run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(mount));
        if !ok {
            let _ = std::fs::remove_file(&image);
            return None;
        }
        Some(LoopFs {
            image,
            mount: mount.to_path_buf(),
        })
    }

    /// Freezes the filesystem; the returned guard thaws it when dropped (also on panic, so
    /// a failing test never leaves processes stuck in the kernel).
    fn freeze(&self) -> Frozen<'_> {
        let ok = Command::new("fsfreeze").arg("-f").arg(&self.mount).status();
        assert!(ok.is_ok_and(|s| s.success()), "fsfreeze -f");
        Frozen(self)
    }

    fn thaw(&self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).status();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.thaw();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

struct Frozen<'a>(&'a LoopFs);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.thaw();
    }
}

/// Whether some thread of these processes sleeps uninterruptibly (state D: stuck in I/O).
fn any_thread_stuck(pids: &[i32]) -> bool {
    pids.iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('D')))
                    .unwrap_or(false)
            })
    })
}

/// nginx with its spool folder on a loop-mounted file system that the test can freeze;
/// `None` where mounting is not allowed. (Bound in this order, nginx is dropped, and
/// stopped, before the file system is.)
fn start_on_loop_fs(conf: &str, workers: usize) -> Option<(LoopFs, TestNginx)> {
    let mut disk = None;
    let n = TestNginx::start_with(conf, workers, |dir| disk = LoopFs::new(&dir.join("spool")));
    Some((disk?, n))
}

/// Resident memory of a process, in bytes (`VmRSS`).
fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn a_frozen_disk_holds_a_worker_to_its_byte_queue_and_every_drop_is_counted() {
    const QUEUE: u64 = 256 << 10;
    const WARM: u64 = 200;
    const TOTAL: u64 = 3000;
    let conf = PAD_CONF.replace("fsync=off", "queue=256k");
    let Some((disk, mut n)) = start_on_loop_fs(&conf, 1) else {
        eprintln!("NOT RUN: cannot loop-mount here (needs root): frozen-disk memory bound");
        return;
    };
    let worker = n.worker_pids()[0];
    // 4 KiB a request: 12 MB in all, 47 times the queue.
    let pad = vec![b'p'; 4000];
    let mut client = HttpClient::new(n.addr());
    let mut send = |ids: std::ops::Range<u64>, pad: &[u8]| {
        for id in ids {
            let target = format!("/e?id={id}");
            let r = client.get(target.as_bytes(), &[("X-Pad", pad)]).unwrap();
            assert_eq!(r.status, 204);
        }
    };
    // Small events first: none dropped.
    send(0..WARM, b"");
    n.wait_until(Duration::from_secs(10), "the first events on disk", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == WARM
    });
    let before = rss_bytes(worker);
    let frozen = disk.freeze();
    send(WARM..TOTAL, &pad);
    n.wait_until(
        Duration::from_secs(10),
        "the writer stuck on the disk",
        || any_thread_stuck(&[worker]),
    );
    let grown = rss_bytes(worker).saturating_sub(before);
    // Both buffers together hold at most QUEUE bytes; the rest is allocator slack.
    assert!(
        grown < 4 << 20,
        "worker grew by {grown} bytes with a {QUEUE}-byte queue and a frozen disk"
    );
    drop(frozen);
    let (written, dropped) = written_and_dropped(&n, TOTAL);
    assert!(dropped > TOTAL / 2, "{written} written, {dropped} dropped");
    let ids = spool_agrees_with_counters(&mut n, written, dropped);
    assert!((0..WARM).all(|id| ids.contains(&id)));
    drop(disk);
}

#[test]
fn a_stalled_disk_never_stalls_requests_or_reloads() {
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms;
        server {
            listen 127.0.0.1:@PORT@;
            logtally on;
            logtally_field id $arg_id;
            location / { return 204; }
            location /status { logtally off; logtally_status; }
        }
    "#;
    let Some((disk, mut n)) = start_on_loop_fs(conf, 2) else {
        eprintln!("cannot loop-mount here: stalled disk test skipped");
        return;
    };
    // A connection per request: the old workers close idle keep-alive connections when
    // they retire.
    let mut client = HttpClient::one_shot(n.addr());
    let mut send = |ids: std::ops::Range<u64>| {
        for id in ids {
            let start = std::time::Instant::now();
            let r = client
                .get(format!("/e?id={id}").as_bytes(), &[])
                .expect("answer");
            assert_eq!(r.status, 204);
            // The disk stays frozen until all of these are answered: a request that waited
            // on it would not be answered at all. The bound only keeps the test short.
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "request {id} waited on the disk"
            );
        }
    };
    send(0..200);
    n.wait_until(Duration::from_secs(10), "200 events on disk", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == 200
    });

    let frozen = disk.freeze();
    send(200..700);
    let old = n.worker_pids();
    n.wait_until(
        Duration::from_secs(10),
        "a writer stuck on the frozen disk",
        || any_thread_stuck(&old),
    );
    // Reloading retires the old workers: their writers cannot finish, and exit_process
    // gives up on them after its time limit instead of hanging.
    n.reload();
    n.wait_until(Duration::from_secs(20), "new workers", || {
        let now = n.worker_pids();
        now.len() == 2 && now.iter().all(|p| !old.contains(p))
    });
    send(700..800);
    n.wait_until(
        Duration::from_secs(20),
        "old workers giving up on their writers",
        || {
            n.error_log()
                .matches("the writer did not finish within 3s")
                .count()
                >= 1
        },
    );
    drop(frozen);
    n.wait_until(Duration::from_secs(20), "old workers to exit", || {
        n.children().iter().all(|(pid, _)| !old.contains(pid))
    });
    n.quit();

    let segs = read_spool(&n.dir().join("spool"));
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (s, e) in all_events(&segs) {
        *seen.entry(id_of(s, e)).or_default() += 1;
    }
    for s in &segs {
        assert_eq!(s.corrupt_bytes, 0, "{}", s.path.display());
    }
    // Written before the stall, and served by the new workers (their writers waited for
    // the thaw, then drained at quit): all there, once. Those queued in the abandoned
    // writers may be lost, never doubled.
    for id in (0..200).chain(700..800) {
        assert_eq!(seen.get(&id), Some(&1), "id {id}");
    }
    assert!(seen.values().all(|&times| times == 1));
    drop(disk);
}

/// An http block where `logtally_field` and a stock access_log format (tab-separated) read
/// the same values in one order, for [`events_against_access_log`]: `http_extra` goes at
/// http level, `server_body` into the one server (logtally and access_log on there).
fn compared_conf(pairs: &[(&str, &str)], http_extra: &str, server_body: &str) -> String {
    let fields: String = pairs
        .iter()
        .map(|(name, value)| format!("logtally_field {name} {value};\n"))
        .collect();
    let format: Vec<&str> = pairs
        .iter()
        .map(|(_, value)| value.trim_matches('"'))
        .collect();
    format!(
        "logtally_spool @DIR@/spool flush=20ms;
        {fields}
        log_format same '{}';
        {http_extra}
        server {{
            listen 127.0.0.1:@PORT@;
            logtally on;
            # The harness switches access_log off at http level.
            access_log @DIR@/access.log same;
            {server_body}
        }}",
        format.join("\\t")
    )
}

/// Stops nginx (one worker, so events and access_log lines are in the same order) and
/// checks every event against the stock access_log line nginx wrote for the same request,
/// field by field (absent is access_log's `-`). Returns the rows, by field name.
fn events_against_access_log(
    n: &mut TestNginx,
    pairs: &[(&str, &str)],
) -> Vec<HashMap<String, String>> {
    let names: Vec<&str> = pairs.iter().map(|(name, _)| *name).collect();
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    assert_clean(&segs);
    let log = std::fs::read_to_string(n.dir().join("access.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let events = all_events(&segs);
    assert_eq!(events.len(), lines.len(), "events vs access_log:\n{log}");
    let mut rows = Vec::new();
    for ((seg, e), line) in events.into_iter().zip(lines) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), names.len(), "{line:?}");
        let mut row = HashMap::new();
        for (name, col) in names.iter().zip(cols) {
            let v = seg
                .value(e, name)
                .map_or("-".to_string(), |v| String::from_utf8_lossy(v).into_owned());
            assert_eq!(
                v, col,
                "field {name}: event {v:?}, access_log {col:?} in {line:?}"
            );
            row.insert(name.to_string(), v);
        }
        rows.push(row);
    }
    rows
}

/// A local HTTP upstream serving `count` connections: each gets its response header at
/// once and its 5-byte body `delay` later.
fn slow_upstream(count: usize, delay: Duration) -> (u16, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        for conn in listener.incoming().take(count) {
            let mut conn = conn.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n");
            let _ = conn.flush();
            std::thread::sleep(delay);
            let _ = conn.write_all(b"hello");
        }
    });
    (port, t)
}

fn parse_secs(s: &str) -> f64 {
    s.parse()
        .unwrap_or_else(|_| panic!("not a number of seconds: {s:?}"))
}

#[test]
fn body_bytes_sent_read_by_add_header_is_recorded_as_access_log_writes_it() {
    let pairs = [
        ("bytes", "$body_bytes_sent"),
        ("sent", "$bytes_sent"),
        ("both", "\"$body_bytes_sent/$bytes_sent\""),
        ("xb", "$sent_http_x_b"),
    ];
    let conf = compared_conf(
        &pairs,
        "",
        r#"location / { add_header X-B "$body_bytes_sent $bytes_sent"; return 200 "seventeen bytes!!"; }"#,
    );
    let mut n = TestNginx::start(&conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..3 {
        let r = client.get(b"/", &[]).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"seventeen bytes!!"[..])
        );
    }
    let rows = events_against_access_log(&mut n, &pairs);
    assert_eq!(rows.len(), 3);
    for row in rows {
        // The header was built before any byte went out: the values cached then were 0.
        assert_eq!(
            row["xb"], "0 0",
            "add_header must have read the variables early"
        );
        assert_eq!(row["bytes"], "17");
        let sent: u64 = row["sent"].parse().unwrap();
        assert!(sent > 17, "{row:?}");
        assert_eq!(row["both"], format!("17/{sent}"));
    }
}

#[test]
fn request_time_read_by_add_header_is_recorded_as_access_log_writes_it() {
    const REQUESTS: usize = 3;
    let (upstream, served) = slow_upstream(REQUESTS, Duration::from_millis(300));
    let pairs = [
        ("rt", "$request_time"),
        ("rt_text", "rt=$request_time"),
        ("xrt", "$sent_http_x_rt"),
    ];
    let conf = compared_conf(
        &pairs,
        "",
        &format!("location / {{ add_header X-RT $request_time; proxy_pass http://127.0.0.1:{upstream}; }}"),
    );
    let mut n = TestNginx::start(&conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..REQUESTS {
        let r = client.get(b"/", &[]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    }
    served.join().unwrap();
    let rows = events_against_access_log(&mut n, &pairs);
    assert_eq!(rows.len(), REQUESTS);
    for row in rows {
        let (early, rt) = (parse_secs(&row["xrt"]), parse_secs(&row["rt"]));
        assert!(early < 0.25, "the header went out before the body: {row:?}");
        assert!(rt >= 0.3, "the body came 300 ms after the header: {row:?}");
        assert_eq!(row["rt_text"], format!("rt={}", row["rt"]));
    }
}

/// Not a staleness case (access_log, whose log-phase handler runs before the module's,
/// re-reads non-cacheable variables it logs and so refreshes them for everyone): the
/// upstream values of a proxied location, lists of a failed-over request included, agree
/// with access_log's.
#[test]
fn upstream_variables_of_a_proxied_location_are_recorded_as_access_log_writes_them() {
    const REQUESTS: usize = 4;
    let (upstream, served) = slow_upstream(REQUESTS, Duration::from_millis(100));
    // A port nobody listens on: connecting to it is refused, and nginx tries the next server.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pairs = [
        ("ust", "$upstream_status"),
        ("urt", "$upstream_response_time"),
        ("uaddr", "$upstream_addr"),
        ("both", "\"$upstream_status $upstream_response_time\""),
        ("xurt", "$sent_http_x_urt"),
        ("st", "$status"),
    ];
    let conf = compared_conf(
        &pairs,
        &format!(
            "upstream slow {{ server 127.0.0.1:{dead} max_fails=0; server 127.0.0.1:{upstream}; }}"
        ),
        r#"location / { add_header X-URT "$upstream_response_time"; proxy_pass http://slow; }"#,
    );
    let mut n = TestNginx::start(&conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..REQUESTS {
        assert_eq!(client.get(b"/", &[]).unwrap().status, 200);
    }
    served.join().unwrap();
    let rows = events_against_access_log(&mut n, &pairs);
    assert_eq!(rows.len(), REQUESTS);
    for row in &rows {
        assert_eq!(row["st"], "200");
        assert!(row["ust"].ends_with("200"), "{row:?}");
        assert_eq!(row["both"], format!("{} {}", row["ust"], row["urt"]));
        let last_rt = row["urt"].rsplit(", ").next().unwrap();
        assert!(parse_secs(last_rt) >= 0.1, "{row:?}");
    }
    assert!(
        rows.iter()
            .any(|r| r["ust"] == "502, 200" && r["uaddr"].contains(", ")),
        "no request failed over: {rows:?}"
    );
}

#[test]
fn subrequests_are_recorded_with_log_subrequest_and_leave_the_main_status_alone() {
    let build = logtally_e2e::nginx::NginxBuild::from_env();
    let flags = Command::new(&build.nginx).arg("-V").output().unwrap();
    if !String::from_utf8_lossy(&flags.stderr).contains("--with-http_auth_request_module") {
        eprintln!(
            "NOT RUN: {} has no auth_request module (Debian's has)",
            build.nginx.display()
        );
        return;
    }
    let pairs = [("uri", "$uri"), ("st", "$status"), ("text", "st=$status")];
    let conf = compared_conf(
        &pairs,
        "",
        r#"log_subrequest on;
            # A content handler (`return` would answer before the access phase's auth).
            location /private { auth_request /auth; root @DIR@/www; }
            location = /auth { internal; return 204; }"#,
    );
    let mut n = TestNginx::start_with(&conf, 1, |dir| {
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/private"), b"ok").unwrap();
    });
    let mut client = HttpClient::new(n.addr());
    for _ in 0..2 {
        let r = client.get(b"/private", &[]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    }
    let rows = events_against_access_log(&mut n, &pairs);
    let got: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r["uri"].as_str(), r["st"].as_str(), r["text"].as_str()))
        .collect();
    let sub = ("/auth", "204", "st=204");
    let main = ("/private", "200", "st=200");
    assert_eq!(got, [sub, main, sub, main]);
}

#[test]
fn status_scrapes_are_never_recorded_even_where_logtally_is_on() {
    const REQUESTS: u64 = 5;
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms;
        logtally on;
        logtally_field uri $uri;
        server {
            listen 127.0.0.1:@PORT@;
            location / { return 204; }
            location /status { logtally_status; location /status/nested { return 204; } }
        }
    "#;
    let mut n = TestNginx::start(conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..REQUESTS {
        assert_eq!(client.get(b"/e", &[]).unwrap().status, 204);
    }
    // A nested location does not serve the counters, so it does not inherit the exemption.
    assert_eq!(client.get(b"/status/nested", &[]).unwrap().status, 204);
    // Every poll is a scrape that logtally must not count.
    n.wait_until(Duration::from_secs(10), "the events written", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == REQUESTS + 1
    });
    for _ in 0..5 {
        status(n.addr());
    }
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    let uris: Vec<&[u8]> = all_events(&segs)
        .into_iter()
        .map(|(s, e)| s.value(e, "uri").unwrap())
        .collect();
    let mut want = vec![&b"/e"[..]; REQUESTS as usize];
    want.push(b"/status/nested");
    assert_eq!(uris, want);
}

#[test]
fn internal_redirects_record_the_final_location_and_args_stay_raw() {
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms;
        log_format where '$uri\t$arg_q';
        logtally on;
        server {
            listen 127.0.0.1:@PORT@;
            logtally_field uri $uri;
            logtally_field q $arg_q;
            access_log @DIR@/access.log where;
            location /start { logtally_field where start; rewrite ^ /end last; }
            location /end { logtally_field where end; logtally_field q $arg_q; return 204; }
            location /to-off { error_page 404 = /off; return 404; }
            location /off { logtally off; return 204; }
        }
    "#;
    let mut n = TestNginx::start(conf, 1);
    let mut client = HttpClient::new(n.addr());
    for target in [&b"/start?q=a%20b+c%2F"[..], b"/to-off?q=x"] {
        assert_eq!(client.get(target, &[]).unwrap().status, 204);
    }
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    let events = all_events(&segs);
    // One event, with the fields of the location the request ended in (its `where`, and no
    // server-level `uri`), the query argument as the client sent it (not URL-decoded);
    // the redirect into a `logtally off` location records nothing, as access_log
    // follows the final location too.
    assert_eq!(events.len(), 1);
    let (seg, e) = events[0];
    assert_eq!(seg.value(e, "where"), Some(&b"end"[..]));
    assert_eq!(seg.value(e, "uri"), None);
    assert_eq!(seg.value(e, "q"), Some(&b"a%20b+c%2F"[..]));
    let log = std::fs::read_to_string(n.dir().join("access.log")).unwrap();
    // (error_page drops the arguments of a redirect without its own.)
    assert_eq!(log, "/end\ta%20b+c%2F\n/off\t-\n");
}

/// The `Uid:` and `Gid:` (effective) of a process, from /proc.
fn process_ids(pid: i32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let effective = |key: &str| {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    (effective("Uid:"), effective("Gid:"))
}

#[test]
fn the_spool_folder_is_the_worker_users_with_group_access_as_documented() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("NOT RUN: needs root (an nginx master that switches its workers to a user)");
        return;
    }
    const OPERATORS_GROUP: u32 = 4242;
    for premade in [false, true] {
        let mut n = TestNginx::start_with(GOOD, 1, |dir| {
            if premade {
                // An operator's folder with a group of their choosing (e.g. the sidecar's).
                let spool = dir.join("spool");
                std::fs::create_dir(&spool).unwrap();
                std::os::unix::fs::chown(&spool, Some(0), Some(OPERATORS_GROUP)).unwrap();
                let mode = std::os::unix::fs::PermissionsExt::from_mode(0o750);
                std::fs::set_permissions(&spool, mode).unwrap();
            }
        });
        let (worker_uid, worker_gid) = process_ids(n.worker_pids()[0]);
        assert_ne!(worker_uid, 0, "workers run as an unprivileged user");
        assert_eq!(
            HttpClient::new(n.addr()).get(b"/?a=1", &[]).unwrap().status,
            204
        );
        n.quit();
        let spool = n.dir().join("spool");
        let meta = std::fs::metadata(&spool).unwrap();
        let group = if premade { OPERATORS_GROUP } else { worker_gid };
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o2770, worker_uid, group),
            "spool folder (premade: {premade}): mode, owner, group"
        );
        let segs = read_spool(&spool);
        assert_eq!(segs.len(), 1);
        let seg = std::fs::metadata(&segs[0].path).unwrap();
        assert_eq!(
            (seg.mode() & 0o7777, seg.uid(), seg.gid()),
            (0o640, worker_uid, group),
            "segment (premade: {premade}): mode, owner, group (the folder's: setgid)"
        );
    }
}

#[test]
fn ssi_subrequests_are_recorded_with_log_subrequest_each_with_its_own_status() {
    let pairs = [("uri", "$uri"), ("st", "$status"), ("text", "st=$status")];
    let conf = compared_conf(
        &pairs,
        "",
        r#"log_subrequest on;
            location /page { ssi on; default_type text/html; root @DIR@/www; }
            location = /part { internal; return 202 "part"; }"#,
    );
    let mut n = TestNginx::start_with(&conf, 1, |dir| {
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(
            dir.join("www/page"),
            b"a<!--# include virtual=\"/part\" -->b",
        )
        .unwrap();
    });
    // (The answer is chunked, which the test client does not read: the events below show
    // the include ran.)
    let r = HttpClient::one_shot(n.addr()).get(b"/page", &[]).unwrap();
    assert_eq!(r.status, 200);
    let rows = events_against_access_log(&mut n, &pairs);
    let got: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r["uri"].as_str(), r["st"].as_str(), r["text"].as_str()))
        .collect();
    assert_eq!(
        got,
        [("/part", "202", "st=202"), ("/page", "200", "st=200")]
    );
}

#[test]
fn segments_deleted_by_hand_are_noticed_counted_and_replaced() {
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms fsync=1s;
        server {
            listen 127.0.0.1:@PORT@;
            logtally on;
            logtally_field id $arg_id;
            location / { return 204; }
            location /status { logtally_status; }
        }
    "#;
    let mut n = TestNginx::start(conf, 1);
    let mut client = HttpClient::new(n.addr());
    let mut send = |ids: std::ops::Range<u64>| {
        for id in ids {
            let target = format!("/e?id={id}");
            assert_eq!(client.get(target.as_bytes(), &[]).unwrap().status, 204);
        }
    };
    send(0..10);
    n.wait_until(Duration::from_secs(10), "the first events on disk", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == 10
    });
    let spool = n.dir().join("spool");
    for e in std::fs::read_dir(&spool).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    // The writer looks at its open segment's links when it syncs (every second here), with
    // or without traffic.
    n.wait_until(Duration::from_secs(10), "the deletion noticed", || {
        n.error_log().contains("was deleted while open")
    });
    send(10..20);
    n.wait_until(Duration::from_secs(10), "the later events on disk", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == 20
    });
    let text = status(n.addr());
    assert_eq!(
        status_value(&text, "logtally_module_unlinked_segments_total"),
        1
    );
    n.quit();
    let segs = read_spool(&spool);
    assert_clean(&segs);
    let mut ids: Vec<u64> = all_events(&segs)
        .into_iter()
        .map(|(s, e)| id_of(s, e))
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (10..20).collect::<Vec<_>>(),
        "the new segment holds the rest"
    );
}
