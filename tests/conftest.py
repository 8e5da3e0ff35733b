"""Fixtures for ngx-mesh's end-to-end suite.

Environment:
  NGINX_BIN     nginx binary (default /usr/sbin/nginx)
  MESH_MODULE   the module .so (default <repo>/target/release/ngx_http_mesh_module.so)
  MESH_WORKERS  worker_processes (default 1; the suite is run with 1 and 2)
  MESH_KEEP_TMP keep each nginx's directory (config, logs) after the run
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mesh_test.nginx import MESH_MODULE, NGINX_BIN, Nginx, make_private_dir  # noqa: E402
from mesh_test.site import Site  # noqa: E402
from mesh_test.tokens import make_keyring  # noqa: E402
from mesh_test.upstream import EchoUpstream  # noqa: E402


def pytest_report_header(config):
    return [f"nginx: {NGINX_BIN}", f"module: {MESH_MODULE}", f"workers: {os.environ.get('MESH_WORKERS', '1')}"]


@pytest.fixture(scope="session")
def keyring():
    directory = make_private_dir("ngx-mesh-keys-")
    ring = make_keyring(directory)
    yield ring
    if not os.environ.get("MESH_KEEP_TMP"):
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def echo():
    server = EchoUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def module_path() -> str:
    if not Path(MESH_MODULE).is_file():
        pytest.fail(f"module not built: {MESH_MODULE} (run `make build`)")
    return MESH_MODULE


class Launcher:
    """Starts nginx instances; on teardown stops them and checks their error logs."""

    def __init__(self, echo: EchoUpstream, keyring) -> None:
        self.echo = echo
        self.keyring = keyring
        self.instances: list[Nginx] = []

    def start(self, http_body: str, *, workers: int | None = None, with_module: bool = True,
              files: dict[str, bytes] | None = None, conf_name: str = "nginx.conf") -> Site:
        """Start nginx; `files` (paths relative to its directory, @TMP@) are written first."""
        ngx = Nginx(http_body, upstream=self.echo.address, keys=self.keyring.dir, workers=workers,
                    with_module=with_module, conf_name=conf_name)
        self.instances.append(ngx)
        for name, content in (files or {}).items():
            path = ngx.tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o644)
        ngx.start()
        return Site(ngx, self.echo)

    def close(self) -> None:
        problems = []
        for ngx in self.instances:
            try:
                ngx.stop()
            except AssertionError as e:
                problems.append(f"{ngx.tmp}: {e}")
            fatal = ngx.fatal_lines()
            if fatal:
                problems.append(f"{ngx.tmp}/error.log has crash/alert/crit lines:\n" + "\n".join(fatal))
            leaked = ngx.leaked_token_lines()
            if leaked:
                problems.append(f"{ngx.tmp}/error.log holds token text:\n" + "\n".join(leaked[:5]))
            if not problems:
                ngx.cleanup()
        self.instances.clear()
        assert not problems, "\n\n".join(problems)


@pytest.fixture
def conf_dir():
    """A private directory for one `nginx -t` run, removed afterwards."""
    directory = make_private_dir("ngx-mesh-t-")
    yield directory
    if not os.environ.get("MESH_KEEP_TMP"):
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def launcher(echo, keyring):
    """Module-scoped: nginx instances started through it live until the test module ends."""
    launch = Launcher(echo, keyring)
    yield launch
    launch.close()


@pytest.fixture
def launcher_fn(echo, keyring):
    """Function-scoped variant, for an nginx that one test needs alone."""
    launch = Launcher(echo, keyring)
    yield launch
    launch.close()
