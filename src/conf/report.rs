//! `mesh_access_report FILE [format=json|markdown];`: the access matrix of the configuration,
//! written at configuration time (start, reload, `nginx -t`).
//!
//! While merging, each server and location the audit turns into a route is noted here with
//! the access settings in force there (`record`); in `postconfiguration`, once the audit has
//! passed, the servers' names and addresses are read from the core module and the report is
//! written to every file asked for, each atomically (`mesh_core::report::write_atomically`).
//! What the report says and how it reads is `mesh_core::report`'s.

use std::path::Path;

use mesh_core::audit::{Route, RouteKind};
use mesh_core::report::{
    CallerLimit, Format, KeySource, LimitInfo, PatternInfo, ProviderInfo, Report, RouteInfo,
    RuleInfo, ServerInfo,
};
use ngx::ffi::{
    ngx_conf_t, ngx_http_complex_value_t, ngx_http_conf_addr_t, ngx_http_conf_port_t,
    ngx_http_core_srv_conf_t, ngx_http_server_name_t,
};
use ngx::http::{HttpModuleMainConf, HttpModuleServerConf, NgxHttpCoreModule};

use super::directive::{invalid, ConfError, Directive};
use super::{LocConf, MainConf};
use crate::nginx::conf::{full_path, ConfPos};
use crate::MeshModule;

/// One `mesh_access_report` line.
pub struct ReportFile {
    /// The full path (relative ones are taken from the configuration prefix).
    pub path: String,
    pub format: Format,
    pub pos: ConfPos,
}

/// `mesh_access_report FILE [format=json|markdown];`
pub fn directive(files: &mut Vec<ReportFile>, d: &Directive) -> Result<(), ConfError> {
    let file = d.word(1)?;
    if file.is_empty() {
        return Err(invalid("empty file name"));
    }
    let format = match d.args.get(2) {
        None => Format::Json,
        Some(w) => {
            let text = crate::nginx::conf::word(w)?;
            text.strip_prefix("format=")
                .and_then(Format::parse)
                .ok_or_else(|| {
                    invalid(format!(
                        "invalid parameter \"{text}\" (format=json or format=markdown)"
                    ))
                })?
        }
    };
    let path = full_path(d.cf, file);
    if files.iter().any(|f| f.path == path) {
        return Err(invalid(format!("\"{path}\" is written twice")));
    }
    files.push(ReportFile {
        path,
        format,
        pos: d.pos.clone(),
    });
    Ok(())
}

/// What merging gathers for the report.
#[derive(Default)]
pub struct Collected {
    servers: Vec<Server>,
}

struct Server {
    /// The core module's server configuration: its names, and the key to its addresses.
    cscf: *const ngx_http_core_srv_conf_t,
    file: String,
    line: usize,
    /// Its own route, until a `location /` shows it is never used.
    default_route: Option<RouteInfo>,
    locations: Vec<RouteInfo>,
}

/// After `conf` was merged: notes its route (`route`, from the audit) with what guards it.
/// `catches_all`: it is a `location /` directly in its server.
///
/// # Safety
/// `cf` must be nginx's configuration context during this module's `merge_loc_conf` of `conf`.
pub unsafe fn record(
    cf: *mut ngx_conf_t,
    collected: &mut Collected,
    route: Route,
    conf: &LocConf,
    catches_all: bool,
) {
    let info = route_info(route, conf);
    if info.route.kind == RouteKind::ServerDefault {
        // SAFETY: during merging `cf->ctx` is the merged server's http context, whose core
        // server configuration lives as long as the cycle.
        let cscf = unsafe { NgxHttpCoreModule::server_conf(&*cf) }
            .map_or(std::ptr::null(), |c| c as *const _);
        collected.servers.push(Server {
            cscf,
            file: info.route.file.clone(),
            line: info.route.line,
            default_route: Some(info),
            locations: Vec::new(),
        });
        return;
    }
    let Some(server) = collected.servers.last_mut() else {
        return;
    };
    if catches_all {
        server.default_route = None;
    }
    server.locations.push(info);
}

