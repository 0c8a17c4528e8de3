//! Distinct counts: a HyperLogLog sketch that PostgreSQL's `hll` extension reads as its own.
//!
//! [`Hll`] builds, in memory, exactly what the extension (postgresql-hll, its `STORAGE`
//! specification, schema version 1) builds for the same set of values with its default
//! parameters — log2m 11 (2,048 registers), regwidth 5, expthresh -1 (auto), sparse on — and
//! [`Hll::encode`] writes the bytes `hll_send` would: a sketch of a set equals
//! `hll_add_agg(hll_hash_text(v))` over that set, byte for byte, and [`Hll::merge`] equals
//! `hll_union`.
//!
//! Values are hashed like `hll_hash_text` / `hll_hash_bytea` (seed 0): MurmurHash3 x64
//! 128-bit, first 64-bit half ([`hash`]). Pass the bytes PostgreSQL's `text` would hold
//! (valid UTF-8, no NUL) so that SQL over a raw table agrees. The estimate itself is
//! PostgreSQL's: `hll_cardinality(hll_union_agg(col))`.
//!
//! Why the representation is a pure function of the set of hashes (so merge of any split
//! equals one pass): the extension keeps up to [`EXPLICIT_MAX`] distinct hashes as a sorted
//! list (EXPLICIT) and promotes to 2,048 registers once one more arrives; registers only ever
//! grow (each is the max over its hashes). At write time registers are packed SPARSE (16 bits
//! per non-zero register) when that is smaller than FULL (5 bits × 2,048 = 1,280 bytes), i.e.
//! while fewer than [`SPARSE_MAX_FILLED`] + 1 registers are non-zero, else FULL.
//!
//! Memory: 24 bytes inline; an explicit sketch holds its distinct hashes in a hash table
//! (`explicit.rs`: 8 bytes a slot, at most 3/4 full, ≤ 2,048 bytes), a register sketch
//! 2,048 bytes (one byte per register). [`Hll::heap_bytes`] reports it.

mod explicit;

use std::fmt;

use explicit::{ExplicitSet, Inserted};

/// log2 of the register count (the extension's default `log2m`).
pub const LOG2M: u32 = 11;
/// Register count.
pub const REGISTERS: usize = 1 << LOG2M;
/// Bits per register (the extension's default `regwidth`).
pub const REGWIDTH: u32 = 5;
/// Largest register value.
const MAX_REGISTER: u8 = (1 << REGWIDTH) - 1;
/// Bytes of a FULL register array: 2,048 × 5 bits.
const FULL_BYTES: usize = REGISTERS * REGWIDTH as usize / 8;
/// `expthresh -1` (auto): as many 8-byte hashes as fit in the FULL array's bytes.
pub const EXPLICIT_MAX: usize = FULL_BYTES / 8;
/// SPARSE is written while `filled × (log2m + regwidth) < 2,048 × regwidth` bits.
pub const SPARSE_MAX_FILLED: usize = (REGISTERS * REGWIDTH as usize - 1) / SPARSE_ENTRY_BITS;
const SPARSE_ENTRY_BITS: usize = (LOG2M + REGWIDTH) as usize;

/// Schema version 1 in the high nibble, the type in the low one.
const TYPE_EMPTY: u8 = 0x11;
const TYPE_EXPLICIT: u8 = 0x12;
const TYPE_SPARSE: u8 = 0x13;
const TYPE_FULL: u8 = 0x14;
/// `(regwidth − 1) << 5 | log2m`.
const PARAMS: u8 = ((REGWIDTH as u8 - 1) << 5) | LOG2M as u8;
/// Sparse on (bit 6) and expthresh auto (63).
const CUTOFF: u8 = (1 << 6) | 63;
const HEADER_LEN: usize = 3;

/// A distinct-count sketch in the `hll` extension's default shape. See the module doc.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Hll {
    repr: Repr,
}

