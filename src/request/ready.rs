//! `mesh_ready`: `200 ready` when the worker that takes the request has the keys of every
//! `mesh_provider` and a token for every `mesh_outbound_token`, else `503` with one line per
//! thing missing: what a platform's startup probe (Cloud Run's) asks before it sends traffic.

use ngx::core::Status;
use ngx::ffi::{ngx_chain_t, ngx_http_request_t, ngx_int_t, NGX_HTTP_GET, NGX_HTTP_HEAD};
use ngx::http::HttpModuleMainConf;

use crate::nginx::no_panic;
use crate::MeshModule;

/// The content handler of a `mesh_ready` location.
///
/// # Safety
/// nginx calls it with a live request.
pub unsafe extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(Status::NGX_ERROR.into(), || {
        // SAFETY: nginx passes a live request to its content handler.
        let req = unsafe { ngx::http::Request::from_ngx_http_request(r) };
        // SAFETY: as above.
        let method = unsafe { (*r).method } as u32;
        if method & (NGX_HTTP_GET | NGX_HTTP_HEAD) == 0 {
            return ngx::ffi::NGX_HTTP_NOT_ALLOWED as ngx_int_t;
        }
        let rc = req.discard_request_body();
        if rc != Status::NGX_OK {
            return rc.into();
        }
        let missing = match MeshModule::main_conf(req) {
            Some(mcf) => crate::state::keystore::missing(mcf.key_sources()),
            None => Vec::new(),
        };
        let (status, body) = if missing.is_empty() {
            (200, "ready\n".to_string())
        } else {
            (503, format!("not ready\n{}\n", missing.join("\n")))
        };
        // SAFETY: the request is live; the header and body are copied into its pool before
        // nginx reads them, and the chain link lives in the same pool.
        unsafe { send(r, status, body.as_bytes()) }
    })
}

/// Sends a `text/plain` answer with `body`.
///
/// # Safety
/// `r` is a live request in its content phase.
unsafe fn send(r: *mut ngx_http_request_t, status: usize, body: &[u8]) -> ngx_int_t {
    // SAFETY: see the contract.
    unsafe {
        let req = &mut *r;
        req.headers_out.status = status;
        req.headers_out.content_length_n = body.len() as i64;
        let ctype = b"text/plain";
        req.headers_out.content_type.len = ctype.len();
        req.headers_out.content_type.data = ctype.as_ptr().cast_mut();
        req.headers_out.content_type_len = ctype.len();
        if !crate::nginx::headers::add_header_out(
            ngx::http::Request::from_ngx_http_request(r),
            "Cache-Control",
            "no-store",
        ) {
            return Status::NGX_ERROR.into();
        }
        let rc = ngx::ffi::ngx_http_send_header(r);
        let (error, ok): (ngx_int_t, ngx_int_t) = (Status::NGX_ERROR.into(), Status::NGX_OK.into());
        if rc == error || rc > ok || req.header_only() != 0 {
            return rc;
        }
        let buf = ngx::ffi::ngx_create_temp_buf(req.pool, body.len().max(1));
        let link = ngx::ffi::ngx_alloc_chain_link(req.pool);
        if buf.is_null() || link.is_null() {
            return Status::NGX_ERROR.into();
        }
        std::ptr::copy_nonoverlapping(body.as_ptr(), (*buf).last, body.len());
        (*buf).last = (*buf).last.add(body.len());
        (*buf).set_last_buf(1);
        (*buf).set_last_in_chain(1);
        (*link).buf = buf;
        (*link).next = std::ptr::null_mut::<ngx_chain_t>();
        ngx::ffi::ngx_http_output_filter(r, link)
    }
}
