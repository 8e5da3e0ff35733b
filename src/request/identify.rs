//! Who is calling: the token of the request, verified against the location's providers
//! (through this worker's cache of verified tokens), and its audience checked.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mesh_core::cache::TokenCache;
use mesh_core::extract::{bearer, credentials, strip_bearer, Bearer, Credentials};
use mesh_core::status::{AuthError, AuthStatus};
use mesh_core::token::{check_audience, Hashed, Jwt, Provider, Verified};
use ngx::ffi::NGX_LOG_WARN;
use ngx::http::{HttpModuleMainConf, Request};

use crate::conf::{AuthSpec, LocConf};
use crate::MeshModule;

/// The result of identifying the caller under one location's configuration.
pub struct Identity {
    /// The location configuration it was computed under.
    pub conf: *const LocConf,
    pub status: AuthStatus,
    /// Why a token was refused: the `error_description` (never holds token or claims).
    pub reason: String,
    pub verified: Option<Arc<Verified>>,
    /// `mesh_auth optional` is in force.
    pub optional: bool,
}

impl Identity {
    fn new(lcf: &LocConf, status: AuthStatus, optional: bool) -> Self {
        Identity {
            conf: lcf,
            status,
            reason: String::new(),
            verified: None,
            optional,
        }
    }

    fn refused(mut self, e: AuthError) -> Self {
        self.status = e.status;
        self.reason = e.reason;
        self
    }

    pub fn principal(&self) -> Option<&str> {
        self.verified.as_ref().map(|v| v.principal.as_str())
    }

    /// `$mesh_caller`: the principal, or empty.
    pub fn caller(&self) -> &str {
        self.principal().unwrap_or("")
    }

    /// `$mesh_provider`: the provider that verified the caller, or empty.
    pub fn provider(&self) -> &str {
        self.verified.as_ref().map_or("", |v| v.provider.as_str())
    }

    /// Whether the request may go on to be authorized (verified, anonymous under `optional`,
    /// or no authentication here).
    pub fn passes(&self) -> bool {
        match self.status {
            AuthStatus::Off | AuthStatus::Verified => true,
            AuthStatus::Missing => self.optional,
            _ => false,
        }
    }
}

thread_local! {
    /// Verified tokens of this worker. nginx runs request handlers on one thread per worker
    /// process, so a thread-local is the worker's own cache, shared by nothing else.
    static TOKEN_CACHE: RefCell<Option<TokenCache>> = const { RefCell::new(None) };
}

/// Whether two locations would identify a caller the same way.
pub fn same_identity_settings(a: &LocConf, b: &LocConf) -> bool {
    fn names(c: &LocConf) -> Option<(bool, &[String])> {
        c.auth.as_ref().map(|s| (s.optional, s.names.as_slice()))
    }
    names(a) == names(b) && a.audience == b.audience && a.token == b.token
}

pub fn identify(r: &Request, lcf: &LocConf) -> Identity {
    let Some(auth) = lcf.auth.as_deref() else {
        return Identity::new(lcf, AuthStatus::Off, false);
    };
    let Some(mcf) = MeshModule::main_conf(r) else {
        return Identity::new(lcf, AuthStatus::Off, false);
    };
    let id = Identity::new(lcf, AuthStatus::Missing, auth.optional);
    let found = credentials_of(r);
    // Whatever `mesh_token` names: the upstream would see both, and may read the other one.
    if let Some(name) = found.repeated {
        return id.refused(AuthError {
            status: AuthStatus::Malformed,
            reason: format!("two {name} headers"),
        });
    }
    let token = match token_from(r, lcf, &found) {
        Ok(Some(t)) => t,
        Ok(None) => return id,
        Err(e) => return id.refused(e),
    };
    let now = ngx::ffi::ngx_time().max(0) as u64;
    // Keys another worker published since this worker's timer last looked (no snapshot
    // is kept: on a cache hit only the verifying provider's current keys are read again).
    let no_keys_yet = |m: &Arc<crate::state::provider::MeshProvider>| {
        m.url.is_some() && m.snapshot().keys.is_empty()
    };
    if auth.providers.iter().any(no_keys_yet) {
        crate::state::keystore::catch_up();
    }
    // Hashed once: the cache key, and for RS256/PS256/ES256 the digest a miss verifies.
    let hashed = Hashed::new(token);
    // The verified token, and which of the location's providers verified it.
    let verified: Result<(Arc<Verified>, usize), AuthError> = TOKEN_CACHE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let cache = cell.get_or_insert_with(|| TokenCache::new(mcf.token_cache));
        // A hit counts only while the provider's current keys hold the key that verified
        // it: a key withdrawn (rotated out, compromised) stops its cached tokens at once.
        let hit = cache.lookup_checked(&hashed, now, |v| {
            auth.providers
                .iter()
                .find(|m| m.name == v.provider)
                .is_none_or(|m| v.key_still_held(&m.snapshot().keys))
        });
        // A hit answers only for the provider an uncached check would pick here: the same
        // token cached by another location's provider of that issuer is verified again.
        if let Some(v) = hit {
            let decides = v
                .issuer()
                .and_then(|iss| deciding_index(auth, iss, hashed.is_signature_removed()));
            if let Some(i) = decides.filter(|&i| auth.providers[i].name == v.provider) {
                crate::state::metrics::count_token_cache(true);
                return Ok((v.clone(), i));
            }
        }
        crate::state::metrics::count_token_cache(false);
        let (v, i) = verify_any(r, &hashed, auth, now)?;
        let v = Arc::new(v);
        cache.insert(&hashed, v.clone());
        Ok((v, i))
    });
    let (verified, provider) = match verified {
        Ok(v) => v,
        Err(e) => return id.refused(e),
    };
    let accepted = match &lcf.audience {
        Some(a) => a.as_slice(),
        None => auth.audiences.get(provider).map_or(&[][..], Vec::as_slice),
    };
    if let Err(e) = check_audience(&verified, accepted) {
        return id.refused(e);
    }
    Identity {
        status: AuthStatus::Verified,
        verified: Some(verified),
        ..id
    }
}

