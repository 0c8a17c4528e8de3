//! Model-based property test of the tailer + aggregator + checkpoint cycle.
//!
//! A generated list of actions — append records, append part of a record (a torn tail the
//! writer completes later), start a segment, seal one, kill a writer (its lock goes, its torn
//! tail stays torn), abandon after a failed write (part of a frame, then the lock goes),
//! truncate a segment by hand, delete one by hand, start a segment under a pid an earlier
//! writer had (pid reuse, another pid namespace), step the clock back (the next segment's
//! name sorts before older ones), poll, flush (aggregates and positions move together into
//! a model database), crash and restart (all in-memory state dropped, the tailer restarted
//! from the committed positions) — drives the real [`Tailer`] and [`Aggregator`] over real
//! files in a temporary folder, each live writer holding its segment's lock as the module
//! does. After a final seal, poll and flush: every record written whole is counted exactly
//! once, except those a truncation or deletion took (counted at most once); no committed
//! position ever passes the bytes written, nor is a segment whose lock is held finished.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use logtally::aggregate::{merge_rows, Aggregator, MetricValue, RuleRows};
use logtally::config::{Metric, MetricKind, Rule};
use logtally::spool::tail::{Position, SegmentEvent, Tailer, TailerOptions};
use logtally_spool::{encode_event, encode_header, encode_seal, segment_file_name, SegmentHeader};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Action {
    /// Append `n` whole records to live segment `seg % live`.
    Append {
        seg: usize,
        n: usize,
    },
    /// Append a record's first `cut % len` bytes (at least one); the rest comes later.
    Partial {
        seg: usize,
        cut: usize,
    },
    NewSegment,
    Seal {
        seg: usize,
    },
    /// The writer dies: its lock goes, its segment never grows again.
    Kill {
        seg: usize,
    },
    /// A write fails part way: a frame's first `cut % len` bytes reach the file, then the
    /// writer abandons the segment (its lock goes; the record is dropped, not counted).
    Abandon {
        seg: usize,
        cut: usize,
    },
    /// Cut by hand to `cut % written` bytes (the writer, seeing it, lets go).
    Truncate {
        seg: usize,
        cut: usize,
    },
    /// Removed by hand (the writer, seeing it, lets go).
    Delete {
        seg: usize,
    },
    /// A new segment whose writer pid is an earlier writer's.
    PidReuse {
        of: usize,
    },
    /// The clock steps back: the next segment's name sorts before the existing ones.
    ClockStep,
    Poll {
        budget: u64,
    },
    Flush,
    Crash,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (any::<usize>(), 1usize..6).prop_map(|(seg, n)| Action::Append { seg, n }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(seg, cut)| Action::Partial { seg, cut }),
        1 => Just(Action::NewSegment),
        1 => any::<usize>().prop_map(|seg| Action::Seal { seg }),
        1 => any::<usize>().prop_map(|seg| Action::Kill { seg }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(seg, cut)| Action::Abandon { seg, cut }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(seg, cut)| Action::Truncate { seg, cut }),
        1 => any::<usize>().prop_map(|seg| Action::Delete { seg }),
        1 => any::<usize>().prop_map(|of| Action::PidReuse { of }),
        1 => Just(Action::ClockStep),
        3 => prop_oneof![Just(60u64), Just(300), Just(u64::MAX)].prop_map(|budget| Action::Poll { budget }),
        2 => Just(Action::Flush),
        1 => Just(Action::Crash),
    ]
}

fn rules() -> Vec<Rule> {
    let metric = Metric::new;
    vec![
        Rule {
            filter: None,
            table: "by_id".into(),
            bucket: Duration::from_secs(60),
            group_by: vec!["id".into()],
            metrics: vec![metric("n", MetricKind::Count)],
        },
        Rule {
            filter: None,
            table: "by_g".into(),
            bucket: Duration::from_secs(3600),
            group_by: vec!["g".into()],
            metrics: vec![
                metric("n", MetricKind::Count),
                metric("s", MetricKind::Sum("v".into())),
                metric("hi", MetricKind::Max("v".into())),
            ],
        },
    ]
}

/// One segment as the model's writer sees it.
struct ModelSeg {
    path: PathBuf,
    pid: u32,
    /// Bytes in the file.
    written: u64,
    /// End of the last whole frame (header included).
    complete: u64,
    /// The rest of a partially written frame, and its record id.
    pending: Option<(Vec<u8>, u64)>,
    /// The writer's lock, held while it may append (the module's flock).
    lock: Option<File>,
    /// Truncated or deleted by hand: its records count at most once.
    damaged: bool,
    /// Deleted by hand: none of its records must count.
    deleted: bool,
    /// Most bytes the file ever held (a truncation cuts `written`, not what was read).
    high_water: u64,
}

