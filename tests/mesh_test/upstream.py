"""Loopback servers: the echo upstream nginx proxies to, and a tripwire that counts connections."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _echo(self) -> None:
        self.server.count_request()  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        # ?delay=SECONDS: answer that much later (a request in flight during a shutdown)
        query = self.path.partition("?")[2]
        for part in query.split("&"):
            if part.startswith("delay="):
                time.sleep(min(float(part[6:]), 10.0))
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[name, value] for name, value in self.headers.items()],
            }
        ).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _echo
    do_PURGE = do_REPORT = do_UNKNOWN = _echo  # methods nginx does not know by name

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output quiet
        pass


class EchoUpstream(ThreadingHTTPServer):
    """Answers every request with 200 and JSON {"method", "path", "headers": [[name, value], ...]},
    after `?delay=SECONDS` (at most 10) if the query asks for it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self._lock = threading.Lock()
        self._count = 0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count_request(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def requests(self) -> int:
        with self._lock:
            return self._count

    def start(self) -> "EchoUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class Tripwire:
    """A loopback listener that only counts the connections it receives (for jku/x5u)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class RecordingUpstream(ThreadingHTTPServer):
    """An upstream for subrequests (auth_request, mirror): answers 204 and keeps every request's
    header list ([[name, value], ...], duplicates and order kept) by request path."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        seen: dict[str, list] = {}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> None:
                with lock:
                    seen.setdefault(self.path, []).append([[n, v] for n, v in self.headers.items()])
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(204)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _record

            def log_message(self, format, *args):  # noqa: A002
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self._seen = seen
        self._lock = lock
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def received(self, path: str, timeout: float = 3.0) -> list:
        """The header list of the one request received for `path` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                got = list(self._seen.get(path, []))
            if got or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        assert len(got) == 1, f"the recording upstream got {len(got)} requests for {path}"
        return got[0]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
