"""Hardening, second round: what a security review of the running module found, one section
per finding. Each test is a check a user can make against real nginx: what the client gets,
what reaches the upstream, what `nginx -t` and error.log say, whether a worker survives.
"""

from __future__ import annotations

import re

import pytest

from mesh_test.client import bearer
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import emerg_at_marked_line, render
from mesh_test.tokens import jwks_token

JWKS_ISS = "https://jwks.mesh.test"


def _conf(tmp, body: str, keyring) -> str:
    return render(body, tmp, port=1, upstream="127.0.0.1:1", keys=keyring.dir)


def tok(keyring, sub: str, iss: str = JWKS_ISS, **extra) -> str:
    return jwks_token(keyring, claims(iss=iss, sub=sub, **extra))


# ---------------------------------------------------------------- the module's own zone names

# The shared zones the module makes for itself: a rate zone of the same name must never be
# mistaken for one of them (it once was: every worker charging it died on SIGSEGV).
OWN_ZONES = ["mesh_metrics", "mesh_keys", "callers:mesh_redis"]


@pytest.mark.parametrize("name", OWN_ZONES)
@pytest.mark.parametrize("size", ["128k", "1m"])
def test_a_rate_zone_named_like_an_own_zone_fails_nginx_t(module_path, conf_dir, keyring, name, size):
    body = f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone callers 64k redis=redis://127.0.0.1:1;
mesh_rate_limit_zone "{name}" {size};  # BAD
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / {{ mesh_rate_limit zone={name} rate=1r/m; proxy_pass http://@UPSTREAM@; }}
}}
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert "reserved" in line and name in line, line


@pytest.mark.parametrize("name", OWN_ZONES)
def test_a_limit_naming_an_own_zone_fails_nginx_t(module_path, conf_dir, keyring, name):
    body = f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone callers 64k redis=redis://127.0.0.1:1;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / {{
        mesh_rate_limit zone={name} rate=1r/m;  # BAD
        proxy_pass http://@UPSTREAM@;
    }}
}}
"""
    line = emerg_at_marked_line(_conf(conf_dir, body, keyring), conf_dir)
    assert name in line, line


def test_zones_with_mesh_in_their_name_still_work(module_path, launcher_fn, keyring):
    # only the exact names are reserved: a zone called mesh_metrics2 is a zone like any other
    site = launcher_fn.start(f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone mesh_metrics2 128k;
mesh_rate_limit_zone mesh_keys_x 64k;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location /a/ {{ mesh_rate_limit zone=mesh_metrics2 rate=1r/m; proxy_pass http://@UPSTREAM@; }}
    location /b/ {{ mesh_rate_limit zone=mesh_keys_x rate=1r/m; proxy_pass http://@UPSTREAM@; }}
    location = /metrics {{ mesh_auth off; mesh_status; }}
}}
""")
    t = bearer(tok(keyring, "svc-zone-names"))
    for path in ("/a/x", "/b/x"):
        assert site.get(path, t).status == 200
        assert site.get(path, t).status == 429
    metrics = site.get("/metrics").body.decode()
    assert 'mesh_rate_limited_total{zone="mesh_metrics2"} 1' in metrics, metrics
    assert 'mesh_rate_limited_total{zone="mesh_keys_x"} 1' in metrics, metrics


# ---------------------------------------------------------------- two credential headers

PV_ISS = "https://pv.mesh.test"
SIG_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"

CRED_HTTP = f"""
{JWKS_PROVIDER}
mesh_provider pv {{
    issuer            {PV_ISS};
    keys              @KEYS@/jwks.json;
    audience          aud-orders-7f3;
    platform_verified on;
}}
server {{
    listen 127.0.0.1:@PORT@;
    underscores_in_headers on;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Decision $mesh_decision always;
    proxy_set_header X-Test-Caller $mesh_caller;
    mesh_auth jwks;
    location /          {{ proxy_pass http://@UPSTREAM@; }}
    location /optional/ {{ mesh_auth optional jwks; proxy_pass http://@UPSTREAM@; }}
    location /pv/       {{ mesh_auth pv; proxy_pass http://@UPSTREAM@; }}
    location /cookie/   {{ mesh_token $cookie_id; proxy_pass http://@UPSTREAM@; }}
}}
"""


