//! What the spool takes and how long its oldest uncommitted byte has waited, seen from
//! outside the reader: a thread of its own lists the folder once a second (segment sizes,
//! the blocks they take, the file system's free bytes) so a wedged reader, an unreadable
//! segment or a database outage still raises `logtally_lag_seconds`.
//!
//! - [`LagClock`] (pure): remembers, per segment, when each size was first seen; the oldest
//!   observation whose size is past the committed offset is the time by which the oldest
//!   uncommitted byte existed. Its age is a lower bound of that byte's age, exact to the
//!   scan interval, and needs no read of the segment (a hanging read cannot hide it).
//! - [`scan`] (I/O): one look at the folder.
//! - [`start`]: the thread; each scan updates `/status` and the gauges.
//!
//! The clock starts when this process first sees the bytes: after a restart a backlog's
//! lag counts from the restart until the reader has read its events, whose own times then
//! count (the larger of the two is shown).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use logtally_spool::is_segment_file_name;
use tracing::warn;

use crate::http::metrics::Metrics;
use crate::http::status::SharedStatus;
use crate::now_ms;

/// How often the folder is looked at.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Observations kept per segment: older ones merge into the oldest kept (the clock only
/// needs the first size past each commit, and commits come every flush interval).
const MAX_OBSERVATIONS: usize = 64;

/// One segment as the folder shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentUsage {
    pub name: String,
    /// File size (bytes written).
    pub size: u64,
    /// What the file takes on disk (allocated blocks).
    pub disk_bytes: u64,
}

/// One look at the spool folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolUsage {
    pub segments: Vec<SegmentUsage>,
    /// Free bytes of the spool's file system for an unprivileged writer (`f_bavail`).
    pub free_bytes: Option<u64>,
}

impl SpoolUsage {
    /// What all segments take on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.disk_bytes).sum()
    }
}

/// When each segment's bytes were first seen (pure: times are passed in).
#[derive(Debug, Default)]
pub struct LagClock {
    /// Per segment, (size, first seen at ms), sizes increasing.
    seen: BTreeMap<String, VecDeque<(u64, u64)>>,
}

impl LagClock {
    /// Records the sizes of one scan at `at_ms`; segments gone from the folder are forgotten.
    pub fn observe<'a>(&mut self, sizes: impl IntoIterator<Item = (&'a str, u64)>, at_ms: u64) {
        let mut next = BTreeMap::new();
        for (name, size) in sizes {
            let mut obs = self.seen.remove(name).unwrap_or_default();
            if obs.back().is_none_or(|&(s, _)| size > s) {
                obs.push_back((size, at_ms));
            }
            if obs.len() > MAX_OBSERVATIONS {
                // Keep the oldest time (it bounds the oldest byte) and the newest sizes.
                let (_, first_at) = obs.pop_front().expect("non-empty");
                if let Some(front) = obs.front_mut() {
                    front.1 = first_at;
                }
            }
            next.insert(name.to_string(), obs);
        }
        self.seen = next;
    }

    /// Milliseconds the oldest uncommitted byte has existed at `now_ms`, all segments;
    /// `committed(name)` is the segment's committed offset (0 when it has no checkpoint).
    /// Observations at or below the committed offset are dropped: those bytes are safe.
    pub fn age_ms(&mut self, now_ms: u64, committed: impl Fn(&str) -> u64) -> u64 {
        let mut oldest: Option<u64> = None;
        for (name, obs) in &mut self.seen {
            let done = committed(name);
            // An observation (s, t) says: bytes below s existed at t. Once the offset reaches
            // s they are committed; the next observation bounds what is left.
            while obs.front().is_some_and(|&(s, _)| s <= done) {
                obs.pop_front();
            }
            if let Some(&(_, t)) = obs.front() {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        }
        oldest.map_or(0, |t| now_ms.saturating_sub(t))
    }
}

/// Lists the segment files of `dir` with their sizes and blocks, and the file system's
/// free bytes. Files that vanish between the listing and their `stat` are left out.
pub fn scan(dir: &Path) -> std::io::Result<SpoolUsage> {
    use std::os::unix::fs::MetadataExt;
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_segment_file_name(name) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        segments.push(SegmentUsage {
            name: name.to_string(),
            size: meta.len(),
            disk_bytes: meta.blocks() * 512,
        });
    }
    segments.sort_by(|a, b| a.name.cmp(&b.name));
    let free_bytes = rustix::fs::statvfs(dir)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
    Ok(SpoolUsage {
        segments,
        free_bytes,
    })
}

