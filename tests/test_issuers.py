"""Tokens from the issuers Cloud Run services meet: audiences with a trailing slash, ES512
(P-521) keys from JWKS and PEM files.

Every token is signed here with a real key; every answer is checked as a user would (200 with
the caller at the upstream, or 401 with its exact `$mesh_auth_status`).
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_test.client import bearer
from mesh_test.configs import claims
from mesh_test.tokens import make_token, public_jwk, jwks_token

RUN_URL = "https://orders-abc123-uc.a.run.app"
ISS_RUN = "https://run.mesh.test"
ISS_PLAIN = "https://plain.mesh.test"
ISS_ES512 = "https://es512.mesh.test"
ISS_ES512_PEM = "https://es512-pem.mesh.test"
KID_P521 = "p521-1"


@pytest.fixture(scope="module")
def p521():
    return ec.generate_private_key(ec.SECP521R1())


def _files(p521) -> dict[str, bytes]:
    pem = p521.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "p521.jwks.json": json.dumps({"keys": [public_jwk(p521, KID_P521)]}).encode(),
        "p521.pub.pem": pem,
    }


HTTP = f"""
mesh_provider run_url {{
    issuer   {ISS_RUN};
    keys     @KEYS@/jwks.json;
    audience {RUN_URL} https://billing-abc123-uc.a.run.app/;
}}
mesh_provider plain_aud {{
    issuer   {ISS_PLAIN};
    keys     @KEYS@/jwks.json;
    audience orders http://orders.internal;
}}
mesh_provider es512_jwks {{
    issuer {ISS_ES512};
    keys   @TMP@/p521.jwks.json;
}}
mesh_provider es512_pem {{
    issuer     {ISS_ES512_PEM};
    keys       @TMP@/p521.pub.pem;
    algorithms ES512;
}}
server {{
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller   $mesh_caller;
    proxy_set_header X-Test-Provider $mesh_provider;
    mesh_auth run_url plain_aud es512_jwks es512_pem;
    location / {{ proxy_pass http://@UPSTREAM@; }}
}}
"""


@pytest.fixture(scope="module")
def site(module_path, launcher, p521):
    return launcher.start(HTTP, files=_files(p521))


# ---------------------------------------------------------------- audiences

@pytest.mark.parametrize("aud", [RUN_URL, RUN_URL + "/", "https://billing-abc123-uc.a.run.app",
                                 "https://billing-abc123-uc.a.run.app/", ["x", RUN_URL + "/"]])
def test_an_https_audience_matches_with_or_without_one_trailing_slash(site, keyring, aud):
    resp = site.allowed("/a", bearer(jwks_token(keyring, claims(iss=ISS_RUN, aud=aud))))
    assert resp.upstream_header("X-Test-Provider") == "run_url"


@pytest.mark.parametrize("iss,aud", [
    (ISS_RUN, RUN_URL + "//"),
    (ISS_RUN, RUN_URL + "/orders"),
    (ISS_RUN, RUN_URL.replace("https://", "http://") + "/"),
    (ISS_RUN, RUN_URL.upper()),
    (ISS_PLAIN, "orders/"),
    (ISS_PLAIN, "http://orders.internal/"),
], ids=["two-slashes", "a-path", "http-scheme", "upper-case", "plain-with-slash", "http-url-with-slash"])
def test_anything_else_must_match_exactly(site, keyring, iss, aud):
    token = jwks_token(keyring, claims(iss=iss, aud=aud))
    site.refused("/a", bearer(token), "wrong_audience", token=token)


def test_a_plain_audience_still_matches_itself(site, keyring):
    site.allowed("/a", bearer(jwks_token(keyring, claims(iss=ISS_PLAIN, aud="http://orders.internal"))))


# ---------------------------------------------------------------- ES512

@pytest.mark.parametrize("iss,kid,provider", [
    (ISS_ES512, KID_P521, "es512_jwks"),
    (ISS_ES512, None, "es512_jwks"),
    (ISS_ES512_PEM, None, "es512_pem"),
], ids=["jwks-kid", "jwks-no-kid", "pem"])
def test_es512_tokens_verify_with_p521_keys(site, p521, iss, kid, provider):
    resp = site.allowed("/es512", bearer(make_token("ES512", p521, claims(iss=iss, aud=None), kid=kid)))
    assert resp.upstream_header("X-Test-Provider") == provider
    assert resp.upstream_header("X-Test-Caller") == "svc-orders-caller-51d"


def test_es512_with_a_wrong_signature_or_another_key_is_refused(site, p521, keyring):
    c = claims(iss=ISS_ES512, aud=None)
    other = make_token("ES512", ec.generate_private_key(ec.SECP521R1()), c, kid=KID_P521)
    site.refused("/es512", bearer(other), "bad_signature", token=other)
    # the P-521 key verifies ES512 only
    es384 = make_token("ES384", keyring.ec384, c, kid=KID_P521)
    site.refused("/es512", bearer(es384), "bad_signature", token=es384)
