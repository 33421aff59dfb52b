"""The HTTP adapter (aiohttp): the operations of the service layer, called in-process (no extra NATS
hop), under the routes of CONTRACT §5. One route table serves the requests and generates the
OpenAPI document.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry.trace import SpanKind

from spear.api import table, webview
from spear.api.auth import TOKENS, AuthError, authorize, load_tokens
from spear.api.connections import GUARD, ConnectionGuard, next_request, until_client_leaves
from spear.api.errors import api_error, error_headers
from spear.api.openapi import QueryParam, Route, build_document
from spear.core import contract
from spear.core.contract import (
    CancelExecutionRequest,
    CancelExecutionResponse,
    DeleteTaskRequest,
    DeleteTaskResponse,
    ErrorReply,
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
from spear.core.enums import ApiError, ErrorCode, ExecutionStatus, InvocationType
from spear.core.events import encode_event
from spear.core.tokens import ADMIN, INVOKE, READ
from spear.jetstream.store import Stored
from spear.service.callerwait import caller_wait_ms, read_wait_header
from spear.service.operations import Service
from spear.telemetry import tracing
from spear.telemetry.metrics import merge_exposition, prometheus_text, record_request

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", Service)
OPENAPI = web.AppKey("openapi", bytes)
# Other processes' /metrics that this /metrics includes (spear up's projection process).
MERGED_METRICS: web.AppKey[tuple[str, ...]] = web.AppKey("merged_metrics")
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping")  # set when the server stops: SSE streams end
KEEPALIVE_S = 15.0
MAX_SEQUENCE_DIGITS = 20  # a stream sequence is a uint64


# --- helpers: every route builds the JSON request its operation decodes (`spear.api.table`) -----


def _json(reply: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(reply), status=status, content_type="application/json", headers=headers
    )


def _reply(reply: msgspec.Struct, ok_status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    error = contract.reply_error(reply)
    return _json(reply, error.http_status if error else ok_status, None if error else headers)


async def _json_body(request: web.Request) -> bytes:
    if request.content_type not in ("application/json", "application/octet-stream") and request.headers.get(
        "Content-Type"
    ):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"Content-Type must be application/json, not {request.content_type}")
    limit_s = request.app[SERVICE].settings.api.body_timeout_ms / 1000
    try:
        async with asyncio.timeout(limit_s):
            return await request.read()
    except TimeoutError:  # aiohttp then drains what is left for at most its lingering time, and closes
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"the request body did not arrive within {limit_s:g} s") from None


def _query(request: web.Request, spec: dict[str, type], rename: dict[str, str] | None = None) -> dict[str, object]:
    """Query parameters as the fields of the JSON request (the operation's decoder validates them)."""
    values: dict[str, object] = {}
    for name, kind in spec.items():
        text = request.query.get(name)
        if text is None:
            continue
        field = (rename or {}).get(name, name)
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ApiError(ErrorCode.INVALID_ARGUMENT, f"query parameter {name} must be true or false")
            values[field] = text.lower() in ("true", "1")
        elif kind is int:
            try:
                values[field] = int(text)
            except ValueError:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, f"query parameter {name} must be an integer") from None
        else:
            values[field] = text
    return values


def _with_id(request: web.Request, key: str, fields: dict[str, object] | bytes) -> bytes:
    """The JSON request with the id from the path (which wins over one in the body)."""
    if isinstance(fields, bytes):
        fields = contract.decode_json_object(fields, request.app[SERVICE].settings.api.max_request_bytes)
    return msgspec.json.encode({**fields, key: request.match_info["id"]})


# --- handlers -----------------------------------------------------------------------------------


async def invoke(request: web.Request) -> web.StreamResponse:
    """POST /api/v1/invoke: InvokeFunction. ASYNC and STREAM answer 202; STREAM with
    Accept: text/event-stream streams the execution's events instead."""
    service = request.app[SERVICE]
    body = await _json_body(request)
    if _registers(body):
        authorize(request, ADMIN)  # NEW_TASK registers a task: what POST /api/v1/tasks needs
    # A SYNC call holds a slot while it waits: if the caller goes away, the wait ends at once
    # (the execution goes on, as an ASYNC one would).
    caller_wait_ms.set(read_wait_header(request.headers))  # this request's task only
    reply = await until_client_leaves(request, table.INVOKE.run(service, body))
    if reply is None:
        return web.Response(status=499)
    if reply.success and reply.stream_subject and _wants_sse(request):
        # STREAM with Accept: text/event-stream: the execution's events (its chunks among them)
        # in this response, up to the terminal event.
        events = service.follow(reply.execution_id, after_seq=0, idle_s=KEEPALIVE_S)
        return await _event_stream(request, events, {"Location": reply.status_endpoint})
    if reply.success and reply.result and reply.result.status == ExecutionStatus.PENDING:
        return _reply(reply, 202, {"Location": reply.status_endpoint})
    return _reply(reply)


