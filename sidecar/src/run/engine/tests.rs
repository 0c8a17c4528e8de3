//! The engine's exactly-once decisions against an in-memory database: a model of one
//! PostgreSQL transaction per flush (rows merged as the additive upsert merges them, the
//! checkpoint moved by the store's own compare-and-swap) that can fail on cue, before a
//! commit or after it (a lost COMMIT reply). The expected totals are counted from the events
//! each test makes, not by the code under test.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use logtally_spool::{encode_event, SegmentItem, SegmentReader};

use super::*;
use crate::aggregate::{merge_rows, Aggregator, MetricValue, RuleRows};
use crate::binlog::BinlogRecord;
use crate::config::Rule;
use crate::db::{compare_checkpoint, CheckpointState};
use crate::http::status::Status;

/// A failure the model database produces on its next operation of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `connect` finds no server.
    Unreachable,
    /// `flush` fails before its COMMIT: nothing lands.
    FailBeforeCommit,
    /// `flush` commits, then its reply is lost: everything lands, the caller sees an error.
    LoseCommitReply,
    /// `delete_finished` fails.
    FailDelete,
}

/// What the model database holds: one node's checkpoint and the rule tables.
#[derive(Debug, Default)]
struct Model {
    tables: Vec<RuleRows>,
    checkpoint: BTreeMap<String, (u64, bool)>,
    faults: VecDeque<Fault>,
    /// Operations that reached the database, in order.
    calls: Vec<&'static str>,
}

impl Model {
    fn take(&mut self, fault: Fault) -> bool {
        let hit = self.faults.front() == Some(&fault);
        if hit {
            self.faults.pop_front();
        }
        hit
    }
}

/// One process's connection to the model database.
struct MemoryDb {
    node: String,
    rules: Vec<Rule>,
    model: Arc<Mutex<Model>>,
    connected: bool,
}

/// The error a lost reply looks like to the engine.
fn lost() -> StoreError {
    StoreError::Timeout(Duration::from_secs(60))
}

impl MemoryDb {
    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap()
    }
}

impl Database for MemoryDb {
    async fn connect(&mut self) -> Result<bool, StoreError> {
        if self.model().take(Fault::Unreachable) {
            self.connected = false;
            return Err(StoreError::ConnectTimeout {
                target: "memory".into(),
                after: Duration::from_secs(10),
            });
        }
        let new = !self.connected;
        self.connected = true;
        Ok(new)
    }

    fn disconnect(&mut self) {
        self.connected = false;
    }

    async fn load_checkpoint(&mut self) -> Result<Vec<CheckpointEntry>, StoreError> {
        let mut m = self.model();
        m.calls.push("load_checkpoint");
        Ok(m.checkpoint
            .iter()
            .map(|(segment, &(offset, finished))| CheckpointEntry {
                segment: segment.clone(),
                offset,
                finished,
            })
            .collect())
    }

    async fn ping(&mut self) -> Result<(), StoreError> {
        self.model().calls.push("ping");
        Ok(())
    }

    async fn flush(
        &mut self,
        rules: &[DrainedRows],
        positions: &[CheckpointEntry],
        previous: &HashMap<String, CheckpointEntry>,
    ) -> Result<FlushOutcome, StoreError> {
        let (node, table_rules) = (self.node.clone(), self.rules.clone());
        let mut m = self.model();
        m.calls.push("flush");
        if m.take(Fault::FailBeforeCommit) {
            drop(m);
            self.connected = false;
            return Err(lost());
        }
        let found: HashMap<String, (u64, bool)> = positions
            .iter()
            .filter_map(|p| Some((p.segment.clone(), *m.checkpoint.get(&p.segment)?)))
            .collect();
        if !positions.is_empty()
            && compare_checkpoint(&node, positions, previous, &found)?
                == CheckpointState::AlreadyThere
        {
            return Ok(FlushOutcome::AlreadyCommitted);
        }
        let tables = std::mem::take(&mut m.tables);
        let added = rules.iter().cloned().map(DrainedRows::into_rule_rows);
        m.tables = merge_rows(&table_rules, tables.into_iter().chain(added));
        for p in positions {
            m.checkpoint
                .insert(p.segment.clone(), (p.offset, p.finished));
        }
        if m.take(Fault::LoseCommitReply) {
            drop(m);
            self.connected = false;
            return Err(lost());
        }
        Ok(FlushOutcome::Committed)
    }

