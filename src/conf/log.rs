//! `mesh_log_level info|notice|warn|error;`: the level of the refusal lines (as nginx's
//! `limit_req_log_level`); `mesh_metrics_callers N;`: how many callers get series of their own.

use ngx::ffi::{ngx_uint_t, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN};

use super::directive::{invalid, ConfError, Directive};

pub const DEFAULT_LOG_LEVEL: ngx_uint_t = NGX_LOG_INFO as ngx_uint_t;

/// `mesh_log_level LEVEL;`
pub fn level(d: &Directive) -> Result<ngx_uint_t, ConfError> {
    let v = d.word(1)?;
    let level = match v {
        "info" => NGX_LOG_INFO,
        "notice" => NGX_LOG_NOTICE,
        "warn" => NGX_LOG_WARN,
        "error" => NGX_LOG_ERR,
        _ => {
            return Err(invalid(format!(
                "invalid value \"{v}\", it must be \"info\", \"notice\", \"warn\" or \"error\""
            )))
        }
    };
    Ok(level as ngx_uint_t)
}

/// `mesh_metrics_callers N;`: 0 (no caller label) to the table's size.
pub fn metrics_callers(d: &Directive) -> Result<usize, ConfError> {
    let v = d.word(1)?;
    let max = crate::state::metrics::MAX_CALLERS;
    match v.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(invalid(format!(
            "invalid value \"{v}\": a number of callers from 0 to {max}"
        ))),
    }
}
