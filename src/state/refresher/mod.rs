//! The refresher: keys from URLs and outbound ID tokens, fetched over the network.
//!
//! Mechanism: one background thread per worker, started after fork (`init_process`), with a
//! blocking HTTP client. Why a thread rather than nginx's event loop: a blocking client with
//! TLS is small and well-tested, and a stalled key server can then never delay a request,
//! because no worker ever waits on it. The rule that makes it sound: the thread never calls
//! nginx. It takes jobs from a queue that the worker fills and hands each result back through
//! a second queue; the worker publishes it to the shared key store from its own event loop
//! (`keystore::timer`), and every worker (this one too) swaps it into its providers and tokens through
//! `RwLock<Arc<..>>` (a reader takes a snapshot; the writer holds the lock only to swap a
//! pointer).
//!
//! Which worker fetches what, and when, is the shared key store's decision (`keystore`): one
//! fetch per refresh for all workers. The master fetches with the same functions before the
//! workers fork (`fetch_keys`, `fetch_token`).

pub(crate) mod http;

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;

use mesh_core::discovery::jwks_uri;
use mesh_core::keys::KeySet;
use mesh_core::refresh::unverified_exp;

pub use self::http::{agent, FETCH_TIMEOUT};
use self::http::{get, percent_encode};
use super::outbound::OutboundToken;
use super::provider::{KeyUrl, MeshProvider};
use super::unix_now;

/// What a worker asks its thread to fetch (claimed in the shared key store).
pub enum Job {
    Keys(Arc<MeshProvider>),
    Token(Arc<OutboundToken>),
}

/// What came of a job, for the worker to publish.
pub enum Done {
    Keys(Arc<MeshProvider>, Result<FetchedKeys, String>),
    Token(Arc<OutboundToken>, Result<(String, u64), String>),
}

/// A good key set as fetched: the bytes (for the shared store), how many keys, and the
/// response's `Cache-Control`.
pub struct FetchedKeys {
    pub body: Vec<u8>,
    pub count: usize,
    pub cache_control: Option<String>,
}

/// The worker's side of its thread.
struct Refresher {
    metadata_server: String,
    jobs: Mutex<VecDeque<Job>>,
    wake: Condvar,
    done: Mutex<Vec<Done>>,
}

static REFRESHER: OnceLock<Arc<Refresher>> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Installs rustls's process-wide crypto provider: aws-lc-rs, which jsonwebtoken links too.
pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Starts this worker's fetch thread (idle until a job comes).
pub fn start_worker(metadata_server: String) -> Result<(), String> {
    install_crypto();
    let refresher = Arc::new(Refresher {
        metadata_server,
        jobs: Mutex::new(VecDeque::new()),
        wake: Condvar::new(),
        done: Mutex::new(Vec::new()),
    });
    if REFRESHER.set(refresher.clone()).is_err() {
        return Err("fetch thread already started".into());
    }
    thread::Builder::new()
        .name("mesh-fetch".into())
        .spawn(move || run(&refresher))
        .map(|_| ())
        .map_err(|e| format!("cannot start the fetch thread: {e}"))
}

/// Queues a job for this worker's thread and wakes it. `false`: no thread runs.
pub fn submit(job: Job) -> bool {
    let Some(r) = REFRESHER.get() else {
        return false;
    };
    lock(&r.jobs).push_back(job);
    r.wake.notify_one();
    true
}

/// Results of the jobs done since the last call.
pub fn take_done() -> Vec<Done> {
    match REFRESHER.get() {
        Some(r) => std::mem::take(&mut *lock(&r.done)),
        None => Vec::new(),
    }
}

fn run(r: &Refresher) {
    loop {
        let job = {
            let mut jobs = lock(&r.jobs);
            loop {
                if let Some(job) = jobs.pop_front() {
                    break job;
                }
                jobs = match r.wake.wait(jobs) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
        };
        let done = match job {
            Job::Keys(p) => {
                // Checked here, used once published: every worker (this one too) then takes
                // the keys from the shared zone, so that they all agree.
                let result = match &p.url {
                    Some(src) => fetch_keys(&agent(src.roots.as_ref(), FETCH_TIMEOUT, false), src),
                    None => Err("no key URL".into()),
                };
                Done::Keys(p, result)
            }
            Job::Token(t) => {
                let result = fetch_token(
                    &agent(None, FETCH_TIMEOUT, false),
                    &r.metadata_server,
                    &t.audience,
                    t.full,
                );
                Done::Token(t, result)
            }
        };
        lock(&r.done).push(done);
    }
}

/// Fetches a key set, checked as the verifier will load it. With `discovery on`, from the
/// `jwks_uri` of the issuer's discovery document: the document is read when this process has
/// no `jwks_uri` from the last 24 hours, or the last key fetch failed.
pub fn fetch_keys(agent: &ureq::Agent, src: &KeyUrl) -> Result<FetchedKeys, String> {
    // The transport's message may quote a URL: never with its secrets.
    let scrub = |e: String, url: &str| mesh_core::provider::scrub_url(&e, url);
    let keys_url = match &src.discovery {
        None => src.url.clone(),
        Some(d) => match d.cached() {
            Some(uri) => uri,
            None => {
                let (doc, _) = get(agent, &src.url, None).map_err(|e| scrub(e, &src.url))?;
                let uri = jwks_uri(&doc, &d.issuer, &src.url).map_err(|e| scrub(e, &src.url))?;
                d.remember(Some(uri.clone()));
                uri
            }
        },
    };
    let fetched = get(agent, &keys_url, None).and_then(|(body, cache_control)| {
        let keys = KeySet::load(&body).map_err(|e| format!("bad key set: {e}"))?;
        Ok((body, cache_control, keys))
    });
    let (body, cache_control, keys) = match (fetched, &src.discovery) {
        (Ok(f), _) => f,
        (Err(e), Some(d)) => {
            d.remember(None);
            let shown = mesh_core::provider::shown_url(&keys_url);
            return Err(format!(
                "{} (from the jwks_uri {shown})",
                scrub(scrub(e, &keys_url), &src.url)
            ));
        }
        (Err(e), None) => return Err(scrub(e, &src.url)),
    };
    Ok(FetchedKeys {
        count: keys.keys.len(),
        body,
        cache_control,
    })
}

/// The metadata server's ID token for `audience` (with `full`, in `format=full`: the Compute
/// claims), and its `exp` (a token already expired is an error).
pub fn fetch_token(
    agent: &ureq::Agent,
    metadata_server: &str,
    audience: &str,
    full: bool,
) -> Result<(String, u64), String> {
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/identity?audience={}{}",
        metadata_server.trim_end_matches('/'),
        percent_encode(audience),
        if full { "&format=full" } else { "" }
    );
    let (body, _) = get(agent, &url, Some(("Metadata-Flavor", "Google")))?;
    let token = String::from_utf8(body).map_err(|_| "token is not text".to_string())?;
    let token = token.trim().to_string();
    let exp = unverified_exp(&token).ok_or("response is not a JWT with exp")?;
    if exp <= unix_now() {
        return Err("the token has already expired".into());
    }
    Ok((token, exp))
}
