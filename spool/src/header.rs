//! The segment header: what a reader needs to decode a segment on its own.

use crate::{FORMAT_VERSION, MAGIC, MAX_FIELDS, MAX_FIELD_NAME_LEN};

/// Fixed part of the header before the field list.
const FIXED_LEN: usize = 26;

/// What a segment says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Process id of the nginx worker that wrote the segment.
    pub writer_pid: u32,
    /// When the segment was created, in ms since the Unix epoch.
    pub created_ms: u64,
    /// Field names, in the order every event record carries its values.
    pub fields: Vec<String>,
}

/// Why a header cannot be read. A segment with a bad header cannot be decoded at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a logtally segment (bad magic)")]
    BadMagic,
    #[error("unsupported segment format version {0} (this build reads version {FORMAT_VERSION})")]
    Version(u16),
    #[error("header checksum mismatch")]
    Checksum,
    #[error("malformed header: {0}")]
    Malformed(&'static str),
    #[error("invalid field name {0:?}: 1 to {MAX_FIELD_NAME_LEN} bytes of [A-Za-z0-9_], not starting with a digit")]
    FieldName(String),
    #[error("too many fields: {0} (at most {MAX_FIELDS})")]
    TooManyFields(usize),
}

/// Whether `name` may be a field name: 1 to [`MAX_FIELD_NAME_LEN`] bytes of `[A-Za-z0-9_]`,
/// not starting with a digit (a field name becomes a column name in the sidecar's tables).
/// The one definition of the rule: the header codec checks what it writes and reads with it,
/// the sidecar a rule's field names, the module `logtally_field` names.
pub fn is_valid_field_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FIELD_NAME_LEN
        && !name[0].is_ascii_digit()
        && name.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

impl SegmentHeader {
    /// Checks the field list against the format's limits.
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.fields.len() > MAX_FIELDS {
            return Err(HeaderError::TooManyFields(self.fields.len()));
        }
        match self
            .fields
            .iter()
            .find(|f| !is_valid_field_name(f.as_bytes()))
        {
            Some(bad) => Err(HeaderError::FieldName(bad.clone())),
            None => Ok(()),
        }
    }
}

/// Appends the encoded header to `out`. The header must be valid ([`SegmentHeader::validate`]).
pub fn encode_header(h: &SegmentHeader, out: &mut Vec<u8>) -> Result<(), HeaderError> {
    h.validate()?;
    let start = out.len();
    let len = FIXED_LEN + h.fields.iter().map(|f| 1 + f.len()).sum::<usize>() + 4;
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&h.writer_pid.to_le_bytes());
    out.extend_from_slice(&h.created_ms.to_le_bytes());
    out.extend_from_slice(&(h.fields.len() as u16).to_le_bytes());
    for f in &h.fields {
        out.push(f.len() as u8);
        out.extend_from_slice(f.as_bytes());
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, len);
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Reads a header from the front of `buf`.
///
/// `Ok(None)` means the buffer ends before the header does (a segment just being created):
/// wait for more bytes. `Ok(Some((header, len)))` gives the header and its length in bytes;
/// frames start right after it.
pub fn decode_header(buf: &[u8]) -> Result<Option<(SegmentHeader, usize)>, HeaderError> {
    let have = buf.len().min(MAGIC.len());
    if buf[..have] != MAGIC[..have] {
        return Err(HeaderError::BadMagic);
    }
    if buf.len() < FIXED_LEN {
        return Ok(None);
    }
    let version = u16_at(buf, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version(version));
    }
    let len = usize::from(u16_at(buf, 10));
    if len < FIXED_LEN + 4 {
        return Err(HeaderError::Malformed("header length too small"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[..len - 4];
    let stored = u32::from_le_bytes(buf[len - 4..len].try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != stored {
        return Err(HeaderError::Checksum);
    }
    let writer_pid = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes"));
    let created_ms = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
    let count = usize::from(u16_at(body, 24));
    if count > MAX_FIELDS {
        return Err(HeaderError::TooManyFields(count));
    }
    let mut fields = Vec::with_capacity(count);
    let mut at = FIXED_LEN;
    for _ in 0..count {
        let n = usize::from(
            *body
                .get(at)
                .ok_or(HeaderError::Malformed("field list truncated"))?,
        );
        let name = body
            .get(at + 1..at + 1 + n)
            .ok_or(HeaderError::Malformed("field list truncated"))?;
        if !is_valid_field_name(name) {
            return Err(HeaderError::FieldName(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        let name = String::from_utf8_lossy(name).into_owned();
        fields.push(name);
        at += 1 + n;
    }
    if at != body.len() {
        return Err(HeaderError::Malformed(
            "header length does not match its field list",
        ));
    }
    Ok(Some((
        SegmentHeader {
            writer_pid,
            created_ms,
            fields,
        },
        len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentHeader {
        SegmentHeader {
            writer_pid: 4242,
            created_ms: 1_764_300_000_123,
            fields: vec!["ad".into(), "ev".into(), "status".into()],
        }
    }

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        encode_header(&sample(), &mut out).unwrap();
        let (h, len) = decode_header(&out).unwrap().unwrap();
        assert_eq!(h, sample());
        assert_eq!(len, out.len());
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let mut out = Vec::new();
        encode_header(&sample(), &mut out).unwrap();
        for cut in 0..out.len() {
            assert_eq!(decode_header(&out[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn every_flipped_bit_is_an_error() {
        let mut out = Vec::new();
        encode_header(&sample(), &mut out).unwrap();
        for byte in 0..out.len() {
            for bit in 0..8 {
                let mut bad = out.clone();
                bad[byte] ^= 1 << bit;
                // A flip in the length field may make the header look longer than the
                // buffer: that reads as "incomplete", never as a valid header.
                assert!(
                    !matches!(decode_header(&bad), Ok(Some(_))),
                    "flip at byte {byte} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "1ad", "a-b", "a b", &"x".repeat(64)] {
            let h = SegmentHeader {
                fields: vec![bad.to_string()],
                ..sample()
            };
            assert!(matches!(
                encode_header(&h, &mut Vec::new()),
                Err(HeaderError::FieldName(_))
            ));
        }
    }
}
