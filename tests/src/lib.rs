//! End-to-end test harness (to come).
pub mod nginx;
pub mod postgres;
pub mod prometheus;
pub mod sidecar;
