//! Property tests of the spool format: round trips, every truncation point, every flipped
//! bit, and arbitrary bytes; and the v1 fixture, a segment made once from FORMAT.md.

use logtally_spool::{
    decode_frame, decode_header, encode_drop_marker, encode_event, encode_header, encode_seal,
    Decoded, Frame, SegmentHeader, SegmentItem, SegmentReader, MAX_VALUE_LEN,
};
use proptest::prelude::*;

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Event(u64, Vec<Option<Vec<u8>>>),
    Dropped(u64, u64),
    Seal(u64, u64, u64),
}

fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        6 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Some),
        1 => proptest::collection::vec(any::<u8>(), 100..5000).prop_map(Some),
    ]
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        8 => (any::<u64>(), proptest::collection::vec(value(), 0..8)).prop_map(|(t, v)| Item::Event(t, v)),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(t, n)| Item::Dropped(t, n)),
        1 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(t, e, d)| Item::Seal(t, e, d)),
    ]
}

fn encode(items: &[Item]) -> Vec<u8> {
    let mut out = Vec::new();
    for it in items {
        match it {
            Item::Event(t, vals) => {
                encode_event(&mut out, *t, vals.iter().map(|v| v.as_deref()));
            }
            Item::Dropped(t, n) => {
                encode_drop_marker(&mut out, *t, *n);
            }
            Item::Seal(t, e, d) => {
                encode_seal(&mut out, *t, *e, *d);
            }
        }
    }
    out
}

/// The frames a reader finds in `bytes` (from file offset 0), or what else it found first.
fn frames(bytes: &[u8]) -> Result<Vec<Item>, String> {
    let mut got = Vec::new();
    for it in SegmentReader::new(bytes, 0) {
        match it.frame() {
            Some(frame) => got.push(to_item(frame)),
            None => return Err(format!("{it:?}")),
        }
    }
    Ok(got)
}

fn to_item(frame: Frame<'_>) -> Item {
    match frame {
        Frame::Event(r) => Item::Event(
            r.time_ms,
            r.values().map(|v| v.map(<[u8]>::to_vec)).collect(),
        ),
        Frame::Dropped { time_ms, count } => Item::Dropped(time_ms, count),
        Frame::Seal {
            time_ms,
            events,
            dropped,
        } => Item::Seal(time_ms, events, dropped),
    }
}

