//! `logtally_status`: the directive and its content handler, kept together as nginx's own
//! `stub_status` keeps them. The handler serves the counters of all workers (the shared
//! zone) in the Prometheus text format; the location's requests are never recorded.

use std::ffi::{c_char, c_void};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_buf_t, ngx_chain_t, ngx_command_t, ngx_conf_t, ngx_create_temp_buf,
    ngx_http_discard_request_body, ngx_http_output_filter, ngx_http_request_t,
    ngx_http_send_header, ngx_int_t, ngx_str_t, ngx_uint_t, NGX_ERROR, NGX_HTTP_GET, NGX_HTTP_HEAD,
    NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_ALLOWED, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

use crate::conf::LocConf;
use crate::counters::{render_prometheus, CounterValues, PROMETHEUS_CONTENT_TYPE};
use crate::{zone, Module};

/// `logtally_status;` Requests to the location are never recorded, even where `logtally`
/// is on: a scrape is not traffic.
///
/// # Safety
/// Only nginx calls this, as a directive handler, with its live configuration context.
pub unsafe extern "C" fn cmd_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes this module's location conf (NGX_HTTP_LOC_CONF_OFFSET).
    unsafe { (*conf.cast::<LocConf>()).status = true };
    // SAFETY: cf is an http location context; the core location conf exists there.
    unsafe {
        let Some(clcf) = NgxHttpCoreModule::location_conf_mut(&*cf) else {
            return NGX_CONF_ERROR;
        };
        clcf.handler = Some(status_handler);
        if let Some(main) = Module::main_conf_mut(&*cf) {
            main.status = true;
        }
    }
    NGX_CONF_OK
}

/// The counters of all workers, in Prometheus text format.
///
/// # Safety
/// Only nginx calls this, with a live request.
unsafe extern "C" fn status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
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
            .and_then(|m| zone::counters(m.zone))
            .map_or(CounterValues::default(), |c| c.snapshot());
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
