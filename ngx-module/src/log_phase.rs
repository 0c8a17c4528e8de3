//! The log-phase handler: turns a request into one spool record (its field values, read the
//! way access_log reads them) and hands it to the worker's writer. Nothing here may block,
//! panic or fail a request.

use std::slice;

use ngx::ffi::{
    ngx_array_push, ngx_cached_time, ngx_conf_t, ngx_http_complex_value,
    ngx_http_get_flushed_variable, ngx_http_handler_pt, ngx_http_phases_NGX_HTTP_LOG_PHASE,
    ngx_http_request_t, ngx_int_t, ngx_pnalloc, ngx_str_t, ngx_time_t, ngx_uint_t, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

use crate::conf::{Field, Source};
use crate::log_vars::{self, LogVar, MAX_LEN};
use crate::{worker, Module};

/// Adds [`log_handler`] to nginx's log phase; false when nginx is out of memory.
///
/// # Safety
/// `cf` must be nginx's postconfiguration context.
pub unsafe fn register(cf: *mut ngx_conf_t) -> bool {
    // SAFETY: the core main conf exists in an http context; pushing onto the log phase's
    // handler array is how 0.5.x modules register phase handlers.
    unsafe {
        let Some(cmcf) = NgxHttpCoreModule::main_conf_mut(&*cf) else {
            return false;
        };
        let h =
            ngx_array_push(&mut cmcf.phases[ngx_http_phases_NGX_HTTP_LOG_PHASE as usize].handlers)
                .cast::<ngx_http_handler_pt>();
        let Some(h) = h.as_mut() else {
            return false;
        };
        *h = Some(log_handler);
    }
    true
}

/// Reads one field's value as access_log would read it now. `None` is "absent": the
/// variable was not found, or evaluation failed.
///
/// Non-cacheable variables (`$upstream_*`, `$time_local`, …) are evaluated again rather
/// than taken from the request's cache: by `ngx_http_get_flushed_variable` for a lone
/// variable, and by `ngx_http_complex_value` itself (it flushes its variables first) for a
/// complex value. The ones access_log computes itself are computed as it does.
///
/// # Safety
/// `r` must be a live request; the returned bytes live in its pool.
unsafe fn value<'r>(r: *mut ngx_http_request_t, field: &Field) -> Option<&'r [u8]> {
    // SAFETY: r is live; nginx returns values (or null) that stay valid while r lives.
    unsafe {
        match field.source {
            Source::Variable(index) => {
                let v = ngx_http_get_flushed_variable(r, index).as_ref()?;
                if v.not_found() != 0 || v.valid() == 0 {
                    return None;
                }
                Some(bytes(v.data, v.len() as usize))
            }
            Source::Complex(cv) => {
                let mut s = ngx_str_t::default();
                if ngx_http_complex_value(r, cv, &mut s) != NGX_OK as ngx_int_t {
                    return None;
                }
                Some(bytes(s.data, s.len))
            }
            Source::LogVar(var) => log_var(r, var),
        }
    }
}

/// A variable access_log computes itself, computed with its formula and format (see
/// `ngx_http_log_vars`), into the request's pool.
///
/// # Safety
/// `r` must be a live request; the returned bytes live in its pool.
unsafe fn log_var<'r>(r: *mut ngx_http_request_t, var: LogVar) -> Option<&'r [u8]> {
    // SAFETY: r and its connection are live; ngx_cached_time always points at a valid
    // slot of nginx's time cache (the ngx_timeofday() macro reads it the same way).
    let (req, now) = unsafe {
        (
            &*r,
            &*std::ptr::read_volatile(std::ptr::addr_of!(ngx_cached_time)).cast::<ngx_time_t>(),
        )
    };
    // SAFETY: the pool lives as long as the request; MAX_LEN bytes, no alignment needed.
    let out = unsafe {
        ngx_pnalloc(req.pool, MAX_LEN)
            .cast::<[u8; MAX_LEN]>()
            .as_mut()?
    };
    // SAFETY: every request has its connection.
    let sent = || unsafe { (*req.connection).sent };
    let len = match var {
        LogVar::Msec => log_vars::format_seconds_millis(now.sec, now.msec as u64, out),
        LogVar::RequestTime => {
            let ms = log_vars::request_millis(
                now.sec,
                now.msec as u64,
                req.start_sec,
                req.start_msec as u64,
            );
            log_vars::format_seconds_millis((ms / 1000) as i64, ms % 1000, out)
        }
        LogVar::Status => {
            let status = if req.err_status != 0 {
                req.err_status
            } else if req.headers_out.status != 0 {
                req.headers_out.status
            } else if req.http_version == ngx::ffi::NGX_HTTP_VERSION_9 as ngx_uint_t {
                9
            } else {
                0
            };
            log_vars::format_status(status as u64, out)
        }
        LogVar::BytesSent => log_vars::format_int(sent(), out),
        LogVar::BodyBytesSent => {
            log_vars::format_int((sent() - req.header_size as i64).max(0), out)
        }
        LogVar::RequestLength => log_vars::format_int(req.request_length, out),
    };
    Some(&out[..len])
}

/// The bytes nginx points at.
///
/// # Safety
/// `data` must point at `len` readable bytes (or be anything when `len` is 0).
unsafe fn bytes<'a>(data: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || data.is_null() {
        &[]
    } else {
        // SAFETY: per the function contract.
        unsafe { slice::from_raw_parts(data, len) }
    }
}

/// Drops the cached values of the variables access_log computes afresh when it writes
/// (`MainConf::recomputed`), so the next read evaluates them now.
///
/// # Safety
/// `r` must be a live request and every index one nginx gave out for this configuration.
unsafe fn forget_cached(r: *mut ngx_http_request_t, indexes: &[ngx_uint_t]) {
    for &index in indexes {
        // SAFETY: r->variables has one slot per configured variable (shared with its
        // subrequests, as nginx does), and the index came from this configuration.
        let v = unsafe { &mut *(*r).variables.add(index) };
        v.set_valid(0);
        v.set_not_found(0);
    }
}

/// Log phase: one record per request where `logtally` is on (and per subrequest there,
/// with `log_subrequest on`), except in `logtally_status` locations.
///
/// # Safety
/// Only nginx calls this, with a live request.
unsafe extern "C" fn log_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls log handlers with a live request.
    let req = unsafe { &*r };
    let Some(lc) = Module::location_conf(req) else {
        return NGX_OK as ngx_int_t;
    };
    if lc.enable != 1 || lc.status {
        return NGX_OK as ngx_int_t;
    }
    let Some(main) = Module::main_conf(req) else {
        return NGX_OK as ngx_int_t;
    };
    // The request's start time, as access_log's $msec sees it.
    let time_ms = (req.start_sec.max(0) as u64) * 1000 + req.start_msec as u64;
    // SAFETY: r is live; the indexes were given out for this configuration.
    unsafe { forget_cached(r, &main.recomputed) };
    let fields: &[Field] = lc.fields.as_deref().unwrap_or(&[]);
    let mut next = fields.iter().peekable();
    // One value per header field, in header order: this location's fields are sorted by
    // slot; every other declared field is absent here.
    let values = (0..main.fields.len()).map(|slot| {
        let f = next.next_if(|f| f.slot == slot)?;
        // SAFETY: r is live for the whole handler; values are encoded before it returns.
        unsafe { value(r, f) }
    });
    worker::submit(time_ms, values);
    NGX_OK as ngx_int_t
}
