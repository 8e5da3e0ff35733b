//! The rules of the shared key store: one [`Schedule`] per key source (a JWKS URL with its
//! trusted roots) or outbound token (metadata server and audience), kept in nginx shared
//! memory and seen by every process of one nginx instance.
//!
//! It says when a source is due, which single process fetches it (a claim, taken over once it
//! is stale, so a worker that died mid-fetch does not stop the refresh), and what the result
//! of a fetch does to the schedule. Plain data (`repr(C)`, valid when zeroed) so that the
//! nginx shell can keep it in shared memory; times are Unix milliseconds.

use crate::refresh::{next_backoff, MAX_BACKOFF, REFETCH_INTERVAL};

/// A claim older than this is taken over: its process died, or its fetch outlived the 10 s
/// fetch timeout.
pub const CLAIM_STALE_MS: u64 = 15_000;
/// The longest retry delay after a failed key fetch, and after a failed token fetch (seconds).
pub const KEYS_MAX_BACKOFF: u64 = MAX_BACKOFF;
pub const TOKEN_MAX_BACKOFF: u64 = 60;
/// A source no configuration has used for this long is dropped when a configuration loads.
pub const IDLE_DROP_MS: u64 = 3_600_000;

/// The schedule and counters of one source. All-zero: never fetched, due now, unclaimed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Schedule {
    /// Bumped each time a good result is stored: a process holding an older one adopts it.
    pub generation: u64,
    /// When the stored result was fetched (0: never).
    pub fetched_at: u64,
    /// When to fetch next.
    pub next_due: u64,
    /// The last retry delay in seconds (0: the last fetch succeeded).
    pub backoff: u64,
    /// The process fetching now (0: none), and since when.
    pub claim_pid: u64,
    pub claim_at: u64,
    /// When the last refetch for an unknown `kid` was started.
    pub last_refetch: u64,
    /// Results of refreshes, for metrics.
    pub ok_total: u64,
    pub failed_total: u64,
    /// When the last fetch finished, good or not (0: never).
    pub last_attempt: u64,
}

impl Schedule {
    /// Whether a good result is stored.
    pub fn has_result(&self) -> bool {
        self.generation > 0
    }

    /// Whether some process is fetching now (a claim younger than [`CLAIM_STALE_MS`]).
    pub fn claimed(&self, now: u64) -> bool {
        self.claim_pid != 0 && now < self.claim_at.saturating_add(CLAIM_STALE_MS)
    }

    /// Claims the source for `pid` if it is due and nobody fetches it: `true` means "fetch now".
    pub fn claim_due(&mut self, pid: u64, now: u64) -> bool {
        if now < self.next_due || self.claimed(now) {
            return false;
        }
        self.claim(pid, now);
        true
    }

    /// A token named a `kid` the keys do not hold: claims a refetch for `pid`, at most one
    /// every [`REFETCH_INTERVAL`] seconds for all processes, and never while a fetch runs.
    pub fn claim_refetch(&mut self, pid: u64, now: u64) -> bool {
        if self.claimed(now) || now < self.last_refetch.saturating_add(REFETCH_INTERVAL * 1000) {
            return false;
        }
        self.last_refetch = now;
        self.claim(pid, now);
        true
    }

    fn claim(&mut self, pid: u64, now: u64) {
        self.claim_pid = pid;
        self.claim_at = now;
    }

    /// Only the claim's owner releases it (a stale claim may have been taken over since).
    fn release(&mut self, pid: u64) {
        if self.claim_pid == pid {
            self.claim_pid = 0;
            self.claim_at = 0;
        }
    }

    /// `pid` stored a good result at `now`; the next fetch is `next_in_ms` later.
    pub fn succeeded(&mut self, pid: u64, now: u64, next_in_ms: u64) {
        self.generation += 1;
        self.fetched_at = now;
        self.next_due = now.saturating_add(next_in_ms);
        self.backoff = 0;
        self.ok_total += 1;
        self.last_attempt = now;
        self.release(pid);
    }

