//! The admin HTTP server on the `listen` address: `/` (the status page), `/metrics`
//! (Prometheus text), `/status` (JSON), `/healthz` (the process answers) and `/readyz`
//! (database up and flushes committing). hyper 1, HTTP/1.1, one task per connection. While
//! it serves, it samples the events counter into `/status` once a second (the page's chart).
//!
//! The listener and the shutdown future are arguments, so the daemon decides where to
//! listen and when to stop, and tests inject both.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::metrics::Metrics;
use super::status::{SharedStatus, Status};
use crate::now_ms;

/// How long a client may take to send its request headers (slow clients must not pin
/// connections forever).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight requests before leaving them behind.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the events counter is sampled for `events_per_second`.
const RATE_SAMPLE: Duration = Duration::from_secs(1);

/// What the handlers read: the metrics registry and the status the run loop maintains.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub status: SharedStatus,
}

/// Serves the admin routes on `listener` until `shutdown` completes, then stops accepting,
/// lets in-flight requests finish (up to a few seconds) and returns.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: impl Future<Output = ()>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin server listening");
    }
    tokio::pin!(shutdown);
    let sampler = tokio::spawn(sample_events(state.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning, the
                    // condition clears when connections close.
                    warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let state = state.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let response = handle(&state, req.method(), req.uri().path(), now_ms());
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    sampler.abort();
    tokio::select! {
        () = graceful.shutdown() => debug!("admin server stopped"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => warn!("admin connections still open at shutdown"),
    }
}

/// Copies the events and decode-error counters into the status once a second.
async fn sample_events(state: AdminState) {
    let mut every = tokio::time::interval(RATE_SAMPLE);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let events = state.metrics.events_read.get();
        let errors = state.metrics.decode_errors.get();
        state
            .status
            .update(|s| s.sample_events(now_ms(), events, errors));
    }
}

/// `/status` body: the snapshot plus the readiness verdict at the time of the request.
#[derive(Serialize)]
struct StatusBody<'a> {
    ready: bool,
    not_ready_reason: Option<String>,
    now_ms: u64,
    #[serde(flatten)]
    status: &'a Status,
}

