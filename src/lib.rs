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
    ngx_http_phases_NGX_HTTP_ACCESS_PHASE, ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE, ngx_int_t,
    ngx_module_t, ngx_uint_t, NGX_HTTP_MODULE,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

mod access;
mod conf;
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

/// Runs in each worker after fork: seeds the worker's trace-id generator from the OS.
unsafe extern "C" fn init_process(cycle: *mut ngx::ffi::ngx_cycle_t) -> ngx_int_t {
    if !forward::seed_worker() {
        // SAFETY: nginx passes the live cycle.
        let log = unsafe { (*cycle).log };
        ngx::ngx_log_error!(
            ngx::ffi::NGX_LOG_EMERG,
            log,
            "mesh: cannot read random bytes from the operating system"
        );
        return Status::NGX_ERROR.into();
    }
    Status::NGX_OK.into()
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

            let h = ngx_array_push(
                &mut cmcf.phases[ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE as usize].handlers,
            ) as *mut ngx_http_handler_pt;
            if h.is_null() {
                return Status::NGX_ERROR.into();
            }
            *h = Some(forward::precontent_handler);
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
