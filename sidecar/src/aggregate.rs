//! Aggregation: a pure function of records and rules (no I/O, no clock).
//!
//! CONTRACT (shared by aggregate, store, daemon): [`Decimal`], [`RuleRows`], [`Row`] are what a
//! flush hands to the store; the daemon hands [`DrainedRows`], the same rows in the
//! aggregator's compact form, built into [`Row`]s a chunk at a time. The aggregator itself is
//! implemented here.
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
//! - a numeric metric's field is parsed as a [`Decimal`]. Absent, undeclared or empty values
//!   are "no value" (not counted anywhere); any other unparsable value, such as nginx's `-` for
//!   a missing upstream time, is a *bad value*: counted per metric ([`Aggregator::bad_values`]),
//!   never an error (a sum that would overflow `i128` counts its value as bad too, though
//!   values below 10¹⁸ make that need ~10¹¹ events in one row). `sum` adds valid values (0 when there are none), `min`/`max` are `None`
//!   when no event of the row had a valid value;
//! - [`Aggregator::drain`] (and [`Aggregator::drain_compact`]) returns rows sorted by `(bucket, dims)`: deterministic output, and
//!   concurrent sidecars upserting the same keys lock rows in the same order.
//!
//! Performance: keys are encoded into a reusable buffer and looked up by hash in a
//! `hashbrown::HashTable` of indices into a key arena, so an event whose key already exists
//! allocates nothing.

use std::cmp::Ordering;
use std::fmt;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};
use logtally_spool::{Record, MAX_FIELDS};

use crate::config::{MetricKind, Rule};

/// An exact decimal: the value times 10⁹, so up to 9 fractional digits are kept exactly.
/// Parsed from field values like `"42"`, `"-3"`, `"0.005"`, `"1e3"` is NOT accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(pub i128);

/// A flushed aggregate row of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Bucket start, ms since the Unix epoch (event time floored to the rule's bucket).
    pub bucket_ms: i64,
    /// One value per `group_by` column: the field's bytes as UTF-8 (invalid sequences replaced
    /// by U+FFFD, NUL bytes removed); a missing field is the empty string.
    pub dims: Vec<String>,
    /// One value per metric column, in rule order: `Count` → `MetricValue::Count`, the others
    /// `MetricValue::Decimal` (`None` for min/max with no valid value; sum is never `None`).
    pub metrics: Vec<MetricValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricValue {
    Count(i64),
    Decimal(Option<Decimal>),
}

/// Everything one rule accumulated since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRows {
    /// Index into `Config::rules`.
    pub rule: usize,
    pub rows: Vec<Row>,
}

impl Decimal {
    /// Fractional digits kept.
    pub const FRACTION_DIGITS: u32 = 9;
    /// 10⁹: the stored integer for the value 1.
    pub const ONE: i128 = 1_000_000_000;
    /// Integer parts must stay below 10¹⁸, so a sum of 10¹¹ values cannot overflow `i128`.
    const INT_LIMIT: u64 = 1_000_000_000_000_000_000;

    /// Parses a field value: `[+-]digits[.digits]`, at most 9 fractional digits and an
    /// integer part below 10¹⁸. No spaces, exponents, `inf`/`nan`, or bare `.5`/`5.`.
    #[inline]
    pub fn parse(b: &[u8]) -> Option<Decimal> {
        let (neg, rest) = match b.first()? {
            b'-' => (true, &b[1..]),
            b'+' => (false, &b[1..]),
            _ => (false, b),
        };
        let mut i = 0;
        let mut int: u64 = 0;
        while let Some(&c) = rest.get(i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            int = int * 10 + u64::from(d);
            if int >= Self::INT_LIMIT {
                return None;
            }
            i += 1;
        }
        if i == 0 {
            return None;
        }
        let mut frac: u64 = 0;
        if i < rest.len() {
            if rest[i] != b'.' {
                return None;
            }
            let digits = &rest[i + 1..];
            if digits.is_empty() || digits.len() > Self::FRACTION_DIGITS as usize {
                return None;
            }
            for &c in digits {
                let d = c.wrapping_sub(b'0');
                if d > 9 {
                    return None;
                }
                frac = frac * 10 + u64::from(d);
            }
            frac *= 10u64.pow(Self::FRACTION_DIGITS - digits.len() as u32);
        }
        let v = i128::from(int) * Self::ONE + i128::from(frac);
        Some(Decimal(if neg { -v } else { v }))
    }

