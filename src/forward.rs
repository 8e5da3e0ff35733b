//! What travels with the request: trace context toward the upstream (and `traceresponse`
//! back to the client), and the verified identity (`mesh_forward_identity`).
//!
//! Headers are rewritten at the end of the access phase, once the request is allowed, and
//! before anything builds an upstream request from `r->headers_in`. The phase runs again
//! after an internal redirect; since the request context (and so the span) survives the
//! redirect and the old headers are removed before the new ones are added, the upstream sees
//! each header exactly once.

use std::cell::RefCell;
use std::ptr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use mesh_core::trace::{
    check_tracestate, cloud_logging_trace, parse_cloud_trace, parse_traceparent, IdGenerator,
    TraceContext,
};
use ngx::core::Status;
use ngx::ffi::{ngx_http_output_header_filter_pt, ngx_http_request_t, ngx_int_t};
use ngx::http::{HttpModuleLocationConf, Request};

use crate::access::{request_ctx, RequestCtx};
use crate::conf::LocConf;
use crate::ngx_util::{
    add_header_in, add_header_out, header_in, headers_in_all, no_panic, remove_headers_in,
};
use crate::MeshModule;

/// This hop's trace: the context, plus the header values derived from it.
pub struct Trace {
    pub ctx: TraceContext,
    pub traceparent: String,
    pub cloud_trace: String,
    /// The incoming `tracestate`, kept only with a valid incoming `traceparent`.
    pub tracestate: Option<Vec<u8>>,
}

thread_local! {
    /// The worker's id generator, seeded from the operating system after fork
    /// (`seed_worker`), so that no two workers, and no restart, share a sequence.
    static IDS: RefCell<Option<IdGenerator>> = const { RefCell::new(None) };
}

/// Seeds this worker's id generator from the OS. Called from `init_process`.
pub fn seed_worker() -> bool {
    let mut seed = [0u8; 32];
    if getrandom::getrandom(&mut seed).is_err() {
        return false;
    }
    IDS.with(|ids| *ids.borrow_mut() = Some(IdGenerator::from_seed(seed)));
    true
}

/// Starts this hop's trace from the request's incoming headers.
pub fn start(r: &Request, lcf: &LocConf) -> Option<Trace> {
    // Several `traceparent` headers make the context invalid; several `tracestate` headers
    // are one list (W3C Trace Context, 3.2 and 3.3).
    let parents = headers_in_all(r, "traceparent");
    let parent = match parents.as_slice() {
        [one] => parse_traceparent(one),
        _ => None,
    };
    let (incoming, tracestate) = match parent {
        Some(tp) => {
            let joined = headers_in_all(r, "tracestate").join(&b","[..]);
            let ts = check_tracestate(&joined).map(<[u8]>::to_vec);
            (Some(tp), ts)
        }
        None => (
            header_in(r, "X-Cloud-Trace-Context").and_then(parse_cloud_trace),
            None,
        ),
    };
    let ctx = IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if ids.is_none() {
            // Not seeded (init_process failed to read the OS): refuse to guess.
            return None;
        }
        ids.as_mut()
            .map(|g| TraceContext::start(incoming.as_ref(), lcf.trace_sample(), g))
    })?;
    Some(Trace {
        traceparent: ctx.traceparent(),
        cloud_trace: ctx.cloud_trace(),
        ctx,
        tracestate,
    })
}

/// `$mesh_cloud_trace`.
pub fn cloud_logging(lcf: &LocConf, t: &Trace) -> String {
    cloud_logging_trace(lcf.trace_project(), &t.ctx)
}

fn is_trace_header(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"traceparent")
        || name.eq_ignore_ascii_case(b"tracestate")
        || name.eq_ignore_ascii_case(b"x-cloud-trace-context")
}

fn is_mesh_header(name: &[u8]) -> bool {
    name.len() >= 7 && name[..7].eq_ignore_ascii_case(b"x-mesh-")
}

/// Rewrites the headers the upstream will receive: this hop's trace context, and the verified
/// identity (client `X-Mesh-*` headers dropped). Called from the access handler for the main
/// request once it is allowed: before `auth_request` (whose handler runs after ours) copies
/// the headers into its subrequest, and before the content phase (`proxy_pass`, `grpc_pass`,
/// `fastcgi_pass`, `mirror`) builds anything from them. Never for a subrequest: it holds a
/// by-value copy of its parent's `headers_in` that shares the parent's list, and editing it
/// would corrupt the main request's headers. Idempotent, so a second pass after an internal
/// redirect leaves each header once.
pub fn rewrite_upstream_headers(r: &mut ngx_http_request_t, lcf: &LocConf, ctx: &mut RequestCtx) {
    if lcf.trace == Some(true) {
        if ctx.trace.is_none() {
            // SAFETY: the live request `r`, read-only.
            ctx.trace = start(unsafe { Request::from_ngx_http_request(r) }, lcf);
        }
        if let Some(t) = &ctx.trace {
            remove_headers_in(r, is_trace_header);
            add_header_in(r, "traceparent", t.traceparent.as_bytes());
            if let Some(ts) = &t.tracestate {
                add_header_in(r, "tracestate", ts);
            }
            add_header_in(r, "X-Cloud-Trace-Context", t.cloud_trace.as_bytes());
        }
    }
    if lcf.forward_identity == Some(true) {
        remove_headers_in(r, is_mesh_header);
        if let Some(v) = &ctx.verified {
            add_header_in(r, "X-Mesh-Caller", v.principal.as_bytes());
            add_header_in(r, "X-Mesh-Provider", v.provider.as_bytes());
            let claims = URL_SAFE_NO_PAD.encode(v.claims_json.as_bytes());
            add_header_in(r, "X-Mesh-Claims", claims.as_bytes());
        }
    }
}

/// The next header filter in nginx's chain.
static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;

/// Installs the header filter (postconfiguration).
///
/// # Safety
/// Called once per configuration load, in the master, before any request.
pub unsafe fn install_header_filter() {
    // SAFETY: nginx builds the filter chain single-threaded at configuration time.
    unsafe {
        NEXT_HEADER_FILTER = ngx::ffi::ngx_http_top_header_filter;
        ngx::ffi::ngx_http_top_header_filter = Some(header_filter);
    }
}

/// Adds `traceresponse` (W3C Trace Context Level 2) where `mesh_trace_response on`.
unsafe extern "C" fn header_filter(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic((), || {
        // SAFETY: nginx calls header filters with a live request.
        let req = unsafe { Request::from_ngx_http_request(r) };
        if !req.is_main() {
            return;
        }
        let Some(lcf) = MeshModule::location_conf(req) else {
            return;
        };
        if lcf.trace != Some(true) || lcf.trace_response != Some(true) {
            return;
        }
        let Some(ctx) = request_ctx(req) else {
            return;
        };
        // SAFETY: the context lives in the request pool, apart from the request fields that
        // `start` reads.
        let ctx: &mut RequestCtx = unsafe { &mut *(ctx as *mut RequestCtx) };
        if ctx.trace.is_none() {
            // SAFETY: the live request.
            ctx.trace = start(unsafe { Request::from_ngx_http_request(r) }, lcf);
        }
        let value = ctx.trace.as_ref().map(|t| t.ctx.traceresponse());
        if let Some(v) = value {
            add_header_out(req, "traceresponse", &v);
        }
    });
    // SAFETY: the chain was set up by `install_header_filter`; the next filter is nginx's.
    unsafe {
        match *ptr::addr_of!(NEXT_HEADER_FILTER) {
            Some(next) => next(r),
            None => Status::NGX_OK.into(),
        }
    }
}
