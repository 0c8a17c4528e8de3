//! Citus (distributed PostgreSQL): `[[rule]] distribute_by = "<group_by column>"`.
//!
//! On a database with the `citus` extension the sidecar must talk to the coordinator (its
//! checkpoint lock is an advisory lock, which exists only on the node that takes it), and it
//! creates its tables in the form one transaction can cover: each rule table with
//! `distribute_by` hash-distributed on that column, all of them co-located (shard *n* of
//! every rule table on the same worker), and the checkpoint table **coordinator-local**
//! (`citus_add_local_table_to_metadata`): writing it is local execution, which Citus always
//! commits in two phases together with the shards a flush wrote (docs/scaling.md says why
//! not a reference table). Without Citus `distribute_by` is a warning, never an error.
//!
//! The pure part ([`Placement`], [`judge_rule_table`], [`judge_checkpoint`] and the SQL
//! text) is unit-tested here; [`prepare`], [`create_tables`] and [`report`] are the
//! connection steps `store.rs` and `logtally check` run.

use tokio_postgres::{Client, GenericClient};

use crate::config::{Config, BUCKET_COLUMN, CHECKPOINT_TABLE};

use super::schema::TableSpec;
use super::sql::{create_sql, quote};
use super::StoreError;

/// Whether the database has Citus: its `extversion`, if any.
pub(super) const DETECT_SQL: &str = "SELECT extversion FROM pg_extension WHERE extname = 'citus'";

/// This node's role: coordinator or worker, and whether the coordinator is registered in
/// the metadata (`citus_set_coordinator_host`; a coordinator-local table needs it).
const ROLE_SQL: &str = "SELECT citus_is_coordinator(), \
     EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid = 0)";

/// Serializes the DDL of sidecars starting together (one transaction each).
const DDL_LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(hashtextextended('logtally_ddl', 0))";

/// How Citus holds a table: `$1` is its quoted name.
const PLACEMENT_SQL: &str = "SELECT partmethod::text, repmodel::text, \
     CASE WHEN partkey IS NULL THEN NULL ELSE column_to_column_name(logicalrelid, partkey) END, \
     (SELECT count(*) FROM pg_dist_shard s WHERE s.logicalrelid = p.logicalrelid) \
     FROM pg_dist_partition p WHERE logicalrelid = to_regclass($1::text)";

/// `create_distributed_table`: `$1` the quoted table, `$2` the column, `$3` the table to
/// co-locate with (`'default'`: Citus' group for the column's type and shard count).
const DISTRIBUTE_SQL: &str =
    "SELECT create_distributed_table($1::text::regclass, $2::text, colocate_with => $3::text)";

/// Makes the checkpoint table a coordinator-local Citus table (keeps its rows).
const ADD_LOCAL_SQL: &str = "SELECT citus_add_local_table_to_metadata($1::text::regclass)";

/// How Citus holds one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Not in Citus' metadata: a plain table of the coordinator.
    Plain,
    /// Hash-distributed on `column` over `shards` shards.
    Distributed { column: String, shards: i64 },
    /// A reference table: a copy on every node.
    Reference,
    /// A coordinator-local Citus table (`citus_add_local_table_to_metadata`).
    CoordinatorLocal,
    /// Append- or range-distributed (`partmethod` `a` / `r`), or anything newer.
    Other(String),
}

impl Placement {
    /// From `pg_dist_partition`'s row (`None`: not there).
    pub fn from_row(method: &str, replication: &str, column: Option<String>, shards: i64) -> Self {
        match (method, replication, column) {
            ("h", _, Some(column)) => Placement::Distributed { column, shards },
            ("n", "t", _) => Placement::Reference,
            ("n", _, _) => Placement::CoordinatorLocal,
            (m, _, _) => Placement::Other(m.to_string()),
        }
    }

    /// What `logtally check` prints.
    pub fn describe(&self) -> String {
        match self {
            Placement::Plain => "plain (not in Citus' metadata)".into(),
            Placement::Distributed { column, shards } => {
                format!("distributed by {column} (hash, {shards} shards)")
            }
            Placement::Reference => "reference table (a copy on every node)".into(),
            Placement::CoordinatorLocal => "coordinator-local (Citus)".into(),
            Placement::Other(m) => format!("distributed with partition method {m:?}"),
        }
    }
}

/// What to make of a table's placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but not as configured or not at its best: said at start and by `check`.
    Warn(String),
    /// The sidecar cannot rely on it: refused.
    Refuse(String),
}

