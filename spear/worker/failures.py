"""Where a function failed: the traceback of what it raised, kept with its attempt's result.

A failed execution's `error_message` says `Type: message` (CONTRACT), which does not tell a
developer where their code failed; nothing kept the stack (probe56: a chained cause and the
failing line were nowhere, not in the status, the logs nor the worker's output). The traceback is
the result's `metrics.traceback` (SPEAR's map of strings: no event more, no field the contract
does not have), with the causes of a chain, without the frames of spear's call before the
function's, cut to its end (the frames nearest the error) past MAX_TRACEBACK_CHARS. A function run
in a child process has its traceback formatted there, where the frames are, and carried back on
the exception it raised.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
import traceback

import spear
from spear.core.config import url_passwords_hidden
from spear.core.jsonlimits import storable_text
from spear.worker.context import ExecutionCancelled, InvalidArgument, ReportedFailure, ResultNotSerializable

MAX_TRACEBACK_CHARS = 8192
# where the frames of the worker's call of a function come from (a thread's, a task's): not the
# developer's code
_CALLERS = (os.path.dirname(spear.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep)
_CARRIED = "__spear_traceback__"  # an exception's traceback as its child process formatted it
# spear's own failures (a process's stderr, parameters, a cancel, a result JSON cannot hold): their
# message is the whole story
_SAYS_IT_ALL = (ReportedFailure, InvalidArgument, ExecutionCancelled, ResultNotSerializable)


def traceback_of(error: BaseException) -> str:
    """The traceback of what a function raised ("" for spear's own failures, or if it has none)."""
    # Carried first: a child sends a function's exception that does not pickle back as the
    # ReportedFailure that stands for it, with the function's traceback on it (probe66: dropped as
    # spear's own failure). Only a function's own exceptions are given one (carry_traceback).
    carried = getattr(error, _CARRIED, None)
    if isinstance(carried, str):
        return carried
    if isinstance(error, _SAYS_IT_ALL):
        return ""
    if error.__traceback__ is None:
        return ""
    try:
        described = traceback.TracebackException.from_exception(error)
        while len(described.stack) > 1 and described.stack[0].filename.startswith(_CALLERS):
            described.stack.pop(0)
        # (a lone surrogate, in a file name decoded with surrogateescape, say, as its escape: no
        # event could carry it)
        # and passwords in URLs hidden: the traceback goes to every reader (a driver's error with
        # its DSN in a chained cause, say: review59), where the outer message alone did before
        text = url_passwords_hidden(storable_text("".join(described.format()).rstrip()))
    except Exception:  # (user code can make formatting fail: its str(), say) the message says enough
        return ""
    return text if len(text) <= MAX_TRACEBACK_CHARS else "…" + text[-(MAX_TRACEBACK_CHARS - 1) :]


def carry_traceback(error: BaseException, sent: BaseException) -> None:
    """In a child process: put `error`'s traceback on `sent`, what goes back to the worker in its
    place (itself, or what stands for it), to be pickled with it."""
    text = traceback_of(error)
    if text:
        with contextlib.suppress(AttributeError, TypeError):  # (an exception with __slots__, say)
            setattr(sent, _CARRIED, text)
