"""From an HTTP request to an operation and back: every route builds the JSON request its
operation decodes (`spear.api.table`) from its path, query and body, and answers with the reply's
JSON under the HTTP status its error code (if any) stands for."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from spear.api.http.keys import SERVICE
from spear.api.table import Operation
from spear.core import contract
from spear.core.enums import ApiError, ErrorCode

Rep = TypeVar("Rep", bound=msgspec.Struct)


def json_response(reply: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """`reply` as a JSON response."""
    return web.Response(
        body=msgspec.json.encode(reply), status=status, content_type="application/json", headers=headers
    )


def reply_response(reply: msgspec.Struct, ok_status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """An operation's reply, under the HTTP status of the error it stands for, if any (then
    without `headers`: they are for the successful reply)."""
    error = contract.reply_error(reply)
    response = json_response(reply, error.http_status if error else ok_status, None if error else headers)
    if error is not None:
        response[ERROR_CODE] = error.code  # the metrics' `code`, as the NATS gateway counts it
    return response


ERROR_CODE = web.ResponseKey("spear_error_code", str)  # a response's contract error code (its own data)
CLIENT_CLOSED = "CLIENT_CLOSED"  # the metrics' `code` of a request whose client went away (no reply)


def client_closed() -> web.Response:
    """499 (nginx's "client closed request"): the caller left before its answer; nobody reads it."""
    response = web.Response(status=499)
    response[ERROR_CODE] = CLIENT_CLOSED  # (probe67: counted as code="499")
    return response


async def run(request: web.Request, operation: Operation[Any, Rep], fields: dict[str, object] | bytes) -> Rep:
    """Run `operation` with the JSON request `fields` (bytes as they are, a dict encoded)."""
    body = fields if isinstance(fields, bytes) else msgspec.json.encode(fields)
    return await operation.run(request.app[SERVICE], body)


async def answer(
    request: web.Request, operation: Operation[Any, Any], fields: dict[str, object] | bytes
) -> web.Response:
    """Run `operation` with the JSON request `fields`, and answer with its reply."""
    return reply_response(await run(request, operation, fields))


async def json_body(request: web.Request) -> bytes:
    """The request body, which must be JSON (or untyped) and arrive within [api] body_timeout_ms."""
    if request.content_type not in ("application/json", "application/octet-stream") and request.headers.get(
        "Content-Type"
    ):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"Content-Type must be application/json, not {request.content_type}")
    api = request.app[SERVICE].settings.api
    if request.content_length is not None and request.content_length > api.max_request_bytes:
        # said at once, not after waiting for a body that may never come (probe19: 10 s, then 400)
        raise ApiError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the request body is {request.content_length} bytes, more than the limit of {api.max_request_bytes}",
        )
    limit_s = api.body_timeout_ms / 1000
    try:
        async with asyncio.timeout(limit_s):
            return await request.read()
    except TimeoutError:  # aiohttp then drains what is left for at most its lingering time, and closes
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"the request body did not arrive within {limit_s:g} s") from None


def query_fields(
    request: web.Request, spec: dict[str, type], rename: dict[str, str] | None = None
) -> dict[str, object]:
    """Query parameters as the fields of the JSON request (the operation's decoder validates them)."""
    values: dict[str, object] = {}
    for name, kind in spec.items():
        text = request.query.get(name)
        if not text:  # `?limit=`: not given (a URL template filled with what is set)
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


def with_id(request: web.Request, key: str, fields: dict[str, object] | bytes) -> bytes:
    """The JSON request with the id from the path; a body that names another is refused
    (INVALID_ARGUMENT: which one was meant cannot be told; probe26 saw it cancel the path's)."""
    if isinstance(fields, bytes):
        fields = contract.decode_json_object(fields, request.app[SERVICE].settings.api.max_request_bytes)
    path_id = request.match_info["id"]
    if fields.get(key, path_id) not in (path_id, ""):
        named = str(fields[key])[:200]
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{key}: the body names {named!r}, the path {path_id!r}")
    return msgspec.json.encode({**fields, key: path_id})
