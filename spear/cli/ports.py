"""A port that is taken, said plainly: which port, what it was for, and (Linux, when it can be
seen) which process listens on it, found through /proc/net/tcp{,6} and /proc/<pid>/fd."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class PortInUse(Exception):
    """A port spear would listen on is taken (the message names who holds it, if known)."""

    def __init__(self, port: int, purpose: str) -> None:
        holder = listener(port)
        super().__init__(
            f"{purpose} port {port} is already in use"
            + (f" by {holder}" if holder else "")
            + f": stop that, or choose another port ({_flag(purpose)})"
        )
        self.port = port


def _flag(purpose: str) -> str:
    return {"HTTP": "--http-port", "NATS": "--nats-port", "metrics": "[telemetry] metrics_port"}.get(
        purpose, "another port"
    )


def ensure_free(port: int, purpose: str, host: str = "") -> None:
    """Raise PortInUse if nothing could listen on `port` now (port 0 or -1: any port, always free).
    Binds the way servers do (SO_REUSEADDR), so a socket in TIME_WAIT does not count."""
    if port <= 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(port, purpose) from None
            # any other trouble (an IPv6 or unknown host, say) is the server's to report


def is_in_use(exc: BaseException) -> bool:
    """Whether `exc` is an "address already in use" error."""
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


def listener(port: int) -> str:
    """`pid 123 (python3 -m http.server 8080)`, or "" when it cannot be told."""
    inodes = _listening_inodes(port)
    if not inodes:
        return ""
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    command = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    return f"pid {pid_dir.name} ({command.strip()[:120]})"
        except OSError:
            continue  # gone, or not ours to look at
    return "another process"


def _listening_inodes(port: int) -> set[str]:
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; the inode is the tenth field
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found
