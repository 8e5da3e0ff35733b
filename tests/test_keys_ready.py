"""Keys are there before traffic is: the shared key store (`mesh_keys_wait`, `mesh_ready`).

At start the master fetches every key URL and outbound token before the workers fork (bounded
by `mesh_keys_wait`), so the first request is answered with keys; a reload keeps what the zone
holds whatever the key server does; all workers share one fetch per refresh (including the
unknown-`kid` refetch); a worker restarted after a crash has keys at once; `mesh_ready` says
whether everything is loaded. The key server (mesh_test/keyserver.py) counts every fetch.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mesh_test.client import Connection, bearer, request
from mesh_test.configs import claims
from mesh_test.keyserver import KeyServer, TestPKI
from mesh_test.live import close_all, keys_warn, pid_of, wait_until, wait_workers, worker_connections
from mesh_test.metadata import MetadataServer
from mesh_test.nginx import emerg_at_marked_line, make_private_dir, nginx_t, render
from mesh_test.procs import threads_of, workers_of
from mesh_test.tokens import make_token, public_jwk

ISS = "https://ready.mesh.test"
ISS2 = "https://second.mesh.test"
AUD = "aud-ready-1"
OUT_AUD = "https://orders-ready-uc.a.run.app"
KID_A, KID_B, KID_C = "ready-a", "ready-b", "ready-c"

START_WARN = re.compile(
    r'\[warn\] \d+#\d+: (mesh_provider|mesh_outbound_token) "([^"]+)": no (?:keys|token) from (the metadata server|\S+) '
    r'within mesh_keys_wait (\d+)s \((.*)\); starting without (?:them|it), the workers keep fetching$'
)


@pytest.fixture(scope="module")
def pki():
    directory = make_private_dir("ngx-mesh-pki-ready-")
    yield TestPKI(directory)
    if not os.environ.get("MESH_KEEP_TMP"):
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def keys():
    return {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in "ABC"}


@pytest.fixture
def servers(pki):
    """Key servers (HTTPS, test CA) and metadata servers; closed after nginx stopped."""
    made: list = []

    def make(kind: str = "keys", **kw):
        server = KeyServer(pki, **kw) if kind == "keys" else MetadataServer(**kw)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def tok(key, kid: str, iss: str = ISS) -> str:
    return make_token("RS256", key, claims(iss=iss, aud=AUD), kid=kid)


def conf(ks: KeyServer | None, *, wait: str | None = None, second: bool = False, md: MetadataServer | None = None,
         more_http: str = "") -> str:
    lines = [more_http]
    if wait is not None:
        lines.append(f"mesh_keys_wait {wait};")
    providers = []
    if ks is not None:
        lines.append(f"mesh_provider live {{ issuer {ISS}; keys {ks.url('/certs')} ca=@TMP@/ca.pem; audience {AUD}; }}")
        providers.append("live")
        if second:
            lines.append(f"mesh_provider second {{ issuer {ISS2}; keys {ks.url('/second')} ca=@TMP@/ca.pem; "
                         f"audience {AUD}; }}")
            providers.append("second")
    if md is not None:
        lines.append(f"mesh_metadata_server {md.url};")
        lines.append(f"mesh_outbound_token $orders_token {OUT_AUD};")
    auth = f"mesh_auth {' '.join(providers)};" if providers else "mesh_auth off;"
    return "\n".join(lines) + f"""
