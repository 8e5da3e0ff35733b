//! Loading key sets: JWKS, PEM public keys and certificates, secrets.

mod common;

use common::*;
use mesh_core::keys::{Algorithm, KeyKind, KeySet};

const K256_PUB: &[u8] = include_bytes!("data/k256.pub.pem");
const X25519_PUB: &[u8] = include_bytes!("data/x25519.pub.pem");
const RSA_PKCS1: &[u8] = include_bytes!("data/rsa.pkcs1.pem");

fn kinds(s: &KeySet) -> Vec<KeyKind> {
    s.keys.iter().map(|k| k.kind).collect()
}

#[test]
fn jwks_file() {
    let s = KeySet::from_jwks(JWKS).unwrap();
    let kids: Vec<&str> = s.keys.iter().map(|k| k.kid.as_deref().unwrap()).collect();
    // enc1 (use=enc), oct1 (kty=oct), k256 and x1 (curves) are skipped.
    assert_eq!(kids, ["rsa1", "ec256", "ec384", "ed1", "p521"]);
    assert_eq!(
        kinds(&s),
        [
            KeyKind::Rsa,
            KeyKind::EcP256,
            KeyKind::EcP384,
            KeyKind::Ed25519,
            KeyKind::EcP521
        ]
    );
    assert_eq!(s.keys[1].alg, Some(Algorithm::ES256));
    assert_eq!(s.keys[0].alg, None);
    use Algorithm::*;
    assert_eq!(
        s.algorithms(),
        [RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA]
    );
}

#[test]
fn jwks_padding_and_leading_zero_tolerated() {
    let mut doc: serde_json::Value = serde_json::from_slice(JWKS).unwrap();
    let n = doc["keys"][0]["n"].as_str().unwrap().to_string();
    // "AA" + n: a leading zero byte when n's length is a multiple of 3 bytes
    // (256 bytes is not, so add the zero on the byte level instead).
    use base64::Engine;
    let eng = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut raw = eng.decode(&n).unwrap();
    raw.insert(0, 0);
    doc["keys"][0]["n"] = serde_json::json!(eng.encode(&raw));
    doc["keys"][0]["e"] = serde_json::json!("AQAB=");
    let s = KeySet::from_jwks(&serde_json::to_vec(&doc).unwrap()).unwrap();
    let p = provider("j", JWKS_ISS, s);
    let t = sign(
        &header("RS256", Some("rsa1")),
        &claims(JWKS_ISS),
        &rsa(),
        Algorithm::RS256,
    );
    assert!(mesh_core::token::verify(t.as_bytes(), &[&p], NOW).is_ok());
}

#[test]
fn pem_public_keys_and_certificates() {
    for (pem, kind) in [
        (RSA_PUB, KeyKind::Rsa),
        (RSA_CRT, KeyKind::Rsa),
        (RSA2_PUB, KeyKind::Rsa),
        (EC256_PUB, KeyKind::EcP256),
        (EC256_CRT, KeyKind::EcP256),
        (EC384_PUB, KeyKind::EcP384),
        (ED_PUB, KeyKind::Ed25519),
    ] {
        let s = KeySet::from_pem(pem).unwrap();
        assert_eq!(kinds(&s), [kind]);
        assert_eq!(s.keys[0].kid, None);
        assert_eq!(s.keys[0].alg, None);
    }
    let all = [
        RSA_CRT,
        b"\n# a comment\n",
        EC256_PUB,
        EC384_PUB,
        ED_PUB,
        EC256_CRT,
    ]
    .concat();
    let s = KeySet::from_pem(&all).unwrap();
    assert_eq!(s.keys.len(), 5);
    // Unsupported key types are skipped when something usable remains.
    let mixed = [K256_PUB, X25519_PUB, ED_PUB].concat();
    assert_eq!(
        kinds(&KeySet::from_pem(&mixed).unwrap()),
        [KeyKind::Ed25519]
    );
    // CRLF line endings.
    let crlf = String::from_utf8(EC256_PUB.to_vec())
        .unwrap()
        .replace('\n', "\r\n");
    assert_eq!(
        kinds(&KeySet::from_pem(crlf.as_bytes()).unwrap()),
        [KeyKind::EcP256]
    );
}

#[test]
fn pem_and_certificate_keys_verify() {
    for pem in [RSA_PUB, RSA_CRT] {
        let p = provider("p", PEM_ISS, KeySet::from_pem(pem).unwrap());
        let t = sign(
            &header("PS512", None),
            &claims(PEM_ISS),
            &rsa(),
            Algorithm::PS512,
        );
        assert!(mesh_core::token::verify(t.as_bytes(), &[&p], NOW).is_ok());
    }
    let p = provider("p", PEM_ISS, KeySet::from_pem(EC256_CRT).unwrap());
    let t = sign(
        &header("ES256", None),
        &claims(PEM_ISS),
        &ec256(),
        Algorithm::ES256,
    );
    assert!(mesh_core::token::verify(t.as_bytes(), &[&p], NOW).is_ok());
}

