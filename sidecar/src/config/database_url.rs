//! Where the database URL comes from and what it says: the `database_url` key, the
//! `database_url_file` key (a systemd credential, a Kubernetes Secret) or the environment
//! variable [`DATABASE_URL_ENV`], which overrides both; parsed once into
//! [`ConnectSettings`] (tokio-postgres' settings plus the TLS checks tokio-postgres does not
//! parse: `sslmode=verify-ca|verify-full` and `sslrootcert`), and described for messages
//! from the parsed settings ([`describe_database_url`]) so no way of writing a password
//! (`u:p@ss@h`, `?password=`, `password='…'`, `%40`) can reach a log, `check` or `/status`.

use std::fmt;
use std::path::PathBuf;

use tokio_postgres::config::{Host, SslMode};

use super::{ConfigError, Problem};

/// The environment variable that overrides `database_url` and `database_url_file`.
pub const DATABASE_URL_ENV: &str = "LOGTALLY_DATABASE_URL";

/// Where [`super::Config::database_url`] came from (`check` says which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrlSource {
    /// Nothing set: [`super::DEFAULT_DATABASE_URL`].
    Default,
    /// The `database_url` key.
    Key,
    /// The `database_url_file` key: this file.
    File(PathBuf),
    /// [`DATABASE_URL_ENV`].
    Env,
}

impl fmt::Display for DatabaseUrlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrlSource::Default => f.write_str("default"),
            DatabaseUrlSource::Key => f.write_str("key database_url"),
            DatabaseUrlSource::File(p) => write!(f, "database_url_file {}", p.display()),
            DatabaseUrlSource::Env => write!(f, "environment {DATABASE_URL_ENV}"),
        }
    }
}

/// The URL from the two keys: at most one may be set; a file is read whole, its trailing
/// newline trimmed. `shown` is the configuration file's name, for messages.
pub(super) fn from_keys(
    shown: &str,
    url: Option<String>,
    file: Option<PathBuf>,
) -> Result<(String, DatabaseUrlSource), ConfigError> {
    let invalid = |key: &str, problem| ConfigError::Invalid {
        path: shown.to_string(),
        key: key.to_string(),
        problem,
    };
    let (url, source) = match (url, file) {
        (Some(_), Some(_)) => return Err(invalid("database_url_file", Problem::BothDatabaseUrls)),
        (Some(url), None) => (url, DatabaseUrlSource::Key),
        (None, Some(file)) => {
            if !file.is_absolute() {
                let shown_file = file.display().to_string();
                return Err(invalid(
                    "database_url_file",
                    Problem::NotAbsolute(shown_file),
                ));
            }
            let text =
                std::fs::read_to_string(&file).map_err(|source| ConfigError::ReadKeyFile {
                    path: shown.to_string(),
                    key: "database_url_file",
                    file: file.display().to_string(),
                    source,
                })?;
            let url = text.trim_end_matches(['\n', '\r']).to_string();
            if url.is_empty() {
                return Err(invalid("database_url_file", Problem::Empty));
            }
            (url, DatabaseUrlSource::File(file))
        }
        (None, None) => (
            super::DEFAULT_DATABASE_URL.to_string(),
            DatabaseUrlSource::Default,
        ),
    };
    if url.is_empty() {
        return Err(invalid("database_url", Problem::Empty));
    }
    Ok((url, source))
}

/// [`DATABASE_URL_ENV`]'s value, when set and not empty, replaces the configured URL.
pub fn override_from_env(config: &mut super::Config, env: Option<String>) {
    if let Some(url) = env.filter(|u| !u.is_empty()) {
        config.database_url = url;
        config.database_url_source = DatabaseUrlSource::Env;
    }
}

