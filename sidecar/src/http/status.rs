//! What `/status` shows and what `/readyz` decides: the [`Status`] snapshot (serde
//! `Serialize`), the [`SharedStatus`] handle the run loop updates, and [`readiness`], a pure
//! function of a snapshot and `now`.
//!
//! Times are milliseconds since the Unix epoch, passed in by the caller: nothing here reads
//! a clock, so readiness is tested with made-up times.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::aggregate::{RuleTop, TopKey};
use crate::config::{Config, MetricKind, Rule};
use crate::db::{ErrorClass, StoreError};
use crate::run::missing_fields::MissingFieldStatus;
use crate::spool::tail::{self, Position};

/// Everything `/status` reports. The run loop owns the truth and copies it here as it
/// changes; the admin server only reads.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub node: String,
    /// When the daemon started (readiness grace period counts from here).
    pub started_ms: u64,
    pub flush_interval_seconds: f64,
    /// Per spool segment, keyed by file name (sorted: names start with the creation time).
    pub segments: BTreeMap<String, SegmentStatus>,
    /// Spool bytes not yet committed, all segments.
    pub lag_bytes: u64,
    /// Age of the oldest spool byte not yet committed: the larger of the oldest pending
    /// event's age and `unread_lag_seconds` (0 when everything is committed).
    pub lag_seconds: f64,
    /// How long the oldest uncommitted byte has existed by the spool folder's own look
    /// (`spool/usage.rs`: sizes seen once a second), whether or not the reader read it.
    pub unread_lag_seconds: f64,
    /// What the spool segments take on disk (allocated blocks).
    pub spool_bytes: u64,
    /// Free bytes of the spool's file system (`None` until known).
    pub spool_free_bytes: Option<u64>,
    /// Aggregate keys in memory, all rules.
    pub pending_keys: u64,
    /// Events the nginx module reported dropped (spool drop markers) since start.
    pub module_dropped_events: u64,
    /// The most recent flush attempt, whatever its outcome.
    pub last_flush: Option<FlushStatus>,
    /// When a flush last committed.
    pub last_ok_flush_ms: Option<u64>,
    pub database: DatabaseStatus,
    pub rules: Vec<RuleStatus>,
    /// Records read since start (the `logtally_events_read_total` counter).
    pub events_read: u64,
    /// Events read per second, one sample a second, oldest first, the last
    /// [`RATE_SAMPLES`] seconds.
    pub events_per_second: VecDeque<f64>,
    /// Decode errors since start (the `logtally_decode_errors_total` counter).
    pub decode_errors: u64,
    /// Approximate memory the pending aggregates hold, bytes.
    pub pending_bytes: u64,
    /// The bounds on pending state (`max_pending_keys`, `max_pending_memory`): reading
    /// pauses at whichever is reached first.
    pub max_pending_keys: u64,
    pub max_pending_bytes: u64,
    /// The last [`RECENT_FLUSHES`] flush attempts, oldest first.
    pub recent_flushes: VecDeque<FlushStatus>,
    /// Per rule (same order as `rules`): the current bucket's largest keys so far.
    pub top_keys: Vec<RuleTopStatus>,
    /// Per rule (same order as `rules`): `max_keys` and `retention`, and what they did.
    pub limits: Vec<crate::http::limits::RuleLimitsStatus>,
    /// Per (rule, field), the latest segment whose header lacks a field the rule reads.
    pub missing_fields: Vec<MissingFieldStatus>,
    /// The previous events sample (time ms, count), for the rate.
    #[serde(skip)]
    events_sampled: Option<(u64, u64)>,
}

/// Seconds of history `events_per_second` keeps.
pub const RATE_SAMPLES: usize = 300;
/// Flush attempts `recent_flushes` keeps.
pub const RECENT_FLUSHES: usize = 10;
/// Keys per rule `top_keys` shows.
pub const TOP_KEYS_SHOWN: usize = 10;

