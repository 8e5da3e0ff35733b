//! The shared key store: the last good keys of every key URL and the last ID token of every
//! outbound audience, in one nginx shared-memory zone (`mesh_keys`) that every process of the
//! instance sees, and that nginx keeps, contents and all, across `nginx -s reload` and worker
//! restarts (same name, size and module tag).
//!
//! - Start: `init_module` runs in the master after the listening sockets are open and before
//!   the workers fork (never for `nginx -t`). It fetches every source the zone does not hold
//!   yet, in parallel, for up to `mesh_keys_wait` (default 5 s), and joins every thread before
//!   returning: no thread may be alive when nginx forks. Connections that arrive meanwhile
//!   wait in the listen queue. Sources still missing at the deadline get one `[warn]` each,
//!   and the workers keep fetching them.
//! - Reload: a source already in the zone (same URL and trusted roots; same metadata server
//!   and audience) is used as it is, whatever its server does now; only new sources are
//!   fetched (with the same bounded wait). Sources no configuration used for an hour are
//!   dropped.
//! - Workers read every source from the zone when they start (`init_process`), so a new or
//!   restarted worker has keys at once. Each worker's timer then checks the zone: a source
//!   that is due (or whose keys lack a token's `kid`) is claimed, under the zone's mutex, by
//!   one worker, whose thread fetches it; that worker publishes the result, and every other
//!   worker's timer adopts it. One fetch per refresh for all workers.
//!
//! The zone is only touched from nginx's event loop (the master in `init_module`, workers in
//! their timer and request handlers); the fetch threads never call nginx. The schedule's rules
//! are `mesh_core::keystore`. Here: the zone and its slots; `start`: the master's part;
//! `worker`: the workers' part.

use std::ffi::c_void;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::keys::KeySet;
use mesh_core::keystore::{slot_for_new, Schedule, SlotUse, KEYS_MAX_BACKOFF, TOKEN_MAX_BACKOFF};
use mesh_core::refresh::{refresh_after, renew_at};
use ngx::core::slab::LockedSlabPool;
use ngx::core::{SlabPool, Status};
use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_log_t, ngx_shm_zone_t, ngx_slab_alloc_locked, ngx_slab_calloc,
    ngx_slab_free_locked, ngx_slab_pool_t, ngx_str_t, NGX_LOG_EMERG, NGX_LOG_INFO, NGX_LOG_WARN,
};

use crate::state::outbound::OutboundToken;
use crate::state::provider::MeshProvider;
use crate::state::refresher::{FetchedKeys, Job};

mod start;
pub mod timer;
mod worker;

pub use start::init_module;
pub use worker::{
    catch_up, current_token, missing, nudge, refresh_record, request_refetch, start_worker,
    stop_worker, tick, token_record,
};

/// The zone's name and size: one page table plus room for every key set and token.
pub const ZONE_NAME: &str = "mesh_keys";
const ZONE_SIZE: usize = 1 << 20;
/// Slots in the zone: twice the sources one configuration may have, so that a reload can add
/// a whole new set while the old workers still use theirs.
const CAPACITY: usize = 128;
const MAX_SOURCES: usize = CAPACITY / 2;
/// `mesh_keys_wait` by default.
const DEFAULT_WAIT_MS: u64 = 5000;
/// An outbound token in the zone that expires within this long is fetched again at start.
const TOKEN_MIN_LIFE: u64 = 60;
/// Layout version of the zone's table ("meshkeys" + 1).
const MAGIC: u64 = 0x6d65_7368_6b65_7901;

/// `mesh_keys_wait` and the zone, as part of the http main configuration.
#[derive(Default)]
pub struct StoreConf {
    /// `mesh_keys_wait`, in milliseconds (`None`: the default); set when merging.
    pub wait_ms: Option<u64>,
    zone: Option<NonNull<ngx_shm_zone_t>>,
}

