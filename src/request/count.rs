//! The log-phase handler: counts each request the access phase decided, once, with its final
//! decision and verification outcome (`mesh_status` shows the counters), and hands a traced
//! request's span to the exporter.

use mesh_core::decision::Decision;
use mesh_core::status::AuthStatus;
use mesh_core::token::unverified_issuer;
use ngx::core::Status;
use ngx::ffi::{ngx_http_request_t, ngx_int_t};
use ngx::http::{HttpModuleLocationConf, Request};

use super::ctx::RequestCtx;
use crate::nginx::no_panic;
use crate::nginx::request::request_time_ms;
use crate::state::metrics;
use crate::MeshModule;

/// The log-phase handler: counts a request the access phase decided, once.
pub unsafe extern "C" fn log_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(Status::NGX_OK.into(), || {
        // SAFETY: nginx calls phase handlers with a live request.
        let r = unsafe { Request::from_ngx_http_request(r) };
        if let Some(ctx) = RequestCtx::existing(r) {
            count(r, ctx);
            if ctx.outbound_used() {
                count_upstream(r);
            }
            super::span::export(r, ctx);
        }
        Status::NGX_OK.into()
    })
}

/// An outbound call (it reached `mesh_outbound_auth`): its status class and duration under
/// the location's route, the duration from the request's start (as `$request_time`: retries and
/// a wait for the token included).
fn count_upstream(r: &Request) {
    let Some(lcf) = MeshModule::location_conf(r) else {
        return;
    };
    let raw = r.as_ref();
    let status = if raw.err_status != 0 {
        raw.err_status
    } else {
        raw.headers_out.status
    };
    metrics::count_upstream(&lcf.route, status as u16, request_time_ms(raw));
}

fn count(r: &Request, ctx: &RequestCtx) {
    if !ctx.decided() {
        return;
    }
    let id = ctx.identity();
    if let Some(d) = ctx.decision() {
        // A caller gets series of its own only when admitted: a refused one could be anyone
        // with a token of the issuer, and would use up the bounded caller labels.
        let admitted = matches!(
            d,
            Decision::Allow | Decision::WouldDeny | Decision::WouldRateLimit
        );
        let raw = r.as_ref();
        metrics::count_request(
            id.principal().filter(|_| admitted),
            d,
            raw.headers_out.status as u16,
            request_time_ms(raw),
        );
    }
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
