"""Raw subscriptions: a subscription's messages handed straight from nats-py's protocol parser to
a plain function, as bytes (subject, reply, payload, header block).

nats-py turns every message into a `Msg` (its header block parsed into a dict, subject and reply
decoded), queues it and wakes the subscription's task to call its callback: ~10 µs of CPU a
message on this machine, most of what a replay of the stream costs. A replay needs none of it (it
reads the stream sequence from the reply subject and no header), so `subscribe_raw` takes its own
subscription's messages out of the client's dispatch (`Client._process_msg`); every other
subscription goes the usual way. The handler runs inside the connection's read loop: it must not
block, and what it raises is logged here, never passed on (it would end nats-py's read loop: the
connection would read nothing more until its pings go unanswered, minutes later). Should nats-py no
longer have that method, the same handler is called from an ordinary callback (slower, same results).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

RawHandler = Callable[[bytes, bytes, bytes, bytes], None]  # subject, reply, payload, header block
_HOOKS = "_spear_raw_handlers"


class RawSubscription:
    """One raw subscription; `unsubscribe()` when done."""

    def __init__(self, nc: Client, sub: Subscription, hooks: dict[int, RawHandler] | None):
        self.nc = nc
        self.sub = sub
        self._hooks = hooks

    async def unsubscribe(self) -> None:
        """Stop receiving; the client's dispatch forgets the handler."""
        if self._hooks is not None:
            self._hooks.pop(self.sub._id, None)
        await self.sub.unsubscribe()


async def subscribe_raw(nc: Client, subject: str, handler: RawHandler) -> RawSubscription:
    """Subscribe to `subject`, each message handed to `handler` as it is parsed."""
    hooks = _hooks(nc)
    if hooks is None:

        async def fallback(msg: Msg) -> None:
            handler(msg.subject.encode(), (msg.reply or "").encode(), msg.data, _header_block(msg.headers))

        return RawSubscription(nc, await nc.subscribe(subject, cb=fallback), None)

    async def unused(msg: Msg) -> None:  # the hook takes every message before nats-py queues it
        return None

    sub = await nc.subscribe(subject, cb=unused)
    hooks[sub._id] = handler
    return RawSubscription(nc, sub, hooks)


def _hooks(nc: Client) -> dict[int, RawHandler] | None:
    hooks: dict[int, RawHandler] | None = getattr(nc, _HOOKS, None)
    if hooks is not None:
        return hooks
    original: Callable[..., Awaitable[None]] | None = getattr(nc, "_process_msg", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return None
    table: dict[int, RawHandler] = {}

    async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> None:
        handler = table.get(sid)
        if handler is None:
            await original(sid, subject, reply, data, headers)
        else:
            try:
                handler(subject, reply or b"", data, headers or b"")
            except Exception:
                log.exception("raw subscription %d: its handler failed on a message to %r", sid, subject[:200])

    nc._process_msg = process_msg  # type: ignore[method-assign]
    setattr(nc, _HOOKS, table)
    return table


def _header_block(headers: dict[str, str] | None) -> bytes:
    """A header block as the server sends it, from nats-py's parsed headers (the fallback)."""
    if not headers:
        return b""
    status = headers.get("Status")
    first = f"NATS/1.0 {status} {headers.get('Description', '')}".rstrip() if status else "NATS/1.0"
    lines = [f"{k}: {v}" for k, v in headers.items() if k not in ("Status", "Description")]
    return ("\r\n".join([first, *lines]) + "\r\n\r\n").encode()


def take_over(nc: Client, sub: Subscription, handler: RawHandler) -> bool:
    """Hand the messages of `sub`, a subscription made elsewhere (nats.micro's, say), to `handler`
    as `subscribe_raw` does, from now on; False (and nothing changed: they keep going to its
    callback) if nats-py no longer allows it. `release` undoes it."""
    hooks = _hooks(nc)
    if hooks is None:
        return False
    hooks[sub._id] = handler
    return True


def release(nc: Client, sub: Subscription) -> None:
    """`sub`'s messages go to its callback again."""
    hooks: dict[int, RawHandler] | None = getattr(nc, _HOOKS, None)
    if hooks is not None:
        hooks.pop(sub._id, None)


async def parsed_headers(nc: Client, block: bytes) -> dict[str, str] | None:
    """A header block parsed as nats-py parses a received message's (its own method): what
    `Msg.headers` would hold."""
    return await nc._process_headers(block) if block else None
