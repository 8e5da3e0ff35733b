"""`mesh_outbound_auth $VAR;`: a service's outbound calls leave through nginx with its own ID
token, its trace, bounded retries and metrics.

Two nginx instances on loopback: A (the caller) proxies its app's calls to B (the callee) with
`mesh_outbound_auth`; the fake metadata server (mesh_test/metadata.py) mints RS256 ID tokens
signed with the suite's RSA key, whose JWKS B trusts; B verifies them (`mesh_auth`, RBAC on A's
identity) and forwards to the echo upstream, "B's app", which shows what it received.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_test.client import request
from mesh_test.live import wait_until, wait_workers
from mesh_test.metadata import SERVICE_ACCOUNT, MetadataServer, token_claims
from mesh_test.nginx import emerg_at_marked_line, passes_nginx_t, render
from mesh_test.tokens import KID_RSA, jwks_token, now

B_AUD = "https://callee-abc123-uc.a.run.app"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

# The callee: verifies Google-shaped ID tokens (the fake metadata server signs them with the
# suite's RSA key) and allows only A's service account.
B_CONF = f"""
mesh_provider google {{
    issuer    https://accounts.google.com;
    keys      @KEYS@/jwks.json;
    principal email;
    audience  {B_AUD};
}}
mesh_provider callers {{
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience aud-gateway;
}}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{
        mesh_auth google;
        mesh_allow {SERVICE_ACCOUNT};
        mesh_forward_identity on;
        mesh_trace on;
        proxy_pass http://@UPSTREAM@;
    }}
}}
"""

# What the image's egress routes use, and what README shows: keepalive toward the callee,
# at most 2 tries, idempotent methods only (nginx never retries POST, LOCK, PATCH without
# `non_idempotent`), on connect errors, 502, 503, 504, within 10 s in all.
EGRESS_PROXY = """
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_next_upstream error timeout http_502 http_503 http_504;
        proxy_next_upstream_tries 2;
        proxy_next_upstream_timeout 10s;
"""


def a_conf(md_url: str, b_port: int, *, more_http: str = "", first_peer: str = "") -> str:
    return f"""
