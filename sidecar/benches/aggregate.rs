//! Decode + aggregate rate on one core, beside a memchr newline count over the same bytes
//! (the least work any line-based log reader does).
//!
//! Builds an in-memory spool of 10 M typical ad events (time + ad, ev, cmp, bytes, rt, uid and
//! two more fields, about 110 bytes a frame), then times: decoding every frame with the spool
//! crate and adding it to an [`Aggregator`], plus a drain, for two rules in the same run:
//! - plain, the rule of the design sketch: `group_by = ["ad", "ev", "cmp"]`, count,
//!   sum(bytes), max(rt), 1 m buckets;
//! - with sketches, the issue-12 rule: `group_by = ["ad", "cmp"]`, count, two conditional
//!   counts (`count where ev = 'view'`, `… = 'click'`), `distinct(uid)` (1 M users) and
//!   `quantiles(rt)`, 1 m buckets;
//!
//! and prints both rates (per wall and per CPU second) and their ratio.
//!
//! Run: `cargo bench -p logtally --bench aggregate` (`LOGTALLY_BENCH_EVENTS=1000000` for a
//! quicker run, `LOGTALLY_BENCH_ONLY=sketches` to time the issue-12 rule alone, e.g. under
//! `perf record`, and `LOGTALLY_BENCH_METRICS='{ n = "count", rt = "quantiles(rt)" }'` to
//! give that rule other metrics: what each aggregate costs).

use std::hint::black_box;
use std::time::{Duration, Instant};

use logtally::aggregate::Aggregator;
use logtally::config::{Rule, RuleLimits};
use logtally::spool::tail::{SegmentEvent, Tailer, TailerOptions};
use logtally_spool::{
    decode_frame, encode_event, encode_header, segment_file_name, Decoded, Frame, SegmentHeader,
};

const ROUNDS: usize = 5;

