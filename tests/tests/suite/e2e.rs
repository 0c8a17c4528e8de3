//! End to end: real nginx with the module, the real sidecar, a real PostgreSQL. Requests
//! with a known distribution go in; the aggregate tables must hold exactly that, also when
//! the sidecar is killed -9 and nginx reloaded during the load, and with several
//! nginx+sidecar pairs feeding one database.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use logtally_e2e::nginx::{HttpClient, TestNginx};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};

const NGINX_BODY: &str = r#"
    logtally_spool @DIR@/spool flush=20ms;
    logtally_field ad $arg_ad;
    logtally_field ev $arg_ev;
    logtally_field n  $arg_n;
    server {
        listen 127.0.0.1:@PORT@;
        location = /e { logtally on; return 204; }
        location = /logtally_status { logtally_status; }
    }
"#;

const EVS: [&str; 3] = ["view", "click", "conversion"];

/// One request of the load: its ad, event type and a numeric value.
#[derive(Debug, Clone, Copy)]
struct Req {
    ad: u32,
    ev: usize,
    n: u32,
}

/// A deterministic, skewed distribution over 50 ads × 3 event types.
fn workload(count: usize, seed: u64) -> Vec<Req> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (x >> 33) as u32;
            let ad = (r % 50) * (r % 7) / 6; // skewed towards small ids
            Req {
                ad,
                ev: ((r >> 8) % 6).min(2) as usize,
                n: (r >> 12) % 1000,
            }
        })
        .collect()
}

/// `(ad, ev) → (events, sum n, min n, max n)`.
type Totals = BTreeMap<(String, String), (i64, i64, i64, i64)>;

fn expected(reqs: &[Req]) -> Totals {
    let mut t = Totals::new();
    for r in reqs {
        let e = t
            .entry((r.ad.to_string(), EVS[r.ev].to_string()))
            .or_insert((0, 0, i64::MAX, i64::MIN));
        e.0 += 1;
        e.1 += i64::from(r.n);
        e.2 = e.2.min(i64::from(r.n));
        e.3 = e.3.max(i64::from(r.n));
    }
    t
}

fn totals(db: &Db) -> Result<Totals, tokio_postgres::Error> {
    let rows = db.query(
        "SELECT ad, ev, sum(events)::bigint, sum(n_sum)::bigint, min(n_min)::bigint, \
         max(n_max)::bigint FROM ad_events_1m GROUP BY ad, ev",
    )?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                (r.get(0), r.get(1)),
                (r.get(2), r.get(3), r.get(4), r.get(5)),
            )
        })
        .collect())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One nginx + one sidecar, with its own spool and node name.
struct Pair {
    nginx: TestNginx,
    sidecar: TestSidecar,
    _dir: tempfile::TempDir,
}

impl Pair {
    fn start(db: &Db, node: &str, workers: usize) -> Pair {
        let nginx = TestNginx::start(NGINX_BODY, workers);
        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr();
        let config = dir.path().join("logtally.toml");
        std::fs::write(
            &config,
            sidecar_config(
                db.url(),
                &nginx.dir().join("spool"),
                dir.path(),
                node,
                listen,
            ),
        )
        .unwrap();
        let sidecar = TestSidecar::start(&config, &dir.path().join("logtally.log"), listen);
        Pair {
            nginx,
            sidecar,
            _dir: dir,
        }
    }
}

fn sidecar_config(url: &str, spool: &Path, dir: &Path, node: &str, listen: SocketAddr) -> String {
    format!(
        r#"spool_dir = "{spool}"
database_url = "{url}"
node = "{node}"
flush_interval = "300ms"
listen = "{listen}"
binlog = "{binlog}"

[[rule]]
table = "ad_events_1m"
bucket = "1m"
group_by = ["ad", "ev"]
metrics = {{ events = "count", n_sum = "sum(n)", n_min = "min(n)", n_max = "max(n)" }}
"#,
        spool = spool.display(),
        binlog = dir.join("binlog").display(),
    )
}

