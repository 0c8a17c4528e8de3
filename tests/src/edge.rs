//! An edge node as the end-to-end tests run it: real nginx with the module logging the
//! ad-event fields of `GET /e?ad=…&ev=…&n=…`, and the real sidecar aggregating them into
//! `ad_events_1m` ([`RULE`]). Also the truth side: the totals the requests a test sent must
//! add up to ([`expected`]), the table's ([`totals`]), and a wait until the two agree.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::nginx::TestNginx;
use crate::sidecar::{free_addr, Db, TestSidecar};

/// The `http` block body of the edge's nginx (see [`TestNginx::start`]).
pub const NGINX_BODY: &str = r#"
    logtally_spool @DIR@/spool flush=20ms;
    logtally_field ad $arg_ad;
    logtally_field ev $arg_ev;
    logtally_field n  $arg_n;
    server {
        listen 127.0.0.1:@PORT@;
        location = /e { logtally on; return 204; }
        location = /logtally_status { logtally_status; }
    }
"#;

/// The sidecar's one rule.
pub const RULE: &str = r#"
[[rule]]
table = "ad_events_1m"
bucket = "1m"
group_by = ["ad", "ev"]
metrics = { events = "count", n_sum = "sum(n)", n_min = "min(n)", n_max = "max(n)" }
"#;

/// The event types requests carry (`Req::ev` indexes it).
pub const EVS: [&str; 3] = ["view", "click", "conversion"];

/// One request of a load: its ad, event type and a numeric value.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub ad: u32,
    pub ev: usize,
    pub n: u32,
}

impl Req {
    /// The request target nginx logs it from.
    pub fn target(&self) -> String {
        format!("/e?ad={}&ev={}&n={}", self.ad, EVS[self.ev], self.n)
    }
}

/// `(ad, ev) → (events, sum n, min n, max n)`.
pub type Totals = BTreeMap<(String, String), (i64, i64, i64, i64)>;

/// What `reqs` must add up to.
pub fn expected<'a>(reqs: impl IntoIterator<Item = &'a Req>) -> Totals {
    let mut t = Totals::new();
    for r in reqs {
        let e = t
            .entry((r.ad.to_string(), EVS[r.ev].to_string()))
            .or_insert((0, 0, i64::MAX, i64::MIN));
        e.0 += 1;
        e.1 += i64::from(r.n);
        e.2 = e.2.min(i64::from(r.n));
        e.3 = e.3.max(i64::from(r.n));
    }
    t
}

/// What the table holds, over all buckets.
pub fn totals(db: &Db) -> Result<Totals, tokio_postgres::Error> {
    let rows = db.query(
        "SELECT ad, ev, sum(events)::bigint, sum(n_sum)::bigint, min(n_min)::bigint, \
         max(n_max)::bigint FROM ad_events_1m GROUP BY ad, ev",
    )?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                (r.get(0), r.get(1)),
                (r.get(2), r.get(3), r.get(4), r.get(5)),
            )
        })
        .collect())
}

/// Polls the table until it equals `want`; on timeout shows the difference and `logs()`.
pub fn wait_for_totals(db: &Db, want: &Totals, limit: Duration, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + limit;
    let mut got = Totals::new();
    while Instant::now() < deadline {
        if let Ok(t) = totals(db) {
            if &t == want {
                return;
            }
            got = t;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let want_n: i64 = want.values().map(|v| v.0).sum();
    let got_n: i64 = got.values().map(|v| v.0).sum();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(5)
        .map(|(k, v)| (k, v, got.get(k)))
        .collect();
    panic!(
        "table totals differ: {got_n} events of {want_n}; first differing keys \
         (key, want, got) {wrong:?}\n{}",
        logs()
    );
}

/// The sidecar's configuration for one edge.
pub fn sidecar_config(
    url: &str,
    spool: &Path,
    dir: &Path,
    node: &str,
    listen: SocketAddr,
) -> String {
    sidecar_config_with_rules(url, spool, dir, node, listen, RULE)
}

/// [`sidecar_config`] with other `[[rule]]`s than [`RULE`] (e.g. with `distribute_by`).
pub fn sidecar_config_with_rules(
    url: &str,
    spool: &Path,
    dir: &Path,
    node: &str,
    listen: SocketAddr,
    rules: &str,
) -> String {
    format!(
        "spool_dir = \"{spool}\"\ndatabase_url = \"{url}\"\nnode = \"{node}\"\n\
         flush_interval = \"300ms\"\nlisten = \"{listen}\"\nbinlog = \"{binlog}\"\n{rules}",
        spool = spool.display(),
        binlog = dir.join("binlog").display(),
    )
}

/// One nginx + one sidecar, with its own spool and node name.
#[derive(Debug)]
pub struct Pair {
    pub nginx: TestNginx,
    pub sidecar: TestSidecar,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// Starts nginx with `workers` workers and a sidecar feeding the database at `url`.
    pub fn start(url: &str, node: &str, workers: usize) -> Pair {
        Pair::start_with_rules(url, node, workers, RULE)
    }

    /// [`Pair::start`] with the sidecar running `rules` (aggregating [`NGINX_BODY`]'s fields).
    pub fn start_with_rules(url: &str, node: &str, workers: usize, rules: &str) -> Pair {
        let nginx = TestNginx::start(NGINX_BODY, workers);
        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr();
        let config = dir.path().join("logtally.toml");
        let spool = nginx.dir().join("spool");
        let text = sidecar_config_with_rules(url, &spool, dir.path(), node, listen, rules);
        std::fs::write(&config, text).unwrap();
        let sidecar = TestSidecar::start(&config, &dir.path().join("logtally.log"), listen);
        Pair {
            nginx,
            sidecar,
            _dir: dir,
        }
    }

    /// A sample from the sidecar's `/metrics`, 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        self.sidecar.metric(name).unwrap_or(0.0)
    }
}

/// Every pair's sidecar log, for failure messages.
pub fn pair_logs(pairs: &[Pair]) -> String {
    pairs
        .iter()
        .map(|p| p.sidecar.log_text())
        .collect::<Vec<_>>()
        .join("\n---\n")
}
