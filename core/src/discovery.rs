//! OpenID Connect discovery (OpenID Connect Discovery 1.0, section 4): a provider that knows its
//! issuer finds its keys at the `jwks_uri` of `ISSUER/.well-known/openid-configuration`.
//!
//! The rules, without the network: where the document is, and what in it is trusted. The
//! document must name the configured issuer exactly (section 4.3: otherwise another issuer's
//! keys could be taken for this one's), and its `jwks_uri` is an `https://` URL (`http://`
//! only when the issuer itself is `http://`).

use serde_json::Value;

/// The path of the discovery document below the issuer.
pub const WELL_KNOWN: &str = "/.well-known/openid-configuration";
/// How long a process uses a discovery document's `jwks_uri` before reading the document
/// again (also read again after a failed key fetch); the keys themselves follow their own
/// `Cache-Control`.
pub const DOCUMENT_MAX_AGE_SECS: u64 = 24 * 3600;

/// The discovery document's URL for `issuer`: an `https://` (or `http://`) URL without query
/// or fragment; one trailing `/` is dropped before the well-known path is added (section 4.1).
pub fn document_url(issuer: &str) -> Result<String, String> {
    let rest = issuer
        .strip_prefix("https://")
        .or_else(|| issuer.strip_prefix("http://"));
    let ok = rest.is_some_and(|r| {
        !r.is_empty()
            && !r.starts_with('/')
            && !r.contains(['?', '#'])
            && !r
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    });
    if !ok {
        return Err(format!(
            "discovery needs an issuer that is an https:// URL without query or fragment, not \"{}\"",
            quote(issuer)
        ));
    }
    Ok(format!(
        "{}{WELL_KNOWN}",
        issuer.strip_suffix('/').unwrap_or(issuer)
    ))
}

/// The `jwks_uri` of a discovery document fetched from `document_url`, once the document is
/// a JSON object whose `issuer` is `issuer` exactly.
pub fn jwks_uri(document: &[u8], issuer: &str, document_url: &str) -> Result<String, String> {
    let doc: serde_json::Map<String, Value> = serde_json::from_slice(document)
        .map_err(|e| format!("the discovery document is not a JSON object ({e})"))?;
    match doc.get("issuer") {
        Some(Value::String(s)) if s == issuer => {}
        Some(Value::String(s)) => {
            return Err(format!(
                "the discovery document names issuer \"{}\", not \"{}\": refused",
                quote(s),
                quote(issuer)
            ))
        }
        _ => return Err("the discovery document has no \"issuer\"".into()),
    }
    let uri = match doc.get("jwks_uri") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err("the discovery document has no \"jwks_uri\"".into()),
    };
    let plain_ok = document_url.starts_with("http://");
    let scheme_ok = uri.starts_with("https://") || (plain_ok && uri.starts_with("http://"));
    let rest = uri.split_once("://").map_or("", |(_, r)| r);
    if !scheme_ok
        || rest.is_empty()
        || rest.starts_with('/')
        || uri
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!(
            "the discovery document's \"jwks_uri\" \"{}\" is not an https:// URL",
            quote(uri)
        ));
    }
    Ok(uri.to_string())
}

/// Remote or configured text, safe and short enough for a log line (printable ASCII, no
/// quotes, at most 64 characters).
fn quote(s: &str) -> String {
    crate::status::sanitize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_urls() {
        assert_eq!(
            document_url("https://token.actions.githubusercontent.com").unwrap(),
            "https://token.actions.githubusercontent.com/.well-known/openid-configuration"
        );
        assert_eq!(
            document_url("https://dev-1.okta.com/oauth2/default/").unwrap(),
            "https://dev-1.okta.com/oauth2/default/.well-known/openid-configuration"
        );
        assert!(document_url("http://127.0.0.1:8080").is_ok());
        for bad in [
            "accounts.google.com",
            "https://",
            "https:///x",
            "https://a?b",
            "https://a#b",
            "https://a b",
            "ftp://a",
        ] {
            assert!(document_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwks_uri_needs_the_configured_issuer() {
        let iss = "https://idp.example";
        let doc = |v: Value| v.to_string().into_bytes();
        let url = "https://idp.example/.well-known/openid-configuration";
        let good = doc(serde_json::json!({"issuer": iss, "jwks_uri": "https://keys.example/jwks"}));
        assert_eq!(
            jwks_uri(&good, iss, url).unwrap(),
            "https://keys.example/jwks"
        );
        let other = doc(
            serde_json::json!({"issuer": "https://evil.example", "jwks_uri": "https://evil.example/k"}),
        );
        let e = jwks_uri(&other, iss, url).unwrap_err();
        assert!(
            e.contains("\"https://evil.example\"") && e.contains("refused"),
            "{e}"
        );
        // exact: no trailing-slash or case forgiveness for issuers
        for i in ["https://idp.example/", "https://IDP.example"] {
            let d = doc(serde_json::json!({"issuer": i, "jwks_uri": "https://idp.example/k"}));
            assert!(jwks_uri(&d, iss, url).is_err(), "{i}");
        }
        for bad in [
            serde_json::json!({"jwks_uri": "https://idp.example/k"}),
            serde_json::json!({"issuer": iss}),
            serde_json::json!({"issuer": iss, "jwks_uri": 7}),
            serde_json::json!({"issuer": iss, "jwks_uri": "http://idp.example/k"}),
            serde_json::json!({"issuer": iss, "jwks_uri": "https:///k"}),
            serde_json::json!({"issuer": iss, "jwks_uri": "file:///etc/passwd"}),
            serde_json::json!([iss]),
        ] {
            assert!(jwks_uri(&doc(bad.clone()), iss, url).is_err(), "{bad}");
        }
        // an http:// issuer (a loopback test IdP) may name an http:// jwks_uri
        let plain = doc(
            serde_json::json!({"issuer": "http://127.0.0.1:9", "jwks_uri": "http://127.0.0.1:9/k"}),
        );
        assert!(jwks_uri(
            &plain,
            "http://127.0.0.1:9",
            "http://127.0.0.1:9/.well-known/openid-configuration"
        )
        .is_ok());
        // the quoted issuer is sanitized and bounded
        let long = doc(
            serde_json::json!({"issuer": format!("x\n{}", "y".repeat(5000)), "jwks_uri": "https://a/k"}),
        );
        let e = jwks_uri(&long, iss, url).unwrap_err();
        assert!(!e.contains('\n') && e.len() < 300, "{e}");
    }
}
