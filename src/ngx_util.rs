//! The small set of helpers that read and write nginx structures. Every `unsafe` block of the
//! module that is not a plain FFI entry point lives here, with the reason it is sound.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use ngx::core::NGX_CONF_ERROR;
use ngx::ffi::{
    add_to_ngx_table, ngx_conf_full_name, ngx_conf_t, ngx_http_request_t, ngx_list_part_t,
    ngx_list_push, ngx_list_t, ngx_palloc, ngx_str_t, ngx_table_elt_t, ngx_variable_value_t,
    NGX_LOG_EMERG,
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

/// The value of the first request header named `name` (case-insensitive).
pub fn header_in<'a>(r: &'a ngx::http::Request, name: &str) -> Option<&'a [u8]> {
    r.headers_in_iterator()
        .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_bytes())
}

/// The values of every request header named `name` (case-insensitive), in order.
pub fn headers_in_all<'a>(r: &'a ngx::http::Request, name: &str) -> Vec<&'a [u8]> {
    r.headers_in_iterator()
        .filter(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_bytes())
        .collect()
}

/// Adds a response header (copied into the request pool).
pub fn add_header_out(r: &mut ngx::http::Request, key: &str, value: &str) -> bool {
    let r: &mut ngx_http_request_t = r.as_mut();
    // SAFETY: `r` is a live request; `ngx_list_push` returns a slot in `headers_out.headers`
    // (or NULL) that we fill completely before nginx reads it; the strings are copied into
    // the request pool, which outlives the response.
    unsafe {
        let h = ngx_list_push(&mut r.headers_out.headers) as *mut ngx_table_elt_t;
        if h.is_null() {
            return false;
        }
        // From nginx 1.23 on, headers of one name are chained through `next`.
        #[cfg(ngx_table_elt_next)]
        {
            (*h).next = std::ptr::null_mut();
        }
        if add_to_ngx_table(h, r.pool, key, value).is_none() {
            (*h).hash = 0; // an entry with hash 0 is skipped by the header filter
            return false;
        }
    }
    true
}

/// Points a variable's value at `data`, which must outlive the request (static text, the
/// module's configuration, memory owned by the request context, or the request pool).
pub fn set_var(v: &mut ngx_variable_value_t, data: &[u8]) {
    v.set_valid(1);
    v.set_no_cacheable(0);
    v.set_not_found(0);
    v.set_len(data.len() as u32);
    v.data = data.as_ptr().cast_mut();
}

/// Copies `data` into the request pool and points the variable at the copy.
pub fn set_var_copy(r: &ngx_http_request_t, v: &mut ngx_variable_value_t, data: &[u8]) -> bool {
    if data.is_empty() {
        set_var(v, b"");
        return true;
    }
    // SAFETY: the request pool lives as long as the request that reads the variable.
    match unsafe { ngx_str_t::from_bytes(r.pool, data) } {
        Some(s) => {
            set_var(v, s.as_bytes());
            true
        }
        None => false,
    }
}

/// Runs `f`, turning a panic into `fallback`: a panic must never unwind into nginx (it would
/// abort the worker).
pub fn no_panic<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// A static C string as nginx's "directive failed" return value (`"DIRECTIVE" directive MSG`).
pub fn conf_msg(msg: &'static CStr) -> *mut c_char {
    msg.as_ptr().cast_mut()
}

/// Removes every request header whose name `matches`, without moving any element: other
/// headers are referenced by pointer from `r->headers_in` (`host`, `user_agent`, ...), so
/// elements must stay where they are. A removed element at either end of its list part is
/// cut off; one in the middle splits the part in two; a part left empty is unlinked (nginx's
/// list walkers assume every part after the first holds an element). The last part may then
/// have less room than `nalloc` says, so `nalloc` is lowered to what it holds: the next
/// `ngx_list_push` starts a fresh part instead of writing past the array.
pub fn remove_headers_in(r: &mut ngx_http_request_t, matches: impl Fn(&[u8]) -> bool) -> bool {
    let list: *mut ngx_list_t = &mut r.headers_in.headers;
    // SAFETY: `list` is the live request's header list, allocated from the request pool. We
    // only shrink parts (pointer arithmetic inside their own arrays), link or unlink parts,
    // and allocate from the same pool; no element is moved or freed.
    unsafe {
        let first: *mut ngx_list_part_t = &mut (*list).part;
        let mut changed = false;
        'restart: loop {
            let mut prev: *mut ngx_list_part_t = ptr::null_mut();
            let mut part = first;
            while !part.is_null() {
                let elts = (*part).elts as *mut ngx_table_elt_t;
                let n = (*part).nelts;
                let Some(i) = (0..n).find(|&i| matches((*elts.add(i)).key.as_bytes())) else {
                    prev = part;
                    part = (*part).next;
                    continue;
                };
                changed = true;
                if i == n - 1 {
                    (*part).nelts -= 1;
                } else if i == 0 {
                    (*part).elts = elts.add(1).cast();
                    (*part).nelts -= 1;
                } else {
                    let rest = ngx_palloc((*list).pool, size_of::<ngx_list_part_t>())
                        as *mut ngx_list_part_t;
                    if rest.is_null() {
                        return false;
                    }
                    (*rest).elts = elts.add(i + 1).cast();
                    (*rest).nelts = n - i - 1;
                    (*rest).next = (*part).next;
                    (*part).nelts = i;
                    (*part).next = rest;
                    if part == (*list).last {
                        (*list).last = rest;
                    }
                }
                if (*part).nelts == 0 && part != first {
                    (*prev).next = (*part).next;
                    if part == (*list).last {
                        (*list).last = prev;
                    }
                }
                continue 'restart;
            }
            break;
        }
        if changed {
            let last = (*list).last;
            if (*last).nelts == 0 {
                // Only the first part can be empty here: give it a whole array again.
                let elts = ngx_palloc((*list).pool, (*list).nalloc.max(1) * (*list).size);
                if elts.is_null() {
                    return false;
                }
                (*last).elts = elts;
                (*list).nalloc = (*list).nalloc.max(1);
            } else {
                (*list).nalloc = (*last).nelts;
            }
        }
        true
    }
}

/// Adds a request header (for the upstream), copied into the request pool.
pub fn add_header_in(r: &mut ngx_http_request_t, key: &str, value: &[u8]) -> bool {
    // SAFETY: as `add_header_out`, on the request's `headers_in` list.
    unsafe {
        let h = ngx_list_push(&mut r.headers_in.headers) as *mut ngx_table_elt_t;
        if h.is_null() {
            return false;
        }
        #[cfg(ngx_table_elt_next)]
        {
            (*h).next = ptr::null_mut();
        }
        if add_to_ngx_table(h, r.pool, key, value).is_none() {
            // The slot just pushed is the last one of the last part: give it back.
            (*r.headers_in.headers.last).nelts -= 1;
            return false;
        }
    }
    true
}
