//! The store against a real PostgreSQL: table creation and shape checks, additive upserts,
//! the checkpoint compare-and-swap, and deleting finished checkpoints.

use std::collections::HashMap;
use std::path::Path;

use logtally::aggregate::{Decimal, MetricValue, Row, RuleRows};
use logtally::config::{self, Config};
use logtally::db::{self, CheckpointEntry, FlushOutcome, Store, StoreError, TableState};
use logtally_e2e::postgres::TestPostgres;
use tokio_postgres::{Client, NoTls};

fn config(url: &str) -> Config {
    let text = format!(
        r#"
database_url = "{url}"
node = "edge-1"
spool_dir = "/nonexistent"
[[rule]]
table = "ad_events_1m"
bucket = "1m"
group_by = ["ad", "ev"]
metrics = {{ events = "count", bytes = "sum(bytes)", rt_min = "min(rt)", rt_max = "max(rt)" }}
"#
    );
    config::parse(Path::new("test.toml"), &text).expect("valid config")
}

async fn client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn d(v: i128) -> Decimal {
    Decimal(v * 1_000_000_000)
}

fn row(bucket_ms: i64, ad: &str, count: i64, bytes: i128, rt: Option<i128>) -> Row {
    Row {
        bucket_ms,
        dims: vec![ad.into(), "view".into()],
        metrics: vec![
            MetricValue::Count(count),
            MetricValue::Decimal(Some(d(bytes))),
            MetricValue::Decimal(rt.map(d)),
            MetricValue::Decimal(rt.map(d)),
        ],
    }
}

fn entry(segment: &str, offset: u64, finished: bool) -> CheckpointEntry {
    CheckpointEntry {
        segment: segment.into(),
        offset,
        finished,
    }
}

fn as_map(entries: &[CheckpointEntry]) -> HashMap<String, CheckpointEntry> {
    entries
        .iter()
        .map(|e| (e.segment.clone(), e.clone()))
        .collect()
}

