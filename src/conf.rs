//! The `mesh_*` directives: parsed at configuration time into typed structures.
//!
//! Every bad argument fails `nginx -t` with an `[emerg]` naming the file, the line and the
//! cause. Key files are read here, so `nginx -t` checks them and `nginx -s reload` picks up
//! new ones.

use std::ffi::{c_char, c_void};
use std::ptr::{self, NonNull};
use std::rc::Rc;
use std::sync::Arc;

use crate::fetch::{load_roots, KeyUrl, MeshProvider, OutboundToken};
use mesh_core::gcra::{parse_rate, Gcra};
use mesh_core::keys::{algorithm_name, parse_algorithm, Algorithm, KeySet, ALL_ALGORITHMS};
use mesh_core::policy::{parse_role, parse_rule, Effect, Pattern, RoleBinding, Rule};
use mesh_core::token::{Provider, Requirement};
use mesh_core::trace::parse_ratio;
use mesh_core::units::{parse_on_off, parse_size, parse_time_secs};
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_parse, ngx_conf_t, ngx_http_compile_complex_value,
    ngx_http_compile_complex_value_t, ngx_http_complex_value_t, ngx_shared_memory_add,
    ngx_shm_zone_t, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_2MORE, NGX_CONF_BLOCK,
    NGX_CONF_FLAG, NGX_CONF_TAKE1, NGX_CONF_TAKE2, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_SRV_CONF,
};
use ngx::http::HttpModuleMainConf;
use ngx::ngx_string;

use crate::ngx_util::{args, conf_error, conf_msg, full_path, word, ConfPos};
use crate::zone::{zone_init, RateZone};
use crate::MeshModule;

/// Default size of the per-worker verified-token cache (`mesh_token_cache`).
pub const DEFAULT_TOKEN_CACHE: usize = 4096;
/// Where `mesh_outbound_token` asks for ID tokens by default (Cloud Run, GCE, GKE).
const DEFAULT_METADATA_SERVER: &str = "http://metadata.google.internal";
/// Default `leeway` of a provider, in seconds.
const DEFAULT_LEEWAY: u64 = 30;

/// http-level configuration.
#[derive(Default)]
pub struct MainConf {
    pub providers: Vec<Arc<MeshProvider>>,
    /// `mesh_outbound_token` variables.
    pub outbound: Vec<Arc<OutboundToken>>,
    /// `mesh_metadata_server`.
    pub metadata_server: Option<String>,
    /// `mesh_token_cache`: `Some(0)` is `off`.
    pub token_cache: Option<usize>,
    pub config_version: Option<String>,
}

impl MainConf {
    pub fn metadata_server(&self) -> &str {
        self.metadata_server
            .as_deref()
            .unwrap_or(DEFAULT_METADATA_SERVER)
    }

    pub fn token_cache_size(&self) -> usize {
        self.token_cache.unwrap_or(DEFAULT_TOKEN_CACHE)
    }
}

/// `mesh_auth` as written, resolved to providers once all `mesh_provider` blocks are known.
#[derive(Clone)]
pub struct AuthSpec {
    pub optional: bool,
    names: Vec<String>,
    pos: ConfPos,
    pub providers: Vec<Arc<MeshProvider>>,
}

#[derive(Clone)]
pub enum Auth {
    Off,
    On(AuthSpec),
}

/// server/location-level configuration (http-level values are inherited as usual).
#[derive(Default)]
pub struct LocConf {
    pub auth: Option<Auth>,
    /// `mesh_token`: a complex value compiled into the configuration pool.
    pub token: Option<NonNull<ngx_http_complex_value_t>>,
    pub audience: Option<Vec<String>>,
    pub realm: Option<String>,
    /// `mesh_role` lines of this level (http or server).
    pub roles: Option<Arc<Vec<RoleBinding>>>,
    /// `mesh_allow` / `mesh_deny` lines of this level, in order.
    pub rules: Option<Arc<Vec<Rule>>>,
    pub policy_dry_run: Option<bool>,
    /// `Rc`: holds nginx pointers, so it stays on the thread that owns the configuration.
    pub rate_limit: Option<Rc<RateLimit>>,
    /// `mesh_rate_limit_caller` lines of this level, in order.
    pub rate_callers: Option<Arc<Vec<CallerRate>>>,
    pub rate_status: Option<u16>,
    pub rate_headers: Option<bool>,
    pub rate_dry_run: Option<bool>,
    pub trace: Option<bool>,
    pub trace_sample: Option<f64>,
    pub trace_project: Option<String>,
    pub trace_response: Option<bool>,
    pub forward_identity: Option<bool>,
}

/// `mesh_rate_limit zone=NAME rate=R [burst=B] [key=VALUE];`
pub struct RateLimit {
    pub zone: NonNull<ngx_shm_zone_t>,
    pub zone_name: String,
    pub gcra: Gcra,
    pub key: Option<NonNull<ngx_http_complex_value_t>>,
    pos: ConfPos,
}

impl RateLimit {
    /// This cycle's zone; set up by `mesh_rate_limit_zone` (checked when merging).
    pub fn zone(&self) -> Option<&RateZone> {
        // SAFETY: the shm zone entry lives in the cycle; its `data` is null or the RateZone
        // allocated by `mesh_rate_limit_zone` in the configuration pool.
        unsafe { ((*self.zone.as_ptr()).data as *const RateZone).as_ref() }
    }
}

