//! The worker's timer: every quarter of a second it publishes what its refresher fetched,
//! takes what other workers published and claims what is due (`keystore::tick`), and logs
//! the span exporter's change of state (`span_export::log_notice`), on the
//! worker's own event loop, where nginx's (not thread-safe) logger and shared memory may be
//! used.

use std::ptr;

use ngx::ffi::{ngx_event_t, ngx_log_t, ngx_msec_t};

use crate::nginx::no_panic;
use crate::nginx::timer;
use crate::state::keystore;

const INTERVAL_MS: ngx_msec_t = 250;

// SAFETY: an all-zero `ngx_event_t` is a valid idle event (nginx allocates its own zeroed).
static mut EVENT: ngx_event_t = unsafe { std::mem::zeroed() };

/// Starts the worker's timer, logging to `log` (from `init_process`).
pub fn start(log: *mut ngx_log_t) {
    // SAFETY: EVENT is a static used only by this worker's event loop, armed once per worker;
    // only its address is taken.
    unsafe { timer::arm(ptr::addr_of_mut!(EVENT), tick, log, INTERVAL_MS) };
}

/// Timer handler (on the worker's event loop).
unsafe extern "C" fn tick(ev: *mut ngx_event_t) {
    no_panic((), || {
        // SAFETY: `ev` is EVENT, armed in `start` with the cycle's log.
        let log = unsafe { (*ev).log };
        keystore::tick(log);
        crate::state::span_export::log_notice(log);
    });
    // SAFETY: re-arming EVENT from its own handler.
    unsafe { timer::rearm(ev, INTERVAL_MS) };
}
