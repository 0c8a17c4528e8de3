//! How a rule reads a field as a number: one rule, here, for every place that reads one
//! (`sum`, `min`, `max`, `quantiles`, comparisons in conditions).
//!
//! A value is either one exact decimal ([`Decimal::parse`]: `42`, `-3`, `0.005`) or a *list*
//! of them in nginx's upstream forms: `0.000, 0.001` (tries within one upstream group) and
//! `0.002 : 0.010` (across internal redirects), mixed freely, separators written exactly
//! `", "` and `" : "`. In a list, `-` elements (nginx's "no value" for a try that got no
//! response) are skipped; the list reads as its largest number for `max`, its smallest for
//! `min`, and the sum of its numbers everywhere else (the total time spent upstream).
//!
//! An empty value is *no value* (nothing to count, nothing wrong). Anything else that is not
//! such a list, and a value with no number at all (a lone `-`), is a *bad value* that the
//! caller counts.

use crate::aggregate::Decimal;

/// Which number a list reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The sum of the numbers: `sum`, `quantiles`, comparisons.
    Sum,
    /// The smallest number: `min`.
    Min,
    /// The largest number: `max`.
    Max,
}

/// What a field value reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numeric {
    /// An empty value: no number, not an error.
    Empty,
    /// Not a number nor a list of numbers (counted by the caller).
    Bad,
    Value(Decimal),
}

/// Reads `value` as a number the way [`Reading`] asks. Allocates nothing.
#[inline]
pub fn read_number(value: &[u8], reading: Reading) -> Numeric {
    if value.is_empty() {
        return Numeric::Empty;
    }
    if let Some(d) = Decimal::parse(value) {
        return Numeric::Value(d);
    }
    read_list(value, reading)
}

/// The list forms (the plain number was tried first).
fn read_list(value: &[u8], reading: Reading) -> Numeric {
    let mut acc: Option<i128> = None;
    let mut rest = value;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == b',' || b == b' ')
            .unwrap_or(rest.len());
        let element = &rest[..end];
        if element != b"-" {
            let Some(Decimal(v)) = Decimal::parse(element) else {
                return Numeric::Bad;
            };
            acc = Some(match (acc, reading) {
                (None, _) => v,
                (Some(a), Reading::Sum) => match a.checked_add(v) {
                    Some(s) => s,
                    None => return Numeric::Bad,
                },
                (Some(a), Reading::Min) => a.min(v),
                (Some(a), Reading::Max) => a.max(v),
            });
        }
        rest = &rest[end..];
        if rest.is_empty() {
            break;
        }
        rest = if let Some(r) = rest.strip_prefix(b", ") {
            r
        } else if let Some(r) = rest.strip_prefix(b" : ") {
            r
        } else {
            return Numeric::Bad;
        };
        if rest.is_empty() {
            return Numeric::Bad;
        }
    }
    match acc {
        Some(v) => Numeric::Value(Decimal(v)),
        None => Numeric::Bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(s: &str, r: Reading) -> Numeric {
        read_number(s.as_bytes(), r)
    }

    fn num(s: &str) -> Numeric {
        Numeric::Value(Decimal::parse(s.as_bytes()).unwrap())
    }

    #[test]
    fn single_numbers_read_as_themselves() {
        for r in [Reading::Sum, Reading::Min, Reading::Max] {
            assert_eq!(read("0.302", r), num("0.302"));
            assert_eq!(read("-4", r), num("-4"));
            assert_eq!(read("", r), Numeric::Empty);
            assert_eq!(
                read("-", r),
                Numeric::Bad,
                "a lone '-' is bad, as before lists"
            );
            assert_eq!(read("abc", r), Numeric::Bad);
        }
    }

    #[test]
    fn lists_read_as_sum_min_max() {
        let v = "0.000, 0.001 : 0.250, -";
        assert_eq!(read(v, Reading::Sum), num("0.251"));
        assert_eq!(read(v, Reading::Min), num("0"));
        assert_eq!(read(v, Reading::Max), num("0.25"));
        assert_eq!(read("1 : 2 : 3", Reading::Sum), num("6"));
        assert_eq!(read("-, 0.5", Reading::Max), num("0.5"));
        assert_eq!(read("502, 504", Reading::Min), num("502"));
        assert_eq!(read("-, -", Reading::Sum), Numeric::Bad);
    }

    #[test]
    fn malformed_lists_are_bad() {
        for v in [
            "1,2", "1 ,2", "1,  2", "1, ", ", 1", "1 :2", "1: 2", "1 : ", "1, x", "1;2", " 1",
            "1 ", "1, , 2", "1e3, 2",
        ] {
            assert_eq!(read(v, Reading::Sum), Numeric::Bad, "{v:?}");
        }
    }

    #[test]
    fn long_lists_sum_exactly() {
        let big = "999999999999999999.999999999";
        let many = vec![big; 20_000].join(" : ");
        assert_eq!(read(&many, Reading::Max), num(big));
        let Numeric::Value(Decimal(v)) = read(&many, Reading::Sum) else {
            panic!("a list of 20,000 numbers is a value");
        };
        assert_eq!(v, 20_000 * Decimal::parse(big.as_bytes()).unwrap().0);
    }
}
