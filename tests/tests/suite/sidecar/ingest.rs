//! Ingest: exact totals while segments grow, across `kill -9`s of the sidecar, and past
//! corrupt records and torn tails.

use std::time::Duration;

use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::sidecar::Db;
use rand::{Rng, SeedableRng};

use super::{
    dead_pid, hand_segment, metric, now_ms, start_sidecar, totals, wait_for_totals, wait_until,
    write_segment, writer, FakeWriter, Site, Workload,
};

#[test]
fn a_million_events_over_four_segments_two_growing_add_up_exactly() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let mut load = Workload::new(1);
    // Two segments complete (sealed) before the sidecar starts.
    for pid in [101, 102] {
        write_segment(
            &mut writer(&site.spool, pid),
            &mut load,
            50,
            5_000,
            Duration::ZERO,
        );
    }
    let config = site.config(db.url());
    let sidecar = start_sidecar(&site, &config);
    // Two more grow while it reads, from live "writers", then seal.
    let (w1, w2) = (FakeWriter::start(), FakeWriter::start());
    let mut a = writer(&site.spool, w1.pid());
    let mut b = writer(&site.spool, w2.pid());
    let mut buf = Vec::new();
    for _ in 0..50 {
        for w in [&mut a, &mut b] {
            buf.clear();
            load.encode(&mut buf, 5_000, true);
            w.append(&buf, 5_000, 0, now_ms()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    a.seal(now_ms()).unwrap();
    b.seal(now_ms()).unwrap();
    assert_eq!(load.total_events(), 1_000_000);

    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(120));
    // Sealed and committed segments are deleted, and so are their checkpoint rows.
    wait_until(
        Duration::from_secs(20),
        "segments and checkpoint rows removed",
        &site,
        || {
            site.segments().is_empty()
                && db
                    .query("SELECT 1 FROM logtally_checkpoint")
                    .map(|r| r.is_empty())
                    .unwrap_or(false)
        },
    );
    assert_eq!(
        metric(site.listen, "logtally_events_read_total"),
        Some(1_000_000.0)
    );
    let status = sidecar.terminate();
    assert!(status.success(), "exit {status:?}\n{}", site.log_text());

    // The binlog recorded the commits, the last one with every segment finished.
    let binlog = std::fs::read_to_string(site.binlog()).unwrap();
    let last: serde_json::Value = serde_json::from_str(binlog.lines().last().unwrap()).unwrap();
    assert_eq!(last["v"], 1);
    assert_eq!(last["node"], "test-node");
    let finished_positions = binlog
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|r| r["segments"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["finished"] == true)
        .count();
    assert!(finished_positions >= 4, "{binlog}");
}

#[test]
fn twenty_kill_nines_during_ingest_count_every_event_once() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let config = site.config(db.url());
    let spool = site.spool.clone();
    // The writer runs through all the kills: three segments, one after another, growing.
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(2);
        for _ in 0..3 {
            write_segment(
                &mut writer(&spool, fake.pid()),
                &mut load,
                40,
                2_500,
                Duration::from_millis(60),
            );
        }
        load
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut kills_during_ingest = 0;
    for run in 1..=20 {
        let before = runs_that_committed(&site);
        let sidecar = start_sidecar(&site, &config);
        // While events are written, each run commits at least once before it dies, so the
        // kills land after work was committed whatever the load on the machine; then at a
        // random moment within the next flushes.
        wait_until(
            Duration::from_secs(60),
            &format!("run {run}'s first commit"),
            &site,
            || runs_that_committed(&site) > before || ingest.is_finished(),
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..450)));
        kills_during_ingest += usize::from(!ingest.is_finished());
        sidecar.kill9();
    }
    let load = ingest.join().unwrap();
    assert_eq!(load.total_events(), 300_000);
    assert!(
        kills_during_ingest > 0,
        "no kill landed while events were written"
    );
    let sidecar = start_sidecar(&site, &config);
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(120));
    // The totals may have been committed by the run before: SIGTERM once this one serves.
    wait_until(Duration::from_secs(30), "the admin server", &site, || {
        sidecar.metric("logtally_events_read_total").is_some()
    });
    let status = sidecar.terminate();
    assert!(
        status.success(),
        "SIGTERM exit {status}:\n{}",
        site.log_text()
    );
    eprintln!("{kills_during_ingest} of 20 kills landed while events were written");
}

/// How many runs of the sidecar have committed (each numbers its binlog records from 1).
fn runs_that_committed(site: &Site) -> usize {
    std::fs::read_to_string(site.binlog())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["seq"] == 1)
        .count()
}

#[test]
fn corrupt_records_and_torn_tails_are_counted_and_skipped_the_rest_exact() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let mut load = Workload::new(4);
    let dead = dead_pid();
    // A dead writer's segment: two corrupt records in the middle, a torn tail at the end.
    hand_segment(
        &site.spool,
        dead,
        1,
        &mut load,
        1_000,
        &[300, 301, 700],
        true,
    );
    // A live writer's segment with a torn tail: waited for, not an error (yet).
    let live = FakeWriter::start();
    let live_segment = hand_segment(&site.spool, live.pid(), 2, &mut load, 500, &[], true);
    // A live writer holds its segment's lock (the module's flock): that is what keeps it.
    let live_lock = std::fs::File::open(&live_segment).unwrap();
    live_lock.lock().unwrap();
    let config = site.config(db.url());
    let sidecar = start_sidecar(&site, &config);
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(60));
    // Two corrupt runs (300-301 adjacent, 700) and, once the dead writer's segment is
    // abandoned (its lock is free), its torn tail.
    wait_until(Duration::from_secs(40), "3 decode errors", &site, || {
        metric(site.listen, "logtally_decode_errors_total") == Some(3.0)
    });
    assert!(metric(site.listen, "logtally_torn_tail_waits_total").unwrap_or(0.0) >= 2.0);
    assert_eq!(
        metric(site.listen, "logtally_events_read_total"),
        Some((1_000 - 3 + 500) as f64)
    );
    assert!(sidecar.terminate().success());
    assert_eq!(
        totals(&db).unwrap(),
        load.expected,
        "nothing changed at shutdown"
    );
    drop(live_lock);
}
