//! `logtally`: tails the spool, aggregates, commits exactly once to PostgreSQL.
//!
//! Thin: parse arguments, set up logging (stderr, `RUST_LOG` filter, default `info`), run
//! the command ([`cli`]).

mod cli;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let args = cli::Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    cli::run(args)
}
