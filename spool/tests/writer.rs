//! The segment writer against a real folder: rolling, sealing, reading back; its lock as a
//! reader sees it (live, sealed, abandoned, killed); failed writes on a file system that
//! fills; segments deleted under it.
//!
//! Some tests run a writer in a child process: this test binary again, running only
//! `child_process_helper` with `CHILD_ROLE` set.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use logtally_spool::{
    decode_header, encode_drop_marker, encode_event, is_segment_file_name,
    is_segment_temp_file_name, remove_stale_temp_files, spool_file_system, writer_lock_state,
    AppendError, FileSystemKind, SegmentItem, SegmentReader, SegmentWriter, SegmentWriterConfig,
    WriterLock,
};

const CHILD_ROLE: &str = "LOGTALLY_WRITER_TEST_ROLE";
const CHILD_DIR: &str = "LOGTALLY_WRITER_TEST_DIR";

fn config(dir: &Path, segment_size: u64) -> SegmentWriterConfig {
    SegmentWriterConfig {
        dir: dir.to_path_buf(),
        fields: vec!["ad".into(), "ev".into()],
        segment_size,
        pid: 99,
        fsync: false,
    }
}

/// `n` events whose times are `first..first + n` (the tests' event ids).
fn events(first: u64, n: u64) -> Vec<u8> {
    let mut batch = Vec::new();
    for t in first..first + n {
        encode_event(&mut batch, t, [Some(&b"7"[..]), Some(&b"view"[..])]);
    }
    batch
}

/// What a segment file holds, read independently of the writer.
#[derive(Debug, Default)]
struct Contents {
    /// Event times, in file order.
    times: Vec<u64>,
    /// Sum of drop markers.
    dropped: u64,
    /// The seal's (events, dropped), if sealed.
    seal: Option<(u64, u64)>,
    /// Bytes after the last whole frame.
    torn: usize,
}

fn read_contents(bytes: &[u8]) -> Contents {
    let (header, hlen) = decode_header(bytes)
        .expect("valid header")
        .expect("complete header");
    assert_eq!(header.fields, vec!["ad".to_string(), "ev".to_string()]);
    assert_eq!(header.writer_pid, 99);
    let mut c = Contents::default();
    for item in SegmentReader::new(&bytes[hlen..], hlen as u64) {
        assert!(c.seal.is_none(), "item after seal: {item:?}");
        match item {
            SegmentItem::Event { record, .. } => c.times.push(record.time_ms),
            SegmentItem::Dropped { count, .. } => c.dropped += count,
            SegmentItem::Seal {
                events, dropped, ..
            } => c.seal = Some((events, dropped)),
            SegmentItem::Corrupt { offset, len } => panic!("corrupt: {len} bytes at {offset}"),
            SegmentItem::Torn { len, .. } => c.torn = len,
        }
    }
    c
}

fn read_segment(path: &Path) -> Contents {
    read_contents(&std::fs::read(path).unwrap())
}

/// Segment files in `dir`, by name; fails on anything that is neither a segment nor a
/// temporary file.
fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if is_segment_file_name(&name) {
            paths.push(dir.join(name));
        } else {
            assert!(is_segment_temp_file_name(&name), "stray file {name}");
        }
    }
    paths.sort();
    paths
}

/// A writer that appended events `0..n` into its first segment, that segment's path, and a
/// reader's own descriptor on it.
fn live_writer(dir: &Path, n: u64) -> (SegmentWriter, PathBuf, File) {
    let mut w = SegmentWriter::new(config(dir, 1 << 20)).unwrap();
    w.append(&events(0, n), n, 0, 1).unwrap();
    let path = w.current_path().unwrap().to_path_buf();
    let reader = File::open(&path).unwrap();
    (w, path, reader)
}

fn lock_of(path: &Path) -> WriterLock {
    writer_lock_state(&File::open(path).unwrap()).unwrap()
}

