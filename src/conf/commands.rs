//! The command table: every `mesh_*` directive, where it may stand, and what parses it, in the
//! order of README's reference (as nginx's C modules list theirs).
//!
//! `once!` sets an `Option` field of the level's configuration a single time (a second line
//! is a duplicate); `each!` adds to a list on every line (rules, roles, providers, zones). Both go
//! through `directive::directive`, which reports errors.

use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_2MORE,
    NGX_CONF_BLOCK, NGX_CONF_FLAG, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE12,
    NGX_CONF_TAKE2, NGX_CONF_TAKE3, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_SRV_CONF,
};
use ngx::ngx_string;

use super::directive::{directive, flag, set_once, ContentHandlers};
use super::{
    identity, keys, log, metrics, outbound, policy, provider, rate_limit, report, trace, LocConf,
    MainConf,
};

const M: u32 = NGX_HTTP_MAIN_CONF;
const MS: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF;
const MSL: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

type Set = unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

const fn command(name: ngx_str_t, type_: u32, set: Set, conf: usize) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: type_ as ngx_uint_t,
        set: Some(set),
        conf,
        offset: 0,
        post: ptr::null_mut(),
    }
}

/// A directive that sets `$conf.set.$field` once, to what `$parse(&Directive)` returns.
macro_rules! once {
    ($name:literal, $type:expr, $conf:ty, $field:ident, $parse:expr) => {{
        unsafe extern "C" fn set(
            cf: *mut ngx_conf_t,
            _cmd: *mut ngx_command_t,
            conf: *mut c_void,
        ) -> *mut c_char {
            // SAFETY: nginx passes the object of this command's level, `$conf`.
            unsafe {
                directive(cf, conf, |c: &mut $conf, d| {
                    set_once(&mut c.set.$field, || $parse(d))
                })
            }
        }
        command(ngx_string!($name), $type, set, <$conf as Level>::OFFSET)
    }};
}

/// A directive that adds to the list `$conf.$field` on every line: `$add(&mut list, &Directive)`.
macro_rules! each {
    ($name:literal, $type:expr, $conf:ty, $($field:ident).+, $add:expr) => {{
        unsafe extern "C" fn set(
            cf: *mut ngx_conf_t,
            _cmd: *mut ngx_command_t,
            conf: *mut c_void,
        ) -> *mut c_char {
            // SAFETY: nginx passes the object of this command's level, `$conf`.
            unsafe { directive(cf, conf, |c: &mut $conf, d| $add(&mut c.$($field).+, d)) }
        }
        command(ngx_string!($name), $type, set, <$conf as Level>::OFFSET)
    }};
}

/// Which configuration object nginx passes for a directive of this type (the command's
/// `conf` field).
trait Level {
    const OFFSET: usize;
}

impl Level for MainConf {
    const OFFSET: usize = NGX_HTTP_MAIN_CONF_OFFSET;
}

impl Level for LocConf {
    const OFFSET: usize = NGX_HTTP_LOC_CONF_OFFSET;
}

const T1: u32 = NGX_CONF_TAKE1;
const T23: u32 = NGX_CONF_TAKE2 | NGX_CONF_TAKE3;
const FLAG: u32 = NGX_CONF_FLAG;

/// Entries of the table, the terminating empty one included.
pub const COUNT: usize = 35;

/// The table, with `H`'s content handlers.
#[rustfmt::skip]
pub const fn table<H: ContentHandlers>() -> [ngx_command_t; COUNT] { [
    // identity
    each!("mesh_provider",          M | NGX_CONF_BLOCK | T1, MainConf, providers,        provider::block),
    once!("mesh_auth",              MSL | NGX_CONF_1MORE,    LocConf,  auth,             identity::auth),
    once!("mesh_token",             MSL | T1,                LocConf,  token,            identity::token),
    once!("mesh_audience",          MSL | NGX_CONF_1MORE,    LocConf,  audience,         identity::audience),
    once!("mesh_token_cache",       M | T1,                  MainConf, token_cache,      identity::token_cache),
    once!("mesh_realm",             MSL | T1,                LocConf,  realm,            identity::realm),
    once!("mesh_require_auth",      MS | FLAG,               LocConf,  require_auth,     flag),
    // authorization
    each!("mesh_role",              MS | NGX_CONF_2MORE,     LocConf,  set.roles,        policy::role),
    each!("mesh_allow",             MSL | NGX_CONF_1MORE,    LocConf,  set.rules,        policy::allow),
    each!("mesh_deny",              MSL | NGX_CONF_1MORE,    LocConf,  set.rules,        policy::deny),
    once!("mesh_policy_dry_run",    MSL | FLAG,              LocConf,  policy_dry_run,   flag),
    // rate limits
    each!("mesh_rate_limit_zone",   M | NGX_CONF_2MORE,      MainConf, zones,            rate_limit::zone),
    once!("mesh_rate_limit",        MSL | NGX_CONF_1MORE,    LocConf,  rate_limit,       rate_limit::limit),
    each!("mesh_rate_limit_caller", MSL | NGX_CONF_2MORE,    LocConf,  set.rate_callers, rate_limit::caller),
    once!("mesh_rate_limit_status", MSL | T1,                LocConf,  rate_status,      rate_limit::status),
    once!("mesh_rate_limit_headers", MSL | FLAG,             LocConf,  rate_headers,     flag),
    once!("mesh_rate_limit_dry_run", MSL | FLAG,             LocConf,  rate_dry_run,     flag),
    // trace context
    once!("mesh_trace",             MSL | FLAG,              LocConf,  trace,            flag),
    once!("mesh_trace_sample",      MSL | T1,                LocConf,  trace_sample,     trace::sample),
    once!("mesh_trace_project",     MS | T1,                 LocConf,  trace_project,    trace::project),
    once!("mesh_trace_response",    MSL | FLAG,              LocConf,  trace_response,   flag),
    once!("mesh_trace_export",      M | NGX_CONF_1MORE,      MainConf, trace_export,     trace::export),
    once!("mesh_trace_service",     M | T1,                  MainConf, trace_service,    trace::service),
    // identity forwarding, outbound identity, operations
    once!("mesh_forward_identity",  MSL | FLAG,              LocConf,  forward_identity, flag),
    each!("mesh_outbound_token",    M | T23,                 MainConf, outbound,         outbound::token),
    once!("mesh_outbound_auth",     MSL | T1,                LocConf,  outbound_auth,    outbound::auth),
    once!("mesh_metadata_server",   M | T1,                  MainConf, metadata_server,  outbound::metadata_server),
    once!("mesh_log_level",         MSL | T1,                LocConf,  log_level,        log::level),
    once!("mesh_keys_wait",         M | T1,                  MainConf, keys_wait,        keys::wait),
    command(ngx_string!("mesh_ready"), NGX_HTTP_LOC_CONF | ngx::ffi::NGX_CONF_NOARGS, keys::ready::<H>, NGX_HTTP_LOC_CONF_OFFSET),
    command(ngx_string!("mesh_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, metrics::mesh_status::<H>, NGX_HTTP_LOC_CONF_OFFSET),
    once!("mesh_metrics_callers",   M | T1,                  MainConf, metrics_callers,  log::metrics_callers),
    once!("mesh_config_version",    M | T1,                  MainConf, config_version,   identity::config_version),
    each!("mesh_access_report",     M | NGX_CONF_TAKE12,     MainConf, reports,          report::directive),
    ngx_command_t::empty(),
] }
