//! Request and response header lists: read, add, and remove in place.

use std::ptr;

use mesh_core::text::{TextBuf, WriteText};

use ngx::ffi::{
    add_to_ngx_table, ngx_http_request_t, ngx_list_part_t, ngx_list_push, ngx_list_t, ngx_palloc,
    ngx_pool_t, ngx_str_t, ngx_table_elt_t, ngx_uint_t,
};

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

/// Adds a response header named at run time (name and value copied into the request pool).
/// The request path uses [`push_header_out`] with a [`HeaderName`].
pub fn add_header_out(r: &mut ngx::http::Request, key: &str, value: &str) -> bool {
    !add_header_out_elt(r, key, value).is_null()
}

/// [`add_header_out`], returning the header's element (for [`hide_header_out`]); NULL when
/// it could not be added.
pub fn add_header_out_elt(
    r: &mut ngx::http::Request,
    key: &str,
    value: &str,
) -> *mut ngx_table_elt_t {
    let r: &mut ngx_http_request_t = r.as_mut();
    // SAFETY: `r` is a live request; `ngx_list_push` returns a slot in `headers_out.headers`
    // (or NULL) that we fill completely before nginx reads it; the strings are copied into
    // the request pool, which outlives the response.
    unsafe {
        let h = ngx_list_push(&mut r.headers_out.headers) as *mut ngx_table_elt_t;
        if h.is_null() {
            return ptr::null_mut();
        }
        // From nginx 1.23 on, headers of one name are chained through `next`.
        #[cfg(ngx_table_elt_next)]
        {
            (*h).next = std::ptr::null_mut();
        }
        if add_to_ngx_table(h, r.pool, key, value).is_none() {
            (*h).hash = 0; // an entry with hash 0 is skipped by the header filter
            return ptr::null_mut();
        }
        h
    }
}

/// Withdraws a response header added by [`add_header_out_elt`] before the response is sent:
/// an entry with hash 0 is skipped by nginx's header filter (as `add_header` does to clear).
///
/// # Safety
/// `h` must be an element of the live request's `headers_out.headers`, or NULL.
pub unsafe fn hide_header_out(h: *mut ngx_table_elt_t) {
    if !h.is_null() {
        // SAFETY: see the contract: the element lives in the request pool.
        unsafe { (*h).hash = 0 };
    }
}

/// Removes every request header whose name `matches`, without moving any element: other
/// headers are referenced by pointer from `r->headers_in` (`host`, `user_agent`, ...), so
/// elements must stay where they are. A removed element at either end of its list part is
/// cut off; one in the middle splits the part in two; a part left empty is unlinked (nginx's
/// list walkers assume every part after the first holds an element). The last part may then
/// have less room than `nalloc` says, so `nalloc` is lowered to what it holds: the next
/// `ngx_list_push` starts a fresh part instead of writing past the array.
pub fn remove_headers_in(r: &mut ngx_http_request_t, matches: impl Fn(&[u8]) -> bool) -> bool {
    remove_headers_in_where(r, |h| matches(h.key.as_bytes()))
}

