//! Appending frames to a caller's buffer. Nothing here allocates beyond the caller's
//! `Vec` growing, so the nginx module can call it on the request path.

use crate::{
    varint, FRAME_HEADER_LEN, KIND_DROPPED, KIND_EVENT, KIND_SEAL, MAX_FIELDS, MAX_VALUE_LEN,
};

/// What [`encode_event`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedEvent {
    /// Bytes appended (frame header + payload).
    pub frame_len: usize,
    /// How many values were longer than [`MAX_VALUE_LEN`] and cut.
    pub truncated: u32,
}

/// Reserves the frame header, returns where the frame starts.
#[inline]
fn begin(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    out.push(kind);
    start
}

/// Fills in the frame header now that the payload is in place.
#[inline]
fn finish(out: &mut [u8], start: usize) -> usize {
    let payload_start = start + FRAME_HEADER_LEN;
    let len = (out.len() - payload_start) as u32;
    let len_bytes = len.to_le_bytes();
    let len_check = crate::length_check(len);
    let crc = crc32c::crc32c(&out[payload_start..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&len_check.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Appends one event frame: the event time and one value per field, in header order.
///
/// `None` is an absent value (the variable was not found); `Some(b"")` is an empty one.
/// Values longer than [`MAX_VALUE_LEN`] bytes are cut to their first `MAX_VALUE_LEN` bytes;
/// values past the [`MAX_FIELDS`]th are ignored (a valid header never declares more).
pub fn encode_event<'v, I>(out: &mut Vec<u8>, time_ms: u64, values: I) -> EncodedEvent
where
    I: IntoIterator<Item = Option<&'v [u8]>>,
{
    let start = begin(out, KIND_EVENT);
    out.extend_from_slice(&time_ms.to_le_bytes());
    let count_at = out.len();
    out.push(0);
    let mut count = 0u8;
    let mut truncated = 0u32;
    for value in values.into_iter().take(MAX_FIELDS) {
        count += 1;
        match value {
            None => out.push(0),
            Some(v) => {
                let v = if v.len() > MAX_VALUE_LEN {
                    truncated += 1;
                    &v[..MAX_VALUE_LEN]
                } else {
                    v
                };
                varint::put(out, v.len() as u32 + 1);
                out.extend_from_slice(v);
            }
        }
    }
    out[count_at] = count;
    let frame_len = finish(out, start);
    EncodedEvent {
        frame_len,
        truncated,
    }
}

/// Appends a marker saying the writer dropped `count` events since its previous marker.
pub fn encode_drop_marker(out: &mut Vec<u8>, time_ms: u64, count: u64) -> usize {
    let start = begin(out, KIND_DROPPED);
    out.extend_from_slice(&time_ms.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    finish(out, start)
}

/// Appends the seal: the last frame of a segment, with the number of event frames and of
/// dropped events the segment recorded. Nothing may be written after it.
pub fn encode_seal(out: &mut Vec<u8>, time_ms: u64, events: u64, dropped: u64) -> usize {
    let start = begin(out, KIND_SEAL);
    out.extend_from_slice(&time_ms.to_le_bytes());
    out.extend_from_slice(&events.to_le_bytes());
    out.extend_from_slice(&dropped.to_le_bytes());
    finish(out, start)
}