server {{
    listen 127.0.0.1:@PORT@ reuseport;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Pid $pid always;
    {auth}
    location /        {{ proxy_pass http://@UPSTREAM@; }}
    location /open/   {{ mesh_auth off; return 200 "open\\n"; }}
    location = /ready {{ mesh_auth off; mesh_ready; }}
    location /orders/ {{ mesh_auth off; proxy_set_header Authorization "Bearer {'$orders_token' if md else ''}";
                        proxy_pass http://@UPSTREAM@; }}
}}
"""


def start(launcher_fn, body: str, pki, workers: int | None = None):
    """Start nginx (timed: the nginx command returns once the master's start-up fetch is done)."""
    t = time.monotonic()
    site = launcher_fn.start(body, files={"ca.pem": pki.ca_pem}, workers=workers)
    took = time.monotonic() - t
    return site, took


def expect(resp, status: int, auth_status: str):
    assert resp.status == status and resp.header("X-Auth-Status") == auth_status, (
        f"expected {status} {auth_status}, got {resp!r}"
    )
    return resp


def service_workers(master: int) -> list[int]:
    """The worker processes of a master (not its cache manager or loader)."""
    out = []
    for pid in workers_of(master):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"worker process" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


# ---------------------------------------------------------------- start

def test_the_first_request_after_start_is_200(module_path, servers, launcher_fn, keys, pki):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    token = tok(keys["A"], KID_A)
    took = []
    for i in range(5):
        before = ks.count()
        site, t = start(launcher_fn, conf(ks), pki)
        took.append(t)
        # the very first request, as soon as nginx listens
        resp = request(site.port, "/k", bearer(token))
        expect(resp, 200, "verified")
        assert request(site.port, "/ready").status == 200
        assert ks.count() - before == 1, f"start {i}: {ks.count() - before} fetches, expected the master's one"
        site.ngx.stop()
    print(f"\nstart with keys fetched first (5 starts): {', '.join(f'{t:.2f}s' for t in took)}")


def test_a_stalled_key_server_at_start_delays_start_by_the_wait_then_the_workers_recover(
        module_path, servers, launcher_fn, keys, pki):
    ks = servers()
    md = servers("metadata", start_up=False)  # refuses connections
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    ks.set("/second", keys=[public_jwk(keys["B"], KID_B)])
    ks.stall("/certs")
    ks.stall("/second")
    site, took = start(launcher_fn, conf(ks, wait="2s", second=True, md=md), pki)
    assert 1.9 <= took <= 4.5, f"nginx took {took:.2f}s to start with mesh_keys_wait 2s and a stalled key server"
    print(f"\nstalled key server, mesh_keys_wait 2s: nginx started after {took:.2f}s")
    # no thread of the start-up fetch survives into the master (they are joined before fork)
    assert threads_of(site.ngx.pid) == 1
    warns = [m.groups() for m in map(START_WARN.search, site.ngx.read_error_log().splitlines()) if m]
    assert sorted((w[0], w[1]) for w in warns) == [
        ("mesh_outbound_token", OUT_AUD), ("mesh_provider", "live"), ("mesh_provider", "second"),
    ], f"expected one [warn] per provider and token:\n{site.ngx.read_error_log()[-3000:]}"
    assert all(w[3] == "2" for w in warns), warns

    t = time.monotonic()
    resp = request(site.port, "/k", bearer(tok(keys["A"], KID_A)))
    assert time.monotonic() - t < 0.5, "a request waited for the key server"
    expect(resp, 503, "no_keys")
    ready = request(site.port, "/ready")
    assert ready.status == 503, ready
    body = ready.body.decode()
    for what in ('mesh_provider "live": no keys', 'mesh_provider "second": no keys',
                 f'mesh_outbound_token "{OUT_AUD}": no token'):
        assert what in body, f"/ready does not say {what!r}: {body!r}"
    assert ready.header("Cache-Control") == "no-store"

    ks.release("/certs")
    ks.release("/second")
    md.up()
    t_up = time.monotonic()
    ok = wait_until(lambda: request(site.port, "/ready").status == 200, 10.0, interval=0.1)
    assert ok, f"not ready 10 s after the servers came back: {request(site.port, '/ready').body!r}"
    print(f"\nready {time.monotonic() - t_up:.2f}s after the key and metadata servers came back")
    for _ in range(4):
        expect(request(site.port, "/k", bearer(tok(keys["A"], KID_A))), 200, "verified")
        expect(request(site.port, "/k", bearer(tok(keys["B"], KID_B, iss=ISS2))), 200, "verified")


def test_mesh_keys_wait_0_starts_at_once(module_path, servers, launcher_fn, keys, pki):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    ks.stall("/certs")
    site, took = start(launcher_fn, conf(ks, wait="0"), pki)
    assert took < 1.5, f"mesh_keys_wait 0 still waited {took:.2f}s"
    assert not START_WARN.search(site.ngx.read_error_log())
    ks.release("/certs")
    assert wait_until(lambda: request(site.port, "/ready").status == 200, 5.0, interval=0.1)


def test_the_first_outbound_request_after_start_carries_a_token(module_path, servers, launcher_fn, pki):
    md = servers("metadata", lifetime=3600)
    site, _ = start(launcher_fn, conf(None, md=md), pki)
    resp = request(site.port, "/orders/x")
    assert resp.status == 200, resp
    tokens = [r.token for r in md.requests() if r.token]
    assert len(tokens) == 1, f"expected one token fetched for all workers: {md.requests()}"
    assert resp.upstream_header("Authorization") == f"Bearer {tokens[0]}"
    assert request(site.port, "/ready").status == 200
    # every worker sends that same token
    conns = worker_connections(site.ngx)
    try:
        for conn in conns.values():
            r = conn.request("/orders/y")
            assert r.upstream_header("Authorization") == f"Bearer {tokens[0]}", r
    finally:
        close_all(conns)
    assert len(md.requests()) == 1


# ---------------------------------------------------------------- one fetch for all workers

def test_four_workers_make_one_fetch_at_start_and_one_per_refetch(module_path, servers, launcher_fn, keys, pki):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    # a proxy cache: nginx also runs a cache manager and a cache loader, which must not fetch
    cache = "proxy_cache_path @TMP@/cache keys_zone=ready_cache:1m;"
    site, _ = start(launcher_fn, conf(ks, more_http=cache), pki, workers=4)
    wait_until(lambda: len(service_workers(site.ngx.pid)) == 4, 5.0)
    workers = service_workers(site.ngx.pid)
    assert len(workers) == 4 and len(workers_of(site.ngx.pid)) >= 5, workers_of(site.ngx.pid)
    time.sleep(1.0)  # a worker or cache process that fetched on its own would have by now
    assert ks.count() == 1, f"expected the one start-up fetch, got {ks.per_pid()}"

    conns: dict[int, Connection] = {}
    deadline = time.monotonic() + 10
    while set(conns) != set(workers) and time.monotonic() < deadline:
        c = Connection(site.port)
        pid = pid_of(c.request("/open/"))
        if pid in workers and pid not in conns:
            conns[pid] = c
        else:
            c.close()
    assert set(conns) == set(workers), f"reached {sorted(conns)} of {workers}"
    try:
        ks.set("/certs", keys=[public_jwk(keys["A"], KID_A), public_jwk(keys["B"], KID_B)])
        new = tok(keys["B"], KID_B)
        first, *others = sorted(conns)
        t0 = time.monotonic()
        expect(conns[first].request("/k", bearer(new)), 401, "unknown_key")
        assert ks.wait_count(2, timeout=3.0) == 2, "the unknown kid did not make a refetch"
        assert ks.fetches()[-1].pid == first, f"the refetch came from {ks.fetches()[-1].pid}, not {first}"
        # every worker takes the new keys from the shared zone within a timer tick or two
        for pid in sorted(conns):
            ok = wait_until(lambda: conns[pid].request("/k", bearer(new)).status == 200, 2.0, interval=0.05)
            assert ok, f"worker {pid} did not adopt the refetched keys"
        adopted = time.monotonic() - t0
        # unknown kids at every worker within 30 s: no more fetches
        ks.set("/certs", keys=[public_jwk(keys[k], f"ready-{k.lower()}") for k in "ABC"])
        for pid in others + [first]:
            expect(conns[pid].request("/k", bearer(tok(keys["C"], KID_C))), 401, "unknown_key")
        time.sleep(1.0)
        assert ks.count() == 2, f"expected 2 fetches in all (start, one refetch), got {ks.fetches()}"
        print(f"\n4 workers: 1 fetch at start, 1 refetch; every worker had the new key {adopted:.2f}s after "
              f"the unknown kid")
    finally:
        close_all(conns)


@pytest.mark.skipif(not os.environ.get("MESH_SLOW_TESTS"), reason="slow (70 s): set MESH_SLOW_TESTS=1")
def test_four_workers_make_one_fetch_per_scheduled_refresh(module_path, servers, launcher_fn, keys, pki):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)], cache_control="max-age=60")
    site, _ = start(launcher_fn, conf(ks), pki, workers=4)
    first = ks.fetches()[0].at
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A), public_jwk(keys["B"], KID_B)], cache_control="max-age=60")
    assert ks.wait_count(2, timeout=70.0) == 2
    gap = ks.fetches()[1].at - first
    assert 59.0 <= gap <= 62.0, f"refreshed after {gap:.1f}s (max-age=60)"
    time.sleep(1.0)
    assert ks.count() == 2, ks.fetches()
    for _ in range(8):
        expect(request(site.port, "/k", bearer(tok(keys["B"], KID_B))), 200, "verified")


