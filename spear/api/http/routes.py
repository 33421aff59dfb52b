"""The route table of the HTTP API: how each route is served (handler, role) and documented
(summary, request and reply Structs, query parameters, error statuses). The same table serves the
requests and generates the OpenAPI document, so the two cannot drift apart."""

from __future__ import annotations

from dataclasses import replace

from spear.api import webview
from spear.api.http.handlers import (
    cancel_execution,
    delete_task,
    follow_events,
    get_execution,
    get_execution_events,
    get_health,
    get_stats,
    get_task,
    invoke,
    list_executions,
    list_tasks,
    list_workers,
    openapi,
    register_task,
)
from spear.api.http.prometheus import metrics
from spear.api.openapi import QueryParam, Route
from spear.core.contract import (
    CancelExecutionRequest,
    CancelExecutionResponse,
    DeleteTaskRequest,
    DeleteTaskResponse,
    GetExecutionEventsResponse,
    GetExecutionStatusResponse,
    GetHealthResponse,
    GetStatsResponse,
    GetTaskResponse,
    InvokeFunctionRequest,
    InvokeFunctionResponse,
    ListExecutionsResponse,
    ListTasksResponse,
    ListWorkersResponse,
    RegisterTaskRequest,
    RegisterTaskResponse,
)
from spear.core.tokens import ADMIN, INVOKE, READ

BOOLEAN = {"type": "boolean"}
STATUS_QUERY = (QueryParam("include_result", BOOLEAN), QueryParam("include_logs", BOOLEAN))
EVENTS_SCHEMA = {"type": "array", "items": {"type": "object", "required": ["type", "execution_id", "task_id"]}}
STATUS_ROUTE = Route(
    "GET",
    "/api/v1/executions/{id}",
    get_execution,
    "GetExecutionStatus (the canonical route)",
    responses={200: GetExecutionStatusResponse, 404: GetExecutionStatusResponse},
    query=STATUS_QUERY,
    errors=(400, 500, 503),
    role=READ,
)

