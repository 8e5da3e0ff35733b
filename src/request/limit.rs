//! Rate limiting: the request's key charged once per zone, the caller's rate chosen by
//! `mesh_rate_limit_caller`, and the `RateLimit` headers.

use mesh_core::gcra::{policy_header, ratelimit_header, retry_after_secs, Gcra};
use mesh_core::policy::Caller;
use mesh_core::ratetable::key_hash;
use ngx::ffi::ngx_int_t;
use ngx::http::Request;

use super::ctx::{Decision, RequestCtx};
use super::log::log_refusal;
use crate::conf::{LocConf, RateLimit};
use crate::nginx::headers::add_header_out;
use crate::nginx::request::{client_addr, now_us};

/// Charges the request against its rate-limit key; `Some(status)` if it is refused.
pub fn limit(
    r: &mut Request,
    ctx: &RequestCtx,
    lcf: &LocConf,
    rl: &RateLimit,
    caller: &Caller,
) -> Option<ngx_int_t> {
    let zone = rl.zone()?;
    if !ctx.charge_once(zone as *const _ as *const _) {
        return None;
    }
    let gcra: &Gcra = lcf
        .rate_callers
        .iter()
        .find(|c| c.pattern.matches(caller))
        .map_or(&rl.gcra, |c| &c.gcra);
    let key = match rl.key {
        // SAFETY: compiled at configuration time into the configuration pool.
        Some(cv) => r
            .get_complex_value(unsafe { cv.as_ref() })
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        // The provider is part of the caller: the same principal from two issuers is two
        // callers. NUL cannot occur in a provider name (nginx's configuration words hold
        // none), so `provider NUL principal` is unambiguous.
        None => match caller.principal {
            Some(p) => [
                b"caller:".as_slice(),
                caller.provider.unwrap_or("").as_bytes(),
                b"\0",
                p.as_bytes(),
            ]
            .concat(),
            None => [b"addr:".as_slice(), client_addr(r)].concat(),
        },
    };
    let outcome = zone.check(
        key_hash(zone.name.as_bytes(), &key),
        gcra,
        now_us(),
        lcf.rate_dry_run,
    )?;
    if lcf.rate_headers {
        add_header_out(r, "RateLimit-Policy", &policy_header(&zone.name, gcra));
        add_header_out(r, "RateLimit", &ratelimit_header(&zone.name, &outcome));
    }
    if outcome.allowed {
        return None;
    }
    if lcf.rate_dry_run {
        ctx.decide(Decision::WouldRateLimit);
        log_refusal(r, ctx, 0, "would rate limit (dry run)");
        return None;
    }
    ctx.decide(Decision::RateLimited);
    if lcf.rate_headers {
        add_header_out(r, "Retry-After", &retry_after_secs(&outcome).to_string());
    }
    let code = lcf.rate_status as ngx_int_t;
    log_refusal(r, ctx, code, "rate limited");
    Some(code)
}
