"""Bounds on the HTTP server's connections: how many may be open at once, how long a client
may take to send a request's headers (a slowloris client that drips them would otherwise hold its
connection, and with enough of them every connection, for as long as it likes), and how long it
may leave what it is sent unread.

aiohttp has none of these bounds, so `GuardedRunner` adds them to the `web.Server` it makes: a
connection beyond `[api] max_connections` gets `503` with `Retry-After` and is closed at once; a
connection whose next request's headers are not complete `[api] header_timeout_ms` after it opened
(or after its previous response) is closed; so is one whose client has taken none of what it is
sent for `[api] write_timeout_ms` while the server waits to send more (probe32: an SSE client that
never reads held its connection, its follower and a page of history for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from spear.api.badrequests import answer_in_json

log = logging.getLogger(__name__)

T = TypeVar("T")

REFUSED_LINGER_S = 1.0
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: 98\r\n\r\n"
    b'{"success":false,"error_code":"UNAVAILABLE","message":"too many open connections; try again later"}'
)


class ConnectionGuard:
    """Per-connection header deadlines, write stalls and the connection count, for one server."""

    def __init__(self, header_timeout_s: float, max_connections: int, write_timeout_s: float = 30.0):
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.write_timeout_s = write_timeout_s
        self.admitted: set[RequestHandler] = set()
        self._lost: dict[RequestHandler, asyncio.Future[None]] = {}  # what until_client_leaves awaits
        self._deadlines: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        # Connections seen waiting to send: (since when, the wait then seen, the bytes then unsent)
        self._stalled: dict[RequestHandler, tuple[float, object, int]] = {}
        self._sweep: asyncio.TimerHandle | None = None

    def install(self, server: web.Server) -> None:
        """Wrap the server's connection hooks and request factory (aiohttp calls them per
        connection and per request whose headers are complete)."""
        made, lost, factory = server.connection_made, server.connection_lost, server.request_factory

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            if len(self.admitted) >= self.max_connections:
                log.debug("http: connection refused: %d open", len(self.admitted))
                # Nothing of the request is read (aiohttp never sees it); the answer is followed by
                # a FIN, and the socket is closed a moment later: closing it at once with the
                # request unread would reset the connection before the client read the answer.
                transport.pause_reading()
                transport.write(REFUSED)
                if transport.can_write_eof():
                    transport.write_eof()
                asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
                return
            self.admitted.add(handler)
            answer_in_json(handler)
            made(handler, transport)
            self.arm(transport)
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep_writes)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            if handler.transport is not None:
                self.disarm(handler.transport)
            self._stalled.pop(handler, None)
            lost_future = self._lost.pop(handler, None)
            if lost_future is not None and not lost_future.done():
                lost_future.set_result(None)
            if handler in self.admitted:
                self.admitted.discard(handler)
                lost(handler, exc)

        def request_factory(*args: Any) -> web.BaseRequest:
            transport = args[2].transport  # (message, payload, protocol, writer, task)
            if transport is not None:
                self.disarm(transport)  # the headers are in
            return factory(*args)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        server.request_factory = request_factory

    def lost(self, handler: RequestHandler) -> asyncio.Future[None]:
        """Resolved when the connection `handler` serves is lost (the client went away)."""
        future = self._lost.get(handler)
        if future is None:
            future = self._lost[handler] = asyncio.get_running_loop().create_future()
        return future

    def arm(self, transport: asyncio.BaseTransport) -> None:
        """Start (or restart) the wait for the next request's headers."""
        self.disarm(transport)
        if not transport.is_closing():
            loop = asyncio.get_running_loop()
            self._deadlines[transport] = loop.call_later(self.header_timeout_s, self._expire, transport)

    def disarm(self, transport: asyncio.BaseTransport) -> None:
        """Stop waiting for headers on `transport` (a request arrived, or it closed)."""
        handle = self._deadlines.pop(transport, None)
        if handle is not None:
            handle.cancel()

    @property
    def _sweep_s(self) -> float:
        return min(1.0, self.write_timeout_s / 4)

    def _sweep_writes(self) -> None:
        """Close connections whose client took nothing of what they were sent for write_timeout_s.

        Sampled once a second (no cost per write): a connection counts as stalled while one
        write waits for its buffer to drain. aiohttp waits on a new future each time (its
        protocol's `_drain_waiter`), so the same future seen again, with no fewer bytes unsent,
        means the client took nothing meanwhile; one that reads slowly starts its time again."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for handler in list(self.admitted):  # (an abort may end a connection at once)
            waiter = getattr(handler, "_drain_waiter", None) if handler.writing_paused else None
            if waiter is None or handler.transport is None:
                self._stalled.pop(handler, None)
                continue
            unsent = handler.transport.get_write_buffer_size()
            since, seen, before = self._stalled.get(handler, (now, waiter, unsent))
            if seen is not waiter or unsent < before:
                # a write went through since the last look, or some of a large one did (review31:
                # one 6 MB item, read steadily, kept one wait going and was cut)
                since = now
            self._stalled[handler] = (since, waiter, unsent)
            if now - since >= self.write_timeout_s:
                log.debug("http: closing a connection whose client took nothing for %.1f s", self.write_timeout_s)
                handler.transport.abort()
        if self.admitted:
            self._sweep = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep_writes)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        self._deadlines.pop(transport, None)
        log.debug("http: closing a connection that sent no complete request headers in %.1f s", self.header_timeout_s)
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        else:
            transport.close()


GUARD = web.AppKey("connection_guard", ConnectionGuard)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server keeps to the bounds of the app's ConnectionGuard."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        self.app[GUARD].install(server)
        return server


def next_request(request: web.Request) -> None:
    """A request was handled: the connection's next request gets its own header deadline."""
    guard = request.app.get(GUARD)
    if guard is not None and request.transport is not None and request.keep_alive:
        guard.arm(request.transport)


async def until_client_leaves(request: web.Request, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None (and `work` cancelled) if the client's connection is lost first."""
    guard = request.app.get(GUARD)
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    if guard is None or request.protocol.transport is None:
        return await task
    lost: asyncio.Future[Any] = guard.lost(request.protocol)
    try:
        await asyncio.wait([task, lost], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    log.debug("http: %s %s: the client went away; its wait ended", request.method, request.path)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
