//! Which spool fields the rules read, and what a segment header that lacks one of them means.
//! Pure: names in, findings out. `check`, `run` at start and the running reader all classify
//! with these functions, so they agree:
//!
//! - a field **no** segment in the spool declares is an **error** (a typo in the rule, or
//!   nginx has no `logtally_field` of that name): `check` fails; `run` logs it at error level
//!   and keeps going (nginx may be reloaded with the field; every event until then reads the
//!   field as absent);
//! - a field **some** segments lack is a **warning** (nginx was reloaded with or without the
//!   field; those segments' events read it as absent, so a `sum` of it adds nothing): `check`
//!   prints it and passes; `run` logs it; the running reader reports each such segment once
//!   ([`missing_in_header`]) in its log, a metric and `/status`.

use super::{Condition, Config, Problem};

/// One place a rule reads a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldUse<'a> {
    /// Index into `Config::rules`.
    pub rule: usize,
    /// The key that names it (`rule[0].group_by[1]`, `rule[0].metrics.bytes`, `rule[0].where`).
    pub key: String,
    pub field: &'a str,
}

/// Every field every rule reads: `group_by`, metric fields, fields in the rule's and the
/// metrics' `where`, in that order (a field read twice is listed twice, with each key).
pub fn field_uses(config: &Config) -> Vec<FieldUse<'_>> {
    let mut uses = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        for (j, field) in rule.group_by.iter().enumerate() {
            let key = format!("rule[{i}].group_by[{j}]");
            uses.push(FieldUse {
                rule: i,
                key,
                field,
            });
        }
        for m in &rule.metrics {
            let filter = m.filter.iter().flat_map(Condition::fields);
            for field in m.kind.field().into_iter().chain(filter) {
                let key = format!("rule[{i}].metrics.{}", m.column);
                uses.push(FieldUse {
                    rule: i,
                    key,
                    field,
                });
            }
        }
        for field in rule.filter.iter().flat_map(Condition::fields) {
            let key = format!("rule[{i}].where");
            uses.push(FieldUse {
                rule: i,
                key,
                field,
            });
        }
    }
    uses
}

/// A field one rule reads that a segment header lacks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MissingField {
    /// Index into `Config::rules`.
    pub rule: usize,
    pub field: String,
}

/// The (rule, field) pairs a header with `fields` lacks, each once, by rule then first use.
pub fn missing_in_header(config: &Config, fields: &[String]) -> Vec<MissingField> {
    let mut missing: Vec<MissingField> = Vec::new();
    for u in field_uses(config) {
        if fields.iter().any(|f| f == u.field) {
            continue;
        }
        let m = MissingField {
            rule: u.rule,
            field: u.field.to_string(),
        };
        if !missing.contains(&m) {
            missing.push(m);
        }
    }
    missing
}

/// How serious a finding is (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// No segment declares the field.
    Error,
    /// Some segments lack it.
    Warning,
}

/// One (rule, field) pair some or all segments lack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldFinding {
    pub severity: Severity,
    /// The first key that reads the field (`rule[0].metrics.bytes`).
    pub key: String,
    /// The rule's table.
    pub table: String,
    pub field: String,
    /// Segments that lack it, of `segments`.
    pub lacking: usize,
    pub segments: usize,
    /// The last lacking segment in name order (names start with their creation time).
    pub example: String,
    /// The spool folder, and the union of the fields its segments declare (", "-joined).
    pub dir: String,
    pub declared: String,
}

impl FieldFinding {
    /// What is wrong, without the key (`field "bytes" is missing from 2 of 3 segment(s) …`).
    pub fn problem(&self) -> String {
        let field = &self.field;
        match self.severity {
            Severity::Error => Problem::NotInSpool {
                field: field.clone(),
                dir: self.dir.clone(),
                declared: self.declared.clone(),
            }
            .to_string(),
            Severity::Warning => format!(
                "field {field:?} is missing from {} of {} segment(s) (latest {}): their \
                 events read it as absent",
                self.lacking, self.segments, self.example
            ),
        }
    }
}

impl std::fmt::Display for FieldFinding {
    /// `key: problem`, as a configuration error shows it after the file name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem())
    }
}

