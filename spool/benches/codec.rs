//! Encode and decode rates for a typical ad event, beside a memchr newline count over the
//! same number of bytes (the reference limit: the least work any line-based reader does).
//!
//! Run: `cargo bench -p logtally-spool --bench codec`

use std::hint::black_box;
use std::time::Instant;

use logtally_spool::{encode_event, SegmentItem, SegmentReader};

const RECORDS: usize = 1_000_000;
const ROUNDS: usize = 9;

/// time + 5 fields, about 100 bytes framed. Number strings are made before timing starts.
fn event(i: usize, numbers: &[String], out: &mut Vec<u8>) {
    let ad = &numbers[i % 5000];
    let bytes = &numbers[40 + i % 300];
    encode_event(
        out,
        1_764_300_000_000 + i as u64,
        [
            Some(ad.as_bytes()),
            Some(if i.is_multiple_of(7) {
                &b"click"[..]
            } else {
                &b"view"[..]
            }),
            Some(&b"winter_sale_2026"[..]),
            Some(bytes.as_bytes()),
            Some(&b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128"[..]),
        ],
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let numbers: Vec<String> = (0..5000).map(|n| n.to_string()).collect();
    let mut spool = Vec::with_capacity(RECORDS * 110);
    for i in 0..RECORDS {
        event(i, &numbers, &mut spool);
    }
    let bytes = spool.len();

    // Encode: the module's hot-path work, into a reused buffer.
    let mut buf = Vec::with_capacity(bytes);
    let encode_ns = median(
        (0..ROUNDS)
            .map(|_| {
                buf.clear();
                let t = Instant::now();
                for i in 0..RECORDS {
                    event(i, &numbers, &mut buf);
                }
                black_box(&buf);
                t.elapsed().as_nanos() as f64 / RECORDS as f64
            })
            .collect(),
    );

    // Decode (check every frame, walk every value) and the memchr reference, alternated
    // round by round so the machine's noise hits both alike; the ratio is per round.
    let line = b"1764300000000 4711 view winter_sale_2026 123 Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128\n";
    let text: Vec<u8> = line.iter().copied().cycle().take(bytes).collect();
    let (mut decode_runs, mut memchr_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut n = 0usize;
        let mut value_bytes = 0usize;
        for it in SegmentReader::new(&spool, 0) {
            if let SegmentItem::Event { record, .. } = it {
                n += 1;
                value_bytes += record
                    .values()
                    .map(|v| v.map_or(0, <[u8]>::len))
                    .sum::<usize>();
            }
        }
        assert_eq!(n, RECORDS);
        black_box(value_bytes);
        let d = t.elapsed().as_secs_f64();
        let t = Instant::now();
        black_box(memchr::memchr_iter(b'\n', black_box(&text)).count());
        let m = t.elapsed().as_secs_f64();
        decode_runs.push(d);
        memchr_runs.push(m);
        ratios.push(m / d);
    }
    let (decode_s, memchr_s, ratio) = (median(decode_runs), median(memchr_runs), median(ratios));

    let mb = bytes as f64 / 1e6;
    println!(
        "spool codec, {RECORDS} events of {:.0} bytes (median of {ROUNDS})",
        bytes as f64 / RECORDS as f64
    );
    println!("| work | ns/event | Mevents/s | MB/s | vs memchr |");
    println!("|---|---|---|---|---|");
    println!(
        "| encode | {:.1} | {:.2} | {:.0} | |",
        encode_ns,
        1e3 / encode_ns,
        mb / (encode_ns * RECORDS as f64 / 1e9)
    );
    println!(
        "| decode | {:.1} | {:.2} | {:.0} | {:.2}x |",
        decode_s * 1e9 / RECORDS as f64,
        RECORDS as f64 / decode_s / 1e6,
        mb / decode_s,
        ratio
    );
    println!(
        "| memchr newline count | {:.1} | {:.2} | {:.0} | 1.00x |",
        memchr_s * 1e9 / RECORDS as f64,
        RECORDS as f64 / memchr_s / 1e6,
        mb / memchr_s
    );
}
