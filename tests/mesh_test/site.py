"""A running nginx plus the echo upstream, and the checks every allowed or refused request gets."""

from __future__ import annotations

import json
import re

from .client import Header, Response, request
from .nginx import Nginx
from .tokens import b64url_decode
from .upstream import EchoUpstream

def _token_parts(token: str | bytes | None) -> list[str]:
    """The token and its payload and signature segments: never in a response header or error.log."""
    if not token:
        return []
    text = token.decode("latin-1") if isinstance(token, bytes) else token
    segs = text.split(".")
    return [text] + ([s for s in segs[1:] if len(s) >= 8] if len(segs) >= 3 else [])


def _claim_values(token: str | bytes | None, claims: dict | None) -> list[str]:
    """String claim values (given, or read from the token's payload): never in the response."""
    if claims is None and token:
        text = token.decode("latin-1") if isinstance(token, bytes) else token
        segs = text.split(".")
        try:
            claims = json.loads(b64url_decode(segs[1])) if len(segs) == 3 else None
        except (ValueError, UnicodeDecodeError):
            claims = None
    if not isinstance(claims, dict):
        return []
    values = []
    for value in claims.values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and len(v) >= 6:
                values.append(v)
    return values


class Site:
    def __init__(self, ngx: Nginx, echo: EchoUpstream) -> None:
        self.ngx = ngx
        self.echo = echo

    @property
    def port(self) -> int:
        return self.ngx.port

    def get(self, path: str = "/", headers: list[Header] | None = None, method: str = "GET") -> Response:
        return request(self.port, path, headers, method=method)

    def allowed(self, path: str, headers: list[Header] | None = None, *, auth_status: str = "verified") -> Response:
        """The request reaches the upstream and gets its 200."""
        before = self.echo.requests
        resp = self.get(path, headers)
        assert resp.status == 200, f"expected 200 from {path}, got {resp!r}"
        assert resp.header("X-Auth-Status") == auth_status, resp
        assert self.echo.requests == before + 1, "the upstream did not get exactly one request"
        return resp

    def refused(
        self,
        path: str,
        headers: list[Header] | None,
        auth_status: str,
        *,
        token: str | bytes | None = None,
        claims: dict | None = None,
        realm: str = "mesh",
    ) -> Response:
        """401, the exact $mesh_auth_status, the right WWW-Authenticate, the upstream untouched,
        one [info] line naming the status, and no token or claim in the response or the log."""
        before = self.echo.requests
        mark = self.ngx.log_mark()
        resp = self.get(path, headers)
        assert resp.status == 401, f"expected 401 ({auth_status}) from {path}, got {resp!r}"
        assert resp.header("X-Auth-Status") == auth_status, (
            f"expected $mesh_auth_status={auth_status}, got {resp.header('X-Auth-Status')!r}"
        )
        assert resp.header("X-Decision") == "unauthenticated", resp
        www = resp.all("WWW-Authenticate")
        assert len(www) == 1, f"expected one WWW-Authenticate, got {www}"
        if auth_status == "missing":
            assert www[0] == f'Bearer realm="{realm}"', www[0]
        else:
            pattern = rf'Bearer realm="{re.escape(realm)}", error="invalid_token", error_description="[^"\\]*"'
            assert re.fullmatch(pattern, www[0]), f"WWW-Authenticate not as specified: {www[0]!r}"
        for part in _token_parts(token) + _claim_values(token, claims):
            assert part not in www[0], f"WWW-Authenticate reveals the token or a claim ({part[:40]!r}): {www[0]!r}"
        # nginx answered, so the upstream would have been counted already
        assert self.echo.requests == before, "a refused request reached the upstream"
        self.assert_refusal_logged(mark, auth_status, token)
        return resp

    def assert_refusal_logged(self, mark: int, auth_status: str, token=None) -> str:
        """Exactly one [info] line since mark names auth_status as a word; no token text is logged."""
        word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(auth_status)}(?![A-Za-z0-9_])")
        line = self.ngx.info_lines(mark, word)[0]
        text = self.ngx.log_since(mark)
        for part in _token_parts(token):
            if part in text:
                raise AssertionError(f"error.log holds the token or part of it ({part[:40]!r}...):\n{text}")
        return line
