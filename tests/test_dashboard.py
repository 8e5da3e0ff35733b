"""The Grafana dashboard shipped in nginx-conf/dashboards queries only what `mesh_status`
exposes: every metric and every label its queries and legends name is in a real scrape of an
nginx that uses every feature the dashboard shows (key URLs, a global rate-limit zone, an
outbound token, span export)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_test.client import bearer, request
from mesh_test.configs import claims
from mesh_test.keyserver import KeyServer
from mesh_test.live import wait_until
from mesh_test.metadata import MetadataServer
from mesh_test.otlp import OtlpReceiver
from mesh_test.redis import REDIS_SERVER, RedisServer
from mesh_test.tokens import KID_RSA, jwks_token, public_jwk

DASHBOARD = Path(__file__).resolve().parent.parent / "nginx-conf" / "dashboards" / "grafana-ngx-mesh.json"
PROMQL_WORDS = {"by", "without", "sum", "rate", "increase", "time", "histogram_quantile", "le"}


def queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = [(t["expr"], t.get("legendFormat", "")) for p in board["panels"] for t in p["targets"]]
    assert len(out) >= 10
    return out


def referenced(expr: str, legend: str) -> tuple[set[str], set[str]]:
    """The metrics an expression reads, and the labels it (or its legend) names."""
    metrics = set(re.findall(r"\b(mesh_[a-z_]+)\b", expr))
    labels = set()
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        labels |= {w.strip() for w in group.split(",")}
    labels |= set(re.findall(r"[{,]\s*([a-z_]+)\s*(?:=~|!=|=)", expr))
    labels |= set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", legend))
    return metrics, labels - {"le"}


@pytest.fixture
def everything(launcher_fn, keyring):
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (make deps installs it)")
    keys = KeyServer(pki=None)
    keys.set("/jwks", keys=[public_jwk(keyring.rsa, KID_RSA)])
    md, receiver, redis = MetadataServer(), OtlpReceiver(), RedisServer().start()
    try:
        body = f"""
mesh_provider jwks {{
    issuer   https://jwks.mesh.test;
    keys     {keys.url("/jwks")};
    audience aud-orders-7f3;
}}
mesh_metadata_server {md.url};
mesh_outbound_token $orders_token https://orders.example.test;
mesh_rate_limit_zone callers 1m redis={redis.url} sync=50ms;
mesh_trace_export {receiver.url} interval=50ms;
mesh_config_version "dash-1";
server {{
    listen 127.0.0.1:@PORT@;
    mesh_trace on;
    location /api/ {{
        mesh_auth jwks;
        mesh_deny svc-denied;
        mesh_allow any;
        mesh_rate_limit zone=callers rate=1r/m burst=1;
        proxy_pass http://@UPSTREAM@;
    }}
    location = /metrics {{ mesh_trace off; mesh_status; }}
}}
"""
        yield launcher_fn.start(body)
    finally:
        redis.stop()
        receiver.close()
        md.close()
        keys.close()


def test_every_metric_and_label_the_dashboard_queries_is_exposed(everything, keyring):
    site = everything
    ok = jwks_token(keyring, claims(sub="svc-dash"))
    for _ in range(3):  # allowed, then limited
        request(site.port, "/api/x", bearer(ok))
    request(site.port, "/api/x", bearer(jwks_token(keyring, claims(sub="svc-denied"))))
    request(site.port, "/api/x", [("Authorization", "Bearer not.a.token")])

    def scrape() -> dict[str, set[str]]:
        text = request(site.port, "/metrics").body.decode()
        seen: dict[str, set[str]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                seen.setdefault(s.name, set()).update(s.labels)
                seen.setdefault(fam.name, set()).update(s.labels)
        return seen

    # every feature has reported once: a sync, an outbound token, an exported span
    wait_until(lambda: "mesh_rate_limit_sync_up" in scrape() and "mesh_trace_spans_exported_total" in scrape(), 10.0)
    seen = scrape()
    for expr, legend in queries():
        metrics, labels = referenced(expr, legend)
        assert metrics, expr
        for m in metrics:
            assert m in seen, f"{m} (queried by {expr!r}) is not in mesh_status"
        have = set().union(*(seen[m] for m in metrics))
        missing = labels - have
        assert not missing, f"labels {missing} of {expr!r} / {legend!r} are on none of {metrics}"
