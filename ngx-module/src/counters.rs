//! The module's counters: atomics that live in an nginx shared memory zone, so every worker
//! adds to the same numbers and `logtally_status` shows the sum; plus their Prometheus text
//! rendering (a pure function).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by all workers. Lives in shared memory: only atomics, no pointers.
#[repr(C)]
#[derive(Debug, Default)]
pub struct SharedCounters {
    pub events: AtomicU64,
    pub dropped: AtomicU64,
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    pub truncated: AtomicU64,
    pub write_errors: AtomicU64,
    pub unlinked_segments: AtomicU64,
}

/// A point-in-time copy of [`SharedCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub events: u64,
    pub dropped: u64,
    pub bytes: u64,
    pub segments: u64,
    pub truncated: u64,
    pub write_errors: u64,
    pub unlinked_segments: u64,
}

impl SharedCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> CounterValues {
        CounterValues {
            events: self.events.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            segments: self.segments.load(Ordering::Relaxed),
            truncated: self.truncated.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            unlinked_segments: self.unlinked_segments.load(Ordering::Relaxed),
        }
    }
}

/// Content type of [`render_prometheus`]'s output (Prometheus text exposition 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the counters in the Prometheus text format, names prefixed `logtally_module_`.
pub fn render_prometheus(v: &CounterValues) -> String {
    let metrics: [(&str, &str, u64); 7] = [
        (
            "events_total",
            "Events written to the spool by all workers.",
            v.events,
        ),
        (
            "dropped_total",
            "Events nginx served but the spool does not hold (queue full or write failed).",
            v.dropped,
        ),
        (
            "bytes_total",
            "Bytes of event frames and drop markers written to the spool.",
            v.bytes,
        ),
        (
            "segments_total",
            "Spool segments sealed (rolled at segment_size or closed at worker exit).",
            v.segments,
        ),
        (
            "truncated_values_total",
            "Field values cut to the 4096-byte limit.",
            v.truncated,
        ),
        (
            "write_errors_total",
            "Failed batch writes to the spool.",
            v.write_errors,
        ),
        (
            "unlinked_segments_total",
            "Open spool segments found deleted by hand; their writer moved on to a new one.",
            v.unlinked_segments,
        ),
    ];
    let mut out = String::with_capacity(1024);
    for (name, help, value) in metrics {
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "# HELP logtally_module_{name} {help}\n# TYPE logtally_module_{name} counter\nlogtally_module_{name} {value}\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter_with_help_and_type() {
        let v = CounterValues {
            events: 7,
            dropped: 2,
            bytes: 300,
            segments: 1,
            truncated: 4,
            write_errors: 0,
            unlinked_segments: 3,
        };
        let text = render_prometheus(&v);
        assert!(text.contains("\nlogtally_module_events_total 7\n"));
        assert!(text.contains("\nlogtally_module_dropped_total 2\n"));
        assert!(text.contains("\nlogtally_module_bytes_total 300\n"));
        assert!(text.contains("\nlogtally_module_segments_total 1\n"));
        assert!(text.contains("\nlogtally_module_truncated_values_total 4\n"));
        assert!(text.contains("\nlogtally_module_unlinked_segments_total 3\n"));
        assert_eq!(text.matches("# TYPE ").count(), 7);
        assert_eq!(text.matches("# HELP ").count(), 7);
        assert!(text.ends_with('\n'));
    }
}
