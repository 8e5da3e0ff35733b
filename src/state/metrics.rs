//! The counters behind `mesh_status`: plain atomics in one shared memory zone, summed over
//! all workers because every worker adds to the same memory (as nginx's `stub_status`).
//!
//! The zone (`mesh_metrics`, created by the module with its own tag) has a fixed layout:
//! per-decision counters, the token cache's hits and misses, and a table of name slots, one
//! per provider and per rate-limit zone of the configuration. A slot is found by its kind and
//! name, so `nginx -s reload` keeps the counts of the names that still exist; slots are bound
//! to names at configuration time (in the master, under the zone's mutex), so a request only
//! ever does one relaxed atomic add, without a lock.
//!
//! Workers find this cycle's view through `ACTIVE`, set once in `init_process`.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use mesh_core::decision::Decision;
use mesh_core::metrics::{
    auth_index, code_class, duration_bucket, name_hash, CODE_CLASSES, DURATION_BUCKETS_MS,
};
use mesh_core::status::AuthStatus;
use ngx::core::{SlabPool, Status};
use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_shm_zone_t, ngx_slab_alloc_locked, ngx_slab_pool_t, ngx_str_t,
    NGX_LOG_EMERG,
};

use super::rate_zone::RateZone;

/// The zone's name (nginx refuses another module's zone of the same name).
pub const ZONE_NAME: &str = "mesh_metrics";
/// The zone's size: the table below plus the slab allocator's own pages.
const ZONE_SIZE: usize = 2 * 1024 * 1024;
/// Name slots: providers and rate-limit zones of this and earlier configurations.
const NSLOTS: usize = 256;
/// Bytes of a name kept to tell names apart (with the name's length and hash).
const NAME_LEN: usize = 96;
/// Counters per name slot.
const NCOUNTERS: usize = 24;
/// Marks a table written by this layout.
const MAGIC: u64 = 0x6d65_7368_6d65_7404;

/// `mesh_metrics_callers` at most.
pub const MAX_CALLERS: usize = 1000;
/// Caller slots: `""` (anonymous or refused), `other` (past the bound), then one per caller.
const CALLER_SLOTS: usize = MAX_CALLERS + 2;
const CALLER_NONE: usize = 0;
const CALLER_OTHER: usize = 1;
const NBUCKETS: usize = DURATION_BUCKETS_MS.len() + 1;

/// Slot kinds.
const KIND_EMPTY: u64 = 0;
const KIND_PROVIDER: u64 = 1;
const KIND_ZONE: u64 = 2;
const KIND_ROUTE: u64 = 3;

/// A provider slot's counters: `0..11` the verification outcomes (`AUTH_STATUSES` order),
/// then when its key file was read (11 and 12 are unused: fetches are the key store's record,
/// and the index stays where zones kept across a reload expect it).
const P_LAST_REFRESH: usize = 13;
/// A zone slot's counters.
const Z_RATE_LIMITED: usize = 0;
/// A route slot's counters: one per status class (`CODE_CLASSES`), then the duration
/// histogram's buckets (`+Inf` last), then its sum (milliseconds).
const R_BUCKETS: usize = CODE_CLASSES.len();
const R_SUM: usize = R_BUCKETS + NBUCKETS;
const _: () = assert!(R_SUM < NCOUNTERS);

#[repr(C)]
struct Shared {
    magic: u64,
    /// Bumped by every configuration that binds names (under the mutex).
    epoch: u64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    spans_exported: AtomicU64,
    spans_dropped: [AtomicU64; SPAN_DROPS.len()],
    slots: [NameSlot; NSLOTS],
    /// Caller slots bound so far (they are never unbound: a caller keeps its series).
    callers_bound: AtomicU64,
    callers: [CallerSlot; CALLER_SLOTS],
}

/// One caller's requests and their durations, per decision.
#[repr(C)]
struct CallerSlot {
    hash: u64,
    len: u64,
    name: [u8; NAME_LEN],
    requests: [[AtomicU64; CODE_CLASSES.len()]; Decision::ALL.len()],
    buckets: [[AtomicU64; NBUCKETS]; Decision::ALL.len()],
    sum_ms: [AtomicU64; Decision::ALL.len()],
}

impl CallerSlot {
    /// Whether this slot is `name`'s (`hash`: its [`name_hash`], computed once per search).
    fn is(&self, hash: u64, name: &str) -> bool {
        let n = name.as_bytes();
        let keep = n.len().min(NAME_LEN);
        self.hash == hash && self.len == n.len() as u64 && self.name[..keep] == n[..keep]
    }

