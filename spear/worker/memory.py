"""How much memory an attempt took, cheaply: `memory_used_bytes` is how far the worker process's
resident peak rose above where it stood when the attempt began.

The peak is the kernel's (getrusage `ru_maxrss`, Linux's VmHWM). A transient peak left by earlier
work would hide this attempt's, so when the peak stands above the current resident size the
attempt first resets it (`/proc/self/clear_refs`, Linux): that costs a page-table walk, paid only
after something allocated and freed memory, never on the steady path (two cheap reads then).
The figure is process-wide: attempts running side by side share it, and it is a lower bound
within SLACK_BYTES. tracemalloc would be exact for Python allocations but slows every allocation
of the whole worker; without /proc only the rise of the all-time peak is reported.
"""

from __future__ import annotations

import os
import resource

SLACK_BYTES = 1 << 20  # a peak this close to the resident size is not worth a reset

_PAGE = resource.getpagesize()
_files: dict[str, int | None] = {}


def _fd(path: str, flags: int) -> int | None:
    if path not in _files:
        try:
            _files[path] = os.open(path, flags)
        except OSError:
            _files[path] = None
    return _files[path]


def _resident() -> int | None:
    fd = _fd("/proc/self/statm", os.O_RDONLY)
    if fd is None:
        return None
    try:
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak() -> bool:
    fd = _fd("/proc/self/clear_refs", os.O_WRONLY)
    if fd is None:
        return False
    try:
        os.write(fd, b"5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def baseline() -> int:
    """Where the attempt starts from; pass it to `used` when the attempt ends."""
    resident, peak = _resident(), _peak()
    if resident is None:
        return peak
    if peak - resident > SLACK_BYTES and _reset_peak():
        return resident
    return max(resident, peak)


def used(start: int) -> int:
    """Bytes of peak memory used since `start` (a reading of the peak)."""
    return max(0, _peak() - start)
