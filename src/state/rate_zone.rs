//! `mesh_rate_limit_zone`: per-key rate-limit state in nginx shared memory, seen by every
//! worker.
//!
//! The zone holds one fixed array of `ratetable::Slot`s (plain data, valid when zeroed),
//! allocated from the zone's slab pool when the zone is first created and found again on
//! `nginx -s reload` when the zone keeps its name and size (nginx then hands us the same
//! memory). All access goes through the zone's own shared mutex; the logic on the slots is
//! the pure `mesh_core::ratetable`.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use mesh_core::gcra::{Gcra, Outcome};
use mesh_core::ratesync::MAX_DEBT_US;
use mesh_core::ratetable::{self, Slot, Stats};
use ngx::core::{SlabPool, Status};
use ngx::ffi::{
    ngx_int_t, ngx_shm_zone_t, ngx_slab_alloc, ngx_slab_pool_t, NGX_LOG_EMERG, NGX_LOG_INFO,
};

/// What `shm_zone->data` points at: this cycle's view of the zone (in the configuration pool).
pub struct RateZone {
    pub name: String,
    /// The shared zone's size, as configured.
    pub size: usize,
    /// `redis=`: a global zone, and its sync state (`rate_sync`).
    pub sync: Option<super::rate_sync::SyncConf>,
    /// The most a key may be owed (`ratesync::owed_bound` of every limit charging the zone,
    /// widened while the configuration is merged): a sync reply never raises a key further.
    owed_bound_us: AtomicU64,
    state: ZoneState,
}

/// Where a zone is in its life: `mesh_rate_limit_zone` configures it; nginx maps the shared
/// memory and calls `zone_init`, which makes it ready. Requests only ever see `Ready` (nginx
/// does not start workers when a zone fails to initialise), but a `Configured` zone is still
/// answered safely: as "not limited".
enum ZoneState {
    Configured,
    Ready {
        /// The zone's slab pool: its mutex guards the table (and a global zone's sync state).
        pool: SlabPool,
        table: *mut Table,
        /// The zone's secret ([`Placement`]), read once by `zone_init`.
        secret: [u64; 2],
    },
}

/// Kept right after the slots: the zone's random secret, under which keys are placed in the
/// table (`ratetable::placed`). It lives in the zone, so it survives reloads with the zone's
/// state; a zone made anew (or resized) gets a new one. One slot's size.
#[repr(C)]
struct Placement {
    magic: u64,
    secret: [u64; 2],
    _spare: u64,
}

const PLACEMENT_MAGIC: u64 = 0x6d65_7368_706c_6301;

const _: () = assert!(size_of::<Placement>() == size_of::<Slot>());

/// A random secret from the OS; `None` if it has none to give.
fn new_secret() -> Option<[u64; 2]> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).ok()?;
    let (lo, hi) = b.split_at(8);
    Some([
        u64::from_le_bytes(lo.try_into().ok()?),
        u64::from_le_bytes(hi.try_into().ok()?),
    ])
}

/// The secret of a kept table (`kept_until`: the end of the zone's memory), or a new one
/// written in place of its last slot: a new table, or one made before secrets (its keys were
/// placed without one, so they are orphaned and age out). `None` if no secret can be had.
///
/// # Safety
/// `table` is the zone's table header with `nslots` slots after it, inside the zone, guarded
/// by `pool`'s mutex; nginx's master calls this from `zone_init`, before any worker of this
/// cycle exists (old workers may still run: the mutex is held while changing the table).
unsafe fn table_secret(
    pool: &SlabPool,
    table: *mut Table,
    kept_until: Option<*const u8>,
) -> Option<[u64; 2]> {
    // SAFETY: see the contract. A kept table's record is read only where it lies inside the
    // zone's memory (a table made with a secret has it right after its slots).
    unsafe {
        let _locked = pool.lock();
        let slots = (table as *mut u8).add(size_of::<Table>()) as *mut Slot;
        let rec = slots.add((*table).nslots as usize) as *mut Placement;
        if let Some(end) = kept_until {
            let inside = (rec as *const u8).wrapping_add(size_of::<Placement>()) <= end;
            if inside && (*rec).magic == PLACEMENT_MAGIC {
                return Some((*rec).secret);
            }
        }
        if ((*table).nslots as usize) <= ratetable::WAYS {
            return None;
        }
        let secret = new_secret()?;
        (*table).nslots -= 1;
        let rec = slots.add((*table).nslots as usize) as *mut Placement;
        ptr::write(
            rec,
            Placement {
                magic: PLACEMENT_MAGIC,
                secret,
                _spare: 0,
            },
        );
        Some(secret)
    }
}