    async fn delete_finished(&mut self, segments: &[String]) -> Result<u64, StoreError> {
        let mut m = self.model();
        m.calls.push("delete_finished");
        if m.take(Fault::FailDelete) {
            return Err(lost());
        }
        let before = m.checkpoint.len();
        m.checkpoint
            .retain(|name, &mut (_, finished)| !(finished && segments.contains(name)));
        Ok((before - m.checkpoint.len()) as u64)
    }
}

/// A database, and what each process started over it shares.
struct Setup {
    dir: tempfile::TempDir,
    config: Arc<Config>,
    model: Arc<Mutex<Model>>,
}

const T0: u64 = 1_764_288_000_000;

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "node = \"n1\"\nbinlog = \"{}\"\n[[rule]]\ntable = \"hits\"\nbucket = \"1m\"\n\
         group_by = [\"ad\"]\nmetrics = {{ n = \"count\" }}\n",
        dir.path().join("binlog").display()
    );
    let config = Arc::new(crate::config::parse(Path::new("t.toml"), &text).unwrap());
    Setup {
        dir,
        config,
        model: Arc::default(),
    }
}

impl Setup {
    /// A new process's engine over the database (a restart is a new one).
    fn engine(&self) -> Engine<MemoryDb> {
        let db = MemoryDb {
            node: self.config.node.clone(),
            rules: self.config.rules.clone(),
            model: self.model.clone(),
            connected: false,
        };
        let status = SharedStatus::new(Status::from_config(&self.config, 0));
        let metrics = Arc::new(Metrics::new().unwrap());
        Engine::new(self.config.clone(), metrics, status, db)
    }

    fn fault(&self, fault: Fault) {
        self.model.lock().unwrap().faults.push_back(fault);
    }

    fn calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.model.lock().unwrap().calls)
    }

    /// The `hits` table: ad → count, all buckets together.
    fn table(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for rows in &self.model.lock().unwrap().tables {
            for row in &rows.rows {
                if let MetricValue::Count(n) = row.metrics[0] {
                    *out.entry(row.dims[0].clone()).or_default() += n;
                }
            }
        }
        out
    }

    fn checkpoint(&self) -> BTreeMap<String, (u64, bool)> {
        self.model.lock().unwrap().checkpoint.clone()
    }

    fn binlog(&self) -> Vec<BinlogRecord> {
        binlog::read(&self.dir.path().join("binlog"), true).unwrap_or_default()
    }
}

/// A drained batch of one event per ad in `ads`, read up to `positions`.
fn batch(config: &Config, ads: &[&str], positions: &[(&str, u64, bool)]) -> Drained {
    let mut aggregator = Aggregator::new(&config.rules);
    let fields = vec!["ad".to_string()];
    let mut bytes = Vec::new();
    for (i, ad) in ads.iter().enumerate() {
        encode_event(&mut bytes, T0 + i as u64, [Some(ad.as_bytes())]);
    }
    for item in SegmentReader::new(&bytes, 0) {
        let SegmentItem::Event { record, .. } = item else {
            panic!("{item:?}")
        };
        aggregator.add_cached(1, &fields, &record);
    }
    Drained {
        rules: aggregator.drain_compact(),
        positions: positions
            .iter()
            .map(|&(name, offset, finished)| (name.to_string(), Position { offset, finished }))
            .collect(),
        oldest_ms: HashMap::new(),
    }
}

/// What the events of several batches add up to: ad → count.
fn counted(batches: &[&[&str]]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for ad in batches.iter().flat_map(|b| b.iter()) {
        *out.entry(ad.to_string()).or_default() += 1;
    }
    out
}

fn pos(offset: u64, finished: bool) -> Position {
    Position { offset, finished }
}

async fn started(s: &Setup) -> Engine<MemoryDb> {
    let mut engine = s.engine();
    assert!(engine.start(&mut std::future::pending()).await.unwrap());
    engine
}

#[test]
fn backoff_doubles_up_to_the_cap_and_resets() {
    let mut b = Backoff::new();
    let steps: Vec<u64> = (0..9).map(|_| b.step().as_millis() as u64).collect();
    assert_eq!(
        steps,
        vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
    );
    b.reset();
    assert_eq!(b.step(), BACKOFF_FIRST);
}

