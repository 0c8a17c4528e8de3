//! Sketch columns and SQL functions on distributed tables: `hll` and a histogram merge
//! aggregate, and the sidecar's sketch columns equal to what PostgreSQL computes itself.

use std::collections::{BTreeMap, HashMap};

use logtally_e2e::citus::{distribution, TestCitus};
use rand::{Rng, SeedableRng};

use super::{position, query, store_config};

/// A plpgsql merge function and an aggregate over it, of the kind the sidecar is to install
/// for its quantile sketches (bucket counts added element by element).
const HISTOGRAM_SQL: &str = "
CREATE FUNCTION lt_hist_add(a int8[], b int8[]) RETURNS int8[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    r int8[];
    n int := greatest(coalesce(array_length(a, 1), 0), coalesce(array_length(b, 1), 0));
BEGIN
    IF a IS NULL THEN RETURN b; END IF;
    IF b IS NULL THEN RETURN a; END IF;
    r := array_fill(0::int8, ARRAY[n]);
    FOR i IN 1..n LOOP r[i] := coalesce(a[i], 0) + coalesce(b[i], 0); END LOOP;
    RETURN r;
END $$;
CREATE AGGREGATE lt_hist_merge(int8[]) (
    sfunc = lt_hist_add, stype = int8[], combinefunc = lt_hist_add, parallel = safe);
";

/// `{a,b,…}` for an array literal.
fn pg_array(items: &[String]) -> String {
    format!("'{{{}}}'", items.join(","))
}

#[test]
fn hll_and_sql_functions_on_distributed_tables() {
    require_citus!();
    let cluster = TestCitus::start(2);
    let db = cluster.db();
    // postgresql-15-hll is installed on every node; the extension is created on the
    // coordinator only and Citus creates it on the workers.
    db.execute("CREATE EXTENSION hll");
    for w in 0..cluster.worker_count() {
        let found = cluster
            .worker_db(w)
            .query("SELECT extversion FROM pg_extension WHERE extname = 'hll'")
            .unwrap();
        assert_eq!(found.len(), 1, "hll on worker {w}");
    }

    // Distinct users per ad: the truth is a raw table of (ad, uid) the test fills.
    db.execute(
        "CREATE TABLE raw_uid (ad text NOT NULL, uid text NOT NULL, part int NOT NULL); \
         INSERT INTO raw_uid SELECT (i % 20)::text, 'u' || (i * 7919 % 5003), i % 3 \
         FROM generate_series(1, 30000) i",
    );
    db.execute(
        "CREATE TABLE ad_reach (bucket timestamptz NOT NULL, ad text NOT NULL, \
         reach hll NOT NULL, PRIMARY KEY (bucket, ad)); \
         SELECT create_distributed_table('ad_reach', 'ad')",
    );
    // Three flushes, each a third of the values, as three sidecars would send them: arrays
    // unnested into an additive upsert that unions the sketches.
    for part in 0..3 {
        let rows = db
            .query(&format!(
                "SELECT ad, substr(hll_add_agg(hll_hash_text(uid))::text, 3) \
                 FROM raw_uid WHERE part = {part} GROUP BY ad"
            ))
            .unwrap();
        let ads: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let sketches: Vec<String> = rows.iter().map(|r| r.get::<_, String>(1)).collect();
        let buckets = vec!["2025-11-28".to_string(); ads.len()];
        db.execute(&format!(
            "INSERT INTO ad_reach AS cur (bucket, ad, reach) \
             SELECT b, a, ('\\x' || h)::hll FROM unnest({}::timestamptz[], {}::text[], {}::text[]) \
             AS u(b, a, h) ON CONFLICT (bucket, ad) DO UPDATE SET reach = hll_union(cur.reach, excluded.reach)",
            pg_array(&buckets),
            pg_array(&ads),
            pg_array(&sketches)
        ));
    }
    // Per ad the merged sketch is byte for byte the one built over all its values at once.
    let equal: i64 = db
        .query(
            "SELECT count(*) FROM ad_reach r JOIN (SELECT ad, hll_add_agg(hll_hash_text(uid)) h \
             FROM raw_uid GROUP BY ad) t USING (ad) WHERE r.reach = t.h",
        )
        .unwrap()[0]
        .get(0);
    assert_eq!(equal, 20, "ads whose distributed sketch equals the raw one");
    // Across shards hll_union_agg is aggregated partially on the workers.
    let same: bool = db
        .query(
            "WITH d AS (SELECT hll_union_agg(reach) h FROM ad_reach), \
             r AS (SELECT hll_add_agg(hll_hash_text(uid)) h FROM raw_uid) \
             SELECT d.h = r.h FROM d, r",
        )
        .unwrap()[0]
        .get(0);
    assert!(same, "union over all shards = sketch of all values");

    // A plpgsql function and an aggregate created on the coordinator are created on the
    // workers too (citus.create_object_propagation = immediate), so an upsert that calls it
    // runs on the shards, and the aggregate with a combine function runs partly on them.
    db.execute(HISTOGRAM_SQL);
    db.execute(
        "CREATE TABLE ep_rt (bucket timestamptz NOT NULL, ep text NOT NULL, \
         rt int8[] NOT NULL, PRIMARY KEY (bucket, ep)); \
         SELECT create_distributed_table('ep_rt', 'ep')",
    );
    let mut want: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for _flush in 0..4 {
        let mut eps = Vec::new();
        let mut hists = Vec::new();
        for e in 0..10 {
            let ep = format!("/api/{e}");
            let hist: Vec<i64> = (0..rng.gen_range(1..8))
                .map(|_| rng.gen_range(0..100))
                .collect();
            let sum = want.entry(ep.clone()).or_default();
            sum.resize(sum.len().max(hist.len()), 0);
            for (s, h) in sum.iter_mut().zip(&hist) {
                *s += h;
            }
            let text: Vec<String> = hist.iter().map(|v| v.to_string()).collect();
            hists.push(format!("\"{{{}}}\"", text.join(",")));
            eps.push(ep);
        }
        let buckets = vec!["2025-11-28".to_string(); eps.len()];
        db.execute(&format!(
            "INSERT INTO ep_rt AS cur (bucket, ep, rt) \
             SELECT b, e, r::int8[] FROM unnest({}::timestamptz[], {}::text[], {}::text[]) \
             AS u(b, e, r) \
             ON CONFLICT (bucket, ep) DO UPDATE SET rt = lt_hist_add(cur.rt, excluded.rt)",
            pg_array(&buckets),
            pg_array(&eps),
            pg_array(&hists)
        ));
    }
    let got: BTreeMap<String, Vec<i64>> = db
        .query("SELECT ep, rt FROM ep_rt")
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, want);
    let mut all = Vec::<i64>::new();
    for h in want.values() {
        all.resize(all.len().max(h.len()), 0);
        for (a, v) in all.iter_mut().zip(h) {
            *a += v;
        }
    }
    let merged: Vec<i64> = db.query("SELECT lt_hist_merge(rt) FROM ep_rt").unwrap()[0].get(0);
    assert_eq!(merged, all);
    let plan: Vec<String> = db
        .query("EXPLAIN (VERBOSE) SELECT lt_hist_merge(rt) FROM ep_rt")
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("worker_partial_agg")),
        "{plan:#?}"
    );

    // Created with propagation off (or before Citus was there), a function is missing on the
    // workers: the upsert fails naming it, until create_distributed_function sends it.
    db.execute(
        "SET citus.enable_ddl_propagation = off; \
         CREATE FUNCTION lt_hist_add2(a int8[], b int8[]) RETURNS int8[] \
         LANGUAGE sql IMMUTABLE AS 'SELECT lt_hist_add(a, b)'",
    );
    let upsert = "INSERT INTO ep_rt AS cur VALUES ('2025-11-28', '/api/0', '{1}') \
                  ON CONFLICT (bucket, ep) DO UPDATE SET rt = lt_hist_add2(cur.rt, excluded.rt)";
    let err = db.try_execute(upsert).unwrap_err();
    let message = err.as_db_error().map(|d| d.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("lt_hist_add2") && m.contains("does not exist")),
        "{err:?}"
    );
    db.execute("SELECT create_distributed_function('lt_hist_add2(int8[], int8[])')");
    db.execute(upsert);
}

