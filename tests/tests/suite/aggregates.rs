//! The aggregates of issue 12 end to end: real nginx with the module, the real sidecar, a real
//! PostgreSQL with the `hll` extension. Every request the test sends carries an ad, a
//! campaign, an event type, a user id and a value drawn from one of three distributions; some
//! are answered 404, which the rule's `where = "status < 400"` leaves out.
//!
//! Truth: the events the test generated, written by the test into a raw table, and
//! PostgreSQL's own functions over it —
//! - conditional counts (`count where ev = 'view'`, …) and the rule's `where`: exact, and the
//!   README's click-through query gives the ratio the test knows;
//! - `distinct(uid)`: per ad the union of the sidecar's sketches is, byte for byte,
//!   `hll_add_agg(hll_hash_text(uid))` over the raw rows, at 10, 1,000 and 100,000 distinct
//!   values, and its estimate lies within the sketch's error of the true count;
//! - `quantiles(v)`: p50/p90/p99/p99.9 within α = 1% of `percentile_disc` (±1 rank) for a
//!   uniform, a log-normal and a two-peak distribution; the merged sketch counts every event.
//!
//! Once with one nginx+sidecar pair and 100,000 distinct users, once with four pairs (four
//! nodes, one database) and 20 `kill -9`s of sidecars during the load. Bigger forms with
//! `LOGTALLY_LONG_TESTS=1`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use logtally_e2e::nginx::{HttpClient, TestNginx};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};

const NGINX_BODY: &str = r#"
    logtally_spool @DIR@/spool flush=20ms;
    logtally_field ad     $arg_ad;
    logtally_field cmp    $arg_cmp;
    logtally_field ev     $arg_ev;
    logtally_field uid    $arg_uid;
    logtally_field dist   $arg_dist;
    logtally_field v      $arg_v;
    logtally_field status $status;
    server {
        listen 127.0.0.1:@PORT@;
        location = /e    { logtally on; return 204; }
        location = /gone { logtally on; return 404; }
    }
"#;

/// The rules: the demo's `ad_daily` shape (README) and a quantiles table per distribution.
const RULES: &str = r#"
[[rule]]
table    = "ad_daily"
bucket   = "1d"
group_by = ["ad", "cmp"]
where    = "status < 400"
metrics  = { events = "count", views = "count where ev = 'view'", clicks = "count where ev = 'click'", reach = "distinct(uid)" }

[[rule]]
table    = "dist_daily"
bucket   = "1d"
group_by = ["dist"]
metrics  = { events = "count", v = "quantiles(v)" }
"#;

/// The click-through query of README.md ("Aggregates"), as written there.
const CTR_QUERY: &str = "SELECT cmp, sum(views) AS views, sum(clicks) AS clicks,
       round(sum(clicks)::numeric / nullif(sum(views), 0), 4) AS ctr
FROM ad_daily WHERE bucket >= now() - interval '7 days'
GROUP BY cmp ORDER BY cmp";

const DISTS: [&str; 3] = ["uniform", "lognormal", "twopeak"];

fn long() -> bool {
    std::env::var_os("LOGTALLY_LONG_TESTS").is_some_and(|v| v != "0")
}

/// One request: what nginx logs and the raw table holds.
#[derive(Debug, Clone)]
struct Event {
    ad: &'static str,
    cmp: &'static str,
    ev: &'static str,
    uid: String,
    dist: usize,
    v: String,
    gone: bool,
}

impl Event {
    fn target(&self) -> String {
        format!(
            "/{}?ad={}&cmp={}&ev={}&uid={}&dist={}&v={}",
            if self.gone { "gone" } else { "e" },
            self.ad,
            self.cmp,
            self.ev,
            self.uid,
            DISTS[self.dist],
            self.v
        )
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in (0, 1).
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (a, b) = (self.unit(), self.unit());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }

