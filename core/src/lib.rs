//! ngx-mesh's pure core: no nginx types, no FFI, no `unsafe`.
//!
//! * [`status`]: verification outcomes (`$mesh_auth_status`);
//! * [`keys`]: JWKS, PEM and HMAC key sets;
//! * [`token`]: JWT verification (RFC 7515, 7519, 8725);
//! * [`extract`]: `Authorization: Bearer` parsing;
//! * [`cache`]: per-worker cache of verified tokens;
//! * [`units`]: nginx time/size/flag syntax.
#![forbid(unsafe_code)]

pub mod cache;
pub mod extract;
pub mod keys;
pub mod status;
pub mod token;
pub mod units;
