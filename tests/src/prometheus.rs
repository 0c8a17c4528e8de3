//! A real Prometheus server for tests, plus a tiny blocking HTTP GET and `promtool` helpers.
//!
//! [`TestPrometheus::start`] writes a scrape configuration (1 s scrape and rule evaluation
//! interval) for the given targets into a temporary folder, starts `prometheus` on a free
//! 127.0.0.1 port with its TSDB in that folder, and waits until `/-/ready` answers. Queries
//! go through the HTTP API (`/api/v1/query`), exactly as a dashboard would. Drop stops the
//! server and removes the folder.
//!
//! The HTTP client speaks HTTP/1.0 so every answer is delimited by the connection closing:
//! no chunked decoding, no keep-alive, no dependency.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The Prometheus server binary (Debian package `prometheus`), overridable for other hosts.
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN").map_or_else(|| "prometheus".into(), PathBuf::from)
}

/// `promtool`, from the same package.
pub fn promtool_bin() -> PathBuf {
    std::env::var_os("PROMTOOL_BIN").map_or_else(|| "promtool".into(), PathBuf::from)
}

/// Runs `promtool <args>`, feeding `stdin` when given. Panics if it cannot be started.
pub fn promtool(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(promtool_bin())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", promtool_bin().display()));
    if let Some(input) = stdin {
        // Dropping the pipe after writing tells promtool the input is complete.
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input)
            .expect("write promtool stdin");
    }
    child.wait_with_output().expect("wait for promtool")
}

/// A response to [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// GET `path` (with its query string, already encoded) from `addr` over HTTP/1.0.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    let timeout = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "malformed HTTP response: {:?}",
                String::from_utf8_lossy(&raw)
            ),
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(HttpResponse {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters kept).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// One sample of an instant-vector query result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub value: f64,
}

/// One `scrape_configs` entry.
#[derive(Debug, Clone)]
pub struct ScrapeJob<'a> {
    pub name: &'a str,
    pub metrics_path: &'a str,
    pub targets: Vec<SocketAddr>,
}

/// A running Prometheus server scraping the given targets every second.
#[derive(Debug)]
pub struct TestPrometheus {
    child: Child,
    addr: SocketAddr,
    /// Holds config, TSDB and log; removed on drop after the server stopped.
    dir: tempfile::TempDir,
}

impl TestPrometheus {
    /// Starts Prometheus scraping `targets` (job `logtally`, path `/metrics`), loading
    /// `rule_files` (absolute paths). Panics with the server's log if it does not become
    /// ready within 30 s.
    pub fn start(targets: &[SocketAddr], rule_files: &[&Path]) -> TestPrometheus {
        let job = ScrapeJob {
            name: "logtally",
            metrics_path: "/metrics",
            targets: targets.to_vec(),
        };
        TestPrometheus::start_jobs(&[job], rule_files)
    }

    /// Starts Prometheus scraping each job every second, loading `rule_files`.
    pub fn start_jobs(jobs: &[ScrapeJob], rule_files: &[&Path]) -> TestPrometheus {
        let dir = tempfile::Builder::new()
            .prefix("logtally-prom-")
            .tempdir()
            .expect("temp dir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        if !rule_files.is_empty() {
            config.push_str("rule_files:\n");
            for f in rule_files {
                let _ = writeln!(config, "  - {:?}", f.display().to_string());
            }
        }
        config.push_str("scrape_configs:\n");
        for job in jobs {
            let list: Vec<String> = job
                .targets
                .iter()
                .map(|t| format!("{:?}", t.to_string()))
                .collect();
            let _ = writeln!(
                config,
                "  - job_name: {:?}\n    metrics_path: {:?}\n    static_configs:\n      - targets: [{}]",
                job.name,
                job.metrics_path,
                list.join(", ")
            );
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config).expect("write prometheus.yml");

        // A free port may be taken between our probe and the server's bind: try a few.
        let mut dir = dir;
        for _attempt in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
            let child = Command::new(prometheus_bin())
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", prometheus_bin().display()));
            let mut prom = TestPrometheus { child, addr, dir };
            match prom.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return prom,
                Err(why) if why.contains("address already in use") => {
                    let _ = prom.child.kill();
                    let _ = prom.child.wait();
                    // Take the folder back for the next attempt; the killed child is reaped.
                    dir = std::mem::replace(&mut prom.dir, tempfile::tempdir().expect("temp dir"));
                }
                Err(why) => panic!("{why}"),
            }
        }
        panic!("prometheus: no free port after 5 attempts");
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "prometheus exited ({status}) before ready:\n{}",
                    self.log()
                ));
            }
            if matches!(http_get(self.addr, "/-/ready"), Ok(r) if r.status == 200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "prometheus not ready in {limit:?}:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's HTTP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates an instant query now. Errors carry Prometheus's own message.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let resp = http_get(self.addr, &path).map_err(|e| format!("GET {path}: {e}"))?;
        let v: serde_json::Value = serde_json::from_slice(&resp.body)
            .map_err(|e| format!("query {promql}: {e}: {}", resp.text()))?;
        if v["status"] != "success" {
            return Err(format!(
                "query {promql}: HTTP {}: {}",
                resp.status,
                resp.text()
            ));
        }
        if v["data"]["resultType"] != "vector" {
            return Err(format!(
                "query {promql}: not an instant vector: {}",
                resp.text()
            ));
        }
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        result
            .into_iter()
            .map(|s| {
                let labels = s["metric"].as_object().cloned().unwrap_or_default();
                // Values come as [unix time, "string"] so NaN and ±Inf survive JSON.
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse::<f64>().ok())
                    .ok_or_else(|| format!("query {promql}: bad sample {s}"))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// The value of a query that must yield at most one sample (`None` if empty).
    pub fn query_scalar(&self, promql: &str) -> Result<Option<f64>, String> {
        let samples = self.query(promql)?;
        match samples.as_slice() {
            [] => Ok(None),
            [s] => Ok(Some(s.value)),
            many => Err(format!(
                "query {promql}: {} samples, wanted one",
                many.len()
            )),
        }
    }

    /// Polls `promql` until `pred` holds for its single value, or panics at the deadline
    /// with the last value seen. Returns the value that satisfied it.
    pub fn wait_for(
        &self,
        promql: &str,
        limit: Duration,
        pred: impl Fn(Option<f64>) -> bool,
    ) -> Option<f64> {
        let deadline = Instant::now() + limit;
        loop {
            let last = self.query_scalar(promql);
            if let Ok(v) = last {
                if pred(v) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: condition not met within {limit:?}; last: {last:?}\nprometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The health of the first scrape target, as Prometheus reports it (`up`, `down`,
    /// `unknown`), with its last scrape error.
    pub fn target_health(&self) -> Result<(String, String), String> {
        let resp =
            http_get(self.addr, "/api/v1/targets?state=active").map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&resp.body).map_err(|e| e.to_string())?;
        let t = &v["data"]["activeTargets"][0];
        Ok((
            t["health"].as_str().unwrap_or("").to_string(),
            t["lastError"].as_str().unwrap_or("").to_string(),
        ))
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_and_encodes_queries() {
        let r =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nAllow: GET\r\n\r\nbody").unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.header("allow"), Some("GET"));
        assert_eq!(r.body, b"body");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_none());
        assert_eq!(
            url_encode("a_b{x=\"1\"} [5m]"),
            "a_b%7Bx%3D%221%22%7D%20%5B5m%5D"
        );
    }
}