@pytest.fixture(scope="module")
def cred_site(module_path, launcher):
    return launcher.start(CRED_HTTP)


def _two(name_a: str, a: str, name_b: str, b: str) -> list:
    return [(name_a, f"Bearer {a}"), (name_b, f"Bearer {b}")]


def _refused_twice(site, path: str, headers: list, *tokens: str):
    """Two headers of one credential name: refused. nginx itself answers 400 to a second
    `Authorization` (a header it keeps one of); the module refuses the rest with 401."""
    if sum(1 for n, _ in headers if n.lower() == "authorization") > 1:
        before = site.echo.requests
        resp = site.get(path, headers)
        assert resp.status == 400 and site.echo.requests == before, resp
        return resp
    resp = site.refused(path, headers, "malformed", token=tokens[0])
    for t in tokens[1:]:
        assert t.split(".")[1] not in str(resp), resp
    www = resp.header("WWW-Authenticate")
    assert "two X-Serverless-Authorization headers" in www, www
    return resp


@pytest.mark.parametrize("name_a,name_b", [
    ("Authorization", "Authorization"),
    ("Authorization", "authorization"),
    ("X-Serverless-Authorization", "X-Serverless-Authorization"),
    ("x-serverless-authorization", "X-SERVERLESS-AUTHORIZATION"),
    ("X-Serverless-Authorization", "X_Serverless_Authorization"),
], ids=["authorization", "authorization-cases", "serverless", "serverless-cases", "serverless-underscore"])
def test_two_credential_headers_of_one_name_are_refused(cred_site, keyring, name_a, name_b):
    good = tok(keyring, "svc-two-good")
    other = tok(keyring, "svc-two-other")
    _refused_twice(cred_site, "/x", _two(name_a, good, name_b, other), good, other)
    # the same token twice is no better: which one the upstream reads is not the module's choice
    _refused_twice(cred_site, "/x", _two(name_a, good, name_b, good), good)
    # and under `optional` too: two credentials are not "no credentials"
    _refused_twice(cred_site, "/optional/x", _two(name_a, good, name_b, other), good, other)
    # beside the other credential header as well
    both = _two(name_a, good, name_b, other) + [("Authorization" if "Serverless" in name_a else
                                                 "X-Serverless-Authorization", f"Bearer {good}")]
    _refused_twice(cred_site, "/x", both, good, other)


def test_a_second_authorization_of_another_scheme_is_refused_too(cred_site, keyring):
    good = tok(keyring, "svc-two-basic")
    for name in ("Authorization", "X-Serverless-Authorization"):
        _refused_twice(cred_site, "/x", [(name, f"Bearer {good}"), (name, "Basic dXNlcjpwYXNz")], good)


def test_one_of_each_credential_header_is_cloud_runs_case_and_passes(cred_site, keyring):
    # Cloud Run: the app's own Authorization, the caller's token in X-Serverless-Authorization
    good = tok(keyring, "svc-one-each")
    resp = cred_site.allowed("/x", [("Authorization", "Basic dXNlcjpwYXNz"),
                                    ("X-Serverless-Authorization", f"Bearer {good}")])
    assert resp.upstream_headers("X-Test-Caller") == ["svc-one-each"]


def test_platform_verified_takes_no_forged_stripped_token_beside_a_real_one(cred_site, keyring):
    real = jwks_token(keyring, claims(iss=PV_ISS, sub="svc-real-caller"))
    forged = jwks_token(keyring, claims(iss=PV_ISS, sub="admin@corp.example"), signature_override=SIG_REMOVED)
    # alone, a stripped token is what Cloud Run forwards and what platform_verified accepts
    assert cred_site.allowed("/pv/x", [("X-Serverless-Authorization", f"Bearer {forged}")]) \
        .upstream_headers("X-Test-Caller") == ["admin@corp.example"]
    for first, second in ((forged, real), (real, forged)):
        resp = _refused_twice(cred_site, "/pv/x", _two("X-Serverless-Authorization", first,
                                                       "X-Serverless-Authorization", second), first, second)
        assert resp.status == 401
        _refused_twice(cred_site, "/pv/x", _two("Authorization", first, "authorization", second), first, second)


