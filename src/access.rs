//! The request pipeline in nginx's access phase: identify the caller, then decide.
//!
//! What was found is kept in a request context, computed on first use: by the access handler
//! or by a `$mesh_*` variable read earlier (in `map`, `set`, a rewrite-phase `if`). So every
//! variable sees the same answer in every phase.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;

use mesh_core::cache::TokenCache;
use mesh_core::extract::{bearer, strip_bearer, Bearer};
use mesh_core::status::{AuthError, AuthStatus};
use mesh_core::token::{check_audience, verify, Provider, Verified};
use ngx::core::Status;
use ngx::ffi::{
    ngx_http_request_t, ngx_int_t, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_SERVICE_UNAVAILABLE,
    NGX_HTTP_UNAUTHORIZED, NGX_LOG_INFO,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, Request};

use crate::conf::{LocConf, MainConf};
use crate::ngx_util::{add_header_out, header_in, no_panic};
use crate::MeshModule;

/// Seconds a client is told to wait when a provider has no keys yet.
const NO_KEYS_RETRY_AFTER: &str = "10";

/// What the module decided for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Unauthenticated,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Unauthenticated => "unauthenticated",
        }
    }
}

/// Everything the module learned about one request.
pub struct RequestCtx {
    pub status: AuthStatus,
    /// Why a token was refused: the `error_description` (never holds token or claims).
    pub reason: String,
    pub verified: Option<Arc<Verified>>,
    /// `mesh_auth optional` and no token: an anonymous caller that may pass.
    pub optional: bool,
}

impl RequestCtx {
    fn new(status: AuthStatus, optional: bool) -> Self {
        RequestCtx {
            status,
            reason: String::new(),
            verified: None,
            optional,
        }
    }

    pub fn decision(&self) -> Option<Decision> {
        match self.status {
            AuthStatus::Off => None,
            AuthStatus::Verified => Some(Decision::Allow),
            AuthStatus::Missing if self.optional => Some(Decision::Allow),
            _ => Some(Decision::Unauthenticated),
        }
    }

    pub fn caller(&self) -> &str {
        self.verified.as_ref().map_or("", |v| v.principal.as_str())
    }

    pub fn provider(&self) -> &str {
        self.verified.as_ref().map_or("", |v| v.provider.as_str())
    }
}

thread_local! {
    /// Verified tokens of this worker. nginx runs request handlers on one thread per worker
    /// process, so a thread-local is the worker's own cache, shared by nothing else.
    static TOKEN_CACHE: RefCell<Option<TokenCache>> = const { RefCell::new(None) };
}

/// The request's context, created (and the caller identified) on first use.
pub fn request_ctx(r: &mut Request) -> Option<&RequestCtx> {
    let module = MeshModule::module();
    if let Some(ctx) = r.get_module_ctx::<RequestCtx>(module) {
        // SAFETY: the pointer was set below and lives in the request pool; re-borrow it with
        // the request's lifetime.
        return Some(unsafe { &*(ctx as *const RequestCtx) });
    }
    let mcf = MeshModule::main_conf(r)?;
    let lcf = MeshModule::location_conf(r)?;
    let ctx = identify(r, mcf, lcf);
    let p = r.pool().allocate(ctx);
    if p.is_null() {
        return None;
    }
    r.set_module_ctx(p.cast::<c_void>(), module);
    // SAFETY: `p` was just allocated and initialized in the request pool, which drops it
    // only when the request is freed.
    Some(unsafe { &*p })
}