#[derive(Clone, PartialEq, Eq, Default)]
enum Repr {
    #[default]
    Empty,
    /// At most [`EXPLICIT_MAX`] distinct hashes (written sorted as signed 64-bit integers,
    /// the extension's order).
    Explicit(ExplicitSet),
    /// One byte per register, and how many are non-zero.
    Registers(Box<[u8; REGISTERS]>, u16),
}

/// Why bytes are not a sketch this type reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HllDecodeError {
    #[error("hll: {0} bytes, shorter than the 3-byte header")]
    Short(usize),
    #[error("hll: schema version/type byte {0:#04x} (expected 0x11..0x14)")]
    Type(u8),
    #[error(
        "hll: parameters {params:#04x}/{cutoff:#04x} are not the defaults \
         (log2m 11, regwidth 5, expthresh -1, sparse on: 0x8b/0x7f)"
    )]
    Parameters { params: u8, cutoff: u8 },
    #[error("hll: {kind} body of {len} bytes is inconsistent")]
    Length { kind: &'static str, len: usize },
    #[error("hll: sparse entries out of order or zero at register {0}")]
    SparseEntry(u16),
}

/// `hll_hash_bytea(v)` / `hll_hash_text(v)` (seed 0) as an unsigned integer: the first
/// 64-bit half of MurmurHash3 x64 128 (Austin Appleby's public-domain algorithm).
#[inline]
pub fn hash(value: &[u8]) -> u64 {
    const C1: u64 = 0x87c3_7b91_1142_53d5;
    const C2: u64 = 0x4cf5_ad43_2745_937f;
    let mix1 = |k: u64| k.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
    let mix2 = |k: u64| k.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
    let le = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let (mut h1, mut h2) = (0u64, 0u64);
    let blocks = value.chunks_exact(16);
    let tail = blocks.remainder();
    for block in blocks {
        h1 ^= mix1(le(&block[..8]));
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= mix2(le(&block[8..]));
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    // The tail's missing bytes are zero, and mixing a zero word changes nothing.
    let mut last = [0u8; 16];
    last[..tail.len()].copy_from_slice(tail);
    h2 ^= mix2(le(&last[8..]));
    h1 ^= mix1(le(&last[..8]));
    let len = value.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    fmix64(h1).wrapping_add(fmix64(h2))
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

impl Hll {
    /// An empty sketch (no allocation).
    pub const fn new() -> Hll {
        Hll { repr: Repr::Empty }
    }

    /// Adds a value (hashed like `hll_hash_bytea`).
    #[inline]
    pub fn insert(&mut self, value: &[u8]) {
        self.insert_hash(hash(value));
    }

    /// Adds an already hashed value (`hll_add(h, hll_hashval(x))`).
    pub fn insert_hash(&mut self, h: u64) {
        match &mut self.repr {
            Repr::Empty => {
                let mut hashes = ExplicitSet::new();
                hashes.insert(h);
                self.repr = Repr::Explicit(hashes);
            }
            Repr::Explicit(hashes) => {
                if hashes.insert(h) == Inserted::Full {
                    let mut regs = Registers::from_hashes(hashes.iter());
                    regs.add(h);
                    self.repr = regs.into_repr();
                }
            }
            Repr::Registers(regs, filled) => add_to_registers(regs, filled, h),
        }
    }

    /// Reads the memory an insert of hash `h` would touch first, and nothing else: a loop of
    /// these over many sketches has all their cache misses in flight at once, so the
    /// inserts that follow find their lines in cache ([`crate::aggregate`]'s batched
    /// inserts). Its result means nothing.
    #[inline]
    pub fn peek(&self, h: u64) -> u64 {
        match &self.repr {
            Repr::Empty => 0,
            Repr::Explicit(hashes) => hashes.peek(h),
            Repr::Registers(regs, _) => u64::from(regs[(h as usize) & (REGISTERS - 1)]),
        }
    }

    /// Adds every value of `other` (`hll_union`).
    pub fn merge(&mut self, other: &Hll) {
        match &other.repr {
            Repr::Empty => {}
            Repr::Explicit(theirs) => {
                for h in theirs.iter() {
                    self.insert_hash(h);
                }
            }
            Repr::Registers(theirs, their_filled) => match &mut self.repr {
                Repr::Registers(regs, filled) => {
                    for (r, &t) in regs.iter_mut().zip(theirs.iter()) {
                        *r = (*r).max(t);
                    }
                    *filled = count_filled(regs);
                }
                Repr::Explicit(mine) => {
                    let mut regs = Registers {
                        regs: theirs.clone(),
                        filled: *their_filled,
                    };
                    for h in mine.iter() {
                        regs.add(h);
                    }
                    self.repr = regs.into_repr();
                }
                Repr::Empty => self.repr = other.repr.clone(),
            },
        }
    }

    /// Whether no value was added.
    pub fn is_empty(&self) -> bool {
        matches!(self.repr, Repr::Empty)
    }

    /// Heap bytes held (for memory accounting; `size_of::<Hll>()` is the inline part).
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Empty => 0,
            Repr::Explicit(hashes) => hashes.heap_bytes(),
            Repr::Registers(..) => REGISTERS,
        }
    }

    /// The bytes `hll_send` writes for the same set (what a `bytea` parameter cast to `hll`
    /// must hold).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// [`encode`](Hll::encode) appending to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match &self.repr {
            Repr::Empty => out.extend_from_slice(&[TYPE_EMPTY, PARAMS, CUTOFF]),
            Repr::Explicit(hashes) => {
                out.reserve(HEADER_LEN + 8 * hashes.len());
                out.extend_from_slice(&[TYPE_EXPLICIT, PARAMS, CUTOFF]);
                for h in hashes.sorted() {
                    out.extend_from_slice(&h.to_be_bytes());
                }
            }
            Repr::Registers(regs, filled) if usize::from(*filled) <= SPARSE_MAX_FILLED => {
                out.reserve(HEADER_LEN + 2 * usize::from(*filled));
                out.extend_from_slice(&[TYPE_SPARSE, PARAMS, CUTOFF]);
                // log2m + regwidth = 16 bits: each entry is exactly two bytes.
                for (i, &r) in regs.iter().enumerate().filter(|(_, &r)| r != 0) {
                    let entry = ((i as u16) << REGWIDTH) | u16::from(r);
                    out.extend_from_slice(&entry.to_be_bytes());
                }
            }
            Repr::Registers(regs, _) => {
                out.reserve(HEADER_LEN + FULL_BYTES);
                out.extend_from_slice(&[TYPE_FULL, PARAMS, CUTOFF]);
                // Registers packed most significant bit first: 8 registers in 5 bytes.
                for group in regs.chunks_exact(8) {
                    let bits = group
                        .iter()
                        .fold(0u64, |acc, &r| (acc << REGWIDTH) | u64::from(r));
                    out.extend_from_slice(&bits.to_be_bytes()[3..]);
                }
            }
        }
    }

    /// Reads bytes [`encode`](Hll::encode) or the extension wrote with the default parameters.
    /// Never panics; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<Hll, HllDecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(HllDecodeError::Short(bytes.len()));
        }
        let (kind, params, cutoff) = (bytes[0], bytes[1], bytes[2]);
        if !(TYPE_EMPTY..=TYPE_FULL).contains(&kind) {
            return Err(HllDecodeError::Type(kind));
        }
        if (params, cutoff) != (PARAMS, CUTOFF) {
            return Err(HllDecodeError::Parameters { params, cutoff });
        }
        let body = &bytes[HEADER_LEN..];
        let bad_length = |kind| HllDecodeError::Length {
            kind,
            len: body.len(),
        };
        let mut sketch = Hll::new();
        match kind {
            TYPE_EMPTY if body.is_empty() => {}
            TYPE_EMPTY => return Err(bad_length("empty")),
            TYPE_EXPLICIT => {
                if !body.len().is_multiple_of(8) {
                    return Err(bad_length("explicit"));
                }
                // Inserting keeps the in-memory form canonical whatever the writer did.
                for chunk in body.chunks_exact(8) {
                    let mut h = [0u8; 8];
                    h.copy_from_slice(chunk);
                    sketch.insert_hash(u64::from_be_bytes(h));
                }
            }
            TYPE_SPARSE => {
                if !body.len().is_multiple_of(2) {
                    return Err(bad_length("sparse"));
                }
                let mut regs = Registers::new();
                let mut next = 0usize;
                for chunk in body.chunks_exact(2) {
                    let entry = u16::from_be_bytes([chunk[0], chunk[1]]);
                    let index = usize::from(entry >> REGWIDTH);
                    let value = (entry & u16::from(MAX_REGISTER)) as u8;
                    if index < next || value == 0 {
                        return Err(HllDecodeError::SparseEntry(entry >> REGWIDTH));
                    }
                    regs.regs[index] = value;
                    regs.filled += 1;
                    next = index + 1;
                }
                sketch.repr = regs.into_repr();
            }
            _ => {
                if body.len() != FULL_BYTES {
                    return Err(bad_length("full"));
                }
                let mut regs = Registers::new();
                for (group, packed) in regs.regs.chunks_exact_mut(8).zip(body.chunks_exact(5)) {
                    let mut b = [0u8; 8];
                    b[3..].copy_from_slice(packed);
                    let bits = u64::from_be_bytes(b);
                    for (k, r) in group.iter_mut().enumerate() {
                        let shift = REGWIDTH * (7 - k as u32);
                        *r = ((bits >> shift) as u8) & MAX_REGISTER;
                    }
                }
                regs.filled = count_filled(&regs.regs);
                sketch.repr = regs.into_repr();
            }
        }
        Ok(sketch)
    }
}