def test_two_credential_headers_are_refused_with_mesh_token_too(cred_site, keyring):
    good = tok(keyring, "svc-two-cookie")
    assert cred_site.allowed("/cookie/x", [("Cookie", f"id={good}")]).upstream_headers("X-Test-Caller") \
        == ["svc-two-cookie"]
    two = _two("X-Serverless-Authorization", good, "X-Serverless-Authorization", good)
    _refused_twice(cred_site, "/cookie/x", [("Cookie", f"id={good}")] + two, good)


# ---------------------------------------------------------------- the token cache decides nothing

# Two providers of one issuer: q requires a claim, p does not. The rule (README, mesh_auth):
# only the first listed provider of the token's issuer is tried, cached or not.
ONE_ISSUER_HTTP = f"""
mesh_provider q {{
    issuer   {JWKS_ISS};
    keys     @KEYS@/jwks.json;
    audience aud-orders-7f3;
    require  team=payments;
}}
mesh_provider p {{
    issuer   {JWKS_ISS};
    keys     @KEYS@/jwks.json;
    audience aud-orders-7f3;
}}
server {{
    listen 127.0.0.1:@PORT@;
    add_header X-Auth-Status $mesh_auth_status always;
    add_header X-Provider $mesh_provider always;
    location /p/  {{ mesh_auth p;   proxy_pass http://@UPSTREAM@; }}
    location /qp/ {{ mesh_auth q p; proxy_pass http://@UPSTREAM@; }}
    location /pq/ {{ mesh_auth p q; proxy_pass http://@UPSTREAM@; }}
}}
"""


@pytest.fixture(scope="module")
def one_issuer_site(module_path, launcher):
    return launcher.start(ONE_ISSUER_HTTP)


def _answers(conn, path: str, token: str) -> tuple:
    resp = conn.request(path, bearer(token))
    return resp.status, resp.header("X-Auth-Status"), resp.header("X-Provider")


@pytest.mark.parametrize("warm", ["/p/x", "/pq/x", None], ids=["cached-by-p", "cached-by-pq", "uncached"])
def test_the_token_cache_never_changes_an_answer(one_issuer_site, keyring, warm):
    from mesh_test.client import Connection
    outsider = tok(keyring, f"svc-cache-outsider-{warm}")  # no team: q refuses, p accepts
    member = tok(keyring, f"svc-cache-member-{warm}", team="payments")  # both accept
    # one keep-alive connection: one worker, one token cache
    conn = Connection(one_issuer_site.port)
    try:
        if warm:
            assert _answers(conn, warm, outsider)[0] == 200
            assert _answers(conn, warm, member)[0] == 200
        for _ in range(2):  # the second round is served from the cache where the first verified
            assert _answers(conn, "/qp/x", outsider) == (401, "claim_mismatch", None)
            assert _answers(conn, "/qp/x", member) == (200, "verified", "q")
            assert _answers(conn, "/pq/x", outsider) == (200, "verified", "p")
            assert _answers(conn, "/pq/x", member) == (200, "verified", "p")
            assert _answers(conn, "/p/x", outsider) == (200, "verified", "p")
    finally:
        conn.close()


# ---------------------------------------------------------------- X-Mesh-* gone before any access module

# The client's X-Mesh-* headers are dropped before the access phase starts (in the
# server-rewrite phase): an access module that admits the request under `satisfy any` ends
# that phase, whichever module it is and wherever it sits in the load order. What the
# rewrite phases' variables see shows the headers were gone before any access handler ran.
STRIP_HTTP = f"""
{JWKS_PROVIDER}
server {{
    listen 127.0.0.1:@PORT@;
    underscores_in_headers on;
    mesh_auth jwks;
    add_header X-Auth-Status $mesh_auth_status always;
    set $seen_server "$http_x_mesh_caller$http_x_mesh_provider";
    proxy_set_header X-Seen-Server $seen_server;
    location /satisfy/ {{
        satisfy any;
        allow 127.0.0.1;
        deny all;
        set $seen_location "$http_x_mesh_caller$http_x_mesh_provider";
        proxy_set_header X-Seen-Location $seen_location;
        proxy_pass http://@UPSTREAM@;
    }}
    location /authreq/ {{
        satisfy any;
        auth_request /auth;
        proxy_pass http://@UPSTREAM@;
    }}
    location /open/ {{
        mesh_auth off;
        proxy_pass http://@UPSTREAM@;
    }}
    location = /auth {{ internal; mesh_auth off; proxy_pass http://127.0.0.1:@REC@/auth$request_uri; }}
}}
"""

