//! Observability end to end: the sidecar's `/metrics`, `/status`, `/readyz` as a real
//! Prometheus server and `promtool` see them, and the shipped alert rules and scrape
//! configuration.
//!
//! `admin_in_process` runs the sidecar's admin server inside the test (no database needed);
//! `with_daemon` runs the real `logtally` binary against a real PostgreSQL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use logtally::http::admin::{serve, AdminState};
use logtally::http::metrics::Metrics;
use logtally::http::status::{SharedStatus, Status};
use logtally_e2e::prometheus::{http_get, promtool, TestPrometheus};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn assert_promtool_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "promtool {what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

mod shipped_config {
    use super::*;

    #[test]
    fn alert_rules_pass_promtool_check_and_their_unit_tests() {
        let rules = repo_file("nginx-conf/logtally-alerts.yml");
        let out = promtool(&["check", "rules", rules.to_str().unwrap()], None);
        assert_promtool_ok(&out, "check rules");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("SUCCESS: 4 rules found"), "{stdout}");

        // The unit tests feed synthetic series and assert each alert fires (and only then).
        let tests = repo_file("nginx-conf/logtally-alerts.test.yml");
        let out = promtool(&["test", "rules", tests.to_str().unwrap()], None);
        assert_promtool_ok(&out, "test rules");
    }

    #[test]
    fn example_prometheus_config_is_valid() {
        let config = repo_file("nginx-conf/prometheus.yml");
        let out = promtool(&["check", "config", config.to_str().unwrap()], None);
        assert_promtool_ok(&out, "check config");
        // It loads the alert rules, so those are checked through it as well.
        assert!(String::from_utf8_lossy(&out.stdout).contains("4 rules found"));
    }
}

mod admin_in_process {
    use super::*;

    /// The admin server on a loopback port inside its own runtime, stopped on drop.
    struct Admin {
        addr: std::net::SocketAddr,
        state: AdminState,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        rt: Option<tokio::runtime::Runtime>,
    }

    impl Admin {
        fn start() -> Admin {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let state = AdminState {
                metrics: Arc::new(Metrics::new().unwrap()),
                status: SharedStatus::new(Status::new(
                    "e2e",
                    // Long enough that the start-up grace period outlasts the test.
                    Duration::from_secs(60),
                    &[],
                    now_ms(),
                )),
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            rt.spawn(serve(listener, state.clone(), async move {
                let _ = stopped.await;
            }));
            Admin {
                addr,
                state,
                stop: Some(stop),
                rt: Some(rt),
            }
        }
    }

    impl Drop for Admin {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(rt) = self.rt.take() {
                rt.shutdown_timeout(Duration::from_secs(5));
            }
        }
    }

    #[test]
    fn metrics_text_passes_promtool_check_metrics() {
        let admin = Admin::start();
        let m = &admin.state.metrics;
        // Touch every kind of series so labelled and histogram families are present too.
        m.events_read.inc_by(5);
        m.flushes(true).inc();
        m.flush_duration.observe(0.02);
        m.add_rows_upserted("ad_events_1m", 3);
        m.add_bad_values("ad_events_1m", "bytes", 1);
        let resp = http_get(admin.addr, "/metrics").unwrap();
        assert_eq!(resp.status, 200);
        let out = promtool(&["check", "metrics"], Some(&resp.body));
        assert_promtool_ok(&out, "check metrics");
        // promtool prints lint problems and still exits 0 for some of them: demand silence.
        let lint = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            lint.trim().is_empty(),
            "promtool check metrics complained:\n{lint}"
        );
    }

    #[test]
    fn prometheus_scrapes_values_and_readiness() {
        let admin = Admin::start();
        let prom = TestPrometheus::start(&[admin.addr], &[]);
        admin.state.metrics.events_read.inc_by(1234);
        prom.wait_for("logtally_events_read_total", Duration::from_secs(20), |v| {
            v == Some(1234.0)
        });
        assert_eq!(prom.query_scalar("up").unwrap(), Some(1.0));
        assert_eq!(prom.target_health().unwrap().0, "up");

        // Not ready at first (database never seen), ready once it is up, and both the
        // probe and the scraped gauge agree.
        assert_eq!(http_get(admin.addr, "/readyz").unwrap().status, 503);
        prom.wait_for("logtally_ready", Duration::from_secs(20), |v| {
            v == Some(0.0)
        });
        admin
            .state
            .status
            .update(|s| s.record_database(now_ms(), Ok(())));
        assert_eq!(http_get(admin.addr, "/readyz").unwrap().status, 200);
        prom.wait_for("logtally_ready", Duration::from_secs(20), |v| {
            v == Some(1.0)
        });

        // The process collector is scraped as well.
        let rss = prom.query_scalar("process_resident_memory_bytes").unwrap();
        assert!(rss.is_some_and(|v| v > 1e6), "{rss:?}");
    }
}

