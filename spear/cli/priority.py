"""The scheduling priority `spear up` gives the processes it starts: answering callers comes first.

When the CPU is short, the gateway (spear up itself) and NATS accept, answer and store calls,
and the workers and the projection, which run and fold them, take what is left: an ASYNC call is
answered at once rather than after CPU for the executions queued before it, and the deliveries
an inline SYNC call sets off wait until it is answered (docs/performance.md, "Sixth round").
Each child's nice value is spear up's own plus its component's `nice` setting (0: the same).

On Linux with autogroup scheduling (`kernel.sched_autogroup_enabled`), CPU is shared between
sessions before processes, and each child runs in a session of its own (supervisor.py): the
session's autogroup gets the added nice value too (over spear up's autogroup's), without which
the process's alone changes nothing. A user that is not root may change an autogroup once per
100 ms, system-wide: a refused change is tried again until AUTOGROUP_WITHIN_S.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

log = logging.getLogger(__name__)

AUTOGROUP_WITHIN_S = 5.0
AUTOGROUP_RETRY_S = 0.11


async def lower(pid: int, nice: int) -> None:
    """Lower the priority of process `pid`, started a moment ago, by `nice` (best effort)."""
    if nice <= 0:
        return
    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    try:
        os.setpriority(os.PRIO_PROCESS, pid, target)
    except OSError as exc:  # gone already, or not allowed: it runs as spear up does
        log.info("process %d keeps its priority: %s", pid, exc)
        return
    group_target = min(19, _autogroup_nice(os.getpid()) + nice)
    deadline = time.monotonic() + AUTOGROUP_WITHIN_S
    while _autogroup_refused_for_now(pid, group_target):  # children started together take turns
        if time.monotonic() >= deadline:
            log.warning("process %d: its autogroup keeps its priority (the kernel refused the change)", pid)
            return
        await asyncio.sleep(AUTOGROUP_RETRY_S)


def _autogroup_nice(pid: int) -> int:
    """The nice value of the process's autogroup ("/autogroup-N nice K"); 0 if none is read."""
    try:
        with open(f"/proc/{pid}/autogroup") as autogroup:
            return int(autogroup.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


def _autogroup_refused_for_now(pid: int, nice: int) -> bool:
    """Set the autogroup's nice value (a write to /proc: no wait); True if it is to be tried again."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as autogroup:
            autogroup.write(str(nice))
    except FileNotFoundError:  # no autogroup scheduling here (or the process is gone)
        return False
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        log.info("process %d keeps its autogroup's priority: %s", pid, exc)
    return False
