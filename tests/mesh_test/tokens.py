"""Keys, key files and hand-built JWS compact tokens (so adversarial ones can be built too)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

# kids published in jwks.json
KID_RSA = "rsa-1"
KID_EC256 = "ec256-1"
KID_EC384 = "ec384-1"
KID_ED25519 = "ed25519-1"
KID_RSA_RS256_ONLY = "rsa-rs256-only"  # in jwks-alg.json, with "alg": "RS256"

_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_HASHLIB = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}

RSA_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
HMAC_ALGS = ["HS256", "HS384", "HS512"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int, length: int | None = None) -> bytes:
    if length is None:
        length = (value.bit_length() + 7) // 8
    return value.to_bytes(length, "big")


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


@dataclass
class Keyring:
    """Every key the suite signs with, and the files nginx reads them from."""

    dir: Path
    rsa: rsa.RSAPrivateKey
    rsa_attacker: rsa.RSAPrivateKey  # never published anywhere
    ec256: ec.EllipticCurvePrivateKey
    ec384: ec.EllipticCurvePrivateKey
    ed25519: ed25519.Ed25519PrivateKey
    hmac_secret: bytes

    @property
    def jwks_path(self) -> Path:
        return self.dir / "jwks.json"

    @property
    def rsa_pub_pem_path(self) -> Path:
        return self.dir / "rsa.pub.pem"

    @property
    def rsa_cert_path(self) -> Path:
        return self.dir / "rsa.cert.pem"

    @property
    def hmac_path(self) -> Path:
        return self.dir / "hmac.secret"

    def rsa_pub_pem(self) -> bytes:
        return self.rsa_pub_pem_path.read_bytes()


def _rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict:
    nums = key.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "use": "sig", "n": b64url(_int_bytes(nums.n)), "e": b64url(_int_bytes(nums.e))}


def _ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict:
    nums = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
    return {
        "kty": "EC",
        "kid": kid,
        "use": "sig",
        "crv": crv,
        "x": b64url(_int_bytes(nums.x, size)),
        "y": b64url(_int_bytes(nums.y, size)),
    }


def _okp_jwk(key: ed25519.Ed25519PrivateKey, kid: str) -> dict:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "kid": kid, "use": "sig", "crv": "Ed25519", "x": b64url(raw)}


def public_jwk(key, kid: str) -> dict:
    if isinstance(key, rsa.RSAPrivateKey):
        return _rsa_jwk(key, kid)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _ec_jwk(key, kid)
    return _okp_jwk(key, kid)


def _spki_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _self_signed_cert(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ngx-mesh test issuer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_keyring(directory: Path) -> Keyring:
    directory.mkdir(parents=True, exist_ok=True)
    ring = Keyring(
        dir=directory,
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_attacker=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec256=ec.generate_private_key(ec.SECP256R1()),
        ec384=ec.generate_private_key(ec.SECP384R1()),
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        # 64 printable bytes, no trailing newline: long enough for HS512 (RFC 7518 3.2)
        hmac_secret=secrets.token_hex(32).encode("ascii"),
    )
    jwks = {
        "keys": [
            _rsa_jwk(ring.rsa, KID_RSA),
            _ec_jwk(ring.ec256, KID_EC256),
            _ec_jwk(ring.ec384, KID_EC384),
            _okp_jwk(ring.ed25519, KID_ED25519),
        ]
    }
    (directory / "jwks.json").write_text(json.dumps(jwks, indent=2))
    (directory / "rsa.pub.pem").write_bytes(_spki_pem(ring.rsa))
    (directory / "rsa.cert.pem").write_bytes(_self_signed_cert(ring.rsa))
    (directory / "ec256.pub.pem").write_bytes(_spki_pem(ring.ec256))
    (directory / "ec384.pub.pem").write_bytes(_spki_pem(ring.ec384))
    (directory / "ed25519.pub.pem").write_bytes(_spki_pem(ring.ed25519))
    (directory / "hmac.secret").write_bytes(ring.hmac_secret)
    # one PEM file with several keys: a certificate and two public keys of other types
    (directory / "bundle.pem").write_bytes(
        _spki_pem(ring.ec256) + _self_signed_cert(ring.rsa) + _spki_pem(ring.ed25519)
    )
    # a JWKS whose only key is restricted by its "alg" member
    restricted = dict(_rsa_jwk(ring.rsa, KID_RSA_RS256_ONLY), alg="RS256")
    (directory / "jwks-alg.json").write_text(json.dumps({"keys": [restricted]}, indent=2))
    (directory / "garbage.pem").write_bytes(b"this is not a key\n\x00\x01\x02 nor JSON {\n")
    for p in directory.iterdir():
        os.chmod(p, 0o644)
    return ring


def sign(alg: str, key, data: bytes) -> bytes:
    """The JWS signature of `data` (ES* as raw r||s, PS* with salt length = hash length)."""
    family, bits = alg[:2], alg[2:]
    if alg == "EdDSA":
        return key.sign(data)
    if family == "HS":
        return hmac.new(key, data, _HASHLIB[bits]).digest()
    h = _HASHES[bits]()
    if family == "RS":
        return key.sign(data, padding.PKCS1v15(), h)
    if family == "PS":
        return key.sign(data, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
    if family == "ES":
        der = key.sign(data, ec.ECDSA(h))
        r, s = decode_dss_signature(der)
        size = (key.curve.key_size + 7) // 8
        return _int_bytes(r, size) + _int_bytes(s, size)
    raise ValueError(f"unknown alg {alg}")


def sign_der_ecdsa(alg: str, key, data: bytes) -> bytes:
    """An ECDSA signature in ASN.1 DER (what JWS must NOT accept)."""
    return key.sign(data, ec.ECDSA(_HASHES[alg[2:]]()))


_UNSET = object()


def make_token(
    alg: str,
    key,
    claims: dict | None = None,
    *,
    kid: str | None = None,
    header_overrides: dict | None = None,
    raw_header_bytes: bytes | None = None,
    raw_payload_bytes: bytes | None = None,
    signature_override: bytes | str | None = None,
    sign_alg: str | None = None,
) -> str:
    """Build a JWS compact serialization by hand.

    header = {"alg": alg, "typ": "JWT", "kid": kid?} updated by header_overrides (a value of None
    removes that member). The signature is made with `sign_alg` (default `alg`) and `key`; `key`
    None gives an empty signature. signature_override replaces the signature (bytes are base64url
    encoded, a str is used verbatim).
    """
    header: dict = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    for name, value in (header_overrides or {}).items():
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    header_b = raw_header_bytes if raw_header_bytes is not None else json_bytes(header)
    payload_b = raw_payload_bytes if raw_payload_bytes is not None else json_bytes(claims or {})
    signing_input = f"{b64url(header_b)}.{b64url(payload_b)}"
    if signature_override is not None:
        sig = signature_override if isinstance(signature_override, str) else b64url(signature_override)
    elif key is None:
        sig = ""
    else:
        sig = b64url(sign(sign_alg or alg, key, signing_input.encode("ascii")))
    return f"{signing_input}.{sig}"


def now() -> int:
    return int(time.time())


def key_for(ring: Keyring, alg: str):
    """(signing key, kid in jwks.json) for an algorithm."""
    if alg in RSA_ALGS:
        return ring.rsa, KID_RSA
    if alg == "ES256":
        return ring.ec256, KID_EC256
    if alg == "ES384":
        return ring.ec384, KID_EC384
    if alg == "EdDSA":
        return ring.ed25519, KID_ED25519
    if alg in HMAC_ALGS:
        return ring.hmac_secret, None
    raise ValueError(alg)


def jwks_token(ring: Keyring, claims: dict, alg: str = "RS256", **kw) -> str:
    """A token signed with the jwks.json key for alg, naming its kid."""
    key, kid = key_for(ring, alg)
    kw.setdefault("kid", kid)
    return make_token(alg, key, claims, **kw)
