//! Merging: what a level did not set is inherited, then everything is resolved into the
//! plain values the request path reads (as `ngx_conf_merge_value` does in C).

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use mesh_core::otlp::{Attr, Resource};
use mesh_core::policy::RuleSet;
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::ngx_conf_t;
use ngx::http::HttpModuleMainConf;

use super::directive::ConfError;
use super::{audit, report, Auth, AuthSpec, LocConf, MainConf, TRACE_PROJECT_ENV};
use crate::state::span_export::TraceExport;
use crate::MeshModule;

/// `init_main_conf`: the http-level values in force.
///
/// # Safety
/// Called by nginx with its configuration context and this module's main configuration.
pub unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
    crate::nginx::no_panic(NGX_CONF_ERROR, || {
        // SAFETY: nginx passes the MainConf this module created.
        let mcf = unsafe { &mut *conf.cast::<MainConf>() };
        // `provider=` of the rules: every name must be a mesh_provider block (all are read
        // by now: the blocks are http-level only).
        for (name, pos) in std::mem::take(&mut mcf.set.rule_providers) {
            if !mcf.providers.iter().any(|p| p.name == name) {
                let msg = format!(
                    "provider=: unknown provider \"{name}\" (no mesh_provider block of that name)"
                );
                return ConfError::At(pos, msg).report(cf, "");
            }
        }
        if let Some(v) = mcf.set.metadata_server.take() {
            mcf.metadata_server = v;
        }
        if let Some(v) = mcf.set.token_cache {
            mcf.token_cache = v;
        }
        if let Some(v) = mcf.set.config_version.take() {
            mcf.config_version = v;
        }
        mcf.keystore.wait_ms = mcf.set.keys_wait;
        if let Some(n) = mcf.set.metrics_callers {
            mcf.metrics.callers = n;
        }
        // Read once, here in the master: nginx clears the environment of its workers.
        mcf.trace_project_env = std::env::var(TRACE_PROJECT_ENV).ok();
        mcf.trace_export = mcf.set.trace_export.take().map(|settings| {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let resource = span_resource(
                mcf.set.trace_service.take(),
                env("K_SERVICE"),
                env("K_REVISION"),
                mcf.trace_project_env.clone().filter(|v| !v.is_empty()),
                &mcf.config_version,
            );
            Arc::new(TraceExport {
                settings,
                resource,
                metadata_server: mcf.metadata_server.clone(),
            })
        });
        NGX_CONF_OK
    })
}

