//! Reading frames back: complete, torn tail, or corrupt — never confused.

use crate::{
    varint, FRAME_HEADER_LEN, KIND_DROPPED, KIND_EVENT, KIND_SEAL, MAX_FIELDS, MAX_PAYLOAD_LEN,
    MAX_VALUE_LEN,
};

/// One event: its time and its values, in the order of the segment header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Event time, ms since the Unix epoch.
    pub time_ms: u64,
    count: u8,
    values: &'a [u8],
}

impl<'a> Record<'a> {
    /// How many values the record carries (at most the header's field count; fields past
    /// it are absent).
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether the record carries no values.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The values: `None` absent, `Some(bytes)` present (possibly empty).
    pub fn values(&self) -> Values<'a> {
        Values {
            rest: self.values,
            left: self.count,
        }
    }
}

/// Iterator over a [`Record`]'s values. The frame was validated when decoded, so this
/// iterator cannot fail.
#[derive(Debug, Clone)]
pub struct Values<'a> {
    rest: &'a [u8],
    left: u8,
}

impl<'a> Iterator for Values<'a> {
    type Item = Option<&'a [u8]>;

    // Always in line: called out of line, the value comes back through memory, and reading
    // it back as one 16-byte load from two 8-byte stores stalls (no store forwarding).
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Values of up to 127 bytes (nearly all) have a one-byte tag.
        let (tag, used) = match self.rest.first() {
            Some(&b) if b < 0x80 => (u32::from(b), 1),
            _ => varint::get(self.rest).unwrap_or((0, self.rest.len())),
        };
        if tag == 0 {
            self.rest = &self.rest[used..];
            return Some(None);
        }
        let end = used + tag as usize - 1;
        let value = &self.rest[used..end];
        self.rest = &self.rest[end..];
        Some(Some(value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}

impl ExactSizeIterator for Values<'_> {}

/// A complete, checked frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One request's event.
    Event(Record<'a>),
    /// The writer dropped `count` events since its previous marker.
    Dropped { time_ms: u64, count: u64 },
    /// The segment ends here.
    Seal {
        time_ms: u64,
        events: u64,
        dropped: u64,
    },
}

/// The outcome of decoding at one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A complete frame `len` bytes long.
    Frame { frame: Frame<'a>, len: usize },
    /// The bytes so far are the start of a valid frame, or too few to tell: more may come.
    Incomplete,
    /// These bytes are not a frame. Skip `skip` bytes (≥ 1) to the next place a frame may
    /// start, and decode again there.
    Corrupt { skip: usize },
}

/// Reads the declared payload length if the frame header's length check holds.
#[inline]
fn checked_len(buf: &[u8]) -> Option<usize> {
    let len_bytes: [u8; 4] = buf[0..4].try_into().expect("4 bytes");
    let check = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(len_bytes) as usize;
    ((1..=MAX_PAYLOAD_LEN).contains(&len) && crate::length_check(len as u32) == check)
        .then_some(len)
}

/// Whether a frame may start at `buf[0]`, as far as the bytes present can tell.
fn may_start_frame(buf: &[u8]) -> bool {
    if buf.len() < 4 {
        return true;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_PAYLOAD_LEN {
        return false;
    }
    buf.len() < 8 || checked_len(buf).is_some()
}

/// After corruption at `buf[0]`: the distance to the next position where a frame may start.
fn resync(buf: &[u8]) -> usize {
    (1..buf.len())
        .find(|&at| may_start_frame(&buf[at..]))
        .unwrap_or(buf.len().max(1))
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(p[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks an event payload's structure (after the kind byte); `None` when malformed.
fn parse_event(p: &[u8]) -> Option<Record<'_>> {
    if p.len() < 9 {
        return None;
    }
    let time_ms = u64_at(p, 0);
    let count = p[8];
    if usize::from(count) > MAX_FIELDS {
        return None;
    }
    let values = &p[9..];
    let mut at = 0;
    for _ in 0..count {
        let (tag, used) = match values.get(at) {
            Some(&b) if b < 0x80 => (u32::from(b), 1),
            _ => varint::get(&values[at..])?,
        };
        at += used;
        if tag > 0 {
            let len = tag as usize - 1;
            if len > MAX_VALUE_LEN || values.len() - at < len {
                return None;
            }
            at += len;
        }
    }
    (at == values.len()).then_some(Record {
        time_ms,
        count,
        values,
    })
}

fn parse_payload(p: &[u8]) -> Option<Frame<'_>> {
    let (&kind, body) = p.split_first()?;
    match kind {
        KIND_EVENT => parse_event(body).map(Frame::Event),
        KIND_DROPPED if body.len() == 16 => Some(Frame::Dropped {
            time_ms: u64_at(body, 0),
            count: u64_at(body, 8),
        }),
        KIND_SEAL if body.len() == 24 => Some(Frame::Seal {
            time_ms: u64_at(body, 0),
            events: u64_at(body, 8),
            dropped: u64_at(body, 16),
        }),
        _ => None,
    }
}

/// Decodes the frame at the front of `buf` (which starts at a frame boundary).
#[inline]
pub fn decode_frame(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < FRAME_HEADER_LEN {
        return if may_start_frame(buf) {
            Decoded::Incomplete
        } else {
            Decoded::Corrupt { skip: resync(buf) }
        };
    }
    let Some(len) = checked_len(buf) else {
        return Decoded::Corrupt { skip: resync(buf) };
    };
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return Decoded::Incomplete;
    }
    let payload = &buf[FRAME_HEADER_LEN..total];
    let crc = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if crc32c::crc32c(payload) != crc {
        return Decoded::Corrupt { skip: resync(buf) };
    }
    match parse_payload(payload) {
        Some(frame) => Decoded::Frame { frame, len: total },
        None => Decoded::Corrupt { skip: resync(buf) },
    }
}
