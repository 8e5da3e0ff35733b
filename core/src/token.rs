//! JWT verification (RFC 7515 JWS compact serialization, RFC 7519 JWT,
//! RFC 8725 best practices).
//!
//! Only the signature check is delegated, to aws-lc on keys parsed once at load
//! ([`Key::verify`]); the header and the claims are parsed and validated here, once per
//! token ([`Jwt`]), so that every failure maps to exactly one [`AuthStatus`].

use std::fmt;
use std::sync::Arc;

use aws_lc_rs::digest::{self, Digest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::keys::{algorithm_name, parse_algorithm, Algorithm, Key, KeyFingerprint, KeySet};
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
    /// `preset google` without a `principal` line: a verified `email` (present, and
    /// `email_verified` true) names the caller; else `principal` does. IAM-minted ID tokens
    /// carry `email` only when asked for (`includeEmail`).
    pub email_first: bool,
    pub require: Vec<Requirement>,
}

impl Provider {
    /// Whether `iss` is one of this provider's issuers.
    pub fn accepts_issuer(&self, iss: &str) -> bool {
        self.issuers.iter().any(|i| i == iss)
    }

    /// The claim that names the caller of a token with these claims.
    pub fn principal_claim(&self, claims: &Map<String, Value>) -> &str {
        if self.email_first && has_verified_email(claims) {
            "email"
        } else {
            &self.principal
        }
    }
}

/// The provider that decides a token of issuer `iss`: the first of `providers` that accepts
/// the issuer (RFC 8725 3.8: the issuer picks the keys). Only that one is tried; a later
/// provider of the same issuer is never a second chance, and a cached answer must come from
/// the same provider (see [`Verified::issuer`]).
pub fn deciding_provider<'p>(providers: &[&'p Provider], iss: &str) -> Option<&'p Provider> {
    providers.iter().copied().find(|p| p.accepts_issuer(iss))
}

/// Whether `email` is a non-empty string and `email_verified` is `true` (the boolean, or the
/// string `"true"` that some older Google tokens carry).
fn has_verified_email(claims: &Map<String, Value>) -> bool {
    let verified = match claims.get("email_verified") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    };
    verified && matches!(claims.get("email"), Some(Value::String(s)) if !s.is_empty())
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
    /// `claims_json` in base64url without padding (`X-Mesh-Claims`): the token's payload
    /// segment as sent, which strict decoding makes the one encoding of `claims_json`.
    pub claims_b64: String,
    /// The token's `aud` (a string or an array of strings).
    pub audiences: Vec<String>,
    /// `exp`, in seconds since the epoch.
    pub exp: u64,
    /// `iss` (a verified token always has one), kept apart from `claims`: every cache hit
    /// reads it, to check which provider decides the token.
    pub iss: String,
    /// The key that verified the signature; `None` when the platform did
    /// (`platform_verified`). A cached entry is served only while the provider's keys still
    /// hold it ([`Verified::key_still_held`]).
    pub key: Option<KeyFingerprint>,
}

impl Verified {
    /// The token's `iss` (a verified token always has one).
    pub fn issuer(&self) -> Option<&str> {
        Some(self.iss.as_str()).filter(|i| !i.is_empty())
    }

    /// Whether the key that verified this token is still in `keys` (the provider's current
    /// set): a key withdrawn from a JWKS stops its cached tokens at once.
    pub fn key_still_held(&self, keys: &KeySet) -> bool {
        self.key.as_ref().is_none_or(|fp| keys.holds(fp))
    }

    /// A top-level claim as text (`$mesh_claim_NAME`): a string as is; a number or boolean
    /// as its JSON text; an array as its elements (strings as is, others as JSON) joined by
    /// `,`; an object as JSON; `None` for null or missing.
    ///
    /// `name` is found exactly, else (nginx lower-cases variable names, so `$mesh_claim_orgid`
    /// asks for `orgId`) as the one claim whose name equals it ignoring ASCII case; two or
    /// more such claims and none is exact: `None` (ambiguous).
    ///
    /// `None` as well when the text would hold a control character (CR, LF, NUL, DEL, ...):
    /// a signed claim must not add or split a header through `proxy_set_header` or
    /// `add_header`. The token itself stays valid; only that variable is not found.
    pub fn claim_text(&self, name: &str) -> Option<String> {
        let value = match self.claims.get(name) {
            Some(v) => v,
            None => {
                let mut found = self
                    .claims
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name));
                let (_, v) = found.next()?;
                if found.next().is_some() {
                    return None;
                }
                v
            }
        };
        let text = match value {
            Value::Null => return None,
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .map(|e| match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        if text.chars().any(char::is_control) {
            return None;
        }
        Some(text)
    }
}

