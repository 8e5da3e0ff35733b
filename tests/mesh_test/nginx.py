"""Running nginx (with or without the module) from an `http {}` body in a private directory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .client import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
NGINX_BIN = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
MESH_MODULE = os.path.abspath(os.environ.get("MESH_MODULE", str(REPO / "target/release/ngx_http_mesh_module.so")))
MESH_WORKERS = int(os.environ.get("MESH_WORKERS", "1"))

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

# Lines that must never appear in error.log.
FATAL_PATTERNS = [re.compile(r"exited on signal"), re.compile(r"\[alert\]"), re.compile(r"\[crit\]")]


def make_private_dir(prefix: str) -> Path:
    """A temp dir that nginx's unprivileged workers can traverse (pytest's base dir is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def render(
    http_body: str,
    tmp: Path,
    *,
    port: int,
    upstream: str,
    keys: Path,
    workers: int | None = None,
    with_module: bool = True,
) -> str:
    """The whole nginx.conf. Placeholders in http_body: @PORT@ @UPSTREAM@ @KEYS@ @TMP@."""
    body = (
        http_body.replace("@PORT@", str(port))
        .replace("@UPSTREAM@", upstream)
        .replace("@KEYS@", str(keys))
        .replace("@TMP@", str(tmp))
    )
    lines = []
    if with_module:
        lines.append(f"load_module {MESH_MODULE};")
    lines += [
        f"worker_processes {workers or MESH_WORKERS};",
        f"error_log {tmp}/error.log info;",
        f"pid {tmp}/nginx.pid;",
        "events { worker_connections 256; }",
        "http {",
        f"    access_log {tmp}/access.log;",
        f"    client_body_temp_path {tmp}/client_body_temp;",
        f"    proxy_temp_path {tmp}/proxy_temp;",
        f"    fastcgi_temp_path {tmp}/fastcgi_temp;",
        f"    uwsgi_temp_path {tmp}/uwsgi_temp;",
        f"    scgi_temp_path {tmp}/scgi_temp;",
        "    default_type application/octet-stream;",
    ]
    return "\n".join(lines) + "\n" + body.strip("\n") + "\n}\n"