/// The resource every exported span names: `service.name` from `mesh_trace_service`, else
/// Cloud Run's `K_SERVICE`, else `nginx`; on Cloud Run (`K_SERVICE` set) the platform and the
/// revision; the project when known (Cloud Trace files spans under `gcp.project_id`).
fn span_resource(
    service: Option<String>,
    k_service: Option<String>,
    k_revision: Option<String>,
    project: Option<String>,
    config_version: &str,
) -> Resource {
    let mut attributes = vec![Attr::str(
        "service.name",
        service
            .or_else(|| k_service.clone())
            .unwrap_or_else(|| "nginx".into()),
    )];
    if let Some(rev) = k_revision {
        attributes.push(Attr::str("service.version", rev));
    }
    if k_service.is_some() {
        attributes.push(Attr::str("cloud.provider", "gcp"));
        attributes.push(Attr::str("cloud.platform", "gcp_cloud_run"));
    }
    if let Some(p) = project {
        attributes.push(Attr::str("gcp.project_id", p));
    }
    if !config_version.is_empty() {
        attributes.push(Attr::str("mesh.config_version", config_version.to_owned()));
    }
    Resource {
        attributes,
        scope_name: "ngx-mesh".into(),
        scope_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Resolves the provider names of a `mesh_auth` against the `mesh_provider` blocks. Done at
/// merge time so that `mesh_auth` may come before the blocks it names.
fn resolve_auth(mcf: &MainConf, auth: &mut Option<Auth>) -> Result<(), ConfError> {
    let Some(Auth::On(spec)) = auth else {
        return Ok(());
    };
    if !spec.providers.is_empty() {
        return Ok(());
    }
    let mut providers = Vec::with_capacity(spec.names.len());
    for name in &spec.names {
        match mcf.providers.iter().find(|p| &p.name == name) {
            Some(p) => providers.push(p.clone()),
            None => {
                let msg = format!(
                    "mesh_auth: unknown provider \"{name}\" (no mesh_provider block of that name)"
                );
                return Err(ConfError::At(spec.pos.clone(), msg));
            }
        }
    }
    let audiences = providers
        .iter()
        .map(|p| p.snapshot().audiences.clone())
        .collect();
    *spec = Arc::new(AuthSpec {
        optional: spec.optional,
        names: spec.names.clone(),
        pos: spec.pos.clone(),
        providers,
        audiences,
    });
    Ok(())
}

/// nginx's inheritance: a level that sets a directive replaces what it inherits.
fn inherit<T: Clone>(conf: &mut Option<T>, prev: &Option<T>) {
    if conf.is_none() {
        conf.clone_from(prev);
    }
}

/// `merge_loc_conf`.
///
/// # Safety
/// Called by nginx with its configuration context and two distinct location configurations
/// this module created.
pub unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    crate::nginx::no_panic(NGX_CONF_ERROR, || {
        // SAFETY: see the function's contract; merging happens inside the http block, where
        // this module's main configuration exists.
        let (prev, conf, mcf) = unsafe {
            (
                &mut *prev.cast::<LocConf>(),
                &mut *conf.cast::<LocConf>(),
                MeshModule::main_conf_mut(&*cf),
            )
        };
        let Some(mcf) = mcf else {
            return NGX_CONF_ERROR;
        };
        if let Err(e) = merge(mcf, prev, conf) {
            return e.report(cf, "");
        }
        // SAFETY: this is the module's `merge_loc_conf` of `conf`.
        let recorded = unsafe { audit::record(cf, &mut mcf.audit, prev, conf) };
        // The access report's notes, only when a report is written (`mesh_access_report` is
        // an http-level directive, all read before merging starts).
        if let (Some(r), false) = (recorded, mcf.reports.is_empty()) {
            // SAFETY: as above.
            unsafe { report::record(cf, &mut mcf.report, r.route, conf, r.catches_all) };
        }
        NGX_CONF_OK
    })
}

/// Indexes the rules a level wrote, once: levels that inherit them share the index.
fn index_rules(set: &mut super::LocSet) {
    if let (Some(rules), None) = (&set.rules, &set.rule_set) {
        set.rule_set = Some(Arc::new(RuleSet::new(rules.to_vec())));
    }
}

fn merge(mcf: &mut MainConf, prev: &mut LocConf, conf: &mut LocConf) -> Result<(), ConfError> {
    // The http-level configuration is only ever `prev`, so resolve both sides.
    resolve_auth(mcf, &mut prev.set.auth)?;
    resolve_auth(mcf, &mut conf.set.auth)?;
    let (wrote, parent_wrote) = (conf.set.auth.is_some(), prev.set.auth.is_some());
    conf.facts.inherit(&prev.facts, wrote, parent_wrote);
    index_rules(&mut prev.set);
    index_rules(&mut conf.set);
    // Resolved where written (so an unknown variable is reported at its line), then inherited.
    for set in [&mut prev.set, &mut conf.set] {
        if let (Some(a), None) = (&set.outbound_auth, &set.outbound_token) {
            set.outbound_token = Some(super::outbound::resolve_auth(&mcf.outbound, a)?);
        }
    }
    let (s, p) = (&mut conf.set, &prev.set);
    inherit(&mut s.auth, &p.auth);
    inherit(&mut s.token, &p.token);
    inherit(&mut s.audience, &p.audience);
    inherit(&mut s.realm, &p.realm);
    inherit(&mut s.roles, &p.roles);
    inherit(&mut s.rules, &p.rules);
    inherit(&mut s.rule_set, &p.rule_set);
    inherit(&mut s.policy_dry_run, &p.policy_dry_run);
    inherit(&mut s.rate_limit, &p.rate_limit);
    inherit(&mut s.rate_callers, &p.rate_callers);
    inherit(&mut s.rate_status, &p.rate_status);
    inherit(&mut s.rate_headers, &p.rate_headers);
    inherit(&mut s.rate_dry_run, &p.rate_dry_run);
    inherit(&mut s.trace, &p.trace);
    inherit(&mut s.trace_sample, &p.trace_sample);
    inherit(&mut s.trace_project, &p.trace_project);
    inherit(&mut s.trace_response, &p.trace_response);
    inherit(&mut s.forward_identity, &p.forward_identity);
    inherit(&mut s.log_level, &p.log_level);
    inherit(&mut s.outbound_token, &p.outbound_token);
    inherit(&mut s.require_auth, &p.require_auth);
    for rl in [&prev.set.rate_limit, &conf.set.rate_limit]
        .into_iter()
        .flatten()
    {
        if rl.zone().is_none() {
            return Err(ConfError::At(
                rl.pos.clone(),
                format!(
                    "mesh_rate_limit: unknown zone \"{}\" (no mesh_rate_limit_zone of that name)",
                    rl.zone_name
                ),
            ));
        }
    }
    // A global zone holds what Redis says a key owes to the widest limit charging it here.
    if let Some(rl) = &conf.set.rate_limit {
        if let Some(zone) = rl.zone() {
            let callers = conf
                .set
                .rate_callers
                .iter()
                .flat_map(|c| c.iter().map(|c| c.gcra));
            zone.widen_owed_bound(mesh_core::ratesync::owed_bound(
                std::iter::once(rl.gcra).chain(callers),
            ));
        }
    }
    let env = mcf.trace_project_env.as_deref();
    prev.resolve(env);
    conf.resolve(env);
    // An `if` block in a location counts under its location.
    if conf.route.is_empty() {
        conf.route.clone_from(&prev.route);
    }
    if conf.outbound_auth.is_some() && conf.facts.is_location() && !mcf.routes.contains(&conf.route)
    {
        mcf.routes.push(conf.route.clone());
    }
    Ok(())
}
