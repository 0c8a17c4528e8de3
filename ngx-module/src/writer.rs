//! The per-worker writer thread: takes encoded frames off the bounded channel, appends them
//! to the spool in batches through `logtally_spool::SegmentWriter`, writes drop markers,
//! fsyncs on its interval, and drains, seals and stops on request.
//!
//! Plain Rust (std, crossbeam, spool): it knows nothing of nginx, so it is unit-tested
//! without one. The nginx side hands it a logging callback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use logtally_spool::{encode_drop_marker, SegmentWriter, SegmentWriterConfig};

use crate::counters::SharedCounters;

/// A batch grows to at most this many bytes before it is written, even within one wake,
/// so a deep queue never turns into one huge allocation.
const MAX_BATCH: usize = 8 << 20;

/// How the writer writes.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub segments: SegmentWriterConfig,
    /// Sleep between batches.
    pub flush: Duration,
    /// fdatasync interval of the open segment; `None` never syncs on a timer.
    pub fsync_every: Option<Duration>,
    /// Capacity of the channel from the request path, in records.
    pub queue: usize,
}

/// Severity of a message the writer reports through its logging callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Notice,
}

/// Where the writer reports trouble (nginx's error log in the module).
pub type LogFn = Box<dyn Fn(Level, &str) + Send>;

/// The request side's view of pending drops: events the full queue refused, not yet
/// reported by the writer.
pub type PendingDrops = Arc<AtomicU64>;

/// A running writer thread.
#[derive(Debug)]
pub struct WriterHandle {
    stop_tx: Sender<()>,
    done_rx: Receiver<()>,
    join: JoinHandle<()>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts the writer thread. The caller keeps the channel's sender and the pending-drops
/// counter; dropping the sender and calling [`WriterHandle::stop`] ends the thread.
pub fn spawn(
    config: WriterConfig,
    rx: Receiver<Vec<u8>>,
    pending_drops: PendingDrops,
    counters: &'static SharedCounters,
    log: LogFn,
) -> std::io::Result<WriterHandle> {
    let segments = SegmentWriter::new(config.segments.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let join = std::thread::Builder::new()
        .name("logtally-writer".into())
        .spawn(move || {
            let mut w = Writer {
                config,
                segments,
                rx,
                pending_drops,
                counters,
                log,
                batch: Vec::with_capacity(64 << 10),
                carried_drops: 0,
                failing: false,
                last_sync: Instant::now(),
            };
            w.run(&stop_rx);
            let _ = done_tx.send(());
        })?;
    Ok(WriterHandle {
        stop_tx,
        done_rx,
        join,
    })
}

impl WriterHandle {
    /// Asks the thread to drain, seal and exit, and waits up to `limit` for it. Returns
    /// false if it did not finish in time (a write stuck on a stalled disk): the thread is
    /// then left behind so the nginx worker can still exit.
    pub fn stop(self, limit: Duration) -> bool {
        let _ = self.stop_tx.send(());
        match self.done_rx.recv_timeout(limit) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = self.join.join();
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
        }
    }
}

struct Writer {
    config: WriterConfig,
    segments: SegmentWriter,
    rx: Receiver<Vec<u8>>,
    pending_drops: PendingDrops,
    counters: &'static SharedCounters,
    log: LogFn,
    batch: Vec<u8>,
    /// Dropped events not yet recorded in the spool by a marker (the marker's write failed).
    carried_drops: u64,
    /// Whether the last write failed: errors are logged once per failure streak.
    failing: bool,
    last_sync: Instant,
}

impl Writer {
    fn run(&mut self, stop_rx: &Receiver<()>) {
        loop {
            // Sleeping rather than blocking on the data channel: a writer woken by every
            // send costs the request path a context switch per event.
            let stopping = !matches!(
                stop_rx.recv_timeout(self.config.flush),
                Err(RecvTimeoutError::Timeout)
            );
            self.drain();
            if stopping {
                // The senders are gone by now; take whatever arrived meanwhile.
                self.drain();
                self.seal();
                return;
            }
            self.sync_if_due();
        }
    }

    /// Takes everything queued and writes it, one batch per `MAX_BATCH` bytes.
    fn drain(&mut self) {
        let mut events = 0u64;
        while let Ok(frame) = self.rx.try_recv() {
            self.batch.extend_from_slice(&frame);
            events += 1;
            if self.batch.len() >= MAX_BATCH {
                self.write(events);
                events = 0;
            }
        }
        self.write(events);
    }

    /// Writes the batch plus a drop marker for any drops not yet in the spool.
    fn write(&mut self, events: u64) {
        let now = now_ms();
        let new_drops = self.pending_drops.swap(0, Ordering::Relaxed);
        SharedCounters::add(&self.counters.dropped, new_drops);
        let marker = self.carried_drops + new_drops;
        if marker > 0 {
            encode_drop_marker(&mut self.batch, now, marker);
        }
        if self.batch.is_empty() {
            return;
        }
        match self.segments.append(&self.batch, events, marker, now) {
            Ok(sealed) => {
                self.carried_drops = 0;
                SharedCounters::add(&self.counters.events, events);
                SharedCounters::add(&self.counters.bytes, self.batch.len() as u64);
                if sealed.is_some() {
                    // Sealing synced the segment (when fsync is on); the new one starts fresh.
                    SharedCounters::add(&self.counters.segments, 1);
                    self.last_sync = Instant::now();
                }
                if std::mem::replace(&mut self.failing, false) {
                    (self.log)(Level::Notice, "logtally: spool writes work again");
                }
            }
            Err(e) => {
                // The spool did not take the batch: its events are lost; the next marker
                // that does get written says how many.
                self.carried_drops = marker + events;
                SharedCounters::add(&self.counters.dropped, events);
                SharedCounters::add(&self.counters.write_errors, 1);
                if !std::mem::replace(&mut self.failing, true) {
                    let msg = format!(
                        "logtally: writing to spool \"{}\" failed, dropping events until it works again: {e}",
                        self.config.segments.dir.display()
                    );
                    (self.log)(Level::Error, &msg);
                }
            }
        }
        self.batch.clear();
    }

