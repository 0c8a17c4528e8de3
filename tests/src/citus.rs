//! A real Citus cluster on loopback: a coordinator and workers, each a private
//! [`TestPostgres`] with `shared_preload_libraries = 'citus'`.
//!
//! [`TestCitus::start`] starts the servers (in parallel), creates database [`DATABASE`] with
//! `CREATE EXTENSION citus` on every node, registers the coordinator
//! (`citus_set_coordinator_host`) and each worker (`citus_add_node`). Tests then talk to the
//! coordinator, as the sidecar does. A worker can be stopped and started again on the same
//! port and data ([`TestCitus::stop_worker`], [`TestCitus::start_worker`]) and a new one added
//! ([`TestCitus::add_worker`]) to try a rebalance.
//!
//! Citus is not in Debian: `scripts/citus-build.sh` builds it into the local PostgreSQL.
//! [`citus_missing`] tells a test whether it can run, and why not.

use std::path::PathBuf;
use std::process::Command;

use crate::postgres::{server_log, server_program, TestPostgres};
use crate::sidecar::Db;

/// The database every node of a test cluster has, with the `citus` extension.
pub const DATABASE: &str = "logtally";

/// What every node runs with: Citus preloaded; logical WAL so that shard moves
/// (`citus_rebalance_start`) copy without blocking writes; room for the executor's
/// per-shard connections of several concurrent sidecars.
const NODE_SETTINGS: &[&str] = &[
    "shared_preload_libraries=citus",
    "wal_level=logical",
    "max_connections=300",
];

/// `None` when Citus is installed in the PostgreSQL the harness runs; otherwise why not.
pub fn citus_missing() -> Option<String> {
    let pg_config = server_program("pg_config");
    let dir = |flag: &str| -> Option<PathBuf> {
        let out = Command::new(&pg_config).arg(flag).output().ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let (Some(lib), Some(share)) = (dir("--pkglibdir"), dir("--sharedir")) else {
        return Some(format!("{} did not answer", pg_config.display()));
    };
    let so = lib.join("citus.so");
    let control = share.join("extension/citus.control");
    if !so.is_file() || !control.is_file() {
        return Some(format!(
            "no {} / {} (run scripts/citus-build.sh)",
            so.display(),
            control.display()
        ));
    }
    None
}

/// A coordinator and its workers.
#[derive(Debug)]
pub struct TestCitus {
    coordinator: TestPostgres,
    workers: Vec<TestPostgres>,
}

impl TestCitus {
    /// Starts a coordinator and `workers` workers and joins them into one cluster. Panics with
    /// the servers' logs when it cannot.
    pub fn start(workers: usize) -> TestCitus {
        let mut nodes = start_nodes(workers + 1);
        let coordinator = nodes.remove(0);
        let cluster = TestCitus {
            coordinator,
            workers: nodes,
        };
        let coordinator_port = cluster.coordinator.port().expect("private server");
        cluster.db().execute(&format!(
            "SELECT citus_set_coordinator_host('127.0.0.1', {coordinator_port})"
        ));
        for w in &cluster.workers {
            cluster.register(w);
        }
        cluster
    }

    fn register(&self, worker: &TestPostgres) {
        let port = worker.port().expect("private server");
        self.db()
            .execute(&format!("SELECT citus_add_node('127.0.0.1', {port})"));
    }

    /// The coordinator's [`DATABASE`] URL: what sidecars connect to.
    pub fn url(&self) -> String {
        self.coordinator.url(DATABASE)
    }

    /// Worker `i`'s [`DATABASE`] URL.
    pub fn worker_url(&self, i: usize) -> String {
        self.workers[i].url(DATABASE)
    }

    /// A blocking facade on the coordinator.
    pub fn db(&self) -> Db {
        Db::connect(&self.url())
    }

    /// A blocking facade on worker `i`.
    pub fn worker_db(&self, i: usize) -> Db {
        Db::connect(&self.worker_url(i))
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    pub fn coordinator_port(&self) -> u16 {
        self.coordinator.port().expect("private server")
    }

    pub fn worker_port(&self, i: usize) -> u16 {
        self.workers[i].port().expect("private server")
    }

    /// Stops worker `i` (fast shutdown), keeping its data and port.
    pub fn stop_worker(&mut self, i: usize) {
        self.workers[i].stop();
    }

    /// Starts worker `i` again on the same port and data.
    pub fn start_worker(&mut self, i: usize) {
        self.workers[i].start_again();
    }

    /// Starts one more worker and adds it to the cluster (`citus_add_node`): it holds no
    /// shards until a rebalance moves some there. Returns its index.
    pub fn add_worker(&mut self) -> usize {
        let node = start_nodes(1).remove(0);
        self.register(&node);
        self.workers.push(node);
        self.workers.len() - 1
    }

    /// Every node's whole server log: `("coordinator", …)`, then `("worker 0", …)`, ….
    pub fn node_logs(&self) -> Vec<(String, String)> {
        let mut out = vec![(
            "coordinator".to_string(),
            server_log(&self.coordinator).unwrap_or_default(),
        )];
        for (i, w) in self.workers.iter().enumerate() {
            out.push((format!("worker {i}"), server_log(w).unwrap_or_default()));
        }
        out
    }

    /// The end of every node's server log, for failure messages.
    pub fn server_logs(&self) -> String {
        self.node_logs()
            .into_iter()
            .map(|(name, log)| {
                let lines: Vec<&str> = log.lines().collect();
                let from = lines.len().saturating_sub(40);
                format!("--- {name} server.log ---\n{}", lines[from..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Starts `n` servers in parallel, each with [`DATABASE`] and the extension.
fn start_nodes(n: usize) -> Vec<TestPostgres> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(|| {
                let pg = TestPostgres::start_private(NODE_SETTINGS);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let url = rt.block_on(pg.create_database_named(DATABASE));
                Db::connect(&url).execute("CREATE EXTENSION citus");
                pg
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("start a Citus node"))
        .collect()
}

/// One connection kept open for polling (`pg_stat_activity` every few milliseconds must
/// not cost a new backend each time), with a blocking interface.
#[derive(Debug)]
pub struct Session {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Session {
    pub fn open(url: &str) -> Session {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect {url}: {e}"));
            tokio::spawn(conn);
            client
        });
        Session { rt, client }
    }

    pub fn query(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        self.rt.block_on(self.client.query(sql, &[]))
    }
}

/// How Citus holds a table: `pg_dist_partition`'s method (`h` hash-distributed, `n` none:
/// a reference or coordinator-local table) and replication model (`s` streaming / single
/// placement, `t` two-phase: a reference table), and the distribution column, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribution {
    pub method: char,
    pub replication: char,
    pub column: Option<String>,
}

/// `None` when `table` is not in Citus' metadata (a plain local table, or no such table).
pub fn distribution(db: &Db, table: &str) -> Option<Distribution> {
    let rows = db
        .query(&format!(
            "SELECT partmethod::text, repmodel::text, \
             CASE WHEN partkey IS NULL THEN NULL \
                  ELSE column_to_column_name(logicalrelid, partkey) END \
             FROM pg_dist_partition WHERE logicalrelid = to_regclass('{}')",
            table.replace('\'', "''")
        ))
        .expect("read pg_dist_partition");
    rows.first().map(|r| Distribution {
        method: r.get::<_, String>(0).chars().next().unwrap_or('?'),
        replication: r.get::<_, String>(1).chars().next().unwrap_or('?'),
        column: r.get(2),
    })
}
