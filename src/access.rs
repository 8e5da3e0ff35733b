//! The request pipeline in nginx's access phase: identify → authorize → limit.
//!
//! What was found is kept in a request context, computed on first use: by the access handler
//! or by a `$mesh_*` variable read earlier (in `map`, `set`, a rewrite-phase `if`), so every
//! variable sees the same answer in every phase. The context survives internal redirects
//! (`error_page`, `try_files`, `index`): a request is charged against a rate-limit zone once,
//! however many locations it passes through.

use std::cell::RefCell;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mesh_core::cache::TokenCache;
use mesh_core::extract::{bearer, strip_bearer, Bearer};
use mesh_core::gcra::{policy_header, ratelimit_header, retry_after_secs, Gcra};
use mesh_core::policy::{decide, roles_of, Caller, Verdict};
use mesh_core::ratetable::key_hash;
use mesh_core::status::{AuthError, AuthStatus};
use mesh_core::token::{
    check_audience, is_signature_removed, unverified_issuer, verify, verify_platform, Provider,
    Verified,
};
use ngx::core::Status;
use ngx::ffi::{
    ngx_http_request_t, ngx_int_t, ngx_pool_cleanup_add, NGX_HTTP_FORBIDDEN,
    NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_SERVICE_UNAVAILABLE, NGX_HTTP_UNAUTHORIZED,
    NGX_LOG_INFO, NGX_LOG_WARN,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, Request};

use crate::conf::{AuthSpec, LocConf, RateLimit};
use crate::forward::{self, Trace};
use crate::ngx_util::{add_header_out, header_in, no_panic};
use crate::MeshModule;

/// Seconds a client is told to wait when a provider has no keys yet.
const NO_KEYS_RETRY_AFTER: &str = "10";
/// `mesh_rate_limit_status` default.
const DEFAULT_RATE_STATUS: u16 = 429;

/// What the module decided for a request (`$mesh_decision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    Unauthenticated,
    RateLimited,
    WouldDeny,
    WouldRateLimit,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Unauthenticated => "unauthenticated",
            Decision::RateLimited => "rate_limited",
            Decision::WouldDeny => "would_deny",
            Decision::WouldRateLimit => "would_rate_limit",
        }
    }
}

/// Everything the module learned about one request.
pub struct RequestCtx {
    /// The request this context belongs to (subrequests share the pool, not the context).
    owner: *const ngx_http_request_t,
    /// The location configuration the identity was computed under.
    identity_conf: *const LocConf,
    pub status: AuthStatus,
    /// Why a token was refused: the `error_description` (never holds token or claims).
    pub reason: String,
    pub verified: Option<Arc<Verified>>,
    /// `mesh_auth optional` is in force.
    pub optional: bool,
    /// The caller's roles, joined by `,` (computed with the decision).
    pub roles: String,
    /// Set by the access phase; before it, derived from the identity.
    pub decision: Option<Decision>,
    /// The rule that decided (`$mesh_rule`), as written with its file:line.
    pub rule: String,
    /// Rate-limit zones this request was already charged in (by address).
    charged: Vec<*const c_void>,
    /// This hop's trace (`mesh_trace on`), started on first use; kept across redirects.
    pub trace: Option<Trace>,
}

