//! Unit tests of the configuration: parsing, defaults, and every error naming its key.

use super::duration::DAY;
use super::*;

const RULE: &str = r#"
[[rule]]
table    = "ad_events_1m"
bucket   = "1m"
group_by = ["ad", "ev", "cmp"]
metrics  = { events = "count", bytes = "sum(bytes)", rt_max = "max(rt)", rt_min = "min(rt)" }
"#;

fn p(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("logtally.toml"), text)
}

fn err(text: &str) -> String {
    p(text).expect_err("should fail").to_string()
}

#[test]
fn defaults_apply() {
    let c = p(RULE).unwrap();
    assert_eq!(c.spool_dir, PathBuf::from("/var/spool/logtally"));
    assert_eq!(c.database_url, "postgres://logtally@127.0.0.1/logtally");
    assert_eq!((c.node.as_str(), c.node_configured), ("", false));
    assert_eq!(c.shutdown_wait, Duration::from_secs(20));
    assert_eq!(c.flush_interval, Duration::from_secs(5));
    assert_eq!(c.listen, "127.0.0.1:9187".parse().unwrap());
    assert_eq!(c.binlog, PathBuf::from("/var/lib/logtally/binlog"));
    assert_eq!(c.retain, Duration::ZERO);
    assert_eq!(c.max_pending_keys, 1_000_000);
    assert_eq!(c.path, PathBuf::from("logtally.toml"));
}

#[test]
fn full_file() {
    let text = format!(
        r#"
spool_dir = "/tmp/spool"
database_url = "postgres://u:pw@db/x"
node = "edge-1"
flush_interval = "100ms"
listen = "0.0.0.0:9000"
binlog = "/tmp/binlog"
retain = "1h"
max_pending_keys = 10
shutdown_wait = "3s"
{RULE}
[[rule]]
table = "daily"
bucket = "1d"
metrics = {{ n = "count" }}
"#
    );
    let c = p(&text).unwrap();
    assert_eq!(c.flush_interval, Duration::from_millis(100));
    assert_eq!(c.retain, Duration::from_secs(3600));
    assert_eq!((c.node.as_str(), c.node_configured), ("edge-1", true));
    assert_eq!(c.shutdown_wait, Duration::from_secs(3));
    assert_eq!(c.rules.len(), 2);
    let r = &c.rules[0];
    assert_eq!(r.table, "ad_events_1m");
    assert_eq!(r.bucket_ms(), 60_000);
    assert_eq!(r.group_by, ["ad", "ev", "cmp"]);
    let cols: Vec<&str> = r.metrics.iter().map(|m| m.column.as_str()).collect();
    assert_eq!(
        cols,
        ["events", "bytes", "rt_max", "rt_min"],
        "file order kept"
    );
    assert_eq!(r.metrics[0].kind, MetricKind::Count);
    assert_eq!(r.metrics[1].kind, MetricKind::Sum("bytes".into()));
    assert_eq!(r.metrics[2].kind, MetricKind::Max("rt".into()));
    assert_eq!(r.metrics[3].kind, MetricKind::Min("rt".into()));
    assert_eq!(c.rules[1].group_by, Vec::<String>::new());
    assert_eq!(c.rules[1].bucket, DAY);
    assert!(c.summary().contains("u:***@db"), "{}", c.summary());
}

#[test]
fn durations() {
    assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
    for text in [
        "0s", "100ms", "1500ms", "5s", "90s", "1m", "1h", "36h", "1d", "7d",
    ] {
        assert_eq!(format_duration(parse_duration(text).unwrap()), text);
    }
    for bad in [
        "",
        "5",
        "s",
        "5 s",
        "-5s",
        "5.5s",
        "5parsecs",
        "1w",
        "99999999999999999999d",
    ] {
        assert_eq!(
            parse_duration(bad),
            Err(Problem::BadDuration(bad.into())),
            "{bad}"
        );
    }
}

#[test]
fn bad_duration_names_key() {
    let e = err(&format!("flush_interval = \"5 parsecs\"\n{RULE}"));
    assert_eq!(e, "logtally.toml: flush_interval: bad duration \"5 parsecs\" (expected an integer and a unit: ms, s, m, h, d, e.g. \"5s\")");
    let e = err(&format!("retain = \"soon\"\n{RULE}"));
    assert!(
        e.starts_with("logtally.toml: retain: bad duration \"soon\""),
        "{e}"
    );
    let e = err(&format!("flush_interval = \"0s\"\n{RULE}"));
    assert_eq!(
        e,
        "logtally.toml: flush_interval: must be greater than zero"
    );
}

#[test]
fn buckets() {
    for ok in [
        "1s", "30s", "1m", "5m", "15m", "1h", "12h", "1d", "7d", "86400s",
    ] {
        assert!(parse_bucket(ok).is_ok(), "{ok}");
    }
    for bad in ["0s", "7s", "100ms", "7m", "25h", "36h", "1500ms"] {
        assert_eq!(
            parse_bucket(bad),
            Err(Problem::BadBucket(bad.into())),
            "{bad}"
        );
    }
    let e = err(&RULE.replace("\"1m\"", "\"7m\""));
    assert!(
        e.starts_with("logtally.toml: rule[0].bucket: bad bucket \"7m\""),
        "{e}"
    );
}

