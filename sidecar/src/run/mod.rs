//! The run loop: tail → aggregate → flush exactly once → binlog → delete finished segments.
//!
//! Two halves. A **reader thread** owns the [`Tailer`] and the [`Aggregator`]: it polls the
//! spool, feeds every record to the aggregator, and on request hands over the drained
//! aggregates *together with* the tailer positions at that instant, so the positions are
//! exactly "after the records whose aggregates these are". It stops reading while the
//! aggregator holds `max_pending_keys` keys (the spool on disk is the buffer).
//!
//! The **async loop** asks for a drain every `flush_interval` (or sooner when the reader is
//! full), commits the batch in one transaction ([`Store::flush`]), and only then appends the
//! binlog, tells the reader what is committed (so it may delete finished segments) and
//! deletes their checkpoint rows. A batch that fails to commit is kept as it is and retried
//! with capped exponential backoff on a fresh connection; new records keep aggregating
//! meanwhile into the next batch. The store's checkpoint compare-and-swap makes a retry of
//! a batch whose COMMIT did land a no-op, so an unknown commit outcome never counts twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tracing::{debug, error, info, warn};

use crate::aggregate::{Aggregator, DrainedRows};
use crate::binlog::{self, Binlog, BinlogRecord};
use crate::config::Config;
use crate::db::{CheckpointEntry, FlushOutcome, Store, StoreError};
use crate::http::admin::{self, AdminState};
use crate::http::metrics::Metrics;
use crate::http::status::{self, FlushStatus, SharedStatus, Status};
use crate::spool::tail::{Position, SegmentEvent, Tailer, TailerOptions};