def _registers(body: bytes) -> bool:
    """Whether an invoke body may register a task (NEW_TASK, or create_if_not_exists)."""
    try:
        fields = msgspec.json.decode(body, type=_MayRegister)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False  # not a request at all: the operation's decoder says what is wrong with it
    kind = fields.invocation_type
    try:
        new = InvocationType.parse(kind, "invocation_type") == InvocationType.NEW_TASK
    except ApiError:
        new = False
    return new or fields.create_if_not_exists


class _MayRegister(msgspec.Struct):
    """The two fields of an invoke body that decide whether it may register a task."""

    invocation_type: str = InvocationType.EXISTING_TASK.value
    create_if_not_exists: bool = False


def _wants_sse(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


async def get_execution(request: web.Request) -> web.Response:
    """GET /api/v1/executions/{id} (and the contract's /execution/{id}/status): GetExecutionStatus."""
    query = _query(request, {"include_result": bool, "include_logs": bool})
    return _reply(await table.STATUS.run(request.app[SERVICE], _with_id(request, "execution_id", query)))


async def get_execution_events(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/executions/{id}/events: the stored events, or SSE until the terminal one."""
    service = request.app[SERVICE]
    execution_id = contract.validate_id(request.match_info["id"], "execution_id")
    if not _wants_sse(request):
        history = await service.events(execution_id)
        return web.Response(
            body=b"[" + b",".join(encode_event(s.event) for s in history) + b"]", content_type="application/json"
        )
    resume = _last_event_id(request) or 0
    await service.events(execution_id)  # NOT_FOUND before the stream starts
    return await _event_stream(request, service.follow(execution_id, after_seq=resume, idle_s=KEEPALIVE_S))


async def follow_events(request: web.Request) -> web.StreamResponse:
    """Every execution's events as they are stored (SSE), for live views; never ends by itself."""
    query = _query(request, {"task_id": str, "kinds": str})
    kinds = frozenset(kind for kind in str(query.get("kinds", "")).split(",") if kind)
    task_id = str(query.get("task_id", ""))
    feed = request.app[SERVICE].follow_all(task_id, kinds, _last_event_id(request), KEEPALIVE_S)
    return await _event_stream(request, feed)


def _last_event_id(request: web.Request) -> int | None:
    text = request.headers.get("Last-Event-ID", "").strip()
    if text and not (text.isascii() and text.isdigit() and len(text) <= MAX_SEQUENCE_DIGITS):
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT, "Last-Event-ID must be the stream sequence of an event (at most 20 digits)"
        )
    return int(text) if text else None


async def _event_stream(
    request: web.Request, events: AsyncIterator[Stored | None], headers: dict[str, str] | None = None
) -> web.StreamResponse:
    """Stored events as SSE frames (`id:` the stream sequence, `event:` the kind) and keep-alive
    comments while idle, until `events` ends, the client goes away or the server stops. The first
    item is awaited before the response starts, so bad input and an unreachable JetStream get the
    contract's JSON error instead of a broken stream."""
    items = aiter(events)
    try:
        first: Stored | None = await anext(items)
        ended = False
    except StopAsyncIteration:
        first, ended = None, True
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **(headers or {}),
        }
    )
    await response.prepare(request)
    stopping = request.app[STOPPING]
    try:
        stored = first
        while not ended:
            if stored is None:
                await response.write(b": keep-alive\n\n")
            else:
                head = f"id: {stored.seq}\nevent: {stored.event.kind}\ndata: ".encode()
                await response.write(head + encode_event(stored.event) + b"\n\n")
            ended, stored = await _next_unless_stopping(items, stopping)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    return response


async def _next_unless_stopping(
    items: AsyncIterator[Stored | None], stopping: asyncio.Event
) -> tuple[bool, Stored | None]:
    """(ended, item): the next item, or ended when there is none or the server is stopping (an
    open stream must not hold up a stop: aiohttp would wait a minute for its handler)."""
    following = asyncio.ensure_future(anext(items))
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not following.done():
        following.cancel()
        await asyncio.wait({following})
        return True, None
    try:
        return False, following.result()
    except StopAsyncIteration:
        return True, None


async def _stop_streams(app: web.Application) -> None:
    app[STOPPING].set()


async def cancel_execution(request: web.Request) -> web.Response:
    """POST /api/v1/executions/{id}/cancel: CancelExecution."""
    body = (await _json_body(request)).strip() or b"{}"
    return _reply(await table.CANCEL.run(request.app[SERVICE], _with_id(request, "execution_id", body)))


