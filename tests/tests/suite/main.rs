//! Every end-to-end test of logtally, in one test binary so the suite links once (as
//! rust-postgres keeps its integration tests). Each module starts the real processes it needs:
//! nginx with the module, the `logtally` binary, a private PostgreSQL, Prometheus, Chromium.
//!
//! Run one area with a filter: `cargo test --release -p logtally-e2e --test suite module::`.

mod aggregates;
mod bare_segments;
mod chaos;
mod citus;
mod e2e;
mod exactly_once;
mod faults;
mod fields;
mod limits;
mod lists;
mod module;
mod observability;
mod operator;
mod page;
mod sidecar;
