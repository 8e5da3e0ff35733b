//! ngx-mesh's pure core: no nginx types, no FFI, no `unsafe`.
//!
//! * [`status`]: verification outcomes (`$mesh_auth_status`);
//! * [`decision`]: what the module decided for a request (`$mesh_decision`);
//! * [`audit`]: `mesh_require_auth`: which routes must verify callers, the `nginx -t` summary;
//! * [`keys`]: JWKS, PEM, x509 key map and HMAC key sets;
//! * [`discovery`]: OpenID Connect discovery: the document's URL, its issuer and `jwks_uri`;
//! * [`token`]: JWT verification (RFC 7515, 7519, 8725);
//! * [`extract`]: `Authorization: Bearer` parsing;
//! * [`cache`]: per-worker cache of verified tokens;
//! * [`fasthash`]: the keyed hash of the request path's lookups;
//! * [`otlp`]: spans as OTLP/HTTP protobuf, for `mesh_trace_export`;
//! * [`metrics`]: the Prometheus text format of `mesh_status` and its label sets;
//! * [`policy`]: RBAC patterns, `mesh_role` bindings, `mesh_allow`/`mesh_deny` rules;
//! * [`provider`]: `mesh_provider` blocks: lines, the Google preset, algorithm/key rules;
//! * [`gcra`]: `rate=` parsing, GCRA (`limit_req ... nodelay` semantics), `RateLimit` headers;
//! * [`ratetable`]: per-key rate state as plain data for nginx shared memory;
//! * [`refresh`]: when fetched keys and outbound tokens are fetched again;
//! * [`report`]: `mesh_access_report`: the access matrix as JSON and Markdown;
//! * [`text`]: header values written into byte buffers without `core::fmt`;
//! * [`keystore`]: the shared key store's schedule: who fetches a source, and when;
//! * [`trace`]: trace context (W3C `traceparent`/`tracestate`, `X-Cloud-Trace-Context`), ids, sampling;
//! * [`units`]: nginx time/size/flag syntax.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cache;
pub mod decision;
pub mod discovery;
pub mod extract;
pub mod fasthash;
pub mod gcra;
pub mod keys;
pub mod keystore;
pub mod metrics;
pub mod otlp;
pub mod policy;
pub mod provider;
pub mod ratesync;
pub mod ratetable;
pub mod refresh;
pub mod report;
pub mod resp;
pub mod status;
pub mod text;
pub mod token;
pub mod trace;
pub mod units;