impl RequestCtx {
    pub fn decision(&self) -> Option<Decision> {
        if self.decision.is_some() {
            return self.decision;
        }
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

    fn set_identity(&mut self, id: Identity, lcf: &LocConf) {
        self.identity_conf = lcf;
        self.status = id.status;
        self.reason = id.reason;
        self.verified = id.verified;
        self.optional = id.optional;
        self.decision = None;
        self.rule.clear();
        self.roles.clear();
    }
}

/// The result of identifying the caller under one location's configuration.
struct Identity {
    status: AuthStatus,
    reason: String,
    verified: Option<Arc<Verified>>,
    optional: bool,
}

impl Identity {
    fn new(status: AuthStatus, optional: bool) -> Self {
        Identity {
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
}

thread_local! {
    /// Verified tokens of this worker. nginx runs request handlers on one thread per worker
    /// process, so a thread-local is the worker's own cache, shared by nothing else.
    static TOKEN_CACHE: RefCell<Option<TokenCache>> = const { RefCell::new(None) };
}

/// Drops the context when the request pool is freed.
unsafe extern "C" fn ctx_cleanup(data: *mut c_void) {
    // SAFETY: `data` is the RequestCtx written in `request_ctx`, dropped exactly once here.
    unsafe { ptr::drop_in_place(data.cast::<RequestCtx>()) }
}

/// The request's context: found again after an internal redirect (nginx clears `r->ctx`
/// then, so it is looked up through the pool's cleanup list, as nginx's realip module does),
/// or created with the caller identified. Re-identifies when the location's identity
/// settings differ from those it was computed under.
pub fn request_ctx(r: &mut Request) -> Option<&mut RequestCtx> {
    let module = MeshModule::module();
    let lcf = MeshModule::location_conf(r)?;
    let raw: *mut ngx_http_request_t = r.into();
    let mut ctx = r
        .get_module_ctx::<RequestCtx>(module)
        .map_or(ptr::null_mut(), |c| {
            c as *const RequestCtx as *mut RequestCtx
        });
    if ctx.is_null() {
        // SAFETY: the cleanup list of the live request pool is a well-formed linked list;
        // a handler equal to `ctx_cleanup` marks data written by this module as a RequestCtx.
        unsafe {
            let mut cln = (*(*raw).pool).cleanup;
            while !cln.is_null() {
                let ours = (*cln).handler.is_some_and(|h| {
                    ptr::fn_addr_eq(h, ctx_cleanup as unsafe extern "C" fn(*mut c_void))
                });
                if ours && (*(*cln).data.cast::<RequestCtx>()).owner == raw.cast_const() {
                    ctx = (*cln).data.cast();
                    r.set_module_ctx(ctx.cast(), module);
                    break;
                }
                cln = (*cln).next;
            }
        }
    }
    if !ctx.is_null() {
        // SAFETY: `ctx` points at a live RequestCtx in the request pool; nginx handles one
        // request on one thread, and no other reference to it is alive across this call.
        let ctx = unsafe { &mut *ctx };
        let old = ctx.identity_conf;
        if !ptr::eq(old, lcf) {
            // SAFETY: configurations live for the whole cycle.
            let same = unsafe { old.as_ref() }.is_some_and(|o| same_identity_settings(o, lcf));
            if !same {
                let id = identify(r, lcf);
                ctx.set_identity(id, lcf);
            }
        }
        return Some(ctx);
    }
    let id = identify(r, lcf);
    // SAFETY: the cleanup entry gets a properly sized, aligned block from the request pool;
    // it is initialised before the handler is set, and dropped by that handler only.
    unsafe {
        let cln = ngx_pool_cleanup_add((*raw).pool, size_of::<RequestCtx>());
        if cln.is_null() {
            return None;
        }
        let p = (*cln).data.cast::<RequestCtx>();
        ptr::write(
            p,
            RequestCtx {
                owner: raw,
                identity_conf: ptr::null(),
                status: AuthStatus::Off,
                reason: String::new(),
                verified: None,
                optional: false,
                roles: String::new(),
                decision: None,
                rule: String::new(),
                charged: Vec::new(),
                trace: None,
            },
        );
        (*cln).handler = Some(ctx_cleanup);
        (*p).set_identity(id, lcf);
        r.set_module_ctx(p.cast(), module);
        Some(&mut *p)
    }
}

/// Whether two locations would identify a caller the same way.
fn same_identity_settings(a: &LocConf, b: &LocConf) -> bool {
    let names = |c: &LocConf| {
        c.auth().map(|s| {
            (
                s.optional,
                s.providers
                    .iter()
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>(),
            )
        })
    };
    names(a) == names(b) && a.audience == b.audience && a.token == b.token
}

fn identify(r: &Request, lcf: &LocConf) -> Identity {
    let Some(auth) = lcf.auth() else {
        return Identity::new(AuthStatus::Off, false);
    };
    let Some(mcf) = MeshModule::main_conf(r) else {
        return Identity::new(AuthStatus::Off, false);
    };
    let id = Identity::new(AuthStatus::Missing, auth.optional);
    let token = match token_of(r, lcf) {
        Ok(Some(t)) => t,
        Ok(None) => return id,
        Err(e) => return id.refused(e),
    };
    let now = ngx::ffi::ngx_time().max(0) as u64;
    // Snapshots: keys fetched from URLs may change between requests.
    let snapshots: Vec<Arc<Provider>> = auth.providers.iter().map(|p| p.snapshot()).collect();
    let verified: Result<Arc<Verified>, AuthError> = TOKEN_CACHE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let cache = cell.get_or_insert_with(|| TokenCache::new(mcf.token_cache_size()));
        if let Some(v) = cache.get(token, now) {
            if auth.providers.iter().any(|p| p.name == v.provider) {
                return Ok(v);
            }
        }
        let v = Arc::new(verify_any(r, token, auth, &snapshots, now)?);
        cache.put(token, v.clone());
        Ok(v)
    });
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            if e.status == AuthStatus::UnknownKey {
                // Maybe the issuer rotated its keys: fetch that provider's keys again
                // (rate-limited, in the background; this request is answered now).
                if let Some(iss) = unverified_issuer(token) {
                    auth.providers
                        .iter()
                        .zip(&snapshots)
                        .filter(|(_, p)| p.issuers.contains(&iss))
                        .for_each(|(m, _)| m.request_refetch());
                }
            }
            return id.refused(e);
        }
    };
    let accepted = match &lcf.audience {
        Some(a) => a.as_slice(),
        None => snapshots
            .iter()
            .find(|p| p.name == verified.provider)
            .map_or(&[][..], |p| p.audiences.as_slice()),
    };
    if let Err(e) = check_audience(&verified, accepted) {
        return id.refused(e);
    }
    Identity {
        status: AuthStatus::Verified,
        reason: String::new(),
        verified: Some(verified),
        optional: auth.optional,
    }
}

