//! Model-based property test of the tailer + aggregator + checkpoint cycle.
//!
//! A generated list of actions — append records, append part of a record (a torn tail the
//! writer completes later), start a segment, seal one, kill a writer (its torn tail stays
//! torn), poll, flush (aggregates and positions move together into a model database), crash
//! and restart (all in-memory state dropped, the tailer restarted from the committed
//! positions) — drives the real [`Tailer`] and [`Aggregator`] over real files in a temporary
//! folder. After a final seal, poll and flush, every record written whole must be counted
//! exactly once, and no committed position may ever pass the bytes written.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use logtally::aggregate::{merge_rows, Aggregator, RuleRows};
use logtally::config::{Metric, MetricKind, Rule};
use logtally::spool::liveness::Liveness;
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
    /// The writer dies: its segment never grows again.
    Kill {
        seg: usize,
    },
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
    live: bool,
}

struct Harness {
    dir: tempfile::TempDir,
    rules: Vec<Rule>,
    segs: Vec<ModelSeg>,
    dead: Arc<Mutex<HashSet<u32>>>,
    next_id: u64,
    /// Records written whole (their ids).
    whole: Vec<u64>,
    tailer: Tailer,
    agg: Aggregator,
    /// The model database: committed aggregates and positions.
    db: Vec<RuleRows>,
    committed: Vec<(String, Position)>,
    now: Instant,
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
        let dead = Arc::new(Mutex::new(HashSet::new()));
        let tailer = Self::tailer(dir.path(), &dead, HashMap::new());
        Harness {
            agg: Aggregator::new(&rules),
            rules,
            dir,
            segs: Vec::new(),
            dead,
            next_id: 0,
            whole: Vec::new(),
            tailer,
            db: Vec::new(),
            committed: Vec::new(),
            now: Instant::now(),
        }
    }

    fn tailer(
        dir: &Path,
        dead: &Arc<Mutex<HashSet<u32>>>,
        start: HashMap<String, Position>,
    ) -> Tailer {
        let dead = Arc::clone(dead);
        let options = TailerOptions {
            read_buffer: 0,
            dead_writer_grace: Duration::from_secs(1),
            liveness: Liveness(Arc::new(move |pid| !dead.lock().unwrap().contains(&pid))),
        };
        Tailer::new(dir, start, options)
    }

    fn live(&self) -> Vec<usize> {
        (0..self.segs.len())
            .filter(|&i| self.segs[i].live)
            .collect()
    }

    fn pick(&self, seg: usize) -> Option<usize> {
        let live = self.live();
        (!live.is_empty()).then(|| live[seg % live.len()])
    }

    fn new_segment(&mut self) {
        let pid = 1000 + self.segs.len() as u32;
        let path = self
            .dir
            .path()
            .join(segment_file_name(1_764_300_000_000, pid, 1));
        let mut h = Vec::new();
        let header = SegmentHeader {
            writer_pid: pid,
            created_ms: 1_764_300_000_000,
            fields: vec!["id".into(), "g".into(), "v".into()],
        };
        encode_header(&header, &mut h).unwrap();
        std::fs::write(&path, &h).unwrap();
        let len = h.len() as u64;
        self.segs.push(ModelSeg {
            path,
            pid,
            written: len,
            complete: len,
            pending: None,
            live: true,
        });
    }

    /// Writes the rest of a partial frame, if any.
    fn finish_pending(&mut self, i: usize) {
        let s = &mut self.segs[i];
        if let Some((rest, id)) = s.pending.take() {
            append(&s.path, &rest);
            s.written += rest.len() as u64;
            s.complete = s.written;
            self.whole.push(id);
        }
    }

    fn write_frame(&mut self, i: usize, frame: &[u8]) {
        let s = &mut self.segs[i];
        append(&s.path, frame);
        s.written += frame.len() as u64;
        s.complete = s.written;
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
                    self.whole.push(id);
                }
            }
            Action::Partial { seg, cut } => {
                let Some(i) = self.pick(seg) else { return };
                self.finish_pending(i);
                let id = self.next_id;
                self.next_id += 1;
                let frame = record(id);
                let cut = 1 + cut % (frame.len() - 1);
                let s = &mut self.segs[i];
                append(&s.path, &frame[..cut]);
                s.written += cut as u64;
                s.pending = Some((frame[cut..].to_vec(), id));
            }
            Action::NewSegment => self.new_segment(),
            Action::Seal { seg } => {
                let Some(i) = self.pick(seg) else { return };
                self.seal(i);
            }
            Action::Kill { seg } => {
                let Some(i) = self.pick(seg) else { return };
                self.segs[i].live = false;
                self.dead.lock().unwrap().insert(self.segs[i].pid);
            }
            Action::Poll { budget } => {
                self.poll(budget);
            }
            Action::Flush => self.flush(),
            Action::Crash => {
                let start: HashMap<String, Position> = self.committed.iter().cloned().collect();
                self.tailer = Self::tailer(self.dir.path(), &self.dead, start);
                self.agg = Aggregator::new(&self.rules);
            }
        }
    }

    fn seal(&mut self, i: usize) {
        self.finish_pending(i);
        let mut seal = Vec::new();
        encode_seal(&mut seal, 0, 0, 0);
        self.write_frame(i, &seal);
        self.segs[i].live = false;
    }

    fn poll(&mut self, budget: u64) -> (u64, bool) {
        // Time moves past the grace period between polls, so a killed writer's idle segment
        // is abandoned on the poll after the one that saw its last size.
        self.now += Duration::from_secs(2);
        let agg = &mut self.agg;
        let stats = self
            .tailer
            .poll_at(self.now, budget, &mut |ev| {
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
                p.offset <= s.written,
                "{name}: position {} past {} bytes written",
                p.offset,
                s.written
            );
            if !p.finished {
                assert!(
                    p.offset <= s.complete,
                    "{name}: position {} inside a torn frame",
                    p.offset
                );
            }
            if p.finished && s.live {
                panic!("{name}: finished while its writer is alive and the segment unsealed");
            }
        }
    }

    /// Seals every live segment, reads everything, flushes.
    fn finish(&mut self) {
        for i in self.live() {
            self.seal(i);
        }
        // Abandoning a killed writer's segment needs two polls (one to see its size, one
        // after the grace period); a few extra rounds cover budgets cut mid-segment.
        let mut quiet = 0;
        while quiet < 3 {
            let (bytes, more) = self.poll(u64::MAX);
            quiet = if bytes == 0 && !more { quiet + 1 } else { 0 };
        }
        self.flush();
    }

    fn expected(&self) -> Vec<RuleRows> {
        let mut agg = Aggregator::new(&self.rules);
        let fields: Vec<String> = vec!["id".into(), "g".into(), "v".into()];
        let layout = agg.layout(&fields);
        for &id in &self.whole {
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
    h.new_segment();
    for a in actions {
        h.apply(a);
    }
    h.finish();
    let got = non_empty(h.db.clone());
    let want = non_empty(h.expected());
    assert_eq!(got, want, "database differs from the records written whole");
    // Every id counted exactly once (the first rule groups by id).
    if let Some(by_id) = got.iter().find(|r| r.rule == 0) {
        assert_eq!(by_id.rows.len(), h.whole.len());
    }
    // Everything finished and committed was deleted.
    let left: Vec<_> = std::fs::read_dir(h.dir.path()).unwrap().collect();
    assert!(left.is_empty(), "segments left: {left:?}");
    assert!(h.tailer.positions().is_empty());
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