/// Which of the location's providers decides a token of issuer `iss`: the first that accepts
/// the issuer, among those with `platform_verified on` when Cloud Run removed the signature.
/// The rule `verify_any` follows (it hands `Jwt::check` those candidates, and the core's
/// `deciding_provider` takes the first of the issuer).
fn deciding_index(auth: &AuthSpec, iss: &str, signature_removed: bool) -> Option<usize> {
    auth.providers.iter().position(|m| {
        (!signature_removed || m.platform_verified) && m.snapshot().accepts_issuer(iss)
    })
}

/// Verifies a token (decoded once) against the location's providers, on a snapshot of each
/// (keys fetched from URLs may change between requests); the verified token and the index
/// of the provider that verified it. A token whose signature Cloud Run removed (it checked
/// the token before the request arrived) is accepted only by providers with
/// `platform_verified on`; with none, it is refused and the first such token of the worker
/// logs how to deploy.
fn verify_any(
    r: &Request,
    token: &Hashed,
    auth: &AuthSpec,
    now: u64,
) -> Result<(Verified, usize), AuthError> {
    let jwt = Jwt::decode_hashed(token)?;
    let snapshots: Vec<Arc<Provider>> = auth.providers.iter().map(|p| p.snapshot()).collect();
    let checked = if !jwt.is_signature_removed() {
        let all: Vec<&Provider> = snapshots.iter().map(|p| &**p).collect();
        jwt.check(&all, now)
    } else {
        let trusted: Vec<&Provider> = auth
            .providers
            .iter()
            .zip(&snapshots)
            .filter(|(m, _)| m.platform_verified)
            .map(|(_, p)| &**p)
            .collect();
        if trusted.is_empty() {
            if !PLATFORM_WARNED.swap(true, Ordering::Relaxed) {
                ngx::ngx_log_error!(
                    NGX_LOG_WARN,
                    r.log(),
                    "mesh: a token arrived with its signature removed by Google (SIGNATURE_REMOVED_BY_GOOGLE): Cloud Run's invoker check verified it before it reached nginx and stripped the signature. Either turn the invoker check off (gcloud run services update SERVICE --no-invoker-iam-check) so nginx verifies every token itself, or trust the platform with \"platform_verified on;\" in the mesh_provider block"
                );
            }
            return Err(AuthError {
                status: AuthStatus::BadSignature,
                reason: "signature removed by the platform; platform_verified is off".into(),
            });
        }
        jwt.check_platform(&trusted, now)
    };
    match checked {
        Ok(p) => {
            let i = auth
                .providers
                .iter()
                .position(|m| m.name == p.name)
                .unwrap_or(0);
            Ok((jwt.into_verified(p), i))
        }
        Err(e) => {
            if e.status == AuthStatus::UnknownKey {
                // Maybe the issuer rotated its keys: fetch that provider's keys again
                // (rate-limited, in the background; this request is answered now).
                if let Some(iss) = jwt.issuer() {
                    auth.providers
                        .iter()
                        .zip(&snapshots)
                        .filter(|(_, p)| p.accepts_issuer(iss))
                        .for_each(|(m, _)| crate::state::keystore::request_refetch(m));
                }
            }
            Err(e)
        }
    }
}

/// Whether this worker already explained `SIGNATURE_REMOVED_BY_GOOGLE` (once per worker).
static PLATFORM_WARNED: AtomicBool = AtomicBool::new(false);

/// The request's credential headers, in one pass over its headers.
fn credentials_of(r: &Request) -> Credentials<'_> {
    credentials(
        r.headers_in_iterator()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
    )
}

/// The token of the request: `mesh_token` if set, else the Bearer token of
/// `X-Serverless-Authorization` (what Cloud Run forwards when `Authorization` carries the
/// app's own credentials), else of `Authorization`.
pub(crate) fn token_of<'a>(r: &'a Request, lcf: &LocConf) -> Result<Option<&'a [u8]>, AuthError> {
    token_from(r, lcf, &credentials_of(r))
}

/// [`token_of`], the credential headers already read.
fn token_from<'a>(
    r: &'a Request,
    lcf: &LocConf,
    found: &Credentials<'a>,
) -> Result<Option<&'a [u8]>, AuthError> {
    if let Some(cv) = lcf.token {
        // SAFETY: the complex value was compiled at configuration time into the configuration
        // pool, which outlives every request.
        let value = r.get_complex_value(unsafe { cv.as_ref() });
        let token = value.map_or(&[][..], |v| strip_bearer(v.as_bytes()));
        return Ok((!token.is_empty()).then_some(token));
    }
    for v in [found.serverless, found.authorization]
        .into_iter()
        .flatten()
    {
        match bearer(v) {
            Bearer::Token(t) => return Ok(Some(t)),
            Bearer::Empty => {
                return Err(AuthError {
                    status: AuthStatus::Malformed,
                    reason: "empty bearer token".into(),
                })
            }
            Bearer::OtherScheme => {}
        }
    }
    Ok(None)
}
