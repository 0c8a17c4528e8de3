//! Names the configuration gives: SQL identifiers for tables and columns, spool field names,
//! and the names logtally keeps for itself.
//!
//! - table, group_by and metric column names are SQL identifiers `[a-z_][a-z0-9_]*` of at
//!   most [`MAX_IDENT_LEN`] bytes (PostgreSQL's limit) and not reserved words;
//! - field names follow the spool's rule ([`logtally_spool::is_valid_field_name`]), the one
//!   nginx's `logtally_field` follows.

use super::Problem;

/// The checkpoint table's name; no rule may use it. The store's SQL is built from it.
pub const CHECKPOINT_TABLE: &str = "logtally_checkpoint";
/// The bucket column every rule table has.
pub const BUCKET_COLUMN: &str = "bucket";
/// Longest SQL identifier PostgreSQL keeps without truncating.
pub const MAX_IDENT_LEN: usize = 63;

/// Words PostgreSQL reserves (cannot be column or table names unquoted) plus the ones
/// logtally uses itself. The store quotes identifiers anyway; refusing these keeps the
/// tables pleasant to query by hand.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "column",
    "constraint",
    "create",
    "current_catalog",
    "current_date",
    "current_role",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "from",
    "grant",
    "group",
    "having",
    "in",
    "initially",
    "intersect",
    "into",
    "lateral",
    "leading",
    "limit",
    "localtime",
    "localtimestamp",
    "not",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "placing",
    "primary",
    "references",
    "returning",
    "select",
    "session_user",
    "some",
    "symmetric",
    "system_user",
    "table",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "when",
    "where",
    "window",
    "with",
];

/// Checks an SQL identifier used as a table or column name.
pub fn check_identifier(name: &str) -> Result<(), Problem> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_IDENT_LEN
        && !b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
    if !ok {
        return Err(Problem::BadIdentifier(name.to_string()));
    }
    if RESERVED.contains(&name) {
        return Err(Problem::Reserved(name.to_string()));
    }
    Ok(())
}

/// Checks a spool field name a rule reads (by the spool's rule, the one `logtally_field`
/// follows).
pub fn check_field_name(name: &str) -> Result<(), Problem> {
    if logtally_spool::is_valid_field_name(name.as_bytes()) {
        Ok(())
    } else {
        Err(Problem::BadFieldName(name.to_string()))
    }
}
