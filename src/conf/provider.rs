//! `mesh_provider NAME { ... }`: a trusted token issuer. The block's lines are read by the
//! same directive wrapper as every other directive; what they mean, the Google preset and the
//! algorithm/key rules are `mesh_core::provider`'s. This file only reads what needs nginx:
//! key and secret files (paths relative to the configuration prefix), CA bundles, and the
//! `keys` and `discovery` lines that name them.

use std::ffi::{c_char, c_void};
use std::ptr;
use std::sync::Arc;

use mesh_core::keys::KeySet;
use mesh_core::provider::{is_key_url, KeySource, Line, ProviderBlock, UrlFor};
use ngx::core::NGX_CONF_OK;
use ngx::ffi::{ngx_command_t, ngx_conf_parse, ngx_conf_t, NGX_LOG_WARN};

use super::directive::{directive, invalid, ConfError, Directive};
use crate::nginx::conf::{full_path, ConfPos};
use crate::state::provider::{KeyUrl, MeshProvider};

/// A block while it is read: the core's, plus where the lines an error may blame stand.
struct Block {
    core: ProviderBlock<KeyUrl>,
    pos: ConfPos,
    secret_pos: Option<ConfPos>,
    algorithms_pos: Option<ConfPos>,
    discovery_pos: Option<ConfPos>,
    /// The key or secret file, for the access report.
    key_file: Option<mesh_core::report::KeySource>,
}

/// `mesh_provider NAME { ... }`
pub fn block(providers: &mut Vec<Arc<MeshProvider>>, d: &Directive) -> Result<(), ConfError> {
    let name = d.word(1)?;
    if name.is_empty() {
        return Err(invalid("empty name"));
    }
    // The name is sent upstream (X-Mesh-Provider) and shown in $mesh_provider: no character
    // that could end or split a header, nor the `,` that lists of names use.
    if name
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ',')
    {
        return Err(invalid(format!(
            "invalid name \"{}\" (no spaces, commas or control characters)",
            name.escape_debug()
        )));
    }
    if providers.iter().any(|p| p.name == name) {
        return Err(format!("mesh_provider \"{name}\" is defined twice").into());
    }
    let mut block = Block {
        core: ProviderBlock::new(name.to_string()),
        pos: d.pos.clone(),
        secret_pos: None,
        algorithms_pos: None,
        discovery_pos: None,
        key_file: None,
    };
    // SAFETY: the block is parsed with a copy of `cf` whose handler reads each line into
    // `block`, which outlives the call (the same technique as nginx's `map` and `types`).
    let rv = unsafe {
        let mut block_cf: ngx_conf_t = *d.cf;
        block_cf.handler = Some(line);
        block_cf.handler_conf = ptr::addr_of_mut!(block).cast();
        ngx_conf_parse(&mut block_cf, ptr::null_mut())
    };
    if rv != NGX_CONF_OK {
        // The line at fault was reported already.
        return Err(ConfError::Reported);
    }
    let Block {
        core,
        pos,
        secret_pos,
        algorithms_pos,
        discovery_pos,
        key_file,
    } = block;
    let name = core.name.clone();
    let built = core
        .finish(|u| match u {
            UrlFor::Preset(url) => KeyUrl::new(url, None),
            UrlFor::Discovery {
                document,
                issuer,
                ca,
            } => {
                if document.starts_with("http://") {
                    if let Some(at) = &discovery_pos {
                        warn_plain_http(d, &name, "discovery", document, at);
                    }
                }
                KeyUrl::discovery(document, issuer, ca)
            }
        })
        .map_err(|e| {
            let at = match e.line {
                Line::Block => None,
                Line::Secret => secret_pos,
                Line::Algorithms => algorithms_pos,
                Line::Discovery => discovery_pos.clone(),
            };
            ConfError::At(at.unwrap_or(pos), e.message)
        })?;
    let mut provider = MeshProvider::new(built);
    provider.key_file = key_file;
    providers.push(Arc::new(provider));
    Ok(())
}

