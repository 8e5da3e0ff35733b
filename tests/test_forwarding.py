"""mesh_forward_identity: client-sent X-Mesh-* headers never reach the upstream; the verified
identity does, exactly once; every other client header arrives untouched, once, in order."""

from __future__ import annotations

import base64
import re

import pytest

from mesh_test.client import Connection, bearer
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import emerg_at_marked_line, passes_nginx_t, render
from mesh_test.tokens import KID_RSA, b64url, b64url_decode, jwks_token, make_token, now
from mesh_test.upstream import RecordingUpstream

AUD = "aud-orders-7f3"

FORWARD_HTTP = JWKS_PROVIDER + """
server {
    listen unix:@TMP@/fail.sock;
    access_log off;
    location / { return 503 "failing peer\\n"; }
}
server {
    listen 127.0.0.1:@PORT@;
    large_client_header_buffers 4 64k;
    mesh_forward_identity on;
    mesh_auth optional jwks;
    proxy_set_header Host $http_host;
    add_header X-Auth-Status $mesh_auth_status always;

    location /           { mesh_auth jwks; proxy_pass http://@UPSTREAM@; }
    location /optional/  { proxy_pass http://@UPSTREAM@; }
    location /open/      { mesh_auth off; proxy_pass http://@UPSTREAM@; }
    location /off/       { mesh_forward_identity off; proxy_pass http://@UPSTREAM@; }
    location /ep/ {
        proxy_intercept_errors on;
        error_page 503 = @fallback;
        proxy_pass http://unix:@TMP@/fail.sock:;
    }
    location @fallback   { proxy_pass http://@UPSTREAM@; }
    location /traced/    { mesh_trace on; proxy_pass http://@UPSTREAM@; }
    location /traced-ep/ {
        mesh_trace on;
        proxy_intercept_errors on;
        error_page 503 = /traced/after-error-page;
        proxy_pass http://unix:@TMP@/fail.sock:;
    }
    location /tf/        { root @TMP@; try_files $uri @fallback; }
}
"""

MODULE_HEADERS = ("x-mesh-caller", "x-mesh-provider", "x-mesh-claims")


@pytest.fixture(scope="module")
def site(module_path, launcher):
    return launcher.start(FORWARD_HTTP)


def is_mesh(name: str) -> bool:
    return name.lower().startswith("x-mesh-")


def upstream_list(resp) -> list[tuple[str, str]]:
    assert resp.status == 200, resp
    return [(n, v) for n, v in resp.json()["headers"]]


def check_passthrough(resp, sent: list[tuple[str, str]]) -> None:
    """Every non-X-Mesh-* header the client sent arrives once, unchanged, in the order sent
    (nginx's proxy itself sets Host, from $http_host here, and Connection)."""
    got = upstream_list(resp)
    hosts = [v for n, v in got if n.lower() == "host"]
    assert hosts == ["localhost"], f"Host: {hosts}"
    expected = [(n, v) for n, v in sent if not is_mesh(n)]
    arrived = [(n, v) for n, v in got if n.lower() not in ("host", "connection") and not is_mesh(n)
               and not n.lower().startswith(("traceparent", "tracestate", "x-cloud-trace-context"))]
    assert arrived == expected, (
        "client headers did not arrive once each, unchanged and in order:\n"
        f"sent:    {expected}\narrived: {arrived}"
    )


def mesh_headers(resp) -> list[tuple[str, str]]:
    return [(n, v) for n, v in upstream_list(resp) if is_mesh(n)]


def check_identity(resp, sub: str, payload: bytes) -> None:
    got = mesh_headers(resp)
    names = [n.lower() for n, _ in got]
    assert sorted(names) == sorted(MODULE_HEADERS), f"expected exactly one each of {MODULE_HEADERS}, got {got}"
    values = {n.lower(): v for n, v in got}
    assert values["x-mesh-caller"] == sub, got
    assert values["x-mesh-provider"] == "jwks", got
    encoded = values["x-mesh-claims"]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", encoded), f"X-Mesh-Claims is not unpadded base64url: {encoded!r}"
    assert b64url_decode(encoded) == payload, (
        f"X-Mesh-Claims does not decode to the token's payload:\n{b64url_decode(encoded)!r}\n{payload!r}"
    )


