//! A throwaway PostgreSQL server for tests.
//!
//! [`TestPostgres::start`] uses `TEST_DATABASE_URL` when it is set (a server someone else
//! runs); otherwise it runs `initdb` in a temporary folder and starts a private server with
//! `pg_ctl` on a free 127.0.0.1 port, fsync on, trust authentication, its socket inside the
//! data folder. Every test takes its own database ([`TestPostgres::create_database`]) so
//! tests can share a server and run in parallel. [`TestPostgres::stop`] and
//! [`TestPostgres::start_again`] simulate an outage on the same port and data. Drop stops the
//! server and removes the folder.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
//! `postgres` user through `runuser`.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A PostgreSQL server the tests may use and, when private, stop and start again.
#[derive(Debug)]
pub struct TestPostgres {
    server: Server,
}

#[derive(Debug)]
enum Server {
    /// `TEST_DATABASE_URL`: create databases on it, never stop it.
    External {
        url: String,
    },
    Private(Private),
}

#[derive(Debug)]
struct Private {
    /// Holds the data folder; removed on drop (after the server stopped).
    dir: tempfile::TempDir,
    port: u16,
    /// Run the PostgreSQL programs as `postgres` (we are root).
    as_postgres: bool,
    bin_dir: Option<PathBuf>,
    /// Extra `-c name=value` server settings (e.g. `shared_preload_libraries=citus`).
    settings: Vec<String>,
    running: bool,
}

