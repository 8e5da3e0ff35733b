"""Hardening (README "Security"): no identity spoofing around the module, no header injection
through claims, no silent fail-open.

Each test is a check a user can make against the running module: what reaches the upstream,
what the client sees, what `nginx -t` says.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh_test.client import bearer
from mesh_test.configs import claims
from mesh_test.keyserver import KeyServer
from mesh_test.live import wait_until, wait_workers, worker_connections, close_all
from mesh_test.nginx import emerg_at_marked_line, nginx_t, render
from mesh_test.tokens import b64url, b64url_decode, jwks_token, make_token, public_jwk

JWKS_ISS = "https://jwks.mesh.test"
LAX_ISS = "https://lax.mesh.test"
AUD = "aud-orders-7f3"

HARD_HTTP = """
mesh_provider jwks {
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience aud-orders-7f3;
}
mesh_provider lax {
    issuer   https://lax.mesh.test;
    keys     @KEYS@/jwks.json;
}
mesh_rate_limit_zone hard 64k;
server {
    listen 127.0.0.1:@PORT@;
    underscores_in_headers on;
    mesh_auth jwks lax;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller $mesh_caller;

    location /satisfy/ {
        satisfy any;
        allow 127.0.0.1;
        deny all;
        mesh_forward_identity on;
        mesh_trace on;
        proxy_pass http://@UPSTREAM@;
    }
    location /satisfy-basic-off/ {
        satisfy any;
        allow 127.0.0.1;
        deny all;
        mesh_allow svc-nobody;
        mesh_forward_identity on;
        proxy_pass http://@UPSTREAM@;
    }
    location /fwd/ {
        mesh_forward_identity on;
        proxy_pass http://@UPSTREAM@;
    }
    location /claims/ {
        proxy_set_header X-Team $mesh_claim_team;
        proxy_set_header X-Org $mesh_claim_orgid;
        add_header X-Team-Out $mesh_claim_team always;
        add_header X-Auth-Status $mesh_auth_status always;
        proxy_pass http://@UPSTREAM@;
    }
    location /purge/ {
        mesh_deny any methods=PURGE;
        mesh_allow any;
        proxy_pass http://@UPSTREAM@;
    }
    location /unknown/ {
        mesh_allow any methods=UNKNOWN;
        proxy_pass http://@UPSTREAM@;
    }
    location /report/ {
        mesh_allow any methods=REPORT,M-SEARCH;
        proxy_pass http://@UPSTREAM@;
    }
    location /strict/ {
        mesh_allow svc-same-name provider=jwks;
        proxy_pass http://@UPSTREAM@;
    }
    location /limited/ {
        mesh_rate_limit zone=hard rate=1r/m burst=0;
        proxy_pass http://@UPSTREAM@;
    }
    location /traced/ {
        mesh_trace on;
        proxy_pass http://@UPSTREAM@;
    }
    location /ep401/ {
        error_page 401 /denied-page;
        proxy_pass http://@UPSTREAM@;
    }
    location = /denied-page {
        internal;
        mesh_auth off;
        add_header X-Auth-Status $mesh_auth_status always;
        proxy_pass http://@UPSTREAM@;
    }
}
"""

SPOOF = [
    ("X-Mesh-Caller", "admin@corp.example"),
    ("x-mesh-provider", "google"),
    ("X_Mesh_Caller", "admin@corp.example"),
    ("x_mesh-Claims", "e30"),
    ("X-Mesh_Roles", "admins"),
]


def spoofed(resp) -> list:
    return [(n, v) for n, v in resp.json()["headers"] if n.lower().replace("_", "-").startswith("x-mesh-")]


@pytest.fixture(scope="module")
def site(module_path, launcher):
    return launcher.start(HARD_HTTP)


def tok(keyring, sub: str, iss: str = JWKS_ISS, **extra) -> str:
    return jwks_token(keyring, claims(iss=iss, sub=sub, **extra))


# ---------------------------------------------------------------- 1, 4: identity headers

def test_satisfy_any_admitted_by_allow_carries_no_client_identity(site):
    resp = site.allowed("/satisfy/x", SPOOF, auth_status="missing")
    assert spoofed(resp) == [], f"client identity headers reached the upstream: {spoofed(resp)}"


def test_satisfy_any_admitted_by_allow_after_a_403_carries_no_identity(site, keyring):
    # the caller is verified but the rule refuses; `allow` admits: nothing of the caller's,
    # nor the client's, is forwarded
    resp = site.allowed("/satisfy-basic-off/x", SPOOF + bearer(tok(keyring, "svc-denied")))
    assert spoofed(resp) == [], spoofed(resp)


def test_satisfy_any_admitted_request_has_no_www_authenticate(site):
    resp = site.allowed("/satisfy/x", auth_status="missing")
    assert resp.all("WWW-Authenticate") == [], resp


def test_a_401_answered_by_an_error_page_keeps_its_challenge(site):
    # the error page is a later pass through the phases: the 401 stood, its challenge stays
    resp = site.get("/ep401/x")
    assert resp.status == 401, resp
    assert resp.all("WWW-Authenticate") == ['Bearer realm="mesh"'], resp


def test_satisfy_any_admitted_request_still_gets_trace_context(site):
    resp = site.allowed("/satisfy/x", auth_status="missing")
    tp = resp.upstream_headers("traceparent")
    assert len(tp) == 1 and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", tp[0]), resp.json()["headers"]


def test_verified_caller_under_satisfy_any_gets_its_own_identity(site, keyring):
    resp = site.allowed("/satisfy/x", SPOOF + bearer(tok(keyring, "svc-hard-own")))
    assert resp.upstream_headers("X-Mesh-Caller") == ["svc-hard-own"], resp.json()["headers"]
    assert [n for n, _ in spoofed(resp) if "_" in n] == [], spoofed(resp)


def test_underscore_spellings_are_stripped(site, keyring):
    resp = site.allowed("/fwd/x", SPOOF + bearer(tok(keyring, "svc-hard-underscore")))
    got = spoofed(resp)
    assert sorted(n.lower() for n, _ in got) == ["x-mesh-caller", "x-mesh-claims", "x-mesh-provider"], got
    assert resp.upstream_headers("X-Mesh-Caller") == ["svc-hard-underscore"]


# ---------------------------------------------------------------- 2: claims

CRLF = "a\r\nX-Injected: 1"


def test_a_claim_with_cr_lf_adds_no_header_upstream_or_downstream(site, keyring):
    resp = site.allowed("/claims/x", bearer(tok(keyring, "svc-hard-crlf", team=CRLF)))
    headers = resp.json()["headers"]
    assert [v for n, v in headers if n.lower() == "x-injected"] == [], headers
    assert resp.upstream_headers("X-Team") == [], "the variable must be not found"
    assert resp.all("X-Injected") == [] and resp.all("X-Team-Out") == [], resp
    # a plain claim still works
    ok = site.allowed("/claims/x", bearer(tok(keyring, "svc-hard-team", team="payments")))
    assert ok.upstream_headers("X-Team") == ["payments"]
    assert ok.all("X-Team-Out") == ["payments"]


def test_a_mixed_case_claim_is_reached_by_its_lower_case_name(site, keyring):
    resp = site.allowed("/claims/x", bearer(tok(keyring, "svc-hard-org", orgId="org-77")))
    assert resp.upstream_headers("X-Org") == ["org-77"], resp.json()["headers"]


# ---------------------------------------------------------------- 3: methods

def test_a_deny_for_purge_refuses_purge(site, keyring):
    t = tok(keyring, "svc-hard-purge")
    assert not admitted(site, "/purge/x", t, "PURGE")
    assert admitted(site, "/purge/x", t, "GET")
    assert admitted(site, "/purge/x", t, "REPORT")


def admitted(site, path: str, token: str, method: str) -> bool:
    """Whether the module let `method` through to the upstream (the echo upstream answers
    methods it does not know with its own 501: what counts is that nginx passed it on)."""
    resp = site.get(path, bearer(token), method=method)
    if resp.status == 403:
        assert resp.header("X-Decision") == "deny", resp
        return False
    assert resp.header("X-Decision") == "allow" and resp.header("X-Auth-Status") == "verified", resp
    assert resp.status in (200, 501) and b"nginx" not in resp.body.split(b"</title>")[0], resp
    return True


def test_methods_unknown_is_a_name_not_a_wildcard(site, keyring):
    t = tok(keyring, "svc-hard-unknown")
    assert not admitted(site, "/unknown/x", t, "PURGE")
    assert admitted(site, "/unknown/x", t, "UNKNOWN")


def test_any_rfc9110_method_can_be_named(site, keyring):
    t = tok(keyring, "svc-hard-report")
    assert admitted(site, "/report/x", t, "REPORT")
    assert admitted(site, "/report/x", t, "M-SEARCH")
    assert not admitted(site, "/report/x", t, "PURGE")
    assert not admitted(site, "/report/x", t, "GET")


# ---------------------------------------------------------------- provider namespaces

def test_a_rule_naming_a_provider_ignores_the_same_principal_from_another(site, keyring):
    assert site.get("/strict/x", bearer(tok(keyring, "svc-same-name"))).status == 200
    resp = site.get("/strict/x", bearer(tok(keyring, "svc-same-name", iss=LAX_ISS)))
    assert resp.status == 403 and resp.header("X-Auth-Status") == "verified", resp


def test_the_rate_limit_key_includes_the_provider(site, keyring):
    strict = tok(keyring, "svc-same-bucket")
    lax = tok(keyring, "svc-same-bucket", iss=LAX_ISS)
    assert site.get("/limited/x", bearer(lax)).status == 200
    assert site.get("/limited/x", bearer(strict)).status == 200, "the lax issuer's caller used the bucket"
    assert site.get("/limited/x", bearer(strict)).status == 429


# ---------------------------------------------------------------- trace

def test_an_invalid_traceparent_is_not_replaced_by_x_cloud_trace_context(site, keyring):
    t = tok(keyring, "svc-hard-trace")
    resp = site.allowed("/traced/x", bearer(t) + [
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-0"),  # flags too short
        ("tracestate", "vendor=secret"),
        ("X-Cloud-Trace-Context", "0af7651916cd43dd8448eb211c80319c/123;o=1"),
    ])
    tp = resp.upstream_headers("traceparent")
    assert len(tp) == 1, resp.json()["headers"]
    trace_id = tp[0].split("-")[1]
    assert trace_id != "0af7651916cd43dd8448eb211c80319c", "the invalid context was continued"
    assert resp.upstream_headers("tracestate") == [], "tracestate must be dropped with an invalid traceparent"
    assert resp.upstream_header("X-Cloud-Trace-Context").startswith(trace_id + "/")


def test_span_ids_are_unique_and_non_zero(site, keyring):
    t = tok(keyring, "svc-hard-spans")
    spans = set()
    for _ in range(40):
        tp = site.allowed("/traced/x", bearer(t)).upstream_header("traceparent")
        span = tp.split("-")[2]
        assert span != "0" * 16
        spans.add(span)
    assert len(spans) == 40


# ---------------------------------------------------------------- nginx -t

def _conf(tmp, body: str, keyring) -> str:
    return render(body, tmp, port=1, upstream="127.0.0.1:1", keys=keyring.dir)


@pytest.mark.parametrize("block", [
    "preset google;",
    "issuer https://accounts.google.com; keys @KEYS@/jwks.json;",
    "issuer https://ci.example.com accounts.google.com; keys @KEYS@/jwks.json;",
], ids=["preset", "issuer", "issuer-among-others"])
def test_google_issuers_without_audience_fail_nginx_t(module_path, conf_dir, keyring, block):
    body = f"""
