//! The command line: `run`, `check`, `dump`, `--version`, `--help`. Each subcommand is a
//! thin call into the library; errors become `anyhow` errors here, at the binary's edge.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use logtally::config::fields::Severity;
use logtally::spool::dump;
use logtally::{config, db, run};

/// Aggregates nginx events from the logtally spool into PostgreSQL, exactly once.
#[derive(Debug, Parser)]
#[command(name = "logtally", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tail the spool, aggregate, and commit to PostgreSQL until SIGTERM or SIGINT.
    Run {
        /// Configuration file.
        #[arg(
            short,
            long,
            value_name = "FILE",
            default_value = "/etc/logtally/logtally.toml"
        )]
        config: PathBuf,
    },
    /// Validate the configuration and check the database (reachable, tables of the right
    /// shape); print a summary. Exits non-zero on any problem.
    Check {
        /// Configuration file.
        #[arg(
            short,
            long,
            value_name = "FILE",
            default_value = "/etc/logtally/logtally.toml"
        )]
        config: PathBuf,
        /// Only validate the file; do not connect to the database.
        #[arg(long)]
        no_database: bool,
    },
    /// Print a segment's records (or those of every segment in a folder) as JSON lines.
    Dump {
        /// A segment file or a spool folder.
        #[arg(value_name = "SEGMENT|DIR")]
        path: PathBuf,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => run_daemon(&config),
        Command::Check {
            config,
            no_database,
        } => check(&config, !no_database),
        Command::Dump { path } => dump_to_stdout(&path),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_daemon(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    // Classified as `check` does; not fatal here: nginx may be about to be reloaded with the
    // missing `logtally_field` (the reader reports each segment that lacks it).
    if let Ok(spool) = spool_fields(&config.spool_dir) {
        let path = config.path.display();
        for finding in config::fields::classify(&config, &spool.headers) {
            match finding.severity {
                Severity::Error => tracing::error!(key = finding.key, "{path}: {finding}"),
                Severity::Warning => tracing::warn!(key = finding.key, "{path}: {finding}"),
            }
        }
    }
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        // Handlers first: a SIGTERM that comes while the daemon starts is a shutdown too.
        let shutdown = shutdown_signal().context("cannot install signal handlers")?;
        run::run(config, None, shutdown)
            .await
            .context("logtally run")
    });
    // A blocking task stuck on a hanging disk or name lookup must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Installs the SIGTERM and SIGINT handlers at once (within the runtime); the future
/// completes on the first of them.
fn shutdown_signal() -> io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

/// `logtally check`: the configuration (this module) then the database (the store's check).
pub fn check(path: &Path, database: bool) -> anyhow::Result<()> {
    let mut config = config::load(path)?;
    let node_source = check_node(&mut config)?;
    let mut out = io::stdout().lock();
    write!(out, "{}", config.summary())?;
    writeln!(out, "node from     {node_source}")?;
    if config.spool_dir.is_dir() {
        let kind = logtally::spool::liveness::check_file_system(&config.spool_dir)?;
        writeln!(out, "spool fs      {kind:?} (writer locks hold)")?;
    }
    let dir = config.spool_dir.display();
    let not_checked = "field names not checked against nginx's logtally_field names";
    match spool_fields(&config.spool_dir) {
        Err(error) => writeln!(
            out,
            "note: cannot read spool_dir {dir} ({error}): {not_checked}"
        )?,
        Ok(spool) if spool.headers.is_empty() => writeln!(
            out,
            "note: no segment with a readable header in {dir} yet: {not_checked}"
        )?,
        Ok(spool) => {
            let findings = config::fields::classify(&config, &spool.headers);
            let path = config.path.display();
            let lines = |severity| {
                let of = findings.iter().filter(move |f| f.severity == severity);
                of.map(|f| format!("{path}: {f}")).collect::<Vec<_>>()
            };
            let errors = lines(Severity::Error);
            if !errors.is_empty() {
                anyhow::bail!("{}", errors.join("\n"));
            }
            for warning in lines(Severity::Warning) {
                writeln!(out, "warning: {warning}")?;
            }
            writeln!(
                out,
                "fields        found in {} segment(s) in {dir} ({})",
                spool.headers.len(),
                spool.fields.join(", ")
            )?;
        }
    }
    writeln!(out, "configuration OK")?;
    if !database {
        return Ok(());
    }
    let tables = runtime()?
        .block_on(db::check(&config))
        .with_context(|| format!("database {}", config::redact_url(&config.database_url)))?;
    for (table, state) in tables {
        let state = match state {
            db::TableState::Ok => "ok".to_string(),
            db::TableState::Missing => "missing (run creates it)".into(),
            db::TableState::Migrate(statements) => format!(
                "lacks columns; run adds them (auto_migrate = true): {}",
                statements.join("; ")
            ),
        };
        writeln!(out, "table {table}: {state}")?;
    }
    let (placements, warnings) = runtime()?
        .block_on(db::check_citus(&config))
        .with_context(|| format!("database {}", config::redact_url(&config.database_url)))?;
    for (table, placement) in placements {
        writeln!(out, "table {table}: {placement}")?;
    }
    for warning in warnings {
        writeln!(out, "warning: {warning}")?;
    }
    writeln!(out, "database OK")?;
    Ok(())
}

