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

/// A request's credential headers, read in one pass over its headers ([`credentials`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// The value of the first `Authorization` header (name in any case).
    pub authorization: Option<&'a [u8]>,
    /// The value of the first `X-Serverless-Authorization` header (name in any case).
    pub serverless: Option<&'a [u8]>,
    /// The first credential header (of [`CREDENTIAL_HEADERS`]) present more than once, as an
    /// upstream may read names ([`same_header`]: `_` for `-` too). Two credentials are
    /// refused, never resolved: which one an upstream reads is not ours to guess.
    pub repeated: Option<&'static str>,
}

/// The credential headers among `headers` (name, value): one pass, a length compare for
/// every other header. Stops at the first repeated credential header.
pub fn credentials<'a>(headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Credentials<'a> {
    let mut found = Credentials::default();
    let mut seen = [false; CREDENTIAL_HEADERS.len()];
    for (name, value) in headers {
        let Some(i) = CREDENTIAL_HEADERS
            .iter()
            .position(|w| w.len() == name.len())
        else {
            continue;
        };
        let wanted = CREDENTIAL_HEADERS[i];
        if !same_header(name, wanted) {
            continue;
        }
        if seen[i] {
            found.repeated = Some(wanted);
            break;
        }
        seen[i] = true;
        if name.eq_ignore_ascii_case(wanted.as_bytes()) {
            let slot = if i == 0 {
                &mut found.authorization
            } else {
                &mut found.serverless
            };
            *slot = Some(value);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_one_pass() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            credentials(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
        };
        let c = h(&[
            ("Host", "a"),
            ("authorization", "Bearer x"),
            ("X-SERVERLESS-AUTHORIZATION", "Bearer y"),
        ]);
        assert_eq!(c.authorization, Some(&b"Bearer x"[..]));
        assert_eq!(c.serverless, Some(&b"Bearer y"[..]));
        assert_eq!(c.repeated, None);
        // Underscores: a repeat as an upstream reads it, but never the token itself.
        let c = h(&[("X_Serverless_Authorization", "Bearer y")]);
        assert_eq!((c.serverless, c.repeated), (None, None));
        let c = h(&[
            ("Authorization", "a"),
            ("Host", "h"),
            ("authorization", "b"),
        ]);
        assert_eq!(c.repeated, Some("Authorization"));
        let c = h(&[
            ("x-serverless_authorization", "a"),
            ("X-Serverless-Authorization", "b"),
        ]);
        assert_eq!(c.repeated, Some("X-Serverless-Authorization"));
        // Same length, other name.
        let c = h(&[("Authorizatioq", "a"), ("Authorizatioq", "b")]);
        assert_eq!(c, Credentials::default());
    }

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
        let found =
            |v: &[&'static str]| credentials(names(v).into_iter().map(|n| (n, &b""[..]))).repeated;
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
