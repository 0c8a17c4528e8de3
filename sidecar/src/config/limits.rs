//! A rule's limits: `max_keys` (with `overflow_label`) and `retention`. Pure: raw values in,
//! a [`RuleLimits`] or a [`Problem`] out.
//!
//! - `max_keys`: per bucket and node, how many keys a node admits; events of further keys
//!   go to the bucket's overflow row, whose every `group_by` column holds `overflow_label`
//!   (default [`DEFAULT_OVERFLOW_LABEL`]). At least 1; a rule without `group_by` has one key
//!   per bucket, so the key changes nothing there.
//! - `retention`: rows whose bucket starts before `now − retention` are deleted, and events
//!   of such buckets are counted and not written. At least one bucket wide.

use std::time::Duration;

use super::{format_duration, parse_duration, Problem};

/// The `group_by` value of the overflow row unless `overflow_label` says otherwise.
pub const DEFAULT_OVERFLOW_LABEL: &str = "__other__";
/// The table of the keys each node admitted per bucket (`max_keys`); no rule may use it.
pub const ADMITTED_TABLE: &str = "logtally_admitted_keys";
/// Longest `overflow_label` (it is a key's text, like a field value).
pub const MAX_OVERFLOW_LABEL_LEN: usize = 256;

/// What a rule bounds. The default bounds nothing (the behaviour of a rule without the keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLimits {
    /// Keys a node admits per bucket; `None`: no limit.
    pub max_keys: Option<usize>,
    /// The text of every `group_by` column of the overflow row.
    pub overflow_label: String,
    /// Rows older than this are deleted; `None`: kept for ever.
    pub retention: Option<Duration>,
}

impl Default for RuleLimits {
    fn default() -> Self {
        RuleLimits {
            max_keys: None,
            overflow_label: DEFAULT_OVERFLOW_LABEL.to_string(),
            retention: None,
        }
    }
}

/// Which key of the rule a [`Problem`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    MaxKeys,
    OverflowLabel,
    Retention,
}

impl LimitKey {
    pub fn name(self) -> &'static str {
        match self {
            LimitKey::MaxKeys => "max_keys",
            LimitKey::OverflowLabel => "overflow_label",
            LimitKey::Retention => "retention",
        }
    }
}

