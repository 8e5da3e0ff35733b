//! What happens to one request.
//!
//! - `access`: the access-phase handler, identify → authorize → limit → trace on one screen;
//! - `ctx`: the request context, its one owner and one accessor;
//! - `identify`: the token, verified (with the worker's token cache) and its audience checked;
//! - `limit`: charging the rate-limit zone;
//! - `log`: the one log line per refusal;
//! - `server_rewrite`: the client's `X-Mesh-*` headers dropped before any access module runs;
//! - `outbound`: `mesh_outbound_auth`, the service's own token toward the upstream;
//! - `precontent`: what another access module admitted after our refusal (`satisfy any`);
//! - `trace`: this hop's trace, started in one place;
//! - `span`: the span of this hop that `mesh_trace_export` sends;
//! - `upstream`: the headers the upstream receives;
//! - `response`: the header filter (`traceresponse`);
//! - `ready`: the `mesh_ready` content handler;
//! - `metrics`: the `mesh_status` content handler; `count`: the log-phase handler that counts;
//! - `variables`: the `$mesh_*` variables.

pub mod access;
pub mod count;
pub mod ctx;
mod identify;
mod limit;
mod log;
pub mod metrics;
pub mod outbound;
pub mod precontent;
pub mod ready;
pub mod response;
pub mod server_rewrite;
mod span;
pub mod trace;
mod upstream;
pub mod variables;
