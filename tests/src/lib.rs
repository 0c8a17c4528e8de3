//! End-to-end test harness (to come).
