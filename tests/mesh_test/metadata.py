"""A fake GCE/Cloud Run metadata server on loopback (plain HTTP) that hands out ID tokens.

Like the real one it answers `GET /computeMetadata/v1/instance/service-accounts/default/identity
?audience=AUD[&format=full]` only with the header `Metadata-Flavor: Google` (403 otherwise). The
token is a JWT-shaped string whose `exp` is now + `lifetime`, not really signed unless
`signer=(key, kid)` is given (then RS256 with that key, for a second nginx to verify); each
token is different (`seq`); with `format=full` it carries the Compute claims
(`google.compute_engine`). `delay` holds each answer back that long (a slow metadata server).
Every request is recorded: when, the raw query, the audience, the format, the flavor header, and
the nginx process that sent it. `down()`/`up()` as the key server's.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .loopback import LoopbackServer
from .procs import peer_pid
from .tokens import b64url, b64url_decode, json_bytes, sign

IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
SERVICE_ACCOUNT = "orders-caller@shop-prod.iam.gserviceaccount.com"
# what `format=full` adds, as a Cloud Run instance's metadata server fills it
COMPUTE_ENGINE = {"project_id": "shop-prod", "project_number": 104011001100, "zone": "us-central1-1",
                  "instance_id": "004bf6b8c9d2e1f0", "instance_name": "orders-caller-00042-abc"}


@dataclass
class MetaRequest:
    at: float
    path: str
    raw_query: str
    audience: str | None
    format: str | None  # the `format` query value (None: not sent)
    flavor: str | None
    pid: int | None
    status: int
    token: str | None  # the token handed out, if any


def make_id_token(audience: str, lifetime: float, seq: int, full: bool = False,
                  signer=None) -> tuple[str, int]:
    """A Google-shaped ID token and its exp; `full`: format=full's; signed RS256 by `signer`
    (key, kid), else with random bytes for a signature."""
    now = int(time.time())
    exp = int(now + lifetime)
    header = {"alg": "RS256", "kid": signer[1] if signer else "meta-test-kid", "typ": "JWT"}
    payload = {
        "aud": audience,
        "azp": "104011001100110011001",
        "email": SERVICE_ACCOUNT,
        "email_verified": True,
        "exp": exp,
        "iat": now,
        "iss": "https://accounts.google.com",
        "sub": "104011001100110011001",
        "seq": seq,
    }
    if full:
        payload["google"] = {"compute_engine": COMPUTE_ENGINE}
    signing_input = f"{b64url(json_bytes(header))}.{b64url(json_bytes(payload))}"
    if signer:
        sig = sign("RS256", signer[0], signing_input.encode("ascii"))
    else:
        sig = secrets.token_bytes(64)
    return f"{signing_input}.{b64url(sig)}", exp


def token_claims(token: str) -> dict:
    return json.loads(b64url_decode(token.split(".")[1]))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        audience = params["audience"][0] if params.get("audience") else None
        fmt = params["format"][0] if params.get("format") else None
        flavor = self.headers.get("Metadata-Flavor")
        pid = peer_pid(self.client_address[1], self.server.server_address[1])
        token = None
        if flavor != "Google":
            status, body = 403, b"Missing Metadata-Flavor:Google header.\n"
        elif path != IDENTITY_PATH or not audience:
            status, body = (404, b"not found\n") if path != IDENTITY_PATH else (400, b"no audience\n")
        else:
            status, body, token = owner._answer(audience, fmt == "full")
        owner._record(MetaRequest(time.monotonic(), path, query, audience, fmt, flavor, pid, status, token))
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: "MetadataServer", port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)


class MetadataServer(LoopbackServer):
    def __init__(self, *, lifetime: float = 3600, start_up: bool = True, signer=None) -> None:
        super().__init__()
        self.lifetime = lifetime
        self.signer = signer
        self.delay = 0.0
        self.status = 200  # anything else: answered with that status and no token
        self.body: bytes | None = None  # set: answered with these bytes instead of a token
        self._lock = threading.Lock()
        self._requests: list[MetaRequest] = []
        self._seq = 0
        if start_up:
            self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _answer(self, audience: str, full: bool = False) -> tuple[int, bytes, str | None]:
        with self._lock:
            if self.status != 200:
                return self.status, b"metadata server says no\n", None
            if self.body is not None:
                return 200, self.body, None
            self._seq += 1
            seq, lifetime, signer, delay = self._seq, self.lifetime, self.signer, self.delay
        if delay:
            time.sleep(delay)
        token, _exp = make_id_token(audience, lifetime, seq, full, signer)
        return 200, token.encode("ascii"), token

    def _record(self, req: MetaRequest) -> None:
        with self._lock:
            self._requests.append(req)

    def requests(self, since: float = 0.0) -> list[MetaRequest]:
        with self._lock:
            return [r for r in self._requests if r.at >= since]

    def tokens_of(self, pid: int, audience: str | None = None) -> list[str]:
        return [r.token for r in self.requests()
                if r.pid == pid and r.token and (audience is None or r.audience == audience)]

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.requests()):
                return True
            time.sleep(0.02)
        return predicate(self.requests())

    def make_server(self, port: int) -> "_Server":
        return _Server(self, port)

    def close(self) -> None:
        self.down()