SPOOF = [("X-Mesh-Caller", "admin@corp.example"), ("x_mesh_provider", "google"), ("X-MESH-Claims", "e30")]


def _spoofed(headers) -> list:
    return [(n, v) for n, v in headers if n.lower().replace("_", "-").startswith("x-mesh-")]


@pytest.fixture(scope="module")
def strip_rec():
    from mesh_test.upstream import RecordingUpstream
    rec = RecordingUpstream()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def strip_site(module_path, launcher, strip_rec):
    return launcher.start(STRIP_HTTP.replace("@REC@", str(strip_rec.port)))


@pytest.mark.parametrize("path", ["/satisfy/x", "/open/x"])
def test_client_identity_is_gone_before_the_rewrite_and_access_phases(strip_site, path):
    resp = strip_site.allowed(path, SPOOF, auth_status="missing" if "satisfy" in path else "off")
    headers = resp.json()["headers"]
    assert _spoofed(headers) == [], headers
    assert resp.upstream_headers("X-Seen-Server") == [], headers
    assert resp.upstream_headers("X-Seen-Location") == [], headers


def test_auth_request_under_satisfy_any_sees_and_forwards_no_client_identity(strip_site, strip_rec, keyring):
    resp = strip_site.allowed("/authreq/spoof-1", SPOOF, auth_status="missing")
    assert _spoofed(resp.json()["headers"]) == [], resp.json()["headers"]
    assert _spoofed(strip_rec.received("/auth/authreq/spoof-1")) == []
    # a verified caller admits the request first (auth_request is not asked): the same
    resp = strip_site.allowed("/authreq/spoof-2", SPOOF + bearer(tok(keyring, "svc-strip-areq")))
    assert _spoofed(resp.json()["headers"]) == [], resp.json()["headers"]


# ---------------------------------------------------------------- key URL secrets in logs

SECRETS = ["keyuser", "pa55w0rd-x", "t0psecret-q", "sig-v4lue"]


def _secret_url(base: str, path: str) -> str:
    scheme, rest = base.split("://", 1)
    return f"{scheme}://keyuser:pa55w0rd-x@{rest}{path}?token=t0psecret-q&sig=sig-v4lue"


def test_key_url_credentials_never_reach_a_log(module_path, launcher_fn, conf_dir, keyring):
    from mesh_test.keyserver import KeyServer
    from mesh_test.live import wait_workers
    from mesh_test.nginx import nginx_t
    from mesh_test.tokens import make_token, public_jwk
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ks = KeyServer(None)  # plain http://: nginx -t warns, quoting the URL
    ks.set("/certs", keys=[public_jwk(key, "sec-1")])
    dead = KeyServer(None)
    dead_base = dead.url("")
    dead.close()
    try:
        good, missing = _secret_url(ks.url(""), "/certs"), _secret_url(ks.url(""), "/nothing")
        refused = _secret_url(dead_base, "/certs")
        body = f"""
mesh_keys_wait 1s;
mesh_provider good    {{ issuer https://sec.mesh.test;  keys "{good}";    audience aud-sec; }}
mesh_provider missing {{ issuer https://sec2.mesh.test; keys "{missing}"; audience aud-sec; }}
mesh_provider refused {{ issuer https://sec3.mesh.test; keys "{refused}"; audience aud-sec; }}
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth good missing refused;
    location / {{ proxy_pass http://@UPSTREAM@; }}
}}
"""
        rc, out, _ = nginx_t(_conf(conf_dir, body, keyring), conf_dir)
        assert rc == 0, out
        assert "***@127.0.0.1" in out and "token=***&sig=***" in out, out
        site = launcher_fn.start(body)
        wait_workers(site.ngx)
        t = make_token("RS256", key, claims(iss="https://sec.mesh.test", aud="aud-sec", sub="svc-sec"), kid="sec-1")
        assert site.get("/x", bearer(t)).status == 200
        log = site.ngx.read_error_log()
        assert "keys from http://***@127.0.0.1" in log, log
        assert re.search(r"\[warn\].*mesh_provider \"missing\".*status 404", log), log
        assert re.search(r"mesh_provider \"refused\"", log), log
        for text in (out, log):
            leaked = [s for s in SECRETS if s in text]
            assert leaked == [], f"{leaked} in:\n{text}"
    finally:
        ks.close()


