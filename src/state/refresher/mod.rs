//! The refresher: keys from URLs and outbound ID tokens, fetched again in the background.
//!
//! Mechanism: one background thread per worker, started after fork (`init_process`), with a
//! blocking HTTP client. Why a thread rather than nginx's event loop: a blocking client with
//! TLS is small and well-tested, and a stalled key server can then never delay a request,
//! because no worker ever waits on it. The rule that makes it sound: the thread never calls
//! nginx. It hands results to the worker through `RwLock<Arc<..>>` swaps (a reader takes a
//! snapshot; the writer holds the lock only to swap a pointer), and queues log lines that the
//! worker writes from a timer on its own event loop (`log`; nginx's logging is not
//! thread-safe).
//!
//! Each worker fetches for itself: N workers make N fetches per refresh.

mod http;
pub mod log;

use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use mesh_core::keys::KeySet;
use mesh_core::refresh::{next_backoff, refresh_after, renew_at, unverified_exp};
use ngx::ffi::{NGX_LOG_INFO, NGX_LOG_WARN};
use std::sync::atomic::Ordering;

use self::http::{get, new_agent, percent_encode};
use self::log::queue;
use super::outbound::OutboundToken;
use super::provider::MeshProvider;
use super::unix_now;
use super::wakeup::WAKEUP;

/// What the thread works on, and how the worker reaches it.
struct Fetcher {
    providers: Vec<Arc<MeshProvider>>,
    outbound: Vec<Arc<OutboundToken>>,
    metadata_server: String,
}

static FETCHER: OnceLock<Arc<Fetcher>> = OnceLock::new();

/// Starts this worker's fetch thread, if anything needs fetching.
pub fn start_worker(
    providers: Vec<Arc<MeshProvider>>,
    outbound: Vec<Arc<OutboundToken>>,
    metadata_server: String,
) -> Result<(), String> {
    let providers: Vec<_> = providers.into_iter().filter(|p| p.url.is_some()).collect();
    if providers.is_empty() && outbound.is_empty() {
        return Ok(());
    }
    // rustls needs a process-wide crypto provider: aws-lc-rs, which jsonwebtoken links too.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let fetcher = Arc::new(Fetcher {
        providers,
        outbound,
        metadata_server,
    });
    if FETCHER.set(fetcher.clone()).is_err() {
        return Err("fetch thread already started".into());
    }
    thread::Builder::new()
        .name("mesh-fetch".into())
        .spawn(move || run(&fetcher))
        .map(|_| ())
        .map_err(|e| format!("cannot start the fetch thread: {e}"))
}

/// One thing to refresh and its schedule.
struct Job {
    due: Instant,
    backoff: u64,
    kind: JobKind,
}

enum JobKind {
    Keys(usize),
    Token(usize),
}

fn run(f: &Fetcher) {
    let start = Instant::now();
    let mut jobs: Vec<Job> = (0..f.providers.len())
        .map(|i| Job {
            due: start,
            backoff: 0,
            kind: JobKind::Keys(i),
        })
        .chain((0..f.outbound.len()).map(|i| Job {
            due: start,
            backoff: 0,
            kind: JobKind::Token(i),
        }))
        .collect();
    let agent = new_agent(None);
    loop {
        let guard = WAKEUP.lock();
        // Unknown-kid refetches move their provider's job to now.
        for job in &mut jobs {
            if let JobKind::Keys(i) = job.kind {
                if f.providers[i].refetch_wanted.swap(false, Ordering::Acquire) {
                    job.due = Instant::now();
                }
            }
        }
        let now = Instant::now();
        if let Some(job) = jobs
            .iter_mut()
            .filter(|j| j.due <= now)
            .min_by_key(|j| j.due)
        {
            drop(guard);
            match job.kind {
                JobKind::Keys(i) => refresh_keys(&f.providers[i], job),
                JobKind::Token(i) => refresh_token(f, &agent, &f.outbound[i], job),
            }
            continue;
        }
        let next = jobs
            .iter()
            .map(|j| j.due)
            .min()
            .unwrap_or(now + Duration::from_secs(3600));
        WAKEUP.wait(guard, next.saturating_duration_since(now));
    }
}

fn refresh_keys(p: &MeshProvider, job: &mut Job) {
    let Some(src) = &p.url else {
        job.due = Instant::now() + Duration::from_secs(86400);
        return;
    };
    let agent = new_agent(src.roots.as_ref());
    let result = get(&agent, &src.url, None).and_then(|(body, cc)| {
        KeySet::load(&body)
            .map(|k| (k, cc))
            .map_err(|e| format!("bad key set: {e}"))
    });
    match result {
        Ok((keys, cc)) => {
            let after = refresh_after(cc.as_deref());
            queue(
                NGX_LOG_INFO,
                format!(
                    "mesh_provider \"{}\": {} keys from {}, next refresh in {after}s",
                    p.name,
                    keys.keys.len(),
                    src.url
                ),
            );
            p.set_keys(keys);
            super::metrics::count_key_refresh(&p.name, true, super::unix_now());
            job.backoff = 0;
            job.due = Instant::now() + Duration::from_secs(after);
        }
        Err(e) => {
            super::metrics::count_key_refresh(&p.name, false, 0);
            job.backoff = next_backoff(job.backoff);
            let kept = if p.snapshot().keys.is_empty() {
                "no keys yet"
            } else {
                "keeping the last good keys"
            };
            queue(
                NGX_LOG_WARN,
                format!(
                    "mesh_provider \"{}\": fetching {} failed ({e}); {kept}, retry in {}s",
                    p.name, src.url, job.backoff
                ),
            );
            job.due = Instant::now() + Duration::from_secs(job.backoff);
        }
    }
}

fn refresh_token(f: &Fetcher, agent: &ureq::Agent, t: &OutboundToken, job: &mut Job) {
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/identity?audience={}",
        f.metadata_server.trim_end_matches('/'),
        percent_encode(&t.audience)
    );
    let result = get(agent, &url, Some(("Metadata-Flavor", "Google"))).and_then(|(body, _)| {
        let token = String::from_utf8(body).map_err(|_| "token is not text".to_string())?;
        let token = token.trim().to_string();
        let exp = unverified_exp(&token).ok_or("response is not a JWT with exp")?;
        Ok((token, exp))
    });
    let now = unix_now();
    match result {
        Ok((token, exp)) if exp > now => {
            let at = renew_at(exp, now);
            queue(
                NGX_LOG_INFO,
                format!(
                    "mesh_outbound_token \"{}\": new token, renewed in {}s",
                    t.audience,
                    at - now
                ),
            );
            t.set(token, exp);
            job.backoff = 0;
            job.due = Instant::now() + Duration::from_secs(at - now);
        }
        Ok(_) | Err(_) => {
            let e = match result {
                Err(e) => e,
                Ok(_) => "the token has already expired".into(),
            };
            job.backoff = next_backoff(job.backoff).min(60);
            queue(
                NGX_LOG_WARN,
                format!(
                    "mesh_outbound_token \"{}\": fetching from the metadata server failed ({e}), retry in {}s",
                    t.audience, job.backoff
                ),
            );
            job.due = Instant::now() + Duration::from_secs(job.backoff);
        }
    }
}
