//! The flush benchmark, one PostgreSQL against Citus, run by hand:
//!
//! ```text
//! LOGTALLY_CITUS=1 cargo test --release -p logtally-e2e --test suite citus::bench -- \
//!     --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use logtally_e2e::citus::TestCitus;
use logtally_e2e::edge::EVS;
use logtally_e2e::sidecar::Db;

use super::{citus_rule, position, store_config};

// ---------------------------------------------------------------------------------------
// Benchmark, run by hand:
//   cargo test --release -p logtally-e2e --test suite citus::bench -- --ignored --nocapture
// ---------------------------------------------------------------------------------------

/// Rows per flush of one sidecar in the benchmark (one upsert chunk).
const BENCH_ROWS: usize = 20_000;
const BENCH_ROUNDS: usize = 5;

/// A sidecar's store in the benchmark, with what it committed last.
struct BenchSidecar {
    store: logtally::db::Store,
    config: logtally::config::Config,
    index: usize,
    previous: std::collections::HashMap<String, logtally::db::CheckpointEntry>,
    flushes: u64,
    retries: u64,
}

/// One flush's rows: `BENCH_ROWS` keys from ad `first_ad` on, each count 1 and n = i.
fn bench_rows(first_ad: usize) -> Vec<logtally::aggregate::RuleRows> {
    use logtally::aggregate::{Decimal, MetricValue, Row, RuleRows};
    let scale = 10i128.pow(Decimal::FRACTION_DIGITS);
    let rows = (0..BENCH_ROWS)
        .map(|i| {
            let n = MetricValue::Decimal(Some(Decimal((i % 1000) as i128 * scale)));
            Row {
                bucket_ms: 1_764_288_000_000,
                dims: vec![(first_ad + i / 3).to_string(), EVS[i % 3].to_string()],
                metrics: vec![MetricValue::Count(1), n.clone(), n.clone(), n],
            }
        })
        .collect();
    vec![RuleRows { rule: 0, rows }]
}

impl BenchSidecar {
    async fn connect(url: &str, node: &str, index: usize) -> BenchSidecar {
        // The same rule everywhere: on one PostgreSQL `distribute_by` is only a warning.
        let config = store_config(url, node, &citus_rule());
        let store = logtally::db::Store::connect(&config).await.unwrap();
        BenchSidecar {
            store,
            config,
            index,
            previous: Default::default(),
            flushes: 0,
            retries: 0,
        }
    }

    /// One flush, retried on a new connection after a transient error as the daemon does.
    async fn flush(mut self, rows: Vec<logtally::aggregate::RuleRows>) -> BenchSidecar {
        self.flushes += 1;
        let pos = vec![position(&format!("seg-{}", self.index), self.flushes)];
        loop {
            match self.store.flush(&rows, &pos, &self.previous).await {
                Ok(_) => break,
                Err(e) if e.is_transient() => {
                    self.retries += 1;
                    self.store = logtally::db::Store::connect(&self.config).await.unwrap();
                }
                Err(e) => panic!("flush: {e}"),
            }
        }
        self.previous = pos.into_iter().map(|p| (p.segment.clone(), p)).collect();
        self
    }
}

