//! Getting the token out of a request header value (RFC 6750 2.1,
//! RFC 7235 2.1).

/// The result of parsing an `Authorization`-style header value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bearer<'a> {
    /// `Bearer TOKEN`: the token (surrounding whitespace removed).
    Token(&'a [u8]),
    /// `Bearer` with no token.
    Empty,
    /// Another scheme (`Basic ...`), or no scheme at all.
    OtherScheme,
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ws(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if !is_ws(*first) {
            break;
        }
        v = rest;
    }
    while let [rest @ .., last] = v {
        if !is_ws(*last) {
            break;
        }
        v = rest;
    }
    v
}

/// Parse an `Authorization`-style value: the scheme `Bearer`, compared
/// case-insensitively (RFC 7235 2.1), then one or more SP/HTAB, then the
/// token; trailing whitespace is dropped.
pub fn bearer(value: &[u8]) -> Bearer<'_> {
    let value = trim_ws(value);
    let scheme_end = value.iter().position(|&b| is_ws(b)).unwrap_or(value.len());
    let (scheme, rest) = value.split_at(scheme_end);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Bearer::OtherScheme;
    }
    match trim_ws(rest) {
        [] => Bearer::Empty,
        token => Bearer::Token(token),
    }
}

/// For `mesh_token` values: drop surrounding whitespace and an optional
/// leading `Bearer` scheme (case-insensitive) followed by SP/HTAB.
pub fn strip_bearer(value: &[u8]) -> &[u8] {
    let value = trim_ws(value);
    if value.len() >= 6 && value[..6].eq_ignore_ascii_case(b"bearer") {
        match &value[6..] {
            [] => return &[],
            [b, ..] if is_ws(*b) => return trim_ws(&value[6..]),
            _ => {}
        }
    }
    value
}

/// The request headers that carry credentials: HTTP's own and the one Cloud Run uses when
/// `Authorization` holds the app's credentials.
pub const CREDENTIAL_HEADERS: [&str; 2] = ["Authorization", "X-Serverless-Authorization"];

/// Whether a header name is `wanted`, as an upstream may read it: any case, `_` for `-`
/// (CGI-style gateways fold both to the same variable).
fn same_header(name: &[u8], wanted: &str) -> bool {
    name.len() == wanted.len()
        && name.iter().zip(wanted.bytes()).all(|(&a, b)| {
            let a = if a == b'_' { b'-' } else { a };
            a.eq_ignore_ascii_case(&b)
        })
}

/// The first credential header (of [`CREDENTIAL_HEADERS`]) that `names` holds more than once.
/// Two credentials are refused, never resolved: which one an upstream reads is not ours to
/// guess.
pub fn repeated_credential<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> Option<&'static str> {
    let mut seen = [false; CREDENTIAL_HEADERS.len()];
    for name in names {
        for (i, wanted) in CREDENTIAL_HEADERS.iter().enumerate() {
            if same_header(name, wanted) {
                if seen[i] {
                    return Some(wanted);
                }
                seen[i] = true;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(b"Bearer abc"), Bearer::Token(b"abc"));
        assert_eq!(bearer(b"bearer abc"), Bearer::Token(b"abc"));
        assert_eq!(bearer(b"BEARER\t\tabc \t"), Bearer::Token(b"abc"));
        assert_eq!(bearer(b"  Bearer  a.b.c  "), Bearer::Token(b"a.b.c"));
        assert_eq!(bearer(b"Bearer"), Bearer::Empty);
        assert_eq!(bearer(b"Bearer \t "), Bearer::Empty);
        assert_eq!(bearer(b"Basic x"), Bearer::OtherScheme);
        assert_eq!(bearer(b"Bearerabc"), Bearer::OtherScheme);
        assert_eq!(bearer(b""), Bearer::OtherScheme);
        assert_eq!(bearer(b"   "), Bearer::OtherScheme);
    }

    #[test]
    fn repeated_credentials() {
        let names = |v: &[&'static str]| v.iter().map(|n| n.as_bytes()).collect::<Vec<_>>();
        let found = |v: &[&'static str]| repeated_credential(names(v));
        assert_eq!(
            found(&["Authorization", "X-Serverless-Authorization"]),
            None
        );
        assert_eq!(found(&["Host", "Authorization", "Accept"]), None);
        assert_eq!(
            found(&["Authorization", "authorization"]),
            Some("Authorization")
        );
        assert_eq!(
            found(&[
                "x-serverless-authorization",
                "Host",
                "X_SERVERLESS_AUTHORIZATION"
            ]),
            Some("X-Serverless-Authorization")
        );
        assert_eq!(
            found(&["X-Serverless-Authorizatio", "X-Serverless-Authorization"]),
            None
        );
        assert_eq!(found(&["Authorization_", "Authorization"]), None);
    }

    #[test]
    fn strip() {
        assert_eq!(strip_bearer(b"abc"), b"abc");
        assert_eq!(strip_bearer(b"  abc \t"), b"abc");
        assert_eq!(strip_bearer(b"Bearer abc"), b"abc");
        assert_eq!(strip_bearer(b"bEaReR\tabc "), b"abc");
        assert_eq!(strip_bearer(b"Bearer"), b"");
        assert_eq!(strip_bearer(b"Bearerabc"), b"Bearerabc");
        assert_eq!(strip_bearer(b""), b"");
    }
}
