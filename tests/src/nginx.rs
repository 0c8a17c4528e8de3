//! A real nginx with the logtally module, for tests.
//!
//! [`TestNginx::start`] writes a configuration (the caller's `http` block body, with `@PORT@`
//! and `@DIR@` replaced) into a fresh temporary prefix, starts nginx in the foreground
//! (`daemon off`, master + N workers) on a free 127.0.0.1 port and waits until it answers.
//! It sends signals (reload, quit), lists worker pids, reads the error log, and stops nginx
//! on drop. [`read_spool`] decodes every segment of a spool folder with the spool crate.
//!
//! Which nginx: by default the stock Debian `/usr/sbin/nginx` (1.22.1) with the Route A
//! module `target/release/libngx_http_logtally_module.so` (`scripts/nginx-build.sh module`).
//! `LOGTALLY_NGINX_ROUTE=vendored` picks Route B (`scripts/nginx-build.sh vendored`):
//! `.build/nginx-1.28/sbin/nginx` and the module next to it. `LOGTALLY_NGINX_BIN` and
//! `LOGTALLY_NGX_MODULE` override either path.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use logtally_spool::{decode_header, SegmentItem, SegmentReader};

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The nginx binary and module .so the tests use.
#[derive(Debug, Clone)]
pub struct NginxBuild {
    pub nginx: PathBuf,
    pub module: PathBuf,
}

impl NginxBuild {
    pub fn from_env() -> NginxBuild {
        let root = workspace_root();
        let vendored = std::env::var("LOGTALLY_NGINX_ROUTE").is_ok_and(|v| v == "vendored");
        let (nginx, module) = if vendored {
            let d = root.join(".build/nginx-1.28");
            (
                d.join("sbin/nginx"),
                d.join("modules/libngx_http_logtally_module.so"),
            )
        } else {
            (
                PathBuf::from("/usr/sbin/nginx"),
                root.join("target/release/libngx_http_logtally_module.so"),
            )
        };
        let nginx = std::env::var_os("LOGTALLY_NGINX_BIN").map_or(nginx, PathBuf::from);
        let module = std::env::var_os("LOGTALLY_NGX_MODULE").map_or(module, PathBuf::from);
        assert!(
            nginx.exists(),
            "no nginx at {} (see scripts/nginx-build.sh)",
            nginx.display()
        );
        assert!(
            module.exists(),
            "no module at {}: run scripts/nginx-build.sh module (or vendored)",
            module.display()
        );
        let rebuild = if vendored {
            "scripts/nginx-build.sh vendored"
        } else {
            "scripts/nginx-build.sh module"
        };
        crate::freshness::assert_fresh(
            &module,
            &["ngx-module/src", "ngx-module/build.rs", "spool/src"],
            rebuild,
        );
        NginxBuild { nginx, module }
    }
}

/// Sends signal `sig` to process `pid` through kill(1), so the test crate needs no `unsafe`.
/// Returns whether the signal was delivered.
pub fn send_signal(pid: i32, sig: i32) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A free TCP port on 127.0.0.1 (free when asked; nginx binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole nginx.conf around a test's `http` block body.
fn full_config(build: &NginxBuild, dir: &Path, workers: usize, port: u16, body: &str) -> String {
    let d = dir.display();
    let body = body
        .replace("@PORT@", &port.to_string())
        .replace("@DIR@", &d.to_string());
    format!(
        "load_module {module};
worker_processes {workers};
daemon off;
master_process on;
error_log {d}/error.log info;
pid {d}/nginx.pid;
worker_shutdown_timeout 10s;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
{body}
}}
",
        module = build.module.display(),
    )
}

fn new_prefix() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("logtally-nginx-")
        .tempdir()
        .unwrap();
    // Workers run as `nobody`: they must be able to reach the spool folder inside.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    // nginx opens its compiled-in error log (logs/error.log under the prefix for 1.28)
    // before it reads the configuration.
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    dir
}

/// Runs `nginx -t` on a configuration (same shape as [`TestNginx::start`]'s) in a fresh
/// prefix; `prepare` may create files in the prefix first. Returns the output.
pub fn test_config(body: &str, prepare: impl FnOnce(&Path)) -> Output {
    let build = NginxBuild::from_env();
    let dir = new_prefix();
    prepare(dir.path());
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, full_config(&build, dir.path(), 1, free_port(), body)).unwrap();
    Command::new(&build.nginx)
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap()
}

