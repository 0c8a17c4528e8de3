//! Tailing the spool folder: finds segments, follows them as they grow, and delivers their
//! frames in order with the byte offset after each, so the daemon can checkpoint exactly what
//! it aggregated.
//!
//! Blocking std I/O; the daemon runs a [`Tailer`] on a thread of its own.
//!
//! API:
//! - [`Tailer::new`]`(dir, start, options)`: `start` maps segment file names to the committed
//!   checkpoint [`Position`]s; segments not in it are read from their header's end, segments
//!   marked finished are not read again.
//! - [`Tailer::poll`]`(budget_bytes, on_frame)`: rescans the folder, reads up to about
//!   `budget_bytes` of frames and calls `on_frame` for each [`SegmentEvent`], in file order
//!   per segment, segments in name (creation) order. Each event carries a [`SegmentRef`]
//!   (id, name, header) so the aggregator can map the header's fields once per segment
//!   ([`crate::aggregate::Aggregator::add_cached`] with `segment.id`).
//! - [`Tailer::positions`]: the position after everything delivered so far; the daemon
//!   commits exactly these, together with the aggregates of everything delivered.
//! - [`Tailer::remove_finished`]: deletes finished segments whose committed position is their
//!   end, once `retain` has passed since their last modification, and fsyncs the folder
//!   before it names them: only then may their checkpoint rows go (a power loss must not
//!   bring back a file whose row is gone: it would be read again from its start).
//! - [`Tailer::stats`]: cumulative counters (events, drops, corruption, torn tails, …).
//!
//! Rules:
//! - a segment whose header is incomplete is waited for; a bad header (magic, version, CRC)
//!   is logged once, counted, and the segment is left alone (not read, not deleted, not in
//!   positions) for an operator to inspect;
//! - a torn tail (an incomplete frame at the end) is waited for: the position stays at the
//!   last complete frame; each new torn position counts once in `torn_tail_waits`;
//! - corruption is skipped to the next place a frame may start (the spool crate decides) and
//!   counted in bytes and occurrences (runs of adjacent skips); logged once per segment;
//! - the seal frame finishes a segment: its position becomes `finished` at the seal's end;
//! - an unsealed segment is *abandoned* (finished, its torn tail counted in
//!   `abandoned_bytes`) when no writer holds its lock and it was read to its end (lock
//!   checked first, then read: `liveness.rs`); a held lock is never finished, however long
//!   the segment stays quiet; no pid and no clock decide it;
//! - a segment shorter than the position already read was cut outside the writer: logged as
//!   an error, counted in `truncated_segments`, never decoded from inside a frame, left in
//!   place (not read, not deleted, its position kept) for an operator;
//! - segments are read oldest name first; a poll's budget may run out in an early segment,
//!   and later ones wait for the next poll (a backlog drains in creation order).
//!
//! The folder-level work (scan, positions, deleting finished segments) is here; reading one
//! segment is in `segment.rs`.
//!
//! Reads use positioned reads (`pread`) into one reusable buffer (1 MiB by default, at least
//! twice the largest frame); files are never held in memory whole. Only segments being read
//! have an open file.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use logtally_spool::sync_dir;

use logtally_spool::{
    is_segment_file_name, Record, SegmentHeader, FRAME_HEADER_LEN, MAX_PAYLOAD_LEN,
};
use tracing::{debug, info, warn};

use super::segment::{read_segment, Seg};

/// Where reading a segment stands: a checkpoint entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Position {
    /// Byte offset from the start of the file: at a frame boundary (or the header's end), or
    /// the file's end once finished.
    pub offset: u64,
    /// No byte after `offset` will ever be read (sealed or abandoned).
    pub finished: bool,
}

/// How a [`Tailer`] reads.
#[derive(Debug, Clone)]
pub struct TailerOptions {
    /// Read buffer size; raised to at least twice the largest frame.
    pub read_buffer: usize,
}

impl Default for TailerOptions {
    fn default() -> Self {
        TailerOptions {
            read_buffer: 1 << 20,
        }
    }
}

/// The segment a [`SegmentEvent`] comes from.
#[derive(Debug, Clone, Copy)]
pub struct SegmentRef<'a> {
    /// Distinct for every segment this tailer tracks (not stable across restarts).
    pub id: u64,
    /// File name, the checkpoint key.
    pub name: &'a str,
    pub header: &'a SegmentHeader,
}

