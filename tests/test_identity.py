"""What a user of ngx-mesh checks first: good tokens get through, with the caller named."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from mesh_test.client import Connection, bearer
from mesh_test.configs import (
    AUD,
    AUD_BILLING,
    AUD_EXTRA,
    CONFIG_VERSION,
    ISS_HMAC,
    ISS_JWKS,
    ISS_JWKS_ALG,
    ISS_NO_LEEWAY,
    ISS_OTHER,
    ISS_PEM_BUNDLE,
    ISS_PEM_CERT,
    ISS_PEM_EC256,
    ISS_PEM_EC384,
    ISS_PEM_ED25519,
    ISS_PEM_RSA,
    ISS_PEOPLE,
    ISS_PEOPLE_ALT,
    ISS_UNLISTED,
    ISS_WIDE_LEEWAY,
    PROVIDERS,
    claims,
    identity_http,
    people_claims,
)
from mesh_test.nginx import emerg_at_marked_line, make_private_dir, render
from mesh_test.tokens import (
    HMAC_ALGS,
    KID_RSA_RS256_ONLY,
    RSA_ALGS,
    jwks_token,
    make_keyring,
    make_token,
    now,
)


@pytest.fixture(scope="module")
def site(module_path, launcher):
    return launcher.start(identity_http())


# ---------------------------------------------------------------- algorithms and key sources

JWKS_ALGS = RSA_ALGS + ["ES256", "ES384", "EdDSA"]


@pytest.mark.parametrize("alg", JWKS_ALGS)
def test_every_algorithm_is_accepted_with_a_jwks_file(site, keyring, alg):
    token = jwks_token(keyring, claims(), alg)
    resp = site.allowed("/alg", bearer(token))
    assert resp.upstream_header("X-Test-Provider") == "jwks"
    assert resp.upstream_header("X-Test-Caller") == "svc-orders-caller-51d"


PEM_CASES = [(alg, ISS_PEM_RSA, "pem_rsa") for alg in RSA_ALGS] + [
    ("ES256", ISS_PEM_EC256, "pem_ec256"),
    ("ES384", ISS_PEM_EC384, "pem_ec384"),
    ("EdDSA", ISS_PEM_ED25519, "pem_ed25519"),
]


@pytest.mark.parametrize("alg,iss,provider", PEM_CASES, ids=[f"{c[0]}-{c[2]}" for c in PEM_CASES])
def test_every_algorithm_is_accepted_with_a_pem_public_key(site, keyring, alg, iss, provider):
    token = jwks_token(keyring, claims(iss=iss, aud=None), alg, kid=None)
    resp = site.allowed("/alg", bearer(token))
    assert resp.upstream_header("X-Test-Provider") == provider


@pytest.mark.parametrize("alg", RSA_ALGS)
def test_rsa_algorithms_are_accepted_with_an_x509_certificate(site, keyring, alg):
    token = jwks_token(keyring, claims(iss=ISS_PEM_CERT, aud=None), alg, kid=None)
    resp = site.allowed("/alg", bearer(token))
    assert resp.upstream_header("X-Test-Provider") == "pem_cert"


@pytest.mark.parametrize("alg", HMAC_ALGS)
def test_hmac_algorithms_are_accepted_with_a_secret_file(site, keyring, alg):
    token = make_token(alg, keyring.hmac_secret, claims(iss=ISS_HMAC, aud=None))
    resp = site.allowed("/alg", bearer(token))
    assert resp.upstream_header("X-Test-Provider") == "hmac"


@pytest.mark.parametrize("alg", ["RS256", "PS384", "ES256", "EdDSA"])
def test_a_pem_file_with_several_keys_and_a_certificate_accepts_each(site, keyring, alg):
    token = jwks_token(keyring, claims(iss=ISS_PEM_BUNDLE, aud=None), alg, kid=None)
    resp = site.allowed("/alg", bearer(token))
    assert resp.upstream_header("X-Test-Provider") == "pem_bundle"


def test_a_jwk_alg_member_restricts_its_key(site, keyring):
    c = claims(iss=ISS_JWKS_ALG, aud=None)
    site.allowed("/alg", bearer(make_token("RS256", keyring.rsa, c, kid=KID_RSA_RS256_ONLY)))
    token = make_token("PS256", keyring.rsa, c, kid=KID_RSA_RS256_ONLY)
    site.refused("/alg", bearer(token), "bad_signature", token=token)


def test_algorithms_allowlist_accepts_the_listed_algorithm(site, keyring):
    from mesh_test.configs import ISS_ES_ONLY

    site.allowed("/alg", bearer(jwks_token(keyring, claims(iss=ISS_ES_ONLY, aud=None), "ES256")))


# ---------------------------------------------------------------- variables

def test_caller_provider_and_claims_reach_the_upstream(site, keyring):
    c = people_claims()
    resp = site.allowed("/vars", bearer(jwks_token(keyring, c, "ES256")))
    assert resp.upstream_header("X-Test-Caller") == c["email"], "principal email names the caller"
    assert resp.upstream_header("X-Test-Provider") == "people"
    assert resp.upstream_header("X-Test-Email") == c["email"]
    assert resp.upstream_header("X-Test-Groups") == "admins,ops", "array claims are joined by ','"
    assert resp.upstream_header("X-Test-Status") == "verified"
    assert resp.upstream_header("X-Test-Decision") == "allow"
    assert resp.upstream_header("X-Test-Version") == CONFIG_VERSION
    assert resp.header("X-Decision") == "allow"


def test_default_principal_is_the_sub_claim(site, keyring):
    resp = site.allowed("/vars", bearer(jwks_token(keyring, claims(sub="svc-billing-0a2"))))
    assert resp.upstream_header("X-Test-Caller") == "svc-billing-0a2"
    assert resp.upstream_header("X-Test-Email") is None, "no email claim: $mesh_claim_email is empty"


def test_caller_works_in_a_map(site, keyring):
    resp = site.allowed("/map", bearer(jwks_token(keyring, claims(sub="svc-map-1"))))
    assert resp.upstream_header("X-Test-Kind") == "service"
    resp = site.allowed("/map", bearer(jwks_token(keyring, claims(sub="robot-map-1"))))
    assert resp.upstream_header("X-Test-Kind") == "other"
    resp = site.allowed("/optional/map", None, auth_status="missing")
    assert resp.upstream_header("X-Test-Kind") == "anonymous"


def _access_line(site, mark, uri):
    text = site.ngx.wait_log(mark, lambda t: f"uri={uri} " in t, name="mesh_access.log")
    lines = [l for l in text.splitlines() if f"uri={uri} " in l]
    assert len(lines) == 1, f"expected one access log line for {uri}:\n{text}"
    return lines[0]


def test_access_log_format_shows_caller_and_decision(site, keyring):
    mark = site.ngx.log_mark("mesh_access.log")
    site.allowed("/logged-ok", bearer(jwks_token(keyring, claims(sub="svc-logged-77"))))
    line = _access_line(site, mark, "/logged-ok")
    assert line == (
        f"MESHLOG uri=/logged-ok status=200 caller=svc-logged-77 provider=jwks auth=verified "
        f"decision=allow version={CONFIG_VERSION}"
    )

    mark = site.ngx.log_mark("mesh_access.log")
    expired = claims(exp=now() - 600, iat=now() - 900)
    resp = site.get("/logged-expired", bearer(jwks_token(keyring, expired)))
    assert resp.status == 401
    line = _access_line(site, mark, "/logged-expired")
    # an empty variable is logged as nothing, or as "-" when the module reports it not found
    assert re.fullmatch(
        rf"MESHLOG uri=/logged-expired status=401 caller=-? provider=-? auth=expired "
        rf"decision=unauthenticated version={re.escape(CONFIG_VERSION)}",
        line,
    ), line


def test_limit_req_zone_keyed_by_caller_limits_each_caller(site, keyring):
    # rate=1r/m, no burst: a caller's first request passes, its second is limited (429),
    # another caller is still let through: the key is the verified caller.
    a = jwks_token(keyring, claims(sub=f"svc-limited-a-{time.time_ns()}"))
    b = jwks_token(keyring, claims(sub=f"svc-limited-b-{time.time_ns()}"))
    site.allowed("/limited/1", bearer(a))
    before = site.echo.requests
    assert site.get("/limited/2", bearer(a)).status == 429
    assert site.echo.requests == before
    site.allowed("/limited/3", bearer(b))


def test_variables_work_in_the_rewrite_phase(site, keyring):
    # `if` runs before the access phase: the variable must already hold the answer
    before = site.echo.requests
    expired = jwks_token(keyring, claims(exp=now() - 600, iat=now() - 900))
    assert site.get("/teapot/x", bearer(expired)).status == 418
    assert site.echo.requests == before
    site.allowed("/teapot/x", bearer(jwks_token(keyring, claims())))
    resp = site.allowed("/set/x", bearer(jwks_token(keyring, claims(sub="svc-set-3"))))
    assert resp.upstream_header("X-Test-Who") == "caller:svc-set-3"


def test_error_page_replaces_the_body_of_a_refusal(site, keyring):
    token = jwks_token(keyring, claims(exp=now() - 600, iat=now() - 900))
    before = site.echo.requests
    mark = site.ngx.log_mark()
    resp = site.get("/errpage/x", bearer(token))
    assert resp.status == 401, resp
    assert resp.body == b"custom refusal page\n", resp
    www = resp.header("WWW-Authenticate")
    assert www is not None and www.startswith('Bearer realm="mesh", error="invalid_token"'), resp
    assert site.echo.requests == before
    site.assert_refusal_logged(mark, "expired", token=token)
    site.allowed("/errpage/x", bearer(jwks_token(keyring, claims())))


def test_requests_on_one_keepalive_connection_are_judged_separately(site, keyring):
    conn = Connection(site.port)
    try:
        before = site.echo.requests
        r1 = conn.request("/ka/1", bearer(jwks_token(keyring, claims(sub="svc-ka-one"))))
        assert r1.status == 200 and r1.upstream_header("X-Test-Caller") == "svc-ka-one", r1
        r2 = conn.request("/ka/2")
        assert r2.status == 401 and r2.header("X-Auth-Status") == "missing", r2
        expired = jwks_token(keyring, claims(exp=now() - 600, iat=now() - 900))
        r3 = conn.request("/ka/3", bearer(expired), method="POST", body=b"x" * 5000)
        assert r3.status == 401 and r3.header("X-Auth-Status") == "expired", r3
        r4 = conn.request("/ka/4", bearer(jwks_token(keyring, claims(sub="svc-ka-two"))))
        assert r4.status == 200 and r4.upstream_header("X-Test-Caller") == "svc-ka-two", r4
        assert site.echo.requests == before + 2
    finally:
        conn.close()


def test_auth_off_location_reports_off(site):
    resp = site.allowed("/open/x", None, auth_status="off")
    assert resp.upstream_header("X-Test-Caller") is None


# ---------------------------------------------------------------- where the token comes from

def test_lowercase_bearer_scheme_is_accepted(site, keyring):
    token = jwks_token(keyring, claims())
    site.allowed("/scheme", [("Authorization", f"bearer {token}")])
    site.allowed("/scheme", [("Authorization", f"BEARER {token}")])


def test_x_serverless_authorization_alone_is_used(site, keyring):
    token = jwks_token(keyring, claims(sub="svc-xsa-1"))
    resp = site.allowed("/xsa", [("X-Serverless-Authorization", f"Bearer {token}")])
    assert resp.upstream_header("X-Test-Caller") == "svc-xsa-1"


@pytest.mark.parametrize("xsa_first", [True, False], ids=["xsa-sent-first", "xsa-sent-last"])
def test_x_serverless_authorization_is_preferred_over_authorization(site, keyring, xsa_first):
    good = jwks_token(keyring, claims(sub="svc-xsa-good"))
    bad = jwks_token(keyring, claims(sub="svc-xsa-bad", exp=now() - 600, iat=now() - 900))

    def headers(xsa, auth):
        h = [("X-Serverless-Authorization", f"Bearer {xsa}"), ("Authorization", f"Bearer {auth}")]
        return h if xsa_first else h[::-1]

    resp = site.allowed("/xsa", headers(good, bad))
    assert resp.upstream_header("X-Test-Caller") == "svc-xsa-good"
    site.refused("/xsa", headers(bad, good), "expired", token=bad)


def test_mesh_token_reads_the_cookie(site, keyring):
    token = jwks_token(keyring, claims(sub="svc-cookie-1"))
    resp = site.allowed("/cookie/x", [("Cookie", f"theme=dark; id_token={token}")])
    assert resp.upstream_header("X-Test-Caller") == "svc-cookie-1"


def test_mesh_token_cookie_location_ignores_the_authorization_header(site, keyring):
    token = jwks_token(keyring, claims())
    site.refused("/cookie/x", bearer(token), "missing", token=token)


def test_mesh_token_cookie_with_an_invalid_token_is_refused(site, keyring):
    token = jwks_token(keyring, claims(aud="aud-nobody"))
    site.refused("/cookie/x", [("Cookie", f"id_token={token}")], "wrong_audience", token=token)


# ---------------------------------------------------------------- audiences and issuers

def test_second_configured_audience_is_accepted(site, keyring):
    site.allowed("/aud", bearer(jwks_token(keyring, claims(aud=AUD_EXTRA))))


def test_aud_array_containing_an_accepted_audience_is_accepted(site, keyring):
    site.allowed("/aud", bearer(jwks_token(keyring, claims(aud=["aud-unrelated", AUD]))))


def test_provider_without_audience_does_not_check_aud(site, keyring):
    site.allowed("/aud", bearer(jwks_token(keyring, claims(iss=ISS_OTHER, aud="anything-at-all"))))
    site.allowed("/aud", bearer(jwks_token(keyring, claims(iss=ISS_OTHER, aud=None))))


def test_mesh_audience_in_a_location_replaces_the_provider_audience(site, keyring):
    billing = jwks_token(keyring, claims(aud=AUD_BILLING))
    site.allowed("/billing/x", bearer(billing))
    orders = jwks_token(keyring, claims(aud=AUD))
    site.refused("/billing/x", bearer(orders), "wrong_audience", token=orders)
    # and outside that location the provider's own audience still holds
    site.refused("/x", bearer(billing), "wrong_audience", token=billing)


def test_the_token_issuer_chooses_the_provider(site, keyring):
    resp = site.allowed("/iss", bearer(jwks_token(keyring, claims(iss=ISS_OTHER))))
    assert resp.upstream_header("X-Test-Provider") == "jwks_other"
    resp = site.allowed("/iss", bearer(jwks_token(keyring, claims(iss=ISS_JWKS))))
    assert resp.upstream_header("X-Test-Provider") == "jwks"


def test_a_provider_accepts_each_of_its_issuers(site, keyring):
    for iss in (ISS_PEOPLE, ISS_PEOPLE_ALT):
        resp = site.allowed("/iss", bearer(jwks_token(keyring, people_claims(iss=iss))))
        assert resp.upstream_header("X-Test-Provider") == "people"


def test_provider_not_named_in_mesh_auth_is_a_wrong_issuer(site, keyring):
    token = jwks_token(keyring, claims(iss=ISS_UNLISTED))
    site.refused("/iss", bearer(token), "wrong_issuer", token=token)
    pem = jwks_token(keyring, claims(iss=ISS_PEM_RSA, aud=None), kid=None)
    site.allowed("/iss", bearer(pem))
    site.refused("/only-jwks/x", bearer(pem), "wrong_issuer", token=pem)


# ---------------------------------------------------------------- require, principal

def test_nested_and_array_require_rules_accept_matching_claims(site, keyring):
    site.allowed("/req", bearer(jwks_token(keyring, people_claims())))
    site.allowed("/req", bearer(jwks_token(keyring, people_claims(groups=["ops", "admins", "x"]))))


def test_require_on_a_plain_string_claim_matches_the_value(site, keyring):
    site.allowed("/req", bearer(jwks_token(keyring, people_claims(groups="admins"))))


@pytest.mark.parametrize(
    "change",
    [
        {"google": {"compute_engine": {"project_id": "p2"}}},
        {"google": {"compute_engine": {}}},
        {"google": None},
        {"groups": ["ops"]},
        {"groups": []},
        {"groups": None},
        {"email_verified": False},
        {"email": None},
    ],
    ids=["project-differs", "project-missing", "google-missing",
         "group-absent", "groups-empty", "groups-missing", "email-not-verified", "principal-missing"],
)
def test_require_and_principal_mismatches_are_claim_mismatch(site, keyring, change):
    c = people_claims()
    c.update(change)
    c = {k: v for k, v in c.items() if v is not None}
    token = jwks_token(keyring, c)
    site.refused("/req", bearer(token), "claim_mismatch", token=token, claims=c)


def test_missing_sub_with_default_principal_is_claim_mismatch(site, keyring):
    c = claims(sub=None)
    token = jwks_token(keyring, c)
    site.refused("/req", bearer(token), "claim_mismatch", token=token, claims=c)


# ---------------------------------------------------------------- time

def test_times_within_the_default_leeway_are_accepted(site, keyring):
    t = now()
    site.allowed("/time", bearer(jwks_token(keyring, claims(exp=t - 10, iat=t - 400))))
    site.allowed("/time", bearer(jwks_token(keyring, claims(nbf=t + 10))))
    site.allowed("/time", bearer(jwks_token(keyring, claims(iat=t + 10))))


def test_leeway_directive_widens_the_window(site, keyring):
    t = now()
    site.allowed("/time", bearer(jwks_token(keyring, claims(iss=ISS_WIDE_LEEWAY, exp=t - 90, iat=t - 400))))
    site.allowed("/time", bearer(jwks_token(keyring, claims(iss=ISS_WIDE_LEEWAY, nbf=t + 90))))
    late = jwks_token(keyring, claims(iss=ISS_WIDE_LEEWAY, exp=t - 200, iat=t - 400))
    site.refused("/time", bearer(late), "expired", token=late)


def test_leeway_zero_refuses_a_token_just_expired(site, keyring):
    t = now()
    token = jwks_token(keyring, claims(iss=ISS_NO_LEEWAY, exp=t - 3, iat=t - 60))
    site.refused("/time", bearer(token), "expired", token=token)


# ---------------------------------------------------------------- optional, realm

def test_optional_auth_lets_a_request_without_token_through_as_anonymous(site):
    resp = site.allowed("/optional/x", None, auth_status="missing")
    assert resp.upstream_header("X-Test-Caller") is None
    assert resp.upstream_header("X-Test-Status") == "missing"
    assert resp.header("WWW-Authenticate") is None


def test_optional_auth_still_names_a_verified_caller(site, keyring):
    resp = site.allowed("/optional/x", bearer(jwks_token(keyring, claims(sub="svc-opt-1"))))
    assert resp.upstream_header("X-Test-Caller") == "svc-opt-1"


def test_optional_auth_refuses_an_invalid_token(site, keyring):
    token = jwks_token(keyring, claims(exp=now() - 600, iat=now() - 900))
    site.refused("/optional/x", bearer(token), "expired", token=token)


def test_mesh_realm_names_the_realm(site, keyring):
    site.refused("/realm/x", None, "missing", realm="orders api")
    token = jwks_token(keyring, claims(aud="aud-nobody"))
    site.refused("/realm/x", bearer(token), "wrong_audience", token=token, realm="orders api")


def test_no_token_gets_401_with_the_default_realm(site):
    site.refused("/x", None, "missing")


# ---------------------------------------------------------------- sizes

def test_claims_nested_ten_deep_are_accepted(site, keyring):
    nested: dict = {"leaf": "v"}
    for _ in range(9):
        nested = {"n": nested}
    site.allowed("/deep", bearer(jwks_token(keyring, claims(ctx=nested))))


def test_a_token_just_under_16k_is_accepted(site, keyring):
    c = claims(pad="")
    base = len(jwks_token(keyring, c))
    c["pad"] = "p" * ((15 * 1024 - base) * 3 // 4)
    token = jwks_token(keyring, c)
    assert 14 * 1024 < len(token) < 16 * 1024
    site.allowed("/big", bearer(token))


# ---------------------------------------------------------------- token cache

def test_the_same_token_twice_is_accepted_both_times(site, keyring):
    token = jwks_token(keyring, claims(sub="svc-twice"))
    for _ in range(2):
        resp = site.allowed("/twice", bearer(token))
        assert resp.upstream_header("X-Test-Caller") == "svc-twice"
        assert resp.upstream_header("X-Test-Provider") == "jwks"


def test_a_cached_token_is_still_checked_against_the_location_audience(site, keyring):
    token = jwks_token(keyring, claims(aud=AUD))
    site.allowed("/x", bearer(token))
    site.refused("/billing/x", bearer(token), "wrong_audience", token=token)


def test_a_cached_token_is_still_checked_against_the_location_providers(site, keyring):
    token = jwks_token(keyring, claims(iss=ISS_OTHER))
    site.allowed("/x", bearer(token))
    site.refused("/only-jwks/x", bearer(token), "wrong_issuer", token=token)


def _expires_while_cached(site, keyring):
    # valid for 5 s more (leeway 0): the first request has seconds to spare on a busy machine
    exp = now() + 6
    token = jwks_token(keyring, claims(iss=ISS_NO_LEEWAY, exp=exp, iat=exp - 60))
    site.allowed("/soon", bearer(token))
    assert time.time() < exp, "the first request came too late to tell"
    while time.time() < exp + 1.2:
        time.sleep(0.1)
    site.refused("/soon", bearer(token), "expired", token=token)


def test_a_cached_token_is_refused_once_expired(site, keyring):
    _expires_while_cached(site, keyring)


CACHE_HTTP = """
{cache}
server {
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller $mesh_caller;
    mesh_auth jwks no_leeway;
    location / { proxy_pass http://@UPSTREAM@; }
}
"""


@pytest.mark.parametrize("cache", ["mesh_token_cache off;", "mesh_token_cache 2;"])
def test_token_cache_setting_keeps_verification_correct(module_path, launcher_fn, keyring, cache):
    site = launcher_fn.start(PROVIDERS + CACHE_HTTP.replace("{cache}", cache))
    tokens = [jwks_token(keyring, claims(sub=f"svc-cache-{i}")) for i in range(4)]
    for _ in range(2):
        for i, token in enumerate(tokens):
            resp = site.allowed("/c", bearer(token))
            assert resp.upstream_header("X-Test-Caller") == f"svc-cache-{i}"
    bad = jwks_token(keyring, claims(aud="aud-nobody"))
    for _ in range(2):
        site.refused("/c", bearer(bad), "wrong_audience", token=bad)
    _expires_while_cached(site, keyring)


def test_config_version_is_empty_when_not_configured(module_path, launcher_fn, keyring):
    body = PROVIDERS + """
server {
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    proxy_set_header X-Test-Version "[$mesh_config_version]";
    mesh_auth jwks;
    location / { proxy_pass http://@UPSTREAM@; }
}
"""
    site = launcher_fn.start(body)
    resp = site.allowed("/v", bearer(jwks_token(keyring, claims())))
    assert resp.upstream_header("X-Test-Version") == "[]"


def test_mesh_auth_at_http_level_is_inherited_and_can_be_turned_off(module_path, launcher_fn, keyring):
    body = PROVIDERS + """
mesh_auth jwks;
server {
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    location /         { proxy_pass http://@UPSTREAM@; }
    location /healthz  { mesh_auth off; proxy_pass http://@UPSTREAM@; }
}
"""
    site = launcher_fn.start(body)
    site.refused("/x", None, "missing")
    site.allowed("/x", bearer(jwks_token(keyring, claims())))
    site.allowed("/healthz", None, auth_status="off")


ROTATING_HTTP = """
mesh_provider rot { issuer https://rot.mesh.test; keys @TMP@/rot.json; }
server {
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    mesh_auth rot;
    location / { proxy_pass http://@UPSTREAM@; }
}
"""


def test_reload_picks_up_a_rotated_key_file_and_survives_a_broken_one(module_path, launcher_fn, keyring):
    rotated = make_keyring(make_private_dir("ngx-mesh-rotated-"))
    try:
        site = launcher_fn.start(ROTATING_HTTP, files={"rot.json": keyring.jwks_path.read_bytes()})
        c = claims(iss="https://rot.mesh.test", aud=None)
        old = jwks_token(keyring, c)
        new = make_token("RS256", rotated.rsa, c, kid="rsa-1")
        site.allowed("/r", bearer(old))
        site.refused("/r", bearer(new), "bad_signature", token=new)

        (site.ngx.tmp / "rot.json").write_bytes(rotated.jwks_path.read_bytes())
        site.ngx.reload()
        site.allowed("/r", bearer(new))
        site.refused("/r", bearer(old), "bad_signature", token=old)

        # a broken key file on reload: nginx says why and keeps the last good configuration
        (site.ngx.tmp / "rot.json").write_text("{ not json")
        mark = site.ngx.log_mark()
        os.kill(site.ngx.pid, signal.SIGHUP)
        text = site.ngx.wait_log(mark, lambda t: "[emerg]" in t, timeout=10)
        assert "[emerg]" in text and "rot.json" in text, text
        site.allowed("/r", bearer(new))
    finally:
        shutil.rmtree(rotated.dir, ignore_errors=True)


# ---------------------------------------------------------------- where a provider and its keys are written

RELATIVE_HTTP = """
mesh_provider rel { issuer https://rel.mesh.test; keys mesh/rel-jwks.json; }
server {
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    mesh_auth rel;
    location / { proxy_pass http://@UPSTREAM@; }
}
"""


def test_a_relative_keys_path_is_read_from_the_directory_of_nginx_conf(module_path, launcher_fn, keyring):
    # nginx.conf in etc/ below the prefix: the key file exists only beside it
    site = launcher_fn.start(RELATIVE_HTTP, conf_name="etc/nginx.conf",
                             files={"etc/mesh/rel-jwks.json": keyring.jwks_path.read_bytes()})
    token = jwks_token(keyring, claims(iss="https://rel.mesh.test", aud=None))
    site.allowed("/r", bearer(token))
    site.refused("/r", None, "missing")


def test_a_relative_keys_path_is_not_read_from_the_prefix(module_path, conf_dir, keyring):
    # the file under the prefix (-p) but not beside nginx.conf: nginx -t names the file it wanted
    (conf_dir / "mesh").mkdir()
    (conf_dir / "mesh" / "rel-jwks.json").write_bytes(keyring.jwks_path.read_bytes())
    body = RELATIVE_HTTP.replace("keys mesh/rel-jwks.json;", "keys mesh/rel-jwks.json;  # BAD")
    text = render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    emerg_at_marked_line(text, conf_dir, conf_name="etc/nginx.conf", words=[f"{conf_dir}/etc/mesh/rel-jwks.json"])


LATE_PROVIDER_HTTP = """
server {
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Provider $mesh_provider;
    mesh_auth late;
    location / { proxy_pass http://@UPSTREAM@; }
    location /loc/ { mesh_auth later; proxy_pass http://@UPSTREAM@; }
}
mesh_provider late  { issuer https://late.mesh.test;  keys @KEYS@/jwks.json; }
mesh_provider later { issuer https://later.mesh.test; keys @KEYS@/jwks.json; }
"""


def test_a_provider_defined_after_the_mesh_auth_that_names_it(module_path, launcher_fn, keyring):
    site = launcher_fn.start(LATE_PROVIDER_HTTP)
    late = jwks_token(keyring, claims(iss="https://late.mesh.test", aud=None))
    later = jwks_token(keyring, claims(iss="https://later.mesh.test", aud=None))
    assert site.allowed("/x", bearer(late)).upstream_header("X-Test-Provider") == "late"
    assert site.allowed("/loc/x", bearer(later)).upstream_header("X-Test-Provider") == "later"
    site.refused("/x", bearer(later), "wrong_issuer", token=later)
    site.refused("/loc/x", bearer(late), "wrong_issuer", token=late)
