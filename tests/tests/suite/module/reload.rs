//! Reloads under load and a killed worker: nothing lost or doubled that should not be.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use logtally_e2e::nginx::{read_spool, send_signal, HttpClient, SegmentContents, TestNginx};

use super::{all_events, assert_clean, id_of};

const PID_CONF: &str = r#"
    logtally_spool @DIR@/spool flush=20ms stop_timeout=15s;
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
