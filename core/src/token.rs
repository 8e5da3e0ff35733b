//! JWT verification (RFC 7515 JWS compact serialization, RFC 7519 JWT,
//! RFC 8725 best practices).
//!
//! Only the signature check is delegated to `jsonwebtoken::crypto::verify`;
//! the header and the claims are parsed and validated here, so that every
//! failure maps to exactly one [`AuthStatus`].

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::keys::{algorithm_name, parse_algorithm, Algorithm, Key, KeySet};
use crate::status::{sanitize, AuthError, AuthStatus};

/// Tokens longer than this are refused unread (RFC 8725 has no number; the
/// spec says 16 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Deepest nesting of objects/arrays accepted in the header or the claims;
/// the top-level object is level 1.
pub const MAX_CLAIMS_DEPTH: usize = 32;
/// The signature segment of a token that Cloud Run verified and stripped
/// before forwarding it.
pub const SIGNATURE_REMOVED_BY_GOOGLE: &str = "SIGNATURE_REMOVED_BY_GOOGLE";

/// A `require CLAIM=VALUE` line: a dotted path and the wanted value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub path: Vec<String>,
    pub value: String,
}

impl Requirement {
    /// Parse `a.b.c=VALUE`: split at the first `=`, the path on `.`; the path,
    /// each of its segments, and the value must be non-empty.
    pub fn parse(s: &str) -> Result<Requirement, String> {
        let (path, value) = s
            .split_once('=')
            .ok_or_else(|| format!("\"{s}\": expected CLAIM=VALUE"))?;
        if path.is_empty() || value.is_empty() {
            return Err(format!("\"{s}\": expected CLAIM=VALUE"));
        }
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("\"{s}\": empty segment in the claim path"));
        }
        Ok(Requirement {
            path,
            value: value.to_owned(),
        })
    }

    /// The path as written (`a.b.c`).
    pub fn path_text(&self) -> String {
        self.path.join(".")
    }

    /// Whether the claims satisfy this requirement: the value at the path is
    /// the string VALUE, a number or boolean whose JSON text is VALUE, or an
    /// array containing such an element.
    ///
    /// A top-level claim whose name is the whole dotted text (namespaced
    /// claims such as `https://example.com/roles`) is used in preference to
    /// walking the path.
    pub fn holds(&self, claims: &Map<String, Value>) -> bool {
        if self.path.len() > 1 {
            if let Some(v) = claims.get(&self.path_text()) {
                return value_matches(v, &self.value);
            }
        }
        let mut segments = self.path.iter();
        let mut cur = match segments.next().and_then(|first| claims.get(first)) {
            Some(v) => v,
            None => return false,
        };
        for seg in segments {
            cur = match cur.as_object().and_then(|o| o.get(seg)) {
                Some(v) => v,
                None => return false,
            };
        }
        value_matches(cur, &self.value)
    }
}

fn value_matches(v: &Value, want: &str) -> bool {
    match v {
        Value::Array(items) => items.iter().any(|e| scalar_equals(e, want)),
        v => scalar_equals(v, want),
    }
}

fn scalar_equals(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s == want,
        // The JSON text: `true`, `false`, `42`, `1.5`. (Not `Value == str`,
        // which only ever matches strings.)
        Value::Bool(b) => want == if *b { "true" } else { "false" },
        Value::Number(n) => n.to_string() == want,
        _ => false,
    }
}

/// A trusted issuer and how its tokens are checked.
#[derive(Clone, Debug)]
pub struct Provider {
    pub name: String,
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
    /// Accepted `aud` values, any of; empty = `aud` not checked.
    pub audiences: Vec<String>,
    /// The algorithms accepted (the configured list, or `keys.algorithms()`).
    pub algorithms: Vec<Algorithm>,
    /// May be empty (keys not fetched yet): requests then get `NoKeys`.
    pub keys: Arc<KeySet>,
    /// Clock skew allowed on `exp`, `nbf`, `iat`, in seconds.
    pub leeway: u64,
    /// The claim naming the caller (default `sub`).
    pub principal: String,
    pub require: Vec<Requirement>,
}

