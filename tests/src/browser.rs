//! A real browser for the tests: headless Chromium driven through `/usr/bin/chromedriver`
//! by a minimal WebDriver client (JSON over HTTP/1.1 on a std `TcpStream`).
//!
//! Flags and facts are in `../shared/BROWSER.md`: `--no-proxy-server` or pages on
//! `127.0.0.1` never load; an `alert()` makes the next command fail with "unexpected alert
//! open". Debian packages: `chromium chromium-driver`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Chromium's flags that work on this kind of machine (BROWSER.md).
const FLAGS: [&str; 6] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-proxy-server",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
];

/// Why the browser cannot run here, or `None` when both binaries are installed.
pub fn missing() -> Option<String> {
    let absent: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    (!absent.is_empty()).then(|| {
        format!(
            "{} not installed (apt-get install -y chromium chromium-driver)",
            absent.join(", ")
        )
    })
}

/// A WebDriver error answer (or a transport failure), with the driver's message.
#[derive(Debug)]
pub struct WebDriverError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// A chromedriver process and one browser session in it; both end on drop.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session that
    /// records the console (`goog:loggingPrefs`).
    pub fn start() -> Browser {
        let addr = crate::sidecar::free_addr();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={}", addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http(addr, "GET", "/status", None).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": FLAGS},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let value = browser
            .command("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("new WebDriver session: {e}"));
        browser.session = value["sessionId"]
            .as_str()
            .expect("sessionId in the new-session answer")
            .to_string();
        browser
    }

    /// One WebDriver command: its `value`, or the error the driver answered.
    pub fn command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        let transport = |e: std::io::Error| WebDriverError {
            error: "transport".into(),
            message: e.to_string(),
        };
        let (code, text) = http(self.addr, method, path, body.as_ref()).map_err(transport)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| WebDriverError {
            error: "bad answer".into(),
            message: format!("{e}: {text}"),
        })?;
        let value = v["value"].clone();
        if code == 200 {
            Ok(value)
        } else {
            Err(WebDriverError {
                error: value["error"].as_str().unwrap_or("unknown").to_string(),
                message: value["message"].as_str().unwrap_or(&text).to_string(),
            })
        }
    }

    fn session_command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Navigates to `url` (returns once the page loaded).
    pub fn goto(&self, url: &str) -> Result<(), WebDriverError> {
        self.session_command("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn eval(&self, script: &str) -> Result<Value, WebDriverError> {
        self.session_command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The browser console since the last call (chromedriver's log endpoint): entries with
    /// `level` (`SEVERE` for script errors) and `message`.
    pub fn console(&self) -> Result<Vec<Value>, WebDriverError> {
        let v = self.session_command("POST", "/se/log", Some(json!({"type": "browser"})))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Resizes the browser window (e.g. to fit a whole page in a screenshot).
    pub fn resize(&self, width: u32, height: u32) -> Result<(), WebDriverError> {
        let rect = json!({"width": width, "height": height});
        self.session_command("POST", "/window/rect", Some(rect))
            .map(drop)
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Result<Vec<u8>, WebDriverError> {
        let v = self.session_command("GET", "/screenshot", None)?;
        let b64 = v.as_str().unwrap_or_default();
        decode_base64(b64).ok_or_else(|| WebDriverError {
            error: "bad answer".into(),
            message: "screenshot is not base64".into(),
        })
    }

    /// Polls `script` until it returns something other than `null`/`false`, at most
    /// `limit`; the last value or error is in the panic message.
    pub fn wait_for(&self, limit: Duration, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let last = self.eval(script);
            match &last {
                Ok(v) if !(v.is_null() || *v == Value::Bool(false)) => return v.clone(),
                // An open alert means injected markup ran: no point waiting.
                Err(e) if e.error == "unexpected alert open" => {
                    panic!("{what}: an alert is open, a script ran: {e}")
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                panic!("{what}: not within {limit:?}; last: {last:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.command("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection: (status code, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    // chromedriver keeps the connection open whatever the request says: read the head,
    // then exactly the body it announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let end = loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(bad("closed before the header end"));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let length: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    let mut payload = raw[end + 4..].to_vec();
    loop {
        let complete = match length {
            Some(len) => payload.len() >= len,
            None if chunked => dechunk(&payload).is_some(),
            None => false,
        };
        if complete {
            break;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        payload.extend_from_slice(&buf[..n]);
    }
    if let Some(len) = length {
        payload.truncate(len);
    } else if chunked {
        payload = dechunk(&payload).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok((code, String::from_utf8_lossy(&payload).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Standard base64 (with or without padding) to bytes.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_chunked_decode() {
        assert_eq!(decode_base64("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(decode_base64("iVBORw0KGgo").unwrap(), b"\x89PNG\r\n\x1a\n");
        assert!(decode_base64("a*b").is_none());
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").unwrap(),
            b"hello world"
        );
    }
}