/// A running nginx in its own temporary prefix.
#[derive(Debug)]
pub struct TestNginx {
    build: NginxBuild,
    dir: tempfile::TempDir,
    port: u16,
    workers: usize,
    child: Option<Child>,
}

impl TestNginx {
    /// Starts nginx with `workers` workers and this `http` block body, and waits until it
    /// accepts connections. `@PORT@` and `@DIR@` in `body` become its port and prefix.
    pub fn start(body: &str, workers: usize) -> TestNginx {
        Self::start_with(body, workers, |_| {})
    }

    /// As [`start`](Self::start), after `prepare` ran on the prefix (e.g. to mount a spool).
    pub fn start_with(body: &str, workers: usize, prepare: impl FnOnce(&Path)) -> TestNginx {
        let build = NginxBuild::from_env();
        let mut dir = new_prefix();
        prepare(dir.path());
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut n = TestNginx {
                build: build.clone(),
                dir,
                port,
                workers,
                child: None,
            };
            n.write_config(body);
            let child = Command::new(&n.build.nginx)
                .arg("-p")
                .arg(n.dir.path())
                .arg("-c")
                .arg(n.conf_path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nginx");
            n.child = Some(child);
            match n.wait_ready() {
                Ok(()) => return n,
                Err(log) => {
                    last_log = log;
                    // A port taken between free_port() and bind: try another one.
                    let retry = last_log.contains("Address already in use");
                    let child = n.child.take();
                    dir = std::mem::replace(&mut n.dir, new_prefix());
                    if let Some(mut c) = child {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    if !retry {
                        break;
                    }
                    let _ = std::fs::remove_file(dir.path().join("error.log"));
                }
            }
        }
        panic!("nginx did not start:\n{last_log}");
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    /// Rewrites nginx.conf with a new `http` body (takes effect on [`reload`](Self::reload)).
    pub fn write_config(&self, body: &str) {
        let conf = full_config(&self.build, self.dir.path(), self.workers, self.port, body);
        std::fs::write(self.conf_path(), conf).unwrap();
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("nginx exited ({status}):\n{}", self.error_log()));
            }
            if TcpStream::connect(self.addr()).is_ok() && self.worker_pids().len() == self.workers {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("nginx not ready in 15 s:\n{}", self.error_log()))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The prefix folder (`@DIR@`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn master_pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: i32) {
        assert!(
            send_signal(self.master_pid(), sig),
            "kill -{sig} {}",
            self.master_pid()
        );
    }

    /// `nginx -s reload`: re-reads nginx.conf, starts new workers, retires old ones.
    pub fn reload(&self) {
        let out = Command::new(&self.build.nginx)
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.conf_path())
            .args(["-s", "reload"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Children of the master, with their command lines (`nginx: worker process`,
    /// `nginx: worker process is shutting down`).
    pub fn children(&self) -> Vec<(i32, String)> {
        let master = self.master_pid();
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The ppid is the second field after the parenthesised command name.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            let ppid = after.split(' ').nth(1).and_then(|p| p.parse::<i32>().ok());
            if ppid != Some(master) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd)
                .trim_end_matches('\0')
                .replace('\0', " ");
            out.push((pid, cmd));
        }
        out
    }

    /// Pids of the current (not shutting down) workers.
    pub fn worker_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .children()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("worker process") && !cmd.contains("shutting down"))
            .map(|(pid, _)| pid)
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Polls `cond` every 20 ms until it holds, or panics after `limit` with `what`.
    pub fn wait_until(&self, limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop (SIGQUIT): workers finish requests, drain, seal; waits for the master.
    pub fn quit(&mut self) {
        self.stop_with(libc::SIGQUIT, Duration::from_secs(20));
    }

    /// Fast stop (SIGTERM) and wait for the master; the prefix stays until drop.
    pub fn stop(&mut self) {
        self.stop_with(libc::SIGTERM, Duration::from_secs(20));
    }

    fn stop_with(&mut self, sig: i32, limit: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(child.id() as i32, sig);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nginx did not exit within {limit:?}\n{}", self.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestNginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first (a fast stop of the workers too), then make sure it is gone.
            send_signal(child.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time_ms: u64,
    pub values: Vec<Option<Vec<u8>>>,
}

/// What one segment file holds.
#[derive(Debug, Clone)]
pub struct SegmentContents {
    pub path: PathBuf,
    pub writer_pid: u32,
    pub fields: Vec<String>,
    pub header_len: usize,
    pub file_len: usize,
    pub events: Vec<Event>,
    /// Sum of drop markers.
    pub dropped: u64,
    /// The seal's (events, dropped), if the segment is sealed.
    pub seal: Option<(u64, u64)>,
    /// Bytes skipped as corrupt.
    pub corrupt_bytes: usize,
    /// Bytes after the last complete frame (a torn tail).
    pub torn_bytes: usize,
}

impl SegmentContents {
    /// The event's value of `field` (by name).
    pub fn value<'e>(&self, e: &'e Event, field: &str) -> Option<&'e [u8]> {
        let i = self.fields.iter().position(|f| f == field)?;
        e.values.get(i)?.as_deref()
    }
}

/// Decodes every segment (`*.seg`) in `dir`, sorted by name.
pub fn read_spool(dir: &Path) -> Vec<SegmentContents> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e == "seg"));
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            let (header, header_len) = decode_header(&bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .unwrap_or_else(|| panic!("{}: incomplete header", path.display()));
            let mut seg = SegmentContents {
                path: path.clone(),
                writer_pid: header.writer_pid,
                fields: header.fields,
                header_len,
                file_len: bytes.len(),
                events: Vec::new(),
                dropped: 0,
                seal: None,
                corrupt_bytes: 0,
                torn_bytes: 0,
            };
            for item in SegmentReader::new(&bytes[header_len..], header_len as u64) {
                match item {
                    SegmentItem::Event { record, .. } => seg.events.push(Event {
                        time_ms: record.time_ms,
                        values: record.values().map(|v| v.map(<[u8]>::to_vec)).collect(),
                    }),
                    SegmentItem::Dropped { count, .. } => seg.dropped += count,
                    SegmentItem::Seal {
                        events, dropped, ..
                    } => seg.seal = Some((events, dropped)),
                    SegmentItem::Corrupt { len, .. } => seg.corrupt_bytes += len,
                    SegmentItem::Torn { len, .. } => seg.torn_bytes = len,
                }
            }
            seg
        })
        .collect()
}