async def list_executions(request: web.Request) -> web.Response:
    """GET /api/v1/executions: ListExecutions from query parameters."""
    spec = {"task_id": str, "function_name": str, "status": str, "limit": int, "start_after": str, "order": str}
    query = _query(request, spec, rename={"status": "status_filter"})
    return _reply(await table.LIST_EXECUTIONS.run(request.app[SERVICE], msgspec.json.encode(query)))


async def list_workers(request: web.Request) -> web.Response:
    """GET /api/v1/workers: the running workers."""
    query = _query(request, {"task_id": str})
    return _reply(await table.LIST_WORKERS.run(request.app[SERVICE], msgspec.json.encode(query)))


async def list_tasks(request: web.Request) -> web.Response:
    """GET /api/v1/tasks: ListTasks."""
    query = _query(request, {"prefix": str, "limit": int, "start_after": str, "include_details": bool})
    return _reply(await table.LIST_TASKS.run(request.app[SERVICE], msgspec.json.encode(query)))


async def get_task(request: web.Request) -> web.Response:
    """GET /api/v1/tasks/{id}: GetTask."""
    query = _query(request, {"include_executions": bool, "execution_limit": int})
    return _reply(await table.GET_TASK.run(request.app[SERVICE], _with_id(request, "task_id", query)))


async def register_task(request: web.Request) -> web.Response:
    """POST /api/v1/tasks: RegisterTask; 201 for a new task, 200 for an update."""
    reply = await table.REGISTER_TASK.run(request.app[SERVICE], await _json_body(request))
    return _reply(reply, 201 if reply.created else 200)


async def delete_task(request: web.Request) -> web.Response:
    """DELETE /api/v1/tasks/{id}: DeleteTask, options as a JSON body or query parameters."""
    query = _query(request, {"force": bool, "cleanup_executions": bool})
    body = (await _json_body(request)).strip()  # the options as a JSON body, or as query parameters
    return _reply(await table.DELETE_TASK.run(request.app[SERVICE], _with_id(request, "task_id", body or query)))


async def get_health(request: web.Request) -> web.Response:
    """GET /api/v1/health: 200 healthy or degraded, 503 unhealthy; details need the read role."""
    query = _query(request, {"include_details": bool})
    if query.get("include_details"):  # plain health stays open for load balancers
        authorize(request, READ)
    report = await table.HEALTH.run(request.app[SERVICE], msgspec.json.encode(query))
    return _json(report, 503 if report.status == "unhealthy" else 200)


async def get_stats(request: web.Request) -> web.Response:
    """GET /api/v1/stats: GetStats."""
    spec = {"include_task_stats": bool, "include_execution_stats": bool, "time_range_hours": int}
    query = _query(request, spec)
    return _reply(await table.STATS.run(request.app[SERVICE], msgspec.json.encode(query)))


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus exposition."""
    await request.app[SERVICE].observe_queues()  # the queue gauges as of this scrape
    body, content_type = prometheus_text()
    for url in request.app.get(MERGED_METRICS, ()):
        body = merge_exposition(body, await _scrape(url))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _scrape(url: str) -> bytes:
    """Another process's /metrics; nothing if it does not answer (a restarting child)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(url) as response,
        ):
            return await response.read() if response.status == 200 else b""
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("http: %s not scraped: %s", url, exc)
        return b""


def create_metrics_app(refresh: Callable[[], Awaitable[None]] | None = None) -> web.Application:
    """Only `GET /metrics`: for components that do not serve the API (worker, gateway, projection)."""

    async def metrics_only(request: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        body, content_type = prometheus_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics_only)
    return app


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json: the document built from ROUTES."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# --- the route table ----------------------------------------------------------------------------

