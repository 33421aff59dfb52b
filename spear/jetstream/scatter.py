"""Scatter-gather over core NATS: one request, every reply that comes within a window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import nats.errors
from nats.aio.client import Client

from spear.aio import quietly


async def replies(nc: Client, subject: str, window_s: float, quiet_s: float) -> AsyncGenerator[bytes, None]:
    """Each reply to one request on `subject` as it comes: all that arrive within `window_s`,
    ending early once no further reply comes for `quiet_s` (or at once when nothing listens).
    Leaving the iteration early (`aclosing`) ends the subscription."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window_s
    try:
        await nc.publish(subject, b"", reply=inbox)
        wait = window_s
        while wait > 0:
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            if msg.headers and msg.headers.get("Status") == "503":
                break  # no responders
            yield msg.data
            wait = min(quiet_s, deadline - loop.time())
    finally:
        await quietly(sub.unsubscribe())
