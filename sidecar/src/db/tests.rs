//! Unit tests of the database layer's pure parts: table shapes, SQL text, row merging,
//! the checkpoint compare.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use super::checkpoint::{compare_checkpoint, CheckpointState};
use super::rows::prepare_rows;
use super::schema::{
    checkpoint_table, rule_table, shape_differences, ActualColumn, ActualTable, TableSpec,
};
use super::sql::{
    checkpoint_delete_finished_sql, checkpoint_load_sql, checkpoint_lock_sql, checkpoint_read_sql,
    checkpoint_upsert_sql, create_sql, upsert_sql,
};
use super::*;
use crate::aggregate::{Decimal, MetricValue, Row};
use crate::config::{Metric, MetricKind, Rule};

fn rule() -> Rule {
    Rule {
        filter: None,
        table: "ad_events_1m".into(),
        bucket: Duration::from_secs(60),
        group_by: vec!["ad".into(), "ev".into()],
        metrics: vec![
            Metric {
                filter: None,
                column: "events".into(),
                kind: MetricKind::Count,
            },
            Metric {
                filter: None,
                column: "bytes".into(),
                kind: MetricKind::Sum("bytes".into()),
            },
            Metric {
                filter: None,
                column: "rt_min".into(),
                kind: MetricKind::Min("rt".into()),
            },
            Metric {
                filter: None,
                column: "rt_max".into(),
                kind: MetricKind::Max("rt".into()),
            },
        ],
    }
}

fn actual_of(spec: &TableSpec) -> ActualTable {
    ActualTable {
        kind: 'r',
        columns: spec
            .columns
            .iter()
            .map(|c| ActualColumn {
                name: c.name.clone(),
                sql_type: c.sql_type.into(),
                not_null: c.not_null,
            })
            .collect(),
        primary_key: spec.primary_key.clone(),
    }
}

#[test]
fn create_sql_quotes_and_types_every_column() {
    let sql = create_sql(&rule_table(&rule()));
    assert_eq!(
        sql,
        "CREATE TABLE IF NOT EXISTS \"ad_events_1m\" (\"bucket\" timestamp with time zone \
         NOT NULL, \"ad\" text NOT NULL, \"ev\" text NOT NULL, \"events\" bigint NOT NULL, \
         \"bytes\" numeric NOT NULL, \"rt_min\" numeric NULL, \"rt_max\" numeric NULL, \
         PRIMARY KEY (\"bucket\", \"ad\", \"ev\"))"
    );
    assert!(create_sql(&checkpoint_table())
        .contains("\"updated_at\" timestamp with time zone NOT NULL DEFAULT now()"));
}

#[test]
fn upsert_is_additive_and_binds_every_value() {
    let sql = upsert_sql(&rule());
    assert_eq!(
        sql,
        "INSERT INTO \"ad_events_1m\" AS cur (\"bucket\", \"ad\", \"ev\", \"events\", \
         \"bytes\", \"rt_min\", \"rt_max\") SELECT c1, c2, c3, c4, c5, c6, c7 FROM \
         unnest($1::timestamptz[], $2::text[], $3::text[], $4::int8[], $5::numeric[], \
         $6::numeric[], $7::numeric[]) AS u(c1, c2, c3, c4, c5, c6, c7) ON CONFLICT (\"bucket\", \"ad\", \"ev\") DO UPDATE SET \
         \"events\" = cur.\"events\" + excluded.\"events\", \"bytes\" = cur.\"bytes\" + \
         excluded.\"bytes\", \"rt_min\" = least(cur.\"rt_min\", excluded.\"rt_min\"), \
         \"rt_max\" = greatest(cur.\"rt_max\", excluded.\"rt_max\")"
    );
}

/// Sketches travel as bytea / text arrays and are cast per row, merged by their functions.
#[test]
fn sketch_columns_cast_per_row_and_merge() {
    let mut r = rule();
    r.metrics = vec![
        Metric::new("reach", MetricKind::Distinct("uid".into())),
        Metric::new(
            "rt",
            MetricKind::Quantiles {
                field: "rt".into(),
                alpha: 0.01,
            },
        ),
    ];
    let sql = upsert_sql(&r);
    assert!(
        sql.contains("SELECT c1, c2, c3, c4::hll, c5::logtally_quantiles FROM unnest(")
            && sql.contains("$4::bytea[], $5::text[]) AS u(c1, c2, c3, c4, c5)")
            && sql.contains("\"reach\" = hll_union(cur.\"reach\", excluded.\"reach\")")
            && sql.contains("\"rt\" = logtally_quantiles_add(cur.\"rt\", excluded.\"rt\")"),
        "{sql}"
    );
    let spec = rule_table(&r);
    let types: Vec<&str> = spec.columns.iter().map(|c| c.sql_type).collect();
    assert_eq!(
        types,
        [
            "timestamp with time zone",
            "text",
            "text",
            "hll",
            "logtally_quantiles"
        ]
    );
}

#[test]
fn matching_shape_has_no_differences() {
    let spec = rule_table(&rule());
    let mut actual = actual_of(&spec);
    actual.primary_key.reverse();
    assert_eq!(shape_differences(&spec, &actual), vec![]);
}

