"""Request-reply for the hot paths (appends, direct gets), with about half the CPU of nats-py's
`Client.request`: one wildcard reply subscription per connection, a future per request found by
its reply subject, and a timer handle instead of `asyncio.wait_for` (which wraps every request in
more machinery than the answer costs). Errors are nats-py's own: `TimeoutError`,
`NoRespondersError` (a 503 status: nothing listens, e.g. JetStream is down),
`ConnectionClosedError`, so callers' handling (`errors.UNREACHABLE`) is unchanged.
"""

from __future__ import annotations

import asyncio
import weakref

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class _Replies:
    """The pending requests of one connection, answered on `<inbox>.<n>`."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()  # under the connection's inbox prefix: only the server writes there
        self.pending: dict[str, asyncio.Future[Msg]] = {}
        self.count = 0
        self.sub: Subscription | None = None
        self.subscribing: asyncio.Lock = asyncio.Lock()

    async def request(self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None) -> Msg:
        if self.sub is None:
            async with self.subscribing:
                if self.sub is None:
                    self.sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_reply)
        self.count += 1
        reply = f"{self.prefix}.{self.count}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self.pending[reply] = future
        timer = loop.call_later(timeout, _expire, future)
        try:
            await self.nc.publish(subject, data, reply=reply, headers=headers)
            return await future
        finally:
            timer.cancel()
            self.pending.pop(reply, None)

    async def _on_reply(self, msg: Msg) -> None:
        future = self.pending.pop(msg.subject, None)
        if future is None or future.done():
            return  # answered after its caller gave up
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(nats.errors.NoRespondersError())
        else:
            future.set_result(msg)


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


_replies: weakref.WeakKeyDictionary[Client, _Replies] = weakref.WeakKeyDictionary()


async def request(
    nc: Client, subject: str, data: bytes = b"", timeout: float = 5.0, headers: dict[str, str] | None = None
) -> Msg:
    """Publish `data` on `subject` and return the reply, as `nc.request` does."""
    replies = _replies.get(nc)
    if replies is None:
        replies = _replies[nc] = _Replies(nc)
    return await replies.request(subject, data, timeout, headers)
