#!/usr/bin/env python3
"""The benchmark's two loopback servers, in one process (standard library only).

Usage: loopback.py PORTFILE

- an OTLP/HTTP receiver for `mesh_trace_export`: answers every POST with 200 and an empty
  ExportTraceServiceResponse, counting exports and bytes (nothing decoded: at the bench's
  rate a decoding receiver would fall behind and make the module drop spans);
- a metadata server for `mesh_outbound_token`: hands out a JWT-shaped ID token valid for an
  hour (what the module reads of it is `exp`).

Writes "OTLP_PORT METADATA_PORT" to PORTFILE once both listen, and on SIGTERM (or SIGINT)
"exports=N bytes=N tokens=N" to stdout.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

counts = {"exports": 0, "bytes": 0, "tokens": 0}
lock = threading.Lock()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector answers

    def answer(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (the OTLP receiver)
        n = int(self.headers.get("Content-Length") or 0)
        remaining = n
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
        with lock:
            counts["exports"] += 1
            counts["bytes"] += n
        self.answer(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:  # noqa: N802 (the metadata server)
        if not self.path.startswith("/computeMetadata/v1/instance/service-accounts/default/identity"):
            self.answer(404, b"not found", "text/plain")
            return
        if self.headers.get("Metadata-Flavor") != "Google":
            self.answer(403, b"missing Metadata-Flavor", "text/plain")
            return
        now = int(time.time())
        header = {"alg": "RS256", "kid": "bench", "typ": "JWT"}
        payload = {"aud": "https://upstream.bench.local", "exp": now + 3600, "iat": now,
                   "iss": "https://accounts.google.com", "sub": "104011001100110011001",
                   "email": "bench@bench.iam.gserviceaccount.com"}
        token = ".".join(b64url(json.dumps(p).encode()) for p in (header, payload)) + "." + b64url(b"\0" * 256)
        with lock:
            counts["tokens"] += 1
        self.answer(200, token.encode(), "text/plain")

    def log_message(self, format, *args):  # noqa: A002
        pass


def main() -> None:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(" ".join(str(s.server_address[1]) for s in servers) + "\n")
    # Renamed into place: the reader never sees half a line.
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    done.wait()
    with lock:
        print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    main()
