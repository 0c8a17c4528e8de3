//! The configuration directives (`logtally_spool`, `logtally`, `logtally_field`), the
//! configuration they build, merging down the levels, and the whole-configuration checks
//! that run in `postconfiguration`. Errors are typed; they become nginx messages (naming the
//! directive, file and line) only at the FFI edge, in [`conf_error`].

use std::ffi::{c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_add_path, ngx_command_t, ngx_conf_full_name, ngx_conf_t, ngx_flag_t, ngx_hash_key_t,
    ngx_http_compile_complex_value, ngx_http_compile_complex_value_t, ngx_http_complex_value_t,
    ngx_http_core_main_conf_t, ngx_http_get_variable_index, ngx_http_variable_t, ngx_int_t,
    ngx_path_t, ngx_pcalloc, ngx_shm_zone_t, ngx_str_t, ngx_uint_t, NGX_CONF_UNSET, NGX_ERROR,
    NGX_OK,
};
use ngx::http::{HttpModuleMainConf, Merge, MergeConfigError};

use logtally_spool::{spool_file_system, SegmentWriterConfig};

use crate::log_vars::{self, LogVar};
use crate::options::{self, OptionError, SpoolOptions, ValueSpec};
use crate::writer::WriterConfig;
use crate::Module;

/// `http`-level configuration: the spool and everything the whole configuration declares.
#[derive(Debug)]
pub struct MainConf {
    /// Set by `logtally_spool`.
    pub spool: Option<Spool>,
    /// Every `logtally_field` name, in first-declared order: the segment header's fields.
    pub fields: Vec<String>,
    /// Variables that `logtally_field` values use, checked once all are declared.
    pub variables: Vec<VariableUse>,
    /// Indexes of the variables complex values use that nginx's log module computes afresh
    /// when it writes a line ([`log_vars::computed_at_log_time`]): their cached values are
    /// dropped before each record is read, so a value read earlier cannot linger.
    pub recomputed: Vec<ngx_uint_t>,
    /// Where the first `logtally on` is (`file:line`), if any level switches logging on.
    pub enabled_at: Option<String>,
    /// Whether some location serves `logtally_status`.
    pub status: bool,
    /// The shared memory zone holding the counters (null until postconfiguration).
    pub zone: *mut ngx_shm_zone_t,
}

impl Default for MainConf {
    fn default() -> Self {
        MainConf {
            spool: None,
            fields: Vec::new(),
            variables: Vec::new(),
            recomputed: Vec::new(),
            enabled_at: None,
            status: false,
            zone: ptr::null_mut(),
        }
    }
}

impl MainConf {
    /// How this configuration's writer threads write; `None` without `logtally_spool`.
    pub fn writer_config(&self) -> Option<WriterConfig> {
        let spool = self.spool.as_ref()?;
        Some(WriterConfig {
            segments: SegmentWriterConfig {
                dir: spool.dir.clone(),
                fields: self.fields.clone(),
                segment_size: spool.options.segment_size,
                pid: std::process::id(),
                fsync: spool.options.fsync.is_some(),
            },
            flush: spool.options.flush,
            fsync_every: spool.options.fsync,
            queue: spool.options.queue,
            stop_timeout: spool.options.stop_timeout,
        })
    }
}

/// The `logtally_spool` directive.
#[derive(Debug, Clone)]
pub struct Spool {
    /// The folder, with nginx's prefix applied.
    pub dir: PathBuf,
    pub options: SpoolOptions,
}

/// A variable named in a `logtally_field` value, and where.
#[derive(Debug, Clone)]
pub struct VariableUse {
    pub name: String,
    pub at: String,
}

/// How a field's value is read per request.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// One variable, by index: not found is recorded as absent.
    Variable(ngx_uint_t),
    /// One of the variables access_log computes itself, computed the same way.
    LogVar(LogVar),
    /// An nginx complex value, compiled into the configuration pool.
    Complex(*mut ngx_http_complex_value_t),
}

/// One `logtally_field` of a level.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Position of the field's name in [`MainConf::fields`] (the segment header).
    pub slot: usize,
    pub source: Source,
}

/// `http`/`server`/`location` configuration.
#[derive(Debug)]
pub struct LocConf {
    /// `logtally on|off`, set by `ngx_conf_set_flag_slot`; `NGX_CONF_UNSET` until merged, so
    /// a child can switch a parent's `on` off.
    pub enable: ngx_flag_t,
    /// This level's fields sorted by slot; `None` inherits the enclosing level's list.
    pub fields: Option<Vec<Field>>,
    /// Whether this location serves `logtally_status` (never inherited): its requests are
    /// never recorded, so scrapes do not become events.
    pub status: bool,
}

