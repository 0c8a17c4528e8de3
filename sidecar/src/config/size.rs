//! Sizes, the one syntax for every size key: an integer and an optional binary unit, `k`,
//! `m`, `g` (any case, as nginx writes them: `64m`) or `KiB`, `MiB`, `GiB`; a bare integer
//! is bytes. `m` here is mebibytes, whatever it means in a duration: each key has one type,
//! and its type decides the parser. Decimal units (`MB`) are refused rather than guessed.
//!
//! No key takes a size yet (the binlog rotates at a fixed 16 MiB); keys that bound bytes
//! parse with [`parse_size`] and show with [`format_size`].

use super::Problem;

const UNITS: [(&str, &str, u32); 3] = [("k", "KiB", 10), ("m", "MiB", 20), ("g", "GiB", 30)];

/// Parses `"4096"`, `"64k"`, `"16m"`, `"16MiB"`, `"1G"` into bytes.
pub fn parse_size(text: &str) -> Result<u64, Problem> {
    let bad = || Problem::BadSize(text.to_string());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = text[..digits].parse().map_err(|_| bad())?;
    let unit = &text[digits..];
    let shift = if unit.is_empty() {
        0
    } else {
        UNITS
            .iter()
            .find(|(short, long, _)| unit.eq_ignore_ascii_case(short) || unit == *long)
            .map(|&(_, _, shift)| shift)
            .ok_or_else(bad)?
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Formats a size the way a file may write it: the largest unit that divides it (`"16MiB"`,
/// `"4097"`), so `parse_size(&format_size(n)) == Ok(n)`.
pub fn format_size(bytes: u64) -> String {
    for &(_, long, shift) in UNITS.iter().rev() {
        let unit = 1u64 << shift;
        if bytes != 0 && bytes & (unit - 1) == 0 {
            return format!("{}{long}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("64k", 64 << 10),
            ("64K", 64 << 10),
            ("64KiB", 64 << 10),
            ("16m", 16 << 20),
            ("16MiB", 16 << 20),
            ("1G", 1 << 30),
            ("2GiB", 2 << 30),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for n in [0, 1, 1023, 1024, 1536 << 10, 16 << 20, 3 << 30] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
        assert_eq!(format_size(16 << 20), "16MiB");
        assert_eq!(format_size(4097), "4097");
        for bad in [
            "",
            "m",
            "16 m",
            "16MB",
            "16mib",
            "16ms",
            "1.5m",
            "-1",
            "1t",
            "99999999999999g",
        ] {
            assert_eq!(parse_size(bad), Err(Problem::BadSize(bad.into())), "{bad}");
        }
    }
}
