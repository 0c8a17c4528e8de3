//! The reader thread: owns the [`Tailer`] and the [`Aggregator`], polls the spool, feeds
//! every record to the aggregator, and on request hands over the drained aggregates
//! *together with* the tailer positions at that instant ([`Drained`]), so the positions are
//! exactly "after the records whose aggregates these are". It stops reading while the
//! aggregator holds `max_pending_keys` keys (the spool on disk is the buffer), and deletes
//! finished segments once told their positions are committed.
//!
//! Blocking I/O on a thread of its own; the async side talks to it through
//! [`ReaderHandle`].

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, Notify};
use tracing::{error, warn};

use super::missing_fields::{MissingFieldStatus, MissingFields};
use super::pending_limit::{Growth, PendingLimit};
use super::DaemonError;
use crate::aggregate::{Aggregator, DrainedRows, RuleTop, TopKeys};
use crate::config::Config;
use crate::http::metrics::Metrics;
use crate::http::status::TOP_KEYS_SHOWN;
use crate::spool::tail::{Position, SegmentEvent, SegmentStatus, TailStats, Tailer, TailerOptions};

/// Most bytes of spool one reader poll may consume before it looks at its commands again
/// (fewer as the pending state nears a bound: [`PendingLimit::budget`]).
const POLL_BUDGET: u64 = 4 << 20;
/// How long the reader sleeps when the spool has nothing new.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// How often the status page's top keys are recomputed (a scan of the current bucket).
const TOP_KEYS_REFRESH: Duration = Duration::from_millis(500);

/// Aggregates and the positions right after the records they hold.
#[derive(Debug)]
pub(crate) struct Drained {
    /// Compact until the store binds them: a batch is kept until it commits.
    pub rules: Vec<DrainedRows>,
    pub positions: Vec<(String, Position)>,
    /// Oldest event time (ms) per segment among the drained records.
    pub oldest_ms: HashMap<String, u64>,
}

