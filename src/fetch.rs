//! Keys from URLs and outbound ID tokens, refreshed in the background.
//!
//! Mechanism: one background thread per worker, started after fork (`init_process`), with a
//! blocking HTTP client. Why a thread rather than nginx's event loop: a blocking client with
//! TLS is small and well-tested, and a stalled key server can then never delay a request,
//! because no worker ever waits on it. The rule that makes it sound: the thread never calls
//! nginx. It hands results to the worker through `RwLock<Arc<..>>` swaps (a reader takes a
//! snapshot; the writer holds the lock only to swap a pointer), and queues log lines that the
//! worker writes from a timer on its own event loop (nginx's logging is not thread-safe).
//!
//! Each worker fetches for itself: N workers make N fetches per refresh.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::refresh::{next_backoff, refresh_after, renew_at, unverified_exp, REFETCH_INTERVAL};
use mesh_core::token::Provider;
use ngx::ffi::{NGX_LOG_INFO, NGX_LOG_WARN};

/// Longest a fetch may take, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read (a JWKS is a few KiB).
const MAX_BODY: u64 = 1 << 20;
/// Where the system's CA certificates are on Debian (and most Linux distributions).
const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A trusted issuer whose keys may change while nginx runs.
pub struct MeshProvider {
    pub name: String,
    current: RwLock<Arc<Provider>>,
    /// `algorithms` as configured; `None`: what the current keys allow.
    algorithms: Option<Vec<Algorithm>>,
    /// `platform_verified on`: accept tokens whose signature Cloud Run removed.
    pub platform_verified: bool,
    /// `keys https://...`: where the keys come from.
    pub url: Option<KeyUrl>,
    /// An unknown `kid` asked for a refetch; when the last one was asked (seconds).
    refetch_wanted: AtomicBool,
    last_refetch: AtomicU64,
}

pub struct KeyUrl {
    pub url: String,
    /// Trusted roots for an https URL (from `ca=`, else the system store).
    pub roots: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
}

impl MeshProvider {
    pub fn new(
        provider: Provider,
        algorithms: Option<Vec<Algorithm>>,
        platform_verified: bool,
        url: Option<KeyUrl>,
    ) -> MeshProvider {
        MeshProvider {
            name: provider.name.clone(),
            current: RwLock::new(Arc::new(provider)),
            algorithms,
            platform_verified,
            url,
            refetch_wanted: AtomicBool::new(false),
            last_refetch: AtomicU64::new(0),
        }
    }

    /// The provider as it is now (keys included).
    pub fn snapshot(&self) -> Arc<Provider> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_keys(&self, keys: KeySet) {
        let mut p = (*self.snapshot()).clone();
        p.algorithms = self.algorithms.clone().unwrap_or_else(|| keys.algorithms());
        p.keys = Arc::new(keys);
        let mut slot = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Arc::new(p);
    }

    /// A token named a `kid` we do not have: fetch again now, at most every 30 s.
    pub fn request_refetch(&self) {
        if self.url.is_none() {
            return;
        }
        let now = unix_now();
        let last = self.last_refetch.load(Ordering::Relaxed);
        if now < last + REFETCH_INTERVAL {
            return;
        }
        if self
            .last_refetch
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            // Flag and wake under the thread's lock, which it holds from checking the flags
            // until it waits: a wake-up can then never fall in between and be lost. The
            // thread holds the lock only for that (never while fetching).
            match FETCHER.get() {
                Some(f) => {
                    let _guard = f.lock.lock();
                    self.refetch_wanted.store(true, Ordering::Release);
                    f.wake.notify_one();
                }
                None => self.refetch_wanted.store(true, Ordering::Release),
            }
        }
    }
}

/// `mesh_outbound_token $VAR AUDIENCE;`: a Google ID token for AUDIENCE.
pub struct OutboundToken {
    pub audience: String,
    token: RwLock<Option<(Arc<str>, u64)>>,
    last_warn: AtomicU64,
}

impl OutboundToken {
    pub fn new(audience: String) -> OutboundToken {
        OutboundToken {
            audience,
            token: RwLock::new(None),
            last_warn: AtomicU64::new(0),
        }
    }

    /// The current token, if one is held and not expired.
    pub fn current(&self) -> Option<Arc<str>> {
        let guard = match self.token.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match &*guard {
            Some((t, exp)) if *exp > unix_now() => Some(t.clone()),
            _ => None,
        }
    }

