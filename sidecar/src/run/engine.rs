//! The commit engine: the daemon's exactly-once decisions, over a [`Database`].
//!
//! A drained batch (aggregates + the positions right after them) is committed in one
//! transaction with only the positions that moved, compared against what this process
//! believes the checkpoint holds. A batch that fails to commit is kept as it is and retried
//! with the same belief, so a retry whose first COMMIT did land is recognised by the store's
//! compare-and-swap ([`FlushOutcome::AlreadyCommitted`]) instead of counting twice. Only
//! after a commit does the engine append the binlog, hand the committed positions to the
//! reader (which may then delete finished segments) and forget the checkpoint rows of the
//! segments the reader deleted. A restart resumes from the database's checkpoint.
//!
//! The database is a small trait so these decisions are unit-tested with an in-memory model
//! (`engine/tests.rs`) beside the PostgreSQL tests; the daemon's implementation is
//! [`super::PgDatabase`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::reader::{Drained, ReaderView};
use crate::aggregate::DrainedRows;
use crate::binlog::{self, Binlog, BinlogRecord};
use crate::config::Config;
use crate::db::{CheckpointEntry, FailureLog, FlushOutcome, StoreError};
use crate::http::metrics::Metrics;
use crate::http::status::{self, FlushStatus, SharedStatus};
use crate::now_ms;
use crate::spool::tail::Position;

/// Retry backoff after a failed flush or connect: doubles from the first to the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// One flush attempt taking longer than this is abandoned (connection dropped, retried).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// What the engine needs of the database: this node's checkpoint and the one-transaction
/// flush with its compare-and-swap, behind a connection that may break at any time.
pub(crate) trait Database: Send {
    /// Makes sure a connection is open (tables in place, statements prepared): `Ok(true)`
    /// when this call opened it, `Ok(false)` when one was open already.
    fn connect(&mut self) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Drops the connection after an error: the next call opens a new one.
    fn disconnect(&mut self);
    /// This node's checkpoint rows.
    fn load_checkpoint(
        &mut self,
    ) -> impl Future<Output = Result<Vec<CheckpointEntry>, StoreError>> + Send;
    /// The keys this node admitted under `max_keys`: (rule index, bucket ms, hashes).
    fn load_admitted(
        &mut self,
    ) -> impl Future<Output = Result<Vec<(usize, i64, Vec<u64>)>, StoreError>> + Send {
        async { Ok(Vec::new()) }
    }
    /// A round trip, proving the database answers.
    fn ping(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// One transaction: every rule's rows and the checkpoint rows `positions`, provided the
    /// checkpoint rows of those segments hold `previous` (else `AlreadyCommitted` when they
    /// hold `positions`, else a `CheckpointConflict`). See [`crate::db::Store::flush`].
    fn flush(
        &mut self,
        rules: &[DrainedRows],
        positions: &[CheckpointEntry],
        previous: &HashMap<String, CheckpointEntry>,
    ) -> impl Future<Output = Result<FlushOutcome, StoreError>> + Send;
    /// Deletes the checkpoint rows of these segments where they are finished.
    fn delete_finished(
        &mut self,
        segments: &[String],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Capped exponential backoff.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        d
    }
}

/// What one commit attempt did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Commit {
    /// The batch committed (or had committed before): every position the checkpoint now
    /// holds, in name order, for the reader ([`super::reader::ReaderHandle::committed`]).
    Done(Vec<(String, Position)>),
    /// A transient failure: the batch is kept as it is; try again after
    /// [`Engine::retry_delay`].
    Retry,
    /// No batch was pending.
    Idle,
}

/// The engine's state. See the module documentation.
pub(crate) struct Engine<D> {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
    db: D,
    /// What the database checkpoint holds for this node (as far as this process knows).
    committed: HashMap<String, CheckpointEntry>,
    /// Drained but not committed: retried as is until it commits.
    pending: Option<Drained>,
    /// Checkpoint rows of finished segments whose files are gone, still to delete.
    to_forget: Vec<String>,
    binlog: Option<Binlog>,
    seq: u64,
    backoff: Backoff,
    /// Reports database failures (needs-operator ones once per message).
    failures: FailureLog,
    /// The admitted keys loaded at start, until the reader takes them.
    admitted: Vec<(usize, i64, Vec<u64>)>,
}