mesh_provider g {{  # BAD
    {block}
}}
server {{ listen 127.0.0.1:@PORT@; mesh_auth g; }}
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert "audience" in line, line
    good = body.replace(block, block + " audience https://svc.example;")
    rc, out, _ = nginx_t(_conf(conf_dir, good, keyring), conf_dir)
    assert rc == 0, out


def test_a_rule_naming_an_unknown_provider_fails_nginx_t(module_path, conf_dir, keyring):
    body = """
mesh_provider jwks { issuer https://jwks.mesh.test; keys @KEYS@/jwks.json; }
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / { mesh_allow any provider=jwsk; }  # BAD
}
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert 'unknown provider "jwsk"' in line, line


@pytest.mark.parametrize("word", ["methods=get", "methods=GET;POST", "methods=G(ET"])
def test_bad_method_names_fail_nginx_t(module_path, conf_dir, keyring, word):
    body = f"""
mesh_provider jwks {{ issuer https://jwks.mesh.test; keys @KEYS@/jwks.json; }}
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / {{ mesh_allow any "{word}"; }}  # BAD
}}
"""
    emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)


def _rsa_1024_jwk() -> dict:
    return public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak-1")


def _off_curve_jwk() -> dict:
    good = public_jwk(ec.generate_private_key(ec.SECP256R1()), "bent-1")
    # flip the last bit of y: the point is then off the curve (y^2 = x^3 + ax + b has at
    # most two roots, y and p - y, which differ in parity of a large number, not by one bit)
    raw = bytearray(b64url_decode(good["y"]))
    raw[-1] ^= 0x01
    good["y"] = b64url(bytes(raw))
    return good


def _wrong_curve_jwk() -> dict:
    k = public_jwk(ec.generate_private_key(ec.SECP256R1()), "p256-as-384")
    k["alg"] = "ES384"
    return k


@pytest.mark.parametrize("make,kid,why", [
    (_rsa_1024_jwk, "weak-1", "1024 bits"),
    (_off_curve_jwk, "bent-1", "refused by the verifier"),
    (_wrong_curve_jwk, "p256-as-384", "does not fit"),
], ids=["rsa-1024", "ec-off-curve", "ec-wrong-curve"])
def test_keys_the_verifier_would_refuse_fail_nginx_t(module_path, conf_dir, keyring, make, kid, why):
    good = json.loads(keyring.jwks_path.read_text())["keys"][0]
    (conf_dir / "bad-jwks.json").write_text(json.dumps({"keys": [good, make()]}))
    (conf_dir / "bad-jwks.json").chmod(0o644)
    body = f"""
