//! `max_keys` and `retention` on the event path: which keys a node admits into a bucket,
//! and which events are too old to write. Pure: no I/O, no clock (the reader passes `now`).
//!
//! **Admission.** Per rule and bucket a node admits at most `max_keys` keys; an event of a
//! key not admitted goes to the bucket's overflow row (every `group_by` column holds the
//! rule's `overflow_label`). The aggregator asks only when a key is not pending already, so
//! the cost is on a key's first event of a batch, never on the events after it.
//!
//! What a node admitted must survive flushes and restarts, and must never be read from the
//! database on the event path. So [`Admission`] keeps, per bucket, the set of the admitted
//! keys' 64-bit hashes (MurmurHash3 of the key's encoded dims, stable across versions and
//! machines) in memory; the hashes admitted since the last drain travel with the drained
//! rows ([`AdmittedDelta`]) and the store commits them in the flush's transaction, into
//! `logtally_admitted_keys`. At start the node loads its rows back ([`Admission::restore`]).
//! Committing with the aggregates is what keeps it exact: a batch that never commits takes
//! its admissions with it, and the events are read again after a restart and admitted again.
//!
//! Why hashes and not a count or a per-row owner column: a count alone cannot tell an
//! admitted key from a new one after a restart; the rule's table cannot either (other nodes
//! write the same rows, and reading it would put a query on the event path). 8 bytes per key
//! are cheap to keep, to write (one `bytea` of the new hashes per bucket and flush) and to
//! load. Two keys whose hashes collide count as one admitted key (the second gets its own
//! row past the limit): at 100,000 keys the chance of any collision is about 3·10⁻¹⁰.
//!
//! **Horizon.** State is kept for the buckets starting at or after `newest − horizon`, where
//! `newest` is the newest bucket this node admitted a key into (event time, not the clock:
//! catching up after an outage keeps state for the buckets it is reading) and the horizon is
//! [`admission_horizon`]: one bucket, at least an hour, at most the rule's retention. Older
//! buckets' state is dropped, in memory and (with the next flush) in the database, so it does
//! not grow without bound; a late event for such a bucket goes to the overflow row (its
//! total stays exact, and a flood of late junk keys cannot grow the table). After a restart
//! the oldest bucket loaded is the floor: older buckets may have had state, so they are
//! treated as dropped.
//!
//! The key a request itself sends as the overflow key (every field equal to
//! `overflow_label`) is always let through and not counted against `max_keys`: it is the
//! overflow row, so a bucket still holds at most nodes × `max_keys` + 1 rows.
//!
//! **Expiry.** With `retention`, an event whose bucket starts before `now − retention` is
//! counted and not written ([`expire_before`]): the row it would add to is one the retention
//! task deletes. Later events of an older bucket within retention add to their own bucket.

use std::time::Duration;

use hashbrown::{HashMap, HashSet};

use crate::config::RuleLimits;

/// The shortest admission horizon (see the module documentation).
pub const MIN_ADMISSION_HORIZON: Duration = Duration::from_secs(3600);

/// How far behind the newest bucket a rule keeps admitted state: one bucket, at least
/// [`MIN_ADMISSION_HORIZON`], at most its retention (state of expired buckets is useless).
pub fn admission_horizon(bucket: Duration, retention: Option<Duration>) -> Duration {
    let h = bucket.max(MIN_ADMISSION_HORIZON);
    match retention {
        Some(r) => h.min(r),
        None => h,
    }
}

/// The first bucket start still written at `now_ms`: buckets starting before it are past
/// retention. `i64::MIN` (nothing expires) without retention.
pub fn expire_before(now_ms: i64, retention: Option<Duration>) -> i64 {
    match retention {
        Some(r) => now_ms.saturating_sub(i64::try_from(r.as_millis()).unwrap_or(i64::MAX)),
        None => i64::MIN,
    }
}

/// Whether an event of the bucket starting at `bucket_ms` is past retention.
#[inline]
pub fn is_expired(bucket_ms: i64, expire_before: i64) -> bool {
    bucket_ms < expire_before
}

/// The stable hash admission keeps of a key: its encoded dims (after the 8 bucket bytes).
#[inline]
pub fn key_hash(dims: &[u8]) -> u64 {
    super::hll::hash(dims)
}

/// What admission decided for a key that is not pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Its own row: admitted now or before.
    Admit,
    /// The bucket is full (or its state was dropped): the overflow row.
    Overflow,
}