/// The `[warn]` for keys fetched over plain `http://` (anyone on the path can replace them).
fn warn_plain_http(d: &Directive, provider: &str, line: &str, url: &str, at: &ConfPos) {
    // SAFETY: `cf->log` is valid for the whole configuration pass.
    let log = unsafe { (*d.cf).log };
    ngx::ngx_log_error!(
        NGX_LOG_WARN,
        log,
        "mesh_provider \"{}\": {} \"{}\" is fetched over plain http://: anyone on the path can replace the keys; use https:// in {}:{}",
        provider,
        line,
        mesh_core::provider::shown_url(url),
        at.file,
        at.line
    );
}

/// `ca=FILE` as the optional last word of `keys` and `discovery`: the resolved path.
fn ca_param(d: &Directive, word: &str) -> Result<String, ConfError> {
    match word.strip_prefix("ca=") {
        Some(ca) if !ca.is_empty() => Ok(full_path(d.cf, ca)),
        _ => Err(invalid(format!("invalid parameter \"{word}\""))),
    }
}

/// One line inside the block (nginx's `cf->handler`).
unsafe extern "C" fn line(
    cf: *mut ngx_conf_t,
    _dummy: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is the `handler_conf` set in `block`: a live Block, only used here.
    unsafe { directive(cf, conf, |b: &mut Block, d| b.line(d)) }
}

impl Block {
    fn line(&mut self, d: &Directive) -> Result<(), ConfError> {
        let w = d.values()?;
        let dir = d.word(0)?;
        match dir {
            "keys" => {
                if self.core.has_keys() {
                    return Err(self.core.duplicate(dir).into());
                }
                let (src, ca) = match w.as_slice() {
                    [src] => (src.as_str(), None),
                    [src, ca] => (src.as_str(), Some(ca_param(d, ca)?)),
                    _ => return Err(self.core.arity(dir).into()),
                };
                let source = if is_key_url(src) {
                    if src.starts_with("http://") {
                        warn_plain_http(d, &self.core.name, "keys", src, &d.pos);
                    }
                    KeySource::Url(KeyUrl::new(src, ca.as_deref())?)
                } else {
                    if ca.is_some() {
                        return Err(format!(
                            "keys \"{src}\": \"ca=\" applies to https:// URLs only"
                        )
                        .into());
                    }
                    let path = full_path(d.cf, src);
                    let bytes = std::fs::read(&path)
                        .map_err(|e| invalid(format!("cannot read \"{path}\": {e}")))?;
                    self.key_file = Some(mesh_core::report::KeySource::File(path.clone()));
                    KeySource::File(
                        KeySet::load(&bytes).map_err(|e| format!("keys \"{path}\": {e}"))?,
                    )
                };
                self.core.set_keys(source);
            }
            "discovery" => {
                if self.core.has_discovery() || self.discovery_pos.is_some() {
                    return Err(self.core.duplicate(dir).into());
                }
                let (on, ca) = match w.as_slice() {
                    [on] => (on.as_str(), None),
                    [on, ca] => (on.as_str(), Some(ca_param(d, ca)?)),
                    _ => return Err(self.core.arity(dir).into()),
                };
                match on {
                    "on" => self.core.set_discovery(ca),
                    "off" if ca.is_none() => {}
                    "off" => return Err(invalid("\"ca=\" with \"discovery off\"")),
                    other => {
                        return Err(invalid(format!(
                            "discovery: invalid value \"{other}\", it must be \"on\" or \"off\""
                        )))
                    }
                }
                self.discovery_pos = Some(d.pos.clone());
            }
            "secret" => {
                if self.core.has_secret() {
                    return Err(self.core.duplicate(dir).into());
                }
                let [file] = w.as_slice() else {
                    return Err(self.core.arity(dir).into());
                };
                let path = full_path(d.cf, file);
                let bytes = std::fs::read(&path)
                    .map_err(|e| invalid(format!("cannot read \"{path}\": {e}")))?;
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    return Err(format!("secret \"{path}\" is empty").into());
                }
                self.core.set_secret(KeySet::from_secret(&bytes));
                self.secret_pos = Some(d.pos.clone());
                self.key_file = Some(mesh_core::report::KeySource::Secret(path));
            }
            _ => {
                self.core.line(dir, &w)?;
                if dir == "algorithms" {
                    self.algorithms_pos = Some(d.pos.clone());
                }
            }
        }
        Ok(())
    }
}
