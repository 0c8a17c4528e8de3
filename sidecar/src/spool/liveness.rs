//! Whether an unsealed segment's writer is gone, so the tailer may finish the segment and
//! count its torn tail as lost.
//!
//! The rule today is by process id: the writer is gone when `/proc/<pid>` is absent (or the
//! injected [`Liveness`] says so), or when a newer segment by the same pid exists (one
//! writer keeps one open segment, so after pid reuse or a failed seal the older one is
//! dead), and the segment has not grown for the grace period. A pid reused by an unrelated
//! process keeps a segment waiting until a newer segment of that pid appears or the process
//! ends (the cost is delay, never loss). Liveness by lock, which crosses pid namespaces,
//! replaces this file's rule when it comes; the tailer asks only `WriterCheck::gone`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether a process id is alive.
#[derive(Clone)]
pub struct Liveness(pub Arc<dyn Fn(u32) -> bool + Send + Sync>);

impl Default for Liveness {
    fn default() -> Self {
        Liveness(Arc::new(|pid| {
            std::path::Path::new("/proc").join(pid.to_string()).exists()
        }))
    }
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Liveness(..)")
    }
}

/// Parses the pid out of `<ms>-<pid>-<seq>.seg`.
pub(super) fn name_pid(name: &str) -> Option<u32> {
    name.split('-').nth(1)?.parse().ok()
}

/// The unfinished segments a newer segment of the same writer pid supersedes, from every
/// tracked segment's `(name, pid, finished)` in name (creation) order.
pub(super) fn superseded<'a>(
    segments: impl Iterator<Item = (&'a str, Option<u32>, bool)>,
) -> Vec<String> {
    let segments: Vec<(&str, Option<u32>, bool)> = segments.collect();
    // The newest segment name per pid: older unfinished ones of that pid are dead.
    let mut newest: HashMap<u32, &str> = HashMap::new();
    for &(name, pid, _) in &segments {
        if let Some(pid) = pid {
            newest.insert(pid, name); // name order: the last wins
        }
    }
    segments
        .iter()
        .filter(|&&(name, pid, finished)| !finished && pid.is_some_and(|p| newest[&p] != name))
        .map(|&(name, ..)| name.to_string())
        .collect()
}

/// What one poll knows for deciding whether a segment's writer is gone.
pub(super) struct WriterCheck<'a> {
    pub now: Instant,
    /// How long a segment must stay the same size first.
    pub grace: Duration,
    /// A newer segment by the same pid exists.
    pub superseded: bool,
    pub liveness: &'a Liveness,
}

impl WriterCheck<'_> {
    /// Whether an unsealed segment, written by `pid` and last grown at `last_growth`, is
    /// abandoned: its writer is gone and it stopped growing long enough ago.
    pub fn gone(&self, pid: Option<u32>, last_growth: Instant) -> bool {
        self.now.saturating_duration_since(last_growth) >= self.grace
            && (self.superseded || pid.is_none_or(|pid| !(self.liveness.0)(pid)))
    }
}
