//! End-to-end test harness (to come).
pub mod postgres;
pub mod prometheus;