#[derive(Debug, Default, Clone)]
struct BucketKeys {
    admitted: HashSet<u64>,
    /// Admitted since the last [`Admission::take_delta`], in admission order.
    fresh: Vec<u64>,
}

/// The admissions to commit with a drained batch of one rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmittedDelta {
    /// Per bucket (ascending), the hashes admitted since the previous drain.
    pub chunks: Vec<(i64, Vec<u64>)>,
    /// State of buckets starting before this was dropped: delete it in the database too.
    pub drop_before: Option<i64>,
}

impl AdmittedDelta {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.drop_before.is_none()
    }
}

/// One rule's admitted keys per bucket. See the module documentation.
#[derive(Debug, Clone)]
pub struct Admission {
    max_keys: usize,
    horizon_ms: i64,
    buckets: HashMap<i64, BucketKeys>,
    /// The newest bucket a key was admitted into.
    newest: Option<i64>,
    /// Buckets starting before it hold no state: nothing more is admitted there.
    floor: i64,
    /// A drop not yet handed over by [`take_delta`](Self::take_delta).
    dropped_before: Option<i64>,
}

impl Admission {
    /// `None` for a rule without `max_keys`.
    pub fn for_rule(bucket: Duration, limits: &RuleLimits) -> Option<Admission> {
        let max_keys = limits.max_keys?;
        let horizon = admission_horizon(bucket, limits.retention);
        Some(Admission::new(
            max_keys,
            i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX),
        ))
    }

    pub fn new(max_keys: usize, horizon_ms: i64) -> Admission {
        Admission {
            max_keys,
            horizon_ms,
            buckets: HashMap::new(),
            newest: None,
            floor: i64::MIN,
            dropped_before: None,
        }
    }

    /// Decides for a key (by [`key_hash`]) that is not pending in `bucket`.
    pub fn decide(&mut self, bucket: i64, hash: u64) -> Decision {
        if bucket < self.floor {
            return Decision::Overflow;
        }
        let max_keys = self.max_keys;
        let keys = self.buckets.entry(bucket).or_default();
        if keys.admitted.contains(&hash) {
            return Decision::Admit;
        }
        if keys.admitted.len() >= max_keys {
            return Decision::Overflow;
        }
        keys.admitted.insert(hash);
        keys.fresh.push(hash);
        if self.newest.is_none_or(|n| bucket > n) {
            self.newest = Some(bucket);
            self.drop_old(bucket.saturating_sub(self.horizon_ms));
        }
        Decision::Admit
    }

    fn drop_old(&mut self, floor: i64) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        self.buckets.retain(|&b, _| b >= floor);
        self.dropped_before = Some(floor);
    }

    /// Keys admitted into `bucket` (0 when it holds no state).
    pub fn admitted(&self, bucket: i64) -> usize {
        self.buckets.get(&bucket).map_or(0, |k| k.admitted.len())
    }

    /// Buckets holding state.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Hashes held, all buckets (memory is about 16 bytes each).
    pub fn keys_held(&self) -> usize {
        self.buckets.values().map(|k| k.admitted.len()).sum()
    }

    /// The admissions since the previous call, to commit with the rows drained now.
    pub fn take_delta(&mut self) -> AdmittedDelta {
        let mut chunks: Vec<(i64, Vec<u64>)> = self
            .buckets
            .iter_mut()
            .filter(|(_, k)| !k.fresh.is_empty())
            .map(|(&b, k)| (b, std::mem::take(&mut k.fresh)))
            .collect();
        chunks.sort_unstable_by_key(|c| c.0);
        AdmittedDelta {
            chunks,
            drop_before: self.dropped_before.take(),
        }
    }

    /// Loads what the database holds for this node (every row of the rule, any order), before
    /// the first event. The oldest bucket loaded becomes the floor.
    pub fn restore(&mut self, chunks: impl IntoIterator<Item = (i64, Vec<u64>)>) {
        for (bucket, hashes) in chunks {
            let keys = self.buckets.entry(bucket).or_default();
            keys.admitted.extend(hashes);
        }
        if let Some(&oldest) = self.buckets.keys().min() {
            self.floor = oldest;
        }
        self.newest = self.buckets.keys().max().copied();
        if let Some(newest) = self.newest {
            let floor = newest.saturating_sub(self.horizon_ms);
            if floor > self.floor {
                self.drop_old(floor);
            }
        }
    }
}

#[cfg(test)]
mod tests;
