//! The sketches (issue 12) against a real PostgreSQL: the distinct-count sketch equals what the
//! `hll` extension builds and unions, and the quantile sketch's SQL functions read what the
//! Rust sketch holds.
//!
//! The sketch modules are not wired into the library yet (the sidecar's layout is being
//! reorganised), so this file compiles them itself; their own unit tests run here too. Once
//! they are `logtally::aggregate::{hll, quantiles}` and `logtally::config::condition`, replace
//! the `#[path]` modules below by `use`s.

#![allow(dead_code)]

#[path = "../src/aggregate/hll.rs"]
mod hll;

use hll::Hll;
use logtally_e2e::postgres::TestPostgres;
use tokio_postgres::{Client, NoTls};

async fn client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// A database with the `hll` extension, or a loud failure naming the package to install.
async fn hll_database(pg: &TestPostgres) -> Client {
    let db = client(&pg.create_database().await).await;
    if let Err(e) = db.batch_execute("CREATE EXTENSION hll").await {
        panic!("CREATE EXTENSION hll failed (install postgresql-15-hll): {e}");
    }
    db
}

/// The values `'u' || i || '-é'` for i in `from..to`, as the test's raw table holds them.
fn value(i: u32) -> String {
    format!("u{i}-é")
}

async fn fill_raw(db: &Client, table: &str, from: u32, to: u32) {
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (v text NOT NULL);
         INSERT INTO {table} SELECT 'u' || i || '-é' FROM generate_series({from}, {to} - 1) i;"
    ))
    .await
    .unwrap();
}

fn sketch(from: u32, to: u32) -> Hll {
    let mut h = Hll::new();
    for i in from..to {
        h.insert(value(i).as_bytes());
    }
    h
}

async fn sql_sketch(db: &Client, table: &str) -> Vec<u8> {
    db.query_one(
        &format!("SELECT hll_send(hll_add_agg(hll_hash_text(v))) FROM {table}"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn hll_hash_is_hll_hash_text() {
    let pg = TestPostgres::start();
    let db = hll_database(&pg).await;
    fill_raw(&db, "raw", 0, 200).await;
    let rows = db
        .query("SELECT v, hll_hash_text(v)::text FROM raw", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 200);
    for r in rows {
        let (v, h): (String, String) = (r.get(0), r.get(1));
        assert_eq!(
            hll::hash(v.as_bytes()) as i64,
            h.parse::<i64>().unwrap(),
            "{v}"
        );
    }
}

/// At every representation and at its boundaries (160/161 hashes: explicit → registers;
/// around 640 filled registers: sparse → full), the Rust sketch's bytes are the extension's.
#[tokio::test]
async fn hll_bytes_equal_hll_add_agg() {
    let pg = TestPostgres::start();
    let db = hll_database(&pg).await;
    let mut seen_types = Vec::new();
    for n in [1u32, 10, 160, 161, 300, 680, 750, 1_000, 100_000] {
        let table = format!("raw_{n}");
        fill_raw(&db, &table, 0, n).await;
        let want = sql_sketch(&db, &table).await;
        let got = sketch(0, n).encode();
        assert_eq!(got, want, "{n} values: Rust vs hll_add_agg");
        assert_eq!(
            Hll::decode(&want).unwrap().encode(),
            want,
            "{n} values: decode"
        );
        seen_types.push((n, want[0], want.len()));
    }
    eprintln!("(values, type byte, bytes): {seen_types:?}");
    // The run covered explicit, sparse with more than 512 entries (where a threshold of 512
    // would already write full) and full.
    assert!(seen_types.iter().any(|&(_, t, _)| t == 0x12));
    assert!(seen_types
        .iter()
        .any(|&(_, t, len)| t == 0x13 && (len - 3) / 2 > 512));
    assert!(seen_types.iter().any(|&(_, t, _)| t == 0x14));
}

/// Unions: the Rust merge of two sketches equals `hll_union` of the same two sketches and of
/// the SQL-built ones, for halves that are explicit, sparse and full, overlapping or not.
#[tokio::test]
async fn hll_merge_equals_hll_union() {
    let pg = TestPostgres::start();
    let db = hll_database(&pg).await;
    let cases: [(u32, u32, u32, u32); 6] = [
        (0, 5, 5, 9),                // explicit ∪ explicit → explicit
        (0, 100, 50, 150),           // overlapping explicit halves
        (0, 100, 100, 200),          // explicit ∪ explicit → promoted
        (0, 150, 150, 600),          // explicit ∪ sparse
        (0, 400, 200, 700),          // sparse ∪ sparse (overlapping)
        (0, 20_000, 19_990, 20_050), // full ∪ explicit
    ];
    for (k, &(a0, a1, b0, b1)) in cases.iter().enumerate() {
        let (ta, tb) = (format!("a{k}"), format!("b{k}"));
        fill_raw(&db, &ta, a0, a1).await;
        fill_raw(&db, &tb, b0, b1).await;
        let (a, b) = (sketch(a0, a1), sketch(b0, b1));
        let mut merged = a.clone();
        merged.merge(&b);
        let row = db
            .query_one(
                &format!(
                    "SELECT hll_send(hll_union($1::bytea::hll, $2::bytea::hll)),
                            hll_send(hll_union(
                                (SELECT hll_add_agg(hll_hash_text(v)) FROM {ta}),
                                (SELECT hll_add_agg(hll_hash_text(v)) FROM {tb})))"
                ),
                &[&a.encode(), &b.encode()],
            )
            .await
            .unwrap();
        let (of_ours, of_sql): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
        assert_eq!(
            merged.encode(),
            of_ours,
            "case {k}: merge vs hll_union of our sketches"
        );
        assert_eq!(
            merged.encode(),
            of_sql,
            "case {k}: merge vs hll_union of SQL sketches"
        );
        let mut other_way = b.clone();
        other_way.merge(&a);
        assert_eq!(other_way.encode(), of_sql, "case {k}: b ∪ a");
    }
}
