//! The per-worker writer thread: every `flush` interval it takes the queue's active buffer
//! ([`EventQueue::take`]), appends it to the spool through `logtally_spool::SegmentWriter`
//! (with a drop marker for the events the queue refused), fsyncs on its interval, and
//! drains, seals and stops on request.
//!
//! Plain Rust (std, crossbeam, spool): it knows nothing of nginx, so it is unit-tested
//! without one. The nginx side hands it a logging callback.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use logtally_spool::{encode_drop_marker, SegmentWriter, SegmentWriterConfig};

use crate::counters::SharedCounters;
use crate::queue::{Batch, Bound, EventQueue};

/// How the writer writes.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub segments: SegmentWriterConfig,
    /// Sleep between batches.
    pub flush: Duration,
    /// fdatasync interval of the open segment; `None` never syncs on a timer.
    pub fsync_every: Option<Duration>,
    /// What the worker's queue may hold (both of its buffers).
    pub queue: Bound,
    /// How long a stopping worker waits for the writer ([`WriterHandle::stop`]).
    pub stop_timeout: Duration,
}

/// Severity of a message the writer reports through its logging callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Notice,
}

/// Where the writer reports trouble (nginx's error log in the module).
pub type LogFn = Box<dyn Fn(Level, &str) + Send>;

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

/// Starts the writer thread, writing what the request path pushes into `queue`;
/// [`WriterHandle::stop`] ends it (once nothing pushes any more).
pub fn spawn(
    config: WriterConfig,
    queue: Arc<EventQueue>,
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
                queue,
                counters,
                log,
                batch: Batch::new(),
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
    queue: Arc<EventQueue>,
    counters: &'static SharedCounters,
    log: LogFn,
    /// The buffer the writer holds: empty between wakes, swapped with the queue's active
    /// one at each.
    batch: Batch,
    /// Dropped events not yet recorded in the spool by a marker (the marker's write failed).
    carried_drops: u64,
    /// Whether the last write failed: errors are logged once per failure streak.
    failing: bool,
    last_sync: Instant,
}

impl Writer {
    fn run(&mut self, stop_rx: &Receiver<()>) {
        loop {
            // Sleeping rather than waiting for events: a writer woken by every event costs
            // the request path a context switch per event.
            let stopping = !matches!(
                stop_rx.recv_timeout(self.config.flush),
                Err(RecvTimeoutError::Timeout)
            );
            self.drain();
            if stopping {
                // Nothing pushes any more: the worker is in exit_process.
                self.seal();
                return;
            }
            self.sync_if_due();
        }
    }

    /// Takes what the queue holds and writes it.
    fn drain(&mut self) {
        self.queue.take(&mut self.batch);
        self.write();
        self.batch.clear();
        self.queue.written();
    }

    /// Writes the batch, in pieces of about `MAX_WRITE` bytes, plus a drop marker for any
    /// drops not yet in the spool. After a failed piece the rest of the batch is dropped:
    /// the next marker that does get written says how many.
    fn write(&mut self) {
        let now = now_ms();
        SharedCounters::add(&self.counters.dropped, self.batch.dropped);
        let marker = self.carried_drops + self.batch.dropped;
        if marker > 0 {
            // At the very end: in the last piece, after every event of the batch.
            encode_drop_marker(&mut self.batch.frames, now, marker);
        }
        if self.batch.frames.is_empty() {
            return;
        }
        let mut lost = 0u64;
        // Whether the marker reached the spool (it is the batch's last frame).
        let mut marker_written = marker == 0;
        let mut error = None;
        let mut pieces = self.batch.pieces().peekable();
        while let Some((piece, events)) = pieces.next() {
            let piece_marker = if pieces.peek().is_none() { marker } else { 0 };
            if error.is_some() {
                lost += events;
                continue;
            }
            if piece.is_empty() {
                continue;
            }
            match self.segments.append(piece, events, piece_marker, now) {
                Ok(sealed) => {
                    SharedCounters::add(&self.counters.events, events);
                    SharedCounters::add(&self.counters.bytes, piece.len() as u64);
                    marker_written |= piece_marker > 0;
                    if sealed.is_some() {
                        // Sealing synced the segment (when fsync is on); the new one starts
                        // fresh.
                        SharedCounters::add(&self.counters.segments, 1);
                        self.last_sync = Instant::now();
                    }
                }
                Err(e) => {
                    // The segment was abandoned, not cut: its whole frames stay readable.
                    SharedCounters::add(&self.counters.events, e.written.events);
                    lost += events - e.written.events.min(events);
                    marker_written |= piece_marker > 0 && e.written.dropped == piece_marker;
                    error = Some(e);
                }
            }
        }
        drop(pieces);
        self.note_unlinked();
        let Some(e) = error else {
            self.carried_drops = 0;
            if std::mem::replace(&mut self.failing, false) {
                (self.log)(Level::Notice, "logtally: spool writes work again");
            }
            return;
        };
        // What the spool did not take is lost; the next marker that is written says so.
        self.carried_drops = lost + if marker_written { 0 } else { marker };
        SharedCounters::add(&self.counters.dropped, lost);
        SharedCounters::add(&self.counters.write_errors, 1);
        if !std::mem::replace(&mut self.failing, true) {
            let msg = format!(
                "logtally: writing to spool \"{}\" failed, dropping events until it works again: {e}",
                self.config.segments.dir.display()
            );
            (self.log)(Level::Error, &msg);
        }
    }

