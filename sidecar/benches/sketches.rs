//! Cost of the sketches (issue 12) per insert, beside the work a plain `sum` metric does, and
//! their size in memory and in PostgreSQL.
//!
//! Prints medians of several rounds, in ns per insert:
//! - `distinct(f)`: hashing alone (MurmurHash3), inserts into one sketch that becomes full,
//!   inserts into many small (explicit) sketches;
//! - `quantiles(f)`: inserts of request-time-like values into one sketch, and into many;
//! - baselines in the same run: parsing the value as a decimal and adding it to an `i128`
//!   (what `sum(rt)` does per event), and `f64::ln` alone;
//! - a condition (`ev = 'view' and status < 400`) evaluated on a record, and reading values
//!   with the numeric-list rule.
//!
//! Run: `cargo bench -p logtally --bench sketches`.

use std::hint::black_box;
use std::time::Instant;

use logtally::aggregate::hll::{self, Hll};
use logtally::aggregate::numeric_list::{read_number, Reading};
use logtally::aggregate::quantiles::{Quantiles, DEFAULT_ALPHA};
use logtally::aggregate::Decimal;
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};

const ROUNDS: usize = 7;
const N: usize = 1_000_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ns per item of `f`, which handles `items` items per call.
fn time(items: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let runs = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64 / items as f64
        })
        .collect();
    median(runs)
}

fn main() {
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let users: Vec<String> = (0..N)
        .map(|i| format!("user-{:016x}", (i as u64) * 7919))
        .collect();
    // Request times in seconds, µs resolution, log-uniform between 100 µs and 10 s.
    let times: Vec<String> = (0..N)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            format!("{:.6}", 10f64.powf(-4.0 + 5.0 * u))
        })
        .collect();
    let time_values: Vec<f64> = times.iter().map(|t| t.parse().unwrap()).collect();

    println!("per insert, median of {ROUNDS} rounds of {N}:");
    let sum_ns = time(N, || {
        let mut sum: i128 = 0;
        for t in &times {
            if let Some(Decimal(v)) = Decimal::parse(t.as_bytes()) {
                sum += v;
            }
        }
        black_box(sum);
    });
    println!("  baseline: parse decimal + add (sum)      {sum_ns:6.1} ns");
    let ln_ns = time(N, || {
        let mut acc = 0.0;
        for &x in &time_values {
            acc += x.ln();
        }
        black_box(acc);
    });
    println!("  baseline: f64::ln                          {ln_ns:6.1} ns");

    let hash_ns = time(N, || {
        let mut acc = 0u64;
        for u in &users {
            acc ^= hll::hash(u.as_bytes());
        }
        black_box(acc);
    });
    println!("  distinct: hash only (MurmurHash3 x64 128)  {hash_ns:6.1} ns");
    let one_ns = time(N, || {
        let mut h = Hll::new();
        for u in &users {
            h.insert(u.as_bytes());
        }
        black_box(h);
    });
    println!(
        "  distinct: hash + insert, one sketch        {one_ns:6.1} ns   ({:.1}× sum)",
        one_ns / sum_ns
    );
    // 100,000 keys with 10 distinct values each (explicit sketches), values interleaved.
    let keys = N / 10;
    let many_ns = time(N, || {
        let mut sketches = vec![Hll::new(); keys];
        for (i, u) in users.iter().enumerate() {
            sketches[i % keys].insert(u.as_bytes());
        }
        black_box(sketches);
    });
    println!(
        "  distinct: hash + insert, 100k sketches×10  {many_ns:6.1} ns   ({:.1}× sum)",
        many_ns / sum_ns
    );

    let q_one_ns = time(N, || {
        let mut q = Quantiles::new(DEFAULT_ALPHA).unwrap();
        for &x in &time_values {
            q.insert(x);
        }
        black_box(q);
    });
    println!(
        "  quantiles: insert, one sketch              {q_one_ns:6.1} ns   ({:.1}× sum)",
        q_one_ns / sum_ns
    );
    let q_many_ns = time(N, || {
        let mut sketches = vec![Quantiles::new(DEFAULT_ALPHA).unwrap(); keys];
        for (i, &x) in time_values.iter().enumerate() {
            sketches[i % keys].insert(x);
        }
        black_box(sketches);
    });
    println!(
        "  quantiles: insert, 100k sketches×10        {q_many_ns:6.1} ns   ({:.1}× sum)",
        q_many_ns / sum_ns
    );
    let q_parse_ns = time(N, || {
        let mut q = Quantiles::new(DEFAULT_ALPHA).unwrap();
        for t in &times {
            if let Some(Decimal(v)) = Decimal::parse(t.as_bytes()) {
                q.insert(v as f64 / Decimal::ONE as f64);
            }
        }
        black_box(q);
    });
    println!(
        "  quantiles: parse decimal + insert          {q_parse_ns:6.1} ns   ({:.1}× sum)",
        q_parse_ns / sum_ns
    );

    let cond = logtally::config::condition::parse_condition("ev = 'view' and status < 400")
        .unwrap()
        .bind(&["ev", "status", "rt"])
        .unwrap();
    let records: Vec<[Option<&[u8]>; 3]> = (0..N)
        .map(|i| {
            let ev: &[u8] = if i % 3 == 0 { b"click" } else { b"view" };
            let status: &[u8] = if i % 10 == 0 { b"404" } else { b"200" };
            [Some(ev), Some(status), Some(times[i].as_bytes())]
        })
        .collect();
    let cond_ns = time(N, || {
        let mut n = 0u32;
        for r in &records {
            n += u32::from(cond.eval(r).matched);
        }
        black_box(n);
    });
    println!("  condition: ev = 'view' and status < 400    {cond_ns:6.1} ns");
    let lists: Vec<String> = times
        .chunks(2)
        .map(|c| format!("{}, {}", c[0], c[1]))
        .collect();
    let list_ns = time(lists.len(), || {
        for l in &lists {
            black_box(read_number(l.as_bytes(), Reading::Sum));
        }
    });
    println!("  numeric list: \"0.001234, 0.250000\" (sum)   {list_ns:6.1} ns");

    println!("\nbytes per sketch (inline + heap; encoded):");
    println!("  distinct: inline {} bytes", std::mem::size_of::<Hll>());
    for n in [1usize, 10, 100, 160, 161, 500, 1_000, 100_000] {
        let mut h = Hll::new();
        for u in &users[..n] {
            h.insert(u.as_bytes());
        }
        println!(
            "    {n:>7} values: heap {:>5} bytes, hll column {:>5} bytes",
            h.heap_bytes(),
            h.encode().len()
        );
    }
    println!(
        "  quantiles (α 1%): inline {} bytes",
        std::mem::size_of::<Quantiles>()
    );
    for n in [1usize, 10, 100, 1_000, 100_000, N] {
        let mut q = Quantiles::new(DEFAULT_ALPHA).unwrap();
        for &x in &time_values[..n] {
            q.insert(x);
        }
        let buckets = q.to_parts().pos_keys.len();
        println!(
            "    {n:>7} values: {buckets:>4} buckets, heap {:>6} bytes, SQL text {:>6} bytes",
            q.heap_bytes(),
            q.to_sql_literal().len()
        );
    }
}