    /// A whole number.
    pub fn from_int(n: i64) -> Decimal {
        Decimal(i128::from(n) * Self::ONE)
    }
}

impl fmt::Display for Decimal {
    /// Plain decimal text PostgreSQL's `numeric` input accepts: `-3`, `0.005`, `12.5`
    /// (no exponent, no trailing fractional zeros).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let abs = self.0.unsigned_abs();
        let one = Self::ONE as u128;
        let (int, mut frac) = (abs / one, abs % one);
        if neg {
            f.write_str("-")?;
        }
        write!(f, "{int}")?;
        if frac != 0 {
            let mut width = Self::FRACTION_DIGITS as usize;
            while frac % 10 == 0 {
                frac /= 10;
                width -= 1;
            }
            write!(f, ".{frac:0width$}")?;
        }
        Ok(())
    }
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
}

/// A segment header's field list mapped to every rule's field indices. Build it once per
/// segment with [`Aggregator::layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    rules: Vec<RuleLayout>,
    /// One past the highest record index any rule reads: values after it are not decoded.
    needed: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acc {
    Count,
    Sum,
    Min,
    Max,
}

impl Acc {
    fn initial(self) -> i128 {
        match self {
            Acc::Count | Acc::Sum => 0,
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
    /// Bad values per metric since the aggregator was made.
    bad: Vec<u64>,
}

/// Accumulates records into per-rule rows until [`drain`](Aggregator::drain)ed.
#[derive(Debug)]
pub struct Aggregator {
    rules: Vec<RuleState>,
    /// Field names each rule reads: (dims, metric fields).
    fields: Vec<(Vec<String>, Vec<Option<String>>)>,
    hasher: DefaultHashBuilder,
    key: Vec<u8>,
    text: String,
    cached: Option<(u64, Layout)>,
    events: u64,
}

impl Aggregator {
    pub fn new(rules: &[Rule]) -> Aggregator {
        let states = rules
            .iter()
            .map(|r| {
                let accs_kind: Vec<Acc> = r
                    .metrics
                    .iter()
                    .map(|m| match m.kind {
                        MetricKind::Count => Acc::Count,
                        MetricKind::Sum(_) => Acc::Sum,
                        MetricKind::Min(_) => Acc::Min,
                        MetricKind::Max(_) => Acc::Max,
                    })
                    .collect();
                RuleState {
                    bucket_ms: r.bucket_ms().max(1),
                    last_bucket: (i64::MAX, i64::MAX, 0),
                    bad: vec![0; accs_kind.len()],
                    accs_kind,
                    tables: Vec::new(),
                    table_index: hashbrown::HashMap::new(),
                    keys: Vec::new(),
                    arena: Vec::new(),
                    accs: Vec::new(),
                }
            })
            .collect();
        let fields = rules
            .iter()
            .map(|r| {
                let metrics = r
                    .metrics
                    .iter()
                    .map(|m| m.kind.field().map(str::to_owned))
                    .collect();
                (r.group_by.clone(), metrics)
            })
            .collect();
        Aggregator {
            rules: states,
            fields,
            hasher: DefaultHashBuilder::default(),
            key: Vec::with_capacity(256),
            text: String::new(),
            cached: None,
            events: 0,
        }
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
        let rules: Vec<RuleLayout> = self
            .fields
            .iter()
            .map(|(dims, metrics)| RuleLayout {
                dims: dims.iter().map(|d| index(d)).collect(),
                metrics: metrics
                    .iter()
                    .map(|m| m.as_deref().map_or(MISSING, index))
                    .collect(),
            })
            .collect();
        let needed = rules
            .iter()
            .flat_map(|r| r.dims.iter().chain(&r.metrics))
            .filter(|&&i| i != MISSING)
            .map(|&i| usize::from(i) + 1)
            .max()
            .unwrap_or(0);
        Layout { rules, needed }
    }

    /// Adds one record of a segment whose fields `layout` was built from.
    #[inline]
    pub fn add(&mut self, layout: &Layout, record: &Record<'_>) {
        add_with(
            &mut self.rules,
            &self.hasher,
            &mut self.key,
            &mut self.text,
            layout,
            record,
        );
        self.events += 1;
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
                // Dropping (not clearing) the tables returns their memory: a flush must not
                // hold a full-size empty table next to the batch it is writing.
                st.tables = Vec::new();
                st.table_index = hashbrown::HashMap::new();
                st.last_bucket = (i64::MAX, i64::MAX, 0);
                let mut keys = std::mem::take(&mut st.keys);
                let arena = std::mem::take(&mut st.arena);
                let accs = std::mem::take(&mut st.accs);
                keys.sort_unstable_by(|a, b| cmp_keys(key_bytes(&arena, a), key_bytes(&arena, b)));
                DrainedRows {
                    rule,
                    accs_kind: st.accs_kind.clone(),
                    keys,
                    arena,
                    accs,
                }
            })
            .collect()
    }
}