impl Default for LocConf {
    fn default() -> Self {
        LocConf {
            enable: NGX_CONF_UNSET as ngx_flag_t,
            fields: None,
            status: false,
        }
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        if self.enable == NGX_CONF_UNSET as ngx_flag_t {
            self.enable = if prev.enable == NGX_CONF_UNSET as ngx_flag_t {
                0
            } else {
                prev.enable
            };
        }
        if self.fields.is_none() {
            self.fields.clone_from(&prev.fields);
        }
        Ok(())
    }
}

/// Why a directive or the configuration as a whole is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("{0}")]
    Option(#[from] OptionError),
    #[error("is duplicate")]
    Duplicate,
    #[error("spool folder \"{path}\": {reason}")]
    SpoolDir { path: String, reason: String },
    #[error("out of memory")]
    NoMemory,
    #[error("cannot use variable \"${0}\"")]
    Variable(String),
}

/// The `file:line` nginx is reading.
///
/// # Safety
/// `cf` must be nginx's live configuration context.
unsafe fn position(cf: *mut ngx_conf_t) -> String {
    // SAFETY: while a directive is parsed, conf_file and its name are valid.
    unsafe {
        let Some(file) = (*cf).conf_file.as_ref() else {
            return String::from("?");
        };
        format!(
            "{}:{}",
            String::from_utf8_lossy(file.file.name.as_bytes()),
            file.line
        )
    }
}

/// Logs a directive's error the nginx way (at emerg, naming the directive, file and line)
/// and returns `NGX_CONF_ERROR`.
///
/// # Safety
/// `cf` and `cmd` must be the arguments nginx passed to the directive handler.
unsafe fn conf_error(
    cf: *mut ngx_conf_t,
    cmd: *const ngx_command_t,
    err: &ConfError,
) -> *mut c_char {
    // SAFETY: cmd is the directive being handled; its name is a static nginx string.
    let name = unsafe { String::from_utf8_lossy((*cmd).name.as_bytes()).into_owned() };
    match err {
        // nginx's own wording for a repeated directive.
        ConfError::Duplicate => {
            ngx::ngx_conf_log_error!(
                ngx::ffi::NGX_LOG_EMERG,
                cf,
                "\"{name}\" directive is duplicate"
            );
        }
        _ => {
            ngx::ngx_conf_log_error!(ngx::ffi::NGX_LOG_EMERG, cf, "{err} in \"{name}\" directive");
        }
    }
    NGX_CONF_ERROR
}

/// The directive's arguments, the directive name first.
///
/// # Safety
/// `cf` must be the context nginx passed to a directive handler.
unsafe fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: nginx fills cf->args with ngx_str_t for the directive being handled.
    unsafe { (*(*cf).args).as_slice::<ngx_str_t>() }
}

/// `logtally_spool <dir> [segment_size=] [flush=] [queue=] [fsync=] [stop_timeout=];`
///
/// # Safety
/// Only nginx calls this, as a directive handler, with its live configuration context.
pub unsafe extern "C" fn cmd_spool(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the http main conf of this module (NGX_HTTP_MAIN_CONF_OFFSET).
    let main = unsafe { &mut *conf.cast::<MainConf>() };
    // SAFETY: cf is the handler's argument.
    let result = unsafe { spool(cf, main) };
    match result {
        Ok(()) => NGX_CONF_OK,
        // SAFETY: cf/cmd are the handler's arguments.
        Err(e) => unsafe { conf_error(cf, cmd, &e) },
    }
}

unsafe fn spool(cf: *mut ngx_conf_t, main: &mut MainConf) -> Result<(), ConfError> {
    if main.spool.is_some() {
        return Err(ConfError::Duplicate);
    }
    // SAFETY: called from a directive handler.
    let args = unsafe { args(cf) };
    let options = options::parse_spool_options(args[2..].iter().map(|a| a.as_bytes()))?;
    let mut name = args[1];
    // SAFETY: ngx_conf_full_name replaces `name` with a pool-allocated, NUL-terminated
    // absolute path (prefix applied) or leaves an absolute one (already NUL-terminated as
    // all configuration tokens are).
    if unsafe { ngx_conf_full_name((*cf).cycle, &mut name, 0) } != NGX_OK as ngx_int_t {
        return Err(ConfError::NoMemory);
    }
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(name.as_bytes()));
    crate::spool_dir::check(&dir).map_err(|reason| ConfError::SpoolDir {
        path: dir.display().to_string(),
        reason,
    })?;
    if let Some(warning) = check_file_system(&dir)? {
        ngx::ngx_conf_log_error!(
            ngx::ffi::NGX_LOG_WARN,
            cf,
            "{warning} in \"logtally_spool\" directive"
        );
    }

    // SAFETY: the path lives in the cycle pool like nginx's own paths; ngx_add_path keeps
    // the pointer in cycle->paths and ngx_create_paths creates and chowns it in the master.
    unsafe {
        let path = ngx_pcalloc((*cf).pool, std::mem::size_of::<ngx_path_t>()).cast::<ngx_path_t>();
        if path.is_null() {
            return Err(ConfError::NoMemory);
        }
        (*path).name = name;
        if let Some(file) = (*cf).conf_file.as_ref() {
            (*path).conf_file = file.file.name.data;
            (*path).line = file.line;
        }
        let mut slot = path;
        if ngx_add_path(cf, &mut slot) != NGX_OK as ngx_int_t {
            return Err(ConfError::SpoolDir {
                path: dir.display().to_string(),
                reason: "is already used differently by another directive".into(),
            });
        }
    }
    main.spool = Some(Spool { dir, options });
    Ok(())
}