mesh_provider bad {{
    issuer https://bad.mesh.test;
    keys   {conf_dir}/bad-jwks.json;  # BAD
}}
server {{ listen 127.0.0.1:@PORT@; mesh_auth bad; }}
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert f'kid "{kid}"' in line and "#2" in line and "bad-jwks.json" in line and why in line, line


# ---------------------------------------------------------------- key URLs

class _Redirector:
    """Answers every GET with 302 to `target`."""

    def __init__(self, target: str) -> None:
        outer = self
        self.hits = 0

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                outer.hits += 1
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


LIVE_HTTP = """
mesh_provider live {
    issuer   https://live.mesh.test;
    keys     @URL@;
    audience aud-live-1;
}
server {
    listen 127.0.0.1:@PORT@ reuseport;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Pid $pid always;
    mesh_auth live;
    location /      { proxy_pass http://@UPSTREAM@; }
    location /open/ { mesh_auth off; return 200 "open\n"; }
}
"""


def _live_tok(key, kid: str) -> str:
    return make_token("RS256", key, claims(iss="https://live.mesh.test", aud="aud-live-1", sub="svc-live"), kid=kid)


def test_a_key_url_redirect_is_never_followed_and_http_warns(module_path, launcher_fn, conf_dir, keyring):
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    evil = KeyServer(None)
    evil.set(keys=[public_jwk(attacker, "evil")])
    redirector = _Redirector(evil.url())
    try:
        body = LIVE_HTTP.replace("@URL@", f"http://127.0.0.1:{redirector.port}/certs")
        rc, out, _ = nginx_t(_conf(conf_dir, body, keyring), conf_dir)
        assert rc == 0, out
        assert re.search(r"\[warn\].*keys \"http://127\.0\.0\.1:\d+/certs\" is fetched over plain http://", out), out
        site = launcher_fn.start(body)
        wait_workers(site.ngx)
        wait_until(lambda: redirector.hits >= 1, 5.0)
        time.sleep(0.5)
        assert evil.count() == 0, "the redirect was followed"
        resp = site.get("/x", bearer(_live_tok(attacker, "evil")))
        assert resp.status == 503 and resp.header("X-Auth-Status") == "no_keys", resp
    finally:
        redirector.close()
        evil.close()


