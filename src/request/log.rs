//! The one `info` line per refusal (or dry-run would-refusal): caller, reason, rule, trace.
//! Never the token or a claim value.

use ngx::ffi::{ngx_int_t, NGX_LOG_INFO};
use ngx::http::Request;

use super::ctx::{Decision, RequestCtx};

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
    ngx::ngx_log_error!(
        NGX_LOG_INFO,
        r.log(),
        "mesh: {} {what}: decision: {decision}, status: {}, reason: {reason}, caller: \"{caller}\", rule: \"{rule}\", trace: {trace}",
        if code == 0 { String::from("logged") } else { format!("refused {code}") },
        id.status.as_str()
    );
}
