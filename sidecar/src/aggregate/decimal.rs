//! Exact decimals: how a field value becomes a number a metric adds or compares, and how
//! it is written back. Pure.

use std::fmt;

/// An exact decimal: the value times 10⁹, so up to 9 fractional digits are kept exactly.
/// Parsed from field values like `"42"`, `"-3"`, `"0.005"`, `"1e3"` is NOT accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(pub i128);

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

#[cfg(test)]
mod tests {
    use super::*;
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

    proptest! {
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
