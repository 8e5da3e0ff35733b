//! Rate limiting: the request's key charged once per zone, the caller's rate chosen by
//! `mesh_rate_limit_caller`, and the `RateLimit` headers.

use std::cell::RefCell;

use mesh_core::decision::Decision;
use mesh_core::gcra::{ratelimit_field, retry_after_secs};
use mesh_core::policy::Caller;
use mesh_core::ratetable::{key_hash_parts, KeyMemo};
use ngx::ffi::ngx_int_t;
use ngx::http::Request;

use super::ctx::RequestCtx;
use super::log::log_refusal;
use crate::conf::{LocConf, RateLimit};
use crate::nginx::headers::{pool_text, push_header_out, HeaderName, HeaderValue, RETRY_AFTER};
use crate::nginx::request::{client_addr, now_us};
use crate::state::metrics;

const RATELIMIT_POLICY: HeaderName = HeaderName::new("RateLimit-Policy", "ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::new("RateLimit", "ratelimit");

thread_local! {
    /// The worker's last rate-limit key and its identity.
    static KEY_MEMO: RefCell<KeyMemo> = RefCell::new(KeyMemo::default());
}

/// Charges the request against its rate-limit key; `Some(status)` if it is refused.
pub fn limit(
    r: &mut Request,
    ctx: &RequestCtx,
    lcf: &'static LocConf,
    rl: &RateLimit,
    caller: &Caller,
) -> Option<ngx_int_t> {
    let zone = rl.zone()?;
    if !ctx.charge_once(zone as *const _ as *const _) {
        return None;
    }
    // The caller's rate (`mesh_rate_limit_caller`, first match), and its `RateLimit-Policy`,
    // rendered at configuration time.
    let (gcra, policy) = match lcf
        .rate_callers
        .iter()
        .position(|c| c.pattern.matches(caller))
    {
        Some(i) => (&lcf.rate_callers[i].gcra, lcf.rate_policies.get(i + 1)),
        None => (&rl.gcra, lcf.rate_policies.first()),
    };
    let salt = zone.name.as_bytes();
    let key_hash_parts = |salt: &[u8], parts: &[&[u8]]| {
        KEY_MEMO.with(|m| match m.try_borrow_mut() {
            Ok(mut m) => m.key_hash_parts(salt, parts),
            Err(_) => key_hash_parts(salt, parts),
        })
    };
    let key = match rl.key {
        Some(cv) => {
            // SAFETY: compiled at configuration time into the configuration pool.
            let v = r.get_complex_value(unsafe { cv.as_ref() });
            key_hash_parts(salt, &[v.map_or(&[][..], |v| v.as_bytes())])
        }
        // The provider is part of the caller: the same principal from two issuers is two
        // callers. NUL cannot occur in a provider name (nginx's configuration words hold
        // none), so `provider NUL principal` is unambiguous.
        None => match caller.principal {
            Some(p) => key_hash_parts(
                salt,
                &[
                    b"caller:",
                    caller.provider.unwrap_or("").as_bytes(),
                    b"\0",
                    p.as_bytes(),
                ],
            ),
            None => key_hash_parts(salt, &[b"addr:", client_addr(r)]),
        },
    };
    let outcome = zone.check(key, gcra, now_us(), lcf.rate_dry_run)?;
    if lcf.rate_headers {
        if let Some(p) = policy {
            push_header_out(r, &RATELIMIT_POLICY, HeaderValue::Kept(p.as_bytes()));
        }
        if let Some(v) = pool_text(r, &ratelimit_field(&zone.name, &outcome)) {
            push_header_out(r, &RATELIMIT, HeaderValue::InPool(v));
        }
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
    metrics::count_rate_limited(&zone.name);
    if lcf.rate_headers {
        if let Some(v) = pool_text(r, &retry_after_secs(&outcome)) {
            push_header_out(r, &RETRY_AFTER, HeaderValue::InPool(v));
        }
    }
    let code = lcf.rate_status as ngx_int_t;
    log_refusal(r, ctx, code, "rate limited");
    Some(code)
}
