//! Aggregation: a pure function of records and rules — no I/O, no clock.
//!
//! What a flush hands to the store: [`RuleRows`] of [`Row`]s (tests, tools), or the
//! [`DrainedRows`] the daemon drains, the same rows in the aggregator's compact form, built
//! into [`Row`]s a chunk at a time. Files:
//! - `mod.rs`: the [`Aggregator`] (layouts, the per-rule state, drains);
//! - `add.rs`: the event path (conditions, key lookup, accumulators);
//! - `sketch_ops.rs`: sketch inserts, queued and applied a batch at a time;
//! - `decimal.rs`: [`Decimal`], how a field value becomes an exact number;
//! - `key.rs`: the encoded `(bucket, dims)` key in the key arena;
//! - `drained.rs`: [`DrainedRows`];
//! - `merge.rs`: [`merge_rows`], the pure model of the store's additive upsert;
//! - `admission.rs`: `max_keys` (which keys a node admits per bucket, the overflow row) and
//!   `retention` (which events are too old to write), set with [`Aggregator::with_limits`].
//!
//! - `numeric_list.rs`: [`read_number`](numeric_list::read_number), the one rule by which a
//!   field value reads as a number (lists such as `0.1, 0.2` included);
//! - `hll.rs`: [`Hll`](hll::Hll), the `distinct(f)` sketch (postgresql-hll's bytes);
//! - `quantiles.rs`: [`Quantiles`](quantiles::Quantiles), the `quantiles(f)` sketch.
//!
//! How records become rows:
//! - a segment header's field list is mapped to each rule's field indices once
//!   ([`Aggregator::layout`], or [`Aggregator::add_cached`] which caches the layout of the
//!   segment being read); records are then grouped by `(bucket, dims)` where the bucket is
//!   the event time floored to the rule's bucket (aligned on the Unix epoch);
//! - a dim's value is the field's bytes as UTF-8: invalid sequences become U+FFFD and NUL bytes
//!   are removed (PostgreSQL `text` cannot hold NUL). Absent fields, fields the segment does
//!   not declare and empty values are all the empty string. Two raw values that normalise to
//!   the same text share a row;
//! - a rule's `where` is evaluated first: events it does not match are not aggregated and
//!   are counted ([`RuleCounters::outside`]); a metric's own `where` decides whether the event
//!   counts in that metric (the row exists either way). A comparison that needed a number and
//!   met a non-number is counted ([`RuleCounters::bad_conditions`]);
//! - a numeric metric's field is read by [`read_number`](numeric_list::read_number) (`max`
//!   reads a list's largest number, `min` its smallest, `sum` and `quantiles` its sum).
//!   Absent, undeclared or empty values are "no value" (not counted anywhere); any other
//!   unparsable value, such as nginx's `-` for a missing upstream time, is a *bad value*:
//!   counted per metric ([`Aggregator::bad_values`]), never an error. A sum that would
//!   overflow `i128` is not wrapped: the value is left out and counted per rule
//!   ([`RuleCounters::overflows`]). `sum` adds valid values (0 when there are none),
//!   `min`/`max` are `None` when no event of the row had a valid value;
//! - `distinct(f)` adds the field's raw bytes (non-empty values) to the row's [`Hll`](hll::Hll),
//!   `quantiles(f)` adds the number to the row's [`Quantiles`](quantiles::Quantiles);
//! - an event whose time PostgreSQL's `timestamptz` cannot hold (after year 9999) is skipped
//!   and counted ([`Aggregator::bad_times`]);
//! - [`Aggregator::drain`] (and [`Aggregator::drain_compact`]) returns rows sorted by
//!   `(bucket, dims)`: deterministic output, and concurrent sidecars upserting the same keys
//!   lock rows in the same order.
//!
//! Performance: keys are encoded into a reusable buffer and looked up by hash in a
//! `hashbrown::HashTable` of indices into a key arena, so an event whose key already exists
//! allocates nothing.

mod add;
pub mod admission;
mod decimal;
mod drained;
pub mod hll;
mod key;
mod merge;
pub mod numeric_list;
pub mod quantiles;
mod sketch_ops;
mod top;

