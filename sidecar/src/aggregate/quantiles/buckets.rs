//! One side (positive or negative) of a quantile sketch: bucket key → count.
//!
//! Two in-memory forms, chosen by density, invisible outside (iteration, equality and the
//! SQL form only see the non-empty buckets, keys ascending):
//! - sparse: `(key, count)` of non-empty buckets, keys ascending (16 bytes a bucket), for
//!   few buckets over a wide range;
//! - dense: the counts of every key from `offset` to `offset + counts.len() − 1` (4 bytes a
//!   key of the span, empty ones included), so adding a value is an index, not a binary
//!   search and an insertion that moves the buckets after it.
//!
//! A side turns dense once it holds [`DENSE_MIN`] buckets or more and they span at most
//! [`DENSE_SPAN_FACTOR`]× as many keys (dense bytes ≤ 2× the sparse ones, typically less
//! as the sparse vector grows by half), and back to sparse when a value would stretch the
//! span beyond [`SPARSE_SPAN_FACTOR`]× its non-empty buckets, or a count would pass
//! `u32::MAX` (dense counts are 32-bit, sparse ones 64-bit): memory stays within 48 bytes a
//! non-empty bucket. Request times between 1 µs and 100 s span at most 922 keys at α = 1%
//! (3.7 KiB dense).

/// Fewest non-empty buckets for the dense form.
const DENSE_MIN: usize = 8;
/// Sparse → dense when span ≤ this × non-empty buckets.
const DENSE_SPAN_FACTOR: usize = 8;
/// Dense → sparse when span would exceed this × non-empty buckets.
const SPARSE_SPAN_FACTOR: usize = 12;

#[derive(Debug, Clone)]
pub(super) enum Buckets {
    Sparse(Vec<(i32, u64)>),
    Dense(Dense),
}

#[derive(Debug, Clone)]
pub(super) struct Dense {
    /// The key of `counts[0]`.
    offset: i32,
    /// Non-empty entries of `counts`.
    filled: u32,
    counts: Vec<u32>,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets::Sparse(Vec::new())
    }
}