def test_tokens_of_a_key_removed_from_the_set_stop_at_once(module_path, launcher_fn, conf_dir, keyring):
    a = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    b = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ks = KeyServer(None)
    ks.set(keys=[public_jwk(a, "rot-a")])
    try:
        site = launcher_fn.start(LIVE_HTTP.replace("@URL@", ks.url()))
        wait_workers(site.ngx)
        old, new = _live_tok(a, "rot-a"), _live_tok(b, "rot-b")
        conns = worker_connections(site.ngx)
        try:
            for conn in conns.values():
                deadline = time.monotonic() + 5
                while conn.request("/k", bearer(old)).status != 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert conn.request("/k", bearer(old)).status == 200  # now cached in that worker
            # key A withdrawn (compromised), B published; B's first token triggers the refetch
            ks.set(keys=[public_jwk(b, "rot-b")])
            for conn in conns.values():
                deadline = time.monotonic() + 5
                while conn.request("/k", bearer(new)).status != 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert conn.request("/k", bearer(new)).status == 200
                resp = conn.request("/k", bearer(old))
                assert resp.status == 401 and resp.header("X-Auth-Status") == "unknown_key", (
                    f"a cached token of a withdrawn key still passes: {resp!r}")
        finally:
            close_all(conns)
    finally:
        ks.close()


def test_a_provider_name_with_a_control_character_fails_nginx_t(module_path, conf_dir, keyring):
    body = """
mesh_provider "a\\r\\nX-Injected:1" { issuer https://jwks.mesh.test; keys @KEYS@/jwks.json; }  # BAD
server { listen 127.0.0.1:@PORT@; }
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert "invalid name" in line, line
