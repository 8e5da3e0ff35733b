"""A fake OTLP/HTTP trace receiver on loopback: decodes every POSTed `ExportTraceServiceRequest`
with the OpenTelemetry project's own protobuf definitions (`opentelemetry-proto`), so a test
reads spans exactly as a collector or Cloud Trace would.

It can also stand in for the metadata server's access-token and project-id answers
(`auth=google`), and can be taken down, made to answer an error status, or made to hold every
request until released (a slow receiver).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .loopback import LoopbackServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
PROJECT_PATH = "/computeMetadata/v1/project/project-id"
ACCESS_TOKEN = "ya29.test-access-token"


def attrs(kvs) -> dict:
    """A span's or resource's attributes as a plain dict."""
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@dataclass
class Export:
    """One POST: its headers, and its spans with their resource and scope."""
    path: str
    headers: dict
    request: ExportTraceServiceRequest
    spans: list = field(default_factory=list)  # (resource attrs, scope, span)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def _answer(self, status: int, body: bytes, ctype: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        path = self.path.partition("?")[0]
        owner.metadata_gets.append(path)
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._answer(403, b"no flavor\n", "text/plain")
        if path == TOKEN_PATH:
            body = b'{"access_token":"%s","expires_in":3599,"token_type":"Bearer"}' % ACCESS_TOKEN.encode()
            return self._answer(200, body, "application/json")
        if path == PROJECT_PATH and owner.project:
            return self._answer(200, owner.project.encode(), "application/text")
        return self._answer(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        owner = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        owner.release.wait(timeout=30)
        if owner.status != 200:
            return self._answer(owner.status, b"", "text/plain")
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        export = Export(self.path, {k.lower(): v for k, v in self.headers.items()}, req)
        for rs in req.resource_spans:
            res = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    export.spans.append((res, ss.scope, span))
        with owner.lock:
            owner.exports.append(export)
        self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

    def log_message(self, format, *args):  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: "OtlpReceiver", port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)


class OtlpReceiver(LoopbackServer):
    def __init__(self, *, project: str | None = None) -> None:
        super().__init__()
        self.project = project
        self.status = 200
        self.lock = threading.Lock()
        self.exports: list[Export] = []
        self.metadata_gets: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list:
        with self.lock:
            return [s for e in self.exports for s in e.spans]

    def span_of(self, trace_id_hex: str, timeout: float = 10.0):
        """The one span of that trace (waits for it); asserts there is exactly one."""
        found = self.wait_spans(lambda ss: [s for s in ss if s[2].trace_id.hex() == trace_id_hex],
                                1, timeout)
        assert len(found) == 1, found
        return found[0]

    def wait_spans(self, select, count: int, timeout: float = 10.0) -> list:
        """The spans `select(all spans)` returns, once there are at least `count`."""
        deadline = time.monotonic() + timeout
        while True:
            chosen = select(self.spans())
            if len(chosen) >= count or time.monotonic() >= deadline:
                return chosen
            time.sleep(0.02)

    def make_server(self, port: int) -> "_Server":
        return _Server(self, port)

    def close(self) -> None:
        self.release.set()
        self.down()
