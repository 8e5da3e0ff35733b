//! Rate limits: `mesh_rate_limit_zone`, `mesh_rate_limit`, `mesh_rate_limit_caller`,
//! `mesh_rate_limit_status` (`..._headers` and `..._dry_run` are plain flags).

use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Arc;

use mesh_core::gcra::{parse_rate, Gcra};
use mesh_core::policy::Pattern;
use mesh_core::ratesync::{check_prefix, parse_sync};
use mesh_core::units::parse_size;
use ngx::ffi::{ngx_http_complex_value_t, ngx_shm_zone_t, ngx_str_t};
use redis::{ConnectionAddr, IntoConnectionInfo};

use super::directive::{invalid, push, ConfError, Directive};
use crate::nginx::conf::{compile_complex, full_path, shared_zone, value_part, ConfPos, ZoneKind};
use crate::state::rate_sync::{shm_size, SyncConf};
use crate::state::rate_zone::{sync_zone_init, zone_init, RateZone};

/// The smallest zone: nginx's shared-memory modules refuse less than 8 pages.
const MIN_ZONE_SIZE: usize = 8 * 4096;
/// `sync=` default, ms.
const DEFAULT_SYNC_MS: u64 = 100;
/// `prefix=` default.
const DEFAULT_PREFIX: &str = "mesh";