/// Routes one request. No clock of its own (`now_ms` is passed in); its only write is the
/// `logtally_ready` gauge, refreshed at each scrape because readiness depends on the time.
fn handle(state: &AdminState, method: &Method, path: &str, now_ms: u64) -> Response<Full<Bytes>> {
    let known = matches!(path, "/" | "/metrics" | "/status" | "/healthz" | "/readyz");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if method != Method::GET {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return resp;
    }
    match path {
        "/" => super::page::response(),
        "/metrics" => {
            let ready = state.status.readiness(now_ms).is_ok();
            state.metrics.ready.set(i64::from(ready));
            let (content_type, body) = state.metrics.encode();
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                resp.headers_mut().insert(CONTENT_TYPE, v);
            }
            resp
        }
        "/status" => {
            let status = state.status.snapshot();
            let verdict = super::status::readiness(&status, now_ms);
            let body = StatusBody {
                ready: verdict.is_ok(),
                not_ready_reason: verdict.err().map(|e| e.to_string()),
                now_ms,
                status: &status,
            };
            match serde_json::to_vec_pretty(&body) {
                Ok(json) => {
                    let mut json = super::page::html_safe_json(&json);
                    json.push(b'\n');
                    let mut resp = Response::new(Full::new(Bytes::from(json)));
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    resp
                }
                Err(error) => {
                    warn!(%error, "serialising /status");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "status unavailable\n")
                }
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => match state.status.readiness(now_ms) {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {reason}\n"),
            ),
        },
    }
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = code;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Probes must see the live answer, never a cached one.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::status::{FlushOutcome, FlushStatus};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    struct Reply {
        code: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    fn parse(raw: &[u8]) -> Reply {
        let raw = String::from_utf8(raw.to_vec()).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
        let mut lines = head.split("\r\n");
        let code = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        Reply {
            code,
            headers,
            body: body.to_string(),
        }
    }

    /// One request on a fresh connection that the client asks to close.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("response within deadline")
            .unwrap();
        parse(&raw)
    }

    struct Server {
        addr: SocketAddr,
        state: AdminState,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(status: Status) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AdminState {
            metrics: Arc::new(Metrics::new().unwrap()),
            status: SharedStatus::new(status),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    fn fresh_status() -> Status {
        Status::new("node-a", Duration::from_secs(1), &[], now_ms())
    }

    #[tokio::test]
    async fn metrics_route_serves_the_registry_with_the_encoder_content_type() {
        let srv = start(fresh_status()).await;
        srv.state.metrics.events_read.inc_by(17);
        let r = request(srv.addr, "GET", "/metrics").await;
        assert_eq!(r.code, 200);
        assert_eq!(
            r.header("content-type"),
            Some(srv.state.metrics.encode().0.as_str())
        );
        assert!(
            r.body.contains("\nlogtally_events_read_total 17\n"),
            "{}",
            r.body
        );
        assert!(r.body.contains("\nlogtally_ready 0\n"), "{}", r.body);
        srv.state
            .status
            .update(|s| s.record_database(now_ms(), Ok(())));
        let r = request(srv.addr, "GET", "/metrics").await;
        assert!(r.body.contains("\nlogtally_ready 1\n"), "{}", r.body);
    }

    #[tokio::test]
    async fn status_route_is_json_with_the_snapshot_and_verdict() {
        let srv = start(fresh_status()).await;
        let r = request(srv.addr, "GET", "/status").await;
        assert_eq!(r.code, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["ready"], false);
        assert_eq!(
            v["not_ready_reason"],
            "database unreachable: not connected yet"
        );

        srv.state.status.update(|s| {
            s.record_flush(FlushStatus {
                at_ms: now_ms(),
                duration_seconds: 0.02,
                rows: 12,
                outcome: FlushOutcome::Ok,
                error: None,
            })
        });
        let v: serde_json::Value =
            serde_json::from_str(&request(srv.addr, "GET", "/status").await.body).unwrap();
        assert_eq!(v["ready"], true);
        assert_eq!(v["not_ready_reason"], serde_json::Value::Null);
        assert_eq!(v["last_flush"]["rows"], 12);
    }

    #[tokio::test]
    async fn root_serves_the_page_and_status_json_escapes_markup() {
        let rule = crate::config::parse(
            std::path::Path::new("t.toml"),
            "node = \"n\"\n[[rule]]\ntable = \"t\"\nbucket = \"1m\"\ngroup_by = [\"ua\"]\nmetrics = { hits = \"count\" }\n",
        )
        .unwrap()
        .rules;
        let srv = start(Status::new("n", Duration::from_secs(1), &rule, now_ms())).await;
        let r = request(srv.addr, "GET", "/").await;
        assert_eq!(r.code, 200);
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        assert!(r
            .header("content-security-policy")
            .unwrap()
            .starts_with("default-src 'none'"));
        assert_eq!(r.body, super::super::page::PAGE);

        let markup = "<img src=x onerror=alert(1)> & co";
        srv.state.status.update(|s| {
            s.set_top_keys(&[crate::aggregate::RuleTop {
                bucket_ms: Some(0),
                keys: vec![crate::aggregate::TopKey {
                    dims: vec![markup.into()],
                    value: 3,
                }],
            }])
        });
        let r = request(srv.addr, "GET", "/status").await;
        assert!(!r.body.contains(['<', '>', '&']), "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["top_keys"][0]["keys"][0]["dims"][0], markup);
    }

    #[tokio::test]
    async fn the_events_rate_is_sampled_while_serving() {
        let srv = start(fresh_status()).await;
        srv.state.metrics.events_read.inc_by(5);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = srv.state.status.snapshot();
            if !s.events_per_second.is_empty() {
                assert_eq!(s.events_read, 5);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no rate sample within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn healthz_is_ok_even_when_not_ready() {
        let srv = start(fresh_status()).await;
        let r = request(srv.addr, "GET", "/healthz").await;
        assert_eq!((r.code, r.body.as_str()), (200, "ok\n"));
    }

    #[tokio::test]
    async fn readyz_follows_the_database_state() {
        let srv = start(fresh_status()).await;
        let r = request(srv.addr, "GET", "/readyz").await;
        assert_eq!(r.code, 503);
        assert_eq!(
            r.body,
            "not ready: database unreachable: not connected yet\n"
        );

        srv.state
            .status
            .update(|s| s.record_database(now_ms(), Ok(())));
        let r = request(srv.addr, "GET", "/readyz").await;
        assert_eq!((r.code, r.body.as_str()), (200, "ready\n"));

        srv.state
            .status
            .update(|s| s.record_database(now_ms(), Err("refused".into())));
        let r = request(srv.addr, "GET", "/readyz").await;
        assert_eq!(
            (r.code, r.body.as_str()),
            (503, "not ready: database unreachable: refused\n")
        );
    }

    #[tokio::test]
    async fn readyz_reports_stale_flushes() {
        // Started long ago, database up, never flushed: the grace period is over.
        let mut status = Status::new("n", Duration::from_secs(1), &[], now_ms() - 60_000);
        status.record_database(0, Ok(()));
        let srv = start(status).await;
        let r = request(srv.addr, "GET", "/readyz").await;
        assert_eq!(r.code, 503);
        assert!(
            r.body.starts_with("not ready: no successful flush for 6"),
            "{}",
            r.body
        );
    }

    #[tokio::test]
    async fn unknown_paths_404_and_other_methods_405() {
        let srv = start(fresh_status()).await;
        assert_eq!(request(srv.addr, "GET", "/nope").await.code, 404);
        assert_eq!(request(srv.addr, "POST", "/nope").await.code, 404);
        for path in ["/", "/metrics", "/status", "/healthz", "/readyz"] {
            for method in ["POST", "PUT", "DELETE"] {
                let r = request(srv.addr, method, path).await;
                assert_eq!(r.code, 405, "{method} {path}");
                assert_eq!(r.header("allow"), Some("GET"), "{method} {path}");
            }
        }
        // A query string does not change the route.
        assert_eq!(request(srv.addr, "GET", "/healthz?x=1").await.code, 200);
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keepalive_connections_and_stops_listening() {
        let mut srv = start(fresh_status()).await;
        // A keep-alive connection that completed one request and stays idle, as
        // Prometheus leaves them between scrapes.
        let mut conn = TcpStream::connect(srv.addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.ends_with(b"ok\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "server closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(parse(&got).code, 200);

        srv.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(3), &mut srv.task)
            .await
            .expect("serve returns promptly after shutdown")
            .unwrap();
        // The idle connection was closed by the server, not left hanging.
        let n = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf))
            .await
            .expect("idle connection closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(
            TcpStream::connect(srv.addr).await.is_err(),
            "listener closed"
        );
    }
}