pub use decimal::Decimal;
pub use drained::DrainedRows;
pub(crate) use key::short_eq;
pub use merge::{combine_kind, merge_rows};
pub use top::{RuleTop, TopKey, TopKeys};

use hashbrown::{DefaultHashBuilder, HashTable};
use logtally_spool::{Record, MAX_FIELDS};

use crate::config::condition::BoundCondition;
use crate::config::{MetricKind, Rule, RuleLimits};
use add::add_with;
use admission::Admission;
use hll::Hll;
use key::{cmp_keys, key_bytes, push_dim};
use quantiles::{PlaceCache, Quantiles};
use sketch_ops::SketchOps;

/// The last millisecond of year 9999 (UTC): later event times are skipped and counted, as
/// nothing after it is a time anyone means (and PostgreSQL's range ends not far beyond).
pub const MAX_EVENT_TIME_MS: u64 = 253_402_300_799_999;

/// A flushed aggregate row of one rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Bucket start, ms since the Unix epoch (event time floored to the rule's bucket).
    pub bucket_ms: i64,
    /// One value per `group_by` column: the field's bytes as UTF-8 (invalid sequences replaced
    /// by U+FFFD, NUL bytes removed); a missing field is the empty string.
    pub dims: Vec<String>,
    /// One value per metric column, in rule order: `Count` → `MetricValue::Count`,
    /// `Distinct` → `MetricValue::Distinct`, `Quantiles` → `MetricValue::Quantiles`, the others
    /// `MetricValue::Decimal` (`None` for min/max with no valid value; sum is never `None`).
    pub metrics: Vec<MetricValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    Count(i64),
    Decimal(Option<Decimal>),
    Distinct(Hll),
    Quantiles(Quantiles),
}

/// What one rule counted besides its rows, since the aggregator was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Events the rule's `where` did not match (not aggregated).
    pub outside: u64,
    /// Comparisons (in `where` of the rule or of a metric) that needed a number and met a
    /// non-number.
    pub bad_conditions: u64,
    /// Values left out of a sum because adding them would overflow.
    pub overflows: u64,
    /// Events of keys past `max_keys`, added to the overflow row.
    pub overflow_events: u64,
    /// Events whose bucket is past `retention` (not written).
    pub expired_events: u64,
}

/// Everything one rule accumulated since the last flush.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRows {
    /// Index into `Config::rules`.
    pub rule: usize,
    pub rows: Vec<Row>,
}

/// No field at this position (absent from the header).
const MISSING: u8 = u8::MAX;

/// How one segment's fields map to one rule's dims and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleLayout {
    /// Record index of each group_by field, or [`MISSING`].
    dims: Vec<u8>,
    /// Record index of each metric's field, or [`MISSING`] (also for `count`).
    metrics: Vec<u8>,
    /// The rule's `where`, bound to this segment's fields.
    filter: Option<BoundCondition>,
    /// Each metric's `where`, bound likewise.
    metric_filters: Vec<Option<BoundCondition>>,
}

/// A segment header's field list mapped to every rule's field indices. Build it once per
/// segment with [`Aggregator::layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    rules: Vec<RuleLayout>,
    /// One past the highest record index any rule reads: values after it are not decoded.
    needed: usize,
}

/// A metric's accumulator: an `i128` per key. For the sketches it is the index of the key's
/// sketch in the rule's `hlls` or `quants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acc {
    Count,
    Sum,
    Min,
    Max,
    Distinct,
    /// The index of the rule's empty sketch of this metric's accuracy, in `quant_protos`.
    Quantiles(u8),
}

impl Acc {
    fn initial(self) -> i128 {
        match self {
            Acc::Count | Acc::Sum | Acc::Distinct | Acc::Quantiles(_) => 0,
            // Parsed values are far inside these bounds, so they mean "no value yet".
            Acc::Min => i128::MAX,
            Acc::Max => i128::MIN,
        }
    }
}

/// Where a key's bytes sit in the arena, and the index of its accumulators. Held in the
/// hash table itself so a lookup touches the table and the arena only.
#[derive(Debug, Clone, Copy)]
struct KeyRef {
    off: u32,
    len: u32,
    idx: u32,
}

