//! One segment being followed: what the tailer knows of it, and the read of its new bytes
//! (the writer lock first, then the header, then frames through the spool's
//! [`SegmentReader`], then the torn tail and, when the lock was free, the segment's end).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use logtally_spool::{decode_header, SegmentHeader, SegmentItem, SegmentReader};
use tracing::{debug, error, warn};

use super::liveness::writer_gone;
use super::tail::{PollStats, Position, SegmentEvent, SegmentRef, TailStats};

#[derive(Debug)]
pub(super) struct Seg {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) header: Option<SegmentHeader>,
    pub(super) file: Option<File>,
    pub(super) offset: u64,
    pub(super) finished: bool,
    pub(super) bad_header: bool,
    /// Found shorter than `offset`: cut outside the writer. Not read again (a fault for an
    /// operator); its position stays as it was.
    pub(super) truncated: bool,
    pub(super) size: u64,
    /// Offset of the last torn tail counted, so a wait counts once.
    pub(super) torn_at: Option<u64>,
    /// End of the last corrupt run, so adjacent skips count as one occurrence.
    pub(super) corrupt_end: Option<u64>,
    pub(super) corruption_logged: bool,
}

impl Seg {
    /// Still to be read: neither finished nor left alone after a fault.
    pub(super) fn readable(&self) -> bool {
        !self.finished && !self.bad_header && !self.truncated
    }

    pub(super) fn position(&self) -> Position {
        Position {
            offset: self.offset,
            finished: self.finished,
        }
    }
}

/// Reads one segment from its position until its end, its seal, or the budget.
pub(super) fn read_segment(
    seg: &mut Seg,
    buf: &mut [u8],
    stats: &mut TailStats,
    budget: &mut u64,
    poll: &mut PollStats,
    on_frame: &mut dyn FnMut(SegmentEvent<'_>),
) -> io::Result<()> {
    if seg.file.is_none() {
        seg.file = Some(File::open(&seg.path)?);
    }
    let file = seg.file.as_ref().expect("opened above");
    // The lock first, the size after: when no writer holds the segment, the bytes up to this
    // size are all it will ever hold.
    let gone = writer_gone(file)?;
    let size = file.metadata()?.len();
    seg.size = size;

    if seg.header.is_none() {
        // Headers are at most a few KiB: one read of the buffer's worth is enough.
        let n = read_full(file, buf, 0, size)?;
        match decode_header(&buf[..n]) {
            Ok(Some((header, len))) => {
                seg.header = Some(header);
                seg.offset = seg.offset.max(len as u64);
            }
            Ok(None) => {
                // A writer names a segment only once its header is whole: this one is debris
                // (or written by hand) once no writer holds it.
                if gone {
                    warn!(segment = %seg.name, bytes = size, "segment without a whole header and no writer; abandoned");
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

    if size < seg.offset {
        // A writer never cuts a segment back (it abandons it instead): something else did.
        // Decoding from here could start inside a frame; leave it to an operator.
        error!(
            segment = %seg.name,
            offset = seg.offset,
            size,
            "segment is shorter than the position already read: cut outside the writer (by \
             hand, a restored backup, a power loss before the bytes reached the disk); not \
             read further, left in place for an operator"
        );
        stats.truncated_segments += 1;
        seg.truncated = true;
        seg.file = None;
        return Ok(());
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
    if gone {
        // Read to the end after seeing the lock free: nothing more will come.
        warn!(segment = %seg.name, offset = seg.offset, torn_bytes = torn, "no writer holds the unsealed segment; finished as abandoned");
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
