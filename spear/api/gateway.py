"""The NATS adapter: a NATS micro service `spear` whose endpoints `P.api.<operation>` call the
service layer. Queue-grouped, so any number of gateway replicas share the load.

Each request runs in its own task: nats-py delivers a subscription's messages one at a time, and
a SYNC invocation waits for its execution, which must not hold up the requests behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request

from spear import __version__, telemetry
from spear.core import contract
from spear.core.contract import ApiError, ErrorReply
from spear.core.names import Names
from spear.service.operations import Service

log = logging.getLogger(__name__)

Operation = Callable[[bytes, dict[str, str]], Awaitable[msgspec.Struct]]


class Gateway:
    def __init__(self, nc: Client, service: Service):
        self.nc = nc
        self.service = service
        self.names: Names = service.names
        self.micro = None
        self.in_flight: set[asyncio.Task] = set()

    def operations(self) -> dict[str, Operation]:
        service = self.service
        return {
            "invoke_function": lambda body, headers: service.invoke(body, headers.get("traceparent")),
            "stream_function": lambda body, headers: service.invoke(body, headers.get("traceparent"), contract.STREAM),
            "get_execution_status": lambda body, headers: service.status(body),
            "cancel_execution": lambda body, headers: service.cancel(body),
            "list_executions": lambda body, headers: service.list_executions(body or b"{}"),
            "get_task": lambda body, headers: service.get_task(body),
            "list_tasks": lambda body, headers: service.list_tasks(body or b"{}"),
            "get_health": lambda body, headers: service.health(body),
            "get_stats": lambda body, headers: service.stats(body),
            "list_workers": lambda body, headers: service.list_workers(body or b"{}"),
        }

    async def start(self) -> None:
        self.micro = await add_service(
            self.nc,
            name=self.names.service_name,
            version=__version__,
            description="spear function invocation",
            queue_group=self.names.service_name,
        )
        for name, operation in self.operations().items():
            await self.micro.add_endpoint(
                name=name, subject=self.names.api(name), handler=self._endpoint(name, operation)
            )
        await self.nc.flush()  # the server has our subscriptions: requests from now on are served

    async def stop(self) -> None:
        if self.micro:
            await self.micro.stop()
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=5)

    def _endpoint(self, name: str, operation: Operation):
        async def handle(request: Request) -> None:
            task = asyncio.get_running_loop().create_task(self._serve(request, name, operation))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

        return handle

    async def _serve(self, request: Request, name: str, operation: Operation) -> None:
        began = time.perf_counter()
        try:
            reply = await operation(request.data, request.headers or {})
            body, error = contract.encode(reply), contract.reply_error(reply)
        except ApiError as exc:
            body, error = contract.encode(ErrorReply(False, exc.code, exc.message)), exc
        except Exception as exc:
            log.exception("gateway: %s failed", request.subject)
            error = ApiError(contract.INTERNAL, f"{type(exc).__name__}: {exc}")
            body = contract.encode(ErrorReply(False, error.code, error.message))
        telemetry.record_request(name, "nats", error.code if error else "", time.perf_counter() - began)
        headers = None
        if error is not None:
            headers = {ERROR_HEADER: _header_safe(error.message), ERROR_CODE_HEADER: str(error.http_status)}
        try:
            await request.respond(body, headers=headers)
        except Exception as exc:  # the requester is gone or the connection closed
            log.debug("gateway: reply to %s not sent: %s", request.subject, exc)


def _header_safe(text: str) -> str:
    """Header values are one line of limited length."""
    return " ".join(text.split())[:512]