/// Verify a token: everything except the audience (see [`check_audience`]).
///
/// `providers` are the candidates (the location's `mesh_auth` list); the
/// first whose issuers contain the token's `iss` is used.
///
/// A thin wrapper around [`Jwt::decode`] and [`Jwt::verify`]; a caller that wants the
/// token's issuer after a refusal (to fetch keys again after an unknown `kid`) uses those.
pub fn verify(token: &[u8], providers: &[&Provider], now: u64) -> Result<Verified, AuthError> {
    Jwt::decode(token)?.verify(providers, now)
}

/// The `iss` of a token, read without verifying anything: only to tell which provider's
/// keys to fetch again after an unknown `kid` (never to decide whom to trust).
///
/// This decodes the payload; a caller that already has the [`Jwt`] reads
/// [`Jwt::issuer`] instead.
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
    Jwt::decode(token)?.verify_platform(providers, now)
}

/// The `aud` check (RFC 7519 4.1.3): `accepted` empty means not checked;
/// otherwise the token's `aud` must contain one of them ([`audience_matches`]).
pub fn check_audience(v: &Verified, accepted: &[String]) -> Result<(), AuthError> {
    if accepted.is_empty()
        || v.audiences
            .iter()
            .any(|a| accepted.iter().any(|want| audience_matches(want, a)))
    {
        return Ok(());
    }
    let reason = if v.audiences.is_empty() {
        "missing aud claim"
    } else {
        "audience not accepted"
    };
    Err(AuthError::new(AuthStatus::WrongAudience, reason))
}

/// Whether a token's `aud` value `got` is the configured audience `want`: byte for byte, or,
/// when `want` is an `https://` URL, that URL with one trailing `/` added or removed (Google's
/// samples mint `https://SERVICE.run.app/`, Cloud Run's own audience has no slash). Nothing
/// else is forgiven: no case folding, no second slash, no other scheme.
pub fn audience_matches(want: &str, got: &str) -> bool {
    if want == got {
        return true;
    }
    if !want.starts_with("https://") {
        return false;
    }
    match (want.strip_suffix('/'), got.strip_suffix('/')) {
        (Some(w), None) => !w.ends_with('/') && w == got,
        (None, Some(g)) => !g.ends_with('/') && g == want,
        _ => false,
    }
}

fn fail<T>(status: AuthStatus, reason: impl AsRef<str>) -> Result<T, AuthError> {
    Err(AuthError::new(status, reason))
}

/// A token as received, with its cache key computed once per request: a keyed hash
/// ([`crate::fasthash`], under a random key drawn once per process; only tokens that
/// verified are cached, whose key inputs no client chooses) of the token's length
/// and its last [`KEY_TAIL`] bytes ([`cache_key_input`]), cheap next to a SHA-256 and next
/// to hashing the whole token. The key only finds an entry: a hit is served only if the
/// entry's token equals this one byte for byte ([`crate::cache::TokenCache::lookup`]), so a
/// collision can cost a miss, never pass a token that was not verified. The SHA-256 of the
/// signing input (`HEADER.PAYLOAD`, as sent) is computed on first use only: on a cache miss,
/// for RS256, PS256 and ES256, it is the digest the signature is checked on.
#[derive(Clone)]
pub struct Hashed<'t> {
    token: &'t [u8],
    /// Where the signature segment starts (after the last `.`); `None` without a `.`.
    sig_at: Option<usize>,
    /// `None` for a token over [`MAX_TOKEN_LEN`] (never cached, refused by [`Jwt::decode`]).
    key: Option<u64>,
    /// The SHA-256 of the signing input (of the whole token when it has no `.`), once asked.
    sha256: std::cell::OnceCell<Digest>,
}

/// Bytes of a token's end that its cache key hashes (with its length).
const KEY_TAIL: usize = 32;

