//! The retention task: every [`RETENTION_INTERVAL`] (and once at start) it deletes, for each
//! rule with `retention`, the rows whose bucket starts before `now − retention`
//! ([`crate::db::RetentionStore::pass`]: batches of 10,000, one sidecar at a time). It has
//! its own connection and runs beside the flushes, never inside their transactions; a
//! failure is logged and shown in `/status`, and the next pass tries again.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::aggregate::admission::expire_before;
use crate::config::Config;
use crate::db::{RetentionPass, RetentionStore};
use crate::http::metrics::Metrics;
use crate::http::status::SharedStatus;
use crate::now_ms;

/// How often the retention task runs.
pub(super) const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// Runs until `stop` completes; returns at once when no rule has `retention`.
pub(super) async fn run(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
    stop: impl std::future::Future<Output = ()>,
) {
    if config.limits.iter().all(|l| l.retention.is_none()) {
        return;
    }
    let mut stop = std::pin::pin!(stop);
    let mut tick = tokio::time::interval(RETENTION_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut store: Option<RetentionStore> = None;
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        let work = pass_all(&config, &metrics, &status, &mut store);
        tokio::select! {
            () = &mut stop => return,
            () = work => {}
        }
    }
}

async fn pass_all(
    config: &Config,
    metrics: &Metrics,
    status: &SharedStatus,
    store: &mut Option<RetentionStore>,
) {
    for (i, (rule, limits)) in config.rules.iter().zip(&config.limits).enumerate() {
        let Some(retention) = limits.retention else {
            continue;
        };
        if store.as_ref().is_none_or(RetentionStore::is_closed) {
            match RetentionStore::connect(config).await {
                Ok(s) => *store = Some(s),
                Err(error) => {
                    warn!(%error, "retention: cannot connect; next pass retries");
                    record(status, i, Err(error.to_string()));
                    return;
                }
            }
        }
        let s = store.as_ref().expect("connected above");
        let cutoff = expire_before(now_ms() as i64, Some(retention));
        match s.pass(rule, cutoff).await {
            Ok(RetentionPass::Deleted(n)) => {
                if n > 0 {
                    info!(table = %rule.table, rows = n, "retention: deleted rows past retention");
                }
                metrics
                    .retention_deleted_rows
                    .with_label_values(&[rule.table.as_str()])
                    .inc_by(n);
                record(status, i, Ok(Some(n)));
            }
            Ok(RetentionPass::Skipped) => {
                debug!(table = %rule.table, "retention: another sidecar holds the lock; skipped");
                record(status, i, Ok(None));
            }
            Err(error) => {
                warn!(table = %rule.table, %error, "retention pass failed; next pass retries");
                record(status, i, Err(error.to_string()));
                *store = None;
            }
        }
    }
}

/// `Ok(Some(n))` deleted n rows, `Ok(None)` skipped (locked elsewhere), `Err` failed.
fn record(status: &SharedStatus, rule: usize, outcome: Result<Option<u64>, String>) {
    let at = now_ms();
    status.update(|s| {
        if let Some(l) = s.limits.get_mut(rule) {
            let r = &mut l.retention;
            r.last_run_ms = Some(at);
            r.last_skipped_locked = matches!(outcome, Ok(None));
            r.last_deleted_rows = 0;
            r.last_error = None;
            match outcome {
                Ok(Some(n)) => {
                    r.last_deleted_rows = n;
                    r.deleted_rows += n;
                }
                Ok(None) => {}
                Err(e) => r.last_error = Some(e),
            }
        }
    });
}