/// All sidecars flush at once; returns them and the wall time.
async fn flush_round(sidecars: Vec<BenchSidecar>, shared_keys: bool) -> (Vec<BenchSidecar>, f64) {
    let batches: Vec<_> = sidecars
        .iter()
        .map(|s| bench_rows(if shared_keys { 0 } else { s.index * BENCH_ROWS }))
        .collect();
    let started = Instant::now();
    let tasks: Vec<_> = sidecars
        .into_iter()
        .zip(batches)
        .map(|(s, rows)| tokio::spawn(s.flush(rows)))
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    (done, started.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One benchmark configuration and its measurements.
struct BenchCase {
    target: usize,
    shared_keys: bool,
    sidecars: Vec<BenchSidecar>,
    seconds: Vec<f64>,
}

/// Statement time from a server log with `log_min_duration_statement = 0`: milliseconds and
/// count per kind of statement, over the lines after byte `from`.
fn statement_times(log: &str, from: usize) -> BTreeMap<&'static str, (f64, usize)> {
    let mut out = BTreeMap::new();
    for line in log.get(from..).unwrap_or_default().lines() {
        if line.contains("connection authorized") {
            out.entry("connections opened").or_insert((0.0, 0)).1 += 1;
            continue;
        }
        let Some(rest) = line.split("duration: ").nth(1) else {
            continue;
        };
        let Some((ms, text)) = rest.split_once(" ms  ") else {
            continue;
        };
        // `statement: …` (simple protocol) or `parse|bind|execute <name>: …` (extended); the
        // time of every phase counts, the statement once.
        let (phase, text) = text.split_once(": ").unwrap_or(("", text));
        let counts = usize::from(phase == "statement" || phase.starts_with("execute"));
        let kind = match text {
            t if t.starts_with("BEGIN TRANSACTION") => "worker: BEGIN + assign id",
            t if t.starts_with("COPY") => "worker: COPY rows in",
            t if t.starts_with("INSERT INTO public.ad_events_1m_") => "worker: shard upsert",
            t if t.starts_with("PREPARE TRANSACTION") => "worker: PREPARE TRANSACTION",
            t if t.starts_with("COMMIT PREPARED") => "worker: COMMIT PREPARED",
            t if t.contains("pg_advisory_xact_lock") => "checkpoint lock",
            t if t.starts_with("SELECT segment") => "checkpoint read",
            t if t.starts_with("INSERT INTO \"ad_events_1m\"") => "rule upsert",
            t if t.starts_with("INSERT INTO logtally_checkpoint") => "checkpoint upsert",
            "BEGIN" => "BEGIN",
            "COMMIT" => "COMMIT",
            _ => continue,
        };
        let e = out.entry(kind).or_insert((0.0, 0));
        e.0 += ms.trim().parse::<f64>().unwrap_or(0.0);
        e.1 += counts;
    }
    out
}

#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
fn bench_flush_throughput_one_postgres_vs_citus() {
    use logtally_e2e::postgres::{server_log, TestPostgres};
    require_citus!();
    let pg = TestPostgres::start_private(&[]);
    let cluster = TestCitus::start(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let pg_url = rt.block_on(pg.create_database_named("logtally"));
    // Citus as it comes, then two settings a sidecar can pass in its URL (`options`): fewer
    // connections per worker, kept open across flushes (fewer PREPAREs, no reconnects); and
    // one connection per worker taking the shards in order.
    let with = |opts: &str| {
        let encoded = opts.replace(' ', "%20").replace('=', "%3D");
        format!("{}&options={encoded}", cluster.url())
    };
    let targets = [
        ("one PostgreSQL", pg_url),
        ("Citus, 2 workers", cluster.url()),
        (
            "Citus, pool 4 cached",
            with(
                "-c citus.max_adaptive_executor_pool_size=4 -c citus.max_cached_conns_per_worker=4",
            ),
        ),
        (
            "Citus, sequential",
            with("-c citus.multi_shard_modify_mode=sequential"),
        ),
    ];
    let mut cases = Vec::new();
    for (t, (_, url)) in targets.iter().enumerate() {
        for k in [1usize, 4] {
            for shared_keys in [false, true] {
                let sidecars = rt.block_on(async {
                    let mut v = Vec::new();
                    for i in 0..k {
                        let node = format!("bench-{t}-{k}-{shared_keys}-{i}");
                        v.push(BenchSidecar::connect(url, &node, i).await);
                    }
                    // The first flush inserts the keys; the measured ones add to them, as
                    // most flushes of a bucket do.
                    flush_round(v, shared_keys).await.0
                });
                cases.push(BenchCase {
                    target: t,
                    shared_keys,
                    sidecars,
                    seconds: Vec::new(),
                });
            }
        }
    }
    // Rounds alternate over the cases, so machine noise spreads over all of them.
    for _ in 0..BENCH_ROUNDS {
        for c in cases.iter_mut() {
            let (sidecars, secs) =
                rt.block_on(flush_round(std::mem::take(&mut c.sidecars), c.shared_keys));
            c.sidecars = sidecars;
            c.seconds.push(secs);
        }
    }
    println!(
        "\nflush throughput: each sidecar flushes {BENCH_ROWS} rows (adding to existing keys) \
         + its checkpoint, all at once; median of {BENCH_ROUNDS} rounds, fsync on\n"
    );
    println!("| target | sidecars | keys | rows/s | flush wall s | retries | vs one PostgreSQL |");
    println!("|---|---|---|---|---|---|---|");
    let rate = |c: &BenchCase| (c.sidecars.len() * BENCH_ROWS) as f64 / median(c.seconds.clone());
    for c in &cases {
        let baseline = cases
            .iter()
            .find(|b| {
                b.target == 0
                    && b.shared_keys == c.shared_keys
                    && b.sidecars.len() == c.sidecars.len()
            })
            .map(rate)
            .unwrap();
        println!(
            "| {} | {} | {} | {:.0} | {:.3} | {} | {:.2}× |",
            targets[c.target].0,
            c.sidecars.len(),
            if c.shared_keys {
                "same keys"
            } else {
                "own keys"
            },
            rate(c),
            median(c.seconds.clone()),
            c.sidecars.iter().map(|s| s.retries).sum::<u64>(),
            rate(c) / baseline
        );
    }

    // Where the time goes: one more flush of one sidecar per target, every statement's
    // duration from the servers' own logs.
    let logs = |t: usize| -> Vec<(String, String)> {
        if t == 0 {
            vec![("PostgreSQL".into(), server_log(&pg).unwrap_or_default())]
        } else {
            cluster.node_logs()
        }
    };
    let dbs = |t: usize| -> Vec<Db> {
        if t == 0 {
            vec![Db::connect(&targets[0].1)]
        } else {
            let mut v = vec![cluster.db()];
            v.extend((0..cluster.worker_count()).map(|w| cluster.worker_db(w)));
            v
        }
    };
    for (t, (name, _)) in targets.iter().enumerate().take(3) {
        for db in dbs(t) {
            db.execute("ALTER SYSTEM SET log_min_duration_statement = 0");
            db.execute("ALTER SYSTEM SET log_connections = on");
            db.execute("SELECT pg_reload_conf()");
        }
        let before: Vec<usize> = logs(t).iter().map(|(_, l)| l.len()).collect();
        let case = cases
            .iter_mut()
            .find(|c| c.target == t && c.sidecars.len() == 1 && !c.shared_keys)
            .unwrap();
        let started = Instant::now();
        let (sidecars, _) = rt.block_on(flush_round(std::mem::take(&mut case.sidecars), false));
        case.sidecars = sidecars;
        let wall = started.elapsed().as_secs_f64() * 1000.0;
        for db in dbs(t) {
            db.execute("ALTER SYSTEM RESET log_min_duration_statement");
            db.execute("ALTER SYSTEM RESET log_connections");
            db.execute("SELECT pg_reload_conf()");
        }
        println!("\n{name}: one flush of {BENCH_ROWS} rows, {wall:.0} ms wall; statement time summed per node (parallel connections overlap):");
        for ((node, log), from) in logs(t).iter().zip(before) {
            for (kind, (ms, n)) in statement_times(log, from) {
                println!("  {node:12} {kind:30} {n:4} × {:9.1} ms", ms);
            }
        }
    }
}