/// What [`Hashed`]'s cache key hashes: the token's length and its last [`KEY_TAIL`] bytes,
/// when they are all signature (every signature the module verifies is longer: HS256's
/// 43 characters at the least); otherwise the whole token. A signature's end is as
/// unpredictable as the whole token for tokens that verify, and only tokens that verified
/// are ever cached, so the entries stay spread however a client picks the tokens it sends.
/// A token with a short or no signature (Cloud Run's `SIGNATURE_REMOVED_BY_GOOGLE`, the
/// same for every caller) is hashed whole, so that such tokens do not share one entry.
/// `sig_at`: where the signature starts (after the last `.`).
fn cache_key_input(token: &[u8], sig_at: Option<usize>) -> (usize, &[u8]) {
    let sig_len = sig_at.map_or(0, |at| token.len() - at);
    if sig_len > KEY_TAIL {
        (token.len(), &token[token.len() - KEY_TAIL..])
    } else {
        (token.len(), token)
    }
}

impl<'t> Hashed<'t> {
    pub fn new(token: &'t [u8]) -> Hashed<'t> {
        let fits = token.len() <= MAX_TOKEN_LEN;
        let sig_at = memchr::memrchr(b'.', token).map(|d| d + 1);
        let key = fits.then(|| {
            let (len, bytes) = cache_key_input(token, sig_at);
            crate::fasthash::hash(len as u64, bytes)
        });
        Hashed {
            token,
            sig_at,
            key,
            sha256: std::cell::OnceCell::new(),
        }
    }

    /// A token under a chosen cache key: two tokens colliding, for the cache's tests.
    #[cfg(test)]
    pub(crate) fn with_cache_key(token: &'t [u8], key: u64) -> Hashed<'t> {
        Hashed {
            key: Some(key),
            ..Hashed::new(token)
        }
    }

    /// The token.
    pub fn token(&self) -> &'t [u8] {
        self.token
    }

    /// Whether the signature segment is `SIGNATURE_REMOVED_BY_GOOGLE` (as
    /// [`Jwt::is_signature_removed`], without decoding).
    pub fn is_signature_removed(&self) -> bool {
        self.sig_at
            .is_some_and(|at| &self.token[at..] == SIGNATURE_REMOVED_BY_GOOGLE.as_bytes())
    }

    /// The cache key: a keyed 64-bit hash of [`cache_key_input`]; `None` when the token is too
    /// long. Equal tokens have equal keys within a process; different tokens may collide.
    pub fn cache_key(&self) -> Option<u64> {
        self.key
    }

    /// The SHA-256 of the signing input (of the whole token when it has no `.`), computed on
    /// first call; `None` when the token is too long.
    pub fn signing_input_sha256(&self) -> Option<&[u8; 32]> {
        self.key?;
        self.digest().as_ref().try_into().ok()
    }

    fn digest(&self) -> &Digest {
        self.sha256.get_or_init(|| {
            let signed = self.sig_at.map_or(self.token, |at| &self.token[..at - 1]);
            digest::digest(&digest::SHA256, signed)
        })
    }

    /// The signature segment (base64url text) as sent; `None` when there is no `.`.
    pub fn signature(&self) -> Option<&'t [u8]> {
        self.sig_at.map(|i| &self.token[i..])
    }

    /// The digest, when it is that of a signing input `HEADER.PAYLOAD` (for
    /// [`Jwt::decode_hashed`]).
    fn signing_digest(&self, signing_input_len: usize) -> Option<Digest> {
        match self.sig_at {
            Some(at) if at == signing_input_len + 1 && self.key.is_some() => Some(*self.digest()),
            _ => None,
        }
    }
}

/// The `alg` header, as read.
#[derive(Clone, Debug)]
enum AlgHeader {
    Missing,
    /// A string naming no supported algorithm (the text, sanitized, for the message).
    Unsupported(String),
    Named(Algorithm),
}

/// The `kid` header, as read.
#[derive(Clone, Debug)]
enum KidHeader {
    Missing,
    NotString,
    Named(String),
}