/// Counter that makes database names unique within a test process.
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// Where the PostgreSQL server programs are: on PATH (`None`) or in a versioned folder.
fn find_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("initdb").is_file()))
        .unwrap_or(false);
    if on_path {
        return None;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// The path of a PostgreSQL server program (`initdb`, `pg_config`, …) as the harness runs it.
pub fn server_program(name: &str) -> PathBuf {
    program_in(find_bin_dir().as_deref(), name)
}

fn program_in(bin_dir: Option<&std::path::Path>, name: &str) -> PathBuf {
    match bin_dir {
        Some(b) => b.join(name),
        None => PathBuf::from(name),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

impl TestPostgres {
    /// Starts a private server (or uses `TEST_DATABASE_URL`). Panics with the server's output
    /// when it cannot.
    pub fn start() -> TestPostgres {
        if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
            if !url.is_empty() {
                return TestPostgres {
                    server: Server::External { url },
                };
            }
        }
        TestPostgres::start_private(&[])
    }

    /// Starts a private server (never `TEST_DATABASE_URL`) with extra server settings, each
    /// `name=value` as for `postgres -c`.
    pub fn start_private(settings: &[&str]) -> TestPostgres {
        let dir = tempfile::Builder::new()
            .prefix("logtally-pg-")
            .tempdir()
            .expect("temp dir");
        // A folder we just created is ours: its owner tells whether we are root.
        let as_postgres = std::fs::metadata(dir.path()).expect("stat temp dir").uid() == 0;
        if as_postgres {
            run_checked(Command::new("chown").arg("postgres:").arg(dir.path()));
        }
        let mut private = Private {
            dir,
            port: 0,
            as_postgres,
            bin_dir: find_bin_dir(),
            settings: settings.iter().map(|s| s.to_string()).collect(),
            running: false,
        };
        let data = private.data_dir();
        let mut initdb = private.command("initdb");
        initdb.args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run_checked(&mut initdb);
        // A free port may be taken between our probe and the server's bind: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            private.port = free_port();
            match private.pg_ctl_start() {
                Ok(()) => {
                    private.running = true;
                    return TestPostgres {
                        server: Server::Private(private),
                    };
                }
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start: {last}");
    }

    /// The port of a private server.
    pub fn port(&self) -> Option<u16> {
        match &self.server {
            Server::External { .. } => None,
            Server::Private(p) => Some(p.port),
        }
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        match &self.server {
            Server::External { url } => replace_db_in_url(url, db),
            Server::Private(p) => {
                format!(
                    "postgres://postgres@127.0.0.1:{}/{db}?connect_timeout=5",
                    p.port
                )
            }
        }
    }

    /// Creates a fresh, empty database and returns its URL.
    pub async fn create_database(&self) -> String {
        let name = format!(
            "logtally_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        self.create_database_named(&name).await
    }

    /// Creates database `name` (dropping one of that name first) and returns its URL.
    pub async fn create_database_named(&self, name: &str) -> String {
        let admin_url = match &self.server {
            Server::External { url } => url.clone(),
            Server::Private(_) => self.url("postgres"),
        };
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .expect("drop db");
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
        self.url(name)
    }

    /// A fresh database with the `hll` extension (`distinct(f)` metrics need it), or a loud
    /// failure naming the Debian package to install.
    pub async fn create_database_with_hll(&self) -> String {
        let url = self.create_database().await;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let task = tokio::spawn(conn);
        if let Err(e) = client.batch_execute("CREATE EXTENSION hll").await {
            panic!("CREATE EXTENSION hll failed (install postgresql-15-hll): {e}");
        }
        drop(client);
        let _ = task.await;
        url
    }

    /// Stops a private server (fast shutdown), keeping its data and port.
    pub fn stop(&mut self) {
        let Server::Private(p) = &mut self.server else {
            panic!("cannot stop the external TEST_DATABASE_URL server");
        };
        p.pg_ctl_stop("fast");
    }

    /// Starts a private server again on the same port and data.
    pub fn start_again(&mut self) {
        let Server::Private(p) = &mut self.server else {
            panic!("cannot start the external TEST_DATABASE_URL server");
        };
        p.pg_ctl_start().expect("PostgreSQL start again");
        p.running = true;
    }

    /// The data folder of a private server (its `pg_hba.conf`, certificates), to change
    /// the server's settings; apply with `SELECT pg_reload_conf()`.
    pub fn data_dir(&self) -> Option<PathBuf> {
        match &self.server {
            Server::External { .. } => None,
            Server::Private(p) => Some(p.data_dir()),
        }
    }

    /// Whether the server can be stopped (a private one).
    pub fn is_private(&self) -> bool {
        matches!(self.server, Server::Private(_))
    }
}

impl Private {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let program = program_in(self.bin_dir.as_deref(), program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
            self.port,
            data.display()
        );
        for s in &self.settings {
            options.push_str(" -c ");
            options.push_str(s);
        }
        let out = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
            ])
            .args(["-o", &options, "start"])
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let server_log = std::fs::read_to_string(&log).unwrap_or_default();
            Err(format!(
                "{}\n--- server.log ---\n{server_log}",
                describe(&out)
            ))
        }
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let data = self.data_dir();
        let out = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "stop",
            ])
            .output()
            .expect("run pg_ctl stop");
        if !out.status.success() {
            panic!("pg_ctl stop: {}", describe(&out));
        }
        self.running = false;
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Server::Private(p) = &mut self.server {
            if p.running {
                let data = p.data_dir();
                let _ = p
                    .command("pg_ctl")
                    .args([
                        "-D",
                        data.to_str().unwrap(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ])
                    .output();
                p.running = false;
            }
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", describe(&out));
}

/// `postgres://u@h:p/olddb?x=y` → `postgres://u@h:p/db?x=y`.
fn replace_db_in_url(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// The server log of a private server, for tests that want to show it on failure.
pub fn server_log(pg: &TestPostgres) -> Option<String> {
    match &pg.server {
        Server::External { .. } => None,
        Server::Private(p) => std::fs::read_to_string(p.dir.path().join("server.log")).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_database_is_replaced() {
        assert_eq!(
            replace_db_in_url("postgres://u@h:1/a?x=1", "b"),
            "postgres://u@h:1/b?x=1"
        );
        assert_eq!(
            replace_db_in_url("postgres://u@h:1", "b"),
            "postgres://u@h:1/b"
        );
        assert_eq!(
            replace_db_in_url("postgres://u@h/a", "b"),
            "postgres://u@h/b"
        );
    }

    #[tokio::test]
    async fn starts_creates_stops_and_starts_again() {
        let mut pg = TestPostgres::start();
        let url = pg.create_database().await;
        let query = |url: String| async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let row = client.query_one("SHOW fsync", &[]).await?;
            Ok::<String, tokio_postgres::Error>(row.get(0))
        };
        assert_eq!(query(url.clone()).await.unwrap(), "on");
        if pg.is_private() {
            pg.stop();
            assert!(
                query(url.clone()).await.is_err(),
                "server still answers after stop"
            );
            pg.start_again();
            assert_eq!(query(url).await.unwrap(), "on");
        }
    }
}
