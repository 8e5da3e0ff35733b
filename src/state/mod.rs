//! What outlives a request: rate-limit zones in shared memory, live key sets, outbound
//! tokens, the shared key store that keeps the last two for all workers, and the refresher
//! thread that fetches them.
//!
//! - `metrics`: the counters behind `mesh_status`, in their own shared zone;
//! - `rate_zone`: `mesh_rate_limit_zone`, an explicit `Configured → Ready` state;
//! - `provider`: a provider whose keys may be replaced; trusted roots for key URLs;
//! - `outbound`: a `mesh_outbound_token` and its current token;
//! - `keystore/`: keys and tokens in shared memory (`mesh_keys`), fetched before start, one
//!   fetch per refresh for all workers;
//! - `refresher/`: the background thread, its HTTP client and the worker's timer.

pub mod keystore;
pub mod metrics;
pub mod outbound;
pub mod provider;
pub mod rate_sync;
pub mod rate_zone;
pub mod redis;
pub mod refresher;
pub mod span_export;
pub mod syncer;

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch, from the OS clock (usable off nginx's thread).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Microseconds since the epoch, from the OS clock (not nginx's cached one, which a worker
/// that was stopped has not updated yet).
pub(crate) fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