/// A token decoded once: the header members the verification reads, the claims, the
/// signature. Nothing in it is trusted until [`Jwt::verify`] (or [`Jwt::check`]) says so.
pub struct Jwt<'t> {
    /// `HEADER.PAYLOAD` as sent: what the signature covers.
    signing_input: &'t [u8],
    /// The signature segment, as sent (base64url).
    signature_b64: &'t [u8],
    /// The payload segment, as sent (base64url of `claims_json`).
    payload_b64: &'t [u8],
    /// The decoded signature.
    signature: Vec<u8>,
    sha256: Option<Digest>,
    alg: AlgHeader,
    kid: KidHeader,
    claims: Map<String, Value>,
    claims_json: String,
    /// The key whose signature check passed (set by [`Jwt::check`]).
    verified_by: std::cell::Cell<Option<KeyFingerprint>>,
}

impl<'t> Jwt<'t> {
    /// Steps 1 and 2: the shape (RFC 7515 7.1:
    /// `BASE64URL(header).BASE64URL(payload).BASE64URL(signature)`, at most
    /// [`MAX_TOKEN_LEN`] bytes), the header and payload JSON objects (nested at most
    /// [`MAX_CLAIMS_DEPTH`] levels), and no `crit` header. Every failure is `Malformed`.
    pub fn decode(token: &'t [u8]) -> Result<Jwt<'t>, AuthError> {
        Jwt::decode_impl(token, None)
    }

    /// [`Jwt::decode`] of a token already hashed for the cache: its digest is reused for the
    /// signature check.
    pub fn decode_hashed(token: &Hashed<'t>) -> Result<Jwt<'t>, AuthError> {
        Jwt::decode_impl(token.token, Some(token))
    }

    fn decode_impl(token: &'t [u8], hashed: Option<&Hashed<'t>>) -> Result<Jwt<'t>, AuthError> {
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
        let signature = b64url(s64).ok_or_else(|| bad_b64("signature"))?;
        let header = parse_header(&header_bytes)?;
        let claims_json = String::from_utf8(payload_bytes)
            .map_err(|_| AuthError::new(AuthStatus::Malformed, "payload is not UTF-8"))?;
        let claims = json_object(claims_json.as_bytes(), "payload")?;

        // RFC 7515 4.1.11: we understand no extensions, so any `crit` is
        // refused. `jku`, `x5u`, `jwk`, `x5c` are never looked at (RFC 8725 3.10).
        if header.crit {
            return fail(AuthStatus::Malformed, "unsupported crit header");
        }
        let signing_len = h64.len() + 1 + p64.len();
        Ok(Jwt {
            signing_input: &token[..signing_len],
            signature_b64: s64,
            payload_b64: p64,
            signature,
            // Hashed only for an algorithm that signs a SHA-256 (the others hash anyway).
            sha256: match header.alg {
                AlgHeader::Named(a) if crate::keys::signs_sha256(a) => {
                    hashed.and_then(|h| h.signing_digest(signing_len))
                }
                _ => None,
            },
            alg: header.alg,
            kid: header.kid,
            claims,
            claims_json,
            verified_by: std::cell::Cell::new(None),
        })
    }

    /// The `iss` claim, unverified: only to tell which provider's keys to fetch again after
    /// an unknown `kid` (never to decide whom to trust).
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// The claims, unverified.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// Whether the signature segment is `SIGNATURE_REMOVED_BY_GOOGLE`.
    pub fn is_signature_removed(&self) -> bool {
        self.signature_b64 == SIGNATURE_REMOVED_BY_GOOGLE.as_bytes()
    }

    /// Everything [`verify`] checks; on success the provider that accepts the token (turn it
    /// into a [`Verified`] with [`Jwt::into_verified`]). The token is kept, so its issuer
    /// can still be read after a refusal.
    pub fn check<'p>(
        &self,
        providers: &[&'p Provider],
        now: u64,
    ) -> Result<&'p Provider, AuthError> {
        self.check_impl(providers, now, false)
    }

