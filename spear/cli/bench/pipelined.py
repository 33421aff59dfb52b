"""The ASYNC phase's client: WINDOW requests in flight, each next one sent from the callback that
receives a reply (no task or coroutine per call).

Why: the bench's client runs on the two cores it measures spear on, so each µs it spends is
taken from spear. Awaiting each call in a lane of coroutines cost ~5–10 µs of CPU more per call
than sending from callbacks, as a lean production client would (docs/performance.md, fourteenth
round; the rest of the client's ~33 µs is receiving a reply and a terminal event per call). A
request that cannot be sent without awaiting (nats-py's buffer is full, the reply subscription
is not made yet) is sent by a task instead, and its reply handled the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as Nats

from spear.cli.bench.measure import check_accepted, raw_backpressure_s
from spear.cli.bench.plan import WINDOW
from spear.jetstream import rawrequests

TIMEOUT_S = 10.0


class PipelinedCalls:
    """Up to `count` calls of `subject` with `body`, WINDOW in flight, for at most `limit_s`;
    `on_accepted` gets each accepted call's execution id. A call refused for capacity is sent
    again after its Retry-After, as a client would, while the time allows (then it is given up
    and not counted); any other error ends the run."""

    def __init__(
        self, nc: Nats, subject: str, body: bytes, count: int, limit_s: float, on_accepted: Callable[[str], None]
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.body = body
        self.count = count
        self.limit_s = limit_s
        self.on_accepted = on_accepted
        self.made = 0
        self.given_up = 0  # refused for capacity until the time was up: not counted in `made`
        self.in_flight = 0
        self._end = 0.0
        self._loop = asyncio.get_running_loop()
        self._finished: asyncio.Future[None] = self._loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        """Make the calls; calls per second (those made over the time they took)."""
        await rawrequests.prepare(self.nc)
        began = time.perf_counter()
        self._end = began + self.limit_s
        for _ in range(WINDOW):
            self._next()
        if self.in_flight == 0:
            self._finish()
        await self._finished
        return round(self.made / (time.perf_counter() - began))

    def _next(self) -> None:
        """Send one more call, if the count and the time allow."""
        if self.made < self.count and time.perf_counter() < self._end:
            self.made += 1
            self.in_flight += 1
            self._send()

    def _send(self) -> None:
        if self._finished.done():
            return
        try:
            sent = rawrequests.request_now(self.nc, self.subject, self.body, TIMEOUT_S, None, self._answered)
        except Exception as exc:
            self._fail(exc)
            return
        if not sent:
            task = self._loop.create_task(self._send_awaiting())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_awaiting(self) -> None:
        try:
            reply: rawrequests.RawReply | Exception = await rawrequests.request(
                self.nc, self.subject, self.body, TIMEOUT_S
            )
        except Exception as exc:
            reply = exc
        self._answered(reply)

    def _answered(self, reply: rawrequests.RawReply | Exception) -> None:
        if self._finished.done():
            return
        if isinstance(reply, Exception):
            self._fail(reply)
            return
        wait_s = raw_backpressure_s(reply.headers)
        if wait_s is not None:  # the queue is full: back off, as a client would, while time is left
            if time.perf_counter() + wait_s < self._end:
                self._loop.call_later(wait_s, self._send)
                return
            self.made -= 1  # (given up: not a call made, nor accepted)
            self.given_up += 1
            self._end = min(self._end, time.perf_counter())  # and no new call: it would be refused too
            self._settled()
            return
        if rawrequests.no_responders(reply):
            self._fail(nats.errors.NoRespondersError())
            return
        try:
            self.on_accepted(check_accepted(reply.data))
        except Exception as exc:
            self._fail(exc)
            return
        self._settled()

    def _settled(self) -> None:
        """A call is over: the next one goes, and the run ends with the last."""
        self.in_flight -= 1
        self._next()
        if self.in_flight == 0:
            self._finish()

    def _finish(self) -> None:
        if not self._finished.done():
            self._finished.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self._finished.done():
            self._finished.set_exception(exc)
