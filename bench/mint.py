#!/usr/bin/env python3
"""Mints the benchmark's key material and tokens into DIR.

Usage: mint.py DIR COUNT [HS_COUNT]

Writes:
  DIR/jwks.json        the provider's public keys: RSA 2048 (kid "bench-rs") and EC P-256
                       (kid "bench-es")
  DIR/cached.txt       one RS256 token (the "cached" variant sends it on every request)
  DIR/rs256.txt        COUNT distinct RS256 tokens, one per line
  DIR/es256.txt        COUNT distinct ES256 tokens, one per line
  DIR/hs.secret        an HMAC secret, and DIR/hs256.txt: HS_COUNT distinct HS256 tokens
                       (issuer https://hs.bench.local; default 0), for the memory check

Every token: iss https://bench.local, aud bench, a distinct sub and jti, iat now, exp now + 1 h.
ES256 signatures are raw r||s (RFC 7518 3.4), not DER. RSA signing is slow in Python
(~1 ms a token), so it is spread over every core.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://bench.local"
AUDIENCE = "bench"
KID_RS = "bench-rs"
KID_ES = "bench-es"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def uint(value: int, length: int) -> str:
    return b64url(value.to_bytes(length, "big"))


def claims(kind: str, i: int, now: int) -> dict:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"svc-{kind}-{i:05d}@bench.local",
        "jti": f"{kind}-{i}-{now}",
        "iat": now,
        "exp": now + 3600,
    }


def sign_rs256(key_pem: bytes, start: int, stop: int, now: int) -> list[str]:
    key = serialization.load_pem_private_key(key_pem, password=None)
    header = b64url(compact({"alg": "RS256", "typ": "JWT", "kid": KID_RS}))
    out = []
    for i in range(start, stop):
        signing_input = f"{header}.{b64url(compact(claims('rs', i, now)))}"
        sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        out.append(f"{signing_input}.{b64url(sig)}")
    return out


def sign_es256(key: ec.EllipticCurvePrivateKey, count: int, now: int) -> list[str]:
    header = b64url(compact({"alg": "ES256", "typ": "JWT", "kid": KID_ES}))
    out = []
    for i in range(count):
        signing_input = f"{header}.{b64url(compact(claims('es', i, now)))}"
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        out.append(f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
    return out


def mint_hs256(out: Path, count: int, now: int) -> None:
    import hashlib
    import hmac

    secret = os.urandom(32).hex().encode()
    (out / "hs.secret").write_bytes(secret)
    header = b64url(compact({"alg": "HS256", "typ": "JWT"}))
    with open(out / "hs256.txt", "w") as f:
        for i in range(count):
            body = {"iss": "https://hs.bench.local", "aud": AUDIENCE, "sub": f"svc-hs-{i}",
                    "iat": now, "exp": now + 3600}
            signing_input = f"{header}.{b64url(compact(body))}"
            sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
            f.write(f"{signing_input}.{b64url(sig)}\n")


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: mint.py DIR COUNT [HS_COUNT]")
    out, count = Path(sys.argv[1]), int(sys.argv[2])
    hs_count = int(sys.argv[3]) if len(sys.argv) == 4 else 0
    out.mkdir(parents=True, exist_ok=True)
    now = int(time.time())

    rs_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    es_key = ec.generate_private_key(ec.SECP256R1())
    rs_pub = rs_key.public_key().public_numbers()
    es_pub = es_key.public_key().public_numbers()
    jwks = {
        "keys": [
            {"kty": "RSA", "kid": KID_RS, "use": "sig", "alg": "RS256",
             "n": uint(rs_pub.n, 256), "e": uint(rs_pub.e, 3)},
            {"kty": "EC", "kid": KID_ES, "use": "sig", "alg": "ES256", "crv": "P-256",
             "x": uint(es_pub.x, 32), "y": uint(es_pub.y, 32)},
        ]
    }
    (out / "jwks.json").write_text(json.dumps(jwks, indent=1) + "\n")

    # RS256: COUNT rotating tokens plus the cached one (index COUNT), in parallel chunks.
    pem = rs_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    workers = os.cpu_count() or 1
    bounds = [count * w // workers for w in range(workers)] + [count + 1]
    with ProcessPoolExecutor(workers) as pool:
        chunks = pool.map(sign_rs256, [pem] * workers, bounds[:-1], bounds[1:], [now] * workers)
        rs = [t for chunk in chunks for t in chunk]
    (out / "rs256.txt").write_text("\n".join(rs[:count]) + "\n")
    (out / "cached.txt").write_text(rs[count] + "\n")
    (out / "es256.txt").write_text("\n".join(sign_es256(es_key, count, now)) + "\n")
    mint_hs256(out, hs_count, now)


if __name__ == "__main__":
    main()
