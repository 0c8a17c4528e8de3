//! The EXPLICIT form's set of distinct hashes, in memory: an open-addressing hash table
//! (linear probing, 0 marks a free slot, the hash 0 itself is a flag), so adding a hash costs
//! a probe or two instead of a binary search and an insertion moving the hashes after it.
//! The extension's order (ascending as signed 64-bit integers) is made only when written
//! ([`ExplicitSet::sorted`]).
//!
//! Slots double from 4 up to 256 and are at most 3/4 full, so the table holds
//! [`EXPLICIT_MAX`] (160) hashes in 2,048 bytes at most: no more than the register form the
//! sketch turns into after them.

use super::EXPLICIT_MAX;

#[derive(Clone)]
pub(super) struct ExplicitSet {
    /// Power-of-two slots; 0 is free.
    slots: Box<[u64]>,
    /// Distinct hashes held (the flagged 0 included).
    len: u16,
    /// The hash 0 is in the set.
    zero: bool,
}

/// What [`ExplicitSet::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Inserted {
    New,
    Present,
    /// New, but the set already holds [`EXPLICIT_MAX`] hashes: not added.
    Full,
}

const FIRST_SLOTS: usize = 4;

impl ExplicitSet {
    pub(super) fn new() -> ExplicitSet {
        ExplicitSet {
            slots: vec![0; FIRST_SLOTS].into_boxed_slice(),
            len: 0,
            zero: false,
        }
    }

    pub(super) fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.slots.len() * 8
    }

    #[inline]
    pub(super) fn insert(&mut self, h: u64) -> Inserted {
        if h == 0 {
            if self.zero {
                return Inserted::Present;
            }
            if self.len() == EXPLICIT_MAX {
                return Inserted::Full;
            }
            self.zero = true;
            self.len += 1;
            return Inserted::New;
        }
        let mask = self.slots.len() - 1;
        let mut i = slot_of(h, mask);
        loop {
            match self.slots[i] {
                0 => break,
                x if x == h => return Inserted::Present,
                _ => i = (i + 1) & mask,
            }
        }
        if self.len() == EXPLICIT_MAX {
            return Inserted::Full;
        }
        if (self.len() + 1) * 4 > self.slots.len() * 3 {
            self.grow();
            self.put(h);
        } else {
            self.slots[i] = h;
        }
        self.len += 1;
        Inserted::New
    }

    /// The slot an insert of `h` probes first (read only: see [`super::Hll::peek`]).
    #[inline]
    pub(super) fn peek(&self, h: u64) -> u64 {
        self.slots[slot_of(h, self.slots.len() - 1)]
    }

    /// Every hash, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let zero = self.zero.then_some(0);
        self.slots.iter().copied().filter(|&h| h != 0).chain(zero)
    }

    /// Every hash, ascending as signed 64-bit integers (the extension's order).
    pub(super) fn sorted(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.iter().collect();
        v.sort_unstable_by_key(|&h| h as i64);
        v
    }

    #[cold]
    fn grow(&mut self) {
        let bigger = vec![0; self.slots.len() * 2].into_boxed_slice();
        let old = std::mem::replace(&mut self.slots, bigger);
        for h in old.iter().copied().filter(|&h| h != 0) {
            self.put(h);
        }
    }

    /// Puts a non-zero hash known to be absent into a free slot.
    fn put(&mut self, h: u64) {
        let mask = self.slots.len() - 1;
        let mut i = slot_of(h, mask);
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = h;
    }
}

/// The home slot: high bits of the hash (its low bits pick the HLL register).
#[inline]
fn slot_of(h: u64, mask: usize) -> usize {
    (h >> 40) as usize & mask
}

impl PartialEq for ExplicitSet {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.sorted() == other.sorted()
    }
}

impl Eq for ExplicitSet {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Holds the distinct hashes a sorted set holds, refuses the 161st, stays small.
        #[test]
        fn same_as_a_sorted_set(
            hashes in proptest::collection::vec(
                prop_oneof![any::<u64>(), 0..8u64, Just(u64::MAX), (0..4u64).prop_map(|x| x << 40)],
                0..300),
        ) {
            let mut set = ExplicitSet::new();
            let mut model = std::collections::BTreeSet::new();
            for &h in &hashes {
                let want = if model.contains(&(h as i64)) {
                    Inserted::Present
                } else if model.len() == EXPLICIT_MAX {
                    Inserted::Full
                } else {
                    model.insert(h as i64);
                    Inserted::New
                };
                prop_assert_eq!(set.insert(h), want);
            }
            let want: Vec<u64> = model.iter().map(|&h| h as u64).collect();
            prop_assert_eq!(set.sorted(), want);
            prop_assert_eq!(set.len(), model.len());
            prop_assert!(set.heap_bytes() <= 2048);
        }
    }
}
