//! Citus (distributed PostgreSQL) for real: a coordinator and two workers on loopback
//! ([`logtally_e2e::citus`]), real nginx with the module and today's sidecar binary. The
//! tests create the tables the way `distribute_by` is to create them: the rule table by the
//! sidecar's own DDL, then `create_distributed_table` on a `group_by` column; the checkpoint
//! table by the sidecar's DDL, then `citus_add_local_table_to_metadata` (a coordinator-local
//! Citus table: see docs/scaling.md for why). Truth is what the test sent.
//!
//! Citus is built by hand (`scripts/citus-build.sh`); where it is missing every test prints
//! `SKIPPED: citus not installed (run scripts/citus-build.sh)` and returns. The tests start
//! three PostgreSQL servers each: run them one at a time on a small machine
//! (`cargo test --release -p logtally-e2e --test citus -- --test-threads 1`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use logtally::store::{checkpoint_table, create_sql, rule_table};
use logtally_e2e::citus::{citus_missing, distribution, Session, TestCitus};
use logtally_e2e::edge::{expected, pair_logs, wait_for_totals, Pair, Req, RULE};
use logtally_e2e::nginx::HttpClient;
use logtally_e2e::sidecar::Db;
use rand::{Rng, SeedableRng};

/// Prints loudly why a test cannot run here and returns from it.
macro_rules! require_citus {
    () => {
        if let Some(why) = citus_missing() {
            eprintln!("SKIPPED: citus not installed (run scripts/citus-build.sh): {why}");
            return;
        }
    };
}

/// The `group_by` column the tests distribute on.
const DISTRIBUTE_BY: &str = "ad";

/// Creates the rule tables and the checkpoint table as `distribute_by` is to: the sidecar's
/// own `CREATE TABLE`, then each rule table distributed on `column` and the checkpoint table
/// made a coordinator-local Citus table.
fn create_tables(db: &Db, column: &str) {
    let config = logtally::config::parse(
        Path::new("citus-test.toml"),
        &format!("database_url = \"{}\"\n{RULE}", db.url()),
    )
    .unwrap();
    for rule in &config.rules {
        db.execute(&create_sql(&rule_table(rule)));
        db.execute(&format!(
            "SELECT create_distributed_table('{}', '{column}')",
            rule.table
        ));
    }
    db.execute(&create_sql(&checkpoint_table()));
    db.execute("SELECT citus_add_local_table_to_metadata('logtally_checkpoint')");
}

/// `count` requests over 300 ads × 3 event types (900 keys a minute, spread over the shards).
fn workload(count: usize, seed: u64) -> Vec<Req> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| Req {
            ad: rng.gen_range(0..300),
            ev: rng.gen_range(0..3),
            n: rng.gen_range(0..1000),
        })
        .collect()
}