    /// [`Jwt::check`] for [`verify_platform`].
    pub fn check_platform<'p>(
        &self,
        providers: &[&'p Provider],
        now: u64,
    ) -> Result<&'p Provider, AuthError> {
        self.check_impl(providers, now, true)
    }

    /// [`Jwt::check`], then [`Jwt::into_verified`].
    pub fn verify(self, providers: &[&Provider], now: u64) -> Result<Verified, AuthError> {
        let p = self.check(providers, now)?;
        Ok(self.into_verified(p))
    }

    /// [`Jwt::check_platform`], then [`Jwt::into_verified`].
    pub fn verify_platform(self, providers: &[&Provider], now: u64) -> Result<Verified, AuthError> {
        let p = self.check_platform(providers, now)?;
        Ok(self.into_verified(p))
    }

    /// The verified token, for the provider [`Jwt::check`] returned (the claims move, they
    /// are not copied).
    pub fn into_verified(self, provider: &Provider) -> Verified {
        let principal = match self.claims.get(provider.principal_claim(&self.claims)) {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let audiences = match self.claims.get("aud") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let exp = self.claims.get("exp").and_then(numeric_date).unwrap_or(0);
        let key = self.verified_by.get();
        let iss = self.issuer().unwrap_or_default().to_owned();
        Verified {
            key,
            iss,
            provider: provider.name.clone(),
            principal,
            claims: self.claims,
            claims_json: self.claims_json,
            // Base64url text is ASCII.
            claims_b64: String::from_utf8_lossy(self.payload_b64).into_owned(),
            audiences,
            exp,
        }
    }

    fn check_impl<'p>(
        &self,
        providers: &[&'p Provider],
        now: u64,
        platform: bool,
    ) -> Result<&'p Provider, AuthError> {
        let claims = &self.claims;
        // 4. The issuer picks the provider (RFC 8725 3.8: validate the issuer,
        // and use only that issuer's keys).
        let iss = match claims.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            _ => return fail(AuthStatus::WrongIssuer, "missing iss claim"),
        };
        let provider = match deciding_provider(providers, iss) {
            Some(p) => p,
            None => {
                // The issuer is a claim: the description never repeats it (SPEC: no claims).
                return fail(AuthStatus::WrongIssuer, "issuer not accepted");
            }
        };

        // 3. The algorithm must be on the provider's allowlist; `none` never is
        // (RFC 8725 3.1, 3.2).
        let alg = match &self.alg {
            AlgHeader::Named(a) if provider.algorithms.contains(a) => *a,
            AlgHeader::Named(a) => {
                return fail(
                    AuthStatus::BadSignature,
                    format!("algorithm {} not allowed", algorithm_name(*a)),
                )
            }
            AlgHeader::Unsupported(s) => {
                return fail(
                    AuthStatus::BadSignature,
                    format!("algorithm {s} not allowed"),
                )
            }
            AlgHeader::Missing => return fail(AuthStatus::BadSignature, "missing alg header"),
        };

        if platform {
            if !self.is_signature_removed() {
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
            // 6. Key selection (RFC 7515 4.1.4 `kid`) and the signature, on keys parsed
            // at load.
            let good = for_each_candidate(&provider.keys, &self.kid, alg, |k| {
                let ok = k.verify_prehashed(
                    alg,
                    self.signing_input,
                    self.sha256.as_ref(),
                    &self.signature,
                );
                if ok {
                    self.verified_by.set(Some(k.fingerprint()));
                }
                ok
            })?;
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
            if !r.holds(claims) {
                return fail(
                    AuthStatus::ClaimMismatch,
                    format!("claim {} does not match", sanitize(&r.path_text())),
                );
            }
        }

        // 9. The principal: a non-empty string without control characters (it
        // ends up in request headers and logs).
        let principal = provider.principal_claim(claims);
        match claims.get(principal) {
            Some(Value::String(s)) if !s.is_empty() && !s.chars().any(char::is_control) => {}
            Some(Value::String(s)) if !s.is_empty() => {
                return fail(
                    AuthStatus::ClaimMismatch,
                    format!(
                        "principal claim {} has control characters",
                        sanitize(principal)
                    ),
                )
            }
            _ => {
                return fail(
                    AuthStatus::ClaimMismatch,
                    format!("principal claim {} missing", sanitize(principal)),
                )
            }
        }
        Ok(provider)
    }
}

/// The header members the verification reads (RFC 7515 4.1): `alg`, `kid`, and whether
/// `crit` is present. Every other member is read as JSON and dropped.
struct Header {
    alg: AlgHeader,
    kid: KidHeader,
    crit: bool,
}

