//! The shapes tables must have (a rule's table, `logtally_checkpoint`) and how a table found
//! in the database differs from one: plain functions of the configuration, no database.

use std::fmt;

use crate::config::{Config, MetricKind, Rule, CHECKPOINT_TABLE};

/// The column type of `distinct(f)` metrics (the postgresql-hll extension's).
pub const HLL_TYPE: &str = "hll";
/// The column type of `quantiles(f)` metrics (`quantiles.sql`'s composite).
pub const QUANTILES_TYPE: &str = "logtally_quantiles";

/// A column a table must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    /// The type as PostgreSQL's `format_type` spells it.
    pub sql_type: &'static str,
    pub not_null: bool,
}

/// The shape a table must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: String,
    pub columns: Vec<ColumnSpec>,
    pub primary_key: Vec<String>,
}

/// A column as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualColumn {
    pub name: String,
    pub sql_type: String,
    pub not_null: bool,
}

/// A table as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualTable {
    /// `pg_class.relkind`: `r` a table, `p` a partitioned table, anything else is not a table.
    pub kind: char,
    pub columns: Vec<ActualColumn>,
    pub primary_key: Vec<String>,
}

/// One way an existing table differs from what the configuration needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeDifference {
    NotATable {
        relkind: char,
    },
    MissingColumn {
        column: String,
        expected: String,
    },
    ExtraColumn {
        column: String,
        found: String,
    },
    WrongType {
        column: String,
        expected: String,
        found: String,
    },
    WrongNullability {
        column: String,
        expected_not_null: bool,
    },
    WrongPrimaryKey {
        expected: Vec<String>,
        found: Vec<String>,
    },
}

impl fmt::Display for ShapeDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let null = |not_null: bool| if not_null { "NOT NULL" } else { "nullable" };
        match self {
            ShapeDifference::NotATable { relkind } => {
                write!(f, "it is not a table (pg_class.relkind '{relkind}')")
            }
            ShapeDifference::MissingColumn { column, expected } => {
                write!(f, "column {column} ({expected}) is missing")
            }
            ShapeDifference::ExtraColumn { column, found } => {
                write!(f, "column {column} ({found}) is not in the configuration")
            }
            ShapeDifference::WrongType {
                column,
                expected,
                found,
            } => {
                write!(f, "column {column} is {found}, expected {expected}")
            }
            ShapeDifference::WrongNullability {
                column,
                expected_not_null,
            } => write!(
                f,
                "column {column} is {}, expected {}",
                null(!expected_not_null),
                null(*expected_not_null)
            ),
            ShapeDifference::WrongPrimaryKey { expected, found } if found.is_empty() => {
                write!(f, "no primary key, expected ({})", expected.join(", "))
            }
            ShapeDifference::WrongPrimaryKey { expected, found } => write!(
                f,
                "primary key is ({}), expected ({})",
                found.join(", "),
                expected.join(", ")
            ),
        }
    }
}

/// A table whose shape does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMismatch {
    pub table: String,
    pub differences: Vec<ShapeDifference>,
}

impl fmt::Display for TableMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.differences.iter().map(|d| d.to_string()).collect();
        write!(f, "table {}: {}", self.table, list.join("; "))
    }
}

pub(super) fn join_mismatches(m: &[TableMismatch]) -> String {
    m.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The shape of a rule's table.
pub fn rule_table(rule: &Rule) -> TableSpec {
    let mut columns = vec![ColumnSpec {
        name: "bucket".into(),
        sql_type: "timestamp with time zone",
        not_null: true,
    }];
    for d in &rule.group_by {
        columns.push(ColumnSpec {
            name: d.clone(),
            sql_type: "text",
            not_null: true,
        });
    }
    for m in &rule.metrics {
        let (sql_type, not_null) = match m.kind {
            MetricKind::Count => ("bigint", true),
            MetricKind::Sum(_) => ("numeric", true),
            MetricKind::Min(_) | MetricKind::Max(_) => ("numeric", false),
            MetricKind::Distinct(_) => (HLL_TYPE, true),
            MetricKind::Quantiles { .. } => (QUANTILES_TYPE, false),
        };
        columns.push(ColumnSpec {
            name: m.column.clone(),
            sql_type,
            not_null,
        });
    }
    let mut primary_key = vec!["bucket".to_string()];
    primary_key.extend(rule.group_by.iter().cloned());
    TableSpec {
        name: rule.table.clone(),
        columns,
        primary_key,
    }
}

/// The shape of `logtally_checkpoint`.
pub fn checkpoint_table() -> TableSpec {
    let col = |name: &str, sql_type, not_null| ColumnSpec {
        name: name.into(),
        sql_type,
        not_null,
    };
    TableSpec {
        name: CHECKPOINT_TABLE.into(),
        columns: vec![
            col("node", "text", true),
            col("segment", "text", true),
            col("offset", "bigint", true),
            col("finished", "boolean", true),
            col("updated_at", "timestamp with time zone", true),
        ],
        primary_key: vec!["node".into(), "segment".into()],
    }
}

/// Everything that differs between the shape needed and the table found. The primary key
/// is compared as a set: its column order does not change what conflicts.
pub fn shape_differences(spec: &TableSpec, actual: &ActualTable) -> Vec<ShapeDifference> {
    let mut out = Vec::new();
    if actual.kind != 'r' && actual.kind != 'p' {
        out.push(ShapeDifference::NotATable {
            relkind: actual.kind,
        });
        return out;
    }
    for want in &spec.columns {
        match actual.columns.iter().find(|c| c.name == want.name) {
            None => out.push(ShapeDifference::MissingColumn {
                column: want.name.clone(),
                expected: want.sql_type.to_string(),
            }),
            Some(have) => {
                if have.sql_type != want.sql_type {
                    out.push(ShapeDifference::WrongType {
                        column: want.name.clone(),
                        expected: want.sql_type.to_string(),
                        found: have.sql_type.clone(),
                    });
                }
                if have.not_null != want.not_null {
                    out.push(ShapeDifference::WrongNullability {
                        column: want.name.clone(),
                        expected_not_null: want.not_null,
                    });
                }
            }
        }
    }
    for have in &actual.columns {
        if !spec.columns.iter().any(|c| c.name == have.name) {
            out.push(ShapeDifference::ExtraColumn {
                column: have.name.clone(),
                found: have.sql_type.clone(),
            });
        }
    }
    let mut want_pk = spec.primary_key.clone();
    let mut have_pk = actual.primary_key.clone();
    want_pk.sort();
    have_pk.sort();
    if want_pk != have_pk {
        out.push(ShapeDifference::WrongPrimaryKey {
            expected: spec.primary_key.clone(),
            found: actual.primary_key.clone(),
        });
    }
    out
}

/// Every table a configuration needs: its rules' and the checkpoint's.
pub(super) fn all_tables(config: &Config) -> Vec<TableSpec> {
    let mut specs: Vec<TableSpec> = config.rules.iter().map(rule_table).collect();
    specs.push(checkpoint_table());
    if super::admitted::needs_admitted_table(config) {
        specs.push(super::admitted::admitted_table());
    }
    specs
}
