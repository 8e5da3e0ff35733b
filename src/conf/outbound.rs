//! Outbound identity: `mesh_outbound_token $VAR AUDIENCE [format=full];` (which defines
//! `$VAR`), `mesh_outbound_auth $VAR | off;` (a location's requests go upstream with that
//! token) and `mesh_metadata_server URL;`.

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
    if outbound.iter().any(|t| t.var == name) {
        return Err(invalid(format!("variable \"{var}\" is already defined")));
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
    let token = Arc::new(OutboundToken::new(
        name.to_string(),
        audience.to_string(),
        full,
    ));
    define_variable(d.cf, name, &token)
        .map_err(|_| invalid(format!("cannot define variable \"{var}\"")))?;
    outbound.push(token);
    Ok(())
}

/// `mesh_outbound_auth $VAR | off;` as written: the variable is looked up among the
/// `mesh_outbound_token` lines when the location is merged (they may come later in the http
/// block), and an unknown one is reported at this line.
#[derive(Clone)]
pub enum OutboundAuth {
    Off,
    Var(String, crate::nginx::conf::ConfPos),
}

/// `mesh_outbound_auth $VAR | off;`
pub fn auth(d: &Directive) -> Result<OutboundAuth, ConfError> {
    let v = d.word(1)?;
    if v == "off" {
        return Ok(OutboundAuth::Off);
    }
    let name = v
        .strip_prefix('$')
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            invalid(format!(
                "\"{v}\" is not a variable (\"$VAR\" of a mesh_outbound_token, or \"off\")"
            ))
        })?;
    Ok(OutboundAuth::Var(name.to_string(), d.pos.clone()))
}

/// The token `mesh_outbound_auth` names, among the `mesh_outbound_token` lines.
pub fn resolve_auth(
    outbound: &[Arc<OutboundToken>],
    auth: &OutboundAuth,
) -> Result<Option<Arc<OutboundToken>>, ConfError> {
    match auth {
        OutboundAuth::Off => Ok(None),
        OutboundAuth::Var(name, pos) => match outbound.iter().find(|t| &t.var == name) {
            Some(t) => Ok(Some(t.clone())),
            None => Err(ConfError::At(
                pos.clone(),
                format!(
                    "mesh_outbound_auth: \"${name}\" is not defined by a mesh_outbound_token line"
                ),
            )),
        },
    }
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
        // SAFETY: a live request has a live connection.
        let log = unsafe { (*req.connection).log };
        let value = crate::state::keystore::current_token(token);
        if value.is_none() && token.should_warn() {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                log,
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