    /// `pid`'s fetch failed at `now` (any stored result is kept): the retry delay in seconds,
    /// doubling from 1 up to `max_backoff`.
    pub fn failed(&mut self, pid: u64, now: u64, max_backoff: u64) -> u64 {
        self.backoff = next_backoff(self.backoff).min(max_backoff);
        self.next_due = now.saturating_add(self.backoff * 1000);
        self.failed_total += 1;
        self.last_attempt = now;
        self.release(pid);
        self.backoff
    }

    /// The start-up fetch found nothing within its wait: counted as a failure, and due at
    /// once with no backoff, so that the workers go on as if nothing had been tried.
    pub fn start_failed(&mut self, now: u64) {
        self.failed_total += 1;
        self.last_attempt = now;
        self.backoff = 0;
        self.next_due = now;
    }

    /// Releases `pid`'s claim without a result (the process is leaving).
    pub fn abandon(&mut self, pid: u64) {
        self.release(pid);
    }
}

/// What the store needs to know of a slot to choose where a new source goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotUse {
    pub used: bool,
    /// When a process last used it (ms).
    pub used_at: u64,
    /// Whether the configuration being loaded uses it (never evicted for another).
    pub wanted: bool,
}

/// Where to store a new source: a free slot, else the least recently used slot that the
/// configuration being loaded does not use. `None`: every slot is wanted.
pub fn slot_for_new(slots: &[SlotUse]) -> Option<usize> {
    if let Some(i) = slots.iter().position(|s| !s.used) {
        return Some(i);
    }
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.wanted)
        .min_by_key(|(_, s)| s.used_at)
        .map(|(i, _)| i)
}

