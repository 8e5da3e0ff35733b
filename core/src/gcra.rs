//! Rate limiting: `rate=` parsing, the generic cell rate algorithm (GCRA),
//! and the response headers.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT). With
//! the emission interval `T = period / rate` and the tolerance
//! `tau = T * burst`, a request at `now` passes iff `max(tat, now) - now <=
//! tau`, and then `tat = max(tat, now) + T`. This is nginx's
//! `limit_req ... burst=B nodelay`: B+1 requests at once from an idle key,
//! then R per period sustained; a refused request changes nothing.
//!
//! Times are microseconds in `u64`; all arithmetic saturates, so no input
//! (including a clock that steps backwards) can overflow or panic.
//!
//! Headers follow draft-ietf-httpapi-ratelimit-headers-11 (May 2026): the
//! `RateLimit-Policy` and `RateLimit` fields are Structured Field Lists
//! (RFC 9651) whose items are Strings naming the policy, with the parameters
//! `q` (quota) and `w` (window, seconds), respectively `r` (available quota)
//! and `t` (effective window: the seconds within which the client can use no
//! more than `r`).

use std::fmt;

use crate::text::{self, TextBuf, WriteText};

const US_PER_SEC: u64 = 1_000_000;
const US_PER_MIN: u64 = 60 * US_PER_SEC;
/// Structured Field Integers have at most 15 digits (RFC 9651 3.3.1).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// `per` requests every `period_us` microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per: u64,
    pub period_us: u64,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period_us {
            US_PER_SEC => write!(f, "{}r/s", self.per),
            US_PER_MIN => write!(f, "{}r/m", self.per),
            p => write!(f, "{}r/{}us", self.per, p),
        }
    }
}

/// Parse a rate as nginx's `limit_req_zone rate=`: a positive integer
/// followed by `r/s` or `r/m` (`10r/s`, `5r/m`). Rates above one request per
/// microsecond are accepted and act as one per microsecond.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let err = |why: &str| format!("invalid rate \"{}\": {why}", s.escape_debug());
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return Err(err("expected a number of requests, like 10r/s"));
    }
    let period_us = match unit {
        "r/s" => US_PER_SEC,
        "r/m" => US_PER_MIN,
        "" => return Err(err("missing unit (r/s or r/m)")),
        _ => return Err(err("the unit must be r/s or r/m")),
    };
    let per: u64 = number.parse().map_err(|_| err("number too large"))?;
    if per == 0 {
        return Err(err("must be at least 1"));
    }
    Ok(Rate { per, period_us })
}

/// A rate with a burst, ready to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// T = period / per, at least 1 µs.
    pub interval_us: u64,
    /// tau = T * burst.
    pub tolerance_us: u64,
    pub burst: u64,
    pub rate: Rate,
}

/// The result of one [`Gcra::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// The TAT to store. When refused: the given TAT, unchanged (except that
    /// a TAT left by a clock that stepped backwards is brought back within
    /// reach, see [`Gcra::check`]); storing it never advances the state.
    pub new_tat: u64,
    /// How many more requests would pass right now, after this one.
    pub remaining: u64,
    /// Until a full quota (burst + 1) is back: `new_tat - now`.
    pub reset_us: u64,
    /// 0 when allowed; when refused, until one request would pass.
    pub retry_after_us: u64,
    /// Until `remaining` next grows (one more request than `remaining` would
    /// pass); equal to `retry_after_us` when refused. The `t` of the
    /// `RateLimit` field.
    pub next_us: u64,
}

impl Gcra {
    pub fn new(rate: Rate, burst: u64) -> Gcra {
        let interval_us = rate
            .period_us
            .checked_div(rate.per)
            .unwrap_or(rate.period_us)
            .max(1);
        Gcra {
            interval_us,
            tolerance_us: interval_us.saturating_mul(burst),
            burst,
            rate,
        }
    }

