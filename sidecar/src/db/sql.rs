//! The SQL text the store sends: table creation, each rule's additive upsert, and the
//! checkpoint statements. Plain functions of the configuration, tested without a database;
//! identifiers are quoted, every value is a bound parameter.

use crate::config::{MetricKind, Rule, CHECKPOINT_TABLE};

use super::schema::{rule_table, TableSpec};

/// The type and functions of `quantiles(f)` columns (`quantiles.sql`): every statement can
/// run again. The store runs it at start.
pub const QUANTILES_SQL: &str = include_str!("quantiles.sql");

/// Serialises the installation of [`QUANTILES_SQL`] across sidecars (transaction-scoped).
pub(super) fn install_lock_sql() -> String {
    "SELECT pg_advisory_xact_lock(hashtextextended('logtally:install quantiles.sql', 0))".into()
}

/// A quoted SQL identifier.
pub(super) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `CREATE TABLE IF NOT EXISTS` for a shape.
pub fn create_sql(spec: &TableSpec) -> String {
    let mut cols: Vec<String> = spec
        .columns
        .iter()
        .map(|c| {
            let default = if c.name == "updated_at" && spec.name == CHECKPOINT_TABLE {
                " DEFAULT now()"
            } else {
                ""
            };
            let null = if c.not_null { " NOT NULL" } else { " NULL" };
            format!("{} {}{null}{default}", quote(&c.name), c.sql_type)
        })
        .collect();
    let pk: Vec<String> = spec.primary_key.iter().map(|c| quote(c)).collect();
    cols.push(format!("PRIMARY KEY ({})", pk.join(", ")));
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quote(&spec.name),
        cols.join(", ")
    )
}

/// The additive upsert of one rule: one array parameter per column, unnested into rows.
pub fn upsert_sql(rule: &Rule) -> String {
    let spec = rule_table(rule);
    let names: Vec<String> = spec.columns.iter().map(|c| quote(&c.name)).collect();
    let mut arrays = vec!["$1::timestamptz[]".to_string()];
    // What the SELECT takes from each unnested column: sketches travel as bytea / text
    // arrays (an array of a composite would unnest into its fields) and are cast per row.
    let mut selected = vec!["c1".to_string()];
    let mut n = 1;
    for _ in &rule.group_by {
        n += 1;
        arrays.push(format!("${n}::text[]"));
        selected.push(format!("c{n}"));
    }
    let mut updates = Vec::new();
    for m in &rule.metrics {
        n += 1;
        let c = quote(&m.column);
        selected.push(match m.kind {
            MetricKind::Distinct(_) => format!("c{n}::hll"),
            MetricKind::Quantiles { .. } => format!("c{n}::logtally_quantiles"),
            _ => format!("c{n}"),
        });
        let (array, update) = match m.kind {
            MetricKind::Count => (
                format!("${n}::int8[]"),
                format!("{c} = cur.{c} + excluded.{c}"),
            ),
            // Decimals travel as text: exact, and PostgreSQL parses them into numeric.
            MetricKind::Sum(_) => (
                format!("${n}::numeric[]"),
                format!("{c} = cur.{c} + excluded.{c}"),
            ),
            MetricKind::Min(_) => (
                format!("${n}::numeric[]"),
                format!("{c} = least(cur.{c}, excluded.{c})"),
            ),
            MetricKind::Max(_) => (
                format!("${n}::numeric[]"),
                format!("{c} = greatest(cur.{c}, excluded.{c})"),
            ),
            // `hll_send` bytes; bytea casts to hll without a function.
            MetricKind::Distinct(_) => (
                format!("${n}::bytea[]"),
                format!("{c} = hll_union(cur.{c}, excluded.{c})"),
            ),
            MetricKind::Quantiles { .. } => (
                format!("${n}::text[]"),
                format!("{c} = logtally_quantiles_add(cur.{c}, excluded.{c})"),
            ),
        };
        arrays.push(array);
        updates.push(update);
    }
    let key: Vec<String> = spec.primary_key.iter().map(|c| quote(c)).collect();
    let action = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    let aliases: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
    format!(
        "INSERT INTO {table} AS cur ({cols}) SELECT {selected} FROM unnest({arrays}) \
         AS u({aliases}) ON CONFLICT ({key}) {action}",
        table = quote(&rule.table),
        cols = names.join(", "),
        selected = selected.join(", "),
        arrays = arrays.join(", "),
        aliases = aliases.join(", "),
        key = key.join(", "),
    )
}

/// Moves this node's checkpoint rows to a flush's positions.
pub(super) fn checkpoint_upsert_sql() -> String {
    format!(
        "INSERT INTO {CHECKPOINT_TABLE} \
         (node, segment, \"offset\", finished, updated_at) \
         SELECT $1, s, o, f, now() FROM unnest($2::text[], $3::int8[], $4::bool[]) AS u(s, o, f) \
         ON CONFLICT (node, segment) DO UPDATE SET \"offset\" = excluded.\"offset\", \
         finished = excluded.finished, updated_at = excluded.updated_at"
    )
}

/// Serialises the flushes of one node (a transaction-scoped advisory lock on its name).
pub(super) fn checkpoint_lock_sql() -> String {
    format!("SELECT pg_advisory_xact_lock(hashtextextended('{CHECKPOINT_TABLE}:' || $1, 0))")
}

/// The checkpoint rows of some of a node's segments, for the compare-and-swap.
pub(super) fn checkpoint_read_sql() -> String {
    format!(
        "SELECT segment, \"offset\", finished FROM {CHECKPOINT_TABLE} \
         WHERE node = $1 AND segment = ANY($2::text[])"
    )
}

/// A node's whole checkpoint.
pub(super) fn checkpoint_load_sql() -> String {
    format!(
        "SELECT segment, \"offset\", finished FROM {CHECKPOINT_TABLE} WHERE node = $1 \
         ORDER BY segment"
    )
}

/// Forgets finished segments of a node.
pub(super) fn checkpoint_delete_finished_sql() -> String {
    format!(
        "DELETE FROM {CHECKPOINT_TABLE} WHERE node = $1 AND segment = ANY($2::text[]) \
         AND finished"
    )
}