def token_and_payload(keyring, sub: str = "svc-fwd-caller-1", **extra) -> tuple[str, bytes]:
    c = claims(sub=sub, **extra)
    token = jwks_token(keyring, c)
    return token, b64url_decode(token.split(".")[1])


SPOOFS = [
    ("X-Mesh-Caller", "admin"),
    ("X-Mesh-Provider", "google"),
    ("X-Mesh-Claims", b64url(b'{"sub":"admin","groups":["admins"]}')),
    ("x-MESH-caller", "root@shop.iam.gserviceaccount.com"),
    ("X-MESH-ANYTHING", "1"),
    ("x-mesh-", "bare-prefix"),
]

OTHERS = [
    ("User-Agent", "fwd-test/1.0"),
    ("X-Before", "b1"),
    ("Accept", "application/json"),
    ("X-Meshy-Thing", "not a mesh header"),
    ("X-Mesh", "no dash: not a mesh header"),
    ("XX-Mesh-Caller", "prefix elsewhere: not a mesh header"),
    ("X-Repeated", "r1"),
    ("X-Repeated", "r2"),
    ("X-After", "a1"),
]


def arrange(where: str, others: list, spoofs: list) -> list:
    if where == "first":
        return spoofs + others
    if where == "last":
        return others + spoofs
    if where == "middle":
        half = len(others) // 2
        return others[:half] + spoofs + others[half:]
    if where == "interleaved":
        out = []
        for i, h in enumerate(others):
            out.append(h)
            if i < len(spoofs):
                out.append(spoofs[i])
        return out + spoofs[len(others):]
    if where == "duplicated":
        return spoofs + others[:3] + spoofs + others[3:] + spoofs
    raise ValueError(where)


PLACES = ["first", "middle", "last", "interleaved", "duplicated"]


@pytest.mark.parametrize("where", PLACES)
def test_spoofed_mesh_headers_are_replaced_by_the_verified_identity(site, keyring, where):
    token, payload = token_and_payload(keyring)
    sent = arrange(where, OTHERS + bearer(token), SPOOFS)
    resp = site.get("/svc/x", sent)
    assert resp.header("X-Auth-Status") == "verified", resp
    check_passthrough(resp, sent)
    check_identity(resp, "svc-fwd-caller-1", payload)


@pytest.mark.parametrize("where", PLACES)
def test_anonymous_requests_get_no_mesh_headers_at_all(site, where):
    sent = arrange(where, OTHERS, SPOOFS)
    resp = site.get("/optional/x", sent)
    assert resp.header("X-Auth-Status") == "missing", resp
    check_passthrough(resp, sent)
    assert mesh_headers(resp) == [], f"an anonymous request must carry no X-Mesh-* header: {mesh_headers(resp)}"


def test_auth_off_with_forwarding_drops_client_mesh_headers(site):
    sent = arrange("duplicated", OTHERS, SPOOFS)
    resp = site.get("/open/x", sent)
    assert resp.header("X-Auth-Status") == "off", resp
    check_passthrough(resp, sent)
    assert mesh_headers(resp) == []


def test_an_invalid_token_under_optional_is_refused_and_forwards_nothing(site, keyring, echo):
    expired = jwks_token(keyring, claims(exp=now() - 600, iat=now() - 900))
    before = echo.requests
    resp = site.get("/optional/x", SPOOFS + bearer(expired))
    assert resp.status == 401 and echo.requests == before, resp


