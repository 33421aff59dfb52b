"""The wire contract (CONTRACT.md) as msgspec Structs: requests, replies, ids, decoding, timestamps.

The enums and ApiError are in `enums`. Pure: no I/O. Both adapters (NATS gateway, HTTP) decode
and encode through this module only.
"""

from __future__ import annotations

import calendar
import functools
import re
import time
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from spear.core.enums import ApiError, ErrorCode, ExecutionMode, ExecutionStatus, InvocationType, WireEnum
from spear.core.jsonlimits import JsonRejected, decode_limited

# Request fields that take an enum are strings parsed by `WireEnum.parse` (full name or suffix, any
# case); the schema lists the full names, and the enums are components of the OpenAPI document.


def _enum_input(enum: type[WireEnum]) -> msgspec.Meta:
    return msgspec.Meta(
        description=f"{enum.__name__}: the full name or its suffix, any case", examples=[m.value for m in enum]
    )


ModeInput = Annotated[str, _enum_input(ExecutionMode)]
InvocationTypeInput = Annotated[str, _enum_input(InvocationType)]
StatusInput = Annotated[str, _enum_input(ExecutionStatus)]


# --- ids: they become NATS subject tokens, so only [A-Za-z0-9_-] -----------------------------------

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
ID_RULE = "1 to 128 letters, digits, '_' or '-'"  # how messages state the rule (never the regex)
# msgspec searches with Python's `re`, whose `$` also matches before a final newline: `(?!\n)`
# refuses that one (and still reads the same in the JSON Schema's ECMA dialect).
ID_REGEX = r"^[A-Za-z0-9_-]{1,128}$(?!\n)"
OPTIONAL_ID_REGEX = r"^[A-Za-z0-9_-]{0,128}$(?!\n)"
Id = Annotated[str, msgspec.Meta(pattern=ID_REGEX, description=ID_RULE)]
OptionalId = Annotated[str, msgspec.Meta(pattern=OPTIONAL_ID_REGEX, description=f"empty, or {ID_RULE}")]
_RULES = {ID_REGEX: f"must be {ID_RULE}", OPTIONAL_ID_REGEX: f"must be empty or {ID_RULE}"}


def validate_id(value: Any, field: str) -> str:
    """`value` if it is a valid id, else INVALID_ARGUMENT naming `field`."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{field} must be {ID_RULE}, got {_show(value)}")
    return value


def _validation_message(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with a pattern mismatch said as the rule it stands for."""
    text = str(exc)
    found = re.fullmatch(r"Expected `str` matching regex '(.*)' - at `\$\.(.*)`", text)
    pattern = found.group(1).replace("\\\\", "\\") if found else ""  # msgspec shows `\` doubled
    if found and pattern in _RULES:
        return f"{found.group(2)} {_RULES[pattern]}"
    return f"invalid request: {text}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- errors: ApiError and the codes live in `enums`; this is the body of an error reply ----------


class ErrorReply(msgspec.Struct):
    """The body of every error reply, NATS and HTTP alike."""

    success: bool
    error_code: ErrorCode
    message: str


# --- messages -----------------------------------------------------------------------------------


class Parameter(msgspec.Struct, forbid_unknown_fields=True):
    """SPEAR's FunctionParameter: `type`, `required` and `description` are accepted (a client
    built from the proto sends them) and not used; the function's signature decides."""

    name: str
    value: Any = None
    type: str = ""
    required: bool = False
    description: str = ""


class ExecutionContext(msgspec.Struct, forbid_unknown_fields=True):
    """The invocation's context: its time limit, retries and caller metadata."""

    execution_id: str = ""  # SPEAR's context field; the request's own execution_id takes precedence
    timeout_ms: int = 0
    max_retries: int | None = None
    session_id: str = ""
    user_id: str = ""
    environment: dict[str, str] = {}
    headers: dict[str, str] = {}


ARTIFACT_TYPES = ("python", "process")


class ArtifactSpec(msgspec.Struct, forbid_unknown_fields=True):
    """SPEAR's ArtifactSpec (CONTRACT §8): what a registered task runs."""

    artifact_type: Literal["python", "process"]
    location: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    checksum: str = ""  # "sha256:<hex>" or bare hex; empty: the server records the file's
    version: str = ""
    metadata: dict[str, str] = {}


class InvokeFunctionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """InvokeFunction (and StreamFunction): which function, with what, how."""

    task_id: Id = ""  # required for EXISTING_TASK: checked by validate_id (defaults are not)
    function_name: Id = ""
    invocation_type: InvocationTypeInput = InvocationType.EXISTING_TASK.value
    parameters: list[Parameter] = []
    execution_mode: ModeInput = ExecutionMode.SYNC.value
    context: ExecutionContext = msgspec.field(default_factory=ExecutionContext)
    execution_id: Id | None = None
    invocation_metadata: dict[str, str] = {}
    force_new_instance: bool = False
    create_if_not_exists: bool = False
    task_name: str = ""
    task_description: str = ""
    artifact_spec: ArtifactSpec | None = None  # NEW_TASK, or create_if_not_exists
    wait: bool = False  # SPEAR's field; the execution mode decides whether the reply waits


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
    metrics: dict[str, Any] = {}


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


