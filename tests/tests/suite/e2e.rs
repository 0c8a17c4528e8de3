//! End to end: real nginx with the module, the real sidecar, a real PostgreSQL. Requests
//! with a known distribution go in; the aggregate tables must hold exactly that, also when
//! the sidecar is killed -9 and nginx reloaded during the load, and with several
//! nginx+sidecar pairs feeding one database.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use logtally_e2e::edge::{expected, wait_for_totals, Pair, Req};
use logtally_e2e::nginx::HttpClient;
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::Db;

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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
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
                        let target = r.target();
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
    let pair = Pair::start(db.url(), "edge-1", 2);
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
    let mut pair = Pair::start(db.url(), "edge-1", 2);
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
        .map(|i| Pair::start(db.url(), &format!("edge-{i}"), 1))
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
