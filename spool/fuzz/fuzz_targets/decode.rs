//! Feeds arbitrary bytes to the header and frame decoders: they must never panic, always
//! make progress, and never report a frame that fails to re-encode identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use logtally_spool::{decode_header, encode_event, Frame, ScanItem, SegmentScan};

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(data);
    let mut scan = SegmentScan::new(data);
    let mut last = 0;
    while let Some(item) = scan.next() {
        assert!(scan.offset() > last, "no progress");
        last = scan.offset();
        if let ScanItem::Frame {
            offset,
            len,
            frame: Frame::Event(r),
        } = item
        {
            let mut again = Vec::new();
            encode_event(&mut again, r.time_ms, r.values());
            assert_eq!(&again[..], &data[offset..offset + len]);
        }
    }
    assert!(scan.offset() <= data.len());
});