    /// Whether to log that no token is available (at most once a minute per worker).
    pub fn should_warn(&self) -> bool {
        let now = unix_now();
        let last = self.last_warn.load(Ordering::Relaxed);
        now >= last + 60
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn set(&self, token: String, exp: u64) {
        let mut slot = match self.token.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *slot = Some((Arc::from(token), exp));
    }
}

/// Reads trusted roots for an https key URL: `ca=FILE`, else the system store.
pub fn load_roots(ca: Option<&str>) -> Result<Arc<Vec<ureq::tls::Certificate<'static>>>, String> {
    let system = std::env::var("SSL_CERT_FILE").unwrap_or_else(|_| SYSTEM_CA_FILE.into());
    let path = ca.unwrap_or(&system);
    let pem = std::fs::read(path).map_err(|e| format!("cannot read CA file \"{path}\": {e}"))?;
    let mut roots = Vec::new();
    for item in rustls_pemfile::certs(&mut pem.as_slice()) {
        let der = item.map_err(|e| format!("CA file \"{path}\": {e}"))?;
        roots.push(ureq::tls::Certificate::from_der(der.as_ref()).to_owned());
    }
    if roots.is_empty() {
        return Err(format!("CA file \"{path}\" holds no certificate"));
    }
    Ok(Arc::new(roots))
}

/// What the thread works on, and how the worker reaches it.
struct Fetcher {
    providers: Vec<Arc<MeshProvider>>,
    outbound: Vec<Arc<OutboundToken>>,
    metadata_server: String,
    wake: Condvar,
    lock: Mutex<()>,
    /// Log lines for the worker to write: (level, text).
    log: Mutex<Vec<(u32, String)>>,
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
        wake: Condvar::new(),
        lock: Mutex::new(()),
        log: Mutex::new(Vec::new()),
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

/// Log lines queued by the thread since the last call (for the worker's timer to write).
pub fn take_log() -> Vec<(u32, String)> {
    match FETCHER.get() {
        Some(f) => match f.log.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        },
        None => Vec::new(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
        let guard = match f.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
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
                JobKind::Keys(i) => refresh_keys(f, &f.providers[i], job),
                JobKind::Token(i) => refresh_token(f, &agent, &f.outbound[i], job),
            }
            continue;
        }
        let next = jobs
            .iter()
            .map(|j| j.due)
            .min()
            .unwrap_or(now + Duration::from_secs(3600));
        let _ = f
            .wake
            .wait_timeout(guard, next.saturating_duration_since(now));
    }
}

fn new_agent(roots: Option<&Arc<Vec<ureq::tls::Certificate<'static>>>>) -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
    if let Some(roots) = roots {
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(roots.clone()));
    }
    ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(3)
        .user_agent("ngx-mesh")
        .tls_config(tls.build())
        .build()
        .into()
}

fn queue(f: &Fetcher, level: u32, text: String) {
    match f.log.lock() {
        Ok(mut l) => l.push((level, text)),
        Err(p) => p.into_inner().push((level, text)),
    }
}

/// GET `url`; the body and `Cache-Control` of a 200, else why not.
fn get(
    agent: &ureq::Agent,
    url: &str,
    header: Option<(&str, &str)>,
) -> Result<(Vec<u8>, Option<String>), String> {
    let mut req = agent.get(url);
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let mut resp = req.call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let cache_control = resp
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    Ok((body, cache_control))
}

fn refresh_keys(f: &Fetcher, p: &MeshProvider, job: &mut Job) {
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
                f,
                NGX_LOG_INFO,
                format!(
                    "mesh_provider \"{}\": {} keys from {}, next refresh in {after}s",
                    p.name,
                    keys.keys.len(),
                    src.url
                ),
            );
            p.set_keys(keys);
            job.backoff = 0;
            job.due = Instant::now() + Duration::from_secs(after);
        }
        Err(e) => {
            job.backoff = next_backoff(job.backoff);
            let kept = if p.snapshot().keys.is_empty() {
                "no keys yet"
            } else {
                "keeping the last good keys"
            };
            queue(
                f,
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
                f,
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
                f,
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

/// RFC 3986 percent-encoding of a query value.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