# ---------------------------------------------------------------- what Redis says is bounded

class FakeRedis:
    """A loopback Redis that speaks just enough RESP for a global zone, and lies: every key
    owes `owed_us` (microseconds)."""

    def __init__(self, owed_us: int = 0, flood: str | None = None) -> None:
        import socket
        import threading
        self.owed_us = owed_us
        # flood: answer EVALSHA with an endless bulk string ("bulk"), an endless array
        # ("array"), or a valid reply one byte a second ("trickle")
        self.flood = flood
        self.flooded = 0
        self.evals = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                n = int(line[1:])
                args = []
                for _ in range(n):
                    size = int(f.readline()[1:])
                    args.append(f.read(size + 2)[:-2])
                cmd = args[0].upper()
                if cmd == b"PING":
                    out = b"+PONG\r\n"
                elif cmd == b"SCRIPT":
                    out = b"$40\r\n" + b"0" * 40 + b"\r\n"
                elif cmd == b"EVALSHA":
                    self.evals += 1
                    keys = int(args[2])
                    out = f"*{keys}\r\n".encode() + f":{self.owed_us}\r\n".encode() * keys
                    if self.flood:
                        self._flood(conn, keys)
                        return
                else:
                    out = b"+OK\r\n"
                conn.sendall(out)
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def _flood(self, conn, keys: int) -> None:
        import time
        if self.flood == "trickle":
            for b in f"*{keys}\r\n".encode() + b":1\r\n" * keys:
                if self.closed:
                    return
                conn.sendall(bytes([b]))
                time.sleep(1.0)
            return
        head = b"$2000000000\r\n" if self.flood == "bulk" else b"*2000000000\r\n"
        body = b"x" * 65536 if self.flood == "bulk" else b":1\r\n" * 16384
        conn.sendall(head)
        deadline = time.monotonic() + 8.0
        while not self.closed and time.monotonic() < deadline:
            conn.sendall(body)
            self.flooded += len(body)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def test_an_absurd_owed_value_blocks_a_key_no_longer_than_the_zone_allows(module_path, launcher_fn, keyring):
    import time
    from mesh_test.live import wait_until
    fake = FakeRedis(owed_us=10**15)  # 31 years
    try:
        site = launcher_fn.start(f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone g 64k redis=redis://127.0.0.1:{fake.port} sync=50ms;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / {{ mesh_rate_limit zone=g rate=10r/s burst=1; proxy_pass http://@UPSTREAM@; }}
}}
""")
        t = bearer(tok(keyring, "svc-owed"))
        assert site.get("/x", t).status == 200
        assert wait_until(lambda: fake.evals >= 1, 10.0)
        # Redis claims the key owes 31 years: once the reply is applied, it is refused...
        assert wait_until(lambda: site.get("/x", t).status == 429, 10.0)
        # ...but only for the zone's bound (16 bursts: 16 * (1 + 1) * 100 ms = 3.2 s), not for
        # the 60-120 s an unbounded reply would hold it
        blocked = time.monotonic()
        deadline = blocked + 8.0
        while site.get("/x", t).status != 200:
            assert time.monotonic() < deadline, "the key stayed blocked past its burst"
            time.sleep(0.05)
        # and the lie still limits: the admitted request is charged again, and refused after
        evals = fake.evals
        assert wait_until(lambda: fake.evals > evals, 10.0)
        assert wait_until(lambda: site.get("/x", t).status == 429, 10.0)
    finally:
        fake.close()


# ---------------------------------------------------------------- no targeted eviction

WAYS = 8


def _identity(zone: str, key: str) -> int:
    """The first u64 of a key's identity (`ratetable::key_hash`): SHA-256 of the salt's length,
    the salt (the zone's name) and the key. Before slots were placed under a secret, it chose
    the bucket outright."""
    import hashlib
    import struct
    d = hashlib.sha256(struct.pack("<Q", len(zone)) + zone.encode() + key.encode()).digest()
    return struct.unpack("<Q", d[:8])[0]


def test_colliding_keys_no_longer_evict_a_chosen_caller(module_path, launcher_fn, keyring):
    site = launcher_fn.start(f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone shared 32k;
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ mesh_rate_limit zone=shared rate=1r/m burst=0 key=$arg_k; proxy_pass http://@UPSTREAM@; }}
}}
""")
    slots = int(re.search(r'mesh_rate_limit_zone "shared": (\d+) keys', site.ngx.read_error_log()).group(1))
    buckets = slots // WAYS
    victim = _identity("shared", "victim") % buckets
    # the attack that worked: WAYS keys whose identity falls in the victim's bucket (found
    # offline in a fraction of a second), sent before each of the victim's requests
    colliding = []
    i = 0
    while len(colliding) < 5 * WAYS:
        k = f"attacker-{i}"
        if _identity("shared", k) % buckets == victim:
            colliding.append(k)
        i += 1
    assert site.get("/x?k=victim").status == 200
    reset = 0
    for round_ in range(5):
        for k in colliding[round_ * WAYS:(round_ + 1) * WAYS]:
            site.get(f"/x?k={k}")
        if site.get("/x?k=victim").status == 200:
            reset += 1
    assert reset == 0, f"the victim's limit was reset {reset} times of 5 by {WAYS} colliding keys"
    # without the secret, an attacker's keys land in the victim's bucket one time in `buckets`:
    # evicting the victim between two of its requests takes about as many keys as the zone has
    # slots, a flood of the whole zone. Rounds of doubling size find how many.
    sent, burst = 0, 64
    while True:
        for _ in range(burst):
            site.get(f"/x?k=flood-{sent}")
            sent += 1
        if site.get("/x?k=victim").status == 200:
            break
        assert burst <= 16 * slots, "the victim was never evicted"
        burst *= 2
    print(f"evicting the victim took {burst} random keys between two of its requests; "
          f"the zone has {slots} slots in {buckets} buckets")
    assert burst >= slots // 4, f"only {burst} random keys evicted the victim from {slots} slots"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