impl StoreConf {
    pub(crate) fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms.unwrap_or(DEFAULT_WAIT_MS))
    }

    /// This cycle's view of the zone, once nginx has set it up.
    fn zone(&self) -> Option<&KeyZone> {
        let zone = self.zone?;
        // SAFETY: the shm entry lives in the cycle; its `data` is the KeyZone allocated in
        // `add_zone` from the configuration pool, which lives as long as the cycle.
        unsafe { ((*zone.as_ptr()).data as *const KeyZone).as_ref() }
    }
}

/// What `shm_zone->data` points at: this cycle's view of the zone.
struct KeyZone {
    /// The zone's slab pool, for its mutex (`lock`) and, under it, its allocator (`shpool`).
    pool: Option<SlabPool>,
    shpool: *mut ngx_slab_pool_t,
    table: *mut Table,
}

/// The start of the zone's memory (allocated from its slab pool); bytes of ids and bodies are
/// further slab allocations. Pointers into the zone are valid in every process: nginx maps a
/// zone once, in the master, before any worker forks.
#[repr(C)]
struct Table {
    magic: u64,
    slots: [Slot; CAPACITY],
}

/// One source. All-zero: free.
#[repr(C)]
struct Slot {
    used: u64,
    /// When a process last used it (ms).
    used_at: u64,
    id: *mut u8,
    id_len: usize,
    /// The last good key set (JWKS bytes) or ID token.
    body: *mut u8,
    body_len: usize,
    /// A token's `exp` (seconds).
    exp: u64,
    sched: Schedule,
}

impl Slot {
    fn usage(&self, wanted: bool) -> SlotUse {
        SlotUse {
            used: self.used != 0,
            used_at: self.used_at,
            wanted,
        }
    }
}

/// The zone, locked: every access to the table goes through this guard, which holds the
/// slab pool's mutex until it drops.
struct Locked<'a> {
    zone: &'a KeyZone,
    _locked: LockedSlabPool,
}

impl KeyZone {
    fn lock(&self) -> Option<Locked<'_>> {
        if self.table.is_null() {
            return None;
        }
        // The slab pool heads the zone, which lives as long as the cycle; its mutex is
        // nginx's shared mutex, taken only from event-loop code (here).
        let locked = self.pool.as_ref()?.lock();
        Some(Locked {
            zone: self,
            _locked: locked,
        })
    }
}

