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
//!   end, once `retain` has passed since their last modification.
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
//!   `abandoned_bytes`) when its writer is gone — `/proc/<pid>` is absent, or a newer segment
//!   by the same pid exists (one writer keeps one open segment, so after pid reuse or a failed
//!   seal the older one is dead) — and it has not grown for `dead_writer_grace`.
//!
//! - segments are read oldest name first; a poll's budget may run out in an early segment,
//!   and later ones wait for the next poll (a backlog drains in creation order);
//! - a pid reused by an unrelated process keeps an abandoned segment waiting until a newer
//!   segment of that pid appears or the process ends (the cost is delay, never loss).
//!
//! Reads use positioned reads (`pread`) into one reusable buffer (1 MiB by default, at least
//! twice the largest frame); files are never held in memory whole. Only segments being read
//! have an open file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use logtally_spool::{
    decode_header, is_segment_file_name, Record, SegmentHeader, SegmentItem, SegmentReader,
    FRAME_HEADER_LEN, MAX_PAYLOAD_LEN,
};
use tracing::{debug, info, warn};

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
    /// How long an unsealed segment of a gone writer must stay the same size before it is
    /// abandoned (finished with its torn tail discarded).
    pub dead_writer_grace: Duration,
    /// Tells whether a writer pid is alive (default: `/proc/<pid>` exists). Tests inject
    /// their own.
    pub liveness: Liveness,
}

impl Default for TailerOptions {
    fn default() -> Self {
        TailerOptions {
            read_buffer: 1 << 20,
            dead_writer_grace: Duration::from_secs(10),
            liveness: Liveness::default(),
        }
    }
}

/// Whether a process id is alive.
#[derive(Clone)]
pub struct Liveness(pub std::sync::Arc<dyn Fn(u32) -> bool + Send + Sync>);

impl Default for Liveness {
    fn default() -> Self {
        Liveness(std::sync::Arc::new(|pid| {
            Path::new("/proc").join(pid.to_string()).exists()
        }))
    }
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Liveness(..)")
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
    /// The writer is gone and the segment unsealed: finished, `torn_bytes` discarded.
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

#[derive(Debug)]
struct Seg {
    id: u64,
    name: String,
    path: PathBuf,
    /// Writer pid from the file name (the header's, once read).
    pid: Option<u32>,
    header: Option<SegmentHeader>,
    file: Option<File>,
    offset: u64,
    finished: bool,
    bad_header: bool,
    size: u64,
    last_growth: Instant,
    /// Offset of the last torn tail counted, so a wait counts once.
    torn_at: Option<u64>,
    /// End of the last corrupt run, so adjacent skips count as one occurrence.
    corrupt_end: Option<u64>,
    corruption_logged: bool,
}

impl Seg {
    fn position(&self) -> Position {
        Position {
            offset: self.offset,
            finished: self.finished,
        }
    }
}

/// Follows the segments of a spool folder. See the module documentation.
#[derive(Debug)]
pub struct Tailer {
    dir: PathBuf,
    segs: BTreeMap<String, Seg>,
    start: HashMap<String, Position>,
    options: TailerOptions,
    buf: Vec<u8>,
    next_id: u64,
    stats: TailStats,
}

/// Parses the pid out of `<ms>-<pid>-<seq>.seg`.
fn name_pid(name: &str) -> Option<u32> {
    name.split('-').nth(1)?.parse().ok()
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
            options,
            buf: vec![0; size],
            next_id: 1,
            stats: TailStats::default(),
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
        self.segs
            .values()
            .filter(|s| !s.finished && !s.bad_header)
            .count()
    }

