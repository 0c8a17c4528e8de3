//! Configurations: bad ones fail `nginx -t` naming the directive; levels inherit, switch
//! off and leave undeclared fields absent.

use std::path::Path;
use std::time::Duration;

use logtally_e2e::nginx::{read_spool, test_config, HttpClient, TestNginx};

use super::{all_events, status, status_value, TmpfsMount, GOOD};

fn assert_rejected(body: &str, prepare: impl FnOnce(&Path), wanted: &[&str]) {
    let out = test_config(body, prepare);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted:\n{body}\n{stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "{w:?} not in:\n{stderr}");
    }
    assert!(stderr.contains("nginx.conf:"), "no file:line in:\n{stderr}");
}

#[test]
fn bad_configurations_fail_nginx_t_naming_the_directive() {
    let ok = test_config(GOOD, |_| {});
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let field = |line: &str| GOOD.replace("logtally_field a $arg_a;", line);
    let spool = |line: &str| GOOD.replace("logtally_spool @DIR@/spool stop_timeout=15s;", line);
    assert_rejected(
        &field("logtally_field a $arg_a; logtally_field b \"x$no_such_thing\";"),
        |_| {},
        &["logtally_field", "no_such_thing"],
    );
    assert_rejected(
        &field("logtally_field b $nope;"),
        |_| {},
        &["logtally_field", "nope"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/spool segment_size=lots;"),
        |_| {},
        &["\"logtally_spool\" directive", "segment_size", "lots"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/spool flush=soon;"),
        |_| {},
        &["\"logtally_spool\" directive", "flush", "soon"],
    );
    for queue in ["0", "lots", "64x", "2g", "512b"] {
        assert_rejected(
            &spool(&format!("logtally_spool @DIR@/spool queue={queue};")),
            |_| {},
            &[
                "\"logtally_spool\" directive",
                &format!("invalid queue \"{queue}\""),
            ],
        );
    }
    assert_rejected(
        &spool("logtally_spool @DIR@/spool fsync=never;"),
        |_| {},
        &["\"logtally_spool\" directive", "fsync"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/spool stop_timeout=forever;"),
        |_| {},
        &["\"logtally_spool\" directive", "stop_timeout", "forever"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/afile/spool;"),
        |d| std::fs::write(d.join("afile"), b"x").unwrap(),
        &["\"logtally_spool\" directive", "not a folder"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/no/such/parent;"),
        |_| {},
        &["\"logtally_spool\" directive", "cannot be created"],
    );
    if let Some(ro) = TmpfsMount::new("ro,size=1m") {
        assert_rejected(
            &spool(&format!("logtally_spool {}/spool;", ro.path.display())),
            |_| {},
            &["\"logtally_spool\" directive", "Read-only"],
        );
    } else {
        eprintln!("cannot mount tmpfs here: read-only spool case skipped");
    }
    assert_rejected(
        &field("logtally_field a;"),
        |_| {},
        &["invalid number of arguments in \"logtally_field\" directive"],
    );
    assert_rejected(
        &field("logtally_field 9a $arg_a;"),
        |_| {},
        &["logtally_field", "9a"],
    );
    assert_rejected(
        &field("logtally_field a $arg_a; logtally_field a $arg_b;"),
        |_| {},
        &["logtally_field", "twice"],
    );
    assert_rejected(
        &spool(""),
        |_| {},
        &["\"logtally\" directive", "logtally_spool"],
    );
    assert_rejected(
        &spool("logtally_spool @DIR@/spool; logtally_spool @DIR@/spool;"),
        |_| {},
        &["\"logtally_spool\" directive is duplicate"],
    );
}

#[test]
fn levels_inherit_switch_off_and_leave_undeclared_fields_absent() {
    let conf = r#"
        logtally_spool @DIR@/spool flush=20ms;
        logtally on;
        logtally_field a $arg_a;
        logtally_field b $arg_b;
        server {
            listen 127.0.0.1:@PORT@;
            location /inherit { return 204; }
            location /off { logtally off; return 204; }
            location /own { logtally_field c $arg_c; return 204; }
            location /status { logtally off; logtally_status; }
        }
    "#;
    let mut n = TestNginx::start(conf, 2);
    let mut client = HttpClient::new(n.addr());
    for t in ["/inherit?a=1&b=2&c=3", "/off?a=9", "/own?a=1&b=2&c=3"] {
        assert_eq!(client.get(t.as_bytes(), &[]).unwrap().status, 204);
    }
    n.wait_until(Duration::from_secs(10), "2 events", || {
        status_value(&status(n.addr()), "logtally_module_events_total") == 2
    });
    n.quit();
    let segs = read_spool(&n.dir().join("spool"));
    let mut values: Vec<Vec<Option<Vec<u8>>>> = all_events(&segs)
        .into_iter()
        .map(|(_, e)| e.values.clone())
        .collect();
    values.sort();
    for s in &segs {
        assert_eq!(s.fields, ["a", "b", "c"]);
    }
    let v = |s: &str| Some(s.as_bytes().to_vec());
    assert_eq!(
        values,
        vec![vec![None, None, v("3")], vec![v("1"), v("2"), None]]
    );
}
