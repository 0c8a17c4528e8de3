//! `logtally`: tails the spool, aggregates, commits exactly once to PostgreSQL.
fn main() {}
