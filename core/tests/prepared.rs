//! Keys parsed once at load, tokens decoded once, hashed once: the request-path entry
//! points (`Key::verify`, `Jwt`, `Hashed`, `TokenCache::lookup`/`insert`) give the same
//! answers as the one-shot ones.

mod common;

use std::sync::Arc;

use common::*;
use mesh_core::cache::TokenCache;
use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::status::AuthStatus;
use mesh_core::token::{verify, Hashed, Jwt, MAX_TOKEN_LEN};
use serde_json::json;

const RSA1024_PUB: &[u8] = include_bytes!("data/rsa1024.pub.pem");

fn status_of(token: &str, p: &mesh_core::token::Provider) -> AuthStatus {
    match verify(token.as_bytes(), &[p], NOW) {
        Ok(_) => AuthStatus::Verified,
        Err(e) => e.status,
    }
}

#[test]
fn key_verify_checks_the_algorithm_against_the_key() {
    let keys = KeySet::from_jwks(JWKS).unwrap();
    let t = sign(
        &header("RS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    let (input, sig) = t.rsplit_once('.').unwrap();
    let sig = b64_decode(sig);
    let rsa_key = keys
        .keys
        .iter()
        .find(|k| k.kid.as_deref() == Some("rsa1"))
        .unwrap();
    assert!(rsa_key.verify(Algorithm::RS256, input.as_bytes(), &sig));
    // The same bytes under another algorithm, or with a changed message: no.
    assert!(!rsa_key.verify(Algorithm::PS256, input.as_bytes(), &sig));
    assert!(!rsa_key.verify(Algorithm::RS384, input.as_bytes(), &sig));
    assert!(!rsa_key.verify(Algorithm::HS256, input.as_bytes(), &sig));
    assert!(!rsa_key.verify(Algorithm::RS256, &input.as_bytes()[1..], &sig));
    // Another key of the set never verifies it.
    for k in keys
        .keys
        .iter()
        .filter(|k| k.kid.as_deref() != Some("rsa1"))
    {
        for a in mesh_core::keys::ALL_ALGORITHMS {
            assert!(!k.verify(a, input.as_bytes(), &sig), "{:?} {a:?}", k.kid);
        }
    }
}

#[test]
fn hmac_key_verifies_hs_only() {
    let keys = KeySet::from_secret(SECRET);
    let t = sign(
        &header("HS256", None),
        &claims(HMAC_ISS),
        &hmac(),
        Algorithm::HS256,
    );
    let (input, sig) = t.rsplit_once('.').unwrap();
    let sig = b64_decode(sig);
    assert!(keys.keys[0].verify(Algorithm::HS256, input.as_bytes(), &sig));
    assert!(!keys.keys[0].verify(Algorithm::HS384, input.as_bytes(), &sig));
    assert!(!keys.keys[0].verify(Algorithm::RS256, input.as_bytes(), &sig));
    assert!(!keys.keys[0].verify(Algorithm::HS256, input.as_bytes(), &sig[1..]));
}

#[test]
fn rsa_keys_under_2048_bits_are_refused_at_load() {
    let e = KeySet::from_pem(RSA1024_PUB).unwrap_err();
    assert!(e.contains("1024 bits"), "{e}");
    // The same key as a JWK.
    let mut doc: serde_json::Value = serde_json::from_slice(JWKS).unwrap();
    let der = pem_body(RSA1024_PUB);
    // SubjectPublicKeyInfo of RSA-1024: the modulus is the 129-byte INTEGER at a fixed place.
    let n_at = der
        .windows(3)
        .position(|w| w == [0x02, 0x81, 0x81])
        .unwrap()
        + 3;
    let n = &der[n_at + 1..n_at + 129];
    doc["keys"][0]["n"] = json!(b64(n));
    let e = KeySet::from_jwks(&serde_json::to_vec(&doc).unwrap()).unwrap_err();
    assert!(e.contains("JWKS key #1") && e.contains("1024 bits"), "{e}");
}

#[test]
fn jwt_keeps_the_issuer_after_a_refusal() {
    let p = jwks_provider();
    let t = sign(
        &header("RS256", Some("rotated")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    let jwt = Jwt::decode(t.as_bytes()).unwrap();
    let e = jwt.check(&[&p], NOW).unwrap_err();
    assert_eq!(e.status, AuthStatus::UnknownKey);
    assert_eq!(jwt.issuer(), Some(JWKS_ISS));
    // And a good one: check, then the verified token with the claims moved.
    let t = sign(
        &header("RS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    let jwt = Jwt::decode(t.as_bytes()).unwrap();
    let provider = jwt.check(&[&p], NOW).unwrap();
    let v = jwt.into_verified(provider);
    assert_eq!(v, verify(t.as_bytes(), &[&p], NOW).unwrap());
    assert_eq!(v.principal, "svc@example.com");
    assert_eq!(v.exp, NOW + 600);
}

#[test]
fn decode_hashed_reuses_the_digest_and_agrees_with_decode() {
    let jwks = jwks_provider();
    let pem = pem_provider();
    let hm = hmac_provider();
    let cases = [
        ("RS256", Algorithm::RS256, rsa(), &jwks, Some("rsa1")),
        ("PS256", Algorithm::PS256, rsa(), &jwks, Some("rsa1")),
        ("RS512", Algorithm::RS512, rsa(), &jwks, Some("rsa1")),
        ("ES256", Algorithm::ES256, ec256(), &jwks, Some("ec256")),
        ("ES384", Algorithm::ES384, ec384(), &pem, None),
        ("EdDSA", Algorithm::EdDSA, ed(), &jwks, Some("ed1")),
        ("HS256", Algorithm::HS256, hmac(), &hm, None),
    ];
    for (name, alg, key, p, kid) in cases {
        let iss = p.issuers[0].clone();
        let t = sign(&header(name, kid), &claims(&iss), &key, alg);
        let hashed = Hashed::new(t.as_bytes());
        let v = Jwt::decode_hashed(&hashed)
            .unwrap()
            .verify(&[p], NOW)
            .unwrap();
        assert_eq!(v, verify(t.as_bytes(), &[p], NOW).unwrap(), "{name}");
        assert_eq!(v.claims_b64, b64(v.claims_json.as_bytes()), "{name}");
        // A changed payload under the same signature: refused on both paths.
        let mut c = claims(&iss);
        c["sub"] = json!("mallory@example.com");
        let forged = format!(
            "{}.{}.{}",
            t.split('.').next().unwrap(),
            b64(&serde_json::to_vec(&c).unwrap()),
            t.rsplit('.').next().unwrap()
        );
        let e = Jwt::decode_hashed(&Hashed::new(forged.as_bytes()))
            .unwrap()
            .verify(&[p], NOW)
            .unwrap_err();
        assert_eq!(e.status, AuthStatus::BadSignature, "{name}");
        assert_eq!(status_of(&forged, p), AuthStatus::BadSignature, "{name}");
    }
}

#[test]
fn header_is_read_as_json_without_a_map() {
    let p = jwks_provider();
    let c = serde_json::to_vec(&claims(JWKS_ISS)).unwrap();
    let status = |h: &str| status_of(&sign_raw(h.as_bytes(), &c, &rsa(), Algorithm::RS256), &p);
    let malformed = |h: &str| {
        let t = sign_raw(h.as_bytes(), &c, &rsa(), Algorithm::RS256);
        let e = verify(t.as_bytes(), &[&p], NOW).expect_err(h);
        assert_eq!(e.status, AuthStatus::Malformed, "{h}");
        e.reason
    };
    assert_eq!(
        status(r#"{"alg":"RS256","kid":"rsa1"}"#),
        AuthStatus::Verified
    );
    // Escaped member names are the same names.
    assert_eq!(
        status(r#"{"\u0061lg":"RS256","k\u0069d":"rsa1"}"#),
        AuthStatus::Verified
    );
    // Duplicates: the last one counts.
    assert_eq!(
        status(r#"{"alg":"none","alg":"RS256","kid":"rsa1"}"#),
        AuthStatus::Verified
    );
    assert_eq!(
        status(r#"{"alg":"RS256","alg":"none","kid":"rsa1"}"#),
        AuthStatus::BadSignature
    );
    assert_eq!(
        status(r#"{"alg":"RS256","kid":"nope","kid":"rsa1"}"#),
        AuthStatus::Verified
    );
    // Other members are read and dropped, whatever they hold.
    assert_eq!(
        status(
            r#"{"alg":"RS256","kid":"rsa1","x":[1,{"y":null,"z":[true,-1.5e3]}],"s":"\n\u00e9"}"#
        ),
        AuthStatus::Verified
    );
    assert_eq!(
        status(r#"{"alg":7,"kid":"rsa1"}"#),
        AuthStatus::BadSignature
    );
    assert_eq!(
        malformed(r#"{"alg":"RS256","kid":7}"#),
        "kid header is not a string"
    );
    assert_eq!(
        malformed(r#"{"alg":"RS256","kid":"rsa1","crit":[]}"#),
        "unsupported crit header"
    );
    // Bad JSON anywhere, also in a member nobody reads.
    for bad in [
        r#"{"alg":"RS256","x":"\ud800"}"#,
        r#"{"alg":"RS256","x":1e400}"#,
        r#"{"alg":"RS256","x":tru}"#,
        r#"{"alg":"RS256"} x"#,
        r#"["alg","RS256"]"#,
        r#""RS256""#,
        "{\"alg\":\"RS256\",\"x\":\"\x01\"}",
    ] {
        assert_eq!(malformed(bad), "header is not a JSON object", "{bad}");
    }
    let deep = |n: usize| {
        format!(
            "{{\"alg\":\"RS256\",\"x\":{}{}}}",
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    // The header object is level 1: 31 arrays inside make 32 levels, the most allowed.
    assert_eq!(status(&deep(31)), AuthStatus::Verified);
    assert_eq!(malformed(&deep(32)), "header nested too deep");
    assert_eq!(malformed(&deep(200)), "header nested too deep");
    // Brackets inside strings are not nesting.
    let in_string = format!(
        "{{\"alg\":\"RS256\",\"kid\":\"rsa1\",\"x\":\"{}\\\"{}\"}}",
        "[".repeat(40),
        "{".repeat(40)
    );
    assert_eq!(status(&in_string), AuthStatus::Verified);
}

#[test]
fn cache_lookup_identifies_the_whole_token() {
    let p = jwks_provider();
    let t = sign(
        &header("RS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    let v = Arc::new(verify(t.as_bytes(), &[&p], NOW).unwrap());
    let mut c = TokenCache::new(8);
    let h = Hashed::new(t.as_bytes());
    assert!(c.lookup(&h, NOW).is_none());
    c.insert(&h, v.clone());
    assert_eq!(c.lookup(&Hashed::new(t.as_bytes()), NOW), Some(&v));
    assert_eq!(c.get(t.as_bytes(), NOW).as_ref(), Some(&v));
    // The same signing input with another signature, or one byte more: not the same token.
    let (input, sig) = t.rsplit_once('.').unwrap();
    let other = format!("{input}.{}", &sig[1..]);
    assert!(c.lookup(&Hashed::new(other.as_bytes()), NOW).is_none());
    assert!(c
        .lookup(&Hashed::new(format!("{t}A").as_bytes()), NOW)
        .is_none());
    assert!(c.lookup(&Hashed::new(input.as_bytes()), NOW).is_none());
    // A miss with the same signing input leaves the entry alone.
    assert_eq!(c.lookup(&h, NOW), Some(&v));
    // Dotless keys never meet dotted ones: "ab" and "ab." differ.
    c.put(b"ab", v.clone());
    assert!(c.get(b"ab.", NOW).is_none());
    assert!(c.get(b"ab", NOW).is_some());
    // Too long: never kept.
    let long = vec![b'a'; MAX_TOKEN_LEN + 1];
    c.put(&long, v.clone());
    assert!(c.get(&long, NOW).is_none());
    assert_eq!(c.len(), 2);
    assert_eq!(c.capacity(), 8);
}

#[test]
fn cache_is_bounded() {
    let v = Arc::new(mesh_core::token::Verified {
        provider: "p".into(),
        principal: "a".into(),
        claims: serde_json::Map::new(),
        claims_json: "{}".into(),
        claims_b64: "e30".into(),
        audiences: vec![],
        exp: 1000,
        iss: String::new(),
        key: None,
    });
    let mut c = TokenCache::new(64);
    for i in 0..10_000u32 {
        c.insert(&Hashed::new(format!("h.p{i}.sig{i}").as_bytes()), v.clone());
        assert!(c.len() <= 64);
    }
    assert_eq!(c.len(), 64);
    assert_eq!(Arc::strong_count(&v), 65, "evicted entries are dropped");
    assert!(c.get(b"h.p9999.sig9999", 1).is_some());
    assert!(c.get(b"h.p0.sig0", 1).is_none());
}

fn b64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

fn pem_body(pem: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let text = std::str::from_utf8(pem).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}