mod with_daemon {
    use super::*;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use logtally_e2e::nginx::{HttpClient, TestNginx};
    use logtally_e2e::postgres::TestPostgres;
    use logtally_e2e::prometheus::ScrapeJob;
    use logtally_e2e::sidecar::{free_addr, logtally_bin};
    use logtally_spool::{encode_drop_marker, encode_event, SegmentWriter, SegmentWriterConfig};

    /// A `logtally run` with its own spool folder, config and log; killed on drop.
    struct Sidecar {
        child: Child,
        dir: tempfile::TempDir,
        addr: SocketAddr,
    }

    impl Sidecar {
        fn start(database_url: &str) -> Sidecar {
            Sidecar::start_on(database_url, None)
        }

        /// Reads `spool` (default: a folder of its own, see [`Sidecar::spool`]).
        fn start_on(database_url: &str, spool: Option<&Path>) -> Sidecar {
            let dir = tempfile::Builder::new()
                .prefix("logtally-obs-")
                .tempdir()
                .unwrap();
            let spool = spool.map_or_else(|| dir.path().join("spool"), Path::to_path_buf);
            std::fs::create_dir_all(&spool).unwrap();
            let addr = free_addr();
            let config = format!(
                r#"spool_dir = {spool:?}
database_url = {database_url:?}
node = "obs-e2e"
flush_interval = "500ms"
listen = "{addr}"
binlog = {binlog:?}

[[rule]]
table = "obs_events_1m"
bucket = "1m"
group_by = ["ad", "ev"]
metrics = {{ events = "count", bytes = "sum(bytes)" }}
"#,
                spool = spool.display().to_string(),
                binlog = dir.path().join("binlog").display().to_string(),
            );
            let config_path = dir.path().join("logtally.toml");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join("logtally.log")).unwrap();
            let child = Command::new(logtally_bin())
                .args(["run", "-c"])
                .arg(&config_path)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start logtally");
            Sidecar { child, dir, addr }
        }