/// One rule's drained aggregates, kept in the aggregator's compact encoding (about a third of
/// the memory of the same [`Row`]s). Rows come out sorted by `(bucket_ms, dims)` and distinct.
#[derive(Debug, Clone)]
pub struct DrainedRows {
    /// Index into `Config::rules`.
    pub rule: usize,
    accs_kind: Vec<Acc>,
    /// Keys in `(bucket, dims)` order; `idx` points into `accs`.
    keys: Vec<KeyRef>,
    arena: Vec<u8>,
    accs: Vec<i128>,
}

impl DrainedRows {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The rows at positions `range` (in sorted order), materialised.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Vec<Row> {
        let n = self.accs_kind.len();
        self.keys[range]
            .iter()
            .map(|k| {
                let (bucket_ms, dims) = decode_key(key_bytes(&self.arena, k));
                let i = k.idx as usize;
                let metrics = self
                    .accs_kind
                    .iter()
                    .zip(&self.accs[i * n..(i + 1) * n])
                    .map(|(&a, &v)| value(a, v))
                    .collect();
                Row {
                    bucket_ms,
                    dims,
                    metrics,
                }
            })
            .collect()
    }

    /// All rows, materialised.
    pub fn into_rule_rows(self) -> RuleRows {
        RuleRows {
            rule: self.rule,
            rows: self.rows(0..self.len()),
        }
    }
}

fn key_bytes<'a>(arena: &'a [u8], k: &KeyRef) -> &'a [u8] {
    &arena[k.off as usize..(k.off + k.len) as usize]
}

/// The dims of an encoded key (after its 8 bucket bytes).
fn key_dims(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 8;
    std::iter::from_fn(move || {
        if at >= key.len() {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([key[at], key[at + 1]]));
        let dim = &key[at + 2..at + 2 + len];
        at += 2 + len;
        Some(dim)
    })
}

/// Orders encoded keys as their decoded `(bucket_ms, dims)` compare (UTF-8 text compares as
/// its bytes), without decoding them.
fn cmp_keys(a: &[u8], b: &[u8]) -> Ordering {
    let bucket = |k: &[u8]| i64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
    bucket(a)
        .cmp(&bucket(b))
        .then_with(|| key_dims(a).cmp(key_dims(b)))
}

fn value(acc: Acc, v: i128) -> MetricValue {
    match acc {
        Acc::Count => MetricValue::Count(v as i64),
        Acc::Sum => MetricValue::Decimal(Some(Decimal(v))),
        Acc::Min | Acc::Max if v == acc.initial() => MetricValue::Decimal(None),
        Acc::Min | Acc::Max => MetricValue::Decimal(Some(Decimal(v))),
    }
}

fn decode_key(key: &[u8]) -> (i64, Vec<String>) {
    let bucket = i64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
    let dims = key_dims(key)
        .map(|d| {
            std::str::from_utf8(d)
                .expect("keys hold normalised text")
                .to_owned()
        })
        .collect();
    (bucket, dims)
}

/// Decodes the values a layout needs into `vals`, then adds the record to every rule.
#[inline]
fn add_with(
    rules: &mut [RuleState],
    hasher: &DefaultHashBuilder,
    key: &mut Vec<u8>,
    text: &mut String,
    layout: &Layout,
    record: &Record<'_>,
) {
    // Small stack arrays for the common case: initialising 64 slots per event costs more
    // than the rest of the decode.
    if layout.needed <= 8 {
        add_n::<8>(rules, hasher, key, text, layout, record)
    } else if layout.needed <= 16 {
        add_n::<16>(rules, hasher, key, text, layout, record)
    } else {
        add_n::<MAX_FIELDS>(rules, hasher, key, text, layout, record)
    }
}