# ---------------------------------------------------------------- reloads and restarts

def _load(port: int, token: str, stop: threading.Event, out: list, lock: threading.Lock) -> None:
    while not stop.is_set():
        try:
            resp = request(port, "/k", bearer(token))
            status = resp.status
        except OSError as e:
            status = f"error: {e!r}"
        with lock:
            out.append(status)


@pytest.mark.parametrize("mode", ["healthy", "status-500", "stall"])
def test_three_reloads_under_load_answer_only_200(module_path, servers, launcher_fn, keys, pki, mode):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    site, _ = start(launcher_fn, conf(ks), pki, workers=4)
    wait_workers(site.ngx)
    fetched = ks.count()
    if mode == "status-500":
        ks.set("/certs", body=b"internal error\n", status=500)
    elif mode == "stall":
        ks.stall("/certs")
    statuses: list = []
    lock = threading.Lock()
    stop = threading.Event()
    token = tok(keys["A"], KID_A)
    clients = [threading.Thread(target=_load, args=(site.port, token, stop, statuses, lock)) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        time.sleep(0.3)
        for _ in range(3):
            site.ngx.reload(timeout=10.0)
            time.sleep(0.3)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=10)
    counts: dict = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    assert len(statuses) > 50, f"too few requests to tell: {counts}"
    assert counts == {200: len(statuses)}, f"3 reloads with the key server {mode}: {counts}"
    assert ks.count() == fetched, f"a reload fetched keys again: {ks.fetches()[fetched:]}"
    print(f"\n3 reloads, 4 clients, key server {mode}: {len(statuses)} requests, all 200")


