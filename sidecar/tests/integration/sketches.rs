//! The sketches (issue 12) against a real PostgreSQL: the distinct-count sketch equals what the
//! `hll` extension builds and unions, and the quantile sketch's SQL functions read what the
//! Rust sketch holds.
//!

use logtally::aggregate::hll::{self, Hll};
use logtally::aggregate::quantiles::{self, Quantiles, QuantilesParts};
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

/// The hash is `hll_hash_text`'s and `hll_hash_bytea`'s, for every length around the
/// 16-byte blocks and tails (0 to 80 characters, multi-byte ones included).
#[tokio::test]
async fn hll_hash_is_hll_hash_text() {
    let pg = TestPostgres::start();
    let db = hll_database(&pg).await;
    fill_raw(&db, "raw", 0, 200).await;
    db.batch_execute(
        "INSERT INTO raw SELECT left(repeat('abcdefghij€é', 10), i) FROM generate_series(0, 80) i;
         INSERT INTO raw SELECT left(repeat('0123456789', 10), i) FROM generate_series(0, 80) i;",
    )
    .await
    .unwrap();
    let rows = db
        .query(
            "SELECT v, hll_hash_text(v)::text, hll_hash_bytea(convert_to(v, 'UTF8'))::text FROM raw",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 362);
    let mut lengths = std::collections::BTreeSet::new();
    for r in rows {
        let (v, text, bytea): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let ours = hll::hash(v.as_bytes()) as i64;
        assert_eq!(ours, text.parse::<i64>().unwrap(), "hll_hash_text({v:?})");
        assert_eq!(ours, bytea.parse::<i64>().unwrap(), "hll_hash_bytea({v:?})");
        lengths.insert(v.len());
    }
    assert!(
        (0..=80).all(|n| lengths.contains(&n)),
        "byte lengths {lengths:?}"
    );
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
    // The empty string hashes to 0, which an explicit sketch keeps and registers ignore.
    db.batch_execute("CREATE TABLE raw_empty (v text); INSERT INTO raw_empty VALUES (''), ('a');")
        .await
        .unwrap();
    let mut with_empty = Hll::new();
    with_empty.insert(b"");
    with_empty.insert(b"a");
    assert_eq!(
        with_empty.encode(),
        sql_sketch(&db, "raw_empty").await,
        "'' and 'a'"
    );
    db.batch_execute("INSERT INTO raw_1000 VALUES ('')")
        .await
        .unwrap();
    let mut dense_with_empty = sketch(0, 1000);
    dense_with_empty.insert(b"");
    assert_eq!(
        dense_with_empty.encode(),
        sql_sketch(&db, "raw_1000").await,
        "1000 and ''"
    );
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

// ---------------------------------------------------------------------------------------
// Quantiles

use logtally::db::QUANTILES_SQL;

async fn quantiles_database(pg: &TestPostgres) -> Client {
    let db = client(&pg.create_database().await).await;
    db.batch_execute(QUANTILES_SQL).await.unwrap();
    // Installing twice is harmless (the sidecar does it at every start).
    db.batch_execute(QUANTILES_SQL).await.unwrap();
    db
}

/// A deterministic generator: the test makes its values, so it knows the truth.
struct Rng(proptest::test_runner::TestRng);
impl Rng {
    fn new() -> Rng {
        use proptest::test_runner::{RngAlgorithm, TestRng};
        Rng(TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    }
    fn unit(&mut self) -> f64 {
        use proptest::prelude::Rng as _;
        ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Request-time-like distributions (seconds with microsecond resolution, as nginx writes).
fn distributions(n: usize) -> Vec<(&'static str, Vec<f64>)> {
    let mut rng = Rng::new();
    let micros = |x: f64| (x * 1e6).round().max(1.0) / 1e6;
    let uniform = (0..n).map(|_| micros(rng.unit() * 2.0)).collect();
    let log_normal = (0..n)
        .map(|_| micros((rng.normal() * 1.5 - 4.0).exp()))
        .collect();
    let two_peaks = (0..n)
        .map(|i| {
            let centre = if i % 4 == 0 { 1.2 } else { 0.003 };
            micros(centre * (1.0 + 0.1 * rng.normal()).abs())
        })
        .collect();
    vec![
        ("uniform", uniform),
        ("log-normal", log_normal),
        ("two peaks", two_peaks),
    ]
}

fn sketch_of(values: &[f64]) -> Quantiles {
    let mut s = Quantiles::new(quantiles::DEFAULT_ALPHA).unwrap();
    for &v in values {
        s.insert(v);
    }
    s
}

async fn parts_of(
    db: &Client,
    expr: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> QuantilesParts {
    let row = db
        .query_one(
            &format!(
                "SELECT (m).alpha, (m).zero, (m).pos_keys, (m).pos_counts, (m).neg_keys, (m).neg_counts
                 FROM (SELECT {expr} AS m) AS x"
            ),
            params,
        )
        .await
        .unwrap();
    // An empty side is NULL.
    let side = |i: usize| row.get::<_, Option<Vec<_>>>(i).unwrap_or_default();
    let counts = |i: usize| row.get::<_, Option<Vec<i64>>>(i).unwrap_or_default();
    QuantilesParts {
        alpha: row.get(0),
        zero: row.get(1),
        pos_keys: side(2),
        pos_counts: counts(3),
        neg_keys: side(4),
        neg_counts: counts(5),
    }
}

/// `logtally_quantile` over the Rust sketch gives the Rust estimate (to the bit), and both are
/// within α of PostgreSQL's own `percentile_disc` over the raw values (±1 rank).
#[tokio::test]
async fn quantile_sql_equals_rust_and_percentile_disc() {
    let pg = TestPostgres::start();
    let db = quantiles_database(&pg).await;
    let alpha = quantiles::DEFAULT_ALPHA;
    for (name, values) in distributions(20_000) {
        db.batch_execute("DROP TABLE IF EXISTS raw; CREATE TABLE raw (v float8 NOT NULL)")
            .await
            .unwrap();
        db.execute("INSERT INTO raw SELECT unnest($1::float8[])", &[&values])
            .await
            .unwrap();
        let sorted: Vec<f64> = db
            .query("SELECT v FROM raw ORDER BY v", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let s = sketch_of(&values);
        let literal = s.to_sql_literal();
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let row = db
                .query_one(
                    "SELECT logtally_quantile($1::text::logtally_quantiles, $2),
                            (SELECT percentile_disc($2) WITHIN GROUP (ORDER BY v) FROM raw)",
                    &[&literal, &q],
                )
                .await
                .unwrap();
            let (sql, disc): (f64, f64) = (row.get(0), row.get(1));
            let rust = s.quantile(q).unwrap();
            assert_eq!(
                sql.to_bits(),
                rust.to_bits(),
                "{name} q {q}: SQL {sql} vs Rust {rust}"
            );
            let disc_rank = ((q * sorted.len() as f64).ceil() as usize).max(1) - 1;
            assert_eq!(
                sorted[disc_rank], disc,
                "{name} q {q}: percentile_disc's rank"
            );
            let lo = disc_rank.saturating_sub(1);
            let hi = (disc_rank + 1).min(sorted.len() - 1);
            let ok = sorted[lo..=hi]
                .iter()
                .any(|&exact| (rust - exact).abs() <= alpha * exact.abs() * (1.0 + 1e-12));
            assert!(ok, "{name} q {q}: estimate {rust}, percentile_disc {disc}");
        }
        // Empty and out-of-range reads are NULL.
        let row = db
            .query_one(
                "SELECT logtally_quantile($1::text::logtally_quantiles, 1.5),
                        logtally_quantile('(0.01,0,{},{},{},{})'::logtally_quantiles, 0.5)",
                &[&literal],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, Option<f64>>(0), row.get::<_, Option<f64>>(1)),
            (None, None)
        );
    }
}

/// Upserts that merge with `logtally_quantiles_add` and the aggregate
/// `logtally_quantiles_merge` over rows give exactly the Rust merge.
#[tokio::test]
async fn quantiles_upsert_and_merge_aggregate_equal_rust_merge() {
    let pg = TestPostgres::start();
    let db = quantiles_database(&pg).await;
    db.batch_execute("CREATE TABLE t (k int PRIMARY KEY, rt logtally_quantiles NOT NULL)")
        .await
        .unwrap();
    let mut all = Quantiles::new(quantiles::DEFAULT_ALPHA).unwrap();
    let mut per_key: Vec<Quantiles> = (0..5)
        .map(|_| Quantiles::new(quantiles::DEFAULT_ALPHA).unwrap())
        .collect();
    let mut rng = Rng::new();
    for (flush, (_, values)) in distributions(3_000).into_iter().enumerate() {
        // Each "flush" writes one part per key; some values negative or zero.
        for (k, chunk) in values.chunks(values.len() / 5).take(5).enumerate() {
            let part: Vec<f64> = chunk
                .iter()
                .map(|&v| match rng.unit() {
                    u if u < 0.05 => -v,
                    u if u < 0.08 => 0.0,
                    _ => v,
                })
                .collect();
            let s = sketch_of(&part);
            db.execute(
                "INSERT INTO t AS t (k, rt) VALUES ($1, $2::text::logtally_quantiles)
                 ON CONFLICT (k) DO UPDATE SET rt = logtally_quantiles_add(t.rt, excluded.rt)",
                &[&(k as i32), &s.to_sql_literal()],
            )
            .await
            .unwrap();
            per_key[k].merge(&s).unwrap();
            all.merge(&s).unwrap();
            assert!(flush < 3);
        }
    }
    for (k, want) in per_key.iter().enumerate() {
        let got = parts_of(&db, &format!("(SELECT rt FROM t WHERE k = {k})"), &[]).await;
        assert_eq!(got, want.to_parts(), "key {k} after three upserts");
    }
    let got = parts_of(&db, "(SELECT logtally_quantiles_merge(rt) FROM t)", &[]).await;
    assert_eq!(
        got,
        all.to_parts(),
        "logtally_quantiles_merge over the rows"
    );
    assert_eq!(Quantiles::from_parts(&got).unwrap(), all);
    let row = db
        .query_one(
            "SELECT logtally_quantile(logtally_quantiles_merge(rt), 0.99) FROM t",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, f64>(0).to_bits(),
        all.quantile(0.99).unwrap().to_bits()
    );
    // Many rows with wide sketches: the aggregate compacts its state several times, and a
    // parallel plan (partial states combined) gives the same sketch.
    db.batch_execute("CREATE TABLE many (g int NOT NULL, rt logtally_quantiles NOT NULL)")
        .await
        .unwrap();
    let mut groups: Vec<Quantiles> = (0..2).map(|_| sketch_of(&[])).collect();
    let mut literals = Vec::new();
    let mut group_ids = Vec::new();
    for row in 0..3000 {
        let values: Vec<f64> = (0..40)
            .map(|_| {
                let sign = if rng.unit() < 0.1 { -1.0 } else { 1.0 };
                sign * 10f64.powf(-6.0 + 15.0 * rng.unit())
            })
            .collect();
        let s = sketch_of(&values);
        groups[row % 2].merge(&s).unwrap();
        literals.push(s.to_sql_literal());
        group_ids.push((row % 2) as i32);
    }
    db.execute(
        "INSERT INTO many SELECT g, rt::logtally_quantiles FROM unnest($1::int[], $2::text[]) AS u(g, rt)",
        &[&group_ids, &literals],
    )
    .await
    .unwrap();
    let mut everything = groups[0].clone();
    everything.merge(&groups[1]).unwrap();
    assert!(
        everything.to_parts().pos_keys.len() > 1000,
        "wide enough to compact"
    );
    for parallel in [false, true] {
        if parallel {
            db.batch_execute(
                "SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0;
                 SET min_parallel_table_scan_size = 0; SET max_parallel_workers_per_gather = 2;",
            )
            .await
            .unwrap();
            let plan: Vec<String> = db
                .query("EXPLAIN SELECT logtally_quantiles_merge(rt) FROM many", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(
                plan.iter().any(|l| l.contains("Partial Aggregate")),
                "{plan:?}"
            );
        }
        let got = parts_of(&db, "(SELECT logtally_quantiles_merge(rt) FROM many)", &[]).await;
        assert_eq!(
            got,
            everything.to_parts(),
            "3,000 wide rows, parallel {parallel}"
        );
        for (g, want) in groups.iter().enumerate() {
            let expr = format!("(SELECT logtally_quantiles_merge(rt) FROM many WHERE g = {g})");
            assert_eq!(
                parts_of(&db, &expr, &[]).await,
                want.to_parts(),
                "group {g}"
            );
        }
    }
    let none = db
        .query_one(
            "SELECT logtally_quantiles_merge(rt) IS NULL FROM many WHERE g > 5",
            &[],
        )
        .await
        .unwrap();
    assert!(none.get::<_, bool>(0), "no rows: NULL");
    // NULL is the empty sketch; different accuracies refuse to merge.
    let one = sketch_of(&[0.5]).to_sql_literal();
    let got = parts_of(
        &db,
        "logtally_quantiles_add(NULL, $1::text::logtally_quantiles)",
        &[&one],
    )
    .await;
    assert_eq!(got, sketch_of(&[0.5]).to_parts());
    let err = db
        .query_one(
            "SELECT logtally_quantiles_add($1::text::logtally_quantiles,
                                           '(0.02,1,{},{},{},{})'::logtally_quantiles)",
            &[&one],
        )
        .await
        .unwrap_err();
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("relative accuracy 0.01 and 0.02"),
        "{err:?}"
    );
}

/// What a row holds, as PostgreSQL stores it (`pg_column_size`), printed for the docs.
#[tokio::test]
async fn quantiles_bytes_per_row() {
    let pg = TestPostgres::start();
    let db = quantiles_database(&pg).await;
    db.batch_execute("CREATE TABLE sizes (name text, rt logtally_quantiles)")
        .await
        .unwrap();
    let g = (1.0 + quantiles::DEFAULT_ALPHA) / (1.0 - quantiles::DEFAULT_ALPHA);
    // One value in every bucket between 1 µs and 100 s: the most such a column can hold.
    let every_bucket: Vec<f64> = (-700..=240)
        .map(|k| g.powi(k) / g.sqrt())
        .filter(|&v| (1e-6..=100.0).contains(&v))
        .collect();
    let dists = distributions(100_000);
    let cases: Vec<(&str, Vec<f64>)> = vec![
        ("empty", vec![]),
        ("1 value", vec![0.012]),
        ("10 values", dists[1].1[..10].to_vec()),
        ("100 values", dists[1].1[..100].to_vec()),
        ("100000 log-normal", dists[1].1.clone()),
        ("100000 two peaks", dists[2].1.clone()),
        ("every bucket 1us..100s", every_bucket),
    ];
    let mut report = Vec::new();
    for (name, values) in &cases {
        let s = sketch_of(values);
        db.execute(
            "INSERT INTO sizes VALUES ($1, $2::text::logtally_quantiles)",
            &[name, &s.to_sql_literal()],
        )
        .await
        .unwrap();
        let row = db
            .query_one(
                "SELECT pg_column_size(rt), octet_length(rt::text) FROM sizes WHERE name = $1",
                &[name],
            )
            .await
            .unwrap();
        let (stored, text): (i32, i32) = (row.get(0), row.get(1));
        let buckets = s.to_parts().pos_keys.len();
        report.push(format!(
            "{name}: {buckets} buckets, {stored} bytes stored, {text} bytes as text"
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(report
        .last()
        .unwrap()
        .starts_with("every bucket 1us..100s: 921 buckets"));
}
