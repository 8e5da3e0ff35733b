//! Start and reload, in the master: fetch what the zone lacks before the workers fork.

use std::time::{Duration, Instant};

use mesh_core::keystore::drop_at_load;
use mesh_core::refresh::refresh_after;
use ngx::core::Status;
use ngx::ffi::{ngx_cycle_t, ngx_int_t, ngx_log_t, NGX_LOG_INFO, NGX_LOG_WARN};

use super::{
    log_line, now_ms, publish, sources, Outcome, SlotUse, Source, Sources, StoreConf, CAPACITY,
    TOKEN_MIN_LIFE,
};
use crate::state::refresher::{self, FetchedKeys};

/// What the start-up fetch of one source brought.
enum ColdResult {
    Keys(Result<FetchedKeys, String>),
    Token(Result<(String, u64), String>),
}

/// Tries `once` until it succeeds or `deadline` passes (pausing 0.1 s, doubling to 1 s,
/// between tries); `once` gets the time left. The error is the last try's, unless that try was
/// only cut short by the deadline (then the one before says more).
fn until<T>(
    deadline: Instant,
    mut once: impl FnMut(Duration) -> Result<T, String>,
) -> Result<T, String> {
    let mut pause = Duration::from_millis(100);
    let mut last: Option<String> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last.unwrap_or_else(|| "no time left".into()));
        }
        match once(left) {
            Ok(v) => return Ok(v),
            Err(e) if last.is_none() || Instant::now() < deadline => last = Some(e),
            Err(_) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Fetches `todo` in parallel threads until `deadline`; every thread is joined before this
/// returns (each fetch's timeout is bounded by the time left).
fn cold_fetch(todo: &[Source], metadata_server: &str, deadline: Instant) -> Vec<ColdResult> {
    refresher::install_crypto();
    std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .iter()
            .map(|src| {
                let work = move || match src {
                    Source::Keys(p) => ColdResult::Keys(until(deadline, |left| {
                        let url = p.url.as_ref().ok_or("no key URL")?;
                        refresher::fetch_keys(
                            &refresher::agent(url.roots.as_ref(), left, true),
                            url,
                        )
                    })),
                    Source::Token(t) => ColdResult::Token(until(deadline, |left| {
                        refresher::fetch_token(
                            &refresher::agent(None, left, true),
                            metadata_server,
                            &t.audience,
                            t.full,
                        )
                    })),
                };
                std::thread::Builder::new()
                    .name("mesh-start".into())
                    .spawn_scoped(scope, work)
            })
            .collect();
        handles
            .into_iter()
            .zip(todo)
            .map(|(h, src)| {
                let failed = |why: &str| match src {
                    Source::Keys(_) => ColdResult::Keys(Err(why.into())),
                    Source::Token(_) => ColdResult::Token(Err(why.into())),
                };
                match h {
                    Ok(h) => h.join().unwrap_or_else(|_| failed("the fetch failed")),
                    Err(e) => failed(&format!("cannot start a thread: {e}")),
                }
            })
            .collect()
    })
}

/// The module's `init_module`, for the new cycle's configuration: in the master, after the
/// listening sockets are open and before the workers fork; at start and at each reload
/// (never for `nginx -t`).
///
/// # Safety
/// nginx passes the new cycle.
pub unsafe fn init_module(cycle: *mut ngx_cycle_t, store: &StoreConf, s: Sources) -> ngx_int_t {
    // SAFETY: nginx's globals are written only during option parsing; the cycle is live.
    let (testing, log) = unsafe { (ngx::ffi::ngx_test_config != 0, (*cycle).log) };
    if testing {
        return Status::NGX_OK.into();
    }
    crate::nginx::no_panic((), || load(store, &s, log));
    Status::NGX_OK.into()
}

