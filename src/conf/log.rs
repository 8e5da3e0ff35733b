//! `mesh_log_level info|notice|warn|error;`: the level of the refusal lines (as nginx's
//! `limit_req_log_level`).

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