async fn table_rows(c: &Client) -> Vec<(String, i64, String, Option<String>, Option<String>)> {
    c.query(
        "SELECT ad, events, bytes::text, rt_min::text, rt_max::text FROM ad_events_1m \
         ORDER BY bucket, ad",
        &[],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

#[tokio::test]
async fn creates_tables_upserts_additively_and_moves_the_checkpoint() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let cfg = config(&url);
    let states = db::check(&cfg).await.unwrap();
    assert!(
        states.iter().all(|(_, s)| *s == TableState::Missing),
        "{states:?}"
    );

    let mut s = Store::connect(&cfg).await.unwrap();
    assert_eq!(
        db::check(&cfg).await.unwrap(),
        vec![
            ("ad_events_1m".into(), TableState::Ok),
            ("logtally_checkpoint".into(), TableState::Ok)
        ]
    );
    assert_eq!(s.load_checkpoint().await.unwrap(), vec![]);

    let batch1 = vec![RuleRows {
        rule: 0,
        rows: vec![
            row(0, "a", 2, 10, Some(5)),
            row(0, "b", 1, 1, None),
            row(60_000, "a", 1, 7, Some(9)),
        ],
    }];
    let pos1 = vec![entry("1-1-000001.seg", 100, false)];
    assert_eq!(
        s.flush(&batch1, &pos1, &HashMap::new()).await.unwrap(),
        FlushOutcome::Committed
    );

    let batch2 = vec![RuleRows {
        rule: 0,
        rows: vec![row(0, "a", 3, 5, Some(1)), row(0, "b", 1, 2, Some(4))],
    }];
    let pos2 = vec![
        entry("1-1-000001.seg", 250, true),
        entry("1-1-000002.seg", 40, false),
    ];
    assert_eq!(
        s.flush(&batch2, &pos2, &as_map(&pos1)).await.unwrap(),
        FlushOutcome::Committed
    );

    let c = client(&url).await;
    let n = |v: &str| v.to_string();
    let sn = |v: &str| Some(v.to_string());
    assert_eq!(
        table_rows(&c).await,
        vec![
            (n("a"), 5, n("15"), sn("1"), sn("5")),
            (n("b"), 2, n("3"), sn("4"), sn("4")),
            (n("a"), 1, n("7"), sn("9"), sn("9")),
        ]
    );
    let mut cp = s.load_checkpoint().await.unwrap();
    cp.sort_by(|a, b| a.segment.cmp(&b.segment));
    assert_eq!(cp, pos2);

    // The retry of a flush that already landed is recognised and writes nothing.
    assert_eq!(
        s.flush(&batch2, &pos2, &as_map(&pos1)).await.unwrap(),
        FlushOutcome::AlreadyCommitted
    );
    // A flush from a process with a stale idea of the checkpoint is refused, in full.
    let err = s
        .flush(
            &batch1,
            &[entry("1-1-000002.seg", 90, false)],
            &HashMap::new(),
        )
        .await;
    match err {
        Err(StoreError::CheckpointConflict {
            segment,
            expected,
            found,
            ..
        }) => {
            assert_eq!(segment, "1-1-000002.seg");
            assert_eq!(expected, None);
            assert_eq!(found, Some((40, false)));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        table_rows(&c).await[0].1,
        5,
        "a refused flush must not count"
    );

    // Only finished segments' rows are deleted.
    let gone = vec!["1-1-000001.seg".to_string(), "1-1-000002.seg".to_string()];
    assert_eq!(s.delete_finished(&gone).await.unwrap(), 1);
    assert_eq!(
        s.load_checkpoint().await.unwrap(),
        vec![entry("1-1-000002.seg", 40, false)]
    );

    // Another node's checkpoint is its own.
    let mut other = cfg.clone();
    other.node = "edge-2".into();
    assert_eq!(
        Store::connect(&other)
            .await
            .unwrap()
            .load_checkpoint()
            .await
            .unwrap(),
        vec![]
    );
}

#[tokio::test]
async fn refuses_a_table_of_the_wrong_shape_and_says_what_differs() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let c = client(&url).await;
    c.batch_execute(
        "CREATE TABLE ad_events_1m (bucket timestamptz NOT NULL, ad text NOT NULL, \
         events integer NOT NULL, bytes numeric NOT NULL, rt_min numeric, rt_max numeric, \
         note text, PRIMARY KEY (bucket, ad))",
    )
    .await
    .unwrap();
    let cfg = config(&url);
    let err = Store::connect(&cfg).await.unwrap_err();
    let text = err.to_string();
    for needle in [
        "table ad_events_1m",
        "column ev (text) is missing",
        "column events is integer, expected bigint",
        "column note (text) is not in the configuration",
        "primary key is (bucket, ad), expected (bucket, ad, ev)",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert!(!err.is_transient());
    // `check` says the same, and creates nothing.
    let err = db::check(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("column ev (text) is missing"), "{err}");
    let exists: bool = c
        .query_one("SELECT to_regclass('logtally_checkpoint') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "check must not create tables");
}

#[tokio::test]
async fn unreachable_database_is_a_transient_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(&format!(
        "postgres://nobody@127.0.0.1:{port}/x?connect_timeout=2"
    ));
    let err = db::check(&cfg).await.unwrap_err();
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}/x")), "{text}");
}

#[tokio::test]
async fn concurrent_flushes_of_two_nodes_on_the_same_keys_add_up() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let cfg = config(&url);
    let mut tasks = Vec::new();
    for node in ["n1", "n2", "n3"] {
        let mut cfg = cfg.clone();
        cfg.node = node.into();
        tasks.push(tokio::spawn(async move {
            let mut s = Store::connect(&cfg).await.unwrap();
            let mut prev = HashMap::new();
            for i in 1..=20u64 {
                // Keys in different orders per node, to provoke lock-order trouble.
                let mut rows: Vec<Row> = (0..50)
                    .map(|k| row(0, &format!("k{k}"), 1, 2, Some(k)))
                    .collect();
                if node == "n2" {
                    rows.reverse();
                }
                let pos = vec![entry("s.seg", i * 10, false)];
                loop {
                    match s
                        .flush(
                            &[RuleRows {
                                rule: 0,
                                rows: rows.clone(),
                            }],
                            &pos,
                            &prev,
                        )
                        .await
                    {
                        Ok(FlushOutcome::Committed) => break,
                        Err(e) if e.is_transient() => continue,
                        other => panic!("{other:?}"),
                    }
                }
                prev = as_map(&pos);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = client(&url).await;
    let rows = table_rows(&c).await;
    assert_eq!(rows.len(), 50);
    assert!(rows.iter().all(|r| r.1 == 60 && r.2 == "120"), "{rows:?}");
}

#[tokio::test]
async fn decimals_reach_postgresql_exactly_in_binary() {
    use logtally::db::SqlNumeric;
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let c = client(&url).await;
    let values = [
        0i128,
        1,
        -1,
        999_999_999,
        1_000_000_000,
        -1_500_000_000,
        12_345_678_901_234_567_890,
        10_000_000_000_000,
        i128::MAX,
        i128::MIN + 1,
        i128::MIN,
    ];
    for v in values {
        let row = c
            .query_one("SELECT $1::numeric::text", &[&SqlNumeric(Decimal(v))])
            .await
            .unwrap();
        let got: String = row.get(0);
        assert_eq!(got, Decimal(v).to_string(), "Decimal({v})");
    }
}
