//! Field values against a stock access_log: twenty thousand requests exactly as sent, and
//! values that something read earlier (`add_header`, upstream failover, subrequests, SSI,
//! internal redirects) recorded as access_log writes them.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use logtally_e2e::nginx::{read_spool, HttpClient, TestNginx};

use super::{all_events, assert_clean, id_of};

/// Values one request id sends; absent (`None`) and empty (`Some("")`) both occur.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    id: u64,
    ad: Option<String>,
    ev: Option<String>,
    tag: Option<String>,
    status: u16,
}

impl Sent {
    fn for_id(id: u64) -> Sent {
        let ad = match id % 7 {
            0 => None,
            _ => Some(format!("{}", id * 31 % 1000)),
        };
        let ev = match id % 4 {
            0 => Some("view".to_string()),
            1 => Some("click".to_string()),
            2 => Some(String::new()),
            _ => None,
        };
        let tag = match id % 5 {
            0 => None,
            1 => Some(String::new()),
            n => Some(format!("t{n}x{}", id % 13)),
        };
        let status = if id % 10 == 9 { 404 } else { 204 };
        Sent {
            id,
            ad,
            ev,
            tag,
            status,
        }
    }

    fn target(&self) -> String {
        let path = if self.status == 404 { "/missing" } else { "/e" };
        let mut t = format!("{path}?id={}", self.id);
        if let Some(ad) = &self.ad {
            t.push_str(&format!("&ad={ad}"));
        }
        if let Some(ev) = &self.ev {
            t.push_str(&format!("&ev={ev}"));
        }
        t
    }

    fn send(&self, client: &mut HttpClient) -> std::io::Result<u16> {
        let headers: Vec<(&str, &[u8])> =
            self.tag.iter().map(|t| ("X-Tag", t.as_bytes())).collect();
        Ok(client.get(self.target().as_bytes(), &headers)?.status)
    }

    /// The record's values, in the configuration's field order.
    fn expected(&self) -> Vec<Option<Vec<u8>>> {
        let b = |s: &Option<String>| s.as_ref().map(|s| s.as_bytes().to_vec());
        let pair = format!(
            "{}/{}",
            self.ad.as_deref().unwrap_or(""),
            self.ev.as_deref().unwrap_or("")
        );
        vec![
            Some(self.id.to_string().into_bytes()),
            b(&self.ad),
            b(&self.ev),
            Some(self.status.to_string().into_bytes()),
            b(&self.tag),
            Some(pair.into_bytes()),
        ]
    }
}

const FIELDS_CONF: &str = r#"
    logtally_spool @DIR@/spool flush=20ms segment_size=64k stop_timeout=15s;
    log_format lt '$arg_id\t$arg_ad\t$arg_ev\t$status\t$http_x_tag\t$msec';
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field id $arg_id;
        logtally_field ad $arg_ad;
        logtally_field ev $arg_ev;
        logtally_field st $status;
        logtally_field tag $http_x_tag;
        logtally_field pair "$arg_ad/$arg_ev";
        access_log @DIR@/access.log lt;
        location / { return 204; }
        location /missing { return 404; }
    }
"#;