#[test]
fn unknown_function() {
    let e = err(&RULE.replace("max(rt)", "avg(rt)"));
    assert_eq!(
        e,
        "logtally.toml: rule[0].metrics.rt_max: at 1: unknown function \"avg\" (expected count, \
         sum(f), min(f), max(f), distinct(f), quantiles(f))"
    );
    let e = err(&RULE.replace("\"count\"", "\"total\""));
    assert!(
        e.contains("rule[0].metrics.events: at 1: unknown function \"total\""),
        "{e}"
    );
    let e = err(&RULE.replace("sum(bytes)", "sum(bytes"));
    assert!(
        e.contains("rule[0].metrics.bytes: at 10: expected ')'"),
        "{e}"
    );
    let e = err(&RULE.replace("\"count\"", "3"));
    assert!(e.contains("rule[0].metrics.events: bad metric 3"), "{e}");
}

/// Conditions: a rule's `where` and a metric's, errors at their position.
#[test]
fn conditions() {
    let text = RULE.replace("metrics  =", "where = \"status < 400\"\nmetrics  =");
    let c = p(&text.replace("\"count\"", "\"count where ev = 'view'\"")).unwrap();
    let r = &c.rules[0];
    assert_eq!(r.filter.as_ref().unwrap().to_string(), "status < 400");
    assert_eq!(
        r.metrics[0].filter.as_ref().unwrap().to_string(),
        "ev = 'view'"
    );
    assert_eq!(r.metrics[0].expression(), "count where ev = 'view'");
    let e = err(&RULE.replace("\"count\"", "\"count where ev =\""));
    assert_eq!(
        e,
        "logtally.toml: rule[0].metrics.events: at 17: expected a value after '='"
    );
    let e = err(&text.replace("status < 400", "status < 'x'"));
    assert!(
        e.starts_with("logtally.toml: rule[0].where: at 10: expected a number after '<'"),
        "{e}"
    );
}

#[test]
fn metric_forms() {
    assert_eq!(
        parse_metric(" sum( bytes ) "),
        Ok((MetricKind::Sum("bytes".into()), None))
    );
    assert_eq!(parse_metric("count"), Ok((MetricKind::Count, None)));
    assert_eq!(
        parse_metric("min(Rt_1)"),
        Ok((MetricKind::Min("Rt_1".into()), None))
    );
    assert!(parse_metric("max()").is_err());
    let (kind, filter) = parse_metric("count where ev = 'view'").unwrap();
    assert_eq!(kind, MetricKind::Count);
    assert_eq!(filter.unwrap().to_string(), "ev = 'view'");
}

#[test]
fn identifiers() {
    let e = err(&RULE.replace("ad_events_1m", "Ad-Events"));
    assert!(
        e.starts_with("logtally.toml: rule[0].table: invalid name \"Ad-Events\""),
        "{e}"
    );
    let e = err(&RULE.replace("ad_events_1m", &"x".repeat(64)));
    assert!(e.contains("rule[0].table: invalid name"), "{e}");
    assert!(p(&RULE.replace("ad_events_1m", &"x".repeat(63))).is_ok());
    let e = err(&RULE.replace("ad_events_1m", "logtally_checkpoint"));
    assert_eq!(
        e,
        "logtally.toml: rule[0].table: \"logtally_checkpoint\" is reserved"
    );
    let e = err(&RULE.replace("\"cmp\"", "\"bucket\""));
    assert_eq!(
        e,
        "logtally.toml: rule[0].group_by[2]: \"bucket\" is reserved"
    );
    let e = err(&RULE.replace("\"cmp\"", "\"1cmp\""));
    assert!(
        e.contains("rule[0].group_by[2]: invalid name \"1cmp\""),
        "{e}"
    );
    let e = err(&RULE.replace("\"cmp\"", "\"select\""));
    assert!(
        e.contains("rule[0].group_by[2]: \"select\" is reserved"),
        "{e}"
    );
    let e = err(&RULE.replace("events =", "bucket ="));
    assert!(
        e.contains("rule[0].metrics.bucket: \"bucket\" is reserved"),
        "{e}"
    );
}

#[test]
fn collisions() {
    let e = err(&RULE.replace("\"cmp\"", "\"ad\""));
    assert_eq!(
        e,
        "logtally.toml: rule[0].group_by[2]: column \"ad\" is used twice in this rule"
    );
    let e = err(&RULE.replace("events =", "ev ="));
    assert!(
        e.contains("rule[0].metrics.ev: column \"ev\" is used twice"),
        "{e}"
    );
    let e = err(&format!("{RULE}{RULE}"));
    assert_eq!(
        e,
        "logtally.toml: rule[1].table: table \"ad_events_1m\" is already used by rule[0]"
    );
}

