//! `retention`: deleting a rule's rows whose bucket starts before a cutoff, in bounded
//! batches, by one sidecar at a time.
//!
//! A pass takes a session advisory lock for the rule's table with `pg_try_advisory_lock`:
//! when another sidecar holds it, the pass is skipped (that sidecar is doing the work). Each
//! batch is one statement in its own transaction, never the flush's: it deletes at most
//! [`RETENTION_BATCH`] rows chosen by the primary key (`bucket < cutoff` reads the key's
//! leading column), so a pass over a long backlog holds row locks briefly and never blocks a
//! flush for long. The pass ends when a batch deletes fewer rows than the batch size.

use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::config::{Config, Rule};

use super::rows::bucket_time;
use super::schema::rule_table;
use super::sql::quote;
use super::StoreError;

/// Rows one retention statement deletes at most.
pub const RETENTION_BATCH: i64 = 10_000;

/// Deletes one batch of a rule's rows older than `$1` (at most `$2` rows).
pub fn delete_batch_sql(rule: &Rule) -> String {
    let key: Vec<String> = rule_table(rule)
        .primary_key
        .iter()
        .map(|c| quote(c))
        .collect();
    let key = key.join(", ");
    let table = quote(&rule.table);
    format!(
        "DELETE FROM {table} WHERE ({key}) IN \
         (SELECT {key} FROM {table} WHERE bucket < $1 LIMIT $2)"
    )
}

/// The try-lock of a rule's retention (session-scoped); `$1` is the table name.
pub fn try_lock_sql() -> &'static str {
    "SELECT pg_try_advisory_lock(hashtextextended('logtally:retention:' || $1, 0))"
}

pub fn unlock_sql() -> &'static str {
    "SELECT pg_advisory_unlock(hashtextextended('logtally:retention:' || $1, 0))"
}

/// What one pass over one rule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionPass {
    /// Another sidecar holds the rule's lock.
    Skipped,
    /// Rows deleted (0: nothing was past retention).
    Deleted(u64),
}

/// A connection of its own for retention (the flushes keep theirs).
pub struct RetentionStore {
    client: Client,
    task: JoinHandle<()>,
}

impl Drop for RetentionStore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RetentionStore {
    pub async fn connect(config: &Config) -> Result<RetentionStore, StoreError> {
        let (client, task) = super::store::connect_client(&config.database_url).await?;
        Ok(RetentionStore { client, task })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Deletes `rule`'s rows whose bucket starts before `cutoff_ms`, batch after batch,
    /// unless another sidecar holds the rule's lock. A table that does not exist yet has
    /// nothing to delete.
    pub async fn pass(&self, rule: &Rule, cutoff_ms: i64) -> Result<RetentionPass, StoreError> {
        let locked: bool = self
            .client
            .query_one(try_lock_sql(), &[&rule.table])
            .await
            .map_err(StoreError::db("retention lock"))?
            .get(0);
        if !locked {
            return Ok(RetentionPass::Skipped);
        }
        let result = self.delete_all(rule, cutoff_ms).await;
        // Unlock even after a failed batch (a broken connection frees it anyway).
        let _ = self.client.query_one(unlock_sql(), &[&rule.table]).await;
        result.map(RetentionPass::Deleted)
    }

    async fn delete_all(&self, rule: &Rule, cutoff_ms: i64) -> Result<u64, StoreError> {
        let exists: bool = self
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote(&rule.table)])
            .await
            .map_err(StoreError::db("retention: look up table"))?
            .get(0);
        if !exists {
            return Ok(0);
        }
        let statement = self
            .client
            .prepare(&delete_batch_sql(rule))
            .await
            .map_err(StoreError::db("retention: prepare delete"))?;
        let cutoff = bucket_time(cutoff_ms);
        let mut deleted = 0;
        loop {
            let n = self
                .client
                .execute(&statement, &[&cutoff, &RETENTION_BATCH])
                .await
                .map_err(StoreError::db("retention: delete"))?;
            deleted += n;
            if n < RETENTION_BATCH as u64 {
                return Ok(deleted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Metric, MetricKind};

    #[test]
    fn a_batch_is_chosen_by_the_primary_key_and_bound() {
        let rule = Rule::new(
            "ad_daily",
            std::time::Duration::from_secs(86_400),
            &["ad", "cmp"],
            vec![Metric::new("n", MetricKind::Count)],
        );
        assert_eq!(
            delete_batch_sql(&rule),
            "DELETE FROM \"ad_daily\" WHERE (\"bucket\", \"ad\", \"cmp\") IN \
             (SELECT \"bucket\", \"ad\", \"cmp\" FROM \"ad_daily\" WHERE bucket < $1 LIMIT $2)"
        );
        let rule = Rule::new("all", std::time::Duration::from_secs(60), &[], vec![]);
        assert!(delete_batch_sql(&rule).contains("WHERE (\"bucket\") IN (SELECT \"bucket\" FROM"));
    }
}
