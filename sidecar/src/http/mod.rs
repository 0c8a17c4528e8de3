//! What the sidecar shows: the admin HTTP server and what it serves.
//!
//! - `admin.rs`: the server on `listen` (`/metrics`, `/status`, `/healthz`, `/readyz`);
//! - `metrics.rs`: the Prometheus registry and its typed handles;
//! - `status.rs`: the `/status` snapshot and the readiness rule (pure: callers pass `now`).
//!
//! The run loop writes metrics and status; the server only reads them.

pub mod admin;
pub mod metrics;
pub mod status;
