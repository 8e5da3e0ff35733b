//! `ngx_http_mesh_module`: service identity, policy and trace context for nginx.
//!
//! This file only registers the module with nginx: the module and its context, the
//! variables, the access- and pre-content-phase handlers and the header filter, and what each worker starts.
//! The logic lives in the `mesh-core` crate; the folders here are the thin FFI shell:
//!
//! - `conf/`: the `mesh_*` directives, parsed into typed configuration and merged;
//! - `request/`: what happens to one request (context, pipeline, variables, headers);
//! - `state/`: what outlives a request (rate zones, live keys, outbound tokens, the shared key
//!   store, refresher);
//! - `nginx/`: the helpers several folders use to touch nginx structures (`unsafe` also
//!   stands where nginx hands a folder raw pointers; README's layout section says where).

// Every `unsafe` block and impl says why it is sound (`make check` denies warnings).
#![warn(clippy::undocumented_unsafe_blocks)]

use std::ptr;

use ngx::core::Status;
use ngx::ffi::{
    ngx_array_push, ngx_command_t, ngx_conf_t, ngx_cycle_t, ngx_http_handler_pt, ngx_http_module_t,
    ngx_http_phases_NGX_HTTP_ACCESS_PHASE, ngx_http_phases_NGX_HTTP_LOG_PHASE,
    ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE, ngx_http_phases_NGX_HTTP_SERVER_REWRITE_PHASE,
    ngx_int_t, ngx_module_t, ngx_uint_t, NGX_HTTP_MODULE, NGX_LOG_EMERG,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

mod conf;
mod nginx;
mod request;
mod state;

use conf::{LocConf, MainConf};
use ngx::ngx_log_error;
use state::keystore;

pub(crate) struct MeshModule;

static NGX_HTTP_MESH_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(MeshModule::preconfiguration),
    postconfiguration: Some(MeshModule::postconfiguration),
    create_main_conf: Some(MeshModule::create_main_conf),
    init_main_conf: Some(conf::merge::init_main_conf),
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(conf::audit::create_loc_conf),
    merge_loc_conf: Some(conf::merge::merge_loc_conf),
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
    commands: unsafe { ptr::addr_of_mut!(NGX_HTTP_MESH_COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_module: Some(init_module),
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};

/// Runs in each worker after fork: seeds the trace-id generator from the OS, takes the keys
/// and outbound tokens from the shared key store, starts the refresher thread that fetches
/// them when due and the timer that keeps this worker in step with the store.
/// Every `mesh_*` directive (`conf::commands`), with the content handlers of `mesh_ready` and
/// `mesh_status`.
static mut NGX_HTTP_MESH_COMMANDS: [ngx_command_t; conf::commands::COUNT] =
    conf::commands::table::<MeshModule>();

impl conf::ContentHandlers for MeshModule {
    const READY: ngx_http_handler_pt = Some(request::ready::handler);
    const METRICS: ngx_http_handler_pt = Some(request::metrics::handler);
}

/// In the master before the workers fork, at start and at each reload: the shared key
/// store's first fetch.
unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: the cycle's http main configuration (if any) lives as long as the cycle.
    match unsafe { MeshModule::main_conf(&*cycle) } {
        // SAFETY: nginx passes the new cycle.
        Some(mcf) => unsafe { keystore::init_module(cycle, &mcf.keystore, mcf.key_sources()) },
        None => Status::NGX_OK.into(),
    }
}

unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the live cycle.
    let log = unsafe { (*cycle).log };
    if !request::trace::seed_worker() {
        ngx_log_error!(
            NGX_LOG_EMERG,
            log,
            "mesh: cannot read random bytes from the operating system"
        );
        return Status::NGX_ERROR.into();
    }
    // SAFETY: the cycle is live; its http main configuration (if any) outlives the worker.
    let Some(mcf) = (unsafe { MeshModule::main_conf(&*cycle) }) else {
        return Status::NGX_OK.into();
    };
    state::metrics::activate(&mcf.metrics);
    if let Err(e) = keystore::start_worker(&mcf.keystore, mcf.key_sources()) {
        ngx_log_error!(NGX_LOG_EMERG, log, "mesh: {}", e);
        return Status::NGX_ERROR.into();
    }
    keystore::timer::start(log);
    if let Err(e) = state::syncer::start_worker(mcf.metrics.rate_zones(), log) {
        ngx_log_error!(NGX_LOG_EMERG, log, "mesh: {}", e);
        return Status::NGX_ERROR.into();
    }
    if let Some(export) = &mcf.trace_export {
        if let Err(e) = state::span_export::start_worker(export) {
            ngx_log_error!(NGX_LOG_EMERG, log, "mesh: {}", e);
            return Status::NGX_ERROR.into();
        }
    }
    Status::NGX_OK.into()
}

