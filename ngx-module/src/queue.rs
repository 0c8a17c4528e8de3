//! The per-worker queue between the request path and the writer thread: a pair of buffers.
//!
//! The request path encodes each event straight into the active buffer, under a lock held
//! only for that; the writer thread swaps in its empty buffer (under the same lock, for a
//! pointer swap) and writes what it took while the request path fills the other. No
//! allocation per event, no free on another thread, no channel: in steady state both
//! buffers keep their capacity.
//!
//! The bound counts both buffers (the one filling and the one the writer is still
//! writing), in bytes or in records ([`Bound`]). Their capacity can outlast a burst by one
//! round (about twice the bound in all) before [`Batch::clear`] gives it back.
//!
//! An event that does not fit is dropped, counted in the buffer it would have joined, and
//! reported by the writer with that buffer (a drop marker after its events), so drop
//! counts stay exact.

use std::sync::{Mutex, MutexGuard};

/// A write of one taken buffer is split, at frame boundaries, into pieces of about this
/// many bytes, so a deep queue never turns into one huge `write()`.
pub const MAX_WRITE: usize = 8 << 20;

/// How much one worker may hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Bytes of encoded events (`queue=64m`).
    Bytes(usize),
    /// Events, whatever their size (`queue=65536`).
    Records(usize),
}

/// A buffer of encoded event frames, with what the writer needs to know about it.
#[derive(Debug, Default)]
pub struct Batch {
    /// Event frames, back to back.
    pub frames: Vec<u8>,
    /// Event frames in `frames`.
    pub events: u64,
    /// Events refused while this buffer was the active one.
    pub dropped: u64,
    /// Frame boundaries, about every [`MAX_WRITE`] bytes: (offset, events before it).
    pub cuts: Vec<(usize, u64)>,
}

impl Batch {
    /// An empty batch with room for the frames of a typical flush interval.
    pub fn new() -> Batch {
        Batch::with_capacity(INITIAL_CAPACITY)
    }

    fn with_capacity(bytes: usize) -> Batch {
        Batch {
            frames: Vec::with_capacity(bytes),
            ..Batch::default()
        }
    }

    /// Empties the batch, keeping (most of) its capacity for the next round.
    pub fn clear(&mut self) {
        // A burst (a stalled disk) may have grown it far past what normal traffic needs:
        // give that back rather than hold it for the worker's life.
        if self.frames.capacity() > MAX_WRITE && self.frames.len() < self.frames.capacity() / 4 {
            self.frames
                .shrink_to(self.frames.len().max(INITIAL_CAPACITY));
        }
        self.frames.clear();
        self.cuts.clear();
        self.events = 0;
        self.dropped = 0;
    }

    /// The batch's frames in pieces of about [`MAX_WRITE`] bytes, each with its event
    /// count; always at least one piece (possibly empty).
    pub fn pieces(&self) -> impl Iterator<Item = (&[u8], u64)> {
        let ends = self
            .cuts
            .iter()
            .copied()
            .chain(std::iter::once((self.frames.len(), self.events)));
        let mut from = (0usize, 0u64);
        ends.filter_map(move |(end, events)| {
            if end == from.0 && end != 0 {
                return None;
            }
            let piece = (&self.frames[from.0..end], events - from.1);
            from = (end, events);
            Some(piece)
        })
    }
}

const INITIAL_CAPACITY: usize = 64 << 10;

#[derive(Debug)]
struct Shared {
    active: Batch,
    /// Size of the batch the writer took last and is still writing.
    in_flight_bytes: usize,
    in_flight_events: u64,
}

/// One worker's queue. The request path calls [`push`](Self::push); the writer thread
/// [`take`](Self::take) and [`written`](Self::written).
#[derive(Debug)]
pub struct EventQueue {
    bound: Bound,
    shared: Mutex<Shared>,
}

