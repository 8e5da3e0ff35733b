"""`satisfy any`: the module beside nginx's own access modules (`allow`/`deny`).

README's rules: a verified (or rule-allowed) request satisfies the access phase; an anonymous
one does not; a 401 or 403 of the module can be overruled by another access module; a
rate-limit refusal cannot. And whichever module admitted a request, client-sent `X-Mesh-*`
headers never reach the upstream, and an admitted request carries no `WWW-Authenticate`.
"""

from __future__ import annotations

import math
import time

import pytest

from mesh_test.client import bearer, request
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.tokens import jwks_token, now

SATISFY_HTTP = JWKS_PROVIDER + """
mesh_rate_limit_zone sat 64k;
server {
    listen 127.0.0.1:@PORT@;
    satisfy any;
    mesh_auth jwks;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller $mesh_caller;

    location /deny-all/       { deny all; proxy_pass http://@UPSTREAM@; }
    location /allow-local/    { allow 127.0.0.1; deny all; mesh_forward_identity on; proxy_pass http://@UPSTREAM@; }
    location /optional/       { mesh_auth optional jwks; deny all; proxy_pass http://@UPSTREAM@; }
    location /optional-rule/  { mesh_auth optional jwks; mesh_allow anonymous; deny all; proxy_pass http://@UPSTREAM@; }
    location /rbac-local/     { mesh_allow svc-sat-ok; allow 127.0.0.1; deny all; proxy_pass http://@UPSTREAM@; }
    location /rbac-deny-all/  { mesh_allow svc-sat-ok; deny all; proxy_pass http://@UPSTREAM@; }
    location /limited/ {
        allow 127.0.0.1;
        deny all;
        mesh_rate_limit zone=sat rate=1r/m burst=1;
        proxy_pass http://@UPSTREAM@;
    }
    location /limited-403/ {
        allow 127.0.0.1;
        deny all;
        mesh_rate_limit zone=sat rate=1r/m burst=1;
        mesh_rate_limit_status 403;
        proxy_pass http://@UPSTREAM@;
    }
}
"""

SPOOF = [("X-Mesh-Caller", "admin@corp.example"), ("X-Mesh-Provider", "google"), ("x_mesh_claims", "e30")]


@pytest.fixture(scope="module")
def site(module_path, launcher):
    return launcher.start(SATISFY_HTTP)


_TOKENS: dict = {}


def tok(keyring, sub: str) -> str:
    if sub not in _TOKENS:
        _TOKENS[sub] = jwks_token(keyring, claims(sub=sub))
    return _TOKENS[sub]


def reaches_upstream(site, path: str, headers=None, *, auth_status: str):
    before = site.echo.requests
    resp = site.get(path, headers)
    assert resp.status == 200, f"expected 200 from {path}, got {resp!r}"
    assert site.echo.requests == before + 1, "the upstream did not get exactly one request"
    assert resp.header("X-Auth-Status") == auth_status, resp
    return resp


def refused_with(site, path: str, headers, status: int):
    before = site.echo.requests
    resp = site.get(path, headers)
    assert resp.status == status, f"expected {status} from {path}, got {resp!r}"
    assert site.echo.requests == before, "a refused request reached the upstream"
    return resp


# ---------------------------------------------------------------- 1. a verified request satisfies

def test_a_verified_token_satisfies_the_access_phase(site, keyring):
    resp = reaches_upstream(site, "/deny-all/x", bearer(tok(keyring, "svc-sat-1")), auth_status="verified")
    assert resp.header("X-Decision") == "allow", resp
    assert resp.upstream_header("X-Test-Caller") == "svc-sat-1", resp


def test_without_a_token_deny_all_cannot_turn_the_401_into_a_pass(site, keyring):
    # both refuse: the 401 (with its challenge) is what the client gets, as with auth_basic
    resp = site.refused("/deny-all/x", None, "missing")
    assert resp.status == 401
    expired = jwks_token(keyring, claims(sub="svc-sat-late", exp=now() - 600, iat=now() - 900))
    site.refused("/deny-all/x", bearer(expired), "expired", token=expired)


# ---------------------------------------------------------------- 2. an anonymous request does not

def test_an_anonymous_request_does_not_satisfy_the_access_phase(site):
    resp = refused_with(site, "/optional/x", None, 403)
    assert resp.header("X-Auth-Status") == "missing", resp
    assert resp.header("WWW-Authenticate") is None, resp