fn fields() -> Vec<String> {
    ["ad", "ev", "cmp", "bytes", "rt", "uid", "status", "host"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The rules, parsed from a configuration as the daemon reads it: plain, with sketches.
fn rules() -> (Rule, Rule) {
    // The issue-12 rule's metrics, or others to time (`LOGTALLY_BENCH_METRICS`).
    let sketch_metrics = std::env::var("LOGTALLY_BENCH_METRICS").unwrap_or_else(|_| {
        "{ events = \"count\", views = \"count where ev = 'view'\", \
         clicks = \"count where ev = 'click'\", reach = \"distinct(uid)\", \
         rt = \"quantiles(rt)\" }"
            .to_string()
    });
    let text = format!(
        r#"
database_url = "postgres://bench@127.0.0.1/bench"
spool_dir = "/nonexistent"
node = "bench"

[[rule]]
table    = "ad_events_1m"
bucket   = "1m"
group_by = ["ad", "ev", "cmp"]
metrics  = {{ events = "count", bytes = "sum(bytes)", rt_max = "max(rt)" }}

[[rule]]
table    = "ad_reach_1m"
bucket   = "1m"
group_by = ["ad", "cmp"]
metrics  = {sketch_metrics}
"#
    );
    let mut config = logtally::config::parse(std::path::Path::new("bench.toml"), &text)
        .expect("bench config is valid");
    let sketches = config.rules.pop().expect("two rules");
    let plain = config.rules.pop().expect("two rules");
    (plain, sketches)
}

/// A cheap deterministic generator (xorshift), so the data has no pattern a branch
/// predictor could learn from event order.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn build(events: usize) -> Vec<u8> {
    let ads: Vec<String> = (0..2000).map(|i| format!("ad-{i:06}")).collect();
    let cmps: Vec<String> = (0..200).map(|i| format!("campaign-{i:04}")).collect();
    let sizes: Vec<String> = (0..1000).map(|i| (200 + i * 37).to_string()).collect();
    let rts: Vec<String> = (0..500).map(|i| format!("0.{i:03}")).collect();
    let uids: Vec<String> = (0..1_000_000).map(|i| format!("u{i:07}")).collect();
    let evs = [&b"impression"[..], b"view", b"click"];
    let mut out = Vec::with_capacity(events * 112);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..events {
        let r = next(&mut x);
        let ad = (r % 2000) as usize;
        encode_event(
            &mut out,
            // Ten minutes of traffic: ten buckets.
            1_764_300_000_000 + (i as u64 * 600_000 / events as u64),
            [
                Some(ads[ad].as_bytes()),
                Some(evs[((r >> 16) % 3) as usize]),
                Some(cmps[ad % 200].as_bytes()),
                Some(sizes[((r >> 24) % 1000) as usize].as_bytes()),
                Some(rts[((r >> 40) % 500) as usize].as_bytes()),
                Some(uids[(next(&mut x) % 1_000_000) as usize].as_bytes()),
                Some(&b"200"[..]),
                Some(&b"edge-17.example.net"[..]),
            ],
        );
    }
    out
}

/// Decodes every frame and aggregates it; returns (events, rows drained).
fn decode_and_aggregate(spool: &[u8], agg: &mut Aggregator, header: &[String]) -> (u64, usize) {
    let layout = agg.layout(header);
    let mut at = 0;
    let mut events = 0u64;
    while at < spool.len() {
        match decode_frame(&spool[at..]) {
            Decoded::Frame { frame, len } => {
                if let Frame::Event(r) = frame {
                    agg.add(&layout, &r);
                    events += 1;
                }
                at += len;
            }
            other => panic!("bench spool is valid: {other:?}"),
        }
    }
    // The daemon's drain: compact rows, built into `Row`s only when the store binds them
    // (the flush's cost, timed by the store benches).
    let rows = agg.drain_compact().iter().map(|r| r.len()).sum();
    (events, rows)
}

/// This thread's CPU time (user + system) in seconds, from `/proc/thread-self/stat` (10 ms
/// resolution). On a shared machine wall time also counts waiting for a core; CPU time does not.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let events: usize = std::env::var("LOGTALLY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let t = Instant::now();
    let spool = build(events);
    let bytes = spool.len();
    println!(
        "spool: {events} events, {bytes} bytes ({:.1} bytes/event), built in {:.1}s",
        bytes as f64 / events as f64,
        t.elapsed().as_secs_f64()
    );

    let (plain, sketches) = rules();
    let header = fields();
    if std::env::var("LOGTALLY_BENCH_ONLY").as_deref() == Ok("sketches") {
        // For a profiler: the issue-12 rule alone.
        let (sk_s, sk_cpu, sk_rows) = measure(&spool, events, &sketches, &header);
        println!(
            "with sketches: {:.1} ns/event ({sk_rows} rows); per CPU second {:.2} M events/s",
            sk_s * 1e9 / events as f64,
            events as f64 / sk_cpu / 1e6,
        );
        return;
    }
    let (agg_s, agg_cpu, rows) = measure(&spool, events, &plain, &header);
    let (sk_s, sk_cpu, sk_rows) = measure(&spool, events, &sketches, &header);

    let decode_s = median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                let mut at = 0;
                let mut n = 0u64;
                let spool = black_box(&spool[..]);
                while let Decoded::Frame { frame, len } = decode_frame(&spool[at..]) {
                    if let Frame::Event(r) = frame {
                        n += r.values().filter(|v| v.is_some()).count() as u64;
                    }
                    at += len;
                }
                black_box(n);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );

    let nl_s = median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                let n = memchr::memchr_iter(b'\n', black_box(&spool)).count();
                black_box(n);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );

    let mb = bytes as f64 / 1e6;
    println!(
        "decode+aggregate: {:.2} M events/s, {:.0} MB/s, {:.1} ns/event ({rows} rows, median of {ROUNDS})",
        events as f64 / agg_s / 1e6,
        mb / agg_s,
        agg_s * 1e9 / events as f64,
    );
    println!(
        "decode+aggregate per CPU second (excludes waiting for a core): {:.2} M events/s, {:.0} MB/s",
        events as f64 / agg_cpu / 1e6,
        mb / agg_cpu,
    );
    println!(
        "with sketches (count, 2 conditional counts, distinct(uid), quantiles(rt)): \
         {:.2} M events/s, {:.1} ns/event ({sk_rows} rows); per CPU second {:.2} M events/s",
        events as f64 / sk_s / 1e6,
        sk_s * 1e9 / events as f64,
        events as f64 / sk_cpu / 1e6,
    );
    println!(
        "ratio with sketches / plain time: {:.2}x (wall), {:.2}x (CPU)",
        sk_s / agg_s,
        sk_cpu / agg_cpu
    );
    println!(
        "decode only (frames checked, values walked): {:.2} M events/s, {:.0} MB/s",
        events as f64 / decode_s / 1e6,
        mb / decode_s,
    );
    println!(
        "memchr newline count over the same bytes: {:.0} MB/s ({:.2} M \"lines\" of {:.0} bytes/s)",
        mb / nl_s,
        events as f64 / nl_s / 1e6,
        bytes as f64 / events as f64
    );
    println!("ratio memchr / decode+aggregate time: {:.1}x", agg_s / nl_s);
    limited(
        &spool,
        events,
        std::slice::from_ref(&plain),
        &header,
        agg_cpu,
    );

    tail_from_file(&spool, events, &[plain], &header);
}