/// One rule's pending aggregates.
#[derive(Debug)]
struct RuleState {
    bucket_ms: i64,
    /// The bucket of the previous event (start, end, index in `tables`): consecutive events
    /// nearly always share it, and this saves a division and a search.
    last_bucket: (i64, i64, usize),
    accs_kind: Vec<Acc>,
    /// One hash table per bucket: events arrive in time order, so the current bucket's
    /// small table stays in cache while older buckets' keys sit idle.
    tables: Vec<(i64, HashTable<KeyRef>)>,
    /// Bucket start → index in `tables` (events far out of order must not cost a scan).
    table_index: hashbrown::HashMap<i64, usize>,
    /// Keys in insertion order (for draining).
    keys: Vec<KeyRef>,
    /// Encoded keys, back to back: bucket (8 bytes LE) then per dim a u16 LE length and bytes.
    arena: Vec<u8>,
    /// `accs_kind.len()` accumulators per key, in key order.
    accs: Vec<i128>,
    /// `distinct` sketches, pointed at by their accumulators.
    hlls: Vec<Hll>,
    /// `quantiles` sketches, pointed at by their accumulators.
    quants: Vec<Quantiles>,
    /// An empty sketch per `quantiles` metric (its accuracy), cloned for each new key.
    quant_protos: Vec<Quantiles>,
    /// Heap bytes of `hlls` and `quants`, kept up to date by each insert's size change (as
    /// the inserts are applied: at most a batch behind).
    sketch_bytes: usize,
    /// Sketch inserts not yet applied (applied a batch at a time, and before a drain).
    ops: SketchOps,
    /// Per `quantiles` metric: recent values' buckets (saves a logarithm per repeated value).
    quant_caches: Vec<PlaceCache>,
    /// Bad values per metric since the aggregator was made.
    bad: Vec<u64>,
    counters: RuleCounters,
    /// `max_keys`: what this node admitted per bucket (`None`: no limit).
    admission: Option<Admission>,
    /// The overflow key's encoded dims (every dim the rule's `overflow_label`).
    overflow_dims: Vec<u8>,
    /// `retention`, and the first bucket start still written (from the last `set_now`).
    retention: Option<std::time::Duration>,
    expire_before: i64,
}

impl RuleState {
    /// Applies the queued sketch inserts.
    fn apply_sketch_ops(&mut self) {
        self.ops
            .apply(&mut self.hlls, &mut self.quants, &mut self.sketch_bytes);
    }
}

/// Accumulates records into per-rule rows until [`drain`](Aggregator::drain)ed.
#[derive(Debug)]
pub struct Aggregator {
    rules: Vec<RuleState>,
    /// The rules, for the field names each reads.
    config: Vec<Rule>,
    hasher: DefaultHashBuilder,
    key: Vec<u8>,
    text: String,
    cached: Option<(u64, Layout)>,
    events: u64,
    bad_times: u64,
}

impl Aggregator {
    pub fn new(rules: &[Rule]) -> Aggregator {
        let states = rules
            .iter()
            .map(|r| {
                let mut quant_protos = Vec::new();
                let accs_kind: Vec<Acc> = r
                    .metrics
                    .iter()
                    .map(|m| match m.kind {
                        MetricKind::Count => Acc::Count,
                        MetricKind::Sum(_) => Acc::Sum,
                        MetricKind::Min(_) => Acc::Min,
                        MetricKind::Max(_) => Acc::Max,
                        MetricKind::Distinct(_) => Acc::Distinct,
                        MetricKind::Quantiles { alpha, .. } => {
                            // The parser only accepts accuracies the sketch takes.
                            let proto = Quantiles::new(alpha).unwrap_or_else(|_| {
                                Quantiles::new(quantiles::DEFAULT_ALPHA).expect("valid")
                            });
                            quant_protos.push(proto);
                            Acc::Quantiles((quant_protos.len() - 1) as u8)
                        }
                    })
                    .collect();
                RuleState {
                    hlls: Vec::new(),
                    quants: Vec::new(),
                    quant_caches: vec![PlaceCache::default(); quant_protos.len()],
                    quant_protos,
                    counters: RuleCounters::default(),
                    bucket_ms: r.bucket_ms().max(1),
                    last_bucket: (i64::MAX, i64::MAX, 0),
                    bad: vec![0; accs_kind.len()],
                    sketch_bytes: 0,
                    ops: SketchOps::default(),
                    accs_kind,
                    tables: Vec::new(),
                    table_index: hashbrown::HashMap::new(),
                    keys: Vec::new(),
                    arena: Vec::new(),
                    accs: Vec::new(),
                    admission: None,
                    overflow_dims: Vec::new(),
                    retention: None,
                    expire_before: i64::MIN,
                }
            })
            .collect();
        Aggregator {
            rules: states,
            config: rules.to_vec(),
            hasher: DefaultHashBuilder::default(),
            key: Vec::with_capacity(256),
            text: String::new(),
            cached: None,
            events: 0,
            bad_times: 0,
        }
    }