/// A rule's current bucket and its largest keys by its first `count` metric (committed plus
/// pending). Field values are attacker-controlled text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleTopStatus {
    pub table: String,
    /// The metric column keys are ranked by; `None` when the rule has no `count` metric.
    pub column: Option<String>,
    /// `false` when the rule opted out (`show_keys = false`): `keys` stays empty.
    pub shown: bool,
    /// Start of the current bucket (ms since the epoch); `None` before any event.
    pub bucket_ms: Option<i64>,
    pub keys: Vec<TopKey>,
}
/// Read and commit position in one segment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SegmentStatus {
    /// Bytes decoded so far (aggregated in memory, maybe not committed).
    pub read_offset: u64,
    /// Offset stored in the database checkpoint.
    pub committed_offset: u64,
    /// File size when last looked at.
    pub size_bytes: u64,
    /// The writer sealed it: no more bytes will come.
    pub sealed: bool,
    /// `size_bytes − committed_offset`.
    pub lag_bytes: u64,
    /// Age of the oldest uncommitted event read from this segment (0 if none).
    pub lag_seconds: f64,
    /// The header is unreadable: the segment is left alone for an operator.
    pub bad_header: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushOutcome {
    Ok,
    Error,
}

/// One flush attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlushStatus {
    /// When it finished.
    pub at_ms: u64,
    pub duration_seconds: f64,
    /// Rows upserted (0 on error: the transaction rolled back).
    pub rows: u64,
    pub outcome: FlushOutcome,
    /// The error, when the outcome is `error`.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DatabaseStatus {
    /// The last database operation succeeded.
    pub up: bool,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    /// How the daemon treats the last error: `transient` (waits), `needs_operator`
    /// (retrying alone cannot fix it; the daemon keeps retrying), `fatal` (it stops).
    pub last_error_class: Option<ErrorClass>,
}

/// A rule as configured, for operators reading `/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleStatus {
    pub table: String,
    pub bucket_seconds: f64,
    pub group_by: Vec<String>,
    /// Metric columns in the configured order.
    pub metrics: Vec<RuleMetricStatus>,
}

/// One metric column of a rule and its aggregate, e.g. `bytes` = `sum(bytes)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleMetricStatus {
    pub column: String,
    pub aggregate: String,
}

impl From<&Rule> for RuleStatus {
    fn from(rule: &Rule) -> Self {
        let metrics = rule
            .metrics
            .iter()
            .map(|m| RuleMetricStatus {
                column: m.column.clone(),
                aggregate: m.kind.to_string(),
            })
            .collect();
        RuleStatus {
            table: rule.table.clone(),
            bucket_seconds: rule.bucket.as_secs_f64(),
            group_by: rule.group_by.clone(),
            metrics,
        }
    }
}

impl Status {
    /// The state at start: no flush yet, database not yet known to be up.
    pub fn new(node: &str, flush_interval: Duration, rules: &[Rule], started_ms: u64) -> Self {
        Status {
            version: env!("CARGO_PKG_VERSION"),
            node: node.to_string(),
            started_ms,
            flush_interval_seconds: flush_interval.as_secs_f64(),
            segments: BTreeMap::new(),
            lag_bytes: 0,
            lag_seconds: 0.0,
            unread_lag_seconds: 0.0,
            spool_bytes: 0,
            spool_free_bytes: None,
            pending_keys: 0,
            module_dropped_events: 0,
            last_flush: None,
            last_ok_flush_ms: None,
            database: DatabaseStatus::default(),
            rules: rules.iter().map(RuleStatus::from).collect(),
            events_read: 0,
            events_per_second: VecDeque::new(),
            decode_errors: 0,
            pending_bytes: 0,
            max_pending_keys: crate::config::DEFAULT_MAX_PENDING_KEYS as u64,
            max_pending_bytes: crate::config::DEFAULT_MAX_PENDING_MEMORY,
            recent_flushes: VecDeque::new(),
            top_keys: rules
                .iter()
                .map(|r| RuleTopStatus {
                    table: r.table.clone(),
                    column: r
                        .metrics
                        .iter()
                        .find(|m| m.kind == MetricKind::Count)
                        .map(|m| m.column.clone()),
                    shown: true,
                    bucket_ms: None,
                    keys: Vec::new(),
                })
                .collect(),
            limits: rules
                .iter()
                .map(|r| {
                    crate::http::limits::RuleLimitsStatus::new(
                        r,
                        &crate::config::RuleLimits::default(),
                    )
                })
                .collect(),
            missing_fields: Vec::new(),
            events_sampled: None,
        }
    }

