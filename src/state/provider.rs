//! Live key sets: a provider whose keys may be replaced (by the refresher) while workers
//! verify tokens against a snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::provider::{check_key_url, Built};
use mesh_core::refresh::REFETCH_INTERVAL;
use mesh_core::token::Provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::unix_now;
use super::wakeup::WAKEUP;

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
    pub(crate) refetch_wanted: AtomicBool,
    last_refetch: AtomicU64,
}

impl MeshProvider {
    pub fn new(built: Built<KeyUrl>) -> MeshProvider {
        let Built {
            provider,
            algorithms,
            platform_verified,
            url,
        } = built;
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

    pub(crate) fn set_keys(&self, keys: KeySet) {
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
            let _guard = WAKEUP.lock();
            self.refetch_wanted.store(true, Ordering::Release);
            WAKEUP.notify();
        }
    }
}

/// Where a provider's keys come from when they are a URL.
pub struct KeyUrl {
    pub url: String,
    /// Trusted roots for an https URL (from `ca=`, else the system store).
    pub roots: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
}

impl KeyUrl {
    /// A key URL with what it takes to fetch it (trusted roots read now, so `nginx -t` checks
    /// them).
    pub fn new(url: &str, ca: Option<&str>) -> Result<KeyUrl, String> {
        check_key_url(url, ca.is_some())?;
        let roots = if url.starts_with("https://") {
            Some(load_roots(ca).map_err(|e| format!("keys \"{url}\": {e}"))?)
        } else {
            None
        };
        Ok(KeyUrl {
            url: url.to_string(),
            roots,
        })
    }
}

/// Reads trusted roots for an https key URL: `ca=FILE`, else the system store.
pub fn load_roots(ca: Option<&str>) -> Result<Arc<Vec<ureq::tls::Certificate<'static>>>, String> {
    let system = std::env::var("SSL_CERT_FILE").unwrap_or_else(|_| SYSTEM_CA_FILE.into());
    let path = ca.unwrap_or(&system);
    let pem = std::fs::read(path).map_err(|e| format!("cannot read CA file \"{path}\": {e}"))?;
    let mut roots = Vec::new();
    for item in CertificateDer::pem_slice_iter(&pem) {
        let der = item.map_err(|e| format!("CA file \"{path}\": {e}"))?;
        roots.push(ureq::tls::Certificate::from_der(der.as_ref()).to_owned());
    }
    if roots.is_empty() {
        return Err(format!("CA file \"{path}\" holds no certificate"));
    }
    Ok(Arc::new(roots))
}
