"""The NATS adapter: a NATS micro service `spear` whose endpoints `P.api.<operation>` call the
service layer. Queue-grouped, so any number of gateway replicas share the load.

Each request runs in its own task: nats-py delivers a subscription's messages one at a time, and
a SYNC invocation waits for its execution, which must not hold up the requests behind it. An
ASYNC invocation that needs no wait before its append is accepted without one (quickaccept.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service as MicroService

from spear import __version__
from spear.api.errors import api_error, error_headers
from spear.api.microstats import count_request, endpoints_by_name, record_outcome, subscription
from spear.api.quickaccept import QuickAccepts
from spear.api.table import INVOKE, OPERATIONS, Operation
from spear.core import contract
from spear.core.contract import ErrorReply
from spear.core.enums import ApiError, ErrorCode
from spear.core.names import Names
from spear.core.versions import semantic
from spear.jetstream import rawsub, replies
from spear.service.callerwait import read_caller_headers
from spear.service.operations import Service
from spear.telemetry import tracing
from spear.telemetry.metrics import record_request

log = logging.getLogger(__name__)


class Gateway:
    """The NATS micro service: one endpoint per operation of `spear.api.table`."""

    loop: asyncio.AbstractEventLoop  # set by start()

    def __init__(self, nc: Client, service: Service):
        self.nc = nc
        self.service = service
        self.names: Names = service.names
        self.micro: MicroService | None = None
        self.endpoints: dict[str, Any] = {}  # nats.micro's endpoint objects, whose $SRV.STATS we keep true
        self.in_flight: set[asyncio.Task[None]] = set()
        self.taken: list[Subscription] = []  # endpoint subscriptions whose requests come raw
        self.quick = QuickAccepts(nc, service, self.answer)

    async def start(self) -> None:
        """Add the service and its endpoints; they serve once this returns."""
        self.loop = asyncio.get_running_loop()  # kept: asking for it costs a getpid() on 3.11
        replies.protect(self.names.prefix)  # answers never go where they would be stored
        self.micro = await add_service(
            self.nc,
            name=self.names.service_name,
            version=semantic(__version__),
            description="spear function invocation",
            queue_group=self.names.service_name,
        )
        for operation in OPERATIONS:
            await self.micro.add_endpoint(
                name=operation.name, subject=self.names.api(operation.name), handler=self._endpoint(operation)
            )
        self.endpoints = endpoints_by_name(self.micro)
        for operation in OPERATIONS:
            self._take_requests(operation)
        await self.nc.flush()  # the server has our subscriptions: requests from now on are served

    async def stop_taking(self) -> None:
        """Take no more requests (those in flight go on)."""
        for sub in self.taken:
            rawsub.release(self.nc, sub)
        self.taken = []
        if self.micro:
            micro, self.micro = self.micro, None
            await micro.stop()

    async def stop(self) -> None:
        """Stop taking requests and give those in flight time to be answered: SYNC callers the
        service's stop grace (`end_waits`), the rest 5 s."""
        await self.stop_taking()
        began = time.monotonic()
        if self.in_flight:  # (SYNC callers still waiting are answered before that: `end_waits`)
            grace_s = self.service.stop_grace_s + 0.5
            await asyncio.gather(self.service.end_waits(), asyncio.wait(self.in_flight, timeout=grace_s))
        await self.quick.waiting.settle(5 - (time.monotonic() - began))

    def _take_requests(self, operation: Operation[Any, Any]) -> None:
        """Take the endpoint's requests from its subscription as bytes (`rawsub`), before
        nats.micro turns each into a `Msg`, queues it and wakes a task to call the handler
        (~8% of a status query's CPU); $SRV.STATS still counts them (`microstats`). If nats-py
        does not allow it, nats.micro's handler (`_endpoint`) serves them."""
        endpoint = self.endpoints.get(operation.name)
        sub = subscription(endpoint)
        if sub is None:
            return

        quick = self.quick.take if operation is INVOKE else None

        def on_request(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
            count_request(endpoint)
            if quick is not None and not headers and quick(subject, reply, data):
                return  # an ASYNC call accepted without a task (quickaccept.py)
            self._start(self._serve_raw(operation, subject, reply, data, headers))

        if rawsub.take_over(self.nc, sub, on_request):
            self.taken.append(sub)

    def _endpoint(self, operation: Operation[Any, Any]) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            self._start(self._serve(operation, request.subject, request.data, request.headers, request.respond))

        return handle

    def _start(self, serving: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(serving)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _serve_raw(
        self, operation: Operation[Any, Any], subject: bytes, reply: bytes, data: bytes, block: bytes
    ) -> None:
        async def respond(body: bytes, headers: dict[str, str] | None) -> None:
            if not reply:
                raise ValueError("no reply subject set")  # as nats.micro's respond says it
            subject = reply.decode(errors="replace")
            if replies.answerable(subject):  # (not on a subject that would store the answer)
                await self.nc.publish(subject, body, headers=headers)

        # (spear's parser hands on subjects as UTF-8; "replace" keeps junk from another parser
        # from ending this request's task before it is logged and answered as junk)
        headers = await rawsub.parsed_headers(self.nc, block)
        await self._serve(operation, subject.decode(errors="replace"), data, headers, respond)

    async def _serve(
        self,
        operation: Operation[Any, Any],
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
        respond: Callable[[bytes, dict[str, str] | None], Awaitable[None]],
    ) -> None:
        began = time.perf_counter()
        attributes = _span_attributes(subject) if tracing.may_record() else _NO_ATTRIBUTES
        # The caller's traceparent (a NATS header) is the parent: the service's appends follow it.
        with tracing.consumer(subject, headers, attributes) as span:
            outcome: Any
            try:
                if headers:
                    read_caller_headers(headers)  # this request's task only
                outcome = await operation.run(self.service, data)
            except Exception as exc:
                outcome = exc
            body, reply_headers, error = self.answer(operation, subject, began, outcome)
            if error is not None:
                tracing.mark_error(span, error.code)
        try:
            await respond(body, reply_headers)
        except Exception as exc:  # the requester is gone or the connection closed
            log.debug("gateway: reply to %s not sent: %s", subject, exc)

    def answer(
        self, operation: Operation[Any, Any], subject: str, began: float, outcome: Any
    ) -> tuple[bytes, dict[str, str] | None, ApiError | None]:
        """The reply to a request the operation answered with `outcome` (its reply, or what it
        raised): body, headers and error, counted in the metrics as taking since `began`."""
        error: ApiError | None = None
        if not isinstance(outcome, Exception):
            try:
                body, error = contract.encode(outcome), contract.reply_error(outcome)
            except Exception as exc:  # a reply that cannot be encoded is answered as what it is: INTERNAL
                outcome = exc
        if isinstance(outcome, Exception):
            error = api_error(outcome)
            if error.code == ErrorCode.INTERNAL:
                log.error("gateway: %s failed", subject, exc_info=outcome)
            body = contract.encode(ErrorReply(False, error.code, error.message))
        elapsed = time.perf_counter() - began
        record_request(operation.name, "nats", error.code if error else "", elapsed)
        record_outcome(self.endpoints.get(operation.name), elapsed, f"{error.code}: {error.message}" if error else None)
        if error is None:
            return body, None, None
        reply_headers = {
            ERROR_HEADER: _header_safe(error.message),
            ERROR_CODE_HEADER: str(error.http_status),
            **error_headers(error),
        }
        return body, reply_headers, error


_NO_ATTRIBUTES: dict[str, str] = {}


def _span_attributes(subject: str) -> dict[str, str]:
    return {"messaging.destination.name": subject, "messaging.operation.type": "process"}


def _header_safe(text: str) -> str:
    """Header values are one line of limited length."""
    return " ".join(text.split())[:512]