/// nginx starts no worker with a zone whose keys could be placed by anyone.
///
/// # Safety
/// `shm_zone` is the zone nginx is initialising.
unsafe fn no_secret(shm_zone: *mut ngx_shm_zone_t, zone: &RateZone) -> ngx_int_t {
    // SAFETY: see the contract.
    let log = unsafe { (*shm_zone).shm.log };
    ngx::ngx_log_error!(
        NGX_LOG_EMERG,
        log,
        "mesh_rate_limit_zone \"{}\": no random secret from the OS",
        zone.name
    );
    Status::NGX_ERROR.into()
}

/// The start of the allocation in shared memory: how many slots follow.
#[repr(C)]
struct Table {
    /// Slots that follow. With `keys`, the 8 bytes that were one `usize` before keys were
    /// counted: the header keeps its size, so a zone kept across a reload into a newer module
    /// is still read right (on a little-endian machine; elsewhere as an empty table).
    nslots: u32,
    /// Slots in use (`mesh_rate_limit_keys`).
    keys: u32,
    /// Live keys evicted to make room (`mesh_rate_limit_evictions_total`). Both are counted
    /// under the lock we hold anyway.
    evictions: u64,
    /// Requests seen by the zone: orders slot use for eviction.
    seq: u64,
    // `nslots` slots follow.
}

impl RateZone {
    pub fn new(name: String, size: usize, sync: Option<super::rate_sync::SyncConf>) -> RateZone {
        RateZone {
            name,
            size,
            sync,
            owed_bound_us: AtomicU64::new(0),
            state: ZoneState::Configured,
        }
    }

    /// Widens the zone's [`RateZone::owed_bound_us`] to `bound_us` (configuration time).
    pub fn widen_owed_bound(&self, bound_us: u64) {
        self.owed_bound_us.fetch_max(bound_us, Ordering::Relaxed);
    }

    /// The most a sync reply may say a key of this zone owes, in µs.
    pub fn owed_bound_us(&self) -> u64 {
        self.owed_bound_us.load(Ordering::Relaxed)
    }

    /// Where the table keeps the key of `identity` (see `ratetable::placed`).
    pub fn placed(&self, identity: [u64; 2]) -> Option<[u64; 2]> {
        let ZoneState::Ready { secret, .. } = &self.state else {
            return None;
        };
        Some(ratetable::placed(*secret, identity))
    }

    /// The slab pool (whose mutex guards the zone) and the slot array; `None` if not ready.
    pub fn parts(&self) -> Option<(SlabPool, super::rate_sync::RateSlots)> {
        let ZoneState::Ready { pool, table, .. } = &self.state else {
            return None;
        };
        let (pool, table) = (pool.clone(), *table);
        // SAFETY: `table` points at the header in the shared zone (see `check`); `nslots` is
        // written once by `zone_init`, before any worker exists, so reading it unlocked is
        // sound. Only the pointer is formed here: slots are touched under the mutex.
        unsafe {
            let slots = (table as *mut u8).add(size_of::<Table>()) as *mut Slot;
            Some((
                pool,
                super::rate_sync::RateSlots(slots, (*table).nslots as usize),
            ))
        }
    }

    /// Applies one request to `key`'s state. `None` if the zone is not ready (cannot happen
    /// after a successful start; treated as "not limited" by the caller).
    pub fn check(&self, key: [u64; 2], gcra: &Gcra, now: u64, dry_run: bool) -> Option<Outcome> {
        let ZoneState::Ready {
            pool,
            table,
            secret,
        } = &self.state
        else {
            return None;
        };
        let table = *table;
        // The key's identity (what Redis knows it by) and where the table keeps it.
        let (identity, key) = (key, ratetable::placed(*secret, key));
        // SAFETY: `table` points at a `Table` header followed by `nslots` zero-initialised
        // slots inside the shared zone, which lives as long as the cycle. Every worker takes
        // the zone's shared mutex around any access, so this is the only live reference. The
        // guard unlocks when it goes out of scope, a panic's unwinding included.
        unsafe {
            let _locked = pool.lock();
            let t = &mut *table;
            let slots = std::slice::from_raw_parts_mut(
                (table as *mut u8).add(size_of::<Table>()) as *mut Slot,
                t.nslots as usize,
            );
            t.seq += 1;
            let mut stats = Stats {
                evictions: t.evictions,
                keys: u64::from(t.keys),
            };
            let outcome = match &self.sync {
                None => ratetable::check_counted(slots, key, gcra, now, t.seq, dry_run, &mut stats),
                // A global zone: a key may owe what other instances admitted; what this one
                // admits is charged to Redis at the next sync.
                Some(sync) => {
                    let (outcome, slot) = ratetable::check_at(
                        slots,
                        key,
                        gcra,
                        now,
                        t.seq,
                        dry_run,
                        &mut stats,
                        MAX_DEBT_US,
                    );
                    if let (true, Some(i)) = (outcome.allowed, slot) {
                        // Under the zone's mutex, which guards the sync state too.
                        sync.note(i, identity, gcra.interval_us);
                    }
                    outcome
                }
            };
            t.evictions = stats.evictions;
            t.keys = u32::try_from(stats.keys).unwrap_or(u32::MAX);
            Some(outcome)
        }
    }

