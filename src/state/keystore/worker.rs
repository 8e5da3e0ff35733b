//! Workers: take the zone's contents at start, claim what is due, publish what was fetched.

use std::cell::RefCell;
use std::ptr;
use std::sync::Arc;

use ngx::ffi::ngx_log_t;

use super::{log_line, now_ms, publish, sources, KeyZone, Outcome, Source, Sources, StoreConf};
use crate::state::outbound::OutboundToken;
use crate::state::provider::MeshProvider;
use crate::state::refresher::{self, Job};

/// One source as a worker tracks it.
struct Local {
    source: Source,
    id: String,
    /// Where it was last found in the zone.
    slot: usize,
    /// The zone's generation this worker holds (0: none).
    generation: u64,
}

struct Worker {
    zone: *const KeyZone,
    pid: u64,
    locals: Vec<Local>,
}

thread_local! {
    /// Set in `init_process` of a worker; only the worker's event-loop thread touches it.
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Whether this process serves requests (a worker, or nginx without a master): cache
/// managers and loaders never fetch.
fn serves_requests() -> bool {
    // SAFETY: nginx sets `ngx_process` before `init_process` and never changes it afterwards.
    let p = unsafe { ngx::ffi::ngx_process } as u32;
    p == ngx::ffi::NGX_PROCESS_WORKER || p == ngx::ffi::NGX_PROCESS_SINGLE
}

/// `init_process` of a worker: takes every source the zone holds, and starts the thread that
/// fetches what this worker claims. Not in cache managers and loaders.
pub fn start_worker(store: &StoreConf, s: Sources) -> Result<(), String> {
    if !serves_requests() {
        return Ok(());
    }
    let srcs = sources(&s);
    let Some(zone) = store.zone() else {
        return Ok(());
    };
    if srcs.is_empty() {
        return Ok(());
    }
    let server = s.metadata_server;
    let mut worker = Worker {
        zone,
        pid: std::process::id() as u64,
        locals: srcs
            .into_iter()
            .map(|s| Local {
                id: s.id(server),
                source: s,
                slot: usize::MAX,
                generation: 0,
            })
            .collect(),
    };
    adopt_all(&mut worker, now_ms(), false, &mut Vec::new());
    refresher::start_worker(server.to_string())?;
    WORKER.with(|w| *w.borrow_mut() = Some(worker));
    Ok(())
}

/// Adopts what changed in the zone since this worker last looked and, if `claim`, claims the
/// sources that are due (their jobs are added to `jobs`).
fn adopt_all(w: &mut Worker, now: u64, claim: bool, jobs: &mut Vec<Job>) {
    // SAFETY: the KeyZone lives in the configuration pool of the cycle this worker runs.
    let zone = unsafe { &*w.zone };
    let mut adopt: Vec<(usize, Vec<u8>, u64, u64)> = Vec::new();
    {
        let Some(mut l) = zone.lock() else {
            return;
        };
        for (k, local) in w.locals.iter_mut().enumerate() {
            let Some(i) = l.locate(&local.id, &mut local.slot, now) else {
                continue;
            };
            l.slots()[i].used_at = now;
            let generation = l.slots()[i].sched.generation;
            // (0: the slot was dropped and made again since; nothing to take.)
            if generation != local.generation && generation != 0 {
                let exp = l.slots()[i].exp;
                adopt.push((k, l.body(i), exp, generation));
            }
            if claim && l.slots()[i].sched.claim_due(w.pid, now) {
                jobs.push(local.source.job());
            }
            if let Source::Token(t) = &local.source {
                let sched = &l.slots()[i].sched;
                t.set_schedule(sched.next_due, sched.claimed(now));
            }
        }
    }
    for (k, body, exp, generation) in adopt {
        let local = &mut w.locals[k];
        local.source.adopt(&body, exp);
        local.generation = generation;
    }
}

/// The worker's timer: publishes what its thread fetched, adopts what other workers
/// published, and claims what is due.
pub fn tick(log: *mut ngx_log_t) {
    WORKER.with(|cell| {
        let Ok(mut guard) = cell.try_borrow_mut() else {
            return;
        };
        let Some(w) = guard.as_mut() else {
            return;
        };
        let now = now_ms();
        let done = refresher::take_done();
        let mut lines = Vec::new();
        if !done.is_empty() {
            // SAFETY: as in `adopt_all`.
            let zone = unsafe { &*w.zone };
            if let Some(mut l) = zone.lock() {
                for d in &done {
                    let (source, outcome) = match d {
                        refresher::Done::Keys(p, r) => (
                            Source::Keys(p.clone()),
                            Outcome::Keys(p, r.as_ref().map_err(String::as_str)),
                        ),
                        refresher::Done::Token(t, r) => (
                            Source::Token(t.clone()),
                            Outcome::Token(
                                t,
                                r.as_ref()
                                    .map(|(s, e)| (s.as_str(), *e))
                                    .map_err(String::as_str),
                            ),
                        ),
                    };
                    let Some(local) = w.locals.iter_mut().find(|l| l.source.same(&source)) else {
                        continue;
                    };
                    let Some(i) = l.locate(&local.id, &mut local.slot, now) else {
                        continue;
                    };
                    // Taken into this worker below, like any other published result.
                    lines.push(publish(&mut l, i, w.pid, now, outcome));
                }
            }
        }
        // SAFETY: nginx's process flags are plain globals, read on the worker's own thread.
        let exiting = unsafe {
            ngx::ffi::ngx_exiting != 0 || ngx::ffi::ngx_quit != 0 || ngx::ffi::ngx_terminate != 0
        };
        let mut jobs = Vec::new();
        adopt_all(w, now, !exiting, &mut jobs);
        for job in jobs {
            refresher::submit(job);
        }
        for (level, line) in lines {
            log_line(log, level, &line);
        }
    });
}

/// A request found an outbound token due for renewal, or none at all: the timer's work done
/// now (publish what the thread fetched, adopt what others published, claim what is due), so
/// that renewal does not wait for a timer that a throttled CPU may not have run. Never waits
/// on the network: a claimed fetch goes to the thread. Logs as the timer does (the cycle's
/// log, not the request's).
pub fn nudge() {
    // SAFETY: `ngx_cycle` is the worker's live cycle, read on its own thread.
    let log = unsafe { (*ngx::ffi::ngx_cycle).log };
    tick(log);
}

/// The token in force for a request, its renewal started when it is due (never waits): a
/// request that finds it due does the timer's work at once (`nudge`), so renewal does not
/// depend on a timer a throttled CPU may not run.
pub fn current_token(t: &OutboundToken) -> Option<Arc<str>> {
    if t.should_nudge(now_ms()) {
        nudge();
    }
    t.current().or_else(|| {
        // A token another worker published since this worker's timer last looked.
        catch_up();
        t.current()
    })
}

/// A token named a `kid` that `p`'s keys lack: one worker refetches (at most every 30 s for
/// all workers, one fetch in flight; nothing for a provider without a key URL). Called from
/// request handlers.
pub fn request_refetch(p: &MeshProvider) {
    WORKER.with(|cell| {
        let Ok(mut guard) = cell.try_borrow_mut() else {
            return;
        };
        let Some(w) = guard.as_mut() else {
            return;
        };
        let pid = w.pid;
        // SAFETY: as in `adopt_all`.
        let zone = unsafe { &*w.zone };
        let Some(local) = w.locals.iter_mut().find(|l| match &l.source {
            Source::Keys(a) => ptr::eq(Arc::as_ptr(a), p),
            Source::Token(_) => false,
        }) else {
            return;
        };
        let now = now_ms();
        let claimed = match zone.lock() {
            Some(mut l) => match l.locate(&local.id, &mut local.slot, now) {
                Some(i) => l.slots()[i].sched.claim_refetch(pid, now),
                None => false,
            },
            None => false,
        };
        if claimed {
            refresher::submit(local.source.job());
        }
    });
}

/// `exit_process` of a worker: releases the claims its thread will not finish, so that
/// another worker fetches at once.
pub fn stop_worker() {
    WORKER.with(|cell| {
        let Ok(guard) = cell.try_borrow() else {
            return;
        };
        let Some(w) = guard.as_ref() else {
            return;
        };
        // SAFETY: as in `adopt_all`.
        let zone = unsafe { &*w.zone };
        if let Some(mut l) = zone.lock() {
            for s in l.slots().iter_mut() {
                s.sched.abandon(w.pid);
            }
        }
    });
}

/// Takes what other workers published since this worker's last timer tick: for a request that
/// would otherwise be answered without keys or token (never on the path of one that has them).
pub fn catch_up() {
    WORKER.with(|cell| {
        if let Ok(mut guard) = cell.try_borrow_mut() {
            if let Some(w) = guard.as_mut() {
                adopt_all(w, now_ms(), false, &mut Vec::new());
            }
        }
    });
}

/// What this worker lacks to serve every provider and outbound token: empty when ready.
pub fn missing(s: Sources) -> Vec<String> {
    catch_up();
    let mut out = Vec::new();
    for p in s.providers {
        if !Source::Keys(p.clone()).loaded() {
            out.push(format!("mesh_provider \"{}\": no keys", p.name));
        }
    }
    for t in s.outbound {
        if !Source::Token(t.clone()).loaded() {
            out.push(format!("mesh_outbound_token \"{}\": no token", t.audience));
        }
    }
    out
}

/// The shared record of a key URL provider's fetches, as every process sees it in the zone
/// (the master's fetch at start included, kept across reloads): the time of the last good
/// fetch (seconds since the epoch, 0: never), and how many fetches succeeded and failed.
/// `None` for a provider without a key URL, or before this worker found its slot.
pub fn refresh_record(p: &MeshProvider) -> Option<(u64, u64, u64)> {
    p.url.as_ref()?;
    record(|src| matches!(src, Source::Keys(q) if std::ptr::eq(Arc::as_ptr(q), p)))
}

/// The shared record of an outbound token's fetches (the master's at start included, kept
/// across reloads): how many succeeded and failed. `None` before this worker found its slot.
pub fn token_record(t: &OutboundToken) -> Option<(u64, u64)> {
    record(|src| matches!(src, Source::Token(q) if std::ptr::eq(Arc::as_ptr(q), t)))
        .map(|(_, ok, failed)| (ok, failed))
}

/// The zone's record of the source `is` picks: (last good fetch in seconds, successes,
/// failures).
fn record(is: impl Fn(&Source) -> bool) -> Option<(u64, u64, u64)> {
    WORKER.with(|cell| {
        let mut guard = cell.try_borrow_mut().ok()?;
        let w = guard.as_mut()?;
        // SAFETY: the KeyZone lives in the configuration pool of the cycle this worker runs.
        let zone = unsafe { &*w.zone };
        let local = w.locals.iter_mut().find(|l| is(&l.source))?;
        let mut l = zone.lock()?;
        let i = l.locate(&local.id, &mut local.slot, now_ms())?;
        let s = &l.slots()[i].sched;
        Some((s.fetched_at / 1000, s.ok_total, s.failed_total))
    })
}
