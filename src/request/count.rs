//! The log-phase handler: counts each request the access phase decided, once, with its final
//! decision and verification outcome (`mesh_status` shows the counters).

use mesh_core::status::AuthStatus;
use mesh_core::token::unverified_issuer;
use ngx::core::Status;
use ngx::ffi::{ngx_http_request_t, ngx_int_t};
use ngx::http::Request;

use super::ctx::RequestCtx;
use crate::nginx::no_panic;
use crate::state::metrics;

/// The log-phase handler: counts a request the access phase decided, once.
pub unsafe extern "C" fn log_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(Status::NGX_OK.into(), || {
        // SAFETY: nginx calls phase handlers with a live request.
        let r = unsafe { Request::from_ngx_http_request(r) };
        if let Some(ctx) = RequestCtx::existing(r) {
            count(r, ctx);
        }
        Status::NGX_OK.into()
    })
}

fn count(r: &Request, ctx: &RequestCtx) {
    if !ctx.decided() {
        return;
    }
    if let Some(d) = ctx.decision() {
        metrics::count_decision(d);
    }
    let id = ctx.identity();
    if id.status == AuthStatus::Off {
        return;
    }
    if id.status == AuthStatus::Verified {
        metrics::count_auth(id.provider(), id.status);
        return;
    }
    // Refused (or anonymous): the provider the token's `iss` names, else the only one the
    // location accepts, else none.
    // SAFETY: configurations live for the whole cycle.
    let Some(lcf) = (unsafe { id.conf.as_ref() }) else {
        metrics::count_auth("", id.status);
        return;
    };
    let providers = lcf.auth.as_deref().map_or(&[][..], |a| &a.providers[..]);
    let by_issuer = super::identify::token_of(r, lcf)
        .ok()
        .flatten()
        .and_then(unverified_issuer)
        .and_then(|iss| {
            providers
                .iter()
                .find(|p| p.snapshot().issuers.contains(&iss))
        });
    let name = match (by_issuer, providers) {
        (Some(p), _) => p.name.as_str(),
        (None, [only]) => only.name.as_str(),
        _ => "",
    };
    metrics::count_auth(name, id.status);
}