def line_of(conf_text: str, marker: str) -> int:
    """1-based number of the only line of conf_text containing marker."""
    hits = [i + 1 for i, line in enumerate(conf_text.splitlines()) if marker in line]
    assert len(hits) == 1, f"marker {marker!r} found on lines {hits}"
    return hits[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours is dead too
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


class Nginx:
    """One nginx master (daemon) started from a rendered config in its own directory."""

    def __init__(self, http_body: str, *, upstream: str, keys: Path, workers: int | None = None,
                 with_module: bool = True, conf_name: str = "nginx.conf") -> None:
        self.tmp = make_private_dir("ngx-mesh-run-")
        (self.tmp / "logs").mkdir()  # the binary's default error log, before error_log applies
        # nginx's prefix is self.tmp; conf_name may put nginx.conf in a directory below it
        self.conf_path = self.tmp / conf_name
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        self.conf_path.parent.chmod(0o755)
        self.http_body = http_body
        self.upstream = upstream
        self.keys = keys
        self.workers = workers or MESH_WORKERS
        self.with_module = with_module
        self.port = 0
        self.pid: int | None = None
        self.conf_text = ""
        self.killed: set[int] = set()  # workers a test killed on purpose (SIGKILL)

    # ---- files
    @property
    def error_log(self) -> Path:
        return self.tmp / "error.log"

    def read_error_log(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self, name: str = "error.log") -> int:
        try:
            return (self.tmp / name).stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int, name: str = "error.log") -> str:
        try:
            with open(self.tmp / name, "rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, mark: int, predicate, name: str = "error.log", timeout: float = 5.0) -> str:
        """New text of a log since mark, once predicate(text) holds; fails the test at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since(mark, name)
            if predicate(text):
                return text
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name}: the awaited lines did not appear within {timeout}s; "
                                     f"since the mark:\n{text[-4000:]}")
            time.sleep(0.02)

    def info_lines(self, mark: int, *needles: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """The `[info]` lines since mark holding every needle (a str, or a compiled regex), once
        `count` of them are there; asserts there are exactly `count`."""
        def found(text: str) -> list[str]:
            return [l for l in text.splitlines() if "[info]" in l and all(
                (n.search(l) if isinstance(n, re.Pattern) else n in l) for n in needles)]

        self.wait_log(mark, lambda t: len(found(t)) >= count, timeout=timeout)
        # the module logs a refusal while it answers: a second line for the same request is
        # written before the response, so one event-loop pass more is plenty
        time.sleep(0.1)
        text = self.log_since(mark)
        lines = found(text)
        assert len(lines) == count, (
            f"expected {count} [info] line(s) with {needles} in error.log, got {len(lines)}:\n{text[-4000:]}")
        return lines

    # ---- lifecycle
    def start(self) -> "Nginx":
        last_err = ""
        for _attempt in range(3):
            self.port = free_port()
            self.conf_text = render(
                self.http_body, self.tmp, port=self.port, upstream=self.upstream, keys=self.keys,
                workers=self.workers, with_module=self.with_module,
            )
            self.conf_path.write_text(self.conf_text)
            proc = subprocess.run(
                [NGINX_BIN, "-p", str(self.tmp), "-c", str(self.conf_path)],
                capture_output=True, text=True, timeout=START_TIMEOUT,
            )
            if proc.returncode == 0:
                break
            last_err = proc.stdout + proc.stderr
            if "Address already in use" not in last_err:
                raise AssertionError(f"nginx failed to start (rc={proc.returncode}):\n{last_err}\n"
                                     f"--- config\n{self.numbered_conf()}")
        else:
            raise AssertionError(f"nginx failed to start:\n{last_err}")
        deadline = time.monotonic() + START_TIMEOUT
        pid_file = self.tmp / "nginx.pid"
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx wrote no pid file:\n{self.read_error_log()}")
            time.sleep(0.02)
        self.pid = int(pid_file.read_text().strip())
        wait_for_port(self.port, timeout=max(0.5, deadline - time.monotonic()))
        return self

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, then wait until the workers of before have exited and new ones run."""
        assert self.pid is not None
        # nginx listens before it forks its workers: the workers of before must all exist, or
        # one forked late would pass for a new one
        deadline = time.monotonic() + timeout
        while len(_children(self.pid)) < self.workers and time.monotonic() < deadline:
            time.sleep(0.02)
        old = set(_children(self.pid))
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            now = set(_children(self.pid))
            live_old = [p for p in old if p in now and _alive(p)]
            if not live_old and now - old:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"reload not done within {timeout}s (old workers {live_old}):\n"
                                     + self.read_error_log()[-3000:])
            time.sleep(0.05)

    def numbered_conf(self) -> str:
        return "\n".join(f"{i + 1:4} {line}" for i, line in enumerate(self.conf_text.splitlines()))

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        workers = _children(pid)
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and (_alive(pid) or any(_alive(w) for w in workers)):
            time.sleep(0.05)
        leftovers = [p for p in [pid, *workers] if _alive(p)]
        for p in leftovers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not leftovers, f"nginx did not quit within {STOP_TIMEOUT}s: killed {leftovers}"

    def kill_worker(self, pid: int) -> None:
        """SIGKILL one worker, as a crash would; its "exited on signal 9" alert is then expected."""
        self.killed.add(pid)
        os.kill(pid, signal.SIGKILL)

    def fatal_lines(self) -> list[str]:
        expected = [re.compile(rf"worker process {pid} exited on signal 9\b") for pid in self.killed]
        return [line for line in self.read_error_log().splitlines()
                if any(p.search(line) for p in FATAL_PATTERNS) and not any(e.search(line) for e in expected)]

    def leaked_token_lines(self) -> list[str]:
        """error.log lines holding something that looks like a JWT ('eyJ' = base64url of '{"').

        nginx itself quotes header lines when it refuses a request ("client sent ..."): that is
        nginx's own logging, not the module's, and is left out.
        """
        return [line for line in self.read_error_log().splitlines() if "eyJ" in line and "client sent" not in line]

    def cleanup(self) -> None:
        if os.environ.get("MESH_KEEP_TMP"):
            return
        shutil.rmtree(self.tmp, ignore_errors=True)


