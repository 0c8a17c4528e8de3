//! The variables nginx's log module computes itself whenever it writes a line (its own
//! `ngx_http_log_vars`), whatever the request's variable cache holds: `$body_bytes_sent`
//! read by an `add_header` is cached as 0, yet access_log writes the bytes sent.
//!
//! A field that is one of the numeric ones ([`LogVar`]) is computed here from the request,
//! with access_log's formula and format, without nginx's variable machinery (a pool
//! allocation and an `ngx_sprintf` each). Any of them inside a complex value has its
//! cached value dropped before each record instead ([`computed_at_log_time`]). Plain Rust:
//! the nginx side reads the request's numbers.

/// Every variable access_log computes itself.
const COMPUTED_AT_LOG_TIME: [&str; 9] = [
    "pipe",
    "time_local",
    "time_iso8601",
    "msec",
    "request_time",
    "status",
    "bytes_sent",
    "body_bytes_sent",
    "request_length",
];

/// Whether access_log computes variable `name` afresh when it writes (nginx variable names
/// are case-insensitive).
pub fn computed_at_log_time(name: &str) -> bool {
    COMPUTED_AT_LOG_TIME
        .iter()
        .any(|v| v.eq_ignore_ascii_case(name))
}

/// The numeric variables of [`COMPUTED_AT_LOG_TIME`], which the module computes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogVar {
    /// `%T.%03M` of the current (cached) time.
    Msec,
    /// `%T.%03M` of the time since the request started, never negative.
    RequestTime,
    /// `%03ui` of the error status, else the response status, else 9 for HTTP/0.9, else 0.
    Status,
    /// `%O` of the bytes sent on the connection for the request.
    BytesSent,
    /// `%O` of the bytes sent minus the header's, `0` if not positive.
    BodyBytesSent,
    /// `%O` of the request's length.
    RequestLength,
}

impl LogVar {
    pub fn from_name(name: &str) -> Option<LogVar> {
        const ALL: [(&str, LogVar); 6] = [
            ("msec", LogVar::Msec),
            ("request_time", LogVar::RequestTime),
            ("status", LogVar::Status),
            ("bytes_sent", LogVar::BytesSent),
            ("body_bytes_sent", LogVar::BodyBytesSent),
            ("request_length", LogVar::RequestLength),
        ];
        ALL.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, v)| v)
    }
}

/// Room for the longest value: `-9223372036854775808.999`.
pub const MAX_LEN: usize = 24;

/// Writes `n` in decimal at the start of `out`; returns the length.
pub fn format_int(n: i64, out: &mut [u8; MAX_LEN]) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let sign = usize::from(n < 0);
    out[0] = b'-';
    let len = digits.len() - i;
    out[sign..sign + len].copy_from_slice(&digits[i..]);
    sign + len
}

/// `%T.%03M`: whole seconds, a dot, milliseconds on three digits.
pub fn format_seconds_millis(secs: i64, millis: u64, out: &mut [u8; MAX_LEN]) -> usize {
    let len = format_int(secs, out);
    let m = millis % 1000;
    out[len] = b'.';
    out[len + 1] = b'0' + (m / 100) as u8;
    out[len + 2] = b'0' + (m / 10 % 10) as u8;
    out[len + 3] = b'0' + (m % 10) as u8;
    len + 4
}

/// `%03ui`: at least three digits, zero-padded.
pub fn format_status(status: u64, out: &mut [u8; MAX_LEN]) -> usize {
    if status >= 100 {
        return format_int(status.min(i64::MAX as u64) as i64, out);
    }
    out[0] = b'0' + (status / 100) as u8;
    out[1] = b'0' + (status / 10 % 10) as u8;
    out[2] = b'0' + (status % 10) as u8;
    3
}

/// access_log's `$request_time` from the cached time and the request's start, in ms.
pub fn request_millis(now_sec: i64, now_msec: u64, start_sec: i64, start_msec: u64) -> u64 {
    let ms = (now_sec - start_sec) * 1000 + (now_msec as i64 - start_msec as i64);
    ms.max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut [u8; MAX_LEN]) -> usize) -> String {
        let mut out = [0u8; MAX_LEN];
        let len = f(&mut out);
        String::from_utf8(out[..len].to_vec()).unwrap()
    }

    #[test]
    fn formats_as_ngx_sprintf_does() {
        assert_eq!(s(|o| format_int(0, o)), "0");
        assert_eq!(s(|o| format_int(175, o)), "175");
        assert_eq!(s(|o| format_int(-42, o)), "-42");
        assert_eq!(s(|o| format_int(i64::MIN, o)), "-9223372036854775808");
        assert_eq!(s(|o| format_int(i64::MAX, o)), "9223372036854775807");
        assert_eq!(s(|o| format_seconds_millis(0, 1, o)), "0.001");
        assert_eq!(s(|o| format_seconds_millis(12, 340, o)), "12.340");
        assert_eq!(
            s(|o| format_seconds_millis(1_796_000_000, 999, o)),
            "1796000000.999"
        );
        assert_eq!(
            s(|o| format_seconds_millis(i64::MIN, 999, o)).len(),
            MAX_LEN
        );
        assert_eq!(s(|o| format_status(200, o)), "200");
        assert_eq!(s(|o| format_status(9, o)), "009");
        assert_eq!(s(|o| format_status(0, o)), "000");
        assert_eq!(s(|o| format_status(42, o)), "042");
        assert_eq!(s(|o| format_status(1000, o)), "1000");
    }

    #[test]
    fn request_time_is_never_negative() {
        assert_eq!(request_millis(10, 5, 9, 995), 10);
        assert_eq!(request_millis(10, 500, 10, 200), 300);
        // The clock stepped back.
        assert_eq!(request_millis(9, 0, 10, 0), 0);
    }

    #[test]
    fn names() {
        assert!(computed_at_log_time("body_bytes_sent"));
        assert!(computed_at_log_time("Status"));
        assert!(!computed_at_log_time("arg_status"));
        assert!(!computed_at_log_time("upstream_response_time"));
        assert_eq!(LogVar::from_name("Request_Time"), Some(LogVar::RequestTime));
        assert_eq!(LogVar::from_name("time_local"), None);
        assert!([
            "msec",
            "status",
            "bytes_sent",
            "body_bytes_sent",
            "request_length"
        ]
        .iter()
        .all(|n| LogVar::from_name(n).is_some() && computed_at_log_time(n)));
    }
}