/// What [`Tailer::poll`] delivers. `offset` is where the frame (or skipped run) starts;
/// `end` is the position after it.
#[derive(Debug, Clone, Copy)]
pub enum SegmentEvent<'a> {
    Record {
        segment: SegmentRef<'a>,
        offset: u64,
        end: u64,
        record: Record<'a>,
    },
    Dropped {
        segment: SegmentRef<'a>,
        offset: u64,
        end: u64,
        time_ms: u64,
        count: u64,
    },
    Sealed {
        segment: SegmentRef<'a>,
        offset: u64,
        end: u64,
        events: u64,
        dropped: u64,
    },
    Corrupt {
        segment: SegmentRef<'a>,
        offset: u64,
        len: u64,
    },
    /// No writer holds the unsealed segment and it was read to its end: finished,
    /// `torn_bytes` discarded.
    Abandoned {
        segment: SegmentRef<'a>,
        offset: u64,
        torn_bytes: u64,
    },
}

/// What one [`Tailer::poll`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Bytes of frames and skipped corruption consumed.
    pub bytes: u64,
    /// Event records delivered.
    pub events: u64,
    /// The budget ran out before every segment was read to its end: poll again soon.
    pub more: bool,
}

/// Cumulative counters since the tailer was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TailStats {
    pub events: u64,
    pub bytes: u64,
    pub drop_markers: u64,
    /// Events the module dropped, as its drop markers say.
    pub dropped_events: u64,
    pub corrupt_bytes: u64,
    pub corrupt_occurrences: u64,
    pub torn_tail_waits: u64,
    pub sealed_segments: u64,
    pub abandoned_segments: u64,
    pub abandoned_bytes: u64,
    pub bad_headers: u64,
    /// Segments found shorter than the position already read (a fault outside the writer).
    pub truncated_segments: u64,
    pub deleted_segments: u64,
}

/// One segment's state, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentStatus {
    pub name: String,
    pub position: Position,
    /// File size when last looked at.
    pub size: u64,
    /// The header could not be read (the segment is ignored).
    pub bad_header: bool,
}

/// Follows the segments of a spool folder. See the module documentation.
#[derive(Debug)]
pub struct Tailer {
    dir: PathBuf,
    segs: BTreeMap<String, Seg>,
    start: HashMap<String, Position>,
    buf: Vec<u8>,
    next_id: u64,
    stats: TailStats,
    /// Segments deleted whose removal the folder's fsync has not yet made durable.
    unsynced_removals: Vec<String>,
}

impl Tailer {
    /// A tailer over `dir`, resuming at the committed `start` positions (segment file name →
    /// position). Reads nothing until [`poll`](Self::poll).
    pub fn new(
        dir: impl Into<PathBuf>,
        start: HashMap<String, Position>,
        options: TailerOptions,
    ) -> Tailer {
        let min = 2 * (FRAME_HEADER_LEN + MAX_PAYLOAD_LEN);
        let size = options.read_buffer.max(min);
        Tailer {
            dir: dir.into(),
            segs: BTreeMap::new(),
            start,
            buf: vec![0; size],
            next_id: 1,
            stats: TailStats::default(),
            unsynced_removals: Vec::new(),
        }
    }

    /// The spool folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cumulative counters.
    pub fn stats(&self) -> TailStats {
        self.stats
    }

    /// Segments tracked and not finished (being written, or not yet read to their end).
    pub fn segments_open(&self) -> usize {
        self.segs.values().filter(|s| s.readable()).count()
    }

    /// Bytes present in unfinished segments but not yet read (as of the last poll).
    pub fn lag_bytes(&self) -> u64 {
        self.segs
            .values()
            .filter(|s| s.readable())
            .map(|s| s.size.saturating_sub(s.offset))
            .sum()
    }

    /// Every tracked segment's state, in name order.
    pub fn segments(&self) -> Vec<SegmentStatus> {
        self.segs
            .values()
            .map(|s| SegmentStatus {
                name: s.name.clone(),
                position: s.position(),
                size: s.size,
                bad_header: s.bad_header,
            })
            .collect()
    }

