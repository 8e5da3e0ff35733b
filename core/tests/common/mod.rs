//! Shared helpers: test keys (generated once by `data/gen.sh`), providers and
//! a token builder that signs arbitrary header/payload bytes.
#![allow(dead_code)]

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::EncodingKey;
use mesh_core::keys::{Algorithm, KeySet};
use mesh_core::token::{Provider, Requirement};
use serde_json::{json, Value};

pub const RSA_KEY: &[u8] = include_bytes!("../data/rsa.key");
pub const RSA_PUB: &[u8] = include_bytes!("../data/rsa.pub.pem");
pub const RSA_CRT: &[u8] = include_bytes!("../data/rsa.crt");
pub const RSA2_KEY: &[u8] = include_bytes!("../data/rsa2.key");
pub const RSA2_PUB: &[u8] = include_bytes!("../data/rsa2.pub.pem");
pub const EC256_KEY: &[u8] = include_bytes!("../data/ec256.key");
pub const EC256_PUB: &[u8] = include_bytes!("../data/ec256.pub.pem");
pub const EC256_CRT: &[u8] = include_bytes!("../data/ec256.crt");
pub const EC384_KEY: &[u8] = include_bytes!("../data/ec384.key");
pub const EC384_PUB: &[u8] = include_bytes!("../data/ec384.pub.pem");
pub const P521_KEY: &[u8] = include_bytes!("../data/p521.key");
pub const P521_PUB: &[u8] = include_bytes!("../data/p521.pub.pem");
pub const ED_KEY: &[u8] = include_bytes!("../data/ed25519.key");
pub const ED_PUB: &[u8] = include_bytes!("../data/ed25519.pub.pem");
pub const JWKS: &[u8] = include_bytes!("../data/jwks.json");
pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n";

pub const NOW: u64 = 1_800_000_000;
pub const JWKS_ISS: &str = "https://jwks.example";
pub const PEM_ISS: &str = "https://pem.example";
pub const HMAC_ISS: &str = "https://hmac.example";

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_KEY).unwrap()
}
pub fn rsa2() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA2_KEY).unwrap()
}
pub fn ec256() -> EncodingKey {
    EncodingKey::from_ec_pem(EC256_KEY).unwrap()
}
pub fn ec384() -> EncodingKey {
    EncodingKey::from_ec_pem(EC384_KEY).unwrap()
}
pub fn ed() -> EncodingKey {
    EncodingKey::from_ed_pem(ED_KEY).unwrap()
}
pub fn hmac() -> EncodingKey {
    EncodingKey::from_secret(SECRET.strip_suffix(b"\n").unwrap())
}

/// A signing key: jsonwebtoken's, or a P-521 key (ES512, which jsonwebtoken 10.3 lacks).
pub enum SigningKey<'a> {
    Jwt(&'a EncodingKey),
    P521(&'a aws_lc_rs::signature::EcdsaKeyPair),
}

impl<'a> From<&'a EncodingKey> for SigningKey<'a> {
    fn from(k: &'a EncodingKey) -> SigningKey<'a> {
        SigningKey::Jwt(k)
    }
}

impl<'a> From<&'a aws_lc_rs::signature::EcdsaKeyPair> for SigningKey<'a> {
    fn from(k: &'a aws_lc_rs::signature::EcdsaKeyPair) -> SigningKey<'a> {
        SigningKey::P521(k)
    }
}

/// The P-521 test key (PKCS#8 PEM), for ES512.
pub fn p521() -> aws_lc_rs::signature::EcdsaKeyPair {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(P521_KEY).unwrap();
    aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P521_SHA512_FIXED_SIGNING,
        der.secret_pkcs8_der(),
    )
    .unwrap()
}

pub fn jwt_alg(alg: Algorithm) -> jsonwebtoken::Algorithm {
    use jsonwebtoken::Algorithm as J;
    match alg {
        Algorithm::RS256 => J::RS256,
        Algorithm::RS384 => J::RS384,
        Algorithm::RS512 => J::RS512,
        Algorithm::PS256 => J::PS256,
        Algorithm::PS384 => J::PS384,
        Algorithm::PS512 => J::PS512,
        Algorithm::ES256 => J::ES256,
        Algorithm::ES384 => J::ES384,
        Algorithm::ES512 => panic!("jsonwebtoken cannot sign ES512: use p521()"),
        Algorithm::EdDSA => J::EdDSA,
        Algorithm::HS256 => J::HS256,
        Algorithm::HS384 => J::HS384,
        Algorithm::HS512 => J::HS512,
    }
}

/// A token from raw header and payload bytes, signed with `key` as `alg`.
pub fn sign_raw<'a>(
    header: &[u8],
    payload: &[u8],
    key: impl Into<SigningKey<'a>>,
    alg: Algorithm,
) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let sig = match key.into() {
        SigningKey::Jwt(k) => {
            jsonwebtoken::crypto::sign(input.as_bytes(), k, jwt_alg(alg)).unwrap()
        }
        SigningKey::P521(k) => {
            assert_eq!(alg, Algorithm::ES512);
            let rng = aws_lc_rs::rand::SystemRandom::new();
            b64(k.sign(&rng, input.as_bytes()).unwrap().as_ref())
        }
    };
    format!("{input}.{sig}")
}

pub fn sign<'a>(
    header: &Value,
    claims: &Value,
    key: impl Into<SigningKey<'a>>,
    alg: Algorithm,
) -> String {
    sign_raw(
        &serde_json::to_vec(header).unwrap(),
        &serde_json::to_vec(claims).unwrap(),
        key,
        alg,
    )
}

/// Typical claims for `iss`, valid at `NOW`.
pub fn claims(iss: &str) -> Value {
    json!({
        "iss": iss,
        "sub": "svc@example.com",
        "aud": "orders",
        "iat": NOW - 10,
        "exp": NOW + 600,
    })
}

pub fn header(alg: &str, kid: Option<&str>) -> Value {
    match kid {
        Some(kid) => json!({"alg": alg, "typ": "JWT", "kid": kid}),
        None => json!({"alg": alg, "typ": "JWT"}),
    }
}

pub fn provider(name: &str, iss: &str, keys: KeySet) -> Provider {
    let algorithms = keys.algorithms();
    Provider {
        name: name.into(),
        issuers: vec![iss.into()],
        audiences: vec![],
        algorithms,
        keys: Arc::new(keys),
        leeway: 30,
        principal: "sub".into(),
        email_first: false,
        require: vec![],
    }
}

pub fn jwks_provider() -> Provider {
    provider("jwks", JWKS_ISS, KeySet::from_jwks(JWKS).unwrap())
}

pub fn pem_provider() -> Provider {
    let pem = [RSA_CRT, EC256_PUB, EC384_PUB, ED_PUB].concat();
    provider("pem", PEM_ISS, KeySet::from_pem(&pem).unwrap())
}

pub fn hmac_provider() -> Provider {
    provider("hmac", HMAC_ISS, KeySet::from_secret(SECRET))
}

pub fn req(s: &str) -> Requirement {
    Requirement::parse(s).unwrap()
}
