//! The pre-content handler: the last look at a main request another access module may have
//! admitted after this module refused it (`satisfy any`: our access handler runs before
//! nginx's own, and a 401 or 403 of ours can be overruled by `allow` or `auth_basic`).
//!
//! Reaching this phase means the request was admitted. So the `WWW-Authenticate` of our
//! overruled 401 is withdrawn, and where the access handler did not rewrite the upstream
//! headers in this pass (it refused), the trace context is sent anyway; and a rate-limit
//! refusal, which must not be overruled, is answered here whatever its status. The client's
//! `X-Mesh-*` headers were already dropped by the access handler, before any decision.

use ngx::core::Status;
use ngx::ffi::{ngx_http_request_t, ngx_int_t, NGX_HTTP_INTERNAL_SERVER_ERROR};
use ngx::http::{HttpModuleLocationConf, Request};

use super::ctx::RequestCtx;
use super::upstream;
use crate::conf::LocConf;
use crate::nginx::headers::hide_header_out;
use crate::nginx::no_panic;
use crate::MeshModule;

pub unsafe extern "C" fn precontent_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request, used only through `r`.
        let r = unsafe { Request::from_ngx_http_request(r) };
        // Subrequests share their parent's header list: never touched (see `upstream`).
        if !r.is_main() {
            return Status::NGX_DECLINED.into();
        }
        let Some(lcf) = MeshModule::location_conf(r) else {
            return Status::NGX_DECLINED.into();
        };
        if let Some(rc) = admitted(r, lcf) {
            return rc;
        }
        super::outbound::precontent(r, lcf)
    })
}

/// What a refusal of ours that another access module overruled leaves to do; `Some`: the
/// status to answer at once.
fn admitted(r: &mut Request, lcf: &LocConf) -> Option<ngx_int_t> {
    let ctx = RequestCtx::existing(r)?;
    // SAFETY: the element was added to this request's `headers_out` by the access
    // handler in this pass; the response has not been sent (the content phase has not
    // run). A 401 answered through `error_page` is a later pass: its challenge stays.
    unsafe { hide_header_out(ctx.take_challenge(r)) };
    // A rate-limit refusal is final, whatever its status: with
    // `mesh_rate_limit_status 403` (or 401) `satisfy any` would let `allow` overrule it.
    if ctx.take_rate_refused(r) {
        return Some(lcf.rate_status as ngx_int_t);
    }
    if !ctx.take_upstream_rewritten() {
        upstream::rewrite_trace(r, lcf, ctx);
    }
    None
}