impl Locked<'_> {
    fn slots(&mut self) -> &mut [Slot; CAPACITY] {
        // SAFETY: `table` was allocated (zeroed) in the zone by `zone_init`; holding the zone's
        // mutex makes this the only reference to it in any process.
        unsafe { &mut (*self.zone.table).slots }
    }

    fn bytes(ptr: *const u8, len: usize) -> &'static [u8] {
        if ptr.is_null() || len == 0 {
            return &[];
        }
        // SAFETY: `ptr` and `len` describe a slab allocation of this zone (see `alloc`) that is
        // freed only under the zone's mutex, which the caller holds while it reads.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }

    fn id(&mut self, i: usize) -> &[u8] {
        let s = &self.slots()[i];
        Self::bytes(s.id, s.id_len)
    }

    fn body(&mut self, i: usize) -> Vec<u8> {
        let s = &self.slots()[i];
        Self::bytes(s.body, s.body_len).to_vec()
    }

    /// A copy of `bytes` in the zone (`None`: the zone is full).
    fn alloc(&mut self, bytes: &[u8]) -> Option<*mut u8> {
        // SAFETY: the zone's mutex is held, as the `_locked` allocator requires; the new
        // allocation is `bytes.len()` long (at least 1) and filled before use.
        unsafe {
            let p = ngx_slab_alloc_locked(self.zone.shpool, bytes.len().max(1)) as *mut u8;
            if p.is_null() {
                return None;
            }
            ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            Some(p)
        }
    }

    fn free(&mut self, p: *mut u8) {
        if !p.is_null() {
            // SAFETY: `p` came from `alloc` on this zone and is referenced by no slot any more.
            unsafe { ngx_slab_free_locked(self.zone.shpool, p.cast()) };
        }
    }

    fn set_body(&mut self, i: usize, bytes: &[u8]) -> bool {
        let Some(p) = self.alloc(bytes) else {
            return false;
        };
        let old = self.slots()[i].body;
        let s = &mut self.slots()[i];
        s.body = p;
        s.body_len = bytes.len();
        self.free(old);
        true
    }

    fn find(&mut self, id: &str) -> Option<usize> {
        (0..CAPACITY).find(|&i| self.slots()[i].used != 0 && self.id(i) == id.as_bytes())
    }

    /// Frees slot `i` and what it holds.
    fn clear(&mut self, i: usize) {
        let (id, body) = (self.slots()[i].id, self.slots()[i].body);
        self.free(id);
        self.free(body);
        // SAFETY: an all-zero slot is a valid free one (plain integers and null pointers).
        self.slots()[i] = unsafe { std::mem::zeroed() };
    }

    /// Puts a new source into the slot `slot_for_new` picks among `uses`.
    fn insert(&mut self, id: &str, uses: &[SlotUse], now: u64) -> Option<usize> {
        let i = slot_for_new(uses)?;
        if self.slots()[i].used != 0 {
            self.clear(i);
        }
        let p = self.alloc(id.as_bytes())?;
        let s = &mut self.slots()[i];
        s.used = 1;
        s.used_at = now;
        s.id = p;
        s.id_len = id.len();
        Some(i)
    }

    /// The slot of `id`, found again from the cached index `hint` or searched; created when
    /// missing (a worker of a configuration the master did not see, or an evicted source).
    fn locate(&mut self, id: &str, hint: &mut usize, now: u64) -> Option<usize> {
        if *hint < CAPACITY && self.slots()[*hint].used != 0 && self.id(*hint) == id.as_bytes() {
            return Some(*hint);
        }
        let i = match self.find(id) {
            Some(i) => i,
            None => {
                // Another process used it within the last minute: keep it.
                let uses: Vec<SlotUse> = self
                    .slots()
                    .iter()
                    .map(|s| s.usage(now < s.used_at.saturating_add(60_000)))
                    .collect();
                self.insert(id, &uses, now)?
            }
        };
        *hint = i;
        Some(i)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn log_line(log: *mut ngx_log_t, level: u32, text: &str) {
    ngx::ngx_log_error!(level, log, "{}", text);
}

/// A key source or an outbound token of the configuration.
#[derive(Clone)]
enum Source {
    Keys(Arc<MeshProvider>),
    Token(Arc<OutboundToken>),
}

impl Source {
    /// What identifies the source across configurations: where it is fetched from, and the
    /// roots trusted for it (by content: a new `ca=` file is a new source).
    fn id(&self, metadata_server: &str) -> String {
        match self {
            Source::Keys(p) => {
                let url = p.url.as_ref().map_or("", |u| u.url.as_str());
                let mut roots = String::new();
                if let Some(certs) = p.url.as_ref().and_then(|u| u.roots.as_ref()) {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::hash::DefaultHasher::new();
                    for c in certs.iter() {
                        c.der().hash(&mut h);
                    }
                    roots = format!("{:016x}", h.finish());
                }
                // A discovery document is another source than keys at the same URL.
                let kind = match p.url.as_ref().and_then(|u| u.discovery.as_ref()) {
                    Some(_) => "discovery",
                    None => "keys",
                };
                format!("{kind} {url} {roots}")
            }
            Source::Token(t) => {
                let format = if t.full { " format=full" } else { "" };
                format!("token {metadata_server} {}{format}", t.audience)
            }
        }
    }

    fn same(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Keys(a), Source::Keys(b)) => Arc::ptr_eq(a, b),
            (Source::Token(a), Source::Token(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    fn job(&self) -> Job {
        match self {
            Source::Keys(p) => Job::Keys(p.clone()),
            Source::Token(t) => Job::Token(t.clone()),
        }
    }

    /// Whether the source has what it needs in this process (keys, or an unexpired token).
    fn loaded(&self) -> bool {
        match self {
            Source::Keys(p) => !p.snapshot().keys.is_empty(),
            Source::Token(t) => t.current().is_some(),
        }
    }

    /// Takes a stored body into this process.
    fn adopt(&self, body: &[u8], exp: u64) {
        match self {
            Source::Keys(p) => {
                if let Ok(keys) = KeySet::load(body) {
                    p.set_keys(keys);
                }
            }
            Source::Token(t) => {
                if let Ok(token) = std::str::from_utf8(body) {
                    t.set(token.to_string(), exp);
                }
            }
        }
    }
}

/// What one configuration asks of the store: its providers (those with a key URL are
/// sources) and outbound tokens, and where tokens are fetched.
pub struct Sources<'a> {
    pub providers: &'a [Arc<MeshProvider>],
    pub outbound: &'a [Arc<OutboundToken>],
    pub metadata_server: &'a str,
}

/// Every source of a configuration: providers with a key URL, then outbound tokens.
fn sources(s: &Sources) -> Vec<Source> {
    s.providers
        .iter()
        .filter(|p| p.url.is_some())
        .map(|p| Source::Keys(p.clone()))
        .chain(s.outbound.iter().map(|t| Source::Token(t.clone())))
        .collect()
}

/// What a fetch brought, from a worker's thread or the master's start-up fetch.
enum Outcome<'a> {
    Keys(&'a MeshProvider, Result<&'a FetchedKeys, &'a str>),
    Token(&'a OutboundToken, Result<(&'a str, u64), &'a str>),
}

/// Stores a fetch's result in slot `i` and says what to log.
fn publish(l: &mut Locked, i: usize, pid: u64, now: u64, outcome: Outcome) -> (u32, String) {
    match outcome {
        Outcome::Keys(p, Ok(k)) => {
            let url = p.url.as_ref().map_or("", |u| u.shown.as_str());
            if !l.set_body(i, &k.body) {
                let retry = l.slots()[i].sched.failed(pid, now, KEYS_MAX_BACKOFF);
                return (
                    NGX_LOG_WARN,
                    format!(
                        "mesh_provider \"{}\": {} keys from {url} do not fit in the shared zone \"{ZONE_NAME}\"; retry in {retry}s",
                        p.name, k.count
                    ),
                );
            }
            let after = refresh_after(k.cache_control.as_deref());
            l.slots()[i].sched.succeeded(pid, now, after * 1000);
            (
                NGX_LOG_INFO,
                format!(
                    "mesh_provider \"{}\": {} keys from {url}, next refresh in {after}s",
                    p.name, k.count
                ),
            )
        }
        Outcome::Keys(p, Err(e)) => {
            let url = p.url.as_ref().map_or("", |u| u.shown.as_str());
            let sched = &mut l.slots()[i].sched;
            let kept = if sched.has_result() {
                "keeping the last good keys"
            } else {
                "no keys yet"
            };
            let retry = sched.failed(pid, now, KEYS_MAX_BACKOFF);
            (
                NGX_LOG_WARN,
                format!(
                    "mesh_provider \"{}\": fetching {url} failed ({e}); {kept}, retry in {retry}s",
                    p.name
                ),
            )
        }
        Outcome::Token(t, Ok((token, exp))) => {
            let now_s = now / 1000;
            let at = renew_at(exp, now_s);
            if !l.set_body(i, token.as_bytes()) {
                let retry = l.slots()[i].sched.failed(pid, now, TOKEN_MAX_BACKOFF);
                return (
                    NGX_LOG_WARN,
                    format!(
                        "mesh_outbound_token \"{}\": the token does not fit in the shared zone \"{ZONE_NAME}\"; retry in {retry}s",
                        t.audience
                    ),
                );
            }
            let s = &mut l.slots()[i];
            s.exp = exp;
            s.sched.succeeded(pid, now, (at - now_s) * 1000);
            (
                NGX_LOG_INFO,
                format!(
                    "mesh_outbound_token \"{}\": new token, renewed in {}s",
                    t.audience,
                    at - now_s
                ),
            )
        }
        Outcome::Token(t, Err(e)) => {
            let retry = l.slots()[i].sched.failed(pid, now, TOKEN_MAX_BACKOFF);
            (
                NGX_LOG_WARN,
                format!(
                    "mesh_outbound_token \"{}\": fetching from the metadata server failed ({e}), retry in {retry}s",
                    t.audience
                ),
            )
        }
    }
}

// ---------------------------------------------------------------- configuration

/// Adds the zone when the configuration has key URLs or outbound tokens (postconfiguration),
/// tagged as the module's key zone.
///
/// # Safety
/// `cf` is nginx's configuration context, after the http block was parsed; `store` lives in
/// its main configuration.
pub unsafe fn add_zone(
    cf: *mut ngx_conf_t,
    store: &mut StoreConf,
    srcs: &Sources,
) -> Result<(), String> {
    let n = sources(srcs).len();
    if n == 0 {
        return Ok(());
    }
    if n > MAX_SOURCES {
        return Err(format!(
            "too many key URLs and outbound tokens ({n}): at most {MAX_SOURCES}"
        ));
    }
    let name = ngx_str_t {
        len: ZONE_NAME.len(),
        data: ZONE_NAME.as_ptr().cast_mut(),
    };
    let zone =
        crate::nginx::conf::shared_zone(cf, name, ZONE_SIZE, crate::nginx::conf::ZoneKind::Keys)
            .map_err(|_| format!("the shared zone \"{ZONE_NAME}\" cannot be created"))?
            .as_ptr();
    // SAFETY: `zone` is nginx's entry for the name (nginx copied nothing of `name` it keeps:
    // it points at a static); `data` is ours to set once. The KeyZone lives in the
    // configuration pool, as long as the cycle.
    unsafe {
        if !(*zone).data.is_null() {
            return Err(format!(
                "the shared zone name \"{ZONE_NAME}\" is reserved for the keys of key URLs and outbound tokens"
            ));
        }
        let view = ngx::core::Pool::from_ngx_pool((*cf).pool).allocate(KeyZone {
            pool: None,
            shpool: ptr::null_mut(),
            table: ptr::null_mut(),
        });
        if view.is_null() {
            return Err("out of memory".into());
        }
        (*zone).data = view.cast();
        (*zone).init = Some(zone_init);
        store.zone = NonNull::new(zone);
    }
    Ok(())
}

/// `shm_zone->init`: called in the master for every (re)started cycle.
///
/// # Safety
/// nginx calls this with the zone and, on a reload that keeps the zone, the previous cycle's
/// KeyZone (still alive at that point).
unsafe extern "C" fn zone_init(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: see the contract; `shm.addr` starts with the zone's slab pool, which nginx
    // initialised before calling us.
    unsafe {
        let zone = &mut *((*shm_zone).data as *mut KeyZone);
        let shpool = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
        zone.shpool = shpool;
        zone.pool = SlabPool::from_shm_zone(&*shm_zone);
        if !data.is_null() {
            // A reload: same memory, same contents.
            zone.table = (*(data as *const KeyZone)).table;
            return Status::NGX_OK.into();
        }
        let existing = (*shpool).data as *mut Table;
        if (*shm_zone).shm.exists != 0 && !existing.is_null() && (*existing).magic == MAGIC {
            zone.table = existing;
            return Status::NGX_OK.into();
        }
        let table = ngx_slab_calloc(shpool, size_of::<Table>()) as *mut Table;
        if table.is_null() {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                (*shm_zone).shm.log,
                "mesh: the shared zone \"{}\" is too small",
                ZONE_NAME
            );
            return Status::NGX_ERROR.into();
        }
        (*table).magic = MAGIC;
        (*shpool).data = table.cast();
        zone.table = table;
        Status::NGX_OK.into()
    }
}
