"""The adversarial corpus: every bad token gets 401 with the exact $mesh_auth_status, never reaches
the upstream, is logged once at info, and is never echoed in a header or in error.log."""

from __future__ import annotations

import json
import re
import time

import pytest

from mesh_test.client import bearer
from mesh_test.configs import (
    ISS_ES_ONLY,
    ISS_HMAC,
    ISS_JWKS,
    ISS_PEM_CERT,
    ISS_PEM_RSA,
    claims,
    identity_http,
)
from mesh_test.tokens import (
    KID_EC256,
    KID_EC384,
    KID_RSA,
    b64url,
    json_bytes,
    jwks_token,
    make_token,
    now,
    public_jwk,
    sign,
    sign_der_ecdsa,
)
from mesh_test.upstream import Tripwire


@pytest.fixture(scope="module")
def site(module_path, launcher):
    return launcher.start(identity_http())


def _valid(ring, **kw):
    return jwks_token(ring, claims(), "RS256", **kw)


def _signed_raw_payload(ring, payload: bytes) -> str:
    return make_token("RS256", ring.rsa, None, kid=KID_RSA, raw_payload_bytes=payload)


def _nested(depth: int):
    value: object = "leaf"
    for _ in range(depth):
        value = {"n": value}
    return value


def _oversize(ring):
    c = claims(pad="x" * 13000)
    token = _valid_with(ring, c)
    assert len(token) > 16 * 1024
    return token


def _valid_with(ring, c, alg="RS256", **kw):
    return jwks_token(ring, c, alg, **kw)


