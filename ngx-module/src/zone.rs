//! The shared memory zone holding the module's [`SharedCounters`]: registered at
//! configuration time, mapped by the master before it forks the workers, and kept across
//! reloads (same name and tag), so the counters survive `nginx -s reload`.

use std::ffi::c_void;
use std::ptr::{self, addr_of_mut};

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_pagesize, ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_alloc,
    ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_OK,
};

use crate::counters::SharedCounters;

/// Size of the counters zone: a slab pool needs a few pages for its own bookkeeping.
const ZONE_PAGES: usize = 8;

/// Registers the counters zone; null when nginx is out of memory.
///
/// # Safety
/// `cf` must be nginx's configuration context (postconfiguration).
pub unsafe fn add(cf: *mut ngx_conf_t) -> *mut ngx_shm_zone_t {
    // SAFETY: standard shared-zone registration during configuration; the name lives in
    // the cycle pool, the tag is the module (same across reloads, so the zone is reused).
    unsafe {
        let Some(mut name) = ngx_str_t::from_bytes((*cf).pool, b"logtally_counters") else {
            return ptr::null_mut();
        };
        let zone = ngx_shared_memory_add(
            cf,
            &mut name,
            ZONE_PAGES * ngx_pagesize,
            addr_of_mut!(crate::ngx_http_logtally_module).cast(),
        );
        if let Some(z) = zone.as_mut() {
            z.init = Some(init_zone);
        }
        zone
    }
}

/// The counters in a zone [`add`] registered, once nginx has mapped it.
///
/// # Safety
/// `zone` must be null or the zone [`add`] returned, after nginx initialised it (any time
/// after configuration in the master, or in a worker).
pub unsafe fn counters(zone: *mut ngx_shm_zone_t) -> Option<&'static SharedCounters> {
    // SAFETY: per the contract, data points at the SharedCounters in shared memory, mapped
    // for the process's whole life.
    unsafe { zone.as_ref()?.data.cast::<SharedCounters>().as_ref() }
}

/// Initialises the counters zone, or adopts the previous cycle's counters on reload.
unsafe extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this with the mapped zone; its memory starts with a slab pool.
    unsafe {
        if !data.is_null() {
            (*zone).data = data;
            return NGX_OK as ngx_int_t;
        }
        let pool = (*zone).shm.addr.cast::<ngx_slab_pool_t>();
        if (*zone).shm.exists != 0 {
            (*zone).data = (*pool).data;
            return NGX_OK as ngx_int_t;
        }
        let p =
            ngx_slab_alloc(pool, std::mem::size_of::<SharedCounters>()).cast::<SharedCounters>();
        if p.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        p.write(SharedCounters::default());
        (*pool).data = p.cast();
        (*zone).data = p.cast();
    }
    NGX_OK as ngx_int_t
}