#[tokio::test]
async fn a_retry_after_a_lost_commit_reply_counts_once() {
    let s = setup();
    let mut engine = started(&s).await;
    let first: &[&str] = &["a", "b", "a"];
    engine.set_pending(batch(&s.config, first, &[("s1", 100, false)]));
    s.fault(Fault::LoseCommitReply);
    assert_eq!(engine.commit().await.unwrap(), Commit::Retry);
    assert!(engine.has_pending(), "the batch is kept as it is");
    // The transaction did land: the database holds the batch and its position.
    assert_eq!(s.table(), counted(&[first]));
    assert_eq!(
        s.checkpoint(),
        BTreeMap::from([("s1".into(), (100, false))])
    );

    // The retry finds its own positions in the checkpoint and writes nothing again.
    assert_eq!(
        engine.commit().await.unwrap(),
        Commit::Done(vec![("s1".into(), pos(100, false))])
    );
    assert!(!engine.has_pending());
    assert_eq!(s.table(), counted(&[first]), "counted once");

    // The next batch compares against the position that landed, and adds.
    let second: &[&str] = &["b", "c"];
    engine.set_pending(batch(&s.config, second, &[("s1", 180, false)]));
    assert!(matches!(engine.commit().await.unwrap(), Commit::Done(_)));
    assert_eq!(s.table(), counted(&[first, second]));
    assert_eq!(
        s.checkpoint(),
        BTreeMap::from([("s1".into(), (180, false))])
    );
    assert_eq!(engine.metrics.flushes_ok.get(), 2);
    assert_eq!(engine.metrics.flushes_error.get(), 1);
    // One binlog record per commit this process saw succeed, each with the checkpoint.
    let records = s.binlog();
    let seqs: Vec<(u64, u64)> = records
        .iter()
        .map(|r| (r.seq, r.segments[0].offset))
        .collect();
    assert_eq!(seqs, [(1, 100), (2, 180)]);
}

#[tokio::test]
async fn a_batch_that_failed_before_its_commit_is_committed_by_the_retry() {
    let s = setup();
    let mut engine = started(&s).await;
    let first: &[&str] = &["a", "a"];
    engine.set_pending(batch(&s.config, first, &[("s1", 60, false)]));
    s.fault(Fault::FailBeforeCommit);
    assert_eq!(engine.commit().await.unwrap(), Commit::Retry);
    assert!(s.table().is_empty() && s.checkpoint().is_empty());
    assert!(!engine.status.snapshot().database.up);
    // The retry reconnects and commits the same batch, once.
    assert!(matches!(engine.commit().await.unwrap(), Commit::Done(_)));
    assert_eq!(s.table(), counted(&[first]));
    assert!(engine.status.snapshot().database.up);
    assert_eq!(
        s.calls(),
        ["load_checkpoint", "flush", "flush"],
        "nothing else reached the database"
    );
}

#[tokio::test]
async fn only_moved_positions_are_written_and_an_idle_flush_pings() {
    let s = setup();
    let mut engine = started(&s).await;
    engine.set_pending(batch(
        &s.config,
        &["a"],
        &[("s1", 50, false), ("s2", 70, false)],
    ));
    engine.commit().await.unwrap();
    s.calls();
    // Nothing read since: no rows, positions unchanged. The database is still asked (a
    // ping, so readiness knows it answers), but nothing is written.
    engine.set_pending(batch(
        &s.config,
        &[],
        &[("s1", 50, false), ("s2", 70, false)],
    ));
    assert!(matches!(engine.commit().await.unwrap(), Commit::Done(_)));
    assert_eq!(s.calls(), ["ping"]);
    assert_eq!(s.binlog().len(), 1, "an idle flush adds no binlog record");
    // One segment moved: only its row is compared and written. The other's row no longer
    // holds what this process believes (it would conflict), but it is not sent.
    s.model
        .lock()
        .unwrap()
        .checkpoint
        .insert("s2".into(), (999, false));
    engine.set_pending(batch(
        &s.config,
        &[],
        &[("s1", 90, false), ("s2", 70, false)],
    ));
    assert!(matches!(engine.commit().await.unwrap(), Commit::Done(_)));
    assert_eq!(
        s.checkpoint(),
        BTreeMap::from([("s1".into(), (90, false)), ("s2".into(), (999, false))])
    );
}

#[tokio::test]
async fn a_conflicting_checkpoint_stops_without_writing() {
    let s = setup();
    let mut engine = started(&s).await;
    engine.set_pending(batch(&s.config, &["a"], &[("s1", 100, false)]));
    engine.commit().await.unwrap();
    // Another sidecar with the same node moved the checkpoint meanwhile.
    s.model
        .lock()
        .unwrap()
        .checkpoint
        .insert("s1".into(), (150, false));
    engine.set_pending(batch(&s.config, &["b"], &[("s1", 200, false)]));
    let err = engine.commit().await.unwrap_err();
    assert!(
        matches!(err, StoreError::CheckpointConflict { .. }) && !err.is_transient(),
        "{err}"
    );
    assert!(engine.has_pending());
    assert_eq!(
        s.table(),
        counted(&[&["a"]]),
        "the refused batch did not count"
    );
}

