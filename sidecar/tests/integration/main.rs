//! The sidecar's integration tests, in one binary with a module each (as rust-postgres
//! keeps its tests), so the suite links once:
//! - `aggregates`: conditions, `distinct` and `quantiles` through aggregator and store,
//!   against PostgreSQL's own results over a raw table;
//! - `cli`: the `logtally` binary run as a user would (`--version`, `check`, `dump`);
//! - `daemon`: the run loop in-process against a real PostgreSQL;
//! - `limits`: `max_keys` (admitted keys committed and loaded) and `retention` (batched
//!   deletes under a try-lock) against a real PostgreSQL;
//! - `store`: the store against a real PostgreSQL (shapes, upserts, the checkpoint);
//! - `sketches`: the distinct and quantile sketches against PostgreSQL's `hll` and the
//!   `logtally_quantiles` SQL;
//! - `tail_model`: a model-based property test of tailer + aggregator + checkpoint;
//! - `store_bench`, `store_bench_sketches`: benchmarks (the latter with the sketch rule of
//!   issue 12), ignored by default; run them with
//!   `cargo test --release -p logtally --test integration store_bench -- --ignored --nocapture --test-threads 1`.

mod aggregates;
mod cli;
mod daemon;
mod limits;
mod migrate;
mod pending_memory;
mod sketches;
mod store;
mod store_bench;
mod store_bench_sketches;
mod tail_model;