impl ModelSeg {
    fn live(&self) -> bool {
        self.lock.is_some()
    }
}

struct Harness {
    dir: tempfile::TempDir,
    rules: Vec<Rule>,
    segs: Vec<ModelSeg>,
    next_id: u64,
    /// Records written whole: id, segment index, end offset.
    whole: Vec<(u64, usize, u64)>,
    /// The next segment's name time (ms); a clock step moves it back.
    clock_ms: u64,
    tailer: Tailer,
    agg: Aggregator,
    /// The model database: committed aggregates and positions.
    db: Vec<RuleRows>,
    committed: Vec<(String, Position)>,
}

fn record(id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let (ids, g, v) = (
        id.to_string(),
        (id % 3).to_string(),
        format!("{}.{:02}", id % 7, id % 100),
    );
    encode_event(
        &mut out,
        1_764_300_000_000 + id * 7_000,
        [Some(ids.as_bytes()), Some(g.as_bytes()), Some(v.as_bytes())],
    );
    out
}

fn append(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let rules = rules();
        let tailer = Self::tailer(dir.path(), HashMap::new());
        Harness {
            agg: Aggregator::new(&rules),
            rules,
            dir,
            segs: Vec::new(),
            next_id: 0,
            whole: Vec::new(),
            clock_ms: 1_764_300_000_000,
            tailer,
            db: Vec::new(),
            committed: Vec::new(),
        }
    }

    fn tailer(dir: &Path, start: HashMap<String, Position>) -> Tailer {
        Tailer::new(dir, start, TailerOptions { read_buffer: 0 })
    }

    fn live(&self) -> Vec<usize> {
        (0..self.segs.len())
            .filter(|&i| self.segs[i].live())
            .collect()
    }

    fn pick(&self, seg: usize) -> Option<usize> {
        let live = self.live();
        (!live.is_empty()).then(|| live[seg % live.len()])
    }

    /// A new segment as the module makes one: locked, header whole, then named.
    fn new_segment(&mut self, pid: u32) {
        let ms = self.clock_ms;
        self.clock_ms += 1000;
        let seq = self.segs.len() as u64 + 1;
        let path = self.dir.path().join(segment_file_name(ms, pid, seq));
        let mut h = Vec::new();
        let header = SegmentHeader {
            writer_pid: pid,
            created_ms: ms,
            fields: vec!["id".into(), "g".into(), "v".into()],
        };
        encode_header(&header, &mut h).unwrap();
        let tmp = self.dir.path().join(".new.tmp");
        let mut file = File::create(&tmp).unwrap();
        file.lock().unwrap();
        file.write_all(&h).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let len = h.len() as u64;
        self.segs.push(ModelSeg {
            path,
            pid,
            written: len,
            complete: len,
            pending: None,
            lock: Some(file),
            damaged: false,
            deleted: false,
            high_water: len,
        });
    }

    fn next_pid(&self) -> u32 {
        1000 + self.segs.len() as u32
    }

    /// Writes the rest of a partial frame, if any.
    fn finish_pending(&mut self, i: usize) {
        let s = &mut self.segs[i];
        if let Some((rest, id)) = s.pending.take() {
            append(&s.path, &rest);
            s.written += rest.len() as u64;
            s.high_water = s.high_water.max(s.written);
            s.complete = s.written;
            self.whole.push((id, i, s.written));
        }
    }

    fn write_frame(&mut self, i: usize, frame: &[u8]) {
        let s = &mut self.segs[i];
        append(&s.path, frame);
        s.written += frame.len() as u64;
        s.high_water = s.high_water.max(s.written);
        s.complete = s.written;
    }

    /// Appends a frame's first bytes, the rest coming later (or never).
    fn write_part(&mut self, i: usize, cut: usize) -> (Vec<u8>, u64) {
        self.finish_pending(i);
        let id = self.next_id;
        self.next_id += 1;
        let frame = record(id);
        let cut = 1 + cut % (frame.len() - 1);
        let s = &mut self.segs[i];
        append(&s.path, &frame[..cut]);
        s.written += cut as u64;
        s.high_water = s.high_water.max(s.written);
        (frame[cut..].to_vec(), id)
    }

    fn apply(&mut self, a: &Action) {
        match *a {
            Action::Append { seg, n } => {
                let Some(i) = self.pick(seg) else { return };
                self.finish_pending(i);
                for _ in 0..n {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.write_frame(i, &record(id));
                    self.whole.push((id, i, self.segs[i].written));
                }
            }
            Action::Partial { seg, cut } => {
                let Some(i) = self.pick(seg) else { return };
                let pending = self.write_part(i, cut);
                self.segs[i].pending = Some(pending);
            }
            Action::Abandon { seg, cut } => {
                let Some(i) = self.pick(seg) else { return };
                self.write_part(i, cut);
                self.segs[i].lock = None;
            }
            Action::Truncate { seg, cut } => {
                let Some(i) = self.pick(seg) else { return };
                let s = &mut self.segs[i];
                let cut = cut as u64 % s.written;
                OpenOptions::new()
                    .write(true)
                    .open(&s.path)
                    .unwrap()
                    .set_len(cut)
                    .unwrap();
                s.written = cut;
                s.complete = s.complete.min(cut);
                s.pending = None;
                s.damaged = true;
                s.lock = None;
            }
            Action::Delete { seg } => {
                let Some(i) = self.pick(seg) else { return };
                let s = &mut self.segs[i];
                std::fs::remove_file(&s.path).unwrap();
                s.pending = None;
                s.damaged = true;
                s.deleted = true;
                s.lock = None;
            }
            Action::PidReuse { of } => {
                let pid = self.segs[of % self.segs.len()].pid;
                self.new_segment(pid);
            }
            Action::ClockStep => {
                self.clock_ms -= 3_600_000;
                let pid = self.next_pid();
                self.new_segment(pid);
            }
            Action::NewSegment => {
                let pid = self.next_pid();
                self.new_segment(pid);
            }
            Action::Seal { seg } => {
                let Some(i) = self.pick(seg) else { return };
                self.seal(i);
            }
            Action::Kill { seg } => {
                let Some(i) = self.pick(seg) else { return };
                self.segs[i].lock = None;
            }
            Action::Poll { budget } => {
                self.poll(budget);
            }
            Action::Flush => self.flush(),
            Action::Crash => {
                let start: HashMap<String, Position> = self.committed.iter().cloned().collect();
                self.tailer = Self::tailer(self.dir.path(), start);
                self.agg = Aggregator::new(&self.rules);
            }
        }
    }

    fn seal(&mut self, i: usize) {
        self.finish_pending(i);
        let mut seal = Vec::new();
        encode_seal(&mut seal, 0, 0, 0);
        self.write_frame(i, &seal);
        self.segs[i].lock = None;
    }

    fn poll(&mut self, budget: u64) -> (u64, bool) {
        let agg = &mut self.agg;
        let stats = self
            .tailer
            .poll(budget, &mut |ev| {
                if let SegmentEvent::Record {
                    segment, record, ..
                } = ev
                {
                    agg.add_cached(segment.id, &segment.header.fields, &record);
                }
            })
            .unwrap();
        (stats.bytes, stats.more)
    }

    fn flush(&mut self) {
        let rows = self.agg.drain();
        let positions = self.tailer.positions();
        self.check_positions(&positions);
        let db = std::mem::take(&mut self.db);
        self.db = merge_rows(&self.rules, db.into_iter().chain(rows));
        self.committed = positions;
        self.tailer
            .remove_finished(&self.committed, SystemTime::now(), Duration::ZERO);
    }

    fn check_positions(&self, positions: &[(String, Position)]) {
        for (name, p) in positions {
            let s = self
                .segs
                .iter()
                .find(|s| s.path.file_name().unwrap() == name.as_str())
                .unwrap_or_else(|| panic!("unknown segment {name}"));
            assert!(
                p.offset <= s.high_water,
                "{name}: position {} past {} bytes written",
                p.offset,
                s.high_water
            );
            if !p.finished && !s.damaged {
                assert!(
                    p.offset <= s.complete,
                    "{name}: position {} inside a torn frame",
                    p.offset
                );
            }
            if p.finished && s.live() {
                panic!("{name}: finished while its writer is alive and the segment unsealed");
            }
        }
    }

    /// Seals every live segment, reads everything, flushes.
    fn finish(&mut self) {
        for i in self.live() {
            self.seal(i);
        }
        // A few extra rounds cover budgets cut mid-segment.
        let mut quiet = 0;
        while quiet < 3 {
            let (bytes, more) = self.poll(u64::MAX);
            quiet = if bytes == 0 && !more { quiet + 1 } else { 0 };
        }
        self.flush();
    }

    /// Records that must count once: written whole and not taken by a truncation before
    /// their end, nor in a segment deleted by hand.
    fn must_count(&self) -> HashSet<u64> {
        self.whole
            .iter()
            .filter(|&&(_, i, end)| {
                let s = &self.segs[i];
                !s.deleted && end <= s.written
            })
            .map(|&(id, ..)| id)
            .collect()
    }

    fn expected(&self, ids: impl IntoIterator<Item = u64>) -> Vec<RuleRows> {
        let mut agg = Aggregator::new(&self.rules);
        let fields: Vec<String> = vec!["id".into(), "g".into(), "v".into()];
        let layout = agg.layout(&fields);
        for id in ids {
            let bytes = record(id);
            match logtally_spool::decode_frame(&bytes) {
                logtally_spool::Decoded::Frame {
                    frame: logtally_spool::Frame::Event(r),
                    ..
                } => agg.add(&layout, &r),
                other => panic!("{other:?}"),
            }
        }
        agg.drain()
    }
}