/// A verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// `Provider::name` of the provider that verified it.
    pub provider: String,
    /// The value of the provider's principal claim.
    pub principal: String,
    pub claims: Map<String, Value>,
    /// The payload JSON exactly as decoded.
    pub claims_json: String,
    /// The token's `aud` (a string or an array of strings).
    pub audiences: Vec<String>,
    /// `exp`, in seconds since the epoch.
    pub exp: u64,
}

impl Verified {
    /// A top-level claim as text: a string as is; a number or boolean as its
    /// JSON text; an array as its elements (strings as is, others as JSON)
    /// joined by `,`; an object as JSON; `None` for null or missing.
    pub fn claim_text(&self, name: &str) -> Option<String> {
        match self.claims.get(name)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Array(items) => Some(
                items
                    .iter()
                    .map(|e| match e {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            other => Some(other.to_string()),
        }
    }
}

/// Verify a token: everything except the audience (see [`check_audience`]).
///
/// `providers` are the candidates (the location's `mesh_auth` list); the
/// first whose issuers contain the token's `iss` is used.
pub fn verify(token: &[u8], providers: &[&Provider], now: u64) -> Result<Verified, AuthError> {
    verify_impl(token, providers, now, false)
}

/// The `iss` of a token, read without verifying anything: only to tell which provider's
/// keys to fetch again after an unknown `kid` (never to decide whom to trust).
pub fn unverified_issuer(token: &[u8]) -> Option<String> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let payload = b64url(token.split(|&b| b == b'.').nth(1)?)?;
    let claims: Value = serde_json::from_slice(&payload).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// Whether the token's signature segment is `SIGNATURE_REMOVED_BY_GOOGLE`
/// (Cloud Run verified the token and stripped the signature). Cheap; for
/// deciding between [`verify`] and [`verify_platform`], or for a warning.
pub fn is_signature_removed(token: &[u8]) -> bool {
    token.len() <= MAX_TOKEN_LEN
        && token.iter().filter(|&&b| b == b'.').count() == 2
        && token.ends_with(SIGNATURE_REMOVED_BY_GOOGLE.as_bytes())
        && token[..token.len() - SIGNATURE_REMOVED_BY_GOOGLE.len()].ends_with(b".")
}

/// `platform_verified on`: like [`verify`], for a token whose signature
/// segment must be `SIGNATURE_REMOVED_BY_GOOGLE`. Every check is done except
/// key lookup and the signature (so `NoKeys`/`UnknownKey` never occur); the
/// `alg` must still be allowed. Pass only the providers with
/// `platform_verified on`.
pub fn verify_platform(
    token: &[u8],
    providers: &[&Provider],
    now: u64,
) -> Result<Verified, AuthError> {
    verify_impl(token, providers, now, true)
}

/// The `aud` check (RFC 7519 4.1.3): `accepted` empty means not checked;
/// otherwise the token's `aud` must contain one of them.
pub fn check_audience(v: &Verified, accepted: &[String]) -> Result<(), AuthError> {
    if accepted.is_empty() || v.audiences.iter().any(|a| accepted.contains(a)) {
        return Ok(());
    }
    let reason = if v.audiences.is_empty() {
        "missing aud claim"
    } else {
        "audience not accepted"
    };
    Err(AuthError::new(AuthStatus::WrongAudience, reason))
}

fn fail<T>(status: AuthStatus, reason: impl AsRef<str>) -> Result<T, AuthError> {
    Err(AuthError::new(status, reason))
}

fn verify_impl(
    token: &[u8],
    providers: &[&Provider],
    now: u64,
    platform: bool,
) -> Result<Verified, AuthError> {
    // 1. Shape (RFC 7515 7.1: BASE64URL(header).BASE64URL(payload).BASE64URL(sig)).
    if token.len() > MAX_TOKEN_LEN {
        return fail(AuthStatus::Malformed, "token too large");
    }
    let mut segments = token.split(|&b| b == b'.');
    let (h64, p64, s64) = match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some(h), Some(p), Some(s), None) => (h, p, s),
        _ => {
            return fail(
                AuthStatus::Malformed,
                "token is not three dot-separated segments",
            )
        }
    };
    let header_bytes = b64url(h64).ok_or_else(|| bad_b64("header"))?;
    let payload_bytes = b64url(p64).ok_or_else(|| bad_b64("payload"))?;
    if b64url(s64).is_none() {
        return Err(bad_b64("signature"));
    }
    let header = json_object(&header_bytes, "header")?;
    let claims_json = String::from_utf8(payload_bytes)
        .map_err(|_| AuthError::new(AuthStatus::Malformed, "payload is not UTF-8"))?;
    let claims = json_object(claims_json.as_bytes(), "payload")?;

