//! What an operator meets when the database is not as configured: the real `logtally`
//! binary against a real PostgreSQL whose password, database or availability is wrong,
//! then fixed while the sidecar runs; secrets kept out of logs, `check` and `/status`;
//! TLS with a self-signed certificate.
//!
//! The binary is `$LOGTALLY_BIN`, else the newest of `target/{release,debug}/logtally`.
//! Tests that change `pg_hba.conf` or `ssl` need a private server (not `TEST_DATABASE_URL`)
//! and say so by failing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use logtally_e2e::postgres::TestPostgres;
use logtally_e2e::prometheus::http_get;
use logtally_e2e::sidecar::{free_addr, logtally_bin, Db, TestSidecar};
use logtally_spool::{encode_event, SegmentWriter, SegmentWriterConfig};

/// 2025-11-28T00:00:00Z: event times start here.
const T0: u64 = 1_764_288_000_000;

const RULE: &str = r#"
[[rule]]
table = "ops_1m"
bucket = "1m"
group_by = ["ad"]
metrics = { events = "count", bytes = "sum(bytes)" }
"#;

/// `ad → (events, bytes)`.
type Totals = BTreeMap<String, (i64, i64)>;

/// A test's folder: spool, config, binlog, log; and what was written to the spool.
struct Site {
    dir: tempfile::TempDir,
    spool: PathBuf,
    listen: SocketAddr,
    expected: Totals,
    next_pid: u32,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        Site {
            dir,
            spool,
            listen: free_addr(),
            expected: Totals::new(),
            next_pid: 1000,
        }
    }

    /// Writes a config; `database` is the whole `database_url = …` line (or other keys).
    fn config(&self, database: &str) -> PathBuf {
        let path = self.dir.path().join("logtally.toml");
        let text = format!(
            "spool_dir = \"{}\"\n{database}\nnode = \"ops-node\"\nflush_interval = \"200ms\"\n\
             listen = \"{}\"\nbinlog = \"{}\"\n{RULE}",
            self.spool.display(),
            self.listen,
            self.dir.path().join("state/binlog").display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("sidecar.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// One sealed segment of `n` events: `ad` cycles over 7 values, `bytes` is the index.
    fn write_segment(&mut self, n: u64) {
        self.next_pid += 1;
        let mut w = SegmentWriter::new(SegmentWriterConfig {
            dir: self.spool.clone(),
            fields: vec!["ad".into(), "bytes".into()],
            segment_size: u64::MAX,
            pid: self.next_pid,
            fsync: false,
        })
        .unwrap();
        let mut buf = Vec::new();
        for i in 0..n {
            let ad = format!("ad{}", i % 7);
            let bytes = i.to_string();
            encode_event(
                &mut buf,
                T0 + i,
                [Some(ad.as_bytes()), Some(bytes.as_bytes())],
            );
            let e = self.expected.entry(ad).or_default();
            e.0 += 1;
            e.1 += i as i64;
        }
        w.append(&buf, n, 0, T0).unwrap();
        w.seal(T0).unwrap();
    }

    fn start(&self, config: &Path) -> TestSidecar {
        TestSidecar::start(config, &self.log(), self.listen)
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.listen, path)
            .ok()
            .map(|r| (r.status, r.text()))
    }

    fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get("/status")?.1).ok()
    }

    /// Polls until `cond` holds; on timeout panics with `what` and the sidecar's log.
    fn wait_until(&self, limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}\n--- sidecar log ---\n{}",
            self.log_text()
        );
    }

    /// Waits until `/readyz` is 503 with a reason containing `text`; returns the reason.
    fn wait_not_ready_with(&self, text: &str) -> String {
        let mut body = String::new();
        self.wait_until(
            Duration::from_secs(30),
            &format!("/readyz naming {text:?}"),
            || match self.get("/readyz") {
                Some((503, b)) if b.contains(text) => {
                    body = b;
                    true
                }
                _ => false,
            },
        );
        body
    }

    /// Waits until the table holds exactly what was written (never more).
    fn wait_for_totals(&self, db: &Db) {
        let want: i64 = self.expected.values().map(|v| v.0).sum();
        self.wait_until(Duration::from_secs(60), "exact totals", || {
            let Ok(t) = totals(db) else { return false };
            let got: i64 = t.values().map(|v| v.0).sum();
            assert!(got <= want, "counted {got} events, only {want} written");
            t == self.expected
        });
    }
}

fn totals(db: &Db) -> Result<Totals, tokio_postgres::Error> {
    let rows =
        db.query("SELECT ad, sum(events)::bigint, sum(bytes)::bigint FROM ops_1m GROUP BY ad")?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// The database name at the end of a test URL (`…/name?…`).
fn db_name(url: &str) -> String {
    let path = url.split('?').next().unwrap();
    path.rsplit('/').next().unwrap().to_string()
}

/// The server's data folder, or a loud failure: these tests change the server's settings.
fn data_dir(pg: &TestPostgres) -> PathBuf {
    pg.data_dir().expect(
        "this test changes pg_hba.conf/ssl: it needs a private server, unset TEST_DATABASE_URL",
    )
}

/// Puts `line` first in `pg_hba.conf` (first match wins) and reloads the server.
fn prepend_hba(pg: &TestPostgres, db: &Db, line: &str) {
    let hba = data_dir(pg).join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("{line}\n{old}")).unwrap();
    db.execute("SELECT pg_reload_conf()");
}