/// `mesh_rate_limit_caller PATTERN rate=R [burst=B];`
pub struct CallerRate {
    pub pattern: Pattern,
    pub gcra: Gcra,
}

impl LocConf {
    pub fn auth(&self) -> Option<&AuthSpec> {
        match &self.auth {
            Some(Auth::On(spec)) => Some(spec),
            _ => None,
        }
    }

    pub fn realm(&self) -> &str {
        self.realm.as_deref().unwrap_or("mesh")
    }

    pub fn rules(&self) -> &[Rule] {
        self.rules.as_deref().map_or(&[], Vec::as_slice)
    }

    pub fn roles(&self) -> &[RoleBinding] {
        self.roles.as_deref().map_or(&[], Vec::as_slice)
    }

    pub fn trace_sample(&self) -> f64 {
        self.trace_sample.unwrap_or(1.0)
    }

    /// `mesh_trace_project`, else `GOOGLE_CLOUD_PROJECT` as the master saw it (merged in).
    pub fn trace_project(&self) -> &str {
        self.trace_project.as_deref().unwrap_or("")
    }

    pub fn rate_callers(&self) -> &[CallerRate] {
        self.rate_callers.as_deref().map_or(&[], Vec::as_slice)
    }
}

/// Resolves the provider names of a `mesh_auth` against the `mesh_provider` blocks. Done at
/// merge time so that `mesh_auth` may come before the blocks it names.
fn resolve(cf: *mut ngx_conf_t, auth: &mut Option<Auth>) -> Result<(), *mut c_char> {
    let Some(Auth::On(spec)) = auth else {
        return Ok(());
    };
    if !spec.providers.is_empty() {
        return Ok(());
    }
    // SAFETY: merging happens inside the http block, where the main configuration exists.
    let Some(mcf) = (unsafe { MeshModule::main_conf(&*cf) }) else {
        return Err(NGX_CONF_ERROR);
    };
    for name in &spec.names {
        match mcf.providers.iter().find(|p| &p.name == name) {
            Some(p) => spec.providers.push(p.clone()),
            None => {
                let msg = format!(
                    "mesh_auth: unknown provider \"{name}\" (no mesh_provider block of that name)"
                );
                return Err(spec.pos.error(cf, &msg));
            }
        }
    }
    Ok(())
}

/// # Safety
/// Called by nginx with its configuration context and two configurations of this module.
pub unsafe fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    prev: &mut LocConf,
    conf: &mut LocConf,
) -> *mut c_char {
    // The http-level configuration is only ever `prev`, so resolve both sides.
    if let Err(e) = resolve(cf, &mut prev.auth) {
        return e;
    }
    if let Err(e) = resolve(cf, &mut conf.auth) {
        return e;
    }
    if conf.auth.is_none() {
        conf.auth = prev.auth.clone();
    }
    if conf.token.is_none() {
        conf.token = prev.token;
    }
    if conf.audience.is_none() {
        conf.audience = prev.audience.clone();
    }
    if conf.realm.is_none() {
        conf.realm = prev.realm.clone();
    }
    inherit(&mut conf.roles, &prev.roles);
    inherit(&mut conf.rules, &prev.rules);
    inherit(&mut conf.policy_dry_run, &prev.policy_dry_run);
    inherit(&mut conf.rate_limit, &prev.rate_limit);
    inherit(&mut conf.rate_callers, &prev.rate_callers);
    inherit(&mut conf.rate_status, &prev.rate_status);
    inherit(&mut conf.rate_headers, &prev.rate_headers);
    inherit(&mut conf.rate_dry_run, &prev.rate_dry_run);
    inherit(&mut conf.trace, &prev.trace);
    inherit(&mut conf.trace_sample, &prev.trace_sample);
    inherit(&mut conf.trace_response, &prev.trace_response);
    inherit(&mut conf.forward_identity, &prev.forward_identity);
    if prev.trace_project.is_none() {
        // nginx clears the environment of its workers; read it here, in the master.
        prev.trace_project = std::env::var("GOOGLE_CLOUD_PROJECT").ok();
    }
    inherit(&mut conf.trace_project, &prev.trace_project);
    for rl in [&prev.rate_limit, &conf.rate_limit].into_iter().flatten() {
        if rl.zone().is_none() {
            let msg = format!(
                "mesh_rate_limit: unknown zone \"{}\" (no mesh_rate_limit_zone of that name)",
                rl.zone_name
            );
            return rl.pos.error(cf, &msg);
        }
    }
    NGX_CONF_OK
}

/// nginx's inheritance: a level that sets a directive replaces what it inherits.
fn inherit<T: Clone>(conf: &mut Option<T>, prev: &Option<T>) {
    if conf.is_none() {
        conf.clone_from(prev);
    }
}

const MSL: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

const fn command(
    name: ngx_str_t,
    type_: u32,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
    conf: usize,
) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: type_ as ngx_uint_t,
        set: Some(set),
        conf,
        offset: 0,
        post: ptr::null_mut(),
    }
}

