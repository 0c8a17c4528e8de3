//! `distribute_by` on a real Citus cluster: the tables created distributed and co-located
//! (once), `logtally check` reporting them, a worker restart, and `distribute_by` without
//! Citus being a warning while ingest goes on.

use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use logtally_e2e::citus::{distribution, TestCitus};
use logtally_e2e::edge::{expected, wait_for_totals, Pair};
use logtally_e2e::sidecar::Db;

use super::{citus_rule, one_row, position, send, start_store, store_config, workload};

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
    start_store(&cluster.url(), &citus_rule()).unwrap();
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

/// Two rules distributed on the same column: co-located rollups.
const TWO_RULES: &str = r#"
[[rule]]
table = "ad_events_1m"
bucket = "1m"
group_by = ["ad", "ev"]
metrics = { events = "count", n_sum = "sum(n)", n_min = "min(n)", n_max = "max(n)" }
distribute_by = "ad"

[[rule]]
table = "ad_daily"
bucket = "1d"
group_by = ["ad"]
metrics = { events = "count" }
distribute_by = "ad"
"#;

/// `logtally check` of `rules` against `url`: whether it passed, and what it printed.
fn logtally_check(url: &str, rules: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("logtally.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\ndatabase_url = \"{url}\"\nnode = \"check\"\n{rules}",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(logtally_e2e::sidecar::logtally_bin())
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn distribute_by_creates_co_located_tables_once_and_check_reports_them() {
    require_citus!();
    let cluster = TestCitus::start(2);
    let db = cluster.db();
    // Two sidecars starting at the same moment, then one restarting.
    std::thread::scope(|s| {
        for _ in 0..2 {
            let url = cluster.url();
            s.spawn(move || start_store(&url, TWO_RULES).unwrap());
        }
    });
    start_store(&cluster.url(), TWO_RULES).unwrap();
    for table in ["ad_events_1m", "ad_daily"] {
        let d = distribution(&db, table).unwrap();
        assert_eq!(
            (d.method, d.column.as_deref()),
            ('h', Some("ad")),
            "{table}"
        );
    }
    let c = distribution(&db, "logtally_checkpoint").unwrap();
    assert_eq!((c.method, c.replication, c.column), ('n', 's', None));
    let (ok, out) = logtally_check(&cluster.url(), TWO_RULES);
    assert!(ok, "{out}");
    for line in [
        "table ad_events_1m: distributed by ad (hash, 32 shards) (Citus 13.2",
        "table ad_daily: distributed by ad (hash, 32 shards)",
        "table logtally_checkpoint: coordinator-local (Citus)",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    assert!(!out.contains("warning:"), "{out}");

    // A sidecar pointed at a worker is refused: the checkpoint lock would not be shared.
    let worker = start_store(&cluster.worker_url(0), TWO_RULES).unwrap_err();
    assert!(
        worker.to_string().contains("points at a Citus worker") && !worker.is_retried(),
        "{worker}"
    );
    let (ok, out) = logtally_check(&cluster.worker_url(0), TWO_RULES);
    assert!(!ok && out.contains("points at a Citus worker"), "{out}");
    // A table distributed on another key column than distribute_by works: a warning.
    let ev_rule = TWO_RULES.replacen("distribute_by = \"ad\"", "distribute_by = \"ev\"", 1);
    let (ok, out) = logtally_check(&cluster.url(), &ev_rule);
    assert!(
        ok && out.contains(
            "warning: table ad_events_1m is distributed on \"ad\", not on \
                            distribute_by = \"ev\""
        ),
        "{out}"
    );
    // A plain table already holding rows is not distributed behind the operator's back:
    // a warning with the statements to run; ingest goes on.
    db.execute(
        "CREATE TABLE ad_hourly (bucket timestamptz NOT NULL, ad text NOT NULL, \
         events int8 NOT NULL, PRIMARY KEY (bucket, ad)); \
         INSERT INTO ad_hourly VALUES (now(), '1', 1)",
    );
    let hourly = "\n[[rule]]\ntable = \"ad_hourly\"\nbucket = \"1h\"\ngroup_by = [\"ad\"]\n\
                  metrics = { events = \"count\" }\ndistribute_by = \"ad\"\n";
    let three = format!("{TWO_RULES}{hourly}");
    start_store(&cluster.url(), &three).unwrap();
    assert_eq!(distribution(&db, "ad_hourly"), None);
    let (ok, out) = logtally_check(&cluster.url(), &three);
    assert!(
        ok && out.contains("table ad_hourly: plain")
            && out.contains("SELECT create_distributed_table('ad_hourly', 'ad')"),
        "{out}"
    );

    // Same column type, same shard count: one co-location group, so a rollup from the
    // minute table into the daily one runs shard by shard on the workers.
    let groups: i64 = db
        .query(
            "SELECT count(DISTINCT colocationid) FROM pg_dist_partition \
             WHERE logicalrelid IN ('ad_events_1m'::regclass, 'ad_daily'::regclass)",
        )
        .unwrap()[0]
        .get(0);
    assert_eq!(groups, 1);
    let plan: Vec<String> = db
        .query(
            "EXPLAIN INSERT INTO ad_daily AS cur (bucket, ad, events) \
             SELECT date_trunc('day', bucket, 'UTC'), ad, sum(events) FROM ad_events_1m \
             GROUP BY 1, 2 ON CONFLICT (bucket, ad) DO UPDATE SET events = cur.events + excluded.events",
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("Task Count: 32"))
            && !plan.iter().any(|l| l.contains("INSERT/SELECT method")),
        "rollup not pushed down to the shards:\n{}",
        plan.join("\n")
    );
    // One flush into both, one distributed transaction.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = store_config(&cluster.url(), "ddl", TWO_RULES);
    rt.block_on(async {
        let mut store = logtally::db::Store::connect(&config).await.unwrap();
        let mut rows = one_row("7");
        rows.push(logtally::aggregate::RuleRows {
            rule: 1,
            rows: vec![logtally::aggregate::Row {
                bucket_ms: 1_764_288_000_000,
                dims: vec!["7".to_string()],
                metrics: vec![logtally::aggregate::MetricValue::Count(1)],
            }],
        });
        store
            .flush(&rows, &[position("s1", 1)], &Default::default())
            .await
            .unwrap();
    });
    let n: i64 = db
        .query("SELECT (SELECT sum(events) FROM ad_events_1m)::bigint + (SELECT sum(events) FROM ad_daily)::bigint")
        .unwrap()[0]
        .get(0);
    assert_eq!(n, 2);
}

/// Runs without Citus (and in CI): on one PostgreSQL `distribute_by` is a warning at start
/// and in `check`, and ingest goes on.
#[test]
fn distribute_by_without_citus_is_a_warning_and_ingest_goes_on() {
    use logtally_e2e::postgres::TestPostgres;
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let pair = Pair::start_with_rules(db.url(), "edge-0", 1, &citus_rule());
    let reqs = workload(2_000, 3);
    let sent = AtomicUsize::new(0);
    send(pair.nginx.addr(), &reqs, 2, &sent);
    wait_for_totals(&db, &expected(&reqs), Duration::from_secs(60), &|| {
        pair.sidecar.log_text()
    });
    let warning = "rule table ad_events_1m: distribute_by = \"ad\" ignored: the citus extension \
                   is not installed in this database; the table stays a plain table";
    let log = pair.sidecar.log_text();
    assert!(log.contains(warning), "{log}");
    let (ok, out) = logtally_check(db.url(), &citus_rule());
    assert!(ok && out.contains(&format!("warning: {warning}")), "{out}");
    assert!(pair.sidecar.terminate().success());
}
