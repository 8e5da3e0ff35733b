//! What other modules configured in the level being merged: read for `mesh_require_auth`.
//!
//! While nginx merges a level, `cf->ctx` points at that level's own configuration context
//! (`ngx_http_merge_servers` and `ngx_http_merge_locations` set it before each merge), so the
//! core module's and the rewrite module's configurations of that level can be read there.

use std::ffi::{c_char, CStr};

use ngx::ffi::{
    ngx_array_t, ngx_conf_t, ngx_flag_t, ngx_http_complex_value_t, ngx_http_conf_ctx_t,
    ngx_http_script_return_code, ngx_module_t, ngx_str_t, ngx_uint_t, NGX_HTTP_MODULE,
    NGX_HTTP_SATISFY_ANY,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};

/// The rewrite module's location configuration, as `ngx_http_rewrite_module.c` defines it
/// (the same in every nginx from 1.22 to 1.28). It is private to that file, so it is
/// declared here; only `codes`, its first member, is read.
#[repr(C)]
struct RewriteLocConf {
    /// The compiled `return`, `rewrite`, `set`, `if`, `break` of this level, in order: a byte
    /// array of code entries, each starting with its handler's address.
    codes: *mut ngx_array_t,
    _stack_size: ngx_uint_t,
    _log: ngx_flag_t,
    _uninitialized_variable_warn: ngx_flag_t,
}

/// The access module's location configuration (`ngx_http_access_module.c`, private there):
/// the `allow`/`deny` rules for IPv4, IPv6 and unix-domain clients, each an array whose
/// elements end with the rule's `deny` flag (the same from 1.22 to 1.28, on builds with IPv6
/// and unix-domain sockets, as Debian's and the vendored one are).
#[repr(C)]
struct AccessLocConf {
    rules: *mut ngx_array_t,
    rules6: *mut ngx_array_t,
    rules_un: *mut ngx_array_t,
}

/// `auth_basic`'s location configuration (`ngx_http_auth_basic_module.c`): `realm` is set
/// by `auth_basic` (to a value that may be `off`).
#[repr(C)]
struct AuthBasicLocConf {
    realm: *mut ngx_http_complex_value_t,
    _user_file: ngx_http_complex_value_t,
}

/// `auth_request`'s location configuration (`ngx_http_auth_request_module.c`): `uri` is
/// empty when off.
#[repr(C)]
struct AuthRequestLocConf {
    uri: ngx_str_t,
    _vars: *mut ngx_array_t,
}

/// An access module of nginx that, under `satisfy any`, admits a request by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// An `allow` rule.
    Allow,
    /// `auth_basic`.
    AuthBasic,
    /// `auth_request`.
    AuthRequest,
}

/// Under `satisfy any`, the first access module of the level being merged that can admit a
/// request without a token: an `allow` rule, `auth_basic` (not `off`), `auth_request`.
///
/// # Safety
/// `cf` must be nginx's configuration context during a `merge_loc_conf` call (those modules,
/// listed before this one, have merged the level already).
pub unsafe fn satisfy_any_bypass(cf: *mut ngx_conf_t) -> Option<Bypass> {
    // SAFETY: as in `answers_with_return`: each module's slot of the merged level's
    // `loc_conf` holds what its `create_loc_conf` made, declared above as those modules
    // define it; the rule arrays hold whole elements of `size` bytes, each ending with its
    // `deny` flag (an `ngx_uint_t`), read unaligned all the same.
    unsafe {
        let clcf = NgxHttpCoreModule::location_conf(&*cf)?;
        if clcf.satisfy != NGX_HTTP_SATISFY_ANY as ngx_uint_t {
            return None;
        }
        let ctx = (*cf).ctx as *const ngx_http_conf_ctx_t;
        if ctx.is_null() || (*ctx).loc_conf.is_null() {
            return None;
        }
        let conf_of = |name: &CStr| {
            http_module_index(cf, name)
                .map(|i| *(*ctx).loc_conf.add(i))
                .filter(|c| !c.is_null())
        };
        if let Some(c) = conf_of(c"ngx_http_access_module") {
            let c = &*(c as *const AccessLocConf);
            let allows = |a: *mut ngx_array_t| {
                if a.is_null() || (*a).elts.is_null() || (*a).size < size_of::<ngx_uint_t>() {
                    return false;
                }
                let (elts, size) = ((*a).elts as *const u8, (*a).size);
                (0..(*a).nelts).any(|i| {
                    let deny = elts.add(i * size + size - size_of::<ngx_uint_t>());
                    std::ptr::read_unaligned(deny as *const ngx_uint_t) == 0
                })
            };
            if allows(c.rules) || allows(c.rules6) || allows(c.rules_un) {
                return Some(Bypass::Allow);
            }
        }
        if let Some(c) = conf_of(c"ngx_http_auth_basic_module") {
            let realm = (*(c as *const AuthBasicLocConf)).realm;
            // `auth_basic off` is a constant "off"; anything else may ask for a password.
            if !realm.is_null() && (*realm).value.as_bytes() != b"off" {
                return Some(Bypass::AuthBasic);
            }
        }
        if let Some(c) = conf_of(c"ngx_http_auth_request_module") {
            if (*(c as *const AuthRequestLocConf)).uri.len > 0 {
                return Some(Bypass::AuthRequest);
            }
        }
        None
    }
}

