//! The status page in a real browser: headless Chromium (through chromedriver) loads `/`
//! from a running sidecar fed by a running nginx and a real PostgreSQL; the page must show
//! the traffic the test sent (chart, top keys and their counts, which PostgreSQL confirms),
//! show a key carrying markup as text, raise no script error, and stay steady across
//! flushes. The screenshot is kept in `target/test-artifacts/page.png`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use logtally_e2e::browser::{self, Browser};
use logtally_e2e::nginx::{workspace_root, HttpClient, TestNginx};
use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::{free_addr, Db, TestSidecar};
use serde_json::Value;

const NGINX_BODY: &str = r#"
    logtally_spool @DIR@/spool flush=20ms;
    logtally_field key $http_x_key;
    server {
        listen 127.0.0.1:@PORT@;
        location = /e { logtally on; return 204; }
    }
"#;

const MARKUP: &str = "<img src=x onerror=alert(1)>";

/// Key → requests sent with it; distinct counts so the order is certain.
fn traffic() -> Vec<(&'static str, usize)> {
    vec![
        ("alpha", 37),
        (MARKUP, 23),
        ("beta", 11),
        ("gamma", 5),
        ("", 2),
    ]
}

/// A day-wide bucket, so the traffic of one run lies in one bucket (unless the run straddles
/// midnight UTC; the test then says so rather than failing on the split).
fn sidecar_config(
    db: &Db,
    spool: &std::path::Path,
    dir: &std::path::Path,
    listen: std::net::SocketAddr,
) -> String {
    format!(
        r#"spool_dir = "{spool}"
database_url = "{url}"
node = "page-test"
flush_interval = "300ms"
listen = "{listen}"
binlog = "{binlog}"

[[rule]]
table = "by_key"
bucket = "1d"
group_by = ["key"]
metrics = {{ hits = "count" }}

[[rule]]
table = "by_key_private"
bucket = "1d"
group_by = ["key"]
metrics = {{ hits = "count" }}
show_keys = false
"#,
        spool = spool.display(),
        url = db.url(),
        binlog = dir.join("binlog").display(),
    )
}

fn artifact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("test-artifacts")
}

/// The by_key table as the page shows it, once it shows `alpha` with its count and the
/// chart has a non-zero point; else `null`.
const READ_PAGE: &str = r#"
const sec = document.querySelector('section.rule[data-table="by_key"]');
if (!sec) return null;
const rows = [...sec.querySelectorAll('tr')].slice(1)
  .map(tr => [...tr.children].map(td => td.textContent));
const cap = document.getElementById('rate-caption');
const peak = Number(cap.dataset.peak || 0);
if (!rows.length || rows[0][0] !== 'alpha' || rows[0][1] !== '37' || !(peak > 0)) return null;
const priv = document.querySelector('section.rule[data-table="by_key_private"]');
return {
  rows,
  peak,
  points: document.getElementById('rate-line').getAttribute('points').trim().split(/\s+/).length,
  images: document.querySelectorAll('img').length,
  ready: document.getElementById('ready').textContent,
  private_text: priv ? priv.textContent : null,
  private_cells: priv ? priv.querySelectorAll('td').length : -1,
  body: document.body.innerText,
};
"#;

