"""Where a function failed: the traceback of what it raised, stored as a line of its attempt's logs.

A failed execution's `error_message` says `Type: message` (CONTRACT), which does not tell a
developer where their code failed; nothing else kept the stack (probe56: a chained cause and the
failing line were nowhere, not in the status, the logs nor the worker's output). The traceback
goes in the attempt's logs (`include_logs=true`, `spear status --logs`, the events), with the
causes of a chain, without the frames of spear's call before the function's, cut to what one log line
holds (its end: the frames nearest the error). A function run in a child process formats its
traceback there, where the frames are; the exception it sends back is marked as told.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
import traceback

import spear
from spear.worker.context import (
    MAX_LOG_CHARS,
    Context,
    ExecutionCancelled,
    InvalidArgument,
    ReportedFailure,
    ResultNotSerializable,
)

# where the frames of the worker's call of a function come from (a thread's, a task's): not the
# developer's code
_CALLERS = (os.path.dirname(spear.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep)
_TOLD = "__spear_traceback_logged__"  # set on an exception whose traceback is in the logs already
# spear's own failures (a process's stderr, parameters, a cancel, a result JSON cannot hold): their
# message is the whole story
_SAYS_IT_ALL = (ReportedFailure, InvalidArgument, ExecutionCancelled, ResultNotSerializable)


def log_traceback(ctx: Context, error: BaseException | None) -> None:
    """Add the traceback of what the function raised to the attempt's logs (once per exception)."""
    if error is None or isinstance(error, _SAYS_IT_ALL) or getattr(error, _TOLD, False):
        return
    text = traceback_text(error)
    if text:
        ctx.log(text)
    mark_told(error)


def mark_told(error: BaseException) -> None:
    """Say on `error` that its traceback is logged (pickled with it, from a child process)."""
    with contextlib.suppress(AttributeError, TypeError):  # (an exception with __slots__, say)
        setattr(error, _TOLD, True)


def traceback_text(error: BaseException) -> str:
    """The traceback, without the frames of spear's call before the function's (spear's, the
    standard library's: a thread pool's, say), its end if it is too long."""
    if error.__traceback__ is None:
        return ""
    try:
        described = traceback.TracebackException.from_exception(error)
        while len(described.stack) > 1 and described.stack[0].filename.startswith(_CALLERS):
            described.stack.pop(0)
        text = "".join(described.format()).rstrip()
    except Exception:  # (user code can make formatting fail: its str(), say) the message says enough
        return ""
    return text if len(text) <= MAX_LOG_CHARS else "…" + text[-(MAX_LOG_CHARS - 1) :]