/// A rule table's placement against its key (`bucket` + `group_by`) and `distribute_by`.
pub fn judge_rule_table(
    table: &str,
    group_by: &[String],
    distribute_by: Option<&str>,
    placement: &Placement,
) -> Verdict {
    let in_key = |c: &str| c == BUCKET_COLUMN || group_by.iter().any(|g| g == c);
    match (placement, distribute_by) {
        (Placement::Distributed { column, .. }, _) if !in_key(column) => Verdict::Refuse(format!(
            "table {table} is distributed on {column:?}, which is not in the rule's key \
             (bucket, {}): an upsert on the key cannot be routed to one shard; \
             undistribute it (SELECT undistribute_table('{table}')) or fix the rule",
            group_by.join(", ")
        )),
        (Placement::Distributed { column, .. }, Some(want)) if column != want => {
            Verdict::Warn(format!(
                "table {table} is distributed on {column:?}, not on distribute_by = {want:?} \
                 (it works; SELECT alter_distributed_table('{table}', distribution_column \
                 := '{want}') changes it)"
            ))
        }
        (Placement::Distributed { column, .. }, None) if column == BUCKET_COLUMN => {
            Verdict::Warn(format!(
                "table {table} is distributed on bucket: every write of a bucket goes to \
                 one shard (a hot spot); distribute on a group_by column"
            ))
        }
        (Placement::Distributed { .. }, _) => Verdict::Ok,
        (Placement::Other(method), _) => Verdict::Refuse(format!(
            "table {table} is distributed with partition method {method:?} (append or range): \
             logtally's upserts need a hash-distributed table (distribute_by)"
        )),
        (Placement::Plain, Some(want)) => Verdict::Warn(format!(
            "table {table} is not distributed although distribute_by = {want:?} (it held rows \
             when the sidecar found it); run SELECT create_distributed_table('{table}', \
             '{want}'); then SELECT truncate_local_data_after_distributing_table('{table}');"
        )),
        (Placement::Reference | Placement::CoordinatorLocal | Placement::Plain, _) => Verdict::Ok,
    }
}

/// The checkpoint table's placement: coordinator-local is what one transaction needs.
pub fn judge_checkpoint(placement: &Placement) -> Verdict {
    match placement {
        Placement::CoordinatorLocal => Verdict::Ok,
        Placement::Reference => Verdict::Warn(format!(
            "{CHECKPOINT_TABLE} is a reference table: it works, but every flush writes every \
             node and any worker down stops every flush (coordinator-local is better)"
        )),
        Placement::Plain => Verdict::Warn(format!(
            "{CHECKPOINT_TABLE} is a plain table on a Citus coordinator: a flush that Citus \
             routes to one shard could commit there before the checkpoint (counted twice \
             after a crash); the sidecar makes it coordinator-local at start"
        )),
        Placement::Distributed { .. } | Placement::Other(_) => Verdict::Warn(format!(
            "{CHECKPOINT_TABLE} is distributed: it works, but coordinator-local is cheaper \
             (SELECT undistribute_table('{CHECKPOINT_TABLE}'))"
        )),
    }
}

/// The warning for `distribute_by` on a database without Citus.
pub fn no_citus_warning(table: &str, column: &str) -> String {
    format!(
        "rule table {table}: distribute_by = {column:?} ignored: the citus extension is not \
         installed in this database; the table stays a plain table"
    )
}

/// What [`prepare`] found: Citus' version when the database is a Citus coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CitusNode {
    pub version: String,
}

/// Detects Citus. Refuses a Citus worker (the checkpoint lock is node-local: sidecars must
/// all use the coordinator) and a coordinator not registered in its own metadata.
pub(super) async fn prepare(client: &Client) -> Result<Option<CitusNode>, StoreError> {
    let Some(row) = client
        .query_opt(DETECT_SQL, &[])
        .await
        .map_err(StoreError::db("look for the citus extension"))?
    else {
        return Ok(None);
    };
    let version: String = row.get(0);
    let role = client
        .query_one(ROLE_SQL, &[])
        .await
        .map_err(StoreError::db("read the Citus node's role"))?;
    let (coordinator, registered): (bool, bool) = (role.get(0), role.get(1));
    if !coordinator {
        return Err(StoreError::Citus(
            "database_url points at a Citus worker; sidecars must connect to the coordinator \
             (the checkpoint lock is an advisory lock, which exists only on the node that \
             takes it)"
                .into(),
        ));
    }
    if !registered {
        return Err(StoreError::Citus(
            "the Citus coordinator is not in its own metadata, which a coordinator-local \
             checkpoint table needs: run SELECT citus_set_coordinator_host('<host>', <port>); \
             on it"
                .into(),
        ));
    }
    Ok(Some(CitusNode { version }))
}

