//! Unit tests of the tailer over real files in a temporary folder.

use super::*;
use logtally_spool::{
    encode_drop_marker, encode_event, encode_header, encode_seal, segment_file_name,
};
use std::io::Write;

/// A pid no process can have (above Linux's pid_max limit).
const DEAD_PID: u32 = 4_000_000_000;

/// Takes the writer lock of the segment at `path` (creating it empty if needed), as a live
/// writer holds it; dropping the file lets it go, as a dying writer's kernel does.
fn hold(path: &Path) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.lock().unwrap();
    f
}

fn header(pid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let h = SegmentHeader {
        writer_pid: pid,
        created_ms: 1,
        fields: vec!["ad".into(), "n".into()],
    };
    encode_header(&h, &mut out).unwrap();
    out
}

fn event(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let v = n.to_string();
    encode_event(&mut out, 1000 + n, [Some(&b"7"[..]), Some(v.as_bytes())]);
    out
}

fn append(path: &Path, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// Segment 1 of this process in `dir` with `bytes` after its header, its lock held: its
/// name, path and the writer's locked file.
fn live_segment(dir: &Path, bytes: &[u8]) -> (String, PathBuf, std::fs::File) {
    let me = std::process::id();
    let name = segment_file_name(1, me, 1);
    let path = dir.join(&name);
    let writer = hold(&path);
    append(&path, &[&header(me)[..], bytes].concat());
    (name, path, writer)
}

struct Got {
    events: Vec<(String, u64)>,
    other: Vec<String>,
}

fn poll(t: &mut Tailer, budget: u64) -> (Got, PollStats) {
    let mut got = Got {
        events: Vec::new(),
        other: Vec::new(),
    };
    let stats = t
        .poll(budget, &mut |ev| match ev {
            SegmentEvent::Record {
                segment, record, ..
            } => {
                let n = record.values().nth(1).flatten().unwrap();
                got.events.push((
                    segment.name.to_string(),
                    std::str::from_utf8(n).unwrap().parse().unwrap(),
                ));
            }
            SegmentEvent::Dropped { count, .. } => got.other.push(format!("dropped {count}")),
            SegmentEvent::Sealed { events, .. } => got.other.push(format!("sealed {events}")),
            SegmentEvent::Corrupt { offset, len, .. } => {
                got.other.push(format!("corrupt {offset}+{len}"))
            }
            SegmentEvent::Abandoned { torn_bytes, .. } => {
                got.other.push(format!("abandoned {torn_bytes}"))
            }
        })
        .unwrap();
    (got, stats)
}

fn opts() -> TailerOptions {
    TailerOptions { read_buffer: 0 }
}

#[test]
fn reads_follows_and_seals() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let a = segment_file_name(1, me, 1);
    let b = segment_file_name(2, me + 1, 1);
    let pa = dir.path().join(&a);
    let pb = dir.path().join(&b);
    let hlen = header(me).len() as u64;
    let _wa = hold(&pa);
    let _wb = hold(&pb);
    append(&pa, &header(me));
    append(&pa, &[event(1), event(2)].concat());
    append(&pb, &header(me));
    std::fs::write(dir.path().join("notes.txt"), b"not a segment").unwrap();
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let (got, ps) = poll(&mut t, u64::MAX);
    assert_eq!(got.events, vec![(a.clone(), 1), (a.clone(), 2)]);
    assert_eq!(ps.events, 2);
    assert!(!ps.more);
    let e = event(1).len() as u64;
    assert_eq!(
        t.positions(),
        vec![
            (
                a.clone(),
                Position {
                    offset: hlen + 2 * e,
                    finished: false
                }
            ),
            (
                b.clone(),
                Position {
                    offset: hlen,
                    finished: false
                }
            ),
        ]
    );
    assert_eq!(t.segments_open(), 2);
    // Growth is followed; drop markers and the seal are delivered.
    let mut more = event(3);
    encode_drop_marker(&mut more, 5, 4);
    encode_seal(&mut more, 6, 3, 4);
    append(&pa, &more);
    append(&pb, &event(9));
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events, vec![(a.clone(), 3), (b.clone(), 9)]);
    assert_eq!(got.other, vec!["dropped 4", "sealed 3"]);
    let size_a = std::fs::metadata(&pa).unwrap().len();
    assert_eq!(
        t.positions()[0],
        (
            a.clone(),
            Position {
                offset: size_a,
                finished: true
            }
        )
    );
    let s = t.stats();
    assert_eq!(
        (
            s.events,
            s.drop_markers,
            s.dropped_events,
            s.sealed_segments
        ),
        (4, 1, 4, 1)
    );
    assert_eq!(t.segments_open(), 1);
    // Nothing new: nothing delivered.
    let (got, ps) = poll(&mut t, u64::MAX);
    assert!(got.events.is_empty() && got.other.is_empty());
    assert_eq!(ps, PollStats::default());
}