/// Verifies a token against the location's providers. A token whose signature Cloud Run
/// removed (it checked the token before the request arrived) is accepted only by providers
/// with `platform_verified on`; with none, it is refused and the first such token of the
/// worker logs how to deploy.
fn verify_any(
    r: &Request,
    token: &[u8],
    auth: &AuthSpec,
    snapshots: &[Arc<Provider>],
    now: u64,
) -> Result<Verified, AuthError> {
    let all: Vec<&Provider> = snapshots.iter().map(|p| &**p).collect();
    if !is_signature_removed(token) {
        return verify(token, &all, now);
    }
    let trusted: Vec<&Provider> = auth
        .providers
        .iter()
        .zip(snapshots)
        .filter(|(m, _)| m.platform_verified)
        .map(|(_, p)| &**p)
        .collect();
    if !trusted.is_empty() {
        return verify_platform(token, &trusted, now);
    }
    if !PLATFORM_WARNED.swap(true, Ordering::Relaxed) {
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            r.log(),
            "mesh: a token arrived with its signature removed by Google (SIGNATURE_REMOVED_BY_GOOGLE): Cloud Run's invoker check verified it before it reached nginx and stripped the signature. Either turn the invoker check off (gcloud run services update SERVICE --no-invoker-iam-check) so nginx verifies every token itself, or trust the platform with \"platform_verified on;\" in the mesh_provider block"
        );
    }
    Err(AuthError {
        status: AuthStatus::BadSignature,
        reason: "signature removed by the platform; platform_verified is off".into(),
    })
}

/// Whether this worker already explained `SIGNATURE_REMOVED_BY_GOOGLE` (once per worker).
static PLATFORM_WARNED: AtomicBool = AtomicBool::new(false);

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

/// The access-phase handler. Returns what nginx's `satisfy` expects: `NGX_OK` when this
/// module positively allowed the request, `NGX_DECLINED` when it has no opinion, 401/403 for
/// refusals that `satisfy any` may overrule, and the rate-limit status, which it may not.
pub unsafe extern "C" fn access_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request.
        let r = unsafe { Request::from_ngx_http_request(r) };
        let Some(lcf) = MeshModule::location_conf(r) else {
            return Status::NGX_DECLINED.into();
        };
        let decides = lcf.auth().is_some() || lcf.rules.is_some() || lcf.rate_limit.is_some();
        let forwards = lcf.trace == Some(true) || lcf.forward_identity == Some(true);
        if !r.is_main() || (!decides && !forwards) {
            // nginx skips the access phase for subrequests; a main request with nothing to
            // decide or forward costs nothing more.
            return Status::NGX_DECLINED.into();
        }
        pipeline(r, lcf)
    })
}

