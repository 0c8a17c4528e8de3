//! Sketch inserts, gathered and applied a batch at a time.
//!
//! A row's `distinct` and `quantiles` sketches are kilobytes each, and thousands of rows are
//! pending: adding one event's value to its row's sketch nearly always misses the cache. Done
//! as the event is read, each miss waits alone, a thousand instructions from the next. So the
//! aggregator does everything that needs no sketch at once (the value's hash, its bucket,
//! the bad-value check) and queues the insert here. A full queue is applied in two tight
//! loops: the first only reads the line each insert touches (loads that do not wait on each
//! other, so the processor has the misses of the whole batch in flight together), the
//! second inserts into lines now in cache.
//!
//! Inserts are additions (a set union, bucket counts), so their order changes nothing: a
//! sketch after [`SketchOps::apply`] is the sketch the same inserts made one by one. Nothing
//! reads a sketch with inserts still queued: the aggregator applies them before a drain.

use super::hll::Hll;
use super::quantiles::{Place, Quantiles};

/// Inserts queued before they are applied (per kind): enough to overlap many misses, few
/// enough that the queue stays in the first-level cache.
pub(super) const BATCH: usize = 64;

/// Queued inserts: (index of the sketch in the rule's `hlls`/`quants`, what to add).
#[derive(Debug, Default)]
pub(super) struct SketchOps {
    hll: Vec<(u32, u64)>,
    quant: Vec<(u32, Place)>,
}

impl SketchOps {
    /// Queues adding the hashed value `hash` to `hlls[sketch]`.
    #[inline]
    pub(super) fn push_hll(&mut self, sketch: u32, hash: u64) {
        self.hll.push((sketch, hash));
    }

    /// Queues counting one value in bucket `place` of `quants[sketch]`.
    #[inline]
    pub(super) fn push_quantile(&mut self, sketch: u32, place: Place) {
        self.quant.push((sketch, place));
    }

    /// A queue holds [`BATCH`] inserts: time to apply.
    #[inline]
    pub(super) fn full(&self) -> bool {
        self.hll.len() >= BATCH || self.quant.len() >= BATCH
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.hll.is_empty() && self.quant.is_empty()
    }

    /// Applies every queued insert, keeping `sketch_bytes` (the sketches' heap bytes) up to
    /// date, and empties the queues.
    pub(super) fn apply(
        &mut self,
        hlls: &mut [Hll],
        quants: &mut [Quantiles],
        sketch_bytes: &mut usize,
    ) {
        // First only read what each insert touches: these loads do not wait on each other,
        // so their misses overlap. The inserts then find their lines in cache.
        let mut touched = 0u64;
        for &(i, hash) in &self.hll {
            touched ^= hlls[i as usize].peek(hash);
        }
        for &(i, place) in &self.quant {
            touched ^= quants[i as usize].peek(place);
        }
        std::hint::black_box(touched);
        let mut bytes = *sketch_bytes;
        for &(i, hash) in &self.hll {
            let h = &mut hlls[i as usize];
            let before = h.heap_bytes();
            h.insert_hash(hash);
            bytes = (bytes + h.heap_bytes()).saturating_sub(before);
        }
        for &(i, place) in &self.quant {
            let q = &mut quants[i as usize];
            let before = q.heap_bytes();
            q.add_at(place);
            bytes = (bytes + q.heap_bytes()).saturating_sub(before);
        }
        *sketch_bytes = bytes;
        self.hll.clear();
        self.quant.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::quantiles::PlaceCache;
    use crate::aggregate::Decimal;

    /// Queued and applied in batches (with a partial last one), the sketches equal sketches
    /// fed the same values one by one, and the byte total equals their heap bytes.
    #[test]
    fn batched_inserts_equal_direct_ones() {
        let proto = Quantiles::new(0.01).unwrap();
        let (mut hlls, mut quants) = (vec![Hll::new(); 7], vec![proto.clone(); 7]);
        let (mut want_h, mut want_q) = (hlls.clone(), quants.clone());
        let (mut ops, mut cache, mut bytes) = (SketchOps::default(), PlaceCache::default(), 0);
        bytes += quants.iter().map(Quantiles::heap_bytes).sum::<usize>();
        for i in 0..(BATCH as u64 * 30 + 17) {
            let s = (i * 2_654_435_761 % 7) as usize;
            let v = format!("u{}", i % 900);
            want_h[s].insert(v.as_bytes());
            ops.push_hll(s as u32, crate::aggregate::hll::hash(v.as_bytes()));
            let d = Decimal(i128::from((i % 613) as i64 - 40) * 1_000_000);
            assert!(want_q[s].insert_decimal(d));
            let p = proto.place_decimal_cached(d, &mut cache).expect("a value");
            ops.push_quantile(s as u32, p);
            if ops.full() {
                ops.apply(&mut hlls, &mut quants, &mut bytes);
            }
        }
        assert!(!ops.is_empty());
        ops.apply(&mut hlls, &mut quants, &mut bytes);
        assert!(ops.is_empty());
        assert_eq!(hlls, want_h);
        assert_eq!(quants, want_q);
        let heap: usize = hlls.iter().map(Hll::heap_bytes).sum::<usize>()
            + quants.iter().map(Quantiles::heap_bytes).sum::<usize>();
        assert_eq!(bytes, heap);
    }
}
