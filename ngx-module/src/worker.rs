//! Per-worker state: the request side of the queue (the "feeder") and the writer thread,
//! started in `init_process` and stopped in `exit_process`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use logtally_spool::encode_event;
use ngx::ffi::{ngx_log_t, NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_NOTICE};

use crate::counters::SharedCounters;
use crate::queue::EventQueue;
use crate::writer::{self, Level, WriterConfig, WriterHandle};

/// What the log-phase handler needs, per worker.
pub struct Feeder {
    /// `None` when the writer thread could not start: every event is then a drop.
    queue: Option<Arc<EventQueue>>,
    counters: &'static SharedCounters,
}

thread_local! {
    /// Set on the worker's main thread, the one thread that runs request handlers and the
    /// lifecycle hooks: no lock on the request path (the queue has its own).
    static FEEDER: RefCell<Option<Feeder>> = const { RefCell::new(None) };
}
/// The writer thread, and how long `exit_process` waits for it to drain and seal
/// (`stop_timeout=`): a write stuck on a stalled disk must not keep an old worker "shutting
/// down" forever.
static WRITER: Mutex<Option<(WriterHandle, Duration)>> = Mutex::new(None);

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

/// Encodes one event into the worker's queue, never waiting for the disk.
///
/// `values` yields one value per header field. Returns silently when this process has no
/// writer (not a worker, or logging is off everywhere).
pub fn submit<'v>(time_ms: u64, values: impl IntoIterator<Item = Option<&'v [u8]>>) {
    FEEDER.with_borrow(|feeder| {
        let Some(f) = feeder else { return };
        let Some(queue) = &f.queue else {
            // No writer thread: nothing will ever write a marker for it.
            SharedCounters::add(&f.counters.dropped, 1);
            return;
        };
        // A full queue counts the drop itself; the writer reports it (counter, marker).
        if let Some(encoded) = queue.push(|out| encode_event(out, time_ms, values)) {
            SharedCounters::add(&f.counters.truncated, u64::from(encoded.truncated));
        }
    });
}

/// Starts this worker's writer thread, writing as `config` says and counting into
/// `counters` (the shared zone).
///
/// # Safety
/// Call from `init_process` on the worker's main thread; `log` must be the cycle's log,
/// alive as long as the worker.
pub unsafe fn start(log: *mut ngx_log_t, counters: &'static SharedCounters, config: WriterConfig) {
    let queue = Arc::new(EventQueue::new(config.queue));
    let stop_timeout = config.stop_timeout;
    let cycle_log = CycleLog(log);
    let handle = with_signals_blocked(|| {
        writer::spawn(
            config,
            queue.clone(),
            counters,
            Box::new(move |level, msg| cycle_log.write(level, msg)),
        )
    });
    let queue = match handle {
        Ok(h) => {
            if let Ok(mut w) = WRITER.lock() {
                *w = Some((h, stop_timeout));
            }
            Some(queue)
        }
        Err(e) => {
            // Requests are still served; every event counts as dropped.
            ngx::ngx_log_error!(
                NGX_LOG_ALERT,
                log,
                "logtally: cannot start the writer thread: {e}"
            );
            None
        }
    };
    FEEDER.set(Some(Feeder { queue, counters }));
}

/// Stops the writer: no more events are queued, the thread drains, fsyncs and seals, and
/// this waits for it up to the spool's `stop_timeout`.
///
/// # Safety
/// Call from `exit_process`; `log` must be the cycle's log.
pub unsafe fn stop(log: *mut ngx_log_t) {
    FEEDER.take();
    let handle = WRITER.lock().ok().and_then(|mut w| w.take());
    if let Some((h, limit)) = handle {
        if !h.stop(limit) {
            LOG_CLOSED.store(true, Ordering::Release);
            ngx::ngx_log_error!(
                NGX_LOG_ALERT,
                log,
                "logtally: the writer did not finish within stop_timeout={}ms; its segment \
                 stays unsealed (the sidecar reads it once the worker is gone)",
                limit.as_millis()
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
