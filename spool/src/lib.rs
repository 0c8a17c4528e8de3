//! The logtally spool: the one place where the on-disk format lives.
//!
//! The nginx module appends records with [`encode_event`] and friends and writes segment
//! files with [`SegmentWriter`]; the sidecar reads them back with [`decode_header`] and a
//! [`SegmentReader`] (which walks frames with [`decode_frame`]). `FORMAT.md` beside this
//! crate specifies every byte; the constants and functions here are its executable form.
//!
//! Decoding is pure (bytes in, frames out, no I/O) and tells three outcomes apart that a
//! tailing reader must never confuse: a complete frame, a torn tail (more bytes may still
//! come: wait), and corruption (skip the reported number of bytes and go on).

mod decode;
mod dir;
mod encode;
mod header;
mod lock;
mod reader;
mod varint;
mod writer;

pub use decode::{decode_frame, Decoded, Frame, Record, Values};
pub use dir::sync_dir;
pub use encode::{encode_drop_marker, encode_event, encode_seal, EncodedEvent};
pub use header::{decode_header, encode_header, is_valid_field_name, HeaderError, SegmentHeader};
pub use lock::{
    classify_file_system, spool_file_system, writer_lock_state, FileSystemKind, WriterLock,
};
pub use reader::{SegmentItem, SegmentReader};
pub use writer::{
    is_segment_file_name, segment_file_name, SegmentWriter, SegmentWriterConfig, WrittenSegment,
};
pub use writer::{
    is_segment_temp_file_name, remove_stale_temp_files, AppendError, FrameCounts, UnlinkedSegments,
};

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"LTSPOOL\0";
/// Format version written into every header; readers refuse any other.
pub const FORMAT_VERSION: u16 = 1;
/// File name extension of segment files.
pub const SEGMENT_EXTENSION: &str = "seg";
/// Longest value a record carries; longer values are cut to their first `MAX_VALUE_LEN` bytes.
pub const MAX_VALUE_LEN: usize = 4096;
/// Most fields a segment header may declare.
pub const MAX_FIELDS: usize = 64;
/// Longest field name, in bytes.
pub const MAX_FIELD_NAME_LEN: usize = 63;
/// Bytes of a frame header: payload length, length check, payload CRC.
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest payload a valid frame may declare. An event with every field at the maximum
/// length fits: 1 + 8 + 1 + MAX_FIELDS * (2 + MAX_VALUE_LEN) = 262,282 bytes.
pub const MAX_PAYLOAD_LEN: usize = 320 * 1024;

/// The length check stored after a frame's length: a bijection of the length (so any change
/// to the length alone, or to the check alone, is caught) that costs one multiply.
#[inline]
pub(crate) fn length_check(len: u32) -> u32 {
    len.wrapping_mul(0x9E37_79B1) ^ 0x5350_4F4C
}

/// Payload kind byte: one request's event.
pub const KIND_EVENT: u8 = 1;
/// Payload kind byte: the writer dropped events (its queue was full or a write failed).
pub const KIND_DROPPED: u8 = 2;
/// Payload kind byte: the segment is sealed; no byte follows this frame.
pub const KIND_SEAL: u8 = 3;