/// Creates login role `app` with `password`, owning the test database.
fn create_app_role(db: &Db, password: &str) {
    db.execute(&format!(
        "CREATE ROLE app LOGIN PASSWORD '{password}'; ALTER DATABASE {} OWNER TO app",
        db_name(db.url())
    ));
}

/// Waits until the server refuses `url` with SQLSTATE `code` (a reload is asynchronous).
fn wait_refused(url: &str, code: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = rt.block_on(async {
            match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                Ok(_) => None,
                Err(e) => e.code().map(|c| c.code().to_string()),
            }
        });
        if got.as_deref() == Some(code) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server never refused {url} with {code}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn error_lines(log: &str, text: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("ERROR") && l.contains(text))
        .count()
}

#[test]
fn a_wrong_password_is_named_and_fixing_it_catches_up_without_a_restart() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let port = pg.port().expect("private server");
    create_app_role(&db, "right-one");
    prepend_hba(&pg, &db, "host all app 127.0.0.1/32 scram-sha-256");
    let name = db_name(db.url());
    let url = format!("postgres://app:Wr0ng-s3cret@127.0.0.1:{port}/{name}?connect_timeout=5");
    wait_refused(&url, "28P01");

    let mut site = Site::new();
    site.write_segment(3_000);
    site.write_segment(2_000);
    let config = site.config(&format!("database_url = \"{url}\""));
    let mut sidecar = site.start(&config);

    let reason = site.wait_not_ready_with(r#"password authentication failed for user "app""#);
    assert!(reason.contains("28P01"), "{reason}");
    let status = site
        .status()
        .expect("/status answers while the database refuses");
    let db_status = &status["database"];
    assert_eq!(db_status["up"], false);
    assert!(
        db_status["last_error"]
            .as_str()
            .unwrap()
            .contains(r#"password authentication failed for user "app""#),
        "{db_status}"
    );
    assert_eq!(db_status["last_error_class"], "needs_operator");
    // Several retries later: still running, and the error was logged at error level once.
    site.wait_until(Duration::from_secs(30), "three failed attempts", || {
        sidecar
            .metric("logtally_database_errors_total")
            .is_some_and(|n| n >= 3.0)
    });
    assert!(sidecar.wait(Duration::ZERO).is_none(), "run stopped");
    let log = site.log_text();
    assert_eq!(
        error_lines(&log, "password authentication failed"),
        1,
        "one error-level line per distinct error:\n{log}"
    );

    // The operator sets the password the sidecar uses: it catches up, exactly.
    db.execute("ALTER ROLE app PASSWORD 'Wr0ng-s3cret'");
    site.wait_for_totals(&db);
    site.wait_until(Duration::from_secs(10), "/readyz 200", || {
        site.get("/readyz").is_some_and(|(code, _)| code == 200)
    });
    assert!(site.log_text().contains("database reachable again"));
    for (what, text) in [
        ("log", site.log_text()),
        ("/status", site.get("/status").unwrap().1),
    ] {
        assert!(
            !text.contains("Wr0ng-s3cret"),
            "the password is in the {what}:\n{text}"
        );
    }
    sidecar.terminate();
}

#[test]
fn a_missing_database_is_named_and_creating_it_catches_up() {
    let pg = TestPostgres::start();
    let admin = Db::create(&pg);
    let name = format!("logtally_absent_{}", std::process::id());
    let url = pg.url(&name);
    let mut site = Site::new();
    site.write_segment(4_000);
    let config = site.config(&format!("database_url = \"{url}\""));
    let sidecar = site.start(&config);

    site.wait_not_ready_with(&format!(r#"database "{name}" does not exist"#));
    let status = site.status().unwrap();
    assert_eq!(status["database"]["last_error_class"], "needs_operator");

    admin.execute(&format!("CREATE DATABASE {name}"));
    let db = Db::at(&url);
    site.wait_for_totals(&db);
    sidecar.terminate();
}

#[test]
fn a_stopped_server_is_transient_and_nothing_is_lost() {
    let mut pg = TestPostgres::start();
    let db = Db::create(&pg);
    let mut site = Site::new();
    site.write_segment(1_000);
    let config = site.config(&format!("database_url = \"{}\"", db.url()));
    let sidecar = site.start(&config);
    site.wait_for_totals(&db);

    pg.stop();
    site.write_segment(2_500);
    site.wait_until(
        Duration::from_secs(30),
        "a transient database error",
        || {
            site.status()
                .is_some_and(|s| s["database"]["last_error_class"] == "transient")
        },
    );
    let (code, reason) = site.get("/readyz").unwrap();
    assert_eq!(code, 503, "{reason}");
    assert!(reason.contains("database unreachable"), "{reason}");
    pg.start_again();
    site.wait_for_totals(&db);
    sidecar.terminate();
}

/// `logtally check -c config` with extra environment; (success, stdout + stderr).
fn check(config: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(logtally_bin())
        .args(["check", "-c"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn secrets_stay_out_of_logs_check_and_status_from_a_file_or_the_environment() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let port = pg.port().expect("private server");
    create_app_role(&db, "Sup3r@Secret");
    prepend_hba(&pg, &db, "host all app 127.0.0.1/32 scram-sha-256");
    let name = db_name(db.url());
    wait_refused(
        &format!("postgres://app:x@127.0.0.1:{port}/{name}"),
        "28P01",
    );

    let mut site = Site::new();
    site.write_segment(1_500);
    let url_file = site.dir.path().join("database-url");
    std::fs::write(
        &url_file,
        format!("postgres://app:Sup3r%40Secret@127.0.0.1:{port}/{name}?sslmode=disable\n"),
    )
    .unwrap();
    let config = site.config(&format!(
        "database_url_file = {:?}",
        url_file.display().to_string()
    ));
    let leaks = |what: &str, text: &str| {
        for secret in ["Sup3r", "Secret", "Wr0ng"] {
            assert!(
                !text.contains(secret),
                "{secret:?} is in the {what}:\n{text}"
            );
        }
    };

    let (ok, out) = check(&config, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("(from database_url_file {})", url_file.display())),
        "{out}"
    );
    leaks("check output", &out);

    // The environment overrides the file; a `?password=` parameter stays hidden too.
    let env_url = format!("postgres://app@127.0.0.1:{port}/{name}?password=Sup3r%40Secret");
    let (ok, out) = check(&config, &[("LOGTALLY_DATABASE_URL", &env_url)]);
    assert!(ok, "{out}");
    assert!(
        out.contains("(from environment LOGTALLY_DATABASE_URL)"),
        "{out}"
    );
    leaks("check output", &out);
    // A wrong password in key=value form: refused, named, not shown.
    let wrong = format!("host=127.0.0.1 port={port} dbname={name} user=app password='Wr0ng pw'");
    let (ok, out) = check(&config, &[("LOGTALLY_DATABASE_URL", &wrong)]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(r#"password authentication failed for user "app""#),
        "{out}"
    );
    leaks("check output", &out);

    let sidecar = site.start(&config);
    site.wait_for_totals(&db);
    leaks("/status", &site.get("/status").unwrap().1);
    sidecar.terminate();
    leaks("log", &site.log_text());
}

/// `openssl` with `args` in `dir`; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (needed to make the test certificates)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name.crt` / `name.key` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// Turns on TLS in `pg` with a certificate for 127.0.0.1 signed by a fresh CA, and lets
/// role `app` in only over TLS. Returns the folder holding `ca.crt` and `other-ca.crt` (a
/// CA that signed nothing).
fn enable_tls(pg: &TestPostgres, db: &Db) -> tempfile::TempDir {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );
    let data = data_dir(pg);
    for f in ["server.crt", "server.key"] {
        std::fs::copy(dir.join(f), data.join(f)).unwrap();
        // The server runs as `postgres` (we are root) and wants its key private.
        let _ = Command::new("chown")
            .arg("postgres:")
            .arg(data.join(f))
            .status();
        let _ = Command::new("chmod").arg("600").arg(data.join(f)).status();
    }
    db.execute("ALTER SYSTEM SET ssl = on");
    prepend_hba(
        pg,
        db,
        "hostnossl all app 127.0.0.1/32 reject\nhostssl all app 127.0.0.1/32 trust",
    );
    certs
}

#[test]
fn tls_require_and_verify_full_against_a_self_signed_server() {
    let pg = TestPostgres::start();
    let db = Db::create(&pg);
    let port = pg.port().expect("private server");
    create_app_role(&db, "unused");
    let certs = enable_tls(&pg, &db);
    let name = db_name(db.url());
    let base = format!("postgres://app@127.0.0.1:{port}/{name}");
    // Without TLS the server now refuses `app` (so a success below went over TLS).
    wait_refused(&format!("{base}?sslmode=disable"), "28000");

    let mut site = Site::new();
    site.write_segment(2_000);
    let config = site.config("");
    let with = |url: &str| check(&config, &[("LOGTALLY_DATABASE_URL", url)]);

    let (ok, out) = with(&format!("{base}?sslmode=require"));
    assert!(ok, "require: {out}");

    let wrong_ca = certs.path().join("other-ca.crt");
    let (ok, out) = with(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        wrong_ca.display()
    ));
    assert!(
        !ok,
        "verify-full with a CA that signed nothing succeeded: {out}"
    );
    assert!(
        out.contains(&wrong_ca.display().to_string()),
        "names the CA file: {out}"
    );
    assert!(out.contains("UnknownIssuer"), "says why: {out}");

    let right_ca = certs.path().join("ca.crt");
    let url = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        right_ca.display()
    );
    let (ok, out) = with(&url);
    assert!(ok, "verify-full with the right CA: {out}");

    let config = site.config(&format!("database_url = \"{url}\""));
    let sidecar = site.start(&config);
    site.wait_for_totals(&db);
    sidecar.terminate();
}
