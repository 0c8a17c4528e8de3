//! Refuses to test old code: an artifact the tests run (the `logtally` binary, the module
//! `.so`) must be newer than every source file it is built from. `cargo test` builds the test
//! crates, not the binaries they start, so without this check a test run after an edit would
//! quietly exercise the previous build.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::nginx::workspace_root;

/// The newest file under `dirs` (relative to the workspace root) with its modification time.
/// `dirs` name source folders of the artifact only (`sidecar/src`, not `sidecar`): a change to
/// a crate's tests or manifest need not relink its binary, so it must not count as newer.
fn newest_source(dirs: &[&str]) -> Option<(SystemTime, PathBuf)> {
    let root = workspace_root();
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut consider = |p: PathBuf| {
        if let Ok(t) = std::fs::metadata(&p).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                newest = Some((t, p));
            }
        }
    };
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| root.join(d)).collect();
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            consider(path); // a file (or gone: then `consider` skips it)
            continue;
        };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with('.') {
                stack.push(e.path());
            }
        }
    }
    newest
}

/// Panics, naming the newer source and the command that rebuilds, when `artifact` is older
/// than a source file under `dirs`. `LOGTALLY_ALLOW_STALE=1` turns the check off (for running
/// a deliberately old build, e.g. in a bisect).
pub fn assert_fresh(artifact: &Path, dirs: &[&str], rebuild: &str) {
    if std::env::var("LOGTALLY_ALLOW_STALE").is_ok_and(|v| v == "1") {
        return;
    }
    let built = std::fs::metadata(artifact)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}: run `{rebuild}`", artifact.display()));
    if let Some((changed, source)) = newest_source(dirs) {
        assert!(
            changed <= built,
            "stale build: {} is older than {}, changed after it was built: run `{rebuild}` \
             (or set LOGTALLY_ALLOW_STALE=1 to test the old build on purpose)",
            artifact.display(),
            source.display()
        );
    }
}
