//! `mesh_outbound_auth`: the request goes upstream with the service's own ID token.
//!
//! Runs in the pre-content phase, once the access phase admitted the request (so a refused
//! caller never makes this service fetch a token) and before `proxy_pass` builds the upstream
//! request from `r->headers_in`:
//!
//! - the client's `X-Serverless-Authorization` never passes;
//! - with `mesh_auth` in the same location, an `Authorization` that carried the caller's
//!   token to this service is the caller's credential for us, not for the upstream: dropped;
//! - the client's own `Authorization` (if any is left) is kept and the token goes in
//!   `X-Serverless-Authorization`; else the token goes in `Authorization: Bearer`.
//!
//! Renewal without a timer: a request that finds the token due for renewal makes the worker
//! do its timer's work at once (`keystore::nudge`: claim the fetch in the shared store, hand it
//! to the fetch thread) and goes on with the still-valid token. A request that finds no valid
//! token waits for one, for at most `mesh_keys_wait`, without blocking the worker: it is
//! suspended on a timer of its connection's write event (as `limit_req` delays a request),
//! re-checked every `POLL_MS`, and then answered `503` with `Retry-After` if none came.

use mesh_core::extract::{bearer, Bearer};
use mesh_core::text::Concat;
use ngx::core::Status;
use ngx::ffi::{
    ngx_add_timer, ngx_handle_read_event, ngx_handle_write_event, ngx_http_block_reading,
    ngx_http_core_run_phases, ngx_http_finalize_request, ngx_http_request_t, ngx_http_test_reading,
    ngx_int_t, ngx_msec_t, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_SERVICE_UNAVAILABLE,
};
use ngx::http::{HttpModuleMainConf, Request};

use super::ctx::RequestCtx;
use super::identify::token_of;
use crate::conf::LocConf;
use crate::nginx::headers::{
    any_header_in, pool_text, push_header_in, push_header_in_elt, push_header_out,
    remove_headers_in, remove_headers_in_where, HeaderName, HeaderValue, RETRY_AFTER,
};
use crate::nginx::no_panic;
use crate::state::keystore;
use crate::state::outbound::OutboundToken;
use crate::MeshModule;

const AUTHORIZATION: HeaderName = HeaderName::new("Authorization", "authorization");
const SERVERLESS_AUTHORIZATION: HeaderName =
    HeaderName::new("X-Serverless-Authorization", "x-serverless-authorization");

/// How often a waiting request looks for a fresh token.
const POLL_MS: ngx_msec_t = 10;

/// The shared store's clock: milliseconds since the epoch.
fn now_ms() -> u64 {
    crate::state::unix_now_us() / 1000
}

/// The pre-content step of a location with `mesh_outbound_auth`: `NGX_DECLINED` to go on
/// (headers set), `NGX_AGAIN` while waiting for a token, or the status to answer.
pub fn precontent(r: &mut Request, lcf: &LocConf) -> ngx_int_t {
    let Some(t) = lcf.outbound_auth.as_deref() else {
        return Status::NGX_DECLINED.into();
    };
    let Some(ctx) = RequestCtx::of(r) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    ctx.set_outbound_used();
    if let Some(token) = keystore::current_token(t) {
        return if attach(r, lcf, ctx, &token) {
            Status::NGX_DECLINED.into()
        } else {
            NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t
        };
    }
    let now = now_ms();
    let wait = MeshModule::main_conf(r).map_or(0, |m| m.keystore.wait().as_millis() as u64);
    let until = ctx.outbound_wait_until(now, wait);
    if now < until && t.may_arrive_by(until) {
        return suspend(r);
    }
    refuse(r, lcf, ctx, t, now)
}

/// 503 with `Retry-After`, one line at `mesh_log_level`; the upstream is never contacted.
fn refuse(
    r: &mut Request,
    lcf: &LocConf,
    ctx: &RequestCtx,
    t: &OutboundToken,
    now: u64,
) -> ngx_int_t {
    let retry = t.retry_after(now);
    match pool_text(r, &retry) {
        Some(v) => {
            push_header_out(r, &RETRY_AFTER, HeaderValue::InPool(v));
        }
        None => return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t,
    }
    let trace = ctx
        .started_trace()
        .map_or(String::from("-"), |t| t.ctx.trace_id_hex());
    let why = if t.expires_at().is_some() {
        "the token expired and no fresh one came"
    } else {
        "no token from the metadata server yet"
    };
    ngx::ngx_log_error!(
        lcf.log_level,
        r.log(),
        "mesh: refused 503 mesh_outbound_auth ${}: {why} (audience \"{}\"), retry after {retry}s, trace: {trace}",
        t.var,
        t.audience
    );
    NGX_HTTP_SERVICE_UNAVAILABLE as ngx_int_t
}