    /// Check one request at `now` against the stored `tat` (0 = no state).
    ///
    /// Under a monotonic clock a stored TAT is never beyond `now + tau + T`.
    /// A larger one means the clock stepped backwards: it is treated as
    /// `now + tau + T` (the most a key can owe), so a step back refuses a key
    /// for at most one interval instead of for the length of the step (nginx's
    /// `limit_req` likewise ignores large backward steps).
    pub fn check(&self, tat: u64, now: u64) -> Outcome {
        self.check_owing(tat, now, 0)
    }

    /// [`Gcra::check`] for a key that may owe up to `debt_us` more than one instance alone
    /// can make it owe: a global zone charges each key with what other instances admitted,
    /// so its TAT may lie up to `now + tau + T + debt_us` ahead (only beyond that is it
    /// treated as a clock step).
    pub fn check_owing(&self, tat: u64, now: u64, debt_us: u64) -> Outcome {
        let t = self.interval_us.max(1);
        let tau = self.tolerance_us;
        let tat = tat.min(
            now.saturating_add(tau)
                .saturating_add(t)
                .saturating_add(debt_us),
        );
        let base = tat.max(now);
        let owed = base - now;
        if owed <= tau {
            let new_tat = base.saturating_add(t);
            let reset_us = new_tat.saturating_sub(now);
            let (remaining, next_us) = if reset_us > tau {
                (0, reset_us - tau)
            } else {
                let slack = tau - reset_us;
                ((slack / t).saturating_add(1), t - slack % t)
            };
            Outcome {
                allowed: true,
                new_tat,
                remaining,
                reset_us,
                retry_after_us: 0,
                next_us,
            }
        } else {
            let wait = owed - tau;
            Outcome {
                allowed: false,
                new_tat: tat,
                remaining: 0,
                reset_us: owed,
                retry_after_us: wait,
                next_us: wait,
            }
        }
    }

    /// The quota advertised in `RateLimit-Policy`: burst + 1.
    pub fn quota(&self) -> u64 {
        self.burst.saturating_add(1)
    }
}

fn ceil_secs(us: u64) -> u64 {
    us.div_ceil(US_PER_SEC)
}

/// `NAME` as a Structured Field String ([`write_sf_string`]).
fn sf_string(name: &str) -> String {
    // Every character takes at most two bytes of the output, its escape.
    let mut buf = vec![0u8; 2 * name.len() + 2];
    let mut out = TextBuf::new(&mut buf);
    write_sf_string(name, &mut out);
    String::from_utf8_lossy(out.as_bytes()).into_owned()
}

/// The value of `RateLimit-Policy`: `"NAME";q=B+1;w=W`, W the time in
/// seconds for a full quota to come back, `ceil((B+1) * T)`, at least 1.
/// (For B+1 requests at most every W seconds, this is exact when
/// `(B+1) * T` is whole seconds; otherwise W is rounded up.)
pub fn policy_header(name: &str, g: &Gcra) -> String {
    let window_us = u128::from(g.quota()) * u128::from(g.interval_us.max(1));
    let w = window_us.div_ceil(u128::from(US_PER_SEC)).max(1);
    let w = u64::try_from(w).unwrap_or(u64::MAX).min(SF_INTEGER_MAX);
    format!(
        "{};q={};w={}",
        sf_string(name),
        g.quota().min(SF_INTEGER_MAX),
        w
    )
}

/// `NAME` as a Structured Field String: quoted, `"` and `\\` escaped, anything but
/// printable ASCII written as `_`.
fn write_sf_string(name: &str, out: &mut TextBuf<'_>) {
    out.byte(b'"');
    for c in name.chars() {
        match c {
            '"' | '\\' => out.bytes(&[b'\\', c as u8]),
            ' '..='~' => out.byte(c as u8),
            _ => out.byte(b'_'),
        }
    }
    out.byte(b'"');
}

/// The value of `RateLimit` ([`ratelimit_header`]), to write straight into a response
/// buffer ([`WriteText`]): nothing allocated. At most [`ratelimit_field_max_len`] bytes.
pub struct RateLimitField<'a> {
    name: &'a str,
    outcome: &'a Outcome,
}