BOOLEAN = {"type": "boolean"}
STATUS_QUERY = (QueryParam("include_result", BOOLEAN), QueryParam("include_logs", BOOLEAN))
EVENTS_SCHEMA = {"type": "array", "items": {"type": "object", "required": ["type", "execution_id", "task_id"]}}

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
    ),
    Route(
        "GET",
        "/api/v1/executions/{id}",
        get_execution,
        "GetExecutionStatus (the canonical route)",
        responses={200: GetExecutionStatusResponse, 404: GetExecutionStatusResponse},
        query=STATUS_QUERY,
        errors=(400, 500, 503),
        role=READ,
    ),
    Route(
        "GET",
        "/api/v1/execution/{id}/status",
        get_execution,
        "GetExecutionStatus (SPEAR's alias of /api/v1/executions/{id}; the status_endpoint of replies)",
        responses={200: GetExecutionStatusResponse, 404: GetExecutionStatusResponse},
        query=STATUS_QUERY,
        errors=(400, 500, 503),
        name="get_execution_status",
        role=READ,
    ),
    Route(
        "GET",
        "/api/v1/executions/{id}/events",
        get_execution_events,
        "The execution's events in order; with Accept: text/event-stream, SSE that follows until the terminal event",
        responses={200: ("application/json", EVENTS_SCHEMA)},
        errors=(400, 404, 500, 503),
        role=READ,
    ),
    Route(
        "POST",
        "/api/v1/executions/{id}/cancel",
        cancel_execution,
        "CancelExecution: pending ones never start, running ones are asked to stop (force: at once)",
        request=CancelExecutionRequest,
        responses={200: CancelExecutionResponse, 404: CancelExecutionResponse, 409: CancelExecutionResponse},
        errors=(400, 404, 409, 413, 500, 503),
        role=INVOKE,
    ),
    Route(
        "GET",
        "/api/v1/executions",
        list_executions,
        "ListExecutions in execution id (creation) order, newest first unless order=asc",
        responses={200: ListExecutionsResponse},
        query=(
            QueryParam("task_id", {"type": "string"}),
            QueryParam("function_name", {"type": "string"}),
            QueryParam("status", {"type": "string"}, "a status, full name or suffix (running, FAILED, …)"),
            QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
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


def create_app(service: Service, merged_metrics: tuple[str, ...] = ()) -> web.Application:
    """The aiohttp application: every route of ROUTES, contract errors, authentication, metrics
    (its own, and those of the processes at `merged_metrics`)."""
    app = web.Application(
        client_max_size=service.settings.api.max_request_bytes, middlewares=[_contract_errors, _authenticated]
    )
    app[SERVICE] = service
    app[TOKENS] = load_tokens(service.settings.api)
    app[OPENAPI] = msgspec.json.encode(build_document(ROUTES))
    app[STOPPING] = asyncio.Event()
    app[MERGED_METRICS] = merged_metrics
    api = service.settings.api
    app[GUARD] = ConnectionGuard(api.header_timeout_ms / 1000, api.max_connections)
    app.on_shutdown.append(_stop_streams)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler, name=route.operation_id)
    return app


@web.middleware
async def _contract_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error, ours or aiohttp's, as the contract's JSON body with its HTTP status; each
    request a SERVER span under the caller's `traceparent`, and counted."""
    began = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    attributes = {"http.request.method": request.method, "http.route": route, "url.path": request.path}
    with tracing.span(
        f"{request.method} {route}", SpanKind.SERVER, tracing.extract(request.headers), attributes
    ) as span:
        code, response = await _handle(request, handler)
        if span.is_recording():
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                tracing.mark_error(span, code)
    record_request(request.match_info.route.name or "unmatched", "http", code, time.perf_counter() - began)
    next_request(request)
    return response


async def _handle(request: web.Request, handler: Handler) -> tuple[str, web.StreamResponse]:
    try:
        response = await handler(request)
        return ("" if response.status < 400 else str(response.status)), response
    except web.HTTPException as exc:
        code, message = _http_error(exc)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return code, _json(ErrorReply(False, code, message), exc.status, headers)
    except ConnectionError:  # the client went away (say, closed an event stream): not an error
        log.debug("http: client of %s %s disconnected", request.method, request.path)
        return "CLIENT_CLOSED", web.Response(status=499)
    except Exception as exc:
        error = api_error(exc)
        if error.code == ErrorCode.INTERNAL:
            log.exception("http: %s %s failed", request.method, request.path)
        headers = {**error_headers(error), **(exc.headers if isinstance(exc, AuthError) else {})}
        return error.code, _json(ErrorReply(False, error.code, error.message), error.http_status, headers)


ROLES = {route.operation_id: route.role for route in ROUTES}


@web.middleware
async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The role the matched route names (unmatched routes get their 404/405 without a check)."""
    name = request.match_info.route.name
    if name in ROLES:
        authorize(request, ROLES[name])
    response: web.StreamResponse = await handler(request)
    return response


def _http_error(exc: web.HTTPException) -> tuple[ErrorCode, str]:
    if exc.status == 413:
        return ErrorCode.PAYLOAD_TOO_LARGE, "request body over the configured limit"
    if exc.status == 404:
        return ErrorCode.NOT_FOUND, "no such route"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = exc.headers.get("Allow", "")
        return ErrorCode.INVALID_ARGUMENT, f"method {exc.method} not allowed here; allowed: {allowed}"
    return ErrorCode.INVALID_ARGUMENT, exc.reason
