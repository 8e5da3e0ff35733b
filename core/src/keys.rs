//! Verification keys: JWKS (RFC 7517/7518), PEM public keys and X.509
//! certificates, x509 key maps (`{"kid": "PEM certificate", ...}`, as Google publishes the
//! keys of Firebase Authentication and of service accounts), and HMAC secrets.
//!
//! Only public keys are accepted from files and JWKS documents; HMAC secrets
//! come from `secret FILE` alone, so an HS* token can never be checked against
//! a public key (RFC 8725 section 2.1 / 3.1: algorithm confusion).

use std::fmt;

use aws_lc_rs::digest::Digest;
use aws_lc_rs::hmac;
use aws_lc_rs::signature::{self as lc, ParsedPublicKey, VerificationAlgorithm};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::DecodingKey;
use serde_json::Value;

/// A JWS signature algorithm (RFC 7518 3.1, RFC 8037). The module's own list rather than
/// jsonwebtoken's: jsonwebtoken 10.3 (the newest that builds on Rust 1.85) has no ES512, and
/// every signature is checked with aws-lc directly ([`Key::verify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    ES512,
    EdDSA,
    HS256,
    HS384,
    HS512,
}

/// Every algorithm this module supports, in the order `KeySet::algorithms`
/// reports them.
pub const ALL_ALGORITHMS: [Algorithm; 13] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::ES512,
    Algorithm::EdDSA,
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
];

/// The type of a key, which decides the algorithms it may verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    EcP521,
    Ed25519,
    Hmac,
}

impl KeyKind {
    /// Whether a key of this kind may verify `alg` (RFC 7518 section 3.1,
    /// RFC 8037 for EdDSA). Each EC curve fits exactly one algorithm, and HMAC
    /// keys fit only HS* while HS* fits only HMAC keys.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::EcP521 => alg == ES512,
            KeyKind::Ed25519 => alg == EdDSA,
            KeyKind::Hmac => matches!(alg, HS256 | HS384 | HS512),
        }
    }
}

/// One verification key.
#[derive(Clone, Debug)]
pub struct Key {
    /// The JWK `kid`; `None` for PEM keys and secrets.
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The JWK `alg`, if given: then the key verifies that algorithm only.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
    /// The key parsed once, at load, for every algorithm it allows.
    prepared: Prepared,
    /// What this key is, whatever its `kid` (see [`KeyFingerprint`]).
    fingerprint: KeyFingerprint,
}

/// The SHA-256 of a key's kind and material: a cached verification remembers the key that
/// verified it, and is served only while the provider's current key set still holds that
/// key ([`KeySet::holds`]). A key replaced under the same `kid` is another key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint([u8; 32]);

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyFingerprint({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl KeyFingerprint {
    fn of(kind: KeyKind, alg: Option<Algorithm>, material: &[u8]) -> KeyFingerprint {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(format!("{kind:?}/{:?}/", alg.map(algorithm_name)).as_bytes());
        ctx.update(material);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        KeyFingerprint(out)
    }
}

/// A key as the crypto library holds it, ready to verify: parsing a public key (and, for
/// RSA, its Montgomery constants, which aws-lc caches in the parsed key on first use) costs
/// about as much as a verification, so it is done once per key, not once per token.
#[derive(Clone)]
enum Prepared {
    /// One parsed key per algorithm the key allows (aws-lc binds a parsed key to one).
    Public(Vec<(Algorithm, ParsedPublicKey)>),
    /// One HMAC key per HS* algorithm.
    Hmac(Vec<(Algorithm, hmac::Key)>),
}

impl fmt::Debug for Prepared {
    /// The algorithms only: never the key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algs: Vec<&str> = match self {
            Prepared::Public(v) => v.iter().map(|(a, _)| algorithm_name(*a)).collect(),
            Prepared::Hmac(v) => v.iter().map(|(a, _)| algorithm_name(*a)).collect(),
        };
        write!(f, "Prepared({})", algs.join(","))
    }
}

/// aws-lc's verification parameters for a public-key algorithm (those jsonwebtoken 10
/// uses: RSA keys of 2048 to 8192 bits, fixed-size `r || s` ECDSA signatures, RFC 7518 3.4).
fn lc_algorithm(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        Algorithm::RS256 => &lc::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &lc::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &lc::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &lc::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &lc::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &lc::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &lc::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &lc::ECDSA_P384_SHA384_FIXED,
        Algorithm::ES512 => &lc::ECDSA_P521_SHA512_FIXED,
        Algorithm::EdDSA => &lc::ED25519,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => return None,
    })
}

