//! The nginx module in a real nginx (2 workers, loopback): every request becomes exactly one
//! spool record (checked against a stock access_log), field values are what access_log
//! writes for the same request even when something read them earlier (`add_header`,
//! subrequests, upstream failover), internal redirects record the final location, bad
//! configurations fail `nginx -t` naming the directive, reloads and a killed worker lose
//! nothing they should not, odd values are recorded faithfully or cut by the documented
//! rule, a full queue (in records or bytes) or a spool that cannot take writes costs events
//! (counted, marked) but never a request, a frozen disk stalls neither requests nor reloads
//! and holds a worker to its byte queue, the spool folder has the documented owner and
//! mode, and `logtally_status` is valid Prometheus text with the right numbers (and never
//! an event itself).
//!
//! Needs the module built first (`scripts/nginx-build.sh module`, or `vendored` with
//! `LOGTALLY_NGINX_ROUTE=vendored`); see `logtally_e2e::nginx`. Runs as root for the tmpfs,
//! loop-mount and fsfreeze cases; elsewhere those fall back or are skipped (said on stderr).

use std::path::{Path, PathBuf};
use std::process::Command;

use logtally_e2e::nginx::{HttpClient, SegmentContents};

mod config;
mod odd_values;
mod queue_and_disks;
mod reload;
mod spool_folder;
mod status;
mod values;

fn all_events(segs: &[SegmentContents]) -> Vec<(&SegmentContents, &logtally_e2e::nginx::Event)> {
    segs.iter()
        .flat_map(|s| s.events.iter().map(move |e| (s, e)))
        .collect()
}

fn id_of(seg: &SegmentContents, e: &logtally_e2e::nginx::Event) -> u64 {
    let v = seg.value(e, "id").expect("every record has an id");
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

/// Every segment of a cleanly stopped nginx: sealed, nothing corrupt or torn, seal counts
/// match the frames.
fn assert_clean(segs: &[SegmentContents]) {
    for s in segs {
        assert_eq!(s.corrupt_bytes, 0, "{}", s.path.display());
        assert_eq!(s.torn_bytes, 0, "{}", s.path.display());
        let seal = s
            .seal
            .unwrap_or_else(|| panic!("{} not sealed", s.path.display()));
        assert_eq!(
            seal,
            (s.events.len() as u64, s.dropped),
            "{}",
            s.path.display()
        );
    }
}

/// The tests' spools wait up to 15 s (not the default 3 s) for a stopping worker's writer:
/// they assert that a clean quit seals every segment, and a disk shared with a whole test
/// suite can take longer than 3 s to fsync (the harness waits 20 s for nginx to exit).
const GOOD: &str = r#"
    logtally_spool @DIR@/spool stop_timeout=15s;
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field a $arg_a;
        location / { return 204; }
    }
"#;

/// A tmpfs mounted for a test, unmounted (lazily, so a crashed test cannot wedge it) on drop.
pub(crate) struct TmpfsMount {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TmpfsMount {
    /// Mounts a tmpfs with `options` on a new temporary folder; `None` where mounting is
    /// not allowed (not root, no CAP_SYS_ADMIN).
    pub(crate) fn new(options: &str) -> Option<TmpfsMount> {
        let dir = tempfile::Builder::new()
            .prefix("logtally-mnt-")
            .tempdir()
            .ok()?;
        let path = dir.path().to_path_buf();
        Self::at(&path, options).map(|mut m| {
            m._dir = Some(dir);
            m
        })
    }

    pub(crate) fn at(path: &Path, options: &str) -> Option<TmpfsMount> {
        std::fs::create_dir_all(path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| TmpfsMount {
            path: path.to_path_buf(),
            _dir: None,
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

const ODD_CONF: &str = r#"
    large_client_header_buffers 4 128k;
    logtally_spool @DIR@/spool flush=20ms stop_timeout=15s;
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field q $arg_q;
        logtally_field big $http_x_big;
        logtally_field raw $http_x_raw;
        logtally_field b $arg_b;
        logtally_field e $arg_e;
        logtally_field he $http_x_empty;
        logtally_field none $arg_none;
        location / { return 204; }
        location /status { logtally off; logtally_status; }
    }
"#;

/// Reads one counter from `logtally_status`.
fn status_value(text: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("{name} not in status:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn status(addr: std::net::SocketAddr) -> String {
    let r = HttpClient::new(addr).get(b"/status", &[]).unwrap();
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}
