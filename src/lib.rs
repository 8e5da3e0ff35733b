//! `ngx_http_mesh_module`: service identity, policy and trace context for nginx.
//!
//! This file only registers the module with nginx: the module and context tables, the
//! variables and the access-phase handler. The logic lives in the `mesh-core` crate; the
//! files here are the thin FFI shell around it:
//!
//! - `conf`: the `mesh_*` directives, parsed into typed configuration;
//! - `access`: the request pipeline (identify, then decide) in nginx's access phase;
//! - `variables`: the `$mesh_*` variables;
//! - `ngx_util`: the few unsafe helpers that touch nginx structures.

use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::core::Status;
use ngx::ffi::{
    ngx_array_push, ngx_conf_t, ngx_http_handler_pt, ngx_http_module_t,
    ngx_http_phases_NGX_HTTP_ACCESS_PHASE, ngx_int_t, ngx_module_t, ngx_uint_t, NGX_HTTP_MODULE,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

mod access;
mod conf;
mod fetch;
mod forward;
mod ngx_util;
mod variables;
mod zone;

use conf::{LocConf, MainConf};

pub(crate) struct MeshModule;

static NGX_HTTP_MESH_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(MeshModule::preconfiguration),
    postconfiguration: Some(MeshModule::postconfiguration),
    create_main_conf: Some(MeshModule::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(MeshModule::create_loc_conf),
    merge_loc_conf: Some(merge_loc_conf),
};

// The `ngx_modules` table: needed to load a cdylib built outside nginx's build system.
#[cfg(feature = "export-modules")]
ngx::ngx_modules!(ngx_http_mesh_module);

#[used]
#[allow(non_upper_case_globals)]
#[cfg_attr(not(feature = "export-modules"), no_mangle)]
pub static mut ngx_http_mesh_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(NGX_HTTP_MESH_MODULE_CTX).cast_mut().cast(),
    // SAFETY: the command table is a static that nginx only reads; taking its address
    // does not create a reference.
    commands: unsafe { ptr::addr_of_mut!(conf::NGX_HTTP_MESH_COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_process: Some(init_process),
    ..ngx_module_t::default()
};

/// Runs in each worker after fork: seeds the trace-id generator from the OS, starts the
/// thread that refreshes keys from URLs and outbound tokens, and the timer that writes what
/// that thread has to log.
unsafe extern "C" fn init_process(cycle: *mut ngx::ffi::ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the live cycle.
    let log = unsafe { (*cycle).log };
    if !forward::seed_worker() {
        ngx::ngx_log_error!(
            ngx::ffi::NGX_LOG_EMERG,
            log,
            "mesh: cannot read random bytes from the operating system"
        );
        return Status::NGX_ERROR.into();
    }
    // SAFETY: the cycle is live; its http main configuration (if any) outlives the worker.
    let Some(mcf) = (unsafe { MeshModule::main_conf(&*cycle) }) else {
        return Status::NGX_OK.into();
    };
    let started = fetch::start_worker(
        mcf.providers.clone(),
        mcf.outbound.clone(),
        mcf.metadata_server().to_string(),
    );
    if let Err(e) = started {
        ngx::ngx_log_error!(ngx::ffi::NGX_LOG_EMERG, log, "mesh: {}", e);
        return Status::NGX_ERROR.into();
    }
    // SAFETY: the event is a static used only by this worker's event loop.
    unsafe {
        let ev = &mut *ptr::addr_of_mut!(LOG_EVENT);
        ev.handler = Some(write_fetch_log);
        ev.log = log;
        ev.data = ptr::null_mut();
        // Cancelable: it must not keep a worker alive during a graceful shutdown.
        ev.set_cancelable(1);
        ngx::ffi::ngx_add_timer(ev, LOG_INTERVAL_MS);
    }
    Status::NGX_OK.into()
}

/// How often a worker writes what its fetch thread queued.
const LOG_INTERVAL_MS: ngx::ffi::ngx_msec_t = 500;

// SAFETY: an all-zero `ngx_event_t` is a valid idle event (nginx allocates its own zeroed).
static mut LOG_EVENT: ngx::ffi::ngx_event_t = unsafe { std::mem::zeroed() };

/// Timer handler (on the worker's event loop): logs the fetch thread's lines.
unsafe extern "C" fn write_fetch_log(ev: *mut ngx::ffi::ngx_event_t) {
    ngx_util::no_panic((), || {
        // SAFETY: `ev` is LOG_EVENT, armed in `init_process` with the cycle's log.
        let log = unsafe { (*ev).log };
        for (level, line) in fetch::take_log() {
            ngx::ngx_log_error!(level, log, "{}", line);
        }
    });
    // SAFETY: nginx's process flags are plain globals, read on the worker's own thread.
    let exiting = unsafe {
        ngx::ffi::ngx_exiting != 0 || ngx::ffi::ngx_quit != 0 || ngx::ffi::ngx_terminate != 0
    };
    if !exiting {
        // SAFETY: re-arming our own static event from its handler.
        unsafe { ngx::ffi::ngx_add_timer(ev, LOG_INTERVAL_MS) };
    }
}

unsafe impl HttpModuleMainConf for MeshModule {
    type MainConf = MainConf;
}

unsafe impl HttpModuleLocationConf for MeshModule {
    type LocationConf = LocConf;
}

impl HttpModule for MeshModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: nginx writes the module's indices before any configuration is parsed and
        // never afterwards; we only read it.
        unsafe { &*ptr::addr_of!(ngx_http_mesh_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls this with a valid configuration context.
        match unsafe { variables::register(cf) } {
            Ok(()) => Status::NGX_OK.into(),
            Err(()) => Status::NGX_ERROR.into(),
        }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls this with a valid configuration context, after the http block
        // was parsed, so the core module's main configuration exists.
        unsafe {
            let Some(cmcf) = NgxHttpCoreModule::main_conf_mut(&*cf) else {
                return Status::NGX_ERROR.into();
            };
            let h = ngx_array_push(
                &mut cmcf.phases[ngx_http_phases_NGX_HTTP_ACCESS_PHASE as usize].handlers,
            ) as *mut ngx_http_handler_pt;
            if h.is_null() {
                return Status::NGX_ERROR.into();
            }
            *h = Some(access::access_handler);

            forward::install_header_filter();
        }
        Status::NGX_OK.into()
    }
}

/// Merges location configurations (the trait's default would require `Merge`, but merging
/// here also resolves provider names, which needs the configuration context).
unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the two location configurations this module created with
    // `create_loc_conf`; they are distinct objects.
    unsafe {
        conf::merge_loc_conf(
            cf,
            &mut *prev.cast::<LocConf>(),
            &mut *conf.cast::<LocConf>(),
        )
    }
}
