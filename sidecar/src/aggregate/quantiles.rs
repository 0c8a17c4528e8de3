//! Quantiles: a mergeable log-bucketed histogram (DDSketch, Masson, Rim & Lee, VLDB 2019)
//! that plain PostgreSQL reads through the SQL functions in `db/quantiles.sql`.
//!
//! With relative accuracy α, γ = (1+α)/(1−α). A value x > 0 falls in bucket
//! k = ⌈log_γ x⌉, i.e. γ^(k−1) < x ≤ γ^k, and the bucket stands for 2·γ^k/(1+γ): every value
//! of the bucket is within α of it, relatively. A negative value falls in the bucket of |x| on
//! a separate negative side, and values with |x| < [`ZERO_LIMIT`] (as from an exact decimal,
//! only 0 itself) are counted in a zero bucket that stands for 0. Merging adds bucket counts,
//! so it is exact and order-free: any split of the values, merged in any order, is the same
//! sketch as one pass.
//!
//! [`Quantiles::quantile`]`(q)` returns the representative of the bucket holding the value of
//! 0-based rank ⌊q·(n−1)⌋ in sorted order (DDSketch's rank q·(n−1); `percentile_disc(q)` picks
//! rank ⌈q·n⌉−1, one rank away at most). Hence the guarantee: for values in [1e-6, 1e9] (and
//! far beyond: any 1e-9 ≤ |x| ≤ 1e300), |estimate − exact| ≤ α·|exact|, up to the last
//! bits of the floating-point logarithm at a bucket's very edge.
//!
//! In PostgreSQL the sketch is the composite type `logtally_quantiles` (see
//! [`Quantiles::to_sql_literal`]): `(alpha float8, zero int8, pos_keys int4[],
//! pos_counts int8[], neg_keys int4[], neg_counts int8[])`, keys ascending, counts > 0, an
//! empty side NULL. Only non-empty buckets are stored; request times between 1 µs and 100 s span at most
//! ⌈ln(10⁸)/ln γ⌉ + 1 = 922 buckets at α = 1%.
//!
//! In memory: 88 bytes inline, and per side either 16 bytes per non-empty bucket or, when
//! the buckets are packed, 4 bytes per key of their span (see `buckets.rs`; at most 48 bytes
//! a non-empty bucket, [`Quantiles::heap_bytes`]).

mod buckets;

use std::fmt::Write as _;

use crate::aggregate::Decimal;
use buckets::Buckets;

/// The default relative accuracy: 1%.
pub const DEFAULT_ALPHA: f64 = 0.01;
/// The smallest accuracy accepted (0.01%): keeps keys far inside `i32`.
pub const MIN_ALPHA: f64 = 0.0001;
/// The largest accuracy accepted (10%).
pub const MAX_ALPHA: f64 = 0.1;
/// Values with a smaller magnitude count as zero (below an exact decimal's 9 digits).
pub const ZERO_LIMIT: f64 = 1e-9;
/// Values with a larger magnitude are refused (their bucket's value would overflow `f64`);
/// an exact decimal stays below 10¹⁸.
pub const MAX_MAGNITUDE: f64 = 1e300;

/// A mergeable quantile sketch. See the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantiles {
    alpha: f64,
    /// 1 / ln γ.
    multiplier: f64,
    zero: u64,
    /// Count per bucket key.
    pos: Buckets,
    neg: Buckets,
}

/// Why a sketch cannot be made or merged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantilesError {
    #[error("relative accuracy {0} is outside 0.01%..10%")]
    Alpha(f64),
    #[error("cannot merge sketches of relative accuracy {0} and {1}")]
    AlphaMismatch(f64, f64),
    #[error("quantile sketch: {0}")]
    Parts(&'static str),
}

/// The fields of the SQL composite, as a client reads or binds them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuantilesParts {
    pub alpha: f64,
    pub zero: i64,
    pub pos_keys: Vec<i32>,
    pub pos_counts: Vec<i64>,
    pub neg_keys: Vec<i32>,
    pub neg_counts: Vec<i64>,
}

