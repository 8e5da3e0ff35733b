//! The generic helpers that touch nginx structures, each `unsafe` block with why it is sound.
//! The other `unsafe` blocks of the shell are FFI entry points reading what nginx passes, or
//! sit beside the one structure they own (the request context in `request/ctx.rs`, a rate zone
//! in `state/rate_zone.rs`), also each with its `SAFETY` note.
//!
//! - `conf`: the words of a directive, where it stands, paths, complex values, shared zones;
//! - `headers`: request and response header lists;
//! - `location`: what other modules configured in the level being merged (internal, return);
//! - `request`: shared views of a request, its client address, nginx's clock;
//! - `variable`: a variable getter's value slot;
//! - `timer`: a worker's repeating timer on its event loop.

pub mod conf;
pub mod headers;
pub mod location;
pub mod request;
pub mod timer;
pub mod variable;

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning a panic into `fallback`: a panic must never unwind into nginx (it would
/// abort the worker).
pub fn no_panic<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}