fn non_empty(rows: Vec<RuleRows>) -> Vec<RuleRows> {
    rows.into_iter().filter(|r| !r.rows.is_empty()).collect()
}

fn run(actions: &[Action]) {
    let mut h = Harness::new();
    let pid = h.next_pid();
    h.new_segment(pid);
    for a in actions {
        h.apply(a);
    }
    h.finish();
    let got = non_empty(h.db.clone());
    // The ids counted (the first rule groups by id), each exactly once.
    let mut counted: Vec<u64> = Vec::new();
    for row in got.iter().filter(|r| r.rule == 0).flat_map(|r| &r.rows) {
        assert_eq!(
            row.metrics,
            vec![MetricValue::Count(1)],
            "{row:?} counted twice"
        );
        counted.push(row.dims[0].parse().unwrap());
    }
    let whole: HashSet<u64> = h.whole.iter().map(|&(id, ..)| id).collect();
    let must = h.must_count();
    for id in &counted {
        assert!(
            whole.contains(id),
            "record {id} counted but never written whole"
        );
    }
    let counted_set: HashSet<u64> = counted.iter().copied().collect();
    let missing: Vec<_> = must.difference(&counted_set).collect();
    assert!(
        missing.is_empty(),
        "records written whole but not counted: {missing:?}"
    );
    // The other rule agrees with exactly the counted records.
    counted.sort_unstable();
    let want = non_empty(h.expected(counted));
    assert_eq!(got, want, "database differs from the records counted");
    // Everything finished and committed was deleted; only segments cut below what was
    // read stay (left for an operator).
    let damaged: HashSet<PathBuf> = h
        .segs
        .iter()
        .filter(|s| s.damaged)
        .map(|s| s.path.clone())
        .collect();
    let left: Vec<_> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !damaged.contains(p))
        .collect();
    assert!(left.is_empty(), "segments left: {left:?}");
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=5000 for a longer run.
    #[test]
    fn every_whole_record_counts_exactly_once(actions in prop::collection::vec(action(), 0..60)) {
        run(&actions);
    }
}

