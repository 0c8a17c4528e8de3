//! Property tests of the spool format: round trips, every truncation point, every flipped
//! bit, and arbitrary bytes.

use logtally_spool::{
    decode_frame, decode_header, encode_drop_marker, encode_event, encode_header, encode_seal,
    Decoded, Frame, ScanItem, SegmentHeader, SegmentScan, MAX_VALUE_LEN,
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
        let mut scan = SegmentScan::new(&bytes);
        let mut got = Vec::new();
        for it in scan.by_ref() {
            match it {
                ScanItem::Frame { frame, .. } => got.push(to_item(frame)),
                ScanItem::Corrupt { offset, len } => prop_assert!(false, "corrupt at {offset} len {len}"),
            }
        }
        prop_assert_eq!(scan.remaining(), 0);
        let want: Vec<Item> = items.iter().map(truncated).collect();
        prop_assert_eq!(got, want);
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
    /// the rest an incomplete tail: never a wrong frame, never corruption.
    #[test]
    fn every_truncation_point_is_a_torn_tail(items in proptest::collection::vec(item(), 1..6)) {
        let bytes = encode(&items);
        let mut ends = Vec::new();
        for it in SegmentScan::new(&bytes) {
            if let ScanItem::Frame { offset, len, .. } = it { ends.push(offset + len); }
        }
        for cut in 0..bytes.len() {
            let mut scan = SegmentScan::new(&bytes[..cut]);
            let mut n = 0;
            for it in scan.by_ref() {
                match it {
                    ScanItem::Frame { frame, .. } => {
                        prop_assert_eq!(to_item(frame), truncated(&items[n]));
                        n += 1;
                    }
                    ScanItem::Corrupt { .. } => prop_assert!(false, "corruption at cut {}", cut),
                }
            }
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            prop_assert_eq!(n, whole, "cut {}", cut);
            prop_assert_eq!(scan.offset(), if whole == 0 { 0 } else { ends[whole - 1] });
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
        for it in SegmentScan::new(&bad) {
            if let ScanItem::Frame { offset, len, frame } = it {
                // Every frame read must be byte-identical to a frame of the good stream.
                prop_assert!(!(offset..offset + len).contains(&pos), "frame over flipped byte accepted");
                prop_assert_eq!(&bad[offset..offset + len], &good[offset..offset + len]);
                frames.push(to_item(frame));
            }
        }
        prop_assert!(frames.len() < items.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_header(&bytes);
        let mut scan = SegmentScan::new(&bytes);
        for _ in scan.by_ref() {}
        prop_assert!(scan.offset() <= bytes.len());
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
    let items: Vec<_> = SegmentScan::new(&out).collect();
    assert!(matches!(items[0], ScanItem::Corrupt { offset: 0, .. }));
    let corrupt: usize = items
        .iter()
        .map(|i| {
            if let ScanItem::Corrupt { len, .. } = i {
                *len
            } else {
                0
            }
        })
        .sum();
    assert_eq!(corrupt, 37);
    assert!(matches!(
        items.last(),
        Some(ScanItem::Frame { offset: 37, .. })
    ));
}