    // 2. RFC 7515 4.1.11: we understand no extensions, so any `crit` is
    // refused. `jku`, `x5u`, `jwk`, `x5c` are never looked at (RFC 8725 3.10).
    if header.contains_key("crit") {
        return fail(AuthStatus::Malformed, "unsupported crit header");
    }

    // 4. The issuer picks the provider (RFC 8725 3.8: validate the issuer,
    // and use only that issuer's keys).
    let iss = match claims.get("iss") {
        Some(Value::String(s)) => s.as_str(),
        _ => return fail(AuthStatus::WrongIssuer, "missing iss claim"),
    };
    let provider = match providers
        .iter()
        .find(|p| p.issuers.iter().any(|i| i == iss))
    {
        Some(p) => *p,
        None => {
            // The issuer is a claim: the description never repeats it (SPEC: no claims).
            return fail(AuthStatus::WrongIssuer, "issuer not accepted");
        }
    };

    // 3. The algorithm must be on the provider's allowlist; `none` never is
    // (RFC 8725 3.1, 3.2).
    let alg = match header.get("alg") {
        Some(Value::String(s)) => match parse_algorithm(s) {
            Some(a) if provider.algorithms.contains(&a) => a,
            _ => {
                return fail(
                    AuthStatus::BadSignature,
                    format!("algorithm {} not allowed", sanitize(s)),
                )
            }
        },
        _ => return fail(AuthStatus::BadSignature, "missing alg header"),
    };

    if platform {
        if s64 != SIGNATURE_REMOVED_BY_GOOGLE.as_bytes() {
            return fail(
                AuthStatus::BadSignature,
                "signature was expected to be removed",
            );
        }
    } else {
        // 5.
        if provider.keys.is_empty() {
            return fail(
                AuthStatus::NoKeys,
                format!("no keys for provider {}", sanitize(&provider.name)),
            );
        }
        // 6. Key selection (RFC 7515 4.1.4 `kid`) and the signature.
        let candidates = select_keys(&provider.keys, header.get("kid"), alg)?;
        // Base64url text is ASCII, so this cannot fail.
        let sig = std::str::from_utf8(s64).unwrap_or_default();
        let signing_input = &token[..h64.len() + 1 + p64.len()];
        let good = candidates.iter().any(|k| {
            jsonwebtoken::crypto::verify(sig, signing_input, &k.key, alg).unwrap_or(false)
        });
        if !good {
            return fail(AuthStatus::BadSignature, "signature does not verify");
        }
    }

    // 7. Time claims (RFC 7519 4.1.4, 4.1.5, 4.1.6); `exp` is required.
    let exp = match claims.get("exp").and_then(numeric_date) {
        Some(exp) => exp,
        None => return fail(AuthStatus::Malformed, "missing exp claim"),
    };
    if now > exp.saturating_add(provider.leeway) {
        return fail(AuthStatus::Expired, "token expired");
    }
    let latest_ok = now.saturating_add(provider.leeway);
    for (name, reason) in [
        ("nbf", "token not valid yet (nbf)"),
        ("iat", "token issued in the future (iat)"),
    ] {
        if let Some(v) = claims.get(name) {
            match numeric_date(v) {
                Some(t) if t > latest_ok => return fail(AuthStatus::NotYetValid, reason),
                Some(_) => {}
                None => {
                    return fail(
                        AuthStatus::Malformed,
                        format!("{name} claim is not a number"),
                    )
                }
            }
        }
    }

    // 8. `require` lines.
    for r in &provider.require {
        if !r.holds(&claims) {
            return fail(
                AuthStatus::ClaimMismatch,
                format!("claim {} does not match", sanitize(&r.path_text())),
            );
        }
    }

