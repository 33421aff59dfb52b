"""The operations both adapters serve, in one table: endpoint name → request Struct → service call.

The adapters own bytes: each hands a request body (the NATS message, or the JSON the HTTP route
builds from its path, query and body) to `Operation.run`, which decodes it with the contract's
decoder (size limit, validation) and calls the service with the Struct. So the NATS gateway and
the HTTP API can never decode a request differently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from spear.core import contract
from spear.core.contract import (
    CancelExecutionRequest,
    CancelExecutionResponse,
    DeleteTaskRequest,
    DeleteTaskResponse,
    GetExecutionEventsRequest,
    GetExecutionEventsResponse,
    GetExecutionStatusRequest,
    GetExecutionStatusResponse,
    GetHealthRequest,
    GetHealthResponse,
    GetStatsRequest,
    GetStatsResponse,
    GetTaskRequest,
    GetTaskResponse,
    InvokeFunctionRequest,
    InvokeFunctionResponse,
    ListExecutionsRequest,
    ListExecutionsResponse,
    ListTasksRequest,
    ListTasksResponse,
    ListWorkersRequest,
    ListWorkersResponse,
    RegisterTaskRequest,
    RegisterTaskResponse,
)
from spear.core.enums import ExecutionMode
from spear.service.operations import Service

Req = TypeVar("Req", bound=msgspec.Struct)
Rep = TypeVar("Rep", bound=msgspec.Struct)


@dataclass(frozen=True)
class Operation(Generic[Req, Rep]):
    """One operation: its NATS endpoint name (`P.api.<name>`), request Struct and service call."""

    name: str
    request: type[Req]
    call: Callable[[Service, Req], Awaitable[Rep]]  # the caller's trace context is the current one
    empty_is_default: bool = False  # an empty body means `{}`: every field at its default

    def decode(self, body: bytes, max_bytes: int) -> Req:
        """The request Struct in `body`; INVALID_ARGUMENT or PAYLOAD_TOO_LARGE if it is not one."""
        if self.empty_is_default and not body:
            body = b"{}"
        return contract.decode_request(body, self.request, max_bytes)

    async def run(self, service: Service, body: bytes) -> Rep:
        """Decode `body` and call the service with it (under the adapter's span)."""
        return await self.serve(service, self.decode(body, service.settings.api.max_request_bytes))

    async def serve(self, service: Service, request: Req) -> Rep:
        """Call the service with a decoded request (an adapter that reads it too)."""
        return await self.call(service, request)


def _op(
    name: str,
    request: type[Req],
    call: Callable[[Service, Req], Awaitable[Rep]],
    empty_is_default: bool = False,
) -> Operation[Req, Rep]:
    return Operation(name, request, call, empty_is_default)


INVOKE: Operation[InvokeFunctionRequest, InvokeFunctionResponse] = _op(
    "invoke_function", InvokeFunctionRequest, lambda s, r: s.invoke(r)
)
STREAM: Operation[InvokeFunctionRequest, InvokeFunctionResponse] = _op(
    "stream_function", InvokeFunctionRequest, lambda s, r: s.invoke(r, ExecutionMode.STREAM)
)
STATUS: Operation[GetExecutionStatusRequest, GetExecutionStatusResponse] = _op(
    "get_execution_status", GetExecutionStatusRequest, lambda s, r: s.status(r)
)
EVENTS: Operation[GetExecutionEventsRequest, GetExecutionEventsResponse] = _op(
    "get_execution_events", GetExecutionEventsRequest, lambda s, r: s.execution_events(r)
)
CANCEL: Operation[CancelExecutionRequest, CancelExecutionResponse] = _op(
    "cancel_execution", CancelExecutionRequest, lambda s, r: s.cancel(r)
)
LIST_EXECUTIONS: Operation[ListExecutionsRequest, ListExecutionsResponse] = _op(
    "list_executions", ListExecutionsRequest, lambda s, r: s.list_executions(r), empty_is_default=True
)
GET_TASK: Operation[GetTaskRequest, GetTaskResponse] = _op("get_task", GetTaskRequest, lambda s, r: s.get_task(r))
LIST_TASKS: Operation[ListTasksRequest, ListTasksResponse] = _op(
    "list_tasks", ListTasksRequest, lambda s, r: s.list_tasks(r), empty_is_default=True
)
REGISTER_TASK: Operation[RegisterTaskRequest, RegisterTaskResponse] = _op(
    "register_task", RegisterTaskRequest, lambda s, r: s.register_task(r)
)
DELETE_TASK: Operation[DeleteTaskRequest, DeleteTaskResponse] = _op(
    "delete_task", DeleteTaskRequest, lambda s, r: s.delete_task(r)
)
HEALTH: Operation[GetHealthRequest, GetHealthResponse] = _op(
    "get_health", GetHealthRequest, lambda s, r: s.health(r), empty_is_default=True
)
STATS: Operation[GetStatsRequest, GetStatsResponse] = _op(
    "get_stats", GetStatsRequest, lambda s, r: s.stats(r), empty_is_default=True
)
LIST_WORKERS: Operation[ListWorkersRequest, ListWorkersResponse] = _op(
    "list_workers", ListWorkersRequest, lambda s, r: s.list_workers(r), empty_is_default=True
)

# Every operation, as the NATS gateway serves them.
OPERATIONS: tuple[Operation[Any, Any], ...] = (
    INVOKE,
    STREAM,
    STATUS,
    EVENTS,
    CANCEL,
    LIST_EXECUTIONS,
    GET_TASK,
    LIST_TASKS,
    REGISTER_TASK,
    DELETE_TASK,
    HEALTH,
    STATS,
    LIST_WORKERS,
)