    fn value(&mut self, dist: usize) -> f64 {
        let v = match dist {
            0 => 1.0 + 999.0 * self.unit(),
            1 => (3.0 + 1.5 * self.normal()).exp(),
            _ if self.unit() < 0.7 => 5.0 + 0.5 * self.normal(),
            _ => 500.0 + 50.0 * self.normal(),
        };
        v.max(0.001)
    }
}

/// Three ads of 10, 1,000 and `many` distinct users (every user of `r_many` is new), three
/// distributions in turn, views/clicks/others with a click rate per campaign; one in 20
/// requests of `r1k` is answered 404 (each of its users passes in other requests). `many`
/// is at least 10,000.
fn workload(many: usize, seed: u64) -> Vec<Event> {
    let mut rng = Rng(seed | 1);
    let (n10, n1k) = (many / 20, many / 10);
    let mut slots: Vec<u8> = [(0u8, n10), (1, n1k), (2, many)]
        .iter()
        .flat_map(|&(a, n)| std::iter::repeat_n(a, n))
        .collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let mut seen = [0usize; 3];
    slots
        .into_iter()
        .enumerate()
        .map(|(i, slot)| {
            let k = seen[slot as usize];
            seen[slot as usize] += 1;
            let (ad, cmp, uid, gone) = match slot {
                0 => ("r10", "c1", format!("u{}", k % 10), false),
                1 => (
                    "r1k",
                    ["c1", "c2"][k % 2],
                    format!("u{}", k % 1000),
                    (k + k / 1000) % 20 == 7,
                ),
                _ => ("r_many", "c2", format!("n{k}"), false),
            };
            let click_rate = if cmp == "c1" { 0.1 } else { 0.04 };
            let r = rng.unit();
            let ev = if r < click_rate {
                "click"
            } else if r < 0.75 {
                "view"
            } else {
                "other"
            };
            let dist = i % 3;
            let v = format!("{:.6}", rng.value(dist));
            Event {
                ad,
                cmp,
                ev,
                uid,
                dist,
                v,
                gone,
            }
        })
        .collect()
}

/// One nginx and one sidecar (its own node) feeding the database.
struct Edge {
    nginx: TestNginx,
    sidecar: TestSidecar,
    _dir: tempfile::TempDir,
}

impl Edge {
    fn start(db: &Db, node: &str, workers: usize) -> Edge {
        let nginx = TestNginx::start(NGINX_BODY, workers);
        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr();
        let config = dir.path().join("logtally.toml");
        std::fs::write(
            &config,
            format!(
                "spool_dir = \"{spool}\"\ndatabase_url = \"{url}\"\nnode = \"{node}\"\n\
                 flush_interval = \"300ms\"\nlisten = \"{listen}\"\nbinlog = \"{binlog}\"\n{RULES}",
                spool = nginx.dir().join("spool").display(),
                url = db.url(),
                binlog = dir.path().join("binlog").display(),
            ),
        )
        .unwrap();
        let sidecar = TestSidecar::start(&config, &dir.path().join("logtally.log"), listen);
        Edge {
            nginx,
            sidecar,
            _dir: dir,
        }
    }
}