#[test]
fn torn_tail_waits_then_completes() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let a = segment_file_name(1, me, 1);
    let pa = dir.path().join(&a);
    let e2 = event(2);
    let _w = hold(&pa);
    append(&pa, &[header(me), event(1), e2[..5].to_vec()].concat());
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events.len(), 1);
    let before = t.positions()[0].1;
    assert_eq!(before.offset, (header(me).len() + event(1).len()) as u64);
    // Polling again at the same torn tail counts the wait once; a live writer is waited for.
    poll(&mut t, u64::MAX);
    assert_eq!(t.stats().torn_tail_waits, 1);
    assert_eq!(t.positions()[0].1, before);
    append(&pa, &e2[5..]);
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events, vec![(a, 2)]);
    assert_eq!(t.stats().corrupt_bytes, 0);
}

#[test]
fn header_written_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let pa = dir.path().join(segment_file_name(1, me, 1));
    let h = header(me);
    let _w = hold(&pa);
    append(&pa, &h[..10]);
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    poll(&mut t, u64::MAX);
    assert!(t.positions().is_empty());
    append(&pa, &[&h[10..], &event(1)[..]].concat());
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events.len(), 1);
}

#[test]
fn corruption_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let a = segment_file_name(1, me, 1);
    let pa = dir.path().join(&a);
    let mut bad = event(2);
    let last = bad.len() - 1;
    bad[last] ^= 0xff; // payload CRC no longer holds
    append(
        &pa,
        &[
            header(me),
            event(1),
            bad.clone(),
            b"garbage!".to_vec(),
            event(3),
            vec![0xee; 20],
            event(4),
        ]
        .concat(),
    );
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(
        got.events,
        vec![(a.clone(), 1), (a.clone(), 3), (a.clone(), 4)]
    );
    let s = t.stats();
    assert_eq!(s.corrupt_bytes, (bad.len() + 8 + 20) as u64);
    assert_eq!(s.corrupt_occurrences, 2, "{:?}", got.other);
    assert_eq!(
        t.positions()[0].1.offset,
        std::fs::metadata(&pa).unwrap().len()
    );
}

#[test]
fn bad_header_is_skipped_once() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let mut h = header(me);
    h[0] = b'X';
    append(
        &dir.path().join(segment_file_name(1, me, 1)),
        &[h, event(1)].concat(),
    );
    let good = segment_file_name(2, me, 2);
    append(&dir.path().join(&good), &[header(me), event(5)].concat());
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let (got, _) = poll(&mut t, u64::MAX);
    poll(&mut t, u64::MAX);
    assert_eq!(got.events, vec![(good.clone(), 5)]);
    assert_eq!(t.stats().bad_headers, 1);
    assert_eq!(t.positions().len(), 1);
    assert!(t.segments().iter().any(|s| s.bad_header));
}

#[test]
fn restart_resumes_without_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let (a, pa, _w) = live_segment(dir.path(), &[event(1), event(2)].concat());
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    poll(&mut t, u64::MAX);
    let committed: HashMap<String, Position> = t.positions().into_iter().collect();
    drop(t);
    append(&pa, &event(3));
    let mut t = Tailer::new(dir.path(), committed, opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events, vec![(a, 3)]);
}

