"""The CLI's exit codes, by outcome: scripts branch on them.

0 completed (or accepted), 1 failed, 2 usage or configuration (credentials NATS refuses too),
3 timed out (the execution, or the wait for it), 4 cancelled, 5 not found, 69 unavailable (NATS
or spear not reachable; sysexits' EX_UNAVAILABLE), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

from spear import errors

OK = 0
FAILED = 1
USAGE = 2
TIMEOUT = 3
CANCELLED = 4
NOT_FOUND = 5
UNAVAILABLE = 69
INTERRUPTED = 130

_BY_STATUS = {
    "EXECUTION_STATUS_FAILED": FAILED,
    "EXECUTION_STATUS_TIMEOUT": TIMEOUT,
    "EXECUTION_STATUS_CANCELLED": CANCELLED,
}


def for_status(status: str) -> int:
    """An execution's status as an exit code: pending, running and completed are 0."""
    return _BY_STATUS.get(status, OK)


def for_error(error: errors.SpearError) -> int:
    """A request or execution error as an exit code."""
    if isinstance(error, errors.ExecutionError):
        return for_status(error.status)
    if isinstance(error, errors.NotFound):
        return NOT_FOUND
    if isinstance(error, errors.Unavailable):
        return UNAVAILABLE
    if isinstance(error, errors.DeadlineExceeded):
        return TIMEOUT
    if isinstance(error, errors.InvalidArgument | errors.Unauthenticated):
        return USAGE  # the request, or the configured credentials, must change
    return FAILED