@pytest.mark.parametrize("flood", ["bulk", "array", "trickle"])
def test_a_flooding_redis_grows_no_worker_and_limits_still_hold(module_path, launcher_fn, keyring, flood):
    import time
    from mesh_test.live import wait_until, wait_workers
    fake = FakeRedis(flood=flood)
    try:
        site = launcher_fn.start(f"""
{JWKS_PROVIDER}
mesh_rate_limit_zone g 64k redis=redis://127.0.0.1:{fake.port} sync=100ms;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_auth jwks;
    location / {{ mesh_rate_limit zone=g rate=1r/m burst=0; proxy_pass http://@UPSTREAM@; }}
}}
""", workers=1)
        (pid,) = wait_workers(site.ngx)
        before = _rss_kb(pid)
        t = bearer(tok(keyring, f"svc-flood-{flood}"))
        assert site.get("/x", t).status == 200
        assert wait_until(lambda: fake.evals >= 1, 10.0)
        # the sync thread meets the flood; meanwhile the worker answers, limiting locally
        for _ in range(6):
            time.sleep(0.5)
            assert site.get("/x", t).status == 429
        grown = _rss_kb(pid) - before
        assert grown < 16 * 1024, f"the worker grew by {grown} kB while Redis sent {fake.flooded} bytes"
        log = site.ngx.read_error_log()
        why = "timed out" if flood == "trickle" else "reply over the limits"
        assert re.search(rf"\[warn\].*Redis at 127\.0\.0\.1:\d+/0 unreachable \({why}\), limiting locally", log), log
    finally:
        fake.close()
