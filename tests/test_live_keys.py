"""Keys from a URL, fetched before start and refreshed in the background, once for all workers
(the shared key store); `preset google`; `platform_verified`.

A loopback HTTPS JWKS server (mesh_test/keyserver.py, certificate from a test CA) records every
fetch and the nginx process that made it (from /proc): the master before start, then one worker
per refresh. Keep-alive connections pinned to each worker (`listen ... reuseport` and `$pid` in a
response header) make "the worker that saw the unknown kid" exact. test_keys_ready.py holds the
start, reload and restart guarantees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh_test.client import Connection, bearer, request
from mesh_test.configs import claims
from mesh_test.keyserver import KeyServer, TestPKI
from mesh_test.live import (
    close_all,
    keys_info,
    keys_warn,
    pid_of,
    wait_until,
    wait_workers,
    worker_connections,
)
from mesh_test.nginx import MESH_WORKERS, emerg_at_marked_line, make_private_dir, passes_nginx_t, render
from mesh_test.procs import established_clients_to, thread_names, threads_of, workers_of
from mesh_test.tokens import b64url, make_token, now, public_jwk

ISS = "https://live.mesh.test"
AUD = "aud-live-1"
KID_A, KID_B, KID_C, KID_EC = "live-a", "live-b", "live-c", "live-ec"

# what a refresh (or a [warn] about one) is allowed to take before a test calls it missing:
# a loopback fetch takes milliseconds, so this only bounds a hang
FETCH_WAIT = 10.0
# no request may wait on the key server: a request that waited on a stalled fetch would take
# the fetch's 10 s timeout, so anything under a few seconds proves it did not (however busy)
FAST = 3.0
# the module gives up a stalled fetch after 10 s
FETCH_TIMEOUT = 10.0


def _keep() -> bool:
    return bool(os.environ.get("MESH_KEEP_TMP"))


@pytest.fixture(scope="module")
def pki():
    directory = make_private_dir("ngx-mesh-pki-")
    yield TestPKI(directory)
    if not _keep():
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def other_pki():
    directory = make_private_dir("ngx-mesh-pki-other-")
    yield TestPKI(directory, name="some other CA")
    if not _keep():
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def keys():
    """Signing keys of the live key server: A, B, C (RSA), EC (P-256), G (the "Google" key)."""
    return {
        "A": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "B": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "C": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "EC": ec.generate_private_key(ec.SECP256R1()),
        "G": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture
def servers(pki):
    """Makes key servers (HTTPS with the test CA unless tls=False); all closed afterwards.

    Requested before launcher_fn, so it is torn down after it: nginx stops first."""
    made: list[KeyServer] = []

    def make(*, tls: bool = True, start_up: bool = True) -> KeyServer:
        ks = KeyServer(pki if tls else None, start_up=start_up)
        made.append(ks)
        return ks

    yield make
    for ks in made:
        ks.close()


def live_conf(keys_line: str, *, provider_extra: str = "", more_http: str = "", auth: str = "live",
              locations: str = "") -> str:
    return f"""