#[tokio::test]
async fn checkpoint_rows_are_forgotten_after_their_segments_are_deleted() {
    let s = setup();
    let mut engine = started(&s).await;
    engine.set_pending(batch(
        &s.config,
        &["a"],
        &[("s1", 300, true), ("s2", 40, false)],
    ));
    let Commit::Done(positions) = engine.commit().await.unwrap() else {
        panic!("not committed")
    };
    assert_eq!(
        positions,
        [("s1".into(), pos(300, true)), ("s2".into(), pos(40, false))]
    );
    // The reader kept the finished segment (retain): its row stays.
    engine.forget(vec![]).await;
    assert!(s.checkpoint().contains_key("s1"));
    // It deleted it, but deleting the row fails: kept, and tried again after the next
    // commit. The position stays in what the engine hands the reader meanwhile.
    s.fault(Fault::FailDelete);
    engine.forget(vec!["s1".into()]).await;
    assert!(s.checkpoint().contains_key("s1"));
    engine.set_pending(batch(&s.config, &["b"], &[("s2", 80, false)]));
    let Commit::Done(positions) = engine.commit().await.unwrap() else {
        panic!("not committed")
    };
    assert_eq!(positions.len(), 2);
    engine.forget(vec![]).await;
    assert_eq!(s.checkpoint(), BTreeMap::from([("s2".into(), (80, false))]));
    engine.set_pending(batch(&s.config, &[], &[("s2", 80, false)]));
    assert_eq!(
        engine.commit().await.unwrap(),
        Commit::Done(vec![("s2".into(), pos(80, false))])
    );
    assert_eq!(s.table(), counted(&[&["a"], &["b"]]));
}

#[tokio::test]
async fn a_restart_resumes_from_the_database_checkpoint() {
    let s = setup();
    {
        let mut engine = started(&s).await;
        engine.set_pending(batch(
            &s.config,
            &["a"],
            &[
                ("gone", 500, true),
                ("kept", 500, true),
                ("live", 300, false),
            ],
        ));
        engine.commit().await.unwrap();
        // The process dies before the reader deleted anything.
    }
    let mut engine = started(&s).await;
    let start = engine.resume(|segment| segment != "gone");
    assert_eq!(
        start,
        HashMap::from([
            ("gone".into(), pos(500, true)),
            ("kept".into(), pos(500, true)),
            ("live".into(), pos(300, false)),
        ])
    );
    // The next batch goes on from the loaded positions; the gone segment's row is
    // forgotten after that commit, the kept one stays until its file is deleted.
    engine.set_pending(batch(&s.config, &["b"], &[("live", 420, false)]));
    assert!(matches!(engine.commit().await.unwrap(), Commit::Done(_)));
    engine.forget(vec![]).await;
    assert_eq!(
        s.checkpoint(),
        BTreeMap::from([("kept".into(), (500, true)), ("live".into(), (420, false))])
    );
    assert_eq!(s.table(), counted(&[&["a"], &["b"]]));
}

#[tokio::test]
async fn a_restart_after_a_lost_commit_reply_resumes_after_the_batch() {
    let s = setup();
    let first: &[&str] = &["a", "b"];
    {
        let mut engine = started(&s).await;
        engine.set_pending(batch(&s.config, first, &[("s1", 100, false)]));
        s.fault(Fault::LoseCommitReply);
        assert_eq!(engine.commit().await.unwrap(), Commit::Retry);
        // Killed before the retry: the batch in memory is lost, the commit is not.
    }
    let mut engine = started(&s).await;
    assert_eq!(
        engine.resume(|_| true),
        HashMap::from([("s1".into(), pos(100, false))]),
        "reading resumes after the batch that landed, so it is not read again"
    );
    assert_eq!(s.table(), counted(&[first]));
}

#[tokio::test]
async fn start_waits_for_the_database_or_stops() {
    let s = setup();
    s.fault(Fault::Unreachable);
    let mut engine = s.engine();
    assert!(engine.start(&mut std::future::pending()).await.unwrap());
    assert_eq!(engine.metrics.database_errors.get(), 1);
    assert!(engine.status.snapshot().database.up);

    s.fault(Fault::Unreachable);
    let mut engine = s.engine();
    assert!(!engine.start(&mut std::future::ready(())).await.unwrap());
}
