//! `logtally_admitted_keys`: what each node admitted per rule and bucket under `max_keys`
//! (the hashes of `crate::aggregate::admission`), committed in the flush's transaction and
//! loaded once at start. Never read on the event path.
//!
//! One row per (node, rule table, bucket, flush): `hashes` holds the 8-byte big-endian
//! hashes admitted by that flush, `chunk` is the first of them (a bucket admits a hash once,
//! so it is unique) — an append-only insert per bucket and flush instead of rewriting a
//! growing value. Rows of buckets older than the node's admission horizon are deleted in
//! the flush that moves the horizon. The table exists only when some rule has `max_keys`.

use std::time::SystemTime;

use tokio_postgres::Transaction;

use crate::aggregate::admission::AdmittedDelta;
use crate::config::{Config, ADMITTED_TABLE};

use super::rows::bucket_time;
use super::schema::{ColumnSpec, TableSpec};
use super::StoreError;

/// The shape of `logtally_admitted_keys`.
pub fn admitted_table() -> TableSpec {
    let col = |name: &str, sql_type, not_null| ColumnSpec {
        name: name.into(),
        sql_type,
        not_null,
    };
    TableSpec {
        name: ADMITTED_TABLE.into(),
        columns: vec![
            col("node", "text", true),
            col("tbl", "text", true),
            col("bucket", "timestamp with time zone", true),
            col("chunk", "bigint", true),
            col("hashes", "bytea", true),
        ],
        primary_key: vec!["node".into(), "tbl".into(), "bucket".into(), "chunk".into()],
    }
}

/// Whether a configuration needs the table (some rule has `max_keys`).
pub fn needs_admitted_table(config: &Config) -> bool {
    config.limits.iter().any(|l| l.max_keys.is_some())
}

pub(super) fn insert_sql() -> String {
    format!(
        "INSERT INTO {ADMITTED_TABLE} (node, tbl, bucket, chunk, hashes) \
         SELECT $1, $2, b, c, h FROM unnest($3::timestamptz[], $4::int8[], $5::bytea[]) AS u(b, c, h)"
    )
}

pub(super) fn drop_before_sql() -> String {
    format!("DELETE FROM {ADMITTED_TABLE} WHERE node = $1 AND tbl = $2 AND bucket < $3")
}

pub(super) fn load_sql() -> String {
    format!(
        "SELECT tbl, (extract(epoch FROM bucket) * 1000)::int8, hashes FROM {ADMITTED_TABLE} \
         WHERE node = $1"
    )
}

/// Hashes as the `hashes` column holds them.
pub fn encode_hashes(hashes: &[u64]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.to_be_bytes()).collect()
}

/// The `hashes` column back as hashes (a trailing partial hash is ignored).
pub fn decode_hashes(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Writes one rule's admissions of a flush, inside its transaction.
pub(super) async fn write(
    tx: &Transaction<'_>,
    node: &str,
    table: &str,
    delta: &AdmittedDelta,
) -> Result<(), StoreError> {
    if let Some(before) = delta.drop_before {
        tx.execute(&drop_before_sql(), &[&node, &table, &bucket_time(before)])
            .await
            .map_err(StoreError::db("drop old admitted keys"))?;
    }
    let chunks: Vec<_> = delta.chunks.iter().filter(|c| !c.1.is_empty()).collect();
    if chunks.is_empty() {
        return Ok(());
    }
    let buckets: Vec<SystemTime> = chunks.iter().map(|c| bucket_time(c.0)).collect();
    let firsts: Vec<i64> = chunks.iter().map(|c| c.1[0] as i64).collect();
    let hashes: Vec<Vec<u8>> = chunks.iter().map(|c| encode_hashes(&c.1)).collect();
    tx.execute(&insert_sql(), &[&node, &table, &buckets, &firsts, &hashes])
        .await
        .map_err(StoreError::db("insert admitted keys"))?;
    Ok(())
}

/// Every admitted-key row of `node`, as (rule table, bucket ms, hashes).
pub(super) async fn load(
    client: &tokio_postgres::Client,
    node: &str,
) -> Result<Vec<(String, i64, Vec<u64>)>, StoreError> {
    let rows = client
        .query(&load_sql(), &[&node])
        .await
        .map_err(StoreError::db("load admitted keys"))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let bytes: Vec<u8> = r.get(2);
            (r.get(0), r.get(1), decode_hashes(&bytes))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::sql::create_sql;

    #[test]
    fn hashes_round_trip_big_endian() {
        let h = [0u64, 1, u64::MAX, 0x0102_0304_0506_0708];
        let bytes = encode_hashes(&h);
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[24..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_hashes(&bytes), h);
    }

    #[test]
    fn table_and_statements_name_the_node_and_rule() {
        let create = create_sql(&admitted_table());
        assert!(
            create.contains("PRIMARY KEY (\"node\", \"tbl\", \"bucket\", \"chunk\")"),
            "{create}"
        );
        assert!(insert_sql().contains("unnest($3::timestamptz[], $4::int8[], $5::bytea[])"));
        assert!(drop_before_sql().ends_with("node = $1 AND tbl = $2 AND bucket < $3"));
        assert!(load_sql().ends_with("WHERE node = $1"));
    }
}
