//! `logtally`: tails the spool, aggregates, commits exactly once to PostgreSQL.
mod aggregate;
mod config;
fn main() {}