impl fmt::Debug for Hll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Empty => f.write_str("Hll(empty)"),
            Repr::Explicit(h) => write!(f, "Hll(explicit, {} hashes)", h.len()),
            Repr::Registers(_, filled) => write!(f, "Hll(registers, {filled} filled)"),
        }
    }
}

/// Registers being built (before they become a [`Repr`]).
struct Registers {
    regs: Box<[u8; REGISTERS]>,
    filled: u16,
}

impl Registers {
    fn new() -> Registers {
        Registers {
            regs: Box::new([0; REGISTERS]),
            filled: 0,
        }
    }

    fn from_hashes(hashes: impl Iterator<Item = u64>) -> Registers {
        let mut r = Registers::new();
        for h in hashes {
            r.add(h);
        }
        r
    }

    fn add(&mut self, h: u64) {
        add_to_registers(&mut self.regs, &mut self.filled, h);
    }

    fn into_repr(self) -> Repr {
        Repr::Registers(self.regs, self.filled)
    }
}

/// The extension's `compressed_add`: the low log2m bits pick the register, the rest give
/// 1 + the number of trailing zeros (capped at the register's maximum; 0 when all are zero).
#[inline]
fn add_to_registers(regs: &mut [u8; REGISTERS], filled: &mut u16, h: u64) {
    let index = (h as usize) & (REGISTERS - 1);
    let rest = h >> LOG2M;
    if rest == 0 {
        return;
    }
    let value = (rest.trailing_zeros() + 1).min(u32::from(MAX_REGISTER)) as u8;
    let r = &mut regs[index];
    if *r == 0 {
        *filled += 1;
    }
    if *r < value {
        *r = value;
    }
}

