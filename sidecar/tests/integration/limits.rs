//! `max_keys` and `retention` against a real PostgreSQL: the admitted keys commit with the
//! aggregates and come back at start (the limit holds across a restart), old admitted state
//! is dropped, and a retention pass deletes exactly the rows before its cutoff in batches,
//! skipping while another session holds the rule's lock. Truth comes from SQL over the
//! tables and from the events the test generated.

use std::collections::HashMap;
use std::path::Path;

use logtally::aggregate::{Aggregator, DrainedRows};
use logtally::config::{self, Config};
use logtally::db::{CheckpointEntry, FlushOutcome, RetentionPass, RetentionStore, Store};
use logtally_e2e::postgres::TestPostgres;
use logtally_spool::{decode_frame, encode_event, Decoded, Frame};
use tokio_postgres::{Client, NoTls};

const MINUTE: i64 = 60_000;
const T0: i64 = 1_764_300_000_000; // a whole minute

fn config(url: &str, node: &str, limits: &str) -> Config {
    let text = format!(
        r#"
database_url = "{url}"
node = "{node}"
spool_dir = "/nonexistent"
[[rule]]
table = "hits"
bucket = "1m"
group_by = ["k"]
metrics = {{ n = "count" }}
{limits}
"#
    );
    config::parse(Path::new("test.toml"), &text).expect("valid config")
}

async fn client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn add(agg: &mut Aggregator, time_ms: i64, key: &str) {
    let mut buf = Vec::new();
    encode_event(&mut buf, time_ms as u64, [Some(key.as_bytes())]);
    let Decoded::Frame {
        frame: Frame::Event(r),
        ..
    } = decode_frame(&buf)
    else {
        panic!("one event")
    };
    agg.add_cached(1, &["k".to_string()], &r);
}

/// One flush of everything pending, moving segment `s` to `offset`.
async fn flush(
    store: &mut Store,
    agg: &mut Aggregator,
    previous: &mut HashMap<String, CheckpointEntry>,
    offset: u64,
) {
    let rules: Vec<DrainedRows> = agg.drain_compact();
    let pos = vec![CheckpointEntry {
        segment: "s".into(),
        offset,
        finished: false,
    }];
    assert_eq!(
        store.flush(&rules, &pos, previous).await.unwrap(),
        FlushOutcome::Committed
    );
    previous.insert("s".into(), pos[0].clone());
}

/// A restarted aggregator: what `logtally run` does at start with the loaded keys.
async fn restarted(store: &Store, cfg: &Config) -> Aggregator {
    let mut agg = Aggregator::with_limits(&cfg.rules, &cfg.limits);
    let mut chunks = Vec::new();
    for (rule, bucket, hashes) in store.load_admitted().await.unwrap() {
        assert_eq!(rule, 0);
        chunks.push((bucket, hashes));
    }
    agg.restore_admitted(0, chunks);
    agg
}

