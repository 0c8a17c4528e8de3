//! Durations, the one syntax for every duration key (`flush_interval`, `retain`, a rule's
//! `bucket`): an integer and a unit, `ms`, `s`, `m` (minutes), `h`, `d` (`"100ms"`, `"5s"`,
//! `"1d"`). No fractions, no compound forms, no bare numbers.
//!
//! A bucket is a duration with a rule of its own: whole seconds dividing a day evenly
//! (`1s`…`12h`, e.g. `1m`, `5m`, `15m`, `1h`) or whole days (`1d`, `7d`), so buckets aligned
//! on the Unix epoch start on UTC day boundaries.

use std::time::Duration;

use super::Problem;

/// Parses `"100ms"`, `"5s"`, `"1m"`, `"1h"`, `"1d"`.
pub fn parse_duration(text: &str) -> Result<Duration, Problem> {
    let bad = || Problem::BadDuration(text.to_string());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = text[..digits].parse().map_err(|_| bad())?;
    let unit_ms: u64 = match &text[digits..] {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

pub(crate) const DAY: Duration = Duration::from_secs(86_400);

#[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` is newer than the workspace MSRV
/// Formats a duration the way the file writes it: the largest unit that divides it
/// (`"5s"`, `"100ms"`, `"1d"`), so `parse_duration(&format_duration(d)) == Ok(d)` for
/// whole milliseconds.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A bucket: a duration of whole seconds dividing a day, or of whole days.
#[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` is newer than the workspace MSRV
pub fn parse_bucket(text: &str) -> Result<Duration, Problem> {
    let d = parse_duration(text)?;
    let bad = || Problem::BadBucket(text.to_string());
    if d.is_zero() || d.subsec_nanos() != 0 {
        return Err(bad());
    }
    let secs = d.as_secs();
    let ok = if d <= DAY {
        DAY.as_secs() % secs == 0
    } else {
        secs % DAY.as_secs() == 0
    };
    // Bucket starts are i64 ms; a bucket wider than a few thousand years is a typo.
    if !ok || secs > 366 * 86_400 * 100 {
        return Err(bad());
    }
    Ok(d)
}