ROUTES = [
    Route(
        "POST",
        "/api/v1/invoke",
        invoke,
        "InvokeFunction: SYNC replies with the result, ASYNC and STREAM with 202; STREAM with "
        "Accept: text/event-stream streams the execution's events (chunks, then the terminal one) as SSE",
        request=InvokeFunctionRequest,
        responses={200: InvokeFunctionResponse, 202: InvokeFunctionResponse, 504: InvokeFunctionResponse},
        errors=(400, 404, 409, 413, 429, 500, 503, 504),
        role=INVOKE,
        sse=True,
        name="invoke_function",  # (as over NATS: one label for both in spear_requests_total, probe30)
    ),
    STATUS_ROUTE,
    replace(
        STATUS_ROUTE,
        path="/api/v1/execution/{id}/status",
        summary="GetExecutionStatus (SPEAR's alias of /api/v1/executions/{id}; the status_endpoint of replies)",
        name="get_execution_status",
    ),
    Route(
        "GET",
        "/api/v1/executions/{id}/events",
        get_execution_events,
        "The execution's events in order; with Accept: text/event-stream, SSE that follows until the terminal event",
        responses={200: ("application/json", EVENTS_SCHEMA), 404: GetExecutionEventsResponse},
        errors=(400, 500, 503),
        role=READ,
        sse=True,
    ),
    Route(
        "POST",
        "/api/v1/executions/{id}/cancel",
        cancel_execution,
        "CancelExecution: pending ones never start, running ones are asked to stop (force: at once)",
        request=CancelExecutionRequest,
        body_required=False,
        responses={200: CancelExecutionResponse, 404: CancelExecutionResponse, 409: CancelExecutionResponse},
        errors=(400, 404, 409, 413, 500, 503),
        role=INVOKE,
    ),
    Route(
        "GET",
        "/api/v1/executions",
        list_executions,
        "ListExecutions in the order they were accepted, newest first unless order=asc",
        responses={200: ListExecutionsResponse},
        query=(
            QueryParam("task_id", {"type": "string"}),
            QueryParam("function_name", {"type": "string"}),
            QueryParam("status", {"type": "string"}, "a status, full name or suffix (running, FAILED, …)"),
            QueryParam("limit", {"type": "integer", "minimum": 0, "maximum": 1000}, "0 or none: 100"),
            QueryParam("start_after", {"type": "string"}, "next_start_after of the previous page (exclusive)"),
            QueryParam("order", {"enum": ["desc", "asc"]}, "desc (default): newest first; asc: oldest first"),
        ),
        role=READ,
    ),
    Route(
        "GET",
        "/api/v1/events",
        follow_events,
        "Every execution's events as they are stored, as Server-Sent Events (spear's extension)",
        responses={200: ("text/event-stream", {"type": "string"})},
        query=(
            QueryParam("task_id", {"type": "string"}, "only this task's executions"),
            QueryParam("kinds", {"type": "string"}, "comma-separated event kinds (requested,started,…)"),
        ),
        errors=(400, 500, 503),
        role=READ,
        sse=True,
    ),
    Route(
        "GET",
        "/api/v1/workers",
        list_workers,
        "ListWorkers: running workers, their tasks and executions (spear's extension)",
        responses={200: ListWorkersResponse},
        query=(QueryParam("task_id", {"type": "string"}, "only workers serving this task"),),
        role=READ,
    ),
    Route(
        "GET",
        "/api/v1/tasks",
        list_tasks,
        "ListTasks",
        responses={200: ListTasksResponse},
        query=(
            QueryParam("prefix", {"type": "string"}),
            QueryParam("limit", {"type": "integer"}),
            QueryParam("start_after", {"type": "string"}),
            QueryParam("include_details", BOOLEAN),
        ),
        role=READ,
    ),
    Route(
        "POST",
        "/api/v1/tasks",
        register_task,
        "RegisterTask (needs [tasks] allow_registration): 201 when registered, 200 when it already was",
        request=RegisterTaskRequest,
        responses={200: RegisterTaskResponse, 201: RegisterTaskResponse},
        errors=(400, 403, 409, 413, 500, 503),
        role=ADMIN,
    ),
    Route(
        "DELETE",
        "/api/v1/tasks/{id}",
        delete_task,
        "DeleteTask: ?force=true cancels its live executions, ?cleanup_executions=true removes their history",
        request=DeleteTaskRequest,
        body_required=False,
        responses={200: DeleteTaskResponse},
        query=(QueryParam("force", BOOLEAN), QueryParam("cleanup_executions", BOOLEAN)),
        errors=(400, 403, 404, 409, 500, 503),
        role=ADMIN,
    ),
    Route(
        "GET",
        "/api/v1/tasks/{id}",
        get_task,
        "GetTask",
        responses={200: GetTaskResponse, 404: GetTaskResponse},
        query=(QueryParam("include_executions", BOOLEAN), QueryParam("execution_limit", {"type": "integer"})),
        role=READ,
    ),
    Route(
        "GET",
        "/api/v1/health",
        get_health,
        "GetHealth: healthy, degraded (200) or unhealthy (503)",
        responses={200: GetHealthResponse, 503: GetHealthResponse},
        query=(QueryParam("include_details", BOOLEAN),),
        role=None,
    ),
    Route(
        "GET",
        "/api/v1/stats",
        get_stats,
        "GetStats",
        responses={200: GetStatsResponse},
        query=(
            QueryParam("include_task_stats", BOOLEAN),
            QueryParam("include_execution_stats", BOOLEAN),
            QueryParam("time_range_hours", {"type": "integer", "minimum": 0}),
        ),
        role=READ,
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus text exposition",
        responses={200: ("text/plain", {"type": "string"})},
        errors=(500,),
        role=READ,
    ),
    Route(
        "GET",
        "/api/v1/openapi.json",
        openapi,
        "This document",
        responses={200: ("application/json", {"type": "object"})},
        errors=(500,),
        role=None,
    ),
]


ROUTES += webview.ROUTES

# The role each route needs, by operationId.
ROLES = {route.operation_id: route.role for route in ROUTES}