#[test]
fn pem_errors() {
    // Private keys are refused, also next to public ones.
    for bad in [
        RSA_KEY.to_vec(),
        EC256_KEY.to_vec(),
        ED_KEY.to_vec(),
        [RSA_PUB, RSA_KEY].concat(),
        b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n".to_vec(),
        b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n".to_vec(),
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
            .to_vec(),
    ] {
        let e = KeySet::from_pem(&bad).unwrap_err();
        assert!(e.contains("private keys do not belong here"), "{e}");
        assert!(KeySet::load(&bad).is_err());
    }
    // Nothing usable.
    for bad in [&b""[..], b"hello", K256_PUB, X25519_PUB] {
        let e = KeySet::from_pem(bad).unwrap_err();
        assert!(e.contains("no usable public key"), "{e}");
    }
    let e = KeySet::from_pem(RSA_PKCS1).unwrap_err();
    assert!(e.contains("RSA PUBLIC KEY"), "{e}");
    // Broken PEM or DER.
    let pem = String::from_utf8(RSA_PUB.to_vec()).unwrap();
    let no_end = pem.replace("-----END PUBLIC KEY-----", "");
    assert!(KeySet::from_pem(no_end.as_bytes()).is_err());
    let bad_b64 = pem.replacen("MII", "M*I", 1);
    assert!(KeySet::from_pem(bad_b64.as_bytes()).is_err());
    let junk_der = "-----BEGIN PUBLIC KEY-----\nAAECAwQF\n-----END PUBLIC KEY-----\n";
    assert!(KeySet::from_pem(junk_der.as_bytes()).is_err());
    let junk_cert = "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n";
    assert!(KeySet::from_pem(junk_cert.as_bytes()).is_err());
}

#[test]
fn load_dispatches_on_first_byte() {
    let jwks = [b" \n\t".as_slice(), JWKS].concat();
    assert_eq!(KeySet::load(&jwks).unwrap().keys.len(), 5);
    assert_eq!(KeySet::load(RSA_CRT).unwrap().keys.len(), 1);
    assert!(KeySet::load(b"").is_err());
    assert!(KeySet::load(b"   ").is_err());
    assert!(KeySet::load(b"{not json").is_err());
    assert!(KeySet::load(b"[]").is_err());
}

#[test]
fn truncated_files_never_panic() {
    for data in [
        JWKS, RSA_PUB, RSA_CRT, EC256_PUB, EC256_CRT, EC384_PUB, ED_PUB, P521_PUB, K256_PUB,
        RSA_PKCS1,
    ] {
        for n in 0..data.len() {
            let _ = KeySet::load(&data[..n]);
        }
    }
    // DER-level corruption: flip every byte of a certificate in turn.
    use base64::Engine;
    let pem = String::from_utf8(RSA_CRT.to_vec()).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    for i in 0..der.len() {
        let mut d = der.clone();
        d[i] ^= 0xff;
        let text = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD.encode(&d)
        );
        let _ = KeySet::from_pem(text.as_bytes());
    }
}

#[test]
fn secret() {
    let s = KeySet::from_secret(SECRET);
    assert_eq!(kinds(&s), [KeyKind::Hmac]);
    assert_eq!(s.keys[0].kid, None);
    use Algorithm::*;
    assert_eq!(s.algorithms(), [HS256, HS384, HS512]);
    assert!(KeySet::from_secret(b"").is_empty());
    assert!(KeySet::default().is_empty());
    assert!(KeySet::default().algorithms().is_empty());
}

#[test]
fn x509_maps() {
    let pem = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    let map = serde_json::json!({"k-rsa": pem(RSA_CRT), "k-ec": pem(EC256_CRT)}).to_string();
    let s = KeySet::load(map.as_bytes()).unwrap();
    let mut kids: Vec<&str> = s.keys.iter().map(|k| k.kid.as_deref().unwrap()).collect();
    kids.sort();
    assert_eq!(kids, ["k-ec", "k-rsa"]);
    assert_eq!(KeySet::from_x509_map(map.as_bytes()).unwrap().keys.len(), 2);
    // a JWKS is still a JWKS, and an object that is neither is read as a JWKS (and refused)
    assert_eq!(KeySet::load(JWKS).unwrap().keys.len(), 5);
    assert!(KeySet::load(b"{}").unwrap_err().contains("JWKS"));
    let not_pem = serde_json::json!({"k": "hello"}).to_string();
    assert!(KeySet::load(not_pem.as_bytes())
        .unwrap_err()
        .contains("JWKS"));
    // a map entry that is a PEM public key, a broken certificate or not a string: refused, named
    let bad_cert = "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n";
    for (doc, word) in [
        (
            serde_json::json!({"k1": pem(RSA_CRT), "k2": bad_cert}),
            "\"k2\"",
        ),
        (serde_json::json!({"k1": pem(RSA_CRT), "k2": 7}), "\"k2\""),
        (serde_json::json!({"k3": pem(RSA_PUB)}), "\"k3\""),
    ] {
        let e = KeySet::from_x509_map(doc.to_string().as_bytes()).unwrap_err();
        assert!(e.contains(word), "{e}");
    }
    let private = serde_json::json!({"k1": pem(RSA_CRT) + &pem(RSA_KEY)}).to_string();
    let e = KeySet::load(private.as_bytes()).unwrap_err();
    assert!(e.contains("private keys do not belong here"), "{e}");
}