#[test]
fn rolls_at_size_and_seals_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = SegmentWriter::new(SegmentWriterConfig {
        fsync: true,
        ..config(dir.path(), 4096)
    })
    .unwrap();
    let mut sealed = Vec::new();
    for first in (0..1000u64).step_by(10) {
        sealed.extend(w.append(&events(first, 10), 10, 0, 1_000 + first).unwrap());
    }
    w.sync().unwrap();
    sealed.extend(w.seal(5_000).unwrap());
    assert!(w.current_path().is_none());
    assert!(
        sealed.len() > 3,
        "expected several segments, got {}",
        sealed.len()
    );

    let paths = segment_paths(dir.path());
    assert_eq!(paths.len(), sealed.len());
    let mut all = Vec::new();
    for path in &paths {
        let c = read_segment(path);
        assert_eq!(c.torn, 0);
        assert_eq!(c.seal, Some((c.times.len() as u64, 0)));
        assert_eq!(
            std::fs::metadata(path).unwrap().len(),
            sealed.iter().find(|s| &s.path == path).unwrap().bytes
        );
        assert_eq!(lock_of(path), WriterLock::Free);
        all.extend(c.times);
    }
    assert_eq!(all, (0..1000).collect::<Vec<_>>());
}

#[test]
fn the_lock_is_held_while_the_writer_may_append_and_free_once_sealed() {
    let dir = tempfile::tempdir().unwrap();
    // The reader's own descriptor, kept across the writer's life.
    let (mut w, path, reader) = live_writer(dir.path(), 3);
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Held);
    w.sync().unwrap();
    w.append(&events(3, 3), 3, 0, 2).unwrap();
    // Asking twice changes nothing: the reader's probe leaves no lock behind.
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Held);
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Held);
    w.append(&events(6, 3), 3, 0, 3).unwrap();
    let sealed = w.seal(4).unwrap().unwrap();
    assert_eq!(sealed.path, path);
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Free);
    let c = read_segment(&path);
    assert_eq!(c.seal, Some((9, 0)));
    assert_eq!(c.times, (0..9).collect::<Vec<_>>());
}

#[test]
fn dropping_the_writer_unsealed_frees_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (w, path, reader) = live_writer(dir.path(), 5);
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Held);
    drop(w);
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Free);
    let c = read_segment(&path);
    assert_eq!((c.seal, c.torn), (None, 0));
    assert_eq!(c.times, (0..5).collect::<Vec<_>>());
}

#[test]
fn abandoning_frees_the_lock_and_the_next_append_starts_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, first, _) = live_writer(dir.path(), 2);
    w.abandon();
    assert_eq!(lock_of(&first), WriterLock::Free);
    w.append(&events(2, 2), 2, 0, 2).unwrap();
    let second = w.current_path().unwrap().to_path_buf();
    assert_ne!(first, second);
    assert_eq!(lock_of(&second), WriterLock::Held);
    assert_eq!(read_segment(&first).times, vec![0, 1]);
}

/// Runs this test binary as a child doing `role` in `dir`, through `wrapper` (a command
/// line prefix, e.g. a resource limit) if given.
fn spawn_child(role: &str, dir: &Path, wrapper: &[&str]) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let args = ["child_process_helper", "--exact", "--nocapture"];
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(args)
        .env(CHILD_ROLE, role)
        .env(CHILD_DIR, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run the child writer ({wrapper:?}): {e}"))
}

/// The value of the first `key value` line the child prints.
fn child_says(out: &mut impl BufRead, key: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child ended before saying {key}"
        );
        if let Some(v) = line
            .trim_end()
            .strip_prefix(key)
            .and_then(|v| v.strip_prefix(' '))
        {
            return v.to_string();
        }
    }
}

#[test]
fn a_killed_writer_frees_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child("hold", dir.path(), &[]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let path = PathBuf::from(child_says(&mut out, "segment"));
    let reader = File::open(&path).unwrap();
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Held);
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Free);
    let c = read_segment(&path);
    assert_eq!((c.times, c.seal), ((0..4).collect::<Vec<_>>(), None));
}

/// File size limit of the child writer in `a_failed_write_...`: every segment fills up.
const FSIZE_LIMIT: u64 = 16 * 1024;
const FILL_EVENTS: u64 = 5_000;