#[test]
fn structure_errors() {
    assert_eq!(
        err(""),
        "logtally.toml: rule: at least one [[rule]] is required"
    );
    let e = err(&format!("spool = \"/x\"\n{RULE}"));
    assert!(
        e.starts_with("logtally.toml: ") && e.contains("unknown field `spool`"),
        "{e}"
    );
    let e = err(&format!("{RULE}colour = \"red\"\n"));
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = err("[[rule]]\ntable = \"t\"\nbucket = \"1m\"\n");
    assert!(e.contains("missing field `metrics`"), "{e}");
    let e = err("[[rule]]\ntable = \"t\"\nbucket = \"1m\"\nmetrics = {}\n");
    assert_eq!(
        e,
        "logtally.toml: rule[0].metrics: at least one metric is required"
    );
    let e = err(&format!("max_pending_keys = \"many\"\n{RULE}"));
    assert!(e.contains("max_pending_keys"), "{e}");
    let e = err(&format!("listen = \"localhost\"\n{RULE}"));
    assert!(
        e.starts_with("logtally.toml: listen: bad address \"localhost\""),
        "{e}"
    );
    let e = err(&format!("node = \"\"\n{RULE}"));
    assert_eq!(e, "logtally.toml: node: must not be empty");
    let e = err(&format!("database_url = \"\"\n{RULE}"));
    assert_eq!(e, "logtally.toml: database_url: must not be empty");
    let e = err("flush_interval = [\n");
    assert!(
        e.starts_with("logtally.toml: ") && e.contains("line 1"),
        "{e}"
    );
}

#[test]
fn hostname_is_found() {
    assert!(hostname().is_some());
}

#[test]
fn load_missing_file() {
    let e = load(Path::new("/nonexistent/logtally.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/logtally.toml: cannot read:"),
        "{e}"
    );
}

#[test]
fn redaction() {
    // The odd forms are tested in database_url.rs; this is the summary's path.
    assert_eq!(
        redact_url("postgres://a:b@h/d"),
        "postgres://a:***@h:5432/d?sslmode=prefer"
    );
    assert_eq!(
        redact_url("host=x password=y user=u"),
        "postgres://u:***@x:5432/?sslmode=prefer"
    );
}

#[test]
fn database_url_file_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("url");
    std::fs::write(&file, "postgres://u:pw@h/d\n").unwrap();
    let c = p(&format!(
        "database_url_file = {:?}\n{RULE}",
        file.display().to_string()
    ))
    .unwrap();
    assert_eq!(c.database_url, "postgres://u:pw@h/d");
    assert_eq!(c.database_url_source, DatabaseUrlSource::File(file.clone()));
    let both = format!(
        "database_url = \"postgres://h/d\"\ndatabase_url_file = {:?}\n{RULE}",
        file.display().to_string()
    );
    assert_eq!(
        err(&both),
        "logtally.toml: database_url_file: database_url and database_url_file are both set \
         (keep one)"
    );
    assert_eq!(
        err(&format!("database_url_file = \"url\"\n{RULE}")),
        "logtally.toml: database_url_file: \"url\" is not an absolute path"
    );
    let missing = dir.path().join("absent");
    let e = err(&format!(
        "database_url_file = {:?}\n{RULE}",
        missing.display().to_string()
    ));
    assert!(
        e.starts_with(&format!(
            "logtally.toml: database_url_file: cannot read {}: ",
            missing.display()
        )),
        "{e}"
    );
    std::fs::write(&file, "\n").unwrap();
    let e = err(&format!(
        "database_url_file = {:?}\n{RULE}",
        file.display().to_string()
    ));
    assert_eq!(e, "logtally.toml: database_url_file: must not be empty");
}

#[test]
fn the_environment_overrides_the_keys() {
    let mut c = p(&format!("database_url = \"postgres://a@h/d\"\n{RULE}")).unwrap();
    assert_eq!(c.database_url_source, DatabaseUrlSource::Key);
    override_from_env(&mut c, Some(String::new()));
    assert_eq!(
        c.database_url_source,
        DatabaseUrlSource::Key,
        "empty is unset"
    );
    override_from_env(&mut c, Some("postgres://b@h/e".into()));
    assert_eq!(
        (c.database_url.as_str(), &c.database_url_source),
        ("postgres://b@h/e", &DatabaseUrlSource::Env)
    );
}

#[test]
fn distribute_by_names_a_group_by_column() {
    let c = p(&format!("{RULE}distribute_by = \"ad\"\n")).unwrap();
    assert_eq!(c.distribute_by("ad_events_1m"), Some("ad"));
    assert_eq!(c.distribute_by("other"), None);
    assert_eq!(p(RULE).unwrap().distribute_by, vec![]);
    let e = err(&format!("{RULE}distribute_by = \"bucket\"\n"));
    assert_eq!(
        e,
        "logtally.toml: rule[0].distribute_by: \"bucket\" is not one of this rule's group_by \
         columns (ad, ev, cmp): a table is distributed on a column of its key"
    );
    let e = err(&format!("{RULE}distribute_by = \"rt\"\n"));
    assert!(
        e.starts_with("logtally.toml: rule[0].distribute_by: \"rt\""),
        "{e}"
    );
}