#[test]
fn budget_splits_reading() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let a = segment_file_name(1, me, 1);
    let pa = dir.path().join(&a);
    let body: Vec<u8> = (0..100).flat_map(event).collect();
    append(&pa, &[header(me), body].concat());
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let mut all = Vec::new();
    let mut polls = 0;
    loop {
        let (got, ps) = poll(&mut t, 200);
        all.extend(got.events.into_iter().map(|(_, n)| n));
        polls += 1;
        if !ps.more {
            break;
        }
    }
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert!(polls > 10, "{polls}");
}

#[test]
fn free_lock_finishes_at_the_end_held_lock_never() {
    let dir = tempfile::tempdir().unwrap();
    let a = segment_file_name(1, DEAD_PID, 1);
    let pa = dir.path().join(&a);
    let e2 = event(2);
    // The name's pid is no process (another pid namespace, hidepid, a reused pid: the pid
    // says nothing); the lock is held: a live writer, however long it stays quiet.
    let writer = hold(&pa);
    append(
        &pa,
        &[header(DEAD_PID), event(1), e2[..7].to_vec()].concat(),
    );
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events.len(), 1);
    for _ in 0..5 {
        let (got, _) = poll(&mut t, u64::MAX);
        assert!(got.other.is_empty(), "{:?}", got.other);
    }
    assert!(
        !t.positions()[0].1.finished,
        "a held lock is never finished"
    );
    // The writer dies: the kernel lets its lock go. Finished on the next poll.
    drop(writer);
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.other, vec!["abandoned 7"]);
    let size = std::fs::metadata(&pa).unwrap().len();
    assert_eq!(
        t.positions(),
        vec![(
            a,
            Position {
                offset: size,
                finished: true
            }
        )]
    );
    let s = t.stats();
    assert_eq!((s.abandoned_segments, s.abandoned_bytes), (1, 7));
}

#[test]
fn live_pid_with_free_lock_is_finished() {
    // This process is alive, but holds no lock on the segment (a reused pid, a writer that
    // abandoned it after a failed write): finished once read to its end.
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let old = segment_file_name(1, me, 1);
    append(&dir.path().join(&old), &[header(me), event(1)].concat());
    let new = segment_file_name(2, me, 2);
    let _w = hold(&dir.path().join(&new));
    append(&dir.path().join(&new), &[header(me), event(2)].concat());
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events, vec![(old.clone(), 1), (new.clone(), 2)]);
    assert_eq!(got.other, vec!["abandoned 0"]);
    let pos = t.positions();
    assert!(pos[0].1.finished && !pos[1].1.finished, "{pos:?}");
}

#[test]
fn shorter_than_read_is_a_fault_never_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let (a, pa, _w) = live_segment(dir.path(), &[event(1), event(2)].concat());
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert_eq!(got.events.len(), 2);
    let read = t.positions()[0].1;
    // Cut by hand into the middle of event 2, then grown again past the old position.
    let cut = (header(me).len() + event(1).len() + 3) as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pa)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let (got, _) = poll(&mut t, u64::MAX);
    assert!(got.events.is_empty() && got.other.is_empty());
    assert_eq!(t.stats().truncated_segments, 1);
    append(&pa, &[event(3), event(4)].concat());
    let (got, _) = poll(&mut t, u64::MAX);
    assert!(
        got.events.is_empty() && got.other.is_empty(),
        "not read again"
    );
    assert_eq!(t.stats().truncated_segments, 1, "counted once");
    assert_eq!(t.positions(), vec![(a.clone(), read)], "position kept");
    assert_eq!(t.segments_open(), 0);
    // A restart that finds the checkpoint past the end says the same.
    drop(t);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pa)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let start = HashMap::from([(a.clone(), read)]);
    let mut t = Tailer::new(dir.path(), start, opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert!(got.events.is_empty() && got.other.is_empty());
    assert_eq!(t.stats().truncated_segments, 1);
    assert_eq!(t.positions(), vec![(a, read)]);
}

