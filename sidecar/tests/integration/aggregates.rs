//! Conditions, `distinct` and `quantiles` through the aggregator and the store into a real
//! PostgreSQL (with `hll`), against the truth PostgreSQL computes over a raw table the test
//! fills with the same events: conditional counts exact, the sketch byte-equal to
//! `hll_add_agg(hll_hash_text(v))`, quantiles within α of `percentile_disc`, after several
//! flushes that the upsert merges.

use std::collections::HashMap;
use std::path::Path;

use logtally::aggregate::Aggregator;
use logtally::config::{self, Config};
use logtally::db::{FlushOutcome, Store, StoreError};
use logtally_e2e::postgres::TestPostgres;
use logtally_spool::{decode_frame, encode_event, Decoded, Frame};
use tokio_postgres::{Client, NoTls};

fn config(url: &str) -> Config {
    let text = format!(
        r#"
database_url = "{url}"
node = "edge-1"
spool_dir = "/nonexistent"
[[rule]]
table = "ad_daily"
bucket = "1d"
group_by = ["ad"]
where = "status < 400"
metrics = {{ views = "count where ev = 'view'", clicks = "count where ev = 'click'", reach = "distinct(uid)", rt = "quantiles(rt)", bytes = "sum(bytes) where ev in ('view', 'click')" }}
"#
    );
    config::parse(Path::new("test.toml"), &text).expect("valid config")
}

async fn client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// One event: ad, ev, status, uid, rt, bytes.
type Event = (String, &'static str, u32, String, String, u64);

/// Deterministic events: 3 ads, views/clicks/other, some 5xx, a log-normal-ish rt.
fn events(n: usize) -> Vec<Event> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let r = next();
            let ev = ["view", "view", "view", "click", "other"][(r % 5) as usize];
            let status = if r % 17 == 0 { 502 } else { 200 };
            let ad = format!("ad{}", (r >> 8) % 3);
            let uid = format!("u{}", (r >> 16) % 5000);
            // 0.001 .. ~10 s, skewed.
            let u = ((r >> 24) % 1_000_000) as f64 / 1_000_000.0;
            let rt = format!("{:.3}", (u * 9.2).exp() / 1000.0);
            (ad, ev, status, uid, rt, (r >> 40) % 10_000)
        })
        .collect()
}

const HEADER: [&str; 6] = ["ad", "ev", "status", "uid", "rt", "bytes"];

fn add(agg: &mut Aggregator, header: &[String], t: u64, e: &Event) {
    let status = e.2.to_string();
    let bytes = e.5.to_string();
    let values: [&[u8]; 6] = [
        e.0.as_bytes(),
        e.1.as_bytes(),
        status.as_bytes(),
        e.3.as_bytes(),
        e.4.as_bytes(),
        bytes.as_bytes(),
    ];
    let mut buf = Vec::new();
    encode_event(&mut buf, t, values.iter().map(|v| Some(*v)));
    let Decoded::Frame {
        frame: Frame::Event(r),
        ..
    } = decode_frame(&buf)
    else {
        panic!("undecodable");
    };
    agg.add_cached(1, header, &r);
}

