//! Global rate-limit zones (`mesh_rate_limit_zone ... redis=URL`): the zone still decides
//! every request from shared memory; this file reconciles it with Redis in the background.
//!
//! Shared state: a second shared zone per global zone (`NAME:mesh_redis`, so a plain zone's
//! layout never changes, and a reload that adds or drops `redis=` gets a fresh one) holding a
//! [`SyncTable`] header, one `u32` per rate slot and the list of pending charges
//! (`mesh_core::ratesync`). Everything in it is read and written under the *rate zone's*
//! mutex, which the request already holds when it charges a key.
//!
//! Who syncs: every worker arms a timer at the zone's `sync` interval; the worker holding the
//! zone's lease (taken over when its holder stops renewing it) takes the pending charges and
//! hands them to its own background thread, which does the one pipelined round trip to Redis
//! with short timeouts, and hands back each key's debt; the next tick applies it to the table.
//! As with the key refresher, the thread never calls nginx: it only sees the batch and the
//! reply, through a mutex of its own. The request path never waits on Redis: if Redis is
//! down, slow or flushed, the zone simply keeps its local limits.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use mesh_core::ratesync::{self, Pending, KEYS_PER_CALL, MAX_PENDING};
use mesh_core::ratetable::{self, Slot};
use ngx::core::Status;
use ngx::ffi::{
    ngx_event_t, ngx_int_t, ngx_log_t, ngx_msec_t, ngx_shm_zone_t, ngx_shmtx_lock,
    ngx_shmtx_unlock, ngx_slab_alloc_locked, ngx_slab_pool_t, NGX_LOG_EMERG, NGX_LOG_INFO,
    NGX_LOG_WARN,
};

use super::rate_zone::RateZone;
use crate::nginx::request::now_us;
use crate::nginx::{no_panic, timer};

/// Marks a table written by this layout.
const MAGIC: u64 = 0x6d65_7368_7273_7901;