#[test]
fn remove_finished_needs_commit_and_retain() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let a = segment_file_name(1, me, 1);
    let b = segment_file_name(2, me + 1, 1);
    let mut sealed = [header(me), event(1)].concat();
    encode_seal(&mut sealed, 1, 1, 0);
    append(&dir.path().join(&a), &sealed);
    let _w = hold(&dir.path().join(&b));
    append(&dir.path().join(&b), &[header(me), event(1)].concat());
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    poll(&mut t, u64::MAX);
    let pos = t.positions();
    let now = SystemTime::now();
    // Not committed yet (an older position): kept.
    let stale = vec![(
        a.clone(),
        Position {
            offset: 10,
            finished: false,
        },
    )];
    assert!(t.remove_finished(&stale, now, Duration::ZERO).is_empty());
    // Committed, but retain has not passed.
    assert!(t
        .remove_finished(&pos, now, Duration::from_secs(3600))
        .is_empty());
    assert!(dir.path().join(&a).exists());
    // Committed and old enough; the unfinished segment stays.
    let later = now + Duration::from_secs(7200);
    assert_eq!(
        t.remove_finished(&pos, later, Duration::from_secs(3600)),
        vec![a.clone()]
    );
    assert!(!dir.path().join(&a).exists());
    assert!(dir.path().join(&b).exists());
    assert_eq!(t.positions().len(), 1);
    assert_eq!(t.stats().deleted_segments, 1);
}

#[test]
fn positions_before_the_first_poll_are_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let start = HashMap::from([(
        "1-2-000003.seg".to_string(),
        Position {
            offset: 40,
            finished: false,
        },
    )]);
    let mut t = Tailer::new(dir.path(), start.clone(), opts());
    assert_eq!(t.positions(), start.into_iter().collect::<Vec<_>>());
    // The segment does not exist: forgotten once the folder was read.
    poll(&mut t, u64::MAX);
    assert!(t.positions().is_empty());
}

#[test]
fn frames_and_corruption_across_buffer_refills() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let a = segment_file_name(1, me, 1);
    let big = vec![b'v'; 4000];
    let frame = |n: u64| {
        let mut out = Vec::new();
        encode_event(&mut out, n, [Some(&b"7"[..]), Some(&big[..])]);
        out
    };
    // The buffer is raised to twice the largest frame; put garbage across its end.
    let buffer = 2 * (FRAME_HEADER_LEN + MAX_PAYLOAD_LEN);
    let mut file = header(me);
    let mut n = 0;
    while file.len() + frame(0).len() < buffer - 50 {
        file.extend(frame(n));
        n += 1;
    }
    file.extend(vec![0xab; 100]);
    let before = n;
    while file.len() < 3 * buffer {
        file.extend(frame(n));
        n += 1;
    }
    append(&dir.path().join(&a), &file);
    let mut t = Tailer::new(dir.path(), HashMap::new(), opts());
    let mut times = Vec::new();
    t.poll(u64::MAX, &mut |ev| {
        if let SegmentEvent::Record { record, .. } = ev {
            times.push(record.time_ms);
        }
    })
    .unwrap();
    assert!(before > 100 && n > before + 300, "{before} {n}");
    assert_eq!(times, (0..n).collect::<Vec<_>>());
    let s = t.stats();
    assert_eq!((s.corrupt_bytes, s.corrupt_occurrences), (100, 1));
    assert_eq!(t.positions()[0].1.offset, file.len() as u64);
}

#[test]
fn finished_at_start_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let a = segment_file_name(1, me, 1);
    append(&dir.path().join(&a), &[header(me), event(1)].concat());
    let start = HashMap::from([(
        a.clone(),
        Position {
            offset: 5,
            finished: true,
        },
    )]);
    let mut t = Tailer::new(dir.path(), start, opts());
    let (got, _) = poll(&mut t, u64::MAX);
    assert!(got.events.is_empty());
    assert_eq!(
        t.positions(),
        vec![(
            a,
            Position {
                offset: 5,
                finished: true
            }
        )]
    );
}