    fn name(&self) -> String {
        let keep = (self.len as usize).min(NAME_LEN);
        String::from_utf8_lossy(&self.name[..keep]).into_owned()
    }
}

#[repr(C)]
struct NameSlot {
    kind: u64,
    hash: u64,
    len: u64,
    /// The last configuration that named this slot.
    epoch: u64,
    name: [u8; NAME_LEN],
    counters: [AtomicU64; NCOUNTERS],
}

impl NameSlot {
    fn is(&self, kind: u64, name: &str) -> bool {
        let n = name.as_bytes();
        let keep = n.len().min(NAME_LEN);
        self.kind == kind
            && self.hash == name_hash(name)
            && self.len == n.len() as u64
            && self.name[..keep] == n[..keep]
    }

    fn bind(&mut self, kind: u64, name: &str, epoch: u64) {
        let n = name.as_bytes();
        let keep = n.len().min(NAME_LEN);
        self.kind = kind;
        self.hash = name_hash(name);
        self.len = n.len() as u64;
        self.epoch = epoch;
        self.name = [0; NAME_LEN];
        self.name[..keep].copy_from_slice(&n[..keep]);
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// This cycle's view of the zone (in the main configuration): the table, and which slot
/// each configured name got.
pub struct Metrics {
    shared: *mut Shared,
    /// Providers by name, with their slot; the empty name collects outcomes no provider can
    /// be named for (a missing token where several providers are accepted).
    providers: Vec<(String, usize)>,
    zones: Vec<(String, usize)>,
    /// Locations with `mesh_outbound_auth`, by their `route` label.
    routes: Vec<(String, usize)>,
    /// Providers whose keys were read at configuration time: their last refresh is then.
    file_providers: Vec<String>,
    /// The rate zones' own state (keys in use, evictions), in the configuration pool.
    rate_zones: Vec<*const RateZone>,
    /// `mesh_metrics_callers`: callers with series of their own; 0: no caller label.
    pub callers: usize,
    /// The zone's pool, for binding a new caller to a slot under its mutex.
    pool: Option<SlabPool>,
}

// SAFETY: after `zone_init` (in the master, before workers fork) a `Metrics` is only read;
// the table it points at is shared memory changed only through atomics (the refresher thread
// adds to it as nginx's thread does) or under the zone's mutex at configuration time.
unsafe impl Sync for Metrics {}
// SAFETY: as above; the pointers stay valid for the cycle, whichever thread reads them.
unsafe impl Send for Metrics {}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            shared: ptr::null_mut(),
            providers: Vec::new(),
            zones: Vec::new(),
            routes: Vec::new(),
            file_providers: Vec::new(),
            rate_zones: Vec::new(),
            callers: DEFAULT_CALLERS,
            pool: None,
        }
    }
}

/// `mesh_metrics_callers` default.
pub const DEFAULT_CALLERS: usize = 100;

/// The worker's cycle's `Metrics`; null in the master and before `init_process`.
static ACTIVE: AtomicPtr<Metrics> = AtomicPtr::new(ptr::null_mut());

impl Metrics {
    /// The rate zones of this configuration (in its pool).
    pub fn rate_zones(&self) -> &[*const RateZone] {
        &self.rate_zones
    }
}

/// Makes `m` the view the worker counts into (`init_process`; the cycle outlives the worker).
pub fn activate(m: &Metrics) {
    ACTIVE.store(ptr::from_ref(m).cast_mut(), Ordering::Release);
}

fn active() -> Option<(&'static Metrics, &'static Shared)> {
    // SAFETY: `ACTIVE` is null or points at the `Metrics` of the worker's only cycle, which
    // lives until the worker exits; its `shared` is null or the zone's table.
    unsafe {
        let m = ACTIVE.load(Ordering::Acquire).as_ref()?;
        let s = m.shared.as_ref()?;
        Some((m, s))
    }
}

fn slot_of<'a>(s: &'a Shared, names: &[(String, usize)], name: &str) -> Option<&'a NameSlot> {
    names
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, i)| s.slots.get(*i))
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why spans of `mesh_trace_export` were lost (`mesh_trace_spans_dropped_total{reason}`).
#[derive(Clone, Copy)]
pub enum SpanDrop {
    /// The worker's queue was full (the receiver is slower than the traffic).
    QueueFull = 0,
    /// The receiver did not take the batch (unreachable, refused, timed out).
    ExportFailed = 1,
    /// Still queued when the leaving worker's flush time ran out.
    Shutdown = 2,
}