#[test]
fn twenty_thousand_requests_match_what_was_sent_and_the_access_log() {
    const TOTAL: u64 = 20_000;
    const THREADS: u64 = 8;
    let mut n = TestNginx::start(FIELDS_CONF, 2);
    let addr = n.addr();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut client = HttpClient::new(addr);
                for id in (t..TOTAL).step_by(THREADS as usize) {
                    let sent = Sent::for_id(id);
                    let status = sent.send(&mut client).expect("request");
                    assert_eq!(status, sent.status, "id {id}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    n.quit();

    let segs = read_spool(&n.dir().join("spool"));
    assert!(!segs.is_empty());
    assert_clean(&segs);
    let fields = ["id", "ad", "ev", "st", "tag", "pair"];
    for s in &segs {
        assert_eq!(s.fields, fields);
        assert_eq!(s.dropped, 0);
    }
    let events = all_events(&segs);
    assert_eq!(events.len() as u64, TOTAL);
    let writers: HashSet<u32> = segs.iter().map(|s| s.writer_pid).collect();
    assert_eq!(writers.len(), 2, "both workers wrote");
    // ~1.2 MB of records in 64 KiB segments: each worker rolled, and only after the batch
    // that took a segment to 64 KiB (a worker's last segment is sealed at exit instead).
    for pid in &writers {
        let mine: Vec<_> = segs.iter().filter(|s| s.writer_pid == *pid).collect();
        assert!(mine.len() >= 2, "worker {pid} never rolled");
        for s in &mine[..mine.len() - 1] {
            assert!(s.file_len >= 64 * 1024, "{} rolled early", s.path.display());
        }
    }

    let mut by_id = HashMap::new();
    for (seg, e) in &events {
        let id = id_of(seg, e);
        assert_eq!(e.values, Sent::for_id(id).expected(), "id {id}");
        assert!(by_id.insert(id, (*seg, *e)).is_none(), "id {id} twice");
    }
    assert_eq!(by_id.len() as u64, TOTAL);

    // The stock access log, written for the same requests, line by line.
    let log = std::fs::read_to_string(n.dir().join("access.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len() as u64, TOTAL);
    let shown = |v: Option<&[u8]>| v.map_or("-".to_string(), |v| String::from_utf8_lossy(v).into());
    for line in lines {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 6, "{line:?}");
        let id: u64 = cols[0].parse().unwrap();
        let (seg, e) = by_id[&id];
        for (i, name) in ["id", "ad", "ev", "st", "tag"].iter().enumerate() {
            assert_eq!(shown(seg.value(e, name)), cols[i], "id {id} field {name}");
        }
        // Record time is the request start; $msec is when the line was logged.
        let logged_ms = (cols[5].parse::<f64>().unwrap() * 1000.0).round() as u64;
        assert!(
            e.time_ms <= logged_ms && logged_ms - e.time_ms < 5_000,
            "id {id} time"
        );
    }
}

/// An http block where `logtally_field` and a stock access_log format (tab-separated) read
/// the same values in one order, for [`events_against_access_log`]: `http_extra` goes at
/// http level, `server_body` into the one server (logtally and access_log on there).
fn compared_conf(pairs: &[(&str, &str)], http_extra: &str, server_body: &str) -> String {
    let fields: String = pairs
        .iter()
        .map(|(name, value)| format!("logtally_field {name} {value};\n"))
        .collect();
    let format: Vec<&str> = pairs
        .iter()
        .map(|(_, value)| value.trim_matches('"'))
        .collect();
    format!(
        "logtally_spool @DIR@/spool flush=20ms stop_timeout=15s;
        {fields}
        log_format same '{}';
        {http_extra}
        server {{
            listen 127.0.0.1:@PORT@;
            logtally on;
            # The harness switches access_log off at http level.
            access_log @DIR@/access.log same;
            {server_body}
        }}",
        format.join("\\t")
    )
}

/// Stops nginx (one worker, so events and access_log lines are in the same order) and
/// checks every event against the stock access_log line nginx wrote for the same request,
/// field by field (absent is access_log's `-`). Returns the rows, by field name.
fn events_against_access_log(
    n: &mut TestNginx,
    pairs: &[(&str, &str)],
) -> Vec<HashMap<String, String>> {
    let names: Vec<&str> = pairs.iter().map(|(name, _)| *name).collect();
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    assert_clean(&segs);
    let log = std::fs::read_to_string(n.dir().join("access.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let events = all_events(&segs);
    assert_eq!(events.len(), lines.len(), "events vs access_log:\n{log}");
    let mut rows = Vec::new();
    for ((seg, e), line) in events.into_iter().zip(lines) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), names.len(), "{line:?}");
        let mut row = HashMap::new();
        for (name, col) in names.iter().zip(cols) {
            let v = seg
                .value(e, name)
                .map_or("-".to_string(), |v| String::from_utf8_lossy(v).into_owned());
            assert_eq!(
                v, col,
                "field {name}: event {v:?}, access_log {col:?} in {line:?}"
            );
            row.insert(name.to_string(), v);
        }
        rows.push(row);
    }
    rows
}

/// A local HTTP upstream serving `count` connections: each gets its response header at
/// once and its 5-byte body `delay` later.
fn slow_upstream(count: usize, delay: Duration) -> (u16, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        for conn in listener.incoming().take(count) {
            let mut conn = conn.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n");
            let _ = conn.flush();
            std::thread::sleep(delay);
            let _ = conn.write_all(b"hello");
        }
    });
    (port, t)
}

fn parse_secs(s: &str) -> f64 {
    s.parse()
        .unwrap_or_else(|_| panic!("not a number of seconds: {s:?}"))
}

