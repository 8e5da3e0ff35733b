//! Token verification against real signatures: every algorithm, and every
//! status of the mapping in `token::verify`.

mod common;

use std::sync::Arc;

use common::*;
use jsonwebtoken::EncodingKey;
use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::status::{AuthError, AuthStatus};
use mesh_core::token::{
    check_audience, deciding_provider, verify, verify_platform, Hashed, Provider, Verified,
    MAX_TOKEN_LEN,
};
use serde_json::{json, Value};

fn run(token: &str, p: &Provider) -> Result<Verified, AuthError> {
    verify(token.as_bytes(), &[p], NOW)
}

fn status(token: &str, p: &Provider) -> AuthStatus {
    match run(token, p) {
        Ok(_) => AuthStatus::Verified,
        Err(e) => e.status,
    }
}

fn jwks_token(claims: &Value) -> String {
    sign(
        &header("RS256", Some("rsa1")),
        claims,
        &rsa(),
        Algorithm::RS256,
    )
}

// ------------------------------------------------------------ accepted

#[test]
fn every_algorithm_is_accepted() {
    let jwks = jwks_provider();
    let pem = pem_provider();
    let hm = hmac_provider();
    let cases: Vec<(&str, Algorithm, EncodingKey, Option<&str>, &Provider)> = vec![
        ("RS256", Algorithm::RS256, rsa(), Some("rsa1"), &jwks),
        ("RS384", Algorithm::RS384, rsa(), Some("rsa1"), &jwks),
        ("RS512", Algorithm::RS512, rsa(), Some("rsa1"), &jwks),
        ("PS256", Algorithm::PS256, rsa(), Some("rsa1"), &jwks),
        ("PS384", Algorithm::PS384, rsa(), Some("rsa1"), &jwks),
        ("PS512", Algorithm::PS512, rsa(), Some("rsa1"), &jwks),
        ("ES256", Algorithm::ES256, ec256(), Some("ec256"), &jwks),
        ("ES384", Algorithm::ES384, ec384(), Some("ec384"), &jwks),
        ("EdDSA", Algorithm::EdDSA, ed(), Some("ed1"), &jwks),
        // Without kid: every key that fits the algorithm is tried.
        ("RS256", Algorithm::RS256, rsa(), None, &jwks),
        ("ES384", Algorithm::ES384, ec384(), None, &jwks),
        ("RS256", Algorithm::RS256, rsa(), None, &pem),
        ("PS384", Algorithm::PS384, rsa(), None, &pem),
        ("ES256", Algorithm::ES256, ec256(), None, &pem),
        ("ES384", Algorithm::ES384, ec384(), None, &pem),
        ("EdDSA", Algorithm::EdDSA, ed(), None, &pem),
        ("HS256", Algorithm::HS256, hmac(), None, &hm),
        ("HS384", Algorithm::HS384, hmac(), None, &hm),
        ("HS512", Algorithm::HS512, hmac(), None, &hm),
    ];
    for (name, alg, key, kid, p) in cases {
        let iss = p.issuers[0].as_str();
        let t = sign(&header(name, kid), &claims(iss), &key, alg);
        let v = run(&t, p).unwrap_or_else(|e| panic!("{name} {kid:?} {}: {e}", p.name));
        assert_eq!(v.provider, p.name);
        assert_eq!(v.principal, "svc@example.com");
        assert_eq!(v.exp, NOW + 600);
        assert_eq!(v.audiences, vec!["orders".to_string()]);
    }
}

