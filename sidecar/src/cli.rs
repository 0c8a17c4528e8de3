//! The command line: `run`, `check`, `dump`, `--version`, `--help`. Each subcommand is a
//! thin call into the library; errors become `anyhow` errors here, at the binary's edge.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use logtally::{config, daemon, dump, store};

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
    runtime()?.block_on(async {
        daemon::run(config, None, shutdown_signal())
            .await
            .context("logtally run")
    })
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "cannot install signal handlers; stopping");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// `logtally check`: the configuration (this module) then the database (the store's check).
pub fn check(path: &Path, database: bool) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let mut out = io::stdout().lock();
    write!(out, "{}", config.summary())?;
    writeln!(out, "configuration OK")?;
    if !database {
        return Ok(());
    }
    let tables = runtime()?
        .block_on(store::check(&config))
        .with_context(|| format!("database {}", config::redact_url(&config.database_url)))?;
    for (table, state) in tables {
        let state = match state {
            store::TableState::Ok => "ok",
            store::TableState::Missing => "missing (run creates it)",
        };
        writeln!(out, "table {table}: {state}")?;
    }
    writeln!(out, "database OK")?;
    Ok(())
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
