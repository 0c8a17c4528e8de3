//! What the sidecar shows: the admin HTTP server and what it serves.
//!
//! - `admin.rs`: the server on `listen` (`/`, `/metrics`, `/status`, `/healthz`, `/readyz`);
//! - `page.rs`, `page.html`: the status page on `/` (embedded, self-contained);
//! - `limits.rs`: `/status`'s per-rule `max_keys` and `retention` report;
//! - `metrics.rs`: the Prometheus registry and its typed handles;
//! - `status.rs`: the `/status` snapshot and the readiness rule (pure: callers pass `now`).
//!
//! The run loop writes metrics and status; the server only reads them.

pub mod admin;
pub mod limits;
pub mod metrics;
pub mod page;
pub mod status;