/// Starts the usage thread: every [`SCAN_INTERVAL`] it scans `dir`, sets
/// `logtally_spool_bytes` and `logtally_spool_free_bytes`, and folds the lag clock's age
/// into `/status` and `logtally_lag_seconds` (committed offsets come from `/status`, which
/// the engine keeps). A folder that cannot be listed keeps the last sizes: the clock keeps
/// running. The thread is detached; it ends with the process.
pub fn start(dir: PathBuf, metrics: Arc<Metrics>, status: SharedStatus) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("logtally-spool-usage".into())
        .spawn(move || {
            let mut clock = LagClock::default();
            let mut warned = false;
            loop {
                let now = now_ms();
                match scan(&dir) {
                    Ok(usage) => {
                        warned = false;
                        let sizes = usage.segments.iter().map(|s| (s.name.as_str(), s.size));
                        clock.observe(sizes, now);
                        metrics.spool_bytes.set(usage.disk_bytes() as i64);
                        if let Some(free) = usage.free_bytes {
                            metrics.spool_free_bytes.set(free as i64);
                        }
                        status.update(|s| {
                            s.spool_bytes = usage.disk_bytes();
                            s.spool_free_bytes = usage.free_bytes;
                        });
                    }
                    Err(error) if !warned => {
                        warned = true;
                        warn!(dir = %dir.display(), %error, "cannot list the spool folder");
                    }
                    Err(_) => {}
                }
                status.update(|s| {
                    let age = clock.age_ms(now, |name| {
                        s.segments.get(name).map_or(0, |seg| seg.committed_offset)
                    });
                    s.unread_lag_seconds = age as f64 / 1000.0;
                    s.recompute_lag();
                    metrics.lag_seconds.set(s.lag_seconds);
                });
                std::thread::sleep(SCAN_INTERVAL);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_is_the_first_sight_of_the_oldest_uncommitted_byte() {
        let mut c = LagClock::default();
        c.observe([("a", 100)], 1_000);
        c.observe([("a", 300)], 2_000);
        c.observe([("a", 300)], 3_000); // no growth: no new observation
                                        // Nothing committed: bytes below 100 existed at 1 000.
        assert_eq!(c.age_ms(5_000, |_| 0), 4_000);
        // Committed up to 100: the rest (100..300) existed at 2 000.
        assert_eq!(c.age_ms(5_000, |_| 100), 3_000);
        // Committed up to the end: nothing waits.
        assert_eq!(c.age_ms(5_000, |_| 300), 0);
        // A later growth starts a new clock.
        c.observe([("a", 400)], 6_000);
        assert_eq!(c.age_ms(6_500, |_| 300), 500);
    }

    #[test]
    fn oldest_segment_wins_and_vanished_segments_are_forgotten() {
        let mut c = LagClock::default();
        c.observe([("a", 10), ("b", 10)], 1_000);
        c.observe([("a", 10), ("b", 20)], 2_000);
        let committed = |n: &str| if n == "a" { 10 } else { 0 };
        assert_eq!(c.age_ms(3_000, committed), 2_000); // b's first bytes
        c.observe([("a", 10)], 3_000); // b deleted
        assert_eq!(c.age_ms(4_000, committed), 0);
    }

    #[test]
    fn many_observations_keep_the_oldest_time() {
        let mut c = LagClock::default();
        for i in 0..1_000u64 {
            c.observe([("a", 10 + i)], 1_000 + i);
        }
        assert!(c.seen["a"].len() <= MAX_OBSERVATIONS);
        assert_eq!(c.age_ms(10_000, |_| 0), 9_000);
    }

    #[test]
    fn scan_lists_segments_and_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let name = logtally_spool::segment_file_name(1, 2, 3);
        std::fs::write(dir.path().join(&name), vec![1u8; 5000]).unwrap();
        std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
        let u = scan(dir.path()).unwrap();
        assert_eq!(u.segments.len(), 1);
        assert_eq!(
            (u.segments[0].name.as_str(), u.segments[0].size),
            (name.as_str(), 5000)
        );
        assert!(u.disk_bytes() >= 4096, "{u:?}");
        assert!(u.free_bytes.is_some_and(|f| f > 0));
    }
}
