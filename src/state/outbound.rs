//! `mesh_outbound_token`: an ID token for an audience, replaced by the refresher before it
//! expires and read by the `$VAR` getter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::unix_now;

/// `mesh_outbound_token $VAR AUDIENCE [format=full];`: a Google ID token for AUDIENCE.
pub struct OutboundToken {
    /// The variable's name, without `$`.
    pub var: String,
    pub audience: String,
    /// `format=full`: asked with the metadata server's `format=full` (the Compute claims).
    pub full: bool,
    token: RwLock<Option<(Arc<str>, u64)>>,
    last_warn: AtomicU64,
    /// The shared store's schedule as this worker last saw it: when the token is next due
    /// for a fetch (ms; 0: not seen yet), and whether some process is fetching it now.
    next_due_ms: AtomicU64,
    in_flight: AtomicBool,
    /// When a request last made this worker look at the store for it (ms).
    last_nudge_ms: AtomicU64,
}

/// A request that finds its token due makes the worker look at the store at most this often.
const NUDGE_INTERVAL_MS: u64 = 50;

impl OutboundToken {
    pub fn new(var: String, audience: String, full: bool) -> OutboundToken {
        OutboundToken {
            var,
            audience,
            full,
            token: RwLock::new(None),
            last_warn: AtomicU64::new(0),
            next_due_ms: AtomicU64::new(0),
            in_flight: AtomicBool::new(false),
            last_nudge_ms: AtomicU64::new(0),
        }
    }

    /// Whether a request at `now` (ms) should make the worker look at the store now: the
    /// token is due for renewal (or this worker has not seen its schedule yet), and no request
    /// did so within the last `NUDGE_INTERVAL_MS`.
    pub fn should_nudge(&self, now: u64) -> bool {
        if now < self.next_due_ms.load(Ordering::Relaxed) {
            return false;
        }
        let last = self.last_nudge_ms.load(Ordering::Relaxed);
        now >= last.saturating_add(NUDGE_INTERVAL_MS)
            && self
                .last_nudge_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The store's schedule for this token, as this worker just saw it.
    pub(crate) fn set_schedule(&self, next_due_ms: u64, in_flight: bool) {
        self.next_due_ms.store(next_due_ms, Ordering::Relaxed);
        self.in_flight.store(in_flight, Ordering::Relaxed);
    }

    /// Whether a fresh token may come by `deadline` (ms): a fetch is under way, or one is due
    /// by then.
    pub fn may_arrive_by(&self, deadline: u64) -> bool {
        self.in_flight.load(Ordering::Relaxed)
            || self.next_due_ms.load(Ordering::Relaxed) <= deadline
    }

    /// Seconds until the next fetch is due (at least 1): the `Retry-After` of a 503.
    pub fn retry_after(&self, now: u64) -> u64 {
        let due = self.next_due_ms.load(Ordering::Relaxed);
        due.saturating_sub(now).div_ceil(1000).clamp(1, 60)
    }

    /// The current token, if one is held and not expired.
    pub fn current(&self) -> Option<Arc<str>> {
        let guard = match self.token.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match &*guard {
            Some((t, exp)) if *exp > unix_now() => Some(t.clone()),
            _ => None,
        }
    }

    /// When the current token expires (seconds since the epoch), if one is held.
    pub fn expires_at(&self) -> Option<u64> {
        let guard = match self.token.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.as_ref().map(|(_, exp)| *exp)
    }

    /// Whether to log that no token is available (at most once a minute per worker).
    pub fn should_warn(&self) -> bool {
        let now = unix_now();
        let last = self.last_warn.load(Ordering::Relaxed);
        now >= last + 60
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub(crate) fn set(&self, token: String, exp: u64) {
        let mut slot = match self.token.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *slot = Some((Arc::from(token), exp));
    }
}
