//! What the refresher has to say, written by the worker: the thread queues lines, a timer on
//! the worker's event loop writes them with nginx's (not thread-safe) logger.

use std::ptr;
use std::sync::Mutex;

use ngx::ffi::{ngx_event_t, ngx_log_t, ngx_msec_t};

use crate::nginx::no_panic;
use crate::nginx::timer;

/// How often a worker writes what its refresher queued.
const INTERVAL_MS: ngx_msec_t = 500;

/// Lines for the worker to write: (level, text).
static QUEUE: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());

/// Queues a line (from the refresher thread).
pub fn queue(level: u32, text: String) {
    match QUEUE.lock() {
        Ok(mut l) => l.push((level, text)),
        Err(p) => p.into_inner().push((level, text)),
    }
}

fn take() -> Vec<(u32, String)> {
    match QUEUE.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    }
}

// SAFETY: an all-zero `ngx_event_t` is a valid idle event (nginx allocates its own zeroed).
static mut EVENT: ngx_event_t = unsafe { std::mem::zeroed() };

/// Starts the worker's timer that writes the queue to `log` (from `init_process`).
pub fn start_timer(log: *mut ngx_log_t) {
    // SAFETY: EVENT is a static used only by this worker's event loop, armed once per worker;
    // only its address is taken.
    unsafe { timer::arm(ptr::addr_of_mut!(EVENT), write, log, INTERVAL_MS) };
}

/// Timer handler (on the worker's event loop).
unsafe extern "C" fn write(ev: *mut ngx_event_t) {
    no_panic((), || {
        // SAFETY: `ev` is EVENT, armed in `start_timer` with the cycle's log.
        let log = unsafe { (*ev).log };
        for (level, line) in take() {
            ngx::ngx_log_error!(level, log, "{}", line);
        }
    });
    // SAFETY: re-arming EVENT from its own handler.
    unsafe { timer::rearm(ev, INTERVAL_MS) };
}
