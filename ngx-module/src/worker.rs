//! Per-worker state: the request side of the channel (the "feeder") and the writer thread,
//! started in `init_process` and stopped in `exit_process`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use logtally_spool::encode_event;
use ngx::ffi::{ngx_log_t, NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_NOTICE};

use crate::counters::SharedCounters;
use crate::writer::{self, Level, PendingDrops, WriterConfig, WriterHandle};

/// How long `exit_process` waits for the writer to drain and seal. A write stuck on a
/// stalled disk must not keep an old worker "shutting down" forever.
pub const STOP_LIMIT: Duration = Duration::from_secs(3);

/// What the log-phase handler needs, per worker.
pub struct Feeder {
    tx: Sender<Vec<u8>>,
    pending_drops: PendingDrops,
    counters: &'static SharedCounters,
    /// Reused encoding buffer: the request path encodes here, then sends an exact copy.
    scratch: Vec<u8>,
}

/// Only the worker's main thread touches this (request handlers and the lifecycle hooks);
/// the mutex is never contended and costs an uncontended lock per request.
static FEEDER: Mutex<Option<Feeder>> = Mutex::new(None);
static WRITER: Mutex<Option<WriterHandle>> = Mutex::new(None);

/// Set when `exit_process` gives up on a stuck writer: nginx is about to free the cycle
/// (and its log), so the thread left behind must not log any more.
static LOG_CLOSED: AtomicBool = AtomicBool::new(false);

/// nginx's cycle log, handed to the writer thread for its rare messages.
struct CycleLog(*mut ngx_log_t);

// SAFETY: the cycle log lives as long as the worker; ngx_log_error_core formats on the
// stack and write()s whole lines, which nginx's own thread pool does from threads too.
unsafe impl Send for CycleLog {}

impl CycleLog {
    fn write(&self, level: Level, msg: &str) {
        if LOG_CLOSED.load(Ordering::Acquire) {
            return;
        }
        let level = match level {
            Level::Error => NGX_LOG_ERR,
            Level::Notice => NGX_LOG_NOTICE,
        };
        ngx::ngx_log_error!(level, self.0, "{msg}");
    }
}

/// Encodes one event and hands it to the writer without ever blocking.
///
/// `values` yields one value per header field. Returns silently when this process has no
/// writer (not a worker, or logging is off everywhere).
pub fn submit<'v>(time_ms: u64, values: impl IntoIterator<Item = Option<&'v [u8]>>) {
    let Ok(mut guard) = FEEDER.lock() else { return };
    let Some(f) = guard.as_mut() else { return };
    f.scratch.clear();
    let encoded = encode_event(&mut f.scratch, time_ms, values);
    SharedCounters::add(&f.counters.truncated, u64::from(encoded.truncated));
    match f.tx.try_send(f.scratch.clone()) {
        Ok(()) => {}
        // The writer reports these (counter and drop marker) on its next wake.
        Err(TrySendError::Full(_)) => {
            f.pending_drops.fetch_add(1, Ordering::Relaxed);
        }
        // No writer thread (it could not start): nothing will ever write a marker.
        Err(TrySendError::Disconnected(_)) => SharedCounters::add(&f.counters.dropped, 1),
    }
}

/// Starts this worker's writer thread, writing as `config` says and counting into
/// `counters` (the shared zone).
///
/// # Safety
/// Call from `init_process` on the worker's main thread; `log` must be the cycle's log,
/// alive as long as the worker.
pub unsafe fn start(log: *mut ngx_log_t, counters: &'static SharedCounters, config: WriterConfig) {
    let (tx, rx) = crossbeam_channel::bounded(config.queue);
    let pending_drops = PendingDrops::default();
    let cycle_log = CycleLog(log);
    let handle = with_signals_blocked(|| {
        writer::spawn(
            config,
            rx,
            pending_drops.clone(),
            counters,
            Box::new(move |level, msg| cycle_log.write(level, msg)),
        )
    });
    match handle {
        Ok(h) => {
            if let Ok(mut w) = WRITER.lock() {
                *w = Some(h);
            }
        }
        Err(e) => {
            // Requests are still served; every event counts as dropped.
            ngx::ngx_log_error!(
                NGX_LOG_ALERT,
                log,
                "logtally: cannot start the writer thread: {e}"
            );
        }
    }
    if let Ok(mut f) = FEEDER.lock() {
        *f = Some(Feeder {
            tx,
            pending_drops,
            counters,
            scratch: Vec::with_capacity(1024),
        });
    }
}

/// Stops the writer: closes the channel, lets the thread drain, fsync and seal, and waits
/// for it up to [`STOP_LIMIT`].
///
/// # Safety
/// Call from `exit_process`; `log` must be the cycle's log.
pub unsafe fn stop(log: *mut ngx_log_t) {
    if let Ok(mut f) = FEEDER.lock() {
        f.take();
    }
    let handle = WRITER.lock().ok().and_then(|mut w| w.take());
    if let Some(h) = handle {
        if !h.stop(STOP_LIMIT) {
            LOG_CLOSED.store(true, Ordering::Release);
            ngx::ngx_log_error!(
                NGX_LOG_ALERT,
                log,
                "logtally: the writer did not finish within {}s; its segment stays unsealed",
                STOP_LIMIT.as_secs()
            );
        }
    }
}

/// Runs `f` with every signal blocked in the calling thread, so a thread it spawns starts
/// with all signals blocked and nginx's signal handling stays in the main thread.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain POSIX calls on local, initialised signal sets.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let out = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        out
    }
}
