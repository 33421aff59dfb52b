"""Children that die with their parent: Linux's `PR_SET_PDEATHSIG`, asked for in the child.

`spear up`'s nats-server and worker processes get SIGTERM when `spear up` dies (nats-server
flushes its store, a worker hands its executions back); a worker's process artifacts get SIGKILL
when the worker dies (probe36: they ran on after a SIGKILL of their worker, and the redelivered
invocation ran them again beside them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from functools import cache

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child receive `sig` when the process that started it dies
    (None where there is no prctl: not Linux). It must run in the child right after fork; the
    parent's pid is taken now, so a parent that died in between is noticed too.

    The signal follows the *thread* that forked: start children from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    libc = _libc()
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent is gone already: the signal will never come
            os.kill(os.getpid(), sig)

    return preexec


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
