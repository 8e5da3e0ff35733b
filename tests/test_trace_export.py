"""Span export (`mesh_trace_export`): each sampled hop becomes one OTLP span, read back by a
loopback receiver that decodes it with OpenTelemetry's own protobuf definitions.

The span's ids are the ones the upstream received in `traceparent`, so an app's spans hang
under nginx's; its parent is the caller's span; sampling off sends nothing; a receiver that is
down costs only spans (counted), never a request; a leaving worker sends what it still holds.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_test.client import bearer, request
from mesh_test.configs import JWKS_PROVIDER, claims
from mesh_test.nginx import emerg_at_marked_line, render
from mesh_test.otlp import ACCESS_TOKEN, OtlpReceiver, attrs
from mesh_test.tokens import jwks_token

T = "4bf92f3577b34da6a3ce929d0e0e4736"
P = "00f067aa0ba902b7"
SERVICE = "orders-7f3"
VERSION = "2026-12-04.spans"
TP_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")
SERVER, CLIENT = 2, 3  # SpanKind
STATUS_ERROR = 2


def site_body(receiver_url: str, export_opts: str = "interval=100ms", extra: str = "") -> str:
    return JWKS_PROVIDER + f"""
mesh_trace_export {receiver_url} {export_opts};
mesh_trace_service {SERVICE};
mesh_config_version "{VERSION}";
{extra}
server {{
    listen 127.0.0.1:@PORT@;
    mesh_trace on;
    location /api/    {{ mesh_auth jwks; proxy_pass http://@UPSTREAM@; }}
    location /fail/   {{ mesh_auth jwks; proxy_pass http://127.0.0.1:9; }}
    location /quiet/  {{ mesh_auth jwks; mesh_trace_sample 0; proxy_pass http://@UPSTREAM@; }}
    location /plain/  {{ mesh_trace off; mesh_auth jwks; proxy_pass http://@UPSTREAM@; }}
    location = /metrics {{ mesh_trace off; mesh_status; }}
}}
"""


def tok(keyring, sub="svc-spans") -> str:
    return jwks_token(keyring, claims(sub=sub))


def traceparent(trace: str, parent: str = P, flags: str = "01") -> tuple[str, str]:
    return ("traceparent", f"00-{trace}-{parent}-{flags}")


def new_trace() -> str:
    return os.urandom(16).hex()


def metric(port: int, name: str, **labels) -> float:
    text = request(port, "/metrics").body.decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no {name}{labels} in:\n{text}")


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def test_a_sampled_request_becomes_one_server_span_under_its_caller(launcher_fn, keyring, receiver):
    site = launcher_fn.start(site_body(receiver.url))
    resp = request(site.port, "/api/orders?id=7", bearer(tok(keyring)) + [traceparent(T)])
    assert resp.status == 200, resp
    sent = TP_RE.fullmatch(resp.upstream_header("traceparent"))
    assert sent and sent.group(1) == T

    res, scope, span = receiver.span_of(T)
    # the span the upstream was told is its parent, under the caller's span
    assert span.span_id.hex() == sent.group(2)
    assert span.parent_span_id.hex() == P
    assert span.name == "GET /api/"
    assert span.kind == SERVER
    assert 0 < span.start_time_unix_nano <= span.end_time_unix_nano
    assert abs(span.end_time_unix_nano / 1e9 - time.time()) < 60
    a = attrs(span.attributes)
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/api/orders"
    assert a["http.route"] == "/api/"
    assert a["http.response.status_code"] == 200
    assert a["network.peer.address"] == "127.0.0.1"
    assert a["server.address"] == "localhost"
    assert a["enduser.id"] == "svc-spans"
    assert a["mesh.provider"] == "jwks"
    assert a["mesh.decision"] == "allow"
    assert span.status.code != STATUS_ERROR
    assert res["service.name"] == SERVICE
    assert res["mesh.config_version"] == VERSION
    assert "cloud.platform" not in res  # not on Cloud Run
    assert scope.name == "ngx-mesh"
    export = receiver.exports[0]
    assert export.path == "/v1/traces"
    assert export.headers["content-type"] == "application/x-protobuf"
    assert "authorization" not in export.headers


def test_refusals_and_upstream_errors_are_spans_too(launcher_fn, keyring, receiver):
    site = launcher_fn.start(site_body(receiver.url))
    refused, failed = new_trace(), new_trace()
    assert request(site.port, "/api/x", [traceparent(refused)]).status == 401
    assert request(site.port, "/fail/x", bearer(tok(keyring)) + [traceparent(failed)]).status == 502

    _, _, span = receiver.span_of(refused)
    a = attrs(span.attributes)
    assert a["http.response.status_code"] == 401
    assert a["mesh.decision"] == "unauthenticated"
    assert "enduser.id" not in a
    assert span.status.code != STATUS_ERROR  # a 4xx is the client's error, not the server's

    _, _, span = receiver.span_of(failed)
    assert attrs(span.attributes)["http.response.status_code"] == 502
    assert span.status.code == STATUS_ERROR


def test_unsampled_requests_send_nothing(launcher_fn, keyring, receiver):
    site = launcher_fn.start(site_body(receiver.url))
    token = tok(keyring)
    quiet = [new_trace() for _ in range(5)]
    for t in quiet:
        # the caller decided not to sample; and a location that samples nothing it starts
        assert request(site.port, "/api/x", bearer(token) + [traceparent(t, flags="00")]).status == 200
        assert request(site.port, "/quiet/x", bearer(token)).status == 200
        assert request(site.port, "/plain/x", bearer(token) + [traceparent(t)]).status == 200
    marker = new_trace()
    assert request(site.port, "/api/x", bearer(token) + [traceparent(marker)]).status == 200
    receiver.span_of(marker)
    time.sleep(0.3)  # two export intervals more: anything else queued would be here by now
    assert [s[2].trace_id.hex() for s in receiver.spans()] == [marker]


def test_two_hops_make_a_parent_and_a_child(launcher_fn, keyring, receiver):
    inner = launcher_fn.start(site_body(receiver.url))
    outer_body = JWKS_PROVIDER + f"""
mesh_trace_export {receiver.url} interval=100ms;
mesh_trace_service gateway;
server {{
    listen 127.0.0.1:@PORT@;
    mesh_trace on;
    location / {{ mesh_auth jwks; proxy_set_header Authorization $http_authorization;
                 proxy_pass http://127.0.0.1:{inner.port}/api/; }}
}}
"""
    outer = launcher_fn.start(outer_body)
    resp = request(outer.port, "/", bearer(tok(keyring)) + [traceparent(T)])
    assert resp.status == 200, resp
    spans = receiver.wait_spans(lambda ss: [s for s in ss if s[2].trace_id.hex() == T], 2)
    assert len(spans) == 2, spans
    by_service = {s[0]["service.name"]: s[2] for s in spans}
    gateway, service = by_service["gateway"], by_service[SERVICE]
    assert gateway.parent_span_id.hex() == P
    assert service.parent_span_id == gateway.span_id
    app_parent = TP_RE.fullmatch(resp.upstream_header("traceparent")).group(2)
    assert app_parent == service.span_id.hex()


def test_a_receiver_that_is_down_costs_spans_not_requests(launcher_fn, keyring, receiver):
    site = launcher_fn.start(site_body(receiver.url, "interval=50ms batch=1"))
    token = tok(keyring)
    receiver.down()
    lost = 5
    for _ in range(lost):
        resp = request(site.port, "/api/x", bearer(token) + [traceparent(new_trace())])
        assert resp.status == 200, resp
    deadline = time.monotonic() + 10
    while metric(site.port, "mesh_trace_spans_dropped_total", reason="export_failed") < lost:
        assert time.monotonic() < deadline, "the lost spans were not counted"
        time.sleep(0.05)
    assert metric(site.port, "mesh_trace_spans_exported_total") == 0
    site.ngx.wait_log(0, lambda t: "span export to" in t and "failed" in t)

    receiver.up()
    back = new_trace()
    assert request(site.port, "/api/x", bearer(token) + [traceparent(back)]).status == 200
    receiver.span_of(back)
    assert metric(site.port, "mesh_trace_spans_exported_total") >= 1
    assert metric(site.port, "mesh_trace_spans_dropped_total", reason="export_failed") == lost


def test_a_full_queue_drops_and_counts_without_waiting(launcher_fn, keyring, receiver):
    site = launcher_fn.start(site_body(receiver.url, "interval=10ms batch=1 queue=2"), workers=1)
    token = tok(keyring)
    receiver.release.clear()  # the receiver holds the first batch: the queue behind it fills
    total = 8
    t0 = time.monotonic()
    for _ in range(total):
        resp = request(site.port, "/api/x", bearer(token) + [traceparent(new_trace())])
        assert resp.status == 200, resp
    assert time.monotonic() - t0 < 5, "requests waited for the span queue"
    full = metric(site.port, "mesh_trace_spans_dropped_total", reason="queue_full")
    # one span in flight, two queued: the rest had no room
    assert full >= total - 3, full
    receiver.release.set()
    receiver.wait_spans(lambda ss: ss, total - int(full))
    time.sleep(0.2)
    assert len(receiver.spans()) == total - full
    assert metric(site.port, "mesh_trace_spans_exported_total") == total - full


def test_a_leaving_worker_sends_what_it_holds(launcher_fn, keyring, receiver):
    # a batch waits up to a minute: only the exit flush can send these in time
    site = launcher_fn.start(site_body(receiver.url, "interval=60s"))
    token = tok(keyring)
    traces = [new_trace() for _ in range(3)]
    for t in traces:
        assert request(site.port, "/api/x", bearer(token) + [traceparent(t)]).status == 200
    time.sleep(0.3)
    assert receiver.spans() == []
    t0 = time.monotonic()
    os.kill(site.ngx.pid, signal.SIGQUIT)
    got = receiver.wait_spans(lambda ss: [s for s in ss if s[2].trace_id.hex() in traces], 3, timeout=5)
    assert sorted(s[2].trace_id.hex() for s in got) == sorted(traces)
    assert time.monotonic() - t0 < 3


def test_auth_google_sends_the_metadata_servers_access_token(launcher_fn, keyring):
    receiver = OtlpReceiver(project="shop-prod-42")
    try:
        extra = f"mesh_metadata_server {receiver.url};"
        site = launcher_fn.start(site_body(receiver.url + "/v1/traces", "interval=100ms auth=google", extra))
        assert request(site.port, "/api/x", bearer(tok(keyring)) + [traceparent(T)]).status == 200
        res, _, _ = receiver.span_of(T)
        assert receiver.exports[0].headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
        # Cloud Trace files spans under the resource's project: asked of the metadata server
        assert res["gcp.project_id"] == "shop-prod-42"
    finally:
        receiver.close()


def full(body: str, conf_dir, keyring) -> str:
    return render(body, conf_dir, port=8, upstream="127.0.0.1:9", keys=keyring.dir)


@pytest.mark.parametrize("line, cause", [
    ("mesh_trace_export ftp://127.0.0.1:4318;  # BAD", "http:// or https://"),
    ("mesh_trace_export http://127.0.0.1:4318 interval=1ms;  # BAD", "invalid interval"),
    ("mesh_trace_export http://127.0.0.1:4318 batch=100 queue=10;  # BAD", "smaller than batch"),
    ("mesh_trace_export http://127.0.0.1:4318 auth=aws;  # BAD", "invalid auth"),
    ("mesh_trace_export http://127.0.0.1:4318;\nmesh_trace_export http://127.0.0.1:4318;  # BAD", "duplicate"),
    ("mesh_trace_service \"\";  # BAD", "invalid service name"),
])
def test_bad_export_lines_fail_nginx_t_at_their_line(conf_dir, keyring, line, cause):
    out = emerg_at_marked_line(full(line + "\nserver { listen 127.0.0.1:@PORT@; }\n", conf_dir, keyring), conf_dir)
    assert cause in out, out


def test_export_is_an_http_level_directive(conf_dir, keyring):
    body = "server {\n    listen 127.0.0.1:@PORT@;\n    mesh_trace_export http://127.0.0.1:4318;  # BAD\n}\n"
    out = emerg_at_marked_line(full(body, conf_dir, keyring), conf_dir)
    assert "not allowed here" in out, out