    /// The position after everything delivered so far, for every segment read (or known
    /// finished), in name order. Commit these with the aggregates of what was delivered.
    pub fn positions(&self) -> Vec<(String, Position)> {
        self.segs
            .values()
            .filter(|s| !s.bad_header && (s.offset > 0 || s.finished))
            .map(|s| (s.name.clone(), s.position()))
            // Before the first poll the start positions are all there is: they must survive a
            // commit made before anything was read.
            .chain(self.start.iter().map(|(n, p)| (n.clone(), *p)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect()
    }

    /// Rescans the folder, then reads segments in name order until about `budget_bytes` were
    /// consumed (a frame is never split, so a poll may go over by one frame). Errors reading
    /// the folder are returned; errors reading one segment are logged and that segment is
    /// retried on the next poll.
    pub fn poll(
        &mut self,
        budget_bytes: u64,
        on_frame: &mut dyn FnMut(SegmentEvent<'_>),
    ) -> io::Result<PollStats> {
        self.rescan()?;
        let mut poll = PollStats::default();
        let mut budget = budget_bytes;
        for seg in self.segs.values_mut() {
            if !seg.readable() {
                continue;
            }
            if budget == 0 {
                poll.more = true;
                break;
            }
            match read_segment(
                seg,
                &mut self.buf,
                &mut self.stats,
                &mut budget,
                &mut poll,
                on_frame,
            ) {
                Ok(()) => {}
                Err(error) => {
                    warn!(segment = %seg.name, %error, "reading segment failed; will retry");
                    seg.file = None;
                }
            }
        }
        Ok(poll)
    }

    /// Tracks segment files that appeared; forgets tracked ones that vanished.
    fn rescan(&mut self) -> io::Result<()> {
        let mut seen: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !is_segment_file_name(&name) {
                continue;
            }
            seen.push(name);
        }
        seen.sort_unstable();
        for name in &seen {
            if self.segs.contains_key(name) {
                continue;
            }
            let start = self.start.remove(name).unwrap_or_default();
            let id = self.next_id;
            self.next_id += 1;
            debug!(segment = %name, offset = start.offset, finished = start.finished, "tracking segment");
            self.segs.insert(
                name.clone(),
                Seg {
                    id,
                    name: name.clone(),
                    path: self.dir.join(name),
                    header: None,
                    file: None,
                    offset: start.offset,
                    finished: start.finished,
                    bad_header: false,
                    truncated: false,
                    size: 0,
                    torn_at: None,
                    corrupt_end: None,
                    corruption_logged: false,
                },
            );
        }
        // Start positions of segments that are gone are of no further use.
        self.start.clear();
        self.segs.retain(|name, s| {
            let keep = seen.binary_search(name).is_ok();
            if !keep && !s.finished {
                warn!(segment = %name, offset = s.offset, "segment vanished before it was finished");
            }
            keep
        });
        Ok(())
    }

    /// Deletes finished segments whose committed position (in `committed`) is their final
    /// position, once `retain` has passed since the file was last modified (`now` is the wall
    /// clock), then fsyncs the folder. Returns the names whose removal is durable (they are
    /// no longer tracked nor in positions): only those may lose their checkpoint rows. When
    /// the folder's fsync fails, the names wait for the next call's fsync.
    pub fn remove_finished(
        &mut self,
        committed: &[(String, Position)],
        now: SystemTime,
        retain: Duration,
    ) -> Vec<String> {
        let committed: HashMap<&str, Position> =
            committed.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        let mut removed = Vec::new();
        for s in self.segs.values() {
            if !s.finished || committed.get(s.name.as_str()) != Some(&s.position()) {
                continue;
            }
            if !retain.is_zero() {
                let old_enough = std::fs::metadata(&s.path)
                    .and_then(|m| m.modified())
                    .map(|m| now.duration_since(m).unwrap_or_default() >= retain)
                    .unwrap_or(true);
                if !old_enough {
                    continue;
                }
            }
            match std::fs::remove_file(&s.path) {
                Ok(()) => removed.push(s.name.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => removed.push(s.name.clone()),
                Err(error) => warn!(segment = %s.name, %error, "cannot delete finished segment"),
            }
        }
        for name in &removed {
            self.segs.remove(name);
            info!(segment = %name, "deleted finished segment");
        }
        self.stats.deleted_segments += removed.len() as u64;
        self.unsynced_removals.extend(removed);
        if self.unsynced_removals.is_empty() {
            return Vec::new();
        }
        match sync_dir(&self.dir) {
            Ok(()) => std::mem::take(&mut self.unsynced_removals),
            Err(error) => {
                warn!(dir = %self.dir.display(), %error, segments = self.unsynced_removals.len(), "cannot fsync the spool folder after deleting segments; their checkpoint rows stay until it works");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests;
