//! Setting the value of an nginx variable from a getter.

use ngx::ffi::{ngx_http_request_t, ngx_str_t, ngx_variable_value_t};

/// Points a variable's value at `data`, which must outlive the request (static text, the
/// module's configuration, memory owned by the request context, or the request pool).
pub fn set_var(v: &mut ngx_variable_value_t, data: &[u8]) {
    v.set_valid(1);
    v.set_no_cacheable(0);
    v.set_not_found(0);
    v.set_len(data.len() as u32);
    v.data = data.as_ptr().cast_mut();
}

/// Copies `data` into the request pool and points the variable at the copy.
pub fn set_var_copy(r: &ngx_http_request_t, v: &mut ngx_variable_value_t, data: &[u8]) -> bool {
    if data.is_empty() {
        set_var(v, b"");
        return true;
    }
    // SAFETY: the request pool lives as long as the request that reads the variable.
    match unsafe { ngx_str_t::from_bytes(r.pool, data) } {
        Some(s) => {
            set_var(v, s.as_bytes());
            true
        }
        None => false,
    }
}