fn identify(r: &Request, mcf: &MainConf, lcf: &LocConf) -> RequestCtx {
    let Some(auth) = lcf.auth() else {
        return RequestCtx::new(AuthStatus::Off, false);
    };
    let mut ctx = RequestCtx::new(AuthStatus::Missing, auth.optional);
    let token = match token_of(r, lcf) {
        Ok(Some(t)) => t,
        Ok(None) => {
            ctx.reason = "no token".into();
            return ctx;
        }
        Err(e) => return refused(ctx, e),
    };
    let now = ngx::ffi::ngx_time().max(0) as u64;
    let verified = TOKEN_CACHE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let cache = cell.get_or_insert_with(|| TokenCache::new(mcf.token_cache_size()));
        if let Some(v) = cache.get(token, now) {
            if auth.providers.iter().any(|p| p.name == v.provider) {
                return Ok(v);
            }
        }
        let candidates: Vec<&Provider> = auth.providers.iter().map(|p| &**p).collect();
        let v = Arc::new(verify(token, &candidates, now)?);
        cache.put(token, v.clone());
        Ok(v)
    });
    let verified = match verified {
        Ok(v) => v,
        Err(e) => return refused(ctx, e),
    };
    let accepted = match &lcf.audience {
        Some(a) => a.as_slice(),
        None => auth
            .providers
            .iter()
            .find(|p| p.name == verified.provider)
            .map_or(&[][..], |p| p.audiences.as_slice()),
    };
    if let Err(e) = check_audience(&verified, accepted) {
        return refused(ctx, e);
    }
    ctx.status = AuthStatus::Verified;
    ctx.verified = Some(verified);
    ctx
}

fn refused(mut ctx: RequestCtx, e: AuthError) -> RequestCtx {
    ctx.status = e.status;
    ctx.reason = e.reason;
    ctx
}

/// The token of the request: `mesh_token` if set, else the Bearer token of
/// `X-Serverless-Authorization` (what Cloud Run forwards when `Authorization` carries the
/// app's own credentials), else of `Authorization`.
fn token_of<'a>(r: &'a Request, lcf: &LocConf) -> Result<Option<&'a [u8]>, AuthError> {
    if let Some(cv) = lcf.token {
        // SAFETY: the complex value was compiled at configuration time into the configuration
        // pool, which outlives every request.
        let value = r.get_complex_value(unsafe { cv.as_ref() });
        let token = value.map_or(&[][..], |v| strip_bearer(v.as_bytes()));
        return Ok((!token.is_empty()).then_some(token));
    }
    for name in ["X-Serverless-Authorization", "Authorization"] {
        if let Some(v) = header_in(r, name) {
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
    }
    Ok(None)
}

/// The access-phase handler: refuses what the pipeline refused, with the response SPEC gives.
pub unsafe extern "C" fn access_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request.
        let r = unsafe { Request::from_ngx_http_request(r) };
        let Some(lcf) = MeshModule::location_conf(r) else {
            return Status::NGX_DECLINED.into();
        };
        if lcf.auth().is_none() {
            return Status::NGX_DECLINED.into();
        }
        let realm = lcf.realm().to_string();
        let Some(ctx) = request_ctx(r) else {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        };
        match (ctx.status, ctx.decision()) {
            (AuthStatus::Verified, _) => Status::NGX_OK.into(),
            // Anonymous under `optional`: not an authentication, so `satisfy any` still asks
            // the other access modules.
            (_, Some(Decision::Allow)) => Status::NGX_DECLINED.into(),
            (status, _) => {
                let reason = ctx.reason.clone();
                refuse(r, status, &reason, &realm)
            }
        }
    })
}

fn refuse(r: &mut Request, status: AuthStatus, reason: &str, realm: &str) -> ngx_int_t {
    let code = if status == AuthStatus::NoKeys {
        add_header_out(r, "Retry-After", NO_KEYS_RETRY_AFTER);
        NGX_HTTP_SERVICE_UNAVAILABLE
    } else {
        let challenge = if status == AuthStatus::Missing {
            format!("Bearer realm=\"{realm}\"")
        } else {
            format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{reason}\""
            )
        };
        add_header_out(r, "WWW-Authenticate", &challenge);
        NGX_HTTP_UNAUTHORIZED
    };
    ngx::ngx_log_error!(
        NGX_LOG_INFO,
        r.log(),
        "mesh: refused {code} unauthenticated: {} ({reason}), caller: -, rule: -, trace: -",
        status.as_str()
    );
    code as ngx_int_t
}