async fn fill_raw(c: &Client, events: &[Event]) {
    c.batch_execute(
        "CREATE TABLE raw (ad text, ev text, status int, uid text, rt numeric, bytes int8)",
    )
    .await
    .unwrap();
    for chunk in events.chunks(5000) {
        let col = |f: &dyn Fn(&Event) -> String| chunk.iter().map(f).collect::<Vec<String>>();
        c.execute(
            "INSERT INTO raw SELECT a, e, s::int, u, r::numeric, b::int8 \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
             AS t(a, e, s, u, r, b)",
            &[
                &col(&|e| e.0.clone()),
                &col(&|e| e.1.to_string()),
                &col(&|e| e.2.to_string()),
                &col(&|e| e.3.clone()),
                &col(&|e| e.4.clone()),
                &col(&|e| e.5.to_string()),
            ],
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn conditions_distinct_and_quantiles_equal_postgresql_over_the_raw_events() {
    let pg = TestPostgres::start();
    let url = pg.create_database_with_hll().await;
    let cfg = config(&url);
    let mut store = Store::connect(&cfg).await.unwrap();
    // A second start installs the quantile functions again: harmless.
    drop(Store::connect(&cfg).await.unwrap());

    let all = events(30_000);
    let header: Vec<String> = HEADER.iter().map(|s| s.to_string()).collect();
    let day = 1_764_288_000_000u64; // a UTC midnight
    let mut committed = HashMap::new();
    // Three flushes: the upsert merges each into what the previous ones wrote.
    for (i, part) in all.chunks(10_000).enumerate() {
        let mut agg = Aggregator::new(&cfg.rules);
        for (j, e) in part.iter().enumerate() {
            add(&mut agg, &header, day + j as u64, e);
        }
        let pos = vec![logtally::db::CheckpointEntry {
            segment: "1-1-000001.seg".into(),
            offset: (i as u64 + 1) * 100,
            finished: false,
        }];
        let rows = agg.drain_compact();
        assert_eq!(
            store.flush(&rows, &pos, &committed).await.unwrap(),
            FlushOutcome::Committed
        );
        committed = pos.into_iter().map(|e| (e.segment.clone(), e)).collect();
    }

    let c = client(&url).await;
    fill_raw(&c, &all).await;
    // Conditional counts and sums: exact.
    let mismatches: i64 = c
        .query_one(
            "SELECT count(*) FROM ad_daily d FULL JOIN ( \
               SELECT ad, count(*) FILTER (WHERE ev = 'view') AS views, \
                      count(*) FILTER (WHERE ev = 'click') AS clicks, \
                      coalesce(sum(bytes) FILTER (WHERE ev IN ('view', 'click')), 0) AS bytes \
               FROM raw WHERE status < 400 GROUP BY ad) r USING (ad) \
             WHERE d.views IS DISTINCT FROM r.views OR d.clicks IS DISTINCT FROM r.clicks \
                OR d.bytes IS DISTINCT FROM r.bytes",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatches, 0);
    let (rows, views): (i64, i64) = {
        let r = c
            .query_one("SELECT count(*), sum(views)::int8 FROM ad_daily", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(rows, 3);
    assert!(views > 10_000, "{views}");

    // Distinct: the merged sketch of every row is the SQL-built sketch, byte for byte.
    let unequal: i64 = c
        .query_one(
            "SELECT count(*) FROM ad_daily d JOIN ( \
               SELECT ad, hll_add_agg(hll_hash_text(uid)) AS h FROM raw \
               WHERE status < 400 GROUP BY ad) r USING (ad) \
             WHERE hll_send(d.reach) <> hll_send(r.h)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unequal, 0);
    let (ours, sql): (Vec<u8>, Vec<u8>) = {
        let r = c
            .query_one(
                "SELECT (SELECT hll_send(hll_union_agg(reach)) FROM ad_daily), \
                 (SELECT hll_send(hll_add_agg(hll_hash_text(uid))) FROM raw WHERE status < 400)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(ours, sql);

    // Quantiles: within α = 1% of percentile_disc (±1 rank), across rows.
    for q in [0.5f64, 0.9, 0.99, 0.999] {
        let r = c
            .query_one(
                "SELECT (SELECT logtally_quantile(logtally_quantiles_merge(rt), $1) FROM ad_daily), \
                 (SELECT percentile_disc($1) WITHIN GROUP (ORDER BY rt)::float8 FROM raw WHERE status < 400), \
                 (SELECT min(rt)::float8 FROM (SELECT rt, row_number() OVER (ORDER BY rt) n, count(*) OVER () c \
                    FROM raw WHERE status < 400) t WHERE n >= ceil($1 * c) - 1), \
                 (SELECT max(rt)::float8 FROM (SELECT rt, row_number() OVER (ORDER BY rt) n, count(*) OVER () c \
                    FROM raw WHERE status < 400) t WHERE n <= ceil($1 * c) + 1)",
                &[&q],
            )
            .await
            .unwrap();
        let (est, exact, lo, hi): (f64, f64, f64, f64) = (r.get(0), r.get(1), r.get(2), r.get(3));
        assert!(
            est >= lo * 0.99 && est <= hi * 1.01,
            "q={q}: estimate {est}, percentile_disc {exact}, ranks ±1 [{lo}, {hi}]"
        );
    }
}

#[tokio::test]
async fn distinct_without_the_hll_extension_is_refused_plainly() {
    let pg = TestPostgres::start();
    let url = pg.create_database().await;
    let cfg = config(&url);
    let e = Store::connect(&cfg).await.unwrap_err();
    assert!(matches!(e, StoreError::MissingHll { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("ad_daily.reach")
            && text.contains("postgresql-15-hll")
            && text.contains("CREATE EXTENSION hll"),
        "{text}"
    );
    let e = logtally::db::check(&cfg).await.unwrap_err();
    assert!(matches!(e, StoreError::MissingHll { .. }), "{e:?}");
}
