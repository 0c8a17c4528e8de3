//! `logtally_status`: valid Prometheus text with the counts sent, and never an event itself.

use std::time::Duration;

use logtally_e2e::nginx::{read_spool, HttpClient, TestNginx};

use super::{all_events, status, status_value, ODD_CONF};

#[test]
fn status_is_valid_prometheus_text_with_the_counts_sent() {
    const TOTAL: u64 = 300;
    let n = TestNginx::start(ODD_CONF, 2);
    let mut client = HttpClient::new(n.addr());
    let long = "z".repeat(5000);
    for i in 0..TOTAL {
        let target = if i % 100 == 0 {
            format!("/e?q={long}")
        } else {
            format!("/e?q={i}")
        };
        assert_eq!(client.get(target.as_bytes(), &[]).unwrap().status, 204);
    }
    n.wait_until(Duration::from_secs(10), "all events written", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == TOTAL
    });
    let r = HttpClient::new(n.addr()).get(b"/status", &[]).unwrap();
    let text = String::from_utf8(r.body).unwrap();
    let check = logtally_e2e::prometheus::promtool(&["check", "metrics"], Some(text.as_bytes()));
    assert!(
        check.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for name in [
        "events_total",
        "dropped_total",
        "bytes_total",
        "segments_total",
        "truncated_values_total",
    ] {
        let full = format!("logtally_module_{name}");
        assert!(text.contains(&format!("# HELP {full} ")), "{text}");
        assert!(text.contains(&format!("# TYPE {full} counter")), "{text}");
    }
    assert_eq!(status_value(&text, "logtally_module_dropped_total"), 0);
    assert_eq!(
        status_value(&text, "logtally_module_truncated_values_total"),
        3
    );
    assert_eq!(status_value(&text, "logtally_module_segments_total"), 0);
    // Every byte after the headers of the (still open) segments was counted.
    let segs = read_spool(&n.dir().join("spool"));
    let on_disk: usize = segs.iter().map(|s| s.file_len - s.header_len).sum();
    assert_eq!(
        status_value(&text, "logtally_module_bytes_total"),
        on_disk as u64
    );
    assert_eq!(
        segs.iter().map(|s| s.events.len()).sum::<usize>() as u64,
        TOTAL
    );
}

#[test]
fn status_scrapes_are_never_recorded_even_where_logtally_is_on() {
    const REQUESTS: u64 = 5;
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms stop_timeout=15s;
        logtally on;
        logtally_field uri $uri;
        server {
            listen 127.0.0.1:@PORT@;
            location / { return 204; }
            location /status { logtally_status; location /status/nested { return 204; } }
        }
    "#;
    let mut n = TestNginx::start(conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..REQUESTS {
        assert_eq!(client.get(b"/e", &[]).unwrap().status, 204);
    }
    // A nested location does not serve the counters, so it does not inherit the exemption.
    assert_eq!(client.get(b"/status/nested", &[]).unwrap().status, 204);
    // Every poll is a scrape that logtally must not count.
    n.wait_until(Duration::from_secs(10), "the events written", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == REQUESTS + 1
    });
    for _ in 0..5 {
        status(n.addr());
    }
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    let uris: Vec<&[u8]> = all_events(&segs)
        .into_iter()
        .map(|(s, e)| s.value(e, "uri").unwrap())
        .collect();
    let mut want = vec![&b"/e"[..]; REQUESTS as usize];
    want.push(b"/status/nested");
    assert_eq!(uris, want);
}