/// Bytes of spool one reader poll may consume before it looks at its commands again.
const POLL_BUDGET: u64 = 4 << 20;
/// The poll budget once the aggregator is half way to `max_pending_keys`.
const SMALL_POLL_BUDGET: u64 = 64 << 10;
/// How long the reader sleeps when the spool has nothing new.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Retry backoff after a failed flush or connect: doubles from the first to the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// One flush attempt taking longer than this is abandoned (connection dropped, retried).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown may spend on the final flush.
const FINAL_FLUSH_BUDGET: Duration = Duration::from_secs(15);
/// How often `/status` and the lag gauges are refreshed between flushes.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("spool reader thread: {0}")]
    Reader(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn entry(name: &str, p: Position) -> CheckpointEntry {
    CheckpointEntry {
        segment: name.to_string(),
        offset: p.offset,
        finished: p.finished,
    }
}

/// Aggregates and the positions right after the records they hold.
#[derive(Debug)]
struct Drained {
    /// Compact until the store binds them: a batch is kept until it commits.
    rules: Vec<DrainedRows>,
    positions: Vec<(String, Position)>,
    /// Oldest event time (ms) per segment among the drained records.
    oldest_ms: HashMap<String, u64>,
}

impl Drained {
    fn rows(&self) -> u64 {
        self.rules.iter().map(|r| r.len() as u64).sum()
    }
}

enum Command {
    /// Drain the aggregator; with `last`, read nothing more afterwards.
    Drain {
        last: bool,
        reply: oneshot::Sender<Drained>,
    },
    /// These positions are committed: delete finished segments (after `retain`).
    Committed {
        positions: Vec<(String, Position)>,
        reply: oneshot::Sender<Vec<String>>,
    },
}

/// What the reader shows the async side between drains (for `/status`).
#[derive(Debug, Default, Clone)]
struct ReaderView {
    segments: Vec<crate::spool::tail::SegmentStatus>,
    /// Oldest event time per segment read since the last drain.
    oldest_ms: HashMap<String, u64>,
    pending_keys: usize,
    dropped_events: u64,
}

/// The reader thread's state.
struct Reader {
    tailer: Tailer,
    aggregator: Aggregator,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    view: Arc<Mutex<ReaderView>>,
    full: Arc<Notify>,
    oldest_ms: HashMap<String, u64>,
    reported: crate::spool::tail::TailStats,
    reported_bad: Vec<Vec<u64>>,
    torn_discarded: u64,
    stopped: bool,
}

impl Reader {
    fn run(mut self, commands: std_mpsc::Receiver<Command>) {
        loop {
            // Commands first: a drain must see a consistent aggregator/tailer pair, which it
            // does because polls and drains never interleave on this thread.
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let full = self.aggregator.pending_keys() >= self.config.max_pending_keys;
            let more = if self.stopped || full {
                if full {
                    self.full.notify_one();
                }
                false
            } else {
                self.poll()
            };
            if !more {
                match commands.recv_timeout(IDLE_POLL) {
                    Ok(cmd) => self.handle(cmd),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    /// One tailer poll into the aggregator. Returns whether more is waiting.
    fn poll(&mut self) -> bool {
        let Reader {
            tailer,
            aggregator,
            oldest_ms,
            torn_discarded,
            ..
        } = self;
        // Near the key bound, read in small steps so the bound is not overshot by much.
        let budget = if aggregator.pending_keys() >= self.config.max_pending_keys / 2 {
            SMALL_POLL_BUDGET
        } else {
            POLL_BUDGET
        };
        let result = tailer.poll(budget, &mut |event| match event {
            SegmentEvent::Record {
                segment, record, ..
            } => {
                aggregator.add_cached(segment.id, &segment.header.fields, &record);
                let t = record.time_ms;
                match oldest_ms.get_mut(segment.name) {
                    Some(o) => *o = (*o).min(t),
                    None => {
                        oldest_ms.insert(segment.name.to_string(), t);
                    }
                }
            }
            SegmentEvent::Abandoned { torn_bytes, .. } if torn_bytes > 0 => *torn_discarded += 1,
            _ => {}
        });
        let more = match result {
            Ok(stats) => stats.more,
            Err(error) => {
                warn!(dir = %self.tailer.dir().display(), %error, "cannot read the spool folder");
                false
            }
        };
        self.publish();
        more
    }

    /// Moves counters to the metrics and the view to the async side.
    fn publish(&mut self) {
        let s = self.tailer.stats();
        let m = &self.metrics;
        m.sync_tail(&s);
        // A torn tail left behind by a dead writer is a lost partial record: a decode error.
        m.decode_errors.inc_by(self.torn_discarded);
        m.corrupt_bytes
            .inc_by(s.abandoned_bytes - self.reported.abandoned_bytes);
        m.segments_open.set(self.tailer.segments_open() as i64);
        m.pending_keys.set(self.aggregator.pending_keys() as i64);
        self.reported = s;
        self.torn_discarded = 0;
        let bad = self.aggregator.bad_values();
        for (rule, (now, before)) in self
            .config
            .rules
            .iter()
            .zip(bad.iter().zip(&self.reported_bad))
        {
            for (metric, (n, b)) in rule.metrics.iter().zip(now.iter().zip(before)) {
                if n > b {
                    m.add_bad_values(&rule.table, &metric.column, n - b);
                }
            }
        }
        self.reported_bad = bad;
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.segments = self.tailer.segments();
        view.oldest_ms.clone_from(&self.oldest_ms);
        view.pending_keys = self.aggregator.pending_keys();
        view.dropped_events = s.dropped_events;
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Drain { last, reply } => {
                let drained = Drained {
                    rules: self.aggregator.drain_compact(),
                    positions: self.tailer.positions(),
                    oldest_ms: std::mem::take(&mut self.oldest_ms),
                };
                self.stopped |= last;
                self.publish();
                let _ = reply.send(drained);
            }
            Command::Committed { positions, reply } => {
                let removed =
                    self.tailer
                        .remove_finished(&positions, SystemTime::now(), self.config.retain);
                self.publish();
                let _ = reply.send(removed);
            }
        }
    }
}

/// The async side's handle on the reader thread.
struct ReaderHandle {
    commands: Option<std_mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    view: Arc<Mutex<ReaderView>>,
    full: Arc<Notify>,
}

impl ReaderHandle {
    fn start(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        start: HashMap<String, Position>,
    ) -> std::io::Result<ReaderHandle> {
        let (tx, rx) = std_mpsc::channel();
        let view = Arc::new(Mutex::new(ReaderView::default()));
        let full = Arc::new(Notify::new());
        let aggregator = Aggregator::new(&config.rules);
        let reader = Reader {
            tailer: Tailer::new(config.spool_dir.clone(), start, TailerOptions::default()),
            reported_bad: aggregator.bad_values(),
            aggregator,
            config,
            metrics,
            view: view.clone(),
            full: full.clone(),
            oldest_ms: HashMap::new(),
            reported: Default::default(),
            torn_discarded: 0,
            stopped: false,
        };
        let thread = std::thread::Builder::new()
            .name("logtally-reader".into())
            .spawn(move || reader.run(rx))?;
        Ok(ReaderHandle {
            commands: Some(tx),
            thread: Some(thread),
            view,
            full,
        })
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, DaemonError> {
        let (tx, rx) = oneshot::channel();
        let dead = || DaemonError::Reader("the reader thread stopped".into());
        self.commands
            .as_ref()
            .ok_or_else(dead)?
            .send(make(tx))
            .map_err(|_| dead())?;
        rx.await.map_err(|_| dead())
    }

    async fn drain(&self, last: bool) -> Result<Drained, DaemonError> {
        self.request(|reply| Command::Drain { last, reply }).await
    }

    async fn committed(
        &self,
        positions: Vec<(String, Position)>,
    ) -> Result<Vec<String>, DaemonError> {
        self.request(|reply| Command::Committed { positions, reply })
            .await
    }

    fn view(&self) -> ReaderView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the thread (it exits when its command channel closes) and waits for it.
    fn stop(&mut self) {
        self.commands = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("the reader thread panicked");
            }
        }
    }
}

impl Drop for ReaderHandle {
    fn drop(&mut self) {
        self.stop();
    }
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

/// The async loop's state.
struct Engine {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
    store: Option<Store>,
    /// What the database checkpoint holds for this node (as far as this process knows).
    committed: HashMap<String, CheckpointEntry>,
    /// Drained but not committed: retried as is until it commits.
    pending: Option<Drained>,
    /// Checkpoint rows of finished segments whose files are gone, still to delete.
    to_forget: Vec<String>,
    binlog: Option<Binlog>,
    seq: u64,
    backoff: Backoff,
}

impl Engine {
    /// Connects, creating tables; `Err` only for errors that waiting cannot fix.
    async fn ensure_store(&mut self) -> Result<(), StoreError> {
        if self.store.as_ref().is_some_and(|s| !s.is_closed()) {
            return Ok(());
        }
        self.store = None;
        let store = Store::connect(&self.config).await?;
        self.status.update(|s| s.record_database(now_ms(), Ok(())));
        self.metrics.database_up.set(1);
        self.store = Some(store);
        Ok(())
    }

    fn database_failed(&mut self, err: &StoreError) {
        self.store = None;
        self.metrics.database_errors.inc();
        self.metrics.database_up.set(0);
        self.status
            .update(|s| s.record_database(now_ms(), Err(err.to_string())));
    }

    /// Connects and loads the checkpoint, retrying transient failures until `stop` fires.
    async fn start(
        &mut self,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<bool, StoreError> {
        loop {
            let attempt = async {
                self.ensure_store().await?;
                self.store
                    .as_ref()
                    .expect("connected")
                    .load_checkpoint()
                    .await
            };
            match attempt.await {
                Ok(entries) => {
                    self.committed = entries
                        .into_iter()
                        .map(|e| (e.segment.clone(), e))
                        .collect();
                    self.backoff.reset();
                    return Ok(true);
                }
                Err(e) if e.is_transient() => {
                    self.database_failed(&e);
                    let wait = self.backoff.step();
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "database unavailable at start");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = &mut *stop => return Ok(false),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Commits the pending batch once. `Ok(true)` committed (or found committed), `Ok(false)`
    /// a transient failure (retry later), `Err` a failure that retrying cannot fix.
    async fn try_commit(&mut self, reader: &ReaderHandle) -> Result<bool, DaemonError> {
        let Some(batch) = self.pending.take() else {
            return Ok(true);
        };
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
        let changed_empty = changed.is_empty();
        let started = Instant::now();
        let result = match self.ensure_store().await {
            Err(e) => Err(e),
            Ok(()) => {
                let store = self.store.as_mut().expect("connected");
                if changed.is_empty() && rows == 0 {
                    // Nothing new: still prove the database answers (readiness counts on it).
                    store.ping().await.map(|()| FlushOutcome::Committed)
                } else {
                    let flush = store.flush(&batch.rules, &changed, &self.committed);
                    match tokio::time::timeout(FLUSH_TIMEOUT, flush).await {
                        Ok(r) => r,
                        Err(_) => Err(StoreError::Timeout(FLUSH_TIMEOUT)),
                    }
                }
            }
        };
        let elapsed = started.elapsed();
        self.metrics.flush_duration.observe(elapsed.as_secs_f64());
        let at_ms = now_ms();
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
                self.status.update(|s| {
                    s.record_flush(FlushStatus {
                        at_ms,
                        duration_seconds: elapsed.as_secs_f64(),
                        rows,
                        outcome: status::FlushOutcome::Ok,
                        error: None,
                    })
                });
                debug!(
                    rows,
                    segments = changed.len(),
                    ms = elapsed.as_millis() as u64,
                    "flush committed"
                );
                for c in changed {
                    self.committed.insert(c.segment.clone(), c);
                }
                let wrote = rows > 0 || !changed_empty;
                self.after_commit(reader, batch, at_ms, wrote).await?;
                self.backoff.reset();
                Ok(true)
            }
            Err(e) if e.is_transient() => {
                self.metrics.flushes_error.inc();
                self.database_failed(&e);
                self.status.update(|s| {
                    s.record_flush(FlushStatus {
                        at_ms,
                        duration_seconds: elapsed.as_secs_f64(),
                        rows: 0,
                        outcome: status::FlushOutcome::Error,
                        error: Some(e.to_string()),
                    })
                });
                warn!(error = %e, rows, "flush failed; the batch is kept and retried");
                self.pending = Some(batch);
                Ok(false)
            }
            Err(e) => {
                self.metrics.flushes_error.inc();
                self.database_failed(&e);
                self.pending = Some(batch);
                Err(e.into())
            }
        }
    }

    /// After a commit: binlog (when the checkpoint moved), let the reader delete finished
    /// segments, forget their checkpoint rows.
    async fn after_commit(
        &mut self,
        reader: &ReaderHandle,
        batch: Drained,
        at_ms: u64,
        wrote: bool,
    ) -> Result<(), DaemonError> {
        let mut all: Vec<CheckpointEntry> = self.committed.values().cloned().collect();
        all.sort_by(|a, b| a.segment.cmp(&b.segment));
        if wrote {
            self.seq += 1;
            let record = BinlogRecord::new(self.seq, at_ms, &self.config.node, batch.rows(), &all);
            self.append_binlog(&record);
        }

        let committed: Vec<(String, Position)> = all.iter().map(segment_position).collect();
        let removed = reader.committed(committed).await?;
        self.to_forget.extend(removed);
        if !self.to_forget.is_empty() {
            if let Some(store) = self.store.as_ref() {
                match store.delete_finished(&self.to_forget).await {
                    Ok(_) => {
                        for name in self.to_forget.drain(..) {
                            self.committed.remove(&name);
                        }
                    }
                    // Harmless to leave for later: a finished row of a gone file is inert.
                    Err(error) => {
                        warn!(%error, "cannot delete checkpoint rows of deleted segments")
                    }
                }
            }
        }
        Ok(())
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

    /// Refreshes `/status` segments and the lag gauges.
    fn refresh_status(&self, reader: &ReaderHandle) {
        let view = reader.view();
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
            self.metrics.lag_bytes.set(s.lag_bytes as i64);
            self.metrics.lag_seconds.set(s.lag_seconds);
        });
    }
}

/// Runs the sidecar until `shutdown` completes: admin server on `listener` (or the
/// configured `listen` address), tail, aggregate, flush. On shutdown it stops reading,
/// makes a final flush (bounded in time) and returns `Ok`.
pub async fn run(
    config: Config,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new()?);
    metrics.init_rules(&config.rules);
    let status = SharedStatus::new(Status::from_config(&config, now_ms()));
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(config.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: config.listen,
                source,
            })?,
    };
    let (admin_stop_tx, admin_stop_rx) = oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin::serve(
        listener,
        AdminState {
            metrics: metrics.clone(),
            status: status.clone(),
        },
        async move {
            let _ = admin_stop_rx.await;
        },
    ));

    let result = run_loop(config, metrics, status, shutdown).await;

    let _ = admin_stop_tx.send(());
    let _ = admin_task.await;
    result
}

async fn run_loop(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut engine = Engine {
        config: config.clone(),
        metrics: metrics.clone(),
        status,
        store: None,
        committed: HashMap::new(),
        pending: None,
        to_forget: Vec::new(),
        binlog: None,
        seq: 0,
        backoff: Backoff::new(),
    };
    info!(node = %config.node, spool = %config.spool_dir.display(), "starting");
    if !engine.start(&mut shutdown).await? {
        info!("stopped before the database was reachable");
        return Ok(());
    }
    // The database checkpoint is the truth: resume every segment where it says.
    let start: HashMap<String, Position> =
        engine.committed.values().map(segment_position).collect();
    // Finished segments whose files are gone will never be read again.
    engine.to_forget = engine
        .committed
        .values()
        .filter(|e| e.finished && !config.spool_dir.join(&e.segment).exists())
        .map(|e| e.segment.clone())
        .collect();
    info!(segments = start.len(), "checkpoint loaded");
    let reader = ReaderHandle::start(config.clone(), metrics.clone(), start)
        .map_err(|e| DaemonError::Reader(e.to_string()))?;

    let mut tick = tokio::time::interval(config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset(); // the first flush after one interval, not at once
    let mut refresh = tokio::time::interval(STATUS_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When set, a failed batch waits until then before its retry.
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut flush_now = false;

    let result = loop {
        if flush_now {
            flush_now = false;
        } else {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                _ = tick.tick(), if retry_at.is_none() => {}
                () = reader.full.notified(), if retry_at.is_none() => {}
                () = retry => {}
                _ = refresh.tick() => {
                    engine.refresh_status(&reader);
                    continue;
                }
            }
        }
        let retried = retry_at.take().is_some();
        if engine.pending.is_none() {
            match reader.drain(false).await {
                Ok(d) => engine.pending = Some(d),
                Err(e) => break Err(e),
            }
        }
        match engine.try_commit(&reader).await {
            Ok(true) => {
                // After an outage the reader may have filled up meanwhile: go again at once.
                flush_now = retried || reader.view().pending_keys >= config.max_pending_keys;
                tick.reset();
            }
            Ok(false) => {
                retry_at = Some(tokio::time::Instant::now() + engine.backoff.step());
            }
            Err(e) => break Err(e),
        }
        engine.refresh_status(&reader);
    };

    let mut reader = reader;
    if result.is_ok() {
        final_flush(&mut engine, &reader).await;
    }
    reader.stop();
    engine.refresh_status(&reader);
    if let Err(e) = &result {
        error!(error = %e, "stopping");
    }
    result
}

/// Shutdown: stop reading, commit what is pending and what was read, within a time bound.
/// What does not commit stays in the spool, uncounted, for the next start.
async fn final_flush(engine: &mut Engine, reader: &ReaderHandle) {
    info!("shutting down: final flush");
    let deadline = tokio::time::Instant::now() + FINAL_FLUSH_BUDGET;
    let work = async {
        let mut last_drained = false;
        loop {
            if engine.pending.is_none() {
                if last_drained {
                    return Ok::<bool, DaemonError>(true);
                }
                engine.pending = Some(reader.drain(true).await?);
                last_drained = true;
            }
            if !engine.try_commit(reader).await? {
                tokio::time::sleep(engine.backoff.step()).await;
            }
        }
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok(_)) => info!("final flush committed"),
        Ok(Err(error)) => {
            error!(%error, "final flush failed; the spool keeps the uncommitted events")
        }
        Err(_) => warn!(
            budget_s = FINAL_FLUSH_BUDGET.as_secs(),
            "final flush did not commit in time; the spool keeps the uncommitted events"
        ),
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
mod tests {
    use super::*;

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
}
