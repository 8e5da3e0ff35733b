//! Global rate-limit zones (`mesh_rate_limit_zone ... redis=URL`): the zone still decides
//! every request from shared memory; its sync with Redis runs in the background (`syncer`:
//! each worker's timer and lease; `redis`: the thread that talks to Redis). This file: the
//! sync state in shared memory.
//!
//! Shared state: a second shared zone per global zone (`NAME:mesh_redis`, so a plain zone's
//! layout never changes, and a reload that adds or drops `redis=` gets a fresh one) holding a
//! [`SyncTable`] header, one `u32` per rate slot and the list of pending charges
//! (`mesh_core::ratesync`). Everything in it is read and written under the *rate zone's*
//! mutex, which the request already holds when it charges a key.

use std::ptr;

use mesh_core::ratesync::{self, Pending, MAX_PENDING};
use mesh_core::ratetable::{self, Slot};
use ngx::core::{SlabPool, Status};
use ngx::ffi::{ngx_int_t, ngx_shm_zone_t, ngx_slab_alloc_locked, ngx_slab_pool_t, NGX_LOG_EMERG};

use crate::nginx::request::now_us;

/// Marks a table written by this layout.
const MAGIC: u64 = 0x6d65_7368_7273_7901;

/// A global zone's configuration: where Redis is, how often to sync, the key prefix.
pub struct SyncConf {
    /// Where Redis is and the password (never shown), as `nginx -t` read them.
    pub client: redis::Client,
    /// `ca_file=`: the PEM roots trusted for `rediss://` (else the system's).
    pub ca_pem: Option<Vec<u8>>,
    /// `host:port/db`, with `rediss://` when TLS: what logs say.
    pub shown: String,
    pub interval_ms: u64,
    pub prefix: String,
    /// The name of the sync state's shared zone (nginx keeps a pointer to these bytes).
    pub shm_name: String,
    /// The sync state, once its zone is initialised.
    table: *mut SyncTable,
    /// The rate zone's pool (its mutex guards the sync state too), once initialised.
    pool: Option<SlabPool>,
}

/// The start of the sync state in shared memory; the index and the pending list follow.
#[repr(C)]
struct SyncTable {
    magic: u64,
    /// Entries of the index (one per possible rate slot) and of the pending list.
    nindex: u32,
    npending: u32,
    /// Pending entries in use.
    len: u32,
    /// 0: not tried yet; 1: the last sync reached Redis; 2: it did not.
    up: u32,
    /// The worker holding the lease (its pid) and until when (nginx's monotonic ms).
    owner: u64,
    lease_until_ms: u64,
    /// The last sync that reached Redis (monotonic ms; 0: never).
    last_ok_ms: u64,
    /// Charges that found the pending list full (limited locally only).
    dropped: u64,
    _spare: [u64; 4],
}

const INDEX_OFFSET: usize = size_of::<SyncTable>();

fn index_bytes(nindex: usize) -> usize {
    (nindex * size_of::<u32>()).next_multiple_of(8)
}

/// Bytes of the sync state for a rate zone of `zone_size` bytes: at most `zone_size / 32`
/// slots (a slot is 32 bytes).
fn table_bytes(nindex: usize) -> usize {
    INDEX_OFFSET + index_bytes(nindex) + MAX_PENDING * size_of::<Pending>()
}

/// The shared zone's size: the table plus the slab allocator's own pages and headers.
pub fn shm_size(zone_size: usize) -> usize {
    let t = table_bytes(zone_size / size_of::<Slot>() + 1);
    t + t / 32 + 16 * 4096
}

// SAFETY: after `zone_init` (in the master, before workers fork) a `SyncConf` is only read;
// what its pointers point at is shared memory accessed under the rate zone's mutex.
unsafe impl Sync for SyncConf {}
// SAFETY: as above.
unsafe impl Send for SyncConf {}

/// Views of the sync state, valid while the rate zone's mutex is held.
struct Locked<'a> {
    t: &'a mut SyncTable,
    index: &'a mut [u32],
    list: &'a mut [Pending],
}

/// The sync state's zone is named after its rate zone with this suffix.
pub const SHM_SUFFIX: &str = ":mesh_redis";

impl SyncConf {
    pub fn new(
        client: redis::Client,
        ca_pem: Option<Vec<u8>>,
        shown: String,
        interval_ms: u64,
        prefix: String,
        zone: &str,
    ) -> SyncConf {
        SyncConf {
            client,
            ca_pem,
            shown,
            interval_ms,
            prefix,
            shm_name: format!("{zone}{SHM_SUFFIX}"),
            table: ptr::null_mut(),
            pool: None,
        }
    }

