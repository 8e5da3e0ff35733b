//! The access-phase handler: identify → authorize → limit → trace, on one screen.
//!
//! Returns what nginx's `satisfy` expects: `NGX_OK` when this module positively allowed the
//! request, `NGX_DECLINED` when it has no opinion, 401/403 for refusals that `satisfy any`
//! may overrule, and the rate-limit status, which it may not. A request refused at one step
//! is not counted by the next.

use std::cell::RefCell;

use mesh_core::decision::Decision;
use mesh_core::policy::{roles_into, Caller, Verdict};
use mesh_core::status::AuthStatus;
use mesh_core::text::Concat;
use ngx::core::Status;
use ngx::ffi::{
    ngx_http_request_t, ngx_int_t, NGX_HTTP_FORBIDDEN, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_SERVICE_UNAVAILABLE, NGX_HTTP_UNAUTHORIZED,
};
use ngx::http::{HttpModuleLocationConf, Request};

use super::ctx::RequestCtx;
use super::identify::Identity;
use super::limit::limit;
use super::log::log_refusal;
use super::upstream;
use crate::conf::LocConf;
use crate::nginx::headers::{
    pool_text, push_header_out, push_header_out_elt, HeaderName, HeaderValue, RETRY_AFTER,
};
use crate::nginx::no_panic;
use crate::nginx::request::method_name;
use crate::MeshModule;

/// Seconds a client is told to wait when a provider has no keys yet.
const NO_KEYS_RETRY_AFTER: &[u8] = b"10";

const WWW_AUTHENTICATE: HeaderName = HeaderName::new("WWW-Authenticate", "www-authenticate");

thread_local! {
    /// The caller's roles, a scratch list of the worker reused by every request (its strings
    /// keep their buffers: nothing is allocated per request once it has held the roles).
    static ROLES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

pub unsafe extern "C" fn access_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request, used only through `r`.
        let r = unsafe { Request::from_ngx_http_request(r) };
        let Some(lcf) = MeshModule::location_conf(r) else {
            return Status::NGX_DECLINED.into();
        };
        // nginx skips the access phase for subrequests.
        if !r.is_main() {
            return Status::NGX_DECLINED.into();
        }
        // Dropped already in the server-rewrite phase; again here, before anything is
        // decided, in every location, in case a module of that phase loaded after this one
        // ended it early. Failing that, the request fails: never a pass. Nothing else is
        // done where nothing is decided or forwarded.
        if !upstream::strip_client_identity(r) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
        if !(lcf.decides() || lcf.trace || lcf.forward_identity) {
            return Status::NGX_DECLINED.into();
        }
        pipeline(r, lcf)
    })
}

fn pipeline(r: &mut Request, lcf: &'static LocConf) -> ngx_int_t {
    let Some(ctx) = RequestCtx::of(r) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    // Started first, so that a refusal's log line names the trace.
    ctx.trace(r, lcf);
    // 1. identify
    let id = ctx.identity();
    if !id.passes() {
        ctx.decide(Decision::Unauthenticated);
        let code = refuse_unauthenticated(r, ctx, id, lcf);
        log_refusal(r, ctx, code, id.status.as_str());
        return code;
    }
    // 2. authorize, 3. limit
    let verified = id.verified.as_deref();
    let claims = verified.map(|v| &v.claims);
    let decided = ROLES.with(|scratch| {
        let mut local = Vec::new();
        // (Never borrowed twice: nothing below runs a request handler of this module.)
        let mut scratch = scratch.try_borrow_mut();
        let roles = scratch.as_deref_mut().unwrap_or(&mut local);
        // Roles are read by rules and by `mesh_rate_limit_caller` patterns only.
        let wanted = !lcf.rules.is_empty() || !lcf.rate_callers.is_empty();
        if lcf.roles.is_empty() || !wanted {
            roles.clear();
        } else {
            roles_into(&lcf.roles, id.principal(), claims, roles);
        }
        let caller = Caller {
            principal: id.principal(),
            claims,
            roles,
            provider: verified.map(|v| v.provider.as_str()),
        };
        let allowed_by_rule = authorize(r, ctx, lcf, &caller)?;
        if let Some(rl) = &lcf.rate_limit {
            if let Some(code) = limit(r, ctx, lcf, rl, &caller) {
                // Final even where `satisfy any` would let a 401/403 be overruled
                // (precontent).
                ctx.set_rate_refused(r);
                return Err(code);
            }
        }
        Ok(allowed_by_rule)
    });
    let allowed_by_rule = match decided {
        Ok(allowed) => allowed,
        Err(code) => return code,
    };
    if lcf.decides() && !ctx.decided() {
        ctx.decide(Decision::Allow);
    }
    // 4. trace (and identity) toward the upstream
    if !upstream::rewrite(r, lcf, ctx) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    if id.status == AuthStatus::Verified || allowed_by_rule {
        Status::NGX_OK.into()
    } else {
        // Anonymous, or no authentication configured: no opinion for `satisfy any`.
        Status::NGX_DECLINED.into()
    }
}

/// The rules: `Ok(true)` if a rule allowed the caller, `Ok(false)` if none applies (or a
/// dry run would deny), `Err(403)` if refused.
fn authorize(
    r: &Request,
    ctx: &RequestCtx,
    lcf: &'static LocConf,
    caller: &Caller,
) -> Result<bool, ngx_int_t> {
    // The method as the client sent it (`r->method_name`): ngx's `Method` names every
    // method outside nginx's own list `UNKNOWN`, which would make PURGE, REPORT, ... alike.
    let method = method_name(r);
    // `$mesh_rule` borrowed from the configuration (`'static`): nothing copied.
    let text: &'static str = match lcf.rules.decide(caller, method) {
        Verdict::NoRules => return Ok(false),
        Verdict::Allowed(rule) => {
            ctx.set_rule(&rule.text);
            return Ok(true);
        }
        Verdict::Denied(rule) => &rule.text,
        Verdict::NoMatch => "no rule matched",
    };
    ctx.set_rule(text);
    if lcf.policy_dry_run {
        ctx.decide(Decision::WouldDeny);
        log_refusal(r, ctx, 0, "would deny (dry run)");
        return Ok(false);
    }
    ctx.decide(Decision::Deny);
    log_refusal(r, ctx, NGX_HTTP_FORBIDDEN as ngx_int_t, "denied");
    Err(NGX_HTTP_FORBIDDEN as ngx_int_t)
}

/// 401 with the challenge, or 503 while the provider has no keys yet.
fn refuse_unauthenticated(
    r: &mut Request,
    ctx: &RequestCtx,
    id: &Identity,
    lcf: &'static LocConf,
) -> ngx_int_t {
    if id.status == AuthStatus::NoKeys {
        push_header_out(r, &RETRY_AFTER, HeaderValue::Kept(NO_KEYS_RETRY_AFTER));
        return NGX_HTTP_SERVICE_UNAVAILABLE as ngx_int_t;
    }
    let challenge = if id.status == AuthStatus::Missing {
        HeaderValue::Kept(lcf.challenge.as_bytes())
    } else {
        let parts = [
            lcf.challenge_invalid.as_bytes(),
            id.reason.as_bytes(),
            b"\"",
        ];
        match pool_text(r, &Concat(&parts)) {
            Some(t) => HeaderValue::InPool(t),
            None => return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t,
        }
    };
    // Kept to be withdrawn if another access module admits the request (`satisfy any`).
    let h = push_header_out_elt(r, &WWW_AUTHENTICATE, challenge);
    ctx.set_challenge(r, h);
    NGX_HTTP_UNAUTHORIZED as ngx_int_t
}
