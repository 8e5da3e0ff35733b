"""`mesh_outbound_token $VAR AUDIENCE [format=full];` and `mesh_metadata_server URL;`: the master asks the
metadata server for an ID token before start, one worker's background thread keeps it renewed for
all workers (the shared key store), and `$VAR` carries it upstream.

The metadata server is a loopback fake (mesh_test/metadata.py) that, like Google's, answers only
with `Metadata-Flavor: Google` and records every request and the nginx worker that sent it.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from mesh_test.live import (
    TOKEN_EMPTY_WARN,
    TOKEN_INFO,
    TOKEN_WARN,
    close_all,
    matching,
    pid_of,
    wait_until,
    wait_workers,
    worker_connections,
)
from mesh_test.metadata import COMPUTE_ENGINE, IDENTITY_PATH, MetadataServer, make_id_token, token_claims
from mesh_test.nginx import MESH_WORKERS, emerg_at_marked_line, passes_nginx_t, render
from mesh_test.tokens import b64url, json_bytes

ORDERS_AUD = "https://orders-abc123-uc.a.run.app"
# every kind of byte a query value must have encoded (none of them whitespace: nginx -t refuses that)
ODD_AUD = "https://odd.mesh.test/p?x=1&y=a+b;c=d/é%~_.-#f"


def outbound_conf(metadata_url: str | None, more_http: str = "") -> str:
    server_line = f"mesh_metadata_server {metadata_url};" if metadata_url else ""
    return f"""
{more_http}
{server_line}
mesh_outbound_token $orders_token {ORDERS_AUD};
mesh_outbound_token $odd_token "{ODD_AUD}";
server {{
    listen 127.0.0.1:@PORT@ reuseport;
    add_header X-Pid $pid always;
    location /orders/ {{ proxy_set_header Authorization "Bearer $orders_token"; proxy_pass http://@UPSTREAM@; }}
    location /odd/    {{ proxy_set_header Authorization "Bearer $odd_token"; proxy_pass http://@UPSTREAM@; }}
    location /open/   {{ return 200 "open\\n"; }}
    # README's guard: no token, 503 (the upstream never sees an empty "Bearer ")
    location /guarded/ {{
        if ($orders_token = "") {{ return 503; }}
        proxy_set_header Authorization "Bearer $orders_token";
        proxy_pass http://@UPSTREAM@;
    }}
}}
"""


@pytest.fixture
def metadata_servers():
    made: list[MetadataServer] = []

    def make(**kw) -> MetadataServer:
        md = MetadataServer(**kw)
        made.append(md)
        return md

    yield make
    for md in made:
        md.close()


def start(launcher_fn, md: MetadataServer, more_http: str = ""):
    site = launcher_fn.start(outbound_conf(md.url, more_http))
    wait_workers(site.ngx)
    return site


def expected_query(audience: str) -> str:
    return "audience=" + urllib.parse.quote(audience, safe="")


def upstream_authorization(conn, path: str = "/orders/x"):
    resp = conn.request(path)
    assert resp.status == 200, resp
    return pid_of(resp), resp.upstream_header("Authorization")


def is_empty_bearer(value: str | None) -> bool:
    return value is None or value.strip() in ("", "Bearer")


def wait_fetched(md: MetadataServer, audiences, n: int = 1, timeout: float = 5.0) -> bool:
    """Whether `n` tokens of each audience were handed out (by whichever process asked)."""
    def done(reqs):
        return all(sum(1 for r in reqs if r.audience == aud and r.token) >= n for aud in audiences)
    return md.wait(done, timeout)


def tokens(md: MetadataServer, audience: str) -> list[str]:
    return [r.token for r in md.requests() if r.audience == audience and r.token]


# ---------------------------------------------------------------- the fake metadata server itself

def test_fake_metadata_server_requires_the_flavor_header(metadata_servers):
    md = metadata_servers(lifetime=120)
    url = f"{md.url}{IDENTITY_PATH}?{expected_query(ORDERS_AUD)}"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=5)
    assert e.value.code == 403
    req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        token = resp.read().decode()
    c = token_claims(token)
    assert c["aud"] == ORDERS_AUD and abs(c["exp"] - (time.time() + 120)) < 3
    assert [r.status for r in md.requests()] == [403, 200]


# ---------------------------------------------------------------- the token reaches the upstream

def test_the_outbound_token_is_fetched_once_before_start_and_sent_upstream_by_every_worker(
        module_path, metadata_servers, launcher_fn):
    md = metadata_servers(lifetime=3600)
    site = start(launcher_fn, md)
    workers = wait_workers(site.ngx)
    # fetched before the workers started: nginx returned with the tokens in hand
    reqs = md.requests()
    assert len(reqs) == 2, f"expected one request per audience, for all workers: {reqs}"
    for r in reqs:
        assert r.path == IDENTITY_PATH, r
        assert r.flavor == "Google", f"the module did not send Metadata-Flavor: Google: {r}"
        assert r.status == 200, r
        assert r.pid not in workers, f"a worker fetched, not the master before start: {r}"
        assert r.raw_query == expected_query(r.audience), (
            f"audience not percent-encoded as a query value: got {r.raw_query!r}, "
            f"expected {expected_query(r.audience)!r}"
        )
    assert {r.audience for r in reqs} == {ORDERS_AUD, ODD_AUD}

    # the [info] lines: one per audience, renewal 5 minutes before exp
    now_s = int(time.time())
    infos = matching(site.ngx.read_error_log(), TOKEN_INFO)
    assert sorted(m.group(2) for m in infos) == sorted([ORDERS_AUD, ODD_AUD]), infos
    for m in infos:
        # renewed 5 minutes before exp, counted from when the master got the token: between
        # the token's iat and now
        c = token_claims(tokens(md, m.group(2))[0])
        lo, hi = c["exp"] - 300 - now_s - 1, c["exp"] - 300 - c["iat"]
        assert lo <= int(m.group(3)) <= hi, f"a 1 h token renewed in {m.group(3)}s, expected {lo}..{hi}s (3300)"

    conns = worker_connections(site.ngx)
    try:
        for pid, conn in conns.items():
            for path, aud in (("/orders/x", ORDERS_AUD), ("/odd/x", ODD_AUD)):
                got_pid, auth = upstream_authorization(conn, path)
                assert got_pid == pid
                assert auth == f"Bearer {tokens(md, aud)[0]}", f"worker {pid} {path}: upstream got {auth!r}"
    finally:
        close_all(conns)
    time.sleep(0.5)
    assert len(md.requests()) == 2, "requests made the workers fetch again"


def test_the_outbound_token_is_renewed_halfway_through_a_short_life(module_path, metadata_servers, launcher_fn):
    lifetime = 20
    md = metadata_servers(lifetime=lifetime)
    site = start(launcher_fn, md)
    workers = wait_workers(site.ngx)
    assert wait_fetched(md, [ORDERS_AUD]), md.requests()
    first = [r for r in md.requests() if r.audience == ORDERS_AUD][0]
    infos = wait_until(lambda: [m for m in matching(site.ngx.read_error_log(), TOKEN_INFO)
                                if m.group(2) == ORDERS_AUD], 10.0)
    now_s = int(time.time())
    for m in infos:
        c = token_claims(md.tokens_of(int(m.group(1)), ORDERS_AUD)[0])
        lo, hi = (c["exp"] + c["iat"]) // 2 - now_s - 1, (c["exp"] - c["iat"] + 1) // 2
        assert lo <= int(m.group(3)) <= hi, (
            f"a {lifetime} s token should be renewed halfway (in {lo}..{hi}s): {m.group(0)}")
    assert infos, site.ngx.read_error_log()[-2000:]
    conns = worker_connections(site.ngx)
    try:
        for pid, conn in conns.items():
            assert upstream_authorization(conn)[1] == f"Bearer {first.token}"
        # renewal at ~10 s: wait at most 17 s from the first fetch (at 20 s the token expires)
        deadline = first.at + 17.0
        renewed = wait_fetched(md, [ORDERS_AUD], n=2, timeout=max(0.0, deadline - time.monotonic()))
        assert renewed, f"no renewal within 17 s of a {lifetime} s token: {md.requests()}"
        mine = [r for r in md.requests() if r.audience == ORDERS_AUD and r.token]
        gap = mine[1].at - mine[0].at
        # halfway, not at once (0 s) nor at expiry (20 s); seconds of slack for a busy machine
        assert 8.5 <= gap <= 16.0, f"renewed after {gap:.1f}s, expected ~10s (halfway)"
        assert mine[1].token != mine[0].token
        assert mine[1].pid in workers, f"the renewal came from {mine[1].pid}, not a worker"
        old_exp = token_claims(mine[0].token)["exp"]
        for pid, conn in conns.items():
            # the new token is in use by every worker before the old one expires
            auth = wait_until(lambda: (a := upstream_authorization(conn)[1]) == f"Bearer {mine[1].token}" and a, 1.0)
            assert time.time() < old_exp, "the check ran too late to tell"
            assert auth, f"worker {pid} still sends the old token"
        time.sleep(0.5)
        assert len([r for r in md.requests() if r.audience == ORDERS_AUD]) == 2, "one renewal for all workers"
    finally:
        close_all(conns)


# ---------------------------------------------------------------- no token available

def test_while_the_metadata_server_is_down_the_variable_is_empty_and_a_warning_is_logged(
        module_path, metadata_servers, launcher_fn):
    md = metadata_servers(start_up=False)
    site = start(launcher_fn, md, "mesh_keys_wait 1s;")
    workers = wait_workers(site.ngx)
    conns = worker_connections(site.ngx)
    try:
        for pid, conn in conns.items():
            mark = site.ngx.log_mark()
            for _ in range(4):
                got_pid, auth = upstream_authorization(conn)
                assert got_pid == pid
                assert is_empty_bearer(auth), f"worker {pid}: upstream got {auth!r} with no token available"
            text = site.ngx.wait_log(mark, lambda t: bool(matching(t, TOKEN_EMPTY_WARN)), timeout=5.0)
            time.sleep(0.1)
            text = site.ngx.log_since(mark)
            empty = [m for m in matching(text, TOKEN_EMPTY_WARN) if int(m.group(1)) == pid]
            assert len(empty) == 1 and empty[0].group(2) == ORDERS_AUD, (
                f"worker {pid}: expected one [warn] that the variable is empty (at most once a minute), got:\n{text}"
            )
        # the worker that fetches for all says why, and retries with backoff
        got = wait_until(lambda: [m for m in matching(site.ngx.read_error_log(), TOKEN_WARN)
                                  if m.group(2) == ORDERS_AUD], 3.0)
        assert got and got[0].group(4) == "1", f"{got}\n{site.ngx.read_error_log()[-2000:]}"
        assert int(got[0].group(1)) in workers, got[0].group(0)
        assert "refused" in got[0].group(3).lower(), got[0].group(0)
        for pid, conn in conns.items():
            before = site.echo.requests
            resp = conn.request("/guarded/x")
            assert resp.status == 503 and site.echo.requests == before, f"worker {pid}: {resp!r}"
        md.up()
        t_up = time.monotonic()
        for pid, conn in conns.items():
            auth = wait_until(lambda: (a := upstream_authorization(conn)[1]) and not is_empty_bearer(a) and a, 15.0,
                              interval=0.2)
            assert auth, f"worker {pid} has no token 15 s after the metadata server came up"
            assert auth == f"Bearer {tokens(md, ORDERS_AUD)[-1]}", auth
            resp = conn.request("/guarded/x")
            assert resp.status == 200 and resp.upstream_header("Authorization") == auth, resp
        assert time.monotonic() - t_up < 10.0
    finally:
        close_all(conns)


ERRORS = {
    "status-500": ({"status": 500}, "status 500"),
    "not-a-jwt": ({"body": b"this is not a token\n"}, "not a JWT"),
    "jwt-without-exp": ({"body": (b64url(json_bytes({"alg": "RS256"})) + "." + b64url(json_bytes({"aud": "x"}))
                                  + ".c2ln").encode()}, "not a JWT"),
    "expired-token": ({"lifetime": -120}, "expired"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_bad_answer_from_the_metadata_server_is_retried(module_path, metadata_servers, launcher_fn, case):
    settings, reason = ERRORS[case]
    md = metadata_servers(lifetime=3600)
    for name, value in settings.items():
        setattr(md, name, value)
    site = start(launcher_fn, md, "mesh_keys_wait 1s;")
    workers = wait_workers(site.ngx)
    # the start-up fetch said why it gave up, once
    start_warns = [l for l in site.ngx.read_error_log().splitlines()
                   if "[warn]" in l and f'mesh_outbound_token "{ORDERS_AUD}": no token' in l]
    assert len(start_warns) == 1 and reason in start_warns[0], start_warns
    got = wait_until(lambda: [m for m in matching(site.ngx.read_error_log(), TOKEN_WARN)
                              if m.group(2) == ORDERS_AUD], 3.0)
    assert got, f"no [warn] after a bad answer ({case}):\n{site.ngx.read_error_log()[-2000:]}"
    assert int(got[0].group(1)) in workers, got[0].group(0)
    assert reason in got[0].group(3), f"{case}: reason {got[0].group(3)!r} does not say {reason!r}"
    assert got[0].group(4) == "1", got[0].group(0)
    conns = worker_connections(site.ngx)
    try:
        for conn in conns.values():
            assert is_empty_bearer(upstream_authorization(conn)[1])
        md.status, md.body, md.lifetime = 200, None, 3600
        for pid, conn in conns.items():
            auth = wait_until(lambda: (a := upstream_authorization(conn)[1]) and not is_empty_bearer(a) and a, 8.0,
                              interval=0.2)
            assert auth == f"Bearer {tokens(md, ORDERS_AUD)[-1]}", f"worker {pid}: {auth!r}"
    finally:
        close_all(conns)


def test_a_token_fetched_before_is_kept_while_the_metadata_server_fails(module_path, metadata_servers, launcher_fn):
    # a 20 s token is renewed halfway, at 10 s; the server fails then: the variable keeps the
    # token until it expires, 10 s after the failed renewal
    lifetime = 20
    md = metadata_servers(lifetime=lifetime)
    site = start(launcher_fn, md)
    workers = wait_workers(site.ngx)
    assert wait_fetched(md, [ORDERS_AUD]), md.requests()
    md.status = 503
    conns = worker_connections(site.ngx)
    try:
        first = tokens(md, ORDERS_AUD)[0]
        failed = md.wait(lambda reqs: any(r.status == 503 for r in reqs), lifetime / 2 + 5.0)
        assert failed, f"no renewal attempt within {lifetime / 2 + 5.0} s: {md.requests()}"
        for pid, conn in conns.items():
            assert time.time() < token_claims(first)["exp"]
            assert upstream_authorization(conn)[1] == f"Bearer {first}", f"worker {pid} dropped its token"
        # past its exp the token is no longer sent: the variable is empty, and says so once
        latest_exp = token_claims(first)["exp"]
        time.sleep(max(0.0, latest_exp + 1.1 - time.time()))
        for pid, conn in conns.items():
            mark = site.ngx.log_mark()
            auth = upstream_authorization(conn)[1]
            assert is_empty_bearer(auth), f"worker {pid} sent an expired token: {auth!r}"
            text = site.ngx.wait_log(mark, lambda t: bool(matching(t, TOKEN_EMPTY_WARN)), timeout=5.0)
            assert [int(m.group(1)) for m in matching(text, TOKEN_EMPTY_WARN)] == [pid], text
    finally:
        close_all(conns)


# ---------------------------------------------------------------- nginx -t

BAD_CONFIGS = [
    ("variable-without-dollar", "mesh_outbound_token orders_token https://a.example;  # BAD", ["orders_token"]),
    ("variable-only-dollar", "mesh_outbound_token $ https://a.example;  # BAD", ['"$"']),
    ("variable-bad-character", "mesh_outbound_token $orders-token https://a.example;  # BAD", ["$orders-token"]),
    ("format-minimal", "mesh_outbound_token $t https://a.example format=minimal;  # BAD", ["format=minimal"]),
    ("four-arguments", "mesh_outbound_token $t https://a.example format=full x;  # BAD", ["mesh_outbound_token"]),
    ("audience-missing", "mesh_outbound_token $orders_token;  # BAD", ["mesh_outbound_token"]),
    ("metadata-server-ftp", "mesh_metadata_server ftp://x;  # BAD", ["ftp://x"]),
    ("metadata-server-no-host", "mesh_metadata_server http://;  # BAD", ["http://"]),
    ("metadata-server-not-a-url", "mesh_metadata_server metadata.google.internal;  # BAD",
     ["metadata.google.internal"]),
    ("metadata-server-twice",
     "mesh_metadata_server http://127.0.0.1:1;\nmesh_metadata_server http://127.0.0.1:2;  # BAD",
     ["mesh_metadata_server", "duplicate"]),
    ("outbound-in-server",
     "server {\n    listen 127.0.0.1:@PORT@;\n    mesh_outbound_token $t https://a.example;  # BAD\n}",
     ["mesh_outbound_token"]),
    ("metadata-server-in-location",
     "server {\n    listen 127.0.0.1:@PORT@;\n    location / {\n        mesh_metadata_server http://127.0.0.1:1;  # BAD\n"
     "    }\n}", ["mesh_metadata_server"]),
]


def _render(body: str, conf_dir, keyring) -> str:
    return render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


@pytest.mark.parametrize("body,words", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_outbound_config_fails_nginx_t_at_the_line(module_path, conf_dir, keyring, body, words):
    emerg_at_marked_line(_render(body, conf_dir, keyring), conf_dir, words=words)


@pytest.mark.parametrize("metadata", [None, "http://127.0.0.1:1", "http://metadata.google.internal/"],
                         ids=["default-server", "loopback", "trailing-slash"])
def test_outbound_config_passes_nginx_t(module_path, conf_dir, keyring, metadata):
    passes_nginx_t(_render(outbound_conf(metadata), conf_dir, keyring), conf_dir)


def test_make_id_token_is_google_shaped():
    token, exp = make_id_token(ORDERS_AUD, 20, 1)
    c = token_claims(token)
    assert c["exp"] == exp and c["aud"] == ORDERS_AUD and token.count(".") == 2


def test_format_full_asks_for_the_compute_claims(module_path, metadata_servers, launcher_fn):
    md = metadata_servers(lifetime=3600)
    more = f"mesh_outbound_token $full_token {ORDERS_AUD} format=full;"
    body = outbound_conf(md.url, more).replace(
        "    location /open/",
        '    location /full/ { proxy_set_header Authorization "Bearer $full_token"; proxy_pass http://@UPSTREAM@; }\n'
        "    location /open/")
    site = launcher_fn.start(body)
    wait_workers(site.ngx)
    # the same audience twice: two tokens, one asked with format=full
    reqs = [r for r in md.requests() if r.audience == ORDERS_AUD]
    assert sorted((r.format or "") for r in reqs) == ["", "full"], reqs
    full = next(r for r in reqs if r.format == "full")
    assert full.raw_query == expected_query(ORDERS_AUD) + "&format=full", full.raw_query
    plain = next(r for r in reqs if r.format is None)
    conns = worker_connections(site.ngx)
    try:
        for conn in conns.values():
            _, auth = upstream_authorization(conn, "/full/x")
            assert auth == f"Bearer {full.token}", auth
            assert token_claims(full.token)["google"]["compute_engine"] == COMPUTE_ENGINE
            _, auth = upstream_authorization(conn, "/orders/x")
            assert auth == f"Bearer {plain.token}" and "google" not in token_claims(plain.token), auth
    finally:
        close_all(conns)