impl PartialEq for Buckets {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Buckets {
    /// Non-empty buckets.
    pub(super) fn len(&self) -> usize {
        match self {
            Buckets::Sparse(v) => v.len(),
            Buckets::Dense(d) => d.filled as usize,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values counted.
    pub(super) fn count(&self) -> u64 {
        match self {
            Buckets::Sparse(v) => v.iter().map(|&(_, c)| c).sum(),
            Buckets::Dense(d) => d.counts.iter().map(|&c| u64::from(c)).sum(),
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Buckets::Sparse(v) => v.capacity() * std::mem::size_of::<(i32, u64)>(),
            Buckets::Dense(d) => d.counts.capacity() * 4,
        }
    }

    /// Non-empty buckets, keys ascending.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = (i32, u64)> + '_ {
        let (sparse, dense) = match self {
            Buckets::Sparse(v) => (v.as_slice(), None),
            Buckets::Dense(d) => (&[][..], Some(d)),
        };
        let dense = dense.into_iter().flat_map(|d| {
            d.counts
                .iter()
                .enumerate()
                .filter(|&(_, &c)| c > 0)
                .map(move |(i, &c)| (d.offset + i as i32, u64::from(c)))
        });
        sparse.iter().copied().chain(dense)
    }

    /// Adds `n` (> 0) to bucket `key`.
    #[inline]
    pub(super) fn add(&mut self, key: i32, n: u64) {
        match self {
            Buckets::Dense(d) => {
                let i = i64::from(key) - i64::from(d.offset);
                let slot = usize::try_from(i).ok().and_then(|i| d.counts.get_mut(i));
                match slot.map(|c| (c, u32::try_from(n).ok())) {
                    Some((c, Some(n))) if c.checked_add(n).is_some() => {
                        d.filled += u32::from(*c == 0);
                        *c += n;
                    }
                    _ => self.add_outside(key, n),
                }
            }
            Buckets::Sparse(v) => {
                if sparse_add(v, key, n) && v.len() >= DENSE_MIN {
                    let span = span(v[0].0, v[v.len() - 1].0);
                    if span <= DENSE_SPAN_FACTOR * v.len() {
                        if let Some(d) = to_dense(v, span) {
                            *self = Buckets::Dense(d);
                        }
                    }
                }
            }
        }
    }

    /// Reads the memory adding to bucket `key` would touch first (see `Hll::peek`); the
    /// result means nothing.
    #[inline]
    pub(super) fn peek(&self, key: i32) -> u64 {
        match self {
            Buckets::Dense(d) => {
                let i = (i64::from(key) - i64::from(d.offset)).clamp(0, d.counts.len() as i64 - 1);
                d.counts.get(i as usize).map_or(0, |&c| u64::from(c))
            }
            // The middle of a binary search's range: its first probe.
            Buckets::Sparse(v) => v.get(v.len() / 2).map_or(0, |&(_, c)| c),
        }
    }

    /// A dense side's value outside its span: stretch the span, or turn sparse when it would
    /// be too empty. Also a count that 32 bits cannot hold: turn sparse.
    #[cold]
    fn add_outside(&mut self, key: i32, n: u64) {
        let Buckets::Dense(d) = self else {
            unreachable!("only dense sides have a span")
        };
        let last = d.offset + d.counts.len() as i32 - 1;
        let (lo, hi) = (key.min(d.offset), key.max(last));
        let wide = span(lo, hi);
        let inside = (d.offset..=last).contains(&key);
        let narrow = u32::try_from(n).ok();
        if inside || narrow.is_none() || wide > SPARSE_SPAN_FACTOR * (d.filled as usize + 1) {
            let mut v: Vec<(i32, u64)> = Vec::with_capacity(d.filled as usize + 1);
            v.extend(self.iter());
            sparse_add(&mut v, key, n);
            *self = Buckets::Sparse(v);
            return;
        }
        let mut counts = Vec::with_capacity(wide);
        counts.resize((d.offset - lo) as usize, 0);
        counts.extend_from_slice(&d.counts);
        counts.resize(wide, 0);
        counts[(key - lo) as usize] = narrow.expect("checked above");
        d.counts = counts;
        d.offset = lo;
        d.filled += 1;
    }

    /// Adds every bucket of `other`.
    pub(super) fn merge(&mut self, other: &Buckets) {
        if other.is_empty() {
            return;
        }
        match (&mut *self, other) {
            (Buckets::Sparse(mine), Buckets::Sparse(theirs)) => merge_sparse(mine, theirs),
            _ => {
                for (k, c) in other.iter() {
                    self.add(k, c);
                }
            }
        }
    }
}

/// Keys from `lo` to `hi` inclusive.
fn span(lo: i32, hi: i32) -> usize {
    (i64::from(hi) - i64::from(lo) + 1) as usize
}

/// The dense form of a sparse side, unless a count needs more than 32 bits.
fn to_dense(v: &[(i32, u64)], span: usize) -> Option<Dense> {
    let offset = v[0].0;
    let mut counts = vec![0u32; span];
    for &(k, c) in v {
        counts[(k - offset) as usize] = u32::try_from(c).ok()?;
    }
    Some(Dense {
        offset,
        filled: v.len() as u32,
        counts,
    })
}

/// Adds to a sparse side; true when the key is new.
#[inline]
fn sparse_add(side: &mut Vec<(i32, u64)>, key: i32, n: u64) -> bool {
    match side.binary_search_by_key(&key, |&(k, _)| k) {
        Ok(i) => {
            side[i].1 += n;
            false
        }
        Err(i) => {
            if side.len() == side.capacity() {
                // Grow by half (at least 4) rather than double: buckets are most of the memory.
                side.reserve_exact((side.len() / 2).max(4));
            }
            side.insert(i, (key, n));
            true
        }
    }
}

/// Adds `theirs` into `mine` (both sorted by key) in one linear pass.
fn merge_sparse(mine: &mut Vec<(i32, u64)>, theirs: &[(i32, u64)]) {
    let mut out = Vec::with_capacity(mine.len() + theirs.len());
    let (mut a, mut b) = (mine.iter().peekable(), theirs.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(&&(ka, ca)), Some(&&(kb, cb))) if ka == kb => {
                a.next();
                b.next();
                (ka, ca + cb)
            }
            (Some(&&x), Some(&&y)) if x.0 < y.0 => {
                a.next();
                x
            }
            (_, Some(&&y)) => {
                b.next();
                y
            }
            (Some(&&x), None) => {
                a.next();
                x
            }
            (None, None) => break,
        };
        out.push(next);
    }
    *mine = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: a sorted map of the same additions.
    fn model(adds: &[(i32, u64)]) -> Vec<(i32, u64)> {
        let mut m = std::collections::BTreeMap::new();
        for &(k, n) in adds {
            *m.entry(k).or_insert(0) += n;
        }
        m.into_iter().collect()
    }