    /// Bytes present in unfinished segments but not yet read (as of the last poll).
    pub fn lag_bytes(&self) -> u64 {
        self.segs
            .values()
            .filter(|s| !s.finished && !s.bad_header)
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

    /// Polls with the current time. See [`poll_at`](Self::poll_at).
    pub fn poll(
        &mut self,
        budget_bytes: u64,
        on_frame: &mut dyn FnMut(SegmentEvent<'_>),
    ) -> io::Result<PollStats> {
        self.poll_at(Instant::now(), budget_bytes, on_frame)
    }

    /// Rescans the folder, then reads segments in name order until about `budget_bytes` were
    /// consumed (a frame is never split, so a poll may go over by one frame). Errors reading
    /// the folder are returned; errors reading one segment are logged and that segment is
    /// retried on the next poll.
    pub fn poll_at(
        &mut self,
        now: Instant,
        budget_bytes: u64,
        on_frame: &mut dyn FnMut(SegmentEvent<'_>),
    ) -> io::Result<PollStats> {
        self.rescan(now)?;
        // The newest segment name per pid: older unfinished ones of that pid are dead.
        let mut newest: HashMap<u32, &str> = HashMap::new();
        for s in self.segs.values() {
            if let Some(pid) = s.pid {
                newest.insert(pid, s.name.as_str()); // BTreeMap order: the last wins
            }
        }
        let superseded: Vec<String> = self
            .segs
            .values()
            .filter(|s| !s.finished && s.pid.is_some_and(|p| newest[&p] != s.name))
            .map(|s| s.name.clone())
            .collect();

        let mut poll = PollStats::default();
        let mut budget = budget_bytes;
        let grace = self.options.dead_writer_grace;
        for seg in self.segs.values_mut() {
            if seg.finished || seg.bad_header {
                continue;
            }
            if budget == 0 {
                poll.more = true;
                break;
            }
            let ctx = ReadCtx {
                now,
                grace,
                superseded: superseded.contains(&seg.name),
                liveness: &self.options.liveness,
            };
            match read_segment(
                seg,
                &mut self.buf,
                &mut self.stats,
                ctx,
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
    fn rescan(&mut self, now: Instant) -> io::Result<()> {
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
                    pid: name_pid(name),
                    header: None,
                    file: None,
                    offset: start.offset,
                    finished: start.finished,
                    bad_header: false,
                    size: 0,
                    last_growth: now,
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
    /// clock). Returns the names removed (they are no longer tracked nor in positions).
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
        removed
    }
}

struct ReadCtx<'a> {
    now: Instant,
    grace: Duration,
    superseded: bool,
    liveness: &'a Liveness,
}

/// Reads one segment from its position until its end, its seal, or the budget.
fn read_segment(
    seg: &mut Seg,
    buf: &mut [u8],
    stats: &mut TailStats,
    ctx: ReadCtx<'_>,
    budget: &mut u64,
    poll: &mut PollStats,
    on_frame: &mut dyn FnMut(SegmentEvent<'_>),
) -> io::Result<()> {
    if seg.file.is_none() {
        seg.file = Some(File::open(&seg.path)?);
    }
    let file = seg.file.as_ref().expect("opened above");
    let size = file.metadata()?.len();
    if size != seg.size {
        seg.size = size;
        seg.last_growth = ctx.now;
    }

    if seg.header.is_none() {
        // Headers are at most a few KiB: one read of the buffer's worth is enough.
        let n = read_full(file, buf, 0, size)?;
        match decode_header(&buf[..n]) {
            Ok(Some((header, len))) => {
                seg.pid = Some(header.writer_pid);
                seg.header = Some(header);
                seg.offset = seg.offset.max(len as u64);
                if seg.offset > size {
                    warn!(segment = %seg.name, offset = seg.offset, size, "checkpoint beyond the end of the segment; waiting for it to grow");
                }
            }
            Ok(None) => {
                if gone(seg, &ctx) {
                    warn!(segment = %seg.name, bytes = size, "writer gone before writing a whole header; segment abandoned");
                    stats.abandoned_segments += 1;
                    stats.abandoned_bytes += size;
                    seg.offset = size;
                    seg.finished = true;
                    seg.file = None;
                }
                return Ok(());
            }
            Err(error) => {
                warn!(segment = %seg.name, %error, "unreadable segment header; segment skipped");
                stats.bad_headers += 1;
                seg.bad_header = true;
                seg.file = None;
                return Ok(());
            }
        }
    }

    let Seg {
        header,
        name,
        offset,
        ..
    } = seg;
    let sref = SegmentRef {
        id: seg.id,
        name,
        header: header.as_ref().expect("read above"),
    };
    let mut start = *offset; // file offset of buf[0]
    let mut filled = 0usize;
    let mut sealed = false;
    'read: loop {
        let n = if start + filled as u64 >= size {
            0
        } else {
            read_full(file, &mut buf[filled..], start + filled as u64, size)?
        };
        filled += n;
        let mut reader = SegmentReader::new(&buf[..filled], start);
        for item in reader.by_ref() {
            let (at, len) = (item.offset(), item.len() as u64);
            let end = at + len;
            let event = match item {
                // More bytes may complete it: read on, or wait at the end of the file.
                SegmentItem::Torn { .. } => break,
                SegmentItem::Event { record, .. } => {
                    stats.events += 1;
                    poll.events += 1;
                    SegmentEvent::Record {
                        segment: sref,
                        offset: at,
                        end,
                        record,
                    }
                }
                SegmentItem::Dropped { time_ms, count, .. } => {
                    stats.drop_markers += 1;
                    stats.dropped_events += count;
                    SegmentEvent::Dropped {
                        segment: sref,
                        offset: at,
                        end,
                        time_ms,
                        count,
                    }
                }
                SegmentItem::Seal {
                    events, dropped, ..
                } => {
                    stats.sealed_segments += 1;
                    sealed = true;
                    SegmentEvent::Sealed {
                        segment: sref,
                        offset: at,
                        end,
                        events,
                        dropped,
                    }
                }
                SegmentItem::Corrupt { .. } => {
                    stats.corrupt_bytes += len;
                    if seg.corrupt_end != Some(at) {
                        stats.corrupt_occurrences += 1;
                    }
                    seg.corrupt_end = Some(end);
                    if !seg.corruption_logged {
                        seg.corruption_logged = true;
                        warn!(segment = %sref.name, offset = at, bytes = len, "corrupt bytes skipped (logged once per segment)");
                    }
                    SegmentEvent::Corrupt {
                        segment: sref,
                        offset: at,
                        len,
                    }
                }
            };
            *offset = end;
            stats.bytes += len;
            poll.bytes += len;
            *budget = budget.saturating_sub(len);
            on_frame(event);
            if sealed {
                break 'read;
            }
            if *budget == 0 {
                poll.more = true;
                break 'read;
            }
        }
        if n == 0 {
            break; // at the end of what the file holds
        }
        // Keep the undecided rest and read on after it.
        let consumed = reader.consumed();
        buf.copy_within(consumed..filled, 0);
        start += consumed as u64;
        filled -= consumed;
    }

    if sealed {
        seg.finished = true;
        seg.file = None;
        debug!(segment = %seg.name, offset = seg.offset, "segment sealed");
        return Ok(());
    }
    if poll.more {
        return Ok(());
    }
    // At the end of the file.
    let torn = size.saturating_sub(seg.offset);
    if torn > 0 && seg.torn_at != Some(seg.offset) {
        seg.torn_at = Some(seg.offset);
        stats.torn_tail_waits += 1;
        debug!(segment = %seg.name, offset = seg.offset, bytes = torn, "torn tail; waiting");
    }
    if gone(seg, &ctx) {
        warn!(segment = %seg.name, offset = seg.offset, torn_bytes = torn, "writer gone; unsealed segment abandoned");
        stats.abandoned_segments += 1;
        stats.abandoned_bytes += torn;
        let header = seg.header.as_ref().expect("read above");
        let sref = SegmentRef {
            id: seg.id,
            name: &seg.name,
            header,
        };
        on_frame(SegmentEvent::Abandoned {
            segment: sref,
            offset: seg.offset,
            torn_bytes: torn,
        });
        seg.offset = seg.offset.max(size);
        seg.finished = true;
        seg.file = None;
    }
    Ok(())
}

/// Whether an unsealed segment's writer is gone and it stopped growing long enough ago.
fn gone(seg: &Seg, ctx: &ReadCtx<'_>) -> bool {
    ctx.now.saturating_duration_since(seg.last_growth) >= ctx.grace
        && (ctx.superseded || seg.pid.is_none_or(|pid| !(ctx.liveness.0)(pid)))
}

/// Reads into `buf` at `offset` until `buf` is full or the file's `size` is reached.
fn read_full(file: &File, buf: &mut [u8], offset: u64, size: u64) -> io::Result<usize> {
    let want = (size.saturating_sub(offset)).min(buf.len() as u64) as usize;
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf[got..want], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use logtally_spool::{
        encode_drop_marker, encode_event, encode_header, encode_seal, segment_file_name,
    };
    use std::io::Write;

    /// A pid no process can have (above Linux's pid_max limit).
    const DEAD_PID: u32 = 4_000_000_000;

    fn header(pid: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let h = SegmentHeader {
            writer_pid: pid,
            created_ms: 1,
            fields: vec!["ad".into(), "n".into()],
        };
        encode_header(&h, &mut out).unwrap();
        out
    }

    fn event(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let v = n.to_string();
        encode_event(&mut out, 1000 + n, [Some(&b"7"[..]), Some(v.as_bytes())]);
        out
    }

    fn append(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    struct Got {
        events: Vec<(String, u64)>,
        other: Vec<String>,
    }

    fn poll(t: &mut Tailer, budget: u64, now: Instant) -> (Got, PollStats) {
        let mut got = Got {
            events: Vec::new(),
            other: Vec::new(),
        };
        let stats = t
            .poll_at(now, budget, &mut |ev| match ev {
                SegmentEvent::Record {
                    segment, record, ..
                } => {
                    let n = record.values().nth(1).flatten().unwrap();
                    got.events.push((
                        segment.name.to_string(),
                        std::str::from_utf8(n).unwrap().parse().unwrap(),
                    ));
                }
                SegmentEvent::Dropped { count, .. } => got.other.push(format!("dropped {count}")),
                SegmentEvent::Sealed { events, .. } => got.other.push(format!("sealed {events}")),
                SegmentEvent::Corrupt { offset, len, .. } => {
                    got.other.push(format!("corrupt {offset}+{len}"))
                }
                SegmentEvent::Abandoned { torn_bytes, .. } => {
                    got.other.push(format!("abandoned {torn_bytes}"))
                }
            })
            .unwrap();
        (got, stats)
    }

    fn opts(grace: Duration) -> TailerOptions {
        TailerOptions {
            read_buffer: 0,
            dead_writer_grace: grace,
            ..TailerOptions::default()
        }
    }

    #[test]
    fn reads_follows_and_seals() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        let b = segment_file_name(2, me + 1, 1);
        let pa = dir.path().join(&a);
        let pb = dir.path().join(&b);
        let hlen = header(me).len() as u64;
        append(&pa, &header(me));
        append(&pa, &[event(1), event(2)].concat());
        append(&pb, &header(me));
        std::fs::write(dir.path().join("notes.txt"), b"not a segment").unwrap();
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::from_secs(3600)));
        let now = Instant::now();
        let (got, ps) = poll(&mut t, u64::MAX, now);
        assert_eq!(got.events, vec![(a.clone(), 1), (a.clone(), 2)]);
        assert_eq!(ps.events, 2);
        assert!(!ps.more);
        let e = event(1).len() as u64;
        assert_eq!(
            t.positions(),
            vec![
                (
                    a.clone(),
                    Position {
                        offset: hlen + 2 * e,
                        finished: false
                    }
                ),
                (
                    b.clone(),
                    Position {
                        offset: hlen,
                        finished: false
                    }
                ),
            ]
        );
        assert_eq!(t.segments_open(), 2);
        // Growth is followed; drop markers and the seal are delivered.
        let mut more = event(3);
        encode_drop_marker(&mut more, 5, 4);
        encode_seal(&mut more, 6, 3, 4);
        append(&pa, &more);
        append(&pb, &event(9));
        let (got, _) = poll(&mut t, u64::MAX, now);
        assert_eq!(got.events, vec![(a.clone(), 3), (b.clone(), 9)]);
        assert_eq!(got.other, vec!["dropped 4", "sealed 3"]);
        let size_a = std::fs::metadata(&pa).unwrap().len();
        assert_eq!(
            t.positions()[0],
            (
                a.clone(),
                Position {
                    offset: size_a,
                    finished: true
                }
            )
        );
        let s = t.stats();
        assert_eq!(
            (
                s.events,
                s.drop_markers,
                s.dropped_events,
                s.sealed_segments
            ),
            (4, 1, 4, 1)
        );
        assert_eq!(t.segments_open(), 1);
        // Nothing new: nothing delivered.
        let (got, ps) = poll(&mut t, u64::MAX, now);
        assert!(got.events.is_empty() && got.other.is_empty());
        assert_eq!(ps, PollStats::default());
    }

    #[test]
    fn torn_tail_waits_then_completes() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        let pa = dir.path().join(&a);
        let e2 = event(2);
        append(&pa, &[header(me), event(1), e2[..5].to_vec()].concat());
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::ZERO));
        let now = Instant::now();
        let (got, _) = poll(&mut t, u64::MAX, now);
        assert_eq!(got.events.len(), 1);
        let before = t.positions()[0].1;
        assert_eq!(before.offset, (header(me).len() + event(1).len()) as u64);
        // Polling again at the same torn tail counts the wait once; a live writer is waited for.
        poll(&mut t, u64::MAX, now);
        assert_eq!(t.stats().torn_tail_waits, 1);
        assert_eq!(t.positions()[0].1, before);
        append(&pa, &e2[5..]);
        let (got, _) = poll(&mut t, u64::MAX, now);
        assert_eq!(got.events, vec![(a, 2)]);
        assert_eq!(t.stats().corrupt_bytes, 0);
    }