    // 9. The principal: a non-empty string without control characters (it
    // ends up in request headers and logs).
    let principal = match claims.get(&provider.principal) {
        Some(Value::String(s)) if !s.is_empty() && !s.chars().any(char::is_control) => s.clone(),
        Some(Value::String(s)) if !s.is_empty() => {
            return fail(
                AuthStatus::ClaimMismatch,
                format!(
                    "principal claim {} has control characters",
                    sanitize(&provider.principal)
                ),
            )
        }
        _ => {
            return fail(
                AuthStatus::ClaimMismatch,
                format!("principal claim {} missing", sanitize(&provider.principal)),
            )
        }
    };

    let audiences = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };

    Ok(Verified {
        provider: provider.name.clone(),
        principal,
        claims,
        claims_json,
        audiences,
        exp,
    })
}

/// Step 6: the keys to try.
///
/// With a `kid`: the keys with that `kid`; if none has it, the keys without a
/// `kid` (PEM keys and secrets name no key, so they serve any `kid`); none ->
/// `UnknownKey`. Of those, the ones that allow `alg`; none -> `BadSignature`.
/// Without a `kid`: every key that allows `alg`; none -> `UnknownKey`.
fn select_keys<'k>(
    keys: &'k KeySet,
    kid: Option<&Value>,
    alg: Algorithm,
) -> Result<Vec<&'k Key>, AuthError> {
    match kid {
        None => {
            let fit: Vec<&Key> = keys.keys.iter().filter(|k| k.allows(alg)).collect();
            if fit.is_empty() {
                return fail(
                    AuthStatus::UnknownKey,
                    format!("no key for algorithm {}", algorithm_name(alg)),
                );
            }
            Ok(fit)
        }
        Some(Value::String(kid)) => {
            let mut named: Vec<&Key> = keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect();
            if named.is_empty() {
                named = keys.keys.iter().filter(|k| k.kid.is_none()).collect();
            }
            if named.is_empty() {
                return fail(
                    AuthStatus::UnknownKey,
                    format!("unknown key {}", sanitize(kid)),
                );
            }
            named.retain(|k| k.allows(alg));
            if named.is_empty() {
                return fail(AuthStatus::BadSignature, "key type does not fit algorithm");
            }
            Ok(named)
        }
        Some(_) => fail(AuthStatus::Malformed, "kid header is not a string"),
    }
}

/// Strict base64url without padding (RFC 7515 2): `+`, `/`, `=` and
/// non-canonical trailing bits are refused.
fn b64url(segment: &[u8]) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(segment).ok()
}

fn bad_b64(what: &str) -> AuthError {
    AuthError::new(
        AuthStatus::Malformed,
        format!("{what} is not valid base64url"),
    )
}

/// Parse a JSON object (RFC 7515 4 / RFC 7519 7.2); duplicate member names
/// keep the last one (allowed by RFC 7515 4 and RFC 7519 4). Nesting beyond
/// `MAX_CLAIMS_DEPTH` is refused.
fn json_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, AuthError> {
    let malformed = || {
        AuthError::new(
            AuthStatus::Malformed,
            format!("{what} is not a JSON object"),
        )
    };
    // serde_json itself refuses nesting beyond 128 levels, so the value we
    // walk below is bounded.
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => {
            if map.values().any(|v| depth(v) + 1 > MAX_CLAIMS_DEPTH) {
                return fail(AuthStatus::Malformed, format!("{what} nested too deep"));
            }
            Ok(map)
        }
        Ok(_) => Err(malformed()),
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            fail(AuthStatus::Malformed, format!("{what} nested too deep"))
        }
        Err(_) => Err(malformed()),
    }
}

