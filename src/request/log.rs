//! The one line per refusal (or dry-run would-refusal), at `mesh_log_level` (default `info`):
//! caller, reason, rule, trace. Never the token or a claim value.

use mesh_core::decision::Decision;
use ngx::ffi::ngx_int_t;
use ngx::http::{HttpModuleLocationConf, Request};

use super::ctx::RequestCtx;
use crate::conf::log::DEFAULT_LOG_LEVEL;
use crate::MeshModule;

pub fn log_refusal(r: &Request, ctx: &RequestCtx, code: ngx_int_t, what: &str) {
    let id = ctx.identity();
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let caller = or_dash(id.caller());
    let rule = or_dash(ctx.rule());
    let reason = or_dash(&id.reason);
    let decision = ctx.decision().map_or("-", Decision::as_str);
    let trace = ctx
        .started_trace()
        .map_or(String::from("-"), |t| t.ctx.trace_id_hex());
    let level = MeshModule::location_conf(r).map_or(DEFAULT_LOG_LEVEL, |lcf| lcf.log_level);
    ngx::ngx_log_error!(
        level,
        r.log(),
        "mesh: {} {what}: decision: {decision}, status: {}, reason: {reason}, caller: \"{caller}\", rule: \"{rule}\", trace: {trace}",
        if code == 0 { String::from("logged") } else { format!("refused {code}") },
        id.status.as_str()
    );
}