#[test]
fn a_failed_write_never_shrinks_the_segment_and_every_event_is_stored_or_dropped() {
    let dir = tempfile::tempdir().unwrap();
    // SIGXFSZ ignored (inherited through exec) so writes past the limit fail with EFBIG;
    // prlimit (util-linux) sets RLIMIT_FSIZE in bytes.
    let limit = format!("--fsize={FSIZE_LIMIT}");
    let wrapper = [
        "sh",
        "-c",
        "trap '' XFSZ; exec prlimit \"$0\" -- \"$@\"",
        &limit,
    ];
    let mut child = spawn_child("fill", dir.path(), &wrapper);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let failures: u64 = child_says(&mut out, "failures").parse().unwrap();
    let partial: u64 = child_says(&mut out, "partial").parse().unwrap();
    assert!(child.wait().unwrap().success(), "the child writer failed");
    assert!(failures >= 5, "only {failures} failed writes");
    assert!(partial >= 1, "no write failed halfway through a batch");

    // Truth from the files alone: each event id stored at most once, and stored + dropped
    // markers = sent.
    let mut stored = BTreeSet::new();
    let (mut dropped, mut torn, mut unsealed) = (0, 0, 0);
    for path in segment_paths(dir.path()) {
        assert!(std::fs::metadata(&path).unwrap().len() <= FSIZE_LIMIT);
        let c = read_segment(&path);
        for t in c.times {
            assert!(t < FILL_EVENTS && stored.insert(t), "event {t} twice");
        }
        dropped += c.dropped;
        torn += usize::from(c.torn > 0);
        unsealed += usize::from(c.seal.is_none());
    }
    assert_eq!(stored.len() as u64 + dropped, FILL_EVENTS);
    assert!(dropped > 0 && torn > 0 && unsealed as u64 >= failures);
}

/// The module's accounting, as `ngx-module/src/writer.rs` does it: batches of events with
/// ids `0..`, a drop marker for what earlier failures lost.
#[derive(Debug, Default)]
struct Sender {
    /// Events sent so far (the next id).
    sent: u64,
    /// Dropped events not yet in a marker in the spool.
    carried: u64,
}

impl Sender {
    /// Appends the next `n` events (and a marker for carried drops). On error, checks that
    /// what the error says is in the spool is there, at the end of the abandoned segment,
    /// which is at least as long as before, its lock free.
    fn send(&mut self, w: &mut SegmentWriter, n: u64) -> Result<(), AppendError> {
        let first = self.sent;
        let mut batch = events(first, n);
        self.sent += n;
        if self.carried > 0 {
            encode_drop_marker(&mut batch, self.sent, self.carried);
        }
        let before = w
            .current_path()
            .map(|p| (p.to_path_buf(), std::fs::metadata(p).unwrap().len()));
        let e = match w.append(&batch, n, self.carried, self.sent) {
            Ok(_) => {
                self.carried = 0;
                return Ok(());
            }
            Err(e) => e,
        };
        self.carried = self.carried - e.written.dropped + n - e.written.events;
        assert!(w.current_path().is_none());
        if let Some(abandoned) = &e.abandoned {
            if let Some((path, len)) = before.filter(|(p, _)| p == abandoned) {
                assert!(std::fs::metadata(&path).unwrap().len() >= len, "cut back");
            }
            let kept: Vec<u64> = (first..first + e.written.events).collect();
            assert!(read_segment(abandoned).times.ends_with(&kept), "cut back");
            assert_eq!(lock_of(abandoned), WriterLock::Free);
        }
        Err(e)
    }
}