#[inline]
fn add_n<const N: usize>(
    rules: &mut [RuleState],
    hasher: &DefaultHashBuilder,
    key: &mut Vec<u8>,
    text: &mut String,
    layout: &Layout,
    record: &Record<'_>,
) {
    let mut vals: [Option<&[u8]>; N] = [None; N];
    let mut values = record.values();
    for slot in vals.iter_mut().take(layout.needed) {
        match values.next() {
            Some(v) => *slot = v,
            None => break,
        }
    }
    let get = |i: u8| {
        if i == MISSING {
            None
        } else {
            vals[usize::from(i)]
        }
    };
    let time = i64::try_from(record.time_ms).unwrap_or(i64::MAX);

    for (st, rl) in rules.iter_mut().zip(&layout.rules) {
        let (bucket, t) = if time >= st.last_bucket.0 && time < st.last_bucket.1 {
            (st.last_bucket.0, st.last_bucket.2)
        } else {
            let b = time - time.rem_euclid(st.bucket_ms);
            let tables = &mut st.tables;
            let t = *st.table_index.entry(b).or_insert_with(|| {
                tables.push((b, HashTable::new()));
                tables.len() - 1
            });
            st.last_bucket = (b, b.saturating_add(st.bucket_ms), t);
            (b, t)
        };
        let table = &mut st.tables[t].1;
        key.clear();
        key.extend_from_slice(&bucket.to_le_bytes());
        for &d in &rl.dims {
            push_dim(key, text, get(d).unwrap_or(b""));
        }
        let hash = hasher.hash_one(&key[..]);
        let n = st.accs_kind.len();
        let arena = &st.arena;
        let found = table.find(hash, |k| {
            k.len as usize == key.len()
                && arena[k.off as usize..(k.off + k.len) as usize] == key[..]
        });
        let idx = match found {
            Some(k) => k.idx as usize,
            None => {
                let k = KeyRef {
                    off: st.arena.len() as u32,
                    len: key.len() as u32,
                    idx: st.keys.len() as u32,
                };
                st.keys.push(k);
                st.arena.extend_from_slice(key);
                st.accs.extend(st.accs_kind.iter().map(|a| a.initial()));
                let arena = &st.arena;
                // Rehashing (when the table grows) recomputes hashes from the arena.
                table.insert_unique(hash, k, |k| {
                    hasher.hash_one(&arena[k.off as usize..(k.off + k.len) as usize])
                });
                k.idx as usize
            }
        };
        let accs = &mut st.accs[idx * n..(idx + 1) * n];
        for (m, ((acc, &kind), &fi)) in accs
            .iter_mut()
            .zip(&st.accs_kind)
            .zip(&rl.metrics)
            .enumerate()
        {
            if kind == Acc::Count {
                *acc += 1;
                continue;
            }
            let raw = match get(fi) {
                Some(raw) if !raw.is_empty() => raw,
                _ => continue,
            };
            let Some(Decimal(v)) = Decimal::parse(raw) else {
                st.bad[m] += 1;
                continue;
            };
            match kind {
                Acc::Sum => match acc.checked_add(v) {
                    Some(s) => *acc = s,
                    None => st.bad[m] += 1,
                },
                Acc::Min => *acc = (*acc).min(v),
                Acc::Max => *acc = (*acc).max(v),
                Acc::Count => unreachable!("handled above"),
            }
        }
    }
}

/// Appends a dim to the key: u16 length, then the value as UTF-8 without NULs.
#[inline]
fn push_dim(key: &mut Vec<u8>, text: &mut String, raw: &[u8]) {
    let clean = raw.iter().all(|&c| c != 0 && c < 0x80);
    let bytes: &[u8] = if clean {
        raw
    } else {
        text.clear();
        text.push_str(&String::from_utf8_lossy(raw));
        text.retain(|c| c != '\0');
        text.as_bytes()
    };
    // A value is at most MAX_VALUE_LEN (4096) bytes; replacement characters may triple that,
    // still far below u16::MAX.
    key.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    key.extend_from_slice(bytes);
}