/// The `reason` label of each [`SpanDrop`], in its order.
pub const SPAN_DROPS: [&str; 3] = ["queue_full", "export_failed", "shutdown"];

/// Spans the receiver accepted (any thread).
pub fn count_spans_exported(n: u64) {
    if let Some((_, s)) = active() {
        s.spans_exported.fetch_add(n, Ordering::Relaxed);
    }
}

/// Spans lost, and why (any thread).
pub fn count_spans_dropped(why: SpanDrop, n: u64) {
    if let Some((_, s)) = active() {
        s.spans_dropped[why as usize].fetch_add(n, Ordering::Relaxed);
    }
}

thread_local! {
    /// This worker's caller → slot index (callers seen by this worker), so that only a
    /// caller's first request in a worker takes the zone's mutex.
    static CALLER_INDEX: std::cell::RefCell<mesh_core::fasthash::FastMap<Box<str>, usize>> =
        std::cell::RefCell::new(mesh_core::fasthash::FastMap::default());
    /// The last caller counted and its slot: consecutive requests of one caller (a service's
    /// traffic comes mostly from few callers) cost a string compare, not a hash of it.
    static LAST_CALLER: std::cell::RefCell<(String, usize)> =
        const { std::cell::RefCell::new((String::new(), CALLER_NONE)) };
}

/// The slot of `caller` (`None`: anonymous or refused): its own while fewer than
/// `mesh_metrics_callers` callers have one, else `other`.
fn caller_slot(m: &Metrics, s: &Shared, caller: Option<&str>) -> usize {
    let Some(caller) = caller.filter(|c| !c.is_empty()) else {
        return CALLER_NONE;
    };
    if m.callers == 0 {
        return CALLER_NONE;
    }
    if let Some(i) = LAST_CALLER.with(|l| {
        let l = l.borrow();
        (*l.0 == *caller).then_some(l.1)
    }) {
        return i;
    }
    let known = CALLER_INDEX.with(|c| c.borrow().get(caller).copied());
    let i = known.unwrap_or_else(|| {
        // SAFETY: `pool` is the zone's slab pool (set with `shared`); its mutex guards
        // binding.
        let i = unsafe { bind_caller(m, s, caller) };
        CALLER_INDEX.with(|c| {
            let mut c = c.borrow_mut();
            // Bounded like the table: a worker does not remember more callers than it counts.
            if c.len() < 4 * MAX_CALLERS {
                c.insert(caller.into(), i);
            }
        });
        i
    });
    LAST_CALLER.with(|l| {
        let mut l = l.borrow_mut();
        // The buffer is kept: no allocation once it has held the longest caller.
        l.0.clear();
        l.0.push_str(caller);
        l.1 = i;
    });
    i
}

/// Finds `caller`'s slot, or binds one under the zone's mutex.
///
/// # Safety
/// `m.pool` is the live slab pool of the zone whose table is `s`.
unsafe fn bind_caller(m: &Metrics, s: &Shared, caller: &str) -> usize {
    let Some(pool) = m.pool.as_ref() else {
        return CALLER_OTHER;
    };
    let hash = name_hash(caller);
    let first = CALLER_OTHER + 1;
    // The slots bound so far (`Acquire`: their names were written before the count was
    // raised), `Some(slot)` if one is the caller's; `None`: not bound, and how many are.
    let find = |bound: usize| {
        (first..first + bound)
            .find(|&i| s.callers[i].is(hash, caller))
            .map(|i| {
                if i - first < m.callers {
                    i
                } else {
                    CALLER_OTHER
                }
            })
    };
    // Without the mutex first: a caller past the label bound (a service called by many end
    // users) is `other` after a scan of hashes, with no lock taken.
    let bound = (s.callers_bound.load(Ordering::Acquire) as usize).min(MAX_CALLERS);
    if let Some(i) = find(bound) {
        return i;
    }
    if bound >= m.callers {
        return CALLER_OTHER;
    }
    let _lock = pool.lock();
    let bound = (s.callers_bound.load(Ordering::Relaxed) as usize).min(MAX_CALLERS);
    if let Some(i) = find(bound) {
        return i;
    }
    if bound >= m.callers {
        return CALLER_OTHER;
    }
    let i = first + bound;
    let n = caller.as_bytes();
    let keep = n.len().min(NAME_LEN);
    // SAFETY: `m.shared` is the table `s` views; slot `i` is past every bound one, so no
    // other process reads its name yet; the bound count is raised (under the mutex) only
    // after the name is written.
    let slot = unsafe { &mut (*m.shared).callers[i] };
    slot.hash = hash;
    slot.len = n.len() as u64;
    slot.name = [0; NAME_LEN];
    slot.name[..keep].copy_from_slice(&n[..keep]);
    s.callers_bound.store(bound as u64 + 1, Ordering::Release);
    i
}