/// Settles `config.node` as `run` would, without storing anything: the stored id (a
/// configured one that differs is an error), else the configured one or the hostname that
/// `run` will store. Returns where it comes from, for the summary.
fn check_node(config: &mut config::Config) -> anyhow::Result<String> {
    use logtally::spool::node::{self, NODE_FILE};
    let file = config.spool_dir.join(NODE_FILE);
    let configured = config.node_configured.then(|| config.node.clone());
    if node::stored(&config.spool_dir)?.is_none() {
        let from = if configured.is_some() {
            "configured"
        } else {
            config.node = config::hostname().context(
                "no node id stored in the spool folder and cannot determine the hostname; set node",
            )?;
            "the hostname"
        };
        return Ok(format!("{from}; `run` stores it in {}", file.display()));
    }
    // The same check `run` makes: the stored id wins, a different configured one is refused.
    config.node = node::resolve(&config.spool_dir, configured.as_deref(), || None)?.id;
    Ok(format!("stored in {}", file.display()))
}

/// What the spool's segment headers declare.
struct SpoolFields {
    /// Per segment whose header could be read (name order): its name and fields.
    headers: Vec<(String, Vec<String>)>,
    /// Union of their field names, first seen first (segments in name order).
    fields: Vec<String>,
}

/// A header is at most ~4 KiB (64 names of at most 63 bytes); reading more is waste.
const HEADER_READ_LIMIT: u64 = 64 * 1024;

/// Reads the header of every segment in `dir`. A missing folder is zero segments (nginx has
/// not written yet); segments that vanish, cannot be read or have a bad or unfinished header
/// are skipped: `check` only needs the names some writer declared.
fn spool_fields(dir: &Path) -> io::Result<SpoolFields> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(SpoolFields {
                headers: Vec::new(),
                fields: Vec::new(),
            })
        }
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| logtally_spool::is_segment_file_name(n))
        .collect();
    names.sort();
    let mut spool = SpoolFields {
        headers: Vec::new(),
        fields: Vec::new(),
    };
    let mut buf = Vec::new();
    for name in names {
        buf.clear();
        let read = std::fs::File::open(dir.join(&name)).and_then(|f| {
            io::Read::read_to_end(&mut io::Read::take(f, HEADER_READ_LIMIT), &mut buf)
        });
        if let Err(error) = read {
            tracing::debug!(segment = %name, %error, "cannot read segment header");
            continue;
        }
        match logtally_spool::decode_header(&buf) {
            Ok(Some((header, _))) => {
                for f in &header.fields {
                    if !spool.fields.contains(f) {
                        spool.fields.push(f.clone());
                    }
                }
                spool.headers.push((name, header.fields));
            }
            Ok(None) => tracing::debug!(segment = %name, "segment header not complete yet"),
            Err(error) => tracing::debug!(segment = %name, %error, "bad segment header"),
        }
    }
    Ok(spool)
}

fn dump_to_stdout(path: &Path) -> anyhow::Result<()> {
    let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let result = dump::dump_path(path, &mut out).and_then(|s| out.flush().map(|()| s));
    match result {
        Ok(s) => {
            tracing::info!(
                segments = s.segments,
                events = s.events,
                corrupt_bytes = s.corrupt_bytes,
                torn_bytes = s.torn_bytes,
                bad_headers = s.bad_headers,
                "dump done"
            );
            Ok(())
        }
        // `logtally dump … | head` closes the pipe early: not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e).with_context(|| format!("dump {}", path.display())),
    }
}