/// Classifies the fields the rules read against the headers of the spool's segments
/// (`(file name, fields)`, in name order). No segment: nothing to say.
pub fn classify(config: &Config, segments: &[(String, Vec<String>)]) -> Vec<FieldFinding> {
    let mut findings: Vec<FieldFinding> = Vec::new();
    if segments.is_empty() {
        return findings;
    }
    let mut union: Vec<&str> = Vec::new();
    for f in segments.iter().flat_map(|(_, fields)| fields) {
        if !union.contains(&f.as_str()) {
            union.push(f);
        }
    }
    let declared = union.join(", ");
    for u in field_uses(config) {
        let rule = &config.rules[u.rule];
        if findings
            .iter()
            .any(|f| f.table == rule.table && f.field == u.field)
        {
            continue;
        }
        let lacking: Vec<&str> = segments
            .iter()
            .filter(|(_, fields)| !fields.iter().any(|f| f == u.field))
            .map(|(name, _)| name.as_str())
            .collect();
        let Some(last) = lacking.last() else {
            continue;
        };
        findings.push(FieldFinding {
            severity: if lacking.len() == segments.len() {
                Severity::Error
            } else {
                Severity::Warning
            },
            key: u.key.clone(),
            table: rule.table.clone(),
            field: u.field.to_string(),
            lacking: lacking.len(),
            segments: segments.len(),
            example: last.to_string(),
            dir: config.spool_dir.display().to_string(),
            declared: declared.clone(),
        });
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::path::Path;

    const CONFIG: &str = r#"
        [[rule]]
        table = "t"
        bucket = "1m"
        group_by = ["ad"]
        where = "status < 400"
        metrics = { n = "count", bytes = "sum(bytes)", views = "count where ev = 'view'" }
    "#;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn uses_cover_group_by_metrics_and_conditions() {
        let c = parse(Path::new("l.toml"), CONFIG).unwrap();
        let uses: Vec<(String, &str)> = field_uses(&c)
            .into_iter()
            .map(|u| (u.key, u.field))
            .collect();
        assert_eq!(
            uses,
            [
                ("rule[0].group_by[0]".to_string(), "ad"),
                ("rule[0].metrics.bytes".to_string(), "bytes"),
                ("rule[0].metrics.views".to_string(), "ev"),
                ("rule[0].where".to_string(), "status"),
            ]
        );
    }

    #[test]
    fn a_header_lacking_fields_names_each_rule_and_field_once() {
        let c = parse(Path::new("l.toml"), CONFIG).unwrap();
        assert!(missing_in_header(&c, &names(&["status", "ev", "bytes", "ad"])).is_empty());
        let m = missing_in_header(&c, &names(&["ad", "ev"]));
        assert_eq!(
            m,
            [
                MissingField {
                    rule: 0,
                    field: "bytes".into()
                },
                MissingField {
                    rule: 0,
                    field: "status".into()
                },
            ]
        );
    }

    #[test]
    fn none_declares_is_an_error_some_lack_is_a_warning() {
        let c = parse(Path::new("l.toml"), CONFIG).unwrap();
        let all = names(&["ad", "ev", "bytes", "status"]);
        let no_bytes = names(&["ad", "ev", "status"]);
        assert!(classify(&c, &[]).is_empty());
        assert!(classify(&c, &[("a".into(), all.clone())]).is_empty());
        // nginx reloaded without `bytes`: the newer segments lack it.
        let segs = vec![
            ("s1".to_string(), all.clone()),
            ("s2".to_string(), no_bytes.clone()),
            ("s3".to_string(), no_bytes.clone()),
        ];
        let f = classify(&c, &segs);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Warning);
        assert_eq!((f[0].lacking, f[0].segments), (2, 3));
        assert_eq!(f[0].example, "s3");
        assert_eq!(f[0].key, "rule[0].metrics.bytes");
        assert_eq!(
            f[0].to_string(),
            "rule[0].metrics.bytes: field \"bytes\" is missing from 2 of 3 \
             segment(s) (latest s3): their events read it as absent"
        );
        // No segment has it: an error.
        let f = classify(&c, &[("s2".to_string(), no_bytes)]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Error);
        assert_eq!(
            f[0].to_string(),
            "rule[0].metrics.bytes: field \"bytes\" is not in the spool (segments in \
             /var/spool/logtally declare: ad, ev, status)"
        );
    }
}