/// A finished request (log phase): its caller (`None`: anonymous or refused), decision,
/// status and duration.
pub fn count_request(caller: Option<&str>, d: Decision, status: u16, duration_ms: u64) {
    let Some((m, s)) = active() else { return };
    let di = d.index();
    let slot = &s.callers[caller_slot(m, s, caller)];
    add(&slot.requests[di][code_class(status)]);
    add(&slot.buckets[di][duration_bucket(duration_ms)]);
    slot.sum_ms[di].fetch_add(duration_ms, Ordering::Relaxed);
}

/// A request's verification outcome, under `provider` (empty when none can be named).
pub fn count_auth(provider: &str, status: AuthStatus) {
    let Some(i) = auth_index(status) else { return };
    if let Some((m, s)) = active() {
        let slot = slot_of(s, &m.providers, provider).or_else(|| slot_of(s, &m.providers, ""));
        if let Some(slot) = slot {
            add(&slot.counters[i]);
        }
    }
}

/// A verified-token cache lookup.
pub fn count_token_cache(hit: bool) {
    if let Some((_, s)) = active() {
        add(if hit { &s.cache_hits } else { &s.cache_misses });
    }
}

/// A request refused by a rate-limit zone.
/// A request through a location with `mesh_outbound_auth`: its status and how long it took.
pub fn count_upstream(route: &str, status: u16, duration_ms: u64) {
    let Some((m, s)) = active() else { return };
    let Some(slot) = slot_of(s, &m.routes, route) else {
        return;
    };
    add(&slot.counters[code_class(status)]);
    add(&slot.counters[R_BUCKETS + duration_bucket(duration_ms)]);
    slot.counters[R_SUM].fetch_add(duration_ms, Ordering::Relaxed);
}

pub fn count_rate_limited(zone: &str) {
    if let Some((m, s)) = active() {
        if let Some(slot) = slot_of(s, &m.zones, zone) {
            add(&slot.counters[Z_RATE_LIMITED]);
        }
    }
}

/// What a scrape reads: a snapshot of every counter of this configuration's names.
pub struct Snapshot {
    /// Requests by caller (`None`: the label is off, `mesh_metrics_callers 0`), in slot
    /// order: anonymous or refused (`""`), `other`, then each caller.
    pub callers: Vec<CallerCounts>,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub spans_exported: u64,
    pub spans_dropped: [u64; SPAN_DROPS.len()],
    pub providers: Vec<ProviderCounts>,
    pub zones: Vec<ZoneCounts>,
    pub routes: Vec<RouteCounts>,
}

/// One route's outbound calls: by status class, and their duration histogram.
pub struct RouteCounts {
    pub route: String,
    pub by_class: [u64; CODE_CLASSES.len()],
    pub buckets: [u64; NBUCKETS],
    pub sum_ms: u64,
}

#[derive(Default)]
pub struct CallerCounts {
    pub name: Option<String>,
    pub requests: [[u64; CODE_CLASSES.len()]; Decision::ALL.len()],
    pub buckets: [[u64; NBUCKETS]; Decision::ALL.len()],
    pub sum_ms: [u64; Decision::ALL.len()],
}

impl CallerCounts {
    fn add(&mut self, slot: &CallerSlot) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for d in 0..Decision::ALL.len() {
            for (a, c) in self.requests[d].iter_mut().zip(&slot.requests[d]) {
                *a += load(c);
            }
            for (a, c) in self.buckets[d].iter_mut().zip(&slot.buckets[d]) {
                *a += load(c);
            }
            self.sum_ms[d] += load(&slot.sum_ms[d]);
        }
    }
}