/// Whether `alg` signs the SHA-256 of the signing input (so a digest computed once can be
/// checked directly).
pub(crate) fn signs_sha256(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::RS256 | Algorithm::PS256 | Algorithm::ES256)
}

impl Key {
    /// A key from its public key bytes as aws-lc parses them (`public` is PKCS#1
    /// RSAPublicKey DER for RSA, the SEC 1 uncompressed point for EC, the 32 bytes for
    /// Ed25519), parsed for every algorithm it allows. Refused when the crypto library
    /// refuses it (as it would every token signed with it).
    fn public(
        kid: Option<String>,
        kind: KeyKind,
        alg: Option<Algorithm>,
        public: &[u8],
        key: DecodingKey,
    ) -> Result<Key, String> {
        let mut parsed = Vec::new();
        for a in ALL_ALGORITHMS {
            if !(kind.fits(a) && alg.is_none_or(|x| x == a)) {
                continue;
            }
            let Some(params) = lc_algorithm(a) else {
                continue;
            };
            let k = ParsedPublicKey::new(params, public)
                .map_err(|e| format!("the key is refused by the verifier ({e})"))?;
            parsed.push((a, k));
        }
        Ok(Key {
            kid,
            kind,
            alg,
            key,
            prepared: Prepared::Public(parsed),
            fingerprint: KeyFingerprint::of(kind, alg, public),
        })
    }

    /// An HMAC key (`secret FILE`).
    fn hmac(secret: &[u8]) -> Key {
        let prepared = [
            (Algorithm::HS256, hmac::HMAC_SHA256),
            (Algorithm::HS384, hmac::HMAC_SHA384),
            (Algorithm::HS512, hmac::HMAC_SHA512),
        ]
        .into_iter()
        .map(|(a, h)| (a, hmac::Key::new(h, secret)))
        .collect();
        Key {
            kid: None,
            kind: KeyKind::Hmac,
            alg: None,
            key: DecodingKey::from_secret(secret),
            prepared: Prepared::Hmac(prepared),
            fingerprint: KeyFingerprint::of(KeyKind::Hmac, None, secret),
        }
    }

    /// What this key is (for [`KeySet::holds`]).
    pub fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint
    }

    /// Whether this key may verify a token signed with `alg`: its kind fits
    /// and, if the JWK names an algorithm, it is that one.
    pub fn allows(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }

    /// Whether `signature` (the decoded bytes) is a valid `alg` signature of `message` by
    /// this key. Always false for an algorithm the key does not allow ([`Key::allows`]:
    /// RFC 8725 3.1, the algorithm must fit the key). HMAC tags are compared in constant time.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        self.verify_prehashed(alg, message, None, signature)
    }

    /// [`Key::verify`], with the SHA-256 of `message` when the caller already has it: used
    /// for RS256, PS256 and ES256 instead of hashing `message` again. `sha256` must be the
    /// digest of `message` (crate-private so no caller can pass another one).
    pub(crate) fn verify_prehashed(
        &self,
        alg: Algorithm,
        message: &[u8],
        sha256: Option<&Digest>,
        signature: &[u8],
    ) -> bool {
        if !self.allows(alg) {
            return false;
        }
        match &self.prepared {
            Prepared::Public(keys) => {
                let Some((_, k)) = keys.iter().find(|(a, _)| *a == alg) else {
                    return false;
                };
                match sha256 {
                    Some(d) if signs_sha256(alg) => k.verify_digest_sig(d, signature).is_ok(),
                    _ => k.verify_sig(message, signature).is_ok(),
                }
            }
            Prepared::Hmac(keys) => keys
                .iter()
                .find(|(a, _)| *a == alg)
                .is_some_and(|(_, k)| hmac::verify(k, message, signature).is_ok()),
        }
    }
}

/// The keys of one provider.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

