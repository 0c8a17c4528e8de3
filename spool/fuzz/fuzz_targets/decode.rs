//! Feeds arbitrary bytes to the header and frame decoders: they must never panic, always
//! make progress, and never report a frame that fails to re-encode identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use logtally_spool::{decode_header, encode_event, SegmentItem, SegmentReader};

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(data);
    let mut reader = SegmentReader::new(data, 0);
    let mut last = 0;
    while let Some(item) = reader.next() {
        assert_eq!(item.offset(), last, "items not adjacent");
        assert!(!item.is_empty(), "empty item");
        if let SegmentItem::Torn { len, .. } = item {
            assert_eq!(reader.offset(), last, "torn tail consumed");
            assert_eq!(last as usize + len, data.len(), "torn tail not at the end");
            assert_eq!(reader.next(), None, "item after a torn tail");
            break;
        }
        assert!(reader.offset() > last, "no progress");
        last = reader.offset();
        if let SegmentItem::Event {
            offset,
            len,
            record,
        } = item
        {
            let mut again = Vec::new();
            encode_event(&mut again, record.time_ms, record.values());
            let at = offset as usize;
            assert_eq!(&again[..], &data[at..at + len]);
        }
    }
    assert!(reader.offset() as usize <= data.len());
});