    #[test]
    fn header_written_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let pa = dir.path().join(segment_file_name(1, me, 1));
        let h = header(me);
        append(&pa, &h[..10]);
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::ZERO));
        poll(&mut t, u64::MAX, Instant::now());
        assert!(t.positions().is_empty());
        append(&pa, &[&h[10..], &event(1)[..]].concat());
        let (got, _) = poll(&mut t, u64::MAX, Instant::now());
        assert_eq!(got.events.len(), 1);
    }

    #[test]
    fn corruption_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        let pa = dir.path().join(&a);
        let mut bad = event(2);
        let last = bad.len() - 1;
        bad[last] ^= 0xff; // payload CRC no longer holds
        append(
            &pa,
            &[
                header(me),
                event(1),
                bad.clone(),
                b"garbage!".to_vec(),
                event(3),
                vec![0xee; 20],
                event(4),
            ]
            .concat(),
        );
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::from_secs(60)));
        let (got, _) = poll(&mut t, u64::MAX, Instant::now());
        assert_eq!(
            got.events,
            vec![(a.clone(), 1), (a.clone(), 3), (a.clone(), 4)]
        );
        let s = t.stats();
        assert_eq!(s.corrupt_bytes, (bad.len() + 8 + 20) as u64);
        assert_eq!(s.corrupt_occurrences, 2, "{:?}", got.other);
        assert_eq!(
            t.positions()[0].1.offset,
            std::fs::metadata(&pa).unwrap().len()
        );
    }

    #[test]
    fn bad_header_is_skipped_once() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mut h = header(me);
        h[0] = b'X';
        append(
            &dir.path().join(segment_file_name(1, me, 1)),
            &[h, event(1)].concat(),
        );
        let good = segment_file_name(2, me, 2);
        append(&dir.path().join(&good), &[header(me), event(5)].concat());
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::ZERO));
        let (got, _) = poll(&mut t, u64::MAX, Instant::now());
        poll(&mut t, u64::MAX, Instant::now());
        assert_eq!(got.events, vec![(good.clone(), 5)]);
        assert_eq!(t.stats().bad_headers, 1);
        assert_eq!(t.positions().len(), 1);
        assert!(t.segments().iter().any(|s| s.bad_header));
    }

    #[test]
    fn restart_resumes_without_redelivery() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        let pa = dir.path().join(&a);
        append(&pa, &[header(me), event(1), event(2)].concat());
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::ZERO));
        poll(&mut t, u64::MAX, Instant::now());
        let committed: HashMap<String, Position> = t.positions().into_iter().collect();
        drop(t);
        append(&pa, &event(3));
        let mut t = Tailer::new(dir.path(), committed, opts(Duration::ZERO));
        let (got, _) = poll(&mut t, u64::MAX, Instant::now());
        assert_eq!(got.events, vec![(a, 3)]);
    }

    #[test]
    fn budget_splits_reading() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        let pa = dir.path().join(&a);
        let body: Vec<u8> = (0..100).flat_map(event).collect();
        append(&pa, &[header(me), body].concat());
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::ZERO));
        let mut all = Vec::new();
        let mut polls = 0;
        loop {
            let (got, ps) = poll(&mut t, 200, Instant::now());
            all.extend(got.events.into_iter().map(|(_, n)| n));
            polls += 1;
            if !ps.more {
                break;
            }
        }
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert!(polls > 10, "{polls}");
    }

    #[test]
    fn dead_writer_is_abandoned_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let a = segment_file_name(1, DEAD_PID, 1);
        let pa = dir.path().join(&a);
        let e2 = event(2);
        append(
            &pa,
            &[header(DEAD_PID), event(1), e2[..7].to_vec()].concat(),
        );
        let grace = Duration::from_secs(30);
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(grace));
        let t0 = Instant::now();
        let (got, _) = poll(&mut t, u64::MAX, t0);
        assert_eq!(got.events.len(), 1);
        assert!(!t.positions()[0].1.finished, "within the grace period");
        let (got, _) = poll(&mut t, u64::MAX, t0 + grace);
        assert_eq!(got.other, vec!["abandoned 7"]);
        let size = std::fs::metadata(&pa).unwrap().len();
        assert_eq!(
            t.positions(),
            vec![(
                a,
                Position {
                    offset: size,
                    finished: true
                }
            )]
        );
        let s = t.stats();
        assert_eq!((s.abandoned_segments, s.abandoned_bytes), (1, 7));
    }

    #[test]
    fn live_writer_is_waited_for_but_superseded_segment_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let old = segment_file_name(1, me, 1);
        append(&dir.path().join(&old), &[header(me), event(1)].concat());
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::ZERO));
        let now = Instant::now();
        poll(&mut t, u64::MAX, now);
        poll(&mut t, u64::MAX, now + Duration::from_secs(100));
        assert!(
            !t.positions()[0].1.finished,
            "the writer (this process) is alive"
        );
        // A newer segment by the same pid: the old one can never grow again.
        let new = segment_file_name(2, me, 2);
        append(&dir.path().join(&new), &header(me));
        let (got, _) = poll(&mut t, u64::MAX, now + Duration::from_secs(200));
        assert_eq!(got.other, vec!["abandoned 0"]);
        let pos = t.positions();
        assert!(pos[0].1.finished && !pos[1].1.finished, "{pos:?}");
    }

    #[test]
    fn remove_finished_needs_commit_and_retain() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        let b = segment_file_name(2, me + 1, 1);
        let mut sealed = [header(me), event(1)].concat();
        encode_seal(&mut sealed, 1, 1, 0);
        append(&dir.path().join(&a), &sealed);
        append(&dir.path().join(&b), &[header(me), event(1)].concat());
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::from_secs(60)));
        poll(&mut t, u64::MAX, Instant::now());
        let pos = t.positions();
        let now = SystemTime::now();
        // Not committed yet (an older position): kept.
        let stale = vec![(
            a.clone(),
            Position {
                offset: 10,
                finished: false,
            },
        )];
        assert!(t.remove_finished(&stale, now, Duration::ZERO).is_empty());
        // Committed, but retain has not passed.
        assert!(t
            .remove_finished(&pos, now, Duration::from_secs(3600))
            .is_empty());
        assert!(dir.path().join(&a).exists());
        // Committed and old enough; the unfinished segment stays.
        let later = now + Duration::from_secs(7200);
        assert_eq!(
            t.remove_finished(&pos, later, Duration::from_secs(3600)),
            vec![a.clone()]
        );
        assert!(!dir.path().join(&a).exists());
        assert!(dir.path().join(&b).exists());
        assert_eq!(t.positions().len(), 1);
        assert_eq!(t.stats().deleted_segments, 1);
    }

    #[test]
    fn positions_before_the_first_poll_are_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let start = HashMap::from([(
            "1-2-000003.seg".to_string(),
            Position {
                offset: 40,
                finished: false,
            },
        )]);
        let mut t = Tailer::new(dir.path(), start.clone(), opts(Duration::ZERO));
        assert_eq!(t.positions(), start.into_iter().collect::<Vec<_>>());
        // The segment does not exist: forgotten once the folder was read.
        poll(&mut t, u64::MAX, Instant::now());
        assert!(t.positions().is_empty());
    }

    #[test]
    fn frames_and_corruption_across_buffer_refills() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        let big = vec![b'v'; 4000];
        let frame = |n: u64| {
            let mut out = Vec::new();
            encode_event(&mut out, n, [Some(&b"7"[..]), Some(&big[..])]);
            out
        };
        // The buffer is raised to twice the largest frame; put garbage across its end.
        let buffer = 2 * (FRAME_HEADER_LEN + MAX_PAYLOAD_LEN);
        let mut file = header(me);
        let mut n = 0;
        while file.len() + frame(0).len() < buffer - 50 {
            file.extend(frame(n));
            n += 1;
        }
        file.extend(vec![0xab; 100]);
        let before = n;
        while file.len() < 3 * buffer {
            file.extend(frame(n));
            n += 1;
        }
        append(&dir.path().join(&a), &file);
        let mut t = Tailer::new(dir.path(), HashMap::new(), opts(Duration::ZERO));
        let mut times = Vec::new();
        t.poll_at(Instant::now(), u64::MAX, &mut |ev| {
            if let SegmentEvent::Record { record, .. } = ev {
                times.push(record.time_ms);
            }
        })
        .unwrap();
        assert!(before > 100 && n > before + 300, "{before} {n}");
        assert_eq!(times, (0..n).collect::<Vec<_>>());
        let s = t.stats();
        assert_eq!((s.corrupt_bytes, s.corrupt_occurrences), (100, 1));
        assert_eq!(t.positions()[0].1.offset, file.len() as u64);
    }

    #[test]
    fn finished_at_start_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let a = segment_file_name(1, me, 1);
        append(&dir.path().join(&a), &[header(me), event(1)].concat());
        let start = HashMap::from([(
            a.clone(),
            Position {
                offset: 5,
                finished: true,
            },
        )]);
        let mut t = Tailer::new(dir.path(), start, opts(Duration::ZERO));
        let (got, _) = poll(&mut t, u64::MAX, Instant::now());
        assert!(got.events.is_empty());
        assert_eq!(
            t.positions(),
            vec![(
                a,
                Position {
                    offset: 5,
                    finished: true
                }
            )]
        );
    }
}
