//! `mesh_outbound_token`: an ID token for an audience, replaced by the refresher before it
//! expires and read by the `$VAR` getter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::unix_now;

/// `mesh_outbound_token $VAR AUDIENCE [format=full];`: a Google ID token for AUDIENCE.
pub struct OutboundToken {
    pub audience: String,
    /// `format=full`: asked with the metadata server's `format=full` (the Compute claims).
    pub full: bool,
    token: RwLock<Option<(Arc<str>, u64)>>,
    last_warn: AtomicU64,
}

impl OutboundToken {
    pub fn new(audience: String, full: bool) -> OutboundToken {
        OutboundToken {
            audience,
            full,
            token: RwLock::new(None),
            last_warn: AtomicU64::new(0),
        }
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