impl KeySet {
    /// Parse a JWK Set (RFC 7517 section 5): `{"keys":[...]}`.
    ///
    /// Supported: `kty` RSA (`n`, `e`), EC with `crv` P-256/P-384/P-521 (`x`, `y`),
    /// OKP with `crv` Ed25519 (`x`). Skipped silently: keys whose `use` is not
    /// `sig` or whose `key_ops` lacks `verify` (RFC 7517 sections 4.2, 4.3),
    /// keys whose `alg` is not a supported signature algorithm (e.g.
    /// encryption keys), and other key types or curves (`oct`, secp256k1, X25519,
    /// ...). A supported key with bad members is an error, as is a document
    /// with no usable key.
    pub fn from_jwks(bytes: &[u8]) -> Result<KeySet, String> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JWKS JSON: {e}"))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("invalid JWKS: no \"keys\" array")?;
        let mut keys = Vec::new();
        for (i, jwk) in list.iter().enumerate() {
            let named = |e: String| match jwk.get("kid").and_then(Value::as_str) {
                Some(kid) => format!(
                    "JWKS key #{} (kid \"{}\"): {e}",
                    i + 1,
                    crate::status::sanitize(kid)
                ),
                None => format!("JWKS key #{}: {e}", i + 1),
            };
            if let Some(key) = jwk_to_key(jwk).map_err(named)? {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err("JWKS holds no usable signature key \
                        (supported: RSA, EC P-256/P-384/P-521, OKP Ed25519)"
                .into());
        }
        Ok(KeySet { keys })
    }

    /// Parse PEM: every `PUBLIC KEY` (SubjectPublicKeyInfo, RFC 5280 section
    /// 4.1.2.7) and `CERTIFICATE` block (its subjectPublicKeyInfo; the
    /// certificate is only a container: its validity and chain are not
    /// checked). Other blocks are ignored; any private key is refused.
    pub fn from_pem(bytes: &[u8]) -> Result<KeySet, String> {
        use rustls_pki_types::pem::{PemObject, SectionKind};

        const PRIVATE: &str = "private keys do not belong here: \
                               give the public key or a certificate";
        // Catches every flavour, including those the PEM reader does not
        // decode ("ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY").
        if contains(bytes, b"PRIVATE KEY-----") {
            return Err(PRIVATE.into());
        }
        let mut keys = Vec::new();
        let mut n = 0;
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
            let (kind, der) = section.map_err(|e| format!("invalid PEM: {}", pem_error(&e)))?;
            let found = match kind {
                SectionKind::PublicKey => {
                    n += 1;
                    key_from_spki(&der).map_err(|e| format!("PEM block #{n} (PUBLIC KEY): {e}"))?
                }
                SectionKind::Certificate => {
                    n += 1;
                    key_from_certificate(&der.into())
                        .map_err(|e| format!("PEM block #{n} (CERTIFICATE): {e}"))?
                }
                SectionKind::RsaPrivateKey
                | SectionKind::PrivateKey
                | SectionKind::EcPrivateKey => return Err(PRIVATE.into()),
                _ => None,
            };
            keys.extend(found);
        }
        if keys.is_empty() {
            let hint = if contains(bytes, b"BEGIN RSA PUBLIC KEY") {
                " (PKCS#1 \"RSA PUBLIC KEY\" blocks are not supported: convert with \
                 `openssl rsa -RSAPublicKey_in -pubout`)"
            } else {
                ""
            };
            return Err(format!(
                "no usable public key: expected PEM \"PUBLIC KEY\" or \"CERTIFICATE\" \
                 blocks with RSA, EC P-256/P-384/P-521 or Ed25519 keys{hint}"
            ));
        }
        Ok(KeySet { keys })
    }

    /// Parse an x509 key map: a JSON object whose every member is a `kid` and its PEM
    /// certificate (Google's `.../robot/v1/metadata/x509/ACCOUNT` and
    /// `.../service_accounts/v1/metadata/x509/ACCOUNT`). Each certificate is only a
    /// container for its public key (validity and chain are not checked, as Google rotates
    /// the map itself); a certificate whose key type is not supported is skipped.
    pub fn from_x509_map(bytes: &[u8]) -> Result<KeySet, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;

        let doc: serde_json::Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid x509 key map JSON: {e}"))?;
        let mut keys = Vec::new();
        for (kid, pem) in &doc {
            let named = |e: String| {
                format!(
                    "x509 key map entry \"{}\": {e}",
                    crate::status::sanitize(kid)
                )
            };
            let pem = pem
                .as_str()
                .ok_or_else(|| named("not a PEM certificate string".into()))?;
            if contains(pem.as_bytes(), b"PRIVATE KEY-----") {
                return Err(named("private keys do not belong here".into()));
            }
            let der = CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| named("not a PEM certificate".into()))?;
            if let Some(mut key) = key_from_certificate(&der).map_err(named)? {
                key.kid = Some(kid.clone());
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err("x509 key map holds no usable certificate \
                        (supported: RSA, EC P-256/P-384/P-521, Ed25519 keys)"
                .into());
        }
        Ok(KeySet { keys })
    }

    /// The shape decides: a JSON object with a `keys` member is a JWKS, any other JSON
    /// object an x509 key map; anything else is read as PEM.
    pub fn load(bytes: &[u8]) -> Result<KeySet, String> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') if is_x509_map(bytes) => KeySet::from_x509_map(bytes),
            Some(b'{') => KeySet::from_jwks(bytes),
            _ => KeySet::from_pem(bytes),
        }
    }

    /// One HMAC key from the contents of a secret file, used as is except
    /// that one trailing `\n` or `\r\n` (as editors add) is removed.
    ///
    /// An empty secret gives an empty set (requests then get `NoKeys`): an
    /// empty HMAC key would let anyone mint tokens. The caller should refuse
    /// it at configuration time (`is_empty`).
    pub fn from_secret(secret: &[u8]) -> KeySet {
        let secret = secret
            .strip_suffix(b"\r\n")
            .or_else(|| secret.strip_suffix(b"\n"))
            .unwrap_or(secret);
        if secret.is_empty() {
            return KeySet::default();
        }
        KeySet {
            keys: vec![Key::hmac(secret)],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the set still holds the key with this fingerprint (a handful of keys: a scan).
    pub fn holds(&self, fp: &KeyFingerprint) -> bool {
        self.keys.iter().any(|k| k.fingerprint == *fp)
    }

    /// The algorithms some key allows (union), in `ALL_ALGORITHMS` order.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        ALL_ALGORITHMS
            .iter()
            .copied()
            .filter(|&a| self.keys.iter().any(|k| k.allows(a)))
            .collect()
    }
}

