//! A full queue (in records or bytes) and spools that cannot take writes or whose disk is
//! frozen or stalled: events are dropped (counted, marked), requests and reloads never hurt.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use logtally_e2e::nginx::{read_spool, HttpClient, TestNginx};

use super::{all_events, assert_clean, id_of, status, status_value, TmpfsMount};

const PAD_CONF: &str = r#"
    logtally_spool @DIR@/spool flush=20ms fsync=off stop_timeout=15s;
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
fn a_full_queue_drops_counts_and_marks_the_spool() {
    // A bound in records, and one in bytes (about 30 of these events).
    for queue in ["8", "1k"] {
        a_full_queue_drops_counts_and_marks(queue);
    }
}

fn a_full_queue_drops_counts_and_marks(queue: &str) {
    const TOTAL: u64 = 400;
    let conf = r#"
        logtally_spool @DIR@/spool flush=1s queue=@QUEUE@ stop_timeout=15s;
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
        logtally_spool @DIR@/spool flush=20ms stop_timeout=2s;
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
                .matches("the writer did not finish within stop_timeout=2000ms")
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
