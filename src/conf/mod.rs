//! The `mesh_*` directives, parsed at configuration time into typed structures, and merged
//! into the values each location runs with.
//!
//! - `commands`: the command table (every directive, its contexts, its parser);
//! - `directive`: the one handler wrapper and the typed `ConfError` it reports;
//! - `identity`, `provider`, `policy`, `rate_limit`, `trace`, `outbound`, `keys`: one file per
//!   directive family;
//! - `merge`: inheritance and resolution (`init_main_conf`, `merge_loc_conf`);
//! - `audit`: `mesh_require_auth`, the check of every route once all are merged;
//! - `report`: `mesh_access_report`, the access matrix written once all are merged;
//! - this file: the configuration structures and their defaults.
//!
//! As in nginx's C modules, parsing fills `set` (what a level wrote, `None` where it wrote
//! nothing); merging inherits what a level did not set and resolves everything into plain
//! fields with the defaults below, so the request path never looks at an `Option` it would
//! have to default.

pub mod audit;
pub mod commands;
mod directive;
mod identity;
mod keys;
pub(crate) mod log;
pub mod merge;
mod metrics;
mod outbound;
mod policy;
mod provider;
mod rate_limit;
pub mod report;
mod trace;

use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Arc;

use mesh_core::gcra::policy_header;
use mesh_core::policy::{RoleBinding, Rule, RuleSet};
use ngx::ffi::ngx_http_complex_value_t;

pub use directive::ContentHandlers;
pub use identity::{Auth, AuthSpec};
pub use outbound::OutboundAuth;
pub use rate_limit::{CallerRate, RateLimit};

use crate::state::keystore::Sources;
use crate::state::outbound::OutboundToken;
use crate::state::provider::MeshProvider;

/// `mesh_token_cache` default.
const DEFAULT_TOKEN_CACHE: usize = 4096;
/// `mesh_metadata_server` default (Cloud Run, GCE, GKE).
const DEFAULT_METADATA_SERVER: &str = "http://metadata.google.internal";
/// `mesh_realm` default.
const DEFAULT_REALM: &str = "mesh";
/// `mesh_rate_limit_status` default.
const DEFAULT_RATE_STATUS: u16 = 429;
/// `mesh_rate_limit_headers` default.
const DEFAULT_RATE_HEADERS: bool = true;
/// `mesh_trace_sample` default.
const DEFAULT_TRACE_SAMPLE: f64 = 1.0;
/// Where `mesh_trace_project` comes from when not set.
pub(crate) const TRACE_PROJECT_ENV: &str = "GOOGLE_CLOUD_PROJECT";

/// http-level configuration.
pub struct MainConf {
    pub providers: Vec<Arc<MeshProvider>>,
    /// `mesh_outbound_token` variables.
    pub outbound: Vec<Arc<OutboundToken>>,
    /// `mesh_rate_limit_zone` names.
    pub zones: Vec<String>,
    /// The `route` labels of the locations with `mesh_outbound_auth` (gathered while merging).
    pub routes: Vec<String>,
    /// `mesh_metadata_server`.
    pub metadata_server: String,
    /// `mesh_token_cache`: 0 is `off`.
    pub token_cache: usize,
    /// `mesh_config_version`; empty when not set.
    pub config_version: String,
    /// The counters of `mesh_status` (their shared zone, and this configuration's names).
    pub metrics: crate::state::metrics::Metrics,
    /// `GOOGLE_CLOUD_PROJECT` as the master saw it at configuration time (nginx clears the
    /// environment of its workers).
    trace_project_env: Option<String>,
    /// `mesh_keys_wait` and the shared key store's zone.
    pub keystore: crate::state::keystore::StoreConf,
    /// The routes `mesh_require_auth` checks, gathered while merging.
    pub(crate) audit: audit::Audit,
    /// `mesh_trace_export`, with the spans' resource; `None`: spans are not exported.
    pub trace_export: Option<Arc<crate::state::span_export::TraceExport>>,
    /// `mesh_access_report` files.
    pub reports: Vec<report::ReportFile>,
    /// What the access report says, gathered while merging.
    pub(crate) report: report::Collected,
    set: MainSet,
}

