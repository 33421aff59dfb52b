"""One `spear up` per data dir; its children die with it (`spear/orphans.py`).

`spear up` starts nats-server and worker processes in sessions of their own (a terminal's Ctrl-C
reaches `spear up` alone, which stops them in order). So a SIGKILL of `spear up` used to leave them
running: the next `spear up` then failed with "address already in use" after a second nats-server
had already opened the same store. Now each child asks Linux for a signal when its parent dies
(`PR_SET_PDEATHSIG`, SIGTERM: nats-server flushes its store, a worker hands its executions back),
and the data dir is locked (`fcntl.flock`) by the `spear up` that uses it; the embedded
nats-server inherits the lock, so the dir stays locked until that server has exited too.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "spear.lock"


class DataDirInUse(Exception):
    """Another `spear up` (or the nats-server it started) uses the data dir."""


class DataDirUnusable(Exception):
    """The data dir (or a dir under it) cannot be created or written: a bad setting, said in one line."""


def made_dir(path: str | Path) -> Path:
    """`path`, created if need be; DataDirUnusable (exit 2, one line) with the OS's reason if it cannot be
    (probe67: a path through a file, or under /proc, was a NotADirectoryError traceback)."""
    path = Path(path).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirUnusable(unusable(path, exc)) from None
    return path


def unusable(path: Path, exc: OSError) -> str:
    """`data dir X cannot be used: <reason>`, naming the file too when it is another one."""
    named = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return f"data dir {path} cannot be used: {exc.strerror or exc}{named}; pass another --data-dir (SPEAR_DATA_DIR)"


class DataDirLock:
    """An exclusive lock on `<data_dir>/spear.lock`, which holds the owner's pid."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir).resolve() / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise DataDirInUse naming the holder's (DataDirUnusable: no dir)."""
        made_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # (a read-only file system, say)
            raise DataDirUnusable(unusable(self.path.parent, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"data dir {self.path.parent} is in use by spear up (pid {holder}) or the nats-server it "
                "started; stop it first, or pass another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Close our descriptor; the lock goes once no process holds it any more."""
        if self.fd is not None:
            os.close(self.fd)  # a child that inherited it keeps the lock until it exits
            self.fd = None
