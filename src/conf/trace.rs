//! Trace context: `mesh_trace_sample`, `mesh_trace_project` (`mesh_trace` and
//! `mesh_trace_response` are plain flags), and span export: `mesh_trace_export`,
//! `mesh_trace_service`.

use mesh_core::otlp::{parse_export, ExportSettings};
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

/// `mesh_trace_export URL [interval=TIME] [batch=N] [queue=N] [auth=google];`
pub fn export(d: &Directive) -> Result<ExportSettings, ConfError> {
    let words = d.values()?;
    let args: Vec<&str> = words.iter().map(String::as_str).collect();
    parse_export(&args).map_err(invalid)
}

/// `mesh_trace_service NAME;`: printable text, as it goes into the spans' `service.name`.
pub fn service(d: &Directive) -> Result<String, ConfError> {
    let v = d.word(1)?;
    if v.is_empty() || v.len() > 256 || v.bytes().any(|b| b.is_ascii_control()) {
        return Err(invalid(format!(
            "invalid service name \"{}\"",
            v.escape_debug()
        )));
    }
    Ok(v.to_string())
}