    /// An aggregator applying each rule's `max_keys` and `retention` (`limits` in rule
    /// order, as [`crate::config::Config::limits`]; missing entries limit nothing).
    pub fn with_limits(rules: &[Rule], limits: &[RuleLimits]) -> Aggregator {
        let mut a = Aggregator::new(rules);
        for ((st, rule), l) in a.rules.iter_mut().zip(rules).zip(limits) {
            st.admission = Admission::for_rule(rule.bucket, l);
            let mut text = String::new();
            for _ in &rule.group_by {
                push_dim(
                    &mut st.overflow_dims,
                    &mut text,
                    l.overflow_label.as_bytes(),
                );
            }
            st.retention = l.retention;
        }
        a
    }

    /// The time retention is measured from, until the next call (the reader calls it
    /// before each poll). Before the first call nothing expires.
    pub fn set_now(&mut self, now_ms: i64) {
        for st in &mut self.rules {
            st.expire_before = admission::expire_before(now_ms, st.retention);
        }
    }

    /// Loads a rule's admitted keys as committed (`(bucket, hashes)`), before the first
    /// event. Ignored for a rule without `max_keys`.
    pub fn restore_admitted(&mut self, rule: usize, chunks: Vec<(i64, Vec<u64>)>) {
        if let Some(a) = self.rules.get_mut(rule).and_then(|r| r.admission.as_mut()) {
            a.restore(chunks);
        }
    }

    /// Per rule: (buckets, keys) of admitted state held; `None` without `max_keys`.
    pub fn admission_held(&self) -> Vec<Option<(usize, usize)>> {
        self.rules
            .iter()
            .map(|r| r.admission.as_ref().map(|a| (a.buckets(), a.keys_held())))
            .collect()
    }

    /// Maps a segment header's field names to every rule's record indices.
    pub fn layout(&self, header_fields: &[String]) -> Layout {
        let index = |name: &str| -> u8 {
            header_fields
                .iter()
                .take(MAX_FIELDS)
                .position(|f| f == name)
                .map_or(MISSING, |i| i as u8)
        };
        // Condition fields the segment lacks read as absent (an index past the values).
        let mut needed = 0;
        let mut bind = |c: &Option<crate::config::Condition>| {
            c.as_ref().map(|c| {
                c.bind_with(|name| match index(name) {
                    MISSING => Some(usize::MAX),
                    i => {
                        needed = needed.max(usize::from(i) + 1);
                        Some(usize::from(i))
                    }
                })
                .expect("every name resolves")
            })
        };
        let rules: Vec<RuleLayout> = self
            .config
            .iter()
            .map(|r| RuleLayout {
                dims: r.group_by.iter().map(|d| index(d)).collect(),
                metrics: r
                    .metrics
                    .iter()
                    .map(|m| m.kind.field().map_or(MISSING, index))
                    .collect(),
                filter: bind(&r.filter),
                metric_filters: r.metrics.iter().map(|m| bind(&m.filter)).collect(),
            })
            .collect();
        let needed = rules
            .iter()
            .flat_map(|r| r.dims.iter().chain(&r.metrics))
            .filter(|&&i| i != MISSING)
            .map(|&i| usize::from(i) + 1)
            .max()
            .unwrap_or(0)
            .max(needed);
        Layout { rules, needed }
    }