/// Whether the level being merged says `internal;`.
///
/// # Safety
/// `cf` must be nginx's configuration context during a `merge_loc_conf` call.
pub unsafe fn is_internal(cf: *mut ngx_conf_t) -> bool {
    // SAFETY: during merging `cf->ctx` is the merged level's http context, whose core
    // location configuration exists (the core module creates one for every level).
    unsafe { NgxHttpCoreModule::location_conf(&*cf).is_some_and(|clcf| clcf.internal != 0) }
}

/// Whether the first rewrite-module directive of the level being merged is `return`: then
/// nginx answers every request of that level with it, in the (server) rewrite phase, before
/// anything else of the level runs. `false` when nginx was built without the rewrite module.
///
/// # Safety
/// `cf` must be nginx's configuration context during a `merge_loc_conf` call.
pub unsafe fn answers_with_return(cf: *mut ngx_conf_t) -> bool {
    // SAFETY: `cf->cycle->modules` is nginx's NULL-terminated module table, complete while
    // configuration is read; `cf->ctx` is the merged level's http context, whose `loc_conf`
    // has one slot per http module (by `ctx_index`), each created by that module's
    // `create_loc_conf`: the rewrite module's is a `RewriteLocConf`. Its `codes` is NULL or
    // an array of bytes (`ngx_http_script_start_code` creates it with element size 1) holding
    // whole code entries, each beginning with a code handler's address; it is read unaligned
    // all the same.
    unsafe {
        let Some(index) = http_module_index(cf, c"ngx_http_rewrite_module") else {
            return false;
        };
        let ctx = (*cf).ctx as *const ngx_http_conf_ctx_t;
        if ctx.is_null() || (*ctx).loc_conf.is_null() {
            return false;
        }
        let rlcf = (*(*ctx).loc_conf.add(index)) as *const RewriteLocConf;
        if rlcf.is_null() || (*rlcf).codes.is_null() {
            return false;
        }
        let codes = &*(*rlcf).codes;
        if codes.elts.is_null() || codes.nelts * codes.size < size_of::<usize>() {
            return false;
        }
        let first = std::ptr::read_unaligned(codes.elts as *const usize);
        first == ngx_http_script_return_code as *const () as usize
    }
}

/// The `ctx_index` of the http module called `name`, if nginx has it.
///
/// # Safety
/// `cf` must be nginx's configuration context while the configuration is read.
unsafe fn http_module_index(cf: *mut ngx_conf_t, name: &CStr) -> Option<usize> {
    // SAFETY: see `answers_with_return`; each entry's `name` is a static C string.
    unsafe {
        let mut m = (*(*cf).cycle).modules as *const *mut ngx_module_t;
        if m.is_null() {
            return None;
        }
        while !(*m).is_null() {
            let module = &**m;
            if module.type_ == NGX_HTTP_MODULE as ngx_uint_t
                && !module.name.is_null()
                && CStr::from_ptr(module.name as *const c_char) == name
            {
                return Some(module.ctx_index);
            }
            m = m.add(1);
        }
        None
    }
}