/// A minimal HTTP/1.1 client over one keep-alive connection. Targets and header values
/// are raw bytes, so tests can send what a browser would not (non-UTF-8, huge lines).
#[derive(Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    keep_alive: bool,
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpClient {
    /// A client reusing one connection.
    pub fn new(addr: SocketAddr) -> HttpClient {
        HttpClient {
            addr,
            conn: None,
            keep_alive: true,
        }
    }

    /// A client opening a new connection per request (`Connection: close`), so a request
    /// either gets its answer or provably never reached a worker's request handling.
    pub fn one_shot(addr: SocketAddr) -> HttpClient {
        HttpClient {
            addr,
            conn: None,
            keep_alive: false,
        }
    }

    /// Sends `GET <target>` with extra headers and reads the answer. On error the
    /// connection is dropped (the next request opens a new one).
    pub fn get(&mut self, target: &[u8], headers: &[(&str, &[u8])]) -> std::io::Result<Response> {
        let r = self.try_get(target, headers);
        if r.is_err() || !self.keep_alive {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self, target: &[u8], headers: &[(&str, &[u8])]) -> std::io::Result<Response> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("connected");
        let mut req = Vec::with_capacity(256 + target.len());
        req.extend_from_slice(b"GET ");
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: test\r\n");
        if !self.keep_alive {
            req.extend_from_slice(b"Connection: close\r\n");
        }
        for (k, v) in headers {
            req.extend_from_slice(k.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(v);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        conn.get_mut().write_all(&req)?;

        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut len = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if conn.read_line(&mut h)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().map_err(std::io::Error::other)?;
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0; len];
        conn.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        Ok(Response { status, body })
    }
}
