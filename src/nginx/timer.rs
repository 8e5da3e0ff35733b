//! A repeating timer on a worker's event loop, built on one static `ngx_event_t`.

use std::ptr;

use ngx::ffi::{ngx_add_timer, ngx_event_t, ngx_log_t, ngx_msec_t};

/// Whether this worker is shutting down (gracefully or not).
pub fn worker_exiting() -> bool {
    // SAFETY: nginx's process flags are plain globals, written and read on the worker's own
    // thread (the one calling this).
    unsafe { ngx::ffi::ngx_exiting != 0 || ngx::ffi::ngx_quit != 0 || ngx::ffi::ngx_terminate != 0 }
}

/// Arms `ev` to call `handler` after `ms`, with `log`. Cancelable: it must not keep a worker
/// alive during a graceful shutdown.
///
/// # Safety
/// `ev` must be a static (or otherwise live for the worker's life) event used only by this
/// worker's event loop, and not armed already.
pub unsafe fn arm(
    ev: *mut ngx_event_t,
    handler: unsafe extern "C" fn(*mut ngx_event_t),
    log: *mut ngx_log_t,
    ms: ngx_msec_t,
) {
    // SAFETY: by the contract, nothing else uses `ev`; writing its fields through the raw
    // pointer creates no reference that could alias.
    unsafe {
        (*ev).handler = Some(handler);
        (*ev).log = log;
        (*ev).data = ptr::null_mut();
        (*ev).set_cancelable(1);
        ngx_add_timer(ev, ms);
    }
}

/// Re-arms `ev` from its own handler unless the worker is exiting.
///
/// # Safety
/// As `arm`; called from `ev`'s handler.
pub unsafe fn rearm(ev: *mut ngx_event_t, ms: ngx_msec_t) {
    if !worker_exiting() {
        // SAFETY: see the function's contract.
        unsafe { ngx_add_timer(ev, ms) };
    }
}