/// Medians of [`ROUNDS`] decode+aggregate passes with `rule`: (wall s, CPU s, rows drained).
fn measure(spool: &[u8], events: usize, rule: &Rule, header: &[String]) -> (f64, f64, usize) {
    let rules = [rule.clone()];
    let mut agg = Aggregator::new(&rules);
    let mut rows = 0;
    let mut cpu = Vec::new();
    let wall = median(
        (0..ROUNDS)
            .map(|_| {
                let c = cpu_seconds();
                let t = Instant::now();
                let (n, r) = decode_and_aggregate(black_box(spool), &mut agg, header);
                let s = t.elapsed().as_secs_f64();
                cpu.push(cpu_seconds() - c);
                assert_eq!(n as usize, events);
                rows = r;
                s
            })
            .collect(),
    );
    (wall, median(cpu), rows)
}

/// The same rule with `retention` and `max_keys`: a limit no bucket reaches (the cost of
/// the checks) and a small one (most keys go to the overflow row), per CPU second, beside
/// the plain rule's `plain_cpu`.
fn limited(spool: &[u8], events: usize, rules: &[Rule], header: &[String], plain_cpu: f64) {
    for (what, max_keys) in [
        ("max_keys never reached", 10_000_000),
        ("max_keys = 1000", 1000),
    ] {
        let limits = [RuleLimits {
            max_keys: Some(max_keys),
            retention: Some(Duration::from_secs(90 * 86_400)),
            ..RuleLimits::default()
        }];
        let mut rows = 0;
        let cpu = median(
            (0..ROUNDS)
                .map(|_| {
                    let mut agg = Aggregator::with_limits(rules, &limits);
                    agg.set_now(1_764_300_000_000 + 600_000); // the spool's end: nothing expires
                    let c = cpu_seconds();
                    let (n, r) = decode_and_aggregate(black_box(spool), &mut agg, header);
                    assert_eq!(n as usize, events);
                    rows = r;
                    cpu_seconds() - c
                })
                .collect(),
        );
        println!(
            "decode+aggregate with retention and {what}: {:.2} M events/s per CPU second, \
             {:.2}x the plain rule's time ({rows} rows)",
            events as f64 / cpu / 1e6,
            cpu / plain_cpu,
        );
    }
}

/// The same events written to a segment file (page cache warm), read back by the real
/// [`Tailer`] (pread into its 1 MiB buffer) and aggregated, as the daemon's reader thread does.
fn tail_from_file(spool: &[u8], events: usize, rules: &[Rule], fields: &[String]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut file = Vec::new();
    let header = SegmentHeader {
        writer_pid: std::process::id(),
        created_ms: 1_764_300_000_000,
        fields: fields.to_vec(),
    };
    encode_header(&header, &mut file).expect("header");
    let name = segment_file_name(1_764_300_000_000, std::process::id(), 1);
    let path = dir.path().join(&name);
    std::fs::write(&path, [&file[..], spool].concat()).expect("write segment");
    let secs = median(
        (0..ROUNDS)
            .map(|_| {
                let mut tailer =
                    Tailer::new(dir.path(), Default::default(), TailerOptions::default());
                let mut agg = Aggregator::new(rules);
                let t = Instant::now();
                loop {
                    let stats = tailer
                        .poll(64 << 20, &mut |ev| {
                            if let SegmentEvent::Record {
                                segment, record, ..
                            } = ev
                            {
                                agg.add_cached(segment.id, &segment.header.fields, &record);
                            }
                        })
                        .expect("poll");
                    if !stats.more {
                        break;
                    }
                }
                black_box(agg.drain());
                let s = t.elapsed().as_secs_f64();
                assert_eq!(tailer.stats().events as usize, events);
                s
            })
            .collect(),
    );
    println!(
        "tail (pread from a warm segment file) + aggregate: {:.2} M events/s, {:.0} MB/s",
        events as f64 / secs / 1e6,
        spool.len() as f64 / 1e6 / secs
    );
}