impl WriteText for RateLimitField<'_> {
    fn max_len(&self) -> usize {
        ratelimit_field_max_len(self.name.len())
    }

    fn write_text(&self, out: &mut TextBuf<'_>) {
        write_sf_string(self.name, out);
        out.bytes(b";r=");
        out.decimal(self.outcome.remaining.min(SF_INTEGER_MAX));
        out.bytes(b";t=");
        out.decimal(ceil_secs(self.outcome.next_us).min(SF_INTEGER_MAX));
    }
}

impl fmt::Display for RateLimitField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        text::display(self, f)
    }
}

/// [`ratelimit_header`] without allocating.
pub fn ratelimit_field<'a>(name: &'a str, o: &'a Outcome) -> RateLimitField<'a> {
    RateLimitField { name, outcome: o }
}

/// The longest `RateLimit` value for a zone name of `name_len` bytes (every byte escaped,
/// 15-digit integers), for sizing a buffer once at configuration time.
pub fn ratelimit_field_max_len(name_len: usize) -> usize {
    2 * name_len + 2 + ";r=".len() + 15 + ";t=".len() + 15
}

/// The value of `RateLimit`: `"NAME";r=REMAINING;t=SECONDS`, where SECONDS
/// is `ceil(next_us)` in seconds: within that time the client can use no
/// more than REMAINING (draft -11, 4.1.2). On a refusal it equals
/// [`retry_after_secs`], so `Retry-After` never points before the end of the
/// effective window (draft -11, 6).
pub fn ratelimit_header(name: &str, o: &Outcome) -> String {
    ratelimit_field(name, o).to_string()
}

/// The `Retry-After` value (delay-seconds) for a refusal: at least 1.
pub fn retry_after_secs(o: &Outcome) -> u64 {
    ceil_secs(o.retry_after_us).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sf_strings() {
        assert_eq!(sf_string("callers"), "\"callers\"");
        assert_eq!(sf_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(sf_string("é\n"), "\"__\"");
    }

    #[test]
    fn ratelimit_field_is_the_header() {
        let g = Gcra::new(parse_rate("10r/s").unwrap(), 5);
        let o = g.check(0, 1_000_000);
        let name = "z\"one\u{1}";
        let text = ratelimit_field(name, &o).to_string();
        assert_eq!(
            text,
            format!("\"z\\\"one_\";r={};t={}", o.remaining, ceil_secs(o.next_us))
        );
        assert!(text.len() <= ratelimit_field_max_len(name.len()));
        let worst = Outcome {
            remaining: u64::MAX,
            next_us: u64::MAX,
            ..o
        };
        let name = "\"".repeat(7);
        assert!(
            ratelimit_field(&name, &worst).to_string().len() <= ratelimit_field_max_len(name.len())
        );
    }

    #[test]
    fn owing_keeps_debt_a_plain_check_would_clamp() {
        let g = Gcra::new(parse_rate("10r/s").unwrap(), 5);
        let now = 10_000_000;
        // Owes 2 s beyond the burst: a plain check sees one interval, the owing check all of it.
        let tat = now + g.tolerance_us + 2_000_000;
        assert_eq!(g.check(tat, now).retry_after_us, g.interval_us);
        let o = g.check_owing(tat, now, 60_000_000);
        assert!(!o.allowed);
        assert_eq!(o.retry_after_us, 2_000_000);
        // Bounded by the debt allowed.
        let o = g.check_owing(u64::MAX, now, 1_000_000);
        assert_eq!(o.retry_after_us, g.interval_us + 1_000_000);
        assert_eq!(g.check_owing(0, now, 5), g.check(0, now));
    }

    #[test]
    fn ceil() {
        assert_eq!(ceil_secs(0), 0);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(1_000_000), 1);
        assert_eq!(ceil_secs(1_000_001), 2);
        assert_eq!(ceil_secs(u64::MAX), u64::MAX / 1_000_000 + 1);
    }
}
