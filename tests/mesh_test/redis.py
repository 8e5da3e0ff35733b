"""A real `redis-server` on a free loopback port (no persistence), and a minimal RESP client
to look at what the module wrote there."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .client import free_port
from .nginx import make_private_dir

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 5.0


class RedisServer:
    """`redis-server` in its own directory; `kill()` and `start()` again on the same port."""

    def __init__(self, *, password: str | None = None, pki=None) -> None:
        """`pki` (a keyserver.TestPKI): TLS only, with its certificate for 127.0.0.1."""
        self.dir = make_private_dir("ngx-mesh-redis-")
        self.port = free_port()
        self.password = password
        self.pki = pki
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.pki else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        if self.pki:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.pki.cert_path), "--tls-key-file", str(self.pki.key_path),
                     "--tls-ca-cert-file", str(self.pki.ca_path), "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.command("PING") == "PONG":
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved (no persistence anyway)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- RESP
    def commands(self, cmds: list[list[str | int]], timeout: float = 10.0) -> list:
        """Sends `cmds` pipelined on one connection; their replies in order (errors as
        RedisError values)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
            s = raw
            if self.pki:
                ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
                s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            f = s.makefile("rb")
            pre = [["AUTH", self.password]] if self.password else []
            out = b"".join(_encode(c) for c in pre + cmds)
            s.sendall(out)
            replies = [_read(f) for _ in pre + cmds]
            return replies[len(pre):]

    def command(self, *args: str | int):
        return self.commands([list(args)])[0]

    def keys(self, pattern: str = "*") -> list[str]:
        found, cursor = [], "0"
        while True:
            cursor, batch = self.command("SCAN", cursor, "MATCH", pattern, "COUNT", 5000)
            found += batch
            if cursor == "0":
                return found


class RedisError(str):
    pass


def _encode(args: list[str | int]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def _read(f):
    line = f.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        return RedisError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read(f) for _ in range(n)]
    raise OSError(f"bad reply {line!r}")


def have_redis() -> bool:
    return Path(REDIS_SERVER).is_file()
