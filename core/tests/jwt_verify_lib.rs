//! Google's jwt_verify_lib test vectors (Apache-2.0, see data/jwt_verify_lib/NOTICE): the
//! keys and tokens Envoy's and ESPv2's verifier is tested with verify here too.
//!
//! The vectors' tokens have no `exp` (which this module requires) or expired years ago, so the
//! signature is checked with the key the token names, as jwt_verify_lib's `verifyJwt` does,
//! and then every one-bit change of the signature must fail (its `fuzzJwtSignatureBits`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use mesh_core::keys::{parse_algorithm, KeySet};
use serde_json::Value;

const JWKS_EC: &[u8] = include_bytes!("data/jwt_verify_lib/jwks_ec.json");
const TOKENS: &str = include_str!("data/jwt_verify_lib/tokens.txt");

fn token(name: &str) -> &'static str {
    TOKENS
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no token {name}"))
}

fn b64(s: &str) -> Vec<u8> {
    // jwt_verify_lib accepts padded signatures (kTokenNoKid ends in "=="); the module does not,
    // so the padding is taken off here
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).unwrap()
}

/// Whether `keys` verifies the token's signature with the key its `kid` names (or, without
/// one, with any key of its algorithm), and no one-bit change of the signature.
fn verifies(keys: &KeySet, token: &str) -> bool {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let header: Value = serde_json::from_slice(&b64(input.split('.').next().unwrap())).unwrap();
    let alg = parse_algorithm(header["alg"].as_str().unwrap()).unwrap();
    let kid = header.get("kid").and_then(Value::as_str);
    let candidates: Vec<_> = keys
        .keys
        .iter()
        .filter(|k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)) && k.allows(alg))
        .collect();
    let sig = b64(sig);
    let good = candidates
        .iter()
        .any(|k| k.verify(alg, input.as_bytes(), &sig));
    for i in 0..sig.len() * 8 {
        let mut bad = sig.clone();
        bad[i / 8] ^= 1 << (i % 8);
        assert!(
            !candidates
                .iter()
                .any(|k| k.verify(alg, input.as_bytes(), &bad)),
            "a signature with bit {i} flipped verified"
        );
    }
    good
}

#[test]
fn ec_vectors_es256_es384_es512() {
    let keys = KeySet::load(JWKS_EC).unwrap();
    assert_eq!(keys.keys.len(), 4);
    for name in ["es256", "es384", "es512", "ec_no_kid"] {
        assert!(verifies(&keys, token(name)), "{name}");
    }
    let pem = KeySet::load(include_bytes!("data/jwt_verify_lib/es512.pub.pem")).unwrap();
    assert!(verifies(&pem, token("es512_pem")));
    assert!(
        !verifies(&pem, token("es384")),
        "a P-521 key verifies ES512 only"
    );
}

const X509_ESP: &[u8] = include_bytes!("data/jwt_verify_lib/x509_map_esp.json");
const X509_REAL: &[u8] = include_bytes!("data/jwt_verify_lib/x509_map_real.json");

#[test]
fn x509_map_vectors() {
    // the shape is detected: a JSON object of PEM certificates, no "keys" member
    let esp = KeySet::load(X509_ESP).unwrap();
    assert_eq!(esp.keys.len(), 2);
    assert!(esp
        .keys
        .iter()
        .any(|k| k.kid.as_deref() == Some("62a93512c9ee4c7f8067b5a216dade2763d32a47")));
    // no kid: every RSA key of the map is tried, as jwt_verify_lib does
    assert!(verifies(&esp, token("x509_no_kid")));
    let real = KeySet::load(X509_REAL).unwrap();
    assert_eq!(real.keys.len(), 5);
    assert!(verifies(&real, token("x509_real")));
    // the whole verification too, at the time the token was valid (iat 1578448106)
    let p = mesh_core::token::Provider {
        name: "sa".into(),
        issuers: vec!["fake.issuer".into()],
        audiences: vec![],
        algorithms: real.algorithms(),
        keys: std::sync::Arc::new(real),
        leeway: 30,
        principal: "sub".into(),
        email_first: false,
        require: vec![],
    };
    let v = mesh_core::token::verify(token("x509_real").as_bytes(), &[&p], 1_578_448_200).unwrap();
    assert_eq!(v.principal, "fake.issuer");
    // each key answers to its own kid only
    let esp_keys = KeySet::load(X509_ESP).unwrap();
    assert!(!verifies(&esp_keys, token("x509_real")));
}
