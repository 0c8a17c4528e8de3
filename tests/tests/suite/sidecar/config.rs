//! `check` and `run` refusing bad configurations and tables of the wrong shape.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::{free_addr, logtally_bin, Db};

use super::{dead_pid, hand_segment, start_sidecar, Site, Workload, RULE};

fn check(config: &Path) -> (bool, String) {
    let out = Command::new(logtally_bin())
        .args(["check", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_names_what_is_wrong_with_a_configuration() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let (ok, out) = check(&site.config(db.url()));
    assert!(ok, "a good configuration must pass: {out}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key",
            site_config_text(&site, db.url(), "colour = \"red\"", RULE),
            "colour",
        ),
        (
            "bad duration",
            site_config_text(&site, db.url(), "retain = \"5 parsecs\"", RULE),
            "retain",
        ),
        (
            "metric function on an unknown field",
            site_config_text(
                &site,
                db.url(),
                "",
                &RULE.replace("max(bytes)", "max(by tes)"),
            ),
            "rule[0].metrics.bytes_max",
        ),
        (
            "table name with a quote",
            site_config_text(
                &site,
                db.url(),
                "",
                &RULE.replace("ad_events_1m", "ad\\\"x"),
            ),
            "rule[0].table",
        ),
        (
            "table name with a semicolon",
            site_config_text(
                &site,
                db.url(),
                "",
                &RULE.replace("ad_events_1m", "t; drop table x"),
            ),
            "rule[0].table",
        ),
    ];
    for (what, text, needle) in cases {
        let path = site.dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (ok, out) = check(&path);
        assert!(!ok, "{what}: check passed:\n{out}");
        assert!(
            out.contains(needle),
            "{what}: {needle:?} not named in:\n{out}"
        );
        assert!(
            out.contains("bad.toml"),
            "{what}: file not named in:\n{out}"
        );
    }

    // Field names the spool does not declare. An empty spool cannot tell: a note, not a
    // failure; once a segment declares [ad, ev, bytes], a rule on `rtt` or `cmp` fails.
    let unknown_metric = site_config_text(
        &site,
        db.url(),
        "",
        &RULE.replace("bytes_max = \"max(bytes)\"", "x = \"max(rtt)\""),
    );
    let unknown_group = site_config_text(&site, db.url(), "", &RULE.replace("\"ev\"]", "\"cmp\"]"));
    let path = site.dir.path().join("fields.toml");
    std::fs::write(&path, &unknown_metric).unwrap();
    let (ok, out) = check(&path);
    assert!(ok, "no segments yet: must not fail:\n{out}");
    assert!(
        out.contains("no segment with a readable header in") && out.contains("not checked"),
        "no note that field names were not checked:\n{out}"
    );
    let mut load = Workload::new(9);
    hand_segment(&site.spool, dead_pid(), 1, &mut load, 3, &[], false);
    let declared = "declare: ad, ev, bytes)";
    for (what, text, key, field) in [
        (
            "max of an unknown field",
            &unknown_metric,
            "rule[0].metrics.x",
            "\"rtt\"",
        ),
        (
            "group_by an unknown field",
            &unknown_group,
            "rule[0].group_by[1]",
            "\"cmp\"",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let (ok, out) = check(&path);
        assert!(!ok, "{what}: check passed:\n{out}");
        let line = out
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("{what}: {key} not named in:\n{out}"));
        assert!(
            line.contains("fields.toml") && line.contains(field) && line.contains(declared),
            "{what}: file, field or declared fields not named in:\n{out}"
        );
        assert!(!out.contains("configuration OK"), "{what}:\n{out}");
    }
    let (ok, out) = check(&site.config(db.url()));
    assert!(ok, "the good configuration against the same spool:\n{out}");
    assert!(out.contains("found in 1 segment(s)"), "{out}");

    let port = free_addr().port();
    let unreachable = format!("postgres://nobody@127.0.0.1:{port}/nowhere?connect_timeout=3");
    let path = site.dir.path().join("unreachable.toml");
    std::fs::write(&path, site_config_text(&site, &unreachable, "", RULE)).unwrap();
    let (ok, out) = check(&path);
    assert!(!ok, "unreachable database: check passed:\n{out}");
    assert!(
        out.contains(&format!("127.0.0.1:{port}")),
        "address not named in:\n{out}"
    );
}

fn site_config_text(site: &Site, url: &str, extra: &str, rule: &str) -> String {
    let p = site.config_with(url, extra, rule);
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn refuses_to_start_on_a_table_of_the_wrong_shape() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    db.execute(
        "CREATE TABLE ad_events_1m (bucket timestamptz NOT NULL, ad text NOT NULL, \
         ev text NOT NULL, events integer NOT NULL, bytes numeric NOT NULL, \
         bytes_max numeric, PRIMARY KEY (bucket, ad, ev))",
    );
    let site = Site::new();
    let config = site.config(db.url());
    let (ok, out) = check(&config);
    assert!(
        !ok && out.contains("column events is integer, expected bigint"),
        "{out}"
    );
    let mut sidecar = start_sidecar(&site, &config);
    let status = sidecar
        .wait(Duration::from_secs(30))
        .expect("logtally run kept running on a bad table");
    assert!(!status.success());
    let log = site.log_text();
    assert!(
        log.contains("column events is integer, expected bigint"),
        "{log}"
    );
    // And it wrote nothing.
    assert!(db.query("SELECT 1 FROM ad_events_1m").unwrap().is_empty());
}
