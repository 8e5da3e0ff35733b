"""A loopback JWKS server (HTTPS with a test CA, or plain HTTP) whose behaviour tests change.

Each path has a route: the body served (a JWKS, or any bytes), the status, the `Cache-Control`
header, and whether to stall (hold the request, unanswered, until released or 30 s). Every
request that arrives is recorded: when, which path, and which nginx process sent it (read from
/proc, so fetches can be counted per worker). `down()` closes the listening socket (connection
refused), `up()` listens again on the same port.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .loopback import LoopbackServer
from .procs import peer_pid

STALL_LIMIT = 30.0  # a stalled request is held at most this long


# ---------------------------------------------------------------- test CA

class TestPKI:
    """A CA and a server certificate it signed for IP 127.0.0.1 (and, if asked, DNS names)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, *, dns_names: tuple[str, ...] = (), name: str = "ngx-mesh test CA") -> None:
        self.dir = directory
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True,
                              crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        sans += [x509.DNSName(d) for d in dns_names]
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        self.cert_pem = server_cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_path.write_bytes(self.ca_pem)
        self.cert_path.write_bytes(self.cert_pem)
        self.key_path.write_bytes(self.key_pem)
        self.ca_path.chmod(0o644)

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert_path(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key_path(self) -> Path:
        return self.dir / "server.key"

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


# ---------------------------------------------------------------- routes and records

@dataclass
class Route:
    body: bytes = b'{"keys":[]}'
    status: int = 200
    cache_control: str | None = None
    stall: bool = False
    content_type: str = "application/json"


@dataclass
class Fetch:
    at: float  # time.monotonic() when the request line and headers had arrived
    path: str
    pid: int | None  # the nginx process that sent it (None: not found in /proc)
    client_port: int
    headers: dict = field(default_factory=dict)


def jwks_bytes(keys: list[dict]) -> bytes:
    return json.dumps({"keys": keys}).encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        owner._record(Fetch(
            at=time.monotonic(), path=path,
            pid=peer_pid(self.client_address[1], self.server.server_address[1]),
            client_port=self.client_address[1],
            headers={k.lower(): v for k, v in self.headers.items()},
        ))
        route = owner.route(path)
        if route is None:
            self._answer(404, b"not found\n", None, "text/plain")
            return
        if route.stall:
            owner._stalled_enter()
            try:
                owner._release.wait(STALL_LIMIT)
            finally:
                owner._stalled_leave()
            route = owner.route(path) or route  # answer with what is configured by now
        self._answer(route.status, route.body, route.cache_control, route.content_type)

    def _answer(self, status: int, body: bytes, cache_control: str | None, ctype: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if cache_control is not None:
                self.send_header("Cache-Control", cache_control)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            pass  # the client gave up (e.g. its 10 s timeout during a stall)
        self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: "KeyServer", port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)

    def finish_request(self, request, client_address) -> None:
        # TLS handshake here, in the request's own thread: a slow client never holds up accept().
        request.settimeout(15)
        ctx = self.owner.tls_context
        if ctx is not None:
            try:
                request = ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                self.owner._handshake_failed(repr(e))
                return
        try:
            self.RequestHandlerClass(request, client_address, self)
        except OSError:
            pass
        finally:
            if ctx is not None:
                try:
                    request.close()
                except OSError:
                    pass


class KeyServer(LoopbackServer):
    """Serves routes on 127.0.0.1:port over HTTPS (with `pki`) or HTTP (pki None)."""

    def __init__(self, pki: TestPKI | None, *, start_up: bool = True) -> None:
        super().__init__()
        self.pki = pki
        self.tls_context = pki.server_context() if pki else None
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._fetches: list[Fetch] = []
        self.handshake_failures: list[str] = []
        self._release = threading.Event()
        self._stalled = 0
        if start_up:
            self.up()

    # ---- addresses
    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    def url(self, path: str = "/certs", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    # ---- routes
    def set(self, path: str = "/certs", *, keys: list[dict] | None = None, body: bytes | None = None,
            status: int = 200, cache_control: str | None = None, stall: bool = False) -> None:
        """Replace the route of path: a JWKS of `keys`, or `body` verbatim."""
        if body is None:
            body = jwks_bytes(keys or [])
        with self._lock:
            self._routes[path] = Route(body=body, status=status, cache_control=cache_control, stall=stall)

    def change(self, path: str = "/certs", **changes) -> None:
        """Change some fields of a route (keys=[...] sets the body to that JWKS)."""
        with self._lock:
            route = self._routes.setdefault(path, Route())
            if "keys" in changes:
                route.body = jwks_bytes(changes.pop("keys"))
            for name, value in changes.items():
                setattr(route, name, value)

    def route(self, path: str) -> Route | None:
        with self._lock:
            r = self._routes.get(path)
            return Route(r.body, r.status, r.cache_control, r.stall, r.content_type) if r else None

    # ---- stalls
    def stall(self, path: str = "/certs") -> None:
        self._release.clear()
        self.change(path, stall=True)

    def release(self, path: str = "/certs") -> None:
        """Stop stalling: held requests are answered (if their client still waits)."""
        self.change(path, stall=False)
        self._release.set()

    @property
    def stalled(self) -> int:
        with self._lock:
            return self._stalled

    def _stalled_enter(self) -> None:
        with self._lock:
            self._stalled += 1

    def _stalled_leave(self) -> None:
        with self._lock:
            self._stalled -= 1

    def wait_stalled(self, n: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while self.stalled < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.stalled

    # ---- records
    def _record(self, fetch: Fetch) -> None:
        with self._lock:
            self._fetches.append(fetch)

    def _handshake_failed(self, why: str) -> None:
        with self._lock:
            self.handshake_failures.append(why)

    def fetches(self, path: str | None = None, since: float = 0.0) -> list[Fetch]:
        with self._lock:
            return [f for f in self._fetches if (path is None or f.path == path) and f.at >= since]

    def count(self, path: str | None = None, since: float = 0.0) -> int:
        return len(self.fetches(path, since))

    def per_pid(self, path: str | None = None, since: float = 0.0) -> dict[int | None, int]:
        out: dict[int | None, int] = {}
        for f in self.fetches(path, since):
            out[f.pid] = out.get(f.pid, 0) + 1
        return out

    def wait_count(self, n: int, path: str | None = None, since: float = 0.0, timeout: float = 5.0) -> int:
        """Wait until at least n requests were recorded (or the deadline); the count then."""
        deadline = time.monotonic() + timeout
        while self.count(path, since) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.count(path, since)

    def wait_pid(self, pid: int, path: str | None = None, since: float = 0.0, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(f.pid == pid for f in self.fetches(path, since)):
                return True
            time.sleep(0.02)
        return False

    # ---- up / down
    def make_server(self, port: int) -> "_Server":
        return _Server(self, port)

    def close(self) -> None:
        self._release.set()
        self.down()
