//! The `$mesh_*` variables. Each reads the request context (computing it on first use), so
//! they work in any phase: `map`, `log_format`, `limit_req_zone`, `proxy_set_header`,
//! `add_header`. Getters only read the request (nginx may call them while the access
//! handler is running on the same request).

use mesh_core::policy::roles_of;
use ngx::core::Status;
use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_get_variable_pt, ngx_http_request_t, ngx_int_t,
    ngx_str_t, ngx_uint_t, ngx_variable_value_t, NGX_HTTP_VAR_NOCACHEABLE, NGX_HTTP_VAR_PREFIX,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, Request};
use ngx::ngx_string;

use super::ctx::RequestCtx;
use super::trace;
use crate::nginx::no_panic;
use crate::nginx::request::{main_of, shared};
use crate::nginx::variable::{set_var, set_var_copy};
use crate::MeshModule;

const CLAIM_PREFIX: &str = "mesh_claim_";

struct Var {
    name: ngx_str_t,
    get: ngx_http_get_variable_pt,
    flags: u32,
}

/// Registers the variables (called from `preconfiguration`).
///
/// # Safety
/// `cf` must be nginx's configuration context during the http block's preconfiguration.
pub unsafe fn register(cf: *mut ngx_conf_t) -> Result<(), ()> {
    let vars = [
        Var {
            name: ngx_string!("mesh_caller"),
            get: Some(var_caller),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_provider"),
            get: Some(var_provider),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_auth_status"),
            get: Some(var_auth_status),
            flags: 0,
        },
        // The decision and the rule are made in the access phase, possibly after the
        // variable was first read, so they are never cached.
        Var {
            name: ngx_string!("mesh_decision"),
            get: Some(var_decision),
            flags: NGX_HTTP_VAR_NOCACHEABLE,
        },
        Var {
            name: ngx_string!("mesh_roles"),
            get: Some(var_roles),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_rule"),
            get: Some(var_rule),
            flags: NGX_HTTP_VAR_NOCACHEABLE,
        },
        Var {
            name: ngx_string!("mesh_config_version"),
            get: Some(var_config_version),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_trace_id"),
            get: Some(var_trace),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_span_id"),
            get: Some(var_trace),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_parent_span_id"),
            get: Some(var_trace),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_trace_sampled"),
            get: Some(var_trace),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_traceparent"),
            get: Some(var_trace),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_cloud_trace"),
            get: Some(var_trace),
            flags: 0,
        },
        Var {
            name: ngx_string!("mesh_claim_"),
            get: Some(var_claim),
            flags: NGX_HTTP_VAR_PREFIX,
        },
    ];
    for mut v in vars {
        // SAFETY: `ngx_http_add_variable` copies nothing it does not own: the name is static,
        // and the returned variable lives in the configuration pool.
        let var = unsafe { ngx_http_add_variable(cf, &mut v.name, v.flags as ngx_uint_t) };
        if var.is_null() {
            return Err(());
        }
        // SAFETY: `var` is non-null and points into the configuration. Trace variables share
        // one getter and tell themselves apart by name (`data`).
        unsafe {
            (*var).get_handler = v.get;
            (*var).data = TraceField::of(v.name.as_bytes()).map_or(0, |f| f as usize);
        }
    }
    Ok(())
}

/// Common shape of a getter: run `f` on the request context, never unwinding into nginx.
unsafe fn with_ctx(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    f: impl FnOnce(&Request, &RequestCtx, &mut ngx_variable_value_t) -> bool,
) -> ngx_int_t {
    no_panic(Status::NGX_ERROR.into(), || {
        // SAFETY: nginx calls variable getters with a live request and value slot.
        let (req, v) = unsafe { (shared(r), &mut *v) };
        let Some(ctx) = RequestCtx::of(req) else {
            return Status::NGX_ERROR.into();
        };
        if f(req, ctx, v) {
            Status::NGX_OK.into()
        } else {
            Status::NGX_ERROR.into()
        }
    })
}

unsafe extern "C" fn var_caller(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    // Copied: the context may be re-identified after an internal redirect, while nginx
    // keeps cached variable values.
    with_ctx(r, v, |req, ctx, v| {
        set_var_copy(req.as_ref(), v, ctx.identity().caller().as_bytes())
    })
}

unsafe extern "C" fn var_provider(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    with_ctx(r, v, |req, ctx, v| {
        set_var_copy(req.as_ref(), v, ctx.identity().provider().as_bytes())
    })
}

unsafe extern "C" fn var_auth_status(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    with_ctx(r, v, |_, ctx, v| {
        set_var(v, ctx.identity().status.as_str().as_bytes());
        true
    })
}

