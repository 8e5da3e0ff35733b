//! When to fetch keys and tokens again: `Cache-Control: max-age` bounds, retry backoff, and
//! the renewal time of an outbound ID token. Pure arithmetic on seconds; the nginx shell's
//! background thread does the fetching.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Bounds on how long fetched keys are used before the next fetch (SPEC "Keys").
pub const MIN_MAX_AGE: u64 = 60;
pub const MAX_MAX_AGE: u64 = 24 * 3600;
/// Without `Cache-Control: max-age`.
pub const DEFAULT_MAX_AGE: u64 = 3600;
/// An unknown `kid` triggers a refetch at most this often.
pub const REFETCH_INTERVAL: u64 = 30;
/// First retry delay after a failed fetch, and the longest.
pub const MIN_BACKOFF: u64 = 1;
pub const MAX_BACKOFF: u64 = 300;
/// Outbound tokens are renewed this long before they expire.
pub const RENEW_BEFORE_EXP: u64 = 300;

/// The `max-age` of a `Cache-Control` header value (RFC 9111 5.2.2.1), if any.
/// `no-cache`/`no-store` count as 0 (then the lower bound applies).
pub fn max_age(cache_control: &str) -> Option<u64> {
    let mut found = None;
    for directive in cache_control.split(',') {
        let directive = directive.trim();
        let (name, value) = match directive.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (directive, None),
        };
        if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store") {
            return Some(0);
        }
        if name.eq_ignore_ascii_case("max-age") {
            found = value.and_then(|v| v.parse::<u64>().ok()).or(found);
        }
    }
    found
}

/// Seconds until the next scheduled fetch, from the response's `Cache-Control`.
pub fn refresh_after(cache_control: Option<&str>) -> u64 {
    cache_control
        .and_then(max_age)
        .unwrap_or(DEFAULT_MAX_AGE)
        .clamp(MIN_MAX_AGE, MAX_MAX_AGE)
}

/// The next retry delay after a failure, given the previous one (0 = first failure).
pub fn next_backoff(previous: u64) -> u64 {
    previous.saturating_mul(2).clamp(MIN_BACKOFF, MAX_BACKOFF)
}

/// The `exp` of a JWT read without verifying it: for scheduling the renewal of a token this
/// server itself asked the metadata server for (never for deciding whom to trust).
pub fn unverified_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// When to renew a token that expires at `exp`: `RENEW_BEFORE_EXP` ahead, or halfway through
/// a shorter life, and never sooner than `MIN_BACKOFF` from `now`.
pub fn renew_at(exp: u64, now: u64) -> u64 {
    let life = exp.saturating_sub(now);
    let ahead = if life > 2 * RENEW_BEFORE_EXP {
        RENEW_BEFORE_EXP
    } else {
        life / 2
    };
    exp.saturating_sub(ahead).max(now + MIN_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_and_bounded() {
        assert_eq!(
            max_age("public, max-age=19725, must-revalidate, no-transform"),
            Some(19725)
        );
        assert_eq!(max_age("max-age=\"120\""), Some(120));
        assert_eq!(max_age("MAX-AGE=5"), Some(5));
        assert_eq!(max_age("no-store"), Some(0));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=abc"), None);
        assert_eq!(refresh_after(Some("max-age=5")), MIN_MAX_AGE);
        assert_eq!(refresh_after(Some("max-age=999999")), MAX_MAX_AGE);
        assert_eq!(refresh_after(Some("max-age=600")), 600);
        assert_eq!(refresh_after(None), DEFAULT_MAX_AGE);
        assert_eq!(refresh_after(Some("no-cache")), MIN_MAX_AGE);
    }

    #[test]
    fn backoff_doubles_up_to_a_bound() {
        let mut b = 0;
        let seen: Vec<u64> = (0..12)
            .map(|_| {
                b = next_backoff(b);
                b
            })
            .collect();
        assert_eq!(&seen[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
        assert_eq!(next_backoff(u64::MAX), MAX_BACKOFF);
    }

    #[test]
    fn exp_is_read_without_verification() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"aud":"x","exp":1800000000}"#);
        assert_eq!(
            unverified_exp(&format!("e30.{payload}.sig")),
            Some(1_800_000_000)
        );
        assert_eq!(unverified_exp("garbage"), None);
        assert_eq!(unverified_exp("e30.e30.x"), None);
    }

    #[test]
    fn tokens_are_renewed_ahead_of_expiry() {
        assert_eq!(renew_at(10_000, 6_400), 10_000 - RENEW_BEFORE_EXP);
        // A short-lived token: halfway.
        assert_eq!(renew_at(1_200, 1_000), 1_100);
        // Already expired: retry soon, never in the past.
        assert_eq!(renew_at(500, 1_000), 1_000 + MIN_BACKOFF);
    }
}
