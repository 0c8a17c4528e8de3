//! `auto_migrate` against a real PostgreSQL: a rule that gains metrics on a table with rows.
//! Without the key, `run` (the store) and `check` refuse naming the `ALTER TABLE` statements;
//! with it, several sidecars starting together add the columns once, the rows already there
//! merge right with the new ones (truth: the values this test flushed), and removing a
//! column is refused either way.

use std::path::Path;

use logtally::aggregate::{Decimal, MetricValue, Row, RuleRows};
use logtally::config::{self, Config};
use logtally::db::{self, Store, StoreError, TableState};
use logtally_e2e::postgres::TestPostgres;
use tokio_postgres::NoTls;

fn config(url: &str, metrics: &str, extra: &str) -> Config {
    let text = format!(
        "database_url = \"{url}\"\nnode = \"m\"\nspool_dir = \"/nonexistent\"\n{extra}\n\
         [[rule]]\ntable = \"mig_1m\"\nbucket = \"1m\"\ngroup_by = [\"ad\"]\n\
         metrics = {{ {metrics} }}\n"
    );
    config::parse(Path::new("test.toml"), &text).expect("valid config")
}

const V1: &str = "events = \"count\"";
const V2: &str =
    "events = \"count\", views = \"count where ev = 'view'\", bytes = \"sum(bytes)\", rt_max = \"max(rt)\"";

fn d(v: i128) -> Decimal {
    Decimal(v * 1_000_000_000)
}

fn rows(rows: Vec<Row>) -> Vec<RuleRows> {
    vec![RuleRows { rule: 0, rows }]
}

#[tokio::test]
async fn a_rule_that_gains_metrics_migrates_only_with_auto_migrate() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let mut s = Store::connect(&config(&url, V1, "")).await.unwrap();
    let v1_row = |ad: &str, n| Row {
        bucket_ms: 0,
        dims: vec![ad.into()],
        metrics: vec![MetricValue::Count(n)],
    };
    s.flush(
        &rows(vec![v1_row("a", 2), v1_row("b", 1)]),
        &[],
        &Default::default(),
    )
    .await
    .unwrap();
    drop(s);

    // Refused without auto_migrate, by `run` and `check` alike, naming the statements.
    let refuse = config(&url, V2, "");
    for error in [
        Store::connect(&refuse).await.unwrap_err(),
        db::check(&refuse).await.unwrap_err(),
    ] {
        assert!(matches!(error, StoreError::Migratable { .. }), "{error}");
        let text = error.to_string();
        for want in [
            "auto_migrate = true",
            "ALTER TABLE \"mig_1m\" ADD COLUMN IF NOT EXISTS \"views\" bigint NOT NULL DEFAULT 0",
            "ADD COLUMN IF NOT EXISTS \"bytes\" numeric NOT NULL DEFAULT 0",
            "ADD COLUMN IF NOT EXISTS \"rt_max\" numeric",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
    }

    // With it: `check` says what run will do; four sidecars start together.
    let migrate = config(&url, V2, "auto_migrate = true");
    let states = db::check(&migrate).await.unwrap();
    assert!(
        matches!(&states[0], (t, TableState::Migrate(s)) if t == "mig_1m" && s.len() == 3),
        "{states:?}"
    );
    let stores = futures_join(4, &migrate).await;
    let mut s = stores.into_iter().next().unwrap();
    assert_eq!(
        db::check(&migrate).await.unwrap()[0],
        ("mig_1m".to_string(), TableState::Ok)
    );
    let v2_row = |ad: &str, n, views, bytes, rt: Option<i128>| Row {
        bucket_ms: 0,
        dims: vec![ad.into()],
        metrics: vec![
            MetricValue::Count(n),
            MetricValue::Count(views),
            MetricValue::Decimal(Some(d(bytes))),
            MetricValue::Decimal(rt.map(d)),
        ],
    };
    s.flush(
        &rows(vec![
            v2_row("a", 3, 1, 7, Some(9)),
            v2_row("c", 1, 1, 5, None),
        ]),
        &[],
        &Default::default(),
    )
    .await
    .unwrap();
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let got: Vec<(String, i64, i64, String, Option<String>)> = client
        .query(
            "SELECT ad, events, views, bytes::text, rt_max::text FROM mig_1m ORDER BY ad",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let t = |ad: &str, n, v, b: &str, rt: Option<&str>| {
        (ad.to_string(), n, v, b.to_string(), rt.map(str::to_string))
    };
    assert_eq!(
        got,
        [
            t("a", 5, 1, "7", Some("9")),
            t("b", 1, 0, "0", None),
            t("c", 1, 1, "5", None)
        ]
    );
    drop(s);

    // Removing a column is refused, auto_migrate or not.
    let removed = config(&url, V1, "auto_migrate = true");
    let error = Store::connect(&removed).await.unwrap_err();
    assert!(matches!(error, StoreError::Shape(_)), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("column views (bigint) is not in the configuration")
            && text.contains("auto_migrate only adds"),
        "{text}"
    );
}

/// `n` stores connecting at once (each its own connection): all must succeed.
async fn futures_join(n: usize, config: &Config) -> Vec<Store> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let c = config.clone();
            tokio::spawn(async move { Store::connect(&c).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            t.await
                .unwrap()
                .expect("a concurrent auto_migrate start failed"),
        );
    }
    out
}
