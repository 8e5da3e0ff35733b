//! The `mesh_*` directives: parsed at configuration time into typed structures.
//!
//! Every bad argument fails `nginx -t` with an `[emerg]` naming the file, the line and the
//! cause. Key files are read here, so `nginx -t` checks them and `nginx -s reload` picks up
//! new ones.

use std::ffi::{c_char, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use mesh_core::keys::{algorithm_name, parse_algorithm, Algorithm, KeySet};
use mesh_core::token::{Provider, Requirement};
use mesh_core::units::parse_time_secs;
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_parse, ngx_conf_t, ngx_http_compile_complex_value,
    ngx_http_compile_complex_value_t, ngx_http_complex_value_t, ngx_str_t, ngx_uint_t,
    NGX_CONF_1MORE, NGX_CONF_BLOCK, NGX_CONF_TAKE1, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_SRV_CONF,
};
use ngx::http::HttpModuleMainConf;
use ngx::ngx_string;

use crate::ngx_util::{args, conf_error, conf_msg, full_path, word, ConfPos};
use crate::MeshModule;

/// Default size of the per-worker verified-token cache (`mesh_token_cache`).
pub const DEFAULT_TOKEN_CACHE: usize = 4096;
/// Default `leeway` of a provider, in seconds.
const DEFAULT_LEEWAY: u64 = 30;

/// http-level configuration.
#[derive(Default)]
pub struct MainConf {
    pub providers: Vec<Arc<Provider>>,
    /// `mesh_token_cache`: `Some(0)` is `off`.
    pub token_cache: Option<usize>,
    pub config_version: Option<String>,
}

impl MainConf {
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
    pub providers: Vec<Arc<Provider>>,
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
    NGX_CONF_OK
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

pub static mut NGX_HTTP_MESH_COMMANDS: [ngx_command_t; 8] = [
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
        // SAFETY: the complex value is allocated from the configuration pool (zeroed, as
        // `ngx_http_compile_complex_value` expects) and compiled from this directive's word,
        // which nginx keeps in the same pool.
        unsafe {
            let pool = (*cf).pool;
            let cv = ngx::ffi::ngx_pcalloc(pool, size_of::<ngx_http_complex_value_t>())
                as *mut ngx_http_complex_value_t;
            let cv = NonNull::new(cv).ok_or("out of memory")?;
            let mut value = a[1];
            let mut ccv: ngx_http_compile_complex_value_t = std::mem::zeroed();
            ccv.cf = cf;
            ccv.value = &mut value;
            ccv.complex_value = cv.as_ptr();
            if ngx_http_compile_complex_value(&mut ccv) != 0 {
                return Err(format!("mesh_token: invalid value \"{}\"", a[1]).into());
            }
            lcf.token = Some(cv);
        }
        Ok(())
    })
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

/// A `mesh_provider` block while it is being read.
struct ProviderBlock {
    name: String,
    pos: ConfPos,
    issuers: Vec<String>,
    keys: Option<(KeySet, ConfPos)>,
    secret: Option<(KeySet, ConfPos)>,
    audiences: Option<Vec<String>>,
    algorithms: Option<(Vec<Algorithm>, ConfPos)>,
    leeway: Option<u64>,
    principal: Option<String>,
    require: Vec<Requirement>,
}

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
                let src = one()?;
                if src.starts_with("https://") || src.starts_with("http://") {
                    return Err(format!(
                        "keys \"{src}\": key URLs are not supported yet, use a JWKS or PEM file"
                    ));
                }
                let path = full_path(cf, src);
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("keys: cannot read \"{path}\": {e}"))?;
                let set = KeySet::load(&bytes).map_err(|e| format!("keys \"{path}\": {e}"))?;
                self.keys = Some((set, pos));
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
    fn finish(self, cf: *mut ngx_conf_t) -> Result<Provider, *mut c_char> {
        let name = &self.name;
        if self.issuers.is_empty() {
            return Err(self
                .pos
                .error(cf, &format!("mesh_provider \"{name}\": no \"issuer\"")));
        }
        let keys = match (self.keys, self.secret) {
            (Some(_), Some((_, pos))) => {
                return Err(pos.error(
                    cf,
                    &format!("mesh_provider \"{name}\": \"secret\" cannot be combined with \"keys\" (an HMAC secret and public keys in one provider would let one stand in for the other)"),
                ))
            }
            (None, None) => {
                return Err(self.pos.error(cf, &format!("mesh_provider \"{name}\": no \"keys\" or \"secret\"")))
            }
            (Some((k, _)), None) | (None, Some((k, _))) => k,
        };
        let allowed = keys.algorithms();
        let algorithms = match self.algorithms {
            None => allowed,
            Some((algs, pos)) => {
                if let Some(bad) = algs.iter().find(|a| !allowed.contains(a)) {
                    let why =
                        if matches!(bad, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
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
        Ok(Provider {
            name: self.name,
            issuers: self.issuers,
            audiences: self.audiences.unwrap_or_default(),
            algorithms,
            keys: Arc::new(keys),
            leeway: self.leeway.unwrap_or(DEFAULT_LEEWAY),
            principal: self.principal.unwrap_or_else(|| "sub".into()),
            require: self.require,
        })
    }
}