unsafe extern "C" fn var_decision(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    with_ctx(r, v, |_, ctx, v| {
        set_var(v, ctx.decision().map_or("", |d| d.as_str()).as_bytes());
        v.set_no_cacheable(1);
        true
    })
}

unsafe extern "C" fn var_roles(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    with_ctx(r, v, |req, ctx, v| {
        let id = ctx.identity();
        let roles = match MeshModule::location_conf(req) {
            Some(lcf) => roles_of(
                &lcf.roles,
                id.principal(),
                id.verified.as_ref().map(|v| &v.claims),
            )
            .join(","),
            None => String::new(),
        };
        set_var_copy(req.as_ref(), v, roles.as_bytes())
    })
}

unsafe extern "C" fn var_rule(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    with_ctx(r, v, |_, ctx, v| {
        // The rule's text lives in the configuration: pointed at, not copied.
        set_var(v, ctx.rule().as_bytes());
        v.set_no_cacheable(1);
        true
    })
}

/// Which trace variable a getter call is for (the variable's `data`).
#[derive(Clone, Copy)]
enum TraceField {
    TraceId = 1,
    SpanId,
    ParentSpanId,
    Sampled,
    TraceParent,
    CloudTrace,
}

impl TraceField {
    fn of(name: &[u8]) -> Option<TraceField> {
        Some(match name {
            b"mesh_trace_id" => TraceField::TraceId,
            b"mesh_span_id" => TraceField::SpanId,
            b"mesh_parent_span_id" => TraceField::ParentSpanId,
            b"mesh_trace_sampled" => TraceField::Sampled,
            b"mesh_traceparent" => TraceField::TraceParent,
            b"mesh_cloud_trace" => TraceField::CloudTrace,
            _ => return None,
        })
    }
}

unsafe extern "C" fn var_trace(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    no_panic(Status::NGX_ERROR.into(), || {
        // A subrequest shares its parent's variable cache, and its trace is the parent's:
        // read the main request's context. SAFETY: nginx calls variable getters with a live
        // request and value slot.
        let (req, v) = unsafe { (main_of(shared(r)), &mut *v) };
        let Some(lcf) = MeshModule::location_conf(req) else {
            return Status::NGX_ERROR.into();
        };
        if !lcf.trace {
            set_var(v, b"");
            return Status::NGX_OK.into();
        }
        let Some(ctx) = RequestCtx::of(req) else {
            return Status::NGX_ERROR.into();
        };
        let Some(t) = ctx.trace(req, lcf) else {
            set_var(v, b"");
            return Status::NGX_OK.into();
        };
        let text = match data {
            x if x == TraceField::TraceId as usize => t.ctx.trace_id_hex(),
            x if x == TraceField::SpanId as usize => t.ctx.span_id_hex(),
            x if x == TraceField::ParentSpanId as usize => t.ctx.parent_span_id_hex(),
            x if x == TraceField::Sampled as usize => {
                String::from(if t.ctx.sampled { "1" } else { "0" })
            }
            x if x == TraceField::TraceParent as usize => t.traceparent.as_str().to_owned(),
            x if x == TraceField::CloudTrace as usize => trace::cloud_logging(lcf, t),
            _ => String::new(),
        };
        if set_var_copy(req.as_ref(), v, text.as_bytes()) {
            Status::NGX_OK.into()
        } else {
            Status::NGX_ERROR.into()
        }
    })
}

unsafe extern "C" fn var_claim(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: for a prefix variable nginx passes the full variable name (`ngx_str_t *`) as
    // `data`, owned by the configuration.
    let name = unsafe { &*(data as *const ngx_str_t) };
    with_ctx(r, v, |req, ctx, v| {
        let claim = name
            .as_bytes()
            .get(CLAIM_PREFIX.len()..)
            .and_then(|n| std::str::from_utf8(n).ok());
        let text = match (claim, &ctx.identity().verified) {
            (Some(c), Some(verified)) => verified.claim_text(c),
            _ => None,
        };
        set_var_copy(req.as_ref(), v, text.unwrap_or_default().as_bytes())
    })
}

unsafe extern "C" fn var_config_version(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    no_panic(Status::NGX_ERROR.into(), || {
        // SAFETY: nginx calls variable getters with a live request and value slot.
        let (req, v) = unsafe { (shared(r), &mut *v) };
        // The label lives in the main configuration, which outlives every request.
        let label = MeshModule::main_conf(req).map_or("", |m| m.config_version.as_str());
        set_var(v, label.as_bytes());
        Status::NGX_OK.into()
    })
}