/// [`remove_headers_in`], deciding on the whole header (name and value).
pub fn remove_headers_in_where(
    r: &mut ngx_http_request_t,
    matches: impl Fn(&ngx_table_elt_t) -> bool,
) -> bool {
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
                let Some(i) = (0..n).find(|&i| matches(&*elts.add(i))) else {
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

/// Whether any request header `matches`.
pub fn any_header_in(r: &ngx_http_request_t, matches: impl Fn(&ngx_table_elt_t) -> bool) -> bool {
    // SAFETY: the live request's header list: parts linked from `part`, each with `nelts`
    // initialised elements.
    unsafe {
        let mut part: *const ngx_list_part_t = &r.headers_in.headers.part;
        while !part.is_null() {
            let elts = (*part).elts as *const ngx_table_elt_t;
            if (0..(*part).nelts).any(|i| matches(&*elts.add(i))) {
                return true;
            }
            part = (*part).next;
        }
    }
    false
}

/// A header name known when the module is built: its lower-case form and nginx's hash of it
/// (`ngx_hash_strlow`), computed at compile time, so adding the header copies neither.
pub struct HeaderName {
    name: &'static str,
    lower: &'static str,
    hash: ngx_uint_t,
}

impl HeaderName {
    /// `lower` must be `name` in lower case (checked at compile time).
    pub const fn new(name: &'static str, lower: &'static str) -> HeaderName {
        let (n, l) = (name.as_bytes(), lower.as_bytes());
        assert!(n.len() == l.len());
        let mut hash: ngx_uint_t = 0;
        let mut i = 0;
        while i < l.len() {
            assert!(n[i].to_ascii_lowercase() == l[i]);
            // nginx's `ngx_hash(key, c)`: key * 31 + c.
            hash = hash.wrapping_mul(31).wrapping_add(l[i] as ngx_uint_t);
            i += 1;
        }
        HeaderName { name, lower, hash }
    }
}

/// `Retry-After`, sent with a rate-limit refusal and with a 503 for keys not fetched yet.
pub const RETRY_AFTER: HeaderName = HeaderName::new("Retry-After", "retry-after");

/// A header value: copied into the request pool, or pointing at memory that outlives every
/// request (the configuration, whose references are `'static`; or static text).
pub enum HeaderValue<'a> {
    Copy(&'a [u8]),
    Kept(&'static [u8]),
    /// Already written into the request pool ([`pool_text`]).
    InPool(PoolText),
}

/// Text written into a request's pool by [`pool_text`]: valid until that request is freed.
pub struct PoolText(ngx_str_t);

fn push_header(
    list: &mut ngx_list_t,
    pool: *mut ngx_pool_t,
    name: &HeaderName,
    value: HeaderValue,
) -> *mut ngx_table_elt_t {
    let value = match value {
        HeaderValue::Kept(v) => ngx_str_t {
            len: v.len(),
            data: v.as_ptr().cast_mut(),
        },
        // SAFETY: `pool` is the live request's pool, which outlives the headers.
        HeaderValue::Copy(v) if !v.is_empty() => match unsafe { ngx_str_t::from_bytes(pool, v) } {
            Some(s) => s,
            None => return ptr::null_mut(),
        },
        HeaderValue::Copy(_) => ngx_str_t::default(),
        HeaderValue::InPool(PoolText(s)) => s,
    };
    // SAFETY: `list` is a live header list of the request (allocated from `pool`);
    // `ngx_list_push` returns a slot (or NULL) that is filled completely here before nginx
    // reads it. The key and its lower-case form are static text: nginx only ever reads
    // them (`lowcase_key` is `*mut` in C for headers nginx parses into its own buffers).
    unsafe {
        let h = ngx_list_push(list) as *mut ngx_table_elt_t;
        if h.is_null() {
            return h;
        }
        #[cfg(ngx_table_elt_next)]
        {
            (*h).next = ptr::null_mut();
        }
        (*h).hash = name.hash;
        (*h).key = ngx_str_t {
            len: name.name.len(),
            data: name.name.as_ptr().cast_mut(),
        };
        (*h).lowcase_key = name.lower.as_ptr().cast_mut();
        (*h).value = value;
        h
    }
}

/// Adds a response header: no copy of the name, the value copied or kept.
pub fn push_header_out(r: &mut ngx::http::Request, name: &HeaderName, value: HeaderValue) -> bool {
    !push_header_out_elt(r, name, value).is_null()
}

/// [`push_header_out`], returning the header's element (for [`hide_header_out`]); NULL when
/// it could not be added.
pub fn push_header_out_elt(
    r: &mut ngx::http::Request,
    name: &HeaderName,
    value: HeaderValue,
) -> *mut ngx_table_elt_t {
    let r: &mut ngx_http_request_t = r.as_mut();
    push_header(&mut r.headers_out.headers, r.pool, name, value)
}

/// Adds a request header (for the upstream): no copy of the name, the value copied or kept.
pub fn push_header_in(r: &mut ngx_http_request_t, name: &HeaderName, value: HeaderValue) -> bool {
    !push_header_in_elt(r, name, value).is_null()
}

/// [`push_header_in`], returning the header's element; NULL when it could not be added.
pub fn push_header_in_elt(
    r: &mut ngx_http_request_t,
    name: &HeaderName,
    value: HeaderValue,
) -> *mut ngx_table_elt_t {
    push_header(&mut r.headers_in.headers, r.pool, name, value)
}

/// Writes `value` (at most its `max_len` bytes) into the request pool: a header value
/// written without a heap allocation or `core::fmt`. `None` if the pool is exhausted.
pub fn pool_text(r: &ngx::http::Request, value: &impl WriteText) -> Option<PoolText> {
    let max = value.max_len().max(1);
    // SAFETY: `ngx_pnalloc` returns `max` writable bytes from the live request pool (or
    // NULL); they stay valid, and are not reused, until the request is freed. The slice is
    // used only inside this function.
    let (p, buf) = unsafe {
        let p = ngx::ffi::ngx_pnalloc(r.as_ref().pool, max) as *mut u8;
        if p.is_null() {
            return None;
        }
        (p, std::slice::from_raw_parts_mut(p, max))
    };
    let mut out = TextBuf::new(buf);
    value.write_text(&mut out);
    Some(PoolText(ngx_str_t {
        len: out.len(),
        data: p,
    }))
}