/// How Citus holds `table`.
async fn placement(client: &impl GenericClient, table: &str) -> Result<Placement, StoreError> {
    let row = client
        .query_opt(PLACEMENT_SQL, &[&quote(table)])
        .await
        .map_err(StoreError::db("read pg_dist_partition"))?;
    Ok(match row {
        None => Placement::Plain,
        Some(r) => Placement::from_row(
            &r.get::<_, String>(0),
            &r.get::<_, String>(1),
            r.get(2),
            r.get(3),
        ),
    })
}

/// On a Citus coordinator, in ONE transaction under an advisory lock (sidecars starting
/// together do the work once): creates the `missing` tables, distributes every rule table
/// with `distribute_by` that Citus does not hold yet and is empty (co-located with the
/// first), and makes the checkpoint table coordinator-local. A plain rule table that holds
/// rows is left alone (distributing copies and locks it): [`report`] says what to run.
pub(super) async fn create_tables(
    client: &mut Client,
    config: &Config,
    missing: &[TableSpec],
) -> Result<(), StoreError> {
    if !ddl_needed(client, config, missing).await? {
        return Ok(());
    }
    let tx = client
        .transaction()
        .await
        .map_err(StoreError::db("begin Citus DDL"))?;
    tx.batch_execute(DDL_LOCK_SQL)
        .await
        .map_err(StoreError::db("lock Citus DDL"))?;
    for spec in missing {
        tx.batch_execute(&create_sql(spec))
            .await
            .map_err(StoreError::db("create table"))?;
        tracing::info!(table = %spec.name, "created table");
    }
    let mut colocate_with = "default".to_string();
    for d in &config.distribute_by {
        let table = quote(&d.table);
        let found = placement(&tx, &d.table).await?;
        let mut distributed = matches!(found, Placement::Distributed { .. });
        if found == Placement::Plain {
            let empty = tx
                .query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {table})"), &[])
                .await
                .map_err(StoreError::db("look into a table to distribute"))?;
            if empty.get::<_, bool>(0) {
                tx.execute(DISTRIBUTE_SQL, &[&table, &d.column, &colocate_with])
                    .await
                    .map_err(StoreError::db("create_distributed_table"))?;
                tracing::info!(table = %d.table, column = %d.column, colocate_with = %colocate_with,
                    "distributed table (Citus)");
                distributed = true;
            }
        }
        if distributed && colocate_with == "default" {
            colocate_with = table;
        }
    }
    if placement(&tx, CHECKPOINT_TABLE).await? == Placement::Plain {
        tx.execute(ADD_LOCAL_SQL, &[&quote(CHECKPOINT_TABLE)])
            .await
            .map_err(StoreError::db("citus_add_local_table_to_metadata"))?;
        tracing::info!(
            table = CHECKPOINT_TABLE,
            "made the checkpoint table coordinator-local (Citus)"
        );
    }
    tx.commit()
        .await
        .map_err(StoreError::db("commit Citus DDL"))
}

