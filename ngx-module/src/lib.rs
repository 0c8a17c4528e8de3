//! `ngx_http_logtally_module`: an nginx dynamic module that writes one structured event per
//! request into the logtally spool (see `spool/FORMAT.md`), the way nginx writes its access
//! log, without ever making a request wait on the disk.
//!
//! [`module`] holds the module statics and lifecycle hooks; directives live in [`conf`],
//! request-time code in [`handler`], the per-worker channel and thread in [`worker`] and
//! [`writer`], the shared counters in [`counters`], argument parsing in [`options`] and the
//! spool folder check in [`spool_dir`].
//!
//! The FFI glue is left out of the unit-test build: its nginx symbols exist only inside an
//! nginx process, so a test binary holding it could not load. Unit tests cover the plain
//! Rust parts; `tests/tests/module.rs` runs the whole module in a real nginx.

#[cfg(not(test))]
pub mod conf;
pub mod counters;
#[cfg(not(test))]
pub mod handler;
#[cfg(not(test))]
pub mod module;
pub mod options;
pub mod spool_dir;
#[cfg(not(test))]
pub mod worker;
pub mod writer;

#[cfg(not(test))]
pub use module::{ngx_http_logtally_module, Module};
