//! Database faults: an outage, connections killed mid-transaction and a COMMIT whose reply
//! is lost ([`CommitCutter`], also used by the Citus tests); nothing lost or doubled.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_e2e::sidecar::Db;
use rand::{Rng, SeedableRng};

use super::{
    metric, start_sidecar, wait_for_totals, wait_until, write_segment, writer, FakeWriter, Site,
    Workload, RULE,
};

#[test]
fn a_ten_second_database_outage_loses_and_doubles_nothing() {
    let mut pg = TestPostgres::start();
    if !pg.is_private() {
        eprintln!("skipped: TEST_DATABASE_URL server cannot be stopped");
        return;
    }
    let db = Db::create(&pg);
    let site = Site::new();
    // A low key bound (the workload has 600 keys): while the database is away the reader
    // must pause and the spool hold the rest.
    let config = site.config_with(db.url(), "max_pending_keys = 100", RULE);
    let sidecar = start_sidecar(&site, &config);
    let spool = site.spool.clone();
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(3);
        for _ in 0..2 {
            write_segment(
                &mut writer(&spool, fake.pid()),
                &mut load,
                100,
                1_000,
                Duration::from_millis(100),
            );
        }
        load
    });
    std::thread::sleep(Duration::from_secs(3));
    pg.stop();
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(9),
        "a failed flush while the database is down",
        &site,
        || metric(site.listen, "logtally_flushes_total{outcome=\"error\"}").unwrap_or(0.0) > 0.0,
    );
    assert_eq!(http_get(site.listen, "/readyz").unwrap().status, 503);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    // The reader is paused at the key bound while the writer goes on: the spool buffers.
    let read_before = metric(site.listen, "logtally_events_read_total").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let read_after = metric(site.listen, "logtally_events_read_total").unwrap();
    assert_eq!(
        read_before, read_after,
        "the reader went on past max_pending_keys"
    );
    assert!(metric(site.listen, "logtally_pending_keys").unwrap() >= 100.0);
    assert!(metric(site.listen, "logtally_lag_bytes").unwrap() > 0.0);
    pg.start_again();
    let load = ingest.join().unwrap();
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(120));
    wait_until(Duration::from_secs(10), "/readyz 200 again", &site, || {
        http_get(site.listen, "/readyz")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    assert!(sidecar.terminate().success());
}

#[test]
fn connections_killed_mid_transaction_count_nothing_twice() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let site = Site::new();
    let config = site.config(db.url());
    let sidecar = start_sidecar(&site, &config);
    let spool = site.spool.clone();
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(5);
        write_segment(
            &mut writer(&spool, fake.pid()),
            &mut load,
            80,
            2_000,
            Duration::from_millis(50),
        );
        load
    });
    // Terminate the sidecar's backend again and again, wherever it is: mid-upsert,
    // mid-COMMIT, idle. A retried batch whose COMMIT did land must not count again.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut killed = 0usize;
    while !ingest.is_finished() {
        if let Ok(rows) = db.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'logtally' AND pid <> pg_backend_pid()",
        ) {
            killed += rows.len();
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..200)));
    }
    let load = ingest.join().unwrap();
    assert!(killed >= 10, "only {killed} backends terminated");
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(60));
    assert!(sidecar.terminate().success());
    let log = site.log_text();
    eprintln!(
        "{killed} backends terminated; {} flushes failed; {} retries found their batch committed",
        log.matches("flush failed").count(),
        log.matches("had committed").count()
    );
}

/// A TCP proxy in front of PostgreSQL that, while `drops` is positive, passes a client's
/// `COMMIT` on to the server, lets the server finish it, then cuts the connection before the
/// reply gets back: the client cannot know whether its transaction committed.
pub(crate) struct CommitCutter {
    pub(crate) addr: SocketAddr,
    pub(crate) drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CommitCutter {
    pub(crate) fn start(upstream: SocketAddr, drops: usize) -> CommitCutter {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let drops = Arc::new(AtomicUsize::new(drops));
        let cut = Arc::new(AtomicUsize::new(0));
        let (d, c) = (drops.clone(), cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let (d, c) = (d.clone(), c.clone());
                std::thread::spawn(move || Self::relay(client, server, d, c));
            }
        });
        CommitCutter { addr, drops, cut }
    }

    fn relay(
        mut client: std::net::TcpStream,
        mut server: std::net::TcpStream,
        drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let (mut s2, mut c2) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
        // Frontend messages: untyped (length-prefixed) until the startup message, then a
        // type byte and a length that counts itself.
        let mut started = false;
        loop {
            let mut msg = Vec::new();
            if started {
                let mut head = [0u8; 5];
                if client.read_exact(&mut head).is_err() {
                    break;
                }
                let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
                msg.extend_from_slice(&head);
                msg.resize(1 + len, 0);
                if client.read_exact(&mut msg[5..]).is_err() {
                    break;
                }
            } else {
                let mut head = [0u8; 8];
                if client.read_exact(&mut head).is_err() {
                    break;
                }
                let len = u32::from_be_bytes(head[0..4].try_into().unwrap()) as usize;
                let code = u32::from_be_bytes(head[4..8].try_into().unwrap());
                msg.extend_from_slice(&head);
                msg.resize(len, 0);
                if client.read_exact(&mut msg[8..]).is_err() {
                    break;
                }
                started = code == 196_608; // protocol 3.0; SSL/GSS requests stay untyped
            }
            let is_commit = started && msg[0] == b'Q' && msg[5..].starts_with(b"COMMIT\0");
            let cut_now = is_commit
                && drops
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if cut_now {
                // Cut the client off first so the server's reply can never reach it, then
                // hand the server the COMMIT and give it time to finish.
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.write_all(&msg);
                std::thread::sleep(Duration::from_millis(300));
                cut.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if server.write_all(&msg).is_err() {
                break;
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Both);
    }
}

#[test]
fn a_commit_whose_reply_is_lost_is_found_committed_not_repeated() {
    let pg = TestPostgres::start();
    let Some(port) = pg.port() else {
        eprintln!("skipped: needs the private server's port");
        return;
    };
    let db = Db::create(&pg);
    let site = Site::new();
    let cutter = CommitCutter::start(SocketAddr::from(([127, 0, 0, 1], port)), 3);
    let url = db
        .url()
        .replace(&format!("127.0.0.1:{port}"), &cutter.addr.to_string());
    assert_ne!(url, db.url());
    let config = site.config(&url);
    let sidecar = start_sidecar(&site, &config);
    let spool = site.spool.clone();
    let ingest = std::thread::spawn(move || {
        let fake = FakeWriter::start();
        let mut load = Workload::new(6);
        write_segment(
            &mut writer(&spool, fake.pid()),
            &mut load,
            40,
            1_000,
            Duration::from_millis(100),
        );
        load
    });
    let load = ingest.join().unwrap();
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(60));
    // The last cut's batch can be in the table before the proxy counts the cut and before
    // the sidecar's retry finds it committed: wait for both, then check nothing more came.
    wait_until(
        Duration::from_secs(30),
        "the planned cuts and their retries",
        &site,
        || {
            cutter.cut.load(std::sync::atomic::Ordering::SeqCst) == 3
                && site.log_text().matches("had committed").count() == 3
        },
    );
    assert_eq!(cutter.drops.load(std::sync::atomic::Ordering::SeqCst), 0);
    let log = site.log_text();
    let found = log.matches("had committed").count();
    assert_eq!(found, 3, "retries that found their batch committed:\n{log}");
    wait_for_totals(&db, &load.expected, &site, Duration::from_secs(5));
    assert!(sidecar.terminate().success());
}
