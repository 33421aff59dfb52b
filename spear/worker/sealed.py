"""A process artifact's verified bytes, run as they were checked.

Before each call the artifact's file is hashed and compared with its registered checksum; but a
path checked and then executed can be changed in between (probe57: a file renamed over the
artifact in a loop ran in 48 of 200 calls, which ended COMPLETED). So what runs is a sealed
in-memory copy of the bytes that were checked when the instance was made (a Linux memfd that
nobody can write, executed through /proc/self/fd): a file changed later fails the next call's
check, and can never run in its place. The process's working directory is still the file's
directory, and `PYTHONPATH` starts with it (a Python script imports its neighbours as run by path:
review59); `$0` is the copy's /proc path, so a program finds its neighbours from its working
directory or `SPEAR_ARTIFACT_PATH`. Where no executable memfd can be made (`vm.memfd_noexec`
= 2), the file runs by its path, as before, and the worker says so.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
MFD_EXEC = 0x10  # Linux 6.3+: executable even where `vm.memfd_noexec` = 1 (Python 3.11 lacks the name)


def artifact_variables(path: Path) -> dict[str, str]:
    """What a process artifact's environment says of its file: `SPEAR_ARTIFACT_PATH`, and its
    directory first on `PYTHONPATH` (run from the copy, a Python script's `sys.path[0]` is
    /proc/self/fd, not its directory)."""
    inherited = os.environ.get("PYTHONPATH")
    python_path = str(path.parent) + (os.pathsep + inherited if inherited else "")
    return {"SPEAR_ARTIFACT_PATH": str(path), "PYTHONPATH": python_path}


class SealedProgram:
    """An executable's bytes in a sealed memfd, open read-only (`fd`, to pass to the child).
    The descriptor is closed once nothing refers to the program any more (not when its instance
    is retired: a call of it may be about to start its process, and a number closed under it
    could be another file's by then)."""

    def __init__(self, fd: int):
        self.fd = fd
        weakref.finalize(self, os.close, fd)

    @property
    def path(self) -> str:
        """What a child given `fd` (at the same number: `pass_fds`) executes."""
        return f"/proc/self/fd/{self.fd}"

    @classmethod
    def of(cls, data: bytes, name: str) -> SealedProgram | None:
        """A sealed copy of `data`, or None where the system cannot make one (then the file is
        run by its path, as before)."""
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        try:
            try:
                writable = os.memfd_create(name[:200], flags | MFD_EXEC)
            except OSError as exc:  # an older kernel does not know the flag
                if exc.errno != errno.EINVAL:
                    raise
                writable = os.memfd_create(name[:200], flags)
        except (AttributeError, OSError) as exc:  # (`vm.memfd_noexec` = 2 refuses executable ones)
            log.warning("worker: %s runs by its path, not as a sealed copy of the bytes checked: %s", name, exc)
            return None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(writable, view) :]
            fcntl.fcntl(writable, fcntl.F_ADD_SEALS, _SEALS)
            # read-only from here: a file open for writing cannot be executed (ETXTBSY)
            readable = os.open(f"/proc/self/fd/{writable}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("worker: %s runs by its path, not as a sealed copy of the bytes checked: %s", name, exc)
            return None
        finally:
            os.close(writable)
        return cls(readable)