/// An `on|off` directive of `LocConf` (any level), stored in `field`.
macro_rules! flag_command {
    ($name:literal, $field:ident) => {
        ngx_command_t {
            offset: std::mem::offset_of!(LocConf, $field),
            ..command(
                ngx_string!($name),
                MSL | NGX_CONF_FLAG,
                cmd_flag,
                NGX_HTTP_LOC_CONF_OFFSET,
            )
        }
    };
}

pub static mut NGX_HTTP_MESH_COMMANDS: [ngx_command_t; 25] = [
    command(
        ngx_string!("mesh_provider"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_BLOCK | NGX_CONF_TAKE1,
        cmd_provider,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_token_cache"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        cmd_token_cache,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_config_version"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        cmd_config_version,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_auth"),
        MSL | NGX_CONF_1MORE,
        cmd_auth,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_token"),
        MSL | NGX_CONF_TAKE1,
        cmd_token,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_audience"),
        MSL | NGX_CONF_1MORE,
        cmd_audience,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_realm"),
        MSL | NGX_CONF_TAKE1,
        cmd_realm,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_role"),
        NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_CONF_2MORE,
        cmd_role,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_allow"),
        MSL | NGX_CONF_1MORE,
        cmd_rule,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_deny"),
        MSL | NGX_CONF_1MORE,
        cmd_rule,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    flag_command!("mesh_policy_dry_run", policy_dry_run),
    command(
        ngx_string!("mesh_rate_limit_zone"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2,
        cmd_rate_limit_zone,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_rate_limit"),
        MSL | NGX_CONF_1MORE,
        cmd_rate_limit,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_rate_limit_caller"),
        MSL | NGX_CONF_2MORE,
        cmd_rate_limit_caller,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_rate_limit_status"),
        MSL | NGX_CONF_TAKE1,
        cmd_rate_limit_status,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    flag_command!("mesh_rate_limit_headers", rate_headers),
    flag_command!("mesh_rate_limit_dry_run", rate_dry_run),
    flag_command!("mesh_trace", trace),
    command(
        ngx_string!("mesh_trace_sample"),
        MSL | NGX_CONF_TAKE1,
        cmd_trace_sample,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_trace_project"),
        NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_CONF_TAKE1,
        cmd_trace_project,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    flag_command!("mesh_trace_response", trace_response),
    flag_command!("mesh_forward_identity", forward_identity),
    command(
        ngx_string!("mesh_outbound_token"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2,
        cmd_outbound_token,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("mesh_metadata_server"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        cmd_metadata_server,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    ngx_command_t::empty(),
];

/// Runs a directive body that works on typed values; `Err` becomes an `[emerg]` at the
/// directive's line. `conf` is the configuration object nginx passes for the directive.
unsafe fn directive<C>(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    f: impl FnOnce(&mut C, &[ngx_str_t]) -> Result<(), ConfErr>,
) -> *mut c_char {
    crate::ngx_util::no_panic(NGX_CONF_ERROR, || {
        // SAFETY: nginx passes the configuration object this module created for the
        // directive's context (`conf` offset in the command table) and the directive's words.
        let (conf, a) = unsafe { (&mut *conf.cast::<C>(), args(cf)) };
        match f(conf, a) {
            Ok(()) => NGX_CONF_OK,
            Err(ConfErr::Duplicate) => conf_msg(c"is duplicate"),
            Err(ConfErr::Msg(e)) => conf_error(cf, &e),
        }
    })
}

/// Why a directive failed: nginx words a repeated directive itself (`"X" directive is duplicate`).
enum ConfErr {
    Duplicate,
    Msg(String),
}

impl From<String> for ConfErr {
    fn from(s: String) -> Self {
        ConfErr::Msg(s)
    }
}

impl From<&str> for ConfErr {
    fn from(s: &str) -> Self {
        ConfErr::Msg(s.to_string())
    }
}

fn words(a: &[ngx_str_t]) -> Result<Vec<String>, String> {
    a.iter().map(|w| word(w).map(str::to_string)).collect()
}

unsafe extern "C" fn cmd_token_cache(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |mcf: &mut MainConf, a| {
        if mcf.token_cache.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let v = word(&a[1])?;
        let n = if v == "off" {
            0
        } else {
            match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(format!(
                        "invalid value \"{v}\" in \"mesh_token_cache\": expected \"off\" or a positive number of tokens"
                    )
                    .into())
                }
            }
        };
        mcf.token_cache = Some(n);
        Ok(())
    })
}

unsafe extern "C" fn cmd_config_version(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |mcf: &mut MainConf, a| {
        if mcf.config_version.is_some() {
            return Err(ConfErr::Duplicate);
        }
        mcf.config_version = Some(word(&a[1])?.to_string());
        Ok(())
    })
}

unsafe extern "C" fn cmd_auth(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: called while parsing a file (or -g), so `cf` is valid.
    let pos = unsafe { ConfPos::current(cf) };
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.auth.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let mut w = words(&a[1..])?;
        if w.len() == 1 && w[0] == "off" {
            lcf.auth = Some(Auth::Off);
            return Ok(());
        }
        let optional = w.first().is_some_and(|s| s == "optional");
        if optional {
            w.remove(0);
        }
        if w.is_empty() {
            return Err("mesh_auth: no provider named after \"optional\"".into());
        }
        for (i, n) in w.iter().enumerate() {
            if n == "off" || n == "optional" {
                return Err(format!("mesh_auth: \"{n}\" must stand alone or first").into());
            }
            if w[..i].contains(n) {
                return Err(format!("mesh_auth: provider \"{n}\" named twice").into());
            }
        }
        lcf.auth = Some(Auth::On(AuthSpec {
            optional,
            names: w,
            pos,
            providers: Vec::new(),
        }));
        Ok(())
    })
}

unsafe extern "C" fn cmd_token(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.token.is_some() {
            return Err(ConfErr::Duplicate);
        }
        lcf.token = Some(
            compile_complex(cf, a[1])
                .map_err(|_| format!("mesh_token: invalid value \"{}\"", a[1]))?,
        );
        Ok(())
    })
}

