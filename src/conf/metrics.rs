//! `mesh_status;`: a location that answers with the module's metrics (the handler is
//! `request::metrics`).

use std::ffi::{c_char, c_void};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{ngx_command_t, ngx_conf_t};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};

use super::directive::ContentHandlers;

/// `mesh_status;` (location): this location answers with the metrics.
///
/// # Safety
/// nginx calls directive handlers with its configuration context.
pub unsafe extern "C" fn mesh_status<H: ContentHandlers>(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `cf` is live while the directive is handled; in a location its http core
    // location configuration exists.
    let clcf = unsafe { NgxHttpCoreModule::location_conf_mut(&*cf) };
    match clcf {
        Some(clcf) => {
            clcf.handler = H::METRICS;
            NGX_CONF_OK
        }
        None => NGX_CONF_ERROR,
    }
}