/// `mesh_rate_limit zone=NAME rate=R [burst=B] [key=VALUE];`
pub struct RateLimit {
    pub zone: NonNull<ngx_shm_zone_t>,
    pub zone_name: String,
    pub gcra: Gcra,
    pub key: Option<NonNull<ngx_http_complex_value_t>>,
    pub pos: ConfPos,
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

/// `mesh_rate_limit_zone NAME SIZE [redis=URL] [sync=TIME] [prefix=TEXT]
/// [password_file=PATH] [ca_file=PATH];`
pub fn zone(zones: &mut Vec<String>, d: &Directive) -> Result<(), ConfError> {
    let name = d.word(1)?.to_string();
    reserved(&name)?;
    if zones.contains(&name) {
        return Err(format!("mesh_rate_limit_zone \"{name}\" is defined twice").into());
    }
    let size_text = d.word(2)?;
    let size = parse_size(size_text)
        .map_err(|_| format!("mesh_rate_limit_zone \"{name}\": invalid size \"{size_text}\""))?;
    if size < MIN_ZONE_SIZE {
        return Err(format!(
            "mesh_rate_limit_zone \"{name}\": size \"{size_text}\" is too small, at least 32k"
        )
        .into());
    }
    let sync = sync_of(d, &name)?;
    let zone = shared_zone(d.cf, d.args[1], size, ZoneKind::Rate)?.as_ptr();
    // SAFETY: `zone` is nginx's entry for this name; `data` is ours to set once, to a
    // RateZone in the configuration pool (which lives as long as the cycle).
    unsafe {
        if !(*zone).data.is_null() {
            return Err(format!("mesh_rate_limit_zone \"{name}\" is defined twice").into());
        }
        let p = ngx::core::Pool::from_ngx_pool((*d.cf).pool).allocate(RateZone::new(
            name.clone(),
            size,
            sync,
        ));
        if p.is_null() {
            return Err("out of memory".into());
        }
        (*zone).data = p.cast();
        (*zone).init = Some(zone_init);
        // A global zone's sync state: a zone of its own, so a plain zone's layout never
        // changes. Its name lives in the RateZone (nginx keeps a pointer to it); declared
        // after the rate zone, it is initialised after it too.
        if let Some(sync) = (*p).sync.as_ref() {
            let shm_name = ngx_str_t {
                len: sync.shm_name.len(),
                data: sync.shm_name.as_ptr().cast_mut(),
            };
            let sz = shared_zone(d.cf, shm_name, shm_size(size), ZoneKind::RateSync)?.as_ptr();
            if !(*sz).data.is_null() {
                return Err(format!("mesh_rate_limit_zone \"{name}\" is defined twice").into());
            }
            (*sz).data = p.cast();
            (*sz).init = Some(sync_zone_init);
        }
    }
    zones.push(name);
    Ok(())
}

/// The `redis=`, `sync=`, `prefix=`, `password_file=` and `ca_file=` parameters of a zone:
/// `None` for a local zone. The URL is checked (and a certificate file read) now, so
/// `nginx -t` reports a bad one.
fn sync_of(d: &Directive, zone: &str) -> Result<Option<SyncConf>, ConfError> {
    let (mut url, mut sync, mut prefix, mut password_file, mut ca_file) =
        (None, None, None, None, None);
    for w in &d.args[3..] {
        let text = crate::nginx::conf::word(w)?;
        let (k, v) = text.split_once('=').unwrap_or((text, ""));
        let slot = match k {
            "redis" => &mut url,
            "sync" => &mut sync,
            "prefix" => &mut prefix,
            "password_file" => &mut password_file,
            "ca_file" => &mut ca_file,
            _ => return Err(invalid(format!("invalid parameter \"{text}\""))),
        };
        if v.is_empty() || slot.replace(v).is_some() {
            // A Redis URL may hold a password: named, never echoed.
            let shown = if k == "redis" { "redis=..." } else { text };
            return Err(invalid(format!("invalid parameter \"{shown}\"")));
        }
    }
    let Some(url) = url else {
        if let Some(p) = [
            sync.map(|_| "sync="),
            prefix.map(|_| "prefix="),
            password_file.map(|_| "password_file="),
            ca_file.map(|_| "ca_file="),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            return Err(invalid(format!("\"{p}\" requires \"redis=\"")));
        }
        return Ok(None);
    };
    let interval_ms = match sync {
        None => DEFAULT_SYNC_MS,
        Some(s) => parse_sync(s).map_err(invalid)?,
    };
    let prefix = prefix.unwrap_or(DEFAULT_PREFIX);
    check_prefix(prefix).map_err(invalid)?;
    let bad_url = |why: &str| invalid(format!("invalid redis URL: {why}"));
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(bad_url("expected redis://HOST[:PORT][/DB] or rediss://..."));
    }
    // The crate's own reading of the URL. The URL is never echoed (it may hold a password),
    // and the user info is scrubbed from the crate's message too, in case it quotes it.
    let userinfo = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(u, _)| u)
        .filter(|u| !u.is_empty());
    let scrub = |m: String| match userinfo {
        Some(u) => {
            let pw = u.split_once(':').map_or(u, |(_, p)| p);
            let m = m.replace(u, "***");
            if pw.is_empty() {
                m
            } else {
                m.replace(pw, "***")
            }
        }
        None => m,
    };
    let mut info = url.into_connection_info().map_err(|e| match e.kind() {
        redis::ErrorKind::InvalidClientConfig => bad_url(&scrub(e.to_string())),
        _ => bad_url("cannot be read"),
    })?;
    let (host, port, tls) = match info.addr() {
        ConnectionAddr::Tcp(h, p) => (h.clone(), *p, false),
        ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, true),
        _ => return Err(bad_url("expected a TCP address")),
    };
    if host.is_empty() {
        return Err(bad_url("no host"));
    }
    if let Some(f) = password_file {
        if info.redis_settings().password().is_some() {
            return Err(invalid(
                "\"password_file=\" and a password in the redis URL: use one",
            ));
        }
        let path = full_path(d.cf, f);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| invalid(format!("cannot read \"{path}\": {e}")))?;
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(invalid(format!("password file \"{path}\" is empty")));
        }
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    let db = info.redis_settings().db();
    let shown = format!("{}{host}:{port}/{db}", if tls { "rediss://" } else { "" });
    let mut ca_pem = None;
    let client = match ca_file {
        None => redis::Client::open(info).map_err(|e| bad_url(&e.to_string()))?,
        Some(f) => {
            if !tls {
                return Err(invalid("\"ca_file=\" applies to rediss:// URLs only"));
            }
            let path = full_path(d.cf, f);
            let pem = std::fs::read(&path)
                .map_err(|e| invalid(format!("cannot read \"{path}\": {e}")))?;
            // The crate's TLS setup needs a process-wide crypto provider (aws-lc-rs).
            crate::state::refresher::install_crypto();
            let client = redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )
            .map_err(|e| invalid(format!("ca_file \"{path}\": {e}")))?;
            ca_pem = Some(pem);
            client
        }
    };
    Ok(Some(SyncConf::new(
        client,
        ca_pem,
        shown,
        interval_ms,
        prefix.to_string(),
        zone,
    )))
}