impl Quantiles {
    /// An empty sketch of relative accuracy `alpha` (0.01 is 1%).
    pub fn new(alpha: f64) -> Result<Quantiles, QuantilesError> {
        if !(MIN_ALPHA..=MAX_ALPHA).contains(&alpha) {
            return Err(QuantilesError::Alpha(alpha));
        }
        Ok(Quantiles {
            alpha,
            multiplier: 1.0 / gamma(alpha).ln(),
            zero: 0,
            pos: Buckets::default(),
            neg: Buckets::default(),
        })
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Values added.
    pub fn count(&self) -> u64 {
        self.zero + self.pos.count() + self.neg.count()
    }

    pub fn is_empty(&self) -> bool {
        self.zero == 0 && self.pos.is_empty() && self.neg.is_empty()
    }

    /// Heap bytes held (for memory accounting; `size_of::<Quantiles>()` is the inline part).
    pub fn heap_bytes(&self) -> usize {
        self.pos.heap_bytes() + self.neg.heap_bytes()
    }

    /// Adds a value. Returns false (and adds nothing) for NaN, infinities and magnitudes
    /// above [`MAX_MAGNITUDE`].
    #[inline]
    pub fn insert(&mut self, x: f64) -> bool {
        match self.place(x) {
            Some(p) => {
                self.add_at(p);
                true
            }
            None => false,
        }
    }

    /// The bucket `x` falls in (`None` for NaN, infinities and magnitudes above
    /// [`MAX_MAGNITUDE`]).
    #[inline]
    fn place(&self, x: f64) -> Option<Place> {
        let magnitude = x.abs();
        if magnitude.is_nan() || magnitude > MAX_MAGNITUDE {
            return None;
        }
        if magnitude < ZERO_LIMIT {
            return Some(Place::Zero);
        }
        let key = (magnitude.ln() * self.multiplier).ceil() as i32;
        Some(if x > 0.0 {
            Place::Pos(key)
        } else {
            Place::Neg(key)
        })
    }

    /// Reads the memory [`add_at`](Quantiles::add_at) of `p` would touch first, and nothing
    /// else (see [`Hll::peek`](super::hll::Hll::peek)); the result means nothing.
    #[inline]
    pub fn peek(&self, p: Place) -> u64 {
        match p {
            Place::Zero => self.zero,
            Place::Pos(key) => self.pos.peek(key),
            Place::Neg(key) => self.neg.peek(key),
        }
    }

    /// Counts one value in bucket `p` (from [`place_decimal_cached`](Quantiles::place_decimal_cached)
    /// of a sketch of the same accuracy).
    #[inline]
    pub fn add_at(&mut self, p: Place) {
        match p {
            Place::Zero => self.zero += 1,
            Place::Pos(key) => self.pos.add(key, 1),
            Place::Neg(key) => self.neg.add(key, 1),
        }
    }

    /// Adds an exact decimal (a field value read by the numeric-list rule).
    #[inline]
    pub fn insert_decimal(&mut self, d: Decimal) -> bool {
        self.insert(decimal_to_f64(d))
    }

    /// The bucket of an exact decimal in every sketch of this one's accuracy (`None`: not a
    /// value a sketch holds), looked up in `cache` first (for sketches of this accuracy):
    /// logged values such as request times repeat, and a hit saves the logarithm. Same
    /// buckets as without the cache. Touches only `cache` and this sketch's accuracy, so
    /// the aggregator can place a value before it touches the row's sketch
    /// ([`add_at`](Quantiles::add_at)).
    #[inline]
    pub fn place_decimal_cached(&self, d: Decimal, cache: &mut PlaceCache) -> Option<Place> {
        let Ok(units) = i64::try_from(d.0) else {
            return self.place(decimal_to_f64(d));
        };
        let slot = &mut cache.slots[cache_slot(units)];
        if let Some((u, p)) = *slot {
            if u == units {
                return Some(p);
            }
        }
        let p = self.place(decimal_to_f64(d))?;
        *slot = Some((units, p));
        Some(p)
    }

    /// Adds every value of `other`. Both must have the same accuracy.
    pub fn merge(&mut self, other: &Quantiles) -> Result<(), QuantilesError> {
        if self.alpha != other.alpha {
            return Err(QuantilesError::AlphaMismatch(self.alpha, other.alpha));
        }
        self.zero += other.zero;
        self.pos.merge(&other.pos);
        self.neg.merge(&other.neg);
        Ok(())
    }

    /// The estimate of quantile `q` ∈ [0, 1] (`None` when empty or `q` is outside).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * (n - 1) as f64;
        let mut cumulative = 0u64;
        // Sorted order: the most negative first (negative keys descending), zero, positive.
        for (key, c) in self.neg.iter().rev() {
            cumulative += c;
            if cumulative as f64 > rank {
                return Some(-self.representative(key));
            }
        }
        cumulative += self.zero;
        if cumulative as f64 > rank {
            return Some(0.0);
        }
        for (key, c) in self.pos.iter() {
            cumulative += c;
            if cumulative as f64 > rank {
                return Some(self.representative(key));
            }
        }
        // Unreachable: the last bucket's cumulative count is n > rank.
        self.pos
            .iter()
            .next_back()
            .map(|(k, _)| self.representative(k))
    }

