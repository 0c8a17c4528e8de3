//! nginx as a daemon (`daemon on`) for the fault campaign: a binary upgrade needs it. A
//! master that still has the parent it started with ignores USR2 ("the changing binary
//! signal is ignored"), and the harness's `TestNginx` is the test's own child. Here the
//! master is whatever `nginx.pid` names, so it survives the upgrade.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use logtally_e2e::nginx::{free_port, send_signal, NginxBuild};

use crate::faults::Nginx;

pub(crate) struct DaemonNginx {
    build: NginxBuild,
    dir: tempfile::TempDir,
    port: u16,
    stopped: bool,
}

impl DaemonNginx {
    /// Starts nginx (2 workers) with this `http` body (`@PORT@`, `@DIR@` replaced), after
    /// `prepare` ran on the prefix; waits until it serves.
    pub fn start(body: &str, prepare: &mut dyn FnMut(&Path)) -> DaemonNginx {
        let build = NginxBuild::from_env();
        let dir = tempfile::Builder::new()
            .prefix("logtally-chaos-")
            .tempdir()
            .unwrap();
        // Workers run as `nobody`: they must reach the spool inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        prepare(dir.path());
        let port = free_port();
        let d = dir.path().display().to_string();
        let body = body
            .replace("@PORT@", &port.to_string())
            .replace("@DIR@", &d);
        let conf = format!(
            "load_module {module};\nworker_processes 2;\ndaemon on;\nmaster_process on;\n\
             error_log {d}/error.log info;\npid {d}/nginx.pid;\nworker_shutdown_timeout 10s;\n\
             events {{ worker_connections 4096; }}\nhttp {{\n    access_log off;\n\
             client_body_temp_path {d}/tmp/body;\n    proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fastcgi;\n    uwsgi_temp_path {d}/tmp/uwsgi;\n\
             scgi_temp_path {d}/tmp/scgi;\n{body}\n}}\n",
            module = build.module.display(),
        );
        let n = DaemonNginx {
            build,
            dir,
            port,
            stopped: false,
        };
        std::fs::write(n.conf(), conf).unwrap();
        let out = n.command().output().unwrap();
        assert!(
            out.status.success(),
            "nginx did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            n.error_log()
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while n.worker_pids().len() != 2 || TcpStream::connect(n.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx not serving:\n{}",
                n.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.build.nginx);
        c.arg("-p").arg(self.dir.path()).arg("-c").arg(self.conf());
        c
    }

    /// The master `nginx.pid` names (0 if none).
    pub fn master_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.path().join("nginx.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn signal(&self, pid: i32, sig: i32) {
        assert!(send_signal(pid, sig), "kill -{sig} {pid}");
    }

    /// `nginx -s reload`.
    pub fn reload(&self) {
        let out = self.command().args(["-s", "reload"]).output().unwrap();
        assert!(
            out.status.success(),
            "reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The current master's workers that are not shutting down.
    pub fn worker_pids(&self) -> Vec<i32> {
        workers_of(self.master_pid(), false)
    }
}

/// Pids of `master`'s worker processes (`all`: also those shutting down).
pub(crate) fn workers_of(master: i32, all: bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid: i32 = stat[stat.rfind(')')? + 2..]
                .split(' ')
                .nth(1)?
                .parse()
                .ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            let worker = cmd.contains("worker process") && (all || !cmd.contains("shutting down"));
            (ppid == master && worker).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether `pid` runs (a zombie does not: a daemon's exit is reaped by init, maybe late).
pub(crate) fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

impl Nginx for DaemonNginx {
    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let master = self.master_pid();
        if master == 0 {
            return;
        }
        send_signal(master, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(master) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        send_signal(master, libc::SIGKILL);
    }
}

impl Drop for DaemonNginx {
    fn drop(&mut self) {
        self.stop();
    }
}
