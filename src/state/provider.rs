//! Live key sets: a provider whose keys may be replaced (from the shared key store) while
//! workers verify tokens against a snapshot.

use std::sync::{Arc, RwLock};

use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::provider::{check_key_url, Built};
use mesh_core::token::Provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

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