/// Validates a rule's limit keys as written; `bucket` is the rule's bucket width.
pub fn parse_limits(
    max_keys: Option<i64>,
    overflow_label: Option<String>,
    retention: Option<&str>,
    bucket: Duration,
) -> Result<RuleLimits, (LimitKey, Problem)> {
    let max_keys = match max_keys {
        None => None,
        Some(n) if n <= 0 => return Err((LimitKey::MaxKeys, Problem::Zero)),
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let overflow_label = match overflow_label {
        None => DEFAULT_OVERFLOW_LABEL.to_string(),
        Some(l) if l.is_empty() => return Err((LimitKey::OverflowLabel, Problem::Empty)),
        Some(l) if l.len() > MAX_OVERFLOW_LABEL_LEN || l.contains('\0') => {
            return Err((LimitKey::OverflowLabel, Problem::BadOverflowLabel(l)))
        }
        Some(l) => l,
    };
    let retention = match retention {
        None => None,
        Some(text) => {
            let d = parse_duration(text).map_err(|p| (LimitKey::Retention, p))?;
            if d < bucket {
                return Err((
                    LimitKey::Retention,
                    Problem::RetentionBelowBucket(text.to_string(), format_duration(bucket)),
                ));
            }
            Some(d)
        }
    };
    Ok(RuleLimits {
        max_keys,
        overflow_label,
        retention,
    })
}

impl RuleLimits {
    /// `check`'s line: e.g. `max_keys 1000 (overflow "__other__") retention 90d`.
    pub fn summary(&self) -> String {
        let keys = match self.max_keys {
            Some(n) => format!("max_keys {n} (overflow {:?})", self.overflow_label),
            None => "max_keys none".to_string(),
        };
        let retention = match self.retention {
            Some(d) => format!("retention {}", format_duration(d)),
            None => "retention none (rows are kept)".to_string(),
        };
        format!("{keys} {retention}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn absent_keys_bound_nothing() {
        assert_eq!(
            parse_limits(None, None, None, MINUTE),
            Ok(RuleLimits::default())
        );
        assert_eq!(RuleLimits::default().overflow_label, "__other__");
    }

    #[test]
    fn values_are_checked() {
        let l = parse_limits(Some(5), Some("other".into()), Some("90d"), MINUTE).unwrap();
        assert_eq!(l.max_keys, Some(5));
        assert_eq!(l.overflow_label, "other");
        assert_eq!(l.retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(
            parse_limits(Some(0), None, None, MINUTE),
            Err((LimitKey::MaxKeys, Problem::Zero))
        );
        assert_eq!(
            parse_limits(Some(-3), None, None, MINUTE),
            Err((LimitKey::MaxKeys, Problem::Zero))
        );
        assert_eq!(
            parse_limits(None, Some(String::new()), None, MINUTE),
            Err((LimitKey::OverflowLabel, Problem::Empty))
        );
        assert!(matches!(
            parse_limits(None, Some("a\0b".into()), None, MINUTE),
            Err((LimitKey::OverflowLabel, Problem::BadOverflowLabel(_)))
        ));
        assert!(matches!(
            parse_limits(None, None, Some("90 days"), MINUTE),
            Err((LimitKey::Retention, Problem::BadDuration(_)))
        ));
        assert_eq!(
            parse_limits(None, None, Some("30s"), MINUTE),
            Err((
                LimitKey::Retention,
                Problem::RetentionBelowBucket("30s".into(), "1m".into())
            ))
        );
    }

    #[test]
    fn summary_names_both_limits() {
        let l = parse_limits(Some(1000), None, Some("90d"), MINUTE).unwrap();
        assert_eq!(
            l.summary(),
            "max_keys 1000 (overflow \"__other__\") retention 90d"
        );
        assert_eq!(
            RuleLimits::default().summary(),
            "max_keys none retention none (rows are kept)"
        );
    }

    fn parse_rule(extra: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let text = format!(
            "[[rule]]\ntable = \"t\"\nbucket = \"1m\"\ngroup_by = [\"k\"]\n\
             metrics = {{ n = \"count\" }}\n{extra}\n\
             [[rule]]\ntable = \"u\"\nbucket = \"1h\"\nmetrics = {{ n = \"count\" }}\n"
        );
        crate::config::parse(std::path::Path::new("l.toml"), &text)
    }

    #[test]
    fn keys_in_a_file_and_their_errors_name_the_key() {
        let c = parse_rule("max_keys = 100\nretention = \"90d\"").unwrap();
        assert_eq!(c.limits.len(), 2);
        assert_eq!(c.limits[0].max_keys, Some(100));
        assert_eq!(c.limits[1], RuleLimits::default());
        assert!(c
            .summary()
            .contains("max_keys 100 (overflow \"__other__\") retention 90d"));
        let e = parse_rule("max_keys = 0").unwrap_err().to_string();
        assert_eq!(e, "l.toml: rule[0].max_keys: must be greater than zero");
        let e = parse_rule("retention = \"soon\"").unwrap_err().to_string();
        assert!(
            e.starts_with("l.toml: rule[0].retention: bad duration \"soon\""),
            "{e}"
        );
        let e = parse_rule("overflow_label = \"\"").unwrap_err().to_string();
        assert_eq!(e, "l.toml: rule[0].overflow_label: must not be empty");
        let e = crate::config::parse(
            std::path::Path::new("l.toml"),
            "[[rule]]\ntable = \"logtally_admitted_keys\"\nbucket = \"1m\"\nmetrics = { n = \"count\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rule[0].table: \"logtally_admitted_keys\" is reserved"),
            "{e}"
        );
    }
}