/// The callers' counts as `mesh_status` shows them: with `mesh_metrics_callers 0` one set
/// without a caller; else `""`, `other` (callers past the bound, also those bound before a
/// reload lowered it), then each caller in the order they first came.
fn caller_counts(m: &Metrics, s: &Shared) -> Vec<CallerCounts> {
    let bound = (s.callers_bound.load(Ordering::Acquire) as usize).min(MAX_CALLERS);
    let used = &s.callers[..CALLER_OTHER + 1 + bound];
    if m.callers == 0 {
        let mut all = CallerCounts::default();
        used.iter().for_each(|slot| all.add(slot));
        return vec![all];
    }
    let mut out: Vec<CallerCounts> = ["", "other"]
        .iter()
        .map(|n| CallerCounts {
            name: Some(n.to_string()),
            ..Default::default()
        })
        .collect();
    out[0].add(&used[CALLER_NONE]);
    out[1].add(&used[CALLER_OTHER]);
    for (i, slot) in used[CALLER_OTHER + 1..].iter().enumerate() {
        if i < m.callers {
            let mut c = CallerCounts {
                name: Some(slot.name()),
                ..Default::default()
            };
            c.add(slot);
            out.push(c);
        } else {
            out[1].add(slot);
        }
    }
    out
}

pub struct ProviderCounts {
    pub name: String,
    pub auth: [u64; mesh_core::metrics::AUTH_STATUSES.len()],
    /// Seconds since the epoch; 0: never.
    pub last_refresh: u64,
}

pub struct ZoneCounts {
    pub name: String,
    pub rate_limited: u64,
    /// Slots in use and live keys evicted, from the rate zone itself.
    pub keys: u64,
    pub evictions: u64,
    /// A global zone's sync: (the last sync reached Redis, ms since one last did, charges
    /// dropped for a full pending list).
    pub sync: Option<(bool, Option<u64>, u64)>,
}

/// Every counter, read with relaxed loads (each value is exact; the set is not one instant,
/// as with `stub_status`). `None` before the zone is ready.
pub fn snapshot() -> Option<Snapshot> {
    let (m, s) = active()?;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let providers = m
        .providers
        .iter()
        .filter_map(|(name, i)| {
            let slot = s.slots.get(*i)?;
            let mut auth = [0; mesh_core::metrics::AUTH_STATUSES.len()];
            for (a, c) in auth.iter_mut().zip(&slot.counters) {
                *a = load(c);
            }
            Some(ProviderCounts {
                name: name.clone(),
                auth,
                last_refresh: load(&slot.counters[P_LAST_REFRESH]),
            })
        })
        .collect();
    let zones = m
        .zones
        .iter()
        .zip(&m.rate_zones)
        .filter_map(|((name, i), rz)| {
            let slot = s.slots.get(*i)?;
            // SAFETY: the rate zones live in the configuration pool of this cycle.
            let rz = unsafe { rz.as_ref() };
            let stats = rz.and_then(RateZone::stats).unwrap_or_default();
            let sync = rz.and_then(|z| z.sync.as_ref()).and_then(|s| s.health());
            Some(ZoneCounts {
                name: name.clone(),
                rate_limited: load(&slot.counters[Z_RATE_LIMITED]),
                keys: stats.keys,
                evictions: stats.evictions,
                sync,
            })
        })
        .collect();
    let routes = m
        .routes
        .iter()
        .filter_map(|(route, i)| {
            let slot = s.slots.get(*i)?;
            Some(RouteCounts {
                route: route.clone(),
                by_class: std::array::from_fn(|c| load(&slot.counters[c])),
                buckets: std::array::from_fn(|b| load(&slot.counters[R_BUCKETS + b])),
                sum_ms: load(&slot.counters[R_SUM]),
            })
        })
        .collect();
    Some(Snapshot {
        callers: caller_counts(m, s),
        cache_hits: load(&s.cache_hits),
        cache_misses: load(&s.cache_misses),
        spans_exported: load(&s.spans_exported),
        spans_dropped: s.spans_dropped.each_ref().map(load),
        providers,
        zones,
        routes,
    })
}

