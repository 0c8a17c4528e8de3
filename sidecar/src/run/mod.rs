//! The daemon: tail → aggregate → flush exactly once → binlog → delete finished segments.
//!
//! Three parts:
//! - `reader.rs`: the **reader thread**, which owns the tailer and the aggregator and hands
//!   over drained aggregates together with the positions right after them;
//! - `engine.rs`: the **commit engine**, the exactly-once decisions (what moves in a flush,
//!   what a retry after a lost COMMIT reply does, when checkpoint rows are forgotten, where
//!   a restart resumes), over a small `Database` trait;
//! - this file: [`run`] (admin server + loop), the **async loop** that asks for a drain every
//!   `flush_interval` (or sooner when the reader is full), commits it, retries failures with
//!   capped exponential backoff while new records keep aggregating into the next batch, and
//!   on shutdown makes a final flush in bounded time; and `PgDatabase`, the engine's
//!   database on PostgreSQL;
//! - `retention.rs`: the **retention task** (rules with `retention`), on a connection of its
//!   own beside the flushes.

mod engine;
pub mod missing_fields;
mod pending_limit;
mod reader;
mod retention;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::aggregate::DrainedRows;
use crate::config::Config;
use crate::db::{CheckpointEntry, FlushOutcome, Store, StoreError};
use crate::http::admin::{self, AdminState};
use crate::http::metrics::Metrics;
use crate::http::status::{SharedStatus, Status};
use crate::now_ms;
use engine::{Commit, Database, Engine};
use reader::ReaderHandle;

/// How long shutdown may spend on the final flush.
const FINAL_FLUSH_BUDGET: Duration = Duration::from_secs(15);
/// On shutdown, stop waiting for writers once the spool has not grown for this long while
/// their locks stay held (nginx still running: a plain `systemctl stop logtally`).
const SHUTDOWN_QUIET: Duration = Duration::from_secs(2);
/// How often shutdown looks at the reader's progress while waiting for writers.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// How long shutdown waits for the reader thread to end (it may be stuck on a hanging disk:
/// then the process ends without it).
const READER_STOP_BUDGET: Duration = Duration::from_secs(2);
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
    #[error(transparent)]
    FileSystem(#[from] crate::spool::liveness::FileSystemError),
    #[error(transparent)]
    Node(#[from] crate::spool::node::NodeError),
}

/// The engine's database: PostgreSQL through [`Store`], reconnecting when the connection
/// is gone or was dropped after an error.
struct PgDatabase {
    config: Arc<Config>,
    store: Option<Store>,
}

impl PgDatabase {
    async fn store(&mut self) -> Result<&mut Store, StoreError> {
        self.connect().await?;
        Ok(self.store.as_mut().expect("connected above"))
    }
}

impl Database for PgDatabase {
    async fn connect(&mut self) -> Result<bool, StoreError> {
        if self.store.as_ref().is_some_and(|s| !s.is_closed()) {
            return Ok(false);
        }
        self.store = None;
        self.store = Some(Store::connect(&self.config).await?);
        Ok(true)
    }

    fn disconnect(&mut self) {
        self.store = None;
    }

    async fn load_checkpoint(&mut self) -> Result<Vec<CheckpointEntry>, StoreError> {
        self.store().await?.load_checkpoint().await
    }

    async fn load_admitted(&mut self) -> Result<Vec<(usize, i64, Vec<u64>)>, StoreError> {
        self.store().await?.load_admitted().await
    }

    async fn ping(&mut self) -> Result<(), StoreError> {
        self.store().await?.ping().await
    }

    async fn flush(
        &mut self,
        rules: &[DrainedRows],
        positions: &[CheckpointEntry],
        previous: &HashMap<String, CheckpointEntry>,
    ) -> Result<FlushOutcome, StoreError> {
        self.store().await?.flush(rules, positions, previous).await
    }

    async fn delete_finished(&mut self, segments: &[String]) -> Result<u64, StoreError> {
        self.store().await?.delete_finished(segments).await
    }
}

/// Runs the sidecar until `shutdown` completes: admin server on `listener` (or the
/// configured `listen` address), tail, aggregate, flush. On shutdown it stops reading,
/// makes a final flush (bounded in time) and returns `Ok`.
pub async fn run(
    mut config: Config,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let mut shutdown = std::pin::pin!(shutdown);
    if !prepare_spool(&mut config, &mut shutdown).await? {
        info!("stopped before the spool folder existed");
        return Ok(());
    }
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

    let (retention_stop_tx, retention_stop_rx) = oneshot::channel::<()>();
    let retention_task = tokio::spawn(retention::run(
        config.clone(),
        metrics.clone(),
        status.clone(),
        async move {
            let _ = retention_stop_rx.await;
        },
    ));

    // The spool's size, free space and the lag clock, from a thread outside the reader.
    if let Err(error) =
        crate::spool::usage::start(config.spool_dir.clone(), metrics.clone(), status.clone())
    {
        warn!(%error, "cannot start the spool usage thread; lag counts read events only");
    }
    let result = run_loop(config, metrics, status, shutdown).await;

    let _ = retention_stop_tx.send(());
    let _ = retention_task.await;
    let _ = admin_stop_tx.send(());
    let _ = admin_task.await;
    result
}

/// How often a missing spool folder is looked for at start.
const SPOOL_FOLDER_POLL: Duration = Duration::from_secs(1);

/// Waits for the spool folder (nginx creates it), refuses a network file system, and
/// settles the node id stored there. `Ok(false)`: `shutdown` came first.
async fn prepare_spool(
    config: &mut Config,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<bool, DaemonError> {
    let dir = config.spool_dir.clone();
    let mut logged = false;
    while !dir.is_dir() {
        if !logged {
            warn!(spool = %dir.display(), "spool folder missing; waiting for nginx to create it");
            logged = true;
        }
        tokio::select! {
            () = tokio::time::sleep(SPOOL_FOLDER_POLL) => {}
            () = shutdown.as_mut() => return Ok(false),
        }
    }
    crate::spool::liveness::check_file_system(&dir)?;
    let configured = config.node_configured.then_some(config.node.as_str());
    let node = crate::spool::node::resolve(&dir, configured, crate::config::hostname)?;
    if node.created {
        info!(node = %node.id, file = %dir.join(crate::spool::node::NODE_FILE).display(), "node id stored in the spool folder");
    }
    config.node = node.id;
    Ok(true)
}

/// One commit attempt and, when it committed, what follows: the reader deletes finished
/// segments, the engine forgets their checkpoint rows. `Ok(false)`: retry later.
async fn commit_once<D: Database>(
    engine: &mut Engine<D>,
    reader: &ReaderHandle,
) -> Result<bool, DaemonError> {
    match engine.commit().await? {
        Commit::Done(positions) => {
            let removed = reader.committed(positions).await?;
            engine.forget(removed).await;
            Ok(true)
        }
        Commit::Idle => Ok(true),
        Commit::Retry => Ok(false),
    }
}

async fn run_loop(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let db = PgDatabase {
        config: config.clone(),
        store: None,
    };
    let mut engine = Engine::new(config.clone(), metrics.clone(), status, db);
    info!(node = %config.node, spool = %config.spool_dir.display(), "starting");
    if !engine.start(&mut shutdown).await? {
        info!("stopped before the database was reachable");
        return Ok(());
    }
    let start = engine.resume(|segment| config.spool_dir.join(segment).exists());
    info!(segments = start.len(), "checkpoint loaded");
    let admitted = engine.take_admitted();
    let reader = ReaderHandle::start(config.clone(), metrics.clone(), start, admitted)
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
                    engine.refresh_status(&reader.view());
                    continue;
                }
            }
        }
        let retried = retry_at.take().is_some();
        if !engine.has_pending() {
            match reader.drain(false).await {
                Ok(d) => engine.set_pending(d),
                Err(e) => break Err(e),
            }
        }
        match commit_once(&mut engine, &reader).await {
            Ok(true) => {
                // After an outage the reader may have filled up meanwhile: go again at once.
                let view = reader.view();
                let limit = pending_limit::PendingLimit::of(&config);
                flush_now = retried || limit.full(view.pending_keys, view.pending_bytes);
                tick.reset();
            }
            Ok(false) => {
                retry_at = Some(tokio::time::Instant::now() + engine.retry_delay());
            }
            Err(e) => break Err(e),
        }
        engine.refresh_status(&reader.view());
    };

    let mut reader = reader;
    if result.is_ok() {
        wait_for_writers(&reader, config.shutdown_wait).await;
        final_flush(&mut engine, &reader).await;
    }
    reader.stop_within(READER_STOP_BUDGET).await;
    engine.refresh_status(&reader.view());
    if let Err(e) = &result {
        error!(error = %e, "stopping");
    }
    result
}

