//! LEB128 unsigned varints, used for value lengths.

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub(crate) fn put(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint from the front of `buf`: `(value, bytes used)`, or `None` when the buffer
/// ends inside it or it is longer than 5 bytes or overflows 32 bits.
#[inline]
pub(crate) fn get(buf: &[u8]) -> Option<(u32, usize)> {
    let mut v: u32 = 0;
    for (i, &b) in buf.iter().enumerate().take(5) {
        let part = u32::from(b & 0x7f);
        if i == 4 && part > 0x0f {
            return None;
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            // Only the shortest encoding is valid, so every value has exactly one.
            if i > 0 && b == 0 {
                return None;
            }
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_edges() {
        for v in [0u32, 1, 127, 128, 255, 4096, 16383, 16384, u32::MAX] {
            let mut out = Vec::new();
            put(&mut out, v);
            assert_eq!(get(&out), Some((v, out.len())));
            assert_eq!(get(&out[..out.len() - 1]), None);
        }
    }

    #[test]
    fn rejects_overlong() {
        assert_eq!(get(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]), None);
        assert_eq!(get(&[0xff, 0xff, 0xff, 0xff, 0x1f]), None);
        assert_eq!(get(&[0x81, 0x00]), None);
    }
}