mesh_metadata_server {md_url};
mesh_outbound_token $callee_token {B_AUD};
mesh_log_level warn;
{more_http}
mesh_provider callers {{
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience aud-gateway;
}}
upstream callee {{
    {first_peer}
    server 127.0.0.1:{b_port} max_fails=0;
    keepalive 8;
}}
server {{
    listen 127.0.0.1:@PORT@ reuseport;
    location /callee/ {{
        mesh_outbound_auth $callee_token;
        mesh_trace on;
        {EGRESS_PROXY}
        proxy_pass http://callee/;
    }}
    # a gateway: verifies its callers, then calls the callee as itself
    location /gateway/ {{
        mesh_auth callers;
        mesh_outbound_auth $callee_token;
        {EGRESS_PROXY}
        proxy_pass http://callee/;
    }}
    location = /metrics {{ mesh_status; }}
}}
"""


@pytest.fixture
def metadata(keyring):
    made: list[MetadataServer] = []

    def make(**kw) -> MetadataServer:
        kw.setdefault("signer", (keyring.rsa, KID_RSA))
        md = MetadataServer(**kw)
        made.append(md)
        return md

    yield make
    for md in made:
        md.close()


def start_pair(launcher_fn, md: MetadataServer, **kw):
    b = launcher_fn.start(B_CONF)
    a = launcher_fn.start(a_conf(md.url, b.port, **kw))
    wait_workers(a.ngx)
    return a, b


def bearer_of(value: str | None) -> str:
    assert value and value.startswith("Bearer "), value
    return value[len("Bearer "):]


# ---------------------------------------------------------------- identity and trace

def test_the_callee_sees_the_callers_identity_and_trace(module_path, metadata, launcher_fn):
    md = metadata()
    a, b = start_pair(launcher_fn, md)
    resp = a.get("/callee/orders?id=7", [("traceparent", TRACEPARENT),
                                          ("X-Serverless-Authorization", "Bearer forged")])
    assert resp.status == 200, resp
    # B verified A's token (RBAC allows only A's service account) and named A to its app
    assert resp.upstream_header("X-Mesh-Caller") == SERVICE_ACCOUNT, resp
    assert resp.json()["path"] == "/orders?id=7"
    token = bearer_of(resp.upstream_header("Authorization"))
    assert token == [r.token for r in md.requests() if r.token][-1]
    assert token_claims(token)["aud"] == B_AUD
    # the client's X-Serverless-Authorization never passes
    assert resp.upstream_headers("X-Serverless-Authorization") == [], resp
    # A's trace continued through B
    tp = resp.upstream_header("traceparent")
    assert tp and tp.split("-")[1] == TRACE_ID, tp


def test_an_outbound_call_is_exported_as_a_client_span(module_path, metadata, launcher_fn):
    from mesh_test.otlp import OtlpReceiver, attrs

    receiver = OtlpReceiver()
    try:
        md = metadata()
        a, _b = start_pair(launcher_fn, md, more_http=f"mesh_trace_export {receiver.url} interval=50ms;")
        resp = a.get("/callee/orders", [("traceparent", TRACEPARENT)])
        assert resp.status == 200, resp
        _, _, span = receiver.span_of(TRACE_ID)
        assert span.kind == 3  # SPAN_KIND_CLIENT: the app's call, leaving through nginx
        # the app's own span is its parent (B starts its hop under this span, with an id of its own)
        assert span.parent_span_id.hex() == TRACEPARENT.split("-")[2]
        assert attrs(span.attributes)["mesh.route"] == "/callee/"
        assert span.name == "GET /callee/"
    finally:
        receiver.close()


def test_the_apps_own_authorization_is_kept_and_the_token_travels_in_x_serverless_authorization(
        module_path, metadata, launcher_fn):
    md = metadata()
    a, b = start_pair(launcher_fn, md)
    resp = a.get("/callee/x", [("Authorization", "Basic YXBwOnNlY3JldA==")])
    assert resp.status == 200, resp
    assert resp.upstream_header("Authorization") == "Basic YXBwOnNlY3JldA==", resp
    token = bearer_of(resp.upstream_header("X-Serverless-Authorization"))
    assert token_claims(token)["email"] == SERVICE_ACCOUNT
    assert resp.upstream_header("X-Mesh-Caller") == SERVICE_ACCOUNT


@pytest.mark.parametrize("where", ["authorization", "x-serverless-authorization"])
def test_a_gateway_never_forwards_its_callers_token_as_its_own_identity(
        module_path, metadata, launcher_fn, keyring, where):
    md = metadata()
    a, b = start_pair(launcher_fn, md)
    caller = jwks_token(keyring, {"iss": "https://jwks.mesh.test", "sub": "mobile-app",
                                  "aud": "aud-gateway", "exp": now() + 300})
    # without a token the gateway refuses (mesh_auth), and B never sees the request
    before = b.echo.requests
    assert a.get("/gateway/x").status == 401
    assert b.echo.requests == before
    if where == "authorization":
        headers = [("Authorization", f"Bearer {caller}")]
    else:
        headers = [("X-Serverless-Authorization", f"Bearer {caller}"), ("Authorization", "Basic YXBwOnM=")]
    resp = a.get("/gateway/x", headers)
    assert resp.status == 200, resp
    sent = [v for name, v in resp.json()["headers"]]
    assert not any(caller in v for v in sent), f"the caller's token reached the callee: {resp.json()}"
    assert resp.upstream_header("X-Mesh-Caller") == SERVICE_ACCOUNT, resp
    if where == "authorization":
        # the caller's Authorization was its credential for the gateway: replaced by A's token
        assert token_claims(bearer_of(resp.upstream_header("Authorization")))["aud"] == B_AUD
        assert resp.upstream_headers("X-Serverless-Authorization") == []
    else:
        assert resp.upstream_header("Authorization") == "Basic YXBwOnM="
        assert token_claims(bearer_of(resp.upstream_header("X-Serverless-Authorization")))["aud"] == B_AUD


# ---------------------------------------------------------------- no token

def test_no_token_answers_503_with_retry_after_and_the_callee_is_untouched(module_path, metadata, launcher_fn):
    md = metadata(start_up=False)
    a, b = start_pair(launcher_fn, md, more_http="mesh_keys_wait 1s;")
    before = b.echo.requests
    mark = a.ngx.log_mark()
    for _ in range(3):
        t0 = time.monotonic()
        resp = a.get("/callee/x")
        took = time.monotonic() - t0
        assert resp.status == 503, resp
        retry = resp.header("Retry-After")
        assert retry and retry.isdigit() and 1 <= int(retry) <= 60, resp
        assert took < 3.0, f"a request without a token waited {took:.1f}s (mesh_keys_wait 1s)"
    assert b.echo.requests == before, "B's app was reached without a token"
    text = a.ngx.wait_log(mark, lambda t: t.count("mesh_outbound_auth $callee_token") >= 3)
    lines = [l for l in text.splitlines() if "mesh_outbound_auth $callee_token" in l]
    assert len(lines) == 3 and all("[warn]" in l and "refused 503" in l for l in lines), text
    # the metadata server comes up: the next requests carry a token (after the fetch backoff)
    md.up()
    resp = wait_until(lambda: (r := a.get("/callee/x")).status == 200 and r, 40.0, interval=0.5)
    assert resp, "no token within 40 s of the metadata server coming up"
    assert resp.upstream_header("X-Mesh-Caller") == SERVICE_ACCOUNT


# ---------------------------------------------------------------- renewal with a throttled CPU

def _freeze(pids: list[int], seconds: float) -> None:
    """Stops the workers (their timers and fetch threads too), as Cloud Run's CPU throttling
    does between requests, and lets them run again."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_token_that_expired_while_no_timer_ran_is_renewed_by_the_next_request(
        module_path, metadata, launcher_fn):
    lifetime = 4
    md = metadata(lifetime=lifetime)
    a, b = start_pair(launcher_fn, md)
    workers = wait_workers(a.ngx)
    first = a.get("/callee/x")
    assert first.status == 200, first
    old = bearer_of(first.upstream_header("Authorization"))
    # idle for longer than the token's life, with no timer and no thread running; the
    # metadata server answers slowly, so the timer that fires on waking cannot have the
    # token before the request looks
    md.delay = 0.3
    _freeze(workers, lifetime + 1.5)
    since = time.monotonic()
    t0 = time.time()
    resp = a.get("/callee/after-idle")
    took = time.time() - t0
    assert resp.status == 200, f"{resp!r}\n{a.ngx.read_error_log()[-1500:]}"
    token = bearer_of(resp.upstream_header("Authorization"))
    assert token != old
    assert token_claims(token)["exp"] > t0, "the request carried an expired token"
    assert resp.upstream_header("X-Mesh-Caller") == SERVICE_ACCOUNT
    assert took < 3.0, f"the renewal took {took:.2f}s"
    fetched = [r for r in md.requests(since) if r.token]
    assert len(fetched) == 1, f"one fetch for all workers and requests: {fetched}"