/// Compiles a value that may hold variables (`$cookie_x`, `$binary_remote_addr`).
fn compile_complex(
    cf: *mut ngx_conf_t,
    mut value: ngx_str_t,
) -> Result<NonNull<ngx_http_complex_value_t>, ()> {
    // SAFETY: the complex value is allocated zeroed from the configuration pool, as
    // `ngx_http_compile_complex_value` expects, and compiled from a string nginx keeps in the
    // same pool; it lives as long as the configuration.
    unsafe {
        let cv = ngx::ffi::ngx_pcalloc((*cf).pool, size_of::<ngx_http_complex_value_t>())
            as *mut ngx_http_complex_value_t;
        let cv = NonNull::new(cv).ok_or(())?;
        let mut ccv: ngx_http_compile_complex_value_t = std::mem::zeroed();
        ccv.cf = cf;
        ccv.value = &mut value;
        ccv.complex_value = cv.as_ptr();
        if ngx_http_compile_complex_value(&mut ccv) != 0 {
            return Err(());
        }
        Ok(cv)
    }
}

unsafe extern "C" fn cmd_audience(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.audience.is_some() {
            return Err(ConfErr::Duplicate);
        }
        lcf.audience = Some(words(&a[1..])?);
        Ok(())
    })
}

unsafe extern "C" fn cmd_realm(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.realm.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let realm = word(&a[1])?;
        if realm
            .bytes()
            .any(|b| b == b'"' || b == b'\\' || b.is_ascii_control())
        {
            return Err(format!(
                "mesh_realm: \"{realm}\" may not hold quotes, backslashes or control characters"
            )
            .into());
        }
        lcf.realm = Some(realm.to_string());
        Ok(())
    })
}

/// The directive as written, with where it stands: what `$mesh_rule` reports.
fn rule_text(a: &[ngx_str_t], pos: &ConfPos) -> String {
    let words: Vec<String> = a.iter().map(|w| w.to_string()).collect();
    format!("{} ({}:{})", words.join(" "), pos.file, pos.line)
}

unsafe extern "C" fn cmd_role(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        let w = words(&a[1..])?;
        let patterns: Vec<&str> = w[1..].iter().map(String::as_str).collect();
        let binding = parse_role(&w[0], &patterns).map_err(|e| format!("mesh_role: {e}"))?;
        push(&mut lcf.roles, binding);
        Ok(())
    })
}

/// Appends to a list that this level owns (nothing inherits it before merging).
fn push<T>(list: &mut Option<Arc<Vec<T>>>, item: T) {
    match list {
        Some(v) => match Arc::get_mut(v) {
            Some(v) => v.push(item),
            None => unreachable!("configuration lists are only shared after merging"),
        },
        None => *list = Some(Arc::new(vec![item])),
    }
}

/// `mesh_allow` and `mesh_deny`: the command's name says which.
unsafe extern "C" fn cmd_rule(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: called while a directive is parsed, with its command.
    let (pos, name) = unsafe { (ConfPos::current(cf), (*cmd).name.to_string()) };
    let effect = if name == "mesh_deny" {
        Effect::Deny
    } else {
        Effect::Allow
    };
    directive(cf, conf, |lcf: &mut LocConf, a| {
        let w = words(&a[1..])?;
        let args: Vec<&str> = w.iter().map(String::as_str).collect();
        let rule =
            parse_rule(effect, &args, rule_text(a, &pos)).map_err(|e| format!("{name}: {e}"))?;
        push(&mut lcf.rules, rule);
        Ok(())
    })
}

/// Every `on|off` directive: like nginx's `ngx_conf_set_flag_slot`, the command's `offset`
/// names the `Option<bool>` field of `LocConf` it sets.
unsafe extern "C" fn cmd_flag(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: the command table pairs this handler only with offsets of `Option<bool>` fields
    // of `LocConf` (`offset_of!`), and nginx passes that command.
    let (name, offset) = unsafe { ((*cmd).name.to_string(), (*cmd).offset) };
    directive(cf, conf, |lcf: &mut LocConf, a| {
        // SAFETY: see above; `lcf` is the LocConf nginx passed for this directive.
        let slot = unsafe {
            &mut *(lcf as *mut LocConf)
                .cast::<u8>()
                .add(offset)
                .cast::<Option<bool>>()
        };
        if slot.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let v = word(&a[1])?;
        *slot = Some(parse_on_off(v).ok_or_else(|| {
            format!("invalid value \"{v}\" in \"{name}\" directive, it must be \"on\" or \"off\"")
        })?);
        Ok(())
    })
}