/// The algorithm with this exact (case-sensitive) JOSE name, if supported.
/// `none` is never one (RFC 8725 section 3.1).
pub fn parse_algorithm(s: &str) -> Option<Algorithm> {
    ALL_ALGORITHMS
        .iter()
        .copied()
        .find(|&a| algorithm_name(a) == s)
}

/// The JOSE name of an algorithm (RFC 7518 section 3.1, RFC 8037).
pub fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::ES512 => "ES512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "bad BEGIN line",
        Error::Base64Decode(_) => "bad base64 in a section",
        _ => "unreadable",
    }
}

// ---------------------------------------------------------------- JWK

/// One JWK to a key; `Ok(None)` = skipped (not for signatures, or not supported).
fn jwk_to_key(jwk: &Value) -> Result<Option<Key>, String> {
    let obj = jwk.as_object().ok_or("not a JSON object")?;

    // RFC 7517 4.2: "use" is "sig" for signature keys.
    match obj.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(_) => return Ok(None),
    }
    // RFC 7517 4.3: "key_ops" must allow "verify".
    match obj.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|o| o == "verify") => {}
        Some(_) => return Ok(None),
    }
    let alg = match obj.get("alg") {
        None => None,
        Some(Value::String(a)) => match parse_algorithm(a) {
            Some(a) => Some(a),
            // An encryption or unsupported algorithm: not a key for us.
            None => return Ok(None),
        },
        Some(_) => return Err("\"alg\" is not a string".into()),
    };
    let kid = match obj.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err("\"kid\" is not a string".into()),
    };
    let kty = obj
        .get("kty")
        .and_then(Value::as_str)
        .ok_or("missing \"kty\"")?;

    let (kind, public, key) = match kty {
        // RFC 7518 6.3.1
        "RSA" => {
            let n = b64_member(obj, "n")?;
            let e = b64_member(obj, "e")?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            if n.is_empty() || e.is_empty() {
                return Err("RSA \"n\" and \"e\" must not be empty".into());
            }
            check_rsa_size(n)?;
            let der = rsa_public_key_der(n, e);
            (
                KeyKind::Rsa,
                der,
                DecodingKey::from_rsa_raw_components(n, e),
            )
        }
        // RFC 7518 6.2.1: coordinates are full-length octet strings.
        "EC" => {
            let (kind, size) = match obj.get("crv").and_then(Value::as_str) {
                Some("P-256") => (KeyKind::EcP256, 32),
                Some("P-384") => (KeyKind::EcP384, 48),
                Some("P-521") => (KeyKind::EcP521, 66),
                Some(_) => return Ok(None),
                None => return Err("missing \"crv\"".into()),
            };
            let x = b64_member(obj, "x")?;
            let y = b64_member(obj, "y")?;
            // RFC 7518 6.2.1.2 wants full-length coordinates, but some issuers drop leading
            // zero bytes (1 in 256 P-521 keys has a coordinate one byte short; Google's
            // jwt_verify_lib accepts it): shorter is taken as the same number, longer refused.
            if x.is_empty() || y.is_empty() || x.len() > size || y.len() > size {
                return Err(format!("EC \"x\" and \"y\" must be {size} bytes each"));
            }
            // SEC 1 uncompressed point: 0x04 || x || y, each padded to the field size.
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            for c in [&x, &y] {
                point.resize(point.len() + size - c.len(), 0);
                point.extend_from_slice(c);
            }
            let key = DecodingKey::from_ec_der(&point);
            (kind, point, key)
        }
        // RFC 8037 2
        "OKP" => {
            match obj.get("crv").and_then(Value::as_str) {
                Some("Ed25519") => {}
                Some(_) => return Ok(None),
                None => return Err("missing \"crv\"".into()),
            }
            let x = b64_member(obj, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 \"x\" must be 32 bytes".into());
            }
            let key = DecodingKey::from_ed_der(&x);
            (KeyKind::Ed25519, x, key)
        }
        // "oct" and anything else: not accepted from a JWKS.
        _ => return Ok(None),
    };
    if let Some(a) = alg {
        if !kind.fits(a) {
            return Err(format!(
                "\"alg\" {} does not fit \"kty\" {}",
                algorithm_name(a),
                crate::status::sanitize(kty)
            ));
        }
    }
    Key::public(kid, kind, alg, &public, key).map(Some)
}