    /// [`Status::new`] from a whole configuration.
    pub fn from_config(config: &Config, started_ms: u64) -> Self {
        let mut status = Status::new(
            &config.node,
            config.flush_interval,
            &config.rules,
            started_ms,
        );
        for top in &mut status.top_keys {
            top.shown = !config.hide_keys.contains(&top.table);
        }
        for (s, (rule, limits)) in status
            .limits
            .iter_mut()
            .zip(config.rules.iter().zip(&config.limits))
        {
            *s = crate::http::limits::RuleLimitsStatus::new(rule, limits);
        }
        status.max_pending_keys = config.max_pending_keys as u64;
        status.max_pending_bytes = config.max_pending_memory;
        status
    }

    /// Records the events counter once a second: appends the rate since the previous
    /// sample to `events_per_second` (dropping the oldest past [`RATE_SAMPLES`]).
    pub fn sample_events(&mut self, now_ms: u64, events_read: u64, decode_errors: u64) {
        if let Some((at, count)) = self.events_sampled {
            let seconds = now_ms.saturating_sub(at) as f64 / 1000.0;
            if seconds > 0.0 {
                let rate = events_read.saturating_sub(count) as f64 / seconds;
                if self.events_per_second.len() == RATE_SAMPLES {
                    self.events_per_second.pop_front();
                }
                self.events_per_second
                    .push_back((rate * 10.0).round() / 10.0);
            }
        }
        self.events_sampled = Some((now_ms, events_read));
        self.events_read = events_read;
        self.decode_errors = decode_errors;
    }

    /// Replaces the top keys from the reader's view (one [`RuleTop`] per rule, in order);
    /// rules that opted out keep showing nothing.
    pub fn set_top_keys(&mut self, tops: &[RuleTop]) {
        for (status, top) in self.top_keys.iter_mut().zip(tops) {
            if status.shown {
                status.bucket_ms = top.bucket_ms;
                status.keys.clone_from(&top.keys);
                status.keys.truncate(TOP_KEYS_SHOWN);
            }
        }
    }

    /// Records a finished flush attempt. A committed flush also proves the database up.
    pub fn record_flush(&mut self, flush: FlushStatus) {
        match flush.outcome {
            FlushOutcome::Ok => {
                self.last_ok_flush_ms = Some(flush.at_ms);
                self.database.up = true;
            }
            FlushOutcome::Error => {
                self.database.up = false;
                self.database.last_error = flush.error.clone();
                self.database.last_error_ms = Some(flush.at_ms);
            }
        }
        if self.recent_flushes.len() == RECENT_FLUSHES {
            self.recent_flushes.pop_front();
        }
        self.recent_flushes.push_back(flush.clone());
        self.last_flush = Some(flush);
    }

    /// Records the outcome of a database operation other than a flush (connect, ping).
    pub fn record_database(&mut self, now_ms: u64, result: Result<(), String>) {
        match result {
            Ok(()) => self.database.up = true,
            Err(e) => {
                self.database.up = false;
                self.database.last_error = Some(e);
                self.database.last_error_ms = Some(now_ms);
            }
        }
    }

    /// Records a failed database operation with its class.
    pub fn record_database_error(&mut self, now_ms: u64, error: &StoreError) {
        self.record_database(now_ms, Err(error.to_string()));
        self.database.last_error_class = Some(error.class());
    }

