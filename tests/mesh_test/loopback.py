"""What the suite's fake servers (key server, metadata server, OTLP receiver) share: an HTTP
server on a loopback port of its own, kept across `down()` and `up()`, so a test can take a
server away (new connections refused) and bring it back at the same address."""

from __future__ import annotations

import socket
import threading
import time
from http.server import ThreadingHTTPServer


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """Subclasses say how to make their server for a port (`make_server`)."""

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = free_loopback_port()

    def make_server(self, port: int) -> ThreadingHTTPServer:
        raise NotImplementedError

    def up(self) -> None:
        assert self._server is None, "already up"
        last: OSError | None = None
        for _ in range(50):  # the port may linger for a moment after down()
            try:
                self._server = self.make_server(self.port)
                break
            except OSError as e:
                last = e
                time.sleep(0.1)
        else:
            raise AssertionError(f"cannot listen on 127.0.0.1:{self.port}: {last}")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: new connections are refused (requests in progress finish)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    @property
    def is_up(self) -> bool:
        return self._server is not None