/// RSA keys outside 2048..=8192 bits are refused at load: the verifier (aws-lc, RFC 8725
/// 3.5 asks for strong keys) would refuse every token signed with one.
fn check_rsa_size(modulus: &[u8]) -> Result<(), String> {
    let n = strip_leading_zeros(modulus);
    let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "RSA key of {bits} bits: the verifier accepts 2048 to 8192 bits"
        ));
    }
    Ok(())
}

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }` (RFC 8017
/// A.1.1) in DER, from the unsigned big-endian magnitudes (leading zeros stripped).
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn push_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    fn push_integer(out: &mut Vec<u8>, magnitude: &[u8]) {
        // A set high bit would read as negative: a zero byte in front.
        let pad = magnitude.first().is_some_and(|&b| b & 0x80 != 0);
        out.push(TAG_INTEGER);
        push_len(out, magnitude.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(magnitude);
    }
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    push_integer(&mut body, n);
    push_integer(&mut body, e);
    let mut out = Vec::with_capacity(body.len() + 6);
    out.push(TAG_SEQUENCE);
    push_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// A base64url member (RFC 7515 2: no padding; trailing `=` tolerated).
fn b64_member(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let s = obj
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing \"{name}\""))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("\"{name}\" is not base64url"))
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

// ---------------------------------------------------------------- DER

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;

/// 1.2.840.113549.1.1.1 rsaEncryption (RFC 8017 A.1)
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// 1.2.840.10045.2.1 id-ecPublicKey (RFC 5480 2.1.1)
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.2.840.10045.3.1.7 prime256v1 / secp256r1 (RFC 5480 2.1.1.1)
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// 1.3.132.0.34 secp384r1 (RFC 5480 2.1.1.1)
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
/// 1.3.132.0.35 secp521r1 (RFC 5480 2.1.1.1)
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
/// 1.3.101.112 id-Ed25519 (RFC 8410 3)
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// A minimal DER reader: definite lengths, low tag numbers.
struct Der<'a> {
    data: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(data: &'a [u8]) -> Der<'a> {
        Der { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next element: (tag, contents).
    fn read(&mut self) -> Result<(u8, &'a [u8]), String> {
        let (&tag, rest) = self.data.split_first().ok_or("truncated DER")?;
        if tag & 0x1f == 0x1f {
            return Err("unsupported DER tag".into());
        }
        let (&first, mut rest) = rest.split_first().ok_or("truncated DER")?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            // 0x80 is BER's indefinite length, which DER forbids.
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err("bad DER length".into());
            }
            let (len_bytes, after) = rest.split_at(n);
            rest = after;
            len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if rest.len() < len {
            return Err("truncated DER".into());
        }
        let (contents, after) = rest.split_at(len);
        self.data = after;
        Ok((tag, contents))
    }

    /// The next element, which must have this tag.
    fn expect(&mut self, tag: u8, what: &str) -> Result<&'a [u8], String> {
        match self.read()? {
            (t, contents) if t == tag => Ok(contents),
            _ => Err(format!("bad DER: expected {what}")),
        }
    }
}

/// The key of an X.509 certificate (RFC 5280 4.1), read by rustls-webpki's certificate
/// parser (X.509 v3, DER; the validity and the chain are not checked: the certificate only
/// carries the key). `Ok(None)` for a key type we do not support.
fn key_from_certificate(der: &rustls_pki_types::CertificateDer<'_>) -> Result<Option<Key>, String> {
    let cert = webpki::EndEntityCert::try_from(der)
        .map_err(|e| format!("not a readable X.509 v3 certificate ({e})"))?;
    key_from_spki(cert.subject_public_key_info().as_ref())
}

/// Whether a JSON document is an x509 key map (an object of strings holding PEM
/// certificates) rather than a JWKS (which has a `keys` member).
fn is_x509_map(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Map<String, Value>>(bytes) {
        Ok(doc) => {
            !doc.contains_key("keys")
                && !doc.is_empty()
                && doc.values().all(|v| {
                    v.as_str()
                        .is_some_and(|s| s.contains("-----BEGIN CERTIFICATE-----"))
                })
        }
        Err(_) => false,
    }
}

/// A key from a DER SubjectPublicKeyInfo (RFC 5280 4.1.2.7); `Ok(None)` for
/// key types we do not support.
fn key_from_spki(der: &[u8]) -> Result<Option<Key>, String> {
    let mut outer = Der::new(der);
    let mut spki = Der::new(outer.expect(TAG_SEQUENCE, "SubjectPublicKeyInfo")?);
    if !outer.is_empty() {
        return Err("bad DER: trailing data".into());
    }
    let mut alg_id = Der::new(spki.expect(TAG_SEQUENCE, "AlgorithmIdentifier")?);
    let bits = spki.expect(TAG_BIT_STRING, "subjectPublicKey")?;
    let oid = alg_id.expect(TAG_OID, "algorithm OID")?;
    // The key is a whole number of bytes: no unused bits.
    let key = match bits.split_first() {
        Some((0, key)) => key,
        _ => return Err("bad DER: subjectPublicKey".into()),
    };

    let (kind, decoding_key) = if oid == OID_RSA_ENCRYPTION {
        // RFC 8017 A.1.1: RSAPublicKey ::= SEQUENCE { modulus, publicExponent }
        let mut rsa = Der::new(Der::new(key).expect(TAG_SEQUENCE, "RSAPublicKey")?);
        let n = rsa.expect(TAG_INTEGER, "RSA modulus")?;
        let e = rsa.expect(TAG_INTEGER, "RSA exponent")?;
        if strip_leading_zeros(n).is_empty() || strip_leading_zeros(e).is_empty() {
            return Err("empty RSA modulus or exponent".into());
        }
        check_rsa_size(n)?;
        (KeyKind::Rsa, DecodingKey::from_rsa_der(key))
    } else if oid == OID_EC_PUBLIC_KEY {
        // RFC 5480 2.1.1: parameters = namedCurve OID.
        let curve = alg_id.expect(TAG_OID, "EC namedCurve")?;
        let (kind, size) = if curve == OID_P256 {
            (KeyKind::EcP256, 32)
        } else if curve == OID_P384 {
            (KeyKind::EcP384, 48)
        } else if curve == OID_P521 {
            (KeyKind::EcP521, 66)
        } else {
            return Ok(None);
        };
        // RFC 5480 2.2: the uncompressed form 0x04 || x || y is what we take.
        if key.len() != 1 + 2 * size || key[0] != 0x04 {
            return Err("EC public key is not an uncompressed point of its curve".into());
        }
        (kind, DecodingKey::from_ec_der(key))
    } else if oid == OID_ED25519 {
        // RFC 8410 4: the 32 raw bytes.
        if key.len() != 32 {
            return Err("Ed25519 public key must be 32 bytes".into());
        }
        (KeyKind::Ed25519, DecodingKey::from_ed_der(key))
    } else {
        return Ok(None);
    };
    Key::public(None, kind, None, key, decoding_key).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for a in ALL_ALGORITHMS {
            assert_eq!(parse_algorithm(algorithm_name(a)), Some(a));
        }
        for bad in [
            "none", "None", "ES256K", "rs256", "HS256 ", "", "Ed25519", "ES256K",
        ] {
            assert_eq!(parse_algorithm(bad), None, "{bad}");
        }
    }

    #[test]
    fn fits() {
        use Algorithm::*;
        assert!(KeyKind::Rsa.fits(PS512));
        assert!(!KeyKind::Rsa.fits(HS256));
        assert!(KeyKind::EcP256.fits(ES256));
        assert!(!KeyKind::EcP256.fits(ES384));
        assert!(!KeyKind::EcP384.fits(ES256));
        assert!(KeyKind::Ed25519.fits(EdDSA));
        assert!(KeyKind::Hmac.fits(HS512));
        assert!(!KeyKind::Hmac.fits(RS256));
    }

    #[test]
    fn secret_trims_one_newline() {
        let s = KeySet::from_secret(b"abc\n\n");
        assert_eq!(s.keys[0].key.as_bytes(), b"abc\n");
        let s = KeySet::from_secret(b"abc\r\n");
        assert_eq!(s.keys[0].key.as_bytes(), b"abc");
        let s = KeySet::from_secret(b"abc");
        assert_eq!(s.keys[0].key.as_bytes(), b"abc");
        assert_eq!(
            s.algorithms(),
            vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]
        );
        assert!(KeySet::from_secret(b"\n").is_empty());
        assert!(KeySet::from_secret(b"").is_empty());
    }

    #[test]
    fn der_reader_rejects_garbage() {
        for bad in [
            &b""[..],
            &[0x30],
            &[0x30, 0x80, 0x00, 0x00],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x05, 0x01],
            &[0x1f, 0x01, 0x00],
            &[0x30, 0x00],
            &[0x30, 0x02, 0x30, 0x00],
        ] {
            assert!(key_from_spki(bad).is_err(), "{bad:?}");
            assert!(
                key_from_certificate(&bad.to_vec().into()).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn jwks_errors() {
        assert!(KeySet::from_jwks(b"not json").is_err());
        assert!(KeySet::from_jwks(b"{}").is_err());
        assert!(KeySet::from_jwks(br#"{"keys":[]}"#).is_err());
        assert!(KeySet::from_jwks(br#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#).is_err());
        assert!(KeySet::from_jwks(br#"{"keys":[{"kty":"RSA","n":"","e":"AQAB"}]}"#).is_err());
        assert!(KeySet::from_jwks(br#"{"keys":[{"kty":"RSA","n":"!!","e":"AQAB"}]}"#).is_err());
        // x too short for P-256
        assert!(KeySet::from_jwks(
            br#"{"keys":[{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA"}]}"#
        )
        .is_err());
        assert!(
            KeySet::from_jwks(br#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#).is_err()
        );
        // alg that does not fit kty
        let x = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let doc =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","alg":"RS256"}}]}}"#);
        assert!(KeySet::from_jwks(doc.as_bytes()).is_err());
        let doc = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":7}}]}}"#);
        assert!(KeySet::from_jwks(doc.as_bytes()).is_err());
        // key_ops without verify: skipped, so no usable key
        let doc =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","key_ops":["sign"]}}]}}"#);
        assert!(KeySet::from_jwks(doc.as_bytes()).is_err());
        let doc = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","key_ops":["verify"]}}]}}"#
        );
        assert_eq!(KeySet::from_jwks(doc.as_bytes()).unwrap().keys.len(), 1);
    }
}
