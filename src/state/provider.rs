//! Live key sets: a provider whose keys may be replaced (from the shared key store) while
//! workers verify tokens against a snapshot.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mesh_core::discovery::DOCUMENT_MAX_AGE_SECS;
use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::provider::{check_key_url, shown_url, Built};
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
    /// `keys FILE` or `secret FILE`: the file (for the access report; never its contents).
    pub key_file: Option<mesh_core::report::KeySource>,
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
            key_file: None,
        }
    }

    /// `algorithms` as configured (or preset); `None`: what the keys allow.
    pub fn configured_algorithms(&self) -> Option<&[Algorithm]> {
        self.algorithms.as_deref()
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
    /// The key URL, or with `discovery on` the issuer's discovery document.
    pub url: String,
    /// Trusted roots for an https URL (from `ca=`, else the system store).
    pub roots: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
    /// The URL as logs show it: userinfo and query values replaced by `***`.
    pub shown: String,
    /// `discovery on`: the keys are at the document's `jwks_uri`.
    pub discovery: Option<Discovery>,
}

/// `discovery on`: the issuer the document must name, and the `jwks_uri` it gave this process
/// (with when it was read).
pub struct Discovery {
    pub issuer: String,
    jwks_uri: Mutex<Option<(String, Instant)>>,
}

impl Discovery {
    /// The `jwks_uri` read within [`DOCUMENT_MAX_AGE_SECS`], if any.
    pub fn cached(&self) -> Option<String> {
        let slot = self.jwks_uri.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(DOCUMENT_MAX_AGE_SECS))
            .map(|(uri, _)| uri.clone())
    }

    /// Remembers the `jwks_uri` just read, or (`None`) forgets it so that the next fetch reads
    /// the document again.
    pub fn remember(&self, uri: Option<String>) {
        let mut slot = self.jwks_uri.lock().unwrap_or_else(|p| p.into_inner());
        *slot = uri.map(|u| (u, Instant::now()));
    }
}

impl KeyUrl {
    /// A key URL with what it takes to fetch it (trusted roots read now, so `nginx -t` checks
    /// them).
    pub fn new(url: &str, ca: Option<&str>) -> Result<KeyUrl, String> {
        check_key_url(url, ca.is_some())?;
        let roots = if url.starts_with("https://") {
            Some(load_roots(ca).map_err(|e| format!("keys \"{}\": {e}", shown_url(url)))?)
        } else {
            None
        };
        Ok(KeyUrl {
            url: url.to_string(),
            roots,
            shown: shown_url(url),
            discovery: None,
        })
    }

    /// `discovery on`: the issuer's discovery document (`document`), which must name `issuer`;
    /// `ca` is trusted for the document and the keys.
    pub fn discovery(document: &str, issuer: &str, ca: Option<&str>) -> Result<KeyUrl, String> {
        let mut url = KeyUrl::new(document, ca)?;
        url.discovery = Some(Discovery {
            issuer: issuer.to_string(),
            jwks_uri: Mutex::new(None),
        });
        Ok(url)
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