unsafe extern "C" fn cmd_rate_limit_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.rate_status.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let v = word(&a[1])?;
        match v.parse::<u16>() {
            Ok(code) if (400..=599).contains(&code) => lcf.rate_status = Some(code),
            _ => {
                return Err(
                    format!("mesh_rate_limit_status: \"{v}\" must be between 400 and 599").into(),
                )
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn cmd_trace_sample(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.trace_sample.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let v = word(&a[1])?;
        lcf.trace_sample = Some(parse_ratio(v).map_err(|e| format!("mesh_trace_sample: {e}"))?);
        Ok(())
    })
}

unsafe extern "C" fn cmd_trace_project(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.trace_project.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let v = word(&a[1])?;
        if v.is_empty()
            || !v.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || b == b':'
            })
        {
            return Err(format!("mesh_trace_project: invalid project id \"{v}\"").into());
        }
        lcf.trace_project = Some(v.to_string());
        Ok(())
    })
}

unsafe extern "C" fn cmd_outbound_token(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |mcf: &mut MainConf, a| {
        let var = word(&a[1])?;
        let audience = word(&a[2])?;
        let name = var
            .strip_prefix('$')
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .ok_or_else(|| format!("mesh_outbound_token: invalid variable name \"{var}\""))?;
        if audience.is_empty()
            || audience
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(format!("mesh_outbound_token: invalid audience \"{audience}\"").into());
        }
        let token = Arc::new(OutboundToken::new(audience.to_string()));
        crate::variables::register_outbound(cf, name, &token)
            .map_err(|_| format!("mesh_outbound_token: cannot define variable \"{var}\""))?;
        mcf.outbound.push(token);
        Ok(())
    })
}

unsafe extern "C" fn cmd_metadata_server(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |mcf: &mut MainConf, a| {
        if mcf.metadata_server.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let url = word(&a[1])?;
        let ok = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
        if !ok {
            return Err(format!(
                "mesh_metadata_server: invalid URL \"{url}\" (http://HOST[:PORT])"
            )
            .into());
        }
        mcf.metadata_server = Some(url.to_string());
        Ok(())
    })
}

/// The smallest zone: nginx's shared-memory modules refuse less than 8 pages.
const MIN_ZONE_SIZE: usize = 8 * 4096;

unsafe extern "C" fn cmd_rate_limit_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |_mcf: &mut MainConf, a| {
        let name = word(&a[1])?.to_string();
        let size_text = word(&a[2])?;
        let size = parse_size(size_text).map_err(|_| {
            format!("mesh_rate_limit_zone \"{name}\": invalid size \"{size_text}\"")
        })?;
        if size < MIN_ZONE_SIZE {
            return Err(format!(
                "mesh_rate_limit_zone \"{name}\": size \"{size_text}\" is too small, at least 32k"
            )
            .into());
        }
        let zone = shared_zone(cf, a[1], size)?;
        // SAFETY: `zone` is nginx's entry for this name; `data` is ours to set once.
        unsafe {
            if !(*zone).data.is_null() {
                return Err(format!("mesh_rate_limit_zone \"{name}\" is defined twice").into());
            }
            let p = ngx::core::Pool::from_ngx_pool((*cf).pool).allocate(RateZone::new(name));
            if p.is_null() {
                return Err("out of memory".into());
            }
            (*zone).data = p.cast();
            (*zone).init = Some(zone_init);
        }
        Ok(())
    })
}

/// nginx's shared-memory entry for a zone name (`size` 0: a reference, sized by its definition).
fn shared_zone(
    cf: *mut ngx_conf_t,
    name: ngx_str_t,
    size: usize,
) -> Result<*mut ngx_shm_zone_t, String> {
    let mut name = name;
    // SAFETY: the tag is this module's static descriptor, so nginx refuses a zone of the same
    // name declared by another module.
    let zone = unsafe {
        ngx_shared_memory_add(
            cf,
            &mut name,
            size,
            ptr::addr_of_mut!(crate::ngx_http_mesh_module).cast(),
        )
    };
    if zone.is_null() {
        return Err(format!("mesh_rate_limit_zone \"{name}\" cannot be created"));
    }
    Ok(zone)
}

/// `rate=R` and `burst=B` of `mesh_rate_limit` and `mesh_rate_limit_caller`.
fn gcra_of(rate: Option<&str>, burst: Option<&str>) -> Result<Gcra, String> {
    let rate = rate.ok_or("\"rate=\" is required")?;
    let rate = parse_rate(rate)?;
    let burst = match burst {
        None => 0,
        Some(b) => b
            .parse::<u64>()
            .ok()
            .filter(|&b| b <= 1_000_000)
            .ok_or_else(|| format!("invalid burst \"{b}\""))?,
    };
    Ok(Gcra::new(rate, burst))
}