/// Events per worker port, counted by each worker over its own shard placements.
fn events_per_worker(db: &Db) -> BTreeMap<i32, i64> {
    db.query(
        "SELECT nodeport, sum(result::bigint)::bigint FROM run_command_on_placements(\
         'ad_events_1m', 'SELECT coalesce(sum(events), 0) FROM %s') GROUP BY nodeport",
    )
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Sends `reqs` to `addr` from `threads` keep-alive clients, counting answers in `sent`.
/// Every request must get its 204 (nginx answers whatever the sidecar and database do).
fn send(addr: SocketAddr, reqs: &[Req], threads: usize, sent: &AtomicUsize) {
    std::thread::scope(|s| {
        for chunk in reqs.chunks(reqs.len().div_ceil(threads)) {
            s.spawn(move || {
                let mut client = HttpClient::new(addr);
                for r in chunk {
                    let target = r.target();
                    let resp = client
                        .get(target.as_bytes(), &[])
                        .unwrap_or_else(|e| panic!("{target}: {e}"));
                    assert_eq!(resp.status, 204, "{target}");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
}

/// Waits (at most `limit`) until `cond` holds; panics naming `what`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

#[test]
fn cluster_starts_with_the_tables_distributed_and_a_worker_restarts() {
    require_citus!();
    let mut cluster = TestCitus::start(2);
    let db = cluster.db();
    let nodes = db
        .query("SELECT nodeport, groupid, shouldhaveshards FROM pg_dist_node ORDER BY groupid")
        .unwrap();
    let ports: Vec<i32> = nodes.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        ports,
        vec![
            i32::from(cluster.coordinator_port()),
            i32::from(cluster.worker_port(0)),
            i32::from(cluster.worker_port(1))
        ]
    );
    create_tables(&db, DISTRIBUTE_BY);
    let rules = distribution(&db, "ad_events_1m").expect("ad_events_1m in Citus' metadata");
    assert_eq!((rules.method, rules.column.as_deref()), ('h', Some("ad")));
    let checkpoint = distribution(&db, "logtally_checkpoint").expect("checkpoint in metadata");
    assert_eq!((checkpoint.method, checkpoint.column), ('n', None));
    // The checkpoint's one shard lives on the coordinator (group 0), nowhere else.
    let groups = db
        .query(
            "SELECT p.groupid FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid) \
             WHERE s.logicalrelid = 'logtally_checkpoint'::regclass",
        )
        .unwrap();
    let groups: Vec<i32> = groups.iter().map(|r| r.get(0)).collect();
    assert_eq!(groups, vec![0]);
    // The rule table's shards are spread over both workers.
    let per_worker = db
        .query(
            "SELECT nodeport, count(*) FROM citus_shards \
             WHERE table_name = 'ad_events_1m'::regclass GROUP BY nodeport ORDER BY nodeport",
        )
        .unwrap();
    assert_eq!(per_worker.len(), 2, "shards on both workers");

    cluster.stop_worker(1);
    assert!(
        db.query("SELECT count(*) FROM ad_events_1m").is_err(),
        "a query over every shard answered with a worker down"
    );
    cluster.start_worker(1);
    let n: i64 = db.query("SELECT count(*) FROM ad_events_1m").unwrap()[0].get(0);
    assert_eq!(n, 0);
}

#[test]
fn four_nginx_sidecar_pairs_feed_distributed_tables_exactly() {
    require_citus!();
    let cluster = TestCitus::start(2);
    let db = cluster.db();
    create_tables(&db, DISTRIBUTE_BY);
    let pairs: Vec<Pair> = (0..4)
        .map(|i| Pair::start(&cluster.url(), &format!("edge-{i}"), 1))
        .collect();
    let reqs = workload(40_000, 15);
    let sent = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for (pair, part) in pairs.iter().zip(reqs.chunks(10_000)) {
            let sent = &sent;
            s.spawn(move || send(pair.nginx.addr(), part, 2, sent));
        }
    });
    assert_eq!(sent.load(Ordering::Relaxed), 40_000);
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(120), &|| {
        format!("{}\n{}", pair_logs(&pairs), cluster.server_logs())
    });
    // The workers themselves hold the events: both some, together all.
    let per_worker = events_per_worker(&db);
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert!(per_worker.values().all(|&n| n > 0), "{per_worker:?}");
    assert_eq!(per_worker.values().sum::<i64>(), 40_000);
    let nodes: i64 = db
        .query("SELECT count(DISTINCT node) FROM logtally_checkpoint")
        .unwrap()[0]
        .get(0);
    assert_eq!(nodes, 4, "nodes with checkpoint rows");
    let flushes: f64 = pairs
        .iter()
        .map(|p| p.metric("logtally_flushes_total{outcome=\"ok\"}"))
        .sum();
    let errors: f64 = pairs
        .iter()
        .map(|p| p.metric("logtally_flushes_total{outcome=\"error\"}"))
        .sum();
    let log = pair_logs(&pairs);
    eprintln!(
        "4 pairs: {flushes} flushes committed, {errors} failed ({} distributed deadlocks)",
        log.matches("distributed deadlock").count()
    );
    for p in pairs {
        assert!(p.sidecar.terminate().success());
    }
}

/// The local TCP ports of process `pid`'s sockets, from `/proc`: which coordinator backend
/// (`pg_stat_activity.client_port`) serves which sidecar.
fn tcp_ports_of(pid: u32) -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.contains(f[9]) {
                if let Some(port) = f[1].rsplit(':').next() {
                    ports.extend(u16::from_str_radix(port, 16).ok());
                }
            }
        }
    }
    ports
}

/// Whether the coordinator shows a transaction open on one of `ports`' connections.
fn flush_in_progress(watch: &Session, ports: &HashSet<u16>) -> bool {
    watch
        .query(
            "SELECT client_port FROM pg_stat_activity \
             WHERE application_name = 'logtally' AND xact_start IS NOT NULL",
        )
        .map(|rows| {
            rows.iter()
                .any(|r| ports.contains(&(r.get::<_, i32>(0) as u16)))
        })
        .unwrap_or(false)
}