/// Shutdown, first step: keep reading until no writer holds a segment (nginx seals its
/// segments when it quits), for at most `bound`, and no longer than [`SHUTDOWN_QUIET`]
/// after the spool last grew (writers alive and idle: their segments stay for next start).
async fn wait_for_writers(reader: &ReaderHandle, bound: Duration) {
    let started = tokio::time::Instant::now();
    let deadline = started + bound;
    let mut last = reader.view().progress();
    let mut last_change = started;
    loop {
        let view = reader.view();
        if view.open_segments == 0 {
            info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "shutting down: every segment finished"
            );
            return;
        }
        let now = tokio::time::Instant::now();
        if view.progress() != last {
            last = view.progress();
            last_change = now;
        }
        if now >= deadline {
            warn!(open_segments = view.open_segments, bound_s = bound.as_secs_f64(), "shutting down: writers still hold segments after shutdown_wait; the rest is read on the next start");
            return;
        }
        if now - last_change >= SHUTDOWN_QUIET {
            info!(open_segments = view.open_segments, "shutting down: writers hold segments but the spool is quiet; the rest is read on the next start");
            return;
        }
        tokio::time::sleep(SHUTDOWN_POLL).await;
    }
}

/// Shutdown: stop reading, commit what is pending and what was read, within a time bound.
/// What does not commit stays in the spool, uncounted, for the next start.
async fn final_flush<D: Database>(engine: &mut Engine<D>, reader: &ReaderHandle) {
    info!("shutting down: final flush");
    let deadline = tokio::time::Instant::now() + FINAL_FLUSH_BUDGET;
    let work = async {
        let mut last_drained = false;
        loop {
            if !engine.has_pending() {
                if last_drained {
                    return Ok::<bool, DaemonError>(true);
                }
                engine.set_pending(reader.drain(true).await?);
                last_drained = true;
            }
            if !commit_once(engine, reader).await? {
                tokio::time::sleep(engine.retry_delay()).await;
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
