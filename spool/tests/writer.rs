//! The segment writer against a real folder: rolling, sealing, reading back.

use logtally_spool::{
    decode_header, encode_event, is_segment_file_name, Frame, ScanItem, SegmentScan, SegmentWriter,
    SegmentWriterConfig,
};

fn read_segment(path: &std::path::Path) -> (Vec<u64>, Option<(u64, u64)>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let (header, hlen) = decode_header(&bytes).unwrap().unwrap();
    assert_eq!(header.fields, vec!["ad".to_string(), "ev".to_string()]);
    assert_eq!(header.writer_pid, 99);
    let mut times = Vec::new();
    let mut seal = None;
    let mut scan = SegmentScan::new(&bytes[hlen..]);
    for it in scan.by_ref() {
        match it {
            ScanItem::Frame {
                frame: Frame::Event(r),
                ..
            } => {
                assert!(seal.is_none(), "frame after seal");
                times.push(r.time_ms);
            }
            ScanItem::Frame {
                frame: Frame::Seal {
                    events, dropped, ..
                },
                ..
            } => seal = Some((events, dropped)),
            other => panic!("unexpected {other:?}"),
        }
    }
    (times, seal, scan.remaining())
}

#[test]
fn rolls_at_size_and_seals_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = SegmentWriter::new(SegmentWriterConfig {
        dir: dir.path().to_path_buf(),
        fields: vec!["ad".into(), "ev".into()],
        segment_size: 4096,
        pid: 99,
        fsync: true,
    })
    .unwrap();
    let mut sealed = Vec::new();
    let mut batch = Vec::new();
    for t in 0..1000u64 {
        encode_event(&mut batch, t, [Some(&b"7"[..]), Some(&b"view"[..])]);
        if t % 10 == 9 {
            sealed.extend(w.append(&batch, 10, 0, 1_000 + t).unwrap());
            batch.clear();
        }
    }
    w.sync().unwrap();
    sealed.extend(w.seal(5_000).unwrap());
    assert!(w.current_path().is_none());
    assert!(
        sealed.len() > 3,
        "expected several segments, got {}",
        sealed.len()
    );

    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), sealed.len());
    let mut all = Vec::new();
    for name in &names {
        assert!(is_segment_file_name(name), "{name}");
        let path = dir.path().join(name);
        let (times, seal, rest) = read_segment(&path);
        assert_eq!(rest, 0);
        assert_eq!(seal, Some((times.len() as u64, 0)));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            sealed.iter().find(|s| s.path == path).unwrap().bytes
        );
        all.extend(times);
    }
    assert_eq!(all, (0..1000).collect::<Vec<_>>());
}
