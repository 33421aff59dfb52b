"""The wire contract (CONTRACT.md) as msgspec Structs: requests, replies, ids, decoding, timestamps.

The enums and ApiError are in `enums`. Pure: no I/O. Both adapters (NATS gateway, HTTP) decode
and encode through this package only. One idea a module:

- `identifiers`: the id rule (ids become NATS subject tokens) and `validate_id`;
- `requests`: one Struct a request, with the parts they share (parameters, context, artifact);
- `replies`: one Struct a reply, the error body, and `reply_error`;
- `catalog`: tasks, functions, instances and workers as replies describe them;
- `stats`: the health and statistics replies;
- `encoding`: decoding requests with clear errors, encoding replies;
- `timestamps`: RFC 3339 timestamps, UTC, milliseconds.

Every name is re-exported here: `from spear.core.contract import X` is the way to use them.
"""

from __future__ import annotations

from spear.core.contract.catalog import (
    FunctionInfo,
    InstanceInfo,
    ParameterInfo,
    TaskInfo,
    WorkerInfo,
)
from spear.core.contract.encoding import (
    T,
    decode_json_object,
    decode_request,
    encode,
)
from spear.core.contract.identifiers import (
    ID_PATTERN,
    ID_REGEX,
    ID_RULE,
    OPTIONAL_ID_REGEX,
    Id,
    OptionalId,
    validate_id,
)
from spear.core.contract.replies import (
    ACCEPTED_MESSAGE,
    JOINED_MESSAGE,
    CancelExecutionResponse,
    DeleteTaskResponse,
    ErrorReply,
    ExecutionInfo,
    ExecutionResult,
    GetExecutionEventsResponse,
    GetExecutionStatusResponse,
    GetTaskResponse,
    InvokeFunctionResponse,
    ListExecutionsResponse,
    ListTasksResponse,
    ListWorkersResponse,
    RegisterTaskResponse,
    StoredEvent,
    finished_message,
    reply_error,
    status_endpoint,
)
from spear.core.contract.requests import (
    ARTIFACT_TYPES,
    EVENTS_PAGE_MAX,
    ArtifactSpec,
    CancelExecutionRequest,
    DeleteTaskRequest,
    ExecutionContext,
    GetExecutionEventsRequest,
    GetExecutionStatusRequest,
    GetHealthRequest,
    GetStatsRequest,
    GetTaskRequest,
    InvocationTypeInput,
    InvokeFunctionRequest,
    ListExecutionsRequest,
    ListTasksRequest,
    ListWorkersRequest,
    ModeInput,
    Parameter,
    RegisterTaskRequest,
    StatusInput,
)
from spear.core.contract.stats import (
    ExecutionStats,
    GetHealthResponse,
    GetStatsResponse,
    HealthDetails,
    ServiceStats,
    TaskStats,
)
from spear.core.contract.timestamps import (
    elapsed_ms,
    format_timestamp,
    parse_timestamp,
    timestamp_or_none,
)

# The enums and the decoding limits were always importable from here too: they stay so.
from spear.core.enums import ApiError, ErrorCode, ExecutionMode, ExecutionStatus, InvocationType, WireEnum
from spear.core.jsonlimits import JsonRejected, decode_limited

__all__ = [
    "ACCEPTED_MESSAGE",
    "ARTIFACT_TYPES",
    "EVENTS_PAGE_MAX",
    "ID_PATTERN",
    "ID_REGEX",
    "ID_RULE",
    "JOINED_MESSAGE",
    "OPTIONAL_ID_REGEX",
    "ApiError",
    "ArtifactSpec",
    "CancelExecutionRequest",
    "CancelExecutionResponse",
    "DeleteTaskRequest",
    "DeleteTaskResponse",
    "ErrorCode",
    "ErrorReply",
    "ExecutionContext",
    "ExecutionInfo",
    "ExecutionMode",
    "ExecutionResult",
    "ExecutionStats",
    "ExecutionStatus",
    "FunctionInfo",
    "GetExecutionEventsRequest",
    "GetExecutionEventsResponse",
    "GetExecutionStatusRequest",
    "GetExecutionStatusResponse",
    "GetHealthRequest",
    "GetHealthResponse",
    "GetStatsRequest",
    "GetStatsResponse",
    "GetTaskRequest",
    "GetTaskResponse",
    "HealthDetails",
    "Id",
    "InstanceInfo",
    "InvocationType",
    "InvocationTypeInput",
    "InvokeFunctionRequest",
    "InvokeFunctionResponse",
    "JsonRejected",
    "ListExecutionsRequest",
    "ListExecutionsResponse",
    "ListTasksRequest",
    "ListTasksResponse",
    "ListWorkersRequest",
    "ListWorkersResponse",
    "ModeInput",
    "OptionalId",
    "Parameter",
    "ParameterInfo",
    "RegisterTaskRequest",
    "RegisterTaskResponse",
    "ServiceStats",
    "StatusInput",
    "StoredEvent",
    "T",
    "TaskInfo",
    "TaskStats",
    "WireEnum",
    "WorkerInfo",
    "decode_json_object",
    "decode_limited",
    "decode_request",
    "elapsed_ms",
    "encode",
    "finished_message",
    "format_timestamp",
    "parse_timestamp",
    "reply_error",
    "status_endpoint",
    "timestamp_or_none",
    "validate_id",
]