def test_a_client_that_leaves_while_its_request_waits_for_a_token_harms_nothing(
        module_path, metadata, launcher_fn):
    lifetime = 3
    md = metadata(lifetime=lifetime)
    a, b = start_pair(launcher_fn, md)
    workers = wait_workers(a.ngx)
    assert a.get("/callee/x").status == 200
    md.delay = 1.0  # the fresh token comes after the clients below have left
    _freeze(workers, lifetime + 1.5)
    before = b.echo.requests
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", a.port), timeout=2) as s:
            s.sendall(b"GET /callee/gone HTTP/1.1\r\nHost: localhost\r\n\r\n")
            time.sleep(0.05)
    time.sleep(1.5)
    md.delay = 0
    resp = a.get("/callee/after")
    assert resp.status == 200, resp
    assert b.echo.requests == before + 1, "a request whose client left was sent upstream"
    assert set(wait_workers(a.ngx)) == set(workers), "a worker died"


def test_a_request_inside_the_renewal_window_goes_on_at_once_and_starts_one_renewal(
        module_path, metadata, launcher_fn):
    lifetime = 8  # renewed halfway, at 4 s
    md = metadata(lifetime=lifetime)
    a, b = start_pair(launcher_fn, md)
    workers = wait_workers(a.ngx)
    old = bearer_of(a.get("/callee/x").upstream_header("Authorization"))
    md.delay = 1.0  # the renewal is slow: requests must not wait for it
    _freeze(workers, lifetime / 2 + 1.0)
    since = time.monotonic()
    results = []

    def call():
        t0 = time.monotonic()
        r = request(a.port, "/callee/y")
        results.append((r, time.monotonic() - t0))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 6
    for r, took in results:
        assert r.status == 200, r
        assert bearer_of(r.upstream_header("Authorization")) == old, "a request waited for the renewal"
        assert took < 0.9, f"a request inside the renewal window waited {took:.2f}s"
    assert md.wait(lambda reqs: any(q.at >= since and q.token for q in reqs), 5.0)
    time.sleep(0.5)
    assert len([q for q in md.requests(since)]) == 1, f"single flight: {md.requests(since)}"
    new = wait_until(lambda: (t := bearer_of(a.get("/callee/z").upstream_header("Authorization"))) != old and t, 3.0)
    assert new, "the renewed token is not in use"


# ---------------------------------------------------------------- retries