#[test]
fn body_bytes_sent_read_by_add_header_is_recorded_as_access_log_writes_it() {
    let pairs = [
        ("bytes", "$body_bytes_sent"),
        ("sent", "$bytes_sent"),
        ("both", "\"$body_bytes_sent/$bytes_sent\""),
        ("xb", "$sent_http_x_b"),
    ];
    let conf = compared_conf(
        &pairs,
        "",
        r#"location / { add_header X-B "$body_bytes_sent $bytes_sent"; return 200 "seventeen bytes!!"; }"#,
    );
    let mut n = TestNginx::start(&conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..3 {
        let r = client.get(b"/", &[]).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"seventeen bytes!!"[..])
        );
    }
    let rows = events_against_access_log(&mut n, &pairs);
    assert_eq!(rows.len(), 3);
    for row in rows {
        // The header was built before any byte went out: the values cached then were 0.
        assert_eq!(
            row["xb"], "0 0",
            "add_header must have read the variables early"
        );
        assert_eq!(row["bytes"], "17");
        let sent: u64 = row["sent"].parse().unwrap();
        assert!(sent > 17, "{row:?}");
        assert_eq!(row["both"], format!("17/{sent}"));
    }
}

#[test]
fn request_time_read_by_add_header_is_recorded_as_access_log_writes_it() {
    const REQUESTS: usize = 3;
    let (upstream, served) = slow_upstream(REQUESTS, Duration::from_millis(300));
    let pairs = [
        ("rt", "$request_time"),
        ("rt_text", "rt=$request_time"),
        ("xrt", "$sent_http_x_rt"),
    ];
    let conf = compared_conf(
        &pairs,
        "",
        &format!("location / {{ add_header X-RT $request_time; proxy_pass http://127.0.0.1:{upstream}; }}"),
    );
    let mut n = TestNginx::start(&conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..REQUESTS {
        let r = client.get(b"/", &[]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    }
    served.join().unwrap();
    let rows = events_against_access_log(&mut n, &pairs);
    assert_eq!(rows.len(), REQUESTS);
    for row in rows {
        let (early, rt) = (parse_secs(&row["xrt"]), parse_secs(&row["rt"]));
        assert!(early < 0.25, "the header went out before the body: {row:?}");
        assert!(rt >= 0.3, "the body came 300 ms after the header: {row:?}");
        assert_eq!(row["rt_text"], format!("rt={}", row["rt"]));
    }
}

/// Not a staleness case (access_log, whose log-phase handler runs before the module's,
/// re-reads non-cacheable variables it logs and so refreshes them for everyone): the
/// upstream values of a proxied location, lists of a failed-over request included, agree
/// with access_log's.
#[test]
fn upstream_variables_of_a_proxied_location_are_recorded_as_access_log_writes_them() {
    const REQUESTS: usize = 4;
    let (upstream, served) = slow_upstream(REQUESTS, Duration::from_millis(100));
    // A port nobody listens on: connecting to it is refused, and nginx tries the next server.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pairs = [
        ("ust", "$upstream_status"),
        ("urt", "$upstream_response_time"),
        ("uaddr", "$upstream_addr"),
        ("both", "\"$upstream_status $upstream_response_time\""),
        ("xurt", "$sent_http_x_urt"),
        ("st", "$status"),
    ];
    let conf = compared_conf(
        &pairs,
        &format!(
            "upstream slow {{ server 127.0.0.1:{dead} max_fails=0; server 127.0.0.1:{upstream}; }}"
        ),
        r#"location / { add_header X-URT "$upstream_response_time"; proxy_pass http://slow; }"#,
    );
    let mut n = TestNginx::start(&conf, 1);
    let mut client = HttpClient::new(n.addr());
    for _ in 0..REQUESTS {
        assert_eq!(client.get(b"/", &[]).unwrap().status, 200);
    }
    served.join().unwrap();
    let rows = events_against_access_log(&mut n, &pairs);
    assert_eq!(rows.len(), REQUESTS);
    for row in &rows {
        assert_eq!(row["st"], "200");
        assert!(row["ust"].ends_with("200"), "{row:?}");
        assert_eq!(row["both"], format!("{} {}", row["ust"], row["urt"]));
        let last_rt = row["urt"].rsplit(", ").next().unwrap();
        assert!(parse_secs(last_rt) >= 0.1, "{row:?}");
    }
    assert!(
        rows.iter()
            .any(|r| r["ust"] == "502, 200" && r["uaddr"].contains(", ")),
        "no request failed over: {rows:?}"
    );
}

#[test]
fn subrequests_are_recorded_with_log_subrequest_and_leave_the_main_status_alone() {
    let build = logtally_e2e::nginx::NginxBuild::from_env();
    let flags = Command::new(&build.nginx).arg("-V").output().unwrap();
    if !String::from_utf8_lossy(&flags.stderr).contains("--with-http_auth_request_module") {
        eprintln!(
            "NOT RUN: {} has no auth_request module (Debian's has)",
            build.nginx.display()
        );
        return;
    }
    let pairs = [("uri", "$uri"), ("st", "$status"), ("text", "st=$status")];
    let conf = compared_conf(
        &pairs,
        "",
        r#"log_subrequest on;
            # A content handler (`return` would answer before the access phase's auth).
            location /private { auth_request /auth; root @DIR@/www; }
            location = /auth { internal; return 204; }"#,
    );
    let mut n = TestNginx::start_with(&conf, 1, |dir| {
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/private"), b"ok").unwrap();
    });
    let mut client = HttpClient::new(n.addr());
    for _ in 0..2 {
        let r = client.get(b"/private", &[]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    }
    let rows = events_against_access_log(&mut n, &pairs);
    let got: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r["uri"].as_str(), r["st"].as_str(), r["text"].as_str()))
        .collect();
    let sub = ("/auth", "204", "st=204");
    let main = ("/private", "200", "st=200");
    assert_eq!(got, [sub, main, sub, main]);
}

