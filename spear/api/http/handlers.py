"""The route handlers of the API's operations (CONTRACT §5): each builds the JSON request of its
operation from the path, query and body, runs it on the service layer in-process, and answers."""

from __future__ import annotations

import msgspec
from aiohttp import web

from spear.api import table
from spear.api.auth import AuthError, authorize
from spear.api.connections import until_client_leaves
from spear.api.http.exchange import (
    ERROR_CODE,
    answer,
    client_closed,
    json_body,
    json_response,
    query_fields,
    reply_response,
    run,
    with_id,
)
from spear.api.http.keys import OPENAPI, SERVICE
from spear.api.http.sse import KEEPALIVE_S, event_stream, last_event_id, wants_sse
from spear.core import contract
from spear.core.contract import GetExecutionEventsResponse, InvokeFunctionRequest
from spear.core.enums import ApiError, ErrorCode, ExecutionMode, ExecutionStatus, InvocationType
from spear.core.events import encode_event
from spear.core.tokens import ADMIN, READ
from spear.service.callerwait import caller_may_register, read_caller_headers


async def invoke(request: web.Request) -> web.StreamResponse:
    """POST /api/v1/invoke: InvokeFunction. ASYNC and STREAM answer 202 with `Location` (a
    repeat of one too, whatever its execution's state: a client that asks again after a lost
    reply gets what the first call would have given it); STREAM with Accept: text/event-stream
    streams the execution's events instead."""
    service = request.app[SERVICE]
    invocation = table.INVOKE.decode(await json_body(request), service.settings.api.max_request_bytes)
    # Whether it may register a task, read from the request as the service will read it (review15:
    # a body only the lenient decoding takes, `"create_if_not_exists": "true"`, skipped the check)
    registers = _registers(invocation)
    if registers:
        authorize(request, ADMIN)  # NEW_TASK registers a task: what POST /api/v1/tasks needs
    # A SYNC call holds a slot while it waits: if the caller goes away, the wait ends at once
    # (the execution goes on, as an ASYNC one would).
    read_caller_headers(request.headers)  # this request's task only
    caller_may_register.set(registers)  # (set for each request: a connection's requests share a task)
    reply = await until_client_leaves(request, table.INVOKE.serve(service, invocation))
    if reply is None:
        return client_closed()
    if reply.success and reply.stream_subject and wants_sse(request):
        # STREAM with Accept: text/event-stream: the execution's events (its chunks among them)
        # in this response, up to the terminal event.
        events = service.follow(reply.execution_id, after_seq=0, idle_s=KEEPALIVE_S)
        return await event_stream(request, events, {"Location": reply.status_endpoint})
    if reply.success and (
        _answers_later(invocation) or (reply.result and reply.result.status == ExecutionStatus.PENDING)
    ):
        return reply_response(reply, 202, {"Location": reply.status_endpoint})
    return reply_response(reply)


def _answers_later(invocation: InvokeFunctionRequest) -> bool:
    """Whether the call is ASYNC or STREAM (its mode read as the service read it: it was)."""
    return ExecutionMode.parse_input(invocation.execution_mode, "execution_mode", ExecutionMode.SYNC) in (
        ExecutionMode.ASYNC,
        ExecutionMode.STREAM,
    )


def _registers(invocation: InvokeFunctionRequest) -> bool:
    """Whether an invocation may register a task (NEW_TASK, or create_if_not_exists); one whose
    invocation_type is no type is not, and the service refuses it."""
    try:
        kind = InvocationType.parse_input(invocation.invocation_type, "invocation_type", InvocationType.EXISTING_TASK)
    except ApiError:
        return False
    return kind == InvocationType.NEW_TASK or invocation.create_if_not_exists


async def get_execution(request: web.Request) -> web.Response:
    """GET /api/v1/executions/{id} (and the contract's /execution/{id}/status): GetExecutionStatus."""
    query = query_fields(request, {"include_result": bool, "include_logs": bool})
    return await answer(request, table.STATUS, with_id(request, "execution_id", query))