/// Sends `reqs` from `threads` concurrent clients; counts progress in `sent`. Returns, per
/// minute bucket (ms), how many requests certainly fell in it and how many may have.
fn send(
    addr: SocketAddr,
    reqs: &[Req],
    threads: usize,
    one_shot: bool,
    sent: &AtomicUsize,
) -> BTreeMap<i64, (i64, i64)> {
    let chunks: Vec<&[Req]> = reqs.chunks(reqs.len().div_ceil(threads)).collect();
    let minutes = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut client = if one_shot {
                        HttpClient::one_shot(addr)
                    } else {
                        HttpClient::new(addr)
                    };
                    let mut minutes = BTreeMap::<i64, (i64, i64)>::new();
                    for r in chunk {
                        let target = format!("/e?ad={}&ev={}&n={}", r.ad, EVS[r.ev], r.n);
                        let before = now_ms() / 60_000 * 60_000;
                        let resp = client
                            .get(target.as_bytes(), &[])
                            .unwrap_or_else(|e| panic!("{target}: {e}"));
                        let after = now_ms() / 60_000 * 60_000;
                        assert_eq!(resp.status, 204, "{target}");
                        if before == after {
                            minutes.entry(before).or_default().0 += 1;
                        } else {
                            minutes.entry(before).or_default().1 += 1;
                            minutes.entry(after).or_default().1 += 1;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    minutes
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut all = BTreeMap::<i64, (i64, i64)>::new();
    for m in minutes {
        for (k, (sure, maybe)) in m {
            let e = all.entry(k).or_default();
            e.0 += sure;
            e.1 += maybe;
        }
    }
    all
}

/// Polls the table until it equals `want`; on timeout shows the difference and the logs.
fn wait_for_totals(db: &Db, want: &Totals, limit: Duration, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + limit;
    let mut got = Totals::new();
    while Instant::now() < deadline {
        if let Ok(t) = totals(db) {
            if &t == want {
                return;
            }
            got = t;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let want_n: i64 = want.values().map(|v| v.0).sum();
    let got_n: i64 = got.values().map(|v| v.0).sum();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(5)
        .collect();
    panic!("table totals differ: {got_n} events of {want_n}; first differing keys {wrong:?} vs {:?}\n{}",
        wrong.iter().map(|(k, _)| got.get(*k)).collect::<Vec<_>>(), logs());
}

/// Per minute bucket the table's event count lies between the requests that certainly fell
/// in that minute and those that may have (sent across a minute boundary).
fn check_minutes(db: &Db, minutes: &BTreeMap<i64, (i64, i64)>) {
    let rows = db
        .query("SELECT (extract(epoch FROM bucket) * 1000)::bigint, sum(events)::bigint FROM ad_events_1m GROUP BY 1")
        .unwrap();
    for r in rows {
        let (bucket, events): (i64, i64) = (r.get(0), r.get(1));
        let (sure, maybe) = minutes.get(&bucket).copied().unwrap_or_else(|| {
            panic!("bucket {bucket} holds {events} events, none were sent then")
        });
        assert!(
            sure <= events && events <= sure + maybe,
            "bucket {bucket}: {events} events, expected {sure}..={}",
            sure + maybe
        );
    }
}

#[test]
fn a_hundred_thousand_requests_land_exactly() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let pair = Pair::start(&db, "edge-1", 2);
    let reqs = workload(100_000, 1);
    let sent = AtomicUsize::new(0);
    let minutes = send(pair.nginx.addr(), &reqs, 8, false, &sent);
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(60), &|| {
        pair.sidecar.log_text()
    });
    check_minutes(&db, &minutes);
    let read = pair
        .sidecar
        .metric("logtally_events_read_total")
        .unwrap_or(-1.0);
    assert_eq!(read, 100_000.0, "sidecar's events_read counter");
    assert!(pair.sidecar.terminate().success());
}

#[test]
fn exact_through_two_sidecar_kill_nines_and_three_nginx_reloads() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let mut pair = Pair::start(&db, "edge-1", 2);
    let reqs = workload(100_000, 2);
    let sent = Arc::new(AtomicUsize::new(0));
    let addr = pair.nginx.addr();
    let minutes = std::thread::scope(|s| {
        let load = s.spawn(|| send(addr, &reqs, 8, true, &sent));
        // Disturb at fixed points of the load's progress, not at fixed times.
        let plan = [
            (15_000, "kill"),
            (30_000, "reload"),
            (45_000, "kill"),
            (60_000, "reload"),
            (75_000, "reload"),
        ];
        for (at, what) in plan {
            while sent.load(Ordering::Relaxed) < at && !load.is_finished() {
                std::thread::sleep(Duration::from_millis(5));
            }
            match what {
                "kill" => pair.sidecar.kill9_and_restart(),
                _ => pair.nginx.reload(),
            }
        }
        load.join().unwrap()
    });
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(90), &|| {
        format!("{}\n{}", pair.sidecar.log_text(), pair.nginx.error_log())
    });
    check_minutes(&db, &minutes);
    assert!(pair.sidecar.terminate().success());
}

#[test]
fn four_nginx_sidecar_pairs_feed_one_database_exactly() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let pairs: Vec<Pair> = (0..4)
        .map(|i| Pair::start(&db, &format!("edge-{i}"), 1))
        .collect();
    let reqs = workload(40_000, 3);
    let sent = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for (pair, part) in pairs.iter().zip(reqs.chunks(10_000)) {
            let sent = &sent;
            s.spawn(move || send(pair.nginx.addr(), part, 2, false, sent));
        }
    });
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(60), &|| {
        pairs
            .iter()
            .map(|p| p.sidecar.log_text())
            .collect::<Vec<_>>()
            .join("\n---\n")
    });
    // Each node checkpoints its own segments.
    let nodes = db
        .query("SELECT count(DISTINCT node) FROM logtally_checkpoint")
        .unwrap();
    let n: i64 = nodes[0].get(0);
    assert_eq!(n, 4, "nodes with checkpoint rows");
    for p in pairs {
        assert!(p.sidecar.terminate().success());
    }
}