    /// Adds one record of a segment whose fields `layout` was built from.
    #[inline]
    pub fn add(&mut self, layout: &Layout, record: &Record<'_>) {
        self.events += 1;
        if record.time_ms > MAX_EVENT_TIME_MS {
            self.bad_times += 1;
            return;
        }
        add_with(
            &mut self.rules,
            &self.hasher,
            &mut self.key,
            &mut self.text,
            layout,
            record,
        );
    }

    /// Adds one record, building the layout only when `segment` differs from the previous
    /// call's (callers give each segment a distinct id, e.g. the tailer's segment id).
    #[inline]
    pub fn add_cached(&mut self, segment: u64, header_fields: &[String], record: &Record<'_>) {
        let layout = match self.cached.take() {
            Some((id, layout)) if id == segment => layout,
            _ => self.layout(header_fields),
        };
        self.add(&layout, record);
        self.cached = Some((segment, layout));
    }

    /// Distinct keys pending, summed over all rules.
    pub fn pending_keys(&self) -> usize {
        self.rules.iter().map(|r| r.keys.len()).sum()
    }

    /// Records added since the aggregator was made.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Events skipped because their time is past [`MAX_EVENT_TIME_MS`].
    pub fn bad_times(&self) -> u64 {
        self.bad_times
    }

    /// Per rule, in rule order: what it counted besides its rows.
    pub fn rule_counters(&self) -> Vec<RuleCounters> {
        self.rules.iter().map(|r| r.counters.clone()).collect()
    }

    /// Bad (unparsable) values per rule and metric since the aggregator was made.
    pub fn bad_values(&self) -> Vec<Vec<u64>> {
        self.rules.iter().map(|r| r.bad.clone()).collect()
    }

    /// Takes every pending row, leaving the aggregator empty. One [`RuleRows`] per rule, in
    /// rule order (possibly with no rows), rows sorted by `(bucket_ms, dims)`.
    ///
    /// Every row is materialised at once: convenient for tests and models. The daemon uses
    /// [`drain_compact`](Aggregator::drain_compact), which keeps the rows compact.
    pub fn drain(&mut self) -> Vec<RuleRows> {
        self.drain_compact()
            .into_iter()
            .map(DrainedRows::into_rule_rows)
            .collect()
    }

    /// Takes every pending row in compact form, leaving the aggregator empty with its memory
    /// released. One [`DrainedRows`] per rule, in rule order (possibly empty), sorted by
    /// `(bucket_ms, dims)`.
    ///
    /// The key arena and accumulators move out as they are (no copy) and the hash tables are
    /// freed, so a drained batch costs less than the same keys pending; rows are only built a
    /// chunk at a time when the store binds them ([`DrainedRows::rows`]).
    pub fn drain_compact(&mut self) -> Vec<DrainedRows> {
        self.rules
            .iter_mut()
            .enumerate()
            .map(|(rule, st)| {
                st.apply_sketch_ops();
                // Dropping (not clearing) the tables returns their memory: a flush must not
                // hold a full-size empty table next to the batch it is writing.
                st.tables = Vec::new();
                st.table_index = hashbrown::HashMap::new();
                st.last_bucket = (i64::MAX, i64::MAX, 0);
                let mut keys = std::mem::take(&mut st.keys);
                let arena = std::mem::take(&mut st.arena);
                let accs = std::mem::take(&mut st.accs);
                let admitted = st
                    .admission
                    .as_mut()
                    .map(Admission::take_delta)
                    .unwrap_or_default();
                st.sketch_bytes = 0;
                keys.sort_unstable_by(|a, b| cmp_keys(key_bytes(&arena, a), key_bytes(&arena, b)));
                DrainedRows {
                    rule,
                    accs_kind: st.accs_kind.clone(),
                    keys,
                    arena,
                    accs,
                    hlls: std::mem::take(&mut st.hlls),
                    quants: std::mem::take(&mut st.quants),
                    admitted,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod pending_memory_tests;
#[cfg(test)]
mod tests;