/// A rule with both sketch columns, distributed on `ad`.
const SKETCH_RULE: &str = r#"
[[rule]]
table = "ad_sketch"
bucket = "1d"
group_by = ["ad"]
metrics = { events = "count", reach = "distinct(uid)", rt = "quantiles(rt)" }
distribute_by = "ad"
"#;

/// `(ad, uid, rt)` events: 40 ads, 5,000 users, response times 1 ms … 10 s, skewed.
fn sketch_events(n: usize) -> Vec<(String, String, String)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    (0..n)
        .map(|_| {
            let u: f64 = rng.gen_range(0.0..1.0);
            (
                format!("ad{}", rng.gen_range(0..40)),
                format!("u{}", rng.gen_range(0..5000)),
                format!("{:.3}", (u * 9.2).exp() / 1000.0),
            )
        })
        .collect()
}

/// The rows one aggregator makes of `events` (as one sidecar's flush would carry them).
fn sketch_rows(
    config: &logtally::config::Config,
    events: &[(String, String, String)],
) -> Vec<logtally::aggregate::DrainedRows> {
    use logtally_spool::{decode_frame, encode_event, Decoded, Frame};
    let header: Vec<String> = ["ad", "uid", "rt"].iter().map(|s| s.to_string()).collect();
    let mut agg = logtally::aggregate::Aggregator::new(&config.rules);
    let day = 1_764_288_000_000u64;
    for (i, (ad, uid, rt)) in events.iter().enumerate() {
        let mut buf = Vec::new();
        let values = [ad.as_bytes(), uid.as_bytes(), rt.as_bytes()];
        encode_event(&mut buf, day + i as u64, values.iter().map(|v| Some(*v)));
        let Decoded::Frame {
            frame: Frame::Event(record),
            ..
        } = decode_frame(&buf)
        else {
            panic!("undecodable event");
        };
        agg.add_cached(1, &header, &record);
    }
    agg.drain_compact()
}