/// Where the spool folder's file system is read: the folder, or the nearest ancestor that
/// exists while nginx has yet to create it (it does once the whole configuration is read).
fn existing_ancestor(dir: &Path) -> &Path {
    dir.ancestors().find(|p| p.exists()).unwrap_or(dir)
}

/// Refuses a spool folder on a network file system; returns the warning for one on FUSE
/// ([`options::file_system_verdict`]).
fn check_file_system(dir: &Path) -> Result<Option<String>, ConfError> {
    let kind = spool_file_system(existing_ancestor(dir)).map_err(|e| ConfError::SpoolDir {
        path: dir.display().to_string(),
        reason: format!("cannot tell its file system: {e}"),
    })?;
    Ok(options::file_system_verdict(dir, kind)?)
}

/// The index of variable `name` (nginx's, for `ngx_http_get_indexed_variable`).
///
/// # Safety
/// `cf` must be the context nginx passed to a directive handler.
unsafe fn variable_index(cf: *mut ngx_conf_t, name: &str) -> Result<ngx_uint_t, ConfError> {
    let mut s = ngx_str_t {
        len: name.len(),
        data: name.as_ptr().cast_mut(),
    };
    // SAFETY: nginx copies the name into its pool; `s` only needs to live for the call.
    let index = unsafe { ngx_http_get_variable_index(cf, &mut s) };
    if index == NGX_ERROR as ngx_int_t {
        return Err(ConfError::Variable(name.to_string()));
    }
    Ok(index as ngx_uint_t)
}

/// `logtally_field <name> <value>;`
///
/// # Safety
/// Only nginx calls this, as a directive handler, with its live configuration context.
pub unsafe extern "C" fn cmd_field(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes this module's location conf (NGX_HTTP_LOC_CONF_OFFSET).
    let loc = unsafe { &mut *conf.cast::<LocConf>() };
    // SAFETY: cf is the handler's argument.
    let result = unsafe { field(cf, loc) };
    match result {
        Ok(()) => NGX_CONF_OK,
        // SAFETY: cf/cmd are the handler's arguments.
        Err(e) => unsafe { conf_error(cf, cmd, &e) },
    }
}

unsafe fn field(cf: *mut ngx_conf_t, loc: &mut LocConf) -> Result<(), ConfError> {
    // SAFETY: called from a directive handler.
    let args = unsafe { args(cf) };
    // SAFETY: cf is an http configuration context.
    let main = unsafe { Module::main_conf_mut(&*cf) }.ok_or(ConfError::NoMemory)?;
    let name = options::check_field_name(args[1].as_bytes())?;
    let spec = options::parse_value(args[2].as_bytes())?;

    let slot = match main.fields.iter().position(|f| f == name) {
        Some(slot) => slot,
        None if main.fields.len() >= logtally_spool::MAX_FIELDS => {
            return Err(OptionError::TooManyFields.into())
        }
        None => {
            main.fields.push(name.to_string());
            main.fields.len() - 1
        }
    };
    let fields = loc.fields.get_or_insert_with(Vec::new);
    if fields.iter().any(|f| f.slot == slot) {
        return Err(OptionError::DuplicateField(name.to_string()).into());
    }

    // SAFETY: called from a directive handler.
    let at = unsafe { position(cf) };
    let source = match &spec {
        ValueSpec::Variable(var) => match LogVar::from_name(var) {
            Some(v) => Source::LogVar(v),
            // SAFETY: called from a directive handler.
            None => Source::Variable(unsafe { variable_index(cf, var) }?),
        },
        ValueSpec::Complex(_) => {
            // SAFETY: the complex value is allocated in the configuration pool and filled
            // in by nginx's script compiler from the directive's own argument.
            unsafe {
                let cv = ngx_pcalloc((*cf).pool, std::mem::size_of::<ngx_http_complex_value_t>())
                    .cast::<ngx_http_complex_value_t>();
                if cv.is_null() {
                    return Err(ConfError::NoMemory);
                }
                let mut value = args[2];
                let mut ccv: ngx_http_compile_complex_value_t = std::mem::zeroed();
                ccv.cf = cf;
                ccv.value = &mut value;
                ccv.complex_value = cv;
                if ngx_http_compile_complex_value(&mut ccv) != NGX_OK as ngx_int_t {
                    return Err(ConfError::Variable(
                        String::from_utf8_lossy(value.as_bytes()).into(),
                    ));
                }
                Source::Complex(cv)
            }
        }
    };
    let names = match spec {
        ValueSpec::Variable(v) => vec![v],
        ValueSpec::Complex(vs) => vs,
    };
    let complex = matches!(source, Source::Complex(_));
    for name in names
        .iter()
        .filter(|n| complex && log_vars::computed_at_log_time(n))
    {
        // SAFETY: called from a directive handler.
        let index = unsafe { variable_index(cf, name) }?;
        if !main.recomputed.contains(&index) {
            main.recomputed.push(index);
        }
    }
    main.variables
        .extend(names.into_iter().map(|name| VariableUse {
            name,
            at: at.clone(),
        }));
    let at_slot = fields.partition_point(|f| f.slot < slot);
    fields.insert(at_slot, Field { slot, source });
    Ok(())
}

