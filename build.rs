//! Build script of the module crate.
//!
//! `nginx-sys` (a direct dependency for this reason) reports the nginx it was built against;
//! this turns that into `cfg`s the shell can test, since nginx structures differ between
//! versions (for example `ngx_table_elt_t.next` exists from 1.23.0 on).

use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ngx_table_elt_next)");
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    if let Some(version) = env::var("DEP_NGINX_VERSION_NUMBER")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        if version >= 1_023_000 {
            println!("cargo::rustc-cfg=ngx_table_elt_next");
        }
    }
    // A dynamic module leaves nginx's symbols undefined; on macOS the linker must be told.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        println!("cargo::rustc-link-arg=-undefined");
        println!("cargo::rustc-link-arg=dynamic_lookup");
    }
}