/// The text of a complex value as written in the configuration.
///
/// # Safety
/// `cv` must be a complex value compiled into this configuration's pool (`mesh_token`, `key=`).
unsafe fn complex_text(cv: std::ptr::NonNull<ngx_http_complex_value_t>) -> String {
    // SAFETY: see the function's contract; `value` is the source text nginx keeps beside the
    // compiled code, in the same pool.
    unsafe { cv.as_ref() }.value.to_string()
}

fn route_info(route: Route, conf: &LocConf) -> RouteInfo {
    let roles = conf.roles.as_slice();
    let rate_limit = conf.rate_limit.as_ref().map(|rl| LimitInfo {
        zone: rl.zone_name.clone(),
        global: rl
            .zone()
            .and_then(|z| z.sync.as_ref())
            .map(|s| s.shown.clone()),
        rate: rl.gcra.rate.to_string(),
        burst: rl.gcra.burst,
        // SAFETY: `key=` was compiled by `mesh_rate_limit` into the configuration pool.
        key: rl.key.map(|k| unsafe { complex_text(k) }),
        callers: conf
            .rate_callers
            .iter()
            .map(|c| CallerLimit {
                pattern: PatternInfo::of(&c.pattern, roles),
                rate: c.gcra.rate.to_string(),
                burst: c.gcra.burst,
            })
            .collect(),
        dry_run: conf.rate_dry_run,
        status: conf.rate_status,
    });
    RouteInfo {
        route,
        checked: conf.require_auth,
        // SAFETY: `mesh_token` was compiled into the configuration pool.
        token: conf.token.map(|t| unsafe { complex_text(t) }),
        audience: conf.audience.as_deref().cloned(),
        rules: conf
            .rules
            .rules()
            .iter()
            .map(|r| RuleInfo::of(r, roles))
            .collect(),
        policy_dry_run: conf.policy_dry_run,
        rate_limit,
        outbound_auth: conf.outbound_auth.as_ref().map(|t| format!("${}", t.var)),
    }
}

/// In `postconfiguration`, after the audit passed: writes every `mesh_access_report` file.
/// A file that cannot be written fails the configuration at its directive's file:line.
///
/// # Safety
/// `cf` must be nginx's configuration context in `postconfiguration`.
pub unsafe fn finish(cf: *mut ngx_conf_t) -> Result<(), ()> {
    crate::nginx::no_panic(Err(()), || {
        // SAFETY: see the function's contract: the http block was parsed, so this module's
        // main configuration exists.
        let Some(mcf) = (unsafe { MeshModule::main_conf_mut(&*cf) }) else {
            return Err(());
        };
        // SAFETY: as this function's contract.
        unsafe { write(cf, mcf) }
    })
}

/// `finish`, which catches a panic.
///
/// # Safety
/// As `finish`.
unsafe fn write(cf: *mut ngx_conf_t, mcf: &mut MainConf) -> Result<(), ()> {
    let collected = std::mem::take(&mut mcf.report);
    if mcf.reports.is_empty() {
        return Ok(());
    }
    // SAFETY: see the function's contract.
    let listen = unsafe { addresses(cf) };
    let report = Report {
        config_version: (!mcf.config_version.is_empty()).then(|| mcf.config_version.clone()),
        providers: mcf.providers.iter().map(|p| provider_info(p)).collect(),
        outbound_tokens: mcf
            .outbound
            .iter()
            .map(|t| (format!("${}", t.var), t.audience.clone()))
            .collect(),
        servers: collected
            .servers
            .into_iter()
            .map(|s| ServerInfo {
                // SAFETY: `cscf` is null or the core module's configuration of this server.
                names: unsafe { server_names(s.cscf) },
                listen: listen
                    .iter()
                    .filter(|(c, _)| *c == s.cscf)
                    .map(|(_, a)| a.clone())
                    .collect(),
                file: s.file,
                line: s.line,
                routes: s.default_route.into_iter().chain(s.locations).collect(),
            })
            .collect(),
    };
    let (mut json, mut markdown) = (None, None);
    for f in &mcf.reports {
        let text = match f.format {
            Format::Json => json.get_or_insert_with(|| report.to_json()),
            Format::Markdown => markdown.get_or_insert_with(|| report.to_markdown()),
        };
        if let Err(e) = mesh_core::report::write_atomically(Path::new(&f.path), text) {
            f.pos.error(
                cf,
                &format!("mesh_access_report: cannot write \"{}\": {e}", f.path),
            );
            return Err(());
        }
    }
    Ok(())
}

