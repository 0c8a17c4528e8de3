//! What makes an existing table match a rule that changed: pure, from the shape needed and
//! the differences found ([`super::schema::shape_differences`]).
//!
//! Only additions are made: a metric the rule gained becomes `ALTER TABLE … ADD COLUMN IF
//! NOT EXISTS …` (idempotent: sidecars starting together may both run it, under the
//! store's advisory lock). The new column's default keeps the upsert's merge right for the
//! rows already there: `count` and `sum` start at `0` (the upsert adds), `distinct` at
//! `hll_empty()` (the upsert unions), `min`/`max`/`quantiles` are nullable and start NULL
//! (`least`/`greatest` skip NULL, `logtally_quantiles_add` takes the other side). Anything
//! else (a column dropped from the rule, a different type or nullability, a primary key
//! that changed because `group_by` did, not a table) is refused: it would lose or rewrite
//! data, which is the operator's call.

use super::schema::{ShapeDifference, TableSpec, HLL_TYPE};
use super::sql::quote;

/// What to do about one table's differences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migration {
    /// Statements that make the table match, in column order.
    Add(Vec<String>),
    /// Differences no additive change fixes, as they print.
    Refused(Vec<String>),
}

/// The default a new column needs so existing rows merge right (see the module doc), or
/// `None` when a NOT NULL column of that type has none.
fn default_for(sql_type: &str, not_null: bool) -> Option<&'static str> {
    match (sql_type, not_null) {
        (_, false) => Some(""),
        ("bigint" | "numeric", true) => Some(" NOT NULL DEFAULT 0"),
        (HLL_TYPE, true) => Some(" NOT NULL DEFAULT hll_empty()"),
        _ => None,
    }
}

/// The migration of table `spec` given what differs (non-empty).
pub fn plan(spec: &TableSpec, differences: &[ShapeDifference]) -> Migration {
    let mut add = Vec::new();
    let mut refused = Vec::new();
    for d in differences {
        let ShapeDifference::MissingColumn { column, .. } = d else {
            refused.push(match d {
                ShapeDifference::ExtraColumn { .. } => format!(
                    "{d} (removing a column is never automatic: drop it by hand if its data \
                     can go)"
                ),
                _ => format!("{d} (never changed automatically)"),
            });
            continue;
        };
        let column_spec = spec.columns.iter().find(|c| &c.name == column);
        let in_key = spec.primary_key.iter().any(|k| k == column);
        match column_spec.and_then(|c| default_for(c.sql_type, c.not_null).map(|d| (c, d))) {
            Some((c, default)) if !in_key => add.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}{default}",
                quote(&spec.name),
                quote(&c.name),
                c.sql_type
            )),
            _ => refused.push(format!("{d} (a key column is never added automatically)")),
        }
    }
    if refused.is_empty() {
        Migration::Add(add)
    } else {
        Migration::Refused(refused)
    }
}

