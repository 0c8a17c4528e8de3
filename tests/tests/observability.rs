//! Observability end to end: the sidecar's `/metrics`, `/status`, `/readyz` as a real
//! Prometheus server and `promtool` see them, and the shipped alert rules and scrape
//! configuration.
//!
//! `admin_in_process` runs the sidecar's admin server inside the test (no database needed);
//! `with_daemon` runs the real `logtally` binary against a real PostgreSQL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use logtally::admin::{serve, AdminState};
use logtally::metrics::Metrics;
use logtally::status::{SharedStatus, Status};
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
        assert!(stdout.contains("SUCCESS: 3 rules found"), "{stdout}");

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
        assert!(String::from_utf8_lossy(&out.stdout).contains("3 rules found"));
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
