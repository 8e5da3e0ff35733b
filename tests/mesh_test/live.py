"""Shared by the live-keys and outbound-token tests: one keep-alive connection per nginx worker,
and the error.log lines the fetch threads write (each names the worker pid: `[info] PID#TID:`)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .client import Connection, Response
from .nginx import Nginx
from .procs import workers_of

KEYS_INFO = re.compile(
    r'\[info\] (\d+)#\d+: mesh_provider "([^"]+)": (\d+) keys from (\S+), next refresh in (\d+)s$'
)
KEYS_WARN = re.compile(
    r'\[warn\] (\d+)#\d+: mesh_provider "([^"]+)": fetching (\S+) failed \((.*)\); '
    r'(no keys yet|keeping the last good keys), retry in (\d+)s$'
)
TOKEN_INFO = re.compile(r'\[info\] (\d+)#\d+: mesh_outbound_token "(.+)": new token, renewed in (\d+)s$')
TOKEN_WARN = re.compile(
    r'\[warn\] (\d+)#\d+: mesh_outbound_token "(.+)": fetching from the metadata server failed \((.*)\), '
    r'retry in (\d+)s$'
)
TOKEN_EMPTY_WARN = re.compile(
    r'\[warn\] (\d+)#\d+: (?:\*\d+ )?mesh_outbound_token "(.+)": no token from the metadata server yet, '
    r'the variable is empty'
)


@dataclass
class KeysInfo:
    pid: int
    provider: str
    keys: int
    url: str
    refresh: int


@dataclass
class KeysWarn:
    pid: int
    provider: str
    url: str
    reason: str
    kept: str
    retry: int


def keys_info(text: str, provider: str | None = None) -> list[KeysInfo]:
    out = []
    for line in text.splitlines():
        m = KEYS_INFO.search(line)
        if m and (provider is None or m.group(2) == provider):
            out.append(KeysInfo(int(m.group(1)), m.group(2), int(m.group(3)), m.group(4), int(m.group(5))))
    return out


def keys_warn(text: str, provider: str | None = None) -> list[KeysWarn]:
    out = []
    for line in text.splitlines():
        m = KEYS_WARN.search(line)
        if m and (provider is None or m.group(2) == provider):
            out.append(KeysWarn(int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5), int(m.group(6))))
    return out


def matching(text: str, pattern: re.Pattern) -> list[re.Match]:
    return [m for m in (pattern.search(line) for line in text.splitlines()) if m]


def pid_of(resp: Response) -> int:
    value = resp.header("X-Pid")
    assert value and value.isdigit(), f"response without X-Pid: {resp!r}"
    return int(value)


def wait_workers(ngx: Nginx, timeout: float = 5.0) -> list[int]:
    """The workers, once all `ngx.workers` of them run (nginx answers before the last has started)."""
    wait_until(lambda: len(workers_of(ngx.pid)) == ngx.workers, timeout)
    workers = workers_of(ngx.pid)
    assert len(workers) == ngx.workers, f"expected {ngx.workers} workers, have {workers}"
    return workers


def worker_connections(ngx: Nginx, path: str = "/open/", timeout: float = 10.0) -> dict[int, Connection]:
    """One keep-alive connection to each worker (found by the X-Pid of `path`'s response).

    Needs `listen ... reuseport` (so new connections spread over the workers) and a location
    answering `path` with `add_header X-Pid $pid always`.
    """
    want = set(wait_workers(ngx))
    conns: dict[int, Connection] = {}
    deadline = time.monotonic() + timeout
    while set(conns) != want:
        if time.monotonic() > deadline:
            for c in conns.values():
                c.close()
            raise AssertionError(f"could not reach every worker {sorted(want)}: reached {sorted(conns)}")
        conn = Connection(ngx.port)
        resp = conn.request(path)
        pid = pid_of(resp)
        if pid in want and pid not in conns:
            conns[pid] = conn
        else:
            conn.close()
    return conns


def close_all(conns: dict[int, Connection]) -> None:
    for c in conns.values():
        try:
            c.close()
        except OSError:
            pass


def wait_until(predicate, timeout: float, interval: float = 0.02):
    """predicate()'s first truthy value within timeout, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
