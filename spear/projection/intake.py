"""The projection's intake: stored events as they arrive, grouped into batches with a bounded linger.

An execution's events arrive a few milliseconds apart (`requested`, `started`, its end); folded in
one batch they make one state write instead of three. So a batch closes when every execution in it
has ended (nothing more to wait for), when it is full, or `linger_s` after its first event arrived,
whichever comes first: no event waits longer than the linger (plus the time the batch before it
takes to write).
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from spear.core.events import AnyEvent, BadEvent, decode_event, is_terminal
from spear.jetstream.pull import stream_sequence


class Arrived:
    """One delivered message: its event (or why it cannot be read) and its stream sequence."""

    __slots__ = ("event", "msg", "seq")

    def __init__(self, event: AnyEvent | BadEvent, seq: int, msg: Msg):
        self.event = event
        self.seq = seq
        self.msg = msg


class Intake:
    """Collects arriving events; `next_batch()` hands them over once the batch may close."""

    def __init__(self, linger_s: float, full: int):
        self.linger_s = linger_s
        self.full = full
        self.pending: list[Arrived] = []
        self._open: set[str] = set()  # executions in `pending` whose latest event is not terminal
        self._opened_at = 0.0  # loop time the first pending event arrived
        self._wake: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self.pending)

    def receive(self, msg: Msg) -> None:
        """A message delivered by the consumer (called from its callback, never blocks)."""
        event: AnyEvent | BadEvent
        try:
            readable = decode_event(msg.data, msg.subject)
        except BadEvent as exc:
            event = exc
        else:
            event = readable
            if is_terminal(readable):
                self._open.discard(readable.execution_id)
            else:
                self._open.add(readable.execution_id)
        first = not self.pending
        if first:
            self._opened_at = asyncio.get_running_loop().time()
        self.pending.append(Arrived(event, stream_sequence(msg), msg))
        # The first event wakes the batcher to set the linger's timer; later ones only if they close it.
        if self._wake is not None and (first or self._may_close()):
            _wake_up(self._wake)

    def _may_close(self) -> bool:
        """Something waits and nothing more is worth waiting for: every execution ended, or full."""
        return bool(self.pending) and (not self._open or len(self.pending) >= self.full)

    def _lingered(self, now: float) -> bool:
        return bool(self.pending) and now >= self._opened_at + self.linger_s

    async def next_batch(self) -> list[Arrived]:
        """Every event waiting, once the batch may close (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        while not (self._may_close() or self._lingered(loop.time())):
            self._wake = loop.create_future()
            timer = loop.call_at(self._opened_at + self.linger_s, _wake_up, self._wake) if self.pending else None
            try:
                await self._wake
            finally:
                if timer is not None:
                    timer.cancel()
                self._wake = None
        batch, self.pending = self.pending, []
        self._open.clear()
        return batch


def _wake_up(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
