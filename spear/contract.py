"""The wire contract (CONTRACT.md) as msgspec Structs: requests, replies, enums, ids, error codes.

Pure: no I/O. Both adapters (NATS gateway, HTTP) decode and encode through this module only.
"""

from __future__ import annotations

import calendar
import re
import time
from typing import Any, TypeVar

import msgspec

# --- enums: output uses full names; input accepts the full name or its suffix, any case ----------

INVOCATION_TYPES = ("INVOCATION_TYPE_EXISTING_TASK", "INVOCATION_TYPE_NEW_TASK")
EXECUTION_MODES = ("EXECUTION_MODE_SYNC", "EXECUTION_MODE_ASYNC", "EXECUTION_MODE_STREAM")

PENDING = "EXECUTION_STATUS_PENDING"
RUNNING = "EXECUTION_STATUS_RUNNING"
COMPLETED = "EXECUTION_STATUS_COMPLETED"
FAILED = "EXECUTION_STATUS_FAILED"
CANCELLED = "EXECUTION_STATUS_CANCELLED"
TIMEOUT = "EXECUTION_STATUS_TIMEOUT"
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT)
TERMINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT})

SYNC, ASYNC, STREAM = EXECUTION_MODES


def parse_enum(value: Any, names: tuple[str, ...], field: str) -> str:
    """Return the full enum name for `value` (full name or suffix, case-insensitive)."""
    if not isinstance(value, str):
        raise ApiError(INVALID_ARGUMENT, f"{field} must be a string, one of {', '.join(names)}")
    wanted = value.upper()
    for name in names:
        if wanted == name or name.endswith("_" + wanted):
            return name
    raise ApiError(INVALID_ARGUMENT, f"{field} {value!r} is not one of {', '.join(names)}")


# --- ids: they become NATS subject tokens, so only [A-Za-z0-9_-] -----------------------------------

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def validate_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ApiError(
            INVALID_ARGUMENT,
            f"{field} must be 1 to 128 characters from [A-Za-z0-9_-], got {_show(value)}",
        )
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- errors -------------------------------------------------------------------------------------

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

HTTP_STATUS = {
    INVALID_ARGUMENT: 400,
    UNAUTHENTICATED: 401,
    PERMISSION_DENIED: 403,
    NOT_FOUND: 404,
    ALREADY_EXISTS: 409,
    FAILED_PRECONDITION: 409,
    PAYLOAD_TOO_LARGE: 413,
    RESOURCE_EXHAUSTED: 429,
    INTERNAL: 500,
    UNAVAILABLE: 503,
    DEADLINE_EXCEEDED: 504,
}

# error_code values inside a failed ExecutionResult
FUNCTION_ERROR = "FUNCTION_ERROR"
FUNCTION_NOT_FOUND = "FUNCTION_NOT_FOUND"
WORKER_LOST = "WORKER_LOST"


class ApiError(Exception):
    """A request-level error: becomes {"success": false, "error_code", "message"} on the wire."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class ErrorReply(msgspec.Struct):
    success: bool
    error_code: str
    message: str


# --- messages -----------------------------------------------------------------------------------


class Parameter(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    value: Any = None


class ExecutionContext(msgspec.Struct, forbid_unknown_fields=True):
    timeout_ms: int = 0
    max_retries: int | None = None
    session_id: str = ""
    user_id: str = ""
    environment: dict[str, str] = {}
    headers: dict[str, str] = {}


class InvokeFunctionRequest(msgspec.Struct, forbid_unknown_fields=True):
    task_id: Any = None  # validated by validate_id, so a bad type gets the id message
    function_name: Any = None
    invocation_type: Any = "INVOCATION_TYPE_EXISTING_TASK"
    parameters: list[Parameter] = []
    execution_mode: Any = "EXECUTION_MODE_SYNC"
    context: ExecutionContext = msgspec.field(default_factory=ExecutionContext)
    execution_id: str | None = None
    invocation_metadata: dict[str, str] = {}
    force_new_instance: bool = False
    create_if_not_exists: bool = False
    task_name: str = ""
    task_description: str = ""
    artifact_spec: dict[str, Any] | None = None


class ExecutionResult(msgspec.Struct):
    status: str
    result: Any = None
    error_message: str = ""
    error_code: str = ""
    execution_time_ms: int = 0
    memory_used_bytes: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    attempt: int = 0
    metrics: dict[str, Any] = {}


class InvokeFunctionResponse(msgspec.Struct):
    success: bool
    message: str
    execution_id: str
    task_id: str
    result: ExecutionResult | None
    error_code: str = ""
    instance_id: str = ""
    status_endpoint: str = ""
    estimated_completion_ms: int = 0


class GetExecutionStatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    execution_id: Any = None
    include_result: bool = True
    include_logs: bool = False


class ExecutionInfo(msgspec.Struct):
    execution_id: str
    task_id: str
    function_name: str
    status: str
    execution_mode: str
    attempt: int
    max_retries: int
    timeout_ms: int
    requested_at: str | None
    started_at: str | None
    completed_at: str | None


class GetExecutionStatusResponse(msgspec.Struct):
    found: bool
    message: str = ""
    result: ExecutionResult | None = None
    logs: list[str] = []
    execution: ExecutionInfo | None = None


def status_endpoint(execution_id: str) -> str:
    return f"/api/v1/execution/{execution_id}/status"


# --- decoding with clear errors -----------------------------------------------------------------

T = TypeVar("T")


def decode_request(data: bytes, kind: type[T], max_bytes: int) -> T:
    """Decode a request body into `kind`, mapping every failure to a clear ApiError."""
    if len(data) > max_bytes:
        raise ApiError(PAYLOAD_TOO_LARGE, f"request is {len(data)} bytes, the limit is {max_bytes}")
    if not data.strip():
        raise ApiError(INVALID_ARGUMENT, "request body is empty: a JSON object is required")
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(INVALID_ARGUMENT, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(INVALID_ARGUMENT, f"malformed JSON: {exc}") from None


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


_encoder = msgspec.json.Encoder()


# --- timestamps: RFC 3339, UTC, milliseconds ------------------------------------------------------


def format_timestamp(epoch_seconds: float) -> str:
    """`1736937000.123` -> `"2025-01-15T10:30:00.123Z"`."""
    millis = int(epoch_seconds * 1000)
    seconds, ms = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def parse_timestamp(text: str) -> float:
    """Inverse of format_timestamp, in epoch seconds."""
    whole, _, frac = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(frac or 0) / 1000


def reply_error(reply: msgspec.Struct) -> ApiError | None:
    """The request-level error a successful-looking reply stands for (its code sets the NATS
    error headers and the HTTP status): a SYNC wait that ended first, or an unknown execution."""
    if isinstance(reply, InvokeFunctionResponse) and not reply.success and reply.error_code:
        return ApiError(reply.error_code, reply.message)
    if isinstance(reply, GetExecutionStatusResponse) and not reply.found:
        return ApiError(NOT_FOUND, reply.message)
    return None