    /// Keys in use and evictions so far (for `mesh_status`); `None` if not ready.
    pub fn stats(&self) -> Option<Stats> {
        let ZoneState::Ready { pool, table, .. } = &self.state else {
            return None;
        };
        let _locked = pool.lock();
        // SAFETY: as in `check`: the header is read under the zone's shared mutex.
        unsafe {
            Some(Stats {
                evictions: (**table).evictions,
                keys: u64::from((**table).keys),
            })
        }
    }
}

/// `shm_zone->init`: called in the master for every (re)started cycle.
///
/// # Safety
/// nginx calls this with the zone and, on reload of a reused zone, the previous cycle's
/// `RateZone` (which is still alive at that point).
pub unsafe extern "C" fn zone_init(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: see the function's contract; `shm.addr` starts with the zone's slab pool, which
    // nginx initialised before calling us.
    unsafe {
        let zone = &mut *((*shm_zone).data as *mut RateZone);
        let Some(pool) = SlabPool::from_shm_zone(&*shm_zone) else {
            return Status::NGX_ERROR.into();
        };
        let shpool = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
        if !data.is_null() || (*shm_zone).shm.exists != 0 {
            // Reload with the same size (or a new master on existing memory): the memory,
            // and the state in it, is kept; the table is where the slab pool's `data` says.
            let table = (*shpool).data as *mut Table;
            let end = ((*shm_zone).shm.addr as *const u8).wrapping_add((*shm_zone).shm.size);
            let Some(secret) = table_secret(&pool, table, Some(end)) else {
                return no_secret(shm_zone, zone);
            };
            zone.state = ZoneState::Ready {
                pool,
                table,
                secret,
            };
            return Status::NGX_OK.into();
        }
        // A new zone: take all the free pages for one table. The slab allocator logs a
        // failure at `crit`; we size the request to fit, and silence it while trying.
        let pagesize = ngx::ffi::ngx_pagesize;
        let mut bytes = (*shpool).pfree * pagesize;
        (*shpool).set_log_nomem(0);
        let mut table: *mut Table = ptr::null_mut();
        while bytes >= size_of::<Table>() + size_of::<Slot>() * ratetable::WAYS {
            table = ngx_slab_alloc(shpool, bytes) as *mut Table;
            if !table.is_null() {
                break;
            }
            bytes -= pagesize;
        }
        (*shpool).set_log_nomem(1);
        if table.is_null() {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                (*shm_zone).shm.log,
                "mesh_rate_limit_zone \"{}\" is too small",
                zone.name
            );
            return Status::NGX_ERROR.into();
        }
        // At most u32::MAX slots (a 128 GiB zone); the rest of a bigger zone stays unused.
        // One slot's room after them holds the secret (`table_secret` takes it).
        let nslots = ((bytes - size_of::<Table>()) / size_of::<Slot>()).min(u32::MAX as usize);
        // Zero the slots: an all-zero slot is an empty one.
        ptr::write_bytes(
            table as *mut u8,
            0,
            size_of::<Table>() + nslots * size_of::<Slot>(),
        );
        (*table).nslots = nslots as u32;
        (*shpool).data = table.cast();
        let Some(secret) = table_secret(&pool, table, None) else {
            return no_secret(shm_zone, zone);
        };
        zone.state = ZoneState::Ready {
            pool,
            table,
            secret,
        };
        ngx::ngx_log_error!(
            NGX_LOG_INFO,
            (*shm_zone).shm.log,
            "mesh_rate_limit_zone \"{}\": {} keys",
            zone.name,
            nslots - 1
        );
        Status::NGX_OK.into()
    }
}

/// `shm_zone->init` of a global zone's sync state (`rate_sync`), in the master for every
/// (re)started cycle.
///
/// # Safety
/// nginx calls this with the sync state's zone, whose `data` is the `RateZone` it belongs to
/// (already initialised: its zone was declared first).
pub unsafe extern "C" fn sync_zone_init(
    shm_zone: *mut ngx_shm_zone_t,
    _old: *mut c_void,
) -> ngx_int_t {
    // SAFETY: see the contract: `data` is the RateZone, in the configuration pool.
    unsafe {
        let zone = &mut *((*shm_zone).data as *mut RateZone);
        let Some((pool, _)) = zone.parts() else {
            return Status::NGX_ERROR.into();
        };
        let (size, name) = (zone.size, zone.name.clone());
        let Some(sync) = zone.sync.as_mut() else {
            return Status::NGX_ERROR.into();
        };
        sync.init(shm_zone, pool, size, &name)
    }
}

// The header's size is part of the zone's layout, which a reload may hand to a newer module.
const _: () = assert!(size_of::<Table>() == 24);
