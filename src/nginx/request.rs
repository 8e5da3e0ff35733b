//! Views of the request nginx passes to a handler, and the few request facts read raw.

use std::ptr;

use ngx::ffi::ngx_http_request_t;
use ngx::http::Request;

/// A shared view of a live request, for handlers that only read it (variable getters, which
/// nginx may call while another handler of this module is reading the same request).
///
/// # Safety
/// `r` must be a live request for `'a`, not mutated through another reference meanwhile.
pub unsafe fn shared<'a>(r: *const ngx_http_request_t) -> &'a Request {
    // SAFETY: `Request` is `repr(transparent)` over `ngx_http_request_t`; see the contract.
    unsafe { &*r.cast::<Request>() }
}

/// The request's main request (itself unless it is a subrequest).
pub fn main_of(r: &Request) -> &Request {
    // SAFETY: a live request's `main` is a live request (possibly itself) that outlives it;
    // only read here.
    unsafe { shared(r.as_ref().main) }
}

/// The client address as text (`$remote_addr`).
pub fn client_addr(r: &Request) -> &[u8] {
    // SAFETY: a live request has a live connection; `addr_text` is set when it is accepted.
    unsafe { (*r.connection()).addr_text.as_bytes() }
}

/// Microseconds of nginx's cached monotonic clock (the same in every worker).
pub fn now_us() -> u64 {
    // SAFETY: `ngx_current_msec` is a word-sized global that nginx updates on this thread
    // (the worker's event loop); reading it is a plain load.
    let ms = unsafe { ptr::read_volatile(ptr::addr_of!(ngx::ffi::ngx_current_msec)) };
    (ms as u64).saturating_mul(1000)
}

/// The request's time so far, in milliseconds, as nginx's `$request_time` measures it: from
/// nginx's cached wall clock (no system call per request).
pub fn request_time_ms(r: &ngx_http_request_t) -> u64 {
    // SAFETY: `ngx_cached_time` points at one of nginx's cached-time slots, which live as
    // long as the process and which nginx updates on this thread (the worker's event loop)
    // only; `ngx_timeofday()` in C is this load.
    let now = unsafe {
        let tp = ptr::read_volatile(ptr::addr_of!(ngx::ffi::ngx_cached_time));
        (*tp).sec.max(0) as u64 * 1000 + (*tp).msec as u64
    };
    let start = (r.start_sec.max(0) as u64)
        .saturating_mul(1000)
        .saturating_add(r.start_msec as u64);
    now.saturating_sub(start)
}

/// The request method as the client sent it (`r->method_name`; an RFC 9110 token, which
/// nginx's parser already checked), or empty if it is not text.
pub fn method_name(r: &Request) -> &str {
    // A live request's `method_name` points into its header buffer (or a static string),
    // valid while the request is.
    let bytes = r.as_ref().method_name.as_bytes();
    std::str::from_utf8(bytes).unwrap_or("")
}