async def get_execution_events(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/executions/{id}/events: the stored events, or SSE until the terminal one."""
    service = request.app[SERVICE]
    execution_id = contract.validate_id(request.match_info["id"], "execution_id")
    try:
        if not wants_sse(request):
            history = await service.events(execution_id)
            return web.Response(
                body=b"[" + b",".join(encode_event(s.event) for s in history) + b"]", content_type="application/json"
            )
        resume = last_event_id(request) or 0
        await service.check_exists(execution_id, after_seq=resume)  # before the stream starts
    except ApiError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
        # as the get endpoints say it, and GetExecutionEvents over NATS (probe50: `success: false`)
        return reply_response(GetExecutionEventsResponse(found=False, message=exc.message, error_code=exc.code))
    return await event_stream(request, service.follow(execution_id, after_seq=resume, idle_s=KEEPALIVE_S))


async def follow_events(request: web.Request) -> web.StreamResponse:
    """Every execution's events as they are stored (SSE), for live views; never ends by itself."""
    query = query_fields(request, {"task_id": str, "kinds": str})
    kinds = frozenset(kind for kind in str(query.get("kinds", "")).split(",") if kind)
    task_id = str(query.get("task_id", ""))
    feed = request.app[SERVICE].follow_all(task_id, kinds, last_event_id(request), KEEPALIVE_S)
    return await event_stream(request, feed)


async def cancel_execution(request: web.Request) -> web.Response:
    """POST /api/v1/executions/{id}/cancel: CancelExecution."""
    body = (await json_body(request)).strip() or b"{}"
    return await answer(request, table.CANCEL, with_id(request, "execution_id", body))


async def list_executions(request: web.Request) -> web.Response:
    """GET /api/v1/executions: ListExecutions from query parameters."""
    spec = {"task_id": str, "function_name": str, "status": str, "limit": int, "start_after": str, "order": str}
    query = query_fields(request, spec, rename={"status": "status_filter"})
    status = query.get("status_filter")
    # The enum's number, as NATS requests may give it (probe28): ASCII digits only ('²'.isdigit())
    if isinstance(status, str) and status.isascii() and status.isdigit():
        query["status_filter"] = int(status)
    return await answer(request, table.LIST_EXECUTIONS, query)


async def list_workers(request: web.Request) -> web.Response:
    """GET /api/v1/workers: the running workers."""
    return await answer(request, table.LIST_WORKERS, query_fields(request, {"task_id": str}))


async def list_tasks(request: web.Request) -> web.Response:
    """GET /api/v1/tasks: ListTasks."""
    query = query_fields(request, {"prefix": str, "limit": int, "start_after": str, "include_details": bool})
    return await answer(request, table.LIST_TASKS, query)


async def get_task(request: web.Request) -> web.Response:
    """GET /api/v1/tasks/{id}: GetTask."""
    query = query_fields(request, {"include_executions": bool, "execution_limit": int})
    return await answer(request, table.GET_TASK, with_id(request, "task_id", query))


async def register_task(request: web.Request) -> web.Response:
    """POST /api/v1/tasks: RegisterTask; 201 for a new task, 200 for one registered before;
    `Location` names the task (its id may be the server's)."""
    reply = await run(request, table.REGISTER_TASK, await json_body(request))
    return reply_response(reply, 201 if reply.created else 200, {"Location": f"/api/v1/tasks/{reply.task_id}"})


async def delete_task(request: web.Request) -> web.Response:
    """DELETE /api/v1/tasks/{id}: DeleteTask, options as a JSON body, query parameters or both
    (review14: `?force=true` with a body `{}` was dropped); the two disagreeing is refused."""
    query = query_fields(request, {"force": bool, "cleanup_executions": bool})
    body = (await json_body(request)).strip()
    fields = contract.decode_json_object(body, request.app[SERVICE].settings.api.max_request_bytes) if body else {}
    for name, value in query.items():
        if fields.setdefault(name, value) != value:
            message = f"{name} is {fields[name]!r} in the body and {value!r} in the query: say it once"
            raise ApiError(ErrorCode.INVALID_ARGUMENT, message)
    return await answer(request, table.DELETE_TASK, with_id(request, "task_id", fields))


async def get_health(request: web.Request) -> web.Response:
    """GET /api/v1/health: 200 healthy or degraded, 503 unhealthy; details need the read role."""
    query = query_fields(request, {"include_details": bool})
    if query.get("include_details"):  # plain health stays open for load balancers
        authorize(request, READ)
    report = await run(request, table.HEALTH, query)
    if not query.get("include_details") and not _may_read(request):
        # (open to anyone: its status and components only; the message names tasks and their
        # pending invocations, which are for callers with the read role: probe61)
        report = msgspec.structs.replace(report, message=f"{report.status}; the reasons need the read role")
    response = json_response(report, 503 if report.status == "unhealthy" else 200)
    if report.error_code:  # (UNAVAILABLE) the metrics' `code`: probe67 saw code="503"
        response[ERROR_CODE] = report.error_code
    return response


def _may_read(request: web.Request) -> bool:
    """Whether the request may read (tokens off, or its bearer token grants the read role)."""
    try:
        authorize(request, READ)
    except AuthError:
        return False
    return True


async def get_stats(request: web.Request) -> web.Response:
    """GET /api/v1/stats: GetStats."""
    spec = {"include_task_stats": bool, "include_execution_stats": bool, "time_range_hours": int}
    return await answer(request, table.STATS, query_fields(request, spec))


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json: the document built from the route table."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")
