"""Checks of the test harness itself (no module needed): if these fail, the other results mean nothing."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from mesh_test.client import bearer
from mesh_test.nginx import NGINX_BIN, nginx_built_with, nginx_t, render
from mesh_test.tokens import (
    HMAC_ALGS,
    KID_EC256,
    RSA_ALGS,
    b64url_decode,
    make_token,
)

PLAIN_HTTP = """
server {
    listen 127.0.0.1:@PORT@;
    location / { proxy_pass http://@UPSTREAM@; }
}
"""

_H = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def _verify(alg, ring, token):
    h64, p64, s64 = token.split(".")
    data = f"{h64}.{p64}".encode()
    sig = b64url_decode(s64)
    bits = alg[2:]
    if alg.startswith("RS"):
        ring.rsa.public_key().verify(sig, data, padding.PKCS1v15(), _H[bits]())
    elif alg.startswith("PS"):
        h = _H[bits]()
        ring.rsa.public_key().verify(sig, data, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
    elif alg.startswith("ES"):
        key = ring.ec256 if bits == "256" else ring.ec384
        n = len(sig) // 2
        assert len(sig) == {"256": 64, "384": 96}[bits], "JWS ECDSA signatures are raw r||s"
        der = encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
        key.public_key().verify(der, data, ec.ECDSA(_H[bits]()))
    elif alg == "EdDSA":
        ring.ed25519.public_key().verify(sig, data)
    else:
        expect = hmac.new(ring.hmac_secret, data, getattr(hashlib, f"sha{bits}")).digest()
        assert hmac.compare_digest(expect, sig)


@pytest.mark.parametrize("alg", RSA_ALGS + ["ES256", "ES384", "EdDSA"] + HMAC_ALGS)
def test_minted_tokens_verify_with_an_independent_library(keyring, alg):
    key = {
        "ES256": keyring.ec256,
        "ES384": keyring.ec384,
        "EdDSA": keyring.ed25519,
    }.get(alg, keyring.hmac_secret if alg.startswith("HS") else keyring.rsa)
    token = make_token(alg, key, {"sub": "x", "exp": 1}, kid="k")
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": alg, "typ": "JWT", "kid": "k"}
    assert "=" not in token
    _verify(alg, keyring, token)


def test_key_files_are_written(keyring):
    jwks = json.loads(keyring.jwks_path.read_text())
    assert {k["kty"] for k in jwks["keys"]} == {"RSA", "EC", "OKP"}
    assert KID_EC256 in {k["kid"] for k in jwks["keys"]}
    serialization.load_pem_public_key(keyring.rsa_pub_pem())
    assert b"BEGIN CERTIFICATE" in keyring.rsa_cert_path.read_bytes()


def test_header_overrides_and_raw_segments(keyring):
    t = make_token("RS256", keyring.rsa, {"a": 1}, kid="x", header_overrides={"typ": None, "crit": ["exp"]})
    assert json.loads(b64url_decode(t.split(".")[0])) == {"alg": "RS256", "kid": "x", "crit": ["exp"]}
    t = make_token("RS256", None, None, raw_payload_bytes=b"\xff\xfe")
    assert b64url_decode(t.split(".")[1]) == b"\xff\xfe" and t.endswith(".")


def test_echo_upstream_through_plain_nginx(launcher_fn, echo):
    site = launcher_fn.start(PLAIN_HTTP, with_module=False)
    before = echo.requests
    resp = site.get("/p?q=1", [("X-Dup", "a"), ("X-Dup", "b")] + bearer("t"))
    assert resp.status == 200
    body = resp.json()
    assert body["method"] == "GET" and body["path"] == "/p?q=1"
    assert resp.upstream_headers("X-Dup") == ["a", "b"]
    assert resp.upstream_header("Authorization") == "Bearer t"
    assert echo.requests == before + 1


def test_nginx_t_reports_file_and_line(conf_dir):
    tmp = conf_dir
    conf = render(PLAIN_HTTP + "bogus_directive 1;  # BAD\n", tmp, port=1, upstream="127.0.0.1:2",
                  keys=tmp, with_module=False)
    rc, out, path = nginx_t(conf, tmp)
    assert rc != 0 and "[emerg]" in out
    line = conf.splitlines().index("bogus_directive 1;  # BAD") + 1
    assert f"{path}:{line}" in out, out


def test_nginx_has_the_modules_the_suite_uses():
    # auth_request subrequests are where header-list edits go wrong; not in nginx's default
    # build, so `make build-vendored` configures the 1.28 binary with it
    assert nginx_built_with("--with-http_auth_request_module"), (
        f"{NGINX_BIN} was built without --with-http_auth_request_module (make build-vendored adds it)")
