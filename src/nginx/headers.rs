//! Request and response header lists: read, add, and remove in place.

use std::ptr;

use ngx::ffi::{
    add_to_ngx_table, ngx_http_request_t, ngx_list_part_t, ngx_list_push, ngx_list_t, ngx_palloc,
    ngx_table_elt_t,
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

/// Adds a response header (copied into the request pool).
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
