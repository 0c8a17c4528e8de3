//! The `logtally` binary's command line: version, help, `check` (configuration part) and
//! `dump`, run as a user would.

use std::process::{Command, Output};

use logtally_spool::{SegmentWriter, SegmentWriterConfig};

fn logtally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_logtally"))
        .args(args)
        .output()
        .expect("run logtally")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_and_help() {
    let out = logtally(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("logtally {}", env!("CARGO_PKG_VERSION"))
    );
    let out = logtally(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for cmd in ["run", "check", "dump"] {
        assert!(help.contains(cmd), "{help}");
    }
    assert!(!logtally(&["frobnicate"]).status.success());
}

#[test]
fn check_validates_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("logtally.toml");
    std::fs::write(
        &good,
        r#"
node = "edge-1"
[[rule]]
table = "ad_events_1m"
bucket = "1m"
group_by = ["ad", "ev"]
metrics = { events = "count", bytes = "sum(bytes)" }
"#,
    )
    .unwrap();
    let out = logtally(&["check", "--no-database", "-c", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ad_events_1m") && stdout.contains("configuration OK"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "flush_interval = \"5 parsecs\"\n[[rule]]\ntable = \"t\"\nbucket = \"1m\"\nmetrics = { n = \"count\" }\n").unwrap();
    let out = logtally(&["check", "--no-database", "-c", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.toml: flush_interval: bad duration \"5 parsecs\""),
        "{stderr}"
    );
}

#[test]
fn dump_prints_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = SegmentWriter::new(SegmentWriterConfig {
        dir: dir.path().to_path_buf(),
        fields: vec!["ad".into(), "ev".into()],
        segment_size: 1 << 20,
        pid: 77,
        fsync: false,
    })
    .unwrap();
    let mut frames = Vec::new();
    logtally_spool::encode_event(&mut frames, 1000, [Some(&b"7"[..]), None]);
    logtally_spool::encode_event(&mut frames, 1001, [Some(&b"8"[..]), Some(&b"\xff"[..])]);
    w.append(&frames, 2, 0, 5).unwrap();
    let sealed = w.seal(6).unwrap().unwrap();

    for target in [sealed.path.as_path(), dir.path()] {
        let out = logtally(&["dump", target.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let lines: Vec<serde_json::Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(
            lines[0]["header"]["fields"],
            serde_json::json!(["ad", "ev"])
        );
        assert_eq!(
            lines[1]["fields"],
            serde_json::json!({"ad": "7", "ev": null})
        );
        assert_eq!(lines[1]["time_ms"], serde_json::json!(1000));
        assert_eq!(lines[2]["fields"]["ev"], serde_json::json!({"hex": "ff"}));
        assert_eq!(lines[3]["sealed"]["events"], serde_json::json!(2));
    }
    let out = logtally(&["dump", "/nonexistent/x.seg"]);
    assert!(!out.status.success());
}
