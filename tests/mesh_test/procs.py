"""What the kernel says about nginx's processes: workers, threads, who owns a loopback socket.

Used by the live-keys and outbound-token tests to attribute each background fetch to the nginx
worker that made it (each worker fetches for itself), and to count threads and connections.
Linux /proc only.
"""

from __future__ import annotations

import os

ESTABLISHED = "01"


def _tcp_rows():
    """(local_ip_hex, local_port, remote_ip_hex, remote_port, state, inode) of every IPv4 socket."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 10:
            continue
        local_ip, local_port = fields[1].split(":")
        remote_ip, remote_port = fields[2].split(":")
        yield local_ip, int(local_port, 16), remote_ip, int(remote_port, 16), fields[3], int(fields[9])


def client_socket_inode(client_port: int, server_port: int) -> int | None:
    """The inode of the client end of a loopback connection client_port -> server_port."""
    for _lip, lport, _rip, rport, _state, inode in _tcp_rows():
        if lport == client_port and rport == server_port and inode:
            return inode
    return None


def _nginx_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == "nginx":
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def pid_owning_inode(inode: int) -> int | None:
    """The nginx process holding socket `inode` (threads share their process's fd table)."""
    target = f"socket:[{inode}]"
    for pid in _nginx_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def peer_pid(client_port: int, server_port: int) -> int | None:
    """The nginx process at the other end of a connection a loopback server accepted."""
    inode = client_socket_inode(client_port, server_port)
    return pid_owning_inode(inode) if inode else None


def established_clients_to(server_port: int) -> list[int]:
    """Client ports of ESTABLISHED connections to 127.0.0.1:server_port (the client ends)."""
    return [lport for _lip, lport, _rip, rport, state, _inode in _tcp_rows()
            if rport == server_port and state == ESTABLISHED]


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def thread_names(pid: int) -> list[str]:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            names.append("?")
    return sorted(names)


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def workers_of(master: int) -> list[int]:
    """The live (not zombie) children of an nginx master: its workers, as no cache is configured."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st and st[1] == master and st[0] != "Z":
                kids.append(int(entry))
    return sorted(kids)