/// What the writer promises to store for an item: values cut to the limit.
fn truncated(item: &Item) -> Item {
    match item {
        Item::Event(t, vals) => Item::Event(
            *t,
            vals.iter()
                .map(|v| v.as_ref().map(|v| v[..v.len().min(MAX_VALUE_LEN)].to_vec()))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn field_name() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,62}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip(items in proptest::collection::vec(item(), 0..20)) {
        let bytes = encode(&items);
        let want: Vec<Item> = items.iter().map(truncated).collect();
        prop_assert_eq!(frames(&bytes), Ok(want));
    }

    #[test]
    fn headers_round_trip(pid in any::<u32>(), created in any::<u64>(),
                          fields in proptest::collection::vec(field_name(), 0..64)) {
        let h = SegmentHeader { writer_pid: pid, created_ms: created, fields };
        let mut out = Vec::new();
        encode_header(&h, &mut out).unwrap();
        let (back, len) = decode_header(&out).unwrap().unwrap();
        prop_assert_eq!(back, h);
        prop_assert_eq!(len, out.len());
    }

    /// Cutting a valid stream anywhere leaves the whole frames before the cut readable and
    /// the rest a torn tail: never a wrong frame, never corruption.
    #[test]
    fn every_truncation_point_is_a_torn_tail(items in proptest::collection::vec(item(), 1..6)) {
        let bytes = encode(&items);
        let ends: Vec<u64> = SegmentReader::new(&bytes, 0).map(|it| it.offset() + it.len() as u64).collect();
        for cut in 0..bytes.len() {
            let mut reader = SegmentReader::new(&bytes[..cut], 0);
            let mut n = 0;
            let mut torn = None;
            for it in reader.by_ref() {
                prop_assert!(torn.is_none(), "an item after the torn tail at cut {}", cut);
                match it {
                    SegmentItem::Torn { offset, len } => torn = Some((offset, len)),
                    SegmentItem::Corrupt { .. } => prop_assert!(false, "corruption at cut {}", cut),
                    frame => {
                        prop_assert_eq!(to_item(frame.frame().unwrap()), truncated(&items[n]));
                        n += 1;
                    }
                }
            }
            let whole = ends.iter().filter(|&&e| e <= cut as u64).count();
            prop_assert_eq!(n, whole, "cut {}", cut);
            let end = if whole == 0 { 0 } else { ends[whole - 1] };
            prop_assert_eq!(reader.offset(), end);
            let want = (end < cut as u64).then(|| (end, cut - end as usize));
            prop_assert_eq!(torn, want, "cut {}", cut);
        }
    }

    /// A single flipped bit anywhere is never read as a valid frame in its place: the
    /// damaged frame is reported corrupt (or, for a flip in a length, possibly incomplete),
    /// and the frames after it are still found.
    #[test]
    fn a_flipped_bit_is_detected(items in proptest::collection::vec(item(), 1..5),
                                 at in any::<proptest::sample::Index>(), bit in 0u8..8) {
        let good = encode(&items);
        let pos = at.index(good.len());
        let mut bad = good.clone();
        bad[pos] ^= 1 << bit;
        let mut frames = Vec::new();
        for it in SegmentReader::new(&bad, 0) {
            if let Some(frame) = it.frame() {
                let (offset, len) = (it.offset() as usize, it.len());
                // Every frame read must be byte-identical to a frame of the good stream.
                prop_assert!(!(offset..offset + len).contains(&pos), "frame over flipped byte accepted");
                prop_assert_eq!(&bad[offset..offset + len], &good[offset..offset + len]);
                frames.push(to_item(frame));
            }
        }
        prop_assert!(frames.len() < items.len());
    }

    /// Garbage never panics, and every item but a torn tail consumes bytes: the items tile
    /// the buffer from the start offset on, and a torn tail covers the rest exactly.
    #[test]
    fn arbitrary_bytes_are_tiled_by_items(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                                          start in any::<u32>()) {
        let _ = decode_header(&bytes);
        let start = u64::from(start);
        let mut reader = SegmentReader::new(&bytes, start);
        let mut at = start;
        for it in reader.by_ref() {
            prop_assert_eq!(it.offset(), at);
            prop_assert!(!it.is_empty());
            at += it.len() as u64;
        }
        prop_assert_eq!(at, start + bytes.len() as u64);
        prop_assert!(reader.offset() <= at);
    }
}

#[test]
fn absent_empty_and_long_values_are_distinct() {
    let long = vec![b'x'; MAX_VALUE_LEN + 10];
    let mut out = Vec::new();
    let info = encode_event(
        &mut out,
        7,
        [
            None,
            Some(&b""[..]),
            Some(&long[..]),
            Some(&b"\xff\x00"[..]),
        ],
    );
    assert_eq!(info.truncated, 1);
    assert_eq!(info.frame_len, out.len());
    let Decoded::Frame {
        frame: Frame::Event(r),
        len,
    } = decode_frame(&out)
    else {
        panic!("no frame")
    };
    assert_eq!(len, out.len());
    let vals: Vec<_> = r.values().collect();
    assert_eq!(
        vals,
        vec![
            None,
            Some(&b""[..]),
            Some(&long[..MAX_VALUE_LEN]),
            Some(&b"\xff\x00"[..])
        ]
    );
}

#[test]
fn zeros_are_corrupt_not_frames() {
    // A crash can leave zero-filled blocks at a file's end.
    let zeros = [0u8; 64];
    assert!(matches!(decode_frame(&zeros), Decoded::Corrupt { .. }));
}

#[test]
fn resync_finds_the_next_frame_after_garbage() {
    let mut out = vec![0xAB; 37];
    encode_event(&mut out, 1, [Some(&b"a"[..])]);
    let items: Vec<_> = SegmentReader::new(&out, 1000).collect();
    assert!(matches!(
        items[0],
        SegmentItem::Corrupt { offset: 1000, .. }
    ));
    let corrupt: usize = items
        .iter()
        .map(|i| match i {
            SegmentItem::Corrupt { len, .. } => *len,
            _ => 0,
        })
        .sum();
    assert_eq!(corrupt, 37);
    assert!(matches!(
        items.last(),
        Some(SegmentItem::Event { offset: 1037, .. })
    ));
}

/// The v1 fixture: a sealed segment written once by `fixtures/make_v1.py` from FORMAT.md
/// alone. Its bytes are read back value by value, and the encoder must make them again, so
/// a change to both the encoder and the decoder cannot pass unnoticed.
#[test]
fn v1_fixture_decodes_to_its_known_values() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/v1.seg"
    ))
    .expect("fixture");
    assert_eq!(bytes.len(), 442);
    assert_eq!(&bytes[..10], b"LTSPOOL\0\x01\x00", "magic and version 1");

    let header = SegmentHeader {
        writer_pid: 4242,
        created_ms: 1_764_300_000_123,
        fields: ["ad", "ev", "status", "ua"].map(String::from).into(),
    };
    let (got, header_len) = decode_header(&bytes).unwrap().unwrap();
    assert_eq!((got, header_len), (header.clone(), 46));

    let long = [b'x'; 200];
    fn v(s: &[u8]) -> Option<Vec<u8>> {
        Some(s.to_vec())
    }
    let want: Vec<(u64, usize, Item)> = vec![
        (
            46,
            45,
            Item::Event(
                1_764_300_000_200,
                vec![v(b"7"), v(b"view"), v(b"200"), v(b"Mozilla/5.0")],
            ),
        ),
        (
            91,
            28,
            Item::Event(1_764_300_000_201, vec![None, v(b""), v(b"404")]),
        ),
        (
            119,
            235,
            Item::Event(
                1_764_300_000_202,
                vec![v(b"\xff\x00a"), v(b"click"), None, v(&long)],
            ),
        ),
        (354, 29, Item::Dropped(1_764_300_000_300, 3)),
        (383, 22, Item::Event(1_764_300_000_301, vec![])),
        (405, 37, Item::Seal(1_764_300_000_400, 4, 3)),
    ];
    let mut reader = SegmentReader::new(&bytes[header_len..], header_len as u64);
    let got: Vec<(u64, usize, Item)> = reader
        .by_ref()
        .map(|it| {
            let frame = it.frame().unwrap_or_else(|| panic!("not a frame: {it:?}"));
            (it.offset(), it.len(), to_item(frame))
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(reader.offset(), bytes.len() as u64);

    // The encoder makes the same bytes from the same values.
    let mut again = Vec::new();
    encode_header(&header, &mut again).unwrap();
    for (_, _, item) in &want {
        again.extend(encode(std::slice::from_ref(item)));
    }
    assert_eq!(again, bytes);
}