/// What the http block wrote.
#[derive(Default)]
struct MainSet {
    metadata_server: Option<String>,
    token_cache: Option<usize>,
    config_version: Option<String>,
    /// `mesh_keys_wait`, in milliseconds.
    keys_wait: Option<u64>,
    /// Provider names that `provider=` of `mesh_allow`/`mesh_deny` lines refer to, with
    /// where: checked against the `mesh_provider` blocks once the http block is read.
    rule_providers: Vec<(String, crate::nginx::conf::ConfPos)>,
    trace_export: Option<mesh_core::otlp::ExportSettings>,
    trace_service: Option<String>,
    metrics_callers: Option<usize>,
}

impl Default for MainConf {
    fn default() -> Self {
        MainConf {
            providers: Vec::new(),
            outbound: Vec::new(),
            zones: Vec::new(),
            routes: Vec::new(),
            metadata_server: DEFAULT_METADATA_SERVER.into(),
            token_cache: DEFAULT_TOKEN_CACHE,
            config_version: String::new(),
            metrics: Default::default(),
            trace_project_env: None,
            keystore: Default::default(),
            audit: audit::Audit::default(),
            trace_export: None,
            reports: Vec::new(),
            report: report::Collected::default(),
            set: MainSet::default(),
        }
    }
}

/// server/location-level configuration: the values in force (after merging), and what this
/// level wrote.
pub struct LocConf {
    /// `mesh_auth`; `None`: off.
    pub auth: Option<Arc<AuthSpec>>,
    /// `mesh_token`: a complex value in the configuration pool; `None`: the Bearer headers.
    pub token: Option<NonNull<ngx_http_complex_value_t>>,
    /// `mesh_audience`; `None`: each provider's `audience`.
    pub audience: Option<Arc<Vec<String>>>,
    pub realm: String,
    /// `WWW-Authenticate` without a token, rendered once: `Bearer realm="REALM"`.
    pub challenge: String,
    /// `WWW-Authenticate` for a refused token, up to the `error_description` text.
    pub challenge_invalid: String,
    pub roles: Arc<Vec<RoleBinding>>,
    /// `mesh_allow` / `mesh_deny`, in order and indexed; empty: no rules.
    pub rules: Arc<RuleSet>,
    pub policy_dry_run: bool,
    /// `Rc`: holds nginx pointers, so it stays on the thread that owns the configuration.
    pub rate_limit: Option<Rc<RateLimit>>,
    pub rate_callers: Arc<Vec<CallerRate>>,
    /// `RateLimit-Policy` for `rate_limit`'s rate (first), then for each of
    /// `rate_callers`, rendered once.
    pub rate_policies: Vec<String>,
    pub rate_status: u16,
    pub rate_headers: bool,
    pub rate_dry_run: bool,
    pub trace: bool,
    pub trace_sample: f64,
    /// `mesh_trace_project`, else `GOOGLE_CLOUD_PROJECT`, else empty.
    pub trace_project: String,
    pub trace_response: bool,
    pub forward_identity: bool,
    /// `mesh_outbound_auth`: the token this location's requests go upstream with (its `var`
    /// and `audience` say which line); `None`: off.
    pub outbound_auth: Option<Arc<OutboundToken>>,
    /// The `route` label of the outbound metrics: the location's name as written (`/billing/`,
    /// `~ ^/api/`); empty above locations.
    pub route: String,
    /// `mesh_log_level`: the level of the refusal lines (an `NGX_LOG_*`).
    pub log_level: ngx::ffi::ngx_uint_t,
    /// `mesh_require_auth` (http and server levels, inherited by their locations).
    pub require_auth: bool,
    /// Which block made this level, where, and where its `mesh_auth` was written.
    pub(crate) facts: audit::LevelFacts,
    set: LocSet,
}

/// What one level wrote (`None`: nothing), then, once merged, what it inherited.
#[derive(Default)]
struct LocSet {
    auth: Option<Auth>,
    token: Option<NonNull<ngx_http_complex_value_t>>,
    audience: Option<Arc<Vec<String>>>,
    realm: Option<String>,
    /// `mesh_role` lines of this level (http or server).
    roles: Option<Arc<Vec<RoleBinding>>>,
    rules: Option<Arc<Vec<Rule>>>,
    /// `rules` indexed, built once for the level that wrote them (in `merge`).
    rule_set: Option<Arc<RuleSet>>,
    policy_dry_run: Option<bool>,
    rate_limit: Option<Rc<RateLimit>>,
    rate_callers: Option<Arc<Vec<CallerRate>>>,
    rate_status: Option<u16>,
    rate_headers: Option<bool>,
    rate_dry_run: Option<bool>,
    trace: Option<bool>,
    trace_sample: Option<f64>,
    trace_project: Option<String>,
    trace_response: Option<bool>,
    forward_identity: Option<bool>,
    outbound_auth: Option<OutboundAuth>,
    /// `outbound_auth` resolved (at merge time, against the `mesh_outbound_token` lines).
    outbound_token: Option<Option<Arc<OutboundToken>>>,
    log_level: Option<ngx::ffi::ngx_uint_t>,
    require_auth: Option<bool>,
}

