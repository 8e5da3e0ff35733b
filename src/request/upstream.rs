//! What the upstream receives: this hop's trace context, and the verified identity
//! (`mesh_forward_identity`, with every client-sent `X-Mesh-*` header dropped).
//!
//! Headers are rewritten at the end of the access phase, once the request is allowed, and
//! before anything builds an upstream request from `r->headers_in`. The phase runs again
//! after an internal redirect; since the request context (and so the span) survives the
//! redirect and the old headers are removed before the new ones are added, the upstream sees
//! each header exactly once.

use ngx::ffi::ngx_http_request_t;
use ngx::http::Request;

use super::ctx::RequestCtx;
use crate::conf::LocConf;
use crate::nginx::headers::{push_header_in, remove_headers_in, HeaderName, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::new("traceparent", "traceparent");
const TRACESTATE: HeaderName = HeaderName::new("tracestate", "tracestate");
const CLOUD_TRACE: HeaderName = HeaderName::new("X-Cloud-Trace-Context", "x-cloud-trace-context");
const MESH_CALLER: HeaderName = HeaderName::new("X-Mesh-Caller", "x-mesh-caller");
const MESH_PROVIDER: HeaderName = HeaderName::new("X-Mesh-Provider", "x-mesh-provider");
const MESH_CLAIMS: HeaderName = HeaderName::new("X-Mesh-Claims", "x-mesh-claims");

fn is_trace_header(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"traceparent")
        || name.eq_ignore_ascii_case(b"tracestate")
        || name.eq_ignore_ascii_case(b"x-cloud-trace-context")
}

/// `X-Mesh-*` in any case, with `_` for any `-` (`X_Mesh_Caller`: with
/// `underscores_in_headers on` nginx keeps such names, and FastCGI, uwsgi and SCGI upstreams
/// read both spellings as `HTTP_X_MESH_CALLER`).
pub fn is_mesh_header(name: &[u8]) -> bool {
    name.len() >= 7
        && name[..7]
            .iter()
            .zip(b"x-mesh-")
            .all(|(&c, &want)| match want {
                b'-' => c == b'-' || c == b'_',
                _ => c.to_ascii_lowercase() == want,
            })
}

/// Drops every client-sent `X-Mesh-*` header of the main request: called in the
/// server-rewrite phase of every pass (and again first thing in the access phase), whatever
/// is decided next, so that no access module that admits the request (`satisfy any`:
/// `allow`, `auth_basic`, `auth_request`, whose subrequest copies these headers) lets the
/// client's own identity through. `false` if the list could not be rewritten: the caller
/// answers 500.
pub fn strip_client_identity(r: &mut Request) -> bool {
    let r: &mut ngx_http_request_t = r.as_mut();
    remove_headers_in(r, is_mesh_header)
}

/// Rewrites the headers the upstream will receive: this hop's trace context, and the verified
/// identity (client `X-Mesh-*` headers dropped). Called from the access handler for the main
/// request once it is allowed: before `auth_request` (whose handler runs after ours) copies
/// the headers into its subrequest, and before the content phase (`proxy_pass`, `grpc_pass`,
/// `fastcgi_pass`, `mirror`) builds anything from them. Never for a subrequest: it holds a
/// by-value copy of its parent's `headers_in` that shares the parent's list, and editing it
/// would corrupt the main request's headers. Idempotent, so a second pass after an internal
/// redirect leaves each header once.
pub fn rewrite(r: &mut Request, lcf: &LocConf, ctx: &RequestCtx) -> bool {
    ctx.set_upstream_rewritten(true);
    rewrite_trace(r, lcf, ctx);
    if lcf.forward_identity {
        let r: &mut ngx_http_request_t = r.as_mut();
        if !remove_headers_in(r, is_mesh_header) {
            return false;
        }
        // Copied into the pool (memcpy, no heap): a redirect may identify the caller again.
        if let Some(v) = &ctx.identity().verified {
            push_header_in(r, &MESH_CALLER, HeaderValue::Copy(v.principal.as_bytes()));
            push_header_in(r, &MESH_PROVIDER, HeaderValue::Copy(v.provider.as_bytes()));
            // The payload segment as sent: base64url of the verified claims JSON.
            push_header_in(r, &MESH_CLAIMS, HeaderValue::Copy(v.claims_b64.as_bytes()));
        }
    }
    true
}

/// This hop's trace context toward the upstream (`mesh_trace on`): also for a request another
/// access module admitted after this module refused it (`satisfy any`), from the
/// pre-content phase.
pub fn rewrite_trace(r: &mut Request, lcf: &LocConf, ctx: &RequestCtx) {
    if let Some(t) = ctx.trace(r, lcf) {
        let r: &mut ngx_http_request_t = r.as_mut();
        remove_headers_in(r, is_trace_header);
        push_header_in(r, &TRACEPARENT, HeaderValue::Copy(t.traceparent.as_bytes()));
        if let Some(ts) = &t.tracestate {
            push_header_in(r, &TRACESTATE, HeaderValue::Copy(ts));
        }
        push_header_in(r, &CLOUD_TRACE, HeaderValue::Copy(t.cloud_trace.as_bytes()));
    }
}
