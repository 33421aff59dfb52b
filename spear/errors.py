"""spear's exceptions, one per contract error code, shared by the client SDK and the CLI (and
usable by server code: no I/O, no imports beyond the standard library).

Two families:
- request errors (`SpearError` subclasses named after the contract's codes: `NotFound`,
  `InvalidArgument`, `Unavailable`, `DeadlineExceeded`, ...): the request itself did not succeed;
- execution outcomes (`ExecutionError`: `FunctionFailed`, `Timeout`, `Cancelled`): the request
  succeeded and the execution ended other than COMPLETED; they carry the remote `error_code`,
  `error_message` and the `execution_id`, so the execution can be looked at again.
"""

from __future__ import annotations

from typing import Any


class SpearError(Exception):
    """A spear request failed. `code` is the contract's error code; `execution_id` is set when the
    failure concerns a known execution (a SYNC wait that ended first, say)."""

    code = "UNKNOWN"
    reply: dict[str, Any] | None = None  # the server's reply that said so, as it came (if one did)

    def __init__(self, message: str, *, execution_id: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.execution_id = execution_id
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(SpearError):
    """INVALID_ARGUMENT: the request was refused as malformed."""

    code = "INVALID_ARGUMENT"


class Unauthenticated(SpearError):
    """UNAUTHENTICATED: no or unknown credentials."""

    code = "UNAUTHENTICATED"


class PermissionDenied(SpearError):
    """PERMISSION_DENIED: the credentials lack the role."""

    code = "PERMISSION_DENIED"


class NotFound(SpearError):
    """NOT_FOUND: no such execution, task or function."""

    code = "NOT_FOUND"


class AlreadyExists(SpearError):
    """ALREADY_EXISTS: the execution id is used by a different request."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(SpearError):
    """The request does not fit the execution's state (cancelling a finished one, say);
    `final_status` is the execution's status when the server says it."""

    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, execution_id: str = "", final_status: str = "", **_: Any) -> None:
        super().__init__(message, execution_id=execution_id)
        self.final_status = final_status


class PayloadTooLarge(SpearError):
    """PAYLOAD_TOO_LARGE: the request is over the size limit."""

    code = "PAYLOAD_TOO_LARGE"


class ResourceExhausted(SpearError):
    """RESOURCE_EXHAUSTED: a limit of calls in flight or queued work is reached."""

    code = "RESOURCE_EXHAUSTED"


class Internal(SpearError):
    """INTERNAL: the server failed; the message says how."""

    code = "INTERNAL"


class Unavailable(SpearError):
    """NATS, JetStream or the spear gateway cannot be reached."""

    code = "UNAVAILABLE"


class NoGateway(Unavailable):
    """No spear gateway listens on the subject asked: nothing received the request, so nothing of
    it was stored (no spear up, or one under another subject prefix)."""


class DeadlineExceeded(SpearError, TimeoutError):
    """The wait ended before the execution did. The execution goes on: `execution_id` names it."""

    code = "DEADLINE_EXCEEDED"


class StreamRestarted(SpearError):
    """A STREAM execution's function starts again after items were yielded: an attempt failed
    and the next one (`attempt`) yields from the start, or a run was handed back by a stopping
    worker, or its worker was lost, and the same attempt (`attempt`) runs again from its first
    item. What was shown of the earlier run is to be dropped; `ExecutionHandle.chunks()` gives
    every run's items, and `result()` the final outcome. The execution goes on: `execution_id`
    names it."""

    code = "STREAM_RESTARTED"

    def __init__(self, message: str, *, execution_id: str = "", attempt: int = 0) -> None:
        super().__init__(message, execution_id=execution_id)
        self.attempt = attempt


class ExecutionError(SpearError):
    """The execution ended, and not COMPLETED. `status` is its terminal status; `result` the whole
    ExecutionResult object as the server sent it."""

    code = "EXECUTION_FAILED"

    def __init__(
        self,
        message: str,
        *,
        execution_id: str = "",
        error_code: str = "",
        status: str = "",
        result: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, execution_id=execution_id, code=error_code or self.code)
        self.error_code = error_code
        self.error_message = message
        self.status = status
        self.result = result or {}

    def __str__(self) -> str:
        return f"{self.error_code or self.code}: {self.message} (execution {self.execution_id})"

    @property
    def traceback(self) -> str:
        """Where the function failed, if it raised: its traceback as the worker saw it ("" else)."""
        metrics = self.result.get("metrics") or {}
        return str(metrics.get("traceback") or "")


class FunctionFailed(ExecutionError):
    """The function raised, or could not run (`error_code`: FUNCTION_ERROR, INVALID_ARGUMENT,
    FUNCTION_NOT_FOUND, WORKER_LOST, ...)."""


class InvalidParameters(FunctionFailed, InvalidArgument):
    """The execution failed INVALID_ARGUMENT: its parameters did not fit the function (their
    types, checked by the worker), or the function raised `spear.InvalidArgument`. Also an
    `InvalidArgument`, as a call refused at the door is (an unknown parameter name, say): one
    `except InvalidArgument` takes both (probe56: two classes, one missed)."""


class Timeout(ExecutionError, TimeoutError):
    """The execution reached its time limit (status EXECUTION_STATUS_TIMEOUT). A TimeoutError, as
    `DeadlineExceeded` (the wait for it ended first) is."""


class Cancelled(ExecutionError):
    """The execution was cancelled (status EXECUTION_STATUS_CANCELLED)."""


REQUEST_ERRORS: dict[str, type[SpearError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PayloadTooLarge,
        ResourceExhausted,
        Internal,
        Unavailable,
        DeadlineExceeded,
    )
}

OUTCOME_ERRORS: dict[str, type[ExecutionError]] = {
    "EXECUTION_STATUS_FAILED": FunctionFailed,
    "EXECUTION_STATUS_TIMEOUT": Timeout,
    "EXECUTION_STATUS_CANCELLED": Cancelled,
}


def request_error(code: str, message: str, execution_id: str = "", **extra: Any) -> SpearError:
    """The exception for a request-level error reply (an unknown code gives a plain SpearError)."""
    cls = REQUEST_ERRORS.get(code)
    if cls is None:
        return SpearError(message, execution_id=execution_id, code=code or "UNKNOWN")
    if cls is FailedPrecondition:
        return FailedPrecondition(message, execution_id=execution_id, **extra)
    return cls(message, execution_id=execution_id)


def outcome_error(execution_id: str, result: dict[str, Any]) -> ExecutionError | None:
    """The exception for an execution that ended other than COMPLETED, or None if it completed
    (or has not ended)."""
    status = str(result.get("status", ""))
    cls = OUTCOME_ERRORS.get(status)
    if cls is None:
        return None
    if cls is FunctionFailed and result.get("error_code") == "INVALID_ARGUMENT":
        cls = InvalidParameters
    message = str(result.get("error_message") or status.removeprefix("EXECUTION_STATUS_").lower())
    return cls(
        message, execution_id=execution_id, error_code=str(result.get("error_code", "")), status=status, result=result
    )


__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "ExecutionError",
    "FailedPrecondition",
    "FunctionFailed",
    "Internal",
    "InvalidArgument",
    "InvalidParameters",
    "NoGateway",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ResourceExhausted",
    "SpearError",
    "StreamRestarted",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "outcome_error",
    "request_error",
]