    /// The value bucket `key` stands for: 2·γ^key/(1+γ). The SQL function
    /// `logtally_quantile` computes it with the same operations (`power`), so both agree to
    /// the bit.
    fn representative(&self, key: i32) -> f64 {
        let g = gamma(self.alpha);
        2.0 * g.powf(f64::from(key)) / (1.0 + g)
    }

    /// The composite's text form, for `$1::text::logtally_quantiles`, e.g.
    /// `(0.01,2,"{-5,17}","{1,3}",{},{})`.
    pub fn to_sql_literal(&self) -> String {
        let mut out = String::with_capacity(32 + 24 * (self.pos.len() + self.neg.len()));
        // `{}` of an f64 is its shortest exact decimal: float8 reads back the same bits.
        let _ = write!(out, "({},{},", self.alpha, self.zero);
        for (i, side) in [&self.pos, &self.neg].into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_array(&mut out, side.len(), side.iter().map(|(k, _)| i64::from(k)));
            out.push(',');
            write_array(&mut out, side.len(), side.iter().map(|(_, c)| c as i64));
        }
        out.push(')');
        out
    }

    /// The composite's fields.
    pub fn to_parts(&self) -> QuantilesParts {
        let keys = |s: &Buckets| s.iter().map(|(k, _)| k).collect();
        let counts = |s: &Buckets| s.iter().map(|(_, c)| c as i64).collect();
        QuantilesParts {
            alpha: self.alpha,
            zero: self.zero as i64,
            pos_keys: keys(&self.pos),
            pos_counts: counts(&self.pos),
            neg_keys: keys(&self.neg),
            neg_counts: counts(&self.neg),
        }
    }

    /// A sketch from the composite's fields (as read back from PostgreSQL). Keys need not be
    /// sorted nor unique; counts must not be negative.
    pub fn from_parts(p: &QuantilesParts) -> Result<Quantiles, QuantilesError> {
        let mut s = Quantiles::new(p.alpha)?;
        s.zero = u64::try_from(p.zero).map_err(|_| QuantilesError::Parts("negative zero count"))?;
        for (side, keys, counts) in [
            (&mut s.pos, &p.pos_keys, &p.pos_counts),
            (&mut s.neg, &p.neg_keys, &p.neg_counts),
        ] {
            if keys.len() != counts.len() {
                return Err(QuantilesError::Parts("keys and counts differ in length"));
            }
            for (&k, &c) in keys.iter().zip(counts) {
                let c = u64::try_from(c).map_err(|_| QuantilesError::Parts("negative count"))?;
                if c > 0 {
                    side.add(k, c);
                }
            }
        }
        Ok(s)
    }
}

/// Which bucket a value falls in (of any sketch of the same accuracy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Zero,
    Pos(i32),
    Neg(i32),
}

const CACHE_SLOTS: usize = 512;

/// Recently seen decimals (in units of 10⁻⁹) and their buckets, direct-mapped: 8 KiB, for
/// one accuracy (one aggregator rule's `quantiles` metric).
#[derive(Debug, Clone)]
pub struct PlaceCache {
    slots: Box<[Option<(i64, Place)>; CACHE_SLOTS]>,
}

impl Default for PlaceCache {
    fn default() -> Self {
        PlaceCache {
            slots: Box::new([None; CACHE_SLOTS]),
        }
    }
}

#[inline]
fn cache_slot(units: i64) -> usize {
    ((units as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - CACHE_SLOTS.trailing_zeros()))
        as usize
}

/// Through i64 when it fits: the same correctly rounded f64 as from i128, without the slower
/// 128-bit conversion.
#[inline]
fn decimal_to_f64(d: Decimal) -> f64 {
    let units = match i64::try_from(d.0) {
        Ok(v) => v as f64,
        Err(_) => d.0 as f64,
    };
    units / Decimal::ONE as f64
}

fn gamma(alpha: f64) -> f64 {
    (1.0 + alpha) / (1.0 - alpha)
}