EVENTS_PAGE_MAX = 1000  # events in one GetExecutionEvents reply


class GetExecutionStatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetExecutionStatus: which execution, with its result and logs or not."""

    execution_id: Id = ""
    include_result: bool = True
    include_logs: bool = False


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


class GetExecutionEventsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """spear's extension (`P.api.get_execution_events`): an execution's stored events after a
    stream sequence, a page at a time (the NATS twin of `GET /api/v1/executions/{id}/events`)."""

    execution_id: Id = ""
    after_seq: Annotated[int, msgspec.Meta(ge=0)] = 0  # events stored after this stream sequence
    limit: Annotated[int, msgspec.Meta(ge=0, le=EVENTS_PAGE_MAX)] = 0  # 0: EVENTS_PAGE_MAX


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


class CancelExecutionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """CancelExecution: which execution, why, and whether to wait for it."""

    execution_id: Id = ""
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    force: bool = False


class CancelExecutionResponse(msgspec.Struct):
    """The status after a cancel request, or why it was refused."""

    success: bool
    message: str
    final_status: ExecutionStatus
    error_code: str = ""


class ListExecutionsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """ListExecutions: filters and a page."""

    task_id: OptionalId = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    start_after: OptionalId = ""  # the page starts after this id, in the listing's order
    status_filter: StatusInput = ""
    function_name: OptionalId = ""  # spear's extension: only this function's executions
    order: Literal["desc", "asc"] = "desc"  # spear's extension: newest (highest id) first by default


class ListExecutionsResponse(msgspec.Struct):
    """A page of executions, and where the next one starts."""

    executions: list[ExecutionInfo]
    has_more: bool = False
    next_start_after: str = ""


class ParameterInfo(msgspec.Struct):
    """One parameter a function takes by name (shaped like SPEAR's FunctionParameter)."""

    name: str
    type: str = ""  # the annotation's text, for people; not checked
    required: bool = True


class FunctionInfo(msgspec.Struct):
    """A function as workers publish it: what the gateway checks a call against."""

    name: str
    parameters: list[ParameterInfo] = []
    accepts_any: bool = False  # takes **kwargs: any parameter name is accepted
    description: str = ""
    streaming: bool = False  # a generator: its items are `chunk` events
    timeout_ms: int = 0  # the function's default time limit (0: the execution mode's)
    max_retries: int | None = None  # the function's default retries (None: the execution mode's)


class InstanceInfo(msgspec.Struct):
    """A live task instance in a worker: the loaded module, or the verified artifact of a process task."""

    instance_id: str
    worker_id: str = ""
    created_at: str | None = None
    last_used_at: str | None = None
    calls: int = 0


class TaskInfo(msgspec.Struct):
    """SPEAR's TaskInfo, plus the functions the task serves, and (get_task) who serves it."""

    task_id: str
    task_name: str = ""
    artifact_spec: dict[str, Any] | None = None
    created_at: str | None = None
    updated_at: str | None = None
    execution_count: int = 0
    last_status: str = ""
    metadata: dict[str, str] = {}
    description: str = ""
    functions: list[FunctionInfo] = []
    registered: bool = False  # registered at runtime (register_task, NEW_TASK), not served from code
    workers: list[str] = []  # get_task: the workers serving it now
    instances: list[InstanceInfo] = []  # get_task: its live instances

    def has_function(self, name: str) -> bool:
        """Whether the task serves a function of that name."""
        return any(f.name == name for f in self.functions)


class RegisterTaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """RegisterTask: the task's id (or none: the server makes one), name and artifact."""

    task_id: OptionalId = ""  # empty: the server makes one
    task_name: str = ""
    description: str = ""
    artifact_spec: ArtifactSpec | None = None
    metadata: dict[str, str] = {}


class RegisterTaskResponse(msgspec.Struct):
    """The registered task, or why it was refused."""

    success: bool
    task_id: str = ""
    message: str = ""
    error_code: str = ""
    task: TaskInfo | None = None
    created: bool = False  # false: the same registration existed (idempotent)


class DeleteTaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """DeleteTask: which task, and what becomes of its executions."""

    task_id: Id = ""
    force: bool = False  # cancel its pending and running executions
    cleanup_executions: bool = False  # remove their history too (expired markers stay)


class DeleteTaskResponse(msgspec.Struct):
    """What deleting the task did to its executions, or why it was refused."""

    success: bool
    message: str = ""
    error_code: str = ""
    cancelled_executions: int = 0
    cleaned_executions: int = 0


class GetTaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetTask: which task, with its newest executions or not."""

    task_id: Id = ""
    include_executions: bool = False
    execution_limit: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 10


class GetTaskResponse(msgspec.Struct):
    """A task, or found=false (NOT_FOUND)."""

    found: bool
    task: TaskInfo | None = None
    executions: list[ExecutionInfo] = []
    message: str = ""
    error_code: str = ""  # NOT_FOUND when found is false


class ListTasksRequest(msgspec.Struct, forbid_unknown_fields=True):
    """ListTasks: a prefix and a page."""

    prefix: OptionalId = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    start_after: OptionalId = ""
    include_details: bool = False


class ListTasksResponse(msgspec.Struct):
    """A page of tasks, and where the next one starts."""

    tasks: list[TaskInfo]
    has_more: bool = False
    next_start_after: str = ""


class GetHealthRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetHealth: with execution counts or not."""

    include_details: bool = False


class HealthDetails(msgspec.Struct):
    """Execution counts and system facts for a detailed health reply."""

    active_tasks: int = 0
    running_executions: int = 0
    pending_executions: int = 0
    total_memory_used: int = 0
    total_executions: int = 0
    system_info: dict[str, str] = {}


class GetHealthResponse(msgspec.Struct):
    """healthy, degraded or unhealthy, and which components answer."""

    status: str
    message: str = ""
    error_code: str = ""  # UNAVAILABLE when unhealthy (503)
    uptime_seconds: int = 0
    details: HealthDetails | None = None
    components: dict[str, bool] = {}


class GetStatsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetStats: which parts, over which time range."""

    include_task_stats: bool = True
    include_execution_stats: bool = True
    time_range_hours: Annotated[int, msgspec.Meta(ge=0)] = 0


class ServiceStats(msgspec.Struct):
    """Uptime, totals and resource use of this service process."""

    uptime_seconds: int = 0
    total_tasks: int = 0
    total_executions: int = 0
    total_memory_used: int = 0
    cpu_usage_percent: float = 0.0
    memory_usage_percent: float = 0.0


class TaskStats(msgspec.Struct):
    """Busy and idle tasks, and the most active ones."""

    active_tasks: int = 0
    idle_tasks: int = 0
    tasks_by_type: dict[str, int] = {}
    most_active_tasks: list[TaskInfo] = []


class ExecutionStats(msgspec.Struct):
    """Executions by status and function, times and success rate."""

    running_executions: int = 0
    pending_executions: int = 0
    completed_executions: int = 0
    failed_executions: int = 0
    average_execution_time_ms: float = 0.0
    success_rate_percent: float = 0.0
    executions_by_function: dict[str, int] = {}


class ListWorkersRequest(msgspec.Struct, forbid_unknown_fields=True):
    """spear's extension (`P.api.list_workers`, `GET /api/v1/workers`): the running workers."""

    task_id: OptionalId = ""  # only workers serving this task


class WorkerInfo(msgspec.Struct):
    """One running worker: its id, tasks and the executions it runs."""

    worker_id: str
    tasks: list[str] = []  # the tasks it serves
    version: str = ""
    instance_id: str = ""  # its NATS micro service instance
    running_executions: list[str] = []  # ids of the executions whose latest attempt it runs


class ListWorkersResponse(msgspec.Struct):
    """The running workers."""

    workers: list[WorkerInfo]


class GetStatsResponse(msgspec.Struct):
    """The parts of GetStats that were asked for."""

    service_stats: ServiceStats
    task_stats: TaskStats | None = None
    execution_stats: ExecutionStats | None = None


def status_endpoint(execution_id: str) -> str:
    """Where the HTTP API reports an execution's status."""
    return f"/api/v1/execution/{execution_id}/status"


# --- decoding with clear errors -----------------------------------------------------------------

T = TypeVar("T")


def decode_request(data: bytes, kind: type[T], max_bytes: int) -> T:
    """Decode a request body into `kind`, mapping every failure to a clear ApiError. The limits
    (size, UTF-8, nesting depth) are those of `jsonlimits`, so what is stored can be read back."""
    if len(data) <= max_bytes and not data.strip():
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "request body is empty: a JSON object is required")
    try:
        return decode_limited(data, kind, max_bytes)
    except JsonRejected as exc:
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE if exc.too_large else ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    except msgspec.ValidationError as exc:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, _validation_message(exc)) from None


def decode_json_object(data: bytes, max_bytes: int) -> dict[str, Any]:
    """A JSON object under the same limits (for adapters that add fields before decoding)."""
    return decode_request(data, dict[str, Any], max_bytes)


def encode(message: msgspec.Struct) -> bytes:
    """A reply as JSON."""
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
    return _epoch_second(whole) + int(frac or 0) / 1000


@functools.lru_cache(maxsize=4096)
def _epoch_second(whole: str) -> int:
    # strptime is slow (a hot spot of the projection, which parses every event's time) and the
    # events of a second share their whole-second part: parsed once.
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))


def elapsed_ms(started_at: str | None, ended_at: str | None) -> int:
    """Milliseconds from one timestamp to another; 0 if it never started."""
    if not started_at or not ended_at:
        return 0
    return max(0, round((parse_timestamp(ended_at) - parse_timestamp(started_at)) * 1000))


def timestamp_or_none(text: str | None) -> float | None:
    """parse_timestamp, or None for text that is not one: readers survive whatever was stored."""
    try:
        return parse_timestamp(text) if text else None
    except (ValueError, OverflowError):
        return None


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