#[test]
fn crash_between_poll_and_flush_rereads() {
    use Action::*;
    run(&[
        Append { seg: 0, n: 3 },
        Poll { budget: u64::MAX },
        Crash,
        Partial { seg: 0, cut: 5 },
        Poll { budget: u64::MAX },
        Flush,
        Append { seg: 0, n: 1 },
        NewSegment,
        Kill { seg: 1 },
        Poll { budget: 60 },
        Flush,
        Crash,
        Poll { budget: u64::MAX },
    ]);
}

#[test]
fn faults_of_real_deployments() {
    use Action::*;
    run(&[
        Append { seg: 0, n: 3 },
        PidReuse { of: 0 },
        Append { seg: 1, n: 2 },
        Poll { budget: u64::MAX },
        Abandon { seg: 0, cut: 4 },
        ClockStep,
        Append { seg: 1, n: 2 },
        Poll { budget: 60 },
        Flush,
        Truncate { seg: 0, cut: 70 },
        Poll { budget: u64::MAX },
        NewSegment,
        Append { seg: 1, n: 2 },
        Delete { seg: 1 },
        Poll { budget: u64::MAX },
        Flush,
        Crash,
        Poll { budget: u64::MAX },
    ]);
}

#[test]
fn killed_writer_with_torn_tail() {
    use Action::*;
    run(&[
        Append { seg: 0, n: 2 },
        Partial { seg: 0, cut: 9 },
        Kill { seg: 0 },
        Poll { budget: 300 },
        Flush,
    ]);
}