/// An array of the composite's text form; an empty one is NULL (nothing between the commas),
/// which PostgreSQL stores in one bit instead of a 16-byte empty array.
fn write_array(out: &mut String, len: usize, items: impl Iterator<Item = i64>) {
    if len == 0 {
        return;
    }
    let quoted = len > 1;
    if quoted {
        out.push('"');
    }
    out.push('{');
    for (i, v) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v}");
    }
    out.push('}');
    if quoted {
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small deterministic generator (xorshift64*), so the tests need no crate.
    struct Rng(u64);
    impl Rng {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((r >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.unit(), self.unit());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    fn sketch(alpha: f64, values: &[f64]) -> Quantiles {
        let mut s = Quantiles::new(alpha).unwrap();
        for &v in values {
            assert!(s.insert(v));
        }
        s
    }

    /// Every quantile within α of the exact value at rank ⌊q·(n−1)⌋.
    fn assert_accurate(alpha: f64, values: &[f64], what: &str) {
        let s = sketch(alpha, values);
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let qs = [
            0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0,
        ];
        for q in qs {
            let exact = sorted[(q * (sorted.len() - 1) as f64).floor() as usize];
            let est = s.quantile(q).unwrap();
            let err = (est - exact).abs();
            assert!(
                err <= alpha * exact.abs() * (1.0 + 1e-12),
                "{what}, α {alpha}, q {q}: estimate {est}, exact {exact}, relative error {}",
                err / exact.abs()
            );
        }
    }

    #[test]
    fn accurate_for_uniform_log_normal_and_two_peaks() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let n = 50_000;
        let uniform: Vec<f64> = (0..n).map(|_| 1e-6 + rng.unit() * (1e9 - 1e-6)).collect();
        let small_uniform: Vec<f64> = (0..n).map(|_| 0.001 + rng.unit() * 2.0).collect();
        let log_normal: Vec<f64> = (0..n).map(|_| (rng.normal() * 2.0 - 3.0).exp()).collect();
        let two_peaks: Vec<f64> = (0..n)
            .map(|i| {
                let centre = if i % 3 == 0 { 2.5 } else { 0.004 };
                centre * (1.0 + 0.05 * rng.normal()).abs()
            })
            .collect();
        let span: Vec<f64> = (0..n)
            .map(|_| 10f64.powf(-6.0 + 15.0 * rng.unit()))
            .collect();
        for alpha in [DEFAULT_ALPHA, 0.005, 0.02] {
            assert_accurate(alpha, &uniform, "uniform 1e-6..1e9");
            assert_accurate(alpha, &small_uniform, "uniform 0.001..2");
            assert_accurate(alpha, &log_normal, "log-normal");
            assert_accurate(alpha, &two_peaks, "two peaks");
            assert_accurate(alpha, &span, "log-uniform 1e-6..1e9");
        }
    }

    #[test]
    fn bucket_edges_of_exact_powers() {
        // Values at (or a hair off) bucket edges γ^k: still within α.
        let g = gamma(DEFAULT_ALPHA);
        let values: Vec<f64> = (-700..1040)
            .flat_map(|k| {
                let e = g.powi(k);
                [e, e * (1.0 + 1e-15), e * (1.0 - 1e-15)]
            })
            .collect();
        assert_accurate(DEFAULT_ALPHA, &values, "edges");
    }

    #[test]
    fn negatives_zero_and_mixed() {
        let values = [-5.0, -0.25, 0.0, 0.0, 0.0, 1e-12, 0.5, 3.0, 1000.0];
        let s = sketch(DEFAULT_ALPHA, &values);
        assert_eq!(s.count(), 9);
        assert_eq!(s.zero, 4, "0 and 1e-12 are in the zero bucket");
        let close = |a: f64, b: f64| (a - b).abs() <= DEFAULT_ALPHA * b.abs();
        assert!(close(s.quantile(0.0).unwrap(), -5.0));
        assert!(close(s.quantile(0.125).unwrap(), -0.25));
        assert_eq!(s.quantile(0.25).unwrap(), 0.0);
        assert!(close(s.quantile(1.0).unwrap(), 1000.0));
        let negatives: Vec<f64> = (1..2000).map(|i| -f64::from(i) * 0.37).collect();
        assert_accurate(DEFAULT_ALPHA, &negatives, "negatives");
    }

    #[test]
    fn cached_inserts_equal_plain_ones() {
        let mut cache = PlaceCache::default();
        let proto = Quantiles::new(0.01).unwrap();
        let (mut plain, mut cached) = (proto.clone(), proto.clone());
        let mut rng = Rng(7);
        for i in 0..20_000i64 {
            // Repeats (millisecond request times), negatives, zero, colliding slots, i128.
            let units = match i % 4 {
                0 => (rng.unit() * 500.0) as i64 * 1_000_000,
                1 => -((rng.unit() * 1e12) as i64),
                2 => ((i % 7) * (CACHE_SLOTS as i64)) << 20,
                _ => (rng.unit() * 3.0) as i64,
            };
            let d = Decimal(i128::from(units) * if i % 97 == 0 { 1 << 70 } else { 1 });
            // Placed with an empty sketch of the same accuracy, as the aggregator does.
            let place = proto.place_decimal_cached(d, &mut cache);
            assert_eq!(plain.insert_decimal(d), place.is_some());
            if let Some(p) = place {
                cached.add_at(p);
            }
        }
        assert_eq!(plain, cached);
        assert_eq!(plain.to_parts(), cached.to_parts());
    }

    #[test]
    fn edge_cases() {
        assert_eq!(Quantiles::new(0.0), Err(QuantilesError::Alpha(0.0)));
        assert_eq!(Quantiles::new(0.5), Err(QuantilesError::Alpha(0.5)));
        let mut s = Quantiles::new(DEFAULT_ALPHA).unwrap();
        assert_eq!(s.quantile(0.5), None);
        assert!(!s.insert(f64::NAN) && !s.insert(f64::INFINITY));
        assert!(s.is_empty());
        s.insert(7.0);
        assert_eq!(s.quantile(1.5), None);
        assert!((s.quantile(0.5).unwrap() - 7.0).abs() <= 0.07);
        let other = Quantiles::new(0.02).unwrap();
        assert_eq!(
            s.merge(&other),
            Err(QuantilesError::AlphaMismatch(0.01, 0.02))
        );
        // Extreme magnitudes stay within i32 keys at the finest accuracy.
        let mut fine = Quantiles::new(MIN_ALPHA).unwrap();
        assert!(!fine.insert(f64::MAX));
        assert!(fine.insert(MAX_MAGNITUDE) && fine.insert(-MAX_MAGNITUDE));
        assert!(fine.insert(ZERO_LIMIT));
        let rel = (fine.quantile(1.0).unwrap() - MAX_MAGNITUDE).abs() / MAX_MAGNITUDE;
        assert!(rel <= MIN_ALPHA * (1.0 + 1e-9), "{rel}");
    }

    #[test]
    fn sql_literal_and_parts() {
        let s = sketch(0.01, &[-2.0, 0.0, 1.0, 1.0, 50.0]);
        assert_eq!(s.to_sql_literal(), r#"(0.01,1,"{0,196}","{2,1}",{35},{1})"#);
        assert_eq!(sketch(0.01, &[]).to_sql_literal(), "(0.01,0,,,,)");
        assert_eq!(sketch(0.01, &[1.0]).to_sql_literal(), "(0.01,0,{0},{1},,)");
        let back = Quantiles::from_parts(&s.to_parts()).unwrap();
        assert_eq!(back, s);
        let mut parts = s.to_parts();
        parts.pos_counts.pop();
        assert!(Quantiles::from_parts(&parts).is_err());
    }

    #[test]
    fn memory_per_sketch() {
        assert_eq!(std::mem::size_of::<Quantiles>(), 88);
        let s = sketch(0.01, &[0.1, 0.1, 0.2]);
        assert_eq!(s.heap_bytes(), 4 * 16, "first allocation holds 4 buckets");
        let mut wide = Quantiles::new(0.01).unwrap();
        for i in 1..=100 {
            wide.insert_decimal(Decimal(i * 1_000_000_000));
        }
        assert_eq!(wide.count(), 100);
        let buckets = wide.to_parts().pos_keys.len();
        assert!(
            wide.heap_bytes() <= buckets * 16 * 3 / 2 + 64,
            "{buckets} buckets"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Any split, merged in any order, is the one-pass sketch (exact equality).
        #[test]
        fn merge_of_any_split_is_one_pass(
            values in proptest::collection::vec(
                prop_oneof![-1e6..1e6f64, 1e-6..1e9f64, Just(0.0), -1e-3..1e-3f64], 0..400),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
            reverse in any::<bool>(),
        ) {
            let one = sketch(DEFAULT_ALPHA, &values);
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(values.len() + 1)).collect();
            bounds.extend([0, values.len()]);
            bounds.sort_unstable();
            let mut parts: Vec<Quantiles> =
                bounds.windows(2).map(|w| sketch(DEFAULT_ALPHA, &values[w[0]..w[1]])).collect();
            if reverse {
                parts.reverse();
            }
            let mut merged = Quantiles::new(DEFAULT_ALPHA).unwrap();
            for p in &parts {
                merged.merge(p).unwrap();
            }
            prop_assert_eq!(merged.to_parts(), one.to_parts());
        }
    }
}