class ResettingPeer:
    """Accepts connections and resets each at once (RST): a peer that is down mid-request."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                c.recv(65536)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_a_reset_first_peer_is_retried_on_the_second_but_a_post_never_is(module_path, metadata, launcher_fn):
    peer = ResettingPeer()
    try:
        md = metadata()
        # the resetting peer first, and picked first by every worker (weight)
        a, b = start_pair(launcher_fn, md, first_peer=f"server 127.0.0.1:{peer.port} weight=100 max_fails=0;")
        before = b.echo.requests
        for i in range(3):
            resp = a.get(f"/callee/get-{i}")
            assert resp.status == 200, resp
            assert resp.upstream_header("X-Mesh-Caller") == SERVICE_ACCOUNT
        assert peer.accepted >= 3, f"the first peer was not tried first ({peer.accepted} connections)"
        assert b.echo.requests == before + 3
        tried = peer.accepted
        resp = a.get("/callee/post", method="POST")
        assert resp.status == 502, resp
        assert peer.accepted == tried + 1
        assert b.echo.requests == before + 3, "a POST was retried on the second peer"
    finally:
        peer.close()


# ---------------------------------------------------------------- metrics

def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_outbound_requests_and_token_fetches_are_counted(module_path, metadata, launcher_fn):
    md = metadata()
    a, b = start_pair(launcher_fn, md)
    for _ in range(3):
        assert a.get("/callee/x").status == 200
    assert a.get("/callee/x", method="POST").status == 200
    text = a.get("/metrics").body.decode()
    s = _samples(text)
    route = (("code", "2xx"), ("route", "/callee/"))
    assert s[("mesh_upstream_requests_total", route)] == 4, text
    count = s[("mesh_upstream_duration_seconds_count", (("route", "/callee/"),))]
    assert count == 4
    total = s[("mesh_upstream_duration_seconds_sum", (("route", "/callee/"),))]
    assert 0 < total < 4 * 5.0
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in s.items()
                     if k[0] == "mesh_upstream_duration_seconds_bucket" and dict(k[1])["route"] == "/callee/")
    assert buckets[-1] == (float("inf"), 4)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "buckets are cumulative"
    assert buckets[0][0] <= 0.005 and any(le >= 30 for le, _ in buckets[:-1]), buckets
    assert s[("mesh_outbound_token_fetches_total", (("audience", B_AUD), ("result", "success")))] >= 1
    assert ("mesh_outbound_token_fetches_total", (("audience", B_AUD), ("result", "failure"))) in s
    # the gateway route is listed once it was used; a refusal of mesh_auth is not an outbound call
    assert a.get("/gateway/x").status == 401
    s = _samples(a.get("/metrics").body.decode())
    assert ("mesh_upstream_requests_total", (("code", "4xx"), ("route", "/gateway/"))) not in s or \
        s[("mesh_upstream_requests_total", (("code", "4xx"), ("route", "/gateway/")))] == 0


# ---------------------------------------------------------------- nginx -t

def _render(body: str, conf_dir, keyring) -> str:
    return render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


BAD = [
    ("unknown-variable", "mesh_outbound_token $t https://a.example;\nserver {\n    listen 127.0.0.1:@PORT@;\n"
     "    location / { mesh_outbound_auth $other; proxy_pass http://@UPSTREAM@; }  # BAD\n}",
     ["$other", "mesh_outbound_token"]),
    ("not-a-variable", "mesh_outbound_token $t https://a.example;\nmesh_outbound_auth t;  # BAD", ['"t"']),
    ("nginx-variable", "mesh_outbound_token $t https://a.example;\nserver {\n    listen 127.0.0.1:@PORT@;\n"
     "    mesh_outbound_auth $host;  # BAD\n}", ["$host"]),
    ("twice", "mesh_outbound_token $t https://a.example;\nmesh_outbound_auth $t;\nmesh_outbound_auth off;  # BAD",
     ["duplicate"]),
    ("two-words", "mesh_outbound_token $t https://a.example;\nmesh_outbound_auth $t off;  # BAD",
     ["mesh_outbound_auth"]),
]


@pytest.mark.parametrize("body,words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_mesh_outbound_auth_fails_nginx_t_at_the_line(module_path, conf_dir, keyring, body, words):
    emerg_at_marked_line(_render(body, conf_dir, keyring), conf_dir, words=words)


def test_mesh_outbound_auth_may_come_before_its_token_and_be_turned_off(module_path, conf_dir, keyring):
    body = """
mesh_outbound_auth $late;
server {
    listen 127.0.0.1:@PORT@;
    location /a/ { proxy_pass http://@UPSTREAM@; }
    location /b/ { mesh_outbound_auth off; proxy_pass http://@UPSTREAM@; }
}
mesh_outbound_token $late https://late.example;
"""
    passes_nginx_t(_render(body, conf_dir, keyring), conf_dir)
