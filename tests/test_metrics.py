"""mesh_status: Prometheus metrics summed over every worker, exact after a known sequence of
requests, parsed by the prometheus-client text parser, kept across `nginx -s reload`, and
answered quickly while the workers are busy."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_test.client import Connection, bearer, request
from mesh_test.configs import AUD, ISS_JWKS, ISS_OTHER, ISS_UNLISTED, claims
from mesh_test.live import close_all, wait_until, worker_connections
from mesh_test.nginx import emerg_at_marked_line, nginx_t, render
from mesh_test.tokens import jwks_token, make_token, now

VERSION = "2026-12-01.metrics"
AUD_OTHER = "aud-other-9c1"

HTTP = f"""
mesh_provider jwks {{
    issuer   https://jwks.mesh.test;
    keys     @KEYS@/jwks.json;
    audience {AUD};
}}
mesh_provider other {{
    issuer   https://other.mesh.test;
    keys     @KEYS@/jwks.json;
    audience {AUD_OTHER};
}}
mesh_rate_limit_zone callers 1m;
mesh_rate_limit_zone dry 1m;
mesh_config_version "@VERSION@";
server {{
    listen 127.0.0.1:@PORT@ reuseport;
    add_header X-Pid $pid always;
    location = /metrics {{ allow 127.0.0.1; deny all; mesh_status; }}
    location = /metrics-denied {{ deny all; mesh_status; }}
    location /open/    {{ return 200 "open\\n"; }}
    location /one/     {{ mesh_auth jwks; mesh_allow svc-ok svc-limited; proxy_pass http://@UPSTREAM@; }}
    location /two/     {{ mesh_auth jwks other; proxy_pass http://@UPSTREAM@; }}
    location /dry/     {{ mesh_auth jwks; mesh_deny svc-ok; mesh_policy_dry_run on; proxy_pass http://@UPSTREAM@; }}
    location /limited/ {{ mesh_auth jwks; mesh_rate_limit zone=callers rate=1r/m; proxy_pass http://@UPSTREAM@; }}
    location /dry-limit/ {{
        mesh_auth jwks;
        mesh_rate_limit zone=dry rate=1r/m;
        mesh_rate_limit_dry_run on;
        proxy_pass http://@UPSTREAM@;
    }}
}}
"""

DECISIONS = ["allow", "deny", "unauthenticated", "rate_limited", "would_deny", "would_rate_limit"]
STATUSES = ["missing", "malformed", "bad_signature", "unknown_key", "expired", "not_yet_valid",
            "wrong_issuer", "wrong_audience", "claim_mismatch", "no_keys", "verified"]


def http_body(version: str = VERSION) -> str:
    return HTTP.replace("@VERSION@", version)


def scrape_text(port: int, conn: Connection | None = None) -> str:
    resp = conn.request("/metrics") if conn else request(port, "/metrics")
    assert resp.status == 200, resp
    assert resp.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8", resp
    return resp.body.decode()


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value} as the prometheus-client parser reads them."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    if name == "mesh_requests_total" and "caller" not in labels:
        # summed over the callers and status classes, as `sum by (decision)` does
        want = set(labels.items())
        found = [v for k, v in m.items() if k[0] == name and want <= set(k[1:])]
        assert found, f"no sample {name}{labels}"
        return sum(found)
    key = (name, *sorted(labels.items()))
    assert key in m, f"no sample {key}; have {sorted(k for k in m if k[0] == name)}"
    return m[key]


def counts(m: dict) -> dict:
    """The request-driven counters, as plain dicts (for exact comparison)."""
    return {
        "decisions": {d: value(m, "mesh_requests_total", decision=d) for d in DECISIONS},
        "auth": {(k[1][1], k[2][1]): v for k, v in m.items() if k[0] == "mesh_auth_total" and v},
        "limited": {dict(k[1:])["zone"]: v for k, v in m.items() if k[0] == "mesh_rate_limited_total"},
        "hits": value(m, "mesh_token_cache_hits_total"),
        "misses": value(m, "mesh_token_cache_misses_total"),
    }


def tok(keyring, **kw) -> str:
    return jwks_token(keyring, claims(**kw))


@pytest.fixture(scope="module")
def site(module_path, launcher):
    return launcher.start(http_body())


def run_sequence(port: int, keyring) -> dict:
    """The known sequence, on one keep-alive connection (one worker: the cache counts are
    exact). Returns what it must add to the counters."""
    ok = tok(keyring, sub="svc-ok")
    c = Connection(port)
    try:
        def get(path, token=None, raw=None, expect=200):
            headers = bearer(token) if token else ([("Authorization", raw)] if raw else [])
            resp = c.request(path, headers)
            assert resp.status == expect, (path, resp)
            return resp

        for _ in range(3):                                   # verified: 1 miss, then 2 hits
            get("/one/", ok)
        get("/one/", expect=401)                             # missing
        get("/one/", raw="Bearer abc.def", expect=401)       # malformed
        good = tok(keyring, sub="svc-ok", jti="sig")
        head, payload, sig = good.split(".")
        mid = len(sig) // 2
        flipped = sig[:mid] + ("A" if sig[mid] != "A" else "B") + sig[mid + 1:]
        get("/one/", f"{head}.{payload}.{flipped}", expect=401)                       # bad_signature
        get("/one/", jwks_token(keyring, claims(sub="svc-ok"), kid="no-such-kid"), expect=401)  # unknown_key
        get("/one/", tok(keyring, sub="svc-ok", exp=now() - 3600, iat=now() - 7200), expect=401)  # expired
        get("/one/", tok(keyring, sub="svc-ok", iss=ISS_UNLISTED), expect=401)        # wrong_issuer
        get("/one/", tok(keyring, sub="svc-ok", aud="aud-nobody"), expect=401)        # wrong_audience
        get("/one/", tok(keyring, sub="svc-denied"), expect=403)                      # deny
        get("/two/", tok(keyring, sub="svc-two", iss=ISS_OTHER, aud=AUD_OTHER))       # other verified
        get("/two/", expect=401)                             # missing: no provider can be named
        get("/two/", tok(keyring, sub="svc-two", iss=ISS_OTHER, aud=AUD), expect=401)  # other wrong_audience
        get("/dry/", ok)                                     # would_deny (cache hit)
        get("/limited/", ok)                                 # allowed (hit)
        get("/limited/", ok, expect=429)                     # rate_limited (hit)
        get("/dry-limit/", ok)                               # allowed (hit)
        get("/dry-limit/", ok)                               # would_rate_limit (hit)
        get("/open/")                                        # nothing decided: not counted
    finally:
        c.close()
    return {
        "decisions": {"allow": 6, "deny": 1, "unauthenticated": 9, "rate_limited": 1,
                      "would_deny": 1, "would_rate_limit": 1},
        "auth": {("jwks", "verified"): 9, ("jwks", "missing"): 1, ("jwks", "malformed"): 1,
                 ("jwks", "bad_signature"): 1, ("jwks", "unknown_key"): 1, ("jwks", "expired"): 1,
                 ("jwks", "wrong_issuer"): 1, ("jwks", "wrong_audience"): 1,
                 ("other", "verified"): 1, ("other", "wrong_audience"): 1, ("", "missing"): 1},
        "limited": {"callers": 1, "dry": 0},
        "hits": 7,
        "misses": 10,
    }


def added(before: dict, after: dict) -> dict:
    auth_keys = set(before["auth"]) | set(after["auth"])
    return {
        "decisions": {d: after["decisions"][d] - before["decisions"][d] for d in DECISIONS},
        "auth": {k: after["auth"].get(k, 0) - before["auth"].get(k, 0) for k in auth_keys
                 if after["auth"].get(k, 0) != before["auth"].get(k, 0)},
        "limited": {z: after["limited"][z] - before["limited"].get(z, 0) for z in after["limited"]},
        "hits": after["hits"] - before["hits"],
        "misses": after["misses"] - before["misses"],
    }


def test_a_known_sequence_gives_exactly_its_counts(site, keyring):
    before = counts(samples(scrape_text(site.port)))
    expected = run_sequence(site.port, keyring)
    # A request is counted when it is logged, just after its response went out.
    after_text = wait_until(lambda: (lambda t: t if added(before, counts(samples(t))) == expected else "")(
        scrape_text(site.port)), 2.0) or scrape_text(site.port)
    m = samples(after_text)
    assert added(before, counts(m)) == expected, after_text
    # Every outcome of every configured provider is there, zero or not.
    for p in ("jwks", "other"):
        for s in STATUSES:
            value(m, "mesh_auth_total", provider=p, status=s)
    assert value(m, "mesh_rate_limit_keys", zone="callers") >= 1
    assert value(m, "mesh_rate_limit_keys", zone="dry") >= 1
    assert value(m, "mesh_rate_limit_evictions_total", zone="callers") == 0
    assert value(m, "mesh_keys", provider="jwks") >= 1
    assert value(m, "mesh_keys_last_refresh_timestamp_seconds", provider="jwks") > now() - 3600
    assert value(m, "mesh_keys_refresh_total", provider="jwks", result="failure") == 0
    assert value(m, "mesh_config_info", version=VERSION) == 1
    build = [k for k in m if k[0] == "mesh_build_info"]
    assert len(build) == 1 and m[build[0]] == 1, build
    labels = dict(build[0][1:])
    assert labels["version"] and labels["nginx"][0].isdigit(), labels


def test_every_worker_reports_the_same_sums(site, keyring):
    """Requests spread over all workers; a scrape through each worker shows them all."""
    conns = worker_connections(site.ngx)
    try:
        before = samples(scrape_text(site.port, next(iter(conns.values()))))
        t = tok(keyring, sub="svc-spread", iss=ISS_JWKS)
        for c in conns.values():
            for _ in range(5):
                assert c.request("/two/", bearer(t)).status == 200
        time.sleep(0.2)  # counted when logged, just after the response
        views = [samples(scrape_text(site.port, c)) for c in conns.values()]
    finally:
        close_all(conns)
    n = 5 * len(conns)
    for m in views:
        assert value(m, "mesh_requests_total", decision="allow") - \
            value(before, "mesh_requests_total", decision="allow") == n
        assert value(m, "mesh_auth_total", provider="jwks", status="verified") - \
            value(before, "mesh_auth_total", provider="jwks", status="verified") == n
    assert all(counts(v) == counts(views[0]) for v in views)


def test_the_text_format_is_well_formed(site, keyring):
    text = scrape_text(site.port)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {
        "mesh_requests": "counter", "mesh_auth": "counter", "mesh_rate_limited": "counter",
        "mesh_rate_limit_keys": "gauge", "mesh_rate_limit_evictions": "counter",
        "mesh_token_cache_hits": "counter", "mesh_token_cache_misses": "counter",
        "mesh_keys": "gauge", "mesh_keys_last_refresh_timestamp_seconds": "gauge",
        "mesh_keys_refresh": "counter", "mesh_outbound_token_expiry_seconds": "gauge",
        "mesh_outbound_token_expiry_timestamp_seconds": "gauge",
        "mesh_request_duration_seconds": "histogram",
        "mesh_config_info": "gauge", "mesh_build_info": "gauge",
    }
    for name, kind in kinds.items():
        assert name in families, f"{name} missing from:\n{text}"
        assert families[name].type == kind, (name, families[name].type)
        assert families[name].documentation, name
    for line in text.splitlines():
        if line.startswith("# TYPE") and line.endswith("counter"):
            assert line.split()[2].endswith("_total"), line
    # One HELP and one TYPE per family, each family's samples together.
    names = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")]
    assert len(names) == len(set(names)), names
    promtool = shutil.which("promtool")
    if promtool:
        p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr


def test_label_values_are_escaped(module_path, launcher_fn):
    odd = 'v1 \\"quoted\\" back\\\\slash\\nline2'
    s = launcher_fn.start(http_body(odd))
    m = samples(scrape_text(s.port))
    assert value(m, "mesh_config_info", version='v1 "quoted" back\\slash\nline2') == 1


def test_access_rules_apply_to_the_status_location(site):
    assert request(site.port, "/metrics-denied").status == 403
    assert request(site.port, "/metrics", method="POST").status == 405
    head = request(site.port, "/metrics", method="HEAD")
    assert head.status == 200 and head.body == b""


def test_counters_survive_a_reload_and_follow_renamed_zones(module_path, launcher_fn, keyring):
    s = launcher_fn.start(http_body("before-reload"))
    run_sequence(s.port, keyring)
    before = counts(samples(scrape_text(s.port)))
    assert before["decisions"]["allow"] >= 6
    # The same names, a new version label: every count is kept.
    s.ngx.http_body = http_body("after-reload")
    s.ngx.conf_text = s.ngx.conf_text.replace("before-reload", "after-reload")
    s.ngx.conf_path.write_text(s.ngx.conf_text)
    s.ngx.reload()
    text = scrape_text(s.port)
    m = samples(text)
    assert counts(m) == before, text
    assert value(m, "mesh_config_info", version="after-reload") == 1
    assert ("mesh_config_info", ("version", "before-reload")) not in m
    # A zone renamed: the new name starts at zero, the kept one keeps its count.
    s.ngx.conf_text = s.ngx.conf_text.replace("zone dry", "zone dry2").replace("zone=dry ", "zone=dry2 ")
    s.ngx.conf_path.write_text(s.ngx.conf_text)
    s.ngx.reload()
    m = samples(scrape_text(s.port))
    assert value(m, "mesh_rate_limited_total", zone="callers") == before["limited"]["callers"] == 1
    assert value(m, "mesh_rate_limited_total", zone="dry2") == 0
    assert not [k for k in m if ("zone", "dry") in k]
    assert counts(m)["decisions"] == before["decisions"]


def test_a_scrape_under_load_answers_quickly(site, keyring):
    """Clients keep every worker busy with verified requests; scrapes still answer fast, and
    the counters keep rising."""
    t = tok(keyring, sub="svc-load")
    scrapes_done = threading.Event()
    done: list[int] = []
    errors: list = []
    # Bounded by count, never by time: on a fast machine a client on one connection for a
    # fixed time would pass nginx's keepalive_requests (1000) and see its close as an error.
    # Each client opens a new connection well before that, and stops when the scrapes are done.
    per_connection, most = 500, 20_000

    def client():
        n = 0
        c = None
        try:
            while not scrapes_done.is_set() and n < most:
                if n % per_connection == 0:
                    if c is not None:
                        c.close()
                    c = Connection(site.port)
                assert c.request("/two/", bearer(t)).status == 200
                n += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            if c is not None:
                c.close()
        done.append(n)

    base = value(samples(scrape_text(site.port)), "mesh_requests_total", decision="allow")
    threads = [threading.Thread(target=client) for _ in range(6)]
    for th in threads:
        th.start()
    latencies, allows = [], []
    try:
        for _ in range(25):
            t0 = time.monotonic()
            m = samples(scrape_text(site.port))
            latencies.append(time.monotonic() - t0)
            allows.append(value(m, "mesh_requests_total", decision="allow"))
            time.sleep(0.1)
    finally:
        scrapes_done.set()
        for th in threads:
            th.join(timeout=30)
    assert not errors, errors
    done_total = sum(done)
    assert done_total > 50, done
    latencies.sort()
    # The machine is shared and slow; a scrape that waited for a worker would take seconds.
    assert latencies[len(latencies) // 2] < 0.5, latencies
    assert latencies[-1] < 3.0, latencies
    assert allows == sorted(allows) and allows[-1] > allows[0], allows
    final = wait_until(lambda: (lambda v: v if v >= base + done_total else 0)(
        value(samples(scrape_text(site.port)), "mesh_requests_total", decision="allow")), 2.0)
    assert final == base + done_total, (final, base, done)


def full(body: str, conf_dir, keyring) -> str:
    return render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


@pytest.mark.parametrize("where", ["http", "server"])
def test_mesh_status_outside_a_location_fails_nginx_t(module_path, conf_dir, keyring, where):
    if where == "http":
        body = "mesh_status;  # BAD\nserver { listen 127.0.0.1:@PORT@; }\n"
    else:
        body = "server {\n    listen 127.0.0.1:@PORT@;\n    mesh_status;  # BAD\n}\n"
    out = emerg_at_marked_line(full(body, conf_dir, keyring), conf_dir)
    assert "mesh_status" in out and "not allowed here" in out, out


def test_mesh_status_takes_no_argument(module_path, conf_dir, keyring):
    body = "server {\n    listen 127.0.0.1:@PORT@;\n    location /m { mesh_status on;  # BAD\n    }\n}\n"
    out = emerg_at_marked_line(full(body, conf_dir, keyring), conf_dir)
    assert "invalid number of arguments" in out and "mesh_status" in out, out


def test_a_config_with_mesh_status_passes_nginx_t(module_path, conf_dir, keyring):
    body = "server {\n listen 127.0.0.1:@PORT@;\n location /m { mesh_status; }\n}\n"
    rc, out, _ = nginx_t(full(body, conf_dir, keyring), conf_dir)
    assert rc == 0, out


def test_outbound_token_expiry_is_reported(module_path, launcher_fn):
    from mesh_test.metadata import MetadataServer

    md = MetadataServer(lifetime=1800)
    try:
        body = f"""
mesh_metadata_server {md.url};
mesh_outbound_token $orders_token https://orders.example.test;
server {{
    listen 127.0.0.1:@PORT@;
    location = /metrics {{ mesh_status; }}
    location = /t {{ return 200 "$orders_token"; }}
}}
"""
        s = launcher_fn.start(body)
        wait_until(lambda: request(s.port, "/t").body, 10.0)

        def expiry(aud):
            return value(samples(scrape_text(s.port)), "mesh_outbound_token_expiry_seconds", audience=aud)

        # Every worker fetches its own token; the one that answers reports its own.
        left = wait_until(lambda: expiry("https://orders.example.test"), 10.0)
        assert 1800 - 120 <= left <= 1800, left
        at = value(samples(scrape_text(s.port)), "mesh_outbound_token_expiry_timestamp_seconds",
                   audience="https://orders.example.test")
        assert time.time() + 1800 - 120 <= at <= time.time() + 1800, at
    finally:
        md.down()


def test_key_refreshes_are_counted(module_path, launcher_fn, keyring):
    from mesh_test.keyserver import KeyServer
    from mesh_test.tokens import KID_RSA, public_jwk

    ks = KeyServer(None)
    try:
        ks.set("/good", keys=[public_jwk(keyring.rsa, KID_RSA)])
        ks.set("/bad", status=500)
        body = f"""
mesh_provider live {{ issuer https://live.mesh.test; keys {ks.url('/good')}; }}
mesh_provider dead {{ issuer https://dead.mesh.test; keys {ks.url('/bad')}; }}
server {{
    listen 127.0.0.1:@PORT@;
    location = /metrics {{ mesh_status; }}
}}
"""
        t0 = now()
        s = launcher_fn.start(body)

        def settled():
            m = samples(scrape_text(s.port))
            done = (value(m, "mesh_keys", provider="live") == 1
                    and value(m, "mesh_keys_refresh_total", provider="dead", result="failure") >= 1)
            return m if done else None

        m = wait_until(settled, 10.0)
        assert m, scrape_text(s.port)
        assert value(m, "mesh_keys_refresh_total", provider="live", result="success") >= 1
        assert value(m, "mesh_keys_refresh_total", provider="live", result="failure") == 0
        assert value(m, "mesh_keys_refresh_total", provider="dead", result="success") == 0
        assert value(m, "mesh_keys", provider="dead") == 0
        assert value(m, "mesh_keys_last_refresh_timestamp_seconds", provider="live") >= t0
        assert value(m, "mesh_keys_last_refresh_timestamp_seconds", provider="dead") == 0
    finally:
        ks.close()