/// identify → authorize → limit. A request refused at one step is not counted by the next.
fn pipeline(r: &mut Request, lcf: &LocConf) -> ngx_int_t {
    let raw: *mut ngx_http_request_t = (&mut *r).into();
    let Some(ctx) = request_ctx(r) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    // SAFETY: the context lives in the request pool, apart from `r`'s own fields; holding it
    // across calls that take `r` is sound because none of them touches the context.
    let ctx: &mut RequestCtx = unsafe { &mut *(ctx as *mut RequestCtx) };
    // SAFETY: `raw` is the live request `r` points at.
    let r = unsafe { Request::from_ngx_http_request(raw) };
    if lcf.trace == Some(true) && ctx.trace.is_none() {
        ctx.trace = forward::start(r, lcf);
    }

    // 1. identify
    match ctx.status {
        AuthStatus::Off | AuthStatus::Verified => {}
        AuthStatus::Missing if ctx.optional => {}
        status => {
            ctx.decision = Some(Decision::Unauthenticated);
            let code = refuse_unauthenticated(r, status, &ctx.reason, lcf.realm());
            log_refusal(r, ctx, code, status.as_str());
            return code;
        }
    }

    // 2. authorize
    let verified = ctx.verified.clone();
    let principal = verified.as_ref().map(|v| v.principal.as_str());
    let claims = verified.as_ref().map(|v| &v.claims);
    let roles = roles_of(lcf.roles(), principal, claims);
    ctx.roles = roles.join(",");
    let caller = Caller {
        principal,
        claims,
        roles: &roles,
    };
    let method = r.method();
    let (allowed_by_rule, denied) = match decide(lcf.rules(), &caller, method.as_str()) {
        Verdict::NoRules => (false, None),
        Verdict::Allowed(rule) => {
            ctx.rule = rule.text.clone();
            (true, None)
        }
        Verdict::Denied(rule) => (false, Some(rule.text.clone())),
        Verdict::NoMatch => (false, Some(String::from("no rule matched"))),
    };
    if let Some(rule) = denied {
        ctx.rule = rule;
        if lcf.policy_dry_run == Some(true) {
            ctx.decision = Some(Decision::WouldDeny);
            log_refusal(r, ctx, 0, "would deny (dry run)");
        } else {
            ctx.decision = Some(Decision::Deny);
            log_refusal(r, ctx, NGX_HTTP_FORBIDDEN as ngx_int_t, "denied");
            return NGX_HTTP_FORBIDDEN as ngx_int_t;
        }
    }

    // 3. limit
    if let Some(rl) = &lcf.rate_limit {
        if let Some(code) = limit(r, ctx, lcf, rl, &caller) {
            return code;
        }
    }

    let decided = lcf.auth().is_some() || lcf.rules.is_some() || lcf.rate_limit.is_some();
    if decided && ctx.decision.is_none() {
        ctx.decision = Some(Decision::Allow);
    }
    // SAFETY: `raw` is the live main request; nothing else holds its header list now.
    forward::rewrite_upstream_headers(unsafe { &mut *raw }, lcf, ctx);
    if ctx.status == AuthStatus::Verified || allowed_by_rule {
        Status::NGX_OK.into()
    } else {
        // Anonymous, or no authentication configured: no opinion for `satisfy any`.
        Status::NGX_DECLINED.into()
    }
}