/// Sends `FILL_EVENTS` under a file size limit; asserts each failed write is EFBIG and the
/// next append goes to a new segment.
fn fill_with_failures(dir: &Path) {
    let mut w = SegmentWriter::new(config(dir, 1 << 20)).unwrap();
    let mut sender = Sender::default();
    let (mut failures, mut partial) = (0u64, 0u64);
    let mut failed_in: Option<PathBuf> = None;
    while sender.sent < FILL_EVENTS || sender.carried > 0 {
        match sender.send(&mut w, 7.min(FILL_EVENTS - sender.sent)) {
            Ok(()) => {
                if let Some(failed) = failed_in.take() {
                    assert_ne!(w.current_path(), Some(failed.as_path()));
                }
            }
            Err(e) => {
                assert_eq!(e.source.raw_os_error(), Some(27), "EFBIG expected: {e}");
                failures += 1;
                partial += u64::from(e.written.events > 0);
                failed_in = Some(e.abandoned.expect("a segment was open"));
            }
        }
    }
    // The seal itself may not fit under the limit: the segment is abandoned then, whole.
    if let Err(e) = w.seal(sender.sent) {
        assert_eq!(e.raw_os_error(), Some(27), "EFBIG expected: {e}");
    }
    println!("failures {failures}");
    println!("partial {partial}");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    fn mount(size: &str) -> SmallTmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallTmpfs(dir)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// What a reader finishes and deletes to make room: segments whose lock is free.
fn read_and_delete_finished(dir: &Path, stored: &mut BTreeSet<u64>, dropped: &mut u64) {
    for path in segment_paths(dir) {
        let file = File::open(&path).unwrap();
        if writer_lock_state(&file).unwrap() == WriterLock::Free {
            let c = read_segment(&path);
            for t in c.times {
                assert!(stored.insert(t), "event {t} twice");
            }
            *dropped += c.dropped;
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[test]
fn a_full_disk_abandons_the_segment_and_writing_resumes_once_a_reader_frees_space() {
    let fs = SmallTmpfs::mount("64k");
    let dir = fs.0.path();
    let mut w = SegmentWriter::new(config(dir, 1 << 20)).unwrap();
    let mut sender = Sender::default();
    let full = loop {
        assert!(sender.sent < 100_000, "a 64 KiB tmpfs never filled");
        if let Err(e) = sender.send(&mut w, 7) {
            break e;
        }
    };
    assert_eq!(
        full.source.raw_os_error(),
        Some(28),
        "ENOSPC expected: {full}"
    );
    let abandoned = full.abandoned.expect("the open segment");
    // Still full: no new segment can start, and none is left half made.
    let e = sender.send(&mut w, 7).unwrap_err();
    assert_eq!((e.abandoned, e.written.events), (None, 0));
    assert_eq!(segment_paths(dir), vec![abandoned.clone()]);
    assert!(
        std::fs::read_dir(dir).unwrap().count() == 1,
        "temporary file left"
    );

    let (mut stored, mut dropped) = (BTreeSet::new(), 0);
    read_and_delete_finished(dir, &mut stored, &mut dropped);
    assert!(!stored.is_empty());
    sender.send(&mut w, 7).unwrap();
    assert_ne!(w.current_path(), Some(abandoned.as_path()));
    w.seal(sender.sent).unwrap();
    read_and_delete_finished(dir, &mut stored, &mut dropped);
    assert!(dropped >= 7, "the failed batches' events are in a marker");
    assert_eq!(stored.len() as u64 + dropped, sender.sent);
}

/// Not a test by itself: the body of the child processes the tests above start.
#[test]
fn child_process_helper() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(CHILD_DIR).unwrap());
    match role.as_str() {
        "hold" => {
            let mut w = SegmentWriter::new(config(&dir, 1 << 20)).unwrap();
            w.append(&events(0, 4), 4, 0, 1).unwrap();
            println!("segment {}", w.current_path().unwrap().display());
            // Live until killed.
            std::io::stdin().read_line(&mut String::new()).unwrap();
            panic!("the parent should have killed this writer");
        }
        "fill" => fill_with_failures(&dir),
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn a_deleted_segment_is_noticed_at_the_first_append_a_second_later() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, first, reader) = live_writer(dir.path(), 2); // at t = 1 ms
    assert!(w.take_unlinked().is_none());
    std::fs::remove_file(&first).unwrap();
    // Within the second: still writing into the deleted file.
    w.append(&events(2, 1), 1, 0, 1_000).unwrap();
    assert!(w.take_unlinked().is_none());
    assert_eq!(w.current_path(), Some(first.as_path()));
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Held);
    w.append(&events(3, 3), 3, 0, 1_001).unwrap();
    let unlinked = w.take_unlinked().expect("deletion noticed");
    assert_eq!((unlinked.count, unlinked.last), (1, first));
    assert!(w.take_unlinked().is_none());
    // The deleted segment was let go; the batch went to a new one.
    assert_eq!(writer_lock_state(&reader).unwrap(), WriterLock::Free);
    let paths = segment_paths(dir.path());
    assert_eq!(paths.len(), 1);
    assert_eq!(w.current_path(), Some(paths[0].as_path()));
    assert_eq!(read_segment(&paths[0]).times, vec![3, 4, 5]);
}

#[test]
fn a_clock_stepping_back_checks_the_link_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = SegmentWriter::new(config(dir.path(), 1 << 20)).unwrap();
    w.append(&events(0, 1), 1, 0, 5_000).unwrap();
    std::fs::remove_file(w.current_path().unwrap()).unwrap();
    w.append(&events(1, 1), 1, 0, 4_999).unwrap();
    assert_eq!(w.take_unlinked().map(|u| u.count), Some(1));
}