/// `rate=R` and `burst=B` of `mesh_rate_limit` and `mesh_rate_limit_caller`.
fn gcra_of(rate: Option<&str>, burst: Option<&str>) -> Result<Gcra, String> {
    let rate = parse_rate(rate.ok_or("\"rate=\" is required")?)?;
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

/// Refuses the names of the module's own shared zones (metrics, keys, a global zone's sync
/// state): a rate zone of such a name would be another kind of zone under the same name.
fn reserved(name: &str) -> Result<(), ConfError> {
    if name == crate::state::metrics::ZONE_NAME
        || name == crate::state::keystore::ZONE_NAME
        || name.ends_with(crate::state::rate_sync::SHM_SUFFIX)
    {
        return Err(format!(
            "the zone name \"{name}\" is reserved for the module's own shared memory"
        )
        .into());
    }
    Ok(())
}

/// `mesh_rate_limit zone=NAME rate=R [burst=B] [key=VALUE];`
pub fn limit(d: &Directive) -> Result<Rc<RateLimit>, ConfError> {
    let (mut zone, mut rate, mut burst, mut key) = (None, None, None, None);
    for w in &d.args[1..] {
        let text = crate::nginx::conf::word(w)?;
        let (k, v) = text.split_once('=').unwrap_or((text, ""));
        let slot = match k {
            "zone" => &mut zone,
            "rate" => &mut rate,
            "burst" => &mut burst,
            "key" => &mut key,
            _ => return Err(invalid(format!("invalid parameter \"{text}\""))),
        };
        if v.is_empty() || slot.replace((v, *w)).is_some() {
            return Err(invalid(format!("invalid parameter \"{text}\"")));
        }
    }
    let (zone_name, zone_word) = zone.ok_or_else(|| invalid("\"zone=\" is required"))?;
    reserved(zone_name)?;
    let gcra = gcra_of(rate.map(|r| r.0), burst.map(|b| b.0)).map_err(invalid)?;
    let key = match key {
        None => None,
        Some((text, w)) => Some(
            compile_complex(d.cf, value_part(&w, text))
                .map_err(|_| invalid(format!("invalid key \"{text}\"")))?,
        ),
    };
    let zone = shared_zone(d.cf, value_part(&zone_word, zone_name), 0, ZoneKind::Rate)?;
    Ok(Rc::new(RateLimit {
        zone,
        zone_name: zone_name.to_string(),
        gcra,
        key,
        pos: d.pos.clone(),
    }))
}

/// `mesh_rate_limit_caller PATTERN rate=R [burst=B];`
pub fn caller(callers: &mut Option<Arc<Vec<CallerRate>>>, d: &Directive) -> Result<(), ConfError> {
    let w = d.values()?;
    let pattern = Pattern::parse(&w[0]).map_err(invalid)?;
    let (mut rate, mut burst) = (None, None);
    for p in &w[1..] {
        match p.split_once('=') {
            Some(("rate", v)) if rate.is_none() => rate = Some(v),
            Some(("burst", v)) if burst.is_none() => burst = Some(v),
            _ => return Err(invalid(format!("invalid parameter \"{p}\""))),
        }
    }
    let gcra = gcra_of(rate, burst).map_err(invalid)?;
    push(callers, CallerRate { pattern, gcra })
}

/// `mesh_rate_limit_status CODE;`
pub fn status(d: &Directive) -> Result<u16, ConfError> {
    let v = d.word(1)?;
    match v.parse::<u16>() {
        Ok(code) if (400..=599).contains(&code) => Ok(code),
        _ => Err(invalid(format!("\"{v}\" must be between 400 and 599"))),
    }
}
