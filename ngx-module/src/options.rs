//! Pure parsing of directive arguments: `logtally_spool` options (sizes, times, counts),
//! `logtally_field` names and values, and what the spool folder's file system kind means.
//! No nginx types here, so every rule is unit-tested.

use std::path::Path;
use std::time::Duration;

use logtally_spool::{is_valid_field_name, FileSystemKind, MAX_FIELDS, MAX_FIELD_NAME_LEN};

use crate::queue::Bound;

/// Smallest `segment_size`: a segment must hold its header and at least a few records.
pub const MIN_SEGMENT_SIZE: u64 = 4096;
/// Largest `segment_size` (offsets stay far from any 32-bit limit a reader might have).
pub const MAX_SEGMENT_SIZE: u64 = 1 << 40;
/// Largest `queue` given as a number of records.
pub const MAX_QUEUE_RECORDS: usize = 1 << 24;
/// Smallest and largest `queue` given as a size (a record bigger than the bound is always
/// dropped, so small values suit tests more than production).
pub const MIN_QUEUE_BYTES: u64 = 1 << 10;
pub const MAX_QUEUE_BYTES: u64 = 1 << 30;
/// The default `queue`: what one worker may hold while the disk does not take writes.
pub const DEFAULT_QUEUE: Bound = Bound::Bytes(64 << 20);
/// Longest `flush` interval; events older than this are not "real time" any more.
pub const MAX_FLUSH: Duration = Duration::from_secs(60);
/// Longest `stop_timeout`: a worker shutting down must not linger longer.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(600);

/// Settings of the `logtally_spool` directive besides its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// A segment is sealed once it reaches this many bytes.
    pub segment_size: u64,
    /// How long the writer thread sleeps between batches.
    pub flush: Duration,
    /// What one worker may hold in memory, waiting for the writer (both of its buffers).
    pub queue: Bound,
    /// How often the open segment is fdatasync'ed; `None` for `fsync=off`.
    pub fsync: Option<Duration>,
    /// How long a worker that exits waits for its writer to drain, fsync and seal.
    pub stop_timeout: Duration,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_size: 64 << 20,
            flush: Duration::from_millis(100),
            queue: DEFAULT_QUEUE,
            fsync: Some(Duration::from_secs(1)),
            stop_timeout: Duration::from_secs(3),
        }
    }
}