impl Default for LocConf {
    fn default() -> Self {
        let mut lcf = LocConf {
            auth: None,
            token: None,
            audience: None,
            realm: String::new(),
            challenge: String::new(),
            challenge_invalid: String::new(),
            roles: Arc::default(),
            rules: Arc::default(),
            policy_dry_run: false,
            rate_limit: None,
            rate_callers: Arc::default(),
            rate_policies: Vec::new(),
            rate_status: 0,
            rate_headers: false,
            rate_dry_run: false,
            trace: false,
            trace_sample: 0.0,
            trace_project: String::new(),
            trace_response: false,
            forward_identity: false,
            outbound_auth: None,
            route: String::new(),
            log_level: log::DEFAULT_LOG_LEVEL,
            require_auth: false,
            facts: audit::LevelFacts::default(),
            set: LocSet::default(),
        };
        lcf.resolve(None);
        lcf
    }
}

impl MainConf {
    /// What the shared key store keeps for this configuration.
    pub fn key_sources(&self) -> Sources<'_> {
        Sources {
            providers: &self.providers,
            outbound: &self.outbound,
            metadata_server: &self.metadata_server,
        }
    }
}

impl LocConf {
    /// Whether the access phase decides anything here.
    pub fn decides(&self) -> bool {
        self.auth.is_some() || !self.rules.is_empty() || self.rate_limit.is_some()
    }

    /// Fills the values in force from what is set, with the defaults.
    pub(crate) fn resolve(&mut self, env_project: Option<&str>) {
        let s = &self.set;
        self.auth = match &s.auth {
            Some(Auth::On(spec)) => Some(spec.clone()),
            Some(Auth::Off) | None => None,
        };
        self.token = s.token;
        self.audience = s.audience.clone();
        self.realm = s.realm.as_deref().unwrap_or(DEFAULT_REALM).to_string();
        // `mesh_realm` refuses quotes, backslashes and control characters: quoted as is.
        self.challenge = format!("Bearer realm=\"{}\"", self.realm);
        self.challenge_invalid = format!(
            "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"",
            self.realm
        );
        self.roles = s.roles.clone().unwrap_or_default();
        self.rules = s.rule_set.clone().unwrap_or_default();
        self.policy_dry_run = s.policy_dry_run.unwrap_or(false);
        self.rate_limit = s.rate_limit.clone();
        self.rate_callers = s.rate_callers.clone().unwrap_or_default();
        self.rate_policies = match &self.rate_limit {
            Some(rl) => std::iter::once(&rl.gcra)
                .chain(self.rate_callers.iter().map(|c| &c.gcra))
                .map(|g| policy_header(&rl.zone_name, g))
                .collect(),
            None => Vec::new(),
        };
        self.rate_status = s.rate_status.unwrap_or(DEFAULT_RATE_STATUS);
        self.rate_headers = s.rate_headers.unwrap_or(DEFAULT_RATE_HEADERS);
        self.rate_dry_run = s.rate_dry_run.unwrap_or(false);
        self.trace = s.trace.unwrap_or(false);
        self.trace_sample = s.trace_sample.unwrap_or(DEFAULT_TRACE_SAMPLE);
        self.trace_project = s
            .trace_project
            .as_deref()
            .or(env_project)
            .unwrap_or("")
            .to_string();
        self.trace_response = s.trace_response.unwrap_or(false);
        self.forward_identity = s.forward_identity.unwrap_or(false);
        self.outbound_auth = s.outbound_token.clone().flatten();
        self.route = self.facts.route_name();
        self.log_level = s.log_level.unwrap_or(log::DEFAULT_LOG_LEVEL);
        self.require_auth = s.require_auth.unwrap_or(false);
    }
}
