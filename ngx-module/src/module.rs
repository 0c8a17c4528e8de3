//! The module statics nginx loads (`ngx_http_logtally_module`, its directives and context,
//! the `ngx_modules` symbols) and the lifecycle hooks: postconfiguration (checks, counters
//! zone, log-phase handler), init_process and exit_process (the writer thread).

use std::ffi::c_void;
use std::mem::offset_of;
use std::ptr::{addr_of, addr_of_mut};

use ngx::ffi::{
    ngx_array_push, ngx_command_t, ngx_conf_post_t, ngx_conf_set_flag_slot, ngx_conf_t,
    ngx_cycle_t, ngx_http_handler_pt, ngx_http_module_t, ngx_http_phases_NGX_HTTP_LOG_PHASE,
    ngx_int_t, ngx_module_t, ngx_pagesize, ngx_process, ngx_shared_memory_add, ngx_shm_zone_t,
    ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_FLAG,
    NGX_CONF_NOARGS, NGX_CONF_TAKE2, NGX_ERROR, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF,
    NGX_LOG_EMERG, NGX_OK, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

use crate::conf::{self, LocConf, MainConf};
use crate::counters::SharedCounters;
use crate::{handler, worker};

/// The module type behind the `ngx` traits.
pub struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only mutated by nginx while loading modules.
        unsafe { &*addr_of!(ngx_http_logtally_module) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls postconfiguration with the http configuration context.
        unsafe { postconfiguration(cf) }
    }
}

// SAFETY: the confs nginx stores for this module are exactly these types (created by the
// HttpModule defaults for MainConf/LocConf).
unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

// SAFETY: as above.
unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

/// Size of the counters zone: a slab pool needs a few pages for its own bookkeeping.
const ZONE_PAGES: usize = 8;

/// # Safety
/// nginx's postconfiguration context.
unsafe fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: cf is the http context; our main conf exists there.
    let Some(main) = (unsafe { Module::main_conf_mut(&*cf) }) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: cf is the postconfiguration context.
    if let Err(e) = unsafe { conf::check(cf, main) } {
        // SAFETY: cf->log is the configuration log.
        ngx::ngx_log_error!(NGX_LOG_EMERG, unsafe { (*cf).log }, "{e}");
        return NGX_ERROR as ngx_int_t;
    }
    if main.spool.is_none() && !main.status {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: standard shared-zone registration during configuration; the name lives in
    // the cycle pool, the tag is the module (same across reloads, so the zone is reused
    // and the counters survive `nginx -s reload`).
    unsafe {
        let Some(mut name) = ngx_str_t::from_bytes((*cf).pool, b"logtally_counters") else {
            return NGX_ERROR as ngx_int_t;
        };
        let zone = ngx_shared_memory_add(
            cf,
            &mut name,
            ZONE_PAGES * ngx_pagesize,
            addr_of_mut!(ngx_http_logtally_module).cast(),
        );
        if zone.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*zone).init = Some(init_zone);
        main.zone = zone;
    }
    if main.spool.is_some() {
        // SAFETY: the core main conf exists in an http context; pushing onto the log
        // phase's handler array is how 0.5.x modules register phase handlers.
        unsafe {
            let Some(cmcf) = NgxHttpCoreModule::main_conf_mut(&*cf) else {
                return NGX_ERROR as ngx_int_t;
            };
            let h = ngx_array_push(
                &mut cmcf.phases[ngx_http_phases_NGX_HTTP_LOG_PHASE as usize].handlers,
            )
            .cast::<ngx_http_handler_pt>();
            if h.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            *h = Some(handler::log_handler);
        }
    }
    NGX_OK as ngx_int_t
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

unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: ngx_process is set before init_process runs; reading it is a plain load.
    let process = unsafe { ngx_process } as u32;
    // Cache manager/loader processes also run init_process but exit without exit_process.
    if process != NGX_PROCESS_WORKER && process != NGX_PROCESS_SINGLE {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: cycle is the worker's live cycle.
    let Some(main) = (unsafe { Module::main_conf(&*cycle) }) else {
        return NGX_OK as ngx_int_t;
    };
    if main.spool.is_some() && main.enabled_at.is_some() {
        // SAFETY: worker main thread, live cycle.
        unsafe { worker::start(cycle, main) };
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    // SAFETY: worker main thread, cycle alive during exit_process.
    unsafe { worker::stop(cycle) };
}

static mut LOGTALLY_FLAG_POST: ngx_conf_post_t = ngx_conf_post_t {
    post_handler: Some(conf::flag_post),
};

const fn conf_type(t: u32) -> ngx_uint_t {
    t as ngx_uint_t
}

static mut NGX_HTTP_LOGTALLY_COMMANDS: [ngx_command_t; 5] = [
    ngx_command_t {
        name: ngx::ngx_string!("logtally_spool"),
        type_: conf_type(NGX_HTTP_MAIN_CONF | NGX_CONF_1MORE),
        set: Some(conf::cmd_spool),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("logtally"),
        type_: conf_type(
            NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG,
        ),
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: offset_of!(LocConf, enable),
        // Only the address is taken; nginx reads the post handler from it.
        post: addr_of_mut!(LOGTALLY_FLAG_POST).cast(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("logtally_field"),
        type_: conf_type(
            NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE2,
        ),
        set: Some(conf::cmd_field),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("logtally_status"),
        type_: conf_type(NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS),
        set: Some(conf::cmd_status),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

static NGX_HTTP_LOGTALLY_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(Module::preconfiguration),
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: Some(Module::create_main_conf),
    init_main_conf: Some(Module::init_main_conf),
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(Module::create_loc_conf),
    merge_loc_conf: Some(Module::merge_loc_conf),
};

// The symbols `load_module` looks up: this library holds exactly one module.
ngx::ngx_modules!(ngx_http_logtally_module);

/// The module descriptor nginx's `load_module` looks up.
#[used]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static mut ngx_http_logtally_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_LOGTALLY_MODULE_CTX) as *mut c_void,
    // SAFETY: only the address is taken; nginx walks the array until the empty command.
    commands: unsafe { &NGX_HTTP_LOGTALLY_COMMANDS[0] as *const _ as *mut _ },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};
