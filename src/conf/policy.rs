//! Authorization: `mesh_role`, `mesh_allow`, `mesh_deny` (parsed by `mesh_core::policy`).

use mesh_core::policy::{parse_role, parse_rule, Effect};

use std::sync::Arc;

use mesh_core::policy::{RoleBinding, Rule};

use ngx::http::HttpModuleMainConf;

use super::directive::{invalid, push, ConfError, Directive};
use crate::MeshModule;

/// The list a level's `mesh_role` (or `mesh_allow`/`mesh_deny`) lines build.
type List<T> = Option<Arc<Vec<T>>>;

/// `mesh_role NAME PATTERN ...;`
pub fn role(roles: &mut List<RoleBinding>, d: &Directive) -> Result<(), ConfError> {
    let w = d.values()?;
    let patterns: Vec<&str> = w[1..].iter().map(String::as_str).collect();
    push(roles, parse_role(&w[0], &patterns).map_err(invalid)?)
}

/// `mesh_allow PATTERN ... [methods=M,...] [provider=NAME,...];`
pub fn allow(rules: &mut List<Rule>, d: &Directive) -> Result<(), ConfError> {
    rule(rules, d, Effect::Allow)
}

/// `mesh_deny PATTERN ... [methods=M,...] [provider=NAME,...];`
pub fn deny(rules: &mut List<Rule>, d: &Directive) -> Result<(), ConfError> {
    rule(rules, d, Effect::Deny)
}

fn rule(rules: &mut List<Rule>, d: &Directive, effect: Effect) -> Result<(), ConfError> {
    let w = d.values()?;
    let args: Vec<&str> = w.iter().map(String::as_str).collect();
    let rule = parse_rule(effect, &args, d.text()).map_err(invalid)?;
    if let Some(names) = &rule.providers {
        // SAFETY: mesh_allow/mesh_deny are http/server/location directives, so `cf->ctx` is
        // an http configuration context holding this module's main configuration.
        let Some(mcf) = (unsafe { MeshModule::main_conf_mut(&*d.cf) }) else {
            return Err(ConfError::Message("no http configuration".into()));
        };
        for n in names {
            mcf.set.rule_providers.push((n.clone(), d.pos.clone()));
        }
    }
    push(rules, rule)
}