/// Why a `logtally_spool` option or a `logtally_field` argument is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error(
        "unknown option \"{0}\" (expected segment_size=, flush=, queue=, fsync= or stop_timeout=)"
    )]
    Unknown(String),
    #[error("option \"{0}\" given twice")]
    Duplicate(&'static str),
    #[error(
        "invalid size \"{value}\" for {key} (a number with an optional k, m or g suffix, {range})"
    )]
    Size {
        key: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("invalid time \"{value}\" for {key} (e.g. 100ms, 1s, 2m; {range})")]
    Time {
        key: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("invalid queue \"{0}\" (a size with a k, m or g suffix, 1k to 1g, or a number of records, 1 to {MAX_QUEUE_RECORDS})")]
    Queue(String),
    #[error("invalid field name \"{0}\": 1 to {MAX_FIELD_NAME_LEN} characters of [A-Za-z0-9_], not starting with a digit")]
    FieldName(String),
    #[error("too many fields: at most {MAX_FIELDS} names across the whole configuration")]
    TooManyFields,
    #[error("field \"{0}\" is declared twice at this level")]
    DuplicateField(String),
    #[error("invalid value \"{value}\": {reason}")]
    Value { value: String, reason: &'static str },
    #[error("spool folder \"{path}\" is on {file_system}: the spool must be on a local file system (writer locks)")]
    NetworkFileSystem {
        path: String,
        file_system: &'static str,
    },
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parses an nginx-style size: digits with an optional `k`, `m` or `g` suffix (any case).
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (digits, mult) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    parse_u64(digits)?.checked_mul(mult)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Parses an nginx-style time: one or more `<number><unit>` parts (`ms`, `s`, `m`, `h`, `d`),
/// e.g. `100ms`, `1m30s`; a bare number means seconds, as in nginx.
pub fn parse_time(s: &[u8]) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    if s.iter().all(u8::is_ascii_digit) {
        return parse_u64(s)?.checked_mul(1000).map(Duration::from_millis);
    }
    let mut total_ms = 0u64;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let value = parse_u64(&rest[..n])?;
        rest = &rest[n..];
        let (unit_ms, used) = match rest {
            [b'm', b's', ..] => (1, 2),
            [b's', ..] => (1000, 1),
            [b'm', ..] => (60_000, 1),
            [b'h', ..] => (3_600_000, 1),
            [b'd', ..] => (86_400_000, 1),
            _ => return None,
        };
        rest = &rest[used..];
        total_ms = total_ms.checked_add(value.checked_mul(unit_ms)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

/// Parses `queue=`: a size (`64m`: bytes) or a bare number (records).
fn parse_queue(value: &[u8]) -> Option<Bound> {
    if value.iter().all(u8::is_ascii_digit) {
        let n = usize::try_from(parse_u64(value)?).ok()?;
        return (1..=MAX_QUEUE_RECORDS)
            .contains(&n)
            .then_some(Bound::Records(n));
    }
    let n = parse_size(value).filter(|n| (MIN_QUEUE_BYTES..=MAX_QUEUE_BYTES).contains(n))?;
    Some(Bound::Bytes(usize::try_from(n).ok()?))
}

/// Parses the `key=value` options that follow the folder in `logtally_spool`.
pub fn parse_spool_options<'a, I>(args: I) -> Result<SpoolOptions, OptionError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut opts = SpoolOptions::default();
    let mut seen = [false; 5];
    for arg in args {
        let Some(eq) = arg.iter().position(|&b| b == b'=') else {
            return Err(OptionError::Unknown(lossy(arg)));
        };
        let (key, value) = (&arg[..eq], &arg[eq + 1..]);
        let (slot, name) = match key {
            b"segment_size" => (0, "segment_size"),
            b"flush" => (1, "flush"),
            b"queue" => (2, "queue"),
            b"fsync" => (3, "fsync"),
            b"stop_timeout" => (4, "stop_timeout"),
            _ => return Err(OptionError::Unknown(lossy(arg))),
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(OptionError::Duplicate(name));
        }
        match slot {
            0 => {
                opts.segment_size = parse_size(value)
                    .filter(|n| (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(n))
                    .ok_or_else(|| OptionError::Size {
                        key: name,
                        value: lossy(value),
                        range: "4k to 1024g",
                    })?;
            }
            1 => {
                opts.flush = parse_time(value)
                    .filter(|d| *d >= Duration::from_millis(1) && *d <= MAX_FLUSH)
                    .ok_or_else(|| OptionError::Time {
                        key: name,
                        value: lossy(value),
                        range: "1ms to 60s",
                    })?;
            }
            2 => opts.queue = parse_queue(value).ok_or_else(|| OptionError::Queue(lossy(value)))?,
            4 => {
                opts.stop_timeout = parse_time(value)
                    .filter(|d| *d >= Duration::from_millis(1) && *d <= MAX_STOP_TIMEOUT)
                    .ok_or_else(|| OptionError::Time {
                        key: name,
                        value: lossy(value),
                        range: "1ms to 10m",
                    })?;
            }
            _ => {
                opts.fsync = if value == b"off" {
                    None
                } else {
                    Some(parse_time(value).filter(|d| !d.is_zero()).ok_or_else(|| {
                        OptionError::Time {
                            key: name,
                            value: lossy(value),
                            range: "or off",
                        }
                    })?)
                };
            }
        }
    }
    Ok(opts)
}

/// Checks a `logtally_field` name: it becomes a segment header field and a table column,
/// so it follows the spool's rule ([`is_valid_field_name`]).
pub fn check_field_name(name: &[u8]) -> Result<&str, OptionError> {
    match std::str::from_utf8(name) {
        Ok(s) if is_valid_field_name(name) => Ok(s),
        _ => Err(OptionError::FieldName(lossy(name))),
    }
}

/// What the spool folder's file system means: a network file system is refused, FUSE gets a
/// warning (returned for the caller to log). The segment writers' `flock` locks tell a reader
/// which segments are live, and they are reliable only where one kernel sees every lock.
pub fn file_system_verdict(
    dir: &Path,
    kind: FileSystemKind,
) -> Result<Option<String>, OptionError> {
    match kind {
        FileSystemKind::Local => Ok(None),
        FileSystemKind::Network(file_system) => Err(OptionError::NetworkFileSystem {
            path: dir.display().to_string(),
            file_system,
        }),
        FileSystemKind::Fuse => Ok(Some(format!(
            "spool folder \"{}\" is on a FUSE file system: the writer locks hold only if it \
             is local or its server enforces them; keep the spool on a local file system",
            dir.display()
        ))),
    }
}

/// What a `logtally_field` value is, as far as logtally cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSpec {
    /// Exactly one variable (`$arg_ad`, `${status}`): read directly, so a variable that is
    /// not found is recorded as absent rather than empty.
    Variable(String),
    /// Anything else (text, several variables): evaluated as an nginx complex value; the
    /// names are the variables it uses (regex captures like `$1` are not listed).
    Complex(Vec<String>),
}

fn is_var_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Splits a value into the variables it references, the way nginx's script compiler reads
/// `$name` and `${name}`.
pub fn parse_value(value: &[u8]) -> Result<ValueSpec, OptionError> {
    let err = |reason| OptionError::Value {
        value: lossy(value),
        reason,
    };
    let mut vars = Vec::new();
    let mut only_one_var = false;
    let mut i = 0;
    let mut text = false;
    while i < value.len() {
        if value[i] != b'$' {
            text = true;
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        let name = if value.get(i) == Some(&b'{') {
            let end = value[i..]
                .iter()
                .position(|&b| b == b'}')
                .ok_or(err("missing \"}\""))?;
            let name = &value[i + 1..i + end];
            i += end + 1;
            name
        } else {
            let n = value[i..].iter().take_while(|&&b| is_var_char(b)).count();
            let name = &value[i..i + n];
            i += n;
            name
        };
        if name.is_empty() || !name.iter().all(|&b| is_var_char(b)) {
            return Err(err("invalid variable name"));
        }
        only_one_var = start == 0 && i == value.len();
        if !name[0].is_ascii_digit() {
            vars.push(lossy(name));
        }
    }
    match vars.pop() {
        Some(name) if only_one_var && !text => Ok(ValueSpec::Variable(name)),
        Some(name) => {
            vars.push(name);
            Ok(ValueSpec::Complex(vars))
        }
        None => Ok(ValueSpec::Complex(vars)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"64m"), Some(64 << 20));
        assert_eq!(parse_size(b"1G"), Some(1 << 30));
        assert_eq!(parse_size(b"8k"), Some(8192));
        for bad in [
            &b""[..],
            b"m",
            b"1.5m",
            b"-1",
            b"1t",
            b"99999999999999999999",
            b"1 m",
        ] {
            assert_eq!(parse_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn times() {
        assert_eq!(parse_time(b"100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_time(b"1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_time(b"2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_time(b"1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_time(b"1h"), Some(Duration::from_secs(3600)));
        for bad in [&b""[..], b"ms", b"1x", b"1.5s", b"s1", b"-1s", b"1 s"] {
            assert_eq!(parse_time(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn opts(args: &[&str]) -> Result<SpoolOptions, OptionError> {
        parse_spool_options(args.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn spool_options() {
        assert_eq!(opts(&[]), Ok(SpoolOptions::default()));
        let o = opts(&["segment_size=1m", "flush=20ms", "queue=10", "fsync=off"]).unwrap();
        assert_eq!(o.segment_size, 1 << 20);
        assert_eq!(o.flush, Duration::from_millis(20));
        assert_eq!(o.queue, Bound::Records(10));
        assert_eq!(opts(&["queue=64m"]).unwrap().queue, Bound::Bytes(64 << 20));
        assert_eq!(opts(&["queue=4K"]).unwrap().queue, Bound::Bytes(4096));
        assert_eq!(opts(&["queue=1g"]).unwrap().queue, Bound::Bytes(1 << 30));
        assert_eq!(
            opts(&["queue=16777216"]).unwrap().queue,
            Bound::Records(1 << 24)
        );
        assert_eq!(o.fsync, None);
        assert_eq!(
            opts(&["fsync=5s"]).unwrap().fsync,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            opts(&["stop_timeout=30s"]).unwrap().stop_timeout,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn spool_option_errors() {
        assert!(matches!(
            opts(&["segment_size=lots"]),
            Err(OptionError::Size { .. })
        ));
        assert!(matches!(
            opts(&["segment_size=1k"]),
            Err(OptionError::Size { .. })
        ));
        assert!(matches!(
            opts(&["flush=soon"]),
            Err(OptionError::Time { .. })
        ));
        for bad in ["stop_timeout=0", "stop_timeout=11m", "stop_timeout=never"] {
            assert!(
                matches!(opts(&[bad]), Err(OptionError::Time { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            opts(&["flush=0ms"]),
            Err(OptionError::Time { .. })
        ));
        assert!(matches!(opts(&["flush=2m"]), Err(OptionError::Time { .. })));
        assert!(matches!(opts(&["fsync=0"]), Err(OptionError::Time { .. })));
        for bad in [
            "queue=0",
            "queue=-5",
            "queue=16777217",
            "queue=0k",
            "queue=1023b",
            "queue=2g",
            "queue=64mb",
            "queue=",
            "queue=lots",
        ] {
            let bad_value = &bad["queue=".len()..];
            assert_eq!(
                opts(&[bad]),
                Err(OptionError::Queue(bad_value.into())),
                "{bad}"
            );
        }
        let msg = opts(&["queue=lots"]).unwrap_err().to_string();
        assert!(msg.contains("queue") && msg.contains("lots"), "{msg}");
        assert!(matches!(
            opts(&["colour=red"]),
            Err(OptionError::Unknown(_))
        ));
        assert!(matches!(opts(&["flush"]), Err(OptionError::Unknown(_))));
        assert_eq!(
            opts(&["queue=1", "queue=2"]),
            Err(OptionError::Duplicate("queue"))
        );
        let msg = opts(&["segment_size=lots"]).unwrap_err().to_string();
        assert!(
            msg.contains("segment_size") && msg.contains("lots"),
            "{msg}"
        );
    }

    #[test]
    fn a_network_file_system_is_refused_naming_the_folder_and_the_file_system() {
        let err = file_system_verdict(Path::new("/x"), FileSystemKind::Network("nfs")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spool folder \"/x\" is on nfs: the spool must be on a local file system (writer locks)"
        );
    }

    #[test]
    fn fuse_is_a_warning_and_local_is_fine() {
        let dir = Path::new("/mnt/share/spool");
        let warning = file_system_verdict(dir, FileSystemKind::Fuse)
            .unwrap()
            .expect("a warning");
        assert!(
            warning.contains("\"/mnt/share/spool\" is on a FUSE file system"),
            "{warning}"
        );
        assert_eq!(file_system_verdict(dir, FileSystemKind::Local), Ok(None));
    }

    #[test]
    fn field_names() {
        assert_eq!(check_field_name(b"ad_id2"), Ok("ad_id2"));
        assert!(check_field_name(&[b'x'; 63]).is_ok());
        for bad in [&b""[..], b"2ad", b"a-b", b"a b", b"\xff", &[b'x'; 64]] {
            assert!(
                check_field_name(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn values() {
        assert_eq!(
            parse_value(b"$arg_ad"),
            Ok(ValueSpec::Variable("arg_ad".into()))
        );
        assert_eq!(
            parse_value(b"${status}"),
            Ok(ValueSpec::Variable("status".into()))
        );
        assert_eq!(
            parse_value(b"$a-$b"),
            Ok(ValueSpec::Complex(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse_value(b"x$a"),
            Ok(ValueSpec::Complex(vec!["a".into()]))
        );
        assert_eq!(
            parse_value(b"${a}x"),
            Ok(ValueSpec::Complex(vec!["a".into()]))
        );
        assert_eq!(parse_value(b"plain"), Ok(ValueSpec::Complex(vec![])));
        assert_eq!(parse_value(b"$1"), Ok(ValueSpec::Complex(vec![])));
        assert!(parse_value(b"${oops").is_err());
        assert!(parse_value(b"$").is_err());
        assert!(parse_value(b"a$-").is_err());
    }
}
