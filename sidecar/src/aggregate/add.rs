//! The event path: one record added to every rule (conditions, the key lookup, the
//! accumulators, sketch inserts queued for `sketch_ops`).

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};
use logtally_spool::{Record, MAX_FIELDS};

use super::admission::{self, Decision};
use super::hll::{self, Hll};
use super::key::{push_dim, short_eq};
use super::numeric_list::{read_number, Numeric, Reading};
use super::{Acc, Decimal, KeyRef, Layout, RuleState, MISSING};

/// Makes room for `more` items, growing the capacity by a quarter (at least 64 items)
/// when it is short.
#[inline]
fn grow_by_a_quarter<T>(v: &mut Vec<T>, more: usize) {
    if v.capacity() - v.len() < more {
        v.reserve_exact(more.max(v.len() / 4).max(64));
    }
}

/// Decodes the values a layout needs into `vals`, then adds the record to every rule.
#[inline]
pub(super) fn add_with(
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
    let time = record.time_ms as i64; // at most MAX_EVENT_TIME_MS (checked by `add`)
    let values = &vals[..];

    for (st, rl) in rules.iter_mut().zip(&layout.rules) {
        if let Some(filter) = &rl.filter {
            let o = filter.eval(values);
            st.counters.bad_conditions += u64::from(o.bad_number);
            if !o.matched {
                st.counters.outside += 1;
                continue;
            }
        }
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
        if admission::is_expired(bucket, st.expire_before) {
            st.counters.expired_events += 1;
            continue;
        }
        let table = &mut st.tables[t].1;
        key.clear();
        key.extend_from_slice(&bucket.to_le_bytes());
        for &d in &rl.dims {
            push_dim(key, text, get(d).unwrap_or(b""));
        }
        let mut hash = hasher.hash_one(&key[..]);
        let n = st.accs_kind.len();
        let find = |table: &HashTable<KeyRef>, arena: &[u8], key: &[u8], hash: u64| {
            table
                .find(hash, |k| {
                    k.len as usize == key.len()
                        && short_eq(&arena[k.off as usize..(k.off + k.len) as usize], key)
                })
                .copied()
        };
        let mut found = find(table, &st.arena, key, hash);
        // A key not pending: `max_keys` decides whether it has a row of its own.
        if let (None, Some(adm)) = (found, st.admission.as_mut()) {
            let dims = &key[8..];
            if dims != st.overflow_dims.as_slice()
                && adm.decide(bucket, admission::key_hash(dims)) == Decision::Overflow
            {
                st.counters.overflow_events += 1;
                key.truncate(8);
                key.extend_from_slice(&st.overflow_dims);
                hash = hasher.hash_one(&key[..]);
                found = find(table, &st.arena, key, hash);
            }
        }
        let idx = match found {
            Some(k) => k.idx as usize,
            None => {
                let k = KeyRef {
                    off: st.arena.len() as u32,
                    len: key.len() as u32,
                    idx: st.keys.len() as u32,
                };
                // Per-key vectors grow by a quarter, not double: a doubling is one step of
                // memory the pending bound cannot see coming (`max_pending_memory`).
                grow_by_a_quarter(&mut st.keys, 1);
                grow_by_a_quarter(&mut st.arena, key.len());
                grow_by_a_quarter(&mut st.accs, n);
                st.keys.push(k);
                st.arena.extend_from_slice(key);
                for &a in &st.accs_kind {
                    let initial = match a {
                        Acc::Distinct => {
                            grow_by_a_quarter(&mut st.hlls, 1);
                            st.hlls.push(Hll::new());
                            (st.hlls.len() - 1) as i128
                        }
                        Acc::Quantiles(p) => {
                            let q = st.quant_protos[usize::from(p)].clone();
                            st.sketch_bytes += q.heap_bytes();
                            grow_by_a_quarter(&mut st.quants, 1);
                            st.quants.push(q);
                            (st.quants.len() - 1) as i128
                        }
                        other => other.initial(),
                    };
                    st.accs.push(initial);
                }
                let arena = &st.arena;
                // Rehashing (when the table grows) recomputes hashes from the arena.
                table.insert_unique(hash, k, |k| {
                    hasher.hash_one(&arena[k.off as usize..(k.off + k.len) as usize])
                });
                k.idx as usize
            }
        };
        let accs = &mut st.accs[idx * n..(idx + 1) * n];
        for (m, ((acc, &kind), (&fi, filter))) in accs
            .iter_mut()
            .zip(&st.accs_kind)
            .zip(rl.metrics.iter().zip(&rl.metric_filters))
            .enumerate()
        {
            if let Some(filter) = filter {
                let o = filter.eval(values);
                st.counters.bad_conditions += u64::from(o.bad_number);
                if !o.matched {
                    continue;
                }
            }
            if kind == Acc::Count {
                *acc += 1;
                continue;
            }
            let raw = match get(fi) {
                Some(raw) if !raw.is_empty() => raw,
                _ => continue,
            };
            let reading = match kind {
                Acc::Min => Reading::Min,
                Acc::Max => Reading::Max,
                Acc::Distinct => {
                    st.ops.push_hll(*acc as u32, hll::hash(raw));
                    continue;
                }
                _ => Reading::Sum,
            };
            let v = match read_number(raw, reading) {
                Numeric::Value(Decimal(v)) => v,
                Numeric::Empty => continue,
                Numeric::Bad => {
                    st.bad[m] += 1;
                    continue;
                }
            };
            match kind {
                Acc::Sum => match acc.checked_add(v) {
                    Some(s) => *acc = s,
                    None => st.counters.overflows += 1,
                },
                Acc::Min => *acc = (*acc).min(v),
                Acc::Max => *acc = (*acc).max(v),
                Acc::Quantiles(p) => {
                    let cache = &mut st.quant_caches[usize::from(p)];
                    // The rule's empty sketch of this accuracy places the value as the
                    // row's would, without touching the row's.
                    match st.quant_protos[usize::from(p)].place_decimal_cached(Decimal(v), cache) {
                        Some(place) => st.ops.push_quantile(*acc as u32, place),
                        None => st.bad[m] += 1,
                    }
                }
                Acc::Count | Acc::Distinct => unreachable!("handled above"),
            }
        }
        if st.ops.full() {
            st.apply_sketch_ops();
        }
    }
}