#[test]
fn internal_redirects_record_the_final_location_and_args_stay_raw() {
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms stop_timeout=15s;
        log_format where '$uri\t$arg_q';
        logtally on;
        server {
            listen 127.0.0.1:@PORT@;
            logtally_field uri $uri;
            logtally_field q $arg_q;
            access_log @DIR@/access.log where;
            location /start { logtally_field where start; rewrite ^ /end last; }
            location /end { logtally_field where end; logtally_field q $arg_q; return 204; }
            location /to-off { error_page 404 = /off; return 404; }
            location /off { logtally off; return 204; }
        }
    "#;
    let mut n = TestNginx::start(conf, 1);
    let mut client = HttpClient::new(n.addr());
    for target in [&b"/start?q=a%20b+c%2F"[..], b"/to-off?q=x"] {
        assert_eq!(client.get(target, &[]).unwrap().status, 204);
    }
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    let events = all_events(&segs);
    // One event, with the fields of the location the request ended in (its `where`, and no
    // server-level `uri`), the query argument as the client sent it (not URL-decoded);
    // the redirect into a `logtally off` location records nothing, as access_log
    // follows the final location too.
    assert_eq!(events.len(), 1);
    let (seg, e) = events[0];
    assert_eq!(seg.value(e, "where"), Some(&b"end"[..]));
    assert_eq!(seg.value(e, "uri"), None);
    assert_eq!(seg.value(e, "q"), Some(&b"a%20b+c%2F"[..]));
    let log = std::fs::read_to_string(n.dir().join("access.log")).unwrap();
    // (error_page drops the arguments of a redirect without its own.)
    assert_eq!(log, "/end\ta%20b+c%2F\n/off\t-\n");
}

#[test]
fn ssi_subrequests_are_recorded_with_log_subrequest_each_with_its_own_status() {
    let pairs = [("uri", "$uri"), ("st", "$status"), ("text", "st=$status")];
    let conf = compared_conf(
        &pairs,
        "",
        r#"log_subrequest on;
            location /page { ssi on; default_type text/html; root @DIR@/www; }
            location = /part { internal; return 202 "part"; }"#,
    );
    let mut n = TestNginx::start_with(&conf, 1, |dir| {
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(
            dir.join("www/page"),
            b"a<!--# include virtual=\"/part\" -->b",
        )
        .unwrap();
    });
    // (The answer is chunked, which the test client does not read: the events below show
    // the include ran.)
    let r = HttpClient::one_shot(n.addr()).get(b"/page", &[]).unwrap();
    assert_eq!(r.status, 200);
    let rows = events_against_access_log(&mut n, &pairs);
    let got: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r["uri"].as_str(), r["st"].as_str(), r["text"].as_str()))
        .collect();
    assert_eq!(
        got,
        [("/part", "202", "st=202"), ("/page", "200", "st=200")]
    );
}
