//! Who syncs a global zone with Redis: every worker arms a timer at the zone's `sync`
//! interval; the worker holding the zone's lease (taken over when its holder stops renewing
//! it) takes the pending charges and hands them to its own thread (`redis`); the next tick
//! applies the reply to the table (`rate_sync`). The request path never waits on Redis.

use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use ngx::ffi::{ngx_event_t, ngx_log_t, ngx_msec_t, NGX_LOG_INFO, NGX_LOG_WARN};

use super::rate_zone::RateZone;
use super::redis::{lock, run, Chan, Endpoint, Reply, CONNECT_TIMEOUT};
use crate::nginx::request::now_us;
use crate::nginx::{no_panic, timer};

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
        let chan = Arc::new(Chan::new());
        let thread_chan = chan.clone();
        let endpoint = Endpoint::new(&sync.client, sync.ca_pem.as_deref())?;
        let (prefix, name, interval) = (sync.prefix.clone(), zone.name.clone(), sync.interval_ms);
        thread::Builder::new()
            .name("mesh-redis".into())
            .spawn(move || run(&thread_chan, &endpoint, &prefix, &name, interval))
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
            let zone = s.zone;
            sync.synced(&slots, &owed, now, elapsed, zone.owed_bound_us(), |k| {
                zone.placed(k)
            });
            Some((true, String::new()))
        }
        Some(Reply::Failed(why)) => {
            sync.failed(&slots);
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
    let Some(batch) = sync.take_batch(&slots, pid, now_ms, lease) else {
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