impl<D: Database> Engine<D> {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, status: SharedStatus, db: D) -> Self {
        Engine {
            config,
            metrics,
            status,
            db,
            committed: HashMap::new(),
            pending: None,
            to_forget: Vec::new(),
            binlog: None,
            seq: 0,
            backoff: Backoff::new(),
            failures: FailureLog::default(),
            admitted: Vec::new(),
        }
    }

    /// The admitted keys loaded by [`start`](Self::start) (once).
    pub fn take_admitted(&mut self) -> Vec<(usize, i64, Vec<u64>)> {
        std::mem::take(&mut self.admitted)
    }

    /// Connects; a new connection shows the database up.
    async fn connect(&mut self) -> Result<(), StoreError> {
        if self.db.connect().await? {
            self.status.update(|s| s.record_database(now_ms(), Ok(())));
            self.metrics.database_up.set(1);
        }
        Ok(())
    }

    fn database_failed(&mut self, err: &StoreError) {
        self.db.disconnect();
        self.metrics.database_errors.inc();
        self.metrics.database_up.set(0);
        self.status
            .update(|s| s.record_database_error(now_ms(), err));
    }

    /// Connects and loads the checkpoint, retrying transient failures until `stop` fires:
    /// `Ok(true)` loaded, `Ok(false)` stopped first, `Err` a failure waiting cannot fix.
    pub async fn start(
        &mut self,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<bool, StoreError> {
        loop {
            let attempt = async {
                self.connect().await?;
                let entries = self.db.load_checkpoint().await?;
                Ok::<_, StoreError>((entries, self.db.load_admitted().await?))
            };
            match attempt.await {
                Ok((entries, admitted)) => {
                    self.admitted = admitted;
                    self.committed = entries
                        .into_iter()
                        .map(|e| (e.segment.clone(), e))
                        .collect();
                    self.backoff.reset();
                    self.failures.recovered();
                    return Ok(true);
                }
                Err(e) if e.is_retried() => {
                    self.database_failed(&e);
                    let wait = self.backoff.step();
                    let what = format!(
                        "database unavailable at start; retry in {}ms",
                        wait.as_millis()
                    );
                    self.failures.failed(&e, &what);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = &mut *stop => return Ok(false),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Where reading resumes after [`start`](Self::start): the database checkpoint, the
    /// truth about what has been counted. Finished segments whose files are gone (`exists`
    /// says, by file name) will never be read again: their rows are forgotten after the
    /// next commit.
    pub fn resume(&mut self, exists: impl Fn(&str) -> bool) -> HashMap<String, Position> {
        self.to_forget = self
            .committed
            .values()
            .filter(|e| e.finished && !exists(&e.segment))
            .map(|e| e.segment.clone())
            .collect();
        self.committed.values().map(segment_position).collect()
    }

    /// Whether a drained batch waits for its commit (then no new one is drained).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The next batch to commit.
    pub fn set_pending(&mut self, batch: Drained) {
        debug_assert!(self.pending.is_none(), "a pending batch is never replaced");
        self.pending = Some(batch);
    }

    /// How long to wait before the next attempt after a failure (doubling, capped).
    pub fn retry_delay(&mut self) -> Duration {
        self.backoff.step()
    }

    /// Commits the pending batch once. `Err` is a failure that retrying cannot fix; the
    /// batch stays pending either way it fails.
    pub async fn commit(&mut self) -> Result<Commit, StoreError> {
        let Some(batch) = self.pending.take() else {
            return Ok(Commit::Idle);
        };
        // Only the positions that moved: the compare-and-swap then covers exactly them.
        let changed: Vec<CheckpointEntry> = batch
            .positions
            .iter()
            .filter(|(name, p)| {
                self.committed
                    .get(name)
                    .is_none_or(|c| c.offset != p.offset || c.finished != p.finished)
            })
            .map(|(name, p)| entry(name, *p))
            .collect();
        let rows = batch.rows();
        let started = Instant::now();
        let result = match self.connect().await {
            Err(e) => Err(e),
            // Nothing new: still prove the database answers (readiness counts on it).
            Ok(()) if changed.is_empty() && rows == 0 => {
                self.db.ping().await.map(|()| FlushOutcome::Committed)
            }
            Ok(()) => {
                let flush = self.db.flush(&batch.rules, &changed, &self.committed);
                match tokio::time::timeout(FLUSH_TIMEOUT, flush).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout(FLUSH_TIMEOUT)),
                }
            }
        };
        let elapsed = started.elapsed();
        self.metrics.flush_duration.observe(elapsed.as_secs_f64());
        let at_ms = now_ms();
        let flush_status = |rows, error: Option<&StoreError>| FlushStatus {
            at_ms,
            duration_seconds: elapsed.as_secs_f64(),
            rows,
            outcome: match error {
                None => status::FlushOutcome::Ok,
                Some(_) => status::FlushOutcome::Error,
            },
            error: error.map(|e| e.to_string()),
        };
        match result {
            Ok(outcome) => {
                if outcome == FlushOutcome::AlreadyCommitted {
                    info!(
                        rows,
                        "the previous attempt of this flush had committed; not repeated"
                    );
                }
                self.metrics.flushes_ok.inc();
                self.metrics.database_up.set(1);
                for r in &batch.rules {
                    if let Some(rule) = self.config.rules.get(r.rule) {
                        self.metrics.add_rows_upserted(&rule.table, r.len() as u64);
                    }
                }
                self.status
                    .update(|s| s.record_flush(flush_status(rows, None)));
                debug!(
                    rows,
                    segments = changed.len(),
                    ms = elapsed.as_millis() as u64,
                    "flush committed"
                );
                let wrote = rows > 0 || !changed.is_empty();
                for c in changed {
                    self.committed.insert(c.segment.clone(), c);
                }
                let mut all: Vec<CheckpointEntry> = self.committed.values().cloned().collect();
                all.sort_by(|a, b| a.segment.cmp(&b.segment));
                if wrote {
                    self.seq += 1;
                    let record = BinlogRecord::new(self.seq, at_ms, &self.config.node, rows, &all);
                    self.append_binlog(&record);
                }
                self.backoff.reset();
                self.failures.recovered();
                Ok(Commit::Done(all.iter().map(segment_position).collect()))
            }
            Err(e) if e.is_retried() => {
                self.metrics.flushes_error.inc();
                self.database_failed(&e);
                self.status
                    .update(|s| s.record_flush(flush_status(0, Some(&e))));
                let what = format!("flush of {rows} rows failed; the batch is kept and retried");
                self.failures.failed(&e, &what);
                self.pending = Some(batch);
                Ok(Commit::Retry)
            }
            Err(e) => {
                self.metrics.flushes_error.inc();
                self.database_failed(&e);
                self.pending = Some(batch);
                Err(e)
            }
        }
    }

    /// After a commit, once the reader deleted the finished segments `removed`: forgets
    /// their checkpoint rows (and any left from before). A failure leaves them for the next
    /// commit: a finished row of a gone file is inert.
    pub async fn forget(&mut self, removed: Vec<String>) {
        self.to_forget.extend(removed);
        if self.to_forget.is_empty() {
            return;
        }
        match self.db.delete_finished(&self.to_forget).await {
            Ok(_) => {
                for name in self.to_forget.drain(..) {
                    self.committed.remove(&name);
                }
            }
            Err(error) => warn!(%error, "cannot delete checkpoint rows of deleted segments"),
        }
    }

    fn append_binlog(&mut self, record: &BinlogRecord) {
        if self.binlog.is_none() {
            match Binlog::open(&self.config.binlog, binlog::DEFAULT_MAX_BYTES) {
                Ok(b) => self.binlog = Some(b),
                Err(error) => {
                    error!(%error, "cannot open the binlog; the database checkpoint stays the truth");
                    return;
                }
            }
        }
        let b = self.binlog.as_mut().expect("opened above");
        match b.append(record) {
            Ok(()) => self.metrics.binlog_writes.inc(),
            Err(error) => {
                error!(%error, "cannot append to the binlog; the database checkpoint stays the truth");
                self.binlog = None;
            }
        }
    }

    /// Refreshes `/status` segments and the lag gauges from the reader's view.
    pub fn refresh_status(&self, view: &ReaderView) {
        let now = now_ms();
        let mut oldest: HashMap<&str, u64> = HashMap::new();
        let pending_oldest = self.pending.iter().flat_map(|p| p.oldest_ms.iter());
        for (name, t) in view.oldest_ms.iter().chain(pending_oldest) {
            let o = oldest.entry(name.as_str()).or_insert(*t);
            *o = (*o).min(*t);
        }
        let committed: HashMap<String, Position> =
            self.committed.values().map(segment_position).collect();
        let oldest: HashMap<String, u64> = oldest
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        self.status.update(|s| {
            s.sync_segments(&view.segments, &committed, &oldest, now);
            s.pending_keys =
                view.pending_keys as u64 + self.pending.as_ref().map_or(0, |p| p.rows());
            s.module_dropped_events = view.dropped_events;
            s.set_top_keys(&view.top_keys);
            s.pending_bytes = view.pending_bytes;
            crate::http::limits::sync_limits(
                &mut s.limits,
                &view.rule_counters,
                &view.admission_held,
            );
            s.missing_fields.clone_from(&view.missing_fields);
            self.metrics.lag_bytes.set(s.lag_bytes as i64);
            self.metrics.lag_seconds.set(s.lag_seconds);
        });
    }
}

fn entry(name: &str, p: Position) -> CheckpointEntry {
    CheckpointEntry {
        segment: name.to_string(),
        offset: p.offset,
        finished: p.finished,
    }
}

/// A committed checkpoint row as the tailer's `(segment, position)`.
fn segment_position(e: &CheckpointEntry) -> (String, Position) {
    let position = Position {
        offset: e.offset,
        finished: e.finished,
    };
    (e.segment.clone(), position)
}

#[cfg(test)]
mod tests;