impl Drained {
    /// Rows the batch holds, all rules together.
    pub fn rows(&self) -> u64 {
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
pub(crate) struct ReaderView {
    pub segments: Vec<SegmentStatus>,
    /// Oldest event time per segment read since the last drain.
    pub oldest_ms: HashMap<String, u64>,
    pub pending_keys: usize,
    pub dropped_events: u64,
    /// Per rule, the current bucket's largest keys (drained plus pending).
    pub top_keys: Vec<RuleTop>,
    /// Approximate memory of the pending aggregates and of the batch being committed.
    pub pending_bytes: u64,
    /// Segments not finished (a writer holds them, or not read to their end yet).
    pub open_segments: usize,
    /// Bytes the reader consumed so far (grows while there is something to read).
    pub bytes_read: u64,
    /// Per rule: the aggregator's cumulative counters (overflow and expired events among them).
    pub rule_counters: Vec<crate::aggregate::RuleCounters>,
    /// Per rule: (buckets, keys) of admitted state held, `None` without `max_keys`.
    pub admission_held: Vec<Option<(usize, usize)>>,
    /// Per (rule, field), the latest segment whose header lacks it.
    pub missing_fields: Vec<MissingFieldStatus>,
}

impl ReaderView {
    /// What changes while the spool grows or is read: bytes read and segment sizes.
    pub fn progress(&self) -> (u64, u64, usize) {
        let sizes = self.segments.iter().map(|s| s.size).sum();
        (self.bytes_read, sizes, self.segments.len())
    }
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
    reported: TailStats,
    reported_bad: Vec<Vec<u64>>,
    torn_discarded: u64,
    stopped: bool,
    top_keys: TopKeys,
    /// When the top keys were last computed (`None`: at the next publish).
    top_keys_at: Option<Instant>,
    missing_fields: MissingFields,
    /// How the previous poll grew the pending state (`None` after a drain).
    growth: Option<Growth>,
    /// (keys, estimated bytes) of the batch drained and not yet committed: the bounds on
    /// pending state count it, so a flush waiting on the database does not let a second
    /// batch as large fill beside it.
    in_flight: (usize, u64),
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
            let (keys, bytes) = self.held();
            let full = PendingLimit::of(&self.config).full(keys, bytes);
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

    /// (keys, estimated bytes) the bounds on pending state apply to: the aggregator's and
    /// the batch being committed.
    fn held(&self) -> (usize, u64) {
        (
            self.aggregator.pending_keys() + self.in_flight.0,
            self.aggregator.pending_bytes() + self.in_flight.1,
        )
    }

    /// One tailer poll into the aggregator. Returns whether more is waiting.
    fn poll(&mut self) -> bool {
        let Reader {
            tailer,
            aggregator,
            oldest_ms,
            torn_discarded,
            missing_fields,
            config,
            metrics,
            growth,
            in_flight,
            ..
        } = self;
        // Read in steps that the bounds on pending state are not passed by much.
        let before = (aggregator.pending_keys(), aggregator.pending_bytes());
        let held = (before.0 + in_flight.0, before.1 + in_flight.1);
        let budget = PendingLimit::of(config).budget(held.0, held.1, *growth, POLL_BUDGET);
        aggregator.set_now(crate::now_ms() as i64);
        let result = tailer.poll(budget, &mut |event| match event {
            SegmentEvent::Record {
                segment, record, ..
            } => {
                let fields = &segment.header.fields;
                let now = crate::now_ms();
                for n in missing_fields.look(config, segment.id, segment.name, fields, now) {
                    warn!(rule = %n.rule, field = %n.field, segment = %n.segment,
                        "segment header lacks a field the rule reads (nginx reloaded without \
                         its logtally_field?): its events read it as absent");
                    metrics.add_missing_field_segment(&n.rule, &n.field);
                }
                aggregator.add_cached(segment.id, fields, &record);
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
        let after = (aggregator.pending_keys(), aggregator.pending_bytes());
        let more = match result {
            Ok(stats) => {
                *growth = Growth::measure(before, after, stats.bytes).or(*growth);
                stats.more
            }
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
        // A segment cut below what was read (a fault outside the writer, logged as an error).
        m.decode_errors
            .inc_by(s.truncated_segments - self.reported.truncated_segments);
        m.segments_open.set(self.tailer.segments_open() as i64);
        m.pending_keys.set(self.held().0 as i64);
        let pending_bytes = self.held().1;
        m.pending_bytes.set(pending_bytes as i64);
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
        let top = match self.top_keys_at {
            Some(at) if at.elapsed() < TOP_KEYS_REFRESH => None,
            _ => {
                self.top_keys_at = Some(Instant::now());
                Some(self.top_keys.view(&self.aggregator, TOP_KEYS_SHOWN))
            }
        };
        m.sync_aggregates(
            &self.config.rules,
            &self.aggregator.rule_counters(),
            self.aggregator.bad_times(),
        );
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.segments = self.tailer.segments();
        view.oldest_ms.clone_from(&self.oldest_ms);
        view.pending_keys = self.aggregator.pending_keys();
        view.dropped_events = s.dropped_events;
        if let Some(top) = top {
            view.top_keys = top;
        }
        view.pending_bytes = pending_bytes;
        view.open_segments = self.tailer.segments_open();
        view.bytes_read = s.bytes;
        view.rule_counters = self.aggregator.rule_counters();
        view.admission_held = self.aggregator.admission_held();
        if view.missing_fields.as_slice() != self.missing_fields.entries() {
            view.missing_fields = self.missing_fields.entries().to_vec();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Drain { last, reply } => {
                self.in_flight = self.held();
                let rules = self.aggregator.drain_compact();
                // Empty state grows fastest (every key is new): no rate from before holds.
                self.growth = None;
                self.top_keys.fold(&rules);
                self.top_keys_at = None;
                let drained = Drained {
                    rules,
                    positions: self.tailer.positions(),
                    oldest_ms: std::mem::take(&mut self.oldest_ms),
                };
                self.stopped |= last;
                self.publish();
                let _ = reply.send(drained);
            }
            Command::Committed { positions, reply } => {
                self.in_flight = (0, 0);
                let removed =
                    self.tailer
                        .remove_finished(&positions, SystemTime::now(), self.config.retain);
                self.missing_fields.forget(&removed);
                self.publish();
                let _ = reply.send(removed);
            }
        }
    }
}

/// Hands the admitted keys loaded at start to the aggregator, grouped by rule.
fn restore_admitted(aggregator: &mut Aggregator, admitted: Vec<(usize, i64, Vec<u64>)>) {
    let mut by_rule: HashMap<usize, Vec<(i64, Vec<u64>)>> = HashMap::new();
    for (rule, bucket, hashes) in admitted {
        by_rule.entry(rule).or_default().push((bucket, hashes));
    }
    for (rule, chunks) in by_rule {
        aggregator.restore_admitted(rule, chunks);
    }
}

/// The async side's handle on the reader thread.
pub(crate) struct ReaderHandle {
    commands: Option<std_mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    view: Arc<Mutex<ReaderView>>,
    /// Notified when the aggregator holds `max_pending_keys` keys: flush now.
    pub full: Arc<Notify>,
}

impl ReaderHandle {
    pub fn start(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        start: HashMap<String, Position>,
        admitted: Vec<(usize, i64, Vec<u64>)>,
    ) -> std::io::Result<ReaderHandle> {
        let (tx, rx) = std_mpsc::channel();
        let view = Arc::new(Mutex::new(ReaderView::default()));
        let full = Arc::new(Notify::new());
        let mut aggregator = Aggregator::with_limits(&config.rules, &config.limits);
        restore_admitted(&mut aggregator, admitted);
        let top_keys = TopKeys::new(&config.rules, |i| {
            !config.hide_keys.contains(&config.rules[i].table)
        });
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
            top_keys,
            top_keys_at: None,
            missing_fields: MissingFields::default(),
            growth: None,
            in_flight: (0, 0),
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

    pub async fn drain(&self, last: bool) -> Result<Drained, DaemonError> {
        self.request(|reply| Command::Drain { last, reply }).await
    }

    pub async fn committed(
        &self,
        positions: Vec<(String, Position)>,
    ) -> Result<Vec<String>, DaemonError> {
        self.request(|reply| Command::Committed { positions, reply })
            .await
    }

    pub fn view(&self) -> ReaderView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the thread and waits for it at most `budget`: a thread stuck in a read of a
    /// hanging disk is left behind (the process ends without it).
    pub async fn stop_within(&mut self, budget: std::time::Duration) {
        self.commands = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        // A plain thread, not spawn_blocking: the runtime's shutdown would wait for that.
        let joiner = std::thread::Builder::new()
            .name("logtally-reader-join".into())
            .spawn(move || {
                let _ = tx.send(thread.join().is_ok());
            });
        if joiner.is_err() {
            error!("cannot wait for the reader thread; exiting without it");
            return;
        }
        match tokio::time::timeout(budget, rx).await {
            Ok(Ok(true)) => {}
            Ok(_) => error!("the reader thread panicked"),
            Err(_) => warn!(
                budget_ms = budget.as_millis() as u64,
                "the reader thread did not stop in time (the spool's disk hangs?); exiting without it"
            ),
        }
    }

    /// Stops the thread (it exits when its command channel closes) and waits for it.
    pub fn stop(&mut self) {
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
