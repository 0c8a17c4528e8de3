//! The spool folder: its documented owner and mode, and segments deleted by hand noticed,
//! counted and replaced.

use std::time::Duration;

use logtally_e2e::nginx::{read_spool, HttpClient, TestNginx};

use super::{all_events, assert_clean, id_of, status, status_value, GOOD};

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
fn segments_deleted_by_hand_are_noticed_counted_and_replaced() {
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms fsync=1s stop_timeout=15s;
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