/// Runs [`Migration::Add`] statements in one transaction under an advisory lock (sidecars
/// starting together queue; `IF NOT EXISTS` makes the later ones no-ops).
pub(super) async fn apply(
    client: &mut tokio_postgres::Client,
    statements: &[String],
) -> Result<(), super::StoreError> {
    use super::StoreError;
    let tx = client
        .transaction()
        .await
        .map_err(StoreError::db("auto_migrate"))?;
    tx.batch_execute("SELECT pg_advisory_xact_lock(hashtextextended('logtally:auto_migrate', 0))")
        .await
        .map_err(StoreError::db("auto_migrate: lock"))?;
    for statement in statements {
        tx.batch_execute(statement)
            .await
            .map_err(StoreError::db("auto_migrate"))?;
        tracing::info!(%statement, "auto_migrate: table changed");
    }
    tx.commit().await.map_err(StoreError::db("auto_migrate"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Metric, MetricKind, Rule};
    use crate::db::schema::{rule_table, shape_differences, ActualColumn, ActualTable};
    use std::time::Duration;

    /// The table of `before` as the database has it, diffed against `after`'s shape.
    fn diff(before: &Rule, after: &Rule) -> (TableSpec, Vec<ShapeDifference>) {
        let old = rule_table(before);
        let actual = ActualTable {
            kind: 'r',
            columns: old
                .columns
                .iter()
                .map(|c| ActualColumn {
                    name: c.name.clone(),
                    sql_type: c.sql_type.to_string(),
                    not_null: c.not_null,
                })
                .collect(),
            primary_key: old.primary_key.clone(),
        };
        let spec = rule_table(after);
        let d = shape_differences(&spec, &actual);
        (spec, d)
    }

    fn rule(group_by: &[&str], metrics: &[(&str, MetricKind)]) -> Rule {
        let metrics = metrics
            .iter()
            .map(|(c, k)| Metric::new(c, k.clone()))
            .collect();
        Rule::new("t", Duration::from_secs(60), group_by, metrics)
    }

    #[test]
    fn gained_metrics_become_additive_columns_with_merge_safe_defaults() {
        let before = rule(&["ad"], &[("n", MetricKind::Count)]);
        let after = rule(
            &["ad"],
            &[
                ("n", MetricKind::Count),
                ("views", MetricKind::Count),
                ("bytes", MetricKind::Sum("bytes".into())),
                ("rt_max", MetricKind::Max("rt".into())),
                ("reach", MetricKind::Distinct("uid".into())),
                (
                    "rt_q",
                    MetricKind::Quantiles {
                        field: "rt".into(),
                        alpha: 0.01,
                    },
                ),
            ],
        );
        let (spec, d) = diff(&before, &after);
        assert_eq!(
            plan(&spec, &d),
            Migration::Add(vec![
                "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"views\" bigint NOT NULL DEFAULT 0"
                    .into(),
                "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"bytes\" numeric NOT NULL DEFAULT 0"
                    .into(),
                "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"rt_max\" numeric".into(),
                "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"reach\" hll NOT NULL DEFAULT \
                 hll_empty()"
                    .into(),
                "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"rt_q\" logtally_quantiles".into(),
            ])
        );
    }

    #[test]
    fn removing_retyping_or_rekeying_is_refused() {
        let before = rule(
            &["ad"],
            &[("n", MetricKind::Count), ("b", MetricKind::Sum("b".into()))],
        );
        // A metric removed: its column would stay, unfed.
        let (spec, d) = diff(&before, &rule(&["ad"], &[("n", MetricKind::Count)]));
        let Migration::Refused(why) = plan(&spec, &d) else {
            panic!("a removed column was migrated");
        };
        assert!(
            why[0].contains("column b (numeric) is not in the configuration"),
            "{why:?}"
        );
        assert!(why[0].contains("never automatic"), "{why:?}");
        // A retyped metric (sum → min makes it nullable).
        let after = rule(
            &["ad"],
            &[("n", MetricKind::Count), ("b", MetricKind::Min("b".into()))],
        );
        let (spec, d) = diff(&before, &after);
        assert!(matches!(plan(&spec, &d), Migration::Refused(_)));
        // A group_by gained: a new key column, a new primary key.
        let after = rule(
            &["ad", "ev"],
            &[("n", MetricKind::Count), ("b", MetricKind::Sum("b".into()))],
        );
        let (spec, d) = diff(&before, &after);
        let Migration::Refused(why) = plan(&spec, &d) else {
            panic!("a key change was migrated");
        };
        assert!(why.iter().any(|w| w.contains("key column")), "{why:?}");
        // Additions next to a refusal: nothing is run.
        let after = rule(
            &["ad"],
            &[("n", MetricKind::Count), ("c", MetricKind::Count)],
        );
        let (spec, d) = diff(&before, &after);
        assert!(matches!(plan(&spec, &d), Migration::Refused(_)));
    }
}