#[test]
fn ten_sidecar_kill_nines_during_flushes_count_every_event_once() {
    require_citus!();
    let cluster = TestCitus::start(2);
    let db = cluster.db();
    create_tables(&db, DISTRIBUTE_BY);
    let mut pairs: Vec<Pair> = (0..2)
        .map(|i| Pair::start(&cluster.url(), &format!("edge-{i}"), 1))
        .collect();
    let reqs = workload(100_000, 16);
    let sent = AtomicUsize::new(0);
    let watch = Session::open(&cluster.url());
    std::thread::scope(|s| {
        let loads: Vec<_> = pairs
            .iter()
            .zip(reqs.chunks(50_000))
            .map(|(p, part)| {
                let (addr, sent) = (p.nginx.addr(), &sent);
                s.spawn(move || send(addr, part, 2, sent))
            })
            .collect();
        for k in 0..10 {
            // Spread over the load: at 5%, 12.5%, … 72.5% of it, a sidecar at a time.
            let at = 5_000 + k * 7_500;
            while sent.load(Ordering::Relaxed) < at {
                std::thread::sleep(Duration::from_millis(5));
            }
            let target = k % 2;
            let ports = tcp_ports_of(pairs[target].sidecar.pid());
            wait_until(Duration::from_secs(30), "a flush in progress", || {
                flush_in_progress(&watch, &ports)
            });
            pairs[target].sidecar.kill9_and_restart();
        }
        for l in loads {
            l.join().unwrap();
        }
    });
    assert_eq!(sent.load(Ordering::Relaxed), 100_000);
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(120), &|| {
        format!("{}\n{}", pair_logs(&pairs), cluster.server_logs())
    });
    // Nothing is left half-done on the workers: every prepared transaction was resolved.
    for w in 0..cluster.worker_count() {
        let prepared: i64 = cluster
            .worker_db(w)
            .query("SELECT count(*) FROM pg_prepared_xacts")
            .unwrap()[0]
            .get(0);
        eprintln!("worker {w}: {prepared} prepared transactions left");
    }
    for p in pairs {
        assert!(p.sidecar.terminate().success());
    }
}

#[test]
fn a_worker_restarted_mid_stream_sidecars_back_off_and_catch_up_exactly() {
    require_citus!();
    let mut cluster = TestCitus::start(2);
    let db = cluster.db();
    create_tables(&db, DISTRIBUTE_BY);
    let pairs: Vec<Pair> = (0..2)
        .map(|i| Pair::start(&cluster.url(), &format!("edge-{i}"), 1))
        .collect();
    let reqs = workload(60_000, 17);
    let error_metric = "logtally_flushes_total{outcome=\"error\"}";
    // The load in three phases, each spread over both pairs: before the outage, during it,
    // after it.
    let phase = |part: &[Req]| {
        let sent = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for (p, half) in pairs.iter().zip(part.chunks(part.len().div_ceil(2))) {
                let (addr, sent) = (p.nginx.addr(), &sent);
                s.spawn(move || send(addr, half, 2, sent));
            }
        });
        assert_eq!(sent.load(Ordering::Relaxed), part.len());
    };
    let (before, rest) = reqs.split_at(20_000);
    let (during, after) = rest.split_at(20_000);
    phase(before);
    cluster.stop_worker(1);
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "a failed flush on each sidecar",
        || pairs.iter().all(|p| p.metric(error_metric) > 0.0),
    );
    phase(during);
    // The outage lasts at least 8 s while nginx goes on answering; the spools hold the events.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(stopped.elapsed()));
    cluster.start_worker(1);
    let outage = stopped.elapsed();
    let restarted = Instant::now();
    phase(after);
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(180), &|| {
        format!("{}\n{}", pair_logs(&pairs), cluster.server_logs())
    });
    let caught_up_in = restarted.elapsed();
    for (i, p) in pairs.iter().enumerate() {
        let errors = p.metric(error_metric);
        let log = p.sidecar.log_text();
        // Backoff: attempts double their wait (0.1 s … 5 s), so an 8 s outage costs a
        // handful of attempts, not one per flush interval.
        assert!(
            (1.0..=15.0).contains(&errors),
            "sidecar {i}: {errors} failed flushes\n{log}"
        );
        assert!(
            log.contains("flush failed; the batch is kept and retried"),
            "{log}"
        );
        let first_error = log
            .lines()
            .find(|l| l.contains("flush failed"))
            .unwrap_or_default();
        eprintln!("sidecar {i}: {errors} failed flushes; first: {first_error}");
    }
    let prepared: i64 = cluster
        .worker_db(1)
        .query("SELECT count(*) FROM pg_prepared_xacts")
        .unwrap()[0]
        .get(0);
    eprintln!(
        "worker down {:.1} s; exact {:.1} s after its restart; {prepared} prepared \
         transactions left on it",
        outage.as_secs_f64(),
        caught_up_in.as_secs_f64()
    );
    for p in pairs {
        assert!(p.sidecar.terminate().success());
    }
}
