//! `/status`'s per-rule limits: `max_keys` (overflow events, admitted state held) and
//! `retention` (expired events, the retention task's last run). Updated by the run loop
//! from the reader's counters and by the retention task.

use serde::Serialize;

use crate::aggregate::RuleCounters;
use crate::config::{Rule, RuleLimits};

/// One rule's limits and what they did since start.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RuleLimitsStatus {
    pub table: String,
    /// `None`: no limit.
    pub max_keys: Option<usize>,
    pub overflow_label: String,
    /// `None`: rows are kept for ever.
    pub retention_seconds: Option<f64>,
    /// Events of keys past `max_keys`, added to the overflow row.
    pub overflow_events: u64,
    /// Events whose bucket was past retention (not written).
    pub expired_events: u64,
    /// Buckets and key hashes of admitted state held in memory (`max_keys` only).
    pub admitted_buckets: u64,
    pub admitted_keys: u64,
    pub retention: RetentionStatus,
}

/// The retention task's work on one rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetentionStatus {
    /// When a pass last finished (ms since the epoch), whatever its outcome.
    pub last_run_ms: Option<u64>,
    /// Rows the last pass deleted.
    pub last_deleted_rows: u64,
    /// Rows deleted since start.
    pub deleted_rows: u64,
    /// The last pass found another sidecar holding the rule's retention lock and skipped.
    pub last_skipped_locked: bool,
    pub last_error: Option<String>,
}

impl RuleLimitsStatus {
    pub fn new(rule: &Rule, limits: &RuleLimits) -> Self {
        RuleLimitsStatus {
            table: rule.table.clone(),
            max_keys: limits.max_keys,
            overflow_label: limits.overflow_label.clone(),
            retention_seconds: limits.retention.map(|d| d.as_secs_f64()),
            ..Default::default()
        }
    }
}

/// Copies the reader's cumulative counters and admitted state sizes (rule order).
pub fn sync_limits(
    status: &mut [RuleLimitsStatus],
    counters: &[RuleCounters],
    held: &[Option<(usize, usize)>],
) {
    for (i, s) in status.iter_mut().enumerate() {
        if let Some(c) = counters.get(i) {
            s.overflow_events = c.overflow_events;
            s.expired_events = c.expired_events;
        }
        if let Some(Some((buckets, keys))) = held.get(i) {
            s.admitted_buckets = *buckets as u64;
            s.admitted_keys = *keys as u64;
        }
    }
}