/// Runs in a worker that leaves (graceful shutdown, reload): gives up what it was fetching,
/// and sends the spans still queued (bounded: about a second).
unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    nginx::no_panic((), keystore::stop_worker);
    nginx::no_panic((), state::span_export::stop_worker);
}

// SAFETY: the http main configuration of this module is a `MainConf` (create_main_conf).
unsafe impl HttpModuleMainConf for MeshModule {
    type MainConf = MainConf;
}

// SAFETY: its location configurations are `LocConf`s (create_loc_conf).
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
        match unsafe { request::variables::register(cf) } {
            Ok(()) => Status::NGX_OK.into(),
            Err(()) => Status::NGX_ERROR.into(),
        }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls this with a valid configuration context, every level merged.
        if unsafe { conf::audit::finish(cf) }.is_err() {
            return Status::NGX_ERROR.into();
        }
        // SAFETY: as above. Written only once the audit accepted the configuration.
        if unsafe { conf::report::finish(cf) }.is_err() {
            return Status::NGX_ERROR.into();
        }
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
            *h = Some(request::access::access_handler);
            let h = ngx_array_push(
                &mut cmcf.phases[ngx_http_phases_NGX_HTTP_SERVER_REWRITE_PHASE as usize].handlers,
            ) as *mut ngx_http_handler_pt;
            if h.is_null() {
                return Status::NGX_ERROR.into();
            }
            *h = Some(request::server_rewrite::server_rewrite_handler);
            let h = ngx_array_push(
                &mut cmcf.phases[ngx_http_phases_NGX_HTTP_LOG_PHASE as usize].handlers,
            ) as *mut ngx_http_handler_pt;
            if h.is_null() {
                return Status::NGX_ERROR.into();
            }
            *h = Some(request::count::log_handler);

            let h = ngx_array_push(
                &mut cmcf.phases[ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE as usize].handlers,
            ) as *mut ngx_http_handler_pt;
            if h.is_null() {
                return Status::NGX_ERROR.into();
            }
            *h = Some(request::precontent::precontent_handler);

            request::response::install_header_filter();

            let Some(mcf) = MeshModule::main_conf_mut(&*cf) else {
                return Status::NGX_ERROR.into();
            };
            let sources = keystore::Sources {
                providers: &mcf.providers,
                outbound: &mcf.outbound,
                metadata_server: &mcf.metadata_server,
            };
            if let Err(e) = keystore::add_zone(cf, &mut mcf.keystore, &sources) {
                ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", e);
                return Status::NGX_ERROR.into();
            }
            let providers: Vec<(String, bool)> = mcf
                .providers
                .iter()
                .map(|p| (p.name.clone(), p.url.is_none()))
                .collect();
            let zones = mcf.zones.clone();
            let routes = mcf.routes.clone();
            if let Err(e) =
                state::metrics::configure(cf, &mut mcf.metrics, &providers, &zones, &routes)
            {
                ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", e);
                return Status::NGX_ERROR.into();
            }
        }
        Status::NGX_OK.into()
    }
}
