//! The server-rewrite handler: the client's own `X-Mesh-*` headers are dropped first thing in
//! every pass of a main request (also after an internal redirect, which starts at this
//! phase), before any access module runs. Under `satisfy any` an access handler that admits
//! the request (`allow`, `auth_basic`, `auth_request`, or another module's, in whatever order
//! modules were loaded) ends the access phase and skips the handlers after it: the headers
//! must be gone before that phase starts. The access handler drops them again (a module of
//! this phase loaded after this one could end the phase before us).

use ngx::core::Status;
use ngx::ffi::{ngx_http_request_t, ngx_int_t, NGX_HTTP_INTERNAL_SERVER_ERROR};
use ngx::http::Request;

use super::upstream;
use crate::nginx::no_panic;

pub unsafe extern "C" fn server_rewrite_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request, used only through `r`.
        let r = unsafe { Request::from_ngx_http_request(r) };
        // Subrequests share their parent's header list, already stripped (see `upstream`).
        if r.is_main() && !upstream::strip_client_identity(r) {
            // Never a pass with the client's identity headers still there.
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
        Status::NGX_DECLINED.into()
    })
}
