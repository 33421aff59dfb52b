"""The HTTP adapter (aiohttp): the same operations as the NATS gateway, called in-process on the
service layer, so an HTTP request costs no extra NATS hop.
"""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from spear import contract
from spear.contract import ApiError, ErrorReply
from spear.service import Service

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", Service)


def create_app(service: Service) -> web.Application:
    app = web.Application(
        client_max_size=service.settings.api.max_request_bytes + 1, middlewares=[_errors_as_contract]
    )
    app[SERVICE] = service
    app.router.add_routes(
        [
            web.post("/api/v1/invoke", invoke),
            web.get("/api/v1/execution/{id}/status", status),
            web.get("/api/v1/health", health),
        ]
    )
    return app


def _json(reply: msgspec.Struct | dict, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = contract.encode(reply) if isinstance(reply, msgspec.Struct) else msgspec.json.encode(reply)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _reply(reply: msgspec.Struct, ok_status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    error = contract.reply_error(reply)
    return _json(reply, error.http_status if error else ok_status, None if error else headers)


async def _body(request: web.Request) -> bytes:
    if request.content_length and request.content_length > request.app[SERVICE].settings.api.max_request_bytes:
        raise ApiError(contract.PAYLOAD_TOO_LARGE, "request body over the configured limit")
    return await request.read()


async def invoke(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    reply = await service.invoke(await _body(request), request.headers.get("traceparent"))
    if reply.success and reply.result and reply.result.status == contract.PENDING:
        return _reply(reply, 202, {"Location": reply.status_endpoint})
    return _reply(reply)


async def status(request: web.Request) -> web.Response:
    query = request.query
    body = msgspec.json.encode(
        {
            "execution_id": request.match_info["id"],
            "include_result": query.get("include_result", "true").lower() != "false",
            "include_logs": query.get("include_logs", "false").lower() == "true",
        }
    )
    return _reply(await request.app[SERVICE].status(body))


async def health(request: web.Request) -> web.Response:
    report = await request.app[SERVICE].health()
    return _json(report, 200 if report["status"] == "healthy" else 503)


@web.middleware
async def _errors_as_contract(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(ErrorReply(False, exc.code, exc.message), exc.http_status)
    except web.HTTPRequestEntityTooLarge:
        return _json(ErrorReply(False, contract.PAYLOAD_TOO_LARGE, "request body over the configured limit"), 413)
    except web.HTTPException as exc:
        code = {404: contract.NOT_FOUND, 405: contract.INVALID_ARGUMENT}.get(exc.status, contract.INVALID_ARGUMENT)
        return _json(ErrorReply(False, code, exc.reason), exc.status)
    except Exception as exc:
        log.exception("http: %s %s failed", request.method, request.path)
        return _json(ErrorReply(False, contract.INTERNAL, f"{type(exc).__name__}: {exc}"), 500)