/// Whether a stored source is dropped when a configuration loads: no configuration uses it
/// (the one loading does not, and no running process touched it for [`IDLE_DROP_MS`]).
pub fn drop_at_load(slot: &SlotUse, now: u64) -> bool {
    slot.used && !slot.wanted && now >= slot.used_at.saturating_add(IDLE_DROP_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn a_new_source_is_due_and_one_process_claims_it() {
        let mut s = Schedule::default();
        assert!(!s.has_result());
        assert!(s.claim_due(101, T0));
        // every other process sees the claim
        assert!(!s.claim_due(102, T0 + 10));
        assert!(!s.claim_due(101, T0 + 10));
        assert!(s.claimed(T0 + 10));
    }

    #[test]
    fn a_good_result_schedules_the_next_fetch_and_bumps_the_generation() {
        let mut s = Schedule::default();
        assert!(s.claim_due(101, T0));
        s.succeeded(101, T0 + 50, 3_600_000);
        assert_eq!(s.generation, 1);
        assert!(s.has_result());
        assert!(!s.claimed(T0 + 60));
        assert_eq!(
            (s.fetched_at, s.next_due, s.ok_total),
            (T0 + 50, T0 + 3_600_050, 1)
        );
        assert!(!s.claim_due(102, T0 + 3_600_049));
        assert!(s.claim_due(102, T0 + 3_600_050));
        s.succeeded(102, T0 + 3_600_100, 60_000);
        assert_eq!((s.generation, s.ok_total), (2, 2));
    }

    #[test]
    fn failures_back_off_and_keep_the_stored_result() {
        let mut s = Schedule::default();
        assert!(s.claim_due(101, T0));
        s.succeeded(101, T0, 60_000);
        let mut delays = Vec::new();
        let mut now = T0 + 60_000;
        for _ in 0..4 {
            assert!(s.claim_due(101, now));
            let d = s.failed(101, now, KEYS_MAX_BACKOFF);
            delays.push(d);
            assert!(!s.claim_due(102, now + d * 1000 - 1));
            now += d * 1000;
        }
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!((s.generation, s.fetched_at, s.failed_total), (1, T0, 4));
        // a success resets the backoff
        assert!(s.claim_due(101, now));
        s.succeeded(101, now, 60_000);
        assert!(s.claim_due(101, now + 60_000));
        assert_eq!(s.failed(101, now + 60_000, KEYS_MAX_BACKOFF), 1);
    }

    #[test]
    fn token_backoff_stops_at_its_bound() {
        let mut s = Schedule::default();
        let mut last = 0;
        for i in 0..10 {
            let now = T0 + i * 100_000;
            assert!(s.claim_due(7, now));
            last = s.failed(7, now, TOKEN_MAX_BACKOFF);
        }
        assert_eq!(last, TOKEN_MAX_BACKOFF);
    }

    #[test]
    fn a_stale_claim_is_taken_over_and_the_late_result_does_not_release_the_new_one() {
        let mut s = Schedule::default();
        assert!(s.claim_due(101, T0));
        assert!(!s.claim_due(102, T0 + CLAIM_STALE_MS - 1));
        assert!(s.claim_due(102, T0 + CLAIM_STALE_MS));
        // the first process's fetch ends after all: its result counts, the claim stays 102's
        s.failed(101, T0 + CLAIM_STALE_MS + 5, KEYS_MAX_BACKOFF);
        assert_eq!(s.claim_pid, 102);
        assert!(s.claimed(T0 + CLAIM_STALE_MS + 6));
        s.succeeded(102, T0 + CLAIM_STALE_MS + 10, 60_000);
        assert!(!s.claimed(T0 + CLAIM_STALE_MS + 11));
        assert_eq!(s.generation, 1);
    }

    #[test]
    fn unknown_kid_refetches_are_single_flight_and_at_most_every_30_seconds() {
        let mut s = Schedule::default();
        assert!(s.claim_due(101, T0));
        s.succeeded(101, T0, 3_600_000);
        assert!(s.claim_refetch(102, T0 + 1_000));
        // in flight: nobody else refetches
        assert!(!s.claim_refetch(103, T0 + 1_100));
        s.succeeded(102, T0 + 1_200, 3_600_000);
        // done, but within 30 s of the last refetch
        assert!(!s.claim_refetch(103, T0 + 1_000 + 29_999));
        assert!(s.claim_refetch(103, T0 + 1_000 + 30_000));
        // and never while a scheduled fetch runs
        let mut t = Schedule::default();
        assert!(t.claim_due(101, T0));
        assert!(!t.claim_refetch(102, T0 + 1));
    }

    #[test]
    fn a_failed_start_leaves_the_source_due_with_no_backoff() {
        let mut s = Schedule::default();
        s.start_failed(T0);
        assert_eq!((s.failed_total, s.backoff, s.generation), (1, 0, 0));
        assert!(s.claim_due(2, T0));
        // the first worker failure then backs off 1 s, as for any first failure
        assert_eq!(s.failed(2, T0 + 5, KEYS_MAX_BACKOFF), 1);
    }

    #[test]
    fn an_abandoned_claim_is_free_at_once_but_only_its_owner_abandons_it() {
        let mut s = Schedule::default();
        assert!(s.claim_due(1, T0));
        s.abandon(2);
        assert!(s.claimed(T0 + 1));
        s.abandon(1);
        assert!(s.claim_due(2, T0 + 1));
    }

    #[test]
    fn new_sources_go_to_a_free_slot_else_evict_the_least_recently_used_unwanted_one() {
        let free = SlotUse::default();
        let used = |at, wanted| SlotUse {
            used: true,
            used_at: at,
            wanted,
        };
        assert_eq!(
            slot_for_new(&[used(5, false), free, used(1, false)]),
            Some(1)
        );
        assert_eq!(
            slot_for_new(&[used(5, false), used(1, true), used(3, false)]),
            Some(2)
        );
        assert_eq!(slot_for_new(&[used(5, true), used(1, true)]), None);
        assert_eq!(slot_for_new(&[]), None);
    }

    #[test]
    fn only_sources_no_configuration_used_for_an_hour_are_dropped() {
        let now = T0;
        let s = |at, wanted| SlotUse {
            used: true,
            used_at: at,
            wanted,
        };
        assert!(drop_at_load(&s(now - IDLE_DROP_MS, false), now));
        assert!(!drop_at_load(&s(now - IDLE_DROP_MS + 1, false), now));
        assert!(!drop_at_load(&s(0, true), now));
        assert!(!drop_at_load(&SlotUse::default(), now));
    }
}