fn count_filled(regs: &[u8; REGISTERS]) -> u16 {
    regs.iter().filter(|&&r| r != 0).count() as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(values: impl IntoIterator<Item = String>) -> Hll {
        let mut h = Hll::new();
        for v in values {
            h.insert(v.as_bytes());
        }
        h
    }

    fn users(range: std::ops::Range<u32>) -> impl Iterator<Item = String> {
        range.map(|i| format!("u{i}"))
    }

    #[test]
    fn constants_match_the_extension_defaults() {
        assert_eq!(PARAMS, 0x8b);
        assert_eq!(CUTOFF, 0x7f);
        assert_eq!(FULL_BYTES, 1280);
        assert_eq!(EXPLICIT_MAX, 160);
        assert_eq!(SPARSE_MAX_FILLED, 639);
    }

    #[test]
    fn hash_is_murmur3_x64_128_first_half() {
        // Seed 0 and no input: both halves stay 0 through the finalisation.
        // (Other values are checked against PostgreSQL's `hll_hash_text` in tests/sketches.rs.)
        assert_eq!(hash(b""), 0);
        assert_ne!(hash(b"a"), hash(b"b"));
    }

    #[test]
    fn representations_follow_the_set_size() {
        assert_eq!(Hll::new().encode(), vec![0x11, 0x8b, 0x7f]);
        let one = build(users(0..1));
        assert_eq!(one.encode()[0], TYPE_EXPLICIT);
        assert_eq!(one.encode().len(), 3 + 8);
        assert_eq!(build(users(0..160)).encode()[0], TYPE_EXPLICIT);
        assert_eq!(build(users(0..161)).encode()[0], TYPE_SPARSE);
        let full = build(users(0..5000)).encode();
        assert_eq!((full[0], full.len()), (TYPE_FULL, 3 + 1280));
    }

    #[test]
    fn duplicates_do_not_change_the_sketch() {
        let once = build(users(0..500));
        let twice = build(users(0..500).chain(users(0..500)));
        assert_eq!(once.encode(), twice.encode());
    }

    #[test]
    fn decode_round_trips_every_representation() {
        for n in [0, 1, 100, 160, 161, 400, 700, 2000, 20_000] {
            let h = build(users(0..n));
            let bytes = h.encode();
            let back = Hll::decode(&bytes).unwrap();
            assert_eq!(back, h, "n = {n}");
            assert_eq!(back.encode(), bytes, "n = {n}");
        }
    }

    #[test]
    fn decode_refuses_bad_bytes() {
        assert_eq!(Hll::decode(&[0x11]), Err(HllDecodeError::Short(1)));
        assert_eq!(
            Hll::decode(&[0x15, 0x8b, 0x7f]),
            Err(HllDecodeError::Type(0x15))
        );
        assert!(matches!(
            Hll::decode(&[0x11, 0x8c, 0x7f]),
            Err(HllDecodeError::Parameters { .. })
        ));
        assert!(matches!(
            Hll::decode(&[0x12, 0x8b, 0x7f, 1, 2, 3]),
            Err(HllDecodeError::Length { .. })
        ));
        assert!(matches!(
            Hll::decode(&[0x14, 0x8b, 0x7f, 0]),
            Err(HllDecodeError::Length { .. })
        ));
        // Register 2 then register 1: out of order.
        assert_eq!(
            Hll::decode(&[0x13, 0x8b, 0x7f, 0, 0x41, 0, 0x21]),
            Err(HllDecodeError::SparseEntry(1))
        );
    }

    #[test]
    fn memory_stays_small_for_few_values() {
        assert_eq!(std::mem::size_of::<Hll>(), 24);
        assert_eq!(Hll::new().heap_bytes(), 0);
        assert_eq!(build(users(0..3)).heap_bytes(), 32);
        assert!(build(users(0..160)).heap_bytes() <= REGISTERS);
        assert_eq!(build(users(0..161)).heap_bytes(), REGISTERS);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any split of the values into parts, merged in any grouping, encodes like one pass.
        #[test]
        fn merge_of_any_split_is_one_pass(
            n in 0u32..3000,
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
            order in any::<bool>(),
        ) {
            let values: Vec<String> = users(0..n).collect();
            let one = build(values.iter().cloned());
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(values.len() + 1)).collect();
            bounds.push(0);
            bounds.push(values.len());
            bounds.sort_unstable();
            let mut parts: Vec<Hll> = bounds
                .windows(2)
                .map(|w| build(values[w[0]..w[1]].iter().cloned()))
                .collect();
            if order {
                parts.reverse();
            }
            let mut merged = Hll::new();
            for p in &parts {
                merged.merge(p);
            }
            prop_assert_eq!(merged.encode(), one.encode());
            // Merging a sketch into itself changes nothing.
            let mut again = merged.clone();
            again.merge(&merged);
            prop_assert_eq!(again, merged);
        }
    }
}