/// Charges the request against its rate-limit key; `Some(status)` if it is refused.
fn limit(
    r: &mut Request,
    ctx: &mut RequestCtx,
    lcf: &LocConf,
    rl: &RateLimit,
    caller: &Caller,
) -> Option<ngx_int_t> {
    let zone = rl.zone()?;
    let zone_id = zone as *const _ as *const c_void;
    if ctx.charged.contains(&zone_id) {
        return None;
    }
    ctx.charged.push(zone_id);
    let gcra: &Gcra = lcf
        .rate_callers()
        .iter()
        .find(|c| c.pattern.matches(caller))
        .map_or(&rl.gcra, |c| &c.gcra);
    let key = match rl.key {
        // SAFETY: compiled at configuration time into the configuration pool.
        Some(cv) => r
            .get_complex_value(unsafe { cv.as_ref() })
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        None => match caller.principal {
            Some(p) => [b"caller:".as_slice(), p.as_bytes()].concat(),
            None => [b"addr:".as_slice(), client_addr(r)].concat(),
        },
    };
    let now = now_us();
    let dry_run = lcf.rate_dry_run == Some(true);
    let outcome = zone.check(key_hash(zone.name.as_bytes(), &key), gcra, now, dry_run)?;
    let headers = lcf.rate_headers != Some(false);
    if headers {
        add_header_out(r, "RateLimit-Policy", &policy_header(&zone.name, gcra));
        add_header_out(r, "RateLimit", &ratelimit_header(&zone.name, &outcome));
    }
    if outcome.allowed {
        return None;
    }
    if dry_run {
        ctx.decision = Some(Decision::WouldRateLimit);
        log_refusal(r, ctx, 0, "would rate limit (dry run)");
        return None;
    }
    ctx.decision = Some(Decision::RateLimited);
    if headers {
        add_header_out(r, "Retry-After", &retry_after_secs(&outcome).to_string());
    }
    let code = lcf.rate_status.unwrap_or(DEFAULT_RATE_STATUS) as ngx_int_t;
    log_refusal(r, ctx, code, "rate limited");
    Some(code)
}

/// Microseconds of nginx's cached monotonic clock (the same in every worker).
fn now_us() -> u64 {
    // SAFETY: `ngx_current_msec` is a word-sized global that nginx updates on this thread
    // (the worker's event loop); reading it is a plain load.
    let ms = unsafe { ptr::read_volatile(ptr::addr_of!(ngx::ffi::ngx_current_msec)) };
    (ms as u64).saturating_mul(1000)
}

fn client_addr(r: &Request) -> &[u8] {
    // SAFETY: a live request has a live connection; `addr_text` is set when it is accepted.
    unsafe { (*r.connection()).addr_text.as_bytes() }
}

fn refuse_unauthenticated(
    r: &mut Request,
    status: AuthStatus,
    reason: &str,
    realm: &str,
) -> ngx_int_t {
    if status == AuthStatus::NoKeys {
        add_header_out(r, "Retry-After", NO_KEYS_RETRY_AFTER);
        return NGX_HTTP_SERVICE_UNAVAILABLE as ngx_int_t;
    }
    let challenge = if status == AuthStatus::Missing {
        format!("Bearer realm=\"{realm}\"")
    } else {
        format!("Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{reason}\"")
    };
    add_header_out(r, "WWW-Authenticate", &challenge);
    NGX_HTTP_UNAUTHORIZED as ngx_int_t
}

/// One `info` line per refusal (or dry-run would-refusal): caller, reason, rule, trace.
/// Never the token or a claim value.
fn log_refusal(r: &Request, ctx: &RequestCtx, code: ngx_int_t, what: &str) {
    let caller = match ctx.caller() {
        "" => "-",
        c => c,
    };
    let rule = match ctx.rule.as_str() {
        "" => "-",
        rule => rule,
    };
    let reason = if ctx.reason.is_empty() {
        "-"
    } else {
        ctx.reason.as_str()
    };
    let decision = ctx.decision().map_or("-", Decision::as_str);
    let trace = ctx
        .trace
        .as_ref()
        .map_or(String::from("-"), |t| t.ctx.trace_id_hex());
    ngx::ngx_log_error!(
        NGX_LOG_INFO,
        r.log(),
        "mesh: {} {what}: decision: {decision}, status: {}, reason: {reason}, caller: \"{caller}\", rule: \"{rule}\", trace: {trace}",
        if code == 0 { String::from("logged") } else { format!("refused {code}") },
        ctx.status.as_str()
    );
}