    /// The state's views, or `None` before its zone is ready.
    ///
    /// # Safety
    /// The rate zone's mutex must be held for as long as the views are used.
    unsafe fn locked(&self) -> Option<Locked<'_>> {
        if self.table.is_null() {
            return None;
        }
        // SAFETY: `table` points at a table of `nindex` + `npending` entries laid out as
        // `table_bytes` says, in a shared zone that lives as long as the cycle; the caller
        // holds the mutex, so these are the only live references.
        unsafe {
            let t = &mut *self.table;
            let base = self.table as *mut u8;
            let index = std::slice::from_raw_parts_mut(
                base.add(INDEX_OFFSET) as *mut u32,
                t.nindex as usize,
            );
            let list = std::slice::from_raw_parts_mut(
                base.add(INDEX_OFFSET + index_bytes(t.nindex as usize)) as *mut Pending,
                t.npending as usize,
            );
            Some(Locked { t, index, list })
        }
    }

    /// Records one admitted request (the rate zone's mutex is held: called from its `check`).
    ///
    /// # Safety
    /// The rate zone's mutex is held.
    pub unsafe fn note(&self, slot: usize, key: [u64; 2], interval_us: u64) {
        // SAFETY: the caller holds the mutex.
        if let Some(l) = unsafe { self.locked() } {
            if !ratesync::note(l.index, l.list, &mut l.t.len, slot, key, interval_us) {
                l.t.dropped += 1;
            }
        }
    }

    /// Sync state for `mesh_status`: (up, ms since the last sync that reached Redis, charges
    /// dropped because the pending list was full).
    pub fn health(&self) -> Option<(bool, Option<u64>, u64)> {
        let r = {
            let _locked = self.pool.as_ref()?.lock();
            // SAFETY: the pool is the rate zone's; its mutex, held, guards the table.
            unsafe { self.locked() }.map(|l| (l.t.up, l.t.last_ok_ms, l.t.dropped))
        };
        let (up, last, dropped) = r?;
        let now = now_us() / 1000;
        Some((
            up == 1,
            (last != 0).then(|| now.saturating_sub(last)),
            dropped,
        ))
    }

    /// Runs `f` on the locked state and the rate slots.
    fn with<T>(
        &self,
        slots: &RateSlots,
        f: impl FnOnce(Locked<'_>, &mut [Slot]) -> T,
    ) -> Option<T> {
        let _locked = self.pool.as_ref()?.lock();
        // SAFETY: the mutex is held (until the guard drops, a panic in `f` included) around
        // every use of the views; `slots` describes the rate zone's slot array, guarded by the
        // same mutex.
        unsafe {
            self.locked().map(|l| {
                let s = std::slice::from_raw_parts_mut(slots.0, slots.1);
                f(l, s)
            })
        }
    }
}

/// The rate zone's slot array (pointer and length), as `RateZone::slots` gives it.
pub struct RateSlots(pub *mut Slot, pub usize);

impl SyncConf {
    /// `shm_zone->init` of the sync state's zone, in the master for every (re)started cycle,
    /// for the rate zone `name` of `size` bytes whose slab pool is `pool`.
    ///
    /// # Safety
    /// `shm_zone` is the sync state's zone, which nginx set up; `pool` is the rate zone's
    /// (already initialised: its zone was declared first).
    pub unsafe fn init(
        &mut self,
        shm_zone: *mut ngx_shm_zone_t,
        pool: SlabPool,
        size: usize,
        name: &str,
    ) -> ngx_int_t {
        // SAFETY: see the contract; `shm.addr` starts with the zone's slab pool, which nginx
        // initialised (or kept) before calling us. The master is alone at this point.
        unsafe {
            let Some(own) = SlabPool::from_shm_zone(&*shm_zone) else {
                return Status::NGX_ERROR.into();
            };
            let shpool = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
            let nindex = size / size_of::<Slot>() + 1;
            let locked = own.lock();
            let mut table = (*shpool).data as *mut SyncTable;
            let fits = !table.is_null()
                && (*table).magic == MAGIC
                && (*table).nindex as usize == nindex
                && (*table).npending as usize == MAX_PENDING;
            if !fits {
                table = ngx_slab_alloc_locked(shpool, table_bytes(nindex)) as *mut SyncTable;
                if table.is_null() {
                    drop(locked);
                    ngx::ngx_log_error!(
                        NGX_LOG_EMERG,
                        (*shm_zone).shm.log,
                        "mesh_rate_limit_zone \"{}\": no memory for the Redis sync state",
                        name
                    );
                    return Status::NGX_ERROR.into();
                }
                ptr::write_bytes(table as *mut u8, 0, table_bytes(nindex));
                (*table).magic = MAGIC;
                (*table).nindex = nindex as u32;
                (*table).npending = MAX_PENDING as u32;
                (*shpool).data = table.cast();
            }
            // A new cycle: its workers take the lease afresh.
            (*table).owner = 0;
            (*table).lease_until_ms = 0;
            drop(locked);
            self.table = table;
            self.pool = Some(pool);
            Status::NGX_OK.into()
        }
    }
}

impl SyncConf {
    /// Applies a sync that reached Redis: each key's debt (`owed`, as of `elapsed_us` ago,
    /// held to `bound_us`, the zone's `owed_bound_us`) raises the TAT of the slot where the
    /// table keeps it (`place`: the zone's `RateZone::placed`).
    pub fn synced(
        &self,
        slots: &RateSlots,
        owed: &[(Pending, u64)],
        now: u64,
        elapsed: u64,
        bound_us: u64,
        place: impl Fn([u64; 2]) -> Option<[u64; 2]>,
    ) {
        self.with(slots, |l, table| {
            for (p, owed) in owed {
                let tat = ratesync::synced_tat(now, *owed, elapsed, bound_us);
                if let Some(key) = place(p.key) {
                    ratetable::raise(table, key, p.slot as usize, tat);
                }
            }
            l.t.up = 1;
            l.t.last_ok_ms = (now / 1000).max(1);
        });
    }

    /// Notes a sync that did not reach Redis.
    pub fn failed(&self, slots: &RateSlots) {
        self.with(slots, |l, _| l.t.up = 2);
    }

    /// The pending charges, taken by worker `pid` if it holds the zone's lease or may take
    /// it (renewed until `now_ms + lease_ms`); `None` while another worker holds it.
    pub fn take_batch(
        &self,
        slots: &RateSlots,
        pid: u64,
        now_ms: u64,
        lease_ms: u64,
    ) -> Option<Vec<Pending>> {
        self.with(slots, |l, _| {
            let t = &mut *l.t;
            if t.owner != 0 && t.owner != pid && t.lease_until_ms > now_ms {
                return None;
            }
            t.owner = pid;
            t.lease_until_ms = now_ms + lease_ms;
            Some(ratesync::take(l.index, l.list, &mut t.len))
        })
        .flatten()
    }
}
