//! What the writer's lock and link checks cost: appending batches through `SegmentWriter`
//! (a batch per 100 ms flush, so a link check every tenth) against plain `write`s of the same
//! batches, and creating a segment
//! (temporary name, lock, header, link, unlink, seal) against create + header + seal into a
//! plain file. Rounds alternate so the machine's noise hits both alike; ratios are per round.
//!
//! Run: `cargo bench -p logtally-spool --bench writer` (on tmpfs at /dev/shm when there is
//! one, so the numbers are system calls, not a disk).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use logtally_spool::{
    encode_event, encode_header, SegmentHeader, SegmentWriter, SegmentWriterConfig,
};

const BATCHES: usize = 20_000;
const EVENTS_PER_BATCH: u64 = 100;
const SEGMENTS: usize = 2_000;
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn config(dir: &Path, segment_size: u64) -> SegmentWriterConfig {
    SegmentWriterConfig {
        dir: dir.to_path_buf(),
        fields: vec!["ad".into(), "ev".into(), "bytes".into()],
        segment_size,
        pid: 1,
        fsync: false,
    }
}

/// ns per batch appended through the writer, one batch per 100 ms of its clock.
fn writer_appends(dir: &Path, batch: &[u8]) -> f64 {
    let mut w = SegmentWriter::new(config(dir, u64::MAX)).unwrap();
    let t = Instant::now();
    for i in 0..BATCHES {
        w.append(batch, EVENTS_PER_BATCH, 0, i as u64 * 100)
            .unwrap();
    }
    let ns = t.elapsed().as_nanos() as f64 / BATCHES as f64;
    w.seal(0).unwrap();
    ns
}

/// ns per batch written with plain `write`s.
fn plain_appends(dir: &Path, batch: &[u8]) -> f64 {
    let path = dir.join("plain");
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .unwrap();
    let t = Instant::now();
    for _ in 0..BATCHES {
        f.write_all(batch).unwrap();
    }
    t.elapsed().as_nanos() as f64 / BATCHES as f64
}

/// ns per `metadata()` (statx) of the big file `plain_appends` wrote: the link check.
fn statx_alone(dir: &Path) -> f64 {
    let f = std::fs::File::open(dir.join("plain")).unwrap();
    let t = Instant::now();
    for _ in 0..BATCHES {
        std::hint::black_box(f.metadata().unwrap());
    }
    t.elapsed().as_nanos() as f64 / BATCHES as f64
}

/// ns per segment: each one-event batch fills a segment, so every append creates and seals one.
fn writer_segments(dir: &Path, event: &[u8]) -> f64 {
    let mut w = SegmentWriter::new(config(dir, 1)).unwrap();
    let t = Instant::now();
    for i in 0..SEGMENTS {
        w.append(event, 1, 0, i as u64).unwrap();
    }
    t.elapsed().as_nanos() as f64 / SEGMENTS as f64
}

/// ns per plain file created with a header, one event and a seal-sized frame, then closed.
fn plain_segments(dir: &Path, header: &[u8], event: &[u8]) -> f64 {
    let t = Instant::now();
    for i in 0..SEGMENTS {
        let mut f = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(dir.join(format!("plain-{i}")))
            .unwrap();
        f.write_all(header).unwrap();
        f.write_all(event).unwrap();
        f.write_all(&[0u8; 37]).unwrap();
    }
    t.elapsed().as_nanos() as f64 / SEGMENTS as f64
}

fn clear(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
}

fn main() {
    let base = Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let fs = logtally_spool::spool_file_system(dir.path()).unwrap();
    let mut batch = Vec::new();
    for i in 0..EVENTS_PER_BATCH {
        encode_event(
            &mut batch,
            1_764_300_000_000 + i,
            [Some(&b"4711"[..]), Some(&b"view"[..]), Some(&b"1234"[..])],
        );
    }
    let mut event = Vec::new();
    encode_event(&mut event, 1, [Some(&b"4711"[..]), None, None]);
    let mut header = Vec::new();
    let h = SegmentHeader {
        writer_pid: 1,
        created_ms: 0,
        fields: config(dir.path(), 0).fields,
    };
    encode_header(&h, &mut header).unwrap();

    let (mut appends, mut segments, mut statxs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Which goes first alternates: the second one's file grows in memory the first freed.
        let (w, p) = if round % 2 == 0 {
            (
                writer_appends(dir.path(), &batch),
                plain_appends(dir.path(), &batch),
            )
        } else {
            let p = plain_appends(dir.path(), &batch);
            (writer_appends(dir.path(), &batch), p)
        };
        statxs.push(statx_alone(dir.path()));
        clear(dir.path());
        let ws = writer_segments(dir.path(), &event);
        clear(dir.path());
        let ps = plain_segments(dir.path(), &header, &event);
        clear(dir.path());
        appends.push((w, p, w / p));
        segments.push((ws, ps, ws / ps));
    }
    println!(
        "spool writer on {} ({fs:?}), median of {ROUNDS} rounds",
        dir.path().display()
    );
    println!("| work | SegmentWriter ns | plain ns | ratio |");
    println!("|---|---|---|---|");
    for (name, runs) in [
        (
            format!(
                "append a {}-byte batch ({EVENTS_PER_BATCH} events)",
                batch.len()
            ),
            appends,
        ),
        ("create + seal a segment".to_string(), segments),
    ] {
        let w = median(runs.iter().map(|r| r.0).collect());
        let p = median(runs.iter().map(|r| r.1).collect());
        let ratio = median(runs.iter().map(|r| r.2).collect());
        println!("| {name} | {w:.0} | {p:.0} | {ratio:.2}x |");
    }
    println!(
        "| statx of an open {} MB file (the link check, at most once a second) | {:.0} | | |",
        BATCHES * batch.len() / 1_000_000,
        median(statxs)
    );
}