#[test]
fn verified_fields() {
    let p = jwks_provider();
    let c = json!({
        "iss": JWKS_ISS, "sub": "a@b", "exp": NOW + 1,
        "aud": ["x", "y", 3], "n": 1.5, "ok": true, "list": ["a", 2, {"k": "v"}],
        "obj": {"k": "v"}, "nul": null,
        "crlf": "a\r\nX-Injected: 1", "tab": "a\tb", "del": "a\u{7f}", "arr_lf": ["a", "b\nc"],
        "objlf": {"k": "a\nb"}, "orgId": "o-1", "Dup": 1, "dUP": 2,
    });
    let payload = serde_json::to_vec(&c).unwrap();
    let t = sign_raw(
        br#"{"alg":"RS256","kid":"rsa1"}"#,
        &payload,
        &rsa(),
        Algorithm::RS256,
    );
    let v = run(&t, &p).unwrap();
    assert_eq!(v.claims_json.as_bytes(), &payload[..]);
    assert_eq!(v.audiences, vec!["x".to_string(), "y".to_string()]);
    assert_eq!(v.claim_text("sub").as_deref(), Some("a@b"));
    assert_eq!(v.claim_text("n").as_deref(), Some("1.5"));
    assert_eq!(v.claim_text("ok").as_deref(), Some("true"));
    assert_eq!(v.claim_text("list").as_deref(), Some(r#"a,2,{"k":"v"}"#));
    assert_eq!(v.claim_text("obj").as_deref(), Some(r#"{"k":"v"}"#));
    assert_eq!(v.claim_text("nul"), None);
    assert_eq!(v.claim_text("missing"), None);
    // No control character ever comes out (the variable is then not found) ...
    for name in ["crlf", "tab", "del", "arr_lf"] {
        assert_eq!(v.claim_text(name), None, "{name}");
    }
    // ... while JSON text escapes them.
    assert_eq!(v.claim_text("objlf").as_deref(), Some(r#"{"k":"a\nb"}"#));
    // nginx lower-cases variable names: a mixed-case claim is found ignoring case, unless
    // that is ambiguous.
    assert_eq!(v.claim_text("orgid").as_deref(), Some("o-1"));
    assert_eq!(v.claim_text("orgId").as_deref(), Some("o-1"));
    assert_eq!(v.claim_text("dup"), None);
    assert_eq!(v.claim_text("Dup").as_deref(), Some("1"));
}

#[test]
fn ignored_key_url_headers() {
    // RFC 8725 3.10: jku/x5u/jwk/x5c are never used; the token still verifies
    // with the configured key.
    let p = jwks_provider();
    let h = json!({
        "alg": "RS256", "kid": "rsa1",
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
        "jwk": {"kty": "oct", "k": "AAAA"},
        "x5c": ["MIIB"],
    });
    let t = sign(&h, &claims(JWKS_ISS), &rsa(), Algorithm::RS256);
    assert!(run(&t, &p).is_ok());
    // ... and a token signed by the embedded key's owner is not accepted.
    let t = sign(&h, &claims(JWKS_ISS), &rsa2(), Algorithm::RS256);
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
}

#[test]
fn provider_chosen_by_issuer() {
    let a = jwks_provider();
    let b = pem_provider();
    let t = sign(
        &header("ES256", None),
        &claims(PEM_ISS),
        &ec256(),
        Algorithm::ES256,
    );
    assert_eq!(
        verify(t.as_bytes(), &[&a, &b], NOW).unwrap().provider,
        "pem"
    );
    // Two providers with the same issuer: the first in list order decides.
    let b2 = provider("other", JWKS_ISS, KeySet::from_pem(RSA2_PUB).unwrap());
    let t = jwks_token(&claims(JWKS_ISS));
    let e = verify(t.as_bytes(), &[&b2, &a], NOW).unwrap_err();
    assert_eq!(e.status, AuthStatus::BadSignature);
    let v = verify(t.as_bytes(), &[&a, &b2], NOW).unwrap();
    assert_eq!(v.provider, "jwks");
    // The same rule names the provider a cached answer must come from.
    let iss = v.issuer().unwrap();
    assert_eq!(deciding_provider(&[&b2, &a], iss).unwrap().name, "other");
    assert_eq!(deciding_provider(&[&a, &b2], iss).unwrap().name, "jwks");
    assert!(deciding_provider(&[&b], iss).is_none());
}

#[test]
fn signature_removed_without_decoding() {
    let removed = format!("{}.{}.SIGNATURE_REMOVED_BY_GOOGLE", b64(b"{}"), b64(b"{}"));
    assert!(Hashed::new(removed.as_bytes()).is_signature_removed());
    let t = jwks_token(&claims(JWKS_ISS));
    assert!(!Hashed::new(t.as_bytes()).is_signature_removed());
    assert!(!Hashed::new(b"SIGNATURE_REMOVED_BY_GOOGLE").is_signature_removed());
    assert!(!Hashed::new(b"a.b.SIGNATURE_REMOVED_BY_GOOGLEX").is_signature_removed());
}

#[test]
fn kid_with_pem_keys() {
    // PEM keys name no kid, so they serve tokens with any kid.
    let p = pem_provider();
    let t = sign(
        &header("RS256", Some("2024-01")),
        &claims(PEM_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    assert!(run(&t, &p).is_ok());
    let h = provider("hmac", HMAC_ISS, KeySet::from_secret(SECRET));
    let t = sign(
        &header("HS256", Some("k1")),
        &claims(HMAC_ISS),
        &hmac(),
        Algorithm::HS256,
    );
    assert!(run(&t, &h).is_ok());
}

// ------------------------------------------------------------ malformed

#[test]
fn too_large() {
    let p = jwks_provider();
    let t = "a".repeat(17 * 1024);
    let e = run(&t, &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::Malformed);
    assert_eq!(e.reason, "token too large");
    // A signed token just under the limit is read and verified.
    let mut c = claims(JWKS_ISS);
    let base = jwks_token(&c).len();
    let mut pad = (MAX_TOKEN_LEN - base) * 3 / 4 - 32;
    loop {
        c["pad"] = json!("x".repeat(pad + 1));
        if jwks_token(&c).len() > MAX_TOKEN_LEN {
            break;
        }
        pad += 1;
    }
    c["pad"] = json!("x".repeat(pad));
    let t = jwks_token(&c);
    assert!(t.len() <= MAX_TOKEN_LEN && t.len() > MAX_TOKEN_LEN - 4);
    assert!(run(&t, &p).is_ok());
    c["pad"] = json!("x".repeat(pad + 1));
    let t = jwks_token(&c);
    assert!(t.len() > MAX_TOKEN_LEN);
    assert_eq!(run(&t, &p).unwrap_err().reason, "token too large");
}

#[test]
fn segments() {
    let p = jwks_provider();
    let t = jwks_token(&claims(JWKS_ISS));
    let parts: Vec<&str> = t.split('.').collect();
    let two = format!("{}.{}", parts[0], parts[1]);
    let five = format!("{t}.{}.{}", parts[1], parts[2]);
    let four = format!("{t}.");
    for bad in [
        two.as_str(),
        five.as_str(),
        four.as_str(),
        "",
        ".",
        "..",
        "abc",
    ] {
        assert_eq!(status(bad, &p), AuthStatus::Malformed, "{bad}");
    }
}

#[test]
fn bad_base64() {
    let p = jwks_provider();
    let t = jwks_token(&claims(JWKS_ISS));
    let parts: Vec<&str> = t.split('.').collect();
    let variants = [
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        format!("{}.{}+.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}/", parts[0], parts[1], parts[2]),
        format!("{}.{}*.{}", parts[0], parts[1], parts[2]),
        format!("{} .{}.{}", parts[0], parts[1], parts[2]),
        // length 1 mod 4 is never valid
        format!(
            "{}.{}.{}A",
            parts[0],
            parts[1],
            &parts[2][..parts[2].len() - 2]
        ),
        // standard-alphabet re-encoding of the signature
        format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            parts[2].replace('-', "+").replace('_', "/")
        ),
    ];
    for t2 in &variants {
        if t2 == &t {
            continue;
        }
        let e = run(t2, &p).unwrap_err();
        assert_eq!(e.status, AuthStatus::Malformed, "{t2}");
    }
}

#[test]
fn header_and_payload_must_be_json_objects() {
    let p = jwks_provider();
    let payload = serde_json::to_vec(&claims(JWKS_ISS)).unwrap();
    let hdr = br#"{"alg":"RS256","kid":"rsa1"}"#;
    for (h, c) in [
        (&b"[1]"[..], &payload[..]),
        (&b"not json"[..], &payload[..]),
        (&b""[..], &payload[..]),
        (&b"{\"alg\":\"RS256\"} trailing"[..], &payload[..]),
        (&hdr[..], &b"\"string\""[..]),
        (&hdr[..], &b"123"[..]),
        (&hdr[..], &b"{\"iss\":"[..]),
        (&hdr[..], &b"\xff\xfe{}"[..]),
    ] {
        let t = sign_raw(h, c, &rsa(), Algorithm::RS256);
        assert_eq!(status(&t, &p), AuthStatus::Malformed);
    }
}

#[test]
fn invalid_utf8_payload() {
    let p = jwks_provider();
    let mut payload = serde_json::to_vec(&claims(JWKS_ISS)).unwrap();
    // {"iss":..., "sub":"svc@example.com"...} -> put a lone 0xff inside sub
    let at = payload.windows(3).position(|w| w == b"svc").unwrap();
    payload[at] = 0xff;
    let t = sign_raw(
        br#"{"alg":"RS256","kid":"rsa1"}"#,
        &payload,
        &rsa(),
        Algorithm::RS256,
    );
    let e = run(&t, &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::Malformed);
    assert_eq!(e.reason, "payload is not UTF-8");
}

#[test]
fn claims_nested_too_deep() {
    let p = jwks_provider();
    for (levels, want) in [
        (100, AuthStatus::Malformed),
        (200, AuthStatus::Malformed),
        (32, AuthStatus::Malformed), // 32 + the top object = 33
        (31, AuthStatus::Verified),  // 31 + the top object = 32
    ] {
        let mut v = json!("leaf");
        for i in 0..levels {
            v = if i % 2 == 0 {
                json!([v])
            } else {
                json!({ "k": v })
            };
        }
        let mut c = claims(JWKS_ISS);
        c["deep"] = v;
        assert_eq!(status(&jwks_token(&c), &p), want, "{levels}");
    }
}

#[test]
fn crit_is_refused() {
    let p = jwks_provider();
    for crit in [json!(["exp"]), json!([]), json!("b64"), json!(null)] {
        let h = json!({"alg": "RS256", "kid": "rsa1", "crit": crit, "exp": 1});
        let t = sign(&h, &claims(JWKS_ISS), &rsa(), Algorithm::RS256);
        let e = run(&t, &p).unwrap_err();
        assert_eq!(e.status, AuthStatus::Malformed);
        assert_eq!(e.reason, "unsupported crit header");
    }
}

#[test]
fn kid_not_a_string() {
    let p = jwks_provider();
    let h = json!({"alg": "RS256", "kid": 1});
    let t = sign(&h, &claims(JWKS_ISS), &rsa(), Algorithm::RS256);
    assert_eq!(status(&t, &p), AuthStatus::Malformed);
}

// ------------------------------------------------------------ algorithms

#[test]
fn alg_none_and_unknown() {
    let p = jwks_provider();
    let payload = b64(&serde_json::to_vec(&claims(JWKS_ISS)).unwrap());
    for h in [
        json!({"alg": "none"}),
        json!({"alg": "None"}),
        json!({"alg": "NONE"}),
        json!({"alg": "ES512"}),
        json!({"alg": "rs256"}),
        json!({"alg": 256}),
        json!({"typ": "JWT"}),
    ] {
        let hb = b64(&serde_json::to_vec(&h).unwrap());
        for sig in ["", "AAAA"] {
            let t = format!("{hb}.{payload}.{sig}");
            assert_eq!(status(&t, &p), AuthStatus::BadSignature, "{h} {sig:?}");
        }
    }
    let t = format!("{}.{payload}.", b64(br#"{"alg":"none"}"#));
    assert_eq!(
        run(&t, &p).unwrap_err().reason,
        "algorithm none not allowed"
    );
}

#[test]
fn alg_not_on_allowlist() {
    let mut p = jwks_provider();
    p.algorithms = vec![Algorithm::RS256];
    let t = sign(
        &header("PS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::PS256,
    );
    let e = run(&t, &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::BadSignature);
    assert_eq!(e.reason, "algorithm PS256 not allowed");
    let t = sign(
        &header("ES256", Some("ec256")),
        &claims(JWKS_ISS),
        &ec256(),
        Algorithm::ES256,
    );
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
}

#[test]
fn hs256_with_public_key_as_secret() {
    // The classic algorithm confusion attack (RFC 8725 2.1): HMAC keyed with
    // the public key's PEM bytes.
    for p in [jwks_provider(), pem_provider()] {
        let iss = p.issuers[0].clone();
        for pem in [RSA_PUB, RSA_CRT] {
            let key = EncodingKey::from_secret(pem);
            for kid in [None, Some("rsa1")] {
                let t = sign(&header("HS256", kid), &claims(&iss), &key, Algorithm::HS256);
                assert_eq!(status(&t, &p), AuthStatus::BadSignature);
            }
        }
    }
    // Even when the allowlist wrongly includes HS256, a public key is never
    // used as an HMAC secret.
    let mut p = jwks_provider();
    p.algorithms.push(Algorithm::HS256);
    let key = EncodingKey::from_secret(RSA_PUB);
    let t = sign(
        &header("HS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &key,
        Algorithm::HS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
    let t = sign(
        &header("HS256", None),
        &claims(JWKS_ISS),
        &key,
        Algorithm::HS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::UnknownKey);
    // ... and an HMAC provider does not take RS256.
    let mut h = hmac_provider();
    h.algorithms.push(Algorithm::RS256);
    let t = sign(
        &header("RS256", None),
        &claims(HMAC_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    assert_eq!(status(&t, &h), AuthStatus::UnknownKey);
}

#[test]
fn es256_header_with_rsa_kid() {
    let p = jwks_provider();
    let t = sign(
        &header("ES256", Some("rsa1")),
        &claims(JWKS_ISS),
        &ec256(),
        Algorithm::ES256,
    );
    let e = run(&t, &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::BadSignature);
    assert_eq!(e.reason, "key type does not fit algorithm");
    // ES384 against the P-256 key
    let t = sign(
        &header("ES384", Some("ec256")),
        &claims(JWKS_ISS),
        &ec384(),
        Algorithm::ES384,
    );
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
}

#[test]
fn jwk_alg_restricts_the_key() {
    let mut doc: Value = serde_json::from_slice(JWKS).unwrap();
    doc["keys"][0]["alg"] = json!("RS256");
    let keys = KeySet::from_jwks(&serde_json::to_vec(&doc).unwrap()).unwrap();
    let mut p = provider("jwks", JWKS_ISS, keys);
    assert!(!p.algorithms.contains(&Algorithm::PS256));
    p.algorithms.push(Algorithm::PS256);
    let t = sign(
        &header("PS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::PS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
    let t = sign(
        &header("RS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    assert!(run(&t, &p).is_ok());
}

// ------------------------------------------------------------ keys

#[test]
fn unknown_kid() {
    let p = jwks_provider();
    for kid in ["nope", "../../etc/passwd", "", "enc1", "oct1"] {
        let t = sign(
            &header("RS256", Some(kid)),
            &claims(JWKS_ISS),
            &rsa(),
            Algorithm::RS256,
        );
        let e = run(&t, &p).unwrap_err();
        assert_eq!(e.status, AuthStatus::UnknownKey, "{kid}");
    }
    let t = sign(
        &header("RS256", Some("../../etc/passwd")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    assert_eq!(
        run(&t, &p).unwrap_err().reason,
        "unknown key ../../etc/passwd"
    );
}

#[test]
fn no_key_for_algorithm_without_kid() {
    // Only an EC P-256 key: an RS256 token without kid has no candidate.
    let mut p = provider("ec", PEM_ISS, KeySet::from_pem(EC256_PUB).unwrap());
    p.algorithms.push(Algorithm::RS256);
    let t = sign(
        &header("RS256", None),
        &claims(PEM_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::UnknownKey);
}

#[test]
fn wrong_key_or_tampering() {
    let p = jwks_provider();
    // Signed by another RSA key, claiming rsa1.
    let t = sign(
        &header("RS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa2(),
        Algorithm::RS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
    let t = sign(
        &header("RS256", None),
        &claims(JWKS_ISS),
        &rsa2(),
        Algorithm::RS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
    // The payload swapped after signing.
    let good = jwks_token(&claims(JWKS_ISS));
    let mut c = claims(JWKS_ISS);
    c["sub"] = json!("admin@example.com");
    let evil = jwks_token(&c);
    let g: Vec<&str> = good.split('.').collect();
    let e: Vec<&str> = evil.split('.').collect();
    let t = format!("{}.{}.{}", g[0], e[1], g[2]);
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
    // An empty signature.
    let t = format!("{}.{}.", g[0], g[1]);
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
    // The HMAC provider with another secret.
    let hm = hmac_provider();
    let t = sign(
        &header("HS256", None),
        &claims(HMAC_ISS),
        &EncodingKey::from_secret(b"another secret"),
        Algorithm::HS256,
    );
    assert_eq!(status(&t, &hm), AuthStatus::BadSignature);
}

#[test]
fn no_keys() {
    let p = provider("empty", JWKS_ISS, KeySet::default());
    let mut p = p;
    p.algorithms = vec![Algorithm::RS256];
    let t = jwks_token(&claims(JWKS_ISS));
    let e = run(&t, &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::NoKeys);
    assert_eq!(e.reason, "no keys for provider empty");
}

// ------------------------------------------------------------ issuer

#[test]
fn wrong_issuer() {
    let p = jwks_provider();
    let mut c = claims("https://evil.example");
    assert_eq!(status(&jwks_token(&c), &p), AuthStatus::WrongIssuer);
    c["iss"] = json!(["https://jwks.example"]);
    assert_eq!(status(&jwks_token(&c), &p), AuthStatus::WrongIssuer);
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(status(&jwks_token(&c), &p), AuthStatus::WrongIssuer);
    // Exact match only.
    let c = claims("https://jwks.example/");
    assert_eq!(status(&jwks_token(&c), &p), AuthStatus::WrongIssuer);
    assert_eq!(
        verify(jwks_token(&claims(JWKS_ISS)).as_bytes(), &[], NOW)
            .unwrap_err()
            .status,
        AuthStatus::WrongIssuer
    );
}

// ------------------------------------------------------------ time

#[test]
fn expiry_and_leeway() {
    let p = jwks_provider(); // leeway 30
    let at = |exp: Value| {
        let mut c = claims(JWKS_ISS);
        c["exp"] = exp;
        status(&jwks_token(&c), &p)
    };
    assert_eq!(at(json!(NOW + 1)), AuthStatus::Verified);
    assert_eq!(at(json!(NOW)), AuthStatus::Verified);
    assert_eq!(at(json!(NOW - 30)), AuthStatus::Verified);
    assert_eq!(at(json!(NOW - 31)), AuthStatus::Expired);
    assert_eq!(at(json!(NOW - 3600)), AuthStatus::Expired);
    assert_eq!(at(json!(0)), AuthStatus::Expired);
    assert_eq!(at(json!(-1)), AuthStatus::Expired);
    assert_eq!(at(json!((NOW - 31) as f64 + 0.9)), AuthStatus::Expired);
    assert_eq!(at(json!((NOW + 10) as f64 + 0.5)), AuthStatus::Verified);
    assert_eq!(at(json!(1e300)), AuthStatus::Verified);
    assert_eq!(at(json!(u64::MAX)), AuthStatus::Verified);
    assert_eq!(at(json!("1900000000")), AuthStatus::Malformed);
    assert_eq!(at(json!(null)), AuthStatus::Malformed);
    let mut c = claims(JWKS_ISS);
    c.as_object_mut().unwrap().remove("exp");
    let e = run(&jwks_token(&c), &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::Malformed);
    assert_eq!(e.reason, "missing exp claim");
    // Zero leeway.
    let mut p0 = jwks_provider();
    p0.leeway = 0;
    let mut c = claims(JWKS_ISS);
    c["exp"] = json!(NOW - 1);
    assert_eq!(status(&jwks_token(&c), &p0), AuthStatus::Expired);
    c["exp"] = json!(NOW);
    assert_eq!(status(&jwks_token(&c), &p0), AuthStatus::Verified);
}

#[test]
fn nbf_and_iat() {
    let p = jwks_provider(); // leeway 30
    for name in ["nbf", "iat"] {
        let at = |v: Value| {
            let mut c = claims(JWKS_ISS);
            c[name] = v;
            status(&jwks_token(&c), &p)
        };
        assert_eq!(at(json!(NOW - 100)), AuthStatus::Verified, "{name}");
        assert_eq!(at(json!(NOW + 30)), AuthStatus::Verified, "{name}");
        assert_eq!(at(json!(NOW + 31)), AuthStatus::NotYetValid, "{name}");
        assert_eq!(at(json!(NOW + 3600)), AuthStatus::NotYetValid, "{name}");
        assert_eq!(at(json!(-5)), AuthStatus::Verified, "{name}");
        assert_eq!(at(json!("soon")), AuthStatus::Malformed, "{name}");
        assert_eq!(at(json!(null)), AuthStatus::Malformed, "{name}");
    }
}

// ------------------------------------------------------------ audience

#[test]
fn audiences() {
    let p = jwks_provider();
    let accepted = vec!["orders".to_string(), "billing".to_string()];
    let check = |aud: Option<Value>, accepted: &[String]| {
        let mut c = claims(JWKS_ISS);
        match aud {
            Some(a) => c["aud"] = a,
            None => {
                c.as_object_mut().unwrap().remove("aud");
            }
        }
        let v = run(&jwks_token(&c), &p).unwrap();
        check_audience(&v, accepted).map_err(|e| e.status)
    };
    assert_eq!(check(Some(json!("orders")), &accepted), Ok(()));
    assert_eq!(check(Some(json!(["x", "billing"])), &accepted), Ok(()));
    assert_eq!(
        check(Some(json!(["x", "y"])), &accepted),
        Err(AuthStatus::WrongAudience)
    );
    assert_eq!(
        check(Some(json!("Orders")), &accepted),
        Err(AuthStatus::WrongAudience)
    );
    assert_eq!(
        check(Some(json!([])), &accepted),
        Err(AuthStatus::WrongAudience)
    );
    assert_eq!(
        check(Some(json!(7)), &accepted),
        Err(AuthStatus::WrongAudience)
    );
    assert_eq!(check(None, &accepted), Err(AuthStatus::WrongAudience));
    // An https:// URL also matches itself with one trailing slash added or removed.
    let url = vec!["https://orders-abc-uc.a.run.app".to_string()];
    let slashed = vec!["https://orders-abc-uc.a.run.app/".to_string()];
    for (aud, accepted) in [
        ("https://orders-abc-uc.a.run.app/", &url),
        ("https://orders-abc-uc.a.run.app", &slashed),
        ("https://orders-abc-uc.a.run.app/", &slashed),
    ] {
        assert_eq!(check(Some(json!(aud)), accepted), Ok(()), "{aud}");
    }
    for (aud, accepted) in [
        ("https://orders-abc-uc.a.run.app//", &url),
        ("https://orders-abc-uc.a.run.app//", &slashed),
        ("https://orders-abc-uc.a.run.app/x", &url),
        ("https://ORDERS-abc-uc.a.run.app/", &url),
        ("http://orders-abc-uc.a.run.app/", &url),
        ("https://orders-abc-uc.a.run.ap", &url),
    ] {
        assert_eq!(
            check(Some(json!(aud)), accepted),
            Err(AuthStatus::WrongAudience),
            "{aud}"
        );
    }
    // Anything but an https:// URL stays exact.
    let plain = vec!["orders".to_string(), "http://orders.internal".to_string()];
    for aud in ["orders/", "http://orders.internal/"] {
        assert_eq!(
            check(Some(json!(aud)), &plain),
            Err(AuthStatus::WrongAudience),
            "{aud}"
        );
    }
    // Nothing configured: not checked.
    assert_eq!(check(None, &[]), Ok(()));
    assert_eq!(check(Some(json!("anything")), &[]), Ok(()));
}

// ------------------------------------------------------------ claims

#[test]
fn require_claims() {
    let mut p = jwks_provider();
    p.require = vec![
        req("email_verified=true"),
        req("org.team.name=core"),
        req("groups=admins"),
    ];
    let mut c = claims(JWKS_ISS);
    c["email_verified"] = json!(true);
    c["org"] = json!({"team": {"name": "core"}});
    c["groups"] = json!(["users", "admins"]);
    assert!(run(&jwks_token(&c), &p).is_ok());

    let mut bad = c.clone();
    bad["email_verified"] = json!("true"); // a string "true" equals VALUE too
    assert!(run(&jwks_token(&bad), &p).is_ok());
    bad["email_verified"] = json!(false);
    let e = run(&jwks_token(&bad), &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::ClaimMismatch);
    assert_eq!(e.reason, "claim email_verified does not match");

    let mut bad = c.clone();
    bad["org"] = json!({"team": {"name": "other"}});
    let e = run(&jwks_token(&bad), &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::ClaimMismatch);
    assert_eq!(e.reason, "claim org.team.name does not match");
    assert!(!e.reason.contains("other"));

    let mut bad = c.clone();
    bad["groups"] = json!(["users"]);
    assert_eq!(status(&jwks_token(&bad), &p), AuthStatus::ClaimMismatch);
    bad["groups"] = json!("admins");
    assert!(run(&jwks_token(&bad), &p).is_ok());
    bad.as_object_mut().unwrap().remove("groups");
    assert_eq!(status(&jwks_token(&bad), &p), AuthStatus::ClaimMismatch);
}

#[test]
fn principal_claim() {
    let mut p = jwks_provider();
    p.principal = "email".into();
    let mut c = claims(JWKS_ISS);
    c["email"] = json!("caller@shop.iam.gserviceaccount.com");
    let v = run(&jwks_token(&c), &p).unwrap();
    assert_eq!(v.principal, "caller@shop.iam.gserviceaccount.com");

    for bad in [
        json!(""),
        json!(42),
        json!(["a"]),
        json!(null),
        json!("a\r\nX-Evil: 1"),
    ] {
        c["email"] = bad.clone();
        let e = run(&jwks_token(&c), &p).unwrap_err();
        assert_eq!(e.status, AuthStatus::ClaimMismatch, "{bad}");
        assert!(!e.reason.contains("Evil"));
    }
    c.as_object_mut().unwrap().remove("email");
    let e = run(&jwks_token(&c), &p).unwrap_err();
    assert_eq!(e.status, AuthStatus::ClaimMismatch);
    assert_eq!(e.reason, "principal claim email missing");
}

// ------------------------------------------------------------ order

#[test]
fn checks_apply_in_order() {
    let mut p = jwks_provider();
    p.require = vec![req("role=admin")];
    p.principal = "email".into();
    // crit (2) before issuer (4)
    let h = json!({"alg": "none", "crit": ["x"]});
    let t = sign(
        &h,
        &claims("https://evil.example"),
        &rsa(),
        Algorithm::RS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::Malformed);
    // issuer (4) before alg (3)
    let t = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(&serde_json::to_vec(&claims("https://evil.example")).unwrap())
    );
    assert_eq!(status(&t, &p), AuthStatus::WrongIssuer);
    // alg (3) before keys (5)
    let mut empty = provider("e", JWKS_ISS, KeySet::default());
    empty.algorithms = vec![Algorithm::RS256];
    let t = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(&serde_json::to_vec(&claims(JWKS_ISS)).unwrap())
    );
    assert_eq!(status(&t, &empty), AuthStatus::BadSignature);
    // signature (6) before exp (7)
    let mut c = claims(JWKS_ISS);
    c.as_object_mut().unwrap().remove("exp");
    let t = sign(
        &header("RS256", Some("rsa1")),
        &c,
        &rsa2(),
        Algorithm::RS256,
    );
    assert_eq!(status(&t, &p), AuthStatus::BadSignature);
    // exp (7) before require (8) before principal (9)
    let mut c = claims(JWKS_ISS);
    c["exp"] = json!(NOW - 1000);
    assert_eq!(status(&jwks_token(&c), &p), AuthStatus::Expired);
    c["exp"] = json!(NOW + 1000);
    let e = run(&jwks_token(&c), &p).unwrap_err();
    assert_eq!(e.reason, "claim role does not match");
    c["role"] = json!("admin");
    let e = run(&jwks_token(&c), &p).unwrap_err();
    assert_eq!(e.reason, "principal claim email missing");
}

// ------------------------------------------------------------ platform

#[test]
fn platform_verified_tokens() {
    let p = jwks_provider();
    let t = jwks_token(&claims(JWKS_ISS));
    let stripped = format!(
        "{}.SIGNATURE_REMOVED_BY_GOOGLE",
        t.rsplit_once('.').unwrap().0
    );
    assert!(mesh_core::token::is_signature_removed(stripped.as_bytes()));
    assert!(!mesh_core::token::is_signature_removed(t.as_bytes()));
    // The normal path refuses it ...
    assert_eq!(status(&stripped, &p), AuthStatus::BadSignature);
    // ... the platform path checks everything but the signature.
    let v = verify_platform(stripped.as_bytes(), &[&p], NOW).unwrap();
    assert_eq!(v.principal, "svc@example.com");
    let empty = Provider {
        keys: Arc::new(KeySet::default()),
        ..jwks_provider()
    };
    assert!(verify_platform(stripped.as_bytes(), &[&empty], NOW).is_ok());
    assert_eq!(
        verify_platform(stripped.as_bytes(), &[&p], NOW + 10_000)
            .unwrap_err()
            .status,
        AuthStatus::Expired
    );
    // A real signature is not what the platform path accepts.
    assert_eq!(
        verify_platform(t.as_bytes(), &[&p], NOW)
            .unwrap_err()
            .status,
        AuthStatus::BadSignature
    );
}

// ------------------------------------------------------------ robustness

#[test]
fn reasons_never_leak_token_or_claims() {
    let p = jwks_provider();
    let mut c = claims(JWKS_ISS);
    c["secret_claim"] = json!("TOPSECRETVALUE");
    let t = jwks_token(&c);
    let sig = t.rsplit_once('.').unwrap().1;
    let mut variants = vec![];
    for now in [NOW, NOW + 100_000] {
        variants.push(verify(t.as_bytes(), &[&p], now));
    }
    let mut other = jwks_provider();
    other.issuers = vec!["x".into()];
    variants.push(verify(t.as_bytes(), &[&other], NOW));
    for r in variants {
        if let Err(e) = r {
            assert!(!e.reason.contains("TOPSECRET"));
            assert!(!e.reason.contains(&sig[..20]));
            assert!(!e.reason.contains("svc@example.com"));
        }
    }
    // The issuer is a claim: never repeated, whatever it holds.
    let c = claims("https://evil.example/\"\\\r\n<x>");
    let e = run(&jwks_token(&c), &p).unwrap_err();
    assert_eq!(e.reason, "issuer not accepted");
}

#[test]
fn mutations_never_panic() {
    let p = jwks_provider();
    let pem = pem_provider();
    let hm = hmac_provider();
    let t = jwks_token(&claims(JWKS_ISS)).into_bytes();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let mut m = t.clone();
        match rand() % 4 {
            0 => {
                let i = (rand() as usize) % m.len();
                m[i] = rand() as u8;
            }
            1 => m.truncate((rand() as usize) % m.len()),
            2 => {
                let i = (rand() as usize) % m.len();
                m.insert(i, b".-_A"[(rand() % 4) as usize]);
            }
            _ => {
                let i = (rand() as usize) % m.len();
                m.remove(i);
            }
        }
        let r = verify(&m, &[&p, &pem, &hm], NOW);
        if m != t {
            assert!(r.is_err());
        }
    }
    for junk in [&b""[..], b"\0\0\0", b"\xff.\xff.\xff", b"....", b"a.b.c"] {
        assert!(verify(junk, &[&p], NOW).is_err());
    }
}

#[test]
fn verified_remembers_the_key_that_verified_it() {
    let jwks = jwks_provider();
    let v = run(&jwks_token(&claims(JWKS_ISS)), &jwks).unwrap();
    assert!(v.key.is_some());
    assert!(v.key_still_held(&jwks.keys));
    // The same key from another source (PEM) is the same key ...
    let pem_rsa = KeySet::load(RSA_PUB).unwrap();
    assert!(v.key_still_held(&pem_rsa));
    // ... another RSA key, or no key, is not.
    assert!(!v.key_still_held(&KeySet::load(RSA2_PUB).unwrap()));
    assert!(!v.key_still_held(&KeySet::default()));
}

// ------------------------------------------------------------ preset google's caller

#[test]
fn email_first_names_a_verified_email_else_sub() {
    let p = Provider {
        email_first: true,
        ..jwks_provider()
    };
    let caller = |extra: Value| {
        let mut c = claims(JWKS_ISS);
        c["sub"] = json!("118044773098211223344");
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        run(&jwks_token(&c), &p).map(|v| v.principal)
    };
    let email = "job@shop.iam.gserviceaccount.com";
    assert_eq!(
        caller(json!({"email": email, "email_verified": true})).unwrap(),
        email
    );
    assert_eq!(
        caller(json!({"email": email, "email_verified": "true"})).unwrap(),
        email
    );
    for unverified in [
        json!({"email": email, "email_verified": false}),
        json!({"email": email}),
        json!({"email": "", "email_verified": true}),
        json!({"email": 7, "email_verified": true}),
        json!({}),
    ] {
        assert_eq!(
            caller(unverified.clone()).unwrap(),
            "118044773098211223344",
            "{unverified}"
        );
    }
    // a verified email holding a control character is refused, not replaced by sub
    assert_eq!(
        caller(json!({"email": "a\nb@x", "email_verified": true}))
            .unwrap_err()
            .status,
        AuthStatus::ClaimMismatch
    );
    // without email_first, the principal claim alone
    let c = json!({"email": email, "email_verified": true});
    let mut claims_ = claims(JWKS_ISS);
    claims_["email"] = c["email"].clone();
    assert_eq!(
        run(&jwks_token(&claims_), &jwks_provider())
            .unwrap()
            .principal,
        "svc@example.com"
    );
}

// ------------------------------------------------------------ ES512 (P-521)

#[test]
fn es512_is_verified_with_a_p521_key_from_jwks_and_pem() {
    let key = p521();
    let pem = provider("pem521", PEM_ISS, KeySet::from_pem(P521_PUB).unwrap());
    assert_eq!(pem.algorithms, vec![Algorithm::ES512]);
    for (kid, p) in [
        (Some("p521"), jwks_provider()),
        (None, jwks_provider()),
        (None, pem),
    ] {
        let iss = p.issuers[0].clone();
        let t = sign(&header("ES512", kid), &claims(&iss), &key, Algorithm::ES512);
        let v = run(&t, &p).unwrap_or_else(|e| panic!("{kid:?} {}: {e}", p.name));
        assert_eq!(v.principal, "svc@example.com");
        // one bit off: refused
        let mut bad = t.into_bytes();
        let n = bad.len();
        bad[n - 2] = if bad[n - 2] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(status(&bad, &p), AuthStatus::BadSignature);
    }
    // a P-521 key verifies ES512 only, and ES512 needs a P-521 key
    let jwks = jwks_provider();
    let t = sign(
        &header("ES512", Some("ec384")),
        &claims(JWKS_ISS),
        &key,
        Algorithm::ES512,
    );
    assert_eq!(status(&t, &jwks), AuthStatus::BadSignature);
    let t = sign(
        &header("ES384", Some("p521")),
        &claims(JWKS_ISS),
        &ec384(),
        Algorithm::ES384,
    );
    assert_eq!(status(&t, &jwks), AuthStatus::BadSignature);
}