/// Parse the header: a JSON object (duplicate members keep the last one, as
/// [`json_object`]), nested at most [`MAX_CLAIMS_DEPTH`] levels, read without building a
/// map (each member's value is parsed and checked as `serde_json::Value` would, then
/// dropped, unless it is `alg`, `kid` or `crit`).
fn parse_header(bytes: &[u8]) -> Result<Header, AuthError> {
    use serde::de::{self, Deserializer, MapAccess, Visitor};

    /// A member's value: a string, or anything else (read in full, dropped).
    enum Member {
        Str(String),
        Other,
    }
    struct MemberVisitor;
    impl<'de> Visitor<'de> for MemberVisitor {
        type Value = Member;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Member, E> {
            Ok(Member::Str(v.to_owned()))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Member, E> {
            Ok(Member::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Member, E> {
            Ok(Member::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Member, E> {
            Ok(Member::Other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Member, E> {
            Ok(Member::Other)
        }
        fn visit_unit<E>(self) -> Result<Member, E> {
            Ok(Member::Other)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Member, A::Error> {
            while seq.next_element::<Checked>()?.is_some() {}
            Ok(Member::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Member, A::Error> {
            while map.next_entry::<Checked, Checked>()?.is_some() {}
            Ok(Member::Other)
        }
    }
    impl<'de> de::Deserialize<'de> for Member {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Member, D::Error> {
            d.deserialize_any(MemberVisitor)
        }
    }
    /// Any JSON value, parsed (strings unescaped and checked) and dropped.
    struct Checked;
    impl<'de> de::Deserialize<'de> for Checked {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Checked;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a JSON value")
                }
                fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_unit<E>(self) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
                    while seq.next_element::<Checked>()?.is_some() {}
                    Ok(Checked)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                    while map.next_entry::<Checked, Checked>()?.is_some() {}
                    Ok(Checked)
                }
            }
            d.deserialize_any(V)
        }
    }
    /// A member name, unescaped (borrowed when it has no escapes).
    struct Name<'de>(std::borrow::Cow<'de, str>);
    impl<'de> de::Deserialize<'de> for Name<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name<'de>, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Name<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a member name")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                    Ok(Name(std::borrow::Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                    Ok(Name(std::borrow::Cow::Owned(v.to_owned())))
                }
            }
            d.deserialize_str(V)
        }
    }
    struct HeaderVisitor;
    impl<'de> Visitor<'de> for HeaderVisitor {
        type Value = Header;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
            let mut h = Header {
                alg: AlgHeader::Missing,
                kid: KidHeader::Missing,
                crit: false,
            };
            while let Some(Name(name)) = map.next_key::<Name>()? {
                match &*name {
                    "alg" => {
                        h.alg = match map.next_value::<Member>()? {
                            Member::Str(s) => match parse_algorithm(&s) {
                                Some(a) => AlgHeader::Named(a),
                                None => AlgHeader::Unsupported(sanitize(&s)),
                            },
                            Member::Other => AlgHeader::Missing,
                        }
                    }
                    "kid" => {
                        h.kid = match map.next_value::<Member>()? {
                            Member::Str(s) => KidHeader::Named(s),
                            Member::Other => KidHeader::NotString,
                        }
                    }
                    "crit" => {
                        map.next_value::<Checked>()?;
                        h.crit = true;
                    }
                    _ => {
                        map.next_value::<Checked>()?;
                    }
                }
            }
            Ok(h)
        }
        // Any other JSON value: not an object.
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Header, E> {
            Err(E::custom(NOT_AN_OBJECT))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Header, E> {
            Err(E::custom(NOT_AN_OBJECT))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Header, E> {
            Err(E::custom(NOT_AN_OBJECT))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Header, E> {
            Err(E::custom(NOT_AN_OBJECT))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Header, E> {
            Err(E::custom(NOT_AN_OBJECT))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Header, E> {
            Err(E::custom(NOT_AN_OBJECT))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Header, A::Error> {
            // Read to the end first, so nesting too deep is reported as such.
            while seq.next_element::<Checked>()?.is_some() {}
            Err(de::Error::custom(NOT_AN_OBJECT))
        }
    }
    const NOT_AN_OBJECT: &str = "not an object";

    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = de
        .deserialize_any(HeaderVisitor)
        .and_then(|h| de.end().map(|()| h));
    match parsed {
        Ok(h) => {
            if json_depth(bytes) > MAX_CLAIMS_DEPTH {
                return fail(AuthStatus::Malformed, "header nested too deep");
            }
            Ok(h)
        }
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            fail(AuthStatus::Malformed, "header nested too deep")
        }
        Err(_) => fail(AuthStatus::Malformed, "header is not a JSON object"),
    }
}

/// Step 6 for each key to try, in order, until `check` says yes: whether one did.
///
/// With a `kid`: the keys with that `kid`; if none has it, the keys without a
/// `kid` (PEM keys and secrets name no key, so they serve any `kid`); none ->
/// `UnknownKey`. Of those, the ones that allow `alg`; none -> `BadSignature`.
/// Without a `kid`: every key that allows `alg`; none -> `UnknownKey`.
fn for_each_candidate(
    keys: &KeySet,
    kid: &KidHeader,
    alg: Algorithm,
    mut check: impl FnMut(&Key) -> bool,
) -> Result<bool, AuthError> {
    let kid = match kid {
        KidHeader::Missing => None,
        KidHeader::Named(k) => Some(k.as_str()),
        KidHeader::NotString => return fail(AuthStatus::Malformed, "kid header is not a string"),
    };
    let Some(kid) = kid else {
        let mut any = false;
        for k in keys.keys.iter().filter(|k| k.allows(alg)) {
            any = true;
            if check(k) {
                return Ok(true);
            }
        }
        if !any {
            return fail(
                AuthStatus::UnknownKey,
                format!("no key for algorithm {}", algorithm_name(alg)),
            );
        }
        return Ok(false);
    };
    let named = keys.keys.iter().any(|k| k.kid.as_deref() == Some(kid));
    let pick = |k: &&Key| {
        if named {
            k.kid.as_deref() == Some(kid)
        } else {
            k.kid.is_none()
        }
    };
    if !keys.keys.iter().any(|k| pick(&k)) {
        return fail(
            AuthStatus::UnknownKey,
            format!("unknown key {}", sanitize(kid)),
        );
    }
    let mut any = false;
    for k in keys.keys.iter().filter(pick).filter(|k| k.allows(alg)) {
        any = true;
        if check(k) {
            return Ok(true);
        }
    }
    if !any {
        return fail(AuthStatus::BadSignature, "key type does not fit algorithm");
    }
    Ok(false)
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
    // serde_json itself refuses nesting beyond 128 levels.
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => {
            if json_depth(bytes) > MAX_CLAIMS_DEPTH {
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

/// The deepest nesting of objects and arrays in valid JSON text (the top-level object is
/// level 1): brackets outside strings, counted in one pass, nothing allocated.
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Object/array levels in a value (a scalar is 0), without recursion.
#[cfg(test)]
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

    #[test]
    fn cache_key_reads_the_signature_end_and_the_length() {
        let sig = "s".repeat(60) + &"t".repeat(KEY_TAIL);
        let a = format!("hdr.payload-one.{sig}");
        let b = format!("hdr.payload-two.{sig}");
        let key = |t: &str| Hashed::new(t.as_bytes()).cache_key().unwrap();
        // the same length and signature end: one key (the entry's full compare tells them apart)
        assert_eq!(key(&a), key(&b));
        // another length, or another last byte: another input
        assert_ne!(key(&a), key(&format!("hdr.payload-three.{sig}")));
        let mut c = a.clone();
        c.pop();
        c.push('u');
        assert_ne!(key(&a), key(&c));
    }

    #[test]
    fn cache_key_hashes_a_short_signature_with_the_whole_token() {
        // Cloud Run's stripped signature is the same for every caller: such tokens must not
        // all share one cache entry
        let a = b"hdr.payload-one.SIGNATURE_REMOVED_BY_GOOGLE";
        let b = b"hdr.payload-two.SIGNATURE_REMOVED_BY_GOOGLE";
        assert_eq!(cache_key_input(a, Some(16)), (a.len(), &a[..]));
        assert_ne!(
            Hashed::new(a).cache_key().unwrap(),
            Hashed::new(b).cache_key().unwrap()
        );
        assert_eq!(cache_key_input(b"no-dot", None), (6, &b"no-dot"[..]));
    }
}
