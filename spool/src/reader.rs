//! Walking a segment's frames: the one loop every reader of the spool uses (the sidecar's
//! tailer, `logtally dump`, this crate's tests).
//!
//! A [`SegmentReader`] walks bytes a caller read from a segment, starting at a frame
//! boundary, and yields each item with its byte offset in the file. It does no I/O: a caller
//! that reads a file in pieces makes a reader per piece, starting where the previous one's
//! [`offset`](SegmentReader::offset) stopped.

use crate::{decode_frame, Decoded, Frame, Record};

/// What a [`SegmentReader`] finds. `offset` is where the item starts in the segment file,
/// `len` how many bytes it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentItem<'a> {
    /// One request's event.
    Event {
        offset: u64,
        len: usize,
        record: Record<'a>,
    },
    /// The writer dropped `count` events since its previous marker.
    Dropped {
        offset: u64,
        len: usize,
        time_ms: u64,
        count: u64,
    },
    /// The seal: the writer wrote nothing after it. The reader still goes on over any bytes
    /// that follow (a valid segment has none), so `dump` can show them; a tailer stops here.
    Seal {
        offset: u64,
        len: usize,
        time_ms: u64,
        events: u64,
        dropped: u64,
    },
    /// `len` bytes that are not a frame, skipped to the next place a frame may start. A
    /// damaged stretch may come as several adjacent items.
    Corrupt { offset: u64, len: usize },
    /// The last `len` bytes given are the start of a frame, or too few to tell. If the file
    /// ends there it is a torn tail (the writer is mid-write, or died); if the caller read
    /// only part of the file, it is the frame the next read completes. Always the last item;
    /// its bytes are not consumed.
    Torn { offset: u64, len: usize },
}

impl<'a> SegmentItem<'a> {
    /// Where the item starts in the segment file.
    pub fn offset(&self) -> u64 {
        match *self {
            SegmentItem::Event { offset, .. }
            | SegmentItem::Dropped { offset, .. }
            | SegmentItem::Seal { offset, .. }
            | SegmentItem::Corrupt { offset, .. }
            | SegmentItem::Torn { offset, .. } => offset,
        }
    }

    /// How many bytes it takes.
    pub fn len(&self) -> usize {
        match *self {
            SegmentItem::Event { len, .. }
            | SegmentItem::Dropped { len, .. }
            | SegmentItem::Seal { len, .. }
            | SegmentItem::Corrupt { len, .. }
            | SegmentItem::Torn { len, .. } => len,
        }
    }

    /// Whether it takes no bytes (never: every item holds at least one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The item as a checked [`Frame`], when it is one.
    pub fn frame(&self) -> Option<Frame<'a>> {
        match *self {
            SegmentItem::Event { record, .. } => Some(Frame::Event(record)),
            SegmentItem::Dropped { time_ms, count, .. } => Some(Frame::Dropped { time_ms, count }),
            SegmentItem::Seal {
                time_ms,
                events,
                dropped,
                ..
            } => Some(Frame::Seal {
                time_ms,
                events,
                dropped,
            }),
            SegmentItem::Corrupt { .. } | SegmentItem::Torn { .. } => None,
        }
    }
}

/// Walks the frames in bytes read from a segment. See the module documentation.
#[derive(Debug, Clone)]
pub struct SegmentReader<'a> {
    bytes: &'a [u8],
    /// File offset of `bytes[0]`.
    start: u64,
    /// Bytes consumed: every one before this is a frame or skipped corruption.
    at: usize,
    /// A torn tail was yielded: nothing follows.
    done: bool,
}

impl<'a> SegmentReader<'a> {
    /// A reader over `bytes`, which hold a segment's bytes from file offset `offset` on.
    /// `offset` must be a frame boundary: the header's end, or a checkpointed position.
    pub fn new(bytes: &'a [u8], offset: u64) -> Self {
        SegmentReader {
            bytes,
            start: offset,
            at: 0,
            done: false,
        }
    }

    /// The file offset of the first byte not consumed: after the last frame or corruption
    /// yielded. A torn tail is not consumed, so this is where it starts.
    pub fn offset(&self) -> u64 {
        self.start + self.at as u64
    }

    /// How many of the given bytes are consumed.
    pub fn consumed(&self) -> usize {
        self.at
    }

    /// The bytes not consumed yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at..]
    }
}

impl<'a> Iterator for SegmentReader<'a> {
    type Item = SegmentItem<'a>;

    #[inline]
    fn next(&mut self) -> Option<SegmentItem<'a>> {
        let rest = &self.bytes[self.at..];
        if self.done || rest.is_empty() {
            return None;
        }
        let offset = self.offset();
        match decode_frame(rest) {
            Decoded::Frame { frame, len } => {
                self.at += len;
                Some(match frame {
                    Frame::Event(record) => SegmentItem::Event {
                        offset,
                        len,
                        record,
                    },
                    Frame::Dropped { time_ms, count } => SegmentItem::Dropped {
                        offset,
                        len,
                        time_ms,
                        count,
                    },
                    Frame::Seal {
                        time_ms,
                        events,
                        dropped,
                    } => SegmentItem::Seal {
                        offset,
                        len,
                        time_ms,
                        events,
                        dropped,
                    },
                })
            }
            Decoded::Corrupt { skip } => {
                self.at += skip;
                Some(SegmentItem::Corrupt { offset, len: skip })
            }
            Decoded::Incomplete => {
                self.done = true;
                Some(SegmentItem::Torn {
                    offset,
                    len: rest.len(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_event, encode_seal};

    #[test]
    fn goes_on_after_the_seal_and_ends_at_a_torn_tail() {
        let mut bytes = Vec::new();
        encode_event(&mut bytes, 1, [Some(&b"a"[..])]);
        let seal_at = bytes.len() as u64;
        encode_seal(&mut bytes, 2, 1, 0);
        let after = bytes.len();
        encode_event(&mut bytes, 3, [None]);
        let torn_at = bytes.len();
        encode_event(&mut bytes, 4, [None]);
        bytes.pop();
        let items: Vec<SegmentItem<'_>> = SegmentReader::new(&bytes, 100).collect();
        let kinds: Vec<(u64, &str)> = items
            .iter()
            .map(|it| {
                let kind = match it {
                    SegmentItem::Event { .. } => "event",
                    SegmentItem::Seal { .. } => "seal",
                    SegmentItem::Torn { .. } => "torn",
                    _ => "other",
                };
                (it.offset(), kind)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (100, "event"),
                (100 + seal_at, "seal"),
                (100 + after as u64, "event"),
                (100 + torn_at as u64, "torn"),
            ]
        );
        assert_eq!(items[3].len(), bytes.len() - torn_at);
    }

    #[test]
    fn a_torn_tail_is_the_last_item_and_not_consumed() {
        let mut bytes = Vec::new();
        encode_event(&mut bytes, 1, [Some(&b"a"[..])]);
        let whole = bytes.len();
        encode_event(&mut bytes, 2, [Some(&b"b"[..])]);
        bytes.truncate(whole + 5);
        let mut reader = SegmentReader::new(&bytes, 40);
        assert!(matches!(
            reader.next(),
            Some(SegmentItem::Event { offset: 40, len, .. }) if len == whole
        ));
        let torn_at = 40 + whole as u64;
        assert_eq!(
            reader.next(),
            Some(SegmentItem::Torn {
                offset: torn_at,
                len: 5
            })
        );
        assert_eq!(reader.next(), None);
        assert_eq!(
            (reader.offset(), reader.consumed(), reader.rest().len()),
            (torn_at, whole, 5)
        );
    }
}
