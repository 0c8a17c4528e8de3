//! Harnesses for the end-to-end tests: real nginx with the module, a private PostgreSQL, a
//! real Prometheus and the real `logtally` binary, each checked to be built from the current
//! sources before it runs.
pub mod browser;
pub mod citus;
pub mod edge;
pub mod freshness;
pub mod nginx;
pub mod postgres;
pub mod prometheus;
pub mod sidecar;