        /// The sidecar's own spool folder (when started without one).
        fn spool(&self) -> PathBuf {
            self.dir.path().join("spool")
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("logtally.log")).unwrap_or_default()
        }

        /// Polls `/readyz` until its status is `want`; returns the body.
        fn wait_readyz(&mut self, want: u16, limit: Duration) -> String {
            let deadline = Instant::now() + limit;
            loop {
                if let Ok(Some(exit)) = self.child.try_wait() {
                    panic!("logtally exited ({exit}):\n{}", self.log());
                }
                let last = match http_get(self.addr, "/readyz") {
                    Ok(r) if r.status == want => return r.text(),
                    other => other.map(|r| (r.status, r.text())),
                };
                assert!(
                    Instant::now() < deadline,
                    "/readyz not {want} within {limit:?}; last {last:?}\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        fn status(&self) -> serde_json::Value {
            let r = http_get(self.addr, "/status").unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("content-type"), Some("application/json"));
            serde_json::from_slice(&r.body).unwrap()
        }
    }

    impl Drop for Sidecar {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn database(pg: &TestPostgres) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(pg.create_database())
    }

    fn sum_events(url: &str) -> Option<i64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .ok()?;
            let task = tokio::spawn(conn);
            let row = client
                .query_one(
                    "SELECT coalesce(sum(events), 0)::bigint FROM obs_events_1m",
                    &[],
                )
                .await
                .ok();
            drop(client);
            let _ = task.await;
            row.map(|r| r.get(0))
        })
    }

    /// Writes `events` events in batches plus one drop marker of `dropped`, then seals,
    /// through the spool crate's writer as the nginx module would.
    fn write_spool(dir: &Path, events: u64, dropped: u64) {
        let mut w = SegmentWriter::new(SegmentWriterConfig {
            dir: dir.to_path_buf(),
            fields: vec!["ad".into(), "ev".into(), "bytes".into()],
            segment_size: u64::MAX,
            // A live pid: the sidecar must not take the segment for a dead writer's.
            pid: std::process::id(),
            fsync: false,
        })
        .unwrap();
        let mut buf = Vec::new();
        let mut written = 0;
        while written < events {
            buf.clear();
            let n = (events - written).min(1000);
            for i in 0..n {
                let ad = format!("ad{}", (written + i) % 7);
                let ev: &[u8] = if i % 3 == 0 { b"click" } else { b"view" };
                let values: [Option<&[u8]>; 3] = [Some(ad.as_bytes()), Some(ev), Some(b"100")];
                encode_event(&mut buf, now_ms(), values);
            }
            w.append(&buf, n, 0, now_ms()).unwrap();
            written += n;
        }
        buf.clear();
        encode_drop_marker(&mut buf, now_ms(), dropped);
        w.append(&buf, 0, dropped, now_ms()).unwrap();
        w.seal(now_ms()).unwrap();
    }

    #[test]
    fn real_sidecar_metrics_pass_promtool_and_count_events_through_prometheus() {
        const EVENTS: u64 = 25_000;
        const DROPPED: u64 = 17;
        let pg = TestPostgres::start();
        let url = database(&pg);
        let mut sidecar = Sidecar::start(&url);
        sidecar.wait_readyz(200, Duration::from_secs(30));

        // (a) The binary's exposition, every family present, passes promtool's lint.
        let resp = http_get(sidecar.addr, "/metrics").unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let out = promtool(&["check", "metrics"], Some(&resp.body));
        assert_promtool_ok(&out, "check metrics");
        let lint = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            lint.trim().is_empty(),
            "promtool check metrics complained:\n{lint}"
        );
        let text = resp.text();
        assert!(
            text.contains("logtally_rows_upserted_total{rule=\"obs_events_1m\"} 0"),
            "{text}"
        );

        // (b) Events written to the spool come back through Prometheus's query API.
        let prom = TestPrometheus::start(&[sidecar.addr], &[]);
        prom.wait_for("up", Duration::from_secs(20), |v| v == Some(1.0));
        prom.wait_for("logtally_events_read_total", Duration::from_secs(20), |v| {
            v == Some(0.0)
        });
        let spool = sidecar.spool();
        let written = Instant::now();
        write_spool(&spool, EVENTS, DROPPED);
        let limit = Duration::from_secs(60);
        prom.wait_for("logtally_events_read_total", limit, |v| {
            v == Some(EVENTS as f64)
        });
        eprintln!(
            "{EVENTS} events in Prometheus {:?} after writing",
            written.elapsed()
        );
        prom.wait_for("logtally_module_dropped_events_total", limit, |v| {
            v == Some(DROPPED as f64)
        });
        // Committed: the table, the flush counters and /status agree with the metric.
        prom.wait_for("logtally_lag_bytes", limit, |v| v == Some(0.0));
        assert_eq!(sum_events(&url), Some(EVENTS as i64));
        let ok_flushes = prom
            .query_scalar("logtally_flushes_total{outcome=\"ok\"}")
            .unwrap();
        assert!(ok_flushes.is_some_and(|v| v >= 1.0), "{ok_flushes:?}");
        let rows = prom.query_scalar("logtally_rows_upserted_total").unwrap();
        // 7 ads × 2 event kinds, in one or two minute buckets, per flush that carried events
        // (a key read across two flushes is upserted twice).
        let max_rows = 28.0 * ok_flushes.unwrap();
        assert!(
            rows.is_some_and(|v| (14.0..=max_rows).contains(&v)),
            "{rows:?}"
        );
        let flush_count = prom
            .query_scalar("logtally_flush_duration_seconds_count")
            .unwrap();
        assert!(flush_count.is_some_and(|v| v >= 1.0), "{flush_count:?}");

        let deadline = Instant::now() + limit;
        let status = loop {
            let s = sidecar.status();
            let committed = s["segments"]
                .as_object()
                .is_some_and(|m| m.values().all(|seg| seg["lag_bytes"] == 0));
            if committed || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(status["ready"], true, "{status:#}");
        assert_eq!(status["node"], "obs-e2e");
        assert_eq!(status["module_dropped_events"], DROPPED, "{status:#}");
        assert_eq!(status["database"]["up"], true);
        assert_eq!(status["last_flush"]["outcome"], "ok");
        assert_eq!(status["rules"][0]["table"], "obs_events_1m");
        assert_eq!(status["lag_bytes"], 0, "{status:#}");
        // The segment is either still listed fully committed, or already deleted.
        for (name, seg) in status["segments"].as_object().unwrap() {
            assert_eq!(
                seg["committed_offset"], seg["size_bytes"],
                "{name}: {status:#}"
            );
            assert_eq!(seg["sealed"], true, "{name}");
        }
    }

    #[test]
    fn readyz_and_prometheus_follow_a_postgres_outage() {
        let mut pg = TestPostgres::start();
        if !pg.is_private() {
            eprintln!("skipped: TEST_DATABASE_URL is a server this test cannot stop");
            return;
        }
        let url = database(&pg);
        let mut sidecar = Sidecar::start(&url);
        assert_eq!(sidecar.wait_readyz(200, Duration::from_secs(30)), "ready\n");
        let alerts = repo_file("nginx-conf/logtally-alerts.yml");
        let prom = TestPrometheus::start(&[sidecar.addr], &[alerts.as_path()]);
        let limit = Duration::from_secs(30);
        prom.wait_for("logtally_ready", limit, |v| v == Some(1.0));

        let stopped = Instant::now();
        pg.stop();
        let body = sidecar.wait_readyz(503, limit);
        eprintln!(
            "/readyz 503 {:?} after PostgreSQL stopped",
            stopped.elapsed()
        );
        assert!(
            body.starts_with("not ready: database unreachable: "),
            "{body}"
        );
        assert_eq!(http_get(sidecar.addr, "/healthz").unwrap().status, 200);
        let status = sidecar.status();
        assert_eq!(status["ready"], false);
        assert_eq!(status["database"]["up"], false);
        assert!(status["database"]["last_error"].is_string(), "{status:#}");
        // Prometheus sees it too, and the shipped alert starts its `for` clock.
        prom.wait_for("logtally_database_up", limit, |v| v == Some(0.0));
        prom.wait_for("logtally_ready", limit, |v| v == Some(0.0));
        prom.wait_for(
            "ALERTS{alertname=\"LogtallyNotReady\",alertstate=\"pending\"}",
            limit,
            |v| v == Some(1.0),
        );
        let errors = prom.query_scalar("logtally_database_errors_total").unwrap();
        assert!(errors.is_some_and(|v| v >= 1.0), "{errors:?}");

        let restarted = Instant::now();
        pg.start_again();
        assert_eq!(sidecar.wait_readyz(200, limit), "ready\n");
        eprintln!(
            "/readyz 200 {:?} after PostgreSQL started again",
            restarted.elapsed()
        );
        assert_eq!(sidecar.status()["database"]["up"], true);
        prom.wait_for("logtally_ready", limit, |v| v == Some(1.0));
        prom.wait_for("ALERTS{alertname=\"LogtallyNotReady\"}", limit, |v| {
            v.is_none()
        });
    }

    /// Where nginx drops events on purpose: a 32-slot queue drained every 100 ms.
    const DROP_CONF: &str = r#"
    logtally_spool @DIR@/spool flush=100ms queue=32 fsync=off;
    server {
        listen 127.0.0.1:@PORT@;
        logtally on;
        logtally_field ad $arg_ad;
        logtally_field ev $arg_ev;
        logtally_field bytes $arg_b;
        location / { return 204; }
        location /status { logtally off; logtally_status; }
    }