/// Runs after `ngx_conf_set_flag_slot` stored `logtally on|off`: remembers where logging
/// was first switched on, for the "needs logtally_spool" check.
///
/// # Safety
/// Only nginx calls this, as a directive handler, with its live configuration context.
pub unsafe extern "C" fn flag_post(
    cf: *mut ngx_conf_t,
    _post: *mut c_void,
    data: *mut c_void,
) -> *mut c_char {
    // SAFETY: data points at the ngx_flag_t the slot handler just set; cf is live.
    unsafe {
        if *data.cast::<ngx_flag_t>() == 1 {
            if let Some(main) = Module::main_conf_mut(&*cf) {
                if main.enabled_at.is_none() {
                    main.enabled_at = Some(position(cf));
                }
            }
        }
    }
    NGX_CONF_OK
}

/// Whether nginx knows a variable by now (all modules, `set`, `map`, regex captures have
/// declared theirs when postconfiguration runs).
///
/// # Safety
/// `cmcf` must be the core main conf during postconfiguration (variables_keys still alive).
unsafe fn variable_known(cmcf: &ngx_http_core_main_conf_t, name: &str) -> bool {
    // SAFETY: per the function contract, both arrays hold what nginx put there.
    unsafe {
        if let Some(keys) = cmcf.variables_keys.as_ref() {
            if keys
                .keys
                .as_slice::<ngx_hash_key_t>()
                .iter()
                .any(|k| k.key.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
            {
                return true;
            }
        }
        cmcf.prefix_variables
            .as_slice::<ngx_http_variable_t>()
            .iter()
            .any(|v| {
                let p = v.name.as_bytes();
                name.len() >= p.len() && name.as_bytes()[..p.len()].eq_ignore_ascii_case(p)
            })
    }
}

/// A whole-configuration problem, reported at postconfiguration (nginx prints it as is,
/// so the message names the directive, file and line itself).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("unknown variable \"${name}\" in \"logtally_field\" directive in {at}")]
    UnknownVariable { name: String, at: String },
    #[error("\"logtally on\" needs \"logtally_spool\" in the http block, in \"logtally\" directive in {at}")]
    NoSpool { at: String },
}

/// The checks that need the whole configuration: `logtally on` without `logtally_spool`,
/// and variables nobody declares (nginx's own message would not name our directive).
///
/// # Safety
/// Must run in postconfiguration with nginx's configuration context.
pub unsafe fn check(cf: *mut ngx_conf_t, main: &MainConf) -> Result<(), CheckError> {
    if let (Some(at), None) = (&main.enabled_at, &main.spool) {
        return Err(CheckError::NoSpool { at: at.clone() });
    }
    // SAFETY: cf is an http configuration context during postconfiguration.
    let Some(cmcf) = (unsafe { ngx::http::NgxHttpCoreModule::main_conf(&*cf) }) else {
        return Ok(());
    };
    for v in &main.variables {
        // SAFETY: postconfiguration runs before ngx_http_variables_init_vars frees the keys.
        if !unsafe { variable_known(cmcf, &v.name) } {
            return Err(CheckError::UnknownVariable {
                name: v.name.clone(),
                at: v.at.clone(),
            });
        }
    }
    Ok(())
}
