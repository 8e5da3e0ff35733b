//! The response side: a header filter that adds `traceresponse` (W3C Trace Context Level 2)
//! where `mesh_trace_response on`.

use std::ptr;

use ngx::core::Status;
use ngx::ffi::{ngx_http_output_header_filter_pt, ngx_http_request_t, ngx_int_t};
use ngx::http::{HttpModuleLocationConf, Request};

use super::ctx::RequestCtx;
use crate::nginx::headers::{push_header_out, HeaderName, HeaderValue};

const TRACERESPONSE: HeaderName = HeaderName::new("traceresponse", "traceresponse");
use crate::nginx::no_panic;
use crate::MeshModule;

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
        if !lcf.trace_response {
            return;
        }
        let Some(ctx) = RequestCtx::of(req) else {
            return;
        };
        // `traceresponse` is the `traceparent` sent upstream (`TraceContext::traceresponse`:
        // the same shape, this hop's span id as child id), rendered once per request.
        if let Some(t) = ctx.trace(req, lcf) {
            let value = HeaderValue::Copy(t.traceparent.as_bytes());
            push_header_out(req, &TRACERESPONSE, value);
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
