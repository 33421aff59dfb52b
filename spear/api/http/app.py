"""The HTTP adapter's application: every route of the route table, and the middlewares that
give each request its span, its count, its authorization and the contract's error bodies."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry.trace import SpanKind

from spear.api.auth import TOKENS, AuthError, authorize, load_tokens, refuse_cross_site
from spear.api.connections import GUARD, ConnectionGuard, next_request
from spear.api.errors import api_error, error_headers
from spear.api.http.exchange import ERROR_CODE, client_closed, json_response
from spear.api.http.keys import MERGED_METRICS, OPENAPI, SERVICE, STOPPING
from spear.api.http.routes import ROLES, ROUTES
from spear.api.http.sse import stop_streams
from spear.api.openapi import build_document
from spear.core.contract import ErrorReply
from spear.core.enums import HTTP_STATUS, ErrorCode
from spear.service.operations import Service
from spear.telemetry import tracing
from spear.telemetry.metrics import record_request

log = logging.getLogger(__name__)


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
    app[GUARD] = ConnectionGuard(api.header_timeout_ms / 1000, api.max_connections, api.write_timeout_ms / 1000)
    app.on_shutdown.append(stop_streams)
    for route in ROUTES:
        if route.method == "GET":  # HEAD too, as HTTP asks of every GET (uptime checks use it)
            app.router.add_get(route.path, route.handler, name=route.operation_id)
        else:
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
        return ("" if response.status < 400 else response.get(ERROR_CODE) or _status_code(response.status)), response
    except web.HTTPException as exc:
        code, message = _http_error(exc)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return code, json_response(ErrorReply(False, code, message), exc.status, headers)
    except ConnectionError:  # the client went away (say, closed an event stream): not an error
        log.debug("http: client of %s %s disconnected", request.method, request.path)
        response = client_closed()
        return response[ERROR_CODE], response
    except Exception as exc:
        error = api_error(exc)
        if error.code == ErrorCode.INTERNAL:
            log.exception("http: %s %s failed", request.method, request.path)
        headers = {**error_headers(error), **(exc.headers if isinstance(exc, AuthError) else {})}
        return error.code, json_response(ErrorReply(False, error.code, error.message), error.http_status, headers)


@web.middleware
async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The role the matched route names (unmatched routes get their 404/405 without a check)."""
    refuse_cross_site(request, request.app[SERVICE].settings.api, request.app[TOKENS].enabled)
    name = request.match_info.route.name
    if name in ROLES:
        authorize(request, ROLES[name])
    response: web.StreamResponse = await handler(request)
    return response


def _status_code(status: int) -> str:
    """The contract's code for an error status a handler set no ERROR_CODE on: a safety net, so that
    `spear_requests_total`'s `code` is always OK or an error code, never a bare number (probe67)."""
    for code, code_status in HTTP_STATUS.items():  # (409: ALREADY_EXISTS, the first that has it)
        if code_status == status:
            return code
    return ErrorCode.INTERNAL if status >= 500 else ErrorCode.INVALID_ARGUMENT


def _http_error(exc: web.HTTPException) -> tuple[ErrorCode, str]:
    if exc.status == 413:
        return ErrorCode.PAYLOAD_TOO_LARGE, "request body over the configured limit"
    if exc.status == 404:
        return ErrorCode.NOT_FOUND, "no such route"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = exc.headers.get("Allow", "")
        return ErrorCode.INVALID_ARGUMENT, f"method {exc.method} not allowed here; allowed: {allowed}"
    return ErrorCode.INVALID_ARGUMENT, exc.reason
