"""A raw-socket HTTP/1.1 client: duplicate headers, arbitrary bytes, 5 s timeout on everything."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

TIMEOUT = 5.0

Header = tuple[str | bytes, str | bytes]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)  # names lower-cased, in order
    body: bytes = b""

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"response has {len(values)} {name} headers: {values}"
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)

    def upstream_headers(self, name: str) -> list[str]:
        """Values of `name` as the echo upstream received it (the request nginx sent)."""
        name = name.lower()
        return [v for n, v in self.json()["headers"] if n.lower() == name]

    def upstream_header(self, name: str) -> str | None:
        values = self.upstream_headers(name)
        assert len(values) <= 1, f"upstream got {len(values)} {name} headers: {values}"
        return values[0] if values else None

    def __repr__(self) -> str:
        body = self.body[:300]
        return f"<Response {self.status} headers={self.headers} body={body!r}>"


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("HTTP response not complete within the timeout")
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


def parse_response(raw: bytes, method: str = "GET") -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete HTTP response: {raw[:500]!r}")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    resp = Response(status, reason, headers, b"")
    if method == "HEAD":
        return resp
    if any(n == "transfer-encoding" and "chunked" in v.lower() for n, v in headers):
        body = _dechunk(body)
    else:
        cl = resp.all("content-length")
        if cl:
            body = body[: int(cl[0])]
    resp.body = body
    return resp


def raw_request(port: int, data: bytes, *, source: str | None = None, timeout: float = TIMEOUT,
                method: str = "GET") -> Response:
    """Send `data` verbatim on a fresh connection (from loopback address `source`, e.g.
    127.0.0.2, if given) and read the whole response, until nginx closes the connection."""
    deadline = time.monotonic() + timeout
    src = (source, 0) if source else None
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=src) as sock:
        sock.sendall(data)
        raw = _read_all(sock, deadline)
    return parse_response(raw, method)


def request(
    port: int,
    path: str = "/",
    headers: list[Header] | None = None,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = TIMEOUT,
    *,
    host: str = "localhost",
    source: str | None = None,
) -> Response:
    """Send one request on a fresh connection (Connection: close) and read the whole response."""
    lines = [_b(f"{method} {path} HTTP/1.1"), _b(f"Host: {host}"), b"Connection: close"]
    for name, value in headers or []:
        lines.append(_b(name) + b": " + _b(value))
    if body:
        lines.append(_b(f"Content-Length: {len(body)}"))
    raw_request_bytes = b"\r\n".join(lines) + b"\r\n\r\n" + body
    return raw_request(port, raw_request_bytes, source=source, timeout=timeout, method=method)


def bearer(token: str | bytes) -> list[Header]:
    if isinstance(token, bytes):
        return [("Authorization", b"Bearer " + token)]
    return [("Authorization", f"Bearer {token}")]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port} did not answer within {timeout}s: {last}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connection:
    """One keep-alive connection: several requests in turn, each response read by its length."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("HTTP response not complete within the timeout")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed by nginx; unread: {self.buf[:200]!r}")
        self.buf += data

    def request(self, path: str, headers: list[Header] | None = None, method: str = "GET",
                body: bytes = b"") -> Response:
        deadline = time.monotonic() + self.timeout
        lines = [_b(f"{method} {path} HTTP/1.1"), b"Host: localhost"]
        for name, value in headers or []:
            lines.append(_b(name) + b": " + _b(value))
        if body or method in ("POST", "PUT"):
            lines.append(_b(f"Content-Length: {len(body)}"))
        self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        resp = parse_response(head + b"\r\n\r\n", "HEAD")
        cl = resp.all("content-length")
        assert cl, f"keep-alive response without Content-Length: {resp!r}"
        size = int(cl[0])
        while len(rest) < size:
            self._fill(deadline)
            rest = self.buf.partition(b"\r\n\r\n")[2]
        resp.body, self.buf = rest[:size], rest[size:]
        return resp

    def close(self) -> None:
        self.sock.close()