/// Per ad: events, the hll sketch's bytes, the quantile sketch's zero count, positive and
/// negative buckets, and the sketch's total count.
type SketchRow = (String, i64, Vec<u8>, String, i64);

async fn sketch_table(url: &str) -> Vec<SketchRow> {
    query(
        url,
        "SELECT ad, events, hll_send(reach), \
         concat_ws(' ', (rt).zero, coalesce((rt).pos_keys, '{}'), coalesce((rt).pos_counts, '{}'), \
                   coalesce((rt).neg_keys, '{}'), coalesce((rt).neg_counts, '{}')), \
         ((rt).zero + coalesce((SELECT sum(c) FROM unnest((rt).pos_counts) c), 0) \
                    + coalesce((SELECT sum(c) FROM unnest((rt).neg_counts) c), 0))::int8 \
         FROM ad_sketch ORDER BY ad",
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

#[test]
fn sketch_columns_on_distributed_tables_equal_postgresqls_own() {
    use logtally::db::Store;
    use logtally_e2e::postgres::TestPostgres;
    require_citus!();
    let cluster = TestCitus::start(2);
    let db = cluster.db();
    // The operator's one step: hll on the coordinator (Citus creates it on the workers, the
    // package being installed on each). The sidecar installs the quantile type and functions.
    db.execute("CREATE EXTENSION hll");
    let events = sketch_events(30_000);
    let url = cluster.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Three sidecars start together, then each flushes two parts of the events.
    let parts: Vec<&[(String, String, String)]> = events.chunks(5_000).collect();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for s in 0..3 {
            let config = store_config(&url, &format!("sketch-{s}"), SKETCH_RULE);
            let mine = [parts[s], parts[s + 3]];
            let mine: Vec<Vec<_>> = mine.iter().map(|p| sketch_rows(&config, p)).collect();
            tasks.push(tokio::spawn(async move {
                let mut store = Store::connect(&config).await.unwrap();
                let mut previous = HashMap::new();
                for (i, rows) in mine.into_iter().enumerate() {
                    let pos = vec![position("s1", i as u64 + 1)];
                    store.flush(&rows, &pos, &previous).await.unwrap();
                    previous = pos.into_iter().map(|p| (p.segment.clone(), p)).collect();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let d = distribution(&db, "ad_sketch").unwrap();
    assert_eq!((d.method, d.column.as_deref()), ('h', Some("ad")));
    // The type and the functions the sidecar installed are on every worker.
    let on_workers = db
        .query(
            "SELECT result FROM run_command_on_workers($$SELECT \
             to_regtype('logtally_quantiles') IS NOT NULL AND \
             to_regprocedure('logtally_quantiles_add(logtally_quantiles, logtally_quantiles)') \
             IS NOT NULL AND (SELECT count(*) FROM pg_extension WHERE extname = 'hll') = 1$$)",
        )
        .unwrap();
    let on_workers: Vec<String> = on_workers.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        on_workers,
        vec!["t", "t"],
        "type, merge function and hll on each worker"
    );

    // The same events in one flush into one plain PostgreSQL, and a raw table there.
    let pg = TestPostgres::start();
    let plain_url = rt.block_on(pg.create_database_with_hll());
    let plain = rt.block_on(async {
        let config = store_config(&plain_url, "plain", SKETCH_RULE);
        let rows = sketch_rows(&config, &events);
        let mut store = Store::connect(&config).await.unwrap();
        store
            .flush(&rows, &[position("s1", 1)], &HashMap::new())
            .await
            .unwrap();
        let c = query(&plain_url, "CREATE TABLE raw (ad text, uid text)").await;
        assert!(c.is_empty());
        let (client, conn) = tokio_postgres::connect(&plain_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let ads: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
        let uids: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
        client
            .execute(
                "INSERT INTO raw SELECT * FROM unnest($1::text[], $2::text[])",
                &[&ads, &uids],
            )
            .await
            .unwrap();
        sketch_table(&plain_url).await
    });
    let distributed = rt.block_on(sketch_table(&url));
    // Counts exact: what the test sent, per ad.
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for e in &events {
        *want.entry(e.0.clone()).or_default() += 1;
    }
    let got: BTreeMap<String, i64> = distributed.iter().map(|r| (r.0.clone(), r.1)).collect();
    assert_eq!(got, want, "events per ad");
    let quantile_counts: BTreeMap<String, i64> =
        distributed.iter().map(|r| (r.0.clone(), r.4)).collect();
    assert_eq!(
        quantile_counts, want,
        "values counted in each quantile sketch"
    );
    // Six flushes of three sidecars merged on the shards = one flush into one PostgreSQL.
    assert_eq!(distributed, plain, "distributed rows = plain rows");
    // And the hll sketch is PostgreSQL's own over the raw values, byte for byte.
    let raw: Vec<(String, Vec<u8>)> = rt.block_on(async {
        query(
            &plain_url,
            "SELECT ad, hll_send(hll_add_agg(hll_hash_text(uid))) FROM raw GROUP BY ad ORDER BY ad",
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    });
    let ours: Vec<(String, Vec<u8>)> = distributed
        .iter()
        .map(|r| (r.0.clone(), r.2.clone()))
        .collect();
    assert_eq!(ours, raw, "hll sketches = hll_add_agg(hll_hash_text(uid))");
    // Quantiles and distinct counts read across shards: the same as on one PostgreSQL.
    let read =
        "SELECT round(logtally_quantile(logtally_quantiles_merge(rt), 0.99)::numeric, 9)::text, \
                hll_cardinality(hll_union_agg(reach))::int8 FROM ad_sketch";
    let across = |u: &str| -> (String, i64) {
        let r = &rt.block_on(query(u, read))[0];
        (r.get(0), r.get(1))
    };
    let (on_citus, on_plain) = (across(&url), across(&plain_url));
    eprintln!(
        "{} events, {} ads: p99 and distinct users on Citus {on_citus:?}, on one PostgreSQL {on_plain:?}",
        events.len(),
        want.len()
    );
    assert_eq!(on_citus, on_plain);
}
