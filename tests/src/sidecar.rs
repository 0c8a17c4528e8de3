//! The real `logtally` binary as a test process, and a blocking PostgreSQL facade for the
//! tests' own queries.
//!
//! The binary is `$LOGTALLY_BIN`, else the newest of `target/{release,debug}/logtally`
//! (`scripts/test.sh` builds it first); either way it must be newer than the sources it is
//! built from ([`crate::freshness`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::postgres::TestPostgres;
use crate::prometheus::http_get;

/// Where the `logtally` binary is.
pub fn logtally_bin() -> PathBuf {
    let bin = find_logtally_bin();
    crate::freshness::assert_fresh(
        &bin,
        &["sidecar/src", "spool/src"],
        "cargo build --release -p logtally",
    );
    bin
}

fn find_logtally_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOGTALLY_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("logtally"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "no logtally binary under {}: run `cargo build --release -p logtally` or set LOGTALLY_BIN",
                target.display()
            )
        })
}

/// A free TCP address on loopback (for the sidecar's `listen`).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running `logtally run -c <config>`; its stdout and stderr are appended to `log`.
#[derive(Debug)]
pub struct TestSidecar {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
}

impl TestSidecar {
    /// Starts the sidecar. `listen` must be the config's `listen` address.
    pub fn start(config: &Path, log: &Path, listen: SocketAddr) -> TestSidecar {
        let child = Self::spawn(config, log);
        TestSidecar {
            child,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            listen,
        }
    }

    /// Starts the sidecar under a wrapper command: `wrapper[0] wrapper[1..] logtally run -c
    /// <config>` (e.g. `unshare --pid --fork --mount-proc`). [`pid`](Self::pid) is then the
    /// wrapper's; signals to it reach the sidecar only if the wrapper forwards them.
    pub fn start_wrapped(
        config: &Path,
        log: &Path,
        listen: SocketAddr,
        wrapper: &[&str],
    ) -> TestSidecar {
        let mut command = Command::new(wrapper[0]);
        command.args(&wrapper[1..]).arg(logtally_bin());
        TestSidecar {
            child: Self::spawn_command(command, config, log),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            listen,
        }
    }

    fn spawn(config: &Path, log: &Path) -> Child {
        Self::spawn_command(Command::new(logtally_bin()), config, log)
    }

    fn spawn_command(mut command: Command, config: &Path, log: &Path) -> Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        command
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start logtally")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, and wait for it to be gone.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits at most `limit` for the process to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `kill -9`, then start it again on the same configuration.
    pub fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::spawn(&self.config, &self.log);
    }

    /// SIGTERM, then wait (at most 30 s) for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "logtally did not exit within 30 s of SIGTERM:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A sample's value from `/metrics` (the first series of that name).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.listen, "/metrics").ok()?.text();
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for TestSidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking facade over tokio-postgres for one test database.
#[derive(Debug)]
pub struct Db {
    rt: tokio::runtime::Runtime,
    url: String,
}

impl Db {
    /// Creates a fresh database in `pg`.
    pub fn create(pg: &TestPostgres) -> Db {
        let mut db = Db::connect("");
        db.url = db.rt.block_on(pg.create_database());
        db
    }

    /// A facade for the existing database at `url`.
    pub fn connect(url: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Db {
            rt,
            url: url.to_string(),
        }
    }

    /// A database that exists (or will) at `url`.
    pub fn at(url: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Db {
            rt,
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs a query on a new connection.
    pub fn query(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        self.rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
            let task = tokio::spawn(conn);
            let rows = client.query(sql, &[]).await;
            drop(client);
            let _ = task.await;
            rows
        })
    }

    /// Runs SQL statements on a new connection; panics on error.
    pub fn execute(&self, sql: &str) {
        self.try_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Runs SQL statements on a new connection.
    pub fn try_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
            let task = tokio::spawn(conn);
            let result = client.batch_execute(sql).await;
            drop(client);
            let _ = task.await;
            result
        })
    }
}