/// How the connection uses TLS (libpq's `sslmode` values but `allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    /// TLS when the server offers it, unverified (tokio-postgres' and libpq's default).
    Prefer,
    /// TLS, the certificate not checked (with `sslrootcert`: as `VerifyCa`, as libpq does).
    Require,
    /// TLS, the certificate chain checked against the roots.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl TlsMode {
    fn parse(s: &str) -> Option<TlsMode> {
        Some(match s {
            "disable" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// A database URL, parsed.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// Everything but the TLS checks (its `ssl_mode` set from [`Self::tls`]).
    pub pg: tokio_postgres::Config,
    pub tls: TlsMode,
    /// `sslrootcert`: PEM file of the roots that verify the server (else the system's).
    pub root_cert: Option<PathBuf>,
}

impl ConnectSettings {
    /// Whether the server's certificate is checked against roots.
    pub fn verifies(&self) -> bool {
        match self.tls {
            TlsMode::VerifyCa | TlsMode::VerifyFull => true,
            TlsMode::Require => self.root_cert.is_some(),
            TlsMode::Disable | TlsMode::Prefer => false,
        }
    }
}

/// Why a database URL cannot be used. Never quotes the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{}", crate::db::server_message(.0))]
    Parse(tokio_postgres::Error),
    #[error("bad sslmode (expected disable, prefer, require, verify-ca or verify-full)")]
    BadSslMode,
    /// `postgres://u:p@ss@h/d` parses as host `ss@h`: a password's `@` was not escaped.
    #[error("a host name contains '@' (write an '@' in the user or password as %40)")]
    AtInHost,
}

/// One `key=value` of a URL's query or of a key=value string: its decoded key and value
/// and where it sits in the text.
struct Param {
    key: String,
    value: String,
    span: (usize, usize),
}

/// Parses a URL (`postgres://…` or `key=value …`), taking out `sslmode` and `sslrootcert`
/// (tokio-postgres accepts neither verify mode nor root file) before tokio-postgres parses
/// the rest.
pub fn parse_database_url(url: &str) -> Result<ConnectSettings, UrlError> {
    let (params, separator) = match url_query(url) {
        Some(start) => (query_params(url, start), "&"),
        None if url.contains("://") => (Vec::new(), "&"),
        None => (key_value_params(url), " "),
    };
    let mut tls = None;
    let mut root_cert = None;
    let mut kept: Vec<&str> = Vec::new();
    for p in &params {
        match p.key.as_str() {
            "sslmode" => tls = Some(TlsMode::parse(&p.value).ok_or(UrlError::BadSslMode)?),
            "sslrootcert" => root_cert = Some(PathBuf::from(&p.value)),
            _ => kept.push(&url[p.span.0..p.span.1]),
        }
    }
    let rest = match (url_query(url), params.first()) {
        (Some(start), _) if kept.is_empty() => url[..start - 1].to_string(),
        (Some(start), _) => format!("{}{}", &url[..start], kept.join(separator)),
        (None, Some(_)) => kept.join(separator),
        (None, None) => url.to_string(),
    };
    let mut pg: tokio_postgres::Config = rest.parse().map_err(UrlError::Parse)?;
    if pg
        .get_hosts()
        .iter()
        .any(|h| matches!(h, Host::Tcp(name) if name.contains('@')))
    {
        return Err(UrlError::AtInHost);
    }
    let tls = tls.unwrap_or(TlsMode::Prefer);
    pg.ssl_mode(match tls {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    Ok(ConnectSettings { pg, tls, root_cert })
}

/// Where a URL's query starts (after `?`), for the URL form only.
fn url_query(url: &str) -> Option<usize> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return None;
    }
    url.find('?').map(|i| i + 1)
}

fn query_params(url: &str, start: usize) -> Vec<Param> {
    let mut out = Vec::new();
    let mut at = start;
    for part in url[start..].split('&') {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        out.push(Param {
            key: percent_decode(key),
            value: percent_decode(value),
            span: (at, at + part.len()),
        });
        at += part.len() + 1;
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq's key=value form: `key = value`, values optionally single-quoted, `\` escaping.
/// Malformed text yields what was recognised; tokio-postgres then reports the error.
fn key_value_params(s: &str) -> Vec<Param> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            return out;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        i = skip_ws(i);
        if i >= b.len() || b[i] != b'=' {
            return out;
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        let quoted = i < b.len() && b[i] == b'\'';
        if quoted {
            i += 1;
        }
        while i < b.len() {
            match b[i] {
                b'\\' if i + 1 < b.len() => {
                    value.push(b[i + 1]);
                    i += 2;
                    continue;
                }
                b'\'' if quoted => {
                    i += 1;
                    break;
                }
                c if !quoted && c.is_ascii_whitespace() => break,
                c => value.push(c),
            }
            i += 1;
        }
        out.push(Param {
            key,
            value: String::from_utf8_lossy(&value).into_owned(),
            span: (start, i),
        });
    }
}

/// `postgres://user:***@host:port,host2:port/dbname?sslmode=…` from the parsed settings:
/// the user, hosts, ports, database and TLS mode, `***` when any password is set (even an
/// empty one); `<unparsable database_url>` when it does not parse.
pub fn describe_database_url(url: &str) -> String {
    match parse_database_url(url) {
        Ok(settings) => describe(&settings),
        Err(_) => "<unparsable database_url>".into(),
    }
}

/// [`describe_database_url`] of parsed settings.
pub fn describe(settings: &ConnectSettings) -> String {
    let pg = &settings.pg;
    let mut s = String::from("postgres://");
    if let Some(user) = pg.get_user() {
        s.push_str(user);
    }
    if pg.get_password().is_some() {
        s.push_str(":***");
    }
    if pg.get_user().is_some() || pg.get_password().is_some() {
        s.push('@');
    }
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match h {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    s.push_str(&if hosts.is_empty() {
        "localhost:5432".to_string()
    } else {
        hosts.join(",")
    });
    s.push('/');
    s.push_str(pg.get_dbname().unwrap_or(""));
    s.push_str("?sslmode=");
    s.push_str(settings.tls.as_str());
    if let Some(root) = &settings.root_cert {
        s.push_str("&sslrootcert=");
        s.push_str(&root.display().to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn d(url: &str) -> String {
        describe_database_url(url)
    }

    #[test]
    fn passwords_never_show_however_written() {
        let cases = [
            ("postgres://u:p@ss@h/d", "<unparsable database_url>"),
            (
                "postgres://u:p%40ss@h:6543/d",
                "postgres://u:***@h:6543/d?sslmode=prefer",
            ),
            (
                "postgres://u@h/d?password=s3cret&application_name=x",
                "postgres://u:***@h:5432/d?sslmode=prefer",
            ),
            (
                "host=h user=u password='a b\\' c' dbname=d",
                "postgres://u:***@h:5432/d?sslmode=prefer",
            ),
            (
                "postgres://u:pw@h1:5433,h2:5434/d",
                "postgres://u:***@h1:5433,h2:5434/d?sslmode=prefer",
            ),
            (
                "postgres://u:@h/d",
                "postgres://u:***@h:5432/d?sslmode=prefer",
            ),
            ("postgres://u@h/d", "postgres://u@h:5432/d?sslmode=prefer"),
            ("postgres://h", "postgres://h:5432/?sslmode=prefer"),
        ];
        for (url, want) in cases {
            assert_eq!(d(url), want, "{url}");
            for secret in ["p@ss", "s3cret", "a b", "pw"] {
                if url.contains(secret) {
                    assert!(!d(url).contains(secret), "{url} → {}", d(url));
                }
            }
        }
        assert_eq!(
            d("postgres://u:pw@h/d?sslmode=bogus"),
            "<unparsable database_url>"
        );
        assert_eq!(
            d("host=h password='unterminated"),
            "<unparsable database_url>"
        );
        let e = parse_database_url("postgres://u:p@ss@h/d")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "a host name contains '@' (write an '@' in the user or password as %40)"
        );
    }

    #[test]
    fn tls_settings_are_taken_out_before_tokio_postgres_parses() {
        let s = parse_database_url(
            "postgres://u:pw@db.example:5432/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(s.tls, TlsMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(s.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!(
            s.pg.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert!(s.verifies());
        let s = parse_database_url("host=h sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=d")
            .unwrap();
        assert_eq!((s.tls, s.pg.get_dbname()), (TlsMode::VerifyCa, Some("d")));
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/a b/ca.pem")));
        let s = parse_database_url("postgres://h/d?sslmode=require").unwrap();
        assert!(!s.verifies(), "require without a root file only encrypts");
        let s = parse_database_url("postgres://h/d?sslmode=disable").unwrap();
        assert_eq!(s.pg.get_ssl_mode(), SslMode::Disable);
        assert!(matches!(
            parse_database_url("postgres://h/d?sslmode=allow"),
            Err(UrlError::BadSslMode)
        ));
    }
}