def test_an_anonymous_request_a_rule_allows_satisfies_the_access_phase(site):
    resp = reaches_upstream(site, "/optional-rule/x", auth_status="missing")
    assert resp.header("X-Decision") == "allow", resp


# ---------------------------------------------------------------- 3. a 401 or 403 can be overruled

def test_allow_overrules_the_401_of_a_request_without_a_token(site):
    reaches_upstream(site, "/allow-local/x", auth_status="missing")


def test_allow_overrules_the_403_of_rbac(site, keyring):
    reaches_upstream(site, "/rbac-local/x", bearer(tok(keyring, "svc-sat-other")), auth_status="verified")
    reaches_upstream(site, "/rbac-local/x", bearer(tok(keyring, "svc-sat-ok")), auth_status="verified")


def test_deny_all_cannot_turn_the_403_of_rbac_into_a_pass(site, keyring):
    resp = refused_with(site, "/rbac-deny-all/x", bearer(tok(keyring, "svc-sat-other")), 403)
    assert resp.header("X-Decision") == "deny", resp
    reaches_upstream(site, "/rbac-deny-all/x", bearer(tok(keyring, "svc-sat-ok")), auth_status="verified")


def test_a_verified_caller_admitted_by_its_token_gets_its_own_identity_upstream(site, keyring):
    resp = reaches_upstream(site, "/allow-local/x", SPOOF + bearer(tok(keyring, "svc-sat-fwd")),
                            auth_status="verified")
    assert resp.upstream_header("X-Mesh-Caller") == "svc-sat-fwd", resp
    assert resp.upstream_header("X-Mesh-Provider") == "jwks", resp
    assert resp.upstream_headers("x_mesh_claims") == [], resp


def test_a_request_admitted_by_allow_carries_no_client_identity_headers(site):
    resp = reaches_upstream(site, "/allow-local/x", SPOOF, auth_status="missing")
    got = [(n, v) for n, v in resp.json()["headers"] if n.lower().replace("_", "-").startswith("x-mesh-")]
    assert got == [], f"client-sent identity headers reached the upstream: {got}"


def test_a_request_admitted_by_allow_carries_no_www_authenticate(site):
    resp = reaches_upstream(site, "/allow-local/x", auth_status="missing")
    assert resp.all("WWW-Authenticate") == [], resp


# ---------------------------------------------------------------- 4. a rate-limit refusal cannot

def test_allow_does_not_overrule_a_rate_limit_refusal(site, keyring):
    token = tok(keyring, "svc-sat-limited")
    t_first = time.monotonic()
    for _ in range(2):
        resp = reaches_upstream(site, "/limited/x", bearer(token), auth_status="verified")
        assert resp.header("X-Decision") == "allow", resp
    resp = refused_with(site, "/limited/x", bearer(token), 429)
    elapsed = time.monotonic() - t_first
    assert resp.header("X-Decision") == "rate_limited", resp
    retry = resp.header("Retry-After")
    # 1r/m burst=1: the next request is due 60 s after the first
    assert retry is not None and retry.isdigit(), resp
    assert math.ceil(60 - elapsed) <= int(retry) <= 60, f"Retry-After {retry} {elapsed:.2f}s after the first request"


def test_allow_does_not_overrule_a_rate_limit_refusal_with_status_403(site, keyring):
    token = tok(keyring, "svc-sat-limited-403")
    for _ in range(2):
        reaches_upstream(site, "/limited-403/x", bearer(token), auth_status="verified")
    resp = refused_with(site, "/limited-403/x", bearer(token), 403)
    assert resp.header("X-Decision") == "rate_limited", resp


def test_a_request_without_a_token_is_not_counted_by_the_rate_limit(site, keyring):
    # the 401 (overruled by allow) comes before the limit: the caller's budget is untouched
    for _ in range(5):
        reaches_upstream(site, "/limited/x", auth_status="missing")
    token = tok(keyring, "svc-sat-limited-2")
    for _ in range(2):
        reaches_upstream(site, "/limited/x", bearer(token), auth_status="verified")
    refused_with(site, "/limited/x", bearer(token), 429)


def test_requests_from_another_address_are_refused_by_deny_all(site):
    # 127.0.0.2 is not allowed: the module's 401 stands
    before = site.echo.requests
    resp = request(site.port, "/allow-local/x", None, source="127.0.0.2")
    assert resp.status == 401 and resp.header("X-Auth-Status") == "missing", resp
    assert resp.header("WWW-Authenticate") == 'Bearer realm="mesh"', resp
    assert site.echo.requests == before