"#;

    /// The value of an unlabelled sample `name` in Prometheus text.
    fn text_value(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    #[test]
    fn module_drops_agree_in_nginx_status_sidecar_metrics_status_and_prometheus() {
        const TOTAL: u64 = 4000;
        let pg = TestPostgres::start();
        let url = database(&pg);
        let nginx = TestNginx::start(DROP_CONF, 1);
        let mut sidecar = Sidecar::start_on(&url, Some(&nginx.dir().join("spool")));
        sidecar.wait_readyz(200, Duration::from_secs(30));
        let alerts = repo_file("nginx-conf/logtally-alerts.yml");
        let prom = TestPrometheus::start_jobs(
            &[
                ScrapeJob {
                    name: "logtally",
                    metrics_path: "/metrics",
                    targets: vec![sidecar.addr],
                },
                ScrapeJob {
                    name: "logtally-nginx",
                    metrics_path: "/status",
                    targets: vec![nginx.addr()],
                },
            ],
            &[alerts.as_path()],
        );
        let limit = Duration::from_secs(30);
        // Seen at 0 first, so `increase()` in the alert has a before and an after.
        prom.wait_for("logtally_module_dropped_events_total", limit, |v| {
            v == Some(0.0)
        });
        prom.wait_for("logtally_module_dropped_total", limit, |v| v == Some(0.0));

        let addr = nginx.addr();
        let clients: Vec<_> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut client = HttpClient::new(addr);
                    for i in (t..TOTAL).step_by(4) {
                        let target = format!("/e?ad=a{}&ev=view&b=10", i % 5);
                        let r = client.get(target.as_bytes(), &[]).expect("nginx answers");
                        assert_eq!(r.status, 204);
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }

        // nginx has accounted for every request once its writer wrote or dropped each.
        let nginx_status = || {
            let r = HttpClient::new(addr).get(b"/status", &[]).unwrap();
            String::from_utf8(r.body).unwrap()
        };
        let count = |text: &str, name: &str| text_value(text, name).unwrap() as u64;
        nginx.wait_until(limit, "every event written or dropped", || {
            let t = nginx_status();
            count(&t, "logtally_module_events_total") + count(&t, "logtally_module_dropped_total")
                == TOTAL
        });
        let t = nginx_status();
        let dropped = count(&t, "logtally_module_dropped_total");
        let written = count(&t, "logtally_module_events_total");
        assert!(dropped > 0, "the 32-slot queue must overflow:\n{t}");
        eprintln!("nginx: {written} events written, {dropped} dropped");

        // The sidecar's metric and /status say the same, from the spool's drop markers.
        let deadline = Instant::now() + limit;
        loop {
            let m = http_get(sidecar.addr, "/metrics").unwrap().text();
            let got = (
                text_value(&m, "logtally_module_dropped_events_total"),
                text_value(&m, "logtally_events_read_total"),
            );
            if got == (Some(dropped as f64), Some(written as f64)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar saw {got:?}\n{}",
                sidecar.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // /status is refreshed about every second: poll it too.
        let deadline = Instant::now() + limit;
        while sidecar.status()["module_dropped_events"] != dropped {
            assert!(Instant::now() < deadline, "{:#}", sidecar.status());
            std::thread::sleep(Duration::from_millis(100));
        }
        // And Prometheus, scraping both, agrees; the shipped drop alert fires.
        prom.wait_for("logtally_module_dropped_total", limit, |v| {
            v == Some(dropped as f64)
        });
        prom.wait_for("logtally_module_dropped_events_total", limit, |v| {
            v == Some(dropped as f64)
        });
        prom.wait_for(
            "ALERTS{alertname=\"LogtallyModuleDroppingEvents\",alertstate=\"firing\"}",
            limit,
            |v| v == Some(1.0),
        );
        // What was not dropped is in the table, exactly once.
        let deadline = Instant::now() + limit;
        while sum_events(&url) != Some(written as i64) {
            assert!(
                Instant::now() < deadline,
                "table has {:?}",
                sum_events(&url)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