#[test]
fn a_deleted_segment_is_noticed_at_the_next_sync_and_not_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = SegmentWriter::new(config(dir.path(), 1 << 20)).unwrap();
    for round in 0..2 {
        w.append(&events(0, 2), 2, 0, 1).unwrap();
        std::fs::remove_file(w.current_path().unwrap()).unwrap();
        w.sync().unwrap();
        assert!(w.current_path().is_none());
        assert_eq!(w.take_unlinked().map(|u| u.count), Some(1), "round {round}");
    }
    w.append(&events(0, 2), 2, 0, 1).unwrap();
    std::fs::remove_file(w.current_path().unwrap()).unwrap();
    assert_eq!(w.seal(2).unwrap(), None);
    assert_eq!(w.take_unlinked().map(|u| u.count), Some(1));
    assert!(segment_paths(dir.path()).is_empty());
}

/// A reader polling the folder while a writer rolls fast never sees a file under a segment
/// name without a whole header, and never sees a segment's lock free before its seal is in.
#[test]
fn a_reader_never_sees_an_unlocked_or_headerless_segment_of_a_live_writer() {
    let dir = tempfile::tempdir().unwrap();
    let done = AtomicBool::new(false);
    let (held, free) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut w = SegmentWriter::new(config(dir.path(), 2048)).unwrap();
            for first in (0..20_000u64).step_by(10) {
                w.append(&events(first, 10), 10, 0, first).unwrap();
                std::thread::yield_now();
            }
            w.seal(0).unwrap();
            done.store(true, Ordering::Release);
        });
        let (mut held, mut free) = (0u64, 0u64);
        while !done.load(Ordering::Acquire) {
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                if !is_segment_file_name(&name) {
                    continue;
                }
                let file = File::open(dir.path().join(&name)).unwrap();
                // Lock first, bytes after: the order a reader must keep.
                let lock = writer_lock_state(&file).unwrap();
                let bytes = std::fs::read(dir.path().join(&name)).unwrap();
                let c = read_contents(&bytes); // panics on a missing header
                match lock {
                    WriterLock::Held => held += 1,
                    WriterLock::Free => {
                        assert!(c.seal.is_some() && c.torn == 0, "{name} free, unsealed");
                        free += 1;
                    }
                }
            }
        }
        (held, free)
    });
    assert!(
        held > 0 && free > 0,
        "saw {held} held, {free} free segments"
    );
    assert!(segment_paths(dir.path()).len() >= 100);
}

#[test]
fn stale_temporary_files_go_and_locked_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join(".1764300000123-7-000001.seg.tmp");
    let live = dir.path().join(".1764300000123-8-000001.seg.tmp");
    let other = dir.path().join("notes.tmp");
    for p in [&stale, &live, &other] {
        std::fs::write(p, b"x").unwrap();
    }
    let holder = File::open(&live).unwrap();
    holder.lock().unwrap();
    assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), 1);
    assert!(!stale.exists() && live.exists() && other.exists());
    // A writer's first segment clears what it can too.
    drop(holder);
    let mut w = SegmentWriter::new(config(dir.path(), 1 << 20)).unwrap();
    w.append(&events(0, 1), 1, 0, 1).unwrap();
    assert!(!live.exists() && other.exists());
}

#[test]
fn the_test_folder_is_on_a_local_file_system() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        spool_file_system(dir.path()).unwrap(),
        FileSystemKind::Local
    );
    spool_file_system(&dir.path().join("missing")).unwrap_err();
}
