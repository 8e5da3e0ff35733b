//! One wrapper for every directive handler, and the typed error it reports.
//!
//! nginx calls a directive's `set` with the configuration context, the command and the
//! configuration object of the directive's level. `directive` turns that into a safe call of
//! a Rust function on the typed configuration and the directive's words, catches a panic,
//! and reports a `ConfError` the way nginx's own directives do: `[emerg]` with the directive
//! and the file:line. The `mesh_provider` block's lines go through the same wrapper.

use std::ffi::{c_char, c_void};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{ngx_conf_t, ngx_http_handler_pt, ngx_str_t};

use crate::nginx::conf::{args, conf_error, conf_msg, word, ConfPos};
use crate::nginx::no_panic;

/// Why a directive is refused.
#[derive(Debug)]
pub enum ConfError {
    /// Given twice at one level: nginx words it (`"X" directive is duplicate`).
    Duplicate,
    /// What is wrong with the values; reported as `DIRECTIVE: WHAT`.
    Invalid(String),
    /// A message that names what it is about itself.
    Message(String),
    /// A message about another line (found at a block's end, or when merging).
    At(ConfPos, String),
    /// nginx already logged it (an error inside a block).
    Reported,
}

impl From<String> for ConfError {
    fn from(s: String) -> Self {
        ConfError::Message(s)
    }
}

impl From<&str> for ConfError {
    fn from(s: &str) -> Self {
        ConfError::Message(s.to_string())
    }
}

/// `ConfError::Invalid`, for `map_err`.
pub fn invalid(msg: impl Into<String>) -> ConfError {
    ConfError::Invalid(msg.into())
}

impl ConfError {
    /// Logs the error at `emerg` and returns what nginx expects from a failed directive.
    /// `name` is the directive the error is about (its first word).
    pub fn report(self, cf: *mut ngx_conf_t, name: &str) -> *mut c_char {
        match self {
            ConfError::Duplicate => conf_msg(c"is duplicate"),
            ConfError::Invalid(m) => conf_error(cf, &format!("{name}: {m}")),
            ConfError::Message(m) => conf_error(cf, &m),
            ConfError::At(pos, m) => pos.error(cf, &m),
            ConfError::Reported => NGX_CONF_ERROR,
        }
    }
}

/// One directive line as the handler sees it.
pub struct Directive<'a> {
    pub cf: *mut ngx_conf_t,
    /// The words; `args[0]` is the directive's name.
    pub args: &'a [ngx_str_t],
    pub pos: ConfPos,
}

impl Directive<'_> {
    /// Word `i` as UTF-8 text.
    pub fn word(&self, i: usize) -> Result<&str, ConfError> {
        Ok(word(&self.args[i])?)
    }

    /// The values (every word after the name), as text.
    pub fn values(&self) -> Result<Vec<String>, ConfError> {
        self.args[1..]
            .iter()
            .map(|w| word(w).map(str::to_string).map_err(ConfError::from))
            .collect()
    }

    /// The directive as written, with where it stands: what `$mesh_rule` reports.
    pub fn text(&self) -> String {
        let words: Vec<String> = self.args.iter().map(|w| w.to_string()).collect();
        format!("{} ({}:{})", words.join(" "), self.pos.file, self.pos.line)
    }
}

/// Runs `f` for the directive being parsed, on the configuration object `conf` of type `C`.
///
/// # Safety
/// `cf` must be nginx's configuration context while the directive is handled, and `conf` the
/// object nginx passes for it: a live, exclusively borrowed `C` (the command table pairs each
/// handler with the level whose type it names, see `commands::Level`; the provider block passes its
/// own `handler_conf`).
pub unsafe fn directive<C>(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    f: impl FnOnce(&mut C, &Directive) -> Result<(), ConfError>,
) -> *mut c_char {
    no_panic(NGX_CONF_ERROR, || {
        // SAFETY: see the function's contract.
        let (conf, args, pos) = unsafe { (&mut *conf.cast::<C>(), args(cf), ConfPos::current(cf)) };
        let d = Directive { cf, args, pos };
        match f(conf, &d) {
            Ok(()) => NGX_CONF_OK,
            Err(e) => {
                let name = args.first().map(|w| w.to_string()).unwrap_or_default();
                e.report(cf, &name)
            }
        }
    })
}

/// Sets an `Option` field once per level: given again, the directive is a duplicate.
pub fn set_once<T>(
    slot: &mut Option<T>,
    parse: impl FnOnce() -> Result<T, ConfError>,
) -> Result<(), ConfError> {
    if slot.is_some() {
        return Err(ConfError::Duplicate);
    }
    *slot = Some(parse()?);
    Ok(())
}

/// `on|off`, worded as nginx's own flag directives.
pub fn flag(d: &Directive) -> Result<bool, ConfError> {
    let v = d.word(1)?;
    mesh_core::units::parse_on_off(v).ok_or_else(|| {
        ConfError::Message(format!(
            "invalid value \"{v}\" in \"{}\" directive, it must be \"on\" or \"off\"",
            d.args[0]
        ))
    })
}

/// Appends to a list that this level owns (nothing inherits it before merging).
pub fn push<T>(list: &mut Option<std::sync::Arc<Vec<T>>>, item: T) -> Result<(), ConfError> {
    match list {
        Some(v) => match std::sync::Arc::get_mut(v) {
            Some(v) => v.push(item),
            None => return Err("configuration lists are only shared after merging".into()),
        },
        None => *list = Some(std::sync::Arc::new(vec![item])),
    }
    Ok(())
}

/// The request handlers that `mesh_ready` and `mesh_status` make a location's content handler
/// (they live in `request/`, above this folder: the module names them).
pub trait ContentHandlers {
    const READY: ngx_http_handler_pt;
    const METRICS: ngx_http_handler_pt;
}