def test_only_mesh_headers_sent_by_a_client_without_token(site):
    resp = site.get("/optional/only", SPOOFS)
    check_passthrough(resp, SPOOFS)
    assert mesh_headers(resp) == []


def test_claims_header_is_the_payload_byte_for_byte(site, keyring):
    # spaces, key order, escapes, nesting and non-ASCII as the issuer wrote them
    t = now()
    payload = (
        '{ "iss" : "https://jwks.mesh.test",\n "sub":"svc-fwd-raw", "aud":["aud-orders-7f3", "x"],'
        f' "exp": {t + 300}, "iat":{t}, "z":{{"b":[1,2.50,{{"c":null}}],"a":true}},'
        ' "name":"Ren\\u00e9e \\"quoted\\" \\/ caf\u00e9", "ok?>":"???>>>"}'
    ).encode("utf-8")
    std = base64.b64encode(payload).decode()
    assert ("+" in std or "/" in std) and std.endswith("="), "the payload must exercise the url-safe alphabet and padding"
    token = make_token("RS256", keyring.rsa, raw_payload_bytes=payload, kid=KID_RSA)
    resp = site.get("/svc/raw", bearer(token))
    assert resp.header("X-Auth-Status") == "verified", resp
    check_identity(resp, "svc-fwd-raw", payload)


def test_identity_from_each_token_on_one_connection(site, keyring):
    conn = Connection(site.port)
    try:
        for i in range(3):
            token, payload = token_and_payload(keyring, sub=f"svc-ka-{i}", n=i)
            sent = [("X-Mesh-Caller", "admin")] + bearer(token)
            resp = conn.request(f"/svc/ka-{i}", sent)
            check_identity(resp, f"svc-ka-{i}", payload)
            resp = conn.request(f"/optional/ka-{i}", [("X-Mesh-Caller", "admin")])
            assert mesh_headers(resp) == [], "identity of the previous request on the connection leaked"
    finally:
        conn.close()


def test_forwarding_off_still_drops_client_mesh_headers(site, keyring):
    # with mesh_forward_identity off nothing is sent for the caller, and the client's own
    # X-Mesh-* headers are dropped all the same: an upstream may trust them
    token, _ = token_and_payload(keyring)
    sent = arrange("duplicated", OTHERS, SPOOFS) + bearer(token)
    resp = site.get("/off/x", sent)
    assert resp.header("X-Auth-Status") == "verified", resp
    assert mesh_headers(resp) == [], "client X-Mesh-* headers reached the upstream"
    check_passthrough(resp, sent)


NO_MESH_HTTP = JWKS_PROVIDER + """
server {
    listen 127.0.0.1:@PORT@;
    underscores_in_headers on;
    proxy_set_header Host $http_host;
    location /            { proxy_pass http://@UPSTREAM@; }
    location /satisfied/  { satisfy any; allow 127.0.0.1; deny all; proxy_pass http://@UPSTREAM@; }
}
"""


@pytest.mark.parametrize("path", ["/plain", "/satisfied/x"])
def test_location_without_mesh_directives_drops_client_mesh_headers(launcher_fn, path):
    # the module is loaded but this server uses none of its directives: X-Mesh-* headers
    # (any case, `_` for `-`) still never reach the upstream; everything else passes as sent
    site = launcher_fn.start(NO_MESH_HTTP)
    sent = arrange("middle", OTHERS, SPOOFS + [("X_Mesh_Caller", "admin")])
    resp = site.get(path, sent)
    assert mesh_headers(resp) == [], "client X-Mesh-* headers reached the upstream"
    assert [n for n, _ in upstream_list(resp) if n.lower().replace("_", "-").startswith("x-mesh-")] == []
    check_passthrough(resp, [(n, v) for n, v in sent if n != "X_Mesh_Caller"])


# ---------------------------------------------------------------- many headers, redirects, tracing