fn logs(edges: &[Edge]) -> String {
    edges
        .iter()
        .map(|e| format!("{}\n{}", e.sidecar.log_text(), e.nginx.error_log()))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Sends `events` from `threads` keep-alive clients; each answer must be 204 (404 for /gone).
fn send(addr: SocketAddr, events: &[Event], threads: usize, sent: &AtomicUsize) {
    std::thread::scope(|s| {
        for chunk in events.chunks(events.len().div_ceil(threads).max(1)) {
            s.spawn(move || {
                let mut client = HttpClient::new(addr);
                for e in chunk {
                    let target = e.target();
                    let resp = client
                        .get(target.as_bytes(), &[])
                        .unwrap_or_else(|err| panic!("{target}: {err}"));
                    assert_eq!(resp.status, if e.gone { 404 } else { 204 }, "{target}");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
}

fn scalar(db: &Db, sql: &str) -> i64 {
    db.query(sql)
        .ok()
        .and_then(|rows| rows.first().and_then(|r| r.get::<_, Option<i64>>(0)))
        .unwrap_or(-1)
}

/// Waits until both tables count every event they should, then checks they stay so while
/// the sidecars flush a few more times (a late duplicate would show).
fn wait_for_all(db: &Db, events: &[Event], limit: Duration, logs: &dyn Fn() -> String) {
    let kept = events.iter().filter(|e| !e.gone).count() as i64;
    let all = events.len() as i64;
    let counts = || {
        (
            scalar(db, "SELECT sum(events)::int8 FROM ad_daily"),
            scalar(db, "SELECT sum(events)::int8 FROM dist_daily"),
        )
    };
    let deadline = Instant::now() + limit;
    while counts() != (kept, all) {
        assert!(
            Instant::now() < deadline,
            "tables hold {:?} events, want ({kept}, {all})\n{}",
            counts(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500)); // five flush intervals: what is tested
    assert_eq!(counts(), (kept, all), "after more flushes\n{}", logs());
}

/// Writes the events into `raw`, the truth side.
fn fill_raw(db: &Db, events: &[Event]) {
    db.execute(
        "CREATE TABLE raw (ad text, cmp text, ev text, uid text, dist text, v numeric, status int)",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        for chunk in events.chunks(20_000) {
            let col = |f: &dyn Fn(&Event) -> String| chunk.iter().map(f).collect::<Vec<_>>();
            client
                .execute(
                    "INSERT INTO raw SELECT a, c, e, u, d, v::numeric, s::int \
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::text[]) AS t(a, c, e, u, d, v, s)",
                    &[
                        &col(&|e| e.ad.to_string()),
                        &col(&|e| e.cmp.to_string()),
                        &col(&|e| e.ev.to_string()),
                        &col(&|e| e.uid.clone()),
                        &col(&|e| DISTS[e.dist].to_string()),
                        &col(&|e| e.v.clone()),
                        &col(&|e| if e.gone { "404" } else { "204" }.to_string()),
                    ],
                )
                .await
                .unwrap();
        }
        drop(client);
        let _ = task.await;
    });
}

/// Conditional counts and `where`: per (ad, campaign) exactly what the raw rows give; the
/// README's CTR query gives the ratio computed from the generated events.
fn check_counts(db: &Db, events: &[Event]) {
    let differing = scalar(
        db,
        "SELECT count(*) FROM (SELECT ad, cmp, sum(events) AS events, sum(views) AS views, \
           sum(clicks) AS clicks FROM ad_daily GROUP BY ad, cmp) d \
         FULL JOIN (SELECT ad, cmp, count(*) AS events, \
           count(*) FILTER (WHERE ev = 'view') AS views, \
           count(*) FILTER (WHERE ev = 'click') AS clicks \
           FROM raw WHERE status < 400 GROUP BY ad, cmp) r USING (ad, cmp) \
         WHERE d.events IS DISTINCT FROM r.events OR d.views IS DISTINCT FROM r.views \
            OR d.clicks IS DISTINCT FROM r.clicks",
    );
    assert_eq!(differing, 0, "(ad, cmp) rows whose counts differ from raw");
    let rows = db
        .query(&format!(
            "SELECT cmp, views::int8, clicks::int8, ctr::float8 FROM ({CTR_QUERY}) q"
        ))
        .unwrap();
    assert_eq!(rows.len(), 2, "campaigns");
    for r in rows {
        let (cmp, views, clicks, ctr): (String, i64, i64, f64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let kept = || events.iter().filter(|e| !e.gone && e.cmp == cmp);
        let want_views = kept().filter(|e| e.ev == "view").count() as i64;
        let want_clicks = kept().filter(|e| e.ev == "click").count() as i64;
        assert_eq!((views, clicks), (want_views, want_clicks), "campaign {cmp}");
        let want = want_clicks as f64 / want_views as f64;
        assert!(
            (ctr - want).abs() <= 0.000_05 + 1e-12,
            "campaign {cmp}: CTR {ctr}, generated {want}"
        );
        eprintln!("CTR {cmp}: {views} views, {clicks} clicks, {ctr} (generated {want:.6})");
    }
}

/// Per ad: the union of the sidecar's sketches is the SQL-built sketch, byte for byte; the
/// estimate is within 4 standard errors (2.3% each at the defaults) of the true count.
fn check_distinct(db: &Db, many: usize) {
    let rows = db
        .query(
            "SELECT ad, hll_send(d.h), hll_send(r.h), hll_cardinality(d.h), r.n \
             FROM (SELECT ad, hll_union_agg(reach) AS h FROM ad_daily GROUP BY ad) d \
             JOIN (SELECT ad, hll_add_agg(hll_hash_text(uid)) AS h, count(DISTINCT uid) AS n \
                   FROM raw WHERE status < 400 GROUP BY ad) r USING (ad) ORDER BY ad",
        )
        .unwrap();
    let mut sizes = Vec::new();
    for r in &rows {
        let (ad, ours, sql, estimate, n): (String, Vec<u8>, Vec<u8>, f64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        assert!(
            ours == sql,
            "ad {ad} ({n} distinct): the sidecar's sketch ({} bytes, type {:#x}) differs from \
             hll_add_agg ({} bytes, type {:#x})",
            ours.len(),
            ours[0],
            sql.len(),
            sql[0]
        );
        let error = (estimate - n as f64).abs() / n as f64;
        assert!(error <= 4.0 * 0.023, "ad {ad}: estimate {estimate} of {n}");
        eprintln!(
            "distinct {ad}: {n} values, {} bytes equal, estimate {estimate:.0} ({:.2}%)",
            ours.len(),
            100.0 * error
        );
        sizes.push(n);
    }
    assert_eq!(
        sizes,
        vec![10, 1000, many as i64],
        "true distinct users per ad"
    );
}

/// Per distribution: the merged sketch counts every event, and p50/p90/p99/p99.9 lie within
/// α = 1% of the exact value at the quantile's rank ±1.
fn check_quantiles(db: &Db) {
    for dist in DISTS {
        let r = &db
            .query(&format!(
                "SELECT (coalesce((m).zero, 0) + coalesce((SELECT sum(c) FROM unnest((m).pos_counts) c), 0) \
                   + coalesce((SELECT sum(c) FROM unnest((m).neg_counts) c), 0))::int8, \
                   (SELECT count(*) FROM raw WHERE dist = '{dist}') \
                 FROM (SELECT logtally_quantiles_merge(v) AS m FROM dist_daily \
                       WHERE dist = '{dist}') s"
            ))
            .unwrap()[0];
        let (counted, events): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!(counted, events, "{dist}: events in the merged sketch");
        for q in [0.5f64, 0.9, 0.99, 0.999] {
            let r = &db
                .query(&format!(
                    "WITH ranked AS (SELECT v::float8 AS v, row_number() OVER (ORDER BY v) AS n, \
                       count(*) OVER () AS c FROM raw WHERE dist = '{dist}') \
                     SELECT (SELECT logtally_quantile(logtally_quantiles_merge(v), {q}) \
                               FROM dist_daily WHERE dist = '{dist}'), \
                       (SELECT percentile_disc({q}) WITHIN GROUP (ORDER BY v)::float8 \
                          FROM raw WHERE dist = '{dist}'), \
                       (SELECT min(v) FROM ranked WHERE n >= ceil({q} * c) - 1), \
                       (SELECT max(v) FROM ranked WHERE n <= ceil({q} * c) + 1)"
                ))
                .unwrap()[0];
            let (est, exact, lo, hi): (f64, f64, f64, f64) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            assert!(
                est >= lo * 0.99 && est <= hi * 1.01,
                "{dist} q={q}: estimate {est}, percentile_disc {exact}, ranks ±1 [{lo}, {hi}]"
            );
            eprintln!(
                "quantiles {dist} q={q}: estimate {est:.4}, exact {exact:.4} ({:+.3}%)",
                100.0 * (est - exact) / exact
            );
        }
    }
}

fn check_all(db: &Db, events: &[Event], many: usize) {
    let t = Instant::now();
    fill_raw(db, events);
    check_counts(db, events);
    check_distinct(db, many);
    check_quantiles(db);
    eprintln!(
        "checks against the raw table: {} ms",
        t.elapsed().as_millis()
    );
}

#[test]
fn conditions_distinct_and_quantiles_equal_postgresql_through_nginx() {
    let pg = TestPostgres::start();
    let db = Db::at(&pg_rt_block(&pg));
    let edge = Edge::start(&db, "edge-1", 2);
    let many = 100_000;
    let events = workload(many, 12);
    let t = Instant::now();
    send(edge.nginx.addr(), &events, 8, &AtomicUsize::new(0));
    eprintln!(
        "{} requests sent in {} ms",
        events.len(),
        t.elapsed().as_millis()
    );
    wait_for_all(&db, &events, Duration::from_secs(90), &|| {
        logs(std::slice::from_ref(&edge))
    });
    eprintln!("all in the tables after {} ms", t.elapsed().as_millis());
    check_all(&db, &events, many);
    assert!(edge.sidecar.terminate().success());
}

#[test]
fn four_nodes_and_twenty_kill_nines_stay_exact_and_equal() {
    let pg = TestPostgres::start();
    let db = Db::at(&pg_rt_block(&pg));
    let mut edges: Vec<Edge> = (0..4)
        .map(|i| Edge::start(&db, &format!("edge-{i}"), 1))
        .collect();
    let many = if long() { 100_000 } else { 20_000 };
    let events = workload(many, 44);
    let kills = 20;
    let t = Instant::now();
    // 20 rounds: each sends its share through the four nginx, then kills one sidecar (in
    // turn) once it has read events since its last start — mid-ingest, its flush pending.
    let per_round = events.len().div_ceil(kills);
    let mut in_flight_kills = 0;
    for (k, round) in events.chunks(per_round).enumerate() {
        std::thread::scope(|s| {
            for (edge, part) in edges.iter().zip(round.chunks(round.len().div_ceil(4))) {
                let addr = edge.nginx.addr();
                s.spawn(move || send(addr, part, 2, &AtomicUsize::new(0)));
            }
        });
        let victim = &mut edges[k % 4];
        let deadline = Instant::now() + Duration::from_secs(30);
        while victim
            .sidecar
            .metric("logtally_events_read_total")
            .is_none_or(|n| n < 1.0)
        {
            assert!(
                Instant::now() < deadline,
                "sidecar {} reads nothing
{}",
                k % 4,
                victim.sidecar.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let committed = scalar(&db, "SELECT sum(events)::int8 FROM dist_daily");
        if committed < (per_round * (k + 1)) as i64 {
            in_flight_kills += 1;
        }
        victim.sidecar.kill9_and_restart();
    }
    eprintln!(
        "{} requests in {kills} rounds, {kills} kill -9s ({in_flight_kills} with events sent \
         and not yet all committed) in {} ms",
        events.len(),
        t.elapsed().as_millis()
    );
    wait_for_all(&db, &events, Duration::from_secs(120), &|| logs(&edges));
    eprintln!("all in the tables after {} ms", t.elapsed().as_millis());
    let nodes = scalar(&db, "SELECT count(DISTINCT node) FROM logtally_checkpoint");
    assert_eq!(nodes, 4, "nodes with checkpoint rows");
    check_all(&db, &events, many);
    for e in edges {
        assert!(e.sidecar.terminate().success());
    }
}

/// A fresh database with the `hll` extension, its URL.
fn pg_rt_block(pg: &TestPostgres) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(pg.create_database_with_hll())
}
