//! A field a rule reads disappears from nginx's configuration while everything runs: real
//! nginx with the module, the real sidecar, a real PostgreSQL. nginx is reloaded without the
//! `logtally_field` the rule sums; the new workers' segments lack it, and the running sidecar
//! must say so (a log warning, a metric, `/status`) naming the rule, the field and a segment
//! that does lack it (truth: the segment headers on disk), while `check` against the same
//! spool classifies it the same way (a warning, not an error).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use logtally_e2e::nginx::{read_spool, HttpClient, TestNginx};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_e2e::sidecar::{free_addr, logtally_bin, Db, TestSidecar};

const WITH_BYTES: &str = r#"
    logtally_spool @DIR@/spool flush=20ms;
    logtally_field ad $arg_ad;
    logtally_field bytes $body_bytes_sent;
    server {
        listen 127.0.0.1:@PORT@;
        location = /e { logtally on; return 200 "twelve bytes"; }
    }
"#;

const RULE: &str = r#"
[[rule]]
table = "fields_1m"
bucket = "1m"
group_by = ["ad"]
metrics = { events = "count", bytes = "sum(bytes)" }
"#;

/// Polls `cond` until it gives a value, up to `limit`; on timeout panics with `what` and `log`.
fn wait_for<T>(
    limit: Duration,
    what: &str,
    log: &dyn Fn() -> String,
    mut cond: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ad → (events, bytes)` in the table.
fn table(db: &Db) -> BTreeMap<String, (i64, i64)> {
    db.query("SELECT ad, sum(events)::bigint, sum(bytes)::bigint FROM fields_1m GROUP BY ad")
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_reload_that_removes_a_summed_field_is_reported_by_the_running_sidecar() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let mut nginx = TestNginx::start(WITH_BYTES, 1);
    let spool = nginx.dir().join("spool");
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let config = dir.path().join("logtally.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\ndatabase_url = \"{}\"\nnode = \"fields\"\n\
             flush_interval = \"200ms\"\nretain = \"1h\"\nlisten = \"{listen}\"\nbinlog = \"{}\"\n{RULE}",
            spool.display(),
            db.url(),
            dir.path().join("binlog").display(),
        ),
    )
    .unwrap();
    let log_path = dir.path().join("logtally.log");
    let sidecar = TestSidecar::start(&config, &log_path, listen);
    let log = || format!("table: {:?}\n{}", table(&db), sidecar.log_text());

    let mut client = HttpClient::new(nginx.addr());
    for _ in 0..5 {
        assert_eq!(client.get(b"/e?ad=before", &[]).unwrap().status, 200);
    }
    wait_for(Duration::from_secs(30), "the first events", &log, || {
        (table(&db).get("before") == Some(&(5, 60))).then_some(())
    });
    assert!(!sidecar.log_text().contains("lacks a field"), "{}", log());

    // The operator removes `logtally_field bytes` and reloads: new workers, new segments.
    nginx.write_config(&WITH_BYTES.replace("logtally_field bytes $body_bytes_sent;", ""));
    nginx.reload();
    let mut client = HttpClient::one_shot(nginx.addr());
    let mut sent = 0;
    let lacking = wait_for(
        Duration::from_secs(30),
        "a segment without `bytes`",
        &log,
        || {
            assert_eq!(client.get(b"/e?ad=after", &[]).unwrap().status, 200);
            sent += 1;
            let segs = read_spool(&spool);
            let names: Vec<String> = segs
                .iter()
                .filter(|s| !s.fields.iter().any(|f| f == "bytes") && !s.events.is_empty())
                .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            (!names.is_empty()).then_some(names)
        },
    );
    // The log names the rule, the field and a segment that lacks it.
    let line = wait_for(Duration::from_secs(30), "the warning", &log, || {
        sidecar
            .log_text()
            .lines()
            .find(|l| l.contains("lacks a field") && l.contains("WARN"))
            .map(str::to_string)
    });
    assert!(
        line.contains("rule=fields_1m")
            && line.contains("field=bytes")
            && lacking
                .iter()
                .any(|s| line.contains(&format!("segment={s}"))),
        "{line}\nlacking: {lacking:?}"
    );
    // Once per segment, not per event: more requests to the same worker add no line.
    let warnings = || sidecar.log_text().matches("lacks a field").count();
    let before = warnings();
    for _ in 0..20 {
        assert_eq!(client.get(b"/e?ad=after", &[]).unwrap().status, 200);
        sent += 1;
    }
    // Counted, with `bytes` read as absent where the segment lacks it (adds nothing):
    // the truth is what the segments on disk hold (the old workers served some "after"s).
    let after_in_spool = || {
        let mut want = (0, 0);
        for seg in read_spool(&spool) {
            for e in &seg.events {
                if seg.value(e, "ad") == Some(&b"after"[..]) {
                    want.0 += 1;
                    let bytes = seg
                        .value(e, "bytes")
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    want.1 += bytes.map_or(0, |b| b.parse::<i64>().unwrap());
                }
            }
        }
        want
    };
    let want = wait_for(
        Duration::from_secs(30),
        "every request in the spool",
        &|| format!("sent {sent}, spool {:?}, {}", after_in_spool(), log()),
        || {
            let want = after_in_spool();
            (want.0 == sent).then_some(want)
        },
    );
    assert!(want.0 >= 21 && want.1 < 12 * want.0, "{want:?}");
    wait_for(
        Duration::from_secs(30),
        "the \"after\" events",
        &log,
        || (table(&db).get("after") == Some(&want)).then_some(()),
    );
    let segments_lacking = read_spool(&spool)
        .iter()
        .filter(|s| !s.fields.iter().any(|f| f == "bytes") && !s.events.is_empty())
        .count();
    assert!(warnings() <= segments_lacking.max(before), "{}", log());

    // The metric.
    let metrics = http_get(listen, "/metrics").unwrap().text();
    let series = "logtally_missing_field_segments_total{field=\"bytes\",rule=\"fields_1m\"}";
    let value: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in:\n{metrics}"));
    assert!(
        value >= 1.0 && value <= segments_lacking as f64,
        "{value} of {segments_lacking}"
    );

    // `/status`.
    let status: serde_json::Value =
        serde_json::from_str(&http_get(listen, "/status").unwrap().text()).unwrap();
    let entries = status["missing_fields"].as_array().expect("missing_fields");
    assert_eq!(entries.len(), 1, "{status:#}");
    let e = &entries[0];
    assert_eq!(
        (e["rule"].as_str(), e["field"].as_str()),
        (Some("fields_1m"), Some("bytes"))
    );
    // `retain` keeps every segment: the one named is on disk, and lacks the field.
    let segment = e["segment"].as_str().unwrap();
    let header = read_spool(&spool)
        .into_iter()
        .find(|s| s.path.file_name().is_some_and(|n| n == segment))
        .unwrap_or_else(|| panic!("{segment} not in the spool"));
    assert!(
        !header.fields.iter().any(|f| f == "bytes"),
        "{:?}",
        header.fields
    );
    assert!(e["since_ms"].as_u64().unwrap() > 0, "{e}");

    // `check` classifies the same spool alike: a warning naming the key, and it passes.
    let out = Command::new(logtally_bin())
        .args(["check", "--no-database", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The segments from before the reload are kept (`retain`): some segments have it.
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning: ")
            && text.contains("rule[0].metrics.bytes")
            && text.contains("field \"bytes\" is missing from"),
        "{text}"
    );
    assert!(sidecar.terminate().success());
    nginx.quit();
}
