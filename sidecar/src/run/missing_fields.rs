//! The running reader's watch for segments whose header lacks a field a rule reads (nginx
//! reloaded without a `logtally_field`): each segment is looked at once, when its first
//! event is read; each (rule, field) it lacks is reported once for that segment (the
//! reader logs a warning and counts `logtally_missing_field_segments_total{rule,field}`)
//! and kept for `/status` as one entry per (rule, field): the latest such segment, when it
//! was first and last seen, how many segments. Bounded: entries are at most the rules'
//! (rule, field) pairs, and only the names of segments the tailer still tracks are kept.
//!
//! What counts as missing is [`crate::config::fields::missing_in_header`], the same
//! classification `check` and `run` make at start.

use std::collections::HashSet;

use serde::Serialize;

use crate::config::fields::{missing_in_header, MissingField};
use crate::config::Config;

/// One (rule, field) pair some segment lacked, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingFieldStatus {
    /// The rule's table.
    pub rule: String,
    pub field: String,
    /// The latest segment found lacking it.
    pub segment: String,
    /// When a segment was first found lacking it (ms since the Unix epoch).
    pub since_ms: u64,
    /// When `segment` was found lacking it.
    pub last_ms: u64,
    /// Segments found lacking it since start.
    pub segments: u64,
}

/// A newly found (rule, field) a segment lacks: what the reader logs and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Noticed {
    pub rule: String,
    pub field: String,
    pub segment: String,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct MissingFields {
    /// Segments already looked at (by name).
    checked: HashSet<String>,
    /// The last segment id looked at: consecutive records of one segment cost one compare.
    last_id: Option<u64>,
    entries: Vec<MissingFieldStatus>,
}

impl MissingFields {
    /// Looks at segment `name` (tailer id `id`) with header `fields` if not done yet; returns
    /// the (rule, field) pairs it lacks (empty when seen before or complete).
    pub fn look(
        &mut self,
        config: &Config,
        id: u64,
        name: &str,
        fields: &[String],
        now_ms: u64,
    ) -> Vec<Noticed> {
        if self.last_id == Some(id) {
            return Vec::new();
        }
        self.last_id = Some(id);
        if !self.checked.insert(name.to_string()) {
            return Vec::new();
        }
        let mut noticed = Vec::new();
        for MissingField { rule, field } in missing_in_header(config, fields) {
            let table = &config.rules[rule].table;
            let entry = self
                .entries
                .iter_mut()
                .find(|e| e.rule == *table && e.field == field);
            match entry {
                Some(e) => {
                    e.segment = name.to_string();
                    e.last_ms = now_ms;
                    e.segments += 1;
                }
                None => self.entries.push(MissingFieldStatus {
                    rule: table.clone(),
                    field: field.clone(),
                    segment: name.to_string(),
                    since_ms: now_ms,
                    last_ms: now_ms,
                    segments: 1,
                }),
            }
            noticed.push(Noticed {
                rule: table.clone(),
                field,
                segment: name.to_string(),
            });
        }
        noticed
    }

    /// Forgets segments deleted from the spool (their names are never seen again).
    pub fn forget(&mut self, removed: &[String]) {
        for name in removed {
            self.checked.remove(name);
        }
    }

    /// What `/status` shows.
    pub fn entries(&self) -> &[MissingFieldStatus] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        let text = r#"
            [[rule]]
            table = "t"
            bucket = "1m"
            group_by = ["ad"]
            metrics = { n = "count", bytes = "sum(bytes)", rt = "max(rt)" }
        "#;
        crate::config::parse(Path::new("l.toml"), text).unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_segment_is_reported_once_and_entries_stay_one_per_pair() {
        let c = config();
        let mut m = MissingFields::default();
        let full = names(&["ad", "bytes", "rt"]);
        let no_bytes = names(&["ad", "rt"]);
        assert!(m.look(&c, 1, "s1", &full, 10).is_empty());
        let n = m.look(&c, 2, "s2", &no_bytes, 20);
        assert_eq!(
            n,
            [Noticed {
                rule: "t".into(),
                field: "bytes".into(),
                segment: "s2".into()
            }]
        );
        // The same segment again, after another one in between: not reported again.
        assert!(m.look(&c, 1, "s1", &full, 25).is_empty());
        assert!(m.look(&c, 2, "s2", &no_bytes, 30).is_empty());
        assert_eq!(m.look(&c, 3, "s3", &no_bytes, 40).len(), 1);
        assert_eq!(
            m.entries(),
            [MissingFieldStatus {
                rule: "t".into(),
                field: "bytes".into(),
                segment: "s3".into(),
                since_ms: 20,
                last_ms: 40,
                segments: 2,
            }]
        );
        // A deleted segment's name is forgotten; entries stay.
        m.forget(&names(&["s2"]));
        assert!(!m.checked.contains("s2"));
        assert_eq!(m.entries().len(), 1);
        // Lacking both: two pairs, in rule order.
        let n = m.look(&c, 4, "s4", &names(&["ad"]), 50);
        let pairs: Vec<&str> = n.iter().map(|n| n.field.as_str()).collect();
        assert_eq!(pairs, ["bytes", "rt"]);
        assert_eq!(m.entries().len(), 2);
    }
}