mesh_provider live {{
    issuer   {ISS};
    {keys_line}
    audience {AUD};
{provider_extra}
}}
{more_http}
server {{
    listen 127.0.0.1:@PORT@ reuseport;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    add_header X-Pid $pid always;
    proxy_set_header X-Test-Caller $mesh_caller;
    proxy_set_header X-Test-Provider $mesh_provider;
    mesh_auth {auth};
    location /      {{ proxy_pass http://@UPSTREAM@; }}
    location /open/ {{ mesh_auth off; return 200 "open\\n"; }}
{locations}
}}
"""


def keys_line(ks: KeyServer, path: str = "/certs", host: str = "127.0.0.1") -> str:
    ca = " ca=@TMP@/ca.pem" if ks.pki else ""
    return f"keys {ks.url(path, host)}{ca};"


def start(launcher_fn, ks: KeyServer | None, body: str, files: dict | None = None):
    """Start nginx and wait until all its workers run."""
    if files is None:
        files = {"ca.pem": ks.pki.ca_pem} if ks and ks.pki else {}
    site = launcher_fn.start(body, files=files)
    wait_workers(site.ngx)
    return site


def tok(key, kid: str, **over) -> str:
    return make_token("RS256", key, claims(iss=ISS, aud=AUD, **over), kid=kid)


def jwk(key, kid: str) -> dict:
    return public_jwk(key, kid)


def wait_loaded(site, mark: int = 0, provider: str = "live", timeout: float = FETCH_WAIT) -> list:
    """The [info] refresh lines of `provider` since mark (waits for one): the keys are in the shared
    zone. At start the master writes it (before the workers fork); later the worker that fetched."""
    wait_until(lambda: keys_info(site.ngx.log_since(mark), provider), timeout)
    lines = keys_info(site.ngx.log_since(mark), provider)
    assert lines, (
        f"no refresh line of {provider!r} within {timeout}s:\n{site.ngx.log_since(mark)[-3000:]}"
    )
    return lines


def wait_warn(site, mark: int, pid: int | None = None, timeout: float = 3.0, n: int = 1,
              provider: str = "live") -> list:
    """[warn] lines of failed fetches since mark, of worker `pid` (None: of any worker)."""
    def mine():
        return [w for w in keys_warn(site.ngx.log_since(mark), provider) if pid is None or w.pid == pid]
    wait_until(lambda: len(mine()) >= n, timeout)
    return mine()


def expect(conn: Connection, token: str | None, status: int, auth_status: str, path: str = "/k"):
    resp = conn.request(path, bearer(token) if token else None)
    assert resp.status == status and resp.header("X-Auth-Status") == auth_status, (
        f"expected {status} {auth_status}, got {resp!r}"
    )
    if status == 401:
        www = resp.header("WWW-Authenticate")
        assert www and www.startswith('Bearer realm="mesh"'), resp
        assert resp.header("X-Decision") == "unauthenticated", resp
    return resp


def poll_status(conn: Connection, token: str, status: int, timeout: float, interval: float = 0.1):
    """Send token on conn until the answer is `status` (bounded); (last response, attempts)."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        resp = conn.request("/k", bearer(token))
        if resp.status == status or time.monotonic() >= deadline:
            return resp, attempts
        time.sleep(interval)


# ---------------------------------------------------------------- keys load

@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_keys_from_a_url_are_fetched_once_for_all_workers_at_start(module_path, servers, launcher_fn, keys, tls):
    ks = servers(tls=tls)
    ks.set(keys=[jwk(keys["A"], KID_A), jwk(keys["EC"], KID_EC)])
    site = start(launcher_fn, ks, live_conf(keys_line(ks)))
    workers = workers_of(site.ngx.pid)
    assert len(workers) == MESH_WORKERS

    lines = wait_loaded(site)
    assert [(l.keys, l.url, l.refresh) for l in lines] == [(2, ks.url(), 3600)], lines
    assert lines[0].pid not in workers, "the keys were fetched by a worker, not before start"
    time.sleep(1.0)  # a second fetch, if some worker made one, would be here by now
    assert ks.count("/certs") == 1, f"expected one fetch at start for all workers, got {ks.per_pid()}"
    assert not set(ks.per_pid()) & set(workers), ks.per_pid()
    assert not ks.handshake_failures, ks.handshake_failures

    conns = worker_connections(site.ngx)
    try:
        for pid, conn in conns.items():
            for token in (tok(keys["A"], KID_A, sub=f"svc-live-{pid}"),
                          make_token("ES256", keys["EC"], claims(iss=ISS, aud=AUD, sub=f"svc-live-{pid}"), kid=KID_EC)):
                resp = expect(conn, token, 200, "verified")
                assert pid_of(resp) == pid
                assert resp.upstream_header("X-Test-Caller") == f"svc-live-{pid}"
                assert resp.upstream_header("X-Test-Provider") == "live"
    finally:
        close_all(conns)
    site.allowed("/k", bearer(tok(keys["A"], KID_A)))
    forged = tok(keys["B"], KID_A)  # a key the server never published, under a published kid
    site.refused("/k", bearer(forged), "bad_signature", token=forged)
    assert ks.count() == 1, "verifying tokens made a worker fetch again"


# ---------------------------------------------------------------- rotation, refetch rate limit

def test_a_rotated_key_is_fetched_on_its_first_token_and_accepted_on_the_next(module_path, servers, launcher_fn,
                                                                              keys):
    ks = servers()
    ks.set(keys=[jwk(keys["A"], KID_A)])
    site = start(launcher_fn, ks, live_conf(keys_line(ks)))
    wait_loaded(site)
    conns = worker_connections(site.ngx)
    try:
        ks.set(keys=[jwk(keys["A"], KID_A), jwk(keys["B"], KID_B)])
        old, new = tok(keys["A"], KID_A), tok(keys["B"], KID_B)
        t0 = time.monotonic()
        x = sorted(conns)[0]
        mark = site.ngx.log_mark()
        before = site.echo.requests
        resp = expect(conns[x], new, 401, "unknown_key")
        assert pid_of(resp) == x
        assert site.echo.requests == before
        # the worker refetches at once, in the background
        assert ks.wait_pid(x, since=t0, timeout=3.0), f"worker {x} did not refetch after an unknown kid"
        refreshed = wait_until(lambda: [l for l in keys_info(site.ngx.log_since(mark)) if l.pid == x], 3.0)
        assert refreshed and refreshed[0].keys == 2, site.ngx.log_since(mark)
        # the very next request with the new kid passes
        expect(conns[x], new, 200, "verified")
        expect(conns[x], old, 200, "verified")
        # every other worker takes the new keys from the shared zone, without a fetch of its own
        for pid, conn in conns.items():
            resp, _ = poll_status(conn, new, 200, timeout=2.0, interval=0.05)
            assert resp.status == 200, f"worker {pid} did not adopt the refetched keys: {resp!r}"
            expect(conn, old, 200, "verified")
        time.sleep(0.5)
        assert ks.per_pid(since=t0) == {x: 1}, (
            f"expected exactly one refetch, by the worker that saw the unknown kid, got {ks.per_pid(since=t0)}"
        )

        # another unknown kid within 30 s of that refetch: refused, and no fetch (rate-limited)
        t1 = time.monotonic()
        ks.set(keys=[jwk(keys["A"], KID_A), jwk(keys["B"], KID_B), jwk(keys["C"], KID_C)])
        for _ in range(3):
            for conn in conns.values():
                expect(conn, tok(keys["C"], KID_C), 401, "unknown_key")
        time.sleep(1.5)
        since = time.monotonic() - t0
        assert since < 30, f"the test took {since:.1f}s: too slow to tell the 30 s refetch limit"
        assert ks.count(since=t1) == 0, f"refetched within 30 s of the last refetch: {ks.fetches(since=t1)}"
    finally:
        close_all(conns)


OTHER_ISS = "https://other-live.mesh.test"


def test_an_unknown_kid_refetches_only_the_url_of_its_issuers_provider(module_path, servers, launcher_fn, keys):
    ks = servers()
    ks.set("/certs", keys=[jwk(keys["A"], KID_A)])
    ks.set("/other", keys=[jwk(keys["C"], KID_C)])
    other = (f"mesh_provider other {{ issuer {OTHER_ISS}; {keys_line(ks, '/other')} audience {AUD}; }}\n")
    site = start(launcher_fn, ks, live_conf(keys_line(ks), more_http=other, auth="live other"))
    wait_loaded(site)
    wait_loaded(site, provider="other")
    conns = worker_connections(site.ngx)
    try:
        t0 = time.monotonic()
        # both URLs now publish B: a refetch of /other would be one the token did not ask for
        ks.set("/certs", keys=[jwk(keys["A"], KID_A), jwk(keys["B"], KID_B)])
        ks.set("/other", keys=[jwk(keys["C"], KID_C), jwk(keys["B"], KID_B)])
        new = tok(keys["B"], KID_B)
        x = sorted(conns)[0]
        expect(conns[x], new, 401, "unknown_key")
        assert ks.wait_pid(x, path="/certs", since=t0, timeout=FETCH_WAIT), f"worker {x} did not refetch"
        # one refetch for all workers: every worker takes it from the shared zone
        for pid, conn in conns.items():
            resp, _ = poll_status(conn, new, 200, timeout=FETCH_WAIT)
            assert resp.status == 200, f"worker {pid}: {resp!r}"
        time.sleep(1.0)  # a fetch of /other, if one was started, would be here by now
        assert ks.per_pid("/certs", since=t0) == {x: 1}, ks.fetches(since=t0)
        assert ks.count("/other", since=t0) == 0, f"the other provider's URL was fetched: {ks.fetches('/other', t0)}"

        # the other provider's own refetch allowance is untouched: its unknown kid fetches at once
        t1 = time.monotonic()
        other_new = make_token("RS256", keys["B"], claims(iss=OTHER_ISS, aud=AUD), kid=KID_B)
        expect(conns[x], other_new, 401, "unknown_key")
        assert ks.wait_pid(x, path="/other", since=t1, timeout=FETCH_WAIT), "no refetch of the other provider's keys"
        for pid, conn in conns.items():
            resp, _ = poll_status(conn, other_new, 200, timeout=FETCH_WAIT)
            assert resp.status == 200 and resp.header("X-Auth-Status") == "verified", resp
            assert resp.upstream_header("X-Test-Provider") == "other", resp
        assert ks.per_pid("/other", since=t1) == {x: 1}, ks.fetches("/other", t1)
    finally:
        close_all(conns)


def test_a_burst_of_unknown_kids_makes_one_refetch_for_all_workers(module_path, servers, launcher_fn, keys):
    ks = servers()
    ks.set(keys=[jwk(keys["A"], KID_A)])
    site = start(launcher_fn, ks, live_conf(keys_line(ks)))
    wait_loaded(site)
    conns = worker_connections(site.ngx)
    pinned = list(conns.values())
    try:
        t0 = time.monotonic()
        seen: dict[int, int] = {}
        for i in range(20):
            token = tok(keys["B"], f"burst-{i}")
            if i % 2:
                resp = pinned[i // 2 % len(pinned)].request("/k", bearer(token))
            else:
                resp = request(site.port, "/k", bearer(token))
            assert resp.status == 401 and resp.header("X-Auth-Status") == "unknown_key", resp
            seen[pid_of(resp)] = seen.get(pid_of(resp), 0) + 1
        elapsed = time.monotonic() - t0
        assert elapsed < 20, f"the burst took {elapsed:.1f}s: not a burst within 30 s"
        assert set(seen) == set(conns), seen
        time.sleep(2.0)
        assert ks.count(since=t0) == 1, (
            f"20 unknown kids in {elapsed:.1f}s (per worker {seen}) gave fetches {ks.per_pid(since=t0)}; "
            "expected exactly one refetch for all workers"
        )
        # the keys kept working
        for conn in pinned:
            expect(conn, tok(keys["A"], KID_A), 200, "verified")
    finally:
        close_all(conns)


# ---------------------------------------------------------------- Cache-Control

MAX_AGE_CASES = {
    "ma_none": (None, 3600),
    "ma_5": ("max-age=5", 60),
    "ma_60": ("max-age=60", 60),
    "ma_600": ("public, max-age=600, must-revalidate, no-transform", 600),
    "ma_999999": ("max-age=999999", 86400),
    "ma_nostore": ("no-store", 60),
}


def test_cache_control_max_age_sets_the_next_refresh_within_bounds(module_path, servers, launcher_fn, keys):
    ks = servers()
    providers = ""
    for name, (cc, _) in MAX_AGE_CASES.items():
        ks.set(f"/ma/{name}", keys=[jwk(keys["A"], KID_A)], cache_control=cc)
        providers += (f"mesh_provider {name} {{ issuer https://{name}.mesh.test; "
                      f"keys {ks.url('/ma/' + name)} ca=@TMP@/ca.pem; }}\n")
    body = live_conf(keys_line(ks), more_http=providers, auth="live " + " ".join(MAX_AGE_CASES))
    ks.set(keys=[jwk(keys["A"], KID_A)])
    site = start(launcher_fn, ks, body)
    for name, (cc, expected) in MAX_AGE_CASES.items():
        lines = wait_loaded(site, provider=name)
        assert [l.refresh for l in lines] == [expected], (
            f"Cache-Control {cc!r}: expected one 'next refresh in {expected}s', got {lines}"
        )
    t0 = time.monotonic()
    counts = {name: ks.count(f"/ma/{name}") for name in MAX_AGE_CASES}
    assert counts == {name: 1 for name in MAX_AGE_CASES}, counts
    token = make_token("RS256", keys["A"], claims(iss="https://ma_60.mesh.test", aud=None), kid=KID_A)
    resp = site.allowed("/k", bearer(token))
    assert resp.upstream_header("X-Test-Provider") == "ma_60"
    time.sleep(5.0)
    assert ks.count(since=t0) == 0, f"fetched again within 5 s: {ks.fetches(since=t0)}"


@pytest.mark.skipif(not os.environ.get("MESH_SLOW_TESTS"), reason="slow (70 s): set MESH_SLOW_TESTS=1")
def test_max_age_60_refetches_after_60_seconds(module_path, servers, launcher_fn, keys):
    ks = servers()
    ks.set(keys=[jwk(keys["A"], KID_A)], cache_control="max-age=60")
    site = start(launcher_fn, ks, live_conf(keys_line(ks)))
    wait_loaded(site)
    workers = workers_of(site.ngx.pid)
    first = ks.fetches()
    assert len(first) == 1
    ks.set(keys=[jwk(keys["A"], KID_A), jwk(keys["B"], KID_B)], cache_control="max-age=60")
    wait_until(lambda: len(ks.fetches()) >= 2, 75.0, interval=0.5)
    time.sleep(1.0)
    fetches = ks.fetches()
    assert len(fetches) == 2, f"expected one refresh for all workers within 75 s: {fetches}"
    assert fetches[1].pid in workers, fetches
    gap = fetches[1].at - first[0].at
    assert 59.0 <= gap <= 65.0, f"fetched again after {gap:.1f}s (max-age=60)"
    for _ in range(2 * MESH_WORKERS):
        site.allowed("/k", bearer(tok(keys["B"], KID_B)))


# ---------------------------------------------------------------- the key server fails

FAILURES = ["down", "status-500", "garbage", "empty-jwks", "too-large", "stall"]


@pytest.mark.parametrize("mode", FAILURES)
def test_a_failing_key_server_keeps_the_last_good_keys_and_recovers(module_path, servers, launcher_fn, keys, mode):
    ks = servers()
    good = [jwk(keys["A"], KID_A)]
    rotated = [jwk(keys["A"], KID_A), jwk(keys["B"], KID_B)]
    ks.set(keys=good)
    site = start(launcher_fn, ks, live_conf(keys_line(ks)))
    wait_loaded(site)
    conns = worker_connections(site.ngx)
    try:
        workers = sorted(conns)
        x = workers[0]  # the worker that is made to refetch
        old, new = tok(keys["A"], KID_A), tok(keys["B"], KID_B)

        if mode == "down":
            ks.down()
        elif mode == "status-500":
            ks.set(body=b"internal error\n", status=500)
        elif mode == "garbage":
            ks.set(body=b"<html><body>this is not a key set</body></html>\n")
        elif mode == "empty-jwks":
            ks.set(keys=[])
        elif mode == "too-large":  # a valid JWKS padded past the 1 MiB the module reads
            ks.set(body=b'{"keys": [' + b" " * (1 << 20) + json.dumps(rotated)[1:].encode() + b"}")
        elif mode == "stall":
            ks.set(keys=rotated)
            ks.stall()
        t0 = time.monotonic()
        mark = site.ngx.log_mark()
        expect(conns[x], new, 401, "unknown_key")

        if mode == "stall":
            assert ks.wait_stalled(1, timeout=FETCH_WAIT) >= 1, "the refetch never reached the key server"
            # the worker whose thread waits on the network answers every request at once
            slow = []
            for i in range(50):
                # unknown kids only to the stalled worker (another worker would refetch too)
                pinned = i % 2 == 1
                token = new if pinned and i % 3 == 0 else old
                want = (401, "unknown_key") if token == new else (200, "verified")
                t = time.monotonic()
                resp = conns[x].request("/k", bearer(token)) if pinned else request(site.port, "/k", bearer(token))
                took = time.monotonic() - t
                assert (resp.status, resp.header("X-Auth-Status")) == want, resp
                if took > FAST:
                    slow.append((i, pid_of(resp), round(took, 3)))
            assert not slow, f"requests waited during a stalled key fetch (i, worker, seconds): {slow}"
            warns = wait_warn(site, mark, x, timeout=FETCH_TIMEOUT + 15.0)
        else:
            warns = wait_warn(site, mark, x, timeout=FETCH_WAIT)
        assert warns, f"no [warn] from worker {x} after a failed fetch ({mode}):\n{site.ngx.log_since(mark)}"
        w = warns[0]
        assert (w.url, w.kept, w.retry) == (ks.url(), "keeping the last good keys", 1), w
        reason = w.reason.lower()
        expected_reason = {
            "down": ("refused",),
            "status-500": ("status 500",),
            "garbage": ("bad key set",),
            "empty-jwks": ("bad key set",),
            "too-large": ("limit", "large", "exceed"),
            "stall": ("timeout", "timed out"),
        }[mode]
        assert any(e in reason for e in expected_reason), f"{mode}: reason {w.reason!r} names none of {expected_reason}"
        if mode == "stall":
            took = time.monotonic() - t0
            # given up at 10 s, not held to the key server's 30 s stall limit
            assert FETCH_TIMEOUT - 0.5 <= took <= FETCH_TIMEOUT + 15.0, (
                f"the stalled fetch was given up after {took:.1f}s (10 s expected)")

        # every worker keeps serving with the last good keys
        for _ in range(5):
            for conn in conns.values():
                expect(conn, old, 200, "verified")
            site.allowed("/k", bearer(old))
        if mode != "stall":
            # and retries with backoff: 1 s, then 2 s (whichever worker's timer claims the retry)
            warns = wait_warn(site, mark, None, timeout=3.0, n=2)
            assert [w.retry for w in warns[:2]] == [1, 2], warns

        # restore: the next retry succeeds and the new key is accepted
        mark = site.ngx.log_mark()
        ks.set(keys=rotated)
        if mode == "down":
            ks.up()
        if mode == "stall":
            ks.release()
        resp, attempts = poll_status(conns[x], new, 200, timeout=10.0)
        assert resp.status == 200 and resp.header("X-Auth-Status") == "verified", (
            f"worker {x} did not recover within 10 s ({mode}): {resp!r}\n{site.ngx.log_since(mark)}"
        )
        # the refresh line is written by the publishing worker's timer, maybe after the swap
        recovered = wait_until(lambda: keys_info(site.ngx.log_since(mark)), 2.0)
        assert recovered and recovered[0].keys == 2, site.ngx.log_since(mark)
        # one fetch at a time for all workers: each retry waits for the one before, then backs off
        times = [f.at for f in ks.fetches(since=t0)]
        close = [(round(a - t0, 2), round(b - t0, 2)) for a, b in zip(times, times[1:]) if b - a < 0.9]
        assert not close, f"fetches less than 1 s apart (two in flight, or no backoff): {close}"
        expect(conns[x], old, 200, "verified")
        for conn in conns.values():
            poll_status(conn, new, 200, timeout=2.0, interval=0.05)
            expect(conn, new, 200, "verified")
    finally:
        close_all(conns)


# ---------------------------------------------------------------- no keys yet

def test_provider_without_keys_yet_answers_503_with_retry_after(module_path, servers, launcher_fn, keys):
    """Start with the key server unreachable: nginx waits mesh_keys_wait, then starts; 503 no_keys
    until its first keys arrive."""
    ks = servers(start_up=False)
    ks.set(keys=[jwk(keys["A"], KID_A)])
    mark0 = 0
    site = start(launcher_fn, ks, live_conf(keys_line(ks), more_http="mesh_keys_wait 1s;"))
    conns = worker_connections(site.ngx)
    try:
        token = tok(keys["A"], KID_A)
        for pid, conn in conns.items():
            before = site.echo.requests
            mark = site.ngx.log_mark()
            t = time.monotonic()
            resp = conn.request("/k", bearer(token))
            assert time.monotonic() - t < FAST, "a request waited for the key server"
            assert resp.status == 503, f"expected 503 while no keys are loaded, got {resp!r}"
            retry_after = resp.header("Retry-After")
            assert retry_after is not None and retry_after.isdigit() and int(retry_after) > 0, resp
            assert resp.header("X-Auth-Status") == "no_keys", resp
            assert resp.header("X-Decision") == "unauthenticated", resp
            assert site.echo.requests == before, "a request without keys reached the upstream"
            site.assert_refusal_logged(mark, "no_keys", token=token)
        # without a token there is nothing to verify: 401 missing as always
        site.refused("/k", None, "missing")

        workers = sorted(conns)
        # one worker retries for all, backing off from 1 s
        warns = wait_warn(site, mark0, None, timeout=3.0)
        assert warns and warns[0].kept == "no keys yet" and warns[0].retry == 1 and warns[0].pid in workers, (
            f"{warns}\n{site.ngx.read_error_log()[-2000:]}"
        )
        ks.up()
        t_up = time.monotonic()
        for pid in workers:
            resp, _ = poll_status(conns[pid], token, 200, timeout=20.0, interval=0.2)
            assert resp.status == 200 and resp.header("X-Auth-Status") == "verified", (
                f"worker {pid} still without keys 20 s after the key server came up: {resp!r}"
            )
        took = time.monotonic() - t_up
        # the retries back off 1, 2, 4, 8 s: the server came up ~1 s in, so by the 4 s retry at the latest
        assert took < 10.0, f"keys arrived {took:.1f}s after the server came up"
        site.allowed("/k", bearer(token))
    finally:
        close_all(conns)


# ---------------------------------------------------------------- TLS trust

@pytest.mark.parametrize("case", ["system-store", "other-ca", "hostname-mismatch"])
def test_a_key_server_whose_certificate_is_not_trusted_gives_no_keys(module_path, servers, launcher_fn, keys,
                                                                     other_pki, monkeypatch, case):
    ks = servers()
    ks.set(keys=[jwk(keys["A"], KID_A)])
    if case == "system-store":
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        line, files = f"keys {ks.url()};", {}
    elif case == "other-ca":
        line, files = f"keys {ks.url()} ca=@TMP@/ca.pem;", {"ca.pem": other_pki.ca_pem}
    else:  # the certificate names IP 127.0.0.1 only
        line, files = f"keys {ks.url(host='localhost')} ca=@TMP@/ca.pem;", {"ca.pem": ks.pki.ca_pem}
    site = start(launcher_fn, None, live_conf(line, more_http="mesh_keys_wait 1s;"), files=files)
    warns = wait_warn(site, 0, None, timeout=3.0)
    assert warns and warns[0].kept == "no keys yet", site.ngx.read_error_log()[-2000:]
    assert "certificate" in warns[0].reason, f"the failure is not the certificate's: {warns[0]}"
    resp = site.get("/k", bearer(tok(keys["A"], KID_A)))
    assert resp.status == 503 and resp.header("X-Auth-Status") == "no_keys", resp
    assert ks.count() == 0, f"an HTTP request got through an untrusted TLS connection: {ks.fetches()}"
    assert ks.handshake_failures, "the fetch never reached the key server's TLS handshake"


def test_ssl_cert_file_replaces_the_system_store(module_path, servers, launcher_fn, keys, pki, monkeypatch):
    ks = servers()
    ks.set(keys=[jwk(keys["A"], KID_A)])
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_path))
    site = start(launcher_fn, None, live_conf(f"keys {ks.url()};"))
    wait_loaded(site)
    site.allowed("/k", bearer(tok(keys["A"], KID_A)))


# ---------------------------------------------------------------- reload during a fetch

def test_reload_while_a_key_fetch_is_in_flight(module_path, servers, launcher_fn, keys):
    ks = servers()
    ks.set(keys=[jwk(keys["A"], KID_A)])
    ks.stall()
    site = start(launcher_fn, ks, live_conf(keys_line(ks), more_http="mesh_keys_wait 1s;"))
    master = site.ngx.pid
    # the master's start-up fetch, given up after 1 s, and the one worker's that claimed the retry
    assert ks.wait_stalled(2, timeout=FETCH_WAIT) >= 2, "the first fetches never arrived"
    old = wait_workers(site.ngx)
    for pid in old:
        # the main thread and mesh-fetch (started in init_process: a worker still starting may
        # not have it yet)
        assert wait_until(lambda: threads_of(pid) == 2, 3.0), f"worker {pid} threads: {thread_names(pid)}"
    t = time.monotonic()
    resp = site.get("/k", bearer(tok(keys["A"], KID_A)))
    assert time.monotonic() - t < FAST and resp.status == 503, resp

    t_reload = time.monotonic()
    site.ngx.reload(timeout=10.0)
    new = wait_until(lambda: (w := workers_of(master)) and len(w) == MESH_WORKERS and not set(w) & set(old) and w,
                     5.0)
    assert new and len(new) == MESH_WORKERS and not set(new) & set(old), (
        f"after reload: workers {workers_of(master)}, old {old}"
    )
    took = time.monotonic() - t_reload
    assert took < 5.0, f"old workers took {took:.1f}s to leave"
    assert threads_of(master) == 1, f"the master runs threads: {thread_names(master)}"
    for pid in new:
        n = wait_until(lambda: threads_of(pid) == 2, 3.0)
        assert n, f"worker {pid} threads after reload: {thread_names(pid)} (expected the main one and mesh-fetch)"
        assert "mesh-fetch" in thread_names(pid), thread_names(pid)
    conns_ok = wait_until(lambda: len(established_clients_to(ks.port)) <= MESH_WORKERS, 5.0)
    assert conns_ok, f"{len(established_clients_to(ks.port))} connections to the key server, {MESH_WORKERS} workers"
    assert "exited on signal" not in site.ngx.read_error_log()

    # the new workers' fetches complete once the server answers
    ks.release()
    conns = worker_connections(site.ngx)
    try:
        for pid, conn in conns.items():
            resp, _ = poll_status(conn, tok(keys["A"], KID_A), 200, timeout=FETCH_WAIT)
            assert resp.status == 200, f"worker {pid}: {resp!r}"
    finally:
        close_all(conns)

    # and a second reload, nothing in flight: still one fetch thread per worker, and the keys
    # are kept from the shared zone without a fetch
    before = ks.count()
    site.ngx.reload(timeout=10.0)
    site.allowed("/k", bearer(tok(keys["A"], KID_A)))
    third = workers_of(master)
    assert len(third) == MESH_WORKERS
    for pid in third:
        assert wait_until(lambda: threads_of(pid) == 2, 3.0), thread_names(pid)
    time.sleep(0.5)
    assert ks.count() == before, f"the reload fetched keys again: {ks.fetches()[before:]}"
    assert len(established_clients_to(ks.port)) <= MESH_WORKERS
    site.allowed("/k", bearer(tok(keys["A"], KID_A)))
    assert "exited on signal" not in site.ngx.read_error_log()


# ---------------------------------------------------------------- nginx -t

def _provider(line: str, extra: str = "") -> str:
    return f"""
mesh_provider p {{
    issuer https://p.mesh.test;
    {line}
    {extra}
}}
"""


URL = "https://127.0.0.1:9/certs"
# (id, http body with "# BAD" on the line nginx must report, words of which one must be in it)
BAD_CONFIGS = [
    ("ca-file-missing", _provider(f"keys {URL} ca=@TMP@/no-such-ca.pem;  # BAD"), ["no-such-ca.pem"]),
    ("ca-file-unreadable", _provider(f"keys {URL} ca=@TMP@/ca-dir;  # BAD"), ["ca-dir"]),
    ("ca-file-without-certificate", _provider(f"keys {URL} ca=@TMP@/not-a-ca.pem;  # BAD"), ["not-a-ca.pem"]),
    ("ca-with-a-key-file", _provider("keys @KEYS@/jwks.json ca=@TMP@/ca.pem;  # BAD"), ["ca="]),
    ("ca-with-an-http-url", _provider("keys http://127.0.0.1:9/certs ca=@TMP@/ca.pem;  # BAD"), ["ca="]),
    ("ca-empty", _provider(f"keys {URL} ca=;  # BAD"), ["ca="]),
    ("keys-third-argument", _provider(f"keys {URL} ca=@TMP@/ca.pem extra;  # BAD"), ["keys"]),
    ("keys-url-without-host", _provider("keys https://;  # BAD"), ["https://"]),
    ("keys-url-path-only", _provider("keys https:///certs;  # BAD"), ["https:///certs"]),
    ("unknown-preset", _provider("preset microsoft;  # BAD"), ["microsoft"]),
    ("preset-twice", _provider("preset google;\n    preset google;  # BAD"), ["preset"]),
    ("platform_verified-maybe", _provider("keys @KEYS@/jwks.json;", "platform_verified maybe;  # BAD"),
     ["maybe"]),
    ("platform_verified-without-value", _provider("keys @KEYS@/jwks.json;", "platform_verified;  # BAD"),
     ["platform_verified"]),
]


def _render(body: str, conf_dir, keyring) -> str:
    return render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


def _write_t_files(conf_dir, pki) -> None:
    (conf_dir / "ca.pem").write_bytes(pki.ca_pem)
    (conf_dir / "not-a-ca.pem").write_text("this is not a certificate\n")
    (conf_dir / "ca-dir").mkdir(exist_ok=True)


@pytest.mark.parametrize("body,words", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_live_key_config_fails_nginx_t_at_the_line(module_path, conf_dir, keyring, pki, body, words):
    _write_t_files(conf_dir, pki)
    emerg_at_marked_line(_render(body, conf_dir, keyring), conf_dir, words=words)


GOOD_CONFIGS = [
    # a Google preset needs its audience (test_hardening.py: nginx -t refuses it without one)
    ("preset-google-alone", _provider("preset google;\n    audience https://orders-abc123-uc.a.run.app;")
     .replace("    issuer https://p.mesh.test;\n", "")),
    ("preset-google-with-local-keys", _provider(f"preset google;\n    keys {URL} ca=@TMP@/ca.pem;\n"
                                                "    audience https://orders-abc123-uc.a.run.app;")),
    ("url-keys-with-ca", _provider(f"keys {URL} ca=@TMP@/ca.pem;", "platform_verified on;")),
    ("http-url-keys", _provider("keys http://127.0.0.1:9/certs;", "platform_verified off;")),
]


@pytest.mark.parametrize("body", [c[1] for c in GOOD_CONFIGS], ids=[c[0] for c in GOOD_CONFIGS])
def test_live_key_configs_pass_nginx_t_without_touching_the_network(module_path, conf_dir, keyring, pki, body):
    _write_t_files(conf_dir, pki)
    plain = "keys http://" in body
    out = passes_nginx_t(_render(body, conf_dir, keyring), conf_dir, warn_ok=plain)
    if plain:
        # plain http:// keys pass, with one warning that says why not to
        assert len([l for l in out.splitlines() if "[warn]" in l and "plain http://" in l]) == 1, out


# ---------------------------------------------------------------- preset google, platform_verified

G_AUD = "https://orders-abc123-uc.a.run.app"
G_EMAIL = "checkout-9c1@shop-prod.iam.gserviceaccount.com"
G_KID = "7f1e9c5d4b3a2918f0e6d7c8b9a0f1e2d3c4b5a6"
SIG_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"


def google_claims(**over) -> dict:
    t = now()
    c = {
        "aud": G_AUD,
        "azp": "118044773098211223344",
        "email": G_EMAIL,
        "email_verified": True,
        "exp": t + 3600,
        "iat": t,
        "iss": "https://accounts.google.com",
        "sub": "118044773098211223344",
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def google_token(keys, signature_removed: bool = False, **over) -> str:
    return make_token("RS256", keys["G"], google_claims(**over), kid=G_KID,
                      signature_override=SIG_REMOVED if signature_removed else None)


def google_conf(url: str) -> str:
    keys = f"keys {url} ca=@TMP@/ca.pem;"
    return f"""
mesh_provider google {{
    preset   google;
    {keys}
    audience {G_AUD};
}}
mesh_provider google_pv {{
    preset            google;
    {keys}
    audience          {G_AUD};
    platform_verified on;
}}
mesh_provider google_custom {{
    preset    google;
    issuer    https://custom-google.mesh.test;
    {keys}
    principal sub;
}}
server {{
    listen 127.0.0.1:@PORT@ reuseport;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    add_header X-Pid $pid always;
    proxy_set_header X-Test-Caller $mesh_caller;
    proxy_set_header X-Test-Provider $mesh_provider;
    mesh_auth google;
    location /        {{ proxy_pass http://@UPSTREAM@; }}
    location /pv/     {{ mesh_auth google_pv; proxy_pass http://@UPSTREAM@; }}
    location /custom/ {{ mesh_auth google_custom; proxy_pass http://@UPSTREAM@; }}
    location /open/   {{ mesh_auth off; return 200 "open\\n"; }}
}}
"""


def start_google(launcher, ks: KeyServer, keys):
    ks.set(keys=[jwk(keys["G"], G_KID), jwk(keys["A"], KID_A)])
    site = start(launcher, ks, google_conf(ks.url()))
    for name in ("google", "google_pv", "google_custom"):
        for line in wait_loaded(site, provider=name):
            assert line.url == ks.url(), f"{name} fetched {line.url}, not the keys line written in its block"
    return site


@pytest.fixture(scope="module")
def google_ks(pki):
    ks = KeyServer(pki)
    yield ks
    ks.close()


@pytest.fixture(scope="module")
def google_site(module_path, google_ks, launcher, keys):
    return start_google(launcher, google_ks, keys)


def test_preset_google_with_a_keys_line_uses_that_url(google_site, google_ks):
    # three providers with the same keys line: one source, one fetch for all workers
    assert google_ks.count() == 1, google_ks.fetches()
    assert {f.path for f in google_ks.fetches()} == {"/certs"}
    log = google_site.ngx.read_error_log()
    assert "googleapis" not in log, "a preset's key URL was used although a keys line was written"


@pytest.mark.parametrize("iss", ["https://accounts.google.com", "accounts.google.com"])
def test_a_google_id_token_is_accepted_and_names_the_email(google_site, keys, iss):
    resp = google_site.allowed("/g", bearer(google_token(keys, iss=iss)))
    assert resp.upstream_header("X-Test-Caller") == G_EMAIL
    assert resp.upstream_header("X-Test-Provider") == "google"


@pytest.mark.parametrize("change", [{"email_verified": False}, {"email_verified": None},
                                    {"email": None, "email_verified": None}],
                         ids=["email-not-verified", "email_verified-missing", "no-email"])
def test_preset_google_names_sub_without_a_verified_email(google_site, keys, change):
    # IAM's generateIdToken (includeEmail=false) mints tokens without email: the caller is sub
    resp = google_site.allowed("/g", bearer(google_token(keys, **change)))
    assert resp.upstream_header("X-Test-Caller") == "118044773098211223344"
    assert resp.upstream_header("X-Test-Provider") == "google"


def test_preset_google_without_sub_or_verified_email_is_a_claim_mismatch(google_site, keys):
    token = google_token(keys, sub=None, email_verified=False)
    google_site.refused("/g", bearer(token), "claim_mismatch", token=token)


def test_preset_google_accepts_rs256_only(google_site, keys):
    token = make_token("PS256", keys["G"], google_claims(), kid=G_KID)
    google_site.refused("/g", bearer(token), "bad_signature", token=token)


def test_preset_google_checks_the_audience(google_site, keys):
    token = google_token(keys, aud="https://someone-else-uc.a.run.app")
    google_site.refused("/g", bearer(token), "wrong_audience", token=token)


def test_lines_written_in_the_block_win_over_the_preset(google_site, keys):
    custom = google_token(keys, iss="https://custom-google.mesh.test")
    resp = google_site.allowed("/custom/x", bearer(custom))
    assert resp.upstream_header("X-Test-Caller") == "118044773098211223344", "principal sub replaces email"
    assert resp.upstream_header("X-Test-Provider") == "google_custom"
    # the issuer line replaced the preset's issuers
    token = google_token(keys)
    google_site.refused("/custom/x", bearer(token), "wrong_issuer", token=token)
    # the principal line names the claim alone: a verified email does not replace sub
    resp = google_site.allowed("/custom/x", bearer(google_token(keys, iss="https://custom-google.mesh.test",
                                                                email_verified=False)))
    assert resp.upstream_header("X-Test-Caller") == "118044773098211223344"


def test_signature_removed_by_google_is_accepted_with_platform_verified_on(google_site, keys):
    stripped = google_token(keys, signature_removed=True)
    resp = google_site.allowed("/pv/x", bearer(stripped))
    assert resp.upstream_header("X-Test-Caller") == G_EMAIL
    assert resp.upstream_header("X-Test-Provider") == "google_pv"
    # a properly signed token passes there too
    google_site.allowed("/pv/x", bearer(google_token(keys)))
    # every claim is still checked
    t = now()
    for over, status in [
        ({"exp": t - 600, "iat": t - 4000}, "expired"),
        ({"aud": "https://someone-else-uc.a.run.app"}, "wrong_audience"),
        ({"email_verified": False, "sub": None}, "claim_mismatch"),
        ({"nbf": t + 600}, "not_yet_valid"),
        ({"iss": "https://evil.example.com"}, "wrong_issuer"),
    ]:
        token = google_token(keys, signature_removed=True, **over)
        google_site.refused("/pv/x", bearer(token), status, token=token)
    # any other signature is still checked, near misses included (all valid base64url)
    for sig in ["SIGNATURE_REMOVED_BY_GOOGLA", "SIGNATURE_REMOVED_BY_GOOGLE" + "AAAA", b64url(os.urandom(256))]:
        bogus = make_token("RS256", keys["G"], google_claims(), kid=G_KID, signature_override=sig)
        google_site.refused("/pv/x", bearer(bogus), "bad_signature", token=bogus)
    # once accepted (and cached) under platform_verified on, the same token is still refused where it is off
    resp = google_site.get("/g", bearer(stripped))
    assert resp.status == 401 and resp.header("X-Auth-Status") == "bad_signature", resp


def _sig_removed_warns(text: str) -> list[str]:
    return [l for l in text.splitlines() if "[warn]" in l and SIG_REMOVED in l]


def test_signature_removed_by_google_is_refused_with_one_warning_per_worker(module_path, servers, launcher_fn,
                                                                           keys):
    ks = servers()
    site = start_google(launcher_fn, ks, keys)
    stripped = google_token(keys, signature_removed=True)
    payload = stripped.split(".")[1]
    conns = worker_connections(site.ngx)
    try:
        for pid, conn in conns.items():
            for attempt in range(3):
                before = site.echo.requests
                mark = site.ngx.log_mark()
                resp = expect(conn, stripped, 401, "bad_signature", path="/g")
                assert pid_of(resp) == pid
                assert re.fullmatch(r'Bearer realm="mesh", error="invalid_token", error_description="[^"\\]*"',
                                    resp.header("WWW-Authenticate")), resp
                assert SIG_REMOVED not in resp.header("WWW-Authenticate")
                assert site.echo.requests == before
                text = site.ngx.wait_log(
                    mark, lambda t: any("[info]" in l and "bad_signature" in l for l in t.splitlines()))
                time.sleep(0.1)
                text = site.ngx.log_since(mark)
                infos = [l for l in text.splitlines() if "[info]" in l and "bad_signature" in l]
                assert len(infos) == 1, text
                assert payload not in text, "error.log holds the token's payload"
                warns = _sig_removed_warns(text)
                if attempt == 0:
                    assert len(warns) == 1 and f" {pid}#" in warns[0], (
                        f"worker {pid}: expected one [warn] about {SIG_REMOVED} on its first such token:\n{text}"
                    )
                    warn = warns[0]
                    assert "platform_verified on" in warn, warn
                    assert "invoker" in warn, f"the warning does not say how to turn the invoker check off: {warn}"
                else:
                    assert not warns, f"worker {pid} warned again on its token #{attempt + 1}:\n{text}"
    finally:
        close_all(conns)
    all_warns = _sig_removed_warns(site.ngx.read_error_log())
    per_pid = {pid: sum(f" {pid}#" in w for w in all_warns) for pid in workers_of(site.ngx.pid)}
    assert per_pid == {pid: 1 for pid in per_pid}, per_pid