/// Combines rows the way the store's additive upsert does (count and sum add, min/max keep
/// the extreme): the pure model of what the database holds after several flushes. `parts`
/// may hold several `RuleRows` for the same rule. Output as [`Aggregator::drain`]'s: one
/// entry per rule index seen, sorted by rule, rows sorted by `(bucket_ms, dims)`.
pub fn merge_rows(rules: &[Rule], parts: impl IntoIterator<Item = RuleRows>) -> Vec<RuleRows> {
    use std::collections::btree_map::{BTreeMap, Entry};
    type Rows = BTreeMap<(i64, Vec<String>), Vec<MetricValue>>;
    let mut by_rule: BTreeMap<usize, Rows> = BTreeMap::new();
    for part in parts {
        let kinds = &rules[part.rule].metrics;
        let rows = by_rule.entry(part.rule).or_default();
        for row in part.rows {
            match rows.entry((row.bucket_ms, row.dims)) {
                Entry::Vacant(e) => {
                    e.insert(row.metrics);
                }
                Entry::Occupied(mut e) => {
                    for ((a, b), m) in e.get_mut().iter_mut().zip(row.metrics).zip(kinds) {
                        *a = combine_kind(&m.kind, *a, b);
                    }
                }
            }
        }
    }
    by_rule
        .into_iter()
        .map(|(rule, rows)| RuleRows {
            rule,
            rows: rows
                .into_iter()
                .map(|((bucket_ms, dims), metrics)| Row {
                    bucket_ms,
                    dims,
                    metrics,
                })
                .collect(),
        })
        .collect()
}

/// Combines two values of a metric of `kind` as the store's upsert does.
pub fn combine_kind(kind: &MetricKind, a: MetricValue, b: MetricValue) -> MetricValue {
    use MetricValue::{Count, Decimal as D};
    match (kind, a, b) {
        (MetricKind::Count, Count(x), Count(y)) => Count(x + y),
        (MetricKind::Sum(_), D(x), D(y)) => D(Some(Decimal(
            x.unwrap_or_default().0 + y.unwrap_or_default().0,
        ))),
        (MetricKind::Min(_), D(x), D(y)) => D(pick(x, y, Ordering::Less)),
        (MetricKind::Max(_), D(x), D(y)) => D(pick(x, y, Ordering::Greater)),
        _ => a,
    }
}

