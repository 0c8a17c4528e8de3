//! `ngx_http_logtally_module`: an nginx dynamic module that writes one structured event per
//! request into the logtally spool (see `spool/FORMAT.md`), the way nginx writes its access
//! log, without ever making a request wait on the disk.
//!
//! This file holds the module statics nginx loads (the module descriptor, its directives and
//! context, the `ngx_modules` symbols) and the lifecycle hooks. The rest, each importing
//! only what sits below it:
//!
//! - [`conf`]: the configuration directives (`logtally_spool`, `logtally`, `logtally_field`)
//!   and the whole-configuration checks;
//! - [`status`]: the `logtally_status` directive and its content handler (as nginx's
//!   `stub_status` keeps both in one file);
//! - [`log_phase`]: the log-phase handler turning a request into one record;
//! - [`worker`]: the per-worker request side of the queue and the writer thread's lifecycle;
//! - [`zone`]: the shared memory zone holding the counters;
//! - plain Rust, unit-tested without nginx: [`log_vars`] (the variables access_log
//!   computes itself), [`queue`] (the per-worker pair of buffers),
//!   [`writer`] (the writer thread), [`counters`], [`options`] (argument parsing),
//!   [`spool_dir`] (the spool folder's check, owner and mode).
//!
//! The FFI glue is left out of the unit-test build: its nginx symbols exist only inside an
//! nginx process, so a test binary holding it could not load. `tests/tests/suite/module/` runs
//! the whole module in a real nginx.

#[cfg(not(test))]
pub mod conf;
pub mod counters;
#[cfg(not(test))]
pub mod log_phase;
pub mod log_vars;
pub mod options;
pub mod queue;
pub mod spool_dir;
#[cfg(not(test))]
pub mod status;
#[cfg(not(test))]
pub mod worker;
pub mod writer;
#[cfg(not(test))]
pub mod zone;

#[cfg(not(test))]
use std::ffi::c_void;
#[cfg(not(test))]
use std::mem::offset_of;
#[cfg(not(test))]
use std::ptr::{addr_of, addr_of_mut};

#[cfg(not(test))]
use ngx::ffi::{
    ngx_command_t, ngx_conf_post_t, ngx_conf_set_flag_slot, ngx_conf_t, ngx_core_conf_t,
    ngx_core_module, ngx_cycle_t, ngx_http_module_t, ngx_int_t, ngx_module_t, ngx_process,
    ngx_uid_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_FLAG, NGX_CONF_NOARGS, NGX_CONF_TAKE2,
    NGX_ERROR, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF,
    NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF, NGX_LOG_EMERG, NGX_LOG_WARN,
    NGX_OK, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
#[cfg(not(test))]
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf};

#[cfg(not(test))]
use crate::conf::{LocConf, MainConf};

/// The module type behind the `ngx` traits.
#[cfg(not(test))]
pub struct Module;

#[cfg(not(test))]
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
#[cfg(not(test))]
unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

// SAFETY: as above.
#[cfg(not(test))]
unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

/// Whole-configuration checks, the counters zone and the log-phase handler.
///
/// # Safety
/// nginx's postconfiguration context.
#[cfg(not(test))]
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
    // SAFETY: cf is the postconfiguration context.
    main.zone = unsafe { zone::add(cf) };
    if main.zone.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: cf is the postconfiguration context.
    if main.spool.is_some() && unsafe { !log_phase::register(cf) } {
        return NGX_ERROR as ngx_int_t;
    }
    NGX_OK as ngx_int_t
}

/// Runs in the master (and in `nginx -t`) once nginx has created the cycle's folders: gives
/// the spool folder its documented group and mode ([`spool_dir::settle`]). A failure is
/// logged, not fatal: the workers can write either way, only another reader may not.
#[cfg(not(test))]
unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: cycle is the new, fully configured cycle.
    let cycle = unsafe { &*cycle };
    let Some(spool) = Module::main_conf(cycle).and_then(|m| m.spool.as_ref()) else {
        return NGX_OK as ngx_int_t;
    };
    // SAFETY: the core module's conf exists in every cycle, at the core module's index.
    let core = unsafe {
        let index = (*addr_of!(ngx_core_module)).index;
        (*cycle.conf_ctx.add(index))
            .cast::<ngx_core_conf_t>()
            .as_ref()
    };
    // Set (not NGX_CONF_UNSET_UINT) only when the master runs as root: it then switches
    // the workers to this user and group.
    let worker_group = core.filter(|c| c.user != ngx_uid_t::MAX).map(|c| c.group);
    // SAFETY: getegid has no preconditions and cannot fail.
    let master_group = unsafe { libc::getegid() };
    if let Err(e) = spool_dir::settle(&spool.dir, worker_group, master_group) {
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            cycle.log,
            "logtally: cannot give spool folder \"{}\" its group and mode (g+rwx, setgid): {e}",
            spool.dir.display()
        );
    }
    NGX_OK as ngx_int_t
}

#[cfg(not(test))]
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
    let (Some(config), Some(_)) = (main.writer_config(), &main.enabled_at) else {
        return NGX_OK as ngx_int_t;
    };
    // SAFETY: the zone was set up by the master before fork.
    let Some(counters) = (unsafe { zone::counters(main.zone) }) else {
        return NGX_OK as ngx_int_t;
    };
    // SAFETY: worker main thread; the cycle log lives as long as the worker.
    unsafe { worker::start((*cycle).log, counters, config) };
    NGX_OK as ngx_int_t
}

#[cfg(not(test))]
unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    // SAFETY: worker main thread, cycle alive during exit_process.
    unsafe { worker::stop((*cycle).log) };
}

#[cfg(not(test))]
static mut LOGTALLY_FLAG_POST: ngx_conf_post_t = ngx_conf_post_t {
    post_handler: Some(conf::flag_post),
};

#[cfg(not(test))]
const fn conf_type(t: u32) -> ngx_uint_t {
    t as ngx_uint_t
}

#[cfg(not(test))]
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
        set: Some(status::cmd_status),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

#[cfg(not(test))]
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
#[cfg(not(test))]
ngx::ngx_modules!(ngx_http_logtally_module);

/// The module descriptor nginx's `load_module` looks up.
#[cfg(not(test))]
#[used]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static mut ngx_http_logtally_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_LOGTALLY_MODULE_CTX) as *mut c_void,
    // SAFETY: only the address is taken; nginx walks the array until the empty command.
    commands: unsafe { &NGX_HTTP_LOGTALLY_COMMANDS[0] as *const _ as *mut _ },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_module: Some(init_module),
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};