/// Object/array levels in a value (a scalar is 0), without recursion.
fn depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                max = max.max(d);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            Value::Object(o) => {
                max = max.max(d);
                stack.extend(o.values().map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    max
}

/// A NumericDate (RFC 7519 2) as whole seconds: fractions are dropped,
/// negative values become 0; `None` if not a number.
fn numeric_date(v: &Value) -> Option<u64> {
    let n = match v {
        Value::Number(n) => n,
        _ => return None,
    };
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    if n.is_i64() {
        return Some(0); // negative
    }
    // Finite (JSON has no NaN/inf); `as` saturates.
    n.as_f64()
        .map(|f| if f <= 0.0 { 0 } else { f.floor() as u64 })
}

#[cfg(test)]
mod issuer_tests {
    use super::*;

    #[test]
    fn unverified_issuer_reads_iss_only_from_well_formed_payloads() {
        let p = URL_SAFE_NO_PAD.encode(br#"{"iss":"https://a.example","exp":1}"#);
        assert_eq!(
            unverified_issuer(format!("e30.{p}.x").as_bytes()).as_deref(),
            Some("https://a.example")
        );
        assert_eq!(unverified_issuer(b"e30.e30.x"), None);
        assert_eq!(unverified_issuer(b"garbage"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requirement_parse() {
        let r = Requirement::parse("a.b.c=x=y").unwrap();
        assert_eq!(r.path, vec!["a", "b", "c"]);
        assert_eq!(r.value, "x=y");
        assert_eq!(r.path_text(), "a.b.c");
        for bad in ["", "=", "a=", "=b", "a..b=c", ".a=b", "a.=b", "novalue"] {
            assert!(Requirement::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requirement_holds() {
        let claims = json!({
            "email_verified": true,
            "n": 42,
            "s": "x",
            "groups": ["a", "b", 7, true, ["c"]],
            "org": {"team": {"name": "core", "ids": [1, 2]}},
            "https://example.com/roles": ["admin"],
            "a.b": "flat",
            "a": {"b": "nested"},
        });
        let claims = claims.as_object().unwrap();
        let holds = |s: &str| Requirement::parse(s).unwrap().holds(claims);
        assert!(holds("email_verified=true"));
        assert!(!holds("email_verified=false"));
        assert!(holds("n=42"));
        assert!(holds("s=x"));
        assert!(!holds("s=X"));
        assert!(holds("groups=b"));
        assert!(holds("groups=7"));
        assert!(holds("groups=true"));
        assert!(!holds("groups=c"));
        assert!(holds("org.team.name=core"));
        assert!(holds("org.team.ids=2"));
        assert!(!holds("org.team=core"));
        assert!(!holds("org.missing.name=core"));
        assert!(!holds("s.deeper=x"));
        assert!(!holds("absent=x"));
        assert!(holds("https://example.com/roles=admin"));
        assert!(holds("a.b=flat"));
        assert!(!holds("a.b=nested"));
    }

    #[test]
    fn numeric_dates() {
        assert_eq!(numeric_date(&json!(10)), Some(10));
        assert_eq!(numeric_date(&json!(10.9)), Some(10));
        assert_eq!(numeric_date(&json!(-5)), Some(0));
        assert_eq!(numeric_date(&json!(-5.5)), Some(0));
        assert_eq!(numeric_date(&json!(1e300)), Some(u64::MAX));
        assert_eq!(numeric_date(&json!("10")), None);
        assert_eq!(numeric_date(&json!(null)), None);
    }

    #[test]
    fn depths() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": []}]})), 4);
    }

    #[test]
    fn json_objects() {
        assert!(json_object(b"{}", "x").is_ok());
        assert!(json_object(b"[]", "x").is_err());
        assert!(json_object(b"{} x", "x").is_err());
        assert!(json_object(b"{\"a\":1,\"a\":2}", "x").unwrap()["a"] == json!(2));
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let ok = format!("{{\"a\":{}}}", deep(MAX_CLAIMS_DEPTH - 1));
        assert!(json_object(ok.as_bytes(), "x").is_ok());
        let bad = format!("{{\"a\":{}}}", deep(MAX_CLAIMS_DEPTH));
        let e = json_object(bad.as_bytes(), "x").unwrap_err();
        assert_eq!(e.reason, "x nested too deep");
        let bad = format!("{{\"a\":{}}}", deep(1000));
        let e = json_object(bad.as_bytes(), "x").unwrap_err();
        assert_eq!(e.reason, "x nested too deep");
    }

    #[test]
    fn signature_removed() {
        assert!(is_signature_removed(b"a.b.SIGNATURE_REMOVED_BY_GOOGLE"));
        assert!(!is_signature_removed(b"a.bSIGNATURE_REMOVED_BY_GOOGLE"));
        assert!(!is_signature_removed(b"a.b.xSIGNATURE_REMOVED_BY_GOOGLE"));
        assert!(!is_signature_removed(b"a.b.c.SIGNATURE_REMOVED_BY_GOOGLE"));
    }
}