def test_a_reload_that_adds_a_provider_fetches_it_before_the_new_workers_answer(
        module_path, servers, launcher_fn, keys, pki):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    ks.set("/second", keys=[public_jwk(keys["B"], KID_B)])
    site, _ = start(launcher_fn, conf(ks), pki)
    # nginx listens before its workers fork (and before the start-up fetch): wait for them, so
    # that the reload below replaces these workers
    wait_workers(site.ngx)
    assert (ks.count("/certs"), ks.count("/second")) == (1, 0)
    ngx = site.ngx
    ngx.conf_text = render(conf(ks, second=True), ngx.tmp, port=ngx.port, upstream=ngx.upstream, keys=ngx.keys,
                           workers=ngx.workers)
    ngx.conf_path.write_text(ngx.conf_text)
    mark = ngx.log_mark()
    ngx.reload(timeout=10.0)
    for token in (tok(keys["B"], KID_B, iss=ISS2), tok(keys["A"], KID_A)):
        resp = request(site.port, "/k", bearer(token))
        assert resp.status == 200 and resp.header("X-Auth-Status") == "verified", (
            f"{resp!r}\nworkers {workers_of(ngx.pid)}\n{ngx.log_since(mark)[-3000:]}"
        )
    assert (ks.count("/certs"), ks.count("/second")) == (1, 1), ks.fetches()


def test_a_killed_worker_is_replaced_by_one_that_has_the_keys_at_once(module_path, servers, launcher_fn, keys, pki):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    site, _ = start(launcher_fn, conf(ks), pki, workers=2)
    old = wait_workers(site.ngx)
    victim = old[0]
    site.ngx.kill_worker(victim)
    new = wait_until(lambda: (w := set(workers_of(site.ngx.pid)) - set(old)) and w, 5.0)
    assert new, f"no replacement for worker {victim}"
    (replacement,) = new
    token = tok(keys["A"], KID_A)
    deadline = time.monotonic() + 5.0
    while True:
        resp = request(site.port, "/k", bearer(token))
        if pid_of(resp) == replacement:
            break
        assert time.monotonic() < deadline, "no request reached the replacement worker"
    expect(resp, 200, "verified")
    assert ks.count() == 1, f"the replacement fetched again: {ks.fetches()}"
    log = site.ngx.read_error_log()
    assert f"worker process {victim} exited on signal 9" in log
    assert not [l for l in log.splitlines() if "exited on signal" in l and f" {victim} " not in l]


# ---------------------------------------------------------------- configuration

def _render(body: str, conf_dir, keyring) -> str:
    return render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


@pytest.mark.parametrize("line,word", [
    ("mesh_keys_wait abc;  # BAD", "abc"),
    ("mesh_keys_wait 500ms;  # BAD", "500ms"),
    ("mesh_keys_wait 10m;  # BAD", "at most 120s"),
    ("mesh_keys_wait 1s;\nmesh_keys_wait 2s;  # BAD", "duplicate"),
    ("server { listen 127.0.0.1:8; location / { mesh_keys_wait 1s;  # BAD\n} }", "mesh_keys_wait"),
    ("server { listen 127.0.0.1:8; location / { mesh_ready on;  # BAD\n} }", "mesh_ready"),
    ("server { listen 127.0.0.1:8; mesh_ready;  # BAD\n}", "mesh_ready"),
    ("server { listen 127.0.0.1:8; location / { return 200; mesh_ready; mesh_ready;  # BAD\n} }", "mesh_ready"),
], ids=["not-a-time", "milliseconds", "too-long", "twice", "in-location", "with-argument", "in-server",
        "twice-in-location"])
def test_bad_keys_wait_and_ready_lines_fail_nginx_t_at_the_line(module_path, conf_dir, keyring, line, word):
    found = emerg_at_marked_line(_render(line, conf_dir, keyring), conf_dir)
    assert word in found, found


def test_nginx_t_fetches_nothing(module_path, servers, conf_dir, keyring, keys, pki):
    ks = servers()
    ks.set("/certs", keys=[public_jwk(keys["A"], KID_A)])
    (conf_dir / "ca.pem").write_bytes(pki.ca_pem)
    rc, out, _ = nginx_t(_render(conf(ks, wait="3s"), conf_dir, keyring), conf_dir)
    assert rc == 0, out
    assert ks.count() == 0, "nginx -t fetched keys"
