//! Outbound identity: `mesh_outbound_token $VAR AUDIENCE [format=full];` (which defines
//! `$VAR`) and `mesh_metadata_server URL;`.

use std::sync::Arc;

use ngx::core::Status;
use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_int_t, ngx_str_t,
    ngx_variable_value_t, NGX_LOG_WARN,
};

use super::directive::{invalid, ConfError, Directive};
use crate::nginx::no_panic;
use crate::nginx::variable::set_var_copy;
use crate::state::outbound::OutboundToken;

/// `mesh_outbound_token $VAR AUDIENCE [format=full];`
pub fn token(outbound: &mut Vec<Arc<OutboundToken>>, d: &Directive) -> Result<(), ConfError> {
    let var = d.word(1)?;
    let audience = d.word(2)?;
    let name = var
        .strip_prefix('$')
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .ok_or_else(|| invalid(format!("invalid variable name \"{var}\"")))?;
    if audience.is_empty()
        || audience
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(invalid(format!("invalid audience \"{audience}\"")));
    }
    // format=full: the metadata server adds the Compute claims (google.compute_engine.*).
    let full = match d.values()?.get(2).map(String::as_str) {
        None => false,
        Some("format=full") => true,
        Some(other) => {
            return Err(invalid(format!(
                "invalid parameter \"{other}\" (format=full)"
            )))
        }
    };
    let token = Arc::new(OutboundToken::new(audience.to_string(), full));
    define_variable(d.cf, name, &token)
        .map_err(|_| invalid(format!("cannot define variable \"{var}\"")))?;
    outbound.push(token);
    Ok(())
}

/// `mesh_metadata_server URL;`
pub fn metadata_server(d: &Directive) -> Result<String, ConfError> {
    let url = d.word(1)?;
    let ok = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if !ok {
        return Err(invalid(format!(
            "invalid URL \"{url}\" (http://HOST[:PORT])"
        )));
    }
    Ok(url.to_string())
}

/// Defines `$NAME`: its value is the token held by `token`.
fn define_variable(cf: *mut ngx_conf_t, name: &str, token: &Arc<OutboundToken>) -> Result<(), ()> {
    // SAFETY: nginx copies nothing it does not own: the name is copied into the
    // configuration pool here, and `data` points at the token, which the main configuration
    // keeps alive for as long as this variable exists.
    unsafe {
        let mut n = ngx_str_t::from_bytes((*cf).pool, name.as_bytes()).ok_or(())?;
        let var = ngx_http_add_variable(cf, &mut n, 0);
        if var.is_null() {
            return Err(());
        }
        (*var).get_handler = Some(get);
        (*var).data = Arc::as_ptr(token) as usize;
    }
    Ok(())
}

/// The getter of a `mesh_outbound_token` variable.
unsafe extern "C" fn get(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    no_panic(Status::NGX_ERROR.into(), || {
        // SAFETY: `data` is the OutboundToken set in `define_variable`, alive with the
        // configuration; nginx passes a live request and value slot.
        let (token, req, v) = unsafe { (&*(data as *const OutboundToken), &*r, &mut *v) };
        let mut value = token.current();
        if value.is_none() {
            // A token another worker published since this worker's timer last looked.
            crate::state::keystore::catch_up();
            value = token.current();
        }
        if value.is_none() && token.should_warn() {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                // SAFETY: a live request has a live connection.
                unsafe { (*req.connection).log },
                "mesh_outbound_token \"{}\": no token from the metadata server yet, the variable is empty",
                token.audience
            );
        }
        // Copied: the thread may replace the token while the request still uses the value.
        if set_var_copy(req, v, value.as_deref().unwrap_or("").as_bytes()) {
            v.set_no_cacheable(1);
            Status::NGX_OK.into()
        } else {
            Status::NGX_ERROR.into()
        }
    })
}