def nginx_t(conf_text: str, tmp: Path, conf_name: str = "nginx.conf") -> tuple[int, str, Path]:
    """`nginx -t -p tmp -c tmp/conf_name` on conf_text: (returncode, combined output, conf path)."""
    (tmp / "logs").mkdir(exist_ok=True)
    conf = tmp / conf_name
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(conf_text)
    proc = subprocess.run(
        [NGINX_BIN, "-t", "-p", str(tmp), "-c", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30,
    )
    return proc.returncode, proc.stdout, conf


def emerg_at_marked_line(conf_text: str, tmp: Path, marker: str = "# BAD", *, words: list[str] | None = None,
                         or_marker: str | None = None, conf_name: str = "nginx.conf") -> str:
    """Runs `nginx -t` on a config whose bad line carries `marker`; asserts it fails with an
    `[emerg]` line naming the config file and exactly that line (or the line carrying
    `or_marker`: a block's closing brace), and, if `words` are given, one of them; returns it."""
    lines = [line_of(conf_text, marker)] + ([line_of(conf_text, or_marker)] if or_marker else [])
    rc, out, conf = nginx_t(conf_text, tmp, conf_name)
    assert rc != 0, f"nginx -t accepted a bad config:\n{out}"
    at_line = re.compile(rf"{re.escape(str(conf))}:({'|'.join(map(str, lines))})(?!\d)")
    found = [l for l in out.splitlines() if "[emerg]" in l and at_line.search(l)]
    assert found, f"no [emerg] line pointing at {conf}:{lines}:\n{out}"
    if words is not None:
        assert any(w in found[0] for w in words), f"[emerg] does not name any of {words}: {found[0]}"
    return found[0]


def passes_nginx_t(conf_text: str, tmp: Path, *, warn_ok: bool = False) -> str:
    """Asserts `nginx -t` accepts conf_text: exit 0, "test is successful", no [emerg], and no
    [warn] unless warn_ok. Returns the output."""
    rc, out, _ = nginx_t(conf_text, tmp)
    assert rc == 0 and "test is successful" in out, out
    assert "[emerg]" not in out, out
    if not warn_ok:
        assert "[warn]" not in out, out
    return out


def emergs_at_marked_lines(conf_text: str, tmp: Path, marker: str = "# BAD") -> list[str]:
    """As `emerg_at_marked_line` for a config with several bad lines, each carrying `marker`:
    `nginx -t` fails with exactly one `[emerg]` per marked line, each naming the config file and
    its line, and no other `[emerg]`; returns them in the order of the marked lines."""
    bad = [i + 1 for i, line in enumerate(conf_text.splitlines()) if marker in line]
    assert bad, f"no line carries {marker!r}"
    rc, out, conf = nginx_t(conf_text, tmp)
    assert rc != 0, f"nginx -t accepted a bad config:\n{out}"
    emergs = [l for l in out.splitlines() if "[emerg]" in l]
    found = []
    for line in bad:
        at_line = re.compile(rf"{re.escape(str(conf))}:{line}(?!\d)")
        hits = [l for l in emergs if at_line.search(l)]
        assert len(hits) == 1, f"expected one [emerg] line pointing at {conf}:{line}, got {len(hits)}:\n{out}"
        found.append(hits[0])
    assert len(emergs) == len(bad), f"[emerg] lines for unmarked lines too:\n{out}"
    return found


def nginx_built_with(flag: str) -> bool:
    """Whether `nginx -V` lists a configure flag (e.g. --with-http_auth_request_module)."""
    try:
        proc = subprocess.run([NGINX_BIN, "-V"], capture_output=True, text=True, timeout=10)
    except OSError:
        return False
    return flag in proc.stdout + proc.stderr