/// Whether [`create_tables`] has anything to do (a restart usually has not: no DDL lock,
/// no transaction).
async fn ddl_needed(
    client: &Client,
    config: &Config,
    missing: &[TableSpec],
) -> Result<bool, StoreError> {
    if !missing.is_empty() || placement(client, CHECKPOINT_TABLE).await? == Placement::Plain {
        return Ok(true);
    }
    for d in &config.distribute_by {
        if placement(client, &d.table).await? == Placement::Plain {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Per table, how it is held (`(table, description)`), and the warnings; an error for a
/// table the sidecar cannot rely on. Without Citus: each `distribute_by` is a warning.
pub(super) async fn report(
    client: &Client,
    config: &Config,
    citus: Option<&CitusNode>,
) -> Result<(Vec<(String, String)>, Vec<String>), StoreError> {
    let mut tables = Vec::new();
    let mut warnings = Vec::new();
    let Some(node) = citus else {
        for d in &config.distribute_by {
            warnings.push(no_citus_warning(&d.table, &d.column));
        }
        return Ok((tables, warnings));
    };
    let mut refusals = Vec::new();
    let mut judge = |table: &str, placement: &Placement, verdict: Verdict| {
        tables.push((
            table.to_string(),
            format!("{} (Citus {})", placement.describe(), node.version),
        ));
        match verdict {
            Verdict::Ok => {}
            Verdict::Warn(w) => warnings.push(w),
            Verdict::Refuse(r) => refusals.push(r),
        }
    };
    for rule in &config.rules {
        let p = placement(client, &rule.table).await?;
        let verdict = judge_rule_table(
            &rule.table,
            &rule.group_by,
            config.distribute_by(&rule.table),
            &p,
        );
        judge(&rule.table, &p, verdict);
    }
    let p = placement(client, CHECKPOINT_TABLE).await?;
    judge(CHECKPOINT_TABLE, &p, judge_checkpoint(&p));
    if refusals.is_empty() {
        Ok((tables, warnings))
    } else {
        Err(StoreError::Citus(refusals.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Vec<String> {
        vec!["ad".into(), "ev".into()]
    }

    fn hash(column: &str) -> Placement {
        Placement::Distributed {
            column: column.into(),
            shards: 32,
        }
    }

    #[test]
    fn placements_from_pg_dist_partition() {
        assert_eq!(
            Placement::from_row("h", "s", Some("ad".into()), 32),
            hash("ad")
        );
        assert_eq!(Placement::from_row("n", "t", None, 1), Placement::Reference);
        assert_eq!(
            Placement::from_row("n", "s", None, 1),
            Placement::CoordinatorLocal
        );
        assert_eq!(
            Placement::from_row("a", "c", Some("ad".into()), 4),
            Placement::Other("a".into())
        );
        assert_eq!(hash("ad").describe(), "distributed by ad (hash, 32 shards)");
        assert_eq!(
            Placement::CoordinatorLocal.describe(),
            "coordinator-local (Citus)"
        );
    }

    #[test]
    fn a_table_distributed_off_the_key_is_refused() {
        let v = judge_rule_table("t", &key(), Some("ad"), &hash("uid"));
        let Verdict::Refuse(msg) = v else {
            panic!("{v:?}")
        };
        assert!(msg.contains("table t is distributed on \"uid\""), "{msg}");
        assert!(msg.contains("(bucket, ad, ev)"), "{msg}");
        assert!(matches!(
            judge_rule_table("t", &key(), None, &Placement::Other("r".into())),
            Verdict::Refuse(_)
        ));
    }

    #[test]
    fn key_columns_pass_and_other_key_columns_warn() {
        assert_eq!(
            judge_rule_table("t", &key(), Some("ad"), &hash("ad")),
            Verdict::Ok
        );
        assert_eq!(
            judge_rule_table("t", &key(), None, &hash("ev")),
            Verdict::Ok
        );
        assert!(matches!(
            judge_rule_table("t", &key(), Some("ad"), &hash("ev")),
            Verdict::Warn(w) if w.contains("not on distribute_by = \"ad\"")
        ));
        assert!(matches!(
            judge_rule_table("t", &key(), None, &hash("bucket")),
            Verdict::Warn(w) if w.contains("hot spot")
        ));
        assert!(matches!(
            judge_rule_table("t", &key(), Some("ad"), &Placement::Plain),
            Verdict::Warn(w) if w.contains("create_distributed_table('t', 'ad')")
        ));
        assert_eq!(
            judge_rule_table("t", &key(), None, &Placement::Plain),
            Verdict::Ok
        );
        assert_eq!(
            judge_rule_table("t", &key(), None, &Placement::Reference),
            Verdict::Ok
        );
    }

    #[test]
    fn the_checkpoint_wants_to_be_coordinator_local() {
        assert_eq!(judge_checkpoint(&Placement::CoordinatorLocal), Verdict::Ok);
        for p in [Placement::Reference, Placement::Plain, hash("node")] {
            assert!(matches!(judge_checkpoint(&p), Verdict::Warn(_)), "{p:?}");
        }
    }

    #[test]
    fn no_citus_is_a_warning_naming_the_rule() {
        assert_eq!(
            no_citus_warning("ad_events_1m", "ad"),
            "rule table ad_events_1m: distribute_by = \"ad\" ignored: the citus extension is \
             not installed in this database; the table stays a plain table"
        );
    }

    #[test]
    fn the_sql_binds_names_and_reads_one_table() {
        for sql in [PLACEMENT_SQL, DISTRIBUTE_SQL, ADD_LOCAL_SQL] {
            assert!(sql.contains("$1::text"), "{sql}");
        }
        assert!(DISTRIBUTE_SQL.contains("colocate_with => $3::text"));
        assert!(PLACEMENT_SQL.contains("pg_dist_shard"));
    }
}
