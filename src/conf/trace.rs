//! Trace context: `mesh_trace_sample`, `mesh_trace_project` (`mesh_trace` and
//! `mesh_trace_response` are plain flags).

use mesh_core::trace::parse_ratio;

use super::directive::{invalid, ConfError, Directive};

/// `mesh_trace_sample RATIO;`
pub fn sample(d: &Directive) -> Result<f64, ConfError> {
    parse_ratio(d.word(1)?).map_err(invalid)
}

/// `mesh_trace_project ID;`
pub fn project(d: &Directive) -> Result<String, ConfError> {
    let v = d.word(1)?;
    let ok = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if !ok {
        return Err(invalid(format!("invalid project id \"{v}\"")));
    }
    Ok(v.to_string())
}
