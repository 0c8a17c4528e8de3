//! Request-time code: the log-phase handler that turns a request into one spool record, and
//! the `logtally_status` content handler. Nothing here may block, panic or fail a request.

use std::slice;

use ngx::ffi::{
    ngx_buf_t, ngx_chain_t, ngx_create_temp_buf, ngx_http_complex_value,
    ngx_http_discard_request_body, ngx_http_get_indexed_variable, ngx_http_output_filter,
    ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_str_t, ngx_uint_t, NGX_ERROR,
    NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_ALLOWED, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf};

use crate::conf::{Field, Source};
use crate::counters::{render_prometheus, CounterValues, SharedCounters, PROMETHEUS_CONTENT_TYPE};
use crate::{worker, Module};

/// Reads one field's value. `None` is "absent": the variable was not found, or evaluation
/// failed.
///
/// # Safety
/// `r` must be a live request; the returned bytes live in its pool.
unsafe fn value<'r>(r: *mut ngx_http_request_t, field: &Field) -> Option<&'r [u8]> {
    // SAFETY: r is live; nginx returns values (or null) that stay valid while r lives.
    unsafe {
        match field.source {
            Source::Variable(index) => {
                let v = ngx_http_get_indexed_variable(r, index).as_ref()?;
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
        }
    }
}

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

/// Log phase: one record per request where `logtally` is on.
///
/// # Safety
/// Only nginx calls this, with a live request.
pub unsafe extern "C" fn log_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls log handlers with a live main request.
    let req = unsafe { &*r };
    let Some(lc) = Module::location_conf(req) else {
        return NGX_OK as ngx_int_t;
    };
    if lc.enable != 1 {
        return NGX_OK as ngx_int_t;
    }
    let Some(main) = Module::main_conf(req) else {
        return NGX_OK as ngx_int_t;
    };
    // The request's start time, as access_log's $msec sees it.
    let time_ms = (req.start_sec.max(0) as u64) * 1000 + req.start_msec as u64;
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

/// `logtally_status`: the counters of all workers, in Prometheus text format.
///
/// # Safety
/// Only nginx calls this, with a live request.
pub unsafe extern "C" fn status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a live request; everything below follows
    // the standard content-handler sequence (discard body, headers, one last buffer).
    unsafe {
        let req = &mut *r;
        if req.method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t == 0 {
            return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
        }
        let rc = ngx_http_discard_request_body(r);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        let values = Module::main_conf(&*req)
            .and_then(|m| m.zone.as_ref())
            .and_then(|z| z.data.cast::<SharedCounters>().as_ref())
            .map(SharedCounters::snapshot)
            .unwrap_or(CounterValues::default());
        let body = render_prometheus(&values);

        req.headers_out.status = 200;
        req.headers_out.content_length_n = body.len() as _;
        req.headers_out.content_type_len = PROMETHEUS_CONTENT_TYPE.len();
        req.headers_out.content_type = ngx_str_t {
            len: PROMETHEUS_CONTENT_TYPE.len(),
            data: PROMETHEUS_CONTENT_TYPE.as_ptr().cast_mut(),
        };
        let rc = ngx_http_send_header(r);
        if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || req.header_only() != 0 {
            return rc;
        }
        let b: *mut ngx_buf_t = ngx_create_temp_buf(req.pool, body.len());
        let Some(buf) = b.as_mut() else {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        };
        std::ptr::copy_nonoverlapping(body.as_ptr(), buf.pos, body.len());
        buf.last = buf.pos.add(body.len());
        buf.set_last_buf(if req.main == r { 1 } else { 0 });
        buf.set_last_in_chain(1);
        let mut out = ngx_chain_t {
            buf: b,
            next: std::ptr::null_mut(),
        };
        ngx_http_output_filter(r, &mut out)
    }
}
