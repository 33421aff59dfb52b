"""Request-reply whose reply comes back as bytes (payload and header block), for reads on the
hottest path (a status query's direct get of the execution's state).

`spear.jetstream.requests` answers with nats-py's `Msg`: its header block parsed into a dict, the
message queued and the reply subscription's task woken to resolve the future (~10 µs of the
gateway's CPU a reply here). This takes its replies through a raw subscription
(`spear.jetstream.rawsub`): the future is resolved from inside the connection's read loop with the
bytes as received, and the caller reads only the headers it needs. Same shape otherwise: one
wildcard reply subscription per connection, a future per request found by its reply subject, a
timer handle for the timeout, nats-py's `TimeoutError` when it fires (a 503 "no responders"
status is for the caller to read: it has the header block). `request_now` is the same without a
coroutine: the reply, or the error, goes to a callback (an ASYNC call accepted without a task).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple

import nats.errors
from nats.aio.client import Client

from spear.jetstream import hpub
from spear.jetstream.rawsub import RawSubscription, subscribe_raw


class RawReply(NamedTuple):
    """A reply as received: its payload and its header block (b"" without headers)."""

    data: bytes
    headers: bytes


OnReply = Callable[["RawReply | Exception"], None]  # the reply, or why there is none


class _Callback:
    """A request answered to a callback: the callback and its timeout's timer."""

    __slots__ = ("on_reply", "timer")

    def __init__(self, on_reply: OnReply, timer: asyncio.TimerHandle | None = None) -> None:
        self.on_reply = on_reply
        self.timer = timer


class _Replies:
    """The pending raw requests of one connection, answered on `<inbox>.<n>`."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()  # under the connection's inbox prefix: only the server writes there
        self.pending: dict[bytes, asyncio.Future[RawReply] | _Callback] = {}
        self.count = 0
        self.sub: RawSubscription | None = None
        self.subscribing = asyncio.Lock()
        # the connection's loop (a client serves one): asking for it each time costs a getpid()
        # system call on Python 3.11, ~0.6 µs
        self.loop = asyncio.get_running_loop()

    async def subscribe(self) -> None:
        """Make the reply subscription, once."""
        if self.sub is None:
            async with self.subscribing:
                if self.sub is None:
                    self.sub = await subscribe_raw(self.nc, f"{self.prefix}.*", self._on_reply)

    async def request(self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None) -> RawReply:
        await self.subscribe()
        self.count += 1
        reply = f"{self.prefix}.{self.count}"
        key = reply.encode()
        future: asyncio.Future[RawReply] = self.loop.create_future()
        self.pending[key] = future
        timer = self.loop.call_later(timeout, _expire, future)
        try:
            await self.nc.publish(subject, data, reply=reply, headers=headers)
            return await future
        finally:
            timer.cancel()
            self.pending.pop(key, None)

    def request_now(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None, on_reply: OnReply
    ) -> bool:
        """`request` to a callback; False (nothing sent) before the reply subscription exists or
        where `hpub` cannot publish without awaiting. nats-py's errors when publishing raise."""
        if self.sub is None:
            return False
        self.count += 1
        reply = f"{self.prefix}.{self.count}"
        key = reply.encode()
        waiter = _Callback(on_reply)
        self.pending[key] = waiter
        try:
            sent = hpub.publish_now(self.nc, subject, data, reply, headers)
        except BaseException:
            self.pending.pop(key, None)
            raise
        if not sent:
            self.pending.pop(key, None)
            return False
        waiter.timer = self.loop.call_later(timeout, self._expire, key)
        return True

    def _expire(self, key: bytes) -> None:
        waiter = self.pending.pop(key, None)
        if isinstance(waiter, _Callback):
            waiter.on_reply(nats.errors.TimeoutError())

    def _on_reply(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        waiter = self.pending.pop(subject, None)
        if isinstance(waiter, _Callback):
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.on_reply(RawReply(data, headers))
        elif waiter is not None and not waiter.done():  # else answered after its caller gave up
            waiter.set_result(RawReply(data, headers))


def _expire(future: asyncio.Future[RawReply]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


_ATTRIBUTE = "_spear_raw_replies"  # a connection's _Replies, kept on it (a WeakKeyDictionary
# lookup makes a weak reference each time: ~2% of a status query)


def _replies(nc: Client) -> _Replies:
    replies: _Replies | None = getattr(nc, _ATTRIBUTE, None)
    if replies is None:
        replies = _Replies(nc)
        setattr(nc, _ATTRIBUTE, replies)
    return replies


async def request(
    nc: Client, subject: str, data: bytes = b"", timeout: float = 5.0, headers: dict[str, str] | None = None
) -> RawReply:
    """Publish `data` (with `headers`) on `subject` and return the reply as bytes."""
    return await _replies(nc).request(subject, data, timeout, headers)


async def prepare(nc: Client) -> None:
    """Make `nc`'s reply subscription now, so that its first `request_now` can send."""
    await _replies(nc).subscribe()


def request_now(
    nc: Client, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None, on_reply: OnReply
) -> bool:
    """Publish `data` on `subject` now, without awaiting; `on_reply` gets the reply as bytes, or
    nats-py's `TimeoutError`, from the read loop. False (nothing sent): use `request` (the reply
    subscription is made by the first `request` of the connection)."""
    replies: _Replies | None = getattr(nc, _ATTRIBUTE, None)
    return replies is not None and replies.request_now(subject, data, timeout, headers, on_reply)


def ready(nc: Client) -> bool:
    """Whether `request_now` can send on `nc` (its reply subscription is made)."""
    replies: _Replies | None = getattr(nc, _ATTRIBUTE, None)
    return replies is not None and replies.sub is not None


def no_responders(reply: RawReply) -> bool:
    """Whether `reply` is the server's 503 status: nothing listens on the subject (for JetStream:
    no such stream, or JetStream down), what nats-py raises `NoRespondersError` for."""
    return not reply.data and reply.headers.startswith(b"NATS/1.0 503")


def pending(nc: Client) -> int:
    """How many raw requests of `nc` wait for their reply (for tests)."""
    replies: _Replies | None = getattr(nc, _ATTRIBUTE, None)
    return len(replies.pending) if replies else 0