/// (keys besides the overflow row, overflow count, total count) per bucket.
async fn per_bucket(c: &Client) -> Vec<(i64, i64, i64, i64)> {
    c.query(
        "SELECT (extract(epoch FROM bucket) * 1000)::int8, \
         count(*) FILTER (WHERE k <> '__other__'), \
         coalesce(sum(n) FILTER (WHERE k = '__other__'), 0)::int8, sum(n)::int8 \
         FROM hits GROUP BY bucket ORDER BY bucket",
        &[],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

#[tokio::test]
async fn the_admitted_set_commits_with_the_rows_and_holds_the_limit_after_a_restart() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let cfg = config(&url, "edge-1", "max_keys = 10");
    let mut store = Store::connect(&cfg).await.unwrap();
    let c = client(&url).await;
    let mut previous = HashMap::new();

    // 100 keys in minute 0, over three flushes and a restart between the second and third.
    let mut agg = Aggregator::with_limits(&cfg.rules, &cfg.limits);
    for k in 0..40 {
        add(&mut agg, T0, &format!("k{k}"));
    }
    flush(&mut store, &mut agg, &mut previous, 1).await;
    for k in 0..70 {
        add(&mut agg, T0 + 1, &format!("k{k}"));
    }
    flush(&mut store, &mut agg, &mut previous, 2).await;
    let admitted: i64 = c
        .query_one(
            "SELECT sum(length(hashes) / 8)::int8 FROM logtally_admitted_keys \
             WHERE node = 'edge-1' AND tbl = 'hits'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(admitted, 10, "ten hashes committed, in one or more chunks");

    drop(agg);
    let mut agg = restarted(&store, &cfg).await;
    // After the restart: k0..k9 are still admitted, k10.. still overflow.
    for k in 0..100 {
        add(&mut agg, T0 + 2, &format!("k{k}"));
    }
    // A new minute admits its own ten.
    for k in 50..80 {
        add(&mut agg, T0 + MINUTE, &format!("k{k}"));
    }
    flush(&mut store, &mut agg, &mut previous, 3).await;

    assert_eq!(
        per_bucket(&c).await,
        vec![
            (T0, 10, 40 - 10 + 70 - 10 + 100 - 10, 40 + 70 + 100),
            (T0 + MINUTE, 10, 20, 30),
        ]
    );
    let first_ten: i64 = c
        .query_one(
            "SELECT count(*) FROM hits WHERE bucket = to_timestamp($1::float8 / 1000) \
             AND k = ANY($2) AND n = 3",
            &[
                &(T0 as f64),
                &(0..10).map(|k| format!("k{k}")).collect::<Vec<_>>(),
            ],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        first_ten, 10,
        "the first ten keys kept their rows across the restart"
    );

    // Another node has its own ten in the same bucket, and the same overflow row.
    let cfg2 = config(&url, "edge-2", "max_keys = 10");
    let mut store2 = Store::connect(&cfg2).await.unwrap();
    let mut agg2 = Aggregator::with_limits(&cfg2.rules, &cfg2.limits);
    for k in 90..120 {
        add(&mut agg2, T0, &format!("k{k}"));
    }
    flush(&mut store2, &mut agg2, &mut HashMap::new(), 1).await;
    let b = per_bucket(&c).await;
    assert_eq!(b[0].1, 20, "nodes × max_keys keys: {b:?}");
    assert_eq!(b[0].3, 210 + 30);
}

#[tokio::test]
async fn admitted_state_past_the_horizon_is_deleted_with_a_later_flush() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let cfg = config(&url, "edge-1", "max_keys = 5");
    let mut store = Store::connect(&cfg).await.unwrap();
    let c = client(&url).await;
    let mut previous = HashMap::new();
    let mut agg = Aggregator::with_limits(&cfg.rules, &cfg.limits);
    add(&mut agg, T0, "a");
    flush(&mut store, &mut agg, &mut previous, 1).await;
    // Two hours later (event time): the horizon of a 1m rule is an hour.
    add(&mut agg, T0 + 120 * MINUTE, "b");
    flush(&mut store, &mut agg, &mut previous, 2).await;
    let buckets: Vec<i64> = c
        .query(
            "SELECT (extract(epoch FROM bucket) * 1000)::int8 FROM logtally_admitted_keys \
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(buckets, vec![T0 + 120 * MINUTE]);
}

#[tokio::test]
async fn retention_deletes_rows_before_the_cutoff_in_batches_one_sidecar_at_a_time() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let cfg = config(&url, "edge-1", "retention = \"1h\"");
    let _store = Store::connect(&cfg).await.unwrap();
    let c = client(&url).await;
    // 25,000 rows two hours old (more than two batches), 300 rows inside retention.
    c.batch_execute(
        "INSERT INTO hits (bucket, k, n) \
         SELECT date_trunc('minute', now()) - interval '2 hours' - (i % 5) * interval '1 minute', \
                'k' || i, 1 FROM generate_series(1, 25000) i; \
         INSERT INTO hits (bucket, k, n) \
         SELECT date_trunc('minute', now()) - interval '30 minutes', 'k' || i, 1 \
         FROM generate_series(1, 300) i",
    )
    .await
    .unwrap();
    let now_ms: i64 = c
        .query_one("SELECT (extract(epoch FROM now()) * 1000)::int8", &[])
        .await
        .unwrap()
        .get(0);
    let cutoff = now_ms - 3_600_000;

    // Another session holds the rule's lock: the pass is skipped and deletes nothing.
    let other = client(&url).await;
    other
        .query_one(
            "SELECT pg_advisory_lock(hashtextextended('logtally:retention:' || $1, 0))",
            &[&"hits"],
        )
        .await
        .unwrap();
    let r = RetentionStore::connect(&cfg).await.unwrap();
    assert_eq!(
        r.pass(&cfg.rules[0], cutoff).await.unwrap(),
        RetentionPass::Skipped
    );
    other
        .query_one(
            "SELECT pg_advisory_unlock(hashtextextended('logtally:retention:' || $1, 0))",
            &[&"hits"],
        )
        .await
        .unwrap();

    assert_eq!(
        r.pass(&cfg.rules[0], cutoff).await.unwrap(),
        RetentionPass::Deleted(25_000)
    );
    let left: Vec<(i64, bool)> = c
        .query(
            "SELECT count(*), bool_and(bucket >= now() - interval '1 hour') FROM hits",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(left, vec![(300, true)]);
    // The lock was released: another session can take it.
    let free: bool = other
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('logtally:retention:' || $1, 0))",
            &[&"hits"],
        )
        .await
        .unwrap()
        .get(0);
    assert!(free);
    assert_eq!(
        r.pass(&cfg.rules[0], cutoff).await.unwrap(),
        RetentionPass::Skipped
    );
}
