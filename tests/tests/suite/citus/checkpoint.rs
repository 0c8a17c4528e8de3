//! The checkpoint forms on Citus: two-phase commit across workers and the compare-and-swap
//! on the coordinator-local checkpoint table.

use std::path::Path;
use std::time::Duration;

use logtally::db::{checkpoint_table, create_sql, rule_table};
use logtally_e2e::citus::TestCitus;
use logtally_e2e::edge::RULE;

use super::{one_row, position, query};

/// The three forms a checkpoint table can take on Citus, as SQL run after the sidecar's own
/// `CREATE TABLE` (the sidecar converts the plain one to coordinator-local at start).
const CHECKPOINT_FORMS: [(&str, &str); 3] = [
    ("plain local table", ""),
    (
        "reference table",
        "SELECT create_reference_table('logtally_checkpoint')",
    ),
    (
        "coordinator-local Citus table",
        "SELECT citus_add_local_table_to_metadata('logtally_checkpoint')",
    ),
];

/// The worker groups of the two-phase commits recorded since `after` rows (the maintenance
/// daemon's recovery, which deletes them, is turned off in this test).
async fn two_phase_groups(url: &str) -> Vec<i32> {
    query(
        url,
        "SELECT groupid FROM pg_dist_transaction ORDER BY groupid",
    )
    .await
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn checkpoint_forms_two_phase_commit_and_the_compare_and_swap() {
    use logtally::db::{FlushOutcome, Store, StoreError};
    use std::collections::HashMap;
    require_citus!();
    let mut cluster = TestCitus::start(2);
    let db = cluster.db();
    // Keep the records of two-phase commits: recovery would delete them.
    db.execute("ALTER SYSTEM SET citus.recover_2pc_interval = -1");
    db.execute("SELECT pg_reload_conf()");
    let url = cluster.url();
    let config = |node: &str, url: &str| {
        logtally::config::parse(
            Path::new("citus-facts.toml"),
            &format!("database_url = \"{url}\"\nnode = \"{node}\"\n{RULE}"),
        )
        .unwrap()
    };
    let rule = &config("x", &url).rules[0];
    db.execute(&create_sql(&rule_table(rule)));
    db.execute("SELECT create_distributed_table('ad_events_1m', 'ad')");
    // The worker group holding ad '7'.
    let group_of_7: i32 = db
        .query(
            "SELECT p.groupid FROM pg_dist_placement p \
             WHERE p.shardid = get_shard_id_for_distribution_column('ad_events_1m', '7')",
        )
        .unwrap()[0]
        .get(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (form, sql) in CHECKPOINT_FORMS {
        db.execute("DROP TABLE IF EXISTS logtally_checkpoint");
        db.execute(&create_sql(&checkpoint_table()));
        if !sql.is_empty() {
            db.execute(sql);
        }
        let node = format!("facts-{}", form.split(' ').next().unwrap());
        rt.block_on(async {
            // Today's sidecar code: one flush of one key, i.e. one shard on one worker.
            let mut store = Store::connect(&config(&node, &url)).await.unwrap();
            if form == "plain local table" {
                // The sidecar makes a plain checkpoint table coordinator-local at start.
                let local = query(
                    &url,
                    "SELECT partmethod::text, repmodel::text FROM \
                    pg_dist_partition WHERE logicalrelid = 'logtally_checkpoint'::regclass",
                )
                .await;
                let found: Vec<(String, String)> =
                    local.iter().map(|r| (r.get(0), r.get(1))).collect();
                assert_eq!(found, vec![("n".to_string(), "s".to_string())], "{form}");
            }
            // Only the flush's two-phase commits (not those of the sidecar's DDL at start).
            query(&url, "DELETE FROM pg_dist_transaction").await;
            let pos = vec![position("s1", 100)];
            let none = HashMap::new();
            let outcome = store.flush(&one_row("7"), &pos, &none).await.unwrap();
            assert_eq!(outcome, FlushOutcome::Committed, "{form}");
            let groups = two_phase_groups(&url).await;
            eprintln!("{form}: one-key flush prepared on worker groups {groups:?}");
            match form {
                // The rows go to every placement: each worker prepares.
                "reference table" => assert_eq!(groups, vec![1, 2], "{form}"),
                _ => assert_eq!(groups, vec![group_of_7], "{form}"),
            }
            // The retry of a flush that landed finds it there and writes nothing.
            let outcome = store.flush(&one_row("7"), &pos, &none).await.unwrap();
            assert_eq!(outcome, FlushOutcome::AlreadyCommitted, "{form}");
            // A second sidecar with the same node name, believing the checkpoint empty, is
            // refused by the compare-and-swap.
            let mut twin = Store::connect(&config(&node, &url)).await.unwrap();
            let err = twin
                .flush(&one_row("7"), &[position("s1", 200)], &none)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::CheckpointConflict { .. }),
                "{form}: {err}"
            );
        });
    }
    let counted: i64 = db
        .query("SELECT sum(events)::bigint FROM ad_events_1m")
        .unwrap()[0]
        .get(0);
    assert_eq!(counted, 3, "one event per form, never twice");

    // Why not a plain table: a statement Citus routes to one shard commits there in one
    // phase, before the coordinator's own commit, so a plain table written in the same
    // transaction is not covered (today's unnest upsert happens to take the two-phase path).
    // A coordinator-local Citus table makes the same transaction two-phase.
    db.execute("DROP TABLE logtally_checkpoint");
    db.execute(&create_sql(&checkpoint_table()));
    let router_flush = "BEGIN; \
        INSERT INTO ad_events_1m AS cur VALUES ('2025-11-28', '7', 'view', 1, 5, 5, 5) \
        ON CONFLICT (bucket, ad, ev) DO UPDATE SET events = cur.events + excluded.events; \
        INSERT INTO logtally_checkpoint (node, segment, \"offset\", finished) \
        VALUES ('router', 's1', 1, false) ON CONFLICT (node, segment) \
        DO UPDATE SET \"offset\" = excluded.\"offset\"; COMMIT";
    let prepared_by = |sql: &str| -> usize {
        db.execute("DELETE FROM pg_dist_transaction");
        db.execute(sql);
        db.query("SELECT 1 FROM pg_dist_transaction").unwrap().len()
    };
    assert_eq!(
        prepared_by(router_flush),
        0,
        "plain table: one-phase commit"
    );
    db.execute("SELECT citus_add_local_table_to_metadata('logtally_checkpoint')");
    assert_eq!(prepared_by(router_flush), 1, "Citus local table: two-phase");

    // The compare-and-swap's lock is an advisory lock: it exists on the node it is taken
    // on. Through the coordinator a second taker waits; through a worker (Citus lets any node
    // run distributed queries) it does not, so sidecars must all use the coordinator.
    // A row lock (FOR UPDATE) on the coordinator-local checkpoint is seen from any node.
    let worker_url = cluster.worker_url(0);
    rt.block_on(async {
        let open = |u: String| async move {
            let (c, conn) = tokio_postgres::connect(&u, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c
        };
        let holder = open(url.clone()).await;
        holder
            .batch_execute(
                "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('logtally_checkpoint:n', 0)); \
                 SELECT * FROM logtally_checkpoint WHERE node = 'router' FOR UPDATE",
            )
            .await
            .unwrap();
        // Whether `sql` is still waiting after 2 s (lock_timeout would not do: a query that
        // a worker forwards to the coordinator waits there, where the worker's setting is
        // not in force). The waiting connections finish once the holder rolls back.
        let waits = |u: String, sql: &'static str| async move {
            let c = open(u).await;
            let waited = tokio::time::timeout(Duration::from_secs(2), c.batch_execute(sql))
                .await
                .is_err();
            (waited, c)
        };
        let lock = "SELECT pg_advisory_xact_lock(hashtextextended('logtally_checkpoint:n', 0))";
        let row = "BEGIN; SELECT * FROM logtally_checkpoint WHERE node = 'router' FOR UPDATE";
        let (coordinator_waits, _c1) = waits(url.clone(), lock).await;
        let (worker_waits, _c2) = waits(worker_url.clone(), lock).await;
        let (row_waits, _c3) = waits(worker_url.clone(), row).await;
        assert!(coordinator_waits, "advisory lock via the coordinator");
        assert!(!worker_waits, "advisory lock via a worker");
        assert!(row_waits, "row lock via a worker");
        holder.batch_execute("ROLLBACK").await.unwrap();
    });

    // A worker down: the flush fails with an error the sidecar retries (transient).
    cluster.stop_worker(1);
    let other_worker_key = (0..100)
        .map(|i| i.to_string())
        .find(|ad| {
            let g: i32 = db
                .query(&format!(
                    "SELECT groupid FROM pg_dist_placement WHERE shardid = \
                     get_shard_id_for_distribution_column('ad_events_1m', '{ad}')"
                ))
                .unwrap()[0]
                .get(0);
            g == 2
        })
        .unwrap();
    rt.block_on(async {
        let mut store = Store::connect(&config("down", &url)).await.unwrap();
        let err = store
            .flush(
                &one_row(&other_worker_key),
                &[position("s1", 1)],
                &HashMap::new(),
            )
            .await
            .unwrap_err();
        let (code, message) = match &err {
            StoreError::Db { error: source, .. } => (
                source.code().map(|c| c.code().to_string()),
                source.as_db_error().map(|d| d.message().to_string()),
            ),
            _ => (None, None),
        };
        eprintln!("worker down: {err}: SQLSTATE {code:?}, {message:?}");
        assert!(err.is_transient(), "{err:?}");
    });
    cluster.start_worker(1);
}