#[test]
fn the_status_page_shows_the_traffic_in_a_real_browser() {
    if let Some(why) = browser::missing() {
        if std::env::var_os("LOGTALLY_SKIP_BROWSER").is_some() {
            eprintln!("\n*** SKIPPED the_status_page_shows_the_traffic_in_a_real_browser: {why} (LOGTALLY_SKIP_BROWSER set) ***\n");
            return;
        }
        panic!("cannot test the status page: {why}; set LOGTALLY_SKIP_BROWSER=1 to skip it");
    }
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let nginx = TestNginx::start(NGINX_BODY, 1);
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let config = dir.path().join("logtally.toml");
    std::fs::write(
        &config,
        sidecar_config(&db, &nginx.dir().join("spool"), dir.path(), listen),
    )
    .unwrap();
    let sidecar = TestSidecar::start(&config, &dir.path().join("logtally.log"), listen);

    let day = |t: SystemTimeMs| t / 86_400_000;
    let started = now_ms();
    let mut client = HttpClient::new(nginx.addr());
    for (key, n) in traffic() {
        for _ in 0..n {
            let r = client.get(b"/e", &[("X-Key", key.as_bytes())]).unwrap();
            assert_eq!(r.status, 204);
        }
    }
    assert_eq!(
        day(started),
        day(now_ms()),
        "the traffic straddled midnight UTC (two buckets): run the test again"
    );

    let browser = Browser::start();
    let url = format!("http://{listen}/");
    browser
        .goto(&url)
        .unwrap_or_else(|e| panic!("load {url}: {e}"));
    let shown = browser.wait_for(
        Duration::from_secs(30),
        "the page shows the traffic",
        READ_PAGE,
    );
    let rows: Vec<(String, String)> = shown["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().into(), r[1].as_str().unwrap().into()))
        .collect();
    let want: Vec<(String, String)> = traffic()
        .into_iter()
        .map(|(k, n)| {
            (
                if k.is_empty() { "(empty)" } else { k }.to_string(),
                n.to_string(),
            )
        })
        .collect();
    // All of it read: wait for all the counts (the first row may show before the rest).
    let rows = if rows == want {
        rows
    } else {
        let v = browser.wait_for(
            Duration::from_secs(10),
            "every key with its count",
            &format!(
                "{READ_PAGE_ALL}\nreturn JSON.stringify(got) === JSON.stringify({}) ? got : null;",
                serde_json::to_string(&want.iter().map(|(a, b)| vec![a, b]).collect::<Vec<_>>())
                    .unwrap()
            ),
        );
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_str().unwrap().into(), r[1].as_str().unwrap().into()))
            .collect()
    };
    assert_eq!(rows, want, "top keys and counts as sent");
    assert_eq!(
        shown["images"], 0,
        "the markup key made no element: {shown}"
    );
    assert!(
        shown["body"].as_str().unwrap().contains(MARKUP),
        "markup shown as text"
    );
    assert!(
        shown["points"].as_u64().unwrap() >= 1,
        "chart has points: {shown}"
    );
    assert_eq!(
        shown["private_cells"], 0,
        "an opted-out rule shows no keys: {shown}"
    );
    assert!(
        shown["private_text"]
            .as_str()
            .unwrap()
            .contains("keys hidden"),
        "{shown}"
    );

    // What the page shows is what PostgreSQL holds once committed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let committed = loop {
        let got: BTreeMap<String, i64> = db
            .query("SELECT key, sum(hits)::bigint FROM by_key GROUP BY key")
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            .unwrap_or_default();
        let total: i64 = got.values().sum();
        if total == traffic().iter().map(|(_, n)| *n as i64).sum::<i64>() {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "not committed within 30 s: {got:?}\n{}",
            sidecar.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for (key, n) in traffic() {
        assert_eq!(
            committed.get(key),
            Some(&(n as i64)),
            "{key:?} in PostgreSQL"
        );
    }

    // Steady across flushes: several flush intervals, every refresh still shows the counts.
    let until = Instant::now() + Duration::from_secs(3);
    let mut looks = 0;
    while Instant::now() < until {
        let v = browser
            .eval(READ_PAGE_ROWS)
            .unwrap_or_else(|e| panic!("read the page: {e}"));
        assert_eq!(
            v[0],
            serde_json::json!(["alpha", "37"]),
            "after a flush: {v}"
        );
        looks += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(looks >= 10);
    let ready = browser.wait_for(
        Duration::from_secs(10),
        "ready badge",
        "const t = document.getElementById('ready').textContent; return t === 'ready' ? t : null;",
    );
    assert_eq!(ready, "ready");

    let console = browser.console().expect("browser log");
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] == "SEVERE").collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    let height = browser
        .eval("return document.documentElement.scrollHeight;")
        .ok()
        .and_then(|v| v.as_u64())
        .unwrap_or(900);
    browser
        .resize(1280, height.clamp(600, 2400) as u32 + 40)
        .expect("resize the window");
    let png = browser.screenshot().expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let out = artifact_dir();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("page.png"), &png).unwrap();
    eprintln!("screenshot: {}", out.join("page.png").display());
    drop(browser);
    assert!(sidecar.terminate().success());
}

/// The by_key rows as text cells.
const READ_PAGE_ROWS: &str = r#"
const sec = document.querySelector('section.rule[data-table="by_key"]');
return sec ? [...sec.querySelectorAll('tr')].slice(1).map(tr => [...tr.children].map(td => td.textContent)) : [];
"#;

/// Sets `got` to the by_key rows (for a script to compare).
const READ_PAGE_ALL: &str = r#"
const sec = document.querySelector('section.rule[data-table="by_key"]');
const got = sec ? [...sec.querySelectorAll('tr')].slice(1).map(tr => [...tr.children].map(td => td.textContent)) : [];
"#;

type SystemTimeMs = u64;

fn now_ms() -> SystemTimeMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