unsafe extern "C" fn cmd_rate_limit(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: called while a directive is parsed.
    let pos = unsafe { ConfPos::current(cf) };
    directive(cf, conf, |lcf: &mut LocConf, a| {
        if lcf.rate_limit.is_some() {
            return Err(ConfErr::Duplicate);
        }
        let (mut zone, mut rate, mut burst, mut key) = (None, None, None, None);
        for w in &a[1..] {
            let text = word(w)?;
            let (k, v) = text.split_once('=').unwrap_or((text, ""));
            let slot = match k {
                "zone" => &mut zone,
                "rate" => &mut rate,
                "burst" => &mut burst,
                "key" => &mut key,
                _ => return Err(format!("mesh_rate_limit: invalid parameter \"{text}\"").into()),
            };
            if v.is_empty() || slot.replace((v, *w)).is_some() {
                return Err(format!("mesh_rate_limit: invalid parameter \"{text}\"").into());
            }
        }
        let (zone_name, zone_word) = zone.ok_or("mesh_rate_limit: \"zone=\" is required")?;
        let gcra = gcra_of(rate.map(|r| r.0), burst.map(|b| b.0))
            .map_err(|e| format!("mesh_rate_limit: {e}"))?;
        let key = match key {
            None => None,
            Some((text, w)) => Some(
                compile_complex(cf, value_part(&w, text))
                    .map_err(|_| format!("mesh_rate_limit: invalid key \"{text}\""))?,
            ),
        };
        let zone = shared_zone(cf, value_part(&zone_word, zone_name), 0)?;
        lcf.rate_limit = Some(Rc::new(RateLimit {
            zone: NonNull::new(zone).ok_or("out of memory")?,
            zone_name: zone_name.to_string(),
            gcra,
            key,
            pos: pos.clone(),
        }));
        Ok(())
    })
}

/// The VALUE of a `name=VALUE` directive word, as an nginx string inside that word (nginx
/// keeps the word, in the configuration pool, for as long as the configuration).
fn value_part(word: &ngx_str_t, value: &str) -> ngx_str_t {
    let skip = word.len - value.len();
    ngx_str_t {
        len: value.len(),
        // SAFETY: `value` is a suffix of the word's bytes (it came from splitting them), so
        // the pointer stays inside the word.
        data: unsafe { word.data.add(skip) },
    }
}

unsafe extern "C" fn cmd_rate_limit_caller(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lcf: &mut LocConf, a| {
        let w = words(&a[1..])?;
        let pattern = Pattern::parse(&w[0]).map_err(|e| format!("mesh_rate_limit_caller: {e}"))?;
        let (mut rate, mut burst) = (None, None);
        for p in &w[1..] {
            match p.split_once('=') {
                Some(("rate", v)) if rate.is_none() => rate = Some(v),
                Some(("burst", v)) if burst.is_none() => burst = Some(v),
                _ => {
                    return Err(format!("mesh_rate_limit_caller: invalid parameter \"{p}\"").into())
                }
            }
        }
        let gcra = gcra_of(rate, burst).map_err(|e| format!("mesh_rate_limit_caller: {e}"))?;
        push(&mut lcf.rate_callers, CallerRate { pattern, gcra });
        Ok(())
    })
}

/// A `mesh_provider` block while it is being read.
struct ProviderBlock {
    name: String,
    pos: ConfPos,
    issuers: Vec<String>,
    keys: Option<(KeySource, ConfPos)>,
    secret: Option<(KeySet, ConfPos)>,
    audiences: Option<Vec<String>>,
    algorithms: Option<(Vec<Algorithm>, ConfPos)>,
    leeway: Option<u64>,
    principal: Option<String>,
    require: Vec<Requirement>,
    preset: Option<Preset>,
    platform_verified: Option<bool>,
}

/// Where a provider's public keys come from.
enum KeySource {
    File(KeySet),
    Url(KeyUrl),
}

/// `preset NAME;`: defaults for a well-known issuer.
#[derive(Clone, Copy)]
enum Preset {
    /// Google-signed ID tokens (Cloud Run service-to-service, `gcloud auth print-identity-token`).
    Google,
}

const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
const GOOGLE_KEYS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";

unsafe extern "C" fn cmd_provider(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::ngx_util::no_panic(NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's main configuration (MAIN_CONF offset) and the
        // directive's words; `cf` is valid during the call.
        let (mcf, a, pos) = unsafe {
            (
                &mut *conf.cast::<MainConf>(),
                args(cf),
                ConfPos::current(cf),
            )
        };
        let name = match word(&a[1]) {
            Ok(n) if !n.is_empty() => n.to_string(),
            Ok(_) => return conf_error(cf, "mesh_provider: empty name"),
            Err(e) => return conf_error(cf, &e),
        };
        if mcf.providers.iter().any(|p| p.name == name) {
            return conf_error(cf, &format!("mesh_provider \"{name}\" is defined twice"));
        }
        let mut block = ProviderBlock {
            name,
            pos,
            issuers: Vec::new(),
            keys: None,
            secret: None,
            audiences: None,
            algorithms: None,
            leeway: None,
            principal: None,
            require: Vec::new(),
            preset: None,
            platform_verified: None,
        };
        // SAFETY: the block is parsed with a copy of `cf` whose handler reads each line into
        // `block`, which outlives the call (the same technique as nginx's `map` and `types`).
        let rv = unsafe {
            let mut block_cf: ngx_conf_t = *cf;
            block_cf.handler = Some(provider_line);
            block_cf.handler_conf = ptr::addr_of_mut!(block).cast();
            ngx_conf_parse(&mut block_cf, ptr::null_mut())
        };
        if rv != NGX_CONF_OK {
            return rv;
        }
        match block.finish(cf) {
            Ok(p) => {
                mcf.providers.push(Arc::new(p));
                NGX_CONF_OK
            }
            Err(e) => e,
        }
    })
}

