//! The outcome of token verification, as exposed in `$mesh_auth_status`.

use std::fmt;

/// Why a request is (or is not) authenticated. `as_str` gives the value of
/// `$mesh_auth_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthStatus {
    /// `mesh_auth off` in this scope.
    Off,
    /// No token where one is required.
    Missing,
    /// The token is not a well-formed JWS compact serialization / JWT.
    Malformed,
    /// Algorithm not allowed, key type mismatch, or the signature does not verify.
    BadSignature,
    /// No key with the token's `kid` (or no key for its algorithm).
    UnknownKey,
    /// `exp` is in the past (beyond the leeway).
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    NotYetValid,
    /// `iss` is missing or not accepted by any candidate provider.
    WrongIssuer,
    /// `aud` does not contain an accepted audience.
    WrongAudience,
    /// A `require` claim or the principal claim does not hold.
    ClaimMismatch,
    /// The chosen provider has no keys (yet): 503, not 401.
    NoKeys,
    /// The token is valid.
    Verified,
}

impl AuthStatus {
    /// The value of `$mesh_auth_status`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthStatus::Off => "off",
            AuthStatus::Missing => "missing",
            AuthStatus::Malformed => "malformed",
            AuthStatus::BadSignature => "bad_signature",
            AuthStatus::UnknownKey => "unknown_key",
            AuthStatus::Expired => "expired",
            AuthStatus::NotYetValid => "not_yet_valid",
            AuthStatus::WrongIssuer => "wrong_issuer",
            AuthStatus::WrongAudience => "wrong_audience",
            AuthStatus::ClaimMismatch => "claim_mismatch",
            AuthStatus::NoKeys => "no_keys",
            AuthStatus::Verified => "verified",
        }
    }
}

impl fmt::Display for AuthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verification failure.
///
/// `reason` is short human text, safe for `error_description` in
/// `WWW-Authenticate` and for logs: it never contains the token, the signature,
/// secrets or claim values (only names such as an issuer, a `kid`, an algorithm
/// or a claim path, all passed through [`sanitize`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthError {
    pub status: AuthStatus,
    pub reason: String,
}

/// Longest reason kept (after sanitizing).
const MAX_REASON_LEN: usize = 160;

impl AuthError {
    /// An error; `reason` is sanitized (printable ASCII without `"` and `\`),
    /// so it can go into a quoted-string header parameter as is.
    pub fn new(status: AuthStatus, reason: impl AsRef<str>) -> AuthError {
        AuthError {
            status,
            reason: sanitize_max(reason.as_ref(), MAX_REASON_LEN),
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.as_str(), self.reason)
    }
}

impl std::error::Error for AuthError {}

/// Make an untrusted name (issuer, `kid`, `alg`, claim path) safe to embed in a
/// reason: keep printable ASCII except `"` and `\`, at most 64 characters.
pub fn sanitize(s: &str) -> String {
    sanitize_max(s, 64)
}

fn sanitize_max(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| matches!(c, ' '..='~') && *c != '"' && *c != '\\')
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(AuthStatus::BadSignature.as_str(), "bad_signature");
        assert_eq!(AuthStatus::NotYetValid.as_str(), "not_yet_valid");
        assert_eq!(AuthStatus::NoKeys.to_string(), "no_keys");
    }

    #[test]
    fn sanitizes() {
        assert_eq!(sanitize("a\"b\\c\r\nd\u{e9}"), "abcd");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
        let e = AuthError::new(AuthStatus::Malformed, "bad \"x\"\n");
        assert_eq!(e.reason, "bad x");
    }
}
