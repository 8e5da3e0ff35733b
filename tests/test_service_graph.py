"""Who called whom, from `mesh_status`: `mesh_requests_total{caller,decision,code}` and the
histogram `mesh_request_duration_seconds{caller,decision}`, the caller label bounded by
`mesh_metrics_callers`.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_test.client import bearer, request
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import emerg_at_marked_line, render
from mesh_test.tokens import jwks_token


def body(callers: str = "") -> str:
    return JWKS_PROVIDER + callers + """
server {
    listen 127.0.0.1:@PORT@;
    location /api/    { mesh_auth jwks; mesh_deny svc-banned; mesh_allow any; proxy_pass http://@UPSTREAM@; }
    location /gone/   { mesh_auth jwks; root /nonexistent-ngx-mesh; }
    location /broken/ { mesh_auth jwks; proxy_pass http://127.0.0.1:9; }
    location = /metrics { mesh_status; }
}
"""


def scrape(port: int) -> list:
    resp = request(port, "/metrics")
    assert resp.status == 200, resp
    return list(text_string_to_metric_families(resp.body.decode()))


def series(families, name: str) -> dict:
    """{frozenset(labels): value} of one sample name."""
    return {frozenset(s.labels.items()): s.value
            for f in families for s in f.samples if s.name == name}


def call(port, keyring, sub, path="/api/x", n=1):
    token = jwks_token(keyring, claims(sub=sub))
    for _ in range(n):
        request(port, path, bearer(token))


def test_admitted_callers_have_their_own_series(launcher_fn, keyring):
    site = launcher_fn.start(body())
    call(site.port, keyring, "svc-orders", n=3)
    call(site.port, keyring, "svc-orders", "/gone/x", n=2)
    call(site.port, keyring, "svc-orders", "/broken/x")
    call(site.port, keyring, "svc-billing", n=4)
    call(site.port, keyring, "svc-banned", n=2)     # refused by RBAC: not a caller label
    for _ in range(5):
        assert request(site.port, "/api/x").status == 401  # no token
    fams = scrape(site.port)
    req = series(fams, "mesh_requests_total")
    labels = lambda **kw: frozenset(kw.items())  # noqa: E731
    assert req[labels(caller="svc-orders", decision="allow", code="2xx")] == 3
    assert req[labels(caller="svc-orders", decision="allow", code="4xx")] == 2
    assert req[labels(caller="svc-orders", decision="allow", code="5xx")] == 1
    assert req[labels(caller="svc-billing", decision="allow", code="2xx")] == 4
    assert req[labels(caller="", decision="deny", code="4xx")] == 2
    assert req[labels(caller="", decision="unauthenticated", code="4xx")] == 5
    assert not any(dict(k).get("caller") == "svc-banned" for k in req)
    assert sum(req.values()) == 17

    # the histogram counts the same requests, per caller and decision
    count = series(fams, "mesh_request_duration_seconds_count")
    assert count[labels(caller="svc-orders", decision="allow")] == 6
    assert count[labels(caller="svc-billing", decision="allow")] == 4
    assert count[labels(caller="", decision="unauthenticated")] == 5
    assert sum(count.values()) == sum(req.values())
    buckets = series(fams, "mesh_request_duration_seconds_bucket")
    mine = sorted(((float(dict(k)["le"]), v) for k, v in buckets.items()
                   if dict(k)["caller"] == "svc-orders"), key=lambda x: x[0])
    values = [v for _, v in mine]
    assert values == sorted(values) and values[-1] == 6 and mine[-1][0] == float("inf")
    assert [le for le, _ in mine][:3] == [0.001, 0.002, 0.005]
    total = series(fams, "mesh_request_duration_seconds_sum")[labels(caller="svc-orders", decision="allow")]
    assert 0 <= total < 6 * 5.0


def test_callers_past_the_bound_count_as_other(launcher_fn, keyring):
    site = launcher_fn.start(body("mesh_metrics_callers 2;\n"), workers=1)
    for i, sub in enumerate(["svc-a", "svc-b", "svc-c", "svc-d"]):
        call(site.port, keyring, sub, n=i + 1)
    req = series(scrape(site.port), "mesh_requests_total")
    by_caller = {}
    for k, v in req.items():
        by_caller[dict(k)["caller"]] = by_caller.get(dict(k)["caller"], 0) + v
    assert by_caller == {"": 0, "other": 3 + 4, "svc-a": 1, "svc-b": 2}


def test_no_caller_label_with_zero(launcher_fn, keyring):
    site = launcher_fn.start(body("mesh_metrics_callers 0;\n"))
    call(site.port, keyring, "svc-a", n=2)
    fams = scrape(site.port)
    req = series(fams, "mesh_requests_total")
    assert all("caller" not in dict(k) for k in req), req
    assert req[frozenset({("decision", "allow"), ("code", "2xx")})] == 2
    assert all("caller" not in dict(k) for k in series(fams, "mesh_request_duration_seconds_count"))


def test_a_reload_keeps_the_callers_counts(launcher_fn, keyring):
    site = launcher_fn.start(body())
    call(site.port, keyring, "svc-keep", n=3)
    site.ngx.reload()
    call(site.port, keyring, "svc-keep", n=1)
    req = series(scrape(site.port), "mesh_requests_total")
    assert req[frozenset({("caller", "svc-keep"), ("decision", "allow"), ("code", "2xx")})] == 4


@pytest.mark.parametrize("value", ["-1", "1001", "many"])
def test_bad_caller_bounds_fail_nginx_t(conf_dir, keyring, value):
    conf = render(f"mesh_metrics_callers {value};  # BAD\nserver {{ listen 127.0.0.1:@PORT@; }}\n",
                  conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)
    out = emerg_at_marked_line(conf, conf_dir)
    assert "from 0 to 1000" in out, out
