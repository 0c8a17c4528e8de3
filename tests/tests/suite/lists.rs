//! Numeric lists end to end: real nginx with the module proxying to an upstream whose first
//! server refuses connections (a closed port) and whose second answers, so requests that
//! meet it first fail over and `$upstream_response_time` is a list (`0.000, 0.021`); the real sidecar
//! aggregates `sum`, `max` and `min` of it into a real PostgreSQL. Truth: nginx's own
//! access_log lines of the same requests, whose lists the test parses itself (a list reads
//! as its sum for `sum`, its largest number for `max`, its smallest for `min`; `-` skipped).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use logtally_e2e::nginx::{HttpClient, TestNginx};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};

const REQUESTS: usize = 12;

const RULE: &str = r#"
[[rule]]
table = "lists_1m"
bucket = "1m"
group_by = ["st"]
metrics = { events = "count", urt_sum = "sum(urt)", urt_max = "max(urt)", urt_min = "min(urt)" }
"#;

/// An HTTP upstream answering `count` connections, each after a pause of 5 to 40 ms (so the
/// response times differ from request to request).
fn upstream(count: usize) -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        for (i, conn) in listener.incoming().take(count).enumerate() {
            let mut conn = conn.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            std::thread::sleep(Duration::from_millis(5 + (i as u64 * 7) % 36));
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    (port, t)
}

/// A list in nginx's forms (`a, b : c`) as thousandths (nginx writes times with 3 decimals),
/// `-` elements skipped; `None` if no element is a number.
fn thousandths(list: &str) -> Option<Vec<i64>> {
    let mut out = Vec::new();
    for part in list.split([',', ':']) {
        let part = part.trim();
        if part == "-" {
            continue;
        }
        let (whole, frac) = part.split_once('.').unwrap_or((part, ""));
        assert!(frac.len() <= 3, "{list:?}");
        let frac = format!("{frac:0<3}");
        out.push(whole.parse::<i64>().unwrap() * 1000 + frac.parse::<i64>().unwrap());
    }
    (!out.is_empty()).then_some(out)
}

#[test]
fn upstream_time_lists_of_failed_over_requests_sum_max_and_min_as_access_log_says() {
    let (port, served) = upstream(REQUESTS);
    // A port nobody listens on: connecting to it is refused, and nginx tries the next server.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = format!(
        r#"
        logtally_spool @DIR@/spool flush=20ms;
        logtally_field st $status;
        logtally_field urt $upstream_response_time;
        log_format urt '$status	$upstream_response_time	$upstream_addr';
        upstream two {{ server 127.0.0.1:{dead} max_fails=0; server 127.0.0.1:{port}; }}
        server {{
            listen 127.0.0.1:@PORT@;
            logtally on;
            # The harness switches access_log off at http level.
            access_log @DIR@/access.log urt;
            location / {{ proxy_pass http://two; }}
        }}
        "#
    );
    let mut nginx = TestNginx::start(&conf, 1);
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let config = dir.path().join("logtally.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\ndatabase_url = \"{}\"\nnode = \"lists\"\n\
             flush_interval = \"200ms\"\nlisten = \"{listen}\"\nbinlog = \"{}\"\n{RULE}",
            nginx.dir().join("spool").display(),
            db.url(),
            dir.path().join("binlog").display(),
        ),
    )
    .unwrap();
    let sidecar = TestSidecar::start(&config, &dir.path().join("logtally.log"), listen);

    let mut client = HttpClient::new(nginx.addr());
    for _ in 0..REQUESTS {
        let r = client.get(b"/", &[]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    }
    served.join().unwrap();

    // The truth: access_log's lists.
    let access = nginx.dir().join("access.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let text = std::fs::read_to_string(&access).unwrap_or_default();
        if text.lines().count() == REQUESTS || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut sum, mut max, mut min, mut lists) = (0i64, i64::MIN, i64::MAX, 0);
    for line in log.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{line:?}");
        assert_eq!(cols[0], "200", "{line:?}");
        // Round robin: the requests that met the closed port first failed over (two
        // addresses, two times); the others are single values.
        if cols[1].contains(", ") {
            assert!(cols[2].contains(", "), "{line:?}");
            lists += 1;
        }
        let values = thousandths(cols[1]).unwrap_or_else(|| panic!("{line:?}"));
        sum += values.iter().sum::<i64>();
        max = max.max(*values.iter().max().unwrap());
        min = min.min(*values.iter().min().unwrap());
    }
    assert_eq!(log.lines().count(), REQUESTS, "access_log:\n{log}");
    assert!(
        lists >= REQUESTS / 3,
        "too few requests failed over:\n{log}"
    );
    assert!(max >= 5, "the upstream paused ≥ 5 ms: {log}");

    // The table, in thousandths.
    let want = (REQUESTS as i64, sum, max, min);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = None;
    while Instant::now() < deadline {
        let rows = db.query(
            "SELECT sum(events)::bigint, (sum(urt_sum) * 1000)::bigint, \
             (max(urt_max) * 1000)::bigint, (min(urt_min) * 1000)::bigint \
             FROM lists_1m WHERE st = '200'",
        );
        if let Ok(rows) = rows {
            if let Some(r) = rows.first() {
                let row: (Option<i64>, Option<i64>, Option<i64>, Option<i64>) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                got = Some(row);
                if row == (Some(want.0), Some(want.1), Some(want.2), Some(want.3)) {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        got,
        Some((Some(want.0), Some(want.1), Some(want.2), Some(want.3))),
        "(events, sum, max, min) in ms vs access_log:\n{log}\n{}",
        sidecar.log_text()
    );
    // None of the lists was a bad value. (A refused connection takes 0.000: `min` is 0 only
    // if a list reads as its smallest number, not as its sum.)
    let bad = sidecar.metric("logtally_bad_values_total").unwrap_or(0.0);
    assert_eq!(bad, 0.0, "{}", sidecar.log_text());
    assert!(sidecar.terminate().success());
    nginx.quit();
}
