//! The sidecar's Prometheus metrics: one [`Metrics`] value owning its own `Registry` and a
//! typed handle per metric, built once at start and shared by `Arc`.
//!
//! No global (`lazy_static!`) metrics: tests build as many independent registries as they
//! like, and everything exported is visible here in one place. Names carry the `logtally_`
//! prefix and their unit (`_seconds`, `_bytes`, `_total` for counters); `docs/metrics.md`
//! explains each one.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use std::sync::Mutex;

use crate::aggregate::RuleCounters;
use crate::config::Rule;
use crate::spool::tail::TailStats;

/// Flush duration buckets (seconds): a healthy flush is milliseconds, a struggling database
/// pushes it to seconds, and the retry backoff caps what one attempt can take.
const FLUSH_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric the sidecar exports. Fields are the handles to update; the registry is
/// private so nothing registers behind this struct's back.
pub struct Metrics {
    registry: Registry,
    /// Event records decoded from the spool.
    pub events_read: IntCounter,
    /// Corrupt frames skipped (bad CRC, bad length, undecodable payload).
    pub decode_errors: IntCounter,
    /// Bytes skipped while resynchronising past corrupt frames.
    pub corrupt_bytes: IntCounter,
    /// Times the reader found an incomplete frame at the end of an unsealed segment and
    /// waited for the writer to finish it.
    pub torn_tail_waits: IntCounter,
    /// Events the nginx module dropped (full queue, write error), from spool drop markers.
    pub module_dropped_events: IntCounter,
    /// Flushes that committed.
    pub flushes_ok: IntCounter,
    /// Flush attempts that failed (the aggregates stay pending and are retried).
    pub flushes_error: IntCounter,
    /// Wall time of one flush attempt, committed or not.
    pub flush_duration: Histogram,
    /// Rows upserted per rule (label `rule` = the rule's table).
    pub rows_upserted: IntCounterVec,
    /// Field values a sum/min/max could not parse as a decimal (labels `rule`, `metric`).
    pub bad_values: IntCounterVec,
    /// Segments whose header lacks a field a rule reads (labels `rule`, `field`).
    pub missing_field_segments: IntCounterVec,
    /// Database operations that failed (connect, query, commit).
    pub database_errors: IntCounter,
    /// Bytes in the spool not yet committed (sum over segments of size − committed offset).
    pub lag_bytes: IntGauge,
    /// Age of the oldest spool byte not yet committed (read or not); 0 when none waits.
    pub lag_seconds: Gauge,
    /// What the spool segments take on disk.
    pub spool_bytes: IntGauge,
    /// Free bytes of the spool's file system.
    pub spool_free_bytes: IntGauge,
    /// Aggregate keys held in memory, all rules together.
    pub pending_keys: IntGauge,
    /// Estimated bytes of the pending aggregates, sketches included.
    pub pending_bytes: IntGauge,
    /// Spool segments the reader currently tracks.
    pub segments_open: IntGauge,
    /// Sealed, fully committed segments removed from the spool.
    pub segments_deleted: IntCounter,
    /// Checkpoint records appended (and fsynced) to the local binlog.
    pub binlog_writes: IntCounter,
    /// 1 while the database is reachable (last operation succeeded), else 0.
    pub database_up: IntGauge,
    /// 1 if `/readyz` would answer 200, else 0. Set by the admin server at each scrape
    /// (readiness depends on the time of asking), so alerts can use it.
    pub ready: IntGauge,
    /// The tailer totals last folded into the counters (see [`Metrics::sync_tail`]).
    tail_seen: Mutex<TailStats>,
    /// Events a rule's `where` left out (label `rule`).
    pub filtered_events: IntCounterVec,
    /// Comparisons in conditions that met a non-number (label `rule`).
    pub condition_bad_values: IntCounterVec,
    /// Values left out of a sum that would overflow (label `rule`).
    pub sum_overflows: IntCounterVec,
    /// Events skipped because PostgreSQL cannot store their time (after year 9999).
    pub bad_time_events: IntCounter,
    /// Events of keys past `max_keys`, added to the overflow row (label `rule`).
    pub overflow_events: IntCounterVec,
    /// Events whose bucket is past `retention`, not written (label `rule`).
    pub expired_events: IntCounterVec,
    /// Rows the retention task deleted (label `rule`).
    pub retention_deleted_rows: IntCounterVec,
    /// The aggregator totals last folded in (see [`Metrics::sync_aggregates`]).
    aggregates_seen: Mutex<(Vec<RuleCounters>, u64)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Builds and registers every metric, plus the process collector (CPU, memory, open
    /// file descriptors of this process, where the platform supports it).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let int_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };

        let events_read = counter(
            "logtally_events_read_total",
            "Event records read from the spool.",
        )?;
        let decode_errors = counter(
            "logtally_decode_errors_total",
            "Corrupt spool frames skipped (bad CRC, length or payload).",
        )?;
        let corrupt_bytes = counter(
            "logtally_corrupt_bytes_total",
            "Spool bytes skipped while resynchronising past corrupt frames.",
        )?;
        let torn_tail_waits = counter(
            "logtally_torn_tail_waits_total",
            "Times the reader met an incomplete frame at the end of an open segment and waited.",
        )?;
        let module_dropped_events = counter(
            "logtally_module_dropped_events_total",
            "Events the nginx module dropped, as reported by spool drop markers.",
        )?;
        let flushes = IntCounterVec::new(
            Opts::new(
                "logtally_flushes_total",
                "Flush attempts by outcome (ok, error).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(flushes.clone()))?;
        // Both series exist from the start so `rate()` and alerts see a 0, not a gap.
        let flushes_ok = flushes.with_label_values(&["ok"]);
        let flushes_error = flushes.with_label_values(&["error"]);
        let flush_duration = Histogram::with_opts(
            HistogramOpts::new(
                "logtally_flush_duration_seconds",
                "Wall time of one flush attempt (upserts, checkpoint, commit).",
            )
            .buckets(FLUSH_DURATION_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(flush_duration.clone()))?;
        let rows_upserted = IntCounterVec::new(
            Opts::new(
                "logtally_rows_upserted_total",
                "Aggregate rows upserted, per rule table.",
            ),
            &["rule"],
        )?;
        registry.register(Box::new(rows_upserted.clone()))?;
        let bad_values = IntCounterVec::new(
            Opts::new(
                "logtally_bad_values_total",
                "Field values a sum/min/max metric could not parse as a decimal.",
            ),
            &["rule", "metric"],
        )?;
        registry.register(Box::new(bad_values.clone()))?;
        let missing_field_segments = IntCounterVec::new(
            Opts::new(
                "logtally_missing_field_segments_total",
                "Spool segments whose header lacks a field the rule reads (read as absent).",
            ),
            &["rule", "field"],
        )?;
        registry.register(Box::new(missing_field_segments.clone()))?;
        let database_errors = counter(
            "logtally_database_errors_total",
            "Failed database operations.",
        )?;
        let lag_bytes = int_gauge(
            "logtally_lag_bytes",
            "Spool bytes written but not yet committed to the database.",
        )?;
        let lag_seconds = Gauge::new(
            "logtally_lag_seconds",
            "Age of the oldest spool byte not yet committed, read or not (0 when none waits).",
        )?;
        registry.register(Box::new(lag_seconds.clone()))?;
        let spool_bytes = int_gauge(
            "logtally_spool_bytes",
            "Bytes the spool segments take on disk (allocated blocks).",
        )?;
        let spool_free_bytes = int_gauge(
            "logtally_spool_free_bytes",
            "Free bytes of the spool folder's file system (statvfs f_bavail).",
        )?;
        let pending_keys = int_gauge(
            "logtally_pending_keys",
            "Aggregate keys held in memory, all rules: pending and being committed \
             (what max_pending_keys bounds).",
        )?;
        let pending_bytes = int_gauge(
            "logtally_pending_bytes",
            "Estimated bytes of the aggregates held in memory (sketches included), all rules: \
             pending and being committed (what max_pending_memory bounds).",
        )?;
        let segments_open = int_gauge(
            "logtally_segments_open",
            "Spool segments the reader is tracking.",
        )?;
        let segments_deleted = counter(
            "logtally_segments_deleted_total",
            "Sealed, fully committed spool segments deleted.",
        )?;
        let binlog_writes = counter(
            "logtally_binlog_writes_total",
            "Checkpoint records appended and fsynced to the local binlog.",
        )?;
        let database_up = int_gauge(
            "logtally_database_up",
            "1 if the last database operation succeeded, else 0.",
        )?;
        let ready = int_gauge(
            "logtally_ready",
            "1 if the sidecar is ready (database up, flushes committing), else 0.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "logtally_build_info",
                "Always 1; the label carries the sidecar version.",
            ),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let per_rule = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &["rule"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let filtered_events = per_rule(
            "logtally_filtered_events_total",
            "Events a rule's `where` did not match (not aggregated).",
        )?;
        let condition_bad_values = per_rule(
            "logtally_condition_bad_values_total",
            "Comparisons in a rule's conditions that needed a number and met a non-number.",
        )?;
        let sum_overflows = per_rule(
            "logtally_sum_overflows_total",
            "Values left out of a sum because adding them would overflow.",
        )?;
        let overflow_events = per_rule(
            "logtally_overflow_events_total",
            "Events of keys past a rule's max_keys, added to the bucket's overflow row.",
        )?;
        let expired_events = per_rule(
            "logtally_expired_events_total",
            "Events whose bucket is past a rule's retention (not written).",
        )?;
        let retention_deleted_rows = per_rule(
            "logtally_retention_deleted_rows_total",
            "Rows past a rule's retention deleted by this sidecar.",
        )?;
        let bad_time_events = counter(
            "logtally_bad_time_events_total",
            "Events skipped because their time is past year 9999 (PostgreSQL cannot store it).",
        )?;

        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Metrics {
            registry,
            events_read,
            decode_errors,
            corrupt_bytes,
            torn_tail_waits,
            module_dropped_events,
            flushes_ok,
            flushes_error,
            flush_duration,
            rows_upserted,
            bad_values,
            missing_field_segments,
            database_errors,
            lag_bytes,
            lag_seconds,
            spool_bytes,
            spool_free_bytes,
            pending_keys,
            pending_bytes,
            segments_open,
            segments_deleted,
            binlog_writes,
            database_up,
            ready,
            tail_seen: Mutex::new(TailStats::default()),
            filtered_events,
            condition_bad_values,
            sum_overflows,
            bad_time_events,
            overflow_events,
            expired_events,
            retention_deleted_rows,
            aggregates_seen: Mutex::new((Vec::new(), 0)),
        })
    }

    /// Creates the per-rule series at 0 so every rule shows up before its first flush
    /// (an absent series and a zero one differ for `rate()` and `absent()`).
    pub fn init_rules(&self, rules: &[Rule]) {
        use crate::config::MetricKind;
        for rule in rules {
            self.rows_upserted.with_label_values(&[rule.table.as_str()]);
            for c in [
                &self.filtered_events,
                &self.condition_bad_values,
                &self.sum_overflows,
                &self.overflow_events,
                &self.expired_events,
                &self.retention_deleted_rows,
            ] {
                c.with_label_values(&[rule.table.as_str()]);
            }
            for m in &rule.metrics {
                if !matches!(m.kind, MetricKind::Count) {
                    self.bad_values
                        .with_label_values(&[rule.table.as_str(), m.column.as_str()]);
                }
            }
        }
    }

    /// Brings the spool-reading counters up to a tailer's cumulative totals
    /// ([`crate::spool::tail::Tailer::stats`]): call it after each poll. Counters move by the
    /// difference since the previous call; totals that went down (a new tailer) count from 0.
    pub fn sync_tail(&self, now: &TailStats) {
        let mut seen = self.tail_seen.lock().unwrap_or_else(|e| e.into_inner());
        let delta = |new: u64, old: u64| if new >= old { new - old } else { new };
        self.events_read.inc_by(delta(now.events, seen.events));
        self.decode_errors
            .inc_by(delta(now.corrupt_occurrences, seen.corrupt_occurrences));
        self.corrupt_bytes
            .inc_by(delta(now.corrupt_bytes, seen.corrupt_bytes));
        self.torn_tail_waits
            .inc_by(delta(now.torn_tail_waits, seen.torn_tail_waits));
        self.module_dropped_events
            .inc_by(delta(now.dropped_events, seen.dropped_events));
        self.segments_deleted
            .inc_by(delta(now.deleted_segments, seen.deleted_segments));
        *seen = *now;
    }

    /// Brings the per-rule aggregation counters up to an aggregator's cumulative totals
    /// ([`Aggregator::rule_counters`](crate::aggregate::Aggregator::rule_counters), in rule
    /// order, and its `bad_times`): call it after each poll, as [`sync_tail`](Metrics::sync_tail).
    pub fn sync_aggregates(&self, rules: &[Rule], now: &[RuleCounters], bad_times: u64) {
        let mut seen = self
            .aggregates_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let delta = |new: u64, old: u64| if new >= old { new - old } else { new };
        let zero = RuleCounters::default();
        for (i, (rule, c)) in rules.iter().zip(now).enumerate() {
            let old = seen.0.get(i).unwrap_or(&zero);
            let label = [rule.table.as_str()];
            self.filtered_events
                .with_label_values(&label)
                .inc_by(delta(c.outside, old.outside));
            self.condition_bad_values
                .with_label_values(&label)
                .inc_by(delta(c.bad_conditions, old.bad_conditions));
            self.sum_overflows
                .with_label_values(&label)
                .inc_by(delta(c.overflows, old.overflows));
            self.overflow_events
                .with_label_values(&label)
                .inc_by(delta(c.overflow_events, old.overflow_events));
            self.expired_events
                .with_label_values(&label)
                .inc_by(delta(c.expired_events, old.expired_events));
        }
        self.bad_time_events.inc_by(delta(bad_times, seen.1));
        *seen = (now.to_vec(), bad_times);
    }

    /// Counts rows upserted for one rule (by its table name).
    pub fn add_rows_upserted(&self, table: &str, rows: u64) {
        self.rows_upserted.with_label_values(&[table]).inc_by(rows);
    }

    /// Counts unparsable values of one metric column of one rule.
    pub fn add_missing_field_segment(&self, table: &str, field: &str) {
        self.missing_field_segments
            .with_label_values(&[table, field])
            .inc();
    }

    pub fn add_bad_values(&self, table: &str, column: &str, n: u64) {
        self.bad_values
            .with_label_values(&[table, column])
            .inc_by(n);
    }

    /// The flush counter for an outcome label, for callers holding the outcome as data.
    pub fn flushes(&self, ok: bool) -> &IntCounter {
        if ok {
            &self.flushes_ok
        } else {
            &self.flushes_error
        }
    }

    /// The whole registry in the Prometheus text format: `(content type, body)`.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut body = Vec::with_capacity(8 * 1024);
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut body) {
            // Only a malformed metric family can fail here (writing to a Vec cannot); serve
            // what was encoded so a scrape still sees the rest.
            tracing::warn!(%error, "encoding metrics");
        }
        (encoder.format_type().to_string(), body)
    }
}

#[cfg(test)]
mod tests;