    #[test]
    fn turns_dense_when_packed_and_sparse_when_stretched() {
        let mut b = Buckets::default();
        for k in 0..DENSE_MIN as i32 {
            b.add(k * 2, 1);
        }
        assert!(matches!(b, Buckets::Dense(_)), "{b:?}");
        assert_eq!(b.heap_bytes(), (2 * DENSE_MIN - 1) * 4);
        b.add(-1, 3);
        b.add(40, 1);
        assert!(matches!(b, Buckets::Dense(_)));
        b.add(10_000, 1);
        assert!(matches!(b, Buckets::Sparse(_)), "{b:?}");
        assert_eq!(b.len(), DENSE_MIN + 3);
        assert_eq!(b.count(), DENSE_MIN as u64 + 5);
    }

    #[test]
    fn counts_past_32_bits_turn_a_dense_side_sparse() {
        for (key, n) in [(4, u64::from(u32::MAX)), (5, 1 << 40), (-3, 1 << 33)] {
            let mut b = Buckets::default();
            for k in 0..DENSE_MIN as i32 {
                b.add(k, 1);
            }
            assert!(matches!(b, Buckets::Dense(_)), "{b:?}");
            b.add(key, n);
            assert!(matches!(b, Buckets::Sparse(_)), "{b:?}");
            let want = model(
                &(0..DENSE_MIN as i32)
                    .map(|k| (k, 1))
                    .chain([(key, n)])
                    .collect::<Vec<_>>(),
            );
            assert_eq!(b.iter().collect::<Vec<_>>(), want);
            // A sparse side holding a big count stays sparse however packed it gets.
            for k in 0..64 {
                b.add(k, 1);
            }
            assert!(matches!(b, Buckets::Sparse(_)), "{b:?}");
            assert_eq!(b.count(), DENSE_MIN as u64 + n + 64);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever the form it takes, a side holds what the sorted map holds, and sides
        /// made of any split, merged, equal it too.
        #[test]
        fn same_as_a_sorted_map(
            adds in proptest::collection::vec(
                (prop_oneof![-40..40i32, -2000..2000i32, Just(i32::MIN), Just(i32::MAX)], 1..5u64),
                0..300),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut b = Buckets::default();
            for &(k, n) in &adds {
                b.add(k, n);
            }
            let want = model(&adds);
            prop_assert_eq!(b.iter().collect::<Vec<_>>(), want.clone());
            prop_assert_eq!(b.iter().rev().collect::<Vec<_>>(),
                want.iter().rev().copied().collect::<Vec<_>>());
            prop_assert_eq!(b.len(), want.len());
            prop_assert_eq!(b.count(), want.iter().map(|&(_, c)| c).sum::<u64>());
            let at = cut.index(adds.len() + 1);
            let (mut x, mut y) = (Buckets::default(), Buckets::default());
            adds[..at].iter().for_each(|&(k, n)| x.add(k, n));
            adds[at..].iter().for_each(|&(k, n)| y.add(k, n));
            x.merge(&y);
            prop_assert!(x == b);
            prop_assert!(b.heap_bytes() <= 48 * b.len() + 64, "{} bytes", b.heap_bytes());
        }
    }
}
