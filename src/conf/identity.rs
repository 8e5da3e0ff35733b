//! Identity: `mesh_auth`, `mesh_token`, `mesh_audience`, `mesh_token_cache`, `mesh_realm`,
//! and the `mesh_config_version` label.

use std::ptr::NonNull;
use std::sync::Arc;

use ngx::ffi::ngx_http_complex_value_t;

use super::directive::{invalid, ConfError, Directive};
use crate::nginx::conf::compile_complex;
use crate::state::provider::MeshProvider;

/// `mesh_auth` as written, resolved to providers once all `mesh_provider` blocks are known.
pub struct AuthSpec {
    pub optional: bool,
    pub names: Vec<String>,
    pub pos: crate::nginx::conf::ConfPos,
    /// Filled when merging; the same length as `names` from then on.
    pub providers: Vec<Arc<MeshProvider>>,
    /// Each provider's `audience` list (fixed at configuration time; only keys change
    /// while nginx runs), so that a cached token's audience is checked without a snapshot.
    pub audiences: Vec<Vec<String>>,
}

#[derive(Clone)]
pub enum Auth {
    Off,
    On(Arc<AuthSpec>),
}

/// `mesh_auth off | [optional] PROVIDER ...;`
pub fn auth(d: &Directive) -> Result<Auth, ConfError> {
    let mut w = d.values()?;
    if w.len() == 1 && w[0] == "off" {
        return Ok(Auth::Off);
    }
    let optional = w.first().is_some_and(|s| s == "optional");
    if optional {
        w.remove(0);
    }
    if w.is_empty() {
        return Err(invalid("no provider named after \"optional\""));
    }
    for (i, n) in w.iter().enumerate() {
        if n == "off" || n == "optional" {
            return Err(invalid(format!("\"{n}\" must stand alone or first")));
        }
        if w[..i].contains(n) {
            return Err(invalid(format!("provider \"{n}\" named twice")));
        }
    }
    Ok(Auth::On(Arc::new(AuthSpec {
        optional,
        names: w,
        pos: d.pos.clone(),
        providers: Vec::new(),
        audiences: Vec::new(),
    })))
}

/// `mesh_token VALUE;` (variables allowed).
pub fn token(d: &Directive) -> Result<NonNull<ngx_http_complex_value_t>, ConfError> {
    compile_complex(d.cf, d.args[1])
        .map_err(|_| invalid(format!("invalid value \"{}\"", d.args[1])))
}

/// `mesh_audience AUD ...;`
pub fn audience(d: &Directive) -> Result<Arc<Vec<String>>, ConfError> {
    Ok(Arc::new(d.values()?))
}

/// `mesh_token_cache off | N;` (`off` is 0).
pub fn token_cache(d: &Directive) -> Result<usize, ConfError> {
    let v = d.word(1)?;
    if v == "off" {
        return Ok(0);
    }
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "invalid value \"{v}\" in \"mesh_token_cache\": expected \"off\" or a positive number of tokens"
        )
        .into()),
    }
}

/// `mesh_realm TEXT;` (it is quoted in `WWW-Authenticate`).
pub fn realm(d: &Directive) -> Result<String, ConfError> {
    let realm = d.word(1)?;
    if realm
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b.is_ascii_control())
    {
        return Err(invalid(format!(
            "\"{realm}\" may not hold quotes, backslashes or control characters"
        )));
    }
    Ok(realm.to_string())
}

/// `mesh_config_version TEXT;`
pub fn config_version(d: &Directive) -> Result<String, ConfError> {
    Ok(d.word(1)?.to_string())
}
