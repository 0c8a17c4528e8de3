//! Huge, non-UTF-8 and empty values: recorded faithfully or cut by the documented rule.

use std::time::Duration;

use logtally_e2e::nginx::{read_spool, HttpClient, TestNginx};

use super::{all_events, assert_clean, status, status_value, ODD_CONF};

#[test]
fn huge_non_utf8_and_empty_values_are_recorded_or_cut_by_the_rule() {
    let mut n = TestNginx::start(ODD_CONF, 2);
    let workers = n.worker_pids();
    let mut client = HttpClient::new(n.addr());

    let q = "a".repeat(64 * 1024);
    let big = vec![b'b'; 8 * 1024];
    let raw: &[u8] = b"\xff\xfe\x80x\xc3";
    let mut target = format!("/e?q={q}&e=&b=").into_bytes();
    target.extend_from_slice(b"\xff\xfe%zz");
    let r = client
        .get(
            &target,
            &[("X-Big", &big), ("X-Raw", raw), ("X-Empty", b"")],
        )
        .unwrap();
    assert_eq!(r.status, 204);
    // Exactly at the limit: kept whole.
    let q2 = "c".repeat(4096);
    let big2 = vec![b'd'; 4095];
    let r = client
        .get(format!("/e?q={q2}").as_bytes(), &[("X-Big", &big2)])
        .unwrap();
    assert_eq!(r.status, 204);
    // nginx is unharmed: the same workers answer ordinary requests.
    assert_eq!(client.get(b"/e?q=fine", &[]).unwrap().status, 204);
    assert_eq!(n.worker_pids(), workers);

    n.wait_until(Duration::from_secs(10), "3 events", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == 3
    });
    let text = status(n.addr());
    assert_eq!(
        status_value(&text, "logtally_module_truncated_values_total"),
        2
    );
    n.quit();
    assert!(!n.error_log().contains("exited on signal"));

    let segs = read_spool(&n.dir().join("spool"));
    assert_clean(&segs);
    let events = all_events(&segs);
    assert_eq!(events.len(), 3);
    // Find each request's record by the first byte of its `q`.
    let find = |first: u8| {
        events
            .iter()
            .find(|(s, e)| s.value(e, "q").and_then(|q| q.first()) == Some(&first))
            .copied()
            .unwrap_or_else(|| panic!("no record with q starting {:?}", first as char))
    };
    // Long values are compared with assert! to keep failure output readable.
    let (s, e) = find(b'a');
    assert!(
        s.value(e, "q") == Some(&q.as_bytes()[..4096]),
        "q cut to 4096 bytes"
    );
    assert!(
        s.value(e, "big") == Some(&big[..4096]),
        "8 KiB header cut to 4096 bytes"
    );
    assert_eq!(s.value(e, "raw"), Some(raw));
    assert_eq!(s.value(e, "b"), Some(&b"\xff\xfe%zz"[..]));
    assert_eq!(s.value(e, "e"), Some(&b""[..]));
    assert_eq!(s.value(e, "he"), Some(&b""[..]));
    assert_eq!(s.value(e, "none"), None);
    let (s, e) = find(b'c');
    assert!(
        s.value(e, "q") == Some(q2.as_bytes()),
        "4096 bytes kept whole"
    );
    assert!(
        s.value(e, "big") == Some(&big2[..]),
        "4095 bytes kept whole"
    );
    assert_eq!(s.value(e, "raw"), None);
    let (s, e) = find(b'f');
    assert_eq!(s.value(e, "q"), Some(&b"fine"[..]));
}