fn load(store: &StoreConf, s: &Sources, log: *mut ngx_log_t) {
    let Some(zone) = store.zone() else {
        return;
    };
    let srcs = sources(s);
    let server = s.metadata_server;
    let ids: Vec<String> = srcs.iter().map(|s| s.id(server)).collect();
    let now = now_ms();
    let mut slot_of = vec![usize::MAX; srcs.len()];
    let mut todo: Vec<usize> = Vec::new(); // indices into srcs, one per distinct id
    {
        let Some(mut l) = zone.lock() else {
            return;
        };
        let mut wanted = [false; CAPACITY];
        for id in &ids {
            if let Some(i) = l.find(id) {
                wanted[i] = true;
                l.slots()[i].used_at = now;
            }
        }
        for (i, &wanted) in wanted.iter().enumerate() {
            if drop_at_load(&l.slots()[i].usage(wanted), now) {
                l.clear(i);
            }
        }
        for (k, id) in ids.iter().enumerate() {
            let i = match l.find(id) {
                Some(i) => i,
                None => {
                    let uses: Vec<SlotUse> = (0..CAPACITY)
                        .map(|i| l.slots()[i].usage(wanted[i]))
                        .collect();
                    match l.insert(id, &uses, now) {
                        Some(i) => i,
                        None => continue,
                    }
                }
            };
            wanted[i] = true;
            slot_of[k] = i;
            let s = &l.slots()[i];
            let missing = match srcs[k] {
                Source::Keys(_) => !s.sched.has_result(),
                Source::Token(_) => !s.sched.has_result() || s.exp <= now / 1000 + TOKEN_MIN_LIFE,
            };
            if missing && !todo.iter().any(|&j| slot_of[j] == i) {
                todo.push(k);
            }
        }
    }
    let wait = store.wait();
    if todo.is_empty() || wait.is_zero() {
        return;
    }
    let started = Instant::now();
    let fetch_list: Vec<Source> = todo.iter().map(|&k| srcs[k].clone()).collect();
    let results = cold_fetch(&fetch_list, server, started + wait);
    let took = started.elapsed().as_millis();
    let pid = std::process::id() as u64;
    let now = now_ms();
    let mut lines = Vec::new();
    {
        let Some(mut l) = zone.lock() else {
            return;
        };
        for (&k, result) in todo.iter().zip(&results) {
            let i = slot_of[k];
            // Every source of the configuration that shares this one's slot.
            let sharing: Vec<usize> = (0..srcs.len()).filter(|&j| slot_of[j] == i).collect();
            match result {
                ColdResult::Keys(Ok(fetched)) => {
                    if let Source::Keys(p) = &srcs[k] {
                        let line = publish(&mut l, i, pid, now, Outcome::Keys(p, Ok(fetched)));
                        let ok = line.0 == NGX_LOG_INFO;
                        lines.push(line);
                        // The other providers of the same URL say so too.
                        for &j in sharing.iter().filter(|&&j| j != k) {
                            if let (true, Source::Keys(q)) = (ok, &srcs[j]) {
                                let after = refresh_after(fetched.cache_control.as_deref());
                                let url = q.url.as_ref().map_or("", |u| u.shown.as_str());
                                lines.push((
                                    NGX_LOG_INFO,
                                    format!(
                                        "mesh_provider \"{}\": {} keys from {url}, next refresh in {after}s",
                                        q.name, fetched.count
                                    ),
                                ));
                            }
                        }
                    }
                }
                ColdResult::Token(Ok((token, exp))) => {
                    if let Source::Token(t) = &srcs[k] {
                        let line =
                            publish(&mut l, i, pid, now, Outcome::Token(t, Ok((token, *exp))));
                        lines.push(line);
                    }
                }
                ColdResult::Keys(Err(e)) | ColdResult::Token(Err(e)) => {
                    l.slots()[i].sched.start_failed(now);
                    for &j in &sharing {
                        let line = match &srcs[j] {
                            Source::Keys(p) => format!(
                                "mesh_provider \"{}\": no keys from {} within mesh_keys_wait {}s ({e}); starting without them, the workers keep fetching",
                                p.name,
                                p.url.as_ref().map_or("", |u| u.shown.as_str()),
                                wait.as_secs()
                            ),
                            Source::Token(t) => format!(
                                "mesh_outbound_token \"{}\": no token from the metadata server within mesh_keys_wait {}s ({e}); starting without it, the workers keep fetching",
                                t.audience,
                                wait.as_secs()
                            ),
                        };
                        lines.push((NGX_LOG_WARN, line));
                    }
                }
            }
        }
    }
    let fetched = results
        .iter()
        .filter(|r| matches!(r, ColdResult::Keys(Ok(_)) | ColdResult::Token(Ok(_))))
        .count();
    for (level, line) in lines {
        log_line(log, level, &line);
    }
    log_line(
        log,
        NGX_LOG_INFO,
        &format!(
            "mesh: {} of {} key URLs and outbound tokens fetched before start, in {took}ms",
            fetched,
            todo.len()
        ),
    );
}