impl EventQueue {
    pub fn new(bound: Bound) -> EventQueue {
        EventQueue {
            bound,
            shared: Mutex::new(Shared {
                active: Batch::new(),
                in_flight_bytes: 0,
                in_flight_events: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing run under the lock leaves the state half-changed: a panic there (none is
        // expected) must not stop the worker's logging for good.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Request path: lets `encode` append one event frame to the active buffer, or counts
    /// the event as dropped if it does not fit. Returns `encode`'s result if queued.
    pub fn push<R>(&self, encode: impl FnOnce(&mut Vec<u8>) -> R) -> Option<R> {
        let mut s = self.lock();
        let s = &mut *s;
        let full = match self.bound {
            Bound::Bytes(max) => s.active.frames.len() + s.in_flight_bytes >= max,
            Bound::Records(max) => s.active.events + s.in_flight_events >= max as u64,
        };
        if full {
            s.active.dropped += 1;
            return None;
        }
        let before = s.active.frames.len();
        let out = encode(&mut s.active.frames);
        let after = s.active.frames.len();
        if matches!(self.bound, Bound::Bytes(max) if after + s.in_flight_bytes > max) {
            s.active.frames.truncate(before);
            s.active.dropped += 1;
            return None;
        }
        s.active.events += 1;
        let last_cut = s.active.cuts.last().map_or(0, |c| c.0);
        if after - last_cut >= MAX_WRITE {
            s.active.cuts.push((after, s.active.events));
        }
        Some(out)
    }

    /// Writer: swaps the active buffer with `spare` (which must be empty) and counts what
    /// it took as in flight until [`written`](Self::written).
    pub fn take(&self, spare: &mut Batch) {
        debug_assert!(spare.frames.is_empty() && spare.events == 0 && spare.dropped == 0);
        let mut s = self.lock();
        std::mem::swap(&mut s.active, spare);
        s.in_flight_bytes = spare.frames.len();
        s.in_flight_events = spare.events;
    }

    /// Writer: the batch taken last is written (or given up), its room is free again.
    pub fn written(&self) {
        let mut s = self.lock();
        s.in_flight_bytes = 0;
        s.in_flight_events = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_bytes(q: &EventQueue, n: usize) -> bool {
        q.push(|out| out.resize(out.len() + n, b'x')).is_some()
    }

    #[test]
    fn a_byte_bound_counts_both_buffers_and_every_refused_event() {
        let q = EventQueue::new(Bound::Bytes(100));
        assert!(push_bytes(&q, 40));
        assert!(push_bytes(&q, 40));
        // 80 + 30 > 100: refused, and the bytes it wrote are gone again.
        assert!(!push_bytes(&q, 30));
        assert!(push_bytes(&q, 20));
        // Exactly full: nothing more, not even an empty frame.
        assert!(!push_bytes(&q, 0));
        let mut b = Batch::default();
        q.take(&mut b);
        assert_eq!((b.frames.len(), b.events, b.dropped), (100, 3, 2));
        // The taken batch still counts until written.
        assert!(!push_bytes(&q, 1));
        q.written();
        assert!(push_bytes(&q, 100));
        let mut c = Batch::default();
        q.take(&mut c);
        assert_eq!((c.frames.len(), c.events, c.dropped), (100, 1, 1));
    }

    #[test]
    fn a_record_bound_counts_events_not_bytes() {
        let q = EventQueue::new(Bound::Records(2));
        assert!(push_bytes(&q, 1000));
        let mut b = Batch::default();
        q.take(&mut b);
        assert!(push_bytes(&q, 5000));
        assert!(!push_bytes(&q, 1));
        q.written();
        assert!(push_bytes(&q, 1));
        assert!(!push_bytes(&q, 1));
        let mut c = Batch::default();
        q.take(&mut c);
        assert_eq!((c.events, c.dropped, c.frames.len()), (2, 2, 5001));
    }

    #[test]
    fn swapping_keeps_both_buffers_and_their_capacity() {
        let q = EventQueue::new(Bound::Bytes(1 << 20));
        let mut spare = Batch::new();
        for round in 0..3 {
            for _ in 0..10 {
                assert!(push_bytes(&q, 100));
            }
            q.take(&mut spare);
            assert_eq!(
                (spare.events, spare.frames.len()),
                (10, 1000),
                "round {round}"
            );
            assert!(spare.frames.capacity() >= INITIAL_CAPACITY);
            spare.clear();
            q.written();
        }
    }

    #[test]
    fn pieces_split_at_frame_boundaries_with_their_event_counts() {
        let q = EventQueue::new(Bound::Bytes(64 << 20));
        let frame = MAX_WRITE / 3 + 1;
        for _ in 0..7 {
            assert!(push_bytes(&q, frame));
        }
        let mut b = Batch::default();
        q.take(&mut b);
        let pieces: Vec<(usize, u64)> = b.pieces().map(|(p, n)| (p.len(), n)).collect();
        // A cut once a piece reaches MAX_WRITE: after frames 3 and 6.
        assert_eq!(pieces, [(3 * frame, 3), (3 * frame, 3), (frame, 1)]);
        assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), 7);

        // Ending exactly on a cut gives no empty last piece; an empty batch gives one.
        let q = EventQueue::new(Bound::Bytes(64 << 20));
        assert!(push_bytes(&q, MAX_WRITE));
        let mut c = Batch::default();
        q.take(&mut c);
        assert_eq!(
            c.pieces().map(|(p, n)| (p.len(), n)).collect::<Vec<_>>(),
            [(MAX_WRITE, 1)]
        );
        let empty = Batch::default();
        assert_eq!(
            empty
                .pieces()
                .map(|(p, n)| (p.len(), n))
                .collect::<Vec<_>>(),
            [(0, 0)]
        );
    }

    #[test]
    fn a_big_batch_gives_its_memory_back_when_traffic_is_small_again() {
        let mut b = Batch::with_capacity(4 * MAX_WRITE);
        b.frames.extend_from_slice(&[1; 100]);
        b.clear();
        assert!(b.frames.capacity() < MAX_WRITE);
        assert!(b.frames.capacity() >= INITIAL_CAPACITY);
    }
}
