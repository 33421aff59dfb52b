"""The replies of the wire contract (CONTRACT.md), the error body, and the request-level error a
successful-looking reply stands for."""

from __future__ import annotations

from typing import Any

import msgspec

from spear.core.contract.catalog import TaskInfo, WorkerInfo
from spear.core.enums import ApiError, ErrorCode, ExecutionMode, ExecutionStatus


class ErrorReply(msgspec.Struct):
    """The body of every error reply, NATS and HTTP alike."""

    success: bool
    error_code: ErrorCode
    message: str


class ExecutionResult(msgspec.Struct):
    """The outcome, or the progress so far, of an execution (CONTRACT §3)."""

    status: ExecutionStatus
    result: Any = None
    error_message: str = ""
    error_code: str = ""
    execution_time_ms: int = 0
    memory_used_bytes: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    attempt: int = 0
    metrics: dict[str, str] = {}  # SPEAR's map<string, string>: progress as "0.5"


class InvokeFunctionResponse(msgspec.Struct):
    """The reply to InvokeFunction: the result (SYNC) or the accepted execution."""

    success: bool
    message: str
    execution_id: str
    task_id: str
    result: ExecutionResult | None
    error_code: str = ""
    instance_id: str = ""
    status_endpoint: str = ""
    estimated_completion_ms: int = 0
    stream_subject: str = ""  # STREAM mode: where the execution's events (chunks included) are published


class ExecutionInfo(msgspec.Struct):
    """SPEAR's ExecutionInfo, plus when it was requested and which attempt it is on."""

    execution_id: str
    task_id: str
    function_name: str
    execution_mode: ExecutionMode
    status: ExecutionStatus
    started_at: str | None = None
    completed_at: str | None = None
    execution_time_ms: int = 0
    memory_used_bytes: int = 0
    error_message: str = ""
    metadata: dict[str, str] = {}
    requested_at: str | None = None
    attempt: int = 0
    max_retries: int = 0
    timeout_ms: int = 0
    worker_id: str = ""  # the worker of the latest attempt


class GetExecutionStatusResponse(msgspec.Struct):
    """An execution's status, or found=false (NOT_FOUND)."""

    found: bool
    message: str = ""
    error_code: str = ""  # NOT_FOUND when found is false: every error body has an error_code
    result: ExecutionResult | None = None
    logs: list[str] = []
    execution: ExecutionInfo | None = None


class StoredEvent(msgspec.Struct):
    """One stored event (CONTRACT §4, secrets redacted) and its stream sequence."""

    seq: int
    event: msgspec.Raw


class GetExecutionEventsResponse(msgspec.Struct):
    """The events of one page, oldest first; `has_more`: ask again after the last `seq`."""

    found: bool
    message: str = ""
    error_code: str = ""  # NOT_FOUND when found is false
    events: list[StoredEvent] = []
    has_more: bool = False


class CancelExecutionResponse(msgspec.Struct):
    """The status after a cancel request, or why it was refused."""

    success: bool
    message: str
    final_status: ExecutionStatus
    error_code: str = ""


class ListExecutionsResponse(msgspec.Struct):
    """A page of executions, and where the next one starts."""

    executions: list[ExecutionInfo]
    has_more: bool = False
    next_start_after: str = ""


class RegisterTaskResponse(msgspec.Struct):
    """The registered task, or why it was refused."""

    success: bool
    task_id: str = ""
    message: str = ""
    error_code: str = ""
    task: TaskInfo | None = None
    created: bool = False  # false: the same registration existed (idempotent)


class DeleteTaskResponse(msgspec.Struct):
    """What deleting the task did to its executions, or why it was refused."""

    success: bool
    message: str = ""
    error_code: str = ""
    deleted: bool = False  # SPEAR's field: the task is deleted (a refusal says why not)
    cancelled_executions: int = 0
    cleaned_executions: int = 0


class GetTaskResponse(msgspec.Struct):
    """A task, or found=false (NOT_FOUND)."""

    found: bool
    task: TaskInfo | None = None
    executions: list[ExecutionInfo] = []
    message: str = ""
    error_code: str = ""  # NOT_FOUND when found is false


class ListTasksResponse(msgspec.Struct):
    """A page of tasks, and where the next one starts."""

    tasks: list[TaskInfo]
    has_more: bool = False
    next_start_after: str = ""


class ListWorkersResponse(msgspec.Struct):
    """The running workers."""

    workers: list[WorkerInfo]


FINISHED_MESSAGES: dict[str, str] = {
    ExecutionStatus.COMPLETED: "Function executed successfully",
    ExecutionStatus.FAILED: "Function execution failed",
    ExecutionStatus.TIMEOUT: "Function execution timed out",
    ExecutionStatus.CANCELLED: "Function execution was cancelled",
}


ACCEPTED_MESSAGE = "Execution accepted"  # an InvokeFunction reply's `message`: stored now
JOINED_MESSAGE = "Execution already exists"  # ... or its id named an execution stored before, joined


def finished_message(status: str) -> str:
    """An InvokeFunction reply's `message` for an execution that ended with `status`."""
    return FINISHED_MESSAGES.get(status, status)


def status_endpoint(execution_id: str) -> str:
    """Where the HTTP API reports an execution's status."""
    return f"/api/v1/execution/{execution_id}/status"


def reply_error(reply: msgspec.Struct) -> ApiError | None:
    """The request-level error a successful-looking reply stands for (its code sets the NATS
    error headers and the HTTP status): a SYNC wait that ended first, or an unknown execution."""
    if (
        isinstance(reply, (InvokeFunctionResponse, CancelExecutionResponse, RegisterTaskResponse, DeleteTaskResponse))
        and not reply.success
        and reply.error_code
    ):
        return ApiError(ErrorCode(reply.error_code), reply.message)
    if isinstance(reply, (GetExecutionStatusResponse, GetExecutionEventsResponse, GetTaskResponse)) and not reply.found:
        return ApiError(ErrorCode(reply.error_code) if reply.error_code else ErrorCode.NOT_FOUND, reply.message)
    return None