    /// Replaces the per-segment view and the lag totals from the tailer's segments
    /// ([`crate::spool::tail::Tailer::segments`]), the committed checkpoint (segment → position) and,
    /// per segment, the time of the oldest event read but not yet committed.
    pub fn sync_segments(
        &mut self,
        read: &[tail::SegmentStatus],
        committed: &HashMap<String, Position>,
        oldest_pending_ms: &HashMap<String, u64>,
        now_ms: u64,
    ) {
        self.segments = read
            .iter()
            .map(|seg| {
                let committed_offset = committed.get(&seg.name).map_or(0, |p| p.offset);
                let lag_seconds = oldest_pending_ms
                    .get(&seg.name)
                    .map_or(0.0, |t| now_ms.saturating_sub(*t) as f64 / 1000.0);
                let status = SegmentStatus {
                    read_offset: seg.position.offset,
                    committed_offset,
                    size_bytes: seg.size,
                    sealed: seg.position.finished,
                    lag_bytes: seg.size.saturating_sub(committed_offset),
                    lag_seconds,
                    bad_header: seg.bad_header,
                };
                (seg.name.clone(), status)
            })
            .collect();
        self.recompute_lag();
    }

    /// Recomputes the totals (`lag_bytes`, `lag_seconds`) from the per-segment values and
    /// the spool folder's own clock (`unread_lag_seconds`).
    pub fn recompute_lag(&mut self) {
        self.lag_bytes = self.segments.values().map(|s| s.lag_bytes).sum();
        self.lag_seconds = self
            .segments
            .values()
            .map(|s| s.lag_seconds)
            .fold(self.unread_lag_seconds, f64::max);
    }
}

/// Why the sidecar is not ready (the `/readyz` 503 body).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotReady {
    #[error("database unreachable: {}", .0.as_deref().unwrap_or("not connected yet"))]
    DatabaseDown(Option<String>),
    #[error("no successful flush for {since_seconds:.1}s (limit {limit_seconds:.1}s)")]
    FlushStale {
        since_seconds: f64,
        limit_seconds: f64,
    },
}

/// How many flush intervals may pass without a committed flush before the sidecar reports
/// not ready (also the grace period after start).
pub const READY_FLUSH_INTERVALS: u32 = 3;

/// Ready iff the database is reachable AND a flush committed within the last
/// [`READY_FLUSH_INTERVALS`] flush intervals. Right after start, before any flush had the
/// chance to commit, the same window counts from `started_ms` instead.
///
/// The run loop must therefore attempt a flush every interval even when nothing is pending
/// (an empty flush that only touches the database), or an idle sidecar goes unready.
pub fn readiness(status: &Status, now_ms: u64) -> Result<(), NotReady> {
    if !status.database.up {
        return Err(NotReady::DatabaseDown(status.database.last_error.clone()));
    }
    let limit_ms =
        (status.flush_interval_seconds * 1000.0 * f64::from(READY_FLUSH_INTERVALS)).round() as u64;
    let since = status.last_ok_flush_ms.unwrap_or(status.started_ms);
    let age_ms = now_ms.saturating_sub(since);
    if age_ms > limit_ms {
        return Err(NotReady::FlushStale {
            since_seconds: age_ms as f64 / 1000.0,
            limit_seconds: limit_ms as f64 / 1000.0,
        });
    }
    Ok(())
}

/// The status shared between the run loop (writer) and the admin server (readers).
/// A std `RwLock`: every critical section is a short copy, never held across `.await`.
#[derive(Debug, Clone)]
pub struct SharedStatus(Arc<RwLock<Status>>);

impl SharedStatus {
    pub fn new(status: Status) -> Self {
        SharedStatus(Arc::new(RwLock::new(status)))
    }

    /// Changes the status in place.
    pub fn update<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        // A panic while holding the lock cannot leave a Status half-valid in a way that
        // matters for reporting, so a poisoned lock is still used.
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> Status {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// [`readiness`] of the current status.
    pub fn readiness(&self, now_ms: u64) -> Result<(), NotReady> {
        readiness(&self.0.read().unwrap_or_else(|e| e.into_inner()), now_ms)
    }
}

#[cfg(test)]
mod tests;