    /// Counts and reports open segments that were deleted by hand (the segment writer let
    /// each go and writes a new one).
    fn note_unlinked(&mut self) {
        if let Some(u) = self.segments.take_unlinked() {
            SharedCounters::add(&self.counters.unlinked_segments, u.count);
            let msg = format!(
                "logtally: spool segment \"{}\" was deleted while open ({} so far); its events are lost, writing a new segment",
                u.last.display(),
                self.counters.unlinked_segments.load(std::sync::atomic::Ordering::Relaxed)
            );
            (self.log)(Level::Error, &msg);
        }
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
        self.note_unlinked();
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
    use logtally_spool::{decode_header, SegmentItem, SegmentReader};
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
            queue: Bound::Records(1000),
            stop_timeout: Duration::from_secs(3),
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
            for item in SegmentReader::new(&bytes[hlen..], hlen as u64) {
                match item {
                    SegmentItem::Event { record, .. } => {
                        values.push(record.values().next().unwrap().unwrap().to_vec())
                    }
                    SegmentItem::Dropped { count, .. } => dropped += count,
                    SegmentItem::Seal { .. } => seals += 1,
                    SegmentItem::Corrupt { offset, .. } => {
                        panic!("corrupt frame at {offset} in {path:?}")
                    }
                    SegmentItem::Torn { offset, .. } => panic!("torn tail at {offset} in {path:?}"),
                }
            }
        }
        (values, dropped, seals)
    }

    fn leak_counters() -> &'static SharedCounters {
        Box::leak(Box::default())
    }

    fn push(q: &EventQueue, value: &[u8]) -> bool {
        q.push(|out| logtally_spool::encode_event(out, 1, [Some(value)]))
            .is_some()
    }

    #[test]
    fn writes_everything_queued_and_every_drop_then_seals_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(EventQueue::new(Bound::Bytes(1 << 20)));
        let counters = leak_counters();
        let h = spawn(
            config(dir.path(), 4096),
            queue.clone(),
            counters,
            Box::new(|_, _| {}),
        )
        .unwrap();
        for i in 0..500u32 {
            assert!(push(&queue, i.to_string().as_bytes()));
            if i == 249 {
                // Let the first half go out as its own batch (> 4 KiB: the segment rolls).
                let deadline = Instant::now() + Duration::from_secs(5);
                while counters.snapshot().events < 250 {
                    assert!(Instant::now() < deadline, "writer never wrote");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // Values bigger than the whole bound (1 MiB): always refused, and counted.
        let huge = vec![b'h'; 4096];
        let too_big = vec![Some(huge.as_slice()); 64 * 4 + 1];
        for _ in 0..3 {
            let pushed = queue.push(|out| {
                for chunk in too_big.chunks(64) {
                    logtally_spool::encode_event(out, 1, chunk.iter().copied());
                }
            });
            assert!(pushed.is_none());
        }
        assert!(h.stop(Duration::from_secs(5)));
        let (values, dropped, seals) = frames_in(dir.path());
        let want: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_string().into_bytes()).collect();
        assert_eq!(values, want);
        assert_eq!(dropped, 3);
        let c = counters.snapshot();
        assert_eq!((c.events, c.dropped), (500, 3));
        assert!(seals >= 2, "4 KiB segments must have rolled");
        assert_eq!(c.segments, seals as u64);
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            c.bytes > 0 && c.bytes < on_disk,
            "headers and seals are not counted"
        );
    }

    #[test]
    fn failed_writes_count_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let queue = Arc::new(EventQueue::new(Bound::Records(10)));
        let counters = leak_counters();
        let logged = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let l = logged.clone();
        let h = spawn(
            config(&missing, 1 << 20),
            queue.clone(),
            counters,
            Box::new(move |_, _| {
                l.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        )
        .unwrap();
        for _ in 0..4 {
            assert!(push(&queue, b"x"));
        }
        assert!(h.stop(Duration::from_secs(5)));
        let c = counters.snapshot();
        assert_eq!((c.events, c.dropped), (0, 4));
        assert!(c.write_errors >= 1);
        assert_eq!(
            logged.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one message per failure streak"
        );
    }
}
