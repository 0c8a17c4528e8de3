//! Nginx-sidecar pairs under load on Citus: exact totals from four pairs, `kill -9`s of
//! sidecars mid-flush, a worker restarted mid-stream, and a worker added with the shards
//! rebalanced.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use logtally_e2e::citus::Session;
use logtally_e2e::edge::{expected, pair_logs, wait_for_totals, Pair, Req};

use super::{
    cluster_with_edges, events_per_worker, report_exits, restart_exited, retry_summary, send,
    send_until, wait_for_totals_restarting, wait_until, workload, FLUSH_FAILED,
};

#[test]
fn four_nginx_sidecar_pairs_feed_distributed_tables_exactly() {
    require_citus!();
    let (cluster, db, pairs) = cluster_with_edges(4);
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
    let (cluster, db, mut pairs) = cluster_with_edges(2);
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
    let (mut cluster, db, mut pairs) = cluster_with_edges(2);
    let reqs = workload(60_000, 17);
    // The load in three phases, each spread over both pairs: before the outage, during it,
    // after it.
    let (before, rest) = reqs.split_at(20_000);
    let (during, after) = rest.split_at(20_000);
    send_phase(&pairs, before);
    cluster.stop_worker(1);
    let stopped = Instant::now();
    // nginx goes on answering; the spools hold the events; the flushes fail.
    send_phase(&pairs, during);
    wait_until(
        Duration::from_secs(60),
        "a failed flush on each sidecar",
        || {
            pairs
                .iter()
                .all(|p| p.sidecar.log_text().contains(FLUSH_FAILED))
        },
    );
    // The outage lasts at least 8 s.
    let mut exits = 0;
    while stopped.elapsed() < Duration::from_secs(8) {
        exits += restart_exited(&mut pairs).len();
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.start_worker(1);
    let outage = stopped.elapsed();
    let restarted = Instant::now();
    send_phase(&pairs, after);
    exits += wait_for_totals_restarting(&db, &expected(&reqs), &mut pairs, &cluster);
    let caught_up_in = restarted.elapsed();
    report_exits(exits, &pairs);
    for (i, p) in pairs.iter().enumerate() {
        let log = p.sidecar.log_text();
        let errors = log.matches(FLUSH_FAILED).count();
        // Backoff: attempts double their wait (0.1 s … 5 s), so an 8 s outage costs a
        // handful of attempts, not one per flush interval.
        assert!(
            (1..=15).contains(&errors),
            "sidecar {i}: {errors} failed flushes\n{log}"
        );
        let first_error = log
            .lines()
            .find(|l| l.contains(FLUSH_FAILED))
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

/// Sends `part`, split over the pairs, and waits for every answer.
fn send_phase(pairs: &[Pair], part: &[Req]) {
    let sent = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for (p, half) in pairs
            .iter()
            .zip(part.chunks(part.len().div_ceil(pairs.len())))
        {
            let (addr, sent) = (p.nginx.addr(), &sent);
            s.spawn(move || send(addr, half, 2, sent));
        }
    });
    assert_eq!(sent.load(Ordering::Relaxed), part.len());
}

#[test]
fn a_worker_added_and_shards_rebalanced_under_load_count_exactly() {
    require_citus!();
    let (mut cluster, db, pairs) = cluster_with_edges(2);
    let stop = AtomicBool::new(false);
    let ok = |p: &Pair| p.metric("logtally_flushes_total{outcome=\"ok\"}");
    let started = Instant::now();
    let (reqs, rebalance) = std::thread::scope(|s| {
        let loads: Vec<_> = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (addr, stop) = (p.nginx.addr(), &stop);
                s.spawn(move || send_until(addr, 2_000 + 100 * i as u64, stop))
            })
            .collect();
        wait_until(Duration::from_secs(60), "flushes before the move", || {
            pairs.iter().all(|p| ok(p) >= 3.0)
        });
        // What an operator runs: a new worker (PostgreSQL with Citus, the database, the
        // extension), citus_add_node, then a background rebalance. Shards move by logical
        // replication while the sidecars keep writing.
        let new = cluster.add_worker();
        let began = Instant::now();
        db.execute("SELECT citus_rebalance_start()");
        let mut state = String::new();
        wait_until(Duration::from_secs(600), "the rebalance to finish", || {
            state = db
                .query(
                    "SELECT state::text FROM citus_rebalance_status() ORDER BY job_id DESC LIMIT 1",
                )
                .ok()
                .and_then(|r| r.first().map(|r| r.get(0)))
                .unwrap_or_default();
            assert!(
                !state.starts_with("fail") && state != "cancelled",
                "rebalance {state}"
            );
            state == "finished"
        });
        let took = began.elapsed();
        // The sidecars go on committing after the move.
        let before: Vec<f64> = pairs.iter().map(ok).collect();
        wait_until(Duration::from_secs(60), "flushes after the move", || {
            pairs.iter().zip(&before).all(|(p, b)| ok(p) > *b + 2.0)
        });
        stop.store(true, Ordering::Relaxed);
        let reqs: Vec<Req> = loads.into_iter().flat_map(|l| l.join().unwrap()).collect();
        (reqs, (new, took))
    });
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(120), &|| {
        format!("{}\n{}", pair_logs(&pairs), cluster.server_logs())
    });
    let (new, took) = rebalance;
    let per_worker = events_per_worker(&db);
    let new_port = i32::from(cluster.worker_port(new));
    assert_eq!(per_worker.len(), 3, "{per_worker:?}");
    assert!(
        per_worker.get(&new_port).is_some_and(|&n| n > 0),
        "{per_worker:?}"
    );
    assert_eq!(per_worker.values().sum::<i64>(), reqs.len() as i64);
    let shards = db
        .query(
            "SELECT nodeport, count(*)::bigint FROM citus_shards \
             WHERE table_name = 'ad_events_1m'::regclass GROUP BY 1 ORDER BY 1",
        )
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>();
    eprintln!(
        "{} requests over {:.0} s; rebalance onto worker {new} took {:.1} s; shards per port \
         {shards:?}; events per port {per_worker:?}; {}",
        reqs.len(),
        started.elapsed().as_secs_f64(),
        took.as_secs_f64(),
        retry_summary(&pairs)
    );
    for p in pairs {
        assert!(p.sidecar.terminate().success());
    }
}