fn provider_info(p: &crate::state::provider::MeshProvider) -> ProviderInfo {
    let snap = p.snapshot();
    ProviderInfo {
        name: p.name.clone(),
        issuers: snap.issuers.clone(),
        audiences: snap.audiences.clone(),
        algorithms: p
            .configured_algorithms()
            .unwrap_or_default()
            .iter()
            .map(|a| mesh_core::keys::algorithm_name(*a).to_string())
            .collect(),
        keys: match &p.url {
            Some(u) if u.discovery.is_some() => KeySource::discovery(&u.url),
            Some(u) => KeySource::url(&u.url),
            None => p.key_file.clone().unwrap_or(KeySource::Unknown),
        },
        principal: snap.principal.clone(),
        leeway_secs: snap.leeway,
        require: snap
            .require
            .iter()
            .map(|r| format!("{}={}", r.path_text(), r.value))
            .collect(),
        platform_verified: p.platform_verified,
    }
}

/// A server's `server_name` values, as written (nginx keeps a regex name without its `~`).
///
/// # Safety
/// `cscf` must be null or a core server configuration of the cycle being configured.
unsafe fn server_names(cscf: *const ngx_http_core_srv_conf_t) -> Vec<String> {
    // SAFETY: see the function's contract; `server_names` is an array of
    // `ngx_http_server_name_t` in the configuration pool.
    unsafe {
        let Some(c) = cscf.as_ref() else {
            return Vec::new();
        };
        array::<ngx_http_server_name_t>(&c.server_names)
            .iter()
            .map(|n| {
                let name = n.name.to_string();
                if n.regex.is_null() {
                    name
                } else {
                    format!("~{name}")
                }
            })
            .collect()
    }
}

/// Every address a server listens on, as nginx prints it, with its server: from the core
/// module's ports (complete once every server was merged: the core module adds the implicit
/// `listen` of a server without one when it merges it).
///
/// # Safety
/// `cf` must be nginx's configuration context in `postconfiguration`.
unsafe fn addresses(cf: *mut ngx_conf_t) -> Vec<(*const ngx_http_core_srv_conf_t, String)> {
    let mut out = Vec::new();
    // SAFETY: see the function's contract: the core module's main configuration exists;
    // `ports` is NULL or an array of `ngx_http_conf_port_t`, each with an array of
    // `ngx_http_conf_addr_t`, each with an array of server configuration pointers, all in
    // the configuration pool.
    unsafe {
        let Some(cmcf) = NgxHttpCoreModule::main_conf(&*cf) else {
            return out;
        };
        let Some(ports) = cmcf.ports.as_ref() else {
            return out;
        };
        for port in array::<ngx_http_conf_port_t>(ports) {
            for addr in array::<ngx_http_conf_addr_t>(&port.addrs) {
                let text = addr.opt.addr_text.to_string();
                for s in array::<*mut ngx_http_core_srv_conf_t>(&addr.servers) {
                    out.push((s.cast_const(), text.clone()));
                }
            }
        }
    }
    out
}

/// An nginx array as a slice.
///
/// # Safety
/// `a` must hold `nelts` elements of type `T` (or be empty).
unsafe fn array<T>(a: &ngx::ffi::ngx_array_t) -> &[T] {
    if a.elts.is_null() || a.nelts == 0 {
        return &[];
    }
    // SAFETY: see the function's contract.
    unsafe { std::slice::from_raw_parts(a.elts as *const T, a.nelts) }
}