/// Sets the headers the upstream receives. `false`: the pool is exhausted.
fn attach(r: &mut Request, lcf: &LocConf, ctx: &RequestCtx, token: &str) -> bool {
    // The caller's token to this service, as `mesh_auth` read it here.
    let inbound: Option<Vec<u8>> = if lcf.auth.is_some() {
        token_of(r, lcf).ok().flatten().map(<[u8]>::to_vec)
    } else {
        None
    };
    let Some(value) = pool_text(r, &Concat(&[b"Bearer ", token.as_bytes()])) else {
        return false;
    };
    let raw: &mut ngx_http_request_t = r.as_mut();
    if !remove_headers_in(raw, |k| {
        k.eq_ignore_ascii_case(b"x-serverless-authorization")
    }) {
        return false;
    }
    let is_auth =
        |h: &ngx::ffi::ngx_table_elt_t| h.key.as_bytes().eq_ignore_ascii_case(b"authorization");
    let mut removed = false;
    let own = match ctx.outbound_client_auth() {
        Some(own) => own,
        None => {
            if let Some(inbound) = &inbound {
                let carries_inbound = |h: &ngx::ffi::ngx_table_elt_t| {
                    is_auth(h)
                        && matches!(bearer(h.value.as_bytes()),
                            Bearer::Token(t) if t == inbound.as_slice())
                };
                removed = true;
                if !remove_headers_in_where(raw, carries_inbound) {
                    return false;
                }
            }
            let own = any_header_in(raw, is_auth);
            ctx.set_outbound_client_auth(own);
            own
        }
    };
    if !own {
        // Ours from an earlier pass (an internal redirect), or nothing: replaced.
        removed = true;
        if !remove_headers_in_where(raw, is_auth) {
            return false;
        }
    }
    if removed {
        raw.headers_in.authorization = std::ptr::null_mut();
    }
    if own {
        push_header_in(raw, &SERVERLESS_AUTHORIZATION, HeaderValue::InPool(value))
    } else {
        let h = push_header_in_elt(raw, &AUTHORIZATION, HeaderValue::InPool(value));
        raw.headers_in.authorization = h;
        !h.is_null()
    }
}

/// Suspends the request for `POLL_MS` on its connection's write-event timer.
fn suspend(r: &mut Request) -> ngx_int_t {
    let raw: &mut ngx_http_request_t = r.as_mut();
    raw.read_event_handler = Some(ngx_http_test_reading);
    raw.write_event_handler = Some(wake);
    // SAFETY: a live request has a live connection and write event; the timer is removed by
    // nginx when the connection closes, and `delayed` tells `wake` it was ours.
    unsafe {
        let wev = (*raw.connection).write;
        (*wev).set_delayed(1);
        ngx_add_timer(wev, POLL_MS);
    }
    Status::NGX_AGAIN.into()
}

/// The write-event handler of a waiting request: on its timer, publishes what the fetch
/// thread brought and runs the phases again (the pre-content step then finds a token, waits
/// again, or refuses).
unsafe extern "C" fn wake(r: *mut ngx_http_request_t) {
    no_panic((), || {
        // SAFETY: nginx calls a request's event handlers with the live request.
        unsafe {
            let wev = (*(*r).connection).write;
            if (*wev).delayed() != 0 {
                // Writable before the timer: keep waiting.
                if ngx_handle_write_event(wev, 0) != ngx::ffi::NGX_OK as ngx_int_t {
                    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
                }
                return;
            }
            if ngx_handle_read_event((*(*r).connection).read, 0) != ngx::ffi::NGX_OK as ngx_int_t {
                ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
                return;
            }
            keystore::nudge();
            (*r).read_event_handler = Some(ngx_http_block_reading);
            (*r).write_event_handler = Some(ngx_http_core_run_phases);
            ngx_http_core_run_phases(r);
        }
    });
}
