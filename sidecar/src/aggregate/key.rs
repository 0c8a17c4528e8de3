//! The encoded aggregate key: the bucket (8 bytes, little-endian) then per dim a u16
//! little-endian length and the dim's text. Keys sit back to back in an arena; these
//! functions write, compare and read them without a per-key allocation.

use std::cmp::Ordering;

use super::KeyRef;

/// Appends a dim to the key: u16 length, then the value as UTF-8 without NULs.
#[inline]
pub(super) fn push_dim(key: &mut Vec<u8>, text: &mut String, raw: &[u8]) {
    let clean = raw.iter().all(|&c| c != 0 && c < 0x80);
    let bytes: &[u8] = if clean {
        raw
    } else {
        text.clear();
        text.push_str(&String::from_utf8_lossy(raw));
        text.retain(|c| c != '\0');
        text.as_bytes()
    };
    // A value is at most MAX_VALUE_LEN (4096) bytes; replacement characters may triple that,
    // still far below u16::MAX.
    key.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    key.extend_from_slice(bytes);
}

/// Byte equality of two short slices (keys, dims) compared a word at a time in line,
/// rather than through a `memcmp` call.
#[inline]
pub(crate) fn short_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails_equal = wa
        .remainder()
        .iter()
        .zip(wb.remainder())
        .all(|(x, y)| x == y);
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("8 bytes"));
    tails_equal && wa.zip(wb).all(|(x, y)| word(x) == word(y))
}

pub(super) fn key_bytes<'a>(arena: &'a [u8], k: &KeyRef) -> &'a [u8] {
    &arena[k.off as usize..(k.off + k.len) as usize]
}

/// The dims of an encoded key (after its 8 bucket bytes).
fn key_dims(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 8;
    std::iter::from_fn(move || {
        if at >= key.len() {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([key[at], key[at + 1]]));
        let dim = &key[at + 2..at + 2 + len];
        at += 2 + len;
        Some(dim)
    })
}

/// Orders encoded keys as their decoded `(bucket_ms, dims)` compare (UTF-8 text compares as
/// its bytes), without decoding them.
pub(super) fn cmp_keys(a: &[u8], b: &[u8]) -> Ordering {
    let bucket = |k: &[u8]| i64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
    bucket(a)
        .cmp(&bucket(b))
        .then_with(|| key_dims(a).cmp(key_dims(b)))
}

pub(super) fn decode_key(key: &[u8]) -> (i64, Vec<String>) {
    let bucket = i64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
    let dims = key_dims(key)
        .map(|d| {
            std::str::from_utf8(d)
                .expect("keys hold normalised text")
                .to_owned()
        })
        .collect();
    (bucket, dims)
}

#[cfg(test)]
mod tests {
    use super::short_eq;

    #[test]
    fn short_eq_is_slice_equality() {
        let base: Vec<u8> = (0..40u8).collect();
        for len in 0..=base.len() {
            let a = &base[..len];
            assert!(short_eq(a, a));
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] ^= 1;
                assert!(!short_eq(a, &b), "len {len}, byte {at}");
            }
            assert!(!short_eq(a, &base[..len.saturating_sub(1)]) || len == 0);
        }
    }
}
