//! The status page on `/`: one self-contained HTML file (`page.html`: inline style and
//! script, nothing fetched from elsewhere) embedded in the binary. Its script reads
//! `/status` once a second and shows field values with `textContent` only; the response's
//! Content-Security-Policy forbids loading anything but `/status` from this server.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

/// The page, as served.
pub const PAGE: &str = include_str!("page.html");

/// No external resource, no plugin, no framing; scripts and styles only the page's own
/// (`data:` images only for the empty favicon, so the browser does not ask for one).
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// `GET /`.
pub fn response() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// JSON made safe to embed in HTML as well: `<`, `>` and `&` (which JSON only has inside
/// strings) become `\u003c`, `\u003e`, `\u0026`, the same string for a JSON parser.
pub fn html_safe_json(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + json.len() / 16);
    for &b in json {
        match b {
            b'<' => out.extend_from_slice(br"\u003c"),
            b'>' => out.extend_from_slice(br"\u003e"),
            b'&' => out.extend_from_slice(br"\u0026"),
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained_and_small() {
        assert!(PAGE.len() < 16 * 1024, "{} bytes", PAGE.len());
        for outside in [
            "http://",
            "https://",
            "//cdn",
            "src=",
            "@import",
            "innerHTML",
        ] {
            assert!(!PAGE.contains(outside), "the page holds {outside:?}");
        }
        assert!(PAGE.contains("fetch(\"/status\""));
    }

    #[test]
    fn html_safe_json_parses_back_to_the_same_value() {
        let v = serde_json::json!({"k": ["<img src=x onerror=alert(1)>", "a&b", "</script>"]});
        let safe = html_safe_json(&serde_json::to_vec(&v).unwrap());
        let text = std::str::from_utf8(&safe).unwrap();
        assert!(!text.contains(['<', '>', '&']), "{text}");
        assert!(
            text.contains(r"\u003cimg src=x onerror=alert(1)\u003e"),
            "{text}"
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&safe).unwrap(),
            v
        );
    }
}
