"""The contract's enums (CONTRACT §3) as StrEnums, the one place their input is parsed, and the
request-level error (ApiError) that carries an ErrorCode.

Output always uses full names (a StrEnum encodes as its value). Input accepts the full name or a
suffix after an underscore (`ASYNC`, `mode_async`), in any case; a suffix that fits more than
one member (`TASK`) is refused rather than guessed. As protojson does, input also takes the
number SPEAR's `function.proto` gives a member, and its zero value (`0`, `*_UNKNOWN`) is proto3's
"not set": the field's default (`parse_input`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self, TypeVar

D = TypeVar("D")

_PARSED: dict[tuple[type, str], WireEnum] = {}
_PARSED_MAX = 4096


class WireEnum(StrEnum):
    """A contract enum: parsed leniently on input, written out by its full name."""

    @classmethod
    def parse(cls, value: object, field: str, allowed: tuple[Self, ...] | None = None) -> Self:
        """The member `value` names (full name or suffix, any case), among `allowed` if given.

        Anything else is INVALID_ARGUMENT, with the choices in the message.
        """
        if allowed is None:  # every request parses a few: remembered (what parses is a small set)
            known = _PARSED.get((cls, value)) if isinstance(value, str) else None
            if known is not None:
                return known  # type: ignore[return-value]
        member = cls._parse(value, field, allowed)
        if allowed is None and isinstance(value, str) and len(_PARSED) < _PARSED_MAX:
            _PARSED[(cls, value)] = member
        return member

    @classmethod
    def parse_input(cls, value: object, field: str, default: D, allowed: tuple[Self, ...] | None = None) -> Self | D:
        """A request field's member, or `default` where the field is proto3's "not set": empty,
        `0`, or the enum's zero name (`EXECUTION_MODE_UNKNOWN`, or `UNKNOWN`), as a client
        built from SPEAR's proto sends for a field it never set."""
        if value in (0, "") and not isinstance(value, bool):
            return default
        if isinstance(value, str) and value.upper() in (_ZERO_NAMES[cls], "UNKNOWN"):
            return default
        return cls.parse(value, field, allowed)

    @classmethod
    def _parse(cls, value: object, field: str, allowed: tuple[Self, ...] | None) -> Self:
        members = allowed if allowed is not None else tuple(cls)
        choices = ", ".join(members)
        if isinstance(value, int) and not isinstance(value, bool):  # protojson may send the number
            numbered = _PROTO_NUMBERS[cls]
            member = numbered[value - 1] if 1 <= value <= len(numbered) else None
            if member is not None and member in members:
                return member
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{field} {value} is not the number of one of {choices}")
        if not isinstance(value, str):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{field} must be a string, one of {choices}")
        wanted = value.upper()
        exact = [m for m in members if m.value == wanted]
        matches = exact or [m for m in members if wanted and m.value.endswith("_" + wanted)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{field} {value!r} is ambiguous: {' or '.join(matches)}?")
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{field} {value!r} is not one of {choices}")


class ExecutionStatus(WireEnum):
    """Where an execution is in its life (CONTRACT §2)."""

    PENDING = "EXECUTION_STATUS_PENDING"
    RUNNING = "EXECUTION_STATUS_RUNNING"
    COMPLETED = "EXECUTION_STATUS_COMPLETED"
    FAILED = "EXECUTION_STATUS_FAILED"
    CANCELLED = "EXECUTION_STATUS_CANCELLED"
    TIMEOUT = "EXECUTION_STATUS_TIMEOUT"
    UNKNOWN = "EXECUTION_STATUS_UNKNOWN"  # only for an execution that does not exist

    @property
    def terminal(self) -> bool:
        """Whether an execution in this status has ended for good."""
        return self in TERMINAL_STATUSES


# The statuses an execution can be in (UNKNOWN is only what a reply about no execution says).
STATUSES = (
    ExecutionStatus.PENDING,
    ExecutionStatus.RUNNING,
    ExecutionStatus.COMPLETED,
    ExecutionStatus.FAILED,
    ExecutionStatus.CANCELLED,
    ExecutionStatus.TIMEOUT,
)
TERMINAL_STATUSES = frozenset(
    {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED, ExecutionStatus.TIMEOUT}
)


class ExecutionMode(WireEnum):
    """How the caller waits: SYNC for the result, ASYNC for an id, STREAM for chunks."""

    SYNC = "EXECUTION_MODE_SYNC"
    ASYNC = "EXECUTION_MODE_ASYNC"
    STREAM = "EXECUTION_MODE_STREAM"


class InvocationType(WireEnum):
    """An existing task's function, or a new task (not served yet)."""

    EXISTING_TASK = "INVOCATION_TYPE_EXISTING_TASK"
    NEW_TASK = "INVOCATION_TYPE_NEW_TASK"


# SPEAR's function.proto: each enum's zero value ("not set") and its members numbered from 1.
_ZERO_NAMES: dict[type[WireEnum], str] = {
    ExecutionStatus: "EXECUTION_STATUS_UNKNOWN",
    ExecutionMode: "EXECUTION_MODE_UNKNOWN",
    InvocationType: "INVOCATION_TYPE_UNKNOWN",
}
_PROTO_NUMBERS: dict[type[WireEnum], tuple[WireEnum, ...]] = {
    ExecutionStatus: STATUSES,
    ExecutionMode: (ExecutionMode.SYNC, ExecutionMode.ASYNC, ExecutionMode.STREAM),
    InvocationType: (InvocationType.NEW_TASK, InvocationType.EXISTING_TASK),
}


class ErrorCode(WireEnum):
    """Request-level codes (an error reply's `error_code`, with an HTTP status) and the codes a
    failed ExecutionResult carries (FUNCTION_ERROR … CANCELLED; INVALID_ARGUMENT is both)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    FUNCTION_ERROR = "FUNCTION_ERROR"
    FUNCTION_NOT_FOUND = "FUNCTION_NOT_FOUND"
    WORKER_LOST = "WORKER_LOST"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    POISON_MESSAGE = "POISON_MESSAGE"  # the invocation could not be read, or processed delivery after delivery
    RESULT_NOT_SERIALIZABLE = "RESULT_NOT_SERIALIZABLE"  # the return value is not storable JSON
    ARTIFACT_CHECKSUM_MISMATCH = "ARTIFACT_CHECKSUM_MISMATCH"  # a registered task's file changed


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}


class ApiError(Exception):
    """A request-level error: becomes {"success": false, "error_code", "message"} on the wire."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # when trying again may work (`Retry-After`, both adapters)

    @property
    def http_status(self) -> int:
        """The HTTP status the code stands for (CONTRACT §5)."""
        return HTTP_STATUS[self.code]