/// At the end of the http block (`postconfiguration`): asks nginx for the zone, with the
/// names this configuration counts under: `providers` as (name, keys read from a file now).
///
/// # Safety
/// `cf` is nginx's configuration context; `m` lives in the main configuration (the
/// configuration pool), at a fixed address for the cycle.
pub unsafe fn configure(
    cf: *mut ngx_conf_t,
    m: &mut Metrics,
    providers: &[(String, bool)],
    zones: &[String],
    routes: &[String],
) -> Result<(), String> {
    m.routes = routes.iter().map(|n| (n.clone(), usize::MAX)).collect();
    m.providers = std::iter::once(String::new())
        .chain(providers.iter().map(|(n, _)| n.clone()))
        .map(|n| (n, usize::MAX))
        .collect();
    m.file_providers = providers
        .iter()
        .filter(|(_, file)| *file)
        .map(|(n, _)| n.clone())
        .collect();
    m.zones = zones.iter().map(|n| (n.clone(), usize::MAX)).collect();
    m.rate_zones = Vec::with_capacity(zones.len());
    for name in zones {
        // Size 0: the zone `mesh_rate_limit_zone` already declared, found by name.
        let name = ngx_str_t {
            len: name.len(),
            data: name.as_ptr().cast_mut(),
        };
        let zone =
            crate::nginx::conf::shared_zone(cf, name, 0, crate::nginx::conf::ZoneKind::Rate)?;
        // SAFETY: `data` of a mesh zone is its `RateZone` (set when it was declared).
        m.rate_zones
            .push(unsafe { (*zone.as_ptr()).data as *const RateZone });
    }
    let name = ngx_str_t {
        len: ZONE_NAME.len(),
        data: ZONE_NAME.as_ptr().cast_mut(),
    };
    let zone = crate::nginx::conf::shared_zone(
        cf,
        name,
        ZONE_SIZE,
        crate::nginx::conf::ZoneKind::Metrics,
    )?
    .as_ptr();
    // SAFETY: nginx's entry for our zone; `data` is set to this cycle's `Metrics`.
    unsafe {
        (*zone).data = ptr::from_mut(m).cast();
        (*zone).init = Some(zone_init);
    }
    Ok(())
}

/// `shm_zone->init`, in the master for every (re)started cycle: finds (or makes) the table
/// and binds this configuration's names to slots.
///
/// # Safety
/// nginx calls this with our zone, whose `data` is this cycle's `Metrics`.
unsafe extern "C" fn zone_init(shm_zone: *mut ngx_shm_zone_t, _old: *mut c_void) -> ngx_int_t {
    // SAFETY: see the contract; `shm.addr` starts with the zone's slab pool, which nginx
    // initialised (or kept from the previous cycle) before calling us. The table is only
    // written under the pool's mutex, apart from the atomic counters.
    unsafe {
        let m = &mut *((*shm_zone).data as *mut Metrics);
        let Some(pool) = SlabPool::from_shm_zone(&*shm_zone) else {
            return Status::NGX_ERROR.into();
        };
        let shpool = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
        let locked = pool.lock();
        let mut table = (*shpool).data as *mut Shared;
        if table.is_null() || (*table).magic != MAGIC {
            table = ngx_slab_alloc_locked(shpool, size_of::<Shared>()) as *mut Shared;
            if table.is_null() {
                drop(locked);
                ngx::ngx_log_error!(
                    NGX_LOG_EMERG,
                    (*shm_zone).shm.log,
                    "mesh: the metrics zone is too small"
                );
                return Status::NGX_ERROR.into();
            }
            ptr::write_bytes(table as *mut u8, 0, size_of::<Shared>());
            (*table).magic = MAGIC;
            (*shpool).data = table.cast();
        }
        let t = &mut *table;
        t.epoch += 1;
        let epoch = t.epoch;
        let now = super::unix_now();
        for (kind, names) in [
            (KIND_PROVIDER, &mut m.providers),
            (KIND_ZONE, &mut m.zones),
            (KIND_ROUTE, &mut m.routes),
        ] {
            for (name, index) in names.iter_mut() {
                *index = bind(t, kind, name, epoch);
            }
        }
        for name in &m.file_providers {
            if let Some(slot) = slot_of(t, &m.providers, name) {
                slot.counters[P_LAST_REFRESH].store(now, Ordering::Relaxed);
            }
        }
        drop(locked);
        m.shared = table;
        m.pool = Some(pool);
        Status::NGX_OK.into()
    }
}

/// The slot of `(kind, name)`: its own if an earlier configuration had it, else an empty one,
/// else the one unused the longest (its counts start again). `usize::MAX`: none (more names
/// than slots; such a name is not counted).
fn bind(t: &mut Shared, kind: u64, name: &str, epoch: u64) -> usize {
    if let Some(i) = t.slots.iter().position(|s| s.is(kind, name)) {
        t.slots[i].epoch = epoch;
        return i;
    }
    let free = t
        .slots
        .iter()
        .position(|s| s.kind == KIND_EMPTY)
        .or_else(|| {
            t.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.epoch < epoch)
                .min_by_key(|(_, s)| s.epoch)
                .map(|(i, _)| i)
        });
    match free {
        Some(i) => {
            t.slots[i].bind(kind, name, epoch);
            i
        }
        None => usize::MAX,
    }
}