def _replace_segment(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def _flip_signature(token: str) -> str:
    h, p, s = token.split(".")
    mid = len(s) // 2
    s = s[:mid] + ("A" if s[mid] != "A" else "B") + s[mid + 1 :]
    return f"{h}.{p}.{s}"


def _swap_payload(ring) -> str:
    """Signed for one subject, then the payload replaced by another (signature no longer fits)."""
    token = _valid_with(ring, claims(sub="svc-honest"))
    return _replace_segment(token, 1, b64url(json_bytes(claims(sub="svc-admin"))))


def _der_es256(ring) -> str:
    header = b64url(json_bytes({"alg": "ES256", "typ": "JWT", "kid": KID_EC256}))
    payload = b64url(json_bytes(claims()))
    der = sign_der_ecdsa("ES256", ring.ec256, f"{header}.{payload}".encode())
    return f"{header}.{payload}.{b64url(der)}"


def _embedded_jwk(ring, kid):
    """Signed by a key the provider never published, which the header carries as `jwk`."""
    return make_token(
        "RS256", ring.rsa_attacker, claims(), kid=kid,
        header_overrides={"jwk": public_jwk(ring.rsa_attacker, kid or "attacker")},
    )


# (id, build(ring) -> token, expected $mesh_auth_status)
CORPUS = [
    # ---- malformed
    ("token-over-16KiB", _oversize, "malformed"),
    ("two-segments", lambda r: ".".join(_valid(r).split(".")[:2]), "malformed"),
    ("five-segments-jwe-shape", lambda r: _valid(r) + ".AAAA.BBBB", "malformed"),
    ("four-segments", lambda r: _valid(r) + ".AAAA", "malformed"),
    ("empty-segments", lambda r: "..", "malformed"),
    ("header-bad-base64", lambda r: _replace_segment(_valid(r), 0, "eyJ!!!*%"), "malformed"),
    ("payload-bad-base64", lambda r: _replace_segment(_valid(r), 1, "e30*$$"), "malformed"),
    ("header-not-json", lambda r: make_token("RS256", r.rsa, claims(), raw_header_bytes=b"RS256 rsa-1"), "malformed"),
    ("header-json-array", lambda r: make_token("RS256", r.rsa, claims(), raw_header_bytes=b'["RS256"]'), "malformed"),
    ("payload-not-json", lambda r: _signed_raw_payload(r, b"sub=svc-x; exp=9999999999"), "malformed"),
    ("payload-json-array", lambda r: _signed_raw_payload(r, b'["sub", "exp"]'), "malformed"),
    ("payload-invalid-utf8", lambda r: _signed_raw_payload(
        r, b'{"iss":"https://jwks.mesh.test","sub":"svc-\xff\xfe","aud":"aud-orders-7f3","exp":%d}' % (now() + 300)
    ), "malformed"),
    ("header-invalid-utf8", lambda r: make_token(
        "RS256", r.rsa, claims(), raw_header_bytes=b'{"alg":"RS256","kid":"rsa-1","x":"\xc3\x28"}'
    ), "malformed"),
    ("claims-nested-100-deep", lambda r: _valid_with(r, claims(ctx=_nested(100))), "malformed"),
    ("claims-nested-40-arrays-deep", lambda r: _signed_raw_payload(
        r, json_bytes(claims())[:-1] + b',"a":' + b"[" * 40 + b"]" * 40 + b"}"
    ), "malformed"),
    ("crit-naming-exp", lambda r: _valid(r, header_overrides={"crit": ["exp"]}), "malformed"),
    ("crit-unknown-extension", lambda r: _valid(r, header_overrides={"crit": ["x-ext"], "x-ext": 1}), "malformed"),
    ("exp-missing", lambda r: _valid_with(r, claims(exp=None)), "malformed"),
    # ---- bad_signature
    ("alg-none-empty-signature", lambda r: make_token("none", None, claims(), kid=KID_RSA), "bad_signature"),
    ("alg-none-no-kid", lambda r: make_token("none", None, claims()), "bad_signature"),
    ("alg-none-with-signature", lambda r: make_token("none", r.rsa, claims(), kid=KID_RSA, sign_alg="RS256"),
     "bad_signature"),
    ("hs256-with-rsa-pem-as-secret-pem-provider", lambda r: make_token(
        "HS256", r.rsa_pub_pem(), claims(iss=ISS_PEM_RSA, aud=None)), "bad_signature"),
    ("hs256-with-rsa-pem-as-secret-jwks-kid", lambda r: make_token(
        "HS256", r.rsa_pub_pem(), claims(), kid=KID_RSA), "bad_signature"),
    ("hs256-with-certificate-as-secret", lambda r: make_token(
        "HS256", r.rsa_cert_path.read_bytes(), claims(iss=ISS_PEM_CERT, aud=None)), "bad_signature"),
    ("rs256-against-hmac-provider", lambda r: make_token("RS256", r.rsa, claims(iss=ISS_HMAC, aud=None)),
     "bad_signature"),
    ("es256-naming-an-rsa-kid", lambda r: make_token("ES256", r.ec256, claims(), kid=KID_RSA), "bad_signature"),
    ("rs256-naming-an-ec-kid", lambda r: make_token("RS256", r.rsa, claims(), kid=KID_EC256), "bad_signature"),
    ("eddsa-naming-an-rsa-kid", lambda r: make_token("EdDSA", r.ed25519, claims(), kid=KID_RSA), "bad_signature"),
    ("es256-naming-a-p384-kid", lambda r: make_token("ES256", r.ec384, claims(), kid=KID_EC384), "bad_signature"),
    ("alg-outside-provider-allowlist", lambda r: _valid_with(r, claims(iss=ISS_ES_ONLY, aud=None)), "bad_signature"),
    ("signature-bit-flipped", lambda r: _flip_signature(_valid(r)), "bad_signature"),
    ("signature-empty", lambda r: make_token("RS256", None, claims(), kid=KID_RSA), "bad_signature"),
    ("signed-by-another-key-same-kid", lambda r: make_token("RS256", r.rsa_attacker, claims(), kid=KID_RSA),
     "bad_signature"),
    ("payload-swapped-after-signing", _swap_payload, "bad_signature"),
    ("es256-der-signature", _der_es256, "bad_signature"),
    ("embedded-jwk-with-published-kid", lambda r: _embedded_jwk(r, KID_RSA), "bad_signature"),
    ("ps256-header-rs256-signature", lambda r: make_token("PS256", r.rsa, claims(), kid=KID_RSA, sign_alg="RS256"),
     "bad_signature"),
    # ---- unknown_key
    ("unknown-kid", lambda r: _valid(r, kid="rsa-2"), "unknown_key"),
    ("kid-path-traversal", lambda r: _valid(r, kid="../../etc/passwd"), "unknown_key"),
    ("kid-absolute-path", lambda r: _valid(r, kid="/etc/passwd"), "unknown_key"),
    ("embedded-jwk-with-its-own-kid", lambda r: _embedded_jwk(r, "attacker-1"), "unknown_key"),
    # ---- time
    ("expired", lambda r: _valid_with(r, claims(exp=now() - 120, iat=now() - 600)), "expired"),
    ("expired-long-ago", lambda r: _valid_with(r, claims(exp=1, iat=0)), "expired"),
    ("nbf-in-the-future", lambda r: _valid_with(r, claims(nbf=now() + 120)), "not_yet_valid"),
    ("iat-in-the-future", lambda r: _valid_with(r, claims(iat=now() + 120)), "not_yet_valid"),
    # ---- issuer, audience, claims
    ("unknown-issuer", lambda r: _valid_with(r, claims(iss="https://evil.mesh.test")), "wrong_issuer"),
    ("issuer-trailing-slash", lambda r: _valid_with(r, claims(iss=ISS_JWKS + "/")), "wrong_issuer"),
    ("issuer-other-case", lambda r: _valid_with(r, claims(iss=ISS_JWKS.upper())), "wrong_issuer"),
    ("issuer-missing", lambda r: _valid_with(r, claims(iss=None)), "wrong_issuer"),
    ("audience-other", lambda r: _valid_with(r, claims(aud="aud-payments-7f3")), "wrong_audience"),
    ("audience-prefix-of-accepted", lambda r: _valid_with(r, claims(aud="aud-orders")), "wrong_audience"),
    ("audience-array-without-match", lambda r: _valid_with(r, claims(aud=["aud-a-1", "aud-b-2"])), "wrong_audience"),
    ("audience-missing", lambda r: _valid_with(r, claims(aud=None)), "wrong_audience"),
    ("principal-sub-missing", lambda r: _valid_with(r, claims(sub=None)), "claim_mismatch"),
]


@pytest.mark.parametrize("build,status", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_token_is_refused_with_its_status(site, keyring, build, status):
    token = build(keyring)
    site.refused("/corpus", bearer(token), status, token=token)


XSA_CASES = [c for c in CORPUS if c[0] in {
    "token-over-16KiB", "two-segments", "payload-invalid-utf8", "alg-none-empty-signature",
    "hs256-with-rsa-pem-as-secret-pem-provider", "signature-bit-flipped", "kid-path-traversal", "expired",
    "nbf-in-the-future", "unknown-issuer", "audience-other", "principal-sub-missing",
}]


@pytest.mark.parametrize("build,status", [c[1:] for c in XSA_CASES], ids=[c[0] for c in XSA_CASES])
def test_bad_token_in_x_serverless_authorization_is_refused(site, keyring, build, status):
    token = build(keyring)
    site.refused("/corpus-xsa", [("X-Serverless-Authorization", f"Bearer {token}")], status, token=token)


@pytest.mark.parametrize("alg", ["NONE", "None", "nOnE"])
def test_alg_none_in_any_case_is_refused(site, keyring, alg):
    # not an algorithm name at all (names are case-sensitive): bad_signature, as for "none"
    token = make_token(alg, None, claims(), kid=KID_RSA)
    site.refused("/none", bearer(token), "bad_signature", token=token)


# ---------------------------------------------------------------- headers, schemes

def test_no_authorization_header_is_missing(site):
    site.refused("/h", None, "missing")


def test_basic_authorization_is_missing(site):
    site.refused("/h", [("Authorization", "Basic c3ZjOnBhc3N3b3Jk")], "missing")


def test_bearer_without_a_token_is_malformed(site):
    site.refused("/h", [("Authorization", "Bearer")], "malformed")
    site.refused("/h", [("Authorization", "Bearer    ")], "malformed")


def test_non_ascii_bytes_in_the_token_are_malformed(site, keyring):
    token = _valid(keyring)
    raw = token.encode()[:20] + b"\xc3\xa9\xff" + token.encode()[20:]
    site.refused("/h", bearer(raw), "malformed", token=raw)


@pytest.mark.parametrize("second", ["valid", "expired", "garbage"])
def test_two_authorization_headers_never_reach_the_upstream(site, keyring, second):
    first = _valid(keyring)
    other = {
        "valid": _valid(keyring),
        "expired": _valid_with(keyring, claims(exp=now() - 600, iat=now() - 900)),
        "garbage": "not-a-token",
    }[second]
    before = site.echo.requests
    resp = site.get("/dup", bearer(first) + bearer(other))
    # nginx itself refuses a second Authorization header (both 1.22 and 1.28)
    assert resp.status == 400, resp
    assert site.echo.requests == before


def test_jku_x5u_and_jwk_headers_are_never_fetched(site, keyring):
    wire = Tripwire()
    try:
        url = f"http://127.0.0.1:{wire.port}"
        token = _valid(keyring, header_overrides={
            "jku": f"{url}/jwks.json",
            "x5u": f"{url}/cert.pem",
            "jwk": public_jwk(keyring.rsa, KID_RSA),
        })
        site.allowed("/jku", bearer(token))
        # and an attacker's: signed by its own key, pointing at its own keys
        evil = make_token("RS256", keyring.rsa_attacker, claims(), kid="evil-1", header_overrides={
            "jku": f"{url}/jwks.json", "x5u": f"{url}/cert.pem",
        })
        site.refused("/jku", bearer(evil), "unknown_key", token=evil)
        time.sleep(1.0)  # a background fetch, if any, would have connected by now
        assert wire.connections == 0, "nginx connected to a URL named in a token header"
    finally:
        wire.close()


def test_refusal_does_not_reveal_claims_in_the_response(site, keyring):
    c = claims(aud="aud-secret-audience-91", sub="svc-secret-subject-42", email="secret-mail@x.test")
    token = _valid_with(keyring, c)
    resp = site.refused("/leak", bearer(token), "wrong_audience", token=token, claims=c)
    for value in ("aud-secret-audience-91", "svc-secret-subject-42", "secret-mail@x.test"):
        assert value.encode() not in resp.body
        assert all(value not in v for _, v in resp.headers)


def test_valid_header_and_payload_with_another_tokens_signature_is_refused(site, keyring):
    a = _valid_with(keyring, claims(sub="svc-a"))
    b = _valid_with(keyring, claims(sub="svc-b"))
    forged = _replace_segment(a, 2, b.split(".")[2])
    site.refused("/mix", bearer(forged), "bad_signature", token=forged)


def test_signature_over_a_different_signing_input_is_refused(site, keyring):
    # signed over header.payload with padding '=' characters: not the JWS signing input
    header = b64url(json_bytes({"alg": "RS256", "typ": "JWT", "kid": KID_RSA}))
    payload = b64url(json_bytes(claims()))
    sig = sign("RS256", keyring.rsa, f"{header}=.{payload}=".encode())
    token = f"{header}.{payload}.{b64url(sig)}"
    site.refused("/mix", bearer(token), "bad_signature", token=token)


# ---------------------------------------------------------------- injection through token content

INJECTIONS = ['x"\r\nX-Injected: 1\r\n', 'x", error="forged", scope="admin', "x\n2026/01/01 00:00:00 [info] forged"]
LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[[a-z]+\] ")


def _injected_tokens(ring, text):
    return {
        "kid": _valid(ring, kid=text),
        "alg": make_token(text, ring.rsa, claims(), kid=KID_RSA, sign_alg="RS256"),
        "iss": _valid_with(ring, claims(iss=text)),
        "aud": _valid_with(ring, claims(aud=text)),
        "crit": _valid(ring, header_overrides={"crit": [text]}),
        "typ": _valid(ring, header_overrides={"typ": text, "crit": [text]}),
    }


@pytest.mark.parametrize("field", ["kid", "alg", "iss", "aud", "crit", "typ"])
@pytest.mark.parametrize("text", INJECTIONS, ids=["crlf-header", "quote-param", "newline-logline"])
def test_token_content_cannot_inject_headers_or_log_lines(site, keyring, field, text):
    token = _injected_tokens(keyring, text)[field]
    before = site.echo.requests
    mark = site.ngx.log_mark()
    resp = site.get("/inject", bearer(token))
    assert resp.status == 401, resp
    assert site.echo.requests == before
    assert not resp.all("X-Injected"), f"response header injected: {resp!r}"
    www = resp.all("WWW-Authenticate")
    assert len(www) == 1 and re.fullmatch(
        r'Bearer realm="mesh", error="invalid_token", error_description="[^"\\\r\n]*"', www[0]
    ), f"WWW-Authenticate altered by token content: {www}"
    text_after = site.ngx.wait_log(mark, lambda t: "[info]" in t)
    for line in text_after.splitlines():
        assert LOG_LINE.match(line), f"error.log line not written by nginx: {line!r}\n{text_after}"


# ---------------------------------------------------------------- duplicate members (RFC 7519 4: reject or last wins)

def _dup_payload(first: str, last: str, name: str) -> bytes:
    c = claims()
    c.pop(name, None)
    body = json_bytes(c)[1:-1]
    return b"{" + f'"{name}":{first},"{name}":{last},'.encode() + body + b"}"


# the module reads the last of duplicate members (RFC 7515 4 allows it): each case has that answer
@pytest.mark.parametrize(
    "name,first,last,answer",
    [
        ("iss", json.dumps(ISS_JWKS), '"https://evil.mesh.test"', "wrong_issuer"),
        ("exp", str(now() + 3600), str(now() - 3600), "expired"),
        ("aud", json.dumps("aud-orders-7f3"), '"aud-evil"', "wrong_audience"),
        ("sub", '"svc-orders-caller-51d"', '"svc-admin"', "verified"),
    ],
    ids=["iss", "exp", "aud", "sub"],
)
def test_a_duplicate_claim_is_read_as_its_last_value(site, keyring, name, first, last, answer):
    token = _signed_raw_payload(keyring, _dup_payload(first, last, name))
    if answer == "verified":
        resp = site.allowed("/dup-claim", bearer(token))
        assert resp.upstream_header("X-Test-Caller") == "svc-admin", "the first duplicate was used, not the last"
    else:
        site.refused("/dup-claim", bearer(token), answer, token=token)


def test_a_duplicate_alg_header_member_is_read_as_its_last_value(site, keyring):
    header = b'{"alg":"RS256","kid":"rsa-1","alg":"none"}'
    token = make_token("RS256", keyring.rsa, claims(), raw_header_bytes=header)
    site.refused("/dup-alg", bearer(token), "bad_signature", token=token)
    unsigned = make_token("RS256", None, claims(), raw_header_bytes=header)
    site.refused("/dup-alg", bearer(unsigned), "bad_signature", token=unsigned)


# ---------------------------------------------------------------- odd values: each has its one answer

# (change to the claims, the answer: "verified" = 200 from the upstream, else the 401's status)
ODD_CLAIMS = [
    # exp: a NumericDate is any JSON number (RFC 7519 2); past (negative, fractions of the
    # epoch's first second) is expired, far future is valid; anything else is no exp at all
    ({"exp": 1e300}, "verified"),
    ({"exp": 2**64}, "verified"),
    ({"exp": 2**63}, "verified"),
    ({"exp": -(2**63)}, "expired"),
    ({"exp": -1}, "expired"),
    ({"exp": 0.5}, "expired"),
    ({"exp": "9999999999"}, "malformed"),
    ({"exp": None, "nbf": 1}, "malformed"),
    ({"exp": True}, "malformed"),
    ({"exp": [1]}, "malformed"),
    # nbf / iat: in the future is not_yet_valid, in the past is fine, not a number is malformed
    ({"nbf": 2**64}, "not_yet_valid"),
    ({"nbf": -1e300}, "verified"),
    ({"iat": 1e300}, "not_yet_valid"),
    ({"iat": "now"}, "malformed"),
    # iss must be one of the issuers, as a string
    ({"iss": 7}, "wrong_issuer"),
    ({"iss": ["https://jwks.mesh.test"]}, "wrong_issuer"),
    ({"iss": ""}, "wrong_issuer"),
    ({"iss": None, "sub": None}, "wrong_issuer"),
    # aud must hold an accepted audience: a number, an object, an empty list hold none
    ({"aud": 12}, "wrong_audience"),
    ({"aud": {"a": 1}}, "wrong_audience"),
    ({"aud": []}, "wrong_audience"),
    ({"aud": [None, 1]}, "wrong_audience"),
    # the principal (sub) must be a non-empty string
    ({"sub": 42}, "claim_mismatch"),
    ({"sub": ""}, "claim_mismatch"),
    ({"sub": {"a": "b"}}, "claim_mismatch"),
    ({"sub": "x" * 8000}, "verified"),
]


@pytest.mark.parametrize("change,answer", ODD_CLAIMS,
                         ids=[",".join(f"{k}={str(v)[:20]}" for k, v in c.items()) for c, _ in ODD_CLAIMS])
def test_odd_claim_values_get_their_one_answer(site, keyring, change, answer):
    c = claims()
    c.update(change)
    c = {k: v for k, v in c.items() if v is not None}
    token = _valid_with(keyring, c)
    if answer == "verified":
        resp = site.allowed("/odd", bearer(token))
        if "sub" in change:
            assert resp.upstream_header("X-Test-Caller") == change["sub"], resp
    else:
        site.refused("/odd", bearer(token), answer, token=token)


# a kid that is not a string makes the header malformed (RFC 7515 4.1.4); a string names no key
@pytest.mark.parametrize("value,status", [
    (7, "malformed"), (["rsa-1"], "malformed"), ({"k": 1}, "malformed"), (None, "malformed"),
    ("", "unknown_key"), ("rsa-1" * 2000, "unknown_key"),
], ids=["number", "list", "object", "null", "empty", "10000-chars"])
def test_odd_kid_values_are_refused(site, keyring, value, status):
    if value is None:
        token = make_token("RS256", keyring.rsa, claims(), raw_header_bytes=b'{"alg":"RS256","kid":null}')
    else:
        token = _valid(keyring, header_overrides={"kid": value})
    site.refused("/odd-kid", bearer(token), status, token=token)


@pytest.mark.parametrize(
    "token",
    [
        "." * 10000,
        "a" * 60000,
        "eyJ" + "A" * 20,
        "bm9uZQ.bm9uZQ.bm9uZQ",
    ],
    ids=["10000-dots", "60000-chars", "short", "none-none-none"],
)
def test_junk_tokens_are_malformed(site, token):
    site.refused("/junk", bearer(token), "malformed", token=token)


@pytest.mark.parametrize("token", ["e30.e30.", "e30.e30.e30"], ids=["no-signature", "signature"])
def test_empty_header_and_claims_objects_are_refused(site, token):
    # no alg, no iss, no exp: the issuer is read first (it chooses the provider, whose
    # algorithms and keys the rest is checked against)
    site.refused("/junk", bearer(token), "wrong_issuer", token=token)


def test_a_header_without_alg_is_refused(site, keyring):
    token = _valid(keyring, header_overrides={"alg": None})
    site.refused("/no-alg", bearer(token), "bad_signature", token=token)


def test_header_json_nested_100_deep_is_malformed(site, keyring):
    header = b'{"alg":"RS256","kid":"rsa-1","x":' + b"[" * 100 + b"]" * 100 + b"}"
    token = make_token("RS256", keyring.rsa, claims(), raw_header_bytes=header)
    site.refused("/deep", bearer(token), "malformed", token=token)


def test_token_with_a_space_inside_is_malformed(site, keyring):
    token = _valid(keyring)
    h, p, s = token.split(".")
    for value in (f"{h}.{p} .{s}", f"{token} extra"):
        site.refused("/space", [("Authorization", f"Bearer {value}")], "malformed", token=token)


def test_signature_in_standard_base64_alphabet_is_malformed(site, keyring):
    # base64url only (RFC 7515 2): a signature with '+' or '/' is not one
    for i in range(50):
        token = _valid_with(keyring, claims(sub=f"svc-b64-{i}"))
        h, p, s = token.split(".")
        std = s.replace("-", "+").replace("_", "/")
        if std != s:
            break
    else:
        raise AssertionError("50 signatures without a - or _: the token builder is broken")
    site.refused("/b64", bearer(f"{h}.{p}.{std}"), "malformed", token=token)


def test_cloud_run_stripped_signature_is_refused_by_default(site, keyring):
    token = _replace_segment(_valid(keyring), 2, "SIGNATURE_REMOVED_BY_GOOGLE")
    mark = site.ngx.log_mark()
    # the marker itself is named in the [warn] that says how to deploy: check the rest
    site.refused("/stripped", bearer(token), "bad_signature")
    h, p, _ = token.split(".")
    assert p not in site.ngx.log_since(mark) and f"{h}.{p}" not in site.ngx.log_since(mark)


def _token_of_length(ring, length: int) -> str:
    """A valid token exactly `length` characters long (a padding claim plus a header filler)."""
    c = claims(pad="")
    base = len(_valid_with(ring, c))
    for filler in range(4):
        for pad in range(max(0, (length - base) * 3 // 4 - 8), (length - base) * 3 // 4 + 8):
            c["pad"] = "p" * pad
            token = _valid_with(ring, c, header_overrides={"f": "f" * filler})
            if len(token) == length:
                return token
    raise AssertionError(f"could not build a token of {length} characters")


def test_a_token_of_exactly_16KiB_is_accepted_and_one_byte_more_is_malformed(site, keyring):
    at_limit = _token_of_length(keyring, 16 * 1024)
    site.allowed("/limit", bearer(at_limit))
    over = _token_of_length(keyring, 16 * 1024 + 1)
    site.refused("/limit", bearer(over), "malformed", token=over)

