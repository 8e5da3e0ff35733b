//! Keys before traffic: `mesh_keys_wait TIME;` (how long nginx waits at start for key URLs
//! and outbound tokens) and `mesh_ready;` (a location that answers readiness probes).

use std::ffi::{c_char, c_void};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{ngx_command_t, ngx_conf_t};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};

use super::directive::{invalid, ConfError, ContentHandlers, Directive};
use crate::nginx::conf::conf_error;
use crate::nginx::no_panic;

/// The longest `mesh_keys_wait` (seconds): the master waits that long before forking.
const MAX_WAIT_SECS: u64 = 120;

/// `mesh_keys_wait TIME;` (`0`: do not wait), in milliseconds.
pub fn wait(d: &Directive) -> Result<u64, ConfError> {
    let v = d.word(1)?;
    let secs = mesh_core::units::parse_time_secs(v).map_err(invalid)?;
    if secs > MAX_WAIT_SECS {
        return Err(invalid(format!(
            "\"{v}\" is too long, at most {MAX_WAIT_SECS}s"
        )));
    }
    Ok(secs * 1000)
}

/// `mesh_ready;` (location): the location's content handler answers readiness probes.
///
/// # Safety
/// Called by nginx for the directive inside a location.
pub unsafe extern "C" fn ready<H: ContentHandlers>(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    no_panic(NGX_CONF_ERROR, || {
        // SAFETY: inside a location the core module's location configuration exists.
        let Some(clcf) = (unsafe { NgxHttpCoreModule::location_conf_mut(&*cf) }) else {
            return conf_error(cf, "mesh_ready: no location configuration");
        };
        if clcf.handler.is_some() {
            return conf_error(
                cf,
                "mesh_ready: this location already has a content handler",
            );
        }
        clcf.handler = H::READY;
        NGX_CONF_OK
    })
}