/// One line inside `mesh_provider NAME { ... }`.
unsafe extern "C" fn provider_line(
    cf: *mut ngx_conf_t,
    _dummy: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::ngx_util::no_panic(NGX_CONF_ERROR, || {
        // SAFETY: `conf` is the `handler_conf` set in `cmd_provider`: a live ProviderBlock.
        let (block, a, pos) = unsafe {
            (
                &mut *conf.cast::<ProviderBlock>(),
                args(cf),
                ConfPos::current(cf),
            )
        };
        match block.line(cf, a, pos) {
            Ok(()) => NGX_CONF_OK,
            Err(e) => conf_error(cf, &e),
        }
    })
}

impl ProviderBlock {
    fn line(&mut self, cf: *mut ngx_conf_t, a: &[ngx_str_t], pos: ConfPos) -> Result<(), String> {
        let w = words(a)?;
        let (dir, vals) = (w[0].as_str(), &w[1..]);
        let one = || -> Result<&str, String> {
            match vals {
                [v] => Ok(v.as_str()),
                _ => Err(format!(
                    "invalid number of arguments in \"{dir}\" of mesh_provider \"{}\"",
                    self.name
                )),
            }
        };
        let many = || -> Result<&[String], String> {
            if vals.is_empty() {
                Err(format!(
                    "invalid number of arguments in \"{dir}\" of mesh_provider \"{}\"",
                    self.name
                ))
            } else {
                Ok(vals)
            }
        };
        let dup = |set: bool| -> Result<(), String> {
            if set {
                Err(format!(
                    "\"{dir}\" is duplicate in mesh_provider \"{}\"",
                    self.name
                ))
            } else {
                Ok(())
            }
        };
        match dir {
            "issuer" => {
                dup(!self.issuers.is_empty())?;
                self.issuers = many()?.to_vec();
            }
            "audience" => {
                dup(self.audiences.is_some())?;
                self.audiences = Some(many()?.to_vec());
            }
            "keys" => {
                dup(self.keys.is_some())?;
                let (src, ca) = match vals {
                    [src] => (src.as_str(), None),
                    [src, ca] => match ca.strip_prefix("ca=") {
                        Some(ca) if !ca.is_empty() => (src.as_str(), Some(full_path(cf, ca))),
                        _ => return Err(format!("keys: invalid parameter \"{ca}\"")),
                    },
                    _ => {
                        return Err(format!(
                            "invalid number of arguments in \"keys\" of mesh_provider \"{}\"",
                            self.name
                        ))
                    }
                };
                let source = if src.starts_with("https://") || src.starts_with("http://") {
                    KeySource::Url(key_url(src, ca.as_deref())?)
                } else {
                    if ca.is_some() {
                        return Err(format!(
                            "keys \"{src}\": \"ca=\" applies to https:// URLs only"
                        ));
                    }
                    let path = full_path(cf, src);
                    let bytes = std::fs::read(&path)
                        .map_err(|e| format!("keys: cannot read \"{path}\": {e}"))?;
                    KeySource::File(
                        KeySet::load(&bytes).map_err(|e| format!("keys \"{path}\": {e}"))?,
                    )
                };
                self.keys = Some((source, pos));
            }
            "preset" => {
                dup(self.preset.is_some())?;
                self.preset = Some(match one()? {
                    "google" => Preset::Google,
                    other => {
                        return Err(format!(
                            "preset: unknown preset \"{other}\" (known: google)"
                        ))
                    }
                });
            }
            "platform_verified" => {
                dup(self.platform_verified.is_some())?;
                let v = one()?;
                self.platform_verified = Some(parse_on_off(v).ok_or_else(|| {
                    format!(
                        "platform_verified: invalid value \"{v}\", it must be \"on\" or \"off\""
                    )
                })?);
            }
            "secret" => {
                dup(self.secret.is_some())?;
                let path = full_path(cf, one()?);
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("secret: cannot read \"{path}\": {e}"))?;
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    return Err(format!("secret \"{path}\" is empty"));
                }
                self.secret = Some((KeySet::from_secret(&bytes), pos));
            }
            "algorithms" => {
                dup(self.algorithms.is_some())?;
                let mut algs = Vec::new();
                for v in many()? {
                    let alg = parse_algorithm(v).ok_or_else(|| {
                        format!("algorithms: unknown algorithm \"{v}\" (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512)")
                    })?;
                    if !algs.contains(&alg) {
                        algs.push(alg);
                    }
                }
                self.algorithms = Some((algs, pos));
            }
            "leeway" => {
                dup(self.leeway.is_some())?;
                let v = one()?;
                self.leeway = Some(
                    parse_time_secs(v)
                        .map_err(|e| format!("leeway: invalid value \"{v}\": {e}"))?,
                );
            }
            "principal" => {
                dup(self.principal.is_some())?;
                let v = one()?;
                if v.is_empty() {
                    return Err("principal: empty claim name".into());
                }
                self.principal = Some(v.to_string());
            }
            "require" => {
                for v in many()? {
                    self.require
                        .push(Requirement::parse(v).map_err(|e| format!("require: \"{v}\": {e}"))?);
                }
            }
            _ => {
                return Err(format!(
                    "unknown directive \"{dir}\" in mesh_provider \"{}\"",
                    self.name
                ))
            }
        }
        Ok(())
    }

    /// Checks the block as a whole, at its closing brace; errors name the line at fault.
    fn finish(mut self, cf: *mut ngx_conf_t) -> Result<MeshProvider, *mut c_char> {
        if let Some(Preset::Google) = self.preset {
            // Lines written in the block win over the preset's defaults.
            if self.issuers.is_empty() {
                self.issuers = GOOGLE_ISSUERS.iter().map(|s| s.to_string()).collect();
            }
            if self.keys.is_none() && self.secret.is_none() {
                let url = key_url(GOOGLE_KEYS_URL, None)
                    .map_err(|e| self.pos.error(cf, &format!("preset google: {e}")))?;
                self.keys = Some((KeySource::Url(url), self.pos.clone()));
            }
            if self.algorithms.is_none() {
                self.algorithms = Some((vec![Algorithm::RS256], self.pos.clone()));
            }
            if self.principal.is_none() {
                self.principal = Some("email".into());
            }
            if !self
                .require
                .iter()
                .any(|r| r.path_text() == "email_verified")
            {
                if let Ok(r) = Requirement::parse("email_verified=true") {
                    self.require.push(r);
                }
            }
        }
        let name = self.name.clone();
        if self.issuers.is_empty() {
            return Err(self
                .pos
                .error(cf, &format!("mesh_provider \"{name}\": no \"issuer\"")));
        }
        let (keys, url) = match (self.keys, self.secret) {
            (Some(_), Some((_, pos))) => {
                return Err(pos.error(
                    cf,
                    &format!("mesh_provider \"{name}\": \"secret\" cannot be combined with \"keys\" (an HMAC secret and public keys in one provider would let one stand in for the other)"),
                ))
            }
            (None, None) => {
                return Err(self.pos.error(cf, &format!("mesh_provider \"{name}\": no \"keys\" or \"secret\"")))
            }
            (Some((KeySource::File(k), _)), None) | (None, Some((k, _))) => (k, None),
            // Keys from a URL arrive later; until then requests get 503 `no_keys`.
            (Some((KeySource::Url(u), _)), None) => (KeySet::default(), Some(u)),
        };
        let is_hmac =
            |a: &Algorithm| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let configured = self.algorithms.as_ref().map(|(a, _)| a.clone());
        let algorithms = match self.algorithms {
            // Keys from a URL are not known yet: until they are, every public-key algorithm
            // passes this check, so that requests get `no_keys` rather than `bad_signature`.
            None if url.is_some() => ALL_ALGORITHMS
                .iter()
                .copied()
                .filter(|a| !is_hmac(a))
                .collect(),
            None => keys.algorithms(),
            Some((algs, pos)) => {
                let allowed = keys.algorithms();
                let bad = if url.is_some() {
                    // Keys unknown until fetched: only HMAC can be ruled out now.
                    algs.iter().find(|a| is_hmac(a))
                } else {
                    algs.iter().find(|a| !allowed.contains(a))
                };
                if let Some(bad) = bad {
                    let why = if is_hmac(bad) {
                        "HMAC algorithms need \"secret\""
                    } else {
                        "no configured key can verify it"
                    };
                    return Err(pos.error(
                        cf,
                        &format!(
                            "mesh_provider \"{name}\": algorithm \"{}\" cannot be used: {why}",
                            algorithm_name(*bad)
                        ),
                    ));
                }
                algs
            }
        };
        let provider = Provider {
            name: self.name,
            issuers: self.issuers,
            audiences: self.audiences.unwrap_or_default(),
            algorithms,
            keys: Arc::new(keys),
            leeway: self.leeway.unwrap_or(DEFAULT_LEEWAY),
            principal: self.principal.unwrap_or_else(|| "sub".into()),
            require: self.require,
        };
        Ok(MeshProvider::new(
            provider,
            configured,
            self.platform_verified.unwrap_or(false),
            url,
        ))
    }
}

/// A key URL with what it takes to fetch it (trusted roots read now, so `nginx -t` checks
/// them).
fn key_url(url: &str, ca: Option<&str>) -> Result<KeyUrl, String> {
    let https = url.starts_with("https://");
    if !https && ca.is_some() {
        return Err(format!(
            "keys \"{url}\": \"ca=\" applies to https:// URLs only"
        ));
    }
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    if rest.is_empty()
        || rest.starts_with('/')
        || url
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("keys: invalid URL \"{url}\""));
    }
    let roots = if https {
        Some(load_roots(ca).map_err(|e| format!("keys \"{url}\": {e}"))?)
    } else {
        None
    };
    Ok(KeyUrl {
        url: url.to_string(),
        roots,
    })
}