def many_headers(token: str | None, n: int = 60) -> list[tuple[str, str]]:
    """n custom headers, with client X-Mesh-* ones around the 20-entry boundaries of nginx's
    header list and duplicated, plus the token."""
    out: list[tuple[str, str]] = []
    spoof_at = {0, 1, 16, 17, 18, 19, 20, 21, 37, 38, 39, 40, 41, 58, 59}
    for i in range(n):
        if i in spoof_at:
            out.append(SPOOFS[i % len(SPOOFS)])
        out.append((f"X-Custom-{i:02d}", f"value-{i}"))
        if i == 30 and token:
            out += bearer(token)
    out.append(("X-Mesh-Caller", "last-word"))
    return out


@pytest.mark.parametrize("path,authenticated", [
    ("/svc/many", True),
    ("/optional/many", False),
    ("/ep/many", True),
    ("/ep/many-anon", False),
    ("/tf/many", True),
    ("/traced/many", True),
    ("/traced-ep/many", True),
    ("/traced-ep/many-anon", False),
], ids=["verified", "anonymous", "error-page", "error-page-anonymous", "try-files", "traced",
        "traced-error-page", "traced-error-page-anonymous"])
def test_many_headers_with_mesh_headers_sprinkled_in(site, keyring, path, authenticated):
    token, payload = token_and_payload(keyring, sub="svc-many-1") if authenticated else (None, b"")
    sent = many_headers(token)
    if path.startswith("/traced"):
        # trace headers too, at list-part boundaries and twice: the upstream gets exactly one each
        sent = sent[:19] + [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")] + sent[19:]
        sent = sent[:41] + [("X-Cloud-Trace-Context", "4bf92f3577b34da6a3ce929d0e0e4736/1;o=1")] + sent[41:]
        sent.append(("tracestate", "rojo=1"))
    resp = site.get(path, sent)
    assert resp.status == 200, resp
    check_passthrough(resp, [(n, v) for n, v in sent
                             if n.lower() not in ("traceparent", "tracestate", "x-cloud-trace-context")])
    if authenticated:
        check_identity(resp, "svc-many-1", payload)
    else:
        assert mesh_headers(resp) == []
    if path.startswith("/traced"):
        for name in ("traceparent", "x-cloud-trace-context"):
            assert len(resp.upstream_headers(name)) == 1, f"{name}: {resp.upstream_headers(name)}"
        assert resp.upstream_headers("tracestate") == ["rojo=1"]
        assert resp.upstream_header("traceparent").startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")


def test_many_headers_on_a_keepalive_connection(site, keyring):
    conn = Connection(site.port)
    try:
        for i in range(20):
            token, payload = token_and_payload(keyring, sub=f"svc-many-ka-{i}")
            sent = many_headers(token, n=40 + i)
            resp = conn.request(f"/svc/many-ka-{i}", sent)
            check_passthrough(resp, sent)
            check_identity(resp, f"svc-many-ka-{i}", payload)
    finally:
        conn.close()


# ---------------------------------------------------------------- subrequests (auth_request, mirror)

# auth_request is not in nginx's default build: Debian's has it, and `make build-vendored`
# configures the 1.28 build with it (test_harness checks the binary has it)
AUTH_REQUEST_LOCATIONS = """
    location /authreq/        { auth_request /auth; proxy_pass http://@UPSTREAM@; }
    location /authreq-traced/ { mesh_trace on; auth_request /auth; proxy_pass http://@UPSTREAM@; }
    location /authreq-open/   { mesh_auth off; auth_request /auth; proxy_pass http://@UPSTREAM@; }
    location /authreq-open-traced/ { mesh_auth off; mesh_trace on; auth_request /auth; proxy_pass http://@UPSTREAM@; }
"""


def subrequest_http(rec_port: int) -> str:
    return JWKS_PROVIDER + f"""
server {{
    listen 127.0.0.1:@PORT@;
    large_client_header_buffers 4 64k;
    mesh_forward_identity on;
    mesh_auth optional jwks;
    proxy_set_header Host $http_host;
    add_header X-Auth-Status $mesh_auth_status always;

{AUTH_REQUEST_LOCATIONS}
    location /mirrored/       {{ mirror /mirror; proxy_pass http://@UPSTREAM@; }}
    location = /auth          {{ internal; proxy_pass http://127.0.0.1:{rec_port}/auth$request_uri; }}
    location = /mirror        {{ internal; proxy_pass http://127.0.0.1:{rec_port}/mirror$request_uri; }}
}}
"""


@pytest.fixture(scope="module")
def recorder():
    rec = RecordingUpstream()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def subreq_site(module_path, launcher, recorder):
    return launcher.start(subrequest_http(recorder.port))


TRACEPARENT = ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
SUBREQ_SPOOFS = {
    "2": [TRACEPARENT, ("X-Mesh-Caller", "admin")],
    "3": [("X-Mesh-Provider", "admin"), TRACEPARENT, ("X-Mesh-Caller", "admin")],
}


# (location, with a token?): mesh_auth off ("open") has no identity to forward
SUBREQ_KINDS = [(kind, auth) for kind in ("authreq", "authreq-traced", "mirrored") for auth in (True, False)] + [
    ("authreq-open", False), ("authreq-open-traced", False)]


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("extra", [0, 2, 15, 16, 17, 18, 19, 40])
@pytest.mark.parametrize("spoof_set", list(SUBREQ_SPOOFS), ids=[f"{k}-spoofs" for k in SUBREQ_SPOOFS])
@pytest.mark.parametrize("kind,authenticated", SUBREQ_KINDS,
                         ids=[f"{k}-{'verified' if a else 'anonymous'}" for k, a in SUBREQ_KINDS])
def test_a_subrequest_does_not_let_client_mesh_headers_through(subreq_site, recorder, keyring, kind, authenticated,
                                                                spoof_set, extra, where):
    token, payload = token_and_payload(keyring, sub="svc-subreq-1") if authenticated else (None, b"")
    others = [(f"X-Other-{i:02d}", f"v{i}") for i in range(extra)] + (bearer(token) if token else [])
    spoofs = SUBREQ_SPOOFS[spoof_set]
    sent = spoofs + others if where == "first" else others + spoofs
    uri = f"/{kind}/{spoof_set}-{extra}-{where}-{int(authenticated)}"
    resp = subreq_site.get(uri, sent)
    assert resp.status == 200, resp
    check_passthrough(resp, [(n, v) for n, v in sent if n != "traceparent"])
    if authenticated:
        check_identity(resp, "svc-subreq-1", payload)
    else:
        assert mesh_headers(resp) == [], f"the upstream got X-Mesh-* headers: {mesh_headers(resp)}"
    if kind.endswith("-traced"):
        tps = resp.upstream_headers("traceparent")
        assert len(tps) == 1 and tps[0].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-"), tps
    # the subrequest's upstream (the auth server, the mirror) gets no client X-Mesh-* either
    sub = recorder.received(("/auth" if kind.startswith("authreq") else "/mirror") + uri)
    spoofed = [(n, v) for n, v in sub if is_mesh(n) and v == "admin"]
    assert spoofed == [], f"the {kind} subrequest's upstream got the client's {spoofed}"


# ---------------------------------------------------------------- configuration

def test_mesh_forward_identity_bad_flag_fails_nginx_t_at_the_line(module_path, conf_dir, keyring):
    body = ("server {\n    listen 127.0.0.1:@PORT@;\n    location / {\n"
            "        mesh_forward_identity yes;  # BAD\n        proxy_pass http://@UPSTREAM@;\n    }\n}\n")
    conf_text = render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    emerg_at_marked_line(conf_text, conf_dir, words=["mesh_forward_identity"])


def test_mesh_forward_identity_in_every_context_passes_nginx_t(module_path, conf_dir, keyring):
    body = ("mesh_forward_identity on;\nserver {\n    listen 127.0.0.1:@PORT@;\n    mesh_forward_identity off;\n"
            "    location / {\n        mesh_forward_identity on;\n        proxy_pass http://@UPSTREAM@;\n    }\n}\n")
    conf_text = render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    passes_nginx_t(conf_text, conf_dir)


# ---------------------------------------------------------------- $mesh_claim_NAME towards the upstream

CLAIMS_HTTP = JWKS_PROVIDER + """
server {
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    add_header X-Auth-Status $mesh_auth_status always;
    proxy_set_header X-Claim-Team    $mesh_claim_team;
    proxy_set_header X-Claim-Groups  $mesh_claim_groups;
    proxy_set_header X-Claim-Org     $mesh_claim_org;
    proxy_set_header X-Claim-Level   $mesh_claim_level;
    proxy_set_header X-Claim-Admin   $mesh_claim_admin;
    proxy_set_header X-Claim-Missing $mesh_claim_nosuchclaim;
    proxy_set_header X-Claim-Sub     $mesh_claim_sub;
    location /         { proxy_pass http://@UPSTREAM@; }
    location /respond/ { add_header X-Team $mesh_claim_team always; add_header X-Auth-Status $mesh_auth_status always; proxy_pass http://@UPSTREAM@; }
}
"""


@pytest.fixture(scope="module")
def claims_site(module_path, launcher):
    return launcher.start(CLAIMS_HTTP)


CLAIM_CASES = [
    # (claim, value in the token, what the upstream gets; None = no header, as for an empty value)
    ("team", "payments", "payments"),
    ("team", "pay ments / eu-1", "pay ments / eu-1"),
    ("groups", ["admins", "ops"], "admins,ops"),
    ("groups", ["solo"], "solo"),
    ("groups", [], None),
    ("org", {"unit": "core"}, '{"unit":"core"}'),
    ("level", 3, "3"),
    ("admin", True, "true"),
    ("team", "", None),
]


@pytest.mark.parametrize("name,value,expected", CLAIM_CASES,
                         ids=[f"{c[0]}-{str(c[1])[:20] or 'empty'}" for c in CLAIM_CASES])
def test_a_claim_variable_sends_the_upstream_the_claim(claims_site, keyring, name, value, expected):
    token = jwks_token(keyring, claims(sub="svc-claims-1", **{name: value}))
    resp = claims_site.allowed("/c", bearer(token))
    header = {"team": "X-Claim-Team", "groups": "X-Claim-Groups", "org": "X-Claim-Org", "level": "X-Claim-Level",
              "admin": "X-Claim-Admin"}[name]
    assert resp.upstream_headers(header) == ([] if expected is None else [expected]), resp.json()["headers"]
    assert resp.upstream_headers("X-Claim-Missing") == [], "a claim the token lacks gave a header"
    assert resp.upstream_header("X-Claim-Sub") == "svc-claims-1"


CRLF_CLAIM = "a\r\nX-Injected: 1"


def test_a_claim_with_cr_lf_cannot_add_a_header_upstream(claims_site, keyring):
    token = jwks_token(keyring, claims(sub="svc-claims-crlf", team=CRLF_CLAIM))
    resp = claims_site.allowed("/c", bearer(token))
    got = resp.json()["headers"]
    assert [v for n, v in got if n.lower() == "x-injected"] == [], f"the claim added a header upstream: {got}"
    for n, v in got:
        assert not any(ord(c) < 0x20 for c in v), f"control character in {n}: {v!r}"


def test_a_claim_with_cr_lf_cannot_split_the_response(claims_site, keyring):
    token = jwks_token(keyring, claims(sub="svc-claims-crlf", team=CRLF_CLAIM))
    resp = claims_site.allowed("/respond/c", bearer(token))
    assert resp.all("X-Injected") == [], f"the claim split the response: {resp!r}"