#[test]
fn every_difference_is_named() {
    let spec = rule_table(&rule());
    let mut actual = actual_of(&spec);
    actual.columns.retain(|c| c.name != "ev");
    actual.columns.push(ActualColumn {
        name: "extra".into(),
        sql_type: "integer".into(),
        not_null: false,
    });
    actual.columns[3].sql_type = "numeric(10,2)".into(); // bytes
    actual.columns[2].not_null = false; // events
    actual.primary_key = vec!["bucket".into()];
    let diffs = shape_differences(&spec, &actual);
    let text: Vec<String> = diffs.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        text,
        vec![
            "column ev (text) is missing",
            "column events is nullable, expected NOT NULL",
            "column bytes is numeric(10,2), expected numeric",
            "column extra (integer) is not in the configuration",
            "primary key is (bucket), expected (bucket, ad, ev)",
        ]
    );
    let view = ActualTable {
        kind: 'v',
        ..actual
    };
    assert_eq!(
        shape_differences(&spec, &view),
        vec![ShapeDifference::NotATable { relkind: 'v' }]
    );
}

#[test]
fn equal_keys_are_merged_and_rows_sorted() {
    let r = rule();
    let row = |b: i64, ad: &str, c: i64, s: i128, mn: Option<i128>, mx: Option<i128>| Row {
        bucket_ms: b,
        dims: vec![ad.into(), "v".into()],
        metrics: vec![
            MetricValue::Count(c),
            MetricValue::Decimal(Some(Decimal(s))),
            MetricValue::Decimal(mn.map(Decimal)),
            MetricValue::Decimal(mx.map(Decimal)),
        ],
    };
    let rows = vec![
        row(60_000, "b", 1, 10, Some(5), Some(5)),
        row(0, "a", 2, 20, None, None),
        row(60_000, "b", 3, 30, Some(1), Some(2)),
    ];
    let out = prepare_rows(&r, &rows).into_owned();
    // Sorted, distinct rows (what the aggregator drains) are used as they are.
    assert!(matches!(prepare_rows(&r, &out), Cow::Borrowed(_)));
    assert_eq!(
        out,
        vec![
            row(0, "a", 2, 20, None, None),
            row(60_000, "b", 4, 40, Some(1), Some(5))
        ]
    );
}

fn entry(s: &str, offset: u64, finished: bool) -> CheckpointEntry {
    CheckpointEntry {
        segment: s.into(),
        offset,
        finished,
    }
}

#[test]
fn checkpoint_compare_tells_expected_landed_and_conflict() {
    let previous: HashMap<String, CheckpointEntry> = [("a".to_string(), entry("a", 100, false))]
        .into_iter()
        .collect();
    let positions = vec![entry("a", 200, false), entry("b", 50, true)];
    let found: HashMap<String, (u64, bool)> = [("a".to_string(), (100, false))].into();
    assert!(matches!(
        compare_checkpoint("n", &positions, &previous, &found),
        Ok(CheckpointState::AsExpected)
    ));
    let found: HashMap<String, (u64, bool)> = [
        ("a".to_string(), (200, false)),
        ("b".to_string(), (50, true)),
    ]
    .into();
    assert!(matches!(
        compare_checkpoint("n", &positions, &previous, &found),
        Ok(CheckpointState::AlreadyThere)
    ));
    let found: HashMap<String, (u64, bool)> = [("a".to_string(), (150, false))].into();
    match compare_checkpoint("n", &positions, &previous, &found) {
        Err(StoreError::CheckpointConflict {
            segment,
            expected,
            found,
            ..
        }) => {
            assert_eq!(
                (segment.as_str(), expected, found),
                ("a", Some((100, false)), Some((150, false)))
            );
        }
        _ => panic!("expected a conflict"),
    }
}

/// The checkpoint statements, built from `CHECKPOINT_TABLE`, are the text they always were
/// (the advisory lock key included: two versions of the sidecar must take the same lock).
#[test]
fn checkpoint_sql_text() {
    assert_eq!(
        checkpoint_upsert_sql(),
        "INSERT INTO logtally_checkpoint (node, segment, \"offset\", finished, updated_at) \
         SELECT $1, s, o, f, now() FROM unnest($2::text[], $3::int8[], $4::bool[]) AS u(s, o, f) \
         ON CONFLICT (node, segment) DO UPDATE SET \"offset\" = excluded.\"offset\", \
         finished = excluded.finished, updated_at = excluded.updated_at"
    );
    assert_eq!(
        checkpoint_lock_sql(),
        "SELECT pg_advisory_xact_lock(hashtextextended('logtally_checkpoint:' || $1, 0))"
    );
    assert_eq!(
        checkpoint_read_sql(),
        "SELECT segment, \"offset\", finished FROM logtally_checkpoint \
         WHERE node = $1 AND segment = ANY($2::text[])"
    );
    assert_eq!(
        checkpoint_load_sql(),
        "SELECT segment, \"offset\", finished FROM logtally_checkpoint WHERE node = $1 \
         ORDER BY segment"
    );
    assert_eq!(
        checkpoint_delete_finished_sql(),
        "DELETE FROM logtally_checkpoint WHERE node = $1 AND segment = ANY($2::text[]) \
         AND finished"
    );
}
