"""Following stored events live, one follower per subscriber: how the SDK's handles follow an
execution (the SSE routes share one reader per subject and process instead, the same way:
`spear.service.fanout`).

A core subscription on the re-published `P.exec.…` subjects only wakes the follower up; what it
yields is always read back from the stream (batched direct gets after the last sequence it
yielded). So the feed is in stream order, has no gap and no duplicate, and never passes on a
message that merely imitates a stored event (anyone allowed to publish on `P.exec.>` could).
Under load one read covers every event stored meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from spear.core.events import is_terminal
from spear.jetstream.store import Stored

StoredAfter = Callable[[int], Awaitable[list[Stored]]]


async def follow_stored(
    nc: Client,
    subject: str,
    stored_after: StoredAfter,
    after_seq: int,
    idle_s: float,
    until_terminal: bool,
    wanted: Callable[[Stored], bool] = lambda stored: True,
    wake: asyncio.Event | None = None,
) -> AsyncIterator[Stored | None]:
    """Events stored after `after_seq` (`stored_after(seq)` reads them), then each as it is stored
    on `subject`. Yields None after `idle_s` without an event (time for a keep-alive). With
    `until_terminal` it ends after the first terminal event. `wanted` filters what is yielded.
    When the first read finds nothing to yield, it yields None at once (the feed is open).
    `wake`: the event a message sets to have the follower read again, given by a caller that sets
    it too (the SDK's, when its client closes: the read then says so)."""
    wake = asyncio.Event() if wake is None else wake

    async def on_message(msg: Msg) -> None:
        wake.set()

    sub = await nc.subscribe(subject, cb=on_message)
    try:
        last = after_seq
        opened = False
        while True:
            wake.clear()  # before reading: a message stored during the read wakes the next one
            found = await stored_after(last)
            for stored in found:
                last = stored.seq
                if wanted(stored):
                    opened = True
                    yield stored
                if until_terminal and is_terminal(stored.event):
                    return
            if found:
                continue  # there may be more than one read returns
            if not opened:
                opened = True
                yield None  # following from here on: the caller can tell its client so at once
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
                # (Ctrl-C, a client gone) that comes as the event is set, and the follower goes on.
                async with asyncio.timeout(idle_s):
                    await wake.wait()
            except TimeoutError:
                yield None  # and read again: the subscription is at-most-once
    finally:
        await unsubscribed(sub)


async def unsubscribed(sub: Subscription) -> None:
    """Unsubscribe, unless the connection is closed (or closing) already, which ends the
    subscription with it: nats-py's ConnectionClosedError would take the place of the error, or
    the cancellation, that the `finally` doing this was running for."""
    with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
        await sub.unsubscribe()