fn pick(x: Option<Decimal>, y: Option<Decimal>, want: Ordering) -> Option<Decimal> {
    match (x, y) {
        (Some(a), Some(b)) => Some(if b.cmp(&a) == want { b } else { a }),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Metric;
    use logtally_spool::{decode_frame, encode_event, Decoded, Frame};
    use proptest::prelude::*;

    fn d(s: &str) -> Option<Decimal> {
        Decimal::parse(s.as_bytes())
    }

    #[test]
    fn decimal_parse() {
        assert_eq!(d("42"), Some(Decimal(42 * Decimal::ONE)));
        assert_eq!(d("-3"), Some(Decimal(-3 * Decimal::ONE)));
        assert_eq!(d("0.005"), Some(Decimal(5_000_000)));
        assert_eq!(d("+1.5"), Some(Decimal(1_500_000_000)));
        assert_eq!(d("007"), Some(Decimal(7 * Decimal::ONE)));
        assert_eq!(d("0.123456789"), Some(Decimal(123_456_789)));
        assert_eq!(d("-0"), Some(Decimal(0)));
        assert_eq!(
            d("999999999999999999.999999999"),
            Some(Decimal(1_000_000_000_000_000_000 * Decimal::ONE - 1))
        );
        for bad in [
            "",
            "-",
            "+",
            " 1",
            "1 ",
            "1e3",
            "0.1234567891",
            "1000000000000000000",
            ".5",
            "5.",
            "1.2.3",
            "0x10",
            "inf",
            "NaN",
            "1,5",
            "0.005, 0.010",
            "--1",
            "+-1",
            "1-",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimal_display() {
        for (s, want) in [
            ("42", "42"),
            ("-3", "-3"),
            ("0.005", "0.005"),
            ("+1.50", "1.5"),
            ("-0.000000001", "-0.000000001"),
            ("-0", "0"),
            (
                "999999999999999999.999999999",
                "999999999999999999.999999999",
            ),
        ] {
            assert_eq!(d(s).unwrap().to_string(), want);
        }
        assert_eq!(Decimal::from_int(-7).to_string(), "-7");
        assert_eq!(Decimal(-1_500_000_000).to_string(), "-1.5");
    }

    fn rule(table: &str, bucket_s: u64, group_by: &[&str], metrics: &[(&str, MetricKind)]) -> Rule {
        Rule {
            table: table.into(),
            bucket: std::time::Duration::from_secs(bucket_s),
            group_by: group_by.iter().map(|s| s.to_string()).collect(),
            metrics: metrics
                .iter()
                .map(|(c, k)| Metric {
                    column: c.to_string(),
                    kind: k.clone(),
                })
                .collect(),
        }
    }

    fn ad_rules() -> Vec<Rule> {
        vec![
            rule(
                "ad_1m",
                60,
                &["ad", "ev"],
                &[
                    ("events", MetricKind::Count),
                    ("bytes", MetricKind::Sum("bytes".into())),
                    ("rt_max", MetricKind::Max("rt".into())),
                    ("rt_min", MetricKind::Min("rt".into())),
                ],
            ),
            rule("all_1h", 3600, &[], &[("n", MetricKind::Count)]),
        ]
    }

    fn fields(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Encodes and decodes one event, then hands its record to `f`.
    fn with_record<R>(
        time_ms: u64,
        values: &[Option<&[u8]>],
        f: impl FnOnce(&Record<'_>) -> R,
    ) -> R {
        let mut buf = Vec::new();
        encode_event(&mut buf, time_ms, values.iter().copied());
        match decode_frame(&buf) {
            Decoded::Frame {
                frame: Frame::Event(r),
                ..
            } => f(&r),
            other => panic!("{other:?}"),
        }
    }

    fn s(v: &str) -> Option<&[u8]> {
        Some(v.as_bytes())
    }

    fn dec(v: &str) -> MetricValue {
        MetricValue::Decimal(d(v))
    }

    #[test]
    fn groups_and_accumulates() {
        let rules = ad_rules();
        let mut agg = Aggregator::new(&rules);
        let header = fields(&["ad", "ev", "bytes", "rt"]);
        let layout = agg.layout(&header);
        let t0 = 1_764_300_000_000u64; // a whole minute
        let events: Vec<(u64, [Option<&[u8]>; 4])> = vec![
            (t0, [s("7"), s("view"), s("100"), s("0.005")]),
            (t0 + 59_999, [s("7"), s("view"), s("50"), s("0.250")]),
            (t0 + 60_000, [s("7"), s("view"), s("1"), s("-")]),
            (t0 + 1, [s("7"), s("click"), None, None]),
            (t0 + 2, [s("7"), s("click"), s(""), s("")]),
        ];
        for (t, v) in &events {
            with_record(*t, v, |r| agg.add(&layout, r));
        }
        assert_eq!(agg.pending_keys(), 3 + 1);
        assert_eq!(agg.events(), 5);
        assert_eq!(agg.bad_values(), vec![vec![0, 0, 1, 1], vec![0]]);
        let out = agg.drain();
        assert_eq!(agg.pending_keys(), 0);
        let b0 = t0 as i64;
        assert_eq!(
            out[0].rows,
            vec![
                Row {
                    bucket_ms: b0,
                    dims: fields(&["7", "click"]),
                    metrics: vec![
                        MetricValue::Count(2),
                        dec("0"),
                        MetricValue::Decimal(None),
                        MetricValue::Decimal(None)
                    ],
                },
                Row {
                    bucket_ms: b0,
                    dims: fields(&["7", "view"]),
                    metrics: vec![MetricValue::Count(2), dec("150"), dec("0.25"), dec("0.005")],
                },
                Row {
                    bucket_ms: b0 + 60_000,
                    dims: fields(&["7", "view"]),
                    metrics: vec![
                        MetricValue::Count(1),
                        dec("1"),
                        MetricValue::Decimal(None),
                        MetricValue::Decimal(None)
                    ],
                },
            ]
        );
        let hour = b0 - b0 % 3_600_000;
        assert_eq!(
            out[1],
            RuleRows {
                rule: 1,
                rows: vec![Row {
                    bucket_ms: hour,
                    dims: vec![],
                    metrics: vec![MetricValue::Count(5)]
                }]
            }
        );
        assert!(
            agg.drain().iter().all(|r| r.rows.is_empty()),
            "drain empties"
        );
    }

    #[test]
    fn missing_fields_and_other_orders() {
        let rules = ad_rules();
        let mut agg = Aggregator::new(&rules);
        // A segment without `ev` and `rt`, fields in another order, and a short record.
        let layout = agg.layout(&fields(&["bytes", "x", "ad"]));
        with_record(1000, &[s("5"), s("q"), s("9")], |r| agg.add(&layout, r));
        with_record(2000, &[s("6")], |r| agg.add(&layout, r));
        let out = agg.drain();
        let dims: Vec<_> = out[0]
            .rows
            .iter()
            .map(|r| (r.dims.clone(), r.metrics[1]))
            .collect();
        assert_eq!(
            dims,
            vec![
                (fields(&["", ""]), dec("6")),
                (fields(&["9", ""]), dec("5"))
            ]
        );
    }

    #[test]
    fn non_utf8_and_nul_dims() {
        let rules = vec![rule("t", 60, &["ua"], &[("n", MetricKind::Count)])];
        let mut agg = Aggregator::new(&rules);
        let header = fields(&["ua"]);
        for v in [&b"a\xffb"[..], b"a\xffb", b"a\0b", b"ab", b"caf\xc3\xa9"] {
            with_record(0, &[Some(v)], |r| agg.add_cached(1, &header, r));
        }
        let rows = agg.drain().remove(0).rows;
        let got: Vec<(String, MetricValue)> = rows
            .into_iter()
            .map(|r| (r.dims[0].clone(), r.metrics[0]))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ab".to_string(), MetricValue::Count(2)),
                ("a\u{fffd}b".to_string(), MetricValue::Count(2)),
                ("café".to_string(), MetricValue::Count(1)),
            ]
        );
    }

    #[test]
    fn layout_cache_follows_segment_id() {
        let rules = vec![rule("t", 60, &["a"], &[("n", MetricKind::Count)])];
        let mut agg = Aggregator::new(&rules);
        let h1 = fields(&["a", "b"]);
        let h2 = fields(&["b", "a"]);
        with_record(0, &[s("x"), s("y")], |r| agg.add_cached(1, &h1, r));
        with_record(0, &[s("x"), s("y")], |r| agg.add_cached(2, &h2, r));
        let rows = agg.drain().remove(0).rows;
        let dims: Vec<&str> = rows.iter().map(|r| r.dims[0].as_str()).collect();
        assert_eq!(dims, ["x", "y"]);
    }

    #[test]
    fn many_fields_use_the_wide_path() {
        let names: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
        let rules = vec![rule(
            "t",
            60,
            &["f39"],
            &[("s", MetricKind::Sum("f20".into()))],
        )];
        let mut agg = Aggregator::new(&rules);
        let layout = agg.layout(&names);
        let vals: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let v: Vec<Option<&[u8]>> = vals.iter().map(|x| Some(x.as_bytes())).collect();
        with_record(0, &v, |r| agg.add(&layout, r));
        let rows = agg.drain().remove(0).rows;
        assert_eq!(rows[0].dims, ["39"]);
        assert_eq!(rows[0].metrics, vec![dec("20")]);
    }

    #[test]
    fn merge_models_the_upsert() {
        let rules = ad_rules();
        let a = RuleRows {
            rule: 0,
            rows: vec![Row {
                bucket_ms: 0,
                dims: fields(&["1", "v"]),
                metrics: vec![
                    MetricValue::Count(1),
                    dec("2"),
                    dec("3"),
                    MetricValue::Decimal(None),
                ],
            }],
        };
        let b = RuleRows {
            rule: 0,
            rows: vec![Row {
                bucket_ms: 0,
                dims: fields(&["1", "v"]),
                metrics: vec![MetricValue::Count(2), dec("0.5"), dec("1"), dec("-1")],
            }],
        };
        let m = merge_rows(&rules, [a, b]);
        assert_eq!(
            m[0].rows[0].metrics,
            vec![MetricValue::Count(3), dec("2.5"), dec("3"), dec("-1")]
        );
    }

    #[test]
    fn compact_drain_frees_and_chunks_like_drain() {
        let rules = ad_rules();
        let header = fields(&["ad", "ev", "bytes", "rt"]);
        let fill = |agg: &mut Aggregator| {
            for i in 0..500u64 {
                let ad = format!("{}", (i * 7919) % 97);
                let ev = ["view", "click", ""][(i % 3) as usize];
                let t = 1_764_300_000_000 + (i % 4) * 60_000;
                with_record(t, &[s(&ad), s(ev), s("3"), s("0.5")], |r| {
                    agg.add_cached(1, &header, r)
                });
            }
        };
        let mut a = Aggregator::new(&rules);
        let mut b = Aggregator::new(&rules);
        fill(&mut a);
        fill(&mut b);
        let whole = a.drain();
        let compact = b.drain_compact();
        assert_eq!(b.pending_keys(), 0);
        assert!(b.rules.iter().all(|st| st.tables.is_empty()
            && st.arena.capacity() == 0
            && st.accs.capacity() == 0
            && st.keys.capacity() == 0));
        assert_eq!(compact.len(), whole.len());
        for (c, w) in compact.iter().zip(&whole) {
            assert_eq!(c.rule, w.rule);
            assert_eq!(c.len(), w.rows.len());
            let mut chunked = Vec::new();
            for start in (0..c.len()).step_by(37) {
                chunked.extend(c.rows(start..(start + 37).min(c.len())));
            }
            assert_eq!(chunked, w.rows);
        }
        assert!(whole[0].rows.len() > 300, "{}", whole[0].rows.len());
        // The emptied aggregator takes new keys.
        fill(&mut b);
        assert_eq!(b.drain(), whole);
    }

    // ---- properties ----

    type Ev = (u64, Vec<Option<Vec<u8>>>);

    fn value_strategy() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            Just(None),
            Just(Some(Vec::new())),
            (0u8..4).prop_map(|v| Some(vec![b'a' + v])),
            (-500i64..500, 0u32..1000).prop_map(|(i, f)| Some(format!("{i}.{f:03}").into_bytes())),
            Just(Some(b"-".to_vec())),
            Just(Some(b"\xff\0".to_vec())),
        ]
    }

    fn events_strategy() -> impl Strategy<Value = Vec<Ev>> {
        prop::collection::vec(
            (0u64..400_000, prop::collection::vec(value_strategy(), 0..5)),
            0..60,
        )
    }

    fn prop_rules() -> Vec<Rule> {
        vec![
            rule(
                "r0",
                60,
                &["a", "b"],
                &[
                    ("n", MetricKind::Count),
                    ("s", MetricKind::Sum("c".into())),
                    ("lo", MetricKind::Min("c".into())),
                    ("hi", MetricKind::Max("d".into())),
                ],
            ),
            rule("r1", 3600, &["d"], &[("s", MetricKind::Sum("a".into()))]),
        ]
    }

    fn aggregate(rules: &[Rule], events: &[Ev]) -> Vec<RuleRows> {
        let mut agg = Aggregator::new(rules);
        let header = fields(&["a", "b", "c", "d"]);
        for (t, vals) in events {
            let v: Vec<Option<&[u8]>> = vals.iter().map(|x| x.as_deref()).collect();
            with_record(*t, &v, |r| agg.add_cached(7, &header, r));
        }
        agg.drain()
    }

    /// Drops rules without rows so outputs of drain and merge compare equal.
    fn non_empty(rows: Vec<RuleRows>) -> Vec<RuleRows> {
        rows.into_iter().filter(|r| !r.rows.is_empty()).collect()
    }

    proptest! {
        #[test]
        fn sum_of_parts_equals_whole(events in events_strategy(), cut in 0usize..60) {
            let rules = prop_rules();
            let cut = cut.min(events.len());
            let whole = aggregate(&rules, &events);
            let parts = merge_rows(
                &rules,
                aggregate(&rules, &events[..cut]).into_iter().chain(aggregate(&rules, &events[cut..])),
            );
            prop_assert_eq!(non_empty(whole.clone()), non_empty(parts));
            // The total count is the number of events.
            let total: i64 = whole[0].rows.iter().map(|r| match r.metrics[0] {
                MetricValue::Count(n) => n,
                _ => 0,
            }).sum();
            prop_assert_eq!(total, events.len() as i64);
        }

        #[test]
        fn merge_is_commutative(a in events_strategy(), b in events_strategy()) {
            let rules = prop_rules();
            let ra = aggregate(&rules, &a);
            let rb = aggregate(&rules, &b);
            let ab = merge_rows(&rules, ra.clone().into_iter().chain(rb.clone()));
            let ba = merge_rows(&rules, rb.into_iter().chain(ra));
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn decimal_round_trips(v in -999_999_999_999_999_999_999_999_999i128..=999_999_999_999_999_999_999_999_999i128) {
            let text = Decimal(v).to_string();
            prop_assert_eq!(Decimal::parse(text.as_bytes()), Some(Decimal(v)));
        }

        #[test]
        fn decimal_matches_integer_parse(i in any::<i64>().prop_map(|i| i / 100), frac in 0u32..1_000_000_000) {
            let text = format!("{i}.{frac:09}");
            let want = i128::from(i) * Decimal::ONE + if i < 0 { -i128::from(frac) } else { i128::from(frac) };
            prop_assert_eq!(Decimal::parse(text.as_bytes()), Some(Decimal(want)));
        }
    }
}