    fn sync_if_due(&mut self) {
        let Some(every) = self.config.fsync_every else {
            return;
        };
        if self.last_sync.elapsed() < every {
            return;
        }
        self.last_sync = Instant::now();
        if let Err(e) = self.segments.sync() {
            let msg = format!("logtally: fdatasync of spool segment failed: {e}");
            (self.log)(Level::Error, &msg);
        }
    }

    fn seal(&mut self) {
        match self.segments.seal(now_ms()) {
            Ok(Some(_)) => SharedCounters::add(&self.counters.segments, 1),
            Ok(None) => {}
            Err(e) => {
                let msg = format!("logtally: sealing spool segment failed: {e}");
                (self.log)(Level::Error, &msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logtally_spool::{decode_header, Frame, ScanItem, SegmentScan};
    use std::path::Path;

    fn config(dir: &Path, segment_size: u64) -> WriterConfig {
        WriterConfig {
            segments: SegmentWriterConfig {
                dir: dir.to_path_buf(),
                fields: vec!["a".into()],
                segment_size,
                pid: 77,
                fsync: false,
            },
            flush: Duration::from_millis(5),
            fsync_every: None,
            queue: 1000,
        }
    }

    fn frames_in(dir: &Path) -> (Vec<Vec<u8>>, u64, usize) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let (mut values, mut dropped, mut seals) = (Vec::new(), 0, 0);
        for path in &names {
            let bytes = std::fs::read(path).unwrap();
            let (_, hlen) = decode_header(&bytes).unwrap().unwrap();
            let mut scan = SegmentScan::new(&bytes[hlen..]);
            for item in scan.by_ref() {
                match item {
                    ScanItem::Frame {
                        frame: Frame::Event(r),
                        ..
                    } => values.push(r.values().next().unwrap().unwrap().to_vec()),
                    ScanItem::Frame {
                        frame: Frame::Dropped { count, .. },
                        ..
                    } => dropped += count,
                    ScanItem::Frame {
                        frame: Frame::Seal { .. },
                        ..
                    } => seals += 1,
                    ScanItem::Corrupt { .. } => panic!("corrupt frame in {path:?}"),
                }
            }
            assert_eq!(scan.remaining(), 0, "torn tail in {path:?}");
        }
        (values, dropped, seals)
    }

    fn leak_counters() -> &'static SharedCounters {
        Box::leak(Box::default())
    }

    #[test]
    fn writes_everything_sent_then_seals_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1000);
        let drops = PendingDrops::default();
        let counters = leak_counters();
        let h = spawn(
            config(dir.path(), 4096),
            rx,
            drops.clone(),
            counters,
            Box::new(|_, _| {}),
        )
        .unwrap();
        let mut buf = Vec::new();
        for i in 0..500u32 {
            buf.clear();
            logtally_spool::encode_event(&mut buf, 1, [Some(i.to_string().as_bytes())]);
            tx.send(buf.clone()).unwrap();
            if i == 249 {
                // Let the first half go out as its own batch (> 4 KiB: the segment rolls).
                let deadline = Instant::now() + Duration::from_secs(5);
                while counters.snapshot().events < 250 {
                    assert!(Instant::now() < deadline, "writer never wrote");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        drops.fetch_add(3, Ordering::Relaxed);
        drop(tx);
        assert!(h.stop(Duration::from_secs(5)));
        let (values, dropped, seals) = frames_in(dir.path());
        let want: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_string().into_bytes()).collect();
        assert_eq!(values, want);
        assert_eq!(dropped, 3);
        let c = counters.snapshot();
        assert_eq!((c.events, c.dropped), (500, 3));
        assert!(seals >= 2, "4 KiB segments must have rolled");
        assert_eq!(c.segments, seals as u64);
    }

    #[test]
    fn failed_writes_count_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let (tx, rx) = crossbeam_channel::bounded(10);
        let counters = leak_counters();
        let logged = Arc::new(AtomicU64::new(0));
        let l = logged.clone();
        let h = spawn(
            config(&missing, 1 << 20),
            rx,
            PendingDrops::default(),
            counters,
            Box::new(move |_, _| {
                l.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
        let mut buf = Vec::new();
        logtally_spool::encode_event(&mut buf, 1, [Some(&b"x"[..])]);
        for _ in 0..4 {
            tx.send(buf.clone()).unwrap();
        }
        drop(tx);
        assert!(h.stop(Duration::from_secs(5)));
        let c = counters.snapshot();
        assert_eq!((c.events, c.dropped), (0, 4));
        assert!(c.write_errors >= 1);
        assert_eq!(
            logged.load(Ordering::Relaxed),
            1,
            "one message per failure streak"
        );
    }
}