/// A global zone's configuration: where Redis is, how often to sync, the key prefix.
pub struct SyncConf {
    /// The connection (with its password, never shown).
    pub client: redis::Client,
    /// `host:port/db`, with `rediss://` when TLS: what logs say.
    pub shown: String,
    pub interval_ms: u64,
    pub prefix: String,
    /// The name of the sync state's shared zone (nginx keeps a pointer to these bytes).
    pub shm_name: String,
    /// The sync state, once its zone is initialised.
    table: *mut SyncTable,
    /// The rate zone's pool (its mutex guards the sync state too).
    pool: *mut ngx_slab_pool_t,
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
        shown: String,
        interval_ms: u64,
        prefix: String,
        zone: &str,
    ) -> SyncConf {
        SyncConf {
            client,
            shown,
            interval_ms,
            prefix,
            shm_name: format!("{zone}{SHM_SUFFIX}"),
            table: ptr::null_mut(),
            pool: ptr::null_mut(),
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
    pub fn status(&self) -> Option<(bool, Option<u64>, u64)> {
        if self.pool.is_null() {
            return None;
        }
        // SAFETY: the pool is the rate zone's; its mutex guards the table.
        unsafe {
            ngx_shmtx_lock(&mut (*self.pool).mutex);
            let r = self.locked().map(|l| (l.t.up, l.t.last_ok_ms, l.t.dropped));
            ngx_shmtx_unlock(&mut (*self.pool).mutex);
            let (up, last, dropped) = r?;
            let now = now_us() / 1000;
            Some((
                up == 1,
                (last != 0).then(|| now.saturating_sub(last)),
                dropped,
            ))
        }
    }

    /// Runs `f` on the locked state and the rate slots.
    fn with<T>(
        &self,
        slots: &RateSlots,
        f: impl FnOnce(Locked<'_>, &mut [Slot]) -> T,
    ) -> Option<T> {
        if self.pool.is_null() {
            return None;
        }
        // SAFETY: the mutex is taken around every use of the views; `slots` describes the
        // rate zone's slot array, guarded by the same mutex.
        unsafe {
            ngx_shmtx_lock(&mut (*self.pool).mutex);
            let r = self.locked().map(|l| {
                let s = std::slice::from_raw_parts_mut(slots.0, slots.1);
                f(l, s)
            });
            ngx_shmtx_unlock(&mut (*self.pool).mutex);
            r
        }
    }
}

/// The rate zone's slot array (pointer and length), as `RateZone::slots` gives it.
pub struct RateSlots(pub *mut Slot, pub usize);

/// `shm_zone->init` of the sync state's zone, in the master for every (re)started cycle.
///
/// # Safety
/// nginx calls this with the zone whose `data` is the `RateZone` this state belongs to
/// (already initialised: its zone was declared first).
pub unsafe extern "C" fn zone_init(shm_zone: *mut ngx_shm_zone_t, _old: *mut c_void) -> ngx_int_t {
    // SAFETY: see the contract; `shm.addr` starts with the zone's slab pool, which nginx
    // initialised (or kept) before calling us. The master is alone at this point.
    unsafe {
        let zone = &mut *((*shm_zone).data as *mut RateZone);
        let Some((pool, _)) = zone.parts() else {
            return Status::NGX_ERROR.into();
        };
        let (size, name) = (zone.size, zone.name.clone());
        let Some(sync) = zone.sync.as_mut() else {
            return Status::NGX_ERROR.into();
        };
        let shpool = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
        let nindex = size / size_of::<Slot>() + 1;
        ngx_shmtx_lock(&mut (*shpool).mutex);
        let mut table = (*shpool).data as *mut SyncTable;
        let fits = !table.is_null()
            && (*table).magic == MAGIC
            && (*table).nindex as usize == nindex
            && (*table).npending as usize == MAX_PENDING;
        if !fits {
            table = ngx_slab_alloc_locked(shpool, table_bytes(nindex)) as *mut SyncTable;
            if table.is_null() {
                ngx_shmtx_unlock(&mut (*shpool).mutex);
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
        ngx_shmtx_unlock(&mut (*shpool).mutex);
        sync.table = table;
        sync.pool = pool;
        Status::NGX_OK.into()
    }
}

/// What a worker hands its thread, and gets back.
struct Chan {
    job: Mutex<Option<Vec<Pending>>>,
    wake: Condvar,
    reply: Mutex<Option<Reply>>,
    busy: AtomicBool,
}

enum Reply {
    /// Each key's charge and how far ahead of Redis's clock its TAT is, when Redis answered.
    Synced(Vec<(Pending, u64)>, Instant),
    Failed(String),
    /// Waiting before the next attempt: the batch was dropped (limited locally).
    Skipped,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// One global zone in one worker: its timer, its thread, what it last logged.
struct Syncer {
    ev: ngx_event_t,
    zone: &'static RateZone,
    chan: Arc<Chan>,
    pid: u64,
    /// `Some(true)` after a sync reached Redis, `Some(false)` after one failed.
    up: Option<bool>,
    /// When this worker last sent anything (monotonic ms), to ping an idle Redis.
    last_sent_ms: u64,
}

/// The I/O timeout for a zone syncing every `interval_ms`: under the interval, so a slow
/// Redis delays one sync at most.
fn io_timeout(interval_ms: u64) -> Duration {
    Duration::from_millis((interval_ms * 3 / 4).clamp(25, 1000))
}

/// The timeout to connect (TCP, TLS handshake, AUTH, loading the script): longer than a
/// sync's, as a TLS handshake costs CPU on both sides; only this worker's thread waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a lease holds without renewal: a few intervals and timeouts.
fn lease_ms(interval_ms: u64) -> u64 {
    3 * interval_ms + 2 * CONNECT_TIMEOUT.as_millis() as u64 + 250
}

/// `init_process`: starts a timer and a thread for every global zone of the configuration.
pub fn start_worker(zones: &[*const RateZone], log: *mut ngx_log_t) -> Result<(), String> {
    // SAFETY: nginx sets `ngx_process` before `init_process` and never changes it afterwards.
    let p = unsafe { ngx::ffi::ngx_process } as u32;
    if p != ngx::ffi::NGX_PROCESS_WORKER && p != ngx::ffi::NGX_PROCESS_SINGLE {
        return Ok(());
    }
    for &z in zones {
        // SAFETY: the zones live in the configuration pool of the worker's only cycle.
        let Some(zone) = (unsafe { z.as_ref() }) else {
            continue;
        };
        let Some(sync) = zone.sync.as_ref() else {
            continue;
        };
        super::refresher::install_crypto();
        let chan = Arc::new(Chan {
            job: Mutex::new(None),
            wake: Condvar::new(),
            reply: Mutex::new(None),
            busy: AtomicBool::new(false),
        });
        let thread_chan = chan.clone();
        let client = sync.client.clone();
        let (prefix, name, interval) = (sync.prefix.clone(), zone.name.clone(), sync.interval_ms);
        thread::Builder::new()
            .name("mesh-redis".into())
            .spawn(move || run(&thread_chan, &client, &prefix, &name, interval))
            .map_err(|e| format!("cannot start the Redis sync thread: {e}"))?;
        let s = Box::leak(Box::new(Syncer {
            // SAFETY: an all-zero `ngx_event_t` is a valid idle event.
            ev: unsafe { std::mem::zeroed() },
            zone,
            chan,
            pid: u64::from(std::process::id()),
            up: None,
            last_sent_ms: 0,
        }));
        let ev = ptr::addr_of_mut!(s.ev);
        // SAFETY: the event is leaked (lives as long as the worker) and used only by this
        // worker's event loop; `data` is set before the timer can fire.
        unsafe {
            timer::arm(ev, tick, log, interval as ngx_msec_t);
            (*ev).data = ptr::from_mut(s).cast();
        }
    }
    Ok(())
}

/// The zone's timer (on the worker's event loop).
unsafe extern "C" fn tick(ev: *mut ngx_event_t) {
    // SAFETY: `data` is the leaked `Syncer` this event belongs to (see `start_worker`).
    let s = unsafe { &mut *((*ev).data as *mut Syncer) };
    no_panic((), || step(s));
    let interval = s.zone.sync.as_ref().map_or(1000, |c| c.interval_ms);
    // SAFETY: re-arming the event from its own handler.
    unsafe { timer::rearm(ev, interval as ngx_msec_t) };
}

fn step(s: &mut Syncer) {
    let (Some(sync), Some((_, slots))) = (s.zone.sync.as_ref(), s.zone.parts()) else {
        return;
    };
    if s.chan.busy.load(Ordering::Acquire) {
        return;
    }
    let log = s.ev.log;
    let now = now_us();
    let now_ms = now / 1000;
    let reply = lock(&s.chan.reply).take();
    let up = match reply {
        Some(Reply::Synced(owed, at)) => {
            let elapsed = at.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
            let bound = s.zone.owed_bound_us();
            sync.with(&slots, |l, table| {
                for (p, owed) in &owed {
                    let tat = ratesync::synced_tat(now, *owed, elapsed, bound);
                    if let Some(key) = s.zone.placed(p.key) {
                        ratetable::raise(table, key, p.slot as usize, tat);
                    }
                }
                l.t.up = 1;
                l.t.last_ok_ms = now_ms.max(1);
            });
            Some((true, String::new()))
        }
        Some(Reply::Failed(why)) => {
            sync.with(&slots, |l, _| l.t.up = 2);
            Some((false, why))
        }
        Some(Reply::Skipped) | None => None,
    };
    if let Some((ok, why)) = up {
        let (name, at) = (&s.zone.name, &sync.shown);
        let line = match (s.up, ok) {
            (Some(false), true) => Some((
                NGX_LOG_WARN,
                format!("Redis at {at} reachable again, limits are global"),
            )),
            (None, true) => Some((NGX_LOG_INFO, format!("syncing with Redis at {at}"))),
            (None | Some(true), false) => Some((
                NGX_LOG_WARN,
                format!("Redis at {at} unreachable ({why}), limiting locally"),
            )),
            _ => None,
        };
        if let Some((level, text)) = line {
            ngx::ngx_log_error!(level, log, "mesh_rate_limit_zone \"{}\": {}", name, text);
        }
        s.up = Some(ok);
    }
    let lease = lease_ms(sync.interval_ms);
    let pid = s.pid;
    let batch = sync.with(&slots, |l, _| {
        let t = &mut *l.t;
        if t.owner != 0 && t.owner != pid && t.lease_until_ms > now_ms {
            return None;
        }
        t.owner = pid;
        t.lease_until_ms = now_ms + lease;
        Some(ratesync::take(l.index, l.list, &mut t.len))
    });
    let Some(Some(batch)) = batch else {
        return;
    };
    // An idle zone still checks Redis now and then, so the state and the gauge stay true.
    if batch.is_empty() && now_ms.saturating_sub(s.last_sent_ms) < 1000 {
        return;
    }
    s.last_sent_ms = now_ms;
    s.chan.busy.store(true, Ordering::Release);
    *lock(&s.chan.job) = Some(batch);
    s.chan.wake.notify_one();
}

/// The thread: one batch at a time, one connection, reconnecting with a backoff.
fn run(chan: &Chan, client: &redis::Client, prefix: &str, zone: &str, interval_ms: u64) {
    let timeout = io_timeout(interval_ms);
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = Duration::from_millis(interval_ms);
    // Retries of a Redis that is down: a refused or timed-out connect every half second costs
    // little, and bounds how long global limits take to come back.
    let max_backoff = Duration::from_millis(interval_ms.max(500));
    let mut retry_at: Option<Instant> = None;
    let script = redis::Script::new(ratesync::SCRIPT);
    loop {
        let batch = {
            let mut job = lock(&chan.job);
            loop {
                if let Some(b) = job.take() {
                    break b;
                }
                job = match chan.wake.wait(job) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
        };
        let reply = if retry_at.is_some_and(|t| Instant::now() < t) {
            Reply::Skipped
        } else {
            match sync_once(&mut conn, client, &script, timeout, prefix, zone, batch) {
                Ok(owed) => {
                    retry_at = None;
                    backoff = Duration::from_millis(interval_ms);
                    Reply::Synced(owed, Instant::now())
                }
                Err(e) => {
                    conn = None;
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(max_backoff);
                    Reply::Failed(e)
                }
            }
        };
        *lock(&chan.reply) = Some(reply);
        chan.busy.store(false, Ordering::Release);
    }
}

fn connect(
    client: &redis::Client,
    script: &redis::Script,
    timeout: Duration,
) -> redis::RedisResult<redis::Connection> {
    let mut c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    c.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    script.prepare_invoke().load(&mut c)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    Ok(c)
}

/// One round trip: every key's charge in, every key's debt out. An empty batch is a ping.
fn sync_once(
    conn: &mut Option<redis::Connection>,
    client: &redis::Client,
    script: &redis::Script,
    timeout: Duration,
    prefix: &str,
    zone: &str,
    batch: Vec<Pending>,
) -> Result<Vec<(Pending, u64)>, String> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(connect(client, script, timeout).map_err(|e| e.to_string())?),
    };
    if batch.is_empty() {
        redis::cmd("PING")
            .query::<String>(c)
            .map_err(|e| e.to_string())?;
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for chunk in batch.chunks(KEYS_PER_CALL) {
        let cmd = pipe.cmd("EVALSHA").arg(script.get_hash()).arg(chunk.len());
        for p in chunk {
            cmd.arg(ratesync::redis_key(prefix, zone, p.key));
        }
        for p in chunk {
            cmd.arg(p.charge_us);
        }
    }
    let replies: Vec<Vec<i64>> = match pipe.query(c) {
        Ok(r) => r,
        // Scripts are gone (Redis restarted, SCRIPT FLUSH): load it again, once.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load(c).map_err(|e| e.to_string())?;
            pipe.query(c).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let owed = replies.into_iter().flatten().map(|v| v.max(0) as u64);
    Ok(batch.into_iter().zip(owed).collect())
}
