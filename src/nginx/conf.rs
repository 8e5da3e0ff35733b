//! Configuration-time helpers: directive words, positions, paths, complex values, zones.

use std::ffi::{c_char, CStr};
use std::ptr::{self, NonNull};

use ngx::core::NGX_CONF_ERROR;
use ngx::ffi::{
    ngx_conf_full_name, ngx_conf_t, ngx_http_compile_complex_value,
    ngx_http_compile_complex_value_t, ngx_http_complex_value_t, ngx_shared_memory_add,
    ngx_shm_zone_t, ngx_str_t, NGX_LOG_EMERG,
};
use ngx::ngx_conf_log_error;

/// The words of the directive being parsed (`args[0]` is its name).
///
/// # Safety
/// `cf` must be nginx's configuration context while a directive is being handled.
pub unsafe fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: during a directive handler `cf->args` is an array of `ngx_str_t` that lives
    // until the next directive is read; callers copy what they keep.
    unsafe { (*(*cf).args).as_slice() }
}

/// A directive word as UTF-8 text, or a configuration error naming it.
pub fn word(w: &ngx_str_t) -> Result<&str, String> {
    w.to_str().map_err(|_| {
        format!(
            "\"{}\" is not valid UTF-8",
            String::from_utf8_lossy(w.as_bytes())
        )
    })
}

/// Logs `msg` at `emerg` with the current file and line (nginx appends " in FILE:LINE")
/// and returns `NGX_CONF_ERROR`.
pub fn conf_error(cf: *mut ngx_conf_t, msg: &str) -> *mut c_char {
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", msg);
    NGX_CONF_ERROR
}

/// Where a directive stands, to report an error found later (at the end of a block, or when
/// locations are merged) against the line that caused it.
#[derive(Clone, Debug, Default)]
pub struct ConfPos {
    pub file: String,
    pub line: usize,
}

impl ConfPos {
    /// # Safety
    /// `cf` must be nginx's configuration context while a file is being parsed.
    pub unsafe fn current(cf: *mut ngx_conf_t) -> ConfPos {
        // SAFETY: while a file is parsed `cf->conf_file` points at it; it is NULL only for
        // directives given with `-g`, which we report without a position.
        unsafe {
            let f = (*cf).conf_file;
            if f.is_null() {
                return ConfPos::default();
            }
            ConfPos {
                file: (*f).file.name.to_string(),
                line: (*f).line,
            }
        }
    }

    /// Logs `msg` at `emerg` naming this position, as nginx itself words it.
    pub fn error(&self, cf: *mut ngx_conf_t, msg: &str) -> *mut c_char {
        // SAFETY: `cf->log` is valid for the whole configuration pass.
        let log = unsafe { (*cf).log };
        if self.file.is_empty() {
            ngx::ngx_log_error!(NGX_LOG_EMERG, log, "{}", msg);
        } else {
            ngx::ngx_log_error!(NGX_LOG_EMERG, log, "{} in {}:{}", msg, self.file, self.line);
        }
        NGX_CONF_ERROR
    }
}

/// Resolves a path in the configuration the way nginx's own directives do: relative paths are
/// taken from the configuration prefix (the directory of nginx.conf).
pub fn full_path(cf: *mut ngx_conf_t, path: &str) -> String {
    let mut bytes = path.as_bytes().to_vec();
    let mut name = ngx_str_t {
        len: bytes.len(),
        data: bytes.as_mut_ptr(),
    };
    // SAFETY: `ngx_conf_full_name` reads `name` and, for a relative path, replaces it with a
    // string allocated from the cycle's pool; `bytes` outlives the call.
    let rc = unsafe { ngx_conf_full_name((*cf).cycle, &mut name, 1) };
    if rc != 0 {
        return path.to_string();
    }
    name.to_string()
}

/// A static C string as nginx's "directive failed" return value (`"DIRECTIVE" directive MSG`).
pub fn conf_msg(msg: &'static CStr) -> *mut c_char {
    msg.as_ptr().cast_mut()
}

/// Compiles a value that may hold variables (`$cookie_x`, `$binary_remote_addr`).
pub fn compile_complex(
    cf: *mut ngx_conf_t,
    mut value: ngx_str_t,
) -> Result<NonNull<ngx_http_complex_value_t>, ()> {
    // SAFETY: the complex value is allocated zeroed from the configuration pool, as
    // `ngx_http_compile_complex_value` expects, and compiled from a string nginx keeps in the
    // same pool; it lives as long as the configuration.
    unsafe {
        let cv = ngx::ffi::ngx_pcalloc((*cf).pool, size_of::<ngx_http_complex_value_t>())
            as *mut ngx_http_complex_value_t;
        let cv = NonNull::new(cv).ok_or(())?;
        let mut ccv: ngx_http_compile_complex_value_t = std::mem::zeroed();
        ccv.cf = cf;
        ccv.value = &mut value;
        ccv.complex_value = cv.as_ptr();
        if ngx_http_compile_complex_value(&mut ccv) != 0 {
            return Err(());
        }
        Ok(cv)
    }
}

/// The VALUE of a `name=VALUE` directive word, as an nginx string inside that word (nginx
/// keeps the word, in the configuration pool, for as long as the configuration).
pub fn value_part(word: &ngx_str_t, value: &str) -> ngx_str_t {
    let skip = word.len - value.len();
    ngx_str_t {
        len: value.len(),
        // SAFETY: `value` is a suffix of the word's bytes (it came from splitting them), so
        // the pointer stays inside the word.
        data: unsafe { word.data.add(skip) },
    }
}

/// What a shared zone of this module holds. Each kind is its own nginx tag, and nginx refuses
/// one name declared with two tags: a rate zone can never be handed the metrics zone, the key
/// zone or a sync zone by name, whatever the configuration says and in whatever order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ZoneKind {
    Rate,
    RateSync,
    Metrics,
    Keys,
}

/// One byte per kind: only their (distinct) addresses are used, as nginx's zone tags.
static ZONE_TAGS: [u8; 4] = [0; 4];

impl ZoneKind {
    fn tag(self) -> *mut std::ffi::c_void {
        ptr::addr_of!(ZONE_TAGS[self as usize]).cast_mut().cast()
    }
}

/// nginx's shared-memory entry for a zone name owned by this module (`size` 0: a reference,
/// sized by its definition). NULL-free: `Err` when nginx refuses (it said why, at the line).
pub fn shared_zone(
    cf: *mut ngx_conf_t,
    name: ngx_str_t,
    size: usize,
    kind: ZoneKind,
) -> Result<NonNull<ngx_shm_zone_t>, String> {
    let mut name = name;
    // SAFETY: the tag is a static's address (only the address is used), one per kind, so
    // nginx refuses a zone of the same name declared by another module or for another kind.
    let zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, kind.tag()) };
    NonNull::new(zone).ok_or_else(|| format!("the shared zone \"{name}\" cannot be created"))
}
